"""OpenVINO target: export beside ONNX into one artifact, parity, selection, generate()."""

import shutil

import pytest

import kiln
from kiln.artifacts import read_manifest
from kiln.bench.metrics import psnr
from kiln.errors import ArtifactError

pytest.importorskip("openvino")

PROMPT = "a photo of an astronaut riding a horse"


def test_both_targets_share_one_manifest_with_parity(both_targets):
    manifest = read_manifest(both_targets)
    ids = set(manifest.variant_ids())
    for component in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert {f"{component}/onnx/fp32", f"{component}/openvino/fp32"} <= ids
    for variant in manifest.variants_of("unet"):
        assert variant.parity.passed and variant.parity.worst()[1] < 1e-3
    ov_unet = manifest.variant("unet/openvino/fp32")
    assert {f.path.rsplit("/", 1)[1] for f in ov_unet.files} == {
        "model.xml",
        "model.bin",
        "weights.json",
    }
    assert "openvino" in ov_unet.versions


def test_openvino_generate_matches_onnxruntime_and_diffusers(both_targets, monkeypatch, tmp_path):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KILN_OPENVINO_STATIC_SHAPES", "1")
    on_ov = kiln.load(both_targets, require="openvino:fp32")
    on_ort = kiln.load(both_targets, require="onnx:fp32")
    assert {c.runtime for c in on_ov.plan.choices} == {"openvino"}
    # fp32 variants compile with an explicit f32 hint (OpenVINO would pick bf16 by itself).
    assert on_ov.sessions["unet"].settings["INFERENCE_PRECISION_HINT"] == "f32"
    a = on_ov.generate(PROMPT, steps=4, seed=8, width=96, height=128)
    b = on_ort.generate(PROMPT, steps=4, seed=8, width=96, height=128)
    assert psnr(a.image, b.image) >= 35
    # Steps after the first ran on a UNet compiled for this exact shape.
    assert len(on_ov.sessions["unet"].static_shapes_compiled) == 1
    assert any((tmp_path / "cache" / "openvino").iterdir())  # compiled blobs were cached


def test_a_truncated_bin_is_refused_by_name(both_targets, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(both_targets, copy)
    weights = copy / "unet" / "openvino-fp32" / "model.bin"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="unet/openvino-fp32/model.bin"):
        kiln.load(copy, require="openvino:fp32")


def test_static_shape_cache_is_bounded(both_targets):
    import numpy as np

    from kiln.models.spec import ComponentSpec
    from kiln.runtimes.openvino import OpenVinoSession

    manifest = read_manifest(both_targets)
    spec = ComponentSpec.from_dict(manifest.components["vae_decoder"])
    session = OpenVinoSession(
        both_targets / manifest.variant("vae_decoder/openvino/fp32").entry,
        spec,
        use_cache=False,
        static_shapes=1,
    )
    for side in (8, 8, 12, 12, 8):
        out = session.run({"latent_sample": np.zeros((1, 4, side, side), np.float32)})
        assert out["sample"].shape == (1, 3, side * 8, side * 8)
    assert [dict(key)["latent_sample"] for key in session.static_shapes_compiled] == [(1, 4, 8, 8)]


def test_static_shapes_are_remembered_and_replace_the_dynamic_graph(
    both_targets, monkeypatch, tmp_path
):
    """A shape compiled static once is compiled static from the start by the next session
    (no dynamic copy of the weights); another shape still runs, on the dynamic graph."""
    import numpy as np

    from kiln.models.spec import ComponentSpec
    from kiln.runtimes.openvino import OpenVinoSession, remembered_shapes

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    manifest = read_manifest(both_targets)
    spec = ComponentSpec.from_dict(manifest.components["vae_decoder"])
    path = both_targets / manifest.variant("vae_decoder/openvino/fp32").entry

    def session():
        return OpenVinoSession(path, spec, static_shapes=2, shapes_key="artifact::vae_decoder")

    small = {"latent_sample": np.random.default_rng(0).standard_normal((1, 4, 8, 8), np.float32)}
    large = {"latent_sample": np.random.default_rng(1).standard_normal((1, 4, 12, 8), np.float32)}
    first = session()
    expected = [first.run(small), first.run(small)]
    assert first.static_shapes_compiled and first._stateless is None  # the dynamic copy went
    assert remembered_shapes("artifact::vae_decoder") == [(("latent_sample", (1, 4, 8, 8)),)]
    assert remembered_shapes("another::vae_decoder") == []

    second = session()
    assert second.static_shapes_compiled == first.static_shapes_compiled
    assert second._stateless is None  # nothing dynamic compiled at load
    again = second.run(small)
    np.testing.assert_allclose(again["sample"], expected[0]["sample"], atol=1e-5)
    np.testing.assert_allclose(expected[1]["sample"], expected[0]["sample"], atol=1e-5)
    assert second.run(large)["sample"].shape == (1, 3, 96, 64)
    assert second._stateless is not None  # compiled when the new shape came


def test_compiled_model_cache_is_bounded(both_targets, monkeypatch, tmp_path):
    import os

    from kiln.runtimes.openvino import prune_cache

    old, new, big = (tmp_path / "blobs" / name for name in ("old.blob", "new.blob", "big.blob"))
    old.parent.mkdir()
    for age, path in enumerate((big, old, new)):
        path.write_bytes(bytes(1000 if path is big else 100))
        os.utime(path, (1000 + age, 1000 + age))
    assert prune_cache(old.parent, 1150, keep=[big]) == [old]  # oldest first, kept skipped
    assert sorted(p.name for p in old.parent.iterdir()) == ["big.blob", "new.blob"]

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("KILN_CACHE_MAX_GB", "0")
    kiln.load(both_targets, require="openvino:fp32")
    # Each compile kept only what it had just written.
    assert len(list((tmp_path / "cache" / "openvino").iterdir())) == 1


def test_throughput_objective_splits_batches_over_streams(both_targets, monkeypatch, tmp_path):
    import numpy as np

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    fast = kiln.load(both_targets, require="openvino:fp32", objective="throughput")
    plain = kiln.load(both_targets, require="openvino:fp32")
    decoder, single = fast.sessions["vae_decoder"], plain.sessions["vae_decoder"]
    assert decoder.settings["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert single.settings["PERFORMANCE_HINT"] == "LATENCY"
    streams = decoder.describe()["streams"]
    assert streams >= 1 and single.describe()["streams"] == 1
    latents = np.random.default_rng(2).standard_normal((3, 4, 8, 12), np.float32)
    split = decoder.run({"latent_sample": latents})["sample"]
    whole = single.run({"latent_sample": latents})["sample"]
    assert split.shape == whole.shape == (3, 3, 64, 96)
    np.testing.assert_allclose(split, whole, atol=1e-5)
    a = fast.generate(PROMPT, steps=3, seed=4, width=64, height=64, num_images=2)
    b = plain.generate(PROMPT, steps=3, seed=4, width=64, height=64, num_images=2)
    assert all(psnr(x, y) >= 35 for x, y in zip(a.images, b.images, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("preset", "pipeline_class"),
    [("sd2", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")],
)
def test_sd2_and_xl_on_openvino_match_diffusers(
    tiny_models, tmp_path, monkeypatch, preset, pipeline_class
):
    from test_generate import MIN_PSNR, _reference

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / preset
    kiln.export(tiny_models[preset], out, targets=["openvino"])
    # 96x128 is neither the traced nor the parity shape.
    ours = kiln.load(out).generate(PROMPT, steps=3, seed=4, width=96, height=128)
    reference = _reference(
        tiny_models[preset],
        pipeline_class,
        prompt=PROMPT,
        num_inference_steps=3,
        width=96,
        height=128,
        seed=4,
    )[0]
    assert psnr(ours.image, reference) >= MIN_PSNR


@pytest.mark.parametrize("preset", ["blip", "blip2-opt"])
def test_captioning_on_openvino_is_token_identical(tmp_path, monkeypatch, preset):
    import numpy as np
    import torch
    import transformers
    from PIL import Image

    from kiln.models.tiny_captioning import save_model

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = save_model(preset, tmp_path / "model", seed=0)
    out = tmp_path / "artifact"
    kiln.export(model_dir, out, targets=["openvino"])
    deployment = kiln.load(out)
    assert {c.runtime for c in deployment.plan.choices} == {"openvino"}
    family = "Blip2" if preset.startswith("blip2") else "Blip"
    model = getattr(transformers, f"{family}ForConditionalGeneration").from_pretrained(model_dir)
    processor = getattr(transformers, f"{family}Processor").from_pretrained(model_dir)
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (41, 57, 3), dtype=np.uint8))
    for beams in (1, 3):
        ours = deployment.caption([image], num_beams=beams, max_new_tokens=12).sequences[0]
        with torch.inference_mode():
            theirs = model.eval().generate(
                **processor(images=image, return_tensors="pt"), num_beams=beams, max_new_tokens=12
            )
        assert ours == theirs[0].tolist(), beams


@pytest.mark.slow  # 30 s; the default run stays under 30 min
def test_blip_matching_on_openvino(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from kiln.models.tiny_captioning import save_model

    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    model_dir = save_model("blip-itm", tmp_path / "model", seed=0)
    kiln.export(model_dir, tmp_path / "ov", targets=["openvino"])
    kiln.export(model_dir, tmp_path / "onnx", targets=["onnx"])
    image = Image.fromarray(np.random.default_rng(4).integers(0, 256, (50, 40, 3), dtype=np.uint8))
    texts = ["a dog", "a red car on a road"]
    ov = kiln.load(tmp_path / "ov").match(image, texts)
    ort = kiln.load(tmp_path / "onnx").match(image, texts)
    np.testing.assert_allclose(ov.itm_probabilities, ort.itm_probabilities, atol=1e-4)
    np.testing.assert_allclose(ov.itc_similarities, ort.itc_similarities, atol=1e-4)
