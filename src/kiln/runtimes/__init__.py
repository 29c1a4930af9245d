"""Runtimes: one `Session` class per backend, opened from a manifest variant."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
        # A quantized variant's own settings win: its drift was measured with them.
        config = {k: v for k, v in choice.options.items() if k.isupper()}
        config.update(variant.options.get("openvino_config", {}))
        return OpenVinoSession(
            path,
            spec,
            device=choice.device.upper(),
            precision=variant.precision.value,
            config=config,
        )
    if choice.runtime == "torch":
        from kiln.runtimes.torch import TorchSession

        return TorchSession(path, spec, root=root, device=choice.device)
    raise BackendUnavailableError(f"runtime {choice.runtime} is not available in this kiln build")


def open_for_check(
    path: Path,
    spec: ComponentSpec,
    target: str,
    *,
    root: Path,
    options: Mapping[str, Any] | None = None,
) -> Session:
    """A session for a one-off check (parity, drift) on a variant still in its staging folder.

    `root` is the artifact folder; `options` are the variant's options (a quantized
    OpenVINO variant carries the precision hint it must be measured with).
    """
    options = options or {}
    if target == "openvino":
        from kiln.runtimes.openvino import OpenVinoSession

        config = dict(options.get("openvino_config", {}))
        precision = "fp32" if "INFERENCE_PRECISION_HINT" not in config else ""
        return OpenVinoSession(path, spec, precision=precision, config=config, use_cache=False)
    if target == "torch":
        from kiln.runtimes.torch import TorchSession

        return TorchSession(path, spec, root=root)
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    return OnnxRuntimeSession(path, spec, low_memory=True)
