"""The AUTOMATIC1111 API subset (`/sdapi/v1/...`) that its clients (webuiapi, scripts) use.

Requests keep A1111's field names and defaults; fields for features kiln does not have
(hires fix, face restoration, tiling, scripts) are refused when a client turns them on,
and ignored at the values clients send by default. Progress and interrupt act on the
caller's own job, not on whichever job the server happens to run (as A1111 does).
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from kiln.errors import InvalidRequestError
from kiln.pipelines.schedulers import ALIASES, SCHEDULERS, canonical_name
from kiln.serve.app import owner_of, run_job
from kiln.serve.images import decode_image, encode_png, latent_preview
from kiln.serve.jobs import Job, JobState
from kiln.serve.models import CAPTIONING, DIFFUSION, ModelRegistry, check_generation

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])

# kiln scheduler -> the A1111 sampler name clients show and send back
SAMPLER_NAMES = {
    "euler_a": "Euler a",
    "euler": "Euler",
    "lms": "LMS",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "pndm": "PLMS",
    "unipc": "UniPC",
}


class Txt2ImgRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = Field(1, ge=1, le=8)
    n_iter: int = Field(1, ge=1, le=16)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    force_task_id: str | None = None
    send_images: bool = True
    enable_hr: bool = False
    restore_faces: bool | None = False
    tiling: bool | None = False
    script_name: str | None = None
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    styles: list[str] = Field(default_factory=list)
    subseed_strength: float = 0.0


class Img2ImgRequest(Txt2ImgRequest):
    init_images: list[str] = Field(default_factory=list)
    denoising_strength: float = 0.75
    mask: str | None = None


class InterrogateRequest(BaseModel):
    image: str
    model: str = "clip"


class ImageResponse(BaseModel):
    images: list[str]
    parameters: dict[str, Any]
    info: str


class ProgressState(BaseModel):
    skipped: bool = False
    interrupted: bool = False
    job: str = ""
    job_count: int = 0
    job_timestamp: str = "0"
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0


class ProgressResponse(BaseModel):
    progress: float
    eta_relative: float
    state: ProgressState
    current_image: str | None = None
    textinfo: str | None = None


@router.post("/txt2img", response_model=ImageResponse)
async def txt2img(body: Txt2ImgRequest, request: Request) -> dict[str, Any]:
    return await _generate(body, request, mode="txt2img")


@router.post("/img2img", response_model=ImageResponse)
async def img2img(body: Img2ImgRequest, request: Request) -> dict[str, Any]:
    return await _generate(body, request, mode="img2img")


@router.post("/interrogate")
async def interrogate(body: InterrogateRequest, request: Request) -> dict[str, str]:
    """`clip` (A1111's default, whose interrogator starts from a BLIP caption) and `blip`."""
    registry, settings = _state(request)
    if body.model.lower() not in ("clip", "blip"):
        raise InvalidRequestError(
            f"model: kiln interrogates with BLIP ('clip' or 'blip'), not {body.model!r}"
        )
    model = registry.pick(CAPTIONING, None)
    image = decode_image(body.image, "image", settings.max_pixels)
    job = Job("caption", model.name, owner_of(request), {"images": [image], "options": {}})
    job = await run_job(request, job)
    return {"caption": job.result["captions"][0][0]}


@router.get("/progress", response_model=ProgressResponse)
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    """The caller's running (or newest queued) job; idle when it has none."""
    registry, _ = _state(request)
    owner = owner_of(request)
    job = registry.board.latest(owner, active=True)
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": ProgressState().model_dump()}
    fraction = job.progress
    elapsed = time.time() - (job.started or time.time())
    eta = elapsed / fraction - elapsed if fraction > 0 else 0.0
    preview = None
    if not skip_current_image and job.latents is not None:
        model = registry.models[job.model]
        image = latent_preview(job.latents, _is_xl(model))
        preview = encode_png(image) if image is not None else None
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "job": job.id,
            "job_count": registry.board.active_count(owner),
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
            "sampling_step": job.step,
            "sampling_steps": job.steps,
            "interrupted": job.stopping,
        },
        "current_image": preview,
    }


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Stops the caller's running job (or its newest queued one); never another client's."""
    registry, _ = _state(request)
    job = registry.board.latest(owner_of(request), active=True)
    return {"interrupted": job.id if job is not None and job.cancel() else None}


@router.post("/skip")
async def skip(request: Request) -> dict[str, Any]:
    return await interrupt(request)


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    registry, _ = _state(request)
    return [
        {
            "title": name,
            "model_name": name,
            "hash": None,
            "sha256": None,
            "filename": name,
            "config": None,
        }
        for name in registry.named(DIFFUSION)
    ]


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    registry, _ = _state(request)
    return registry.loras.describe()


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    aliases: dict[str, list[str]] = {name: [name] for name in SCHEDULERS}
    for alias, name in ALIASES.items():
        aliases[name].append(alias)
    return [
        {
            "name": SAMPLER_NAMES.get(name, name),
            "aliases": sorted(set(aliases[name])),
            "options": {},
        }
        for name in SCHEDULERS
    ]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    return [{"name": "automatic", "label": "Automatic", "aliases": None}]


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": [], "img2img": []}


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    registry, _ = _state(request)
    return {"sd_model_checkpoint": registry.default_diffusion, "samples_format": "png"}


@router.post("/options")
async def set_options(options: dict[str, Any], request: Request) -> dict[str, Any]:
    """`sd_model_checkpoint` switches the default SD artifact (for every client, as A1111)."""
    registry, _ = _state(request)
    unknown = sorted(set(options) - {"sd_model_checkpoint", "samples_format"})
    if unknown:
        raise InvalidRequestError(f"{unknown[0]}: kiln sets only sd_model_checkpoint")
    if "sd_model_checkpoint" in options:
        model = registry.pick(DIFFUSION, options["sd_model_checkpoint"], "sd_model_checkpoint")
        registry.default_diffusion = model.name
    return {}


# ------------------------------------------------------------------------------ helpers


def _state(request: Request) -> tuple[ModelRegistry, Any]:
    return request.app.state.registry, request.app.state.settings


async def _generate(body: Txt2ImgRequest, request: Request, mode: str) -> dict[str, Any]:
    registry, settings = _state(request)
    _refuse_unsupported(body)
    name = body.override_settings.get("sd_model_checkpoint")
    model = registry.pick(DIFFUSION, name, "override_settings.sd_model_checkpoint")
    params = _params(body, model, settings, mode)
    job = Job(mode, model.name, owner_of(request), params)
    if body.force_task_id:
        job.id = body.force_task_id
    job = await run_job(request, job, cancelled_ok=True)
    if job.state is JobState.CANCELLED:  # interrupted by its owner: A1111 answers 200
        return {
            "images": [],
            "parameters": body.model_dump(exclude={"init_images", "mask"}),
            "info": json.dumps({"interrupted": True, "job_id": job.id}),
        }
    seeds = job.result["seeds"]
    last = job.result["last"]
    info = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "seed": seeds[0],
        "all_seeds": seeds,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "width": last.width,
        "height": last.height,
        "sampler_name": SAMPLER_NAMES.get(params["scheduler"], params["scheduler"]),
        "batch_size": body.batch_size,
        "sd_model_name": model.name,
        "job_id": job.id,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
    }
    if mode == "img2img":
        info["denoising_strength"] = params["strength"]
    return {
        "images": [encode_png(image) for image in job.result["images"]] if body.send_images else [],
        "parameters": body.model_dump(exclude={"init_images", "mask"}),
        "info": json.dumps(info),
    }


def _refuse_unsupported(body: Txt2ImgRequest) -> None:
    turned_on = {
        "enable_hr": body.enable_hr,
        "restore_faces": bool(body.restore_faces),
        "tiling": bool(body.tiling),
        "script_name": bool(body.script_name),
        "alwayson_scripts": any(_script_enabled(v) for v in body.alwayson_scripts.values()),
        "styles": bool(body.styles),
        "subseed_strength": body.subseed_strength > 0,
    }
    for name, on in turned_on.items():
        if on:
            raise InvalidRequestError(f"{name}: kiln does not support this A1111 feature")


def _script_enabled(value: Any) -> bool:
    """webuiapi sends `{"args": [False]}` or `{"args": []}` for extensions it leaves off."""
    args = value.get("args", []) if isinstance(value, dict) else value
    return bool(args) and args != [False]


def _params(body: Txt2ImgRequest, model: Any, settings: Any, mode: str) -> dict[str, Any]:
    check_generation(model, settings, body.width, body.height, body.steps)
    params: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or None,
        "steps": body.steps,
        "guidance_scale": body.cfg_scale,
        "width": body.width,
        "height": body.height,
        "num_images": body.batch_size,
        "n_iter": body.n_iter,
        "seed": body.seed if body.seed >= 0 else random.randrange(2**31),
        "scheduler": _scheduler(body),
    }
    if mode == "img2img":
        params.update(_img2img_params(body, settings))
    return params


def _scheduler(body: Txt2ImgRequest) -> str:
    name = body.sampler_name or body.sampler_index or "Euler a"
    if body.scheduler and body.scheduler.lower() == "karras" and "karras" not in name.lower():
        name = f"{name} Karras"
    try:
        return canonical_name(name)
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"sampler_name: {exc}") from None


def _img2img_params(body: Img2ImgRequest, settings: Any) -> dict[str, Any]:
    if len(body.init_images) != 1:
        raise InvalidRequestError("init_images: kiln takes exactly one init image")
    if not 0 < body.denoising_strength <= 1:
        raise InvalidRequestError("denoising_strength: must be in (0, 1]")
    image = decode_image(body.init_images[0], "init_images[0]", settings.max_pixels)
    params: dict[str, Any] = {"image": image, "strength": body.denoising_strength}
    if body.mask is not None:
        mask = decode_image(body.mask, "mask", settings.max_pixels, mode="L")
        if mask.size != image.size:
            raise InvalidRequestError(
                f"mask: {mask.size[0]}x{mask.size[1]} is not the size of the init image "
                f"({image.size[0]}x{image.size[1]})"
            )
        params["mask_image"] = mask
    return params


def _is_xl(model: Any) -> bool:
    return model.deployment.info.architecture.name == "SDXL"
