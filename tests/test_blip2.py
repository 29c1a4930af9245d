"""BLIP-2 (OPT) on an exported tiny model: caption() and VQA against transformers' generate()."""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import Blip2ForConditionalGeneration, Blip2Processor  # noqa: E402

import kiln  # noqa: E402
from kiln.errors import InvalidRequestError  # noqa: E402
from kiln.models.blip import past_names, present_names  # noqa: E402
from kiln.models.tiny_captioning import save_model  # noqa: E402

QUESTION = "Question: what is in the picture? Answer:"


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return save_model("blip2-opt", tmp_path_factory.mktemp("blip2") / "model", seed=0)


@pytest.fixture(scope="module")
def blip2_artifact(blip2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("blip2-artifact") / "onnx"
    kiln.export(blip2_dir, out)
    return out


@pytest.fixture(scope="module")
def deployment(blip2_artifact):
    return kiln.load(blip2_artifact)


@pytest.fixture(scope="module")
def reference(blip2_dir):
    return (
        Blip2ForConditionalGeneration.from_pretrained(blip2_dir).eval(),
        Blip2Processor.from_pretrained(blip2_dir),
    )


def _images():
    rng = np.random.default_rng(2)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in [(50, 40), (32, 32), (20, 70)]
    ]


def _expected(reference, images, prompt=None, seed=None, **options):
    model, processor = reference
    prompts = (
        None if prompt is None else ([prompt] * len(images) if isinstance(prompt, str) else prompt)
    )
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(**inputs, **options).tolist()


def test_export_records_three_components_with_parity(blip2_artifact):
    manifest = json.loads((blip2_artifact / "manifest.json").read_text())
    assert manifest["family"] == "blip2"
    assert [v["component"] for v in manifest["variants"]] == [
        "vision_qformer",
        "token_embeddings",
        "language_model",
    ]
    assert all(v["parity"]["passed"] for v in manifest["variants"])


def test_language_model_with_past_matches_full_rerun(deployment):
    """One token at a time through the cache gives the logits of one pass over everything."""
    session, embed = deployment.sessions["language_model"], deployment.sessions["token_embeddings"]
    layers, heads = deployment.info.num_layers, deployment.info.num_heads
    head_dim = deployment.info.head_dim
    ids = torch.randint(
        0, deployment.info.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0)
    )
    embeds = embed.run_torch(input_ids=ids)["inputs_embeds"]
    empty = torch.zeros(2, heads, 0, head_dim)

    def run(start, stop, past):
        feed = {
            "inputs_embeds": embeds[:, start:stop],
            "position_ids": torch.arange(start, stop).expand(2, -1),
            "attention_mask": torch.ones(2, stop - start, dtype=torch.int64),
            "past_attention_mask": torch.ones(2, start, dtype=torch.int64),
        }
        for layer, (key, value) in enumerate(past_names(layers)):
            feed[key], feed[value] = past[layer] if past else (empty, empty)
        out = session.run_torch(**feed)
        return out["logits"], [(out[k], out[v]) for k, v in present_names(layers)]

    full, _ = run(0, 7, None)
    logits, past = run(0, 2, None)
    steps = [logits]
    for position in range(2, 7):
        logits, past = run(position, position + 1, past)
        steps.append(logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4


DECODING = {
    "greedy": {},
    "beam3": {"num_beams": 3},
    "beam5": {"num_beams": 5},
    "sampling": {"do_sample": True, "top_k": 30, "top_p": 0.95, "temperature": 0.8},
}


@pytest.mark.parametrize("prompt", [None, QUESTION])
@pytest.mark.parametrize("strategy", sorted(DECODING))
def test_caption_and_vqa_match_transformers(deployment, reference, strategy, prompt):
    images = _images()
    options = {**DECODING[strategy], "max_new_tokens": 10}
    seed = 5 if options.get("do_sample") else None
    ours = deployment.caption(images, prompt=prompt, seed=seed, **options)
    assert ours.sequences == _expected(reference, images, prompt=prompt, seed=seed, **options)
    if prompt is not None:
        assert all(c[0].startswith(QUESTION) for c in ours.captions)


def test_prompts_of_different_lengths_and_several_captions(deployment, reference):
    images, prompts = _images(), ["a", "the cat is", QUESTION]
    ours = deployment.caption(
        images, prompt=prompts, num_beams=4, num_captions=2, repetition_penalty=1.3,
        min_new_tokens=4, max_new_tokens=8,
    )  # fmt: skip
    expected = _expected(
        reference, images, prompt=prompts, num_beams=4, num_return_sequences=2,
        repetition_penalty=1.3, min_new_tokens=4, max_new_tokens=8,
    )  # fmt: skip
    assert ours.sequences == expected
    assert [len(c) for c in ours.captions] == [2, 2, 2]


def test_blip2_bad_requests(deployment):
    image = _images()[0]
    with pytest.raises(InvalidRequestError, match="max_new_tokens"):
        deployment.caption([image], max_new_tokens=10**6)
    with pytest.raises(InvalidRequestError, match="no images"):
        deployment.caption([])
    with pytest.raises(InvalidRequestError, match="retrieval"):
        deployment.match(image, ["a cat"])
