"""`kiln demo`: the whole path on a built-in tiny model, with no arguments and no network.

Builds a tiny Stable Diffusion 1.x pipeline with random weights, exports it to ONNX with
parity checks, generates an image with onnxruntime, generates the same seed with diffusers
in PyTorch, and reports where everything went, how close the two images are and how long
each step took.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kiln.artifacts import check_output_folder
from kiln.errors import KilnError
from kiln.models.sources import quiet_progress_bars

DEMO_MARKER = ".kiln-demo"
PROMPT = "a photo of an astronaut riding a horse on mars"


def run_demo(
    out: Path,
    *,
    steps: int,
    seed: int,
    console: Console,
    export_progress: Callable[[], Any],
    step_progress: Callable[[], Any],
) -> dict[str, Any]:
    """Run the demo into `out` (which it owns: earlier demo output there is replaced)."""
    import kiln
    from kiln.bench.metrics import psnr
    from kiln.models.tiny import save_pipeline

    _claim_folder(out)
    quiet_progress_bars()
    model_dir, artifact_dir = out / "model", out / "artifact"
    shutil.rmtree(artifact_dir, ignore_errors=True)
    console.print("[bold]1/4[/] building a tiny Stable Diffusion 1.x model with random weights")
    save_pipeline("sd1", model_dir, seed=0)

    console.print("[bold]2/4[/] exporting every component to ONNX, checking parity against PyTorch")
    started = time.perf_counter()
    with export_progress() as report:
        manifest = kiln.export(model_dir, artifact_dir, progress=report)
    export_seconds = time.perf_counter() - started

    console.print(f"[bold]3/4[/] generating with onnxruntime ({steps} steps, seed {seed})")
    deployment = kiln.load(artifact_dir)
    with step_progress() as progress:
        task = progress.add_task("denoising (onnxruntime)", total=steps)
        ours = deployment.generate(
            PROMPT,
            steps=steps,
            seed=seed,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    load_seconds = deployment.load_seconds
    del deployment  # onnxruntime's idle threads spin for a while; keep them off the torch run

    console.print("[bold]4/4[/] generating the same seed with diffusers in PyTorch")
    reference, torch_seconds = _diffusers_image(model_dir, steps, seed, ours.width, ours.height)

    paths = _save_pictures(out, ours.image, reference)
    similarity = psnr(ours.image, reference)
    console.print(_files_table(manifest, artifact_dir))
    summary = Table(title="demo summary", show_header=False)
    summary.add_row("export (all components)", f"{export_seconds:.1f} s")
    summary.add_row("load artifact (verify hashes, open sessions)", f"{load_seconds:.2f} s")
    summary.add_row(f"generate, onnxruntime ({steps} steps, first call)", f"{ours.seconds:.2f} s")
    summary.add_row(
        f"generate, diffusers PyTorch eager ({steps} steps, first call)", f"{torch_seconds:.2f} s"
    )
    summary.add_row(
        "same-seed PSNR, kiln vs diffusers",
        f"{similarity:.1f} dB" if similarity != float("inf") else "identical",
    )
    for name, path in paths.items():
        summary.add_row(name, str(path))
    console.print(summary)
    console.print(
        "[yellow]The built-in model has random weights: its images are noise by design.[/] "
        "Point `kiln export` at a real model (see README) for real images."
    )
    captioning = _caption_step(out, reference, console, export_progress)
    return {
        "captioning": captioning,
        "psnr": similarity,
        "export_seconds": export_seconds,
        "generate_seconds": ours.seconds,
        "torch_seconds": torch_seconds,
        "paths": paths,
    }


def _caption_step(
    out: Path, image: Any, console: Console, export_progress: Callable[[], Any]
) -> dict[str, Any]:
    """Build a tiny BLIP, export it, caption the demo image; compare with transformers."""
    import kiln
    from kiln.models.tiny_captioning import build_model, save_model

    console.print("[bold]+[/] captioning: tiny BLIP -> ONNX (decoder with KV cache) -> caption")
    model_dir, artifact_dir = out / "blip-model", out / "blip-artifact"
    shutil.rmtree(artifact_dir, ignore_errors=True)
    save_model("blip", model_dir, seed=0)
    with export_progress() as report:
        kiln.export(model_dir, artifact_dir, progress=report)
    result = kiln.load(artifact_dir).caption([image], num_beams=3, max_new_tokens=12)
    model, processor = build_model("blip", seed=0)
    expected = model.generate(
        **processor(images=[image], return_tensors="pt"), num_beams=3, max_new_tokens=12
    ).tolist()
    same = result.sequences == expected
    picture = _save_captioned(out / "caption.png", image, result.caption)
    console.print(
        f"caption (3 beams): {result.caption!r} in {result.seconds:.2f} s; "
        f"{'token for token' if same else 'DIFFERENT from'} transformers' generate() -> {picture}",
        highlight=False,
    )
    return {"caption": result.caption, "matches_transformers": same, "picture": picture}


def _save_captioned(path: Path, image: Any, caption: str) -> Path:
    """The image with its caption underneath, as a person would want to check it."""
    import textwrap

    from PIL import Image, ImageDraw

    from kiln.artifacts import atomic_write_png

    shown = image.resize((256, 256 * image.height // image.width), Image.NEAREST)
    lines = textwrap.wrap(f"BLIP (random weights): {caption}", width=40) or [""]
    sheet = Image.new("RGB", (shown.width + 20, shown.height + 20 + 14 * len(lines)), "white")
    sheet.paste(shown, (10, 10))
    ImageDraw.Draw(sheet).multiline_text((10, shown.height + 14), "\n".join(lines), fill="black")
    return atomic_write_png(path, sheet)


def _claim_folder(out: Path) -> None:
    check_output_folder(out, "demo folder")
    if out.exists() and any(out.iterdir()) and not (out / DEMO_MARKER).exists():
        raise KilnError(
            f"{out} exists and was not made by `kiln demo`; pass --out with a new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("made by kiln demo; safe to delete\n")


def _diffusers_image(
    model_dir: Path, steps: int, seed: int, width: int, height: int
) -> tuple[Any, float]:
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()

    pipeline = StableDiffusionPipeline.from_pretrained(
        model_dir, safety_checker=None, requires_safety_checker=False
    )
    pipeline.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    with torch.inference_mode():
        image = pipeline(
            PROMPT,
            num_inference_steps=steps,
            width=width,
            height=height,
            generator=torch.Generator("cpu").manual_seed(seed),
        ).images[0]
    return image, time.perf_counter() - started


def _save_pictures(out: Path, ours: Any, reference: Any) -> dict[str, Path]:
    from PIL import Image, ImageDraw

    from kiln.artifacts import atomic_write_png

    scale = max(1, 256 // ours.width)
    big = [
        im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in (ours, reference)
    ]
    sheet = Image.new("RGB", (big[0].width * 2 + 30, big[0].height + 40), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, label) in enumerate(
        zip(big, ("kiln (onnxruntime)", "diffusers (PyTorch)"), strict=True)
    ):
        x = 10 + index * (image.width + 10)
        sheet.paste(image, (x, 30))
        draw.text((x, 8), label, fill="black")
    paths = {
        "kiln image": out / "kiln.png",
        "PyTorch image": out / "pytorch.png",
        "side by side": out / "side_by_side.png",
    }
    for image, path in zip((ours, reference, sheet), paths.values(), strict=True):
        atomic_write_png(path, image)
    return paths


def _files_table(manifest: Any, artifact_dir: Path) -> Table:
    table = Table(title=f"artifact: {artifact_dir}")
    for column in ("component", "folder", "size", "parity max |diff|", "export"):
        table.add_column(column)
    for v in manifest.variants:
        worst = v.parity.worst()[1] if v.parity else float("nan")
        table.add_row(
            v.component,
            f"{v.folder}/ ({len(v.files)} files)",
            f"{v.size_bytes / 2**20:.1f} MiB",
            f"{worst:.1e}",
            f"{v.export_seconds:.1f} s",
        )
    return table
