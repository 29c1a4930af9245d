"""The NaN guard: a reduced-precision component whose output overflows is rerun at fp32.

fp16 VAEs of real SD checkpoints overflow to inf/NaN and decode black images. A guarded
session checks every float output; on the first bad call it warns once, opens the
component's fp32 (or bf16) variant, and from then on reruns each bad call there. The
count of rerun calls is kept on the session and reported by `Deployment.nan_fallbacks()`.
Both ways in are guarded: `run` on the host and `run_on_device` (fp16 on onnxruntime's
CUDA or TensorRT provider, on TensorRT, on torch on a GPU), checked on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.runtimes.base import Session
from kiln.runtimes.kv_cache import KVStream

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("kiln")


class GuardedSession(Session):
    """`inner`, with each NaN/inf-producing call rerun on a lazily opened fallback."""

    def __init__(
        self,
        inner: Session,
        variant_id: str,
        fallback_id: str,
        open_fallback: Callable[[], Session],
    ) -> None:
        self.inner = inner
        self.spec, self.runtime, self.device = inner.spec, inner.runtime, inner.device
        self.variant_id, self.fallback_id = variant_id, fallback_id
        self._open_fallback = open_fallback
        self._fallback: Session | None = None
        self._replaced: Mapping[str, np.ndarray] = {}
        self.fallback_calls = 0

    @property
    def tensor_device(self) -> torch.device:
        return self.inner.tensor_device

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.inner.run(inputs)
        if all_finite(outputs):
            return outputs
        return self._rerun().run(inputs)

    def run_on_device(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        outputs = self.inner.run_on_device(inputs)
        if all_finite(outputs):
            return outputs
        # The fallback may run elsewhere (an fp32 variant on the CPU); run_torch brings its
        # outputs back to this device.
        return self._rerun().run_torch(**inputs)

    def _rerun(self) -> Session:
        """The fallback for one bad call, opened on the first."""
        if self._fallback is None:
            logger.warning(
                "%s produced NaN/inf; rerunning such calls on %s (slower, but correct)",
                self.variant_id,
                self.fallback_id,
            )
            self._fallback = self._open_fallback()
            if self._replaced:
                self._replace_on_fallback()
        self.fallback_calls += 1
        return self._fallback

    def open_kv_stream(
        self, constants: Mapping[str, np.ndarray], groups: np.ndarray | None = None
    ) -> KVStream:
        return GuardedKVStream(self, constants, groups)

    def stored_weights(self, names: Collection[str]) -> dict[str, np.ndarray]:
        return self.inner.stored_weights(names)

    def replace_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """The fallback gets the same values (now, or when it opens)."""
        self.inner.replace_weights(values)
        self._replaced = dict(values)
        if self._fallback is not None:
            self._replace_on_fallback()

    def _replace_on_fallback(self) -> None:
        # Graph weight names hold within one runtime's variants (a cast keeps them), not across.
        if self._fallback.runtime == self.inner.runtime:
            self._fallback.replace_weights(self._replaced)
        elif self._replaced:
            logger.warning(
                "%s's fallback %s runs on another runtime and without the LoRA",
                self.variant_id,
                self.fallback_id,
            )

    def release_memory(self) -> None:
        self.inner.release_memory()
        if self._fallback is not None:
            self._fallback.release_memory()

    def describe(self) -> dict[str, Any]:
        guard = {"fallback": self.fallback_id, "fallback_calls": self.fallback_calls}
        return {**self.inner.describe(), "nan_guard": guard}


def all_finite(outputs: Mapping[str, Any]) -> bool:
    """True when no floating-point output (numpy array or torch tensor) holds NaN or inf.

    Tensors are checked where they are: only the one boolean leaves the device.
    """
    for value in outputs.values():
        if hasattr(value, "is_floating_point"):
            import torch

            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                return False
        elif np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
            return False
    return True


class GuardedKVStream(KVStream):
    """A guarded decoder's cache: on the first NaN/inf step the call moves to the fallback.

    The bad step's cache is inside the runtime, past saving, so the steps and reorders so
    far (small: tokens, positions, masks) are kept and replayed on a fallback stream, which
    carries the rest of the call.
    """

    def __init__(
        self,
        guard: GuardedSession,
        constants: Mapping[str, np.ndarray],
        groups: np.ndarray | None = None,
    ) -> None:
        super().__init__(guard.spec, constants, groups)
        self.guard = guard
        self._initial = (dict(constants), groups)
        self._stream = guard.inner.open_kv_stream(constants, groups)
        self._history: list[tuple[str, Any]] = []
        self._on_fallback = False

    def _step(self, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        self._history.append(("step", dict(inputs)))
        outputs = self._stream.step(inputs)
        if self._on_fallback:
            self.guard.fallback_calls += 1
        elif not all_finite(outputs):
            self._stream = self.guard._rerun().open_kv_stream(*self._initial)
            self._on_fallback = True
            for kind, value in self._history:
                if kind == "step":
                    outputs = self._stream.step(value)
                else:
                    self._stream.reorder(value)
        return outputs

    def _reorder(self, beam_idx: np.ndarray) -> None:
        self._history.append(("reorder", beam_idx))
        self._stream.reorder(beam_idx)
