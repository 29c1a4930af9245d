"""torch `Session`: the component's own PyTorch module, rebuilt from configs, weights assigned.

The module is the export wrapper (`kiln.models.skeleton`), built with meta-device
parameters; the variant's safetensors file (`kiln.exporters.torch`) provides the weights.
Quantized storages are turned into kernels at load time:

- fp16 / bf16: the module runs in that dtype; float inputs are cast in (except diffusers'
  timestep inputs, which it embeds in fp32 itself) and outputs cast back to float32.
- int8: torchao `Int8WeightOnlyConfig` / `Int8DynamicActivationInt8WeightConfig` on the
  int8 Linear layers, then the stored codes and scales are put into torchao's tensors:
  torchao re-derives `scale = max|w| / 127.5` from the dequantized weights, which differs
  from the stored `max|w| / 127`, so re-quantizing alone would move every weight.
- int4: torchao `PrototypeInt4WeightOnlyConfig` (tinygemm CPU kernel) with bf16 activations
  (its fp32 path is ~80x slower), stored codes restored likewise; layers the kernel cannot
  take (out_features not a multiple of 16) keep their dequantized fp32 weights.
- nf4: bitsandbytes `Linear4bit` (nf4) built from the dequantized weights;
  bitsandbytes re-quantizes them to the same codes (the block absmax is exact in the
  dequantized block, and every value sits on a code).
- int8 embedding tables are dequantized to fp32 at load (no int8 embedding kernel).

On a CUDA device (fp32, fp16, bf16 variants) the weights are moved there once, at load;
`run_torch` takes tensors already there as they are and returns outputs there (the
adapters' device path). `compile=True` (plan option `compile`, off by default: the first
call at each new shape then compiles, minutes for a UNet) wraps the module in
`torch.compile`.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.artifacts import read_manifest
from kiln.errors import ArtifactError, BackendUnavailableError, InvalidRequestError
from kiln.exporters.torch import StoredState, read_state
from kiln.models.skeleton import build_wrapper, quiet_loggers
from kiln.models.spec import ComponentSpec
from kiln.quant.torch import (
    INT4_GROUPS,
    INT8_ROWS,
    KERNEL_FP32,
    KERNEL_INT4,
    KERNEL_INT4_DENSE,
    KERNEL_INT8,
    KERNEL_INT8_DYNAMIC,
    KERNEL_NF4,
    NF4_BLOCKS,
    dequantize,
    int4_kernel_problem,
    quantized_parts,
    unpack_low_first,
)
from kiln.runtimes.base import Session

COMPUTE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
QUANTIZED_STORAGES = ("int8", "int4", "nf4")
# UNet conditioning values diffusers turns into sinusoidal embeddings in fp32 before casting
# them: bf16 would round timestep 979 to 980 first.
KEEP_FP32_INPUTS = frozenset({"timestep", "time_ids"})
INT4_ACTIVATIONS = torch.bfloat16
NF4_PACKED = f"{KERNEL_NF4} (AVX512-BF16 packed kernel, bf16 compute)"
NF4_DEQUANTIZED = f"{KERNEL_NF4} (dequantize + fp32 matmul)"

TORCHAO_HINT = "pip install 'torchao>=0.18'"
BITSANDBYTES_HINT = "pip install 'bitsandbytes>=0.45'"


class TorchSession(Session):
    runtime = "torch"

    def __init__(
        self,
        model_path: str | Path,
        spec: ComponentSpec,
        *,
        root: str | Path,
        device: str = "cpu",
        compile: bool = False,
    ) -> None:
        self.spec = spec
        self.device = device
        self.path = Path(model_path)
        manifest = read_manifest(root)
        stored = read_state(self.path)
        _check_device(stored, device, self.path)
        module = build_wrapper(Path(root), manifest.family, manifest.model_info, spec.name)
        self.storage = stored.storage
        self.kernels = load_weights(module, stored, self.path)
        self.compute_dtype = COMPUTE_DTYPES.get(stored.storage, torch.float32)
        self.module = module if device == "cpu" else module.to(device)
        self._parameters = inspect.signature(self.module.forward).parameters
        self._originals: dict[str, torch.Tensor] = {}  # stored values of replaced weights
        self.compiled = compile
        # Weight swaps (LoRAs at load) change `self.module`'s parameters in place; the
        # compiled callable reads the same parameters.
        self._forward = torch.compile(self.module) if compile else self.module

    @property
    def tensor_device(self) -> torch.device:
        return torch.device(self.device)

    def run_on_device(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        arguments = [self._device_argument(name, inputs) for name in self.spec.input_names]
        # no_grad, not inference_mode: callers may update the outputs in place afterwards.
        with torch.no_grad():
            raw = self._forward(*arguments)
        raw = raw if isinstance(raw, tuple | list) else (raw,)
        return {
            name: tensor.to(torch.float32)
            for name, tensor in zip(self.spec.output_names, raw, strict=True)
        }

    def _device_argument(
        self, name: str, inputs: Mapping[str, torch.Tensor]
    ) -> torch.Tensor | None:
        if name not in inputs:
            return self._missing(name)
        given = inputs[name]
        tensor = given
        if tensor.is_floating_point():
            dtype = torch.float32 if name in KEEP_FP32_INPUTS else self.compute_dtype
            tensor = tensor.to(dtype)
        # A copy where the cast made none: a module may update an input in place.
        return tensor.clone() if tensor is given else tensor

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        arguments = [self._argument(name, inputs) for name in self.spec.input_names]
        with torch.inference_mode():
            raw = self._forward(*arguments)
        raw = raw if isinstance(raw, tuple | list) else (raw,)
        return {
            name: tensor.detach().to("cpu", torch.float32).numpy()
            for name, tensor in zip(self.spec.output_names, raw, strict=True)
        }

    def stored_weights(self, names: Collection[str]) -> dict[str, np.ndarray]:
        params = self._weights(names)
        return {
            name: self._originals.get(name, param.data).to("cpu", torch.float32).numpy().copy()
            for name, param in params.items()
        }

    def replace_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Swap parameter data in place; the stored tensors are kept for an exact restore."""
        params = self._weights([*values, *self._originals])
        for name in [n for n in self._originals if n not in values]:
            params[name].data = self._originals.pop(name)
        for name, value in values.items():
            original = self._originals.setdefault(name, params[name].data)
            params[name].data = torch.from_numpy(np.asarray(value, dtype=np.float32)).to(
                original.device, original.dtype
            )

    def _weights(self, names: Collection[str]) -> dict[str, torch.nn.Parameter]:
        if self.storage in QUANTIZED_STORAGES:
            raise InvalidRequestError(
                f"{self.spec.name} is stored {self.storage}; only fp32, fp16 and bf16 weights "
                "can change at load"
            )
        params = dict(self.module.named_parameters())
        missing = sorted(set(names) - set(params))
        if missing:
            raise ArtifactError(f"{self.path} has no weight {missing[0]!r}")
        return {name: params[name] for name in names}

    def _argument(self, name: str, inputs: Mapping[str, np.ndarray]) -> torch.Tensor | None:
        if name not in inputs:
            return self._missing(name)
        # A copy: a module may update an input in place, and the caller's array is not ours.
        tensor = torch.tensor(np.asarray(inputs[name]), device=self.device)
        if tensor.is_floating_point():
            dtype = torch.float32 if name in KEEP_FP32_INPUTS else self.compute_dtype
            tensor = tensor.to(dtype)
        return tensor

    def _missing(self, name: str) -> None:
        parameter = self._parameters.get(name)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            raise InvalidRequestError(f"{self.spec.name}: missing input {name}")
        return None  # an optional input (SDXL's added conditioning on other UNets)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "storage": self.storage,
            "kernels": dict(self.kernels),
            "compiled": self.compiled,
        }


def check_device(path: Path) -> str:
    """Where a one-off check (drift at `kiln quantize`) runs a torch variant: an fp16 one on
    the GPU when there is one, everything else on the CPU.

    fp16 convolutions on CPUs without fp16 arithmetic run about 85x slower than fp32
    (measured: 11 s against 0.13 s for one 320-channel 3x3 convolution at 32x32, AMD EPYC),
    so an SD 1.5 UNet's fp16 check would take hours there; fp16 variants are for GPUs.
    """
    from safetensors import safe_open

    if not torch.cuda.is_available():
        return "cpu"
    with safe_open(str(path), framework="pt") as handle:
        storage = (handle.metadata() or {}).get("storage")
    return "cuda:0" if storage == "fp16" else "cpu"


def _check_device(stored: StoredState, device: str, path: Path) -> None:
    if device != "cpu" and stored.storage in QUANTIZED_STORAGES:
        raise BackendUnavailableError(
            f"{path} is a {stored.storage} torch variant; kiln runs those on the CPU only "
            f"(requested device {device})"
        )


def load_weights(
    module: torch.nn.Module, stored: StoredState, path: Path, *, kernels: bool = True
) -> Counter:
    """Assign the file's weights to the meta-built `module`; returns kernels used, counted.

    `kernels=False` leaves quantized weights dequantized in fp32 modules: the reference a
    check compares the kernels with (same weights, no kernel arithmetic).
    """
    _assign(module, _logical_state(stored, path), stored.pruned, path)
    compute = COMPUTE_DTYPES.get(stored.storage)
    if compute is not None:
        _cast_float_buffers(module, compute)
        return Counter({f"torch {stored.storage}": 1})
    if stored.storage not in QUANTIZED_STORAGES:
        return Counter({"torch fp32": 1})
    if not kernels:
        return Counter({"dequantized fp32 (no kernels)": 1})
    return _attach_kernels(module, stored)


def _logical_state(stored: StoredState, path: Path) -> dict[str, torch.Tensor]:
    """Every state-dict key the file stands for: quantized weights decoded, aliases filled."""
    state = stored.plain_tensors()
    try:
        for key, layout in stored.quantized.items():
            state[key] = dequantize(key, layout, stored.tensors)
        for alias, target in stored.aliases.items():
            state[alias] = state[target]
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} holds inconsistent quantized weights ({exc})") from None
    return state


def _assign(
    module: torch.nn.Module, state: dict[str, torch.Tensor], pruned: tuple[str, ...], path: Path
) -> None:
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"{path} does not fit the model rebuilt from the artifact's configs: "
            f"{_first_problem(exc)}"
        ) from None
    missing = [key for key in result.missing_keys if not key.startswith(pruned)]
    if missing or result.unexpected_keys:
        what = (
            f"{len(missing)} weights missing (first: {missing[0]})"
            if missing
            else f"{len(result.unexpected_keys)} unknown weights (first: {result.unexpected_keys[0]})"
        )
        raise ArtifactError(
            f"{path} does not fit the model rebuilt from the artifact's configs: {what}"
        )
    module.eval()


def _first_problem(exc: Exception) -> str:
    """The first specific line of a load_state_dict error (its first line is a header)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)


def _cast_float_buffers(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Buffers the file does not hold (non-persistent ones) follow the module's dtype."""
    for child in module.modules():
        for name, buffer in child._buffers.items():
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                child._buffers[name] = buffer.to(dtype)


def _attach_kernels(module: torch.nn.Module, stored: StoredState) -> Counter:
    """Give every quantized Linear its kernel; returns kernel name -> layer count."""
    by_layout: dict[str, dict[str, dict[str, Any]]] = {
        INT8_ROWS: {},
        INT4_GROUPS: {},
        NF4_BLOCKS: {},
    }
    kernels: Counter = Counter()
    for path, child in module.named_modules():
        if not isinstance(child, torch.nn.Linear):
            continue
        key = stored.canonical(f"{path}.weight")
        layout = stored.quantized.get(key)
        if layout is None:
            kernels[KERNEL_FP32] += 1
            continue
        by_layout[layout["layout"]][path] = {**layout, "key": key}
    int4, dense = _split_int4(by_layout[INT4_GROUPS])
    dynamic = stored.details.get("method") == "dynamic"
    kernels.update(_torchao_int8(module, by_layout[INT8_ROWS], stored, dynamic))
    kernels.update(_torchao_int4(module, int4, stored))
    kernels.update(_bitsandbytes_nf4(module, by_layout[NF4_BLOCKS]))
    if dense:
        kernels[KERNEL_INT4_DENSE] += len(dense)
    return kernels


def _split_int4(layers: dict[str, dict[str, Any]]) -> tuple[dict, dict]:
    """(layers torchao's CPU int4 kernel takes, layers left as dequantized fp32)."""
    fits = {
        p: v for p, v in layers.items() if not int4_kernel_problem(v["shape"][0], v["group_size"])
    }
    return fits, {p: v for p, v in layers.items() if p not in fits}


def _torchao() -> Any:
    """torchao, imported quietly (its optional CUDA extensions log load failures on CPU)."""
    try:
        with quiet_loggers():
            import torchao
            import torchao.prototype.quantization.int4
            import torchao.quantization
            import torchao.quantization.utils  # noqa: F401
    except ImportError as exc:
        raise BackendUnavailableError(
            f"this torch variant runs on torchao, which cannot be imported ({exc}): {TORCHAO_HINT}"
        ) from None
    return torchao


def _torchao_int8(
    module: torch.nn.Module, layers: dict[str, dict[str, Any]], stored: StoredState, dynamic: bool
) -> Counter:
    if not layers:
        return Counter()
    torchao = _torchao()
    quantization = torchao.quantization
    if dynamic:
        config = quantization.Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    else:
        config = quantization.Int8WeightOnlyConfig(set_inductor_config=False)
    quantization.quantize_(module, config, filter_fn=lambda _, fqn: fqn in layers)
    for path, layout in layers.items():
        codes, scale, _ = quantized_parts(layout["key"], layout, stored.tensors)
        weight = module.get_submodule(path).weight
        _restore(weight.qdata, codes, path)
        _restore(weight.scale, scale.reshape(weight.scale.shape).to(weight.scale.dtype), path)
    return Counter({KERNEL_INT8_DYNAMIC if dynamic else KERNEL_INT8: len(layers)})


def _torchao_int4(
    module: torch.nn.Module, layers: dict[str, dict[str, Any]], stored: StoredState
) -> Counter:
    if not layers:
        return Counter()
    torchao = _torchao()
    for group_size in sorted({layout["group_size"] for layout in layers.values()}):
        paths = {p for p, v in layers.items() if v["group_size"] == group_size}
        _quantize_int4(torchao, module, paths, group_size)
    for path, layout in layers.items():
        linear = module.get_submodule(path)
        _restore_int4(torchao, linear, path, quantized_parts(layout["key"], layout, stored.tensors))
        linear.register_forward_pre_hook(_activations_to_bf16)
        linear.register_forward_hook(_outputs_to_fp32)
    return Counter({KERNEL_INT4: len(layers)})


def _quantize_int4(torchao: Any, module: torch.nn.Module, paths: set[str], group_size: int) -> None:
    """torchao's CPU int4 layout on `paths`; bf16 weights so the kernel runs in bf16."""
    for path in paths:
        module.get_submodule(path).to(INT4_ACTIVATIONS)
    config = torchao.prototype.quantization.int4.PrototypeInt4WeightOnlyConfig(
        group_size=group_size, set_inductor_config=False
    )
    torchao.quantization.quantize_(module, config, filter_fn=lambda _, fqn: fqn in paths)


def _restore_int4(torchao: Any, linear: torch.nn.Module, path: str, parts: tuple) -> None:
    """Put the stored codes, scales and zeros into torchao's packed int4 tensor."""
    packed, scale, zero = parts
    codes = unpack_low_first(packed).to(torch.int32)
    zero = torch.zeros_like(scale) if zero is None else zero
    pack_scales = torchao.quantization.utils.pack_tinygemm_scales_and_zeros
    scale_and_zero = pack_scales(
        scale.to(INT4_ACTIVATIONS), zero.to(INT4_ACTIVATIONS), INT4_ACTIVATIONS
    )
    weight = linear.weight
    _restore(weight.qdata, torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1), path)
    _restore(weight.scale_and_zero, scale_and_zero, path)


def _restore(target: torch.Tensor, stored: torch.Tensor, path: str) -> None:
    """Overwrite a torchao tensor's data with the stored codes/scales, shapes checked."""
    if target.shape != stored.shape or target.dtype != stored.dtype:
        raise ArtifactError(
            f"{path}: torchao laid out {tuple(target.shape)} {target.dtype} where kiln stored "
            f"{tuple(stored.shape)} {stored.dtype}; this torchao version is not supported"
        )
    target.copy_(stored)


def _activations_to_bf16(module: torch.nn.Module, args: tuple) -> tuple:
    return (args[0].to(INT4_ACTIVATIONS), *args[1:])


def _outputs_to_fp32(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.to(torch.float32)


def _bitsandbytes() -> Any:
    """bitsandbytes, imported quietly (it logs that an optional CPU kernel package is absent)."""
    try:
        with quiet_loggers():
            import bitsandbytes
    except ImportError as exc:
        raise BackendUnavailableError(
            f"this nf4 torch variant runs on bitsandbytes, which cannot be imported ({exc}): "
            f"{BITSANDBYTES_HINT}"
        ) from None
    return bitsandbytes


def _bitsandbytes_nf4(module: torch.nn.Module, layers: dict[str, dict[str, Any]]) -> Counter:
    if not layers:
        return Counter()
    bnb = _bitsandbytes()
    kernels: Counter = Counter()
    for path, layout in layers.items():
        new = _linear4bit(bnb, module.get_submodule(path), layout["group_size"])
        parent_path, _, name = path.rpartition(".")
        setattr(module.get_submodule(parent_path), name, new.eval())
        packed = new.support_avx512bf16_for_cpu
        kernels[NF4_PACKED if packed else NF4_DEQUANTIZED] += 1
    return kernels


def _linear4bit(bnb: Any, old: torch.nn.Linear, block_size: int) -> torch.nn.Module:
    """A bitsandbytes nf4 layer quantized from `old`'s (dequantized) weight."""
    new = bnb.nn.Linear4bit(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        compute_dtype=torch.float32,
        compress_statistics=False,  # fp32 absmax, as stored (no double quantization)
        quant_type="nf4",
        device="meta",
    )
    weight = bnb.nn.Params4bit(
        old.weight.data,
        requires_grad=False,
        compress_statistics=False,
        blocksize=block_size,
        quant_type="nf4",
        module=new,
    )
    new.weight = weight.to("cpu")  # bitsandbytes quantizes when the weight is placed
    new.bias = old.bias
    # On AVX512-BF16 CPUs bitsandbytes repacks the weight on the first call for a bf16
    # kernel (about 3x faster than its fp32 path here) that asserts on shapes it cannot
    # tile: out_features not a multiple of 32, or blocks that straddle rows.
    fits = old.out_features % 32 == 0 and old.in_features % block_size == 0
    new.support_avx512bf16_for_cpu = bool(new.support_avx512bf16_for_cpu) and fits
    return new
