"""TensorRT engines: optimization profiles from the specs, plans built from kiln's ONNX.

Where an engine's ONNX comes from: the artifact's `onnx` fp32 variant of the component.
`kiln export SOURCE -o OUT --target tensorrt` exports it first (with its parity check);
`kiln export ARTIFACT -o ARTIFACT --target tensorrt` reuses the one there. TensorRT 11 builds
strongly typed networks only, so the engine's precision is written into that graph first
(`kiln.exporters.tensorrt_graph`); the build runs in a child process
(`kiln.exporters.tensorrt_build`), so a crash inside TensorRT ends the child, not kiln.

Profiles. Every dynamic axis of a component's spec becomes a (min, opt, max) range, narrowed
by the user's `ShapeRange` (image sizes in pixels, images per call):

- latent axes (UNet, VAE decoder input) are pixels / the VAE scale factor; the VAE encoder's
  input is in pixels; text encoders have no size axis;
- the batch axis counts images times the rows one image takes in that component: two in the
  UNet (classifier-free guidance runs the conditional and unconditional halves as one batch),
  up to `MAX_BEAMS` in BLIP decoders (beams, or captions per image), one elsewhere; text
  matching counts texts, which `--max-batch` does not bound;
- a model whose image size is fixed (BLIP's vision encoder) takes no size range: one that
  conflicts is refused, one that does not is noted;
- `--static WxH` pins the image size (min = opt = max). The batch keeps its range, so a call
  without guidance (UNet batch 1) or with fewer images still runs.

Other axes (token sequences, a decoder's past) keep the spec's range.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.artifacts import (
    MANIFEST_NAME,
    Manifest,
    StagingFolder,
    Variant,
    file_entries,
    read_manifest,
    variant_folder,
    verify_files,
    write_manifest,
)
from kiln.errors import ArtifactError, BackendUnavailableError, ExportError, InvalidRequestError
from kiln.models import blip, blip2
from kiln.models import stable_diffusion as sd
from kiln.models.spec import ComponentSpec, Dim, Precision

if TYPE_CHECKING:
    from kiln.exporters.runner import ExportEvent
    from kiln.profiles.hardware import HardwareProfile
    from kiln.quant.calibration import CalibrationSet

TARGET = "tensorrt"
PLAN_FILE = "model.plan"
#: The typed ONNX graph and its calibration live here while the engine builds.
WORK_FOLDER = ".work"
ENGINE_PRECISIONS = (
    Precision.FP16,
    Precision.BF16,
    Precision.INT8,
    Precision.FP8,
    Precision.FP32,
)
#: Compute capability each precision needs (bf16 tensor cores: Ampere; fp8: Ada and Hopper).
MIN_COMPUTE_CAPABILITY = {Precision.BF16: (8, 0), Precision.FP8: (8, 9)}

#: Rows of its batch axis a component sees per image of a call, where that is not one.
ROWS_PER_IMAGE: Mapping[tuple[str, str], int] = MappingProxyType(
    {
        (sd.FAMILY, sd.UNET): 2,  # classifier-free guidance: conditional + unconditional
        (blip.FAMILY, blip.CROSS_ATTENTION): blip.MAX_BEAMS,
        (blip.FAMILY, blip.TEXT_DECODER): blip.MAX_BEAMS,
        (blip.FAMILY, blip.TEXT_DECODER_ATTENTIONS): blip.MAX_BEAMS,
        (blip2.FAMILY, blip2.TOKEN_EMBEDDINGS): blip.MAX_BEAMS,
        (blip2.FAMILY, blip2.LANGUAGE_MODEL): blip.MAX_BEAMS,
        (blip2.FAMILY, blip2.LANGUAGE_MODEL_ATTENTIONS): blip.MAX_BEAMS,
    }
)
#: Components whose batch axis counts texts (image-text matching), not images.
PER_TEXT = frozenset(
    (family, component)
    for family in (blip.FAMILY, blip2.FAMILY)
    for component in (blip.TEXT_MATCHING, blip.TEXT_FEATURES)
)
# Spec axes in image space: name -> (side, whether the axis is in latent units).
_IMAGE_AXES = {
    "latent_width": ("width", True),
    "latent_height": ("height", True),
    "width": ("width", False),
    "height": ("height", False),
}
_SIDE_INDEX = {"width": 0, "height": 1}
BATCH = "batch"

Size = tuple[int, int]  # (width, height) in pixels


# ------------------------------------------------------------------------------ the range


def parse_size(text: str, option: str) -> Size:
    """`"512x768"` -> (512, 768); `option` names the flag in the error."""
    width, sep, height = text.strip().lower().partition("x")
    try:
        if not sep:
            raise ValueError
        size = (int(width), int(height))
    except ValueError:
        raise InvalidRequestError(
            f"{option} {text!r} is not WIDTHxHEIGHT in pixels (e.g. 512x512)"
        ) from None
    if min(size) < 1:
        raise InvalidRequestError(f"{option} {text}: width and height must be positive")
    return size


@dataclass(frozen=True)
class ShapeRange:
    """What the user asks engines to take: image sizes in pixels and images per call.

    Unset fields keep the spec's own range. `static` pins the image size (min = opt = max).
    """

    min_size: Size | None = None
    max_size: Size | None = None
    max_batch: int | None = None
    static: Size | None = None

    def __post_init__(self) -> None:
        if self.static is not None and (self.min_size or self.max_size):
            raise InvalidRequestError(
                "--static fixes one image size; leave out --min-size and --max-size"
            )
        if self.max_batch is not None and self.max_batch < 1:
            raise InvalidRequestError(f"--max-batch must be at least 1, got {self.max_batch}")
        low, high = self.min_size, self.max_size
        if low and high and (low[0] > high[0] or low[1] > high[1]):
            raise InvalidRequestError(
                f"--min-size {_text(low)} is larger than --max-size {_text(high)}"
            )

    @classmethod
    def parse(
        cls,
        *,
        min_size: str | None = None,
        max_size: str | None = None,
        max_batch: int | None = None,
        static: str | None = None,
    ) -> ShapeRange:
        """From the command line's strings (`"512x512"`)."""
        return cls(
            parse_size(min_size, "--min-size") if min_size else None,
            parse_size(max_size, "--max-size") if max_size else None,
            max_batch,
            parse_size(static, "--static") if static else None,
        )

    def sizes(self) -> list[tuple[str, Size]]:
        """The size options given, as (flag, size)."""
        given = (
            ("--static", self.static),
            ("--min-size", self.min_size),
            ("--max-size", self.max_size),
        )
        return [(option, size) for option, size in given if size is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_size": _text(self.min_size),
            "max_size": _text(self.max_size),
            "max_batch": self.max_batch,
            "static": _text(self.static),
        }


def _text(size: Size | None) -> str | None:
    return None if size is None else f"{size[0]}x{size[1]}"


# --------------------------------------------------------------------------- the profiles


@dataclass(frozen=True)
class DimRange:
    """One dynamic axis of an engine: its (min, opt, max) sizes and step."""

    min: int
    opt: int
    max: int
    multiple_of: int = 1

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max, "multiple_of": self.multiple_of}


@dataclass(frozen=True)
class InputProfile:
    """One input tensor's shapes in an optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.min) and all(
            low <= size <= high for low, size, high in zip(self.min, shape, self.max, strict=True)
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "min": list(self.min),
            "opt": list(self.opt),
            "max": list(self.max),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputProfile:
        return cls(data["name"], tuple(data["min"]), tuple(data["opt"]), tuple(data["max"]))


@dataclass(frozen=True)
class EngineProfile:
    """The optimization profile one component's engine is built with, and notes about it."""

    component: str
    dims: Mapping[str, DimRange]
    inputs: tuple[InputProfile, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "inputs": [i.to_dict() for i in self.inputs],
            "dims": {name: r.to_dict() for name, r in self.dims.items()},
            "notes": list(self.notes),
        }


def engine_profiles(
    specs: Mapping[str, ComponentSpec],
    family: str,
    model_info: Mapping[str, Any],
    shape_range: ShapeRange,
) -> dict[str, EngineProfile]:
    """Per component, the profile its engine would be built with; bad ranges raise here."""
    return {
        name: engine_profile(spec, family, model_info, shape_range) for name, spec in specs.items()
    }


def engine_profile(
    spec: ComponentSpec, family: str, model_info: Mapping[str, Any], shape_range: ShapeRange
) -> EngineProfile:
    """One component's profile: the spec's ranges narrowed by `shape_range`."""
    notes: list[str] = []
    ranges: dict[str, DimRange] = {}
    for name, dim in spec.dims().items():
        if name == BATCH:
            ranges[name] = _batch_range(spec.name, family, dim, shape_range, notes)
        elif name in _IMAGE_AXES:
            side, latent = _IMAGE_AXES[name]
            scale = _vae_scale_factor(model_info, spec.name) if latent else 1
            ranges[name] = _size_range(spec.name, dim, side, scale, shape_range)
        else:
            ranges[name] = DimRange(dim.min, dim.opt, dim.max, dim.multiple_of)
    fixed = fixed_image_size(spec)
    if fixed is not None:
        _check_fixed_size(spec.name, fixed, shape_range, notes)
    inputs = tuple(
        InputProfile(
            tensor.name,
            *(
                tensor.concrete_shape({n: getattr(r, which) for n, r in ranges.items()})
                for which in ("min", "opt", "max")
            ),
        )
        for tensor in spec.inputs
    )
    return EngineProfile(spec.name, MappingProxyType(ranges), inputs, tuple(notes))


def _vae_scale_factor(model_info: Mapping[str, Any], component: str) -> int:
    scale = model_info.get("vae_scale_factor")
    if not isinstance(scale, int) or scale < 1:
        raise ArtifactError(
            f"{component} has latent axes but the model info records no vae_scale_factor; "
            "re-export the model"
        )
    return scale


def _size_range(
    component: str, dim: Dim, side: str, scale: int, shape_range: ShapeRange
) -> DimRange:
    index = _SIDE_INDEX[side]
    step, low, high = dim.multiple_of * scale, dim.min * scale, dim.max * scale
    for option, size in shape_range.sizes():
        value = size[index]
        if value % step or not low <= value <= high:
            raise InvalidRequestError(
                f"{option} {_text(size)}: {side} must be a multiple of {step} between {low} "
                f"and {high} pixels for {component}"
            )
    if shape_range.static is not None:
        pinned = shape_range.static[index] // scale
        return DimRange(pinned, pinned, pinned, dim.multiple_of)
    least = shape_range.min_size[index] // scale if shape_range.min_size else dim.min
    most = shape_range.max_size[index] // scale if shape_range.max_size else dim.max
    return DimRange(least, min(max(dim.opt, least), most), most, dim.multiple_of)


def _batch_range(
    component: str, family: str, dim: Dim, shape_range: ShapeRange, notes: list[str]
) -> DimRange:
    images = shape_range.max_batch
    if images is None:
        return DimRange(dim.min, dim.opt, dim.max, dim.multiple_of)
    if (family, component) in PER_TEXT:
        notes.append("its batch counts texts, not images: --max-batch does not bound it")
        return DimRange(dim.min, dim.opt, dim.max, dim.multiple_of)
    rows = ROWS_PER_IMAGE.get((family, component), 1)
    most = images * rows
    if most > dim.max:
        raise InvalidRequestError(
            f"--max-batch {images}: {component} takes at most {dim.max // rows} images per call"
        )
    return DimRange(dim.min, min(max(dim.opt, dim.min), most), most, dim.multiple_of)


def fixed_image_size(spec: ComponentSpec) -> Size | None:
    """(width, height) of a component whose pixel input has a fixed size, else None."""
    for tensor in spec.inputs:
        shape = tensor.shape
        if tensor.name == "pixel_values" and len(shape) == 4:
            height, width = shape[2], shape[3]
            if isinstance(height, int) and isinstance(width, int):
                return width, height
    return None


def _check_fixed_size(
    component: str, fixed: Size, shape_range: ShapeRange, notes: list[str]
) -> None:
    given = shape_range.sizes()
    if not given:
        return
    if shape_range.static is not None:
        fits = shape_range.static == fixed
    else:
        low, high = shape_range.min_size or (0, 0), shape_range.max_size or fixed
        fits = all(low[i] <= fixed[i] <= high[i] for i in (0, 1))
    options = " ".join(f"{option} {_text(size)}" for option, size in given)
    if not fits:
        raise InvalidRequestError(
            f"{options}: {component} takes {_text(fixed)} images only (fixed by the model); "
            "leave the size options out for this model"
        )
    notes.append(f"images are {_text(fixed)} (fixed by the model): {options} does not apply")


# ------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class EngineOptions:
    """How to build engines: precisions, the shape range, calibration and builder effort.

    `calibration` prompts (SD) or images (BLIP) run through the fp32 pipeline once: their
    recorded inputs give int8/fp8 their ranges and every reduced-precision engine its drift.
    """

    precisions: tuple[Precision, ...] = (Precision.FP16,)
    shape_range: ShapeRange = field(default_factory=ShapeRange)
    calibration: int = 8
    calibration_steps: int = 4
    #: TensorRT's builder optimization level (0-5; 3 is TensorRT's default).
    optimization_level: int = 3

    def __post_init__(self) -> None:
        precisions = tuple(dict.fromkeys(_engine_precision(p) for p in self.precisions))
        if not precisions:
            raise InvalidRequestError("name at least one engine precision")
        object.__setattr__(self, "precisions", precisions)
        if not 0 <= self.optimization_level <= 5:
            raise InvalidRequestError(
                f"TensorRT's optimization level is 0-5, got {self.optimization_level}"
            )


def _engine_precision(value: Precision | str) -> Precision:
    try:
        precision = Precision(value)
    except ValueError:
        precision = None
    if precision not in ENGINE_PRECISIONS:
        offered = ", ".join(p.value for p in ENGINE_PRECISIONS)
        raise InvalidRequestError(
            f"TensorRT engines are built at {offered}; {getattr(value, 'value', value)!r} is not one"
        )
    return precision


@dataclass(frozen=True)
class EnginePlan:
    """What `--target tensorrt` would build: one profile per component, per precision."""

    family: str
    onnx: str  # where the engines' ONNX comes from, in words
    precisions: tuple[Precision, ...]
    shape_range: ShapeRange
    profiles: Mapping[str, EngineProfile]

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "onnx": self.onnx,
            "precisions": [p.value for p in self.precisions],
            "shape_range": self.shape_range.to_dict(),
            "components": {name: p.to_dict() for name, p in self.profiles.items()},
        }


def is_artifact(source: str | os.PathLike[str]) -> bool:
    path = Path(os.fspath(source)).expanduser()
    return path.is_dir() and (path / MANIFEST_NAME).is_file()


def plan_engines(
    source: str | os.PathLike[str],
    *,
    components: Sequence[str] | None = None,
    options: EngineOptions = EngineOptions(),
    config: str | None = None,
) -> EnginePlan:
    """The profiles `--target tensorrt` builds for `source` (a model or an artifact).

    Needs no GPU and no TensorRT. An artifact's manifest holds its specs; a source model is
    loaded for them (its weights too: cheap for small models, seconds for full-size ones).
    """
    if is_artifact(source):
        manifest = read_manifest(source)
        specs = {n: ComponentSpec.from_dict(s) for n, s in manifest.components.items()}
        chosen = _artifact_components(manifest, specs, components)
        family, info = manifest.family, manifest.model_info
        onnx = f"the onnx fp32 variants in {source}"
    else:
        from kiln.models.sources import load_source

        model = load_source(source, config=config)
        specs = model.specs()
        chosen = _source_components(specs, components, model.source.id)
        family, info = model.family, model.model_info()
        onnx = "exported to onnx fp32 first (parity checked), then built"
    profiles = engine_profiles({c: specs[c] for c in chosen}, family, info, options.shape_range)
    return EnginePlan(family, onnx, options.precisions, options.shape_range, profiles)


def _source_components(
    specs: Mapping[str, ComponentSpec], wanted: Sequence[str] | None, model: str
) -> list[str]:
    chosen = list(wanted or (n for n, s in specs.items() if not s.optional))
    missing = [c for c in chosen if c not in specs]
    if missing:
        raise ExportError(f"{model} has no component {missing[0]!r}; it has {', '.join(specs)}")
    return chosen


def _artifact_components(
    manifest: Manifest, specs: Mapping[str, ComponentSpec], wanted: Sequence[str] | None
) -> list[str]:
    have = [c for c in specs if _onnx_fp32(manifest, c) is not None]
    if wanted:
        for component in wanted:
            if component not in specs:
                raise ExportError(
                    f"the artifact has no component {component!r}; it has {', '.join(specs)}"
                )
            onnx_source(manifest, component)  # refuses with the reason
        return list(wanted)
    chosen = [c for c in have if not specs[c].optional]
    if not chosen:
        raise ExportError(
            "the artifact has no onnx fp32 variant to build engines from; export one first: "
            "kiln export SOURCE -o ARTIFACT --target onnx"
        )
    return chosen


def onnx_source(manifest: Manifest, component: str) -> Variant:
    """The onnx fp32 variant an engine of `component` is built from, or why there is none."""
    found = _onnx_fp32(manifest, component)
    if found is None:
        raise ExportError(
            f"no onnx fp32 variant of {component} to build an engine from; export it first: "
            "kiln export SOURCE -o ARTIFACT --target onnx"
        )
    if (found.options.get("graph_optimization") or {}).get("kept"):
        # onnxruntime's fusions are com.microsoft operators, which TensorRT cannot parse.
        raise ExportError(
            f"{component}'s onnx fp32 variant holds onnxruntime graph fusions TensorRT cannot "
            "parse; re-export it without --optimize"
        )
    return found


def _onnx_fp32(manifest: Manifest, component: str) -> Variant | None:
    return next(
        (
            v
            for v in manifest.variants_of(component)
            if v.target == "onnx" and v.precision is Precision.FP32 and not v.tag
        ),
        None,
    )


# ------------------------------------------------------------------------ can it build here


def missing_for_engines(
    profile: HardwareProfile, precisions: Sequence[Precision] = ()
) -> list[str]:
    """What this machine lacks to build (and run) TensorRT engines; empty when nothing."""
    missing: list[str] = []
    nvidia = sorted(
        (g for g in profile.gpus if g.vendor.lower() == "nvidia"), key=lambda g: g.index
    )
    if not nvidia:
        missing.append("no NVIDIA GPU")
    tensorrt = profile.runtime("tensorrt")
    if tensorrt is None or not tensorrt.available:
        detail = tensorrt.detail if tensorrt is not None else ""
        missing.append(
            "TensorRT is not installed"
            if detail in ("", "not installed")
            else f"TensorRT is not usable ({detail})"
        )
    torch = profile.runtime("torch")
    build = (torch.detail if torch is not None else "") or "unknown"
    if not build.lower().startswith("cuda"):
        missing.append(f"torch is not a CUDA build ({build})")
    if nvidia:
        have = _capability(nvidia[0].compute_capability)
        for precision in precisions:
            need = MIN_COMPUTE_CAPABILITY.get(precision)
            if need and have is not None and have < need:
                missing.append(
                    f"{precision.value} needs compute capability {need[0]}.{need[1]}+, "
                    f"{nvidia[0].name} is sm {nvidia[0].compute_capability}"
                )
    return missing


def check_can_build(
    profile: HardwareProfile | None = None, precisions: Sequence[Precision] = ()
) -> None:
    """Refuse, in one line and before any work, where engines cannot be built."""
    if profile is None:
        from kiln.profiles.hardware import detect

        profile = detect()
    missing = missing_for_engines(profile, precisions)
    if missing:
        raise BackendUnavailableError(
            f"cannot build TensorRT engines here: {'; '.join(missing)}. They build on a machine "
            "with an NVIDIA GPU and a CUDA build of torch, with TensorRT from the gpu extra: "
            "pip install 'kiln[gpu]'"
        )


def _capability(text: str | None) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def cache_dir() -> Path:
    """Timing caches and calibration caches: $KILN_CACHE_DIR/tensorrt or ~/.cache/kiln/tensorrt."""
    root = os.environ.get("KILN_CACHE_DIR") or Path.home() / ".cache" / "kiln"
    return Path(root) / "tensorrt"


# ------------------------------------------------------------------------------- building


ProgressCallback = Callable[["ExportEvent"], None]


def build_engines(
    artifact: str | os.PathLike[str],
    *,
    components: Sequence[str] | None = None,
    options: EngineOptions = EngineOptions(),
    progress: ProgressCallback | None = None,
) -> Manifest:
    """Build a TensorRT engine per component and precision from `artifact`'s onnx fp32
    variants, and record each (GPU, compute capability, TensorRT version, profile, drift).

    Reduced precisions get their drift measured like `kiln quantize` does: one fp32 run of
    kiln's calibration workload, then component outputs on held-back calls and the
    end-to-end images or captions with only that engine swapped in.
    """
    from kiln.quant.calibration import check_request

    root = Path(artifact)
    check_can_build(precisions=options.precisions)
    plan = plan_engines(root, components=components, options=options)
    manifest = read_manifest(root)
    report = progress or (lambda event: None)
    reduced = any(p is not Precision.FP32 for p in options.precisions)
    if reduced:
        check_request(options.calibration, options.calibration_steps)
    sources = {c: onnx_source(manifest, c) for c in plan.profiles}
    verify_files(root, manifest.support_files)
    for source in sources.values():
        verify_files(root, source.files)
    calib = _calibrate(root, manifest, plan, options, report) if reduced else None
    jobs = [(c, p) for p in options.precisions for c in plan.profiles]
    built: list[Variant] = []
    for index, (component, precision) in enumerate(jobs, start=1):
        job = _EngineJob(
            root,
            ComponentSpec.from_dict(manifest.components[component]),
            sources[component],
            precision,
            plan.profiles[component],
            options,
            report,
            index,
            len(jobs),
        )
        variant = job.run(calib)
        write_manifest(root, read_manifest(root).with_variant(variant))
        if calib is None or precision is Precision.FP32:
            job.event("done", _summary(variant))
        built.append(variant)
    if calib is not None:
        _end_to_end_drift(root, built, calib, report, len(jobs))
    return read_manifest(root)


def _calibrate(
    root: Path,
    manifest: Manifest,
    plan: EnginePlan,
    options: EngineOptions,
    report: ProgressCallback,
) -> CalibrationSet:
    from kiln.exporters.runner import ExportEvent
    from kiln.quant.runner import calibrate

    size = workload_size(plan, manifest.model_info)
    return calibrate(
        root,
        manifest,
        "onnx",
        count=options.calibration,
        steps=options.calibration_steps,
        size=size,
        progress=lambda event: report(
            ExportEvent("", "calibrate", event.done, event.total, event.detail)
        ),
    )


def workload_size(plan: EnginePlan, model_info: Mapping[str, Any]) -> Size | None:
    """The image size calibration and drift run at: the profiles' opt size (every engine
    takes it), or None for models without a size axis."""
    for profile in plan.profiles.values():
        sides = {}
        for name, (side, latent) in _IMAGE_AXES.items():
            if name in profile.dims:
                scale = _vae_scale_factor(model_info, profile.component) if latent else 1
                sides[side] = profile.dims[name].opt * scale
        if len(sides) == 2:
            return sides["width"], sides["height"]
    return None


def _end_to_end_drift(
    root: Path,
    built: Sequence[Variant],
    calib: CalibrationSet,
    report: ProgressCallback,
    total: int,
) -> None:
    from kiln.exporters.runner import ExportEvent
    from kiln.quant.runner import end_to_end_drift

    fp32_quality: dict[str, float] = {}
    for index, variant in enumerate(built, start=1):
        if variant.precision is Precision.FP32:
            continue
        measured = end_to_end_drift(
            root,
            read_manifest(root),
            variant,
            calib,
            lambda event, c=variant.component, i=index: report(
                ExportEvent(c, "drift", i, total, event.detail)
            ),
            fp32_quality,
        )
        write_manifest(root, read_manifest(root).with_variant(measured))
        report(ExportEvent(variant.component, "done", index, total, _summary(measured)))


@dataclass
class _EngineJob:
    """One component at one precision: typed graph -> plan (child process) -> drift -> variant."""

    root: Path
    spec: ComponentSpec
    source: Variant
    precision: Precision
    profile: EngineProfile
    options: EngineOptions
    report: ProgressCallback
    index: int
    total: int

    def event(self, stage: str, detail: str) -> None:
        from kiln.exporters.runner import ExportEvent

        self.report(ExportEvent(self.spec.name, stage, self.index, self.total, detail))

    def run(self, calib: CalibrationSet | None) -> Variant:
        from kiln.exporters.tensorrt_build import BuildRequest, build_plan
        from kiln.exporters.tensorrt_graph import source_key, typed_graph

        final = self.root / variant_folder(self.spec.name, TARGET, self.precision)
        staging = StagingFolder(final)
        started = time.perf_counter()
        try:
            self.event("start", f"tensorrt {self.precision.value}")
            feeds = calib.for_quantizer(self.spec.name) if calib is not None else []
            graph = typed_graph(
                self.precision,
                self.root / self.source.entry,
                self.spec,
                staging.path / WORK_FOLDER,
                feeds,
                cache_dir() / "calibration",
                lambda text: self.event("typing", text),
                source_key=source_key(self.source.files),
            )
            self.event("exported", f"{self.precision.value} graph: {graph.summary}")
            request = BuildRequest(
                component=self.spec.name,
                onnx=str(graph.path),
                plan=str(staging.path / PLAN_FILE),
                inputs=tuple(self.profile.inputs),
                timing_cache_dir=str(cache_dir()),
                optimization_level=self.options.optimization_level,
            )
            built = build_plan(request, lambda text: self.event("building", text))
            shutil.rmtree(staging.path / WORK_FOLDER, ignore_errors=True)
            seconds = time.perf_counter() - started
            self.event("built", f"engine in {seconds:.1f} s on {built.built_for['gpu']}")
            drift = self._component_drift(staging.path / PLAN_FILE, built.built_for, calib)
        except BaseException:
            staging.discard()
            raise
        final = staging.commit()
        prefix = final.relative_to(self.root).as_posix()
        return Variant(
            component=self.spec.name,
            target=TARGET,
            precision=self.precision,
            files=file_entries(self.root, final),
            entry=f"{prefix}/{PLAN_FILE}",
            versions=_versions(built.built_for["tensorrt"]),
            shape_profile={name: r.to_dict() for name, r in self.profile.dims.items()},
            quantization={
                "method": graph.method,
                "source_variant": self.source.id,
                "calibration_calls": len(feeds) if graph.calibrated else 0,
                "details": dict(graph.details),
            },
            drift={"component": drift},
            opset=self.source.opset,
            built_for=built.built_for,
            options={
                "tensorrt_profiles": [[i.to_dict() for i in self.profile.inputs]],
                "optimization_level": self.options.optimization_level,
                "build_seconds": round(built.seconds, 3),
            },
            export_seconds=round(seconds, 3),
        )

    def _component_drift(
        self, plan: Path, built_for: Mapping[str, Any], calib: CalibrationSet | None
    ) -> dict[str, Any]:
        """The engine's outputs against the onnx fp32 graph's, on held-back calls (or on
        random inputs at the profile's opt shapes when nothing was calibrated)."""
        from kiln.exporters.runner import release_memory
        from kiln.quant import drift as drift_metrics
        from kiln.runtimes import open_for_check
        from kiln.runtimes.tensorrt import TensorRTSession

        self.event("drift", "engine outputs vs onnx fp32")
        if calib is not None and calib.held_out(self.spec.name):
            calls = calib.held_out(self.spec.name)
        else:
            sizes = {name: r.opt for name, r in self.profile.dims.items()}
            calls = [{k: v.numpy() for k, v in self.spec.sample_inputs(sizes).items()}]
        reference = open_for_check(self.root / self.source.entry, self.spec, "onnx", root=self.root)
        expected = [reference.run(feeds) for feeds in calls]
        del reference
        release_memory()
        engine = TensorRTSession(plan, self.spec, built_for=built_for)
        actual = [engine.run(feeds) for feeds in calls]
        del engine
        return drift_metrics.component_drift(expected, [_as_float(a) for a in actual])


def _as_float(outputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {name: np.asarray(value, dtype=np.float32) for name, value in outputs.items()}


def _versions(tensorrt_version: str) -> dict[str, str]:
    from kiln.exporters.runner import library_versions

    return library_versions(TARGET, tensorrt=tensorrt_version)


def _summary(variant: Variant) -> str:
    figures = [f"{variant.size_bytes / 2**20:.1f} MiB"]
    built = variant.built_for or {}
    if built:
        figures.append(f"{built.get('gpu')} sm {built.get('compute_capability')}")
    drift = variant.drift or {}
    for metric in ("psnr", "bleu", "exact_match", "itm_abs"):
        if metric in drift:
            figures.append(f"{metric} {drift[metric]:g}")
    return f"{variant.id}: " + ", ".join(figures)


__all__ = [
    "ENGINE_PRECISIONS",
    "EngineOptions",
    "EnginePlan",
    "EngineProfile",
    "InputProfile",
    "ShapeRange",
    "build_engines",
    "check_can_build",
    "engine_profiles",
    "missing_for_engines",
    "plan_engines",
]
