"""Output-drift metrics shared by tests, the demo and the benchmark."""

from __future__ import annotations

from collections.abc import Sequence
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


def ssim(a: Any, b: Any, peak: float = 255.0, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window) averaged over channels.

    Matches `skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=255, channel_axis=-1)` to a few 1e-4.
    """
    x, y = as_array(a), as_array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    scores = []
    for channel in range(x.shape[-1]):
        p, q = x[..., channel], y[..., channel]

        def blur(image: np.ndarray) -> np.ndarray:
            return gaussian_blur(image, sigma, truncate=3.5)

        mu_p, mu_q = blur(p), blur(q)
        var_p = blur(p * p) - mu_p**2
        var_q = blur(q * q) - mu_q**2
        cov = blur(p * q) - mu_p * mu_q
        index = ((2 * mu_p * mu_q + c1) * (2 * cov + c2)) / (
            (mu_p**2 + mu_q**2 + c1) * (var_p + var_q + c2)
        )
        pad = int(3.5 * sigma + 0.5)  # skimage crops the border the window cannot cover
        if min(index.shape) > 2 * pad:
            index = index[pad:-pad, pad:-pad]
        scores.append(float(index.mean()))
    return float(np.mean(scores))


def gaussian_blur(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """`scipy.ndimage.gaussian_filter(image, sigma, truncate=truncate, mode="reflect")` of a
    2-D image, in numpy: a GPU machine without scipy (it does not travel in gpu-wheels/)
    measures the same SSIM. The same kernel, applied along each axis in turn."""
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 / sigma**2 * offsets**2)
    weights /= weights.sum()
    out = np.asarray(image, dtype=np.float64)
    for axis in (0, 1):
        size = out.shape[axis]
        pad = [(radius, radius) if a == axis else (0, 0) for a in range(out.ndim)]
        padded = np.pad(out, pad, mode="symmetric")  # scipy's "reflect": d c b a | a b c d
        out = sum(
            weight * np.take(padded, np.arange(i, i + size), axis=axis)
            for i, weight in enumerate(weights)
        )
    return out


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, p90, p99, min, max and spread of timing samples, plus the samples themselves.

    Percentiles interpolate linearly (numpy's default); with few samples p90/p99 sit close to
    the maximum, which is why `n` travels with them. `noise` is the half-width of the
    p10..p90 band relative to the median: the run's own variability, used by `compare`.
    """
    values = np.asarray(list(samples), dtype=np.float64)
    if values.size == 0:
        raise ValueError("no samples to summarize")
    median = float(np.median(values))
    p10, p90, p99 = (float(v) for v in np.percentile(values, [10, 90, 99]))
    return {
        "median": median,
        "p90": p90,
        "p99": p99,
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
        "noise": float((p90 - p10) / (2 * median)) if median > 0 else 0.0,
        "samples": [float(v) for v in values],
    }


def peak_rss_bytes() -> tuple[int | None, str | None]:
    """This process's peak resident set size so far, or None and the reason it is unknown.

    Linux: VmHWM from /proc/self/status. Windows: psutil's peak working set. macOS and other
    Unixes: getrusage's ru_maxrss (bytes on macOS, KiB elsewhere).
    """
    import sys

    status = "/proc/self/status"
    try:
        with open(status, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, None
    except OSError:
        pass
    try:
        import psutil

        info = psutil.Process().memory_info()
        if hasattr(info, "peak_wset"):
            return int(info.peak_wset), None
    except Exception:  # psutil missing or access denied: fall through to getrusage
        pass
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (int(peak) if sys.platform == "darwin" else int(peak) * 1024), None
    except (ImportError, OSError) as exc:
        return None, f"peak RSS is not measurable on this platform ({exc})"


def bleu(hypotheses: Sequence[Sequence[Any]], references: Sequence[Sequence[Any]]) -> float:
    """Corpus BLEU-4 of token sequences against one reference each, in [0, 1].

    Clipped n-gram precisions (n = 1..4) pooled over the corpus, their geometric mean, and
    the brevity penalty (Papineni et al. 2002). Orders no pair is long enough for are left
    out; a zero count above unigrams is smoothed with +1 on both counts (Lin & Och 2004),
    so short captions that differ in one token do not score 0. Identical corpora score 1.
    """
    import math
    from collections import Counter

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    matches, totals = [0] * 4, [0] * 4
    hyp_length = ref_length = 0
    for hyp, ref in zip(hypotheses, references, strict=True):
        hyp, ref = list(hyp), list(ref)
        hyp_length += len(hyp)
        ref_length += len(ref)
        for n in range(1, 5):
            ours = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
            theirs = Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
            matches[n - 1] += sum(min(c, theirs[g]) for g, c in ours.items())
            totals[n - 1] += sum(ours.values())
    if hyp_length == 0:
        return 1.0 if ref_length == 0 else 0.0
    logs = []
    for n, (match, total) in enumerate(zip(matches, totals, strict=True), start=1):
        if total == 0:
            continue
        if match == 0:
            if n == 1:
                return 0.0
            match, total = match + 1, total + 1
        logs.append(math.log(match / total))
    penalty = 1.0 if hyp_length >= ref_length else math.exp(1 - ref_length / hyp_length)
    return penalty * math.exp(sum(logs) / len(logs))
