"""Tests for resvae.train: early stopping, the plateau schedule, the non-finite guard, exact
resume, atomic checkpoints, the run directory, budgets, bf16/channels_last, and the `train` CLI.

Runs use the `tiny` preset on a small slice of the shapes data: `load_dataset` is wrapped so the
val/test splits hold 64 images instead of 2000 (evaluation would otherwise dominate the time).
"""

import importlib
import io
import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import small_load, train_small
from PIL import Image

import resvae.checkpoints as CK
import resvae.generate as G
import resvae.state as ST
import resvae.step as S
import resvae.vae as V
from resvae import distributed as D
from resvae.cli import main
from resvae.config import resolve, to_dict
from resvae.evaluate import evaluate

T = importlib.import_module("resvae.train")  # the module: resvae.train is the function

pytestmark = pytest.mark.usefixtures("small_runs")


def cfg_for(**overrides):
    base = {"subset": 64, "batch_size": 32, "device": "cpu", "max_epochs": 1}
    return resolve(preset="tiny", environ={}, overrides={**base, **overrides})


def read_metrics(run):
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]


def read_json(path):
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- early stopping

def test_early_stopping_counts_epochs_without_min_delta_gain():
    es = ST.EarlyStopping(patience=3, min_delta=0.1)
    assert es.step(10.0) and es.best == 10.0
    assert not es.step(9.95) and es.wait == 1  # a gain of 0.05 < min_delta is no gain
    assert not es.should_stop
    assert es.step(9.85) and es.wait == 0 and es.best == 9.85  # 0.15 > min_delta: resets
    stops = []
    for v in (9.8, 9.9, 9.76):  # within min_delta of 9.85 each time
        es.step(v)
        stops.append(es.should_stop)
    assert stops == [False, False, True]
    assert es.best == 9.85
    # patience 0 is "off": never stops, however long nothing improves
    off = ST.EarlyStopping(patience=0)
    off.step(1.0)
    for _ in range(50):
        off.step(2.0)
    assert not off.should_stop


def test_early_stopping_end_to_end(tmp_path):
    cfg = cfg_for(lr=1e-12, patience=2, min_delta=1e9, max_epochs=10, sample_every=0)
    s = train_small(cfg, tmp_path / "run")
    assert s["stop_reason"] == "early_stopping"
    assert s["epochs"] == 3 and s["best_epoch"] == 1
    recs = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in recs] == [1, 2, 3]
    assert s["best_val_loss"] == pytest.approx(recs[0]["val_loss"], rel=1e-12)


# ----------------------------------------------------------------------------- plateau

def _plateau(patience, factor=0.5, min_lr=0.0, lr=1e-3):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([p], lr=lr)
    tc = cfg_for(plateau_patience=patience, plateau_factor=factor, min_lr=min_lr).train
    return opt, ST.make_plateau(opt, tc)


def _lrs(opt, sched, values):
    out = []
    for v in values:
        sched.step(v)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_plateau_halves_after_exactly_patience_bad_epochs():
    opt, sched = _plateau(2)
    # improving (by more than the 1e-4 absolute threshold), then flat
    lrs = _lrs(opt, sched, [10.0, 9.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.00005, 8.0])
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4])
    # one bad epoch, then an improvement: the count restarts, no reduction
    opt, sched = _plateau(2)
    assert _lrs(opt, sched, [10.0, 10.0, 9.0, 9.0, 8.0]) == pytest.approx([1e-3] * 5)
    # patience 1 (Keras): reduce after the first bad epoch
    opt, sched = _plateau(1)
    assert _lrs(opt, sched, [10.0, 10.0, 10.0]) == pytest.approx([1e-3, 5e-4, 2.5e-4])


def test_plateau_respects_min_lr():
    opt, sched = _plateau(2, min_lr=4e-4)
    lrs = _lrs(opt, sched, [1.0] * 9)
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 4e-4, 4e-4, 4e-4, 4e-4, 4e-4])


def test_plateau_end_to_end_lr_column(tmp_path, monkeypatch):
    # Val loss that never improves (evaluate is replaced; training itself is real).
    calls = []

    def flat_evaluate(vae, images, *a, **k):
        calls.append(len(images))
        return {"loss": 100.0, "rate": 1.0, "distortion": 99.0, "bpd": 5.0}

    monkeypatch.setattr(T, "evaluate", flat_evaluate)
    cfg = cfg_for(plateau_patience=2, plateau_factor=0.5, min_lr=4e-4, lr=1e-3, max_epochs=8,
                  sample_every=0)
    s = train_small(cfg, tmp_path / "run")
    assert s["stop_reason"] == "max_epochs" and s["epochs"] == 8
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    # the lr column is the lr each epoch trained with: bad epochs 2,3 -> halved from epoch 4 on;
    # bad epochs 4,5 -> 2.5e-4, floored at min_lr 4e-4, from epoch 6 on
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 4e-4, 4e-4, 4e-4])
    last = CK.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(4e-4)
    assert len(calls) == 9  # 8 val evaluations + the test split


# ----------------------------------------------------------------------------- non-finite guard

def _step_setup():
    cfg = cfg_for()
    torch.manual_seed(0)
    vae = V.build_from_config(cfg, (3, 32, 32))
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    x = torch.from_numpy(small_load("shapes", subset=64).train.images[:16]).float() / 255
    return cfg, vae, opt, x


def _params(vae):
    return {k: v.detach().clone() for k, v in vae.named_parameters()}


def _adam_steps(opt):
    return sorted({int(s["step"]) for s in opt.state.values()})


def test_training_step_skips_non_finite_batch():
    cfg, vae, opt, x = _step_setup()
    before = _params(vae)
    s = S.training_step(vae, vae, x, opt, cfg.train)
    assert s["skipped"] is False and math.isfinite(s["loss"])
    after = _params(vae)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # a finite batch updates
    assert _adam_steps(opt) == [1]

    bad = x.clone()
    bad[3, 1, 5, 7] = float("nan")
    s = S.training_step(vae, vae, bad, opt, cfg.train)
    assert s["skipped"] is True
    for k, v in _params(vae).items():
        assert torch.equal(v, after[k]), k
    assert _adam_steps(opt) == [1]  # the optimizer did not step
    assert all(p.grad is None for p in vae.parameters())  # no stale NaN grads left behind

    s = S.training_step(vae, vae, x, opt, cfg.train)  # training continues normally
    assert s["skipped"] is False and _adam_steps(opt) == [2]
    assert all(torch.isfinite(p).all() for p in vae.parameters())


def test_training_step_skip_threshold():
    cfg, vae, opt, x = _step_setup()
    tc = cfg_for(skip_threshold=1e-6).train  # every real gradient norm is above this
    before = _params(vae)
    s = S.training_step(vae, vae, x, opt, tc)
    assert s["skipped"] is True and float(s["grad_norm"]) > 1e-6
    assert all(torch.equal(v, before[k]) for k, v in _params(vae).items())
    # bench's `nosync` (guard="off") applies the same update unchecked
    s = S.training_step(vae, vae, x, opt, tc, guard="off")
    assert s["skipped"] is False and _adam_steps(opt) == [1]
    assert any(not torch.equal(v, before[k]) for k, v in _params(vae).items())


def _guarded_run(cfg, guard, batches):
    """Steps of a fresh tiny VAE under `guard` with fused Adam and an EMA; each step's noise
    seeded alike, so two guards can be compared bit for bit."""
    tc = replace(cfg.train, guard=guard, ema=0.9)
    torch.manual_seed(0)
    vae = V.build_from_config(cfg, (3, 32, 32))
    opt, ema = S.make_optimizer(vae, tc, fused=True), S.make_ema(vae, tc)
    flags = []
    for b in batches:
        torch.manual_seed(1)
        skipped = S.training_step(vae, vae, b, opt, tc)["skipped"]
        ema.update_parameters(vae, S.applied(skipped))
        flags.append(skipped)
    return vae, opt, ema, flags


def test_device_guard_decides_as_the_host_guard_without_reading_back(monkeypatch):
    """--guard device skips the same updates as "host" and leaves the same weights, Adam state,
    BatchNorm buffers and EMA, bit for bit (both with fused Adam), while nothing in the step or
    the EMA update reads a tensor back to the host."""
    cfg, _, _, x = _step_setup()
    bad = x.clone()
    bad[3, 1, 5, 7] = float("nan")
    batches = [x, bad, x.flip(0), bad, x]
    host = _guarded_run(cfg, "host", batches)
    assert host[3] == [False, True, False, True, False]

    def no_read(self, *a):
        raise AssertionError("a host read of a tensor under --guard device")
    with monkeypatch.context() as m:
        for name in ("__bool__", "item", "tolist", "__float__", "__int__"):
            m.setattr(torch.Tensor, name, no_read)
        dev = _guarded_run(cfg, "device", batches)
    assert all(isinstance(f, torch.Tensor) and f.dtype == torch.bool for f in dev[3])
    assert [bool(f) for f in dev[3]] == host[3]
    for (k, a), b in zip(host[0].state_dict().items(), dev[0].state_dict().values()):
        assert torch.equal(a, b), k
    assert any("running_mean" in k for k in host[0].state_dict())  # BN buffers were compared
    assert _adam_steps(host[1]) == _adam_steps(dev[1]) == [3]
    for a, b in zip(host[1].state.values(), dev[1].state.values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for (k, a), b in zip(host[2].state_dict().items(), dev[2].state_dict().values()):
        assert torch.equal(a, b), k
    assert int(dev[2].n_averaged) == 3
    # the device guard skips through fused Adam's found_inf: another optimizer is refused
    _, vae, opt, x = _step_setup()
    with pytest.raises(ValueError, match="fused Adam"):
        S.training_step(vae, vae, x, opt, replace(cfg.train, guard="device"))


def test_ema_update_is_averaged_models_with_warmup_and_skips_on_the_device():
    """EMA.update_parameters gives what AveragedModel with TensorFlow's warm-up gives (the first
    update copies), and a false `ok`, a bool or a tensor, changes nothing, its count included."""
    from torch.optim.swa_utils import AveragedModel

    def tf_warmup(avg, cur, n):
        if not avg[0].is_floating_point():
            torch._foreach_copy_(avg, cur)
            return
        d = ((1 + n) / (10 + n)).clamp(max=0.9)
        torch._foreach_lerp_(avg, cur, (1 - d).to(avg[0].dtype))

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ours, ref = S.EMA(net, 0.9), AveragedModel(net, multi_avg_fn=tf_warmup, use_buffers=True)

    def move():
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net(torch.randn(8, 3))  # moves the BatchNorm buffers
    for i in range(6):
        move()
        ours.update_parameters(net, True if i % 2 else torch.tensor(True))
        ref.update_parameters(net)
        for (k, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
            assert torch.equal(a, b), (i, k)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    move()
    ours.update_parameters(net, torch.tensor(False))
    ours.update_parameters(net, False)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert int(ours.n_averaged) == 6


def test_device_guard_trains_and_stops_a_nan_storm_at_its_next_read(tmp_path, monkeypatch):
    s = train_small(cfg_for(max_epochs=2, batch_size=16, guard="device", ema=0.9, log_every=3),
                    tmp_path / "ok")
    assert s["skipped_updates"] == 0 and s["steps"] == 8 and math.isfinite(s["test_loss"])
    assert CK.load_checkpoint(tmp_path / "ok" / "checkpoints" / "last.pt")["ema_updates"] == 8
    _nan_batches(monkeypatch)
    # at each epoch's end the skips are read: as under "host" (test below), the 4th stops
    s = train_small(cfg_for(max_skips=3, max_epochs=10, sample_every=0, guard="device"),
                    tmp_path / "a")
    assert (s["stop_reason"], s["epochs"], s["steps"], s["skipped_updates"]) == (
        "non_finite", 2, 4, 4)
    # inside a long epoch with no log steps they are read every SETTLE_EVERY updates
    s = train_small(cfg_for(max_skips=3, batch_size=2, subset=128, log_every=0, sample_every=0,
                            guard="device"), tmp_path / "b")
    assert s["stop_reason"] == "non_finite"
    assert s["steps"] == s["skipped_updates"] == T.SETTLE_EVERY


def test_resume_under_another_guard_takes_this_runs_adam(tmp_path, monkeypatch):
    """A run written under --guard host (default Adam) resumed with --guard device must step
    with fused Adam (whose found_inf skips), not with the checkpoint's implementation."""
    run = tmp_path / "run"
    train_small(cfg_for(max_epochs=1, batch_size=16), run)
    seen, real = [], T.training_step

    def spy(model, vae, x, opt, *a, **k):
        seen.append([(g["fused"], g["foreach"]) for g in opt.param_groups])
        return real(model, vae, x, opt, *a, **k)
    monkeypatch.setattr(T, "training_step", spy)
    s = train_small(cfg_for(max_epochs=2, batch_size=16, guard="device"), run, resume=True)
    assert s["steps"] == 8 and len(seen) == 4
    assert all(groups == [(True, None)] for groups in seen)


def test_skipped_step_leaves_batchnorm_buffers_intact():
    cfg, vae, opt, x = _step_setup()
    bufs = {k: v.clone() for k, v in vae.named_buffers()}
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    assert S.training_step(vae, vae, bad, opt, cfg.train)["skipped"]
    for k, v in vae.named_buffers():
        assert torch.equal(v, bufs[k]), k
    rt = D.Runtime(torch.device("cpu"))
    assert math.isfinite(evaluate(vae, (x[:8] * 255).to(torch.uint8).numpy(), 8, rt)["loss"])


def _nan_batches(monkeypatch):
    real = T.training_step

    def nan_step(model, vae, x, *a, **k):
        return real(model, vae, torch.full_like(x, float("nan")), *a, **k)

    monkeypatch.setattr(T, "training_step", nan_step)


def test_non_finite_stops_run_and_cli_exit_code_3(tmp_path, monkeypatch, capsys):
    _nan_batches(monkeypatch)
    cfg = cfg_for(max_skips=3, max_epochs=10, sample_every=0)
    s = train_small(cfg, tmp_path / "run")
    # 2 batches per epoch: skips 1-2 in epoch 1, 3-4 in epoch 2; the 4th (> max_skips) stops
    assert s["stop_reason"] == "non_finite"
    assert s["epochs"] == 2 and s["steps"] == 4 and s["skipped_updates"] == 4
    recs = read_metrics(tmp_path / "run")
    assert [r["skipped"] for r in recs] == [2, 2]
    assert recs[-1]["partial"] is False  # every batch of epoch 2 ran (and was skipped)
    assert "non-finite" in capsys.readouterr().err

    rc = main(["train", "--preset", "tiny", "--out", str(tmp_path / "cli"), "--subset", "64",
               "--device", "cpu", "--max-skips", "1", "--max-epochs", "5", "--sample-every", "0"])
    assert rc == 3
    assert read_json(tmp_path / "cli" / "summary.json")["stop_reason"] == "non_finite"


def test_a_run_that_ended_without_a_finite_validation_loss_exits_3(tmp_path, capsys):
    # diverged (lr 10), but in fewer non-finite updates in a row than --max-skips: it runs to
    # max_epochs, yet has no model worth testing: a failure, not a success
    rc = main(["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--subset", "64",
               "--device", "cpu", "--lr", "10", "--max-skips", "100000", "--max-epochs", "2",
               "--sample-every", "0"])
    summary = read_json(tmp_path / "run" / "summary.json")
    assert (summary["stop_reason"], summary["best_val_loss"]) == ("max_epochs", None)
    assert rc == 3
    err = capsys.readouterr().err
    assert "no epoch had a finite validation loss" in err and "metrics.jsonl" in err


# ----------------------------------------------------------------------------- resume

IGNORE = {"epoch_seconds", "images_per_s", "train_seconds"}


def _same_records(a, b):
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert set(ra) == set(rb)
        for k in set(ra) - IGNORE:
            if isinstance(ra[k], float):
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-9), (ra["epoch"], k)
            else:
                assert rb[k] == ra[k], (ra["epoch"], k)


def test_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sa = train_small(cfg_for(max_epochs=3, batch_size=16), a)
    sb1 = train_small(cfg_for(max_epochs=1, batch_size=16), b)
    assert sb1["epochs"] == 1 and len(read_metrics(b)) == 1
    sb = train_small(cfg_for(max_epochs=3, batch_size=16), b, resume=True)
    assert sa["epochs"] == sb["epochs"] == 3 and sa["steps"] == sb["steps"] == 12
    ra, rb = read_metrics(a), read_metrics(b)
    assert [r["epoch"] for r in rb] == [1, 2, 3]
    _same_records(ra, rb)
    assert sb["best_epoch"] == sa["best_epoch"]
    assert sb["test_loss"] == pytest.approx(sa["test_loss"], rel=1e-6)
    wa = CK.load_checkpoint(a / "checkpoints" / "last.pt")
    wb = CK.load_checkpoint(b / "checkpoints" / "last.pt")
    for k, v in wa["model"].items():
        torch.testing.assert_close(wb["model"][k], v, rtol=1e-6, atol=1e-6, msg=k)
    assert read_json(b / "config.json")["train"]["max_epochs"] == 3


def test_resume_drops_records_written_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    train_small(cfg_for(max_epochs=1, sample_every=0), run)
    good = (run / "metrics.jsonl").read_text()
    with open(run / "metrics.jsonl", "a") as f:  # a crash after logging epoch 2, before its ckpt
        f.write(json.dumps({"epoch": 2, "train_loss": 1.0}) + "\n")
    train_small(cfg_for(max_epochs=2, sample_every=0), run, resume=True)
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    assert (run / "metrics.jsonl").read_text().startswith(good)
    assert recs[1]["train_loss"] != 1.0


def test_cli_resume_and_model_mismatch(tmp_path, capsys):
    run = str(tmp_path / "b2")
    common = ["--subset", "64", "--device", "cpu", "--sample-every", "0"]
    assert main(["train", "--preset", "tiny", "--out", run, "--max-epochs", "1", *common]) == 0
    assert main(["train", "--resume", run, "--max-epochs", "2"]) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "b2")] == [1, 2]
    assert read_json(tmp_path / "b2" / "summary.json")["epochs"] == 2
    capsys.readouterr()

    assert main(["train", "--resume", run, "--max-epochs", "3", "--latent-dim", "16"]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "model settings differ" in err
    assert len(read_metrics(tmp_path / "b2")) == 2  # nothing ran

    assert main(["train", "--resume", run, "--preset", "tiny"]) == 2
    assert "drop --preset" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no checkpoints/last.pt" in capsys.readouterr().err


def test_cli_resume_mismatch_names_the_setting(tmp_path, capsys):
    run = str(tmp_path / "r")
    assert main(["train", "--preset", "tiny", "--out", run, "--max-epochs", "1", "--subset", "64",
                 "--device", "cpu", "--sample-every", "0"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", run, "--latent-dim", "16"]) == 2
    err = capsys.readouterr().err
    assert "latent_dim" in err and "8" in err and "16" in err


def test_cli_records_its_own_argv(tmp_path):
    argv = ["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--max-epochs", "1",
            "--subset", "64", "--device", "cpu", "--sample-every", "0"]
    assert main(argv) == 0
    # the whole command line, in order, behind the program's name (what `resvae` would rerun)
    assert json.loads((tmp_path / "r" / "argv.json").read_text()) == ["resvae", *argv]
    assert CK.load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["argv"] == ["resvae", *argv]


# ----------------------------------------------------------------------------- checkpoints

def test_interrupted_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    p = tmp_path / "ckpts" / "last.pt"
    state1 = {"model": {"w": torch.arange(4.0)}, "epoch": 1}
    CK.save_checkpoint(state1, p)
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        buf = io.BytesIO()
        real_save(obj, buf)
        data = buf.getvalue()
        f.write(data[:len(data) // 2])  # save_checkpoint hands torch.save a file object
        raise OSError("No space left on device")

    monkeypatch.setattr(CK.torch, "save", half_then_fail)
    state2 = {"model": {"w": torch.ones(1000)}, "epoch": 2}
    with pytest.raises(OSError, match="No space"):
        CK.save_checkpoint(state2, p)
    monkeypatch.undo()
    got = CK.load_checkpoint(p)
    assert got["epoch"] == 1 and torch.equal(got["model"]["w"], state1["model"]["w"])
    assert os.listdir(p.parent) == ["last.pt"]  # no temp file left behind


def test_load_checkpoint_strips_wrapper_prefixes(tmp_path):
    p = tmp_path / "c.pt"
    CK.save_checkpoint({"model": {"module.a": torch.ones(1), "_orig_mod.b": torch.zeros(1),
                                 "_orig_mod.module.c": torch.zeros(2), "d": torch.ones(2)}}, p)
    assert set(CK.load_checkpoint(p)["model"]) == {"a", "b", "c", "d"}


def test_torch_compile_wrapper_keys_load_into_a_plain_vae(tmp_path):
    # torch.compile(module) wraps it (lazily: nothing compiles until it is called) and prefixes
    # every state_dict key with _orig_mod.; load_checkpoint strips it
    cfg = cfg_for()
    torch.manual_seed(0)
    vae = V.build_from_config(cfg, (3, 32, 32))
    compiled = torch.compile(vae)
    keys = list(compiled.state_dict())
    assert keys and all(k.startswith("_orig_mod.") for k in keys)
    CK.save_checkpoint({"model": compiled.state_dict()}, tmp_path / "c.pt")
    torch.manual_seed(1)
    plain = V.build_from_config(cfg, (3, 32, 32))
    plain.load_state_dict(CK.load_checkpoint(tmp_path / "c.pt")["model"])  # strict
    for k, v in vae.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k


@pytest.mark.slow
def test_compiled_run_loads_into_an_uncompiled_model(tmp_path):
    # minutes on 2 CPU cores: inductor compiles C++ for the training and the eval forward
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("torch.compile on CPU needs a C compiler (no cc or gcc on PATH)")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    run = tmp_path / "run"
    # bn_recalibrate 0: with BatchNorm statistics recomputed for the final weights, this barely
    # trained model's loss depends on the sampled z by ~1%, and the two test passes below draw
    # different z; with the running averages it does not, so the comparison stays at 1e-3
    cfg = cfg_for(compile=True, batch_size=16, sample_every=0, bn_recalibrate=0)
    s = train_small(cfg, run)
    assert counters["stats"]["unique_graphs"] >= 2  # the forward in train and in eval mode
    assert s["stop_reason"] == "max_epochs" and s["skipped_updates"] == 0
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)["model"]
    vae, cfg2 = CK.load_run(run)  # a plain module, strict load_state_dict
    assert cfg2.train.compile and vae._compiled_call_impl is None
    for k, v in vae.state_dict().items():
        assert torch.equal(v, best[k]), k
    # the same model: its (eager) test loss is the compiled one's, up to the sampled z
    test = evaluate(vae, small_load("shapes", subset=64).test.images, 500,
                      D.Runtime(torch.device("cpu")))
    assert test["loss"] == pytest.approx(s["test_loss"], rel=1e-3)


# ----------------------------------------------------------------------------- run directory

METRIC_KEYS = {"epoch", "train_loss", "val_loss", "rate", "distortion", "val_bpd", "lr",
               "skipped", "epoch_seconds", "images_per_s"}
SUMMARY_KEYS = {"stop_reason", "epochs", "best_epoch", "best_val_loss", "final_train_loss",
                "test_bpd", "training_seconds"}


def test_run_directory_contents(tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    cfg = cfg_for(max_epochs=2)
    s = train_small(cfg, run)
    assert read_json(run / "config.json") == to_dict(cfg)
    recs = read_metrics(run)
    assert [r["epoch"] for r in recs] == [1, 2]
    for r in recs:
        assert METRIC_KEYS <= set(r)
        assert all(math.isfinite(r[k]) for k in ("train_loss", "val_loss", "val_bpd", "lr"))
        assert r["val_bpd"] == pytest.approx(r["val_loss"] / (3072 * math.log(2)), rel=1e-6)
        assert r["skipped"] == 0
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert last["epoch"] == 2 and best["epoch"] == s["best_epoch"]
    st = load_file(str(run / "checkpoints" / "best.safetensors"))
    assert set(st) == set(best["model"])
    for k, v in best["model"].items():
        assert torch.equal(st[k], v), k
    for sub in ("samples", "recon"):
        for ep in (1, 2):
            with Image.open(run / sub / f"epoch_{ep:04d}.png") as im:
                assert im.size == (331, 331) and im.mode == "RGB"
    grid = np.asarray(Image.open(run / "samples" / "epoch_0001.png"))
    assert (grid[::33] == 255).all() and (grid[:, ::33] == 255).all()  # white 1-pixel gutters
    summary = read_json(run / "summary.json")
    assert SUMMARY_KEYS <= set(summary)
    assert summary["stop_reason"] == "max_epochs" and summary["epochs"] == 2
    assert summary["best_val_loss"] == min(r["val_loss"] for r in recs)
    assert summary["final_train_loss"] == recs[-1]["train_loss"]
    assert math.isfinite(summary["test_bpd"]) and summary["world_size"] == 1
    vae, cfg2 = CK.load_run(run)
    assert cfg2 == cfg and not vae.training
    for k, v in vae.state_dict().items():
        assert torch.equal(v, best["model"][k]), k


def test_small_val_split_does_not_crash_image_grids(tmp_path):
    run = tmp_path / "run"
    cfg = cfg_for(val_fraction=0.25, batch_size=16)  # 48 train, 16 val images
    s = train_small(cfg, run)
    assert s["stop_reason"] == "max_epochs"
    assert (run / "recon" / "epoch_0001.png").exists()


def test_save_grid_size(tmp_path):
    G.save_grid(torch.rand(23, 1, 8, 8), tmp_path / "g.png", nrow=10)
    with Image.open(tmp_path / "g.png") as im:
        assert im.size == (10 * 9 + 1, 3 * 9 + 1) and im.mode == "L"


# ----------------------------------------------------------------------------- budget, precision

def test_budget_stops_the_run(tmp_path):
    cfg = cfg_for(budget="1s", subset=1024, max_epochs=5, sample_every=0)
    s = train_small(cfg, tmp_path / "run")
    assert s["stop_reason"] == "budget"
    # stopped inside epoch 1: no epoch ended; the steps done are in a checkpoint of that place
    assert s["epochs"] == 0 and 0 < s["steps"] == s["inside_epoch_batches"] < 1024 // 32
    recs = read_metrics(tmp_path / "run")
    assert len(recs) == 1 and recs[0]["partial"] is True and math.isfinite(recs[0]["val_loss"])
    assert s["best_val_loss"] == recs[0]["val_loss"]  # stands in while no epoch has ended
    last = CK.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert last["epoch"] == 0 and last["step"] == s["steps"]
    assert last["progress"]["batch"] == s["steps"]
    assert (tmp_path / "run" / "summary.json").exists()


def test_bf16_channels_last_one_epoch_agrees_with_fp32(tmp_path):
    # One step (32 images, batch 32): the epoch's train loss is the loss of the same initial
    # weights (same seed) on the same batch, so precision is the only difference. Later numbers
    # (val, test) come after an update from different gradients and are not compared.
    runs = {}
    for name, kw in {"fp32": {}, "bf16": {"precision": "bf16", "channels_last": True}}.items():
        s = train_small(cfg_for(subset=32, sample_every=0, **kw), tmp_path / name)
        assert s["stop_reason"] == "max_epochs" and s["steps"] == 1 and s["skipped_updates"] == 0
        assert math.isfinite(s["test_loss"])
        runs[name] = read_metrics(tmp_path / name)[0]
    fp32, bf16 = runs["fp32"], runs["bf16"]
    assert all(math.isfinite(bf16[k]) for k in ("train_loss", "val_loss", "rate", "distortion"))
    assert bf16["train_loss"] != fp32["train_loss"]  # bf16 did run
    # Tolerance: bf16's relative precision, 2^-8 (0.4%). Its rounding errors are independent
    # across the 32 x 3072 per-pixel terms the loss sums in fp32, so the sum is off by far less
    # (1e-4 measured); a fault in the bf16 or channels_last path (channels mixed up, a layer
    # skipped) moves it by far more. The rate, a KL of a few nats, is left out of the check.
    for key in ("train_loss", "distortion"):
        assert bf16[key] == pytest.approx(fp32[key], rel=2**-8), key


def test_cli_refuses_existing_run_dir(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"x")
    rc = main(["train", "--preset", "tiny", "--out", str(run), "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--resume {run}" in err and "already holds a run" in err
    assert not (run / "config.json").exists()


def test_study_preset_trains_end_to_end(tmp_path):
    # The study's preset, shrunk in width only: study arch, Bernoulli loss, latent L2 penalty.
    cfg = resolve(preset="study-28", environ={}, overrides={
        "width": 0.0625, "latent_dim": 8, "dataset": "shapes", "subset": 64, "batch_size": 16,
        "max_epochs": 1, "device": "cpu", "sample_every": 0})
    assert cfg.model.latent_l2 == [0.01, 0.1] and cfg.train.patience == 50
    s = train_small(cfg, tmp_path / "study")
    assert s["stop_reason"] == "max_epochs" and s["test_bpd"] is None  # BCE has no bits/dim
    rec = json.loads((tmp_path / "study" / "metrics.jsonl").read_text())
    assert rec["val_bpd"] is None and math.isfinite(rec["val_loss"])
    # 3072 x BCE per image: an untrained net sits near 3072 * ln 2 nats, far below 2x that.
    assert 1000 < rec["val_loss"] < 2 * 3072 * math.log(2)


def test_resume_applies_a_changed_lr(tmp_path, capsys):
    run = str(tmp_path / "lr")
    common = ["--subset", "64", "--device", "cpu", "--sample-every", "0"]
    assert main(["train", "--preset", "tiny", "--out", run, "--max-epochs", "1", *common]) == 0
    assert main(["train", "--resume", run, "--max-epochs", "2", "--lr", "0.0005"]) == 0
    assert "lr 0.001 -> 0.0005" in capsys.readouterr().out
    assert [r["lr"] for r in read_metrics(tmp_path / "lr")] == [1e-3, 5e-4]
    opt = CK.load_checkpoint(tmp_path / "lr" / "checkpoints" / "last.pt")["optimizer"]
    assert all(g["lr"] == 5e-4 for g in opt["param_groups"])


def test_warmup_and_kl_annealing_schedules():
    assert [S.warmup_factor(s, 4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert S.warmup_factor(0, 0) == 1.0
    assert [S.kl_beta(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert S.kl_beta(0, 0) == 1.0


def test_free_bits_and_beta_shape_the_objective():
    # With lr 0 the step changes nothing, so each objective can be read off its gradient norm:
    # beta 0 and free bits far above the KL must both remove the KL's gradient entirely.
    cfg, vae, opt, x = _step_setup()
    for g in opt.param_groups:
        g["lr"] = 0.0

    vae.eval()  # fixed BN statistics: the same forward every call
    torch.manual_seed(0)
    full = float(S.training_step(vae, vae, x, opt, cfg.train)["grad_norm"])
    torch.manual_seed(0)
    no_kl = float(S.training_step(vae, vae, x, opt, cfg.train, beta=0.0)["grad_norm"])
    torch.manual_seed(0)
    free = float(S.training_step(vae, vae, x, opt, cfg_for(free_bits=1e6).train)["grad_norm"])
    assert no_kl != pytest.approx(full)
    assert free == pytest.approx(no_kl, rel=1e-6)


# --- --lr-schedule cosine and --ema ---------------------------------------------------------
def test_cosine_factor_runs_from_one_to_zero():
    assert S.cosine_factor(0.0) == 1.0 and S.cosine_factor(0.5) == pytest.approx(0.5)
    assert S.cosine_factor(1.0) == pytest.approx(0.0, abs=1e-12) == S.cosine_factor(7.0)


def test_cosine_schedule_decays_the_lr_over_max_epochs(tmp_path):
    run = tmp_path / "run"
    train_small(cfg_for(max_epochs=4, batch_size=16, lr_schedule="cosine", lr=1e-3), run)
    lrs = [r["lr"] for r in read_metrics(run)]  # the lr of each epoch's last update
    assert all(a > b for a, b in zip(lrs, lrs[1:])), lrs
    # 16 updates in all; epoch k ends on update 4k - 1 (0-based)
    assert lrs == pytest.approx([1e-3 * S.cosine_factor((4 * k - 1) / 16) for k in (1, 2, 3, 4)])


def test_cosine_with_a_plateau_schedule_is_refused():
    from resvae.config import ConfigError
    with pytest.raises(ConfigError, match="lr_schedule"):
        cfg_for(lr_schedule="cosine", plateau_patience=3)


def test_ema_weights_are_evaluated_saved_and_resumed_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    sa = train_small(cfg_for(max_epochs=2, batch_size=16, ema=0.9), a)
    ck = CK.load_checkpoint(a / "checkpoints" / "last.pt")
    assert ck["ema_updates"] == sa["steps"] - sa["skipped_updates"]
    # the average differs from the raw weights, and it is what load_run and the test ELBO use
    k = next(k for k, v in ck["model"].items() if v.is_floating_point())
    assert not torch.equal(ck["ema"][k], ck["model"][k])
    vae, _ = CK.load_run(a, which="last")
    torch.testing.assert_close(vae.state_dict()[k], ck["ema"][k])
    # resume: the average continues where it stopped
    train_small(cfg_for(max_epochs=1, batch_size=16, ema=0.9), b)
    sb = train_small(cfg_for(max_epochs=2, batch_size=16, ema=0.9), b, resume=True)
    cb = CK.load_checkpoint(b / "checkpoints" / "last.pt")
    assert cb["ema_updates"] == ck["ema_updates"]
    for name, v in ck["ema"].items():
        torch.testing.assert_close(cb["ema"][name], v, rtol=1e-6, atol=1e-6, msg=name)
    assert sb["test_loss"] == pytest.approx(sa["test_loss"], rel=1e-6)
