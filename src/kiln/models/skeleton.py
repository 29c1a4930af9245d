"""Rebuild a component's export wrapper from an artifact's configs, without its weights.

The torch target stores only a state dict; the module around it is rebuilt at load time
from `pipeline/` (the configs the export wrote) with parameters on the meta device, then
the weights are assigned from the variant's safetensors file. The wrapper comes from the
same `export_module` code the exporter used, so the state dict keys match by construction.

Buffers are created for real (only parameters go to the meta device): transformers keeps
non-persistent buffers such as CLIP's `position_ids` out of state dicts, so the file cannot
restore them and the library's own constructor must compute them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kiln.artifacts import SUPPORT_DIR, read_json
from kiln.errors import ArtifactError, UnsupportedModelError, first_line

# Parameters a component's forward never reads, by family then component: the wrapper holds
# a whole library model but the component uses part of it (a VAE wrapper holds both halves
# of the autoencoder; BLIP-2's vision wrapper holds the language model). The exporter leaves
# them out of the file and the loader leaves them on the meta device.
UNUSED_PREFIXES: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "stable-diffusion": {
        "vae_encoder": ("vae.decoder.", "vae.post_quant_conv."),
        "vae_decoder": ("vae.encoder.", "vae.quant_conv."),
    },
    "blip": {
        "vision_encoder": (
            "retrieval.text_encoder.",
            "retrieval.text_proj.",
            "retrieval.itm_head.",
        ),
        "text_matching": (
            "retrieval.vision_model.",
            "retrieval.vision_proj.",
            "retrieval.text_proj.",
        ),
        "text_features": (
            "retrieval.vision_model.",
            "retrieval.vision_proj.",
            "retrieval.itm_head.",
        ),
    },
    "blip2": {
        "vision_qformer": ("blip2.language_model.",),
        "vision_encoder": (
            "retrieval.embeddings.",
            "retrieval.text_projection.",
            "retrieval.itm_head.",
        ),
        "text_matching": (
            "retrieval.vision_model.",
            "retrieval.vision_projection.",
            "retrieval.text_projection.",
        ),
        "text_features": (
            "retrieval.vision_model.",
            "retrieval.vision_projection.",
            "retrieval.itm_head.",
            "retrieval.query_tokens",
        ),
    },
}

# Library loggers that print import-time notes (optional CPU kernels that did not load,
# deprecated pytree registrations): not actionable for a kiln user.
NOISY_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree", "diffusers.quantizers")


def unused_prefixes(family: str, component: str) -> tuple[str, ...]:
    """State-dict key prefixes the component's forward does not use (not stored)."""
    return UNUSED_PREFIXES.get(family, {}).get(component, ())


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise library loggers to ERROR for the duration of a block (imports, mostly)."""
    loggers = [logging.getLogger(name) for name in names or NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get meta-device parameters and real buffers.

    Layers create their parameters on the CPU (untouched pages cost nothing) and this moves
    each one to the meta device as it is registered, so initializers run on meta tensors
    and cost nothing either. The patch is process-wide while the block runs: build
    skeletons from one thread at a time.
    """
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(
                param.to("meta"), requires_grad=param.requires_grad
            )

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def build_wrapper(
    root: Path, family: str, model_info: Mapping[str, Any], component: str
) -> torch.nn.Module:
    """The export wrapper of `component`, parameters on the meta device, in eval mode."""
    support = Path(root) / SUPPORT_DIR
    if not support.is_dir():
        raise ArtifactError(f"{support} is missing: the torch target rebuilds models from it")
    builders = {
        "stable-diffusion": _stable_diffusion,
        "blip": _blip,
        "blip2": _blip2,
    }
    if family not in builders:
        raise UnsupportedModelError(f"the torch runtime cannot rebuild {family} models")
    try:
        with quiet_loggers(), parameters_on_meta():
            return builders[family](support, model_info, component).eval()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        reason = first_line(exc)
        raise ArtifactError(
            f"cannot rebuild {component} from the configs in {support}: {reason}"
        ) from None


def _stable_diffusion(
    support: Path, model_info: Mapping[str, Any], component: str
) -> torch.nn.Module:
    from kiln.models import stable_diffusion as sd

    index = read_json(support / "model_index.json")
    # export_module always touches `pipeline.vae` (it turns tiling off); a stand-in object
    # takes that assignment when the component is not a VAE half.
    parts = SimpleNamespace(
        text_encoder=None, text_encoder_2=None, unet=None, vae=SimpleNamespace()
    )
    if component in (sd.TEXT_ENCODER, sd.TEXT_ENCODER_2):
        setattr(parts, component, _library_model(index, component, support / component))
    elif component == sd.UNET:
        parts.unet = _library_model(index, "unet", support / "unet")
    elif component in (sd.VAE_ENCODER, sd.VAE_DECODER):
        parts.vae = _library_model(index, "vae", support / "vae")
    else:
        raise UnsupportedModelError(f"unknown Stable Diffusion component {component!r}")
    return sd.export_module(parts, component)  # type: ignore[arg-type]


def _library_model(index: Mapping[str, Any], name: str, folder: Path) -> torch.nn.Module:
    """A diffusers or transformers model built from its saved config (no weights)."""
    library, class_name = index[name]
    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class.from_pretrained(folder))
    if library == "diffusers":
        import diffusers

        cls = getattr(diffusers, class_name)
        return cls.from_config(cls.load_config(folder))
    raise UnsupportedModelError(f"{name} comes from {library}, which kiln cannot rebuild")


def _blip(support: Path, model_info: Mapping[str, Any], component: str) -> torch.nn.Module:
    import transformers

    from kiln.models import blip

    info = blip.BlipModelInfo.from_dict(model_info)
    config = transformers.BlipConfig.from_pretrained(support)
    model = getattr(transformers, info.architecture)(config)
    return blip.export_module(model, component, info)


def _blip2(support: Path, model_info: Mapping[str, Any], component: str) -> torch.nn.Module:
    import transformers

    from kiln.models import blip2, blip2_retrieval

    config = transformers.Blip2Config.from_pretrained(support)
    if model_info["architecture"] == blip2_retrieval.ARCHITECTURE:
        retrieval = blip2_retrieval.Blip2RetrievalInfo.from_dict(model_info)
        model = transformers.Blip2ForImageTextRetrieval(config)
        return blip2_retrieval.export_module(model, component, retrieval)
    info = blip2.Blip2ModelInfo.from_dict(model_info)
    model = getattr(transformers, info.architecture)(config)
    return blip2.export_module(model, component, info)
