"""`kiln optimize`: build what this machine can run, measure it here, keep the proof.

    result = optimize("kiln:shapes-sd", "shapes-fast", max_drift=["psnr=30"])
    kiln.load("shapes-fast")      # now picks the measured fastest plan within that budget

Optimize is bench plus selection, not a new engine (DESIGN.md):

1. export the fp32 variants the candidates start from (SOURCE), or copy an artifact;
2. quantize every candidate of the matching target file (`optimize_candidates`), all
   cells from one fp32 calibration run, so every drift figure has the same reference;
3. one `kiln bench` run over the fp32 variants, every candidate within the drift budget
   and PyTorch eager, recorded for this hardware fingerprint (`manifest.measurements`);
4. the budget and objective become the manifest's selection defaults, so `kiln.load(OUT)`
   ranks per component by those medians within that budget (an int8 UNet beside an fp32
   VAE decoder is a plan like any other);
5. a `kiln bench` of the chosen plan checks it reproduces the recorded medians.

Everything lands in OUT as it is finished (variants, measurements, `optimize/state.json`),
so a rerun resumes: built variants are not rebuilt, measured ones not measured again.
`budget_minutes` is checked between steps; what it cut is reported, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.artifacts import (
    Manifest,
    atomic_write_text,
    check_output_folder,
    now_utc,
    read_manifest,
    variant_folder,
    write_manifest,
)
from kiln.errors import InvalidRequestError, KilnError
from kiln.models.spec import ComponentSpec, Precision

STATE_FILE = "optimize/state.json"
#: Components the family's bench workload never runs (it is text-to-image): building and
#: measuring candidates for them would cost a quarter of the time and pick nothing; they
#: keep their fp32 variants.
NOT_IN_WORKLOAD = {"stable-diffusion": {"vae_encoder"}}
KEEP = ("all", "best")
#: A chosen plan's component median may differ this much from its recorded one (or twice
#: either run's own p90 spread, when larger) before the check calls it not reproduced.
REPRODUCE_TOLERANCE = 0.25
#: A whole measured plan must beat the per-component pick end to end by this much to win.
WHOLE_PLAN_MARGIN = 0.10
#: A candidate whose first measured call is this much slower than the best plan so far, end
#: to end and in every component, is not measured further (2x the run-to-run noise here).
ABANDON_MARGIN = 0.25
#: Fixed-shape OpenVINO copies per component: a size and its img2img/hires neighbour. On
#: an SD 1.5 UNet a static copy runs 10-15% faster (8.3-8.8 s against 9.5-10.4 s a step
#: in f32 on AVX-512; 1.37 against 1.54 s in bf16 on AMX).
STATIC_SHAPES = 2


@dataclass(frozen=True)
class Candidate:
    """One cell to build for every component: `openvino:int8`, `openvino:int8-static`."""

    target: str
    precision: Precision
    method: str | None = None  # None: each component's default method for the cell

    @classmethod
    def parse(cls, text: str) -> Candidate:
        from kiln.profiles.targets import normalize_target, parse_precision

        target, sep, rest = text.strip().partition(":")
        precision, _, method = rest.partition("-")
        if not sep or not target or not precision:
            raise InvalidRequestError(
                f"candidate {text!r} is not TARGET:PRECISION[-METHOD] (e.g. openvino:int8-static)"
            )
        where = f"candidate {text!r}"
        return cls(
            normalize_target(target, where), parse_precision(precision, where), method or None
        )

    @property
    def label(self) -> str:
        return f"{self.target}:{self.precision.value}" + (f"-{self.method}" if self.method else "")

    def variant_ids(self, manifest: Manifest, components: Sequence[str]) -> list[str]:
        """The ids its variants have (or will have), component by component."""
        from kiln.quant.recipes import recipe_for, variant_tag

        ids = []
        for name in components:
            spec = ComponentSpec.from_dict(manifest.components[name])
            if self.precision is Precision.FP32:
                tag = None
            else:
                tag = variant_tag(
                    recipe_for(self.target, self.precision, spec, method=self.method), spec
                )
            ids.append(f"{name}/{self.target}/{self.precision.value}" + (f"-{tag}" if tag else ""))
        return ids


@dataclass(frozen=True)
class OptimizeEvent:
    """A progress line: `stage` is export, quantize, measure, select, verify, skip or done."""

    stage: str
    detail: str = ""


@dataclass
class OptimizeResult:
    artifact: Path
    plan: Any
    points: list[dict[str, Any]]
    skipped: dict[str, str]
    seconds: float
    reproduced: list[dict[str, Any]] = field(default_factory=list)
    frontier_plot: Path | None = None
    stopped_by_budget: bool = False
    #: The candidate whose whole plan won over the per-component pick (`reproduced` is
    #: about that pick), or None.
    whole_plan: str | None = None


class _BudgetSpent(Exception):
    pass


class _Clock:
    def __init__(self, minutes: float | None) -> None:
        if minutes is not None and minutes < 0:
            raise InvalidRequestError(f"--budget-minutes must be 0 or more, got {minutes:g}")
        self.started = time.monotonic()
        self.deadline = None if minutes is None else self.started + minutes * 60
        self.spent = False

    def check(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            self.spent = True
            raise _BudgetSpent(what)


def optimize(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_drift: Sequence[str] | Mapping[str, float] | None = None,
    objective: str = "latency",
    candidates: Sequence[str] | None = None,
    sizes: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    workload: str | os.PathLike[str] | None = None,
    repeats: int | None = None,
    calibration: int = 4,
    budget_minutes: float | None = None,
    keep: str = "all",
    static_shapes: int = STATIC_SHAPES,
    progress: Callable[[OptimizeEvent], None] | None = None,
    bench_events: Callable[[dict[str, Any]], None] | None = None,
    quant_progress: Callable[[Any], None] | None = None,
    worker_command: Sequence[str] | None = None,
) -> OptimizeResult:
    """Build, measure and rank candidates for this machine; leave OUT ready for `kiln.load`.

    `static_shapes`: OpenVINO sessions keep up to this many fixed-shape copies per component
    (compiled for the shapes the workload runs at, remembered for the next load; 0: only the
    dynamic graph). Measured that way, and recorded so `kiln.load(OUT)` loads that way."""
    from kiln.profiles.hardware import detect
    from kiln.profiles.select import DEFAULT_DRIFT_BUDGET, Policy, parse_drift_budget, select
    from kiln.profiles.targets import target_for

    if keep not in KEEP:
        raise InvalidRequestError(f"--keep must be all or best, got {keep!r}")
    if static_shapes < 0:
        raise InvalidRequestError(f"--static-shapes must be 0 or more, got {static_shapes}")
    budget = dict(DEFAULT_DRIFT_BUDGET)
    if max_drift:
        budget |= (
            dict(max_drift) if isinstance(max_drift, Mapping) else parse_drift_budget(max_drift)
        )
    Policy(objective=objective)  # an unknown objective fails before any work
    clock = _Clock(budget_minutes)
    say = progress or (lambda event: None)
    root = _artifact(source, check_output_folder(out, "-o"), say)
    profile = detect()
    target = target_for(profile)
    wanted = [Candidate.parse(c) for c in (candidates or target.optimize_candidates)]
    state = _read_state(root, profile.fingerprint)
    skipped: dict[str, str] = {}
    runnable = _runnable(read_manifest(root), wanted, profile, skipped)
    with contextlib.suppress(_BudgetSpent):  # what was built before it ran out stays
        _build(root, runnable, sizes, steps, calibration, clock, say, quant_progress)
    manifest = read_manifest(root)
    built = [c for c in runnable if _complete(manifest, c)]
    for c in runnable:
        if c not in built:
            skipped[c.label] = "not built: the time budget ran out first"
    measurable = _within_budget(manifest, built, budget, skipped)
    plan_workload = _workload(manifest, sizes, steps, workload, repeats)
    manifest = read_manifest(root)
    write_manifest(
        root, replace(manifest, selection={**manifest.selection, "static_shapes": static_shapes})
    )
    try:
        _measure(root, measurable, state, plan_workload, clock, say, bench_events, worker_command)
    except _BudgetSpent:
        skipped.setdefault("measure", "not measured: the time budget ran out first")
    for label, entry in state.get("measured", {}).items():
        if entry["status"] != "ok":
            skipped.setdefault(label, entry.get("reason") or entry["status"])
    manifest = replace(
        read_manifest(root),
        selection={
            "drift_budget": budget,
            "objective": objective,
            "static_shapes": static_shapes,
            "by": "kiln optimize",
            "fingerprint": profile.fingerprint,
            "recorded": now_utc(),
        },
    )
    write_manifest(root, manifest)
    say(OptimizeEvent("select", f"objective {objective}, drift budget {_budget_text(budget)}"))
    policy = Policy(objective=objective, drift_budget=budget)
    plan = select(manifest, profile, policy, target)
    reproduced: list[dict[str, Any]] = []
    try:
        clock.check("verify")
        reproduced = _verify(root, plan, state, plan_workload, say, bench_events, worker_command)
    except _BudgetSpent:
        skipped.setdefault("verify", "the chosen plan was not re-measured: the time budget ran out")
    whole, whole_plan = _faster_whole_plan(read_manifest(root), state, budget), None
    if whole is not None:
        label, entry, chosen_ms = whole
        say(
            OptimizeEvent(
                "select",
                f"the per-component pick ran {chosen_ms:.1f} ms end to end, {label} "
                f"{entry['end_to_end_ms']:.1f} ms: preferring {label}'s plan",
            )
        )
        manifest = read_manifest(root)
        selection = {**manifest.selection, "prefer": list(entry["plan"].values())}
        write_manifest(root, replace(manifest, selection=selection))
        policy = Policy.from_strings(
            selection["prefer"],
            objective=objective,
            drift_budget=budget,
            prefer_origin="kiln optimize: the fastest whole plan measured here",
        )
        plan = select(read_manifest(root), profile, policy, target)
        state["chosen"] = entry
        whole_plan = label
    if keep == "best":
        _keep_only(root, plan, say)
    points = frontier(_points(read_manifest(root), state, plan))
    state.update(points=points, plan=plan.to_dict(), skipped=skipped, finished=now_utc())
    _write_state(root, state)
    plot = _plot(points, root / "optimize" / "frontier.png")
    seconds = time.monotonic() - clock.started
    say(OptimizeEvent("done", f"{len(built)} candidate(s) built, {len(points)} plan(s) measured"))
    return OptimizeResult(
        root, plan, points, skipped, seconds, reproduced, plot, clock.spent, whole_plan
    )


# ------------------------------------------------------------------------------- building


def _artifact(source: str | os.PathLike[str], out: Path, say: Callable) -> Path:
    """OUT as an artifact: resumed as it is, copied from an artifact, or exported fresh."""
    if (out / "manifest.json").is_file():
        say(OptimizeEvent("export", f"resuming in {out}"))
        return out
    src = Path(source)
    if (src / "manifest.json").is_file():
        read_manifest(src)  # a corrupt artifact is refused before anything is copied
        say(OptimizeEvent("export", f"copying {src} to {out}"))
        partial = out.with_name(f".{out.name}.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(src, partial, ignore=shutil.ignore_patterns("optimize"))
        partial.rename(out)
        return out
    from kiln.exporters.runner import export

    targets = ["onnx"] + (["openvino"] if _installed("openvino") else [])
    say(OptimizeEvent("export", f"{source} -> {out} ({', '.join(targets)} fp32)"))
    export(source, out, targets=targets)
    return out


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _components(manifest: Manifest) -> list[str]:
    """The components candidates are built for: those the bench workload runs."""
    optional = {n for n, spec in manifest.components.items() if spec.get("optional")}
    unused = NOT_IN_WORKLOAD.get(manifest.family, set())
    exported = dict.fromkeys(v.component for v in manifest.variants)
    return [c for c in exported if c not in optional and c not in unused]


def _runnable(
    manifest: Manifest, wanted: Sequence[Candidate], profile: Any, skipped: dict[str, str]
) -> list[Candidate]:
    from kiln.quant.recipes import cell, cell_problem

    out = []
    fp32_targets = {v.target for v in manifest.variants if v.precision is Precision.FP32}
    for c in wanted:
        try:
            problem = cell_problem(cell(c.target, c.precision), profile)
            c.variant_ids(manifest, _components(manifest))  # an unknown method fails here
        except KilnError as exc:
            problem = str(exc)
        if not problem and c.target not in fp32_targets:
            problem = (
                f"no fp32 {c.target} variant to start from (`kiln export --target {c.target}`)"
            )
        if problem:
            skipped[c.label] = problem
        else:
            out.append(c)
    return out


def _complete(manifest: Manifest, candidate: Candidate) -> bool:
    """Every component has the variant, with its end-to-end drift recorded."""
    ids = set(manifest.variant_ids())
    wanted = candidate.variant_ids(manifest, _components(manifest))
    return all(i in ids and set(manifest.variant(i).drift or {}) - {"component"} for i in wanted)


def _build(
    root: Path,
    candidates: Sequence[Candidate],
    sizes: Sequence[str] | None,
    steps: Sequence[int] | None,
    calibration: int,
    clock: _Clock,
    say: Callable,
    quant_progress: Callable | None,
) -> None:
    from kiln.bench.workload import parse_size
    from kiln.quant.runner import quantize_cells

    manifest = read_manifest(root)
    todo = [c for c in candidates if not _complete(manifest, c)]
    for c in candidates:
        if c not in todo:
            say(OptimizeEvent("quantize", f"{c.label}: already built"))
    if not todo:
        return
    clock.check("quantize")
    size = None
    if sizes:
        width, height = parse_size(sizes[0])
        size = width if width == height else None
    cells = [(c.target, c.precision, c.method) for c in todo]
    say(OptimizeEvent("quantize", ", ".join(c.label for c in todo) + " (one calibration run)"))
    quantize_cells(
        root,
        cells,
        components=_components(manifest),
        calibration=calibration,
        steps=min(steps) if steps else 4,
        size=size,
        progress=quant_progress,
        before_each=lambda variant_id: clock.check(variant_id),
    )


def _within_budget(
    manifest: Manifest, built: Sequence[Candidate], budget: Mapping[str, float], skipped: dict
) -> list[Candidate]:
    """Candidates selection could pick: one over the drift budget is not worth measuring."""
    from kiln.profiles.select import drift_problem

    out = []
    for c in built:
        problems = [
            f"{i}: {p}"
            for i in c.variant_ids(manifest, _components(manifest))
            if (p := drift_problem(manifest.variant(i), budget))
        ]
        if len(problems) == len(_components(manifest)):
            skipped[c.label] = "over the drift budget, never selectable: " + "; ".join(problems)
        else:
            out.append(c)  # some components within budget: those can join a mixed plan
    return out


# ------------------------------------------------------------------------------ measuring


def _workload(
    manifest: Manifest,
    sizes: Sequence[str] | None,
    steps: Sequence[int] | None,
    file: str | os.PathLike[str] | None,
    repeats: int | None,
) -> Any:
    from kiln.bench.harness import family_module, family_workload

    if file is not None and (sizes or steps):
        raise InvalidRequestError("give --workload or --size/--steps, not both")
    family = family_module(manifest)
    return family_workload(family, manifest, file=file, sizes=sizes, steps=steps, repeats=repeats)


def _bench_variant(manifest: Manifest, candidate: Candidate) -> str:
    """The bench variant that runs exactly this candidate's variants, where they pass.

    Components the workload never runs still load: as the candidate runtime's fp32 variant,
    so that one runtime's threads and memory are what gets measured."""
    ids = candidate.variant_ids(manifest, _components(manifest))
    present = set(manifest.variant_ids())
    for name in NOT_IN_WORKLOAD.get(manifest.family, ()):
        fp32 = f"{name}/{candidate.target}/fp32"
        if fp32 in present:
            ids.append(fp32)
    return ",".join(ids)


def _measure(
    root: Path,
    candidates: Sequence[Candidate],
    state: dict[str, Any],
    workload: Any,
    clock: _Clock,
    say: Callable,
    bench_events: Callable | None,
    worker_command: Sequence[str] | None,
) -> None:
    """Bench each candidate, fastest expected first (PyTorch eager with the first), then the
    fp32 plans.

    One bench run per plan, so each can be judged against the best measured before it: a
    plan whose first measured call is slower everywhere by more than ABANDON_MARGIN stops
    there (`kiln.bench.worker.cannot_win`), skipped with the reason, its time saved."""
    from kiln.bench.harness import run_bench

    manifest = read_manifest(root)
    fp32 = [
        Candidate(t, Precision.FP32)
        for t in dict.fromkeys(v.target for v in manifest.variants if v.precision is Precision.FP32)
    ]
    measured = state.setdefault("measured", {})
    todo = [c for c in (*candidates, *fp32) if c.label not in measured]
    if not todo:
        say(OptimizeEvent("measure", "every candidate is already measured on this machine"))
        return
    baselines = [] if "torch" in measured else ["torch"]  # with the first plan, below
    say(OptimizeEvent("measure", ", ".join([*baselines, *(c.label for c in todo)])))
    reports = root / "optimize"
    reports.mkdir(parents=True, exist_ok=True)
    for candidate in todo:
        clock.check("measure")
        label = candidate.label
        best = _best_measured(measured) if len(workload.cases) == 1 else None
        if best is not None:
            say(OptimizeEvent("measure", f"{label} (best so far: {best['label']})"))
        number = len(list(reports.glob("bench-*.json"))) + 1
        report = run_bench(
            root,
            variants=[_bench_variant(manifest, candidate)],
            baselines=baselines,
            workload=workload,
            json_path=reports / f"bench-{number}.json",
            record=True,
            on_event=bench_events,
            worker_command=worker_command,
            abandon=best,
        )
        for variant in report["variants"]:
            name = "torch" if variant["kind"] == "baseline" else label
            measured[name] = _summary(variant, read_manifest(root))
        baselines = []
        _write_state(root, state)


def _best_measured(measured: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fastest kiln plan measured so far and, per component, the fastest median seen."""
    plans = {
        label: m
        for label, m in measured.items()
        if label != "torch" and m["status"] == "ok" and m["end_to_end_ms"] is not None
    }
    if not plans:
        return None
    label = min(plans, key=lambda k: plans[k]["end_to_end_ms"])
    components: dict[str, float] = {}
    for m in plans.values():
        for name, ms in (m.get("components") or {}).items():
            components[name] = min(ms, components.get(name, ms))
    return {
        "label": label,
        "end_to_end_s": plans[label]["end_to_end_ms"] / 1000,
        "components": components,
        "margin": ABANDON_MARGIN,
    }


def _summary(variant: Mapping[str, Any], manifest: Manifest) -> dict[str, Any]:
    """What the frontier needs of one bench variant (drift kept: --keep best drops variants)."""
    case = variant["cases"][0] if variant.get("cases") else {"figures": {}, "components": {}}
    figures = case["figures"]
    rss = variant.get("figures", {}).get("peak_rss_bytes", {})
    plan = {row["component"]: row["variant"] for row in variant.get("plan", [])}
    return {
        "status": variant["status"],
        "reason": variant.get("reason"),
        "end_to_end_ms": (figures.get("end_to_end_ms") or {}).get("value"),
        "components": {
            name: stats["median"]
            for name, stats in case.get("components", {}).items()
            if stats.get("median") is not None
        },
        "peak_rss_bytes": rss.get("value"),
        "plan": plan,
        "drift": _worst_drift(manifest, plan.values()),
    }


def _verify(
    root: Path,
    plan: Any,
    state: dict[str, Any],
    workload: Any,
    say: Callable,
    bench_events: Callable | None,
    worker_command: Sequence[str] | None,
) -> list[dict[str, Any]]:
    """Bench the chosen plan again; compare each component's median with the recorded one."""
    from kiln.bench.harness import run_bench

    say(OptimizeEvent("verify", "benchmarking the chosen plan again"))
    report = run_bench(
        root,
        variants=["auto"],
        baselines=[],
        workload=workload,
        json_path=root / "optimize" / "chosen.json",
        on_event=bench_events,
        worker_command=worker_command,
    )
    variant = report["variants"][0]
    state["chosen"] = _summary(variant, read_manifest(root))
    if variant["status"] != "ok":
        return [{"component": "", "problem": variant.get("reason") or variant["status"]}]
    components = variant["cases"][0]["components"]
    measured = read_manifest(root).measurements.get(report["hardware"]["fingerprint"], {})
    out = []
    for choice in plan:
        again = components.get(choice.component, {})
        recorded = measured.get(choice.variant_id, {})
        if choice.measured_ms is not None and again.get("median") is not None:
            row = reproduction(choice.measured_ms, recorded.get("p90_ms"), again)
            out.append({"component": choice.component, "variant": choice.variant_id, **row})
    return out


def _faster_whole_plan(
    manifest: Manifest, state: Mapping[str, Any], budget: Mapping[str, float]
) -> tuple[str, dict[str, Any], float] | None:
    """A measured candidate plan clearly faster end to end than the per-component pick.

    Component medians miss what a plan pays between components (copies between runtimes,
    thread pools competing), so the whole plans measured are the final word."""
    from kiln.profiles.select import drift_problem

    chosen = state.get("chosen") or {}
    chosen_ms = chosen.get("end_to_end_ms")
    if chosen_ms is None:
        return None
    ids = set(manifest.variant_ids())
    best: tuple[str, dict[str, Any]] | None = None
    for label, entry in state.get("measured", {}).items():
        plan = entry.get("plan") or {}
        if entry["status"] != "ok" or entry["end_to_end_ms"] is None or not plan:
            continue
        if any(v not in ids or drift_problem(manifest.variant(v), budget) for v in plan.values()):
            continue
        if best is None or entry["end_to_end_ms"] < best[1]["end_to_end_ms"]:
            best = (label, entry)
    if best is None or best[1]["plan"] == chosen.get("plan"):
        return None
    if best[1]["end_to_end_ms"] >= chosen_ms * (1 - WHOLE_PLAN_MARGIN):
        return None
    return best[0], best[1], chosen_ms


def reproduction(
    recorded_ms: float, recorded_p90_ms: float | None, again: Mapping[str, Any]
) -> dict[str, Any]:
    """Whether a component's new median (`again`: median, p90) reproduces a recorded one.

    The tolerance is REPRODUCE_TOLERANCE, or twice the noisier run's own p90 spread: a
    run whose slow calls sit 20 % above its median cannot vouch for a 25 % difference."""
    spread = [_spread(again)]
    if recorded_p90_ms:
        spread.append(recorded_p90_ms / recorded_ms - 1.0)
    tolerance = max(REPRODUCE_TOLERANCE, 2 * max(spread))
    change = again["median"] / recorded_ms - 1.0
    return {
        "recorded_ms": recorded_ms,
        "again_ms": again["median"],
        "change": change,
        "tolerance": tolerance,
        "reproduced": abs(change) <= tolerance,
    }


def _spread(stats: Mapping[str, Any]) -> float:
    """How far a run's p90 sits above its median, as a fraction: its own noise."""
    median = stats.get("median") or 0.0
    return (stats.get("p90") or median) / median - 1.0 if median else 0.0


# ------------------------------------------------------------------------------- results


def _points(manifest: Manifest, state: Mapping[str, Any], plan: Any) -> list[dict[str, Any]]:
    """One point per measured plan: latency, peak memory and worst recorded drift."""
    chosen = {c.component: c.variant_id for c in plan}
    points = []
    runs = dict(state.get("measured", {}))
    if state.get("chosen", {}).get("plan") == chosen and chosen not in [
        m["plan"] for m in runs.values()
    ]:
        runs["chosen plan"] = state["chosen"]  # a mixed plan no single candidate ran
    for label, m in runs.items():
        if m["status"] != "ok" or m["end_to_end_ms"] is None:
            continue
        points.append(
            {
                "plan": label,
                "end_to_end_ms": m["end_to_end_ms"],
                "peak_rss_bytes": m["peak_rss_bytes"],
                "drift": m["drift"],
                "chosen": m["plan"] == chosen,
            }
        )
    return points


def _worst_drift(manifest: Manifest, variant_ids: Any) -> dict[str, float] | None:
    """The lowest PSNR (images) or BLEU (captions) among the plan's variants, vs fp32."""
    worst: dict[str, float] = {}
    for vid in variant_ids:
        if vid not in manifest.variant_ids():
            continue
        drift = manifest.variant(vid).drift or {}
        for metric in ("psnr", "bleu"):
            value = drift.get(metric)
            if isinstance(value, (int, float)) and value < worst.get(metric, float("inf")):
                worst[metric] = float(value)
    return worst or None


def _quality(point: Mapping[str, Any]) -> float:
    """Higher is better; fp32 plans and PyTorch (the references) rank best."""
    drift = point["drift"] or {}
    return min(drift.values()) if drift else float("inf")


def frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mark every point no other point beats on latency, drift and peak memory at once."""

    def beats(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
        pairs = [
            (a["end_to_end_ms"], b["end_to_end_ms"]),
            (-_quality(a), -_quality(b)),
            (a["peak_rss_bytes"] or 0, b["peak_rss_bytes"] or 0),
        ]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    for p in points:
        p["frontier"] = not any(beats(q, p) for q in points if q is not p)
    return sorted(points, key=lambda p: p["end_to_end_ms"])


def _plot(points: list[dict[str, Any]], path: Path) -> Path | None:
    """Latency against drift, marker area by peak memory; the chosen plan starred."""
    if not points or not _installed("matplotlib"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kiln.bench.report import save_figure

    finite = [q for p in points if (q := _quality(p)) != float("inf")]
    ceiling = max(finite) * 1.1 if finite else 1.0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for index, p in enumerate(points):  # sorted by latency: neighbours' labels alternate
        q = _quality(p)
        y = ceiling if q == float("inf") else q
        size = 40 + 160 * (p["peak_rss_bytes"] or 0) / max(x["peak_rss_bytes"] or 1 for x in points)
        ax.scatter(
            p["end_to_end_ms"],
            y,
            s=size,
            marker="*" if p["chosen"] else "o",
            color="tab:red" if p["chosen"] else ("tab:blue" if p["frontier"] else "tab:gray"),
        )
        ax.annotate(
            p["plan"],
            (p["end_to_end_ms"], y),
            fontsize=7,
            xytext=(4, 4 if index % 2 == 0 else -10),
            textcoords="offset points",
        )
    ax.set_xlabel("end to end (ms, median)")
    ax.set_ylabel("worst drift vs fp32 (PSNR dB / BLEU; top = reference)")
    ax.set_title("kiln optimize: blue = Pareto frontier, red star = chosen, size = peak RSS")
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, plt, path)


def _keep_only(root: Path, plan: Any, say: Callable) -> None:
    """Drop quantized variants the plan does not use (fp32 stays: it is every reference).

    The manifest is written first, so it never lists a folder that is gone."""
    manifest = read_manifest(root)
    chosen = {c.variant_id for c in plan}
    dropped = [
        v for v in manifest.variants if v.precision is not Precision.FP32 and v.id not in chosen
    ]
    if not dropped:
        return
    write_manifest(
        root, replace(manifest, variants=tuple(v for v in manifest.variants if v not in dropped))
    )
    for v in dropped:
        folder = variant_folder(v.component, v.target, v.precision, v.tag)
        shutil.rmtree(root / folder, ignore_errors=True)
    say(OptimizeEvent("done", f"--keep best: removed {len(dropped)} unused variant(s)"))


def _budget_text(budget: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in budget.items())


def _read_state(root: Path, fingerprint: str) -> dict[str, Any]:
    """The state of earlier runs on this machine; another machine's measurements do not count."""
    path = root / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = {}
    if data.get("fingerprint") != fingerprint:
        data = {"fingerprint": fingerprint, "started": now_utc()}
    return data


def _write_state(root: Path, state: Mapping[str, Any]) -> None:
    path = root / STATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")


__all__ = ["Candidate", "OptimizeEvent", "OptimizeResult", "frontier", "optimize"]
