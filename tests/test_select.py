"""Selection: synthetic hardware this machine lacks x synthetic manifests -> expected plans.

No model files are touched: manifests are built from `Manifest`/`Variant` dataclasses with
fake file entries whose sizes stand for real SD 1.5 / SDXL component sizes.
"""

from __future__ import annotations

import builtins
import json
import math
import pathlib

import pytest
from manifest_helpers import GIB
from manifest_helpers import paper_variant as variant

from kiln.artifacts import Manifest, Parity, Variant
from kiln.errors import BackendUnavailableError, InvalidRequestError
from kiln.models.spec import Precision
from kiln.profiles.hardware import (
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    MemoryInfo,
    OpenVinoDevice,
    RuntimeInfo,
)
from kiln.profiles.select import (
    DEFAULT_DRIFT_BUDGET,
    MEMORY_HEADROOM,
    Constraint,
    Objective,
    Plan,
    Policy,
    parse_drift_budget,
    select,
)
from kiln.profiles.targets import (
    DeviceKind,
    Placement,
    TargetProfile,
    builtin_target,
    builtin_targets,
    load_target,
    match_target,
    parse_target,
    target_for,
)

MIB = 1024**2

# ----------------------------------------------------------------------------- builders


def manifest(*variants, measurements=None) -> Manifest:
    return Manifest(
        family="stable-diffusion",
        source={"id": "synthetic", "kind": "test"},
        model_info={},
        components={},
        variants=tuple(variants),
        measurements=measurements or {},
    )


def runtimes(*available, ort_providers=("CPUExecutionProvider",), torch="cpu", trt=None):
    names = ("onnxruntime", "openvino", "tensorrt", "torch", "bitsandbytes", "nncf", "torchao")
    out = []
    for name in names:
        if name not in available:
            out.append(RuntimeInfo(name=name, available=False, detail="not installed"))
        elif name == "onnxruntime":
            out.append(RuntimeInfo(name, "1.20.1", True, ", ".join(ort_providers)))
        elif name == "torch":
            out.append(RuntimeInfo(name, "2.5.1", True, torch))
        elif name == "tensorrt":
            out.append(RuntimeInfo(name, trt or "10.3.0", True, ""))
        else:
            out.append(RuntimeInfo(name, "2025.0", True, ""))
    return tuple(out)


ZEN4 = CpuInfo(
    vendor="AMD",
    model_name="AMD Ryzen 9 7950X",
    architecture="x86_64",
    physical_cores=16,
    logical_cores=32,
    features=frozenset({"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"}),
)
ZEN3 = CpuInfo(
    vendor="AMD",
    model_name="AMD Ryzen 5 5600X",
    architecture="x86_64",
    physical_cores=6,
    logical_cores=12,
    features=frozenset({"avx2", "fma", "f16c", "sse4_2"}),
)
SAPPHIRE_RAPIDS = CpuInfo(
    vendor="Intel",
    model_name="Intel(R) Xeon(R) Platinum 8480+",
    architecture="x86_64",
    physical_cores=56,
    logical_cores=112,
    features=frozenset(
        {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
    ),
)
METEOR_LAKE = CpuInfo(
    vendor="Intel",
    model_name="Intel(R) Core(TM) Ultra 7 155H",
    architecture="x86_64",
    physical_cores=16,
    logical_cores=22,
    features=frozenset({"avx2", "fma", "avx_vnni"}),
)
GRAVITON3 = CpuInfo(
    vendor="ARM",
    model_name="Neoverse-V1",
    architecture="arm64",
    physical_cores=8,
    logical_cores=8,
    features=frozenset({"neon"}),
)


def rtx4090(index=0) -> GpuInfo:
    return GpuInfo(
        vendor="nvidia",
        name="NVIDIA GeForce RTX 4090",
        index=index,
        compute_capability="8.9",
        vram_total_bytes=24 * GIB,
        vram_free_bytes=23 * GIB,
        driver_version="550.54",
        cuda_version="12.4",
    )


PROFILES = {
    "rtx4090": HardwareProfile(
        cpu=ZEN4,
        memory=MemoryInfo(64 * GIB, 48 * GIB),
        gpus=(rtx4090(),),
        runtimes=runtimes(
            "onnxruntime",
            "tensorrt",
            "torch",
            ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            torch="cuda 12.4",
        ),
        os_name="Linux",
    ),
    "laptop-6gb": HardwareProfile(
        cpu=ZEN3,
        memory=MemoryInfo(16 * GIB, 12 * GIB),
        gpus=(
            GpuInfo(
                vendor="nvidia",
                name="NVIDIA GeForce RTX 3060 Laptop GPU",
                compute_capability="8.6",
                vram_total_bytes=6 * GIB,
                vram_free_bytes=int(5.5 * GIB),
            ),
        ),
        runtimes=runtimes(
            "onnxruntime",
            "openvino",
            "torch",
            ort_providers=("CUDAExecutionProvider", "CPUExecutionProvider"),
            torch="cuda 12.1",
        ),
        openvino_devices=(OpenVinoDevice("CPU", "AMD Ryzen 5 5600X"),),
        os_name="Windows",
    ),
    "intel-amx": HardwareProfile(
        cpu=SAPPHIRE_RAPIDS,
        memory=MemoryInfo(512 * GIB, 300 * GIB),
        runtimes=runtimes("onnxruntime", "openvino", "torch", "nncf"),
        openvino_devices=(OpenVinoDevice("CPU", "Intel(R) Xeon(R) Platinum 8480+"),),
        os_name="Linux",
    ),
    "amd-avx2": HardwareProfile(
        cpu=ZEN3,
        memory=MemoryInfo(32 * GIB, 20 * GIB),
        runtimes=runtimes("onnxruntime", "openvino", "torch"),
        openvino_devices=(OpenVinoDevice("CPU", "AMD Ryzen 5 5600X"),),
        os_name="Linux",
    ),
    "arm": HardwareProfile(
        cpu=GRAVITON3,
        memory=MemoryInfo(32 * GIB, 28 * GIB),
        runtimes=runtimes("onnxruntime", "torch"),
        os_name="Linux",
    ),
    "intel-igpu": HardwareProfile(
        cpu=METEOR_LAKE,
        memory=MemoryInfo(32 * GIB, 20 * GIB),
        runtimes=runtimes("onnxruntime", "openvino"),
        openvino_devices=(
            OpenVinoDevice("CPU", "Intel(R) Core(TM) Ultra 7 155H"),
            OpenVinoDevice(
                "GPU",
                "Intel(R) Arc(TM) Graphics (iGPU)",
                {"DEVICE_TYPE": "Type.INTEGRATED", "OPTIMIZATION_CAPABILITIES": "FP32,FP16,INT8"},
            ),
            OpenVinoDevice("NPU", "Intel(R) AI Boost"),
        ),
        os_name="Windows",
    ),
    "bare": HardwareProfile(
        cpu=ZEN3,
        memory=MemoryInfo(16 * GIB, 10 * GIB),
        runtimes=runtimes("onnxruntime"),
        os_name="Linux",
    ),
    "apple": HardwareProfile(
        cpu=CpuInfo(vendor="Apple", model_name="Apple M3 Max", architecture="arm64"),
        memory=MemoryInfo(64 * GIB, 40 * GIB),
        mps_available=True,
        runtimes=runtimes("onnxruntime", "torch", torch="cpu"),
        os_name="Darwin",
    ),
}

TRT_4090 = {"gpu": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "tensorrt": "10.3"}
TRT_3090 = {"gpu": "NVIDIA GeForce RTX 3090", "compute_capability": "8.6", "tensorrt": "10.3"}


def sd15(*extra: Variant, measurements=None) -> Manifest:
    """SD 1.5 sizes: fp32 ONNX for every component, plus `extra` variants."""
    return manifest(
        variant("text_encoder", "onnx", "fp32", 0.47),
        variant("unet", "onnx", "fp32", 3.2),
        variant("vae_decoder", "onnx", "fp32", 0.19),
        *extra,
        measurements=measurements,
    )


def full_sd15(**kwargs) -> Manifest:
    """SD 1.5 exported to every runtime and precision a target might want."""
    extra = []
    for component, fp32 in (("text_encoder", 0.47), ("unet", 3.2), ("vae_decoder", 0.19)):
        extra += [
            variant(component, "onnx", "fp16", fp32 / 2),
            variant(component, "onnx", "int8", fp32 / 4, drift={"psnr": 28.0}),
            variant(component, "openvino", "fp32", fp32),
            variant(component, "openvino", "fp16", fp32 / 2),
            variant(component, "openvino", "bf16", fp32 / 2, drift={"psnr": 34.0}),
            variant(component, "openvino", "int8", fp32 / 4, drift={"psnr": 27.0}),
            variant(component, "torch", "fp16", fp32 / 2),
            variant(component, "tensorrt", "fp16", fp32 / 2, built_for=TRT_4090),
        ]
    return sd15(*extra, **kwargs)


def picks(plan: Plan) -> dict[str, tuple[str, str]]:
    return {c.component: (c.variant_id, c.device) for c in plan.choices}


def rejected(plan: Plan, component: str) -> dict[str, str]:
    """Variant id -> why it was not chosen (placements on several devices joined by " | ")."""
    out: dict[str, str] = {}
    for vid, why in plan[component].rejected:
        out[vid] = f"{out[vid]} | {why}" if vid in out else why
    return out


# ----------------------------------------------------------------------------- targets


def test_builtin_targets_load_and_name_the_issue_targets():
    names = {t.name for t in builtin_targets()}
    assert {
        "intel-cpu-amx",
        "x86-cpu-avx2",
        "x86-cpu-avx512",
        "arm-cpu",
        "nvidia-gpu",
        "intel-gpu",
        "apple-silicon",
        "generic-cpu",
    } <= names
    assert len(names) == len(builtin_targets())
    for target in builtin_targets():
        assert target.order, target.name
        assert target.source.startswith("builtin:")
        assert len(set(target.order)) == len(target.order), f"{target.name} repeats an entry"
    assert builtin_target("generic-cpu").match.matches(HardwareProfile())


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ("rtx4090", "nvidia-gpu+x86-cpu-avx512"),
        ("laptop-6gb", "nvidia-gpu+x86-cpu-avx2"),
        ("intel-amx", "intel-cpu-amx"),
        ("amd-avx2", "x86-cpu-avx2"),
        ("arm", "arm-cpu"),
        ("intel-igpu", "intel-gpu+x86-cpu-avx2"),
        ("bare", "x86-cpu-avx2"),
        ("apple", "apple-silicon+arm-cpu"),
    ],
)
def test_match_target(profile, expected):
    assert match_target(PROFILES[profile]).name == expected


def test_match_target_falls_back_to_generic_cpu():
    odd = HardwareProfile(cpu=CpuInfo(architecture="riscv64"))
    assert match_target(odd).name == "generic-cpu"


def test_composed_target_tries_the_accelerator_then_the_cpu_order():
    target = match_target(PROFILES["rtx4090"])
    order = [str(p) for p in target.order]
    assert order[0] == "tensorrt:fp16@cuda"
    assert order.index("onnx:fp32@cuda") < order.index("openvino:int8@cpu")


def test_placement_parse():
    assert Placement.parse("openvino:int8@gpu") == Placement(
        "openvino", Precision.INT8, DeviceKind.GPU
    )
    assert Placement.parse("ort") == Placement("onnx")
    assert Placement.parse("onnx").resolved_device is DeviceKind.CPU
    assert Placement.parse("trt:fp16").resolved_device is DeviceKind.CUDA
    for bad, fragment in [
        ("tensorrt@cpu", "cannot run on cpu"),
        ("onnx:fp7", "unknown precision"),
        ("cuda:fp16", "unknown runtime"),
        ("onnx@tpu", "unknown device"),
    ]:
        with pytest.raises(InvalidRequestError, match=fragment):
            Placement.parse(bad)


def test_options_merge_least_specific_first():
    amx = builtin_target("intel-cpu-amx")
    assert amx.options_for("openvino", Precision.FP32, DeviceKind.CPU) == {
        "INFERENCE_PRECISION_HINT": "f32",
    }
    assert (
        amx.options_for("openvino", Precision.INT8, DeviceKind.CPU)["INFERENCE_PRECISION_HINT"]
        == "bf16"
    )


USER_TARGET = """
name = "my-box"
description = "onnxruntime only, int8 first"
priority = 5
order = ["onnx:int8", "onnx:fp32"]

[match]
architecture = ["x86_64"]

[options."onnx"]
intra_op_threads = 2
"""


def test_onnxruntime_stops_spinning_only_beside_another_cpu_runtime():
    mixed = select(
        full_sd15(), PROFILES["amd-avx2"], Policy.from_strings(prefer=["unet=openvino", "onnx"])
    )
    assert mixed["unet"].runtime == "openvino" and mixed["unet"].device == "CPU"
    assert picks(mixed)["text_encoder"][0].startswith("text_encoder/onnx/")
    assert mixed["text_encoder"].options["spinning"] is False
    assert "spinning" not in mixed["unet"].options
    alone = select(full_sd15(), PROFILES["amd-avx2"], Policy.from_strings(prefer=["onnx"]))
    assert {c.runtime for c in alone.choices} == {"onnxruntime"}
    assert all("spinning" not in c.options for c in alone.choices)


def test_user_target_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(USER_TARGET)
    target = load_target(path)
    assert target.name == "my-box" and target.source == str(path)
    assert target_for(PROFILES["amd-avx2"], path) == target
    assert target_for(PROFILES["amd-avx2"], str(path)) == target
    assert target_for(PROFILES["amd-avx2"], "arm-cpu").name == "arm-cpu"
    plan = select(full_sd15(), PROFILES["amd-avx2"], Policy(), target)
    assert plan.target == "my-box"
    assert plan["unet"].variant_id == "unet/onnx/int8"
    assert plan["unet"].options == {"providers": ["CPUExecutionProvider"], "intra_op_threads": 2}
    assert "my-box's order (#1 onnx:int8)" in plan["unet"].reason
    assert not plan.notes
    # A target whose [match] does not hold still applies when given, with a note.
    arm_plan = select(full_sd15(), PROFILES["arm"], Policy(), target)
    assert any("does not match this machine" in n for n in arm_plan.notes)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name = 'x'\norder = [", "not valid TOML"),
        ("order = ['onnx']", "needs a `name"),
        ("name = 'x'", "needs `order"),
        ("name = 'x'\norder = ['onnx']\nspeed = 1", "unknown key"),
        ("name = 'x'\norder = ['onnx']\n[match]\ngpu = ['nvidia']", "unknown [match] key"),
        ("name = 'x'\norder = ['onnx:fp9']", "unknown precision"),
        ("name = 'x'\norder = ['onnx']\nkind = 'tpu'", "kind must be"),
        (
            "name = 'x'\norder = ['onnx']\n[options.onnx]\nspinning = 'false'",
            "spinning must be true",
        ),
        ("name = 'x'\norder = ['onnx']\ncpu_fallback = 1", "cpu_fallback must be true or false"),
    ],
)
def test_bad_target_files_say_why(text, fragment):
    with pytest.raises(InvalidRequestError, match=fragment.replace("[", r"\[")):
        parse_target(text, "bad.toml")


def test_missing_target_file():
    with pytest.raises(InvalidRequestError, match="cannot read target profile"):
        load_target("/no/such/target.toml")


# ----------------------------------------------------------------------------- machines


def test_nvidia_rtx4090_runs_tensorrt_and_cuda():
    plan = select(full_sd15(), PROFILES["rtx4090"])
    assert plan.target == "nvidia-gpu+x86-cpu-avx512"
    assert picks(plan) == {
        "text_encoder": ("text_encoder/tensorrt/fp16", "cuda:0"),
        "unet": ("unet/tensorrt/fp16", "cuda:0"),
        "vae_decoder": ("vae_decoder/tensorrt/fp16", "cuda:0"),
    }
    unet = plan["unet"]
    assert unet.runtime == "tensorrt"
    assert unet.reason.startswith("first runnable in nvidia-gpu+x86-cpu-avx512's order (#1")
    assert unet.memory_pool == "cuda:0"
    assert unet.memory_bytes == math.ceil(int(1.6 * GIB) * MEMORY_HEADROOM)
    # Without the TensorRT plans: onnxruntime's CUDA provider in fp16.
    no_trt = manifest(*(v for v in full_sd15().variants if v.target != "tensorrt"))
    plan = select(no_trt, PROFILES["rtx4090"])
    assert plan["unet"].variant_id == "unet/onnx/fp16"
    assert plan["unet"].device == "cuda:0"
    assert plan["unet"].options["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("built_for", "fragment"),
    [
        (
            TRT_3090,
            "built for NVIDIA GeForce RTX 3090 (sm 8.6), this machine has NVIDIA GeForce RTX 4090 (sm 8.9)",
        ),
        ({**TRT_4090, "compute_capability": "8.6"}, "built for NVIDIA GeForce RTX 4090 (sm 8.6)"),
        ({**TRT_4090, "tensorrt": "8.6"}, "built with TensorRT 8.6, installed is 10.3.0"),
        (None, "does not record the GPU and TensorRT version"),
    ],
)
def test_tensorrt_plan_from_another_gpu_is_never_chosen(built_for, fragment):
    m = sd15(
        variant("unet", "onnx", "fp16", 1.6),
        variant("unet", "tensorrt", "fp16", 1.6, built_for=built_for),
    )
    plan = select(m, PROFILES["rtx4090"])
    assert plan["unet"].variant_id == "unet/onnx/fp16"
    assert fragment in rejected(plan, "unet")["unet/tensorrt/fp16"]
    assert "skipped unet/tensorrt/fp16@cuda" in plan["unet"].reason
    # Not even when preferred; and requiring it is an error that says why.
    plan = select(m, PROFILES["rtx4090"], Policy.from_strings(prefer=["tensorrt"]))
    assert plan["unet"].runtime != "tensorrt"
    with pytest.raises(InvalidRequestError, match="no runnable variant for unet") as info:
        select(m, PROFILES["rtx4090"], Policy.from_strings(require=["unet=tensorrt:fp16"]))
    assert fragment in str(info.value)


def test_tensorrt_plan_goes_to_the_gpu_it_was_built_for():
    other = GpuInfo(
        vendor="nvidia",
        name="NVIDIA RTX A6000",
        index=0,
        compute_capability="8.6",
        vram_total_bytes=48 * GIB,
        vram_free_bytes=47 * GIB,
    )
    profile = HardwareProfile(
        cpu=ZEN4,
        memory=MemoryInfo(64 * GIB, 48 * GIB),
        gpus=(other, rtx4090(index=1)),
        runtimes=PROFILES["rtx4090"].runtimes,
    )
    m = sd15(variant("unet", "tensorrt", "fp16", 1.6, built_for=TRT_4090))
    plan = select(m, profile)
    assert picks(plan)["unet"] == ("unet/tensorrt/fp16", "cuda:1")
    # CUDA variants go to the GPU with the most free VRAM.
    assert plan["vae_decoder"].device == "cuda:0"


def test_tensorrt_hardware_compatible_plan_runs_on_any_ampere_or_newer():
    m = sd15(
        variant(
            "unet",
            "tensorrt",
            "fp16",
            1.6,
            built_for={**TRT_3090, "hardware_compatibility": "ampere+"},
        )
    )
    assert select(m, PROFILES["rtx4090"])["unet"].variant_id == "unet/tensorrt/fp16"


def test_laptop_6gb_gpu_keeps_what_does_not_fit_off_the_gpu():
    sdxl = manifest(
        variant("text_encoder", "onnx", "fp16", 0.24),
        variant("text_encoder_2", "onnx", "fp16", 1.3),
        variant("unet", "onnx", "fp16", 4.8),
        variant("unet", "onnx", "fp32", 9.6),
        variant("unet", "openvino", "int8", 2.4, drift={"psnr": 26.0}),
        variant("vae_decoder", "onnx", "fp16", 0.1),
        variant("vae_decoder", "onnx", "fp32", 0.2),
    )
    plan = select(sdxl, PROFILES["laptop-6gb"])
    assert picks(plan) == {
        "text_encoder": ("text_encoder/onnx/fp16", "cuda:0"),
        "text_encoder_2": ("text_encoder_2/onnx/fp16", "cuda:0"),
        "unet": ("unet/openvino/int8", "CPU"),
        "vae_decoder": ("vae_decoder/onnx/fp16", "cuda:0"),
    }
    why = rejected(plan, "unet")["unet/onnx/fp16"]
    assert why.startswith("on cuda:0: needs 7.2 GiB (4.8 GiB x 1.5 headroom)")
    assert "free VRAM on cuda:0 is 5.5 GiB" in why
    assert "skipped unet/onnx/fp16@cuda:0: needs 7.2 GiB" in plan["unet"].reason
    assert "first runnable" in plan["unet"].reason
    assert plan["unet"].options["INFERENCE_PRECISION_HINT"] == "f32"
    # fp32 does not fit on the GPU either, and ranks below int8 on this CPU.
    assert "unet/onnx/fp32" in rejected(plan, "unet")


def test_components_share_the_gpu_memory():
    m = manifest(
        variant("unet", "onnx", "fp16", 3.2),
        variant("vae_decoder", "onnx", "fp16", 0.6),
        variant("vae_decoder", "onnx", "fp32", 1.2),
    )
    plan = select(m, PROFILES["laptop-6gb"])
    # unet takes 4.8 of 5.5 GiB; the VAE's 0.9 GiB does not fit in what is left.
    assert picks(plan) == {
        "unet": ("unet/onnx/fp16", "cuda:0"),
        "vae_decoder": ("vae_decoder/onnx/fp32", "cpu"),
    }
    assert (
        "free VRAM on cuda:0 is 0.7 GiB after unet"
        in rejected(plan, "vae_decoder")["vae_decoder/onnx/fp16"]
    )


def test_intel_cpu_with_amx_runs_openvino_bf16_with_explicit_hints():
    plan = select(full_sd15(), PROFILES["intel-amx"])
    assert plan.target == "intel-cpu-amx"
    assert picks(plan) == {
        "text_encoder": ("text_encoder/openvino/bf16", "CPU"),
        "unet": ("unet/openvino/bf16", "CPU"),
        "vae_decoder": ("vae_decoder/openvino/bf16", "CPU"),
    }
    assert plan["unet"].options["INFERENCE_PRECISION_HINT"] == "bf16"
    assert plan["unet"].reason == "first runnable in intel-cpu-amx's order (#1 openvino:bf16@cpu)"
    why = rejected(plan, "unet")
    assert why["unet/tensorrt/fp16"].startswith(
        "tensorrt is not installed; pip install 'kiln[gpu]'"
    )
    assert why["unet/openvino/int8"] == "on CPU: ranked lower"


def test_fp32_on_amx_sets_the_f32_hint():
    plan = select(sd15(variant("unet", "openvino", "fp32", 3.2)), PROFILES["intel-amx"])
    assert picks(plan)["unet"] == ("unet/openvino/fp32", "CPU")
    assert plan["unet"].options["INFERENCE_PRECISION_HINT"] == "f32"


def test_amd_avx2_mixed_plan_unet_int8_openvino_vae_fp32_onnxruntime():
    m = sd15(variant("unet", "openvino", "int8", 0.8, drift={"psnr": 27.5}))
    plan = select(m, PROFILES["amd-avx2"])
    assert plan.target == "x86-cpu-avx2"
    assert picks(plan) == {
        "text_encoder": ("text_encoder/onnx/fp32", "cpu"),
        "unet": ("unet/openvino/int8", "CPU"),
        "vae_decoder": ("vae_decoder/onnx/fp32", "cpu"),
    }
    assert [c.runtime for c in plan.choices] == ["onnxruntime", "openvino", "onnxruntime"]
    assert plan["unet"].reason == "first runnable in x86-cpu-avx2's order (#1 openvino:int8@cpu)"
    assert plan["vae_decoder"].reason == "first runnable in x86-cpu-avx2's order (#4 onnx:fp32@cpu)"


def test_arm_cpu_prefers_onnxruntime_int8():
    plan = select(full_sd15(), PROFILES["arm"])
    assert plan.target == "arm-cpu"
    assert picks(plan)["unet"] == ("unet/onnx/int8", "cpu")
    assert rejected(plan, "unet")["unet/openvino/int8"].startswith("openvino is not installed")


def test_intel_igpu_through_openvino():
    plan = select(full_sd15(), PROFILES["intel-igpu"])
    assert plan.target == "intel-gpu+x86-cpu-avx2"
    assert picks(plan)["unet"] == ("unet/openvino/fp16", "GPU")
    unet = plan["unet"]
    assert unet.options["INFERENCE_PRECISION_HINT"] == "f16"
    assert unet.memory_pool == "ram"  # an integrated GPU shares system memory
    # fp32-only components fall back: the iGPU entry for fp32 comes after fp16/int8/int4.
    plan = select(sd15(), PROFILES["intel-igpu"])
    assert picks(plan)["unet"] == ("unet/onnx/fp32", "cpu")
    plan = select(sd15(variant("unet", "openvino", "fp32", 3.2)), PROFILES["intel-igpu"])
    assert picks(plan)["unet"] == ("unet/openvino/fp32", "GPU")
    assert plan["unet"].options["INFERENCE_PRECISION_HINT"] == "f32"


def test_openvino_npu_is_used_only_when_asked_and_present():
    m = sd15(variant("unet", "openvino", "int8", 0.8))
    plan = select(m, PROFILES["intel-igpu"], Policy.from_strings(prefer=["unet=openvino@npu"]))
    # NPU is in no built-in order: a constraint naming a device places the variant there.
    assert picks(plan)["unet"] == ("unet/openvino/int8", "NPU")
    assert plan["unet"].reason == "preferred by the caller (--prefer unet=openvino@npu)"
    target = parse_target("name = 'npu'\norder = ['openvino:int8@npu', 'onnx']")
    plan = select(m, PROFILES["intel-igpu"], Policy(), target)
    assert picks(plan)["unet"] == ("unet/openvino/int8", "NPU")
    plan = select(m, PROFILES["amd-avx2"], Policy(), target)
    assert (
        "no OpenVINO NPU device (OpenVINO sees CPU)" in rejected(plan, "unet")["unet/openvino/int8"]
    )


def test_machine_without_optional_runtimes():
    plan = select(full_sd15(), PROFILES["bare"])
    assert {c.runtime for c in plan.choices} == {"onnxruntime"}
    # x86-cpu-avx2 puts int8 first; drift 28 dB is within the default budget.
    assert picks(plan)["unet"] == ("unet/onnx/int8", "cpu")
    why = rejected(plan, "unet")
    assert why["unet/openvino/int8"] == "openvino is not installed; pip install 'kiln[openvino]'"
    assert why["unet/torch/fp16"].startswith("torch is not installed")
    assert "skipped unet/openvino/int8@cpu: openvino is not installed" in plan["unet"].reason


def test_machine_with_nothing_installed_says_what_to_install():
    nothing = HardwareProfile(cpu=ZEN3, memory=MemoryInfo(16 * GIB, 10 * GIB), runtimes=runtimes())
    with pytest.raises(BackendUnavailableError, match="no runnable variant for unet") as info:
        select(sd15(), nothing)
    assert "onnxruntime is not installed; pip install onnxruntime" in str(info.value)


def test_apple_silicon_runs_torch_on_mps():
    plan = select(full_sd15(), PROFILES["apple"])
    assert plan.target == "apple-silicon+arm-cpu"
    assert picks(plan)["unet"] == ("unet/torch/fp16", "mps")
    assert plan["unet"].options == {"dtype": "float16"}
    no_mps = HardwareProfile(
        cpu=PROFILES["apple"].cpu,
        memory=PROFILES["apple"].memory,
        runtimes=PROFILES["apple"].runtimes,
    )
    plan = select(full_sd15(), no_mps, Policy(), builtin_target("apple-silicon"))
    assert picks(plan)["unet"] == ("unet/onnx/int8", "cpu")
    assert rejected(plan, "unet")["unet/torch/fp16"].startswith("on mps: MPS is not available")


def test_cuda_needs_a_cuda_provider_and_a_cuda_torch():
    profile = HardwareProfile(
        cpu=ZEN3,
        memory=MemoryInfo(32 * GIB, 20 * GIB),
        gpus=(rtx4090(),),
        runtimes=runtimes("onnxruntime", "torch"),
    )
    m = sd15(variant("unet", "onnx", "fp16", 1.6), variant("unet", "torch", "fp16", 1.6))
    plan = select(m, profile)
    assert picks(plan)["unet"] == ("unet/onnx/fp32", "cpu")
    why = rejected(plan, "unet")
    assert (
        "onnxruntime has no CUDAExecutionProvider (has CPUExecutionProvider)"
        in why["unet/onnx/fp16"]
    )
    assert "pip install 'kiln[gpu]'" in why["unet/onnx/fp16"]
    assert why["unet/torch/fp16"].startswith("on cuda:0: torch is not a CUDA build (cpu) | ")


def test_bf16_needs_ampere_on_cuda():
    turing = GpuInfo(
        vendor="nvidia", name="Tesla T4", compute_capability="7.5", vram_total_bytes=16 * GIB
    )
    profile = HardwareProfile(
        cpu=ZEN3,
        memory=MemoryInfo(32 * GIB, 20 * GIB),
        gpus=(turing,),
        runtimes=PROFILES["rtx4090"].runtimes,
    )
    m = sd15(variant("unet", "torch", "bf16", 1.6), variant("unet", "torch", "fp16", 1.6))
    plan = select(m, profile)
    assert picks(plan)["unet"] == ("unet/torch/fp16", "cuda:0")
    assert "bf16 needs compute capability 8.0+" in rejected(plan, "unet")["unet/torch/bf16"]


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_a_variant_that_does_not_fit_is_never_chosen(name):
    profile = PROFILES[name]
    plan = select(full_sd15(), profile)
    used: dict[str, int] = {}
    for choice in plan.choices:
        used[choice.memory_pool] = used.get(choice.memory_pool, 0) + choice.memory_bytes
    pools = {"ram": profile.memory.available_bytes}
    pools.update({f"cuda:{g.index}": g.vram_free_bytes for g in profile.gpus})
    for pool, total in used.items():
        assert total <= pools[pool], (pool, total)


def test_nothing_fits_is_an_error_with_the_numbers():
    tiny = HardwareProfile(
        cpu=ZEN3, memory=MemoryInfo(8 * GIB, 2 * GIB), runtimes=runtimes("onnxruntime")
    )
    with pytest.raises(
        BackendUnavailableError, match=r"needs 4\.8 GiB .*available RAM is 2\.0 GiB"
    ):
        select(sd15(), tiny)


def test_memory_headroom_is_a_policy_knob():
    small = HardwareProfile(
        cpu=ZEN3, memory=MemoryInfo(8 * GIB, 5 * GIB), runtimes=runtimes("onnxruntime")
    )
    # 1.5 x (3.2 + 0.47 + 0.19) GiB = 5.8 GiB does not fit in 5 GiB; 1.2 x is 4.6 GiB.
    with pytest.raises(BackendUnavailableError, match="after unet"):
        select(sd15(), small)
    plan = select(sd15(), small, Policy(memory_headroom=1.2))
    assert plan["unet"].memory_bytes == math.ceil(int(3.2 * GIB) * 1.2)
    assert sum(c.memory_bytes for c in plan.choices) <= 5 * GIB
    with pytest.raises(InvalidRequestError, match="headroom"):
        Policy(memory_headroom=0.5)


def test_unknown_memory_is_noted_not_refused():
    unknown = HardwareProfile(cpu=ZEN3, runtimes=runtimes("onnxruntime"))
    plan = select(sd15(), unknown)
    assert plan["unet"].variant_id == "unet/onnx/fp32"
    assert any("available RAM is unknown" in n for n in plan.notes)


# ----------------------------------------------------------------------------- measured


def test_measured_results_override_the_static_order():
    profile = PROFILES["intel-amx"]
    times = {
        "unet/openvino/bf16": {"median_ms": 1830.0},
        "unet/onnx/fp32": {"median_ms": 900.0},
        "unet/openvino/int8": {"median_ms": 1810.0},
    }
    plan = select(full_sd15(measurements={profile.fingerprint: times}), profile)
    unet = plan["unet"]
    assert unet.variant_id == "unet/onnx/fp32"
    assert unet.measured_ms == 900.0
    assert unet.reason.startswith(
        "fastest measured on this hardware (900.0 ms median; next unet/openvino/int8 1810.0 ms)"
    )
    assert "over intel-cpu-amx's order" in unet.reason
    # Unmeasured components keep the static order.
    assert plan["vae_decoder"].variant_id == "vae_decoder/openvino/bf16"


def test_measurements_for_other_hardware_or_devices_are_ignored():
    profile = PROFILES["intel-amx"]
    times = {"unet/onnx/fp32": {"median_ms": 1.0}}
    m = full_sd15(measurements={"0123456789abcdef": times})
    assert select(m, profile)["unet"].variant_id == "unet/openvino/bf16"
    m = full_sd15(
        measurements={
            profile.fingerprint: {"unet/onnx/fp32": {"median_ms": 1.0, "device": "cuda:0"}}
        }
    )
    assert select(m, profile)["unet"].variant_id == "unet/openvino/bf16"


def test_an_unrunnable_measured_variant_is_not_chosen():
    profile = PROFILES["bare"]
    times = {"unet/openvino/int8": {"median_ms": 10.0}, "unet/onnx/fp32": {"median_ms": 5000.0}}
    plan = select(full_sd15(measurements={profile.fingerprint: times}), profile)
    assert plan["unet"].variant_id == "unet/onnx/fp32"
    assert "fastest measured" in plan["unet"].reason


# ----------------------------------------------------------------------------- policy


def test_drift_over_budget_is_excluded_unless_required_by_name():
    m = sd15(variant("unet", "openvino", "int8", 0.8, drift={"psnr": 15.0}))
    profile = PROFILES["amd-avx2"]
    plan = select(m, profile)
    assert plan["unet"].variant_id == "unet/onnx/fp32"
    assert rejected(plan, "unet")["unet/openvino/int8"].startswith("drift psnr 15 < budget 20")
    assert "skipped unet/openvino/int8@cpu: drift psnr 15 < budget 20" in plan["unet"].reason
    for required in ("unet=openvino:int8", "unet/openvino/int8", "openvino:int8@cpu"):
        policy = Policy.from_strings(require=[required], allow_failed_parity=False)
        if "=" not in required and "/" not in required:
            m2 = manifest(*(v for v in m.variants if v.component == "unet"))
        else:
            m2 = m
        plan = select(m2, profile, policy)
        assert plan["unet"].variant_id == "unet/openvino/int8"
        assert "drift psnr 15 < budget 20 accepted: required by name" in plan["unet"].reason
    # Requiring only the runtime does not name the variant.
    with pytest.raises(InvalidRequestError, match="drift psnr 15 < budget 20"):
        select(m, profile, Policy.from_strings(require=["unet=openvino"]))
    # A looser budget admits it.
    plan = select(m, profile, Policy.from_strings(drift_budget=["psnr=12"]))
    assert plan["unet"].variant_id == "unet/openvino/int8"


def test_drift_metric_directions_and_failed_flag():
    profile = PROFILES["amd-avx2"]
    budget = {"max_abs": 0.1, "ssim": 0.9}
    for drift, ok in [
        ({"max_abs": 0.05, "ssim": 0.95}, True),
        ({"max_abs": 0.2}, False),
        ({"ssim": 0.5}, False),
        ({"passed": False}, False),
        ({"note": "text is ignored", "psnr": 5.0}, True),  # psnr not in this budget
    ]:
        m = sd15(variant("unet", "openvino", "int8", 0.8, drift=drift))
        plan = select(m, profile, Policy(drift_budget=budget))
        assert (plan["unet"].variant_id == "unet/openvino/int8") is ok, drift
    assert DEFAULT_DRIFT_BUDGET == {
        "psnr": 20.0,
        "bleu": 0.3,
        "judged_correct_drop": 0.05,
        "caption_accuracy_drop": 0.05,
    }
    assert parse_drift_budget("psnr=25") == {"psnr": 25.0}
    assert parse_drift_budget(["psnr=25", "max_abs=0.1"]) == {"psnr": 25.0, "max_abs": 0.1}
    with pytest.raises(InvalidRequestError, match="METRIC=NUMBER"):
        parse_drift_budget(["psnr"])


def test_failed_parity_is_excluded_unless_allowed():
    failed = Parity(sizes={}, max_abs={"x": 1.0}, limit={"x": 0.1}, passed=False)
    m = sd15(variant("unet", "openvino", "int8", 0.8, parity=failed))
    profile = PROFILES["amd-avx2"]
    assert select(m, profile)["unet"].variant_id == "unet/onnx/fp32"
    plan = select(m, profile, Policy(allow_failed_parity=True))
    assert plan["unet"].variant_id == "unet/openvino/int8"


def test_prefer_per_component_beats_order_and_measurements():
    profile = PROFILES["intel-amx"]
    times = {"unet/openvino/bf16": {"median_ms": 100.0}}
    m = full_sd15(measurements={profile.fingerprint: times})
    plan = select(m, profile, Policy.from_strings(prefer=["unet=onnx:fp32"]))
    assert plan["unet"].variant_id == "unet/onnx/fp32"
    assert plan["unet"].reason == "preferred by the caller (--prefer unet=onnx:fp32)"
    assert plan["vae_decoder"].variant_id == "vae_decoder/openvino/bf16"


def test_prefer_a_device():
    no_trt = manifest(*(v for v in full_sd15().variants if v.target != "tensorrt"))
    plan = select(no_trt, PROFILES["rtx4090"], Policy.from_strings(prefer=["vae_decoder=onnx@cpu"]))
    # Every onnx VAE on the CPU is preferred; the CPU order (AVX-512: int8 first) ranks them.
    assert picks(plan)["vae_decoder"] == ("vae_decoder/onnx/int8", "cpu")
    assert picks(plan)["unet"] == ("unet/onnx/fp16", "cuda:0")


def test_require_that_cannot_be_met_says_why():
    profile = PROFILES["amd-avx2"]
    with pytest.raises(InvalidRequestError) as info:
        select(sd15(), profile, Policy.from_strings(require=["tensorrt:fp16"]))
    message = str(info.value)
    assert message.startswith("no runnable variant for unet meets --require tensorrt:fp16")
    assert "the artifact has no unet variant that matches (it has unet/onnx/fp32)" in message
    with pytest.raises(InvalidRequestError, match="names component 'unet2'"):
        select(sd15(), profile, Policy.from_strings(require=["unet2=onnx"]))
    with pytest.raises(InvalidRequestError, match="unet/onnx/fp32: on cuda: no NVIDIA GPU"):
        select(sd15(), profile, Policy.from_strings(require=["onnx@cuda"]))


def test_require_per_component_only_narrows_that_component():
    plan = select(
        full_sd15(), PROFILES["intel-amx"], Policy.from_strings(require=["unet=openvino:int8"])
    )
    assert plan["unet"].variant_id == "unet/openvino/int8"
    assert plan["unet"].reason.startswith("meets --require unet=openvino:int8; first runnable")
    assert plan["text_encoder"].variant_id == "text_encoder/openvino/bf16"
    assert "excluded by --require unet=openvino:int8" in rejected(plan, "unet")["unet/onnx/fp32"]


def test_memory_objective_picks_the_smallest():
    plan = select(full_sd15(), PROFILES["intel-amx"], Policy(objective="memory"))
    assert plan.objective == "memory"
    assert plan["unet"].variant_id == "unet/openvino/int8"  # 0.8 GiB, tie broken by the order
    assert plan["unet"].reason == (
        "smallest runnable variant (0.8 GiB), intel-cpu-amx's order (#2 openvino:int8@cpu)"
    )


def test_unlisted_variants_run_on_the_runtime_default_device():
    target = parse_target("name = 'tiny'\norder = ['openvino:int8']")
    plan = select(sd15(), PROFILES["amd-avx2"], Policy(), target)
    assert picks(plan)["unet"] == ("unet/onnx/fp32", "cpu")
    assert plan["unet"].reason == "not in tiny's order, on cpu"


def test_unknown_artifact_target_is_rejected_not_fatal():
    m = sd15(variant("unet", "coreml", "fp16", 1.6))
    plan = select(m, PROFILES["apple"])
    assert rejected(plan, "unet")["unet/coreml/fp16"] == "unknown target 'coreml'"


# ----------------------------------------------------------------------------- parsing, output


def test_constraint_parse():
    assert Constraint.parse("onnx:fp32") == Constraint(None, "onnx", Precision.FP32)
    assert Constraint.parse("ov") == Constraint(None, "openvino")
    assert Constraint.parse(":int8") == Constraint(None, None, Precision.INT8)
    assert Constraint.parse("unet=openvino:int8") == Constraint("unet", "openvino", Precision.INT8)
    # A variant id names the untagged variant exactly; `-TAG` picks a tagged one.
    exact = Constraint("unet", "openvino", Precision.INT8, tag="")
    assert Constraint.parse("unet/openvino/int8") == exact
    assert Constraint.parse("unet/onnx/int8-static").tag == "static"
    assert Constraint.parse("onnx:int8-weight-only").tag == "weight-only"
    assert Constraint.parse("vae_decoder=ort@cuda") == Constraint(
        "vae_decoder", "onnx", None, DeviceKind.CUDA
    )
    for text in ("onnx:fp32", "unet=openvino:int8", ":int8", "onnx@cuda", "onnx:int8-static"):
        assert str(Constraint.parse(str(Constraint.parse(text)))) == str(Constraint.parse(text))
    for bad, fragment in [
        ("onnx:fp7", "unknown precision"),
        ("cuda:fp16", "unknown runtime"),
        ("onnx@tpu", "unknown device"),
        ("unet=", "names no runtime"),
    ]:
        with pytest.raises(InvalidRequestError, match=fragment):
            Constraint.parse(bad)


def test_policy_from_strings_and_objective():
    policy = Policy.from_strings(["onnx"], ["unet=openvino:int8"], objective="memory")
    assert policy.objective is Objective.MEMORY and policy.objective == "memory"
    assert policy.prefer == (Constraint(None, "onnx"),)
    assert policy.requirements_for("unet") == (Constraint("unet", "openvino", Precision.INT8),)
    assert policy.requirements_for("vae_decoder") == ()
    with pytest.raises(InvalidRequestError, match="unknown objective"):
        Policy(objective="speed")


def test_plan_prints_as_a_table_and_serializes():
    m = sd15(variant("unet", "openvino", "int8", 0.8))
    plan = select(m, PROFILES["amd-avx2"])
    text = str(plan)
    lines = text.splitlines()
    assert (
        lines[0]
        == f"plan (latency, target x86-cpu-avx2, hardware {PROFILES['amd-avx2'].fingerprint})"
    )
    assert lines[1].split() == ["component", "variant", "runtime", "device", "reason"]
    assert lines[3].startswith("text_encoder  text_encoder/onnx/fp32  onnxruntime  cpu")
    assert len(lines) == 6
    verbose = plan.table(verbose=True)
    assert "not unet/onnx/fp32: on cpu: ranked lower" in verbose
    assert plan.rows()[1] == ("unet", "unet/openvino/int8", "openvino", "CPU", plan["unet"].reason)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["target"] == "x86-cpu-avx2"
    assert data["choices"][1]["options"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert "unet" in plan and "vae" not in plan and len(plan) == 3
    with pytest.raises(KeyError):
        plan["vae"]
    # The minimal form other code builds still works.
    assert Plan(plan.choices).rows() == plan.rows()


def test_select_is_pure(monkeypatch):
    m = full_sd15()
    profile = PROFILES["rtx4090"]
    first = select(m, profile)  # built-in targets are read (once) here

    def no_io(*args, **kwargs):
        raise AssertionError("select() did I/O")

    monkeypatch.setattr(builtins, "open", no_io)
    monkeypatch.setattr(pathlib.Path, "read_text", no_io)
    monkeypatch.setattr(pathlib.Path, "iterdir", no_io)
    assert select(m, profile) == first
    assert select(m, profile, Policy(), match_target(profile)) == first


def test_target_profile_is_frozen():
    target = builtin_target("nvidia-gpu")
    assert isinstance(target, TargetProfile)
    with pytest.raises(AttributeError):
        target.name = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        target.options[0][1]["cuda_graph"] = True  # type: ignore[index]


def test_quantized_variant_without_end_to_end_drift_is_not_auto_selected():
    profile = PROFILES["amd-avx2"]
    m = sd15(variant("unet", "openvino", "int8", 0.8, drift={"component": {"calls": 2}}))
    plan = select(m, profile, Policy())
    assert plan["unet"].variant_id != "unet/openvino/int8"
    assert "never measured" in rejected(plan, "unet")["unet/openvino/int8"]
