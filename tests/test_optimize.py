"""`kiln optimize` on tiny SD 1.x (ONNX + OpenVINO): build, measure, pick, resume, budgets."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from cli_helpers import assert_user_error, run_kiln

import kiln
from kiln.artifacts import read_manifest
from kiln.errors import InvalidRequestError
from kiln.optimize import REPRODUCE_TOLERANCE, Candidate, frontier, optimize, reproduction
from kiln.profiles.select import drift_problem

pytest.importorskip("nncf")

# A bench worker whose OpenVINO sessions sleep 30 ms a call: every OpenVINO candidate is
# made artificially slow, so none may win a component that onnxruntime also runs.
SLOW_OPENVINO = [
    sys.executable,
    "-c",
    "import runpy, time\n"
    "import kiln.runtimes.openvino as ov_session\n"
    "fast = ov_session.OpenVinoSession.run\n"
    "def slow(self, inputs):\n"
    "    time.sleep(0.03)\n"
    "    return fast(self, inputs)\n"
    "ov_session.OpenVinoSession.run = slow\n"
    "runpy.run_module('kiln.bench.worker', run_name='__main__')\n",
]
CANDIDATES = ["onnx:int8", "openvino:int8"]
OPTIONS = dict(steps=[2], repeats=2, calibration=2, candidates=CANDIDATES)


@pytest.fixture(scope="module")
def optimized(both_targets, tmp_path_factory):
    out = tmp_path_factory.mktemp("optimize") / "sd1"
    events = []
    result = optimize(
        both_targets,
        out,
        max_drift=["psnr=10"],
        progress=events.append,
        worker_command=SLOW_OPENVINO,
        **OPTIONS,
    )
    return out, result, events


@pytest.mark.slow  # the optimize run behind it: 90-110 s
def test_load_picks_the_measured_fastest_within_budget(optimized):
    out, result, _ = optimized
    manifest = read_manifest(out)
    assert manifest.selection["drift_budget"]["psnr"] == 10.0
    measured = manifest.measurements[result.plan.fingerprint]
    plan = kiln.load(out, verify=False).plan
    assert plan.to_dict()["choices"] == result.plan.to_dict()["choices"]
    for choice in plan:
        rivals = {
            v.id: measured[v.id]["median_ms"]
            for v in manifest.variants_of(choice.component)
            if v.id in measured and not drift_problem(v, manifest.selection["drift_budget"])
        }
        if not rivals:
            continue  # the VAE encoder: text-to-image never runs it
        assert choice.runtime == "onnxruntime", choice  # OpenVINO was slowed by 30 ms a call
        if "prefer" not in manifest.selection:
            assert choice.measured_ms == min(rivals.values())
    state = json.loads((out / "optimize" / "state.json").read_text())
    if "prefer" in manifest.selection:  # a whole measured plan beat the per-component pick
        chosen = {c.component: c.variant_id for c in plan}
        runs = [m for k, m in state["measured"].items() if k != "torch"]
        winner = next(m for m in runs if m["plan"] == chosen)
        assert winner["end_to_end_ms"] == min(m["end_to_end_ms"] for m in runs)
    assert set(state["measured"]) == {"torch", "onnx:fp32", "openvino:fp32", *CANDIDATES}
    # Measured one at a time after onnx:int8: the slowed OpenVINO plans lost everywhere on
    # their first measured call and were not measured further, nor recorded.
    for label in ("openvino:int8", "openvino:fp32"):
        assert state["measured"][label]["status"] == "skipped"
        assert result.skipped[label].startswith("cannot beat "), result.skipped[label]
    assert not any("/openvino/" in variant_id for variant_id in measured)
    # Text-to-image never runs the VAE encoder: no candidates were built for it.
    assert [v.id for v in manifest.variants_of("vae_encoder") if v.precision != "fp32"] == []
    assert manifest.selection["static_shapes"] == 2
    assert result.frontier_plot is not None and result.frontier_plot.stat().st_size > 0
    assert any(p["chosen"] for p in result.points)
    again = {row["component"]: row for row in result.reproduced}
    assert set(again) == {"text_encoder", "unet", "vae_decoder"}
    # Whether a 5 ms tiny UNet's median repeats within 25 % is up to the machine's noise
    # (4.7 against 6.1 ms once in CI), so this checks the re-bench ran on the chosen plan
    # and judged its own figures; the verdict itself is tested below on fixed numbers.
    assert (out / "optimize" / "chosen.json").stat().st_size > 0
    for choice in plan:
        if choice.component in again:
            row = again[choice.component]
            assert row["variant"] == choice.variant_id and row["again_ms"] > 0
            assert row["reproduced"] == (abs(row["change"]) <= row["tolerance"]), row


def test_reproduction_allows_the_noise_either_run_shows():
    steady = {"median": 110.0, "p90": 112.0}
    assert reproduction(100.0, 101.0, steady)["reproduced"]
    assert reproduction(100.0, 101.0, steady)["tolerance"] == REPRODUCE_TOLERANCE
    slower = reproduction(100.0, 101.0, {"median": 130.0, "p90": 131.0})
    assert not slower["reproduced"] and slower["change"] == pytest.approx(0.30)
    assert not reproduction(100.0, None, {"median": 70.0, "p90": 71.0})["reproduced"]
    # A noisy run (its p90 20 % over its median) cannot call a 30 % change a difference.
    noisy_again = reproduction(100.0, 101.0, {"median": 130.0, "p90": 156.0})
    assert noisy_again["reproduced"] and noisy_again["tolerance"] == pytest.approx(0.40)
    noisy_record = reproduction(100.0, 120.0, {"median": 130.0, "p90": 131.0})
    assert noisy_record["reproduced"] and noisy_record["tolerance"] == pytest.approx(0.40)


@pytest.mark.slow  # the optimize run behind it: 90-110 s
def test_a_rerun_resumes_and_an_over_budget_candidate_is_never_picked(optimized):
    out, _, _ = optimized
    before = {v.id: v.created for v in read_manifest(out).variants}
    events = []
    result = optimize(out, out, max_drift=["psnr=1000"], progress=events.append, **OPTIONS)
    lines = [e.detail for e in events]
    assert "onnx:int8: already built" in lines and "openvino:int8: already built" in lines
    assert {v.id: v.created for v in read_manifest(out).variants} == before  # nothing rebuilt
    for label in CANDIDATES:
        assert result.skipped[label].startswith("over the drift budget, never selectable")
    assert all(choice.precision == "fp32" for choice in result.plan)
    assert all(c.precision == "fp32" for c in kiln.load(out, verify=False).plan)


@pytest.mark.slow  # 90 s; the default run stays under 30 min
def test_budget_minutes_is_honoured_and_an_interrupted_build_resumes(both_targets, tmp_path):
    out = tmp_path / "sd1"
    result = optimize(both_targets, out, budget_minutes=0, **OPTIONS)
    assert result.stopped_by_budget
    assert all("time budget" in result.skipped[c] for c in CANDIDATES)
    assert {v.precision.value for v in read_manifest(out).variants} == {"fp32"}

    def stop_after_the_first(event):
        if event.stage == "done":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(out, out, quant_progress=stop_after_the_first, **OPTIONS)
    first = [v for v in read_manifest(out).variants if v.precision.value != "fp32"]
    assert len(first) == 1
    events = []
    optimize(out, out, quant_progress=events.append, keep="best", **OPTIONS)
    rebuilt = [e.detail for e in events if e.stage == "done"]
    assert not any(d.startswith(first[0].id + ":") for d in rebuilt) and rebuilt
    manifest = read_manifest(out)
    plan = kiln.load(out).plan  # --keep best left a loadable, verified artifact
    kept = {v.id for v in manifest.variants if v.precision.value != "fp32"}
    assert kept <= {c.variant_id for c in plan}


def test_candidate_text_and_frontier():
    assert Candidate.parse("openvino:int8-static").label == "openvino:int8-static"
    with pytest.raises(InvalidRequestError, match="TARGET:PRECISION"):
        Candidate.parse("int8")
    from kiln.profiles.targets import builtin_targets

    for target in builtin_targets():  # every target file's candidates parse
        for text in target.optimize_candidates:
            assert Candidate.parse(text).label == text
    assert (
        "openvino:int8"
        in next(t for t in builtin_targets() if t.name == "x86-cpu-avx512").optimize_candidates
    )
    points = [
        {"plan": "a", "end_to_end_ms": 10.0, "peak_rss_bytes": 5, "drift": {"psnr": 30.0}},
        {"plan": "b", "end_to_end_ms": 12.0, "peak_rss_bytes": 6, "drift": {"psnr": 25.0}},
        {"plan": "c", "end_to_end_ms": 20.0, "peak_rss_bytes": 5, "drift": None},
    ]
    marks = {p["plan"]: p["frontier"] for p in frontier(points)}
    assert marks == {"a": True, "b": False, "c": True}  # b: slower, worse and bigger than a


def test_cli_refuses_bad_input_in_one_line(tmp_path):
    missing = run_kiln("optimize", tmp_path / "nope", "-o", tmp_path / "o")
    assert_user_error(missing)
    keep = run_kiln("optimize", "x", "-o", tmp_path / "o", "--keep", "some")
    assert_user_error(keep, "--keep must be all or best")
    assert not (tmp_path / "o").exists()


def test_copying_an_artifact_leaves_the_original_alone(both_targets, tmp_path):
    before = sorted(p.name for p in both_targets.iterdir())
    out = tmp_path / "copy"
    optimize(both_targets, out, budget_minutes=0, **OPTIONS)
    assert sorted(p.name for p in both_targets.iterdir()) == before
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".*.partial"))
    shutil.rmtree(out)
