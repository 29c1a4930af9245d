"""The torch target: a component's weights as one safetensors file, no pickles, no graph.

The module itself is rebuilt at load time from the artifact's configs
(`kiln.models.skeleton`), so the file holds only what a state dict holds, plus metadata
that makes it self-describing:

- `format` / `format_version`: this layout (`kiln-torch-state-dict`, version 1).
- `storage`: fp32, fp16, bf16, int8, int4 or nf4 (`kiln.quant.torch` writes the others).
- `aliases`: tied weights (a decoder's LM head and its token embeddings) are stored once;
  this maps each dropped key to the key holding the tensor.
- `pruned`: state-dict key prefixes the component never reads, left out of the file.
- `modules`: module path -> layer kind (Linear, Embedding, Conv2d, ...) for every module that
  owns parameters, so a quantizer can pick layers without rebuilding the model.
- `quantized` / `details` (quantized storages only): per-tensor layouts and how to run them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.errors import ArtifactError
from kiln.exporters.onnx import ExportedGraph
from kiln.models.skeleton import unused_prefixes
from kiln.models.spec import ComponentSpec

MODEL_FILE = "model.safetensors"
FORMAT = "kiln-torch-state-dict"
FORMAT_VERSION = "1"
FP32 = "fp32"

# Layer kinds named by their torch base class, so library subclasses (diffusers'
# LoRACompatibleLinear) count as what they compute. transformers' GPT-style `Conv1D`
# (a transposed Linear) is deliberately not a Linear: its weight is laid out [in, out].
_KINDS = (
    torch.nn.Linear,
    torch.nn.Embedding,
    torch.nn.Conv1d,
    torch.nn.Conv2d,
    torch.nn.Conv3d,
    torch.nn.ConvTranspose2d,
    torch.nn.LayerNorm,
    torch.nn.GroupNorm,
)


@dataclass
class StoredState:
    """A torch variant's file in memory: tensors as stored, and what the metadata says."""

    tensors: dict[str, torch.Tensor]
    storage: str = FP32
    aliases: dict[str, str] = field(default_factory=dict)
    pruned: tuple[str, ...] = ()
    modules: dict[str, str] = field(default_factory=dict)
    quantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def canonical(self, key: str) -> str:
        """The key that holds `key`'s tensor (itself unless it is a tied alias)."""
        return self.aliases.get(key, key)

    def plain_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors stored as they are (not the parts of a quantized tensor)."""
        return {
            key: tensor
            for key, tensor in self.tensors.items()
            if key.rpartition(".")[0] not in self.quantized
        }


def export_torch(module: torch.nn.Module, spec: ComponentSpec, folder: Path) -> ExportedGraph:
    """Write `folder/model.safetensors`: the wrapper's fp32 state dict, tied weights once."""
    pruned = unused_prefixes(spec.family, spec.name)
    state = {
        key: tensor.float() if tensor.is_floating_point() else tensor
        for key, tensor in module.state_dict().items()
        if not key.startswith(pruned)
    }
    tensors, aliases = dedupe_shared(state)
    write_state(
        folder / MODEL_FILE,
        StoredState(
            tensors=tensors,
            aliases=aliases,
            pruned=pruned,
            modules=layer_kinds(module, pruned),
        ),
    )
    return ExportedGraph(entry=MODEL_FILE, opset=None, exporter="torch")


def dedupe_shared(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors safetensors can write, and aliases for the tied ones it would refuse.

    Two keys holding the same view of the same storage (tied weights) become one tensor and
    an alias, restored at load. Keys that share storage as different views (rare: a fused
    projection sliced into parts) are cloned, since safetensors has no notion of views.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first_by_view: dict[tuple, str] = {}
    storages: set[int] = set()
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr()
        view = (
            pointer,
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
        )
        if tensor.numel() and view in first_by_view:
            aliases[key] = first_by_view[view]
            continue
        first_by_view[view] = key
        if tensor.numel() and pointer in storages:
            tensor = tensor.clone()
        storages.add(pointer)
        tensors[key] = tensor.contiguous()
    return tensors, aliases


def layer_kinds(module: torch.nn.Module, pruned: tuple[str, ...] = ()) -> dict[str, str]:
    """Module path -> layer kind, for every module that owns parameters directly."""
    kinds = {}
    for path, child in module.named_modules():
        if not any(p is not None for p in child._parameters.values()):
            continue
        if f"{path}.".startswith(pruned):
            continue
        kind = next((k.__name__ for k in _KINDS if isinstance(child, k)), type(child).__name__)
        kinds[path] = kind
    return kinds


def write_state(path: Path, state: StoredState) -> None:
    """Write a `StoredState` as safetensors with kiln's metadata."""
    from safetensors.torch import save_file

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "storage": state.storage,
        "aliases": json.dumps(state.aliases, sort_keys=True),
        "pruned": json.dumps(list(state.pruned)),
        "modules": json.dumps(state.modules),
    }
    if state.quantized:
        metadata["quantized"] = json.dumps(state.quantized)
    if state.details:
        metadata["details"] = json.dumps(state.details, sort_keys=True)
    save_file(state.tensors, str(path), metadata=metadata)


def read_state(path: Path) -> StoredState:
    """Read a torch variant file; one-line `ArtifactError` naming it for every failure."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"torch variant file {path} is missing")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            _check_format(path, metadata)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except SafetensorError as exc:
        raise ArtifactError(f"{path} is not a readable safetensors file ({exc})") from None
    except (OSError, RuntimeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from None
    try:
        return StoredState(
            tensors=tensors,
            storage=metadata["storage"],
            aliases=json.loads(metadata.get("aliases", "{}")),
            pruned=tuple(json.loads(metadata.get("pruned", "[]"))),
            modules=json.loads(metadata.get("modules", "{}")),
            quantized=json.loads(metadata.get("quantized", "{}")),
            details=json.loads(metadata.get("details", "{}")),
        )
    except (KeyError, ValueError) as exc:
        raise ArtifactError(
            f"{path} has damaged kiln metadata ({type(exc).__name__}: {exc})"
        ) from None


def _check_format(path: Path, metadata: Mapping[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not a kiln torch variant (no {FORMAT} metadata)")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path} uses {FORMAT} version {metadata.get('format_version')!r}; this kiln reads "
            f"version {FORMAT_VERSION}: re-export with this version"
        )
