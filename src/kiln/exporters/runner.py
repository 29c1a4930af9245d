"""`kiln.export()`: source model -> artifact folder, one component at a time.

For each component: export into a staging folder, measure parity against PyTorch at a
shape the export did not trace, refuse the variant if it misses its budget (unless the
caller accepts that knowingly), then move it into place and record it in the manifest.
Components are exported and freed one by one so that peak memory stays near the size of
the largest component rather than the whole pipeline.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln import __version__
from kiln.artifacts import (
    SUPPORT_DIR,
    Manifest,
    Parity,
    StagingFolder,
    Variant,
    file_entries,
    read_manifest,
    staging_folder,
    variant_folder,
    write_manifest,
)
from kiln.errors import ArtifactError, ExportError, SourceError
from kiln.models.sources import LoadedModel, load_source
from kiln.models.spec import ComponentSpec, Precision

TARGETS = ("onnx",)


@dataclass(frozen=True)
class ExportEvent:
    """A progress report: `stage` is one of start, exported, parity, done, skipped."""

    component: str
    stage: str
    index: int
    total: int
    detail: str = ""


ProgressCallback = Callable[[ExportEvent], None]


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
    progress: ProgressCallback | None = None,
) -> Manifest:
    """Export `source` into the artifact folder `out` and return its manifest."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ExportError(f"unknown target {unknown[0]!r}; available targets: {', '.join(TARGETS)}")
    out = Path(out)
    model = load_source(source, config=config)
    specs = model.specs()
    chosen = list(components or specs)
    missing = [c for c in chosen if c not in specs]
    if missing:
        raise ExportError(
            f"{model.source.id} has no component {missing[0]!r}; it has {', '.join(specs)}"
        )
    manifest = _open_manifest(out, model, specs)
    report = progress or (lambda event: None)
    for index, component in enumerate(chosen, start=1):
        for variant in _export_component(
            out,
            model,
            specs[component],
            targets,
            opset,
            exporter,
            check_parity,
            allow_parity_failure,
            report,
            index,
            len(chosen),
        ):
            manifest = manifest.with_variant(variant)
            write_manifest(out, manifest)
            report(ExportEvent(component, "done", index, len(chosen), _summary(variant)))
    return manifest


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
        return existing
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
    target: str
    staging: StagingFolder
    entry: str
    opset: int
    exporter: str
    seconds: float


def _export_component(
    out: Path,
    model: LoadedModel,
    spec: ComponentSpec,
    targets: Sequence[str],
    opset: int | None,
    exporter: str,
    check_parity: bool,
    allow_parity_failure: bool,
    report: ProgressCallback,
    index: int,
    total: int,
) -> list[Variant]:
    """Export one component to every target; free its weights before checking parity.

    Parity needs PyTorch's outputs (computed first) and a runtime session; the torch
    module is released before sessions load so both never sit in memory together.
    """
    from kiln.exporters import parity as parity_check
    from kiln.exporters.onnx import export_onnx

    module = model.export_module(spec.name)
    reference = parity_check.reference_outputs(module, spec) if check_parity else None
    staged: list[_Staged] = []
    try:
        for target in targets:
            report(ExportEvent(spec.name, "start", index, total, target))
            staging = StagingFolder(out / variant_folder(spec.name, target, Precision.FP32))
            staged.append(_Staged(target, staging, "", 0, "", 0.0))
            started = time.perf_counter()
            exported = export_onnx(module, spec, staging.path, opset=opset, exporter=exporter)
            seconds = time.perf_counter() - started
            staged[-1] = _Staged(
                target, staging, exported.entry, exported.opset, exported.exporter, seconds
            )
            report(ExportEvent(spec.name, "exported", index, total, f"{target} in {seconds:.1f} s"))
        del module
        model.release(spec.name)
        gc.collect()
        parities = [
            _check_parity(spec, item, reference, allow_parity_failure, report, index, total)
            for item in staged
        ]
    except BaseException:
        for item in staged:
            item.staging.discard()
        raise
    return [_commit(out, spec, item, parity) for item, parity in zip(staged, parities, strict=True)]


def _check_parity(
    spec, item: _Staged, reference, allow_failure: bool, report, index, total
) -> Parity | None:
    from kiln.exporters import parity as parity_check
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    if reference is None:
        return None
    inputs, expected = reference
    session = OnnxRuntimeSession(item.staging.path / item.entry, spec)
    parity = parity_check.measure(
        spec, Precision.FP32, inputs, expected, session.run, spec.parity_sizes()
    )
    del session
    report(ExportEvent(spec.name, "parity", index, total, _parity_text(parity)))
    if not parity.passed and not allow_failure:
        name, worst, limit = parity.worst()
        raise ExportError(
            f"{spec.name} ({item.target}) misses its parity budget: {name} differs from PyTorch by "
            f"{worst:.3g} > {limit:.3g}; nothing was written (pass --allow-parity-failure to keep it)"
        )
    return parity


def _commit(out: Path, spec: ComponentSpec, item: _Staged, parity: Parity | None) -> Variant:
    final = item.staging.commit()
    prefix = final.relative_to(out).as_posix()
    return Variant(
        component=spec.name,
        target=item.target,
        precision=Precision.FP32,
        files=file_entries(out, final),
        entry=f"{prefix}/{item.entry}",
        versions=_versions(item.exporter),
        shape_profile={
            name: {"min": d.min, "opt": d.opt, "max": d.max, "multiple_of": d.multiple_of}
            for name, d in spec.dims().items()
        },
        parity=parity,
        opset=item.opset,
        export_seconds=round(item.seconds, 3),
    )


def _versions(exporter: str) -> dict[str, str]:
    import onnx
    import torch

    versions = {
        "kiln": __version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "exporter": exporter,
    }
    try:
        import onnxruntime

        versions["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return versions


def _parity_text(parity) -> str:
    name, worst, limit = parity.worst()
    verdict = "ok" if parity.passed else "FAILED"
    return f"parity {verdict}: max |diff| {worst:.2e} on {name} (budget {limit:.2e})"


def _summary(variant: Variant) -> str:
    size = variant.size_bytes / 2**20
    return f"{variant.folder}: {size:.1f} MiB"


__all__ = ["ExportEvent", "SourceError", "export"]
