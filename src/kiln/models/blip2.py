"""BLIP-2 with an OPT language model: component specs, export modules, loading.

Components:

- `vision_qformer`: vision encoder + Q-Former (learned queries) + language projection, one
  graph: pixels -> the soft prompt the language model reads in place of the image tokens.
- `token_embeddings`: OPT's input embedding table (token ids -> embeddings); BLIP-2 writes
  the soft prompt into the embedded prompt before the first decoding step.
- `language_model`: `OPTForCausalLM` as a decoder-with-past graph fed with embeddings; the
  self-attention key/values of every layer are inputs and outputs, the past may be empty.

Optional (`kiln export --with-attentions`), for `caption(attentions=True)`:

- `qformer_attentions`: pixels -> the Q-Former's cross-attention weights (queries over the
  image tokens), per cross-attention layer.
- `language_model_attentions`: the language model over whole captions without a cache ->
  every layer's self-attention weights; a token's weights over the soft prompt, times the
  queries' weights over the image, say where in the image that token looked.

`kiln.runtimes.captioning_adapters.CompiledOptForCausalLM` gives the language model back to
transformers' `generate()`.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import UnsupportedModelError
from kiln.models.blip import (
    DECODER_TOLERANCES,
    MAX_DECODER_BATCH,
    MAX_IMAGES,
    _default_tolerances,
    past_names,
    present_names,
)
from kiln.models.sources import SourceInfo, free_weights
from kiln.models.spec import ComponentSpec, Dim, DType, TensorSpec
from kiln.models.transformers_model import TransformersModel

if TYPE_CHECKING:
    import torch

FAMILY = "blip2"

VISION_QFORMER = "vision_qformer"
TOKEN_EMBEDDINGS = "token_embeddings"
LANGUAGE_MODEL = "language_model"
QFORMER_ATTENTIONS = "qformer_attentions"
LANGUAGE_MODEL_ATTENTIONS = "language_model_attentions"
# Which part of the model each component reads (weights are freed per part).
PARTS = {
    VISION_QFORMER: "vision",
    QFORMER_ATTENTIONS: "vision",
    TOKEN_EMBEDDINGS: "language",
    LANGUAGE_MODEL: "language",
    LANGUAGE_MODEL_ATTENTIONS: "language",
}

ARCHITECTURES = ("Blip2ForConditionalGeneration",)


@dataclass(frozen=True)
class Blip2ModelInfo:
    architecture: str
    language_model: str
    image_size: int
    num_query_tokens: int
    image_token_id: int
    embed_dim: int
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    image_tokens: int = 0  # vision tokens the Q-Former's queries attend to
    qformer_cross_layers: int = 0
    qformer_heads: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Blip2ModelInfo:
        return cls(**data)


def describe(model: Any) -> Blip2ModelInfo:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name} is not supported; kiln compiles {ARCHITECTURES[0]} and "
            "Blip2ForImageTextRetrieval"
        )
    text = model.config.text_config
    if text.model_type != "opt":
        raise UnsupportedModelError(
            f"BLIP-2 with a {text.model_type} language model is not supported yet; "
            "kiln compiles BLIP-2 with OPT"
        )
    if text.word_embed_proj_dim != text.hidden_size:
        raise UnsupportedModelError("OPT with word_embed_proj_dim != hidden_size is not supported")
    vision, qformer = model.config.vision_config, model.config.qformer_config
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    return Blip2ModelInfo(
        architecture=name,
        language_model=type(model.language_model).__name__,
        image_size=image_size,
        num_query_tokens=model.config.num_query_tokens,
        image_token_id=model.config.image_token_id,
        embed_dim=text.word_embed_proj_dim,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        head_dim=text.hidden_size // text.num_attention_heads,
        vocab_size=text.vocab_size,
        max_positions=text.max_position_embeddings,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        image_tokens=(image_size // _side(vision.patch_size)) ** 2 + 1,
        qformer_cross_layers=len(
            range(0, qformer.num_hidden_layers, qformer.cross_attention_frequency)
        ),
        qformer_heads=qformer.num_attention_heads,
    )


def _side(size: Any) -> int:
    return size if isinstance(size, int) else size[0]


def qformer_attention_names(info: Blip2ModelInfo) -> list[str]:
    return [f"qformer_cross_attention_{i}" for i in range(info.qformer_cross_layers)]


def self_attention_names(info: Blip2ModelInfo) -> list[str]:
    return [f"self_attention_{i}" for i in range(info.num_layers)]


def component_specs(info: Blip2ModelInfo) -> dict[str, ComponentSpec]:
    size, queries, embed = info.image_size, info.num_query_tokens, info.embed_dim
    vision = ComponentSpec(
        name=VISION_QFORMER,
        family=FAMILY,
        inputs=(
            TensorSpec(
                "pixel_values", DType.FLOAT32, (Dim("batch", 1, 1, MAX_IMAGES), 3, size, size)
            ),
        ),
        outputs=(TensorSpec("language_model_inputs", DType.FLOAT32, ("batch", queries, embed)),),
        description="Blip2VisionModel + Q-Former + language projection",
    )
    batch = Dim("batch", 1, 1, MAX_DECODER_BATCH)
    sequence = Dim("sequence", 1, 4, info.max_positions)
    embeddings = ComponentSpec(
        name=TOKEN_EMBEDDINGS,
        family=FAMILY,
        inputs=(TensorSpec("input_ids", DType.INT64, (batch, sequence), (0, info.vocab_size)),),
        outputs=(TensorSpec("inputs_embeds", DType.FLOAT32, ("batch", "sequence", embed)),),
        description=f"{info.language_model} input embeddings",
    )
    past = Dim("past_sequence", 0, 8, info.max_positions - 1)
    inputs = [
        TensorSpec("inputs_embeds", DType.FLOAT32, (batch, sequence, embed)),
        TensorSpec("position_ids", DType.INT64, (batch, sequence), (0, info.max_positions // 2)),
        TensorSpec("attention_mask", DType.INT64, (batch, sequence), (1, 2)),
        TensorSpec("past_attention_mask", DType.INT64, (batch, past), (0, 2)),
    ]
    outputs = [TensorSpec("logits", DType.FLOAT32, ("batch", "sequence", info.vocab_size))]
    shape = (batch, info.num_heads, past, info.head_dim)
    for key, value in past_names(info.num_layers):
        inputs += [TensorSpec(key, DType.FLOAT32, shape), TensorSpec(value, DType.FLOAT32, shape)]
    present = ("batch", info.num_heads, "total_sequence", info.head_dim)
    for key, value in present_names(info.num_layers):
        outputs += [
            TensorSpec(key, DType.FLOAT32, present),
            TensorSpec(value, DType.FLOAT32, present),
        ]
    language = ComponentSpec(
        name=LANGUAGE_MODEL,
        family=FAMILY,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        tolerances={**_default_tolerances(), **DECODER_TOLERANCES},
        description=f"{info.language_model} with self-attention key/values in and out",
    )
    return {
        VISION_QFORMER: vision,
        TOKEN_EMBEDDINGS: embeddings,
        LANGUAGE_MODEL: language,
        **_attention_specs(info),
    }


def _attention_specs(info: Blip2ModelInfo) -> dict[str, ComponentSpec]:
    size, embed = info.image_size, info.embed_dim
    images = Dim("batch", 1, 1, MAX_IMAGES)
    cross = ("batch", info.qformer_heads, info.num_query_tokens, info.image_tokens)
    qformer = ComponentSpec(
        name=QFORMER_ATTENTIONS,
        family=FAMILY,
        inputs=(TensorSpec("pixel_values", DType.FLOAT32, (images, 3, size, size)),),
        outputs=tuple(TensorSpec(n, DType.FLOAT32, cross) for n in qformer_attention_names(info)),
        description="Blip2VisionModel + Q-Former: the queries' cross-attention weights",
        optional=True,
    )
    batch = Dim("batch", 1, 1, MAX_DECODER_BATCH)
    sequence = Dim("sequence", 1, 8, info.max_positions)
    square = ("batch", info.num_heads, "sequence", "sequence")
    language = ComponentSpec(
        name=LANGUAGE_MODEL_ATTENTIONS,
        family=FAMILY,
        inputs=(
            TensorSpec("inputs_embeds", DType.FLOAT32, (batch, sequence, embed)),
            TensorSpec(
                "position_ids", DType.INT64, (batch, sequence), (0, info.max_positions // 2)
            ),
            TensorSpec("attention_mask", DType.INT64, (batch, sequence), (1, 2)),
        ),
        outputs=tuple(TensorSpec(n, DType.FLOAT32, square) for n in self_attention_names(info)),
        description=f"{info.language_model} over whole captions: self-attention weights",
        optional=True,
    )
    return {QFORMER_ATTENTIONS: qformer, LANGUAGE_MODEL_ATTENTIONS: language}


def export_module(model: Any, component: str, info: Blip2ModelInfo) -> torch.nn.Module:
    import torch

    from kiln.models.blip import cache_argument, seeded_cache

    class VisionQFormer(torch.nn.Module):
        def __init__(self, blip2: torch.nn.Module) -> None:
            super().__init__()
            self.blip2 = blip2

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            blip2 = self.blip2
            image_embeds = blip2.vision_model(pixel_values, return_dict=True).last_hidden_state
            queries = blip2.query_tokens.expand(image_embeds.shape[0], -1, -1)
            query_output = blip2.qformer(
                query_embeds=queries,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long),
                return_dict=True,
            ).last_hidden_state
            return blip2.language_projection(query_output)

    class Embeddings(torch.nn.Module):
        def __init__(self, table: torch.nn.Module) -> None:
            super().__init__()
            self.table = table

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.table(input_ids)

    class Language(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def run(self, inputs_embeds, position_ids, attention_mask, past_attention_mask, *past):
            cache = seeded_cache(self.lm.config, past)
            out = self.lm(
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask=torch.cat([past_attention_mask, attention_mask], dim=1),
                **{cache_argument(): cache},
                use_cache=True,
                return_dict=True,
            )
            presents = []
            for layer in cache.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    class QFormerAttentions(torch.nn.Module):
        def __init__(self, blip2: torch.nn.Module) -> None:
            super().__init__()
            self.blip2 = blip2
            blip2.qformer.config._attn_implementation = "eager"  # sdpa gives no weights

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
            blip2 = self.blip2
            image_embeds = blip2.vision_model(pixel_values, return_dict=True).last_hidden_state
            out = blip2.qformer(
                query_embeds=blip2.query_tokens.expand(image_embeds.shape[0], -1, -1),
                encoder_hidden_states=image_embeds,
                output_attentions=True,
                return_dict=True,
            )
            return tuple(out.cross_attentions)

    class LanguageAttentions(torch.nn.Module):
        def __init__(self, lm: torch.nn.Module) -> None:
            super().__init__()
            self.lm = lm
            lm.config._attn_implementation = "eager"  # sdpa gives no weights

        def forward(self, inputs_embeds, position_ids, attention_mask):
            out = self.lm(
                inputs_embeds=inputs_embeds,
                position_ids=position_ids,
                attention_mask=attention_mask,
                use_cache=False,
                output_attentions=True,
                return_dict=True,
            )
            return tuple(out.attentions)

    names = [t.name for t in component_specs(info)[LANGUAGE_MODEL].inputs]
    namespace: dict[str, Any] = {}
    exec(  # noqa: S102 - spec identifiers; torch.onnx needs named parameters, not *args
        f"def forward(self, {', '.join(names)}):\n    return self.run({', '.join(names)})\n",
        namespace,
    )
    Language.forward = namespace["forward"]

    wrappers = {
        VISION_QFORMER: lambda: VisionQFormer(model),
        TOKEN_EMBEDDINGS: lambda: Embeddings(model.language_model.get_input_embeddings()),
        LANGUAGE_MODEL: lambda: Language(model.language_model),
        QFORMER_ATTENTIONS: lambda: QFormerAttentions(model),
        LANGUAGE_MODEL_ATTENTIONS: lambda: LanguageAttentions(model.language_model),
    }
    if component not in wrappers:
        raise UnsupportedModelError(f"BLIP-2 has no component {component!r}")
    return wrappers[component]().eval()


class Blip2Model(TransformersModel):
    """A transformers BLIP-2 (OPT) model, split into exportable components."""

    family = FAMILY

    @classmethod
    def from_folder(cls, path: Path, source: SourceInfo, architecture: str) -> Blip2Model:
        if architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{path} holds a {architecture}; kiln compiles {ARCHITECTURES[0]}"
            )
        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        loaded = cls.load_pretrained(path, Blip2ForConditionalGeneration, Blip2Processor, "BLIP-2")
        return cls(*loaded, source)

    def describe(self, model: Any) -> Blip2ModelInfo:
        return describe(model)

    def component_specs(self) -> dict[str, ComponentSpec]:
        return component_specs(self.info)

    def export_module(self, component: str) -> torch.nn.Module:
        return export_module(self.model, component, self.info)

    def release(self, component: str) -> None:
        # The embedding table is tied to the LM head: a part goes once no component of this
        # run still needs it, in whichever order they were exported.
        self._pending.discard(component)
        needed = {PARTS[c] for c in self._pending}
        if "vision" not in needed and self.model.qformer is not None:
            for part in (
                self.model.vision_model,
                self.model.qformer,
                self.model.language_projection,
            ):
                free_weights(part)  # exporters may still reference the parameters
            self.model.vision_model = self.model.qformer = None
        if "language" not in needed and self.model.language_model is not None:
            free_weights(self.model.language_model)
            self.model.language_model = None
        gc.collect()
