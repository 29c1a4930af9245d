"""The shapes world and its judge: deterministic scenes, one grammar, pixel-statistics verdicts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from kiln.bench.judge import caption_accuracy, judge_image, judged_accuracy, read_image
from kiln.errors import InvalidRequestError
from kiln.models import shapes


def test_the_same_seed_draws_the_same_scenes():
    first = [scene.draw().tobytes() for scene in shapes.scenes(5, seed=7)]
    again = [scene.draw().tobytes() for scene in shapes.scenes(5, seed=7)]
    other = [scene.draw().tobytes() for scene in shapes.scenes(5, seed=8)]
    assert first == again
    assert first != other
    assert shapes.held_out_scenes(3) != list(shapes.scenes(3, seed=0))


def test_captions_follow_the_grammar_and_colours_differ():
    captions = shapes.all_captions()
    assert len(captions) == len(set(captions)) == 90
    for scene in shapes.scenes(300, seed=1):
        assert scene.colour != scene.background
        assert shapes.parse_caption(scene.caption) == (scene.colour, scene.shape, scene.background)
        assert scene.caption in captions
    assert {s.shape for s in shapes.scenes(100)} == set(shapes.SHAPES)


@pytest.mark.parametrize("side", [64, 96, 128])
def test_the_judge_reads_every_drawn_scene(side):
    drawn = list(shapes.scenes(400, seed=side))
    images = [scene.draw(side) for scene in drawn]
    assert judged_accuracy(images, [scene.caption for scene in drawn]) == 1.0


def test_the_judge_reads_plain_primaries_another_program_drew():
    """PIL, pure colours, sizes and positions outside the world's ranges, a non-square image."""
    cases = [
        ("a red circle on a blue background", "ellipse", (30, 20, 110, 100), (255, 0, 0)),
        ("a yellow square on a black background", "rectangle", (50, 40, 90, 80), (255, 255, 0)),
        (
            "a green triangle on a white background",
            "polygon",
            [(80, 10), (40, 90), (120, 90)],
            (0, 255, 0),
        ),
        # Pointing down, which the world never draws: still three-quarters on its base side.
        (
            "a white triangle on a blue background",
            "polygon",
            [(30, 15), (110, 15), (70, 95)],
            (255, 255, 255),
        ),
    ]
    backgrounds = {"blue": (0, 0, 255), "black": (0, 0, 0), "white": (255, 255, 255)}
    for prompt, kind, where, colour in cases:
        background = backgrounds[prompt.split()[-2]]
        image = Image.new("RGB", (160, 110), background)
        getattr(ImageDraw.Draw(image), kind)(where, fill=colour)
        verdict = judge_image(np.asarray(image), prompt)
        assert verdict.correct, (prompt, verdict.describe())


def test_wrong_images_are_judged_wrong_on_the_part_that_is_wrong():
    scene = shapes.sample_scene(np.random.default_rng(3), "a red circle on a blue background")
    image = scene.draw()
    assert judge_image(image, scene.caption).correct
    wrong_colour = judge_image(image, "a green circle on a blue background")
    assert (wrong_colour.colour_ok, wrong_colour.shape_ok, wrong_colour.background_ok) == (
        False,
        True,
        True,
    )
    assert not judge_image(image, "a red square on a blue background").shape_ok
    assert not judge_image(image, "a red circle on a white background").background_ok
    plain = np.zeros((64, 64, 3), np.uint8)
    assert read_image(plain).shape is None
    verdict = judge_image(plain, "a white circle on a black background")
    assert not verdict.correct and verdict.describe() == (
        "wrong: sees no shape on a black background"
    )
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert not judge_image(noise, scene.caption).correct


def test_caption_accuracy_is_exact_match():
    truths = ["a red circle on a blue background", "a black square on a white background"]
    assert caption_accuracy(["A red  circle on a blue background ", truths[1]], truths) == 1.0
    assert caption_accuracy(["a red circle on a green background", truths[1]], truths) == 0.5


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: shapes.parse_caption("a purple circle on a red background"), "not a shapes"),
        (lambda: shapes.parse_caption("a red circle on a red background"), "same colour"),
        (lambda: judge_image(np.zeros((4, 4)), "a red circle on a blue background"), "RGB"),
        (lambda: caption_accuracy(["a"], []), "as many captions"),
        (lambda: shapes.sample_scene(np.random.default_rng(0)).draw(3), "16 to 4096"),
    ],
)
def test_bad_input_is_one_line(call, message):
    with pytest.raises(InvalidRequestError, match=message) as raised:
        call()
    assert "\n" not in str(raised.value)
