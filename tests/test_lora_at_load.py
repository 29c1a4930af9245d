"""LoRAs and textual-inversion embeddings switched on at load, without re-export, against
diffusers' own `load_lora_weights` + `fuse_lora(lora_scale=s)` and `load_textual_inversion`."""

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_kiln
from lora_helpers import PROMPT, SETTINGS, diffusers_image, diffusers_pipeline

import kiln
from kiln.artifacts import SUPPORT_DIR, read_manifest
from kiln.bench.metrics import psnr
from kiln.errors import InvalidRequestError, SourceError, UnsupportedModelError
from kiln.models.sources import load_source

pytest.importorskip("peft", reason="LoRA tests need the lora extra (PEFT)")
pytest.importorskip("openvino")

MIN_PSNR = 35.0
RUNTIMES = ["onnx", "openvino"]


@pytest.fixture(scope="module")
def reference_images(tiny_models, loras):
    """diffusers' image per preset and tuple of (LoRA kind, scale), made once."""
    made = {}

    def image(preset, *fused):
        key = (preset, fused)
        if key not in made:
            files = [(loras[preset][kind], scale) for kind, scale in fused]
            made[key] = diffusers_image(diffusers_pipeline(tiny_models[preset], files))
        return made[key]

    return image


def _generate(deployment, prompt=PROMPT):
    return deployment.generate(prompt, **SETTINGS).image


def test_export_maps_every_lora_weight_to_its_graph_weight(both_targets, tiny_models):
    from diffusers import DiffusionPipeline

    from kiln.exporters.weight_map import WeightMap

    pipeline = DiffusionPipeline.from_pretrained(tiny_models["sd1"])
    manifest = read_manifest(both_targets)
    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    for component in ("unet", "text_encoder"):
        module = getattr(pipeline, component)
        wanted = {f"{n}.weight" for n, layer in module.named_modules() if isinstance(layer, kinds)}
        for target in RUNTIMES:
            variant = manifest.variant(f"{component}/{target}/fp32")
            entry = next(f for f in variant.files if f.path.endswith("/weights.json"))
            mapped = WeightMap.read(both_targets / entry.path)
            assert set(mapped.weights) == wanted, (component, target)
            if component == "text_encoder":
                assert mapped.input_embeddings == "embeddings.token_embedding.weight"
    vae = manifest.variant("vae_decoder/onnx/fp32")
    assert not any(f.path.endswith("weights.json") for f in vae.files)
    shown = run_kiln("inspect", both_targets)
    assert "LoRAs at load (weight map recorded): text_encoder/onnx/fp32" in shown.stdout


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("kind", ["a", "a-kohya"])
def test_lora_at_load_gives_diffusers_image(both_targets, loras, reference_images, runtime, kind):
    lora = loras["sd1"][kind]
    deployment = kiln.load(both_targets, require=f"{runtime}:fp32", loras={str(lora): 0.8})
    ours = _generate(deployment)
    want = reference_images("sd1", ("a", 0.8))
    assert psnr(ours, want) >= MIN_PSNR
    assert psnr(ours, reference_images("sd1")) < psnr(ours, want) - 3  # the LoRA shows


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_lora_at_load_changes_each_component_as_fuse_lora_does(
    both_targets, tiny_models, loras, runtime
):
    from kiln.models.lora import LoraFile

    fused = load_source(tiny_models["sd1"])
    fused.fuse_loras([LoraFile(loras["sd1"]["a"], 0.8)])
    deployment = kiln.load(both_targets, require=f"{runtime}:fp32")
    for component in ("unet", "text_encoder"):
        spec = fused.specs()[component]
        sample = spec.sample_inputs(spec.parity_sizes())
        with torch.no_grad():
            want = fused.export_module(component)(*sample.values())
        want = (want[0] if isinstance(want, tuple) else want).numpy()
        arrays = {k: v.numpy() for k, v in sample.items()}
        deployment.set_loras(None)
        base = next(iter(deployment.session(component).run(arrays).values()))
        deployment.set_loras([f"{loras['sd1']['a']}:0.8"])
        ours = next(iter(deployment.session(component).run(arrays).values()))
        assert np.abs(ours - want).max() < 1e-4, component
        assert np.abs(want - base).max() > 1e-2, component


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_two_loras_then_switching_back_restores_the_base_exactly(
    both_targets, loras, reference_images, runtime
):
    deployment = kiln.load(both_targets, require=f"{runtime}:fp32")
    base = np.asarray(_generate(deployment))
    a, b = str(loras["sd1"]["a"]), str(loras["sd1"]["b"])
    deployment.set_loras({a: 0.8, b: -0.5})
    both = _generate(deployment)
    assert psnr(both, reference_images("sd1", ("a", 0.8), ("b", -0.5))) >= MIN_PSNR
    deployment.set_loras({b: 1.0})
    assert psnr(_generate(deployment), reference_images("sd1", ("b", 1.0))) >= MIN_PSNR
    deployment.set_loras(None)
    assert deployment.loras == ()
    assert np.array_equal(np.asarray(_generate(deployment)), base)


@pytest.mark.slow  # 33 s; the default run stays under 30 min
def test_cast_variants_take_loras_and_int8_refuses(both_targets, loras, reference_images, tmp_path):
    copy = tmp_path / "sd1"
    shutil.copytree(both_targets, copy)
    kiln.quantize(copy, "fp16", components=["unet"], targets=["onnx", "openvino"])
    kiln.quantize(copy, "int8", components=["unet"], targets=["onnx"], method="dynamic")
    lora = {str(loras["sd1"]["a"]): 0.8}
    want = reference_images("sd1", ("a", 0.8))
    for variant in ("onnx:fp16", "openvino:fp16"):
        deployment = kiln.load(copy, require=f"unet={variant}", loras=lora)
        assert psnr(_generate(deployment), want) >= MIN_PSNR, variant
    planned = kiln.load(copy, require="onnx", loras=lora).plan["unet"]
    assert planned.precision in ("fp32", "fp16")
    assert ("unet/onnx/int8", "int8 weights cannot take LoRAs at load") in planned.rejected
    with pytest.raises(InvalidRequestError, match="int8 weights cannot take a LoRA"):
        kiln.load(copy, require="unet=onnx:int8", loras=lora)
    result = run_kiln(
        "generate", copy, PROMPT, "-o", tmp_path / "x.png", "--steps", "2",
        "--require", "unet=onnx:int8", "--lora", f"{loras['sd1']['a']}:0.8",
    )  # fmt: skip
    assert_user_error(result, "unet runs unet/onnx/int8", "fuse it at export")
    assert not (tmp_path / "x.png").exists()


def _embedding(path, width, seed=0):
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    save_file({"emb_params": torch.randn(2, width, generator=generator) * 0.5}, str(path))
    return path


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_textual_inversion_token_gives_diffusers_image(
    both_targets, tiny_models, tmp_path, runtime
):
    config = both_targets / SUPPORT_DIR / "text_encoder" / "config.json"
    width = json.loads(config.read_text())["hidden_size"]
    embedding = _embedding(tmp_path / "kilnstyle.safetensors", width)
    prompt = "a kilnstyle cube"
    deployment = kiln.load(both_targets, require=f"{runtime}:fp32", embeddings=[embedding])
    ours = _generate(deployment, prompt)
    pipeline = diffusers_pipeline(tiny_models["sd1"])
    plain = diffusers_image(pipeline, prompt)
    pipeline.load_textual_inversion(str(embedding), token="kilnstyle")
    want = diffusers_image(pipeline, prompt)
    assert psnr(ours, want) >= MIN_PSNR
    assert psnr(ours, plain) < psnr(ours, want) - 3
    deployment.unload_textual_inversion()
    assert psnr(_generate(deployment, prompt), plain) >= MIN_PSNR


@pytest.mark.slow  # 33 s; the default run stays under 30 min
def test_generate_cli_switches_a_lora_on_and_refuses_bad_ones(
    both_targets, loras, reference_images, tmp_path
):
    from PIL import Image

    out = tmp_path / "lora.png"
    flags = ["--steps", "4", "--width", "64", "--height", "64", "--seed", "3", "--guidance", "6"]
    result = run_kiln(
        "generate", both_targets, PROMPT, "-o", out, *flags, "--lora", f"{loras['sd1']['a']}:0.8"
    )
    assert result.returncode == 0, result.stderr
    assert "LoRA" in result.stdout
    assert psnr(Image.open(out), reference_images("sd1", ("a", 0.8))) >= MIN_PSNR
    pickle = tmp_path / "style.ckpt"
    torch.save({"x": torch.zeros(1)}, pickle)
    assert_user_error(
        run_kiln("generate", both_targets, PROMPT, "-o", tmp_path / "p.png", "--lora", pickle),
        "is a pickle (.ckpt)",
    )
    assert_user_error(
        run_kiln(
            "generate",
            both_targets,
            PROMPT,
            "-o",
            tmp_path / "p.png",
            "--lora",
            loras["sdxl"]["a-kohya"],
        ),  # fmt: skip
        "does not fit this model's",
    )
    assert not (tmp_path / "p.png").exists()


def test_lora_at_load_refusals(both_targets, loras, served_blip, tmp_path):
    from safetensors.torch import save_file

    stray = tmp_path / "stray.safetensors"
    save_file(
        {
            "lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 4),
        },
        str(stray),
    )
    deployment = kiln.load(both_targets, require="onnx:fp32")
    with pytest.raises(UnsupportedModelError, match="matches nothing|does not fit"):
        deployment.set_loras([str(stray)])
    with pytest.raises(SourceError, match="does not exist"):
        deployment.set_loras([str(tmp_path / "missing.safetensors")])
    with pytest.raises(UnsupportedModelError, match="another model"):
        deployment.load_textual_inversion(_embedding(tmp_path / "wide.safetensors", 7))
    assert deployment.loras == () and deployment.weight_switch.embeddings == ()
    with pytest.raises(InvalidRequestError, match="LoRAs and embeddings are for Stable Diffusion"):
        kiln.load(served_blip["blip"], loras=[str(loras["sd1"]["a"])])


def test_prompt_tags_name_loras_in_the_folder(tmp_path):
    from kiln.serve.loras import LoraLibrary

    (tmp_path / "styles").mkdir()
    for name in ("style", "styles/ink"):
        (tmp_path / f"{name}.safetensors").write_bytes(b"")
    library = LoraLibrary(tmp_path)
    prompt, chosen = library.take_tags("a cube <lora:style:0.8>, <lora:ink> <LORA:style:0.2>")
    assert prompt == "a cube"
    assert chosen == {
        str(tmp_path / "style.safetensors"): 1.0,
        str(tmp_path / "styles/ink.safetensors"): 1.0,
    }
    assert library.take_tags(["a <lora:ink:0.5>", "b <lora:ink:0.5>"])[0] == ["a", "b"]
    assert library.take_tags("no tags") == ("no tags", {})
    for text, fragment in (
        ("<lora:nope>", "no LoRA named 'nope'"),
        ("<lora:ink:lots>", "must be a number"),
        ("<lora:ink:1:0.5>", "give one multiplier"),
    ):
        with pytest.raises(InvalidRequestError, match=fragment):
            library.take_tags(text)
    with pytest.raises(InvalidRequestError, match="same <lora"):
        library.take_tags(["a <lora:ink>", "b"])
    with pytest.raises(InvalidRequestError, match="no --lora-dir"):
        LoraLibrary(None).take_tags("a <lora:ink>")


def test_torch_variants_switch_loras_in_place(tiny_models, loras, reference_images, tmp_path):
    out = tmp_path / "sd1-torch"
    kiln.export(tiny_models["sd1"], out, targets=["torch"])
    deployment = kiln.load(out, require="torch:fp32")
    base = np.asarray(_generate(deployment))
    deployment.set_loras({str(loras["sd1"]["a-kohya"]): 0.8})
    assert psnr(_generate(deployment), reference_images("sd1", ("a", 0.8))) >= MIN_PSNR
    deployment.set_loras(None)
    assert np.array_equal(np.asarray(_generate(deployment)), base)


def test_bench_measures_with_the_lora_switched_on(both_targets, loras, tmp_path):
    from kiln.bench.harness import run_bench
    from kiln.bench.schema import validation_errors
    from kiln.bench.workload import build_workload

    workload = build_workload(
        64, steps=[2], repeats=1, warmup=1, loras=[f"{loras['sd1']['a']}:0.8"]
    )
    report = run_bench(both_targets, variants=["onnx:fp32"], baselines=["torch"], workload=workload)
    assert validation_errors(report) == []
    assert report["workload"]["loras"] == [[str(loras["sd1"]["a"].resolve()), 0.8]]
    for variant in report["variants"]:
        assert variant["status"] == "ok", variant["reason"]
        assert variant["figures"]["lora_switch_s"]["value"] > 0
    onnx = next(v for v in report["variants"] if v["id"] == "onnx:fp32")
    assert onnx["cases"][0]["figures"]["drift_psnr_db"]["value"] >= MIN_PSNR


@pytest.fixture(scope="module")
def sd2_and_xl(tiny_models, tmp_path_factory):
    out = {}
    for preset in ("sd2", "sdxl"):
        out[preset] = tmp_path_factory.mktemp(f"at-load-{preset}") / preset
        kiln.export(tiny_models[preset], out[preset], targets=RUNTIMES)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sd2", "sdxl"])
def test_sd2_and_xl_loras_at_load_give_diffusers_image(sd2_and_xl, loras, reference_images, preset):
    want = reference_images(preset, ("a", 0.8))
    for runtime in RUNTIMES:
        deployment = kiln.load(sd2_and_xl[preset], require=f"{runtime}:fp32")
        base = np.asarray(_generate(deployment))
        for kind in ("a", "a-kohya"):
            deployment.set_loras({str(loras[preset][kind]): 0.8})
            ours = _generate(deployment)
            assert psnr(ours, want) >= MIN_PSNR, (runtime, kind)
            assert psnr(ours, reference_images(preset)) < psnr(ours, want) - 3
        deployment.set_loras(None)
        assert np.array_equal(np.asarray(_generate(deployment)), base), runtime


@pytest.mark.slow
def test_xl_textual_inversion_fills_both_token_tables(sd2_and_xl, tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    support = sd2_and_xl["sdxl"] / SUPPORT_DIR
    widths = {
        key: json.loads((support / name / "config.json").read_text())["hidden_size"]
        for key, name in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"))
    }
    generator = torch.Generator().manual_seed(1)
    path = tmp_path / "kilnstyle.safetensors"
    save_file(
        {k: torch.randn(2, w, generator=generator) * 0.5 for k, w in widths.items()}, str(path)
    )
    prompt = "a kilnstyle cube"
    ours = _generate(kiln.load(sd2_and_xl["sdxl"], embeddings=[path]), prompt)
    pipeline = diffusers_pipeline(tiny_models["sdxl"])
    plain = diffusers_image(pipeline, prompt)
    state = load_file(str(path))
    for key, encoder, tokenizer in (
        ("clip_l", pipeline.text_encoder, pipeline.tokenizer),
        ("clip_g", pipeline.text_encoder_2, pipeline.tokenizer_2),
    ):
        pipeline.load_textual_inversion(
            state[key], token="kilnstyle", text_encoder=encoder, tokenizer=tokenizer
        )
    want = diffusers_image(pipeline, prompt)
    assert psnr(ours, want) >= MIN_PSNR
    assert psnr(ours, plain) < psnr(ours, want) - 3
