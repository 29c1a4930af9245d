"""Test helper: write a diffusers SD pipeline as an A1111-style single-file checkpoint.

`save_ldm_checkpoint` is the inverse of diffusers' LDM -> diffusers conversion in
`diffusers/loaders/single_file_utils.py`: it renames the UNet, VAE and text encoder(s) of an
in-memory SD1 or SDXL pipeline to the original CompVis/SGM key layout and saves one
`.safetensors` file, so tests can build the kind of file users download from a tiny
random model. Only the layouts tests need are covered (no EMA, no inpainting extras).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = {  # diffusers ResnetBlock2D -> LDM ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _rename(name: str, table: dict[str, str]) -> str:
    module, _, leaf = name.rpartition(".")
    return f"{table.get(module, module)}.{leaf}"


def unet_to_ldm(sd: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> `model.diffusion_model.*` keys."""
    n = layers_per_block + 1  # LDM blocks per diffusers down block (resnets + downsampler)
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
    }
    out = {}
    for key, value in sd.items():
        p = key.split(".")
        module, leaf = ".".join(p[:-1]), p[-1]
        if module in fixed:
            new = f"{fixed[module]}.{leaf}"
        elif p[0] == "down_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "downsamplers":  # down_blocks.b.downsamplers.0.conv.w
                new = f"input_blocks.{1 + b * n + layers_per_block}.0.op.{leaf}"
            elif kind == "resnets":
                new = f"input_blocks.{1 + b * n + j}.0.{_rename(rest, _RESNET)}"
            else:  # attentions: same inner names
                new = f"input_blocks.{1 + b * n + j}.1.{rest}"
        elif p[0] == "mid_block":
            kind, j, rest = p[1], int(p[2]), ".".join(p[3:])
            if kind == "resnets":
                new = f"middle_block.{2 * j}.{_rename(rest, _RESNET)}"
            else:
                new = f"middle_block.1.{rest}"
        elif p[0] == "up_blocks":
            b, kind, j, rest = int(p[1]), p[2], int(p[3]), ".".join(p[4:])
            if kind == "upsamplers":  # after the resnet (.0) and the attention (.1), if any
                slot = 2 if any(k.startswith(f"up_blocks.{b}.attentions.") for k in sd) else 1
                new = f"output_blocks.{b * n + layers_per_block}.{slot}.conv.{leaf}"
            elif kind == "resnets":
                new = f"output_blocks.{b * n + j}.0.{_rename(rest, _RESNET)}"
            else:
                new = f"output_blocks.{b * n + j}.1.{rest}"
        else:
            raise KeyError(f"no LDM name for UNet key {key}")
        out[f"model.diffusion_model.{new}"] = value
    return out


def vae_to_ldm(sd: dict[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> `first_stage_model.*` keys."""
    out = {}
    for key, value in sd.items():
        new = key.replace("conv_norm_out", "norm_out")
        p = new.split(".")
        if p[1] == "down_blocks":  # encoder.down_blocks.i.{resnets.j|downsamplers.0}...
            if p[3] == "resnets":
                rest = _rename(".".join(p[5:]), {"conv_shortcut": "nin_shortcut"})
                new = f"encoder.down.{p[2]}.block.{p[4]}.{rest}"
            else:
                new = f"encoder.down.{p[2]}.downsample.{'.'.join(p[5:])}"
        elif p[1] == "up_blocks":  # decoder up blocks are stored in reverse order
            i = num_blocks - 1 - int(p[2])
            if p[3] == "resnets":
                rest = _rename(".".join(p[5:]), {"conv_shortcut": "nin_shortcut"})
                new = f"decoder.up.{i}.block.{p[4]}.{rest}"
            else:
                new = f"decoder.up.{i}.upsample.{'.'.join(p[5:])}"
        elif p[1] == "mid_block":
            if p[2] == "resnets":
                new = f"{p[0]}.mid.block_{int(p[3]) + 1}.{'.'.join(p[4:])}"
            else:  # attention: 1x1 convs in LDM, Linear in diffusers
                new = f"{p[0]}.mid.attn_1.{_rename('.'.join(p[4:]), _VAE_ATTN)}"
                if value.ndim == 2:
                    value = value[:, :, None, None]
        out[f"first_stage_model.{new}"] = value
    return out


def clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys -> `<prefix>text_model.*` (HF layout inside the file)."""
    # transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the file always has it.
    return {
        f"{prefix}{k if k.startswith('text_model.') else 'text_model.' + k}": v
        for k, v in sd.items()
        if not k.endswith("position_ids")
    }


def open_clip_to_ldm(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection keys -> OpenCLIP keys (SDXL's second encoder)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {
        "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        "ln_final.weight": sd.pop("final_layer_norm.weight"),
        "ln_final.bias": sd.pop("final_layer_norm.bias"),
        "text_projection": sd.pop("text_projection.weight").T.contiguous(),
    }
    for key in [k for k in sd if ".q_proj." in k]:  # q, k, v -> one in_proj
        block, _, leaf = key.replace("encoder.layers.", "transformer.resblocks.").partition(
            ".self_attn.q_proj."
        )
        qkv = [sd.pop(key.replace(".q_proj.", f".{x}_proj.")) for x in "qkv"]
        out[f"{block}.attn.in_proj_{leaf}"] = torch.cat(qkv)
    for key, value in sd.items():
        new = key.replace("encoder.layers.", "transformer.resblocks.")
        for diffusers_name, ldm_name in _OPEN_CLIP.items():
            new = new.replace(f".{diffusers_name}.", f".{ldm_name}.")
        out[new] = value
    return {prefix + k: v for k, v in out.items()}


def save_ldm_checkpoint(pipeline, path: str | Path) -> Path:
    """Write `pipeline` (SD1 or SDXL, diffusers) as one LDM-layout `.safetensors` file."""
    unet, vae = pipeline.unet, pipeline.vae
    tensors = unet_to_ldm(unet.state_dict(), unet.config.layers_per_block)
    tensors |= vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))
    text_encoder_2 = getattr(pipeline, "text_encoder_2", None)
    if text_encoder_2 is None:  # SD1
        tensors |= clip_to_ldm(pipeline.text_encoder.state_dict(), "cond_stage_model.transformer.")
    else:  # SDXL base
        tensors |= clip_to_ldm(
            pipeline.text_encoder.state_dict(), "conditioner.embedders.0.transformer."
        )
        tensors |= open_clip_to_ldm(text_encoder_2.state_dict(), "conditioner.embedders.1.model.")
    path = Path(path)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path))
    return path
