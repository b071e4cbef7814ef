"""The VAE: a standard-normal prior, a diagonal Gaussian posterior, any encoder/decoder/likelihood.

The encoder and decoder are modules nested in the VAE and usable alone: the generator is
`vae.decoder` itself, never a copy (the study had to learn Keras' nested Models for this).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from .config import ModelConfig, RunConfig, validate
from .errors import ConfigError
from .hier import HierVAE
from .likelihoods import Likelihood, make_likelihood
from .nets import ARCHS, count_layers
from .vae_base import BaseVAE

LOG_2PI = math.log(2 * math.pi)


class VAE(BaseVAE):
    """One latent vector of `encoder.latent_dim` dimensions (sample, reconstruct, n_dims and the
    device come from `BaseVAE`, shared with hier.HierVAE)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, likelihood: Likelihood,
                 image_shape: tuple[int, int, int]):
        super().__init__(encoder, decoder, likelihood, image_shape)
        self.latent_dim = encoder.latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,C,H,W) in [0,1] -> posterior mean and log-variance, each (B, latent_dim)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """z (B, latent_dim) -> likelihood parameters (B, P, H, W)."""
        return self.decoder(z)

    @staticmethod
    def reparameterize(mean: Tensor, logvar: Tensor) -> Tensor:
        # std = exp(0.5 * logvar). The study's notebook used exp(logvar) as the std, i.e. its
        # "logvar" layer really predicted a log-std; we keep the textbook convention.
        return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Negative ELBO per image (nats) and its parts.

        Returns `loss` = distortion + rate, `rate` (KL(q||p)), `distortion` (-log p(x|z)), all (B,);
        `kl` per latent dim (B, latent_dim) for free bits; `bpd` where the likelihood is discrete.
        """
        mean, logvar = (t.float() for t in self.encode(x))
        # KL and likelihood run in float32 even under bf16 autocast: log-probs need the precision.
        params = self.decode(self.reparameterize(mean, logvar)).float()
        distortion = self.likelihood.nll(params, x)
        # Analytic KL(N(mean, var) || N(0, 1)) per dimension.
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
        return self.negative_elbo(distortion, kl)

    def penalty(self) -> Tensor:
        """Weight penalties to add to the training objective (the study's latent-layer L2)."""
        return self.encoder.penalty()

    def prior_params(self, n: int, *, temperature: float,
                     generator: torch.Generator | None) -> Tensor:
        """Decode n draws z ~ N(0, temperature^2 I), (n, latent_dim)."""
        z = torch.randn(n, self.latent_dim, device=self.device, generator=generator)
        return self.decode(z * temperature)

    @torch.no_grad()
    def iwae(self, x: Tensor, k: int, *, max_batch: int = 512) -> Tensor:
        """Importance-weighted estimate of log p(x) per image in nats, (B,) (Burda et al. 2016).

        log p(x) >= E[log 1/k sum_i p(x,z_i)/q(z_i|x)], tighter as k grows; k=1 is the ELBO.
        Samples are decoded in chunks of at most `max_batch` images so k=1000 fits in memory.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        mean, logvar = (t.float() for t in self.encode(x))
        std = torch.exp(0.5 * logvar)
        b = x.shape[0]
        chunk = max(1, max_batch // b)
        log_w = []
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            eps = torch.randn(c, *mean.shape, device=mean.device, dtype=mean.dtype)
            z = mean + std * eps  # (c, B, L)
            params = self.decode(z.flatten(0, 1)).float()
            log_px = -self.likelihood.nll(params, x.repeat(c, 1, 1, 1)).view(c, b)
            log_pz = -0.5 * (z.square() + LOG_2PI).sum(-1)
            log_qz = -0.5 * (eps.square() + LOG_2PI + logvar).sum(-1)
            log_w.append(log_px + log_pz - log_qz)
        return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)


def build_vae(config: ModelConfig | None = None, *, channels: int = 3, image_size: int = 32,
              **overrides) -> BaseVAE:
    """Build a VAE from a `ModelConfig` (its defaults: the study's 28-layer network, latent 256,
    Bernoulli likelihood): a `VAE`, or a `hier.HierVAE` for arch "hier". Keyword arguments
    override single fields as a convenience: `build_vae(arch="resnet", depth=20)`; an unknown one
    is a TypeError naming it."""
    cfg = config if config is not None else ModelConfig()
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"build_vae takes a ModelConfig (or keyword fields), got {cfg!r}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise TypeError(f"build_vae: unknown model option(s) {', '.join(unknown)}")
    cfg = dataclasses.replace(cfg, **overrides)
    validate(RunConfig(model=cfg))  # the same checks (and rename messages) as the command line
    if cfg.arch == "study" and cfg.block != "bottleneck":
        raise ConfigError("arch 'study' uses bottleneck blocks only (as the study did); "
                         f"got block={cfg.block!r}; use arch 'resnet' for basic blocks")
    options = {"dlogistic": {"n_mix": cfg.n_mix}, "dmol": {"n_mix": cfg.n_mix},
               "gaussian": {"std": cfg.gaussian_std}}.get(cfg.likelihood, {})
    lik = make_likelihood(cfg.likelihood, **options)
    kwargs = dict(width=cfg.width, latent_dim=cfg.latent_dim, channels=channels,
                  image_size=image_size, out_channels=lik.n_params(channels),
                  shortcut=cfg.shortcut, preact=cfg.preact, upsample=cfg.upsample,
                  zero_init_residual=cfg.zero_init_residual, latent_l2=tuple(cfg.latent_l2))
    if cfg.arch in ("resnet", "hier"):
        kwargs["block"] = cfg.block
    if cfg.arch == "hier":
        kwargs["stochastic_layers"] = cfg.stochastic_layers
    encoder, decoder = ARCHS[cfg.arch](cfg.depth, **kwargs)
    # latent groups need their own ELBO, IWAE and sampling (hier.py)
    vae_class = HierVAE if cfg.arch == "hier" else VAE
    return vae_class(encoder, decoder, lik, (channels, image_size, image_size))


def build_from_config(cfg: RunConfig, image_shape: tuple[int, int, int]) -> BaseVAE:
    """The VAE a run config describes, for images of `image_shape` (C, H, W)."""
    c, h, w = image_shape
    if h != w:
        raise ConfigError(f"images must be square, got {h}x{w} (use --image-size)")
    return build_vae(cfg.model, channels=c, image_size=h)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run a block in eval mode (BatchNorm running statistics), then restore the previous mode,
    even if the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def model_info(vae: BaseVAE) -> dict:
    """Layers (by the depth convention), parameters, and forward FLOPs per image (one negative
    ELBO: encoder, a posterior sample, decoder; only convs and matmuls count)."""
    enc = sum(p.numel() for p in vae.encoder.parameters())
    dec = sum(p.numel() for p in vae.decoder.parameters())
    x = torch.rand(1, *vae.image_shape, device=vae.device)
    # vae(x), not decode(encode(x)): a hierarchical encode already runs the top-down pass.
    with eval_mode(vae), torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae(x)
    return {"layers": count_layers(vae.encoder) + count_layers(vae.decoder),
            "encoder_params": enc, "decoder_params": dec, "params": enc + dec,
            "flops": int(counter.get_total_flops())}
