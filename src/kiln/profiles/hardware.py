"""Hardware and runtime detection.

`detect()` builds a `HardwareProfile` describing the CPU, memory, GPUs, OpenVINO devices, Apple
MPS and the inference runtimes importable in this interpreter. Artifact selection reads it to
pick the fastest artifact the machine can run, and `HardwareProfile.fingerprint` keys benchmark
caches.

Every probe is optional and time-bounded: each runs in its own daemon worker thread and
`detect()` waits at most `timeout_s` for all of them together. A probe that raises or does not
finish in time contributes an empty/unknown value plus a line in `probe_notes`; `detect()`
itself never raises.

Importing this module is cheap: torch, openvino, onnxruntime and friends are imported only
inside the probes. Rendering (`profile_rows`, `format_profile`) is separate from detection.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "KNOWN_FEATURES",
    "RUNTIME_NAMES",
    "CpuInfo",
    "GpuInfo",
    "HardwareProfile",
    "MemoryInfo",
    "OpenVinoDevice",
    "RuntimeInfo",
    "detect",
    "format_profile",
    "install_hint",
    "normalize_feature",
    "profile_rows",
]

SCHEMA_VERSION = 1
GIB = 1024**3

#: CPU feature flags kiln cares about, in their normalized (Linux /proc/cpuinfo) spelling.
KNOWN_FEATURES: frozenset[str] = frozenset(
    {
        "avx2",
        "avx512f",
        "avx512_vnni",
        "avx512_bf16",
        "amx_tile",
        "amx_bf16",
        "amx_int8",
        "neon",
        "sse4_2",
        "fma",
        "f16c",
        "avx_vnni",
    }
)

# Other spellings (macOS sysctl, py-cpuinfo, ARM /proc/cpuinfo, user input) -> normalized name.
_FEATURE_ALIASES: dict[str, str] = {
    "sse4.2": "sse4_2",
    "sse42": "sse4_2",
    "fma3": "fma",
    "avx512vnni": "avx512_vnni",
    "avx512bf16": "avx512_bf16",
    "avxvnni": "avx_vnni",
    "amxtile": "amx_tile",
    "amxbf16": "amx_bf16",
    "amxint8": "amx_int8",
    "amx-tile": "amx_tile",
    "amx-bf16": "amx_bf16",
    "amx-int8": "amx_int8",
    "asimd": "neon",
    "advsimd": "neon",
}

#: Runtimes `detect()` probes, in report order.
RUNTIME_NAMES: tuple[str, ...] = (
    "onnxruntime",
    "openvino",
    "tensorrt",
    "torch",
    "bitsandbytes",
    "nncf",
    "torchao",
)

# OpenVINO device properties recorded besides FULL_DEVICE_NAME (only if the device supports them).
_OV_PROPERTIES: tuple[str, ...] = (
    "OPTIMIZATION_CAPABILITIES",
    "DEVICE_ARCHITECTURE",
    "DEVICE_TYPE",
    "GPU_DEVICE_TOTAL_MEM_SIZE",
    "RANGE_FOR_STREAMS",
    "INFERENCE_PRECISION_HINT",
)


def normalize_feature(name: str) -> str:
    """Return the normalized spelling of a CPU feature flag (`"AVX512F"` -> `"avx512f"`)."""
    key = name.strip().lower()
    return _FEATURE_ALIASES.get(key, key)


def _normalize_arch(machine: str) -> str:
    m = machine.strip().lower()
    if m in ("x86_64", "amd64", "x64"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8", "armv8l", "arm64e"):
        return "arm64"
    if m in ("i386", "i486", "i586", "i686", "x86"):
        return "x86"
    return m or "unknown"


def _normalize_cpu_vendor(vendor: str) -> str:
    v = vendor.strip()
    table = {
        "genuineintel": "Intel",
        "intel": "Intel",
        "authenticamd": "AMD",
        "amd": "AMD",
        "hygongenuine": "Hygon",
        "centaurhauls": "Centaur",
        "apple": "Apple",
    }
    return table.get(v.lower(), v or "unknown")


# ARM "CPU implementer" codes from /proc/cpuinfo.
_ARM_IMPLEMENTERS = {
    "0x41": "ARM",
    "0x42": "Broadcom",
    "0x43": "Cavium",
    "0x46": "Fujitsu",
    "0x48": "HiSilicon",
    "0x4e": "NVIDIA",
    "0x51": "Qualcomm",
    "0x61": "Apple",
    "0x6d": "Microsoft",
    "0xc0": "Ampere",
}


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class CpuInfo:
    vendor: str = "unknown"
    model_name: str = "unknown"
    architecture: str = "unknown"
    physical_cores: int | None = None
    logical_cores: int | None = None
    #: Logical CPUs this process may run on (sched affinity); None where unknown.
    usable_cores: int | None = None
    features: frozenset[str] = frozenset()
    #: AMX as this process sees it: "enabled", "absent", or why the kernel withheld it.
    amx: str = "absent"

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", frozenset(normalize_feature(f) for f in self.features))

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "model_name": self.model_name,
            "architecture": self.architecture,
            "physical_cores": self.physical_cores,
            "logical_cores": self.logical_cores,
            "usable_cores": self.usable_cores,
            "features": sorted(self.features),
            "amx": self.amx,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CpuInfo:
        return cls(
            vendor=str(data.get("vendor", "unknown")),
            model_name=str(data.get("model_name", "unknown")),
            architecture=str(data.get("architecture", "unknown")),
            physical_cores=_opt_int(data.get("physical_cores")),
            logical_cores=_opt_int(data.get("logical_cores")),
            usable_cores=_opt_int(data.get("usable_cores")),
            features=frozenset(data.get("features", ())),
            amx=str(data.get("amx", "absent")),
        )


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int | None = None
    available_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"total_bytes": self.total_bytes, "available_bytes": self.available_bytes}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MemoryInfo:
        return cls(
            total_bytes=_opt_int(data.get("total_bytes")),
            available_bytes=_opt_int(data.get("available_bytes")),
        )


@dataclass(frozen=True)
class GpuInfo:
    vendor: str = "unknown"  # "nvidia" | "amd" | ...
    name: str = "unknown"
    index: int = 0
    compute_capability: str | None = None  # "8.9" for NVIDIA; None elsewhere
    vram_total_bytes: int | None = None
    vram_free_bytes: int | None = None
    driver_version: str | None = None
    cuda_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "name": self.name,
            "index": self.index,
            "compute_capability": self.compute_capability,
            "vram_total_bytes": self.vram_total_bytes,
            "vram_free_bytes": self.vram_free_bytes,
            "driver_version": self.driver_version,
            "cuda_version": self.cuda_version,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GpuInfo:
        return cls(
            vendor=str(data.get("vendor", "unknown")),
            name=str(data.get("name", "unknown")),
            index=int(data.get("index", 0)),
            compute_capability=_opt_str(data.get("compute_capability")),
            vram_total_bytes=_opt_int(data.get("vram_total_bytes")),
            vram_free_bytes=_opt_int(data.get("vram_free_bytes")),
            driver_version=_opt_str(data.get("driver_version")),
            cuda_version=_opt_str(data.get("cuda_version")),
        )


@dataclass(frozen=True)
class OpenVinoDevice:
    name: str  # "CPU", "GPU.0", "NPU", ...
    full_name: str = ""
    #: (key, value) pairs sorted by key; a mapping is accepted and converted.
    properties: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        props = self.properties
        items = props.items() if isinstance(props, Mapping) else props
        object.__setattr__(self, "properties", tuple(sorted((str(k), str(v)) for k, v in items)))

    def get(self, key: str) -> str | None:
        for k, v in self.properties:
            if k == key:
                return v
        return None

    @property
    def optimization_capabilities(self) -> frozenset[str]:
        raw = self.get("OPTIMIZATION_CAPABILITIES") or ""
        return frozenset(p.strip() for p in raw.split(",") if p.strip())

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "full_name": self.full_name, "properties": dict(self.properties)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OpenVinoDevice:
        return cls(
            name=str(data["name"]),
            full_name=str(data.get("full_name", "")),
            properties=tuple(dict(data.get("properties", {})).items()),
        )


@dataclass(frozen=True)
class RuntimeInfo:
    name: str
    version: str | None = None
    available: bool = False
    #: onnxruntime: comma-separated execution providers; torch: build ("cuda 12.4", "cpu");
    #: missing: "not installed"; broken: "import failed: <Error>: <first line>".
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "available": self.available,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RuntimeInfo:
        return cls(
            name=str(data["name"]),
            version=_opt_str(data.get("version")),
            available=bool(data.get("available", False)),
            detail=str(data.get("detail", "")),
        )


@dataclass(frozen=True)
class HardwareProfile:
    cpu: CpuInfo = field(default_factory=CpuInfo)
    memory: MemoryInfo = field(default_factory=MemoryInfo)
    gpus: tuple[GpuInfo, ...] = ()
    openvino_devices: tuple[OpenVinoDevice, ...] = ()
    mps_available: bool = False
    runtimes: tuple[RuntimeInfo, ...] = ()
    os_name: str = ""  # platform.system(): "Linux", "Darwin", "Windows"
    os_version: str = ""  # platform.release()
    python_version: str = ""
    #: Probes that failed or timed out, one readable line each.
    probe_notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("gpus", "openvino_devices", "runtimes", "probe_notes"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    # -- queries ------------------------------------------------------------------------------

    def has_feature(self, name: str) -> bool:
        return normalize_feature(name) in self.cpu.features

    def runtime(self, name: str) -> RuntimeInfo | None:
        key = name.strip().lower()
        for rt in self.runtimes:
            if rt.name.lower() == key:
                return rt
        return None

    def has_runtime(self, name: str) -> bool:
        rt = self.runtime(name)
        return rt is not None and rt.available

    def openvino_device(self, name: str) -> OpenVinoDevice | None:
        for dev in self.openvino_devices:
            if dev.name == name:
                return dev
        return None

    @property
    def onnxruntime_providers(self) -> tuple[str, ...]:
        rt = self.runtime("onnxruntime")
        if rt is None or not rt.available:
            return ()
        return tuple(p.strip() for p in rt.detail.split(",") if p.strip())

    @property
    def has_cuda(self) -> bool:
        return any(g.vendor == "nvidia" for g in self.gpus)

    @property
    def fingerprint(self) -> str:
        """16 hex chars identifying the hardware as far as speed is concerned.

        Covers CPU vendor/model/architecture/features/logical cores, each GPU's name, compute
        capability and VRAM rounded to GiB, and OpenVINO device full names. Free memory,
        software versions and probe notes are deliberately excluded.
        """
        payload = {
            "cpu": [
                self.cpu.vendor,
                self.cpu.model_name,
                self.cpu.architecture,
                sorted(self.cpu.features),
                self.cpu.logical_cores,
            ],
            "gpus": [
                [
                    g.name,
                    g.compute_capability,
                    None if g.vram_total_bytes is None else round(g.vram_total_bytes / GIB),
                ]
                for g in sorted(self.gpus, key=lambda g: g.index)
            ],
            "openvino": sorted(d.full_name for d in self.openvino_devices),
        }
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    # -- serialization ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "fingerprint": self.fingerprint,
            "cpu": self.cpu.to_dict(),
            "memory": self.memory.to_dict(),
            "gpus": [g.to_dict() for g in self.gpus],
            "openvino_devices": [d.to_dict() for d in self.openvino_devices],
            "mps_available": self.mps_available,
            "runtimes": [r.to_dict() for r in self.runtimes],
            "os_name": self.os_name,
            "os_version": self.os_version,
            "python_version": self.python_version,
            "probe_notes": list(self.probe_notes),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HardwareProfile:
        """Inverse of `to_dict`. Missing keys take defaults; unknown keys are ignored."""
        return cls(
            cpu=CpuInfo.from_dict(data.get("cpu", {})),
            memory=MemoryInfo.from_dict(data.get("memory", {})),
            gpus=tuple(GpuInfo.from_dict(g) for g in data.get("gpus", ())),
            openvino_devices=tuple(
                OpenVinoDevice.from_dict(d) for d in data.get("openvino_devices", ())
            ),
            mps_available=bool(data.get("mps_available", False)),
            runtimes=tuple(RuntimeInfo.from_dict(r) for r in data.get("runtimes", ())),
            os_name=str(data.get("os_name", "")),
            os_version=str(data.get("os_version", "")),
            python_version=str(data.get("python_version", "")),
            probe_notes=tuple(str(n) for n in data.get("probe_notes", ())),
        )


# --------------------------------------------------------------------------------------------
# Probes. Each takes a `notes` list for soft failures and returns its value; exceptions and
# timeouts are handled by `detect()`. Third-party imports happen only in here.
# --------------------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    if len(first) > 200:
        first = first[:197] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _read_text(path: str) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(
            ["sysctl", "-n", name], capture_output=True, text=True, timeout=2.0, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = out.stdout.strip()
    return value if out.returncode == 0 and value else None


def _parse_proc_cpuinfo(text: str) -> dict[str, Any]:
    """Vendor, model, flags and physical core count from /proc/cpuinfo text."""
    first: dict[str, str] = {}
    cores: set[tuple[str, str]] = set()
    phys_id = core_id = None
    for line in text.splitlines() + [""]:
        if not line.strip():
            if phys_id is not None and core_id is not None:
                cores.add((phys_id, core_id))
            phys_id = core_id = None
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "physical id":
            phys_id = value
        elif key == "core id":
            core_id = value
        first.setdefault(key, value)
    flags = (first.get("flags") or first.get("features") or "").split()
    vendor = first.get("vendor_id", "")
    if not vendor and first.get("cpu implementer"):
        vendor = _ARM_IMPLEMENTERS.get(first["cpu implementer"].lower(), "")
    model = first.get("model name") or first.get("hardware") or first.get("cpu model") or ""
    return {
        "vendor": vendor,
        "model_name": model,
        "flags": flags,
        "physical_cores": len(cores) or None,
    }


def _probe_cpu(notes: list[str]) -> CpuInfo:
    system = platform.system()
    arch = _normalize_arch(platform.machine())
    vendor = ""
    model = ""
    raw_flags: list[str] = []
    physical: int | None = None

    if system == "Linux":
        text = _read_text("/proc/cpuinfo")
        if text:
            parsed = _parse_proc_cpuinfo(text)
            vendor, model = parsed["vendor"], parsed["model_name"]
            raw_flags, physical = parsed["flags"], parsed["physical_cores"]
        else:
            notes.append("cpu: /proc/cpuinfo unreadable; CPU features unknown")
    elif system == "Darwin":
        model = _sysctl("machdep.cpu.brand_string") or ""
        vendor = _sysctl("machdep.cpu.vendor") or ("Apple" if arch == "arm64" else "")
        for key in ("machdep.cpu.features", "machdep.cpu.leaf7_features"):
            raw_flags += (_sysctl(key) or "").split()
        for key in ("hw.optional.avx512f", "hw.optional.avx2_0", "hw.optional.neon"):
            if _sysctl(key) == "1":
                raw_flags.append(key.rsplit(".", 1)[1].removesuffix("_0"))
        p = _sysctl("hw.physicalcpu")
        physical = int(p) if p and p.isdigit() else None

    if not raw_flags:
        # Windows and other platforms: py-cpuinfo when installed.
        try:
            import cpuinfo  # type: ignore[import-not-found]

            info = cpuinfo.get_cpu_info()
            raw_flags = list(info.get("flags", []))
            model = model or str(info.get("brand_raw", ""))
            vendor = vendor or str(info.get("vendor_id_raw", ""))
        except ImportError:
            if system not in ("Linux", "Darwin"):
                notes.append("cpu: feature flags unknown on this OS (pip install py-cpuinfo)")
        except Exception as exc:  # py-cpuinfo shells out; never let it break detection
            notes.append(f"cpu: py-cpuinfo failed: {_one_line(exc)}")

    features = {normalize_feature(f) for f in raw_flags} & KNOWN_FEATURES
    amx = "absent"
    if AMX_FEATURES & features:
        refused = amx_refusal() if system == "Linux" else ""
        amx = f"listed by the CPU but not usable: {refused}" if refused else "enabled"
        if refused:
            # Without tile state, oneDNN falls back to AVX-512 and bf16 runs slower than fp32:
            # the machine is an AVX-512 one as far as speed (and the fingerprint) goes.
            features -= AMX_FEATURES
            notes.append(f"cpu: AMX {amx}")
    if arch == "arm64":
        features.add("neon")  # Advanced SIMD is mandatory on AArch64

    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or physical
    except ImportError:
        pass

    usable: int | None = None
    if hasattr(os, "sched_getaffinity"):
        with contextlib.suppress(OSError):
            usable = len(os.sched_getaffinity(0))

    return CpuInfo(
        vendor=_normalize_cpu_vendor(vendor),
        model_name=model or platform.processor() or "unknown",
        architecture=arch,
        physical_cores=physical,
        logical_cores=os.cpu_count(),
        usable_cores=usable,
        features=frozenset(features),
        amx=amx,
    )


AMX_FEATURES = frozenset({"amx_tile", "amx_bf16", "amx_int8"})
_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86_64


def amx_refusal() -> str:
    """Why this process may not use AMX tiles, or "" when the kernel granted them.

    Linux hands out AMX tile state per process on request (arch_prctl ARCH_REQ_XCOMP_PERM,
    kernel 5.16+); oneDNN asks the same way, so a refusal here is a refusal there.
    """
    import ctypes
    import errno

    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "not an x86-64 process"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        result = libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA)
    except (OSError, AttributeError) as exc:
        return f"cannot ask the kernel ({exc})"
    if result == 0:
        return ""
    code = ctypes.get_errno()
    if code == errno.EINVAL:
        return f"kernel {platform.release()} cannot grant AMX tile state (needs Linux 5.16+)"
    return f"the kernel refused AMX tile state ({errno.errorcode.get(code, code)})"


def _probe_memory(notes: list[str]) -> MemoryInfo:
    try:
        import psutil

        vm = psutil.virtual_memory()
        return MemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available))
    except ImportError:
        pass

    text = _read_text("/proc/meminfo")
    if text:
        values: dict[str, int] = {}
        for line in text.splitlines():
            m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
            if m:
                values[m.group(1)] = int(m.group(2)) * 1024
        if "MemTotal" in values:
            return MemoryInfo(
                total_bytes=values["MemTotal"],
                available_bytes=values.get("MemAvailable", values.get("MemFree")),
            )

    if platform.system() == "Darwin":
        total = _sysctl("hw.memsize")
        if total and total.isdigit():
            return MemoryInfo(total_bytes=int(total), available_bytes=None)

    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total_pages = os.sysconf("SC_PHYS_PAGES")
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * page
        except (ValueError, OSError):
            avail = None
        return MemoryInfo(total_bytes=page * total_pages, available_bytes=avail)
    except (AttributeError, ValueError, OSError):
        notes.append("memory: no psutil, /proc/meminfo or sysconf; memory unknown")
        return MemoryInfo()


def _nvml_str(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _gpus_from_nvml(notes: list[str]) -> tuple[GpuInfo, ...] | None:
    """NVIDIA GPUs via NVML; None when NVML is unusable (not installed / no driver)."""
    try:
        import pynvml  # package nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound / DriverNotLoaded: no NVIDIA driver
        notes.append(f"gpu: NVML unavailable ({_one_line(exc)})")
        return None
    try:
        driver = cuda = None
        with contextlib.suppress(Exception):
            driver = _nvml_str(pynvml.nvmlSystemGetDriverVersion())
        with contextlib.suppress(Exception):
            v = int(pynvml.nvmlSystemGetCudaDriverVersion())
            cuda = f"{v // 1000}.{(v % 1000) // 10}"
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            cc = total = free = None
            with contextlib.suppress(Exception):
                major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
                cc = f"{major}.{minor}"
            with contextlib.suppress(Exception):
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                total, free = int(mem.total), int(mem.free)
            gpus.append(
                GpuInfo(
                    vendor="nvidia",
                    name=_nvml_str(pynvml.nvmlDeviceGetName(h)),
                    index=i,
                    compute_capability=cc,
                    vram_total_bytes=total,
                    vram_free_bytes=free,
                    driver_version=driver,
                    cuda_version=cuda,
                )
            )
        return tuple(gpus)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _gpus_from_torch() -> tuple[GpuInfo, ...]:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return ()
    import torch

    if not torch.cuda.is_available():
        return ()
    hip = getattr(torch.version, "hip", None)
    gpus = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        gpus.append(
            GpuInfo(
                vendor="amd" if hip else "nvidia",
                name=str(props.name),
                index=i,
                # ROCm reports gfx numbers in major/minor; only CUDA's are meaningful here.
                compute_capability=None if hip else f"{props.major}.{props.minor}",
                vram_total_bytes=int(props.total_memory),
                vram_free_bytes=None,  # torch.cuda.mem_get_info would create a CUDA context
                driver_version=None,
                cuda_version=None if hip else torch.version.cuda,
            )
        )
    return tuple(gpus)


def _probe_gpus(notes: list[str]) -> tuple[GpuInfo, ...]:
    gpus = _gpus_from_nvml(notes)
    if gpus:
        return gpus
    return _gpus_from_torch()


def _ov_value_to_str(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(_ov_value_to_str(v) for v in value)
    if isinstance(value, (str, int, float, bool)):
        return str(value)
    to_string = getattr(value, "to_string", None)  # openvino.Type -> "bf16"
    if callable(to_string):
        with contextlib.suppress(Exception):
            return str(to_string())
    name = getattr(value, "name", None)  # pybind enums, e.g. DEVICE_TYPE -> "INTEGRATED"
    if isinstance(name, str):
        return name
    return str(value)


def _probe_openvino_devices(notes: list[str]) -> tuple[OpenVinoDevice, ...]:
    try:
        import openvino
    except ImportError:
        return ()
    core = openvino.Core()
    devices = []
    for dev in core.available_devices:
        try:
            full_name = str(core.get_property(dev, "FULL_DEVICE_NAME"))
        except Exception as exc:
            notes.append(f"openvino: {dev} FULL_DEVICE_NAME failed: {_one_line(exc)}")
            full_name = dev
        try:
            supported = {str(p) for p in core.get_property(dev, "SUPPORTED_PROPERTIES")}
        except Exception:
            supported = set(_OV_PROPERTIES)
        props: dict[str, str] = {}
        for key in _OV_PROPERTIES:
            if key not in supported:
                continue
            try:
                props[key] = _ov_value_to_str(core.get_property(dev, key))
            except Exception:
                continue  # per-property failures are expected (plugin-specific keys)
        devices.append(OpenVinoDevice(name=str(dev), full_name=full_name, properties=props))
    return tuple(devices)


def _probe_mps(notes: list[str]) -> bool:
    if platform.system() != "Darwin":
        return False  # don't import torch just to learn MPS is a macOS thing
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.backends.mps.is_available())


def _dist_version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _runtime_detail(name: str, module: Any) -> str:
    if name == "onnxruntime":
        return ", ".join(module.get_available_providers())
    if name == "torch":
        parts = []
        if getattr(module.version, "cuda", None):
            parts.append(f"cuda {module.version.cuda}")
        if getattr(module.version, "hip", None):
            parts.append(f"hip {module.version.hip}")
        if not parts:
            parts.append("cpu")
        return ", ".join(parts)
    return ""


# Optional packages are reported from their installed metadata, never imported: importing
# torchao or bitsandbytes costs seconds, prints warnings, and, run from a probe thread beside
# other imports of torch, breaks them ("Could not import module 'BlipProcessor'").
_METADATA_ONLY = {
    # The `tensorrt` module comes from `tensorrt` (NVIDIA's meta package) or directly from
    # the CUDA-specific wheels on PyPI (`kiln[gpu]` installs tensorrt-cu12).
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "bitsandbytes": ("bitsandbytes",),
    "nncf": ("nncf",),
    "torchao": ("torchao",),
}
# Runtimes whose probes need the module itself; imported in the calling thread before any
# probe thread starts, because concurrent first imports of torch-based packages are unsafe.
_IMPORTED_RUNTIMES = ("torch", "onnxruntime", "openvino")


def _probe_runtime(name: str, notes: list[str]) -> RuntimeInfo:
    import importlib
    import importlib.util

    if name in _METADATA_ONLY:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            return RuntimeInfo(name=name, available=False, detail="not installed")
        version = next(filter(None, map(_dist_version, _METADATA_ONLY[name])), None)
        return RuntimeInfo(name=name, version=version, available=True, detail="installed")
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name or (exc.name or "").startswith(name + "."):
            return RuntimeInfo(name=name, available=False, detail="not installed")
        failure = exc
    except Exception as exc:  # broken install, missing shared library, CUDA mismatch...
        failure = exc
    else:
        failure = None
    if failure is not None:
        return RuntimeInfo(
            name=name,
            version=_dist_version(name),
            available=False,
            detail=f"import failed: {_one_line(failure)}",
        )
    version = getattr(module, "__version__", None)
    if version is None and name == "openvino":
        with contextlib.suppress(Exception):
            version = module.get_version()
    if version is None:
        version = _dist_version(name)
    try:
        detail = _runtime_detail(name, module)
    except Exception as exc:
        detail = f"detail failed: {_one_line(exc)}"
    return RuntimeInfo(name=name, version=_opt_str(version), available=True, detail=detail)


# --------------------------------------------------------------------------------------------
# detect()
# --------------------------------------------------------------------------------------------

T = TypeVar("T")

_CACHE: HardwareProfile | None = None
_CACHE_LOCK = threading.Lock()


def _start_probe(
    label: str, fn: Callable[[list[str]], T]
) -> tuple[concurrent.futures.Future, list]:
    """Run `fn(notes)` in a daemon thread; its result or exception lands in the future.

    Daemon threads (rather than a ThreadPoolExecutor, whose workers are joined at exit) so a
    probe hung in a driver call cannot keep the interpreter alive.
    """
    future: concurrent.futures.Future = concurrent.futures.Future()
    notes: list[str] = []

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(notes))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=f"kiln-probe-{label}", daemon=True).start()
    return future, notes


def _run_probes(timeout_s: float) -> HardwareProfile:
    # Probe functions are looked up at call time so tests can monkeypatch them.
    module = sys.modules[__name__]
    probes: dict[str, tuple[Callable[[list[str]], Any], Any]] = {
        "cpu": (module._probe_cpu, CpuInfo()),
        "memory": (module._probe_memory, MemoryInfo()),
        "gpus": (module._probe_gpus, ()),
        "openvino_devices": (module._probe_openvino_devices, ()),
        "mps": (module._probe_mps, False),
    }
    for rt in RUNTIME_NAMES:
        probes[f"runtime:{rt}"] = (
            lambda notes, rt=rt: module._probe_runtime(rt, notes),
            RuntimeInfo(name=rt, available=False, detail="probe failed"),
        )

    for name in _IMPORTED_RUNTIMES:
        with contextlib.suppress(Exception):  # a failing import is reported by its probe
            importlib.import_module(name)
    started = {label: _start_probe(label, fn) for label, (fn, _) in probes.items()}
    concurrent.futures.wait([f for f, _ in started.values()], timeout=max(0.0, timeout_s))

    values: dict[str, Any] = {}
    all_notes: list[str] = []
    for label, (future, notes) in started.items():
        fallback = probes[label][1]
        if not future.done():
            all_notes.append(f"{label}: timed out after {timeout_s:g}s")
            if isinstance(fallback, RuntimeInfo):
                fallback = RuntimeInfo(name=fallback.name, detail="probe timed out")
            values[label] = fallback
            continue
        all_notes.extend(notes)
        exc = future.exception()
        if exc is not None:
            all_notes.append(f"{label}: failed: {_one_line(exc)}")
            if isinstance(fallback, RuntimeInfo):
                fallback = RuntimeInfo(name=fallback.name, detail=f"probe failed: {_one_line(exc)}")
            values[label] = fallback
        else:
            values[label] = future.result()

    return HardwareProfile(
        cpu=values["cpu"],
        memory=values["memory"],
        gpus=tuple(values["gpus"]),
        openvino_devices=tuple(values["openvino_devices"]),
        mps_available=bool(values["mps"]),
        runtimes=tuple(values[f"runtime:{rt}"] for rt in RUNTIME_NAMES),
        os_name=platform.system(),
        os_version=platform.release(),
        python_version=platform.python_version(),
        probe_notes=tuple(all_notes),
    )


def detect(timeout_s: float = 20.0, *, refresh: bool = False) -> HardwareProfile:
    """Probe this machine, at most `timeout_s` seconds in total; never raises.

    The result is cached for the process; `refresh=True` probes again (and re-caches).
    Probes run concurrently, each in its own thread; failed or timed-out probes leave an
    empty/unknown value and a line in `probe_notes`.
    """
    global _CACHE
    with _CACHE_LOCK:
        if _CACHE is not None and not refresh:
            return _CACHE
        profile = _run_probes(timeout_s)
        _CACHE = profile
        return profile


def clear_cache() -> None:
    """Forget the cached profile (tests)."""
    global _CACHE
    with _CACHE_LOCK:
        _CACHE = None


def timed_detect(timeout_s: float = 20.0) -> tuple[HardwareProfile, float]:
    """Fresh `detect()` plus the seconds it took (for `kiln doctor`-style output)."""
    t0 = time.perf_counter()
    profile = detect(timeout_s, refresh=True)
    return profile, time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Rendering and hints (no detection in here)
# --------------------------------------------------------------------------------------------

_INSTALL_HINTS: dict[str, str] = {
    "onnxruntime": "pip install onnxruntime",
    "onnxruntime-gpu": "pip install 'kiln[gpu]'",
    "openvino": "pip install 'kiln[openvino]'",
    "nncf": "pip install 'kiln[openvino]'",
    "tensorrt": "pip install 'kiln[gpu]' (NVIDIA GPU only)",
    "torch": "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu",
    "bitsandbytes": "pip install bitsandbytes",
    "torchao": "pip install torchao",
    "pynvml": "pip install 'kiln[gpu]'",
    "nvidia-ml-py": "pip install 'kiln[gpu]'",
    "psutil": "pip install psutil",
    "py-cpuinfo": "pip install py-cpuinfo",
}


def install_hint(runtime_name: str) -> str:
    """The command a user should run to get `runtime_name` (e.g. `"openvino"`)."""
    key = runtime_name.strip().lower().replace("_", "-")
    return _INSTALL_HINTS.get(key, f"pip install {runtime_name.strip()}")


def _fmt_bytes(n: int | None) -> str:
    return "unknown" if n is None else f"{n / GIB:.1f} GiB"


def profile_rows(profile: HardwareProfile) -> list[tuple[str, str, str]]:
    """(section, key, value) rows describing `profile`, for any CLI renderer."""
    cpu = profile.cpu
    rows: list[tuple[str, str, str]] = [
        ("system", "os", f"{profile.os_name} {profile.os_version}".strip() or "unknown"),
        ("system", "python", profile.python_version or "unknown"),
        ("system", "fingerprint", profile.fingerprint),
        (
            "cpu",
            "model",
            cpu.model_name
            if cpu.model_name.lower().startswith(cpu.vendor.lower())
            else f"{cpu.vendor} {cpu.model_name}",
        ),
        ("cpu", "architecture", cpu.architecture),
        (
            "cpu",
            "cores",
            f"{cpu.physical_cores or '?'} physical / {cpu.logical_cores or '?'} logical"
            + (f" ({cpu.usable_cores} usable)" if cpu.usable_cores is not None else ""),
        ),
        ("cpu", "features", " ".join(sorted(cpu.features)) or "none detected"),
        ("cpu", "amx", cpu.amx),
        (
            "memory",
            "total / available",
            f"{_fmt_bytes(profile.memory.total_bytes)} / "
            f"{_fmt_bytes(profile.memory.available_bytes)}",
        ),
    ]
    if profile.gpus:
        for g in profile.gpus:
            bits = [g.vendor]
            if g.compute_capability:
                bits.append(f"sm {g.compute_capability}")
            bits.append(f"{_fmt_bytes(g.vram_total_bytes)} VRAM")
            if g.vram_free_bytes is not None:
                bits.append(f"{_fmt_bytes(g.vram_free_bytes)} free")
            if g.driver_version:
                bits.append(f"driver {g.driver_version}")
            if g.cuda_version:
                bits.append(f"CUDA {g.cuda_version}")
            rows.append(("gpu", f"{g.index}: {g.name}", ", ".join(bits)))
    else:
        rows.append(("gpu", "devices", "none"))
    rows.append(("gpu", "mps", "available" if profile.mps_available else "no"))
    if profile.openvino_devices:
        for d in profile.openvino_devices:
            caps = d.get("OPTIMIZATION_CAPABILITIES")
            rows.append(("openvino", d.name, d.full_name + (f" [{caps}]" if caps else "")))
    else:
        rows.append(("openvino", "devices", "none"))
    for rt in profile.runtimes:
        if rt.available:
            value = rt.version or "installed"
            if rt.detail:
                value += f" ({rt.detail})"
        else:
            value = f"{rt.detail or 'unavailable'} -> {install_hint(rt.name)}"
        rows.append(("runtimes", rt.name, value))
    for note in profile.probe_notes:
        rows.append(("notes", "probe", note))
    return rows


def format_profile(profile: HardwareProfile) -> Table:
    """A rich Table of `profile_rows(profile)` (cells are plain text, never markup)."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title="kiln hardware profile", show_lines=False)
    table.add_column("section", style="bold")
    table.add_column("key")
    table.add_column("value", overflow="fold")
    previous = None
    for section, key, value in profile_rows(profile):
        table.add_row(Text(section if section != previous else ""), Text(key), Text(value))
        previous = section
    return table
