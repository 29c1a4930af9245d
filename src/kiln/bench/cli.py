"""`kiln bench OUT ...` and `kiln bench compare A.json B.json`.

`kiln bench OUT` is shorthand for `kiln bench run OUT`: the group routes anything that is
not a subcommand name to `run`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from kiln.artifacts import read_json
from kiln.errors import InvalidRequestError, KilnError
from kiln.ui import console, err_console, progress_bar


class _RunByDefault(TyperGroup):
    """A group whose default subcommand is `run`, so `kiln bench OUT` works."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


bench_app = typer.Typer(
    cls=_RunByDefault,
    help="Measure an artifact's variants against PyTorch: latency, memory, size, drift.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@bench_app.command("run")
def run(
    out: Annotated[Path, typer.Argument(help="Artifact folder made by `kiln export`.")],
    variant: Annotated[
        list[str] | None,
        typer.Option(
            "--variant",
            "--require",
            "-v",
            help="RUNTIME:PRECISION to require (e.g. onnx:fp32; `auto` = kiln.load's choice; "
            "comma-separate per-component ones). Repeatable. Default: every one the artifact holds.",
        ),
    ] = None,
    prefer: Annotated[
        list[str] | None,
        typer.Option(
            "--prefer",
            help="RUNTIME:PRECISION to prefer, passed to kiln.load(prefer=...) for the `auto` "
            "variant (added when not requested). Repeatable, in order of preference.",
        ),
    ] = None,
    objective: Annotated[
        str,
        typer.Option(
            help="kiln.load objective for the artifact's variants: latency, throughput "
            "(OpenVINO splits batches over streams) or memory."
        ),
    ] = "latency",
    workload: Annotated[
        Path | None, typer.Option(help="Workload file (JSON or TOML): prompts, sizes, steps...")
    ] = None,
    steps: Annotated[list[int] | None, typer.Option(help="Denoising steps (repeatable).")] = None,
    size: Annotated[
        list[str] | None,
        typer.Option(help="Image size N or WxH (repeatable; captioning: input image size)."),
    ] = None,
    batch: Annotated[
        list[int] | None,
        typer.Option(help="Images per call (repeatable; captioning: images captioned per call)."),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Captioning: prompt the captions start from (default none).")
    ] = None,
    max_new_tokens: Annotated[
        list[int] | None, typer.Option(help="Captioning: new tokens per caption (repeatable).")
    ] = None,
    num_beams: Annotated[
        list[int] | None, typer.Option(help="Captioning: beams (repeatable; 1 = greedy).")
    ] = None,
    force_tokens: Annotated[
        bool | None,
        typer.Option(
            "--force-tokens/--free-tokens",
            help="Captioning: make every caption exactly max-new-tokens long (default), so "
            "timings compare; --free-tokens lets captions stop at their end token.",
        ),
    ] = None,
    repeats: Annotated[int | None, typer.Option(help="Measured calls per case.")] = None,
    warmup: Annotated[
        int | None, typer.Option(help="Calls before measuring (the first is first-call time).")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the first call (then +1 per call).")
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the JSON report here.")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="Folder for bench.json, plots, images and bench.html.")
    ] = None,
    baseline: Annotated[
        list[str] | None,
        typer.Option(
            help="torch, torch-compile, torch-cuda-fp16 or none (repeatable). Default: torch "
            "(and torch-cuda-fp16 when a variant runs on CUDA)."
        ),
    ] = None,
    record: Annotated[
        bool, typer.Option(help="Write the measured latencies into the artifact's manifest.")
    ] = False,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="Stable Diffusion: LoRA FILE[:SCALE] every variant runs with, switched on at "
            "load (the torch baseline fuses it with diffusers). Repeatable."
        ),
    ] = None,
) -> None:
    """Benchmark OUT's variants and PyTorch baselines on one workload."""
    from kiln.artifacts import read_manifest
    from kiln.bench.harness import family_module, family_workload, run_bench
    from kiln.bench.report import notes, table, write_html_report

    baselines = ["torch"] if baseline is None else [b for b in baseline if b != "none"]
    manifest = read_manifest(out)
    family = family_module(manifest)
    options: dict[str, Any] = {
        "file": workload,
        "sizes": size,
        "steps": steps,
        "batch": batch,
        "repeats": repeats,
        "warmup": warmup,
        "seed": seed,
        "prompt": prompt,
        "max_new_tokens": max_new_tokens,
        "num_beams": num_beams,
        "force_tokens": force_tokens,
        "loras": lora,
    }
    plan = family_workload(family, manifest, **options)
    interrupted = False
    result: dict[str, Any] | None = None
    with progress_bar() as progress:
        overall = progress.add_task("variants", total=None)
        calls = progress.add_task("", total=plan.calls(), visible=False)

        def on_event(event: dict[str, Any]) -> None:
            kind, name = event["event"], event.get("variant", "")
            if kind == "variant":
                progress.update(overall, total=event["total"], completed=event["index"])
                progress.reset(
                    calls, total=plan.calls(), visible=True, description=f"{name}: starting"
                )
            elif kind == "loading":
                progress.update(calls, description=f"{name}: loading")
            elif kind == "step":
                phase = "measuring" if event["call"] >= plan.warmup else "warm-up"
                progress.update(
                    calls,
                    description=f"{name}: {event['case']} {phase} step {event['step']}/{event['steps']}",
                )
            elif kind == "call":
                progress.update(calls, completed=event["done"])
            elif kind == "quality":
                progress.update(calls, description=f"{name}: judging held-out quality")
            elif kind == "variant_done":
                progress.advance(overall)
                status = event.get("status")
                mark = "[green]✓[/]" if status == "ok" else f"[yellow]{status}[/]"
                progress.console.print(f"{mark} {name}", highlight=False)

        try:
            result = run_bench(
                out,
                variants=variant or (),
                baselines=baselines,
                prefer=prefer or (),
                objective=objective,
                workload=plan,
                json_path=json_path,
                report_dir=report,
                record=record,
                on_event=on_event,
            )
        except KeyboardInterrupt:
            interrupted = True
    if interrupted:
        target = json_path or (report / "bench.json" if report else None)
        if target is None or not Path(target).is_file():
            err_console.print("interrupted (no report was requested: pass --json or --report)")
            raise typer.Exit(130)
        result = json.loads(Path(target).read_text(encoding="utf-8"))
        err_console.print(f"[yellow]interrupted:[/] partial report in {target}")
    assert result is not None
    console.print(table(result))
    for line in notes(result):
        console.print(line, highlight=False)
    if report is not None:
        paths = write_html_report(result, report)
        console.print(f"report: {paths['html']}", highlight=False)
    if json_path is not None:
        console.print(f"json: {json_path}", highlight=False)
    if record and not interrupted:
        console.print(
            f"recorded measurements for {result['hardware']['fingerprint']} in {out}/manifest.json",
            highlight=False,
        )
    if interrupted:
        raise typer.Exit(130)


@bench_app.command("compare")
def compare(
    a: Annotated[Path, typer.Argument(help="Earlier report (JSON).")],
    b: Annotated[Path, typer.Argument(help="Later report (JSON).")],
    floor: Annotated[
        float, typer.Option(help="Smallest relative change ever flagged (on top of noise).")
    ] = 0.05,
    show_all: Annotated[bool, typer.Option("--all", help="Show unchanged figures too.")] = False,
) -> None:
    """Show what changed from A to B; exit 1 if anything regressed beyond the runs' noise."""
    from kiln.bench.compare import compare_reports, compare_table, context_warnings, regressions

    reports = [_read_report(path) for path in (a, b)]
    for line in context_warnings(*reports):
        err_console.print(f"[yellow]note:[/] {line}", highlight=False)
    changes = compare_reports(*reports, floor=floor)
    console.print(compare_table(changes, everything=show_all))
    worse = regressions(changes)
    if worse:
        console.print(f"[bold red]{len(worse)} regression(s)[/] beyond the runs' own noise")
        raise typer.Exit(1)
    console.print("no regressions beyond the runs' own noise")


def _read_report(path: Path) -> dict[str, Any]:
    from kiln.bench.schema import validation_errors

    data = read_json(path, InvalidRequestError)
    errors = validation_errors(data)
    if errors:
        raise InvalidRequestError(f"{path} is not a kiln bench report v1: {errors[0]}")
    return data


def main() -> None:  # pragma: no cover - `python -m kiln.bench.cli`
    try:
        bench_app()
    except KilnError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        sys.exit(exc.exit_code)
