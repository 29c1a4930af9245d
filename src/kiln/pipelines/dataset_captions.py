"""Caption a folder of training images, as kohya's and diffusers' training scripts read them.

Either one caption file beside each image (`photo.png` -> `photo.txt`: kohya, A1111's
dataset tools) or one JSON Lines file (`{"file_name": "sub/photo.png", "text": ...}`:
diffusers' ImageFolder `metadata.jsonl`). Captions are written batch by batch, each sidecar
atomically and each JSONL batch appended and flushed, so a run that is killed resumes where
it stopped: what is written is kept (never rewritten unless `overwrite`), what is not is
captioned. Unreadable images are listed and skipped; they never stop the run.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts import atomic_write_text
from kiln.errors import InvalidRequestError, first_line

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})


@dataclass(frozen=True)
class DatasetOutput:
    """Where captions go: a sidecar suffix (`.txt`) or a JSON Lines file, and how."""

    sidecar: str | None = ".txt"
    jsonl: Path | None = None
    prefix: str = ""
    overwrite: bool = False

    def __post_init__(self) -> None:
        if (self.sidecar is None) == (self.jsonl is None):
            raise InvalidRequestError("pass --sidecar SUFFIX or --jsonl FILE (one of them)")
        if self.sidecar is not None and (
            not self.sidecar.startswith(".") or self.sidecar.lower() in IMAGE_SUFFIXES
        ):
            raise InvalidRequestError(
                f"--sidecar {self.sidecar!r}: expected a suffix such as .txt or .caption"
            )


@dataclass
class DatasetReport:
    captioned: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # had a caption already
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self, root: Path) -> dict[str, Any]:
        return {
            "captioned": [str(p.relative_to(root)) for p in self.captioned],
            "kept": [str(p.relative_to(root)) for p in self.kept],
            "unreadable": [
                {"file": str(p.relative_to(root)), "error": e} for p, e in self.unreadable
            ],
            "seconds": round(self.seconds, 3),
            "images_per_second": round(len(self.captioned) / self.seconds, 3)
            if self.seconds
            else None,
        }


def find_images(root: Path, recursive: bool) -> list[Path]:
    """Image files under `root` by suffix, in a stable order; hidden folders are skipped."""
    if not root.is_dir():
        raise InvalidRequestError(f"{root} is not a folder of images")
    pattern = root.rglob("*") if recursive else root.glob("*")
    found = [
        path
        for path in pattern
        if path.suffix.lower() in IMAGE_SUFFIXES
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
    ]
    return sorted(found)


def caption_folder(
    caption: Callable[[list[Any]], list[str]],
    root: Path,
    output: DatasetOutput,
    *,
    recursive: bool = False,
    batch_size: int = 8,
    on_progress: Callable[[int, int], None] | None = None,
) -> DatasetReport:
    """Caption every image under `root` not captioned yet; `caption(images)` is one call."""
    if batch_size < 1:
        raise InvalidRequestError("--batch-size must be at least 1")
    report = DatasetReport()
    images = check_folder(root, output, recursive)
    done = _already_captioned(root, output, images)
    todo = []
    for path in images:
        (report.kept if path in done else todo).append(path)
    started = time.perf_counter()
    with _Writer(root, output) as writer:
        finished = 0
        for batch in _batches(todo, batch_size):
            opened, readable = [], []
            for path in batch:
                try:
                    opened.append(_open(path))
                    readable.append(path)
                except (OSError, ValueError) as exc:
                    report.unreadable.append((path, _reason(exc)))
            if opened:
                texts = caption(opened)
                writer.write([(p, output.prefix + t) for p, t in zip(readable, texts, strict=True)])
                report.captioned += readable
            finished += len(batch)
            if on_progress is not None:
                on_progress(finished, len(todo))
    report.seconds = time.perf_counter() - started
    return report


def check_folder(root: Path, output: DatasetOutput, recursive: bool) -> list[Path]:
    """The images to caption, or a refusal before any model is loaded."""
    images = find_images(root, recursive)
    if output.sidecar is not None:
        _refuse_shared_sidecars(images, output.sidecar)
    return images


def sidecar_path(image: Path, suffix: str) -> Path:
    return image.with_suffix(suffix)


def _refuse_shared_sidecars(images: list[Path], suffix: str) -> None:
    seen: dict[Path, Path] = {}
    for image in images:
        other = seen.setdefault(sidecar_path(image, suffix), image)
        if other != image:
            raise InvalidRequestError(
                f"{other.name} and {image.name} in {image.parent} would share one caption file "
                f"{sidecar_path(image, suffix).name}; rename one, or use --jsonl"
            )


def _already_captioned(root: Path, output: DatasetOutput, images: list[Path]) -> set[Path]:
    if output.overwrite:
        return set()
    if output.sidecar is not None:
        return {p for p in images if sidecar_path(p, output.sidecar).exists()}
    return {root / entry["file_name"] for entry in _read_jsonl(output.jsonl)}


def _read_jsonl(path: Path | None) -> Iterator[dict[str, Any]]:
    """Complete entries only: a line cut short by a killed run is dropped (and rewritten)."""
    if path is None or not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "file_name" in entry:
            yield entry


class _Writer:
    def __init__(self, root: Path, output: DatasetOutput) -> None:
        self.root, self.output = root, output
        self.handle: Any = None

    def __enter__(self) -> _Writer:
        path = self.output.jsonl
        if path is not None:
            kept = [] if self.output.overwrite else list(_read_jsonl(path))
            # Start from the complete entries (drops a torn last line), then append.
            atomic_write_text(path, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in kept))
            self.handle = path.open("a", encoding="utf-8")
        return self

    def write(self, captions: Sequence[tuple[Path, str]]) -> None:
        if self.handle is None:
            for image, text in captions:
                atomic_write_text(sidecar_path(image, self.output.sidecar), text + "\n")
            return
        for image, text in captions:
            entry = {"file_name": image.relative_to(self.root).as_posix(), "text": text}
            self.handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.close()


def _open(path: Path) -> Any:
    from PIL import Image

    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.convert("RGB")
    except Image.DecompressionBombError as exc:  # not an OSError
        raise ValueError(str(exc)) from None


def _reason(exc: BaseException) -> str:
    return first_line(exc)[:200]


def _batches(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
