"""Turn what the user typed (a folder, a hub id, a single checkpoint file) into a loaded model.

Each model family implements `LoadedModel`: the exporter asks it for component specs and
export modules, one component at a time, and for the support files (configs, tokenizers,
scheduler) that the runtime needs to rebuild the library's pipeline around the artifact.
"""

from __future__ import annotations

import abc
import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.artifacts import read_json
from kiln.errors import SourceError, UnsupportedModelError
from kiln.models.builtin import MODELS as BUILTIN_MODELS
from kiln.models.builtin import PREFIX, builtin_path, content_hash, is_builtin

if TYPE_CHECKING:
    import torch

    from kiln.models.spec import ComponentSpec

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class SourceInfo:
    """Where a model came from, as recorded in the manifest."""

    id: str
    kind: str  # "folder", "hub", "single-file" or "builtin"
    revision: str  # hub commit, or "sha256:<hex>" of the weight files
    loras: tuple[Mapping[str, Any], ...] = ()  # fused into the weights (kiln.models.lora)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "kind": self.kind, "revision": self.revision}
        if self.loras:
            out["loras"] = [dict(lora) for lora in self.loras]
        return out


class LoadedModel(abc.ABC):
    """A source model in memory, split into exportable components."""

    family: str
    source: SourceInfo

    @abc.abstractmethod
    def specs(self) -> dict[str, ComponentSpec]:
        """Every exportable component, in export order."""

    @abc.abstractmethod
    def export_module(self, component: str) -> torch.nn.Module:
        """A module with tensor-only inputs and outputs in the spec's order."""

    @abc.abstractmethod
    def release(self, component: str) -> None:
        """Drop the component's weights once exported, to bound peak memory."""

    def will_export(self, components: Sequence[str]) -> None:  # noqa: B027 - optional hook
        """The components this run exports, in order: weights only they need can go early."""

    def lora_namespace(self, component: str) -> Any:
        """The module whose parameter names LoRA files use for `component`, if it takes LoRAs."""
        return None

    @abc.abstractmethod
    def model_info(self) -> dict[str, Any]:
        """Family-specific facts the runtime needs (architecture, scale factors, ...)."""

    @abc.abstractmethod
    def save_support_files(self, folder: Path) -> None:
        """Write configs, tokenizers and schedulers: everything but weights."""


def free_weights(module: torch.nn.Module | None) -> None:
    """Drop a module's parameter and buffer storage in place.

    Exporters keep references to parameters after export (onnxscript's rewrite rules hold on
    to the last graph they saw), so dropping the module is not enough; emptying the tensors
    frees what is reached through them. Tensors an exporter made that alias the weights keep
    the file mapping alive; the export runner gives its pages back (`kiln.runtimes.pages`).
    """
    if module is None:
        return
    import torch

    for tensor in (*module.parameters(), *module.buffers()):
        tensor.data = torch.empty(0, dtype=tensor.dtype)


def quiet_progress_bars() -> None:
    """Turn off diffusers' and transformers' own loading/saving bars: kiln reports progress."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def load_source(source: str | os.PathLike[str], *, config: str | None = None) -> LoadedModel:
    """Load a model from a local folder, a single checkpoint file, a hub id or `kiln:NAME`."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    quiet_progress_bars()
    if is_builtin(text):
        folder = builtin_path(text)
        return _load_folder(folder, SourceInfo(text, "builtin", content_hash(folder)))
    if path.is_file():
        return _load_single_file(path, config)
    if path.is_dir():
        return _load_folder(path, SourceInfo(str(path.resolve()), "folder", folder_hash(path)))
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return _load_hub(text)
    raise SourceError(
        f"source {text} does not exist (expected a model folder, a .safetensors file, a hub id "
        f"or a built-in model: {', '.join(PREFIX + name for name in BUILTIN_MODELS)})"
    )


def _load_folder(path: Path, info: SourceInfo) -> LoadedModel:
    if (path / "model_index.json").is_file():
        from kiln.models.stable_diffusion import StableDiffusionModel

        return StableDiffusionModel.from_folder(path, info)
    if (path / "config.json").is_file():
        architectures = read_json(path / "config.json", SourceError).get("architectures") or [
            "unknown"
        ]
        from kiln.models.blip import ARCHITECTURES as BLIP_ARCHITECTURES

        if architectures[0] in BLIP_ARCHITECTURES:
            from kiln.models.blip import BlipModel

            return BlipModel.from_folder(path, info, architectures[0])
        if architectures[0] == "Blip2ForImageTextRetrieval":
            from kiln.models.blip2_retrieval import Blip2RetrievalModel

            return Blip2RetrievalModel.from_folder(path, info)
        if architectures[0].startswith("Blip2"):
            from kiln.models.blip2 import Blip2Model

            return Blip2Model.from_folder(path, info, architectures[0])
        raise UnsupportedModelError(
            f"{path} holds a {architectures[0]} model; this kiln compiles Stable Diffusion pipelines"
        )
    raise SourceError(
        f"{path} is not a model folder (no model_index.json or config.json); "
        "pass a diffusers pipeline folder, a .safetensors checkpoint or a hub id"
    )


def _load_single_file(path: Path, config: str | None) -> LoadedModel:
    from kiln.models.single_file import content_hash, load_single_file_pipeline
    from kiln.models.stable_diffusion import StableDiffusionModel

    pipeline = load_single_file_pipeline(path, config=config)
    info = SourceInfo(str(path.resolve()), "single-file", f"sha256:{content_hash(path)}")
    return StableDiffusionModel(pipeline, info)


def _load_hub(repo_id: str) -> LoadedModel:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise SourceError(f"{repo_id} is not a local path and HF_HUB_OFFLINE is set")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.txt", "*.model", "*.safetensors"],
            ignore_patterns=[
                "*.fp16.safetensors",
                "*non_ema*",
                "*.ckpt",
                "*/diffusion_pytorch_model.bin",
            ],
        )
    except Exception as exc:  # the hub client raises many types; all mean "could not fetch"
        raise SourceError(
            f"could not fetch {repo_id} from the model hub: {type(exc).__name__}: {exc}"
        ) from None
    revision = Path(folder).name  # snapshot folders are named by commit hash
    return _load_folder(Path(folder), SourceInfo(repo_id, "hub", revision))


def folder_hash(path: Path) -> str:
    """A content hash of a model folder: every file's path, size and modification time.

    Hashing gigabytes of weights on every export would dominate small exports, so this hashes
    file metadata; single-file checkpoints, which users rename and copy, are hashed in full.
    """
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        digest.update(
            f"{file.relative_to(path).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode()
        )
    return f"meta-sha256:{digest.hexdigest()}"
