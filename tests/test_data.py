"""Tests for resvae.data: small files in the real on-disk formats, no network."""

import gzip
import hashlib
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from resvae import data
from resvae.data import DataError, iterate_batches, load_dataset, num_batches

CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck"]


# Never touch ~/.cache or a real data dir from the environment (RESVAE_DATA_DIR, or RESVAE_DATA,
# the cache dir's deprecated old name).
pytestmark = pytest.mark.usefixtures("clean_env")


# ----------------------------------------------------------------------------- CIFAR-10 fakes

def _cifar_batch(n, offset):
    """n images whose R, G, B planes are constant 10+i, 100+i, 200+i (i = image index)."""
    x = np.empty((n, 3, 32, 32), np.uint8)
    for i in range(n):
        x[i, 0], x[i, 1], x[i, 2] = 10 + i, 100 + i, 200 + i
    x[:, 0, 0, 1] = 7  # one marked pixel: row 0, column 1 of the R plane
    return {b"batch_label": b"batch", b"labels": [(offset + i) % 10 for i in range(n)],
            b"data": x.reshape(n, 3072), b"filenames": [b"f.png"] * n}


def _cifar_files(n=20):
    files = {f"data_batch_{k}": _cifar_batch(n, k) for k in range(1, 6)}
    files["test_batch"] = _cifar_batch(n, 0)
    files["batches.meta"] = {b"label_names": [c.encode() for c in CLASSES],
                             b"num_cases_per_batch": n}
    return {name: pickle.dumps(d, protocol=2) for name, d in files.items()}


def _write_cifar_dir(root, n=20):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for name, raw in _cifar_files(n).items():
        (d / name).write_bytes(raw)
    return d


def _write_cifar_archive(path, n=20):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in _cifar_files(n).items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return hashlib.md5(path.read_bytes()).hexdigest()


def _check_cifar(s, n=20):
    assert s.train.images.shape == (5 * n, 3, 32, 32) and s.train.images.dtype == np.uint8
    assert s.test.images.shape == (n, 3, 32, 32)
    assert s.train.labels.dtype == np.int64 and s.train.classes == CLASSES
    assert s.train.labels[:3].tolist() == [1, 2, 3]  # batch 1 starts at offset 1
    img = s.train.images[2]
    assert (img[0, 5, 5], img[1, 5, 5], img[2, 5, 5]) == (12, 102, 202)  # planar R, G, B
    assert img[0, 0, 1] == 7 and img[1, 0, 1] == 102  # row-major within a plane
    assert s.val is s.test  # default: validate on the test split


def test_cifar_pickle_dir_and_parent(tmp_path, monkeypatch):
    d = _write_cifar_dir(tmp_path / "data")
    _check_cifar(load_dataset("cifar10", str(d)))
    s = load_dataset("cifar10", str(tmp_path / "data"))
    _check_cifar(s)
    assert "cifar-10-batches-py" in s.source
    monkeypatch.setenv("RESVAE_DATA_DIR", str(d))  # used when no data_dir is given
    _check_cifar(load_dataset("cifar10"))


def test_cifar_bad_batch_names_file(tmp_path):
    d = _write_cifar_dir(tmp_path)
    bad = {b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}
    (d / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match="data_batch_3.*3072"):
        load_dataset("cifar10", str(d))
    bad = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}
    (d / "data_batch_3").write_bytes(pickle.dumps(bad))
    with pytest.raises(DataError, match="data_batch_3.*labels"):
        load_dataset("cifar10", str(d))


def test_cifar_pickle_refuses_code(tmp_path):
    d = _write_cifar_dir(tmp_path)
    (d / "data_batch_1").write_bytes(pickle.dumps(os.system))
    with pytest.raises(DataError, match="data_batch_1.*refusing"):
        load_dataset("cifar10", str(d))


def test_cifar_archive_md5(tmp_path, monkeypatch):
    archive = tmp_path / "dl" / "cifar-10-python.tar.gz"
    md5 = _write_cifar_archive(archive)
    with pytest.raises(DataError) as err:  # the real CIFAR10_MD5 does not match the fake
        load_dataset("cifar10", str(archive))
    assert str(archive) in str(err.value) and md5 in str(err.value)
    assert data.CIFAR10_MD5 in str(err.value)
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)
    s = load_dataset("cifar10", str(archive.parent))  # directory containing the archive
    _check_cifar(s)
    assert sorted(os.listdir(archive.parent)) == [archive.name]  # nothing written next to it


def test_cifar_download_file_url(tmp_path, monkeypatch):
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    monkeypatch.setattr(data, "CIFAR10_MD5", _write_cifar_archive(archive))
    cache = tmp_path / "cache2"
    s = load_dataset("cifar10", cache_dir=str(cache), url=archive.as_uri(), download=True)
    _check_cifar(s)
    assert (cache / "cifar-10-python.tar.gz").is_file()
    # Found in the cache now: an unreachable URL is never contacted.
    _check_cifar(load_dataset("cifar10", cache_dir=str(cache), url="http://127.0.0.1:9/x"))


def test_cifar_download_bad_md5(tmp_path):
    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    _write_cifar_archive(archive)  # the real CIFAR10_MD5 will not match
    with pytest.raises(DataError, match="md5"):
        load_dataset("cifar10", url=archive.as_uri(), download=True)
    assert not list((tmp_path / "cache").iterdir())  # neither the archive nor a .part file


def test_cifar_download_offline(tmp_path):
    with pytest.raises(DataError, match="offline.*--data-dir.*RESVAE_DATA_DIR.*cifar-10-batches"):
        load_dataset("cifar10", download=True, url="http://127.0.0.1:9/x.tar.gz")
    with pytest.raises(DataError, match="offline"):
        load_dataset("cifar10", str(tmp_path), download=True, url="http://127.0.0.1:9/x.tar.gz")
    assert not list((tmp_path / "cache").glob("*.part"))  # no half-downloaded files left


def test_cifar_missing_without_download(tmp_path):
    with pytest.raises(DataError, match="no CIFAR-10 data found.*cifar-10-python.tar.gz"):
        load_dataset("cifar10", str(tmp_path))


# ----------------------------------------------------------------------------- image folders

def _png(path, size=(8, 8), mode="RGB", color=(200, 30, 40)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode != "L" else 90).save(path)


def _make_folder(root):
    for split in ("train", "test"):
        _png(root / split / "a" / "x.png", color=(255, 0, 0))
        _png(root / split / "b" / "y.jpg", color=(0, 0, 255))
    _png(root / "train" / "a" / "gray.PNG", mode="L")
    pal = Image.new("RGB", (8, 8), (0, 255, 0)).convert("P", palette=Image.ADAPTIVE)
    pal.save(root / "train" / "a" / "pal.gif")
    Image.new("RGBA", (8, 8), (1, 2, 3, 128)).save(root / "train" / "b" / "rgba.png")
    (root / "train" / "a" / "README.txt").write_text("not an image")


def test_folder_decodes_and_converts(tmp_path):
    _make_folder(tmp_path / "f")
    with pytest.warns(UserWarning) as said:  # what the conversion did is said, with a file each
        s = load_dataset("folder", str(tmp_path / "f"))
    said = " ".join(str(w.message) for w in said)
    assert "ignored 1 entry" in said and "README.txt" in said
    assert "grayscale" in said and "gray.PNG" in said
    assert "transparent pixels: alpha dropped" in said and "rgba.png" in said
    assert s.train.images.shape == (5, 3, 8, 8) and s.test.images.shape == (2, 3, 8, 8)
    assert s.train.classes == ["a", "b"] and s.train.labels.tolist() == [0, 0, 0, 1, 1]
    gray, pal, red = s.train.images[:3]  # sorted: gray.PNG, pal.gif, x.png
    assert (gray[:, 0, 0] == 90).all()
    assert tuple(pal[:, 0, 0]) == (0, 255, 0) and tuple(red[:, 0, 0]) == (255, 0, 0)
    assert tuple(s.train.images[3][:, 0, 0]) == (1, 2, 3)  # RGBA -> RGB drops alpha


def test_cifar10_accepts_image_folder(tmp_path):
    _make_folder(tmp_path / "f")
    s = load_dataset("cifar10", str(tmp_path / "f"))
    assert s.name == "cifar10" and s.train.images.shape == (5, 3, 8, 8)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_folder_truncated_image(tmp_path, ext):
    _make_folder(tmp_path)
    bad = tmp_path / "train" / "b" / f"z.{ext}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)).save(bad)
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match=f"z.{ext}"):
        load_dataset("folder", str(tmp_path))


def test_folder_layout_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("folder", str(tmp_path / "nope"))
    _make_folder(tmp_path)
    (tmp_path / "train" / "c").mkdir()
    (tmp_path / "test" / "c").mkdir()
    with pytest.raises(DataError, match=r"train[/\\]c contains no images"):
        load_dataset("folder", str(tmp_path))
    (tmp_path / "train" / "c").rmdir()
    (tmp_path / "test" / "c").rmdir()
    for p in (tmp_path / "test").rglob("*"):
        if p.is_file():
            p.unlink()
    for d in sorted((tmp_path / "test").rglob("*"), reverse=True):
        d.rmdir()
    (tmp_path / "test").rmdir()
    with pytest.raises(DataError, match="no test/ split: pass --val-fraction.*test/<class>"):
        load_dataset("folder", str(tmp_path))


def test_folder_mixed_sizes(tmp_path):
    _make_folder(tmp_path)
    _png(tmp_path / "train" / "b" / "wide.png", size=(16, 8), color=(9, 9, 9))
    with pytest.raises(DataError, match="wide.png is 16x8.*8x8.*--image-size"):
        load_dataset("folder", str(tmp_path))
    s = load_dataset("folder", str(tmp_path), image_size=4)
    assert s.train.images.shape == (6, 3, 4, 4) and s.test.images.shape == (2, 3, 4, 4)
    assert (s.train.images[4] == 9).all()  # b/: rgba, wide, y.jpg; wide resized + cropped


# ----------------------------------------------------------------------------- MNIST IDX

def _write_idx(d, gz, n=6, magic_images=2051):
    d.mkdir(parents=True, exist_ok=True)
    x = np.arange(n * 28 * 28, dtype=np.uint32).reshape(n, 28, 28) % 251 + 1
    for prefix in ("train", "t10k"):
        files = {f"{prefix}-images-idx3-ubyte": np.array([magic_images, n, 28, 28], ">i4")
                 .tobytes() + x.astype(np.uint8).tobytes(),
                 f"{prefix}-labels-idx1-ubyte": np.array([2049, n], ">i4").tobytes()
                 + (np.arange(n) % 10).astype(np.uint8).tobytes()}
        for name, raw in files.items():
            if gz:
                with gzip.open(d / f"{name}.gz", "wb") as f:
                    f.write(raw)
            else:
                (d / name).write_bytes(raw)
    return x.astype(np.uint8)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    x = _write_idx(tmp_path, gz)
    s = load_dataset("mnist", str(tmp_path))
    assert s.train.images.shape == (6, 1, 32, 32) and s.test.images.shape == (6, 1, 32, 32)
    assert (s.train.images[:, 0, 2:30, 2:30] == x).all() and s.train.images[:, :, :2].max() == 0
    assert s.train.labels.tolist() == [0, 1, 2, 3, 4, 5] and s.train.classes[3] == "3"
    s = load_dataset("fashion-mnist", str(tmp_path), pad_to_32=False)
    assert s.train.images.shape == (6, 1, 28, 28) and s.train.classes[9] == "Ankle boot"


def test_mnist_errors(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_dataset("mnist", str(tmp_path))
    _write_idx(tmp_path, gz=True, magic_images=1234)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz has magic 1234"):
        load_dataset("mnist", str(tmp_path))


# ----------------------------------------------------------------------------- shapes, splits

def test_shapes_deterministic():
    a, b = load_dataset("shapes", seed=1), load_dataset("shapes", seed=2)
    assert a.train.images.shape == (10000, 3, 32, 32) and a.test.images.shape == (2000, 3, 32, 32)
    assert a.train.images.dtype == np.uint8 and a.train.classes == ["circle", "square", "triangle"]
    assert np.array_equal(a.train.images, b.train.images)
    assert np.array_equal(a.test.labels, b.test.labels)
    assert np.bincount(a.train.labels).min() >= 3000
    assert not np.array_equal(a.train.images[:100], a.test.images[:100])


def test_subset_and_val_fraction(tmp_path):
    d = _write_cifar_dir(tmp_path)
    s = load_dataset("cifar10", str(d), subset=25)
    assert len(s.train.images) == 25 and sorted(np.bincount(s.train.labels)) == [2] * 5 + [3] * 5
    assert len(s.test.images) == 20 and s.val is s.test
    s = load_dataset("shapes", subset=100, val_fraction=0.2, seed=3)
    assert len(s.train.images) == 80 and len(s.val.images) == 20 and len(s.test.images) == 2000
    full = load_dataset("shapes", subset=100).train.images.reshape(100, -1)
    rows = {r.tobytes(): i for i, r in enumerate(full)}
    tr = {rows[r.tobytes()] for r in s.train.images.reshape(80, -1)}
    va = {rows[r.tobytes()] for r in s.val.images.reshape(20, -1)}
    assert len(tr) == 80 and len(va) == 20 and not tr & va
    again = load_dataset("shapes", subset=100, val_fraction=0.2, seed=3)
    assert np.array_equal(again.val.images, s.val.images)
    with pytest.raises(DataError, match="val-fraction"):
        load_dataset("shapes", val_fraction=1.5)
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


# ----------------------------------------------------------------------------- batching

def test_iterate_batches_order():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)

    def run(**kw):
        return [b.flatten().tolist() for b in iterate_batches(images, 4, **kw)]
    a = run(shuffle=True, seed=5, epoch=0)
    assert a == run(shuffle=True, seed=5, epoch=0) and a != run(shuffle=True, seed=5, epoch=1)
    assert [len(b) for b in a] == [4, 4, 2] == [4, 4, 2][: num_batches(10, 4)]
    assert sorted(sum(a, [])) == list(range(10))
    assert sum(run(shuffle=False), []) == list(range(10))
    assert [len(b) for b in run(shuffle=True, drop_last=True)] == [4, 4] and num_batches(
        10, 4, drop_last=True) == 2
    batch = next(iterate_batches(images, 4, shuffle=True))
    assert isinstance(batch, torch.Tensor) and batch.dtype == torch.uint8


@pytest.mark.parametrize("drop_last", [False, True])
def test_iterate_batches_ddp(drop_last):
    images = np.arange(11, dtype=np.uint8).reshape(11, 1, 1, 1)
    shards = [[b.flatten().tolist() for b in iterate_batches(
        images, 2, shuffle=True, seed=1, epoch=2, rank=r, world_size=2, drop_last=drop_last)]
        for r in range(2)]
    nb = num_batches(11, 2, world_size=2, drop_last=drop_last)
    assert len(shards[0]) == len(shards[1]) == nb == (2 if drop_last else 3)
    flat = [sum(s, []) for s in shards]
    if drop_last:
        assert len(flat[0]) == len(flat[1]) == 4 and not set(flat[0]) & set(flat[1])
    else:  # 11 images -> 12 slots: exactly one image is repeated by the wrap-around padding
        assert len(flat[0]) == len(flat[1]) == 6 and set(flat[0]) | set(flat[1]) == set(range(11))
        assert len(set(flat[0]) & set(flat[1])) <= 1


# ----------------------------------------------------------------------------- cache

def test_cache_hit_and_invalidation(tmp_path, monkeypatch):
    _make_folder(tmp_path / "f")
    first = load_dataset("folder", str(tmp_path / "f"))
    assert list((tmp_path / "cache" / "arrays").glob("folder-*.npz"))

    def boom(*a, **k):
        raise AssertionError("decoder called despite a warm cache")
    real = data._decode_folder
    monkeypatch.setattr(data, "_decode_folder", boom)
    hit = load_dataset("folder", str(tmp_path / "f"))
    assert np.array_equal(hit.train.images, first.train.images) and hit.train.classes == ["a", "b"]
    assert np.array_equal(hit.test.labels, first.test.labels)
    os.utime(tmp_path / "f" / "train" / "a" / "x.png", (1e9, 2e9))  # touched source
    with pytest.raises(AssertionError, match="despite"):
        load_dataset("folder", str(tmp_path / "f"))
    monkeypatch.setattr(data, "_decode_folder", real)
    load_dataset("folder", str(tmp_path / "f"), image_size=4)  # image_size is part of the key
    assert len(list((tmp_path / "cache" / "arrays").glob("folder-*.npz"))) == 2

    d = _write_cifar_dir(tmp_path / "c")
    load_dataset("cifar10", str(d))
    monkeypatch.setattr(data, "_decode_cifar_dir", boom)
    _check_cifar(load_dataset("cifar10", str(d)))


def test_unwritable_cache_warns(tmp_path):
    (tmp_path / "file").write_text("x")
    _make_folder(tmp_path / "f")
    with pytest.warns(UserWarning, match="not writable"):
        s = load_dataset("folder", str(tmp_path / "f"), cache_dir=str(tmp_path / "file" / "c"))
    assert s.train.images.shape == (5, 3, 8, 8)


class _Served:
    """A local HTTP server (a thread) that serves one file and counts the requests for it."""

    def __init__(self, path):
        import http.server
        import threading

        served, self.requests = self, 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                served.requests += 1
                raw = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))  # drives the progress bar
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *a):  # keep pytest's output clean
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/{path.name}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_train_download_over_http_once_then_from_cache_or_data_dir(tmp_path, monkeypatch):
    # The README's first command on a fresh machine: `resvae train ... --download` fetches the
    # archive over HTTP once (md5-checked) into the cache; a second run, or one with a local copy
    # through RESVAE_DATA_DIR, never contacts the server. The checksum is injected here: the
    # served archive is a small fake in the real format.
    from resvae.cli import main

    archive = tmp_path / "served" / "cifar-10-python.tar.gz"
    monkeypatch.setattr(data, "CIFAR10_MD5", _write_cifar_archive(archive))
    server = _Served(archive)
    monkeypatch.setattr(data, "CIFAR10_URL", server.url)
    run = ["train", "--preset", "tiny", "--dataset", "cifar10", "--max-epochs", "1",
           "--sample-every", "0", "--device", "cpu", "--subset", "0"]
    try:
        assert main([*run, "--download", "--out", str(tmp_path / "r1")]) == 0
        assert server.requests == 1
        assert (tmp_path / "cache" / "cifar-10-python.tar.gz").is_file()
        assert main([*run, "--download", "--out", str(tmp_path / "r2")]) == 0  # the cache's copy
        monkeypatch.setenv("RESVAE_DATA_DIR", str(_write_cifar_dir(tmp_path / "local")))
        assert main([*run, "--download", "--out", str(tmp_path / "r3")]) == 0  # the local copy
        assert server.requests == 1
    finally:
        server.close()
    cfg = json.loads((tmp_path / "r3" / "config.json").read_text())
    assert cfg["data"]["download"] is True


def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    # PIL's convert("RGB") clips an "I;16" image at 255: a 16-bit PNG became all white
    for split in ("train", "test"):
        d = tmp_path / split / "a"
        d.mkdir(parents=True)
        ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024)  # 0 .. 64512
        Image.fromarray(ramp).save(d / "x.png")  # written as a 16-bit grayscale PNG
        assert Image.open(d / "x.png").mode.startswith("I")
    with pytest.warns(UserWarning, match="16-bit grayscale images: scaled"):
        s = load_dataset("folder", str(tmp_path))
    img = s.train.images[0]
    want = np.rint(ramp.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(img[0], want) and np.array_equal(img[1], want)
    assert img.min() == 0 and 250 < img.max() < 255
