"""Runtimes: one `Session` class per backend, opened from a manifest variant."""

from __future__ import annotations

from pathlib import Path

from kiln.artifacts import Variant
from kiln.errors import BackendUnavailableError
from kiln.models.spec import ComponentSpec
from kiln.runtimes.base import Session


def open_session(root: Path, variant: Variant, spec: ComponentSpec, runtime: str) -> Session:
    """Load `variant` (files already verified) with `runtime`."""
    if runtime == "onnxruntime":
        from kiln.runtimes.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(root / variant.entry, spec)
    raise BackendUnavailableError(f"runtime {runtime} is not available in this kiln build")
