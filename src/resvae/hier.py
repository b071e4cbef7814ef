"""arch "hier": a hierarchical VAE (VDVAE, Child 2021; NVAE, Vahdat & Kautz 2020) built from
resvae's own residual blocks.

    x -> BottomUp: stem (3x3, stride 2), pre-activation blocks at s/2, s/4, s/8, then a global
         average: features at four resolutions (16, 8, 4, 1 for 32x32 images)
      -> TopDown: a learned state at 1x1, grown by nearest-neighbour upsampling to 4, 8, 16; at
         each resolution latent groups and residual blocks take turns (group first, VDVAE's
         DecBlock order); a 1x1 output conv and a pixel shuffle give the likelihood's parameters
         at full size.

A latent group (`LatentGroup`) has a prior p(z_i | z_<i) read from the top-down state and a
posterior q(z_i | x, z_<i) read from the state concatenated with the bottom-up features of its
resolution; the prior head also writes a state update, and z (latent_dim channels at the group's
resolution) is projected and added to the state. Heads are single 1x1 convs, as NVAE's samplers
are single convs: the residual blocks around them supply the spatial context, and a head's cost
stays small at 256 latent channels.

Depth, both ways:
  weight layers (resvae's convention, `nets.count_layers`): the longest path runs x -> stem -> every
      encoder block -> the top group's posterior head -> its z projection -> every later cell ->
      output conv; a group is 2 layers deep (posterior head, z projection; the prior head runs
      beside the posterior head), a block n_layers (bottleneck 3, basic 2), so
          depth = 2 + 2 * stochastic_layers + n_layers * T,   T >= 6 residual blocks in all,
      T // 2 of them in the encoder and the rest in the decoder, spread evenly over the three
      block resolutions with the remainder going to the lowest ones first (the cheapest).
  stochastic layers: `stochastic_layers` groups, spread evenly over the four resolutions 1, s/8,
      s/4, s/2, the remainder again to the lowest first (4 -> one per resolution, 10 -> 3,3,2,2).

Options: `width` scales HIER_BASE = 128 channels (the same at every resolution, as in VDVAE);
`latent_dim` is the channels of one group; `block` and `shortcut` choose the residual blocks. The
blocks are always pre-activation without normalisation (VDVAE: BatchNorm statistics would differ
between the posterior pass of training and the prior pass of sampling), so `preact` is implied,
and the state grows by nearest-neighbour upsampling, so `upsample` is unused.

Init (what makes deep ones train, after VDVAE): the last conv of each residual block is scaled by
sqrt(1/blocks) and each z projection by sqrt(1/groups), or both zeroed with zero_init_residual;
the prior heads start at zero (p = N(0, I), no state update); the posterior heads are Glorot, so
q starts near the prior.

`HierVAE` is a `vae_base.BaseVAE`, as `vae.VAE` is; its `encode`/`decode` work on one flat code,
all groups' latents concatenated (see there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .blocks import BLOCKS, init_weights, make_stage, residual_scale_
from .errors import ConfigError
from .likelihoods import Likelihood
from .vae_base import BaseVAE

HIER_BASE = 128  # channels at width 1.0
N_LEVELS = 4     # latent resolutions: 1x1 (global), s/8, s/4, s/2
MIN_BLOCKS = 6   # one residual block per block resolution (s/2, s/4, s/8) on each side
LOG_2PI = math.log(2 * math.pi)


def _spread(n: int, k: int) -> list[int]:
    """n items over k slots ordered lowest resolution first: evenly, the remainder to the first."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def hier_layout(depth: int, stochastic_layers: int, block: str = "bottleneck") -> dict:
    """Blocks and groups per resolution, top-down (lowest resolution first), for a depth.

    Returns {"groups": 4 counts at 1, s/8, s/4, s/2; "encoder_blocks" and "decoder_blocks": 3
    counts at s/8, s/4, s/2}. Any depth other than 2 + 2*S + n_layers*T (T >= 6) is an error
    naming the nearest valid ones.
    """
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
    if stochastic_layers < 1:
        raise ConfigError(f"stochastic_layers must be >= 1, got {stochastic_layers}")
    per = BLOCKS[block].n_layers
    fixed = 2 + 2 * stochastic_layers  # stem + output conv + 2 per group
    smallest = fixed + MIN_BLOCKS * per
    if depth < smallest or (depth - fixed) % per:
        below = max(smallest, fixed + (depth - fixed) // per * per)
        above = max(smallest, below + per if depth > below else below)
        raise ConfigError(
            f"depth {depth} is not reachable with arch 'hier', {block} blocks and "
            f"stochastic_layers {stochastic_layers}: depths are 2 + 2*{stochastic_layers} + "
            f"{per}*T (T >= {MIN_BLOCKS} residual blocks); nearest valid: "
            + " or ".join(map(str, sorted({below, above}))))
    total = (depth - fixed) // per
    return {"groups": _spread(stochastic_layers, N_LEVELS),
            "encoder_blocks": _spread(total // 2, N_LEVELS - 1),
            "decoder_blocks": _spread(total - total // 2, N_LEVELS - 1)}


def level_sizes(image_size: int) -> list[int]:
    """Spatial sizes of the four latent resolutions, top-down: 32 -> [1, 4, 8, 16], 28 -> [1, 4, 7, 14]."""
    s2 = (image_size + 1) // 2  # stride-2 convs with padding give ceil(n / 2)
    s4 = (s2 + 1) // 2
    return [1, (s4 + 1) // 2, s4, s2]


def _no_norm(channels: int) -> nn.Module:
    return nn.Identity()


class GroupStats(NamedTuple):
    """One group's latent and distributions, each (B, latent_dim, h, w); q_* are None on a pass
    without an image (sampling, decoding)."""

    z: Tensor
    p_mean: Tensor
    p_logvar: Tensor
    q_mean: Tensor | None
    q_logvar: Tensor | None


def gaussian_kl(q_mean: Tensor, q_logvar: Tensor, p_mean: Tensor, p_logvar: Tensor) -> Tensor:
    """KL(N(q_mean, e^q_logvar) || N(p_mean, e^p_logvar)) summed per image: (B,)."""
    kl = 0.5 * (p_logvar - q_logvar + torch.exp(q_logvar - p_logvar)
                + (q_mean - p_mean).square() * torch.exp(-p_logvar) - 1.0)
    return kl.flatten(1).sum(1)


def log_normal(z: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(z; mean, e^logvar) summed per image: (B,)."""
    return (-0.5 * (LOG_2PI + logvar + (z - mean).square() * torch.exp(-logvar))).flatten(1).sum(1)


class LatentGroup(nn.Module):
    """One stochastic layer: prior and posterior heads, and the z projection into the state."""

    def __init__(self, width: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        # Pre-activation heads on the un-normalised residual state, as VDVAE's blocks begin.
        self.posterior = nn.Sequential(nn.GELU(), nn.Conv2d(2 * width, 2 * latent_dim, 1))
        self.prior = nn.Sequential(nn.GELU(), nn.Conv2d(width, 2 * latent_dim + width, 1))
        self.z_proj = nn.Conv2d(latent_dim, width, 1)

    def forward(self, state: Tensor, act: Tensor | None = None, *, z: Tensor | None = None,
                temperature: float = 1.0, posterior_mean: bool = False,
                generator: torch.Generator | None = None) -> tuple[Tensor, GroupStats]:
        """z is `z` when given, else drawn from q (with `act`; its mean when posterior_mean), else
        from p with its std scaled by `temperature`. Returns the new state and the group's stats."""
        p_mean, p_logvar, update = self.prior(state).split(
            [self.latent_dim, self.latent_dim, state.shape[1]], dim=1)
        q_mean = q_logvar = None
        if act is not None:  # q reads the state as it came in, as VDVAE's DecBlock does
            q_mean, q_logvar = self.posterior(torch.cat([state, act], dim=1)).chunk(2, dim=1)
        if z is None:
            mean, logvar, t = ((q_mean, q_logvar, 0.0 if posterior_mean else 1.0)
                               if act is not None else (p_mean, p_logvar, temperature))
            # eps is drawn even at t = 0, so one seed gives related samples at any temperature
            eps = torch.randn(mean.shape, generator=generator, device=mean.device,
                              dtype=mean.dtype)
            z = mean + t * torch.exp(0.5 * logvar) * eps
        state = state + update + self.z_proj(z)
        return state, GroupStats(z, p_mean, p_logvar, q_mean, q_logvar)


class BottomUp(nn.Module):
    """x (B,C,H,W) in [0,1] -> features at the four latent resolutions, top-down order:
    [(B,w,1,1), (B,w,s/8,s/8), (B,w,s/4,s/4), (B,w,s/2,s/2)]."""

    def __init__(self, channels: int, width: int, planes: int, blocks: Sequence[int], **opts):
        super().__init__()
        self.stem = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        # blocks come lowest resolution first; the encoder runs s/2 -> s/4 -> s/8, each later
        # stage opening with a strided block (resvae's down block with its projection shortcut)
        self.stages = nn.ModuleList(
            make_stage(width, planes, n, stride, **opts)
            for n, stride in zip(reversed(blocks), (1, 2, 2)))

    def forward(self, x: Tensor) -> list[Tensor]:
        h = self.stem(2.0 * x - 1.0)  # centred input: there is no normalisation layer to do it
        acts = []
        for stage in self.stages:
            h = stage(h)
            acts.append(h)
        # 1x1: the global average of the s/8 features (VDVAE pools its 4x4 features likewise)
        acts.append(h.mean(dim=(2, 3), keepdim=True))
        return acts[::-1]


class TopDown(nn.Module):
    """The generator: latent groups and residual blocks from 1x1 up to s/2, then the output.

    `forward` returns the likelihood's parameters (B, P, H, W) and each group's `GroupStats`."""

    def __init__(self, sizes: Sequence[int], width: int, planes: int, latent_dim: int,
                 groups: Sequence[int], blocks: Sequence[int], out_channels: int,
                 image_size: int, **opts):
        super().__init__()
        self.sizes, self.image_size, self.latent_dim = list(sizes), image_size, latent_dim
        # A learned state per resolution, added where the state arrives (VDVAE's bias_xs).
        self.bias = nn.ParameterList(nn.Parameter(torch.zeros(1, width, s, s)) for s in sizes)
        self.levels = nn.ModuleList()
        for n_groups, n_blocks in zip(groups, [0, *blocks]):
            stage = list(make_stage(width, planes, n_blocks, 1, **opts)) if n_blocks else []
            cells = []
            for i in range(max(n_groups, n_blocks)):  # group then block, VDVAE's DecBlock order
                cells += [LatentGroup(width, latent_dim)] if i < n_groups else []
                cells += [stage[i]] if i < n_blocks else []
            self.levels.append(nn.ModuleList(cells))
        # 1x1 conv to the parameters of 2x2 pixels, then a pixel shuffle (Shi et al. 2016): the
        # full-resolution output at the cost of a 1x1 conv at s/2.
        self.out = nn.Sequential(nn.GELU(), nn.Conv2d(width, 4 * out_channels, 1),
                                 nn.PixelShuffle(2))

    @property
    def group_shapes(self) -> list[tuple[int, int, int]]:
        """(latent_dim, h, w) of each group, top-down."""
        return [(self.latent_dim, s, s) for s, level in zip(self.sizes, self.levels)
                for cell in level if isinstance(cell, LatentGroup)]

    def forward(self, acts: Sequence[Tensor] | None = None, *, z: Sequence[Tensor] | None = None,
                n: int | None = None, temperature: float | Sequence[float] = 1.0,
                posterior_mean: bool = False, generator: torch.Generator | None = None
                ) -> tuple[Tensor, list[GroupStats]]:
        """One top-down pass. Each group's z: `z[i]` when given, else from the posterior when
        `acts` (the encoder's features) are given, else from the prior at `temperature` (a float,
        or one per group). `n` is the batch size when neither acts nor z give it."""
        n_groups = len(self.group_shapes)
        temps = ([float(temperature)] * n_groups if isinstance(temperature, (int, float))
                 else [float(t) for t in temperature])
        if len(temps) != n_groups:
            raise ConfigError(f"temperature: expected a number or {n_groups} numbers (one per "
                             f"group), got {len(temps)}")
        if z is not None and len(z) != n_groups:
            raise ValueError(f"z: expected {n_groups} groups, got {len(z)}")
        n = acts[0].shape[0] if acts is not None else z[0].shape[0] if z is not None else n
        stats: list[GroupStats] = []
        state = None
        for i, (level, bias) in enumerate(zip(self.levels, self.bias)):
            if state is None:
                state = bias.repeat(n, 1, 1, 1)  # a copy: a view of a parameter confuses hooks
            else:
                state = F.interpolate(state, size=bias.shape[-2:], mode="nearest") + bias
            for cell in level:
                if not isinstance(cell, LatentGroup):
                    state = cell(state)
                    continue
                g = len(stats)
                state, s = cell(state, None if acts is None else acts[i],
                                z=None if z is None else z[g], temperature=temps[g],
                                posterior_mean=posterior_mean, generator=generator)
                stats.append(s)
        # The parameter head runs in float32 under bf16 autocast: bf16 keeps 8 bits of mantissa,
        # so a dmol mean in [-1, 1] would be rounded to about half a pixel bin (2/255).
        with torch.autocast(state.device.type, enabled=False):
            p = self.out(state.float())
        return p[..., :self.image_size, :self.image_size], stats  # odd sizes: 2*ceil(n/2) = n+1


class HierVAE(BaseVAE):
    """The hierarchical VAE, with the interface of every resvae VAE (`BaseVAE`: forward, penalty,
    sample, reconstruct, iwae, encode, decode, encoder, decoder, likelihood, image_shape, n_dims,
    latent_dim, device).

    The latent code, for `encode`/`decode` (and so `evaluate.active_units` and
    `generate.interpolations`), is every group's latent flattened and concatenated, top group
    first: `latent_dim` is its length (not the config's latent_dim, the channels of one group).
    encode(x) runs the top-down pass with each z_i at its posterior mean, so it returns the
    means and log-variances of q(z_i | x, z_<i = their means); decode(code) runs the top-down
    pass with those z's. decode(encode(x)[0]) is therefore the posterior-mean reconstruction, and
    interpolating two codes moves every group at once.
    """

    def __init__(self, encoder: BottomUp, decoder: TopDown, likelihood: Likelihood,
                 image_shape: tuple[int, int, int]):
        super().__init__(encoder, decoder, likelihood, image_shape)
        self.latent_dim = sum(math.prod(s) for s in decoder.group_shapes)

    @property
    def n_groups(self) -> int:
        return len(self.decoder.group_shapes)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (B,C,H,W) -> posterior means and log-variances of all groups along the mean path,
        each (B, latent_dim) (see the class docstring)."""
        _, stats = self.decoder(self.encoder(x), posterior_mean=True)
        return (torch.cat([s.q_mean.flatten(1) for s in stats], 1),
                torch.cat([s.q_logvar.flatten(1) for s in stats], 1))

    def split(self, code: Tensor) -> list[Tensor]:
        """A flat code (B, latent_dim) -> each group's z (B, latent_dim_group, h, w)."""
        sizes = [math.prod(s) for s in self.decoder.group_shapes]
        return [c.view(code.shape[0], *s)
                for c, s in zip(code.split(sizes, dim=1), self.decoder.group_shapes)]

    def decode(self, code: Tensor) -> Tensor:
        """A flat code (B, latent_dim) -> likelihood parameters (B, P, H, W)."""
        return self.decoder(z=self.split(code))[0]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Negative ELBO per image (nats) and its parts: `loss`, `rate` (sum of the groups' KLs),
        `distortion`, all (B,); `kl` (B, groups), nats per group (free bits act per group);
        `bpd` where the likelihood is discrete."""
        params, stats = self.decoder(self.encoder(x))
        # KL and likelihood in float32 even under bf16 autocast: log-probs need the precision.
        distortion = self.likelihood.nll(params.float(), x)
        kl = torch.stack([gaussian_kl(*(t.float() for t in (s.q_mean, s.q_logvar, s.p_mean,
                                                             s.p_logvar))) for s in stats], 1)
        return self.negative_elbo(distortion, kl)

    def penalty(self) -> Tensor:
        """No weight penalty (the study's latent L2 belongs to its single latent layer)."""
        return torch.zeros((), device=self.device)

    def prior_params(self, n: int, *, temperature: float | Sequence[float],
                     generator: torch.Generator | None) -> Tensor:
        """The top-down pass from the prior, z_i ~ p(z_i | z_<i) with its std scaled by
        `temperature` (one number, or one per group, top first); 0 takes the prior means, so
        `sample` at temperature 0 with mean=True is deterministic."""
        return self.decoder(n=n, temperature=temperature, generator=generator)[0]

    @torch.no_grad()
    def iwae(self, x: Tensor, k: int, *, max_batch: int = 512) -> Tensor:
        """Importance-weighted estimate of log p(x) per image in nats, (B,) (Burda et al. 2016),
        log w = log p(x|z) + sum_i [log p(z_i|z_<i) - log q(z_i|x,z_<i)] with z ~ q. The encoder
        runs once; the top-down pass runs on at most `max_batch` images at a time."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        acts = self.encoder(x)
        b = x.shape[0]
        chunk = max(1, max_batch // b)
        log_w = []
        for start in range(0, k, chunk):
            c = min(chunk, k - start)
            params, stats = self.decoder([a.repeat(c, 1, 1, 1) for a in acts])
            log_px = -self.likelihood.nll(params.float(), x.repeat(c, 1, 1, 1))
            log_pq = sum(log_normal(s.z.float(), s.p_mean.float(), s.p_logvar.float())
                         - log_normal(s.z.float(), s.q_mean.float(), s.q_logvar.float())
                         for s in stats)
            log_w.append((log_px + log_pq).view(c, b))
        return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(k)


def hier_nets(depth: int, *, stochastic_layers: int, width: float, latent_dim: int, channels: int,
              image_size: int, out_channels: int, block: str, shortcut: str, preact: bool,
              upsample: str, zero_init_residual: bool, latent_l2: tuple[float, float]
              ) -> tuple[BottomUp, TopDown]:
    """The bottom-up encoder and top-down decoder of arch 'hier' (see the module docstring)."""
    del preact, upsample  # always pre-activation; the state is upsampled by nearest neighbour
    if any(latent_l2):
        raise ConfigError("latent_l2 is the study's penalty on its one latent layer; arch 'hier' "
                         f"has none (got {list(latent_l2)})")
    layout = hier_layout(depth, stochastic_layers, block)
    cls = BLOCKS[block]
    planes = max(1, round(HIER_BASE * width / cls.expansion))
    w = planes * cls.expansion
    opts = dict(block=cls, shortcut=shortcut, preact=True, norm=_no_norm, act=nn.GELU, bias=True)
    sizes = level_sizes(image_size)
    encoder = BottomUp(channels, w, planes, layout["encoder_blocks"], **opts)
    decoder = TopDown(sizes, w, planes, latent_dim, layout["groups"], layout["decoder_blocks"],
                      out_channels, image_size, **opts)
    for net, n_blocks in ((encoder, sum(layout["encoder_blocks"])),
                          (decoder, sum(layout["decoder_blocks"]))):
        init_weights(net, "kaiming")
        residual_scale_(net, n_blocks)  # VDVAE: each block's last conv * sqrt(1/blocks)
    groups = [m for m in decoder.modules() if isinstance(m, LatentGroup)]
    for g in groups:
        nn.init.xavier_uniform_(g.posterior[1].weight)  # q near the prior, as nets' latent layer
        nn.init.zeros_(g.prior[1].weight)  # p = N(0, I) and no state update at first (VDVAE)
        g.z_proj.weight.data.mul_(math.sqrt(1.0 / len(groups)))  # VDVAE's z_proj scaling
    if zero_init_residual:  # every residual branch starts at zero (Goyal et al. 2017)
        for m in list(encoder.modules()) + list(decoder.modules()):
            if hasattr(m, "zero_init_last") and getattr(m, "shortcut", None) is not None:
                m.zero_init_last()
        for g in groups:
            nn.init.zeros_(g.z_proj.weight)
    return encoder, decoder


__all__ = ["HierVAE", "BottomUp", "TopDown", "LatentGroup", "GroupStats", "hier_nets",
           "hier_layout", "level_sizes", "gaussian_kl", "log_normal", "HIER_BASE"]
