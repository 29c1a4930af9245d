"""Parameter grids (as sdnext's XYZ grid): up to three `generate()` options swept at one seed.

Each axis is one option and its values (`steps=4,8,16`); every other option is fixed. The
`variant` axis loads the artifact once per value (`onnx:fp32`, `openvino:int8`: what
`--require` takes), so quantization drift shows side by side at the same seed, with each
cell's PSNR against the first variant's cell. The output folder holds `grid.png` (X across,
Y down, Z panels side by side, labelled), `cells/NNN.png` with `cells/NNN.json` (the exact
`kiln generate` parameters of that cell), and `grid.json` (axes, cells, where each sits).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.artifacts import atomic_write_png, atomic_write_text
from kiln.errors import InvalidRequestError

MAX_AXES = 3
MAX_CELLS = 64

# Axis name -> (generate() keyword, value parser). `variant` picks the deployment instead.
AXIS_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "prompt": ("prompt", str),
    "negative_prompt": ("negative_prompt", str),
    "steps": ("steps", int),
    "guidance": ("guidance_scale", float),
    "guidance_scale": ("guidance_scale", float),
    "scheduler": ("scheduler", str),
    "sampler": ("scheduler", str),
    "seed": ("seed", int),
    "width": ("width", int),
    "height": ("height", int),
    "variant": ("variant", str),
}


@dataclass(frozen=True)
class Axis:
    name: str  # the generate() keyword, or "variant"
    values: tuple[Any, ...]

    def label(self, value: Any) -> str:
        return f"{self.name}: {value}"


def parse_axis(text: str) -> Axis:
    """`steps=4,8,16` -> Axis("steps", (4, 8, 16)), each value parsed as the option takes it."""
    name, sep, values = text.partition("=")
    name = name.strip().replace("-", "_")
    if not sep or name not in AXIS_OPTIONS:
        raise InvalidRequestError(
            f"--vary {text!r}: expected OPTION=V1,V2,... with OPTION one of "
            + ", ".join(sorted(AXIS_OPTIONS))
        )
    keyword, parse = AXIS_OPTIONS[name]
    parts = [v.strip() for v in values.split(",") if v.strip()]
    if not parts:
        raise InvalidRequestError(f"--vary {text!r}: no values")
    try:
        parsed = tuple(parse(v) for v in parts)
    except ValueError:
        raise InvalidRequestError(
            f"--vary {text!r}: {name} takes {parse.__name__} values"
        ) from None
    if len(set(parsed)) != len(parsed):
        raise InvalidRequestError(f"--vary {text!r}: a value is repeated")
    return Axis(keyword, parsed)


@dataclass(frozen=True)
class Cell:
    index: int
    coords: tuple[int, ...]  # position along each axis
    params: dict[str, Any]  # generate() keywords, plus "variant" when that is an axis

    @property
    def variant(self) -> str | None:
        return self.params.get("variant")

    def generate_params(self) -> dict[str, Any]:
        return {k: v for k, v in self.params.items() if k != "variant"}


def plan_cells(axes: Sequence[Axis], fixed: dict[str, Any]) -> list[Cell]:
    """Every combination of the axes' values over the fixed options (X varies fastest)."""
    if not 1 <= len(axes) <= MAX_AXES:
        raise InvalidRequestError(f"a grid has 1 to {MAX_AXES} axes (--vary), got {len(axes)}")
    names = [axis.name for axis in axes]
    if len(set(names)) != len(names):
        raise InvalidRequestError(f"an option is varied twice: {', '.join(names)}")
    count = math.prod(len(axis.values) for axis in axes)
    if count > MAX_CELLS:
        raise InvalidRequestError(f"{count} cells is more than a grid holds ({MAX_CELLS})")
    cells = []
    ranges = [range(len(axis.values)) for axis in reversed(axes)]
    for index, reversed_coords in enumerate(itertools.product(*ranges)):
        coords = tuple(reversed(reversed_coords))
        params = dict(fixed)
        params.update({axis.name: axis.values[i] for axis, i in zip(axes, coords, strict=True)})
        cells.append(Cell(index, coords, params))
    return cells


@dataclass
class GridResult:
    grid_path: Path
    cells: list[dict[str, Any]]


def run_grid(
    load: Callable[[str | None], Any],
    axes: Sequence[Axis],
    fixed: dict[str, Any],
    out: Path,
    on_cell: Callable[[int, int], None] | None = None,
) -> GridResult:
    """Generate every cell (one deployment per variant, loaded once), save, compose, label."""
    cells = plan_cells(axes, fixed)
    # Every variant loads before anything is written: a wrong one leaves no folder behind.
    deployments = {variant: load(variant) for variant in dict.fromkeys(c.variant for c in cells)}
    images, records = [], []
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for done, cell in enumerate(cells, start=1):
        result = deployments[cell.variant].generate(**cell.generate_params())
        image = result.images[0]
        images.append(image)
        record = {
            "index": cell.index,
            "coords": list(cell.coords),
            "params": cell.params,
            "seed": result.seed,
            "seconds": round(result.seconds, 3),
            "file": f"cells/{cell.index:03d}.png",
        }
        atomic_write_png(out / record["file"], image)
        atomic_write_text(out / f"cells/{cell.index:03d}.json", json.dumps(record, indent=2))
        records.append(record)
        if on_cell is not None:
            on_cell(done, len(cells))
    _add_variant_psnr(axes, cells, images, records)
    grid, boxes = compose(axes, cells, images, records)
    for record, box in zip(records, boxes, strict=True):
        record["box"] = box
    grid_path = out / "grid.png"
    atomic_write_png(grid_path, grid)
    summary = {
        "axes": [{"name": a.name, "values": list(a.values)} for a in axes],
        "fixed": fixed,
        "cells": records,
    }
    atomic_write_text(out / "grid.json", json.dumps(summary, indent=2))
    return GridResult(grid_path, records)


def _add_variant_psnr(
    axes: Sequence[Axis], cells: list[Cell], images: list[Any], records: list[dict[str, Any]]
) -> None:
    """Each cell's PSNR against the cell of the first variant with the same other values."""
    from kiln.bench.metrics import psnr

    names = [a.name for a in axes]
    if "variant" not in names:
        return
    axis = names.index("variant")
    reference = {
        tuple(c for i, c in enumerate(cell.coords) if i != axis): images[cell.index]
        for cell in cells
        if cell.coords[axis] == 0
    }
    for cell in cells:
        if cell.coords[axis] == 0:
            continue
        base = reference[tuple(c for i, c in enumerate(cell.coords) if i != axis)]
        same_size = base.size == images[cell.index].size
        value = float(psnr(base, images[cell.index])) if same_size else None
        identical = value == math.inf
        records[cell.index]["psnr_vs_first_variant"] = None if identical else value
        records[cell.index]["identical_to_first_variant"] = identical


LINE = 16  # label line height (px)
GAP = 8
MIN_COLUMN = 150  # px: labels stay readable beside small images


def compose(
    axes: Sequence[Axis], cells: list[Cell], images: list[Any], records: list[dict[str, Any]]
) -> tuple[Any, list[list[int]]]:
    """The labelled grid and each cell's box (x0, y0, x1, y1) in it; images are pasted as
    generated (never scaled), so a box cut from the grid is that cell's image."""
    from PIL import Image, ImageDraw

    font = label_font()
    column = max(MIN_COLUMN, max(image.width for image in images)) + GAP
    row = max(image.height for image in images) + GAP
    scored = any("psnr_vs_first_variant" in r for r in records)
    row += LINE if scored else 0
    counts = [len(axis.values) for axis in axes] + [1, 1]
    x_n, y_n, z_n = counts[:3]
    left = MIN_COLUMN + GAP if len(axes) > 1 else GAP
    top = LINE * (3 if len(axes) > 2 else 2) + GAP
    panel = x_n * column + GAP
    grid = Image.new("RGB", (left + z_n * panel, top + y_n * row), "white")
    draw = ImageDraw.Draw(grid)

    def text(xy: tuple[int, int], value: str, width: int, fill: str = "black") -> None:
        for n, piece in enumerate(_wrap(value, width - GAP, font, draw)):
            draw.text((xy[0], xy[1] + n * LINE), piece, fill=fill, font=font)

    boxes = []
    for cell, image, record in zip(cells, images, records, strict=True):
        x, y, z = (list(cell.coords) + [0, 0])[:3]
        x0, y0 = left + z * panel + x * column, top + y * row
        grid.paste(image, (x0, y0))
        boxes.append([x0, y0, x0 + image.width, y0 + image.height])
        if scored:
            text((x0, y0 + image.height + 2), _score(record), column, "black")
    for z in range(z_n):
        if len(axes) > 2:
            text((left + z * panel, 2), axes[2].label(axes[2].values[z]), panel)
        for x in range(x_n):
            label = axes[0].label(axes[0].values[x])
            text((left + z * panel + x * column, top - 2 * LINE - 2), label, column)
    if len(axes) > 1:
        for y in range(y_n):
            text((GAP, top + y * row + row // 3), axes[1].label(axes[1].values[y]), left)
    return grid, boxes


def _score(record: dict[str, Any]) -> str:
    if "psnr_vs_first_variant" not in record:
        return "reference"
    if record["identical_to_first_variant"]:
        return "identical"
    value = record["psnr_vs_first_variant"]
    return "PSNR -" if value is None else f"PSNR {value:.1f} dB"


def label_font() -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _wrap(text: str, width: int, font: Any, draw: Any, lines: int = 2) -> list[str]:
    """`text` in at most `lines` lines of `width` px, the last cut with an ellipsis."""
    out, words = [], text.split(" ")
    while words and len(out) < lines:
        piece = words.pop(0)
        while words and draw.textlength(f"{piece} {words[0]}", font=font) <= width:
            piece = f"{piece} {words.pop(0)}"
        out.append(piece)
    if words or (out and draw.textlength(out[-1], font=font) > width):
        last = out[-1] + (" " + " ".join(words) if words else "")
        while len(last) > 1 and draw.textlength(last + "…", font=font) > width:
            last = last[:-1]
        out[-1] = last + "…"
    return out
