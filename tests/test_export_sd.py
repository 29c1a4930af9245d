"""Export of tiny SD1, SD2, XL and inpainting models: parity, manifest, tamper checks."""

import json
import shutil

import pytest
from conftest import TINY_SD

import kiln
from kiln.artifacts import read_manifest, sha256_file
from kiln.errors import ArtifactError, ExportError, SourceError, UnsupportedModelError
from kiln.models.tiny import save_pipeline

EXPECTED = {
    "sd1": {"text_encoder", "unet", "vae_encoder", "vae_decoder"},
    "sd2": {"text_encoder", "unet", "vae_encoder", "vae_decoder"},
    "sdxl": {"text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"},
    "sd1-inpaint": {"text_encoder", "unet", "vae_encoder", "vae_decoder"},
}


@pytest.mark.parametrize("preset", TINY_SD)
def test_every_component_within_parity_budget_at_an_unseen_shape(artifacts, preset):
    manifest = read_manifest(artifacts[preset])
    assert {v.component for v in manifest.variants} == EXPECTED[preset]
    for variant in manifest.variants:
        parity = variant.parity
        assert parity is not None and parity.passed, variant.id
        # Parity ran at sizes other than the traced ones on every dynamic axis.
        traced = {
            name: dims["opt"] if dims["opt"] > 1 else 2
            for name, dims in variant.shape_profile.items()
        }
        assert all(parity.sizes[name] != traced[name] for name in traced), (
            variant.id,
            parity.sizes,
        )
        for name, worst in parity.max_abs.items():
            assert worst <= parity.limit[name], (variant.id, name)
            assert worst < 1e-3, (variant.id, name, worst)  # fp32 ONNX should be this close


def test_model_info_describes_the_architecture(artifacts):
    info = {
        p: read_manifest(artifacts[p]).model_info for p in ("sd1", "sd2", "sdxl", "sd1-inpaint")
    }
    assert info["sd1"]["architecture"] == "sd1" and info["sd1"]["prediction_type"] == "epsilon"
    assert info["sd2"]["architecture"] == "sd2" and info["sd2"]["prediction_type"] == "v_prediction"
    assert info["sdxl"]["architecture"] == "sdxl"
    assert info["sd1-inpaint"]["inpainting"] is True


def test_manifest_lists_every_file_with_its_hash(artifacts):
    root = artifacts["sd1"]
    manifest = read_manifest(root)
    listed = {f.path: f for v in manifest.variants for f in v.files}
    listed.update({f.path: f for f in manifest.support_files})
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {
        "manifest.json"
    }
    assert set(listed) == on_disk
    for path, entry in listed.items():
        assert sha256_file(root / path) == entry.sha256
        assert (root / path).stat().st_size == entry.size
    data = json.loads((root / "manifest.json").read_text())
    variant = data["variants"][0]
    for key in (
        "component",
        "target",
        "precision",
        "files",
        "versions",
        "opset",
        "shape_profile",
        "parity",
        "created",
        "size_bytes",
    ):
        assert key in variant
    assert data["source"]["kind"] == "folder" and data["source"]["revision"]
    assert {"torch", "onnx", "onnxruntime", "kiln", "exporter"} <= set(variant["versions"])


def test_a_changed_byte_in_any_file_fails_loading_naming_that_file(artifacts, tmp_path):
    source = artifacts["sd1"]
    manifest = read_manifest(source)
    files = [f.path for v in manifest.variants for f in v.files] + [
        f.path for f in manifest.support_files
    ]
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    for path in files:
        target = copy / path
        original = target.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0x01
        target.write_bytes(bytes(damaged))
        with pytest.raises(ArtifactError) as caught:
            kiln.load(copy)
        assert path in str(caught.value)
        target.write_bytes(original)
    kiln.load(copy)  # everything restored: loads again


def test_export_refuses_a_folder_holding_another_model(artifacts, tiny_models):
    with pytest.raises(ExportError, match="already holds an artifact"):
        kiln.export(tiny_models["sd2"], artifacts["sd1"])


def test_export_errors_are_user_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        kiln.export(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="not a model folder"):
        kiln.export(tmp_path / "empty", tmp_path / "out")
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UnsupportedModelError, match="FluxPipeline"):
        kiln.export(flux, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_component_and_target_are_refused(tiny_models, tmp_path):
    with pytest.raises(ExportError, match="no component 'refiner'"):
        kiln.export(tiny_models["sd1"], tmp_path / "out", components=["refiner"])
    with pytest.raises(ExportError, match="unknown target"):
        kiln.export(tiny_models["sd1"], tmp_path / "out", targets=["coreml"])


def test_a_parity_failure_writes_nothing(tiny_models, tmp_path, monkeypatch):
    from kiln.models import spec as spec_module

    impossible = {p: spec_module.Tolerance(atol=0.0) for p in spec_module.Precision}
    monkeypatch.setattr(
        spec_module.ComponentSpec, "tolerance", lambda self, precision: impossible[precision]
    )
    out = tmp_path / "out"
    with pytest.raises(ExportError, match="misses its parity budget"):
        kiln.export(tiny_models["sd1"], out, components=["vae_decoder"])
    manifest = read_manifest(out)
    assert manifest.variants == ()
    assert not (out / "vae_decoder").exists() or not any((out / "vae_decoder").iterdir())
    # Knowingly accepted: kept and recorded as failed, and selection skips it.
    manifest = kiln.export(
        tiny_models["sd1"], out, components=["vae_decoder"], allow_parity_failure=True
    )
    assert manifest.variants[0].parity.passed is False


def test_single_file_checkpoint_exports_with_its_config(tmp_path):
    from ldm_layout import save_ldm_checkpoint

    from kiln.models.tiny import build_pipeline

    config = save_pipeline("sd1", tmp_path / "config")
    checkpoint = tmp_path / "model.safetensors"
    save_ldm_checkpoint(build_pipeline("sd1"), checkpoint)
    manifest = kiln.export(
        checkpoint, tmp_path / "out", config=str(config), components=["text_encoder"]
    )
    assert manifest.source["kind"] == "single-file"
    assert manifest.source["revision"] == f"sha256:{sha256_file(checkpoint)}"
    assert manifest.variants[0].parity.passed


def test_graph_optimization_is_measured_and_recorded(tiny_models, tmp_path):
    manifest = kiln.export(
        tiny_models["sd1"], tmp_path / "out", components=["text_encoder"], optimize=True
    )
    report = manifest.variants[0].options["graph_optimization"]
    assert isinstance(report["kept"], bool) and report["reason"]
    if report["fusions"]:
        assert report["baseline_ms"] > 0 and report["optimized_ms"] > 0
    assert manifest.variants[0].parity.passed  # parity is checked on the graph that was kept


def test_a_hub_id_without_a_reachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="not a local path and HF_HUB_OFFLINE is set"):
        kiln.export("stable-diffusion-v1-5/stable-diffusion-v1-5", tmp_path / "out")
