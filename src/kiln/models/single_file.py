"""Single-file Stable Diffusion checkpoints (the AUTOMATIC1111 / CompVis `.safetensors` layout).

A single-file checkpoint holds the UNet (`model.diffusion_model.*`), the VAE
(`first_stage_model.*`) and the text encoder(s) (`cond_stage_model.*` for SD1/SD2,
`conditioner.embedders.*` for SDXL) under their original LDM names. kiln does not convert
keys itself: detection uses diffusers' `infer_diffusers_model_type` on a lazy view of the
file, and loading uses diffusers' `from_single_file`. What a single file lacks is every
config and the tokenizer(s); they come from a local diffusers folder of the same
architecture (`config=`), or from the model hub when it is reachable.

Pickled checkpoints (`.ckpt`, `.pt`, ...) are refused: kiln never unpickles.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from kiln.artifacts import read_json
from kiln.errors import SourceError, UnsupportedModelError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")

# diffusers model type -> (human name, pipeline class name). Other types (SD3, Flux,
# ControlNet, upscaler, ...) are models, but not single-file SD pipelines kiln compiles.
SD_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "v1": ("Stable Diffusion 1.x", "StableDiffusionPipeline"),
    "v2": ("Stable Diffusion 2.x", "StableDiffusionPipeline"),
    "inpainting": ("Stable Diffusion 1.x inpainting", "StableDiffusionInpaintPipeline"),
    "inpainting_v2": ("Stable Diffusion 2.x inpainting", "StableDiffusionInpaintPipeline"),
    "xl_base": ("Stable Diffusion XL", "StableDiffusionXLPipeline"),
    "xl_inpaint": ("Stable Diffusion XL inpainting", "StableDiffusionXLInpaintPipeline"),
    "xl_refiner": ("Stable Diffusion XL refiner", "StableDiffusionXLImg2ImgPipeline"),
}

_UNET_PREFIX = "model.diffusion_model."


class _ShapeOnly:
    """Stands in for a tensor during detection: `.shape` comes from the header, anything
    else (diffusers compares values for a few non-SD types) reads that one tensor."""

    def __init__(self, handle: Any, key: str) -> None:
        self._handle, self._key = handle, key
        self.shape = torch.Size(handle.get_slice(key).get_shape())

    def _tensor(self) -> torch.Tensor:
        return self._handle.get_tensor(self._key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tensor(), name)

    def __eq__(self, other: object) -> Any:  # type: ignore[override]
        return self._tensor() == other

    __hash__ = None  # type: ignore[assignment]


class _LazyCheckpoint(Mapping):
    """Read-only mapping over a `safe_open` handle; values are `_ShapeOnly` stubs."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle
        self._keys = list(handle.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> _ShapeOnly:
        if key not in self._key_set:
            raise KeyError(key)
        return _ShapeOnly(self._handle, key)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _check_path(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise SourceError(
            f"{path.name} is a pickled checkpoint ({path.suffix}); kiln never unpickles model files "
            "because loading a pickle can run arbitrary code: convert it to .safetensors "
            "(or download the .safetensors version) and pass that"
        )
    if not path.is_file():
        raise SourceError(f"single-file checkpoint {path} does not exist or is not a file")
    if path.suffix != ".safetensors":
        raise SourceError(
            f"{path.name}: kiln reads single-file checkpoints only as .safetensors files "
            "(name the file *.safetensors if it is one)"
        )


def _key_prefixes(keys: list[str], limit: int = 5) -> str:
    prefixes: list[str] = []
    for key in keys:
        prefix = ".".join(key.split(".")[:2])
        if prefix not in prefixes:
            prefixes.append(prefix)
    shown = ", ".join(prefixes[:limit])
    return shown + (f", ... ({len(prefixes)} prefixes)" if len(prefixes) > limit else "")


def detect_checkpoint_type(path: str | Path) -> str:
    """diffusers' model type name ("v1", "v2", "xl_base", "inpainting", ...) of a single file.

    Reads only the safetensors header and the few tensors' shapes diffusers looks at.
    Raises `SourceError` for pickles and unreadable files, `UnsupportedModelError` when the
    file holds no Stable Diffusion weights.
    """
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    _check_path(path)
    try:
        handle_cm = safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise SourceError(f"{path.name} is not a readable safetensors file ({e})") from e
    with handle_cm as handle:
        checkpoint = _LazyCheckpoint(handle)
        keys = list(checkpoint)
        if not keys:
            raise UnsupportedModelError(f"{path.name} is a safetensors file with no tensors")
        try:
            model_type = infer_diffusers_model_type(checkpoint)
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # odd non-SD files
            raise UnsupportedModelError(
                f"{path.name}: not a Stable Diffusion checkpoint ({_one_line(e)}); "
                f"found {len(keys)} tensors under {_key_prefixes(keys)}"
            ) from e
    # diffusers answers "v1" for any file it does not recognise, so check for the UNet.
    if model_type in SD_MODEL_TYPES and not any(k.startswith(_UNET_PREFIX) for k in keys):
        raise UnsupportedModelError(
            f"{path.name} holds no Stable Diffusion UNet ({_UNET_PREFIX}*); "
            f"found {len(keys)} tensors under {_key_prefixes(keys)}"
        )
    return model_type


def _hub_offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def _one_line(error: BaseException) -> str:
    """The first sentence of an error: diffusers appends long advice that does not apply."""
    text = " ".join(str(error).split())
    first = text.split(". ", 1)[0].rstrip(".")
    return f"{type(error).__name__}: {first}" if first else type(error).__name__


def _needs_config(path: Path, human: str, why: str) -> str:
    return (
        f"single-file checkpoint {path.name} looks like {human}; kiln needs its configs and "
        f"tokenizer: pass --config DIR with a diffusers folder of the same architecture ({why})"
    )


def _check_config(config: Path, path: Path, human: str, class_name: str) -> Path:
    index = config / "model_index.json"
    if not index.is_file():
        raise SourceError(
            f"--config {config} is not a diffusers folder (no model_index.json); pass a folder "
            f"with model_index.json, component configs and tokenizer for {human}"
        )
    folder_class = read_json(index, SourceError).get("_class_name", "")
    if folder_class and ("XL" in folder_class) != ("XL" in class_name):
        raise SourceError(
            f"--config {config} is a {folder_class} folder but {path.name} looks like {human}; "
            "pass a diffusers folder of the same architecture"
        )
    return config


@contextlib.contextmanager
def _quiet_libraries() -> Iterator[None]:
    """Silence diffusers/transformers warnings and progress bars while loading."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    saved = [(lib, lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in (dlog, tlog)]
    for lib, _, _ in saved:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # diffusers' deprecation notices are FutureWarnings
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lib, verbosity, bars in saved:
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


def load_single_file_pipeline(
    path: str | Path,
    *,
    config: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> DiffusionPipeline:
    """Load an A1111-style single-file SD checkpoint as a diffusers pipeline.

    `config` is a local diffusers folder (model_index.json, component configs, tokenizer(s),
    scheduler) of the same architecture; its weights, if any, are not read. Without it the
    configs come from the model hub, which must then be reachable.
    """
    import diffusers
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path)
    model_type = detect_checkpoint_type(path)
    if model_type not in SD_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path.name} looks like a '{model_type}' checkpoint (diffusers' name); kiln loads "
            "single-file Stable Diffusion 1.x, 2.x and XL checkpoints only"
        )
    human, class_name = SD_MODEL_TYPES[model_type]
    pipeline_cls = getattr(diffusers, class_name)

    kwargs: dict[str, Any] = {"torch_dtype": dtype}
    if config is not None:
        config = _check_config(Path(config), path, human, class_name)
        kwargs |= {"config": str(config), "local_files_only": True}
    elif _hub_offline():
        raise SourceError(_needs_config(path, human, "no model hub is reachable"))

    errors = (OSError, ValueError, RuntimeError, KeyError, SingleFileComponentError)
    with _quiet_libraries():
        try:
            return pipeline_cls.from_single_file(str(path), **kwargs)
        except errors as e:
            if config is None:
                why = f"fetching default configs from the model hub failed: {_one_line(e)}"
                raise SourceError(_needs_config(path, human, why)) from e
            raise SourceError(
                f"cannot load {path.name} ({human}) with the configs in {config}: "
                f"{_one_line(e)}; is that folder the same architecture?"
            ) from e


def content_hash(path: str | Path) -> str:
    """sha256 hex digest of a file, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
