"""Resident pages of weight files are given back once a runtime has copied the weights."""

import mmap
import sys
from pathlib import Path

import numpy as np
import pytest

from kiln.runtimes.pages import drop_mapped_pages

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs Linux: /proc/self/smaps and madvise"
)


def resident_bytes(path: Path) -> int | None:
    """Resident bytes of this process's mappings of `path`, or None when it is not mapped."""
    resident, mapped, current = 0, False, None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[5] if len(fields) > 5 else None
        elif fields[0] == "Rss:" and current == str(path.resolve()):
            mapped = True
            resident += int(fields[1]) * 1024
    return resident if mapped else None


def test_read_only_pages_are_dropped_and_read_back_unchanged(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 1 << 20, dtype=np.uint8).tobytes()
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as view:
        assert view[:] == data
        assert resident_bytes(path) >= len(data)
        assert drop_mapped_pages([tmp_path]) >= len(data)
        assert resident_bytes(path) == 0
        assert view[:] == data  # faulted back in from the file


def test_writable_mappings_keep_their_changes(tmp_path):
    path = tmp_path / "scratch.bin"
    path.write_bytes(bytes(1 << 16))
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        view[:4] = b"kiln"
        drop_mapped_pages([path])
        assert view[:4] == b"kiln"


def test_openvino_gives_back_the_bin_after_its_first_run(tiny_models, tmp_path_factory):
    pytest.importorskip("openvino")
    import kiln
    from kiln.artifacts import read_manifest
    from kiln.models.spec import ComponentSpec
    from kiln.runtimes.openvino import OpenVinoSession

    out = tmp_path_factory.mktemp("pages") / "sd1"
    kiln.export(tiny_models["sd1"], out, targets=["openvino"], components=["vae_decoder"])
    manifest = read_manifest(out)
    entry = out / manifest.variant("vae_decoder/openvino/fp32").entry
    spec = ComponentSpec.from_dict(manifest.components["vae_decoder"])
    session = OpenVinoSession(entry, spec, use_cache=False)
    latents = {"latent_sample": np.random.default_rng(1).standard_normal((1, 4, 8, 8), np.float32)}
    first = session.run(latents)["sample"]
    assert resident_bytes(entry.with_suffix(".bin")) == 0
    np.testing.assert_array_equal(session.run(latents)["sample"], first)
    session.release_memory()
    np.testing.assert_array_equal(session.run(latents)["sample"], first)


def test_unwritten_private_mappings_are_dropped(tmp_path):
    """torch maps safetensors weights writable but never writes them: those pages can go."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(bytes(range(256)) * 4096)
    with path.open("rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_COPY) as view:
        assert view[:] == path.read_bytes()
        assert drop_mapped_pages([path]) >= 1 << 20
        assert resident_bytes(path) == 0
        assert view[:256] == bytes(range(256))
