"""The data cache directory's environment variable: RESVAE_CACHE, with RESVAE_DATA (its old
name) still honoured, loudly, once per process."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import resvae.data as D
from resvae import config as C

OLD_NOTE = "RESVAE_DATA is deprecated, use RESVAE_CACHE"


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    for var in ("RESVAE_CACHE", "RESVAE_DATA", "RESVAE_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(D, "_warned_old_cache_var", False)  # each test is a fresh process


def test_resvae_cache_names_the_cache_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESVAE_CACHE", str(tmp_path / "c"))
    assert D.default_cache_dir() == tmp_path / "c"
    assert capsys.readouterr().err == ""


def test_default_is_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert D.default_cache_dir() == tmp_path / ".cache" / "resvae"


def test_old_name_still_works_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESVAE_DATA", str(tmp_path / "old"))
    assert D.default_cache_dir() == tmp_path / "old"
    assert D.default_cache_dir() == tmp_path / "old"
    err = capsys.readouterr().err
    assert err.count(OLD_NOTE) == 1 and len(err.splitlines()) == 1  # once per process


def test_both_set_new_name_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RESVAE_DATA", str(tmp_path / "old"))
    monkeypatch.setenv("RESVAE_CACHE", str(tmp_path / "new"))
    assert D.default_cache_dir() == tmp_path / "new"
    err = capsys.readouterr().err
    assert OLD_NOTE in err and "ignored" in err


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(2):
                img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root


@pytest.mark.parametrize("var", ["RESVAE_CACHE", "RESVAE_DATA"])
def test_decoded_arrays_land_in_the_named_cache(tmp_path, monkeypatch, capsys, var):
    monkeypatch.setenv(var, str(tmp_path / "cache"))
    d = D.load_dataset("folder", str(_folder(tmp_path / "imgs")))
    assert len(d.train.images) == 4
    assert list((tmp_path / "cache" / "arrays").glob("*.npz"))
    assert (OLD_NOTE in capsys.readouterr().err) == (var == "RESVAE_DATA")


def test_neither_name_is_a_config_key():
    env = {"RESVAE_CACHE": "/c", "RESVAE_DATA": "/d"}
    assert C.env_overrides(env) == {} and C.resolve(environ=env) == C.RunConfig()
