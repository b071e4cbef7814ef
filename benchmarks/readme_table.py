"""Print the README's main-job table from the run's own files, so the README never carries a
number that a command did not write (a sweep's table is its own results.md).

    python benchmarks/readme_table.py runs/cpu

Figures that depend on the machine's speed (wall and training time, images/s, and so the
epochs a time budget allows) are marked; losses after a fixed number of steps reproduce exactly
on the same software (CPU, fp32).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resvae.report import format_time
from resvae.runs import read_config, read_metrics, read_summary


def main_table(run_dir: Path) -> str:
    cfg, s, records = read_config(run_dir), read_summary(run_dir), read_metrics(run_dir)
    m = cfg.model
    best = next(r for r in records if r["epoch"] == s["best_epoch"])
    last = records[-1]
    rates = [r["images_per_s"] for r in records if not r.get("partial")] or \
        [r["images_per_s"] for r in records]
    full = sum(not r.get("partial") for r in records)
    rows = [
        ("model", f"`{m.arch}`, {s['layers']} layers, {m.block} blocks, width {m.width}, latent "
                  f"{m.latent_dim}, {m.likelihood} ({m.n_mix} components); {s['params']:,} "
                  "parameters"),
        ("stopped by", f"{s['stop_reason']} after {full} full epoch(s)"
                       + (" and part of another" if last.get("partial") else "")
                       + f", {s['images_seen']:,} training images seen *"),
        ("training time (total wall time of the invocation)",
         f"{format_time(s['training_seconds'])} ({format_time(s['wall_seconds'])}) *"),
        ("throughput per epoch", f"{min(rates):.0f}-{max(rates):.0f} images/s *"),
        ("best epoch (validation = the test split, as in the study)", str(s["best_epoch"])),
        ("final train loss" + (" (partial epoch)" if last.get("partial") else ""),
         f"{last['train_loss']:,.1f} nats"),  # (summary.json's is the last ended epoch's)
        ("best validation loss", f"{s['best_val_loss']:,.1f} nats"),
        ("test negative ELBO, best weights",
         f"{s['test_loss']:,.1f} nats = **{s['test_bpd']:.3f} bits/dim**"),
        ("rate / distortion at the best epoch (validation)",
         f"{best['val_rate']:,.1f} / {best['val_distortion']:,.1f} nats"),
    ]
    out = ["| | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    out.append("")
    out.append(f"\\* depends on the machine's speed (here: {s.get('device', '?')}); "
               f"resvae {s.get('resvae_version')} at commit {s.get('git_commit')}, torch "
               f"{s.get('torch_version')}.")
    return "\n".join(out)


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path, help="the main job's run directory")
    print(main_table(ap.parse_args(argv).run_dir))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
