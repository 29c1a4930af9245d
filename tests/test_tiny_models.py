"""Random-weight Stable Diffusion presets: build, save, load back with diffusers, run."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from kiln.errors import KilnError, UnsupportedModelError
from kiln.models import tiny

PIPELINE_CLASSES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd1-inpaint": "StableDiffusionInpaintPipeline",
}
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {p: tiny.save_pipeline(p, root / p, seed=0) for p in tiny.TINY_PRESETS}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.rglob("*.safetensors")):
        rel = f.relative_to(folder).parent.as_posix()
        out.update({f"{rel}/{k}": v for k, v in load_file(f).items()})
    return out


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_preset_tables() -> None:
    assert tiny.TINY_PRESETS == ("sd1", "sd2", "sdxl", "sd1-inpaint")
    assert set(tiny.TINY_PRESETS) | set(tiny.FULL_PRESETS) == set(tiny.PRESETS)
    for name in tiny.TINY_PRESETS:
        spec = tiny.PRESETS[name]
        assert spec.tiny and spec.vae_scale_factor == 8 and spec.latent_channels == 4
        assert spec.text_encoder["max_position_embeddings"] == spec.tokenizer_max_length
    xl = tiny.PRESETS["sdxl"].unet
    te2 = tiny.PRESETS["sdxl"].text_encoder_2
    assert te2 is not None
    assert xl["cross_attention_dim"] == sum(tiny.PRESETS["sdxl"].text_hidden_sizes)
    assert (
        xl["projection_class_embeddings_input_dim"]
        == 6 * xl["addition_time_embed_dim"] + te2["projection_dim"]
    )
    full = tiny.PRESETS["sdxl-base"]
    assert full.unet["projection_class_embeddings_input_dim"] == 2816
    assert full.unet["cross_attention_dim"] == sum(full.text_hidden_sizes) == 2048


def test_unknown_preset_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="sd1-inpaint"):
        tiny.build_pipeline("sd9")
    with pytest.raises(UnsupportedModelError):
        tiny.save_pipeline("nope", tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("preset", tiny.TINY_PRESETS)
def test_saved_folder_loads_and_runs(preset: str, saved: dict[str, Path]) -> None:
    import diffusers

    folder = saved[preset]
    assert _folder_bytes(folder) < 5 * 1024 * 1024
    marker = tiny.read_marker(folder)
    assert marker is not None
    assert marker["preset"] == preset and marker["random_weights"] is True
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASSES[preset]
    assert not list(folder.parent.glob(".*partial"))

    cls = getattr(diffusers, PIPELINE_CLASSES[preset])
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    spec = tiny.PRESETS[preset]
    assert pipe.vae_scale_factor == spec.vae_scale_factor
    assert pipe.tokenizer.model_max_length == spec.tokenizer_max_length

    kwargs: dict[str, object] = {}
    if preset == "sd1-inpaint":
        from PIL import Image

        kwargs["image"] = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
        mask = np.zeros((64, 64), np.uint8)
        mask[16:48, 16:48] = 255
        kwargs["mask_image"] = Image.fromarray(mask)
    result = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    images = result.images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all()


@pytest.mark.parametrize("preset", tiny.TINY_PRESETS)
def test_same_seed_same_weights(preset: str, saved: dict[str, Path], tmp_path: Path) -> None:
    again = _weights(tiny.save_pipeline(preset, tmp_path / "again", seed=0))
    first = _weights(saved[preset])
    assert again.keys() == first.keys() and first
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = _weights(tiny.save_pipeline(preset, tmp_path / "other", seed=1))
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_build_matches_saved_and_is_eval_fp32(saved: dict[str, Path]) -> None:
    pipe = tiny.build_pipeline("sd1", seed=0)
    state = pipe.unet.state_dict()
    on_disk = load_file(saved["sd1"] / "unet" / "diffusion_pytorch_model.safetensors")
    assert state.keys() == on_disk.keys()
    assert all(torch.equal(state[k], on_disk[k]) for k in state)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert not module.training
        assert all(p.dtype == torch.float32 for p in module.parameters())


def test_building_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny.build_pipeline("sd1", seed=5)
    assert torch.equal(torch.rand(3), expected)


def test_streaming_save_equals_in_memory_save(saved: dict[str, Path], tmp_path: Path) -> None:
    """The one-component-at-a-time path used for full-size presets writes the same folder."""
    tiny._save_streaming(tiny.PRESETS["sdxl"], tmp_path, seed=0)
    ref = saved["sdxl"]
    assert json.loads((tmp_path / "model_index.json").read_text()) == json.loads(
        (ref / "model_index.json").read_text()
    )
    a, b = _weights(tmp_path), _weights(ref)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_round_trip(saved: dict[str, Path]) -> None:
    from transformers import CLIPTokenizer

    folder = saved["sdxl"]
    for sub, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        files = {p.name for p in (folder / sub).iterdir()}
        assert {"vocab.json", "merges.txt"} <= files
        tok = CLIPTokenizer.from_pretrained(folder / sub, local_files_only=True)
        assert tok.model_max_length == tiny.PRESETS["sdxl"].tokenizer_max_length
        assert tok.pad_token == pad
        ids = tok(PROMPT, padding="max_length", max_length=tok.model_max_length).input_ids
        assert len(ids) == tok.model_max_length
        # Every prompt word is one token: bos + 8 words + eos, then padding.
        assert ids[0] == tok.bos_token_id and ids[9] == tok.eos_token_id
        assert tok.unk_token_id not in ids[1:9]

        weird = "a zyxwvq ünïcödé 🐴 horse"
        enc = tok(weird, padding="max_length", max_length=tok.model_max_length, truncation=True)
        assert len(enc.input_ids) == tok.model_max_length
        body = enc.input_ids[1 : enc.input_ids.index(tok.eos_token_id)]
        assert tok.decode(body) == weird  # byte-level fallback loses nothing
        assert max(enc.input_ids) < len(tok) <= tiny.PRESETS["sdxl"].text_encoder["vocab_size"]

        long = tok(" ".join(["horse"] * 100), padding="max_length", truncation=True)
        assert len(long.input_ids) == tok.model_max_length


def test_tokenizer_files_are_classic_clip_layout(tmp_path: Path) -> None:
    tiny.write_tokenizer_files(tmp_path)
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert 200 <= len(merges) - 1 <= 1000
    assert len(vocab) == 512 + len(merges) - 1 + 2
    assert vocab["<|endoftext|>"] == len(vocab) - 1
    assert vocab["!"] == 0 and vocab["a</w>"] == 256 + vocab["a"]


def test_save_refuses_foreign_folder_and_replaces_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(KilnError, match="not overwriting"):
        tiny.save_pipeline("sd1", foreign)
    assert (foreign / "keep.txt").read_text() == "mine"

    own = tiny.save_pipeline("sd1", tmp_path / "own", seed=0)
    tiny.save_pipeline("sd2", own, seed=0)
    marker = tiny.read_marker(own)
    assert marker is not None and marker["preset"] == "sd2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "own"]


def test_full_size_configs_on_meta_device() -> None:
    """Published architectures, counted without allocating weights."""
    import diffusers

    expected_unet = {"sd15": 859_520_964, "sd21": 865_910_724, "sdxl-base": 2_567_463_684}
    for name, count in expected_unet.items():
        spec = tiny.PRESETS[name]
        assert not spec.tiny and spec.tokenizer_max_length == 77
        assert spec.vae_scale_factor == 8
        with torch.device("meta"):
            unet = diffusers.UNet2DConditionModel(**spec.unet)
        assert sum(p.numel() for p in unet.parameters()) == count
    assert tiny.PRESETS["sd21"].scheduler["prediction_type"] == "v_prediction"


@pytest.mark.slow
def test_sd15_full_size_build() -> None:
    pipe = tiny.build_pipeline("sd15", seed=0)
    count = {
        name: sum(p.numel() for p in getattr(pipe, name).parameters())
        for name in ("unet", "vae", "text_encoder")
    }
    assert count == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert pipe.tokenizer.model_max_length == 77
    with torch.no_grad():
        ids = pipe.tokenizer(PROMPT, padding="max_length", return_tensors="pt").input_ids
        hidden = pipe.text_encoder(ids)[0]
    assert hidden.shape == (1, 77, 768) and torch.isfinite(hidden).all()
