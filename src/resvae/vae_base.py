"""`BaseVAE`: what every resvae VAE is and offers, whatever its latents (`vae.VAE`: one latent
vector; `hier.HierVAE`: groups in a top-down hierarchy).

The rest of resvae (training, evaluation, sampling, export, checkpoints) works on this interface
only. It is a module of its own, below both, because vae.py imports hier.py (through nets.py's
ARCHS and for `build_vae`) while HierVAE must subclass it: here neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .likelihoods import Likelihood, bits_per_dim


class BaseVAE(nn.Module):
    """An encoder, a decoder that returns the likelihood's parameters, and the likelihood, for
    images of `image_shape` (C, H, W). A subclass sets `latent_dim` (the length of the flat code
    `encode` returns and `decode` takes) and gives `encode`, `decode`, `prior_params`, `forward`,
    `penalty` and `iwae`."""

    latent_dim: int

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood,
                 image_shape: tuple[int, int, int]):
        super().__init__()
        # the attribute names are the state_dict's keys (encoder.*, decoder.*, likelihood.*):
        # saved checkpoints depend on them
        self.encoder, self.decoder, self.likelihood = encoder, decoder, likelihood
        self.image_shape = tuple(image_shape)  # (C, H, W)

    @property
    def n_dims(self) -> int:
        """Pixel values per image (C*H*W), the denominator of bits/dim."""
        return math.prod(self.image_shape)

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return next(self.parameters()).device

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,C,H,W) in [0,1] -> posterior means and log-variances, each (B, latent_dim)."""
        raise NotImplementedError

    def decode(self, code: Tensor) -> Tensor:
        """A code (B, latent_dim) -> likelihood parameters (B, P, H, W)."""
        raise NotImplementedError

    def prior_params(self, n: int, *, temperature: float | Sequence[float],
                     generator: torch.Generator | None) -> Tensor:
        """Likelihood parameters (n, P, H, W) of n draws from the prior, at `temperature`."""
        raise NotImplementedError

    def penalty(self) -> Tensor:
        """Weight penalties to add to the training objective."""
        raise NotImplementedError

    def iwae(self, x: Tensor, k: int, *, max_batch: int = 512) -> Tensor:
        """Importance-weighted estimate of log p(x) per image in nats, (B,)."""
        raise NotImplementedError

    def negative_elbo(self, distortion: Tensor, kl: Tensor) -> dict[str, Tensor]:
        """forward's result from -log p(x|z) (B,) and the KL terms (B, K): `loss` = distortion +
        rate, `rate` (the KLs summed), `distortion`, `kl` itself (free bits act on its columns),
        and `bpd` where the likelihood is discrete."""
        rate = kl.sum(dim=1)
        out = {"loss": distortion + rate, "rate": rate, "distortion": distortion, "kl": kl}
        if self.likelihood.discrete:
            out["bpd"] = bits_per_dim(out["loss"], self.n_dims)
        return out

    @torch.no_grad()
    def sample(self, n: int, *, mean: bool = True, temperature: float | Sequence[float] = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
        """n images (n,C,H,W) in [0,1] decoded from the prior; `mean=True` shows the likelihood's
        mean (what the study's grids show), False draws pixels from it."""
        params = self.prior_params(n, temperature=temperature, generator=generator)
        return self.likelihood.images(params, mean=mean, generator=generator)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, *, mean: bool = True) -> Tensor:
        """Decode the posterior mean of x (every latent at its mean): (B,C,H,W) in [0,1]."""
        params = self.decode(self.encode(x)[0])
        return self.likelihood.images(params, mean=mean)


__all__ = ["BaseVAE"]
