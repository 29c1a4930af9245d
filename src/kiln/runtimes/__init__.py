"""Runtimes: one `Session` class per backend, opened from a manifest variant."""

from __future__ import annotations

from pathlib import Path

from kiln.artifacts import Variant
from kiln.errors import BackendUnavailableError
from kiln.models.spec import ComponentSpec
from kiln.profiles.select import Choice
from kiln.runtimes.base import Session


def open_session(root: Path, variant: Variant, spec: ComponentSpec, choice: Choice) -> Session:
    """Load `variant` (files already verified) as the plan's `choice` says."""
    path = root / variant.entry
    if choice.runtime == "onnxruntime":
        from kiln.runtimes.onnxruntime import OnnxRuntimeSession

        return OnnxRuntimeSession(path, spec, providers=choice.options.get("providers"))
    if choice.runtime == "openvino":
        from kiln.runtimes.openvino import OpenVinoSession

        # Plan options for OpenVINO are its own property names (upper case, from the target).
        config = {k: v for k, v in choice.options.items() if k.isupper()}
        return OpenVinoSession(
            path,
            spec,
            device=choice.device.upper(),
            precision=variant.precision.value,
            config=config,
        )
    raise BackendUnavailableError(f"runtime {choice.runtime} is not available in this kiln build")


def open_for_check(path: Path, spec: ComponentSpec, target: str) -> Session:
    """A session for a one-off parity run on a freshly exported (fp32) graph."""
    if target == "openvino":
        from kiln.runtimes.openvino import OpenVinoSession

        return OpenVinoSession(path, spec, precision="fp32", use_cache=False)
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    return OnnxRuntimeSession(path, spec, low_memory=True)
