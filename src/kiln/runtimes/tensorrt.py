"""TensorRT `Session`: a serialized plan run on torch CUDA tensors, on torch's current stream.

Written against TensorRT 11.4's Python API (name-based I/O: `set_input_shape`,
`set_tensor_address`, `execute_async_v3`). A plan is bound to the GPU's compute capability
and to the TensorRT version that built it; one from elsewhere is refused at load with the
reason (selection skips it before that, reading the same `built_for` fields).

Per call: the optimization profile whose ranges hold every input shape is chosen, the input
shapes are set, inputs and freshly allocated outputs are bound by address, and the engine is
enqueued on the current torch stream, so it orders with the torch work around it and nothing
is synchronized. With `cuda_graph=True`, a set of shapes that repeats back to back (a
denoising loop) is captured once as a CUDA graph and replayed from then on; the graph is
dropped when another set of shapes runs, since a replay depends on the context's state.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import ArtifactError, BackendUnavailableError, InvalidRequestError
from kiln.models.spec import ComponentSpec
from kiln.runtimes.base import Session, to_tensor

if TYPE_CHECKING:
    import torch

#: TensorRT binds buffers at this alignment (cudaMalloc's); views at an offset are copied.
ALIGNMENT = 256
REBUILD = "rebuild it here: kiln export ARTIFACT -o ARTIFACT --target tensorrt"


def plan_problem(
    built_for: Mapping[str, Any] | None,
    *,
    tensorrt_version: str,
    compute_capability: tuple[int, int],
) -> str:
    """Why a plan built for `built_for` cannot run with this TensorRT on this GPU ("" if it can).

    The same fields selection reads (`kiln.profiles.select`): `tensorrt`, `compute_capability`,
    `gpu` and `hardware_compatibility`.
    """
    built = built_for or {}
    want_trt, want_cc = built.get("tensorrt"), built.get("compute_capability")
    if not want_trt or not want_cc:
        return f"the plan does not record the GPU and TensorRT version it was built for; {REBUILD}"
    wanted = str(want_trt).split(".")
    if str(tensorrt_version).split(".")[: len(wanted)] != wanted:
        return f"the plan was built with TensorRT {want_trt}, this is TensorRT {tensorrt_version}; {REBUILD}"
    have = f"{compute_capability[0]}.{compute_capability[1]}"
    compatible = str(built.get("hardware_compatibility", "")).lower().replace("_", "")
    if compatible in ("ampere+", "ampereplus"):
        if tuple(compute_capability) >= (8, 0):
            return ""
        return f"the plan runs on Ampere or newer GPUs (sm 8.0+), this GPU is sm {have}"
    if str(want_cc) != have:
        gpu = built.get("gpu") or "another GPU"
        return f"the plan was built for {gpu} (sm {want_cc}), this GPU is sm {have}; {REBUILD}"
    return ""


def tensorrt_logger(trt: Any, *, echo: bool = False) -> Any:
    """A TensorRT logger that keeps the errors (for one-line messages) and, with `echo`,
    prints warnings and errors to stderr."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            if int(severity) <= int(trt.ILogger.Severity.ERROR):
                self.errors.append(msg.strip())
            if echo and int(severity) <= int(trt.ILogger.Severity.WARNING):
                print(f"[TensorRT] {msg}", file=sys.stderr, flush=True)

        def last_error(self) -> str:
            return self.errors[-1] if self.errors else "no reason given"

    return Logger()


@dataclass
class _Captured:
    """One CUDA graph: the shapes it was captured for and the buffers it reads and writes."""

    key: tuple
    graph: Any
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]


class TensorRTSession(Session):
    runtime = "tensorrt"

    def __init__(
        self,
        plan_path: str | Path,
        spec: ComponentSpec,
        *,
        built_for: Mapping[str, Any] | None = None,
        device: str = "cuda:0",
        cuda_graph: bool = False,
    ) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendUnavailableError(
                "TensorRT is not installed: pip install 'kiln[gpu]' (NVIDIA GPU only)"
            ) from None
        import torch

        if not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"{spec.name}: TensorRT plans run on an NVIDIA GPU through a CUDA build of "
                "torch, and torch sees no CUDA device here"
            )
        self._device = torch.device(device if device.startswith("cuda") else "cuda:0")
        if self._device.index is None:
            self._device = torch.device("cuda", torch.cuda.current_device())
        path = Path(plan_path)
        capability = torch.cuda.get_device_capability(self._device)
        problem = plan_problem(
            built_for, tensorrt_version=trt.__version__, compute_capability=capability
        )
        if problem:
            raise ArtifactError(f"{spec.name}: TensorRT plan {path.name} refused: {problem}")
        self._trt, self._logger = trt, tensorrt_logger(trt)
        with torch.cuda.device(self._device):
            self._runtime = trt.Runtime(self._logger)
            self._engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
            if self._engine is None:
                raise ArtifactError(
                    f"TensorRT cannot load {path}: {self._logger.last_error()}; {REBUILD}"
                )
            self._context = self._engine.create_execution_context()
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self._inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if n not in self._inputs]
        self._dtypes = {n: _torch_dtype(trt, engine.get_tensor_dtype(n)) for n in names}
        #: Per optimization profile, per input: (min, opt, max) shapes.
        self.profiles: list[dict[str, tuple[tuple[int, ...], ...]]] = [
            {
                name: tuple(
                    tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(name, p)
                )
                for name in self._inputs
            }
            for p in range(engine.num_optimization_profiles)
        ]
        self._active_profile = 0
        self._output_dtypes = {t.name: t.dtype.torch() for t in spec.outputs}
        self.spec, self.device = spec, str(self._device)
        self.cuda_graph = cuda_graph
        self._graph: _Captured | None = None
        self._last_key: tuple | None = None
        self._uncapturable: set[tuple] = set()
        self.graph_replays = 0
        self._empty: torch.Tensor | None = None

    @property
    def tensor_device(self) -> torch.device:
        return self._device

    # -- running ---------------------------------------------------------------------------

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = {
            name: to_tensor(value, self.spec, name, self._device)
            for name, value in inputs.items()
            if name in self._inputs
        }
        outputs = self.run_on_device(tensors)
        return {name: _to_numpy(tensor) for name, tensor in outputs.items()}

    def run_on_device(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        import torch

        missing = [name for name in self._inputs if inputs.get(name) is None]
        if missing:
            raise InvalidRequestError(f"{self.spec.name}: the engine needs input {missing[0]!r}")
        with torch.cuda.device(self._device):
            tensors = {name: self._bindable(inputs[name], name) for name in self._inputs}
            shapes = tuple(tuple(tensors[name].shape) for name in self._inputs)
            profile = self._profile_for(shapes)
            stream = torch.cuda.current_stream(self._device)
            key = (profile, shapes)
            outputs = self._replayed(key, tensors, stream) if self.cuda_graph else None
            if outputs is None:
                outputs = self._execute(tensors, profile, stream)
            self._last_key = key
        return {
            name: out
            if out.dtype == self._output_dtypes.get(name, out.dtype)
            else out.to(self._output_dtypes[name])
            for name, out in outputs.items()
        }

    def _bindable(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        tensor = tensor.to(device=self._device, dtype=self._dtypes[name]).contiguous()
        if tensor.numel() and tensor.data_ptr() % ALIGNMENT:
            tensor = tensor.clone()  # a view at an offset into another tensor's memory
        return tensor

    def _profile_for(self, shapes: Sequence[tuple[int, ...]]) -> int:
        """The first optimization profile whose ranges hold every input shape."""
        for index, ranges in enumerate(self.profiles):
            if all(
                _within(shape, ranges[name])
                for name, shape in zip(self._inputs, shapes, strict=True)
            ):
                return index
        raise InvalidRequestError(f"{self.spec.name}: {self._outside(shapes)}")

    def _outside(self, shapes: Sequence[tuple[int, ...]]) -> str:
        parts = []
        for index, ranges in enumerate(self.profiles):
            for name, shape in zip(self._inputs, shapes, strict=True):
                low, _, high = ranges[name]
                if not _within(shape, ranges[name]):
                    parts.append(
                        f"{name} {_dims(shape)} is outside profile {index}'s {_dims(low)}..{_dims(high)}"
                    )
        return (
            "the call's shapes are outside every optimization profile of this TensorRT engine: "
            + "; ".join(parts)
            + "; rebuild it for them (kiln export ARTIFACT -o ARTIFACT --target tensorrt "
            "--min-size/--max-size/--max-batch)"
        )

    def _execute(
        self, tensors: Mapping[str, torch.Tensor], profile: int, stream: torch.cuda.Stream
    ) -> dict[str, torch.Tensor]:
        import torch

        context = self._context
        if profile != self._active_profile:
            context.set_optimization_profile_async(profile, stream.cuda_stream)
            self._active_profile = profile
        for name, tensor in tensors.items():
            if not context.set_input_shape(name, tuple(tensor.shape)):
                raise InvalidRequestError(
                    f"{self.spec.name}: TensorRT refused shape {_dims(tuple(tensor.shape))} "
                    f"for {name}: {self._logger.last_error()}"
                )
            context.set_tensor_address(name, self._address(tensor))
        outputs = {}
        for name in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self._dtypes[name], device=self._device)
            context.set_tensor_address(name, self._address(out))
            outputs[name] = out
        if not context.execute_async_v3(stream.cuda_stream):
            raise ArtifactError(
                f"TensorRT failed to run {self.spec.name}: {self._logger.last_error()}"
            )
        return outputs

    def _address(self, tensor: torch.Tensor) -> int:
        if tensor.numel():
            return tensor.data_ptr()
        # An empty tensor (a decoder's past on its first step) has no memory of its own.
        if self._empty is None:
            import torch

            self._empty = torch.empty(ALIGNMENT, dtype=torch.uint8, device=self._device)
        return self._empty.data_ptr()

    # -- CUDA graphs -----------------------------------------------------------------------

    def _replayed(
        self, key: tuple, tensors: Mapping[str, torch.Tensor], stream: torch.cuda.Stream
    ) -> dict[str, torch.Tensor] | None:
        """Outputs from the CUDA graph for `key`, captured on its second call in a row."""
        captured = self._graph
        if captured is not None and captured.key != key:
            self._graph = captured = None  # the context is about to run other shapes
        if captured is None and key == self._last_key and key not in self._uncapturable:
            captured = self._graph = self._capture(key, tensors, stream)
        if captured is None:
            return None
        for name, tensor in tensors.items():
            captured.inputs[name].copy_(tensor)
        captured.graph.replay()
        self.graph_replays += 1
        # The graph rewrites its output buffers on every replay: callers get their own copy.
        return {name: out.clone() for name, out in captured.outputs.items()}

    def _capture(
        self, key: tuple, tensors: Mapping[str, torch.Tensor], stream: torch.cuda.Stream
    ) -> _Captured | None:
        import torch

        inputs = {name: tensor.clone() for name, tensor in tensors.items()}
        # TensorRT updates its internal state on the first enqueue after a shape or address
        # change; that run must happen outside the capture (TensorRT's CUDA graph notes).
        outputs = self._execute(inputs, key[0], stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                capture_stream = torch.cuda.current_stream(self._device)
                if not self._context.execute_async_v3(capture_stream.cuda_stream):
                    raise RuntimeError(self._logger.last_error())
        except RuntimeError:
            # Engines with data-dependent shapes or host work cannot be captured: run them
            # as they are.
            self._uncapturable.add(key)
            return None
        return _Captured(key, graph, inputs, outputs)

    def release_memory(self) -> None:
        self._graph = None

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "profiles": [
                {name: [list(s) for s in shapes] for name, shapes in profile.items()}
                for profile in self.profiles
            ],
            "cuda_graph": self.cuda_graph,
            "graph_replays": self.graph_replays,
        }


def _within(shape: Sequence[int], ranges: Sequence[Sequence[int]]) -> bool:
    low, _, high = ranges
    return len(shape) == len(low) and all(
        a <= s <= b for a, s, b in zip(low, shape, high, strict=True)
    )


def _dims(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    import torch

    table = {
        trt.float32: torch.float32,
        trt.float16: torch.float16,
        trt.bfloat16: torch.bfloat16,
        trt.int8: torch.int8,
        trt.int32: torch.int32,
        trt.int64: torch.int64,
        trt.bool: torch.bool,
        trt.uint8: torch.uint8,
    }
    if dtype not in table:
        raise ArtifactError(f"TensorRT tensor type {dtype} has no torch equivalent kiln binds")
    return table[dtype]


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.detach().cpu().numpy()
