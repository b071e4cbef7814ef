"""Convolution throughput on this machine against the shape of the work: a 3x3 convolution's
forward + backward (what a training step does with it) in GFLOP/s, for fp32 and bf16 autocast,
over channels, map size and batch, beside the machine's matmul ceilings measured in the same run.

    python benchmarks/conv_shapes.py [--channels 32,64,128,256] [--maps 4,8,16,32]
                                     [--batches 32,128] [--seconds 0.4] [--json]

What it is for: choosing a model's width, blocks per resolution and batch for this CPU's matrix
units from a table, not by guess (issue 20). Numbers depend on the machine and its load: compare
rows of one run only (every row shares the run's load, and the ceilings say what it was).
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def _rate(fn, flops: float, seconds: float) -> float:
    fn()  # warm-up: oneDNN picks its kernels on the first call
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        dt = time.perf_counter() - t0
        if dt >= seconds and n >= 3:
            return n * flops / dt / 1e9


def conv_rate(c: int, hw: int, batch: int, dtype: str, channels_last: bool, seconds: float):
    """GFLOP/s of conv3x3 (c -> c, stride 1, pad 1) forward + backward (input and weight
    gradients): 3 x the forward's 2*B*C*C*9*H*W FLOPs."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, hw, hw).to(memory_format=fmt).requires_grad_()
    w = torch.randn(c, c, 3, 3).to(memory_format=fmt).requires_grad_()
    flops = 3 * 2 * batch * c * c * 9 * hw * hw

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            y = F.conv2d(x, w, padding=1)
        y.float().sum().backward()
        x.grad = w.grad = None

    return _rate(step, flops, seconds)


def matmul_ceiling(dtype: torch.dtype, size: int = 2048, seconds: float = 1.0) -> float:
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return _rate(lambda: a @ b, 2 * size ** 3, seconds)


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--channels", type=_ints, default=[32, 64, 128, 256])
    p.add_argument("--maps", type=_ints, default=[4, 8, 16, 32])
    p.add_argument("--batches", type=_ints, default=[32, 128])
    p.add_argument("--seconds", type=float, default=0.4, help="per measurement")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()

    ceilings = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    rows = []
    for batch in args.batches:
        for c in args.channels:
            for hw in args.maps:
                row = {"batch": batch, "channels": c, "map": hw}
                for dtype in ("fp32", "bf16"):
                    for cl in (False, True):
                        key = dtype + ("+cl" if cl else "")
                        row[key] = conv_rate(c, hw, batch, dtype, cl, args.seconds)
                rows.append(row)
    after = {"fp32": matmul_ceiling(torch.float32), "bf16": matmul_ceiling(torch.bfloat16)}
    record = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "matmul_ceiling_gflops": {k: max(ceilings[k], after[k]) for k in ceilings},
              "rows": rows}
    if args.json:
        print(json.dumps(record, indent=2))
        return
    ceil = record["matmul_ceiling_gflops"]
    print(f"{record['threads']} threads, torch {record['torch']}; matmul 2048^3 ceilings: fp32 "
          f"{ceil['fp32']:.0f}, bf16 {ceil['bf16']:.0f} GFLOP/s\n")
    print("conv3x3 forward + backward, GFLOP/s (share of the bf16 ceiling for the bf16 columns)\n")
    print("| batch | channels | map | fp32 | fp32+cl | bf16 | bf16+cl |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        bf = [f"{r[k]:.0f} ({r[k] / ceil['bf16']:.0%})" for k in ("bf16", "bf16+cl")]
        print(f"| {r['batch']} | {r['channels']} | {r['map']} | {r['fp32']:.0f} | "
              f"{r['fp32+cl']:.0f} | {bf[0]} | {bf[1]} |")


if __name__ == "__main__":
    main()
