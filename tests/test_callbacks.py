"""Callbacks and TensorBoard: per-step numbers summed on the device and read back every
`log_every` updates, the epoch means unchanged to the last bit, the three callback methods,
and `--tensorboard`'s event files (or its error when the package is missing)."""

import json
import math
import sys

import pytest
import torch
from conftest import small_data, train_small

import resvae.state as ST
import resvae.step as S
from resvae.cli import main
from resvae.config import resolve
from resvae.data import iterate_batches, to_input
from resvae.vae import build_from_config

pytestmark = pytest.mark.usefixtures("small_runs")


def cfg_for(**overrides):
    # 64 images in batches of 16: 4 updates per epoch
    base = {"subset": 64, "batch_size": 16, "device": "cpu", "max_epochs": 2, "sample_every": 0}
    return resolve(preset="tiny", environ={}, overrides={**base, **overrides})


def reference_run(cfg, data, epochs):
    """The training numbers as resvae computed them before they stayed on the device (and as any
    plain loop does): each update's batch means read back with .item(), summed in Python floats.
    Returns the per-epoch means of (loss, rate, distortion) and each update's (loss, rate,
    distortion, grad_norm)."""
    tc = cfg.train
    assert tc.warmup_steps == tc.kl_anneal_steps == 0 and tc.free_bits == tc.grad_clip == 0
    torch.manual_seed(tc.seed)
    vae = build_from_config(cfg, tuple(data.train.images.shape[1:]))
    opt = torch.optim.Adam(vae.parameters(), lr=tc.lr, betas=tuple(tc.betas))
    means, steps = [], []
    for epoch in range(epochs):  # (validation between epochs does not change the weights)
        torch.manual_seed(ST.epoch_seed(tc.seed, epoch, 0))
        vae.train()
        sums = [0.0, 0.0, 0.0]
        n = 0
        for batch in iterate_batches(data.train.images, tc.batch_size, shuffle=True,
                                     seed=tc.seed, epoch=epoch, drop_last=True):
            opt.zero_grad()
            out = vae(to_input(batch, "cpu"))
            (out["distortion"].mean() + out["kl"].mean(0).sum() + vae.penalty()).backward()
            norm = torch.nn.utils.clip_grad_norm_(vae.parameters(), math.inf)
            opt.step()
            step = [out[k].detach().mean().item() for k in ("loss", "rate", "distortion")]
            steps.append(step + [norm.item()])
            sums = [a + b for a, b in zip(sums, step)]
            n += 1
        means.append([v / n for v in sums])
    return means, steps


class Recorder:
    def __init__(self):
        self.steps, self.epochs, self.ends = [], [], []

    def on_step(self, step, stats):
        self.steps.append((step, stats))

    def on_epoch(self, record):
        self.epochs.append(record)

    def on_end(self, summary):
        self.ends.append(summary)


class EndOnly:  # a callback may have any subset of the three methods
    def __init__(self):
        self.summary = None

    def on_end(self, summary):
        self.summary = summary


def test_training_step_returns_device_tensors():
    cfg = cfg_for()
    torch.manual_seed(0)
    vae = build_from_config(cfg, (3, 32, 32))
    opt = torch.optim.Adam(vae.parameters())
    x = torch.rand(8, 3, 32, 32)
    out = S.training_step(vae, vae, x, opt, cfg.train)
    for k in ST.STEP_KEYS:
        assert isinstance(out[k], torch.Tensor) and out[k].dim() == 0 and not out[k].requires_grad
    assert out["skipped"] is False


def test_epoch_means_and_logged_steps_equal_a_plain_loop_bit_for_bit(tmp_path):
    cfg = cfg_for(log_every=3)
    rec, end_only = Recorder(), EndOnly()
    summary = train_small(cfg, tmp_path / "run", callbacks=[rec, end_only])
    means, steps = reference_run(cfg, small_data(cfg), 2)
    records = [json.loads(ln) for ln in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # the epoch means of metrics.jsonl: exactly, not approximately
    assert [[r["train_loss"], r["rate"], r["distortion"]] for r in records] == means
    # every 3rd of the 8 updates, the means since the last one (the second spans the epochs)
    assert [s for s, _ in rec.steps] == [3, 6]
    for (step, stats), window in zip(rec.steps, (steps[0:3], steps[3:6])):
        expect = [sum(col) / 3 for col in zip(*window)]
        assert [stats[k] for k in ST.STEP_KEYS] == expect, step
        assert stats["lr"] == cfg.train.lr and stats["beta"] == 1.0 and stats["skipped"] == 0
        assert all(type(stats[k]) is float for k in ST.STEP_KEYS)
    assert [st["epoch"] for _, st in rec.steps] == [1, 2]
    assert rec.epochs == records
    assert rec.ends == [summary] and end_only.summary == summary
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())


def test_log_every_zero_reads_back_per_epoch_only(tmp_path):
    rec = Recorder()
    train_small(cfg_for(log_every=0, max_epochs=1), tmp_path / "run", callbacks=[rec])
    assert rec.steps == [] and len(rec.epochs) == 1 and len(rec.ends) == 1


def test_skipped_updates_are_counted_in_the_window(tmp_path):
    rec = Recorder()
    cfg = cfg_for(log_every=2, skip_threshold=1e-6, max_skips=100, max_epochs=1)
    train_small(cfg, tmp_path / "run", callbacks=[rec])
    assert [s for s, _ in rec.steps] == [2, 4]
    for _, stats in rec.steps:  # every update skipped: no means, two skips per window
        assert stats["skipped"] == 2 and stats["loss"] is None and stats["grad_norm"] is None


# ----------------------------------------------------------------------------- TensorBoard

def _events(logdir):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    return acc.Reload()


def test_tensorboard_writes_steps_epochs_grids_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams import plugin_data_pb2

    run = tmp_path / "run"
    rec = Recorder()
    cfg = cfg_for(tensorboard=True, log_every=2, sample_every=1)
    summary = train_small(cfg, run, callbacks=[rec])
    acc = _events(run / "tensorboard")

    def scalars(tag):
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    loss = scalars("train/loss")
    assert [s for s, _ in loss] == [2, 4, 6, 8]
    assert [v for _, v in loss] == pytest.approx([st["loss"] for _, st in rec.steps], rel=1e-6)
    for tag in ("rate", "distortion", "grad_norm", "lr", "beta", "skipped"):
        assert len(scalars(f"train/{tag}")) == 4, tag
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for key, tag in (("val_loss", "val/loss"), ("val_bpd", "val/bpd"),
                     ("val_rate", "val/rate"), ("val_distortion", "val/distortion"),
                     ("train_loss", "epoch/train_loss")):
        got = scalars(tag)
        assert [s for s, _ in got] == [4, 8], tag  # per epoch, at its last global step
        assert [v for _, v in got] == pytest.approx([r[key] for r in records], rel=1e-6), tag
    for kind in ("samples", "recon"):
        images = acc.Images(kind)
        assert [e.step for e in images] == [4, 8]
        assert (images[0].width, images[0].height) == (331, 331)
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["latent_dim"].number_value == 8
    assert start.hparams["likelihood"].string_value == "dlogistic"
    assert start.hparams["betas"].string_value == "[0.9, 0.999]"
    assert start.hparams["tensorboard"].number_value == 1  # torch writes bools as numbers
    for key in ("test_loss", "test_bpd", "best_val_loss"):
        assert scalars(key) == [(8, pytest.approx(summary[key], rel=1e-6))], key


def test_tensorboard_resume_drops_what_a_crashed_run_logged_after_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    train_small(cfg_for(tensorboard=True, log_every=2, max_epochs=1), run)  # steps 1-4
    with SummaryWriter(str(run / "tensorboard")) as w:  # a crash in epoch 2, after step 6
        w.add_scalar("train/loss", -1.0, 6)
    rec = Recorder()
    train_small(cfg_for(tensorboard=True, log_every=2), run, resume=True, callbacks=[rec])
    acc = _events(run / "tensorboard")
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in loss] == [2, 4, 6, 8]  # epoch 1's kept, the crashed step 6 dropped
    assert loss[2][1] == pytest.approx(rec.steps[0][1]["loss"], rel=1e-6)
    assert [e.step for e in acc.Scalars("val/loss")] == [4, 8]


def test_tensorboard_missing_is_an_error_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    run = tmp_path / "run"
    rc = main(["train", "--preset", "tiny", "--out", str(run), "--subset", "64", "--device",
               "cpu", "--tensorboard"])
    assert rc == 2
    assert "pip install 'resvae[tensorboard]'" in capsys.readouterr().err
    assert not run.exists()  # refused before anything was written
