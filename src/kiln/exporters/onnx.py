"""Export a component to ONNX with `torch.onnx`, reading names and dynamic axes from its spec."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kiln.errors import ExportError, first_line
from kiln.models.spec import ComponentSpec

if TYPE_CHECKING:
    import torch

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportedGraph:
    """What an exporter wrote: the entry file (relative to its folder) and how."""

    entry: str
    opset: int | None
    exporter: str


def export_onnx(
    module: torch.nn.Module,
    spec: ComponentSpec,
    folder: Path,
    *,
    opset: int | None = None,
    exporter: str = "dynamo",
) -> ExportedGraph:
    """Write `folder/model.onnx` (+ external weights) with the spec's dynamic axes.

    The dynamo exporter (torch's default) writes one `model.onnx.data` file at any size;
    `exporter="torchscript"` is the legacy one: many times faster to export small models,
    but deprecated and writing one file per tensor above 2 GB.
    """
    import onnx
    import torch

    if exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"unknown ONNX exporter {exporter!r} (use dynamo or torchscript)")
    sample = spec.sample_inputs(spec.export_sizes())
    dynamic_axes = {
        t.name: t.dynamic_axes() for t in (*spec.inputs, *spec.outputs) if t.dynamic_axes()
    }
    path = folder / MODEL_FILE
    kwargs = {"dynamo": exporter == "dynamo"}
    if exporter == "dynamo":
        kwargs.update(external_data=True, verbose=False)
    if opset is not None:
        kwargs["opset_version"] = opset
    module.eval()
    # torch configures its own loggers on import; its notes about torchvision ops are noise here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        # Tracing warnings (constant folding, shape guards) are expected and not actionable.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            with torch.no_grad():
                torch.onnx.export(
                    module,
                    tuple(sample.values()),
                    str(path),
                    input_names=list(spec.input_names),
                    output_names=list(spec.output_names),
                    dynamic_axes=dynamic_axes,
                    **kwargs,
                )
    except Exception as exc:  # torch.onnx raises a wide range of types
        message = first_line(exc)
        raise ExportError(f"torch.onnx could not export {spec.name}: {message}") from exc
    model = onnx.load(str(path), load_external_data=False)
    _check_io_names(model, spec)
    opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return ExportedGraph(entry=MODEL_FILE, opset=opset_used, exporter=f"torch.onnx-{exporter}")


def _check_io_names(model, spec: ComponentSpec) -> None:
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    # Exporters drop inputs the graph does not use (e.g. a token-id input folded away).
    if not set(inputs) <= set(spec.input_names) or outputs != list(spec.output_names):
        raise ExportError(
            f"{spec.name}: exported graph has inputs {inputs} and outputs {outputs}, "
            f"the spec says {list(spec.input_names)} and {list(spec.output_names)}"
        )
