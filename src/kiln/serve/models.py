"""The artifacts a server holds: named, loaded in the background, warmed up, each with a queue.

Stable Diffusion artifacts serve the image endpoints (selectable by name, as AUTOMATIC1111's
checkpoints are), BLIP / BLIP-2 artifacts the caption endpoints, retrieval models `match`.
The runners here turn a batch of jobs into one `generate()` / `caption()` / `match()` call.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts import read_manifest
from kiln.errors import InvalidRequestError, KilnError
from kiln.serve.jobs import Job, JobBoard, JobQueue, JobState
from kiln.serve.loras import LoraLibrary
from kiln.serve.settings import ServeSettings

log = logging.getLogger("kiln.serve")

DIFFUSION, CAPTIONING, MATCHING = "diffusion", "captioning", "matching"


@dataclass
class ServedModel:
    name: str
    path: Path
    family: str
    kind: str
    deployment: Any = None
    error: str | None = None
    load_seconds: float | None = None
    warm: bool = False
    component_seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "kind": self.kind,
            "loaded": self.deployment is not None,
            "warm": self.warm,
            "error": self.error,
            "load_seconds": self.load_seconds,
        }


class ModelRegistry:
    """Names the artifacts, loads them (off the event loop), warms them up, queues their jobs."""

    def __init__(self, paths: Sequence[str | Path], settings: ServeSettings) -> None:
        self.settings = settings
        self.models: dict[str, ServedModel] = {}
        for path in paths:
            path = Path(path)
            manifest = read_manifest(path)  # a wrong path fails here, before the server starts
            name = _unique(path.resolve().name, self.models)
            kind = _kind(manifest)
            self.models[name] = ServedModel(name, path, manifest.family, kind)
        if not self.models:
            raise InvalidRequestError("kiln serve needs at least one artifact folder")
        self.board = JobBoard()
        self.loras = LoraLibrary(settings.lora_dir)
        self.default_diffusion = next(iter(self.named(DIFFUSION)), None)
        self.started = time.time()
        self.ready_seconds: float | None = None
        self.on_job_finished: list[Any] = []
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------- lookup

    def named(self, kind: str) -> list[str]:
        return [name for name, model in self.models.items() if model.kind == kind]

    def pick(self, kind: str, name: str | None, field_name: str = "model") -> ServedModel:
        """The model of `kind` called `name` (a title `name [hash]` as A1111 sends is fine)."""
        candidates = self.named(kind)
        if not candidates:
            raise InvalidRequestError(f"this server holds no {kind} model")
        if name in (None, ""):
            chosen = self.default_diffusion if kind == DIFFUSION else candidates[0]
        else:
            bare = str(name).split(" [")[0].strip()
            chosen = bare if bare in candidates else None
            if chosen is None:
                raise InvalidRequestError(
                    f"{field_name}: no {kind} model named {name!r}; this server has "
                    f"{', '.join(candidates)}"
                )
        model = self.models[chosen]
        if model.deployment is None:
            raise NotReadyError(model.error or f"{model.name} is still loading")
        return model

    @property
    def ready(self) -> bool:
        return all(m.warm for m in self.models.values())

    # ------------------------------------------------------------------------- loading

    def start(self) -> None:
        """Load and warm every model in a background thread; queues open as each is ready."""
        if self._thread is not None:
            return  # already loading or loaded (`load`)
        self._thread = threading.Thread(target=self._load_all, name="kiln-load", daemon=True)
        self._thread.start()

    def load(self) -> None:
        """Load and warm every model before returning (a Ray replica takes traffic after)."""
        self.start()
        self._thread.join()

    @property
    def errors(self) -> list[str]:
        return [m.error for m in self.models.values() if m.error]

    def _load_all(self) -> None:
        import kiln

        for model in self.models.values():
            started = time.perf_counter()
            try:
                deployment = kiln.load(
                    model.path,
                    prefer=self.settings.prefer,
                    require=self.settings.require,
                    objective=self.settings.objective,
                    switch_loras=self.settings.lora_dir is not None and model.kind == DIFFUSION,
                )
                model.load_seconds = time.perf_counter() - started
                self._add_queue(model)
                model.deployment = deployment  # requests are taken from here on
                self._warm_up(model)
                model.warm = True
                log.info(
                    json.dumps(
                        {
                            "event": "model_ready",
                            "model": model.name,
                            "kind": model.kind,
                            "seconds": round(time.perf_counter() - started, 3),
                        }
                    )
                )
            except KilnError as exc:
                model.error = f"{model.name}: {exc}"
                log.error(
                    json.dumps({"event": "model_failed", "model": model.name, "error": str(exc)})
                )
        if self.ready:
            self.ready_seconds = time.time() - self.started

    def _add_queue(self, model: ServedModel) -> None:
        runner = {
            DIFFUSION: self._run_generation,
            CAPTIONING: self._run_captions,
            MATCHING: self._run_match,
        }[model.kind]
        queue = JobQueue(
            model.name,
            lambda jobs, m=model, r=runner: r(m, jobs),
            self.settings.max_queue,
            batch_key=_caption_batch_key if model.kind == CAPTIONING else (lambda job: None),
            max_batch=8 if model.kind == CAPTIONING else 1,
            batch_window=self.settings.batch_window,
            on_finish=lambda job: [callback(job) for callback in self.on_job_finished],
        )
        self.board.add_queue(queue)

    def _warm_up(self, model: ServedModel) -> None:
        """One small real call, so the first client does not pay for compilation and caches."""
        from PIL import Image

        deployment = model.deployment
        if model.kind == DIFFUSION:
            low = deployment.size_range()[0]
            if deployment.info.inpainting:
                image = Image.new("RGB", (low, low), (128, 128, 128))
                deployment.generate(
                    "warm-up",
                    steps=1,
                    width=low,
                    height=low,
                    seed=0,
                    image=image,
                    mask_image=Image.new("L", (low, low), 255),
                )
            else:
                deployment.generate("warm-up", steps=1, width=low, height=low, seed=0)
        elif model.kind == CAPTIONING:
            deployment.caption([Image.new("RGB", (64, 64), (128, 128, 128))], max_new_tokens=2)
        else:
            deployment.match(Image.new("RGB", (64, 64), (128, 128, 128)), ["warm-up"])

    # ------------------------------------------------------------------------- runners

    def _run_generation(self, model: ServedModel, jobs: list[Job]) -> None:
        """One job: `n_iter` calls of `num_images` images each; image i has seed `seed + i`."""
        import torch

        job = jobs[0]
        params = dict(job.params)
        params["prompt"], loras = self.loras.take_tags(params["prompt"])
        model.deployment.set_loras(loras)  # a job without tags runs on the stored weights
        iterations, base_seed = params.pop("n_iter", 1), params.pop("seed")
        steps = params.get("steps", 25)
        prompts = 1 if isinstance(params["prompt"], str) else len(params["prompt"])
        per_call = params.get("num_images", 1) * prompts
        images, seeds, result = [], [], None
        for iteration in range(iterations):
            first = base_seed + iteration * per_call
            done = iteration * steps

            def on_latents(step: int, total: int, latents: Any, done: int = done) -> None:
                if not bool(torch.isfinite(latents).all()):
                    raise NonFiniteOutputError(
                        f"{model.name} produced NaN or inf latents (after the NaN guard's "
                        "fallback, where it has one); no image is returned"
                    )
                job.on_step(done + step, iterations * total, latents)

            call = dict(params)
            if per_call == 1:
                call["seed"] = first
            else:  # one generator per image, as AUTOMATIC1111 seeds a batch
                call["generator"] = [
                    torch.Generator("cpu").manual_seed(first + i) for i in range(per_call)
                ]
            result = model.deployment.generate(**call, on_latents=on_latents)
            images += result.images
            seeds += [first + i for i in range(per_call)]
            if result.step_seconds:
                model.component_seconds["unet_step"] = sum(result.step_seconds) / len(
                    result.step_seconds
                )
        job.finish(JobState.DONE, {"images": images, "seeds": seeds, "last": result})

    def _run_captions(self, model: ServedModel, jobs: list[Job]) -> None:
        first = jobs[0].params
        images = [image for job in jobs for image in job.params["images"]]
        result = model.deployment.caption(
            images,
            prompt=first.get("prompt"),
            seed=first.get("seed"),
            num_captions=first.get("num_captions", 1),
            **first.get("options", {}),
        )
        model.component_seconds["vision_encoder"] = result.vision_seconds / max(1, len(jobs))
        start = 0
        for job in jobs:
            count = len(job.params["images"])
            job.finish(
                JobState.DONE,
                {
                    "captions": result.captions[start : start + count],
                    "seconds": result.seconds,
                    "batched_with": len(jobs) - 1,
                },
            )
            start += count

    def _run_match(self, model: ServedModel, jobs: list[Job]) -> None:
        job = jobs[0]
        if job.kind == "embed":
            result = model.deployment.embed(job.params["images"], job.params["texts"])
        else:
            result = model.deployment.match(job.params["image"], job.params["texts"])
        job.finish(JobState.DONE, result.to_dict())


def check_generation(
    model: ServedModel,
    settings: ServeSettings,
    width: int,
    height: int,
    steps: int,
    size_field: str = "width",
) -> None:
    """The server's limits and the artifact's compiled range, each refusal naming its field."""
    low, high, multiple = model.deployment.size_range()
    for name, value in ((size_field, width), (size_field.replace("width", "height"), height)):
        if not low <= value <= high or value % multiple:
            raise InvalidRequestError(
                f"{name}: {value} is outside {low}..{high} in steps of {multiple} for {model.name}"
            )
    if width * height > settings.max_pixels:
        raise InvalidRequestError(
            f"{size_field}: {width}x{height} is more than the {settings.max_pixels} pixels this "
            "server allows (--max-pixels)"
        )
    if not isinstance(steps, int) or not 1 <= steps <= settings.max_steps:
        raise InvalidRequestError(
            f"steps: must be between 1 and {settings.max_steps} (--max-steps)"
        )


class NonFiniteOutputError(KilnError):
    """The model's output held NaN or inf: a server-side failure, never a black 'success'."""

    http_status = 500


class NotReadyError(KilnError):
    """A model is still loading (or failed to load); the client should retry later."""


def _caption_batch_key(job: Job) -> Any:
    params = job.params
    if params.get("options", {}).get("do_sample"):
        return None  # sampled captions depend on the batch they are drawn in
    return json.dumps(
        [params.get("prompt"), params.get("num_captions", 1), params.get("options", {})],
        sort_keys=True,
    )


def _kind(manifest: Any) -> str:
    if manifest.family == "stable-diffusion":
        return DIFFUSION
    if manifest.family in ("blip", "blip2"):
        from kiln.pipelines.deployment import RETRIEVAL_ARCHITECTURES

        itm = manifest.model_info.get("architecture") in RETRIEVAL_ARCHITECTURES
        return MATCHING if itm else CAPTIONING
    raise InvalidRequestError(f"kiln serve does not serve {manifest.family} artifacts")


def _unique(name: str, taken: dict[str, Any]) -> str:
    candidate, index = name, 2
    while candidate in taken:
        candidate, index = f"{name}-{index}", index + 1
    return candidate
