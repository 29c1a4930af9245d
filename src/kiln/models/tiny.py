"""Stable Diffusion pipelines with random weights, built from configs and saved as diffusers folders.

Tests and the demo use these to exercise the real loading, export and runtime code with no
network. The tiny presets (`TINY_PRESETS`) build and save in well under a second and take a
few MB on disk. The full-size presets (`sd15`, `sd21`, `sdxl-base`) use the published
architecture configs, so shapes, parameter counts and memory use match the real models, but the
weights are random and they generate noise.

Every preset uses a small byte-level BPE CLIP tokenizer written here (`vocab.json` and
`merges.txt` built from an embedded word list). Any text tokenizes, because all 256 bytes are in
the vocabulary. Its ids stay far below the real 49408-entry vocabulary, so it also drives the
full-size text encoders.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError, UnsupportedModelError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

__all__ = [
    "FULL_PRESETS",
    "MARKER_FILENAME",
    "PRESETS",
    "TINY_PRESETS",
    "Preset",
    "build_pipeline",
    "build_tokenizer",
    "get_preset",
    "read_marker",
    "save_pipeline",
    "write_tokenizer_files",
]

MARKER_FILENAME = "kiln_tiny.json"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"

# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

# Words the BPE merges are trained on. Every word here becomes one token; anything else falls
# back to shorter pieces, down to single bytes.
_WORDS = """
a an the of in on at by with and or to from for under over near into through
photo photograph picture image portrait painting drawing sketch illustration render
astronaut riding horse cat dog bird fish lion tiger fox wolf bear rabbit dragon robot
man woman girl boy child people person face eyes hair smile smiling wearing hat dress
suit armor knight wizard king queen
city street house castle tower bridge room interior window door table chair cup coffee
landscape mountain mountains lake river ocean sea beach forest tree trees flower flowers
garden field sky cloud clouds sun moon star stars space planet mars galaxy night day
sunset sunrise morning evening winter summer snow rain fog
red orange yellow green blue purple pink white black gold golden silver brown
light lighting dark bright soft glow neon shadow
cinematic realistic photorealistic detailed intricate sharp focus beautiful epic
dramatic vibrant colorful highly quality high resolution masterpiece best trending
artstation concept art digital oil canvas watercolor anime cartoon style studio
camera lens film vintage close up view wide angle shot
sitting standing walking running flying swimming holding looking
ultra hd very small large big little old young new
blurry ugly low deformed bad
circle square triangle background
"""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


@functools.lru_cache(maxsize=1)
def _bpe() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """Train BPE on `_WORDS` to completion: (vocab in id order, merges in rank order)."""
    words = [list(w) for w in dict.fromkeys(_WORDS.split())]
    for w in words:
        w[-1] += "</w>"
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for w in words:
            for pair in itertools.pairwise(w):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        words = [_merge_pair(w, best) if best[0] in w else w for w in words]
    chars = list(_bytes_to_unicode().values())
    # Same layout as OpenAI's CLIP vocabulary: bytes, bytes + "</w>", merges, special tokens.
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += [BOS_TOKEN, EOS_TOKEN]
    return tuple(vocab), tuple(merges)


def write_tokenizer_files(folder: str | Path) -> Path:
    """Write the local CLIP BPE `vocab.json` and `merges.txt` into `folder`; return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _bpe()
    (folder / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8"
    )
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def build_tokenizer(model_max_length: int = 77, pad_token: str = EOS_TOKEN) -> CLIPTokenizer:
    """A `CLIPTokenizer` loaded from freshly written `vocab.json`/`merges.txt` files."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="kiln-tok-") as tmp:
        write_tokenizer_files(tmp)
        tok = CLIPTokenizer.from_pretrained(
            tmp, model_max_length=model_max_length, pad_token=pad_token, local_files_only=True
        )
    # transformers 5 records where the files came from and saves it with the tokenizer.
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok.init_kwargs.pop(key, None)
    return tok


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclass(frozen=True)
class Preset:
    """One buildable architecture: component configs plus the pipeline that ties them."""

    name: str
    family: str  # "sd1" | "sd2" | "sdxl"
    pipeline_class: str
    tiny: bool
    description: str
    unet: Mapping[str, Any]
    vae: Mapping[str, Any]
    text_encoder: Mapping[str, Any]
    scheduler_class: str
    scheduler: Mapping[str, Any]
    tokenizer_max_length: int
    tokenizer_pad_token: str = EOS_TOKEN
    text_encoder_2: Mapping[str, Any] | None = None
    tokenizer_2_pad_token: str | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.get("latent_channels", 4))

    @property
    def latent_multiple(self) -> int:
        """Latent sides must be a multiple of this (one factor 2 per UNet down-sampling)."""
        return 2 ** (len(self.unet["block_out_channels"]) - 1)

    @property
    def image_multiple(self) -> int:
        """Image sides must be a multiple of this."""
        return self.vae_scale_factor * self.latent_multiple

    @property
    def default_image_size(self) -> int:
        """The side the pipeline generates when height/width are not given."""
        return int(self.unet["sample_size"]) * self.vae_scale_factor

    @property
    def text_hidden_sizes(self) -> tuple[int, ...]:
        sizes = [int(self.text_encoder["hidden_size"])]
        if self.text_encoder_2 is not None:
            sizes.append(int(self.text_encoder_2["hidden_size"]))
        return tuple(sizes)


_SCALED_LINEAR = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
_PNDM_SD1 = {**_SCALED_LINEAR, "skip_prk_steps": True, "set_alpha_to_one": False}
_DDIM_SD2 = {
    **_SCALED_LINEAR,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "prediction_type": "v_prediction",
}
_EULER_SDXL = {
    **_SCALED_LINEAR,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}

_SD1_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD1_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
_VAE_DOWN = ("DownEncoderBlock2D",) * 4
_VAE_UP = ("UpDecoderBlock2D",) * 4

# ---- tiny ----------------------------------------------------------------------------------

_TINY_MAX_LEN = 32
_TINY_VOCAB = 1100  # >= the local tokenizer's length (checked at build time)

_TINY_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": _VAE_DOWN,
    "up_block_types": _VAE_UP,
    "block_out_channels": (8, 16, 16, 16),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 128,
    "scaling_factor": 0.18215,
}

_TINY_TEXT = {
    "vocab_size": _TINY_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": _TINY_MAX_LEN,
    "hidden_act": "quick_gelu",
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
}

_TINY_SD1_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 32,
}

_TINY_SD2_UNET = {
    **_TINY_SD1_UNET,
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "upcast_attention": True,
}

_TINY_SDXL_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 32, 32),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 2),
    "attention_head_dim": (2, 2, 2),
    "use_linear_projection": True,
    "cross_attention_dim": 32 + 64,  # text_encoder + text_encoder_2 hidden sizes
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,  # 6 time ids + text_encoder_2 proj
    "norm_num_groups": 32,
}

_TINY_SDXL_TEXT_2 = {
    **_TINY_TEXT,
    "hidden_size": 64,
    "intermediate_size": 128,
    "hidden_act": "gelu",
    "projection_dim": 32,
}

# ---- full size (published configs) ----------------------------------------------------------

_FULL_MAX_LEN = 77

_SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": _SD1_DOWN,
    "up_block_types": _SD1_UP,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}

_SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": _VAE_DOWN,
    "up_block_types": _VAE_UP,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

_CLIP_L_TEXT = {  # openai/clip-vit-large-patch14 text tower (SD 1.x, SDXL text_encoder)
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": _FULL_MAX_LEN,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
    "layer_norm_eps": 1e-5,
    "initializer_range": 0.02,
    "initializer_factor": 1.0,
}

_SD21_UNET = {
    **_SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": (5, 10, 20, 20),
    "use_linear_projection": True,
    "upcast_attention": True,
}

_SD21_VAE = {**_SD15_VAE, "sample_size": 768}

_OPENCLIP_H_TEXT = {  # OpenCLIP ViT-H/14 text tower, last layer dropped (SD 2.x)
    **_CLIP_L_TEXT,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 23,
    "num_attention_heads": 16,
    "hidden_act": "gelu",
    "projection_dim": 512,
}

_SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}

_SDXL_VAE = {
    **_SD15_VAE,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}

_OPENCLIP_BIGG_TEXT = {  # OpenCLIP ViT-bigG/14 text tower (SDXL text_encoder_2)
    **_CLIP_L_TEXT,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}


def _preset(**kw: Any) -> Preset:
    for key in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        if kw.get(key) is not None:
            kw[key] = _frozen(kw[key])
    return Preset(**kw)


PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "sd1": _preset(
            name="sd1",
            family="sd1",
            pipeline_class="StableDiffusionPipeline",
            tiny=True,
            description="tiny SD 1.x-like text-to-image, epsilon prediction",
            unet=_TINY_SD1_UNET,
            vae=_TINY_VAE,
            text_encoder=_TINY_TEXT,
            scheduler_class="PNDMScheduler",
            scheduler=_PNDM_SD1,
            tokenizer_max_length=_TINY_MAX_LEN,
        ),
        "sd2": _preset(
            name="sd2",
            family="sd2",
            pipeline_class="StableDiffusionPipeline",
            tiny=True,
            description="tiny SD 2.x-like text-to-image, v-prediction, linear projections",
            unet=_TINY_SD2_UNET,
            vae=_TINY_VAE,
            text_encoder={**_TINY_TEXT, "hidden_act": "gelu"},
            scheduler_class="DDIMScheduler",
            scheduler=_DDIM_SD2,
            tokenizer_max_length=_TINY_MAX_LEN,
            tokenizer_pad_token="!",
        ),
        "sdxl": _preset(
            name="sdxl",
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            tiny=True,
            description="tiny SDXL-like text-to-image, two text encoders, text_time conditioning",
            unet=_TINY_SDXL_UNET,
            vae={**_TINY_VAE, "scaling_factor": 0.13025, "force_upcast": True},
            text_encoder=_TINY_TEXT,
            text_encoder_2=_TINY_SDXL_TEXT_2,
            scheduler_class="EulerDiscreteScheduler",
            scheduler=_EULER_SDXL,
            tokenizer_max_length=_TINY_MAX_LEN,
            tokenizer_2_pad_token="!",
        ),
        "sd1-inpaint": _preset(
            name="sd1-inpaint",
            family="sd1",
            pipeline_class="StableDiffusionInpaintPipeline",
            tiny=True,
            description="tiny SD 1.x-like inpainting (9-channel UNet input)",
            unet={**_TINY_SD1_UNET, "in_channels": 9},
            vae=_TINY_VAE,
            text_encoder=_TINY_TEXT,
            scheduler_class="PNDMScheduler",
            scheduler=_PNDM_SD1,
            tokenizer_max_length=_TINY_MAX_LEN,
        ),
        "sd15": _preset(
            name="sd15",
            family="sd1",
            pipeline_class="StableDiffusionPipeline",
            tiny=False,
            description="Stable Diffusion 1.5 architecture, random weights",
            unet=_SD15_UNET,
            vae=_SD15_VAE,
            text_encoder=_CLIP_L_TEXT,
            scheduler_class="PNDMScheduler",
            scheduler=_PNDM_SD1,
            tokenizer_max_length=_FULL_MAX_LEN,
        ),
        "sd21": _preset(
            name="sd21",
            family="sd2",
            pipeline_class="StableDiffusionPipeline",
            tiny=False,
            description="Stable Diffusion 2.1 (768-v) architecture, random weights",
            unet=_SD21_UNET,
            vae=_SD21_VAE,
            text_encoder=_OPENCLIP_H_TEXT,
            scheduler_class="DDIMScheduler",
            scheduler=_DDIM_SD2,
            tokenizer_max_length=_FULL_MAX_LEN,
            tokenizer_pad_token="!",
        ),
        "sdxl-base": _preset(
            name="sdxl-base",
            family="sdxl",
            pipeline_class="StableDiffusionXLPipeline",
            tiny=False,
            description="Stable Diffusion XL base 1.0 architecture, random weights",
            unet=_SDXL_UNET,
            vae=_SDXL_VAE,
            text_encoder=_CLIP_L_TEXT,
            text_encoder_2=_OPENCLIP_BIGG_TEXT,
            scheduler_class="EulerDiscreteScheduler",
            scheduler=_EULER_SDXL,
            tokenizer_max_length=_FULL_MAX_LEN,
            tokenizer_2_pad_token="!",
        ),
    }
)

TINY_PRESETS: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd1-inpaint")
FULL_PRESETS: tuple[str, ...] = ("sd15", "sd21", "sdxl-base")


def get_preset(preset: str) -> Preset:
    """The `Preset` named `preset`; `UnsupportedModelError` listing the valid names otherwise."""
    try:
        return PRESETS[preset]
    except (KeyError, TypeError):
        raise UnsupportedModelError(
            f"unknown random-weight preset {preset!r}; valid presets: {', '.join(PRESETS)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, component: str) -> Iterator[None]:
    """Seed torch for one component (independent of build order), build in fp32, and restore
    the caller's RNG and default dtype afterwards."""
    import torch

    dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(zlib.crc32(f"{seed}:{component}".encode()))
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(dtype)


def _text_config(cfg: Mapping[str, Any], tok: CLIPTokenizer) -> Any:
    from transformers import CLIPTextConfig

    if len(tok) > cfg["vocab_size"]:
        raise AssertionError(f"tokenizer has {len(tok)} tokens > vocab_size {cfg['vocab_size']}")
    if tok.model_max_length != cfg["max_position_embeddings"]:
        raise AssertionError("tokenizer model_max_length != text encoder max_position_embeddings")
    # The pooled output is read at the eos position, so the ids must be the tokenizer's.
    return CLIPTextConfig(
        **cfg,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _component_names(spec: Preset) -> tuple[str, ...]:
    names = ["tokenizer", "text_encoder"]
    if spec.text_encoder_2 is not None:
        names += ["tokenizer_2", "text_encoder_2"]
    names += ["unet", "vae", "scheduler"]
    return tuple(names)


def _build_component(spec: Preset, name: str, seed: int, tokenizers: dict[str, Any]) -> Any:
    """Build one pipeline component of `spec` (fp32, eval mode for modules)."""
    import diffusers
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name == "tokenizer":
        return build_tokenizer(spec.tokenizer_max_length, spec.tokenizer_pad_token)
    if name == "tokenizer_2":
        return build_tokenizer(spec.tokenizer_max_length, spec.tokenizer_2_pad_token or EOS_TOKEN)
    if name == "scheduler":
        return getattr(diffusers, spec.scheduler_class).from_config(dict(spec.scheduler))
    with _seeded(seed, name):
        module: torch.nn.Module
        if name == "unet":
            module = diffusers.UNet2DConditionModel(**spec.unet)
        elif name == "vae":
            module = diffusers.AutoencoderKL(**spec.vae)
        elif name in ("text_encoder", "text_encoder_2"):
            tok_name = name.replace("text_encoder", "tokenizer")
            tok = tokenizers.get(tok_name)
            if tok is None:
                tok = _build_component(spec, tok_name, seed, {})
            if name == "text_encoder":
                module = CLIPTextModel(_text_config(spec.text_encoder, tok))
            else:
                assert spec.text_encoder_2 is not None
                module = CLIPTextModelWithProjection(_text_config(spec.text_encoder_2, tok))
        else:
            raise ValueError(f"preset {spec.name} has no component {name!r}")
    return module.eval()


def _assemble(spec: Preset, components: Mapping[str, Any]) -> DiffusionPipeline:
    import diffusers

    cls = getattr(diffusers, spec.pipeline_class)
    extra: dict[str, Any]
    if spec.family == "sdxl":
        extra = {"force_zeros_for_empty_prompt": True, "add_watermarker": False}
    else:
        extra = {
            "safety_checker": None,
            "feature_extractor": None,
            "requires_safety_checker": False,
        }
    return cls(**components, **extra)


def build_pipeline(preset: str, seed: int = 0) -> DiffusionPipeline:
    """Build preset `preset` with random weights (deterministic in `seed`), fp32, eval mode."""
    spec = get_preset(preset)
    components: dict[str, Any] = {}
    for name in _component_names(spec):
        components[name] = _build_component(spec, name, seed, components)
    return _assemble(spec, components)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


_LIGHT_COMPONENTS = ("tokenizer", "tokenizer_2", "scheduler")


def _save_streaming(spec: Preset, folder: Path, seed: int) -> None:
    """Save a full-size preset one component at a time, so only one large module is alive."""
    import torch

    names = _component_names(spec)
    light = {n: _build_component(spec, n, seed, {}) for n in names if n in _LIGHT_COMPONENTS}
    # model_index.json comes from diffusers itself, via a pipeline of weightless meta modules.
    skeleton = dict(light)
    with torch.device("meta"):
        for name in names:
            if name not in light:
                skeleton[name] = _build_component(spec, name, seed, light)
    _assemble(spec, skeleton).save_config(folder)
    del skeleton
    for name in names:
        if name in light:
            light[name].save_pretrained(folder / name)
        else:
            module = _build_component(spec, name, seed, light)
            # One file per component like the published folders; safetensors writes straight
            # from the tensors' memory, so a large shard costs no extra RAM.
            module.save_pretrained(folder / name, safe_serialization=True, max_shard_size="20GB")
            del module


def read_marker(folder: str | Path) -> dict[str, Any] | None:
    """The `kiln_tiny.json` marker of a saved random-weight pipeline, or None if absent."""
    path = Path(folder) / MARKER_FILENAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _write_marker(folder: Path, spec: Preset, seed: int) -> None:
    import diffusers
    import transformers

    marker = {
        "preset": spec.name,
        "seed": seed,
        "random_weights": True,
        "tiny": spec.tiny,
        "pipeline_class": spec.pipeline_class,
        "family": spec.family,
        "vae_scale_factor": spec.vae_scale_factor,
        "latent_multiple": spec.latent_multiple,
        "diffusers_version": diffusers.__version__,
        "transformers_version": transformers.__version__,
        "note": "Random weights built by kiln.models.tiny: outputs are noise, not images.",
    }
    (folder / MARKER_FILENAME).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _install(tmp: Path, out: Path) -> None:
    """Move the finished `tmp` folder to `out`, replacing an empty or kiln-made folder."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def save_pipeline(preset: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build preset `preset` and save it as a diffusers folder at `out_dir` (atomically).

    `out_dir` may be absent, empty, or an earlier random-weight folder (which is replaced);
    any other existing path is refused. Returns `out_dir`.
    """
    spec = get_preset(preset)
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or read_marker(out))):
        raise KilnError(f"{out} exists and is not a kiln random-weight model; not overwriting it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        if spec.tiny:
            pipe = build_pipeline(preset, seed)
            pipe.save_pretrained(tmp, safe_serialization=True)
            del pipe
        else:
            _save_streaming(spec, tmp, seed)
        # transformers 5 saves only tokenizer.json; keep the classic files for 4.x loaders.
        for name in ("tokenizer", "tokenizer_2"):
            if (tmp / name).is_dir():
                write_tokenizer_files(tmp / name)
        _write_marker(tmp, spec, seed)
        tmp.chmod(0o755)
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
