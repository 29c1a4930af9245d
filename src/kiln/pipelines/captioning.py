"""`caption()` on a BLIP or BLIP-2 artifact: transformers' own decoding around compiled parts.

transformers supplies the processor (resizing, normalization, tokenization) and
`generate()` (greedy, beam search, sampling, length and repetition controls); kiln supplies
the vision session, the decoder adapter, request checks against the compiled ranges, and
the few lines of `BlipForConditionalGeneration.generate` that set up the decoder's prompt.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.artifacts import SUPPORT_DIR
from kiln.errors import InvalidRequestError, first_line
from kiln.models.blip import (
    CROSS_ATTENTION,
    MAX_BEAMS,
    MAX_IMAGES,
    TEXT_DECODER,
    TEXT_DECODER_ATTENTIONS,
    VISION_ENCODER,
    BlipModelInfo,
    attention_names,
)
from kiln.pipelines.attention_maps import TokenAttentions, token_attentions
from kiln.pipelines.deployment import Deployment
from kiln.pipelines.glue_threads import glue_on_one_thread
from kiln.pipelines.options import take_aliases

# Generation options passed through to transformers' generate() (after the checks below).
GENERATION_OPTIONS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "max_length",
        "min_length",
        "num_beams",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "repetition_penalty",
        "length_penalty",
        "no_repeat_ngram_size",
        "early_stopping",
        "num_beam_groups",
        "diversity_penalty",
    }
)
DEFAULT_MAX_NEW_TOKENS = 20


@dataclass
class CaptionResult:
    """Captions per image (`num_captions` each), the token ids behind them, timings."""

    captions: list[list[str]]
    sequences: list[list[int]]
    seconds: float
    vision_seconds: float
    options: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    # With `attentions=True`: per image, per caption, each new token's cross-attention.
    attentions: list[list[TokenAttentions]] | None = None

    @property
    def caption(self) -> str:
        return self.captions[0][0]

    def to_dict(self) -> dict[str, Any]:
        extra = {}
        if self.attentions is not None:
            extra["attentions"] = [[a.to_dict() for a in per] for per in self.attentions]
        return {
            **extra,
            "captions": self.captions,
            "sequences": self.sequences,
            "seconds": round(self.seconds, 4),
            "vision_seconds": round(self.vision_seconds, 4),
            "options": self.options,
            "seed": self.seed,
        }


@dataclass
class Generated:
    """What generate() made and what it read: sequences (prompt included), the image side
    the decoder attended to, the prompt and its mask (None when no prompt was given)."""

    sequences: Any
    vision_seconds: float
    image_embeds: Any
    input_ids: Any
    attention_mask: Any
    pixel_values: Any = None


def generation_positions(mask: Any, prompt: int) -> Any:
    """Position ids as transformers' generate() gives them: the prompt's from its mask
    (padding at 0), each new token one past the previous position."""
    import torch

    positions = (mask[:, :prompt].cumsum(-1) - 1).masked_fill(mask[:, :prompt] == 0, 0)
    new = torch.arange(1, mask.shape[1] - prompt + 1).expand(mask.shape[0], -1)
    return torch.cat([positions, positions[:, -1:] + new], dim=1)


class CaptioningDeployment(Deployment):
    """A BLIP captioning artifact: `caption()` (retrieval models: `kiln.pipelines.retrieval`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from transformers import BlipConfig, BlipProcessor

        self.info = BlipModelInfo.from_dict(self.manifest.model_info)
        support = self.root / SUPPORT_DIR
        self.config = BlipConfig.from_pretrained(support)
        self.processor = BlipProcessor.from_pretrained(support)
        if VISION_ENCODER not in self.sessions:
            raise InvalidRequestError(f"{self.root} lacks the vision_encoder; export it")
        self._decoder: Any = None

    @property
    def decoder(self) -> Any:
        if self._decoder is None:
            from kiln.runtimes.captioning_adapters import CompiledBlipTextDecoder

            if TEXT_DECODER not in self.sessions or CROSS_ATTENTION not in self.sessions:
                raise InvalidRequestError(
                    f"{self.root} lacks the text_decoder or cross_attention_kv; export every "
                    "component of the BlipForConditionalGeneration to caption"
                )
            self._decoder = CompiledBlipTextDecoder(
                self.config.text_config, self.sessions[TEXT_DECODER], self.sessions[CROSS_ATTENTION]
            )
        return self._decoder

    # ------------------------------------------------------------------------------ caption

    @glue_on_one_thread
    def caption(
        self,
        images: Any,
        prompt: str | Sequence[str] | None = None,
        *,
        seed: int | None = None,
        num_captions: int = 1,
        attentions: bool = False,
        **generation_options: Any,
    ) -> CaptionResult:
        """Caption each image (conditionally on `prompt`: one string, or one per image).

        Options are transformers' generation options, under transformers' names (`num_beams`,
        `max_new_tokens`, `do_sample`, `temperature`, `top_k`, `top_p`, `repetition_penalty`,
        ..., and `num_return_sequences` for `num_captions`); others are refused by name. With
        the same `seed` (sampling draws from torch's global generator, seeded here) the tokens
        are those of `BlipForConditionalGeneration.generate` on the same processor inputs.

        `attentions=True` (an artifact exported `--with-attentions`) also returns, for every
        new token of every caption, each layer's cross-attention weights over the image.
        """
        if attentions:
            self._check_attentions()
        pictures = open_images(images)
        prompts = _prompts(prompt, len(pictures))
        options = self._generation_options(num_captions, generation_options)
        started = time.perf_counter()
        try:
            generated = self._generate(pictures, prompts, options, seed)
        except ValueError as exc:  # transformers validates generation options this way
            raise InvalidRequestError(f"invalid generation options: {first_line(exc)}") from None
        sequences = generated.sequences
        per = options.get("num_return_sequences", 1)
        weights = self._attentions(generated, per) if attentions else None
        seconds = time.perf_counter() - started
        texts = self.processor.batch_decode(sequences, skip_special_tokens=True)
        return CaptionResult(
            captions=[
                [t.strip() for t in texts[i * per : (i + 1) * per]] for i in range(len(pictures))
            ],
            sequences=sequences.tolist(),
            seconds=seconds,
            vision_seconds=generated.vision_seconds,
            options=options,
            seed=seed,
            attentions=None
            if weights is None
            else [weights[i * per : (i + 1) * per] for i in range(len(pictures))],
        )

    def _check_attentions(self) -> None:
        if not self.has_component(TEXT_DECODER_ATTENTIONS):
            raise InvalidRequestError(
                f"{self.root} has no decoder with attention outputs; export it with "
                "`kiln export SOURCE -o ARTIFACT --with-attentions`"
            )

    def _attentions(self, generated: Generated, per: int) -> list[TokenAttentions]:
        """Run the attention decoder once over the finished captions (teacher-forced)."""
        import torch

        sequences = generated.sequences
        prompt = generated.input_ids.shape[1]
        mask = torch.ones_like(sequences)
        if generated.attention_mask is not None:
            mask[:, :prompt] = generated.attention_mask.repeat_interleave(per, dim=0)
        out = self.session(TEXT_DECODER_ATTENTIONS).run_torch(
            input_ids=sequences[:, :-1],
            position_ids=generation_positions(mask, prompt)[:, :-1],
            attention_mask=mask[:, :-1],
            encoder_hidden_states=generated.image_embeds.repeat_interleave(per, dim=0),
        )
        layers = torch.stack([out[n] for n in attention_names(self.info.num_layers)], dim=1)
        special = {self.info.sep_token_id, self.info.pad_token_id, self.info.bos_token_id}
        return [
            token_attentions(self.processor.tokenizer, row, prompt, layers[i], special)
            for i, row in enumerate(sequences.tolist())
        ]

    can_caption = True  # calibration and the server tell captioners from matchers by it

    def _generate(
        self,
        pictures: list[Any],
        prompts: list[str] | None,
        options: dict[str, Any],
        seed: int | None,
    ) -> Generated:
        """BLIP: vision session, then the decoder adapter's generate()."""
        import torch

        inputs = self.processor(
            images=pictures, text=prompts, return_tensors="pt", padding=prompts is not None
        )
        prompt_length = inputs["input_ids"].shape[1] - 1 if prompts is not None else 1
        self._check_lengths(prompt_length, options)
        started = time.perf_counter()
        image_embeds = self.sessions[VISION_ENCODER].run_torch(pixel_values=inputs["pixel_values"])[
            "image_embeds"
        ]
        vision_seconds = time.perf_counter() - started
        # As BlipForConditionalGeneration.generate: the prompt starts with BOS instead of
        # [CLS] and loses its trailing [SEP]; decoding stops at [SEP].
        text = self.config.text_config
        batch = image_embeds.shape[0]
        if prompts is None:
            input_ids = torch.tensor([[text.bos_token_id]] * batch, dtype=torch.int64)
            attention_mask = None
        else:
            input_ids = inputs["input_ids"].clone()
            input_ids[:, 0] = text.bos_token_id
            input_ids = input_ids[:, :-1]
            attention_mask = inputs["attention_mask"][:, :-1]
        if seed is not None:
            torch.manual_seed(int(seed))
        with torch.inference_mode():
            sequences = self.decoder.generate(
                input_ids=input_ids,
                eos_token_id=text.sep_token_id,
                pad_token_id=text.pad_token_id,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.int64),
                **options,
            )
        return Generated(sequences, vision_seconds, image_embeds, input_ids, attention_mask)

    def _generation_options(self, num_captions: int, given: dict[str, Any]) -> dict[str, Any]:
        options = {k: v for k, v in given.items() if v is not None and k in GENERATION_OPTIONS}
        num_captions = take_aliases(
            "caption()",
            {k: v for k, v in given.items() if k not in GENERATION_OPTIONS},
            {"num_return_sequences": "num_captions"},
            {"num_captions": (num_captions, 1)},
            f"images, prompt, seed, num_captions, {', '.join(sorted(GENERATION_OPTIONS))}",
        )["num_captions"]
        if "max_new_tokens" not in options and "max_length" not in options:
            options["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
        beams = options.get("num_beams", 1)
        if not isinstance(beams, int) or not 1 <= beams <= MAX_BEAMS:
            raise InvalidRequestError(f"num_beams must be between 1 and {MAX_BEAMS}, got {beams}")
        if not isinstance(num_captions, int) or not 1 <= num_captions <= MAX_BEAMS:
            raise InvalidRequestError(
                f"num_captions must be between 1 and {MAX_BEAMS}, got {num_captions}"
            )
        if num_captions > beams and not options.get("do_sample"):
            raise InvalidRequestError(
                f"num_captions ({num_captions}) needs at least as many beams, or do_sample"
            )
        if num_captions > 1:
            options["num_return_sequences"] = num_captions
        for name, low, high in (
            ("temperature", 1e-3, 100.0),
            ("top_p", 1e-6, 1.0),
            ("repetition_penalty", 1e-3, 100.0),
        ):
            if name in options and not low <= float(options[name]) <= high:
                raise InvalidRequestError(f"{name} must be in [{low}, {high}], got {options[name]}")
        if "top_k" in options and int(options["top_k"]) < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {options['top_k']}")
        return options

    def _check_lengths(self, prompt_length: int, options: dict[str, Any]) -> None:
        """Refuse lengths the decoder cannot reach (position embeddings) before running."""
        room = self.info.max_positions - prompt_length
        if "max_new_tokens" in options:
            new = options["max_new_tokens"]
            if not isinstance(new, int) or not 1 <= new <= room:
                raise InvalidRequestError(
                    f"max_new_tokens must be between 1 and {room} for this model and prompt "
                    f"({self.info.max_positions} positions, prompt of {prompt_length}), got {new}"
                )
        if "max_length" in options:
            total = options["max_length"]
            if not isinstance(total, int) or not prompt_length < total <= self.info.max_positions:
                raise InvalidRequestError(
                    f"max_length must be between {prompt_length + 1} and "
                    f"{self.info.max_positions}, got {total}"
                )
        for name in ("min_new_tokens", "min_length"):
            if name in options and (not isinstance(options[name], int) or options[name] < 0):
                raise InvalidRequestError(f"{name} must be a non-negative integer")


class Blip2CaptioningDeployment(CaptioningDeployment):
    """A BLIP-2 (OPT) artifact: captions, and answers when the prompt is a question (VQA)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Deployment.__init__(self, *args, **kwargs)
        from transformers import Blip2Config, Blip2Processor

        from kiln.models.blip2 import (
            LANGUAGE_MODEL,
            TOKEN_EMBEDDINGS,
            VISION_QFORMER,
            Blip2ModelInfo,
        )

        self.info = Blip2ModelInfo.from_dict(self.manifest.model_info)  # type: ignore[assignment]
        support = self.root / SUPPORT_DIR
        self.config = Blip2Config.from_pretrained(support)
        self.processor = Blip2Processor.from_pretrained(support)
        missing = [
            c for c in (VISION_QFORMER, TOKEN_EMBEDDINGS, LANGUAGE_MODEL) if c not in self.sessions
        ]
        if missing:
            raise InvalidRequestError(
                f"{self.root} lacks {', '.join(missing)}; export every component to caption"
            )
        from kiln.runtimes.captioning_adapters import CompiledOptForCausalLM

        self.vision = self.sessions[VISION_QFORMER]
        self._decoder = CompiledOptForCausalLM(
            self.config.text_config, self.sessions[LANGUAGE_MODEL], self.sessions[TOKEN_EMBEDDINGS]
        )

    def _generate(
        self,
        pictures: list[Any],
        prompts: list[str] | None,
        options: dict[str, Any],
        seed: int | None,
    ) -> Generated:
        """As Blip2ForConditionalGeneration.generate: the soft prompt replaces the image
        tokens of the embedded prompt, then the language model's generate() runs."""
        import torch

        info = self.info
        inputs = self.processor(
            images=pictures, text=prompts, return_tensors="pt", padding=prompts is not None
        )
        batch = len(pictures)
        if prompts is None:
            start = [info.image_token_id] * info.num_query_tokens + [info.bos_token_id]
            input_ids = torch.tensor([start] * batch, dtype=torch.int64)
            attention_mask = torch.ones_like(input_ids)
        else:
            input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        self._check_lengths(input_ids.shape[1], options)
        started = time.perf_counter()
        soft_prompt = self.vision.run_torch(pixel_values=inputs["pixel_values"])[
            "language_model_inputs"
        ]
        vision_seconds = time.perf_counter() - started
        embeds = self._decoder.embed(input_ids)
        image_positions = (input_ids == info.image_token_id).unsqueeze(-1)
        if int(image_positions.sum()) != soft_prompt.numel() // soft_prompt.shape[-1]:
            raise InvalidRequestError(
                "the prompt holds image tokens of its own; pass plain text as the prompt"
            )
        embeds = embeds.masked_scatter(image_positions, soft_prompt)
        if seed is not None:
            torch.manual_seed(int(seed))
        with torch.inference_mode():
            sequences = self._decoder.generate(
                inputs_embeds=embeds, attention_mask=attention_mask, input_ids=input_ids, **options
            )
        return Generated(
            sequences,
            vision_seconds,
            soft_prompt,
            input_ids,
            attention_mask,
            inputs["pixel_values"],
        )

    def _check_attentions(self) -> None:
        from kiln.models.blip2 import LANGUAGE_MODEL_ATTENTIONS, QFORMER_ATTENTIONS

        if not all(self.has_component(c) for c in (QFORMER_ATTENTIONS, LANGUAGE_MODEL_ATTENTIONS)):
            super()._check_attentions()  # the same refusal as BLIP's

    def _attentions(self, generated: Generated, per: int) -> list[TokenAttentions]:
        """Each new token's language-model attention to the soft prompt, carried onto the
        image by the Q-Former queries' cross-attention (averaged over its layers and heads)."""
        import torch

        from kiln.models.blip2 import (
            LANGUAGE_MODEL_ATTENTIONS,
            QFORMER_ATTENTIONS,
            qformer_attention_names,
            self_attention_names,
        )

        info, sequences = self.info, generated.sequences
        prompt = generated.input_ids.shape[1]
        mask = torch.ones_like(sequences)
        mask[:, :prompt] = generated.attention_mask.repeat_interleave(per, dim=0)
        inputs = sequences[:, :-1]
        image_positions = (inputs == info.image_token_id).unsqueeze(-1)
        soft_prompt = generated.image_embeds.repeat_interleave(per, dim=0)
        lm = self.session(LANGUAGE_MODEL_ATTENTIONS).run_torch(
            inputs_embeds=self._decoder.embed(inputs).masked_scatter(image_positions, soft_prompt),
            position_ids=generation_positions(mask, prompt)[:, :-1],
            attention_mask=mask[:, :-1],
        )
        qformer = self.session(QFORMER_ATTENTIONS).run_torch(pixel_values=generated.pixel_values)
        queries = torch.stack([qformer[n] for n in qformer_attention_names(info)]).mean(dim=(0, 2))
        queries = queries.repeat_interleave(per, dim=0)  # (rows, queries, image tokens)
        layers = torch.stack([lm[n] for n in self_attention_names(info)], dim=1)
        special = {info.eos_token_id, info.pad_token_id, info.bos_token_id, info.image_token_id}
        out = []
        for index, row in enumerate(sequences.tolist()):
            columns = image_positions[index, :, 0].nonzero().flatten()
            onto = torch.einsum("lhqk,kp->lhqp", layers[index][:, :, :, columns], queries[index])
            out.append(token_attentions(self.processor.tokenizer, row, prompt, onto, special))
        return out


def open_images(images: Any) -> list[Any]:
    """PIL RGB images from paths or PIL images; InvalidRequestError for anything else."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(images, str | Path | Image.Image):
        images = [images]
    try:
        items = list(images)
    except TypeError:
        raise InvalidRequestError("images must be a list of image files or PIL images") from None
    if not items:
        raise InvalidRequestError("no images given: pass at least one image")
    if len(items) > MAX_IMAGES:
        raise InvalidRequestError(f"at most {MAX_IMAGES} images per call, got {len(items)}")
    opened = []
    for item in items:
        if isinstance(item, Image.Image):
            opened.append(item.convert("RGB"))
            continue
        if not isinstance(item, str | Path):
            raise InvalidRequestError(
                f"images must be file paths or PIL images, got {type(item).__name__}"
            )
        path = Path(item)
        try:
            with Image.open(path) as handle:
                handle.load()
                opened.append(handle.convert("RGB"))
        except FileNotFoundError:
            raise InvalidRequestError(f"image file {path} does not exist") from None
        except IsADirectoryError:
            raise InvalidRequestError(f"image file {path} is a directory") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise InvalidRequestError(
                f"image file {path} is not a readable image ({type(exc).__name__}: {exc})"
            ) from None
    return opened


def _prompts(prompt: str | Sequence[str] | None, count: int) -> list[str] | None:
    if prompt is None:
        return None
    if isinstance(prompt, str):
        return [prompt] * count
    prompts = list(prompt)
    if len(prompts) != count or not all(isinstance(p, str) for p in prompts):
        raise InvalidRequestError(
            f"prompt must be one string or one string per image ({count}), got {len(prompts)}"
        )
    return prompts
