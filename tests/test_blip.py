"""BLIP on exported tiny models: the decoder with past, caption() and match() against transformers.

Every tiny model is built and exported once for this module. The reference is transformers'
own `generate()` / `forward()` on the same processor inputs, compared token for token.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from cli_helpers import run_kiln  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    BlipForConditionalGeneration,
    BlipForImageTextRetrieval,
    BlipProcessor,
)

import kiln  # noqa: E402
from kiln.errors import InvalidRequestError, UnsupportedModelError  # noqa: E402
from kiln.models.blip import cross_names, past_names, present_names  # noqa: E402
from kiln.models.spec import Dim  # noqa: E402
from kiln.models.tiny_captioning import save_model  # noqa: E402


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory):
    return save_model("blip", tmp_path_factory.mktemp("blip") / "model", seed=0)


@pytest.fixture(scope="module")
def itm_dir(tmp_path_factory):
    return save_model("blip-itm", tmp_path_factory.mktemp("blip-itm") / "model", seed=0)


@pytest.fixture(scope="module")
def blip_artifact(blip_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("blip-artifact") / "onnx"
    kiln.export(blip_dir, out)
    return out


@pytest.fixture(scope="module")
def captioner(blip_artifact):
    return kiln.load(blip_artifact)


@pytest.fixture(scope="module")
def reference(blip_dir):
    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    return model, BlipProcessor.from_pretrained(blip_dir)


def _images():
    """Three images of different sizes and aspect ratios (the processor resizes them)."""
    rng = np.random.default_rng(0)
    sizes = [(40, 56), (32, 32), (80, 24)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _torch_generate(reference, images, prompt=None, seed=None, **options):
    model, processor = reference
    prompts = None if prompt is None else [prompt] * len(images)
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        return model.generate(**inputs, **options).tolist()


# ----------------------------------------------------------------------------------- export


def test_export_records_every_component_with_parity(blip_artifact):
    manifest = json.loads((blip_artifact / "manifest.json").read_text())
    assert manifest["family"] == "blip"
    assert manifest["model_info"]["architecture"] == "BlipForConditionalGeneration"
    assert [v["component"] for v in manifest["variants"]] == [
        "vision_encoder",
        "cross_attention_kv",
        "text_decoder",
    ]
    for variant in manifest["variants"]:
        assert variant["parity"]["passed"], variant["parity"]
    decoder = manifest["components"]["text_decoder"]
    inputs = {t["name"]: t for t in decoder["inputs"]}
    past = inputs["past_key_0"]["shape"][2]
    assert past["name"] == "past_sequence" and past["min"] == 0
    assert [t["name"] for t in decoder["outputs"]][:3] == [
        "logits",
        "present_key_0",
        "present_value_0",
    ]


def test_dim_allows_an_empty_axis_but_not_an_empty_opt():
    dim = Dim("past", 0, 8, 63)
    assert dim.accepts(0) and dim.export_size() == 8
    assert dim.accepts(dim.alternative()) and dim.alternative() != 8
    with pytest.raises(ValueError):
        Dim("bad", 0, 0, 4)
    with pytest.raises(ValueError):
        Dim("bad", -1, 2, 4)


def test_unsupported_blip_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BlipForQuestionAnswering"]})
    )
    with pytest.raises(UnsupportedModelError, match="BlipForQuestionAnswering"):
        kiln.export(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------- decoder with past


def test_decoder_with_past_matches_decoder_without_past(captioner, reference):
    """Feeding one token at a time through the cache gives the logits of a full re-run."""
    model, processor = reference
    session = captioner.sessions["text_decoder"]
    layers = model.config.text_config.num_hidden_layers
    inputs = processor(images=_images()[:2], return_tensors="pt")
    embeds = captioner.sessions["vision_encoder"].run_torch(pixel_values=inputs["pixel_values"])[
        "image_embeds"
    ]
    cross = captioner.sessions["cross_attention_kv"].run_torch(encoder_hidden_states=embeds)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 9), generator=generator)
    ids[:, 0] = model.config.text_config.bos_token_id
    length = ids.shape[1]
    empty = torch.zeros(2, model.config.text_config.num_attention_heads, 0, 8)

    def run(new_ids, start, past):
        feed = {
            "input_ids": new_ids,
            "position_ids": torch.arange(start, start + new_ids.shape[1]).expand(2, -1),
            "attention_mask": torch.ones_like(new_ids),
            "past_attention_mask": torch.ones(2, start, dtype=torch.int64),
        }
        feed.update({name: cross[name] for pair in cross_names(layers) for name in pair})
        for layer, (key, value) in enumerate(past_names(layers)):
            feed[key], feed[value] = past[layer] if past else (empty, empty)
        out = session.run_torch(**feed)
        presents = [(out[k], out[v]) for k, v in present_names(layers)]
        return out["logits"], presents

    full, _ = run(ids, 0, None)
    with torch.inference_mode():
        eager = model.text_decoder(
            input_ids=ids, encoder_hidden_states=embeds, use_cache=False
        ).logits
    assert (full - eager).abs().max() < 1e-4
    # Prompt of 3 tokens first (past length 0), then one token per step.
    logits, past = run(ids[:, :3], 0, None)
    steps = [logits]
    for position in range(3, length):
        logits, past = run(ids[:, position : position + 1], position, past)
        steps.append(logits)
    stepped = torch.cat(steps, dim=1)
    assert stepped.shape == full.shape
    assert (stepped - full).abs().max() < 1e-4
    assert past[0][0].shape[2] == length


# ---------------------------------------------------------------------------------- caption

DECODING = {
    "greedy": {},
    "beam3": {"num_beams": 3},
    "beam5": {"num_beams": 5},
    "sampling": {"do_sample": True, "top_k": 20, "top_p": 0.9, "temperature": 1.3},
}


@pytest.mark.parametrize("prompt", [None, "a photo of"])
@pytest.mark.parametrize("strategy", sorted(DECODING))
def test_caption_matches_transformers_token_for_token(captioner, reference, strategy, prompt):
    images = _images()
    options = {**DECODING[strategy], "max_new_tokens": 12}
    seed = 7 if options.get("do_sample") else None
    ours = captioner.caption(images, prompt=prompt, seed=seed, **options)
    expected = _torch_generate(reference, images, prompt=prompt, seed=seed, **options)
    assert ours.sequences == expected
    assert len(ours.captions) == len(images)
    assert all(len(c) == 1 and isinstance(c[0], str) for c in ours.captions)


def test_caption_with_one_prompt_per_image_and_padding(captioner, reference):
    model, processor = reference
    images, prompts = _images(), ["a photo of two", "what", "the red cat on a"]
    ours = captioner.caption(images, prompt=prompts, num_beams=3, max_new_tokens=10)
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        expected = model.generate(**inputs, num_beams=3, max_new_tokens=10).tolist()
    assert ours.sequences == expected


@pytest.mark.parametrize(
    "options",
    [
        {"num_beams": 5, "num_captions": 3},
        {"do_sample": True, "num_captions": 4, "seed": 3, "top_k": 0, "top_p": 0.8},
        {"num_beams": 4, "min_new_tokens": 8, "repetition_penalty": 1.5, "max_new_tokens": 9},
    ],
)
def test_caption_options_match_transformers(captioner, reference, options):
    images = _images()[:2]
    ours = captioner.caption(images, **options)
    options = dict(options)
    captions = options.pop("num_captions", 1)
    if captions > 1:
        options["num_return_sequences"] = captions
    options.setdefault("max_new_tokens", 20)
    expected = _torch_generate(reference, images, **options)
    assert ours.sequences == expected
    assert [len(c) for c in ours.captions] == [captions] * len(images)


def test_transformers_names_for_caption_options(captioner, reference):
    images = _images()[:2]
    ours = captioner.caption(images, num_beams=4, num_return_sequences=2, max_new_tokens=6)
    assert [len(c) for c in ours.captions] == [2, 2]
    assert ours.sequences == _torch_generate(
        reference, images, num_beams=4, num_return_sequences=2, max_new_tokens=6
    )
    with pytest.raises(InvalidRequestError, match="num_captions=2 and num_return_sequences=3"):
        captioner.caption(images, num_beams=4, num_captions=2, num_return_sequences=3)


def test_version_drift_is_warned_once_and_shown(blip_artifact, tmp_path):
    import shutil
    import warnings

    import transformers

    from kiln.versions import LibraryVersionWarning

    copy = tmp_path / "old"
    shutil.copytree(blip_artifact, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for variant in manifest["variants"]:
        variant["versions"]["transformers"] = "5.0.0"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    expected = f"transformers 5.0.0 made 3 variants, {transformers.__version__} is installed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        kiln.load(copy)
        kiln.load(copy)
    drift = [w for w in caught if issubclass(w.category, LibraryVersionWarning)]
    assert [str(w.message) for w in drift] == [
        f"{copy}: {expected}: outputs may differ from the parity and drift recorded"
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        kiln.load(blip_artifact)
    assert not [w for w in caught if issubclass(w.category, LibraryVersionWarning)]
    shown = run_kiln("inspect", copy)
    assert shown.returncode == 0 and expected in " ".join(shown.stdout.split())
    planned = run_kiln("doctor", copy, "--json")
    assert json.loads(planned.stdout)["version_drift"][0]["recorded"] == "5.0.0"


def test_same_seed_same_samples_different_seed_different(captioner):
    images = _images()[:1]
    first = captioner.caption(images, do_sample=True, seed=11, num_captions=3)
    again = captioner.caption(images, do_sample=True, seed=11, num_captions=3)
    other = captioner.caption(images, do_sample=True, seed=12, num_captions=3)
    assert first.sequences == again.sequences
    assert first.sequences != other.sequences


def test_caption_reads_image_files(captioner, reference, tmp_path):
    images = _images()
    paths = []
    for index, image in enumerate(images):
        path = tmp_path / f"image{index}.png"
        image.save(path)
        paths.append(path)
    ours = captioner.caption(paths, max_new_tokens=8)
    assert ours.sequences == _torch_generate(reference, images, max_new_tokens=8)


def test_bad_requests_are_clear_errors(captioner, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    buffer = tmp_path / "ok.png"
    _images()[0].save(buffer)
    corrupt.write_bytes(buffer.read_bytes()[:60])
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        ([corrupt], {}, "not a readable image"),
        ([text], {}, "not a readable image"),
        ([tmp_path / "missing.png"], {}, "does not exist"),
        ([], {}, "no images"),
        ([buffer], {"max_new_tokens": 10**9}, "max_new_tokens"),
        ([buffer], {"max_new_tokens": 0}, "max_new_tokens"),
        ([buffer], {"num_beams": 11}, "num_beams"),
        ([buffer], {"num_captions": 3}, "num_captions"),
        ([buffer], {"temperature": -1.0, "do_sample": True}, "temperature"),
        ([buffer], {"output_scores": True}, "does not take 'output_scores'"),
        ([buffer] * 9, {}, "at most 8 images"),
    ]
    for images, options, fragment in cases:
        with pytest.raises(InvalidRequestError, match=fragment):
            captioner.caption(images, **options)
    with pytest.raises(InvalidRequestError, match="one string per image"):
        captioner.caption([buffer, buffer], prompt=["a", "b", "c"])
    with pytest.raises(InvalidRequestError, match="match"):
        captioner.match(buffer, ["a cat"])


# ------------------------------------------------------------------------------------ match


@pytest.fixture(scope="module")
def matcher(itm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("itm-artifact") / "onnx"
    kiln.export(itm_dir, out)
    return kiln.load(out)


def test_match_gives_transformers_itm_and_itc(matcher, itm_dir):
    model = BlipForImageTextRetrieval.from_pretrained(itm_dir).eval()
    processor = BlipProcessor.from_pretrained(itm_dir)
    image = _images()[0]
    texts = ["a photo of a cat", "two dogs on the beach near the water", "red"]
    result = matcher.match(image, texts)
    inputs = processor(images=[image] * len(texts), text=texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        itm = torch.softmax(model(**inputs, use_itm_head=True).itm_score, dim=1)[:, 1]
        itc = model(**inputs, use_itm_head=False).itm_score[0]
    assert np.allclose(result.itm_probabilities, itm.numpy(), atol=1e-5)
    assert np.allclose(result.itc_similarities, itc.numpy(), atol=1e-5)
    assert matcher.manifest.variants[-1].parity.passed
    with pytest.raises(InvalidRequestError, match="non-empty"):
        matcher.match(image, [])
    with pytest.raises(InvalidRequestError, match="use match"):
        matcher.caption([image])
