"""LoRAs and textual-inversion embeddings switched on a loaded artifact, with no re-export.

For each component a LoRA touches, the new weights are `W + sum(scale * delta)` for the
touched weights only, computed from the weights as stored in the variant's files (never
from weights already changed, so A -> B -> none is exact) and handed to the session
(`Session.replace_weights`). The export recorded where each source weight went in the graph
(`kiln.exporters.weight_map`); cast variants (fp16, bf16) use their fp32 variant's map.
Quantized variants (int8, int4, nf4) hold no plain weights to add to and refuse.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.artifacts import SUPPORT_DIR, Variant, verify_files
from kiln.errors import InvalidRequestError, UnsupportedModelError
from kiln.exporters.weight_map import WEIGHT_MAP_FILE, WeightMap
from kiln.models.lora import (
    LORA_COMPONENTS,
    SWITCHABLE_PRECISIONS,
    LoraFile,
    TextualInversion,
    lora_deltas,
)
from kiln.models.spec import Precision

if TYPE_CHECKING:
    from kiln.pipelines.deployment import Deployment

#: LoRA files kept parsed (their deltas), most recently used last.
CACHED_LORAS = 4

LoraRequest = Mapping[str, float] | Sequence[str | LoraFile] | None


def lora_files(loras: LoraRequest) -> tuple[LoraFile, ...]:
    """`{"FILE": 0.8}`, `["FILE:0.8", LoraFile(...)]` or None, as LoraFiles."""
    if not loras:
        return ()
    if isinstance(loras, Mapping):
        return tuple(LoraFile(Path(path), float(scale)) for path, scale in loras.items())
    return tuple(x if isinstance(x, LoraFile) else LoraFile.parse(str(x)) for x in loras)


class WeightSwitch:
    """The LoRAs and embeddings applied to one deployment's sessions."""

    def __init__(self, deployment: Deployment) -> None:
        self._deployment = deployment
        self._support = deployment.root / SUPPORT_DIR
        self._deltas: OrderedDict[tuple, dict[str, dict[str, Any]]] = OrderedDict()
        self._maps: dict[str, WeightMap] = {}
        self._changed: set[str] = set()
        self.loras: tuple[LoraFile, ...] = ()
        self.embeddings: tuple[TextualInversion, ...] = ()
        self.changed: dict[str, int] = {}  # weights replaced per component
        self.seconds = 0.0  # the last switch's time

    def apply(
        self, loras: Sequence[LoraFile], embeddings: Sequence[TextualInversion], tokenizers: dict
    ) -> None:
        """Make the sessions run with exactly these LoRAs and embeddings (none: the base).

        `tokenizers` are the deployment's fresh tokenizers per text encoder; the embeddings'
        tokens are added to them here.
        """
        loras, embeddings = tuple(loras), tuple(embeddings)
        if loras == self.loras and embeddings == self.embeddings:
            return
        started = time.perf_counter()
        changes: dict[str, dict[str, Any]] = {}
        for lora in loras:
            for component, deltas in self._deltas_of(lora).items():
                summed = changes.setdefault(component, {})
                for name, delta in deltas.items():
                    scaled = delta * lora.scale
                    summed[name] = summed[name] + scaled if name in summed else scaled
        tables = self._token_tables(embeddings, tokenizers)
        values = {
            component: self._graph_values(
                component, changes.get(component, {}), tables.get(component)
            )
            for component in set(changes) | set(tables)
        }
        for component in sorted(self._changed - set(values)):
            self._deployment.session(component).replace_weights({})
        for component, graph_values in sorted(values.items()):
            self._deployment.session(component).replace_weights(graph_values)
        self._changed = set(values)
        self.loras, self.embeddings = loras, embeddings
        self.changed = {component: len(v) for component, v in sorted(values.items())}
        self.seconds = time.perf_counter() - started

    def _deltas_of(self, lora: LoraFile) -> dict[str, dict[str, Any]]:
        path = lora.path.resolve()
        try:
            stat = path.stat()
            key = (str(path), stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = (str(path), 0, 0)  # read_lora says what is wrong with it
        if key not in self._deltas:
            deltas = lora_deltas(self._support, lora.path)
            for component in deltas:
                self._check_switchable(component, f"LoRA {lora.path.name}")
            self._deltas[key] = deltas
            while len(self._deltas) > CACHED_LORAS:
                self._deltas.popitem(last=False)
        self._deltas.move_to_end(key)
        return self._deltas[key]

    def _token_tables(
        self, embeddings: Sequence[TextualInversion], tokenizers: dict
    ) -> dict[str, tuple[list[int], np.ndarray, int]]:
        """Per text encoder: the new token ids, their vectors, and the tokenizer's length."""
        rows: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        for embedding in embeddings:
            for component, vectors in embedding.vectors.items():
                if component not in tokenizers:
                    raise InvalidRequestError(
                        f"embedding {embedding.token} has vectors for {component}, which this "
                        "model lacks (an embedding for another architecture?)"
                    )
                self._check_switchable(component, f"embedding {embedding.token}")
                tokenizer = tokenizers[component]
                added = tokenizer.add_tokens(embedding.tokens())
                if added != len(embedding.tokens()):
                    raise InvalidRequestError(
                        f"token {embedding.token} is already in the tokenizer; choose another"
                    )
                ids = tokenizer.convert_tokens_to_ids(embedding.tokens())
                got = rows.setdefault(component, ([], []))
                got[0].extend(ids)
                got[1].append(vectors.numpy())
        return {
            component: (ids, np.concatenate(vectors), len(tokenizers[component]))
            for component, (ids, vectors) in rows.items()
        }

    def _graph_values(
        self,
        component: str,
        deltas: Mapping[str, Any],
        table: tuple[list[int], np.ndarray, int] | None,
    ) -> dict[str, np.ndarray]:
        weight_map = self._map(component)
        missing = [name for name in deltas if name not in weight_map.weights]
        if missing:
            raise InvalidRequestError(
                f"{component}: the LoRA changes {missing[0]}, which this export does not hold "
                "as a separate weight (shared or folded); fuse the LoRA at export instead"
            )
        targets = {name: weight_map.weights[name] for name in deltas}
        session = self._deployment.session(component)
        stored = session.stored_weights([t.name for t in targets.values()])
        values = {}
        for name, target in targets.items():
            delta = deltas[name].numpy()
            delta = delta.T if target.transposed else delta
            base = stored[target.name]
            values[target.name] = base + delta.reshape(base.shape)
        if table is not None:
            values.update(self._grown_table(component, weight_map, session, values, table))
        return values

    def _grown_table(self, component, weight_map, session, values, table) -> dict[str, np.ndarray]:
        """The token table resized to the tokenizer (as `resize_token_embeddings` does) with
        the new tokens' rows set."""
        ids, vectors, length = table
        name = weight_map.input_embeddings
        if name is None:
            raise InvalidRequestError(
                f"{component}: this export does not record its token table; re-export it to "
                "use textual-inversion embeddings"
            )
        base = values.get(name)
        if base is None:
            base = session.stored_weights([weight_map.weights[name].name])[
                weight_map.weights[name].name
            ]
        if vectors.shape[1] != base.shape[1]:
            raise UnsupportedModelError(
                f"the embedding's vectors are {vectors.shape[1]} wide; {component} takes "
                f"{base.shape[1]} (an embedding for another model?)"
            )
        grown = np.zeros((length, base.shape[1]), dtype=np.float32)
        kept = min(length, len(base))
        grown[:kept] = base[:kept]
        grown[ids] = vectors
        return {weight_map.weights[name].name: grown}

    def _planned(self, component: str) -> Variant:
        deployment = self._deployment
        choice = next((c for c in deployment.plan.choices if c.component == component), None)
        if choice is None or component not in LORA_COMPONENTS:
            raise InvalidRequestError(f"this artifact has no {component} to change")
        return deployment.manifest.variant(choice.variant_id)

    def _check_switchable(self, component: str, what: str) -> None:
        variant = self._planned(component)
        if variant.precision not in SWITCHABLE_PRECISIONS:
            raise InvalidRequestError(
                f"{what} cannot be switched on at load: {component} runs {variant.id}, and "
                f"{variant.precision.value} weights cannot take a LoRA; load an fp32, fp16 or "
                f"bf16 variant (prefer='{component}={variant.target}:fp32') or fuse it at "
                "export (kiln export --lora)"
            )

    def _map(self, component: str) -> WeightMap:
        if component not in self._maps:
            variant = self._planned(component)
            entry = _map_entry(variant) or _map_entry(self._fp32_of(variant))
            if entry is None:
                raise InvalidRequestError(
                    f"{variant.id} records no weight map (exported by an older kiln, or with "
                    "graph fusions kept); re-export it, or fuse the LoRA at export"
                )
            root = self._deployment.root
            verify_files(root, [entry])
            self._maps[component] = WeightMap.read(root / entry.path)
        return self._maps[component]

    def _fp32_of(self, variant: Variant) -> Variant | None:
        return next(
            (
                v
                for v in self._deployment.manifest.variants_of(variant.component)
                if v.target == variant.target and v.precision is Precision.FP32 and not v.tag
            ),
            None,
        )


def _map_entry(variant: Variant | None) -> Any:
    if variant is None:
        return None
    name = f"{variant.folder}/{WEIGHT_MAP_FILE}"
    return next((f for f in variant.files if f.path == name), None)


__all__ = ["WeightSwitch", "lora_files"]
