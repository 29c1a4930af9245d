"""Quantize a torch variant: kiln's own weight layouts, stored as plain safetensors tensors.

torchao's and bitsandbytes' quantized tensors are subclasses that only pickle, and
artifacts never hold pickles; so weights are stored in the layouts below and the runtime
(`kiln.runtimes.torch`) hands them to torchao / bitsandbytes kernels at load time.

Storage per precision (a quantized tensor `K` is stored as `K.qdata` plus its scales;
`quantized[K]` in the file's metadata names its layout and original shape):

- fp16 / bf16 (CAST): every floating tensor in that dtype, norms included: PyTorch's CPU
  LayerNorm/GroupNorm accumulate half inputs in fp32 already, so fp32 norm weights would
  buy no accuracy and would need casts around every norm.
- int8 (WEIGHT_ONLY, DYNAMIC): `int8-per-row`: Linear and Embedding weights int8 with one
  fp32 scale per output channel (per token row for embeddings), `w = q * scale`,
  `scale = max|row| / 127`. Embeddings are int8 too: a text encoder's token table is a
  quarter of its weights, and keeping it fp32 would leave the file above 30% of fp32.
- int4 (WEIGHT_ONLY): `int4-group`: Linear weights in groups of `group_size` along the
  input axis, codes 0..15 packed two per byte (low nibble first), `w = (code - 8) * scale
  + zero` (torchao's tinygemm convention, so codes go to the kernel unchanged). Symmetric:
  no zero; the scale carries the sign of the group's largest-magnitude weight, which lands
  exactly on code 0 (as in llama.cpp Q4_0 and onnxruntime's MatMulNBits). Asymmetric:
  `scale = (max - min) / 15`, `zero = min + 8 * scale`.
- nf4 (WEIGHT_ONLY): `nf4-block`: bitsandbytes' layout: the flattened weight in blocks of
  `group_size` (whole blocks per row), an fp32 absmax per block, NF4 codes packed two per
  byte (high nibble first).
- In 4-bit variants, Embedding tables are `int8-per-row`, and so are Linear layers whose
  input size is not a multiple of the group. Convolutions, norms and biases stay fp32.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.errors import InvalidRequestError
from kiln.exporters.torch import FP32, MODEL_FILE, StoredState, read_state, write_state
from kiln.models.spec import ComponentSpec, Precision
from kiln.quant.base import Feeds, QuantizedGraph, StepCallback
from kiln.quant.recipes import QuantMethod, QuantRecipe

INT8_ROWS = "int8-per-row"
INT4_GROUPS = "int4-group"
NF4_BLOCKS = "nf4-block"
LAYOUT_VERSION = 1

# bitsandbytes' NF4 code book (`bitsandbytes.functional.get_4bit_type("nf4")`), kept here
# so that quantizing needs no bitsandbytes; a test checks it against the library.
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# torchao's CPU int4 kernel (aten._weight_int4pack_mm_for_cpu) takes these group sizes and
# needs out_features divisible by 16; bitsandbytes takes blocks of 32 to 4096.
INT4_GROUP_SIZES = (32, 64, 128)
INT4_OUT_MULTIPLE = 16
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# Layer kinds reported in `layers`: the ones holding the bulk of the weights.
REPORTED_KINDS = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d")
CASTS = {Precision.FP16: torch.float16, Precision.BF16: torch.bfloat16}
# What the runtime runs each Linear with; `details.load_kernel` and sessions count these.
KERNEL_INT8 = "torchao Int8WeightOnlyConfig"
KERNEL_INT8_DYNAMIC = "torchao Int8DynamicActivationInt8WeightConfig"
KERNEL_INT4 = "torchao PrototypeInt4WeightOnlyConfig (tinygemm, bf16 activations)"
KERNEL_INT4_DENSE = "dequantized fp32 (out_features not a multiple of 16)"
KERNEL_NF4 = "bitsandbytes Linear4bit nf4"
KERNEL_FP32 = "fp32 torch.nn.Linear"
_EPS = torch.finfo(torch.float32).tiny


# --- int8, one scale per row ---------------------------------------------------------


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, fp32 scale per row): symmetric, `w ~ q * scale`, q in [-127, 127]."""
    weight = weight.float()
    scale = weight.abs().amax(dim=1).clamp(min=_EPS) / 127.0
    codes = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8_rows(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float()[:, None]


# --- int4, groups along the input axis -------------------------------------------------


def quantize_int4_groups(
    weight: torch.Tensor, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(packed codes [N, K/2] uint8, scale [N, K/group], zero [N, K/group] or None)."""
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group_size, group_size)
    if symmetric:
        # The signed extreme of each group maps to code 0 (value -8) exactly.
        extreme = groups.gather(2, groups.abs().argmax(dim=2, keepdim=True)).squeeze(2)
        scale = torch.where(extreme == 0, torch.full_like(extreme, _EPS), extreme / -8.0)
        zero = None
        codes = torch.round(groups / scale[..., None]) + 8
    else:
        low, high = groups.amin(dim=2), groups.amax(dim=2)
        scale = ((high - low) / 15.0).clamp(min=_EPS)
        zero = low + 8.0 * scale
        codes = torch.round((groups - low[..., None]) / scale[..., None])
    codes = codes.clamp(0, 15).to(torch.uint8).reshape(rows, columns)
    return pack_low_first(codes), scale, zero


def dequantize_int4_groups(
    packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group_size: int
) -> torch.Tensor:
    codes = unpack_low_first(packed).float()
    rows, columns = codes.shape
    groups = (codes.reshape(rows, columns // group_size, group_size) - 8) * scale[..., None]
    if zero is not None:
        groups = groups + zero[..., None]
    return groups.reshape(rows, columns)


def pack_low_first(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte along the last axis: element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_low_first(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


# --- nf4, bitsandbytes' blocks ---------------------------------------------------------


def quantize_nf4_blocks(weight: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, absmax per block) in bitsandbytes' layout; rows split into whole blocks."""
    blocks = weight.float().reshape(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalized = blocks / absmax.clamp(min=_EPS)[:, None]
    code = torch.tensor(NF4_CODE)
    # The nearest code value: bucketize against the midpoints between neighbours.
    codes = torch.bucketize(normalized.flatten(), (code[1:] + code[:-1]) / 2).to(torch.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def dequantize_nf4_blocks(
    packed: torch.Tensor, absmax: torch.Tensor, block_size: int, shape: Sequence[int]
) -> torch.Tensor:
    codes = torch.stack([packed >> 4, packed & 0x0F], dim=-1).flatten()
    values = torch.tensor(NF4_CODE)[codes.long()].reshape(-1, block_size)
    return (values * absmax.float()[:, None]).reshape(tuple(shape))


# --- reading a stored layout back ------------------------------------------------------


def quantized_parts(key: str, layout: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]):
    """The stored tensors of quantized tensor `key`: (qdata, scale, zero-or-None)."""
    scale_name = "absmax" if layout["layout"] == NF4_BLOCKS else "scale"
    return tensors[f"{key}.qdata"], tensors[f"{key}.{scale_name}"], tensors.get(f"{key}.zero")


def dequantize(
    key: str, layout: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """The fp32 weight a stored layout stands for."""
    qdata, scale, zero = quantized_parts(key, layout, tensors)
    kind = layout["layout"]
    if kind == INT8_ROWS:
        weight = dequantize_int8_rows(qdata, scale)
    elif kind == INT4_GROUPS:
        weight = dequantize_int4_groups(qdata, scale, zero, layout["group_size"])
    elif kind == NF4_BLOCKS:
        weight = dequantize_nf4_blocks(qdata, scale, layout["group_size"], layout["shape"])
    else:
        raise ValueError(f"unknown weight layout {kind!r}")
    if list(weight.shape) != list(layout["shape"]):
        raise ValueError(f"{key} decodes to {list(weight.shape)}, metadata says {layout['shape']}")
    return weight


def layout_precision(layout: Mapping[str, Any] | None, storage: str) -> str:
    """The precision label of one stored weight, for `layers`."""
    if layout is None:
        return storage if storage in ("fp16", "bf16") else FP32
    return {INT8_ROWS: "int8", INT4_GROUPS: "int4", NF4_BLOCKS: "nf4"}[layout["layout"]]


def int4_kernel_problem(out_features: int, group_size: int) -> str:
    """Why torchao's CPU int4 kernel cannot run a layer ('' when it can)."""
    if group_size not in INT4_GROUP_SIZES:
        return f"group size {group_size} is not one of {INT4_GROUP_SIZES}"
    if out_features % INT4_OUT_MULTIPLE:
        return f"out_features {out_features} is not a multiple of {INT4_OUT_MULTIPLE}"
    return ""


# --- the backend -----------------------------------------------------------------------


def quantize_torch(
    source: Path,
    entry: str,
    spec: ComponentSpec,
    recipe: QuantRecipe,
    calibration: Sequence[Feeds],
    out: Path,
    progress: StepCallback,
) -> QuantizedGraph:
    """Quantize the fp32 torch variant `source/entry` into the empty folder `out`."""
    _check_recipe(recipe)
    progress("reading fp32 weights")
    fp32 = read_state(Path(source) / entry)
    if fp32.storage != FP32:
        raise InvalidRequestError(
            f"{Path(source) / entry} stores {fp32.storage}; quantize from the fp32 torch variant"
        )
    progress(f"quantizing weights to {recipe.precision.value}")
    if recipe.method is QuantMethod.CAST:
        quantized = _cast(fp32, CASTS[recipe.precision])
    else:
        quantized = _quantize_weights(fp32, recipe)
    progress("writing weights")
    write_state(Path(out) / MODEL_FILE, quantized)
    return QuantizedGraph(
        entry=MODEL_FILE, layers=written_layers(quantized), details=_details(quantized, recipe)
    )


def _check_recipe(recipe: QuantRecipe) -> None:
    precision, method = recipe.precision, recipe.method
    allowed = {
        Precision.FP16: (QuantMethod.CAST,),
        Precision.BF16: (QuantMethod.CAST,),
        Precision.INT8: (QuantMethod.WEIGHT_ONLY, QuantMethod.DYNAMIC),
        Precision.INT4: (QuantMethod.WEIGHT_ONLY,),
        Precision.NF4: (QuantMethod.WEIGHT_ONLY,),
    }
    if method not in allowed.get(precision, ()):
        raise InvalidRequestError(f"torch has no {precision.value} {method.value} quantization")
    if recipe.ratio != 1.0:
        raise InvalidRequestError(
            f"torch quantizes every eligible layer; ratio {recipe.ratio} (a share of 4-bit "
            "layers) is an OpenVINO option"
        )
    group = recipe.group_size
    if precision is Precision.INT4 and group not in INT4_GROUP_SIZES:
        raise InvalidRequestError(
            f"torch int4 runs on torchao's CPU kernel, which takes group sizes "
            f"{', '.join(map(str, INT4_GROUP_SIZES))}; got {group}"
        )
    if precision is Precision.NF4 and group not in NF4_BLOCK_SIZES:
        raise InvalidRequestError(
            f"bitsandbytes nf4 takes block sizes {NF4_BLOCK_SIZES[0]} to {NF4_BLOCK_SIZES[-1]}; "
            f"got {group}"
        )


def _cast(state: StoredState, dtype: torch.dtype) -> StoredState:
    tensors = {
        key: tensor.to(dtype) if tensor.is_floating_point() else tensor
        for key, tensor in state.tensors.items()
    }
    storage = "fp16" if dtype == torch.float16 else "bf16"
    return _derived(state, tensors, {}, storage, {})


def _quantize_weights(state: StoredState, recipe: QuantRecipe) -> StoredState:
    plan = _plan_layouts(state, recipe)
    tensors: dict[str, torch.Tensor] = {}
    layouts: dict[str, dict[str, Any]] = {}
    for key, tensor in state.tensors.items():
        layout = plan.get(key)
        if layout is None:
            tensors[key] = tensor
            continue
        tensors.update(_encode(key, tensor, layout))
        layouts[key] = {**layout, "shape": list(tensor.shape), "version": LAYOUT_VERSION}
    details = {"method": recipe.method.value}
    return _derived(state, tensors, layouts, recipe.precision.value, details)


def _derived(
    state: StoredState,
    tensors: dict[str, torch.Tensor],
    layouts: dict[str, dict[str, Any]],
    storage: str,
    details: dict[str, Any],
) -> StoredState:
    return StoredState(
        tensors=tensors,
        storage=storage,
        aliases=dict(state.aliases),
        pruned=state.pruned,
        modules=dict(state.modules),
        quantized=layouts,
        details=details,
    )


def _weight_users(state: StoredState) -> dict[str, list[str]]:
    """Stored weight key -> kinds of the modules that use it (tied weights have several)."""
    users: dict[str, list[str]] = defaultdict(list)
    for path, kind in state.modules.items():
        users[state.canonical(f"{path}.weight")].append(kind)
    return users


def _plan_layouts(state: StoredState, recipe: QuantRecipe) -> dict[str, dict[str, Any]]:
    """Stored key -> layout for every weight this recipe quantizes."""
    precision, group = recipe.precision, recipe.group_size
    plan: dict[str, dict[str, Any]] = {}
    for key, kinds in _weight_users(state).items():
        tensor = state.tensors.get(key)
        if tensor is None or tensor.dim() != 2 or not tensor.is_floating_point():
            continue
        if "Embedding" in kinds or (precision is Precision.INT8 and "Linear" in kinds):
            # A weight tied between an embedding and an LM head is a row table for both.
            plan[key] = {"layout": INT8_ROWS}
        elif "Linear" in kinds and tensor.shape[1] % group:
            # int4 groups run along rows; bitsandbytes 0.50's CPU nf4 dequantization
            # decodes blocks that straddle rows wrongly (up to 4x the quantization error).
            plan[key] = {"layout": INT8_ROWS, "reason": f"in_features not a multiple of {group}"}
        elif "Linear" in kinds and precision is Precision.NF4:
            plan[key] = {"layout": NF4_BLOCKS, "group_size": group}
        elif "Linear" in kinds:
            plan[key] = {"layout": INT4_GROUPS, "group_size": group, "symmetric": recipe.symmetric}
    return plan


def _encode(key: str, tensor: torch.Tensor, layout: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    kind = layout["layout"]
    if kind == INT8_ROWS:
        codes, scale = quantize_int8_rows(tensor)
        return {f"{key}.qdata": codes, f"{key}.scale": scale}
    if kind == INT4_GROUPS:
        packed, scale, zero = quantize_int4_groups(
            tensor, layout["group_size"], layout["symmetric"]
        )
        parts = {f"{key}.qdata": packed, f"{key}.scale": scale}
        return parts if zero is None else {**parts, f"{key}.zero": zero}
    packed, absmax = quantize_nf4_blocks(tensor, layout["group_size"])
    return {f"{key}.qdata": packed, f"{key}.absmax": absmax}


def written_layers(state: StoredState) -> dict[str, dict[str, int]]:
    """Layer kind -> precision -> count, read from what a file actually holds."""
    counts: dict[str, Counter] = defaultdict(Counter)
    for path, kind in state.modules.items():
        if kind not in REPORTED_KINDS:
            continue
        key = state.canonical(f"{path}.weight")
        counts[kind][layout_precision(state.quantized.get(key), state.storage)] += 1
    return {kind: dict(counter) for kind, counter in sorted(counts.items())}


def _details(state: StoredState, recipe: QuantRecipe) -> dict[str, Any]:
    details: dict[str, Any] = {
        "format": f"kiln-torch-state-dict/1, storage {state.storage}",
        "layouts": sorted({layout["layout"] for layout in state.quantized.values()}),
        "layout_version": LAYOUT_VERSION,
        "torch": torch.__version__,
    }
    if recipe.method is QuantMethod.CAST:
        details["load_kernel"] = f"torch {state.storage} modules (inputs cast in, outputs to fp32)"
        return details
    details["group_size"] = recipe.group_size
    details["symmetric"] = recipe.symmetric
    details["load_kernel"] = _load_kernels(state, recipe)
    fallbacks = {k: v["reason"] for k, v in state.quantized.items() if "reason" in v}
    if fallbacks:
        details["int8_instead_of_4bit"] = fallbacks
    for package in ("torchao", "bitsandbytes"):
        details[f"{package}_version"] = _version(package)
    return details


def _load_kernels(state: StoredState, recipe: QuantRecipe) -> dict[str, int]:
    """What the runtime will run each Linear with, counted (embeddings are dequantized)."""
    int8 = KERNEL_INT8_DYNAMIC if recipe.method is QuantMethod.DYNAMIC else KERNEL_INT8
    counts: Counter = Counter()
    for path, kind in state.modules.items():
        if kind != "Linear":
            continue
        layout = state.quantized.get(state.canonical(f"{path}.weight"))
        if layout is None:
            counts[KERNEL_FP32] += 1
        elif layout["layout"] == INT8_ROWS:
            counts[int8] += 1
        elif layout["layout"] == NF4_BLOCKS:
            counts[KERNEL_NF4] += 1
        elif int4_kernel_problem(layout["shape"][0], layout["group_size"]):
            counts[KERNEL_INT4_DENSE] += 1
        else:
            counts[KERNEL_INT4] += 1
    return dict(counts)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"
