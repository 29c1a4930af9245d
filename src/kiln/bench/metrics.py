"""Output-drift metrics shared by tests, the demo and the benchmark."""

from __future__ import annotations

from typing import Any

import numpy as np


def as_array(image: Any) -> np.ndarray:
    """A PIL image or array as float64 in [0, 255]."""
    return np.asarray(image, dtype=np.float64)


def psnr(a: Any, b: Any, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two 8-bit images (inf when identical)."""
    x, y = as_array(a), as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(peak**2 / mse)
