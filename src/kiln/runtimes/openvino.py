"""OpenVINO `Session`: a compiled IR model on any device OpenVINO reports.

The inference precision hint is always set: on CPUs with bf16 support OpenVINO runs f32
models in bf16 unless told otherwise (UNet max abs diff 3e-2 instead of 3e-6), so an fp32
variant is compiled with "f32" unless the plan says otherwise. Compiled blobs are cached
(`CACHE_DIR`) so a second start, even in a new process, skips compilation.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, BackendUnavailableError
from kiln.models.spec import ComponentSpec
from kiln.runtimes.base import Session

PRECISION_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def cache_dir() -> Path:
    """Where compiled models are cached: $KILN_CACHE_DIR/openvino or ~/.cache/kiln/openvino."""
    root = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(root) / "openvino"


def default_static_shapes() -> int:
    """How many static-shape copies a session may compile ($KILN_OPENVINO_STATIC_SHAPES, 0).

    Off by default, as measured on an SD 1.5 UNet (512x512, batch 2, f32, 2-core AVX-512 CPU):
    a static copy runs a step in 8.3-8.8 s against 9.5-10.4 s dynamic, but compiling it costs
    about 10 s on the second call and doubles resident memory (7.2 -> 13.9 GiB). It pays for
    long runs at one size on machines with memory to spare.
    """
    return int(os.environ.get("KILN_OPENVINO_STATIC_SHAPES", "0"))


class OpenVinoSession(Session):
    runtime = "openvino"

    def __init__(
        self,
        model_path: str | Path,
        spec: ComponentSpec,
        *,
        device: str = "CPU",
        precision: str = "fp32",
        config: Mapping[str, Any] | None = None,
        use_cache: bool = True,
        static_shapes: int | None = None,
    ) -> None:
        try:
            import openvino as ov
        except ImportError:
            raise BackendUnavailableError(
                "openvino is not installed: pip install 'kiln[openvino]'"
            ) from None
        core = ov.Core()
        if device.split(".")[0] not in {d.split(".")[0] for d in core.available_devices} | {"AUTO"}:
            raise BackendUnavailableError(
                f"OpenVINO has no {device} device here (has {core.available_devices})"
            )
        settings: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if precision in PRECISION_HINTS and device.startswith("CPU"):
            settings["INFERENCE_PRECISION_HINT"] = PRECISION_HINTS[precision]
        settings.update({k: str(v) for k, v in (config or {}).items()})
        if use_cache:
            cache_dir().mkdir(parents=True, exist_ok=True)
            settings["CACHE_DIR"] = str(cache_dir())
        self._core, self._path = core, str(model_path)
        self.spec = spec
        self.device = device
        self.settings = settings
        self.static_shapes = default_static_shapes() if static_shapes is None else static_shapes
        self._request = self._compile(None)
        self._input_names = {port.get_any_name() for port in self._request.model_inputs}
        self._static: OrderedDict[tuple, Any] = OrderedDict()
        self._seen: Counter[tuple] = Counter()

    def _compile(self, shapes: Mapping[str, tuple[int, ...]] | None) -> Any:
        """An infer request on the dynamic model, or on a copy reshaped to fixed `shapes`."""
        try:
            model = self._core.read_model(self._path)
            if shapes:
                model.reshape({name: list(shape) for name, shape in shapes.items()})
            return self._core.compile_model(
                model, self.device, self.settings
            ).create_infer_request()
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"OpenVINO cannot load {self._path}: {message}") from None

    def _request_for(self, feed: Mapping[str, np.ndarray]) -> Any:
        """Static shapes run faster on OpenVINO; compile one for a shape seen a second time.

        A diffusion loop calls the UNet with the same shapes every step, so the first step
        runs dynamic and the rest static. At most `static_shapes` compiled shapes are kept
        (each holds its own copy of the weights), least recently used dropped first.
        """
        key = tuple(sorted((name, value.shape) for name, value in feed.items()))
        if key in self._static:
            self._static.move_to_end(key)
            return self._static[key]
        self._seen[key] += 1
        if self.static_shapes < 1 or self._seen[key] < 2:
            return self._request
        self._static[key] = self._compile(dict(key))
        while len(self._static) > self.static_shapes:
            self._static.popitem(last=False)
        return self._static[key]

    @property
    def static_shapes_compiled(self) -> list[tuple]:
        return list(self._static)

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: value for name, value in inputs.items() if name in self._input_names}
        # Infer requests are reused across calls; results are copied because a request owns
        # and reuses its output buffers.
        results = self._request_for(feed).infer(feed)
        return {port.get_any_name(): np.array(value) for port, value in results.items()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "settings": dict(self.settings)}
