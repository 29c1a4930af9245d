"""What both shapes-world training scripts share: the learning-rate schedule and the atomic save."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """LambdaLR factor: linear warm-up over the first 5% of steps, then cosine to zero."""
    warmup = max(1, steps // 20)

    def rate(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return rate


def save(out: Path, figures: dict, seed: int, script: str, *parts) -> None:
    """Into a temporary sibling, then renamed: an interrupted run leaves no model that looks whole."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in parts:
        part.save_pretrained(tmp)
    notes = {**figures, "seed": seed, "script": f"scripts/{Path(script).name}"}
    (tmp / "kiln_training.json").write_text(json.dumps(notes, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
