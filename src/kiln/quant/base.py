"""The contract every quantization backend implements.

A backend reads one fp32 variant folder and writes one quantized variant into a staging
folder. It never touches the manifest: the runner (`kiln.quant.runner`) hashes, measures
drift, and records the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from kiln.models.spec import ComponentSpec
from kiln.quant.recipes import QuantRecipe

#: One call's inputs to a component, named as in its spec.
Feeds = Mapping[str, np.ndarray]
#: Receives short progress texts ("calibrating 3/8", "compressing weights").
StepCallback = Callable[[str], None]


@dataclass(frozen=True)
class QuantizedGraph:
    """What a backend wrote into its output folder.

    `layers` says which layers got what, by operator type then precision, e.g.
    `{"MatMul": {"int4": 72}, "Conv": {"int8": 22, "fp32": 1}}`.
    `runtime_options` travel to the session through the variant's options; for OpenVINO
    `{"openvino_config": {"INFERENCE_PRECISION_HINT": "bf16"}}` records the precision the
    variant was measured with.
    """

    entry: str
    layers: Mapping[str, Mapping[str, int]]
    details: Mapping[str, Any] = field(default_factory=dict)
    runtime_options: Mapping[str, Any] = field(default_factory=dict)


class Quantizer(Protocol):
    def __call__(
        self,
        source: Path,
        entry: str,
        spec: ComponentSpec,
        recipe: QuantRecipe,
        calibration: Sequence[Feeds],
        out: Path,
        progress: StepCallback,
    ) -> QuantizedGraph:
        """Quantize `source/entry` (an fp32 variant folder) into the empty folder `out`.

        `calibration` holds real inputs recorded from the fp32 pipeline; it is empty unless
        `recipe.needs_calibration`.
        """


def quantizer_for(target: str) -> Quantizer:
    """The backend function for `target`, imported only when used."""
    if target == "onnx":
        from kiln.quant.onnx import quantize_onnx

        return quantize_onnx
    if target == "openvino":
        from kiln.quant.openvino import quantize_openvino

        return quantize_openvino
    if target == "torch":
        from kiln.quant.torch import quantize_torch

        return quantize_torch
    from kiln.errors import InvalidRequestError

    raise InvalidRequestError(f"kiln cannot quantize {target} variants")
