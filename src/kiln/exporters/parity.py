"""Parity: an exported component against the PyTorch module it came from, on fresh inputs.

Inputs are drawn at sizes different from those the export traced at, so a graph that
silently specialized a dynamic axis fails here, not in a user's pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from kiln.artifacts import Parity
from kiln.models.spec import ComponentSpec, Precision

if TYPE_CHECKING:
    import torch

PARITY_SEED = 1234


def reference_outputs(
    module: torch.nn.Module, spec: ComponentSpec, sizes: Mapping[str, int] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Inputs at parity sizes and PyTorch's outputs for them, as numpy arrays."""
    import torch

    sizes = dict(sizes or spec.parity_sizes())
    inputs = spec.sample_inputs(sizes, seed=PARITY_SEED)
    with torch.no_grad():
        raw = module(*inputs.values())
    raw = raw if isinstance(raw, tuple | list) else (raw,)
    outputs = {
        name: tensor.detach().float().numpy()
        for name, tensor in zip(spec.output_names, raw, strict=True)
    }
    return {k: v.numpy() for k, v in inputs.items()}, outputs


def compare(
    spec: ComponentSpec,
    precision: Precision,
    sizes: Mapping[str, int],
    expected: Mapping[str, np.ndarray],
    actual: Mapping[str, np.ndarray],
) -> Parity:
    """Per-output max |actual - expected| against the spec's budget for `precision`."""
    tolerance = spec.tolerance(precision)
    max_abs, limit = {}, {}
    passed = True
    for name, reference in expected.items():
        got = np.asarray(actual[name], dtype=np.float32)
        if got.shape != reference.shape:
            max_abs[name], limit[name], passed = float("inf"), 0.0, False
            continue
        difference = np.abs(got - reference)
        worst = float(np.nanmax(difference)) if difference.size else 0.0
        if not np.isfinite(got).all():
            worst = float("inf")
        max_abs[name] = worst
        limit[name] = tolerance.limit(float(np.abs(reference).max()) if reference.size else 0.0)
        passed = passed and worst <= limit[name]
    return Parity(sizes=dict(sizes), max_abs=max_abs, limit=limit, passed=passed)


def measure(
    spec: ComponentSpec,
    precision: Precision,
    inputs: Mapping[str, np.ndarray],
    expected: Mapping[str, np.ndarray],
    run: Callable[[Mapping[str, np.ndarray]], Mapping[str, np.ndarray]],
    sizes: Mapping[str, int],
) -> Parity:
    """Run the exported component on `inputs` and compare with PyTorch's `expected`."""
    return compare(spec, precision, sizes, expected, run(inputs))
