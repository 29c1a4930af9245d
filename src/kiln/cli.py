"""The `kiln` command: doctor, export, generate, inspect, demo.

User errors (`KilnError`) print one line on stderr and exit non-zero; anything else is a
kiln bug and keeps its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from kiln.errors import KilnError
from kiln.ui import console, err_console, progress_bar

app = typer.Typer(
    name="kiln",
    help="Compile Stable Diffusion models for the hardware at hand: export, generate, inspect.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Console-script entry point."""
    _quiet_libraries()
    # A terminated run cleans up like an interrupted one (staging folders removed).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        app()
    except KilnError as exc:
        err_console.print(
            f"[bold red]error:[/] {exc}", highlight=False, markup=True, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _quiet_libraries() -> None:
    """Silence library chatter that is not actionable for a kiln user."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in (
        "torch.onnx",
        "torch._dynamo",
        "torch.export",
        "torch.utils._pytree",
        "onnxscript",
        "torchao",
        "bitsandbytes",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)


@contextmanager
def _export_progress() -> Iterator[Any]:
    """A progress bar over components, with a line per exported component."""
    with progress_bar() as progress:
        task = progress.add_task("export", total=None)

        def report(event: Any) -> None:
            progress.update(
                task, total=event.total, description=f"{event.component}: {event.stage}"
            )
            if event.stage in ("parity", "exported", "optimized"):
                progress.console.print(f"  {event.component}: {event.detail}", highlight=False)
            if event.stage == "done":
                progress.update(task, completed=event.index)
                progress.console.print(f"[green]✓[/] {event.detail}", highlight=False)

        yield report


# ----------------------------------------------------------------------------------- export


@app.command()
def export(
    source: Annotated[
        str, typer.Argument(help="Diffusers or BLIP folder, single .safetensors file, or hub id.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to create or extend.")],
    target: Annotated[
        list[str], typer.Option("--target", "-t", help="Export target (repeatable).")
    ] = ["onnx"],  # noqa: B006
    component: Annotated[
        list[str] | None,
        typer.Option("--component", "-c", help="Only these components (repeatable)."),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(help="Diffusers folder with configs/tokenizers for a single-file checkpoint."),
    ] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    exporter: Annotated[
        str, typer.Option(help="torch.onnx exporter: dynamo or torchscript.")
    ] = "dynamo",
    allow_parity_failure: Annotated[
        bool, typer.Option(help="Keep variants that miss their parity budget (recorded as failed).")
    ] = False,
    optimize: Annotated[
        bool,
        typer.Option(help="Try onnxruntime graph fusions; keep them only where measurably faster."),
    ] = False,
) -> None:
    """Export each component of SOURCE, check parity against PyTorch, write OUT/manifest.json."""
    from kiln.exporters.runner import export as run_export

    started = time.perf_counter()
    with _export_progress() as report:
        manifest = run_export(
            source,
            out,
            targets=target,
            components=component,
            config=config,
            opset=opset,
            exporter=exporter,
            allow_parity_failure=allow_parity_failure,
            optimize=optimize,
            progress=report,
        )
    console.print(
        f"exported {len(manifest.variants)} variant(s) to {out} in {time.perf_counter() - started:.1f} s"
    )


# --------------------------------------------------------------------------------- generate


@app.command()
def generate(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `kiln export`.")],
    prompt: Annotated[str, typer.Argument(help="Text prompt.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path(
        "image.png"
    ),
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 25,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 7.5,
    width: Annotated[int | None, typer.Option(help="Image width in pixels.")] = None,
    height: Annotated[int | None, typer.Option(help="Image height in pixels.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed (same seed, same image as diffusers).")
    ] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="What to steer away from.")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help="euler, euler_a, dpmpp_2m, ddim, pndm, lms, ...")
    ] = None,
    num_images: Annotated[int, typer.Option(help="Images per prompt.")] = 1,
    init_image: Annotated[Path | None, typer.Option(help="Start image (image-to-image).")] = None,
    strength: Annotated[
        float, typer.Option(help="How much to change the init image, (0, 1].")
    ] = 0.8,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask (white = repaint).")] = None,
    prefer: Annotated[
        list[str] | None, typer.Option(help="Prefer RUNTIME:PRECISION (repeatable).")
    ] = None,
    require: Annotated[
        list[str] | None, typer.Option(help="Require RUNTIME:PRECISION (repeatable).")
    ] = None,
    target_profile: Annotated[
        str | None,
        typer.Option(
            "--target-profile", help="Deployment target: a TOML file or a built-in target name."
        ),
    ] = None,
    objective: Annotated[
        str, typer.Option(help="What to optimize when choosing variants: latency or memory.")
    ] = "latency",
    max_drift: Annotated[
        list[str] | None,
        typer.Option(help="Drift budget METRIC=LIMIT, e.g. psnr=25 (repeatable)."),
    ] = None,
    plan_only: Annotated[bool, typer.Option(help="Print the plan and exit.")] = False,
) -> None:
    """Generate images with a compiled Stable Diffusion artifact."""
    import kiln

    if mask is not None and init_image is None:
        raise typer.BadParameter("--mask needs --init-image")
    deployment = kiln.load(
        artifact,
        prefer=prefer or (),
        require=require or (),
        target_profile=target_profile,
        objective=objective,
        drift_budget=max_drift or None,
    )
    if plan_only:
        console.print(_plan_table(deployment.plan))
        return
    with progress_bar() as progress:
        task = progress.add_task("denoising", total=steps)
        result = deployment.generate(
            prompt,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance_scale=guidance,
            width=width,
            height=height,
            seed=seed,
            num_images=num_images,
            scheduler=scheduler,
            image=init_image,
            strength=strength,
            mask_image=mask,
            progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    paths = _save_images(result.images, output)
    console.print(
        f"{result.mode} {result.width}x{result.height}, {result.steps} steps ({result.scheduler}), "
        f"seed {result.seed}, {result.seconds:.2f} s -> {', '.join(map(str, paths))}",
        highlight=False,
    )


def _save_images(images: list[Any], output: Path) -> list[Path]:
    from kiln.artifacts import atomic_write_bytes

    paths = []
    for index, image in enumerate(images):
        path = (
            output
            if index == 0
            else output.with_name(f"{output.stem}-{index}{output.suffix or '.png'}")
        )
        atomic_write_bytes(path, _png_bytes(image))
        paths.append(path)
    return paths


def _png_bytes(image: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------- caption


@app.command()
def caption(
    artifact: Annotated[Path, typer.Argument(help="BLIP artifact folder made by `kiln export`.")],
    images: Annotated[list[Path], typer.Argument(help="Image files to caption.")],
    prompt: Annotated[
        str | None, typer.Option(help="Text the caption continues (conditional captioning).")
    ] = None,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1 = greedy).")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 20,
    min_new_tokens: Annotated[int | None, typer.Option(help="Fewest tokens to generate.")] = None,
    do_sample: Annotated[bool, typer.Option(help="Sample instead of greedy/beam.")] = False,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k likeliest tokens.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="Penalty for repeated tokens (1 = none).")
    ] = None,
    num_captions: Annotated[int, typer.Option(help="Captions per image.")] = 1,
    seed: Annotated[int | None, typer.Option(help="Random seed for sampling.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    prefer: Annotated[
        list[str] | None, typer.Option(help="Prefer RUNTIME:PRECISION (repeatable).")
    ] = None,
    require: Annotated[
        list[str] | None, typer.Option(help="Require RUNTIME:PRECISION (repeatable).")
    ] = None,
    target_profile: Annotated[
        str | None,
        typer.Option("--target-profile", help="Deployment target: a TOML file or a built-in name."),
    ] = None,
    plan_only: Annotated[bool, typer.Option(help="Print the plan and exit.")] = False,
) -> None:
    """Caption images with a compiled BLIP artifact (transformers' decoding strategies)."""
    import kiln

    deployment = kiln.load(
        artifact, prefer=prefer or (), require=require or (), target_profile=target_profile
    )
    if plan_only:
        console.print(_plan_table(deployment.plan))
        return
    result = deployment.caption(
        list(images),
        prompt=prompt,
        seed=seed,
        num_captions=num_captions,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample or None,
        top_p=top_p,
        top_k=top_k,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
    )
    if as_json:
        data = result.to_dict()
        data["images"] = [str(p) for p in images]
        print(json.dumps(data, indent=2))
        return
    for path, captions in zip(images, result.captions, strict=True):
        for text in captions:
            console.print(f"{path}: {text}", highlight=False, markup=False)
    err_console.print(f"{len(images)} image(s) in {result.seconds:.2f} s", highlight=False)


# ---------------------------------------------------------------------------------- inspect


@app.command()
def inspect(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
    verify: Annotated[bool, typer.Option(help="Check every file against its SHA-256.")] = False,
) -> None:
    """Show what an artifact holds: variants, sizes, parity, versions."""
    from kiln.artifacts import read_manifest, verify_files

    manifest = read_manifest(artifact)
    if verify:
        verify_files(artifact, manifest.support_files)
        for variant in manifest.variants:
            verify_files(artifact, variant.files)
    if as_json:
        print(json.dumps(manifest.to_dict(), indent=2))
        return
    console.print(
        f"[bold]{artifact}[/]: {manifest.family} from {manifest.source.get('id')} ({manifest.source.get('kind')})"
    )
    info = ", ".join(f"{k}={v}" for k, v in manifest.model_info.items())
    console.print(f"model: {info}", highlight=False)
    console.print(_variants_table(manifest))
    if verify:
        console.print("[green]all files match their SHA-256[/]")


def _variants_table(manifest: Any) -> Table:
    table = Table(title="variants")
    for column in (
        "component",
        "target",
        "precision",
        "size",
        "parity (max |diff| / budget)",
        "export",
        "files",
    ):
        table.add_column(column)
    for v in manifest.variants:
        if v.parity is None:
            parity = "not measured"
        else:
            name, worst, limit = v.parity.worst()
            parity = f"{'ok' if v.parity.passed else 'FAILED'} {worst:.1e} / {limit:.1e}"
        export_time = f"{v.export_seconds:.1f} s" if v.export_seconds is not None else "-"
        table.add_row(
            v.component,
            v.target,
            v.precision.value,
            _size(v.size_bytes),
            parity,
            export_time,
            str(len(v.files)),
        )
    return table


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _plan_table(plan: Any) -> Table:
    title = f"plan ({plan.objective}, target {plan.target})" if plan.target else "plan"
    table = Table(title=title, caption="\n".join(plan.notes) or None)
    for column in ("component", "variant", "runtime", "device", "reason"):
        table.add_column(column, overflow="fold")
    for row in plan.rows():
        table.add_row(*(Text(cell) for cell in row))  # reasons hold [brackets]: never markup
    return table


# ----------------------------------------------------------------------------------- doctor


@app.command()
def doctor(
    artifact: Annotated[Path | None, typer.Argument(help="Artifact folder to plan for.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the profile as JSON.")] = False,
    target_profile: Annotated[
        str | None,
        typer.Option(
            "--target-profile", help="Deployment target: a TOML file or a built-in target name."
        ),
    ] = None,
) -> None:
    """Show this machine's hardware, installed runtimes, its deployment target, and the plan."""
    from kiln.profiles.hardware import detect, format_profile, install_hint
    from kiln.profiles.targets import target_for

    profile = detect()
    target = target_for(profile, target_profile)
    plan = None
    if artifact is not None:
        from kiln.artifacts import read_manifest
        from kiln.profiles.select import Policy, select

        plan = select(read_manifest(artifact), profile, Policy(), target)
    if as_json:
        data: dict[str, Any] = {
            "profile": profile.to_dict(),
            "target": {
                "name": target.name,
                "source": target.source,
                "order": [str(p) for p in target.order],
            },
        }
        if plan is not None:
            data["plan"] = [
                dict(zip(("component", "variant", "runtime", "device", "reason"), r, strict=True))
                | {"options": dict(c.options), "rejected": [list(x) for x in c.rejected]}
                for r, c in zip(plan.rows(), plan.choices, strict=True)
            ]
            data["plan_notes"] = list(plan.notes)
        print(json.dumps(data, indent=2))
        return
    console.print(format_profile(profile))
    console.print(
        f"target: {target.name} ({target.source}): {target.description}",
        highlight=False,
        markup=False,
    )
    missing = [r.name for r in profile.runtimes if not r.available]
    for name in missing:
        console.print(Text.assemble(("missing ", "yellow"), f"{name}: {install_hint(name)}"))
    if plan is not None:
        console.print(_plan_table(plan))


# ------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's files.")] = Path(
        "kiln-demo"
    ),
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 10,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
) -> None:
    """Build a tiny random-weight SD model, export it to ONNX, generate, compare with PyTorch."""
    from kiln.demo import run_demo

    run_demo(
        out,
        steps=steps,
        seed=seed,
        console=console,
        export_progress=_export_progress,
        step_progress=progress_bar,
    )


from kiln.bench.cli import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


if __name__ == "__main__":
    main()
