"""What a training run carries from one update to the next, and so what a checkpoint must hold
for a resumed run to continue exactly as if it had never stopped: the weights, Adam's and the
schedules' state and the counters (`TrainState`), and, for a checkpoint taken inside an epoch,
where that epoch stood (`Epoch`: its place in the data order, its sums so far, each rank's RNG
state; `Window`: the updates since the last log step). `train.py` runs the loop over them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from . import distributed as D
from .config import ConfigError, RunConfig, to_dict
from .runs import config_differences
from .step import EMA
from .vae_base import BaseVAE


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


def rng_state(device: torch.device) -> dict:
    """torch's RNG state on the CPU (and on `device` when it is a GPU)."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(rng: dict, device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if rng.get("cuda") is not None and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def check_resumable(ckpt: dict, path, cfg: RunConfig, world_size: int) -> None:
    """A checkpoint of another model, or one taken inside an epoch by another number of
    processes (its data shards and noise are per rank), cannot continue this run."""
    if config_differences(ckpt.get("config", {}), cfg, ["model"]):
        raise ConfigError(f"--resume-from {path}: a checkpoint of another model than this run's "
                          "config.json")
    p = ckpt.get("progress")
    if p is not None and p["world_size"] != world_size:
        raise ConfigError(f"--resume {path}: written inside epoch {ckpt['epoch'] + 1} by "
                          f"{p['world_size']} process(es); resume it with as many (torchrun "
                          f"--nproc_per_node {p['world_size']}), this is {world_size}")


@dataclass
class TrainState:
    """Everything a run needs to continue exactly: the live objects and the counters.
    `checkpoint()` and `restore()` are the two directions of one checkpoint dict. `progress` is
    where an epoch stood when the checkpoint was taken inside it (None at an epoch's end):
    `train_epoch` continues that epoch from there."""

    vae: BaseVAE
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
    def eval_vae(self) -> BaseVAE:
        """The module validation, test, samples and saved weights use."""
        return self.ema.module if self.ema is not None else self.vae

    def weights_finite(self) -> bool:
        """No NaN/inf in the trained weights nor in the evaluated ones (--ema's average)."""
        modules = {id(self.vae): self.vae, id(self.eval_vae): self.eval_vae}.values()
        tensors = [t for m in modules for t in m.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())

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


@dataclass
class Window:
    """The per-update numbers (STEP_KEYS) of applied updates since the last log step, summed on
    the device in float64: reading them back is one sync every `log_every` updates."""

    sums: torch.Tensor
    n_ok: int = 0
    skipped: int = 0

    def take(self, rt: D.Runtime) -> tuple[dict, int]:
        """(the window's means over ranks, None when every update skipped; its skip count), read
        back in one sync; the window starts afresh."""
        sums = D.all_reduce_sum(self.sums.clone(), rt).tolist()
        n = self.n_ok * rt.world_size  # ranks skip together: the same n_ok everywhere
        means, skipped = {k: v / n if n else None for k, v in zip(STEP_KEYS, sums)}, self.skipped
        self.sums.zero_()
        self.n_ok = self.skipped = 0
        return means, skipped


@dataclass
class Epoch:
    """One pass of updates so far: what `end_epoch` reports, and what a checkpoint taken inside
    the epoch carries to continue it exactly (`progress_record` writes that record,
    `continue_from` reads it back)."""

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

    def progress_record(self, window: Window, rt: D.Runtime) -> dict:
        """A checkpoint's `progress`: where this epoch stands. Every rank takes part: the sums
        are summed over ranks and each rank's RNG state is gathered on rank 0."""
        w = window
        return {
            "batch": self.batch, "batches": self.batches, "n_ok": self.n_ok,
            "skipped": self.skipped, "images": self.images, "seconds": self.seconds,
            "peak_lr": self.peak_lr, "last_lr": self.last_lr,
            "sums": D.all_reduce_sum(self.sums.clone(), rt).cpu(),
            "window": {"sums": D.all_reduce_sum(w.sums.clone(), rt).cpu(), "n_ok": w.n_ok,
                       "skipped": w.skipped},
            "rng": D.gather_to_main(rng_state(rt.device), rt), "world_size": rt.world_size}

    def continue_from(self, p: dict, rt: D.Runtime) -> Window:
        """Take up the epoch `progress_record` wrote as `p`: its place, its counts, this rank's
        noise; returns the log window it had open."""
        set_rng_state(p["rng"][rt.rank], rt.device)
        # sums were saved summed over ranks: each rank takes its share, so the all-reduced means
        # at the epoch's end come out the same
        self.sums = p["sums"].to(rt.device) / rt.world_size
        self.batch, self.n_ok, self.skipped = p["batch"], p["n_ok"], p["skipped"]
        self.seconds, self.images, self.last_lr = p["seconds"], p["images"], p["last_lr"]
        w = p["window"]
        return Window(w["sums"].to(rt.device) / rt.world_size, w["n_ok"], w["skipped"])


__all__ = ["EarlyStopping", "make_plateau", "epoch_seed", "rng_state", "set_rng_state",
           "check_resumable", "TrainState", "STEP_KEYS", "Window", "Epoch"]
