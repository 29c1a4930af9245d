"""LoRA and textual-inversion files: read, checked, and fused or turned into weight deltas.

The files people have: kohya / AUTOMATIC1111 (`lora_unet_...`, `lora_te_...` or
`lora_te1_`/`lora_te2_` for XL, with `alpha`) and diffusers / PEFT
(`pytorch_lora_weights.safetensors`: `unet.` / `text_encoder.` keys), for SD 1.x, 2.x and
XL. diffusers' own loader reads both (it converts kohya keys); kiln reads the file itself
(safetensors only: pickles are refused as everywhere in kiln) and checks that the LoRA fits
the model. `fuse_loras` bakes LoRAs into a source pipeline before export (W + scale * B A,
one after the other); `lora_deltas` gives the changes alone, for LoRAs switched on a loaded
artifact (`kiln.pipelines.lora_at_load`). Textual-inversion embeddings: A1111
(`emb_params`), SDXL (`clip_l` / `clip_g`) and diffusers' one-token files.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import SourceError, UnsupportedModelError
from kiln.models.spec import Precision

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
    tensors, path = _read_safetensors(path, "LoRA")
    return tensors, lora_format(path, tensors)


def _read_safetensors(path: Path, what: str) -> tuple[dict[str, Any], Path]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SourceError(
            f"{what} {path} is a pickle ({path.suffix}); kiln reads only .safetensors "
            "(pickles can run code when loaded): convert it first"
        )
    if not path.is_file():
        raise SourceError(f"{what} file {path} does not exist")
    try:
        return load_file(str(path)), path
    except (SafetensorError, OSError, ValueError) as exc:
        raise SourceError(f"{what} {path} is not a readable safetensors file: {exc}") from None


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
    except (ValueError, RuntimeError, KeyError, AssertionError) as exc:
        raise UnsupportedModelError(
            f"LoRA {path} does not fit this {architecture} model: {_first_problem(exc)}"
        ) from None


def _first_problem(exc: BaseException) -> str:
    """The first line that says what is wrong (not a heading ending in a colon)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if not line.endswith(":"):
            return line[:300]
    return type(exc).__name__


# --- LoRAs switched at load ----------------------------------------------------------------

#: The pipeline components a LoRA can touch, as diffusers names them.
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: Variants whose weights a LoRA can change at load; quantized ones hold no plain weights.
SWITCHABLE_PRECISIONS = frozenset({Precision.FP32, Precision.FP16, Precision.BF16})


def lora_deltas(support: Path, path: Path) -> dict[str, dict[str, Any]]:
    """Per component, the change `W' - W` at scale 1 of every weight the LoRA touches, named as diffusers
    names the component's parameters (`down_blocks.0....to_q.weight`).

    diffusers' own loader reads the file (kohya keys converted, alphas applied) into empty
    copies of the components built from the artifact's configs: their weights are allocated
    but never written or read, so even an SD 1.5 UNet costs no memory here, and PEFT's
    `get_delta_weight` gives each layer's change exactly as `fuse_lora` would apply it.
    """
    import diffusers
    import torch

    tensors, _ = read_lora(path)
    index = _read_index(support)
    pipeline_class = getattr(diffusers, index.get("_class_name", "StableDiffusionPipeline"))
    state, alphas = pipeline_class.lora_state_dict(tensors)
    deltas: dict[str, dict[str, Any]] = {}
    for component in LORA_COMPONENTS:
        if component not in index or not (support / component).is_dir():
            continue
        module = _empty_component(support, component)
        with _quiet_loading():
            _load_into(pipeline_class, module, component, state, alphas, path)
        with torch.no_grad():
            changes = {
                f"{name}.weight": layer.get_delta_weight(_ADAPTER).float()
                for name, layer in _lora_layers(module, path)
            }
        if changes:
            deltas[component] = changes
    if not deltas:
        raise UnsupportedModelError(
            f"LoRA {path} matches nothing in this model (a LoRA for another architecture?)"
        )
    return deltas


_ADAPTER = "kiln"


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers draws a bar for a few LoRA tensors and diffusers logs a LoRA that does not
    fit before raising; kiln reports progress and the error itself, once."""
    import logging

    from transformers.utils import logging as transformers_logging

    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    diffusers_logger = logging.getLogger("diffusers")
    level = diffusers_logger.level
    diffusers_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        diffusers_logger.setLevel(level)
        if bars:
            transformers_logging.enable_progress_bar()


def _read_index(support: Path) -> dict[str, Any]:
    import json

    return json.loads((support / "model_index.json").read_text())


def _empty_component(support: Path, component: str) -> Any:
    """The component built from its config with uninitialised weights (allocated lazily)."""
    import torch

    if component == "unet":
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            module = UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(support / component)
            )
    else:
        import transformers

        config = transformers.AutoConfig.from_pretrained(support / component)
        model_class = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])
        with torch.device("meta"):
            module = model_class(config)
    return module.to_empty(device="cpu").eval()


def _load_into(
    pipeline_class: Any, module: Any, component: str, state: dict, alphas: Any, path: Path
) -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise SourceError("LoRAs need PEFT (the lora extra): bash scripts/install.sh lora")
    if not any(key.startswith(f"{component}.") for key in state):
        return
    try:
        if component == "unet":
            pipeline_class.load_lora_into_unet(state, alphas, unet=module, adapter_name=_ADAPTER)
        else:
            pipeline_class.load_lora_into_text_encoder(
                state, alphas, text_encoder=module, prefix=component, adapter_name=_ADAPTER
            )
    # Size mismatches and unknown layers; PEFT reports some of them with an AssertionError.
    except (ValueError, RuntimeError, KeyError, AssertionError) as exc:
        raise UnsupportedModelError(
            f"LoRA {path} does not fit this model's {component}: {_first_problem(exc)}"
        ) from None


def _lora_layers(module: Any, path: Path) -> list[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    layers = []
    for name, layer in module.named_modules():
        if not isinstance(layer, LoraLayer) or _ADAPTER not in layer.lora_A:
            continue
        if layer.use_dora.get(_ADAPTER):
            raise UnsupportedModelError(
                f"LoRA {path} is a DoRA (its change depends on the base weight): fuse it at "
                "export with kiln export --lora"
            )
        layers.append((name, layer))
    return layers


# --- textual inversion ---------------------------------------------------------------------

#: SDXL embedding files name their two tables after the CLIP models.
_XL_TABLES = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclass(frozen=True)
class TextualInversion:
    """A learned token: its text and its vectors ([n, width]) per text encoder."""

    token: str
    vectors: Mapping[str, Any]

    def tokens(self) -> list[str]:
        """The tokenizer entries, as diffusers names them: `tok`, `tok_1`, ... per vector."""
        count = len(next(iter(self.vectors.values())))
        return [self.token] + [f"{self.token}_{i}" for i in range(1, count)]


def read_textual_inversion(path: Path, token: str | None = None) -> TextualInversion:
    """An embedding file: A1111 (`emb_params`), SDXL (`clip_l` / `clip_g`) or diffusers
    (`{"<token>": vectors}`); the token is `token`, else the file's key, else its stem."""
    tensors, _ = _read_safetensors(path, "embedding")
    if "emb_params" in tensors:
        vectors = {"text_encoder": tensors["emb_params"]}
    elif set(tensors) & set(_XL_TABLES):
        vectors = {_XL_TABLES[k]: v for k, v in tensors.items() if k in _XL_TABLES}
    elif len(tensors) == 1:
        key, value = next(iter(tensors.items()))
        token = token or key
        vectors = {"text_encoder": value}
    else:
        sample = ", ".join(list(tensors)[:3]) or "no tensors"
        raise UnsupportedModelError(
            f"embedding {path} is not a textual inversion (emb_params, clip_l/clip_g or one "
            f"token): {sample}"
        )
    vectors = {k: (v[None] if v.ndim == 1 else v).float() for k, v in vectors.items()}
    return TextualInversion(token or path.stem, vectors)
