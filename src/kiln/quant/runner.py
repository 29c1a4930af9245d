"""`kiln.quantize()`: add quantized variants to an artifact, each with its measured drift.

Flow: check every requested cell can run here -> run the fp32 pipeline once to record
calibration calls and reference outputs -> per (target, component): quantize the fp32
variant into a staging folder, measure component drift on held-back calls, move it into
place, then measure end-to-end drift with only that component swapped, and record both.
A variant whose end-to-end drift has not been recorded yet is never auto-selected
(`kiln.profiles.select` treats missing drift on a quantized variant as unmeasured).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kiln.artifacts import (
    Manifest,
    StagingFolder,
    Variant,
    file_entries,
    read_manifest,
    variant_folder,
    verify_files,
    write_manifest,
)
from kiln.errors import InvalidRequestError
from kiln.exporters.runner import library_versions, release_memory
from kiln.models.spec import ComponentSpec, Precision
from kiln.quant import drift as drift_metrics
from kiln.quant.base import QuantizedGraph, quantizer_for
from kiln.quant.calibration import CalibrationSet, check_request, collect, img2img
from kiln.quant.recipes import QuantRecipe, cell, cell_problem, recipe_for, variant_tag


@dataclass(frozen=True)
class QuantEvent:
    """A progress report. `stage`: calibrate, quantize, drift, done; done/total count steps."""

    stage: str
    component: str = ""
    detail: str = ""
    done: int = 0
    total: int = 0


QuantProgress = Callable[[QuantEvent], None]


@dataclass(frozen=True)
class _Job:
    component: str
    source: Variant
    spec: ComponentSpec
    recipe: QuantRecipe


def quantize(
    artifact: str | os.PathLike[str],
    precision: Precision | str,
    *,
    targets: Sequence[str] = (),
    components: Sequence[str] = (),
    method: str | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    ratio: float | None = None,
    calibration: int = 8,
    prompts: str | os.PathLike[str] | None = None,
    images: str | os.PathLike[str] | None = None,
    steps: int = 4,
    size: int | None = None,
    progress: QuantProgress | None = None,
) -> Manifest:
    """Quantize fp32 variants of `artifact` to `precision` and record them in its manifest.

    `targets` default to every target with fp32 variants, `components` to every component.
    `calibration` is the number of prompts (Stable Diffusion) or images (BLIP) the fp32
    pipeline runs to record inputs; `prompts` is a text file (one per line) and `images` a
    folder to use instead of kiln's built-in ones. `steps`/`size` set the diffusion runs.
    """
    root = Path(artifact)
    manifest = read_manifest(root)
    precision = _precision(precision)
    if precision is Precision.FP32:
        raise InvalidRequestError(
            "fp32 is what `kiln export` writes; quantize to another precision"
        )
    jobs = _plan_jobs(
        manifest, precision, targets, components, method, group_size, symmetric, ratio
    )
    calib = dict(count=calibration, prompts=prompts, images=images, steps=steps, size=size)
    return _run_jobs(root, jobs, calib, progress)


def quantize_cells(
    artifact: str | os.PathLike[str],
    cells: Sequence[tuple[str, Precision | str, str | None]],
    *,
    components: Sequence[str] = (),
    calibration: int = 8,
    steps: int = 4,
    size: int | None = None,
    progress: QuantProgress | None = None,
    before_each: Callable[[str], None] | None = None,
) -> Manifest:
    """Quantize every component for each `(target, precision, method)` in one go.

    One fp32 calibration run serves every cell, so their drift shares its reference
    outputs (`kiln optimize`). `components` default to every exported one. Variants already finished (end-to-end drift recorded) are
    skipped, so a rerun resumes. `before_each(variant_id)` runs before each job and may
    raise to stop between jobs; what was finished stays recorded.
    """
    root = Path(artifact)
    manifest = read_manifest(root)
    jobs: list[_Job] = []
    for target, precision, method in cells:
        jobs += _plan_jobs(
            manifest, _precision(precision), [target], components, method, None, None, None
        )
    finished = {v.id for v in manifest.variants if set(v.drift or {}) - {"component"}}
    jobs = [job for job in jobs if _variant_id(job) not in finished]  # a rerun resumes
    calib = dict(count=calibration, prompts=None, images=None, steps=steps, size=size)
    return _run_jobs(root, jobs, calib, progress, before_each)


def _variant_id(job: _Job) -> str:
    tag = variant_tag(job.recipe, job.spec)
    suffix = f"-{tag}" if tag else ""
    return f"{job.component}/{job.recipe.target}/{job.recipe.precision.value}{suffix}"


def _run_jobs(
    root: Path,
    jobs: Sequence[_Job],
    calib_options: dict[str, Any],
    progress: QuantProgress | None,
    before_each: Callable[[str], None] | None = None,
) -> Manifest:
    manifest = read_manifest(root)
    check_request(calib_options["count"], calib_options["steps"])
    report = progress or (lambda event: None)
    verify_files(root, manifest.support_files)
    for job in jobs:
        verify_files(root, job.source.files)
    if not jobs:
        return manifest
    calib = _calibrate(root, manifest, jobs, report=report, **calib_options)
    fp32_quality: dict[str, float] = {}  # measured once, on the first variant that needs it
    # The fp32 outputs on the held-back calls, by source variant: computed once, shared by
    # every cell quantized from that variant (kiln optimize builds several per component).
    references: dict[str, list[dict[str, Any]]] = {}
    for index, job in enumerate(jobs, start=1):
        if before_each is not None:
            before_each(_variant_id(job))
        variant = _quantize_one(root, job, calib, report, index, len(jobs), references)
        manifest = read_manifest(root).with_variant(variant)
        write_manifest(root, manifest)
        variant = end_to_end_drift(root, manifest, variant, calib, report, fp32_quality)
        manifest = read_manifest(root).with_variant(variant)
        write_manifest(root, manifest)
        report(QuantEvent("done", job.component, _summary(variant, job.source), index, len(jobs)))
    return manifest


def _precision(value: Precision | str) -> Precision:
    try:
        return Precision(value)
    except ValueError:
        known = ", ".join(p.value for p in Precision)
        raise InvalidRequestError(f"unknown precision {value!r}; use one of {known}") from None


def _plan_jobs(
    manifest: Manifest,
    precision: Precision,
    targets: Sequence[str],
    components: Sequence[str],
    method: str | None,
    group_size: int | None,
    symmetric: bool | None,
    ratio: float | None,
) -> list[_Job]:
    """One job per (target, component), every cell checked before any work starts."""
    from kiln.profiles.hardware import detect

    fp32 = [v for v in manifest.variants if v.precision is Precision.FP32]
    chosen_targets = list(targets) or sorted({v.target for v in fp32})
    profile = detect()
    for target in chosen_targets:
        problem = cell_problem(cell(target, precision), profile)
        if problem:
            raise InvalidRequestError(f"cannot quantize {target}:{precision.value} here: {problem}")
        if target == "tensorrt":
            raise InvalidRequestError(
                "TensorRT engines are built at their precision from the onnx fp32 variants: "
                f"kiln export ARTIFACT -o ARTIFACT --target tensorrt --precision {precision.value}"
            )
    names = list(components) or _exported(manifest)
    unknown = [c for c in names if c not in manifest.components]
    if unknown:
        raise InvalidRequestError(
            f"the artifact has no component {unknown[0]!r}; it has {', '.join(manifest.components)}"
        )
    jobs = []
    for target in chosen_targets:
        for component in names:
            source = next(
                (v for v in fp32 if v.component == component and v.target == target), None
            )
            if source is None:
                raise InvalidRequestError(
                    f"no fp32 {target} variant of {component} to quantize; "
                    f"export it first with `kiln export SOURCE -o OUT --target {target}`"
                )
            spec = ComponentSpec.from_dict(manifest.components[component])
            recipe = recipe_for(
                target,
                precision,
                spec,
                method=method,
                group_size=group_size,
                symmetric=symmetric,
                ratio=ratio,
            )
            jobs.append(_Job(component, source, spec, recipe))
    return jobs


def _calibrate(
    root: Path,
    manifest: Manifest,
    jobs: Sequence[_Job],
    *,
    count: int,
    prompts: Any,
    images: Any,
    steps: int,
    size: int | None,
    report: QuantProgress,
) -> CalibrationSet:
    """Run the fp32 pipeline of the first job's target and record what every component sees."""
    return calibrate(
        root,
        manifest,
        jobs[0].source.target,
        count=count,
        prompts=prompts,
        images=images,
        steps=steps,
        size=size,
        progress=report,
    )


def calibrate(
    root: Path,
    manifest: Manifest,
    target: str,
    *,
    count: int,
    prompts: Any = None,
    images: Any = None,
    steps: int = 4,
    size: int | tuple[int, int] | None = None,
    progress: QuantProgress | None = None,
) -> CalibrationSet:
    """Run the artifact's fp32 `target` pipeline and record what every component sees
    (also used by the TensorRT engine builds for their int8/fp8 ranges and their drift)."""
    from kiln.pipelines.deployment import load

    report = progress or (lambda event: None)
    require = [f"{name}={target}:fp32" for name in _exported(manifest)]
    deployment = load(root, require=require, verify=False)
    report(QuantEvent("calibrate", detail=f"fp32 {target} pipeline", total=count))
    calib = collect(
        deployment,
        count=count,
        prompts=prompts,
        images=images,
        steps=steps,
        size=size,
        progress=lambda done, total: report(QuantEvent("calibrate", "", "", done, total)),
    )
    calib.workload["plan"] = target
    del deployment
    release_memory()
    return calib


def _quantize_one(
    root: Path,
    job: _Job,
    calib: CalibrationSet,
    report: QuantProgress,
    index: int,
    total: int,
    references: dict[str, list[dict[str, Any]]],
) -> Variant:
    """Quantize into staging, measure component drift there, then move into place."""
    recipe, source = job.recipe, job.source
    tag = variant_tag(recipe, job.spec)
    final = root / variant_folder(job.component, recipe.target, recipe.precision, tag)
    staging = StagingFolder(final)
    started = time.perf_counter()
    try:
        source_path = root / source.entry
        training = calib.for_quantizer(job.component) if recipe.needs_calibration else []
        graph = quantizer_for(recipe.target)(
            source_path.parent,
            source_path.name,
            job.spec,
            recipe,
            training,
            staging.path,
            lambda text: report(QuantEvent("quantize", job.component, text, index, total)),
        )
        seconds = time.perf_counter() - started
        report(QuantEvent("drift", job.component, "component outputs vs fp32", index, total))
        component = _component_drift(root, job, graph, staging.path, calib, references)
    except BaseException:
        staging.discard()
        raise
    final = staging.commit()
    prefix = final.relative_to(root).as_posix()
    return Variant(
        component=job.component,
        target=recipe.target,
        precision=recipe.precision,
        files=file_entries(root, final),
        entry=f"{prefix}/{graph.entry}",
        versions=library_versions(recipe.target),
        shape_profile=source.shape_profile,
        quantization={
            **recipe.to_dict(),
            "source_variant": source.id,
            "calibration_calls": len(training),
            "layers": {k: dict(v) for k, v in graph.layers.items()},
            "details": dict(graph.details),
        },
        drift={"component": component},
        opset=source.opset,
        options=dict(graph.runtime_options),
        export_seconds=round(seconds, 3),
        tag=tag,
    )


def _component_drift(
    root: Path,
    job: _Job,
    graph: QuantizedGraph,
    folder: Path,
    calib: CalibrationSet,
    references: dict[str, list[dict[str, Any]]],
) -> dict[str, Any]:
    """Outputs of the fp32 and quantized sessions on held-back calls, one session at a time."""
    from kiln.runtimes import open_for_check

    calls = calib.held_out(job.component)
    target = job.recipe.target
    expected = references.get(job.source.id)
    if expected is None:
        reference = open_for_check(root / job.source.entry, job.spec, target, root=root)
        expected = references[job.source.id] = [reference.run(feeds) for feeds in calls]
        del reference
        release_memory()
    candidate = open_for_check(
        folder / graph.entry, job.spec, target, root=root, options=graph.runtime_options
    )
    actual = [candidate.run(feeds) for feeds in calls]
    del candidate
    release_memory()
    return drift_metrics.component_drift(expected, actual)


def end_to_end_drift(
    root: Path,
    manifest: Manifest,
    variant: Variant,
    calib: CalibrationSet,
    report: QuantProgress,
    fp32_quality: dict[str, float],
) -> Variant:
    """`variant` (already in `manifest`) with its end-to-end drift: the held-back workload
    rerun with only `variant` swapped into the fp32 plan `calib` was recorded on, compared
    with that plan's outputs. `fp32_quality` caches the fp32 plan's judged quality."""
    from kiln.pipelines.deployment import load

    report(QuantEvent("drift", variant.component, "end to end vs fp32"))
    plan_target = calib.workload["plan"]
    require = [
        f"{name}={plan_target}:fp32" for name in _exported(manifest) if name != variant.component
    ]
    deployment = load(root, require=[*require, variant.id], verify=False, guard=False)
    held = calib.held_out_inputs()
    if calib.workload["kind"] == "txt2img" and variant.component == "vae_encoder":
        images = [img2img(deployment, calib, i) for i in held]
        measured = drift_metrics.image_drift([calib.img2img[i] for i in held], images)
    elif calib.workload["kind"] == "txt2img":
        work = calib.workload
        images = [
            deployment.generate(
                calib.inputs[i],
                steps=work["steps"],
                width=work["width"],
                height=work["height"],
                seed=work["seeds"][i],
                guidance_scale=work["guidance_scale"],
            ).image
            for i in held
        ]
        measured = drift_metrics.image_drift([calib.references[i] for i in held], images)
    elif calib.workload["kind"] == "caption":
        tokens = calib.workload["max_new_tokens"]
        got = [
            deployment.caption([calib.inputs[i]], max_new_tokens=tokens).sequences[0] for i in held
        ]
        measured = drift_metrics.caption_drift([calib.references[i] for i in held], got)
    else:
        texts = calib.workload["texts"]
        got = [deployment.match(calib.inputs[i], texts).itm_probabilities for i in held]
        measured = drift_metrics.matching_drift([calib.references[i] for i in held], got)
    if variant.component != "vae_encoder":  # text-to-image never runs the encoder
        measured |= _quality_drift(root, manifest, deployment, calib, report, fp32_quality)
    del deployment
    release_memory()
    workload = {**calib.workload, "held_out": held}
    drift = {**measured, **(variant.drift or {}), "workload": workload}
    drift["reference"] = f"fp32 {plan_target} plan, same seeds"
    return replace(variant, drift=drift)


def _quality_drift(
    root: Path,
    manifest: Manifest,
    deployment: Any,
    calib: CalibrationSet,
    report: QuantProgress,
    fp32_quality: dict[str, float],
) -> dict[str, float]:
    """On the shapes world: the judged quality of this plan, of the fp32 plan, and the drop.

    `<figure>_drop` (fp32 minus this variant, as a fraction) is what selection's default
    budget limits: PSNR alone passes a variant whose pictures show the wrong shape."""
    from kiln.bench import quality
    from kiln.pipelines.deployment import load

    kind = calib.workload["kind"]
    figure = {"txt2img": quality.JUDGED_CORRECT, "caption": quality.CAPTION_ACCURACY}.get(kind)
    if figure is None or quality.not_applicable(dict(manifest.source), figure):
        return {}

    def measure(plan: Any) -> float:
        if figure == quality.JUDGED_CORRECT:
            return quality.judged_correct(
                lambda prompt, seed: (
                    plan.generate(
                        prompt, steps=quality.STEPS, seed=seed, guidance_scale=quality.GUIDANCE
                    ).image
                )
            )
        options = {"num_beams": 1, "max_new_tokens": quality.MAX_NEW_TOKENS}
        return quality.held_out_caption_accuracy(
            lambda images: [c[0] for c in plan.caption(images, **options).captions]
        )

    report(QuantEvent("drift", "", f"{figure} on held-out shapes-world inputs"))
    if figure not in fp32_quality:
        target = calib.workload["plan"]
        fp32 = [f"{name}={target}:fp32" for name in _exported(manifest)]
        fp32_quality[figure] = measure(load(root, require=fp32, verify=False, guard=False))
    value = measure(deployment)
    return {
        figure: value,
        f"{figure}_fp32": fp32_quality[figure],
        f"{figure}_drop": round(fp32_quality[figure] - value, 6),
    }


def _exported(manifest: Manifest) -> list[str]:
    """Components that have at least one variant (a manifest may describe more), less the
    optional ones: captioning never runs the attention decoders, so calibration cannot see
    their inputs, and the maps they draw need no speed-up."""
    optional = {name for name, spec in manifest.components.items() if spec.get("optional")}
    return [c for c in dict.fromkeys(v.component for v in manifest.variants) if c not in optional]


def _summary(variant: Variant, source: Variant) -> str:
    share = variant.size_bytes / max(source.size_bytes, 1)
    drift = variant.drift or {}
    figures = [f"{variant.size_bytes / 2**20:.1f} MiB ({share:.0%} of fp32)"]
    from kiln.bench.quality import METRICS as QUALITY_METRICS

    for metric in ("psnr", "ssim", "bleu", "exact_match", "itm_abs", *QUALITY_METRICS):
        if metric in drift:
            figures.append(f"{metric} {drift[metric]:g}")
    return f"{variant.id}: " + ", ".join(figures)


__all__ = ["QuantEvent", "calibrate", "end_to_end_drift", "quantize", "quantize_cells"]
