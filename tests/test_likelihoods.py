import math

import pytest
import torch
import torch.nn.functional as F

from resvae.likelihoods import (
    LIKELIHOODS,
    Bernoulli,
    DiscretizedLogistic,
    Gaussian,
    bits_per_dim,
    make_likelihood,
)

ALL = [("bernoulli", {}), ("gaussian", {}), ("gaussian", {"std": 0.1}),
       ("dlogistic", {}), ("dlogistic", {"n_mix": 1})]


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
