"""BLIP models with random weights, built from configs and saved as transformers folders.

Like `kiln.models.tiny` for Stable Diffusion: tests and the demo build these offline and
load them back from disk like real checkpoints. Every preset ships a local BERT WordPiece
tokenizer (vocabulary built here, BLIP's `[DEC]`/`[ENC]` tokens appended as in the real
vocabulary) and a `BlipImageProcessor` config, saved together with `BlipProcessor`.

BLIP-2 (`blip2-opt`) uses a byte-level BPE tokenizer with OPT's special-token ids and
`Blip2Processor` (which adds the `<image>` token); BLIP-2 retrieval (`blip2-itm`) reads text
with the Q-Former's BERT vocabulary, the same WordPiece one as BLIP.

Tiny presets (`blip`, `blip-itm`, `blip2-opt`, `blip2-itm`) build and save in well under a second. `blip-base` and
`blip-large` use the published architecture sizes, including the 30524-entry vocabulary
(random weights; the tiny tokenizer's ids stay far below it) for export and speed work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kiln.errors import UnsupportedModelError

MARKER_FILENAME = "kiln_tiny.json"

_SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORDS = """
a an the of in on at with and or to from two three is are there this that what how many
photo picture image of cat cats dog dogs bird horse man woman person people child boy girl
sitting standing lying sleeping running riding holding eating looking playing wearing
couch bed table chair room street road field grass tree trees water beach sky cloud snow
red blue green yellow white black brown large small little big old young
car bus train bike boat plane building house city window door kitchen food plate pizza
color colour question answer yes no one next top front near
"""

# name -> (vision config overrides, text config overrides, image size, architecture)
_TINY_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "image_size": 32,
    "patch_size": 8,
    "projection_dim": 32,
}
_TINY_TEXT = {
    "hidden_size": 32,
    "encoder_hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 64,
    "projection_dim": 32,
}
# BlipVisionConfig initializes weights with std 1e-10 (checkpoints overwrite them): random
# weights that small fall below fp16's range and make int8 weights degenerate, so the
# full-size presets draw them like trained ones (std 0.02, as the text side does).
_BASE_VISION = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "initializer_range": 0.02,
}
_LARGE_VISION = {
    "initializer_range": 0.02,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
}

PRESETS: dict[str, dict[str, Any]] = {
    "blip": {
        "architecture": "BlipForConditionalGeneration",
        "vision": _TINY_VISION,
        "text": _TINY_TEXT,
        "extra": {"image_text_hidden_size": 32},
    },
    "blip-itm": {
        "architecture": "BlipForImageTextRetrieval",
        "vision": _TINY_VISION,
        "text": _TINY_TEXT,
        "extra": {"image_text_hidden_size": 32},
    },
    "blip-base": {
        "architecture": "BlipForConditionalGeneration",
        "vision": _BASE_VISION,
        "text": {"encoder_hidden_size": 768},
        "extra": {},
    },
    "blip-large": {
        "architecture": "BlipForConditionalGeneration",
        "vision": _LARGE_VISION,
        "text": {"encoder_hidden_size": 1024},
        "extra": {},
    },
}
PRESETS["blip2-opt"] = {
    "architecture": "Blip2ForConditionalGeneration",
    "vision": _TINY_VISION,
    "qformer": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "encoder_hidden_size": 32,
        "vocab_size": 64,
        "max_position_embeddings": 64,
    },
    "text": {
        "hidden_size": 32,
        "word_embed_proj_dim": 32,
        "ffn_dim": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 96,
    },
    "num_query_tokens": 4,
}
PRESETS["blip2-itm"] = {
    "architecture": "Blip2ForImageTextRetrieval",
    "vision": _TINY_VISION,
    "qformer": {**PRESETS["blip2-opt"]["qformer"], "use_qformer_text_input": True},
    "num_query_tokens": 4,
    "image_text_hidden_size": 16,
}
TINY_PRESETS = ("blip", "blip-itm", "blip2-opt", "blip2-itm")


def vocabulary() -> list[str]:
    """The WordPiece vocabulary: BERT's special tokens, words, characters, then BLIP's extras."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,?!'-")
    words = list(dict.fromkeys(_WORDS.split()))
    vocab = _SPECIAL + words + [c for c in chars if c not in words]
    vocab += ["##" + c for c in chars]
    return vocab + ["[DEC]", "[ENC]"]


def build_processor(image_size: int, vocab: list[str] | None = None) -> Any:
    """A `BlipProcessor` (BERT tokenizer + BLIP image processor) from locally written files."""
    from transformers import BertTokenizer, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vocab = vocab or vocabulary()
    tokenizer = BertTokenizer(
        vocab={token: index for index, token in enumerate(vocab)},
        do_lower_case=True,
        bos_token="[DEC]",
        additional_special_tokens=["[ENC]"],
        model_max_length=512,
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_opt_processor(image_size: int, num_query_tokens: int) -> Any:
    """A `Blip2Processor`: byte-level BPE (OPT-style ids: <pad>=1, </s>=2) + image processor."""
    from transformers import Blip2Processor, GPT2Tokenizer
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from kiln.models.tiny import _bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for char in _bytes_to_unicode().values():
        vocab[char] = len(vocab)
    tokenizer = GPT2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token="<unk>",
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        padding_side="left",
    )
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    return Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )


def _build_blip2(spec: dict[str, Any], seed: int) -> tuple[Any, Any]:
    import torch
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    image_size = spec["vision"]["image_size"]
    processor = build_opt_processor(image_size, spec["num_query_tokens"])
    tokenizer = processor.tokenizer
    text = OPTConfig(
        **spec["text"], vocab_size=len(tokenizer), pad_token_id=1, bos_token_id=2, eos_token_id=2
    )
    config = Blip2Config(
        vision_config=dict(spec["vision"]),
        qformer_config=dict(spec["qformer"]),
        text_config=text.to_dict(),
        num_query_tokens=spec["num_query_tokens"],
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    _spread(model, seed)
    return model, processor


def _build_blip2_retrieval(spec: dict[str, Any], seed: int) -> tuple[Any, Any]:
    import torch
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2Processor

    blip = build_processor(spec["vision"]["image_size"])
    # No image tokens in the text: the ITM head prepends its queries itself.
    processor = Blip2Processor(image_processor=blip.image_processor, tokenizer=blip.tokenizer)
    config = Blip2Config(
        vision_config=dict(spec["vision"]),
        qformer_config={**spec["qformer"], "vocab_size": len(processor.tokenizer)},
        num_query_tokens=spec["num_query_tokens"],
        image_text_hidden_size=spec["image_text_hidden_size"],
    )
    torch.manual_seed(seed)
    model = Blip2ForImageTextRetrieval(config).eval()
    _spread(model, seed)
    return model, processor


def _spread(model: Any, seed: int) -> None:
    """Random weights large enough that tiny models' outputs differ between inputs."""
    import torch

    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and "embed" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def build_model(preset: str, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) for a preset, with random weights drawn from `seed`."""
    import torch
    import transformers

    if preset not in PRESETS:
        raise UnsupportedModelError(
            f"unknown BLIP preset {preset!r}; available: {', '.join(PRESETS)}"
        )
    spec = PRESETS[preset]
    if spec["architecture"] == "Blip2ForImageTextRetrieval":
        return _build_blip2_retrieval(spec, seed)
    if spec["architecture"].startswith("Blip2"):
        return _build_blip2(spec, seed)
    vocab = vocabulary()
    text = {
        **spec["text"],
        # Full-size presets keep BLIP's real 30524-entry embedding and LM head.
        "vocab_size": len(vocab) if preset in TINY_PRESETS else 30524,
        "bos_token_id": vocab.index("[DEC]"),
        "sep_token_id": vocab.index("[SEP]"),
        "eos_token_id": vocab.index("[SEP]"),
        "pad_token_id": vocab.index("[PAD]"),
    }
    config = transformers.BlipConfig(
        text_config=text, vision_config=dict(spec["vision"]), **spec["extra"]
    )
    torch.manual_seed(seed)
    model = getattr(transformers, spec["architecture"])(config).eval()
    # The tiny models' default init leaves logits nearly flat; spread them so that greedy,
    # beam and sampled captions differ and ties between tokens do not occur.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed)
        for name, parameter in model.named_parameters():
            if preset in TINY_PRESETS and parameter.dim() >= 2 and "embeddings" not in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    image_size = config.vision_config.image_size
    return model, build_processor(image_size)


def save_model(preset: str, folder: str | Path, seed: int = 0) -> Path:
    """Build a preset and save model + processor into `folder`, as a hub snapshot would be."""
    folder = Path(folder)
    model, processor = build_model(preset, seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    (folder / MARKER_FILENAME).write_text(
        json.dumps({"preset": preset, "seed": seed}), encoding="utf-8"
    )
    return folder
