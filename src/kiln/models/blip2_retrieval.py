"""BLIP-2 image-text retrieval (`Blip2ForImageTextRetrieval`): specs, export modules, loading.

The same components, under the same names, as BLIP's retrieval model, so `match()` and
`embed()` serve both:

- `vision_encoder`: pixels -> the vision tower's embeddings (which the ITM head
  cross-attends to) and the ITC image features: the Q-Former's query outputs through the
  vision projection, normalized, one vector per query.
- `text_matching`: the ITM head: queries and text through the Q-Former together,
  cross-attending to the image, then the head averaged over the queries -> 2 logits.
- `text_features`: the text alone through the Q-Former, its first token through the text
  projection, normalized. The ITC similarity is the best match over the image's queries.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import UnsupportedModelError
from kiln.models.blip import (
    MAX_IMAGES,
    MAX_TEXTS,
    TEXT_FEATURES,
    TEXT_MATCHING,
    VISION_ENCODER,
    text_inputs,
)
from kiln.models.sources import SourceInfo
from kiln.models.spec import ComponentSpec, Dim, DType, TensorSpec
from kiln.models.transformers_model import TransformersModel

if TYPE_CHECKING:
    import torch

FAMILY = "blip2"
ARCHITECTURE = "Blip2ForImageTextRetrieval"


@dataclass(frozen=True)
class Blip2RetrievalInfo:
    architecture: str
    image_size: int
    image_tokens: int
    vision_hidden_size: int
    num_query_tokens: int
    projection_dim: int
    vocab_size: int
    max_positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Blip2RetrievalInfo:
        return cls(**data)


def describe(model: Any) -> Blip2RetrievalInfo:
    if type(model).__name__ != ARCHITECTURE:
        raise UnsupportedModelError(f"{type(model).__name__} is not {ARCHITECTURE}")
    vision, qformer = model.config.vision_config, model.config.qformer_config
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    return Blip2RetrievalInfo(
        architecture=ARCHITECTURE,
        image_size=image_size,
        image_tokens=(image_size // patch) ** 2 + 1,
        vision_hidden_size=vision.hidden_size,
        num_query_tokens=model.config.num_query_tokens,
        projection_dim=model.config.image_text_hidden_size,
        vocab_size=qformer.vocab_size,
        max_positions=qformer.max_position_embeddings,
    )


def component_specs(info: Blip2RetrievalInfo) -> dict[str, ComponentSpec]:
    size, tokens, hidden = info.image_size, info.image_tokens, info.vision_hidden_size
    vision = ComponentSpec(
        name=VISION_ENCODER,
        family=FAMILY,
        inputs=(
            TensorSpec(
                "pixel_values", DType.FLOAT32, (Dim("batch", 1, 1, MAX_IMAGES), 3, size, size)
            ),
        ),
        outputs=(
            TensorSpec("image_embeds", DType.FLOAT32, ("batch", tokens, hidden)),
            TensorSpec(
                "image_features",
                DType.FLOAT32,
                ("batch", info.num_query_tokens, info.projection_dim),
            ),
        ),
        description="Blip2VisionModel, and the Q-Former queries' normalized ITC projection",
    )
    batch = Dim("batch", 1, 1, MAX_TEXTS)
    matching = ComponentSpec(
        name=TEXT_MATCHING,
        family=FAMILY,
        inputs=(
            *text_inputs(info, batch),
            TensorSpec("image_embeds", DType.FLOAT32, (batch, tokens, hidden)),
        ),
        outputs=(TensorSpec("itm_logits", DType.FLOAT32, ("batch", 2)),),
        description="BLIP-2 ITM head (queries and text through the Q-Former, on the image)",
    )
    features = ComponentSpec(
        name=TEXT_FEATURES,
        family=FAMILY,
        inputs=text_inputs(info, batch),
        outputs=(TensorSpec("text_features", DType.FLOAT32, ("batch", info.projection_dim)),),
        description="BLIP-2 Q-Former text encoding and the normalized ITC text projection",
    )
    return {VISION_ENCODER: vision, TEXT_MATCHING: matching, TEXT_FEATURES: features}


def export_module(model: Any, component: str, info: Blip2RetrievalInfo) -> torch.nn.Module:
    """As `Blip2ForImageTextRetrieval.forward`, one branch per component."""
    import torch
    from torch.nn.functional import normalize

    def queries(retrieval: Any, batch: int) -> torch.Tensor:
        return retrieval.query_tokens.expand(batch, -1, -1)

    class Vision(torch.nn.Module):
        def __init__(self, retrieval: torch.nn.Module) -> None:
            super().__init__()
            self.retrieval = retrieval

        def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            retrieval = self.retrieval
            embeds = retrieval.vision_model(pixel_values=pixel_values).last_hidden_state
            query_output = retrieval.qformer(
                query_embeds=queries(retrieval, embeds.shape[0]),
                encoder_hidden_states=embeds,
            ).last_hidden_state
            return embeds, normalize(retrieval.vision_projection(query_output), dim=-1)

    class Matching(torch.nn.Module):
        def __init__(self, retrieval: torch.nn.Module) -> None:
            super().__init__()
            self.retrieval = retrieval

        def forward(self, input_ids, attention_mask, image_embeds):
            retrieval = self.retrieval
            query = queries(retrieval, input_ids.shape[0])
            count = query.shape[1]
            mask = torch.cat([torch.ones(query.shape[:-1], dtype=torch.long), attention_mask], 1)
            hidden = retrieval.qformer(
                query_embeds=retrieval.embeddings(input_ids=input_ids, query_embeds=query),
                query_length=count,
                attention_mask=mask,
                # No image mask (transformers passes all ones): traced, an all-ones mask is
                # built at the full text length and no longer broadcasts onto the queries.
                encoder_hidden_states=image_embeds,
            ).last_hidden_state
            return retrieval.itm_head(hidden[:, :count, :]).mean(dim=1)

    class TextFeatures(torch.nn.Module):
        def __init__(self, retrieval: torch.nn.Module) -> None:
            super().__init__()
            self.retrieval = retrieval

        def forward(self, input_ids, attention_mask):
            retrieval = self.retrieval
            hidden = retrieval.qformer(
                query_embeds=retrieval.embeddings(input_ids=input_ids),
                query_length=0,
                attention_mask=attention_mask,
            ).last_hidden_state
            return normalize(retrieval.text_projection(hidden[:, 0, :]), dim=-1)

    wrappers = {VISION_ENCODER: Vision, TEXT_MATCHING: Matching, TEXT_FEATURES: TextFeatures}
    if component not in wrappers:
        raise UnsupportedModelError(f"{ARCHITECTURE} has no component {component!r}")
    return wrappers[component](model).eval()


class Blip2RetrievalModel(TransformersModel):
    """A transformers `Blip2ForImageTextRetrieval`, split into exportable components."""

    family = FAMILY

    @classmethod
    def from_folder(cls, path: Path, source: SourceInfo) -> Blip2RetrievalModel:
        from transformers import Blip2ForImageTextRetrieval, Blip2Processor

        loaded = cls.load_pretrained(path, Blip2ForImageTextRetrieval, Blip2Processor, "BLIP-2")
        return cls(*loaded, source)

    def describe(self, model: Any) -> Blip2RetrievalInfo:
        return describe(model)

    def component_specs(self) -> dict[str, ComponentSpec]:
        return component_specs(self.info)

    def export_module(self, component: str) -> torch.nn.Module:
        return export_module(self.model, component, self.info)
