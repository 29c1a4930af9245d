"""`kiln grid`: up to three generate() options swept at one seed into one labelled image."""

import json
import shutil

import numpy as np
import pytest
from cli_helpers import assert_user_error, run_kiln
from PIL import Image

import kiln
from kiln.pipelines.grid import Axis, parse_axis, plan_cells, run_grid

VARIANTS = "variant=onnx:fp32,unet=onnx:fp16"


@pytest.fixture(scope="module")
def two_variants(artifacts, tmp_path_factory):
    """The tiny SD1 artifact with an fp16 UNet beside the fp32 one."""
    folder = tmp_path_factory.mktemp("grid") / "sd1"
    shutil.copytree(artifacts["sd1"], folder)
    kiln.quantize(folder, "fp16", components=["unet"])
    return folder


def test_a_2x2x2_grid_has_its_cells_labels_and_each_equals_kiln_generate(two_variants, tmp_path):
    out = tmp_path / "grid"
    result = run_kiln(
        "grid", two_variants, "--prompt", "a red cube", "--prompt", "a blue ball",
        "--vary", "steps=1,2", "--vary", VARIANTS, "--guidance", 6,
        "--width", 64, "--height", 64, "-o", out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "grid.json").read_text())
    assert [a["name"] for a in summary["axes"]] == ["prompt", "steps", "variant"]
    cells = summary["cells"]
    assert len(cells) == 8 and len({tuple(c["coords"]) for c in cells}) == 8
    seed = cells[0]["seed"]  # drawn once when not given: every cell has it
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    deployments = {}
    for cell in cells:
        image = np.asarray(Image.open(out / cell["file"]).convert("RGB"))
        x0, y0, x1, y1 = cell["box"]
        assert np.array_equal(grid[y0:y1, x0:x1], image), cell["file"]
        params = dict(cell["params"])
        variant = params.pop("variant")
        if variant not in deployments:
            deployments[variant] = kiln.load(two_variants, require=[variant])
        expected = deployments[variant].generate(**params).images[0]
        assert np.array_equal(np.asarray(expected), image), cell["params"]
        saved = json.loads((out / cell["file"].replace(".png", ".json")).read_text())
        assert saved["params"] == cell["params"] and saved["seed"] == seed
        if variant == "onnx:fp32":
            assert "psnr_vs_first_variant" not in cell
        else:
            assert cell["identical_to_first_variant"] or cell["psnr_vs_first_variant"] > 20
    assert result.stdout.count("vs first variant") + result.stdout.count("identical") == 4
    assert grid.shape[1] > 2 * 2 * 64 and grid.shape[0] > 2 * 64  # room for the labels


def test_a_one_axis_grid_without_variants_has_no_scores(artifacts, tmp_path):
    deployment = kiln.load(artifacts["sd1"])
    fixed = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}
    result = run_grid(
        lambda variant: deployment, [parse_axis("scheduler=euler,ddim")], fixed, tmp_path
    )
    assert [c["params"]["scheduler"] for c in result.cells] == ["euler", "ddim"]
    assert all("psnr_vs_first_variant" not in c for c in result.cells)
    grid = Image.open(result.grid_path)
    assert grid.width >= 2 * 64 and grid.height > 64


def test_a_variant_the_artifact_lacks_is_refused_before_anything_is_written(artifacts, tmp_path):
    out = tmp_path / "g"
    flags = ("--vary", "variant=onnx:fp32,openvino:int8", "--width", 64, "--height", 64)
    result = run_kiln("grid", artifacts["sd1"], "--prompt", "p", *flags, "-o", out)
    assert_user_error(result, "openvino")
    assert not out.exists()


def test_axes_parse_as_the_option_takes_them():
    assert parse_axis("steps=4,8,16") == Axis("steps", (4, 8, 16))
    assert parse_axis("guidance=3,7.5") == Axis("guidance_scale", (3.0, 7.5))
    cells = plan_cells([parse_axis("steps=1,2"), parse_axis("seed=1,2,3")], {"prompt": "p"})
    assert [c.coords for c in cells[:3]] == [(0, 0), (1, 0), (0, 1)]  # X varies fastest
    assert cells[1].params == {"prompt": "p", "steps": 2, "seed": 1}


@pytest.mark.parametrize(
    ("vary", "message"),
    [
        (["bogus=1,2"], "expected OPTION=V1,V2"),
        (["steps=a,b"], "steps takes int values"),
        (["steps=4,4"], "a value is repeated"),
        (["steps=1,2", "seed=1,2", "guidance=1,2", "width=64,128"], "1 to 3 axes"),
        (["steps=1,2", "steps=3,4"], "an option is varied twice"),
    ],
)
def test_bad_grids_are_refused_in_one_line(artifacts, tmp_path, vary, message):
    flags = [part for text in vary for part in ("--vary", text)]
    result = run_kiln("grid", artifacts["sd1"], "--prompt", "p", *flags, "-o", tmp_path / "g")
    assert_user_error(result, message)
    assert not (tmp_path / "g").exists()
