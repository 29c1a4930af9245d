"""Train a tiny BLIP captioner on the shapes world (kiln.models.shapes) from a seed, on the CPU.

    .venv/bin/python scripts/train_shapes_captioner.py --out /tmp/shapes-blip --minutes 5

Scenes are drawn fresh every step from the seed (drawn at 48 to 96 pixels, so the processor's
resize is part of what it learns), captions are the world's ground truth, and the loss is
BLIP's own LM loss. At the end it captions held-out scenes greedily, reports the exact-match
accuracy (`kiln.bench.judge.caption_accuracy`) and saves model + processor with
`save_pretrained`, loadable by `BlipForConditionalGeneration.from_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from shapes_training import save, warmup_cosine

from kiln.bench.judge import caption_accuracy
from kiln.models import shapes
from kiln.models.tiny_captioning import build_processor

IMAGE_SIDE = 64
SPECIAL = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = ["a", "on", "background", *shapes.COLOURS, *shapes.SHAPES]
HIDDEN = 64


def vocabulary() -> list[str]:
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    return (
        SPECIAL
        + WORDS
        + [c for c in chars if c not in WORDS]
        + ["##" + c for c in chars]
        + [
            "[DEC]",
            "[ENC]",
        ]
    )


def build(seed: int) -> tuple[transformers.BlipForConditionalGeneration, object]:
    vocab = vocabulary()
    processor = build_processor(IMAGE_SIDE, vocab)
    layers = {"num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 2 * HIDDEN}
    config = transformers.BlipConfig(
        vision_config={
            **layers,
            "hidden_size": HIDDEN,
            "image_size": IMAGE_SIDE,
            "patch_size": 8,
            "projection_dim": HIDDEN,
            "initializer_range": 0.02,  # BLIP's vision default (1e-10) trains nothing
        },
        text_config={
            **layers,
            "hidden_size": HIDDEN,
            "encoder_hidden_size": HIDDEN,
            "max_position_embeddings": 32,
            "projection_dim": HIDDEN,
            "vocab_size": len(vocab),
            "label_smoothing": 0.0,
            "bos_token_id": vocab.index("[DEC]"),
            "sep_token_id": vocab.index("[SEP]"),
            "eos_token_id": vocab.index("[SEP]"),
            "pad_token_id": vocab.index("[PAD]"),
        },
        image_text_hidden_size=HIDDEN,
    )
    torch.manual_seed(seed)
    return transformers.BlipForConditionalGeneration(config), processor


def batch(processor, rng: np.random.Generator, size: int) -> tuple[dict, list[str]]:
    drawn = [shapes.sample_scene(rng) for _ in range(size)]
    images = [Image.fromarray(s.draw(int(rng.integers(48, 97)))) for s in drawn]
    captions = [s.caption for s in drawn]
    inputs = processor(images=images, text=captions, padding="longest", return_tensors="pt")
    return inputs, captions


def train(model, processor, steps: int, minutes: float, seed: int, batch_size: int) -> dict:
    tokenizer = processor.tokenizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    rng = np.random.default_rng(seed)
    started, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        inputs, _ = batch(processor, rng, batch_size)
        ids = inputs["input_ids"].clone()
        ids[:, 0] = model.config.text_config.bos_token_id
        labels = ids.masked_fill(ids == tokenizer.pad_token_id, -100)
        out = model(
            pixel_values=inputs["pixel_values"],
            input_ids=ids,
            attention_mask=inputs["attention_mask"],
            labels=labels,
        )
        optimizer.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(out.loss))
        elapsed = time.perf_counter() - started
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps}  loss {np.mean(losses[-50:]):.4f}  {elapsed:.0f} s")
        if elapsed > minutes * 60:
            print(f"stopped at the {minutes} min budget after {step + 1} steps")
            break
    model.eval()
    return {"steps": len(losses), "seconds": time.perf_counter() - started, "loss": losses[-1]}


@torch.no_grad()
def evaluate(model, processor, count: int) -> float:
    held_out = shapes.held_out_scenes(count)
    captions = []
    for start in range(0, count, 50):
        chunk = held_out[start : start + 50]
        images = [Image.fromarray(s.draw(IMAGE_SIDE)) for s in chunk]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        out = model.generate(pixel_values=pixels, max_new_tokens=12, num_beams=1)
        captions += processor.batch_decode(out, skip_special_tokens=True)
    for caption, scene in list(zip(captions, held_out, strict=True))[:5]:
        print(f"  {scene.caption!r} -> {caption!r}")
    return caption_accuracy(captions, [s.caption for s in held_out])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", type=int, default=200, help="held-out scenes to caption")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, processor = build(args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"tiny BLIP: {params / 1e6:.2f} M parameters, vocabulary {len(processor.tokenizer)}")
    figures = train(model, processor, args.steps, args.minutes, args.seed, args.batch_size)
    figures["held_out_accuracy"] = evaluate(model, processor, args.eval)
    print(json.dumps(figures, indent=1))
    save(args.out, figures, args.seed, __file__, model, processor)


if __name__ == "__main__":
    main()
