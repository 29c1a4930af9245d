"""Which graph weight each source parameter became: what a LoRA switched at load needs.

An exporter renames and reshapes weights: torch's dynamo ONNX exporter stores a Linear's
weight transposed under a new name (`val_164`), merges identical tensors into one, and
OpenVINO names constants `self.<path>`. So the map is found by value, right after export,
while the source module is still in memory: for every weight of a Linear, convolution or
embedding, the graph tensor that holds exactly its values (or their transpose). A tensor
two parameters share is left out (a change to one would change both), and so is any
parameter the graph folded into something else; a LoRA touching one of those is refused
at load with a line that says so.

The map is written as `weights.json` beside the variant's graph and hashed with it. Cast
variants (fp16, bf16) keep their fp32 variant's tensor names, so they use its map.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import ArtifactError

if TYPE_CHECKING:
    import torch

WEIGHT_MAP_FILE = "weights.json"
FORMAT = "kiln-weight-map"


@dataclass(frozen=True)
class GraphWeight:
    """Where a parameter lives in a graph: the tensor's name, and whether it is transposed."""

    name: str
    transposed: bool = False


@dataclass(frozen=True)
class WeightMap:
    """Source parameter name (as the pipeline component names it) -> graph weight."""

    weights: dict[str, GraphWeight]
    input_embeddings: str | None = None  # the token table, for textual inversion

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": 1,
            "input_embeddings": self.input_embeddings,
            "weights": {k: [w.name, w.transposed] for k, w in sorted(self.weights.items())},
        }

    @classmethod
    def read(cls, path: Path) -> WeightMap:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            weights = {k: GraphWeight(name, bool(t)) for k, (name, t) in data["weights"].items()}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{path} is not a readable weight map: {exc}") from None
        return cls(weights, data.get("input_embeddings"))


def record_weight_map(
    module: torch.nn.Module, namespace: torch.nn.Module, target: str, folder: Path, entry: str
) -> WeightMap:
    """Find and write `folder/weights.json` for the graph just exported from `module`.

    `namespace` is the pipeline component inside `module` whose parameter names LoRA files
    use (the UNet inside kiln's UNet wrapper).
    """
    names = {id(p): n for n, p in namespace.named_parameters()}
    wanted = {
        wrapper_name: (names[id(param)], param.detach().numpy())
        for wrapper_name, param in _weights(module)
        if id(param) in names
    }
    if target == "torch":
        found = {source: GraphWeight(wrapper) for wrapper, (source, _) in wanted.items()}
    else:
        graph = _onnx_tensors if target == "onnx" else _openvino_tensors
        found = _match(wanted, dict(graph(folder / entry)))
    embeddings = (
        namespace.get_input_embeddings() if hasattr(namespace, "get_input_embeddings") else None
    )
    table = names.get(id(embeddings.weight)) if embeddings is not None else None
    weight_map = WeightMap(found, table if table in found else None)
    (folder / WEIGHT_MAP_FILE).write_text(json.dumps(weight_map.to_dict(), indent=1) + "\n")
    return weight_map


def _weights(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    import torch

    kinds = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    for path, layer in module.named_modules():
        if isinstance(layer, kinds) and getattr(layer, "weight", None) is not None:
            yield f"{path}.weight" if path else "weight", layer.weight


def _match(
    wanted: dict[str, tuple[str, np.ndarray]],
    graph: dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]],
) -> dict[str, GraphWeight]:
    """Each wanted parameter's graph tensor: the one holding equal values, or the transpose.

    Graph tensors are indexed by shape and a few of their values, each read once, so the
    match costs about two reads of the weights even where dozens share a shape.
    """
    index: dict[tuple, list[str]] = defaultdict(list)
    for name, (_, read) in graph.items():
        index[_fingerprint(read())].append(name)
    claims: dict[str, list[str]] = defaultdict(list)
    found: dict[str, GraphWeight] = {}
    for source, value in wanted.values():
        hit = _find(value, graph, index)
        if hit is not None:
            found[source] = hit
            claims[hit.name].append(source)
    shared = {source for sources in claims.values() if len(sources) > 1 for source in sources}
    return {source: hit for source, hit in found.items() if source not in shared}


def _fingerprint(value: np.ndarray) -> tuple:
    flat = value.reshape(-1)
    return (value.shape, flat[:8].tobytes(), flat[-8:].tobytes())


def _find(value: np.ndarray, graph: dict, index: dict) -> GraphWeight | None:
    layouts = [(value, False)] + ([(value.T, True)] if value.ndim == 2 else [])
    for layout, transposed in layouts:
        for candidate in index.get(_fingerprint(np.ascontiguousarray(layout)), []):
            if np.array_equal(graph[candidate][1](), layout):
                return GraphWeight(candidate, transposed)
    return None


def _onnx_tensors(path: Path) -> Iterator[tuple[str, tuple[tuple[int, ...], Callable]]]:
    """Every float32 initializer: its shape and a reader of its values (read when asked)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) >= 2:
            shape = tuple(int(d) for d in tensor.dims)
            yield tensor.name, (shape, _onnx_reader(tensor, path.parent, shape))


def _onnx_reader(tensor: Any, folder: Path, shape: tuple[int, ...]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        return read_onnx_initializer(tensor, folder, np.float32).reshape(shape)

    return read


def read_onnx_initializer(tensor: Any, folder: Path, dtype: Any) -> np.ndarray:
    """An initializer's values from its external data file (or inline), without the rest."""
    import onnx.numpy_helper

    if tensor.data_location != 1:  # onnx.TensorProto.EXTERNAL
        return onnx.numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    count = int(np.prod([int(d) for d in tensor.dims]))
    with open(folder / info["location"], "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        return np.fromfile(handle, dtype=dtype, count=count)


def _openvino_tensors(path: Path) -> Iterator[tuple[str, tuple[tuple[int, ...], Callable]]]:
    import openvino as ov

    model = ov.Core().read_model(str(path))
    for node in model.get_ops():
        if node.get_type_name() != "Constant" or node.get_element_type() != ov.Type.f32:
            continue
        shape = tuple(node.get_output_shape(0))
        if len(shape) >= 2:
            yield node.get_friendly_name(), (shape, node.get_data)
