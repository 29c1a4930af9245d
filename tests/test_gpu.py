"""On an NVIDIA GPU: onnxruntime's CUDA provider and the torch target on CUDA against PyTorch.

As the CPU parity tests (test_generate.py, test_blip.py) do: the tiny SD 1 model's image for
a seed against diffusers' fp32 image on the CPU (PSNR), BLIP's tokens against transformers'.
fp16 must stay within 30 dB; fp32 on the GPU (TF32 kernels) too. Every test also checks
that the denoising loop stayed on the device: the UNet's outputs are CUDA tensors and the
host path (`Session.run`) was never taken.

Marked `gpu`: skipped without CUDA (tests/conftest.py); scripts/gpu-check.sh runs them.
Tests that need onnxruntime-gpu skip where only the CPU build is installed.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import kiln
from kiln.bench.metrics import bleu, psnr

pytestmark = pytest.mark.gpu

MIN_PSNR = 30.0  # dB, fp16 against diffusers fp32 (issue 18)
PROMPT = "a photo of an astronaut riding a horse"
SETTINGS = {"negative_prompt": "blurry", "guidance_scale": 6.0, "width": 128, "height": 96}


def _onnxruntime_cuda() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu is not installed)")


@pytest.fixture(scope="module")
def sd_gpu(tiny_models, tmp_path_factory):
    """Tiny SD 1 exported to ONNX and torch, with fp16 (and, for torch, bf16) variants."""
    out = tmp_path_factory.mktemp("gpu-sd") / "sd1"
    kiln.export(tiny_models["sd1"], out, targets=["onnx", "torch"])
    kiln.quantize(out, "fp16", targets=["onnx", "torch"], calibration=2)
    if torch.cuda.get_device_capability() >= (8, 0):
        kiln.quantize(out, "bf16", targets=["torch"], calibration=2)
    return out


@pytest.fixture(scope="module")
def sd_reference(tiny_models):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_models["sd1"], safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return pipeline(
            PROMPT,
            num_inference_steps=4,
            generator=torch.Generator("cpu").manual_seed(11),
            **SETTINGS,
        ).images[0]


def _watch_unet(deployment) -> dict:
    """Count host-path calls of the UNet's session and the devices of what it returned."""
    session = deployment.sessions["unet"]
    seen = {"host_calls": 0, "devices": set()}
    run, run_torch = session.run, session.run_torch

    def host(inputs):
        seen["host_calls"] += 1
        return run(inputs)

    def device_path(**inputs):
        out = run_torch(**inputs)
        seen["devices"] |= {tensor.device.type for tensor in out.values()}
        return out

    session.run, session.run_torch = host, device_path
    return seen


@pytest.mark.parametrize(
    ("require", "needs"),
    [
        ("onnx:fp16@cuda", "onnxruntime-gpu"),
        ("onnx:fp32@cuda", "onnxruntime-gpu"),
        ("torch:fp16@cuda", None),
        ("torch:fp32@cuda", None),
        ("torch:bf16@cuda", "sm80"),
    ],
)
def test_generate_on_cuda_matches_diffusers_and_stays_on_the_gpu(
    sd_gpu, sd_reference, require, needs
):
    if needs == "onnxruntime-gpu":
        _onnxruntime_cuda()
    if needs == "sm80" and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs compute capability 8.0+")
    deployment = kiln.load(sd_gpu, require=[require])
    assert {c.device for c in deployment.plan.choices} == {"cuda:0"}
    seen = _watch_unet(deployment)
    image = deployment.generate(PROMPT, steps=4, seed=11, **SETTINGS).image
    measured = psnr(np.asarray(image), np.asarray(sd_reference))
    print(f"{require} vs diffusers fp32 (CPU): {measured:.1f} dB")
    assert seen == {"host_calls": 0, "devices": {"cuda"}}
    assert deployment.nan_fallbacks() == {}
    # bf16 keeps 8 bits of mantissa: the default drift budget (20 dB) is its bar.
    assert measured >= (20.0 if "bf16" in require else MIN_PSNR)


def test_onnxruntime_cuda_session_binds_device_tensors(sd_gpu):
    _onnxruntime_cuda()
    from kiln.artifacts import read_manifest
    from kiln.models.spec import ComponentSpec
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession, execution_providers

    manifest = read_manifest(sd_gpu)
    spec = ComponentSpec.from_dict(manifest.components["unet"])
    variant = manifest.variant("unet/onnx/fp16")
    path = sd_gpu / variant.entry
    providers = execution_providers(
        ["CUDAExecutionProvider", "CPUExecutionProvider"],
        device="cuda:0",
        precision=variant.precision,
        spec=spec,
        model_path=path,
    )
    gpu = OnnxRuntimeSession(path, spec, providers=providers)
    cpu = OnnxRuntimeSession(path, spec)
    assert gpu.device == "cuda:0" and gpu.tensor_device == torch.device("cuda", 0)
    inputs = spec.sample_inputs(spec.parity_sizes(), seed=3)
    on_gpu = gpu.run_torch(**{k: v.cuda() for k, v in inputs.items()})
    on_cpu = cpu.run_torch(**inputs)
    for name, tensor in on_gpu.items():
        assert tensor.is_cuda and tensor.dtype == torch.float32
        reference = on_cpu[name]
        error = (tensor.cpu() - reference).abs().max() / reference.abs().max()
        assert float(error) < 2e-2, name
    # Host inputs still work on a GPU session: they go through run and come back to the host.
    assert not gpu.run_torch(**inputs)["out_sample"].is_cuda


def test_torch_compile_gives_the_eager_outputs(sd_gpu):
    if importlib.util.find_spec("triton") is None:
        pytest.skip("torch.compile on CUDA needs triton")
    from kiln.artifacts import read_manifest
    from kiln.models.spec import ComponentSpec
    from kiln.runtimes.torch import TorchSession

    manifest = read_manifest(sd_gpu)
    spec = ComponentSpec.from_dict(manifest.components["unet"])
    path = sd_gpu / manifest.variant("unet/torch/fp32").entry
    eager = TorchSession(path, spec, root=sd_gpu, device="cuda:0")
    compiled = TorchSession(path, spec, root=sd_gpu, device="cuda:0", compile=True)
    inputs = {k: v.cuda() for k, v in spec.sample_inputs(seed=5).items()}
    want, got = eager.run_torch(**inputs), compiled.run_torch(**inputs)
    assert compiled.describe()["compiled"] is True
    for name in want:
        assert got[name].is_cuda
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------- BLIP


@pytest.fixture(scope="module")
def blip_gpu(tmp_path_factory):
    from kiln.models.tiny_captioning import save_model

    root = tmp_path_factory.mktemp("gpu-blip")
    model = save_model("blip", root / "model", seed=0)
    out = root / "artifact"
    kiln.export(model, out, targets=["onnx", "torch"])
    kiln.quantize(out, "fp16", targets=["onnx", "torch"], calibration=2)
    return model, out


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (32, 32), (80, 24)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


@pytest.fixture(scope="module")
def blip_tokens(blip_gpu):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model_dir, _ = blip_gpu
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = BlipProcessor.from_pretrained(model_dir)
    inputs = processor(images=_images(), return_tensors="pt")
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=12).tolist()


@pytest.mark.parametrize(
    "runtime",
    ["onnx:fp32@cuda", "torch:fp32@cuda", "onnx:fp16@cuda", "torch:fp16@cuda"],
)
def test_caption_on_cuda_matches_transformers(blip_gpu, blip_tokens, runtime):
    if runtime.startswith("onnx"):
        _onnxruntime_cuda()
    _, artifact = blip_gpu
    deployment = kiln.load(artifact, require=[runtime])
    assert {c.device for c in deployment.plan.choices} == {"cuda:0"}
    ours = deployment.caption(_images(), max_new_tokens=12).sequences
    if ":fp32" in runtime:
        assert ours == blip_tokens  # token for token, as on the CPU
    else:
        score = bleu(ours, blip_tokens)
        print(f"{runtime} vs transformers fp32: BLEU {score:.3f}")
        assert score >= 0.3  # the default drift budget's bar
