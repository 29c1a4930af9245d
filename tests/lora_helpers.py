"""LoRA files as people have them, made here: PEFT adapters on a tiny pipeline's UNet and text
encoders saved in diffusers' format, and the same tensors under kohya / A1111 keys."""

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PROMPT = "a red cube on a table"
#: The image settings LoRA tests compare at, in kiln's names and in diffusers'.
SETTINGS = {"steps": 4, "width": 64, "height": 64, "seed": 3, "guidance_scale": 6.0}

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(model_dir: Path, folder: Path, seed: int, rank: int = 4, spread: float = 0.5) -> Path:
    """A random LoRA (B non-zero) on the UNet and every text encoder, diffusers format.

    PEFT is used directly (`inject_adapter_in_model`): transformers' own `add_adapter` asks
    for a newer PEFT than the registry has.
    """
    from diffusers import DiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipeline = DiffusionPipeline.from_pretrained(model_dir)
    torch.manual_seed(seed)
    layers = {}
    parts = [
        ("unet", UNET_TARGETS),
        ("text_encoder", TEXT_TARGETS),
        ("text_encoder_2", TEXT_TARGETS),
    ]
    for name, targets in parts:
        model = getattr(pipeline, name, None)
        if model is None:
            continue
        config = LoraConfig(
            r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False
        )
        inject_adapter_in_model(config, model)
        state = get_peft_model_state_dict(model)
        layers[name] = {k: v * spread for k, v in state.items()}
    keywords = {
        "unet_lora_layers": layers["unet"],
        "text_encoder_lora_layers": layers["text_encoder"],
    }
    if "text_encoder_2" in layers:
        keywords["text_encoder_2_lora_layers"] = layers["text_encoder_2"]
    type(pipeline).save_lora_weights(folder, safe_serialization=True, **keywords)
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(diffusers_file: Path, out: Path, xl: bool = False) -> Path:
    """The same LoRA under kohya's names: lora_unet_/lora_te_ (XL: lora_te1_/lora_te2_),
    lora_down/lora_up, and an alpha per module (= rank, so the scaling stays 1)."""
    prefixes = {
        "unet.": "lora_unet_",
        "text_encoder.": "lora_te1_" if xl else "lora_te_",
        "text_encoder_2.": "lora_te2_",
    }
    tensors = {}
    for key, value in load_file(str(diffusers_file)).items():
        prefix = next(p for p in prefixes if key.startswith(p))
        module, kind = key[len(prefix) :].rsplit(".lora_", 1)
        name = prefixes[prefix] + module.replace(".", "_")
        part = "lora_down" if kind.startswith("A") else "lora_up"
        tensors[f"{name}.{part}.weight"] = value.contiguous()
        if part == "lora_down":
            tensors[f"{name}.alpha"] = torch.tensor(float(value.shape[0]))
    save_file(tensors, str(out))
    return out


def diffusers_pipeline(model_dir: Path, fused=()):
    """The source pipeline in diffusers, each (file, scale) loaded and fused as diffusers does."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(model_dir)
    pipeline.set_progress_bar_config(disable=True)
    if hasattr(pipeline, "watermark"):
        pipeline.watermark = None
    if hasattr(pipeline, "safety_checker"):
        pipeline.safety_checker = None
    for index, (path, scale) in enumerate(fused):
        pipeline.load_lora_weights(str(path), adapter_name=f"ref_{index}")
        pipeline.fuse_lora(lora_scale=scale, adapter_names=[f"ref_{index}"])
        pipeline.unload_lora_weights()
    return pipeline


def diffusers_image(pipeline, prompt: str = PROMPT):
    """diffusers' image at SETTINGS."""
    with torch.inference_mode():
        return pipeline(
            prompt,
            num_inference_steps=SETTINGS["steps"],
            width=SETTINGS["width"],
            height=SETTINGS["height"],
            guidance_scale=SETTINGS["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(SETTINGS["seed"]),
        ).images[0]
