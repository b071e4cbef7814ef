import importlib.util
import os
import socket
from pathlib import Path

# Tests run on 2 shared cores: keep torch from oversubscribing them. Set before torch is
# imported (below, through resvae), or it has no effect.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

import resvae.data as data_module  # noqa: E402
from resvae.data import ImageSet, load_dataset  # noqa: E402

T = importlib.import_module("resvae.train")  # the module: resvae.train is the function


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
def small_runs(clean_env, monkeypatch):
    """A private data cache, no RESVAE_* variables from the caller, and small eval splits for
    the runs that go through the command line (direct `train()` calls pass `data=` instead)."""
    monkeypatch.setattr(data_module, "load_dataset", small_load)


# --- the environment of a test's runs and child processes ------------------------------------
DDP_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def clear_resvae_env(mp: pytest.MonkeyPatch, cache) -> None:
    """Through `mp` (undone with it): RESVAE_CACHE set to `cache`, a private data cache, and
    every other RESVAE_* variable of the caller's removed, so none of its settings reaches a
    test's runs. For module-scoped fixtures; a test takes the `clean_env` fixture."""
    mp.setenv("RESVAE_CACHE", str(cache))
    for var in [v for v in os.environ if v.startswith("RESVAE_") and v != "RESVAE_CACHE"]:
        mp.delenv(var)


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """clear_resvae_env for one test, its cache under tmp_path; returns tmp_path."""
    clear_resvae_env(monkeypatch, tmp_path / "cache")
    return tmp_path


def child_env(tmp_path) -> dict:
    """The environment of a `python -m resvae` (or torchrun) child process: the caller's, less
    its RESVAE_* and DDP variables, with a private cache under tmp_path, one thread, and the
    resvae this test imported first on the path."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RESVAE_") and k not in DDP_VARS}
    src = str(Path(T.__file__).resolve().parents[1])  # .../src of the resvae imported here
    env.update(RESVAE_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([src, env.get("PYTHONPATH", "")]))
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at this moment, for a DDP rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def benchmark_script(name: str, module_name: str | None = None):
    """benchmarks/<name>.py imported as a module: the scripts are not part of the package, and
    their tests call their functions. `module_name` where the file's own name would shadow
    another module (codecs)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(module_name or name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
