"""OpenVINO quantization backend: every cell on tiny SD1 components, sizes on a wider encoder.

Tolerances are per output, max|quantized - fp32| <= rtol * max|fp32|, against the fp32 IR
run at an f32 hint. Measured on a 2-core AVX-512 + avx512_bf16 CPU (OpenVINO 2026.4,
NNCF 3.4; integer variants at the bf16 hint), worst output:

    cell                      component           measured   rtol
    fp16 / bf16 cast          tiny unet           0.014      0.05
    int8 weight-only          tiny / wide text    0.020 / 0.029   0.10
    int8 hybrid / static      tiny unet           0.047 / 0.057   0.15
    int4 / nf4, group 32      wide text           0.23 / 0.28     0.45

On a 2-core AVX2 EPYC (no AVX-512, no VNNI; f32 hint) int8 static measured 0.067 with the
overflow fix on every layer and 0.36 with NNCF's default (first layer only): without VNNI the
int8 dot products saturate, which the calibrated tests catch.

f16 computes in bf16 on CPUs without fp16 arithmetic, hence the same drift as bf16. The
4-bit drift is what random weights give: rounding the wide encoder's Linear weights the same
way in torch moves its output by 24% RMS too (trained weights fare better).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("openvino")
pytest.importorskip("nncf")

import kiln  # noqa: E402
from kiln.artifacts import read_manifest  # noqa: E402
from kiln.errors import ExportError, InvalidRequestError  # noqa: E402
from kiln.models.spec import ComponentSpec, Precision  # noqa: E402
from kiln.quant.openvino import (  # noqa: E402
    activation_precision,
    cpu_capabilities,
    effective_precision,
    quantize_openvino,
)
from kiln.quant.recipes import QuantMethod, QuantRecipe  # noqa: E402
from kiln.runtimes.openvino import OpenVinoSession  # noqa: E402

FP32_FOLDER = "openvino-fp32"
ENTRY = "model.xml"
# Tiny UNet: 33 convolutions and 50 MatMuls with weights. Tiny text encoder: 12 MatMuls and
# 2 embedding Gathers; its MLP's 37 input channels take no group size (int8 backup).
TINY_UNET_LAYERS = {"Convolution": 33, "MatMul": 50}
CAST_RTOL, INT8_WEIGHT_RTOL, INT8_CALIBRATED_RTOL, FOUR_BIT_RTOL = 0.05, 0.10, 0.15, 0.45


@pytest.fixture(scope="module")
def sd1_openvino(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("quant-ov") / "sd1"
    kiln.export(tiny_models["sd1"], out, targets=["openvino"])
    return out


@pytest.fixture(scope="module")
def wide_text_encoder(tmp_path_factory):
    """A CLIP text encoder wide enough for storage ratios to mean something, exported by kiln.

    Hidden 256, intermediate 1024, 2 layers: 1.6 M MatMul weights against 0.3 M embedding
    weights, like the real encoders' proportions (the tiny one is mostly embeddings).
    """
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from kiln.exporters.openvino import export_openvino
    from kiln.models.stable_diffusion import component_specs, export_module
    from kiln.models.tiny import build_pipeline

    pipeline = build_pipeline("sd1")
    tokenizer = pipeline.tokenizer
    config = CLIPTextConfig(
        vocab_size=1100,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu",
        projection_dim=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipeline.text_encoder = CLIPTextModel(config).eval()
    spec = component_specs(pipeline)["text_encoder"]
    folder = tmp_path_factory.mktemp("wide-text-encoder")
    export_openvino(export_module(pipeline, "text_encoder"), spec, folder)
    return folder, spec


def component(artifact, name):
    spec = ComponentSpec.from_dict(read_manifest(artifact).components[name])
    return artifact / name / FP32_FOLDER, spec


def feeds(spec, seed=0):
    return {name: t.numpy() for name, t in spec.sample_inputs(spec.opt_sizes(), seed=seed).items()}


def quantize(source, spec, out, precision, method, calibration=(), **recipe):
    steps: list[str] = []
    out.mkdir()
    graph = quantize_openvino(
        source,
        ENTRY,
        spec,
        QuantRecipe("openvino", precision, method, **recipe),
        list(calibration),
        out,
        steps.append,
    )
    return graph, steps


def worst_relative_diff(source, quantized, spec, graph):
    """max over outputs of max|q - ref| / max|ref|, fp32 reference at the f32 hint."""
    reference = OpenVinoSession(source / ENTRY, spec, precision="fp32", use_cache=False)
    config = graph.runtime_options["openvino_config"]
    session = OpenVinoSession(quantized / ENTRY, spec, precision="", config=config, use_cache=False)
    sample = feeds(spec, seed=0)
    expected, got = reference.run(sample), session.run(sample)
    worst = 0.0
    for name, ref in expected.items():
        assert np.isfinite(got[name]).all(), name
        worst = max(worst, float(np.abs(got[name] - ref).max() / np.abs(ref).max()))
    return worst


def size_ratio(source, quantized):
    return (quantized / "model.bin").stat().st_size / (source / "model.bin").stat().st_size


def layer_totals(layers):
    return {kind: sum(found.values()) for kind, found in layers.items() if kind != "FakeQuantize"}


# ---- inference precision --------------------------------------------------------------------


def test_activation_precision_follows_native_bf16():
    assert activation_precision(["FP32", "BF16", "INT8", "BIN"]) == "bf16"
    assert activation_precision(["FP32", "FP16", "INT8"]) == "f32"
    assert activation_precision(cpu_capabilities()) in ("bf16", "f32")


def test_effective_precision_reads_back_the_cpu_fallback():
    assert effective_precision("f32") == "f32"
    capabilities = cpu_capabilities()
    if "FP16" not in capabilities:  # no fp16 arithmetic: the plugin picks something else
        assert effective_precision("f16") in ("bf16", "f32")
    if "BF16" in capabilities:
        assert effective_precision("bf16") == "bf16"


# ---- casts ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("precision", "hint"), [(Precision.FP16, "f16"), (Precision.BF16, "bf16")])
def test_cast_stores_fp16_weights_and_sets_the_hint(sd1_openvino, tmp_path, precision, hint):
    source, spec = component(sd1_openvino, "unet")
    graph, steps = quantize(source, spec, tmp_path / "q", precision, QuantMethod.CAST)
    assert graph.entry == ENTRY
    assert graph.runtime_options == {"openvino_config": {"INFERENCE_PRECISION_HINT": hint}}
    assert graph.layers == {kind: {"fp16": n} for kind, n in TINY_UNET_LAYERS.items()}
    assert graph.details["effective_inference_precision"] == effective_precision(hint)
    assert graph.details["constants_clipped_to_fp16_range"] == 0
    assert 0.45 <= size_ratio(source, tmp_path / "q") <= 0.51
    assert worst_relative_diff(source, tmp_path / "q", spec, graph) <= CAST_RTOL
    assert steps[0].startswith("reading") and "saving IR" in steps


def test_cast_counts_constants_fp16_storage_clips(sd1_openvino, tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    _, spec = component(sd1_openvino, "text_encoder")
    weight = np.ones((4, 4), np.float32)
    weight[0, 0] = 1e6  # beyond fp16's 65504: save_model clips it silently
    data = ops.parameter([1, 4], np.float32)
    model = ov.Model([ops.matmul(data, ops.constant(weight), False, False)], [data])
    source = tmp_path / "fp32"
    ov.save_model(model, str(source / ENTRY), compress_to_fp16=False)
    graph, _ = quantize(source, spec, tmp_path / "q", Precision.BF16, QuantMethod.CAST)
    assert graph.details["constants_clipped_to_fp16_range"] == 1
    assert graph.layers == {"MatMul": {"fp16": 1}}


# ---- int8 -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("symmetric", "mode"), [(True, "int8_sym"), (False, "int8_asym")])
def test_int8_weight_only_compresses_every_weight(sd1_openvino, tmp_path, symmetric, mode):
    source, spec = component(sd1_openvino, "text_encoder")
    graph, steps = quantize(
        source, spec, tmp_path / "q", Precision.INT8, QuantMethod.WEIGHT_ONLY, symmetric=symmetric
    )
    assert graph.layers == {"Gather": {"int8": 2}, "MatMul": {"int8": 12}}
    assert graph.details["mode"] == mode
    assert graph.details["nncf"] and graph.details["openvino"]
    hint = activation_precision(cpu_capabilities())
    assert graph.runtime_options["openvino_config"]["INFERENCE_PRECISION_HINT"] == hint
    assert graph.details["inference_precision_hint"] == hint
    assert size_ratio(source, tmp_path / "q") <= 0.30
    assert worst_relative_diff(source, tmp_path / "q", spec, graph) <= INT8_WEIGHT_RTOL
    assert any(step.startswith("compressing") for step in steps)


def test_int8_hybrid_compresses_weights_and_calibrates_activations(sd1_openvino, tmp_path, capfd):
    source, spec = component(sd1_openvino, "unet")
    calibration = [feeds(spec, seed) for seed in (1, 2, 3)]
    graph, steps = quantize(
        source, spec, tmp_path / "q", Precision.INT8, QuantMethod.HYBRID, calibration
    )
    # Every weight int8: MatMuls weight-only, convolutions through their FakeQuantize.
    assert {kind: found for kind, found in graph.layers.items() if kind != "FakeQuantize"} == {
        kind: {"int8": n} for kind, n in TINY_UNET_LAYERS.items()
    }
    assert graph.layers["FakeQuantize"]["int8"] > 0
    assert graph.details["subset_size"] == 3
    assert graph.details["ignored_scope"]["names"] == TINY_UNET_LAYERS["MatMul"]
    assert graph.details["model_type"] == "transformer"
    assert graph.details["overflow_fix"] == "enable"
    assert size_ratio(source, tmp_path / "q") <= 0.30
    assert worst_relative_diff(source, tmp_path / "q", spec, graph) <= INT8_CALIBRATED_RTOL
    assert [s.split()[0] for s in steps if not s.startswith("calibrating")] == [
        "reading",
        "compressing",
        "saving",
        "inspecting",
    ]
    assert "calibrating 3/3" in steps
    # NNCF's own progress bars and INFO logs stay quiet; kiln reports through `steps`.
    captured = capfd.readouterr()
    assert "━" not in captured.out + captured.err
    assert "INFO:nncf" not in captured.out + captured.err


def test_int8_static_quantizes_more_activations_than_hybrid(sd1_openvino, tmp_path):
    source, spec = component(sd1_openvino, "unet")
    calibration = [feeds(spec, seed) for seed in (1, 2, 3)]
    graph, _ = quantize(
        source, spec, tmp_path / "q", Precision.INT8, QuantMethod.STATIC, calibration
    )
    assert layer_totals(graph.layers) == TINY_UNET_LAYERS
    assert graph.layers["Convolution"] == {"int8": 33}
    # Also the MatMuls' inputs, which hybrid leaves float: 78 against hybrid's 50 here.
    assert graph.layers["FakeQuantize"]["int8"] > TINY_UNET_LAYERS["MatMul"]
    assert graph.details["preset"] == "performance"
    assert size_ratio(source, tmp_path / "q") <= 0.30
    assert worst_relative_diff(source, tmp_path / "q", spec, graph) <= INT8_CALIBRATED_RTOL


@pytest.mark.parametrize("method", [QuantMethod.HYBRID, QuantMethod.STATIC])
def test_calibrated_methods_refuse_empty_calibration(sd1_openvino, tmp_path, method):
    source, spec = component(sd1_openvino, "unet")
    with pytest.raises(InvalidRequestError, match="calibration"):
        quantize(source, spec, tmp_path / "q", Precision.INT8, method, [])
    assert not any((tmp_path / "q").iterdir())


# ---- 4 bit ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "group_size", "low"),
    [(Precision.INT4, 16, "int4"), (Precision.NF4, 32, "nf4")],
)
def test_four_bit_falls_back_to_int8_where_no_group_fits(
    sd1_openvino, tmp_path, precision, group_size, low
):
    source, spec = component(sd1_openvino, "text_encoder")
    graph, _ = quantize(
        source, spec, tmp_path / "q", precision, QuantMethod.WEIGHT_ONLY, group_size=group_size
    )
    # fc2 reads 37 channels: no power of two >= 16 divides it, so both MLP outputs are int8;
    # embeddings stay int8 too (NNCF's all_layers=False).
    assert graph.layers == {"Gather": {"int8": 2}, "MatMul": {low: 10, "int8": 2}}
    assert graph.details["group_size"] == group_size
    assert graph.details["ratio"] == 1.0
    assert "int8" in graph.details["group_size_fallback"]
    assert size_ratio(source, tmp_path / "q") <= 0.30


def test_four_bit_convolutions_fall_back_to_int8(sd1_openvino, tmp_path):
    source, spec = component(sd1_openvino, "unet")
    graph, _ = quantize(
        source, spec, tmp_path / "q", Precision.INT4, QuantMethod.WEIGHT_ONLY, group_size=32
    )
    assert graph.layers["Convolution"] == {"int8": 33}
    assert graph.layers["MatMul"]["int4"] >= 40
    assert layer_totals(graph.layers) == TINY_UNET_LAYERS


def test_ratio_keeps_a_share_of_layers_at_int8(sd1_openvino, tmp_path):
    source, spec = component(sd1_openvino, "unet")
    graph, _ = quantize(
        source,
        spec,
        tmp_path / "q",
        Precision.INT4,
        QuantMethod.WEIGHT_ONLY,
        group_size=32,
        ratio=0.5,
    )
    full, _ = quantize(
        source, spec, tmp_path / "full", Precision.INT4, QuantMethod.WEIGHT_ONLY, group_size=32
    )
    assert 0 < graph.layers["MatMul"]["int4"] < full.layers["MatMul"]["int4"]
    assert graph.details["ratio"] == 0.5


# ---- storage factors on a wider text encoder -------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "limit", "rtol", "low"),
    [
        (Precision.INT8, 0.30, INT8_WEIGHT_RTOL, "int8"),
        (Precision.INT4, 0.20, FOUR_BIT_RTOL, "int4"),
        (Precision.NF4, 0.20, FOUR_BIT_RTOL, "nf4"),
    ],
)
def test_wide_text_encoder_storage_factors(
    wide_text_encoder, tmp_path, precision, limit, rtol, low
):
    source, spec = wide_text_encoder
    group = {"group_size": 32} if precision is not Precision.INT8 else {}
    graph, _ = quantize(source, spec, tmp_path / "q", precision, QuantMethod.WEIGHT_ONLY, **group)
    assert size_ratio(source, tmp_path / "q") <= limit
    # NNCF keeps the last MatMul (and embeddings) at the int8 backup unless all_layers.
    assert graph.layers["MatMul"] == ({low: 12} if low == "int8" else {low: 11, "int8": 1})
    assert worst_relative_diff(source, tmp_path / "q", spec, graph) <= rtol


# ---- errors ---------------------------------------------------------------------------------


def test_unreadable_ir_is_one_line_naming_component_and_method(sd1_openvino, tmp_path):
    _, spec = component(sd1_openvino, "text_encoder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / ENTRY).write_text("<net>not an IR")
    with pytest.raises(ExportError, match="int8 weight-only quantization of text_encoder") as err:
        quantize(broken, spec, tmp_path / "q", Precision.INT8, QuantMethod.WEIGHT_ONLY)
    assert "\n" not in str(err.value)


def test_nncf_failure_becomes_export_error(sd1_openvino, tmp_path):
    source, spec = component(sd1_openvino, "unet")
    wrong = {name: value[..., :1] for name, value in feeds(spec).items()}  # bad shapes
    with pytest.raises(ExportError, match="int8 static quantization of unet failed") as err:
        quantize(source, spec, tmp_path / "q", Precision.INT8, QuantMethod.STATIC, [wrong])
    assert "\n" not in str(err.value)


def test_cells_outside_the_openvino_matrix_are_refused(sd1_openvino, tmp_path):
    source, spec = component(sd1_openvino, "unet")
    with pytest.raises(InvalidRequestError, match="no int8 dynamic"):
        quantize(source, spec, tmp_path / "a", Precision.INT8, QuantMethod.DYNAMIC)
    with pytest.raises(InvalidRequestError, match="onnx"):
        recipe = QuantRecipe("onnx", Precision.FP16, QuantMethod.CAST)
        quantize_openvino(source, ENTRY, spec, recipe, [], tmp_path, lambda _: None)
