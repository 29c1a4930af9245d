"""Decoder caches kept inside the runtime (`kiln.runtimes.kv_cache`) on a tiny BLIP.

Each runtime's stream must give the logits the plain graph gives when fed its past by hand
(`CopyingKVStream`, the reference), through prompts, single tokens and beam reorders, and
must keep what it was handed (the cross-attention key/values) without copying it per step.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import kiln
from kiln.models.blip import cross_names
from kiln.models.tiny_captioning import save_model
from kiln.runtimes.base import Session
from kiln.runtimes.guard import GuardedSession
from kiln.runtimes.kv_cache import CopyingKVStream, row_groups

TARGETS = ("onnx", "openvino")


@pytest.fixture(scope="module")
def blip_artifact(tmp_path_factory):
    pytest.importorskip("openvino")
    root = tmp_path_factory.mktemp("kv-cache")
    model = save_model("blip", root / "model", seed=0)
    kiln.export(model, root / "artifact", targets=list(TARGETS))
    return root / "artifact"


@pytest.fixture(scope="module")
def deployments(blip_artifact):
    return {t: kiln.load(blip_artifact, require=[f"{t}:fp32"]) for t in TARGETS}


def _constants(deployment, rows_per_image=2):
    """Cross-attention key/values of two images, each repeated for its beams."""
    vision = deployment.sessions["vision_encoder"]
    pixels = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    embeds = vision.run({"pixel_values": pixels})["image_embeds"]
    cross = deployment.sessions["cross_attention_kv"].run({"encoder_hidden_states": embeds})
    layers = deployment.info.num_layers
    rows = np.repeat(np.arange(2), rows_per_image)
    constants = {n: cross[n][rows] for pair in cross_names(layers) for n in pair}
    return constants, rows


def _step_inputs(batch, past, ids):
    new = ids.shape[1]
    return {
        "input_ids": ids,
        "position_ids": np.tile(np.arange(past, past + new), (batch, 1)),
        "attention_mask": np.ones((batch, new), np.int64),
        "past_attention_mask": np.ones((batch, past), np.int64),
    }


# Steps of 4 rows (2 images x 2 beams): a 3-token prompt, then single tokens; reorders
# within each image's beams, and one across images (its constants must follow).
PLAN = [
    ("step", 3),
    ("step", 1),
    ("reorder", [1, 0, 3, 2]),
    ("step", 1),
    ("reorder", [0, 0, 2, 2]),
    ("reorder", [1, 0, 2, 3]),
    ("step", 1),
    ("reorder", [2, 3, 0, 1]),
    ("step", 1),
]


def _drive(stream, vocab):
    rng = np.random.default_rng(1)
    logits, past = [], 0
    for kind, value in PLAN:
        if kind == "reorder":
            stream.reorder(np.array(value))
            continue
        ids = rng.integers(0, vocab, (4, value))
        logits.append(stream.step(_step_inputs(4, past, ids))["logits"])
        past += value
    return logits


@pytest.mark.parametrize("target", TARGETS)
def test_stream_matches_the_plain_graph(deployments, target):
    deployment = deployments[target]
    session = deployment.sessions["text_decoder"]
    constants, rows = _constants(deployment)
    vocab = deployment.info.vocab_size
    ours = session.open_kv_stream(constants, row_groups(rows[:, None]))
    assert type(ours) is not CopyingKVStream  # both runtimes keep the cache themselves
    reference = CopyingKVStream(session, constants, row_groups(rows[:, None]))
    got, want = _drive(ours, vocab), _drive(reference, vocab)
    assert ours.length == reference.length == 7
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(b).max()), f"step {step}"


@pytest.mark.parametrize("target", TARGETS)
def test_constants_are_handed_over_once(deployments, target):
    deployment = deployments[target]
    constants, rows = _constants(deployment)
    stream = deployment.sessions["text_decoder"].open_kv_stream(
        constants, row_groups(rows[:, None])
    )
    _drive(stream, deployment.info.vocab_size)
    name = cross_names(deployment.info.num_layers)[0][0]
    if target == "openvino":
        seen = stream._request.get_tensor(name).data
    else:
        seen = stream._bound[name].numpy()  # a copy: compare where the bound value lives
        assert stream._bound[name].data_ptr() == stream.constants[name].ctypes.data
    # The across-images reorder made new constants; they are what the runtime reads.
    assert np.array_equal(seen, stream.constants[name])
    if target == "openvino":
        assert np.shares_memory(seen, stream.constants[name])


def test_cross_attention_runs_once_per_image(deployments):
    deployment = deployments["onnx"]
    cross = deployment.sessions["cross_attention_kv"]
    decoder = deployment.sessions["text_decoder"]
    rows, streams = [], []
    run, open_stream = cross.run, decoder.open_kv_stream
    cross.run = lambda feed: rows.append(len(feed["encoder_hidden_states"])) or run(feed)
    decoder.open_kv_stream = lambda *a: streams.append(1) or open_stream(*a)
    try:
        images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue")]
        deployment.caption(images, num_beams=3, max_new_tokens=6)
    finally:
        del cross.run, decoder.open_kv_stream
    assert rows == [2]  # two images, not six beam rows
    assert streams == [1]


class _PoisonedAfter(Session):
    """A decoder whose logits turn to NaN from its `bad_from`-th call on."""

    def __init__(self, inner: Session, bad_from: int) -> None:
        self.inner, self.bad_from, self.calls = inner, bad_from, 0
        self.spec, self.runtime, self.device = inner.spec, inner.runtime, inner.device

    def run(self, inputs):
        self.calls += 1
        outputs = self.inner.run(inputs)
        if self.calls >= self.bad_from:
            outputs = {**outputs, "logits": np.full_like(outputs["logits"], np.nan)}
        return outputs


def test_guarded_stream_moves_to_the_fallback_and_replays(deployments, caplog):
    deployment = deployments["onnx"]
    session = deployment.sessions["text_decoder"]
    constants, rows = _constants(deployment)
    guard = GuardedSession(
        _PoisonedAfter(session, 3), "bad", "text_decoder/onnx/fp32", lambda: session
    )
    got = _drive(
        guard.open_kv_stream(constants, row_groups(rows[:, None])), deployment.info.vocab_size
    )
    want = _drive(CopyingKVStream(session, constants), deployment.info.vocab_size)
    assert all(np.isfinite(step).all() for step in got)
    for a, b in zip(got, want, strict=True):
        assert np.abs(a - b).max() < 1e-4 * max(1.0, np.abs(b).max())
    assert guard.fallback_calls == 3  # the third step and the two after it
    assert "produced NaN/inf" in caplog.text


def test_a_foreign_cache_is_refused(deployments):
    import torch
    from transformers.cache_utils import DynamicCache

    from kiln.errors import InvalidRequestError

    decoder = deployments["onnx"].decoder
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(InvalidRequestError, match="inside the runtime"):
        decoder(
            input_ids=torch.ones(1, 1, dtype=torch.int64),
            encoder_hidden_states=torch.zeros(1, 17, 32),
            cache=cache,
        )
