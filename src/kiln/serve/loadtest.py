"""`kiln loadtest`: start a server, hold it under Locust's load, and report what it did.

For each server setup (`single`, or `ray:N` replicas) it starts `kiln serve` on loopback,
waits for `/readyz`, runs a short Locust warm-up, reads each serving process's RSS, runs the
measured Locust load (optionally killing one Ray replica partway through and timing its
return), reads RSS again and stops the server with SIGTERM. Figures per request kind:
requests/s served, p50/p99 latency of what was served, the 429 share, and anything else.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kiln.errors import BackendUnavailableError, InvalidRequestError, KilnError

REQUEST_KINDS = ("txt2img", "caption", "openai")  # the locustfile's tasks


@dataclass(frozen=True)
class ServerSetup:
    replicas: int = 0  # 0: the single-process server; N: Ray with N replicas

    @property
    def label(self) -> str:
        return "single" if not self.replicas else f"ray:{self.replicas}"

    def serve_flags(self) -> list[str]:
        return [] if not self.replicas else ["--ray", "--replicas", str(self.replicas)]


def parse_setup(text: str) -> ServerSetup:
    if text == "single":
        return ServerSetup()
    kind, _, count = text.partition(":")
    if kind == "ray" and count.isdigit() and int(count) >= 1:
        return ServerSetup(int(count))
    raise InvalidRequestError(f"--server {text!r}: expected single or ray:N (e.g. ray:2)")


@dataclass(frozen=True)
class LoadOptions:
    users: int = 8
    run_seconds: float = 20.0
    warmup_seconds: float = 5.0
    mix: str = "txt2img=1,caption=1,openai=1"
    size: int = 64
    steps: int = 4
    timeout: float = 60.0
    kill_after: float | None = None  # Ray setups with 2+ replicas: kill one this far in
    serve_options: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """The mix as the locustfile reads it, refused here before any server starts."""
        weights = {}
        for part in filter(None, (p.strip() for p in self.mix.split(","))):
            name, _, weight = part.partition("=")
            if name not in REQUEST_KINDS or not weight.isdigit():
                raise InvalidRequestError(
                    f"--mix {part!r}: expected NAME=WEIGHT, NAME one of {', '.join(REQUEST_KINDS)}"
                )
            weights[name] = int(weight)
        if weights and not any(weights.values()) and len(weights) == len(REQUEST_KINDS):
            raise InvalidRequestError("--mix: every weight is 0; nothing would be sent")


@dataclass
class LoadResult:
    setup: str
    endpoints: dict[str, dict[str, Any]]
    rss_warm: dict[int, int]
    rss_after: dict[int, int]
    ready_seconds: float
    stop_seconds: float | None = None
    exit_code: int | None = None
    kill: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "setup": self.setup,
            "endpoints": self.endpoints,
            "rss_warm": {str(k): v for k, v in self.rss_warm.items()},
            "rss_after": {str(k): v for k, v in self.rss_after.items()},
            "ready_seconds": self.ready_seconds,
            "stop_seconds": self.stop_seconds,
            "exit_code": self.exit_code,
            "kill": self.kill,
        }


def locustfile() -> Path:
    return Path(str(resources.files("kiln.serve").joinpath("locustfile.py")))


def run_loadtest(
    artifacts: Sequence[Path],
    setups: Sequence[ServerSetup],
    options: LoadOptions,
    say: Callable[[str], None] = print,
) -> list[LoadResult]:
    _check_locust()
    results = []
    for setup in setups:
        say(f"loadtest {setup.label}: starting kiln serve")
        with _RunningServer(artifacts, setup, options) as server:
            say(f"loadtest {setup.label}: ready in {server.ready_seconds:.1f} s; warm-up")
            _locust(server.url, options, options.warmup_seconds)
            pids = server.serving_pids()
            rss_warm = _rss(pids)
            killer = None
            if options.kill_after is not None and setup.replicas >= 2:
                killer = _ReplicaKiller(server, options.kill_after)
            say(
                f"loadtest {setup.label}: {options.users} users for {options.run_seconds:g} s"
                + (f", one replica killed at {options.kill_after:g} s" if killer else "")
            )
            endpoints = _locust(server.url, options, options.run_seconds)
            kill = killer.result() if killer else None
            rss_after = _rss(pids)
            result = LoadResult(setup.label, endpoints, rss_warm, rss_after, server.ready_seconds)
            result.kill = kill
        result.exit_code, result.stop_seconds = server.exit_code, server.stop_seconds
        for report in endpoints.values():
            report["served_per_s"] = report["statuses"].get("200", 0) / options.run_seconds
        results.append(result)
    return results


def _check_locust() -> None:
    # Looked for, never imported: Locust monkey-patches the process that imports it.
    if importlib.util.find_spec("locust") is None:
        raise BackendUnavailableError(
            "kiln loadtest needs Locust: bash scripts/install.sh loadtest"
        )


class _RunningServer:
    def __init__(self, artifacts: Sequence[Path], setup: ServerSetup, options: LoadOptions):
        self.setup, self.port = setup, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "kiln.cli", "serve", *map(str, artifacts)]
        self.args += ["--port", str(self.port), "--timeout", str(options.timeout)]
        self.args += [*setup.serve_flags(), *options.serve_options]
        self.exit_code: int | None = None
        self.stop_seconds: float | None = None

    def __enter__(self) -> _RunningServer:
        self.log = tempfile.NamedTemporaryFile("w+", prefix="kiln-loadtest-", suffix=".log")  # noqa: SIM115
        started = time.perf_counter()
        self.process = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while _get(self.url + "/readyz") is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self._kill()
                raise KilnError(f"kiln serve did not become ready: {self._tail()}")
            time.sleep(0.3)
        self.ready_seconds = time.perf_counter() - started
        return self

    def __exit__(self, *exc: Any) -> None:
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(120)
            self.stop_seconds = time.perf_counter() - started
        except subprocess.TimeoutExpired:
            self._kill()
        self.log.close()

    def serving_pids(self) -> list[int]:
        """The processes that hold the models: the server, or each Ray replica."""
        if not self.setup.replicas:
            return [self.process.pid]
        return sorted(r["replica"]["pid"] for r in self.replicas())

    def replicas(self) -> list[dict[str, Any]]:
        plan = _get(self.url + "/v1/plan") or {}
        return plan.get("replicas", [])

    def _kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def _tail(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]


class _ReplicaKiller:
    """Kills one replica after `delay` s, then times how long until Ray has replaced it."""

    def __init__(self, server: _RunningServer, delay: float) -> None:
        self.server, self.delay = server, delay
        self.outcome: dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        time.sleep(self.delay)
        before = self.server.serving_pids()
        victim = before[0]
        killed = time.perf_counter()
        os.kill(victim, signal.SIGKILL)
        self.outcome = {"killed_pid": victim, "back_seconds": None}
        deadline = killed + 120
        while time.perf_counter() < deadline:
            now = self.server.serving_pids()
            if len(now) == len(before) and victim not in now:
                self.outcome["back_seconds"] = round(time.perf_counter() - killed, 2)
                self.outcome["new_pid"] = next(p for p in now if p not in before)
                return
            time.sleep(0.25)

    def result(self) -> dict[str, Any]:
        self.thread.join(150)
        return self.outcome


def _locust(url: str, options: LoadOptions, seconds: float) -> dict[str, dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="kiln-locust-") as folder:
        report = Path(folder) / "report.json"
        env = {
            **os.environ,
            "KILN_LOCUST_REPORT": str(report),
            "KILN_LOCUST_MIX": options.mix,
            "KILN_LOCUST_SIZE": str(options.size),
            "KILN_LOCUST_STEPS": str(options.steps),
            "KILN_LOCUST_TIMEOUT": str(options.timeout),
        }
        args = [sys.executable, "-m", "locust", "-f", str(locustfile()), "--headless"]
        args += ["--host", url, "--users", str(options.users), "--spawn-rate", str(options.users)]
        args += ["--run-time", f"{max(1, round(seconds))}s", "--only-summary", "--stop-timeout"]
        args += [str(int(options.timeout)), "--loglevel", "WARNING", "--exit-code-on-error", "0"]
        done = subprocess.run(args, env=env, capture_output=True, text=True)
        if not report.exists():
            raise KilnError(f"locust wrote no report: {(done.stderr or done.stdout)[-1500:]}")
        return json.loads(report.read_text())


def _rss(pids: Sequence[int]) -> dict[int, int]:
    import psutil

    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue  # a replica killed on purpose
    return out


def _get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def plot_results(results: Sequence[LoadResult], path: Path) -> Path:
    """Served requests/s and p99 latency per server setup and request kind, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kiln.bench.report import save_figure

    kinds = sorted({name for r in results for name in r.endpoints})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    width = 0.8 / max(1, len(results))
    for index, result in enumerate(results):
        xs = [k + index * width for k in range(len(kinds))]
        reports = [result.endpoints.get(kind, {}) for kind in kinds]
        axes[0].bar(xs, [r.get("served_per_s", 0) for r in reports], width, label=result.setup)
        axes[1].bar(xs, [r.get("p99_ms") or 0 for r in reports], width, label=result.setup)
    titles = ("served requests/s", "p99 latency of served requests (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xticks([k + width * (len(results) - 1) / 2 for k in range(len(kinds))], kinds)
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, plt, path)
