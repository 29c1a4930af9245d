"""LoRAs fused at export (`kiln export --lora FILE[:SCALE]`), against diffusers' own
`load_lora_weights` + `fuse_lora(lora_scale=s)`: kohya and diffusers files, SD1, SD2 and XL."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_kiln
from lora_helpers import (
    PROMPT,
    SETTINGS,
    diffusers_image,
    diffusers_pipeline,
)

import kiln
from kiln.bench.metrics import psnr
from kiln.errors import ExportError, SourceError, UnsupportedModelError
from kiln.models.lora import LoraFile
from kiln.models.sources import load_source

pytest.importorskip("peft", reason="LoRA tests need the lora extra (PEFT)")

MIN_PSNR = 35.0


def _state(pipeline, name):
    return {k: v.detach().clone() for k, v in getattr(pipeline, name).state_dict().items()}


@pytest.mark.parametrize("preset", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("kind", ["a", "a-kohya"])
def test_fused_weights_equal_diffusers_fuse_lora(tiny_models, loras, preset, kind):
    model = load_source(tiny_models[preset])
    model.fuse_loras([LoraFile(loras[preset][kind], 0.8)])
    reference = diffusers_pipeline(tiny_models[preset], [(loras[preset]["a"], 0.8)])
    base = diffusers_pipeline(tiny_models[preset])
    names = ["unet", "text_encoder"] + (["text_encoder_2"] if preset == "sdxl" else [])
    for name in names:
        ours, want, before = (_state(p, name) for p in (model.pipeline, reference, base))
        assert ours.keys() == want.keys()
        worst = max((ours[k] - want[k]).abs().max().item() for k in ours)
        moved = max((want[k] - before[k]).abs().max().item() for k in want)
        assert worst < 1e-5 and moved > 1e-3, (name, worst, moved)
    record = model.source.to_dict()["loras"][0]
    assert record["scale"] == 0.8 and len(record["sha256"]) == 64
    assert record["format"] == ("kohya" if kind == "a-kohya" else "diffusers")
    assert set(record["components"]) == set(names)


@pytest.fixture(scope="module")
def fused_artifact(tiny_models, loras, tmp_path_factory):
    """Tiny SD1 with two LoRAs at different scales, one kohya and one diffusers file."""
    out = tmp_path_factory.mktemp("lora-artifact") / "sd1"
    specs = [f"{loras['sd1']['a-kohya']}:0.8", f"{loras['sd1']['b']}:-0.5"]
    result = run_kiln(
        "export", tiny_models["sd1"], "-o", out, *sum((["--lora", s] for s in specs), [])
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.slow
def test_two_loras_fused_at_export_givediffusers_image(tiny_models, loras, fused_artifact):
    settings = SETTINGS
    ours = kiln.load(fused_artifact).generate(PROMPT, **settings).image
    reference = diffusers_pipeline(
        tiny_models["sd1"], [(loras["sd1"]["a"], 0.8), (loras["sd1"]["b"], -0.5)]
    )
    want = diffusers_image(reference)
    again = kiln.load(fused_artifact).generate(PROMPT, **settings).image
    assert psnr(ours, want) >= MIN_PSNR
    assert np.array_equal(np.asarray(ours), np.asarray(again))  # deterministic
    unfused = diffusers_image(diffusers_pipeline(tiny_models["sd1"]))
    assert psnr(ours, unfused) < psnr(ours, want) - 3  # the LoRAs changed the picture


@pytest.mark.slow
def test_manifest_and_inspect_list_the_fused_loras(fused_artifact, loras):
    source = json.loads((fused_artifact / "manifest.json").read_text())["source"]
    assert [(x["file"], x["scale"]) for x in source["loras"]] == [
        ("a-kohya.safetensors", 0.8),
        ("pytorch_lora_weights.safetensors", -0.5),
    ]
    shown = run_kiln("inspect", fused_artifact)
    assert shown.returncode == 0, shown.stderr
    assert "LoRA fused: a-kohya.safetensors x 0.8 (kohya" in shown.stdout
    assert "x -0.5 (diffusers" in shown.stdout


@pytest.mark.slow
def test_exporting_another_lora_into_the_same_folder_is_refused(tiny_models, loras, fused_artifact):
    with pytest.raises(ExportError, match="other LoRAs"):
        kiln.export(tiny_models["sd1"], fused_artifact, loras=[str(loras["sd1"]["a"])])


def test_lora_refusals_are_one_line(tiny_models, loras, served_blip, tmp_path):
    pickle = tmp_path / "style.pt"
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, pickle)
    assert_user_error(
        run_kiln("export", tiny_models["sd1"], "-o", tmp_path / "out", "--lora", pickle),
        "is a pickle (.pt)",
    )
    assert not (tmp_path / "out").exists()
    with pytest.raises(UnsupportedModelError, match="does not fit this Stable Diffusion 1.x"):
        load_source(tiny_models["sd1"]).fuse_loras([LoraFile(loras["sdxl"]["a-kohya"])])
    stray = tmp_path / "stray.safetensors"
    from safetensors.torch import save_file

    save_file(
        {
            "lora_unet_nowhere_to_q.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_nowhere_to_q.lora_up.weight": torch.zeros(8, 4),
        },
        str(stray),
    )
    with pytest.raises(UnsupportedModelError, match="matches nothing|does not fit"):
        load_source(tiny_models["sd1"]).fuse_loras([LoraFile(stray)])
    with pytest.raises(SourceError, match="does not exist"):
        load_source(tiny_models["sd1"]).fuse_loras([LoraFile(tmp_path / "missing.safetensors")])
    with pytest.raises(ExportError, match="LoRAs are for Stable Diffusion"):
        kiln.export(served_blip["blip"].parent / "blip", tmp_path / "blip", loras=[str(stray)])


def test_lora_argument_takes_an_optional_scale():
    assert LoraFile.parse("style.safetensors") == LoraFile(Path("style.safetensors"))
    assert LoraFile.parse("dir/style.safetensors:0.7").scale == 0.7
    assert LoraFile.parse("c:/x/style.safetensors").scale == 1.0
