"""`resvae sweep --launcher slurm` against a real Slurm cluster (tests/cluster/slurm-up.sh brings
up a one-node one; CI does). Skipped, with the reason, where no cluster answers or submitit is
missing."""

import json
import shutil
import subprocess

import pytest

from resvae.cli import main

pytest.importorskip("submitit", reason="submitit not installed (pip install -e '.[slurm]')")


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    up = ("idle", "mixed", "allocated", "completing")  # not down, drained or failing
    return out.returncode == 0 and any(s.strip("*~#") in up for s in out.stdout.split())


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(
    not _cluster_up(), reason="no Slurm cluster reachable (bash tests/cluster/slurm-up.sh)")]


def _submit_one_run(tmp_path, max_epochs: int):
    """One tiny run (checkpoints every 4 updates) submitted as a one-task array; returns its
    spec, sweep folder, job id and run folder."""
    from resvae.slurm import SlurmSettings
    from resvae.sweep import SweepSpec, submit_slurm

    fixed = {"subset": 256, "max_epochs": max_epochs, "sample_every": 0, "device": "cpu",
             "batch_size": 16, "checkpoint_every": "4steps"}
    spec = SweepSpec(grid={"depth": [20]}, preset="tiny", fixed=fixed, iwae_k=0)
    out = tmp_path / "sw"
    [entry] = submit_slurm(spec, out, SlurmSettings(time="10m"), environ={},
                           log=lambda *a: None)
    return spec, out, entry["job_id"], out / "depth020"


def test_sweep_on_slurm_runs_each_point_as_an_array_task(tmp_path, clean_env, capsys):
    from resvae.slurm import SlurmSettings
    from resvae.sweep import SweepSpec, submit_slurm

    out = tmp_path / "sw"
    spec = SweepSpec(grid={"depth": [20], "shortcut": ["identity", "none"]}, preset="tiny",
                     fixed={"subset": 64, "max_epochs": 1, "sample_every": 0, "device": "cpu"},
                     iwae_k=2, iwae_n=4)
    entries = submit_slurm(spec, out, SlurmSettings(time="10m"), environ={}, wait=True,
                           poll_seconds=1, log=lambda *a: None)
    assert [e["status"] for e in entries] == ["done", "done"]
    status = json.loads((out / "sweep.json").read_text())
    ids = [e["job_id"] for e in status["runs"]]
    assert all(ids) and len({i.split("_")[0] for i in ids}) == 1  # one job array
    for name in ("depth020-identity", "depth020-none"):
        assert json.loads((out / name / "summary.json").read_text())["stop_reason"] == "max_epochs"
        assert (out / name / "eval.json").is_file()
    assert (out / "results.md").is_file()
    capsys.readouterr()
    assert main(["sweep", "--status", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all(" done " in ln and "epoch 1" in ln for ln in lines)
    # the same sweep again submits nothing: both runs are finished
    again = submit_slurm(spec, out, SlurmSettings(time="10m"), environ={}, log=lambda *a: None)
    assert [e["job_id"] for e in again] == ids and [e["status"] for e in again] == ["done"] * 2


@pytest.mark.slow  # about a minute: 8 array tasks, 2 at a time on the one-node cluster
def test_a_seeded_2x2x2_sweep_through_the_cli_waits_reports_n2_and_resubmits_nothing(
        tmp_path, clean_env, capsys):
    import csv

    out = tmp_path / "sw"
    argv = ["sweep", "--preset", "tiny", "--depths", "20,24", "--shortcut", "identity,none",
            "--seeds", "0,1", "--launcher", "slurm", "--time", "10m", "--subset", "64",
            "--max-epochs", "1", "--sample-every", "0", "--device", "cpu", "--iwae-k", "2",
            "--iwae-n", "4", "--out", str(out)]
    assert main([*argv, "--wait"]) == 0
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert len(runs) == 8 and all(e["status"] == "done" for e in runs)
    with open(out / "aggregate.csv") as f:
        aggregate = list(csv.DictReader(f))
    with open(out / "paired.csv") as f:
        paired = list(csv.DictReader(f))
    assert len(aggregate) == 4 and all(r["test_bpd_n"] == "2" for r in aggregate)
    assert len(paired) == 2 and all(r["test_bpd_n"] == "2" for r in paired)
    ids = [e["job_id"] for e in runs]
    capsys.readouterr()
    assert main(argv) == 0  # again: everything is done, nothing is submitted
    assert [e["job_id"] for e in json.loads((out / "sweep.json").read_text())["runs"]] == ids
    assert "0 of 8 runs submitted" in capsys.readouterr().out


@pytest.mark.slow  # about 80 s: two requeues and the reference run
def test_a_requeued_task_resumes_and_ends_as_an_uninterrupted_run(tmp_path, clean_env):
    # Interrupted twice while it trains, the two ways Slurm stops a task, then resumed; the
    # losses are those of a run never stopped (CPU, fp32):
    # 1. `scontrol requeue` (what preemption does): Slurm sends SIGTERM, resvae train
    #    checkpoints, the task goes back to pending;
    # 2. USR2, the signal Slurm sends before the time limit (submitit's --signal USR2@90), sent
    #    here with `scancel --signal` instead of waiting minutes for a real limit: submitit's
    #    handler calls RunTask.checkpoint, which stops the training child through its SIGTERM
    #    path, then requeues the task itself.
    import time

    from resvae.config import resolve
    from resvae.slurm import queue_states
    from resvae.train import train

    spec, out, job, run = _submit_one_run(tmp_path, max_epochs=20)
    hist, last = run / "history.jsonl", run / "checkpoints" / "last.pt"
    for i in range(2):  # requeue once invocation i + 1 has written a checkpoint of its own
        deadline = time.monotonic() + 120
        while not (hist.exists() and len(hist.read_text().splitlines()) == i + 1):
            assert time.monotonic() < deadline, "the task did not start"
            time.sleep(0.2)
        started = time.time()
        while not (last.exists() and last.stat().st_mtime > started):
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.2)
        if i == 0:
            subprocess.run(["scontrol", "requeue", job], check=True)
        else:
            subprocess.run(["scancel", "--signal", "USR2", job], check=True)
        # Slurm holds a requeued job back (pending, reason BeginTime) for two minutes: once it
        # is pending again, let it start now
        while queue_states([job]).get(job) != "PENDING":
            time.sleep(0.5)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    while queue_states([job]):
        time.sleep(1)
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 3 and history[-1]["stop_reason"] == "max_epochs"  # 2 requeues
    logs = "".join(p.read_text() for p in (out / "slurm").glob(f"{job}_*_log.*"))
    assert "Calling checkpoint method" in logs  # the USR2 went through RunTask.checkpoint
    # ... which stopped the child through SIGTERM (it ignores USR2): a checkpoint and a summary
    assert [h.get("stop_reason") for h in history[:2]] == ["SIGTERM", "SIGTERM"]
    ref = train(resolve(preset="tiny", environ={}, overrides={**spec.fixed, "depth": 20}),
                tmp_path / "ref", progress=False)
    got = json.loads((run / "summary.json").read_text())
    assert got["test_loss"] == ref["test_loss"] and got["best_val_loss"] == ref["best_val_loss"]


def test_srun_two_tasks_train_as_torchrun_two_processes(tmp_path, clean_env):
    # `srun --ntasks 2 resvae train` reads rank, world size, local rank and the master from
    # Slurm's environment: the same run (gloo, CPU) as `torchrun --nproc_per_node 2`
    import sys

    from conftest import child_env, free_port

    args = ["-m", "resvae", "train", "--preset", "tiny", "--subset", "64", "--batch-size", "16",
            "--max-epochs", "2", "--sample-every", "0", "--device", "cpu"]
    env = child_env(tmp_path)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_port", str(free_port()), "-m", "resvae", *args[2:],
                    "--out", str(tmp_path / "torchrun")], env=env, check=True, timeout=300)
    subprocess.run(["srun", "--ntasks", "2", sys.executable, *args, "--out",
                    str(tmp_path / "srun")], env=env, check=True, timeout=300)
    for run in ("torchrun", "srun"):
        assert json.loads((tmp_path / run / "summary.json").read_text())["world_size"] == 2
    losses = [[(r["train_loss"], r["val_loss"]) for r in map(json.loads, (
        tmp_path / run / "metrics.jsonl").read_text().splitlines())] for run in ("torchrun", "srun")]
    assert losses[0] == losses[1]


def test_a_sweep_task_of_two_processes_trains_one_ddp_run(tmp_path, clean_env):
    from resvae.slurm import SlurmSettings
    from resvae.sweep import SweepSpec, submit_slurm

    spec = SweepSpec(grid={"depth": [20]}, preset="tiny", iwae_k=2, iwae_n=4,
                     fixed={"subset": 64, "batch_size": 16, "max_epochs": 1, "sample_every": 0,
                            "device": "cpu"})
    [e] = submit_slurm(spec, tmp_path / "sw", SlurmSettings(time="10m", tasks_per_run=2),
                       environ={}, wait=True, poll_seconds=1, log=lambda *a: None)
    assert e["status"] == "done"
    run = tmp_path / "sw" / "depth020"
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    assert (run / "eval.json").is_file()


@pytest.mark.slow  # about 40 s: a cancelled task, its status, and its resubmission
def test_a_killed_task_shows_as_failed_with_its_log_and_resumes_when_resubmitted(
        tmp_path, clean_env, capsys):
    # scancel stands for what kills a task without a requeue (OOM, a node failure, a user):
    # --status names it failed, with its log's last line and path; the same sweep again
    # resubmits only it, and it resumes from its checkpoint rather than starting over
    import time

    from resvae.slurm import SlurmSettings, queue_states
    from resvae.sweep import submit_slurm

    spec, out, job, run = _submit_one_run(tmp_path, max_epochs=6)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / "last.pt").exists():
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.2)
    subprocess.run(["scancel", job], check=True)
    while queue_states([job]):
        time.sleep(0.5)
    capsys.readouterr()
    assert main(["sweep", "--status", str(out)]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.split()[:3] == ["depth020", job, "failed"]
    assert f"slurm/{job}_0_log." in line  # the log it quotes the last line of
    [again] = submit_slurm(spec, out, SlurmSettings(time="10m"), environ={}, wait=True,
                           poll_seconds=1, log=lambda *a: None)
    assert again["job_id"] != job and again["status"] == "done"
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and history[1]["resumed_from"]  # resumed, not started over
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "max_epochs"
