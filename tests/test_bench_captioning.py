"""`kiln bench` on a tiny BLIP artifact: captioning figures, schema, ratios, caption drift."""

from __future__ import annotations

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import kiln  # noqa: E402
from kiln.artifacts import read_manifest  # noqa: E402
from kiln.bench import captioning  # noqa: E402
from kiln.bench.harness import VARIANT_FIGURES, plan_variants, run_bench  # noqa: E402
from kiln.bench.metrics import bleu  # noqa: E402
from kiln.bench.schema import SCHEMA_PATH, load_schema, validation_errors  # noqa: E402
from kiln.errors import InvalidRequestError  # noqa: E402
from kiln.models.tiny_captioning import save_model  # noqa: E402

TOKENS = 4


@pytest.fixture(scope="module")
def blip_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-blip")
    source = save_model("blip", root / "model", seed=0)
    kiln.export(source, root / "onnx")
    return root / "onnx"


@pytest.fixture(scope="module")
def bench(blip_artifact, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-blip-report")
    workload = captioning.build_workload(
        read_manifest(blip_artifact), max_new_tokens=[TOKENS], repeats=2, warmup=1
    )
    report = run_bench(
        blip_artifact,
        variants=["onnx:fp32"],
        baselines=["torch"],
        workload=workload,
        report_dir=folder / "report",
        json_path=folder / "a.json",
    )
    return report, folder


def _figures(variant):
    yield from variant["figures"].values()
    for case in variant["cases"]:
        yield from case["figures"].values()


def test_report_validates_and_every_figure_has_a_value_or_reason(bench):
    report, folder = bench
    assert validation_errors(report) == []
    assert json.loads((folder / "a.json").read_text()) == report
    assert report["status"] == "complete"
    assert report["artifact"]["family"] == "blip"
    assert report["workload"]["kind"] == "captioning"
    assert [v["id"] for v in report["variants"]] == ["torch", "onnx:fp32"]
    for variant in report["variants"]:
        assert variant["status"] == "ok", variant["reason"]
        assert set(variant["figures"]) == set(VARIANT_FIGURES) | set(captioning.QUALITY_FIGURES)
        accuracy = variant["figures"]["caption_accuracy"]
        assert accuracy["value"] is None and "kiln:shapes-blip" in accuracy["reason"]
        for case in variant["cases"]:
            assert set(case["figures"]) == set(captioning.CASE_FIGURES)
            assert len(case["captions"]) == 1 and case["images"]
        for figure in _figures(variant):
            assert (figure["value"] is None) == bool(figure["reason"])


def test_schema_file_is_valid_json_schema(bench):
    jsonschema = pytest.importorskip("jsonschema")
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(bench[0], schema)
    assert SCHEMA_PATH.name == "bench-report.v1.json"


def test_component_latencies_and_throughput_are_measured(bench):
    report, _ = bench
    for variant in report["variants"]:
        case = variant["cases"][0]
        figures = case["figures"]
        for name in (
            "first_call_s",
            "vision_encoder_ms",
            "cross_attention_kv_ms",
            "decoder_step_ms",
            "end_to_end_ms",
            "throughput_tokens_per_s",
        ):
            assert figures[name]["value"] > 0, (variant["id"], name, figures[name]["reason"])
        e2e = figures["end_to_end_ms"]["stats"]
        assert e2e["n"] == 2 and e2e["median"] <= e2e["p90"] <= e2e["p99"]
        # Forced length: exactly TOKENS decoder steps per caption, one caption per call.
        decoder = figures["decoder_step_ms"]["stats"]
        assert decoder["n"] == 2 * TOKENS
        rate = figures["throughput_tokens_per_s"]["stats"]["samples"]
        calls = figures["end_to_end_ms"]["stats"]["samples"]
        assert rate == pytest.approx([TOKENS * 1000 / ms for ms in calls])
        assert variant["figures"]["load_s"]["value"] > 0
        assert variant["figures"]["size_on_disk_bytes"]["value"] > 0
        assert variant["figures"]["peak_rss_bytes"]["value"] > 0


def test_ratios_refer_to_the_same_run_baseline(bench):
    report, _ = bench
    assert report["ratio_reference"] == {"variant": "torch", "reason": None}
    torch_variant, onnx = report["variants"]
    for name, figure in onnx["figures"].items():
        base = torch_variant["figures"][name]
        if figure["value"] is not None and base["value"]:
            assert figure["ratio"] == pytest.approx(figure["value"] / base["value"])
    for name, figure in onnx["cases"][0]["figures"].items():
        base = torch_variant["cases"][0]["figures"][name]
        if name in captioning.NO_RATIO:
            assert figure["ratio"] is None
        else:
            assert figure["ratio"] == pytest.approx(figure["value"] / base["value"])
    assert torch_variant["cases"][0]["figures"]["end_to_end_ms"]["ratio"] == 1.0


def test_fp32_captions_agree_exactly_with_the_baseline(bench):
    report, _ = bench
    assert report["drift_reference"]["variant"] == "torch"
    torch_variant, onnx = report["variants"]
    figures = onnx["cases"][0]["figures"]
    assert figures["drift_exact_match"]["value"] == 1.0
    assert figures["drift_bleu"]["value"] == pytest.approx(1.0)
    assert onnx["cases"][0]["captions"] == torch_variant["cases"][0]["captions"]
    assert "drift reference" in torch_variant["cases"][0]["figures"]["drift_bleu"]["reason"]


def test_html_report_and_table(bench):
    from kiln.bench.report import table, write_html_report

    report, folder = bench
    paths = write_html_report(report, folder / "report")
    page = paths["html"].read_text()
    assert "exact match" in page and "captioned images" in page
    assert paths["components"].stat().st_size > 0
    quality = len(captioning.QUALITY_FIGURES)
    assert table(report).row_count == len(captioning.CASE_FIGURES) + len(VARIANT_FIGURES) + quality


def test_bleu():
    assert bleu([[1, 2, 3, 4, 5]], [[1, 2, 3, 4, 5]]) == 1.0
    assert bleu([[1, 2]], [[1, 2]]) == 1.0
    assert bleu([[9, 9, 9]], [[1, 2, 3]]) == 0.0
    partial = bleu([[1, 2, 3, 4, 6]], [[1, 2, 3, 4, 5]])
    assert 0.0 < partial < 1.0
    assert bleu([[1, 2]], [[1, 2, 3, 4]]) < 1.0  # brevity penalty


def test_synthetic_images_are_deterministic():
    a = captioning.synthetic_image(40, 24, seed=3, index=1)
    b = captioning.synthetic_image(40, 24, seed=3, index=1)
    c = captioning.synthetic_image(40, 24, seed=4, index=1)
    assert a.size == (40, 24) and a.tobytes() == b.tobytes() != c.tobytes()


def test_workload_options(blip_artifact):
    manifest = read_manifest(blip_artifact)
    workload = captioning.build_workload(
        manifest, sizes=["64x48"], num_beams=[1, 2], max_new_tokens=[3], prompt="a photo of"
    )
    assert [c.id for c in workload.cases] == ["64x48-b1-beams1-3tok", "64x48-b1-beams2-3tok"]
    assert workload.cases[1].options() == {"num_beams": 2, "max_new_tokens": 3, "min_new_tokens": 3}
    free = captioning.build_workload(manifest, force_tokens=False)
    assert free.cases[0].min_new_tokens is None and free.cases[0].id.endswith("-free")
    with pytest.raises(InvalidRequestError, match="steps"):
        captioning.build_workload(manifest, steps=[4])
    data = workload.to_dict()
    assert captioning.CaptionWorkload.from_dict(data) == workload


def test_prefer_adds_the_auto_variant_and_torch_compile_is_skipped(blip_artifact):
    manifest = read_manifest(blip_artifact)
    planned = plan_variants(
        manifest, ["onnx:fp32"], baselines=["torch", "torch-compile"], prefer=["onnx:fp32"]
    )
    by_id = {v.id: v for v in planned}
    assert list(by_id) == ["torch", "torch-compile", "onnx:fp32", "auto"]
    assert by_id["auto"].prefer == ("onnx:fp32",) and by_id["auto"].skip_reason is None
    assert by_id["onnx:fp32"].prefer == ()
    assert "torch-compile" in by_id["torch-compile"].skip_reason


def test_cli_runs_a_captioning_bench_with_prefer(blip_artifact, tmp_path):
    from kiln.bench.cli import bench_app

    out = tmp_path / "cli.json"
    result = CliRunner().invoke(
        bench_app,
        [
            str(blip_artifact),
            "--baseline",
            "none",
            "--prefer",
            "onnx:fp32",
            "--max-new-tokens",
            "2",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert validation_errors(report) == []
    assert [v["id"] for v in report["variants"]] == ["onnx:fp32", "auto"]
    auto = report["variants"][1]
    assert auto["prefer"] == ["onnx:fp32"] and auto["status"] == "ok"
    # Without a baseline, the all-fp32 variant is the drift reference.
    assert report["drift_reference"]["variant"] == "onnx:fp32"
    assert auto["cases"][0]["figures"]["drift_exact_match"]["value"] == 1.0
    assert "tokens/s" in result.output
