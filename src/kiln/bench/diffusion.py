"""Stable Diffusion runners: a kiln artifact, and its source model in PyTorch (eager or compiled).

A runner loads one bench variant and runs one generate call at a time; a `CallTimer`
records how long each component took inside the call. The worker (`kiln.bench.worker`)
times the rest and turns it into figures. Runners for another family (BLIP captioning)
live in their own module with the same shape, registered in `kiln.bench.harness.FAMILIES`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kiln.bench.workload import Case, Workload
from kiln.errors import InvalidRequestError

# Component names shared by every runner, so figures line up across variants.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
UNET = "unet"
VAE_DECODER = "vae_decoder"

# Figure name -> (components summed per generate call, or per call when per_call is True).
COMPONENT_FIGURES = {
    "text_encoder_ms": (TEXT_ENCODERS, False),
    "unet_step_ms": ((UNET,), True),
    "vae_decode_ms": ((VAE_DECODER,), False),
}


class CallTimer:
    """Wraps callables so that every call appends (component, seconds) to `calls`."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.calls: list[tuple[str, float]] = []
        self.sync = sync

    def wrap(self, component: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.sync is not None:
                self.sync()
            self.calls.append((component, time.perf_counter() - started))
            return out

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def take(self) -> dict[str, list[float]]:
        """Seconds per call, by component, since the last `take()`."""
        out: dict[str, list[float]] = {}
        for component, seconds in self.calls:
            out.setdefault(component, []).append(seconds)
        self.calls = []
        return out


def time_session(timer: Any, name: str, session: Any) -> None:
    """Time every call of `session` under `name`, whichever way it comes in.

    Through instance attributes: the adapters hold the same session objects, so this sees
    every call without touching runtime code. A call enters by `run` (numpy on the host)
    or `run_on_device` (tensors on the session's device), and the second may call the first:
    the outer one is timed, once. Sessions on a CUDA device return before their kernels
    finish, so a timed call waits for them.
    """
    sync = None
    if session.tensor_device.type == "cuda":
        import torch

        sync = torch.cuda.synchronize
    inside = [False]

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def finished(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            if sync is not None:
                sync()
            return out

        timed = timer.wrap(name, finished)

        def once(*args: Any, **kwargs: Any) -> Any:
            if inside[0]:
                return fn(*args, **kwargs)
            inside[0] = True
            try:
                return timed(*args, **kwargs)
            finally:
                inside[0] = False

        once.__wrapped__ = fn  # type: ignore[attr-defined]
        return once

    session.run = wrap(session.run)
    session.run_on_device = wrap(session.run_on_device)


class ArtifactRunner:
    """The artifact as `kiln.load()` plans it, optionally forced with require/prefer strings."""

    def __init__(
        self, root: Path, require: list[str], prefer: list[str], objective: str = "latency"
    ) -> None:
        self.root, self.require, self.prefer, self.objective = root, require, prefer, objective
        self.timer = CallTimer()
        self.deployment: Any = None
        self.device = "cpu"

    def load(self) -> None:
        import kiln

        self.deployment = kiln.load(
            self.root, prefer=self.prefer, require=self.require, objective=self.objective
        )
        for name, session in self.deployment.sessions.items():
            time_session(self.timer, name, session)
        devices = {s.device for s in self.deployment.sessions.values()}
        self.device = ",".join(sorted(devices))

    def apply_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Switched on at load, as `kiln generate --lora` does (no re-export)."""
        self.deployment.set_loras(dict(loras))

    def describe(self) -> str:
        runtimes = sorted({c.runtime for c in self.deployment.plan.choices})
        return f"kiln artifact on {', '.join(runtimes)} ({self.device})"

    def plan(self) -> list[dict[str, str]]:
        keys = ("component", "variant", "runtime", "device", "reason")
        return [dict(zip(keys, row, strict=True)) for row in self.deployment.plan.rows()]

    def size_on_disk(self) -> tuple[int | None, str | None]:
        manifest = self.deployment.manifest
        size = sum(f.size for f in manifest.support_files)
        size += sum(manifest.variant(c.variant_id).size_bytes for c in self.deployment.plan.choices)
        return size, None

    def generate(
        self, workload: Workload, case: Case, prompt: str, seed: int, on_step: Callable
    ) -> list[Any]:
        result = self.deployment.generate(
            prompt,
            negative_prompt=workload.negative_prompt,
            steps=case.steps,
            guidance_scale=workload.guidance_scale,
            width=case.width,
            height=case.height,
            seed=seed,
            num_images=case.batch,
            scheduler=workload.scheduler,
            progress=on_step,
        )
        return result.images


class TorchRunner:
    """The source model in diffusers/PyTorch, eager or with `torch.compile` (UNet, VAE).

    fp32 on the GPU when there is one, else on the CPU; `half=True` (the `torch-cuda-fp16`
    baseline) is diffusers in fp16 on the GPU, as a PyTorch user runs it there.
    """

    def __init__(
        self,
        source: dict[str, Any],
        model_info: dict[str, Any],
        compiled: bool,
        half: bool = False,
    ) -> None:
        self.source, self.model_info, self.compiled = source, model_info, compiled
        self.half = half
        self.pipeline: Any = None
        self.device = "cpu"
        self.timer = CallTimer()

    def load(self) -> None:
        import torch
        from diffusers import DiffusionPipeline

        if self.half and not torch.cuda.is_available():
            raise InvalidRequestError("the torch-cuda-fp16 baseline needs a CUDA device")
        folder = self.source_folder()
        xl = self.model_info.get("architecture") == "sdxl"
        extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        if self.half:
            extra["dtype"] = torch.float16
        pipeline = DiffusionPipeline.from_pretrained(folder, **extra)
        if xl:
            pipeline.watermark = None
        pipeline.set_progress_bar_config(disable=True)
        if torch.cuda.is_available():
            self.device = "cuda"
            pipeline.to("cuda")
            self.timer.sync = torch.cuda.synchronize
        if self.compiled:
            # Compilation itself happens lazily, inside the first call (first_call_s).
            pipeline.unet = torch.compile(pipeline.unet)
            pipeline.vae.decoder = torch.compile(pipeline.vae.decoder)
        for name in TEXT_ENCODERS:
            module = getattr(pipeline, name, None)
            if module is not None:
                module.forward = self.timer.wrap(name, module.forward)
        pipeline.unet.forward = self.timer.wrap(UNET, pipeline.unet.forward)
        pipeline.vae.decode = self.timer.wrap(VAE_DECODER, pipeline.vae.decode)
        self.pipeline = pipeline

    def apply_loras(self, loras: Sequence[tuple[str, float]]) -> None:
        """Fused by diffusers (`load_lora_weights` + `fuse_lora`), as a PyTorch user would."""
        from kiln.models.lora import LoraFile, fuse_loras

        if self.compiled:
            raise InvalidRequestError(
                "the torch-compile baseline does not take LoRAs; use the torch baseline"
            )
        files = [LoraFile(Path(path), scale) for path, scale in loras]
        fuse_loras(self.pipeline, files, str(self.model_info.get("architecture")))

    def source_folder(self) -> str:
        if self.source.get("kind") == "folder":
            return str(self.source["id"])
        if self.source.get("kind") == "builtin":
            from kiln.models.builtin import builtin_path

            return str(builtin_path(str(self.source["id"])))
        from huggingface_hub import snapshot_download

        return snapshot_download(self.source["id"], local_files_only=True)

    def describe(self) -> str:
        mode = "torch.compile (unet, vae decoder)" if self.compiled else "eager"
        precision = "fp16" if self.half else "fp32"
        return f"source model in diffusers/PyTorch {precision}, {mode} ({self.device})"

    def plan(self) -> list[dict[str, str]]:
        runtime = "torch.compile" if self.compiled else "torch"
        return [
            {
                "component": "pipeline",
                "variant": f"{self.source.get('id')} (source)",
                "runtime": runtime,
                "device": self.device,
                "reason": "baseline",
            }
        ]

    def size_on_disk(self) -> tuple[int | None, str | None]:
        folder = Path(self.source_folder())
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), None

    def generate(
        self, workload: Workload, case: Case, prompt: str, seed: int, on_step: Callable
    ) -> list[Any]:
        import torch

        pipeline = self.pipeline
        if workload.scheduler:
            from kiln.pipelines.schedulers import canonical_name, make_scheduler

            pipeline.scheduler = make_scheduler(
                canonical_name(workload.scheduler), dict(pipeline.scheduler.config)
            )

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            on_step(step + 1, case.steps)
            return callback_kwargs

        with torch.inference_mode():
            output = pipeline(
                prompt,
                negative_prompt=workload.negative_prompt,
                num_inference_steps=case.steps,
                guidance_scale=workload.guidance_scale,
                num_images_per_prompt=case.batch,
                width=case.width,
                height=case.height,
                generator=torch.Generator("cpu").manual_seed(seed),
                callback_on_step_end=on_step_end,
            )
        return list(output.images)


QUALITY_FIGURES = {"judged_correct": "fraction"}


def measure_quality(runner: Any, manifest: Any, workload: Workload) -> dict[str, Any]:
    """Held-out prompts of the shapes world judged correct (`kiln.bench.quality`)."""
    from dataclasses import replace

    from kiln.bench import quality

    why = quality.not_applicable(dict(manifest.source), quality.JUDGED_CORRECT)
    if why:
        return {quality.JUDGED_CORRECT: (None, why)}
    side = default_size(manifest)
    case = Case(side, side, quality.STEPS, 1)
    settings = replace(
        workload, negative_prompt=None, guidance_scale=quality.GUIDANCE, scheduler=None
    )

    def generate(prompt: str, seed: int) -> Any:
        return runner.generate(settings, case, prompt, seed, lambda step, steps: None)[0]

    return {quality.JUDGED_CORRECT: (quality.judged_correct(generate), None)}


def make_runner(
    kind: str,
    root: Path,
    manifest: Any,
    require: list[str],
    prefer: list[str],
    objective: str = "latency",
) -> Any:
    if kind == "artifact":
        return ArtifactRunner(root, require, prefer, objective)
    if kind in ("torch", "torch-compile", "torch-cuda-fp16"):
        return TorchRunner(
            dict(manifest.source),
            dict(manifest.model_info),
            kind == "torch-compile",
            half=kind == "torch-cuda-fp16",
        )
    raise InvalidRequestError(f"unknown bench variant kind {kind!r}")


def baseline_unavailable(manifest: Any) -> str | None:
    """Why the source model cannot be run as a PyTorch baseline here, or None if it can."""
    source = dict(manifest.source)
    kind, ident = source.get("kind"), source.get("id")
    if kind == "builtin":
        return None  # shipped with kiln
    if kind == "folder":
        folder = Path(str(ident))
        if not (folder / "model_index.json").is_file():
            return f"source model folder {ident} is not available on this machine"
        return None
    if kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(str(ident), local_files_only=True)
        except Exception as exc:  # the hub client raises many types; all mean "not cached"
            return f"source model {ident} is not in the local hub cache ({type(exc).__name__})"
        return None
    return f"source kind {kind!r} ({ident}) cannot be loaded as a PyTorch pipeline by the bench yet"


def baseline_notes(manifest: Any) -> list[str]:
    """Warnings about a runnable baseline (e.g. the source folder changed since export)."""
    source = dict(manifest.source)
    if source.get("kind") != "folder":
        return []
    from kiln.models.sources import folder_hash

    revision = source.get("revision", "")
    if revision.startswith("meta-sha256:") and folder_hash(Path(source["id"])) != revision:
        return [
            f"source folder {source['id']} changed since export (files, sizes or times differ): "
            "the baseline may not be the model the artifact was made from"
        ]
    return []


def check_supported(manifest: Any) -> None:
    if dict(manifest.model_info).get("inpainting"):
        raise InvalidRequestError(
            "benchmarking inpainting artifacts is not supported yet (the workload is text-to-image)"
        )


def default_size(manifest: Any) -> int:
    info = dict(manifest.model_info)
    return int(info["default_latent_size"]) * int(info["vae_scale_factor"])


def build_workload(manifest: Any, **options: Any) -> Any:
    """The workload for this artifact: `kiln.bench.workload.build_workload` at its native size.

    Options of other families (captioning's `prompt`, `max_new_tokens`, ...) are refused
    when given.
    """
    from kiln.bench import workload

    known = {"file", "sizes", "steps", "batch", "repeats", "warmup", "seed", "loras"}
    given = sorted(k for k, v in options.items() if k not in known and v not in (None, [], ()))
    if given:
        raise InvalidRequestError(
            f"{', '.join(given)} do(es) not apply to Stable Diffusion benchmarks"
        )
    kept = {k: v for k, v in options.items() if k in known}
    return workload.build_workload(default_size(manifest), **kept)
