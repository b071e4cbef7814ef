import pytest
import torch
from torch import nn

from resvae import build_vae
from resvae.nets import count_layers, resnet_blocks


@pytest.mark.parametrize("depth", [28, 40, 70, 100])
def test_study_family_depths_and_shapes(depth):
    vae = build_vae(arch="study", depth=depth, width=1 / 16, latent_dim=16)
    assert count_layers(vae.encoder) + count_layers(vae.decoder) == depth
    # Main-path convs per side are 12, 18, 33, 48 (the study's layout).
    assert count_layers(vae.encoder) - 2 == (depth - 4) // 2
    x = torch.rand(2, 3, 32, 32)
    params = vae.decode(vae.encode(x)[0])
    assert params.shape == (2, 3, 32, 32)  # bernoulli: one logit per pixel and channel


def test_study_full_width_matches_the_study_layout():
    vae = build_vae()  # defaults: the study's 28-layer net
    enc, dec = vae.encoder, vae.decoder
    assert vae.latent_dim == 256 and type(vae.likelihood).__name__ == "Bernoulli"
    bns = [m for m in vae.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    convs = [m for m in vae.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert all(c.bias is not None for c in convs)  # Keras default use_bias=True
    assert enc.latent.in_features == 4 * 4 * 1024 and dec.shape == (64, 4, 4)
    widths = [stage[-1].conv3.out_channels for stage in list(dec.body)[:4]]
    assert widths == [256, 512, 1024, 2048]  # the study's decoder is widest at 32x32
    # The decoder's strided projection 1x1 convs are transposed, stride 2, n -> 2n.
    ups = [m for m in dec.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(ups) == 6 and all(m.kernel_size == (1, 1) and m.output_padding == (1, 1) for m in ups)


def test_study_rejects_other_depths():
    with pytest.raises(ValueError, match=r"\[28, 40, 70, 100\]"):
        build_vae(arch="study", depth=50)


@pytest.mark.parametrize("block,depth", [("basic", 20), ("basic", 44), ("bottleneck", 28),
                                         ("bottleneck", 106)])
def test_resnet_depth_is_exact(block, depth):
    vae = build_vae(arch="resnet", depth=depth, width=1 / 16, latent_dim=8, block=block, likelihood="dlogistic",
                    n_mix=2)
    assert count_layers(vae.encoder) + count_layers(vae.decoder) == depth
    assert vae.decode(vae.encode(torch.rand(2, 3, 32, 32))[0]).shape == (2, 3 * 3 * 2, 32, 32)


def test_resnet_unreachable_depth_names_nearest():
    with pytest.raises(ValueError, match="nearest valid: 20 or 24"):
        resnet_blocks(22, "basic")
    with pytest.raises(ValueError, match="nearest valid: 28"):
        resnet_blocks(7, "bottleneck")


def test_resnet_blocks_rule():
    assert resnet_blocks(20, "basic") == [1, 1, 1, 1]
    assert resnet_blocks(36, "basic") == [2, 2, 2, 2]
    assert resnet_blocks(28, "basic") == [1, 1, 2, 2]  # extras go to low resolution first
    assert sum(resnet_blocks(1000, "bottleneck")) == 166


@pytest.mark.parametrize("channels,size", [(1, 28), (1, 32), (3, 32)])
@pytest.mark.parametrize("arch,depth", [("study", 28), ("resnet", 20)])
def test_image_shapes(arch, depth, channels, size):
    vae = build_vae(arch=arch, depth=depth, width=1 / 16, latent_dim=4, block="basic" if arch == "resnet"
                    else "bottleneck", channels=channels, image_size=size, likelihood="dlogistic",
                    n_mix=1)
    out = vae(torch.rand(2, channels, size, size))
    assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all()
    assert vae.sample(3).shape == (3, channels, size, size)


@pytest.mark.slow  # ~2.3 s each: a 1004-layer forward and backward on 2 shared cores
@pytest.mark.parametrize("preact", [False, True])
def test_thousand_layer_resnet_trains_on_cpu(preact):
    vae = build_vae(arch="resnet", depth=1004, width=1 / 16, latent_dim=8, block="basic", preact=preact,
                    likelihood="dlogistic", n_mix=1)
    assert count_layers(vae.encoder) + count_layers(vae.decoder) == 1004
    out = vae(torch.rand(2, 3, 32, 32))
    out["loss"].mean().backward()
    first = vae.encoder.body[0][0].conv1.weight.grad
    assert first is not None and torch.isfinite(first).all() and first.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


def test_zero_init_residual_makes_blocks_identity():
    vae = build_vae(arch="resnet", depth=24, width=1 / 16, latent_dim=4, block="basic",
                    zero_init_residual=True)
    block = vae.encoder.body[3][1]  # an identity block
    assert isinstance(block.shortcut, nn.Identity)
    block.eval()
    x = torch.rand(1, block.conv1.in_channels, 4, 4)
    torch.testing.assert_close(block(x), x)


def test_plain_mode_has_same_layers_and_no_shortcuts():
    res = build_vae(arch="resnet", depth=28, width=1 / 16, latent_dim=4, block="basic")
    plain = build_vae(arch="resnet", depth=28, width=1 / 16, latent_dim=4, block="basic", shortcut="none")
    assert count_layers(res.encoder) == count_layers(plain.encoder)
    assert not any("shortcut" in n for n, _ in plain.named_modules())


def test_decoder_is_the_generator_not_a_copy():
    # The generator is vae.decoder itself: sample() runs it (not a copy made at build time), and
    # its parameters are the VAE's, so training or loading the VAE is training/loading it.
    vae = build_vae(arch="resnet", depth=20, width=1 / 16, latent_dim=4, block="basic").eval()
    gen = vae.decoder
    calls = []
    gen.register_forward_hook(lambda module, args, out: calls.append(out))
    samples = vae.sample(3, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    z = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(samples, vae.likelihood.mean(gen(z)))
    vae_params = {id(p) for p in vae.parameters()}
    assert all(id(p) in vae_params for p in gen.parameters())
    with torch.no_grad():
        gen.out.bias.add_(1.0)  # a change to the generator is a change to the VAE's samples
    assert not torch.equal(vae.sample(3, generator=torch.Generator().manual_seed(0)), samples)
    assert torch.equal(vae.state_dict()["decoder.out.bias"], gen.out.bias)
