"""Every subcommand, fed a few hundred generated bad argument lists (a seeded generator built from
the parser's own flags): each ends with exit status 0 or 2, says why in a line of its own, never
with a traceback, and writes nothing outside its temporary directory.

The work a command does once its input is accepted (training, evaluation, image grids, timing)
is replaced by a marker, so that a few thousand command lines run in seconds: what is fuzzed is
every check between the command line and that work (parsing, configs, run directories, loading
untrusted files, output paths)."""

import argparse
import contextlib
import importlib
import io
import json
import os
import random
import time
import traceback
from pathlib import Path

import pytest
from conftest import clear_resvae_env, train_small

from resvae.cli import build_parser, main
from resvae.config import resolve

PER_COMMAND = 300
SEED = 20261207


class Accepted(Exception):
    """Raised in place of a command's real work: its input got that far."""


def _accept(*args, **kwargs):
    raise Accepted


# the work itself, by module and name (each is looked up when the command runs)
WORK = [("resvae.train", "train"), ("resvae.evaluate", "eval_run"),
        ("resvae.generate", "samples"), ("resvae.generate", "reconstructions"),
        ("resvae.generate", "interpolations"), ("resvae.bench", "bench"),
        ("resvae.report", "make_figures"), ("resvae.report", "write_html"),
        ("resvae.report", "screenshot"), ("resvae.checkpoints", "save_pretrained"),
        ("resvae.export", "export_onnx"), ("resvae.sweep", "submit_slurm"),
        ("resvae.sweep", "run_one")]


def _values(root):
    """Bad (and a few good) values: text, numbers out of range, paths of every kind."""
    return ["", " ", "0", "-1", "-8", "1e309", "nan", "inf", "-inf", "3.5", "abc", "10x",
            "1,2,,3", ",", "20,27", "99999999999999999999", "0x10", "true", "None", "'",
            "\"", "\\", "é", "💥", "a" * 300, "--", "-", "--out", "=1", "20", "1", "2",
            "identity", "none", "tiny", "cpu", "hub", "onnx", "best", "last", "test",
            str(root / "afile"), str(root / "afile" / "under"), str(root / "adir"),
            str(root / "nowhere" / "x"), str(root / "run"), str(root / "sweep"),
            str(root / "bad.toml"), str(root / "list.json"), str(root / "run" / "summary.json"),
            "../x", "./", ".", "..", "x.png", "x.html", "out/x.png"]


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def _argv(rng: random.Random, command: str, parser, values: list[str]) -> list[str]:
    """One command line: the positionals (right or wrong), then 1-4 options with drawn values
    (a choice's own values sometimes, so later checks are reached too)."""
    argv = [command]
    for a in parser._actions:
        if not a.option_strings and a.dest != "help":
            n = {None: 1, "?": rng.choice([0, 1]), "*": rng.randint(0, 2),
                 "+": rng.randint(1, 2)}.get(a.nargs, 1)
            argv += [rng.choice(values) for _ in range(n)]
    for a in rng.sample(_options(parser), min(len(_options(parser)), rng.randint(1, 4))):
        argv.append(rng.choice(a.option_strings))
        if a.nargs == 0:
            continue
        if a.choices and rng.random() < 0.5:
            argv.append(str(rng.choice(list(a.choices))))
        elif rng.random() < 0.9:
            argv.append(rng.choice(values))
    if rng.random() < 0.1:
        argv.insert(rng.randrange(1, len(argv) + 1), rng.choice(["--nope", "-x", "--dep"]))
    return argv


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A temporary world to point the generated paths at: a trained tiny run, a sweep of it, a
    file, a folder, a bad TOML file, a JSON list."""
    root = tmp_path_factory.mktemp("fuzz")
    with pytest.MonkeyPatch.context() as mp:
        clear_resvae_env(mp, root / "cache")
        train_small(resolve(preset="tiny", environ={}, overrides={
            "subset": 64, "batch_size": 16, "device": "cpu", "max_epochs": 1,
            "sample_every": 0}), root / "run")
    (root / "sweep").mkdir()
    (root / "sweep" / "r").symlink_to(root / "run")
    (root / "afile").write_text("mine")
    (root / "adir").mkdir()
    (root / "bad.toml").write_text("preset = 'tiny'\n[grid]\ndepth = [20,, 24]\n")
    (root / "list.json").write_text("[1, 2]")
    return root


def _files(root) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _snapshot(*dirs) -> dict:
    return {str(d): sorted(os.listdir(d)) if d.is_dir() else None for d in dirs}


@pytest.mark.parametrize("command", sorted(build_parser().subcommands))
def test_generated_bad_command_lines_end_in_0_or_2_without_a_traceback(
        world, tmp_path, monkeypatch, command):
    repo = os.getcwd()
    home = tmp_path / "home"
    home.mkdir()
    clear_resvae_env(monkeypatch, tmp_path / "cache")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RESVAE_CHROMIUM", str(world / "afile"))
    for module, name in WORK:
        monkeypatch.setattr(importlib.import_module(module), name, _accept)
    work = tmp_path / "cwd"  # relative paths land here
    work.mkdir()
    monkeypatch.chdir(work)
    outside = [Path(repo), world.parent]
    before = _snapshot(*outside)
    run_files = _files(world / "run")

    t0 = time.monotonic()
    rng = random.Random(f"{SEED}-{command}")
    parser = build_parser().subcommands[command]
    values = _values(world)
    outcomes = {"0": 0, "2": 0, "accepted": 0}
    for _ in range(PER_COMMAND):
        argv = _argv(rng, command, parser, values)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse: usage errors (2), --help/--version (0)
                rc = e.code
            except Accepted:
                rc = "accepted"
            except BaseException:
                pytest.fail(f"resvae {json.dumps(argv)}: a traceback:\n{traceback.format_exc()}")
        text = err.getvalue()
        assert rc in (0, 2, "accepted"), (argv, rc, text)
        assert "Traceback" not in text, (argv, text)
        if rc == 2:
            last = text.strip().splitlines()[-1]
            assert last.startswith(f"resvae {command}: error: "), (argv, text)
        outcomes[str(rc)] += 1
    print(command, outcomes, f"{time.monotonic() - t0:.1f}s")
    assert outcomes["2"] > PER_COMMAND // 2, outcomes  # these are bad command lines, mostly
    assert _snapshot(*outside) == before, "written outside the test's folders"
    assert _files(world / "run") == run_files, "the run was changed"
