"""Train a tiny Stable Diffusion 1.x pipeline on the shapes world (kiln.models.shapes), on the CPU.

    .venv/bin/python scripts/train_shapes_diffusion.py --out /tmp/shapes-sd --minutes 30

Two stages from one seed:

1. the autoencoder (AutoencoderKL, 4x down-sampling: 64 px images, 16x16x4 latents) learns to
   reconstruct fresh scenes; its latent scaling factor is then set to 1 / std of the latents,
   as Stable Diffusion's 0.18215 was;
2. the UNet and the CLIP text encoder learn to denoise those latents given the caption, with
   10% of captions dropped to "" so classifier-free guidance has an unconditional branch, and
   offset noise so flat black and white backgrounds (the schedule's weak point) come out.

At the end it generates every caption of the world from held-out seeds with diffusers'
StableDiffusionPipeline, reports the fraction the judge (`kiln.bench.judge`) reads as correct,
and saves the pipeline in diffusers layout (`DiffusionPipeline.from_pretrained` loads it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from shapes_training import save, warmup_cosine

from kiln.bench.judge import judge_image
from kiln.models import shapes
from kiln.models.tiny import build_tokenizer

SIDE = 64
MAX_TOKENS = 16
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
}
VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": SIDE,
}
TEXT_HIDDEN = 64
UNET = {
    "sample_size": SIDE // 4,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    # Attention only at 8x8 (and the mid block): at 16x16 it triples the step time on a CPU.
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "cross_attention_dim": TEXT_HIDDEN,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
EMA_DECAY = 0.999
MIN_SNR_GAMMA = 5.0
DROP_CAPTION = 0.1
OFFSET_NOISE = 0.1


def pixels(batch: list[shapes.Scene]) -> torch.Tensor:
    """Scenes as a (B, 3, SIDE, SIDE) tensor in [-1, 1], the range diffusers' VAEs expect."""
    drawn = np.stack([s.draw(SIDE) for s in batch]).astype(np.float32)
    return torch.from_numpy(drawn / 127.5 - 1).permute(0, 3, 1, 2)


def train_vae(vae, rng: np.random.Generator, steps: int, minutes: float, batch: int) -> dict:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps))
    started, losses = time.perf_counter(), []
    vae.train()
    for step in range(steps):
        images = pixels([shapes.sample_scene(rng) for _ in range(batch)])
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(posterior.sample()).sample
        # L1 keeps edges sharp (the judge reads shapes from them); the KL term stays tiny, as in
        # Stable Diffusion's autoencoder, so latents keep their detail.
        loss = (decoded - images).abs().mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - started
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step + 1}/{steps}  L1 {np.mean(losses[-100:]):.4f}  {elapsed:.0f} s")
        if elapsed > minutes * 60:
            print(f"vae stopped at the {minutes} min budget after {step + 1} steps")
            break
    vae.eval()
    return {"vae_steps": len(losses), "vae_seconds": time.perf_counter() - started}


@torch.no_grad()
def encode(vae, scenes: list[shapes.Scene]) -> torch.Tensor:
    """Posterior means of `scenes`, unscaled."""
    return torch.cat(
        [
            vae.encode(pixels(scenes[i : i + 256])).latent_dist.mean
            for i in range(0, len(scenes), 256)
        ]
    )


def tokens(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
    ).input_ids


def train_unet(unet, text_encoder, tokenizer, latents, captions, args) -> dict:
    noise_schedule = diffusers.DDPMScheduler(**SCHEDULE)
    alphas = noise_schedule.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(args.unet_steps))
    averaged = [p.detach().clone() for p in params]  # exponential moving average, saved
    ids = tokens(tokenizer, captions)
    empty = tokens(tokenizer, [""])[0]
    generator = torch.Generator().manual_seed(args.seed)
    started, losses = time.perf_counter(), []
    unet.train()
    text_encoder.train()
    for step in range(args.unet_steps):
        pick = torch.randint(0, len(latents), (args.batch_size,), generator=generator)
        x0, batch_ids = latents[pick], ids[pick].clone()
        batch_ids[torch.rand(args.batch_size, generator=generator) < DROP_CAPTION] = empty
        noise = torch.randn(x0.shape, generator=generator)
        noise += OFFSET_NOISE * torch.randn((*x0.shape[:2], 1, 1), generator=generator)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (len(x0),), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        context = text_encoder(batch_ids).last_hidden_state
        predicted = unet(noisy, t, encoder_hidden_states=context).sample
        # Min-SNR weighting (Hang et al. 2023): low-noise steps stop dominating the loss.
        snr = a / (1 - a)
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        loss = (weight * (predicted - noise).pow(2)).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(averaged, params, 1 - min(EMA_DECAY, (step + 1) / (step + 10)))
        losses.append(loss.item())
        elapsed = time.perf_counter() - started
        if step % 100 == 0 or step == args.unet_steps - 1:
            mean = np.mean(losses[-100:])
            print(f"unet step {step + 1}/{args.unet_steps}  loss {mean:.4f}  {elapsed:.0f} s")
        if elapsed > args.unet_minutes * 60:
            print(f"unet stopped at the {args.unet_minutes} min budget after {step + 1} steps")
            break
    with torch.no_grad():
        torch._foreach_copy_(params, averaged)
    unet.eval()
    text_encoder.eval()
    return {"unet_steps": len(losses), "unet_seconds": time.perf_counter() - started}


def build(seed: int):
    tokenizer = build_tokenizer(model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**VAE)
    text_config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = transformers.CLIPTextModel(text_config)
    unet = diffusers.UNet2DConditionModel(**UNET)
    return vae, text_encoder, tokenizer, unet


def assemble(vae, text_encoder, tokenizer, unet) -> diffusers.StableDiffusionPipeline:
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **SCHEDULE, algorithm_type="dpmsolver++", solver_order=2
    )
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@torch.no_grad()
def evaluate(pipe, repeats: int, steps: int, guidance: float) -> dict:
    prompts = shapes.all_captions() * repeats
    correct, parts = 0, {"background": 0, "colour": 0, "shape": 0}
    for start in range(0, len(prompts), 30):
        chunk = prompts[start : start + 30]
        generator = torch.Generator().manual_seed(shapes.HELD_OUT_SEED + start)
        images = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
        ).images
        for image, prompt in zip(images, chunk, strict=True):
            verdict = judge_image((image * 255).round(), prompt)
            correct += verdict.correct
            parts["background"] += verdict.background_ok
            parts["colour"] += verdict.colour_ok
            parts["shape"] += verdict.shape_ok
            if start == 0 and prompt in chunk[:6]:
                print(f"  {prompt!r}: {verdict.describe()}")
    total = len(prompts)
    return {
        "judged_correct": correct / total,
        **{f"{k}_correct": v / total for k, v in parts.items()},
        "eval_prompts": total,
        "eval_steps": steps,
        "eval_guidance": guidance,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--vae-minutes", type=float, default=8.0)
    parser.add_argument("--unet-steps", type=int, default=4500)
    parser.add_argument("--unet-minutes", type=float, default=21.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--scenes", type=int, default=20000, help="encoded training scenes")
    parser.add_argument("--eval-repeats", type=int, default=2, help="drawings of each caption")
    parser.add_argument("--eval-steps", type=int, default=20)
    parser.add_argument("--eval-guidance", type=float, default=5.0)
    args = parser.parse_args()
    torch.set_num_threads(2)
    vae, text_encoder, tokenizer, unet = build(args.seed)
    for name, module in (("vae", vae), ("text encoder", text_encoder), ("unet", unet)):
        print(f"{name}: {sum(p.numel() for p in module.parameters()) / 1e6:.2f} M parameters")
    rng = np.random.default_rng(args.seed)
    figures = train_vae(vae, rng, args.vae_steps, args.vae_minutes, batch=16)
    vae.requires_grad_(False)
    train_scenes = [shapes.sample_scene(rng) for _ in range(args.scenes)]
    raw = encode(vae, train_scenes)
    vae.register_to_config(scaling_factor=float(1 / raw.std()))
    print(f"latent std {float(raw.std()):.3f} -> scaling factor {vae.config.scaling_factor:.4f}")
    latents = raw * vae.config.scaling_factor
    captions = [s.caption for s in train_scenes]
    figures |= train_unet(unet, text_encoder, tokenizer, latents, captions, args)
    pipe = assemble(vae, text_encoder, tokenizer, unet)
    pipe.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    figures |= evaluate(pipe, args.eval_repeats, args.eval_steps, args.eval_guidance)
    figures["eval_seconds"] = time.perf_counter() - started
    print(json.dumps(figures, indent=1))
    save(args.out, figures, args.seed, __file__, pipe)


if __name__ == "__main__":
    main()
