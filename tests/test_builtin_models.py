"""The built-in trained models (`kiln:shapes-sd`, `kiln:shapes-blip`): loadable by the libraries,
small, and as good as their training notes say on held-out shapes-world inputs.

The quality floors are the issue's: at least 80% of held-out prompts drawn correctly (judged by
`kiln.bench.judge`, no model) and at least 90% of held-out scenes captioned exactly. Both are
measured in PyTorch fp32, the source the artifacts are checked against.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_kiln

from kiln.bench import quality
from kiln.errors import SourceError
from kiln.models.builtin import MODELS, builtin_path, content_hash
from kiln.models.sources import load_source

WEIGHT_BUDGET_BYTES = 20 * 10**6
JUDGED_FLOOR = 0.8
CAPTION_FLOOR = 0.9


def test_weights_fit_the_repository_budget():
    weights = [
        path
        for name in MODELS
        for path in builtin_path(name).rglob("*")
        if path.suffix in (".safetensors", ".bin")
    ]
    assert {p.suffix for p in weights} == {".safetensors"}
    assert sum(p.stat().st_size for p in weights) <= WEIGHT_BUDGET_BYTES


def test_training_notes_are_recorded():
    for name in MODELS:
        notes = json.loads((builtin_path(name) / "kiln_training.json").read_text())
        assert notes["seed"] == 0 and notes["script"].startswith("scripts/train_shapes_")


@pytest.fixture(scope="module")
def shapes_sd():
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        builtin_path("kiln:shapes-sd"), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shapes_sd_draws_held_out_prompts(shapes_sd):
    assert type(shapes_sd).__name__ == "StableDiffusionPipeline"

    def generate(prompt: str, seed: int):
        with torch.inference_mode():
            return shapes_sd(
                prompt,
                num_inference_steps=quality.STEPS,
                guidance_scale=quality.GUIDANCE,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]

    assert quality.judged_correct(generate) >= JUDGED_FLOOR


def test_shapes_blip_captions_held_out_scenes():
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = builtin_path("shapes-blip")
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)

    def caption(images):
        with torch.inference_mode():
            out = model.generate(
                **processor(images=images, return_tensors="pt"),
                max_new_tokens=quality.MAX_NEW_TOKENS,
            )
        return processor.batch_decode(out, skip_special_tokens=True)

    assert quality.held_out_caption_accuracy(caption) >= CAPTION_FLOOR


def test_shapes_blip_reads_scenes_another_program_drew():
    """Plain RGB primaries at another side than the training draws, drawn here with PIL."""
    from PIL import Image, ImageDraw
    from transformers import BlipForConditionalGeneration, BlipProcessor

    folder = builtin_path("shapes-blip")
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    processor = BlipProcessor.from_pretrained(folder)
    image = Image.new("RGB", (200, 200), (255, 255, 0))
    ImageDraw.Draw(image).rectangle((50, 60, 130, 140), fill=(0, 0, 255))
    with torch.inference_mode():
        out = model.generate(**processor(images=[image], return_tensors="pt"), max_new_tokens=16)
    assert processor.batch_decode(out, skip_special_tokens=True) == [
        "a blue square on a yellow background"
    ]


def test_builtin_sources_load_by_name_with_a_content_revision():
    model = load_source("kiln:shapes-blip")
    assert model.source.kind == "builtin" and model.source.id == "kiln:shapes-blip"
    assert model.source.revision == content_hash(builtin_path("shapes-blip"))
    assert model.source.revision.startswith("sha256:")


def test_unknown_builtin_names_the_known_ones(tmp_path):
    with pytest.raises(SourceError, match="kiln:shapes-sd, kiln:shapes-blip"):
        builtin_path("kiln:shapes-xl")
    assert_user_error(
        run_kiln("export", "kiln:nope", "-o", tmp_path / "out"), "not a built-in model"
    )
    assert not (tmp_path / "out").exists()


def test_judge_reads_the_held_out_prompt_set_as_distinct_captions():
    prompts = quality.held_out_prompts()
    assert len(set(prompts)) == quality.PROMPTS
    assert prompts == quality.held_out_prompts()  # fixed, so figures compare across runs
    assert np.all([p.startswith("a ") and p.endswith(" background") for p in prompts])
