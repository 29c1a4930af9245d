"""Stable Diffusion 1.x, 2.x and XL: architecture detection, component specs, export modules.

The export modules are thin wrappers that give each diffusers/transformers module a
tensor-in, tensor-out `forward` in the order its `ComponentSpec` names. The runtime
adapters (`kiln.runtimes.adapters`) undo this on the way back, so diffusers' pipelines see
the objects they expect.
"""

from __future__ import annotations

import enum
import gc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.artifacts import read_json
from kiln.errors import SourceError, UnsupportedModelError, first_line
from kiln.models.sources import LoadedModel, SourceInfo, free_weights
from kiln.models.spec import (
    DEFAULT_TOLERANCES,
    ComponentSpec,
    Dim,
    DType,
    Precision,
    TensorSpec,
    Tolerance,
)

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from kiln.models.lora import LoraFile

FAMILY = "stable-diffusion"

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
UNET = "unet"
VAE_ENCODER = "vae_encoder"
VAE_DECODER = "vae_decoder"
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_ENCODER, VAE_DECODER)

# Pipeline classes kiln can rebuild around exported components, by architecture.
SUPPORTED_PIPELINES = {
    "StableDiffusionPipeline": False,
    "StableDiffusionImg2ImgPipeline": False,
    "StableDiffusionInpaintPipeline": False,
    "StableDiffusionXLPipeline": True,
    "StableDiffusionXLImg2ImgPipeline": True,
    "StableDiffusionXLInpaintPipeline": True,
}

MAX_BATCH = 8
# Long-prompt tools (A1111 style) concatenate 77-token chunks; allow four of them.
MAX_PROMPT_CHUNKS = 4


class Architecture(str, enum.Enum):
    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"

    @property
    def title(self) -> str:
        return {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "SDXL"}[
            self.value
        ]


@dataclass(frozen=True)
class DiffusionModelInfo:
    """What kind of Stable Diffusion a pipeline is; recorded in the manifest."""

    architecture: Architecture
    inpainting: bool
    prediction_type: str
    latent_channels: int
    vae_scale_factor: int
    # Latent sides must be multiples of this (one per UNet down-sampling).
    latent_multiple: int
    default_latent_size: int
    tokenizer_max_length: int

    @property
    def pixel_multiple(self) -> int:
        return self.latent_multiple * self.vae_scale_factor

    def to_dict(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture.value,
            "inpainting": self.inpainting,
            "prediction_type": self.prediction_type,
            "latent_channels": self.latent_channels,
            "vae_scale_factor": self.vae_scale_factor,
            "latent_multiple": self.latent_multiple,
            "default_latent_size": self.default_latent_size,
            "tokenizer_max_length": self.tokenizer_max_length,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiffusionModelInfo:
        return cls(**{**data, "architecture": Architecture(data["architecture"])})


def describe(pipeline: DiffusionPipeline) -> DiffusionModelInfo:
    """Classify a loaded diffusers pipeline, or refuse it with the reason."""
    name = type(pipeline).__name__
    if name not in SUPPORTED_PIPELINES:
        raise UnsupportedModelError(
            f"{name} is not supported; kiln compiles {', '.join(sorted(SUPPORTED_PIPELINES))}"
        )
    unet_config = pipeline.unet.config
    vae_config = pipeline.vae.config
    if SUPPORTED_PIPELINES[name]:
        architecture = Architecture.SDXL
    elif unet_config.use_linear_projection or pipeline.text_encoder.config.hidden_act == "gelu":
        architecture = Architecture.SD2
    else:
        architecture = Architecture.SD1
    sample_size = unet_config.sample_size
    if not isinstance(sample_size, int):
        sample_size = sample_size[0]
    return DiffusionModelInfo(
        architecture=architecture,
        inpainting=unet_config.in_channels == 9,
        prediction_type=pipeline.scheduler.config.get("prediction_type", "epsilon"),
        latent_channels=vae_config.latent_channels,
        vae_scale_factor=2 ** (len(vae_config.block_out_channels) - 1),
        latent_multiple=2 ** (len(unet_config.block_out_channels) - 1),
        default_latent_size=sample_size,
        tokenizer_max_length=pipeline.tokenizer.model_max_length,
    )


def component_specs(pipeline: DiffusionPipeline) -> dict[str, ComponentSpec]:
    """One spec per exportable component present in the pipeline."""
    info = describe(pipeline)
    specs = {TEXT_ENCODER: _text_encoder_spec(TEXT_ENCODER, pipeline.text_encoder, info)}
    if getattr(pipeline, "text_encoder_2", None) is not None:
        specs[TEXT_ENCODER_2] = _text_encoder_spec(TEXT_ENCODER_2, pipeline.text_encoder_2, info)
    specs[UNET] = _unet_spec(pipeline, info)
    specs[VAE_ENCODER], specs[VAE_DECODER] = _vae_specs(info)
    return specs


def _batch(opt: int = 1) -> Dim:
    return Dim("batch", 1, opt, MAX_BATCH * 2)


def _text_encoder_spec(name: str, encoder: Any, info: DiffusionModelInfo) -> ComponentSpec:
    config = encoder.config
    length = info.tokenizer_max_length
    hidden = config.hidden_size
    batch, sequence = _batch(), Dim("sequence", 1, length, length)
    with_projection = hasattr(encoder, "text_projection")
    pooled = (
        TensorSpec("text_embeds", DType.FLOAT32, ("batch", config.projection_dim))
        if with_projection
        else TensorSpec("pooler_output", DType.FLOAT32, ("batch", hidden))
    )
    return ComponentSpec(
        name=name,
        family=FAMILY,
        inputs=(TensorSpec("input_ids", DType.INT64, (batch, sequence), (0, config.vocab_size)),),
        outputs=(
            TensorSpec("last_hidden_state", DType.FLOAT32, ("batch", "sequence", hidden)),
            pooled,
            # Every layer's hidden states, stacked: SDXL reads the penultimate one and
            # clip-skip reads earlier ones.
            TensorSpec(
                "hidden_states",
                DType.FLOAT32,
                (config.num_hidden_layers + 1, "batch", "sequence", hidden),
            ),
        ),
        description=type(encoder).__name__,
        graph_kind="clip",
    )


def _latent_dims(info: DiffusionModelInfo) -> tuple[Dim, Dim]:
    multiple, opt = info.latent_multiple, info.default_latent_size
    low = multiple * max(1, (opt // 2) // multiple)
    high = multiple * ((opt * 2) // multiple)
    return (
        Dim("latent_height", low, opt, high, multiple),
        Dim("latent_width", low, opt, high, multiple),
    )


def _unet_spec(pipeline: DiffusionPipeline, info: DiffusionModelInfo) -> ComponentSpec:
    config = pipeline.unet.config
    batch = _batch(opt=2)
    height, width = _latent_dims(info)
    length = info.tokenizer_max_length
    sequence = Dim("sequence", 1, length, length * MAX_PROMPT_CHUNKS)
    inputs = [
        TensorSpec("sample", DType.FLOAT32, (batch, config.in_channels, height, width)),
        TensorSpec("timestep", DType.FLOAT32, (batch,), value_range=(0, 1000)),
        TensorSpec(
            "encoder_hidden_states", DType.FLOAT32, (batch, sequence, config.cross_attention_dim)
        ),
    ]
    if config.addition_embed_type == "text_time":
        pooled_dim = pipeline.text_encoder_2.config.projection_dim
        time_ids = (config.projection_class_embeddings_input_dim - pooled_dim) // (
            config.addition_time_embed_dim
        )
        inputs += [
            TensorSpec("text_embeds", DType.FLOAT32, (batch, pooled_dim)),
            TensorSpec("time_ids", DType.FLOAT32, (batch, time_ids), value_range=(0, 1024)),
        ]
    elif config.addition_embed_type is not None:
        raise UnsupportedModelError(
            f"UNet addition_embed_type={config.addition_embed_type!r} is not supported"
        )
    return ComponentSpec(
        name=UNET,
        family=FAMILY,
        inputs=tuple(inputs),
        outputs=(
            TensorSpec(
                "out_sample",
                DType.FLOAT32,
                ("batch", config.out_channels, "latent_height", "latent_width"),
            ),
        ),
        description="UNet2DConditionModel",
        graph_kind="unet",
    )


def _vae_specs(info: DiffusionModelInfo) -> tuple[ComponentSpec, ComponentSpec]:
    channels, scale = info.latent_channels, info.vae_scale_factor
    height, width = _latent_dims(info)
    image_height = Dim(
        "height",
        height.min * scale,
        height.opt * scale,
        height.max * scale,
        height.multiple_of * scale,
    )
    image_width = Dim(
        "width", width.min * scale, width.opt * scale, width.max * scale, width.multiple_of * scale
    )
    # Decoded pixels are in [-1, 1] but intermediate activations are large; a relative
    # budget on top of the absolute one keeps fp32 parity meaningful at every scale.
    vae_tolerances = {Precision.FP32: Tolerance(atol=2e-4, rtol=1e-4)}
    encoder = ComponentSpec(
        name=VAE_ENCODER,
        family=FAMILY,
        inputs=(
            TensorSpec("sample", DType.FLOAT32, (_batch(), 3, image_height, image_width), (-1, 1)),
        ),
        outputs=(
            TensorSpec(
                "latent_parameters",
                DType.FLOAT32,
                ("batch", 2 * channels, "latent_height", "latent_width"),
            ),
        ),
        tolerances={**DEFAULT_TOLERANCES, **vae_tolerances},
        description="AutoencoderKL encoder (+ quant_conv): mean and log-variance",
        graph_kind="vae",
    )
    decoder = ComponentSpec(
        name=VAE_DECODER,
        family=FAMILY,
        inputs=(TensorSpec("latent_sample", DType.FLOAT32, (_batch(), channels, height, width)),),
        outputs=(TensorSpec("sample", DType.FLOAT32, ("batch", 3, "height", "width")),),
        tolerances={**DEFAULT_TOLERANCES, **vae_tolerances},
        description="AutoencoderKL (post_quant_conv +) decoder",
        graph_kind="vae",
    )
    return encoder, decoder


def export_module(pipeline: DiffusionPipeline, component: str) -> torch.nn.Module:
    """A module whose forward takes the spec's inputs in order and returns its outputs."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, encoder: torch.nn.Module) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
            out = self.encoder(input_ids, output_hidden_states=True, return_dict=True)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            return out.last_hidden_state, pooled, torch.stack(out.hidden_states)

    class UNet(torch.nn.Module):
        def __init__(self, unet: torch.nn.Module) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states, text_embeds=None, time_ids=None):
            added = None
            if text_embeds is not None:
                added = {"text_embeds": text_embeds, "time_ids": time_ids}
            return self.unet(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False
            )[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, sample: torch.Tensor) -> torch.Tensor:
            return self.vae._encode(sample)

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: torch.nn.Module) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
            return self.vae._decode(latent_sample, return_dict=False)[0]

    wrappers = {
        TEXT_ENCODER: lambda: TextEncoder(pipeline.text_encoder),
        TEXT_ENCODER_2: lambda: TextEncoder(pipeline.text_encoder_2),
        UNET: lambda: UNet(pipeline.unet),
        VAE_ENCODER: lambda: VaeEncoder(pipeline.vae),
        VAE_DECODER: lambda: VaeDecoder(pipeline.vae),
    }
    if component not in wrappers:
        raise UnsupportedModelError(f"unknown Stable Diffusion component {component!r}")
    pipeline.vae.use_tiling = pipeline.vae.use_slicing = False
    # torch.onnx.export restores the wrapper's train flag onto the wrapped model: keep eval.
    return wrappers[component]().eval()


class StableDiffusionModel(LoadedModel):
    """A diffusers Stable Diffusion pipeline, split into exportable components."""

    family = FAMILY

    def __init__(self, pipeline: DiffusionPipeline, source: SourceInfo) -> None:
        self.pipeline = pipeline
        self.source = source
        self.info = describe(pipeline)
        self._specs = component_specs(pipeline)

    @classmethod
    def from_folder(cls, path: Path, source: SourceInfo) -> StableDiffusionModel:
        index = read_json(path / "model_index.json", SourceError)
        name = index.get("_class_name", "unknown")
        if name not in SUPPORTED_PIPELINES:
            raise UnsupportedModelError(
                f"{path} holds a {name}; kiln compiles {', '.join(sorted(SUPPORTED_PIPELINES))}"
            )
        import torch
        from diffusers import DiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()

        extra: dict[str, Any] = {}
        if "safety_checker" in index:
            extra = {
                "safety_checker": None,
                "feature_extractor": None,
                "requires_safety_checker": False,
            }
        try:
            pipeline = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, **extra)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            reason = first_line(exc)
            raise SourceError(f"could not load the pipeline in {path}: {reason}") from None
        return cls(pipeline, source)

    def fuse_loras(self, loras: Sequence[LoraFile]) -> None:
        """Bake LoRAs into the weights before anything is exported; the source records them."""
        from kiln.models.lora import fuse_loras

        records = fuse_loras(self.pipeline, loras, self.info.architecture.title)
        self.source = replace(self.source, loras=(*self.source.loras, *records))

    def specs(self) -> dict[str, ComponentSpec]:
        return dict(self._specs)

    def lora_namespace(self, component: str) -> torch.nn.Module | None:
        if component in (UNET, TEXT_ENCODER, TEXT_ENCODER_2):
            return getattr(self.pipeline, component, None)
        return None

    def export_module(self, component: str) -> torch.nn.Module:
        return export_module(self.pipeline, component)

    def release(self, component: str) -> None:
        # The VAE serves two components; free it after the second.
        if component == VAE_ENCODER:
            return
        attribute = "vae" if component == VAE_DECODER else component
        free_weights(getattr(self.pipeline, attribute))
        setattr(self.pipeline, attribute, None)
        gc.collect()

    def model_info(self) -> dict[str, Any]:
        return self.info.to_dict()

    def save_support_files(self, folder: Path) -> None:
        pipeline = self.pipeline
        folder.mkdir(parents=True, exist_ok=True)
        pipeline.save_config(folder)
        pipeline.scheduler.save_pretrained(folder / "scheduler")
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipeline, name, None) is not None:
                getattr(pipeline, name).save_pretrained(folder / name)
        for name in (TEXT_ENCODER, TEXT_ENCODER_2):
            if getattr(pipeline, name, None) is not None:
                getattr(pipeline, name).config.save_pretrained(folder / name)
        pipeline.unet.save_config(folder / "unet")
        pipeline.vae.save_config(folder / "vae")
