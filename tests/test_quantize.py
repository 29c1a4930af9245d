"""`kiln.quantize()` end to end: calibration, manifest records, drift, selection, NaN guard.

The backends' own numerics are tested in test_quant_onnx.py, test_quant_openvino.py and
test_torch_runtime.py; here the flow around them is checked on tiny models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import assert_user_error, run_kiln

import kiln
from kiln.artifacts import read_manifest, verify_files
from kiln.bench.metrics import bleu, psnr, ssim
from kiln.models.tiny import save_pipeline
from kiln.models.tiny_captioning import save_model
from kiln.quant.calibration import synthetic_image

# Drift is recomputed here, independently of kiln.quant.drift, from the recorded workload.
# Both runs are deterministic on one machine, so they agree to rounding (3 decimals).
PSNR_AGREEMENT_DB = 0.01


@pytest.fixture(scope="module")
def sd_quantized(tiny_models, tmp_path_factory):
    """Tiny SD1 exported to OpenVINO, then bf16 and int8 (hybrid UNet) added by kiln."""
    out = tmp_path_factory.mktemp("quant") / "sd1"
    kiln.export(tiny_models["sd1"], out, targets=["openvino"])
    kiln.quantize(out, "bf16", calibration=4)
    kiln.quantize(out, "int8", calibration=4)
    return out


def test_quantized_variants_are_recorded_with_size_layers_and_drift(sd_quantized):
    manifest = read_manifest(sd_quantized)
    for precision in ("bf16", "int8"):
        for component in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
            variant = manifest.variant(f"{component}/openvino/{precision}")
            fp32 = manifest.variant(f"{component}/openvino/fp32")
            verify_files(sd_quantized, variant.files)
            assert variant.size_bytes < fp32.size_bytes
            recipe = variant.quantization
            assert recipe["source_variant"] == fp32.id
            assert recipe["layers"], "the manifest says which layers got what"
            drift = variant.drift
            assert 0 < drift["ssim"] <= 1 and drift["psnr"] > 10
            outputs = drift["component"]["outputs"]
            assert outputs and all(o["cosine"] > 0.9 for o in outputs.values())
    unet = manifest.variant("unet/openvino/int8")
    assert unet.quantization["method"] == "hybrid"
    assert unet.quantization["calibration_calls"] > 0


def test_recorded_image_drift_matches_an_independent_measurement(sd_quantized):
    manifest = read_manifest(sd_quantized)
    variant = manifest.variant("unet/openvino/int8")
    work = variant.drift["workload"]
    others = [f"{c}=openvino:fp32" for c in manifest.components if c != "unet"]
    fp32 = kiln.load(sd_quantized, require=["openvino:fp32"])
    quant = kiln.load(sd_quantized, require=[*others, variant.id], guard=False)
    references, images = [], []
    for index in work["held_out"]:
        options = {
            "steps": work["steps"],
            "width": work["width"],
            "height": work["height"],
            "seed": work["seeds"][index],
            "guidance_scale": work["guidance_scale"],
        }
        references.append(fp32.generate(work["prompts"][index], **options).image)
        images.append(quant.generate(work["prompts"][index], **options).image)
    mine = np.mean([min(psnr(a, b), 100.0) for a, b in zip(references, images, strict=True)])
    assert abs(mine - variant.drift["psnr"]) < PSNR_AGREEMENT_DB
    mine_ssim = np.mean([ssim(a, b) for a, b in zip(references, images, strict=True)])
    assert abs(mine_ssim - variant.drift["ssim"]) < 1e-4


def test_quantized_plan_generates_and_budget_keeps_variants_out(sd_quantized):
    deployment = kiln.load(sd_quantized, prefer=["openvino:int8"])
    assert {c.precision for c in deployment.plan.choices} == {"int8"}
    image = deployment.generate("a lighthouse", steps=3, seed=1, width=64, height=64).image
    assert np.asarray(image).std() > 0
    unet = read_manifest(sd_quantized).variant("unet/openvino/int8")
    strict = kiln.load(sd_quantized, drift_budget={"psnr": unet.drift["psnr"] + 1})
    chosen = {c.component: c.variant_id for c in strict.plan.choices}
    assert chosen["unet"] != "unet/openvino/int8"
    why = dict(next(c for c in strict.plan.choices if c.component == "unet").rejected)
    assert why["unet/openvino/int8"].startswith("drift psnr")


def test_inspect_shows_drift_and_why_a_variant_is_not_selected(sd_quantized, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sd_quantized, copy)
    manifest = read_manifest(copy)
    data = manifest.to_dict()
    for entry in data["variants"]:
        if entry["id"] == "unet/openvino/int8":
            entry["drift"]["psnr"] = 12.5
    (copy / "manifest.json").write_text(json.dumps(data))
    result = run_kiln("inspect", copy)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "psnr 12.5" in text
    assert "no: psnr 12.5 < budget 20" in text


def test_unmeasured_quantized_variant_is_not_auto_selected(sd_quantized, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sd_quantized, copy)
    data = read_manifest(copy).to_dict()
    for entry in data["variants"]:
        if entry["precision"] != "fp32":
            entry["drift"] = {"component": entry["drift"]["component"]}
    (copy / "manifest.json").write_text(json.dumps(data))
    plan = kiln.load(copy).plan
    assert {c.precision for c in plan.choices} == {"fp32"}


# ------------------------------------------------------------------------------- NaN guard


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory):
    """A tiny SD1 whose VAE decoder outputs ~1e6: finite in fp32, inf in fp16.

    The torch target runs fp16 kernels on the CPU; onnxruntime's CPU provider computes an
    fp16 Conv in fp32 and would not overflow.
    """
    import torch
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("overflow")
    model = save_pipeline("sd1", root / "model", seed=0)
    vae = AutoencoderKL.from_pretrained(model / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.weight.mul_(1e6)
        vae.decoder.conv_out.bias.mul_(1e6)
    vae.save_pretrained(model / "vae")
    out = root / "artifact"
    kiln.export(model, out, targets=["torch"], components=["text_encoder", "unet", "vae_decoder"])
    kiln.quantize(out, "fp16", targets=["torch"], components=["vae_decoder"], calibration=2)
    return out


# kiln.quantize measures the raw fp16 variant's drift: diffusers casts its NaN image to uint8.
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_nan_guard_reruns_overflowing_calls_at_fp32(overflowing, caplog):
    variant = read_manifest(overflowing).variant("vae_decoder/torch/fp16")
    assert variant.drift["component"]["non_finite_calls"] > 0, "the model really overflows"
    options = {"steps": 2, "seed": 3, "width": 64, "height": 64}
    fp32 = kiln.load(overflowing, require=["torch:fp32"]).generate("a cat", **options).image
    raw = kiln.load(overflowing, require=["vae_decoder=torch:fp16"], guard=False)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        guarded = kiln.load(overflowing, require=["vae_decoder=torch:fp16"])
        first = guarded.generate("a cat", **options).image
        second = guarded.generate("a cat", **options).image
    warnings = [r for r in caplog.records if "NaN/inf" in r.getMessage()]
    assert len(warnings) == 1, "warns once"
    assert "vae_decoder/torch/fp16" in warnings[0].getMessage()
    assert guarded.nan_fallbacks() == {"vae_decoder": 2}
    assert np.array_equal(np.asarray(first), np.asarray(fp32))
    assert np.array_equal(np.asarray(second), np.asarray(fp32))
    unguarded = raw.sessions["vae_decoder"].run(
        {"latent_sample": np.ones((1, 4, 8, 8), np.float32)}
    )
    assert not np.isfinite(unguarded["sample"]).all()


# ---------------------------------------------------------------------------------- BLIP


@pytest.fixture(scope="module")
def blip_quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip-quant")
    model = save_model("blip", root / "model", seed=0)
    out = root / "artifact"
    kiln.export(model, out, targets=["openvino"])
    kiln.quantize(out, "int8", calibration=4)
    return out


def test_caption_drift_is_recorded_and_reproducible(blip_quantized):
    manifest = read_manifest(blip_quantized)
    variant = manifest.variant("text_decoder/openvino/int8")
    work = variant.drift["workload"]
    assert work["kind"] == "caption"
    fp32 = kiln.load(blip_quantized, require=["openvino:fp32"])
    others = [f"{c}=openvino:fp32" for c in manifest.components if c != "text_decoder"]
    quant = kiln.load(blip_quantized, require=[*others, variant.id], guard=False)
    tokens = work["max_new_tokens"]
    images = [synthetic_image(i) for i in work["held_out"]]
    want = [fp32.caption([im], max_new_tokens=tokens).sequences[0] for im in images]
    got = [quant.caption([im], max_new_tokens=tokens).sequences[0] for im in images]
    exact = sum(a == b for a, b in zip(want, got, strict=True)) / len(want)
    assert variant.drift["exact_match"] == pytest.approx(exact)
    assert variant.drift["bleu"] == pytest.approx(bleu(got, want), abs=1e-4)
    result = kiln.load(blip_quantized, prefer=["openvino:int8"], drift_budget={}).caption(
        images[:1]
    )
    assert result.captions[0][0] is not None


# ------------------------------------------------------------------------------- errors


def test_quantize_errors_are_one_line(sd_quantized, tmp_path):
    cases = [
        (("--precision", "int8", "--target", "tensorrt"), ("needs an NVIDIA GPU",)),
        (("--precision", "bf16", "--target", "onnx"), ("onnx:bf16", "CUDA")),
        (("--precision", "int9"), ("unknown precision 'int9'",)),
        (("--precision", "fp32"), ("fp32 is what `kiln export` writes",)),
        (("--precision", "int8", "--target", "onnx"), ("no fp32 onnx variant",)),
        (("--precision", "int8", "--component", "decoder"), ("no component 'decoder'",)),
        (("--precision", "int4", "--method", "static"), ("has no method 'static'",)),
        (("--precision", "int4", "--group-size", "48"), ("power of two",)),
        (("--precision", "int8", "--calibration", "0"), ("calibration count",)),
        (("--precision", "int8", "--steps", "1"), ("calibration steps must be 2..50",)),
        (("--precision", "int8", "--prompts", tmp_path / "nope.txt"), ("prompt file",)),
    ]
    for args, fragments in cases:
        assert_user_error(run_kiln("quantize", sd_quantized, *args), *fragments)
    assert_user_error(
        run_kiln("quantize", tmp_path / "missing", "--precision", "int8"), "does not exist"
    )


def test_a_failed_quantization_leaves_no_variant(sd_quantized, tmp_path, monkeypatch):
    import shutil

    from kiln.quant import runner

    copy = tmp_path / "copy"
    shutil.copytree(sd_quantized, copy)
    before = read_manifest(copy).variant_ids()

    def broken(*args, **kwargs):
        raise RuntimeError("simulated crash mid-quantization")

    monkeypatch.setattr(runner, "quantizer_for", lambda target: broken)
    with pytest.raises(RuntimeError):
        kiln.quantize(copy, "int4", components=["text_encoder"], calibration=1)
    assert read_manifest(copy).variant_ids() == before
    assert not (copy / "text_encoder" / "openvino-int4").exists()
    assert not [p for p in (copy / "text_encoder").iterdir() if p.name.startswith(".")]


def test_user_prompt_file_drives_calibration(sd_quantized, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(sd_quantized, copy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\nfirst prompt\n\nsecond prompt\n")
    manifest = kiln.quantize(
        copy,
        "fp16",
        targets=["openvino"],
        components=["text_encoder"],
        calibration=3,
        prompts=prompts,
    )
    work = manifest.variant("text_encoder/openvino/fp16").drift["workload"]
    assert work["prompts"] == ["first prompt", "second prompt", "first prompt"]
    assert work["held_out"] == [2]


def test_doctor_reports_cuda_only_cells(tmp_path):
    result = run_kiln("doctor", "--json")
    assert result.returncode == 0, result.stderr
    cells = {row["cell"]: row["status"] for row in json.loads(result.stdout)["quantization"]}
    assert cells["onnx:int8"] == "runs here"
    assert cells["openvino:int4"] == "runs here"
    for cuda_only in ("tensorrt:fp16", "tensorrt:int8", "onnx:bf16"):
        assert cells[cuda_only].startswith("needs an NVIDIA GPU"), cells[cuda_only]


@pytest.mark.slow
def test_export_with_precision_quantizes_in_one_go(tiny_models, tmp_path):
    out = tmp_path / "art"
    result = run_kiln(
        "export", tiny_models["sd1"], "-o", out, "--target", "openvino", "--precision", "bf16"
    )
    assert result.returncode == 0, result.stderr
    ids = set(read_manifest(out).variant_ids())
    assert {"unet/openvino/fp32", "unet/openvino/bf16", "vae_decoder/openvino/bf16"} <= ids
    assert Path(out / "unet" / "openvino-bf16" / "model.xml").is_file()


# ------------------------------------------------------- every cell that runs on this CPU

RUNNABLE_CELLS = [
    ("onnx", "fp16", None),
    ("onnx", "int8", "dynamic"),
    ("onnx", "int8", "weight-only"),
    ("onnx", "int8", "static"),
    ("onnx", "int4", None),
    ("onnx", "nf4", None),
    ("openvino", "fp16", None),
    ("openvino", "int8", "weight-only"),
    ("openvino", "int8", "static"),
    ("openvino", "int4", None),
    ("openvino", "nf4", None),
    ("torch", "fp16", None),
    ("torch", "bf16", None),
    ("torch", "int8", "weight-only"),
    ("torch", "int8", "dynamic"),
    ("torch", "int4", None),
    ("torch", "nf4", None),
]


@pytest.fixture(scope="module")
def three_targets(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("cells") / "sd1"
    kiln.export(
        tiny_models["sd1"],
        out,
        targets=["onnx", "openvino", "torch"],
        components=["text_encoder", "unet", "vae_decoder"],
    )
    return out


@pytest.mark.parametrize(("target", "precision", "method"), RUNNABLE_CELLS)
def test_every_runnable_cell_builds_runs_and_records_real_drift(
    three_targets, tmp_path, target, precision, method
):
    """Each cell on the text encoder and UNet: smaller, runs generate(), drift reproducible."""
    import shutil

    out = tmp_path / "artifact"
    shutil.copytree(three_targets, out)
    # Group 32 divides the tiny models' 32-wide layers (torch int4 takes 32, 64 or 128).
    group = 32 if precision in ("int4", "nf4") else None
    manifest = kiln.quantize(
        out,
        precision,
        targets=[target],
        components=["text_encoder", "unet"],
        method=method,
        group_size=group,
        calibration=2,
        steps=2,
    )
    for component in ("text_encoder", "unet"):
        variant = only_quantized(manifest, component, target, precision)
        fp32 = manifest.variant(f"{component}/{target}/fp32")
        assert variant.size_bytes < fp32.size_bytes, variant.id
        assert variant.quantization["method"] == (method or variant.quantization["method"])
    unet = only_quantized(manifest, "unet", target, precision)
    work = unet.drift["workload"]
    others = ["text_encoder", "vae_decoder"]
    quant = kiln.load(out, require=[*(f"{c}={target}:fp32" for c in others), unet.id], guard=False)
    fp32 = kiln.load(out, require=[f"{target}:fp32"])
    index = work["held_out"][0]
    options = {
        "steps": work["steps"],
        "width": work["width"],
        "height": work["height"],
        "seed": work["seeds"][index],
        "guidance_scale": work["guidance_scale"],
    }
    image = quant.generate(work["prompts"][index], **options).image
    reference = fp32.generate(work["prompts"][index], **options).image
    assert abs(min(psnr(image, reference), 100.0) - unet.drift["psnr"]) < PSNR_AGREEMENT_DB


def only_quantized(manifest, component, target, precision):
    (variant,) = [
        v
        for v in manifest.variants_of(component)
        if v.target == target and v.precision.value == precision
    ]
    return variant


def test_a_second_method_sits_beside_the_first(three_targets, tmp_path):
    import shutil

    out = tmp_path / "artifact"
    shutil.copytree(three_targets, out)
    for method in (None, "static"):
        manifest = kiln.quantize(
            out, "int8", targets=["onnx"], components=["text_encoder"], method=method, calibration=2
        )
    default, static = (manifest.variant(f"text_encoder/onnx/{p}") for p in ("int8", "int8-static"))
    assert (default.quantization["method"], static.quantization["method"]) == (
        "dynamic",
        "static",
    )
    assert (out / static.entry).is_file() and static.entry.startswith(
        "text_encoder/onnx-int8-static/"
    )
    for require, chosen in (
        ("text_encoder=onnx:int8-static", static.id),
        ("text_encoder/onnx/int8-static", static.id),
        ("text_encoder/onnx/int8", default.id),
    ):
        others = ["unet=onnx:fp32", "vae_decoder=onnx:fp32"]
        plan = kiln.load(out, require=[require, *others]).plan
        assert plan["text_encoder"].variant_id == chosen, require
    result = run_kiln("inspect", out)
    assert "int8-static" in result.stdout.replace("\n", "")
