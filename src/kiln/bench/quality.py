"""Output quality on the shapes world, for the built-in trained models (`kiln:shapes-*`).

PSNR against fp32 says how far a variant moved, not whether its pictures are still right. On
the shapes world the judge (`kiln.bench.judge`) answers that without a model: the fraction of
held-out prompts whose image shows the asked colour, shape and background, and the fraction of
held-out scenes whose caption is exactly the truth. The bench measures both for every variant
(fp32, quantized, PyTorch); `kiln quantize` records them as drift.

The sets are fixed (seeded from `shapes.HELD_OUT_SEED`), so figures compare across variants,
runs and machines. Images use the settings the training script evaluates with, not the
bench's speed cases (4 steps is a latency case, not a quality setting).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from kiln.bench.judge import caption_accuracy, judge_image
from kiln.models import shapes

PROMPTS = 18
STEPS = 20
GUIDANCE = 7.5
SCENES = 30
MAX_NEW_TOKENS = 16
CAPTION_BATCH = 8

# Which built-in model each figure is judged for: the judge knows only the shapes world.
JUDGED_CORRECT = "judged_correct"
CAPTION_ACCURACY = "caption_accuracy"
SOURCES = {JUDGED_CORRECT: "kiln:shapes-sd", CAPTION_ACCURACY: "kiln:shapes-blip"}
METRICS = tuple(SOURCES)

Figure = tuple[float | None, str | None]  # (value, reason when there is none)


def held_out_prompts(count: int = PROMPTS) -> list[str]:
    """`count` distinct captions of the world, picked with the held-out seed."""
    rng = np.random.default_rng(shapes.HELD_OUT_SEED)
    captions = shapes.all_captions()
    return [captions[int(i)] for i in rng.choice(len(captions), size=count, replace=False)]


def not_applicable(source: Mapping[str, Any], figure: str) -> str | None:
    """Why `figure` cannot be judged for a model from `source` (manifest source), or None."""
    wanted = SOURCES[figure]
    if source.get("id") != wanted:
        return f"judged only for the shapes-world model {wanted}"
    return None


def judged_correct(generate: Callable[[str, int], Any], count: int = PROMPTS) -> float:
    """Fraction of held-out prompts whose image (`generate(prompt, seed)`) the judge accepts."""
    verdicts = []
    for index, prompt in enumerate(held_out_prompts(count)):
        image = generate(prompt, shapes.HELD_OUT_SEED + index)
        verdicts.append(judge_image(np.asarray(image.convert("RGB")), prompt).correct)
    return sum(verdicts) / len(verdicts)


def held_out_caption_accuracy(
    caption: Callable[[list[Any]], list[str]], count: int = SCENES
) -> float:
    """Fraction of held-out scenes that `caption(images)` captions exactly."""
    from PIL import Image

    scenes = shapes.held_out_scenes(count)
    images = [Image.fromarray(scene.draw()) for scene in scenes]
    captions = []
    for start in range(0, count, CAPTION_BATCH):  # within caption()'s images-per-call limit
        captions += caption(images[start : start + CAPTION_BATCH])
    return caption_accuracy(captions, [scene.caption for scene in scenes])
