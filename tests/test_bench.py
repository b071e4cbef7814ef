"""`resvae bench`: its record's keys and arithmetic, the FLOP count, variants, the command line.
Never a timing: the numbers are only checked for being measured and consistent."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from resvae import bench as B
from resvae.cli import main
from resvae.config import resolve, to_dict
from resvae.step import make_optimizer
from resvae.vae import build_from_config, eval_mode, model_info

FAST = ["--seconds", "0.3", "--matmul-size", "64", "--device", "cpu"]
KEYS = ("images_per_s", "flops_per_image", "achieved_gflops", "peak_fp32_gflops",
        "peak_bf16_gflops", "ratio_to_peak", "ratio_to_bf16_peak", "baseline_images_per_s",
        "speedup_vs_baseline", "data_batches_per_s", "data_to_step_ratio",
        "baseline_data_batches_per_s", "peak_fp32_gflops_before", "peak_fp32_gflops_after",
        "peak_bf16_gflops_before", "peak_bf16_gflops_after")


def _run(argv) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's errors
        return e.code


def _tiny(**overrides):
    return resolve(preset="tiny", environ={}, overrides={"device": "cpu", **overrides})


@pytest.fixture(scope="module")
def record():
    """One short run of the tiny model, configured bf16 + channels_last, beside plain fp32."""
    cfg = _tiny(precision="bf16", channels_last=True, batch_size=16)
    images = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    return B.bench(cfg, images, seconds=0.3, variants=(B.parse_variant("fp32"),),
                   matmul_size=64, rounds=2, profile=True)


def test_record_keys_are_measured_numbers(record):
    for key in KEYS:
        value = record[key]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, key
    assert record["config"] == to_dict(_tiny(precision="bf16", channels_last=True, batch_size=16))
    assert record["variant"] == "bf16+cl" and record["batch_size"] == 16


def test_record_arithmetic_is_consistent(record):
    r, approx = record, pytest.approx
    assert r["achieved_gflops"] == approx(r["images_per_s"] * r["flops_per_image"] / 1e9)
    assert r["ratio_to_peak"] == approx(r["achieved_gflops"] / r["peak_fp32_gflops"])
    assert r["ratio_to_bf16_peak"] == approx(r["achieved_gflops"] / r["peak_bf16_gflops"])
    assert r["peak_fp32_gflops"] == max(r["peak_fp32_gflops_before"], r["peak_fp32_gflops_after"])
    assert r["peak_bf16_gflops"] == max(r["peak_bf16_gflops_before"], r["peak_bf16_gflops_after"])
    assert r["speedup_vs_baseline"] == approx(r["images_per_s"] / r["baseline_images_per_s"])
    assert r["data_to_step_ratio"] == approx(r["data_batches_per_s"] * 16 / r["images_per_s"])
    # the configured variant, the one asked for, and the baseline, each timed in every round
    assert list(r["variants"]) == ["bf16+cl", "fp32", "baseline"]
    for name, v in r["variants"].items():
        assert len(v["round_images_per_s"]) == 2
        assert v["images_per_s"] == approx(float(np.median(v["round_images_per_s"])))
        assert v["ratio_to_peak"] == approx(v["images_per_s"] * r["flops_per_image"] / 1e9
                                            / r["peak_fp32_gflops"]), name
    assert r["variants"]["bf16+cl"]["images_per_s"] == r["images_per_s"]
    assert r["variants"]["baseline"]["images_per_s"] == r["baseline_images_per_s"]


def test_profile_and_text_report(record):
    ops = record["profile"]
    assert 0 < len(ops) <= 15 and 0 < sum(p["share"] for p in ops) <= 1 + 1e-9
    assert any("convolution" in p["op"] for p in ops)
    text = B.format_report(record)
    for line in ("bf16+cl (configured)", "baseline", "fp32 ", "top operators", "data path",
                 "convolutions alone"):
        assert line in text
    c = record["convs_alone"]
    n_convs = sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in
                  B.Runner(B.Variant(), record_cfg(record), np.zeros((8, 3, 32, 32), np.uint8),
                           torch.device("cpu")).vae.modules())
    assert c["convs"] == n_convs  # every conv of the model, each once
    # the convs' FLOPs are most of the step's counted ones (the rest: the dense layers); input
    # gradients included (captured under no_grad, every input had looked gradient-free)
    assert 0.75 * record["flops_per_image"] * record["batch_size"] <= c["flops_per_step"] \
        < record["flops_per_image"] * record["batch_size"]
    assert 0 < c["share_of_step"] and c["gflops"] > 0


def record_cfg(record):
    from resvae.config import from_dict
    return from_dict(record["config"])


class _LinearVAE(nn.Module):
    """The smallest thing training_step trains: one linear encoder, one linear decoder."""

    def __init__(self, dims: int, latent: int):
        super().__init__()
        self.enc, self.dec = nn.Linear(dims, 2 * latent), nn.Linear(latent, dims)

    def forward(self, x):
        mean, logvar = self.enc(x.flatten(1)).chunk(2, dim=1)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        distortion = (self.dec(z) - x.flatten(1)).square().sum(1)
        kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)
        return {"loss": distortion + kl.sum(1), "rate": kl.sum(1), "distortion": distortion,
                "kl": kl}

    def penalty(self):
        return torch.zeros(())


def test_flops_per_image_is_the_hand_count_of_forward_and_backward():
    d, latent = 12, 4  # images (3, 2, 2)
    vae, tc = _LinearVAE(d, latent), _tiny().train
    x = torch.rand(5, 3, 2, 2)
    # 2 FLOPs per multiply-add. Encoder d -> 2 latent: forward, weight gradient (the input needs
    # none). Decoder latent -> d: forward, weight gradient, input gradient (z needs one).
    hand = 2 * (2 * d * 2 * latent) + 3 * (2 * latent * d)
    assert B.flops_per_image(vae, x, make_optimizer(vae, tc), tc) == hand


def test_training_flops_of_a_real_net_are_three_forwards_less_the_image_input_gradients():
    # every conv and matmul runs forward, weight gradient and input gradient (each the forward's
    # FLOPs), except that nothing needs the images' gradient: the convs that read the images
    # themselves (the first block's conv1 and shortcut) have no input gradient
    cfg = _tiny()
    torch.manual_seed(0)
    vae = build_from_config(cfg, (3, 32, 32))
    forward = model_info(vae)["flops"]
    x = torch.rand(1, 3, 32, 32)
    readers = []
    hooks = [m.register_forward_hook(lambda m, i, o: readers.append(m) if i[0] is x else None)
             for m in vae.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad(), eval_mode(vae):
        vae(x)
    for h in hooks:
        h.remove()
    assert len(readers) == 2
    with FlopCounterMode(display=False) as counter:
        for m in readers:
            m(x)
    train = B.flops_per_image(vae, torch.rand(4, 3, 32, 32), make_optimizer(vae, cfg.train),
                              cfg.train)
    assert train == 3 * forward - counter.get_total_flops()


def test_runner_steps_update_the_ema_as_training_does():
    # the cpu preset (hier: no BatchNorm) keeps an EMA of its weights
    def cfg(ema):
        return resolve(preset="cpu", environ={}, overrides={
            "width": 0.0625, "batch_size": 8, "device": "cpu", "ema": ema, "skip_threshold": 0})

    images = np.random.default_rng(0).integers(0, 256, (32, 3, 32, 32), dtype=np.uint8)
    plain = B.Runner(B.Variant(), cfg(0.0), images, torch.device("cpu"))
    plain.step()
    r = B.Runner(B.Variant(), cfg(0.9), images, torch.device("cpu"))  # (reseeds)
    before = [p.detach().clone() for p in r.ema.module.parameters()]
    r.step()
    r.step()
    assert plain.ema is None and r.skipped == 0 and int(r.ema.n_averaged) == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, r.ema.module.parameters()))
    # devguard: --guard device's step (fused Adam), the skips counted on the device
    d = B.Runner(B.parse_variant("devguard"), cfg(0.9), images, torch.device("cpu"))
    d.step()
    d.step()
    assert d.opt.defaults["fused"] and isinstance(d.skipped, torch.Tensor)
    assert int(d.skipped) == 0 and int(d.ema.n_averaged) == 2
    assert B.config_variant(cfg(0.9)) == B.Variant(bf16=True, channels_last=True)
    assert B.config_variant(replace(cfg(0.9), train=replace(cfg(0.9).train, guard="device"))) \
        == B.Variant(bf16=True, channels_last=True, fused=True, devguard=True)
    tuned = replace(cfg(0.9).train, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert B.config_variant(replace(cfg(0.9), train=tuned)).name == "bf16+cl+autotune"


@pytest.mark.parametrize("text, expected", [
    ("fp32", B.Variant()),
    ("bf16+cl+compiled", B.Variant(bf16=True, channels_last=True, compiled=True)),
    ("fused+fp32", B.Variant(fused=True)),
    ("bf16+nosync", B.Variant(bf16=True, nosync=True)),
    ("bf16+devguard", B.Variant(bf16=True, fused=True, devguard=True)),
    ("bf16+cl+autotune", B.Variant(bf16=True, channels_last=True, compiled=True, autotune=True)),
])
def test_parse_variant(text, expected):
    assert B.parse_variant(text) == expected
    assert B.parse_variant(expected.name) == expected


@pytest.mark.parametrize("text", ["fp16", "bf16+fp32", "bf16+", "channels_last",
                                  "nosync+devguard"])
def test_parse_variant_rejects(text):
    with pytest.raises(ValueError, match="--variants"):
        B.parse_variant(text)


@pytest.mark.usefixtures("small_runs")  # a private, empty data cache
def test_cli_synthetic_needs_no_data_and_benches_the_preset(capsys):
    # the cpu preset (bf16 + channels_last) trains on CIFAR-10, which this cache lacks
    small = ["--preset", "cpu", "--width", "0.0625", "--batch-size", "8", *FAST]
    assert _run(["bench", *small, "--json"]) == 2
    assert "cifar" in capsys.readouterr().err.lower()
    assert _run(["bench", *small, "--synthetic", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # one JSON object, nothing else
    assert r["config"] == to_dict(resolve(preset="cpu", environ={}, overrides={
        "width": 0.0625, "batch_size": 8, "device": "cpu"}))
    assert list(r["variants"]) == ["bf16+cl", "baseline"] and "profile" not in r
    for key in KEYS:
        assert math.isfinite(r[key]) and r[key] > 0, key


@pytest.mark.usefixtures("small_runs")
@pytest.mark.parametrize("argv, flag", [
    (["--seconds", "0"], "--seconds"),
    (["--seconds", "soon"], "--seconds"),
    (["--variants", "fp32,fp16"], "--variants"),
    (["--precision", "fp16"], "precision"),
    (["--matmul-size", "0"], "--matmul-size"),
    (["--batch", "8"], "unrecognized argument --batch"),  # no abbreviations
    (["--data-dir", "somewhere"], "--data-dir"),  # with --synthetic
    (["--depth", "21"], "depth"),
])
def test_cli_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    assert _run(["bench", "--preset", "tiny", "--synthetic", *argv]) == 2
    assert flag in capsys.readouterr().err
