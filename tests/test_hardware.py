"""Hardware detection: real probes on this machine plus synthetic failure modes."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kiln.profiles import hardware as hw
from kiln.profiles.hardware import (
    CpuInfo,
    GpuInfo,
    HardwareProfile,
    MemoryInfo,
    OpenVinoDevice,
    RuntimeInfo,
)

GIB = 1024**3


def _proc_flags() -> set[str] | None:
    """Raw flag names from /proc/cpuinfo, or None off Linux."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


PROC_FLAGS = _proc_flags()
IS_X86_64 = platform.machine().lower() in ("x86_64", "amd64")
HAS_GPU_DEVICE_NODE = Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists()


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Monkeypatched probes must not leave a doctored profile cached for other tests."""
    hw.clear_cache()
    yield
    hw.clear_cache()


@pytest.fixture(scope="module")
def profile() -> HardwareProfile:
    return hw.detect(refresh=True)


def _synthetic() -> HardwareProfile:
    return HardwareProfile(
        cpu=CpuInfo(
            vendor="Intel",
            model_name="Intel(R) Xeon(R) Platinum 8480+",
            architecture="x86_64",
            physical_cores=56,
            logical_cores=112,
            usable_cores=112,
            features=frozenset({"avx2", "avx512f", "amx_tile", "amx_bf16"}),
        ),
        memory=MemoryInfo(total_bytes=512 * GIB, available_bytes=300 * GIB),
        gpus=(
            GpuInfo(
                vendor="nvidia",
                name="NVIDIA GeForce RTX 4090",
                index=0,
                compute_capability="8.9",
                vram_total_bytes=24564 * 1024**2,
                vram_free_bytes=22000 * 1024**2,
                driver_version="550.54.15",
                cuda_version="12.4",
            ),
        ),
        openvino_devices=(
            OpenVinoDevice(
                name="CPU",
                full_name="Intel(R) Xeon(R) Platinum 8480+",
                properties={"OPTIMIZATION_CAPABILITIES": "FP32,BF16,INT8", "DEVICE_TYPE": "x"},
            ),
        ),
        mps_available=False,
        runtimes=(
            RuntimeInfo(
                "onnxruntime", "1.20.0", True, "CUDAExecutionProvider, CPUExecutionProvider"
            ),
            RuntimeInfo("tensorrt", None, False, "not installed"),
        ),
        os_name="Linux",
        os_version="6.8.0",
        python_version="3.11.9",
        probe_notes=("mps: timed out after 5s",),
    )


# -- import hygiene ---------------------------------------------------------------------------


def test_import_does_not_pull_heavy_runtimes():
    code = (
        "import sys, kiln.profiles.hardware as hw; "
        "print(sorted(m for m in ('torch','openvino','onnxruntime','pynvml','tensorrt') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


# -- detect() on this machine -----------------------------------------------------------------


def test_detect_basics(profile: HardwareProfile):
    assert isinstance(profile, HardwareProfile)
    assert profile.python_version == platform.python_version()
    assert profile.cpu.logical_cores and profile.cpu.logical_cores >= 1
    assert profile.memory.total_bytes and profile.memory.total_bytes > 0
    assert profile.probe_notes == (), profile.probe_notes
    assert {r.name for r in profile.runtimes} == set(hw.RUNTIME_NAMES)


@pytest.mark.skipif(not IS_X86_64, reason="x86_64 only")
def test_detect_reports_x86_64(profile: HardwareProfile):
    assert profile.cpu.architecture == "x86_64"


@pytest.mark.skipif(PROC_FLAGS is None, reason="needs /proc/cpuinfo")
@pytest.mark.parametrize("feature", sorted(hw.KNOWN_FEATURES - {"neon"}))
def test_features_match_proc_cpuinfo(profile: HardwareProfile, feature: str):
    assert profile.has_feature(feature) == (feature in PROC_FLAGS)


@pytest.mark.skipif(not PROC_FLAGS or "avx512f" not in PROC_FLAGS, reason="CPU lacks AVX-512")
def test_detects_avx512(profile: HardwareProfile):
    assert profile.has_feature("avx512f")
    assert profile.has_feature("AVX512F")  # case-insensitive
    if "avx512_vnni" in PROC_FLAGS:
        assert profile.has_feature("avx512_vnni")


@pytest.mark.skipif(not PROC_FLAGS or "amx_tile" not in PROC_FLAGS, reason="CPU lacks AMX")
def test_detects_amx(profile: HardwareProfile):
    assert profile.has_feature("amx_tile")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino missing")
def test_openvino_cpu_device(profile: HardwareProfile):
    cpu = profile.openvino_device("CPU")
    assert cpu is not None
    assert cpu.full_name
    assert "FP32" in cpu.optimization_capabilities
    assert profile.has_runtime("openvino")
    assert profile.runtime("openvino").version


def test_onnxruntime_cpu_provider(profile: HardwareProfile):
    rt = profile.runtime("onnxruntime")
    assert rt is not None and rt.available and rt.version
    assert "CPUExecutionProvider" in profile.onnxruntime_providers


@pytest.mark.skipif(HAS_GPU_DEVICE_NODE, reason="machine has a GPU device node")
def test_no_gpus(profile: HardwareProfile):
    assert profile.gpus == ()
    assert not profile.has_cuda


def test_missing_runtime_reported(profile: HardwareProfile):
    for rt in profile.runtimes:
        if importlib.util.find_spec(rt.name) is None:
            assert not rt.available
            assert rt.detail == "not installed"
            assert not profile.has_runtime(rt.name)
    assert profile.runtime("no-such-runtime") is None


def test_detect_is_cached_and_refreshable():
    first = hw.detect()
    assert hw.detect() is first
    again = hw.detect(refresh=True)
    assert again is not first
    assert hw.detect() is again


# -- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_stable_across_refresh():
    a = hw.detect(refresh=True)
    b = hw.detect(refresh=True)
    assert len(a.fingerprint) == 16
    int(a.fingerprint, 16)
    assert a.fingerprint == b.fingerprint


def test_fingerprint_ignores_volatile_fields():
    p = _synthetic()
    q = dataclasses.replace(
        p,
        memory=MemoryInfo(total_bytes=p.memory.total_bytes, available_bytes=1),
        gpus=(
            dataclasses.replace(
                p.gpus[0],
                vram_free_bytes=0,
                driver_version="999",
                cuda_version="13.0",
                vram_total_bytes=p.gpus[0].vram_total_bytes - 8 * 1024**2,  # same GiB
            ),
        ),
        runtimes=(),
        os_version="7.0",
        python_version="3.13.0",
        probe_notes=(),
    )
    assert p.fingerprint == q.fingerprint


def test_fingerprint_tracks_hardware():
    p = _synthetic()
    variants = [
        dataclasses.replace(p, cpu=dataclasses.replace(p.cpu, features=frozenset({"avx2"}))),
        dataclasses.replace(p, cpu=dataclasses.replace(p.cpu, logical_cores=8)),
        dataclasses.replace(p, gpus=()),
        dataclasses.replace(p, gpus=(dataclasses.replace(p.gpus[0], compute_capability="9.0"),)),
        dataclasses.replace(p, openvino_devices=()),
    ]
    assert len({v.fingerprint for v in variants} | {p.fingerprint}) == len(variants) + 1


# -- serialization ----------------------------------------------------------------------------


def test_round_trip_detected(profile: HardwareProfile):
    data = json.loads(json.dumps(profile.to_dict()))
    assert HardwareProfile.from_dict(data) == profile
    assert data["fingerprint"] == profile.fingerprint


def test_round_trip_synthetic():
    p = _synthetic()
    data = json.loads(json.dumps(p.to_dict()))
    back = HardwareProfile.from_dict(data)
    assert back == p
    assert hash(back) == hash(p)  # frozen and hashable all the way down
    assert back.openvino_devices[0].properties == (
        ("DEVICE_TYPE", "x"),
        ("OPTIMIZATION_CAPABILITIES", "FP32,BF16,INT8"),
    )


def test_from_partial_dict():
    p = HardwareProfile.from_dict(
        {"cpu": {"architecture": "arm64", "features": ["asimd", "fma"]}, "mps_available": True}
    )
    assert p.has_feature("neon") and p.has_feature("fma")
    assert p.mps_available
    assert p.gpus == () and p.runtimes == ()
    assert not p.has_runtime("onnxruntime")


# -- failure modes ----------------------------------------------------------------------------


def test_raising_probe_becomes_note(monkeypatch):
    def boom(notes):
        raise RuntimeError("driver exploded\nsecond line")

    monkeypatch.setattr(hw, "_probe_openvino_devices", boom)
    p = hw.detect(refresh=True)
    assert p.openvino_devices == ()
    assert "openvino_devices: failed: RuntimeError: driver exploded" in p.probe_notes
    assert p.cpu.logical_cores  # other probes unaffected


def test_raising_runtime_probe(monkeypatch):
    real = hw._probe_runtime

    def flaky(name, notes):
        if name == "torch":
            raise OSError("segfault-ish")
        return real(name, notes)

    monkeypatch.setattr(hw, "_probe_runtime", flaky)
    p = hw.detect(refresh=True)
    torch_rt = p.runtime("torch")
    assert torch_rt is not None and not torch_rt.available
    assert torch_rt.detail.startswith("probe failed")
    assert any(n.startswith("runtime:torch: failed") for n in p.probe_notes)
    assert p.has_runtime("onnxruntime")


def test_hanging_probe_times_out(monkeypatch):
    hw.detect(refresh=True)  # warm imports so only the patched probe is slow
    release = threading.Event()

    def hang(notes):
        release.wait(30)
        return (GpuInfo(name="never"),)

    monkeypatch.setattr(hw, "_probe_gpus", hang)
    try:
        t0 = time.perf_counter()
        p = hw.detect(timeout_s=1.0, refresh=True)
        elapsed = time.perf_counter() - t0
    finally:
        release.set()
    assert elapsed < 3.0
    assert p.gpus == ()
    assert "gpus: timed out after 1s" in p.probe_notes
    assert p.cpu.logical_cores


def test_openvino_unimportable(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    p = hw.detect(refresh=True)
    ov = p.runtime("openvino")
    assert ov is not None and not ov.available
    assert ov.detail == "not installed"
    assert p.openvino_devices == ()
    assert not p.has_runtime("openvino")
    assert p.has_runtime("onnxruntime")
    assert not any(n.startswith("openvino") for n in p.probe_notes), p.probe_notes


def test_broken_runtime_import(tmp_path, monkeypatch):
    pkg = tmp_path / "kiln_fake_rt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "raise ImportError('libfake.so.1: cannot open shared object file')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rt = hw._probe_runtime("kiln_fake_rt", [])
    assert not rt.available
    assert rt.detail == "import failed: ImportError: libfake.so.1: cannot open shared object file"


def test_memory_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    mem = hw._probe_memory([])
    assert mem.total_bytes and mem.total_bytes > 0


def test_cpu_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)
    cpu = hw._probe_cpu([])
    assert cpu.logical_cores and cpu.architecture != "unknown"


# -- parsing ----------------------------------------------------------------------------------


def test_parse_arm_cpuinfo():
    text = (
        "processor\t: 0\nBogoMIPS\t: 50.00\n"
        "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU part\t: 0xd0c\n\n"
        "processor\t: 1\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n"
    )
    parsed = hw._parse_proc_cpuinfo(text)
    assert parsed["vendor"] == "ARM"
    assert "asimd" in parsed["flags"]
    assert hw.normalize_feature("asimd") == "neon"


def test_parse_x86_cpuinfo_physical_cores():
    block = "processor\t: {i}\nvendor_id\t: GenuineIntel\nmodel name\t: Xeon\nphysical id\t: 0\ncore id\t: {c}\nflags\t\t: avx2 amx_tile\n"
    text = "\n".join(block.format(i=i, c=i // 2) for i in range(8))
    parsed = hw._parse_proc_cpuinfo(text)
    assert parsed["physical_cores"] == 4
    assert parsed["model_name"] == "Xeon"
    assert hw._normalize_cpu_vendor(parsed["vendor"]) == "Intel"


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("SSE4.2", "sse4_2"), ("AVX512VNNI", "avx512_vnni"), ("AVXVNNI", "avx_vnni"), ("FMA", "fma")],
)
def test_normalize_feature(raw, norm):
    assert hw.normalize_feature(raw) == norm


# -- rendering and hints ----------------------------------------------------------------------


def test_install_hints():
    assert hw.install_hint("onnxruntime") == "pip install onnxruntime"
    assert hw.install_hint("openvino") == "pip install 'kiln[openvino]'"
    assert hw.install_hint("OpenVINO") == "pip install 'kiln[openvino]'"
    assert hw.install_hint("tensorrt") == "pip install 'kiln[gpu]' (NVIDIA GPU only)"
    assert hw.install_hint("bitsandbytes") == "pip install bitsandbytes"
    assert hw.install_hint("torchao") == "pip install torchao"
    assert "nncf" in hw.install_hint("nncf") or "openvino" in hw.install_hint("nncf")
    assert "torch==2.13.0" in hw.install_hint("torch")


def test_rows_and_table():
    from rich.console import Console

    p = _synthetic()
    rows = hw.profile_rows(p)
    assert all(len(r) == 3 and all(isinstance(x, str) for x in r) for r in rows)
    sections = {r[0] for r in rows}
    assert {"system", "cpu", "memory", "gpu", "openvino", "runtimes", "notes"} <= sections
    assert ("system", "fingerprint", p.fingerprint) in rows

    console = Console(record=True, width=200)
    console.print(hw.format_profile(p))
    text = console.export_text()
    assert "NVIDIA GeForce RTX 4090" in text
    assert "pip install 'kiln[gpu]' (NVIDIA GPU only)" in text
    # Square brackets must render literally, not be eaten as rich markup.
    missing_ov = dataclasses.replace(p, runtimes=(RuntimeInfo("openvino", None, False, "x"),))
    console = Console(record=True, width=200)
    console.print(hw.format_profile(missing_ov))
    assert "kiln[openvino]" in console.export_text()


_AMX_CPUINFO = (
    "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel Xeon Platinum 8480+\n"
    "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
)


@pytest.mark.parametrize("refusal", ["", "kernel 5.15 cannot grant AMX tile state"])
def test_amx_counts_only_when_the_kernel_grants_it(monkeypatch, refusal):
    monkeypatch.setattr(hw.platform, "system", lambda: "Linux")
    monkeypatch.setattr(hw, "_read_text", lambda path: _AMX_CPUINFO)
    monkeypatch.setattr(hw, "amx_refusal", lambda: refusal)
    notes: list[str] = []
    cpu = hw._probe_cpu(notes)
    if refusal:
        assert not cpu.features & hw.AMX_FEATURES and "avx512f" in cpu.features
        assert cpu.amx == f"listed by the CPU but not usable: {refusal}"
        assert notes == [f"cpu: AMX {cpu.amx}"]
    else:
        assert cpu.features >= hw.AMX_FEATURES and cpu.amx == "enabled" and not notes
    assert hw.CpuInfo.from_dict(cpu.to_dict()) == cpu


def test_amx_probe_answers_on_this_machine():
    assert isinstance(hw.amx_refusal(), str)  # "" or a reason; never raises
