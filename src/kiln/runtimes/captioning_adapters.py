"""Adapters for captioning: decoder sessions dressed as transformers generation models.

`CompiledBlipTextDecoder` is a weightless `PreTrainedModel` + `GenerationMixin` with BLIP's
text config. Its `forward` runs the exported decoder-with-past graph and keeps the
key/values in a transformers `EncoderDecoderCache` (self-attention ones growing by a token
per step, cross-attention ones of the image computed once by the `cross_attention_kv`
session), as `BlipTextLMHeadModel` does, so `generate()` runs unmodified:
greedy, beam search (the cache reorders itself between beams), sampling, length and
repetition controls, several sequences per input. Only the new tokens go through the graph
at each step. `CompiledOptForCausalLM` does the same for BLIP-2's OPT language model, whose
graph takes embeddings (BLIP-2 writes the image's soft prompt into the first step's).

Transformers passes `position_ids` (from the attention mask) and `logits_to_keep` to models
whose forward accepts them; these adapters accept them so generate() prepares exactly the
inputs it prepares for the PyTorch models. The cache comes as `cache` from transformers 5.24
on and as `past_key_values` before; both are taken and the output names it as the installed
transformers does (`cache_argument()`), or generate() would drop it between steps.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast
from transformers.models.blip.configuration_blip import BlipTextConfig
from transformers.models.opt.configuration_opt import OPTConfig

from kiln.errors import InvalidRequestError
from kiln.models.blip import cache_argument, cross_names, past_names, present_names
from kiln.runtimes.base import Session


class CompiledBlipTextDecoder(PreTrainedModel, GenerationMixin):
    """`BlipTextLMHeadModel` for `generate()`, backed by a `text_decoder` session."""

    config_class = BlipTextConfig
    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config: BlipTextConfig, session: Session, cross_attention: Session) -> None:
        super().__init__(config)
        self.session = session
        self.cross_attention = cross_attention
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads

    # generate() reads the device and dtype off the model; it has no weights of its own.
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _init_weights(self, module: Any) -> None:  # no weights to initialize
        pass

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **_: Any,
    ) -> CausalLMOutputWithCrossAttentions:
        if encoder_hidden_states is None:
            raise InvalidRequestError("the BLIP text decoder needs image embeddings")
        if encoder_attention_mask is not None and not bool(encoder_attention_mask.all()):
            raise InvalidRequestError("image embeddings are never padded in BLIP")
        # As BlipTextEncoder: self-attention and cross-attention caches side by side; the
        # cross-attention key/values of the image are computed on the first step only.
        cache = cache if cache is not None else past_key_values
        if not isinstance(cache, EncoderDecoderCache):
            cache = EncoderDecoderCache(cache or DynamicCache(), DynamicCache())
        cross = cache.cross_attention_cache
        if cross.get_seq_length() == 0:
            states = self.cross_attention.run_torch(encoder_hidden_states=encoder_hidden_states)
            for layer, (key, value) in enumerate(cross_names(self.num_layers)):
                cross.update(states[key], states[value], layer)
                cache.is_updated[layer] = True
        feed = {"input_ids": input_ids}
        for layer, (key, value) in enumerate(cross_names(self.num_layers)):
            feed[key], feed[value] = cross.layers[layer].keys, cross.layers[layer].values
        logits, _ = run_with_past(
            self.session,
            feed,
            input_ids.shape,
            attention_mask,
            position_ids,
            cache.self_attention_cache,
            self,
        )
        return CausalLMOutputWithCrossAttentions(
            logits=_keep(logits, logits_to_keep), **{cache_argument(): cache}
        )


class CompiledOptForCausalLM(PreTrainedModel, GenerationMixin):
    """`OPTForCausalLM` for `generate()`: a `language_model` session fed with embeddings from a
    `token_embeddings` session (BLIP-2 passes the first step's embeddings itself)."""

    config_class = OPTConfig
    main_input_name = "input_ids"
    _supports_cache_class = True

    def __init__(self, config: OPTConfig, session: Session, embeddings: Session) -> None:
        super().__init__(config)
        self.session = session
        self.embeddings = embeddings
        self.num_layers = config.num_hidden_layers
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads

    device = CompiledBlipTextDecoder.device
    dtype = CompiledBlipTextDecoder.dtype

    def _init_weights(self, module: Any) -> None:  # no weights to initialize
        pass

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings.run_torch(input_ids=input_ids.to(torch.int64))["inputs_embeds"]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        **_: Any,
    ) -> CausalLMOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise InvalidRequestError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        cache = next((c for c in (cache, past_key_values) if c is not None), None) or DynamicCache()
        if position_ids is None:
            # As OPTDecoder: positions count attended tokens (padding shifts them).
            past = cache.get_seq_length()
            mask = (
                attention_mask
                if attention_mask is not None
                else torch.ones(inputs_embeds.shape[0], past + inputs_embeds.shape[1])
            )
            position_ids = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, past:]
        logits, cache = run_with_past(
            self.session,
            {"inputs_embeds": inputs_embeds},
            inputs_embeds.shape[:2],
            attention_mask,
            position_ids,
            cache,
            self,
        )
        return CausalLMOutputWithPast(
            logits=_keep(logits, logits_to_keep), **{cache_argument(): cache}
        )


def run_with_past(
    session: Session,
    feed: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    cache: Cache | None,
    model: Any,
) -> tuple[torch.Tensor, Cache]:
    """One decoder-with-past step: cached key/values in, the new ones appended to `cache`."""
    batch, length = shape
    cache = cache if cache is not None else DynamicCache()
    past = cache.get_seq_length()
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + length, dtype=torch.int64)
    if attention_mask.dim() != 2 or attention_mask.shape[1] != past + length:
        raise InvalidRequestError(
            f"attention mask of shape {tuple(attention_mask.shape)} does not cover "
            f"{past} cached + {length} new tokens"
        )
    if position_ids is None:
        position_ids = torch.arange(past, past + length, dtype=torch.int64).expand(batch, -1)
    feed = {
        **feed,
        "position_ids": position_ids,
        "attention_mask": attention_mask[:, past:],
        "past_attention_mask": attention_mask[:, :past],
    }
    empty = torch.zeros(batch, model.num_heads, 0, model.head_dim)
    for layer, (key, value) in enumerate(past_names(model.num_layers)):
        if past:
            feed[key], feed[value] = cache.layers[layer].keys, cache.layers[layer].values
        else:
            feed[key] = feed[value] = empty
    out = session.run_torch(**feed)
    for layer, (key, value) in enumerate(present_names(model.num_layers)):
        cache.update(out[key][:, :, past:], out[value][:, :, past:], layer)
    return out["logits"], cache


def _keep(logits: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Slice logits as the PyTorch models do for `logits_to_keep` (generate asks for 1)."""
    if isinstance(logits_to_keep, int):
        return logits[:, -logits_to_keep:, :] if logits_to_keep > 0 else logits
    return logits[:, logits_to_keep, :]
