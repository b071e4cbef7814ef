"""Bits/dim against training time, from runs' own files: a table of every run's test bits/dim
and a figure of the validation bits/dim at each epoch's end against the training minutes.

    python benchmarks/time_to_quality.py runs/cpu runs/cpu-1h -o docs/time-to-quality.png

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

from resvae.runs import read_config, read_metrics, read_summary

CODECS = {"PNG (optimize)": 5.99, "WebP lossless (method 6)": 4.18}
VDVAE = [(10.0, 4.64), (60.0, 3.46)]  # (training minutes, test bits/dim), issue 7


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
    ax.plot(*zip(*VDVAE), "k*", markersize=10, label="VDVAE's code, scaled down (issue 7)")
    ax.set(xlabel="training minutes (2 CPU cores; evaluation excluded)",
           ylabel="bits/dim on the test split", title="Time to quality on this machine")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(out)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("runs", nargs="+", type=Path, help="run directories")
    p.add_argument("-o", "--out", type=Path, help="write the figure here (PNG)")
    a = p.parse_args(argv)
    for run in a.runs:
        if not (run / "summary.json").is_file():
            p.error(f"{run}: no summary.json (not a finished run directory)")
    print(table(a.runs))
    if a.out:
        figure(a.runs, a.out)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
