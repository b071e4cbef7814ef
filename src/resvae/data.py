"""Datasets for resvae: decode once into uint8 arrays, cache them, and batch them by index.

Every loader returns CPU numpy arrays of shape (N, C, H, W); the training loop only indexes
into them, so there is no per-image PIL work after the first (cached) load.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import io
import json
import os
import pickle
import sys
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from . import distributed as D
from .errors import DataError
from .files import atomic_write

if TYPE_CHECKING:  # config.py imports this module (DATASETS)
    from .config import RunConfig

DATASETS = ("cifar10", "folder", "mnist", "fashion-mnist", "shapes")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # read at call time so tests can monkeypatch it
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SHAPES_CLASSES = ["circle", "square", "triangle"]
SHAPES_SEED = 20240601  # fixed so that everyone gets the same "shapes" dataset
SHAPES_TRAIN, SHAPES_TEST = 10000, 2000
CACHE_VERSION = 1  # bump when the decoded format changes, so stale caches are ignored
CIFAR10_LAYOUTS = (
    "a directory that is or contains cifar-10-batches-py/ (python pickle batches), "
    "cifar-10-python.tar.gz or a directory containing it, or an image folder with "
    "train/<class>/* and test/<class>/*")


@dataclass
class ImageSet:
    images: np.ndarray  # uint8 (N, C, H, W), C in {1, 3}
    labels: np.ndarray | None  # int64 (N,) or None
    classes: list[str]  # may be empty

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet
    name: str
    source: str


_warned_old_cache_var = False


def default_cache_dir() -> Path:
    """Cache directory: $RESVAE_CACHE if set, else ~/.cache/resvae. RESVAE_DATA, its old name,
    still works (RESVAE_CACHE wins when both are set) and says once per process on stderr that
    it is deprecated."""
    global _warned_old_cache_var
    env, old = os.environ.get("RESVAE_CACHE"), os.environ.get("RESVAE_DATA")
    if old and not _warned_old_cache_var:
        _warned_old_cache_var = True
        note = f" (ignored: RESVAE_CACHE={env} is set)" if env else ""
        print(f"resvae: DeprecationWarning: RESVAE_DATA is deprecated, use RESVAE_CACHE{note}",
              file=sys.stderr)
    env = env or old
    return Path(env).expanduser() if env else Path.home() / ".cache" / "resvae"


def _progress(iterable=None, **kw):
    # Progress bars only help a human watching a terminal; keep CI logs clean.
    disable = not sys.stderr.isatty() or bool(os.environ.get("CI"))
    return tqdm(iterable, disable=disable, **kw)


# ----------------------------------------------------------------------------- cache

def _tree_fingerprint(root: Path) -> list[int]:
    """Cheap change detector for an image folder split: [files, total bytes, max mtime_ns] of
    root/* and root/<class>/* (the two levels `list_images` reads; symbolic links are followed there, so a
    link loop deeper down is never walked, and one at those levels is a DataError naming it)."""
    count = total = 0
    newest = root.stat().st_mtime_ns
    for level in (root, *sorted(p for p in root.iterdir() if p.is_dir())):
        with os.scandir(level) as it:
            for entry in it:
                try:
                    st = entry.stat()
                except OSError as e:
                    raise DataError(f"cannot read {entry.path} in the image folder ({e.strerror}; "
                                    "a broken symbolic link or a link loop?): remove it") from None
                newest = max(newest, st.st_mtime_ns)  # dir mtimes catch adds/removes/renames
                if not entry.is_dir():  # (root's own files: a flat folder's images)
                    count += 1
                    total += st.st_size
    return [count, total, newest]


def _file_fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _cached(cache_dir: Path, key_parts: list, decode: Callable[[], tuple[ImageSet, ImageSet]]):
    """Return decode() via an .npz cache under cache_dir/arrays keyed by key_parts."""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, *key_parts]).encode()).hexdigest()[:20]
    path = cache_dir / "arrays" / f"{key_parts[0]}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as z:
                sets = []
                for s in ("train", "test"):
                    labels = z[f"{s}_labels"] if f"{s}_labels" in z else None
                    sets.append(ImageSet(z[f"{s}_images"], labels, [str(c) for c in z["classes"]]))
                return sets[0], sets[1]
        except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile) as e:
            warnings.warn(f"ignoring unreadable dataset cache {path}: {e}", stacklevel=3)
    train, test = decode()
    arrays = {"classes": np.array(train.classes, dtype=str)}
    for s, ims in (("train", train), ("test", test)):
        arrays[f"{s}_images"] = ims.images
        if ims.labels is not None:
            arrays[f"{s}_labels"] = ims.labels

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a path
            np.savez(f, **arrays)

    try:
        atomic_write(path, write)
    except OSError as e:
        warnings.warn(f"dataset cache directory {cache_dir} is not writable ({e}); continuing "
                      "without caching, so the next run decodes again. Point RESVAE_CACHE at a "
                      "writable directory.", stacklevel=3)
    return train, test


# ----------------------------------------------------------------------------- image folders

def _fit(im: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to `size`, then centre-crop to size x size."""
    w, h = im.size
    if (w, h) == (size, size):
        return im
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _flat_images(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def list_images(split_dir: Path, classes: list[str] | None):
    """(files, labels, classes) of split_dir/<class>/*; classes must match when given. A flat
    folder (images in split_dir itself, no class subdirectories) is one unlabelled class."""
    if not split_dir.is_dir():
        raise DataError(f"image folder split {split_dir} not found; expected layout: "
                        "DATA_DIR/train/<class>/*.png|jpg|... and DATA_DIR/test/<class>/*")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found and classes in (None, []) and _flat_images(split_dir):
        files = _flat_images(split_dir)
        return files, [0] * len(files), []
    if not found:
        raise DataError(f"{split_dir} has no class subdirectories and no images; expected "
                        f"{split_dir}/<class>/* or images in {split_dir} itself")
    if classes is not None and found != classes:
        raise DataError(f"class folders in {split_dir} {found} differ from train/'s {classes}")
    files, labels, skipped = [], [], []
    for k, cls in enumerate(found):
        entries = sorted((split_dir / cls).iterdir())
        imgs = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not imgs:
            raise DataError(f"class folder {split_dir / cls} contains no images "
                            f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
        files += imgs
        labels += [k] * len(imgs)
        skipped += [p for p in entries if p not in imgs and not p.name.startswith(".")]
    if skipped:  # README.txt, sub-folders, broken links: said once, never silently
        warnings.warn(f"{split_dir}: ignored {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} "
                      f"that {'is' if len(skipped) == 1 else 'are'} not an image file by "
                      f"extension ({', '.join(IMAGE_EXTENSIONS)}), e.g. {skipped[0]}", stacklevel=2)
    return files, labels, found


def decode_images(files: list[Path], image_size: int, expected: tuple | None, desc: str):
    """Decode files into a uint8 (N, 3, S, S) array; `expected` is (size, first_file) or None."""
    out, converted = None, {}
    for i, path in enumerate(_progress(files, desc=desc, unit="img")):
        try:
            with Image.open(path) as im:
                im.load()  # forces a full decode so truncated files raise here
                if im.mode != "RGB":
                    converted.setdefault(_conversion(im), path)
                im = _to_rgb(im)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot read image {path}: {e}") from e
        if image_size:
            im = _fit(im, image_size)
        if expected is None:
            expected = (im.size, path)
        elif im.size != expected[0]:
            raise DataError(f"image {path} is {im.size[0]}x{im.size[1]} but {expected[1]} is "
                            f"{expected[0][0]}x{expected[0][1]}; all images must share one size, "
                            "or pass --image-size N to resize and centre-crop them")
        if out is None:
            out = np.empty((len(files), 3, im.size[1], im.size[0]), np.uint8)
        out[i] = np.asarray(im).transpose(2, 0, 1)
    if converted:  # resvae trains on RGB; what that did to other modes is said, not hidden
        warnings.warn(f"{desc}: converted to RGB: " + "; ".join(
            f"{what} (e.g. {path})" for what, path in converted.items()), stacklevel=3)
    return out, expected


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB, 8 bits a channel. 16- and 32-bit grayscale ("I;16", "I") is scaled to 0..255 from
    its 16-bit range: PIL's own convert("RGB") clips every value over 255, which turns an
    ordinary 16-bit PNG white."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        a = np.asarray(im, dtype=np.int64)
        top = 65535 if a.max() > 255 or im.mode.startswith("I;16") else 255
        im = Image.fromarray(np.rint(np.clip(a, 0, top) * (255 / top)).astype(np.uint8), "L")
    elif im.mode == "F":
        raise DataError("32-bit float images have no fixed range to map to 0..255; save them "
                        "as 8- or 16-bit")
    return im.convert("RGB")


def _conversion(im: Image.Image) -> str:
    """What converting `im` to RGB does, in words (the transparent case loses information)."""
    has_alpha = im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info
    if has_alpha and im.convert("RGBA").getextrema()[3][0] < 255:
        return "images with transparent pixels: alpha dropped, the colour under it kept"
    if im.mode.startswith("I"):
        return ("16-bit grayscale images: scaled from 0..65535 to 0..255, the gray value "
                "repeated in R, G and B")
    if im.mode in ("L", "1", "F", "LA"):
        return "grayscale images: the gray value repeated in R, G and B"
    return f"{im.mode} images"


def _decode_folder(train_dir: Path, test_dir: Path | None,
                   image_size: int) -> tuple[ImageSet, ImageSet]:
    """The splits of an image folder; without test_dir the test set is empty (0 images)."""
    tr_files, tr_labels, classes = list_images(train_dir, None)
    tr, expected = decode_images(tr_files, image_size, None, f"decode {train_dir}")
    if test_dir is None:
        return (ImageSet(tr, np.array(tr_labels, np.int64), classes),
                ImageSet(tr[:0], np.zeros(0, np.int64), classes))
    te_files, te_labels, _ = list_images(test_dir, classes)
    te, _ = decode_images(te_files, image_size, expected, f"decode {test_dir}")
    return (ImageSet(tr, np.array(tr_labels, np.int64), classes),
            ImageSet(te, np.array(te_labels, np.int64), classes))


def _load_folder(root: Path, image_size: int, cache_dir: Path,
                 val_fraction: float) -> tuple[ImageSet, ImageSet, str]:
    """root/train/ and root/test/ (each <class>/* or flat); root/train/ alone, or root itself
    (a flat folder or <class>/*), when --val-fraction holds out the images that validate and
    test. A missing test split comes back empty."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        raise DataError(f"data directory {root} does not exist; expected an image folder "
                        f"{root}/train/<class>/* and {root}/test/<class>/*")
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = root / "test" if (root / "test").is_dir() else None
    if test_dir is None and not val_fraction:
        raise DataError(f"{root} has no test/ split: pass --val-fraction F (e.g. 0.1) to hold "
                        "out that fraction of its images to validate and test on, or add "
                        f"{root}/test/<class>/* (then {root}/train/<class>/* for training)")
    # "16-bit scaled": folders cached before 16-bit images were scaled (not clipped) decode again
    key = ["folder", str(root), _tree_fingerprint(train_dir),
           _tree_fingerprint(test_dir) if test_dir else None, image_size, "16-bit scaled"]
    train, test = _cached(cache_dir, key, lambda: _decode_folder(train_dir, test_dir, image_size))
    return train, test, f"image folder {root}"


# ----------------------------------------------------------------------------- CIFAR-10

class _NumpyUnpickler(pickle.Unpickler):
    # CIFAR batches are pickles; allowing only the numpy pieces they contain means a tampered
    # file cannot execute arbitrary code while loading.
    def find_class(self, module, name):
        if (module.split(".")[0] == "numpy"
                and name in ("_reconstruct", "ndarray", "dtype", "scalar", "_frombuffer")) \
                or (module, name) == ("_codecs", "encode"):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _unpickle(raw: bytes, where: str) -> dict:
    try:
        d = _NumpyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as e:  # pickle can raise almost anything on garbage input
        raise DataError(f"{where} is not a valid CIFAR-10 pickle batch: {e}") from e
    if not isinstance(d, dict):
        raise DataError(f"{where} should hold a dict, got {type(d).__name__}")
    # Python 2 pickles give str keys (latin1); Python 3 ones may give bytes keys.
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def _read_cifar(read: Callable[[str], bytes], where: Callable[[str], str]):
    """Decode the 7 CIFAR-10 files; `read(name)` returns bytes, `where(name)` names it."""
    meta = _unpickle(read("batches.meta"), where("batches.meta"))
    names = meta.get("label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{where('batches.meta')} has no 'label_names' list")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    sets = []
    for group in (CIFAR10_BATCHES, ("test_batch",)):
        xs, ys = [], []
        for name in group:
            d = _unpickle(read(name), where(name))
            x, y = d.get("data"), d.get("labels")
            if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2
                    and x.shape[1] == 3072):
                desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
                raise DataError(f"{where(name)}: 'data' should be a uint8 (N, 3072) array, "
                                f"got {desc}")
            y = np.asarray(y if y is not None else [], dtype=np.int64)
            if y.shape != (len(x),) or (y.size and (y.min() < 0 or y.max() >= len(classes))):
                raise DataError(f"{where(name)}: 'labels' should be {len(x)} ints in "
                                f"[0, {len(classes)}), got shape {y.shape}")
            xs.append(x.reshape(-1, 3, 32, 32))  # rows are channel-planar R, G, B, row-major
            ys.append(y)
        sets.append(ImageSet(np.concatenate(xs), np.concatenate(ys), classes))
    return sets[0], sets[1]


def _decode_cifar_dir(batch_dir: Path):
    def read(name: str) -> bytes:
        path = batch_dir / name
        if not path.is_file():
            raise DataError(f"CIFAR-10 file {path} is missing")
        return path.read_bytes()
    return _read_cifar(read, lambda name: str(batch_dir / name))


def _decode_cifar_archive(archive: Path):
    # Read members straight out of the archive: nothing is extracted next to the data, and
    # the decoded arrays are what gets cached.
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()
                       if m.isfile() and Path(m.name).parent.name == CIFAR10_DIR}

            def read(name: str) -> bytes:
                if name not in members:
                    raise DataError(f"{archive} has no member {CIFAR10_DIR}/{name}")
                return tar.extractfile(members[name]).read()
            return _read_cifar(read, lambda name: f"{archive}:{CIFAR10_DIR}/{name}")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise DataError(f"cannot read CIFAR-10 archive {archive}: {e}") from e


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_md5(path: Path) -> None:
    expected, actual = CIFAR10_MD5, _md5(path)
    if actual != expected:
        raise DataError(f"{path} has md5 {actual}, expected {expected}; the file is corrupt or "
                        "not the official CIFAR-10 python archive (delete it and retry)")


def _download(url: str, dest: Path) -> None:
    """Download url to dest atomically (temp file + rename), verifying its md5 before the rename."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write the CIFAR-10 download to {dest.parent}: {e}") from e

    def fetch(tmp: Path) -> None:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=30) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            with _progress(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
                for chunk in iter(lambda: r.read(1 << 20), b""):
                    f.write(chunk)
                    bar.update(len(chunk))
        got = _md5(tmp)
        if got != CIFAR10_MD5:
            raise DataError(f"download from {url} has md5 {got}, expected {CIFAR10_MD5}; "
                            "the server sent something other than the CIFAR-10 python archive")

    try:
        atomic_write(dest, fetch)
    except DataError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        raise DataError(f"could not download CIFAR-10 from {url} ({e}): this machine looks "
                        "offline or the host is unreachable. Point at local data instead with "
                        f"--data-dir PATH or RESVAE_DATA_DIR=PATH; accepted: {CIFAR10_LAYOUTS}"
                        ) from e


def _find_cifar(path: Path) -> tuple[str, Path] | None:
    """Auto-detect a CIFAR-10 layout at path: ('pickle'|'archive'|'folder', location)."""
    if path.is_file():
        return "archive", path
    if not path.is_dir():
        return None
    if (path / "data_batch_1").is_file() or path.name == CIFAR10_DIR:
        return "pickle", path
    if (path / CIFAR10_DIR).is_dir():
        return "pickle", path / CIFAR10_DIR
    if (path / CIFAR10_ARCHIVE).is_file():
        return "archive", path / CIFAR10_ARCHIVE
    if (path / "train").is_dir() and (path / "test").is_dir():
        return "folder", path
    return None


def _load_cifar10(data_dir: str | None, image_size: int, download: bool, url: str | None,
                  cache_dir: Path, offer_download: bool = True):
    # offer_download: hints name --download only where the command has it (train, sweep)
    fetch = (" (or pass --download)" if offer_download else
             "; this command never downloads: point --data-dir PATH or RESVAE_DATA_DIR at a copy")
    found = _find_cifar(Path(data_dir).expanduser()) if data_dir else None
    if found is None and data_dir and not download:
        raise DataError(f"no CIFAR-10 data found at {data_dir}; expected {CIFAR10_LAYOUTS}"
                        f"{fetch}")
    if found is None and not download:
        found = _find_cifar(cache_dir)  # a previous download lives in the cache dir
    if found is None and not download:  # only --download may touch the network
        raise DataError(f"no local CIFAR-10 copy: --data-dir (or RESVAE_DATA_DIR) is not set "
                        f"and the cache {cache_dir} holds none; point --data-dir PATH at one "
                        f"({CIFAR10_LAYOUTS})" + (" or pass --download to fetch it (163 MB) into "
                                                  "the cache" if offer_download else ""))
    if found is None:
        archive = cache_dir / CIFAR10_ARCHIVE
        if not (archive.is_file() and _md5(archive) == CIFAR10_MD5):
            _download(url or CIFAR10_URL, archive)
        found = ("archive", archive)
    kind, path = found
    path = path.resolve()
    if kind == "folder":
        train, test, source = _load_folder(path, image_size, cache_dir, 0.0)
        return train, test, f"CIFAR-10 {source}"
    if kind == "pickle":
        key = ["cifar10-pickle", str(path),
               [_file_fingerprint(p) for p in sorted(path.iterdir()) if p.is_file()], image_size]
        decode, source = (lambda: _decode_cifar_dir(path)), f"CIFAR-10 python batches in {path}"
    else:
        # The md5 is checked on a cache miss; a hit is keyed by the archive's size + mtime
        # and the expected md5, so it can only come from an archive that passed the check.
        key = ["cifar10-archive", str(path), _file_fingerprint(path), CIFAR10_MD5, image_size]

        def decode():
            _check_md5(path)
            return _decode_cifar_archive(path)
        source = f"CIFAR-10 archive {path}"
    train, test = _cached(cache_dir, key, lambda: _resize_sets(decode(), image_size))
    return train, test, source


# ----------------------------------------------------------------------------- MNIST (IDX)

def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from e
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DataError(f"IDX file {path} is too short ({len(raw)} bytes) for its header")
    head = np.frombuffer(raw[:header], ">i4")
    if head[0] != magic:
        raise DataError(f"IDX file {path} has magic {head[0]}, expected {magic}")
    shape = tuple(int(d) for d in head[1:])
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"IDX file {path} holds {len(raw) - header} bytes of data, but its header "
                        f"says {shape} = {int(np.prod(shape))}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find_idx(data_dir: Path, name: str) -> dict[str, Path]:
    # Also accept torchvision's layout (<dir>/MNIST/raw, <dir>/FashionMNIST/raw).
    sub = "MNIST" if name == "mnist" else "FashionMNIST"
    for d in (data_dir, data_dir / "raw", data_dir / sub / "raw"):
        paths = {}
        for f in MNIST_FILES:
            hits = [d / f, d / f"{f}.gz"]
            paths[f] = next((p for p in hits if p.is_file()), None)
        if all(paths.values()):
            return paths
    raise DataError(f"{name} IDX files not found in {data_dir}; expected "
                    f"{', '.join(MNIST_FILES)} (each optionally .gz). {name} is not downloaded "
                    "automatically: point --data-dir PATH or RESVAE_DATA_DIR at them")


def _decode_mnist(paths: dict[str, Path], classes: list[str], pad_to_32: bool):
    sets = []
    for prefix in ("train", "t10k"):
        x = _read_idx(paths[f"{prefix}-images-idx3-ubyte"], 2051, 3)
        ypath = paths[f"{prefix}-labels-idx1-ubyte"]
        y = _read_idx(ypath, 2049, 1).astype(np.int64)
        if len(y) != len(x) or (y.size and y.max() >= len(classes)):
            raise DataError(f"IDX labels {ypath} has {len(y)} labels (max {y.max(initial=0)}) for "
                            f"{len(x)} images and {len(classes)} classes")
        x = x[:, None]
        if pad_to_32 and max(x.shape[2:]) < 32:
            ph, pw = 32 - x.shape[2], 32 - x.shape[3]
            x = np.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        sets.append(ImageSet(np.ascontiguousarray(x), y, list(classes)))
    return sets[0], sets[1]


def _load_mnist(name: str, data_dir: str | None, image_size: int, pad_to_32: bool,
                cache_dir: Path):
    if not data_dir:
        raise DataError(f"{name} needs --data-dir PATH (or RESVAE_DATA_DIR) pointing at its IDX "
                        f"files {', '.join(MNIST_FILES)} (optionally .gz)")
    paths = _find_idx(Path(data_dir).expanduser().resolve(), name)
    classes = MNIST_CLASSES if name == "mnist" else FASHION_CLASSES
    key = [name, {k: [str(p), *_file_fingerprint(p)] for k, p in paths.items()},
           image_size, pad_to_32]
    train, test = _cached(cache_dir, key, lambda: _resize_sets(
        _decode_mnist(paths, classes, pad_to_32), image_size))
    return train, test, f"{name} IDX files in {paths[MNIST_FILES[0]].parent}"


# ----------------------------------------------------------------------------- shapes

def _make_shapes(n: int, rng: np.random.Generator) -> ImageSet:
    """n 32x32 RGB images of one filled circle/square/triangle on a plain background."""
    labels = rng.permutation(np.arange(n) % 3).astype(np.int64)  # balanced classes
    bg = rng.integers(0, 256, (n, 3))
    fg = (bg + rng.integers(64, 193, (n, 3))) % 256  # every channel differs by >= 64: visible
    s = rng.uniform(5, 12, (n, 1, 1)).astype(np.float32)  # half-size in pixels
    # Centres keep the whole shape inside the 32x32 canvas.
    cx, cy = rng.uniform(0, 1, (2, n, 1, 1)).astype(np.float32) * (31 - 2 * s) + s
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32) + 0.5  # float32 keeps 10k images ~40 MB/array
    dx, dy = xx - cx, yy - cy  # (n, 32, 32) offsets from the centre
    circle = dx**2 + dy**2 <= s**2
    square = (np.abs(dx) <= 0.85 * s) & (np.abs(dy) <= 0.85 * s)
    # Upward triangle: apex at (cx, cy - s), base at y = cy + 0.8 s with half-width s.
    triangle = (dy <= 0.8 * s) & (1.8 * np.abs(dx) <= dy + s)
    mask = np.where(labels[:, None, None] == 0, circle,
                    np.where(labels[:, None, None] == 1, square, triangle))
    images = np.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None])
    return ImageSet(images.astype(np.uint8), labels, list(SHAPES_CLASSES))


# ----------------------------------------------------------------------------- helpers

def _resize_sets(sets: tuple[ImageSet, ImageSet], size: int) -> tuple[ImageSet, ImageSet]:
    """Resize already-decoded square arrays to size x size (once, before caching)."""
    out = []
    for s in sets:
        if not size or s.images.shape[2:] == (size, size):
            out.append(s)
            continue
        gray = s.images.shape[1] == 1
        arr = np.stack([np.asarray(_fit(Image.fromarray(im[0] if gray else im.transpose(1, 2, 0)),
                                        size)) for im in s.images])
        arr = arr[:, None] if gray else arr.transpose(0, 3, 1, 2)
        out.append(ImageSet(np.ascontiguousarray(arr), s.labels, s.classes))
    return out[0], out[1]


def _take(s: ImageSet, idx: np.ndarray) -> ImageSet:
    return ImageSet(s.images[idx], None if s.labels is None else s.labels[idx], s.classes)


def _subset_indices(labels: np.ndarray | None, n_total: int, n: int) -> np.ndarray:
    """First n indices, round-robin over classes in original order (balanced by class)."""
    if n >= n_total:
        return np.arange(n_total)
    if labels is None:
        return np.arange(n)
    rank = np.empty(n_total, np.int64)  # position of each image within its own class
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    order = np.lexsort((labels, rank))  # round 0 of every class, then round 1, ...
    return np.sort(order[:n])


def load_dataset(name: str, data_dir: str | None = None, *, image_size: int = 0, subset: int = 0,
                 val_fraction: float = 0.0, download: bool = False, cache_dir: str | None = None,
                 pad_to_32: bool = True, seed: int = 0, url: str | None = None,
                 offer_download: bool = True) -> Splits:
    """Load dataset `name` (one of DATASETS) as uint8 train/val/test splits.

    data_dir defaults to $RESVAE_DATA_DIR. val is the test split unless 0 < val_fraction < 1,
    which holds out that fraction of train (permutation from `seed`). subset=N keeps N
    class-balanced training images (before the val split). Decoded arrays are cached in
    cache_dir (default: default_cache_dir()).
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size < 0:
        raise DataError(f"--image-size must be >= 0 (0 keeps the native size), got {image_size}")
    if subset < 0:
        raise DataError(f"--subset must be >= 0 (0 uses all images), got {subset}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    data_dir = data_dir or os.environ.get("RESVAE_DATA_DIR") or None
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if name == "shapes":
        train = _make_shapes(SHAPES_TRAIN, np.random.default_rng([SHAPES_SEED, 0]))
        test = _make_shapes(SHAPES_TEST, np.random.default_rng([SHAPES_SEED, 1]))
        train, test = _resize_sets((train, test), image_size)
        source = f"procedurally generated shapes (seed {SHAPES_SEED})"
    elif name == "folder":
        if not data_dir:
            raise DataError("dataset 'folder' needs --data-dir PATH (or RESVAE_DATA_DIR) with "
                            "PATH/train/<class>/* and PATH/test/<class>/*")
        train, test, source = _load_folder(Path(data_dir), image_size, cache, val_fraction)
    elif name == "cifar10":
        train, test, source = _load_cifar10(data_dir, image_size, download, url, cache,
                                            offer_download)
    else:
        train, test, source = _load_mnist(name, data_dir, image_size, pad_to_32, cache)
    if subset > len(train.images):  # not "all of them": a run of N images was asked for
        raise DataError(f"--subset {subset} is larger than the {len(train.images)} training "
                        f"images of {source}; use --subset 0 for all of them")
    if subset:
        train = _take(train, _subset_indices(train.labels, len(train.images), subset))
    val = test  # the original study validated on the test split
    if val_fraction > 0:
        n = len(train.images)
        if n < 2:
            raise DataError(f"--val-fraction needs at least 2 training images, have {n}")
        perm = np.random.default_rng(seed).permutation(n)
        n_val = min(max(round(n * val_fraction), 1), n - 1)
        val, train = _take(train, np.sort(perm[:n_val])), _take(train, np.sort(perm[n_val:]))
    if len(test) == 0:  # a folder without test/: the held-out images test too
        test, source = val, f"{source} (no test/: the --val-fraction images validate and test)"
    return Splits(train=train, val=val, test=test, name=name, source=source)


def load_splits(cfg: RunConfig, *, download: bool = False, rt: D.Runtime | None = None,
                offer_download: bool = True) -> Splits:
    """The train/val/test splits `cfg.data` describes: what a run trains, validates and tests on.
    With `rt` (a run's processes), rank 0 decodes and fills the cache first, the others then read
    it. `offer_download=False`: error hints do not name --download (commands without it)."""
    if rt is not None:
        data = load_splits(cfg, download=download) if rt.is_main else None
        D.barrier(rt)
        return data or load_splits(cfg, download=download)
    dc = cfg.data
    return load_dataset(dc.dataset, dc.data_dir or None, image_size=dc.image_size,
                        subset=dc.subset, val_fraction=dc.val_fraction, download=download,
                        pad_to_32=dc.pad_to_32, seed=cfg.train.seed,
                        offer_download=offer_download)


def run_splits(cfg: RunConfig, data_dir: str | None = None) -> Splits:
    """A saved run's splits (eval, reconstruct, interpolate): from `data_dir` (--data-dir), else
    $RESVAE_DATA_DIR, else the folder stored in its config.json; never downloaded."""
    where = data_dir or os.environ.get("RESVAE_DATA_DIR")
    if where:
        where = os.path.abspath(os.path.expanduser(where))
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=where))
    return load_splits(cfg, offer_download=False)


# ----------------------------------------------------------------------------- your own data

def _as_uint8_images(a, what: str) -> np.ndarray:
    """uint8 (N, C, H, W) from an array or tensor of images: uint8 (or integers) in 0..255, or
    floats in [0, 1]; laid out (N, C, H, W), (N, H, W, C) or (N, H, W), C in {1, 3}."""
    x = a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or len(x) == 0:
        raise DataError(f"{what}: expected a non-empty batch of images (N, C, H, W), (N, H, W, C) "
                        f"or (N, H, W), got shape {x.shape}")
    if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)  # channels last -> first
    if x.shape[1] not in (1, 3):
        raise DataError(f"{what}: images need 1 or 3 channels (first or last), got shape "
                        f"{x.shape}")
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(np.nanmin(x)), float(np.nanmax(x))
        if not (0.0 <= lo and hi <= 1.0):  # NaN fails too
            raise DataError(f"{what}: float images must lie in [0, 1], got values in "
                            f"[{lo:g}, {hi:g}] (pass uint8 for 0..255)")
        x = np.rint(x * 255.0)
    elif x.dtype != np.uint8 and (x.min() < 0 or x.max() > 255):
        raise DataError(f"{what}: integer images must lie in 0..255, got {x.min()}..{x.max()}")
    return np.ascontiguousarray(x.astype(np.uint8))


def from_arrays(train, test, *, val=None, name: str = "arrays") -> Splits:
    """Splits for `train(cfg, out, data=...)` from images you hold in memory: numpy arrays or
    torch tensors, uint8 in 0..255 or floats in [0, 1], shaped (N, C, H, W), (N, H, W, C) or
    (N, H, W). They are converted once to uint8 (N, C, H, W), the form every resvae loader gives.
    `test` also validates (early stopping, best weights) unless `val` is given, as in the study.
    """
    sets = {k: ImageSet(_as_uint8_images(v, f"from_arrays: {k}"), None, [])
            for k, v in (("train", train), ("test", test), ("val", val)) if v is not None}
    shapes = {k: s.images.shape[1:] for k, s in sets.items()}
    if len(set(shapes.values())) != 1:
        raise DataError(f"from_arrays: the splits' images differ in shape: {shapes}")
    return Splits(train=sets["train"], val=sets.get("val", sets["test"]), test=sets["test"],
                  name=name, source=f"{name} in memory: " + ", ".join(
                      f"{k} {len(s)}" for k, s in sets.items()))


def _dataset_images(ds, what: str):
    """Every item of a map-style torch Dataset (or any sequence): an image, or a tuple whose first
    element is the image (the label is not used). An image is a tensor, an array or a PIL image."""
    images = []
    for i in range(len(ds)):
        item = ds[i]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB" if image.mode not in ("L", "RGB") else
                                             image.mode))
        images.append(image.detach().cpu().numpy() if isinstance(image, torch.Tensor)
                      else np.asarray(image))
    if not images:
        raise DataError(f"{what}: the data set is empty")
    shapes = {x.shape for x in images}
    if len(shapes) != 1:
        raise DataError(f"{what}: images of different shapes {sorted(shapes)[:3]}; resize them "
                        "to one size first")
    return np.stack(images)


def from_dataset(train, test, *, val=None, name: str = "dataset") -> Splits:
    """`from_arrays` for torch Datasets (map-style: `len` and indexing): each item an image
    tensor (C, H, W) in [0, 1] or uint8, a (H, W, C) array, a PIL image, or an (image, label)
    pair. Read once, here, into uint8 arrays; training then never calls the Dataset again."""
    return from_arrays(*(None if ds is None else _dataset_images(ds, f"from_dataset: {k}")
                         for k, ds in (("train", train), ("test", test))),
                       val=None if val is None else _dataset_images(val, "from_dataset: val"),
                       name=name)


# ----------------------------------------------------------------------------- batching

def _per_rank(n: int, world_size: int, drop_last: bool) -> int:
    return n // world_size if drop_last else -(-n // world_size)


def num_batches(n: int, batch_size: int, *, world_size: int = 1, drop_last: bool = False) -> int:
    """Per-rank number of batches that iterate_batches yields for n images."""
    per_rank = _per_rank(n, world_size, drop_last)
    return per_rank // batch_size if drop_last else -(-per_rank // batch_size)


def iterate_batches(images: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                    epoch: int = 0, rank: int = 0, world_size: int = 1,
                    drop_last: bool = False, start: int = 0) -> Iterator[torch.Tensor]:
    """Yield uint8 tensors (B, C, H, W) of this rank's shard, in an order fixed by (seed, epoch).

    Like torch's DistributedSampler, every rank gets the same number of batches: the tail is
    padded by wrapping around (or dropped with drop_last). batch_size is per rank. `start`
    skips that many batches (a run resumed inside an epoch continues its order there).
    """
    if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"need batch_size >= 1 and 0 <= rank < world_size; got batch_size="
                        f"{batch_size}, rank={rank}, world_size={world_size}")
    n = len(images)
    # Depends only on (seed, epoch), so a resumed run reproduces the exact data order.
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    total = _per_rank(n, world_size, drop_last) * world_size
    order = np.resize(order, total) if n else order[:0]  # np.resize repeats cyclically
    mine = order[rank:total:world_size]
    for i in range(start, num_batches(n, batch_size, world_size=world_size, drop_last=drop_last)):
        yield torch.from_numpy(images[mine[i * batch_size:(i + 1) * batch_size]])


def to_input(batch: torch.Tensor, device: torch.device | str = "cpu",
             channels_last: bool = False) -> torch.Tensor:
    """uint8 (B,C,H,W) -> float in [0,1] on the device (each likelihood dequantizes on its own)."""
    x = batch.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
