"""What `caption(attentions=True)` costs: BLIP-base (real config, random weights) on this CPU.

    .venv/bin/python scripts/attention_cost.py [--repeats 5] [--target onnx]

Exports blip-base with `--with-attentions` into a temporary folder, then captions one
384x384 image with exactly 20 new tokens, greedy and with 3 beams, with and without the
attention maps, and prints the medians: the whole caption, the extra time of the attention
pass, and that extra per generated token (per decoder step).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--target", default="onnx", choices=("onnx", "openvino"))
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    import kiln
    from kiln.models.tiny_captioning import save_model

    tokens = 20
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        started = time.perf_counter()
        source = save_model("blip-base", root / "model", seed=0)
        kiln.export(source, root / "artifact", targets=[args.target], with_attentions=True)
        print(f"exported blip-base in {time.perf_counter() - started:.0f} s")
        deployment = kiln.load(root / "artifact", require=[args.target])
        rng = np.random.default_rng(0)
        image = Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8))
        options = {"max_new_tokens": tokens, "min_new_tokens": tokens}
        print(
            f"{'decoding':<10} {'caption ms':>11} {'with maps ms':>13} {'extra ms':>9} "
            f"{'extra per step ms':>18}"
        )
        for beams in (1, 3):
            times = {}
            for attentions in (False, True):
                deployment.caption([image], num_beams=beams, attentions=attentions, **options)
                runs = []
                for _ in range(args.repeats):
                    began = time.perf_counter()
                    deployment.caption([image], num_beams=beams, attentions=attentions, **options)
                    runs.append((time.perf_counter() - began) * 1000)
                times[attentions] = statistics.median(runs)
            extra = times[True] - times[False]
            label = "greedy" if beams == 1 else f"{beams} beams"
            print(
                f"{label:<10} {times[False]:>11.1f} {times[True]:>13.1f} {extra:>9.1f} "
                f"{extra / tokens:>18.2f}"
            )


if __name__ == "__main__":
    main()
