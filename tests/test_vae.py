import math

import pytest
import torch

from resvae import VAE, build_vae


def tiny(likelihood="dlogistic", **kw):
    torch.manual_seed(0)
    vae = build_vae(arch="resnet", depth=20, width=1 / 16, latent_dim=4, block="basic", likelihood=likelihood,
                    n_mix=2, **kw)
    return vae.eval()


def test_forward_keys_and_bpd():
    vae = tiny()
    x = torch.rand(3, 3, 32, 32)
    out = vae(x)
    for key in ("loss", "rate", "distortion", "bpd"):
        assert out[key].shape == (3,) and torch.isfinite(out[key]).all()
    torch.testing.assert_close(out["loss"], out["rate"] + out["distortion"])
    torch.testing.assert_close(out["bpd"], out["loss"] / (3 * 32 * 32 * math.log(2)))
    assert "bpd" not in tiny("bernoulli")(x)  # BCE is no likelihood of 8-bit data


def test_analytic_kl_matches_monte_carlo():
    torch.manual_seed(1)
    mean, logvar = torch.randn(1, 6), torch.randn(1, 6)
    analytic = (0.5 * (mean.square() + logvar.exp() - 1 - logvar)).sum()
    z = VAE.reparameterize(mean.expand(200_000, 6), logvar.expand(200_000, 6))
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(0.0, 1.0)
    mc = (q.log_prob(z) - p.log_prob(z)).sum(1)
    assert abs(mc.mean() - analytic) < 4 * mc.std() / math.sqrt(len(mc))


def test_forward_kl_is_the_analytic_kl_of_the_encoder():
    vae = tiny()
    x = torch.rand(2, 3, 32, 32)
    mean, logvar = vae.encode(x)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
        torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(vae(x)["rate"], expected)


def test_iwae_k1_is_the_elbo_in_expectation():
    vae = tiny()
    torch.manual_seed(2)
    x = torch.rand(2, 3, 32, 32).repeat(300, 1, 1, 1)
    with torch.no_grad():
        elbo = -vae(x)["loss"]
        iw1 = vae.iwae(x, 1)
    diff = iw1 - elbo  # same expectation, different (MC vs analytic KL) noise
    assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff)) + 1e-3


def test_iwae_is_tighter_than_the_elbo():
    vae = tiny()
    torch.manual_seed(3)
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        elbo = torch.stack([-vae(x)["loss"] for _ in range(64)]).mean(0)
        iw = vae.iwae(x, 64, max_batch=32)  # forces chunking
    assert iw.shape == (4,)
    assert iw.mean() >= elbo.mean()


def test_iwae_k1000_fits_in_chunks():
    vae = tiny()
    with torch.no_grad():
        ll = vae.iwae(torch.rand(1, 3, 32, 32), 1000, max_batch=250)
    assert ll.shape == (1,) and torch.isfinite(ll).all()
    with pytest.raises(ValueError):
        vae.iwae(torch.rand(1, 3, 32, 32), 0)


def test_sample_reconstruct_and_penalty():
    vae = tiny(latent_l2=(0.01, 0.1))
    x = torch.rand(2, 3, 32, 32)
    assert vae.sample(5).shape == (5, 3, 32, 32)
    r = vae.reconstruct(x)
    assert r.shape == x.shape and r.min() >= 0 and r.max() <= 1
    w, b, n = vae.encoder.latent.weight, vae.encoder.latent.bias, 4
    expected = 0.01 * (w[:n].square().sum() + b[:n].square().sum()) + 0.1 * (
        w[n:].square().sum() + b[n:].square().sum())
    torch.testing.assert_close(vae.penalty(), expected)
    assert tiny().penalty() == 0


def test_gradients_flow_to_encoder_and_decoder():
    vae = tiny().train()
    vae(torch.rand(2, 3, 32, 32))["loss"].mean().backward()
    assert vae.encoder.latent.weight.grad.abs().sum() > 0
    assert vae.decoder.out.weight.grad.abs().sum() > 0
