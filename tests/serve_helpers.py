"""Running `kiln serve` as a user does: a real process on loopback, ready when /readyz says so."""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    def __init__(self, artifacts, *options, key=None, ready_timeout=300):
        self.port = free_port()
        self.key = key
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "kiln.cli", "serve", *map(str, artifacts)]
        args += ["--port", str(self.port), *map(str, options)]
        if key:
            args += ["--api-key", key]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.started = time.perf_counter()
        # A file, not a pipe: a pipe nobody reads fills up and blocks the server's logging.
        self.log = tempfile.NamedTemporaryFile("w+", prefix="kiln-serve-", suffix=".log")  # noqa: SIM115
        self.process = subprocess.Popen(
            args, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )
        self.ready_seconds = self._wait_ready(ready_timeout)

    def _wait_ready(self, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kiln serve exited: {self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError("kiln serve was not ready in time")

    def client(self, owner: str | None = None, timeout: float = 120) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        if owner:
            headers["X-Kiln-Client"] = owner
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()
