"""Images from a VAE: sample grids from the prior (the generator is `vae.decoder` itself),
reconstructions, and interpolations in latent space; all saved as PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import load_run
from .data import run_splits, to_input
from .errors import ConfigError
from .files import atomic_write, check_output
from .runs import RunDir
from .vae import eval_mode
from .vae_base import BaseVAE


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """(N,C,H,W) floats in [0,1] -> one PNG, nrow images per row, 1-pixel gutters."""
    x = (images.detach().float().clamp(0, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    n, c, h, w = x.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + 1) + 1, nrow * (w + 1) + 1, c), 255, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + col * (w + 1):1 + col * (w + 1) + w] = \
            x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_write(Path(path), lambda tmp: img.save(tmp, format="PNG"))


def spread(images: np.ndarray, n: int) -> np.ndarray:
    """n evenly spaced images: test splits are often sorted by class (all airplanes first)."""
    return images[np.linspace(0, len(images) - 1, min(n, len(images))).round().astype(np.int64)]


@torch.no_grad()
def samples(vae: BaseVAE, n: int, *, temperature: float = 1.0, seed: int = 1234,
            mean: bool = True) -> torch.Tensor:
    """n images from the prior, z ~ N(0, temperature^2 I), decoded by the decoder alone."""
    device = vae.device
    gen = torch.Generator(device=device).manual_seed(seed)
    with eval_mode(vae):
        return vae.sample(n, temperature=temperature, generator=gen, mean=mean)


@torch.no_grad()
def reconstructions(vae: BaseVAE, images: np.ndarray, nrow: int = 10) -> torch.Tensor:
    """Inputs above their reconstructions, row pair by row pair: (2N, C, H, W)."""
    device = vae.device
    x = to_input(torch.from_numpy(images), device)
    with eval_mode(vae):
        rec = vae.reconstruct(x)
    pairs = torch.stack([x.view(-1, nrow, *x.shape[1:]), rec.view(-1, nrow, *x.shape[1:])], 1)
    return pairs.flatten(0, 2)


@torch.no_grad()
def interpolations(vae: BaseVAE, images: np.ndarray, steps: int = 10) -> torch.Tensor:
    """Rows walking in latent space between consecutive pairs of images (posterior means),
    the two end images decoded as well: (pairs * steps, C, H, W)."""
    device = vae.device
    x = to_input(torch.from_numpy(images), device)
    with eval_mode(vae):
        z = vae.encode(x)[0]
        a, b = z[0::2], z[1::2]
        t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
        path = (a.unsqueeze(1) * (1 - t) + b.unsqueeze(1) * t).flatten(0, 1)
        return vae.likelihood.mean(vae.decode(path))


def save_epoch_grids(vae: BaseVAE, val_images: np.ndarray, run: RunDir, epoch: int) -> None:
    """What training writes each `sample_every` epochs: a 10x10 grid from the prior (fixed seed,
    so grids are comparable across epochs) and 5 rows of inputs above reconstructions."""
    n = min(50, len(val_images) // 10 * 10) or len(val_images)  # whole rows of 10 when possible
    nrow = min(10, n)
    save_grid(samples(vae, 100), run.grid("samples", epoch))
    save_grid(reconstructions(vae, spread(val_images, n), nrow), run.grid("recon", epoch),
              nrow=nrow)


def _run_images(cfg, split: str, data_dir: str | None) -> np.ndarray:
    return getattr(run_splits(cfg, data_dir), split).images


def _checked(n: int, what: str) -> int:
    if n < 1:
        raise ConfigError(f"{what} must be >= 1, got {n}")
    return n


def sample_run(run_dir, out: Path, *, n: int = 100, nrow: int = 10, temperature: float = 1.0,
               seed: int = 1234, device="cpu") -> Path:
    """`resvae sample`: n images from a saved run's prior as one grid."""
    check_output(out)
    vae, _ = load_run(run_dir, device=device)
    save_grid(samples(vae, _checked(n, "-n"), temperature=temperature, seed=seed), out,
              nrow=min(nrow, n))
    return Path(out)


def reconstruct_run(run_dir, out: Path, *, n: int = 50, split: str = "test", device="cpu",
                    data_dir: str | None = None) -> Path:
    """`resvae reconstruct`: n test images (whole rows of 10) above their reconstructions."""
    check_output(out)
    vae, cfg = load_run(run_dir, device=device)
    images = spread(_run_images(cfg, split, data_dir), _checked(n, "-n"))
    nrow = min(10, len(images))
    images = images[:len(images) // nrow * nrow]
    save_grid(reconstructions(vae, images, nrow), out, nrow=nrow)
    return Path(out)


def interpolate_run(run_dir, out: Path, *, pairs: int = 8, steps: int = 10, split: str = "test",
                    device="cpu", data_dir: str | None = None) -> Path:
    """`resvae interpolate`: `pairs` rows of `steps` images between pairs of test images."""
    check_output(out)
    vae, cfg = load_run(run_dir, device=device)
    images = spread(_run_images(cfg, split, data_dir), 2 * _checked(pairs, "--pairs"))
    save_grid(interpolations(vae, images, _checked(steps, "--steps")), out, nrow=steps)
    return Path(out)


__all__ = ["save_grid", "samples", "reconstructions", "interpolations", "save_epoch_grids",
           "sample_run", "reconstruct_run", "interpolate_run"]
