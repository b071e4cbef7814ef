"""Evaluation: the negative ELBO during training, and a saved run's ELBO and IWAE bounds with
standard errors (`resvae eval`), plus the number of active latent units.

All of it runs in eval mode (BatchNorm running statistics), on whole images in float32 for the
log-probabilities (the VAE does that even under bf16 autocast).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import distributed as D
from .checkpoints import load_run
from .data import Splits, run_splits, to_input
from .errors import ConfigError
from .hier import HierVAE
from .likelihoods import bits_per_dim
from .runs import RunDir, write_json
from .step import FP32, Precision
from .vae import eval_mode
from .vae_base import BaseVAE


@torch.no_grad()
def evaluate(vae: BaseVAE, images: np.ndarray, batch_size: int, rt: D.Runtime,
             precision: Precision = FP32) -> dict:
    """Mean negative ELBO and its parts over `images`, exact across DDP ranks (rank r takes every
    world_size-th image; sums and counts are all-reduced, no padding is double counted)."""
    shard = images[rt.rank::rt.world_size]
    keys = ["loss", "rate", "distortion"] + (["bpd"] if vae.likelihood.discrete else [])
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64, device=rt.device)
    with eval_mode(vae):
        for start in range(0, len(shard), batch_size):
            x = to_input(torch.from_numpy(shard[start:start + batch_size]), rt.device,
                         precision.channels_last)
            with precision.autocast():
                out = vae(x)
            sums[:-1] += torch.stack([out[k].double().sum() for k in keys])
            sums[-1] += x.shape[0]
    D.all_reduce_sum(sums, rt)
    return {k: (sums[i] / sums[-1]).item() for i, k in enumerate(keys)}


@torch.no_grad()
def recalibrate_batchnorm(vae: BaseVAE, images: np.ndarray, batches: int, batch_size: int,
                          device, precision: Precision = FP32, seed: int = 0) -> None:
    """Precise BN (Wu & Johnson 2021): replace every BatchNorm's running statistics by their
    average over `batches` training batches, computed with the current weights.

    Running averages mix statistics of many past weights; when the weights change fast (early
    training, high lr, deep plain nets) eval mode then normalises with the wrong statistics and
    the validation loss silently differs from the training one, by orders of magnitude in a
    52-layer plain net. The batches are fixed (evenly spaced images), so every DDP rank computes
    the same statistics; training is unaffected (it normalises with batch statistics, and its
    noise is reseeded every epoch).
    """
    bns = [m for m in vae.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    n = min(batches * batch_size, len(images)) // batch_size * batch_size
    if not bns or n == 0:
        return
    pick = images[np.linspace(0, len(images) - 1, n).round().astype(np.int64)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    torch.manual_seed(seed)
    was_training = vae.training
    vae.train()
    try:
        for start in range(0, n, batch_size):
            with precision.autocast():
                # vae.forward, not vae(...): under --compile the compiled graph was traced with
                # the training momentum and must not be reused (or retraced) for this pass
                vae.forward(to_input(torch.from_numpy(pick[start:start + batch_size]), device,
                                     precision.channels_last))
    finally:
        vae.train(was_training)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    v = values.double()
    se = v.std(unbiased=True).item() / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return v.mean().item(), se


@torch.no_grad()
def elbo_and_iwae(vae: BaseVAE, images: np.ndarray, k: int, *, batch_size: int = 8,
                  device="cpu", seed: int = 0, max_batch: int = 512,
                  progress: bool | None = False) -> dict:
    """Per-image negative ELBO and IWAE bound (Burda et al. 2016) over `images`, as means with
    standard errors over images, in nats and (for discrete likelihoods) bits/dim.

    The IWAE bound with k samples is never looser than the ELBO (k=1); `vae.iwae` decodes at most
    `max_batch` samples at a time, so k=1000 fits in memory. `progress`: a bar over images
    (None: only on a terminal).
    """
    torch.manual_seed(seed)
    elbo, iwae = [], []
    with eval_mode(vae), tqdm(total=len(images), unit="img", desc=f"IWAE k={k}",
                              disable=None if progress is None else not progress) as bar:
        for start in range(0, len(images), batch_size):
            x = to_input(torch.from_numpy(images[start:start + batch_size]), device, False)
            elbo.append(vae(x)["loss"].double().cpu())
            iwae.append(-vae.iwae(x, k, max_batch=max_batch).double().cpu())
            bar.update(len(x))
    elbo, iwae = torch.cat(elbo), torch.cat(iwae)
    out = {"k": k, "n_images": len(images)}
    for name, values in (("elbo", elbo), ("iwae", iwae)):
        mean, se = _mean_se(values)
        out[f"{name}_nats"], out[f"{name}_nats_se"] = mean, se
        if vae.likelihood.discrete:  # a bits/dim standard error is the nats one, rescaled
            out[f"{name}_bpd"] = float(bits_per_dim(torch.tensor(mean), vae.n_dims))
            out[f"{name}_bpd_se"] = float(bits_per_dim(torch.tensor(se), vae.n_dims))
        else:
            out[f"{name}_bpd"] = out[f"{name}_bpd_se"] = None
    return out


@torch.no_grad()
def active_mask(vae: BaseVAE, images: np.ndarray, *, batch_size: int = 500, device="cpu",
                threshold: float = 0.01) -> torch.Tensor:
    """Which latent dimensions are active, (latent_dim,) bool: those whose posterior mean varies
    over the data, Var_x E_q[z_i|x] > 0.01 (Burda et al. 2016). The rest carry no information
    about x (posterior collapse).

    The variance is accumulated batch by batch (Chan et al. 1979), so memory stays one batch of
    codes: a hierarchical VAE's code has tens of thousands of units per image."""
    n, mean, m2 = 0, 0.0, 0.0
    with eval_mode(vae):
        for start in range(0, len(images), batch_size):
            x = to_input(torch.from_numpy(images[start:start + batch_size]), device, False)
            z = vae.encode(x)[0].double().cpu()
            b, z_mean = len(z), z.mean(0)
            delta = z_mean - mean
            mean = mean + delta * b / (n + b)
            m2 = m2 + (z - z_mean).square().sum(0) + delta.square() * n * b / (n + b)
            n += b
    return m2 / (n - 1) > threshold


def active_units(vae: BaseVAE, images: np.ndarray, **kw) -> int:
    """The number of active latent dimensions (`active_mask`)."""
    return int(active_mask(vae, images, **kw).sum())


def active_units_per_group(vae: BaseVAE, mask: torch.Tensor) -> list[int] | None:
    """A hierarchical VAE's active units per latent group, top group first (`HierVAE.split`
    cuts its flat code into the groups); None for a VAE with one latent layer."""
    if not isinstance(vae, HierVAE):
        return None
    return [int(group.sum()) for group in vae.split(mask[None])]


# `resvae eval`'s default image count: k=1000 importance samples took 2.2 s an image for the cpu
# preset's model on 2 CPU cores (measured), so the default takes about 4 minutes there; --n 0
# is the whole split (CIFAR-10's 10,000 test images: about 6 hours on those cores).
EVAL_N = 100


def eval_run(run_dir: str | Path, *, k: int = 1000, split: str = "test", n: int = EVAL_N,
             which: str = "best", batch_size: int = 8, device="cpu", seed: int = 0,
             data: Splits | None = None, data_dir: str | None = None, write: bool = True,
             progress: bool = False) -> dict:
    """`resvae eval`: load a run's weights and data, measure ELBO and IWAE on `split` (`n`
    evenly spaced images when n > 0, else all), count active units; write RUN_DIR/eval.json.
    `data`: the run's splits, already loaded; else from `data_dir` (see data.run_splits)."""
    if split not in ("train", "val", "test"):
        raise ConfigError(f"--split must be train, val or test, got {split!r}")
    if k < 1:
        raise ConfigError(f"--k must be >= 1, got {k}")
    vae, cfg = load_run(run_dir, which=which, device=device)
    if data is None:
        data = run_splits(cfg, data_dir)
    images = getattr(data, split).images
    if n > 0:
        # evenly spaced, not the first n: test splits are often sorted by class
        images = images[np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(int)]
    mask = active_mask(vae, images, device=device)
    result = {"split": split, "weights": which, "seed": seed,
              **elbo_and_iwae(vae, images, k, batch_size=batch_size, device=device, seed=seed,
                              progress=progress),
              "active_units": int(mask.sum()), "latent_dim": vae.latent_dim}
    per_group = active_units_per_group(vae, mask)
    if per_group is not None:  # hier: which groups carry information
        result["active_units_per_group"] = per_group
    if write:  # beside the weights' run: RUN_DIR/eval.json, also for RUN_DIR/checkpoints/x.safetensors
        p = Path(run_dir)
        write_json(RunDir(p if p.is_dir() else p.parent.parent).eval, result)
    return result


__all__ = ["EVAL_N", "evaluate", "recalibrate_batchnorm", "elbo_and_iwae", "active_mask",
           "active_units", "active_units_per_group", "eval_run"]
