"""Sweeps: the same VAE trained over a grid (depth x shortcut by default), everything else equal.

    resvae sweep --depths 20,52,100,204 --shortcut identity,none --preset resnet-cpu --out runs/sweep
    resvae sweep sweeps/cpu-depth.toml

Each grid point is one run directory `SWEEP_DIR/<name>/`, trained by the same `train()` as
`resvae train`. Fair by construction: same seed, same data order, same number of training
images (max_epochs over the same data; early stopping is refused because it would stop runs at
different points, and the per-run budget is a guard that the table reports when it bites).
Rerunning the same sweep skips finished runs and resumes interrupted ones; a failing run is
recorded with its error and the sweep goes on. `SWEEP_DIR/sweep.json` lists every run and its
status; the report (results.csv/md, figures) is written at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .config import (
    ConfigError,
    RunConfig,
    apply_dict,
    fields_flat,
    load_toml,
    parse_duration,
    resolve,
    to_dict,
)
from .files import check_output
from .runs import (
    RunDir,
    RunLock,
    SweepDir,
    config_differences,
    is_finished,
    read_config,
    write_json,
)
from .stops import SweepSignals

SWEEP_FILE_KEYS = {"preset", "config", "out", "grid", "set", "budget_per_run", "iwae_k", "iwae_n",
                   "launcher"}


@dataclass
class SweepSpec:
    """A grid over config keys, on top of a preset / config file / fixed overrides."""

    # key -> values; the runs are the product, in this order. Or a list of such tables (a sweep
    # file's [[grid]]): the runs are the union of their products, a point listed twice run once.
    grid: dict[str, list] | list[dict[str, list]]
    preset: str | None = None
    config: str | None = None
    fixed: dict[str, object] = field(default_factory=dict)  # flags / [set] keys
    budget_per_run: str = ""
    iwae_k: int = 100  # 0 = no IWAE evaluation
    iwae_n: int = 1000  # test images for the IWAE estimate (evenly spaced); 0 = all
    out: str = ""  # where a sweep file says its runs go ("" = the command decides)
    launcher: dict = field(default_factory=dict)  # a sweep file's [launcher] table (slurm.py)

    @property
    def tables(self) -> list[dict[str, list]]:
        """The grid as a list of tables (one for a plain [grid])."""
        return self.grid if isinstance(self.grid, list) else [self.grid]

    def points(self) -> list[dict]:
        points: list[dict] = []
        for grid in self.tables:
            keys = list(grid)
            points += [p for p in (dict(zip(keys, values))
                                   for values in itertools.product(*grid.values()))
                       if p not in points]
        return points

    def set_axis(self, key: str, values: list) -> None:
        """One axis from the command line (--depths, --shortcut, --seeds), in every table."""
        for grid in self.tables:
            grid[key] = list(values)

    @property
    def keys(self) -> list[str]:
        """The grid's config keys (every table of a [[grid]] has the same ones)."""
        return list(self.tables[0])


def run_name(point: Mapping) -> str:
    """`depth020-identity`: sorts by depth, says the shortcut; other keys as key-value."""
    parts = []
    for key, value in point.items():
        if key == "depth":
            parts.append(f"depth{int(value):03d}" if int(value) < 1000 else f"depth{value}")
        elif key == "shortcut":
            parts.append(str(value))
        else:
            # a grid value is text from a shared file: it names a folder, never a path (a
            # data_dir of "/../../x" must not write outside the sweep directory)
            if re.search(r"[^A-Za-z0-9._=-]", str(value)) or str(value) in (".", ".."):
                raise ConfigError(f"sweep grid: {key} = {value!r} cannot name a run folder: "
                                  "grid values may hold only A-Z a-z 0-9 . _ = - (put other "
                                  "values in [set], or in a config file per grid point)")
            parts.append(f"{key}{value}")
    return "-".join(parts)


def load_sweep_file(path: str | Path) -> SweepSpec:
    """A sweep kept as a file: top-level preset/config/budget_per_run/iwae_k/iwae_n, a [grid]
    table of lists (or several [[grid]] tables: the union of their products) and a [set] table
    of fixed settings (any config keys)."""
    d = load_toml(path)
    unknown = sorted(set(d) - SWEEP_FILE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s) {', '.join(unknown)}; expected "
                          f"{', '.join(sorted(SWEEP_FILE_KEYS))} (config keys go in [set])")
    _check_file_values(d, path)
    grid = d.get("grid") or {}
    tables = grid if isinstance(grid, list) else [grid]
    for table in tables:
        if not (isinstance(table, dict) and table
                and all(isinstance(v, list) and v for v in table.values())):
            raise ConfigError(f"{path}: [grid] must map config keys to non-empty lists, got "
                              f"{table!r}")
        if list(table) != list(tables[0]):
            # one set of columns for the report, and run names that read alike
            raise ConfigError(f"{path}: every [[grid]] table must list the same keys in the "
                              f"same order: {list(tables[0])} and {list(table)}")
    fixed = dict(d.get("set") or {})
    # unknown keys and wrong types, named with the file they are in (not as flags)
    apply_dict(RunConfig(), fixed, f"{path} [set]")
    for table in tables:
        apply_dict(RunConfig(), {k: v[0] for k, v in table.items()}, f"{path} [grid]")
    return SweepSpec(grid=grid, preset=d.get("preset"), config=d.get("config"),
                     fixed=fixed, budget_per_run=d.get("budget_per_run", ""),
                     iwae_k=d.get("iwae_k", 100), iwae_n=d.get("iwae_n", 1000),
                     out=d.get("out", ""), launcher=dict(d.get("launcher") or {}))


def _check_file_values(d: dict, path) -> None:
    """The sweep file's own keys, each of its expected type, before anything runs."""
    for key in ("preset", "config", "out", "budget_per_run"):
        if key in d and not (isinstance(d[key], str) and d[key].strip()):
            raise ConfigError(f"{path}: {key} = {d[key]!r}: expected a non-empty string")
    for key in ("iwae_k", "iwae_n"):
        v = d.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{path}: {key} = {v!r}: expected an integer >= 0")
    for key in ("grid", "set", "launcher"):
        if key == "grid" and isinstance(d.get(key), list):
            continue  # [[grid]]: a list of tables, checked by load_sweep_file
        if key in d and not isinstance(d[key], dict):
            raise ConfigError(f"{path}: {key} must be a table ([{key}]), got {d[key]!r}")
    if d.get("budget_per_run"):
        try:
            parse_duration(d["budget_per_run"])
        except ConfigError as e:
            raise ConfigError(f"{path}: budget_per_run: {e}") from None


def plan(spec: SweepSpec, environ: Mapping[str, str] | None = None) -> list[tuple[str, RunConfig]]:
    """Resolve every run's config up front, so a bad grid fails before anything trains."""
    flat = fields_flat()
    for key in spec.keys:
        if key not in flat:
            raise ConfigError(f"sweep grid: unknown config key {key!r}")
    runs = []
    for point in spec.points():
        overrides = dict(spec.fixed)
        if spec.budget_per_run:
            overrides["budget"] = spec.budget_per_run
        # values from the command line are strings (parsed strictly), from TOML already typed
        overrides.update(point)
        cfg = resolve(preset=spec.preset, config_file=spec.config, environ=environ,
                      overrides=overrides)
        _check_buildable(cfg, point)
        runs.append((run_name(point), cfg))
    _check_fair(runs)
    return runs


def _check_buildable(cfg: RunConfig, point: dict) -> None:
    """Build the run's model on the meta device (nothing allocated), so a grid point whose model
    cannot exist (depth 27: no resnet has it) fails before the first run trains. Images are
    square: --image-size, else the built-in datasets' native 32 (28 for unpadded MNIST); a
    folder's size is unknown until it is read, and its runs are checked when they start."""
    import torch

    from .vae import build_vae

    d, mnist = cfg.data, cfg.data.dataset in ("mnist", "fashion-mnist")
    if d.image_size:
        size = d.image_size
    elif d.dataset == "folder":
        return
    else:
        size = 28 if mnist and not d.pad_to_32 else 32
    channels = 1 if mnist else 3
    try:
        with torch.device("meta"):
            build_vae(cfg.model, channels=channels, image_size=size)
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        where = ", ".join(f"{k}={v}" for k, v in point.items())
        raise ConfigError(f"sweep grid point {where}: {e}") from None


def _check_fair(runs: list[tuple[str, RunConfig]]) -> None:
    if any(cfg.train.patience > 0 for _, cfg in runs):
        raise ConfigError("sweep: early stopping (--patience) would stop runs after different "
                          "numbers of images; a sweep compares equal images: set --patience 0 "
                          "and choose --max-epochs")
    if any(cfg.train.max_epochs == RunConfig().train.max_epochs for _, cfg in runs):
        raise ConfigError("sweep: set --max-epochs (every run trains that many epochs over the "
                          "same data); the default of 1000 is the study's open-ended setting")
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise ConfigError(f"sweep: grid points with the same name: {names}")


def _write_status(sweep_dir: Path, spec: SweepSpec, entries: list[dict]) -> None:
    write_json(SweepDir(sweep_dir).status, {
        "grid": spec.grid, "preset": spec.preset, "config": spec.config, "set": spec.fixed,
        "budget_per_run": spec.budget_per_run, "iwae_k": spec.iwae_k, "iwae_n": spec.iwae_n,
        "runs": entries})


def _entry(name: str, cfg: RunConfig, point: Mapping) -> dict:
    return {"name": name, "dir": name, **{k: v for k, v in point.items()},
            "depth": cfg.model.depth, "shortcut": cfg.model.shortcut, "seed": cfg.train.seed,
            "status": "pending",
            "error": None}


def _same_model(run: RunDir, cfg: RunConfig) -> None:
    if config_differences(read_config(run.root), cfg, ["model", "data"]):
        raise ConfigError(f"{run.root}: holds a run of another model or data config than this "
                          "sweep asks for; use another --out or remove it")


def run_one(name: str, cfg: RunConfig, sweep_dir: Path, spec: SweepSpec, *, data_cache: dict,
            progress: bool | None = None) -> str:
    """Train (or resume, or skip) one run in this process, then evaluate it; returns what
    happened: 'trained', 'resumed' or 'skipped'."""
    from . import distributed as D
    from .data import load_splits  # the loader honours the data config like `resvae train`
    from .evaluate import eval_run
    from .stops import SIGNAL_STOPS
    from .train import train

    run = SweepDir(sweep_dir).run(name)
    key = json.dumps([to_dict(cfg)["data"], cfg.train.seed])  # runs share decoded data
    if key not in data_cache:
        data_cache[key] = load_splits(cfg, download=cfg.data.download,
                                      rt=D.Runtime(D.resolve_device("cpu")))
    data = data_cache[key]
    if is_finished(run.root):
        _same_model(run, cfg)
        what = "skipped"
    else:
        resume = run.checkpoint("last").exists()
        if resume:
            _same_model(run, cfg)
        with RunLock(run.root):  # a `resvae train` into the same directory is refused
            summary = train(cfg, run.root, data=data, resume=resume, progress=progress,
                            argv=["resvae", "sweep", "(run)", name])
        if summary["stop_reason"] in SIGNAL_STOPS:  # the sweep stops too; rerun it to resume
            raise KeyboardInterrupt(summary["stop_reason"])
        what = "resumed" if resume else "trained"
    if not run.checkpoint("best").exists():
        # trained, but no validation loss was ever finite: nothing to evaluate, and the run's
        # row must say so rather than show an infinite loss as a result
        raise RuntimeError("no epoch had a finite validation loss (see its metrics.jsonl), so "
                           "there are no best weights to evaluate")
    if spec.iwae_k > 0 and (what != "skipped" or not run.eval.exists()):
        eval_run(run.root, k=spec.iwae_k, n=spec.iwae_n, data=data, device=_device(cfg))
    return what


def _device(cfg: RunConfig) -> str:
    from . import distributed as D
    return str(D.resolve_device(cfg.train.device))


def sweep(spec: SweepSpec, sweep_dir: str | Path, *, environ: Mapping[str, str] | None = None,
          gpus: list[str] | None = None, progress: bool | None = None,
          log=print) -> list[dict]:
    """Run every grid point (skipping finished ones), then write the report; return the entries.

    `gpus`: with several, one run per GPU at a time, each in a `resvae train` subprocess that
    sees only its GPU (CUDA_VISIBLE_DEVICES). Default: every visible GPU when there are several,
    else one run after another in this process.
    """
    sweep_dir = Path(sweep_dir)
    runs = plan(spec, environ)
    _check_sweep_dir(sweep_dir)
    if gpus is None:
        gpus = _visible_gpus()
    # two sweeps into one directory would train the same runs twice and both write sweep.json
    with RunLock(sweep_dir), SweepSignals(announce=False) as signals:
        try:
            return _sweep(spec, sweep_dir, runs, gpus, progress, log, signals)
        except KeyboardInterrupt:
            name = signal.Signals(signals.received or signal.SIGINT).name
            log(f"resvae sweep: stopped by {name}; run the same command again to continue "
                "(finished runs are kept, an interrupted one resumes)")
            raise KeyboardInterrupt(name) from None


def _stop_if_signalled(signals: SweepSignals) -> None:
    if signals.received:  # taken by the run that just ended, too late to stop it
        raise KeyboardInterrupt(signal.Signals(signals.received).name)


def _sweep(spec: SweepSpec, sweep_dir: Path, runs, gpus: list[str], progress, log,
           signals: SweepSignals) -> list[dict]:
    points = spec.points()
    entries = [_entry(name, cfg, point) for (name, cfg), point in zip(runs, points)]
    sweep_dir.mkdir(parents=True, exist_ok=True)
    _write_status(sweep_dir, spec, entries)
    log(f"resvae sweep: {len(runs)} runs into {sweep_dir}"
        + (f", {len(gpus)} GPUs in parallel" if len(gpus) > 1 else ""))
    if len(gpus) > 1:
        _parallel(runs, entries, sweep_dir, spec, gpus, log, signals)
    else:
        cache: dict = {}
        for i, ((name, cfg), entry) in enumerate(zip(runs, entries), 1):
            t0 = time.monotonic()
            log(f"resvae sweep: [{i}/{len(runs)}] {name}")
            try:
                what = run_one(name, cfg, sweep_dir, spec, data_cache=cache, progress=progress)
                entry.update(status="done", error=None, action=what)
            except KeyboardInterrupt:
                entry.update(status="interrupted")
                _write_status(sweep_dir, spec, entries)
                raise
            except Exception as e:  # a failing run is reported, and the sweep goes on
                entry.update(status="failed", error=f"{type(e).__name__}: {e}")
                log(f"resvae sweep: {name} failed: {entry['error']}")
                run = SweepDir(sweep_dir).run(name)
                run.root.mkdir(parents=True, exist_ok=True)
                run.error.write_text(traceback.format_exc())
            entry["sweep_seconds"] = time.monotonic() - t0
            _write_status(sweep_dir, spec, entries)
            _stop_if_signalled(signals)
    from .report import report
    report(sweep_dir)
    failed = [e["name"] for e in entries if e["status"] != "done"]
    log(f"resvae sweep: done, {len(entries) - len(failed)}/{len(entries)} runs ok"
        + (f"; failed: {', '.join(failed)}" if failed else "")
        + f"; results in {SweepDir(sweep_dir).results_md}")
    return entries


def print_commands(spec: SweepSpec, sweep_dir: str | Path,
                   environ: Mapping[str, str] | None = None) -> list[str]:
    """The sweep as shell commands, one `resvae train` (and `resvae eval`) per grid point, then
    `resvae report`, for any other scheduler (an sbatch array, GNU parallel, a cloud batch
    service). Nothing trains; each run's resolved config is written beside where it will run
    (SWEEP_DIR/.<name>.config.json), so a command is exact whatever shell or machine runs it."""
    sweep_dir = Path(sweep_dir)
    runs = plan(spec, environ)
    _check_sweep_dir(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for name, cfg in runs:
        run, planned = SweepDir(sweep_dir).run(name), _write_planned(sweep_dir, name, cfg)
        cmd = ["resvae", "train", "--config", str(planned), "--out", str(run.root)]
        if spec.iwae_k > 0:
            cmd = [*cmd, "&&", "resvae", "eval", str(run.root), "--k", str(spec.iwae_k),
                   "--n", str(spec.iwae_n)]
        lines.append(" ".join(shlex.quote(c) if c != "&&" else c for c in cmd))
    lines.append(shlex.join(["resvae", "report", str(sweep_dir)]))
    return lines


def _visible_gpus() -> list[str]:
    import torch
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _check_sweep_dir(sweep_dir: Path) -> None:
    """--out must be a folder, or a path one can be made at (files.check_output), and not a
    training run (its runs would be mixed into that run's files)."""
    check_output(sweep_dir, "--out", folder=True)
    if RunDir(sweep_dir).config.is_file() or RunDir(sweep_dir).checkpoint("last").exists():
        raise ConfigError(f"--out {sweep_dir}: holds a training run (config.json), not a sweep; "
                          "choose another folder")


def _write_planned(sweep_dir: Path, name: str, cfg: RunConfig) -> Path:
    """The resolved config a run trains with outside this process (`resvae train --config`)."""
    planned = SweepDir(sweep_dir).planned_config(name)
    write_json(planned, to_dict(cfg))
    return planned


def run_commands(run_dir: str | Path, planned: str | Path, eval_args: list[str]) -> list:
    """The child processes that bring one run to its end, whoever starts them (a GPU slot here,
    a Slurm task): train it (resume it when it has a checkpoint, else start it over), then
    evaluate it with `eval_args` (none: no evaluation) unless it is finished and evaluated."""
    exe = [sys.executable, "-m", "resvae"]
    run, cmds = RunDir(run_dir), []
    if not is_finished(run.root):
        cmds.append(exe + (["train", "--resume", str(run.root)]
                           if run.checkpoint("last").exists() else
                           # no checkpoint to resume: whatever an earlier try left is started over
                           ["train", "--config", str(planned), "--out", str(run.root),
                            "--overwrite"]))
    if eval_args and (cmds or not run.eval.exists()):
        cmds.append(exe + ["eval", str(run.root), *eval_args])
    return cmds


def _eval_args(spec: SweepSpec) -> list[str]:
    return ["--k", str(spec.iwae_k), "--n", str(spec.iwae_n)] if spec.iwae_k > 0 else []


def _subprocess_commands(name: str, cfg: RunConfig, sweep_dir: Path, spec: SweepSpec) -> list:
    run, planned = SweepDir(sweep_dir).run(name), _write_planned(sweep_dir, name, cfg)
    if is_finished(run.root) or run.checkpoint("last").exists():
        _same_model(run, cfg)  # what is there is this run's, not another model's
    return run_commands(run.root, planned, _eval_args(spec))


def _parallel(runs, entries, sweep_dir: Path, spec: SweepSpec, gpus: list[str], log,
              signals: SweepSignals) -> None:
    """One run per GPU at a time; each run is `resvae train` then `resvae eval` in a child that
    sees only its GPU. Its output goes to RUN_DIR/../<name>.log. A signal to the sweep is passed
    on to the children (SIGTERM: each checkpoints), and the sweep waits for them to end."""
    active: dict[str, list] = {}  # gpu -> [entry, remaining commands, process, log file]
    try:
        _parallel_loop(runs, entries, sweep_dir, spec, gpus, log, active)
    except KeyboardInterrupt:
        for entry, _, proc, logf in active.values():
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            entry.update(status="interrupted")
            logf.close()
        _write_status(sweep_dir, spec, entries)
        raise


def _parallel_loop(runs, entries, sweep_dir: Path, spec: SweepSpec, gpus: list[str], log,
                   active: dict) -> None:
    queue = list(zip(runs, entries))
    while queue or active:
        for gpu in [g for g in gpus if g not in active]:
            if not queue:
                break
            (name, cfg), entry = queue.pop(0)
            try:
                cmds = _subprocess_commands(name, cfg, sweep_dir, spec)
            except Exception as e:
                entry.update(status="failed", error=f"{type(e).__name__}: {e}")
                continue
            logf = open(SweepDir(sweep_dir).log(name), "a")
            log(f"resvae sweep: {name} on GPU {gpu}")
            active[gpu] = [entry, cmds, None, logf]
        for gpu, slot in list(active.items()):
            entry, cmds, proc, logf = slot
            if proc is not None and proc.poll() is None:
                continue
            if proc is not None and proc.returncode != 0:
                entry.update(status="failed", error=f"exit status {proc.returncode}; see "
                             f"{logf.name}")
                cmds.clear()
            if not cmds:
                if entry["status"] == "pending":
                    entry.update(status="done", error=None)
                logf.close()
                del active[gpu]
                _write_status(sweep_dir, spec, entries)
                continue
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            slot[2] = subprocess.Popen(cmds.pop(0), stdout=logf, stderr=subprocess.STDOUT, env=env)
        time.sleep(0.5)
    _write_status(sweep_dir, spec, entries)


def submit_slurm(spec: SweepSpec, sweep_dir: str | Path, settings, *,
                 environ: Mapping[str, str] | None = None, wait: bool = False,
                 poll_seconds: float = 10.0, log=print) -> list[dict]:
    """`resvae sweep --launcher slurm`: one Slurm job array (through submitit) for the runs that
    are neither finished nor pending/running in Slurm; returns once submitted, or with `wait`
    when no job is left in the queue, then writes the report. sweep.json records each run's job
    id; `resvae sweep --status SWEEP_DIR` reads it back."""
    from .slurm import RunTask, queue_states, run_state, submit

    sweep_dir = Path(sweep_dir)
    runs = plan(spec, environ)
    _check_sweep_dir(sweep_dir)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(sweep_dir):
        old = {e["name"]: e for e in read_sweep(sweep_dir).get("runs", [])}
        entries = [{**_entry(name, cfg, point), "job_id": old.get(name, {}).get("job_id")}
                   for (name, cfg), point in zip(runs, spec.points())]
        queued = queue_states([e["job_id"] for e in entries if e["job_id"]])
        tasks = []
        for (name, cfg), e in zip(runs, entries):
            run = SweepDir(sweep_dir).run(name)
            e["status"] = run_state(run.root, e["job_id"], queued, spec.iwae_k > 0)
            if e["status"] == "done" or e["job_id"] in queued:
                continue
            if run.config.exists():
                _same_model(run, cfg)
            planned = _write_planned(sweep_dir, name, cfg)
            eval_args = _eval_args(spec)
            tasks.append((name, RunTask(str(run.root), str(planned), eval_args)))
        ids = submit(tasks, sweep_dir, settings) if tasks else {}
        for e in entries:
            if e["name"] in ids:
                e.update(job_id=ids[e["name"]], status="submitted")
        _write_status(sweep_dir, spec, entries)
    log(f"resvae sweep: {len(ids)} of {len(entries)} runs submitted to Slurm "
        f"({', '.join(sorted(set(ids.values()), key=str)) or 'none'}); watch with "
        f"resvae sweep --status {sweep_dir}")
    return _wait(sweep_dir, spec, entries, poll_seconds, log) if wait else entries


def _wait(sweep_dir: Path, spec: SweepSpec, entries: list[dict], poll_seconds: float,
          log) -> list[dict]:
    """Poll squeue until none of the sweep's jobs is queued, printing each state change; then
    the runs' final states and the report."""
    from .report import report
    from .slurm import queue_states, run_state

    while True:
        queued = queue_states([e["job_id"] for e in entries if e.get("job_id")])
        for e in entries:
            state = run_state(SweepDir(sweep_dir).run(e["name"]).root, e.get("job_id"), queued,
                              spec.iwae_k > 0)
            if state != e["status"]:
                log(f"resvae sweep: {e['name']} ({e.get('job_id')}): {state}")
                e["status"] = state
        if not any(e.get("job_id") in queued for e in entries):
            break
        time.sleep(poll_seconds)
    _write_status(sweep_dir, spec, entries)
    report(sweep_dir)
    return entries


def read_sweep(sweep_dir: str | Path) -> dict:
    """sweep.json, checked (runs.SweepDir.read_status); {} when there is none."""
    return SweepDir(sweep_dir).read_status()


__all__ = ["submit_slurm", "print_commands", "SweepSpec", "load_sweep_file", "plan", "sweep", "run_name", "read_sweep"]
