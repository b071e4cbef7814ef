"""`resvae eval` / `reconstruct` / `interpolate` on a saved run whose data moved: --data-dir,
RESVAE_DATA_DIR, the absolute path in config.json, and hints that name only the command's flags."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from resvae.cli import main


def _folder(root, n_train=20, n_test=8):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            d = root / split / ("a" if i % 2 else "b")
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


@pytest.fixture
def moved_run(tmp_path, monkeypatch, clean_env):
    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "data")
    assert main(["train", "--preset", "tiny", "--dataset", "folder", "--data-dir", "data",
                 "--subset", "0", "--batch-size", "8", "--max-epochs", "1", "--sample-every",
                 "0", "--device", "cpu", "--out", "run"]) == 0
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"]["data_dir"] == str(tmp_path / "data")  # stored absolute, not "data"
    shutil.move(tmp_path / "data", tmp_path / "elsewhere")
    return tmp_path / "run", tmp_path / "elsewhere"


def test_eval_finds_moved_data_through_data_dir_or_the_environment(moved_run, monkeypatch,
                                                                   capsys):
    run, elsewhere = moved_run
    ev = ["eval", str(run), "--n", "4", "--k", "2", "--json"]
    assert main(ev) == 2
    err = capsys.readouterr().err
    assert str(run.parent / "data") in err and "--download" not in err  # eval has no --download
    assert main([*ev, "--data-dir", str(elsewhere)]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 4
    monkeypatch.setenv("RESVAE_DATA_DIR", str(elsewhere))
    assert main(ev) == 0
    monkeypatch.delenv("RESVAE_DATA_DIR")
    for cmd in (["reconstruct", "-n", "4"], ["interpolate", "--pairs", "2", "--steps", "3"]):
        assert main([cmd[0], str(run), *cmd[1:], "-o", str(run / f"{cmd[0]}.png"),
                     "--data-dir", str(elsewhere)]) == 0
        assert Image.open(run / f"{cmd[0]}.png").size[0] > 0


def test_eval_defaults(moved_run, capsys):
    run, elsewhere = moved_run
    assert main(["eval", str(run), "--k", "2", "--json", "--data-dir", str(elsewhere)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["n_images"] == 8  # the default --n (100) takes what the 8-image split has
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "(default auto)" in out and "default 100" in out


@pytest.mark.parametrize("layout", ["flat", "classes-at-root", "train-only"])
def test_folder_without_test_split_trains_with_val_fraction(tmp_path, monkeypatch, clean_env,
                                                             capsys, layout):
    from resvae.data import load_dataset

    rng = np.random.default_rng(1)
    root = tmp_path / "imgs"
    for i in range(12):
        d = {"flat": root, "classes-at-root": root / ("a" if i % 2 else "b"),
             "train-only": root / "train" / ("a" if i % 2 else "b")}[layout]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    with pytest.raises(Exception, match="no test/ split: pass --val-fraction"):
        load_dataset("folder", str(root))
    s = load_dataset("folder", str(root), val_fraction=0.25)
    assert (len(s.train), len(s.val)) == (9, 3) and s.test is s.val and "no test/" in s.source
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", "tiny", "--dataset", "folder", "--data-dir", str(root),
                 "--val-fraction", "0.25", "--subset", "0", "--batch-size", "4",
                 "--max-epochs", "1", "--sample-every", "0", "--device", "cpu",
                 "--out", "run"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("device, message", [("tpu", "expected auto, cpu, cuda"),
                                             ("cuda", "CUDA is not available")])
def test_an_unusable_device_is_named_not_the_checkpoint(moved_run, capsys, device, message):
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run, elsewhere = moved_run
    assert main(["eval", str(run), "--device", device, "--data-dir", str(elsewhere)]) == 2
    err = capsys.readouterr().err
    assert message in err and "corrupt" not in err and (run / "checkpoints" / "best.pt").exists()


@pytest.mark.parametrize("argv", [
    ["info", "--image-size", "0"], ["info", "--image-size", "-8"], ["info", "--channels", "0"],
    ["sample", "RUN", "-n", "100000000", "-o", "x.png"],
    ["sample", "RUN", "--temperature", "nan", "-o", "x.png"],
    ["eval", "RUN", "--batch-size", "0"], ["info", "--depth", ""], ["info", "--depth", ","],
])
def test_bad_numbers_are_one_line_exit_2(argv, moved_run, capsys):
    run, _ = moved_run
    argv = [str(run) if a == "RUN" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("resvae ")
    assert not (run.parent / "x.png").exists()
