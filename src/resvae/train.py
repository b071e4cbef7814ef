"""Training: one readable loop, `train(cfg, out_dir)`.

The loop reads top to bottom: `_setup` (data, model, optimizer, or a checkpoint to resume),
then per epoch `train_epoch` (the updates) and `end_epoch` (validate, schedule, record,
checkpoint), then `finish` (test ELBO with the best weights, summary). `TrainState` is exactly
what a checkpoint holds. Where files go is `runs.py`'s business; evaluation is `evaluate.py`'s,
images are `generate.py`'s.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from . import distributed as D
from .callbacks import TensorBoard, notify, summary_writer
from .config import ConfigError, RunConfig, save_json, to_dict
from .data import Splits, iterate_batches, load_dataset, num_batches, to_input
from .evaluate import evaluate, recalibrate_batchnorm
from .generate import save_epoch_grids
from .runs import (
    RunDir,
    append_metrics,
    clear_run,
    end_history,
    keep_metrics,
    load_best_weights,
    load_resume_checkpoint,
    read_metrics,
    remove_stale_temps,
    resume_checkpoint,
    save_checkpoint,
    save_weights,
    start_history,
    write_json,
)
from .step import (
    EMA,
    applied,
    autocast_context,
    cosine_factor,
    kl_beta,
    make_ema,
    make_optimizer,
    to_channels_last,
    training_step,
    warmup_factor,
)
from .stops import SIGNAL_STOPS, StopSignals
from .vae import VAE, build_from_config, model_info


@dataclass
class EarlyStopping:
    """Keras' EarlyStopping: stop after `patience` epochs without a gain larger than `min_delta`."""

    patience: int = 0
    min_delta: float = 0.0
    best: float = math.inf
    wait: int = 0

    def step(self, value: float) -> bool:
        """Record an epoch's validation loss; return True when it is an improvement."""
        if value < self.best - self.min_delta:
            self.best, self.wait = value, 0
            return True
        self.wait += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.wait >= self.patience


def make_plateau(opt: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.ReduceLROnPlateau:
    # Keras reduces after `patience` bad epochs, PyTorch after patience + 1: shift by one so the
    # study presets' "patience 25" means what it meant in the study. Keras' min_delta 1e-4 is absolute.
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=cfg.plateau_factor, patience=max(cfg.plateau_patience - 1, 0),
        threshold=1e-4, threshold_mode="abs", min_lr=cfg.min_lr, eps=0.0)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # Reseeding every epoch from (seed, epoch, rank) makes the noise of epoch k independent of what
    # ran before it, so a resumed run replays exactly and each DDP rank draws its own noise.
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _want_bar() -> bool:
    # The study switched its notebook progress callback off by hand for batch runs; we detect it.
    if os.environ.get("CI"):
        return False
    return "ipykernel" in sys.modules or sys.stdout.isatty()


def _fmt(record: dict) -> str:
    keys = ("train_loss", "val_loss", "val_bpd", "rate", "distortion", "lr", "images_per_s")
    parts = [f"epoch {record['epoch']:4d}"]
    for k in keys:
        if record.get(k) is not None:
            v = record[k]
            parts.append(f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4f}" if abs(v) < 100 else
                         f"{k} {v:.1f}")
    return "  ".join(parts) + (f"  skipped {record['skipped']}" if record["skipped"] else "")




@dataclass
class TrainState:
    """Everything a run needs to continue exactly: the live objects and the counters.
    `checkpoint()` and `restore()` are the two directions of one checkpoint dict. `progress` is
    where an epoch stood when the checkpoint was taken inside it (None at an epoch's end):
    `train_epoch` continues that epoch from there."""

    vae: VAE
    opt: torch.optim.Optimizer
    plateau: torch.optim.lr_scheduler.ReduceLROnPlateau
    early: EarlyStopping
    ema: EMA | None = None  # --ema: the weights that are evaluated and saved
    epoch: int = 0  # epochs completed
    step: int = 0
    best_epoch: int = 0
    skipped_total: int = 0
    train_seconds: float = 0.0
    images_seen: int = 0
    consecutive_skips: int = 0  # across epoch boundaries: a NaN storm does not reset at one
    progress: dict | None = None
    COUNTERS = ("epoch", "step", "best_epoch", "skipped_total", "train_seconds", "images_seen",
                "consecutive_skips")

    @property
    def eval_vae(self) -> VAE:
        """The module validation, test, samples and saved weights use."""
        return self.ema.module if self.ema is not None else self.vae

    def checkpoint(self, cfg: RunConfig, image_shape, argv, *, progress: dict | None = None,
                   finite: bool = True) -> dict:
        """The checkpoint dict; `progress` for one taken inside an epoch, `finite` False for a
        state that diverged (it never replaces a finite last.pt)."""
        ema = {} if self.ema is None else {"ema": self.ema.module.state_dict(),
                                           "ema_updates": int(self.ema.n_averaged)}
        opt = self.opt.state_dict()  # (fresh param_group dicts: patching them changes nothing)
        if progress is not None:  # the epoch's lr, not the schedule's value at this update
            for g in opt["param_groups"]:
                g["lr"] = progress["peak_lr"]
        return {"model": self.vae.state_dict(), **ema, "optimizer": opt,
                "plateau": self.plateau.state_dict(), "early": asdict(self.early),
                **{k: getattr(self, k) for k in self.COUNTERS},
                "progress": progress, "finite": finite,
                "config": to_dict(cfg), "image_shape": list(image_shape), "argv": list(argv or [])}

    def restore(self, ckpt: dict, cfg: RunConfig, log) -> None:
        self.vae.load_state_dict(ckpt["model"])
        if self.ema is not None:  # a run resumed with --ema that had none starts it afresh
            self.ema.module.load_state_dict(ckpt.get("ema", ckpt["model"]))
            self.ema.n_averaged.fill_(ckpt.get("ema_updates", 0))
        # Adam's implementation (fused or not) is this run's choice, not the checkpoint's:
        # --guard device skips through fused Adam's found_inf, which the others ignore.
        saved = ckpt["optimizer"]
        self.opt.load_state_dict({**saved, "param_groups": [
            {**old, "fused": new["fused"], "foreach": new["foreach"]}
            for old, new in zip(saved["param_groups"], self.opt.param_groups)]})
        # The optimizer's state carries the old hyper-parameters: a changed --lr / --betas /
        # --weight-decay on resume is applied on purpose, not silently dropped.
        was, tc = ckpt["config"]["train"], cfg.train
        for key, value in (("lr", tc.lr), ("betas", tuple(tc.betas)),
                           ("weight_decay", tc.weight_decay)):
            if (tuple(was[key]) if key == "betas" else was[key]) != value:
                for g in self.opt.param_groups:
                    g[key] = value
                log(f"resvae: resume: {key} {was[key]} -> {value}")
        self.plateau.load_state_dict(ckpt["plateau"])
        self.early = EarlyStopping(**ckpt["early"])
        for k in self.COUNTERS:  # keys absent from checkpoints older than them keep defaults
            setattr(self, k, ckpt.get(k, getattr(self, k)))
        self.progress = ckpt.get("progress")


STEP_KEYS = ("loss", "rate", "distortion", "grad_norm")  # what training_step sums on the device
# Under torchrun the ranks agree on stops (signal, budget) and time-based checkpoints every this
# many updates: one small collective, instead of one more host sync per update.
POLL_EVERY = 10
# Under --guard device the skips are read back (and --max-skips checked) at least this often.
SETTLE_EVERY = 50


@dataclass
class Window:
    """The per-update numbers (STEP_KEYS) of applied updates since the last log step, summed on
    the device in float64: reading them back is one sync every `log_every` updates."""

    sums: torch.Tensor
    n_ok: int = 0
    skipped: int = 0


@dataclass
class Session:
    """What one invocation works with (runtime, not config: never saved)."""

    cfg: RunConfig
    rt: D.Runtime
    run: RunDir
    data: Splits
    model: torch.nn.Module  # the VAE, DDP-wrapped when distributed
    autocast: object
    bar: bool
    argv: list | None
    t_start: float = field(default_factory=time.monotonic)
    budget: float | None = None
    every: tuple | None = None  # checkpoint_every: ("steps", n) or ("seconds", s)
    last_save: float = field(default_factory=time.monotonic)
    stops: StopSignals | None = None
    best_weights: dict | None = None
    partial_best: float | None = None  # a budget cut's val loss, when it beat every ended epoch
    saved_finite: bool | None = None  # what last.pt holds: None = no last.pt yet (rank 0)
    saved_at: tuple | None = None  # (epoch, step) of last.pt (rank 0)
    invocation: int = 0  # this invocation's number in history.jsonl (rank 0)
    cut_at_batch: int = 0  # batches done in an epoch cut short (0: stopped at an epoch's end)
    train_seconds_at_start: float = 0.0
    callbacks: list = field(default_factory=list)  # rank 0's; empty on the others
    window: Window | None = None  # the updates since the last log step

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.data.train.images.shape[1:])

    def log(self, text: str, err: bool = False) -> None:
        if self.rt.is_main:
            print(text, file=sys.stderr if err else sys.stdout, flush=True)


def train(cfg: RunConfig, out_dir: str | Path, *, data: Splits | None = None, resume: bool = False,
          resume_from: str = "last", argv: list | None = None, progress: bool | None = None,
          callbacks=(), replace: bool = False) -> dict:
    """Train a VAE as `cfg` says, writing everything into `out_dir`; return the summary.

    `data` takes already-loaded splits (else they are loaded as `cfg.data` says). With
    `resume=True`, continue from out_dir/checkpoints/last.pt exactly where it stopped (inside
    an epoch too); `resume_from` "best" or a checkpoint's path starts from that one instead.
    SIGTERM / SIGINT stop the run after the current update with a checkpoint and a summary whose
    stop_reason names the signal (`stops.exit_status` gives the exit status).
    `callbacks`: objects with any of on_step / on_epoch / on_end, called on rank 0 (see
    callbacks.py); `--tensorboard` adds one. `replace=True` (`--overwrite`) clears the run
    already in out_dir, once the data has loaded and the model is built, right before the first
    write: a run that fails before then leaves the old one whole.
    """
    t_start = time.monotonic()
    rt = D.setup(cfg.train.device, timeout=cfg.train.ddp_timeout.seconds)
    s = None
    try:
        s, state = _setup(cfg, RunDir(out_dir), rt, data, resume, resume_from, argv, progress,
                          callbacks, replace)
        s.t_start = t_start
        with StopSignals(announce=rt.is_main) as s.stops:
            stop_reason = None
            while stop_reason is None:
                if state.epoch >= cfg.train.max_epochs or state.early.should_stop:
                    # (a resumed run may be done already)
                    stop_reason = "max_epochs" if state.epoch >= cfg.train.max_epochs \
                        else "early_stopping"
                    break
                # a signal during the last epoch's evaluation: its checkpoint is written, stop
                if signum := D.agree_max([s.stops.received], rt)[0]:
                    stop_reason = signal.Signals(signum).name
                    break
                epoch = train_epoch(s, state)
                stop_reason = end_epoch(s, state, epoch)
            return finish(s, state, stop_reason)
    except Exception as e:
        # (a failure to record it, say on a full disk, must not hide the error itself)
        with contextlib.suppress(OSError, ValueError):
            if s is not None and rt.is_main and s.invocation:
                end_history(s.run.root, s.invocation, {
                    "stopped": _now(), "stop_reason": f"error: {type(e).__name__}: {e}"[:300],
                    "wall_seconds": time.monotonic() - t_start})
        if rt.ddp:
            print(f"resvae: rank {rt.rank}: the run failed under torchrun ({type(e).__name__}: "
                  f"{str(e).splitlines()[0][:200] if str(e) else ''}). If another process died "
                  f"or hung, the run resumes from its last checkpoint: torchrun ... -m resvae "
                  f"train --resume {out_dir}", file=sys.stderr, flush=True)
        raise
    finally:
        D.teardown(rt)


def load_splits(cfg: RunConfig, *, download: bool = False) -> Splits:
    """The train/val/test splits `cfg.data` describes: what a run trains, validates and tests on
    (also for evaluating and sampling a saved run, which never download)."""
    dc = cfg.data
    return load_dataset(dc.dataset, dc.data_dir or None, image_size=dc.image_size,
                        subset=dc.subset, val_fraction=dc.val_fraction, download=download,
                        pad_to_32=dc.pad_to_32, seed=cfg.train.seed)


def _load(cfg: RunConfig, rt: D.Runtime) -> Splits:
    # rank 0 decodes and fills the cache first, the others then read it
    data = load_splits(cfg, download=cfg.data.download) if rt.is_main else None
    D.barrier(rt)
    return data or load_splits(cfg, download=cfg.data.download)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _setup(cfg: RunConfig, run: RunDir, rt: D.Runtime, data: Splits | None, resume: bool,
           resume_from: str, argv, progress, callbacks,
           replace: bool = False) -> tuple[Session, TrainState]:
    """Data, model, optimizer and schedules; the checkpoint's state when resuming."""
    tc = cfg.train
    if tc.tensorboard:
        summary_writer()  # on every rank, before any work: a missing package is an error now
    data = data if data is not None else _load(cfg, rt)
    torch.manual_seed(tc.seed)  # same init on every rank (DDP also broadcasts rank 0's)
    vae = build_from_config(cfg, tuple(data.train.images.shape[1:])).to(rt.device)
    if tc.channels_last:
        to_channels_last(vae)
    model = D.wrap(vae, rt, tc.sync_bn)
    vae = D.unwrap(model)  # the module inside DDP (SyncBN conversion may have replaced BNs)
    ema = make_ema(vae, tc)  # before vae.compile() below
    if tc.compile:
        # In place: the forward (training and evaluation, through DDP too) is compiled, while
        # `vae` stays the plain module whose state_dict keys carry no `_orig_mod.` prefix.
        vae.compile()
    opt = make_optimizer(vae, tc)
    state = TrainState(vae, opt, make_plateau(opt, tc), EarlyStopping(tc.patience, tc.min_delta),
                       ema)
    autocast = autocast_context(tc.precision, rt.device)
    s = Session(cfg, rt, run, data, model, autocast,
                bar=rt.is_main and (_want_bar() if progress is None else progress), argv=argv,
                budget=tc.budget.seconds, every=tc.checkpoint_every.interval,
                window=Window(torch.zeros(len(STEP_KEYS), dtype=torch.float64, device=rt.device)))
    _check_batches(s)  # before anything is written
    resumed = None
    if resume:
        path = resume_checkpoint(run.root, resume_from)
        ckpt = load_resume_checkpoint(path, s.image_shape, map_location=rt.device)
        _check_resumable(ckpt, path, cfg, rt)
        state.restore(ckpt, cfg, s.log)
        s.saved_finite, s.saved_at = ckpt.get("finite", True), (state.epoch, state.step)
        s.best_weights = load_best_weights(run, ckpt, s.log)
        if state.progress is not None and state.progress["batches"] != _batches_per_epoch(s):
            raise ConfigError(f"--resume {path}: written inside an epoch of "
                              f"{state.progress['batches']} batches; this run's epochs have "
                              f"{_batches_per_epoch(s)} (a changed --batch-size or data): resume "
                              "it with the settings it was written with")
        resumed = {"checkpoint": str(path), "epoch": state.epoch, "step": state.step,
                   "inside_epoch": state.progress is not None}
    s.train_seconds_at_start = state.train_seconds
    git_commit()  # now, not when the run ends (see there)
    if rt.is_main:
        if replace:
            clear_run(run.root)
        run.root.mkdir(parents=True, exist_ok=True)
        for folder in (run.root, run.checkpoint("last").parent):
            remove_stale_temps(folder)
        save_json(cfg, run.config)
        if argv is not None and not run.argv.exists():  # the command that started the run
            write_json(run.argv, argv)
        s.invocation = start_history(run.root, {
            "argv": argv, "started": _now(), "resumed_from": resumed, "pid": os.getpid(),
            "host": platform.node(), "world_size": rt.world_size})
        keep_metrics(run.root, state.epoch)
        s.callbacks = list(callbacks)
        if tc.tensorboard:
            # events after the checkpoint's step (a crashed run's) are dropped; its own stay
            s.callbacks.append(TensorBoard(run, cfg, purge_step=state.step + 1 if resume
                                           else None))
    where = ""
    if resume:
        where = f"; resuming after epoch {state.epoch}" if state.progress is None else (
            f"; resuming inside epoch {state.epoch + 1} after batch {state.progress['batch']} "
            f"(step {state.step})")
    s.log(f"resvae: {data.name} from {data.source}: train {len(data.train)}, val "
          f"{len(data.val)}, image {s.image_shape}; {rt.world_size} process(es) on {rt.device}; "
          f"run dir {run.root}" + where)
    return s, state


def _check_batches(s: Session) -> None:
    tc, rt, n = s.cfg.train, s.rt, len(s.data.train)
    if _batches_per_epoch(s) == 0:
        raise ValueError(f"--batch-size {tc.batch_size} x {rt.world_size} process(es) is larger "
                         f"than the {n} training image(s) (see --subset)")
    if tc.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                 for m in s.model.modules()):
        # training-mode BatchNorm needs two values per channel, and the latent layer is 1x1
        raise ValueError(f"--batch-size {tc.batch_size}: BatchNorm needs at least 2 images per "
                         f"batch (per process); use --batch-size 2 or more ({n} training "
                         "image(s) here)")


def _check_resumable(ckpt: dict, path: Path, cfg: RunConfig, rt: D.Runtime) -> None:
    """A checkpoint of another model, or one taken inside an epoch by another number of
    processes (its data shards and noise are per rank), cannot continue this run."""
    if ckpt.get("config", {}).get("model") != to_dict(cfg)["model"]:
        raise ConfigError(f"--resume-from {path}: a checkpoint of another model than this run's "
                          "config.json")
    p = ckpt.get("progress")
    if p is not None and p["world_size"] != rt.world_size:
        raise ConfigError(f"--resume {path}: written inside epoch {ckpt['epoch'] + 1} by "
                          f"{p['world_size']} process(es); resume it with as many (torchrun "
                          f"--nproc_per_node {p['world_size']}), this is {rt.world_size}")


def _batches_per_epoch(s: Session) -> int:
    # drop_last: a 1-image tail batch would break BatchNorm (and is a noisy step anyway); the
    # images left out differ every epoch because the order is reshuffled.
    return num_batches(len(s.data.train), s.cfg.train.batch_size, world_size=s.rt.world_size,
                       drop_last=True)


@dataclass
class Epoch:
    """One pass of updates so far: what `end_epoch` reports, and what a checkpoint taken inside
    the epoch carries to continue it exactly."""

    sums: torch.Tensor  # loss, rate, distortion summed over the applied updates (float64, device)
    peak_lr: float  # what the plateau schedule set; warm-up and --lr-schedule scale it
    batches: int  # in the whole epoch
    last_lr: float = 0.0  # the lr of the epoch's last update
    batch: int = 0  # batches done
    n_ok: int = 0
    skipped: int = 0
    seconds: float = 0.0
    images: int = 0
    stop_reason: str | None = None
    progress: dict | None = None  # the checkpoint of the cut, for a cut epoch

    @property
    def complete(self) -> bool:
        return self.batch == self.batches


def _rng_state(device: torch.device) -> dict:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def _begin_epoch(s: Session, state: TrainState) -> Epoch:
    """A fresh epoch, or the rest of the one a checkpoint was taken inside (its place in the
    data order, its noise, its sums so far)."""
    tc, rt = s.cfg.train, s.rt
    lr = state.opt.param_groups[0]["lr"]
    ep = Epoch(torch.zeros(3, dtype=torch.float64, device=rt.device), lr, _batches_per_epoch(s),
               last_lr=lr)
    p, state.progress = state.progress, None
    if p is None:
        torch.manual_seed(epoch_seed(tc.seed, state.epoch, rt.rank))
        return ep
    _set_rng_state(p["rng"][rt.rank], rt.device)
    # sums were saved summed over ranks: each rank takes its share, so the all-reduced means
    # at the epoch's end come out the same
    ep.sums = p["sums"].to(rt.device) / rt.world_size
    ep.batch, ep.n_ok, ep.skipped = p["batch"], p["n_ok"], p["skipped"]
    ep.seconds, ep.images, ep.last_lr = p["seconds"], p["images"], p["last_lr"]
    w = p["window"]
    s.window = Window(w["sums"].to(rt.device) / rt.world_size, w["n_ok"], w["skipped"])
    return ep


def poll(s: Session, state: TrainState) -> tuple[str | None, bool]:
    """After an update: whether to stop now (a signal, the budget) and whether a checkpoint is
    due (checkpoint_every). Under torchrun the ranks agree every POLL_EVERY updates: a signal
    reaches them at different moments and their clocks differ."""
    kind, every = s.every or (None, 0)
    due = kind == "steps" and state.step % every == 0  # the same on every rank
    if s.rt.ddp and state.step % POLL_EVERY:
        return None, due
    now = time.monotonic()
    signum, budget, due_time = D.agree_max([
        s.stops.received if s.stops else 0,
        int(s.budget is not None and now - s.t_start > s.budget),
        int(kind == "seconds" and now - s.last_save >= every)], s.rt)
    stop = signal.Signals(signum).name if signum else "budget" if budget else None
    return stop, due or bool(due_time)


def train_epoch(s: Session, state: TrainState) -> Epoch:
    """One pass over the training set (or the rest of one): warm-up lr, update, count skips,
    checkpoint inside the epoch when due; stops early on a signal, the budget or too many
    non-finite updates in a row. A checkpoint is written at a cut (not after a non-finite one),
    so the pass continues there on resume."""
    tc, rt, opt = s.cfg.train, s.rt, state.opt
    ep = _begin_epoch(s, state)
    s.model.train()
    t0 = time.monotonic()
    pending: list = []  # each update's `skipped` since the last settle()
    bar = None
    if s.bar:
        from tqdm.auto import tqdm
        bar = tqdm(total=ep.batches, initial=ep.batch, desc=f"epoch {state.epoch + 1}",
                   leave=False)
    for batch in iterate_batches(s.data.train.images, tc.batch_size, shuffle=True, seed=tc.seed,
                                 epoch=state.epoch, rank=rt.rank, world_size=rt.world_size,
                                 drop_last=True, start=ep.batch):
        lr = ep.peak_lr * warmup_factor(state.step, tc.warmup_steps)
        lr *= schedule_factor(s, state)
        for g in opt.param_groups:
            g["lr"] = lr
        ep.last_lr = lr
        beta = kl_beta(state.step, tc.kl_anneal_steps)
        x = to_input(batch, rt.device, tc.channels_last)
        out = training_step(s.model, state.vae, x, opt, tc, beta=beta, autocast=s.autocast,
                            rt=rt)
        state.step += 1
        ep.batch += 1
        ep.images += x.shape[0] * rt.world_size
        skipped = out["skipped"]  # a bool, or a 0-d bool tensor on the device (--guard device)
        pending.append(skipped)
        ok = applied(skipped)
        if ok is not False:
            if state.ema is not None:
                state.ema.update_parameters(state.vae, ok)
            # summed on the device, no sync: float32 batch means added in float64
            values = torch.stack([out[k].double() for k in STEP_KEYS])
            if ok is not True:
                values = torch.where(ok, values, 0.0)  # a skipped update adds nothing
            ep.sums += values[:3]
            s.window.sums += values
        log_due = tc.log_every > 0 and state.step % tc.log_every == 0
        if (isinstance(skipped, bool) or log_due or ep.complete
                or len(pending) >= SETTLE_EVERY) and settle(s, state, ep, pending):
            ep.stop_reason = "non_finite"  # no checkpoint of a diverged state
            break
        if log_due:
            stats = log_step(s, state, lr=lr, beta=beta)
            if bar is not None and stats["loss"] is not None:
                bar.set_postfix(loss=f"{stats['loss']:.1f}", rate=f"{stats['rate']:.1f}",
                                dist=f"{stats['distortion']:.1f}",
                                img_s=f"{ep.images / max(time.monotonic() - t0, 1e-9):.0f}",
                                refresh=False)
        if bar is not None:
            bar.update()
        stop, due = poll(s, state)
        if (stop or due) and settle(s, state, ep, pending):  # counted before a checkpoint
            ep.stop_reason = "non_finite"
            break
        if (stop or due) and not ep.complete:  # at the epoch's end, end_epoch checkpoints
            ep.seconds += time.monotonic() - t0
            ep.progress = save_inside_epoch(s, state, ep)
            t0 = time.monotonic()  # the time spent saving is not training time
        if stop:
            ep.stop_reason = stop
            break
    if bar is not None:
        bar.close()
    if settle(s, state, ep, pending) and ep.stop_reason is None:  # (only if the data ran short)
        ep.stop_reason = "non_finite"
    for g in opt.param_groups:
        g["lr"] = ep.peak_lr
    ep.seconds += time.monotonic() - t0
    if ep.complete:
        state.epoch += 1
    s.cut_at_batch = 0 if ep.complete else ep.batch
    # the counters now include a cut epoch's part (its checkpoint holds them in `progress`)
    state.train_seconds += ep.seconds
    state.skipped_total += ep.skipped
    state.images_seen += ep.images
    return ep


def settle(s: Session, state: TrainState, ep: Epoch, pending: list) -> bool:
    """Count the skipped updates in `pending` (and empty it): one host read for all of them
    under --guard device, where this runs every SETTLE_EVERY updates and before a log step or a
    checkpoint. True when more than --max-skips came in a row: the run stops then, so under
    --guard device up to SETTLE_EVERY updates later than under "host" (skipped updates change
    nothing, so no diverged state is ever saved)."""
    if not pending:
        return False
    flags = (torch.stack(pending).tolist() if isinstance(pending[0], torch.Tensor)
             else list(pending))
    pending.clear()
    diverged = False
    for skipped in flags:
        if skipped:
            ep.skipped, s.window.skipped = ep.skipped + 1, s.window.skipped + 1
            state.consecutive_skips += 1
            diverged |= state.consecutive_skips > s.cfg.train.max_skips
        else:
            ep.n_ok, s.window.n_ok = ep.n_ok + 1, s.window.n_ok + 1
            state.consecutive_skips = 0
    return diverged


def schedule_factor(s: Session, state: TrainState) -> float:
    """--lr-schedule's multiplier now: cosine over the budget's wall time when there is one (the
    schedule then ends annealed however fast the machine is), else over --max-epochs' updates."""
    if s.cfg.train.lr_schedule == "constant":
        return 1.0
    if s.budget is not None:
        return cosine_factor((time.monotonic() - s.t_start) / s.budget)
    return cosine_factor(state.step / (s.cfg.train.max_epochs * _batches_per_epoch(s)))


def save_inside_epoch(s: Session, state: TrainState, ep: Epoch) -> dict:
    """Write last.pt at this update, inside the epoch (rank 0 writes; every rank takes part,
    as the epoch's sums and each rank's RNG state are gathered); returns its `progress`."""
    rt = s.rt
    w = s.window
    progress = {
        "batch": ep.batch, "batches": ep.batches, "n_ok": ep.n_ok, "skipped": ep.skipped,
        "images": ep.images, "seconds": ep.seconds, "peak_lr": ep.peak_lr,
        "last_lr": ep.last_lr,
        "sums": D.all_reduce_sum(ep.sums.clone(), rt).cpu(),
        "window": {"sums": D.all_reduce_sum(w.sums.clone(), rt).cpu(), "n_ok": w.n_ok,
                   "skipped": w.skipped},
        "rng": D.gather_to_main(_rng_state(rt.device), rt), "world_size": rt.world_size}
    if rt.is_main:
        # finite: the last update was applied and no weight is NaN/inf (no validation loss to
        # look at inside an epoch)
        finite = state.consecutive_skips == 0 and _weights_finite(state)
        _save_last(s, state, state.checkpoint(s.cfg, s.image_shape, s.argv, progress=progress,
                                               finite=finite), finite)
    s.last_save = time.monotonic()
    return progress


def _weights_finite(state: TrainState) -> bool:
    """No NaN/inf in the trained weights nor in the evaluated ones (--ema's average)."""
    tensors = [t for m in {id(state.vae): state.vae, id(state.eval_vae): state.eval_vae}.values()
               for t in m.state_dict().values() if t.is_floating_point()]
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _save_last(s: Session, state: TrainState, ckpt: dict, finite: bool) -> bool:
    """Write last.pt (rank 0), unless it would replace a finite state by one that is not."""
    where = f"epoch {state.epoch}" if ckpt["progress"] is None else \
        f"step {state.step} (inside epoch {state.epoch + 1})"
    if not finite and s.saved_finite:
        s.log(f"resvae: {where} is not finite (skipped updates, or NaN/inf weights or "
              f"validation loss): checkpoints/last.pt keeps epoch {s.saved_at[0]}, step "
              f"{s.saved_at[1]}", err=True)
        return False
    save_checkpoint(ckpt, s.run.checkpoint("last"))
    s.saved_finite, s.saved_at = finite, (state.epoch, state.step)
    return True


def log_step(s: Session, state: TrainState, *, lr: float, beta: float) -> dict:
    """Read the window's sums back (the one sync in `log_every` updates; summed over ranks) and
    hand their means to the callbacks; returns them."""
    w, rt = s.window, s.rt
    sums = D.all_reduce_sum(w.sums.clone(), rt).tolist()
    n = w.n_ok * rt.world_size  # ranks skip together: the same n_ok everywhere
    stats = {**{k: v / n if n else None for k, v in zip(STEP_KEYS, sums)},
             "lr": lr, "beta": beta, "skipped": w.skipped, "epoch": state.epoch + 1}
    w.sums.zero_()
    w.n_ok = w.skipped = 0
    if rt.is_main:
        notify(s.callbacks, "on_step", state.step, stats)
    return stats


def end_epoch(s: Session, state: TrainState, ep: Epoch) -> str | None:
    """Validate, step the schedules, keep the best weights, write the epoch's record, checkpoint
    and grids; return why the run stops now (None to go on).

    An epoch cut by a signal stops at once (its checkpoint is written). One cut by the budget
    or by non-finite updates is validated and recorded as `partial`, but it steps no schedule
    and is no best epoch, so a resumed run continues exactly as if it had never stopped. A
    budget cut whose validation beats every ended epoch's still gives the weights this
    invocation tests and saves (best.pt, best.safetensors): with --lr-schedule cosine over the
    budget the cut state is the annealed one, the best the run made."""
    tc, rt, vae = s.cfg.train, s.rt, state.eval_vae
    if ep.stop_reason in SIGNAL_STOPS and not ep.complete:
        return ep.stop_reason
    # Ranks skip together, so n_ok is the same everywhere; an all-skipped epoch has no mean.
    means = D.all_reduce_sum(ep.sums / max(ep.n_ok, 1), rt)  # the epoch's one read-back
    means = (means / rt.world_size).tolist() if ep.n_ok else [None] * 3
    if tc.bn_recalibrate > 0:
        recalibrate_batchnorm(vae, s.data.train.images, tc.bn_recalibrate, tc.batch_size,
                              rt.device, tc.channels_last, s.autocast,
                              seed=epoch_seed(tc.seed, state.epoch, 0))
    D.broadcast_buffers(vae, rt)  # per-rank BN statistics -> rank 0's (what it saves)
    val = evaluate(vae, s.data.val.images, tc.eval_batch_size, rt, tc.channels_last, s.autocast)
    improved = partial_best = False
    if ep.complete:
        improved = state.early.step(val["loss"])
        if tc.plateau_patience > 0:
            state.plateau.step(val["loss"])
        if improved:
            state.best_epoch = state.epoch
    else:
        partial_best = (ep.stop_reason == "budget" and math.isfinite(val["loss"])
                        and val["loss"] < state.early.best)
        if partial_best:
            s.partial_best = val["loss"]
    if improved or partial_best:
        s.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in vae.state_dict().items()}
    stop_reason = ep.stop_reason
    if ep.complete and state.early.should_stop and stop_reason is None:
        stop_reason = "early_stopping"
    record = {"epoch": state.epoch if ep.complete else state.epoch + 1, "step": state.step,
              "train_loss": means[0], "rate": means[1],
              "distortion": means[2], "val_loss": val["loss"], "val_rate": val["rate"],
              "val_distortion": val["distortion"], "val_bpd": val.get("bpd"),
              "lr": ep.last_lr, "skipped": ep.skipped, "epoch_seconds": ep.seconds,
              "images_per_s": ep.images / max(ep.seconds, 1e-9),
              "images_seen": state.images_seen, "train_seconds": state.train_seconds,
              "partial": not ep.complete}
    if rt.is_main:
        append_metrics(s.run.root, record)
        s.log(_fmt(record))
        if ep.complete:
            finite = ep.n_ok > 0 and math.isfinite(val["loss"]) and _weights_finite(state)
            ckpt = state.checkpoint(s.cfg, s.image_shape, s.argv, finite=finite)
            _save_last(s, state, ckpt, finite)
            if improved:
                save_checkpoint(ckpt, s.run.checkpoint("best"))
            if tc.sample_every > 0 and state.epoch % tc.sample_every == 0:
                save_epoch_grids(vae, s.data.val.images, s.run, state.epoch)
        elif partial_best:  # the cut state, with the statistics it was validated with
            save_checkpoint(state.checkpoint(s.cfg, s.image_shape, s.argv, progress=ep.progress),
                            s.run.checkpoint("best"))
        notify(s.callbacks, "on_epoch", record)
        if stop_reason == "non_finite":
            s.log(_diverged_message(s, tc), err=True)
    return stop_reason


def _diverged_message(s: Session, tc) -> str:
    msg = (f"resvae: stopping: more than {tc.max_skips} updates in a row had a non-finite loss "
           "or gradient (lower --lr, set --grad-clip, or check the data)")
    if s.saved_finite:
        msg += (f"; checkpoints/last.pt holds the last finite state (epoch {s.saved_at[0]}, "
                f"step {s.saved_at[1]}): resvae train --resume {s.run.root} --lr {tc.lr / 10:g} "
                "continues from it (--resume-from best: from the best epoch)")
    return msg


def finish(s: Session, state: TrainState, stop_reason: str | None) -> dict:
    """Final grids, the test ELBO of the best weights, the weights as safetensors, summary.json,
    the invocation's entry in history.jsonl. A run stopped by a signal skips the grids and the
    test (it is to stop now, and will be resumed)."""
    rt, tc, vae, run = s.rt, s.cfg.train, state.eval_vae, s.run
    signalled = stop_reason in SIGNAL_STOPS
    wall = time.monotonic() - s.t_start
    summary = {"stop_reason": stop_reason, "epochs": state.epoch, "steps": state.step,
               "inside_epoch_batches": s.cut_at_batch,
               "images_seen": state.images_seen, "training_seconds": state.train_seconds,
               "invocation_training_seconds": state.train_seconds - s.train_seconds_at_start,
               "wall_seconds": wall,
               # the cut epoch's record number when a budget cut gave the tested weights
               "best_epoch": state.epoch + 1 if s.partial_best is not None else state.best_epoch,
               "best_val_loss": s.partial_best if s.partial_best is not None
               else state.early.best if state.best_epoch else None,
               "skipped_updates": state.skipped_total, "world_size": rt.world_size}
    if rt.is_main:
        last = [r for r in read_metrics(run.root) if not r.get("partial")]
        summary["final_train_loss"] = last[-1].get("train_loss") if last else None
        if not signalled:
            save_epoch_grids(vae, s.data.val.images, run, state.epoch)
    if not signalled:
        if s.best_weights is not None:
            vae.load_state_dict(s.best_weights)
        test = evaluate(vae, s.data.test.images, tc.eval_batch_size, rt, tc.channels_last,
                        s.autocast)
    if rt.is_main:
        if not signalled:
            summary.update(test_loss=test["loss"], test_bpd=test.get("bpd"),
                           test_note="negative ELBO of the best-val weights on the test split"
                           + ("" if vae.likelihood.discrete else
                              "; bits/dim undefined for bernoulli"))
            if s.best_weights is not None:  # weights alone, safe to share and load anywhere
                save_weights(vae, s.cfg, run.safetensors)
        else:
            summary.update(test_loss=None, test_bpd=None, resume=f"resvae train --resume "
                           f"{run.root} (checkpoints/last.pt: epoch {s.saved_at[0]}, step "
                           f"{s.saved_at[1]})" if s.saved_at else None)
        history = end_history(run.root, s.invocation, {
            "stopped": _now(), "stop_reason": stop_reason, "wall_seconds": wall,
            "training_seconds": summary["invocation_training_seconds"],
            "epochs": state.epoch, "steps": state.step})
        summary["invocations"] = len(history)
        summary["total_wall_seconds"] = sum(h.get("wall_seconds") or 0.0 for h in history)
        summary.update(what_ran(vae, rt, s.argv))
        write_json(run.summary, summary)
        if signalled:
            s.log(f"resvae: stopped ({stop_reason}) at epoch {state.epoch}, step {state.step}; "
                  f"resume with: resvae train --resume {run.root}")
        else:
            best = summary["best_val_loss"]
            best_at = (f"at epoch {state.best_epoch}" if s.partial_best is None
                       else f"(the cut epoch {summary['best_epoch']}'s)")
            s.log(f"resvae: stopped ({stop_reason}) after {state.epoch} epochs, "
                  f"{state.train_seconds:.0f}s training; best val loss "
                  f"{math.inf if best is None else best:.2f} {best_at}; test loss "
                  f"{test['loss']:.2f}" + (f", test bpd {test['bpd']:.4f}" if "bpd" in test else ""))
        notify(s.callbacks, "on_end", summary)
    return summary


def what_ran(vae: VAE, rt: D.Runtime, argv) -> dict:
    """The model's size and cost, and the software and machine that trained it."""
    info = model_info(vae)
    return {"layers": info["layers"], "params": info["params"],
            "flops_per_image": info["flops"], "resvae_version": __version__,
            "torch_version": torch.__version__, "python_version": platform.python_version(),
            "device": _device_name(rt.device), "git_commit": git_commit(), "command": argv}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


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


__all__ = ["train", "TrainState", "train_epoch", "log_step", "end_epoch", "finish", "training_step",
           "EarlyStopping", "make_plateau", "make_optimizer", "autocast_context", "warmup_factor",
           "kl_beta"]
