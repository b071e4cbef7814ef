"""benchmarks/codecs.py on a few generated images: resvae's decoding, exact bytes, bits/dim."""

import json

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def bench():
    import conftest

    # "codecs" would shadow the standard library's
    return conftest.benchmark_script("codecs", "bench_codecs")


@pytest.fixture
def folder(tmp_path):
    """tmp/test/{flat,noise}/*.png: 2 constant images and 2 of uniform noise, 32x32 RGB."""
    rng = np.random.default_rng(0)
    images = {"flat": [np.full((32, 32, 3), v, np.uint8) for v in ((10, 200, 30), (255, 0, 7))],
              "noise": [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]}
    for cls, ims in images.items():
        (tmp_path / "test" / cls).mkdir(parents=True)
        for i, a in enumerate(ims):
            Image.fromarray(a).save(tmp_path / "test" / cls / f"{i}.png")
    return tmp_path, np.stack(images["flat"] + images["noise"])


def test_codecs_measure_bits_per_dim(bench, folder):
    root, pixels = folder
    images = bench.load_images(root, "test")
    assert images.shape == (4, 32, 32, 3) and np.array_equal(images, pixels)  # classes sorted
    rows = {r["codec"]: r for r in bench.measure(images, workers=1)}
    assert {"png", "bmp"} <= set(rows)
    # BMP: a 54-byte header and 32 rows of 96 bytes (no padding) per image.
    assert rows["bmp"]["bytes"] == 4 * (54 + 32 * 32 * 3)
    assert rows["bmp"]["bits_per_dim"] == pytest.approx(8 * 3126 / 3072) and \
        rows["bmp"]["bits_per_dim"] >= 8
    assert rows["png"]["bits_per_dim"] > 0
    for r in rows.values():
        assert r["encode_images_per_s"] > 0 and r["decode_images_per_s"] > 0
    # Flat images cost almost nothing; uniform noise is incompressible: 8 bits/dim + overhead.
    (flat,), (noise,) = (bench.measure(part, ["png"], workers=1) for part in (images[:2], images[2:]))
    assert flat["bits_per_dim"] < 0.5 and 8 < noise["bits_per_dim"] < 8.5
    assert rows["png"]["bytes"] == flat["bytes"] + noise["bytes"]


def test_codecs_cli(bench, folder, capsys):
    root, _ = folder
    bench.main([str(root), "--n", "2", "--workers", "1", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == 2 and out["image_shape"] == [3, 32, 32]
    bits = [r["bits_per_dim"] for r in out["codecs"]]
    assert bits == sorted(bits) and len(bits) == len(bench.available()[0])
    bench.main([str(root), "--n", "2", "--workers", "1"])
    table = capsys.readouterr().out
    assert "| png | PNG, optimize=True |" in table and "| bits/dim |" in table
