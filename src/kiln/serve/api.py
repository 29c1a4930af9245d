"""kiln's own API: captions, matching, the plan, the models, and jobs a client polls."""

from __future__ import annotations

import random
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from kiln.errors import InvalidRequestError
from kiln.pipelines.schedulers import canonical_name
from kiln.serve.app import owner_of, run_job
from kiln.serve.images import decode_image, encode_png, latent_preview
from kiln.serve.jobs import Job, JobNotFoundError, JobState
from kiln.serve.models import CAPTIONING, DIFFUSION, MATCHING, ModelRegistry, check_generation

router = APIRouter(prefix="/v1", tags=["kiln"])


class CaptionRequest(BaseModel):
    images: list[str] = Field(min_length=1, max_length=8, description="base64 images")
    model: str | None = None
    prompt: str | None = None
    num_beams: int = Field(1, ge=1, le=10)
    max_new_tokens: int = Field(20, ge=1, le=512)
    min_new_tokens: int | None = Field(None, ge=0, le=512)
    num_captions: int = Field(1, ge=1, le=10)
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None


class CaptionResponse(BaseModel):
    model: str
    captions: list[list[str]]
    seconds: float
    batched_with: int


class MatchRequest(BaseModel):
    image: str
    texts: list[str] = Field(min_length=1, max_length=32)
    model: str | None = None


class EmbedRequest(BaseModel):
    images: list[str] = Field(default_factory=list, max_length=32)
    texts: list[str] = Field(default_factory=list, max_length=256)
    model: str | None = None


class GenerationJobRequest(BaseModel):
    prompt: str
    kind: Literal["txt2img", "img2img"] = "txt2img"
    model: str | None = None
    negative_prompt: str | None = None
    steps: int = 25
    guidance_scale: float = Field(7.5, ge=0, le=50)
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    scheduler: str | None = None
    num_images: int = Field(1, ge=1, le=8)
    image: str | None = None
    strength: float = Field(0.8, gt=0, le=1)
    mask_image: str | None = None


@router.post("/caption", response_model=CaptionResponse)
async def caption(body: CaptionRequest, request: Request) -> dict[str, Any]:
    """Captions per image. Requests arriving together with the same options share one call."""
    registry, settings = _state(request)
    model = registry.pick(CAPTIONING, body.model)
    images = [
        decode_image(text, f"images[{i}]", settings.max_pixels)
        for i, text in enumerate(body.images)
    ]
    options = body.model_dump(
        include={
            "num_beams",
            "max_new_tokens",
            "min_new_tokens",
            "do_sample",
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
        },
        exclude_none=True,
    )
    params = {
        "images": images,
        "prompt": body.prompt,
        "num_captions": body.num_captions,
        "seed": body.seed,
        "options": options,
    }
    job = await run_job(request, Job("caption", model.name, owner_of(request), params))
    return {"model": model.name, **job.result}


@router.post("/match")
async def match(body: MatchRequest, request: Request) -> dict[str, Any]:
    """ITM probability and ITC similarity of the image against each text."""
    registry, settings = _state(request)
    model = registry.pick(MATCHING, body.model)
    image = decode_image(body.image, "image", settings.max_pixels)
    params = {"image": image, "texts": body.texts}
    job = await run_job(request, Job("match", model.name, owner_of(request), params))
    return {"model": model.name, **job.result}


@router.post("/embed")
async def embed(body: EmbedRequest, request: Request) -> dict[str, Any]:
    """Normalized ITC features of images and texts, for a search index (retrieval models)."""
    registry, settings = _state(request)
    model = registry.pick(MATCHING, body.model)
    if not body.images and not body.texts:
        raise InvalidRequestError("embed needs images, texts or both")
    images = [
        decode_image(text, f"images[{i}]", settings.max_pixels)
        for i, text in enumerate(body.images)
    ]
    params = {"images": images or None, "texts": body.texts or None}
    job = await run_job(request, Job("embed", model.name, owner_of(request), params))
    return {"model": model.name, **job.result}


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    registry, _ = _state(request)
    return {
        "object": "list",
        "data": [
            {"id": m.name, "object": "model", "owned_by": "kiln", **m.to_dict()}
            for m in registry.models.values()
        ],
    }


@router.get("/plan")
async def plan(request: Request, model: str | None = None) -> dict[str, Any]:
    """Which variant runs each component of each model, on what, and why (every replica's)."""
    registry, _ = _state(request)
    if model is not None and model not in registry.models:
        raise InvalidRequestError(f"model: no model named {model!r}")
    out: dict[str, Any] = {
        "models": plan_report(registry, model),
        "replica": request.app.state.replica,
    }
    peers = request.app.state.peers
    if peers is not None:
        reports, out["unreachable_replicas"] = await peers.reports()
        out["replicas"] = [
            {**r, "models": {k: v for k, v in r["models"].items() if model in (None, k)}}
            for r in reports
        ]
    return out


def plan_report(registry: ModelRegistry, model: str | None = None) -> dict[str, Any]:
    """Per model: loaded or not, and the variant of each component with the reason."""
    out = {}
    for name in [model] if model else list(registry.models):
        served = registry.models[name]
        if served.deployment is None:
            out[name] = {"loaded": False, "error": served.error}
            continue
        deployment_plan = served.deployment.plan
        out[name] = {
            "loaded": True,
            "objective": deployment_plan.objective,
            "target": deployment_plan.target,
            "components": [
                dict(zip(("component", "variant", "runtime", "device", "reason"), row, strict=True))
                for row in deployment_plan.rows()
            ],
            "notes": list(deployment_plan.notes),
        }
    return out


@router.post("/jobs", status_code=202)
async def submit_job(body: GenerationJobRequest, request: Request) -> dict[str, Any]:
    """Queue a generation and return at once; poll `GET /v1/jobs/{id}`."""
    registry, settings = _state(request)
    served = registry.pick(DIFFUSION, body.model)
    width = body.width or served.deployment.default_size
    height = body.height or served.deployment.default_size
    check_generation(served, settings, width, height, body.steps)
    params: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "guidance_scale": body.guidance_scale,
        "width": width,
        "height": height,
        "num_images": body.num_images,
        "seed": body.seed if body.seed is not None else random.randrange(2**31),
        "scheduler": canonical_name(body.scheduler) if body.scheduler else None,
    }
    if body.kind == "img2img":
        if body.image is None:
            raise InvalidRequestError("image: img2img needs an image")
        params["image"] = decode_image(body.image, "image", settings.max_pixels)
        params["strength"] = body.strength
        if body.mask_image is not None:
            params["mask_image"] = decode_image(
                body.mask_image, "mask_image", settings.max_pixels, "L"
            )
    job = registry.board.submit(Job(body.kind, served.name, owner_of(request), params))
    return _job_view(registry, job, preview=False)


@router.get("/jobs/{job_id}")
async def get_job(job_id: str, request: Request, preview: bool = False) -> dict[str, Any]:
    """State, queue position, progress, a preview while it runs, the images once done."""
    registry, _ = _state(request)
    return _job_view(registry, _owned(registry, job_id, request), preview)


@router.delete("/jobs/{job_id}")
async def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    """Stop the job (between denoising steps, or before it starts)."""
    registry, _ = _state(request)
    job = _owned(registry, job_id, request)
    return {"id": job.id, "cancelled": job.cancel()}


# ------------------------------------------------------------------------------ helpers


def _state(request: Request) -> tuple[ModelRegistry, Any]:
    return request.app.state.registry, request.app.state.settings


def _owned(registry: ModelRegistry, job_id: str, request: Request) -> Job:
    job = registry.board.get(job_id, owner_of(request))
    if job is None:
        raise JobNotFoundError(f"no job {job_id} of yours")
    return job


@router.api_route("/jobs", methods=["GET"], include_in_schema=False)
async def _no_listing() -> JSONResponse:
    # Listing would show other clients' jobs; each client reads its own by id.
    return JSONResponse({"detail": "jobs are read by id: GET /v1/jobs/{id}"}, status_code=405)


def _job_view(registry: ModelRegistry, job: Job, preview: bool) -> dict[str, Any]:
    view = job.to_dict(registry.board.position(job))
    if preview and job.latents is not None:
        served = registry.models[job.model]
        image = latent_preview(job.latents, served.deployment.info.architecture.name == "SDXL")
        view["preview"] = encode_png(image) if image is not None else None
    if job.state is JobState.DONE and job.result is not None:
        view["images"] = [encode_png(image) for image in job.result["images"]]
        view["seeds"] = job.result["seeds"]
    return view
