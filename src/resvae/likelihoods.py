"""Pixel likelihoods p(x | z) for 8-bit images, kept separate from the networks.

Conventions: ``x`` is (B, C, H, W) in [0, 1] on the grid k/255; the decoder emits
``params`` of shape (B, n_params(C), H, W); every ``nll`` is per image, in nats, shape (B,),
summed over C*H*W.
"""
from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError

__all__ = [
    "Likelihood", "Bernoulli", "Gaussian", "DiscretizedLogistic", "DiscretizedMixLogistic",
    "LIKELIHOODS", "make_likelihood", "bits_per_dim",
]


class Likelihood(nn.Module):
    """Base class. ``discrete`` is True when ``nll`` is (a bound on) -log P(8-bit x)."""

    discrete: bool = False

    def n_params(self, channels: int) -> int:
        raise NotImplementedError

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        raise NotImplementedError

    def images(self, params: Tensor, *, mean: bool,
               generator: torch.Generator | None = None) -> Tensor:
        """Images in [0, 1] from parameters: the likelihood's mean (what the study's grids
        show), or pixels drawn from it."""
        return self.mean(params) if mean else self.sample(params, generator)

    def _channels(self, params: Tensor) -> int:
        per = self.n_params(1)
        if params.dim() != 4 or params.shape[1] % per:
            raise ValueError(f"params must be (B, {per}*C, H, W), got {tuple(params.shape)}")
        return params.shape[1] // per

    def _check(self, params: Tensor, x: Tensor) -> None:
        want = (x.shape[0], self.n_params(x.shape[1]), *x.shape[2:])
        if x.dim() != 4 or tuple(params.shape) != want:
            raise ValueError(f"params {tuple(params.shape)} do not fit x {tuple(x.shape)}: "
                             f"expected {want}")


def _uniform(shape, like: Tensor, generator, eps: float = 1e-6) -> Tensor:
    # Kept away from 0 and 1 so log(u) and log(1-u) stay finite.
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    return u.clamp(eps, 1.0 - eps)


class Bernoulli(Likelihood):
    """Per-dimension Bernoulli on logits; params (B, C, H, W).

    Reproduces the original study's loss (Keras ``3072 * binary_crossentropy`` on
    32x32x3 images, i.e. BCE summed over dimensions) for comparability with its Table 1.
    It is NOT a normalised likelihood of 8-bit data (x is not binary), so ``discrete`` is
    False and bits/dim computed from it means nothing.
    """

    discrete = False

    def n_params(self, channels: int) -> int:
        return channels

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        self._check(params, x)
        bce = F.binary_cross_entropy_with_logits(params, x, reduction="none")
        return bce.flatten(1).sum(1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        # Honest draws: binary images. Use ``mean`` for something to look at.
        return torch.bernoulli(torch.sigmoid(params), generator=generator)

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)


class Gaussian(Likelihood):
    """Gaussian density on uniformly dequantized pixels y = (255 x + u) / 256.

    ``std > 0``: fixed std, params = mean (B, C, H, W).
    ``std == 0``: learned, params = cat([mean, log_std], dim=1) -> (B, 2C, H, W).
    """

    discrete = True  # exact level masses in eval, a dequantization bound in training
    LOG_STD_MIN, LOG_STD_MAX = -7.0, 2.0

    def __init__(self, std: float = 0.0):
        super().__init__()
        std = float(std)
        if not math.isfinite(std) or std < 0:
            raise ConfigError(f"gaussian: std must be >= 0 (0 = learned), got {std}")
        self.std = std

    def extra_repr(self) -> str:
        return f"std={self.std}" if self.std > 0 else "std=learned"

    def n_params(self, channels: int) -> int:
        return channels if self.std > 0 else 2 * channels

    def _mu_log_std(self, params: Tensor) -> tuple[Tensor, Tensor]:
        c = self._channels(params)
        if self.std > 0:
            return params, torch.full_like(params, math.log(self.std))
        # Clamp for stability: sigma -> 0 on a constant pixel sends the nll to -inf.
        return params[:, :c], params[:, c:].clamp(self.LOG_STD_MIN, self.LOG_STD_MAX)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        """Training: the dequantization bound (smooth, cheap). Eval: the exact mass of each
        8-bit level, so reported bits/dim are a proper likelihood, never above the bound."""
        self._check(params, x)
        mu, log_std = self._mu_log_std(params)
        if not self.training:
            return -self._log_mass(mu, log_std, x).flatten(1).sum(1)
        # Dequantization (Theis et al. 2016): with u ~ U(0,1), E_u[-log p(y)] + D log 256
        # upper-bounds -log P(x_8bit), since each of the 256 bins has width 1/256 in y.
        y = (255.0 * x + torch.rand_like(x)) / 256.0
        z = (y - mu) * torch.exp(-log_std)
        nll = 0.5 * z.square() + log_std + 0.5 * math.log(2 * math.pi) + math.log(256.0)
        return nll.flatten(1).sum(1)

    @staticmethod
    def _log_mass(mu: Tensor, log_std: Tensor, x: Tensor) -> Tensor:
        """log P(level) = log(Phi(b) - Phi(a)) over the level's bin [k/256, (k+1)/256) in y;
        the first and last bins take the tails, so the 256 masses sum to 1."""
        k = torch.round(255.0 * x)
        inv = torch.exp(-log_std)
        a = torch.where(k > 0, (k / 256.0 - mu) * inv, torch.full_like(mu, -math.inf))
        b = torch.where(k < 255, ((k + 1) / 256.0 - mu) * inv, torch.full_like(mu, math.inf))
        # Phi(b) - Phi(a) = Phi(-a) - Phi(-b): take the side where the CDFs are small, so the
        # difference never cancels (log_ndtr is accurate deep in the tails).
        flip = a > 0
        lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
        log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
        return log_hi + torch.log1p(-torch.exp(log_lo - log_hi))

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        mu, log_std = self._mu_log_std(params)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        y = (mu + torch.exp(log_std) * eps).clamp(0.0, 1.0)
        # Invert the dequantization: bin k covers y in [k/256, (k+1)/256).
        return torch.floor(256.0 * y).clamp(0.0, 255.0) / 255.0

    def mean(self, params: Tensor) -> Tensor:
        return self._mu_log_std(params)[0].clamp(0.0, 1.0)


def _logistic_log_mass(xs: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(level xs) under a logistic(means, exp(log_scales)) discretized to 256 levels.

    Everything in [-1, 1] data units (xs = 2x - 1): each level's bin has half-width 1/255,
    and the edge bins absorb the tails, x = -1 taking CDF(upper edge) and x = +1 taking
    1 - CDF(lower edge), so the 256 probabilities sum to exactly 1 (PixelCNN++).
    """
    inv_s = torch.exp(-log_scales)
    plus_in = inv_s * (xs - means + 1.0 / 255.0)   # standardized upper bin edge
    min_in = inv_s * (xs - means - 1.0 / 255.0)    # standardized lower bin edge
    log_cdf_plus = F.logsigmoid(plus_in)
    log_one_minus_cdf_min = F.logsigmoid(-min_in)
    # Interior bins: sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)) has
    # no cancellation in either tail, so the PixelCNN++ fallback (log pdf at the bin centre +
    # log bin width when cdf_delta < 1e-5) is not needed and its approximation error is avoided.
    log_mid = (log_cdf_plus + log_one_minus_cdf_min
               + torch.log(-torch.expm1(inv_s * (-2.0 / 255.0))))
    return torch.where(xs < -0.999, log_cdf_plus,
                       torch.where(xs > 0.999, log_one_minus_cdf_min, log_mid))


def _logistic_level(means: Tensor, log_scales: Tensor, generator) -> Tensor:
    """One draw from the discretized logistic of ``_logistic_log_mass``: its level 0..255 (float).

    A continuous logistic draw rounded to the nearest level is exactly that distribution: level
    k's bin is [k - 0.5, k + 0.5] on the 0..255 scale, and clamping sends the tails to the edges.
    """
    u = _uniform(means.shape, means, generator)
    xs = (means + torch.exp(log_scales) * (torch.log(u) - torch.log1p(-u))).clamp(-1.0, 1.0)
    return torch.round((xs + 1.0) * 127.5)


def _gumbel_pick(logits: Tensor, generator) -> Tensor:
    """One-hot along dim 1 of a component drawn from softmax(logits, 1) (Gumbel-max)."""
    gumbel = -torch.log(-torch.log(_uniform(logits.shape, logits, generator)))
    return F.one_hot((logits + gumbel).argmax(1), logits.shape[1]).movedim(-1, 1).to(logits)


def _check_n_mix(name: str, n_mix) -> int:
    if isinstance(n_mix, bool) or int(n_mix) != n_mix or n_mix < 1:
        raise ConfigError(f"{name}: n_mix must be a positive integer, got {n_mix!r}")
    return int(n_mix)


# Scales below e^-7 (~1e-3, an eighth of a bin) buy nothing and destabilise training (PixelCNN++).
LOG_SCALE_MIN = -7.0


class DiscretizedLogistic(Likelihood):
    """Discretized mixture of logistics over 256 levels (PixelCNN++, Salimans et al. 2017).

    Channels are independent (no autoregressive RGB coefficients, as in VDVAE's decoder
    without them; Child 2021): each channel has its own K-component mixture.
    Layout: params.view(B, 3, K, C, H, W) -> [:, 0] logits, [:, 1] means (in [-1, 1] data
    units), [:, 2] log-scales; i.e. params = cat([logits, means, log_scales], dim=1), each
    (B, K*C, H, W) with component-major order (index k*C + c).
    """

    discrete = True

    def __init__(self, n_mix: int = 10):
        super().__init__()
        self.n_mix = _check_n_mix("dlogistic", n_mix)

    def extra_repr(self) -> str:
        return f"n_mix={self.n_mix}"

    def n_params(self, channels: int) -> int:
        return 3 * self.n_mix * channels

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self._channels(params)
        b, _, h, w = params.shape
        p = params.reshape(b, 3, self.n_mix, c, h, w)
        return p[:, 0], p[:, 1], p[:, 2].clamp(min=LOG_SCALE_MIN)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """Per-dimension log P(x), shape (B, C, H, W)."""
        self._check(params, x)
        logits, means, log_scales = self._split(params)  # each (B, K, C, H, W)
        xs = (2.0 * x - 1.0).unsqueeze(1)                 # [-1, 1], bins of width 2/255
        log_p = _logistic_log_mass(xs, means, log_scales)
        return torch.logsumexp(log_p + F.log_softmax(logits, dim=1), dim=1)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        return -self.log_prob(params, x).flatten(1).sum(1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        logits, means, log_scales = self._split(params)
        pick = _gumbel_pick(logits, generator)  # one component per (B, C, H, W)
        level = _logistic_level((means * pick).sum(1), (log_scales * pick).sum(1), generator)
        return level / 255.0

    def mean(self, params: Tensor) -> Tensor:
        logits, means, _ = self._split(params)
        m = (torch.softmax(logits, dim=1) * means).sum(1)
        return ((m + 1.0) / 2.0).clamp(0.0, 1.0)


class DiscretizedMixLogistic(Likelihood):
    """PixelCNN++'s discretized logistic mixture with channel dependence (Salimans et al. 2017,
    sec. 2.2; VDVAE's ``DmolNet``).

    Per pixel, one K-component mixture over the whole colour: the component is shared by the
    channels. Within component k the channels are discretized logistics whose means depend
    linearly on the channels before them, conditioned on the observed values:
    mu_c = m_c + sum_{j<c} tanh(a_cj) x_j, so for RGB mu_G = m_G + a*R, mu_B = m_B + b*R + c*G.
    One channel has no coefficients (it is then ``dlogistic`` with one channel).
    Layout (component-major, C(C-1)/2 coefficients ordered (1,0), (2,0), (2,1), ...):
    params = cat([logits (K), means (K*C, index k*C + c), log_scales (K*C),
    coeffs (K*C(C-1)/2, index k*P + p)], dim=1); for RGB 10K channels, as in PixelCNN++.
    """

    discrete = True

    def __init__(self, n_mix: int = 10):
        super().__init__()
        self.n_mix = _check_n_mix("dmol", n_mix)

    def extra_repr(self) -> str:
        return f"n_mix={self.n_mix}"

    def n_params(self, channels: int) -> int:
        return self.n_mix * (1 + 2 * channels + channels * (channels - 1) // 2)

    def _channels(self, params: Tensor) -> int:
        n = params.shape[1] if params.dim() == 4 else -1
        for c in range(1, n + 1):  # n_params grows with c: at most one fits
            if self.n_params(c) == n:
                return c
        raise ValueError(f"params must be (B, n_mix*(1 + 2C + C(C-1)/2), H, W) for C channels: "
                         f"{self.n_params(1)} for one, {self.n_params(3)} for RGB; "
                         f"got {tuple(params.shape)}")

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """logits (B, K, H, W); means, log_scales (B, K, C, H, W); tanh'd coeffs (B, K, P, H, W)."""
        c, k = self._channels(params), self.n_mix
        b, _, h, w = params.shape
        logits, means, log_scales, coeffs = params.split([k, k * c, k * c, k * c * (c - 1) // 2], 1)
        means = means.reshape(b, k, c, h, w)
        log_scales = log_scales.reshape(b, k, c, h, w).clamp(min=LOG_SCALE_MIN)
        return logits, means, log_scales, torch.tanh(coeffs.reshape(b, k, -1, h, w))

    @staticmethod
    def _offset(coeffs: Tensor, xs: list[Tensor], c: int) -> Tensor | int:
        """Channel c's mean shift sum_{j<c} coeff_(c,j) * xs[j]; 0 for the first channel."""
        first = c * (c - 1) // 2
        return sum(coeffs[:, :, first + j] * xs[j] for j in range(c))

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """Per-pixel log P(colour), shape (B, H, W): the channels' joint, not a product of marginals."""
        self._check(params, x)
        logits, means, log_scales, coeffs = self._split(params)
        xs = (2.0 * x - 1.0).unsqueeze(1)  # (B, 1, C, H, W) in [-1, 1]
        observed = list(xs.unbind(2))
        mu = torch.stack([means[:, :, c] + self._offset(coeffs, observed, c)
                          for c in range(means.shape[2])], 2)
        log_p = _logistic_log_mass(xs, mu, log_scales).sum(2)  # (B, K, H, W): one component
        return torch.logsumexp(log_p + F.log_softmax(logits, dim=1), dim=1)

    def nll(self, params: Tensor, x: Tensor) -> Tensor:
        return -self.log_prob(params, x).flatten(1).sum(1)

    def sample(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a component per pixel, then the channels in order, each conditioned on the
        quantized levels drawn before it: an exact draw from the distribution ``nll`` scores."""
        logits, means, log_scales, coeffs = self._split(params)
        pick = _gumbel_pick(logits, generator).unsqueeze(2)   # (B, K, 1, H, W)
        means, log_scales, coeffs = ((t * pick).sum(1, keepdim=True)
                                     for t in (means, log_scales, coeffs))
        drawn, levels = [], []
        for c in range(means.shape[2]):
            level = _logistic_level(means[:, :, c] + self._offset(coeffs, drawn, c),
                                    log_scales[:, :, c], generator)
            drawn.append(2.0 * level / 255.0 - 1.0)
            levels.append(level)
        return torch.stack(levels, 2).squeeze(1) / 255.0

    def mean(self, params: Tensor) -> Tensor:
        """The mixture mean of the continuous model (channel means propagated through the
        coefficients), clamped to [0, 1]."""
        logits, means, _, coeffs = self._split(params)
        cond: list[Tensor] = []  # per component, each channel's mean given the ones before it
        for c in range(means.shape[2]):
            cond.append(means[:, :, c] + self._offset(coeffs, cond, c))
        m = (torch.softmax(logits, dim=1).unsqueeze(2) * torch.stack(cond, 2)).sum(1)
        return ((m + 1.0) / 2.0).clamp(0.0, 1.0)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": Bernoulli,
    "gaussian": Gaussian,
    "dlogistic": DiscretizedLogistic,
    "dmol": DiscretizedMixLogistic,
}


def make_likelihood(name: str, **options) -> Likelihood:
    """Build a likelihood by name; each class accepts only its own options."""
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}")
    cls = LIKELIHOODS[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise TypeError(f"likelihood {name!r} got unknown option(s) {unknown}; "
                        f"it accepts {allowed or 'no options'}")
    return cls(**options)


def bits_per_dim(nll_nats: Tensor, n_dims: int) -> Tensor:
    """Convert per-image nats to bits per dimension: nll / (n_dims * ln 2)."""
    return nll_nats / (n_dims * math.log(2.0))
