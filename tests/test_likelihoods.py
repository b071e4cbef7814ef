import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from resvae import build_vae
from resvae.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    DiscretizedLogistic,
    DiscretizedMixLogistic,
    Gaussian,
    bits_per_dim,
    make_likelihood,
)

ALL = [("bernoulli", {}), ("gaussian", {}), ("gaussian", {"std": 0.1}),
       ("dlogistic", {}), ("dlogistic", {"n_mix": 1}), ("dmol", {}), ("dmol", {"n_mix": 1})]


def images(b=2, c=3, h=4, w=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, c, h, w), generator=g).to(dtype) / 255
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 0.0, 1.0  # both edges present
    return x


def all_levels(dtype=torch.float64):
    return (torch.arange(256, dtype=dtype) / 255).view(256, 1, 1, 1)


def dlogistic_params(n_mix, mean_shift, log_scale, seed=0, dtype=torch.float64):
    """One pixel's params, repeated for each of the 256 levels: (256, 3K, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(1, 3, n_mix, 1, 1, 1, generator=g, dtype=dtype)
    p[:, 0] *= 3
    p[:, 1] = 0.5 * p[:, 1] + mean_shift
    p[:, 2] = 0.3 * p[:, 2] + log_scale
    return p.view(1, 3 * n_mix, 1, 1).expand(256, -1, -1, -1)


# --- dlogistic --------------------------------------------------------------------------

@pytest.mark.parametrize("n_mix", [1, 5, 10])
@pytest.mark.parametrize("log_scale", [-12.0, -7.0, -4.0, -1.0, 1.0, 6.0])
@pytest.mark.parametrize("mean_shift", [-3.0, -1.0, 0.003, 0.7, 1.0, 3.0])
def test_dlogistic_sums_to_one(n_mix, log_scale, mean_shift):
    lik = DiscretizedLogistic(n_mix)
    p = dlogistic_params(n_mix, mean_shift, log_scale)
    total = lik.nll(p, all_levels()).neg().exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-5)


def test_dlogistic_sums_to_one_float32():
    lik = DiscretizedLogistic(10)
    p = dlogistic_params(10, 0.2, -3.0).float()
    total = lik.nll(p, all_levels(torch.float32)).neg().exp().sum().item()
    assert total == pytest.approx(1.0, abs=1e-4)


def pixelcnnpp_log_prob(lik, params, x):
    """Reference: PixelCNN++ / VDVAE formula, independent channels."""
    logits, means, log_scales = lik._split(params)
    xs = (2 * x - 1).unsqueeze(1)
    c, inv = xs - means, torch.exp(-log_scales)
    plus_in, min_in = inv * (c + 1 / 255), inv * (c - 1 / 255)
    cdf_delta = torch.sigmoid(plus_in) - torch.sigmoid(min_in)
    mid = inv * c
    log_pdf_mid = mid - log_scales - 2 * F.softplus(mid)
    inner = torch.where(cdf_delta > 1e-5, torch.log(cdf_delta.clamp(min=1e-12)),
                        log_pdf_mid - math.log(127.5))
    lp = torch.where(xs < -0.999, plus_in - F.softplus(plus_in),
                     torch.where(xs > 0.999, -F.softplus(min_in), inner))
    return torch.logsumexp(lp + F.log_softmax(logits, 1), 1)


def test_dlogistic_matches_pixelcnnpp_reference():
    lik = DiscretizedLogistic(4)
    x = images(b=3, c=3, h=6, w=6, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    p = torch.randn(3, lik.n_params(3), 6, 6, generator=g, dtype=torch.float64)
    p[:, 2 * 4 * 3:] -= 2.0  # moderately sharp components
    ours, ref = lik.log_prob(p, x), pixelcnnpp_log_prob(lik, p, x)
    # Identical wherever the reference does not fall back to its pdf approximation.
    assert torch.allclose(ours, ref, atol=1e-4)
    assert ours.exp().le(1 + 1e-12).all()


def test_dlogistic_layout():
    # params.view(B, 3, K, C, H, W): logits, means, log-scales.
    lik = DiscretizedLogistic(2)
    p = torch.zeros(1, lik.n_params(3), 1, 1)
    p = p.view(1, 3, 2, 3, 1, 1)
    p[:, 1, :, 0], p[:, 1, :, 1], p[:, 1, :, 2] = -1.0, 0.0, 1.0  # per-channel means
    p[:, 2] = -7.0
    p = p.view(1, 18, 1, 1)
    assert torch.allclose(lik.mean(p).flatten(), torch.tensor([0.0, 0.5, 1.0]))
    s = lik.sample(p, generator=torch.Generator().manual_seed(0)).flatten()
    assert s.tolist() == pytest.approx([0.0, 0.5, 1.0], abs=1 / 255)


# --- dmol: mixture with RGB dependence -----------------------------------------------------

def dmol_params(n_mix, b=1, h=1, w=1, seed=0, dtype=torch.float64, log_scale=-2.5, spread=1.0):
    """Random (B, 10K, H, W) params; spread=1: means past the edges, strong coeffs, sharp scales."""
    g = torch.Generator().manual_seed(seed)
    k = n_mix
    logits = 2 * torch.randn(b, k, h, w, generator=g, dtype=dtype)
    means = 0.8 * spread * torch.randn(b, 3 * k, h, w, generator=g, dtype=dtype)
    log_scales = log_scale + 1.5 * spread * torch.randn(b, 3 * k, h, w, generator=g, dtype=dtype)
    coeffs = 2 * spread * torch.randn(b, 3 * k, h, w, generator=g, dtype=dtype)
    return torch.cat([logits, means, log_scales, coeffs], 1)


def joint_params():
    """One pixel, K=2: a sharp component (R below the clamp) and a broad one, both with strong
    coefficients (G|R, B|R, B|G): (1, 20, 1, 1) float64."""
    p = dmol_params(2, seed=3)
    p[:, 8:14] = torch.tensor([-9.0, -4.0, -7.0, -1.0, -3.0, -5.0]).view(1, 6, 1, 1)
    p[:, 14:20] = torch.tensor([2.0, -1.0, 1.5, -2.0, 0.5, 1.0]).view(1, 6, 1, 1)
    return p


def red_green_part(p, k):
    """The 2-channel params of RGB params' R and G: the model the (R, G) marginal must be."""
    logits, means, log_scales, coeffs = p.split([k, 3 * k, 3 * k, 3 * k], 1)
    first = [t.unflatten(1, (k, 3))[:, :, :n].flatten(1, 2)
             for t, n in ((means, 2), (log_scales, 2), (coeffs, 1))]
    return torch.cat([logits, *first], 1)


def two_channel_joint(lik, p):
    """P(r, g) of all 256^2 colours of a 2-channel pixel, as one 256x256 image: (256 R, 256 G)."""
    lv = torch.arange(256, dtype=p.dtype) / 255
    x = torch.stack([lv.view(256, 1).expand(256, 256), lv.view(1, 256).expand(256, 256)])
    return lik.log_prob(p.expand(1, -1, 256, 256), x.unsqueeze(0))[0].exp()


def rgb_joint(lik, p):
    """P(r, g, b) of all 256^3 colours (16.7M): per pair of R, the (G, B) as one 256x256 image."""
    lv = torch.arange(256, dtype=p.dtype) / 255
    masses = []
    for r in range(0, 256, 2):  # chunks of 2 x 65536 colours, small enough to stay in cache
        x = torch.stack(torch.broadcast_tensors(lv[r:r + 2].view(2, 1, 1), lv.view(1, 256, 1),
                                                lv.view(1, 1, 256)), 1)  # (2, 3, 256, 256)
        masses.append(lik.log_prob(p.expand(2, -1, 256, 256), x).exp())
    return torch.cat(masses)


def assert_draws_match(draws, masses):
    """Means and pairwise cross moments of draws (N, C) within 5 s.e. of those of masses (256,)*C."""
    c = draws.shape[1]
    lv = torch.arange(256, dtype=torch.float64) / 255
    axes = [lv.view([-1 if d == i else 1 for d in range(c)]) for i in range(c)]
    for idx in [(i,) for i in range(c)] + list(itertools.combinations(range(c), 2)):
        want = (masses * math.prod(axes[i] for i in idx)).sum().item()
        got = math.prod(draws[:, i] for i in idx)
        se = got.std().item() / math.sqrt(len(got))
        assert abs(got.mean().item() - want) < 5 * se, (idx, got.mean().item(), want, se)


@pytest.mark.parametrize("log_scale,spread,seed", [(-2.5, 1.0, 0), (-5.0, 1.0, 1), (0.0, 1.0, 2),
                                                   (-1.0, 0.3, 3)])
def test_dmol_two_channel_joint_sums_to_one(log_scale, spread, seed):
    # Exhaustive over all 256^2 colours of a pixel with G depending on R: the joint, not each
    # channel on its own, is what must sum to 1 (the RGB case, 256^3, is the slow test below).
    lik = DiscretizedMixLogistic(3)
    assert lik.n_params(2) == 3 * (1 + 2 + 2 + 1)
    p = red_green_part(dmol_params(3, seed=seed, log_scale=log_scale, spread=spread), 3)
    masses = two_channel_joint(lik, p)
    assert masses.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert masses.min() > 0  # also the unlikely colours: every log-mass is finite


@pytest.mark.slow  # 16.7M colours: 5-20 s on 2 shared cores
def test_dmol_rgb_joint_sums_to_one_and_is_what_sample_draws():
    lik, p = DiscretizedMixLogistic(2), joint_params()
    masses = rgb_joint(lik, p)
    assert masses.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert masses.min() > 0
    # 100k draws against the exact means and R-G, R-B, G-B cross moments of the joint.
    draws = lik.sample(p.expand(100_000, -1, -1, -1), torch.Generator().manual_seed(0))
    assert_draws_match(draws.flatten(1), masses)


def test_dmol_samples_follow_the_joint():
    # The exact (R, G) joint of the RGB model is the 2-channel model of its R and G params:
    # draws of both match its moments, which the G-on-R dependence sets.
    lik, p = DiscretizedMixLogistic(2), joint_params()
    p_rg = red_green_part(p, 2)
    masses = two_channel_joint(lik, p_rg)
    lv = torch.arange(256, dtype=torch.float64) / 255
    mean_r, mean_g = (masses.sum(1) * lv).sum(), (masses.sum(0) * lv).sum()
    cov = (masses * lv.view(-1, 1) * lv).sum() - mean_r * mean_g
    assert abs(cov) > 0.03  # the channels really are dependent
    for params in (p_rg, p):
        draws = lik.sample(params.expand(100_000, -1, -1, -1), torch.Generator().manual_seed(0))
        assert torch.equal(draws * 255, torch.round(draws * 255))
        assert_draws_match(draws.flatten(1)[:, :2], masses)


def to_pixelcnnpp_layout(params, k):
    """Ours (B, 10K, H, W) -> PixelCNN++'s l (B, H, W, 10K): K logits, then per channel slot
    [K means, K log-scales, K coeffs] (coeff slots: G on R, B on R, B on G)."""
    b, _, h, w = params.shape
    logits, means, log_scales, coeffs = params.split([k, 3 * k, 3 * k, 3 * k], 1)
    rest = torch.cat([t.reshape(b, k, 3, h, w) for t in (means, log_scales, coeffs)], 1)
    rest = rest.permute(0, 3, 4, 2, 1).reshape(b, h, w, 9 * k)  # (B, H, W, 3, 3K) flattened
    return torch.cat([logits.permute(0, 2, 3, 1), rest], -1)


def pixelcnnpp_dmol_log_prob(x, l):  # noqa: E741 (the original's names)
    """Reference: PixelCNN++'s discretized_mix_logistic_loss (pixel_cnn_pp/nn.py, as in VDVAE),
    line by line in torch, returning per-pixel log-probs instead of the summed loss, and where
    its approximate mid-bin fallback (cdf_delta < 1e-5) was taken. x (B, H, W, 3) in [-1, 1]."""
    xs = list(x.shape)
    nr_mix = l.shape[-1] // 10
    logit_probs = l[:, :, :, :nr_mix]
    l = l[:, :, :, nr_mix:].reshape(xs + [nr_mix * 3])  # noqa: E741
    means = l[:, :, :, :, :nr_mix]
    log_scales = torch.clamp(l[:, :, :, :, nr_mix:2 * nr_mix], min=-7.0)
    coeffs = torch.tanh(l[:, :, :, :, 2 * nr_mix:3 * nr_mix])
    x = x.reshape(xs + [1]) + torch.zeros(xs + [nr_mix], dtype=x.dtype)
    m2 = (means[:, :, :, 1, :] + coeffs[:, :, :, 0, :] * x[:, :, :, 0, :]).unsqueeze(3)
    m3 = (means[:, :, :, 2, :] + coeffs[:, :, :, 1, :] * x[:, :, :, 0, :]
          + coeffs[:, :, :, 2, :] * x[:, :, :, 1, :]).unsqueeze(3)
    means = torch.cat([means[:, :, :, 0:1, :], m2, m3], 3)
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    plus_in = inv_stdv * (centered_x + 1.0 / 255.0)
    cdf_plus = torch.sigmoid(plus_in)
    min_in = inv_stdv * (centered_x - 1.0 / 255.0)
    cdf_min = torch.sigmoid(min_in)
    log_cdf_plus = plus_in - softplus(plus_in)  # edge case of 0
    log_one_minus_cdf_min = -softplus(min_in)  # edge case of 255
    cdf_delta = cdf_plus - cdf_min
    mid_in = inv_stdv * centered_x
    log_pdf_mid = mid_in - log_scales - 2.0 * softplus(mid_in)
    log_probs = torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min,
                    torch.where(cdf_delta > 1e-5, torch.log(torch.clamp(cdf_delta, min=1e-12)),
                                log_pdf_mid - math.log(127.5))))
    log_probs = log_probs.sum(3) + torch.log_softmax(logit_probs, -1)
    out = torch.logsumexp(log_probs, -1)
    # A pixel is approximated where a component that took the fallback (in any channel) carries
    # more than e^-30 of its probability (the fallback is off by a few nats at most).
    fallback = ((x.abs() <= 0.999) & (cdf_delta <= 1e-5)).any(3)  # (B, H, W, K)
    return out, (fallback & (log_probs > out.unsqueeze(-1) - 30)).any(-1)


def softplus(t):
    # Exact log(1 + e^t); F.softplus switches to t above 20, which costs e^-20 ~ 2e-9.
    return torch.logaddexp(torch.zeros_like(t), t)


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("log_scale,spread", [(-0.5, 0.3), (-2.5, 1.0)])
def test_dmol_matches_pixelcnnpp_reference(log_scale, spread, dtype, rtol):
    k = 5
    lik = DiscretizedMixLogistic(k)
    p = dmol_params(k, b=4, h=8, w=8, seed=1, log_scale=log_scale, spread=spread)
    x = lik.sample(p, torch.Generator().manual_seed(2))  # likely pixels: mostly exact in the ref
    x[0, :, 0, 0], x[0, :, 0, 1] = 0.0, 1.0
    assert x.eq(0).any(1).float().mean() > 0.1 and x.eq(1).any(1).float().mean() > 0.1  # edges
    ref, fallback = pixelcnnpp_dmol_log_prob(2 * x.permute(0, 2, 3, 1) - 1,
                                             to_pixelcnnpp_layout(p, k))
    ours = lik.log_prob(p.to(dtype), x.to(dtype)).double()
    assert ours.shape == (4, 8, 8)
    exact = ~fallback
    assert exact.float().mean() > (0.99 if spread < 1 else 0.5)
    torch.testing.assert_close(ours[exact], ref[exact], rtol=rtol, atol=rtol)
    # Where the reference approximates a small bin by its mid-point density, ours is exact and
    # the two differ by about that approximation's error.
    assert torch.isfinite(ours).all() and (ours <= 0).all()
    if spread == 1.0:
        assert fallback.any() and (ours[fallback] - ref[fallback]).abs().max() < 0.01


def test_dmol_edges_exact_against_reference():
    # All 8 corners of the colour cube, with sharp components far from or at the edges: the
    # reference's edge branches are exact, and so must ours be, down to masses of e^-2000.
    k = 3
    lik = DiscretizedMixLogistic(k)
    corners = torch.tensor([[r, g, b] for r in (0, 1) for g in (0, 1) for b in (0, 1)],
                           dtype=torch.float64)
    x = corners.T.reshape(1, 3, 1, 8).expand(6, -1, -1, -1).contiguous()
    p = dmol_params(k, b=6, h=1, w=8, seed=2, log_scale=-7.0)
    p[:, k:4 * k] *= torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0]).view(6, 1, 1, 1)  # means
    ref, fallback = pixelcnnpp_dmol_log_prob(2 * x.permute(0, 2, 3, 1) - 1,
                                             to_pixelcnnpp_layout(p, k))
    ours = lik.log_prob(p, x)
    assert not fallback.any()
    assert ours.min() < -1000  # really deep in the tails
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_dmol_edges_by_hand():
    lik = DiscretizedMixLogistic(1)
    # layout for K=1: logit, means R G B, log-scales R G B, coeffs (G|R, B|R, B|G)
    a = 0.6  # tanh of the G-on-R coefficient
    p = torch.tensor([0.0, -1.1, 1.1 + a, -1.0, -7.0, -7.0, -7.0, math.atanh(a), 0.0, 0.0],
                     dtype=torch.float64).view(1, 10, 1, 1)
    x = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).view(1, 3, 1, 1)
    # In [-1, 1] units. R: mean -1.1, past the lower edge, so P(R=0) ~ 1. G: mean 1.1 + a + a*R,
    # i.e. 1.1 (past the upper edge: P(G=255) ~ 1) only if conditioned on the observed R = -1.
    # B: mean exactly at level 0, so P(B=0) = sigmoid(e^7 / 255), which is all that is left.
    want = math.log(1 / (1 + math.exp(-math.exp(7) / 255)))
    assert lik.log_prob(p, x).item() == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert lik.nll(p, x).item() == pytest.approx(0.0134, abs=1e-4)
    # The other edge of B: the mass 1 - sigmoid((2 - 1/255) e^7), about e^-2188.
    x[0, 2] = 1.0
    assert lik.nll(p, x).item() == pytest.approx(math.exp(7) * (2 - 1 / 255), rel=1e-9)
    # And the mean that the observed R implies: G sits at the top, R and B at the bottom.
    assert lik.mean(p).flatten().tolist() == pytest.approx([0.0, 1.0, 0.0], abs=1e-12)


def test_dmol_one_channel_is_dlogistic():
    # With C=1 there are no coefficients and both layouts are [logits, means, log-scales].
    dmol, dlog = DiscretizedMixLogistic(4), DiscretizedLogistic(4)
    assert dmol.n_params(1) == dlog.n_params(1) == 12
    p = torch.randn(3, 12, 4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = images(b=3, c=1, dtype=torch.float64)
    torch.testing.assert_close(dmol.nll(p, x), dlog.nll(p, x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dmol.mean(p), dlog.mean(p))
    s = dmol.sample(p, torch.Generator().manual_seed(1))
    assert torch.equal(s, dlog.sample(p, torch.Generator().manual_seed(1)))
    total = dmol.nll(p[:1, :, :1, :1].expand(256, -1, -1, -1), all_levels()).neg().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-12)


def test_dmol_n_params_and_layout_errors():
    assert DiscretizedMixLogistic().n_params(3) == 100  # PixelCNN++'s 10 per component
    assert DiscretizedMixLogistic(5).n_params(1) == 15
    with pytest.raises(ValueError, match="n_mix"):
        DiscretizedMixLogistic(0)
    with pytest.raises(ValueError):
        DiscretizedMixLogistic(2).mean(torch.zeros(1, 21, 2, 2))
    with pytest.raises(ValueError):
        DiscretizedMixLogistic(2).nll(torch.zeros(1, 20, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dmol_gradients_finite_for_extreme_params(dtype):
    lik = DiscretizedMixLogistic(3)
    x = images(b=4, c=3, h=4, w=5, dtype=dtype)
    x[1], x[2] = 0.0, 1.0
    g = torch.Generator().manual_seed(6)
    p = torch.randn(4, 30, 4, 5, generator=g, dtype=dtype)
    p[:, :3] *= 40                     # logits: one component takes all the weight
    p[:, 3:12] *= 15                   # means far outside [-1, 1]
    p[:, 12:21] = p[:, 12:21] * 8 - 4  # log-scales from far below the clamp to e^20
    p[:, 21:] *= 30                    # saturated coefficients
    p.requires_grad_()
    nll = lik.nll(p, x)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(p.grad).all()
    assert p.grad[:, 12:21].abs().sum() > 0


def test_dmol_a_tiny_vae_learns():
    torch.manual_seed(0)
    vae = build_vae(arch="resnet", depth=20, width=1 / 16, latent_dim=4, block="basic",
                    likelihood="dmol", n_mix=2)
    assert vae.decode(torch.zeros(2, 4)).shape == (2, 20, 32, 32)
    # 8 smooth colour images: horizontal ramps between random colours.
    g = torch.Generator().manual_seed(1)
    lo, hi = torch.rand(2, 8, 3, 1, 1, generator=g)
    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32)
    x = torch.round(255 * (lo + (hi - lo) * ramp).expand(-1, -1, 32, -1)) / 255
    opt = torch.optim.Adam(vae.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = vae(x)["loss"].mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert math.isfinite(last) and last < 0.92 * first, losses  # 0.87 when written


# --- bernoulli --------------------------------------------------------------------------

def test_bernoulli_hand_computation():
    logits = torch.tensor([-2.0, 0.0, 0.5, 3.0]).view(1, 4, 1, 1)
    x = torch.tensor([0.0, 1.0, 100 / 255, 1.0]).view(1, 4, 1, 1)
    want = 0.0
    for lg, xi in zip(logits.flatten().tolist(), x.flatten().tolist()):
        p = 1 / (1 + math.exp(-lg))
        want -= xi * math.log(p) + (1 - xi) * math.log(1 - p)
    got = Bernoulli().nll(logits, x)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_bernoulli_matches_study_formula():
    x = images(b=1, c=3, h=32, w=32)
    logits = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    study = 3072 * F.binary_cross_entropy(torch.sigmoid(logits), x)  # Keras: mean over dims
    assert Bernoulli().nll(logits, x).item() == pytest.approx(study.item(), rel=1e-5)
    assert Bernoulli.discrete is False


# --- gaussian ---------------------------------------------------------------------------

def _phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_gaussian_fixed_std_hand_formula_eval():
    # Eval: the exact mass of the pixel's bin [k/256, (k+1)/256), edge bins taking the tails.
    lik = Gaussian(std=0.1).eval()
    x = torch.tensor([0.0, 1.0, 37 / 255]).view(1, 3, 1, 1)
    mu = torch.tensor([0.1, 0.9, 0.2]).view(1, 3, 1, 1)
    want = 0.0
    for m, xi in zip(mu.flatten().tolist(), x.flatten().tolist()):
        k = round(255 * xi)
        hi = 1.0 if k == 255 else _phi(((k + 1) / 256 - m) / 0.1)
        lo = 0.0 if k == 0 else _phi((k / 256 - m) / 0.1)
        want -= math.log(hi - lo)
    assert lik.nll(mu, x).item() == pytest.approx(want, rel=1e-5)
    assert lik.n_params(3) == 3 and Gaussian.discrete is True


def test_gaussian_learned_params_and_formula():
    lik = Gaussian().eval()
    assert lik.n_params(1) == 2 and lik.n_params(3) == 6
    x = images(b=2, c=3).double()
    g = torch.Generator().manual_seed(3)
    p = torch.rand(2, 6, 4, 5, generator=g, dtype=torch.float64)
    p[:, 3:] = p[:, 3:] * 6 - 3  # log-stds in [-3, 3]: some beyond the clamp at 2
    mu, std = p[:, :3], p[:, 3:].clamp(-7, 2).exp()
    # Reference in 50-digit arithmetic (mpmath ships with torch via sympy): float64 CDF
    # differences cancel in the tails.
    import mpmath

    mpmath.mp.dps = 50
    want = torch.zeros(2, dtype=torch.float64)
    for i, (m, s, xi) in enumerate(zip(mu.flatten().tolist(), std.flatten().tolist(),
                                       x.flatten().tolist())):
        k = round(255 * xi)
        hi = 1 if k == 255 else mpmath.ncdf(((k + 1) / mpmath.mpf(256) - m) / s)
        lo = 0 if k == 0 else mpmath.ncdf((k / mpmath.mpf(256) - m) / s)
        want[i // 60] -= float(mpmath.log(hi - lo))
    assert torch.allclose(lik.nll(p, x), want, rtol=1e-9)


@pytest.mark.parametrize("std,mu", [(0.3, 0.5), (0.01, 0.2), (1e-3, -0.4), (7.0, 1.3)])
def test_gaussian_eval_masses_sum_to_one(std, mu):
    lik = Gaussian(std=std).eval()
    x = (torch.arange(256, dtype=torch.float64) / 255).view(256, 1, 1, 1)
    p = torch.exp(-lik.nll(torch.full_like(x, mu), x))
    assert p.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("std,mu", [(0.02, 0.4), (0.004, 0.3926), (0.002, 0.39)])
def test_gaussian_eval_mass_is_below_the_training_bound(std, mu):
    # E_u[-log N(y)] + log 256, in closed form for y uniform on the bin (centre c, width w).
    w, c = 1 / 256, 100.5 / 256
    bound = (0.5 * ((c - mu) ** 2 + w**2 / 12) / std**2 + math.log(std)
             + 0.5 * math.log(2 * math.pi) + math.log(256))
    x = torch.full((1, 1, 1, 1), 100 / 255, dtype=torch.float64)
    exact = Gaussian(std=std).eval().nll(torch.full_like(x, mu), x).item()
    assert 0 <= exact <= bound


def test_gaussian_training_noise_vs_eval_determinism():
    lik = Gaussian()
    x = images()
    p = torch.randn(2, 6, 4, 5)
    lik.train()
    assert not torch.equal(lik.nll(p, x), lik.nll(p, x))
    lik.eval()
    assert torch.equal(lik.nll(p, x), lik.nll(p, x))


@pytest.mark.parametrize("std,mu", [(0.02, 0.4), (0.004, 0.3926), (0.002, 0.39)])
def test_gaussian_bound_is_a_bound(std, mu):
    # Training-mode nll averages to E_u[-log N(y)] + log 256, which upper-bounds the exact
    # -log P(bin) of the same Gaussian (Jensen); the bin of level k is [k/256, (k+1)/256).
    torch.manual_seed(0)
    lik = Gaussian(std=std).train()
    x = torch.full((20000, 1, 1, 1), 100 / 255, dtype=torch.float64)
    draws = lik.nll(torch.full_like(x, mu), x)
    w, c = 1 / 256, 100.5 / 256
    expected = (0.5 * ((c - mu) ** 2 + w**2 / 12) / std**2 + math.log(std)
                + 0.5 * math.log(2 * math.pi) + math.log(256))
    assert draws.mean().item() == pytest.approx(expected, abs=5 * draws.std().item() / 141)
    n = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), std)
    exact = -torch.log(n.cdf(torch.tensor(101 / 256)) - n.cdf(torch.tensor(100 / 256))).item()
    assert 0 <= exact <= expected  # a probability is at most 1; the bound holds


# --- shared behaviour -------------------------------------------------------------------

@pytest.mark.parametrize("name,opts", ALL)
def test_shapes_ranges_and_grid(name, opts):
    lik = make_likelihood(name, **opts).eval()
    x = images(b=3, c=3)
    p = torch.randn(3, lik.n_params(3), 4, 5, generator=torch.Generator().manual_seed(4))
    assert lik.nll(p, x).shape == (3,)
    for out in (lik.mean(p), lik.sample(p, generator=torch.Generator().manual_seed(5))):
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1
    s = lik.sample(p, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(s * 255, torch.round(s * 255), atol=1e-4)
    # Honors the generator.
    s2 = lik.sample(p, generator=torch.Generator().manual_seed(5))
    assert torch.equal(s, s2)


def test_n_params():
    assert Bernoulli().n_params(1) == 1 and Bernoulli().n_params(3) == 3
    assert Gaussian(std=0.1).n_params(1) == 1 and Gaussian().n_params(3) == 6
    assert DiscretizedLogistic().n_params(1) == 30 and DiscretizedLogistic(5).n_params(3) == 45
    assert DiscretizedMixLogistic().n_params(1) == 30 and DiscretizedMixLogistic(5).n_params(3) == 50


@pytest.mark.parametrize("name,opts", ALL)
def test_gradients_finite_at_edges(name, opts):
    lik = make_likelihood(name, **opts)
    x = images(b=2, c=3)
    x[0] = 0.0
    x[1] = 1.0
    p = (3 * torch.randn(2, lik.n_params(3), 4, 5)).requires_grad_()
    nll = lik.nll(p, x)
    nll.sum().backward()
    assert torch.isfinite(nll).all() and torch.isfinite(p.grad).all()


def test_make_likelihood_errors():
    with pytest.raises(ValueError) as e:
        make_likelihood("poisson")
    for key in LIKELIHOODS:
        assert key in str(e.value)
    with pytest.raises(TypeError, match="n_mix"):
        make_likelihood("gaussian", n_mix=3)
    with pytest.raises(TypeError, match="std"):
        make_likelihood("bernoulli", std=0.1)
    with pytest.raises(ValueError):
        make_likelihood("gaussian", std=-1.0)
    with pytest.raises(ValueError):
        make_likelihood("dlogistic", n_mix=0)
    assert make_likelihood("dlogistic", n_mix=3).n_mix == 3


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        DiscretizedLogistic(2).nll(torch.zeros(1, 3, 2, 2), torch.zeros(1, 3, 2, 2))


def test_bits_per_dim():
    nll = torch.tensor([3072 * math.log(2) * 4.5, 0.0])
    assert torch.allclose(bits_per_dim(nll, 3072), torch.tensor([4.5, 0.0]))
    d = 7
    assert bits_per_dim(torch.tensor([1.0]), d).item() == pytest.approx(1 / (d * math.log(2)))
