"""DistributedDataParallel on CPU: 2 gloo processes.

One spawn of 2 workers (module fixture) does all in-process work, to pay the start-up once:
  A. resvae.train.train() on the tiny config; each rank records the weights `evaluate` sees
     and what its callback was told (rank 0's alone is called);
  B. hand-written loops (training_step on a D.wrap-ped model) with and without sync BN, each
     rank taking its half of every global batch; the test compares them to a 1-process loop on
     the whole global batches.
Plus one launch through the real launcher, `python -m torch.distributed.run ... -m resvae train`.
"""

import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

WORLD = 2
PER_RANK = 8  # per-rank batch b; the 1-process reference uses 2b
STEPS = 3
# Small: at 1e-4, float32 rounding alone (a permuted batch) shifts weights by 1e-3 in 3 steps.
LR = 3e-6


def _cfg(**overrides):
    from resvae.config import resolve

    base = {"subset": 64, "batch_size": 16, "device": "cpu", "max_epochs": 2, "sample_every": 0}
    return resolve(preset="tiny", environ={}, overrides={**base, **overrides})


def _small_splits(load_dataset=None):
    """64 train images; val and test 64 images each (not the 2000 of the shapes test split)."""
    from resvae.data import ImageSet

    if load_dataset is None:
        from resvae.data import load_dataset
    d = load_dataset("shapes", subset=64)
    d.val = ImageSet(d.test.images[:64], None, d.test.classes)
    d.test = ImageSet(d.test.images[64:128], None, d.test.classes)
    return d


def _fixed_noise(mean, logvar):
    # Deterministic reparameterisation (the same "noise" for an image on any rank), so a split
    # batch and the whole batch see identical forward passes.
    return mean + torch.exp(0.5 * logvar) * 0.5


def _global_batches():
    x = torch.from_numpy(_small_splits().train.images[:STEPS * WORLD * PER_RANK])
    return list(x.float().div(255).split(WORLD * PER_RANK))


def _hand_loop(model, vae, batches, tc, rt=None):
    from resvae.step import training_step

    opt = torch.optim.SGD(vae.parameters(), lr=LR)
    skipped = [training_step(model, vae, x, opt, tc, rt=rt)["skipped"] for x in batches]
    assert not any(skipped)
    return {k: v.detach().clone() for k, v in vae.state_dict().items()}


def _worker(rank, port, out):
    import faulthandler

    faulthandler.enable()  # a worker that aborts in C++ (SIGABRT) prints its Python stack
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import torch.distributed as dist

    import resvae.data as data_module
    import resvae.step as S
    T = importlib.import_module("resvae.train")  # the module: resvae.train is the function
    import resvae.vae as V
    from resvae import distributed as D

    out = Path(out)
    # --- A: train() end to end; record the weights of every evaluation on every rank --------
    real_load = data_module.load_dataset  # (train's load_splits calls the patched one)
    data_module.load_dataset = lambda *a, **k: _small_splits(real_load)
    real_eval, n_eval = T.evaluate, [0]

    def recording_evaluate(vae, images, *a, **k):
        n_eval[0] += 1
        torch.save(vae.state_dict(), out / f"eval{n_eval[0]}_rank{rank}.pt")
        return real_eval(vae, images, *a, **k)

    T.evaluate = recording_evaluate
    D.teardown = lambda rt, sync=False: None  # keep the process group for part B
    steps = []

    class StepRecorder:
        def on_step(self, step, stats):
            steps.append(stats)

    summary = T.train(_cfg(log_every=1), out / "run", progress=False, callbacks=[StepRecorder()])
    (out / f"summary_rank{rank}.json").write_text(json.dumps(summary))
    (out / f"steps_rank{rank}.json").write_text(json.dumps(steps))

    # --- B: hand loops, each rank on its half of every global batch ---------------------------
    V.VAE.reparameterize = staticmethod(_fixed_noise)
    rt = D.setup("cpu")
    assert rt.rank == rank and rt.world_size == WORLD and dist.is_initialized()
    mine = [x[rank * PER_RANK:(rank + 1) * PER_RANK] for x in _global_batches()]
    for sync in (True, False):
        cfg = _cfg(sync_bn=sync)  # True is not the default: the setting must reach D.wrap
        torch.manual_seed(0)
        vae = V.build_from_config(cfg, (3, 32, 32))
        model = D.wrap(vae, rt, sync_bn=cfg.train.sync_bn)
        bns = [type(m).__name__ for m in model.modules()
               if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        (out / f"hand_sync{int(sync)}_rank{rank}_norms.json").write_text(json.dumps(bns))
        state = _hand_loop(model, D.unwrap(model), mine, cfg.train, rt)
        torch.save(state, out / f"hand_sync{int(sync)}_rank{rank}.pt")
    # --- C: --guard device; the model is not DDP-wrapped, so rank 1's NaN batch reaches rank 0
    # only through the guard's own collective (D.all_ranks): both must skip that update
    cfg = _cfg(guard="device")
    torch.manual_seed(0)
    vae = V.build_from_config(cfg, (3, 32, 32))
    opt = S.make_optimizer(vae, cfg.train)
    flags = []
    for i, x in enumerate(mine):
        x = torch.full_like(x, float("nan")) if (i, rank) == (1, 1) else x
        skipped = S.training_step(vae, vae, x, opt, cfg.train, rt=rt)["skipped"]
        flags.append([type(skipped).__name__, bool(skipped)])
    (out / f"devguard_rank{rank}.json").write_text(json.dumps(flags))
    # --- D: --channels-last under DDP (hier, whose top bias is 1x1): no grad / bucket stride
    # mismatch warning from the reducer
    from resvae.config import resolve
    cfg = resolve(preset="cpu", environ={}, overrides={"width": 0.0625, "device": "cpu"})
    torch.manual_seed(0)
    model = D.wrap(S.to_channels_last(V.build_from_config(cfg, (3, 32, 32))), rt, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(mine[0].contiguous(memory_format=torch.channels_last))["loss"].mean().backward()
    (out / f"cl_warnings_rank{rank}.json").write_text(json.dumps([str(w.message)
                                                                  for w in caught]))
    # Both ranks past their last collective before either tears its gloo pairs down: one CI
    # run saw a rank abort ("terminate called without an active exception") here or earlier.
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    import torch.multiprocessing as mp
    from conftest import clear_resvae_env, free_port

    out = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as env:
        clear_resvae_env(env, out / "cache")  # inherited by the spawned workers
        _small_splits()  # fill nothing on disk (shapes is generated) but fail early if broken
        ctx = mp.start_processes(_worker, args=(free_port(), str(out)), nprocs=WORLD,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail("DDP workers did not finish in 120 s")
    return out


def _load(path):
    return torch.load(path, weights_only=True)


BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _split(state):
    params = {k: v for k, v in state.items() if not k.endswith(BUFFERS)}
    return params, {k: v for k, v in state.items() if k.endswith(BUFFERS)}


def _evals(ddp_out, rank):
    paths = sorted(ddp_out.glob(f"eval*_rank{rank}.pt"))
    return [_load(ddp_out / f"eval{i}_rank{rank}.pt") for i in range(1, len(paths) + 1)]


def test_ddp_train_ranks_end_with_identical_weights(ddp_out):
    s0 = json.loads((ddp_out / "summary_rank0.json").read_text())
    s1 = json.loads((ddp_out / "summary_rank1.json").read_text())
    assert s0["world_size"] == s1["world_size"] == 2
    assert s0["stop_reason"] == s1["stop_reason"] == "max_epochs"
    assert s0["epochs"] == 2 and s0["steps"] == s1["steps"] == 2 * 2  # 64 train / (2 x 16)
    ev0, ev1 = _evals(ddp_out, 0), _evals(ddp_out, 1)
    assert len(ev0) == len(ev1) == 3  # 2 val evaluations + the test split
    for i, (a, b) in enumerate(zip(ev0, ev1), 1):
        assert a.keys() == b.keys()
        pa, pb = _split(a)[0], _split(b)[0]
        assert len(pa) > 50
        for k in pa:
            torch.testing.assert_close(pb[k], pa[k], rtol=0, atol=1e-6, msg=f"eval {i}: {k}")
    # the weights did move between evaluations (the comparison is not of untouched inits)
    assert any(not torch.equal(ev0[0][k], ev0[1][k]) for k in _split(ev0[0])[0])
    # rank 0 alone writes the run directory, one metrics record per epoch
    recs = (ddp_out / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in recs] == [1, 2]
    ckpt = _load(ddp_out / "run" / "checkpoints" / "last.pt")
    for k, v in ev0[1].items():
        assert torch.equal(ckpt["model"][k], v), k


def test_ddp_callbacks_on_rank_0_see_means_over_ranks(ddp_out):
    steps = [json.loads((ddp_out / f"steps_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(steps[0]) == 4 and steps[1] == []  # every update on rank 0, nothing on rank 1
    recs = [json.loads(r) for r in (ddp_out / "run" / "metrics.jsonl").read_text().splitlines()]
    for epoch, rec in enumerate(recs):  # each epoch's mean is the mean of its 2 logged steps,
        logged = steps[0][2 * epoch:2 * epoch + 2]  # which are already means over both ranks
        for key, col in (("train_loss", "loss"), ("rate", "rate"), ("distortion", "distortion")):
            assert rec[key] == pytest.approx(sum(s[col] for s in logged) / 2, rel=1e-12), key


def test_ddp_device_guard_skips_on_every_rank_when_one_is_non_finite(ddp_out):
    for rank in range(WORLD):
        flags = json.loads((ddp_out / f"devguard_rank{rank}.json").read_text())
        assert flags == [["Tensor", False], ["Tensor", True], ["Tensor", False]], rank


def test_ddp_channels_last_gives_no_grad_stride_warning(ddp_out):
    for rank in range(WORLD):
        caught = json.loads((ddp_out / f"cl_warnings_rank{rank}.json").read_text())
        assert not [w for w in caught if "strides" in w], caught


def test_ddp_ranks_evaluate_the_same_model(ddp_out):
    for i, (a, b) in enumerate(zip(_evals(ddp_out, 0), _evals(ddp_out, 1)), 1):
        for k, v in _split(a)[1].items():
            torch.testing.assert_close(_split(b)[1][k], v, rtol=0, atol=1e-6,
                                       msg=f"eval {i}: {k}")


@pytest.fixture(scope="module")
def reference():
    """1 process, the whole global batches (2b), same init and noise."""
    import resvae.vae as V

    mp = pytest.MonkeyPatch()
    mp.setattr(V.VAE, "reparameterize", staticmethod(_fixed_noise))
    try:
        cfg = _cfg()
        torch.manual_seed(0)
        vae = V.build_from_config(cfg, (3, 32, 32))
        return _hand_loop(vae, vae, _global_batches(), cfg.train)
    finally:
        mp.undo()


def _max_diff(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a
               if a[k].is_floating_point())


def test_sync_bn_matches_one_process_with_double_batch(ddp_out, reference):
    init = _cfg()
    for rank in range(WORLD):
        # every BatchNorm (2d in the blocks, 1d in the decoder's dense layer) was synchronised
        norms = json.loads((ddp_out / f"hand_sync1_rank{rank}_norms.json").read_text())
        assert len(norms) > 20 and set(norms) == {"CPUSyncBatchNorm"}
        plain = json.loads((ddp_out / f"hand_sync0_rank{rank}_norms.json").read_text())
        assert len(plain) == len(norms) and "CPUSyncBatchNorm" not in plain
        got = _load(ddp_out / f"hand_sync1_rank{rank}.pt")
        assert got.keys() == reference.keys()
        for k, v in reference.items():
            torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {k}")
    # and training moved the weights well beyond the tolerance
    import resvae.vae as V

    torch.manual_seed(0)
    start = V.build_from_config(init, (3, 32, 32)).state_dict()
    assert _max_diff(_split(start)[0], _split(reference)[0]) > 1e-4


def test_without_sync_bn_ranks_differ_from_one_process(ddp_out, reference):
    got = _load(ddp_out / "hand_sync0_rank0.pt")
    # per-rank BN statistics: different gradients, so different weights (not only buffers)
    assert _max_diff(_split(got)[0], _split(reference)[0]) > 1e-5


@pytest.mark.slow  # 8-17 s on 2 shared cores: two fresh interpreters importing torch, then a run
def test_torchrun_launch_end_to_end(tmp_path):
    from conftest import child_env, free_port

    run = tmp_path / "run"
    env = child_env(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "resvae",
           "train", "--preset", "tiny", "--out", str(run), "--max-epochs", "1", "--subset", "256",
           "--device", "cpu", "--val-fraction", "0.25", "--sample-every", "0"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["stop_reason"] == "max_epochs"
    assert summary["steps"] == 3  # 192 train images (64 held out for val), 2 ranks x 32 a step
    recs = (run / "metrics.jsonl").read_text().splitlines()
    assert len(recs) == 1 and json.loads(recs[0])["epoch"] == 1
    assert p.stdout.count("epoch    1") == 1  # only rank 0 logs


def test_ranks_are_read_from_torchrun_or_srun_and_a_batch_script_is_no_rank():
    from resvae.distributed import launch_env, launched_as_main

    srun = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_LOCALID": "1",
            "SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0"}
    env = launch_env(srun)  # no node list: the master is this host
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == str(20000 + 49)
    assert not launched_as_main(srun) and launched_as_main({**srun, "SLURM_PROCID": "0"})
    batch = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_ID": "7"}  # sbatch's shell
    assert launch_env(batch) is None and launched_as_main(batch)
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", **srun}
    assert launch_env(torchrun) is None and not launched_as_main(torchrun)
    assert launched_as_main({})
