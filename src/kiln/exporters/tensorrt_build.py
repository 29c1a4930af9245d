"""The TensorRT build, in a child process: ONNX graph + optimization profile -> plan file.

`build_plan` runs `python -m kiln.exporters.tensorrt_build REQUEST.json` and forwards the
child's progress (TensorRT's `IProgressMonitor` phases) to the caller. A crash inside
TensorRT, or the out-of-memory killer, ends the child; kiln reports it in one line and the
staging folder is discarded. The child writes the plan atomically, and the timing cache
(`timing-<TensorRT version>-sm<compute capability>.cache` in the kiln cache dir) before and
after each build, so later builds on the same GPU skip the kernel timings already made.

Written against TensorRT 11.4's Python API: networks are strongly typed (the graph carries
the precision, see `kiln.exporters.tensorrt_graph`), so no precision flag is set here.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln import child_process
from kiln.errors import ExportError
from kiln.exporters.tensorrt import InputProfile

EVENT_PREFIX = "@@kiln-trt "


@dataclass(frozen=True)
class BuildRequest:
    """What the child builds: the graph, where the plan goes, the profile, builder effort."""

    component: str
    onnx: str
    plan: str
    inputs: tuple[InputProfile, ...]
    timing_cache_dir: str
    optimization_level: int = 3
    device: int = 0  # CUDA device ordinal the engine is built on

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "onnx": self.onnx,
            "plan": self.plan,
            "inputs": [i.to_dict() for i in self.inputs],
            "timing_cache_dir": self.timing_cache_dir,
            "optimization_level": self.optimization_level,
            "device": self.device,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BuildRequest:
        return cls(
            component=data["component"],
            onnx=data["onnx"],
            plan=data["plan"],
            inputs=tuple(InputProfile.from_dict(i) for i in data["inputs"]),
            timing_cache_dir=data["timing_cache_dir"],
            optimization_level=int(data.get("optimization_level", 3)),
            device=int(data.get("device", 0)),
        )


@dataclass(frozen=True)
class BuiltPlan:
    """What the child reports: the GPU and TensorRT the plan is bound to, and the time."""

    built_for: Mapping[str, Any]
    seconds: float


# ------------------------------------------------------------------------------ the parent


def build_plan(request: BuildRequest, progress: Callable[[str], None]) -> BuiltPlan:
    """Build in a child process; raise `ExportError` in one line when it fails or crashes."""
    scratch = Path(tempfile.mkdtemp(prefix="kiln-trt-"))
    try:
        request_path = scratch / "request.json"
        request_path.write_text(json.dumps(request.to_dict()), encoding="utf-8")
        log_path = scratch / "build.log"
        code, events = _run_child(request_path, log_path, progress)
        failure = next((e for e in events if e.get("event") == "error"), None)
        done = next((e for e in events if e.get("event") == "done"), None)
        if failure is not None:
            raise ExportError(failure["message"])
        if code != 0 or done is None:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            tail = child_process.log_tail(log_path, lines=3)
            raise ExportError(
                f"TensorRT's build process {how} while building {request.component}'s engine; "
                f"nothing was written{f' (last output: {tail})' if tail else ''}"
            )
        return BuiltPlan(done["built_for"], float(done["seconds"]))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_child(
    request_path: Path, log_path: Path, progress: Callable[[str], None]
) -> tuple[int, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> None:
        events.append(event)
        if event.get("event") == "progress":
            progress(event["text"])

    argv = [sys.executable, "-m", "kiln.exporters.tensorrt_build", str(request_path)]
    # SIGTERM, not SIGINT: a child inside TensorRT's native build would not see SIGINT.
    return child_process.run_reporting(argv, log_path, EVENT_PREFIX, on_event), events


# ------------------------------------------------------------------------------- the child


class BuildFailure(Exception):
    """A build that TensorRT refused, with its reason (reported, not a crash)."""


def emit(event: str, **data: Any) -> None:
    child_process.emit(EVENT_PREFIX, event, **data)


def build(request: BuildRequest) -> dict[str, Any]:
    """Parse, configure, build, write the plan and the timing cache; return what it is bound to."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BuildFailure(
            f"TensorRT cannot be imported here ({exc}): pip install 'kiln[gpu]'"
        ) from None
    import torch

    from kiln.artifacts import atomic_write_bytes
    from kiln.runtimes.tensorrt import tensorrt_logger

    torch.cuda.set_device(request.device)  # the builder works on the current CUDA device
    gpu = torch.cuda.get_device_name(request.device)
    major, minor = torch.cuda.get_device_capability(request.device)
    logger = tensorrt_logger(trt, echo=True)  # warnings and errors go to the build log
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    emit("progress", text="parsing the ONNX graph")
    if not parser.parse_from_file(request.onnx):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildFailure(
            f"TensorRT cannot parse {request.component}'s ONNX graph: "
            f"{errors[0] if errors else 'no reason given'}"
        )
    config = builder.create_builder_config()
    config.builder_optimization_level = request.optimization_level
    config.add_optimization_profile(_profile(builder, network, request))
    cache_path = Path(request.timing_cache_dir) / f"timing-{trt.__version__}-sm{major}{minor}.cache"
    known = cache_path.read_bytes() if cache_path.is_file() else b""
    cache = config.create_timing_cache(known)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another device or TensorRT build: start a fresh one (rewritten below).
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    monitor = _monitor(trt)
    config.progress_monitor = monitor
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise BuildFailure(
            f"TensorRT could not build {request.component}'s engine: {logger.last_error()}"
        )
    atomic_write_bytes(Path(request.plan), memoryview(serialized))
    atomic_write_bytes(cache_path, memoryview(config.get_timing_cache().serialize()))
    return {"built_for": plan_binding(gpu, (major, minor), trt.__version__), "seconds": seconds}


def plan_binding(gpu: str, capability: tuple[int, int], tensorrt_version: str) -> dict[str, Any]:
    """What a plan is bound to, as the variant's `built_for` records it: the fields selection
    (`kiln.profiles.select`) and the runtime (`kiln.runtimes.tensorrt`) compare."""
    return {
        "gpu": gpu,
        "compute_capability": f"{capability[0]}.{capability[1]}",
        "tensorrt": tensorrt_version,
        "hardware_compatibility": "none",  # plans run on the GPU model they were built on
    }


def _network_flags(trt: Any) -> int:
    """TensorRT 11 networks are always strongly typed (the flag is deprecated and ignored);
    10.x needs it asked for, or the graph's fp16/bf16 types would be mere hints."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None or int(trt.__version__.split(".")[0]) >= 11:
        return 0
    return 1 << int(flag)


def _profile(builder: Any, network: Any, request: BuildRequest) -> Any:
    profile = builder.create_optimization_profile()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    shapes = {entry.name: entry for entry in request.inputs}
    uncovered = [name for name in names if name not in shapes]
    if uncovered:
        raise BuildFailure(f"the graph has inputs the profile does not cover: {uncovered}")
    # Inputs the exporter dropped (unused by the graph) are in the spec but not the network.
    for name in names:
        entry = shapes[name]
        profile.set_shape(name, entry.min, entry.opt, entry.max)
    return profile


def _monitor(trt: Any) -> Any:
    """TensorRT's build phases as progress events (top-level phases and their steps)."""

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.top: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            if parent_phase is None:
                self.top[phase_name] = num_steps
                emit("progress", text=phase_name)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if phase_name in self.top:
                emit("progress", text=f"{phase_name} {step + 1}/{self.top[phase_name]}")
            return True  # never cancel

        def phase_finish(self, phase_name: str) -> None:
            self.top.pop(phase_name, None)

    return Monitor()


def main(argv: list[str]) -> int:
    request = BuildRequest.from_dict(json.loads(Path(argv[1]).read_text(encoding="utf-8")))
    try:
        result = build(request)
    except BuildFailure as exc:
        emit("error", message=str(exc))
        return 1
    emit("done", **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
