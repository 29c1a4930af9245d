"""The `kiln` command: doctor, export, quantize, generate, caption, bench, serve, inspect, demo.

User errors (`KilnError`) print one line on stderr and exit non-zero; anything else is a
kiln bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from kiln.errors import KilnError
from kiln.ui import console, err_console, plan_table, progress_bar

# OS errors that say something about the machine (full disk, permissions, a file where a folder
# must be), not about kiln: one line, like a KilnError. Other OS errors keep their traceback.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ENAMETOOLONG,
    }
)

app = typer.Typer(
    name="kiln",
    help="Compile Stable Diffusion and BLIP models for the hardware at hand: export, quantize, "
    "generate, caption, bench, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def main() -> None:
    """Console-script entry point."""
    _quiet_libraries()
    _warnings_as_lines()
    # A terminated run cleans up like an interrupted one (staging folders removed).
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        app()
    except KilnError as exc:
        from rich.markup import escape

        # Messages hold literal brackets (pip install 'kiln[gpu]'), never markup.
        err_console.print(
            f"[bold red]error:[/] {escape(str(exc))}", highlight=False, markup=True, soft_wrap=True
        )
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in ENVIRONMENT_ERRNOS:
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)


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


def _warnings_as_lines() -> None:
    """kiln's own warnings print as one readable line, not as a source location."""
    from kiln.versions import LibraryVersionWarning

    original = warnings.showwarning

    def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, LibraryVersionWarning):
            err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)
        else:
            original(message, category, *args, **kwargs)

    warnings.showwarning = show


def _version_lines(variants: Any) -> list[Text]:
    from kiln.versions import version_drift

    return [Text(f"version drift: {drift}", style="yellow") for drift in version_drift(variants)]


# Stages whose detail changes while they run (TensorRT's build phases, calibration).
_LIVE_STAGES = ("building", "typing", "calibrate")


@contextmanager
def _export_progress() -> Iterator[Any]:
    """A progress bar over components, with a line per exported component."""
    with progress_bar() as progress:
        task = progress.add_task("export", total=None)

        def report(event: Any) -> None:
            where = f"{event.component}: " if event.component else ""
            live = f" {event.detail}" if event.stage in _LIVE_STAGES else ""
            progress.update(task, total=event.total, description=f"{where}{event.stage}{live}")
            if event.stage == "calibrate":  # prompts or images run, not components
                progress.update(task, completed=event.index)
            if event.stage in ("parity", "exported", "optimized", "built", "drift"):
                progress.console.print(f"  {event.component}: {event.detail}", highlight=False)
            if event.stage == "done":
                progress.update(task, completed=event.index)
                progress.console.print(f"[green]✓[/] {event.detail}", highlight=False)

        yield report


@contextmanager
def _quantize_progress(precision: str = "int8") -> Iterator[Any]:
    """A progress bar over calibration and quantization, with a line per quantized variant."""
    with progress_bar() as progress:
        task = progress.add_task(f"quantize {precision}", total=None)

        def report(event: Any) -> None:
            where = f"{event.component}: " if event.component else ""
            progress.update(task, description=f"{where}{event.stage} {event.detail}".strip())
            if event.total:
                progress.update(task, completed=event.done, total=event.total)
            if event.stage == "done":
                progress.console.print(f"[green]✓[/] {event.detail}", highlight=False)

        yield report


# ----------------------------------------------------------------------------------- export


@app.command()
def export(
    source: Annotated[
        str,
        typer.Argument(
            help="Diffusers or BLIP folder, single .safetensors file, hub id, or a built-in "
            "trained model: kiln:shapes-sd, kiln:shapes-blip."
        ),
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
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="Fuse a LoRA (.safetensors, kohya or diffusers keys) into the weights first: "
            "FILE or FILE:SCALE (repeatable, fused in order)."
        ),
    ] = None,
    with_attentions: Annotated[
        bool,
        typer.Option(
            help="BLIP: also export the decoder that outputs cross-attention weights "
            "(caption --attention-map)."
        ),
    ] = False,
    precision: Annotated[
        list[str] | None,
        typer.Option(
            help="Also quantize to fp16/bf16/int8/int4/nf4 (repeatable), as `kiln quantize`. "
            "With --target tensorrt: the engines' precisions, fp16 (default), bf16, int8, fp8, fp32."
        ),
    ] = None,
    min_size: Annotated[
        str | None, typer.Option(help="TensorRT: smallest image WIDTHxHEIGHT the engines take.")
    ] = None,
    max_size: Annotated[
        str | None, typer.Option(help="TensorRT: largest image WIDTHxHEIGHT the engines take.")
    ] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="TensorRT: most images per call the engines take.")
    ] = None,
    static: Annotated[
        str | None,
        typer.Option(help="TensorRT: one image size WIDTHxHEIGHT (min = opt = max)."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            help="TensorRT: print the optimization profiles per component; build nothing."
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --dry-run: the profiles as one JSON document.")
    ] = False,
) -> None:
    """Export each component of SOURCE, check parity against PyTorch, write OUT/manifest.json.

    --target tensorrt builds TensorRT engines from the onnx fp32 variants (exported first
    from a source model; SOURCE may also be an artifact, with -o the same folder).
    """
    from kiln.errors import InvalidRequestError
    from kiln.exporters.runner import export as run_export

    engines = None
    if "tensorrt" in target:
        from kiln.exporters.tensorrt import EngineOptions, ShapeRange

        shapes = ShapeRange.parse(
            min_size=min_size, max_size=max_size, max_batch=max_batch, static=static
        )
        engines = EngineOptions(tuple(precision or ["fp16"]), shapes)
    elif any(v is not None for v in (min_size, max_size, max_batch, static)) or dry_run:
        raise InvalidRequestError(
            "--min-size, --max-size, --max-batch, --static and --dry-run are for --target tensorrt"
        )
    if as_json and not dry_run:
        raise InvalidRequestError("--json prints the --dry-run profiles; add --dry-run")
    if dry_run:
        _print_engine_plan(source, component, engines, config, as_json)
        return
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
            with_attentions=with_attentions,
            loras=lora or (),
            engines=engines,
            progress=report,
        )
    console.print(
        f"exported {len(manifest.variants)} variant(s) to {out} in {time.perf_counter() - started:.1f} s"
    )
    if engines is not None:
        return  # --precision named the engines' precisions
    for name in precision or ():
        _run_quantize(out, name, target, component or [])


def _print_engine_plan(
    source: str, components: list[str] | None, engines: Any, config: str | None, as_json: bool
) -> None:
    """`--dry-run`: the profiles each component's engine would be built with."""
    import contextlib

    from kiln.exporters.tensorrt import plan_engines

    # Loading a source model must not print on stdout: with --json it holds one document.
    with contextlib.redirect_stdout(sys.stderr):
        plan = plan_engines(source, components=components, options=engines, config=config)
    if as_json:
        print(json.dumps(plan.to_dict(), indent=2))
        return
    precisions = ", ".join(p.value for p in plan.precisions)
    table = Table(title=f"TensorRT optimization profiles ({precisions}): nothing built")
    for column in ("component", "input", "min", "opt", "max"):
        table.add_column(column, overflow="fold")
    for name, profile in plan.profiles.items():
        for index, tensor in enumerate(profile.inputs):
            shapes = (tensor.min, tensor.opt, tensor.max)
            table.add_row(name if index == 0 else "", tensor.name, *(str(tuple(s)) for s in shapes))
    console.print(table)
    console.print(f"onnx: {plan.onnx}", highlight=False, markup=False)
    for name, profile in plan.profiles.items():
        for note in profile.notes:
            console.print(f"note: {name}: {note}", highlight=False, markup=False)


# --------------------------------------------------------------------------------- quantize


@app.command()
def quantize(
    artifact: Annotated[Path, typer.Argument(help="Artifact folder made by `kiln export`.")],
    precision: Annotated[str, typer.Option(help="fp16, bf16, int8, int4 or nf4.")],
    target: Annotated[
        list[str] | None,
        typer.Option("--target", "-t", help="Quantize this target's fp32 variants (repeatable)."),
    ] = None,
    component: Annotated[
        list[str] | None,
        typer.Option("--component", "-c", help="Only these components (repeatable)."),
    ] = None,
    calibration: Annotated[
        int, typer.Option(help="Prompts (SD) or images (BLIP) the fp32 pipeline runs.")
    ] = 8,
    method: Annotated[
        str | None,
        typer.Option(help="cast, weight-only, dynamic, static or hybrid (default: per cell)."),
    ] = None,
    group_size: Annotated[int | None, typer.Option(help="Block size for int4/nf4.")] = None,
    ratio: Annotated[
        float | None, typer.Option(help="OpenVINO int4/nf4: share of layers at 4 bit.")
    ] = None,
    asymmetric: Annotated[bool, typer.Option(help="Asymmetric int4/int8 weights.")] = False,
    prompts: Annotated[
        Path | None, typer.Option(help="Calibration prompts, one per line (SD).")
    ] = None,
    images: Annotated[Path | None, typer.Option(help="Calibration image folder (BLIP).")] = None,
    steps: Annotated[int, typer.Option(help="Denoising steps per calibration prompt.")] = 4,
    size: Annotated[int | None, typer.Option(help="Calibration image side in pixels.")] = None,
) -> None:
    """Add quantized variants to ARTIFACT, with their size and measured drift against fp32."""
    _run_quantize(
        artifact,
        precision,
        target or [],
        component or [],
        calibration=calibration,
        method=method,
        group_size=group_size,
        ratio=ratio,
        symmetric=False if asymmetric else None,
        prompts=prompts,
        images=images,
        steps=steps,
        size=size,
    )


def _run_quantize(
    artifact: Path, precision: str, targets: list[str], components: list[str], **options: Any
) -> None:
    from kiln.quant.runner import quantize as run_quantize

    started = time.perf_counter()
    with _quantize_progress(precision) as report:
        manifest = run_quantize(
            artifact, precision, targets=targets, components=components, progress=report, **options
        )
    count = sum(v.precision.value == precision for v in manifest.variants)
    console.print(
        f"{count} {precision} variant(s) in {artifact} after {time.perf_counter() - started:.1f} s; "
        f"`kiln inspect {artifact}` lists their drift"
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
        str | None,
        typer.Option(
            help="What to optimize: latency, throughput (batches) or memory "
            "(default: what `kiln optimize` recorded, else latency)."
        ),
    ] = None,
    max_drift: Annotated[
        list[str] | None,
        typer.Option(help="Drift budget METRIC=LIMIT, e.g. psnr=25 (repeatable)."),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="LoRA FILE[:SCALE] (safetensors) switched on at load, no re-export (repeatable)."
        ),
    ] = None,
    embedding: Annotated[
        list[Path] | None,
        typer.Option(help="Textual-inversion embedding (safetensors); its token is the file stem."),
    ] = None,
    plan_only: Annotated[bool, typer.Option(help="Print the plan and exit.")] = False,
) -> None:
    """Generate images with a compiled Stable Diffusion artifact."""
    import kiln
    from kiln.artifacts import check_output_file

    if mask is not None and init_image is None:
        raise typer.BadParameter("--mask needs --init-image")
    check_output_file(output, "--output")
    deployment = kiln.load(
        artifact,
        prefer=prefer or (),
        require=require or (),
        target_profile=target_profile,
        objective=objective,
        drift_budget=max_drift or None,
        loras=lora or None,
        embeddings=embedding or (),
    )
    if plan_only:
        console.print(plan_table(deployment.plan))
        return
    if lora or embedding:
        switch = deployment.weight_switch
        named = [f"{x.path.name} x {x.scale:g}" for x in switch.loras]
        named += [f"<{e.token}>" for e in switch.embeddings]
        counts = ", ".join(f"{c}: {n}" for c, n in switch.changed.items())
        console.print(
            f"LoRA / embeddings at load: {', '.join(named)} ({counts} weights) "
            f"in {switch.seconds:.2f} s",
            highlight=False,
            markup=False,
        )
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
    from kiln.artifacts import atomic_write_png

    paths = []
    for index, image in enumerate(images):
        path = (
            output
            if index == 0
            else output.with_name(f"{output.stem}-{index}{output.suffix or '.png'}")
        )
        atomic_write_png(path, image)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------- caption


@app.command()
def caption(
    artifact: Annotated[Path, typer.Argument(help="BLIP artifact folder made by `kiln export`.")],
    images: Annotated[
        list[Path], typer.Argument(help="Image files, or one folder (a training set).")
    ],
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
    recursive: Annotated[bool, typer.Option(help="Folder: include its subfolders.")] = False,
    sidecar: Annotated[
        str | None, typer.Option(help="Folder: write IMAGE.SUFFIX beside each image (.txt).")
    ] = None,
    jsonl: Annotated[
        Path | None, typer.Option(help="Folder: write one JSON Lines file (metadata.jsonl).")
    ] = None,
    prefix: Annotated[str, typer.Option(help="Folder: text put before every caption.")] = "",
    overwrite: Annotated[bool, typer.Option(help="Folder: replace existing captions.")] = False,
    batch_size: Annotated[int, typer.Option(min=1, help="Folder: images per call.")] = 8,
    attention_map: Annotated[
        Path | None,
        typer.Option(
            help="Write the image with a heat map per word (PNG; several images: NAME-1.png, "
            "...). Needs an artifact exported --with-attentions."
        ),
    ] = None,
) -> None:
    """Caption images with a compiled BLIP artifact (transformers' decoding strategies).

    Given one folder, captions every image in it (`--recursive`: and below) for training:
    a caption file beside each image (`--sidecar .txt`, the default) or `--jsonl FILE`.
    """
    import kiln
    from kiln.errors import InvalidRequestError

    options: dict[str, Any] = {
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "min_new_tokens": min_new_tokens,
        "do_sample": do_sample or None,
        "top_p": top_p,
        "top_k": top_k,
        "temperature": temperature,
        "repetition_penalty": repetition_penalty,
    }
    folder = images[0] if len(images) == 1 and images[0].is_dir() else None
    if folder is None and any(p.is_dir() for p in images):
        raise InvalidRequestError("pass image files, or one folder alone")
    if folder is None and (recursive or sidecar or jsonl or prefix or overwrite):
        raise InvalidRequestError(
            "--recursive, --sidecar, --jsonl, --prefix and --overwrite are for a folder"
        )
    if attention_map is not None:
        from kiln.artifacts import check_output_file

        if folder is not None:
            raise InvalidRequestError("--attention-map is for image files, not a folder")
        check_output_file(attention_map, "--attention-map")
    if folder is not None:
        from kiln.artifacts import check_output_file
        from kiln.pipelines.dataset_captions import DatasetOutput, check_folder

        output = DatasetOutput(
            sidecar=".txt" if sidecar is None and jsonl is None else sidecar,
            jsonl=jsonl,
            prefix=prefix,
            overwrite=overwrite,
        )
        if jsonl is not None:
            check_output_file(jsonl, "--jsonl")
        check_folder(folder, output, recursive)  # refusals come before the model loads
    deployment = kiln.load(
        artifact, prefer=prefer or (), require=require or (), target_profile=target_profile
    )
    if plan_only:
        console.print(plan_table(deployment.plan))
        return
    if folder is not None:
        _caption_folder(
            deployment,
            folder,
            output,
            recursive=recursive,
            batch_size=batch_size,
            as_json=as_json,
            caption_options={"prompt": prompt, "seed": seed, **options},
        )
        return
    result = deployment.caption(
        list(images),
        prompt=prompt,
        seed=seed,
        num_captions=num_captions,
        attentions=attention_map is not None,
        **options,
    )
    maps = []
    if attention_map is not None:
        from kiln.pipelines.attention_maps import write_attention_maps
        from kiln.pipelines.captioning import open_images

        maps = write_attention_maps(attention_map, open_images(list(images)), result)
    if as_json:
        data = result.to_dict()
        data["images"] = [str(p) for p in images]
        if maps:
            data["attention_maps"] = [str(p) for p in maps]
        print(json.dumps(data, indent=2))
        return
    for path, captions in zip(images, result.captions, strict=True):
        for text in captions:
            console.print(f"{path}: {text}", highlight=False, markup=False)
    for written in maps:
        console.print(f"attention map: {written}", highlight=False, markup=False)
    err_console.print(f"{len(images)} image(s) in {result.seconds:.2f} s", highlight=False)


def _caption_folder(
    deployment: Any,
    folder: Path,
    output: Any,
    *,
    recursive: bool,
    batch_size: int,
    as_json: bool,
    caption_options: dict[str, Any],
) -> None:
    from kiln.pipelines.dataset_captions import caption_folder

    def caption(pictures: list[Any]) -> list[str]:
        return [c[0] for c in deployment.caption(pictures, **caption_options).captions]

    with progress_bar() as progress:
        task = progress.add_task("captioning", total=None)
        report = caption_folder(
            caption,
            folder,
            output,
            recursive=recursive,
            batch_size=batch_size,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if as_json:
        print(json.dumps(report.to_dict(folder), indent=2))
    for path, reason in report.unreadable:
        err_console.print(
            f"warning: skipped {path}: {reason}", highlight=False, markup=False, soft_wrap=True
        )
    rate = f" ({len(report.captioned) / report.seconds:.1f} images/s)" if report.seconds else ""
    where = str(output.jsonl) if output.jsonl else f"*{output.sidecar} beside each image"
    err_console.print(
        f"{len(report.captioned)} captioned{rate}, {len(report.kept)} kept (captioned before), "
        f"{len(report.unreadable)} unreadable -> {where}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


@app.command()
def grid(
    artifact: Annotated[Path, typer.Argument(help="Stable Diffusion artifact folder.")],
    prompt: Annotated[
        list[str], typer.Option(help="Prompt (repeat it: the prompts become an axis).")
    ],
    vary: Annotated[
        list[str] | None,
        typer.Option(help="OPTION=V1,V2,... (up to three; variant=onnx:fp32,openvino:int8)."),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the grid.")] = Path("grid"),
    steps: Annotated[int, typer.Option(help="Denoising steps (when not an axis).")] = 25,
    guidance: Annotated[float, typer.Option(help="Guidance scale (when not an axis).")] = 7.5,
    scheduler: Annotated[str | None, typer.Option(help="Scheduler (when not an axis).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of every cell (random if unset).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width.")] = None,
    height: Annotated[int | None, typer.Option(help="Image height.")] = None,
    negative_prompt: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
) -> None:
    """Sweep up to three generate() options at one seed into one labelled grid image."""
    import random

    import kiln
    from kiln.artifacts import check_output_folder, read_manifest
    from kiln.pipelines.grid import Axis, parse_axis, plan_cells, run_grid

    read_manifest(artifact)
    axes = [parse_axis(text) for text in vary or ()]
    if len(prompt) > 1:
        axes.insert(0, Axis("prompt", tuple(prompt)))
    fixed: dict[str, Any] = {
        "prompt": prompt[0],
        "steps": steps,
        "guidance_scale": guidance,
        "seed": seed if seed is not None else random.randrange(2**31),
    }
    for name, value in (
        ("scheduler", scheduler),
        ("width", width),
        ("height", height),
        ("negative_prompt", negative_prompt),
    ):
        if value is not None:
            fixed[name] = value
    total = len(plan_cells(axes, fixed))  # refuses a bad grid before anything loads
    check_output_folder(out)

    def load(variant: str | None) -> Any:
        return kiln.load(artifact, require=[variant] if variant else ())

    with progress_bar() as progress:
        task = progress.add_task("grid cells", total=total)
        result = run_grid(
            load, axes, fixed, out, on_cell=lambda done, n: progress.update(task, completed=done)
        )
    for cell in result.cells:
        shown = ""
        if cell.get("identical_to_first_variant"):
            shown = "  identical to the first variant"
        elif "psnr_vs_first_variant" in cell:
            score = cell["psnr_vs_first_variant"]
            shown = "  PSNR -" if score is None else f"  PSNR {score:.1f} dB vs first variant"
        params = ", ".join(f"{k}={cell['params'][k]}" for k in (a.name for a in axes))
        console.print(f"{cell['file']}: {params}{shown}", highlight=False, markup=False)
    console.print(
        f"{len(result.cells)} cells, seed {fixed['seed']} -> {result.grid_path}", highlight=False
    )


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
    for lora in manifest.source.get("loras", []):
        console.print(
            f"LoRA fused: {lora['file']} x {lora['scale']:g} ({lora['format']}, "
            f"{', '.join(lora['components'])}; sha256 {lora['sha256'][:12]})",
            highlight=False,
            markup=False,
        )
    switchable = [
        v.id for v in manifest.variants if any(f.path.endswith("/weights.json") for f in v.files)
    ]
    if switchable:
        console.print(
            f"LoRAs at load (weight map recorded): {', '.join(switchable)} and their fp16/bf16 "
            "variants",
            highlight=False,
        )
    console.print(_variants_table(manifest))
    for line in _version_lines(manifest.variants):
        console.print(line)
    if verify:
        console.print("[green]all files match their SHA-256[/]")


def _variants_table(manifest: Any) -> Table:
    from kiln.profiles.select import DEFAULT_DRIFT_BUDGET, drift_problem

    table = Table(title="variants")
    for column in ("variant", "method", "size", "parity / drift", "auto-selected?"):
        table.add_column(column, overflow="fold")
    fp32_sizes = {
        v.component: v.size_bytes for v in manifest.variants if v.precision.value == "fp32"
    }
    for v in manifest.variants:
        size = _size(v.size_bytes)
        if v.component in fp32_sizes and v.precision.value != "fp32":
            size += f" ({v.size_bytes / max(fp32_sizes[v.component], 1):.0%})"
        problem = drift_problem(v, DEFAULT_DRIFT_BUDGET)
        if v.parity is not None and not v.parity.passed:
            problem = "failed its parity check"
        table.add_row(
            v.id,
            (v.quantization or {}).get("method", "export"),
            size,
            _quality(v),
            Text(f"no: {problem}" if problem else "yes", style="yellow" if problem else ""),
        )
    return table


def _quality(variant: Any) -> str:
    """Parity against PyTorch for exported variants, drift against fp32 for quantized ones."""
    from kiln.bench.quality import METRICS as QUALITY_METRICS

    if variant.parity is not None:
        name, worst, limit = variant.parity.worst()
        return f"parity {'ok' if variant.parity.passed else 'FAILED'} {worst:.1e} / {limit:.1e}"
    drift = variant.drift or {}
    shown = [
        f"{m} {drift[m]:g}"
        for m in ("psnr", "ssim", "bleu", "exact_match", "itm_abs", *QUALITY_METRICS)
        if m in drift
    ]
    return ", ".join(shown) or "not measured"


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


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
    from kiln.profiles.select import cuda_unavailable
    from kiln.profiles.targets import target_for
    from kiln.quant.recipes import matrix_status
    from kiln.versions import version_drift

    profile = detect()
    off_gpu = cuda_unavailable(profile)
    target = target_for(profile, target_profile)
    plan = None
    if artifact is not None:
        from kiln.artifacts import read_manifest
        from kiln.profiles.select import Policy, select

        manifest = read_manifest(artifact)
        plan = select(manifest, profile, Policy(), target)
        planned = [manifest.variant(choice.variant_id) for choice in plan.choices]
    if as_json:
        data: dict[str, Any] = {
            "profile": profile.to_dict(),
            "target": {
                "name": target.name,
                "source": target.source,
                "order": [str(p) for p in target.order],
            },
        }
        data["quantization"] = matrix_status(profile)
        data["not_on_nvidia_gpu"] = off_gpu
        if plan is not None:
            data["plan"] = [
                dict(zip(("component", "variant", "runtime", "device", "reason"), r, strict=True))
                | {"options": dict(c.options), "rejected": [list(x) for x in c.rejected]}
                for r, c in zip(plan.rows(), plan.choices, strict=True)
            ]
            data["plan_notes"] = list(plan.notes)
            data["version_drift"] = [d.to_dict() for d in version_drift(planned)]
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
    for runtime, why in off_gpu.items():  # why selection never places it on a GPU here
        console.print(Text.assemble(("not on an NVIDIA GPU ", "yellow"), f"{runtime}: {why}"))
    console.print(_quantization_table(matrix_status(profile)))
    if plan is not None:
        console.print(plan_table(plan))
        for line in _version_lines(planned):
            console.print(line)


def _quantization_table(rows: list[dict[str, str]]) -> Table:
    table = Table(title="quantization cells (`kiln quantize --target T --precision P`)")
    for column in ("cell", "methods", "library", "status"):
        table.add_column(column, overflow="fold")
    for row in rows:
        style = "green" if row["status"] == "runs here" else "yellow"
        table.add_row(row["cell"], row["methods"], row["library"], Text(row["status"], style=style))
    return table


# ------------------------------------------------------------------------------------ serve


@app.command()
def serve(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact folders to serve.")],
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (AUTOMATIC1111's by default).")] = 7860,
    api_key: Annotated[
        str | None, typer.Option(help="Require this bearer key on every endpoint but health.")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option(help="Read the API key from this file.")
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="Waiting jobs per model before 429.")] = 8,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds a request may take.")] = 600.0,
    max_pixels: Annotated[
        int, typer.Option(min=4096, help="Largest width x height generated or accepted.")
    ] = 1024 * 1024,
    max_steps: Annotated[int, typer.Option(min=1, help="Most denoising steps per image.")] = 150,
    max_body_mb: Annotated[float, typer.Option(min=0.01, help="Largest request body.")] = 32.0,
    grace: Annotated[
        float, typer.Option(help="Seconds running jobs get to finish on SIGTERM.")
    ] = 30.0,
    prefer: Annotated[list[str] | None, typer.Option(help="Preferred variants.")] = None,
    require: Annotated[list[str] | None, typer.Option(help="Required variants.")] = None,
    objective: Annotated[str, typer.Option(help="latency, throughput or memory.")] = "latency",
    lora_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder of LoRA .safetensors files that prompts name as <lora:NAME:0.8>."
        ),
    ] = None,
    ray: Annotated[
        bool, typer.Option("--ray", help="Deploy as a Ray Serve application (kiln[ray]).")
    ] = False,
    replicas: Annotated[
        int | None, typer.Option(min=1, help="Ray: replicas, each one copy of every model.")
    ] = None,
    autoscale: Annotated[
        str | None, typer.Option(help="Ray: MIN:MAX replicas, scaled on ongoing requests.")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray: cluster to join (default RAY_ADDRESS, else local).")
    ] = None,
    replica_cpus: Annotated[float, typer.Option(help="Ray: CPUs per replica.")] = 1.0,
    replica_gpus: Annotated[
        float, typer.Option(help="Ray: GPUs per replica (fractions share a GPU).")
    ] = 0.0,
) -> None:
    """Serve artifacts over HTTP: AUTOMATIC1111 and OpenAI compatible APIs, kiln's, a page."""
    from kiln.errors import BackendUnavailableError, InvalidRequestError

    try:
        import uvicorn

        from kiln.serve.app import create_app
        from kiln.serve.models import ModelRegistry
        from kiln.serve.settings import ServeSettings
    except ImportError as exc:
        raise BackendUnavailableError(
            f"kiln serve needs the serve extra ({exc.name} is missing): "
            "bash scripts/install.sh serve"
        ) from None
    if api_key is not None and api_key_file is not None:
        raise InvalidRequestError("pass --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidRequestError(f"cannot read --api-key-file {api_key_file}: {exc}") from None
        if not api_key:
            raise InvalidRequestError(f"--api-key-file {api_key_file} is empty")
    settings = ServeSettings(
        host=host,
        port=port,
        api_key=api_key,
        max_queue=max_queue,
        timeout=timeout,
        max_pixels=max_pixels,
        max_steps=max_steps,
        max_body_mb=max_body_mb,
        prefer=tuple(prefer or ()),
        require=tuple(require or ()),
        objective=objective,
        grace=grace,
        lora_dir=lora_dir.resolve() if lora_dir is not None else None,
    )
    if lora_dir is not None and not lora_dir.is_dir():
        raise InvalidRequestError(f"--lora-dir {lora_dir} is not a folder")
    ray_flags = replicas is not None or autoscale is not None or ray_address is not None
    if not ray and ray_flags:
        raise InvalidRequestError("--replicas, --autoscale and --ray-address need --ray")
    if ray:
        _serve_on_ray(
            artifacts, settings, replicas, autoscale, ray_address, replica_cpus, replica_gpus
        )
        return
    registry = ModelRegistry(artifacts, settings)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    err_console.print(
        f"kiln serve: {', '.join(f'{m.name} ({m.kind})' for m in registry.models.values())} "
        f"on http://{host}:{port} (ready at /readyz once loaded and warmed up)",
        highlight=False,
    )
    # uvicorn stops gracefully on SIGTERM, then raises the signal again for the previous
    # handler: a served SIGTERM is a clean stop (exit 0), not kiln's interrupt.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.run(
        create_app(registry, settings),
        host=host,
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=int(grace),
    )


def _serve_on_ray(
    artifacts: list[Path],
    settings: Any,
    replicas: int | None,
    autoscale: str | None,
    address: str | None,
    cpus: float,
    gpus: float,
) -> None:
    from kiln.artifacts import read_manifest
    from kiln.errors import InvalidRequestError
    from kiln.serve.ray_app import RaySettings, parse_autoscale, serve_on_ray

    if replicas is not None and autoscale is not None:
        raise InvalidRequestError("pass --replicas or --autoscale, not both")
    for path in artifacts:
        read_manifest(path)  # a wrong path fails here, before a cluster starts
    ray_settings = RaySettings(
        replicas=replicas or 1,
        autoscale=parse_autoscale(autoscale) if autoscale is not None else None,
        address=address,
        replica_cpus=cpus,
        replica_gpus=gpus,
    )
    serve_on_ray(
        artifacts,
        settings,
        ray_settings,
        say=lambda line: err_console.print(line, highlight=False, markup=False, soft_wrap=True),
    )


@app.command()
def loadtest(
    artifacts: Annotated[list[Path], typer.Argument(help="Artifact folders to serve.")],
    server: Annotated[
        list[str] | None,
        typer.Option(help="single, or ray:N (repeatable; each runs the same load)."),
    ] = None,
    users: Annotated[int, typer.Option(min=1, help="Concurrent Locust users.")] = 8,
    run_time: Annotated[float, typer.Option(min=1, help="Seconds of measured load.")] = 20.0,
    warmup: Annotated[float, typer.Option(min=0, help="Seconds of load before RSS is read.")] = 5.0,
    mix: Annotated[
        str, typer.Option(help="Weights of txt2img, caption and openai requests.")
    ] = "txt2img=1,caption=1,openai=1",
    size: Annotated[int, typer.Option(help="Image side of every request.")] = 64,
    steps: Annotated[int, typer.Option(min=1, help="txt2img steps.")] = 4,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds before a request fails.")] = 60.0,
    kill_after: Annotated[
        float | None,
        typer.Option(help="Ray with 2+ replicas: kill one this many seconds into the load."),
    ] = None,
    max_queue: Annotated[int, typer.Option(min=1, help="The server's --max-queue.")] = 8,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the figures here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write a chart of the figures here (PNG).")
    ] = None,
) -> None:
    """Start kiln serve (single process or Ray), hold it under Locust's load, print figures."""
    from kiln.artifacts import atomic_write_text, check_output_file, read_manifest
    from kiln.serve.loadtest import LoadOptions, parse_setup, plot_results, run_loadtest

    setups = [parse_setup(text) for text in server or ["single"]]
    for path in artifacts:
        read_manifest(path)
    for path in (json_out, plot):
        if path is not None:
            check_output_file(path)
    options = LoadOptions(
        users=users,
        run_seconds=run_time,
        warmup_seconds=warmup,
        mix=mix,
        size=size,
        steps=steps,
        timeout=timeout,
        kill_after=kill_after,
        serve_options=("--max-queue", str(max_queue)),
    )
    results = run_loadtest(artifacts, setups, options, say=lambda line: err_console.print(line))
    console.print(_loadtest_table(results))
    for result in results:
        for line in _loadtest_lines(result):
            console.print(line, highlight=False, markup=False)
    if json_out is not None:
        figures = {"options": options.__dict__, "runs": [r.to_dict() for r in results]}
        atomic_write_text(json_out, json.dumps(figures, indent=2))
    if plot is not None:
        console.print(f"chart: {plot_results(results, plot)}", highlight=False)


def _loadtest_table(results: list[Any]) -> Table:
    table = Table(title="kiln loadtest (Locust, loopback)")
    for column in ("server", "request", "served/s", "p50 ms", "p99 ms", "429 share", "other"):
        table.add_column(column, justify="left" if column in ("server", "request") else "right")
    for result in results:
        for name, report in sorted(result.endpoints.items()):
            statuses = report["statuses"]
            total = max(1, report["requests"])
            other = {k: v for k, v in statuses.items() if k not in ("200", "429")}
            table.add_row(
                result.setup,
                name,
                f"{report['served_per_s']:.1f}",
                "-" if report["p50_ms"] is None else f"{report['p50_ms']:.0f}",
                "-" if report["p99_ms"] is None else f"{report['p99_ms']:.0f}",
                f"{statuses.get('429', 0) / total:.0%}",
                ", ".join(f"{v}x{'no answer' if k == '0' else k}" for k, v in other.items()) or "-",
            )
    return table


def _loadtest_lines(result: Any) -> list[str]:
    mib = 2**20
    lines = []
    for pid, warm in result.rss_warm.items():
        after = result.rss_after.get(pid)
        change = "" if after is None else f" -> {after / mib:.1f} MiB ({after / warm - 1:+.1%})"
        lines.append(f"{result.setup}: pid {pid} RSS {warm / mib:.1f} MiB after warm-up{change}")
    if result.kill:
        lost = sum(
            count
            for report in result.endpoints.values()
            for status, count in report["statuses"].items()
            if status == "0" or status.startswith("5")
        )
        back = result.kill.get("back_seconds")
        lines.append(
            f"{result.setup}: killed replica pid {result.kill['killed_pid']}: {lost} requests "
            f"lost, replaced after {'-' if back is None else f'{back:.1f} s'}"
        )
    lines.append(
        f"{result.setup}: ready in {result.ready_seconds:.1f} s; SIGTERM stopped it in "
        f"{result.stop_seconds or float('nan'):.1f} s (exit {result.exit_code})"
    )
    return lines


# --------------------------------------------------------------------------------- optimize


@app.command()
def optimize(
    source: Annotated[
        str, typer.Argument(help="Model source (as `kiln export`) or an artifact folder.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact folder to build or resume.")],
    max_drift: Annotated[
        list[str] | None,
        typer.Option(help="Drift budget METRIC=LIMIT, e.g. psnr=30 or bleu=0.5 (repeatable)."),
    ] = None,
    objective: Annotated[str, typer.Option(help="latency, throughput or memory.")] = "latency",
    size: Annotated[
        list[str] | None, typer.Option(help="Workload image size N or WxH (repeatable).")
    ] = None,
    steps: Annotated[list[int] | None, typer.Option(help="Workload denoising steps.")] = None,
    workload: Annotated[
        Path | None, typer.Option(help="Workload file (JSON or TOML), as `kiln bench`.")
    ] = None,
    candidate: Annotated[
        list[str] | None,
        typer.Option(
            help="TARGET:PRECISION[-METHOD] to build (repeatable; default: the matching "
            "target file's optimize_candidates)."
        ),
    ] = None,
    repeats: Annotated[int | None, typer.Option(help="Measured calls per variant.")] = None,
    calibration: Annotated[
        int, typer.Option(help="Calibration prompts (SD) or images (BLIP), shared by all.")
    ] = 4,
    budget_minutes: Annotated[
        float | None, typer.Option(help="Stop building and measuring after this many minutes.")
    ] = None,
    keep: Annotated[
        str, typer.Option(help="all, or best: drop unused quantized variants.")
    ] = "all",
    static_shapes: Annotated[
        int,
        typer.Option(
            help="OpenVINO fixed-shape copies per component, for the shapes the workload runs "
            "at (0: dynamic shapes only)."
        ),
    ] = 2,
) -> None:
    """Build the variants this machine can run, measure them here, and keep the fastest plan
    within the drift budget as OUT's default (`kiln.load(OUT)` picks it)."""
    from kiln.optimize import optimize as run_optimize

    with progress_bar() as progress:
        task = progress.add_task("optimize", total=None)

        def say(event: Any) -> None:
            progress.update(task, description=f"{event.stage}: {event.detail}"[:100])
            if event.stage != "export":  # a bad SOURCE then reads as one error line
                progress.console.print(f"[bold]{event.stage}[/] {event.detail}", highlight=False)

        def bench_event(event: dict[str, Any]) -> None:
            name = event.get("variant", "")[:60]
            if event["event"] == "step":
                progress.update(task, description=f"measure {name}: step {event['step']}")
            elif event["event"] == "variant_done":
                progress.console.print(f"  measured {name}: {event.get('status')}", highlight=False)

        def quant_event(event: Any) -> None:
            where = f"{event.component}: " if event.component else ""
            progress.update(task, description=f"quantize {where}{event.stage} {event.detail}"[:100])
            if event.stage == "done":
                progress.console.print(f"  [green]✓[/] {event.detail}", highlight=False)

        result = run_optimize(
            source,
            out,
            max_drift=max_drift,
            objective=objective,
            candidates=candidate,
            sizes=size,
            steps=steps,
            workload=workload,
            repeats=repeats,
            calibration=calibration,
            budget_minutes=budget_minutes,
            keep=keep,
            static_shapes=static_shapes,
            progress=say,
            bench_events=bench_event,
            quant_progress=quant_event,
        )
    console.print(_frontier_table(result.points))
    for name, why in result.skipped.items():
        console.print(f"[yellow]skipped[/] {name}: {why}", highlight=False)
    console.print(plan_table(result.plan))
    if result.whole_plan and result.reproduced:
        console.print(
            f"the per-component pick, re-measured ({result.whole_plan}'s whole plan then "
            "won end to end):",
            highlight=False,
        )
    for row in result.reproduced:
        if "problem" in row:
            console.print(f"[yellow]re-measure failed:[/] {row['problem']}", highlight=False)
            continue
        mark = "[green]reproduced[/]" if row["reproduced"] else "[yellow]not reproduced[/]"
        console.print(
            f"{mark} {row['variant']}: {row['recorded_ms']:.1f} ms recorded, "
            f"{row['again_ms']:.1f} ms again ({row['change']:+.0%})",
            highlight=False,
        )
    if result.frontier_plot is not None:
        console.print(f"frontier plot: {result.frontier_plot}", highlight=False)
    budget = " (stopped by --budget-minutes)" if result.stopped_by_budget else ""
    console.print(
        f"optimized {out} in {result.seconds / 60:.1f} min{budget}; `kiln.load('{out}')` "
        "now picks the plan above",
        highlight=False,
    )


def _frontier_table(points: list[dict[str, Any]]) -> Table:
    table = Table(title="measured plans (* = Pareto frontier: latency, drift, peak memory)")
    for name in ("plan", "end to end", "worst drift vs fp32", "peak RSS", ""):
        table.add_column(name)
    for p in points:
        drift = ", ".join(f"{k} {v:.3g}" for k, v in (p["drift"] or {}).items()) or "reference"
        rss = f"{p['peak_rss_bytes'] / 2**20:.0f} MiB" if p["peak_rss_bytes"] else "-"
        marks = ("*" if p["frontier"] else "") + (" chosen" if p["chosen"] else "")
        table.add_row(p["plan"][:70], f"{p['end_to_end_ms']:.1f} ms", drift, rss, marks)
    return table


# ------------------------------------------------------------------------------------- demo


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the demo's files.")] = Path(
        "kiln-demo"
    ),
    prompt: Annotated[
        str, typer.Option(help="A shapes-world prompt: 'a COLOUR SHAPE on a COLOUR background'.")
    ] = "a red circle on a blue background",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
) -> None:
    """Export, quantize, plan, generate, caption and judge kiln's built-in trained models."""
    from kiln.demo import run_demo

    run_demo(
        out,
        steps=steps,
        seed=seed,
        prompt=prompt,
        console=console,
        export_progress=_export_progress,
        step_progress=progress_bar,
        quantize_progress=_quantize_progress,
    )


from kiln.bench.cli import bench_app  # noqa: E402

app.add_typer(bench_app, name="bench")


if __name__ == "__main__":
    main()
