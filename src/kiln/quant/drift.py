"""Drift: how far a quantized variant's outputs move from fp32, per component and end to end.

Component drift compares outputs on held-back calibration calls. End-to-end drift reruns
the held-back part of the calibration workload with only this component swapped in and
compares with the fp32 results at the same seeds: image PSNR and SSIM for Stable
Diffusion, exact-match rate and token BLEU for captions, ITM probability error for
retrieval models. The workload is recorded so anyone can recompute the numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def component_drift(
    expected: Sequence[Mapping[str, np.ndarray]], actual: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, Any]:
    """Per output: worst max |diff|, mean relative RMS error and mean cosine over the calls.

    `expected[i]` and `actual[i]` are the fp32 and quantized outputs of the same call.
    """
    stats: dict[str, dict[str, list[float]]] = {}
    non_finite = 0
    for reference, candidate in zip(expected, actual, strict=True):
        for name, want in reference.items():
            got = np.asarray(candidate[name], dtype=np.float64)
            want = np.asarray(want, dtype=np.float64)
            if not np.isfinite(got).all():
                non_finite += 1
                continue
            entry = stats.setdefault(name, {"max_abs": [], "rel_rmse": [], "cosine": []})
            diff = got - want
            entry["max_abs"].append(float(np.abs(diff).max()))
            entry["rel_rmse"].append(_ratio(np.linalg.norm(diff), np.linalg.norm(want)))
            entry["cosine"].append(
                _ratio(float(np.vdot(got, want)), np.linalg.norm(got) * np.linalg.norm(want))
            )
    outputs = {
        name: {
            "max_abs": max(entry["max_abs"]),
            "rel_rmse": float(np.mean(entry["rel_rmse"])),
            "cosine": float(np.mean(entry["cosine"])),
        }
        for name, entry in stats.items()
    }
    return {"calls": len(expected), "non_finite_calls": non_finite, "outputs": outputs}


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else 0.0


def image_drift(references: Sequence[Any], images: Sequence[Any]) -> dict[str, float]:
    """Mean PSNR (dB, capped at 100 for identical images) and SSIM of image pairs."""
    from kiln.bench.metrics import psnr, ssim

    psnrs = [min(psnr(a, b), 100.0) for a, b in zip(references, images, strict=True)]
    ssims = [ssim(a, b) for a, b in zip(references, images, strict=True)]
    return {"psnr": round(float(np.mean(psnrs)), 3), "ssim": round(float(np.mean(ssims)), 5)}


def caption_drift(
    references: Sequence[Sequence[int]], captions: Sequence[Sequence[int]]
) -> dict[str, float]:
    """Share of token-identical captions and corpus BLEU-4 against the fp32 captions."""
    from kiln.bench.metrics import bleu

    same = sum(list(a) == list(b) for a, b in zip(references, captions, strict=True))
    return {
        "exact_match": round(same / max(len(references), 1), 4),
        "bleu": round(bleu(captions, references), 4),
    }


def matching_drift(
    references: Sequence[Sequence[float]], probabilities: Sequence[Sequence[float]]
) -> dict[str, float]:
    """Worst absolute change of an ITM probability."""
    worst = max(
        abs(a - b)
        for ref, got in zip(references, probabilities, strict=True)
        for a, b in zip(ref, got, strict=True)
    )
    return {"itm_abs": round(float(worst), 5)}


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
