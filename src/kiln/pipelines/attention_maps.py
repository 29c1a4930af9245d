"""Where a caption looked: cross-attention weights per generated token, and their heat maps.

The weights of a token are those of the decoding step that produced it: the query is the
token before it, its keys are BLIP's image tokens (the class token, then the patches row by
row). A word's map averages its word pieces, the layers and the heads; the picture shows
the image and one heat map per word, stretched over the image as BLIP's processor
stretched the image onto its square input.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PANEL = 160  # px, the side of each image in the picture
LABEL = 18  # px under each panel


@dataclass
class TokenAttentions:
    """One caption's new tokens (special tokens left out) and `weights[token, layer, head, key]`.

    The keys are BLIP's image tokens: the class token, then grid x grid patches. For BLIP-2,
    layers and heads are the language model's and each weight is its attention to the soft
    prompt carried onto the image by the Q-Former's cross-attention (rows sum to the share
    of attention the token gave the image).
    """

    tokens: list[str]
    weights: np.ndarray
    word_starts: list[bool]

    @property
    def grid(self) -> int:
        return math.isqrt(self.weights.shape[-1] - 1)

    def word_maps(self) -> list[tuple[str, np.ndarray]]:
        """(word, grid x grid map) per word, its pieces joined and averaged with the layers
        and heads."""
        words: list[tuple[str, list[int]]] = []
        for index, (token, start) in enumerate(zip(self.tokens, self.word_starts, strict=True)):
            if start or not words:
                words.append((token, [index]))
            else:
                words[-1] = (words[-1][0] + token, [*words[-1][1], index])
        side = self.grid
        return [
            (word, self.weights[pieces].mean(axis=(0, 1, 2))[1:].reshape(side, side))
            for word, pieces in words
        ]

    def to_dict(self) -> dict[str, Any]:
        """Tokens, and per token and layer the weights averaged over heads."""
        return {
            "tokens": self.tokens,
            "word_starts": self.word_starts,
            "weights_by_layer": self.weights.mean(axis=2).round(6).tolist(),
        }


def token_attentions(
    tokenizer: Any, row: Sequence[int], prompt: int, weights: Any, special: set[int]
) -> TokenAttentions:
    """The new tokens of one generated row and their weights.

    `weights` is (layers, heads, queries, keys) for the row, queries over the row minus its
    last token: token `prompt + k` was produced by query `prompt + k - 1`.
    """
    kept = [p for p in range(prompt, len(row)) if row[p] not in special]
    stacked = weights[:, :, [p - 1 for p in kept], :].permute(2, 0, 1, 3)
    ids = [row[p] for p in kept]
    # An id past the tokenizer's vocabulary (random-weight models) is shown as its number.
    pieces = [
        piece or f"<{i}>"
        for i, piece in zip(ids, tokenizer.convert_ids_to_tokens(ids), strict=True)
    ]
    return TokenAttentions(
        tokens=[tokenizer.convert_tokens_to_string([p]).strip().removeprefix("##") for p in pieces],
        weights=stacked.numpy(),
        word_starts=[_starts_word(tokenizer, piece) for piece in pieces],
    )


def _starts_word(tokenizer: Any, piece: str) -> bool:
    """WordPiece marks continuations ('##s'); byte-level BPE marks word starts ('Ġcat')."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        return piece.startswith("Ġ")
    return not piece.startswith("##")


def render(image: Any, attentions: TokenAttentions, caption: str) -> Any:
    """The image, then one heat map per word over it, each labelled; the caption on top."""
    from PIL import Image, ImageDraw

    from kiln.pipelines.grid import label_font

    maps = attentions.word_maps()
    columns = min(len(maps) + 1, 6)
    rows = math.ceil((len(maps) + 1) / columns)
    top = LABEL + 6
    picture = Image.new("RGB", (columns * PANEL, top + rows * (PANEL + LABEL)), "white")
    draw = ImageDraw.Draw(picture)
    font = label_font()
    draw.text((4, 3), caption, fill="black", font=font)
    base = image.convert("RGB").resize((PANEL, PANEL))
    panels = [("image", base)] + [(word, overlay(base, heat)) for word, heat in maps]
    for index, (label, panel) in enumerate(panels):
        x, y = (index % columns) * PANEL, top + (index // columns) * (PANEL + LABEL)
        picture.paste(panel, (x, y))
        draw.text((x + 4, y + PANEL + 2), label, fill="black", font=font)
    return picture


def overlay(image: Any, heat: np.ndarray, alpha: float = 0.5) -> Any:
    """`heat` (any range) stretched over a grey copy of `image` in a jet colour map (blue:
    least attended, red: most), so the map reads the same on any image colours."""
    from PIL import Image

    span = float(heat.max() - heat.min())
    level = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    small = Image.fromarray((level * 255).astype(np.uint8), mode="L")
    level = np.asarray(small.resize(image.size, Image.BILINEAR), dtype=np.float32) / 255
    jet = np.stack([1.5 - np.abs(4 * level - c) for c in (3, 2, 1)], axis=-1).clip(0, 1)
    grey = np.asarray(image.convert("L"), dtype=np.float32)[..., None]
    mixed = (1 - alpha) * grey + alpha * 255 * jet
    return Image.fromarray(mixed.clip(0, 255).astype(np.uint8))


def write_attention_maps(path: Path, images: Sequence[Any], result: Any) -> list[Path]:
    """One picture per image (its first caption): `path`, or `stem-N.suffix` for several."""
    from kiln.artifacts import atomic_write_png

    written = []
    for index, image in enumerate(images):
        target = (
            path if len(images) == 1 else path.with_name(f"{path.stem}-{index + 1}{path.suffix}")
        )
        atomic_write_png(
            target, render(image, result.attentions[index][0], result.captions[index][0])
        )
        written.append(target)
    return written
