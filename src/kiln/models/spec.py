"""Component specs: the one description of a component that every exporter and runtime reads.

A `ComponentSpec` names a component's inputs and outputs (dtype and symbolic shape), the
range of every dynamic axis (min/opt/max, which TensorRT profiles and OpenVINO reshapes
read), how to build sample inputs, and the parity budget per precision. Nothing else in
kiln restates shapes or tensor names.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Precision(str, enum.Enum):
    """Numeric precision of a variant's weights (and, for int8 static, its activations)."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"
    INT8 = "int8"
    # 8-bit floats (E4M3) in explicitly quantized TensorRT engines; GPUs of compute
    # capability 8.9 and newer.
    FP8 = "fp8"
    INT4 = "int4"
    NF4 = "nf4"


class DType(str, enum.Enum):
    """Element type of a component input or output, as the exported graph sees it."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    INT64 = "int64"
    INT32 = "int32"
    BOOL = "bool"

    @property
    def numpy(self) -> str:
        return self.value

    def torch(self) -> torch.dtype:
        import torch

        return getattr(torch, self.value)


@dataclass(frozen=True)
class Dim:
    """A dynamic axis shared by name across a component's inputs.

    `multiple_of` constrains the sizes a runtime may be given (latent sides must be even
    for a UNet with two down-samplings, for instance). `opt` is the size exports trace at.
    `min` may be 0 for an axis that can be empty (a decoder's past length on its first step);
    `opt` is at least 1.
    """

    name: str
    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.min <= self.opt <= self.max and self.opt >= 1):
            raise ValueError(
                f"dim {self.name}: need 0 <= min <= opt <= max and opt >= 1, got {self}"
            )
        if any(v % self.multiple_of for v in (self.min, self.opt, self.max)):
            raise ValueError(
                f"dim {self.name}: min/opt/max must be multiples of {self.multiple_of}"
            )

    def export_size(self) -> int:
        """The size to trace at: `opt`, but never 1, which exporters specialize as static."""
        if self.opt >= 2 or self.max < 2:
            return self.opt
        return next(s for s in range(2, self.max + 1) if s % self.multiple_of == 0)

    def alternative(self) -> int:
        """A valid size other than the traced one, to check parity away from that shape."""
        traced, step = self.export_size(), self.multiple_of
        # About half the traced size first: cheap to run for full-size models, still long
        # enough for attention to mean something, and 1 for a batch axis traced at 2.
        half = max(self.min, -(-traced // 2 // step) * step)
        for candidate in (half, traced - step, traced + step, self.max):
            if self.min <= candidate <= self.max and candidate != traced:
                return candidate
        return traced

    def accepts(self, size: int) -> bool:
        return self.min <= size <= self.max and size % self.multiple_of == 0


# A shape entry is a fixed size, a dynamic input axis, or (outputs only) a symbolic name
# whose size follows from the inputs, e.g. "image_height" = 8 * latent height.
ShapeEntry = int | Dim | str


@dataclass(frozen=True)
class TensorSpec:
    """One input or output tensor of a component."""

    name: str
    dtype: DType
    shape: tuple[ShapeEntry, ...]
    # Integer inputs (token ids) are sampled from [low, high); floats from a normal.
    value_range: tuple[int, int] | None = None

    def dims(self) -> tuple[Dim, ...]:
        return tuple(entry for entry in self.shape if isinstance(entry, Dim))

    def dynamic_axes(self) -> dict[int, str]:
        """Axis index -> symbolic name, for every axis that is not a fixed size."""
        return {
            index: entry.name if isinstance(entry, Dim) else entry
            for index, entry in enumerate(self.shape)
            if not isinstance(entry, int)
        }

    def concrete_shape(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        out = []
        for entry in self.shape:
            if isinstance(entry, int):
                out.append(entry)
            elif isinstance(entry, Dim):
                out.append(sizes[entry.name])
            else:
                raise ValueError(f"{self.name}: output-only symbol {entry!r} in an input shape")
        return tuple(out)


@dataclass(frozen=True)
class Tolerance:
    """Parity budget: every element must satisfy |ours - ref| <= atol + rtol * max|ref|."""

    atol: float
    rtol: float = 0.0

    def limit(self, reference_max_abs: float) -> float:
        return self.atol + self.rtol * reference_max_abs


# Budgets for components whose outputs are O(1) to O(10): fp32 exports differ from eager
# PyTorch only by kernel order; reduced precisions get budgets that quantization work
# (and its drift measurements) will refine per component.
DEFAULT_TOLERANCES: Mapping[Precision, Tolerance] = {
    Precision.FP32: Tolerance(atol=1e-4, rtol=1e-4),
    Precision.FP16: Tolerance(atol=1e-2, rtol=1e-2),
    Precision.BF16: Tolerance(atol=5e-2, rtol=5e-2),
    Precision.INT8: Tolerance(atol=1e-1, rtol=1e-1),
    Precision.FP8: Tolerance(atol=1e-1, rtol=1e-1),
    Precision.INT4: Tolerance(atol=2e-1, rtol=2e-1),
    Precision.NF4: Tolerance(atol=2e-1, rtol=2e-1),
}


@dataclass(frozen=True)
class ComponentSpec:
    """Everything kiln needs to know about one exportable component of a model."""

    name: str
    family: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerances: Mapping[Precision, Tolerance] = field(default_factory=lambda: DEFAULT_TOLERANCES)
    description: str = ""
    # Which graph-fusion recipe fits (onnxruntime's model types: "clip", "unet", "vae", ...).
    graph_kind: str = ""
    # Exported only when asked for (`kiln export --with-attentions`) and opened only when a
    # call needs it: an extra graph most users never run.
    optional: bool = False

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def dims(self) -> dict[str, Dim]:
        """Every dynamic input axis by name (shared names must agree)."""
        found: dict[str, Dim] = {}
        for tensor in self.inputs:
            for dim in tensor.dims():
                if found.setdefault(dim.name, dim) != dim:
                    raise ValueError(f"{self.name}: dim {dim.name} declared twice differently")
        return found

    def opt_sizes(self) -> dict[str, int]:
        return {name: dim.opt for name, dim in self.dims().items()}

    def export_sizes(self) -> dict[str, int]:
        return {name: dim.export_size() for name, dim in self.dims().items()}

    def parity_sizes(self) -> dict[str, int]:
        """Sizes different from the traced ones on every axis that has room to differ."""
        return {name: dim.alternative() for name, dim in self.dims().items()}

    def tolerance(self, precision: Precision) -> Tolerance:
        return self.tolerances.get(precision, DEFAULT_TOLERANCES[precision])

    def sample_inputs(
        self, sizes: Mapping[str, int] | None = None, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the given sizes (default: opt), deterministic for a seed."""
        import torch

        sizes = {**self.opt_sizes(), **(sizes or {})}
        generator = torch.Generator("cpu").manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            shape = spec.concrete_shape(sizes)
            if spec.dtype in (DType.INT64, DType.INT32):
                low, high = spec.value_range or (0, 2)
                tensor = torch.randint(low, high, shape, generator=generator, dtype=torch.int64)
                tensors[spec.name] = tensor.to(spec.dtype.torch())
            elif spec.value_range is not None:
                low, high = spec.value_range
                tensor = torch.rand(shape, generator=generator) * (high - low) + low
                tensors[spec.name] = tensor.to(spec.dtype.torch())
            else:
                tensors[spec.name] = torch.randn(shape, generator=generator).to(spec.dtype.torch())
        return tensors

    def check_sizes(self, inputs: Mapping[str, tuple[int, ...]]) -> str | None:
        """Return why a set of input shapes is outside this spec's ranges, or None."""
        seen: dict[str, int] = {}
        for spec in self.inputs:
            shape = inputs.get(spec.name)
            if shape is None:
                return f"missing input {spec.name}"
            if len(shape) != len(spec.shape):
                return f"{spec.name}: expected rank {len(spec.shape)}, got {len(shape)}"
            for entry, size in zip(spec.shape, shape, strict=True):
                if isinstance(entry, int) and entry != size:
                    return f"{spec.name}: expected size {entry}, got {size}"
                if isinstance(entry, Dim):
                    if not entry.accepts(size):
                        return (
                            f"{spec.name}: {entry.name}={size} outside [{entry.min}, {entry.max}]"
                            f" (multiple of {entry.multiple_of})"
                        )
                    if seen.setdefault(entry.name, size) != size:
                        return f"{entry.name} differs between inputs"
        return None

    def to_dict(self) -> dict:
        """JSON form, recorded in manifests so an artifact documents its own I/O."""

        def entry(e: ShapeEntry) -> object:
            if isinstance(e, Dim):
                return {
                    "name": e.name,
                    "min": e.min,
                    "opt": e.opt,
                    "max": e.max,
                    "multiple_of": e.multiple_of,
                }
            return e

        def tensor(t: TensorSpec) -> dict:
            data = {"name": t.name, "dtype": t.dtype.value, "shape": [entry(e) for e in t.shape]}
            if t.value_range is not None:
                data["value_range"] = list(t.value_range)
            return data

        return {
            "name": self.name,
            "family": self.family,
            "graph_kind": self.graph_kind,
            "optional": self.optional,
            "inputs": [tensor(t) for t in self.inputs],
            "outputs": [tensor(t) for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> ComponentSpec:
        """Rebuild a spec from a manifest (budgets are the defaults; measured parity is kept
        in the manifest's variants)."""

        def entry(e: object) -> ShapeEntry:
            return Dim(**e) if isinstance(e, Mapping) else e  # type: ignore[arg-type]

        def tensor(t: Mapping) -> TensorSpec:
            value_range = t.get("value_range")
            return TensorSpec(
                t["name"],
                DType(t["dtype"]),
                tuple(entry(e) for e in t["shape"]),
                tuple(value_range) if value_range else None,
            )

        return cls(
            name=data["name"],
            family=data["family"],
            inputs=tuple(tensor(t) for t in data["inputs"]),
            outputs=tuple(tensor(t) for t in data["outputs"]),
            graph_kind=data.get("graph_kind", ""),
            optional=data.get("optional", False),
        )
