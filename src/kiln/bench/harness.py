"""Running a benchmark: plan the variants, measure each in a fresh process, build the report.

    report = run_bench("sd-onnx", baselines=["torch"], json_path="bench.json")

A *bench variant* is a way to run the artifact: the plan `kiln.load()` makes with some
`require`/`prefer` strings (`onnx:fp32`, `unet=openvino:int8,onnx:fp32`), or a baseline
(the source model in PyTorch eager, `torch`, or compiled, `torch-compile`, or in fp16 on
the GPU, `torch-cuda-fp16`, added beside `torch` when a variant runs on CUDA). Each runs in
its own `python -m kiln.bench.worker` process, one after the other, on the same workload
and seeds. The JSON report is rewritten atomically after every variant: an interrupted
run leaves a valid report marked `"status": "interrupted"`, never half a file.

Families: `FAMILIES` maps a manifest family to the module with its runners
(`kiln.bench.diffusion` for Stable Diffusion). Captioning (BLIP) plugs in as another module
with `make_runner`, `baseline_unavailable`, `baseline_notes`, `check_supported`,
`default_size` and `COMPONENT_FIGURES`, plus its own workload (images instead of prompts).
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts import (
    Manifest,
    atomic_write_text,
    check_output_file,
    check_output_folder,
    now_utc,
    read_manifest,
    write_manifest,
)
from kiln.bench.worker import EVENT_PREFIX
from kiln.bench.workload import Workload
from kiln.child_process import log_tail, run_reporting
from kiln.errors import InvalidRequestError

REPORT_SCHEMA = "kiln.bench-report"
REPORT_VERSION = 1
BASELINES = ("torch", "torch-compile", "torch-cuda-fp16")
#: The GPU baseline: what a PyTorch user runs on an NVIDIA GPU (diffusers in fp16).
CUDA_BASELINE = "torch-cuda-fp16"
RATIO_REFERENCE = "torch"
FAMILIES = {
    "stable-diffusion": "kiln.bench.diffusion",
    "blip": "kiln.bench.captioning",
    "blip2": "kiln.bench.captioning",
}

# Figures measured once per variant, and once per case: name -> unit.
VARIANT_FIGURES = {
    "load_s": "s",
    "size_on_disk_bytes": "bytes",
    "peak_rss_bytes": "bytes",
    "peak_vram_bytes": "bytes",
}
CASE_FIGURES = {
    "first_call_s": "s",
    "text_encoder_ms": "ms",
    "unet_step_ms": "ms",
    "vae_decode_ms": "ms",
    "end_to_end_ms": "ms",
    "throughput_images_per_s": "images/s",
    "drift_psnr_db": "dB",
    "drift_ssim": "ssim",
}
NO_RATIO = {"drift_psnr_db", "drift_ssim"}
THROUGHPUT = ("throughput_images_per_s", "images/s", "images")


def case_figures(family: Any) -> dict[str, str]:
    """The case figures of a family module (name -> unit); Stable Diffusion's by default."""
    return getattr(family, "CASE_FIGURES", CASE_FIGURES)


def no_ratio(family: Any) -> set[str]:
    return set(getattr(family, "NO_RATIO", NO_RATIO))


Event = dict[str, Any]


@dataclass(frozen=True)
class BenchVariant:
    id: str
    kind: str  # "artifact" or one of BASELINES
    require: tuple[str, ...] = ()
    prefer: tuple[str, ...] = ()
    skip_reason: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "_", self.id).strip("_") or "variant"

    @property
    def is_baseline(self) -> bool:
        return self.kind in BASELINES


def family_module(manifest: Manifest) -> Any:
    name = FAMILIES.get(manifest.family)
    if name is None:
        raise InvalidRequestError(
            f"`kiln bench` does not support {manifest.family} artifacts yet "
            f"(supported: {', '.join(FAMILIES)})"
        )
    return importlib.import_module(name)


def default_variants(manifest: Manifest) -> list[str]:
    """One variant per `target:precision` the artifact holds (today: `onnx:fp32`)."""
    combos = dict.fromkeys(f"{v.target}:{v.precision.value}" for v in manifest.variants)
    return list(combos)


def _constraints(text: str, manifest: Manifest) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`--variant` text -> (require, prefer). `auto` is kiln.load's own choice.

    A plain `target:precision` is required of every component that has it; components
    without it keep their default choice (a plan, not a refusal).
    """
    if text == "auto":
        return (), ()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    if len(parts) == 1 and "=" not in parts[0]:
        from kiln.profiles.select import Constraint

        constraint = Constraint.parse(parts[0])
        components = dict.fromkeys(v.component for v in manifest.variants)
        having = [
            c for c in components if any(constraint.matches(v) for v in manifest.variants_of(c))
        ]
        if having and len(having) < len(components):
            return tuple(f"{c}={parts[0]}" for c in having), ()
    return parts, ()


def plan_variants(
    manifest: Manifest,
    requested: Sequence[str] = (),
    baselines: Sequence[str] = ("torch",),
    prefer: Sequence[str] = (),
) -> list[BenchVariant]:
    """Baselines first (PyTorch eager leads, so ratios refer to a run minutes apart), then
    the artifact variants. Variants that cannot run here are kept, skipped with a reason.

    `prefer` (`RUNTIME:PRECISION` strings, as `kiln.load(prefer=...)`) applies to the `auto`
    variant, which is added when it was not requested.
    """
    from kiln.profiles.hardware import detect

    family = family_module(manifest)
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise InvalidRequestError(f"unknown baseline {unknown[0]!r}; use {', '.join(BASELINES)}")
    profile = detect()
    artifact_variants, on_cuda = _artifact_variants(manifest, profile, requested, prefer)
    variants: list[BenchVariant] = []
    wanted = list(dict.fromkeys(baselines))
    if "torch-compile" in wanted and "torch" not in wanted:
        wanted.insert(0, "torch")  # ratios always refer to eager
    if on_cuda and "torch" in wanted and CUDA_BASELINE not in wanted:
        wanted.append(CUDA_BASELINE)  # the GPU figures' own baseline
    unavailable = family.baseline_unavailable(manifest) if wanted else None
    notes = tuple(family.baseline_notes(manifest)) if wanted and not unavailable else ()
    supported = getattr(family, "BASELINES", BASELINES)
    for kind in sorted(wanted, key=BASELINES.index):
        why = unavailable
        if why is None and kind not in supported:
            why = f"no {kind} baseline for {manifest.family} artifacts yet"
        if why is None and kind == CUDA_BASELINE and not _torch_cuda(profile):
            why = "needs an NVIDIA GPU and a CUDA build of torch"
        variants.append(BenchVariant(kind, kind, skip_reason=why, notes=notes if not why else ()))
    return variants + artifact_variants


def _torch_cuda(profile: Any) -> bool:
    torch = profile.runtime("torch")
    return profile.has_cuda and torch is not None and torch.detail.startswith("cuda")


def _artifact_variants(
    manifest: Manifest, profile: Any, requested: Sequence[str], prefer: Sequence[str]
) -> tuple[list[BenchVariant], bool]:
    """The artifact's bench variants, and whether any of them runs a component on CUDA."""
    from kiln.errors import KilnError
    from kiln.profiles.select import Policy, select

    variants: list[BenchVariant] = []
    on_cuda = False
    texts = list(dict.fromkeys(requested)) or default_variants(manifest)
    prefer = tuple(dict.fromkeys(p.strip() for p in prefer if p.strip()))
    if prefer and "auto" not in texts:
        texts.append("auto")
    for text in texts:
        if text in BASELINES:
            raise InvalidRequestError(f"{text} is a baseline: pass it with --baseline {text}")
        try:
            require, preferred = _constraints(text, manifest)
            if text == "auto":
                preferred = prefer
            plan = select(manifest, profile, Policy.from_strings(preferred, require))
            on_cuda = on_cuda or any(c.device.startswith("cuda") for c in plan.choices)
            reason = None
        except KilnError as exc:
            require, preferred, reason = (), (), f"not runnable here: {exc}"
        variants.append(BenchVariant(text, "artifact", require, preferred, reason))
    return variants, on_cuda


def family_workload(family: Any, manifest: Manifest, **options: Any) -> Any:
    """The family's workload for `manifest` from defaults, a file and overrides."""
    builder = getattr(family, "build_workload", None)
    if builder is not None:
        return builder(manifest, **options)
    from kiln.bench.workload import build_workload

    return build_workload(family.default_size(manifest), **options)


# ------------------------------------------------------------------------------- running


def _worker_command() -> list[str]:
    return [sys.executable, "-m", "kiln.bench.worker"]


def _run_worker(
    command: Sequence[str],
    request_path: Path,
    log_path: Path,
    on_event: Callable[[Event], None],
    variant: BenchVariant,
) -> int:
    """Run one worker, forwarding its progress events; the worker's chatter goes to the log."""
    return run_reporting(
        [*command, str(request_path)],
        log_path,
        EVENT_PREFIX,
        lambda event: on_event({**event, "variant": variant.id}),
        stop_signal=signal.SIGINT,  # the worker saves what it has measured and exits
    )


def run_bench(
    artifact: str | Path,
    *,
    variants: Sequence[str] = (),
    baselines: Sequence[str] = ("torch",),
    workload: Workload | None = None,
    prefer: Sequence[str] = (),
    objective: str = "latency",
    json_path: str | Path | None = None,
    report_dir: str | Path | None = None,
    record: bool = False,
    on_event: Callable[[Event], None] | None = None,
    worker_command: Sequence[str] | None = None,
    abandon: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure every planned variant, write the JSON (after each variant) and return it.

    `objective` is passed to `kiln.load()` for the artifact's variants (each plan records it).
    `abandon` (kiln optimize) is the best run measured so far: an artifact variant whose
    first measured call is clearly slower everywhere (`kiln.bench.worker.cannot_win`) stops
    there, skipped with that reason.

    `worker_command` replaces `python -m kiln.bench.worker` (another interpreter, or a
    wrapper); the request file path is appended to it.
    On KeyboardInterrupt the report is finished with what was measured, written with
    status "interrupted", and the interrupt is re-raised.
    """
    from kiln.profiles.hardware import detect

    root = Path(artifact)
    manifest = read_manifest(root)
    family = family_module(manifest)
    family.check_supported(manifest)
    if workload is None:
        workload = family_workload(family, manifest)
    from kiln.profiles.select import Policy

    Policy(objective=objective)  # an unknown objective fails here, before any variant runs
    planned = plan_variants(manifest, variants, baselines, prefer)
    emit = on_event or (lambda event: None)
    profile = detect()
    json_file = check_output_file(json_path, "--json") if json_path is not None else None
    report_root = check_output_folder(report_dir, "--report") if report_dir is not None else None
    if report_root is not None:
        report_root.mkdir(parents=True, exist_ok=True)
        json_file = json_file or report_root / "bench.json"
    scratch = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    images_dir = report_root / "images" if report_root is not None else scratch / "images"
    raw: dict[str, dict[str, Any]] = {}
    meta = {
        "started": now_utc(),
        "artifact": root,
        "manifest": manifest,
        "profile": profile,
        "workload": workload,
        "variants": planned,
        "family": family,
        "images_root": report_root,
    }

    def publish(status: str) -> dict[str, Any]:
        report = build_report(meta, raw, status)
        if json_file is not None:
            atomic_write_text(json_file, json.dumps(report, indent=2) + "\n")
        return report

    command = list(worker_command or _worker_command())
    status = "interrupted"
    try:
        publish("partial")
        for index, variant in enumerate(planned):
            emit({"event": "variant", "variant": variant.id, "index": index, "total": len(planned)})
            if variant.skip_reason:
                raw[variant.id] = {"status": "skipped", "reason": variant.skip_reason}
                emit({"event": "variant_done", "variant": variant.id, "status": "skipped"})
                continue
            request = {
                "artifact": str(root.resolve()),
                "family_module": FAMILIES[manifest.family],
                "variant": {
                    "id": variant.id,
                    "slug": variant.slug,
                    "kind": variant.kind,
                    "require": list(variant.require),
                    "prefer": list(variant.prefer),
                },
                "workload": workload.to_dict(),
                "objective": objective,
                "abandon": None if variant.is_baseline else abandon,
                "images_dir": str(images_dir),
                "result": str(scratch / f"{variant.slug}.result.json"),
            }
            request_path = scratch / f"{variant.slug}.request.json"
            request_path.write_text(json.dumps(request), encoding="utf-8")
            log_path = scratch / f"{variant.slug}.log"
            try:
                code = _run_worker(command, request_path, log_path, emit, variant)
            except BaseException:
                raw[variant.id] = _read_result(request["result"], "interrupted", "interrupted")
                raise
            raw[variant.id] = _read_result(
                request["result"],
                "failed",
                f"worker exited with code {code}: {log_tail(log_path, lines=6)}",
            )
            if code != 0 and raw[variant.id].get("status") == "ok":
                raw[variant.id]["status"] = "failed"
            if raw[variant.id].get("status") == "failed" and report_root is not None:
                shutil.copyfile(log_path, report_root / f"{variant.slug}.log")
            emit(
                {
                    "event": "variant_done",
                    "variant": variant.id,
                    "status": raw[variant.id].get("status"),
                }
            )
            publish("partial")
        status = "complete"
    finally:
        report = publish(status)
        shutil.rmtree(scratch, ignore_errors=True)
    if record:
        record_measurements(root, report)
    return report


def _read_result(path: str, status: str, reason: str) -> dict[str, Any]:
    """The worker's result file; a worker that stopped early keeps what it measured."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"status": status, "reason": reason}
    if data.get("status") in ("partial", None):
        data.update(status=status, reason=reason)
    elif data.get("status") == "failed" and not data.get("reason"):
        data["reason"] = reason
    return data


# --------------------------------------------------------------------------- the report


def _figure(value: Any, unit: str, fingerprint: str, reason: str | None = None) -> dict[str, Any]:
    if value is None and not reason:
        reason = "not measured"
    return {
        "value": value,
        "unit": unit,
        "reason": None if value is not None else reason,
        "ratio": None,
        "fingerprint": fingerprint,
    }


def _timing(samples: list[float], unit: str, fingerprint: str, reason: str) -> dict[str, Any]:
    from kiln.bench.metrics import summarize

    if not samples:
        return _figure(None, unit, fingerprint, reason)
    stats = summarize(samples)
    figure = _figure(stats["median"], unit, fingerprint)
    figure["stats"] = stats
    return figure


def _case_figures(
    data: dict[str, Any] | None,
    fingerprint: str,
    family: Any,
    missing: str,
    never: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`never`: figures this artifact cannot have (no such component), with the reason."""
    figures: dict[str, Any] = {}
    names = case_figures(family)
    if not data:
        return {name: _figure(None, unit, fingerprint, missing) for name, unit in names.items()}
    calls = data.get("calls", [])
    first = data.get("first_call_s")
    figures["first_call_s"] = _figure(first, "s", fingerprint, missing)
    for name, (components, per_call) in family.COMPONENT_FIGURES.items():
        samples: list[float] = []
        for call in calls:
            found = [s for c in components for s in call["components"].get(c, [])]
            if per_call:
                samples += [s * 1000 for s in found]
            elif found:
                samples.append(sum(found) * 1000)
        why = missing if not calls else f"no {' or '.join(components)} calls were seen"
        if calls and never and name in never:
            why = never[name]
        figures[name] = _timing(samples, "ms", fingerprint, why)
    derived = getattr(family, "derived_samples", lambda calls: {})(calls)
    for name, samples in derived.items():
        figures[name] = _timing(samples, names[name], fingerprint, missing)
    e2e = [call["seconds"] * 1000 for call in calls]
    figures["end_to_end_ms"] = _timing(e2e, "ms", fingerprint, missing)
    rate_name, rate_unit, counted = getattr(family, "THROUGHPUT", THROUGHPUT)
    if calls and all(counted in call for call in calls):
        rates = [call[counted] / call["seconds"] for call in calls]
        figures[rate_name] = _timing(rates, rate_unit, fingerprint, missing)
    else:
        why = missing if not calls else f"the calls did not report {counted}"
        figures[rate_name] = _figure(None, rate_unit, fingerprint, why)
    for name in no_ratio(family):  # filled in by _apply_drift once every variant is known
        figures[name] = _figure(None, names[name], fingerprint, missing)
    return {name: figures[name] for name in names}


def _component_stats(data: dict[str, Any] | None) -> dict[str, Any]:
    """Per-call latency of every session/module (for --record and the stacked bars)."""
    from kiln.bench.metrics import summarize

    merged: dict[str, list[float]] = {}
    for call in (data or {}).get("calls", []):
        for component, seconds in call["components"].items():
            merged.setdefault(component, []).extend(s * 1000 for s in seconds)
    out = {}
    for component, samples in merged.items():
        stats = summarize(samples)
        stats.pop("samples")
        out[component] = {"calls_per_generate": len(samples) / len(data["calls"]), **stats}
    return out


def _relative_images(paths: list[str], images_root: Path | None) -> list[str]:
    """Image paths relative to the report folder; none without one (they were scratch)."""
    if images_root is None:
        return []
    out = []
    for path in paths:
        try:
            out.append(Path(path).relative_to(images_root).as_posix())
        except ValueError:
            out.append(path)
    return out


def build_report(
    meta: dict[str, Any], raw: dict[str, dict[str, Any]], status: str
) -> dict[str, Any]:
    """The versioned JSON document (schema: kiln/bench/schema/bench-report.v1.json)."""
    from kiln import __version__
    from kiln.bench.worker import library_versions

    manifest: Manifest = meta["manifest"]
    profile = meta["profile"]
    workload: Workload = meta["workload"]
    family = meta["family"]
    reasons = getattr(family, "component_reasons", None)
    never = reasons(manifest.family) if reasons else {}
    fingerprint = profile.fingerprint
    variants = []
    for planned in meta["variants"]:
        data = raw.get(planned.id)
        if data is None:
            data = {"status": "pending" if status == "partial" else "interrupted"}
            data["reason"] = (
                "not measured yet" if status == "partial" else "the run was interrupted before it"
            )
        variant_status = data.get("status", "failed")
        reason = data.get("reason")
        missing = reason or f"variant {variant_status}"
        vfp = data.get("fingerprint", fingerprint)
        size, size_reason = data.get("size_on_disk", [None, missing])
        rss, rss_reason = data.get("peak_rss", [None, missing])
        vram, vram_reason = data.get("peak_vram", [None, missing])
        figures = {
            "load_s": _figure(data.get("load_s"), "s", vfp, missing),
            "size_on_disk_bytes": _figure(size, "bytes", vfp, size_reason or missing),
            "peak_rss_bytes": _figure(rss, "bytes", vfp, rss_reason or missing),
            "peak_vram_bytes": _figure(vram, "bytes", vfp, vram_reason or missing),
        }
        quality = data.get("quality", {})
        for name, unit in getattr(family, "QUALITY_FIGURES", {}).items():
            value, why = quality.get(name, (None, missing))
            figures[name] = _figure(value, unit, vfp, why or missing)
        if data.get("vram_sources"):
            figures["peak_vram_bytes"]["sources"] = data["vram_sources"]
        if getattr(workload, "loras", ()):  # switched on at load (artifact) or fused (torch)
            figures["lora_switch_s"] = _figure(data.get("lora_s"), "s", vfp, missing)
        cases = []
        for case in workload.cases:
            case_data = data.get("cases", {}).get(case.id)
            why = "case not reached" if variant_status == "ok" else missing
            cases.append(
                {
                    "case": case.id,
                    "figures": _case_figures(case_data, vfp, family, why, never),
                    "components": _component_stats(case_data)
                    if case_data and case_data.get("calls")
                    else {},
                    "images": _relative_images(
                        (case_data or {}).get("images", []), meta["images_root"]
                    ),
                    "_image_paths": list((case_data or {}).get("images", [])),
                    "_outputs": list((case_data or {}).get("outputs", [])),
                }
            )
            if case_data and "outputs" in case_data:
                first = case_data["outputs"][0] if case_data["outputs"] else {}
                cases[-1]["captions"] = list(first.get("captions", []))
        variants.append(
            {
                "id": planned.id,
                "kind": "baseline" if planned.is_baseline else "artifact",
                "runner": planned.kind,
                "description": data.get("description", ""),
                "require": list(planned.require),
                "prefer": list(planned.prefer),
                "status": variant_status,
                "reason": reason,
                "notes": list(planned.notes),
                "plan": data.get("plan", []),
                "fingerprint": vfp,
                "versions": data.get("versions", {}),
                "figures": figures,
                "cases": cases,
            }
        )
    ratio_ref = _apply_ratios(
        variants, no_ratio(family) | set(getattr(family, "QUALITY_FIGURES", {}))
    )
    drift_ref = _apply_drift(variants, workload, family)
    for variant in variants:
        for case in variant["cases"]:
            case.pop("_image_paths")
            case.pop("_outputs")
    return {
        "schema": REPORT_SCHEMA,
        "schema_version": REPORT_VERSION,
        "status": status,
        "started": meta["started"],
        "finished": None if status == "partial" else now_utc(),
        "kiln_version": __version__,
        "artifact": {
            "path": str(meta["artifact"]),
            "family": manifest.family,
            "source": dict(manifest.source),
            "model_info": dict(manifest.model_info),
            "variant_ids": manifest.variant_ids(),
        },
        "hardware": {
            "fingerprint": fingerprint,
            "cpu": profile.cpu.model_name,
            "logical_cores": profile.cpu.logical_cores,
            "gpus": [g.name for g in profile.gpus],
            "os": f"{profile.os_name} {profile.os_version}".strip(),
        },
        "versions": library_versions(),
        "workload": workload.to_dict(),
        "ratio_reference": ratio_ref,
        "drift_reference": drift_ref,
        "variants": variants,
    }


def _apply_ratios(
    variants: list[dict[str, Any]], skip: set[str] | frozenset[str] = frozenset(NO_RATIO)
) -> dict[str, Any]:
    """Every numeric figure divided by PyTorch eager's figure from this same run."""
    ref = next((v for v in variants if v["id"] == RATIO_REFERENCE), None)
    if ref is None:
        return {"variant": None, "reason": "no PyTorch eager baseline was requested"}
    if ref["status"] != "ok":
        return {
            "variant": None,
            "reason": f"the PyTorch eager baseline has no figures: {ref['reason']}",
        }

    def divide(figure: dict[str, Any], base: dict[str, Any]) -> None:
        if figure["value"] is not None and base["value"]:
            figure["ratio"] = figure["value"] / base["value"]

    for variant in variants:
        for name, figure in variant["figures"].items():
            if name not in skip and name in ref["figures"]:
                divide(figure, ref["figures"][name])
        for case, ref_case in zip(variant["cases"], ref["cases"], strict=True):
            for name, figure in case["figures"].items():
                if name not in skip:
                    divide(figure, ref_case["figures"][name])
    return {"variant": RATIO_REFERENCE, "reason": None}


def _drift_reference(variants: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, str | None]:
    ref = next((v for v in variants if v["id"] == RATIO_REFERENCE and v["status"] == "ok"), None)
    if ref is not None:
        return ref, None
    for variant in variants:
        if (
            variant["kind"] == "artifact"
            and variant["status"] == "ok"
            and all(row["variant"].endswith("/fp32") for row in variant["plan"])
        ):
            return variant, None
    return None, "neither a PyTorch eager baseline nor an all-fp32 artifact variant was measured"


def _apply_drift(
    variants: list[dict[str, Any]], workload: Workload, family: Any = None
) -> dict[str, Any]:
    """PSNR/SSIM of each variant's first-call images against the reference's (same seed);
    a family with its own `apply_drift(variants, ref, why)` (captions) measures its own."""
    from PIL import Image

    from kiln.bench.metrics import psnr, ssim

    ref, why = _drift_reference(variants)
    own = getattr(family, "apply_drift", None)
    if own is not None:
        own(variants, ref, why)
        if ref is None:
            return {"variant": None, "reason": why, "seed": workload.seed}
        return {"variant": ref["id"], "reason": None, "seed": workload.seed}
    for variant in variants:
        for index, case in enumerate(variant["cases"]):
            psnr_fig, ssim_fig = case["figures"]["drift_psnr_db"], case["figures"]["drift_ssim"]
            ours = case["_image_paths"]
            if ref is None:
                reason = why
            elif variant is ref:
                reason = "this variant is the drift reference"
            elif not ours:
                reason = psnr_fig["reason"] or "no images"
            elif not ref["cases"][index]["_image_paths"]:
                reason = f"the reference ({ref['id']}) has no images for this case"
            else:
                pairs = list(zip(ours, ref["cases"][index]["_image_paths"], strict=False))
                try:
                    scores = []
                    for a, b in pairs:
                        with Image.open(a) as x, Image.open(b) as y:
                            x, y = x.convert("RGB"), y.convert("RGB")
                            scores.append((psnr(x, y), ssim(x, y)))
                except (OSError, ValueError) as exc:
                    reason = f"images could not be compared: {exc}"
                else:
                    worst_psnr = min(s[0] for s in scores)
                    worst_ssim = min(s[1] for s in scores)
                    if worst_psnr == float("inf"):
                        psnr_fig.update(
                            value=None, reason="identical to the reference (PSNR is infinite)"
                        )
                    else:
                        psnr_fig.update(value=worst_psnr, reason=None)
                    ssim_fig.update(value=worst_ssim, reason=None)
                    continue
            psnr_fig.update(value=None, reason=reason)
            ssim_fig.update(value=None, reason=reason)
    if ref is None:
        return {"variant": None, "reason": why, "seed": workload.seed}
    return {"variant": ref["id"], "reason": None, "seed": workload.seed}


# ------------------------------------------------------------------------------- record


def record_measurements(artifact: str | Path, report: dict[str, Any]) -> dict[str, Any]:
    """Write each measured component variant's latency into the manifest, by fingerprint.

    `manifest.measurements[fingerprint][variant_id] = {"median_ms": ...}` per component
    variant (e.g. `unet/onnx/fp32`), from the first case of the workload; selection ranks
    by `median_ms`. When several bench variants used the same component variant, the
    fastest median is kept. Written atomically with `write_manifest`.
    """
    root = Path(artifact)
    manifest = read_manifest(root)
    fingerprint = report["hardware"]["fingerprint"]
    entries: dict[str, dict[str, Any]] = {}
    for variant in report["variants"]:
        if variant["kind"] != "artifact" or variant["status"] != "ok" or not variant["cases"]:
            continue
        case = variant["cases"][0]
        e2e = case["figures"]["end_to_end_ms"]["value"]
        for row in variant["plan"]:
            stats = case["components"].get(row["component"])
            if stats is None:
                continue
            entry = {
                "median_ms": stats["median"],
                "p90_ms": stats["p90"],
                "p99_ms": stats["p99"],
                "calls": stats["n"],
                "end_to_end_median_ms": e2e,
                "case": case["case"],
                "bench_variant": variant["id"],
                "runtime": row["runtime"],
                "device": row["device"],
                "measured": report["finished"] or report["started"],
                "kiln_version": report["kiln_version"],
                "versions": variant["versions"],
            }
            old = entries.get(row["variant"])
            if old is None or entry["median_ms"] < old["median_ms"]:
                entries[row["variant"]] = entry
    if not entries:
        return {}
    measurements = {k: dict(v) for k, v in manifest.measurements.items()}
    measurements.setdefault(fingerprint, {}).update(entries)
    from dataclasses import replace

    write_manifest(root, replace(manifest, measurements=measurements))
    return entries
