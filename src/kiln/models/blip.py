"""BLIP captioning and image-text matching: component specs, export modules, loading.

Components:

- `vision_encoder`: `BlipVisionModel`, pixels -> image embeddings (every patch token).
- `cross_attention_kv` (captioning): every decoder layer's cross-attention keys/values of
  the image embeddings, computed once per `generate()` call (as transformers caches them).
- `text_decoder` (captioning): `BlipTextLMHeadModel` as a decoder-with-past graph. Inputs
  are the new tokens, their positions and attention mask, the mask of the cached tokens,
  every layer's self-attention key/values so far and the cross-attention key/values;
  outputs are the logits of the new tokens and the self-attention key/values including
  them. One graph serves the first step (past length 0) and every later step (one token).
- `vision_encoder` of a retrieval model also gives the normalized ITC image features.
- `text_matching` (retrieval): the ITM head (text encoder with cross-attention to the
  image -> 2 logits) on paired rows; `match()` pairs one image with every text.
- `text_features` (retrieval): the text encoder alone and the ITC text projection,
  normalized; with the image features it gives `match()`'s similarities and `embed()`.

Runtime side: `kiln.runtimes.captioning_adapters` turns the decoder session back into a
`GenerationMixin` model, so transformers' own `generate()` does greedy, beam search and
sampling exactly as for the PyTorch model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import UnsupportedModelError
from kiln.models.sources import SourceInfo
from kiln.models.spec import ComponentSpec, Dim, DType, Precision, TensorSpec, Tolerance
from kiln.models.transformers_model import TransformersModel

if TYPE_CHECKING:
    import torch

FAMILY = "blip"

VISION_ENCODER = "vision_encoder"
TEXT_DECODER = "text_decoder"
CROSS_ATTENTION = "cross_attention_kv"
TEXT_MATCHING = "text_matching"
TEXT_FEATURES = "text_features"
TEXT_DECODER_ATTENTIONS = "text_decoder_attentions"

CAPTIONING = "BlipForConditionalGeneration"
RETRIEVAL = "BlipForImageTextRetrieval"
ARCHITECTURES = (CAPTIONING, RETRIEVAL)

MAX_IMAGES = 8
MAX_BEAMS = 10
# Rows the decoder sees at once: images x beams (or x captions when sampling).
MAX_DECODER_BATCH = MAX_IMAGES * MAX_BEAMS
MAX_TEXTS = 64
# Logits of random-weight models reach O(10-100); budgets are relative to that.
DECODER_TOLERANCES = {Precision.FP32: Tolerance(atol=1e-4, rtol=1e-5)}


@dataclass(frozen=True)
class BlipModelInfo:
    """What the runtime needs to rebuild BLIP's generate() around the compiled parts."""

    architecture: str
    image_size: int
    image_tokens: int
    vision_hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    bos_token_id: int
    sep_token_id: int
    pad_token_id: int
    projection_dim: int = 0  # ITC feature size (retrieval models)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BlipModelInfo:
        return cls(**data)


def describe(model: Any) -> BlipModelInfo:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{name} is not supported; kiln compiles {', '.join(ARCHITECTURES)}"
        )
    vision, text = model.config.vision_config, model.config.text_config
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return BlipModelInfo(
        architecture=name,
        image_size=image_size,
        image_tokens=(image_size // patch) ** 2 + 1,
        vision_hidden_size=vision.hidden_size,
        num_layers=text.num_hidden_layers,
        num_heads=text.num_attention_heads,
        head_dim=text.hidden_size // text.num_attention_heads,
        vocab_size=text.vocab_size,
        max_positions=text.max_position_embeddings,
        bos_token_id=text.bos_token_id,
        sep_token_id=text.sep_token_id,
        pad_token_id=text.pad_token_id,
        projection_dim=model.text_proj.out_features if name == RETRIEVAL else 0,
    )


def past_names(num_layers: int) -> list[tuple[str, str]]:
    return [(f"past_key_{i}", f"past_value_{i}") for i in range(num_layers)]


def present_names(num_layers: int) -> list[tuple[str, str]]:
    return [(f"present_key_{i}", f"present_value_{i}") for i in range(num_layers)]


def cross_names(num_layers: int) -> list[tuple[str, str]]:
    return [(f"cross_key_{i}", f"cross_value_{i}") for i in range(num_layers)]


def attention_names(num_layers: int) -> list[str]:
    return [f"cross_attention_{i}" for i in range(num_layers)]


def component_specs(model: Any, info: BlipModelInfo) -> dict[str, ComponentSpec]:
    specs = {VISION_ENCODER: _vision_spec(info)}
    if info.architecture == CAPTIONING:
        specs[CROSS_ATTENTION] = _cross_attention_spec(model, info)
        specs[TEXT_DECODER] = _decoder_spec(model, info)
        specs[TEXT_DECODER_ATTENTIONS] = _decoder_attentions_spec(model, info)
    else:
        specs[TEXT_MATCHING] = _matching_spec(model, info)
        specs[TEXT_FEATURES] = _text_features_spec(info)
    return specs


def _vision_spec(info: BlipModelInfo) -> ComponentSpec:
    size = info.image_size
    outputs = [
        TensorSpec(
            "image_embeds", DType.FLOAT32, ("batch", info.image_tokens, info.vision_hidden_size)
        )
    ]
    if info.architecture == RETRIEVAL:
        outputs.append(TensorSpec("image_features", DType.FLOAT32, ("batch", info.projection_dim)))
    return ComponentSpec(
        name=VISION_ENCODER,
        family=FAMILY,
        inputs=(
            TensorSpec(
                "pixel_values",
                DType.FLOAT32,
                (Dim("batch", 1, 1, MAX_IMAGES), 3, size, size),
            ),
        ),
        outputs=tuple(outputs),
        description="BlipVisionModel (last hidden state, post-layernorm)"
        + (" and the normalized ITC image projection" if info.architecture == RETRIEVAL else ""),
    )


def _cross_attention_spec(model: Any, info: BlipModelInfo) -> ComponentSpec:
    text = model.config.text_config
    batch = Dim("batch", 1, 1, MAX_DECODER_BATCH)
    shape = ("batch", info.num_heads, info.image_tokens, info.head_dim)
    outputs = []
    for key, value in cross_names(info.num_layers):
        outputs += [TensorSpec(key, DType.FLOAT32, shape), TensorSpec(value, DType.FLOAT32, shape)]
    return ComponentSpec(
        name=CROSS_ATTENTION,
        family=FAMILY,
        inputs=(
            TensorSpec(
                "encoder_hidden_states",
                DType.FLOAT32,
                (batch, info.image_tokens, text.encoder_hidden_size),
            ),
        ),
        outputs=tuple(outputs),
        description="BLIP text decoder cross-attention key/value projections of the image",
    )


def _decoder_spec(model: Any, info: BlipModelInfo) -> ComponentSpec:
    batch = Dim("batch", 1, 1, MAX_DECODER_BATCH)
    longest = info.max_positions
    # The first step feeds the whole prompt; later steps one token each.
    sequence = Dim("sequence", 1, 4, longest)
    past = Dim("past_sequence", 0, 8, longest - 1)
    heads, head_dim = info.num_heads, info.head_dim
    inputs = [
        TensorSpec("input_ids", DType.INT64, (batch, sequence), (0, info.vocab_size)),
        TensorSpec("position_ids", DType.INT64, (batch, sequence), (0, longest // 2)),
        TensorSpec("attention_mask", DType.INT64, (batch, sequence), (1, 2)),
        TensorSpec("past_attention_mask", DType.INT64, (batch, past), (0, 2)),
    ]
    outputs = [TensorSpec("logits", DType.FLOAT32, ("batch", "sequence", info.vocab_size))]
    for key, value in past_names(info.num_layers):
        inputs += [
            TensorSpec(key, DType.FLOAT32, (batch, heads, past, head_dim)),
            TensorSpec(value, DType.FLOAT32, (batch, heads, past, head_dim)),
        ]
    cross = (batch, heads, info.image_tokens, head_dim)
    for key, value in cross_names(info.num_layers):
        inputs += [TensorSpec(key, DType.FLOAT32, cross), TensorSpec(value, DType.FLOAT32, cross)]
    for key, value in present_names(info.num_layers):
        outputs += [
            TensorSpec(key, DType.FLOAT32, ("batch", heads, "total_sequence", head_dim)),
            TensorSpec(value, DType.FLOAT32, ("batch", heads, "total_sequence", head_dim)),
        ]
    return ComponentSpec(
        name=TEXT_DECODER,
        family=FAMILY,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        tolerances={**_default_tolerances(), **DECODER_TOLERANCES},
        description="BlipTextLMHeadModel: self-attention key/values in and out, "
        "cross-attention key/values in",
    )


def _decoder_attentions_spec(model: Any, info: BlipModelInfo) -> ComponentSpec:
    text = model.config.text_config
    batch = Dim("batch", 1, 1, MAX_DECODER_BATCH)
    sequence = Dim("sequence", 1, 8, info.max_positions)
    shape = ("batch", info.num_heads, "sequence", info.image_tokens)
    return ComponentSpec(
        name=TEXT_DECODER_ATTENTIONS,
        family=FAMILY,
        inputs=(
            TensorSpec("input_ids", DType.INT64, (batch, sequence), (0, info.vocab_size)),
            TensorSpec("position_ids", DType.INT64, (batch, sequence), (0, info.max_positions)),
            TensorSpec("attention_mask", DType.INT64, (batch, sequence), (1, 2)),
            TensorSpec(
                "encoder_hidden_states",
                DType.FLOAT32,
                (batch, info.image_tokens, text.encoder_hidden_size),
            ),
        ),
        outputs=tuple(
            TensorSpec(n, DType.FLOAT32, shape) for n in attention_names(info.num_layers)
        ),
        description="BlipTextLMHeadModel over whole captions: every layer's cross-attention "
        "weights over the image tokens",
        optional=True,
    )


def text_inputs(info: Any, batch: Dim) -> tuple[TensorSpec, TensorSpec]:
    """Token ids and their mask, as the retrieval text components of BLIP and BLIP-2 take them."""
    sequence = Dim("sequence", 1, 8, info.max_positions)
    return (
        TensorSpec("input_ids", DType.INT64, (batch, sequence), (0, info.vocab_size)),
        TensorSpec("attention_mask", DType.INT64, (batch, sequence), (1, 2)),
    )


def _matching_spec(model: Any, info: BlipModelInfo) -> ComponentSpec:
    text = model.config.text_config
    batch = Dim("batch", 1, 1, MAX_TEXTS)
    return ComponentSpec(
        name=TEXT_MATCHING,
        family=FAMILY,
        inputs=(
            *text_inputs(info, batch),
            TensorSpec(
                "image_embeds", DType.FLOAT32, (batch, info.image_tokens, text.encoder_hidden_size)
            ),
        ),
        outputs=(TensorSpec("itm_logits", DType.FLOAT32, ("batch", 2)),),
        description="BLIP ITM head (text encoder with image cross-attention)",
    )


def _text_features_spec(info: BlipModelInfo) -> ComponentSpec:
    return ComponentSpec(
        name=TEXT_FEATURES,
        family=FAMILY,
        inputs=text_inputs(info, Dim("batch", 1, 1, MAX_TEXTS)),
        outputs=(TensorSpec("text_features", DType.FLOAT32, ("batch", info.projection_dim)),),
        description="BLIP text encoder and the normalized ITC text projection",
    )


def _default_tolerances() -> dict[Precision, Tolerance]:
    from kiln.models.spec import DEFAULT_TOLERANCES

    return dict(DEFAULT_TOLERANCES)


def cache_argument() -> str:
    """The keyword transformers' models and `generate()` pass the key/value cache under.

    transformers 5.24 renamed `past_key_values` to `cache` (inputs and model outputs alike);
    its models still take the old name, with a deprecation warning, but `generate()` passes
    and reads only the new one. An adapter that takes the wrong name silently decodes every
    step without its past.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = CausalLMOutputWithPast.__dataclass_fields__
    return "cache" if "cache" in fields else "past_key_values"


def seeded_cache(config: Any, states: Sequence[torch.Tensor]) -> Any:
    """A `DynamicCache` holding the given (key, value, key, value, ...) tensors per layer.

    `DynamicCache.update` on an empty layer concatenates onto a 1-D `torch.tensor([])`:
    eager PyTorch allows it, but OpenVINO's converter sees a rank-1 tensor concatenated on
    axis -2 and refuses the graph. Setting the tensors directly traces cleanly everywhere.
    """
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=config)
    for index in range(len(states) // 2):
        key, value = states[2 * index], states[2 * index + 1]
        if index >= len(cache.layers):
            cache.update(key, value, index)
            continue
        layer = cache.layers[index]
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
    return cache


def export_module(model: Any, component: str, info: BlipModelInfo) -> torch.nn.Module:
    """A module whose forward takes the spec's inputs in order and returns its outputs."""
    import torch
    from transformers.cache_utils import EncoderDecoderCache

    class Vision(torch.nn.Module):
        def __init__(self, vision: torch.nn.Module) -> None:
            super().__init__()
            self.vision = vision

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.vision(pixel_values=pixel_values).last_hidden_state

    class Decoder(torch.nn.Module):
        def __init__(self, decoder: torch.nn.Module) -> None:
            super().__init__()
            self.decoder = decoder
            self.layers = info.num_layers

        def run(self, input_ids, position_ids, attention_mask, past_attention_mask, *states):
            layers = self.layers
            past, cross = states[: 2 * layers], states[2 * layers :]
            cache = seeded_cache(self.decoder.config, past)
            cross_cache = seeded_cache(self.decoder.config, cross)
            both = EncoderDecoderCache(cache, cross_cache)
            for layer in range(layers):
                both.is_updated[layer] = True  # cross-attention reads its key/values from here
            out = self.decoder(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=torch.cat([past_attention_mask, attention_mask], dim=1),
                # Only routes the layers through cross-attention: its key/values are cached.
                encoder_hidden_states=cross[0],
                **{cache_argument(): both},
                use_cache=True,
                return_dict=True,
            )
            presents = []
            for layer in cache.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    class DecoderAttentions(torch.nn.Module):
        def __init__(self, decoder: torch.nn.Module) -> None:
            super().__init__()
            self.decoder = decoder

        def forward(self, input_ids, position_ids, attention_mask, encoder_hidden_states):
            out = self.decoder(
                input_ids=input_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                use_cache=False,
                output_attentions=True,
                return_dict=True,
            )
            return tuple(out.cross_attentions)

    class CrossAttention(torch.nn.Module):
        def __init__(self, decoder: torch.nn.Module) -> None:
            super().__init__()
            self.attentions = torch.nn.ModuleList(
                layer.crossattention.self for layer in decoder.bert.encoder.layer
            )

        def forward(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # As BlipTextSelfAttention computes them on the first step.
            shape = (*encoder_hidden_states.shape[:-1], -1, info.head_dim)
            outputs = []
            for attention in self.attentions:
                outputs += [
                    attention.key(encoder_hidden_states).view(shape).transpose(1, 2),
                    attention.value(encoder_hidden_states).view(shape).transpose(1, 2),
                ]
            return tuple(outputs)

    # torch.onnx maps dynamic axes onto forward's named parameters: no *args, so the
    # per-layer key/value inputs get a generated signature.
    names = (
        [t.name for t in _decoder_spec(model, info).inputs]
        if info.architecture == CAPTIONING
        else []
    )
    namespace: dict[str, Any] = {}
    exec(  # noqa: S102 - the names are the spec's identifiers, not user input
        f"def forward(self, {', '.join(names)}):\n    return self.run({', '.join(names)})\n",
        namespace,
    )
    Decoder.forward = namespace["forward"]

    class RetrievalVision(torch.nn.Module):
        def __init__(self, retrieval: torch.nn.Module) -> None:
            super().__init__()
            self.retrieval = retrieval

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            from torch.nn.functional import normalize

            embeds = self.retrieval.vision_model(pixel_values=pixel_values).last_hidden_state
            return embeds, normalize(self.retrieval.vision_proj(embeds[:, 0, :]), dim=-1)

    class Matching(torch.nn.Module):
        def __init__(self, retrieval: torch.nn.Module) -> None:
            super().__init__()
            self.retrieval = retrieval

        def forward(self, input_ids, attention_mask, image_embeds):
            itm = self.retrieval.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
            ).last_hidden_state
            return self.retrieval.itm_head(itm[:, 0, :])

    class TextFeatures(torch.nn.Module):
        def __init__(self, retrieval: torch.nn.Module) -> None:
            super().__init__()
            self.retrieval = retrieval

        def forward(self, input_ids, attention_mask):
            from torch.nn.functional import normalize

            itc = self.retrieval.text_encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state
            return normalize(self.retrieval.text_proj(itc[:, 0, :]), dim=-1)

    retrieval = info.architecture == RETRIEVAL
    if component == VISION_ENCODER:
        wrapper: torch.nn.Module = (
            RetrievalVision(model) if retrieval else Vision(model.vision_model)
        )
    elif component == TEXT_DECODER and info.architecture == CAPTIONING:
        wrapper = Decoder(model.text_decoder)
    elif component == TEXT_DECODER_ATTENTIONS and info.architecture == CAPTIONING:
        wrapper = DecoderAttentions(model.text_decoder)
    elif component == CROSS_ATTENTION and info.architecture == CAPTIONING:
        wrapper = CrossAttention(model.text_decoder)
    elif component == TEXT_MATCHING and retrieval:
        wrapper = Matching(model)
    elif component == TEXT_FEATURES and retrieval:
        wrapper = TextFeatures(model)
    else:
        raise UnsupportedModelError(f"{info.architecture} has no component {component!r}")
    # torch.onnx.export restores the wrapper's train flag onto the wrapped model: keep eval.
    return wrapper.eval()


class BlipModel(TransformersModel):
    """A transformers BLIP model (captioning or retrieval), split into exportable components."""

    family = FAMILY

    @classmethod
    def from_folder(cls, path: Path, source: SourceInfo, architecture: str) -> BlipModel:
        if architecture not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{path} holds a {architecture}; kiln compiles {', '.join(ARCHITECTURES)}"
            )
        import transformers

        model_class = getattr(transformers, architecture)
        return cls(
            *cls.load_pretrained(path, model_class, transformers.BlipProcessor, "BLIP"), source
        )

    def describe(self, model: Any) -> BlipModelInfo:
        return describe(model)

    def component_specs(self) -> dict[str, ComponentSpec]:
        return component_specs(self.model, self.info)

    def export_module(self, component: str) -> torch.nn.Module:
        return export_module(self.model, component, self.info)
