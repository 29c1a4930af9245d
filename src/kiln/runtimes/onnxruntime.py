"""onnxruntime `Session`: runs an exported ONNX graph with the best available provider."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, BackendUnavailableError
from kiln.models.spec import ComponentSpec
from kiln.runtimes.base import Session

CPU = "CPUExecutionProvider"


class OnnxRuntimeSession(Session):
    runtime = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        spec: ComponentSpec,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        low_memory: bool = False,
    ) -> None:
        """`low_memory` skips weight pre-packing and the memory arena: slower, but a
        one-off run (a parity check) then needs about the model's size, not twice it."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError(
                "onnxruntime is not installed: pip install onnxruntime"
            ) from None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if low_memory:
            options.add_session_config_entry("session.disable_prepacking", "1")
            options.enable_cpu_mem_arena = False
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        available = ort.get_available_providers()
        chosen = [p for p in (providers or [CPU]) if p in available]
        if not chosen:
            raise BackendUnavailableError(
                f"none of the providers {list(providers or [])} is available (have {available})"
            )
        try:
            self._session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=chosen
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"onnxruntime cannot load {model_path}: {message}") from None
        self.spec = spec
        self.device = (
            "cpu" if chosen[0] == CPU else chosen[0].removesuffix("ExecutionProvider").lower()
        )
        self.providers = tuple(chosen)
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: value for name, value in inputs.items() if name in self._input_names}
        outputs = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, outputs, strict=True))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers)}
