"""Seeds as a sweep axis: means with Student-t intervals over seeds, and paired residual-minus-
plain differences on the same seeds (aggregate.csv, paired.csv, results.md)."""

import csv
import math

import pytest

from resvae.cli import main
from resvae.report import aggregate, mean_ci, paired, t95


def test_t95_is_students_quantile():
    assert (t95(1), t95(2), t95(30)) == (12.706, 4.303, 2.042)
    assert t95(31) == pytest.approx(2.0395, abs=2e-4) and t95(1000) == pytest.approx(1.9623, abs=1e-4)


def test_mean_ci_and_one_seed_has_no_interval():
    st = mean_ci([1.0, 2.0, 3.0])
    assert (st["n"], st["mean"], st["sd"]) == (3, 2.0, 1.0)
    assert st["ci_high"] - 2.0 == pytest.approx(4.303 / math.sqrt(3))
    assert mean_ci([5.0]) == {"n": 1, "mean": 5.0, "sd": None, "ci_low": None, "ci_high": None}


def _row(depth, shortcut, seed, loss):
    return {"name": f"depth{depth:03d}-{shortcut}-seed{seed}", "depth": depth,
            "shortcut": shortcut, "seed": seed, "train_loss": loss, "val_loss": loss + 1,
            "test_bpd": None, "test_iwae_bpd": None}


def test_aggregate_and_paired_pool_seeds_per_grid_point():
    rows = [_row(20, "identity", s, 100 + s) for s in range(3)] + \
           [_row(20, "none", s, 110 + 2 * s) for s in range(3)] + [_row(52, "none", 0, 7)]
    agg = {r["config"]: r for r in aggregate(rows)}
    assert set(agg) == {"depth020-identity", "depth020-none", "depth052-none"}
    assert agg["depth020-identity"]["train_loss_n"] == 3
    assert agg["depth020-identity"]["train_loss_mean"] == 101
    assert agg["depth052-none"]["train_loss_ci_low"] is None  # one seed: no interval
    [p] = paired(rows)  # depth 52 has no residual run: no pair
    assert (p["config"], p["difference"], p["seeds"]) == ("depth020", "identity - none", "0 1 2")
    # differences -10, -11, -12: mean -11, sd 1, interval well below 0
    assert p["train_loss_mean"] == -11 and p["train_loss_excludes_0"] is True
    assert p["test_bpd_mean"] is None


@pytest.mark.usefixtures("small_runs")
def test_sweep_with_seeds_writes_aggregate_and_paired(tmp_path):
    out = tmp_path / "sw"
    assert main(["sweep", "--preset", "tiny", "--depths", "20", "--shortcut", "identity,none",
                 "--seeds", "0,1", "--subset", "64", "--max-epochs", "1", "--iwae-k", "2",
                 "--iwae-n", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "depth020-identity-seed0", "depth020-identity-seed1", "depth020-none-seed0",
        "depth020-none-seed1"]
    with open(out / "aggregate.csv") as f:
        agg = list(csv.DictReader(f))
    assert [(r["config"], r["train_loss_n"]) for r in agg] == [
        ("depth020-identity", "2"), ("depth020-none", "2")]
    assert all(float(r["train_loss_ci_low"]) < float(r["train_loss_mean"]) for r in agg)
    with open(out / "paired.csv") as f:
        [pair] = list(csv.DictReader(f))
    assert (pair["difference"], pair["seeds"], pair["train_loss_n"]) == ("identity - none",
                                                                         "0 1", "2")
    md = (out / "results.md").read_text()
    assert "## Over seeds" in md and "depth020: identity - none" in md
    assert main(["report", str(out), "-o", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "<h2>Over seeds</h2>" in page and "depth020: identity - none" in page
    with open(out / "results.csv") as f:
        assert sorted(r["seed"] for r in csv.DictReader(f)) == ["0", "0", "1", "1"]
    assert main(["sweep", "--preset", "tiny", "--depths", "20", "--seeds", "0,1", "--seed",
                 "3", "--out", str(tmp_path / "x")]) == 2


@pytest.mark.usefixtures("small_runs")
def test_print_commands_runs_the_same_sweep_elsewhere(tmp_path, capsys):
    import shlex

    out = tmp_path / "sw"
    args = ["sweep", "--preset", "tiny", "--depths", "20", "--shortcut", "identity,none",
            "--subset", "64", "--max-epochs", "1", "--iwae-k", "2", "--iwae-n", "4",
            "--out", str(out)]
    assert main([*args, "--print-commands"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[-1] == f"resvae report {out}"
    assert not any(p.is_dir() for p in out.iterdir())  # nothing trained
    for line in lines:  # what another scheduler would run, here in this process
        for cmd in " ".join(shlex.split(line)).split(" && "):
            words = cmd.split(" ")
            assert words[0] == "resvae" and main(words[1:]) == 0, cmd
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["depth020-identity",
                                                                   "depth020-none"]
    assert (out / "depth020-none" / "eval.json").is_file() and (out / "results.md").is_file()


def test_grid_values_name_folders_inside_the_sweep_never_paths():
    from resvae.config import ConfigError
    from resvae.sweep import run_name

    for bad in ("/../../../../tmp/x/ESCAPED", "..", "a b", "x/y"):
        with pytest.raises(ConfigError, match="cannot name a run folder"):
            run_name({"depth": 20, "data_dir": bad})
    assert run_name({"depth": 20, "lr": 0.001, "data_dir": "cifar_v2.1"}) == \
        "depth020-lr0.001-data_dircifar_v2.1"


def test_depth_figures_draw_means_with_interval_bars_over_seeds():
    from resvae.report import plot_degradation, plot_loss_vs_depth

    def rows(seeds):
        return [{**_row(d, sc, s, 100 + d + s + (5 if sc == "none" else 0)), "layers": d}
                for d in (20, 52) for sc in ("identity", "none") for s in seeds]

    for plot in (plot_degradation, plot_loss_vs_depth):
        one, three = plot(rows([0])).axes[0], plot(rows([0, 1, 2])).axes[0]
        assert not one.collections and "95% intervals" not in one.get_title()
        assert three.collections and "95% intervals" in three.get_title()
        # one point per depth: the mean over the seeds (100 + 20 + 1 for identity at 20)
        line = next(ln for ln in three.lines if len(ln.get_xdata()) == 2)
        assert list(line.get_xdata()) == [20, 52] and line.get_ydata()[0] == 121


@pytest.mark.parametrize("argv, message", [
    (["--launcher", "slurm", "--max-parallel", "-3"], "max_parallel"),
    (["--launcher", "slurm", "--cpus-per-run", "0"], "cpus_per_run"),
    (["--launcher", "slurm", "--max-timeouts", "-1"], "max_timeouts"),
    (["--launcher", "slurm", "--time", "abc"], "launcher time (--time)"),
    (["--print-commands", "--out", "FILE"], "is a file, not a folder"),
    (["--print-commands", "--out", "FILE/under"], "is a file, not a folder"),
])
def test_bad_sweep_launch_settings_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "afile").write_text("x")
    argv = [str(tmp_path / "afile") + a[4:] if a.startswith("FILE") else a for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "sw")]
    assert main(["sweep", "--preset", "tiny", "--depths", "20", "--max-epochs", "1",
                 *argv, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "sw").exists()
