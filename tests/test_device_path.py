"""The device path of sessions, the GPU plan options and the VRAM figure, as far as a
machine without a GPU can check them.

The device path is exercised on the meta device: a tensor there has a shape and a dtype but
no memory, so any copy to the host fails loudly. A session that keeps tensors on `meta`
stands in for a CUDA one, and a run through it proves the adapters never left the device.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from manifest_helpers import GIB, paper_variant

from kiln.artifacts import Manifest, Variant
from kiln.models.spec import ComponentSpec, Dim, DType, Precision, TensorSpec
from kiln.profiles.hardware import CpuInfo, GpuInfo, HardwareProfile, MemoryInfo, RuntimeInfo
from kiln.profiles.select import Choice, select
from kiln.profiles.targets import builtin_target, parse_target
from kiln.runtimes.base import Session, same_device
from kiln.runtimes.guard import GuardedSession, all_finite

ROOT = Path(__file__).resolve().parents[1]
META = torch.device("meta")
CPU = torch.device("cpu")

BATCH = Dim("batch", 1, 1, 4)
SIDE = Dim("side", 2, 4, 8, multiple_of=2)
SPEC = ComponentSpec(
    name="double",
    family="test",
    inputs=(TensorSpec("x", DType.FLOAT32, (BATCH, 3, SIDE, SIDE)),),
    outputs=(TensorSpec("y", DType.FLOAT32, ("batch", 3, "side", "side")),),
)


class HostSession(Session):
    """Doubles its input on the host; counts the calls that came through `run`."""

    runtime, device = "test", "cpu"

    def __init__(self, where: torch.device = CPU, value: float = 2.0) -> None:
        self.spec, self.where, self.value = SPEC, where, value
        self.host_calls = 0

    @property
    def tensor_device(self) -> torch.device:
        return self.where

    def run(self, inputs):
        self.host_calls += 1
        return {"y": (inputs["x"] * self.value).astype(np.float32)}


class DeviceSession(HostSession):
    """Runs on its device, as an IO-bound onnxruntime or a CUDA torch session does."""

    def __init__(self, where: torch.device = META, value: float = 2.0) -> None:
        super().__init__(where, value)
        self.device_inputs: list[torch.Tensor] = []

    def run_on_device(self, inputs):
        self.device_inputs.append(inputs["x"])
        return {"y": inputs["x"] * self.value}


# ----------------------------------------------------------------------- the contract


def test_cpu_sessions_keep_their_host_path_and_results():
    session = HostSession()
    x = torch.randn(2, 3, 4, 4)
    out = session.run_torch(x=x)["y"]
    assert session.host_calls == 1 and out.device.type == "cpu" and out.dtype == torch.float32
    assert torch.equal(out, torch.from_numpy(session.run({"x": x.numpy()})["y"]))
    # A half input is cast to the spec's dtype first, as before.
    assert torch.equal(session.run_torch(x=x.half())["y"], (x.half().float() * 2))


def test_inputs_on_the_sessions_device_never_reach_the_host():
    session = DeviceSession()
    x = torch.empty(2, 3, 4, 4, device=META, dtype=torch.float16)
    out = session.run_torch(x=x)["y"]
    assert out.device == META and session.host_calls == 0
    assert session.device_inputs[0].dtype == torch.float32  # the spec's dtype, on the device
    # Checked against the spec before anything runs.
    with pytest.raises(Exception, match="side=5 outside"):
        session.run_torch(x=torch.empty(1, 3, 5, 5, device=META))
    with pytest.raises(Exception, match="has no input 'z'"):
        session.run_torch(z=x)


def test_inputs_elsewhere_go_through_the_host_and_come_back_where_they_were():
    session = DeviceSession(where=META)
    x = torch.randn(1, 3, 2, 2)
    out = session.run_torch(x=x)["y"]
    assert session.host_calls == 1 and not session.device_inputs
    assert out.device.type == "cpu" and torch.equal(out, x * 2)


def test_same_device_treats_an_unnumbered_device_as_the_first():
    assert same_device(torch.device("cuda"), torch.device("cuda:0"))
    assert not same_device(torch.device("cuda:1"), torch.device("cuda:0"))
    assert not same_device(torch.device("cpu"), torch.device("cuda:0"))


def test_nan_guard_watches_the_device_path_and_reruns_on_the_fallback():
    bad = DeviceSession(value=float("nan"))
    fallback = HostSession(value=3.0)
    guarded = GuardedSession(bad, "double/onnx/fp16", "double/onnx/fp32", lambda: fallback)
    assert guarded.tensor_device == META
    x = torch.ones(1, 3, 2, 2)
    # Real tensors on the host: the inner session "computes" NaN on its device path...
    bad.where = CPU
    out = guarded.run_torch(x=x)["y"]
    assert torch.equal(out, x * 3) and guarded.fallback_calls == 1 and fallback.host_calls == 1
    assert all_finite({"a": torch.ones(2), "b": np.ones(2)})
    assert not all_finite({"a": torch.tensor([1.0, float("inf")])})
    assert all_finite({"ids": torch.tensor([1, 2])})


# ----------------------------------------------------------------------- the adapters


def test_adapters_keep_the_denoising_loop_on_the_unets_device():
    from diffusers.configuration_utils import FrozenDict

    from kiln.runtimes.adapters import TextEncoderAdapter, UNetAdapter, VaeAdapter

    unet_spec = ComponentSpec(
        name="unet",
        family="test",
        inputs=(
            TensorSpec("sample", DType.FLOAT32, (BATCH, 4, SIDE, SIDE)),
            TensorSpec("timestep", DType.FLOAT32, (BATCH,)),
            TensorSpec("encoder_hidden_states", DType.FLOAT32, (BATCH, 7, 16)),
        ),
        outputs=(TensorSpec("out_sample", DType.FLOAT32, ("batch", 4, "side", "side")),),
    )

    class MetaUNet(DeviceSession):
        def run_on_device(self, inputs):
            self.device_inputs.append(inputs)
            return {"out_sample": torch.empty_like(inputs["sample"])}

    session = MetaUNet()
    session.spec = unet_spec
    unet = UNetAdapter(session, FrozenDict({}))
    assert unet.device == META and unet.dtype == torch.float32
    sample = torch.empty(2, 4, 4, 4, device=META)
    out = unet(sample, torch.tensor(981.0, device=META), torch.empty(2, 7, 16, device=META))
    assert out.sample.device == META and session.host_calls == 0
    assert session.device_inputs[0]["timestep"].shape == (2,)
    # The other adapters of a pipeline report the device they are given (the UNet's).
    encoder = TextEncoderAdapter(HostSession(), FrozenDict({}), META)
    vae = VaeAdapter(FrozenDict({}), None, HostSession(), META)
    assert encoder.device == META and vae.device == META
    assert VaeAdapter(FrozenDict({}), None, HostSession()).device.type == "cpu"


# ----------------------------------------------------------------------- plan options

ZEN4 = CpuInfo(
    vendor="AMD",
    model_name="AMD Ryzen 9 7950X",
    architecture="x86_64",
    logical_cores=32,
    features=frozenset({"avx2", "avx512f"}),
)


def _gpu(free_gib: float | None, total_gib: float = 24) -> GpuInfo:
    return GpuInfo(
        vendor="nvidia",
        name="NVIDIA GeForce RTX 4090",
        compute_capability="8.9",
        vram_total_bytes=int(total_gib * GIB),
        vram_free_bytes=None if free_gib is None else int(free_gib * GIB),
    )


def _profile(gpu: GpuInfo, providers: str, tensorrt: bool = False) -> HardwareProfile:
    return HardwareProfile(
        cpu=ZEN4,
        memory=MemoryInfo(64 * GIB, 48 * GIB),
        gpus=(gpu,),
        runtimes=(
            RuntimeInfo("onnxruntime", "1.31.1", True, providers),
            RuntimeInfo("torch", "2.11.0", True, "cuda 12.8"),
            RuntimeInfo("tensorrt", "11.4.0", tensorrt, "installed" if tensorrt else ""),
        ),
        os_name="Linux",
    )


def _manifest(*variants: Variant) -> Manifest:
    return Manifest(
        family="stable-diffusion",
        source={"id": "synthetic", "kind": "test"},
        model_info={},
        components={},
        variants=variants,
    )


SD15_ON_GPU = _manifest(
    paper_variant("unet", "onnx", "fp16", 1.6),
    paper_variant("unet", "onnx", "fp32", 3.2),
    paper_variant("unet", "torch", "fp16", 1.6),
)
CUDA_ORT = "CUDAExecutionProvider, CPUExecutionProvider"
WITH_TRT = "TensorrtExecutionProvider, " + CUDA_ORT


def test_selection_counts_free_vram_not_the_cards_size():
    # 24 GiB card, 2 GiB free (another process holds the rest): 1.6 GiB x 1.5 does not fit.
    busy = select(SD15_ON_GPU, _profile(_gpu(free_gib=2), CUDA_ORT))
    assert busy["unet"].device == "cpu"
    why = [w for v, w in busy["unet"].rejected if v == "unet/onnx/fp16" and "cuda:0" in w]
    assert "needs 2.4 GiB" in why[0] and "free VRAM on cuda:0 is 2.0 GiB" in why[0]
    idle = select(SD15_ON_GPU, _profile(_gpu(free_gib=20), CUDA_ORT))
    assert (idle["unet"].variant_id, idle["unet"].device) == ("unet/onnx/fp16", "cuda:0")
    # Free VRAM unknown (torch's probe): the card's size is the pool.
    unknown = select(SD15_ON_GPU, _profile(_gpu(free_gib=None, total_gib=2), CUDA_ORT))
    assert unknown["unet"].device == "cpu"


def test_onnxruntime_on_cuda_gets_cuda_options_and_tensorrt_only_when_asked():
    plan = select(SD15_ON_GPU, _profile(_gpu(20), WITH_TRT, tensorrt=True))
    options = plan["unet"].options
    assert options["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["tensorrt_provider"] is False
    text = (ROOT / "src/kiln/profiles/targets/nvidia-gpu.toml").read_text()
    eager = parse_target(text.replace("tensorrt_provider = false", "tensorrt_provider = true"))
    plan = select(SD15_ON_GPU, _profile(_gpu(20), WITH_TRT, tensorrt=True), target=eager)
    assert plan["unet"].options["providers"][0] == "TensorrtExecutionProvider"
    missing = select(SD15_ON_GPU, _profile(_gpu(20), WITH_TRT), target=eager)
    assert missing["unet"].options["providers"][0] == "CUDAExecutionProvider"
    assert "TensorRT is not installed" in missing["unet"].options["tensorrt_provider_unavailable"]
    torch_plan = select(
        _manifest(paper_variant("unet", "torch", "fp16", 1.6)), _profile(_gpu(20), CUDA_ORT)
    )
    assert torch_plan["unet"].options == {"compile": False}
    assert builtin_target("nvidia-gpu").name == "nvidia-gpu"


def test_execution_providers_turn_plan_options_into_provider_options(tmp_path, monkeypatch):
    import onnx
    from onnx import TensorProto, helper

    from kiln.runtimes.onnxruntime import execution_providers, tensorrt_profile_options

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "side", "side"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "side", "side"])],
    )
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    providers = execution_providers(
        ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        device="cuda:1",
        precision=Precision.FP16,
        spec=SPEC,
        model_path=path,
        options={"cudnn_conv_algo_search": "EXHAUSTIVE", "graph_optimization_level": "all"},
    )
    (trt, trt_options), (cuda, cuda_options), (cpu, cpu_options) = providers
    assert cuda_options == {
        "device_id": 1,
        "cudnn_conv_algo_search": "EXHAUSTIVE",
        "arena_extend_strategy": "kSameAsRequested",
    }
    assert trt_options["device_id"] == 1 and trt_options["trt_fp16_enable"] is True
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "cache/onnxruntime-tensorrt")
    assert trt_options["trt_profile_min_shapes"] == "x:1x3x2x2"
    assert trt_options["trt_profile_opt_shapes"] == "x:1x3x4x4"
    assert trt_options["trt_profile_max_shapes"] == "x:4x3x8x8"
    assert cpu_options == {}
    fp32 = execution_providers(
        ["TensorrtExecutionProvider"],
        device="cuda:0",
        precision=Precision.FP32,
        spec=SPEC,
        model_path=path,
    )
    assert fp32[0][1]["trt_fp16_enable"] is False
    cuda_fp32 = execution_providers(
        ["CUDAExecutionProvider"],
        device="cuda",
        precision=Precision.FP32,
        spec=SPEC,
        model_path=path,
    )
    assert cuda_fp32[0][1]["use_tf32"] == 0 and cuda_fp32[0][1]["device_id"] == 0
    assert tensorrt_profile_options(SPEC, graph_inputs=set()) == {}


def _doubling_model(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "side", "side"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, "side", "side"])],
    )
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_a_plan_option_turns_onnxruntime_spinning_off(tmp_path):
    from kiln.runtimes import open_session
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    path = _doubling_model(tmp_path)
    variant = replace(paper_variant("x", "onnx", "fp32", 0), entry=path.name)
    choice = Choice("x", variant.id, "onnxruntime", "cpu", "test", {"spinning": False})
    quiet = open_session(tmp_path, variant, SPEC, choice)
    options = quiet._session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    x = np.ones((1, 3, 2, 2), np.float32)
    assert (quiet.run({"x": x})["y"] == 2).all()
    default = OnnxRuntimeSession(path, SPEC)._session.get_session_options()
    with pytest.raises(RuntimeError):  # not set: onnxruntime's default, spinning
        default.get_session_config_entry("session.intra_op.allow_spinning")


def test_an_onnxruntime_without_cuda_runs_a_cuda_plan_on_the_cpu(tmp_path):
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    path = _doubling_model(tmp_path)
    providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    session = OnnxRuntimeSession(path, SPEC, providers=providers)
    assert session.device == "cpu" and session.tensor_device.type == "cpu"
    x = torch.randn(1, 3, 2, 2)
    assert torch.equal(session.run_torch(x=x)["y"], x + x)


def test_fp16_torch_checks_run_on_the_gpu_when_there_is_one(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from kiln.runtimes.torch import check_device

    for storage in ("fp16", "fp32", "int8"):
        save_file({"w": torch.zeros(1)}, str(tmp_path / storage), metadata={"storage": storage})
    assert check_device(tmp_path / "fp16") == "cpu"  # no CUDA here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [check_device(tmp_path / s) for s in ("fp16", "fp32", "int8")] == [
        "cuda:0",
        "cpu",
        "cpu",
    ]


# ----------------------------------------------------------------------- the bench


def test_a_session_call_is_timed_once_whichever_way_it_comes_in():
    from kiln.bench.captioning import NestedTimer
    from kiln.bench.diffusion import CallTimer, time_session

    for timer in (CallTimer(), NestedTimer()):
        session = HostSession()
        time_session(timer, "double", session)
        session.run_torch(x=torch.ones(1, 3, 2, 2))  # run_on_device -> run, counted once
        session.run({"x": np.ones((1, 3, 2, 2), np.float32)})
        assert len(timer.take()["double"]) == 2


def test_the_gpu_baseline_joins_when_a_variant_runs_on_cuda(monkeypatch):
    import kiln.profiles.hardware as hardware
    from kiln.bench.harness import plan_variants

    shipped = replace(SD15_ON_GPU, source={"id": "kiln:shapes-sd", "kind": "builtin"})
    gpu_machine = _profile(_gpu(20), CUDA_ORT)
    monkeypatch.setattr(hardware, "detect", lambda *a, **k: gpu_machine)
    planned = plan_variants(shipped, ["onnx:fp16@cuda"], ["torch"])
    assert [(v.id, v.skip_reason) for v in planned] == [
        ("torch", None),
        ("torch-cuda-fp16", None),
        ("onnx:fp16@cuda", None),
    ]
    assert [v.id for v in plan_variants(shipped, ["onnx:fp32@cpu"], ["torch"])] == [
        "torch",
        "onnx:fp32@cpu",
    ]
    cpu_torch = RuntimeInfo("torch", "2.13.0", True, "cpu")
    no_cuda_torch = replace(gpu_machine, runtimes=(gpu_machine.runtimes[0], cpu_torch))
    monkeypatch.setattr(hardware, "detect", lambda *a, **k: no_cuda_torch)
    planned = plan_variants(shipped, ["onnx:fp16@cuda"], ["torch", "torch-cuda-fp16"])
    reasons = {v.id: v.skip_reason for v in planned}
    assert reasons["torch-cuda-fp16"] == "needs an NVIDIA GPU and a CUDA build of torch"


def test_vram_is_null_with_a_reason_without_a_gpu():
    from kiln.bench.worker import VramMonitor

    monitor = VramMonitor(gpus=0)
    monitor.start()
    assert monitor.stop() == (None, "no GPU", {})


def _fake_nvml(monkeypatch, used: list[int], processes: list[object]) -> None:
    memory = iter(used)
    last = [used[0]]

    def info(handle):
        last[0] = next(memory, last[0])
        return SimpleNamespace(used=last[0], total=80 * GIB, free=80 * GIB - last[0])

    fake = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=info,
        nvmlDeviceGetComputeRunningProcesses=lambda handle: processes,
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def test_vram_from_nvml_where_the_driver_does_not_see_this_process(monkeypatch):
    from kiln.bench.worker import VramMonitor

    # In a container NVML lists host process ids: the devices' growth stands in.
    _fake_nvml(
        monkeypatch, [GIB, 3 * GIB, 5 * GIB, 4 * GIB], [SimpleNamespace(pid=1, usedGpuMemory=9)]
    )
    monitor = VramMonitor(gpus=1)
    monitor.start()
    time.sleep(0.2)
    value, reason, sources = monitor.stop()
    assert (value, reason) == (4 * GIB, None) and sources["nvml_device"] == 4 * GIB
    assert "nvml" not in sources


def test_vram_of_this_process_wins_over_the_devices_growth(monkeypatch):
    import os

    from kiln.bench.worker import VramMonitor

    mine = SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * GIB)
    _fake_nvml(monkeypatch, [GIB, 9 * GIB], [mine])
    monitor = VramMonitor(gpus=1)
    monitor.start()
    time.sleep(0.2)
    value, reason, sources = monitor.stop()
    assert (value, reason) == (3 * GIB, None)
    assert sources["nvml"] == 3 * GIB and sources["nvml_device"] == 8 * GIB


# ----------------------------------------------------------------------- gpu-check.sh


def test_ssim_needs_no_scipy_and_blurs_as_scipy_does(monkeypatch):
    from scipy.ndimage import gaussian_filter

    from kiln.bench.metrics import gaussian_blur, ssim

    rng = np.random.default_rng(0)
    for shape in [(64, 64), (7, 300), (3, 3)]:
        image = rng.uniform(0, 255, shape)
        want = gaussian_filter(image, 1.5, truncate=3.5, mode="reflect")
        np.testing.assert_allclose(gaussian_blur(image, 1.5, truncate=3.5), want, atol=1e-9)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    with_scipy = ssim(a, np.clip(a.astype(int) + 9, 0, 255))
    for name in ("scipy", "scipy.ndimage"):  # as on a GPU machine set up from gpu-wheels/
        monkeypatch.setitem(sys.modules, name, None)
    assert ssim(a, np.clip(a.astype(int) + 9, 0, 255)) == with_scipy


@pytest.mark.skipif(
    shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/gpus").exists(),
    reason="an NVIDIA driver is here: gpu-check.sh would run the whole check",
)
def test_gpu_check_says_there_is_no_gpu_and_stops_cleanly(tmp_path):
    started = time.perf_counter()
    done = subprocess.run(
        ["bash", str(ROOT / "scripts/gpu-check.sh")],
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no NVIDIA GPU" in done.stdout
    assert time.perf_counter() - started < 60
    summary = (tmp_path / "summary.txt").read_text()
    assert "no NVIDIA GPU" in summary
