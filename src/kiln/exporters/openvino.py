"""Export a component to OpenVINO IR with `openvino.convert_model`, from the torch module.

Converting from the module (rather than from the ONNX file) skips a second export, takes
seconds instead of the dynamo exporter's tens of seconds, and gives OpenVINO the bounded
dynamic dimensions of the spec directly. Weights are saved at fp32
(`compress_to_fp16=False`): `ov.save_model` would otherwise halve them silently, and
precision is kiln's decision per variant, recorded in the manifest.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import BackendUnavailableError, ExportError, first_line
from kiln.exporters.onnx import ExportedGraph
from kiln.models.spec import ComponentSpec, Dim

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.xml"


def export_openvino(module: torch.nn.Module, spec: ComponentSpec, folder: Path) -> ExportedGraph:
    """Write `folder/model.xml` + `model.bin` with the spec's input names and ranges."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailableError(
            "openvino is not installed: pip install 'kiln[openvino]'"
        ) from None
    import torch

    sample = spec.sample_inputs(spec.export_sizes())
    shapes = [
        ov.PartialShape(
            [ov.Dimension(e.min, e.max) if isinstance(e, Dim) else e for e in tensor.shape]
        )
        for tensor in spec.inputs
    ]
    module.eval()
    try:
        # Tracing warnings (Python conditions on shapes) are expected and not actionable.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
            warnings.simplefilter("ignore")
            model = ov.convert_model(module, example_input=tuple(sample.values()), input=shapes)
    except Exception as exc:  # the frontend raises a wide range of types
        message = first_line(exc)
        raise ExportError(f"openvino could not convert {spec.name}: {message}") from exc
    for port, tensor in zip(model.inputs, spec.inputs, strict=True):
        port.get_tensor().set_names({tensor.name})
    for port, tensor in zip(model.outputs, spec.outputs, strict=True):
        port.get_tensor().set_names({tensor.name})
    ov.save_model(model, str(folder / MODEL_FILE), compress_to_fp16=False)
    return ExportedGraph(
        entry=MODEL_FILE, opset=None, exporter=f"openvino.convert_model-{ov.__version__}"
    )
