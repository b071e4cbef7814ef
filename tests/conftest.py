import os

# Tests run on 2 shared cores: keep torch from oversubscribing them. Set before torch is
# imported (below, through resvae), or it has no effect.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

import resvae.data as data_module  # noqa: E402
import resvae.train as T  # noqa: E402
from resvae.data import ImageSet, load_dataset  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --runslow to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# --- small training runs (test_train, test_cli) ----------------------------------------------
_CACHE = {}
N_EVAL = 64  # val/test images per run (save_images needs >= 50)


def small_load(name, data_dir=None, *, subset=0, val_fraction=0.0, seed=0, **kw):
    """The real load_dataset, with 64-image val/test splits instead of the shapes test split's
    2000 (evaluation would otherwise dominate the tests' time)."""
    key = (name, subset, val_fraction, seed, tuple(sorted(kw.items())))
    if key not in _CACHE:
        d = load_dataset(name, data_dir, subset=subset, val_fraction=val_fraction, seed=seed, **kw)
        d.val = ImageSet(d.val.images[:N_EVAL], None, d.val.classes)
        d.test = ImageSet(d.test.images[N_EVAL:2 * N_EVAL], None, d.test.classes)
        _CACHE[key] = d
    return _CACHE[key]


def small_data(cfg):
    """The splits a run of `cfg` trains on, through small_load: pass as `train(cfg, out,
    data=small_data(cfg))`."""
    dc = cfg.data
    return small_load(dc.dataset, dc.data_dir or None, subset=dc.subset,
                      val_fraction=dc.val_fraction, seed=cfg.train.seed,
                      image_size=dc.image_size, pad_to_32=dc.pad_to_32)


def train_small(cfg, out, **kw):
    """resvae.train.train on small_data(cfg), without a progress bar."""
    return T.train(cfg, out, data=small_data(cfg), progress=False, **kw)


@pytest.fixture
def small_runs(tmp_path, monkeypatch):
    """A private data cache, no RESVAE_* variables from the caller, and small eval splits for
    the runs that go through the command line (direct `train()` calls pass `data=` instead)."""
    monkeypatch.setenv("RESVAE_CACHE", str(tmp_path / "cache"))
    for var in list(os.environ):
        if var.startswith("RESVAE_") and var != "RESVAE_CACHE":
            monkeypatch.delenv(var)
    monkeypatch.setattr(data_module, "load_dataset", small_load)
