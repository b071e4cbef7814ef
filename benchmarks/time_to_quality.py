"""Bits/dim against training time, from runs' own files: a table of every run's test bits/dim
and a figure of the validation bits/dim at each epoch's end against the training minutes.

    python benchmarks/time_to_quality.py runs/cpu runs/cpu-1h -o docs/time-to-quality.png
    python benchmarks/time_to_quality.py --candidates runs/cand-*   # one change per row

`--candidates` prints the candidate table instead: where each run's config differs from the
first run's (the baseline), its images/s per epoch, updates (skipped ones), images seen,
minutes, test bits/dim and peak memory (summary.json's peak_rss_bytes).

Each run's `metrics.jsonl` holds, per epoch, `val_bpd` (the weights evaluated at that epoch's
end; on CIFAR-10 the validation split is the test split, as in the study) and `train_seconds`
(training time so far, evaluation excluded); `summary.json` holds the final test bits/dim of the
best weights. The reference lines are issue 7's figures on the same test split (PNG and WebP
lossless from the whole split, VDVAE's own code scaled down and trained on this machine): they
are quoted, not rerun here. Times depend on the machine's speed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from resvae.config import RunConfig, to_dict
from resvae.files import atomic_write
from resvae.runs import read_config, read_metrics, read_summary

CODECS = {"PNG (optimize)": 5.99, "WebP lossless (method 6)": 4.18}
# (training minutes, test bits/dim), issue 7: its raw weights after 10 and 60 minutes, its EMA
# weights after 60
VDVAE = {"raw": [(10.0, 4.64), (60.0, 3.57)], "EMA": [(60.0, 3.46)]}
# settings that say where the data and the run are, or how long, not what is trained
_PLACE = {"data.data_dir", "data.download", "train.budget"}


def table(runs: list[Path]) -> str:
    rows = ["| run | model | precision | lr schedule, weights | images seen | training minutes "
            "| test bits/dim |", "|---|---|---|---|---:|---:|---:|"]
    for run in runs:
        cfg, s = read_config(run), read_summary(run)
        m, t = cfg.model, cfg.train
        model = (f"`{m.arch}` {s['layers']} layers"
                 + (f", {m.stochastic_layers} groups" if m.arch == "hier" else "")
                 + f", width {m.width}, {m.likelihood}")
        prec = t.precision + (" + channels_last" if t.channels_last else "")
        sched = t.lr_schedule + (f", EMA {t.ema}" if t.ema else ", raw")
        rows.append(f"| `{run.name}` | {model} | {prec} | {sched} | {s['images_seen']:,} | "
                    f"{s['training_seconds'] / 60:.1f} | {s['test_bpd']:.3f} |")
    return "\n".join(rows)


def changes(cfg: RunConfig, base: RunConfig) -> str:
    """Where a run's resolved config differs from the baseline run's: the settings that change
    what is trained, not where its data and files are (a setting added to resvae between the
    two reads as its default in the older config.json, as resvae reads it)."""
    a, b = to_dict(cfg), to_dict(base)
    out = [f"{k}={v}" for sec in ("model", "data", "train") for k, v in a[sec].items()
           if f"{sec}.{k}" not in _PLACE and v != b[sec][k]]
    return " ".join(f"`{c}`" for c in out) or "none (the baseline)"


def candidates(runs: list[Path]) -> str:
    rows = [f"| run | differs from `{runs[0].name}` | images/s (per epoch) | images seen | "
            "updates (skipped) | training minutes | test bits/dim | peak RSS |",
            "|---|---|---|---:|---:|---:|---:|---:|"]
    base = read_config(runs[0])
    for run in runs:
        s = read_summary(run)
        rates = ", ".join(f"{r['images_per_s']:.0f}" for r in read_metrics(run))
        bpd = (f"diverged ({s['test_bpd']:.3f} at the stop)" if s["stop_reason"] == "non_finite"
               else f"{s['test_bpd']:.3f}")
        rss = f"{s['peak_rss_bytes'] / 2**30:.2f} GiB" if s.get("peak_rss_bytes") else "-"
        cells = [f"`{run.name}`", changes(read_config(run), base), rates,
                 f"{s['images_seen']:,}", f"{s['steps']:,} ({s['skipped_updates']})",
                 f"{s['training_seconds'] / 60:.1f}", bpd, rss]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def figure(runs: list[Path], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        recs = [r for r in read_metrics(run) if r.get("val_bpd") is not None]
        ax.plot([r["train_seconds"] / 60 for r in recs], [r["val_bpd"] for r in recs],
                marker="o", label=run.name)
    for (name, bpd), style in zip(CODECS.items(), (":", "--")):
        ax.axhline(bpd, color="grey", linestyle=style, linewidth=1)
        ax.annotate(name, (0.5, bpd), xycoords=("axes fraction", "data"), ha="center",
                    va="bottom", fontsize=8, color="grey")
    ax.plot(*zip(*VDVAE["raw"]), "k*", markersize=10,
            label="VDVAE's code, scaled down (issue 7), raw weights")
    ax.plot(*zip(*VDVAE["EMA"]), "kP", markersize=9, label="the same, EMA weights")
    ax.set(xlabel="training minutes (2 CPU cores; evaluation excluded)",
           ylabel="bits/dim on the test split", title="Time to quality on this machine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("-o", "--out", type=Path, help="write the figure here (PNG)")
    p.add_argument("--candidates", action="store_true",
                   help="print the candidate table (one change per run) instead")
    a = p.parse_args(argv)
    for run in a.runs:
        if not (run / "summary.json").is_file():
            p.error(f"{run}: no summary.json (not a finished run directory)")
    print(candidates(a.runs) if a.candidates else table(a.runs))
    if a.out:
        figure(a.runs, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
