"""What a LoRA switched at load costs against re-exporting: SD 1.5 size, random weights.

    .venv/bin/python scripts/lora_switch_cost.py [--target onnx|openvino] [--size 256]

Builds SD 1.5 from its published config with random weights and a random rank-32 LoRA on
the UNet's attention and the text encoder (the test helper `tests/lora_helpers.make_lora`),
exports the pipeline, then: the time to re-export the two components the LoRA touches with
it fused (`kiln export --lora`), the time to switch it on at load (`set_loras`) and back
off, resident memory with and without it (after a generation each), and the same-seed PSNR
of the switched image against diffusers' `load_lora_weights` + `fuse_lora`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCALE = 0.8


def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="onnx", choices=("onnx", "openvino"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import torch
    from lora_helpers import make_lora

    import kiln
    from kiln.bench.metrics import psnr
    from kiln.models.tiny import save_pipeline

    figures: dict[str, float] = {}
    settings = {"steps": args.steps, "width": args.size, "height": args.size, "seed": 3}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        source = save_pipeline("sd15", root / "model", seed=0)
        lora = make_lora(source, root / "lora", seed=1, rank=32, spread=0.05)
        figures["lora_mib"] = lora.stat().st_size / 2**20
        started = time.perf_counter()
        kiln.export(source, root / "artifact", targets=[args.target])
        figures["export_s"] = time.perf_counter() - started
        started = time.perf_counter()
        kiln.export(
            source,
            root / "fused",
            targets=[args.target],
            components=["text_encoder", "unet"],
            loras=[f"{lora}:{SCALE}"],
        )
        figures["reexport_touched_s"] = time.perf_counter() - started

        deployment = kiln.load(root / "artifact", require=f"{args.target}:fp32")
        base = deployment.generate("a photo", **settings).image
        figures["rss_base_gib"] = rss_gib()
        started = time.perf_counter()
        deployment.set_loras({str(lora): SCALE})
        figures["switch_on_s"] = time.perf_counter() - started
        figures["weights_replaced"] = sum(deployment.weight_switch.changed.values())
        ours = deployment.generate("a photo", **settings).image
        figures["rss_lora_gib"] = rss_gib()
        started = time.perf_counter()
        deployment.set_loras(None)
        figures["switch_off_s"] = time.perf_counter() - started
        again = deployment.generate("a photo", **settings).image
        figures["restored_exactly"] = float(again.tobytes() == base.tobytes())
        del deployment

        from lora_helpers import diffusers_pipeline

        pipeline = diffusers_pipeline(source, [(lora, SCALE)])
        with torch.inference_mode():
            want = pipeline(
                "a photo",
                num_inference_steps=args.steps,
                width=args.size,
                height=args.size,
                guidance_scale=7.5,
                generator=torch.Generator("cpu").manual_seed(3),
            ).images[0]
        figures["psnr_vs_diffusers_db"] = psnr(ours, want)
        figures["psnr_lora_vs_base_db"] = psnr(want, base)
    print(json.dumps({"target": args.target, **settings, **figures}, indent=1))


if __name__ == "__main__":
    main()
