"""ONNX backend: quantize one exported fp32 graph with onnxruntime's own tools.

Each (precision, method) cell is one function below; all of them read `source/entry` and
write `out/model.onnx` plus a single external data file `out/model.onnx.data` holding every
tensor of 1 KiB or more. That is the layout the fp32 exports already have, it is safe past
protobuf's 2 GB limit at every model size, and it is two files to hash whatever the size.

Memory: the SD 1.5 UNet is 3.3 GB at fp32, so no step holds more than about two copies of
the weights. Weight-only and fp16 work on one in-memory copy (plus the tensors they
create); onnxruntime's dynamic and static quantizers take a file, so they get a cleaned
copy written to `out/.work` (removed on success; on failure the caller discards all of
`out`). The dynamic quantizer's own reload of the model is replaced by in-place type
inference (`_types_inferred_in_place`), and static calibration runs before the quantizer
loads the model (the ranges travel through onnxruntime's calibration cache file).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import ExportError, InvalidRequestError, KilnError, first_line
from kiln.models.spec import ComponentSpec, Precision
from kiln.quant.base import Feeds, QuantizedGraph, StepCallback
from kiln.quant.recipes import DEFAULT_GROUP_SIZE, QuantMethod, QuantRecipe

if TYPE_CHECKING:
    import onnx

MODEL_FILE = "model.onnx"
DATA_FILE = MODEL_FILE + ".data"
# Tensors below this size stay inside model.onnx (shape constants and the like).
EXTERNAL_THRESHOLD = 1024
WORK_FOLDER = ".work"

#: Block size of weight-only int8 when the recipe gives none: one fp32 scale per 128
#: weights costs 1/4 bit per weight, which keeps int8 files near 26% of fp32.
INT8_BLOCK_SIZE = 128

# Op types kept at fp32 in the fp16 cell. Each either sums many squares or exponentials
# (LayerNorm / InstanceNorm / GroupNorm variances, Softmax, Reduce*, whose intermediates
# pass 65504 once activations reach a few hundred, as they do in SD UNets and VAEs) or
# produces values that overflow or lose all precision in fp16 (Pow, Exp, Sqrt of those
# sums). Only the ones the graph contains are passed on, and recorded.
FP16_UNSAFE_OPS = frozenset(
    {
        "LayerNormalization",
        "InstanceNormalization",
        "GroupNormalization",
        "SimplifiedLayerNormalization",
        "SkipLayerNormalization",
        "GroupNorm",
        "Softmax",
        "LogSoftmax",
        "ReduceMean",
        "ReduceSum",
        "ReduceSumSquare",
        "ReduceL2",
        "ReduceLogSumExp",
        "Pow",
        "Exp",
        "Sqrt",
    }
)
# Sin/Cos arguments (a UNet's timestep times its frequencies, up to 1000 rad) need fp32:
# fp16 spacing near 1000 is 0.5 rad, which scrambles the embedding. Every node feeding a
# Sin or Cos stays fp32, as diffusers itself computes the timestep embedding in fp32.
_TRIGONOMETRIC = frozenset({"Sin", "Cos"})

# Ops that carry a weight, by the input index that holds it, and the layer type reported.
_WEIGHT_INPUT: Mapping[str, tuple[str, int]] = {
    "MatMul": ("MatMul", 1),
    "FusedMatMul": ("MatMul", 1),
    "MatMulInteger": ("MatMul", 1),
    "DynamicQuantizeMatMul": ("MatMul", 1),
    "MatMulIntegerToFloat": ("MatMul", 1),
    "QLinearMatMul": ("MatMul", 3),
    "Gemm": ("Gemm", 1),
    "QGemm": ("Gemm", 3),
    "Conv": ("Conv", 1),
    "ConvInteger": ("Conv", 1),
    "QLinearConv": ("Conv", 3),
    "ConvTranspose": ("ConvTranspose", 1),
    "Gather": ("Gather", 0),
}
# Ops through which a weight passes unchanged in precision on its way to the layer.
_PASS_THROUGH = frozenset(
    {"Cast", "DequantizeLinear", "Identity", "Reshape", "Squeeze", "Transpose", "Unsqueeze"}
)

_CellFunction = Callable[
    [Path, ComponentSpec, QuantRecipe, Sequence[Feeds], Path, StepCallback], dict
]


def quantize_onnx(
    source: Path,
    entry: str,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> QuantizedGraph:
    """Quantize `source/entry` (an fp32 ONNX variant) into the empty folder `out`."""
    cell = _cell(recipe)
    if recipe.needs_calibration and not calibration:
        raise InvalidRequestError(
            f"{spec.name}: onnx int8 {recipe.method.value} quantization needs calibration "
            "inputs and none were given"
        )
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _quiet():
            details = cell(source / entry, spec, recipe, calibration, out, progress)
            shutil.rmtree(out / WORK_FOLDER, ignore_errors=True)
            progress("counting quantized layers")
            layers = count_layers(_load_graph(out / MODEL_FILE))
    except KilnError:
        raise
    except Exception as exc:  # onnx / onnxruntime.quantization raise anything from asserts up
        message = first_line(exc)
        raise ExportError(
            f"onnxruntime could not quantize {spec.name} to {recipe.precision.value} "
            f"({recipe.method.value}): {message}"
        ) from exc
    kept = {op: by["fp32"] for op, by in layers.items() if by.get("fp32")}
    details = {**_versions(), **details, "kept_fp32": kept, "files": _layout()}
    return QuantizedGraph(entry=MODEL_FILE, layers=layers, details=details)


def _cell(recipe: QuantRecipe) -> _CellFunction:
    if recipe.target != "onnx":
        raise InvalidRequestError(f"the onnx backend cannot quantize {recipe.target} variants")
    cells: dict[tuple[Precision, QuantMethod], _CellFunction] = {
        (Precision.FP16, QuantMethod.CAST): _fp16_cast,
        (Precision.INT8, QuantMethod.DYNAMIC): _int8_dynamic,
        (Precision.INT8, QuantMethod.WEIGHT_ONLY): _int8_weight_only,
        (Precision.INT8, QuantMethod.STATIC): _int8_static,
        (Precision.INT4, QuantMethod.WEIGHT_ONLY): _int4_weight_only,
        (Precision.NF4, QuantMethod.WEIGHT_ONLY): _nf4_weight_only,
    }
    key = (recipe.precision, recipe.method)
    if key not in cells:
        offered = ", ".join(f"{p.value}/{m.value}" for p, m in cells)
        raise InvalidRequestError(
            f"the onnx backend has no {recipe.precision.value}/{recipe.method.value} "
            f"quantization; it offers {offered}"
        )
    return cells[key]


# --- fp16 ---------------------------------------------------------------------------------


def _fp16_cast(
    path: Path,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> dict:
    import onnx
    from onnx.external_data_helper import load_external_data_for_model
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    progress("inferring tensor types")
    # The converter needs every tensor's type. Inference runs on the graph without its
    # weights (small, so in memory even for the UNet), after dropping the exporter's
    # value_info, which onnx's inference can disagree with on dynamo graphs.
    model = _load_graph(path)
    model.graph.ClearField("value_info")
    _name_nodes(model.graph)  # nodes are blocked by name
    model = onnx.shape_inference.infer_shapes(model)
    present = {node.op_type for node in model.graph.node}
    blocked_ops = sorted(present & (FP16_UNSAFE_OPS | set(DEFAULT_OP_BLOCK_LIST)))
    blocked_nodes = _feeding_trigonometry(model.graph)
    progress("loading weights")
    load_external_data_for_model(model, str(path.parent))
    progress("converting weights to fp16")
    model = convert_float_to_float16(
        model,
        keep_io_types=True,  # the runtime adapters feed and read float32
        disable_shape_infer=True,
        op_block_list=blocked_ops,
        node_block_list=sorted(blocked_nodes),
    )
    _drop_repeated_casts(model.graph)
    _topological_sort(model)
    progress("saving")
    _save(model, out)
    return {
        "library": "onnxruntime.transformers.float16.convert_float_to_float16",
        "keep_io_types": True,
        "fp32_op_types": blocked_ops,
        "fp32_nodes": sorted(blocked_nodes),  # the Sin/Cos inputs
    }


def _feeding_trigonometry(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes whose outputs reach a Sin or Cos (and those nodes themselves)."""
    producers = {output: node for node in graph.node for output in node.output}
    pending = [node for node in graph.node if node.op_type in _TRIGONOMETRIC]
    found: set[str] = set()
    while pending:
        node = pending.pop()
        if node.name in found:
            continue
        found.add(node.name)
        pending.extend(producers[name] for name in node.input if name in producers)
    return found


def _drop_repeated_casts(graph: onnx.GraphProto) -> None:
    """The converter inserts one Cast per blocked consumer, so a tensor read by two fp32
    nodes gets two identical Casts defining the same output; keep the first."""
    defined: set[str] = set()
    kept = []
    for node in graph.node:
        if node.op_type == "Cast" and node.output[0] in defined:
            continue
        defined.update(node.output)
        kept.append(node)
    if len(kept) != len(graph.node):
        graph.ClearField("node")
        graph.node.extend(kept)


def _topological_sort(model: onnx.ModelProto) -> None:
    """The converter appends its Casts at the end; ONNX wants producers before users."""
    from onnxruntime.quantization.onnx_model import ONNXModel

    ONNXModel(model).topological_sort()


# --- int8 dynamic and static ----------------------------------------------------------------


def _int8_dynamic(
    path: Path,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    progress("preparing the graph")
    prepared = _write_work_copy(path, out / WORK_FOLDER)
    progress("quantizing weights to int8 (activations quantized at run time)")
    # QUInt8 weights: with QInt8 the u8s8 ConvInteger kernels are slower than fp32 Conv on
    # x86 here, and u8u8 cannot saturate on CPUs without VNNI. onnxruntime rewrites Gemms
    # as MatMuls itself (MatMulInteger has no Gemm form).
    with _types_inferred_in_place():
        quantize_dynamic(
            prepared,
            out / MODEL_FILE,
            per_channel=True,
            reduce_range=False,
            weight_type=QuantType.QUInt8,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
    return {
        "library": "onnxruntime.quantization.quantize_dynamic",
        "weight_type": "QUInt8",
        "activation_type": "QUInt8 (dynamic)",
        "per_channel": True,
        "reduce_range": False,
    }


@contextlib.contextmanager
def _types_inferred_in_place() -> Iterator[None]:
    """Keep the dynamic quantizer to about one copy of the weights.

    `ONNXQuantizer` re-infers tensor types in dynamic mode by deep-copying the model,
    saving it and loading it back (`save_and_reload_model_with_shape_infer`) while
    `quantize_dynamic` still holds the original: three copies of the weights at once, about
    10 GB for the SD 1.5 UNet. The same onnx inference runs here on the graph alone and
    its types are written into the model in place. If onnxruntime renames the helper,
    its own (heavier) path runs unchanged.
    """
    from onnxruntime.quantization import onnx_quantizer

    name = "save_and_reload_model_with_shape_infer"
    original = getattr(onnx_quantizer, name, None)
    if original is None:
        yield
        return
    setattr(onnx_quantizer, name, _infer_types_in_place)
    try:
        yield
    finally:
        setattr(onnx_quantizer, name, original)


def _infer_types_in_place(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(_skeleton(model))
    model.graph.ClearField("value_info")
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with its large initializers reduced to name, type and shape (what type
    inference reads; small ones, such as Reshape targets, keep their values)."""
    import onnx

    skeleton = onnx.ModelProto()
    skeleton.ir_version = model.ir_version
    skeleton.opset_import.extend(model.opset_import)
    skeleton.functions.extend(model.functions)
    graph = skeleton.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    for tensor in model.graph.initializer:
        if tensor.ByteSize() <= EXTERNAL_THRESHOLD:
            graph.initializer.append(tensor)
            continue
        shape_only = graph.initializer.add()
        shape_only.name, shape_only.data_type = tensor.name, tensor.data_type
        shape_only.dims.extend(tensor.dims)
        # Marked external so that nothing reads its (absent) values.
        shape_only.data_location = onnx.TensorProto.EXTERNAL
        shape_only.external_data.add(key="location", value="not-loaded")
    return skeleton


# Layers quantized by the static cell: everything that holds a weight, plus the
# activation-by-activation MatMuls of attention.
_STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Gather")
# 7-bit weights: u8s8 products then cannot saturate the 16-bit intermediate sums of x86
# CPUs without VNNI, so a static variant gives the same numbers on every x86 machine.
STATIC_REDUCE_RANGE = True


def _int8_static(
    path: Path,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    work = out / WORK_FOLDER
    progress("preparing the graph")
    prepared = _write_work_copy(path, work)
    inputs = [i.name for i in _load_graph(prepared).graph.input]
    reader = _CalibrationFeeds(calibration, inputs, progress)
    calibrator = create_calibrator(
        prepared,
        list(_STATIC_OP_TYPES),
        augmented_model_path=str(work / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
    )
    calibrator.collect_data(reader)
    cache = work / "calibration.json"
    save_tensors_data(calibrator.compute_data(), cache)
    del calibrator  # frees its copy of the model and its session before quantizing
    progress("quantizing weights and activations to int8")
    quantize_static(
        prepared,
        out / MODEL_FILE,
        calibration_data_reader=None,
        calibration_cache_path=cache,
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(_STATIC_OP_TYPES),
        per_channel=True,
        reduce_range=STATIC_REDUCE_RANGE,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=True,
        extra_options={"ActivationSymmetric": recipe.symmetric, "WeightSymmetric": True},
    )
    return {
        "library": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "activation_type": "QUInt8",
        "activation_symmetric": recipe.symmetric,
        "weight_type": "QInt8",
        "per_channel": True,
        "reduce_range": STATIC_REDUCE_RANGE,
        "calibration": {"method": "MinMax", "samples": len(calibration)},
        "op_types": list(_STATIC_OP_TYPES),
    }


class _CalibrationFeeds:
    """onnxruntime's CalibrationDataReader over recorded inputs, reporting progress."""

    def __init__(self, feeds: Sequence[Feeds], inputs: Sequence[str], progress: StepCallback):
        self._feeds, self._inputs, self._progress = feeds, set(inputs), progress
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._feeds):
            return None
        feed = self._feeds[self._next]
        self._next += 1
        self._progress(f"calibrating {self._next}/{len(self._feeds)}")
        # Exporters drop unused inputs; the recorded feeds may still name them.
        return {k: np.asarray(v) for k, v in feed.items() if k in self._inputs}

    def __len__(self) -> int:
        return len(self._feeds)


# --- weight-only 8 / 4 bit ------------------------------------------------------------------


def _int8_weight_only(
    path: Path,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> dict:
    return _matmul_nbits(path, recipe, 8, recipe.group_size or INT8_BLOCK_SIZE, out, progress)


def _int4_weight_only(
    path: Path,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> dict:
    return _matmul_nbits(path, recipe, 4, _group_size(recipe), out, progress)


def _group_size(recipe: QuantRecipe) -> int:
    return recipe.group_size or DEFAULT_GROUP_SIZE


def _matmul_nbits(
    path: Path, recipe: QuantRecipe, bits: int, block_size: int, out: Path, progress: StepCallback
) -> dict:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    progress("loading weights")
    model = _load_with_weights(path)
    rewrites = _prepare_weights(model.graph)
    tables = _embedding_gathers(model) if bits == 8 or _int4_tables_allowed(model) else set()
    # onnxruntime's quantizer takes Gathers at 4 bits only; kiln writes the 8-bit
    # GatherBlockQuantized itself (below). Gathers of anything but an embedding table
    # (shape constants) are left alone.
    op_types = ("MatMul", "Gather") if bits == 4 and tables else ("MatMul",)
    keep = [n.name for n in model.graph.node if n.op_type == "Gather" and n.name not in tables]
    progress(f"quantizing MatMul weights to int{bits} (block {block_size})")
    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=block_size,
        is_symmetric=recipe.symmetric,
        nodes_to_exclude=keep,
        op_types_to_quantize=op_types,
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    quantizer.process()
    model = quantizer.model.model
    del quantizer
    if bits == 8 and tables:
        progress("quantizing embedding tables to int8")
        _quantize_gathers_int8(model.graph, tables, block_size, recipe.symmetric)
    _drop_duplicate_initializers(model.graph)
    progress("saving")
    _save(model, out)
    return {
        "library": "onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer",
        "bits": bits,
        "block_size": block_size,
        "symmetric": recipe.symmetric,
        "accuracy_level": None,  # unset: activations stay fp32 inside MatMulNBits
        "embeddings": (
            "GatherBlockQuantized int4 (onnxruntime)"
            if bits == 4
            else "GatherBlockQuantized 8-bit (written by kiln; onnxruntime's quantizer takes "
            "Gathers at 4 bits only)"
        ),
        "embedding_tables": len(tables),
        "conv": _CONV_NOTE,
        **rewrites,
    }


def _nf4_weight_only(
    path: Path,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> dict:
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    block_size = _group_size(recipe)
    progress("loading weights")
    model = _load_with_weights(path)
    rewrites = _prepare_weights(model.graph)
    tables = _embedding_gathers(model) if _int4_tables_allowed(model) else set()
    progress(f"quantizing MatMul weights to nf4 (block {block_size})")
    quantizer = MatMulBnb4Quantizer(model, MatMulBnb4Quantizer.NF4, block_size)
    quantizer.process()
    model = quantizer.model.model
    del quantizer
    if tables:
        # MatMulBnb4 has no Gather form: embedding tables go to int4 GatherBlockQuantized.
        progress("quantizing embedding tables to int4")
        others = [
            n.name for n in model.graph.node if n.op_type == "Gather" and n.name not in tables
        ]
        gathers = MatMulNBitsQuantizer(
            model,
            bits=4,
            block_size=block_size,
            is_symmetric=recipe.symmetric,
            nodes_to_exclude=others,
            op_types_to_quantize=("Gather",),
            quant_axes=(("Gather", 1),),
        )
        gathers.process()
        model = gathers.model.model
        del gathers
    _drop_duplicate_initializers(model.graph)
    progress("saving")
    _save(model, out)
    return {
        "library": "onnxruntime.quantization.matmul_bnb4_quantizer.MatMulBnb4Quantizer",
        "quant_type": "nf4",
        "block_size": block_size,
        "embeddings": "GatherBlockQuantized int4 (MatMulBnb4 has no Gather form)",
        "embedding_symmetric": recipe.symmetric,
        "embedding_tables": len(tables),
        "conv": _CONV_NOTE,
        **rewrites,
    }


_CONV_NOTE = "kept fp32: onnxruntime's weight-only operators have no convolution form"


def _int4_tables_allowed(model: onnx.ModelProto) -> bool:
    """int4 tables force the graph to opset 21, which changed GroupNormalization's scale
    and bias from per group to per channel; such graphs keep fp32 tables."""
    return not any(
        n.op_type == "GroupNormalization" and n.domain in ("", "ai.onnx") for n in model.graph.node
    )


def _quantize_gathers_int8(
    graph: onnx.GraphProto, tables: set[str], block_size: int, symmetric: bool
) -> None:
    """Replace embedding Gathers by 8-bit GatherBlockQuantized (uint8 data, blocks along
    the hidden axis, fp32 scales; zero points only when asymmetric)."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    quantized: dict[str, list[str]] = {}  # table -> [data, scales(, zero points)]
    nodes = []
    for node in graph.node:
        if node.name not in tables:
            nodes.append(node)
            continue
        table = node.input[0]
        if table not in quantized:  # two lookups in one table share its quantized copy
            arrays = _blockwise_uint8(
                numpy_helper.to_array(initializers[table]), block_size, symmetric
            )
            names = [f"{table}_Q8", f"{table}_scales", f"{table}_zero_points"]
            kept = [(n, a) for n, a in zip(names, arrays, strict=True) if a is not None]
            quantized[table] = [n for n, _ in kept]
            graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in kept)
        data, *rest = quantized[table]
        inputs = [data, node.input[1], *rest]
        nodes.append(
            helper.make_node(
                "GatherBlockQuantized",
                inputs,
                list(node.output),
                name=f"{node.name}_Q8",
                domain="com.microsoft",
                bits=8,
                block_size=block_size,
                gather_axis=0,
                quantize_axis=1,
            )
        )
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)


def _blockwise_uint8(
    table: np.ndarray, block_size: int, symmetric: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Quantize a [rows, width] table in blocks of `block_size` along its width."""
    rows, width = table.shape
    blocks = -(-width // block_size)
    padded = np.zeros((rows, blocks * block_size), dtype=np.float32)
    padded[:, :width] = table
    grouped = padded.reshape(rows, blocks, block_size)
    if symmetric:
        # No zero-point input: GatherBlockQuantized then uses 128 for uint8 data.
        scales = np.abs(grouped).max(axis=2) / 127.0
        zero = np.full_like(scales, 128.0)
    else:
        low = np.minimum(grouped.min(axis=2), 0.0)
        high = np.maximum(grouped.max(axis=2), 0.0)
        scales = (high - low) / 255.0
        zero = np.round(-low / np.where(scales == 0, 1.0, scales))
    safe = np.where(scales == 0, 1.0, scales)
    quantized = np.clip(np.round(grouped / safe[:, :, None]) + zero[:, :, None], 0, 255)
    data = quantized.astype(np.uint8).reshape(rows, -1)[:, :width]
    zero_points = None if symmetric else zero.astype(np.uint8)
    return np.ascontiguousarray(data), scales.astype(np.float32), zero_points


# --- graph preparation ----------------------------------------------------------------------


def _prepare_weights(graph: onnx.GraphProto) -> dict[str, int]:
    """Put every weight where a weight-only quantizer looks for it: the constant second
    input of a MatMul, or the table of a Gather, with no table shared between the two."""
    _name_nodes(graph)
    return {
        "gemm_as_matmul": _gemms_as_matmuls(graph),
        "transposes_folded": _fold_weight_transposes(graph),
        "tables_split_from_matmul": _split_shared_tables(graph),
    }


def _name_nodes(graph: onnx.GraphProto) -> None:
    """Quantizers select nodes by name; give unnamed (or same-named) nodes unique names."""
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_kiln_{index}"
        seen.add(node.name)


def _gemms_as_matmuls(graph: onnx.GraphProto) -> int:
    """Rewrite Gemm(A, W, C) with a constant 2-D W as MatMul(A, W') + C.

    The weight-only operators take MatMul only; a UNet's time-embedding projections are
    Gemms. Only the plain form (alpha = beta = 1, A not transposed) is rewritten.
    """
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    nodes, rewritten = [], 0
    for node in graph.node:
        weight = initializers.get(node.input[1]) if node.op_type == "Gemm" else None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        if weight is None or len(weight.dims) != 2 or attrs.get("transA", 0) or not plain:
            nodes.append(node)
            continue
        name = weight.name
        if attrs.get("transB", 0):
            name = f"{node.name}_weight"
            array = np.ascontiguousarray(numpy_helper.to_array(weight).T)
            graph.initializer.append(numpy_helper.from_array(array, name))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else ""
        product = f"{node.output[0]}_matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name))
        if bias:
            nodes.append(
                helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}_bias")
            )
        rewritten += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return rewritten


def _fold_weight_transposes(graph: onnx.GraphProto) -> int:
    """Replace Transpose(W) -> MatMul by a transposed constant (a tied LM head exported as
    `x @ E.T` shares E with the embedding Gather; left as is, its MatMul has no constant
    weight and E would stay fp32)."""
    from onnx import helper, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    folded, nodes = 0, []
    for node in graph.node:
        weight = initializers.get(node.input[0]) if node.op_type == "Transpose" else None
        perm = [helper.get_attribute_value(a) for a in node.attribute if a.name == "perm"]
        users = consumers.get(node.output[0], [])
        if (
            weight is None
            or len(weight.dims) != 2
            or perm not in ([], [[1, 0]])
            or not users
            or any(u.op_type != "MatMul" or list(u.input).index(node.output[0]) != 1 for u in users)
        ):
            nodes.append(node)
            continue
        array = np.ascontiguousarray(numpy_helper.to_array(weight).T)
        graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        folded += 1
    graph.ClearField("node")
    graph.node.extend(nodes)
    _drop_unused_initializers(graph)
    return folded


def _split_shared_tables(graph: onnx.GraphProto) -> int:
    """Give an embedding Gather its own copy of a table that a MatMul also reads directly:
    both quantizers name their outputs after the source tensor, and the two copies are
    laid out differently."""
    matmul_weights = {n.input[1] for n in graph.node if n.op_type == "MatMul"}
    initializers = {t.name: t for t in graph.initializer}
    copies: dict[str, str] = {}
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" else ""
        if table in matmul_weights and table in initializers:
            if table not in copies:
                copy = graph.initializer.add()
                copy.CopyFrom(initializers[table])
                copy.name = copies[table] = f"{table}_gathered"
            node.input[0] = copies[table]
    return len(copies)


def _embedding_gathers(model: onnx.ModelProto) -> set[str]:
    """Names of the Gather nodes that look rows up in a constant float [rows, width] table."""
    from onnx import TensorProto, helper

    graph = model.graph
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    tables = {t.name for t in graph.initializer if t.data_type in floats and len(t.dims) == 2}
    found = set()
    for node in graph.node:
        axis = [helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"]
        if node.op_type == "Gather" and node.input[0] in tables and axis in ([], [0]):
            found.add(node.name)
    return found


def _drop_duplicate_initializers(graph: onnx.GraphProto) -> None:
    """Quantizing two MatMuls that share one weight writes the same quantized tensor twice
    under one name; keep the first."""
    seen: set[str] = set()
    duplicates = []
    for index, tensor in enumerate(graph.initializer):
        if tensor.name in seen:
            duplicates.append(index)
        seen.add(tensor.name)
    _delete_initializers(graph, duplicates)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input}
    used |= set(_subgraph_inputs(graph))
    used |= {o.name for o in graph.output}
    used |= {i.name for i in graph.input}  # an initializer that is also an input stays
    _delete_initializers(graph, [i for i, t in enumerate(graph.initializer) if t.name not in used])


def _delete_initializers(graph: onnx.GraphProto, indices: Sequence[int]) -> None:
    """Delete in place: rebuilding the list would copy every tensor (the whole model)."""
    for index in sorted(indices, reverse=True):
        del graph.initializer[index]


def _subgraph_inputs(graph: onnx.GraphProto) -> Iterator[str]:
    """Names read inside If/Loop/Scan bodies (they may use outer initializers)."""
    from onnx import AttributeProto

    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                bodies = [attribute.g]
            elif attribute.type == AttributeProto.GRAPHS:
                bodies = list(attribute.graphs)
            else:
                continue
            for body in bodies:
                for inner in body.node:
                    yield from inner.input
                yield from _subgraph_inputs(body)


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    found: dict[str, list] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            found[name].append(node)
    return found


# --- files ----------------------------------------------------------------------------------


def _load_graph(path: Path) -> onnx.ModelProto:
    """The graph alone: external weights are referenced, not read."""
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _load_with_weights(path: Path) -> onnx.ModelProto:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def _save(model: onnx.ModelProto, folder: Path) -> None:
    import onnx

    onnx.save_model(
        model,
        str(folder / MODEL_FILE),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=DATA_FILE,
        size_threshold=EXTERNAL_THRESHOLD,
    )


def _write_work_copy(path: Path, work: Path) -> Path:
    """A copy of the fp32 graph for onnxruntime's file-based quantizers.

    The exporter's value_info is dropped: onnx shape inference, which both quantizers run
    first, fails on dynamo graphs with "Inferred shape and existing shape differ" otherwise.
    Writing the copy moves its weights to disk, so no copy stays in memory.
    """
    model = _load_with_weights(path)
    model.graph.ClearField("value_info")
    work.mkdir(parents=True, exist_ok=True)
    _save(model, work)
    return work / MODEL_FILE


def _layout() -> dict[str, Any]:
    return {"entry": MODEL_FILE, "external_data": DATA_FILE, "threshold_bytes": EXTERNAL_THRESHOLD}


def _versions() -> dict[str, Any]:
    import onnx
    import onnxruntime

    return {"versions": {"onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__}}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold back onnxruntime's chatter (pre-processing advice, opset bumps, a line per node
    at INFO); kiln reports its own steps. Only onnxruntime's records are affected.

    Importing `matmul_nbits_quantizer` also runs `logging.basicConfig(level=INFO)`, which
    would leave the application's root logger printing INFO: the root logger's handlers
    and level are put back afterwards.
    """
    library, root = logging.getLogger("onnxruntime"), logging.getLogger()
    saved = (library.level, root.level, list(root.handlers))
    library.setLevel(logging.ERROR)
    root.addFilter(_errors_only)  # applies to records logged on the root logger itself
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.removeFilter(_errors_only)
        library.setLevel(saved[0])
        root.setLevel(saved[1])
        root.handlers[:] = saved[2]


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


# --- what the output graph holds ------------------------------------------------------------


def count_layers(model: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Per layer type, how many layers store their weight at which precision.

    Read from the graph: a layer is a node with a constant weight (MatMul, Gemm, Conv,
    Gather of a float table, and their quantized forms); its precision is the element
    type the weight is stored with, followed back through Cast / DequantizeLinear /
    reshaping nodes. MatMuls of two activations (attention) are not layers.
    """
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    stored = {t.name: t.data_type for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    stored[node.output[0]] = attribute.t.data_type
    counts: dict[str, Counter] = defaultdict(Counter)
    for node in graph.node:
        found = _layer(node, producers, stored)
        if found is not None:
            counts[found[0]][found[1]] += 1
    return {op: dict(sorted(c.items())) for op, c in sorted(counts.items())}


def _layer(
    node: onnx.NodeProto, producers: Mapping[str, onnx.NodeProto], stored: Mapping[str, int]
) -> tuple[str, str] | None:
    from onnx import TensorProto, helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return "MatMul", f"int{attrs.get('bits', 4)}"
    if node.op_type == "MatMulBnb4":
        return "MatMul", "nf4" if attrs.get("quant_type") == 1 else "fp4"
    if node.op_type == "GatherBlockQuantized":
        data = stored.get(node.input[0])
        if data in (TensorProto.INT4, TensorProto.UINT4):
            return "Gather", "int4"
        return "Gather", f"int{attrs.get('bits', 4)}"
    if node.op_type not in _WEIGHT_INPUT:
        return None
    layer, index = _WEIGHT_INPUT[node.op_type]
    if index >= len(node.input):
        return None
    precision = _stored_precision(node.input[index], producers, stored)
    return None if precision is None else (layer, precision)


def _stored_precision(
    name: str, producers: Mapping[str, onnx.NodeProto], stored: Mapping[str, int]
) -> str | None:
    from onnx import TensorProto

    precisions = {
        TensorProto.FLOAT: "fp32",
        TensorProto.FLOAT16: "fp16",
        TensorProto.BFLOAT16: "bf16",
        TensorProto.INT8: "int8",
        TensorProto.UINT8: "int8",
        TensorProto.INT4: "int4",
        TensorProto.UINT4: "int4",
    }
    for _ in range(16):  # weights sit at most a few reshapes away from their layer
        if name in stored:
            return precisions.get(stored[name])
        node = producers.get(name)
        if node is None or node.op_type not in _PASS_THROUGH:
            return None
        name = node.input[0]
    return None
