"""Optional ONNX graph fusions, kept only where they measurably help.

onnxruntime's transformer optimizer fuses attention, LayerNorm, GELU and (for GPUs)
GroupNorm and NHWC convolutions. Several of its fusions have CUDA kernels only, and
onnxruntime already applies the generic ones when a session loads, so the pass is run,
timed against the unfused graph on the same inputs, and kept only if it is faster by more
than the noise of this kind of machine. The decision and both timings go into the manifest.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kiln.models.spec import ComponentSpec

# Speed-ups smaller than this are within run-to-run noise on small VMs (about 10%).
MIN_GAIN = 0.10
# Fusions that only have CUDA kernels in onnxruntime.
_GPU_ONLY = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
)


@dataclass(frozen=True)
class OptimizationReport:
    kept: bool
    reason: str
    baseline_ms: float | None = None
    optimized_ms: float | None = None
    fusions: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def optimize_graph(
    folder: Path, entry: str, spec: ComponentSpec, *, repeats: int = 5
) -> OptimizationReport:
    """Try the fused graph; replace `folder/entry` (and its data file) only if it is faster."""
    if not spec.graph_kind:
        return OptimizationReport(False, f"no fusion recipe for {spec.name}")
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    candidate = folder / ".optimized"
    candidate.mkdir()
    try:
        options = FusionOptions(spec.graph_kind)
        for flag in _GPU_ONLY:
            setattr(options, flag, False)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            model = optimize_model(
                str(folder / entry),
                model_type=spec.graph_kind,
                opt_level=0,
                use_gpu=False,
                optimization_options=options,
            )
            fusions = {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}
            model.save_model_to_file(str(candidate / entry), use_external_data_format=True)
        if not fusions:
            return OptimizationReport(False, "no fusion applied", fusions=fusions)
        sample = {k: v.numpy() for k, v in spec.sample_inputs(spec.export_sizes()).items()}
        baseline = _median_ms(folder / entry, spec, sample, repeats)
        optimized = _median_ms(candidate / entry, spec, sample, repeats)
        gain = 1.0 - optimized / baseline
        if gain <= MIN_GAIN:
            reason = f"fused graph {optimized:.1f} ms vs {baseline:.1f} ms: not faster by more than {MIN_GAIN:.0%}"
            return OptimizationReport(False, reason, baseline, optimized, fusions)
        for stale in folder.glob(f"{entry}*"):
            stale.unlink()
        for fresh in candidate.iterdir():
            fresh.rename(folder / fresh.name)
        return OptimizationReport(True, f"{gain:.0%} faster", baseline, optimized, fusions)
    except Exception as exc:  # the optimizer or a fused op the CPU provider lacks
        return OptimizationReport(
            False, f"optimizer failed: {type(exc).__name__}: {str(exc)[:200]}"
        )
    finally:
        shutil.rmtree(candidate, ignore_errors=True)


def _median_ms(path: Path, spec: ComponentSpec, sample: dict, repeats: int) -> float:
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    session = OnnxRuntimeSession(path, spec)
    session.run(sample)  # warm-up: first runs allocate and pick kernels
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        session.run(sample)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)
