"""What the full study costs on one H100: GPU-hours per run and for the 24-run study (4 depths x
residual/plain x 3 seeds), worked out from the measured training speeds in benchmarks/gpu-h100/.

    python benchmarks/study_cost.py [--epochs 1000] [--images 50000]

Measured: the study's full-width nets at depth 28 and 100 (`study-28.json`, `study-100.json`,
`resvae bench`, the fastest variant: bf16, compiled). Depths 40 and 70 were not measured: their
time per image is interpolated linearly in forward FLOPs per image (from `resvae info`) between
the two measured ones, and the table says so. A plain net (`--shortcut none`) has the same
convolutions less the projection shortcuts, so it is costed as its residual twin (an upper bound).
"""

import argparse
import json
from pathlib import Path

from resvae.config import ModelConfig
from resvae.vae import build_vae, model_info

HERE = Path(__file__).resolve().parent / "gpu-h100"
DEPTHS = (28, 40, 70, 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--images", type=int, default=50_000, help="training images per epoch")
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()

    measured = {d: json.loads((HERE / f"study-{d}.json").read_text()) for d in (28, 100)}
    device = measured[28].get("device_name", "H100")
    flops = {d: model_info(build_vae(ModelConfig(arch="study", depth=d)))["flops"]
             for d in DEPTHS}
    sec = {d: 1 / measured[d]["images_per_s"] for d in measured}  # seconds per image
    slope = (sec[100] - sec[28]) / (flops[100] - flops[28])
    total = 0.0
    print(f"{device}, {measured[28]['variant']}, {args.epochs} epochs of {args.images:,} "
          "images per run\n")
    print("| depth | GFLOP/image (forward) | images/s | hours per run | |")
    print("|---:|---:|---:|---:|---|")
    for d in DEPTHS:
        s = sec[d] if d in sec else sec[28] + slope * (flops[d] - flops[28])
        hours = s * args.epochs * args.images / 3600
        total += hours
        how = "measured" if d in sec else "interpolated in FLOPs"
        print(f"| {d} | {flops[d] / 1e9:.2f} | {1 / s:,.0f} | {hours:.1f} | {how} |")
    runs = len(DEPTHS) * 2 * args.seeds
    print(f"\n{runs} runs (4 depths x residual/plain x {args.seeds} seeds): "
          f"{total * 2 * args.seeds:.0f} GPU-hours; {total * 2 * args.seeds / 8:.1f} hours "
          "of wall time on 8 such GPUs")


if __name__ == "__main__":
    main()
