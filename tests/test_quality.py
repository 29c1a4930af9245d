"""Judged quality on the shapes world: per bench variant, and as drift when quantizing.

The built-in trained models are the only ones the judge can read (`kiln.bench.quality`); a
quantized variant that loses more than 5 points of judged quality against fp32 is kept out of
selection by the default budget, however good its PSNR.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

import kiln
from kiln.artifacts import read_manifest
from kiln.bench import captioning
from kiln.bench.harness import run_bench
from kiln.bench.schema import validation_errors
from kiln.bench.workload import build_workload
from kiln.profiles.select import DEFAULT_DRIFT_BUDGET, drift_problem

JUDGED_FLOOR = 0.8
CAPTION_FLOOR = 0.9


def test_bench_judges_the_artifact_and_the_pytorch_source(shapes_artifacts, tmp_path):
    report = run_bench(
        shapes_artifacts["shapes-sd"],
        variants=["onnx:fp32"],
        baselines=["torch"],
        workload=build_workload(64, steps=[2], repeats=1, warmup=1),
        json_path=tmp_path / "bench.json",
    )
    assert validation_errors(report) == []
    judged = {v["id"]: v["figures"]["judged_correct"] for v in report["variants"]}
    assert set(judged) == {"torch", "onnx:fp32"}
    for figure in judged.values():
        assert figure["value"] >= JUDGED_FLOOR, figure
        assert figure["unit"] == "fraction" and figure["ratio"] is None
    # fp32 ONNX draws what PyTorch draws: at most one of the 18 prompts may flip.
    assert abs(judged["torch"]["value"] - judged["onnx:fp32"]["value"]) <= 1 / 18 + 1e-9


def test_bench_scores_captions_of_held_out_scenes(shapes_artifacts, tmp_path):
    artifact = shapes_artifacts["shapes-blip"]
    report = run_bench(
        artifact,
        variants=["onnx:fp32"],
        baselines=["torch"],
        workload=captioning.build_workload(
            read_manifest(artifact), max_new_tokens=[4], repeats=1, warmup=1
        ),
        json_path=tmp_path / "bench.json",
    )
    assert validation_errors(report) == []
    accuracy = {v["id"]: v["figures"]["caption_accuracy"]["value"] for v in report["variants"]}
    assert accuracy["torch"] >= CAPTION_FLOOR and accuracy["onnx:fp32"] == accuracy["torch"]


def test_quantize_records_judged_quality_and_selection_reads_it(shapes_artifacts, tmp_path):
    artifact = tmp_path / "sd"
    shutil.copytree(shapes_artifacts["shapes-sd"], artifact)
    manifest = kiln.quantize(artifact, "int8", components=["unet"], calibration=4)
    (variant,) = [v for v in manifest.variants if v.precision.value == "int8"]
    drift = variant.drift
    assert drift["judged_correct_fp32"] >= JUDGED_FLOOR
    assert drift["judged_correct_drop"] == pytest.approx(
        drift["judged_correct_fp32"] - drift["judged_correct"]
    )
    worse = replace(variant, drift={**drift, "psnr": 40.0, "judged_correct_drop": 0.11})
    assert drift_problem(worse, DEFAULT_DRIFT_BUDGET) == "judged_correct_drop 0.11 > budget 0.05"
    assert (
        drift_problem(
            replace(variant, drift={**drift, "judged_correct_drop": 0.0, "psnr": 40.0}),
            DEFAULT_DRIFT_BUDGET,
        )
        == ""
    )
