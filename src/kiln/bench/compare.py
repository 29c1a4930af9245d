"""`kiln bench compare A.json B.json`: what changed between two reports, and what regressed.

A figure regressed when B is worse than A by more than the runs' own noise: for timings
with samples, the tolerance is the sum of both runs' `noise` (half the p10..p90 band over
the median) and at least `floor` (default 5%); single-sample figures (load, first call,
memory, size) use a fixed tolerance; drift regresses when PSNR drops by more than 1 dB
or SSIM by more than 0.01. Reports from different hardware are compared through their
ratios to the PyTorch eager baseline of each run, since absolute times do not transfer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from kiln.bench.report import _number

LOWER_IS_BETTER = {
    "load_s",
    "first_call_s",
    "text_encoder_ms",
    "unet_step_ms",
    "vae_decode_ms",
    "vision_encoder_ms",
    "cross_attention_kv_ms",
    "decoder_step_ms",
    "decode_step_ms",
    "end_to_end_ms",
    "peak_rss_bytes",
    "peak_vram_bytes",
    "size_on_disk_bytes",
}
HIGHER_IS_BETTER = {
    "throughput_images_per_s",
    "throughput_tokens_per_s",
    "drift_psnr_db",
    "drift_ssim",
    "drift_exact_match",
    "drift_bleu",
}
SINGLE_SAMPLE_TOLERANCE = {
    "load_s": 0.25,
    "first_call_s": 0.25,
    "peak_rss_bytes": 0.05,
    "peak_vram_bytes": 0.05,
    "size_on_disk_bytes": 0.0,
}
DRIFT_TOLERANCE = {  # absolute
    "drift_psnr_db": 1.0,
    "drift_ssim": 0.01,
    "drift_exact_match": 0.05,
    "drift_bleu": 0.02,
}


@dataclass(frozen=True)
class Change:
    variant: str
    case: str  # "" for per-variant figures
    figure: str
    unit: str
    a: float | None
    b: float | None
    change: float | None  # relative (B/A - 1), or absolute for drift
    tolerance: float | None
    verdict: str  # "regression" | "improvement" | "same" | "missing" | "new"
    basis: str  # "absolute" | "ratio to torch" | "drift"


def _figures(report: dict[str, Any]) -> Iterator[tuple[str, str, str, dict[str, Any]]]:
    for variant in report["variants"]:
        for name, figure in variant["figures"].items():
            yield variant["id"], "", name, figure
        for case in variant["cases"]:
            for name, figure in case["figures"].items():
                yield variant["id"], case["case"], name, figure


def compare_reports(a: dict[str, Any], b: dict[str, Any], floor: float = 0.05) -> list[Change]:
    same_hardware = a["hardware"]["fingerprint"] == b["hardware"]["fingerprint"]
    old = {(v, c, n): f for v, c, n, f in _figures(a)}
    return [
        _change(variant, case, name, old.get((variant, case, name)), new, same_hardware, floor)
        for variant, case, name, new in _figures(b)
    ]


def _change(
    variant: str,
    case: str,
    name: str,
    before: dict[str, Any] | None,
    after: dict[str, Any],
    same_hardware: bool,
    floor: float,
) -> Change:
    unit = after["unit"]
    if before is None or before["value"] is None or after["value"] is None:
        verdict = "new" if before is None else "missing"
        if before is not None and before["value"] is None and after["value"] is None:
            verdict = "same"
        a_value = None if before is None else before["value"]
        return Change(variant, case, name, unit, a_value, after["value"], None, None, verdict, "-")
    if name in DRIFT_TOLERANCE:
        delta = after["value"] - before["value"]
        tolerance = DRIFT_TOLERANCE[name]
        verdict = (
            "regression" if delta < -tolerance else "improvement" if delta > tolerance else "same"
        )
        return Change(
            variant,
            case,
            name,
            unit,
            before["value"],
            after["value"],
            delta,
            tolerance,
            verdict,
            "drift",
        )
    a_value, b_value, basis = before["value"], after["value"], "absolute"
    if not same_hardware:
        if before.get("ratio") is None or after.get("ratio") is None:
            return Change(variant, case, name, unit, a_value, b_value, None, None, "missing", "-")
        a_value, b_value, basis = before["ratio"], after["ratio"], "ratio to torch"
    change = b_value / a_value - 1 if a_value else 0.0
    if "stats" in before and "stats" in after:
        tolerance = max(floor, before["stats"]["noise"] + after["stats"]["noise"])
    else:
        tolerance = max(SINGLE_SAMPLE_TOLERANCE.get(name, floor), 0.0)
    worse = change > tolerance if name in LOWER_IS_BETTER else change < -tolerance
    better = change < -tolerance if name in LOWER_IS_BETTER else change > tolerance
    verdict = "regression" if worse else "improvement" if better else "same"
    return Change(
        variant,
        case,
        name,
        unit,
        before["value"],
        after["value"],
        change,
        tolerance,
        verdict,
        basis,
    )


def regressions(changes: list[Change]) -> list[Change]:
    return [c for c in changes if c.verdict == "regression"]


def compare_table(changes: list[Change], *, everything: bool = False) -> Table:
    table = Table(title="kiln bench compare (A -> B)")
    for column in ("variant", "case", "figure", "A", "B", "change", "tolerance", "verdict"):
        table.add_column(column)
    style = {"regression": "bold red", "improvement": "green", "missing": "yellow"}
    for c in changes:
        if not everything and c.verdict == "same":
            continue
        relative = c.basis not in ("drift", "-")
        change = "-" if c.change is None else f"{c.change:+.1%}" if relative else f"{c.change:+.3g}"
        tolerance = (
            "-"
            if c.tolerance is None
            else f"±{c.tolerance:.1%}"
            if relative
            else f"±{c.tolerance:g}"
        )
        table.add_row(
            c.variant,
            c.case or "(variant)",
            c.figure,
            "-" if c.a is None else _number(c.a, c.unit),
            "-" if c.b is None else _number(c.b, c.unit),
            change + ("" if c.basis in ("absolute", "drift", "-") else f" ({c.basis})"),
            tolerance,
            f"[{style.get(c.verdict, '')}]{c.verdict}[/]" if c.verdict in style else c.verdict,
        )
    return table


def context_warnings(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    lines = []
    if a["hardware"]["fingerprint"] != b["hardware"]["fingerprint"]:
        lines.append(
            "the reports come from different hardware: comparing ratios to PyTorch eager, "
            "not absolute figures"
        )
    if [c["id"] for c in a["workload"]["cases"]] != [c["id"] for c in b["workload"]["cases"]]:
        lines.append("the workloads differ: only cases present in both are compared")
    for report, name in ((a, "A"), (b, "B")):
        if report["status"] != "complete":
            lines.append(f"{name} is {report['status']}: some figures are missing")
    return lines
