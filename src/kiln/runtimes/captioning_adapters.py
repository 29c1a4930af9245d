"""Adapters for captioning: decoder sessions dressed as transformers generation models.

`CompiledBlipTextDecoder` is a weightless `PreTrainedModel` + `GenerationMixin` with BLIP's
text config. Its `forward` runs the exported decoder-with-past graph through a `KVStream`
(`kiln.runtimes.kv_cache`): the self-attention key/values stay inside the runtime between
steps, and the cross-attention key/values of the image (the `cross_attention_kv` session,
run once per image, not per beam) are handed over once. generate() sees a
`RuntimeKVCache`, which answers its length and its beam reorders, so `generate()` runs
unmodified: greedy, beam search, sampling, length and repetition controls, several
sequences per input. Only the new tokens go through the graph at each step.
`CompiledOptForCausalLM` does the same for BLIP-2's OPT language model, whose graph takes
embeddings (BLIP-2 writes the image's soft prompt into the first step's).

Transformers passes `position_ids` (from the attention mask) and `logits_to_keep` to models
whose forward accepts them; these adapters accept them so generate() prepares exactly the
inputs it prepares for the PyTorch models. The cache comes as `cache` from transformers 5.24
on and as `past_key_values` before; both are taken and the output names it as the installed
transformers does (`cache_argument()`), or generate() would drop it between steps.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions, CausalLMOutputWithPast
from transformers.models.blip.configuration_blip import BlipTextConfig
from transformers.models.opt.configuration_opt import OPTConfig

from kiln.errors import InvalidRequestError
from kiln.models.blip import cache_argument, cross_names
from kiln.runtimes.base import Session, to_numpy
from kiln.runtimes.kv_cache import KVStream, row_groups


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
        cache = runtime_cache(cache if cache is not None else past_key_values)
        if cache is None:
            cache = RuntimeKVCache(self._open_stream(encoder_hidden_states))
        logits = run_step(
            cache, {"input_ids": input_ids}, input_ids.shape, attention_mask, position_ids
        )
        return CausalLMOutputWithCrossAttentions(
            logits=_keep(logits, logits_to_keep), **{cache_argument(): cache}
        )

    def _open_stream(self, encoder_hidden_states: torch.Tensor) -> KVStream:
        """A stream whose constants are the image's cross-attention key/values.

        generate() repeats each image's embeddings for its beams (or captions): the key/values
        are computed once per image and repeated, and reorders within an image skip them.
        """
        rows = to_numpy(encoder_hidden_states, self.cross_attention.spec, "encoder_hidden_states")
        groups = row_groups(rows)
        firsts = np.unique(groups, return_index=True)[1]
        states = self.cross_attention.run({"encoder_hidden_states": rows[firsts]})
        constants = {
            name: np.ascontiguousarray(states[name][groups])
            for pair in cross_names(self.num_layers)
            for name in pair
        }
        return self.session.open_kv_stream(constants, groups)


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
        cache = runtime_cache(cache if cache is not None else past_key_values)
        if cache is None:
            cache = RuntimeKVCache(self.session.open_kv_stream({}))
        if position_ids is None:
            # As OPTDecoder: positions count attended tokens (padding shifts them).
            past = cache.get_seq_length()
            mask = (
                attention_mask
                if attention_mask is not None
                else torch.ones(inputs_embeds.shape[0], past + inputs_embeds.shape[1])
            )
            position_ids = (torch.cumsum(mask, dim=1) * mask - 1).long()[:, past:]
        logits = run_step(
            cache,
            {"inputs_embeds": inputs_embeds},
            inputs_embeds.shape[:2],
            attention_mask,
            position_ids,
        )
        return CausalLMOutputWithPast(
            logits=_keep(logits, logits_to_keep), **{cache_argument(): cache}
        )


class RuntimeKVCache(Cache):
    """generate()'s handle on a `KVStream`: its length and beam reorders; no tensors here."""

    def __init__(self, stream: KVStream) -> None:
        super().__init__(layers=[])
        self.stream = stream

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.stream.length

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        self.stream.reorder(beam_idx.cpu().numpy())

    @property
    def is_compileable(self) -> bool:
        return False


def runtime_cache(cache: Cache | None) -> RuntimeKVCache | None:
    """The stream of an ongoing call, or None where generate() starts one (an empty cache)."""
    if isinstance(cache, RuntimeKVCache):
        return cache
    if cache is not None and cache.get_seq_length() > 0:
        raise InvalidRequestError(
            "kiln's decoders keep their key/values inside the runtime: start without a cache"
        )
    return None


def run_step(
    cache: RuntimeKVCache,
    feed: dict[str, torch.Tensor],
    shape: tuple[int, ...],
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> torch.Tensor:
    """One decoder-with-past step: the new tokens in, their logits out; the cache grows."""
    batch, length = shape
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
    spec = cache.stream.spec
    out = cache.stream.step({name: to_numpy(value, spec, name) for name, value in feed.items()})
    return torch.from_numpy(out["logits"])


def _keep(logits: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """Slice logits as the PyTorch models do for `logits_to_keep` (generate asks for 1)."""
    if isinstance(logits_to_keep, int):
        return logits[:, -logits_to_keep:, :] if logits_to_keep > 0 else logits
    return logits[:, logits_to_keep, :]
