"""The `resvae` command line: help, `info`, error exits, environment/flag precedence for `train`,
and the installed console script."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import resvae.checkpoints as CK
import resvae.cli as cli
from resvae import config as C
from resvae.cli import build_parser, main
from resvae.config import tomllib

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


def _help(argv, capsys) -> str:
    assert _exit_code([*argv, "--help"]) == 0
    return capsys.readouterr().out


def _sections(out: str) -> dict[str, str]:
    """Help text of each config argument group, by section."""
    parts = re.split(r"^(model|data|train) settings:$", out, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _flag_block(out: str, flag: str) -> str:
    """A flag's entry in --help, whitespace collapsed (the formatter wraps lines)."""
    m = re.search(rf"^  {re.escape(flag)}(?=[ \n]).*?(?=^  -|^\S|\Z)", out, flags=re.M | re.S)
    assert m, f"{flag} not in the help"
    return " ".join(m.group(0).split())


def test_train_help_groups_flags_by_section_without_underscore_aliases(capsys):
    out = _help(["train"], capsys)
    groups = _sections(out)
    assert list(groups) == ["model", "data", "train"]
    for key, (section, _, _) in C.fields_flat().items():
        flag = "--" + key.replace("_", "-")
        for sec, text in groups.items():  # each flag listed once, in its own section's group
            assert (re.search(rf"^  {flag}(?=[ \n])", text, flags=re.M) is not None) == (
                sec == section), (flag, sec)
    assert re.findall(r"--[a-z0-9-]*_", out) == []  # --latent_dim and co. are not listed
    assert "--latent_dim" not in out
    assert "RESVAE_X_Y" in out and "--print-config" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_help_shows_choices_units_and_defaults(capsys):
    # a newcomer picks a likelihood, a budget format and a depth from the help alone
    out = _help(["train"], capsys)
    for key in ("arch", "likelihood", "block", "shortcut"):
        block = _flag_block(out, "--" + key)
        assert block.startswith(f"--{key} {{{','.join(C.CHOICES[key])}}}"), block
        for choice in C.CHOICES[key]:
            assert f" {choice}: " in block, (key, choice)  # each choice explained
    assert "discretized logistic" in _flag_block(out, "--likelihood")
    budget = _flag_block(out, "--budget")
    assert "90s, 10m" in budget and "1h30m" in budget and 'default: ""' in budget
    depth = _flag_block(out, "--depth")
    assert "depth convention" in depth and "20, 24, 28" in depth and "28, 40, 70, 100" in depth
    assert depth.endswith("unit: layers; default: 28")
    assert "unit: nats per latent dim; default: 0.0" in _flag_block(out, "--free-bits")
    assert _flag_block(out, "--preact").endswith("default: false")


def test_info_and_sweep_help_grouped_too(capsys):
    info = _help(["info"], capsys)
    assert list(_sections(info)) == ["model"]
    assert "--depth D[,D...]" in info and "--latent-dim" in info and "--latent_dim" not in info
    assert "{bernoulli," in info
    sweep = _help(["sweep"], capsys)
    groups = _sections(sweep)
    assert list(groups) == ["model", "data", "train"]
    assert "--depth " not in groups["model"] and "--shortcut" not in groups["model"]  # the grid
    assert "--max-epochs" in groups["train"] and "_" not in "".join(re.findall(r"--\S+", sweep))


@pytest.mark.parametrize("form", [["--preset", "resnet-cpu"], ["--preset=resnet-cpu"]])
def test_preset_on_the_command_line_makes_its_values_the_defaults(capsys, form):
    out = _help(["train", *form], capsys)
    assert "default: 20 (preset resnet-cpu; built-in: 28)" in _flag_block(out, "--depth")
    assert "default: 0.25 (preset resnet-cpu; built-in: 1.0)" in _flag_block(out, "--width")
    assert "default: dlogistic (preset resnet-cpu" in _flag_block(out, "--likelihood")
    assert "default: 10m (preset resnet-cpu" in _flag_block(out, "--budget")
    assert _flag_block(out, "--seed").endswith("default: 0")  # not in the preset: built-in
    info = _help(["info", *form], capsys)
    assert "default: 20 (preset resnet-cpu" in _flag_block(info, "--depth")
    sweep = _help(["sweep", *form], capsys)
    assert "default: 0.25 (preset resnet-cpu" in _flag_block(sweep, "--width")
    # a bad preset name still gives help (with built-in defaults); the command reports the name
    out = _help(["train", "--preset", "nope"], capsys)
    assert _flag_block(out, "--depth").endswith("default: 28")


def test_a_field_without_help_still_gets_a_flag(capsys, monkeypatch):
    # a new field merged in without help: the CLI works (test_config's help test names it)
    real = C.field_doc
    monkeypatch.setattr(cli, "field_doc", lambda key: real(key) if key != "latent_dim" else {
        "help": "", "unit": "", "choices": None, "choice_help": {}})
    out = _help(["train"], capsys)
    assert _flag_block(out, "--latent-dim") == "--latent-dim INT (no help text yet) default: 256"


def test_underscore_aliases_hidden_but_working(capsys):
    assert main(["train", "--preset", "tiny", "--latent_dim", "3", "--zero_init_residual",
                 "--print-config"]) == 0
    cfg = tomllib.loads(capsys.readouterr().out)
    assert cfg["model"]["latent_dim"] == 3 and cfg["model"]["zero_init_residual"] is True


# ----------------------------------------------------------------------------- flag typos

def _unique_prefix(flag: str, flags: list[str]) -> str | None:
    """The shortest cut of `flag` that starts no other flag: what an abbreviating parser would
    take for `flag`. None when `flag` itself starts another flag (`--lr`, `--lr-schedule`)."""
    for n in range(3, len(flag)):
        if not any(f.startswith(flag[:n]) for f in flags if f != flag):
            return flag[:n]
    return None


def test_every_parser_refuses_abbreviations():
    # Every long flag of every subcommand, cut to a unique prefix, is left over as unknown
    # (an abbreviating parser would read it as the flag); required arguments filled in first.
    p = build_parser()
    checked = 0
    for name, sp in {"": p, **p.subcommands}.items():
        flags = [o for a in sp._actions for o in a.option_strings if o.startswith("--")]
        needed = [arg for a in sp._actions if a.required
                  for arg in (a.option_strings[:1] + ["x"])]
        for flag in flags:
            cut = _unique_prefix(flag, flags)
            if cut is not None:
                argv = [name, *needed, cut] if name else [cut, "info"]
                assert p.parse_known_args(argv)[1] == [cut], (name, flag)
                checked += 1
    assert checked > 250  # every subcommand's flags, not a handful


@pytest.mark.parametrize("argv, named", [
    (["train", "--dep", "40"], "--dep"),
    (["train", "--print"], "--print"),
    (["info", "--dep", "40"], "--dep"),
    (["sweep", "--max-epoch", "3"], "--max-epoch"),
    (["eval", "runs/x", "--whi", "last"], "--whi"),
])
def test_abbreviated_flags_are_errors(argv, named, capsys, tmp_path):
    assert _exit_code([*argv, "--out", str(tmp_path / "run")] if argv[0] == "train" else argv) == 2
    err = capsys.readouterr().err
    assert f"unrecognized argument {named}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("typo, meant", [
    ("--lattent-dim", "--latent-dim"), ("--latent-dimm=3", "--latent-dim"),
    ("--latent_dimm", "--latent-dim"), ("--dep", "--depth"), ("--max-epoch", "--max-epochs"),
    ("--likelyhood", "--likelihood"), ("--batch", "--batch-size"), ("--max-e", "--max-epochs"),
])
def test_near_miss_flag_suggests_the_flag(typo, meant, capsys):
    assert _exit_code(["train", "--preset", "tiny", typo, "3"]) == 2
    err = capsys.readouterr().err
    assert err == (f"resvae train: error: unrecognized argument {typo.partition('=')[0]}; "
                   f"did you mean {meant}? (resvae train --help lists the flags)\n")


def test_several_unknown_flags_in_one_line(capsys):
    assert _exit_code(["train", "--lattent-dim", "3", "--zzzzzz"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "--lattent-dim (did you mean --latent-dim?)" in err and "--zzzzzz" in err


# ----------------------------------------------------------------------------- --print-config

def test_print_config_round_trips_as_config_file(tmp_path, monkeypatch, capsys):
    # every layer: preset (resnet-cpu), file, env, flags; the printed TOML fed back as --config
    # (and nothing else) gives the same RunConfig
    f = tmp_path / "mine.toml"
    f.write_text('[train]\nbatch_size = 7\nlr = 0.1\n[data]\ndataset = "shapes"\n')
    monkeypatch.setenv("RESVAE_LR", "0.005")
    monkeypatch.setenv("RESVAE_BETAS", "0.5,0.9")
    flags = ["--latent-dim", "12", "--budget", "1h30m", "--preact",
             "--data-dir", str(tmp_path / 'odd "dir" \\ name')]
    out = tmp_path / "run"
    assert main(["train", "--preset", "resnet-cpu", "--config", str(f), *flags, "--print-config",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert not out.exists()  # nothing trained, nothing written
    expected = C.resolve(preset="resnet-cpu", config_file=str(f),
                         environ={"RESVAE_LR": "0.005", "RESVAE_BETAS": "0.5,0.9"},
                         overrides={"latent_dim": "12", "budget": "1h30m", "preact": "true",
                                    "data_dir": str(tmp_path / 'odd "dir" \\ name')})
    assert (expected.model.depth, expected.train.batch_size, expected.train.lr,
            expected.model.latent_dim) == (20, 7, 0.005, 12)  # preset < file < env < flag
    printed = tmp_path / "printed.toml"
    printed.write_text(text)
    assert C.resolve(config_file=str(printed), environ={}) == expected
    monkeypatch.delenv("RESVAE_LR")
    monkeypatch.delenv("RESVAE_BETAS")
    assert main(["train", "--config", str(printed), "--print-config"]) == 0
    assert capsys.readouterr().out == text


def test_print_config_reports_bad_values_like_train(capsys):
    assert main(["train", "--preset", "tiny", "--depth", "abc", "--print-config"]) == 2
    assert "--depth" in capsys.readouterr().err


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
    ckpt = CK.load_checkpoint(tmp_path / "env" / "checkpoints" / "last.pt")
    # one row per latent dim for the mean and one for the log-variance: the env's 4, not the
    # preset's 8
    assert ckpt["model"]["encoder.latent.weight"].shape[0] == 2 * 4
    assert ckpt["step"] == 64 // 16  # one epoch (--max-epochs 1, no budget) of 64 images / 16
    summary = json.loads((tmp_path / "env" / "summary.json").read_text())
    assert summary["stop_reason"] == "max_epochs" and summary["epochs"] == 1
    vae, _ = CK.load_run(tmp_path / "env")
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
