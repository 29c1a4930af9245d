"""Child processes that report progress as JSON lines: the bench worker, the TensorRT build.

Both run work that can crash its process (a native library, the out-of-memory killer) or
must not share one (a bench variant's peak memory). The child prints events as
`PREFIX {json}` lines on stdout (`emit`); the parent forwards them as they come and writes
everything else to a log (`run_reporting`), and on Ctrl-C stops the child, so that it never
outlives the command that started it.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def emit(prefix: str, event: str, **data: Any) -> None:
    """In the child: one event line for the parent."""
    print(prefix + json.dumps({"event": event, **data}), flush=True)


def run_reporting(
    argv: Sequence[str],
    log_path: Path,
    prefix: str,
    on_event: Callable[[dict[str, Any]], None],
    stop_signal: int = signal.SIGTERM,
) -> int:
    """Run `argv`, call `on_event` per event line, log the rest; return the exit code.

    On any exception here (Ctrl-C, a failing callback) the child gets `stop_signal` first
    (SIGINT lets the bench worker save what it has), then is killed if it lingers.
    """
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(
            list(argv), stdout=subprocess.PIPE, stderr=log, text=True, bufsize=1
        )
        try:
            assert process.stdout is not None
            for line in process.stdout:
                if line.startswith(prefix):
                    on_event(json.loads(line[len(prefix) :]))
                else:
                    log.write(line)
            return process.wait()
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(stop_signal)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            raise


def log_tail(path: Path, lines: int) -> str:
    """The last lines of a child's log on one line, for an error message ("" if none)."""
    with contextlib.suppress(OSError):
        text = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:])
    return ""
