"""`kiln serve`'s settings: one frozen value the app, the queues and the dialects read."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 7860  # AUTOMATIC1111's, so its clients find kiln where they look


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    max_queue: int = 8  # waiting jobs per model; one more is answered 429
    timeout: float = 600.0  # seconds a request may wait and run before its job is stopped
    max_pixels: int = 1024 * 1024  # width x height of a generated or uploaded image
    max_steps: int = 150
    max_body_mb: float = 32.0
    prefer: tuple[str, ...] = ()
    require: tuple[str, ...] = ()
    objective: str = "latency"
    batch_window: float = 0.02  # seconds a caption waits for neighbours to batch with
    grace: float = 30.0  # seconds running jobs get to finish on SIGTERM
    lora_dir: Path | None = None  # LoRA files named by <lora:name:scale> in prompts

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def key_matches(self, given: str) -> bool:
        """Constant-time comparison of digests (lengths never leak either)."""
        if self.api_key is None:
            return True
        expected = hashlib.sha256(self.api_key.encode()).digest()
        return hmac.compare_digest(expected, hashlib.sha256(given.encode()).digest())
