"""Single-file (A1111 / LDM layout) checkpoints: detection, loading, and the user errors.

A tiny random SD1 pipeline is saved twice: as a diffusers folder (the `--config` users
pass) and, through `ldm_layout.save_ldm_checkpoint`, as one LDM-layout `.safetensors` file.
Nothing here touches the model hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from ldm_layout import save_ldm_checkpoint
from safetensors.torch import save_file

from kiln.errors import SourceError, UnsupportedModelError
from kiln.models.single_file import (
    content_hash,
    detect_checkpoint_type,
    load_single_file_pipeline,
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No test here may reach the model hub, whatever the environment says."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer over single characters (plus two merges), written locally."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokens += ["th", "the</w>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16
    )
    tokenizer.save_pretrained(folder)


def _text_encoder_config(tokenizer, hidden: int, layers: int, **extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def _tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
    )


def _build_inline_sd1(tmp: Path, in_channels: int = 4):
    """Tiny SD1 (in_channels=9: SD1 inpainting) with every config and tokenizer local."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    _write_tiny_tokenizer(tmp / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tok")
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
    )
    cls = StableDiffusionPipeline if in_channels == 4 else StableDiffusionInpaintPipeline
    return cls(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(tokenizer, 32, 2)),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_inline_sdxl(tmp: Path):
    """Tiny SDXL base. diffusers tells SDXL by `conditioner.embedders.1...resblocks.9`, and
    picks which file encoder feeds which model by hidden size: so text_encoder_2 needs >= 10
    layers and a hidden size different from text_encoder's."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32 + 64,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 64,
        norm_num_groups=32,
    )
    _write_tiny_tokenizer(tmp / "tok")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tok")
    config_2 = _text_encoder_config(tokenizer, 64, 10, projection_dim=64)
    return StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(tokenizer, 32, 2)),
        text_encoder_2=CLIPTextModelWithProjection(config_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        ),
    )


def _save_config_and_checkpoint(pipe, folder: Path, save=None) -> Path:
    """Save `pipe`'s diffusers folder (configs only) and its LDM single file next to it."""
    (save or pipe.save_pretrained)(folder)
    # Users' --config folders hold configs and tokenizers only; without weights here a
    # component diffusers failed to take from the single file cannot silently load from disk.
    for weights in [*folder.rglob("*.safetensors"), *folder.rglob("*.bin")]:
        weights.unlink()
    return save_ldm_checkpoint(pipe, folder.parent / f"{folder.name}.safetensors")


def _assert_same_weights(original, loaded, names) -> None:
    for name in names:
        want = getattr(original, name).state_dict()
        got = getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            assert torch.equal(tensor, got[key]), f"{name}.{key}"


def _image(pipe):
    generator = torch.Generator().manual_seed(7)
    out = pipe(
        "the cat", num_inference_steps=2, height=32, width=32, generator=generator, output_type="np"
    )
    return out.images


def _tiny_or_inline(tmp: Path, preset: str, inline):
    """(pipeline, config folder, single file) from `kiln.models.tiny` if present, else inline."""
    folder = tmp / preset
    if importlib.util.find_spec("kiln.models.tiny") is None:
        pipe = inline(tmp)
        return pipe, folder, _save_config_and_checkpoint(pipe, folder)
    from kiln.models import tiny

    pipe = tiny.build_pipeline(preset)
    save = lambda out: tiny.save_pipeline(preset, out)  # noqa: E731
    return pipe, folder, _save_config_and_checkpoint(pipe, folder, save)


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return _tiny_or_inline(tmp_path_factory.mktemp("sd1"), "sd1", _build_inline_sd1)


@pytest.fixture(scope="module")
def sd1_inpaint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd1_inpaint")
    return _tiny_or_inline(tmp, "sd1-inpaint", lambda t: _build_inline_sd1(t, in_channels=9))


def test_detects_sd1(sd1):
    assert detect_checkpoint_type(sd1[2]) == "v1"


def test_loads_sd1_with_identical_weights_and_image(sd1):
    original, folder, checkpoint = sd1
    loaded = load_single_file_pipeline(checkpoint, config=folder)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    _assert_same_weights(original, loaded, ("unet", "vae", "text_encoder"))
    np.testing.assert_array_equal(_image(original), _image(loaded))


def test_loads_sd1_inpainting(sd1_inpaint):
    original, folder, checkpoint = sd1_inpaint
    assert detect_checkpoint_type(checkpoint) == "inpainting"
    loaded = load_single_file_pipeline(checkpoint, config=folder)
    assert type(loaded).__name__ == "StableDiffusionInpaintPipeline"
    _assert_same_weights(original, loaded, ("unet", "vae", "text_encoder"))


def test_loads_sdxl_with_identical_weights_and_image(tmp_path):
    # Always inline: a single file is only recognised as SDXL with >= 10 text_encoder_2 layers.
    original = _build_inline_sdxl(tmp_path)
    checkpoint = _save_config_and_checkpoint(original, tmp_path / "sdxl")
    assert detect_checkpoint_type(checkpoint) == "xl_base"
    loaded = load_single_file_pipeline(checkpoint, config=tmp_path / "sdxl")
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    _assert_same_weights(original, loaded, ("unet", "vae", "text_encoder", "text_encoder_2"))
    np.testing.assert_array_equal(_image(original), _image(loaded))


def test_config_of_another_architecture_is_a_source_error(sd1, sd1_inpaint):
    with pytest.raises(SourceError, match="same architecture") as info:
        load_single_file_pipeline(sd1[2], config=sd1_inpaint[1])
    assert "\n" not in str(info.value)


def test_without_config_offline_asks_for_config(sd1):
    with pytest.raises(SourceError) as info:
        load_single_file_pipeline(sd1[2])
    message = str(info.value)
    assert "--config" in message and "Stable Diffusion 1.x" in message
    assert "\n" not in message


def test_refuses_pickles(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(SourceError, match="unpickle"):
        detect_checkpoint_type(ckpt)
    with pytest.raises(SourceError, match=r"\.safetensors"):
        load_single_file_pipeline(ckpt)


def test_garbage_file_is_named(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(SourceError, match=r"x\.safetensors") as info:
        load_single_file_pipeline(bad)
    assert not isinstance(info.value, UnsupportedModelError)


def test_unrelated_keys_are_unsupported(tmp_path):
    other = tmp_path / "classifier.safetensors"
    save_file({"backbone.layer1.weight": torch.zeros(2, 2), "head.fc.bias": torch.zeros(2)}, other)
    with pytest.raises(UnsupportedModelError, match="backbone.layer1") as info:
        detect_checkpoint_type(other)
    assert "classifier.safetensors" in str(info.value)
    with pytest.raises(UnsupportedModelError):
        load_single_file_pipeline(other, config=tmp_path)


def test_content_hash_streams_sha256(tmp_path):
    import hashlib

    blob = os.urandom(1 << 20) * 3
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    assert content_hash(path) == hashlib.sha256(blob).hexdigest()
