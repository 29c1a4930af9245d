"""Library versions: what an artifact was built with, against what is installed now.

A variant's outputs depend on the libraries that wrote it and on those that run around it
(transformers' `generate()`, diffusers' schedulers and pipelines, the runtime itself):
transformers 5.24 changed BLIP captions with no change in kiln. The manifest records the
versions at export and quantization; `kiln.load` warns once per difference, naming both, and
`kiln inspect` / `kiln doctor ARTIFACT` list them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from kiln.artifacts import Variant

#: Libraries whose version changes results, and the distributions that provide each.
RESULT_LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "diffusers": ("diffusers",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino"),
    "openvino": ("openvino",),
}


class LibraryVersionWarning(UserWarning):
    """An artifact's variants were made with another version of a library than the installed."""


@dataclass(frozen=True)
class VersionDrift:
    library: str
    recorded: str
    installed: str
    variants: tuple[str, ...]

    def __str__(self) -> str:
        count = len(self.variants)
        which = self.variants[0] if count == 1 else f"{count} variants"
        return (
            f"{self.library} {self.recorded} made {which}, {self.installed} is installed: "
            "outputs may differ from the parity and drift recorded"
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "library": self.library,
            "recorded": self.recorded,
            "installed": self.installed,
            "variants": list(self.variants),
        }


def installed_version(library: str) -> str | None:
    for distribution in RESULT_LIBRARIES.get(library, (library,)):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    return None


def version_drift(variants: Iterable[Variant]) -> list[VersionDrift]:
    """Each (library, recorded version) that differs from the installed one, with its variants."""
    found: dict[tuple[str, str], list[str]] = {}
    installed = {name: installed_version(name) for name in RESULT_LIBRARIES}
    for variant in variants:
        for library, recorded in variant.versions.items():
            now = installed.get(library)
            if now is not None and recorded != now:
                found.setdefault((library, recorded), []).append(variant.id)
    return [
        VersionDrift(library, recorded, installed[library] or "", tuple(ids))
        for (library, recorded), ids in sorted(found.items())
    ]


_warned: set[str] = set()


def warn_version_drift(root: Path, variants: Iterable[Variant]) -> None:
    """A `LibraryVersionWarning` per difference, once per process and artifact folder."""
    for drift in version_drift(variants):
        message = f"{root}: {drift}"
        if message not in _warned:
            _warned.add(message)
            warnings.warn(message, LibraryVersionWarning, stacklevel=3)
