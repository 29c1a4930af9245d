"""The shapes world: one plain shape on a plain background, drawn from a seed, with its caption.

kiln's built-in trained models learn this world because no model hub is reachable: it is small
enough to train on two CPU cores and rich enough that a wrong colour, shape or background is
visible at a glance and checkable without a model (`kiln.bench.judge`). Every caption has one
form, `a {colour} {shape} on a {background} background`, which is both a prompt for the
generator and the captioner's expected output.

Position, size and the exact shade vary from scene to scene, so a model that learns the world
also reads scenes another program drew: shades stay within `SHADE_SPREAD` of the pure colour on
every channel, well inside half the distance between two pure colours (255), so the nearest
pure colour always names a shade.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from kiln.errors import InvalidRequestError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
SHAPES = ("circle", "square", "triangle")
SHADE_SPREAD = 60
# Size is the shape's half-extent as a fraction of the image side: big enough to read at
# 64 px, small enough that the background shows on every border.
MIN_SIZE, MAX_SIZE = 0.18, 0.34
DEFAULT_SIDE = 64
# Training and held-out scenes come from separate seed streams, so no held-out scene was seen.
HELD_OUT_SEED = 1_000_003

_CAPTION = re.compile(r"^a (\w+) (\w+) on an? (\w+) background$")


@dataclass(frozen=True)
class Scene:
    """One scene: what the caption says, plus where and in which shades it is drawn."""

    colour: str
    shape: str
    background: str
    centre: tuple[float, float]  # (x, y) as fractions of the side
    size: float  # half-extent as a fraction of the side
    colour_rgb: tuple[int, int, int]
    background_rgb: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return caption_for(self.colour, self.shape, self.background)

    def draw(self, side: int = DEFAULT_SIDE) -> np.ndarray:
        """The scene as an RGB uint8 array of `side` x `side`."""
        if not 16 <= side <= 4096:
            raise InvalidRequestError(f"a shapes scene is drawn at 16 to 4096 pixels, not {side}")
        image = np.empty((side, side, 3), np.uint8)
        image[:] = self.background_rgb
        image[shape_mask(self.shape, self.centre, self.size, side)] = self.colour_rgb
        return image


def caption_for(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def normal_caption(text: str) -> str:
    """A caption lower-cased with single spaces, as captions are compared."""
    return " ".join(text.lower().split())


def parse_caption(text: str) -> tuple[str, str, str]:
    """(colour, shape, background) of a caption or prompt in the world's grammar."""
    match = _CAPTION.match(normal_caption(text))
    words = match.groups() if match else ()
    if not match or words[0] not in COLOURS or words[1] not in SHAPES or words[2] not in COLOURS:
        raise InvalidRequestError(
            f"{text!r} is not a shapes-world caption: expected 'a COLOUR SHAPE on a COLOUR "
            f"background' with colours {', '.join(COLOURS)} and shapes {', '.join(SHAPES)}"
        )
    if words[0] == words[2]:
        raise InvalidRequestError(f"{text!r}: the shape and the background have the same colour")
    return words[0], words[1], words[2]


def all_captions() -> list[str]:
    """Every caption the world has (6 colours x 3 shapes x 5 other backgrounds = 90)."""
    return [
        caption_for(colour, shape, background)
        for colour in COLOURS
        for shape in SHAPES
        for background in COLOURS
        if background != colour
    ]


def sample_scene(rng: np.random.Generator, caption: str | None = None) -> Scene:
    """A random scene, or a random drawing of `caption`."""
    if caption is None:
        colour, background = rng.choice(list(COLOURS), size=2, replace=False)
        shape = str(rng.choice(SHAPES))
    else:
        colour, shape, background = parse_caption(caption)
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE))
    # The centre keeps the whole shape and a margin of background inside the image.
    low, high = size + 0.04, 1 - size - 0.04
    centre = (float(rng.uniform(low, high)), float(rng.uniform(low, high)))
    return Scene(
        colour=str(colour),
        shape=shape,
        background=str(background),
        centre=centre,
        size=size,
        colour_rgb=_shade(rng, COLOURS[str(colour)]),
        background_rgb=_shade(rng, COLOURS[str(background)]),
    )


def scenes(count: int, seed: int = 0) -> Iterator[Scene]:
    """`count` scenes from `seed`: the same seed always gives the same scenes."""
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield sample_scene(rng)


def held_out_scenes(count: int) -> list[Scene]:
    """Scenes from a seed stream no training script uses."""
    return list(scenes(count, seed=HELD_OUT_SEED))


def shape_mask(shape: str, centre: tuple[float, float], size: float, side: int) -> np.ndarray:
    """Boolean mask of a circle, an axis-aligned square or an upright triangle."""
    coords = (np.arange(side, dtype=np.float64) + 0.5) / side
    x, y = np.meshgrid(coords - centre[0], coords - centre[1])
    if shape == "circle":
        return x * x + y * y <= size * size
    if shape == "square":
        return (np.abs(x) <= size) & (np.abs(y) <= size)
    if shape == "triangle":
        # Apex at the top, base at the bottom, both half-extents `size`.
        inside_height = (y >= -size) & (y <= size)
        return inside_height & (np.abs(x) <= (y + size) / 2)
    raise InvalidRequestError(f"unknown shape {shape!r}; shapes are {', '.join(SHAPES)}")


def _shade(rng: np.random.Generator, pure: tuple[int, int, int]) -> tuple[int, int, int]:
    """A shade of a pure colour: each channel moved up to SHADE_SPREAD towards the middle."""
    offsets = rng.integers(0, SHADE_SPREAD + 1, size=3)
    return tuple(int(c - o) if c == 255 else int(c + o) for c, o in zip(pure, offsets, strict=True))
