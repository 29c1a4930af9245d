"""OpenVINO `Session`: a compiled IR model on any device OpenVINO reports.

The inference precision hint is always set: on CPUs with bf16 support OpenVINO runs f32
models in bf16 unless told otherwise (UNet max abs diff 3e-2 instead of 3e-6), so an fp32
variant is compiled with "f32" unless the plan says otherwise. Compiled blobs are cached
(`CACHE_DIR`) so a second start, even in a new process, skips compilation. Once a compiled
model has run, the pages of the weight files it copied from are given back
(`kiln.runtimes.pages`).
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter, OrderedDict
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ArtifactError, BackendUnavailableError
from kiln.models.spec import ComponentSpec
from kiln.runtimes.base import Session
from kiln.runtimes.pages import drop_mapped_pages

PRECISION_HINTS = {"fp32": "f32", "fp16": "f16", "bf16": "bf16"}


def cache_dir() -> Path:
    """Where compiled models are cached: $KILN_CACHE_DIR/openvino or ~/.cache/kiln/openvino."""
    root = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(root) / "openvino"


def cache_limit_bytes() -> int:
    """How large the compiled-model cache may grow ($KILN_CACHE_MAX_GB, default 16)."""
    return int(float(os.environ.get("KILN_CACHE_MAX_GB", "16")) * 2**30)


def prune_cache(folder: Path, limit: int, keep: Iterable[Path] = ()) -> list[Path]:
    """Delete the oldest blobs until `folder` holds at most `limit` bytes; `keep` stays.

    OpenVINO never evicts: every variant, precision hint and static shape adds a blob the
    size of its weights (a day of quantizing SD 1.5 left 17 GB). A blob in use by another
    process stays readable after deletion; the next start of its model compiles it anew.
    """
    kept = {Path(path) for path in keep}
    files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in files)
    removed = []
    for path in files:
        if total <= limit:
            break
        if path in kept:
            continue
        size = path.stat().st_size
        with contextlib.suppress(OSError):
            path.unlink()
            total -= size
            removed.append(path)
    return removed


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
        if settings["PERFORMANCE_HINT"] == "THROUGHPUT" and not _splittable(spec):
            # A call that is not split would run on one stream's share of the cores.
            settings["PERFORMANCE_HINT"] = "LATENCY"
        if use_cache:
            cache_dir().mkdir(parents=True, exist_ok=True)
            settings["CACHE_DIR"] = str(cache_dir())
        self._core, self._path = core, str(model_path)
        self._replaced: Mapping[str, np.ndarray] = {}
        self.spec = spec
        self.device = device
        self.settings = settings
        self.static_shapes = default_static_shapes() if static_shapes is None else static_shapes
        self._request = self._compile(None)
        self._input_names = {port.get_any_name() for port in self._request.model_inputs}
        self._static: OrderedDict[tuple, Any] = OrderedDict()
        self._seen: Counter[tuple] = Counter()
        self._ran: set[int] = set()
        self._streams = 1
        if settings["PERFORMANCE_HINT"] == "THROUGHPUT":
            compiled = self._request.get_compiled_model()
            self._streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue: Any = None

    def _compile(self, shapes: Mapping[str, tuple[int, ...]] | None) -> Any:
        """An infer request on the dynamic model, or on a copy reshaped to fixed `shapes`."""
        try:
            model = self._core.read_model(self._path)
            if self._replaced:
                _replace_constants(model, self._replaced)
            if shapes:
                model.reshape({name: list(shape) for name, shape in shapes.items()})
            settings = dict(self.settings)
            if self._replaced:  # a blob per LoRA combination would only fill the cache
                settings.pop("CACHE_DIR", None)
            cache = Path(settings["CACHE_DIR"]) if "CACHE_DIR" in settings else None
            before = set(cache.iterdir()) if cache else set()
            compiled = self._core.compile_model(model, self.device, settings)
            if cache is not None and (made := set(cache.iterdir()) - before):
                prune_cache(cache, cache_limit_bytes(), keep=made)
                # Imported from its new blob, the same model runs in less memory than as
                # compiled from the IR (SD 1.5 int8 plan peak 3.03 -> 2.71 GiB) for ~2 s.
                del compiled
                compiled = self._core.compile_model(model, self.device, settings)
            return compiled.create_infer_request()
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long texts
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ArtifactError(f"OpenVINO cannot load {self._path}: {message}") from None

    def stored_weights(self, names: Collection[str]) -> dict[str, np.ndarray]:
        constants = _constants(self._core.read_model(self._path), names, self._path)
        return {name: node.get_data().astype(np.float32) for name, node in constants.items()}

    def replace_weights(self, values: Mapping[str, np.ndarray]) -> None:
        """Recompile from the IR with these constants replaced (compiled blobs are not cached)."""
        previous, self._replaced = self._replaced, dict(values)
        try:
            request = self._compile(None)
        except ArtifactError:
            self._replaced = previous
            raise
        self._request, self._queue = request, None
        self._static.clear()
        self._seen.clear()

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
        if self._streams > 1 and (batch := min(len(value) for value in feed.values())) > 1:
            outputs, ran = self._run_split(feed, min(batch, self._streams)), self._queue
        else:
            # Infer requests are reused across calls; results are copied because a request
            # owns and reuses its output buffers.
            ran = self._request_for(feed)
            results = ran.infer(feed)
            outputs = {port.get_any_name(): np.array(value) for port, value in results.items()}
        if id(ran) not in self._ran:
            # The first inference repacks the weights; the mapped originals are not read again.
            self._ran.add(id(ran))
            drop_mapped_pages(self._weight_files())
        return outputs

    def _run_split(self, feed: Mapping[str, np.ndarray], parts: int) -> dict[str, np.ndarray]:
        """One batch as `parts` requests on parallel streams (the THROUGHPUT hint's streams).

        Measured on a 2-core CPU: BLIP-base vision, 4 images, bf16: 1.15 s against 1.39 s as
        one request; an SD 1.5 UNet batch 2 (int8): 3.39 s against 3.49 s.
        """
        import openvino as ov

        if self._queue is None:
            self._queue = ov.AsyncInferQueue(self._request.get_compiled_model(), self._streams)
        results: dict[int, dict[str, np.ndarray]] = {}

        def keep(request: Any, index: int) -> None:
            results[index] = {p.get_any_name(): np.array(v) for p, v in request.results.items()}

        self._queue.set_callback(keep)
        chunks = {name: np.array_split(value, parts) for name, value in feed.items()}
        for index in range(parts):
            self._queue.start_async({name: c[index] for name, c in chunks.items()}, index)
        self._queue.wait_all()
        return {
            name: np.concatenate([results[i][name] for i in range(parts)]) for name in results[0]
        }

    def _weight_files(self) -> list[Path]:
        files = [Path(self._path).with_suffix(".bin")]
        if "CACHE_DIR" in self.settings:
            files.append(Path(self.settings["CACHE_DIR"]))
        return files

    def release_memory(self) -> None:
        for request in (self._request, *self._static.values()):
            request.get_compiled_model().release_memory()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "settings": dict(self.settings), "streams": self._streams}


def _splittable(spec: ComponentSpec) -> bool:
    """True when a batch of this component gains from being split over streams.

    Every tensor must have the batch as its first axis. Decoder steps with a past cache are
    left whole: their calls are too short to gain (BLIP-base, 4 captions of 20 tokens, bf16:
    3.10 s split against 2.93 s whole).
    """
    if any(t.name.startswith("past") for t in spec.inputs):
        return False

    def leading(shape: tuple) -> str:
        first = shape[0] if shape else None
        return getattr(first, "name", first)

    tensors = (*spec.inputs, *spec.outputs)
    return bool(tensors) and all(leading(t.shape) == "batch" for t in tensors)


def _constants(model: Any, names: Collection[str], path: str) -> dict[str, Any]:
    """The named weight constants; for weights stored fp16, the constant behind the Convert."""
    found = {}
    for node in model.get_ops():
        name = node.get_friendly_name()
        if name not in names:
            continue
        if node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Constant" or not node.get_element_type().is_real():
            raise ArtifactError(f"{path}: weight {name} is not a float constant")
        found[name] = node
    missing = sorted(set(names) - set(found))
    if missing:
        raise ArtifactError(f"{path} has no weight {missing[0]!r}")
    return found


def _replace_constants(model: Any, values: Mapping[str, np.ndarray]) -> None:
    import openvino as ov

    for name, node in _constants(model, values, "the model").items():
        dtype = node.get_data().dtype
        fresh = ov.op.Constant(np.ascontiguousarray(values[name], dtype=dtype))
        fresh.set_friendly_name(name)
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(fresh.output(0))
