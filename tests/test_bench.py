"""`kiln bench` on the tiny SD 1.x artifact: figures, schema, ratios, plots, compare, record."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from kiln.bench import diffusion
from kiln.bench.compare import compare_reports, regressions
from kiln.bench.harness import CASE_FIGURES, VARIANT_FIGURES, record_measurements, run_bench
from kiln.bench.metrics import psnr, ssim, summarize
from kiln.bench.schema import SCHEMA_PATH, load_schema, validation_errors
from kiln.bench.workload import build_workload

# A worker whose onnxruntime sessions sleep 0.2 s per call: a deliberately slowed variant.
SLOW_WORKER = [
    sys.executable,
    "-c",
    "import runpy, time\n"
    "import kiln.runtimes.onnxruntime as ort_session\n"
    "fast = ort_session.OnnxRuntimeSession.run\n"
    "def slow(self, inputs):\n"
    "    time.sleep(0.2)\n"
    "    return fast(self, inputs)\n"
    "ort_session.OnnxRuntimeSession.run = slow\n"
    "runpy.run_module('kiln.bench.worker', run_name='__main__')\n",
]


def _workload():
    return build_workload(128, steps=[2], repeats=2, warmup=1)


@pytest.fixture(scope="module")
def bench(artifacts, tmp_path_factory):
    """One full run: PyTorch eager baseline + the onnx:fp32 variant, with plots and HTML."""
    folder = tmp_path_factory.mktemp("bench")
    report = run_bench(
        artifacts["sd1"],
        variants=["onnx:fp32"],
        baselines=["torch"],
        workload=_workload(),
        report_dir=folder / "report",
        json_path=folder / "a.json",
    )
    return report, folder


def _assert_complete_figures(variant, cases):
    assert set(variant["figures"]) == set(VARIANT_FIGURES) | set(diffusion.QUALITY_FIGURES)
    judged = variant["figures"]["judged_correct"]
    if variant["status"] == "ok":  # the judge reads only the shapes world
        assert judged["value"] is None and "shapes-world model kiln:shapes-sd" in judged["reason"]
    assert [c["case"] for c in variant["cases"]] == cases
    for case in variant["cases"]:
        assert set(case["figures"]) == set(CASE_FIGURES)
    for figure in [
        *variant["figures"].values(),
        *(f for c in variant["cases"] for f in c["figures"].values()),
    ]:
        assert (figure["value"] is None) != (figure["reason"] is None), figure
        assert len(figure["fingerprint"]) == 16


@pytest.mark.slow
def test_report_validates_and_has_every_figure(bench):
    report, folder = bench
    assert validation_errors(report) == []
    on_disk = json.loads((folder / "a.json").read_text())
    assert validation_errors(on_disk) == []
    assert on_disk["status"] == "complete"
    assert [v["id"] for v in report["variants"]] == ["torch", "onnx:fp32"]
    cases = [c["id"] for c in report["workload"]["cases"]]
    for variant in report["variants"]:
        assert variant["status"] == "ok", variant["reason"]
        assert (
            variant["versions"]["kiln"]
            and variant["fingerprint"] == report["hardware"]["fingerprint"]
        )
        _assert_complete_figures(variant, cases)
        figures = {**variant["figures"], **variant["cases"][0]["figures"]}
        for name in (
            "load_s",
            "first_call_s",
            "text_encoder_ms",
            "unet_step_ms",
            "vae_decode_ms",
            "end_to_end_ms",
            "throughput_images_per_s",
            "peak_rss_bytes",
            "size_on_disk_bytes",
        ):
            assert figures[name]["value"] > 0, name
        stats = figures["end_to_end_ms"]["stats"]
        assert stats["n"] == 2 and stats["median"] <= stats["p90"] <= stats["p99"]
        if not report["hardware"]["gpus"]:
            assert figures["peak_vram_bytes"] == {
                **figures["peak_vram_bytes"],
                "value": None,
                "reason": "no GPU",
            }


@pytest.mark.slow
def test_ratios_refer_to_eager_from_the_same_run(bench):
    report, _ = bench
    assert report["ratio_reference"] == {"variant": "torch", "reason": None}
    torch_case, onnx_case = (v["cases"][0]["figures"] for v in report["variants"])
    for name in ("end_to_end_ms", "unet_step_ms", "first_call_s", "throughput_images_per_s"):
        assert torch_case[name]["ratio"] == 1.0
        expected = onnx_case[name]["value"] / torch_case[name]["value"]
        assert onnx_case[name]["ratio"] == pytest.approx(expected)
    onnx = report["variants"][1]
    assert onnx["figures"]["load_s"]["ratio"] == pytest.approx(
        onnx["figures"]["load_s"]["value"] / report["variants"][0]["figures"]["load_s"]["value"]
    )


@pytest.mark.slow
def test_drift_against_the_eager_image(bench):
    report, _ = bench
    assert report["drift_reference"]["variant"] == "torch"
    torch_case, onnx_case = (v["cases"][0]["figures"] for v in report["variants"])
    assert "drift reference" in torch_case["drift_psnr_db"]["reason"]
    assert onnx_case["drift_psnr_db"]["value"] is None or onnx_case["drift_psnr_db"]["value"] > 35
    assert onnx_case["drift_ssim"]["value"] > 0.99


@pytest.mark.slow
def test_plots_html_and_images_are_written(bench):
    report, folder = bench
    from kiln.bench.report import table, write_html_report

    paths = write_html_report(report, folder / "report")
    for key in ("latency", "components", "html"):
        assert paths[key].stat().st_size > 1000, key
    assert paths["latency"].read_bytes()[:4] == b"\x89PNG"
    html = paths["html"].read_text()
    assert "latency_vs_size.png" in html and "components.png" in html and "<table>" in html
    assert "http://" not in html and "https://" not in html
    for variant in report["variants"]:
        image = variant["cases"][0]["images"][0]
        assert image in html and (folder / "report" / image).stat().st_size > 0
    assert table(report).row_count == 13
    lines = paths["markdown"].read_text().splitlines()
    assert lines[0].startswith("| variant | case | load |") and len(lines) == 2 + len(
        report["variants"]
    )
    # Past four variants the terminal table turns to a row per variant.
    many = {**report, "variants": report["variants"] * 3}
    wide = table(many)
    assert wide.row_count == 3 * len(report["variants"]) and wide.columns[0].header == "variant"


@pytest.mark.slow
def test_compare_flags_a_slowed_variant(bench, artifacts, tmp_path):
    report, folder = bench
    slowed = run_bench(
        artifacts["sd1"],
        variants=["onnx:fp32"],
        baselines=[],
        workload=_workload(),
        json_path=tmp_path / "b.json",
        worker_command=SLOW_WORKER,
    )
    assert validation_errors(slowed) == []
    assert slowed["ratio_reference"]["variant"] is None and slowed["ratio_reference"]["reason"]
    flagged = {(c.variant, c.figure) for c in regressions(compare_reports(report, slowed))}
    assert ("onnx:fp32", "end_to_end_ms") in flagged
    assert ("onnx:fp32", "unet_step_ms") in flagged
    assert not regressions(compare_reports(report, report))

    from kiln.cli import app

    result = CliRunner().invoke(
        app, ["bench", "compare", str(folder / "a.json"), str(tmp_path / "b.json")]
    )
    assert result.exit_code == 1, result.output
    assert "regression" in result.output
    same = CliRunner().invoke(
        app, ["bench", "compare", str(folder / "a.json"), str(folder / "a.json")]
    )
    assert same.exit_code == 0, same.output


@pytest.mark.slow  # 50 s; the default run stays under 30 min
def test_interrupt_leaves_a_valid_partial_report(artifacts, tmp_path):
    def stop_before_second(event):
        if event["event"] == "variant" and event["index"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(
            artifacts["sd1"],
            variants=["onnx:fp32", "auto"],
            baselines=[],
            workload=build_workload(128, steps=[1], repeats=1, warmup=1),
            json_path=tmp_path / "partial.json",
            on_event=stop_before_second,
        )
    report = json.loads((tmp_path / "partial.json").read_text())
    assert validation_errors(report) == []
    assert report["status"] == "interrupted"
    first, second = report["variants"]
    assert first["status"] == "ok"
    assert second["status"] == "interrupted" and second["reason"]
    _assert_complete_figures(second, [c["id"] for c in report["workload"]["cases"]])
    assert report["ratio_reference"]["variant"] is None


def test_missing_source_skips_the_baseline_with_a_reason(artifacts, tmp_path):
    from kiln.artifacts import read_manifest, write_manifest
    from kiln.bench.harness import plan_variants

    copy = tmp_path / "art"
    shutil.copytree(artifacts["sd1"], copy)
    manifest = read_manifest(copy)
    from dataclasses import replace

    write_manifest(
        copy, replace(manifest, source={**manifest.source, "id": str(tmp_path / "gone")})
    )
    planned = plan_variants(read_manifest(copy), [], ["torch-compile"])
    assert [v.id for v in planned] == ["torch", "torch-compile", "onnx:fp32"]
    assert all("not available" in v.skip_reason for v in planned[:2])
    assert planned[2].skip_reason is None


@pytest.mark.slow
def test_record_writes_measurements_that_selection_reads(bench, artifacts, tmp_path):
    report, _ = bench
    from kiln.artifacts import read_manifest

    copy = tmp_path / "art"
    shutil.copytree(artifacts["sd1"], copy)
    entries = record_measurements(copy, report)
    fingerprint = report["hardware"]["fingerprint"]
    measured = read_manifest(copy).measurements[fingerprint]
    assert set(entries) <= set(measured)
    assert measured["unet/onnx/fp32"]["median_ms"] > 0
    assert measured["unet/onnx/fp32"]["bench_variant"] == "onnx:fp32"


def test_schema_file_and_validator():
    schema = load_schema()
    assert (
        SCHEMA_PATH.name == "bench-report.v1.json"
        and schema["properties"]["schema_version"]["const"] == 1
    )
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        jsonschema.Draft202012Validator.check_schema(schema)
    assert validation_errors({"schema": "kiln.bench-report"})  # missing everything


def test_metrics():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert ssim(a, a) == pytest.approx(1.0)
    assert psnr(a, a) == float("inf")
    noisy = np.clip(a + rng.normal(0, 30, a.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(a, noisy) < 0.95
    stats = summarize([10.0, 11.0, 12.0])
    assert stats["median"] == 11.0 and stats["n"] == 3 and stats["noise"] > 0


def test_cli_routes_to_run_and_compare():
    from kiln.cli import app

    result = CliRunner().invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "compare" in result.output and "run" in result.output
    result = CliRunner().invoke(app, ["bench", "/nonexistent/artifact"])
    assert result.exit_code != 0


def test_objective_reaches_the_plan_and_a_bad_one_fails_first(artifacts, tmp_path):
    from kiln.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="unknown objective 'fastest'"):
        run_bench(artifacts["sd1"], objective="fastest", baselines=())
    report = run_bench(
        artifacts["sd1"],
        variants=["onnx:fp32"],
        baselines=(),
        objective="memory",
        workload=build_workload(128, steps=[2], repeats=1, warmup=1),
        json_path=tmp_path / "memory.json",
    )
    (variant,) = report["variants"]
    assert all("smallest runnable variant" in row["reason"] for row in variant["plan"])
