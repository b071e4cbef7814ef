"""Training: one readable loop, `train(cfg, out_dir)`.

The loop reads top to bottom: `_setup` (data, the model `step.prepare_model` readies, or a
checkpoint to resume), then per epoch `train_epoch` (the updates) and `end_epoch` (validate,
schedule, record, checkpoint), then `finish` (test ELBO with the best weights, summary). What a
checkpoint holds is `state.py`'s; one update is `step.py`'s; where files go is `runs.py`'s;
evaluation is `evaluate.py`'s, images are `generate.py`'s.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import distributed as D
from .callbacks import TensorBoard, notify, summary_writer
from .checkpoints import (
    load_best_weights,
    load_resume_checkpoint,
    save_checkpoint,
    save_weights,
)
from .config import RunConfig, save_json
from .data import Splits, iterate_batches, load_splits, num_batches, to_input
from .errors import ConfigError
from .evaluate import evaluate, recalibrate_batchnorm
from .generate import save_epoch_grids
from .runs import (
    RunDir,
    append_metrics,
    clear_run,
    end_history,
    git_commit,
    keep_metrics,
    peak_rss_bytes,
    read_metrics,
    remove_stale_temps,
    resume_checkpoint,
    start_history,
    what_ran,
    write_json,
)
from .state import (
    STEP_KEYS,
    EarlyStopping,
    Epoch,
    TrainState,
    Window,
    check_resumable,
    epoch_seed,
    make_plateau,
)
from .step import (
    Precision,
    applied,
    cosine_factor,
    kl_beta,
    prepare_model,
    schedule_follows_clock,
    training_step,
    warmup_factor,
)
from .stops import SIGNAL_STOPS, StopSignals

# Under torchrun the ranks agree on stops (signal, budget) and time-based checkpoints every this
# many updates: one small collective, instead of one more host sync per update.
POLL_EVERY = 10
# Under --guard device the skips are read back (and --max-skips checked) at least this often.
SETTLE_EVERY = 50


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
class Session:
    """What one invocation works with (runtime, not config: never saved)."""

    cfg: RunConfig
    rt: D.Runtime
    run: RunDir
    data: Splits
    model: torch.nn.Module  # the VAE, DDP-wrapped when distributed
    precision: Precision
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
    if data is not None and not isinstance(data, Splits):
        raise TypeError(f"train(data=...) takes resvae.data.Splits, got {type(data).__name__}: "
                        "build them with resvae.data.from_arrays(train, test) (arrays or "
                        "tensors) or resvae.data.from_dataset(train, test) (torch Datasets)")
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
            summary = finish(s, state, stop_reason)
        D.teardown(rt, sync=True)  # (the `finally` below then finds nothing left to destroy)
        return summary
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


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _setup(cfg: RunConfig, run: RunDir, rt: D.Runtime, data: Splits | None, resume: bool,
           resume_from: str, argv, progress, callbacks,
           replace: bool = False) -> tuple[Session, TrainState]:
    """Data, model, optimizer and schedules; the checkpoint's state when resuming."""
    tc = cfg.train
    if tc.tensorboard:
        summary_writer()  # on every rank, before any work: a missing package is an error now
    data = data if data is not None else load_splits(cfg, download=cfg.data.download, rt=rt)
    m = prepare_model(cfg, data.train.images.shape[1:], rt.device,
                      Precision.of(tc, rt.device), rt=rt)
    state = TrainState(m.vae, m.opt, make_plateau(m.opt, tc),
                       EarlyStopping(tc.patience, tc.min_delta), m.ema)
    s = Session(cfg, rt, run, data, m.model, m.precision,
                bar=rt.is_main and (_want_bar() if progress is None else progress), argv=argv,
                budget=tc.budget.seconds, every=tc.checkpoint_every.interval,
                window=Window(torch.zeros(len(STEP_KEYS), dtype=torch.float64, device=rt.device)))
    _check_batches(s)  # before anything is written
    resumed = _resume(s, state, resume_from) if resume else None
    s.train_seconds_at_start = state.train_seconds
    git_commit()  # now, not when the run ends (see there)
    if rt.is_main:
        _open_run(s, state, resumed, callbacks, replace)
    where = ""
    if resume:
        where = f"; resuming after epoch {state.epoch}" if state.progress is None else (
            f"; resuming inside epoch {state.epoch + 1} after batch {state.progress['batch']} "
            f"(step {state.step})")
    s.log(f"resvae: {data.name} from {data.source}: train {len(data.train)}, val "
          f"{len(data.val)}, image {s.image_shape}; {rt.world_size} process(es) on {rt.device}; "
          f"run dir {run.root}" + where)
    if schedule_follows_clock(cfg.train):
        s.log("resvae: note: the cosine lr follows the clock (--budget sets this run's length), "
              "so this run, resumed or repeated, is not reproducible bit for bit; set "
              "--max-epochs to make it follow the updates")
    return s, state


def _resume(s: Session, state: TrainState, resume_from: str) -> dict:
    """Load the checkpoint `resume_from` names into `state`; returns where it resumed from."""
    run, rt, cfg = s.run, s.rt, s.cfg
    path = resume_checkpoint(run.root, resume_from)
    ckpt = load_resume_checkpoint(path, s.image_shape, map_location=rt.device)
    check_resumable(ckpt, path, cfg, rt.world_size)
    state.restore(ckpt, cfg, s.log)
    s.saved_finite, s.saved_at = ckpt.get("finite", True), (state.epoch, state.step)
    s.best_weights = load_best_weights(run, ckpt, s.log)
    if state.progress is not None and state.progress["batches"] != _batches_per_epoch(s):
        raise ConfigError(f"--resume {path}: written inside an epoch of "
                          f"{state.progress['batches']} batches; this run's epochs have "
                          f"{_batches_per_epoch(s)} (a changed --batch-size or data): resume "
                          "it with the settings it was written with")
    return {"checkpoint": str(path), "epoch": state.epoch, "step": state.step,
            "inside_epoch": state.progress is not None}


def _open_run(s: Session, state: TrainState, resumed: dict | None, callbacks,
              replace: bool) -> None:
    """Rank 0's first writes: the run directory, config.json, argv.json, this invocation's
    entry in history.jsonl; the callbacks."""
    run, cfg, argv = s.run, s.cfg, s.argv
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
        "host": platform.node(), "world_size": s.rt.world_size})
    keep_metrics(run.root, state.epoch)
    s.callbacks = list(callbacks)
    if cfg.train.tensorboard:
        # events after the checkpoint's step (a crashed run's) are dropped; its own stay
        s.callbacks.append(TensorBoard(run, cfg, purge_step=state.step + 1 if resumed is not None
                                       else None))


def _check_batches(s: Session) -> None:
    tc, rt, n = s.cfg.train, s.rt, len(s.data.train)
    if _batches_per_epoch(s) == 0:
        raise ConfigError(f"--batch-size {tc.batch_size} x {rt.world_size} process(es) is larger "
                         f"than the {n} training image(s) (see --subset)")
    if tc.batch_size < 2 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                 for m in s.model.modules()):
        # training-mode BatchNorm needs two values per channel, and the latent layer is 1x1
        raise ConfigError(f"--batch-size {tc.batch_size}: BatchNorm needs at least 2 images per "
                         f"batch (per process); use --batch-size 2 or more ({n} training "
                         "image(s) here)")


def _batches_per_epoch(s: Session) -> int:
    # drop_last: a 1-image tail batch would break BatchNorm (and is a noisy step anyway); the
    # images left out differ every epoch because the order is reshuffled.
    return num_batches(len(s.data.train), s.cfg.train.batch_size, world_size=s.rt.world_size,
                       drop_last=True)


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
    s.window = ep.continue_from(p, rt)
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
    tc, rt = s.cfg.train, s.rt
    ep = _begin_epoch(s, state)
    s.model.train()
    t0 = time.monotonic()
    pending: list = []  # each update's `skipped` since the last settle()
    bar = _progress_bar(s, state, ep)
    for batch in iterate_batches(s.data.train.images, tc.batch_size, shuffle=True, seed=tc.seed,
                                 epoch=state.epoch, rank=rt.rank, world_size=rt.world_size,
                                 drop_last=True, start=ep.batch):
        lr = _set_lr(s, state, ep)
        beta = kl_beta(state.step, tc.kl_anneal_steps)
        x = to_input(batch, rt.device, s.precision.channels_last)
        out = training_step(s.model, state.vae, x, state.opt, tc, beta=beta,
                            precision=s.precision, rt=rt)
        _count_update(s, state, ep, out, x.shape[0] * rt.world_size)
        pending.append(out["skipped"])
        log_due = tc.log_every > 0 and state.step % tc.log_every == 0
        if (isinstance(out["skipped"], bool) or log_due or ep.complete
                or len(pending) >= SETTLE_EVERY) and settle(s, state, ep, pending):
            ep.stop_reason = "non_finite"  # no checkpoint of a diverged state
            break
        if log_due:
            stats = log_step(s, state, lr=lr, beta=beta)
            _show(bar, stats, ep.images / max(time.monotonic() - t0, 1e-9))
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
    _end_pass(s, state, ep, time.monotonic() - t0)
    return ep


def _set_lr(s: Session, state: TrainState, ep: Epoch) -> float:
    """This update's lr: the epoch's (the plateau schedule's) times warm-up and --lr-schedule."""
    lr = ep.peak_lr * warmup_factor(state.step, s.cfg.train.warmup_steps)
    lr *= schedule_factor(s, state)
    for g in state.opt.param_groups:
        g["lr"] = lr
    ep.last_lr = lr
    return lr


def _count_update(s: Session, state: TrainState, ep: Epoch, out: dict, images: int) -> None:
    """Count an update that ran, average it into --ema and add its numbers to the epoch's and
    the window's sums (on the device: no sync)."""
    state.step += 1
    ep.batch += 1
    ep.images += images
    ok = applied(out["skipped"])  # a bool, or a 0-d bool tensor on the device (--guard device)
    if ok is False:
        return
    if state.ema is not None:
        state.ema.update_parameters(state.vae, ok)
    # summed on the device, no sync: float32 batch means added in float64
    values = torch.stack([out[k].double() for k in STEP_KEYS])
    if ok is not True:
        values = torch.where(ok, values, 0.0)  # a skipped update adds nothing
    ep.sums += values[:3]
    s.window.sums += values


def _progress_bar(s: Session, state: TrainState, ep: Epoch):
    if not s.bar:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=ep.batches, initial=ep.batch, desc=f"epoch {state.epoch + 1}", leave=False)


def _show(bar, stats: dict, images_per_s: float) -> None:
    if bar is not None and stats["loss"] is not None:
        bar.set_postfix(loss=f"{stats['loss']:.1f}", rate=f"{stats['rate']:.1f}",
                        dist=f"{stats['distortion']:.1f}", img_s=f"{images_per_s:.0f}",
                        refresh=False)


def _end_pass(s: Session, state: TrainState, ep: Epoch, seconds: float) -> None:
    """The epoch's lr back in place (a checkpoint holds it), and its time and counts added to
    the run's: they include a cut epoch's part (its checkpoint holds them in `progress`)."""
    for g in state.opt.param_groups:
        g["lr"] = ep.peak_lr
    ep.seconds += seconds
    if ep.complete:
        state.epoch += 1
    s.cut_at_batch = 0 if ep.complete else ep.batch
    state.train_seconds += ep.seconds
    state.skipped_total += ep.skipped
    state.images_seen += ep.images


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
    """--lr-schedule's multiplier now: cosine over the budget's wall time when the budget sets
    the run's length (step.schedule_follows_clock), else over --max-epochs' updates."""
    if s.cfg.train.lr_schedule == "constant":
        return 1.0
    if schedule_follows_clock(s.cfg.train):
        return cosine_factor((time.monotonic() - s.t_start) / s.budget)
    return cosine_factor(state.step / (s.cfg.train.max_epochs * _batches_per_epoch(s)))


def save_inside_epoch(s: Session, state: TrainState, ep: Epoch) -> dict:
    """Write last.pt at this update, inside the epoch (rank 0 writes; every rank takes part,
    as the epoch's sums and each rank's RNG state are gathered); returns its `progress`."""
    progress = ep.progress_record(s.window, s.rt)
    if s.rt.is_main:
        # finite: the last update was applied and no weight is NaN/inf (no validation loss to
        # look at inside an epoch)
        finite = state.consecutive_skips == 0 and state.weights_finite()
        _save_last(s, state, state.checkpoint(s.cfg, s.image_shape, s.argv, progress=progress,
                                               finite=finite), finite)
    s.last_save = time.monotonic()
    return progress


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
    means, skipped = s.window.take(s.rt)
    stats = {**means, "lr": lr, "beta": beta, "skipped": skipped, "epoch": state.epoch + 1}
    if s.rt.is_main:
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
    if ep.stop_reason in SIGNAL_STOPS and not ep.complete:
        return ep.stop_reason
    rt = s.rt
    # Ranks skip together, so n_ok is the same everywhere; an all-skipped epoch has no mean.
    means = D.all_reduce_sum(ep.sums / max(ep.n_ok, 1), rt)  # the epoch's one read-back
    means = (means / rt.world_size).tolist() if ep.n_ok else [None] * 3
    val = _validate(s, state)
    improved, partial_best = _judge(s, state, ep, val)
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
        _record_epoch(s, state, ep, record, improved, partial_best)
        if stop_reason == "non_finite":
            s.log(_diverged_message(s, s.cfg.train), err=True)
    return stop_reason


def _validate(s: Session, state: TrainState) -> dict:
    """The validation loss of the evaluated weights, with --bn-recalibrate's statistics."""
    tc, rt, vae = s.cfg.train, s.rt, state.eval_vae
    if tc.bn_recalibrate > 0:
        recalibrate_batchnorm(vae, s.data.train.images, tc.bn_recalibrate, tc.batch_size,
                              rt.device, s.precision, seed=epoch_seed(tc.seed, state.epoch, 0))
    D.broadcast_buffers(vae, rt)  # per-rank BN statistics -> rank 0's (what it saves)
    return evaluate(vae, s.data.val.images, tc.eval_batch_size, rt, s.precision)


def _judge(s: Session, state: TrainState, ep: Epoch, val: dict) -> tuple[bool, bool]:
    """Step early stopping and the plateau schedule (an ended epoch only) and keep the best
    weights: (improved, partial_best), the latter for a budget cut that beat every epoch."""
    improved = partial_best = False
    if ep.complete:
        improved = state.early.step(val["loss"])
        if s.cfg.train.plateau_patience > 0:
            state.plateau.step(val["loss"])
        if improved:
            state.best_epoch = state.epoch
    else:
        partial_best = (ep.stop_reason == "budget" and math.isfinite(val["loss"])
                        and val["loss"] < state.early.best)
        if partial_best:
            s.partial_best = val["loss"]
    if improved or partial_best:
        s.best_weights = {k: v.detach().to("cpu", copy=True)
                          for k, v in state.eval_vae.state_dict().items()}
    return improved, partial_best


def _record_epoch(s: Session, state: TrainState, ep: Epoch, record: dict, improved: bool,
                  partial_best: bool) -> None:
    """Rank 0: the epoch's metrics line, last.pt (and best.pt), the grids, the callbacks."""
    append_metrics(s.run.root, record)
    s.log(_fmt(record))
    if ep.complete:
        finite = ep.n_ok > 0 and math.isfinite(record["val_loss"]) and state.weights_finite()
        ckpt = state.checkpoint(s.cfg, s.image_shape, s.argv, finite=finite)
        _save_last(s, state, ckpt, finite)
        if improved:
            save_checkpoint(ckpt, s.run.checkpoint("best"))
        every = s.cfg.train.sample_every
        if every > 0 and state.epoch % every == 0:
            save_epoch_grids(state.eval_vae, s.data.val.images, s.run, state.epoch)
    elif partial_best:  # the cut state, with the statistics it was validated with
        save_checkpoint(state.checkpoint(s.cfg, s.image_shape, s.argv, progress=ep.progress),
                        s.run.checkpoint("best"))
    notify(s.callbacks, "on_epoch", record)


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
    rt, vae = s.rt, state.eval_vae
    signalled = stop_reason in SIGNAL_STOPS
    summary = _summary(s, state, stop_reason)
    if rt.is_main:
        last = [r for r in read_metrics(s.run.root) if not r.get("partial")]
        summary["final_train_loss"] = last[-1].get("train_loss") if last else None
        if not signalled:
            save_epoch_grids(vae, s.data.val.images, s.run, state.epoch)
    test = None
    if not signalled:
        if s.best_weights is not None:
            vae.load_state_dict(s.best_weights)
        test = evaluate(vae, s.data.test.images, s.cfg.train.eval_batch_size, rt, s.precision)
    if rt.is_main:
        _write_summary(s, state, summary, test)
    return summary


def _summary(s: Session, state: TrainState, stop_reason: str | None) -> dict:
    summary = {
        "stop_reason": stop_reason, "epochs": state.epoch, "steps": state.step,
        "inside_epoch_batches": s.cut_at_batch,
        # the epoch a stop cut short (its batches above), else None: `epochs` counts ended ones
        "partial_epoch": state.epoch + 1 if s.cut_at_batch else None,
        "images_seen": state.images_seen, "training_seconds": state.train_seconds,
        "invocation_training_seconds": state.train_seconds - s.train_seconds_at_start,
        "wall_seconds": time.monotonic() - s.t_start,
        # the cut epoch's record number when a budget cut gave the tested weights
        "best_epoch": state.epoch + 1 if s.partial_best is not None else state.best_epoch,
        "best_val_loss": s.partial_best if s.partial_best is not None
        else state.early.best if state.best_epoch else None,
        "skipped_updates": state.skipped_total, "world_size": s.rt.world_size,
        # a clock-driven lr (step.schedule_follows_clock): not reproducible bit for bit
        "lr_follows_clock": schedule_follows_clock(s.cfg.train),
        "peak_rss_bytes": peak_rss_bytes()}
    summary["account"] = run_account(summary, best_is_cut=s.partial_best is not None)
    return summary


def run_account(summary: dict, best_is_cut: bool) -> str:
    """How a run ended, in the words the log line, summary.json ("account") and the README's
    table all use: epochs ended, the epoch cut short, and whose weights are the best."""
    text = f"{summary['epochs']} epoch(s) ended"
    if summary["partial_epoch"]:
        text += (f" and {summary['inside_epoch_batches']:,} batches of epoch "
                 f"{summary['partial_epoch']} before the stop")
    best = summary["best_val_loss"]
    if best is None:
        return text + "; no finite validation loss"
    where = (f"the weights at the cut inside epoch {summary['best_epoch']}" if best_is_cut
             else f"epoch {summary['best_epoch']}'s weights")
    return text + f"; best (val loss {best:.2f}): {where}"


def _write_summary(s: Session, state: TrainState, summary: dict, test: dict | None) -> None:
    """Rank 0: the test result (or how to resume), safetensors, history.jsonl, summary.json,
    the closing line, the callbacks' on_end."""
    run, vae, stop_reason = s.run, state.eval_vae, summary["stop_reason"]
    if test is not None:
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
        "stopped": _now(), "stop_reason": stop_reason, "wall_seconds": summary["wall_seconds"],
        "training_seconds": summary["invocation_training_seconds"],
        "epochs": state.epoch, "steps": state.step})
    summary["invocations"] = len(history)
    summary["total_wall_seconds"] = sum(h.get("wall_seconds") or 0.0 for h in history)
    summary.update(what_ran(vae, s.rt, s.argv))
    write_json(run.summary, summary)
    s.log(_closing_line(s, state, summary, test))
    notify(s.callbacks, "on_end", summary)


def _closing_line(s: Session, state: TrainState, summary: dict, test: dict | None) -> str:
    stop_reason = summary["stop_reason"]
    if test is None:
        return (f"resvae: stopped ({stop_reason}) at epoch {state.epoch}, step {state.step}; "
                f"resume with: resvae train --resume {s.run.root}")
    return (f"resvae: stopped ({stop_reason}), {state.train_seconds:.0f}s training: "
            f"{summary['account']}; tested: test loss {test['loss']:.2f}"
            + (f", test bpd {test['bpd']:.4f}" if "bpd" in test else ""))


__all__ = ["train", "train_epoch", "log_step", "end_epoch", "finish", "run_account"]
