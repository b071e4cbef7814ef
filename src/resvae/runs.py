"""A run directory, and the one place that knows its layout.

    RUN_DIR/config.json          the resolved RunConfig
    RUN_DIR/argv.json            the command that started it
    RUN_DIR/history.jsonl        one record per invocation (start, resume, stop): argv, times,
                                 stop reason; an invocation that was killed has no stop
    RUN_DIR/metrics.jsonl        one record per epoch
    RUN_DIR/summary.json         how the last invocation ended, what it measured, what ran it
    RUN_DIR/eval.json            `resvae eval` (and the sweep): ELBO and IWAE with standard errors
    RUN_DIR/checkpoints/{last,best}.pt, best.safetensors
    RUN_DIR/samples/epoch_NNNN.png, RUN_DIR/recon/epoch_NNNN.png
    RUN_DIR/tensorboard/         TensorBoard event files (--tensorboard)
    RUN_DIR/.lock                held (flock) by the process training into it, while it runs

and an exported folder (`resvae export --format hub`), the weights alone with their config:

    DIR/config.json              {"format", "resvae_version", "image_shape", "config"}
    DIR/model.safetensors        the state dict (its metadata repeats config and image shape)

Every other module asks this one for paths, reads and writes (nanoGPT's single checkpoint dict,
one loader shared by training, evaluation and sampling).
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from . import __version__
from . import distributed as D
from .config import ConfigError, RunConfig, from_dict, resolve, to_dict
from .files import DiskFullError, atomic_write, disk_full_is_named

try:
    import fcntl
except ImportError:  # Windows: no flock; run directories are not locked there
    fcntl = None
from .vae import VAE, build_from_config, model_info

CHECKPOINTS = ("last", "best")
EXPORTED_CONFIG, EXPORTED_WEIGHTS = "config.json", "model.safetensors"


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

    def checkpoint(self, which: str = "last") -> Path:
        if which not in CHECKPOINTS:
            raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")
        return self.root / "checkpoints" / f"{which}.pt"

    def grid(self, kind: str, epoch: int) -> Path:
        return getattr(self, kind) / f"epoch_{epoch:04d}.png"

    def latest_grid(self, kind: str) -> Path | None:
        grids = sorted(getattr(self, kind).glob("epoch_*.png"))
        return grids[-1] if grids else None

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"


# --- JSON records -------------------------------------------------------------------------------
def write_json(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2) + "\n"  # serialise first: a bad value writes nothing
    atomic_write(path, lambda t: t.write_text(text))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_summary(run_dir) -> dict:
    return read_json(RunDir(run_dir).summary)


def read_config(run_dir) -> RunConfig:
    path = RunDir(run_dir).config
    return from_dict(read_json(path), source=str(path))


def _read_records(path: Path) -> tuple[list[dict], str | None]:
    """metrics.jsonl's records, and the unterminated last line when it is not a whole record: a
    write in progress, or one a crash (or a full disk) cut off. A bad line anywhere else is an
    error naming the file and line."""
    text = path.read_text()
    lines = text.splitlines()
    torn = None
    if lines and not text.endswith("\n"):
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
                raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
    return out, torn


def read_metrics(run_dir) -> list[dict]:
    """The per-epoch records, oldest first; [] before the first epoch ends. A torn last line (see
    `_read_records`) is not a record and is left out."""
    path = RunDir(run_dir).metrics
    return _read_records(path)[0] if path.exists() else []


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
        records, torn = _read_records(path)
        if torn is not None:
            warnings.warn(f"{path}: dropped a torn last line (a write cut off by a crash or a "
                          f"full disk): {torn[:60]!r}", stacklevel=2)
        keep = [r for r in records if r["epoch"] <= epochs_done]
        atomic_write(path, lambda t: t.write_text("".join(json.dumps(r) + "\n" for r in keep)))


def read_history(run_dir) -> list[dict]:
    """One record per invocation of `resvae train` on this run, oldest first."""
    path = RunDir(run_dir).history
    if not path.exists():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not a JSON record ({e})") from None
    return out


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


# --- checkpoints ------------------------------------------------------------------------------
def save_checkpoint(state: Mapping, path: Path) -> None:
    def write(tmp: Path) -> None:
        # a Python file object, not a path: torch's own writer reports a full disk as
        # "enforce fail at inline_container.cc", a file object as the OSError it is
        with open(tmp, "wb") as f:
            torch.save(dict(state), f)
    atomic_write(Path(path), write)


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


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """The one checkpoint loader: weights_only=True (no arbitrary pickles); strips torch.compile's
    `_orig_mod.` and DDP's `module.` prefixes. A broken file is a ValueError naming it (and, for
    a broken last.pt beside a good best.pt, how to resume from that)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise ValueError(f"{path}: empty file (0 bytes), not a checkpoint: its write was cut off "
                         f"before it began{_other_checkpoint(path)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises almost anything on a damaged or foreign file
        text = str(e).strip()
        # weights-only refusals carry the unpickler's reason after this tag, not in line one
        reason = (text.partition("WeightsUnpickler error: ")[2] or text).strip()
        first = (reason.splitlines() or [type(e).__name__])[0]
        if "Weights only load failed" in text and "global" in reason.lower():
            # a pickle asking for a function or class; torch's advice (weights_only=False) would
            # run it, so it is not passed on
            raise ValueError(f"{path}: refused: it holds Python objects other than tensors and "
                             "plain containers, which could run code when loaded; resvae loads "
                             "checkpoints with weights_only=True and nothing in it was run (a "
                             f"crafted file, or not a resvae checkpoint){_other_checkpoint(path)}"
                             ) from None
        unrun = "; nothing in it was run" if "Weights only load failed" in text else ""
        raise ValueError(f"{path}: truncated or corrupt, not a loadable checkpoint ({first[:160]})"
                         f"{unrun}{_other_checkpoint(path)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise ValueError(f"{path}: not a resvae checkpoint (no 'model' state dict in it)"
                         f"{_other_checkpoint(path)}")
    state["model"] = {_strip_wrappers(k): v for k, v in state["model"].items()}
    return state


def eval_weights(ckpt: Mapping) -> dict:
    """The weights a checkpoint's run evaluated and saved: the --ema average when it kept one."""
    return ckpt.get("ema", ckpt["model"])


def _other_checkpoint(path: Path) -> str:
    """For a broken last.pt: the readable best.pt beside it, and how to resume from it."""
    best = path.with_name("best.pt")
    if path.name != "last.pt" or not best.is_file():
        return ""
    try:
        epoch = torch.load(best, map_location="cpu", weights_only=True)["epoch"]
    except Exception:
        return f"; {best.name} beside it is broken too"
    return (f"; {best} (epoch {epoch}) is readable: to resume from it, run --resume "
            f"{path.parent.parent} --resume-from best; the epochs after {epoch} are lost")


def _strip_wrappers(key: str) -> str:
    # DDP and torch.compile can wrap each other in either order.
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def save_weights(vae: VAE, cfg: RunConfig, path: Path) -> None:
    """Weights alone as safetensors, with the config and image shape in the metadata: safe to
    share, and enough to rebuild the model with no pickle involved."""
    tensors = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    meta = {"config": json.dumps(to_dict(cfg)), "image_shape": json.dumps(list(vae.image_shape)),
            "format": "resvae"}
    atomic_write(path, lambda t: save_file(tensors, str(t), metadata=meta))


def _load_safetensors(path: Path, device) -> tuple[VAE, RunConfig]:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
    if "config" not in meta or "image_shape" not in meta:
        raise ValueError(f"{path}: no resvae config/image_shape in its metadata (not written by "
                         "resvae)")
    cfg = from_dict(json.loads(meta["config"]), source=f"{path} metadata")
    vae = build_from_config(cfg, tuple(json.loads(meta["image_shape"]))).to(device)
    vae.load_state_dict(state)
    return vae.eval(), cfg


# --- exported folders -----------------------------------------------------------------------
def is_exported(path: str | os.PathLike) -> bool:
    """A folder written by `save_pretrained`: config.json and model.safetensors, no checkpoints/."""
    p = Path(path)
    return ((p / EXPORTED_WEIGHTS).is_file() and (p / EXPORTED_CONFIG).is_file()
            and not (p / "checkpoints").exists())


def save_pretrained(vae: VAE, cfg: RunConfig, out_dir: str | os.PathLike) -> Path:
    """Write the folder `load_pretrained` reads: config.json (the run's config, the image shape,
    the resvae version) and model.safetensors. JSON and safetensors only: no pickle to trust."""
    out = Path(out_dir)
    if (out / "checkpoints").exists():
        raise ValueError(f"{out}: holds a run (checkpoints/); export into another folder")
    save_weights(vae, cfg, out / EXPORTED_WEIGHTS)
    write_json(out / EXPORTED_CONFIG, {"format": "resvae", "resvae_version": __version__,
                                       "image_shape": list(vae.image_shape),
                                       "config": to_dict(cfg)})
    return out


def _load_exported(path: Path, device) -> tuple[VAE, RunConfig]:
    meta = read_json(path / EXPORTED_CONFIG)
    if not isinstance(meta, dict) or meta.get("format") != "resvae" or "config" not in meta:
        raise ValueError(f"{path / EXPORTED_CONFIG}: not an exported resvae config (no "
                         "\"format\": \"resvae\" and \"config\")")
    cfg = from_dict(meta["config"], source=str(path / EXPORTED_CONFIG))
    try:
        state = load_file(str(path / EXPORTED_WEIGHTS), device=str(device))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path / EXPORTED_WEIGHTS}: not a readable safetensors file ({e})") \
            from None
    vae = build_from_config(cfg, tuple(meta["image_shape"])).to(device)
    vae.load_state_dict(state)
    return vae.eval(), cfg


def load_pretrained(path: str | os.PathLike, device="cpu") -> VAE:
    """The VAE (eval mode) of a folder written by `resvae export --format hub`
    (`load_run(path)` gives it with its config)."""
    path = Path(path)
    if not is_exported(path):
        raise FileNotFoundError(f"{path}: not an exported folder (config.json and "
                                "model.safetensors; `resvae export RUN_DIR -o DIR` writes one; "
                                "load_run reads run directories)")
    return _load_exported(path, device)[0]


def load_run(run_dir: str | os.PathLike, which: str = "best", device="cpu") -> tuple[VAE, RunConfig]:
    """Rebuild a trained VAE in eval mode: from RUN_DIR/checkpoints/<which>.pt, from a
    `.safetensors` file (RUN_DIR/checkpoints/best.safetensors alone is enough), or from an
    exported folder (`resvae export --format hub`)."""
    path = Path(run_dir)
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a run directory, an exported folder or a "
                                ".safetensors file")
    if is_exported(path):
        if which != "best":
            raise ValueError(f"{path}: an exported folder holds one set of weights (those of "
                             f"the checkpoint it was exported from), not {which!r}")
        return _load_exported(path, device)
    run = RunDir(path)
    ckpt = run.checkpoint(which)
    if not ckpt.exists() and which == "best" and run.safetensors.exists():
        return _load_safetensors(run.safetensors, device)
    if not ckpt.exists():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint (has {path} finished an epoch?)")
    state = load_checkpoint(ckpt, map_location=device)
    cfg = from_dict(state["config"], source=str(ckpt))
    vae = build_from_config(cfg, tuple(state["image_shape"])).to(device)
    vae.load_state_dict(eval_weights(state))
    return vae.eval(), cfg


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


def resume_config(run_dir, environ: Mapping[str, str], overrides: Mapping,
                  resume_from: str = "last") -> RunConfig:
    """The config to continue `run_dir` with: its config.json under env vars and flags, which may
    change training settings (lr, budget, max_epochs...) but never the model, the data or the
    seed (they fix the weights' shapes, the data order and the held-out split)."""
    run = RunDir(run_dir)
    resume_checkpoint(run.root, resume_from)
    cfg = resolve(config_file=str(run.config), environ=environ, overrides=overrides)
    saved = resolve(config_file=str(run.config), environ={})
    if cfg.model != saved.model:
        diff = ", ".join(f"{k} {v!r} in the run vs {getattr(cfg.model, k)!r}"
                         for k, v in vars(saved.model).items() if getattr(cfg.model, k) != v)
        raise ConfigError(f"--resume {run.root}: the model settings differ from the run's "
                          f"config.json ({diff}; from flags or RESVAE_* variables); they must match")
    # data_dir and download may change: the same data can move, or be fetched again
    fixed = [("data", k) for k in vars(saved.data) if k not in ("data_dir", "download")]
    diff = [f"{k} {getattr(getattr(saved, sec), k)!r} in the run vs "
            f"{getattr(getattr(cfg, sec), k)!r}"
            for sec, k in (*fixed, ("train", "seed"))
            if getattr(getattr(saved, sec), k) != getattr(getattr(cfg, sec), k)]
    if diff:
        raise ConfigError(f"--resume {run.root}: {', '.join(diff)} (from flags or RESVAE_* "
                          "variables); a resumed run keeps the data and seed it started with: "
                          "drop those settings, or start a new run with --out")
    return cfg


def load_resume_checkpoint(path: Path, image_shape, map_location="cpu") -> dict:
    """The checkpoint a run resumes from, checked against the images it will train on (data
    moved with --data-dir can differ in shape from what the weights were trained on)."""
    ckpt = load_checkpoint(path, map_location=map_location)
    if "image_shape" in ckpt and tuple(ckpt["image_shape"]) != tuple(image_shape):
        raise ValueError(f"--resume {path}: its checkpoint was trained on images of shape "
                         f"{tuple(ckpt['image_shape'])}, the data found now are "
                         f"{tuple(image_shape)}; point --data-dir at the run's data")
    return ckpt


def load_best_weights(run: RunDir, resumed: dict, log=None) -> dict | None:
    """The best weights so far of a run resumed from the checkpoint `resumed`, from
    checkpoints/best.pt; None before any, and None when best.pt is not the resumed state's own
    best epoch (a budget-cut epoch's, or one newer than a --resume-from checkpoint). A broken
    best.pt does not block the resume: when the resumed state's last epoch was its best, it
    holds the same weights and best.pt is rewritten from it; otherwise the best weights are
    lost, and the message says so."""
    log = log or (lambda text, err=True: print(text, file=sys.stderr))
    path = run.checkpoint("best")
    if not path.exists():
        return None
    try:
        best = load_checkpoint(path)
    except ValueError as e:
        if (resumed.get("best_epoch") and resumed.get("best_epoch") == resumed.get("epoch")
                and resumed.get("progress") is None):
            # both were saved from the same state at the end of that epoch
            save_checkpoint(resumed, path)
            log(f"resvae: warning: {e}; its epoch {resumed['epoch']} is also the resumed "
                "checkpoint's, so it was rewritten from the resumed checkpoint", err=True)
            return {k: v.detach().to("cpu", copy=True) for k, v in eval_weights(resumed).items()}
        log(f"resvae: warning: {e}; the best weights so far (epoch {resumed.get('best_epoch')}) "
            "are lost: the next improving epoch writes a new best.pt, and the test figures of "
            "this run come from the weights it ends with until then", err=True)
        return None
    if best.get("progress") is None and best.get("epoch") == resumed.get("best_epoch"):
        return eval_weights(best)
    return None


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


class RunLocked(ConfigError):
    """Another live process holds the run directory's lock."""


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


__all__ = ["RunDir", "load_run", "load_pretrained", "save_pretrained", "is_exported",
           "load_checkpoint", "save_checkpoint", "save_weights",
           "read_metrics", "read_summary", "read_config", "read_json", "write_json",
           "append_metrics", "keep_metrics", "is_finished", "resume_config", "check_fresh",
           "resume_checkpoint", "read_history", "start_history", "end_history",
           "remove_stale_temps",
           "load_resume_checkpoint", "load_best_weights", "holds_run", "clear_run", "RunLock",
           "RunLocked", "DiskFullError"]


# ----------------------------------------------------------------------------- provenance

def what_ran(vae: VAE, rt: D.Runtime, argv) -> dict:
    """The model's size and cost, and the software and machine that trained it (summary.json)."""
    info = model_info(vae)
    return {"layers": info["layers"], "params": info["params"],
            "flops_per_image": info["flops"], "resvae_version": __version__,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "device": D.device_name(rt.device), "git_commit": git_commit(), "command": argv}


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


__all__ += ["what_ran", "git_commit"]
