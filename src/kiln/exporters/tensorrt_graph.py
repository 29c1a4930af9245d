"""The ONNX graph a TensorRT engine is built from, typed for the engine's precision.

Written against TensorRT 11.4's Python API. TensorRT 11 builds strongly typed networks only:
the builder flags that let TensorRT choose fp16/bf16/int8/fp8 kernels itself
(`BuilderFlag.FP16`, `BF16`, `INT8`, `FP8`) and the implicit int8 calibrators
(`IInt8EntropyCalibrator2`, `IBuilderConfig.int8_calibrator`) were removed in 11.0. Every
tensor's type comes from the graph, so the precision is put into the graph here:

- fp32: the onnx fp32 variant as exported;
- fp16: kiln's own fp16 conversion (the `onnx:fp16` cell of `kiln.quant.onnx`: float inputs
  and outputs kept, the ops that overflow fp16 kept at fp32);
- bf16: that conversion with bfloat16 in place of float16 (bf16 does not overflow where fp32
  does not, but keeping the same ops at fp32 keeps the reductions accurate);
- int8 / fp8: explicit quantization: QuantizeLinear/DequantizeLinear pairs with symmetric
  scales (TensorRT takes zero points of 0 only) learnt from kiln's calibration data, on the
  fp32 graph (layers without Q/DQ run at fp32, TF32 where the GPU has it). The ranges are a
  calibration cache file in the kiln cache dir, keyed by the source graph, the calibration
  inputs and the method, so rebuilding (another profile, another GPU) skips calibration.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import ExportError, KilnError, first_line
from kiln.models.spec import ComponentSpec, Precision

if TYPE_CHECKING:
    import onnx

#: Layers given int8 Q/DQ: everything with weights, and attention's activation MatMuls.
INT8_OP_TYPES = ("Conv", "MatMul", "Gemm")
#: FP8 (E4M3) is for matrix multiplies: TensorRT's FP8 convolutions are few and narrow.
FP8_OP_TYPES = ("MatMul", "Gemm")

StepCallback = Callable[[str], None]


@dataclass(frozen=True)
class TypedGraph:
    """The graph to build from, how it was typed, and whether calibration data shaped it."""

    path: Path
    method: str
    details: Mapping[str, Any] = field(default_factory=dict)
    calibrated: bool = False

    @property
    def summary(self) -> str:
        return self.method + (" (calibrated)" if self.calibrated else "")


def typed_graph(
    precision: Precision,
    source: Path,
    spec: ComponentSpec,
    work: Path,
    calibration: Sequence[Mapping[str, np.ndarray]],
    cache_folder: Path,
    progress: StepCallback,
    *,
    source_key: str = "",
) -> TypedGraph:
    """The graph for a `precision` engine of `source` (an fp32 ONNX file), written under
    `work` unless it is `source` itself. `source_key` identifies the source graph's
    contents for the calibration cache (the variant's file hashes)."""
    if precision is Precision.FP32:
        return TypedGraph(source, "as exported (fp32)")
    work.mkdir(parents=True, exist_ok=True)
    try:
        if precision in (Precision.FP16, Precision.BF16):
            return _cast(precision, source, spec, work, progress)
        if precision in (Precision.INT8, Precision.FP8):
            return _explicit_quantization(
                precision, source, spec, work, calibration, cache_folder, progress, source_key
            )
    except KilnError:
        raise
    except Exception as exc:  # onnx / onnxruntime.quantization raise anything from asserts up
        message = first_line(exc)
        raise ExportError(
            f"could not prepare {spec.name}'s {precision.value} graph for TensorRT: {message}"
        ) from exc
    raise ExportError(f"TensorRT engines are not built at {precision.value}")


# --- fp16 / bf16 -----------------------------------------------------------------------------


def _cast(
    precision: Precision, source: Path, spec: ComponentSpec, work: Path, progress: StepCallback
) -> TypedGraph:
    from kiln.quant.onnx import quantize_onnx
    from kiln.quant.recipes import recipe_for

    recipe = recipe_for("onnx", Precision.FP16, spec)
    graph = quantize_onnx(source.parent, source.name, spec, recipe, [], work, progress)
    path = work / graph.entry
    keep = ("library", "keep_io_types", "fp32_op_types", "fp32_nodes", "kept_fp32")
    details = {k: graph.details[k] for k in keep if k in graph.details}
    if precision is Precision.BF16:
        progress("retyping float16 as bfloat16")
        details["retyped"] = retype_float16(path, bfloat16=True)
    return TypedGraph(path, f"{precision.value} cast", details)


def retype_float16(path: Path, *, bfloat16: bool = True) -> dict[str, int]:
    """Rewrite every float16 tensor, cast and constant of the graph at `path` as bfloat16.

    The graph stays type-consistent: only one 16-bit float type is swapped for the other.
    Values round to nearest even; returns how many of each thing changed.
    """
    import onnx
    from onnx import AttributeProto, TensorProto

    model = onnx.load(str(path), load_external_data=True)
    counts = {"initializers": 0, "casts": 0, "constants": 0, "value_types": 0}
    for graph in _graphs(model.graph):
        for index, tensor in enumerate(graph.initializer):
            if tensor.data_type == TensorProto.FLOAT16:
                graph.initializer[index].CopyFrom(_bfloat16_tensor(tensor))
                counts["initializers"] += 1
        for node in graph.node:
            for attribute in node.attribute:
                if (
                    node.op_type == "Cast"
                    and attribute.name == "to"
                    and attribute.i == TensorProto.FLOAT16
                ):
                    attribute.i = TensorProto.BFLOAT16
                    counts["casts"] += 1
                elif (
                    attribute.type == AttributeProto.TENSOR
                    and attribute.t.data_type == TensorProto.FLOAT16
                ):
                    attribute.t.CopyFrom(_bfloat16_tensor(attribute.t))
                    counts["constants"] += 1
        for value in (*graph.input, *graph.output, *graph.value_info):
            if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
                value.type.tensor_type.elem_type = TensorProto.BFLOAT16
                counts["value_types"] += 1
    # The old weights file would be appended to, not replaced: every tensor is in memory.
    data = path.parent / f"{path.name}.data"
    data.unlink(missing_ok=True)
    _save(model, path)
    return counts


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """`graph` and every subgraph (If/Loop/Scan bodies) inside it."""
    from onnx import AttributeProto

    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == AttributeProto.GRAPH:
                yield from _graphs(attribute.g)
            elif attribute.type == AttributeProto.GRAPHS:
                for sub in attribute.graphs:
                    yield from _graphs(sub)


def _bfloat16_tensor(tensor: onnx.TensorProto) -> onnx.TensorProto:
    from onnx import TensorProto, helper, numpy_helper

    values = numpy_helper.to_array(tensor).astype(np.float32)
    return helper.make_tensor(
        tensor.name,
        TensorProto.BFLOAT16,
        list(tensor.dims),
        bfloat16_bits(values).tobytes(),
        raw=True,
    )


def bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 values as bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = np.isnan(values)
    out = rounded.astype(np.uint16)
    out[nan] = 0x7FC0  # a quiet NaN: rounding could have carried a NaN into infinity
    return out


def _save(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=1024,
    )


# --- int8 / fp8: explicit quantization --------------------------------------------------------


def _explicit_quantization(
    precision: Precision,
    source: Path,
    spec: ComponentSpec,
    work: Path,
    calibration: Sequence[Mapping[str, np.ndarray]],
    cache_folder: Path,
    progress: StepCallback,
    source_key: str,
) -> TypedGraph:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    # Shared with the onnx int8 static cell: the cleaned work copy, the feeds reader and the
    # silenced onnxruntime loggers.
    from kiln.quant.onnx import MODEL_FILE, _CalibrationFeeds, _load_graph, _quiet, _write_work_copy

    if not calibration:
        raise ExportError(
            f"{spec.name}: {precision.value} engines need calibration inputs and none were "
            "recorded (the fp32 pipeline never called this component)"
        )
    fp8 = precision is Precision.FP8
    quant_type = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    # fp8 scales come from each tensor's spread (onnxruntime needs its distribution); int8
    # from symmetric min/max ranges.
    method = CalibrationMethod.Distribution if fp8 else CalibrationMethod.MinMax
    op_types = list(FP8_OP_TYPES if fp8 else INT8_OP_TYPES)
    key = calibration_key(source_key or str(source), calibration, precision, method.name)
    cache = cache_folder / f"{spec.name}-{precision.value}-{key}.json"
    with _quiet():
        progress("preparing the graph")
        prepared = _write_work_copy(source, work / "prepared")
        if cache.is_file():
            progress("calibration ranges from the cache")
        else:
            inputs = [i.name for i in _load_graph(prepared).graph.input]
            calibrator = create_calibrator(
                prepared,
                op_types,
                augmented_model_path=str(work / "augmented.onnx"),
                calibrate_method=method,
                use_external_data_format=True,
                extra_options={} if fp8 else {"symmetric": True},
            )
            calibrator.collect_data(_CalibrationFeeds(calibration, inputs, progress))
            save_tensors_data(calibrator.compute_data(), cache)
            del calibrator  # its session and copy of the model go before quantizing
        progress(f"inserting {precision.value} Q/DQ pairs")
        quantize_static(
            prepared,
            work / MODEL_FILE,
            calibration_data_reader=None,
            calibration_cache_path=cache,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            per_channel=not fp8,
            reduce_range=False,
            activation_type=quant_type,
            weight_type=quant_type,
            calibrate_method=method,
            use_external_data_format=True,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                # TensorRT dequantizes int8/fp8 weights, not int32 biases.
                "QuantizeBias": False,
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
            },
        )
    details = {
        "library": "onnxruntime.quantization.quantize_static",
        "format": "QDQ",
        "type": "FLOAT8E4M3FN" if fp8 else "INT8",
        "symmetric": True,
        "per_channel_weights": not fp8,
        "op_types": op_types,
        "calibration": {"method": method.name, "calls": len(calibration), "cache": cache.name},
    }
    return TypedGraph(work / MODEL_FILE, f"{precision.value} explicit quantization", details, True)


def calibration_key(
    source_key: str,
    calibration: Sequence[Mapping[str, np.ndarray]],
    precision: Precision,
    method: str,
) -> str:
    """16 hex chars naming one calibration: the source graph, the inputs and the method."""
    digest = hashlib.sha256(f"{source_key}\0{precision.value}\0{method}\0".encode())
    for call in calibration:
        for name in sorted(call):
            array = np.ascontiguousarray(call[name])
            digest.update(f"{name}{array.dtype}{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def source_key(files: Sequence[Any]) -> str:
    """The content key of a variant: its files' recorded SHA-256s."""
    return hashlib.sha256(os.linesep.join(f.sha256 for f in files).encode()).hexdigest()
