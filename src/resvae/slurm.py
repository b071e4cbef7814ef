"""Sweeps on a Slurm cluster, through submitit (the library Hydra's Slurm launcher uses): one job
array, one task per grid point, each running the same `resvae train` + `resvae eval` as a local
sweep's run, into the same SWEEP_DIR/<name>/.

A task is idempotent: it resumes a run that has a checkpoint, trains one that has none, and only
evaluates (or does nothing for) a finished one, because Slurm may run a task again (a requeue,
or a requeued array task that had finished anyway). Training runs as a child process, so it gets
the signals itself: at the time limit submitit's handler (Slurm's --signal, USR2 90 s before)
forwards SIGTERM to it, waits for its checkpoint, and requeues the task, which then resumes.

Job states come from `squeue` and the run directories, never from `sacct`: clusters without
accounting (and the one-node test cluster, tests/cluster/slurm-up.sh) have none.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

from .config import parse_duration
from .errors import ConfigError, MissingDependency
from .runs import RunDir, SweepDir, is_finished, is_training, read_metrics

LAUNCHERS = ("local", "slurm")


@dataclass
class SlurmSettings:
    """The `[launcher]` table of a sweep file (name = "slurm"), or the matching flags."""

    partition: str | None = None
    time: str = "4h"  # per task; the run checkpoints and is requeued when it runs out
    gpus_per_run: int = 0
    cpus_per_run: int = 1  # per task
    tasks_per_run: int = 1  # > 1: one DDP process per task (srun), as torchrun would start them
    mem: str | None = None  # e.g. "16G"
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    max_parallel: int = 256  # the job array's % limit
    # how often one run may reach its time limit and be requeued: submitit's own default (3)
    # would end a 100-hour run at 4 h per task after 16 hours
    max_timeouts: int = 100
    slurm_additional_parameters: dict = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: dict, where: str) -> SlurmSettings:
        known = {f.name for f in fields(cls)} | {"name"}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown [launcher] key(s) {', '.join(unknown)}; "
                              f"expected {', '.join(sorted(known))}")
        s = cls(**{k: v for k, v in table.items() if k != "name"})
        for key, lo in (("gpus_per_run", 0), ("cpus_per_run", 1), ("tasks_per_run", 1),
                        ("max_parallel", 1), ("max_timeouts", 0)):
            value = getattr(s, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < lo:
                raise ConfigError(f"{where}: launcher {key} (--{key.replace('_', '-')}): expected "
                                  f"an integer >= {lo}, got {value!r}")
        s.minutes()  # a bad time is an error now, not at submission
        return s

    def minutes(self) -> int:
        try:
            seconds = parse_duration(str(self.time))
        except ConfigError:
            seconds = None
        if not seconds:
            raise ConfigError(f"launcher time (--time) {self.time!r}: expected a duration such "
                              "as 90m or 4h")
        return max(1, round(seconds / 60))


def _submitit():
    try:
        import submitit
    except ImportError:
        raise MissingDependency("--launcher slurm needs submitit: pip install 'resvae[slurm]'"
                                ) from None
    return submitit


def _ignore_usr2() -> None:
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class RunTask:
    """One grid point's task: train (resume / start / skip) then evaluate, as child processes.
    `checkpoint` is submitit's hook at the time limit or preemption: stop the child through its
    SIGTERM path (it writes last.pt) and requeue this same task."""

    STOP_WAIT_S = 60  # for the child's checkpoint, inside Slurm's 90 s warning

    def __init__(self, run_dir: str, planned_config: str, eval_args: list[str]):
        self.run_dir, self.planned, self.eval_args = run_dir, planned_config, eval_args
        self.child: subprocess.Popen | None = None
        self.returncode: int | None = None

    def commands(self) -> list[list[str]]:
        from .sweep import run_commands  # (sweep imports this module)
        return run_commands(self.run_dir, self.planned, self.eval_args)

    def _run(self, cmd: list[str]) -> int:
        """Run one child to its end. Slurm's USR2 before the time limit reaches every process of
        the step: the child ignores it (its default action would kill it before its checkpoint)
        and submitit's handler in this process calls `checkpoint`. A thread waits on the child,
        so that handler, which runs in this thread, never meets a lock held here (Popen.wait's
        would hold it up for its whole timeout)."""
        self.returncode = None
        self.child = subprocess.Popen(cmd, preexec_fn=_ignore_usr2)

        def wait() -> None:
            self.returncode = self.child.wait()

        threading.Thread(target=wait, daemon=True).start()
        while self.returncode is None:
            time.sleep(0.2)
        self.child = None
        return self.returncode

    def __call__(self) -> str:
        cmds = self.commands()
        if os.environ.get("SLURM_PROCID", "0") != "0":  # a run of several tasks: train together,
            cmds = [c for c in cmds if c[3] == "train"]  # rank 0 alone evaluates
        for cmd in cmds:
            print("resvae slurm task:", shlex.join(cmd), flush=True)
            rc = self._run(cmd)
            if rc in (130, 143):  # Slurm's SIGTERM (requeue, cancel): the run checkpointed
                raise RuntimeError(f"{shlex.join(cmd)} stopped by a signal (exit {rc}) after "
                                   "writing its checkpoint; the task's next start resumes it")
            if rc != 0:
                raise RuntimeError(f"{shlex.join(cmd)} exited with {rc}")
        return self.run_dir

    def checkpoint(self, *args, **kwargs):
        child = self.child
        if child is not None and self.returncode is None:
            os.kill(child.pid, signal.SIGTERM)  # resvae train checkpoints and exits 143
            deadline = time.monotonic() + self.STOP_WAIT_S
            while self.returncode is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if self.returncode is None:
                child.kill()
        return _submitit().helpers.DelayedSubmission(RunTask(self.run_dir, self.planned,
                                                             self.eval_args))


def submit(tasks: list[tuple[str, RunTask]], sweep_dir: Path, settings: SlurmSettings) -> dict:
    """Submit the tasks as one job array; returns {run name: job id}."""
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=sweep_dir / "slurm", cluster="slurm",
                                     slurm_max_num_timeout=settings.max_timeouts)
    params = {"timeout_min": settings.minutes(), "cpus_per_task": settings.cpus_per_run,
              "tasks_per_node": settings.tasks_per_run,
              "slurm_array_parallelism": settings.max_parallel, "name": "resvae-sweep"}
    if settings.gpus_per_run:
        params["gpus_per_node"] = settings.gpus_per_run
    for key in ("partition", "mem", "account", "qos", "constraint"):
        if getattr(settings, key):
            params[f"slurm_{key}"] = getattr(settings, key)
    if settings.slurm_additional_parameters:
        params["slurm_additional_parameters"] = dict(settings.slurm_additional_parameters)
    executor.update_parameters(**params)
    with executor.batch():
        jobs = [executor.submit(task) for _, task in tasks]
    return {name: job.job_id for (name, _), job in zip(tasks, jobs)}


def queue_states(job_ids: list[str]) -> dict[str, str]:
    """{job id: Slurm state} for the jobs squeue still knows (pending, running, requeued...)."""
    if not job_ids:
        return {}
    try:
        # -r: one line per array task, also while the array is pending (else "2_[0-1]")
        arrays = sorted({str(j).split("_")[0] for j in job_ids})
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(arrays)],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split(maxsplit=1) for line in out.splitlines() if line.strip())


def run_state(run_dir: Path, job_id: str | None, queued: dict[str, str],
              evaluates: bool = True) -> str:
    """pending / running / requeued while Slurm holds the job; then done (trained, and evaluated
    when the sweep evaluates), or failed."""
    if job_id and job_id in queued:
        s = queued[job_id].lower()
        return {"configuring": "pending", "completing": "running"}.get(s, s)
    run = RunDir(run_dir)
    if is_finished(run.root) and (run.eval.exists() or not evaluates):
        return "done"
    if is_training(run.root):  # a local sweep's run, in progress
        return "running"
    return "failed" if job_id else "not started"


def progress(run_dir: Path) -> str:
    """Epochs and images so far, from the run's metrics.jsonl."""
    if not RunDir(run_dir).metrics.exists():
        return "-"
    records = read_metrics(run_dir)
    if not records:
        return "-"
    return f"epoch {records[-1]['epoch']}, {records[-1].get('images_seen', 0):,} images"


def last_log_line(sweep_dir: Path, job_id: str) -> tuple[str, Path | None]:
    """A failed task's last log line and that log's path (submitit's <job id>_0_log.err/out)."""
    logs = sorted((Path(sweep_dir) / "slurm").glob(f"{job_id}_*_log.err")) + \
        sorted((Path(sweep_dir) / "slurm").glob(f"{job_id}_*_log.out"))
    for log in logs:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1], log
    return "", None


def status_lines(sweep_dir: Path, entries: list[dict], evaluates: bool = True) -> list[str]:
    """`resvae sweep --status`: one line per run: name, job id, state, progress (and for a
    failed one the last line of its Slurm log and the log's path)."""
    queued = queue_states([e["job_id"] for e in entries if e.get("job_id")])
    lines = []
    for e in entries:
        run_dir = SweepDir(sweep_dir).run(e["name"]).root
        state = run_state(run_dir, e.get("job_id"), queued, evaluates)
        line = f"{e['name']:<28} {e.get('job_id') or '-':<12} {state:<10} {progress(run_dir)}"
        if state == "failed" and e.get("job_id"):
            text, log = last_log_line(sweep_dir, e["job_id"])
            line += f"  | {text} ({log})" if log else ""
        lines.append(line)
    return lines


__all__ = ["LAUNCHERS", "SlurmSettings", "RunTask", "submit", "queue_states", "run_state",
           "status_lines"]
