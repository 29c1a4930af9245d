"""kiln: compile Stable Diffusion and BLIP models for the hardware at hand.

    import kiln
    kiln.export("path/to/sd-model", "sd-onnx")          # components -> ONNX, parity checked
    kiln.quantize("sd-onnx", "int8")                       # + int8 variants, drift recorded
    deployment = kiln.load("sd-onnx")                      # verified, best variant per component
    image = deployment.generate("a lighthouse at dusk", seed=7).images[0]

`import kiln` stays light: torch, diffusers and the backends load when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from kiln.exporters.runner import export
    from kiln.pipelines.deployment import Deployment, load
    from kiln.quant.runner import quantize

_LAZY = {
    "export": "kiln.exporters.runner",
    "load": "kiln.pipelines.deployment",
    "Deployment": "kiln.pipelines.deployment",
    "quantize": "kiln.quant.runner",
}

__all__ = ["Deployment", "__version__", "export", "load", "quantize"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
