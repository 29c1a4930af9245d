"""`generate()` on exported tiny models reproduces diffusers' PyTorch images for a seed."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import kiln
from kiln.bench.metrics import psnr
from kiln.errors import InvalidRequestError
from kiln.pipelines.schedulers import SCHEDULERS, make_scheduler

MIN_PSNR = 35.0  # dB, the bar for fp32; observed values are ~90 dB
PROMPT = "a photo of an astronaut riding a horse"


@pytest.fixture(scope="module")
def deployments(artifacts):
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = kiln.load(artifacts[preset])
        return cache[preset]

    return get


def _reference(model_dir, pipeline_class=None, scheduler=None, **kwargs):
    import diffusers

    cls = getattr(diffusers, pipeline_class) if pipeline_class else DiffusionPipeline
    extra = (
        {}
        if "XL" in (pipeline_class or "")
        else {"safety_checker": None, "requires_safety_checker": False}
    )
    pipeline = cls.from_pretrained(model_dir, **extra)
    if "XL" in (pipeline_class or ""):
        pipeline.watermark = None
    pipeline.set_progress_bar_config(disable=True)
    if scheduler:
        pipeline.scheduler = make_scheduler(scheduler, dict(pipeline.scheduler.config))
    seed = kwargs.pop("seed")
    with torch.inference_mode():
        return pipeline(generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images


def _init_image(size=128, seed=0):
    rng = np.random.default_rng(seed)
    gradient = np.linspace(0, 255, size, dtype=np.float64)
    pixels = np.stack(
        [
            np.add.outer(gradient, gradient) / 2,
            np.tile(gradient, (size, 1)),
            rng.uniform(0, 255, (size, size)),
        ],
        axis=-1,
    )
    return Image.fromarray(pixels.astype(np.uint8))


def _mask(size=128):
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask)


@pytest.mark.parametrize(
    ("preset", "pipeline_class"),
    [
        ("sd1", "StableDiffusionPipeline"),
        ("sd2", "StableDiffusionPipeline"),
        ("sdxl", "StableDiffusionXLPipeline"),
    ],
)
def test_txt2img_matches_diffusers(deployments, tiny_models, preset, pipeline_class):
    settings = {
        "prompt": PROMPT,
        "negative_prompt": "blurry",
        "num_inference_steps": 4,
        "guidance_scale": 6.0,
        "width": 128,
        "height": 96,
        "seed": 11,
    }
    ours = deployments(preset).generate(
        PROMPT, negative_prompt="blurry", steps=4, guidance_scale=6.0, width=128, height=96, seed=11
    )
    reference = _reference(tiny_models[preset], pipeline_class, **settings)[0]
    assert ours.image.size == (128, 96)
    assert psnr(ours.image, reference) >= MIN_PSNR


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_matches_diffusers(deployments, tiny_models, scheduler):
    ours = deployments("sd1").generate(PROMPT, steps=3, seed=5, scheduler=scheduler)
    reference = _reference(
        tiny_models["sd1"],
        "StableDiffusionPipeline",
        scheduler=scheduler,
        prompt=PROMPT,
        num_inference_steps=3,
        seed=5,
        width=128,
        height=128,
    )[0]
    assert psnr(ours.image, reference) >= MIN_PSNR, scheduler


@pytest.mark.parametrize(
    ("preset", "pipeline_class"),
    [("sd1", "StableDiffusionImg2ImgPipeline"), ("sdxl", "StableDiffusionXLImg2ImgPipeline")],
)
def test_img2img_matches_diffusers(deployments, tiny_models, preset, pipeline_class):
    init = _init_image()
    ours = deployments(preset).generate(PROMPT, image=init, strength=0.6, steps=5, seed=3)
    reference = _reference(
        tiny_models[preset],
        pipeline_class,
        prompt=PROMPT,
        image=init,
        strength=0.6,
        num_inference_steps=5,
        seed=3,
    )[0]
    assert ours.mode == "img2img"
    assert psnr(ours.image, reference) >= MIN_PSNR


def test_inpaint_matches_diffusers(deployments, tiny_models):
    init, mask = _init_image(), _mask()
    ours = deployments("sd1-inpaint").generate(
        PROMPT, image=init, mask_image=mask, strength=1.0, steps=4, seed=9
    )
    reference = _reference(
        tiny_models["sd1-inpaint"],
        "StableDiffusionInpaintPipeline",
        prompt=PROMPT,
        image=init,
        mask_image=mask,
        strength=1.0,
        num_inference_steps=4,
        seed=9,
        width=128,
        height=128,
    )[0]
    assert ours.mode == "inpaint"
    assert psnr(ours.image, reference) >= MIN_PSNR


def test_batch_and_seed_reproducibility(deployments):
    deployment = deployments("sd1")
    first = deployment.generate([PROMPT, "a red cube"], num_images=2, steps=2, seed=1)
    again = deployment.generate([PROMPT, "a red cube"], num_images=2, steps=2, seed=1)
    other = deployment.generate([PROMPT, "a red cube"], num_images=2, steps=2, seed=2)
    assert len(first.images) == 4
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(first.images, again.images, strict=True)
    )
    assert psnr(first.images[0], other.images[0]) < 30


def test_diffusers_keyword_names_give_the_same_images(deployments, tiny_models):
    deployment = deployments("sd1")
    ours = deployment.generate(PROMPT, steps=2, num_images=2, seed=5, guidance_scale=6.0)
    theirs = deployment.generate(
        PROMPT,
        num_inference_steps=2,
        num_images_per_prompt=2,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(5),
    )
    assert theirs.seed == 5 and theirs.steps == 2
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(ours.images, theirs.images, strict=True)
    )
    reference = _reference(
        tiny_models["sd1"],
        prompt=PROMPT,
        num_inference_steps=2,
        num_images_per_prompt=2,
        guidance_scale=6.0,
        seed=5,
    )
    assert psnr(theirs.images[1], reference[1]) >= MIN_PSNR


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"eta": 0.3}, "generate\\(\\) does not take 'eta'"),
        ({"cross_attention_kwargs": {"scale": 0.5}}, "does not take 'cross_attention_kwargs'"),
        ({"steps": 3, "num_inference_steps": 4}, "steps=3 and num_inference_steps=4"),
        ({"seed": 1, "generator": torch.Generator("cpu").manual_seed(1)}, "seed or generator"),
        ({"generator": 7}, "CPU torch.Generator"),
        ({"generator": [torch.Generator("cpu")] * 3}, "3 generators for 1 images"),
        ({"num_inference_steps": "4"}, "must be integers"),
    ],
)
def test_unsupported_or_conflicting_names_are_refused(deployments, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        deployments("sd1").generate(PROMPT, **kwargs)


def test_progress_reports_every_step(deployments):
    seen = []
    result = deployments("sd1").generate(
        PROMPT,
        steps=3,
        seed=0,
        scheduler="euler",
        progress=lambda done, total: seen.append((done, total)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert len(result.step_seconds) == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": 0}, "steps must be between"),
        ({"steps": 100000}, "steps must be between"),
        ({"width": 100}, "width 100 is outside"),
        ({"height": 4096}, "height 4096 is outside"),
        ({"guidance_scale": -1}, "guidance scale"),
        ({"num_images": 50}, "at most 8 images"),
        ({"scheduler": "warp"}, "unknown scheduler"),
        ({"image": "/nonexistent.png"}, "does not exist"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(deployments, kwargs, message):
    with pytest.raises(InvalidRequestError, match=message):
        deployments("sd1").generate(PROMPT, **kwargs)


def test_inpainting_model_needs_image_and_mask(deployments):
    with pytest.raises(InvalidRequestError, match="inpainting model"):
        deployments("sd1-inpaint").generate(PROMPT, steps=2)


def test_not_an_image_is_refused(deployments, tmp_path):
    bogus = tmp_path / "bogus.png"
    bogus.write_text("not an image")
    with pytest.raises(InvalidRequestError, match="not a readable image"):
        deployments("sd1").generate(PROMPT, image=bogus, steps=2)
