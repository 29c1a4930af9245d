"""`kiln serve --ray`: the same FastAPI app as a Ray Serve application.

Each replica is one process holding one copy of every artifact: it loads them from a path
every node sees, verifies their hashes, plans for its own node's hardware (a GPU node and a
CPU node may run different variants of one artifact) and warms them up before Ray routes
to it. Ray's per-deployment limits answer overload as the single-process server does (429
with Retry-After), its health checks call the same readiness the server's `/readyz` reports,
and `/v1/plan` and `/metrics` answer for every replica (a broadcast from the one asked).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import BackendUnavailableError, InvalidRequestError, KilnError
from kiln.serve.settings import ServeSettings

APP_NAME = "kiln"
DEPLOYMENT_NAME = "kiln"
# Ray's own 429 carries a fixed Retry-After; a replica's 429 (its queue full) its estimate.
RAY_RETRY_AFTER_S = 2
BROADCAST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RaySettings:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas, on ongoing requests
    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started here
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    target_ongoing: float = 2.0  # per replica, what autoscaling aims for

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise InvalidRequestError("--replicas must be at least 1")
        if self.autoscale is not None:
            low, high = self.autoscale
            if not 0 <= low <= high or high < 1:
                raise InvalidRequestError(
                    f"--autoscale {low}:{high}: needs 0 <= MIN <= MAX and MAX >= 1"
                )
        if self.replica_cpus <= 0 or self.replica_gpus < 0:
            raise InvalidRequestError("--replica-cpus must be > 0 and --replica-gpus >= 0")


def parse_autoscale(text: str) -> tuple[int, int]:
    """`MIN:MAX` as two integers, or one readable refusal."""
    low, sep, high = text.partition(":")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise InvalidRequestError(f"--autoscale {text!r}: expected MIN:MAX, e.g. 1:4")
    return int(low), int(high)


def deployment_options(settings: ServeSettings, ray: RaySettings) -> dict[str, Any]:
    """The `serve.deployment` options the flags ask for (read by tests without Ray running)."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": {"num_cpus": ray.replica_cpus, "num_gpus": ray.replica_gpus},
        # A replica takes what its own queues hold plus the running job; past that Ray
        # queues at most --max-queue more, then answers 429 with Retry-After.
        "max_ongoing_requests": settings.max_queue + 1,
        "max_queued_requests": settings.max_queue,
        "health_check_period_s": 5.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 1.0,
        "graceful_shutdown_timeout_s": settings.grace,
    }
    if ray.autoscale is None:
        options["num_replicas"] = ray.replicas
    else:
        low, high = ray.autoscale
        options["autoscaling_config"] = {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": ray.target_ongoing,
            "upscale_delay_s": 5.0,
            "downscale_delay_s": 60.0,
        }
    return options


def replica_identity() -> dict[str, Any]:
    """Who answers, inside a Ray replica: host, pid, the replica's and the node's ids."""
    import ray
    from ray import serve

    from kiln.serve.app import process_identity

    return {
        **process_identity(),
        "replica": serve.get_replica_context().replica_id.unique_id,
        "node": ray.get_runtime_context().get_node_id(),
    }


class RayPeers:
    """The replicas of this deployment, reached by a broadcast (control plane only).

    A replica that died a moment ago may still be in the list; its answer is an exception,
    counted as `unreachable` rather than failing the whole answer.
    """

    def __init__(self) -> None:
        self._handle: Any = None

    def identity(self) -> dict[str, Any]:
        return replica_identity()

    async def _broadcast(self, method: str) -> tuple[list[Any], int]:
        from ray import serve

        if self._handle is None:
            self._handle = serve.get_deployment_handle(DEPLOYMENT_NAME, app_name=APP_NAME)
        answers = await self._handle.broadcast(method).results_async(
            timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True
        )
        good = [a for a in answers if not isinstance(a, BaseException)]
        return good, len(answers) - len(good)

    async def reports(self) -> tuple[list[dict[str, Any]], int]:
        return await self._broadcast("replica_report")

    async def metrics(self) -> dict[str, bytes]:
        answers, _ = await self._broadcast("replica_metrics")
        return dict(answers)


def build_application(paths: Sequence[Path], settings: ServeSettings, ray: RaySettings) -> Any:
    """The Ray Serve application: one ingress deployment, `create_app` built per replica."""
    from ray import serve

    try:
        from ray.serve.config import BackpressureConfig
    except ImportError:  # Ray before backpressure_config: overload answers 503, no header
        BackpressureConfig = None

    options = deployment_options(settings, ray)
    if BackpressureConfig is not None:
        options["backpressure_config"] = BackpressureConfig(
            status_code=429, retry_after_s=RAY_RETRY_AFTER_S
        )

    @serve.deployment(**options)
    @serve.ingress()
    class KilnReplica:
        def __init__(self, paths: list[str], settings: ServeSettings) -> None:
            from kiln.serve.models import ModelRegistry

            self.settings = settings
            self.registry = ModelRegistry(paths, settings)
            self.registry.load()  # Ray routes here only once this returns
            if self.registry.errors:
                raise RuntimeError("; ".join(self.registry.errors))

        def __serve_build_asgi_app__(self) -> Any:
            from kiln.serve.app import create_app

            self.kiln_app = create_app(self.registry, self.settings, peers=RayPeers())
            return self.kiln_app

        def check_health(self) -> None:
            if not self.registry.ready:
                raise RuntimeError("kiln replica not ready: " + "; ".join(self.registry.errors))

        def replica_report(self) -> dict[str, Any]:
            from kiln.serve.api import plan_report

            return {"replica": replica_identity(), "models": plan_report(self.registry)}

        def replica_metrics(self) -> tuple[str, bytes]:
            text = self.kiln_app.state.metrics.render(self.registry)
            return replica_identity()["replica"], text

    return KilnReplica.bind([str(Path(p).resolve()) for p in paths], settings)


def serve_on_ray(
    paths: Sequence[Path], settings: ServeSettings, ray_settings: RaySettings, say: Any = print
) -> None:
    """Deploy, wait for SIGTERM or Ctrl-C, then stop within the grace period."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise BackendUnavailableError(
            "kiln serve --ray needs the ray extra (ray[serve]): bash scripts/install.sh ray"
        ) from None
    address = ray_settings.address or os.environ.get("RAY_ADDRESS")
    started_here = address is None
    _connect(ray, address)
    # After ray.init, whose core worker installs a SIGTERM handler that aborts the driver.
    stop = threading.Event()
    previous = {
        sig: signal.signal(sig, lambda signum, frame: stop.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        serve.start(http_options={"host": settings.host, "port": settings.port})
        say(f"kiln serve --ray: deploying {ray_settings_summary(ray_settings)} ...")
        began = time.perf_counter()
        serve.run(
            build_application(paths, settings, ray_settings),
            name=APP_NAME,
            route_prefix="/",
            blocking=False,
        )
        say(
            f"kiln serve --ray: ready in {time.perf_counter() - began:.1f} s on "
            f"http://{settings.host}:{settings.port} (Ray: {ray.get_runtime_context().gcs_address})"
        )
        say(f"kiln serve --ray: Ray's metrics (ray_serve_*) at {_ray_metrics_url(ray)}")
        while not stop.wait(0.5):
            pass
        say("kiln serve --ray: stopping")
    except KilnError:
        raise
    except Exception as exc:  # Ray reports a failed deployment as its own exception types
        raise BackendUnavailableError(f"kiln serve --ray: {_first_line(exc)}") from None
    finally:
        _stop(ray, serve, started_here)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def ray_settings_summary(ray_settings: RaySettings) -> str:
    if ray_settings.autoscale is not None:
        low, high = ray_settings.autoscale
        count = f"{low}..{high} replicas (autoscaled)"
    else:
        count = f"{ray_settings.replicas} replica{'s' if ray_settings.replicas > 1 else ''}"
    gpus = f", {ray_settings.replica_gpus:g} GPU" if ray_settings.replica_gpus else ""
    return f"{count}, {ray_settings.replica_cpus:g} CPU{gpus} each"


def _ray_metrics_url(ray: Any) -> str:
    """This node's metrics export address (each node has one; Prometheus scrapes them all)."""
    here = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == here and node.get("MetricsExportPort"):
            return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    return "each node's metrics export port"


def _connect(ray: Any, address: str | None) -> None:
    if ray.is_initialized():
        return
    try:
        if address is None:
            # A local Ray started for kiln reports nothing home unless its user asks it to.
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        else:
            ray.init(address=address, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        if address is None:
            raise BackendUnavailableError(f"cannot start a local Ray: {_first_line(exc)}") from None
        raise BackendUnavailableError(
            f"cannot reach the Ray cluster at {address}: {_first_line(exc)} (is this node's "
            "RAY_AUTH_MODE and ~/.ray/auth_token the cluster's?)"
        ) from None


def _stop(ray: Any, serve: Any, started_here: bool) -> None:
    """A local Ray goes entirely; on a shared cluster only kiln's application is removed."""
    import psutil

    ours = psutil.Process().children(recursive=True) if started_here else []
    try:
        if started_here:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
    finally:
        ray.shutdown()
        # Ray's node agents notice their raylet is gone only a minute later; a local Ray
        # started here leaves nothing running once kiln has exited.
        _, alive = psutil.wait_procs(ours, timeout=2)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(alive, timeout=3)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()


def _first_line(exc: BaseException) -> str:
    """Ray's first line, and the replica's own error where Ray wraps a traceback."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    cause = [line for line in lines[1:] if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return lines[0][:300] + (f" ({cause[-1][:300]})" if cause else "")
