"""kiln's built-in trained models, named `kiln:NAME` wherever a model source is accepted.

They are trained on the shapes world (`kiln.models.shapes`) by the scripts in `scripts/` and
committed under `kiln/models/trained/`, so the demo, the tests and a newcomer's first export
have a model that draws and reads real pictures with no model hub:

    kiln export kiln:shapes-sd -o shapes-sd-onnx
    kiln export kiln:shapes-blip -o shapes-blip-onnx

Both are ordinary folders (diffusers and transformers layouts), so
`DiffusionPipeline.from_pretrained(builtin_path("shapes-sd"))` works as for any other model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from kiln.errors import SourceError

PREFIX = "kiln:"
TRAINED_ROOT = Path(__file__).parent / "trained"
MODELS = {
    "shapes-sd": "Stable Diffusion 1.x layout, 64x64 images of the shapes world",
    "shapes-blip": "BLIP captioner of the shapes world",
}


def is_builtin(source: str) -> bool:
    return source.startswith(PREFIX)


def builtin_path(name: str) -> Path:
    """The folder of a built-in model, by its name with or without the `kiln:` prefix."""
    bare = name.removeprefix(PREFIX)
    if bare not in MODELS:
        raise SourceError(
            f"{name!r} is not a built-in model; built-in models are "
            + ", ".join(PREFIX + known for known in MODELS)
        )
    folder = TRAINED_ROOT / bare
    if not (folder / "kiln_training.json").is_file():
        raise SourceError(f"the built-in model {bare} is missing from {folder}; reinstall kiln")
    return folder


def content_hash(folder: Path) -> str:
    """sha256 over every file's path and bytes: the same on every checkout, unlike mtimes."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(file.read_bytes())
    return f"sha256:{digest.hexdigest()}"
