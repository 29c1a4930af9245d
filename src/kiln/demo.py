"""`kiln demo`: the whole path on kiln's built-in trained models, with no arguments and no network.

1. exports `kiln:shapes-sd` (a tiny Stable Diffusion 1.x trained on the shapes world) to ONNX,
   checking every component against PyTorch;
2. quantizes it to int8, recording the drift of every int8 variant against fp32;
3. plans: `kiln.load()` picks one variant per component for this machine;
4. generates the prompt with that plan, and the same seed with diffusers in PyTorch;
5. exports `kiln:shapes-blip` and captions the generated image;
6. judges both without a model (`kiln.bench.judge`): does the image show what the prompt asks
   for, does the caption say what the prompt said. One picture shows it all: `demo.png`.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from kiln.artifacts import check_output_folder
from kiln.errors import InvalidRequestError, KilnError
from kiln.models.sources import quiet_progress_bars
from kiln.ui import plan_table

DEMO_MARKER = ".kiln-demo"
PROMPT = "a red circle on a blue background"
GUIDANCE = 7.5
CAPTION_BEAMS = 3


@dataclass
class DemoTimings:
    """Seconds per demo step, in the order they ran."""

    steps: dict[str, float]

    def time(self, name: str) -> Callable[[], None]:
        started = time.perf_counter()

        def stop() -> None:
            self.steps[name] = time.perf_counter() - started

        return stop


def run_demo(
    out: Path,
    *,
    steps: int,
    seed: int,
    console: Console,
    export_progress: Callable[[], Any],
    step_progress: Callable[[], Any],
    quantize_progress: Callable[[], Any],
    prompt: str = PROMPT,
) -> dict[str, Any]:
    """Run the demo into `out` (which it owns: earlier demo output there is replaced)."""
    import kiln
    from kiln.bench.judge import judge_image
    from kiln.bench.metrics import psnr
    from kiln.models.shapes import parse_caption
    from kiln.pipelines.diffusion import MAX_STEPS

    # Refuse what would fail minutes later: the judge reads only the shapes world's prompts.
    parse_caption(prompt)
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidRequestError(f"steps must be between 1 and {MAX_STEPS}, got {steps}")
    _claim_folder(out)
    quiet_progress_bars()
    timings = DemoTimings({})
    sd_dir, blip_dir = out / "shapes-sd-onnx", out / "shapes-blip-onnx"
    for folder in (sd_dir, blip_dir):
        shutil.rmtree(folder, ignore_errors=True)

    console.print("[bold]1/6[/] exporting kiln:shapes-sd to ONNX, checking parity against PyTorch")
    stop = timings.time("export shapes-sd (ONNX, parity checked)")
    with export_progress() as report:
        kiln.export("kiln:shapes-sd", sd_dir, progress=report)
    stop()

    console.print("[bold]2/6[/] quantizing to int8 (drift against fp32 recorded per variant)")
    stop = timings.time("quantize int8 (calibrate, quantize, measure drift)")
    with quantize_progress() as report:
        kiln.quantize(sd_dir, "int8", progress=report)
    stop()

    console.print("[bold]3/6[/] planning: one variant per component for this machine")
    stop = timings.time("load (verify hashes, plan, open sessions)")
    deployment = kiln.load(sd_dir)
    stop()
    plan = [{"component": row[0], "variant": row[1]} for row in deployment.plan.rows()]
    console.print(plan_table(deployment.plan))

    console.print(f"[bold]4/6[/] generating {prompt!r} ({steps} steps, seed {seed})")
    stop = timings.time(f"generate with the plan ({steps} steps)")
    with step_progress() as progress:
        task = progress.add_task("denoising", total=steps)
        ours = deployment.generate(
            prompt,
            steps=steps,
            seed=seed,
            guidance_scale=GUIDANCE,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        ).image
    stop()
    del deployment  # onnxruntime's idle threads spin for a while; keep them off the torch run
    stop = timings.time(f"generate with diffusers, PyTorch fp32 ({steps} steps)")
    reference = _diffusers_image(prompt, steps, seed, ours.width, ours.height)
    stop()
    image_verdict = judge_image(_array(ours), prompt)
    reference_verdict = judge_image(_array(reference), prompt)

    console.print("[bold]5/6[/] exporting kiln:shapes-blip and captioning the generated image")
    stop = timings.time("export shapes-blip (ONNX, parity checked)")
    with export_progress() as report:
        kiln.export("kiln:shapes-blip", blip_dir, progress=report)
    stop()
    stop = timings.time(f"caption ({CAPTION_BEAMS} beams, first call)")
    caption = kiln.load(blip_dir).caption([ours], num_beams=CAPTION_BEAMS, max_new_tokens=16)
    stop()
    same_tokens = caption.sequences == _transformers_caption(ours)

    console.print("[bold]6/6[/] judging the image and the caption")
    caption_ok = _same_caption(caption.caption, prompt)
    report = {
        "prompt": prompt,
        "image_verdict": image_verdict.describe(),
        "image_correct": image_verdict.correct,
        "pytorch_image_verdict": reference_verdict.describe(),
        "caption": caption.caption,
        "caption_correct": caption_ok,
        "caption_matches_transformers": same_tokens,
        "psnr_vs_pytorch_fp32": psnr(ours, reference),
        "plan": plan,
        "timings": timings.steps,
    }
    report["paths"] = _save_pictures(out, ours, reference, report)
    console.print(_summary_table(report))
    return report


def _same_caption(caption: str, prompt: str) -> bool:
    from kiln.bench.judge import caption_accuracy

    return caption_accuracy([caption], [prompt]) == 1.0


def _array(image: Any) -> Any:
    import numpy as np

    return np.asarray(image.convert("RGB"))


def _summary_table(report: dict[str, Any]) -> Table:
    table = Table(title="demo summary", show_header=False)
    mark = {True: "[green]correct[/]", False: "[red]wrong[/]"}
    table.add_row("prompt", Text(report["prompt"]))
    table.add_row("image (kiln plan)", Text(report["image_verdict"]))
    table.add_row("image (diffusers fp32)", Text(report["pytorch_image_verdict"]))
    table.add_row("caption of the kiln image", Text(repr(report["caption"])))
    table.add_row("caption says the prompt?", mark[report["caption_correct"]])
    table.add_row(
        "caption tokens vs transformers",
        "same" if report["caption_matches_transformers"] else "[red]DIFFERENT[/]",
    )
    similarity = report["psnr_vs_pytorch_fp32"]
    table.add_row(
        "kiln image vs diffusers fp32 (PSNR)",
        f"{similarity:.1f} dB" if similarity != float("inf") else "identical",
    )
    for name, seconds in report["timings"].items():
        table.add_row(name, f"{seconds:.2f} s")
    for name, path in report["paths"].items():
        table.add_row(name, str(path))
    return table


def _claim_folder(out: Path) -> None:
    check_output_folder(out, "demo folder")
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise KilnError(
            f"{out} exists and was not made by `kiln demo`; pass --out with a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by kiln demo; safe to delete\n")


def _diffusers_image(prompt: str, steps: int, seed: int, width: int, height: int) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    from kiln.models.builtin import builtin_path

    pipeline = StableDiffusionPipeline.from_pretrained(
        builtin_path("shapes-sd"), safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        return pipeline(
            prompt,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]


def _transformers_caption(image: Any) -> list[list[int]]:
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from kiln.models.builtin import builtin_path

    folder = builtin_path("shapes-blip")
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    inputs = BlipProcessor.from_pretrained(folder)(images=[image], return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, num_beams=CAPTION_BEAMS, max_new_tokens=16)
    return out.tolist()


def _save_pictures(out: Path, ours: Any, reference: Any, report: dict[str, Any]) -> dict[str, Path]:
    """`demo.png`: both images with the prompt, the caption, the verdicts and the timings."""
    import textwrap

    from PIL import Image, ImageDraw

    from kiln.artifacts import atomic_write_png

    side = 256
    big = [im.resize((side, side), Image.NEAREST) for im in (ours, reference)]
    lines = [
        f"prompt:  {report['prompt']}",
        f"judge (kiln image):  {report['image_verdict']}",
        f"BLIP caption of the kiln image:  {report['caption']}",
        f"caption {'says' if report['caption_correct'] else 'does NOT say'} the prompt",
        "",
        *(f"{name}: {seconds:.2f} s" for name, seconds in report["timings"].items()),
    ]
    wrapped = [piece for line in lines for piece in (textwrap.wrap(line, 84) or [""])]
    sheet = Image.new("RGB", (2 * side + 30, side + 50 + 14 * len(wrapped)), "white")
    draw = ImageDraw.Draw(sheet)
    labels = ("kiln (planned variants, onnxruntime)", "diffusers (PyTorch fp32)")
    for index, (image, label) in enumerate(zip(big, labels, strict=True)):
        x = 10 + index * (side + 10)
        sheet.paste(image, (x, 30))
        draw.text((x, 10), label, fill="black")
    draw.multiline_text((10, side + 40), "\n".join(wrapped), fill="black")
    paths = {"kiln image": out / "kiln.png", "PyTorch image": out / "pytorch.png"}
    paths["demo picture"] = out / "demo.png"
    for image, path in zip((ours, reference, sheet), paths.values(), strict=True):
        atomic_write_png(path, image)
    return paths
