"""TensorRT: profiles from the specs, plans bound to their GPU, and what happens without a GPU.

Profiles are checked on the real specs of full-size SD 1.5, SD 2, SDXL and SD inpainting
configurations (built from their configs, no weights) and on tiny BLIP models. The engine
build and the runtime need an NVIDIA GPU and TensorRT: here they are tested up to that
point (the refusal, the child process's error path, the graphs typed for each precision);
the tests marked `gpu` at the end build and run engines where a GPU is present.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cli_helpers import assert_user_error, run_kiln
from manifest_helpers import GIB, paper_variant

from kiln.artifacts import FileEntry, Manifest, Variant, read_manifest, write_manifest
from kiln.errors import BackendUnavailableError, ExportError, InvalidRequestError
from kiln.exporters.tensorrt import (
    EngineOptions,
    InputProfile,
    ShapeRange,
    engine_profiles,
    missing_for_engines,
    plan_engines,
)
from kiln.exporters.tensorrt_build import BuildRequest, build_plan, plan_binding
from kiln.models import stable_diffusion as sd
from kiln.models.spec import Precision
from kiln.profiles.hardware import CpuInfo, GpuInfo, HardwareProfile, MemoryInfo, RuntimeInfo
from kiln.profiles.select import Policy, cuda_unavailable, select
from kiln.runtimes.tensorrt import TensorRTSession, plan_problem

TENSORRT = "11.4.0.106"


# ------------------------------------------------------------------- full-size SD specs


class _Projected(SimpleNamespace):
    """A CLIPTextModelWithProjection stand-in: only the attribute the spec looks for."""

    text_projection = None


def _pipeline(kind: str, *, inpaint: bool = False):
    """The configs of a full-size SD 1.5 / SD 2 / SDXL pipeline, without any weights."""
    xl = kind == "sdxl"
    if xl:
        name = "StableDiffusionXLPipeline"
    else:
        name = "StableDiffusionInpaintPipeline" if inpaint else "StableDiffusionPipeline"
    pipeline = type(name, (), {})()
    pipeline.unet = SimpleNamespace(
        config=SimpleNamespace(
            in_channels=9 if inpaint else 4,
            out_channels=4,
            cross_attention_dim={"sd1": 768, "sd2": 1024, "sdxl": 2048}[kind],
            block_out_channels=(320, 640, 1280) if xl else (320, 640, 1280, 1280),
            sample_size={"sd1": 64, "sd2": 96, "sdxl": 128}[kind],
            use_linear_projection=kind != "sd1",
            addition_embed_type="text_time" if xl else None,
            projection_class_embeddings_input_dim=2816,
            addition_time_embed_dim=256,
        )
    )
    pipeline.vae = SimpleNamespace(
        config=SimpleNamespace(latent_channels=4, block_out_channels=(128, 256, 512, 512))
    )
    hidden = {"sd1": 768, "sd2": 1024, "sdxl": 768}[kind]
    pipeline.text_encoder = SimpleNamespace(
        config=SimpleNamespace(
            hidden_size=hidden,
            vocab_size=49408,
            num_hidden_layers=12,
            hidden_act="quick_gelu" if kind != "sd2" else "gelu",
        )
    )
    if xl:
        pipeline.text_encoder_2 = _Projected(
            config=SimpleNamespace(
                hidden_size=1280, vocab_size=49408, num_hidden_layers=32, projection_dim=1280
            )
        )
    pipeline.tokenizer = SimpleNamespace(model_max_length=77)
    pipeline.scheduler = SimpleNamespace(config={"prediction_type": "epsilon"})
    return pipeline


def _sd_profiles(kind: str, shape_range: ShapeRange | None = None, inpaint: bool = False):
    pipeline = _pipeline(kind, inpaint=inpaint)
    specs = sd.component_specs(pipeline)
    info = sd.describe(pipeline).to_dict()
    return engine_profiles(specs, sd.FAMILY, info, shape_range or ShapeRange())


def _shapes(profiles, component: str) -> dict[str, tuple]:
    return {i.name: (i.min, i.opt, i.max) for i in profiles[component].inputs}


def test_sd1_profiles_follow_the_spec_ranges():
    profiles = _sd_profiles("sd1")
    assert list(profiles) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]
    unet = _shapes(profiles, "unet")
    # 256..1024 px (latent 32..128), opt 512 px; 1..16 rows = 8 images with guidance.
    assert unet["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (16, 4, 128, 128))
    assert unet["timestep"] == ((1,), (2,), (16,))
    assert unet["encoder_hidden_states"] == ((1, 1, 768), (2, 77, 768), (16, 308, 768))
    assert _shapes(profiles, "text_encoder")["input_ids"] == ((1, 1), (1, 77), (16, 77))
    assert _shapes(profiles, "vae_decoder")["latent_sample"] == (
        (1, 4, 32, 32),
        (1, 4, 64, 64),
        (16, 4, 128, 128),
    )
    assert _shapes(profiles, "vae_encoder")["sample"] == (
        (1, 3, 256, 256),
        (1, 3, 512, 512),
        (16, 3, 1024, 1024),
    )
    assert profiles["unet"].dims["latent_height"].multiple_of == 8


def test_sd1_user_range_in_pixels_narrows_every_component():
    shape_range = ShapeRange.parse(min_size="384x256", max_size="768x640", max_batch=2)
    profiles = _sd_profiles("sd1", shape_range)
    # Width 384..768 px -> latent 48..96, height 256..640 -> 32..80; NCHW puts height first.
    unet = _shapes(profiles, "unet")
    assert unet["sample"] == ((1, 4, 32, 48), (2, 4, 64, 64), (4, 4, 80, 96))
    assert unet["timestep"] == ((1,), (2,), (4,))  # two images, doubled by guidance
    assert _shapes(profiles, "vae_decoder")["latent_sample"] == (
        (1, 4, 32, 48),
        (1, 4, 64, 64),
        (2, 4, 80, 96),
    )
    assert _shapes(profiles, "vae_encoder")["sample"] == (
        (1, 3, 256, 384),
        (1, 3, 512, 512),
        (2, 3, 640, 768),
    )
    assert _shapes(profiles, "text_encoder")["input_ids"] == ((1, 1), (1, 77), (2, 77))
    # The opt size stays the model's default where the range holds it, else the nearest.
    small = _sd_profiles("sd1", ShapeRange.parse(max_size="320x256"))
    assert _shapes(small, "unet")["sample"][1] == (2, 4, 32, 40)


def test_static_pins_the_size_and_keeps_the_batch_range():
    profiles = _sd_profiles("sd1", ShapeRange.parse(static="768x512", max_batch=1))
    assert _shapes(profiles, "unet")["sample"] == (
        (1, 4, 64, 96),
        (2, 4, 64, 96),
        (2, 4, 64, 96),
    )
    assert _shapes(profiles, "vae_decoder")["latent_sample"] == (
        (1, 4, 64, 96),
        (1, 4, 64, 96),
        (1, 4, 64, 96),
    )
    dims = profiles["unet"].dims
    assert (dims["latent_width"].min, dims["latent_width"].max) == (96, 96)
    assert (dims["sequence"].min, dims["sequence"].max) == (1, 308)  # not a size axis


def test_sd2_and_inpainting_profiles():
    sd2 = _shapes(_sd_profiles("sd2"), "unet")
    assert sd2["sample"] == ((1, 4, 48, 48), (2, 4, 96, 96), (16, 4, 192, 192))  # 768 px
    assert sd2["encoder_hidden_states"][1] == (2, 77, 1024)
    inpaint = _sd_profiles("sd1", ShapeRange.parse(static="512x512"), inpaint=True)
    assert _shapes(inpaint, "unet")["sample"] == (
        (1, 9, 64, 64),
        (2, 9, 64, 64),
        (16, 9, 64, 64),
    )


def test_sdxl_profiles_cover_both_text_encoders_and_time_ids():
    profiles = _sd_profiles("sdxl", ShapeRange.parse(max_size="1024x768", max_batch=4))
    assert list(profiles) == [
        "text_encoder",
        "text_encoder_2",
        "unet",
        "vae_encoder",
        "vae_decoder",
    ]
    assert _shapes(profiles, "text_encoder_2")["input_ids"] == ((1, 1), (1, 77), (4, 77))
    unet = _shapes(profiles, "unet")
    # 512..2048 px by 32: latent 64..256 by 4; opt 1024 px clamped to 768 high.
    assert unet["sample"] == ((1, 4, 64, 64), (2, 4, 96, 128), (8, 4, 96, 128))
    assert unet["text_embeds"] == ((1, 1280), (2, 1280), (8, 1280))
    assert unet["time_ids"] == ((1, 6), (2, 6), (8, 6))
    assert unet["encoder_hidden_states"][2] == (8, 308, 2048)


@pytest.mark.parametrize(
    ("kind", "options", "message"),
    [
        (
            "sd1",
            {"max_size": "1000x1000"},
            "--max-size 1000x1000: height must be a multiple of 64 between 256 and 1024 "
            "pixels for unet",
        ),
        (
            "sd1",
            {"static": "512x2048"},
            "--static 512x2048: height must be a multiple of 64 between 256 and 1024",
        ),
        (
            "sd1",
            {"min_size": "512x200"},
            "--min-size 512x200: height must be a multiple of 64",
        ),
        ("sd1", {"max_batch": 9}, "--max-batch 9: unet takes at most 8 images per call"),
        (
            "sdxl",
            {"max_size": "1000x1024"},
            "--max-size 1000x1024: width must be a multiple of 32 between 512 and 2048",
        ),
        ("sd2", {"max_size": "2048x2048"}, "between 384 and 1536 pixels for unet"),
    ],
)
def test_sizes_outside_the_spec_are_one_clear_error(kind, options, message):
    with pytest.raises(InvalidRequestError) as info:
        _sd_profiles(kind, ShapeRange.parse(**options))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"min_size": "768x768", "max_size": "512x512"}, "--min-size 768x768 is larger than"),
        ({"static": "512x512", "max_size": "768x768"}, "--static fixes one image size"),
        ({"static": "512"}, "--static '512' is not WIDTHxHEIGHT"),
        ({"max_size": "0x512"}, "must be positive"),
        ({"max_batch": 0}, "--max-batch must be at least 1"),
    ],
)
def test_bad_ranges_are_refused(options, message):
    with pytest.raises(InvalidRequestError, match=message):
        ShapeRange.parse(**options)


def test_engine_precisions_are_checked():
    assert EngineOptions(("fp8", "fp16", "fp16")).precisions == (Precision.FP8, Precision.FP16)
    with pytest.raises(InvalidRequestError, match="TensorRT engines are built at fp16"):
        EngineOptions(("int4",))


# --------------------------------------------------------------------------------- BLIP


@pytest.fixture(scope="module")
def blip_specs(tmp_path_factory):
    from kiln.models.sources import load_source
    from kiln.models.tiny_captioning import save_model

    root = tmp_path_factory.mktemp("trt-blip")
    out = {}
    for preset in ("blip", "blip-itm"):
        model = load_source(save_model(preset, root / preset, seed=0))
        out[preset] = (model.specs(), model.family, model.model_info())
    return out


def test_blip_profiles_scale_the_batch_per_image(blip_specs):
    specs, family, info = blip_specs["blip"]
    profiles = engine_profiles(specs, family, info, ShapeRange(max_batch=2))
    vision = _shapes(profiles, "vision_encoder")["pixel_values"]
    assert vision == ((1, 3, 32, 32), (1, 3, 32, 32), (2, 3, 32, 32))  # fixed 32x32 images
    decoder = _shapes(profiles, "text_decoder")
    # Up to MAX_BEAMS (10) rows per image in the decoders; the past may be empty.
    assert decoder["input_ids"][2][0] == 20
    assert decoder["past_key_0"][0][2] == 0
    assert _shapes(profiles, "cross_attention_kv")["encoder_hidden_states"][2] == (20, 17, 32)
    defaults = engine_profiles(specs, family, info, ShapeRange())
    assert _shapes(defaults, "vision_encoder")["pixel_values"][2] == (8, 3, 32, 32)
    assert _shapes(defaults, "text_decoder")["input_ids"][2] == (80, 64)


def test_blip_fixed_image_size_is_reported_not_ignored(blip_specs):
    specs, family, info = blip_specs["blip"]
    with pytest.raises(InvalidRequestError) as error:
        engine_profiles(specs, family, info, ShapeRange.parse(static="384x384"))
    assert "--static 384x384: vision_encoder takes 32x32 images only" in str(error.value)
    profiles = engine_profiles(specs, family, info, ShapeRange.parse(max_size="64x64"))
    assert profiles["vision_encoder"].notes == (
        "images are 32x32 (fixed by the model): --max-size 64x64 does not apply",
    )
    assert profiles["text_decoder"].notes == ()


def test_blip_matching_counts_texts_not_images(blip_specs):
    specs, family, info = blip_specs["blip-itm"]
    profiles = engine_profiles(specs, family, info, ShapeRange(max_batch=2))
    assert _shapes(profiles, "text_matching")["input_ids"][2][0] == 64
    assert "--max-batch does not bound it" in profiles["text_matching"].notes[0]
    assert _shapes(profiles, "vision_encoder")["pixel_values"][2][0] == 2


# ----------------------------------------------------------------- plans bound to a GPU


def _gpu(name="NVIDIA GeForce RTX 4090", cc="8.9", index=0) -> GpuInfo:
    return GpuInfo(
        vendor="nvidia",
        name=name,
        index=index,
        compute_capability=cc,
        vram_total_bytes=24 * GIB,
        vram_free_bytes=22 * GIB,
    )


def _profile(gpus=(), trt=TENSORRT, torch="cuda 12.8") -> HardwareProfile:
    runtimes = [
        RuntimeInfo("onnxruntime", "1.32.0", True, "CUDAExecutionProvider, CPUExecutionProvider"),
        RuntimeInfo("torch", "2.11.0", True, torch),
        RuntimeInfo("tensorrt", trt, trt is not None, "installed" if trt else "not installed"),
    ]
    return HardwareProfile(
        cpu=CpuInfo(vendor="AMD", model_name="AMD EPYC", architecture="x86_64", logical_cores=16),
        memory=MemoryInfo(64 * GIB, 48 * GIB),
        gpus=tuple(gpus),
        runtimes=tuple(runtimes),
        os_name="Linux",
    )


def _manifest(*variants) -> Manifest:
    return Manifest(
        family="stable-diffusion",
        source={"id": "synthetic"},
        model_info={},
        components={},
        variants=tuple(variants),
    )


def _sd15(built_for) -> Manifest:
    return _manifest(
        paper_variant("text_encoder", "onnx", "fp32", 0.47),
        paper_variant("unet", "onnx", "fp32", 3.2),
        paper_variant("unet", "onnx", "fp16", 1.6),
        paper_variant("unet", "tensorrt", "fp16", 1.7, built_for=built_for),
        paper_variant("vae_decoder", "onnx", "fp32", 0.19),
    )


def test_selection_reads_what_the_build_records():
    built = plan_binding("NVIDIA GeForce RTX 4090", (8, 9), TENSORRT)
    assert set(built) == {"gpu", "compute_capability", "tensorrt", "hardware_compatibility"}
    plan = select(_sd15(built), _profile([_gpu()]))
    assert (plan["unet"].variant_id, plan["unet"].device) == ("unet/tensorrt/fp16", "cuda:0")
    assert plan["unet"].options["cuda_graph"] is True


@pytest.mark.parametrize(
    ("profile", "fragment"),
    [
        (
            _profile([_gpu("NVIDIA GeForce RTX 3090", "8.6")]),
            "built for NVIDIA GeForce RTX 4090 (sm 8.9), this machine has NVIDIA GeForce RTX 3090",
        ),
        (
            _profile([_gpu()], trt="10.14.1"),
            f"built with TensorRT {TENSORRT}, installed is 10.14.1",
        ),
        (_profile([_gpu()], trt=None), "tensorrt is not installed"),
        (_profile([]), "no NVIDIA GPU"),
    ],
)
def test_selection_skips_a_plan_from_another_gpu_or_tensorrt(profile, fragment):
    built = plan_binding("NVIDIA GeForce RTX 4090", (8, 9), TENSORRT)
    plan = select(_sd15(built), profile)
    assert plan["unet"].runtime != "tensorrt"
    why = dict(plan["unet"].rejected)["unet/tensorrt/fp16"]
    assert fragment in why


def test_runtime_refuses_a_plan_from_another_gpu_or_tensorrt():
    built = plan_binding("NVIDIA H100 80GB HBM3", (9, 0), TENSORRT)
    assert plan_problem(built, tensorrt_version=TENSORRT, compute_capability=(9, 0)) == ""
    other_gpu = plan_problem(built, tensorrt_version=TENSORRT, compute_capability=(8, 9))
    assert other_gpu.startswith(
        "the plan was built for NVIDIA H100 80GB HBM3 (sm 9.0), this GPU is sm 8.9"
    )
    other_trt = plan_problem(built, tensorrt_version="11.5.0.1", compute_capability=(9, 0))
    assert other_trt.startswith(
        f"the plan was built with TensorRT {TENSORRT}, this is TensorRT 11.5.0.1"
    )
    assert "does not record" in plan_problem(
        None, tensorrt_version=TENSORRT, compute_capability=(9, 0)
    )
    portable = {**built, "hardware_compatibility": "ampere+"}
    assert plan_problem(portable, tensorrt_version=TENSORRT, compute_capability=(8, 6)) == ""
    assert "Ampere or newer" in plan_problem(
        portable, tensorrt_version=TENSORRT, compute_capability=(7, 5)
    )


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_session_without_tensorrt_is_one_clear_error(tmp_path):
    spec = sd.component_specs(_pipeline("sd1"))["unet"]
    with pytest.raises(BackendUnavailableError, match="TensorRT is not installed: pip install"):
        TensorRTSession(tmp_path / "model.plan", spec, built_for={})


def _bare_session(spec, profiles) -> TensorRTSession:
    """The profile logic of a session, without an engine (which needs a GPU)."""
    session = object.__new__(TensorRTSession)
    session.spec = spec
    session._inputs = [t.name for t in spec.inputs]
    session.profiles = profiles
    return session


def test_session_picks_the_profile_that_holds_the_call_and_names_them_when_none_does():
    spec = sd.component_specs(_pipeline("sd1"))["unet"]
    small = _sd_profiles("sd1", ShapeRange.parse(max_size="512x512", max_batch=1))["unet"]
    large = _sd_profiles("sd1", ShapeRange.parse(static="768x768", max_batch=1))["unet"]
    as_engine = [{i.name: (i.min, i.opt, i.max) for i in p.inputs} for p in (small, large)]
    session = _bare_session(spec, as_engine)
    call = lambda side: ((2, 4, side, side), (2,), (2, 77, 768))  # noqa: E731
    assert session._profile_for(call(64)) == 0
    assert session._profile_for(call(96)) == 1
    with pytest.raises(InvalidRequestError) as info:
        session._profile_for(call(128))
    message = str(info.value)
    assert message.startswith("unet: the call's shapes are outside every optimization profile")
    assert (
        "sample (2, 4, 128, 128) is outside profile 0's (1, 4, 32, 32)..(2, 4, 64, 64)" in message
    )
    assert "outside profile 1's (1, 4, 96, 96)..(2, 4, 96, 96)" in message
    assert "\n" not in message


# --------------------------------------------------------------- this machine: no GPU


def test_engines_need_a_gpu_tensorrt_and_a_cuda_torch():
    assert missing_for_engines(_profile([_gpu()])) == []
    assert missing_for_engines(_profile([], trt=None, torch="cpu")) == [
        "no NVIDIA GPU",
        "TensorRT is not installed",
        "torch is not a CUDA build (cpu)",
    ]
    ampere = _profile([_gpu("NVIDIA A100-SXM4-80GB", "8.0")])
    assert missing_for_engines(ampere, [Precision.FP8]) == [
        "fp8 needs compute capability 8.9+, NVIDIA A100-SXM4-80GB is sm 8.0"
    ]
    assert missing_for_engines(ampere, [Precision.BF16, Precision.INT8]) == []


def test_selection_never_places_anything_on_a_gpu_here():
    from kiln.profiles.hardware import detect

    profile = detect()
    if profile.has_cuda:
        pytest.skip("this machine has an NVIDIA GPU")
    off = cuda_unavailable(profile)
    assert set(off) == {"tensorrt", "onnxruntime", "torch"}
    assert all(why.startswith("no NVIDIA GPU") for why in off.values())
    built = plan_binding("NVIDIA GeForce RTX 4090", (8, 9), TENSORRT)
    plan = select(_sd15(built), profile, Policy.from_strings(prefer=["tensorrt", "onnx@cuda"]))
    assert {c.device for c in plan.choices} == {"cpu"}
    assert all(c.runtime == "onnxruntime" for c in plan.choices)
    rejected = dict(plan["unet"].rejected)
    assert "tensorrt" in rejected["unet/tensorrt/fp16"]


def _with_engine_variant(artifact: Path, out: Path) -> Path:
    """A copy of `artifact` whose manifest also lists a TensorRT plan of the UNet."""
    shutil.copytree(artifact, out)
    plan = out / "unet" / "tensorrt-fp16" / "model.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(b"not a real plan")
    manifest = read_manifest(out)
    variant = Variant(
        component="unet",
        target="tensorrt",
        precision=Precision.FP16,
        files=(FileEntry.of(out, plan),),
        entry="unet/tensorrt-fp16/model.plan",
        versions={},
        shape_profile={},
        drift={"psnr": 40.0},
        built_for=plan_binding("NVIDIA GeForce RTX 4090", (8, 9), TENSORRT),
    )
    write_manifest(out, manifest.with_variant(variant))
    return out


def test_doctor_says_why_nothing_runs_on_a_gpu_here(artifacts, tmp_path):
    from kiln.profiles.hardware import detect

    if detect().has_cuda:
        pytest.skip("this machine has an NVIDIA GPU")
    result = run_kiln("doctor")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "not on an NVIDIA GPU tensorrt: no NVIDIA GPU" in text
    assert "not on an NVIDIA GPU torch: no NVIDIA GPU; torch is not a CUDA build" in text
    artifact = _with_engine_variant(artifacts["sd1"], tmp_path / "sd1")
    data = json.loads(run_kiln("doctor", artifact, "--json").stdout)
    assert set(data["not_on_nvidia_gpu"]) == {"tensorrt", "onnxruntime", "torch"}
    unet = next(row for row in data["plan"] if row["component"] == "unet")
    assert unet["variant"] == "unet/onnx/fp32" and unet["device"] == "cpu"
    why = dict(unet["rejected"])["unet/tensorrt/fp16"]
    assert why.startswith("tensorrt is not installed")


def test_export_to_tensorrt_without_a_gpu_fails_first_and_writes_nothing(
    tiny_models, artifacts, tmp_path
):
    out = tmp_path / "engines"
    result = run_kiln("export", tiny_models["sd1"], "-o", out, "--target", "tensorrt")
    assert_user_error(result, "cannot build TensorRT engines here", "pip install 'kiln[gpu]'")
    assert not out.exists()
    copy = tmp_path / "copy"
    shutil.copytree(artifacts["sd1"], copy)
    before = (copy / "manifest.json").read_bytes()
    result = run_kiln(
        "export",
        copy,
        "-o",
        copy,
        "--target",
        "tensorrt",
        "--precision",
        "int8",
        "--max-batch",
        "2",
    )
    assert_user_error(result, "no NVIDIA GPU")
    assert (copy / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in copy.iterdir()) == sorted(
        p.name for p in artifacts["sd1"].iterdir()
    )


def test_dry_run_prints_the_profiles_anywhere(tiny_models, artifacts, tmp_path):
    out = tmp_path / "never"
    options = ["--max-size", "192x256", "--max-batch", "2", "--precision", "fp16"]
    result = run_kiln(
        "export",
        tiny_models["sd1"],
        "-o",
        out,
        "-t",
        "tensorrt",
        "--dry-run",
        "--json",
        *options,
        "--precision",
        "int8",
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # one JSON document, nothing else on stdout
    assert data["precisions"] == ["fp16", "int8"]
    sample = data["components"]["unet"]["inputs"][0]
    assert sample == {
        "name": "sample",
        "min": [1, 4, 8, 8],
        "opt": [2, 4, 16, 16],
        "max": [4, 4, 32, 24],
    }
    assert not out.exists()
    table = run_kiln(
        "export", artifacts["sd1"], "-o", artifacts["sd1"], "-t", "tensorrt", "--dry-run"
    )
    assert table.returncode == 0, table.stderr
    assert "TensorRT optimization profiles (fp16): nothing built" in table.stdout
    assert "latent_sample" in table.stdout and "onnx fp32 variants in" in table.stdout
    from_artifact = plan_engines(artifacts["sd1"], options=EngineOptions(shape_range=ShapeRange()))
    assert list(from_artifact.profiles) == ["text_encoder", "unet", "vae_encoder", "vae_decoder"]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--max-size", "1000x1000"], "--max-size 1000x1000: height must be a multiple of 16"),
        (["--static", "128x128", "--min-size", "64x64"], "--static fixes one image size"),
        (["--precision", "int4"], "TensorRT engines are built at"),
    ],
)
def test_dry_run_errors_are_one_line(tiny_models, tmp_path, args, fragment):
    result = run_kiln(
        "export", tiny_models["sd1"], "-o", tmp_path / "x", "-t", "tensorrt", "--dry-run", *args
    )
    assert_user_error(result, fragment)


def test_shape_options_need_the_tensorrt_target(tiny_models, tmp_path):
    result = run_kiln("export", tiny_models["sd1"], "-o", tmp_path / "x", "--max-batch", "2")
    assert_user_error(result, "are for --target tensorrt")
    assert not (tmp_path / "x").exists()


def test_an_artifact_takes_engines_into_itself_only(artifacts, tmp_path):
    from kiln.exporters.runner import _engines_for_artifact

    with pytest.raises(ExportError, match="use -o"):
        _engines_for_artifact(
            artifacts["sd1"], tmp_path / "elsewhere", ["tensorrt"], None, EngineOptions(), None
        )
    with pytest.raises(ExportError, match="it takes --target tensorrt only"):
        _engines_for_artifact(
            artifacts["sd1"],
            artifacts["sd1"],
            ["tensorrt", "openvino"],
            None,
            EngineOptions(),
            None,
        )


# ------------------------------------------------ graphs typed for strongly typed builds


@pytest.fixture(scope="module")
def unet_onnx(artifacts):
    manifest = read_manifest(artifacts["sd1"])
    variant = manifest.variant("unet/onnx/fp32")
    return artifacts["sd1"] / variant.entry, manifest, variant


def _unet_calls(manifest, count=3):
    from kiln.models.spec import ComponentSpec

    spec = ComponentSpec.from_dict(manifest.components["unet"])
    calls = [{k: v.numpy() for k, v in spec.sample_inputs(seed=s).items()} for s in range(count)]
    return spec, calls


def test_bfloat16_bits_round_like_torch():
    import torch

    values = np.random.default_rng(0).normal(0, 100, 4096).astype(np.float32)
    values[:4] = [0.0, -0.0, 1e-40, 65504.0]
    from kiln.exporters.tensorrt_graph import bfloat16_bits

    want = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(bfloat16_bits(values), want)


def test_fp16_and_bf16_graphs_are_typed_in_the_graph(unet_onnx, tmp_path):
    import onnx
    from onnx import TensorProto

    from kiln.exporters.tensorrt_graph import typed_graph

    path, manifest, _ = unet_onnx
    spec, _ = _unet_calls(manifest)
    as_is = typed_graph(Precision.FP32, path, spec, tmp_path / "fp32", [], tmp_path, print)
    assert as_is.path == path and not (tmp_path / "fp32").exists()
    fp16 = typed_graph(Precision.FP16, path, spec, tmp_path / "fp16", [], tmp_path, lambda t: None)
    model = onnx.load(str(fp16.path), load_external_data=False)
    types = {t.data_type for t in model.graph.initializer}
    assert TensorProto.FLOAT16 in types
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # IO kept
    bf16 = typed_graph(Precision.BF16, path, spec, tmp_path / "bf16", [], tmp_path, lambda t: None)
    model = onnx.load(str(bf16.path), load_external_data=True)
    assert bf16.details["retyped"]["initializers"] > 0
    assert TensorProto.FLOAT16 not in {t.data_type for t in model.graph.initializer}
    assert TensorProto.BFLOAT16 in {t.data_type for t in model.graph.initializer}
    casts = [a.i for n in model.graph.node if n.op_type == "Cast" for a in n.attribute]
    assert TensorProto.FLOAT16 not in casts and TensorProto.BFLOAT16 in casts


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP8])
def test_int8_and_fp8_graphs_carry_symmetric_qdq_from_a_reused_calibration_cache(
    unet_onnx, tmp_path, monkeypatch, precision
):
    import onnx
    import onnxruntime.quantization.calibrate as calibrate
    from onnx import TensorProto, numpy_helper

    from kiln.exporters.tensorrt_graph import source_key, typed_graph

    path, manifest, variant = unet_onnx
    spec, calls = _unet_calls(manifest)
    cache = tmp_path / "calibration"
    key = source_key(variant.files)
    graph = typed_graph(
        precision, path, spec, tmp_path / "a", calls, cache, lambda t: None, source_key=key
    )
    assert graph.calibrated and len(list(cache.glob("unet-*.json"))) == 1
    model = onnx.load(str(graph.path), load_external_data=True)
    initializers = {t.name: t for t in model.graph.initializer}
    quantizers = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantizers
    want = TensorProto.FLOAT8E4M3FN if precision is Precision.FP8 else TensorProto.INT8
    for node in quantizers:
        zero = initializers[node.input[2]]
        assert zero.data_type == want
        assert not np.any(numpy_helper.to_array(zero).astype(np.float32))  # zero points are 0
    # A second build of the same graph with the same inputs reads the ranges from the cache.
    monkeypatch.setattr(calibrate, "create_calibrator", lambda *a, **k: pytest.fail("recalibrated"))
    again = typed_graph(
        precision, path, spec, tmp_path / "b", calls, cache, lambda t: None, source_key=key
    )
    assert again.details["calibration"]["cache"] == graph.details["calibration"]["cache"]
    with pytest.raises(ExportError, match="need calibration inputs"):
        typed_graph(precision, path, spec, tmp_path / "c", [], cache, lambda t: None)


# --------------------------------------------------------------- the build's child process


def test_build_request_round_trips():
    request = BuildRequest(
        component="unet",
        onnx="/a/model.onnx",
        plan="/a/model.plan",
        inputs=(InputProfile("sample", (1, 4, 8, 8), (2, 4, 16, 16), (4, 4, 32, 32)),),
        timing_cache_dir="/cache",
        optimization_level=4,
    )
    assert BuildRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
def test_a_failed_build_child_is_one_line_and_writes_no_plan(tmp_path):
    request = BuildRequest(
        component="unet",
        onnx=str(tmp_path / "model.onnx"),
        plan=str(tmp_path / "model.plan"),
        inputs=(),
        timing_cache_dir=str(tmp_path / "cache"),
    )
    seen = []
    with pytest.raises(ExportError) as info:
        build_plan(request, seen.append)
    assert "TensorRT cannot be imported here" in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "model.plan").exists()


# -------------------------------------------------------------------- on an NVIDIA GPU


MIN_PSNR = 30.0  # dB, fp16 against diffusers fp32 (issue 18)
PROMPT = "a photo of an astronaut riding a horse"
SETTINGS = {"negative_prompt": "blurry", "guidance_scale": 6.0, "width": 128, "height": 96}


def _needs_tensorrt() -> None:
    if importlib.util.find_spec("tensorrt") is None:
        pytest.skip("TensorRT is not installed (pip install 'kiln[gpu]')")


@pytest.fixture(scope="module")
def sd_engines(tiny_models, tmp_path_factory):
    import kiln

    _needs_tensorrt()
    out = tmp_path_factory.mktemp("trt-sd") / "sd1"
    shapes = ShapeRange.parse(max_size="128x128", max_batch=1)
    engines = EngineOptions(("fp16", "fp32"), shapes, calibration=2)
    kiln.export(tiny_models["sd1"], out, targets=["tensorrt"], engines=engines)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_engines_generate_what_diffusers_does(sd_engines, tiny_models, precision):
    import torch
    from diffusers import StableDiffusionPipeline

    import kiln
    from kiln.bench.metrics import psnr

    manifest = read_manifest(sd_engines)
    unet = manifest.variant(f"unet/tensorrt/{precision}")
    assert unet.built_for["tensorrt"] and unet.built_for["compute_capability"]
    assert unet.options["tensorrt_profiles"][0][0]["max"] == [2, 4, 16, 16]
    deployment = kiln.load(sd_engines, require=[f"tensorrt:{precision}"])
    assert {c.runtime for c in deployment.plan.choices} == {"tensorrt"}
    images = [deployment.generate(PROMPT, steps=4, seed=11, **SETTINGS).image for _ in range(2)]
    pipeline = StableDiffusionPipeline.from_pretrained(
        tiny_models["sd1"], safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        reference = pipeline(
            PROMPT,
            num_inference_steps=4,
            generator=torch.Generator("cpu").manual_seed(11),
            **SETTINGS,
        ).images[0]
    for image in images:  # the second run replays the captured CUDA graphs
        measured = psnr(np.asarray(image), np.asarray(reference))
        print(f"tensorrt {precision} vs diffusers fp32 (CPU): {measured:.1f} dB")
        assert measured >= MIN_PSNR
    assert deployment.sessions["unet"].describe()["graph_replays"] > 0
    with pytest.raises(InvalidRequestError, match="outside every optimization profile"):
        deployment.generate(PROMPT, steps=2, seed=1, width=256, height=256)


@pytest.mark.gpu
def test_blip_engines_caption_as_transformers_does(tmp_path):
    import torch
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    import kiln
    from kiln.bench.metrics import bleu
    from kiln.models.tiny_captioning import save_model

    _needs_tensorrt()
    model_dir = save_model("blip", tmp_path / "model", seed=0)
    out = tmp_path / "artifact"
    engines = EngineOptions(("fp32", "fp16"), ShapeRange(max_batch=3), calibration=2)
    kiln.export(model_dir, out, targets=["tensorrt"], engines=engines)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 56), (32, 32))
    ]
    model = BlipForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = BlipProcessor.from_pretrained(model_dir)(images=images, return_tensors="pt")
    with torch.inference_mode():
        want = model.generate(**inputs, max_new_tokens=12).tolist()
    fp32 = kiln.load(out, require=["tensorrt:fp32"]).caption(images, max_new_tokens=12)
    assert fp32.sequences == want  # TF32 kernels: tokens may only differ where logits tie
    fp16 = kiln.load(out, require=["tensorrt:fp16"]).caption(images, max_new_tokens=12)
    assert bleu(fp16.sequences, want) >= 0.3  # the default drift budget's bar


def test_calibration_records_host_and_device_calls_once_each():
    """int8/fp8 engines calibrate on what the fp32 plan's sessions see, on either way in."""
    import torch

    from kiln.quant.calibration import tap_inputs
    from kiln.runtimes.base import Session

    spec = sd.component_specs(_pipeline("sd1"))["vae_decoder"]

    class Host(Session):  # like onnxruntime on the CPU: run_on_device goes through run
        runtime, device = "host", "cpu"

        def run(self, inputs):
            return {"sample": np.zeros((1, 3, 8, 8), np.float32)}

    class Device(Host):  # like TensorRT: run goes through run_on_device
        def run(self, inputs):
            return self.run_on_device({k: torch.as_tensor(v) for k, v in inputs.items()})

        def run_on_device(self, inputs):
            return {"sample": torch.zeros(1, 3, 8, 8)}

    sessions = {"host": Host(), "device": Device()}
    for session in sessions.values():
        session.spec = spec
    latent = torch.ones(1, 4, 32, 32)
    with tap_inputs(sessions) as recorded:
        for session in sessions.values():
            session.run_torch(latent_sample=latent)
            session.run({"latent_sample": latent.numpy()})
    assert {name: len(calls) for name, calls in recorded.items()} == {"host": 2, "device": 2}
    assert all(isinstance(c["latent_sample"], np.ndarray) for c in recorded["device"])
    assert "run" not in vars(sessions["host"]) and "run_on_device" not in vars(sessions["device"])


def test_engine_builds_are_recorded_with_their_binding_profile_and_drift(
    artifacts, tmp_path, monkeypatch
):
    """The whole `--target tensorrt` flow on tiny SD1, with stand-ins for the two parts that
    need a GPU: the child build (it keeps the typed ONNX graph as the "plan") and the
    session (onnxruntime on that graph). Everything else is kiln's own code."""
    import kiln.exporters.tensorrt as engines_module
    import kiln.exporters.tensorrt_build as build_module
    import kiln.pipelines.deployment as deployment_module
    import kiln.runtimes.tensorrt as runtime_module
    from kiln.exporters.tensorrt import build_engines
    from kiln.exporters.tensorrt_build import BuiltPlan
    from kiln.runtimes.onnxruntime import OnnxRuntimeSession

    built_for = plan_binding("NVIDIA GeForce RTX 4090", (8, 9), TENSORRT)
    requests = []

    def fake_build(request, progress):
        requests.append(request)
        progress("Building engine 1/1")
        plan, graph = Path(request.plan), Path(request.onnx)
        (plan.parent / "graph").mkdir()
        for file in graph.parent.glob(graph.name + "*"):
            shutil.copy(file, plan.parent / "graph" / file.name)
        plan.write_text(f"graph/{graph.name}")
        return BuiltPlan(built_for, 0.5)

    class FakeSession(OnnxRuntimeSession):
        runtime = "tensorrt"

        def __init__(self, plan_path, spec, *, built_for=None, device="cuda:0", cuda_graph=False):
            assert built_for == plan_binding("NVIDIA GeForce RTX 4090", (8, 9), TENSORRT)
            plan = Path(plan_path)
            super().__init__(plan.parent / plan.read_text(), spec)

    gpu_machine = _profile([_gpu()])
    gpu_machine = HardwareProfile(
        cpu=gpu_machine.cpu,
        memory=gpu_machine.memory,
        gpus=gpu_machine.gpus,
        runtimes=(
            RuntimeInfo("onnxruntime", "1.32.0", True, "CPUExecutionProvider"),
            RuntimeInfo("torch", "2.13.0", True, "cpu"),
            RuntimeInfo("tensorrt", TENSORRT, True, "installed"),
        ),
    )
    monkeypatch.setattr(engines_module, "check_can_build", lambda **kwargs: None)
    monkeypatch.setattr(build_module, "build_plan", fake_build)
    monkeypatch.setattr(runtime_module, "TensorRTSession", FakeSession)
    monkeypatch.setattr(deployment_module, "detect", lambda *a, **k: gpu_machine)
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "cache"))
    root = tmp_path / "sd1"
    shutil.copytree(artifacts["sd1"], root)
    events = []
    options = EngineOptions(
        ("fp16", "fp32"),
        ShapeRange.parse(max_size="128x128", max_batch=1),
        calibration=2,
        calibration_steps=2,
    )
    manifest = build_engines(root, components=["unet"], options=options, progress=events.append)

    assert [r.component for r in requests] == ["unet", "unet"]
    assert requests[0].inputs[0] == InputProfile(
        "sample", (1, 4, 8, 8), (2, 4, 16, 16), (2, 4, 16, 16)
    )
    assert requests[0].timing_cache_dir == str(tmp_path / "cache" / "tensorrt")
    fp16, fp32 = manifest.variant("unet/tensorrt/fp16"), manifest.variant("unet/tensorrt/fp32")
    for variant in (fp16, fp32):
        assert variant.built_for == built_for
        assert variant.entry == f"unet/tensorrt-{variant.precision.value}/model.plan"
        assert variant.shape_profile["latent_height"] == {
            "min": 8,
            "opt": 16,
            "max": 16,
            "multiple_of": 2,
        }
        assert variant.options["tensorrt_profiles"][0][0]["max"] == [2, 4, 16, 16]
        assert variant.versions["tensorrt"] == TENSORRT
        assert variant.quantization["source_variant"] == "unet/onnx/fp32"
        assert variant.drift["component"]["calls"] >= 1
        assert not (root / variant.folder / ".work").exists()
    assert fp16.quantization["method"] == "fp16 cast"
    # Reduced precision: drift end to end, like `kiln quantize`, so selection may pick it.
    assert fp16.drift["psnr"] > 20 and fp16.drift["workload"]["width"] == 128
    assert "psnr" not in fp32.drift
    stages = {e.stage for e in events}
    assert {"calibrate", "building", "built", "drift", "done"} <= stages
    plan = select(manifest, gpu_machine)
    assert plan["unet"].variant_id == "unet/tensorrt/fp16" and plan["unet"].device == "cuda:0"


def test_loras_at_load_keep_tensorrt_plans_out():
    built = plan_binding("NVIDIA GeForce RTX 4090", (8, 9), TENSORRT)
    policy = Policy(weight_changes=frozenset({"unet"}))
    plan = select(_sd15(built), _profile([_gpu()]), policy)
    assert plan["unet"].runtime != "tensorrt"
    assert "cannot take LoRAs at load" in dict(plan["unet"].rejected)["unet/tensorrt/fp16"]
