"""onnxruntime `Session`: runs an exported ONNX graph with the best available provider."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
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
        self._ort, self._path = ort, Path(model_path)
        self._low_memory, self._threads = low_memory, intra_op_threads
        available = ort.get_available_providers()
        chosen = [p for p in (providers or [CPU]) if p in available]
        if not chosen:
            raise BackendUnavailableError(
                f"none of the providers {list(providers or [])} is available (have {available})"
            )
        self.providers = tuple(chosen)
        self._replaced: dict[str, Any] = {}  # OrtValues the session reads: kept alive here
        self._session = self._create()
        self.spec = spec
        self.device = (
            "cpu" if chosen[0] == CPU else chosen[0].removesuffix("ExecutionProvider").lower()
        )
        self._input_names = {i.name for i in self._session.get_inputs()}
        self._output_names = [o.name for o in self._session.get_outputs()]

    def _create(self) -> Any:
        ort = self._ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self._low_memory:
            options.add_session_config_entry("session.disable_prepacking", "1")
            options.enable_cpu_mem_arena = False
        if self._threads:
            options.intra_op_num_threads = self._threads
        for name, value in self._replaced.items():
            options.add_initializer(name, value)
        try:
            return ort.InferenceSession(
                str(self._path), sess_options=options, providers=list(self.providers)
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"onnxruntime cannot load {self._path}: {message}") from None

    def stored_weights(self, names: Collection[str]) -> dict[str, np.ndarray]:
        found = {t.name: t for t in _initializers(self._path) if t.name in names}
        missing = sorted(set(names) - set(found))
        if missing:
            raise ArtifactError(f"{self._path} has no weight {missing[0]!r}")
        return {name: _read_initializer(t, self._path.parent) for name, t in found.items()}

    def replace_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """A new session over the same files with these initializers overridden by name."""
        stored = {t.name: t for t in _initializers(self._path) if t.name in values}
        missing = sorted(set(values) - set(stored))
        if missing:
            raise ArtifactError(f"{self._path} has no weight {missing[0]!r}")
        replaced = {
            name: self._ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(value, dtype=_NUMPY_TYPES[stored[name].data_type])
            )
            for name, value in values.items()
        }
        previous, self._replaced = self._replaced, replaced
        self._session = None  # the old session's memory goes before the new one loads
        try:
            self._session = self._create()
        except ArtifactError:
            self._replaced = previous
            self._session = self._create()
            raise

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: value for name, value in inputs.items() if name in self._input_names}
        outputs = self._session.run(self._output_names, feed)
        return dict(zip(self._output_names, outputs, strict=True))

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers)}


def _initializers(path: Path) -> list[Any]:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.initializer)


def _read_initializer(tensor: Any, folder: Path) -> np.ndarray:
    from kiln.exporters.weight_map import read_onnx_initializer

    dtype = _NUMPY_TYPES.get(tensor.data_type)
    if dtype is None:
        raise ArtifactError(f"weight {tensor.name} is stored as a quantized type; it cannot change")
    shape = tuple(int(d) for d in tensor.dims)
    return read_onnx_initializer(tensor, folder, dtype).reshape(shape).astype(np.float32)


_NUMPY_TYPES = {1: np.float32, 10: np.float16}  # onnx.TensorProto FLOAT, FLOAT16
