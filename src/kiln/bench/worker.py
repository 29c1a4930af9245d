"""One bench variant in a fresh process: `python -m kiln.bench.worker REQUEST.json`.

A fresh process per variant keeps peak RSS, allocator state and library thread pools of
one variant out of another's figures. The request names the artifact, the variant, the
workload, where to save first-call images and where to write the result. Progress goes
to stdout as lines starting with `EVENT_PREFIX`; everything else on stdout/stderr is
library chatter (the parent keeps it in a log). The result file is rewritten atomically
after loading and after every case, so an interrupted worker still leaves what it measured.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from kiln import child_process

EVENT_PREFIX = "@@kiln-bench "
VERSIONED = (
    "kiln",
    "torch",
    "diffusers",
    "transformers",
    "onnxruntime",
    "onnxruntime-gpu",
    "openvino",
    "tensorrt",
    "numpy",
)


def library_versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in VERSIONED:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


def emit(event: str, **data: Any) -> None:
    child_process.emit(EVENT_PREFIX, event, **data)


class VramMonitor:
    """Peak GPU memory of this process: torch's allocator and NVML (sampled), where present.

    torch counts only what its allocator hands out; onnxruntime and TensorRT allocate
    outside it, so NVML is sampled too: this process's own use where the driver reports it
    (`nvmlDeviceGetComputeRunningProcesses`), else, in containers whose process ids the
    driver does not share, the devices' used memory above what it was before loading
    (`nvmlDeviceGetMemoryInfo`; another process's allocations would count too).
    """

    def __init__(self, gpus: int) -> None:
        self.gpus = gpus
        self.peak_nvml: int | None = None
        self.peak_device: int | None = None
        self.notes: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handles: list[Any] = []
        self._used_before = 0

    def start(self) -> None:
        if not self.gpus:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [
                pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())
            ]
            self._used_before = self._device_used(pynvml)
        except Exception as exc:  # missing package, no driver: say so and use torch only
            self.notes.append(f"NVML unavailable ({type(exc).__name__}: {exc})")
            return
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _device_used(self, pynvml: Any) -> int:
        return sum(int(pynvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles)

    def _sample(self) -> None:
        import pynvml

        pid = os.getpid()
        while not self._stop.wait(0.02):
            used = 0
            for handle in self._handles:
                with contextlib.suppress(Exception):
                    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                        if proc.pid == pid and proc.usedGpuMemory:
                            used += int(proc.usedGpuMemory)
            if used:
                self.peak_nvml = max(self.peak_nvml or 0, used)
            with contextlib.suppress(Exception):
                grown = self._device_used(pynvml) - self._used_before
                if grown > 0:
                    self.peak_device = max(self.peak_device or 0, grown)

    def stop(self) -> tuple[int | None, str | None, dict[str, int]]:
        """(peak bytes, reason when unknown, per-source peaks)."""
        if not self.gpus:
            return None, "no GPU", {}
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        sources: dict[str, int] = {}
        if self.peak_nvml is not None:
            sources["nvml"] = self.peak_nvml
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            sources["torch"] = int(torch.cuda.max_memory_allocated())
        if self.peak_device is not None:
            sources["nvml_device"] = self.peak_device
        # This process's own figures; without NVML's, the devices' growth stands in for what
        # onnxruntime and TensorRT took outside torch.
        counted = [sources[k] for k in ("nvml", "torch") if k in sources]
        if "nvml" not in sources and "nvml_device" in sources:
            counted.append(sources["nvml_device"])
        if counted:
            return max(counted), None, sources
        notes = "; ".join(self.notes) or "this variant used no GPU memory NVML could see"
        return None, f"GPU present but peak VRAM unknown: {notes}", {}


def run(request: dict[str, Any]) -> int:
    from kiln.artifacts import atomic_write_text, read_manifest
    from kiln.bench.metrics import peak_rss_bytes
    from kiln.bench.workload import workload_from_dict
    from kiln.profiles.hardware import detect

    result_path = Path(request["result"])
    images_dir = Path(request["images_dir"])
    variant = request["variant"]
    workload = workload_from_dict(request["workload"])
    root = Path(request["artifact"])
    profile = detect()
    result: dict[str, Any] = {
        "status": "partial",
        "reason": None,
        "fingerprint": profile.fingerprint,
        "versions": library_versions(),
        "cases": {},
    }

    def save() -> None:
        atomic_write_text(result_path, json.dumps(result, indent=1))

    vram = VramMonitor(len(profile.gpus))
    vram.start()
    manifest = read_manifest(root)
    family = request["family_module"]
    module = __import__(family, fromlist=["make_runner"])
    runner = module.make_runner(
        variant["kind"],
        root,
        manifest,
        list(variant["require"]),
        list(variant["prefer"]),
        request.get("objective", "latency"),
    )
    emit("loading", variant=variant["id"])
    started = time.perf_counter()
    runner.load()
    result["load_s"] = time.perf_counter() - started
    if getattr(workload, "loras", ()):
        started = time.perf_counter()
        runner.apply_loras(workload.loras)
        result["lora_s"] = time.perf_counter() - started
    result["description"] = runner.describe()
    result["plan"] = runner.plan()
    result["size_on_disk"] = list(runner.size_on_disk())
    save()

    total = workload.calls()
    done = 0
    for case in workload.cases:
        record: dict[str, Any] = {"calls": [], "images": []}
        result["cases"][case.id] = record
        for index in range(workload.warmup + workload.repeats):
            measured = index >= workload.warmup
            prompt, seed = workload.call_args(index)

            def on_step(step: int, steps: int, _case: str = case.id, _i: int = index) -> None:
                emit("step", case=_case, call=_i, step=step, steps=steps)

            runner.timer.take()
            started = time.perf_counter()
            out = runner.generate(workload, case, prompt, seed, on_step)
            seconds = time.perf_counter() - started
            # Diffusion runners return images; others a dict: the images to save, how many
            # items (captions) and tokens the call made, and its output (kept per call).
            images, counts, output = out, {}, None
            if isinstance(out, dict):
                images, output = out.get("images", []), out.get("output")
                counts = {k: out[k] for k in ("items", "tokens") if k in out}
            components = runner.timer.take()
            if output is not None:
                record.setdefault("outputs", []).append({"call": index, **output})
            if index == 0:
                record["first_call_s"] = seconds
                folder = images_dir / variant["slug"]
                folder.mkdir(parents=True, exist_ok=True)
                for k, image in enumerate(images):
                    path = folder / f"{case.id}-{k}.png"
                    image.save(path, format="PNG")
                    record["images"].append(str(path))
            if measured:
                call = {"seconds": seconds, "images": counts.get("items", len(images))}
                if "tokens" in counts:
                    call["tokens"] = counts["tokens"]
                record["calls"].append({**call, "components": components})
            done += 1
            emit("call", case=case.id, call=index, measured=measured, done=done, total=total)
            why = cannot_win(request.get("abandon"), seconds, components) if measured else None
            if why:
                result.update(status="skipped", reason=why)
                save()
                emit("done", variant=variant["id"])
                return 0
        save()

    measure_quality = getattr(module, "measure_quality", None)
    if measure_quality is not None:
        emit("quality", variant=variant["id"])
        quality = measure_quality(runner, manifest, workload)
        result["quality"] = {name: list(figure) for name, figure in quality.items()}
        save()

    rss, rss_reason = peak_rss_bytes()
    peak_vram, vram_reason, vram_sources = vram.stop()
    result.update(
        status="ok",
        peak_rss=[rss, rss_reason],
        peak_vram=[peak_vram, vram_reason],
        vram_sources=vram_sources,
    )
    save()
    emit("done", variant=variant["id"])
    return 0


def cannot_win(
    best: dict[str, Any] | None, seconds: float, components: dict[str, list[float]]
) -> str | None:
    """Why a variant cannot beat the best measured so far, judged on one measured call.

    Only when the whole call and every component the best run also had are slower than the
    best by more than `margin` (a plan mixing components could still use a faster one)."""
    if not best:
        return None
    margin = 1.0 + best.get("margin", 0.25)
    if seconds <= best["end_to_end_s"] * margin:
        return None
    slower = []
    for name, best_ms in best.get("components", {}).items():
        calls = components.get(name)
        if not calls:
            return None
        ms = sorted(calls)[len(calls) // 2] * 1000
        if ms <= best_ms * margin:
            return None
        slower.append(f"{name} {ms:.1f} ms vs {best_ms:.1f}")
    components_text = f", every component slower ({', '.join(slower)})" if slower else ""
    return (
        f"cannot beat {best['label']}: its first measured call took {seconds:.3g} s against "
        f"{best['end_to_end_s']:.3g} s{components_text}; not measured further"
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kiln.bench.worker REQUEST.json", file=sys.stderr)
        return 2
    request = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    try:
        return run(request)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from kiln.artifacts import atomic_write_text
        from kiln.errors import KilnError

        traceback.print_exc()
        reason = str(exc) if isinstance(exc, KilnError) else f"{type(exc).__name__}: {exc}"
        path = Path(request["result"])
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = {"cases": {}}
        data.update(status="failed", reason=reason)
        atomic_write_text(path, json.dumps(data, indent=1))
        return 1


if __name__ == "__main__":
    sys.exit(main())
