import math

import pytest
import torch

from resvae import build_vae
from resvae.hier import HierVAE
from resvae.vae import VAE
from resvae.vae_base import BaseVAE


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


@pytest.mark.parametrize("arch, cls", [("study", VAE), ("resnet", VAE), ("hier", HierVAE)])
def test_every_arch_builds_a_base_vae_with_one_sample_and_reconstruct(arch, cls):
    # build_vae's return annotation (BaseVAE) holds for every arch, and sampling and
    # reconstruction are the base class's, written once, not overridden per model.
    opts = {"study": {}, "resnet": {"block": "basic"}, "hier": {"stochastic_layers": 4}}[arch]
    vae = build_vae(arch=arch, depth=28 if arch != "resnet" else 20, width=1 / 16, latent_dim=4,
                    **opts).eval()
    assert type(vae) is cls and isinstance(vae, BaseVAE)
    assert cls.sample is BaseVAE.sample and cls.reconstruct is BaseVAE.reconstruct
    assert vae.device == torch.device("cpu") and vae.n_dims == 3 * 32 * 32
    assert vae.sample(2).shape == vae.reconstruct(torch.rand(2, 3, 32, 32)).shape == (2, 3, 32, 32)


def _spread_posterior(vae):
    # Move the encoder's latent layer off its near-prior init, so q(z|x) has means in [-2, 2] and
    # log-variances in [-2, 1.5]: a KL formula with a wrong term cannot hide behind KL ~ 0.
    with torch.no_grad():
        vae.encoder.latent.bias.copy_(torch.tensor([-2.0, -0.5, 0.7, 2.0, -2.0, 1.5, 0.3, -1.0]))
    return vae


def test_forward_kl_matches_monte_carlo_of_the_encoders_posterior():
    vae = _spread_posterior(tiny())
    x = torch.rand(2, 3, 32, 32)
    out = vae(x)
    mean, logvar = vae.encode(x)
    # Independent estimate, per image and latent dim: E_q[log q(z|x) - log p(z)], z drawn by
    # torch.distributions (not VAE.reparameterize).
    torch.manual_seed(1)
    q = torch.distributions.Normal(mean.detach(), torch.exp(0.5 * logvar.detach()))
    z = q.sample((200_000,))
    terms = q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)
    mc, se = terms.mean(0), terms.std(0) / math.sqrt(len(terms))
    assert out["kl"].shape == (2, 4)
    assert ((out["kl"] - mc).abs() < 4 * se).all(), (out["kl"], mc, se)
    torch.testing.assert_close(out["rate"], out["kl"].sum(1))


def test_forward_kl_is_the_analytic_kl_of_the_encoder():
    vae = _spread_posterior(tiny())
    x = torch.rand(2, 3, 32, 32)
    mean, logvar = vae.encode(x)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, torch.exp(0.5 * logvar)),
        torch.distributions.Normal(0.0, 1.0))
    out = vae(x)
    torch.testing.assert_close(out["kl"], expected)
    torch.testing.assert_close(out["rate"], expected.sum(1))


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


def test_iwae_k1000_in_chunks_is_the_unchunked_value():
    vae = tiny()
    x = torch.rand(2, 3, 32, 32)  # two images: a mix-up of images across chunks would show
    # max_batch=240: 8 chunks of 120 samples and a short last one of 40. Premise: each chunk draws
    # a multiple of 16 normals (120 or 40 samples x 2 images x 4 latents), and the CPU generator
    # fills normals 16 at a time, so the chunks' draws are the one draw's, in order. Same seed,
    # same samples: only the chunking differs.
    torch.manual_seed(7)
    whole = torch.randn(1000, 2, 4)
    torch.manual_seed(7)
    assert torch.equal(torch.cat([torch.randn(c, 2, 4) for c in [120] * 8 + [40]]), whole)
    with torch.no_grad():
        torch.manual_seed(7)
        chunked = vae.iwae(x, 1000, max_batch=240)
        torch.manual_seed(7)
        unchunked = vae.iwae(x, 1000, max_batch=2000)
    assert chunked.shape == (2,) and torch.isfinite(chunked).all()
    torch.testing.assert_close(chunked, unchunked)  # float32 defaults: summation order only
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
