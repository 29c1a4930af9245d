"""What a benchmark runs: prompts, cases (size x steps x batch), repeats, warm-up, seed.

A workload comes from defaults, a JSON or TOML file (`--workload FILE`) and command-line
overrides, in that order. Every variant runs the same cases with the same seeds, so drift
compares images made from the same noise.

File format (every key optional):

    prompts = ["a lighthouse at dusk", "a bowl of fruit"]
    negative_prompt = ""
    sizes = ["512", "512x768"]      # or [[512, 768]]; default: the artifact's native size
    steps = [4]                     # an int or a list
    batch = [1]                     # images per call (num_images); an int or a list
    repeats = 3
    warmup = 1
    seed = 0
    guidance_scale = 7.5
    scheduler = "euler"             # default: the artifact's own
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.errors import InvalidRequestError

DEFAULT_PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a lighthouse on a cliff at dusk, oil painting",
    "a bowl of fruit on a wooden table, studio lighting",
)
DEFAULT_STEPS = 4
DEFAULT_REPEATS = 3
DEFAULT_WARMUP = 1


@dataclass(frozen=True)
class Case:
    """One measured configuration: every variant runs it `warmup + repeats` times."""

    width: int
    height: int
    steps: int
    batch: int

    @property
    def id(self) -> str:
        return f"{self.width}x{self.height}-{self.steps}steps-b{self.batch}"

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Case:
        return cls(int(data["width"]), int(data["height"]), int(data["steps"]), int(data["batch"]))


@dataclass(frozen=True)
class Workload:
    cases: tuple[Case, ...]
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    negative_prompt: str | None = None
    repeats: int = DEFAULT_REPEATS
    warmup: int = DEFAULT_WARMUP
    seed: int = 0
    guidance_scale: float = 7.5
    scheduler: str | None = None
    loras: tuple[tuple[str, float], ...] = ()  # (file, scale) switched on at load
    file: str | None = field(default=None, compare=False)

    def calls(self) -> int:
        """Generate calls per variant (warm-up included)."""
        return len(self.cases) * (self.warmup + self.repeats)

    def call_args(self, index: int) -> tuple[str, int]:
        """(prompt, seed) of the `index`-th call of a case: the same for every variant."""
        return self.prompts[index % len(self.prompts)], self.seed + index

    def to_dict(self) -> dict[str, Any]:
        return {
            "cases": [c.to_dict() for c in self.cases],
            "prompts": list(self.prompts),
            "negative_prompt": self.negative_prompt,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "seed": self.seed,
            "guidance_scale": self.guidance_scale,
            "scheduler": self.scheduler,
            "loras": [list(lora) for lora in self.loras],
            "file": self.file,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Workload:
        return cls(
            cases=tuple(Case.from_dict(c) for c in data["cases"]),
            prompts=tuple(data["prompts"]),
            negative_prompt=data.get("negative_prompt"),
            repeats=int(data["repeats"]),
            warmup=int(data["warmup"]),
            seed=int(data["seed"]),
            guidance_scale=float(data["guidance_scale"]),
            scheduler=data.get("scheduler"),
            loras=tuple((str(f), float(s)) for f, s in data.get("loras", ())),
            file=data.get("file"),
        )


def _lora_pairs(texts: Sequence[str]) -> tuple[tuple[str, float], ...]:
    from kiln.models.lora import LoraFile

    pairs = []
    for text in texts:
        lora = LoraFile.parse(str(text))
        if not lora.path.is_file():
            raise InvalidRequestError(f"LoRA file {lora.path} does not exist")
        pairs.append((str(lora.path.resolve()), lora.scale))
    return tuple(pairs)


def parse_size(text: str | int | Sequence[int]) -> tuple[int, int]:
    """`512` -> (512, 512); `512x768` -> (512, 768) as (width, height)."""
    if isinstance(text, int):
        return text, text
    if not isinstance(text, str):
        width, height = (int(v) for v in text)
        return width, height
    parts = text.lower().replace("*", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise InvalidRequestError(f"size {text!r} is not N or WxH") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise InvalidRequestError(f"size {text!r} is not N or WxH")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def read_workload_file(path: str | Path, known: set[str] | None = None) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidRequestError(f"cannot read workload file {path}: {exc}") from None
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ImportError:
        raise InvalidRequestError("TOML workloads need Python 3.11+; use JSON") from None
    except ValueError as exc:
        raise InvalidRequestError(f"workload file {path} is not valid: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequestError(f"workload file {path} must hold a table/object")
    known = known or {
        "prompts",
        "negative_prompt",
        "sizes",
        "steps",
        "batch",
        "repeats",
        "warmup",
        "seed",
        "guidance_scale",
        "scheduler",
        "loras",
    }
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequestError(
            f"workload file {path} has unknown keys {unknown}; known: {sorted(known)}"
        )
    return data


def build_workload(
    default_size: int,
    *,
    file: str | Path | None = None,
    sizes: Sequence[str] | None = None,
    steps: Sequence[int] | None = None,
    batch: Sequence[int] | None = None,
    repeats: int | None = None,
    warmup: int | None = None,
    seed: int | None = None,
    loras: Sequence[str] | None = None,
) -> Workload:
    """Defaults, then the file, then explicit arguments (None or empty = not given).

    `loras` are `FILE[:SCALE]` strings: every artifact variant runs with them switched on at
    load, the PyTorch baseline with diffusers' `load_lora_weights` + `fuse_lora`."""
    data = read_workload_file(file) if file is not None else {}
    size_values = list(sizes or data.get("sizes") and _as_list(data["sizes"]) or [default_size])
    step_values = list(steps or _as_list(data.get("steps", DEFAULT_STEPS)))
    batch_values = list(batch or _as_list(data.get("batch", 1)))
    cases = tuple(
        Case(*parse_size(size), int(n_steps), int(n_images))
        for size, n_steps, n_images in itertools.product(size_values, step_values, batch_values)
    )
    prompts = tuple(_as_list(data.get("prompts", list(DEFAULT_PROMPTS))))
    workload = Workload(
        cases=tuple(dict.fromkeys(cases)),
        prompts=prompts,
        negative_prompt=data.get("negative_prompt"),
        repeats=int(data.get("repeats", DEFAULT_REPEATS)),
        warmup=int(data.get("warmup", DEFAULT_WARMUP)),
        seed=int(data.get("seed", 0)),
        guidance_scale=float(data.get("guidance_scale", 7.5)),
        scheduler=data.get("scheduler"),
        loras=_lora_pairs(loras or _as_list(data.get("loras", []))),
        file=str(file) if file is not None else None,
    )
    overrides = {
        k: v for k, v in (("repeats", repeats), ("warmup", warmup), ("seed", seed)) if v is not None
    }
    workload = replace(workload, **overrides)
    check_workload(workload)
    return workload


def check_workload(workload: Workload) -> None:
    if not workload.cases:
        raise InvalidRequestError("the workload has no cases")
    if not workload.prompts or not all(isinstance(p, str) and p for p in workload.prompts):
        raise InvalidRequestError("the workload needs at least one non-empty prompt")
    if workload.repeats < 1:
        raise InvalidRequestError(f"repeats must be at least 1, got {workload.repeats}")
    if workload.warmup < 1:
        raise InvalidRequestError(
            f"warmup must be at least 1 (the first call is timed as first-call), got {workload.warmup}"
        )
    for case in workload.cases:
        if case.steps < 1 or case.batch < 1 or case.width < 1 or case.height < 1:
            raise InvalidRequestError(f"case {case.id}: sizes, steps and batch must be positive")


def workload_from_dict(data: Mapping[str, Any]) -> Any:
    """A workload back from its `to_dict()`: diffusion, or captioning (`"kind": "captioning"`)."""
    if data.get("kind") == "captioning":
        from kiln.bench.captioning import CaptionWorkload

        return CaptionWorkload.from_dict(data)
    return Workload.from_dict(data)
