"""Training-step throughput of fp32 vs bf16 autocast vs channels_last (vs torch.compile),
side by side.

    python benchmarks/train_step.py [--preset cpu] [--device cpu] [--rounds 5] [--steps 5]
    python benchmarks/train_step.py --compile   # adds compiled fp32 and bf16, with compile time

Variants are interleaved round by round (each round times every variant once) so that load
from other processes hits them alike; the report is each variant's median images/s and its
ratio to fp32 from the same run. Never asserted anywhere: machines here are shared and noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import torch

from resvae.config import resolve
from resvae.distributed import resolve_device
from resvae.train import training_step
from resvae.vae import build_from_config

VARIANTS = {  # name: (bf16 autocast, channels_last, torch.compile)
    "fp32": (False, False, False),
    "bf16": (True, False, False),
    "channels_last": (False, True, False),
    "bf16+channels_last": (True, True, False),
}
COMPILED = {"compiled fp32": (False, False, True), "compiled bf16": (True, False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant per round")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile'd variants (what --compile does in training)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    variants = {**VARIANTS, **(COMPILED if args.compile else {})}

    cfg = resolve(preset=args.preset, environ={}, overrides={"batch_size": args.batch_size})
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    x = torch.rand(args.batch_size, 3, 32, 32, device=dev).mul(255).round().div(255)
    setups = {}
    for name, (bf16, cl, compiled) in variants.items():
        torch.manual_seed(0)
        vae = build_from_config(cfg, (3, 32, 32)).to(dev)
        if compiled:
            vae.compile()  # in place, as train.py does
        xv = x
        if cl:
            vae, xv = vae.to(memory_format=torch.channels_last), x.contiguous(
                memory_format=torch.channels_last)
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr)
        ctx = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if bf16 \
            else contextlib.nullcontext
        setups[name] = (vae, xv, opt, ctx)

    def run(name: str, steps: int) -> float:
        vae, xv, opt, ctx = setups[name]
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            training_step(vae, vae, xv, opt, cfg.train, autocast=ctx)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    warmup = {name: run(name, 2) for name in variants}  # allocator, kernels; compiling
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name in variants:
            times[name].append(run(name, args.steps))
    ips = {n: args.steps * args.batch_size / statistics.median(t) for n, t in times.items()}
    report = {"preset": args.preset, "device": str(dev), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "batch_size": args.batch_size,
              "images_per_s": ips, "ratio_to_fp32": {n: v / ips["fp32"] for n, v in ips.items()},
              "warmup_seconds": warmup}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"preset {args.preset} on {dev} (torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads), batch {args.batch_size}, "
          f"median of {args.rounds} rounds x {args.steps} steps")
    for n in variants:
        print(f"  {n:<20} {ips[n]:8.1f} images/s   x{report['ratio_to_fp32'][n]:.2f} vs fp32"
              f"   (first 2 steps {warmup[n]:.1f} s)")


if __name__ == "__main__":
    main()
