"""The `resvae` command line: help, `info`, error exits, environment/flag precedence for `train`,
and the installed console script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import resvae.runs as R
from resvae.cli import main

pytestmark = pytest.mark.usefixtures("small_runs")


def _exit_code(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code


# ----------------------------------------------------------------------------- help

def test_help_exits_zero(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    assert "info" in out and "train" in out and "tiny" in out  # presets listed in the epilog
    assert _exit_code(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--latent-dim" in out and "--resume" in out and "--max-epochs" in out
    assert _exit_code(["info", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--depth" in out and "--json" in out and "--max-epochs" not in out
    assert _exit_code(["--version"]) == 0
    assert capsys.readouterr().out.startswith("resvae ")
    assert _exit_code([]) == 2  # a subcommand is required


# ----------------------------------------------------------------------------- info

INFO_KEYS = {"depth", "layers", "encoder_params", "decoder_params", "params", "flops"}


def test_info_study_depths_json(capsys):
    # --width 0.125 keeps the FLOP count quick; layers do not depend on the width
    assert main(["info", "--arch", "study", "--depth", "28,40,70,100", "--width", "0.125",
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 4
    for row, depth in zip(rows, (28, 40, 70, 100)):
        assert INFO_KEYS <= set(row)
        assert row["depth"] == row["layers"] == depth and row["arch"] == "study"
        assert row["params"] == row["encoder_params"] + row["decoder_params"]
        assert row["flops"] > 0
    assert [r["params"] for r in rows] == sorted({r["params"] for r in rows})  # grows with depth


def test_info_resnet_single_json_and_text(capsys):
    assert main(["info", "--arch", "resnet", "--depth", "20", "--block", "basic", "--width",
                 "0.0625", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert isinstance(rows, list) and len(rows) == 1  # the same shape for one depth as for four
    row = rows[0]
    assert INFO_KEYS <= set(row)
    assert row["depth"] == row["layers"] == 20 and row["arch"] == "resnet"
    # the tiny preset is this network (with its own latent/likelihood settings)
    assert main(["info", "--preset", "tiny", "--json"]) == 0
    [tiny] = json.loads(capsys.readouterr().out)
    assert tiny["arch"] == "resnet" and tiny["layers"] == 20
    assert main(["info", "--preset", "tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("arch resnet") and "depth" in lines[1]
    assert lines[2].split()[:2] == ["20", "20"]


def test_info_invalid_depths_exit_2(capsys):
    assert main(["info", "--arch", "study", "--depth", "50"]) == 2
    err = capsys.readouterr().err
    assert "resvae info: error" in err and "28, 40, 70, 100" in err and "50" in err
    assert _exit_code(["info", "--depth", "abc"]) == 2  # argparse: not a depth list
    assert "--depth" in capsys.readouterr().err
    assert main(["info", "--arch", "nope"]) == 2
    assert "--arch" in capsys.readouterr().err


# ----------------------------------------------------------------------------- train errors

def test_train_bad_values_exit_2_naming_the_flag(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", "--preset", "nope", "--out", out]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "tiny" in err
    assert main(["train", "--preset", "tiny", "--out", out, "--latent-dim", "abc"]) == 2
    err = capsys.readouterr().err
    assert "--latent-dim" in err and "'abc'" in err
    assert main(["train", "--preset", "tiny", "--out", out, "--budget", "soon"]) == 2
    assert "budget" in capsys.readouterr().err
    os.environ["RESVAE_LATENT_DIMS"] = "4"  # a typo: rejected, with a suggestion
    try:
        assert main(["train", "--preset", "tiny", "--out", out]) == 2
    finally:
        del os.environ["RESVAE_LATENT_DIMS"]
    assert "RESVAE_LATENT_DIM" in capsys.readouterr().err
    assert not Path(out).exists()  # nothing was written for any of them


# ----------------------------------------------------------------------------- env vs flags

def _train_cli(out, *extra):
    return main(["train", "--preset", "tiny", "--out", str(out), "--max-epochs", "1",
                 "--subset", "64", "--device", "cpu", "--sample-every", "0", *extra])


def test_env_is_honoured_and_flags_beat_it(tmp_path, monkeypatch):
    monkeypatch.setenv("RESVAE_LATENT_DIM", "4")
    monkeypatch.setenv("RESVAE_BATCH_SIZE", "16")
    assert _train_cli(tmp_path / "env") == 0
    cfg = json.loads((tmp_path / "env" / "config.json").read_text())
    assert cfg["model"]["latent_dim"] == 4 and cfg["train"]["batch_size"] == 16
    assert cfg["model"]["depth"] == 20  # the preset still applies below the env
    ckpt = R.load_checkpoint(tmp_path / "env" / "checkpoints" / "last.pt")
    # one row per latent dim for the mean and one for the log-variance: the env's 4, not the
    # preset's 8
    assert ckpt["model"]["encoder.latent.weight"].shape[0] == 2 * 4
    assert ckpt["step"] == 64 // 16  # one epoch (--max-epochs 1, no budget) of 64 images / 16
    summary = json.loads((tmp_path / "env" / "summary.json").read_text())
    assert summary["stop_reason"] == "max_epochs" and summary["epochs"] == 1
    vae, _ = R.load_run(tmp_path / "env")
    assert vae.latent_dim == 4

    assert _train_cli(tmp_path / "flag", "--latent-dim", "6") == 0
    cfg = json.loads((tmp_path / "flag" / "config.json").read_text())
    assert cfg["model"]["latent_dim"] == 6 and cfg["train"]["batch_size"] == 16


# ----------------------------------------------------------------------------- console script

def test_console_script_runs():
    exe = shutil.which("resvae", path=str(Path(sys.executable).parent)) or shutil.which("resvae")
    assert exe, "the resvae console script is not installed"
    p = subprocess.run([exe, "info", "--arch", "study", "--depth", "28", "--width", "0.125",
                        "--json"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    [row] = json.loads(p.stdout)
    assert row["layers"] == 28 and row["arch"] == "study" and row["params"] > 0
