"""Bad inputs (issue 9): each is one clear line on stderr naming the flag, file or key and what
was expected, exit status 2, and nothing written: no run directory, no data cache entry.

Every case below is a row of docs/reliability.md's "Bad inputs" table."""

import os
import pickle
import shutil
import struct
import urllib.request
import zlib

import numpy as np
import pytest
from PIL import Image

import resvae.data as data
from resvae.cli import main
from resvae.data import DataError, load_dataset

FAST = ["--device", "cpu", "--max-epochs", "1", "--sample-every", "0"]


@pytest.fixture
def env(clean_env, monkeypatch):
    """A private cache, no RESVAE_* variables from the caller (clean_env), and a network that
    fails the test if anything touches it (only --download may)."""
    def no_network(*a, **k):
        raise AssertionError("the network was touched")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(data, "_download", no_network)
    return clean_env


# ----------------------------------------------------------------------------- inputs on disk

def _png(path, size=8, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    # seeded by the path below the test's tmp folder, not hash(): str hashes change with every
    # process (PYTHONHASHSEED), which made a 1-epoch run's val loss differ between CI runs
    # (about 1 data draw in 100 gave eval-mode BatchNorm, after 2 updates, an infinite loss)
    rng = np.random.default_rng(zlib.crc32("/".join(path.parts[-3:]).encode()))
    Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).convert(mode).save(path)


def _folder(root, per_class=3):
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(per_class):
                _png(root / split / cls / f"{i}.png")
    return root


def _idx(d, *, magic=2051, cut=0):
    d.mkdir(parents=True, exist_ok=True)
    for name, m, shape in (("train-images-idx3-ubyte", magic, (4, 28, 28)),
                           ("train-labels-idx1-ubyte", 2049, (4,)),
                           ("t10k-images-idx3-ubyte", 2051, (4, 28, 28)),
                           ("t10k-labels-idx1-ubyte", 2049, (4,))):
        raw = struct.pack(">i", m) + b"".join(struct.pack(">i", n) for n in shape)
        raw += bytes(int(np.prod(shape)))
        (d / name).write_bytes(raw[:len(raw) - cut] if name.startswith("train-im") else raw)
    return d


def _cifar(root, n=4, skip=()):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batch = {b"data": np.zeros((n, 3072), np.uint8), b"labels": [0] * n}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        if name not in skip:
            (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2))
    return root


def _toml(path, text):
    path.write_text(text)
    return str(path)


# ----------------------------------------------------------------------------- the cases
# name -> (build(tmp) -> (argv, environ), substrings the one line must hold)

def _folder_with(extra):
    def build(tmp):
        root = _folder(tmp / "imgs")
        extra(root)
        return ["--dataset", "folder", "--data-dir", str(root), "--subset", "0",
                "--batch-size", "2"], {}
    return build


def _self_link(root):
    os.symlink(root / "train" / "a" / "self", root / "train" / "a" / "self")


def _empty_class(root):
    (root / "train" / "c").mkdir()
    (root / "test" / "c").mkdir()


CASES = {
    "unknown flag, near miss": (lambda t: (["--lattent-dim", "3"], {}),
                                ["--lattent-dim", "did you mean --latent-dim?"]),
    "abbreviated --dep": (lambda t: (["--dep", "40"], {}), ["--dep", "did you mean --depth?"]),
    "abbreviated --max-e": (lambda t: (["--max-e", "3"], {}), ["--max-e", "--max-epochs"]),
    "abbreviated --sub": (lambda t: (["--sub", "64"], {}), ["--sub", "--subset"]),
    "not a number": (lambda t: (["--latent-dim", "abc"], {}), ["--latent-dim", "int", "'abc'"]),
    "negative lr": (lambda t: (["--lr", "-1"], {}), ["--lr", "positive", "-1"]),
    "batch size 0": (lambda t: (["--batch-size", "0"], {}), ["--batch-size", "positive", "0"]),
    "width 0": (lambda t: (["--width", "0"], {}), ["--width", "positive", "0.0"]),
    "latent 0": (lambda t: (["--latent-dim", "0"], {}), ["--latent-dim", "positive"]),
    "depth not in the study family": (
        lambda t: (["--arch", "study", "--block", "bottleneck", "--depth", "50"], {}),
        ["depth=50", "28, 40, 70, 100"]),
    "depth not reachable by resnet": (lambda t: (["--depth", "21"], {}),
                                      ["depth 21", "nearest valid: 20 or 24"]),
    "budget 10x": (lambda t: (["--budget", "10x"], {}), ["--budget", "duration", "'10x'"]),
    "environment variable RESVAE_LR=abc": (lambda t: ([], {"RESVAE_LR": "abc"}),
                                           ["RESVAE_LR", "float", "'abc'"]),
    "unknown environment variable": (lambda t: ([], {"RESVAE_LATENT_DIMS": "4"}),
                                     ["RESVAE_LATENT_DIMS", "did you mean RESVAE_LATENT_DIM"]),
    "config file: TOML syntax error": (
        lambda t: (["--config", _toml(t / "c.toml", "[train]\nlr = 0.1\nbatch_size =\n")], {}),
        ["c.toml", "invalid TOML", "line 3"]),
    "config file: unknown key": (
        lambda t: (["--config", _toml(t / "c.toml", "[train]\nlrr = 0.1\n")], {}),
        ["c.toml", "'train.lrr'", "did you mean lr"]),
    "image folder: a file that is not an image": (
        _folder_with(lambda r: (r / "train" / "a" / "x.png").write_bytes(b"not a png")),
        ["cannot read image", "x.png"]),
    "image folder: mixed sizes": (_folder_with(lambda r: _png(r / "train" / "b" / "big.png", 16)),
                                  ["big.png is 16x16", "8x8", "--image-size"]),
    "image folder: empty class folder": (_folder_with(_empty_class),
                                         ["train/c contains no images"]),
    "image folder: symbolic link loop": (_folder_with(_self_link),
                                         ["self", "link loop", "remove it"]),
    "image folder: one image, --batch-size 1 (BatchNorm)": (
        lambda t: (["--dataset", "folder", "--subset", "0", "--batch-size", "1", "--data-dir",
                    str(_folder(t / "one", per_class=1))], {}),
        ["--batch-size 1", "BatchNorm needs at least 2 images"]),
    "image folder: fewer images than one batch": (
        lambda t: (["--dataset", "folder", "--subset", "0", "--batch-size", "8", "--data-dir",
                    str(_folder(t / "few", per_class=1))], {}),
        ["--batch-size 8", "larger than the 2 training image"]),
    "--subset larger than the data set": (
        lambda t: (["--dataset", "folder", "--subset", "100", "--batch-size", "2",
                    "--data-dir", str(_folder(t / "imgs"))], {}),
        ["--subset 100", "larger than the 6 training images", "--subset 0"]),
    "IDX file: wrong magic number": (
        lambda t: (["--dataset", "mnist", "--data-dir", str(_idx(t / "mn", magic=1234))], {}),
        ["train-images-idx3-ubyte", "magic 1234, expected 2051"]),
    "IDX file: truncated": (
        lambda t: (["--dataset", "mnist", "--data-dir", str(_idx(t / "mn", cut=100))], {}),
        ["train-images-idx3-ubyte", "3036 bytes of data", "(4, 28, 28)"]),
    "CIFAR-10 directory missing a batch": (
        lambda t: (["--dataset", "cifar10", "--data-dir",
                    str(_cifar(t / "cif", skip=("data_batch_3",)))], {}),
        ["data_batch_3", "missing"]),
    "cifar10 with no local copy and no --download (no network)": (
        lambda t: (["--dataset", "cifar10"], {}),
        ["no local CIFAR-10 copy", "--data-dir", "--download"]),
    "--out is an existing file": (
        lambda t: (["--out", _toml(t / "notes.txt", "mine\n")], {}),
        ["--out", "notes.txt", "is a file"]),
    "--out under a file (cannot be created)": (
        lambda t: (["--out", str(t / _toml(t / "f.txt", "") / "run")], {}),
        ["--out", "f.txt/run", "cannot write into it", "Not a directory"]),
}


VALID_DATA = {"--subset larger than the data set", "image folder: fewer images than one batch",
              "image folder: one image, --batch-size 1 (BatchNorm)"}


def _run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's errors
        rc = e.code
    err = capsys.readouterr().err
    # warnings (resvae: warning: ...) may come first; the error is one line, the last
    lines = [line for line in err.splitlines() if not line.startswith("resvae: warning:")]
    return rc, lines


def _written(tmp, out):
    cache = tmp / "cache"
    return out.exists(), sorted(p.name for p in cache.rglob("*") if p.is_file()) \
        if cache.exists() else []


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_nothing_written(case, env, monkeypatch, capsys):
    build, expected = CASES[case]
    argv, environ = build(env)
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    out = env / "run"
    if "--out" not in argv:
        argv = [*argv, "--out", str(out)]
    else:
        out = env / argv[argv.index("--out") + 1]
    shutil.rmtree(env / "cache", ignore_errors=True)  # a builder's own loads do not count
    rc, lines = _run(["train", "--preset", "tiny", *FAST, *argv], capsys)
    assert rc == 2, lines
    assert len(lines) == 1 and lines[0].startswith("resvae train: error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    made_run, cache = _written(env, env / "run")
    assert not made_run
    if case in VALID_DATA:
        # the data set itself is valid (a flag asks too much of it): its decoded arrays are
        # kept, and the corrected command reuses them
        assert len(cache) == 1 and cache[0].startswith("folder-"), cache
    else:
        assert cache == []


def test_bad_sweep_files_name_the_file(env, capsys):
    cases = {
        "preset = 'tiny'\n[grid]\ndepth = [20,, 24]\n": ["s.toml", "invalid TOML", "line 3"],
        "preset = 'tiny'\ngrids = 1\n[grid]\ndepth = [20]\n": ["s.toml", "unknown sweep key",
                                                                "grids"],
        "preset = 'tiny'\n[grid]\ndepth = [20]\n[set]\nlrr = 1\n": ["s.toml [set]", "'lrr'",
                                                                   "did you mean lr"],
        "preset = 'tiny'\n[grid]\ndepht = [20]\n": ["s.toml [grid]", "'depht'", "depth"],
        # each value checked before the first run: these used to fail only after one trained
        "preset = 'tiny'\niwae_k = 'abc'\n[grid]\ndepth = [20]\n[set]\nmax_epochs = 1\n": [
            "s.toml", "iwae_k = 'abc'", "integer >= 0"],
        "preset = 'tiny'\n[grid]\ndepth = [20, 27]\n[set]\nmax_epochs = 1\n": [
            "grid point depth=27", "nearest valid: 24 or 28"],
        # (a traceback before)
        "preset = 'tiny'\nout = 5\n[grid]\ndepth = [20]\n": ["s.toml", "out = 5",
                                                                  "non-empty string"],
        "preset = 'tiny'\nset = 3\n[grid]\ndepth = [20]\n": ["s.toml", "set must be a table"],
        "preset = 'tiny'\nbudget_per_run = 'soon'\n[grid]\ndepth = [20]\n": [
            "s.toml", "budget_per_run"],
    }
    for text, expected in cases.items():
        path = _toml(env / "s.toml", text)
        rc, lines = _run(["sweep", path, "--out", str(env / "sw")], capsys)
        assert rc == 2 and len(lines) == 1, (text, lines)
        for t in expected:
            assert t in lines[0], (t, lines[0])
        assert not (env / "sw").exists()


def test_resume_refuses_changed_seed_subset_or_data(env, tmp_path, capsys):
    from conftest import train_small

    from resvae.config import resolve
    run = tmp_path / "r"
    train_small(resolve(preset="tiny", environ={}, overrides={
        "max_epochs": 1, "subset": 64, "device": "cpu", "sample_every": 0}), run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for flags, expected in ((["--seed", "3"], "seed 0 in the run vs 3"),
                            (["--subset", "32"], "subset 64 in the run vs 32"),
                            (["--dataset", "mnist"], "dataset 'shapes' in the run vs 'mnist'"),
                            (["--image-size", "16"], "image_size 0 in the run vs 16")):
        rc, lines = _run(["train", "--resume", str(run), *flags], capsys)
        assert rc == 2 and len(lines) == 1, lines
        assert f"--resume {run}" in lines[0] and expected in lines[0], lines[0]
        assert "keeps the data and seed" in lines[0]
    rc, lines = _run(["train", "--resume", str(run), "--out", str(tmp_path / "x")], capsys)
    assert rc == 2 and "drop --overwrite/--out" in lines[0]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- accepted, and said

def test_odd_image_size_trains(env, capsys):
    # --image-size 7 gave a shape error mid-training: the decoder's 8x8 output is now cropped
    root = _folder(env / "imgs", per_class=4)
    out = env / "run"
    rc, lines = _run(["train", "--preset", "tiny", *FAST, "--dataset", "folder", "--data-dir",
                      str(root), "--subset", "0", "--batch-size", "4", "--image-size", "7",
                      "--out", str(out)], capsys)
    assert rc == 0, lines
    from resvae.checkpoints import load_checkpoint
    assert load_checkpoint(out / "checkpoints" / "last.pt")["image_shape"] == [3, 7, 7]


@pytest.mark.parametrize("mode, said", [
    ("L", "grayscale images: the gray value repeated"),
    ("LA", "images with transparent pixels: alpha dropped"),
    ("RGBA", "images with transparent pixels: alpha dropped"),
])
def test_grayscale_and_transparent_images_are_converted_and_said(env, mode, said):
    root = _folder(env / "imgs")
    img = Image.new(mode, (8, 8), (90, 0) if mode == "LA" else 90 if mode == "L" else
                    (10, 20, 30, 0))
    img.save(root / "train" / "b" / "odd.png")
    with pytest.warns(UserWarning, match=f"converted to RGB: {said}.*odd.png"):
        s = load_dataset("folder", str(root))
    odd = s.train.images[list(s.train.labels).index(1) + 3]  # b/0, b/1, b/2, b/odd
    expected = (90, 90, 90) if mode in ("L", "LA") else (10, 20, 30)
    assert tuple(odd[:, 0, 0]) == expected


def test_opaque_rgba_is_not_called_transparent(env):
    root = _folder(env / "imgs")
    Image.new("RGBA", (8, 8), (1, 2, 3, 255)).save(root / "train" / "a" / "opaque.png")
    with pytest.warns(UserWarning) as said:
        load_dataset("folder", str(root))
    assert "RGBA images (e.g." in str(said[0].message)
    assert "transparent" not in str(said[0].message)


def test_non_image_entries_are_ignored_and_said(env):
    root = _folder(env / "imgs")
    (root / "train" / "a" / "README.txt").write_text("notes")
    os.symlink(root / "train" / "a", root / "train" / "a" / "loop")  # a link to its own folder
    with pytest.warns(UserWarning, match="ignored 2 entries that are not an image file"):
        s = load_dataset("folder", str(root))
    assert len(s.train) == 6


def test_crafted_cifar_batch_runs_nothing(env, capsys):
    marker = env / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    root = _cifar(env / "cif")
    (root / "cifar-10-batches-py" / "data_batch_2").write_bytes(
        pickle.dumps({b"data": Payload(), b"labels": [0]}))
    rc, lines = _run(["train", "--preset", "tiny", *FAST, "--dataset", "cifar10", "--data-dir",
                      str(root), "--out", str(env / "run")], capsys)
    assert rc == 2 and "data_batch_2" in lines[0] and "refusing to unpickle" in lines[0]
    assert "system" in lines[0]
    assert not marker.exists() and not (env / "run").exists()
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", str(root))
    assert not marker.exists()
