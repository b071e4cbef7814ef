"""Print the README's main-job table from the run's own files, so the README never carries a
number that a command did not write (a sweep's table is its own results.md).

    python benchmarks/readme_table.py runs/cpu                  # one run, in detail
    python benchmarks/readme_table.py runs/cpu-a runs/cpu-b ...  # the spread: one row per run

Figures that depend on the machine's speed (wall and training time, images/s, and so the
epochs a time budget allows) are marked; losses after a fixed number of steps reproduce exactly
on the same software (CPU, fp32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from resvae.report import format_time
from resvae.runs import read_config, read_history, read_metrics, read_summary


def main_table(run_dir: Path) -> str:
    cfg, s, records = read_config(run_dir), read_summary(run_dir), read_metrics(run_dir)
    m = cfg.model
    best = next(r for r in records if r["epoch"] == s["best_epoch"])
    rates = [r["images_per_s"] for r in records if not r.get("partial")] or \
        [r["images_per_s"] for r in records]
    rows = [
        ("model", f"`{m.arch}`, {s['layers']} layers, {m.block} blocks, width {m.width}, latent "
                  f"{m.latent_dim}, {m.likelihood} ({m.n_mix} components); {s['params']:,} "
                  "parameters"),
        ("stopped by", f"{s['stop_reason']}: {s['account']}; {s['images_seen']:,} training "
                       "images seen *"),
        ("training time (total wall time of the invocation)",
         f"{format_time(s['training_seconds'])} ({format_time(s['wall_seconds'])}) *"),
        ("throughput per epoch", f"{min(rates):.0f}-{max(rates):.0f} images/s *"),
        ("best epoch (validation = the test split, as in the study)", str(s["best_epoch"])),
        (f"final train loss (epoch {s['epochs']}, the last ended)",
         f"{s['final_train_loss']:,.1f} nats"),  # the value compare and report show
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


def spread_table(run_dirs: list[Path]) -> str:
    """One row per run of the same command: when it ran (UTC hour), the machine's speed that
    hour (images/s over its full epochs), what the budget bought, and the result; then the
    range. A speed-bound number is quoted from several hours, never from one run."""
    out = ["| run started (UTC) | commit | images/s (per epoch) | training images seen | "
           "epochs | test bits/dim |", "|---|---|---:|---:|---:|---:|"]
    bpds = []
    for run_dir in run_dirs:
        s, records = read_summary(run_dir), read_metrics(run_dir)
        started = read_history(run_dir)[0]["started"]
        rates = [r["images_per_s"] for r in records if not r.get("partial")] or \
            [r["images_per_s"] for r in records]
        # (summary.json has partial_epoch since 0.1.0's last changes; before, the metrics say it)
        cut = s.get("partial_epoch") or (records[-1]["epoch"] if records[-1].get("partial")
                                          else None)
        partial = f" + part of {cut}" if cut else ""
        bpds.append(s["test_bpd"])
        out.append(f"| {started[:10]} {started[11:16]} | {str(s.get('git_commit'))[:7]} | "
                   f"{min(rates):.0f}-{max(rates):.0f} | {s['images_seen']:,} | "
                   f"{s['epochs']}{partial} | {s['test_bpd']:.3f} |")
    out += ["", f"{len(bpds)} runs: test bits/dim {min(bpds):.3f}-{max(bpds):.3f} "
                f"(median {statistics.median(bpds):.3f})."]
    return "\n".join(out)


def cli(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                    help="one run: its table; several runs of one command: the spread")
    args = ap.parse_args(argv)
    print(main_table(args.run_dirs[0]) if len(args.run_dirs) == 1
          else spread_table(args.run_dirs))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
