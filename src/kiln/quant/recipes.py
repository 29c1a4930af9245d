"""What each (target, precision) cell of the quantization matrix does, and its parameters.

A `QuantRecipe` is the full, recorded description of how one variant was quantized; a
`Cell` says which methods a backend offers for a precision, which library does the work,
and what hardware the result needs. Cells that cannot run on this machine are refused with
their reason (and listed by `kiln doctor`), never attempted.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from kiln.errors import InvalidRequestError
from kiln.models.spec import ComponentSpec, Precision

if TYPE_CHECKING:
    from kiln.profiles.hardware import HardwareProfile


class QuantMethod(str, enum.Enum):
    """How weights (and maybe activations) are reduced."""

    CAST = "cast"  # fp16 / bf16: every float weight converted, sensitive ops kept fp32
    WEIGHT_ONLY = "weight-only"  # weights stored at low precision, activations stay float
    DYNAMIC = "dynamic"  # int8 weights, activations quantized per call at run time
    STATIC = "static"  # int8 weights and calibrated activations everywhere
    HYBRID = "hybrid"  # int8 weights everywhere, calibrated activations where they pay


CALIBRATED_METHODS = frozenset({QuantMethod.STATIC, QuantMethod.HYBRID})


class Requirement(str, enum.Enum):
    """What the machine running a cell must have, beyond the target's own runtime."""

    NONE = "none"
    CUDA = "cuda"


@dataclass(frozen=True)
class Cell:
    """One (target, precision) square of the matrix: its methods (first is the default)."""

    target: str
    precision: Precision
    methods: tuple[QuantMethod, ...]
    library: str
    requires: Requirement = Requirement.NONE
    note: str = ""

    @property
    def key(self) -> str:
        return f"{self.target}:{self.precision.value}"


P = Precision
M = QuantMethod
MATRIX: tuple[Cell, ...] = (
    Cell("onnx", P.FP16, (M.CAST,), "onnxruntime.transformers.float16 (fp32 inputs/outputs kept)"),
    Cell(
        "onnx",
        P.BF16,
        (M.CAST,),
        "onnxruntime CUDA EP",
        Requirement.CUDA,
        "onnxruntime's CPU provider has no bf16 kernels for MatMul/Conv",
    ),
    Cell(
        "onnx",
        P.INT8,
        (M.DYNAMIC, M.WEIGHT_ONLY, M.STATIC),
        "onnxruntime.quantization (dynamic QUInt8, MatMulNBits 8-bit, static QDQ)",
    ),
    Cell("onnx", P.INT4, (M.WEIGHT_ONLY,), "onnxruntime.quantization MatMulNBits"),
    Cell("onnx", P.NF4, (M.WEIGHT_ONLY,), "onnxruntime.quantization MatMulBnb4"),
    Cell("openvino", P.FP16, (M.CAST,), "openvino.save_model(compress_to_fp16) + f16 hint"),
    Cell("openvino", P.BF16, (M.CAST,), "fp16-stored weights + bf16 inference hint"),
    Cell(
        "openvino",
        P.INT8,
        (M.WEIGHT_ONLY, M.HYBRID, M.STATIC),
        "nncf.compress_weights INT8 / nncf.quantize",
    ),
    Cell("openvino", P.INT4, (M.WEIGHT_ONLY,), "nncf.compress_weights INT4_SYM/ASYM"),
    Cell("openvino", P.NF4, (M.WEIGHT_ONLY,), "nncf.compress_weights NF4"),
    Cell("torch", P.FP16, (M.CAST,), "torch dtype cast"),
    Cell("torch", P.BF16, (M.CAST,), "torch dtype cast"),
    Cell("torch", P.INT8, (M.WEIGHT_ONLY, M.DYNAMIC), "torchao Int8WeightOnly / Int8Dynamic"),
    Cell("torch", P.INT4, (M.WEIGHT_ONLY,), "torchao int4 weight-only (CPU path)"),
    Cell("torch", P.NF4, (M.WEIGHT_ONLY,), "bitsandbytes Linear4bit (nf4)"),
    # TensorRT engines are built at their precision by `kiln export --target tensorrt
    # --precision P` (kiln.exporters.tensorrt): strongly typed graphs, so fp16/bf16 are cast
    # graphs and int8/fp8 explicit Q/DQ from kiln's calibration data.
    Cell(
        "tensorrt",
        P.FP16,
        (M.CAST,),
        "fp16 graph -> TensorRT engine (kiln export --target tensorrt)",
        Requirement.CUDA,
        "TensorRT engines build and run on NVIDIA GPUs only",
    ),
    Cell(
        "tensorrt",
        P.BF16,
        (M.CAST,),
        "bf16 graph -> TensorRT engine (kiln export --target tensorrt)",
        Requirement.CUDA,
        "TensorRT engines build and run on NVIDIA GPUs only",
    ),
    Cell(
        "tensorrt",
        P.INT8,
        (M.STATIC,),
        "int8 Q/DQ (onnxruntime.quantization) -> TensorRT engine (kiln export --target tensorrt)",
        Requirement.CUDA,
        "TensorRT engines build and run on NVIDIA GPUs only",
    ),
    Cell(
        "tensorrt",
        P.FP8,
        (M.STATIC,),
        "fp8 Q/DQ (onnxruntime.quantization) -> TensorRT engine (kiln export --target tensorrt)",
        Requirement.CUDA,
        "TensorRT engines build and run on NVIDIA GPUs of compute capability 8.9+ only",
    ),
)
del P, M

#: Block / group size for 4-bit methods when the user gives none.
DEFAULT_GROUP_SIZE = 64


def cell(target: str, precision: Precision) -> Cell:
    """The matrix cell, or a one-line refusal naming what exists."""
    for candidate in MATRIX:
        if candidate.target == target and candidate.precision is precision:
            return candidate
    offered = ", ".join(c.precision.value for c in MATRIX if c.target == target)
    if not offered:
        targets = sorted({c.target for c in MATRIX})
        raise InvalidRequestError(f"no quantization for target {target!r}; targets: {targets}")
    raise InvalidRequestError(
        f"{target} has no {precision.value} quantization; it offers {offered}"
    )


def cell_problem(cell: Cell, profile: HardwareProfile) -> str:
    """Why `cell` cannot run on `profile` ("" when it can): missing hardware or library."""
    if cell.requires is Requirement.CUDA and not profile.has_cuda:
        reason = f"; {cell.note}" if cell.note else ""
        return f"needs an NVIDIA GPU with CUDA, which this machine lacks{reason}"
    import importlib.util

    from kiln.profiles.hardware import install_hint

    for package in packages_for(cell):
        if importlib.util.find_spec(package) is None:
            return f"needs {package}, which is not installed: {install_hint(package)}"
    return ""


def packages_for(cell: Cell) -> tuple[str, ...]:
    """Python packages a cell's quantizer and runtime import."""
    if cell.target == "onnx":
        return ("onnxruntime",)
    if cell.target == "openvino":
        return ("openvino",) if cell.methods == (QuantMethod.CAST,) else ("openvino", "nncf")
    if cell.target == "torch" and cell.precision in (Precision.INT8, Precision.INT4):
        return ("torchao",)
    if cell.target == "torch" and cell.precision is Precision.NF4:
        return ("bitsandbytes",)
    if cell.target == "tensorrt":
        return ("tensorrt", "onnxruntime")
    return ()


def matrix_status(profile: HardwareProfile) -> list[dict[str, str]]:
    """Every cell with its methods, library and whether it runs here (for `kiln doctor`)."""
    return [
        {
            "cell": c.key,
            "methods": ", ".join(m.value for m in c.methods),
            "library": c.library,
            "status": cell_problem(c, profile) or "runs here",
        }
        for c in MATRIX
    ]


@dataclass(frozen=True)
class QuantRecipe:
    """Everything that decides a quantized variant's numbers; recorded in its manifest entry.

    `group_size` is the 4-bit block (MatMulNBits block, NNCF group); `ratio` is NNCF's share
    of layers at 4 bit (the rest at int8); `symmetric` picks INT4_SYM over INT4_ASYM and
    symmetric int8 activations.
    """

    target: str
    precision: Precision
    method: QuantMethod
    group_size: int | None = None
    symmetric: bool = True
    ratio: float = 1.0

    @property
    def needs_calibration(self) -> bool:
        return self.method in CALIBRATED_METHODS

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "precision": self.precision.value,
            "method": self.method.value,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "ratio": self.ratio,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantRecipe:
        return cls(
            target=data["target"],
            precision=Precision(data["precision"]),
            method=QuantMethod(data["method"]),
            group_size=data.get("group_size"),
            symmetric=data.get("symmetric", True),
            ratio=data.get("ratio", 1.0),
        )


def default_method(target: str, precision: Precision, spec: ComponentSpec) -> QuantMethod:
    """The method a cell uses for `spec` when the user names none.

    The UNet is compute-bound, so on OpenVINO its int8 variant quantizes activations too
    (hybrid); everything else keeps the cell's first method.
    """
    chosen = cell(target, precision)
    if target == "openvino" and precision is Precision.INT8 and spec.graph_kind == "unet":
        return QuantMethod.HYBRID
    return chosen.methods[0]


def variant_tag(recipe: QuantRecipe, spec: ComponentSpec) -> str | None:
    """The tag of the variant a recipe makes: its method, unless that is the cell's default.

    So a second method of one target and precision sits beside the first, not over it.
    """
    if recipe.method is default_method(recipe.target, recipe.precision, spec):
        return None
    return recipe.method.value


def recipe_for(
    target: str,
    precision: Precision,
    spec: ComponentSpec,
    *,
    method: QuantMethod | str | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    ratio: float | None = None,
) -> QuantRecipe:
    """A checked recipe for one component; user overrides win over the cell defaults."""
    chosen = cell(target, precision)
    picked = QuantMethod(method) if method is not None else default_method(target, precision, spec)
    if picked not in chosen.methods:
        offered = ", ".join(m.value for m in chosen.methods)
        raise InvalidRequestError(
            f"{chosen.key} has no method {picked.value!r}; it offers {offered}"
        )
    # Calibrated activations after SiLU/softmax are one-sided: asymmetric ranges fit them
    # (optimum-intel's MIXED preset); weights stay symmetric per channel in every backend.
    recipe = QuantRecipe(target, precision, picked, symmetric=picked not in CALIBRATED_METHODS)
    if precision in (Precision.INT4, Precision.NF4):
        recipe = replace(recipe, group_size=group_size or DEFAULT_GROUP_SIZE)
        if recipe.group_size < 16 or recipe.group_size & (recipe.group_size - 1):
            raise InvalidRequestError(
                f"group size {recipe.group_size} must be a power of two, at least 16"
            )
    if symmetric is not None:
        recipe = replace(recipe, symmetric=symmetric)
    if ratio is not None:
        if not 0.0 < ratio <= 1.0:
            raise InvalidRequestError(f"ratio {ratio} must be in (0, 1]")
        recipe = replace(recipe, ratio=ratio)
    return recipe
