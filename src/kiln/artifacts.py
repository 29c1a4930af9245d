"""Artifact folders and their manifest: what every file is, where it came from, how it measured.

An artifact folder holds one model compiled for one or more targets:

    OUT/
      manifest.json                  this module's schema
      pipeline/                      configs, tokenizers, scheduler: everything but weights
      <component>/<target>-<precision>/...   one folder per variant (model.onnx, IR, plan)

Every file is listed with its SHA-256; `verify_files` refuses a missing, truncated or
altered file by name. Writes go to a temporary name first and are renamed into place, so
a crash never leaves a manifest or variant that looks valid and is not.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kiln.errors import ArtifactError, KilnError, OutputPathError
from kiln.models.spec import Precision

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
SUPPORT_DIR = "pipeline"
_CHUNK = 8 * 1024 * 1024


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileEntry:
    """One file of an artifact, relative to the artifact folder."""

    path: str
    sha256: str
    size: int

    @classmethod
    def of(cls, root: Path, path: Path) -> FileEntry:
        return cls(
            path=path.relative_to(root).as_posix(),
            sha256=sha256_file(path),
            size=path.stat().st_size,
        )

    def check(self, root: Path) -> str | None:
        """Why this file does not match its entry, or None when it does."""
        full = root / self.path
        if not full.is_file():
            return f"artifact file {self.path} is missing"
        size = full.stat().st_size
        if size != self.size:
            return f"artifact file {self.path} has {size} bytes, manifest says {self.size} (truncated or replaced)"
        if sha256_file(full) != self.sha256:
            return f"artifact file {self.path} does not match its SHA-256 in the manifest (modified or corrupt)"
        return None


@dataclass(frozen=True)
class Parity:
    """How an exported variant compared with PyTorch fp32 eager on fresh inputs."""

    sizes: Mapping[str, int]
    max_abs: Mapping[str, float]
    limit: Mapping[str, float]
    passed: bool
    reference: str = "pytorch-fp32-eager"

    def worst(self) -> tuple[str, float, float]:
        name = max(self.max_abs, key=lambda k: self.max_abs[k] / max(self.limit[k], 1e-30))
        return name, self.max_abs[name], self.limit[name]


@dataclass(frozen=True)
class Variant:
    """One compiled form of one component: a target, a precision, its files and figures."""

    component: str
    target: str
    precision: Precision
    files: tuple[FileEntry, ...]
    entry: str
    versions: Mapping[str, str]
    shape_profile: Mapping[str, Mapping[str, int]]
    parity: Parity | None = None
    quantization: Mapping[str, Any] | None = None
    drift: Mapping[str, Any] | None = None
    opset: int | None = None
    built_for: Mapping[str, Any] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    export_seconds: float | None = None
    created: str = field(default_factory=now_utc)
    # Tells apart variants of one target and precision: the quantization method when it is
    # not the cell's default (`unet/onnx/int8-static` beside `unet/onnx/int8`).
    tag: str | None = None

    @property
    def id(self) -> str:
        suffix = f"-{self.tag}" if self.tag else ""
        return f"{self.component}/{self.target}/{self.precision.value}{suffix}"

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def folder(self) -> str:
        return variant_folder(self.component, self.target, self.precision, self.tag)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "component": self.component,
            "target": self.target,
            "precision": self.precision.value,
            "entry": self.entry,
            "files": [vars(f) for f in self.files],
            "size_bytes": self.size_bytes,
            "versions": dict(self.versions),
            "opset": self.opset,
            "shape_profile": {k: dict(v) for k, v in self.shape_profile.items()},
            "parity": None if self.parity is None else _parity_dict(self.parity),
            "quantization": self.quantization,
            "drift": self.drift,
            "built_for": self.built_for,
            "options": dict(self.options),
            "export_seconds": self.export_seconds,
            "created": self.created,
        }
        if self.tag:
            data["tag"] = self.tag
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Variant:
        parity = data.get("parity")
        return cls(
            component=data["component"],
            target=data["target"],
            precision=Precision(data["precision"]),
            files=tuple(FileEntry(**f) for f in data["files"]),
            entry=data["entry"],
            versions=data.get("versions", {}),
            shape_profile=data.get("shape_profile", {}),
            parity=None if parity is None else Parity(**parity),
            quantization=data.get("quantization"),
            drift=data.get("drift"),
            opset=data.get("opset"),
            built_for=data.get("built_for"),
            options=data.get("options", {}),
            export_seconds=data.get("export_seconds"),
            created=data.get("created", ""),
            tag=data.get("tag"),
        )


def _parity_dict(parity: Parity) -> dict[str, Any]:
    return {
        "reference": parity.reference,
        "sizes": dict(parity.sizes),
        "max_abs": dict(parity.max_abs),
        "limit": dict(parity.limit),
        "passed": parity.passed,
    }


def variant_folder(
    component: str, target: str, precision: Precision, tag: str | None = None
) -> str:
    return f"{component}/{target}-{precision.value}" + (f"-{tag}" if tag else "")


@dataclass(frozen=True)
class Manifest:
    """The whole of `manifest.json`: the model, its support files, every variant."""

    family: str
    source: Mapping[str, Any]
    model_info: Mapping[str, Any]
    components: Mapping[str, Mapping[str, Any]]
    support_files: tuple[FileEntry, ...] = ()
    variants: tuple[Variant, ...] = ()
    measurements: Mapping[str, Any] = field(default_factory=dict)
    #: Defaults `kiln.load()` uses when the caller gives none (`drift_budget`, `objective`),
    #: written by `kiln optimize` with the budget it was run under.
    selection: Mapping[str, Any] = field(default_factory=dict)
    kiln_version: str = ""
    created: str = field(default_factory=now_utc)
    schema_version: int = SCHEMA_VERSION

    def variant(self, variant_id: str) -> Variant:
        for variant in self.variants:
            if variant.id == variant_id:
                return variant
        raise ArtifactError(f"no variant {variant_id!r}; the artifact has {self.variant_ids()}")

    def variant_ids(self) -> list[str]:
        return [v.id for v in self.variants]

    def variants_of(self, component: str) -> list[Variant]:
        return [v for v in self.variants if v.component == component]

    def with_variant(self, variant: Variant) -> Manifest:
        """A copy where `variant` replaces any variant with the same id."""
        kept = tuple(v for v in self.variants if v.id != variant.id)
        return replace(self, variants=(*kept, variant))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "kiln_version": self.kiln_version,
            "created": self.created,
            "family": self.family,
            "source": dict(self.source),
            "model_info": dict(self.model_info),
            "components": {k: dict(v) for k, v in self.components.items()},
            "support_files": [vars(f) for f in self.support_files],
            "variants": [v.to_dict() for v in self.variants],
            "measurements": dict(self.measurements),
            "selection": dict(self.selection),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(
                f"manifest schema version {version!r} is not supported by this kiln "
                f"(expects {SCHEMA_VERSION}); re-export with this version"
            )
        return cls(
            family=data["family"],
            source=data["source"],
            model_info=data["model_info"],
            components=data["components"],
            support_files=tuple(FileEntry(**f) for f in data.get("support_files", [])),
            variants=tuple(Variant.from_dict(v) for v in data.get("variants", [])),
            measurements=data.get("measurements", {}),
            selection=data.get("selection", {}),
            kiln_version=data.get("kiln_version", ""),
            created=data.get("created", ""),
            schema_version=version,
        )


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate `manifest.json`, with one-line errors for every way it can be wrong."""
    root = Path(folder)
    if not root.exists():
        raise ArtifactError(f"artifact folder {root} does not exist")
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{root} is not a kiln artifact (no {MANIFEST_NAME}); create one with `kiln export`"
        )
    data = read_json(path)
    try:
        return Manifest.from_dict(data)
    except ArtifactError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise ArtifactError(
            f"{path} is not a valid kiln manifest ({type(exc).__name__}: {exc})"
        ) from None


def write_manifest(folder: str | os.PathLike[str], manifest: Manifest) -> Path:
    """Write `manifest.json` atomically: a reader sees the old or the new one, never half."""
    path = Path(folder) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n")
    return path


def read_json(path: Path, error: type[KilnError] = ArtifactError) -> dict[str, Any]:
    """A JSON object from `path`; a missing, unreadable or malformed file raises `error`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path} cannot be read ({exc})") from None
    except ValueError as exc:
        raise error(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def check_output_folder(path: str | os.PathLike[str], what: str = "output folder") -> Path:
    """`path` as a folder kiln may write into (made later); a file in the way is refused."""
    path = Path(path)
    _refuse_file_in_the_way(path, (path, *path.parents), what)
    return path


def check_output_file(path: str | os.PathLike[str], what: str = "output file") -> Path:
    """`path` as a file kiln may write (its folder made later); a folder or file in the way
    is refused."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give a file name")
    _refuse_file_in_the_way(path, path.parents, what)
    return path


def _refuse_file_in_the_way(path: Path, candidates: Iterable[Path], what: str) -> None:
    existing = next((p for p in candidates if p.exists()), None)
    if existing is not None and not existing.is_dir():
        detail = "is a file, not a folder" if existing == path else f"is under {existing}, a file"
        raise OutputPathError(f"{what} {path} {detail}")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def atomic_write_png(path: Path, image: Any) -> Path:
    """A PIL image as a PNG file, written atomically."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


class StagingFolder:
    """A temporary folder beside `final` that replaces it only on `commit()`.

    A failed or interrupted export leaves no folder at `final` (and an older variant
    there stays untouched until the new one is complete).
    """

    def __init__(self, final: Path) -> None:
        final.parent.mkdir(parents=True, exist_ok=True)
        self.final = final
        self.path = Path(
            tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
        )

    def commit(self) -> Path:
        if self.final.exists():
            old = self.final.with_name(f".{self.final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            os.replace(self.path, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def staging_folder(final: Path) -> Iterator[Path]:
    """`StagingFolder` as a block: committed if the block succeeds, discarded if not."""
    staging = StagingFolder(final)
    try:
        yield staging.path
    except BaseException:
        staging.discard()
        raise
    staging.commit()


def file_entries(root: Path, folder: Path) -> tuple[FileEntry, ...]:
    """Entries for every file under `folder`, sorted by path."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return tuple(FileEntry.of(root, p) for p in files)


def verify_files(root: str | os.PathLike[str], entries: Iterable[FileEntry]) -> None:
    """Raise `ArtifactError` naming the first file that is missing or does not match."""
    root = Path(root)
    for entry in entries:
        problem = entry.check(root)
        if problem is not None:
            raise ArtifactError(f"{problem} in {root}")
