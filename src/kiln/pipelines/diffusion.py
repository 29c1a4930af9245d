"""`generate()` on a Stable Diffusion artifact: diffusers' own pipelines around compiled parts.

diffusers supplies the schedulers, classifier-free guidance, img2img and inpainting; kiln
supplies adapters in place of the torch modules, checks the request against the compiled
shape ranges first, and reports progress and timings.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts import SUPPORT_DIR, read_json
from kiln.errors import InvalidRequestError
from kiln.models.lora import LoraFile, read_textual_inversion
from kiln.models.stable_diffusion import (
    MAX_BATCH,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    Architecture,
    DiffusionModelInfo,
)
from kiln.pipelines.deployment import Deployment
from kiln.pipelines.glue_threads import glue_on_one_thread
from kiln.pipelines.lora_at_load import LoraRequest, WeightSwitch, lora_files
from kiln.pipelines.options import take_aliases
from kiln.pipelines.schedulers import canonical_name, make_scheduler

MAX_STEPS = 500
MAX_GUIDANCE = 50.0

StepCallback = Callable[[int, int], None]
LatentsCallback = Callable[[int, int, Any], None]  # (step, total, latents tensor)
GENERATE_NAMES = (
    "prompt, negative_prompt, steps, guidance_scale, width, height, seed, num_images, "
    "scheduler, image, strength, mask_image, generator, progress, on_latents"
)


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images
    seed: int
    steps: int
    width: int
    height: int
    scheduler: str
    mode: str
    seconds: float
    step_seconds: list[float] = field(default_factory=list)

    @property
    def image(self) -> Any:
        return self.images[0]


_PIPELINE_CLASSES = {
    (False, "txt2img"): "StableDiffusionPipeline",
    (False, "img2img"): "StableDiffusionImg2ImgPipeline",
    (False, "inpaint"): "StableDiffusionInpaintPipeline",
    (True, "txt2img"): "StableDiffusionXLPipeline",
    (True, "img2img"): "StableDiffusionXLImg2ImgPipeline",
    (True, "inpaint"): "StableDiffusionXLInpaintPipeline",
}


class DiffusionDeployment(Deployment):
    """A Stable Diffusion artifact ready to generate images."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.info = DiffusionModelInfo.from_dict(self.manifest.model_info)
        self._components = self._build_components()
        self._scheduler_config = dict(self._components["scheduler"].config)
        self._pipelines: dict[str, Any] = {}
        self.weight_switch = WeightSwitch(self)

    @property
    def loras(self) -> tuple[LoraFile, ...]:
        """The LoRAs applied at load now (none: the artifact's own weights)."""
        return self.weight_switch.loras

    def set_loras(self, loras: LoraRequest) -> None:
        """Switch to exactly these LoRAs (`{"FILE": 0.8}`, `["FILE:0.8"]`; None: no LoRA).

        Only the weights a LoRA touches are recomputed and handed to the runtimes; the same
        set again costs nothing, and no LoRA gives back the stored weights exactly.
        """
        self._apply(lora_files(loras), self.weight_switch.embeddings)

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Add a textual-inversion embedding (safetensors); returns the token for prompts."""
        embedding = read_textual_inversion(Path(path), token)
        self._apply(self.weight_switch.loras, (*self.weight_switch.embeddings, embedding))
        return embedding.token

    def unload_textual_inversion(self) -> None:
        self._apply(self.weight_switch.loras, ())

    def _apply(self, loras: tuple[LoraFile, ...], embeddings: tuple) -> None:
        from transformers import CLIPTokenizer

        switch = self.weight_switch
        if loras == switch.loras and embeddings == switch.embeddings:
            return
        support = self.root / SUPPORT_DIR
        fresh = {}
        if embeddings or switch.embeddings:
            names = {TEXT_ENCODER: "tokenizer", TEXT_ENCODER_2: "tokenizer_2"}
            fresh = {
                encoder: CLIPTokenizer.from_pretrained(support / name)
                for encoder, name in names.items()
                if name in self._components
            }
        switch.apply(loras, embeddings, fresh)
        if fresh:  # the pipelines hold the old tokenizers
            self._components["tokenizer"] = fresh[TEXT_ENCODER]
            if TEXT_ENCODER_2 in fresh:
                self._components["tokenizer_2"] = fresh[TEXT_ENCODER_2]
            self._pipelines.clear()

    def _build_components(self) -> dict[str, Any]:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from diffusers.configuration_utils import FrozenDict
        from transformers import CLIPTextConfig, CLIPTokenizer

        from kiln.runtimes.adapters import TextEncoderAdapter, UNetAdapter, VaeAdapter

        support = self.root / SUPPORT_DIR
        # Every adapter reports the UNet's device: diffusers keeps latents and embeddings
        # there, so a GPU denoising loop never leaves the GPU.
        device = self.sessions[UNET].tensor_device if UNET in self.sessions else None
        scheduler_class = _scheduler_class(support)
        components: dict[str, Any] = {
            "scheduler": scheduler_class.from_pretrained(support / "scheduler"),
            "tokenizer": CLIPTokenizer.from_pretrained(support / "tokenizer"),
        }
        for name in (TEXT_ENCODER, TEXT_ENCODER_2):
            if name in self.sessions:
                config = CLIPTextConfig.from_pretrained(support / name)
                components[name] = TextEncoderAdapter(self.sessions[name], config, device)
        if TEXT_ENCODER_2 in components:
            components["tokenizer_2"] = CLIPTokenizer.from_pretrained(support / "tokenizer_2")
        if (
            UNET not in self.sessions
            or VAE_DECODER not in self.sessions
            or TEXT_ENCODER not in self.sessions
        ):
            missing = [c for c in (TEXT_ENCODER, UNET, VAE_DECODER) if c not in self.sessions]
            raise InvalidRequestError(
                f"{self.root} lacks {', '.join(missing)}; export every component to generate"
            )
        components[UNET] = UNetAdapter(
            self.sessions[UNET],
            FrozenDict(UNet2DConditionModel.load_config(support / "unet")),
            device,
        )
        components["vae"] = VaeAdapter(
            FrozenDict(AutoencoderKL.load_config(support / "vae")),
            self.sessions.get(VAE_ENCODER),
            self.sessions[VAE_DECODER],
            device,
        )
        return components

    def _pipeline(self, mode: str) -> Any:
        if mode not in self._pipelines:
            import diffusers

            xl = self.info.architecture is Architecture.SDXL
            cls = getattr(diffusers, _PIPELINE_CLASSES[(xl, mode)])
            parts = {k: v for k, v in self._components.items() if k != "scheduler"}
            parts["scheduler"] = self._components["scheduler"]
            if xl:
                index = _read_index(self.root / SUPPORT_DIR)
                parts["force_zeros_for_empty_prompt"] = index.get(
                    "force_zeros_for_empty_prompt", True
                )
                parts["add_watermarker"] = False
                if mode != "txt2img":
                    parts["requires_aesthetics_score"] = index.get(
                        "requires_aesthetics_score", False
                    )
            else:
                parts.update(
                    safety_checker=None, feature_extractor=None, requires_safety_checker=False
                )
            pipeline = cls(**parts)
            pipeline.set_progress_bar_config(disable=True)
            self._pipelines[mode] = pipeline
        return self._pipelines[mode]

    @property
    def default_size(self) -> int:
        return self.info.default_latent_size * self.info.vae_scale_factor

    def size_range(self) -> tuple[int, int, int]:
        """(min, max, multiple) for width and height in pixels."""
        dim = self.sessions[UNET].spec.dims()["latent_height"]
        scale = self.info.vae_scale_factor
        return dim.min * scale, dim.max * scale, dim.multiple_of * scale

    @glue_on_one_thread
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = None,
        steps: int = 25,
        guidance_scale: float = 7.5,
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        num_images: int = 1,
        scheduler: str | None = None,
        image: Any = None,
        strength: float = 0.8,
        mask_image: Any = None,
        generator: Any = None,
        progress: StepCallback | None = None,
        on_latents: LatentsCallback | None = None,
        **diffusers_names: Any,
    ) -> GenerationResult:
        """Text-to-image, or image-to-image with `image`, or inpainting with `image` + `mask_image`.

        The same `seed` gives the image diffusers gives with
        `generator=torch.Generator("cpu").manual_seed(seed)` for the same settings; a seeded
        CPU `generator` (or one per image) is taken as diffusers takes it, instead of `seed`.
        diffusers' names `num_inference_steps` and `num_images_per_prompt` stand for `steps`
        and `num_images`; any other name is refused. `progress(step, total)` and
        `on_latents(step, total, latents)` are called after every denoising step; either may
        raise to stop the run there (the exception propagates).
        """
        import torch

        named = take_aliases(
            "generate()",
            diffusers_names,
            {"num_inference_steps": "steps", "num_images_per_prompt": "num_images"},
            {"steps": (steps, 25), "num_images": (num_images, 1)},
            GENERATE_NAMES,
        )
        steps, num_images = named["steps"], named["num_images"]
        mode = (
            "inpaint" if mask_image is not None else "img2img" if image is not None else "txt2img"
        )
        init = _open_image(image, "image") if image is not None else None
        mask = _open_image(mask_image, "mask") if mask_image is not None else None
        if init is not None and (width is None or height is None):
            multiple = self.size_range()[2]
            width = width or max(multiple, init.width // multiple * multiple)
            height = height or max(multiple, init.height // multiple * multiple)
        width, height = width or self.default_size, height or self.default_size
        self._check_request(
            mode, prompt, steps, guidance_scale, width, height, num_images, strength
        )
        scheduler_name = canonical_name(scheduler) if scheduler else None
        pipeline = self._pipeline(mode)
        pipeline.scheduler = (
            make_scheduler(scheduler_name, self._scheduler_config)
            if scheduler_name
            else self._components["scheduler"]
        )
        if generator is not None:
            seed = _generator_seed(generator, seed, num_images * _prompt_count(prompt))
        else:
            seed = random.randrange(2**32) if seed is None else int(seed)
            generator = torch.Generator("cpu").manual_seed(seed)
        stamps: list[float] = []

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            stamps.append(time.perf_counter())
            total = pipe.num_timesteps if hasattr(pipe, "num_timesteps") else steps
            if step + 1 == total:
                # The UNet's scratch memory is not needed while the VAE decodes.
                self.sessions[UNET].release_memory()
            if progress is not None:
                progress(step + 1, total)
            if on_latents is not None:
                on_latents(step + 1, total, callback_kwargs["latents"])
            return callback_kwargs

        kwargs: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "num_inference_steps": steps,
            "guidance_scale": guidance_scale,
            "num_images_per_prompt": num_images,
            "generator": generator,
            "callback_on_step_end": on_step_end,
        }
        if mode == "txt2img":
            kwargs.update(width=width, height=height)
        else:
            kwargs.update(image=init.resize((width, height)), strength=strength)
        if mode == "inpaint":
            kwargs.update(mask_image=mask.resize((width, height)), width=width, height=height)
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                output = pipeline(**kwargs)
        finally:
            # Held between calls, every component's scratch memory would add up in the peak.
            for session in self.sessions.values():
                session.release_memory()
        seconds = time.perf_counter() - started
        step_seconds = [b - a for a, b in zip([started, *stamps], stamps, strict=False)]
        return GenerationResult(
            images=list(output.images),
            seed=seed,
            steps=steps,
            width=width,
            height=height,
            scheduler=scheduler_name or type(pipeline.scheduler).__name__,
            mode=mode,
            seconds=seconds,
            step_seconds=step_seconds,
        )

    def _check_request(
        self,
        mode: str,
        prompt: Any,
        steps: int,
        guidance: float,
        width: int,
        height: int,
        num_images: int,
        strength: float,
    ) -> None:
        if not isinstance(prompt, str) and not (
            isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt)
        ):
            raise InvalidRequestError("prompt must be a string or a non-empty list of strings")
        if not isinstance(steps, int) or not isinstance(num_images, int):
            raise InvalidRequestError("steps and num_images must be integers")
        if not 1 <= steps <= MAX_STEPS:
            raise InvalidRequestError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
        if not 0 <= guidance <= MAX_GUIDANCE:
            raise InvalidRequestError(
                f"guidance scale must be between 0 and {MAX_GUIDANCE}, got {guidance}"
            )
        low, high, multiple = self.size_range()
        for name, value in (("width", width), ("height", height)):
            if not low <= value <= high or value % multiple:
                raise InvalidRequestError(
                    f"{name} {value} is outside what this artifact was compiled for: "
                    f"{low} to {high} in steps of {multiple}"
                )
        if not 1 <= num_images * _prompt_count(prompt) <= MAX_BATCH:
            raise InvalidRequestError(f"at most {MAX_BATCH} images per call (prompts x num_images)")
        if mode != "txt2img" and not 0 < strength <= 1:
            raise InvalidRequestError(f"strength must be in (0, 1], got {strength}")
        if mode != "txt2img" and VAE_ENCODER not in self.sessions:
            raise InvalidRequestError(
                "this artifact has no vae_encoder; export it for img2img and inpainting"
            )
        if self.info.inpainting and mode != "inpaint":
            raise InvalidRequestError("this is an inpainting model: pass an init image and a mask")


def _prompt_count(prompt: str | Sequence[str]) -> int:
    return 1 if isinstance(prompt, str) else len(prompt)


def _generator_seed(generator: Any, seed: int | None, images: int) -> int:
    """The seed a caller's generator (or list of them, one per image) was seeded with."""
    import torch

    if seed is not None:
        raise InvalidRequestError("pass seed or generator, not both")
    generators = generator if isinstance(generator, list) else [generator]
    if not all(isinstance(g, torch.Generator) and g.device.type == "cpu" for g in generators):
        raise InvalidRequestError("generator must be a CPU torch.Generator or a list of them")
    if isinstance(generator, list) and len(generators) != images:
        raise InvalidRequestError(
            f"{len(generators)} generators for {images} images: pass one per image"
        )
    return generators[0].initial_seed()


def _open_image(value: Any, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value.convert("RGB") if what == "image" else value.convert("L")
    path = Path(value)
    try:
        with Image.open(path) as handle:
            handle.load()
            return handle.convert("RGB") if what == "image" else handle.convert("L")
    except FileNotFoundError:
        raise InvalidRequestError(f"{what} file {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidRequestError(f"{what} file {path} is not a readable image ({exc})") from None


def _read_index(support: Path) -> dict[str, Any]:
    return read_json(support / "model_index.json")


def _scheduler_class(support: Path) -> Any:
    import diffusers

    index = _read_index(support)
    name = index.get("scheduler", [None, "PNDMScheduler"])[1]
    return getattr(diffusers, name)
