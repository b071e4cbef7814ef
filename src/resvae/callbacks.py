"""Callbacks: what `train(cfg, out, callbacks=[...])` tells other code while it runs.

A callback is any object with some of three methods (minGPT's registry, no base class):

    on_step(step, stats)   every `log_every` updates: the means of loss, rate, distortion and
                           grad_norm over those updates (None if all were skipped), lr, beta
                           (the KL weight), skipped, epoch; python floats
    on_epoch(record)       each epoch's record, as written to metrics.jsonl
    on_end(summary)        the run's summary, as written to summary.json

They are called on rank 0 only. `TensorBoard` (`--tensorboard`) is one of them.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from .config import ConfigError, RunConfig, to_dict
from .runs import RunDir

EVENTS = ("on_step", "on_epoch", "on_end")
STEP_TAGS = ("loss", "rate", "distortion", "grad_norm", "lr", "beta", "skipped")
EPOCH_TAGS = {"train_loss": "epoch/train_loss", "rate": "epoch/rate",
              "distortion": "epoch/distortion", "images_per_s": "epoch/images_per_s",
              "val_loss": "val/loss", "val_bpd": "val/bpd", "val_rate": "val/rate",
              "val_distortion": "val/distortion"}
FINAL_METRICS = ("test_loss", "test_bpd", "best_val_loss")


def notify(callbacks, event: str, *args) -> None:
    """Call `event` on every callback that has it."""
    for cb in callbacks:
        method = getattr(cb, event, None)
        if method is not None:
            method(*args)


def summary_writer():
    """torch's SummaryWriter class; a clear error when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package
        raise ConfigError("--tensorboard needs the tensorboard package: "
                          "pip install 'resvae[tensorboard]'") from None
    return SummaryWriter


class TensorBoard:
    """Event files in RUN_DIR/tensorboard/, every value at the global step it belongs to:
    train/* every `log_every` updates, val/* and epoch/* per epoch with the sample and
    reconstruction grids, and at the end the flat config as hyper-parameters with the final
    metrics. `purge_step` (a resumed run's step + 1) drops the events a crashed run wrote after
    its checkpoint, as `keep_metrics` does for metrics.jsonl."""

    def __init__(self, run: RunDir, cfg: RunConfig, purge_step: int | None = None):
        self.run, self.cfg = run, cfg
        self.writer = summary_writer()(str(run.tensorboard), purge_step=purge_step)
        self.grids_logged: set[int] = set()

    def on_step(self, step: int, stats: dict) -> None:
        for k in STEP_TAGS:
            if stats.get(k) is not None:
                self.writer.add_scalar(f"train/{k}", stats[k], step)

    def on_epoch(self, record: dict) -> None:
        for key, tag in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["step"])
        self._grids(record["epoch"], record["step"])
        self.writer.flush()  # an epoch's events are on disk even if the run dies later

    def on_end(self, summary: dict) -> None:
        self._grids(summary["epochs"], summary["steps"])  # the final grids, written at the end
        flat = {k: v for section in to_dict(self.cfg).values() for k, v in section.items()}
        hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                   for k, v in flat.items()}  # lists (betas, latent_l2) are not hparam values
        metrics = {k: summary[k] for k in FINAL_METRICS if summary.get(k) is not None}
        # run_name "." keeps the hparams in this run's directory, not a timestamped sub-run
        self.writer.add_hparams(hparams, metrics, run_name=".", global_step=summary["steps"])
        self.writer.close()

    def _grids(self, epoch: int, step: int) -> None:
        if epoch in self.grids_logged:
            return
        for kind in ("samples", "recon"):
            path = self.run.grid(kind, epoch)
            if path.exists():
                with Image.open(path) as im:
                    img = np.asarray(im.convert("RGB"))
                self.writer.add_image(kind, img, step, dataformats="HWC")
                self.grids_logged.add(epoch)


__all__ = ["EVENTS", "notify", "summary_writer", "TensorBoard"]
