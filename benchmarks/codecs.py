"""Lossless image codecs on an image folder, in bits/dim: the number a likelihood model must beat.

    python benchmarks/codecs.py DATA_DIR [--split test] [--n 0] [--workers 2] [--json]

Reads DATA_DIR/<split>/<class>/* with resvae's own folder decoding (Pillow, RGB uint8: the
pixels resvae trains on), then encodes each image on its own with every lossless codec Pillow
offers here, headers included, as a file of that image would be. bits/dim = 8 * total bytes /
(N * H * W * 3). Every encoding is decoded again and must give back the exact pixels. images/s
are per process (N over the seconds spent in that codec's encoder or decoder), so they do not
depend on --workers; the machines here are shared, so they are indicative only.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from resvae.data import decode_images, list_images

# name: (Pillow format, save options, what it is). Options chosen for the smallest lossless
# output each codec offers through Pillow; AVIF is left out: Pillow encodes it through YUV,
# which does not give back the exact RGB pixels even at quality 100.
CODECS: dict[str, tuple[str, dict, str]] = {
    "png": ("PNG", {"optimize": True}, "PNG, optimize=True"),
    "webp": ("WEBP", {"lossless": True, "method": 6, "quality": 100},
             "WebP lossless, method=6, quality=100"),
    "jpeg2000": ("JPEG2000", {"irreversible": False}, "JPEG 2000, reversible 5/3 wavelet"),
    "qoi": ("QOI", {}, "QOI"),
    # TIFF tag 317 = 2: horizontal differencing before the compressor (as PNG's Sub filter)
    "tiff-deflate": ("TIFF", {"compression": "tiff_adobe_deflate", "tiffinfo": {317: 2}},
                     "TIFF, Deflate + horizontal predictor"),
    "tiff-lzw": ("TIFF", {"compression": "tiff_lzw", "tiffinfo": {317: 2}},
                 "TIFF, LZW + horizontal predictor"),
    "tga-rle": ("TGA", {"compression": "tga_rle"}, "TGA, run-length"),
    "bmp": ("BMP", {}, "BMP, uncompressed (8 bits/dim + header)"),
}


def load_images(data_dir: str | Path, split: str = "test", n: int = 0) -> np.ndarray:
    """uint8 (N, H, W, 3) from DATA_DIR/<split>/<class>/*, decoded as resvae decodes them.
    n > 0 takes n images spread evenly over the sorted list (so over every class)."""
    files, _, _ = list_images(Path(data_dir) / split, None)
    if 0 < n < len(files):
        files = [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]
    images, _ = decode_images(files, 0, None, f"decode {split}")
    return images.transpose(0, 2, 3, 1)  # (N, 3, H, W) -> (N, H, W, 3) for Pillow


def available(names=CODECS) -> tuple[list[str], dict[str, str]]:
    """The codecs this Pillow can encode, and why each of the others cannot."""
    ok, missing = [], {}
    probe = Image.new("RGB", (8, 8))
    for name in names:
        fmt, options, _ = CODECS[name]
        try:
            probe.save(io.BytesIO(), fmt, **options)
            ok.append(name)
        except (OSError, KeyError, ValueError) as e:  # no encoder / no such option in this build
            missing[name] = f"{type(e).__name__}: {e}"
    return ok, missing


def _encode_chunk(args: tuple[np.ndarray, list[str]]) -> dict[str, list[float]]:
    """[bytes, encode seconds, decode seconds] per codec over a chunk of images."""
    images, names = args
    out = {name: [0, 0.0, 0.0] for name in names}
    for i, pixels in enumerate(images):
        im = Image.fromarray(pixels, "RGB")
        for name in names:
            fmt, options, _ = CODECS[name]
            buf = io.BytesIO()
            t0 = time.perf_counter()
            im.save(buf, fmt, **options)
            t1 = time.perf_counter()
            with Image.open(io.BytesIO(buf.getvalue())) as back:
                back = back.convert("RGB")
            t2 = time.perf_counter()
            if not np.array_equal(np.asarray(back), pixels):
                raise RuntimeError(f"{name} did not give back the exact pixels of image {i} "
                                   "of its chunk: not lossless with these options")
            acc = out[name]
            acc[0] += buf.tell()
            acc[1] += t1 - t0
            acc[2] += t2 - t1
    return out


def measure(images: np.ndarray, names=None, workers: int = 2, chunk: int = 100) -> list[dict]:
    """Encode each image of uint8 (N, H, W, 3) on its own with each codec; one dict per codec,
    smallest first: codec, settings, bytes, bits_per_dim, encode/decode images/s (per process)."""
    names = list(names or available()[0])
    chunks = [(images[i:i + chunk], names) for i in range(0, len(images), chunk)]
    if workers > 1:
        with multiprocessing.Pool(workers) as pool:
            parts = list(pool.imap_unordered(_encode_chunk, chunks))
    else:
        parts = [_encode_chunk(c) for c in chunks]
    dims = images[0].size * len(images)
    rows = []
    for name in names:
        nbytes, enc, dec = (sum(p[name][j] for p in parts) for j in range(3))
        rows.append({"codec": name, "settings": CODECS[name][2], "bytes": int(nbytes),
                     "bits_per_dim": 8 * nbytes / dims,
                     "encode_images_per_s": len(images) / enc if enc else float("inf"),
                     "decode_images_per_s": len(images) / dec if dec else float("inf")})
    return sorted(rows, key=lambda r: r["bits_per_dim"])


def markdown(rows: list[dict]) -> str:
    lines = ["| codec | settings | bytes | bits/dim | encode images/s | decode images/s |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['codec']} | {r['settings']} | {r['bytes']:,} | {r['bits_per_dim']:.3f} | "
              f"{r['encode_images_per_s']:,.0f} | {r['decode_images_per_s']:,.0f} |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", help="image folder: DATA_DIR/<split>/<class>/*")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=0, help="images, spread over the split (0: all)")
    ap.add_argument("--workers", type=int, default=2, help="processes (Pool) encoding chunks")
    ap.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    images = load_images(args.data_dir, args.split, args.n)
    t1 = time.perf_counter()
    names, missing = available()
    rows = measure(images, names, workers=args.workers)
    t2 = time.perf_counter()
    n, h, w, c = images.shape
    info = {"data_dir": str(args.data_dir), "split": args.split, "images": n,
            "image_shape": [c, h, w], "pillow": PIL.__version__, "workers": args.workers,
            "decode_seconds": round(t1 - t0, 1), "codec_seconds": round(t2 - t1, 1),
            "unavailable": missing}
    if args.json:
        print(json.dumps({**info, "codecs": rows}, indent=2))
        return
    print(f"{n} images {c}x{h}x{w} from {args.data_dir}/{args.split}, each encoded on its own "
          f"(headers included); Pillow {PIL.__version__}, {args.workers} process(es), "
          f"{t2 - t1:.0f} s; images/s per process\n")
    print(markdown(rows))
    for name, why in missing.items():
        print(f"\n{name}: not available in this Pillow ({why})", file=sys.stderr)


if __name__ == "__main__":
    main()
