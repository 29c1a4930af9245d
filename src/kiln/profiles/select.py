"""Selection: a pure function from (manifest, hardware profile, policy[, target]) to a `Plan`.

For every component, every variant is placed on the devices the target profile's order
names for it (`kiln/profiles/targets/*.toml`, matched to the machine by `match_target`).
A placement is dropped, with its reason, when:

- a `--require` constraint excludes it;
- its runtime is not installed, or the device is missing (no NVIDIA GPU, onnxruntime
  without `CUDAExecutionProvider`, a CPU-only torch, no OpenVINO GPU/NPU, no MPS);
- it is a TensorRT plan built for another GPU (name / compute capability) or another
  TensorRT version, or records neither;
- it failed its parity check at export, or its recorded drift is worse than the policy's
  drift budget (unless a `--require` names the variant);
- it does not fit in memory: `size_bytes x Policy.memory_headroom` (default
  `MEMORY_HEADROOM` = 1.5: weights plus the runtime's working copies and activations) must
  fit in the pool the device draws from (available RAM for CPU, MPS, NPU and integrated
  GPUs; free VRAM for CUDA devices; device memory for discrete OpenVINO GPUs). Pools are
  shared: components are placed largest first and each takes its share, so the UNet gets
  the VRAM and a VAE that no longer fits goes to the CPU.

The rest are ranked: caller preferences (`--prefer`) first, then measured median latency
for this hardware fingerprint (`manifest.measurements[fingerprint][variant_id]`, written by
`kiln bench`; a measured placement beats an unmeasured one), then the target's order. With
`objective="memory"` the smallest variant wins before latency is considered. Every choice
carries its reason; every dropped or lower-ranked placement is kept in `Choice.rejected`.

Nothing here does I/O: when no target is passed, `match_target` picks one from the
built-in target files, which are read once per process.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from kiln.artifacts import Manifest, Variant
from kiln.errors import BackendUnavailableError, InvalidRequestError
from kiln.models.lora import SWITCHABLE_PRECISIONS
from kiln.models.spec import Precision
from kiln.profiles.hardware import GpuInfo, HardwareProfile, install_hint
from kiln.profiles.targets import (
    DEVICES_OF_RUNTIME,
    RUNTIME_OF_TARGET,
    DeviceKind,
    Placement,
    TargetProfile,
    match_target,
    normalize_target,
    parse_precision,
    with_cpu_fallback,
)

__all__ = [
    "DEFAULT_DRIFT_BUDGET",
    "DEFAULT_PRECISION_ORDER",
    "MEMORY_HEADROOM",
    "RUNTIME_OF_TARGET",
    "Choice",
    "Constraint",
    "Objective",
    "Plan",
    "Policy",
    "drift_problem",
    "parse_drift_budget",
    "select",
]

GIB = 1024**3
#: Memory a variant needs at run time, as a multiple of its size on disk.
MEMORY_HEADROOM = 1.5
#: Drift limits by metric name in a variant's `drift` mapping. Metrics whose name contains
#: psnr, ssim, cos, clip, bleu or match are "higher is better" (a floor); all others are a ceiling.
#: `psnr` is the image PSNR in dB against fp32 at the same seed and prompt.
#: `*_drop` is the judged quality lost against fp32 on the shapes world (`kiln.bench.quality`,
#: recorded for the built-in trained models): at most 5 points.
DEFAULT_DRIFT_BUDGET: Mapping[str, float] = MappingProxyType(
    {"psnr": 20.0, "bleu": 0.3, "judged_correct_drop": 0.05, "caption_accuracy_drop": 0.05}
)
_HIGHER_IS_BETTER = ("psnr", "ssim", "cos", "clip", "bleu", "match")
DEFAULT_TARGET_ORDER = ("tensorrt", "openvino", "onnx", "torch")  # ties only
DEFAULT_PRECISION_ORDER = (
    Precision.FP32,
    Precision.BF16,
    Precision.FP16,
    Precision.INT8,
    Precision.FP8,
    Precision.INT4,
    Precision.NF4,
)


class Objective(str, enum.Enum):
    LATENCY = "latency"
    # Ranked as latency; runtimes that can are tuned for batches (OpenVINO's THROUGHPUT hint).
    THROUGHPUT = "throughput"
    MEMORY = "memory"


@dataclass(frozen=True)
class Constraint:
    """`runtime:precision@device`, every part optional, optionally for one component only.

    Parsed from strings such as `onnx:fp32`, `openvino`, `:int8`, `onnx@cuda`,
    `unet=openvino:int8`, `onnx:int8-static` (a tagged variant), or a variant id
    `unet/openvino/int8`.
    """

    component: str | None = None
    target: str | None = None
    precision: Precision | None = None
    device: DeviceKind | None = None
    # None: any variant of that precision; "": the untagged one; else `Variant.tag`.
    tag: str | None = None

    @classmethod
    def parse(cls, text: str) -> Constraint:
        raw = text.strip()
        exact = raw.count("/") == 2 and "=" not in raw  # a variant id
        if exact:
            component, target, precision = raw.split("/")
            raw = f"{component}={target}:{precision}"
        component, _, rest = raw.rpartition("=")
        rest, _, device = rest.partition("@")
        target, _, precision = rest.partition(":")
        precision, _, tag = precision.partition("-")
        where = repr(text)
        parsed = cls(
            component.strip() or None,
            normalize_target(target, where) if target.strip() else None,
            parse_precision(precision, where) if precision.strip() else None,
            DeviceKind.parse(device, where) if device.strip() else None,
            tag.strip() or ("" if exact else None),
        )
        if parsed == cls(parsed.component):
            raise InvalidRequestError(
                f"{text!r} names no runtime, precision or device; use e.g. onnx:fp32, "
                "openvino, :int8, onnx@cuda, unet=openvino:int8"
            )
        return parsed

    def applies_to(self, component: str) -> bool:
        return self.component is None or self.component == component

    def matches(self, variant: Variant, device: DeviceKind | None = None) -> bool:
        return (
            (self.target is None or variant.target == self.target)
            and (self.precision is None or variant.precision == self.precision)
            and (self.device is None or device is None or device == self.device)
            and (self.tag is None or (variant.tag or "") == self.tag)
        )

    def names(self, variant: Variant) -> bool:
        """True when this constraint names `variant` exactly (runtime and precision given)."""
        return self.target is not None and self.precision is not None and self.matches(variant)

    def __str__(self) -> str:
        text = (self.target or "") + (f":{self.precision.value}" if self.precision else "")
        text += f"-{self.tag}" if self.tag else ""
        if self.device is not None:
            text += f"@{self.device.value}"
        return f"{self.component}={text}" if self.component else text


def parse_drift_budget(texts: Sequence[str] | str) -> dict[str, float]:
    """`["psnr=25", "max_abs=0.1"]` -> `{"psnr": 25.0, "max_abs": 0.1}`."""
    out: dict[str, float] = {}
    for text in [texts] if isinstance(texts, str) else texts:
        name, sep, value = text.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            out[name.strip()] = float(value.lstrip("="))
        except ValueError:
            raise InvalidRequestError(
                f"drift budget {text!r} is not METRIC=NUMBER (e.g. psnr=25)"
            ) from None
    return out


@dataclass(frozen=True)
class Policy:
    """What the caller wants: objective, constraints, quality budget, memory margin."""

    objective: Objective = Objective.LATENCY
    prefer: tuple[Constraint, ...] = ()
    require: tuple[Constraint, ...] = ()
    allow_failed_parity: bool = False
    drift_budget: Mapping[str, float] = field(default_factory=lambda: DEFAULT_DRIFT_BUDGET)
    memory_headroom: float = MEMORY_HEADROOM
    # Components whose weights change at load (LoRAs): only plain-weight variants qualify.
    weight_changes: frozenset[str] = frozenset()
    #: Who asked for `prefer`, as the plan's reasons say it.
    prefer_origin: str = "the caller"

    def __post_init__(self) -> None:
        try:
            objective = Objective(self.objective)
        except ValueError:
            raise InvalidRequestError(
                f"unknown objective {self.objective!r}; use latency, throughput or memory"
            ) from None
        if not self.memory_headroom >= 1.0:
            raise InvalidRequestError(
                f"memory headroom must be at least 1.0, got {self.memory_headroom}"
            )
        object.__setattr__(self, "objective", objective)
        object.__setattr__(self, "prefer", tuple(self.prefer))
        object.__setattr__(self, "require", tuple(self.require))
        object.__setattr__(self, "weight_changes", frozenset(self.weight_changes))
        object.__setattr__(self, "drift_budget", MappingProxyType(dict(self.drift_budget)))

    @classmethod
    def from_strings(
        cls, prefer: Sequence[str] = (), require: Sequence[str] = (), **kwargs: Any
    ) -> Policy:
        budget = kwargs.get("drift_budget")
        if isinstance(budget, str) or (
            isinstance(budget, Sequence) and all(isinstance(b, str) for b in budget)
        ):
            kwargs["drift_budget"] = parse_drift_budget(budget)
        return cls(
            prefer=tuple(Constraint.parse(p) for p in prefer),
            require=tuple(Constraint.parse(r) for r in require),
            **kwargs,
        )

    def requirements_for(self, component: str) -> tuple[Constraint, ...]:
        return tuple(c for c in self.require if c.applies_to(component))


@dataclass(frozen=True)
class Choice:
    """One component's pick: the variant, where and how it runs, and why."""

    component: str
    variant_id: str
    runtime: str
    device: str
    reason: str
    options: Mapping[str, object] = field(default_factory=dict)
    rejected: tuple[tuple[str, str], ...] = ()  # (variant id, why it was not chosen)
    precision: str = ""
    #: Bytes the memory check reserved (size x headroom) in `memory_pool`.
    memory_bytes: int = 0
    memory_pool: str = ""
    measured_ms: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "variant": self.variant_id,
            "runtime": self.runtime,
            "device": self.device,
            "precision": self.precision,
            "reason": self.reason,
            "options": dict(self.options),
            "memory_bytes": self.memory_bytes,
            "memory_pool": self.memory_pool,
            "measured_ms": self.measured_ms,
            "rejected": [{"variant": v, "why": why} for v, why in self.rejected],
        }


@dataclass(frozen=True)
class Plan:
    """Per component the chosen variant; prints as a table."""

    choices: tuple[Choice, ...]
    target: str = ""
    objective: str = Objective.LATENCY.value
    fingerprint: str = ""
    notes: tuple[str, ...] = ()

    def __getitem__(self, component: str) -> Choice:
        for choice in self.choices:
            if choice.component == component:
                return choice
        raise KeyError(component)

    def __contains__(self, component: object) -> bool:
        return any(c.component == component for c in self.choices)

    def __iter__(self):
        return iter(self.choices)

    def __len__(self) -> int:
        return len(self.choices)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(c.component, c.variant_id, c.runtime, c.device, c.reason) for c in self.choices]

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "objective": self.objective,
            "fingerprint": self.fingerprint,
            "notes": list(self.notes),
            "choices": [c.to_dict() for c in self.choices],
        }

    def table(self, *, verbose: bool = False) -> str:
        """A plain-text table; `verbose` adds every rejected variant under its component."""
        header = ("component", "variant", "runtime", "device", "reason")
        rows = self.rows()
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

        def line(row: Sequence[str]) -> str:
            cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=False)]
            return "  ".join([*cells, row[4]]).rstrip()

        title = f"plan ({self.objective}"
        title += f", target {self.target}" if self.target else ""
        title += f", hardware {self.fingerprint})" if self.fingerprint else ")"
        out = [title, line(header), line(["-" * w for w in widths] + ["-" * 6])]
        for choice, row in zip(self.choices, rows, strict=True):
            out.append(line(row))
            if verbose:
                indent = " " * (widths[0] + 2)
                out += [f"{indent}not {vid}: {why}" for vid, why in choice.rejected]
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def __str__(self) -> str:
        return self.table()


# ------------------------------------------------------------------------------- selection


@dataclass(frozen=True)
class _Candidate:
    """One variant on one device, with everything ranking and reasons need."""

    variant: Variant
    rank: int  # position in the target's order; len(order) when not listed
    entry: Placement | None
    kind: DeviceKind
    device: str = ""  # concrete name once resolved
    why: str = ""  # non-empty: dropped, and why
    device_level: bool = False  # `why` concerns this device, not the variant as such
    preferred: Constraint | None = None
    measured_ms: float | None = None
    pool: str = ""
    pool_label: str = ""
    pool_bytes: int | None = None
    options: Mapping[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.variant.id}@{self.device or self.kind.value}"

    def rejection(self) -> tuple[str, str]:
        if self.device_level:
            return self.variant.id, f"on {self.device or self.kind.value}: {self.why}"
        return self.variant.id, self.why


def select(
    manifest: Manifest,
    profile: HardwareProfile,
    policy: Policy = Policy(),
    target: TargetProfile | None = None,
) -> Plan:
    """Pick one variant, runtime and device per component, or raise saying why not.

    `target` defaults to `match_target(profile)`. Raises `InvalidRequestError` when a
    `require` constraint cannot be met and `BackendUnavailableError` when nothing at all
    can run a component; the message names the component and every variant's reason.
    """
    target = match_target(profile) if target is None else with_cpu_fallback(target, profile)
    components = list(dict.fromkeys(v.component for v in manifest.variants))
    for constraint in (*policy.require, *policy.prefer):
        if constraint.component is not None and constraint.component not in components:
            raise InvalidRequestError(
                f"{constraint} names component {constraint.component!r}; "
                f"the artifact has {', '.join(components)}"
            )
    measured = manifest.measurements.get(profile.fingerprint, {})
    notes: list[str] = []
    failures = target.match.failures(profile)
    if failures:
        notes.append(f"target {target.name} does not match this machine: {'; '.join(failures)}")
    if profile.memory.available_bytes is None:
        notes.append("available RAM is unknown: CPU placements were not checked for memory")

    candidates = {
        c: _candidates(manifest, c, profile, policy, target, measured) for c in components
    }
    # Largest first: the component that matters most for speed gets first claim on memory.
    by_size = sorted(
        components,
        key=lambda c: -max((x.variant.size_bytes for x in candidates[c]), default=0),
    )
    left: dict[str, int | None] = {}
    holders: dict[str, list[str]] = {}
    chosen: dict[str, Choice] = {}
    for component in by_size:
        chosen[component] = _choose(component, candidates[component], policy, target, left, holders)
    return Plan(
        _without_spinning_beside_others(tuple(chosen[c] for c in components)),
        target=target.name,
        objective=policy.objective.value,
        fingerprint=profile.fingerprint,
        notes=tuple(notes),
    )


def _without_spinning_beside_others(choices: tuple[Choice, ...]) -> tuple[Choice, ...]:
    """onnxruntime's CPU threads spin for a while after each call, waiting for the next one;
    beside another runtime on the CPU they take the cores that one needs (an OpenVINO BLIP
    vision encoder right after an onnxruntime call: 256 ms, 233 ms with spinning off, 2
    cores). So a plan that mixes runtimes on the CPU turns onnxruntime's spinning off. It
    pays once per switch of runtime: a whole BLIP-base caption moved by less than its noise."""
    on_cpu = {c.runtime for c in choices if c.device.lower() == "cpu"}  # OpenVINO says CPU
    if "onnxruntime" not in on_cpu or len(on_cpu) == 1:
        return choices
    return tuple(
        replace(c, options=MappingProxyType({**c.options, "spinning": False}))
        if c.runtime == "onnxruntime" and c.device.lower() == "cpu"
        else c
        for c in choices
    )


def _candidates(
    manifest: Manifest,
    component: str,
    profile: HardwareProfile,
    policy: Policy,
    target: TargetProfile,
    measured: Mapping[str, Any],
) -> list[_Candidate]:
    out: list[_Candidate] = []
    for variant in manifest.variants_of(component):
        runtime = RUNTIME_OF_TARGET.get(variant.target)
        if runtime is None:
            entry = _Candidate(variant, len(target.order), None, DeviceKind.CPU)
            out.append(_drop(entry, f"unknown target {variant.target!r}"))
            continue
        placements: list[tuple[int, Placement | None]] = list(
            target.placements_for(variant.target, variant.precision)
        )
        if not placements:
            placements = [(len(target.order), None)]
        # A constraint that names a device places the variant there even if the order does not.
        named = [
            c.device
            for c in (*policy.require, *policy.prefer)
            if c.device is not None and c.applies_to(component) and c.matches(variant)
        ]
        for kind in dict.fromkeys(named):
            if kind in DEVICES_OF_RUNTIME[runtime]:
                placements.append((len(target.order), Placement(variant.target, None, kind)))
        why_variant = _why_not_variant(variant, component, runtime, profile, policy)
        if why_variant:  # one entry: the reason holds on every device
            rank, entry = placements[0]
            kind = entry.resolved_device if entry else _default_device(runtime)
            out.append(_drop(_Candidate(variant, rank, entry, kind), why_variant))
            continue
        seen: set[DeviceKind] = set()
        for rank, entry in placements:
            kind = entry.resolved_device if entry else _default_device(runtime)
            if kind not in seen:
                seen.add(kind)
                cand = _Candidate(variant, rank, entry, kind)
                out.append(_place(cand, component, runtime, profile, policy, target, measured))
    return out


def _drop(cand: _Candidate, why: str, device_level: bool = False) -> _Candidate:
    return replace(cand, why=why, device_level=device_level)


def _default_device(runtime: str) -> DeviceKind:
    return DEVICES_OF_RUNTIME[runtime][0]


def _why_not_variant(
    variant: Variant, component: str, runtime: str, profile: HardwareProfile, policy: Policy
) -> str:
    """Why `variant` cannot run anywhere here (empty when it may)."""
    for constraint in policy.requirements_for(component):
        if not constraint.matches(variant):
            return f"excluded by --require {constraint}"
    if not profile.has_runtime(runtime):
        info = profile.runtime(runtime)
        detail = info.detail if info is not None else ""
        state = (
            "is not installed" if detail in ("", "not installed") else f"is not usable ({detail})"
        )
        return f"{runtime} {state}; {install_hint(runtime)}"
    if variant.parity is not None and not variant.parity.passed and not policy.allow_failed_parity:
        return "failed its parity check at export"
    named = any(c.names(variant) for c in policy.requirements_for(component))
    if (
        component in policy.weight_changes
        and variant.precision not in SWITCHABLE_PRECISIONS
        and not named
    ):
        return f"{variant.precision.value} weights cannot take LoRAs at load"
    if component in policy.weight_changes and variant.target == "tensorrt" and not named:
        return "a TensorRT plan's weights are built in: it cannot take LoRAs at load"
    drift = drift_problem(variant, policy.drift_budget)
    if drift and not named:
        return f"drift {drift} (require it by name to use it anyway)"
    return ""


def drift_problem(variant: Variant, budget: Mapping[str, float]) -> str:
    drift = variant.drift or {}
    if variant.precision is not Precision.FP32 and not set(drift) - {"component"}:
        # A quantized variant whose end-to-end drift was never recorded (an interrupted
        # `kiln quantize`) has not earned its place: its cost in quality is unknown.
        return "end-to-end drift was never measured (rerun `kiln quantize`)"
    if drift.get("passed") is False:
        return "failed its budget at quantization"
    for metric, limit in budget.items():
        value = drift.get(metric)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        higher = any(token in metric.lower() for token in _HIGHER_IS_BETTER)
        if math.isnan(value) or (value < limit if higher else value > limit):
            sign = "<" if higher else ">"
            return f"{metric} {value:g} {sign} budget {limit:g}"
    return ""


def _place(
    cand: _Candidate,
    component: str,
    runtime: str,
    profile: HardwareProfile,
    policy: Policy,
    target: TargetProfile,
    measured: Mapping[str, Any],
) -> _Candidate:
    """Resolve the device, check it, attach memory pool, options, preference, measurement."""
    variant, kind = cand.variant, cand.kind
    for constraint in policy.requirements_for(component):
        if constraint.device is not None and constraint.device != kind:
            return _drop(cand, f"excluded by --require {constraint}", device_level=True)
    device, gpu, why = _resolve_device(kind, runtime, variant, profile)
    cand = replace(cand, device=device or kind.value)
    if why:
        return _drop(cand, why, device_level=True)
    if variant.precision is Precision.BF16 and kind is DeviceKind.CUDA and gpu is not None:
        cc = _cc(gpu.compute_capability)
        if cc is not None and cc < (8, 0):
            return _drop(
                cand,
                f"bf16 needs compute capability 8.0+, {gpu.name} is sm {gpu.compute_capability}",
                device_level=True,
            )
    pool, label, free = _pool(kind, device, gpu, profile)
    entry = measured.get(variant.id) if isinstance(measured, Mapping) else None
    ms = None
    if isinstance(entry, Mapping) and isinstance(entry.get("median_ms"), (int, float)):
        where = entry.get("device")
        if where is None or where in (device, kind.value):
            ms = float(entry["median_ms"])
    preferred = next(
        (c for c in policy.prefer if c.applies_to(component) and c.matches(variant, kind)),
        None,
    )
    options = _derived_options(runtime, kind, policy.objective)
    options.update(target.options_for(variant.target, variant.precision, kind))
    if runtime == "onnxruntime" and kind is DeviceKind.CUDA and options.get("tensorrt_provider"):
        options.update(_tensorrt_provider(profile))
    return replace(
        cand,
        preferred=preferred,
        measured_ms=ms,
        pool=pool,
        pool_label=label,
        pool_bytes=free,
        options=MappingProxyType(options),
    )


def _derived_options(runtime: str, kind: DeviceKind, objective: Objective) -> dict[str, object]:
    if runtime == "onnxruntime":
        providers = ["CPUExecutionProvider"]
        if kind is DeviceKind.CUDA:
            providers.insert(0, "CUDAExecutionProvider")
        return {"providers": providers}
    if runtime == "openvino":
        hint = "THROUGHPUT" if objective is Objective.THROUGHPUT else "LATENCY"
        return {"PERFORMANCE_HINT": hint}
    return {}


def _tensorrt_provider(profile: HardwareProfile) -> dict[str, object]:
    """onnxruntime's providers with TensorRT's first, or why it cannot be (the target asked)."""
    if "TensorrtExecutionProvider" not in profile.onnxruntime_providers:
        why = "onnxruntime has no TensorrtExecutionProvider (onnxruntime-gpu has it)"
    elif not profile.has_runtime("tensorrt"):
        why = f"TensorRT is not installed; {install_hint('tensorrt')}"
    else:
        providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
        return {"providers": providers}
    return {"tensorrt_provider": False, "tensorrt_provider_unavailable": why}


def _cc(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(p) for p in str(text).strip().split("."))
    except ValueError:
        return None


def _vram(gpu: GpuInfo) -> int:
    return gpu.vram_free_bytes if gpu.vram_free_bytes is not None else gpu.vram_total_bytes or 0


def _resolve_device(
    kind: DeviceKind, runtime: str, variant: Variant, profile: HardwareProfile
) -> tuple[str | None, GpuInfo | None, str]:
    """(concrete device name, GPU if CUDA, why it cannot be used or "")."""
    if kind is DeviceKind.CPU:
        if runtime != "openvino":
            return "cpu", None, ""
        if not profile.openvino_devices:  # the CPU plugin always ships with OpenVINO
            return "CPU", None, ""
        return _openvino_device(profile, "CPU")
    if kind is DeviceKind.MPS:
        if runtime != "torch":
            return None, None, f"{runtime} cannot use MPS"
        if not profile.mps_available:
            return "mps", None, "MPS is not available"
        return "mps", None, ""
    if kind in (DeviceKind.GPU, DeviceKind.NPU):
        if runtime != "openvino":
            return None, None, f"{runtime} cannot use an OpenVINO {kind.value.upper()} device"
        return _openvino_device(profile, kind.value.upper())
    # CUDA
    nvidia = sorted(
        (g for g in profile.gpus if g.vendor.lower() == "nvidia"),
        key=lambda g: (-_vram(g), g.index),
    )
    if not nvidia:
        return "cuda", None, "no NVIDIA GPU"
    if runtime == "tensorrt":
        return _tensorrt_gpu(variant, nvidia, profile)
    gpu = nvidia[0]
    device = f"cuda:{gpu.index}"
    if runtime == "onnxruntime" and "CUDAExecutionProvider" not in profile.onnxruntime_providers:
        have = ", ".join(profile.onnxruntime_providers) or "none"
        return (
            device,
            gpu,
            (
                f"onnxruntime has no CUDAExecutionProvider (has {have}); "
                f"{install_hint('onnxruntime-gpu')} instead of onnxruntime"
            ),
        )
    if runtime == "torch":
        info = profile.runtime("torch")
        detail = info.detail if info is not None else ""
        if not (detail or "").lower().startswith("cuda"):
            return device, gpu, f"torch is not a CUDA build ({detail or 'unknown build'})"
    return device, gpu, ""


def cuda_unavailable(profile: HardwareProfile) -> dict[str, str]:
    """Per runtime that can use an NVIDIA GPU, why nothing is placed on one here (the checks
    `_resolve_device` makes, without a variant); runtimes that can use one are left out."""
    nvidia = any(g.vendor.lower() == "nvidia" for g in profile.gpus)
    torch = profile.runtime("torch")
    build = (torch.detail if torch is not None else "") or "unknown build"
    out: dict[str, str] = {}
    for runtime in ("tensorrt", "onnxruntime", "torch"):
        reasons = [] if nvidia else ["no NVIDIA GPU"]
        if runtime == "tensorrt" and not profile.has_runtime("tensorrt"):
            reasons.append(f"tensorrt is not installed ({install_hint('tensorrt')})")
        if runtime == "onnxruntime" and "CUDAExecutionProvider" not in (
            profile.onnxruntime_providers
        ):
            reasons.append(
                f"onnxruntime has no CUDAExecutionProvider ({install_hint('onnxruntime-gpu')})"
            )
        if runtime == "torch" and not build.lower().startswith("cuda"):
            reasons.append(f"torch is not a CUDA build ({build})")
        if reasons:
            out[runtime] = "; ".join(reasons)
    return out


def _openvino_device(profile: HardwareProfile, wanted: str) -> tuple[str | None, None, str]:
    names = sorted(d.name for d in profile.openvino_devices)
    for name in names:
        if name == wanted or name.startswith(wanted + "."):
            return name, None, ""
    return wanted, None, f"no OpenVINO {wanted} device (OpenVINO sees {', '.join(names) or 'none'})"


def _tensorrt_gpu(
    variant: Variant, nvidia: list[GpuInfo], profile: HardwareProfile
) -> tuple[str, GpuInfo | None, str]:
    built = variant.built_for or {}
    want_trt = built.get("tensorrt")
    want_cc = _cc(built.get("compute_capability"))
    want_name = built.get("gpu")
    if not want_trt or (want_cc is None and not want_name):
        return (
            "cuda",
            None,
            (
                "TensorRT plan does not record the GPU and TensorRT version it was built for; rebuild it"
            ),
        )
    info = profile.runtime("tensorrt")
    have_trt = info.version if info is not None else None
    if not have_trt:
        return "cuda", None, "installed TensorRT version is unknown; a plan is tied to its version"
    if str(have_trt).split(".")[: len(str(want_trt).split("."))] != str(want_trt).split("."):
        return (
            "cuda",
            None,
            (f"TensorRT plan built with TensorRT {want_trt}, installed is {have_trt}; rebuild it"),
        )
    ampere_plus = str(built.get("hardware_compatibility", "")).lower().replace("_", "") in (
        "ampere+",
        "ampereplus",
    )
    for gpu in nvidia:
        cc = _cc(gpu.compute_capability)
        if ampere_plus:
            if cc is not None and cc >= (8, 0):
                return f"cuda:{gpu.index}", gpu, ""
        elif (want_cc is None or cc == want_cc) and (not want_name or gpu.name == want_name):
            return f"cuda:{gpu.index}", gpu, ""
    built_desc = f"{want_name or 'a GPU'}" + (
        f" (sm {built.get('compute_capability')})" if want_cc else ""
    )
    if ampere_plus:
        built_desc = "Ampere or newer (hardware compatibility ampere+)"
    have = ", ".join(f"{g.name} (sm {g.compute_capability or '?'})" for g in nvidia)
    return "cuda", None, f"TensorRT plan built for {built_desc}, this machine has {have}"


def _pool(
    kind: DeviceKind, device: str | None, gpu: GpuInfo | None, profile: HardwareProfile
) -> tuple[str, str, int | None]:
    """(pool key, readable name, free bytes or None if unknown) the device allocates from."""
    if kind is DeviceKind.CUDA and gpu is not None:
        return f"cuda:{gpu.index}", f"free VRAM on cuda:{gpu.index}", _vram(gpu) or None
    if kind is DeviceKind.GPU and device:
        ov = profile.openvino_device(device)
        kind_text = (ov.get("DEVICE_TYPE") or "").upper() if ov else ""
        size = ov.get("GPU_DEVICE_TOTAL_MEM_SIZE") if ov else None
        if "DISCRETE" in kind_text and size and size.isdigit():
            return f"openvino:{device}", f"memory of OpenVINO {device}", int(size)
        return (
            "ram",
            "available RAM (shared with the integrated GPU)",
            profile.memory.available_bytes,
        )
    return "ram", "available RAM", profile.memory.available_bytes


def _rank_key(cand: _Candidate, policy: Policy) -> tuple:
    variant = cand.variant
    ms = (cand.measured_ms is None, cand.measured_ms or 0.0)
    static = (
        cand.rank,
        DEFAULT_TARGET_ORDER.index(variant.target)
        if variant.target in DEFAULT_TARGET_ORDER
        else 99,
        DEFAULT_PRECISION_ORDER.index(variant.precision),
        variant.id,
    )
    if policy.objective is Objective.MEMORY:
        return (cand.preferred is None, variant.size_bytes, *ms, *static)
    return (cand.preferred is None, *ms, *static)


def _gib(n: float) -> str:
    if n >= GIB / 10:
        return f"{n / GIB:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def _choose(
    component: str,
    candidates: list[_Candidate],
    policy: Policy,
    target: TargetProfile,
    left: dict[str, int | None],
    holders: dict[str, list[str]],
) -> Choice:
    runnable = sorted((c for c in candidates if not c.why), key=lambda c: _rank_key(c, policy))
    dropped = [c for c in candidates if c.why]
    best: _Candidate | None = None
    need = 0
    tried = 0
    for cand in runnable:
        tried += 1
        need = math.ceil(cand.variant.size_bytes * policy.memory_headroom)
        free = left.get(cand.pool, cand.pool_bytes)
        if free is not None and need > free:
            after = f" after {', '.join(holders[cand.pool])}" if holders.get(cand.pool) else ""
            dropped.append(
                _drop(
                    cand,
                    f"needs {_gib(need)} ({_gib(cand.variant.size_bytes)} x "
                    f"{policy.memory_headroom:g} headroom), {cand.pool_label} is {_gib(free)}{after}",
                    device_level=True,
                )
            )
            continue
        best = cand
        if free is not None:
            left[cand.pool] = free - need
        holders.setdefault(cand.pool, []).append(component)
        break
    if best is None:
        raise _no_runnable(component, candidates, dropped, policy)
    others = runnable[tried:]  # runnable, never needed
    rejected = [c.rejection() for c in sorted(dropped, key=lambda c: c.rank)]
    rejected += [(c.variant.id, f"on {c.device}: ranked lower") for c in others]
    rejected = list(dict.fromkeys(rejected))
    return Choice(
        component=component,
        variant_id=best.variant.id,
        runtime=RUNTIME_OF_TARGET[best.variant.target],
        device=best.device,
        reason=_reason(best, runnable, dropped, policy, target, component),
        options=best.options,
        rejected=tuple(rejected),
        precision=best.variant.precision.value,
        memory_bytes=need,
        memory_pool=best.pool,
        measured_ms=best.measured_ms,
    )


def _no_runnable(
    component: str, candidates: list[_Candidate], dropped: list[_Candidate], policy: Policy
) -> Exception:
    requirements = policy.requirements_for(component)

    def describe(cands: list[_Candidate]) -> list[str]:
        return list(dict.fromkeys(f"{vid}: {why}" for vid, why in (c.rejection() for c in cands)))

    if not requirements:
        details = "; ".join(describe(dropped)) or "the artifact has no variants for it"
        return BackendUnavailableError(f"no runnable variant for {component}: {details}")
    wanted = " and ".join(f"--require {c}" for c in requirements)
    relevant = describe([c for c in dropped if "excluded by --require" not in c.why])
    if not relevant:
        have = ", ".join(dict.fromkeys(c.variant.id for c in candidates)) or "none"
        details = f"the artifact has no {component} variant that matches (it has {have})"
    else:
        details = "; ".join(relevant)
    return InvalidRequestError(f"no runnable variant for {component} meets {wanted}: {details}")


def _reason(
    best: _Candidate,
    runnable: list[_Candidate],
    dropped: list[_Candidate],
    policy: Policy,
    target: TargetProfile,
    component: str,
) -> str:
    parts: list[str] = []
    requirements = policy.requirements_for(component)
    if requirements:
        parts.append("meets " + " and ".join(f"--require {c}" for c in requirements))
        drift = drift_problem(best.variant, policy.drift_budget)
        if drift:
            parts.append(f"drift {drift} accepted: required by name")
    static = _static_position(best, target)
    if best.preferred is not None:
        parts.append(f"preferred by {policy.prefer_origin} (--prefer {best.preferred})")
    elif best.measured_ms is not None:
        rivals = [c for c in runnable if c is not best and c.measured_ms is not None]
        text = f"fastest measured on this hardware ({best.measured_ms:.1f} ms median"
        if rivals:
            rival = min(rivals, key=lambda c: c.measured_ms or 0.0)
            text += f"; next {rival.variant.id} {rival.measured_ms:.1f} ms"
        text += ")"
        unmeasured = [c for c in runnable if c.measured_ms is None]
        if any(c.rank < best.rank for c in runnable if c is not best):
            text += f", over {target.name}'s order"
        if unmeasured:
            text += f"; {len(unmeasured)} runnable not measured"
        parts.append(text)
    elif policy.objective is Objective.MEMORY:
        parts.append(f"smallest runnable variant ({_gib(best.variant.size_bytes)}), {static}")
    else:
        parts.append(static if best.rank >= len(target.order) else f"first runnable in {static}")
    if best.preferred is None and best.measured_ms is None:
        skipped = sorted((c for c in dropped if c.rank < best.rank), key=lambda c: c.rank)
        skipped = [c for c in skipped if "excluded by --require" not in c.why]
        if skipped:
            first = skipped[0]
            more = f" (+{len(skipped) - 1} more)" if len(skipped) > 1 else ""
            parts.append(f"skipped {first.label}: {first.why}{more}")
    return "; ".join(parts)


def _static_position(cand: _Candidate, target: TargetProfile) -> str:
    if cand.rank >= len(target.order):
        return f"not in {target.name}'s order, on {cand.device}"
    return f"{target.name}'s order (#{cand.rank + 1} {cand.entry})"
