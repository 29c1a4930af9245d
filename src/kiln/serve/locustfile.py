"""Locust load test of a kiln server: A1111 txt2img, kiln's caption and OpenAI's images.

    locust -f locustfile.py --headless --host http://127.0.0.1:7860 \\
        --users 8 --spawn-rate 8 --run-time 30s

(`kiln loadtest` starts a server, runs this, and prints the figures.) Set by environment:
KILN_LOCUST_KEY (API key), KILN_LOCUST_MIX (`txt2img=2,caption=2,openai=1`: the weight of
each request kind, 0 leaves it out), KILN_LOCUST_SIZE (image side, 64), KILN_LOCUST_STEPS
(txt2img steps, 4), KILN_LOCUST_TIMEOUT (seconds, 120) and KILN_LOCUST_REPORT (a JSON file
written at the end: per request kind, the count of each HTTP status (0: no answer in
time), the latency percentiles of the requests served (200), requests per second).

A 429 is a success in Locust's own table: under overload the server is meant to say "later"
(it is counted apart in the report). Any other 4xx, a 5xx, or no answer within the timeout
is a failure.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
from collections import Counter, defaultdict

from locust import HttpUser, between, events, task

KEY = os.environ.get("KILN_LOCUST_KEY")
SIZE = int(os.environ.get("KILN_LOCUST_SIZE", "64"))
STEPS = int(os.environ.get("KILN_LOCUST_STEPS", "4"))
TIMEOUT = float(os.environ.get("KILN_LOCUST_TIMEOUT", "120"))
REPORT = os.environ.get("KILN_LOCUST_REPORT")


def _mix(text: str) -> dict[str, int]:
    weights = {"txt2img": 1, "caption": 1, "openai": 1}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, weight = part.partition("=")
        if name not in weights or not weight.isdigit():
            raise SystemExit(f"KILN_LOCUST_MIX: {part!r} is not NAME=WEIGHT ({', '.join(weights)})")
        weights[name] = int(weight)
    return weights


MIX = _mix(os.environ.get("KILN_LOCUST_MIX", ""))
STATUSES: dict[str, Counter] = defaultdict(Counter)
SERVED_MS: dict[str, list[float]] = defaultdict(list)  # latency of the 200s alone


def _scene_png() -> str:
    """A small picture to caption: a square on a plain ground, drawn here (no files needed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (30, 90, 200))
    ImageDraw.Draw(image).rectangle((SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4), "red")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


SCENE = _scene_png()


class KilnUser(HttpUser):
    wait_time = between(0.0, 0.2)

    def on_start(self) -> None:
        if KEY:
            self.client.headers["Authorization"] = f"Bearer {KEY}"

    def _post(self, name: str, path: str, body: dict) -> None:
        with self.client.post(
            path, json=body, name=name, timeout=TIMEOUT, catch_response=True
        ) as response:
            STATUSES[name][str(response.status_code)] += 1
            if response.status_code == 200:
                SERVED_MS[name].append(response.elapsed.total_seconds() * 1000)
            if response.status_code in (200, 429):
                response.success()
            else:
                response.failure(f"HTTP {response.status_code}")

    @task(MIX["txt2img"])
    def txt2img(self) -> None:
        self._post(
            "txt2img",
            "/sdapi/v1/txt2img",
            {
                "prompt": "a red square on a blue background",
                "steps": STEPS,
                "width": SIZE,
                "height": SIZE,
                "seed": random.randrange(2**31),
            },
        )

    @task(MIX["caption"])
    def caption(self) -> None:
        self._post("caption", "/v1/caption", {"images": [SCENE], "max_new_tokens": 8})

    @task(MIX["openai"])
    def openai_images(self) -> None:
        self._post(
            "openai",
            "/v1/images/generations",
            {"prompt": "a red square", "size": f"{SIZE}x{SIZE}", "n": 1},
        )


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


@events.quitting.add_listener
def _write_report(environment, **_) -> None:
    if not REPORT:
        return
    report = {}
    for (name, _method), entry in environment.stats.entries.items():
        if not entry.num_requests:
            continue
        report[name] = {
            "requests": entry.num_requests,
            "statuses": dict(STATUSES.get(name, {})),
            "rps": entry.total_rps,
            "p50_ms": _percentile(SERVED_MS[name], 0.5),
            "p99_ms": _percentile(SERVED_MS[name], 0.99),
            "max_ms": entry.max_response_time,  # of every request, 429s and failures too
        }
    with open(REPORT, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
