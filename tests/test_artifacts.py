import json

import pytest

from kiln.artifacts import (
    FileEntry,
    Manifest,
    StagingFolder,
    Variant,
    file_entries,
    read_manifest,
    staging_folder,
    verify_files,
    write_manifest,
)
from kiln.errors import ArtifactError
from kiln.models.spec import Precision


def _manifest(tmp_path):
    folder = tmp_path / "unet" / "onnx-fp32"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"graph")
    (folder / "model.onnx.data").write_bytes(b"weights" * 100)
    variant = Variant(
        component="unet",
        target="onnx",
        precision=Precision.FP32,
        files=file_entries(tmp_path, folder),
        entry="unet/onnx-fp32/model.onnx",
        versions={"kiln": "test"},
        shape_profile={"batch": {"min": 1, "opt": 2, "max": 16, "multiple_of": 1}},
    )
    return Manifest(
        family="stable-diffusion",
        source={"id": "x", "kind": "folder", "revision": "r"},
        model_info={},
        components={},
        variants=(variant,),
    )


def test_manifest_round_trips_and_hashes_every_file(tmp_path):
    manifest = _manifest(tmp_path)
    write_manifest(tmp_path, manifest)
    again = read_manifest(tmp_path)
    assert again == manifest
    paths = {f.path for f in again.variants[0].files}
    assert paths == {"unet/onnx-fp32/model.onnx", "unet/onnx-fp32/model.onnx.data"}
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema_version"] == 1 and data["variants"][0]["size_bytes"] == 5 + 700


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    manifest = _manifest(tmp_path)
    target = tmp_path / "unet/onnx-fp32/model.onnx.data"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[10] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-1])
    else:
        target.unlink()
    with pytest.raises(ArtifactError, match="unet/onnx-fp32/model.onnx.data"):
        verify_files(tmp_path, manifest.variants[0].files)


def test_read_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="not a kiln artifact"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema version 99"):
        read_manifest(tmp_path)


def test_staging_leaves_nothing_behind_on_failure(tmp_path):
    final = tmp_path / "unet" / "onnx-fp32"
    with pytest.raises(RuntimeError), staging_folder(final) as staging:
        (staging / "model.onnx").write_bytes(b"half")
        raise RuntimeError("export died")
    assert not final.exists()
    assert list((tmp_path / "unet").iterdir()) == []


def test_staging_replaces_an_old_variant_only_on_commit(tmp_path):
    final = tmp_path / "v"
    final.mkdir()
    (final / "old").write_text("old")
    staging = StagingFolder(final)
    (staging.path / "new").write_text("new")
    assert (final / "old").exists()
    staging.commit()
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["v"]


def test_file_entry_of_records_size_and_hash(tmp_path):
    (tmp_path / "a").write_bytes(b"abc")
    entry = FileEntry.of(tmp_path, tmp_path / "a")
    assert entry.size == 3
    assert entry.sha256 == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
