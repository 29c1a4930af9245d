"""Adapters: sessions dressed as the torch modules diffusers' pipelines call.

Each adapter is an `nn.Module` without parameters that exposes the attributes the
pipelines read (`config`, `dtype`, `device`, and a few structural ones) and whose
`forward` runs a `Session`. Everything else (schedulers, guidance, img2img, inpainting)
stays in diffusers.

An adapter reports the device the pipeline should keep its tensors on (the UNet session's
`tensor_device`, passed to every adapter of a pipeline): diffusers then makes latents and
embeddings there, and each session's `run_torch` returns its outputs there, so a GPU
denoising loop stays on the GPU. Tensors stay float32, as the sessions' specs declare.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch

from kiln.errors import InvalidRequestError
from kiln.runtimes.base import Session


class SessionModule(torch.nn.Module):
    """An `nn.Module` facade with no weights: fp32 in and out, on `device` from torch's view."""

    def __init__(self, config: Any, device: torch.device | None = None) -> None:
        super().__init__()
        self.config = config
        self._device = device if device is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, *args: Any, **kwargs: Any) -> SessionModule:
        # Pipelines move and cast modules (e.g. upcasting a VAE); sessions keep their own
        # device and precision, so these calls are no-ops by design.
        return self

    @staticmethod
    def _refuse(feature: str, value: Any) -> None:
        if value:
            raise InvalidRequestError(f"{feature} is not supported by compiled components")


class UNetAdapter(SessionModule):
    def __init__(self, session: Session, config: Any, device: torch.device | None = None) -> None:
        super().__init__(config, device if device is not None else session.tensor_device)
        self.session = session
        in_features = config.get("projection_class_embeddings_input_dim")
        # SDXL pipelines check the additive-embedding width through this attribute path.
        self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=in_features))

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        return_dict: bool = True,
        **unsupported: Any,
    ) -> Any:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        self._refuse("timestep_cond (LCM guidance embedding)", timestep_cond is not None)
        self._refuse(
            "cross_attention_kwargs (LoRA scale, attention processors)", cross_attention_kwargs
        )
        self._refuse(
            ", ".join(sorted(unsupported)), any(v is not None for v in unsupported.values())
        )
        batch = sample.shape[0]
        timesteps = torch.as_tensor(timestep, dtype=torch.float32, device=sample.device)
        timesteps = timesteps.reshape(-1)
        if timesteps.numel() == 1:
            timesteps = timesteps.expand(batch)
        added = added_cond_kwargs or {}
        out = self.session.run_torch(
            sample=sample,
            timestep=timesteps,
            encoder_hidden_states=encoder_hidden_states,
            text_embeds=added.get("text_embeds"),
            time_ids=added.get("time_ids"),
        )["out_sample"]
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class TextEncoderAdapter(SessionModule):
    """CLIPTextModel or CLIPTextModelWithProjection, by which pooled output the graph has."""

    def __init__(self, session: Session, config: Any, device: torch.device | None = None) -> None:
        super().__init__(config, device if device is not None else session.tensor_device)
        self.session = session
        self.with_projection = "text_embeds" in session.spec.output_names

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool = True,
        **_: Any,
    ) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.clip.modeling_clip import CLIPTextModelOutput

        if attention_mask is not None and not bool(attention_mask.all()):
            raise InvalidRequestError(
                "text encoders are compiled without attention masks (CLIP uses none)"
            )
        out = self.session.run_torch(input_ids=input_ids.to(torch.int64))
        hidden_states = tuple(out["hidden_states"].unbind(0)) if output_hidden_states else None
        if self.with_projection:
            result = CLIPTextModelOutput(
                text_embeds=out["text_embeds"],
                last_hidden_state=out["last_hidden_state"],
                hidden_states=hidden_states,
            )
        else:
            result = BaseModelOutputWithPooling(
                last_hidden_state=out["last_hidden_state"],
                pooler_output=out["pooler_output"],
                hidden_states=hidden_states,
            )
        return result if return_dict else result.to_tuple()


class VaeAdapter(SessionModule):
    """AutoencoderKL from an encoder session (optional) and a decoder session."""

    def __init__(
        self,
        config: Any,
        encoder: Session | None,
        decoder: Session | None,
        device: torch.device | None = None,
    ) -> None:
        if device is None and decoder is not None:
            device = decoder.tensor_device
        super().__init__(config, device)
        self.encoder_session = encoder
        self.decoder_session = decoder
        self.use_tiling = False
        self.use_slicing = False

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if self.encoder_session is None:
            raise InvalidRequestError(
                "this artifact has no vae_encoder: export it for img2img and inpainting"
            )
        moments = self.encoder_session.run_torch(sample=x)["latent_parameters"]
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        from diffusers.models.autoencoders.vae import DecoderOutput

        if self.decoder_session is None:
            raise InvalidRequestError(
                "this artifact has no vae_decoder: export it to decode images"
            )
        sample = self.decoder_session.run_torch(latent_sample=z)["sample"]
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    def forward(self, sample: torch.Tensor) -> Any:
        return self.decode(self.encode(sample).latent_dist.mode())

    def enable_tiling(self, *_: Any, **__: Any) -> None:
        raise InvalidRequestError("VAE tiling is not supported by compiled components yet")
