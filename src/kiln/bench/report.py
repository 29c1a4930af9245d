"""Rendering a bench report: the terminal table, PNG plots and an offline HTML page.

The JSON document itself is built by `kiln.bench.harness.build_report`; everything here
reads only that document, so a saved `bench.json` renders the same way later.
matplotlib is imported only when plots are asked for (`--report DIR`).
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rich.table import Table

from kiln.artifacts import atomic_write_bytes, atomic_write_text

COLUMNS = (
    ("load", "load_s", "variant"),
    ("first call", "first_call_s", "case"),
    ("text enc", "text_encoder_ms", "case"),
    ("unet/call", "unet_step_ms", "case"),
    ("vae dec", "vae_decode_ms", "case"),
    ("end to end", "end_to_end_ms", "case"),
    ("img/s", "throughput_images_per_s", "case"),
    ("peak RSS", "peak_rss_bytes", "variant"),
    ("peak VRAM", "peak_vram_bytes", "variant"),
    ("size", "size_on_disk_bytes", "variant"),
    ("PSNR", "drift_psnr_db", "case"),
    ("SSIM", "drift_ssim", "case"),
    ("judged correct", "judged_correct", "variant"),
)
CAPTION_COLUMNS = (
    ("load", "load_s", "variant"),
    ("first call", "first_call_s", "case"),
    ("vision enc", "vision_encoder_ms", "case"),
    ("cross-attn kv", "cross_attention_kv_ms", "case"),
    ("decoder/step", "decoder_step_ms", "case"),
    ("decode/step", "decode_step_ms", "case"),
    ("end to end", "end_to_end_ms", "case"),
    ("tokens/s", "throughput_tokens_per_s", "case"),
    ("peak RSS", "peak_rss_bytes", "variant"),
    ("peak VRAM", "peak_vram_bytes", "variant"),
    ("size", "size_on_disk_bytes", "variant"),
    ("exact match", "drift_exact_match", "case"),
    ("BLEU", "drift_bleu", "case"),
    ("caption accuracy", "caption_accuracy", "variant"),
)


def plot_label(variant_id: str) -> str:
    """A variant's name on a plot: a per-component list (`unet/openvino/int8,...`, as kiln
    optimize benches its plans) one component a line, so neighbouring labels stay apart."""
    return variant_id.replace(",", "\n")


def _captioning(report: dict[str, Any]) -> bool:
    return report["workload"].get("kind") == "captioning"


def columns(report: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """(label, figure, level) of the table's rows for this report's family."""
    return CAPTION_COLUMNS if _captioning(report) else COLUMNS


def _number(value: float, unit: str) -> str:
    if unit == "bytes":
        return f"{value / 2**20:.1f} MiB" if value < 2**30 else f"{value / 2**30:.2f} GiB"
    if unit == "ms":
        return f"{value:.1f} ms" if value < 1000 else f"{value / 1000:.2f} s"
    if unit == "s":
        return f"{value:.2f} s"
    if unit == "dB":
        return f"{value:.1f} dB"
    if unit in ("ssim", "bleu", "fraction"):
        return f"{value:.4f}"
    return f"{value:.2f}"


def format_figure(figure: dict[str, Any], *, ratio: bool = True, spread: bool = True) -> str:
    """`123.4 ms p90 130.1 (x0.31)` or `- (no GPU)`."""
    if figure["value"] is None:
        return f"- ({figure['reason']})"
    text = _number(figure["value"], figure["unit"])
    stats = figure.get("stats")
    if spread and stats and stats["n"] > 1 and figure["unit"] in ("ms", "s"):
        text += f" p90 {_number(stats['p90'], figure['unit'])}"
    if ratio and figure.get("ratio") is not None:
        text += f" (x{figure['ratio']:.2f})"
    return text


def rows(report: dict[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(variant, case, cells) per variant and case, cells in `columns(report)` order."""
    out = []
    for variant in report["variants"]:
        label = (
            variant["id"] if variant["status"] == "ok" else f"{variant['id']} [{variant['status']}]"
        )
        for case in variant["cases"]:
            cells = []
            for _, name, level in columns(report):
                figures = variant["figures"] if level == "variant" else case["figures"]
                figure = figures.get(name, {"value": None, "reason": "not in this report"})
                cells.append(format_figure(figure, spread=name == "end_to_end_ms"))
            out.append((label, case["case"], cells))
    return out


def _shorten(reason: str) -> str:
    return reason if len(reason) <= 40 else reason[:37] + "..."


def table(report: dict[str, Any]) -> Table:
    """Figures as rows, one column per variant (and case); past four, a row per variant."""
    ref = report["ratio_reference"]["variant"]
    title = (
        f"kiln bench: {report['artifact']['path']} on {report['hardware']['fingerprint']} "
        f"({report['status']})"
    )
    caption = (
        f"medians over {report['workload']['repeats']} repeats after {report['workload']['warmup']} "
        f"warm-up call(s); (xN) = ratio to {ref} from this run"
        if ref
        else f"no ratios: {report['ratio_reference']['reason']}"
    )
    drift = report["drift_reference"]
    caption += (
        f"; drift vs {drift['variant']} (seed {drift.get('seed')})"
        if drift["variant"]
        else f"; no drift: {drift['reason']}"
    )
    result = Table(title=title, caption=caption)
    several = len(report["workload"]["cases"]) > 1
    measured = rows(report)
    if len(measured) > 4:
        for label in ("variant", *(["case"] if several else []), *_labels(report)):
            result.add_column(label)
        for variant, case, cells in measured:
            result.add_row(variant, *([case] if several else []), *map(_brief, cells))
        return result
    result.add_column("figure")
    for variant, case, _ in measured:
        result.add_column(f"{variant}\n{case}" if several else variant)
    for index, (label, _, _) in enumerate(columns(report)):
        cells = []
        for _, _, values in measured:
            cell = values[index]
            cells.append("- (" + _shorten(cell[3:-1]) + ")" if cell.startswith("- (") else cell)
        result.add_row(label, *cells)
    return result


def _labels(report: dict[str, Any]) -> list[str]:
    return [label for label, _, _ in columns(report)]


def _brief(cell: str) -> str:
    return "-" if cell.startswith("- (") else cell


def markdown(report: dict[str, Any]) -> str:
    """The report as one Markdown table, a row per variant and case (for notes and PRs)."""
    head = ["variant", "case", *_labels(report)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, case, cells in rows(report):
        lines.append("| " + " | ".join([variant, case, *map(_brief, cells)]) + " |")
    return "\n".join(lines) + "\n"


def notes(report: dict[str, Any]) -> list[str]:
    """Lines to print under the table: skipped/failed variants and their reasons."""
    lines = []
    for variant in report["variants"]:
        if variant["status"] != "ok":
            lines.append(f"{variant['id']}: {variant['status']}: {variant['reason']}")
        lines += [f"{variant['id']}: note: {note}" for note in variant["notes"]]
    return lines


# ----------------------------------------------------------------------------------- plots


def _ok(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in report["variants"] if v["status"] in ("ok", "interrupted", "failed")]


def plot_latency_vs_size(report: dict[str, Any], path: Path) -> Path:
    """One point per variant and case: size on disk against end-to-end latency, drift labelled.

    This is the trade-off a user ships on: down and to the left is smaller and faster; the
    label says what it cost in output quality.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for variant in _ok(report):
        size = variant["figures"]["size_on_disk_bytes"]["value"]
        if size is None:
            continue
        for case in variant["cases"]:
            latency = case["figures"]["end_to_end_ms"]["value"]
            if latency is None:
                continue
            ax.plot(
                [size / 2**20],
                [latency],
                marker="o",
                linestyle="",
                label=f"{plot_label(variant['id'])} {case['case']}",
            )
            if "drift_psnr_db" in case["figures"]:
                drift = case["figures"]["drift_psnr_db"]
                label = f"{drift['value']:.1f} dB" if drift["value"] is not None else None
            else:
                drift = case["figures"]["drift_exact_match"]
                label = f"{drift['value']:.0%} same" if drift["value"] is not None else None
            if label is None and "identical" in (drift["reason"] or ""):
                label = "identical"
            if label:
                ax.annotate(
                    label,
                    (size / 2**20, latency),
                    textcoords="offset points",
                    xytext=(4, 6),
                    fontsize=8,
                )
    ax.set_xlabel("size on disk (MiB)")
    ax.set_ylabel("end-to-end latency, median (ms)")
    ax.set_title(
        "latency against size (labels: "
        + ("caption agreement" if _captioning(report) else "PSNR drift")
        + " vs reference)"
    )
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return save_figure(fig, plt, path)


def plot_components(report: dict[str, Any], path: Path) -> Path:
    """Stacked bar per variant and case: text encoder + UNet (all steps) + VAE + the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if _captioning(report):
        return _plot_caption_components(report, path, plt)
    labels, parts = [], {"text encoder": [], "unet (all steps)": [], "vae decode": [], "other": []}
    for variant in _ok(report):
        for case in variant["cases"]:
            f = case["figures"]
            total = f["end_to_end_ms"]["value"]
            if total is None:
                continue
            unet = case["components"].get("unet")
            unet_total = unet["median"] * unet["calls_per_generate"] if unet else 0.0
            text = f["text_encoder_ms"]["value"] or 0.0
            vae = f["vae_decode_ms"]["value"] or 0.0
            labels.append(f"{plot_label(variant['id'])}\n{case['case']}")
            parts["text encoder"].append(text)
            parts["unet (all steps)"].append(unet_total)
            parts["vae decode"].append(vae)
            parts["other"].append(max(0.0, total - text - unet_total - vae))
    return _stacked_bars(labels, parts, "median latency per generate call (ms)", path, plt)


def plot_memory(report: dict[str, Any], path: Path) -> Path:
    """Peak RSS and peak VRAM per variant, side by side; a variant without a VRAM figure
    says why under its bar (no GPU, or GPU memory not measurable)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = _ok(report)
    labels = [plot_label(v["id"]) for v in variants]
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels) + 2), 4.5), dpi=100)
    width = 0.4
    for offset, (name, label) in enumerate(
        (("peak_rss_bytes", "peak RSS"), ("peak_vram_bytes", "peak VRAM"))
    ):
        figures = [v["figures"][name] for v in variants]
        xs = [i + (offset - 0.5) * width for i in range(len(variants))]
        values = [(f["value"] or 0) / 2**30 for f in figures]
        ax.bar(xs, values, width=width, label=label)
        for x, figure in zip(xs, figures, strict=True):
            if figure["value"] is None:
                ax.annotate(
                    _shorten(figure["reason"] or "not measured"),
                    (x, 0),
                    textcoords="offset points",
                    xytext=(0, 4),
                    rotation=90,
                    fontsize=7,
                    ha="center",
                )
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("GiB")
    ax.set_title("peak memory per variant (host RSS, GPU VRAM)")
    if labels:
        ax.legend(fontsize=8)
    return save_figure(fig, plt, path)


def _plot_caption_components(report: dict[str, Any], path: Path, plt: Any) -> Path:
    """Stacked bar per variant and case: vision + cross-attention kv + decoder steps + rest."""
    labels: list[str] = []
    parts: dict[str, list[float]] = {
        "vision": [],
        "cross-attention kv": [],
        "decoder (all steps)": [],
        "other": [],
    }
    for variant in _ok(report):
        for case in variant["cases"]:
            f = case["figures"]
            total = f["end_to_end_ms"]["value"]
            if total is None:
                continue
            decoder = sum(
                c["median"] * c["calls_per_generate"]
                for name, c in case["components"].items()
                if name in ("text_decoder", "language_model")
            )
            vision = f["vision_encoder_ms"]["value"] or 0.0
            cross = f["cross_attention_kv_ms"]["value"] or 0.0
            labels.append(f"{plot_label(variant['id'])}\n{case['case']}")
            parts["vision"].append(vision)
            parts["cross-attention kv"].append(cross)
            parts["decoder (all steps)"].append(decoder)
            parts["other"].append(max(0.0, total - vision - cross - decoder))
    return _stacked_bars(labels, parts, "median latency per caption call (ms)", path, plt)


def _stacked_bars(
    labels: list[str], parts: dict[str, list[float]], ylabel: str, path: Path, plt: Any
) -> Path:
    """One bar per variant and case, stacked by component."""
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(labels) + 2), 4.5), dpi=100)
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        ax.bar(labels, values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel(ylabel)
    ax.set_title("where the time goes, per variant")
    if labels:
        ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=8)
    return save_figure(fig, plt, path)


def save_figure(fig: Any, plt: Any, path: Path) -> Path:
    """The figure as a PNG, written atomically (and closed)."""
    import io

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


# ------------------------------------------------------------------------------------ html


def write_html_report(report: dict[str, Any], folder: Path) -> dict[str, Path]:
    """bench.html + latency_vs_size.png + components.png + memory.png in `folder` (images
    already there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plots = {
        "latency": plot_latency_vs_size(report, folder / "latency_vs_size.png"),
        "components": plot_components(report, folder / "components.png"),
        "memory": plot_memory(report, folder / "memory.png"),
    }
    page = folder / "bench.html"
    atomic_write_text(page, render_html(report))
    atomic_write_text(folder / "bench.md", markdown(report))
    return {**plots, "html": page, "markdown": folder / "bench.md"}


def render_html(report: dict[str, Any]) -> str:
    e = html.escape
    head = ["variant", "case", *_labels(report)]
    body = "".join(
        "<tr>" + "".join(f"<td>{e(c)}</td>" for c in (v, case, *cells)) + "</tr>"
        for v, case, cells in rows(report)
    )
    gallery = []
    for variant in report["variants"]:
        for case in variant["cases"]:
            captions = case.get("captions", [])
            for k, image in enumerate(case["images"]):
                said = f"<br><i>{e(captions[k])}</i>" if k < len(captions) else ""
                gallery.append(
                    f'<figure><img src="{e(image)}" alt="{e(variant["id"])}">'
                    f"<figcaption>{e(variant['id'])}<br>{e(case['case'])}{said}</figcaption></figure>"
                )
    hw = report["hardware"]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    notes_html = "".join(f"<li>{e(line)}</li>" for line in notes(report))
    ref, drift = report["ratio_reference"], report["drift_reference"]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>kiln bench: {e(report["artifact"]["path"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
td:first-child, td:nth-child(2) {{ text-align: left; }}
figure {{ display: inline-block; margin: 6px; text-align: center; font-size: 0.8em; }}
figure img {{ width: 160px; image-rendering: pixelated; }}
</style></head><body>
<h1>kiln bench</h1>
<p>artifact <code>{e(report["artifact"]["path"])}</code> ({e(report["artifact"]["family"])}),
status <b>{e(report["status"])}</b>, started {e(report["started"])}, finished {e(str(report["finished"]))}</p>
<p>hardware fingerprint <code>{e(hw["fingerprint"])}</code>: {e(hw["cpu"])}, {hw["logical_cores"]} logical cores,
GPUs: {e(", ".join(hw["gpus"]) or "none")}, {e(hw["os"])}<br>versions: {e(versions)}</p>
<p>ratios (xN) against <b>{e(str(ref["variant"] or "-"))}</b> {e(ref["reason"] or "measured in this run")};
drift against <b>{e(str(drift["variant"] or "-"))}</b> {e(drift["reason"] or "")}</p>
<table><tr>{"".join(f"<th>{e(h)}</th>" for h in head)}</tr>{body}</table>
<ul>{notes_html}</ul>
<h2>latency against size</h2><img src="latency_vs_size.png" alt="latency against size">
<h2>per-component time</h2><img src="components.png" alt="per-component stacked bars">
<h2>peak memory</h2><img src="memory.png" alt="peak RSS and VRAM per variant">
<h2>{"captioned images" if _captioning(report) else "generated images"} (first call, seed {drift.get("seed")})</h2>
{"".join(gallery) or "<p>no images</p>"}
</body></html>
"""
