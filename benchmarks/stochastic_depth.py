"""The README's stochastic-depth table and figure, from a finished
`sweeps/cpu-stochastic-depth.toml` sweep's own files (config.json, summary.json, metrics.jsonl
and eval.json of each run):

    python benchmarks/stochastic_depth.py runs/sweep-cpu-stochastic-depth \
        -o docs/stochastic-depth.png

One row per grid point (latent groups x residual blocks), over its seeds: test bits/dim (mean
and 95% t interval), active units per group (mean over seeds, top group first), parameters,
GFLOP per image (one forward pass, the negative ELBO: `summary.json`'s flops_per_image, counted
by `resvae.vae.model_info`; a training step is about 3x that) and images/s (mean over the
seeds' epochs: depends on the machine's speed). Then each step along each axis (the groups at
fixed blocks, the blocks at fixed groups, in order of GFLOP): its change in bits/dim, paired by
seed, with a 95% interval, and bits/dim per added GFLOP.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from resvae.errors import ResvaeError, RunError
from resvae.hier import hier_layout
from resvae.report import excludes_0, mean_ci
from resvae.runs import RunDir, read_config, read_json, read_metrics, read_summary


def run_record(run_dir: Path) -> dict:
    cfg, s = read_config(run_dir), read_summary(run_dir)
    ev = read_json(RunDir(run_dir).eval)
    rates = [r["images_per_s"] for r in read_metrics(run_dir) if not r.get("partial")]
    if not rates:
        raise RunError(f"{run_dir}: no finished epoch in metrics.jsonl")
    m = cfg.model
    layout = hier_layout(m.depth, m.stochastic_layers, m.block)
    return {"groups": m.stochastic_layers,
            "blocks": sum(layout["encoder_blocks"]) + sum(layout["decoder_blocks"]),
            "depth": m.depth, "seed": cfg.train.seed, "test_bpd": s["test_bpd"],
            "params": s["params"], "gflop": s["flops_per_image"] / 1e9,
            "images_per_s": sum(rates) / len(rates), "images_seen": s["images_seen"],
            "active": ev.get("active_units_per_group")}


def points(records: list[dict]) -> list[dict]:
    by_point: dict[tuple, list[dict]] = {}
    for r in records:
        by_point.setdefault((r["groups"], r["blocks"]), []).append(r)
    out = []
    for (groups, blocks), rs in sorted(by_point.items()):
        if len({r["images_seen"] for r in rs}) != 1:
            raise RunError(f"groups {groups}, blocks {blocks}: the seeds saw different numbers "
                           "of images; not an equal-images comparison")
        active = [r["active"] for r in rs if r["active"]]
        out.append({"groups": groups, "blocks": blocks, "depth": rs[0]["depth"],
                    "seeds": sorted(r["seed"] for r in rs),
                    "by_seed": {r["seed"]: r["test_bpd"] for r in rs},
                    "bpd": mean_ci([r["test_bpd"] for r in rs]),
                    "active": ([sum(a[i] for a in active) / len(active)
                                for i in range(len(active[0]))] if active else None),
                    "params": rs[0]["params"], "gflop": rs[0]["gflop"],
                    "images_per_s": sum(r["images_per_s"] for r in rs) / len(rs),
                    "images_seen": rs[0]["images_seen"]})
    return out


def axes(rows: list[dict]) -> list[tuple[str, list[dict], str]]:
    """The sweep's two axes, each (label, its points by GFLOP, the key that varies): latent
    groups at the block count most points share, residual blocks at the most shared groups."""
    blocks = max(sorted({r["blocks"] for r in rows}),
                 key=lambda b: sum(r["blocks"] == b for r in rows))
    groups = max(sorted({r["groups"] for r in rows}),
                 key=lambda g: sum(r["groups"] == g for r in rows))
    return [(f"latent groups (at {blocks} blocks)",
             sorted((r for r in rows if r["blocks"] == blocks), key=lambda r: r["gflop"]),
             "groups"),
            (f"residual blocks (at {groups} groups)",
             sorted((r for r in rows if r["groups"] == groups), key=lambda r: r["gflop"]),
             "blocks")]


def steps(rows: list[dict]) -> list[dict]:
    """Each step along an axis (one point to the next by GFLOP): the change in test bits/dim,
    paired by seed (the same seed gives the same data order and the same random stream), its
    95% t interval, whether that interval excludes 0, and bits/dim per added GFLOP."""
    out = []
    for _label, rs, key in axes(rows):
        for a, b in zip(rs, rs[1:]):
            seeds = sorted(set(a["by_seed"]) & set(b["by_seed"]))
            d = mean_ci([b["by_seed"][s] - a["by_seed"][s] for s in seeds])
            dg = b["gflop"] - a["gflop"]
            out.append({"axis": key, "from": a[key], "to": b[key], "seeds": seeds,
                        "d_gflop": dg, "d_bpd": d,
                        "excludes_0": excludes_0(d),
                        "bpd_per_gflop": d["mean"] / dg if d["mean"] is not None and dg > 0
                        else None})
    return out


def steps_table(st: list[dict]) -> str:
    # added MFLOP, not GFLOP: a latent group costs well under a thousandth of a GFLOP
    lines = ["| step | seeds | added MFLOP/image | change in test bits/dim, paired mean "
             "[95% CI] | bits/dim per added GFLOP |",
             "|---|---:|---:|---|---:|"]
    for s in st:
        d = s["d_bpd"]
        if d["mean"] is None:
            change = "-"
        elif d["ci_low"] is None:
            change = f"{d['mean']:+.3f}"
        else:
            change = (f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
                      + (" *" if s["excludes_0"] else ""))
        per = f"{s['bpd_per_gflop']:+.1f}" if s["bpd_per_gflop"] is not None else "-"
        lines.append(f"| {s['axis']} {s['from']} -> {s['to']} | {len(s['seeds'])} | "
                     f"{s['d_gflop'] * 1e3:+.1f} | {change} | {per} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    lines = ["| latent groups | residual blocks | depth | seeds | test bits/dim, mean [95% CI] | "
             "active units per group (top first) | parameters | GFLOP/image | "
             "images/s * |",
             "|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        b = r["bpd"]
        ci = (f"{b['mean']:.3f} [{b['ci_low']:.3f}, {b['ci_high']:.3f}]"
              if b["ci_low"] is not None else f"{b['mean']:.3f}")
        active = ", ".join(f"{a:.0f}" for a in r["active"]) if r["active"] else "-"
        lines.append(f"| {r['groups']} | {r['blocks']} | {r['depth']} | {len(r['seeds'])} | "
                     f"{ci} | {active} | {r['params']:,} | {r['gflop']:.3f} | "
                     f"{r['images_per_s']:.0f} |")
    return "\n".join(lines)


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from resvae.files import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    # each axis labels its points on its own side, so the point both share shows both labels
    for (label, rs, key), style, offset in zip(axes(rows), ("o-", "s--"), ((4, 4), (4, -11))):
        x = [r["gflop"] for r in rs]
        y = [r["bpd"]["mean"] for r in rs]
        err = [[r["bpd"]["mean"] - (r["bpd"]["ci_low"] or r["bpd"]["mean"]) for r in rs],
               [(r["bpd"]["ci_high"] or r["bpd"]["mean"]) - r["bpd"]["mean"] for r in rs]]
        ax.errorbar(x, y, yerr=err, fmt=style, capsize=3, label="more " + label)
        for r in rs:
            ax.annotate(str(r[key]), (r["gflop"], r["bpd"]["mean"]), textcoords="offset points",
                        xytext=offset, fontsize=8)
    ax.set_xlabel("GFLOP per image (forward)")
    ax.set_ylabel("test bits/dim after one epoch (mean, 95% CI)")
    ax.set_title(f"Stochastic vs deterministic depth, {rows[0]['images_seen']:,} images each")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("-o", "--out", type=Path, help="also draw the figure into this PNG")
    args = ap.parse_args(argv)
    runs = sorted(p.parent for p in args.sweep_dir.glob("*/summary.json"))
    if not runs:
        print(f"{args.sweep_dir}: no finished run (no */summary.json)", file=sys.stderr)
        return 2
    try:
        rows = points([run_record(r) for r in runs])
    except ResvaeError as e:  # a run without eval.json (not a sweep's), a tampered record
        print(f"stochastic_depth.py: {e}", file=sys.stderr)
        return 2
    print(table(rows))
    print()
    print("Steps along each axis (negative: lower bits/dim; * the interval excludes 0):")
    print()
    print(steps_table(steps(rows)))
    if args.out:
        figure(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
