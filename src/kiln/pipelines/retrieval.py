"""`match()` and `embed()` on BLIP and BLIP-2 retrieval artifacts.

Both families export the same three components (`kiln.models.blip`,
`kiln.models.blip2_retrieval`): `vision_encoder` (image embeddings for the ITM head and the
normalized ITC image features), `text_matching` (ITM logits for image-text pairs) and
`text_features` (normalized ITC text features). BLIP has one image feature vector per
image, BLIP-2 one per Q-Former query; the ITC similarity is the best over an image's
vectors, as `Blip2ForImageTextRetrieval` computes it (for BLIP, the one cosine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiln.artifacts import SUPPORT_DIR
from kiln.errors import InvalidRequestError
from kiln.models.blip import MAX_IMAGES, MAX_TEXTS, TEXT_FEATURES, TEXT_MATCHING, VISION_ENCODER
from kiln.pipelines.deployment import Deployment
from kiln.pipelines.glue_threads import glue_on_one_thread

RETRIEVAL_COMPONENTS = (VISION_ENCODER, TEXT_MATCHING, TEXT_FEATURES)


@dataclass
class MatchResult:
    """Per text: ITM probability that it describes the image, and ITC cosine similarity."""

    texts: list[str]
    itm_probabilities: list[float]
    itc_similarities: list[float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "texts": self.texts,
            "itm_probabilities": self.itm_probabilities,
            "itc_similarities": self.itc_similarities,
            "seconds": round(self.seconds, 4),
        }


@dataclass
class EmbedResult:
    """Normalized ITC features: images (n, dim) for BLIP, (n, queries, dim) for BLIP-2;
    texts (n, dim). `similarity()` scores them as `match()` does."""

    image_features: np.ndarray | None
    text_features: np.ndarray | None
    seconds: float

    def similarity(self) -> np.ndarray:
        """(images, texts) ITC similarities: the best of each image's vectors."""
        if self.image_features is None or self.text_features is None:
            raise InvalidRequestError("similarity() needs both images and texts embedded")
        return itc_similarity(self.image_features, self.text_features)

    def to_dict(self) -> dict[str, Any]:
        def listed(array: np.ndarray | None) -> list | None:
            return None if array is None else array.tolist()

        return {
            "image_features": listed(self.image_features),
            "text_features": listed(self.text_features),
            "seconds": round(self.seconds, 4),
        }


def itc_similarity(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """(images, texts) cosine similarities; over queries, the best (BLIP-2's max)."""
    images = image_features if image_features.ndim == 3 else image_features[:, None, :]
    return np.einsum("iqd,td->iqt", images, text_features).max(axis=1)


class RetrievalDeployment(Deployment):
    """A BLIP or BLIP-2 image-text retrieval artifact."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        missing = [c for c in RETRIEVAL_COMPONENTS if c not in self.sessions]
        if missing:
            raise InvalidRequestError(
                f"{self.root} lacks {', '.join(missing)}; export every component of "
                f"{self.architecture} to match or embed"
            )
        support = self.root / SUPPORT_DIR
        if self.family == "blip2":
            from transformers import Blip2Processor as Processor
        else:
            from transformers import BlipProcessor as Processor
        self.processor = Processor.from_pretrained(support)
        self.max_positions = int(self.manifest.model_info["max_positions"])

    @property
    def architecture(self) -> str:
        return str(self.manifest.model_info["architecture"])

    can_caption = False

    def caption(self, *args: Any, **kwargs: Any) -> Any:
        raise InvalidRequestError(
            f"{self.root} holds a {self.architecture}; use match() or embed() for it"
        )

    @glue_on_one_thread
    def match(self, image: Any, texts: str | Sequence[str]) -> MatchResult:
        """ITM probability and ITC similarity of `image` against each text."""
        import torch

        from kiln.pipelines.captioning import open_images

        texts = _texts(texts)
        picture = open_images([image] if not isinstance(image, list | tuple) else image)
        if len(picture) != 1:
            raise InvalidRequestError("match() takes one image")
        tokens = self._tokens(texts)
        started = time.perf_counter()
        vision = self._vision(picture)
        itm = self.sessions[TEXT_MATCHING].run_torch(
            **tokens, image_embeds=vision["image_embeds"].expand(len(texts), -1, -1)
        )["itm_logits"]
        text_features = self.sessions[TEXT_FEATURES].run_torch(**tokens)["text_features"]
        similarities = itc_similarity(vision["image_features"].numpy(), text_features.numpy())
        return MatchResult(
            texts=texts,
            itm_probabilities=torch.softmax(itm, dim=1)[:, 1].tolist(),
            itc_similarities=similarities[0].tolist(),
            seconds=time.perf_counter() - started,
        )

    @glue_on_one_thread
    def embed(self, images: Any = None, texts: str | Sequence[str] | None = None) -> EmbedResult:
        """Normalized ITC features of any number of images and texts, for search indexes."""
        from kiln.pipelines.captioning import open_images

        if images is None and texts is None:
            raise InvalidRequestError("embed() needs images, texts or both")
        started = time.perf_counter()
        image_features = None
        if images is not None:
            items = [images] if not isinstance(images, list | tuple) else list(images)
            if not items:
                raise InvalidRequestError("no images given: pass at least one image")
            chunks = [
                self._vision(open_images(items[i : i + MAX_IMAGES]))["image_features"].numpy()
                for i in range(0, len(items), MAX_IMAGES)
            ]
            image_features = np.concatenate(chunks)
        text_features = None
        if texts is not None:
            texts = _texts(texts, limit=None)
            chunks = [
                self.sessions[TEXT_FEATURES]
                .run_torch(**self._tokens(texts[i : i + MAX_TEXTS]))["text_features"]
                .numpy()
                for i in range(0, len(texts), MAX_TEXTS)
            ]
            text_features = np.concatenate(chunks)
        return EmbedResult(image_features, text_features, time.perf_counter() - started)

    def _vision(self, pictures: list[Any]) -> dict[str, Any]:
        pixels = self.processor.image_processor(images=pictures, return_tensors="pt")
        return self.sessions[VISION_ENCODER].run_torch(pixel_values=pixels["pixel_values"])

    def _tokens(self, texts: list[str]) -> dict[str, Any]:
        # The tokenizer alone: BLIP-2's processor would prepend image tokens, which the
        # retrieval model strips again (its ITM head prepends the queries itself).
        tokens = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        if tokens["input_ids"].shape[1] > self.max_positions:
            raise InvalidRequestError(
                f"texts are limited to {self.max_positions} tokens for this model"
            )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}


def _texts(texts: str | Sequence[str], limit: int | None = MAX_TEXTS) -> list[str]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
        raise InvalidRequestError("texts must be a non-empty list of non-empty strings")
    if limit is not None and len(texts) > limit:
        raise InvalidRequestError(f"at most {limit} texts per call, got {len(texts)}")
    return texts
