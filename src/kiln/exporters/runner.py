"""`kiln.export()`: source model -> artifact folder, one component at a time.

For each component: export into a staging folder, measure parity against PyTorch at a
shape the export did not trace, refuse the variant if it misses its budget (unless the
caller accepts that knowingly), then move it into place and record it in the manifest.
Components are exported and freed one by one so that peak memory stays near the size of
the largest component rather than the whole pipeline.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from kiln import __version__
from kiln.artifacts import (
    SUPPORT_DIR,
    Manifest,
    Parity,
    StagingFolder,
    Variant,
    check_output_folder,
    file_entries,
    read_manifest,
    staging_folder,
    variant_folder,
    write_manifest,
)
from kiln.errors import ArtifactError, ExportError
from kiln.models.lora import LoraFile
from kiln.models.sources import LoadedModel, load_source
from kiln.models.spec import ComponentSpec, Precision
from kiln.runtimes.pages import drop_mapped_pages

if TYPE_CHECKING:
    from kiln.exporters.tensorrt import EngineOptions

TARGETS = ("onnx", "openvino", "torch", "tensorrt")


@dataclass(frozen=True)
class ExportEvent:
    """A progress report: `stage` is one of start, exported, optimized, parity, done."""

    component: str
    stage: str
    index: int
    total: int
    detail: str = ""


ProgressCallback = Callable[[ExportEvent], None]


@dataclass(frozen=True)
class ExportOptions:
    """How to export: targets, exporter settings, and what to check."""

    targets: tuple[str, ...] = ("onnx",)
    opset: int | None = None
    exporter: str = "dynamo"
    check_parity: bool = True
    allow_parity_failure: bool = False
    optimize: bool = False


def export(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    targets: Sequence[str] = ("onnx",),
    components: Sequence[str] | None = None,
    config: str | None = None,
    opset: int | None = None,
    exporter: str = "dynamo",
    check_parity: bool = True,
    allow_parity_failure: bool = False,
    optimize: bool = False,
    with_attentions: bool = False,
    loras: Sequence[str | LoraFile] = (),
    engines: EngineOptions | None = None,
    progress: ProgressCallback | None = None,
) -> Manifest:
    """Export `source` into the artifact folder `out` and return its manifest.

    Optional components (the BLIP decoder that outputs cross-attention weights) are
    exported when named in `components` or, with the default components, by
    `with_attentions=True`. `loras` (Stable Diffusion: `"FILE"`, `"FILE:SCALE"` or `LoraFile`)
    are fused into the weights first, in order; the manifest's source records each one.

    `optimize=True` tries onnxruntime's graph fusions per component and keeps them only
    where they are measurably faster (the decision is recorded in the variant's options).

    Target `tensorrt` builds engines (`engines`: precisions, shape range) from onnx fp32
    variants: exported first from a source model, or those of an artifact given as `source`
    (then `out` is that artifact). Where engines cannot be built (no NVIDIA GPU, no TensorRT)
    it refuses before any work.
    """
    options = ExportOptions(
        tuple(targets), opset, exporter, check_parity, allow_parity_failure, optimize
    )
    unknown = [t for t in options.targets if t not in TARGETS]
    if unknown:
        raise ExportError(f"unknown target {unknown[0]!r}; available targets: {', '.join(TARGETS)}")
    with_engines = "tensorrt" in options.targets
    if with_engines:
        from kiln.exporters import tensorrt

        engines = engines or tensorrt.EngineOptions()
        tensorrt.check_can_build(precisions=engines.precisions)
        if tensorrt.is_artifact(source):
            return _engines_for_artifact(
                source, out, options.targets, components, engines, progress
            )
        # Engines are built from the onnx fp32 variants, which this export writes.
        onnx_first = ("onnx", *(t for t in options.targets if t != "tensorrt"))
        options = replace(options, targets=tuple(dict.fromkeys(onnx_first)))
    out = check_output_folder(out, "export folder")
    lora_files = [x if isinstance(x, LoraFile) else LoraFile.parse(x) for x in loras]
    model = load_source(source, config=config)
    if lora_files:
        if not hasattr(model, "fuse_loras"):
            raise ExportError(
                f"LoRAs are for Stable Diffusion; {model.source.id} is a {model.family} model"
            )
        model.fuse_loras(lora_files)
    specs = model.specs()
    chosen = list(components or (n for n, s in specs.items() if with_attentions or not s.optional))
    missing = [c for c in chosen if c not in specs]
    if missing:
        raise ExportError(
            f"{model.source.id} has no component {missing[0]!r}; it has {', '.join(specs)}"
        )
    if with_attentions and not any(specs[c].optional for c in chosen):
        raise ExportError(
            f"{model.source.id} has no decoder with attention outputs; --with-attentions is "
            "for BLIP and BLIP-2 captioning models"
        )
    if with_engines:  # a range the specs refuse is refused before anything is written
        tensorrt.engine_profiles(
            {c: specs[c] for c in chosen}, model.family, model.model_info(), engines.shape_range
        )
    # Optional components are described only once exported: a listed component has variants.
    described = {n: s for n, s in specs.items() if not s.optional or n in chosen}
    manifest = _open_manifest(out, model, described)
    model.will_export(chosen)
    report = progress or (lambda event: None)
    for index, component in enumerate(chosen, start=1):
        job = _ComponentExport(out, specs[component], options, report, index, len(chosen))
        for variant in job.run(model):
            manifest = manifest.with_variant(variant)
            write_manifest(out, manifest)
            report(ExportEvent(component, "done", index, len(chosen), _summary(variant)))
    if with_engines:
        manifest = tensorrt.build_engines(out, components=chosen, options=engines, progress=report)
    return manifest


def _engines_for_artifact(
    artifact: str | os.PathLike[str],
    out: str | os.PathLike[str],
    targets: Sequence[str],
    components: Sequence[str] | None,
    engines: EngineOptions,
    progress: ProgressCallback | None,
) -> Manifest:
    """Engines built from an artifact's onnx fp32 variants go into that artifact."""
    from kiln.exporters.tensorrt import build_engines

    if Path(out).resolve() != Path(artifact).resolve():
        raise ExportError(
            f"TensorRT engines are added to the artifact they are built from: use -o {artifact}"
        )
    others = [t for t in targets if t != "tensorrt"]
    if others:
        raise ExportError(
            f"{artifact} is an artifact: it takes --target tensorrt only ({others[0]} variants "
            "are exported from the source model)"
        )
    return build_engines(artifact, components=components, options=engines, progress=progress)


def _open_manifest(out: Path, model: LoadedModel, specs: dict[str, ComponentSpec]) -> Manifest:
    """The folder's manifest, new or existing; refuses a folder that holds another model."""
    if out.exists() and any(out.iterdir()):
        try:
            existing = read_manifest(out)
        except ArtifactError:
            raise ExportError(
                f"{out} exists, is not empty and is not a kiln artifact; choose another folder"
            ) from None
        if existing.source.get("revision") != model.source.revision:
            raise ExportError(
                f"{out} already holds an artifact of {existing.source.get('id')}; "
                "export a different model into another folder"
            )
        if existing.source.get("loras", []) != model.source.to_dict().get("loras", []):
            raise ExportError(
                f"{out} holds {existing.source.get('id')} with other LoRAs fused in; "
                "export this combination into another folder"
            )
        # An artifact made before a component existed (the attention decoder) gains its spec.
        added = {n: s.to_dict() for n, s in specs.items() if n not in existing.components}
        return replace(existing, components={**existing.components, **added})
    out.mkdir(parents=True, exist_ok=True)
    with staging_folder(out / SUPPORT_DIR) as staging:
        model.save_support_files(staging)
    manifest = Manifest(
        family=model.family,
        source=model.source.to_dict(),
        model_info=model.model_info(),
        components={name: spec.to_dict() for name, spec in specs.items()},
        support_files=file_entries(out, out / SUPPORT_DIR),
        kiln_version=__version__,
    )
    write_manifest(out, manifest)
    return manifest


@dataclass
class _Staged:
    """One target's export, waiting in its staging folder for its checks."""

    target: str
    staging: StagingFolder
    entry: str = ""
    opset: int = 0
    exporter: str = ""
    seconds: float = 0.0
    parity: Parity | None = None
    options: dict = field(default_factory=dict)


@dataclass
class _ComponentExport:
    """Export one component to every target, then check each, then move them into place.

    PyTorch's reference outputs are computed first and the torch module is released
    before any runtime session loads, so both never sit in memory together.
    """

    out: Path
    spec: ComponentSpec
    options: ExportOptions
    report: ProgressCallback
    index: int
    total: int

    def run(self, model: LoadedModel) -> list[Variant]:
        from kiln.exporters import parity as parity_check

        module = model.export_module(self.spec.name)
        reference = (
            parity_check.reference_outputs(module, self.spec) if self.options.check_parity else None
        )
        staged: list[_Staged] = []
        try:
            for target in self.options.targets:
                staged.append(_Staged(target, StagingFolder(self._final(target))))
                self._export(module, staged[-1])
                self._record_weight_map(model, module, staged[-1])
            del module
            model.release(self.spec.name)
            release_memory()
            # The exported graph keeps tensors aliasing the source weights' file mapping
            # alive; its pages can go (SD 1.5 export peak RSS: 7.36 -> 4.22 GiB).
            drop_mapped_pages(source_weight_locations(model))
            for item in staged:
                if self.options.optimize and item.target == "onnx":
                    self._optimize(item)
                if reference is not None:
                    self._check_parity(item, *reference)
        except BaseException:
            for item in staged:
                item.staging.discard()
            raise
        return [self._commit(item) for item in staged]

    def _final(self, target: str) -> Path:
        return self.out / variant_folder(self.spec.name, target, Precision.FP32)

    def _event(self, stage: str, detail: str) -> None:
        self.report(ExportEvent(self.spec.name, stage, self.index, self.total, detail))

    def _export(self, module, item: _Staged) -> None:
        self._event("start", item.target)
        started = time.perf_counter()
        if item.target == "openvino":
            from kiln.exporters.openvino import export_openvino

            exported = export_openvino(module, self.spec, item.staging.path)
        elif item.target == "torch":
            from kiln.exporters.torch import export_torch

            exported = export_torch(module, self.spec, item.staging.path)
        else:
            from kiln.exporters.onnx import export_onnx

            exported = export_onnx(
                module,
                self.spec,
                item.staging.path,
                opset=self.options.opset,
                exporter=self.options.exporter,
            )
        item.seconds = time.perf_counter() - started
        item.entry, item.opset, item.exporter = exported.entry, exported.opset, exported.exporter
        self._event("exported", f"{item.target} in {item.seconds:.1f} s")

    def _record_weight_map(self, model: LoadedModel, module, item: _Staged) -> None:
        """Where each LoRA-able source weight went in the graph (for LoRAs at load)."""
        from kiln.exporters.weight_map import record_weight_map

        namespace = model.lora_namespace(self.spec.name)
        if namespace is not None:
            found = record_weight_map(module, namespace, item.target, item.staging.path, item.entry)
            self._event("exported", f"{len(found.weights)} weights mapped for LoRAs at load")

    def _optimize(self, item: _Staged) -> None:
        from kiln.exporters.optimize import optimize_graph
        from kiln.exporters.weight_map import WEIGHT_MAP_FILE

        result = optimize_graph(item.staging.path, item.entry, self.spec)
        if result.kept:  # fusions pack weights (q, k, v into one): the map no longer holds
            (item.staging.path / WEIGHT_MAP_FILE).unlink(missing_ok=True)
        item.options["graph_optimization"] = result.to_dict()
        self._event(
            "optimized", f"graph fusions {'kept' if result.kept else 'not kept'}: {result.reason}"
        )

    def _check_parity(self, item: _Staged, inputs, expected) -> None:
        from kiln.exporters import parity as parity_check
        from kiln.runtimes import open_for_check

        session = open_for_check(
            item.staging.path / item.entry, self.spec, item.target, root=self.out
        )
        parity = parity_check.measure(
            self.spec, Precision.FP32, inputs, expected, session.run, self.spec.parity_sizes()
        )
        del session
        self._event("parity", _parity_text(parity))
        if not parity.passed and not self.options.allow_parity_failure:
            name, worst, limit = parity.worst()
            raise ExportError(
                f"{self.spec.name} ({item.target}) misses its parity budget: {name} differs from PyTorch by "
                f"{worst:.3g} > {limit:.3g}; nothing was written (pass --allow-parity-failure to keep it)"
            )
        item.parity = parity

    def _commit(self, item: _Staged) -> Variant:
        final = item.staging.commit()
        prefix = final.relative_to(self.out).as_posix()
        return Variant(
            component=self.spec.name,
            target=item.target,
            precision=Precision.FP32,
            files=file_entries(self.out, final),
            entry=f"{prefix}/{item.entry}",
            versions=library_versions(item.target, exporter=item.exporter),
            shape_profile={
                name: {"min": d.min, "opt": d.opt, "max": d.max, "multiple_of": d.multiple_of}
                for name, d in self.spec.dims().items()
            },
            parity=item.parity,
            opset=item.opset,
            options=item.options,
            export_seconds=round(item.seconds, 3),
        )


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS before a session loads.

    glibc keeps freed memory in its arenas.
    """
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def source_weight_locations(model: LoadedModel) -> list[Path]:
    """Where the source model's weight files are: its folder or file, and the hub cache."""
    from huggingface_hub import constants

    places = [Path(model.source.id), Path(constants.HF_HUB_CACHE)]
    return [place for place in places if place.exists()]


#: Libraries whose versions bind a target's variants (they wrote or run them).
TARGET_LIBRARIES = {
    "onnx": ("onnx", "onnxruntime"),
    "tensorrt": ("onnx", "onnxruntime"),  # the typed graph's; TensorRT's is given by the build
    "openvino": ("openvino", "nncf"),
    "torch": ("safetensors", "torchao", "bitsandbytes"),
}


def library_versions(target: str, **extra: str) -> dict[str, str]:
    """kiln, torch, the pipeline libraries and those of `target`, plus `extra` entries."""
    import importlib.metadata

    import torch

    versions = {"kiln": __version__, "torch": torch.__version__, **extra}
    for package in ("transformers", "diffusers", *TARGET_LIBRARIES.get(target, ())):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    return versions


def _parity_text(parity) -> str:
    name, worst, limit = parity.worst()
    verdict = "ok" if parity.passed else "FAILED"
    return f"parity {verdict}: max |diff| {worst:.2e} on {name} (budget {limit:.2e})"


def _summary(variant: Variant) -> str:
    size = variant.size_bytes / 2**20
    return f"{variant.folder}: {size:.1f} MiB"


__all__ = ["ExportEvent", "ExportOptions", "export"]
