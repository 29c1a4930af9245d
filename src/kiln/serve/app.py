"""The ASGI app of `kiln serve`: one FastAPI object (Ray Serve can wrap it as it is).

Cross-cutting parts live here: request ids and structured logs, the bearer key, the body
limit, metrics, error answers (4xx naming the field, 429/503 with Retry-After), health and
readiness, graceful shutdown, the page, and `run_job`, the one way an endpoint waits for its
job (stopping it if the client goes away or the timeout passes).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import socket
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response

from kiln import __version__
from kiln.errors import KilnError
from kiln.serve.jobs import Job, JobNotFoundError, JobState, QueueFullError, ShuttingDownError
from kiln.serve.metrics import ServeMetrics, merge_expositions
from kiln.serve.models import ModelRegistry, NotReadyError
from kiln.serve.settings import ServeSettings

log = logging.getLogger("kiln.serve")

# Answered without the API key: health, and the page itself (static, no data; it asks for
# the key, or takes it from the URL's #key=..., and sends it with every API call).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})


class JobTimeoutError(KilnError):
    """A job ran past the server's per-request timeout and was stopped."""


class JobFailedError(KilnError):
    """A job ended in an error: the request's (4xx) or the server's (5xx, logged there)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class JobCancelledError(KilnError):
    """The caller's job was cancelled (interrupt or DELETE) before it finished."""


class ClientGoneError(Exception):
    """The client disconnected while its job waited or ran; the job was stopped."""


def create_app(registry: ModelRegistry, settings: ServeSettings, peers: Any = None) -> FastAPI:
    """The app; `peers` (a Ray replica's siblings) makes /metrics and /v1/plan answer for all."""
    metrics = ServeMetrics()
    registry.on_job_finished.append(metrics.job_finished)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry.start()
        yield
        # SIGTERM: uvicorn has stopped accepting; running jobs get the grace period.
        await asyncio.to_thread(registry.board.close, settings.grace)

    app = FastAPI(
        title="kiln",
        version=__version__,
        description="Stable Diffusion and BLIP served from compiled artifacts: "
        "AUTOMATIC1111 and OpenAI compatible endpoints, and kiln's own.",
        lifespan=lifespan,
    )
    app.state.registry, app.state.settings, app.state.metrics = registry, settings, metrics
    app.state.peers = peers
    app.state.replica = peers.identity() if peers is not None else process_identity()
    served_by = ":".join(
        str(app.state.replica[k]) for k in ("host", "pid", "replica") if k in app.state.replica
    )
    app.add_middleware(_Gate, settings=settings, metrics=metrics, served_by=served_by)
    _add_error_answers(app)
    _add_operations(app, registry, metrics, peers)

    from kiln.serve import a1111, api, openai

    app.include_router(a1111.router)
    app.include_router(openai.router)
    app.include_router(api.router)
    return app


# ------------------------------------------------------------------------ the one wait


async def run_job(request: Request, job: Job, *, cancelled_ok: bool = False) -> Job:
    """Queue `job`, wait for it; stop it if the client disconnects or the timeout passes.

    A job cancelled by its owner (interrupt, DELETE) is returned when `cancelled_ok`, as
    A1111 answers an interrupted request; otherwise it is answered 409.
    """
    registry: ModelRegistry = request.app.state.registry
    settings: ServeSettings = request.app.state.settings
    registry.board.submit(job)
    done = asyncio.wrap_future(job.future)
    deadline = time.monotonic() + settings.timeout
    while not done.done():
        await asyncio.wait([done], timeout=0.25)
        if done.done():
            break
        if await request.is_disconnected():
            job.cancel()
            raise ClientGoneError(job.id)
        if time.monotonic() > deadline:
            job.cancel(JobState.TIMED_OUT)
            raise JobTimeoutError(
                f"the job ran past this server's timeout of {settings.timeout:g} s and was stopped"
            )
    if job.state is JobState.FAILED:
        raise JobFailedError(job.error or "the job failed", job.error_status)
    if job.state is JobState.TIMED_OUT:
        raise JobTimeoutError("the job was stopped at the server's timeout")
    if job.state is JobState.CANCELLED and not cancelled_ok:
        raise JobCancelledError(f"job {job.id} was cancelled")
    return job


def process_identity() -> dict[str, Any]:
    """Who answers: the host and the process (a Ray replica adds its ids)."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def owner_of(request: Request) -> str:
    """Who a job belongs to: the client's address and key (and X-Kiln-Client, if sent).

    Two programs on one machine with one key are one owner unless they name themselves with
    an `X-Kiln-Client` header; jobs read by id also need the unguessable id.
    """
    host = request.client.host if request.client else "?"
    key = request.headers.get("authorization", "")
    tag = request.headers.get("x-kiln-client", "")
    return f"{host}|{hash(key) & 0xFFFFFFFF:08x}|{tag}"


# ------------------------------------------------------------------------- middleware


class _Gate:
    """Request id, API key, body limit, metrics and one log line per request (pure ASGI).

    Every answer names its process (`X-Kiln-Served-By: host:pid[:replica]`), so a client of a
    Ray deployment sees which replica served it.
    """

    def __init__(
        self, app: Any, settings: ServeSettings, metrics: ServeMetrics, served_by: str
    ) -> None:
        self.app, self.settings, self.metrics = app, settings, metrics
        self.served_by = served_by.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = headers.get("x-request-id") or uuid.uuid4().hex[:16]
        status = {"code": 500}

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", []).extend(
                    [(b"x-request-id", request_id.encode()), (b"x-kiln-served-by", self.served_by)]
                )
            await send(message)

        refusal = self._refusal(scope["path"], headers)
        if refusal is not None:
            await refusal(scope, receive, send_with_id)
        else:
            await self.app(scope, self._limited(receive, send_with_id), send_with_id)
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or ("/" if scope["path"] == "/" else "unmatched")
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(endpoint, str(status["code"])).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        log.info(
            json.dumps(
                {
                    "request_id": request_id,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status["code"],
                    "seconds": round(seconds, 4),
                }
            )
        )

    def _refusal(self, path: str, headers: dict[str, str]) -> Any:
        presented = _presented_key(headers.get("authorization", ""))
        if path not in OPEN_PATHS and not self.settings.key_matches(presented):
            return JSONResponse(
                _error_body(401, "a valid API key is required (Authorization: Bearer KEY)"),
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.settings.max_body_bytes:
            return _too_large(self.settings)
        return None

    def _limited(self, receive: Any, send: Any) -> Any:
        """A receive that refuses bodies past the limit even without a Content-Length."""
        seen = {"bytes": 0}
        limit = self.settings.max_body_bytes

        async def receive_limited() -> dict:
            message = await receive()
            if message["type"] == "http.request":
                seen["bytes"] += len(message.get("body", b""))
                if seen["bytes"] > limit:
                    raise BodyTooLargeError
            return message

        return receive_limited


class BodyTooLargeError(Exception):
    """A body without Content-Length grew past --max-body-mb while it was read."""


def _too_large(settings: ServeSettings) -> JSONResponse:
    return JSONResponse(
        _error_body(413, f"request body is larger than this server's {settings.max_body_mb:g} MB"),
        status_code=413,
    )


def _presented_key(authorization: str) -> str:
    """The key from `Bearer KEY`, or the password of `Basic user:KEY` (A1111's --api-auth)."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip()).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return ""
    return ""


# ----------------------------------------------------------------------- error answers


def _add_error_answers(app: FastAPI) -> None:
    def detail(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse(
            _error_body(status, message), status_code=status, headers=headers or None
        )

    @app.exception_handler(QueueFullError)
    async def queue_full(request: Request, exc: QueueFullError) -> JSONResponse:
        return detail(429, str(exc), **{"Retry-After": str(exc.retry_after)})

    @app.exception_handler(NotReadyError)
    async def not_ready(request: Request, exc: NotReadyError) -> JSONResponse:
        return detail(503, str(exc), **{"Retry-After": "5"})

    @app.exception_handler(ShuttingDownError)
    async def shutting_down(request: Request, exc: ShuttingDownError) -> JSONResponse:
        return detail(503, str(exc), **{"Retry-After": "10"})

    @app.exception_handler(JobNotFoundError)
    async def not_found(request: Request, exc: JobNotFoundError) -> JSONResponse:
        return detail(404, str(exc))

    @app.exception_handler(JobFailedError)
    async def failed(request: Request, exc: JobFailedError) -> JSONResponse:
        return detail(exc.status, str(exc))

    @app.exception_handler(JobCancelledError)
    async def cancelled(request: Request, exc: JobCancelledError) -> JSONResponse:
        return detail(409, str(exc))

    @app.exception_handler(JobTimeoutError)
    async def timed_out(request: Request, exc: JobTimeoutError) -> JSONResponse:
        return detail(504, str(exc))

    @app.exception_handler(KilnError)
    async def invalid(request: Request, exc: KilnError) -> JSONResponse:
        return detail(422, str(exc))

    @app.exception_handler(ClientGoneError)
    async def gone(request: Request, exc: ClientGoneError) -> Response:
        return Response(status_code=499)  # nobody reads it; it shows in logs and metrics

    @app.exception_handler(BodyTooLargeError)
    async def too_large(request: Request, exc: BodyTooLargeError) -> JSONResponse:
        return _too_large(request.app.state.settings)

    @app.exception_handler(RequestValidationError)
    async def validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        message = f"{where}: {first.get('msg', 'invalid value')}"
        body = _error_body(422, message)
        body["errors"] = [
            {k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors
        ]
        return JSONResponse(body, status_code=422)


def _error_body(status: int, message: str) -> dict[str, Any]:
    """`detail` as FastAPI and A1111 answer, `error.message` as OpenAI's clients read it."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"detail": message, "error": {"message": message, "type": kind, "code": status}}


# -------------------------------------------------------------------------- operations


def _add_operations(
    app: FastAPI, registry: ModelRegistry, metrics: ServeMetrics, peers: Any
) -> None:
    @app.get("/healthz", tags=["operations"], summary="The process is alive.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        summary="Every artifact loaded and warmed up (503 until then).",
    )
    async def readyz() -> JSONResponse:
        models = [m.to_dict() for m in registry.models.values()]
        ready = registry.ready
        return JSONResponse(
            {"ready": ready, "models": models, "ready_seconds": registry.ready_seconds},
            status_code=200 if ready else 503,
            headers=None if ready else {"Retry-After": "5"},
        )

    @app.get("/metrics", tags=["operations"], summary="Prometheus metrics.")
    async def prometheus() -> Response:
        if peers is None:
            return Response(metrics.render(registry), media_type=metrics.content_type)
        merged = merge_expositions(await peers.metrics())
        return Response(merged, media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_page())


def _page() -> str:
    return resources.files("kiln.serve").joinpath("page/index.html").read_text(encoding="utf-8")
