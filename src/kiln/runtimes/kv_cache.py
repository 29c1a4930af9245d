"""Decoder key/value caches kept inside the runtime: one `KVStream` per generate() call.

A decoder-with-past graph (BLIP's text decoder, BLIP-2's OPT) takes every layer's cached
keys/values as inputs and returns them grown by the new tokens. Fed naively, each step
copies the whole past in and out, and BLIP's cross-attention keys/values of the image
(12 layers x 577 tokens x 768, twice: 42 MB per caption row) with it; beam search then
reorders all of it between steps. A stream keeps that state where the runtime can read it
without copies:

- the constants of a call (the cross-attention key/values) are handed over once;
- the past lives in the runtime: OpenVINO holds it as the state of a stateful model, with
  the beam reorder fused in as a Gather; onnxruntime keeps its own output values and gets
  them back through IO binding;
- rows of one image share their constants, so a beam reorder (which stays within an
  image's beams) never touches them.

`CopyingKVStream` is the plain version every `Session` gets: numpy arrays fed each step.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from kiln.errors import InvalidRequestError

if TYPE_CHECKING:
    from kiln.models.spec import ComponentSpec
    from kiln.runtimes.base import Session

PAST_PREFIX, PRESENT_PREFIX = "past_", "present_"
PAST_MASK = "past_attention_mask"


def cache_pairs(spec: ComponentSpec) -> tuple[tuple[str, str], ...]:
    """(past input, present output) of every cached tensor of a decoder-with-past graph."""
    outputs = set(spec.output_names)
    pairs = []
    for name in spec.input_names:
        if name.startswith(PAST_PREFIX) and name != PAST_MASK:
            present = PRESENT_PREFIX + name.removeprefix(PAST_PREFIX)
            if present in outputs:
                pairs.append((name, present))
    return tuple(pairs)


def row_groups(rows: np.ndarray) -> np.ndarray:
    """A group id per row; consecutive equal rows (one image's beams or captions) share it."""
    groups = np.zeros(len(rows), dtype=np.int64)
    for i in range(1, len(rows)):
        same = np.array_equal(rows[i], rows[i - 1])
        groups[i] = groups[i - 1] if same else groups[i - 1] + 1
    return groups


class KVStream(abc.ABC):
    """The key/value cache of one generate() call, inside the runtime.

    `constants` are inputs fixed for the whole call (cross-attention key/values), one row
    per decoder row; `groups` gives each row's group (rows of one image), so reorders that
    stay within groups leave the constants alone. `step` takes the per-step inputs (new
    tokens or embeddings, positions, masks) and returns the outputs that are not cache.
    """

    def __init__(
        self,
        spec: ComponentSpec,
        constants: Mapping[str, np.ndarray],
        groups: np.ndarray | None = None,
    ) -> None:
        self.spec = spec
        self.pairs = cache_pairs(spec)
        if not self.pairs:
            raise InvalidRequestError(f"{spec.name} is not a decoder with a key/value cache")
        self.constants = {k: np.ascontiguousarray(v) for k, v in constants.items()}
        self.groups = groups
        self.length = 0  # tokens cached
        self.batch: int | None = None
        self._present = {present for _, present in self.pairs}
        self._past_specs = {t.name: t for t in spec.inputs if t.name in dict(self.pairs)}

    def step(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        new = int(inputs["attention_mask"].shape[1])
        batch = int(inputs["attention_mask"].shape[0])
        if self.batch is None:
            self.batch = batch
        self._check(inputs, batch, new)
        outputs = self._step(inputs, batch)
        self.length += new
        return outputs

    def reorder(self, beam_idx: np.ndarray) -> None:
        """Row i continues from row beam_idx[i] (beam search keeps the best beams)."""
        beam_idx = np.asarray(beam_idx, dtype=np.int64)
        if self.constants and not self._within_groups(beam_idx):
            self.constants = {k: np.take(v, beam_idx, axis=0) for k, v in self.constants.items()}
            self._constants_changed()
        self._reorder(beam_idx)

    def past_shape(self, name: str, batch: int, length: int) -> tuple[int, ...]:
        sizes = {dim.name: length for dim in self._past_specs[name].dims()}
        sizes[self._past_specs[name].shape[0].name] = batch  # type: ignore[union-attr]
        return self._past_specs[name].concrete_shape(sizes)

    def empty_past(self, batch: int) -> dict[str, np.ndarray]:
        return {
            past: np.zeros(self.past_shape(past, batch, 0), np.float32) for past, _ in self.pairs
        }

    def _within_groups(self, beam_idx: np.ndarray) -> bool:
        if self.groups is None:
            return False
        return bool(np.array_equal(self.groups[beam_idx], self.groups))

    def _check(self, inputs: Mapping[str, np.ndarray], batch: int, new: int) -> None:
        if batch != self.batch:
            raise InvalidRequestError(
                f"{self.spec.name}: a cached generation keeps its batch ({self.batch}), got {batch}"
            )
        shapes = {name: tuple(value.shape) for name, value in inputs.items()}
        shapes.update({name: tuple(value.shape) for name, value in self.constants.items()})
        shapes.update({past: self.past_shape(past, batch, self.length) for past, _ in self.pairs})
        problem = self.spec.check_sizes(shapes)
        if problem is not None:
            raise InvalidRequestError(f"{self.spec.name}: {problem}")

    @abc.abstractmethod
    def _step(self, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        """Run one step; keep the grown cache; return the other outputs."""

    @abc.abstractmethod
    def _reorder(self, beam_idx: np.ndarray) -> None:
        """Reorder the cached rows (now, or fused into the next step)."""

    def _constants_changed(self) -> None:  # noqa: B027 (streams that copy need nothing)
        """`self.constants` was replaced (a reorder across groups)."""


class CopyingKVStream(KVStream):
    """Any session: the past as numpy arrays, fed with the constants at every step."""

    def __init__(
        self,
        session: Session,
        constants: Mapping[str, np.ndarray],
        groups: np.ndarray | None = None,
    ) -> None:
        super().__init__(session.spec, constants, groups)
        self.session = session
        self._past: dict[str, np.ndarray] = {}

    def _step(self, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        past = self._past or self.empty_past(batch)
        outputs = self.session.run({**inputs, **self.constants, **past})
        # A present output is the whole cache so far: it becomes the next past as it is.
        self._past = {past: outputs[present] for past, present in self.pairs}
        return {k: v for k, v in outputs.items() if k not in self._present}

    def _reorder(self, beam_idx: np.ndarray) -> None:
        self._past = {k: np.take(v, beam_idx, axis=0) for k, v in self._past.items()}
