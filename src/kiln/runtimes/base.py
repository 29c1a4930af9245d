"""The runtime side's one idea: a `Session` runs one component's graph on named tensors.

Every backend (onnxruntime, OpenVINO, TensorRT, torch) implements `Session`; adapters turn
a session back into the module a diffusers or transformers pipeline expects.
"""

from __future__ import annotations

import abc
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.errors import InvalidRequestError

if TYPE_CHECKING:
    import torch

    from kiln.models.spec import ComponentSpec


class Session(abc.ABC):
    """A loaded, ready-to-run component."""

    spec: ComponentSpec
    runtime: str
    device: str

    @abc.abstractmethod
    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on numpy inputs named as in the spec; return outputs named as in the spec."""

    def run_torch(self, **inputs: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Run on torch tensors (the adapters' path): validates shapes against the spec."""
        import torch

        arrays = {
            name: to_numpy(value, self.spec, name)
            for name, value in inputs.items()
            if value is not None
        }
        problem = self.spec.check_sizes({name: array.shape for name, array in arrays.items()})
        if problem is not None:
            raise InvalidRequestError(f"{self.spec.name}: {problem}")
        return {
            name: torch.from_numpy(np.ascontiguousarray(out))
            for name, out in self.run(arrays).items()
        }

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


def to_numpy(value: Any, spec: ComponentSpec, name: str) -> np.ndarray:
    """A contiguous numpy array of the dtype the spec declares for input `name`."""
    tensor_spec = next((t for t in spec.inputs if t.name == name), None)
    if tensor_spec is None:
        raise InvalidRequestError(
            f"{spec.name} has no input {name!r} (inputs: {', '.join(spec.input_names)})"
        )
    if hasattr(value, "detach"):
        value = value.detach().to("cpu")
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.ascontiguousarray(np.asarray(value, dtype=tensor_spec.dtype.numpy))
