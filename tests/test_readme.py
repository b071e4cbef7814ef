"""The README's numbers come from commands; these tests rerun the cheap ones."""

import contextlib
import json
import re
import sys
import types
from pathlib import Path

import pytest

from resvae.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_info_table_is_what_resvae_info_prints(capsys):
    m = re.search(r"`resvae info --arch study --depth 28,40,70,100`.*?```\n(.*?)```", README, re.S)
    assert m, "README lost its resvae info table"
    assert main(["info", "--arch", "study", "--depth", "28,40,70,100"]) == 0
    assert capsys.readouterr().out == m.group(1)


@pytest.mark.parametrize("command", ["resvae info --arch hier", "resvae info --preset cpu"])
def test_readme_info_figures_are_what_resvae_info_prints(command, capsys):
    # The block right after the line that names the command, exactly as the command prints it.
    m = re.search(rf"^`{re.escape(command)}`[^\n]*\n\n```\n(.*?)```", README, re.S | re.M)
    assert m, f"README lost its `{command}` block"
    assert main(command.split()[1:]) == 0
    assert capsys.readouterr().out == m.group(1)


def test_readme_starts_with_the_two_commands():
    # The first command block is the two commands after clone: install + the main training
    # command (which fetches CIFAR-10 on a fresh machine), then the test suite as CI runs it.
    first = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert len(first) == 2, first
    assert first[0].startswith("pip install torch==") and " && resvae train --preset cpu --download" in first[0]
    assert first[1].startswith("python -m pytest -q")
    assert "python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_readme_commands_before_the_results_use_no_local_paths():
    # Everything a newcomer copies comes before the results; `../shared` exists only on the
    # machine the results were measured on, so no command block up to there may use it.
    head, results = README.split("\n## Results", 1)
    assert results, "README lost its results section"
    blocks = re.findall(r"```[a-z]*\n(.*?)```", head, re.S)
    assert len(blocks) >= 5
    assert not [b for b in blocks if "../shared" in b]


@pytest.mark.usefixtures("small_runs")  # small val/test splits
def test_readme_mlflow_callback_example_runs(tmp_path, monkeypatch):
    code = re.search(r"```python\n(import mlflow\n.*?)```", README, re.S)
    assert code, "README lost its MLflow callback example"
    logged = []
    mlflow = types.ModuleType("mlflow")  # a stand-in: resvae does not depend on mlflow
    mlflow.log_metrics = lambda metrics, step=None: logged.append((step, metrics))
    mlflow.log_metric = lambda key, value: logged.append((None, {key: value}))
    mlflow.start_run = contextlib.nullcontext
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.chdir(tmp_path)
    exec(code.group(1), {})
    # tiny: 2 epochs of 8 updates (fewer than log_every: no on_step), then the end
    assert [step for step, _ in logged] == [8, 16, None]
    assert {"train_loss", "val_loss", "val_bpd"} <= set(logged[0][1])
    summary = json.loads((tmp_path / "runs" / "mlflow" / "summary.json").read_text())
    assert logged[-1][1] == {"test_loss": summary["test_loss"]}


@pytest.mark.parametrize("sweep", ["sweep-cpu-depth", "sweep-study-narrow"])
def test_readme_sweep_tables_are_the_sweeps_own_results(sweep):
    # The README's tables are copies of the results.md the sweep wrote (kept in docs/ beside
    # its figures), not numbers typed in by hand.
    results = (ROOT / "docs" / sweep / "results.md").read_text()
    table = results.split("\n\n")[1].strip()
    assert table.count("\n") >= 5 and table in README
    if "## Over seeds" in results:  # and its tables over the seeds (means, paired differences)
        over = results.split("## Over seeds")[1].split("\n## ")[0]
        tables = [b.strip() for b in over.split("\n\n") if b.strip().startswith("|")]
        assert len(tables) == 2 and all(t in README for t in tables)


def test_readme_python_examples_run(tmp_path, monkeypatch, clean_env):
    # "Use it from Python": the three blocks as printed, on 64 random images of the user's own
    import numpy as np

    section = README.split("## Use it from Python")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 3, "README's 'Use it from Python' lost a block"
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    scope = {"x_train": rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8),
             "x_test": rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)}
    for code in blocks:
        exec(code, scope)  # (clean_env: no RESVAE_* of the caller reaches resolve)
    assert scope["summary"]["epochs"] == 1 and scope["images"].shape == (16, 3, 32, 32)
    assert (tmp_path / "runs" / "mine" / "summary.json").is_file()


def test_readme_slurm_sweep_file_plans(tmp_path):
    # the "On a Slurm cluster" sweep file: a valid sweep (24 runs) and launcher table
    from resvae.slurm import SlurmSettings
    from resvae.sweep import load_sweep_file, plan

    section = README.split("## On a Slurm cluster")[1].split("\n## ")[0]
    path = tmp_path / "study-seeds.toml"
    path.write_text(re.search(r"```toml\n(.*?)```", section, re.S).group(1))
    spec = load_sweep_file(path)
    assert len(plan(spec, environ={})) == 24
    assert SlurmSettings.from_table(spec.launcher, str(path)).minutes() == 240


def test_readme_ten_minute_runs_table_is_the_runs_own_files():
    # the main command's spread over several hours: printed by benchmarks/readme_table.py from
    # the runs' summary.json / metrics.jsonl / history.jsonl, kept in docs/cpu-10m/
    import conftest

    table = conftest.benchmark_script("readme_table")
    runs = sorted((ROOT / "docs" / "cpu-10m").iterdir())
    # issue 20: a speed-dependent number is quoted from at least two runs on different hours
    assert len(runs) >= 2, "the spread needs at least two runs on different hours"
    hours = {json.loads((r / "history.jsonl").read_text().splitlines()[0])["started"][:13]
             for r in runs}
    assert len(hours) == len(runs)  # each run in its own hour
    assert table.spread_table(runs) in README


def _recipe_differences(run: Path, cfg) -> list[str]:
    """Where a kept run's config.json differs from `cfg` in what it trains, through resvae's own
    check (runs.config_differences): every setting but where the data lay on that machine."""
    from resvae.runs import config_differences

    return config_differences(json.loads((run / "config.json").read_text()), cfg,
                              keys=("model", "data", "train"),
                              skip=("data.data_dir", "data.download"))


def test_readme_ten_minute_runs_trained_the_cpu_preset_of_now():
    # the spread describes the README's first command: each kept run's resolved config must be
    # the cpu preset's as it resolves today (where the data lies aside), so a preset change
    # cannot leave the README quoting runs of another model or recipe
    from resvae.config import resolve

    now = resolve(preset="cpu", environ={})
    for run in sorted((ROOT / "docs" / "cpu-10m").iterdir()):
        assert _recipe_differences(run, now) == [], run.name


def test_every_test_docs_reliability_names_exists():
    # each row of docs/reliability.md names the test that tries it: that test must exist
    import ast
    import re

    text = (ROOT / "docs" / "reliability.md").read_text()
    named = set(re.findall(r"`(tests/test_\w+\.py)(?:::(\w+))?", text))
    assert len(named) > 40
    for path, name in named:
        tree = ast.parse((ROOT / path).read_text())
        tests = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not name or name in tests, f"docs/reliability.md names {path}::{name}"


def test_readme_stochastic_depth_tables_are_the_sweeps_own_files():
    # issue 20's stochastic-depth section: both tables printed by benchmarks/stochastic_depth.py
    # from the sweep's own records, kept in docs/sweep-cpu-stochastic-depth/, and each record a
    # run of sweeps/cpu-stochastic-depth.toml as it plans today (where the data lies aside)
    import conftest

    from resvae.sweep import load_sweep_file, plan

    sd = conftest.benchmark_script("stochastic_depth")
    kept = ROOT / "docs" / "sweep-cpu-stochastic-depth"
    planned = dict(plan(load_sweep_file(ROOT / "sweeps" / "cpu-stochastic-depth.toml"),
                        environ={}))
    runs = sorted(p.parent for p in kept.glob("*/summary.json"))
    assert sorted(r.name for r in runs) == sorted(planned)  # all 21, none missing
    for run in runs:
        assert _recipe_differences(run, planned[run.name]) == [], run.name
    rows = sd.points([sd.run_record(r) for r in runs])
    assert sd.table(rows) in README
    assert sd.steps_table(sd.steps(rows)) in README
