"""The torch target: safetensors export, TorchSession, and torch quantization cells.

Error figures below are relative: max |got - expected| / max |expected| over a component's
outputs, on the parity-size sample inputs. The tiny models have random weights (std 0.2),
which quantize worse than trained ones, so the 4-bit budgets against fp32 are wide; the
kernels themselves are checked tightly against the same dequantized weights run densely.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
from kiln.artifacts import read_manifest
from kiln.errors import ArtifactError, BackendUnavailableError, InvalidRequestError
from kiln.exporters.torch import MODEL_FILE, export_torch, read_state, write_state
from kiln.exporters.weight_map import WEIGHT_MAP_FILE
from kiln.models.skeleton import build_wrapper
from kiln.models.spec import ComponentSpec, DType, Precision, TensorSpec
from kiln.models.tiny_captioning import save_model
from kiln.quant import torch as quant
from kiln.quant.recipes import recipe_for
from kiln.runtimes.torch import TorchSession, load_weights

SD_COMPONENTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
BLIP_COMPONENTS = ("vision_encoder", "cross_attention_kv", "text_decoder")
# 4-bit cells on the tiny models use groups of 32 so that their 32/64-wide layers are 4-bit.
TINY_GROUP = 32

# (precision, method) -> component -> relative error budget against the fp32 session.
# Measured on this box (in brackets), budgets about 2-3x that.
VS_FP32 = {
    ("fp16", "cast"): {"text_encoder": 5e-3, "unet": 5e-3},  # [1.1e-3, 1.5e-3]
    ("bf16", "cast"): {"text_encoder": 3e-2, "unet": 3e-2},  # [8.8e-3, 1.2e-2]
    ("int8", "weight-only"): {
        "text_encoder": 4e-2,  # [1.4e-2]
        "unet": 5e-3,  # [1.3e-3]
        "text_decoder": 8e-2,  # [3.0e-2]
    },
    ("int8", "dynamic"): {
        "text_encoder": 5e-2,  # [1.8e-2]
        "unet": 1e-2,  # [3.0e-3]
        "text_decoder": 1.2e-1,  # [4.8e-2]
    },
    ("int4", "weight-only"): {
        "text_encoder": 0.45,  # [0.19]
        "unet": 6e-2,  # [2.2e-2]
        "text_decoder": 0.45,  # [0.21]
    },
    ("nf4", "weight-only"): {
        "text_encoder": 0.45,  # [0.19]
        "unet": 6e-2,  # [2.2e-2]
        "text_decoder": 0.45,  # [0.19]
    },
}
# Kernels against the dequantized weights run densely in fp32: int8 weight-only is exact;
# dynamic quantizes activations per token; int4 and nf4 (AVX512-BF16 path) compute in bf16.
VS_DENSE = {
    ("int8", "weight-only"): 1e-5,  # [0]
    ("int8", "dynamic"): 5e-2,  # [1.8e-2]
    ("int4", "weight-only"): 2e-2,  # [6.1e-3]
    ("nf4", "weight-only"): 2e-2,  # [4.8e-3]
}


def _key(stored, suffix: str) -> str:
    """The one stored key ending in `suffix` (library versions nest modules differently)."""
    (key,) = [k for k in [*stored.tensors, *stored.quantized] if k.endswith(suffix)]
    return key


def relative_error(got: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> float:
    return max(
        float(np.abs(got[name] - want).max() / max(float(np.abs(want).max()), 1e-12))
        for name, want in expected.items()
    )


@pytest.fixture(scope="module")
def sd_root(tiny_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torch-sd") / "sd1"
    kiln.export(tiny_models["sd1"], out, targets=["torch"])
    return out


@pytest.fixture(scope="module")
def blip_root(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("torch-blip")
    out = folder / "artifact"
    kiln.export(save_model("blip", folder / "model"), out, targets=["torch"])
    return out


@pytest.fixture(scope="module")
def roots(sd_root, blip_root) -> dict[str, Path]:
    return {"text_encoder": sd_root, "unet": sd_root, "text_decoder": blip_root}


class Cells:
    """Quantized variants, made once per (component, precision, method) for the module."""

    def __init__(self, roots: dict[str, Path], folder: Path) -> None:
        self.roots, self.folder, self.cache = roots, folder, {}

    def spec(self, component: str) -> ComponentSpec:
        manifest = read_manifest(self.roots[component])
        return ComponentSpec.from_dict(manifest.components[component])

    def fp32(self, component: str) -> Path:
        return self.roots[component] / component / "torch-fp32"

    def get(self, component: str, precision: str, method: str):
        key = (component, precision, method)
        if key not in self.cache:
            spec = self.spec(component)
            group = TINY_GROUP if precision in ("int4", "nf4") else None
            recipe = recipe_for(
                "torch", Precision(precision), spec, method=method, group_size=group
            )
            out = self.folder / "-".join(key)
            out.mkdir()
            graph = quant.quantize_torch(
                self.fp32(component), MODEL_FILE, spec, recipe, [], out, lambda text: None
            )
            self.cache[key] = (out / graph.entry, graph)
        return self.cache[key]


@pytest.fixture(scope="module")
def cells(roots, tmp_path_factory) -> Cells:
    return Cells(roots, tmp_path_factory.mktemp("torch-quant"))


@pytest.fixture(scope="module")
def fp32_outputs(cells):
    cache = {}

    def get(component: str):
        if component not in cache:
            spec = cells.spec(component)
            feeds = {k: v.numpy() for k, v in spec.sample_inputs(spec.parity_sizes(), 3).items()}
            session = TorchSession(
                cells.fp32(component) / MODEL_FILE, spec, root=cells.roots[component]
            )
            cache[component] = feeds, session.run(feeds)
        return cache[component]

    return get


# --- export ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("which", "components"), [("sd", SD_COMPONENTS), ("blip", BLIP_COMPONENTS)]
)
def test_export_records_checked_variants(sd_root, blip_root, which, components):
    root = sd_root if which == "sd" else blip_root
    manifest = read_manifest(root)
    for component in components:
        variant = manifest.variant(f"{component}/torch/fp32")
        assert variant.entry == f"{component}/torch-fp32/{MODEL_FILE}"
        # The UNet and text encoder also carry the map LoRAs at load use.
        mapped = which == "sd" and component in ("text_encoder", "unet")
        expected = [MODEL_FILE, WEIGHT_MAP_FILE] if mapped else [MODEL_FILE]
        assert sorted(Path(f.path).name for f in variant.files) == expected
        assert variant.parity is not None and variant.parity.passed
        # Same module, same weights: the rebuilt module reproduces PyTorch exactly.
        assert max(variant.parity.max_abs.values()) == 0.0
        assert variant.opset is None and variant.versions["exporter"] == "torch"
        stored = read_state(root / variant.entry)
        assert stored.storage == "fp32"
        assert all(t.dtype in (torch.float32, torch.int64) for t in stored.tensors.values())


def test_tied_weights_are_stored_once(blip_root):
    stored = read_state(blip_root / "text_decoder/torch-fp32" / MODEL_FILE)
    head = "decoder.cls.predictions.decoder.weight"
    assert stored.aliases[head] == "decoder.bert.embeddings.word_embeddings.weight"
    assert head not in stored.tensors


def test_unused_halves_are_not_stored(sd_root):
    encoder = read_state(sd_root / "vae_encoder/torch-fp32" / MODEL_FILE)
    assert encoder.pruned == ("vae.decoder.", "vae.post_quant_conv.")
    assert not any(key.startswith("vae.decoder.") for key in encoder.tensors)


# --- quantization cells ----------------------------------------------------------------

CELLS = [
    (component, precision, method)
    for (precision, method), budgets in VS_FP32.items()
    for component in budgets
]


@pytest.mark.parametrize(("component", "precision", "method"), CELLS)
def test_quantized_cell_tracks_fp32(cells, fp32_outputs, component, precision, method):
    path, graph = cells.get(component, precision, method)
    feeds, expected = fp32_outputs(component)
    session = TorchSession(path, cells.spec(component), root=cells.roots[component])
    got = session.run(feeds)
    assert all(np.isfinite(v).all() and v.dtype == np.float32 for v in got.values())
    error = relative_error(got, expected)
    print(f"{component} {precision}/{method}: {error:.2e} vs fp32, kernels {dict(session.kernels)}")
    assert error <= VS_FP32[(precision, method)][component]
    assert read_state(path).storage == precision
    assert graph.layers == quant.written_layers(read_state(path))


@pytest.mark.parametrize(("precision", "method"), list(VS_DENSE))
@pytest.mark.parametrize("component", ["text_encoder", "unet", "text_decoder"])
def test_kernels_match_their_dequantized_weights(cells, fp32_outputs, component, precision, method):
    path, _ = cells.get(component, precision, method)
    root, spec = cells.roots[component], cells.spec(component)
    feeds, _ = fp32_outputs(component)
    manifest = read_manifest(root)
    dense = build_wrapper(root, manifest.family, manifest.model_info, component)
    load_weights(dense, read_state(path), path, kernels=False)
    with torch.inference_mode():
        raw = dense(*(torch.tensor(feeds[name]) for name in spec.input_names))
    raw = raw if isinstance(raw, tuple) else (raw,)
    reference = {name: t.float().numpy() for name, t in zip(spec.output_names, raw, strict=True)}
    got = TorchSession(path, spec, root=root).run(feeds)
    error = relative_error(got, reference)
    print(f"{component} {precision}/{method}: {error:.2e} vs dequantized weights")
    assert error <= VS_DENSE[(precision, method)]


def test_layers_and_details_record_what_was_written(cells):
    _, graph = cells.get("text_encoder", "int4", "weight-only")
    # Tiny CLIP: 2 layers x (q, k, v, out, fc1, fc2); fc2's input (37) is not a multiple of
    # the group, so it stays int8; token and position tables are int8 rows.
    assert graph.layers == {"Embedding": {"int8": 2}, "Linear": {"int4": 10, "int8": 2}}
    details = graph.details
    assert details["group_size"] == TINY_GROUP and details["symmetric"] is True
    assert details["torchao_version"] != "not installed"
    assert sorted(details["int8_instead_of_4bit"]) == [
        _key(read_state(cells.fp32("text_encoder") / MODEL_FILE), f"layers.{i}.mlp.fc2.weight")
        for i in range(2)
    ]
    kernels = details["load_kernel"]
    # fc1 has 37 outputs: torchao's int4 kernel needs multiples of 16, so it runs dequantized.
    assert kernels["dequantized fp32 (out_features not a multiple of 16)"] == 2
    assert kernels["torchao PrototypeInt4WeightOnlyConfig (tinygemm, bf16 activations)"] == 8
    _, unet = cells.get("unet", "nf4", "weight-only")
    assert set(unet.layers) == {"Conv2d", "Linear"} and unet.layers["Conv2d"] == {"fp32": 33}


def test_int8_codes_reach_torchao_exactly(cells):
    """torchao re-quantizing the dequantized weights is close but not exact; the session
    therefore puts the stored codes and scales into torchao's tensors."""
    from torchao.quantization.granularity import PerRow
    from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor

    path, _ = cells.get("text_encoder", "int8", "weight-only")
    stored = read_state(path)
    session = TorchSession(path, cells.spec("text_encoder"), root=cells.roots["text_encoder"])
    key = _key(stored, "layers.0.self_attn.q_proj.weight")
    dequantized = quant.dequantize(key, stored.quantized[key], stored.tensors)
    requantized = Int8Tensor.from_hp(dequantized, PerRow())
    step = stored.tensors[f"{key}.scale"][:, None]
    drift = ((requantized.dequantize() - dequantized).abs() / step).max().item()
    # torchao's scale is max|w| / 127.5, kiln's max|w| / 127: up to half a step apart.
    assert 0.0 < drift <= 0.51
    weight = session.module.get_submodule(key.removesuffix(".weight")).weight
    assert isinstance(weight, Int8Tensor)
    assert torch.equal(weight.dequantize(), dequantized)


def test_nf4_layout_is_bitsandbytes_own(cells):
    import bitsandbytes.functional as bnb

    assert bnb.get_4bit_type("nf4", device="cpu").tolist() == list(quant.NF4_CODE)
    weight = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    packed, absmax = quant.quantize_nf4_blocks(weight, 64)
    theirs, state = bnb.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=False
    )
    assert torch.equal(theirs.flatten(), packed) and torch.equal(state.absmax, absmax)
    # bitsandbytes re-quantizes kiln's dequantized weights to the stored codes exactly.
    dequantized = quant.dequantize_nf4_blocks(packed, absmax, 64, weight.shape)
    again, state = bnb.quantize_4bit(
        dequantized, blocksize=64, quant_type="nf4", compress_statistics=False
    )
    assert torch.equal(again.flatten(), packed) and torch.equal(state.absmax, absmax)
    # And the layers the session built hold exactly the stored codes.
    path, _ = cells.get("unet", "nf4", "weight-only")
    stored = read_state(path)
    session = TorchSession(path, cells.spec("unet"), root=cells.roots["unet"])
    checked = 0
    for name, module in session.module.named_modules():
        if type(module).__name__ == "Linear4bit":
            assert torch.equal(module.weight.data.flatten(), stored.tensors[f"{name}.weight.qdata"])
            checked += 1
    assert checked == 50  # every UNet Linear: groups of 32 divide all their inputs


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_groups_round_trip_within_half_a_step(symmetric):
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    packed, scale, zero = quant.quantize_int4_groups(weight, 32, symmetric)
    assert packed.shape == (48, 64) and packed.dtype == torch.uint8
    assert (zero is None) == symmetric
    restored = quant.dequantize_int4_groups(packed, scale, zero, 32)
    step = scale.abs().repeat_interleave(32, dim=1)
    # Symmetric groups clamp the far side of the signed extreme at +7: one step there.
    bound = 1.0 if symmetric else 0.5
    assert ((restored - weight).abs() / step).max() <= bound + 1e-4


def test_file_sizes_shrink_on_a_linear_heavy_encoder(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
    )
    torch.manual_seed(0)
    encoder = CLIPTextModel(config).eval()
    spec = ComponentSpec(
        name="text_encoder",
        family="stable-diffusion",
        inputs=(TensorSpec("input_ids", DType.INT64, (1, 77)),),
        outputs=(),
    )
    source = tmp_path / "fp32"
    source.mkdir()
    export_torch(_Holder(encoder), spec, source)
    fp32_size = (source / MODEL_FILE).stat().st_size
    limits = {"int8": 0.30, "int4": 0.20, "nf4": 0.20}
    for precision, limit in limits.items():
        out = tmp_path / precision
        out.mkdir()
        recipe = recipe_for("torch", Precision(precision), spec)
        graph = quant.quantize_torch(source, MODEL_FILE, spec, recipe, [], out, lambda t: None)
        ratio = (out / graph.entry).stat().st_size / fp32_size
        print(f"{precision}: {ratio:.3f} of fp32, layers {graph.layers}")
        assert ratio <= limit
        assert graph.layers == {"Embedding": {"int8": 2}, "Linear": {precision: 12}}


class _Holder(torch.nn.Module):
    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder


def test_unsupported_group_sizes_are_refused(sd_root, tmp_path):
    spec = ComponentSpec.from_dict(read_manifest(sd_root).components["text_encoder"])
    source = sd_root / "text_encoder/torch-fp32"
    for precision, group in (("int4", 16), ("int4", 256), ("nf4", 16)):
        recipe = recipe_for("torch", Precision(precision), spec, group_size=group)
        with pytest.raises(InvalidRequestError, match=str(group)):
            quant.quantize_torch(source, MODEL_FILE, spec, recipe, [], tmp_path, print)
    recipe = recipe_for("torch", Precision.INT4, spec, ratio=0.5)
    with pytest.raises(InvalidRequestError, match="ratio"):
        quant.quantize_torch(source, MODEL_FILE, spec, recipe, [], tmp_path, print)


# --- broken files and missing libraries ---------------------------------------------------


def _spec(root: Path, component: str) -> ComponentSpec:
    return ComponentSpec.from_dict(read_manifest(root).components[component])


def test_damaged_files_raise_artifact_error_naming_them(sd_root, tmp_path):
    spec = _spec(sd_root, "text_encoder")
    original = sd_root / "text_encoder/torch-fp32" / MODEL_FILE
    data = original.read_bytes()
    header_size = struct.unpack("<Q", data[:8])[0]

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbled = tmp_path / "garbled.safetensors"
    garbled.write_bytes(data[:8] + b"#" * header_size + data[8 + header_size :])
    reshaped = tmp_path / "reshaped.safetensors"
    stored = read_state(original)
    key = _key(stored, "layers.0.mlp.fc1.weight")
    stored.tensors[key] = stored.tensors[key][:, :16].contiguous()
    write_state(reshaped, stored)
    missing = tmp_path / "missing.safetensors"
    for path in (truncated, garbled, reshaped, missing):
        with pytest.raises(ArtifactError) as caught:
            TorchSession(path, spec, root=sd_root)
        message = str(caught.value)
        assert str(path) in message and "\n" not in message
    with pytest.raises(ArtifactError, match="fc1.weight"):
        TorchSession(reshaped, spec, root=sd_root)


def test_tampered_bytes_are_caught_by_load(sd_root, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(sd_root, copy)
    target = copy / "unet/torch-fp32" / MODEL_FILE
    data = bytearray(target.read_bytes())
    data[-5] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="unet/torch-fp32/model.safetensors"):
        kiln.load(copy, require=["torch:fp32"])


@pytest.mark.parametrize(
    ("module", "precision", "hint"),
    [
        ("torchao", "int8", "pip install 'torchao"),
        ("bitsandbytes", "nf4", "pip install 'bitsandbytes"),
    ],
)
def test_missing_backend_names_the_install(cells, monkeypatch, module, precision, hint):
    path, _ = cells.get("unet", precision, "weight-only")
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(BackendUnavailableError, match=hint):
        TorchSession(path, cells.spec("unet"), root=cells.roots["unet"])


def test_missing_input_is_refused_and_metadata_is_json(sd_root):
    spec = _spec(sd_root, "unet")
    session = TorchSession(sd_root / "unet/torch-fp32" / MODEL_FILE, spec, root=sd_root)
    feeds = {k: v.numpy() for k, v in spec.sample_inputs().items()}
    del feeds["timestep"]
    with pytest.raises(InvalidRequestError, match="timestep"):
        session.run(feeds)
    from safetensors import safe_open

    with safe_open(str(sd_root / "unet/torch-fp32" / MODEL_FILE), "pt") as handle:
        metadata = handle.metadata()
    assert metadata["format"] == "kiln-torch-state-dict" and metadata["storage"] == "fp32"
    assert json.loads(metadata["modules"])["unet.conv_in"] == "Conv2d"


# --- end to end ----------------------------------------------------------------------------


def test_generate_on_torch_matches_diffusers(sd_root, tiny_models):
    from diffusers import StableDiffusionPipeline

    from kiln.bench.metrics import psnr

    deployment = kiln.load(sd_root, require=["torch:fp32"])
    assert {choice.runtime for choice in deployment.plan.choices} == {"torch"}
    settings = {"prompt": "a red bird on a branch", "width": 64, "height": 64}
    image = deployment.generate(**settings, steps=2, seed=7).image
    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_models["sd1"], safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        reference = pipeline(
            **settings, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(7)
        ).images[0]
    measured = psnr(np.asarray(image), np.asarray(reference))
    print(f"torch fp32 vs diffusers: {measured:.1f} dB")
    assert measured >= 35.0
