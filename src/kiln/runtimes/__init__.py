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
        from kiln.runtimes.onnxruntime import OnnxRuntimeSession, execution_providers

        providers = execution_providers(
            choice.options.get("providers") or ["CPUExecutionProvider"],
            device=choice.device,
            precision=variant.precision,
            spec=spec,
            model_path=path,
            options=choice.options,
        )
        spinning = bool(choice.options.get("spinning", True))
        return OnnxRuntimeSession(path, spec, providers=providers, spinning=spinning)
    if choice.runtime == "openvino":
        from kiln.runtimes.openvino import OpenVinoSession

        # Plan options for OpenVINO are its own property names (upper case, from the target).
        # A quantized variant's own settings win: its drift was measured with them.
        config = {k: v for k, v in choice.options.items() if k.isupper()}
        config.update(variant.options.get("openvino_config", {}))
        static = choice.options.get("static_shapes")
        return OpenVinoSession(
            path,
            spec,
            device=choice.device.upper(),
            precision=variant.precision.value,
            config=config,
            static_shapes=None if static is None else int(static),
            shapes_key=f"{root.resolve()}::{spec.name}",
        )
    if choice.runtime == "torch":
        from kiln.runtimes.torch import TorchSession

        return TorchSession(
            path, spec, root=root, device=choice.device, compile=bool(choice.options.get("compile"))
        )
    if choice.runtime == "tensorrt":
        from kiln.runtimes.tensorrt import TensorRTSession

        return TensorRTSession(
            path,
            spec,
            built_for=variant.built_for,
            device=choice.device,
            cuda_graph=bool(choice.options.get("cuda_graph", False)),
        )
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
        from kiln.runtimes.torch import TorchSession, check_device

        return TorchSession(path, spec, root=root, device=check_device(path))
    if target == "tensorrt":
        from kiln.runtimes.tensorrt import TensorRTSession

        return TensorRTSession(path, spec, built_for=options.get("built_for"))
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    return OnnxRuntimeSession(path, spec, low_memory=True)
