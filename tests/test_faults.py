"""Faults a training run survives (docs/reliability.md, "Faults a run survives"): checkpoints
inside an epoch and an exact resume from them, a budget cut resumed exactly, SIGTERM / SIGINT,
non-finite states that never replace a finite checkpoint, --resume-from, the history of
invocations, one DDP rank dying.

"Exact" is bit for bit on CPU in fp32: the weights of last.pt and best.pt, every metrics
record (timings aside) and the test loss equal those of a run that was never stopped. The
in-process tests send real signals to this process from a callback at a chosen update; the
slow ones start `python -m resvae train` (and torchrun) as child processes and signal or
SIGKILL them while they train.
"""

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import child_env, free_port, load_dataset, train_small
from PIL import Image

import resvae.checkpoints as CK
import resvae.runs as R
from resvae.cli import main
from resvae.config import ConfigError, Every, resolve

T = importlib.import_module("resvae.train")  # the module: resvae.train is the function

pytestmark = pytest.mark.usefixtures("small_runs")

TIMING = {"epoch_seconds", "images_per_s", "train_seconds"}


def cfg_for(**overrides):
    base = {"subset": 256, "batch_size": 32, "device": "cpu", "max_epochs": 2,
            "sample_every": 0}
    return resolve(preset="tiny", environ={}, overrides={**base, **overrides})


def records(run):
    return [json.loads(ln) for ln in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def read_json(path):
    return json.loads(Path(path).read_text())


def assert_same_run(a, b):
    """Run b ended exactly where the uninterrupted run a did: checkpoints bit for bit, the
    metrics records (timings aside) and the test loss."""
    ra, rb = records(a), records(b)
    assert [r["epoch"] for r in rb] == [r["epoch"] for r in ra]
    for x, y in zip(ra, rb):
        assert {k: v for k, v in x.items() if k not in TIMING} == \
            {k: v for k, v in y.items() if k not in TIMING}, x["epoch"]
    for which in ("last", "best"):
        ca = CK.load_checkpoint(Path(a) / "checkpoints" / f"{which}.pt")
        cb = CK.load_checkpoint(Path(b) / "checkpoints" / f"{which}.pt")
        assert (ca["epoch"], ca["step"]) == (cb["epoch"], cb["step"]), which
        assert cb["progress"] is None
        assert ("ema" in ca) == ("ema" in cb)
        for part in ("model", "ema") if "ema" in ca else ("model",):
            for k, v in ca[part].items():
                assert torch.equal(cb[part][k], v), (which, part, k)
        for i, st in ca["optimizer"]["state"].items():
            for k, v in st.items():
                assert torch.equal(cb["optimizer"]["state"][i][k], v), (which, i, k)
    sa, sb = read_json(Path(a) / "summary.json"), read_json(Path(b) / "summary.json")
    assert sb["test_loss"] == sa["test_loss"]
    assert (sb["epochs"], sb["steps"], sb["best_epoch"]) == (sa["epochs"], sa["steps"],
                                                             sa["best_epoch"])


class SignalAt:
    """A callback that sends `signum` to this process after update `step` (log_every 1)."""

    def __init__(self, step, signum=signal.SIGTERM):
        self.step, self.signum = step, signum

    def on_step(self, step, stats):
        if step == self.step:
            os.kill(os.getpid(), self.signum)


# ------------------------------------------------------------------ checkpoint_every, parsing

@pytest.mark.parametrize("text, parsed", [
    ("", None), ("0", None), (" 0 ", None), ("500steps", ("steps", 500)), ("1step", ("steps", 1)),
    ("10m", ("seconds", 600.0)), ("90s", ("seconds", 90.0)), ("1h30m", ("seconds", 5400.0)),
    ("45", ("seconds", 45.0))])
def test_parse_checkpoint_every(text, parsed):
    assert Every(text).interval == parsed


@pytest.mark.parametrize("text", ["0steps", "steps", "10x", "-5m", "1.5steps"])
def test_bad_checkpoint_every_is_a_config_error(text):
    with pytest.raises(ConfigError, match="checkpoint_every"):
        Every(text)
    with pytest.raises(ConfigError, match="checkpoint_every"):
        cfg_for(checkpoint_every=text)


def test_checkpoints_inside_the_epoch_every_n_steps(tmp_path, monkeypatch):
    saved = []
    real = T.save_checkpoint
    monkeypatch.setattr(T, "save_checkpoint", lambda c, p: (saved.append(
        (Path(p).name, c["step"], c["progress"] and c["progress"]["batch"])), real(c, p))[1])
    train_small(cfg_for(checkpoint_every="3steps"), tmp_path / "run")  # 8 updates an epoch
    lasts = [(step, batch) for name, step, batch in saved if name == "last.pt"]
    # inside epoch 1 at updates 3 and 6, its end (8), inside epoch 2 at 9, 12, 15, its end
    assert lasts == [(3, 3), (6, 6), (8, None), (9, 1), (12, 4), (15, 7), (16, None)]


# ------------------------------------------------------------------ signals, in this process

@pytest.mark.parametrize("extra", [{}, {"ema": 0.9}, {"ema": 0.9, "guard": "device"}],
                         ids=["plain", "ema", "device-guard"])
def test_sigterm_inside_an_epoch_checkpoints_there_and_resume_is_exact(tmp_path, extra):
    a, b = tmp_path / "a", tmp_path / "b"
    train_small(cfg_for(**extra), a)
    s = train_small(cfg_for(log_every=1, **extra), b, callbacks=[SignalAt(11)])
    # stopped after update 11 (3 into epoch 2): no test, a checkpoint of exactly that place
    assert s["stop_reason"] == "SIGTERM" and s["test_loss"] is None
    assert (s["epochs"], s["steps"], s["inside_epoch_batches"]) == (1, 11, 3)
    ckpt = CK.load_checkpoint(b / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["step"], ckpt["progress"]["batch"]) == (1, 11, 3)
    assert read_json(b / "summary.json")["steps"] == ckpt["step"]  # nothing uncheckpointed
    assert [r["epoch"] for r in records(b)] == [1]  # the cut epoch has no record
    train_small(cfg_for(**extra), b, resume=True)
    assert_same_run(a, b)


def test_cpu_preset_with_max_epochs_resumes_exactly(tmp_path):
    # The cpu preset's cosine lr follows the clock only when its --budget sets the run's length;
    # with --max-epochs it follows the updates, so a stopped and resumed run is the same run.
    def cfg(**extra):
        return resolve(preset="cpu", environ={}, overrides={
            "subset": 64, "batch_size": 16, "max_epochs": 2, "sample_every": 0,
            "device": "cpu", "width": 0.125, "warmup_steps": 2, "dataset": "shapes", **extra})

    from resvae.step import schedule_follows_clock

    assert schedule_follows_clock(resolve(preset="cpu", environ={}).train)  # the 10-minute job
    assert not schedule_follows_clock(cfg().train)
    a, b = tmp_path / "a", tmp_path / "b"
    sa = train_small(cfg(), a)
    s = train_small(cfg(log_every=1), b, callbacks=[SignalAt(6)])  # inside epoch 2 of 4 updates
    assert s["stop_reason"] == "SIGTERM" and s["steps"] == 6
    sb = train_small(cfg(), b, resume=True)
    assert_same_run(a, b)
    assert sa["lr_follows_clock"] is False and sb["test_loss"] == sa["test_loss"]
    # the peak memory the README's targets quote (issue 20: under 4 GiB), as `time -v` says it
    import resource
    assert 0 < sa["peak_rss_bytes"] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_sigint_during_evaluation_stops_after_the_epochs_checkpoint(tmp_path, monkeypatch):
    real = T.evaluate
    calls = []

    def evaluate_then_sigint(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        if len(calls) == 1:  # while epoch 1 is being validated
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(T, "evaluate", evaluate_then_sigint)
    s = train_small(cfg_for(max_epochs=3), tmp_path / "run")
    assert s["stop_reason"] == "SIGINT"
    assert (s["epochs"], s["steps"], s["inside_epoch_batches"]) == (1, 8, 0)
    ckpt = CK.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["progress"]) == (1, None)
    assert len(calls) == 1  # no test evaluation after a signal


def test_a_second_signal_while_saving_changes_nothing(tmp_path, monkeypatch):
    # the second signal lands in the middle of torch.save: it is recorded, the write goes on
    real_save = torch.save
    hits = []

    def save_with_a_signal(obj, f, *a, **k):
        if obj.get("progress") is not None:
            hits.append(obj["step"])
            os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(CK.torch, "save", save_with_a_signal)
    s = train_small(cfg_for(log_every=1), tmp_path / "run", callbacks=[SignalAt(5)])
    assert hits == [5]
    assert s["stop_reason"] == "SIGTERM"  # the first signal decides
    ckpt = CK.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 5 and ckpt["progress"]["batch"] == 5
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["last.pt"]


def test_cli_exit_status_after_a_signal(tmp_path):
    real_train = T.train
    for signum, status in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out = tmp_path / signum.name
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(T, "train", lambda *a, sig=signum, **k: real_train(
                *a, **k, callbacks=[SignalAt(2, sig)]))
            rc = main(["train", "--preset", "tiny", "--out", str(out), "--subset", "256",
                       "--device", "cpu", "--sample-every", "0", "--log-every", "1"])
        assert rc == status
        assert read_json(out / "summary.json")["stop_reason"] == signum.name


# ------------------------------------------------------------------ budget

def test_budget_cut_then_resume_equals_uninterrupted(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    big = {"subset": 1024}  # 32 updates an epoch: a half-second budget ends inside epoch 1
    train_small(cfg_for(**big), a)
    cut = train_small(cfg_for(**big, budget="0.5s"), b)
    assert cut["stop_reason"] == "budget" and cut["inside_epoch_batches"] > 0
    cut_ckpt = CK.load_checkpoint(b / "checkpoints" / "last.pt")
    assert cut_ckpt["progress"]["batch"] == cut["inside_epoch_batches"]
    assert records(b)[-1]["partial"] is True
    s = train_small(cfg_for(**big), b, resume=True)  # (a budget flag on resume: a fresh one)
    assert s["stop_reason"] == "max_epochs"
    assert_same_run(a, b)


def test_a_budget_cut_better_than_every_ended_epoch_gives_the_tested_weights(tmp_path,
                                                                             monkeypatch):
    # the cpu preset anneals its lr to 0 at the budget: the cut state is its best, and what
    # the run must test and save (the cut stays out of early stopping and best_epoch's state)
    poll = T.poll
    monkeypatch.setattr(T, "poll", lambda s, state: (
        ("budget", poll(s, state)[1]) if state.step == 18 else poll(s, state)))
    run = tmp_path / "run"
    s = train_small(cfg_for(max_epochs=3), run)  # 8 updates an epoch: the cut is in epoch 3
    recs = records(run)
    assert [(r["epoch"], r["partial"]) for r in recs] == [(1, False), (2, False), (3, True)]
    assert recs[-1]["val_loss"] < min(r["val_loss"] for r in recs[:2])  # (the premise)
    assert (s["stop_reason"], s["best_epoch"], s["best_val_loss"]) == (
        "budget", 3, recs[-1]["val_loss"])
    # one account of the end: 2 epochs ended, epoch 3 cut after 2 batches, its cut tested
    assert (s["epochs"], s["partial_epoch"], s["inside_epoch_batches"]) == (2, 3, 2)
    assert s["account"] == (f"2 epoch(s) ended and 2 batches of epoch 3 before the stop; best "
                            f"(val loss {recs[-1]['val_loss']:.2f}): the weights at the cut "
                            "inside epoch 3")
    assert s["final_train_loss"] == recs[1]["train_loss"]  # the last ended epoch's
    best = CK.load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["progress"]["batch"] == 2 and best["best_epoch"] == 2
    assert s["test_loss"] == pytest.approx(recs[-1]["val_loss"], rel=0.05)


def test_resume_inside_an_epoch_with_another_batch_size_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    train_small(cfg_for(log_every=1), run, callbacks=[SignalAt(3)])
    rc = main(["train", "--resume", str(run), "--batch-size", "16"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "inside an epoch of 8 batches" in err and "16" in err


# ------------------------------------------------------------------ non-finite states

def test_a_diverged_epoch_never_replaces_the_finite_checkpoint(tmp_path, capsys):
    run = str(tmp_path / "run")
    common = ["--subset", "64", "--batch-size", "16", "--device", "cpu", "--sample-every", "0"]
    assert main(["train", "--preset", "tiny", "--out", run, "--max-epochs", "1", *common]) == 0
    good = (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes()
    capsys.readouterr()
    # lr 10: one applied update wrecks the weights, then every loss is NaN and is skipped
    rc = main(["train", "--resume", run, "--lr", "10", "--max-epochs", "10", "--max-skips", "5"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "is not finite" in err and "keeps epoch 1" in err
    assert "last finite state (epoch 1, step 4)" in err and "--lr 1" in err
    assert (tmp_path / "run" / "checkpoints" / "last.pt").read_bytes() == good
    recs = records(run)
    assert recs[0]["val_loss"] < 1e6 and not np.isfinite(recs[-1]["val_loss"])
    # the finite checkpoint resumes with a sane lr, and training is finite again
    assert main(["train", "--resume", run, "--lr", "0.001", "--max-epochs", "2"]) == 0
    recs = records(run)
    assert [r["epoch"] for r in recs] == [1, 2] and all(np.isfinite(r["val_loss"]) for r in recs)
    assert read_json(tmp_path / "run" / "summary.json")["skipped_updates"] == 0


def test_a_checkpoint_inside_an_epoch_after_skips_is_not_written(tmp_path, monkeypatch,
                                                                capsys):
    # NaN input from update 6 on (inside epoch 1 of 8 updates): the checkpoint due at update 6
    # follows a skipped update, so last.pt keeps update 3's finite state; update 7 is the
    # second skip in a row, more than max_skips 1: the run stops there
    real = T.training_step
    n = [0]

    def nan_from_6(model, vae, x, *a, **k):
        n[0] += 1
        return real(model, vae, x if n[0] < 6 else torch.full_like(x, float("nan")), *a, **k)

    monkeypatch.setattr(T, "training_step", nan_from_6)
    s = train_small(cfg_for(checkpoint_every="3steps", max_skips=1, max_epochs=5),
                    tmp_path / "run")
    assert s["stop_reason"] == "non_finite" and s["steps"] == 7
    ckpt = CK.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert ckpt["step"] == 3 and ckpt["finite"] is True and ckpt["progress"]["batch"] == 3
    err = capsys.readouterr().err
    assert "step 6 (inside epoch 1) is not finite" in err and "keeps epoch 0, step 3" in err


# ------------------------------------------------------------------ --resume-from

def _val_losses(monkeypatch, losses):
    it = iter(losses)

    def scripted(vae, images, *a, **k):
        return {"loss": next(it), "rate": 1.0, "distortion": 1.0, "bpd": 1.0}

    monkeypatch.setattr(T, "evaluate", scripted)


def test_resume_from_best_and_from_a_kept_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    common = ["--subset", "64", "--batch-size", "16", "--device", "cpu", "--sample-every", "0",
              "--bn-recalibrate", "0"]
    _val_losses(monkeypatch, [10.0, 5.0, 7.0, 0.0])  # 3 epochs + test: epoch 2 is the best
    assert main(["train", "--preset", "tiny", "--out", str(run), "--max-epochs", "3",
                 *common]) == 0
    first = CK.load_checkpoint(run / "checkpoints" / "last.pt")
    assert CK.load_checkpoint(run / "checkpoints" / "best.pt")["epoch"] == 2
    shutil.copy(run / "checkpoints" / "best.pt", tmp_path / "aside.pt")

    _val_losses(monkeypatch, [7.0, 0.0])  # epoch 3 again, then the test
    assert main(["train", "--resume", str(run), "--resume-from", "best"]) == 0
    assert "resuming after epoch 2" in capsys.readouterr().out
    assert [r["epoch"] for r in records(run)] == [1, 2, 3]
    again = CK.load_checkpoint(run / "checkpoints" / "last.pt")
    assert again["epoch"] == 3  # epoch 3 retrained from epoch 2's state: the same weights
    for k, v in first["model"].items():
        assert torch.equal(again["model"][k], v), k
    hist = R.read_history(run)
    assert hist[-1]["resumed_from"]["checkpoint"].endswith("best.pt")
    assert hist[-1]["resumed_from"]["epoch"] == 2

    _val_losses(monkeypatch, [7.0, 0.0])
    assert main(["train", "--resume", str(run), "--resume-from", str(tmp_path / "aside.pt")]) == 0
    assert R.read_history(run)[-1]["resumed_from"]["checkpoint"] == str(tmp_path / "aside.pt")

    (run / "checkpoints" / "best.pt").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--resume-from", "best"]) == 2
    assert "no checkpoints/best.pt" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--resume-from", str(tmp_path / "no.pt")]) == 2
    assert "no.pt: no such file" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--resume-from", "best"]) == 2
    assert "give --resume too" in capsys.readouterr().err


def test_resume_from_a_checkpoint_of_another_model_is_refused(tmp_path, capsys):
    train_small(cfg_for(max_epochs=1), tmp_path / "a")
    train_small(cfg_for(max_epochs=1, latent_dim=4), tmp_path / "b")
    rc = main(["train", "--resume", str(tmp_path / "a"), "--resume-from",
               str(tmp_path / "b" / "checkpoints" / "last.pt")])
    assert rc == 2
    assert "another model" in capsys.readouterr().err


def test_train_help_documents_resume_from_and_checkpoint_every(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--resume-from CHECKPOINT" in out and "best: its best epoch" in out
    assert "--checkpoint-every EVERY" in out and "500steps" in out
    assert "exit status 143 / 130" in out


# ------------------------------------------------------------------ records across invocations

def test_history_keeps_every_invocation(tmp_path):
    run = tmp_path / "run"
    common = ["--subset", "64", "--batch-size", "16", "--device", "cpu", "--sample-every", "0"]
    first = ["train", "--preset", "tiny", "--out", str(run), "--max-epochs", "1", *common]
    assert main(first) == 0
    assert main(["train", "--resume", str(run), "--max-epochs", "2"]) == 0
    assert read_json(run / "argv.json") == ["resvae", *first]  # the command that started it
    hist = R.read_history(run)
    assert [h["invocation"] for h in hist] == [1, 2]
    assert hist[0]["argv"] == ["resvae", *first] and hist[0]["resumed_from"] is None
    assert hist[1]["argv"][-2:] == ["--max-epochs", "2"]
    assert hist[1]["resumed_from"] == {"checkpoint": str(run / "checkpoints" / "last.pt"),
                                       "epoch": 1, "step": 4, "inside_epoch": False}
    assert [h["stop_reason"] for h in hist] == ["max_epochs", "max_epochs"]
    assert [(h["epochs"], h["steps"]) for h in hist] == [(1, 4), (2, 8)]
    assert all(h["started"] <= h["stopped"] and h["wall_seconds"] > 0 for h in hist)
    s = read_json(run / "summary.json")
    assert s["invocations"] == 2
    assert s["wall_seconds"] == hist[1]["wall_seconds"]
    assert s["total_wall_seconds"] == pytest.approx(hist[0]["wall_seconds"] + hist[1]["wall_seconds"])
    # training time: this invocation's (epoch 2) apart from the run's (epochs 1 and 2)
    assert s["training_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in records(run)))
    assert s["invocation_training_seconds"] == pytest.approx(records(run)[1]["epoch_seconds"])


def test_a_crash_is_recorded_in_the_history(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(T, "end_epoch", boom)
    with pytest.raises(RuntimeError):
        train_small(cfg_for(), tmp_path / "run")
    (h,) = R.read_history(tmp_path / "run")
    assert h["stop_reason"] == "error: RuntimeError: disk on fire" and h["stopped"]


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (ckpts / f".last.pt.tmp{dead.pid}").write_bytes(b"half")
    (ckpts / f".last.pt.tmp{os.getpid()}").write_bytes(b"mine, still writing")
    assert R.remove_stale_temps(ckpts) == [ckpts / f".last.pt.tmp{dead.pid}"]
    assert sorted(p.name for p in ckpts.iterdir()) == [f".last.pt.tmp{os.getpid()}"]


# ------------------------------------------------------------------ child processes

def image_folder(root: Path, n_train=192, n_test=24) -> Path:
    """A tiny `folder` data set of random 32x32 RGB images in 3 classes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in range(3):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(n // 3):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
                    d / f"{i}.png")
    return root


def train_cmd(data: Path, out: Path, *extra) -> list:
    return [sys.executable, "-m", "resvae", "train", "--preset", "tiny", "--dataset", "folder",
            "--data-dir", str(data), "--subset", "0", "--batch-size", "16", "--device", "cpu",
            "--sample-every", "0", "--out", str(out), *extra]


def wait_for(cond, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (got := cond()) is not None:
            return got
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before the fault: "
                        + proc.stderr.read()[-2000:])
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for the run")


def checkpoint_in(run: Path, cond):
    try:
        ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    except (FileNotFoundError, RuntimeError, EOFError):
        return None
    return ckpt if cond(ckpt) else None


@pytest.mark.slow  # ~15 s: three interpreters importing torch, 3 short epochs each
def test_sigkill_inside_an_epoch_then_resume_equals_uninterrupted(tmp_path):
    data, env = image_folder(tmp_path / "data"), child_env(tmp_path)
    ref, run = tmp_path / "ref", tmp_path / "run"
    p = subprocess.run(train_cmd(data, ref, "--max-epochs", "3", "--checkpoint-every", ""),
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    # 12 updates an epoch, a checkpoint every 5: killed soon after one inside epoch 1 or 2
    proc = subprocess.Popen(train_cmd(data, run, "--max-epochs", "50", "--checkpoint-every",
                                      "5steps"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = wait_for(lambda: checkpoint_in(run, lambda c: c["progress"] is not None
                                          and c["epoch"] <= 1), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=300) == -signal.SIGKILL
    assert seen["progress"]["batch"] % 12 and seen["step"] % 5 == 0
    p = subprocess.run([sys.executable, "-m", "resvae", "train", "--resume", str(run),
                        "--max-epochs", "3"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(ref, run)
    killed, resumed = R.read_history(run)
    assert "stopped" not in killed  # it never got to say
    assert resumed["resumed_from"]["step"] >= seen["step"] and resumed["stop_reason"] == \
        "max_epochs"


@pytest.mark.slow  # ~10 s: two runs, each signalled once it has trained an epoch
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_to_a_running_train_command(tmp_path, signum, status):
    data, env = image_folder(tmp_path / "data"), child_env(tmp_path)
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(data, run, "--max-epochs", "100", "--checkpoint-every",
                                      ""), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: 1 if (run / "metrics.jsonl").exists() else None, proc)
    proc.send_signal(signum)
    # once it has taken that one (signals pending together are taken lowest number first),
    # two more while it finishes its update and writes the checkpoint (one sent after train()
    # has returned and given the handlers back would end the process the default way, with
    # every file written by then)
    announced = ""
    while "stopping after this update" not in announced:
        announced = proc.stderr.readline()
        assert announced, "the run ended without taking the signal"
    assert announced.startswith(f"resvae: {signum.name}: stopping after this update")
    proc.send_signal(signal.SIGTERM if signum == signal.SIGINT else signal.SIGINT)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == status, err[-3000:]
    assert "already stopping: ignored until the checkpoint is written" in err
    summary = read_json(run / "summary.json")
    ckpt = CK.load_checkpoint(run / "checkpoints" / "last.pt")
    assert summary["stop_reason"] == signum.name
    assert (summary["epochs"], summary["steps"]) == (ckpt["epoch"], ckpt["step"])
    assert sorted(os.listdir(run / "checkpoints")) == ["best.pt", "last.pt"]  # no temp file
    assert R.read_history(run)[-1]["stop_reason"] == signum.name
    assert f"resvae train --resume {run}" in out


def _workers(parent: int) -> dict:
    """{rank: pid} of torchrun's worker processes (Linux /proc)."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != parent:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        for var in env:
            if var.startswith(b"RANK="):
                out[int(var[5:])] = int(stat.parent.name)
    return out


@pytest.mark.slow  # ~30 s: two torchrun launches of 2 gloo processes
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds workers in /proc")
def test_one_ddp_rank_killed_the_other_exits_and_the_run_resumes(tmp_path):
    data, env = image_folder(tmp_path / "data"), child_env(tmp_path)
    run = tmp_path / "run"

    def torchrun(*args):
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
                "resvae", "train", *args]

    cmd = torchrun(*train_cmd(data, run, "--max-epochs", "100", "--checkpoint-every", "2steps",
                              "--ddp-timeout", "30s")[4:])
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for(lambda: checkpoint_in(run, lambda c: c["step"] >= 4), proc)
    ranks = _workers(proc.pid)
    assert sorted(ranks) == [0, 1], ranks
    t0 = time.monotonic()
    os.kill(ranks[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    # bounded (generously, for a loaded machine): not the default collective timeout of 30 min
    assert time.monotonic() - t0 < 120
    assert proc.returncode != 0
    assert "exitcode  : -9" in err or "Signal 9" in err or "SIGKILL" in err, err[-3000:]
    # the survivor says what happened and how to go on
    assert "resvae: rank 0: the run failed under torchrun" in err, err[-3000:]
    assert f"train --resume {run}" in err
    ckpt = CK.load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] >= 4
    # the run resumes from its last checkpoint, with as many processes
    done = ckpt["epoch"] + 1
    p = subprocess.run(torchrun("--resume", str(run), "--max-epochs", str(done)), env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = read_json(run / "summary.json")
    assert summary["stop_reason"] == "max_epochs" and summary["epochs"] == done
    assert summary["world_size"] == 2


def test_data_deleted_during_a_run_changes_nothing(tmp_path, monkeypatch):
    # data are decoded once, into memory, before the first update: a data set (and its cache)
    # that vanishes mid-run cannot fail a read, because no read happens any more
    from resvae import data as data_module

    monkeypatch.setattr(data_module, "load_dataset", load_dataset)  # the real loader
    folder = image_folder(tmp_path / "data", n_train=96, n_test=24)

    class DeleteData:
        def on_step(self, step, stats):
            if step == 1:
                shutil.rmtree(folder)
                shutil.rmtree(tmp_path / "cache", ignore_errors=True)  # the decoded copy

    cfg = cfg_for(dataset="folder", data_dir=str(folder), subset=0, batch_size=16, log_every=1)
    s = T.train(cfg, tmp_path / "run", progress=False, callbacks=[DeleteData()])
    assert not folder.exists() and s["stop_reason"] == "max_epochs" and s["steps"] == 12
    assert np.isfinite(s["test_loss"])


def test_a_real_full_file_system_exits_74_with_the_line(tmp_path):
    # not an injected OSError: a 3 MB tmpfs, where torch's zip writer fails its own end-of-file
    # check ("unexpected pos") before any OSError reaches Python
    import shutil
    import subprocess
    import sys

    from conftest import child_env

    full = tmp_path / "full"
    full.mkdir()
    if not shutil.which("mount") or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(full)],
            capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root and mount)")
    try:
        p = subprocess.run([sys.executable, "-m", "resvae", "train", "--preset", "tiny",
                            "--width", "0.25", "--max-epochs", "2", "--out", str(full / "run")],
                           env=child_env(tmp_path), capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(full)], check=False)
    assert p.returncode == 74, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert "the disk is full" in last and "Traceback" not in p.stderr
