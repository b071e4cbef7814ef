"""Tests for arch "hier" (resvae.hier): the depth / stochastic-layer layout, exact shapes and
parameter counts, the per-group KL against Monte Carlo, temperature sampling, the IWAE bound,
encode/decode semantics, and training (a few steps, a 100-layer one, `train()` end to end with
eval / sample / reconstruct / interpolate on the run)."""

import importlib
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import small_load
from PIL import Image
from torch import nn

import resvae.step as S
import resvae.vae as V
from resvae import build_vae, load_run
from resvae.checkpoints import save_pretrained
from resvae.cli import main
from resvae.config import ConfigError, resolve
from resvae.evaluate import active_mask, active_units, active_units_per_group, eval_run
from resvae.generate import interpolate_run, interpolations, reconstruct_run, sample_run
from resvae.hier import HierVAE, LatentGroup, hier_layout, level_sizes
from resvae.nets import count_layers
from resvae.sweep import load_sweep_file
from resvae.vae import model_info

T = importlib.import_module("resvae.train")  # the module: resvae.train is the function


def tiny(seed=0, **kw):
    """A 28-layer, 4-group hier VAE with 32 channels and 4 latent channels per group."""
    torch.manual_seed(seed)
    opts = dict(arch="hier", depth=28, stochastic_layers=4, width=0.25, latent_dim=4,
                likelihood="dlogistic", n_mix=2)
    return build_vae(**{**opts, **kw}).eval()


def spread_heads(vae, scale=0.3):
    # Move prior and posterior heads off their init (the prior starts at exactly N(0, I)), so a
    # KL or log-density with a wrong term cannot hide behind p = N(0, 1) or q ~ p.
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in vae.decoder.modules():
            if isinstance(m, LatentGroup):
                for head in (m.prior[1], m.posterior[1]):
                    head.weight.copy_(scale * torch.randn(head.weight.shape, generator=g))
                    head.bias.copy_(0.5 * torch.randn(head.bias.shape, generator=g))
    return vae


# ----------------------------------------------------------------------------- layout and depth

def test_layout_rule():
    assert hier_layout(28, 4) == {"groups": [1, 1, 1, 1], "encoder_blocks": [1, 1, 1],
                                  "decoder_blocks": [1, 1, 1]}
    # 100 = 2 + 2*10 + 3*26: 13 blocks a side, extras and groups to the lowest resolutions first
    assert hier_layout(100, 10) == {"groups": [3, 3, 2, 2], "encoder_blocks": [5, 4, 4],
                                    "decoder_blocks": [5, 4, 4]}
    # an odd block count gives the decoder the extra one; basic blocks are 2 layers
    assert hier_layout(31, 4) == {"groups": [1, 1, 1, 1], "encoder_blocks": [1, 1, 1],
                                  "decoder_blocks": [2, 1, 1]}
    assert hier_layout(24, 5, "basic")["groups"] == [2, 1, 1, 1]
    assert level_sizes(32) == [1, 4, 8, 16] and level_sizes(28) == [1, 4, 7, 14]


@pytest.mark.parametrize("depth,message", [(29, "nearest valid: 28 or 31"),
                                           (20, "nearest valid: 28")])
def test_unreachable_depth_names_the_nearest(depth, message):
    with pytest.raises(ValueError, match=message):
        hier_layout(depth, 4)


@pytest.mark.parametrize("depth,groups,block", [(28, 4, "bottleneck"), (31, 4, "bottleneck"),
                                                (100, 10, "bottleneck"), (24, 5, "basic"),
                                                (102, 12, "basic")])
def test_depth_is_the_longest_path(depth, groups, block):
    vae = build_vae(arch="hier", depth=depth, stochastic_layers=groups, block=block, width=1 / 16,
                    latent_dim=2, likelihood="dlogistic", n_mix=1)
    assert count_layers(vae.encoder) + count_layers(vae.decoder) == depth
    assert model_info(vae)["layers"] == depth
    assert vae.n_groups == groups


def test_stochastic_layers_is_for_hier_only():
    with pytest.raises(ConfigError, match="stochastic_layers.*only arch 'hier'"):
        resolve(environ={}, overrides={"arch": "resnet", "stochastic_layers": 8})
    with pytest.raises(ConfigError, match="stochastic_layers"):
        resolve(environ={}, overrides={"arch": "hier", "stochastic_layers": 0})
    assert resolve(environ={}, overrides={"arch": "hier", "stochastic_layers": 8}).model.arch == "hier"
    with pytest.raises(ValueError, match="latent_l2"):
        build_vae(arch="hier", latent_l2=[0.01, 0.1])


# ----------------------------------------------------------------------------- shapes and counts

def test_default_build_and_shapes():
    # The brief's no-argument build: ModelConfig's depth 28, width 1 (128 channels), latent 256
    # channels per group, 4 groups at 1, 4, 8, 16.
    vae = build_vae(arch="hier", likelihood="dlogistic")
    assert isinstance(vae, HierVAE)
    assert vae.decoder.group_shapes == [(256, 1, 1), (256, 4, 4), (256, 8, 8), (256, 16, 16)]
    assert vae.latent_dim == 256 * (1 + 16 + 64 + 256)
    info = model_info(vae)
    assert info["layers"] == 28
    assert (info["encoder_params"], info["decoder_params"]) == (89_408, 1_130_536)
    assert 0.1e9 < info["flops"] < 0.5e9
    acts = vae.encoder(torch.rand(2, 3, 32, 32))
    assert [tuple(a.shape) for a in acts] == [(2, 128, s, s) for s in (1, 4, 8, 16)]


def _bottleneck(c, p):  # preact, no norm, biases: 1x1 c->p, 3x3 p->p, 1x1 p->c
    return (c * p + p) + (9 * p * p + p) + (p * c + c)


def test_parameter_count_by_parts():
    vae = tiny()  # c = 32 channels, bottleneck planes 8, latent 4, 4 groups, n_mix 2
    c, p, zc, P = 32, 8, 4, 3 * 2 * 3
    encoder = (3 * 9 * c + c) + 3 * _bottleneck(c, p) + 2 * (c * c + c)  # stem, blocks, 2 strided
    group = (2 * c * 2 * zc + 2 * zc) + (c * (2 * zc + c) + 2 * zc + c) + (zc * c + c)  # q, p, z
    decoder = c * (1 + 16 + 64 + 256) + 4 * group + 3 * _bottleneck(c, p) + (c * 4 * P + 4 * P)
    info = model_info(vae)
    assert (encoder, decoder) == (6_416, 24_568)
    assert (info["encoder_params"], info["decoder_params"]) == (encoder, decoder)


def test_second_configuration_shapes_and_counts():
    # basic blocks, one channel, 28x28 (MNIST unpadded): sizes 14, 7, 4, 1; crop back to 28
    torch.manual_seed(0)
    vae = build_vae(arch="hier", depth=36, stochastic_layers=10, block="basic", width=0.125,
                    latent_dim=2, channels=1, image_size=28, likelihood="dlogistic", n_mix=1)
    assert vae.decoder.group_shapes == [(2, s, s) for s in (1, 1, 1, 4, 4, 4, 7, 7, 14, 14)]
    info = model_info(vae)
    assert (info["layers"], info["encoder_params"], info["decoder_params"]) == (36, 14_624, 28_156)
    x = torch.rand(3, 1, 28, 28)
    out = vae(x)
    assert out["kl"].shape == (3, 10) and out["loss"].shape == (3,)
    assert vae.sample(2).shape == (2, 1, 28, 28) and vae.reconstruct(x).shape == x.shape
    assert vae.encode(x)[0].shape == (3, vae.latent_dim) == (3, 2 * (3 + 3 * 16 + 2 * 49 + 2 * 196))


# ----------------------------------------------------------------------------- the objective

def test_forward_parts():
    vae = spread_heads(tiny())
    out = vae(torch.rand(3, 3, 32, 32))
    assert out["kl"].shape == (3, 4) and (out["kl"] >= 0).all()
    torch.testing.assert_close(out["rate"], out["kl"].sum(1))
    torch.testing.assert_close(out["loss"], out["rate"] + out["distortion"])
    torch.testing.assert_close(out["bpd"], out["loss"] / (3 * 32 * 32 * math.log(2)))


def test_kl_per_group_matches_monte_carlo():
    # forward's analytic KL of group i is taken at sampled z_<i; so is log q(z_i) - log p(z_i) at
    # the sampled z_i, from the same pass. Over many passes their difference averages to zero.
    vae = spread_heads(tiny(channels=1, image_size=16))
    x = torch.rand(1, 1, 16, 16).repeat(4000, 1, 1, 1)
    with torch.no_grad():
        torch.manual_seed(1)
        kl = vae(x)["kl"]
        torch.manual_seed(1)  # the same draws again, now keeping z and both distributions
        _, stats = vae.decoder(vae.encoder(x))
    mc = torch.stack([torch.distributions.Normal(s.q_mean, torch.exp(0.5 * s.q_logvar)).log_prob(s.z)
                      .flatten(1).sum(1)
                      - torch.distributions.Normal(s.p_mean, torch.exp(0.5 * s.p_logvar)).log_prob(s.z)
                      .flatten(1).sum(1) for s in stats], 1)
    diff = (kl - mc).double()
    se = diff.std(0) / math.sqrt(len(diff))
    assert (kl.mean(0) > 1.0).all()  # a real KL in every group, not ~0
    assert (diff.mean(0).abs() < 4 * se).all(), (kl.mean(0), mc.mean(0), se)


def test_iwae_k1_is_the_elbo_in_expectation_and_k64_is_above_it():
    vae = spread_heads(tiny(channels=1, image_size=16), scale=0.1)
    x1 = torch.rand(2, 1, 16, 16)
    torch.manual_seed(2)
    with torch.no_grad():
        x = x1.repeat(500, 1, 1, 1)
        diff = vae.iwae(x, 1) + vae(x)["loss"]  # same expectation, MC vs analytic KL noise
        assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(len(diff))
        elbo = -vae(x1.repeat(64, 1, 1, 1))["loss"].view(64, 2).mean(0)
        iw = vae.iwae(x1, 64, max_batch=40)  # forces chunking
    assert iw.shape == (2,) and (iw >= elbo).all(), (iw, elbo)


# ----------------------------------------------------------------------------- sampling, codes

def test_temperature_zero_is_deterministic_and_per_group():
    vae = spread_heads(tiny())

    def sample(t, seed):
        return vae.sample(3, temperature=t, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0.0, 1), sample(0.0, 2))
    assert torch.equal(sample([0.0] * 4, 1), sample(0.0, 2))
    assert not torch.equal(sample(1.0, 1), sample(1.0, 2))
    assert torch.equal(sample(1.0, 1), sample(1.0, 1))
    # only the last (16x16) group at temperature 1: differs from all-zero, and between seeds
    last = [0.0, 0.0, 0.0, 1.0]
    assert not torch.equal(sample(last, 1), sample(0.0, 1))
    assert not torch.equal(sample(last, 1), sample(last, 2))
    with pytest.raises(ValueError, match="one per group"):
        sample([1.0, 1.0], 1)


def test_decoder_is_the_generator():
    vae = tiny()
    calls = []
    vae.decoder.register_forward_hook(lambda module, args, out: calls.append(out))
    vae.sample(2)
    assert len(calls) == 1
    assert {id(p) for p in vae.decoder.parameters()} <= {id(p) for p in vae.parameters()}


def test_encode_decode_is_the_posterior_mean_path():
    vae = spread_heads(tiny())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        mean, logvar = vae.encode(x)
        assert mean.shape == logvar.shape == (2, vae.latent_dim)
        # the posterior-mean pass, group by group, is what encode flattens
        _, stats = vae.decoder(vae.encoder(x), posterior_mean=True)
        torch.testing.assert_close(vae.split(mean), [s.q_mean for s in stats])
        assert all(torch.equal(s.z, s.q_mean) for s in stats)
        # decoding that code gives the same parameters as the pass that made it
        torch.testing.assert_close(vae.decode(mean), vae.decoder(vae.encoder(x),
                                                                 posterior_mean=True)[0])
        torch.testing.assert_close(vae.reconstruct(x), vae.likelihood.mean(vae.decode(mean)))
    grid = interpolations(vae, (torch.rand(4, 3, 32, 32) * 255).to(torch.uint8).numpy(), steps=3)
    assert grid.shape == (6, 3, 32, 32)


def test_active_units_over_the_flat_code_in_batches():
    # active_units accumulates the variance batch by batch (a hier code is long): the count must
    # equal the one from all codes at once, at thresholds that split the units differently.
    vae = spread_heads(tiny(channels=1, image_size=16))
    images = (torch.rand(23, 1, 16, 16) * 255).to(torch.uint8).numpy()
    with torch.no_grad():
        var = vae.encode(torch.from_numpy(images).float() / 255)[0].double().var(0)
    for threshold in (1e-3, 0.01, 0.1, 1.0):
        expected = int((var > threshold).sum())
        assert active_units(vae, images, batch_size=5, threshold=threshold) == expected
    assert 0 < int((var > 0.01).sum()) < vae.latent_dim
    # per group: the flat code split at the groups' sizes, top group first
    mask = active_mask(vae, images, batch_size=5)
    sizes = [math.prod(s) for s in vae.decoder.group_shapes]
    per_group = active_units_per_group(vae, mask)
    assert per_group == [int(m.sum()) for m in (var > 0.01).split(sizes)]
    assert len(per_group) == vae.n_groups and sum(per_group) == active_units(vae, images)


# ----------------------------------------------------------------------------- training

def hier_cfg(**overrides):
    base = {"arch": "hier", "depth": 28, "stochastic_layers": 4, "block": "bottleneck",
            "width": 0.125, "latent_dim": 4, "subset": 64, "batch_size": 16, "device": "cpu",
            "max_epochs": 1}
    return resolve(preset="tiny", environ={}, overrides={**base, **overrides})


def test_a_few_steps_lower_the_loss(small_runs):
    cfg = hier_cfg(lr=3e-3)
    torch.manual_seed(0)
    vae = V.build_from_config(cfg, (3, 32, 32))
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr)
    x = torch.from_numpy(small_load("shapes", subset=64).train.images[:16]).float() / 255

    def loss():
        torch.manual_seed(1)
        with torch.no_grad():
            return vae(x)["loss"].mean().item()

    before = loss()
    steps = [S.training_step(vae, vae, x, opt, cfg.train) for _ in range(10)]
    assert not any(s["skipped"] for s in steps)
    assert loss() < 0.98 * before, (before, loss())  # the same z draws: no noise in the change


@pytest.mark.parametrize("free_bits", [0.0, 2.0])
def test_hundred_layers_ten_groups_train_without_nan(small_runs, free_bits):
    cfg = hier_cfg(depth=104, stochastic_layers=12, width=0.0625, lr=2e-3, grad_clip=200.0,
                   free_bits=free_bits)
    torch.manual_seed(0)
    vae = V.build_from_config(cfg, (3, 32, 32))
    assert model_info(vae)["layers"] == 104 and vae.n_groups == 12
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr)
    images = small_load("shapes", subset=64).train.images
    for i in range(5):
        x = torch.from_numpy(images[16 * (i % 4):16 * (i % 4 + 1)]).float() / 255
        s = S.training_step(vae, vae, x, opt, cfg.train)
        assert not s["skipped"] and all(math.isfinite(s[k]) for k in ("loss", "rate", "grad_norm"))
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_train_end_to_end_then_eval_and_images(small_runs, tmp_path):
    cfg = hier_cfg()
    summary = T.train(cfg, tmp_path / "run")
    assert summary["stop_reason"] == "max_epochs" and summary["layers"] == 28
    assert math.isfinite(summary["test_loss"]) and summary["test_bpd"] > 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["val_loss"]) and record["rate"] > 0

    data = small_load("shapes", subset=64)
    r = eval_run(tmp_path / "run", k=8, n=6, batch_size=3, data=data)
    assert r["n_images"] == 6 and r["iwae_nats"] <= r["elbo_nats"] + 3 * r["elbo_nats_se"]
    assert r["latent_dim"] == 4 * (1 + 16 + 64 + 256)
    # A known count: the run's weights with the posterior heads of the two lowest-resolution
    # groups (4 channels at 1x1 and at 4x4: 4 + 64 units) reading their input with large
    # weights, and those of the other two zeroed to a constant mean (a bias alone).
    vae, cfg = load_run(tmp_path / "run")
    groups = [m for m in vae.decoder.modules() if isinstance(m, LatentGroup)]
    assert [s[1:] for s in vae.decoder.group_shapes] == [(1, 1), (4, 4), (8, 8), (16, 16)]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, group in enumerate(groups):
            head = group.posterior[1]
            head.weight.copy_(2 * torch.randn(head.weight.shape, generator=g) * (i < 2))
    # (scale 2: the least varying of the 68 means has variance 0.47 on these images, far over the
    # 0.01 threshold; a scale of 10 overflowed the state, and NaN means count as inactive)
    evaluated = data.test.images[[0, 13, 25, 38, 50, 63]]  # eval_run's 6 evenly spaced
    with torch.no_grad():
        assert vae.encode(torch.from_numpy(evaluated).float() / 255)[0].isfinite().all()
    save_pretrained(vae, cfg, tmp_path / "hand")
    r = eval_run(tmp_path / "hand", k=2, n=6, batch_size=3, data=data)
    assert r["active_units"] == 4 + 4 * 16

    cell = 32 + 1  # 32x32 images with 1-pixel gutters
    for path, fn, kw, size in [("s.png", sample_run, {"n": 4}, (4 * cell + 1, cell + 1)),
                               # 10 images and their 10 reconstructions: 2 rows of 10
                               ("r.png", reconstruct_run, {"n": 10}, (10 * cell + 1, 2 * cell + 1)),
                               ("i.png", interpolate_run, {"pairs": 2, "steps": 3},
                                (3 * cell + 1, 2 * cell + 1))]:
        assert Image.open(fn(tmp_path / "run", tmp_path / path, **kw)).size == size


def test_preset_and_gpu_sweep_are_valid():
    vae = V.build_from_config(resolve(preset="cpu", environ={}), (3, 32, 32))
    info = model_info(vae)
    # dmol head: 5 components x 10 parameters (dlogistic would be 5 x 9: 822,644)
    assert (info["layers"], info["params"], vae.n_groups) == (40, 823_944, 10)
    spec = load_sweep_file(Path(__file__).resolve().parents[1] / "sweeps" / "hier-gpu.toml")
    assert len(spec.points()) == 12
    for point in spec.points():  # every grid point is a reachable depth (building them is slow)
        m = resolve(preset=spec.preset, environ={}, overrides={**spec.fixed, **point}).model
        layout = hier_layout(m.depth, m.stochastic_layers, m.block)
        assert sum(layout["groups"]) == point["stochastic_layers"]


def test_cli_info_hier(capsys):
    assert main(["info", "--arch", "hier", "--depth", "28,100", "--stochastic-layers", "4",
                 "--width", "0.25", "--latent-dim", "8", "--likelihood", "dlogistic",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["arch"], r["depth"], r["layers"]) for r in rows] == [("hier", 28, 28),
                                                                    ("hier", 100, 100)]
    assert main(["info", "--arch", "hier", "--depth", "29"]) == 2
    assert "nearest valid: 28 or 31" in capsys.readouterr().err


def test_init_vdvae_scaling_and_zero_init_residual():
    vae = tiny(depth=31)  # 3 encoder blocks, 4 decoder blocks
    plain = tiny(depth=31, zero_init_residual=True)
    blocks = [m for m in vae.decoder.modules() if hasattr(m, "zero_init_last")]
    groups = [m for m in vae.decoder.modules() if isinstance(m, LatentGroup)]
    assert len(blocks) == 4 and len(groups) == 4
    # prior heads start at zero: p = N(0, I) and no state update
    assert all(g.prior[1].weight.abs().sum() == 0 for g in groups)
    # zero_init_residual: every block's branch and every z projection start at zero, so at init
    # the samples cannot depend on z (nor blocks change the state)
    assert all(b.conv3.weight.abs().sum() == 0 for b in
               [m for m in plain.modules() if hasattr(m, "zero_init_last")])
    assert all(g.z_proj.weight.abs().sum() == 0 for g in plain.decoder.modules()
               if isinstance(g, LatentGroup))
    a, b = (plain.sample(2, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert torch.equal(a, b)
    a, b = (vae.sample(2, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.equal(a, b)


def test_no_batchnorm_anywhere():
    # BatchNorm statistics of the posterior pass would not fit the prior pass of sampling.
    vae = tiny()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in vae.modules())
