"""OpenAI's image API (`POST /v1/images/generations`), for clients built on the openai package."""

from __future__ import annotations

import random
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from kiln.errors import InvalidRequestError
from kiln.serve.app import owner_of, run_job
from kiln.serve.images import encode_png
from kiln.serve.jobs import Job
from kiln.serve.models import DIFFUSION, check_generation

router = APIRouter(prefix="/v1", tags=["OpenAI"])


class ImageGenerationRequest(BaseModel):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int = Field(1, ge=1, le=8)
    size: str | None = None
    response_format: Literal["b64_json", "url"] = "b64_json"
    quality: str | None = None
    style: str | None = None
    user: str | None = None


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int
    data: list[ImageData]


@router.post("/images/generations", response_model=ImageGenerationResponse)
async def generations(body: ImageGenerationRequest, request: Request) -> dict[str, Any]:
    """`model` names a served SD artifact (default: the current one); `size` is `WxH`."""
    registry, settings = request.app.state.registry, request.app.state.settings
    if body.response_format == "url":
        raise InvalidRequestError(
            "response_format: kiln returns b64_json only (it stores no files)"
        )
    model = registry.pick(DIFFUSION, body.model)
    deployment = model.deployment
    width = height = deployment.default_size
    if body.size:
        width, height = _size(body.size)
    steps = min(25, settings.max_steps)
    check_generation(model, settings, width, height, steps, size_field="size")
    params = {
        "prompt": body.prompt,
        "width": width,
        "height": height,
        "num_images": body.n,
        "steps": steps,
        "seed": random.randrange(2**31),
    }
    job = await run_job(request, Job("txt2img", model.name, owner_of(request), params))
    return {
        "created": int(time.time()),
        "data": [{"b64_json": encode_png(image)} for image in job.result["images"]],
    }


def _size(text: str) -> tuple[int, int]:
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit():
        raise InvalidRequestError(f"size: expected WIDTHxHEIGHT, got {text!r}")
    return int(width), int(height)
