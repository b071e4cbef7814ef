"""The Python API a newcomer is shown: resvae.resolve / train / load_pretrained and the data
helpers for your own arrays or torch Datasets."""

import numpy as np
import pytest
import torch

import resvae
from resvae.data import DataError, from_arrays, from_dataset


def _images(n, seed, layout="nhwc"):
    x = np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    return x if layout == "nhwc" else x.transpose(0, 3, 1, 2)


def test_from_arrays_takes_any_layout_and_range_to_uint8_nchw():
    x = _images(6, 0)
    want = x.transpose(0, 3, 1, 2)
    for given in (x, want, x / 255.0, torch.from_numpy(want).float() / 255):
        s = from_arrays(given, given[:2])
        assert s.train.images.dtype == np.uint8 and np.array_equal(s.train.images, want)
        assert s.val is s.test and len(s.test) == 2  # test validates unless val= is given
    grey = from_arrays(x[..., 0], x[:2, ..., 0])
    assert grey.train.images.shape == (6, 1, 16, 16)
    assert len(from_arrays(x, x[:2], val=x[:3]).val) == 3


@pytest.mark.parametrize("bad, match", [
    (np.full((2, 3, 8, 8), 1.5), r"\[0, 1\]"),
    (np.zeros((2, 5, 8, 8), np.uint8), "1 or 3 channels"),
    (np.zeros((2, 8), np.uint8), "shape"),
    (np.full((2, 3, 8, 8), 300, np.int64), "0..255"),
])
def test_from_arrays_names_what_is_wrong(bad, match):
    with pytest.raises(DataError, match=f"from_arrays: train: .*{match}"):
        from_arrays(bad, np.zeros((1, 3, 8, 8), np.uint8))
    with pytest.raises(DataError, match="differ in shape"):
        from_arrays(np.zeros((1, 3, 8, 8), np.uint8), np.zeros((1, 3, 4, 4), np.uint8))


def test_from_dataset_reads_a_torch_dataset_once_into_the_same_arrays():
    x = torch.from_numpy(_images(5, 1, "nchw")).float() / 255
    ds = torch.utils.data.TensorDataset(x, torch.arange(5))  # (image, label) pairs
    s = from_dataset(ds, torch.utils.data.TensorDataset(x[:2]))
    assert np.array_equal(s.train.images, from_arrays(x, x[:2]).train.images)
    with pytest.raises(DataError, match="empty"):
        from_dataset(torch.utils.data.TensorDataset(x[:0]), ds)


def test_train_from_python_on_your_own_arrays(tmp_path):
    # what the README's "Use it from Python" shows, end to end on 64 small images
    cfg = resvae.resolve(preset="tiny", environ={},
                         overrides={"max_epochs": 1, "sample_every": 0, "batch_size": 16})
    splits = resvae.data.from_arrays(_images(64, 2), _images(16, 3))
    summary = resvae.train(cfg, tmp_path / "mine", data=splits, progress=False)
    assert summary["epochs"] == 1 and summary["images_seen"] == 64
    vae, _ = resvae.load_run(tmp_path / "mine")
    assert isinstance(vae, resvae.BaseVAE) and vae.sample(2).shape == (2, 3, 16, 16)


def test_a_wrong_data_type_names_the_helpers(tmp_path):
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 3, 8, 8))
    with pytest.raises(TypeError, match="from_arrays.*from_dataset"):
        resvae.train(resvae.resolve(preset="tiny", environ={}), tmp_path / "r", data=ds)
    assert not (tmp_path / "r").exists()  # refused before anything was written
