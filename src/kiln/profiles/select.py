"""Selection: a pure function from (manifest, hardware profile, policy) to a `Plan`.

For every component it drops the variants that cannot run here, each with the reason,
then ranks the rest: measured results for this hardware fingerprint first (written by
`kiln bench --record`), else the static preference order. Every choice keeps its reason,
so `deployment.plan` can say why it runs what it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from kiln.artifacts import Manifest, Variant
from kiln.errors import BackendUnavailableError, InvalidRequestError
from kiln.models.spec import Precision
from kiln.profiles.hardware import HardwareProfile

# Which runtime runs which artifact target.
RUNTIME_OF_TARGET = {
    "onnx": "onnxruntime",
    "openvino": "openvino",
    "tensorrt": "tensorrt",
    "torch": "torch",
}
DEFAULT_TARGET_ORDER = ("tensorrt", "openvino", "onnx", "torch")
DEFAULT_PRECISION_ORDER = (
    Precision.FP32,
    Precision.BF16,
    Precision.FP16,
    Precision.INT8,
    Precision.INT4,
    Precision.NF4,
)


@dataclass(frozen=True)
class Constraint:
    """`runtime:precision`, either part optional, optionally for one component only.

    Parsed from strings such as `onnx:fp32`, `openvino`, `:int8`, `unet=openvino:int8`.
    """

    component: str | None = None
    target: str | None = None
    precision: Precision | None = None

    @classmethod
    def parse(cls, text: str) -> Constraint:
        component, _, rest = text.rpartition("=")
        target, _, precision = rest.partition(":")
        target = {"onnxruntime": "onnx", "ort": "onnx", "ov": "openvino", "trt": "tensorrt"}.get(
            target, target
        )
        if target and target not in RUNTIME_OF_TARGET:
            raise InvalidRequestError(
                f"unknown runtime {target!r} in {text!r}; use one of {', '.join(RUNTIME_OF_TARGET)}"
            )
        try:
            parsed = Precision(precision) if precision else None
        except ValueError:
            choices = ", ".join(p.value for p in Precision)
            raise InvalidRequestError(
                f"unknown precision {precision!r} in {text!r}; use one of {choices}"
            ) from None
        return cls(component or None, target or None, parsed)

    def applies_to(self, component: str) -> bool:
        return self.component is None or self.component == component

    def matches(self, variant: Variant) -> bool:
        return (self.target is None or variant.target == self.target) and (
            self.precision is None or variant.precision == self.precision
        )

    def __str__(self) -> str:
        text = f"{self.target or ''}:{self.precision.value if self.precision else ''}".strip(":")
        return f"{self.component}={text}" if self.component else text


@dataclass(frozen=True)
class Policy:
    objective: str = "latency"  # or "memory"
    prefer: tuple[Constraint, ...] = ()
    require: tuple[Constraint, ...] = ()
    allow_failed_parity: bool = False

    @classmethod
    def from_strings(
        cls, prefer: Sequence[str] = (), require: Sequence[str] = (), **kwargs
    ) -> Policy:
        return cls(
            prefer=tuple(Constraint.parse(p) for p in prefer),
            require=tuple(Constraint.parse(r) for r in require),
            **kwargs,
        )


@dataclass(frozen=True)
class Choice:
    component: str
    variant_id: str
    runtime: str
    device: str
    reason: str
    options: Mapping[str, object] = field(default_factory=dict)
    rejected: tuple[tuple[str, str], ...] = ()  # (variant id, why it was not chosen)


@dataclass(frozen=True)
class Plan:
    choices: tuple[Choice, ...]

    def __getitem__(self, component: str) -> Choice:
        for choice in self.choices:
            if choice.component == component:
                return choice
        raise KeyError(component)

    def __contains__(self, component: object) -> bool:
        return any(c.component == component for c in self.choices)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        return [(c.component, c.variant_id, c.runtime, c.device, c.reason) for c in self.choices]

    def __str__(self) -> str:
        return "\n".join(f"{c}: {v} on {r}/{d} ({why})" for c, v, r, d, why in self.rows())


def select(manifest: Manifest, profile: HardwareProfile, policy: Policy = Policy()) -> Plan:
    """Pick one variant per component, or raise naming the component that cannot run."""
    components = list(dict.fromkeys(v.component for v in manifest.variants))
    return Plan(tuple(_choose(manifest, component, profile, policy) for component in components))


def _choose(manifest: Manifest, component: str, profile: HardwareProfile, policy: Policy) -> Choice:
    rejected: list[tuple[str, str]] = []
    runnable: list[Variant] = []
    for variant in manifest.variants_of(component):
        why = _why_not_runnable(variant, profile, policy, component)
        if why:
            rejected.append((variant.id, why))
        else:
            runnable.append(variant)
    if not runnable:
        details = "; ".join(f"{vid}: {why}" for vid, why in rejected) or "no variants"
        error = InvalidRequestError if policy.require else BackendUnavailableError
        raise error(f"no runnable variant for {component}: {details}")
    measured = manifest.measurements.get(profile.fingerprint, {})
    ranked = sorted(runnable, key=lambda v: _rank(v, component, measured, policy))
    best = ranked[0]
    rejected += [(v.id, "ranked lower") for v in ranked[1:]]
    return Choice(
        component=component,
        variant_id=best.id,
        runtime=RUNTIME_OF_TARGET[best.target],
        device="cpu",
        reason=_reason(best, component, measured, policy),
        rejected=tuple(rejected),
    )


def _why_not_runnable(
    variant: Variant, profile: HardwareProfile, policy: Policy, component: str
) -> str | None:
    runtime = RUNTIME_OF_TARGET.get(variant.target)
    if runtime is None:
        return f"unknown target {variant.target}"
    for constraint in policy.require:
        if constraint.applies_to(component) and not constraint.matches(variant):
            return f"excluded by --require {constraint}"
    if not profile.has_runtime(runtime):
        return f"{runtime} is not installed"
    if variant.parity is not None and not variant.parity.passed and not policy.allow_failed_parity:
        return "failed its parity check at export"
    return None


def _rank(variant: Variant, component: str, measured: Mapping, policy: Policy) -> tuple:
    preferred = any(c.applies_to(component) and c.matches(variant) for c in policy.prefer)
    latency = measured.get(variant.id, {}).get("median_ms")
    memory = variant.size_bytes if policy.objective == "memory" else 0
    return (
        not preferred,
        latency is None,
        latency or 0.0,
        memory,
        DEFAULT_TARGET_ORDER.index(variant.target)
        if variant.target in DEFAULT_TARGET_ORDER
        else 99,
        DEFAULT_PRECISION_ORDER.index(variant.precision),
    )


def _reason(variant: Variant, component: str, measured: Mapping, policy: Policy) -> str:
    if any(c.applies_to(component) and c.matches(variant) for c in policy.prefer):
        return "preferred by the caller"
    latency = measured.get(variant.id, {}).get("median_ms")
    if latency is not None:
        return f"fastest measured on this hardware ({latency:.1f} ms median)"
    if policy.objective == "memory":
        return "smallest runnable variant"
    return f"first runnable in the default order ({' > '.join(DEFAULT_TARGET_ORDER)}, fp32 first)"
