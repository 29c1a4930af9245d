"""`kiln export` and `kiln caption` on a tiny BLIP, as a user runs them."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cli_helpers import assert_user_error, run_kiln  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import BlipForConditionalGeneration, BlipProcessor  # noqa: E402

from kiln.models.tiny_captioning import save_model  # noqa: E402


@pytest.fixture(scope="module")
def blip_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip-cli")
    model_dir = save_model("blip", root / "model", seed=0)
    artifact = root / "artifact"
    result = run_kiln("export", model_dir, "-o", artifact)
    assert result.returncode == 0, result.stderr
    assert "text_decoder" in result.stderr + result.stdout
    rng = np.random.default_rng(1)
    images = []
    for index, (h, w) in enumerate([(48, 64), (30, 30)]):
        path = root / f"image{index}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return model_dir, artifact, images


def _expected(model_dir, images, prompt=None, seed=None, **options):
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = BlipProcessor.from_pretrained(model_dir)
    pictures = [Image.open(p).convert("RGB") for p in images]
    prompts = None if prompt is None else [prompt] * len(pictures)
    inputs = processor(images=pictures, text=prompts, return_tensors="pt", padding=True)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(**inputs, **options).tolist()


def test_caption_beam_search_with_prompt_as_json(blip_setup):
    model_dir, artifact, images = blip_setup
    result = run_kiln(
        "caption", artifact, *images, "--prompt", "a photo of", "--num-beams", "3",
        "--max-new-tokens", "10", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sequences"] == _expected(
        model_dir, images, prompt="a photo of", num_beams=3, max_new_tokens=10
    )
    assert [len(c) for c in data["captions"]] == [1, 1]
    assert all(c[0].startswith("a photo of") for c in data["captions"])


def test_caption_sampling_with_seed_and_several_captions(blip_setup):
    model_dir, artifact, images = blip_setup
    result = run_kiln(
        "caption", artifact, *images, "--do-sample", "--top-k", "10", "--top-p", "0.9",
        "--temperature", "1.2", "--num-captions", "2", "--seed", "5", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["sequences"] == _expected(
        model_dir, images, seed=5, do_sample=True, top_k=10, top_p=0.9, temperature=1.2,
        num_return_sequences=2, max_new_tokens=20,
    )  # fmt: skip
    assert [len(c) for c in data["captions"]] == [2, 2]


def test_caption_text_output(blip_setup):
    _, artifact, images = blip_setup
    result = run_kiln("caption", artifact, images[0], "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{images[0]}: ")


def test_caption_errors_are_one_line(blip_setup, tmp_path):
    _, artifact, images = blip_setup
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(images[0].read_bytes()[:50])
    assert_user_error(run_kiln("caption", artifact, corrupt), "not a readable image")
    assert_user_error(
        run_kiln("caption", artifact, images[0], "--max-new-tokens", "999999"), "max_new_tokens"
    )
