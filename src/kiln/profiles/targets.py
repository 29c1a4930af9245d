"""Deployment targets as data: which runtime/precision/device to try first, which options to set.

A target profile is a TOML file (the built-in ones live in `kiln/profiles/targets/*.toml`;
users pass their own with `--target-profile FILE`):

    name = "intel-cpu-amx"
    description = "Intel Xeon with AMX: OpenVINO bf16/int8 first"
    kind = "cpu"                 # "cpu" or "accelerator"
    priority = 30                # the highest-priority matching target wins
    cpu_fallback = false         # accelerators: continue with the best matching CPU target
    order = [                    # best first; entries are TARGET[:PRECISION][@DEVICE]
      "openvino:bf16@cpu",
      "openvino:int8",           # no precision = any precision; no device = runtime default
    ]

    [match]                      # every key given must hold; lists mean "any of"
    architecture = ["x86_64"]    # HardwareProfile.cpu.architecture
    cpu_vendor = ["Intel"]
    cpu_features = ["amx_tile"]  # all of these
    cpu_features_any = []        # at least one of these
    cpu_features_absent = []     # none of these
    gpu_vendor = ["nvidia"]      # some GPU in HardwareProfile.gpus has this vendor
    openvino_devices = ["GPU"]   # some OpenVINO device is named this (or "GPU.0", ...)
    os = ["Darwin"]
    mps = true

    [options."openvino"]         # same pattern syntax as `order`; every matching table
    PERFORMANCE_HINT = "LATENCY" # applies, more specific ones (more parts given) last
    [options."openvino:fp32"]
    INFERENCE_PRECISION_HINT = "f32"

Devices are abstract kinds: `cpu`, `cuda` (NVIDIA, CUDA/TensorRT), `gpu` and `npu` (OpenVINO
device plugins, Intel), `mps` (Apple). Selection turns them into concrete names ("cpu",
"cuda:0", "CPU", "GPU.0", "mps").

`match_target(profile, targets)` is pure; only `load_target`, `builtin_targets` and
`target_for` read files.
"""

from __future__ import annotations

import enum
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

from kiln.errors import InvalidRequestError
from kiln.models.spec import Precision
from kiln.profiles.hardware import HardwareProfile, normalize_feature

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

__all__ = [
    "RUNTIME_OF_TARGET",
    "DeviceKind",
    "Placement",
    "TargetKind",
    "TargetMatch",
    "TargetProfile",
    "builtin_target",
    "builtin_targets",
    "compose",
    "load_target",
    "match_target",
    "parse_target",
    "target_for",
]

#: Which runtime runs which artifact target.
RUNTIME_OF_TARGET: Mapping[str, str] = MappingProxyType(
    {"onnx": "onnxruntime", "openvino": "openvino", "tensorrt": "tensorrt", "torch": "torch"}
)
TARGET_ALIASES: Mapping[str, str] = MappingProxyType(
    {"onnxruntime": "onnx", "ort": "onnx", "ov": "openvino", "trt": "tensorrt", "pytorch": "torch"}
)


class DeviceKind(str, enum.Enum):
    """Where a variant runs, before it is resolved to a concrete device name."""

    CPU = "cpu"
    CUDA = "cuda"  # NVIDIA GPU through CUDA (onnxruntime CUDA EP, torch, TensorRT)
    GPU = "gpu"  # OpenVINO GPU plugin (Intel integrated or discrete GPU)
    NPU = "npu"  # OpenVINO NPU plugin
    MPS = "mps"  # Apple Metal through torch

    @classmethod
    def parse(cls, text: str, where: str) -> DeviceKind:
        try:
            return cls(text.strip().lower())
        except ValueError:
            choices = ", ".join(d.value for d in cls)
            raise InvalidRequestError(
                f"unknown device {text!r} in {where}; use one of {choices}"
            ) from None


#: The devices each runtime can use, the first being its default.
DEVICES_OF_RUNTIME: Mapping[str, tuple[DeviceKind, ...]] = MappingProxyType(
    {
        "onnxruntime": (DeviceKind.CPU, DeviceKind.CUDA),
        "openvino": (DeviceKind.CPU, DeviceKind.GPU, DeviceKind.NPU),
        "tensorrt": (DeviceKind.CUDA,),
        "torch": (DeviceKind.CPU, DeviceKind.CUDA, DeviceKind.MPS),
    }
)


class TargetKind(str, enum.Enum):
    CPU = "cpu"
    ACCELERATOR = "accelerator"


def normalize_target(name: str, where: str) -> str:
    key = name.strip().lower()
    key = TARGET_ALIASES.get(key, key)
    if key not in RUNTIME_OF_TARGET:
        raise InvalidRequestError(
            f"unknown runtime {name!r} in {where}; use one of {', '.join(RUNTIME_OF_TARGET)}"
        )
    return key


def parse_precision(text: str, where: str) -> Precision:
    try:
        return Precision(text.strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in Precision)
        raise InvalidRequestError(
            f"unknown precision {text!r} in {where}; use one of {choices}"
        ) from None


@dataclass(frozen=True)
class Placement:
    """`TARGET[:PRECISION][@DEVICE]`: one entry of a target's order (or an options key)."""

    target: str
    precision: Precision | None = None
    device: DeviceKind | None = None

    @classmethod
    def parse(cls, text: str, where: str = "a target profile") -> Placement:
        rest, _, device = text.partition("@")
        target, _, precision = rest.partition(":")
        where = f"{text!r} ({where})"
        if not target.strip():
            raise InvalidRequestError(f"missing runtime in {where}")
        target = normalize_target(target, where)
        placement = cls(
            target,
            parse_precision(precision, where) if precision.strip() else None,
            DeviceKind.parse(device, where) if device.strip() else None,
        )
        runtime = RUNTIME_OF_TARGET[target]
        if placement.device is not None and placement.device not in DEVICES_OF_RUNTIME[runtime]:
            usable = ", ".join(d.value for d in DEVICES_OF_RUNTIME[runtime])
            raise InvalidRequestError(
                f"{runtime} cannot run on {placement.device.value} in {where}; it runs on {usable}"
            )
        return placement

    @property
    def runtime(self) -> str:
        return RUNTIME_OF_TARGET[self.target]

    @property
    def resolved_device(self) -> DeviceKind:
        """The device, or the runtime's default when the entry names none."""
        return self.device or DEVICES_OF_RUNTIME[self.runtime][0]

    @property
    def specificity(self) -> int:
        return 1 + (self.precision is not None) + (self.device is not None)

    def matches(self, target: str, precision: Precision, device: DeviceKind | None = None) -> bool:
        return (
            self.target == target
            and (self.precision is None or self.precision == precision)
            and (device is None or self.resolved_device == device)
        )

    def __str__(self) -> str:
        text = self.target
        if self.precision is not None:
            text += f":{self.precision.value}"
        if self.device is not None:
            text += f"@{self.device.value}"
        return text


def _strings(value: Any, key: str, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InvalidRequestError(f"{where}: [match] {key} must be a string or a list of strings")


@dataclass(frozen=True)
class TargetMatch:
    """Conditions on a `HardwareProfile`; all given ones must hold. Empty matches anything."""

    architecture: tuple[str, ...] = ()
    cpu_vendor: tuple[str, ...] = ()
    cpu_features: tuple[str, ...] = ()
    cpu_features_any: tuple[str, ...] = ()
    cpu_features_absent: tuple[str, ...] = ()
    gpu_vendor: tuple[str, ...] = ()
    openvino_devices: tuple[str, ...] = ()
    os: tuple[str, ...] = ()
    mps: bool | None = None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> TargetMatch:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidRequestError(
                f"{where}: unknown [match] key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key == "mps":
                if not isinstance(value, bool):
                    raise InvalidRequestError(f"{where}: [match] mps must be true or false")
                values[key] = value
            elif key.startswith("cpu_features"):
                values[key] = tuple(normalize_feature(f) for f in _strings(value, key, where))
            else:
                values[key] = _strings(value, key, where)
        return cls(**values)

    def failures(self, profile: HardwareProfile) -> list[str]:
        """Which conditions do not hold for `profile` (empty when it matches)."""
        cpu = profile.cpu
        lower = {x.lower() for x in self.architecture}
        out: list[str] = []
        if self.architecture and cpu.architecture.lower() not in lower:
            out.append(f"architecture {cpu.architecture} is not {'/'.join(self.architecture)}")
        if self.cpu_vendor and cpu.vendor.lower() not in {v.lower() for v in self.cpu_vendor}:
            out.append(f"CPU vendor {cpu.vendor} is not {'/'.join(self.cpu_vendor)}")
        missing = [f for f in self.cpu_features if f not in cpu.features]
        if missing:
            out.append(f"CPU lacks {', '.join(missing)}")
        if self.cpu_features_any and not any(f in cpu.features for f in self.cpu_features_any):
            out.append(f"CPU has none of {', '.join(self.cpu_features_any)}")
        present = [f for f in self.cpu_features_absent if f in cpu.features]
        if present:
            out.append(f"CPU has {', '.join(present)}")
        vendors = {v.lower() for v in self.gpu_vendor}
        if self.gpu_vendor and not any(g.vendor.lower() in vendors for g in profile.gpus):
            out.append(f"no {'/'.join(self.gpu_vendor)} GPU")
        if self.openvino_devices and not any(
            _ov_name_matches(d.name, wanted)
            for d in profile.openvino_devices
            for wanted in self.openvino_devices
        ):
            out.append(f"no OpenVINO {'/'.join(self.openvino_devices)} device")
        if self.os and profile.os_name.lower() not in {o.lower() for o in self.os}:
            out.append(f"OS {profile.os_name or 'unknown'} is not {'/'.join(self.os)}")
        if self.mps is not None and profile.mps_available != self.mps:
            out.append("MPS is " + ("not available" if self.mps else "available"))
        return out

    def matches(self, profile: HardwareProfile) -> bool:
        return not self.failures(profile)


def _ov_name_matches(name: str, wanted: str) -> bool:
    """OpenVINO names a second device of a kind "GPU.1": "GPU" matches "GPU" and "GPU.<n>"."""
    return name.upper() == wanted.upper() or name.upper().startswith(wanted.upper() + ".")


_TOP_KEYS = {
    "name",
    "optimize_candidates",
    "description",
    "kind",
    "priority",
    "cpu_fallback",
    "order",
    "match",
    "options",
}


#: Plan options kiln itself reads as on/off; a TOML string "false" would read as true.
SWITCHES = ("spinning", "compile", "cuda_graph")


def _require_bool(values: Mapping[str, Any], key: str, where: str) -> None:
    if key in values and not isinstance(values[key], bool):
        raise InvalidRequestError(
            f"{where}: {key} must be true or false (unquoted), not {values[key]!r}"
        )


@dataclass(frozen=True)
class TargetProfile:
    """A named deployment target: when it applies, what to try first, which options to set."""

    name: str
    order: tuple[Placement, ...]
    description: str = ""
    kind: TargetKind = TargetKind.CPU
    priority: int = 0
    match: TargetMatch = field(default_factory=TargetMatch)
    #: (pattern, options) pairs in file order; see `options_for`.
    options: tuple[tuple[Placement, Mapping[str, Any]], ...] = ()
    cpu_fallback: bool = False
    #: What `kiln optimize` builds and measures here, `target:precision[-method]`, in order.
    optimize_candidates: tuple[str, ...] = ()
    #: Where it came from: "builtin:<file>" or a path.
    source: str = ""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "") -> TargetProfile:
        where = source or "target profile"
        unknown = sorted(set(data) - _TOP_KEYS)
        if unknown:
            raise InvalidRequestError(
                f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(_TOP_KEYS))}"
            )
        name = data.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InvalidRequestError(f'{where}: needs a `name = "..."`')
        order_raw = data.get("order")
        if not isinstance(order_raw, list) or not order_raw:
            raise InvalidRequestError(
                f'{where}: needs `order = [...]`, a list like ["openvino:int8@cpu", "onnx:fp32"]'
            )
        order = tuple(Placement.parse(str(e), where) for e in order_raw)
        try:
            kind = TargetKind(data.get("kind", "cpu"))
        except ValueError:
            raise InvalidRequestError(f'{where}: kind must be "cpu" or "accelerator"') from None
        priority = data.get("priority", 0)
        if not isinstance(priority, int):
            raise InvalidRequestError(f"{where}: priority must be an integer")
        options_raw = data.get("options", {})
        if not isinstance(options_raw, Mapping):
            raise InvalidRequestError(f'{where}: [options."PATTERN"] must be tables')
        options = []
        for pattern, values in options_raw.items():
            if not isinstance(values, Mapping):
                raise InvalidRequestError(f'{where}: [options."{pattern}"] must be a table')
            for switch in SWITCHES:
                _require_bool(values, switch, f'{where}: [options."{pattern}"]')
            options.append((Placement.parse(pattern, where), MappingProxyType(dict(values))))
        _require_bool(data, "cpu_fallback", where)
        return cls(
            name=name.strip(),
            order=order,
            description=str(data.get("description", "")),
            kind=kind,
            priority=priority,
            match=TargetMatch.from_dict(data.get("match", {}), where),
            options=tuple(options),
            cpu_fallback=bool(data.get("cpu_fallback", False)),
            optimize_candidates=_strings(
                data.get("optimize_candidates", []), "optimize_candidates", where
            ),
            source=source,
        )

    def placements_for(self, target: str, precision: Precision) -> list[tuple[int, Placement]]:
        """(rank, entry) for every order entry a variant with this target and precision matches."""
        return [(i, p) for i, p in enumerate(self.order) if p.matches(target, precision)]

    def options_for(self, target: str, precision: Precision, device: DeviceKind) -> dict[str, Any]:
        """Options of every matching pattern, less specific first, so specific ones win."""
        matching = [
            (pattern.specificity, index, values)
            for index, (pattern, values) in enumerate(self.options)
            if pattern.matches(target, precision, None)
            and (pattern.device is None or pattern.device == device)
        ]
        merged: dict[str, Any] = {}
        for _, _, values in sorted(matching, key=lambda m: (m[0], m[1])):
            merged.update(values)
        return merged


def parse_target(text: str, source: str = "") -> TargetProfile:
    """A `TargetProfile` from TOML text."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequestError(
            f"{source or 'target profile'} is not valid TOML: {exc}"
        ) from None
    return TargetProfile.from_dict(data, source)


def load_target(path: str | os.PathLike[str]) -> TargetProfile:
    """Read a target profile file (`--target-profile FILE`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(
            f"cannot read target profile {path}: {exc.strerror or exc}"
        ) from None
    return parse_target(text, str(path))


@functools.lru_cache(maxsize=1)
def builtin_targets() -> tuple[TargetProfile, ...]:
    """The target profiles shipped in `kiln/profiles/targets/*.toml`, sorted by file name."""
    folder = resources.files("kiln.profiles").joinpath("targets")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".toml")), key=lambda f: f.name)
    return tuple(parse_target(f.read_text(encoding="utf-8"), f"builtin:{f.name}") for f in files)


def builtin_target(name: str) -> TargetProfile:
    for target in builtin_targets():
        if target.name == name:
            return target
    names = ", ".join(t.name for t in builtin_targets())
    raise InvalidRequestError(f"no built-in target profile {name!r}; built-in: {names}")


def _best(profile: HardwareProfile, targets: Iterable[TargetProfile]) -> TargetProfile | None:
    best: TargetProfile | None = None
    for target in targets:  # the first of equal priority wins
        if target.match.matches(profile) and (best is None or target.priority > best.priority):
            best = target
    return best


def compose(accelerator: TargetProfile, cpu: TargetProfile) -> TargetProfile:
    """`accelerator`'s order then `cpu`'s (minus repeats); `accelerator`'s options win."""
    order = list(accelerator.order)
    order += [p for p in cpu.order if p not in order]
    return replace(
        accelerator,
        name=f"{accelerator.name}+{cpu.name}",
        description=f"{accelerator.description} Then: {cpu.description}".strip(),
        order=tuple(order),
        options=cpu.options + accelerator.options,
        cpu_fallback=False,
        source=f"{accelerator.source} + {cpu.source}",
    )


def match_target(
    profile: HardwareProfile, targets: Sequence[TargetProfile] | None = None
) -> TargetProfile:
    """The highest-priority target whose `[match]` holds for `profile` (pure).

    An accelerator target with `cpu_fallback = true` is composed with the best matching
    CPU target, so a GPU machine still has a good order for what runs on its CPU.
    `targets` defaults to the built-in ones.
    """
    targets = builtin_targets() if targets is None else tuple(targets)
    best = _best(profile, targets)
    if best is None:
        raise InvalidRequestError(
            "no target profile matches this machine: "
            + "; ".join(f"{t.name}: {', '.join(t.match.failures(profile))}" for t in targets)
        )
    return with_cpu_fallback(best, profile, targets)


def with_cpu_fallback(
    target: TargetProfile, profile: HardwareProfile, targets: Sequence[TargetProfile] | None = None
) -> TargetProfile:
    """`target` composed with the best matching CPU target when it asks for one (pure)."""
    if not target.cpu_fallback:
        return target
    targets = builtin_targets() if targets is None else tuple(targets)
    cpu = _best(profile, [t for t in targets if t.kind is TargetKind.CPU])
    return target if cpu is None else compose(target, cpu)


def target_for(
    profile: HardwareProfile,
    target_profile: TargetProfile | str | os.PathLike[str] | None = None,
) -> TargetProfile:
    """The target to plan with: a given `TargetProfile`, a built-in name, a TOML file, or the match.

    A string naming a built-in target (`"arm-cpu"`) selects it; any other string or path is
    read as a file. This is the only place selection touches the file system.
    """
    if target_profile is None:
        return match_target(profile)
    if isinstance(target_profile, TargetProfile):
        return with_cpu_fallback(target_profile, profile)
    text = os.fspath(target_profile)
    if isinstance(target_profile, str) and any(t.name == text for t in builtin_targets()):
        return with_cpu_fallback(builtin_target(text), profile)
    return with_cpu_fallback(load_target(text), profile)
