"""match() and embed() on BLIP and BLIP-2 retrieval artifacts, against transformers.

BLIP's `match()` parity is in test_blip.py; here: BLIP-2's ITM and ITC against
`Blip2ForImageTextRetrieval`, and `embed()` against the PyTorch features for both.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.functional import normalize
from transformers import (
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

import kiln
from kiln.errors import InvalidRequestError
from kiln.models.tiny_captioning import save_model

TEXTS = ["a photo of a cat", "two dogs on the beach near the water", "red"]
PARITY = 1e-4


def _images(count=3):
    rng = np.random.default_rng(1)
    sizes = [(40, 56), (64, 64), (23, 31), (50, 30)]
    return [
        Image.fromarray((rng.random((*sizes[i % 4], 3)) * 255).astype("uint8"))
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def blip2_itm(tmp_path_factory):
    root = tmp_path_factory.mktemp("blip2-itm")
    source = save_model("blip2-itm", root / "model", seed=0)
    kiln.export(source, root / "onnx")
    model = Blip2ForImageTextRetrieval.from_pretrained(source).eval()
    return kiln.load(root / "onnx"), model, Blip2Processor.from_pretrained(source)


@pytest.fixture(scope="module")
def blip_itm(served_blip):
    source = served_blip["blip-itm"].parent / "blip-itm"
    model = BlipForImageTextRetrieval.from_pretrained(source).eval()
    return kiln.load(served_blip["blip-itm"]), model, BlipProcessor.from_pretrained(source)


def test_blip2_match_gives_transformers_itm_and_itc(blip2_itm):
    deployment, model, processor = blip2_itm
    image = _images()[0]
    result = deployment.match(image, TEXTS)
    inputs = processor(images=[image] * len(TEXTS), text=TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
        itc = model(**inputs, use_image_text_matching_head=False).logits_per_image[0]
    expected = torch.softmax(itm, dim=1)[:, 1].numpy()
    assert np.abs(np.array(result.itm_probabilities) - expected).max() <= PARITY
    assert np.abs(np.array(result.itc_similarities) - itc.numpy()).max() <= PARITY
    # The tiny model tells the texts apart: a parity that holds for constant outputs proves little.
    assert np.ptp(result.itm_probabilities) > 1e-3 and np.ptp(result.itc_similarities) > 1e-3
    assert {v.component for v in deployment.manifest.variants} == {
        "vision_encoder",
        "text_matching",
        "text_features",
    }


def test_blip2_embed_equals_the_pytorch_features(blip2_itm):
    deployment, model, processor = blip2_itm
    images = _images(10)  # more than one vision batch (8)
    result = deployment.embed(images=images, texts=TEXTS)
    inputs = processor(
        images=images, text=[TEXTS[0]] * len(images), return_tensors="pt", padding=True
    )
    texts = processor(images=images[:3], text=TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        image_out = model(**inputs, use_image_text_matching_head=False)
        text_out = model(**texts, use_image_text_matching_head=False)
    assert result.image_features.shape == (10, 4, 16)
    assert np.abs(result.image_features - image_out.image_embeds.numpy()).max() <= PARITY
    assert np.abs(result.text_features - text_out.text_embeds.numpy()).max() <= PARITY
    # The similarity of the features is match()'s ITC score.
    matched = deployment.match(images[2], TEXTS).itc_similarities
    assert np.abs(result.similarity()[2] - np.array(matched)).max() <= 1e-5


def test_blip_embed_equals_the_pytorch_features(blip_itm):
    deployment, model, processor = blip_itm
    images = _images(3)
    result = deployment.embed(images=images, texts=TEXTS)
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    tokens = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        vision = model.vision_model(pixel_values=pixels).last_hidden_state[:, 0, :]
        text = model.text_encoder(**tokens).last_hidden_state[:, 0, :]
        image_features = normalize(model.vision_proj(vision), dim=-1).numpy()
        text_features = normalize(model.text_proj(text), dim=-1).numpy()
    assert result.image_features.shape == (3, 32)
    assert np.abs(result.image_features - image_features).max() <= PARITY
    assert np.abs(result.text_features - text_features).max() <= PARITY
    only_texts = deployment.embed(texts="a cat")
    assert only_texts.image_features is None and only_texts.text_features.shape == (1, 32)


def test_retrieval_errors_are_clear(blip2_itm, served_blip):
    deployment = blip2_itm[0]
    cases = [
        (lambda: deployment.embed(), "needs images, texts or both"),
        (lambda: deployment.embed(texts=[]), "non-empty"),
        (lambda: deployment.embed(images=[]), "no images"),
        (lambda: deployment.embed(texts=["a cat"]).similarity(), "needs both"),
        (lambda: deployment.caption([_images(1)[0]]), "use match"),
        (lambda: deployment.match(_images(1)[0], ["a"] * 65), "at most 64 texts"),
        (lambda: kiln.load(served_blip["blip"]).embed(texts="a cat"), "embed\\(\\) is for"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            call()
