"""Run and sweep directories, and the one place that knows their layout.

    RUN_DIR/config.json          the resolved RunConfig
    RUN_DIR/argv.json            the command that started it
    RUN_DIR/history.jsonl        one record per invocation (start, resume, stop): argv, times,
                                 stop reason; an invocation that was killed has no stop
    RUN_DIR/metrics.jsonl        one record per epoch
    RUN_DIR/summary.json         how the last invocation ended, what it measured, what ran it
    RUN_DIR/eval.json            `resvae eval` (and the sweep): ELBO and IWAE with standard errors
    RUN_DIR/checkpoints/{last,best}.pt, best.safetensors   (written and read by checkpoints.py)
    RUN_DIR/samples/epoch_NNNN.png, RUN_DIR/recon/epoch_NNNN.png
    RUN_DIR/tensorboard/         TensorBoard event files (--tensorboard)
    RUN_DIR/error.txt            a sweep's failed run: the traceback
    RUN_DIR/.lock                held (flock) by the process training into it, while it runs

    SWEEP_DIR/<name>/            one run directory per grid point
    SWEEP_DIR/sweep.json         the grid and every run's status
    SWEEP_DIR/results.csv, results.md, <figure>.png    the report
    SWEEP_DIR/<name>.log, .<name>.config.json          a run trained on its own GPU: its output
                                                       and the config it was started with

Every other module asks this one for paths and JSON records; checkpoints.py saves and loads
what is in checkpoints/.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from . import __version__
from . import distributed as D
from .config import RunConfig, from_dict, resolve, to_dict
from .errors import ConfigError, RunError, RunLocked, RunNotFound
from .files import DiskFullError, atomic_write, disk_full_is_named
from .vae import model_info
from .vae_base import BaseVAE

try:
    import fcntl
except ImportError:  # Windows: no flock; run directories are not locked there
    fcntl = None

CHECKPOINTS = ("last", "best")


class RunDir:
    """Paths inside one run directory (nothing is created until something is written)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    config = property(lambda self: self.root / "config.json")
    argv = property(lambda self: self.root / "argv.json")
    history = property(lambda self: self.root / "history.jsonl")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    eval = property(lambda self: self.root / "eval.json")
    samples = property(lambda self: self.root / "samples")
    recon = property(lambda self: self.root / "recon")
    safetensors = property(lambda self: self.root / "checkpoints" / "best.safetensors")
    tensorboard = property(lambda self: self.root / "tensorboard")
    error = property(lambda self: self.root / "error.txt")

    def checkpoint(self, which: str = "last") -> Path:
        if which not in CHECKPOINTS:
            raise ConfigError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
        return self.root / "checkpoints" / f"{which}.pt"

    def grid(self, kind: str, epoch: int) -> Path:
        return getattr(self, kind) / f"epoch_{epoch:04d}.png"

    def latest_grid(self, kind: str) -> Path | None:
        grids = sorted(getattr(self, kind).glob("epoch_*.png"))
        return grids[-1] if grids else None

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


class SweepDir:
    """Paths inside one sweep directory: a run directory per grid point, and what the sweep and
    its report write beside them."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    status = property(lambda self: self.root / "sweep.json")
    results_csv = property(lambda self: self.root / "results.csv")
    results_md = property(lambda self: self.root / "results.md")
    aggregate_csv = property(lambda self: self.root / "aggregate.csv")  # over seeds
    paired_csv = property(lambda self: self.root / "paired.csv")  # residual - plain, same seeds

    def run(self, name: str) -> RunDir:
        return RunDir(self.root / name)

    def read_status(self) -> dict:
        """sweep.json, checked: an object whose "runs" is a list of entries, each naming its run
        folder (one name inside this directory, never a path); {} when there is none."""
        if not self.status.exists():
            return {}
        status = read_json(self.status)
        entries = status.get("runs", [])
        if not isinstance(entries, list):
            raise RunError(f"{self.status}: 'runs' must be a list, got {entries!r}")
        for e in entries:
            folder = e.get("dir", e.get("name")) if isinstance(e, dict) else None
            if not (isinstance(folder, str) and Path(folder).name == folder
                    and folder not in ("", ".", "..") and isinstance(e.get("name"), str)):
                raise RunError(f"{self.status}: each entry of 'runs' needs a name (a folder in "
                               f"the sweep directory), got {e!r}")
        return status

    def entry_run(self, entry: dict) -> RunDir:
        return self.run(entry.get("dir", entry["name"]))

    def figure(self, name: str) -> Path:
        return self.root / f"{name}.png"

    def log(self, name: str) -> Path:
        """The output of a run trained in a child process (one per GPU)."""
        return self.root / f"{name}.log"

    def planned_config(self, name: str) -> Path:
        """The config a child process trains the run with (`resvae train --config`)."""
        return self.root / f".{name}.config.json"

    def __repr__(self) -> str:
        return f"SweepDir({str(self.root)!r})"


# --- JSON records -------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"  # serialise first: a bad value writes nothing
    atomic_write(path, lambda t: t.write_text(text))


def read_json(path: Path) -> dict:
    """A JSON record resvae wrote (summary, eval, sweep.json, an export's config.json): one
    object, or a RunError naming the file; a tampered or foreign file gets no further."""
    try:
        record = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise RunNotFound(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise RunError(f"{path}: expected a JSON object, got a {type(record).__name__}")
    return record


def read_summary(run_dir) -> dict:
    return read_json(RunDir(run_dir).summary)


def read_config(run_dir) -> RunConfig:
    path = RunDir(run_dir).config
    return from_dict(read_json(path), source=str(path))


def _read_jsonl(path: Path, torn_ok: bool = False) -> tuple[list[dict], str | None]:
    """A JSONL file's records, and (with `torn_ok`) its unterminated last line when it is not a
    whole record: a write in progress, or one a crash (or a full disk) cut off. A bad line
    anywhere else is an error naming the file and line."""
    text = path.read_text()
    lines = text.splitlines()
    torn = None
    if torn_ok and lines and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            torn = lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RunError(f"{path}:{i}: not a JSON record ({e})") from None
    return out, torn


def read_metrics(run_dir) -> list[dict]:
    """The per-epoch records, oldest first; [] before the first epoch ends. A torn last line (see
    `_read_jsonl`) is not a record and is left out."""
    path = RunDir(run_dir).metrics
    return _read_jsonl(path, torn_ok=True)[0] if path.exists() else []


def append_metrics(run_dir, record: dict) -> None:
    path = RunDir(run_dir).metrics
    line = json.dumps(record) + "\n"  # serialise first: a bad value writes nothing
    with disk_full_is_named(path, "the records before this one are intact (a torn last line "
                            "is dropped on --resume)"), open(path, "a") as f:
        f.write(line)


def keep_metrics(run_dir, epochs_done: int) -> None:
    """On resume, drop records of epochs after the checkpoint (written before a crash), and a
    torn last line, saying so."""
    path = RunDir(run_dir).metrics
    if path.exists():
        records, torn = _read_jsonl(path, torn_ok=True)
        if torn is not None:
            warnings.warn(f"{path}: dropped a torn last line (a write cut off by a crash or a "
                          f"full disk): {torn[:60]!r}", stacklevel=2)
        keep = [r for r in records if r["epoch"] <= epochs_done]
        atomic_write(path, lambda t: t.write_text("".join(json.dumps(r) + "\n" for r in keep)))


def read_history(run_dir) -> list[dict]:
    """One record per invocation of `resvae train` on this run, oldest first."""
    path = RunDir(run_dir).history
    return _read_jsonl(path)[0] if path.exists() else []


def start_history(run_dir, record: dict) -> int:
    """Append this invocation's record (no stop yet: a killed invocation keeps none); returns
    its number, 1 for the run's first."""
    records = read_history(run_dir)
    number = len(records) + 1
    _write_history(run_dir, records + [{"invocation": number, **record}])
    return number


def _write_history(run_dir, records: list[dict]) -> None:
    # rewritten whole and atomically (it is small): a crash never leaves half a record
    atomic_write(RunDir(run_dir).history,
                 lambda t: t.write_text("".join(json.dumps(r) + "\n" for r in records)))


def end_history(run_dir, number: int, fields: dict) -> list[dict]:
    """Add how invocation `number` stopped to its record; returns the whole history."""
    records = read_history(run_dir)
    for r in records:
        if r.get("invocation") == number:
            r.update(fields)
    _write_history(run_dir, records)
    return records


def is_finished(run_dir) -> bool:
    """A run that ended on its own terms (not interrupted): a sweep does not train it again."""
    path = RunDir(run_dir).summary
    if not path.exists():
        return False
    # non_finite ended too: rerunning it would only diverge again (the table reports it)
    return read_json(path).get("stop_reason") in ("max_epochs", "early_stopping", "budget",
                                                  "non_finite")


# --- temp files -------------------------------------------------------------------------------
def remove_stale_temps(directory: Path) -> list[Path]:
    """Delete the temp files of writes whose process is gone (killed while saving: the file it
    replaced is intact, the half-written temp is litter, as large as a checkpoint)."""
    removed = []
    for tmp in Path(directory).glob(".*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


# --- starting and resuming ----------------------------------------------------------------------
def resume_checkpoint(run_dir, resume_from: str = "last") -> Path:
    """The checkpoint `--resume RUN_DIR --resume-from WHICH` continues from: `last` (where the
    run stopped), `best` (its best epoch), or the path of any checkpoint of this run."""
    run = RunDir(run_dir)
    path = run.checkpoint(resume_from) if resume_from in CHECKPOINTS else Path(resume_from)
    if not path.is_file():
        what = (f"no checkpoints/{resume_from}.pt there (not a run directory, or it stopped "
                "before its first checkpoint)" if resume_from in CHECKPOINTS
                else f"--resume-from {resume_from}: no such file")
        raise ConfigError(f"--resume {run.root}: {what}")
    return path


_UNSET = object()


def config_differences(saved: RunConfig | Mapping, cfg: RunConfig, keys=("model",),
                       skip=()) -> list[str]:
    """The one "same model?" check: where `cfg` differs from `saved` (a run's config, or the
    "config" dict a checkpoint holds), each as "key <saved value> in the run vs <cfg's>"; []
    when they agree. `keys`: whole sections ("model", "data") or single settings
    ("train.seed"); `skip`: settings left out ("data.data_dir")."""
    old = saved if isinstance(saved, Mapping) else to_dict(saved)
    new = to_dict(cfg)
    out = []
    for key in keys:
        sec, _, name = key.partition(".")
        a, b = old.get(sec), new[sec]
        a = a if isinstance(a, Mapping) else {}  # a checkpoint without it differs in every key
        # both sides' keys: a setting only one of them has is a difference too
        for k in [name] if name else dict.fromkeys([*a, *b]):
            if f"{sec}.{k}" not in skip and a.get(k, _UNSET) != b.get(k, _UNSET):
                out.append(f"{k} {a.get(k)!r} in the run vs {b.get(k)!r}")
    return out


def resume_config(run_dir, environ: Mapping[str, str], overrides: Mapping,
                  resume_from: str = "last") -> RunConfig:
    """The config to continue `run_dir` with: its config.json under env vars and flags, which may
    change training settings (lr, budget, max_epochs...) but never the model, the data or the
    seed (they fix the weights' shapes, the data order and the held-out split)."""
    run = RunDir(run_dir)
    resume_checkpoint(run.root, resume_from)
    cfg = resolve(config_file=str(run.config), environ=environ, overrides=overrides)
    saved = resolve(config_file=str(run.config), environ={})
    diff = config_differences(saved, cfg, ["model"])
    if diff:
        raise ConfigError(f"--resume {run.root}: the model settings differ from the run's "
                          f"config.json ({', '.join(diff)}; from flags or RESVAE_* variables); "
                          "they must match")
    # data_dir and download may change: the same data can move, or be fetched again
    diff = config_differences(saved, cfg, ["data", "train.seed"],
                              skip=("data.data_dir", "data.download"))
    if diff:
        raise ConfigError(f"--resume {run.root}: {', '.join(diff)} (from flags or RESVAE_* "
                          "variables); a resumed run keeps the data and seed it started with: "
                          "drop those settings, or start a new run with --out")
    return cfg


# --- one process per run directory ----------------------------------------------------------
LOCK_NAME = ".lock"
_RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "checkpoints")


def holds_run(root: Path) -> bool:
    """Whether `root` holds (part of) a run: what `resvae train` writes first and last."""
    return any((Path(root) / name).exists() for name in _RUN_FILES)


def check_fresh(run_dir, overwrite: bool = False) -> None:
    """A new run must not land on top of another one, nor on a file; `overwrite` lets it
    replace a run (`clear_run`, once the new config is valid and the directory locked)."""
    run = RunDir(run_dir)
    if run.root.exists() and not run.root.is_dir():
        raise ConfigError(f"--out {run.root}: is a file, not a directory; choose another --out")
    if overwrite or not holds_run(run.root):
        return
    if run.checkpoint("last").exists():
        done = run.summary.exists() and is_finished(run.root)
        raise ConfigError(f"--out {run.root}: already holds a {'finished ' if done else ''}run; "
                          f"use --resume {run.root} to continue it, --overwrite to replace it, "
                          "or choose another --out")
    raise ConfigError(f"--out {run.root}: already holds a run that never finished an epoch (no "
                      "checkpoints/last.pt to resume from); --overwrite replaces it, or choose "
                      "another --out")


def clear_run(run_dir) -> None:
    """`--overwrite`: remove everything in a run directory but its lock."""
    root = Path(run_dir)
    if not holds_run(root):
        return  # not a run: nothing of someone else's is deleted
    for entry in root.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def is_training(run_dir) -> bool:
    """Whether a process holds the run directory's lock now (a run in progress); False where
    there is no lock file or no fcntl."""
    path = Path(run_dir) / LOCK_NAME
    if fcntl is None or not path.is_file():
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # fails while the writer holds LOCK_EX
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops our shared lock, if we got it


class RunLock:
    """RUN_DIR/.lock, held with fcntl.flock by the one process writing into a run directory, from
    before its first write until it exits. The kernel releases a flock when its process dies,
    however it dies (SIGKILL included), so a crashed run leaves no stale lock behind; the file
    holds the holder's pid and host for the message that turns a second process away.

    flock is advisory and local to a machine: on NFS it holds across clients only where the
    server supports locks (Linux >= 2.6.12 maps flock to NFS byte-range locks); on a file system
    without them two hosts may both get it. On Windows (no fcntl) runs are not locked.

    A directory this lock created is removed again on exit if nothing else was written into it,
    so a run refused for bad input leaves nothing behind.
    """

    def __init__(self, run_dir, flag: str = "--out"):
        self.root, self.flag, self.fd, self.created = Path(run_dir), flag, None, []

    def __enter__(self) -> RunLock:
        if fcntl is None:
            return self
        self.created = [p for p in (self.root, *self.root.parents) if not p.exists()]
        path = self.root / LOCK_NAME
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            while True:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 1000, 0).decode(errors="replace")
                    os.close(fd)
                    raise RunLocked(self._refusal(holder)) from None
                # its last holder may have unlinked the file between our open and flock
                if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        except RunLocked:
            self._remove_created()
            raise
        except OSError as e:
            self._remove_created()
            raise ConfigError(f"{self.flag} {self.root}: cannot write into it ({e.strerror}: "
                              f"{e.filename}); choose a writable directory") from None
        self.fd = fd
        return self

    def _refusal(self, holder: str) -> str:
        try:
            h = json.loads(holder)
            who = f"pid {h['pid']} on {h['host']}, since {h['started']}"
        except (ValueError, KeyError, TypeError):
            who = "pid not yet recorded"
        return (f"{self.flag} {self.root}: another resvae process is training into this run "
                f"directory ({who}); wait for it to end or stop it, or use another --out (its "
                f"lock, {self.root / LOCK_NAME}, goes when it exits, even if killed)")

    def _remove_created(self) -> None:
        for d in self.created:  # deepest first; stops at the first that is not empty
            try:
                d.rmdir()
            except OSError:
                break

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        # unlinked before it is released: a process that opened the old file then finds it gone
        (self.root / LOCK_NAME).unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None
        self._remove_created()


__all__ = ["RunDir", "SweepDir", "read_metrics", "read_summary", "read_config", "read_json",
           "write_json", "append_metrics", "keep_metrics", "is_finished", "config_differences",
           "resume_config", "check_fresh", "resume_checkpoint", "read_history", "start_history",
           "end_history", "remove_stale_temps", "holds_run", "clear_run", "is_training", "RunLock",
           "RunLocked",
           "DiskFullError"]


# ----------------------------------------------------------------------------- provenance

def what_ran(vae: BaseVAE, rt: D.Runtime, argv) -> dict:
    """The model's size and cost, and the software and machine that trained it (summary.json)."""
    info = model_info(vae)
    return {"layers": info["layers"], "params": info["params"],
            "flops_per_image": info["flops"], "resvae_version": __version__,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "device": D.device_name(rt.device), "git_commit": git_commit(), "command": argv}


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (its high-water mark, as `time -v` reports
    it; summary.json's peak_rss_bytes); None where the OS does not say (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes; Linux: KiB


@functools.cache
def git_commit() -> str | None:
    """The commit of resvae's own source, with '+dirty' for uncommitted changes; None when it is
    not a git checkout (an installed wheel). Cached: read when the first run of a process starts,
    which is the code that process imported, even if the checkout moves on during a long sweep."""
    src = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "."],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


__all__ += ["what_ran", "git_commit", "peak_rss_bytes"]
