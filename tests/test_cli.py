"""The `kiln` command as a user runs it: exit codes, one-line errors, files written."""

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import assert_user_error, run_kiln
from PIL import Image


def test_export_of_a_missing_path(tmp_path):
    assert_user_error(
        run_kiln("export", tmp_path / "nope", "-o", tmp_path / "out"), "does not exist"
    )


def test_export_of_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    assert_user_error(
        run_kiln("export", tmp_path / "photos", "-o", tmp_path / "out"), "not a model folder"
    )


def test_export_of_an_unsupported_architecture(tmp_path):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"]}))
    assert_user_error(run_kiln("export", model, "-o", tmp_path / "out"), "BertForMaskedLM")
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert_user_error(run_kiln("export", flux, "-o", tmp_path / "out"), "FluxPipeline")


def test_export_of_a_pickle_checkpoint(tmp_path):
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"\x80\x04not really")
    assert_user_error(run_kiln("export", checkpoint, "-o", tmp_path / "out"), "safetensors")


def test_export_of_malformed_json_configs(tmp_path):
    cases = [
        ("model_index.json", "{not json", "model_index.json is not valid JSON"),
        ("model_index.json", "[]", "model_index.json holds a JSON list"),
        ("config.json", "\xff\xfe", "config.json"),
    ]
    for index, (name, text, fragment) in enumerate(cases):
        model = tmp_path / f"model-{index}"
        model.mkdir()
        (model / name).write_text(text, encoding="latin-1")
        out = tmp_path / f"out-{index}"
        assert_user_error(run_kiln("export", model, "-o", out), fragment)
        assert not out.exists()


def test_output_paths_with_a_file_in_the_way(artifacts, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    for out, fragment in [(blocker, "is a file"), (blocker / "sub", "is under")]:
        result = run_kiln("export", artifacts.models["sd1"], "-o", out)
        assert_user_error(result, "export folder", fragment)
    assert_user_error(run_kiln("demo", "-o", blocker), "demo folder", "is a file")
    assert_user_error(
        run_kiln("generate", artifacts["sd1"], "x", "-o", blocker / "x.png"), "--output"
    )
    assert_user_error(run_kiln("generate", artifacts["sd1"], "x", "-o", tmp_path), "is a folder")
    assert_user_error(
        run_kiln("bench", "run", artifacts["sd1"], "--json", blocker / "b.json"), "--json"
    )
    assert blocker.read_text() == "keep me"


def test_generate_writes_a_png_and_inspect_reports(artifacts, tmp_path):
    image = tmp_path / "out.png"
    result = run_kiln(
        "generate",
        artifacts["sd1"],
        "a red cube",
        "-o",
        image,
        "--steps",
        "3",
        "--seed",
        "4",
        "--scheduler",
        "euler_a",
        "--num-images",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "seed 4" in result.stdout
    assert Image.open(image).size == (128, 128)
    assert Image.open(tmp_path / "out-1.png").size == (128, 128)

    listing = run_kiln("inspect", artifacts["sd1"], "--verify")
    assert listing.returncode == 0, listing.stderr
    assert "unet" in listing.stdout and "all files match" in listing.stdout
    data = json.loads(run_kiln("inspect", artifacts["sd1"], "--json").stdout)
    assert {v["component"] for v in data["variants"]} == {
        "text_encoder",
        "unet",
        "vae_encoder",
        "vae_decoder",
    }


def test_generate_plan_only(artifacts):
    result = run_kiln("generate", artifacts["sd1"], "x", "--plan-only", "--prefer", "onnx:fp32")
    assert result.returncode == 0, result.stderr
    assert "preferred by the caller" in result.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--width", "130"], "width 130 is outside"),
        (["--steps", "0"], "steps must be between"),
        (["--scheduler", "nope"], "unknown scheduler"),
        (["--init-image", "/no/such.png"], "does not exist"),
        (["--require", "tensorrt:fp16"], "no runnable variant"),
        (["--prefer", "onnx:fp7"], "unknown precision"),
    ],
)
def test_generate_bad_arguments(artifacts, tmp_path, args, fragment):
    assert_user_error(
        run_kiln("generate", artifacts["sd1"], "x", "-o", tmp_path / "x.png", *args), fragment
    )
    assert not (tmp_path / "x.png").exists()


def test_generate_on_a_missing_or_tampered_artifact(artifacts, tmp_path):
    import shutil

    assert_user_error(run_kiln("generate", tmp_path / "none", "x"), "does not exist")
    copy = tmp_path / "copy"
    shutil.copytree(artifacts["sd1"], copy)
    data = copy / "unet" / "onnx-fp32" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:-10])
    assert_user_error(run_kiln("generate", copy, "x"), "unet/onnx-fp32/model.onnx.data")


def test_doctor_json_reports_this_machine():
    result = run_kiln("doctor", "--json")
    assert result.returncode == 0, result.stderr
    profile = json.loads(result.stdout)["profile"]
    assert profile["cpu"]["architecture"]
    names = {r["name"]: r for r in profile["runtimes"]}
    assert names["onnxruntime"]["available"] is True


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    result = run_kiln("demo", "--out", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    report = tmp_path / "demo"
    assert Image.open(report / "demo.png").size[0] > 512
    assert Image.open(report / "kiln.png").size == (64, 64)
    assert "sees a red circle on a blue background" in result.stdout
    assert "caption says the prompt?" in result.stdout
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep")
    assert_user_error(run_kiln("demo", "--out", tmp_path / "mine"), "not made by `kiln demo`")
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep"


def test_demo_refuses_bad_requests_before_any_work(tmp_path):
    out = tmp_path / "demo"
    assert_user_error(run_kiln("demo", "-o", out, "--prompt", "a cat"), "not a shapes-world")
    assert_user_error(run_kiln("demo", "-o", out, "--steps", "0"), "steps must be between")
    assert not out.exists()


def test_demo_owns_only_its_own_folder(tmp_path):
    from kiln.demo import DEMO_MARKER, _claim_folder

    _claim_folder(tmp_path / "fresh")
    assert (tmp_path / "fresh" / DEMO_MARKER).exists()
    (tmp_path / "fresh" / "model").mkdir()
    _claim_folder(tmp_path / "fresh")  # an earlier demo's folder is reused


def test_doctor_exits_zero_without_openvino(tmp_path):
    # A module named openvino that fails to import stands in for an uninstalled one.
    (tmp_path / "openvino.py").write_text("raise ImportError('No module named openvino')\n")
    env_path = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-m", "kiln.cli", "doctor", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": env_path},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    runtimes = {r["name"]: r for r in json.loads(result.stdout)["profile"]["runtimes"]}
    assert runtimes["openvino"]["available"] is False
    assert runtimes["onnxruntime"]["available"] is True
