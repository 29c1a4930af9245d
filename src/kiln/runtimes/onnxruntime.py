"""onnxruntime `Session`: runs an exported ONNX graph with the best available provider.

On NVIDIA GPUs (onnxruntime-gpu) the plan names the CUDA provider, and TensorRT's provider
before it where the target asks for it; `execution_providers` turns the plan's options into
each provider's own. With a GPU provider first, `run_on_device` binds torch CUDA tensors by
address (IO binding) and hands the outputs, allocated by onnxruntime on the same device,
to torch through DLPack: nothing goes through the host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import ArtifactError, BackendUnavailableError, first_line
from kiln.models.spec import ComponentSpec, Dim, Precision
from kiln.runtimes.base import Session
from kiln.runtimes.kv_cache import KVStream

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("kiln")

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
#: Providers that compute on an NVIDIA GPU: a session led by one keeps tensors there.
GPU_PROVIDERS = (TENSORRT, CUDA)
#: Provider options taken from the plan when the target sets them (`[options."onnx@cuda"]`).
CUDA_PLAN_OPTIONS = ("cudnn_conv_algo_search", "arena_extend_strategy", "gpu_mem_limit")


class OnnxRuntimeSession(Session):
    runtime = "onnxruntime"

    def __init__(
        self,
        model_path: str | Path,
        spec: ComponentSpec,
        *,
        providers: Sequence[str | tuple[str, Mapping[str, Any]]] | None = None,
        intra_op_threads: int | None = None,
        low_memory: bool = False,
        spinning: bool = True,
    ) -> None:
        """`providers`: names, or (name, provider options) pairs (`execution_providers`).

        `low_memory` skips weight pre-packing and the memory arena: slower, but a
        one-off run (a parity check) then needs about the model's size, not twice it.
        `spinning=False` sends the worker threads to sleep between calls, for plans that
        run another runtime on the same cores (`kiln.profiles.select`)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailableError(
                "onnxruntime is not installed: pip install onnxruntime"
            ) from None
        self._ort, self._path = ort, Path(model_path)
        self._low_memory, self._threads, self._spinning = low_memory, intra_op_threads, spinning
        available = ort.get_available_providers()
        chosen = [p for p in (providers or [CPU]) if _provider_name(p) in available]
        if not chosen:
            raise BackendUnavailableError(
                f"none of the providers {[_provider_name(p) for p in providers or []]} "
                f"is available (have {available})"
            )
        self._requested = chosen
        self._replaced: dict[str, Any] = {}  # OrtValues the session reads: kept alive here
        self._session = self._create()
        self.spec = spec
        # What onnxruntime runs on, not what was asked: it falls back to the CPU (printing
        # why) when a GPU provider cannot start, e.g. without CUDA or TensorRT libraries.
        self.providers = tuple(self._session.get_providers())
        if self.providers[0] != _provider_name(chosen[0]):
            logger.warning(
                "%s: onnxruntime could not start %s (its message is above); running on %s",
                spec.name,
                _provider_name(chosen[0]),
                self.providers[0],
            )
        self._cuda_device = self._gpu_index()
        self.device = "cpu" if self._cuda_device is None else f"cuda:{self._cuda_device}"
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
        if not self._spinning:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for name, value in self._replaced.items():
            options.add_initializer(name, value)
        try:
            return ort.InferenceSession(
                str(self._path), sess_options=options, providers=list(self._requested)
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            message = first_line(exc)
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

    def _gpu_index(self) -> int | None:
        """The CUDA device of the provider the session runs on first, or None (the CPU)."""
        first = self.providers[0]
        if first not in GPU_PROVIDERS:
            return None
        options = self._session.get_provider_options().get(first, {})
        return int(options.get("device_id", 0))

    @property
    def tensor_device(self) -> torch.device:
        import torch

        if self._cuda_device is None:
            return torch.device("cpu")
        return torch.device("cuda", self._cuda_device)

    def run_on_device(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """IO binding: inputs read where torch keeps them, outputs left where onnxruntime
        wrote them. On the CPU, the default host path: binding there measured within noise
        of `run` (19.2 vs 20.4 ms for a 3 MB output, 2-core CPU) and `run` is zero-copy in."""
        if self._cuda_device is None:
            return super().run_on_device(inputs)
        import torch

        binding = self._session.io_binding()
        keep = []  # stand-ins bound for empty inputs, alive until the run ends
        for name, tensor in inputs.items():
            if name not in self._input_names:
                continue
            pointer = tensor.data_ptr()
            if tensor.numel() == 0:
                # onnxruntime refuses a null address, which is what torch gives an empty
                # tensor (a decoder's past on its first step); nothing is read from it.
                keep.append(torch.empty(1, dtype=tensor.dtype, device=tensor.device))
                pointer = keep[-1].data_ptr()
            binding.bind_input(
                name,
                "cuda",
                self._cuda_device,
                np.dtype(str(tensor.dtype).removeprefix("torch.")),
                tuple(tensor.shape),
                pointer,
            )
        for name in self._output_names:
            binding.bind_output(name, "cuda", self._cuda_device)
        # onnxruntime computes on a stream of its own: torch's work on the inputs must be
        # done before it reads them. Run returns once its outputs are written.
        torch.cuda.current_stream(self.tensor_device).synchronize()
        self._session.run_with_iobinding(binding)
        return {
            name: _as_torch(value)
            for name, value in zip(self._output_names, binding.get_outputs(), strict=True)
        }

    def open_kv_stream(
        self, constants: Mapping[str, np.ndarray], groups: np.ndarray | None = None
    ) -> KVStream:
        return OrtKVStream(self, constants, groups)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": list(self.providers)}


def _provider_name(provider: str | tuple[str, Mapping[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _as_torch(value: Any) -> torch.Tensor:
    """A torch tensor sharing an output's device memory; the DLPack capsule owns a reference
    to the onnxruntime value, so the memory lives as long as the tensor."""
    import torch

    exporter = value if hasattr(value, "__dlpack__") else getattr(value, "_ortvalue", None)
    if exporter is None or not hasattr(exporter, "__dlpack__"):
        raise BackendUnavailableError(
            "this onnxruntime cannot hand GPU outputs to torch (its values have no DLPack); "
            "install the locked onnxruntime-gpu (bash scripts/install.sh gpu)"
        )
    return torch.from_dlpack(exporter)


def execution_providers(
    names: Sequence[str],
    *,
    device: str,
    precision: Precision,
    spec: ComponentSpec,
    model_path: Path,
    options: Mapping[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """The plan's providers with their onnxruntime options.

    CUDA: the plan's device, `cudnn_conv_algo_search` HEURISTIC unless the target says
    otherwise (EXHAUSTIVE times every convolution again at each new image size: seconds per
    size on a UNet), an arena that grows by what is asked (doubling can leave half the
    VRAM the plan counted on reserved and unused), and no TF32 for fp32 variants (10-bit
    mantissas would move them off the parity they recorded). TensorRT: fp16 kernels for
    fp16 variants only (likewise), engines and timing cache under the kiln cache folder, and
    one optimization profile spanning the spec's sizes, so a new image size does not
    rebuild the engine.
    """
    options = options or {}
    device_id = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    out: list[tuple[str, dict[str, Any]]] = []
    for name in names:
        if name == CUDA:
            settings: dict[str, Any] = {
                "device_id": device_id,
                "cudnn_conv_algo_search": "HEURISTIC",
                "arena_extend_strategy": "kSameAsRequested",
            }
            if precision is Precision.FP32:
                settings["use_tf32"] = 0
            settings.update({k: options[k] for k in CUDA_PLAN_OPTIONS if k in options})
            out.append((name, settings))
        elif name == TENSORRT:
            cache = str(tensorrt_provider_cache())
            settings = {
                "device_id": device_id,
                "trt_fp16_enable": precision is Precision.FP16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": cache,
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": cache,
            }
            settings.update(tensorrt_profile_options(spec, _graph_inputs(model_path)))
            out.append((name, settings))
        else:
            out.append((name, {}))
    return out


def tensorrt_provider_cache() -> Path:
    """Engines built by onnxruntime's TensorRT provider: $KILN_CACHE_DIR/onnxruntime-tensorrt
    or ~/.cache/kiln/onnxruntime-tensorrt."""
    root = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(root) / "onnxruntime-tensorrt"


def tensorrt_profile_options(spec: ComponentSpec, graph_inputs: Collection[str]) -> dict[str, str]:
    """`trt_profile_{min,opt,max}_shapes` ("name:1x4x64x64,...") of every dynamic input the
    graph has, from the spec's dims (the provider wants all of them or none)."""
    dims = spec.dims()
    dynamic = [
        t
        for t in spec.inputs
        if t.name in graph_inputs and any(isinstance(e, Dim) for e in t.shape)
    ]
    out = {}
    for level in ("min", "opt", "max"):
        sizes = {name: getattr(dim, level) for name, dim in dims.items()}
        out[f"trt_profile_{level}_shapes"] = ",".join(
            f"{t.name}:{'x'.join(str(s) for s in t.concrete_shape(sizes))}" for t in dynamic
        )
    return out if dynamic else {}


def _graph_inputs(path: Path) -> set[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    return {i.name for i in graph.input if i.name not in weights}


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


class OrtKVStream(KVStream):
    """The cache as onnxruntime's own output values, bound back as the next step's inputs.

    The constants are bound once; each step binds the small per-step inputs and the values
    the previous step returned, so no cached tensor crosses into numpy between steps. On a
    GPU provider the constants and the cache live in device memory; only the step's tokens
    go in and its logits come out through the host.
    """

    def __init__(
        self,
        session: OnnxRuntimeSession,
        constants: Mapping[str, np.ndarray],
        groups: np.ndarray | None = None,
    ) -> None:
        super().__init__(session.spec, constants, groups)
        self.session = session
        self._ort = session._ort
        self._binding = session._session.io_binding()
        gpu = session._cuda_device
        self._where = ("cpu", 0) if gpu is None else ("cuda", gpu)
        self._past: dict[str, Any] = {}
        self._bound: dict[str, Any] = {}  # values the binding reads: kept alive here
        self._constants_changed()

    def _constants_changed(self) -> None:
        for name, value in self.constants.items():
            self._bound[name] = self._ort.OrtValue.ortvalue_from_numpy(value, *self._where)
            self._binding.bind_ortvalue_input(name, self._bound[name])

    def _step(self, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        if not self._past:
            self._past = {
                name: self._ort.OrtValue.ortvalue_from_numpy(value)
                for name, value in self.empty_past(batch).items()
            }
        binding = self._binding
        for name, value in inputs.items():
            if name in self.session._input_names:
                self._bound[name] = self._ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(value)
                )
                binding.bind_ortvalue_input(name, self._bound[name])
        for name, value in self._past.items():
            binding.bind_ortvalue_input(name, value)
        binding.clear_binding_outputs()
        for name in self.session._output_names:
            binding.bind_output(name, *self._where)
        self.session._session.run_with_iobinding(binding)
        outputs = dict(zip(self.session._output_names, binding.get_outputs(), strict=True))
        self._past = {past: outputs[present] for past, present in self.pairs}
        return {k: v.numpy() for k, v in outputs.items() if k not in self._present}

    def _reorder(self, beam_idx: np.ndarray) -> None:
        self._past = {
            name: self._ort.OrtValue.ortvalue_from_numpy(
                np.take(value.numpy(), beam_idx, axis=0), *self._where
            )
            for name, value in self._past.items()
        }
