"""The NaN guard: a reduced-precision component whose output overflows is rerun at fp32.

fp16 VAEs of real SD checkpoints overflow to inf/NaN and decode black images. A guarded
session checks every float output; on the first bad call it warns once, opens the
component's fp32 (or bf16) variant, and from then on reruns each bad call there. The
count of rerun calls is kept on the session and reported by `Deployment.nan_fallbacks()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from kiln.runtimes.base import Session

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

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.inner.run(inputs)
        if all_finite(outputs):
            return outputs
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
        return self._fallback.run(inputs)

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


def all_finite(outputs: Mapping[str, np.ndarray]) -> bool:
    """True when no floating-point output holds NaN or inf."""
    return all(
        np.isfinite(value).all()
        for value in outputs.values()
        if np.asarray(value).dtype.kind == "f"
    )
