"""LoRA files fused into a Stable Diffusion pipeline before export (`kiln export --lora`).

The files people have: kohya / AUTOMATIC1111 (`lora_unet_...`, `lora_te_...` or
`lora_te1_`/`lora_te2_` for XL, with `alpha`) and diffusers / PEFT
(`pytorch_lora_weights.safetensors`: `unet.` / `text_encoder.` keys), for SD 1.x, 2.x and
XL. diffusers' own loader reads both (it converts kohya keys); kiln reads the file itself
(safetensors only: pickles are refused as everywhere in kiln), checks that the LoRA fits the
model, fuses it at its scale (W + scale * B A, one LoRA after the other) and drops the LoRA
layers, so every exporter and quantizer sees plain fused weights.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import SourceError, UnsupportedModelError

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")


class LoraFormat(str, enum.Enum):
    KOHYA = "kohya"
    DIFFUSERS = "diffusers"


@dataclass(frozen=True)
class LoraFile:
    """A LoRA to fuse: its file and scale (what `--lora FILE[:SCALE]` says)."""

    path: Path
    scale: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraFile:
        """`FILE` or `FILE:SCALE` (the scale is whatever follows the last colon, if a number)."""
        name, _, tail = text.rpartition(":")
        if name:
            try:
                return cls(Path(name), float(tail))
            except ValueError:
                pass
        return cls(Path(text))


def read_lora(path: Path) -> tuple[dict[str, Any], LoraFormat]:
    """The file's tensors and format, or a one-line error saying what is wrong with it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SourceError(
            f"LoRA {path} is a pickle ({path.suffix}); kiln reads only .safetensors "
            "(pickles can run code when loaded): convert it first"
        )
    if not path.is_file():
        raise SourceError(f"LoRA file {path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SourceError(f"LoRA {path} is not a readable safetensors file: {exc}") from None
    return tensors, lora_format(path, tensors)


def lora_format(path: Path, tensors: Mapping[str, Any]) -> LoraFormat:
    keys = list(tensors)
    if keys and all(
        k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys
    ):
        return LoraFormat.KOHYA
    if keys and all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return LoraFormat.DIFFUSERS
    sample = ", ".join(keys[:3]) or "no tensors"
    raise UnsupportedModelError(
        f"LoRA {path} is neither kohya (lora_unet_..., lora_te_...) nor diffusers "
        f"(unet..., text_encoder...) keys: {sample}"
    )


def fuse_loras(pipeline: Any, loras: Sequence[LoraFile], architecture: str) -> list[dict[str, Any]]:
    """Fuse each LoRA into `pipeline` at its scale; what the manifest records of each."""
    from kiln.artifacts import sha256_file

    records = []
    for index, lora in enumerate(loras):
        tensors, form = read_lora(lora.path)
        name = f"kiln_{index}"
        _load(pipeline, tensors, name, lora.path, architecture)
        touched = sorted(c for c, names in pipeline.get_list_adapters().items() if name in names)
        if not touched:
            raise UnsupportedModelError(
                f"LoRA {lora.path} matches nothing in this {architecture} model "
                "(a LoRA for another architecture?)"
            )
        pipeline.fuse_lora(components=touched, lora_scale=lora.scale, adapter_names=[name])
        pipeline.unload_lora_weights()  # the LoRA layers go; the fused weights stay
        records.append(
            {
                "file": lora.path.name,
                "sha256": sha256_file(lora.path),
                "scale": lora.scale,
                "format": form.value,
                "components": touched,
            }
        )
    return records


def _load(pipeline: Any, tensors: dict[str, Any], name: str, path: Path, architecture: str) -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise SourceError("fusing a LoRA needs PEFT (the lora extra): bash scripts/install.sh lora")
    try:
        pipeline.load_lora_weights(tensors, adapter_name=name)
    except (ValueError, RuntimeError, KeyError) as exc:  # size mismatches, unknown layers
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise UnsupportedModelError(
            f"LoRA {path} does not fit this {architecture} model: {first[:300]}"
        ) from None
