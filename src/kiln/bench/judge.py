"""A judge for the shapes world that needs no model: it reads an image from pixel statistics.

- background: the median colour of a two-pixel ring along the border (every scene keeps
  background on every border), named by the nearest pure colour;
- the shape's pixels: those farther than `FOREGROUND_DISTANCE` from the background median;
  their median colour names the shape's colour;
- the shape: a triangle has three quarters of its pixels in the half of its bounding box
  that holds its base (circles and squares half), whichever way it points; a square fills
  its whole box, a circle pi/4 of it. The box is taken between the 1st and 99th percentile
  of the shape's pixel coordinates, so a few stray pixels of a generated image do not widen it.

An image with too few shape pixels (`MIN_SHAPE_FRACTION`) reads as no shape at all.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.errors import InvalidRequestError
from kiln.models.shapes import COLOURS, normal_caption, parse_caption

FOREGROUND_DISTANCE = 120.0
MIN_SHAPE_FRACTION = 0.02
# Halfway between the ideal values: lopsidedness 0.25 (triangle) against 0 (circle, square);
# fill 0.785 (circle) against 1.0 (square; a circle measures up to 0.87 at 64 px).
TRIANGLE_LOPSIDED, SQUARE_ABOVE = 0.125, 0.93

_NAMES = list(COLOURS)
_PURE = np.array([COLOURS[name] for name in _NAMES], np.float64)


@dataclass(frozen=True)
class Reading:
    """What the judge sees in an image; `shape` and `colour` are None when there is no shape."""

    background: str
    colour: str | None
    shape: str | None
    fill: float  # fraction of the shape's bounding box it covers (0 without a shape)
    lopsided: float  # how far the pixels' split between box halves is from even (0 to 0.5)


@dataclass(frozen=True)
class Verdict:
    """An image judged against the prompt it was made for."""

    prompt: str
    reading: Reading
    background_ok: bool
    colour_ok: bool
    shape_ok: bool

    @property
    def correct(self) -> bool:
        return self.background_ok and self.colour_ok and self.shape_ok

    def describe(self) -> str:
        seen = self.reading
        what = f"a {seen.colour} {seen.shape}" if seen.shape else "no shape"
        mark = "correct" if self.correct else "wrong"
        return f"{mark}: sees {what} on a {seen.background} background"


def read_image(image: np.ndarray) -> Reading:
    """Read background, shape colour and shape from an RGB image (H x W x 3, any dtype 0-255)."""
    pixels = _rgb(image)
    height, width, _ = pixels.shape
    ring = np.concatenate(
        [pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)]
        + [pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)]
    )
    background_rgb = np.median(ring, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    mask = distance > FOREGROUND_DISTANCE
    background = _nearest(background_rgb)
    if mask.mean() < MIN_SHAPE_FRACTION:
        return Reading(background=background, colour=None, shape=None, fill=0.0, lopsided=0.0)
    colour = _nearest(np.median(pixels[mask], axis=0))
    fill, lopsided = _geometry(mask)
    return Reading(
        background=background,
        colour=colour,
        shape=_shape(fill, lopsided),
        fill=fill,
        lopsided=lopsided,
    )


def judge_image(image: np.ndarray, prompt: str) -> Verdict:
    """Whether `image` shows what `prompt` (a shapes-world caption) asks for."""
    colour, shape, background = parse_caption(prompt)
    seen = read_image(image)
    return Verdict(
        prompt=prompt,
        reading=seen,
        background_ok=seen.background == background,
        colour_ok=seen.colour == colour,
        shape_ok=seen.shape == shape,
    )


def judged_accuracy(images: Iterable[np.ndarray], prompts: Iterable[str]) -> float:
    """Fraction of images judged correct for their prompts."""
    verdicts = [judge_image(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
    if not verdicts:
        raise InvalidRequestError("judged accuracy needs at least one image")
    return sum(v.correct for v in verdicts) / len(verdicts)


def caption_accuracy(captions: Sequence[str], truths: Sequence[str]) -> float:
    """Fraction of captions exactly equal to the ground truth (case and spacing aside)."""
    if len(captions) != len(truths) or not truths:
        raise InvalidRequestError(
            f"caption accuracy needs as many captions as truths, at least one "
            f"({len(captions)} captions, {len(truths)} truths)"
        )
    same = sum(
        normal_caption(c) == normal_caption(t) for c, t in zip(captions, truths, strict=True)
    )
    return same / len(truths)


def _rgb(image: np.ndarray) -> np.ndarray:
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] != 3 or min(pixels.shape[:2]) < 8:
        raise InvalidRequestError(
            f"the judge reads RGB images of at least 8x8 (H x W x 3), not shape {pixels.shape}"
        )
    return pixels.astype(np.float64)


def _nearest(rgb: np.ndarray) -> str:
    return _NAMES[int(np.argmin(np.linalg.norm(_PURE - rgb, axis=-1)))]


def _geometry(mask: np.ndarray) -> tuple[float, float]:
    """(fill of the bounding box, lopsidedness of the pixels between its halves)."""
    rows, cols = np.nonzero(mask)
    top, bottom = np.percentile(rows, [1, 99])
    left, right = np.percentile(cols, [1, 99])
    box = mask[int(top) : int(bottom) + 1, int(left) : int(right) + 1]
    upper = float(np.mean(rows < (top + bottom) / 2))
    leftward = float(np.mean(cols < (left + right) / 2))
    return float(box.mean()), max(abs(upper - 0.5), abs(leftward - 0.5))


def _shape(fill: float, lopsided: float) -> str:
    if lopsided > TRIANGLE_LOPSIDED:
        return "triangle"
    return "square" if fill > SQUARE_ABOVE else "circle"
