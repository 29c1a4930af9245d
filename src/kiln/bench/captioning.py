"""BLIP / BLIP-2 captioning runners, workload and caption drift for `kiln bench`.

Registered in `kiln.bench.harness.FAMILIES` for the `blip` and `blip2` families, with the
same shape as `kiln.bench.diffusion`: `make_runner`, `baseline_unavailable`,
`baseline_notes`, `check_supported`, `default_size`, `COMPONENT_FIGURES`, plus what a
family may override in the harness: `CASE_FIGURES`, `NO_RATIO`, `THROUGHPUT`, `BASELINES`,
`build_workload` and `apply_drift`.

The workload captions synthetic images (drawn here from the seed, so every variant sees the
same pixels) with fixed decoding options. By default every caption is forced to exactly
`max_new_tokens` new tokens (`min_new_tokens = max_new_tokens`), so per-token and
end-to-end timings compare across variants whose captions differ. Tokens/s counts decoder
steps x captions, which is exact under that default (an upper bound when captions may
stop early).

Drift is caption agreement against the reference (PyTorch eager, else an all-fp32
variant): the exact-match rate of the caption texts and a corpus BLEU-4 over their token
ids, on every call of the case (warm-up included: the images differ per call).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.bench.diffusion import ArtifactRunner, baseline_notes  # noqa: F401 (family API)
from kiln.errors import InvalidRequestError

# Component names of the artifacts (kiln.models.blip / kiln.models.blip2); the PyTorch
# baseline times the matching transformers modules under the same names.
VISION = ("vision_encoder", "vision_qformer")
CROSS_ATTENTION = ("cross_attention_kv",)
DECODER = ("text_decoder", "language_model")
TOKEN_EMBEDDINGS = "token_embeddings"

# Figure name -> (components summed per caption call, or per call when per_call is True).
COMPONENT_FIGURES = {
    "vision_encoder_ms": (VISION, False),
    "cross_attention_kv_ms": (CROSS_ATTENTION, False),
    "decoder_step_ms": (DECODER, True),
}
CASE_FIGURES = {
    "first_call_s": "s",
    "vision_encoder_ms": "ms",
    "cross_attention_kv_ms": "ms",
    "decoder_step_ms": "ms",
    "decode_step_ms": "ms",
    "end_to_end_ms": "ms",
    "throughput_tokens_per_s": "tokens/s",
    "drift_exact_match": "fraction",
    "drift_bleu": "bleu",
}
NO_RATIO = {"drift_exact_match", "drift_bleu"}
# (figure, unit, per-call count it divides by seconds)
THROUGHPUT = ("throughput_tokens_per_s", "tokens/s", "tokens")
BASELINES = ("torch",)
NO_CROSS_ATTENTION = "BLIP-2 has no cross-attention kv component (its Q-Former output is a prompt)"

DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_REPEATS = 3
DEFAULT_WARMUP = 1


# ------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class CaptionCase:
    """Images of one size, `batch` per caption call, decoded with fixed options."""

    width: int
    height: int
    batch: int
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int | None

    @property
    def id(self) -> str:
        forced = "" if self.min_new_tokens == self.max_new_tokens else "-free"
        return (
            f"{self.width}x{self.height}-b{self.batch}-beams{self.num_beams}"
            f"-{self.max_new_tokens}tok{forced}"
        )

    @property
    def steps(self) -> int:  # progress display: decoder steps per call
        return self.max_new_tokens

    def options(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens}
        if self.min_new_tokens is not None:
            out["min_new_tokens"] = self.min_new_tokens
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaptionCase:
        low = data.get("min_new_tokens")
        return cls(
            int(data["width"]),
            int(data["height"]),
            int(data["batch"]),
            int(data["num_beams"]),
            int(data["max_new_tokens"]),
            None if low is None else int(low),
        )


@dataclass(frozen=True)
class CaptionWorkload:
    """What a captioning benchmark runs; the same interface the worker uses for diffusion."""

    cases: tuple[CaptionCase, ...]
    prompt: str | None = None
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    seed: int = 0
    force_tokens: bool = True
    file: str | None = field(default=None, compare=False)

    kind = "captioning"

    def calls(self) -> int:
        return len(self.cases) * (self.warmup + self.repeats)

    def call_args(self, index: int) -> tuple[str | None, int]:
        """(prompt, seed) of the `index`-th call of a case: the same for every variant."""
        return self.prompt, self.seed + index

    def images(self, case: CaptionCase, seed: int) -> list[Any]:
        return [synthetic_image(case.width, case.height, seed, k) for k in range(case.batch)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "cases": [c.to_dict() for c in self.cases],
            "prompt": self.prompt,
            "images": "synthetic",
            "repeats": self.repeats,
            "warmup": self.warmup,
            "seed": self.seed,
            "force_tokens": self.force_tokens,
            "file": self.file,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CaptionWorkload:
        return cls(
            cases=tuple(CaptionCase.from_dict(c) for c in data["cases"]),
            prompt=data.get("prompt"),
            repeats=int(data["repeats"]),
            warmup=int(data["warmup"]),
            seed=int(data["seed"]),
            force_tokens=bool(data.get("force_tokens", True)),
            file=data.get("file"),
        )


def synthetic_image(width: int, height: int, seed: int, index: int = 0) -> Any:
    """A deterministic RGB test image: colour gradients with a few solid rectangles."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng([seed, index, width, height])
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    pixels = np.empty((height, width, 3), dtype=np.float64)
    pixels[..., 0] = 255 * x / max(width - 1, 1)
    pixels[..., 1] = 255 * y / max(height - 1, 1)
    pixels[..., 2] = rng.uniform(0, 255)
    for _ in range(3):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        pixels[y0 : y1 + 1, x0 : x1 + 1] = rng.uniform(0, 255, 3)
    return Image.fromarray(pixels.round().astype(np.uint8), "RGB")


WORKLOAD_KEYS = {
    "prompt",
    "sizes",
    "batch",
    "num_beams",
    "max_new_tokens",
    "force_tokens",
    "repeats",
    "warmup",
    "seed",
}


def build_workload(
    manifest: Any,
    *,
    file: str | Path | None = None,
    sizes: Sequence[str] | None = None,
    batch: Sequence[int] | None = None,
    num_beams: Sequence[int] | None = None,
    max_new_tokens: Sequence[int] | None = None,
    force_tokens: bool | None = None,
    prompt: str | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    seed: int | None = None,
    **unsupported: Any,
) -> CaptionWorkload:
    """Defaults, then the file, then explicit arguments (None or empty = not given)."""
    from kiln.bench.workload import _as_list, parse_size, read_workload_file

    given = sorted(k for k, v in unsupported.items() if v not in (None, [], ()))
    if given:
        raise InvalidRequestError(
            f"{', '.join(given)} do(es) not apply to captioning benchmarks; use "
            "--max-new-tokens, --num-beams, --prompt, --size (image size), --batch (images per call)"
        )
    data = read_workload_file(file, WORKLOAD_KEYS) if file is not None else {}
    size_values = list(
        sizes or data.get("sizes") and _as_list(data["sizes"]) or [default_size(manifest)]
    )
    batch_values = list(batch or _as_list(data.get("batch", 1)))
    beam_values = list(num_beams or _as_list(data.get("num_beams", 1)))
    token_values = list(
        max_new_tokens or _as_list(data.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS))
    )
    force = bool(data.get("force_tokens", True)) if force_tokens is None else force_tokens
    cases = tuple(
        CaptionCase(
            *parse_size(size), int(n), int(beams), int(tokens), int(tokens) if force else None
        )
        for size, n, beams, tokens in itertools.product(
            size_values, batch_values, beam_values, token_values
        )
    )
    workload = CaptionWorkload(
        cases=tuple(dict.fromkeys(cases)),
        prompt=prompt if prompt is not None else data.get("prompt"),
        repeats=int(data.get("repeats", DEFAULT_REPEATS)),
        warmup=int(data.get("warmup", DEFAULT_WARMUP)),
        seed=int(data.get("seed", 0)),
        force_tokens=force,
        file=str(file) if file is not None else None,
    )
    overrides = {
        k: v for k, v in (("repeats", repeats), ("warmup", warmup), ("seed", seed)) if v is not None
    }
    workload = replace(workload, **overrides)
    check_workload(workload)
    return workload


def check_workload(workload: CaptionWorkload) -> None:
    from kiln.models.blip import MAX_BEAMS, MAX_IMAGES

    if not workload.cases:
        raise InvalidRequestError("the workload has no cases")
    if workload.prompt is not None and (
        not isinstance(workload.prompt, str) or not workload.prompt
    ):
        raise InvalidRequestError("the prompt must be a non-empty string (or absent)")
    if workload.repeats < 1:
        raise InvalidRequestError(f"repeats must be at least 1, got {workload.repeats}")
    if workload.warmup < 1:
        raise InvalidRequestError(
            f"warmup must be at least 1 (the first call is timed as first-call), got {workload.warmup}"
        )
    for case in workload.cases:
        if case.width < 1 or case.height < 1 or case.max_new_tokens < 1:
            raise InvalidRequestError(f"case {case.id}: sizes and max_new_tokens must be positive")
        if not 1 <= case.batch <= MAX_IMAGES:
            raise InvalidRequestError(f"case {case.id}: batch must be 1..{MAX_IMAGES} images")
        if not 1 <= case.num_beams <= MAX_BEAMS:
            raise InvalidRequestError(f"case {case.id}: num_beams must be 1..{MAX_BEAMS}")


def derived_samples(calls: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """`decode_step_ms`: one decoding step as generate() takes it, the decoder graph plus all
    around it (the cache handling, logits processing, beam bookkeeping): end to end less the
    vision encoder and cross-attention key/values, per step. Beside `decoder_step_ms` (the
    decoder's own calls) it shows what a step costs outside the runtime."""
    samples = []
    for call in calls:
        if not call.get("tokens") or not call.get("images"):
            continue
        steps = call["tokens"] / call["images"]
        outside = sum(
            s for name in (*VISION, *CROSS_ATTENTION) for s in call["components"].get(name, [])
        )
        samples.append((call["seconds"] - outside) * 1000 / steps)
    return {"decode_step_ms": samples}


# ------------------------------------------------------------------------------- timing


class NestedTimer:
    """Like `diffusion.CallTimer`, but a call's time excludes the timed calls made inside it.

    transformers' modules nest (the decoder computes cross-attention key/values inside its
    first step; OPT embeds tokens inside its forward), kiln's sessions do not: exclusive
    times make the baseline's components comparable with the artifact's.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self._stack: list[float] = []  # time spent in timed children of each open call
        self._open: list[str] = []  # the component of each open call

    def wrap(self, component: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self._open and self._open[-1] == component:
                # A call made inside a call of the same component is part of that call
                # (a decoder stream's step runs the session's `run`): counted once.
                return fn(*args, **kwargs)
            self._open.append(component)
            self._stack.append(0.0)
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._open.pop()
                total = time.perf_counter() - started
                children = self._stack.pop()
                if self._stack:
                    self._stack[-1] += total
                self.calls.append((component, total - children))

        timed.__wrapped__ = fn  # type: ignore[attr-defined]
        return timed

    def take(self) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for component, seconds in self.calls:
            out.setdefault(component, []).append(seconds)
        self.calls = []
        return out

    def steps(self) -> int:
        """Decoder calls since the last `take()`: one new token per caption each."""
        return sum(1 for component, _ in self.calls if component in DECODER)


def _call_output(
    runner: Any, images: list[Any], captions: list[str], on_step: Callable, case: CaptionCase
) -> dict[str, Any]:
    steps = runner.timer.steps()
    on_step(steps, case.max_new_tokens)
    tokenizer = runner.tokenizer
    return {
        "images": images,
        "items": len(captions),
        "tokens": steps * len(captions),
        "output": {
            "captions": captions,
            "tokens": [tokenizer(c, add_special_tokens=False)["input_ids"] for c in captions],
        },
    }


# ------------------------------------------------------------------------------ runners


class _CaptionCalls:
    """One bench call: the case's images, captioned by the runner's `caption_images`."""

    def generate(
        self,
        workload: CaptionWorkload,
        case: CaptionCase,
        prompt: str | None,
        seed: int,
        on_step: Callable,
    ) -> dict[str, Any]:
        images = workload.images(case, seed)
        captions = self.caption_images(images, prompt, case.options())
        return _call_output(self, images, captions, on_step, case)


class CaptionArtifactRunner(_CaptionCalls, ArtifactRunner):
    """The artifact as `kiln.load()` plans it; `deployment.caption()` per call."""

    def __init__(
        self, root: Path, require: list[str], prefer: list[str], objective: str = "latency"
    ) -> None:
        super().__init__(root, require, prefer, objective)
        self.timer = NestedTimer()  # type: ignore[assignment]

    def load(self) -> None:
        super().load()
        # Decoder steps run through the stream a session opens per caption call, not `run`.
        for name, session in self.deployment.sessions.items():
            session.open_kv_stream = self._timed_streams(name, session.open_kv_stream)

    def _timed_streams(self, component: str, open_stream: Callable[..., Any]) -> Callable:
        def opened(*args: Any, **kwargs: Any) -> Any:
            stream = open_stream(*args, **kwargs)
            stream.step = self.timer.wrap(component, stream.step)
            return stream

        return opened

    @property
    def tokenizer(self) -> Any:
        return self.deployment.processor.tokenizer

    def caption_images(
        self, images: list[Any], prompt: str | None, options: dict[str, Any]
    ) -> list[str]:
        return [c[0] for c in self.deployment.caption(images, prompt, **options).captions]


class TorchCaptionRunner(_CaptionCalls):
    """The source model in transformers/PyTorch fp32 eager, with the artifact's processor."""

    def __init__(self, root: Path, family: str, source: dict[str, Any]) -> None:
        self.root, self.family, self.source = root, family, source
        self.timer = NestedTimer()
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self.processor_from = ""

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    def load(self) -> None:
        import torch
        from transformers import (
            Blip2ForConditionalGeneration,
            Blip2Processor,
            BlipForConditionalGeneration,
            BlipProcessor,
        )

        from kiln.artifacts import SUPPORT_DIR

        blip2 = self.family == "blip2"
        model_class = Blip2ForConditionalGeneration if blip2 else BlipForConditionalGeneration
        processor_class = Blip2Processor if blip2 else BlipProcessor
        folder = self.source_folder()
        model = model_class.from_pretrained(folder, torch_dtype=torch.float32).eval()
        # The artifact's processor, so both sides see the same pixels and token ids.
        support = self.root / SUPPORT_DIR
        try:
            self.processor = processor_class.from_pretrained(support)
            self.processor_from = "artifact"
        except (OSError, ValueError):
            self.processor = processor_class.from_pretrained(folder)
            self.processor_from = "source"
        if torch.cuda.is_available():
            self.device = "cuda"
            model.to("cuda")
        wrap = self.timer.wrap
        if blip2:
            for part in (model.vision_model, model.qformer, model.language_projection):
                part.forward = wrap("vision_qformer", part.forward)
            embeddings = model.get_input_embeddings()
            embeddings.forward = wrap(TOKEN_EMBEDDINGS, embeddings.forward)
            model.language_model.forward = wrap("language_model", model.language_model.forward)
        else:
            model.vision_model.forward = wrap("vision_encoder", model.vision_model.forward)
            for layer in model.text_decoder.bert.encoder.layer:
                attention = layer.crossattention.self
                for linear in (attention.key, attention.value):
                    linear.forward = wrap("cross_attention_kv", linear.forward)
            model.text_decoder.forward = wrap("text_decoder", model.text_decoder.forward)
        self.model = model

    def source_folder(self) -> str:
        if self.source.get("kind") == "folder":
            return str(self.source["id"])
        if self.source.get("kind") == "builtin":
            from kiln.models.builtin import builtin_path

            return str(builtin_path(str(self.source["id"])))
        from huggingface_hub import snapshot_download

        return snapshot_download(self.source["id"], local_files_only=True)

    def describe(self) -> str:
        return (
            f"source model in transformers/PyTorch fp32, eager ({self.device}); "
            f"processor from the {self.processor_from}"
        )

    def plan(self) -> list[dict[str, str]]:
        return [
            {
                "component": "model",
                "variant": f"{self.source.get('id')} (source)",
                "runtime": "torch",
                "device": self.device,
                "reason": "baseline",
            }
        ]

    def size_on_disk(self) -> tuple[int | None, str | None]:
        folder = Path(self.source_folder())
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()), None

    def caption_images(
        self, images: list[Any], prompt: str | None, options: dict[str, Any]
    ) -> list[str]:
        import torch

        prompts = None if prompt is None else [prompt] * len(images)
        inputs = self.processor(
            images=images, text=prompts, return_tensors="pt", padding=prompts is not None
        ).to(self.device)
        with torch.inference_mode():
            sequences = self.model.generate(**inputs, **options)
        texts = self.processor.batch_decode(sequences, skip_special_tokens=True)
        return [t.strip() for t in texts]


QUALITY_FIGURES = {"caption_accuracy": "fraction"}


def measure_quality(runner: Any, manifest: Any, workload: CaptionWorkload) -> dict[str, Any]:
    """Held-out shapes-world scenes captioned exactly, greedy (`kiln.bench.quality`)."""
    from kiln.bench import quality

    why = quality.not_applicable(dict(manifest.source), quality.CAPTION_ACCURACY)
    if why:
        return {quality.CAPTION_ACCURACY: (None, why)}
    options = {"num_beams": 1, "max_new_tokens": quality.MAX_NEW_TOKENS}

    def caption(images: list[Any]) -> list[str]:
        return runner.caption_images(images, None, options)

    return {quality.CAPTION_ACCURACY: (quality.held_out_caption_accuracy(caption), None)}


def make_runner(
    kind: str,
    root: Path,
    manifest: Any,
    require: list[str],
    prefer: list[str],
    objective: str = "latency",
) -> Any:
    if kind == "artifact":
        return CaptionArtifactRunner(root, require, prefer, objective)
    if kind == "torch":
        return TorchCaptionRunner(root, manifest.family, dict(manifest.source))
    raise InvalidRequestError(f"captioning benchmarks have no {kind!r} runner")


def baseline_unavailable(manifest: Any) -> str | None:
    """Why the source model cannot be run as a PyTorch baseline here, or None if it can."""
    source = dict(manifest.source)
    kind, ident = source.get("kind"), source.get("id")
    if kind == "builtin":
        return None  # shipped with kiln
    if kind == "folder":
        if not (Path(str(ident)) / "config.json").is_file():
            return f"source model folder {ident} is not available on this machine"
        return None
    if kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            snapshot_download(str(ident), local_files_only=True)
        except Exception as exc:  # the hub client raises many types; all mean "not cached"
            return f"source model {ident} is not in the local hub cache ({type(exc).__name__})"
        return None
    return f"source kind {kind!r} ({ident}) cannot be loaded as a transformers model by the bench"


def check_supported(manifest: Any) -> None:
    info = dict(manifest.model_info)
    architecture = info.get("architecture")
    if manifest.family == "blip" and architecture != "BlipForConditionalGeneration":
        raise InvalidRequestError(
            f"`kiln bench` measures captioning; {architecture} artifacts (image-text matching) "
            "are not supported yet"
        )


def default_size(manifest: Any) -> int:
    return int(dict(manifest.model_info)["image_size"])


# -------------------------------------------------------------------------------- drift


def apply_drift(
    variants: list[dict[str, Any]], ref: dict[str, Any] | None, why: str | None
) -> None:
    """Caption exact-match rate and token BLEU of every variant against the reference."""
    from kiln.bench.metrics import bleu

    for variant in variants:
        for index, case in enumerate(variant["cases"]):
            exact, score = case["figures"]["drift_exact_match"], case["figures"]["drift_bleu"]
            ours = {o["call"]: o for o in case["_outputs"]}
            theirs = {o["call"]: o for o in ref["cases"][index]["_outputs"]} if ref else {}
            common = sorted(set(ours) & set(theirs))
            if ref is None:
                reason = why
            elif variant is ref:
                reason = "this variant is the drift reference"
            elif not ours:
                reason = exact["reason"] or "no captions"
            elif not common:
                reason = f"the reference ({ref['id']}) has no captions for this case"
            else:
                # Token ids, not text: distinct tokens can decode to the same string.
                tokens = [
                    (list(a), list(b))
                    for call in common
                    for a, b in zip(ours[call]["tokens"], theirs[call]["tokens"], strict=False)
                ]
                exact.update(value=sum(a == b for a, b in tokens) / len(tokens), reason=None)
                score.update(
                    value=bleu([a for a, _ in tokens], [b for _, b in tokens]), reason=None
                )
                continue
            exact.update(value=None, reason=reason)
            score.update(value=None, reason=reason)


def component_reasons(manifest_family: str) -> dict[str, str]:
    """Figures that can never be measured for a family, and why."""
    return {"cross_attention_kv_ms": NO_CROSS_ATTENTION} if manifest_family == "blip2" else {}
