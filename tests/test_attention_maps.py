"""Cross-attention maps: the optional BLIP decoder with attention outputs, caption(attentions=True)
against transformers' `output_attentions`, and `kiln caption --attention-map`."""

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import assert_user_error, run_kiln
from PIL import Image
from transformers import BlipForConditionalGeneration, BlipProcessor

import kiln
from kiln.errors import InvalidRequestError

PARITY = 1e-4


@pytest.fixture(scope="module")
def blip_source(served_blip):
    return served_blip["blip"].parent / "blip"


@pytest.fixture(scope="module")
def with_attentions(served_blip, blip_source, tmp_path_factory):
    """The served BLIP artifact plus the attention decoder, exported into a copy."""
    out = tmp_path_factory.mktemp("attentions") / "blip"
    shutil.copytree(served_blip["blip"], out)
    kiln.export(blip_source, out, components=["text_decoder_attentions"])
    return out


@pytest.fixture(scope="module")
def reference(blip_source):
    model = BlipForConditionalGeneration.from_pretrained(blip_source).eval()
    return model, BlipProcessor.from_pretrained(blip_source)


def _images():
    rng = np.random.default_rng(3)
    return [
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for h, w in ((40, 56), (48, 48))
    ]


def _expected(reference, images, prompt, options):
    """transformers: generate(), then the decoder's cross-attentions over each sequence."""
    model, processor = reference
    prompts = None if prompt is None else [prompt] * len(images)
    inputs = processor(images=images, text=prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        sequences = model.generate(**inputs, **options)
        embeds = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        per = sequences.shape[0] // len(images)
        out = model.text_decoder(
            input_ids=sequences[:, :-1],
            encoder_hidden_states=embeds.repeat_interleave(per, dim=0),
            output_attentions=True,
            return_dict=True,
        )
    # (rows, layers, heads, queries, image tokens)
    return sequences, torch.stack(out.cross_attentions, dim=1)


@pytest.mark.parametrize(
    ("prompt", "options"),
    [(None, {}), (None, {"num_beams": 3}), ("a photo of", {"num_beams": 3, "num_captions": 2})],
    ids=["greedy", "beam3", "beam3-prompt-2-captions"],
)
def test_attention_weights_equal_transformers_cross_attentions(
    with_attentions, reference, prompt, options
):
    deployment = kiln.load(with_attentions)
    images = _images()
    result = deployment.caption(images, prompt=prompt, attentions=True, max_new_tokens=8, **options)
    generate_options = {**options, "max_new_tokens": 8}
    if "num_captions" in generate_options:
        generate_options["num_return_sequences"] = generate_options.pop("num_captions")
    sequences, expected = _expected(reference, images, prompt, generate_options)
    assert result.sequences == sequences.tolist()
    info = deployment.info
    special = {info.sep_token_id, info.pad_token_id, info.bos_token_id}
    # BOS, then the prompt's tokens without [CLS] and [SEP] (as BLIP's generate() builds it).
    prompt_length = 1 if prompt is None else len(reference[1].tokenizer(prompt).input_ids) - 1
    per = len(result.captions[0])
    for row, sequence in enumerate(result.sequences):
        got = result.attentions[row // per][row % per]
        kept = [p for p in range(prompt_length, len(sequence)) if sequence[p] not in special]
        want = expected[row][:, :, [p - 1 for p in kept], :].permute(2, 0, 1, 3).numpy()
        assert got.weights.shape == want.shape == (len(kept), 2, 4, 17)
        assert np.abs(got.weights - want).max() <= PARITY
        assert np.allclose(got.weights.sum(axis=-1), 1.0, atol=1e-5)  # softmax rows
        assert len(got.tokens) == len(kept)
    # The lean decoder stayed lean and the attention decoder opened only when asked.
    assert "text_decoder_attentions" in deployment.sessions
    assert "text_decoder_attentions" not in kiln.load(with_attentions).sessions


def test_attention_map_is_written_for_every_word(with_attentions, tmp_path):
    image = tmp_path / "scene.png"
    _images()[0].save(image)
    out = tmp_path / "maps" / "scene-attention.png"
    result = run_kiln(
        "caption", with_attentions, image, "--attention-map", out, "--max-new-tokens", "6", "--json"
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    attention = data["attentions"][0][0]
    starts = attention["word_starts"]
    assert len(starts) == len(attention["tokens"])
    # Word pieces join the word before them (a leading piece is a word of its own).
    words = [i for i, start in enumerate(starts) if i == 0 or start]
    assert len(attention["weights_by_layer"][0]) == 2  # per token: one row per layer
    picture = Image.open(out)
    columns = min(len(words) + 1, 6)
    rows = -(-(len(words) + 1) // columns)
    assert picture.size == (columns * 160, 24 + rows * (160 + 18))
    # Each word panel differs from the plain image (a heat map is drawn on it).
    plain = np.asarray(picture.crop((0, 24, 160, 184)), dtype=np.int16)
    for index in range(1, len(words) + 1):
        x, y = (index % columns) * 160, 24 + (index // columns) * 178
        panel = np.asarray(picture.crop((x, y, x + 160, y + 160)), dtype=np.int16)
        assert np.abs(panel - plain).max() > 0, index


def test_attentions_need_the_attention_export(served_blip, blip_source, tmp_path):
    lean = kiln.load(served_blip["blip"])
    with pytest.raises(InvalidRequestError, match="--with-attentions"):
        lean.caption(_images()[:1], attentions=True)
    image = tmp_path / "scene.png"
    _images()[0].save(image)
    assert_user_error(
        run_kiln("caption", served_blip["blip"], image, "--attention-map", tmp_path / "m.png"),
        "no decoder with attention outputs",
        "--with-attentions",
    )
    assert not (tmp_path / "m.png").exists()
    assert_user_error(
        run_kiln("caption", served_blip["blip"], tmp_path, "--attention-map", tmp_path / "m.png"),
        "--attention-map is for image files",
    )
    retrieval = kiln.load(served_blip["blip-itm"])
    assert "text_decoder_attentions" not in retrieval.manifest.components


def test_with_attentions_is_refused_for_models_without_that_decoder(served_blip, tmp_path):
    source = served_blip["blip-itm"].parent / "blip-itm"
    assert_user_error(
        run_kiln("export", source, "-o", tmp_path / "out", "--with-attentions"),
        "no decoder with attention outputs",
    )
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------- BLIP-2


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    from transformers import Blip2ForConditionalGeneration

    from kiln.models.tiny_captioning import save_model

    root = tmp_path_factory.mktemp("blip2-attentions")
    source = save_model("blip2-opt", root / "model", seed=0)
    kiln.export(source, root / "onnx", with_attentions=True)
    # Eager attention: transformers' sdpa path returns no weights.
    model = Blip2ForConditionalGeneration.from_pretrained(source, attn_implementation="eager")
    return kiln.load(root / "onnx"), model.eval()


@pytest.mark.parametrize(
    "options", [{}, {"num_beams": 3, "num_captions": 2}], ids=["greedy", "beam3"]
)
def test_blip2_attention_weights_equal_transformers(blip2, options):
    """Language-model attention to the soft prompt times the Q-Former's cross-attention."""
    deployment, model = blip2
    info = deployment.info
    images = _images()
    result = deployment.caption(images, attentions=True, max_new_tokens=6, **options)
    sequences = torch.tensor(result.sequences)
    per = len(result.captions[0])
    pixels = deployment.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        out = model(
            pixel_values=pixels.repeat_interleave(per, dim=0),
            input_ids=sequences[:, :-1],
            attention_mask=torch.ones_like(sequences[:, :-1]),
            output_attentions=True,
            return_dict=True,
        )
        embeds = model.vision_model(pixel_values=pixels).last_hidden_state
        qformer = model.qformer(
            query_embeds=model.query_tokens.expand(len(images), -1, -1),
            encoder_hidden_states=embeds,
            output_attentions=True,
            return_dict=True,
        )
    language = torch.stack(out.language_model_outputs.attentions, dim=1)
    queries = torch.stack(qformer.cross_attentions).mean(dim=(0, 2)).repeat_interleave(per, 0)
    prompt = info.num_query_tokens + 1  # the image tokens, then BOS
    special = {info.eos_token_id, info.pad_token_id, info.image_token_id}
    for row, sequence in enumerate(result.sequences):
        columns = [p for p in range(len(sequence) - 1) if sequence[p] == info.image_token_id]
        onto = torch.einsum("lhqk,kp->lhqp", language[row][:, :, :, columns], queries[row])
        kept = [p for p in range(prompt, len(sequence)) if sequence[p] not in special]
        want = onto[:, :, [p - 1 for p in kept], :].permute(2, 0, 1, 3).numpy()
        got = result.attentions[row // per][row % per]
        assert got.weights.shape == want.shape and len(kept) > 0
        assert np.abs(got.weights - want).max() <= PARITY
        assert (got.weights.sum(axis=-1) <= 1 + 1e-5).all()  # a share of the attention
    assert {"qformer_attentions", "language_model_attentions"} <= set(deployment.sessions)
