"""Manifests on paper: variants with a stated size and no files, for selection tests."""

from kiln.artifacts import FileEntry, Variant
from kiln.models.spec import Precision

GIB = 1024**3


def paper_variant(component, target, precision, gib, **fields) -> Variant:
    """A `target`/`precision` variant of `gib` GiB; non-fp32 ones measured within budget."""
    path = f"{component}/{target}-{precision}/model"
    if precision != "fp32":
        # As `kiln quantize` records it; drift-free quantized variants are never selected.
        fields.setdefault("drift", {"psnr": 30.0})
    return Variant(
        component=component,
        target=target,
        precision=Precision(precision),
        files=(FileEntry(path=path, sha256="0" * 64, size=int(gib * GIB)),),
        entry=path,
        versions={},
        shape_profile={},
        **fields,
    )
