"""The runtime side's one idea: a `Session` runs one component's graph on named tensors.

Every backend (onnxruntime, OpenVINO, TensorRT, torch) implements `Session`; adapters turn
a session back into the module a diffusers or transformers pipeline expects.

Two ways in: `run` takes and returns numpy arrays on the host; `run_torch` (the adapters')
takes torch tensors and returns them on the inputs' device. A runtime that works on device
memory (onnxruntime's CUDA and TensorRT providers through IO binding, TensorRT, torch on a
GPU) names that device in `tensor_device` and implements `run_on_device`, so a denoising
loop whose tensors live there never copies them to the host and back.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

    from kiln.models.spec import ComponentSpec, TensorSpec
    from kiln.runtimes.kv_cache import KVStream


class Session(abc.ABC):
    """A loaded, ready-to-run component."""

    spec: ComponentSpec
    runtime: str
    device: str

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on numpy inputs named as in the spec; return outputs named as in the spec."""

    @property
    def tensor_device(self) -> torch.device:
        """Where this session reads and writes torch tensors without a trip through the host.

        Host runtimes (and OpenVINO, whose device plugins take host memory): the CPU. GPU
        runtimes override it, and `run_on_device`, never `run_torch`.
        """
        import torch

        return torch.device("cpu")

    def run_torch(self, **inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Run on torch tensors (the adapters' path); outputs come back where the inputs are.

        Shapes are checked against the spec. Inputs on `tensor_device` go to `run_on_device`
        (cast to the spec's dtypes there) and stay on that device; inputs anywhere else go
        through `run` on the host, and the outputs are moved to the inputs' device.
        """
        given = {name: value for name, value in inputs.items() if value is not None}
        for name in given:
            input_spec(self.spec, name)
        problem = self.spec.check_sizes({name: _shape(value) for name, value in given.items()})
        if problem is not None:
            raise InvalidRequestError(f"{self.spec.name}: {problem}")
        device = device_of(given.values())
        if same_device(device, self.tensor_device):
            return self.run_on_device(
                {name: to_tensor(value, self.spec, name, device) for name, value in given.items()}
            )
        return self._run_on_host(given, device)

    def run_on_device(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Run on inputs already checked, cast to the spec's dtypes and on `tensor_device`;
        the outputs stay there. This default goes through `run` (numpy on the host)."""
        return self._run_on_host(inputs, self.tensor_device)

    def _run_on_host(
        self, inputs: Mapping[str, Any], device: torch.device
    ) -> dict[str, torch.Tensor]:
        import torch

        arrays = {name: to_numpy(value, self.spec, name) for name, value in inputs.items()}
        outputs = {
            name: torch.from_numpy(np.ascontiguousarray(out))
            for name, out in self.run(arrays).items()
        }
        if device.type == "cpu":
            return outputs
        return {name: tensor.to(device) for name, tensor in outputs.items()}

    def open_kv_stream(
        self, constants: Mapping[str, np.ndarray], groups: np.ndarray | None = None
    ) -> KVStream:
        """The key/value cache of one generate() call on this decoder-with-past session.

        Runtimes that can keep the cache themselves override this (`kiln.runtimes.kv_cache`).
        """
        from kiln.runtimes.kv_cache import CopyingKVStream

        return CopyingKVStream(self, constants, groups)

    def stored_weights(self, names: Collection[str]) -> dict[str, np.ndarray]:
        """The named graph weights as stored (float32), read from the files, not the runtime."""
        raise InvalidRequestError(
            f"{self.spec.name} runs on {self.runtime}, which cannot take new weights at load"
        )

    def replace_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Run with these graph weights instead of the stored ones (LoRAs switched at load).

        Each call replaces the previous one's values; `{}` restores the stored weights exactly.
        The rest of the model stays as loaded.
        """
        raise InvalidRequestError(
            f"{self.spec.name} runs on {self.runtime}, which cannot take new weights at load"
        )

    def release_memory(self) -> None:  # noqa: B027 (a no-op where a runtime keeps none)
        """Free scratch memory kept between calls; the next call allocates it again."""

    def describe(self) -> dict[str, Any]:
        return {"component": self.spec.name, "runtime": self.runtime, "device": self.device}


def input_spec(spec: ComponentSpec, name: str) -> TensorSpec:
    """The spec of input `name`; a readable error naming the inputs when there is none."""
    tensor_spec = next((t for t in spec.inputs if t.name == name), None)
    if tensor_spec is None:
        raise InvalidRequestError(
            f"{spec.name} has no input {name!r} (inputs: {', '.join(spec.input_names)})"
        )
    return tensor_spec


def device_of(values: Iterable[Any]) -> torch.device:
    """The device of the first tensor not on the CPU among `values`, else the CPU."""
    import torch

    for value in values:
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            return value.device
    return torch.device("cpu")


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` are one device (torch's own `==` says they differ)."""
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def to_tensor(value: Any, spec: ComponentSpec, name: str, device: torch.device) -> torch.Tensor:
    """A contiguous tensor of the spec's dtype for input `name` on `device` (the value
    itself when it already is one)."""
    import torch

    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    dtype = input_spec(spec, name).dtype.torch()
    return tensor.detach().to(device=device, dtype=dtype).contiguous()


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else np.shape(value)


def to_numpy(value: Any, spec: ComponentSpec, name: str) -> np.ndarray:
    """A contiguous numpy array of the dtype the spec declares for input `name`."""
    tensor_spec = input_spec(spec, name)
    if hasattr(value, "detach"):
        value = value.detach().to("cpu")
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=tensor_spec.dtype.numpy))
