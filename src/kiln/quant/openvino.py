"""OpenVINO quantization backend: fp16/bf16 casts and NNCF int8 / int4 / nf4 compression.

Reads an fp32 IR variant and writes the quantized IR into an empty staging folder. What
each cell does:

- fp16 / cast: weights saved fp16 (`compress_to_fp16`), run with the "f16" hint. CPUs
  without fp16 arithmetic (no AVX512-FP16 / AMX-FP16) silently compute in bf16 or f32
  instead; the precision the CPU plugin really picked is read back and recorded.
- bf16 / cast: IR files have no bf16 storage through `save_model` (only `compress_to_fp16`),
  so weights are stored fp16 (the same halving) and the "bf16" hint does the rest.
- int8 / weight-only: `nncf.compress_weights` INT8_SYM or INT8_ASYM.
- int8 / hybrid (the UNet's default): optimum-intel's recipe for diffusion models. Weights of
  MatMul and embedding Gather layers are compressed to int8 (activations stay float), and
  `nncf.quantize` then calibrates int8 activations around everything else, which quantizes
  the convolutions' weights and inputs, where int8 arithmetic pays on CPUs.
- int8 / static: `nncf.quantize` everywhere (weights and activations).
- Both calibrated cells store int8 weights in 7 bits' range (NNCF's overflow fix on every
  layer): CPUs without VNNI multiply u8 x s8 through a 16-bit sum that saturates, which moved
  the tiny UNet's output by 36% on an AVX2 EPYC (7% with the fix). The artifact then gives
  the same numbers on every x86 machine, for about a bit of weight precision on VNNI ones.
- int4, nf4 / weight-only: `nncf.compress_weights` with a group size and ratio. Convolution
  weights and layers whose channel count no allowed group size divides go to the int8 backup.

Integer variants run their float parts in bf16 where the CPU has native bf16, else f32
(`activation_precision`); the choice travels to the session in the runtime options.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import (
    BackendUnavailableError,
    ExportError,
    InvalidRequestError,
    KilnError,
    first_line,
)
from kiln.models.spec import ComponentSpec, Precision
from kiln.quant.base import Feeds, QuantizedGraph, StepCallback
from kiln.quant.recipes import DEFAULT_GROUP_SIZE, QuantMethod, QuantRecipe

if TYPE_CHECKING:
    import openvino as ov

# Smallest group NNCF may shrink a 4-bit group to when the requested one does not divide a
# layer's channels: kiln's own floor for group sizes (`recipes.recipe_for`).
MIN_GROUP_SIZE = 16

# Which input of a weighted operation carries its weight (MatMul may have it on either side).
_WEIGHT_PORTS: Mapping[str, tuple[int, ...]] = {
    "MatMul": (1, 0),
    "Convolution": (1,),
    "GroupConvolution": (1,),
    "ConvolutionBackpropData": (1,),
    "GroupConvolutionBackpropData": (1,),
    "Gather": (0,),
}
# Operations between a stored weight and the layer reading it: casts, NNCF's decompression
# (zero point, scale, group reshape) and weight FakeQuantize nodes.
_WEIGHT_PATH_OPS = frozenset(
    {
        "Constant",
        "Convert",
        "Subtract",
        "Multiply",
        "Reshape",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "FakeQuantize",
        "FakeConvert",
    }
)
_STORAGE_NAMES = {
    "u8": "int8",
    "i8": "int8",
    "u4": "int4",
    "i4": "int4",
    "nf4": "nf4",
    "f16": "fp16",
    "bf16": "bf16",
    "f32": "fp32",
    "f64": "fp64",
}
_CONVOLUTIONS = ("Convolution", "GroupConvolution")


# --------------------------------------------------------------------------------------------
# Inference precision
# --------------------------------------------------------------------------------------------


def activation_precision(capabilities: Collection[str]) -> str:
    """The hint an integer variant runs its float parts with: "bf16" with native bf16, else "f32".

    `capabilities` is the CPU device's OPTIMIZATION_CAPABILITIES; OpenVINO lists "BF16" only
    when the CPU computes in bf16 natively (AVX512-BF16 or AMX), where it is faster than f32
    at a drift well inside the int8/int4 budgets.
    """
    return "bf16" if "BF16" in capabilities else "f32"


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES for this machine's CPU."""
    import openvino as ov

    return tuple(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@functools.lru_cache(maxsize=8)
def effective_precision(hint: str) -> str:
    """The precision the CPU plugin really computes in when asked for `hint`.

    The plugin falls back silently (f16 becomes bf16 on CPUs without fp16 arithmetic), and
    the fallback depends on the device, not the model, so a one-MatMul probe answers for any
    model without compiling a multi-GB UNet a second time.
    """
    import openvino as ov
    import openvino.opset13 as ops

    data = ops.parameter([1, 16], np.float32, name="x")
    weight = ops.constant(np.ones((16, 16), np.float32))
    probe = ov.Model([ops.matmul(data, weight, False, False)], [data], "precision_probe")
    compiled = ov.Core().compile_model(probe, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    return compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()


# --------------------------------------------------------------------------------------------
# Reading back what a graph holds
# --------------------------------------------------------------------------------------------


def _weight_precision(source: ov.Output) -> str | None:
    """How the weight feeding `source` is stored, or None when `source` is an activation.

    A weight is an input computed from constants only, through casts and decompression ops;
    the weight itself is the largest constant there (zero points and scales are smaller).
    """
    stack, seen = [source.get_node()], set()
    constants, levels = [], []
    while stack:
        node = stack.pop()
        if node.get_name() in seen:
            continue
        seen.add(node.get_name())
        kind = node.get_type_name()
        if kind not in _WEIGHT_PATH_OPS:
            return None
        if kind == "Constant":
            constants.append(node)
        elif kind == "FakeQuantize":
            levels.append(int(node.get_attributes()["levels"]))
        stack.extend(value.get_node() for value in node.input_values())
    if not constants:
        return None
    if levels:  # fake-quantized float weight: stored wide, computed at the FQ's precision
        return "int8" if max(levels) > 16 else "int4"
    weight = max(constants, key=lambda c: int(np.prod(list(c.get_output_shape(0)))))
    name = weight.get_element_type().get_type_name()
    return _STORAGE_NAMES.get(name, name)


def _weight_input(op: ov.Node) -> ov.Output | None:
    """The input of a float-valued layer that carries a constant weight, if any."""
    ports = _WEIGHT_PORTS.get(op.get_type_name(), ())
    if not ports or not op.get_output_element_type(0).is_real():
        return None
    for port in ports:
        if _weight_precision(op.input_value(port)) is not None:
            return op.input_value(port)
    return None


def _is_activation_quantizer(op: ov.Node) -> bool:
    return op.get_type_name() == "FakeQuantize" and _weight_precision(op.input_value(0)) is None


def layer_precisions(model: ov.Model) -> dict[str, dict[str, int]]:
    """Per op type, how many weighted layers store their weight at which precision.

    Activation FakeQuantize nodes (calibrated int8 activations) are counted under
    "FakeQuantize", e.g. `{"MatMul": {"int4": 40, "int8": 2}, "FakeQuantize": {"int8": 50}}`.
    """
    counts: dict[str, Counter[str]] = {}
    for op in model.get_ops():
        weight = _weight_input(op)
        if weight is not None:
            precision = _weight_precision(weight)
            counts.setdefault(op.get_type_name(), Counter())[precision or "?"] += 1
        elif _is_activation_quantizer(op):
            levels = int(op.get_attributes()["levels"])
            counts.setdefault("FakeQuantize", Counter())["int8" if levels > 16 else "int4"] += 1
    return {kind: dict(sorted(found.items())) for kind, found in sorted(counts.items())}


def _beyond_fp16(model: ov.Model) -> int:
    """How many float constants hold values outside the fp16 range.

    `save_model(compress_to_fp16=True)` clips them to +-65504 without a word. For attention
    mask fill values (float32 min) that is harmless; for a weight it is not, so the count is
    recorded next to the drift the runner measures. Reads the constants in place (no copy).
    """
    limit = float(np.finfo(np.float16).max)
    count = 0
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or op.get_element_type().get_type_name() != "f32":
            continue
        data = op.data
        if data.size and (float(data.max()) > limit or float(data.min()) < -limit):
            count += 1
    return count


def _weighted_layer_names(model: ov.Model, kinds: Collection[str]) -> list[str]:
    return [
        op.get_friendly_name()
        for op in model.get_ops()
        if op.get_type_name() in kinds and _weight_input(op) is not None
    ]


def _has_attention(model: ov.Model) -> bool:
    return any(
        op.get_type_name() in ("ScaledDotProductAttention", "Softmax") for op in model.get_ops()
    )


# --------------------------------------------------------------------------------------------
# NNCF
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_nncf() -> Iterator[Any]:
    """Import nncf with its logging at WARNING and its progress bars silenced.

    kiln reports progress itself. NNCF draws its bars on rich's global console, which has no
    other switch; kiln's own consoles are separate objects and keep printing.
    """
    try:
        import nncf
    except ImportError:
        raise BackendUnavailableError(
            "nncf is not installed: pip install 'kiln[openvino]'"
        ) from None
    import rich

    nncf.set_log_level(logging.WARNING)
    console = rich.get_console()
    was_quiet, console.quiet = console.quiet, True
    try:
        yield nncf
    finally:
        console.quiet = was_quiet


def _calibration_dataset(
    nncf: Any, model: ov.Model, calibration: Sequence[Feeds], progress: StepCallback
) -> Any:
    """An nncf.Dataset over the feeds, keeping the model's inputs and reporting each use."""
    names = {port.get_any_name() for port in model.inputs}
    total, used = len(calibration), [0]

    def feed(item: Feeds) -> dict[str, np.ndarray]:
        used[0] += 1
        # NNCF walks the data once per algorithm (statistics, bias correction).
        step, rounds = (used[0] - 1) % total + 1, (used[0] - 1) // total + 1
        progress(f"calibrating {step}/{total}" + (f" (pass {rounds})" if rounds > 1 else ""))
        return {name: np.asarray(value) for name, value in item.items() if name in names}

    return nncf.Dataset(list(calibration), feed)


def _weight_only(
    nncf: Any, model: ov.Model, recipe: QuantRecipe, progress: StepCallback
) -> tuple[ov.Model, dict[str, Any]]:
    """`nncf.compress_weights` for int8, int4 and nf4 (data-free)."""
    from nncf.quantization.advanced_parameters import (
        AdvancedCompressionParameters,
        GroupSizeFallbackMode,
    )

    mode = _compression_mode(nncf, recipe)
    progress(f"compressing weights ({mode.value})")
    if recipe.precision is Precision.INT8:
        return nncf.compress_weights(model, mode=mode), {"mode": mode.value, "ignored_scope": None}
    # A group must divide a layer's input channels. ADJUST takes the largest power of two
    # that does, down to MIN_GROUP_SIZE, and leaves layers with none at the int8 backup.
    advanced = AdvancedCompressionParameters(
        group_size_fallback_mode=GroupSizeFallbackMode.ADJUST,
        min_adjusted_group_size=MIN_GROUP_SIZE,
    )
    backup = nncf.BackupMode.INT8_ASYM
    group_size = recipe.group_size or DEFAULT_GROUP_SIZE
    compressed = nncf.compress_weights(
        model,
        mode=mode,
        group_size=group_size,
        ratio=recipe.ratio,
        backup_mode=backup,
        advanced_parameters=advanced,
    )
    return compressed, {
        "mode": mode.value,
        "group_size": group_size,
        "ratio": recipe.ratio,
        "backup_mode": backup.value,
        "group_size_fallback": (
            f"largest power of two >= {MIN_GROUP_SIZE} dividing the channels, else {backup.value}"
        ),
        # NNCF's default: embeddings, the last MatMul and convolutions stay at the backup.
        "all_layers": False,
        "ignored_scope": None,
    }


def _compression_mode(nncf: Any, recipe: QuantRecipe) -> Any:
    modes = nncf.CompressWeightsMode
    if recipe.precision is Precision.NF4:
        return modes.NF4
    if recipe.precision is Precision.INT4:
        return modes.INT4_SYM if recipe.symmetric else modes.INT4_ASYM
    return modes.INT8_SYM if recipe.symmetric else modes.INT8_ASYM


def _hybrid(
    nncf: Any,
    model: ov.Model,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    progress: StepCallback,
) -> tuple[ov.Model, dict[str, Any]]:
    """int8 weights on MatMul/Gather, then calibrated int8 activations around the rest."""
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        AdvancedSmoothQuantParameters,
        OverflowFix,
    )

    compressed = _weighted_layer_names(model, ("MatMul", "Gather"))
    convolutions = sorted({op.get_type_name() for op in model.get_ops()} & set(_CONVOLUTIONS))
    mode = _compression_mode(nncf, recipe)
    progress(f"compressing MatMul/Gather weights ({mode.value})")
    # Convolutions are left to nncf.quantize, which quantizes their weights and inputs.
    model = nncf.compress_weights(
        model, mode=mode, ignored_scope=nncf.IgnoredScope(types=convolutions)
    )
    preset = _preset(nncf, recipe)
    model_type = _model_type(nncf, model)
    # The layers just compressed must not get activation quantizers: NNCF would take their
    # decompression subgraphs for activations. SmoothQuant would rescale those compressed
    # weights, so it is off.
    model = nncf.quantize(
        model,
        _calibration_dataset(nncf, model, calibration, progress),
        preset=preset,
        subset_size=len(calibration),
        model_type=model_type,
        ignored_scope=nncf.IgnoredScope(names=compressed),
        advanced_parameters=AdvancedQuantizationParameters(
            overflow_fix=OverflowFix.ENABLE,
            smooth_quant_alphas=AdvancedSmoothQuantParameters(convolution=-1, matmul=-1),
        ),
    )
    return model, {
        "mode": mode.value,
        "weight_compression_ignored_types": convolutions,
        "ignored_scope": {"names": len(compressed), "what": "weight-compressed MatMul/Gather"},
        "preset": preset.value,
        "model_type": model_type.value if model_type else None,
        "smooth_quant": False,
        "overflow_fix": "enable",
        "subset_size": len(calibration),
    }


def _static(
    nncf: Any,
    model: ov.Model,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    progress: StepCallback,
) -> tuple[ov.Model, dict[str, Any]]:
    """Calibrated int8 weights and activations everywhere NNCF places quantizers."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    preset = _preset(nncf, recipe)
    model_type = _model_type(nncf, model)
    progress("quantizing weights and activations")
    model = nncf.quantize(
        model,
        _calibration_dataset(nncf, model, calibration, progress),
        preset=preset,
        subset_size=len(calibration),
        model_type=model_type,
        advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE),
    )
    return model, {
        "preset": preset.value,
        "model_type": model_type.value if model_type else None,
        "ignored_scope": None,
        "overflow_fix": "enable",
        "subset_size": len(calibration),
    }


def _preset(nncf: Any, recipe: QuantRecipe) -> Any:
    # PERFORMANCE: symmetric weights and activations; MIXED: asymmetric activations.
    presets = nncf.QuantizationPreset
    return presets.PERFORMANCE if recipe.symmetric else presets.MIXED


def _model_type(nncf: Any, model: ov.Model) -> Any:
    # TRANSFORMER adds NNCF's attention patterns (no quantizers where they cost accuracy).
    return nncf.ModelType.TRANSFORMER if _has_attention(model) else None


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


_CELLS = frozenset(
    {
        (Precision.FP16, QuantMethod.CAST),
        (Precision.BF16, QuantMethod.CAST),
        (Precision.INT8, QuantMethod.WEIGHT_ONLY),
        (Precision.INT8, QuantMethod.HYBRID),
        (Precision.INT8, QuantMethod.STATIC),
        (Precision.INT4, QuantMethod.WEIGHT_ONLY),
        (Precision.NF4, QuantMethod.WEIGHT_ONLY),
    }
)


def _check_request(recipe: QuantRecipe, calibration: Sequence[Feeds]) -> None:
    if recipe.target != "openvino":
        raise InvalidRequestError(f"the OpenVINO backend cannot build {recipe.target} variants")
    if (recipe.precision, recipe.method) not in _CELLS:
        raise InvalidRequestError(
            f"openvino has no {recipe.precision.value} {recipe.method.value} quantization"
        )
    if recipe.needs_calibration and not calibration:
        raise InvalidRequestError(
            f"openvino {recipe.precision.value} {recipe.method.value} quantization needs "
            "calibration inputs, and none were recorded"
        )


def _compress(
    model: ov.Model, recipe: QuantRecipe, calibration: Sequence[Feeds], progress: StepCallback
) -> tuple[ov.Model, dict[str, Any]]:
    """Run the recipe's NNCF algorithm on `model` (integer cells only)."""
    with _quiet_nncf() as nncf:
        if recipe.method is QuantMethod.HYBRID:
            model, details = _hybrid(nncf, model, recipe, calibration, progress)
        elif recipe.method is QuantMethod.STATIC:
            model, details = _static(nncf, model, recipe, calibration, progress)
        else:
            model, details = _weight_only(nncf, model, recipe, progress)
    return model, {"nncf": nncf.__version__, **details}


def _inference_hint(recipe: QuantRecipe) -> str:
    if recipe.precision is Precision.FP16:
        return "f16"
    if recipe.precision is Precision.BF16:
        return "bf16"
    return activation_precision(cpu_capabilities())


def quantize_openvino(
    source: Path,
    entry: str,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> QuantizedGraph:
    """Quantize the fp32 IR `source/entry` as `recipe` says into the empty folder `out`."""
    _check_request(recipe, calibration)
    is_cast = recipe.method is QuantMethod.CAST
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailableError(
            "openvino is not installed: pip install 'kiln[openvino]'"
        ) from None
    label = f"openvino {recipe.precision.value} {recipe.method.value} quantization of {spec.name}"
    target = out / Path(entry).name
    try:
        progress(f"reading {spec.name} fp32 IR")
        # The weights stay memory-mapped from the .bin: reading costs no RAM for them.
        model = ov.Core().read_model(str(source / entry))
        details: dict[str, Any] = {}
        if is_cast:
            details["constants_clipped_to_fp16_range"] = _beyond_fp16(model)
        else:
            # Rebinding `model` drops the only reference to the input graph.
            model, details = _compress(model, recipe, calibration, progress)
        progress("saving IR")
        # Casts store every float weight fp16; NNCF's output keeps its own storage types
        # (and the few float constants left, norms and biases, stay exact in fp32).
        ov.save_model(model, str(target), compress_to_fp16=is_cast)
        del model
        progress("inspecting saved IR")
        layers = layer_precisions(ov.Core().read_model(str(target)))
        hint = _inference_hint(recipe)
        effective = effective_precision(hint)
    except KilnError:
        raise
    except Exception as exc:  # NNCF and OpenVINO raise many types, with long texts
        raise ExportError(f"{label} failed: {first_line(exc)}") from exc
    details = {
        "openvino": ov.__version__,
        **details,
        "weights_storage": "fp16" if is_cast else "nncf",
        "inference_precision_hint": hint,
        # What the CPU plugin computes in with that hint on this machine (f16 becomes bf16
        # on CPUs without fp16 arithmetic).
        "effective_inference_precision": effective,
    }
    return QuantizedGraph(
        entry=target.name,
        layers=layers,
        details=details,
        runtime_options={"openvino_config": {"INFERENCE_PRECISION_HINT": hint}},
    )
