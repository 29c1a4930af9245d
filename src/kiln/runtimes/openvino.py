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
import json
import os
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kiln.artifacts import atomic_write_text
from kiln.errors import ArtifactError, BackendUnavailableError, first_line
from kiln.models.spec import ComponentSpec
from kiln.runtimes.base import Session
from kiln.runtimes.kv_cache import KVStream, cache_pairs
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


SHAPES_FILE = "static-shapes.json"
#: Components whose shapes are remembered, at most (the oldest are forgotten first).
REMEMBERED_COMPONENTS = 256


def remembered_shapes(key: str | None) -> list[tuple]:
    """The input shapes `key` (artifact folder and component) was compiled static for."""
    if key is None:
        return []
    try:
        entries = json.loads((cache_dir() / SHAPES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    shapes = entries.get(key, []) if isinstance(entries, dict) else []
    return [tuple((name, tuple(dims)) for name, dims in shape) for shape in shapes]


def remember_shapes(key: str | None, shape: tuple) -> None:
    """Add a static shape set to `key`'s memory (last used last). Written atomically; two
    processes writing at once lose one shape at worst, compiled static again later."""
    if key is None:
        return
    path = cache_dir() / SHAPES_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        entries = {}
    shapes = [s for s in remembered_shapes(key) if s != shape] + [shape]
    entries.pop(key, None)  # the most recently used component last, the first forgotten
    entries[key] = [[[name, list(dims)] for name, dims in s] for s in shapes[-8:]]
    while len(entries) > REMEMBERED_COMPONENTS:
        entries.pop(next(iter(entries)))
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(entries) + "\n")


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
        shapes_key: str | None = None,
    ) -> None:
        """`static_shapes`: how many fixed-shape copies to compile (see `_request_for`);
        `shapes_key` names the component across variants and processes (artifact folder and
        component), so the shapes it ran at are compiled static from the start next time."""
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
        # A deployed decoder-with-past runs as a stateful model (its cache kept inside); the
        # plain graph, another copy of the weights, is compiled only if `run` is called.
        self._pairs = cache_pairs(spec) if use_cache else ()
        self._stateful = self._compile(None, self._make_stateful) if self._pairs else None
        self._shapes_key = shapes_key if use_cache and not self._pairs else None
        self._static: OrderedDict[tuple, Any] = OrderedDict()
        remembered = remembered_shapes(self._shapes_key) if self.static_shapes > 0 else []
        for key in remembered[-self.static_shapes :]:
            self._static[key] = self._compile(dict(key))
        # With static copies for the shapes this component runs at, the dynamic graph is
        # compiled only when another shape comes.
        self._stateless = None if (self._pairs or self._static) else self._compile(None)
        self._input_names = {
            port.get_any_name() for port in self._core.read_model(self._path).inputs
        }
        self._seen: Counter[tuple] = Counter()
        self._ran: set[object] = set()
        self._streams = 1
        if settings["PERFORMANCE_HINT"] == "THROUGHPUT":
            compiled = self._request.get_compiled_model()
            self._streams = int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        self._queue: Any = None

    @property
    def _request(self) -> Any:
        if self._stateless is None:
            self._stateless = self._compile(None)
        return self._stateless

    def _compile(
        self,
        shapes: Mapping[str, tuple[int, ...]] | None,
        transform: Callable[[Any], None] | None = None,
    ) -> Any:
        """An infer request on the dynamic model, or on a copy reshaped to fixed `shapes`."""
        try:
            model = self._core.read_model(self._path)
            if self._replaced:
                _replace_constants(model, self._replaced)
            if shapes:
                model.reshape({name: list(shape) for name, shape in shapes.items()})
            settings = dict(self.settings)
            if transform is not None:
                transform(model)
                # The cache state keeps the precision the graph computes in (OpenVINO would
                # otherwise compress it to u8 on CPUs, away from the parity measured).
                hint = settings.get("INFERENCE_PRECISION_HINT")
                if hint in PRECISION_HINTS.values():
                    settings["KV_CACHE_PRECISION"] = hint
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
            message = first_line(exc)
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
        if self._pairs:
            self._stateful = self._compile(None, self._make_stateful)
        self._stateless, self._queue = request, None
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
        remember_shapes(self._shapes_key, key)
        while len(self._static) > self.static_shapes:
            self._static.popitem(last=False)
        if self._streams == 1:
            self._stateless = None  # its weights, for the next new shape (from the cache)
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
        self._after_run(id(ran))
        return outputs

    def _after_run(self, compiled: object) -> None:
        if compiled not in self._ran:
            # The first inference repacks the weights; the mapped originals are not read again.
            self._ran.add(compiled)
            drop_mapped_pages(self._weight_files())

    def _make_stateful(self, model: Any) -> None:
        make_stateful(model, self._pairs)

    def open_kv_stream(
        self, constants: Mapping[str, np.ndarray], groups: np.ndarray | None = None
    ) -> KVStream:
        if self._stateful is None:
            return super().open_kv_stream(constants, groups)
        return OpenVinoKVStream(self, constants, groups)

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
        for request in (self._stateless, self._stateful, *self._static.values()):
            if request is not None:
                request.get_compiled_model().release_memory()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "settings": dict(self.settings), "streams": self._streams}


BEAM_IDX = "beam_idx"


def make_stateful(model: Any, pairs: Iterable[tuple[str, str]]) -> None:
    """Turn (past input, present output) pairs into state, with the beam reorder fused in.

    As optimum-intel does for LLMs: a `beam_idx` input gathers the state's rows at the start
    of each step (beam search's reorder, without the cache leaving the runtime), and each
    state starts empty, with the batch of `attention_mask`, when a request is new.
    """
    import openvino as ov
    from openvino import opset13
    from openvino._offline_transformations import apply_make_stateful_transformation

    pairs = dict(pairs)
    rows = model.input("attention_mask")
    beam_idx = opset13.parameter(
        name=BEAM_IDX, dtype=ov.Type.i32, shape=ov.PartialShape([rows.get_partial_shape()[0]])
    )
    beam_idx.output(0).get_tensor().add_names({BEAM_IDX})
    model.add_parameters([beam_idx])
    axis = opset13.constant(0)
    for name in pairs:
        port = model.input(name)
        consumers = port.get_target_inputs()
        gathered = opset13.gather(port, beam_idx, axis)
        for consumer in consumers:
            consumer.replace_source_output(gathered.output(0))
    model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(model, pairs)
    batch = opset13.gather(
        opset13.shape_of(rows, output_type="i64"), opset13.constant([0]), opset13.constant(0)
    )
    for op in model.get_ops():
        if op.get_type_name() != "ReadValue":
            continue
        dims = [dim.min_length for dim in op.get_output_partial_shape(0)]
        parts = [batch] + [opset13.constant(np.array([d], dtype=np.int64)) for d in dims[1:]]
        zero = opset13.constant(0.0, dtype=op.get_output_element_type(0))
        op.set_arguments([opset13.broadcast(zero, opset13.concat(parts, axis=0))])
    model.validate_nodes_and_infer_types()


class OpenVinoKVStream(KVStream):
    """The cache as the state of a stateful model's infer request (one request per call).

    The constants are set once on the request as shared memory; each step passes only the
    per-step inputs and `beam_idx`, the pending beam reorder (identity when none).
    """

    def __init__(
        self,
        session: OpenVinoSession,
        constants: Mapping[str, np.ndarray],
        groups: np.ndarray | None = None,
    ) -> None:
        super().__init__(session.spec, constants, groups)
        self.session = session
        self._request = session._stateful.get_compiled_model().create_infer_request()
        self._inputs = {port.get_any_name() for port in self._request.model_inputs}
        self._outputs = [port.get_any_name() for port in self._request.model_outputs]
        self._beam_idx: np.ndarray | None = None
        self._constants_changed()

    def _constants_changed(self) -> None:
        import openvino as ov

        for name, value in self.constants.items():
            self._request.set_tensor(name, ov.Tensor(value, shared_memory=True))

    def _step(self, inputs: Mapping[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
        feed = {k: np.ascontiguousarray(v) for k, v in inputs.items() if k in self._inputs}
        feed[BEAM_IDX] = (
            np.arange(batch, dtype=np.int32) if self._beam_idx is None else self._beam_idx
        )
        self._beam_idx = None
        self._request.infer(feed, share_inputs=True, share_outputs=True)
        self.session._after_run("stateful")  # every stream's request shares its weights
        # Output tensors belong to the request and are overwritten by the next step.
        return {name: np.array(self._request.get_tensor(name).data) for name in self._outputs}

    def _reorder(self, beam_idx: np.ndarray) -> None:
        order = beam_idx.astype(np.int32)
        self._beam_idx = order if self._beam_idx is None else self._beam_idx[order]


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
