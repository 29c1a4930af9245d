"""Calibration data: each component's real inputs, recorded from the fp32 pipeline.

kiln runs its own fp32 deployment on a set of prompts (Stable Diffusion) or images (BLIP)
and records every call each component receives. Static quantization learns activation
ranges from the first part; drift is measured on the rest (held back, never seen by the
quantizer). The same run also yields the fp32 reference images or captions that
end-to-end drift compares against, so the fp32 pipeline runs once per `kiln quantize`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import InvalidRequestError
from kiln.models import shapes
from kiln.models.builtin import is_builtin
from kiln.quant.base import Feeds
from kiln.runtimes.base import Session

#: Prompts used when the user gives none: varied subjects, styles and lengths.
DEFAULT_PROMPTS = (
    "a photograph of an astronaut riding a horse on the moon",
    "a watercolor painting of a lighthouse at dusk, soft light",
    "close-up portrait of an old fisherman, dramatic lighting, 85mm",
    "a bowl of ramen on a wooden table, steam rising, food photography",
    "isometric pixel art of a tiny city with trains and bridges",
    "a red fox in deep snow, national geographic, sharp focus",
    "an oil painting of a stormy sea with a sailing ship",
    "a futuristic cyberpunk street at night, neon signs, rain",
    "a cozy reading nook with plants and a cat, morning sun",
    "macro shot of a dew drop on a green leaf",
    "a medieval castle on a hill, fantasy concept art",
    "a minimalist line drawing of a mountain range",
    "a vintage car parked in front of a diner, 1950s",
    "a scientist in a laboratory looking at a glowing flask",
    "an aerial view of a river delta, satellite image",
    "a plate of colorful macarons, pastel colors, studio light",
)
#: Texts for image-text matching calibration.
DEFAULT_TEXTS = ("a photo of a dog", "a red circle on a blue background", "a city street at night")
#: img2img strength for the VAE encoder's end-to-end drift (steps * strength must be >= 1).
IMG2IMG_STRENGTH = 0.5
#: Share of recorded calls held back for drift measurement.
HELD_OUT_SHARE = 0.25
MAX_CALIBRATION = 256
#: Recorded calls kept per component, at most (and at most this many bytes).
MAX_CALLS = 96
MAX_BYTES = 768 * 2**20


@dataclass
class CalibrationSet:
    """Recorded inputs per component, and what produced them."""

    feeds: dict[str, list[dict[str, np.ndarray]]]
    workload: dict[str, Any]
    inputs: list[Any] = field(default_factory=list)  # the prompts or images, in order
    references: list[Any] = field(default_factory=list)  # fp32 images, tokens or ITM probabilities
    img2img: dict[int, Any] = field(default_factory=dict)  # fp32 img2img images of held-out prompts

    def for_quantizer(self, component: str) -> list[Feeds]:
        """The calls a quantizer may learn from (the first 75%)."""
        calls = self.feeds.get(component, [])
        return calls[: _split(len(calls))]

    def held_out(self, component: str) -> list[Feeds]:
        """The calls kept back for drift; at least one."""
        calls = self.feeds.get(component, [])
        return calls[_split(len(calls)) :] or calls[-1:]

    def held_out_inputs(self) -> list[int]:
        """Indices of the prompts or images kept back for end-to-end drift; at least one."""
        count = len(self.inputs)
        return list(range(min(_split(count), count - 1), count))


def _split(count: int) -> int:
    return max(1, count - max(1, round(count * HELD_OUT_SHARE))) if count > 1 else count


@contextlib.contextmanager
def tap_inputs(sessions: Mapping[str, Session]) -> Iterator[dict[str, list[dict[str, np.ndarray]]]]:
    """Record (copies of) every input each session receives while the block runs.

    Adapters hold their session objects, so the recording replaces `run` and
    `run_on_device` (the way in of sessions that keep tensors on a GPU) on the instance
    itself and removes them afterwards; the class methods are untouched. A call that goes
    from one to the other (a host session's `run_on_device` calls `run`) is recorded once.
    """
    logs = {name: _CallLog() for name in sessions}
    for name, session in sessions.items():
        names, busy = set(session.spec.input_names), [False]
        session.run = _recording(session.run, logs[name], names, busy, np.asarray)  # type: ignore[method-assign]
        session.run_on_device = _recording(  # type: ignore[method-assign]
            session.run_on_device, logs[name], names, busy, lambda v: v.detach().cpu().numpy()
        )
    recorded: dict[str, list[dict[str, np.ndarray]]] = {}
    try:
        yield recorded
    finally:
        for session in sessions.values():
            vars(session).pop("run", None)
            vars(session).pop("run_on_device", None)
        recorded.update({name: log.calls for name, log in logs.items()})


def _recording(
    run: Callable, log: _CallLog, names: set[str], busy: list[bool], to_numpy: Callable
) -> Callable:
    """`run`, recording its inputs in `log` unless a recorded call of the session is running."""

    def recording(inputs: Mapping[str, Any]) -> Any:
        if busy[0]:
            return run(inputs)
        busy[0] = True
        try:
            log.offer({k: to_numpy(v) for k, v in inputs.items() if k in names})
            return run(inputs)
        finally:
            busy[0] = False

    return recording


class _CallLog:
    """Copies of a component's calls, thinned evenly to stay within a count and byte cap.

    A BLIP-base decoder call carries the cross-attention key/values (~40 MB): recording all
    20 steps of 8 captions would hold gigabytes. When a cap is reached every other kept call
    is dropped and only every 2nd, 4th, ... later call is taken, so the calls stay spread
    over the whole run (and the last quarter stays the last prompts or images).
    """

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.stride, self.seen, self.bytes = 1, 0, 0

    def offer(self, feeds: Mapping[str, Any]) -> None:
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        call = {k: np.array(v, copy=True) for k, v in feeds.items()}
        self.calls.append(call)
        self.bytes += sum(v.nbytes for v in call.values())
        if len(self.calls) > MAX_CALLS or self.bytes > MAX_BYTES:
            self.calls = self.calls[::2]
            self.bytes = sum(v.nbytes for c in self.calls for v in c.values())
            self.stride *= 2


def read_prompts(
    path: str | Path | None, count: int, default: Sequence[str] = DEFAULT_PROMPTS
) -> list[str]:
    """`count` prompts from a text file (one per line) or from `default`."""
    if path is None:
        prompts = list(default)
    else:
        file = Path(path)
        if not file.is_file():
            raise InvalidRequestError(f"prompt file {file} does not exist")
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"cannot read prompt file {file} ({exc})") from None
        prompts = [line.strip() for line in lines]
        prompts = [p for p in prompts if p and not p.startswith("#")]
        if not prompts:
            raise InvalidRequestError(f"prompt file {file} holds no prompts")
    return [prompts[i % len(prompts)] for i in range(count)]


def read_images(folder: str | Path | None, count: int, shapes_world: bool = False) -> list[Any]:
    """`count` PIL images from a folder, or kiln's built-in synthetic scenes."""
    from kiln.pipelines.captioning import open_images

    if folder is None and shapes_world:
        from PIL import Image

        return [Image.fromarray(scene.draw()) for scene in shapes.scenes(count, seed=0)]
    if folder is None:
        return [synthetic_image(i) for i in range(count)]
    root = Path(folder)
    if not root.is_dir():
        raise InvalidRequestError(f"image folder {root} does not exist")
    suffixes = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise InvalidRequestError(f"image folder {root} holds no .png/.jpg/.webp/.bmp images")
    return open_images([files[i % len(files)] for i in range(count)])


def synthetic_image(index: int, size: int = 320) -> Any:
    """A reproducible scene of shapes on a gradient: varied colours, edges and textures."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(1000 + index)
    ramp = np.linspace(0, 1, size)[None, :, None]
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    base = (top * (1 - ramp) + bottom * ramp).repeat(size, axis=0)
    noise = rng.normal(0, 12, base.shape)
    image = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = (int(v) for v in rng.integers(0, size - 40, 2))
        x1, y1 = x0 + int(rng.integers(30, size // 2)), y0 + int(rng.integers(30, size // 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = (draw.ellipse, draw.rectangle)[int(rng.integers(0, 2))]
        shape((x0, y0, x1, y1), fill=colour)
    return image


def check_request(count: int, steps: int) -> None:
    """Refuse a calibration size or step count before any model is loaded."""
    if not 1 <= count <= MAX_CALIBRATION:
        raise InvalidRequestError(f"calibration count must be 1..{MAX_CALIBRATION}, got {count}")
    if not 2 <= steps <= 50:
        # Two steps at least: the VAE encoder's img2img check runs steps x 0.5 of them.
        raise InvalidRequestError(f"calibration steps must be 2..50, got {steps}")


def collect(
    deployment: Any,
    *,
    count: int,
    prompts: str | Path | None = None,
    images: str | Path | None = None,
    steps: int = 4,
    size: int | tuple[int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CalibrationSet:
    """Run `deployment` (an fp32 plan) `count` times and record every component's inputs.

    `size` is the image side in pixels, or (width, height)."""
    check_request(count, steps)
    report = progress or (lambda done, total: None)
    # The built-in models calibrate on their own world (training-side seeds, never the
    # held-out ones their quality is judged on): activations elsewhere mislead the ranges.
    shapes_world = is_builtin(str(deployment.manifest.source.get("id", "")))
    if deployment.family == "stable-diffusion":
        default = [s.caption for s in shapes.scenes(count)] if shapes_world else DEFAULT_PROMPTS
        chosen = read_prompts(prompts, count, default)
        return _collect_diffusion(deployment, chosen, steps, size, report)
    return _collect_captioning(deployment, read_images(images, count, shapes_world), report)


def _collect_diffusion(
    deployment: Any,
    prompts: Sequence[str],
    steps: int,
    size: int | tuple[int, int] | None,
    report: Callable,
) -> CalibrationSet:
    size = size or deployment.default_size
    width, height = (size, size) if isinstance(size, int) else size
    workload = {"prompts": list(prompts), "steps": steps, "width": width, "height": height}
    workload.update({"seeds": list(range(len(prompts))), "guidance_scale": 7.5})
    images = []
    with tap_inputs(deployment.sessions) as recorded:
        for index, prompt in enumerate(prompts):
            result = deployment.generate(
                prompt, steps=steps, width=width, height=height, seed=index, guidance_scale=7.5
            )
            images.append(result.image)
            report(index + 1, len(prompts))
    calib = CalibrationSet(recorded, {"kind": "txt2img", **workload}, list(prompts), images)
    if "vae_encoder" in deployment.sessions:
        # The encoder sees images in img2img; the decoder's own pictures are realistic ones.
        recorded["vae_encoder"] = [{"sample": _image_tensor(image)} for image in images]
        calib.workload["img2img_strength"] = IMG2IMG_STRENGTH
        for index in calib.held_out_inputs():
            calib.img2img[index] = img2img(deployment, calib, index)
    return calib


def img2img(deployment: Any, calib: CalibrationSet, index: int) -> Any:
    """The end-to-end check of a VAE encoder: img2img from a calibration picture."""
    work = calib.workload
    return deployment.generate(
        calib.inputs[index],
        image=calib.references[index],
        strength=work["img2img_strength"],
        steps=work["steps"],
        seed=work["seeds"][index],
        guidance_scale=work["guidance_scale"],
    ).image


def _image_tensor(image: Any) -> np.ndarray:
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None])


def _collect_captioning(deployment: Any, images: Sequence[Any], report: Callable) -> CalibrationSet:
    references = []
    with tap_inputs(deployment.sessions) as recorded:
        for index, image in enumerate(images):
            if deployment.can_caption:
                result = deployment.caption([image], max_new_tokens=CAPTION_TOKENS)
                references.append(result.sequences[0])
            else:
                result = deployment.match(image, list(DEFAULT_TEXTS))
                references.append(result.itm_probabilities)
            report(index + 1, len(images))
    kind = "caption" if deployment.can_caption else "match"
    workload = {"kind": kind, "images": len(images), "max_new_tokens": CAPTION_TOKENS}
    if kind == "match":
        workload["texts"] = list(DEFAULT_TEXTS)
    return CalibrationSet(recorded, workload, list(images), references)


#: Greedy caption length for calibration and caption drift.
CAPTION_TOKENS = 20
