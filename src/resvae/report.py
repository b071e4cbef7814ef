"""Reports over runs: a results table (CSV + Markdown), figures, one self-contained HTML page.

Read-only over run directories; it never trains. A sweep directory holds one run directory per
(depth, shortcut) and sweep.json, which lists the runs, failed and pending ones included:

    report(sweep_dir, html_out)   results.csv, results.md, curves/loss_vs_depth/degradation.png
    compare(run_dirs)             the same table for any run directories, as text
"""

from __future__ import annotations

import base64
import csv
import datetime
import html
import io
import math
import os
import re
import shutil
from pathlib import Path

from . import runs
from .errors import ConfigError, MissingDependency, RunError, RunNotFound
from .files import atomic_write, check_output

# The 2018 study's Table 1: its four nets on one GTX 1070, loss = 3072 x BCE + KL in nats on the
# original CIFAR-10 (comparable to a run here only with likelihood "bernoulli" on cifar10).
STUDY_TABLE1 = [
    {"depth": 28, "train_hours": 79.2, "train_loss": 1790.4, "val_loss": 1794.7},
    {"depth": 40, "train_hours": 61.9, "train_loss": 1787.5, "val_loss": 1795.7},
    {"depth": 70, "train_hours": 80.0, "train_loss": 1784.8, "val_loss": 1799.0},
    {"depth": 100, "train_hours": 164.7, "train_loss": 1782.3, "val_loss": 1804.0},
]
STUDY_NOTE = ("The 2018 study, Table 1: one GTX 1070; loss = 3072 x BCE + KL in nats on the "
              "original CIFAR-10. Comparable to runs here only with likelihood bernoulli on "
              "cifar10.")

COLUMNS = ["name", "depth", "shortcut", "seed", "layers", "params", "gflops", "train_time_s", "images_seen",
           "epochs", "stop_reason", "best_epoch", "train_loss", "val_loss", "test_bpd",
           "test_iwae_bpd", "active_units", "status", "error"]
COLUMN_NOTE = (
    "Losses are negative ELBOs in nats per image: train loss is the mean over the last epoch "
    "(train mode), val loss the best epoch's (eval mode). test bpd: the best weights' negative "
    "ELBO on the whole test split (summary.json); test IWAE bpd: the IWAE bound from eval.json "
    "(k importance samples on n evenly spaced test images, with the ELBO on those same images "
    "beside it there). Train time is training alone and depends on the machine's speed and load; "
    "images and losses do not.")
FIGURES = ["curves", "loss_vs_depth", "degradation"]  # the HTML page embeds these...
# ...and shows each run's own grid; `samples.png` puts the runs' grids on one labelled figure


# --- reading run directories (read-only; runs.py knows the layout) ---------------------------

def _read_optional(path: Path) -> dict:
    """A JSON record a run may not have (yet): {} when missing."""
    return runs.read_json(path) if path.exists() else {}


def latest_samples(run_dir: str | Path) -> Path | None:
    """The run's newest sample grid (samples/epoch_NNNN.png), or None."""
    return runs.RunDir(run_dir).latest_grid("samples")


def find_runs(sweep_dir: str | Path) -> tuple[list[Path], list[dict | None]]:
    """The runs of a sweep, in sweep.json's order; without sweep.json, every subdirectory holding a
    config.json. Returns run directories and their sweep.json entries (None without one)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise RunNotFound(f"sweep directory {sweep_dir} does not exist")
    layout = runs.SweepDir(sweep_dir)
    sweep = layout.read_status()
    if sweep:
        entries = sweep.get("runs", [])
        dirs = [layout.entry_run(e).root for e in entries]
    else:
        dirs = sorted(p for p in sweep_dir.iterdir() if runs.RunDir(p).config.is_file())
        entries = [None] * len(dirs)
    if not dirs:
        raise RunError(f"{sweep_dir} holds no runs (no runs in sweep.json, or no sweep.json and "
                         "no subdirectory with a config.json)")
    return dirs, entries


# --- the results table -----------------------------------------------------------------------

def _run_row(run_dir: Path, entry: dict | None) -> dict:
    entry, run = entry or {}, runs.RunDir(run_dir)
    # a failed run may have no config.json: its sweep.json entry still names depth and shortcut
    cfg = runs.read_config(run_dir) if run.config.exists() else None
    model, train_cfg = (vars(cfg.model), vars(cfg.train)) if cfg else ({}, {})
    summary, ev = _read_optional(run.summary), _read_optional(run.eval)
    flops = summary.get("flops_per_image")
    # the ELBO on the whole test split (summary.json); eval.json's IWAE may cover fewer images
    # (`--iwae-n`), and its ELBO on those same images stays in eval.json
    test_bpd = summary.get("test_bpd")
    status = entry.get("status") or ("done" if summary else "incomplete")
    if status == "pending" and runs.is_training(run_dir):  # a sweep still at work on it
        status = "running"
    return {"name": entry.get("name", run_dir.name),
            "depth": model.get("depth", entry.get("depth")),
            "shortcut": model.get("shortcut", entry.get("shortcut")),
            "seed": train_cfg.get("seed", entry.get("seed")),
            "layers": summary.get("layers"), "params": summary.get("params"),
            "gflops": None if flops is None else flops / 1e9,
            "train_time_s": summary.get("training_seconds"),
            "images_seen": summary.get("images_seen"), "epochs": summary.get("epochs"),
            "stop_reason": summary.get("stop_reason"), "best_epoch": summary.get("best_epoch"),
            "train_loss": summary.get("final_train_loss"), "val_loss": summary.get("best_val_loss"),
            "test_bpd": test_bpd, "test_iwae_bpd": ev.get("iwae_bpd"),
            "active_units": ev.get("active_units"), "status": status,
            "error": entry.get("error") or ""}


def collect(run_dirs, sweep_entries=None) -> list[dict]:
    """One row per run (keys: COLUMNS, in order; None where unknown). `sweep_entries[i]`, if
    given, is sweep.json's entry for `run_dirs[i]`: its status and error, and it names a run whose
    directory a failure left empty or never made."""
    run_dirs = [Path(d) for d in run_dirs]
    sweep_entries = list(sweep_entries) if sweep_entries is not None else [None] * len(run_dirs)
    if len(sweep_entries) != len(run_dirs):
        raise ValueError(f"{len(sweep_entries)} sweep entries for {len(run_dirs)} run dirs")
    for d, e in zip(run_dirs, sweep_entries):
        if e is None and not runs.RunDir(d).config.is_file():
            raise RunError(f"{d} is not a run directory (no config.json there)")
    return [_run_row(d, e) for d, e in zip(run_dirs, sweep_entries)]


def format_time(seconds: float) -> str:
    """12.3s, 4m12s, 3h05m: as precise as a reader of a results table wants."""
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    s = round(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


HEADERS = {"name": "run", "depth": "depth", "shortcut": "shortcut", "seed": "seed", "layers": "layers",
           "params": "params", "gflops": "GFLOPs/img", "train_time_s": "train time",
           "images_seen": "images", "epochs": "epochs", "stop_reason": "stop",
           "best_epoch": "best epoch", "train_loss": "train loss", "val_loss": "val loss",
           "test_bpd": "test bpd", "test_iwae_bpd": "test IWAE bpd",
           "active_units": "active units", "status": "status", "error": "error"}
_FORMATS = {"params": "{:,}".format, "images_seen": "{:,}".format, "gflops": "{:.3g}".format,
            "train_time_s": format_time, "train_loss": "{:.1f}".format,
            "val_loss": "{:.1f}".format, "test_bpd": "{:.3f}".format,
            "test_iwae_bpd": "{:.3f}".format}
_TEXT = {"name", "shortcut", "stop_reason", "status", "error"}  # left-aligned; the rest numbers


def format_cell(column: str, value) -> str:
    """A value as a person reads it; "" for unknown (None, or NaN from a diverged run)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column == "error":  # the first line says what happened; the CSV keeps all of it
        return str(value).strip().splitlines()[0] if str(value).strip() else ""
    return _FORMATS.get(column, str)(value)


def format_table(rows: list[dict]) -> str:
    """The results as a Markdown table (what `resvae compare` prints and results.md holds)."""
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    out = [line(HEADERS[c] for c in COLUMNS),
           "|" + "|".join("---" if c in _TEXT else "---:" for c in COLUMNS) + "|"]
    out += [line(format_cell(c, r[c]) for c in COLUMNS) for r in rows]
    return "\n".join(out) + "\n"


def format_study_table() -> str:
    out = ["| depth | train time | train loss | val loss |", "|---:|---:|---:|---:|"]
    out += [f"| {r['depth']} | {r['train_hours']:.1f} h | {r['train_loss']:.1f} | "
            f"{r['val_loss']:.1f} |" for r in STUDY_TABLE1]
    return "\n".join(out) + "\n"


def write_results(sweep_dir: str | Path, rows: list[dict]) -> dict[str, Path]:
    """results.csv (every value, full precision) and results.md (formatted), written atomically."""
    sweep = runs.SweepDir(sweep_dir)
    paths = {"csv": sweep.results_csv, "md": sweep.results_md}

    agg, pairs = aggregate(rows), paired(rows)
    md = (f"# Results: {sweep.root.name}\n\n{format_table(rows)}\n{COLUMN_NOTE}\n\n"
          + (f"## Over seeds\n\n{format_stats(agg, pairs)}\n"
             if any(r["train_loss_n"] > 1 for r in agg) else "")  # one seed: the table above
          + f"## The 2018 study\n\n{STUDY_NOTE}\n\n{format_study_table()}")
    _write_csv(paths["csv"], [{c: r[c] for c in COLUMNS} for r in rows], COLUMNS)
    _write_csv(sweep.aggregate_csv, agg)
    _write_csv(sweep.paired_csv, pairs)
    paths.update(aggregate=sweep.aggregate_csv, paired=sweep.paired_csv)
    atomic_write(paths["md"], lambda tmp: tmp.write_text(md))
    return paths


# --- seeds: means with confidence intervals, and paired differences ----------------------------

STAT_METRICS = ["train_loss", "val_loss", "test_bpd", "test_iwae_bpd"]
# Student's t, two-sided 95% (0.975 quantile), for 1..30 degrees of freedom (standard tables);
# above 30 the Cornish-Fisher expansion around the normal's 1.95996 is within 1e-4 of it.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (a 95% two-sided CI)."""
    if df < 1:
        raise ValueError(f"t95 needs df >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: list[float]) -> dict:
    """n, mean, sample standard deviation and the 95% t interval of the mean. One value gives
    n = 1 and no sd or interval (never a zero-width interval)."""
    v = [x for x in values if x is not None and math.isfinite(x)]
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci_low": None, "ci_high": None}
    mean = sum(v) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci_low": None, "ci_high": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def excludes_0(st: dict) -> bool | None:
    """Whether a `mean_ci` interval of a difference excludes 0 (the seeds can tell it from no
    difference); None without an interval (n < 2)."""
    return None if st["ci_low"] is None else st["ci_low"] > 0 or st["ci_high"] < 0


def _config_name(name: str) -> str:
    """A run's name without its seed part (sweep.run_name writes `...-seed<N>`): the grid point
    its seeds share."""
    return re.sub(r"(^|-)seed\d+(?=-|$)", "", name).strip("-") or name


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per configuration (grid point less its seed), each metric over its seeds."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(_config_name(r["name"]), []).append(r)
    out = []
    for config, group in groups.items():
        row = {"config": config, "depth": group[0]["depth"], "shortcut": group[0]["shortcut"],
               "seeds": " ".join(str(r.get("seed")) for r in group)}
        for m in STAT_METRICS:
            row.update({f"{m}_{k}": v for k, v in mean_ci([r[m] for r in group]).items()})
        out.append(row)
    return out


def paired(rows: list[dict]) -> list[dict]:
    """Residual minus plain, per configuration less its shortcut, over the seeds both ran: the
    mean difference, its 95% t interval, and whether that interval excludes 0. A negative
    difference means the residual net's loss is lower."""
    plain, residual = {}, {}
    for r in rows:
        if r["shortcut"] is None:
            continue
        key = re.sub(rf"(^|-){re.escape(str(r['shortcut']))}(?=-|$)", "",
                     _config_name(r["name"])).strip("-")
        (plain if r["shortcut"] == "none" else residual).setdefault(
            (key, r["shortcut"] if r["shortcut"] != "none" else None), {})[r.get("seed")] = r
    out = []
    for (key, shortcut), runs_by_seed in residual.items():
        other = plain.get((key, None), {})
        seeds = sorted(set(runs_by_seed) & set(other), key=str)
        if not seeds:
            continue
        row = {"config": key, "depth": runs_by_seed[seeds[0]]["depth"],
               "difference": f"{shortcut} - none", "seeds": " ".join(map(str, seeds))}
        for m in STAT_METRICS:
            d = [runs_by_seed[s][m] - other[s][m] for s in seeds
                 if runs_by_seed[s][m] is not None and other[s][m] is not None]
            st = mean_ci(d)
            row.update({f"{m}_{k}": v for k, v in st.items()})
            row[f"{m}_excludes_0"] = excludes_0(st)
        out.append(row)
    return out


def _write_csv(path: Path, rows: list[dict], fields: list[str] | None = None) -> None:
    """rows as CSV (None as an empty cell), written atomically; `fields`: the first row's keys."""
    fields = fields or (list(rows[0]) if rows else ["config"])

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    atomic_write(path, write)


def _stat_cell(row: dict, m: str) -> str:
    # bits/dim to 3 decimals, nats to 1 (a loss of 15,944 nats reads better than 1.594e+04)
    def num(v: float) -> str:
        return f"{v:.3f}" if m.endswith("bpd") else f"{v:,.1f}"

    if row[f"{m}_mean"] is None:
        return ""
    if row[f"{m}_ci_low"] is None:
        return f"{num(row[f'{m}_mean'])} (n={row[f'{m}_n']})"
    return (f"{num(row[f'{m}_mean'])} [{num(row[f'{m}_ci_low'])}, {num(row[f'{m}_ci_high'])}] "
            f"(n={row[f'{m}_n']})")


def format_stats(agg: list[dict], pairs: list[dict]) -> str:
    """results.md's tables over seeds: means with 95% CIs, and the paired differences."""
    head = "| {} | " + " | ".join(STAT_METRICS) + " |"
    rule = "|---|" + "---|" * len(STAT_METRICS)
    out = ["Means over seeds with 95% t intervals [low, high]; n = 1 has no interval.", "",
           head.format("config"), rule]
    out += [f"| {r['config']} | " + " | ".join(_stat_cell(r, m) for m in STAT_METRICS) + " |"
            for r in agg]
    if pairs:
        out += ["", "Residual minus plain on the same seeds (negative: the residual net is "
                "lower); * the 95% interval excludes 0.", "", head.format("difference"), rule]
        out += [f"| {r['config']}: {r['difference']} | " + " | ".join(
            _stat_cell(r, m) + (" *" if r[f"{m}_excludes_0"] else "") for m in STAT_METRICS)
            + " |" for r in pairs]
    return "\n".join(out) + "\n"


# --- figures -----------------------------------------------------------------------------------
# matplotlib's object API (Figure, no pyplot): no global backend or figure state, safe in a
# library and in threads; Figure.savefig renders with Agg.

def _label(row: dict) -> str:
    return f"depth {row['depth']} {row['shortcut']}"


def _values(records: list[dict], key: str) -> list[float]:
    return [math.nan if r.get(key) is None else r[key] for r in records]


def robust_top(values: list[float]) -> float | None:
    """The y-axis top that keeps ordinary curves readable, or None when nothing is extreme.

    One run that blows up (a val loss of 1e23 beside 1e4) would flatten every other curve to a
    line at 0, and a log axis would squeeze their differences into a sliver. Values above a
    fence, and non-finite ones, are drawn clipped at the top instead, and marked. The fence is
    Tukey's far-out one (third quartile + 3 IQR), but at least 10x the median's magnitude above
    the third quartile: with a few epochs per run the IQR alone would clip an ordinary first
    epoch, and a blow-up is orders of magnitude, not a factor of 2.
    """
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return None
    q1, median, q3 = (finite[int(round(q * (len(finite) - 1)))] for q in (0.25, 0.5, 0.75))
    fence = q3 + max(3 * (q3 - q1), 10 * abs(median))
    if all(v <= fence for v in finite) and len(finite) == len(values):
        return None
    return max(v for v in finite if v <= fence)


def _clipped_plot(ax, epochs: list, ys: list[float], top: float | None, style: dict) -> int:
    """Plot one curve; with `top`, points above it (or not finite) sit at the top as open
    triangles. Returns how many were clipped."""
    if top is None:
        ax.plot(epochs, ys, **style)
        return 0
    # 2% above the top of the ordinary values: the marks stay visible under the axis' edge
    edge = top + 0.02 * abs(top)
    out = [not (math.isfinite(y) and y <= top) and not math.isnan(y) for y in ys]
    ax.plot(epochs, [edge if o else y for y, o in zip(ys, out)], **style)
    if any(out):
        ax.plot([e for e, o in zip(epochs, out) if o], [edge] * sum(out), linestyle="none",
                marker="^", markerfacecolor="none", color=style["color"])
    return sum(out)


def plot_curves(rows: list[dict], metrics: list[list[dict]]):
    """Train and val loss per epoch, one line per run: colour by depth, dashed = plain.

    A run that blows up is clipped at the top of the axis and marked (robust_top)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)  # own y scales: val and train losses can sit far apart
    depths = sorted({r["depth"] for r in rows if r["depth"] is not None})
    cmap = colormaps["viridis"]
    keys = ("train_loss", "val_loss")
    tops = [robust_top([v for records in metrics for v in _values(records, key)
                        if not math.isnan(v)]) for key in keys]
    clipped = [0, 0]
    for row, records in zip(rows, metrics):
        if not records:
            continue
        k = depths.index(row["depth"]) if row["depth"] in depths else 0
        style = dict(color=cmap(0.85 * k / max(len(depths) - 1, 1)), label=_label(row),
                     linestyle="--" if row["shortcut"] == "none" else "-")
        epochs = [r["epoch"] for r in records]
        for i, key in enumerate(keys):
            clipped[i] += _clipped_plot(axes[i], epochs, _values(records, key), tops[i], style)
    for ax, title, n in zip(axes, ("train loss", "val loss"), clipped):
        if n:
            title += f"\n({n} point{'s' if n > 1 else ''} above the axis, drawn at its top: \u25b3)"
        ax.set(title=title, xlabel="epoch", ylabel="loss (nats / image)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if any(metrics):
        axes[1].legend(fontsize="small")
    else:
        fig.suptitle("no metrics yet")
    return fig


def _depth_axis(rows: list[dict]) -> tuple[str, str]:
    """x of the depth plots: summary's counted layers when every run has them, else config depth."""
    if rows and all(r["layers"] is not None for r in rows):
        return "layers", "weight layers"
    return "depth", "depth (weight layers, config)"


def _by_shortcut(rows: list[dict]) -> tuple[str, str, dict[str, list[dict]]]:
    """The depth axis (key, label) and, per shortcut, one point per depth sorted along it: the
    mean over that point's seeds, with its 95% interval's half-width in `<metric>_err` (None for
    one seed, drawn without a bar)."""
    usable = [r for r in rows if r["train_loss"] is not None and r["depth"] is not None]
    x, xlabel = _depth_axis(usable)
    seeds: dict = {}
    for r in usable:
        seeds.setdefault((r["shortcut"], r[x]), []).append(r)
    groups = {}
    for (shortcut, depth), same in sorted(seeds.items(), key=lambda kv: kv[0][1]):
        point = {x: depth}
        for m in ("train_loss", "val_loss"):
            st = mean_ci([r[m] for r in same])
            point[m] = st["mean"]
            point[f"{m}_err"] = None if st["ci_high"] is None else st["ci_high"] - st["mean"]
        groups.setdefault(shortcut, []).append(point)
    return x, xlabel, groups


def _line(ax, group: list[dict], x: str, metric: str, fmt: str, **style) -> None:
    """One curve; with error bars (95% intervals over seeds) where a point has several seeds."""
    pts = [r for r in group if r[metric] is not None]
    if not pts:
        return
    errs = [r[f"{metric}_err"] for r in pts]
    if any(e is not None for e in errs):
        ax.errorbar([r[x] for r in pts], [r[metric] for r in pts], fmt=fmt, capsize=3,
                    yerr=[e or 0.0 for e in errs], **style)
    else:
        ax.plot([r[x] for r in pts], [r[metric] for r in pts], fmt, **style)


def _finish_depth_axes(ax, groups: dict, x: str, xlabel: str, ylabel: str, title: str) -> None:
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    depths = sorted({r[x] for group in groups.values() for r in group})
    if depths:
        ax.set_xticks(depths)  # ticks at the depths that were run, not 20.5, 21.0, ...
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")


def _bars_note(groups: dict) -> str:
    seeded = any(r["train_loss_err"] is not None for g in groups.values() for r in g)
    return "\n(means over seeds, bars: 95% intervals)" if seeded else ""


def plot_loss_vs_depth(rows: list[dict]):
    """Final train loss (solid) and best val loss (dashed) against depth, a colour per shortcut."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    x, xlabel, groups = _by_shortcut(rows)
    for i, (shortcut, group) in enumerate(groups.items()):
        _line(ax, group, x, "train_loss", "o-", color=f"C{i}", label=f"{shortcut}: train")
        _line(ax, group, x, "val_loss", "s--", color=f"C{i}", label=f"{shortcut}: val")
    _finish_depth_axes(ax, groups, x, xlabel, "loss (nats / image)", "loss against depth"
                       + _bars_note(groups))
    return fig


def plot_degradation(rows: list[dict]):
    """Residual vs plain TRAINING loss against depth: He et al. 2016's degradation plot (their
    Fig. 1/4), where a deeper plain net trains worse and a residual one does not."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    x, xlabel, groups = _by_shortcut(rows)
    colours = {"identity": "C0", "projection": "C2", "none": "C3"}
    for shortcut, group in groups.items():
        plain = shortcut == "none"
        _line(ax, group, x, "train_loss", "s--" if plain else "o-",
              color=colours.get(shortcut, "C4"),
              label="plain (no shortcut)" if plain else f"residual ({shortcut} shortcut)")
    missing = [k for k, have in (("plain", "none" in groups),
                                 ("residual", any(s != "none" for s in groups))) if not have]
    title = "degradation: final training loss against depth" + _bars_note(groups)
    _finish_depth_axes(ax, groups, x, xlabel, "train loss (nats / image)",
                       title + (f"\n(no {' or '.join(missing)} runs)" if missing else ""))
    return fig


def plot_samples(rows: list[dict], run_dirs):
    """Each run's newest sample grid, titled with its depth and shortcut, one row per shortcut."""
    from matplotlib.figure import Figure
    from PIL import Image

    grids = [(r, latest_samples(d)) for r, d in zip(rows, run_dirs) if r["status"] == "done"]
    grids = [(r, g) for r, g in grids if g is not None]
    shortcuts = sorted({r["shortcut"] for r, _ in grids}) or [None]
    depths = sorted({r["depth"] for r, _ in grids}) or [None]
    fig = Figure(figsize=(2.6 * len(depths), 2.8 * len(shortcuts)), layout="constrained")
    axes = fig.subplots(len(shortcuts), len(depths), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for r, path in grids:
        ax = axes[shortcuts.index(r["shortcut"]), depths.index(r["depth"])]
        with Image.open(path) as im:
            ax.imshow(im.convert("RGB"), interpolation="nearest")
        ax.set_title(_label(r), fontsize=10)
    if not grids:
        fig.suptitle("no sample grids yet")
    return fig


def _figures(rows: list[dict], run_dirs) -> dict:
    metrics = [runs.read_metrics(d) for d in run_dirs]
    return {"curves": plot_curves(rows, metrics), "loss_vs_depth": plot_loss_vs_depth(rows),
            "degradation": plot_degradation(rows), "samples": plot_samples(rows, run_dirs)}


def make_figures(rows: list[dict], run_dirs, out_dir: str | Path) -> dict[str, Path]:
    """curves.png, loss_vs_depth.png, degradation.png, samples.png in `out_dir`; returns
    {name: path}."""
    paths = {}
    for name, fig in _figures(rows, run_dirs).items():
        paths[name] = runs.SweepDir(out_dir).figure(name)
        atomic_write(paths[name], lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=100))
    return paths


# --- the HTML page -------------------------------------------------------------------------------

_CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; font-size: 12px; margin: 0.5em 0 1em; }
th, td { border: 1px solid #ccc; padding: 3px 5px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; white-space: normal; vertical-align: bottom; }
th.text, td.text { text-align: left; }
.wide { overflow-x: auto; }
td.error { text-align: left; white-space: normal; color: #a00; min-width: 10em; }
pre.error { background: #fff0f0; padding: 6px; white-space: pre-wrap; font-size: 12px; }
tr.failed { background: #fff0f0; }
.note { color: #555; font-size: 13px; }
img { max-width: 100%; }
.samples { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; width: 270px; } figcaption { text-align: center; font-size: 13px; }
"""


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _results_html(rows: list[dict]) -> str:
    head = "".join(f'<th class="{"text" if c in _TEXT else "num"}">{html.escape(HEADERS[c])}</th>'
                   for c in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for c in COLUMNS:
            cls = "error" if c == "error" else "text" if c in _TEXT else "num"
            text = format_cell(c, r[c])
            if c == "error" and len(text) > 40:  # the whole text is under the table
                text = text[:40] + "\u2026"
            cells.append(f'<td class="{cls}">{html.escape(text)}</td>')
        failed = ' class="failed"' if r["status"] == "failed" else ""
        body.append(f"<tr{failed}>{''.join(cells)}</tr>")
    # in a scrolling box: 18 columns and a long error must not widen the whole page
    return (f'<div class="wide"><table class="results"><thead><tr>{head}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + "\n</tbody></table></div>")


def _stats_html(rows: list[dict]) -> str:
    """The over-seeds tables (format_stats) when some grid point has several seeds."""
    agg, pairs = aggregate(rows), paired(rows)
    if not any(r["train_loss_n"] > 1 for r in agg):
        return ""

    def table(label: str, items: list[dict], star: bool) -> str:
        head = f'<th class="text">{label}</th>' + "".join(
            f'<th class="num">{m}</th>' for m in STAT_METRICS)
        body = "".join(
            f'<tr><td class="text">{html.escape(r["config"] + (": " + r["difference"] if star else ""))}'
            "</td>" + "".join(f'<td class="num">{html.escape(_stat_cell(r, m))}'
                              f'{" *" if star and r[f"{m}_excludes_0"] else ""}</td>'
                              for m in STAT_METRICS) + "</tr>\n" for r in items)
        return (f'<div class="wide"><table class="results"><thead><tr>{head}</tr></thead>'
                f"<tbody>\n{body}</tbody></table></div>")

    out = ("<h2>Over seeds</h2>\n<p>Means with 95% t intervals [low, high]; n = 1 has no "
           "interval.</p>\n" + table("config", agg, False))
    if pairs:
        out += ("\n<p>Residual minus plain on the same seeds (negative: the residual net is "
                "lower); * the 95% interval excludes 0.</p>\n" + table("difference", pairs, True))
    return out + "\n"


def _errors_html(rows: list[dict]) -> str:
    """The whole error text of each failed run (its table cell has room for the first line)."""
    failed = [r for r in rows if r["error"]]
    return "".join(f"<h3>{html.escape(r['name'])}: {html.escape(r['status'])}</h3>\n"
                   f'<pre class="error">{html.escape(str(r["error"]))}</pre>\n' for r in failed)


def _study_html() -> str:
    body = "\n".join(f"<tr><td>{r['depth']}</td><td>{r['train_hours']:.1f} h</td>"
                     f"<td>{r['train_loss']:.1f}</td><td>{r['val_loss']:.1f}</td></tr>"
                     for r in STUDY_TABLE1)
    return ('<table class="study"><thead><tr><th>depth</th><th>train time</th><th>train loss</th>'
            f"<th>val loss</th></tr></thead>\n<tbody>\n{body}\n</tbody></table>")


def _samples_html(rows: list[dict], run_dirs) -> str:
    figures = []
    for row, run_dir in zip(rows, run_dirs):
        grid = latest_samples(run_dir)
        if grid is None:
            continue
        caption = html.escape(f"depth {row['depth']}, shortcut {row['shortcut']}")
        detail = html.escape(f"{row['name']}, epoch {int(grid.stem.split('_')[1])}")
        figures.append(f'<figure><img src="{_data_uri(grid.read_bytes())}" alt="{caption}" '
                       f'width="270"><figcaption>{caption}<br><small>{detail}</small>'
                       "</figcaption></figure>")
    return ('<div class="samples">' + "\n".join(figures) + "</div>") if figures \
        else '<p class="note">No sample grids yet.</p>'


def write_html(sweep_dir: str | Path, out_path: str | Path, rows: list[dict] | None = None,
               figures: dict[str, Path] | None = None) -> Path:
    """One self-contained page (images inline as data: URIs; no network, fonts or scripts).
    `rows` and `figures` (make_figures' paths) are reused when given, else made here."""
    sweep_dir, out_path = Path(sweep_dir), Path(out_path)
    run_dirs, entries = find_runs(sweep_dir)
    rows = collect(run_dirs, entries) if rows is None else rows
    if len(rows) != len(run_dirs):
        raise ValueError(f"{len(rows)} rows for the {len(run_dirs)} runs of {sweep_dir}")
    if figures is None:
        pngs = {name: _png(fig) for name, fig in _figures(rows, run_dirs).items()}
    else:
        pngs = {name: Path(figures[name]).read_bytes() for name in FIGURES}
    title = html.escape(f"resvae report: {sweep_dir.resolve().name}")
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    n_done = sum(r["status"] == "done" for r in rows)

    def img(name, alt):
        return f'<img src="{_data_uri(pngs[name])}" alt="{html.escape(alt)}">'

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{_CSS}</style></head>
<body>
<h1>{title}</h1>
<p class="note">{html.escape(str(sweep_dir.resolve()))}: {len(rows)} runs, {n_done} done.
Generated {html.escape(now)}.</p>
<h2>Results</h2>
{_results_html(rows)}
<p class="note">{html.escape(COLUMN_NOTE)}</p>
{_errors_html(rows)}{_stats_html(rows)}<h2>The 2018 study, Table 1</h2>
{_study_html()}
<p class="note">{html.escape(STUDY_NOTE)}</p>
<h2>Loss curves</h2>
{img("curves", "train and val loss per epoch")}
<h2>Loss against depth</h2>
{img("loss_vs_depth", "final train and val loss against depth")}
<h2>Degradation</h2>
<p class="note">He et al. 2016 found deeper plain nets train to a higher training loss than
shallower ones, and residual nets do not. Here: the final training loss of each run.</p>
{img("degradation", "residual vs plain training loss against depth")}
<h2>Samples</h2>
{_samples_html(rows, run_dirs)}
</body></html>
"""
    atomic_write(out_path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out_path


# --- entry points ------------------------------------------------------------------------------

def report(sweep_dir: str | Path, html_out: str | Path | None = None) -> dict[str, Path]:
    """The whole report of a sweep: results.csv/md and figures in `sweep_dir`, and the HTML page
    at `html_out` if given. Returns their paths by name: csv, md, the FIGURES[, html]."""
    run_dirs, entries = find_runs(sweep_dir)
    check_output(sweep_dir, "SWEEP_DIR", folder=True)  # results.csv/md and figures go there
    if html_out is not None:
        check_output(html_out)
    rows = collect(run_dirs, entries)
    paths = write_results(sweep_dir, rows)
    paths.update(make_figures(rows, run_dirs, sweep_dir))
    if html_out is not None:
        paths["html"] = write_html(sweep_dir, html_out, rows, figures=paths)
    return paths


def screenshot(html_path: str | Path, png_path: str | Path, chromium: str | None = None,
               width: int = 1200) -> Path:
    """A full-page PNG of an HTML page, rendered by a real headless Chromium.

    Drives the system's browser (Debian: `apt-get install chromium`) through the playwright
    package (extra `report`), not playwright's own browser download, which needs network access.
    `chromium`: its executable (default $RESVAE_CHROMIUM, else the first of chromium and
    chromium-browser on PATH).
    """
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise MissingDependency("--screenshot needs the playwright package: pip install "
                         "'resvae[report]'") from None
    exe = chromium or os.environ.get("RESVAE_CHROMIUM") or shutil.which("chromium") \
        or shutil.which("chromium-browser")
    if not exe or not Path(exe).exists():
        raise MissingDependency(f"--screenshot: no Chromium executable found ({exe or 'none on PATH'}); "
                         "install one (apt-get install chromium) or set RESVAE_CHROMIUM")
    html_path, png_path = Path(html_path).resolve(), check_output(png_path, "--screenshot")
    if not html_path.is_file():
        raise RunNotFound(f"{html_path}: no such HTML file")
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to start as root (containers, CI)
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.goto(html_path.as_uri(), wait_until="load")
            png = page.screenshot(full_page=True)  # bytes
        finally:
            browser.close()
    atomic_write(png_path, lambda t: t.write_bytes(png))
    return png_path


def compare(run_dirs) -> str:
    """The results table (Markdown) for any run directories, e.g. runs from different sweeps."""
    if not run_dirs:
        raise ConfigError("compare needs at least one run directory")
    return format_table(collect(run_dirs))


__all__ = ["STUDY_TABLE1", "COLUMNS", "FIGURES", "collect", "format_table", "write_results",
           "make_figures", "write_html", "report", "compare", "find_runs", "latest_samples",
           "aggregate", "paired", "mean_ci", "excludes_0", "t95", "format_stats",
           "plot_curves", "robust_top", "plot_loss_vs_depth", "plot_degradation", "plot_samples"]
