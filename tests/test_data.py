"""var_mclr.data: embedded MNIST split, generated shapes, ImageFolder errors and skipping, the factory."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from var_mclr.data import (ImageFolderDataset, build_dataset, load_mnist_raw, mnist_dataset, mnist_split_indices,
                           synthetic_dataset)

# ---------------------------------------------------------------------------------------------- embedded MNIST


@pytest.fixture(scope="module")
def mnist():
    return mnist_dataset("train"), mnist_dataset("val")


def test_mnist_split_sizes_and_stratification(mnist):
    train, val = mnist
    assert len(train) == 4500 and len(val) == 500
    assert torch.bincount(train.tensors[1], minlength=10).tolist() == [450] * 10
    assert torch.bincount(val.tensors[1], minlength=10).tolist() == [50] * 10
    assert train.num_classes == val.num_classes == 10


def test_mnist_split_is_a_disjoint_cover_and_fixed():
    _, labels = load_mnist_raw()
    tr, ho = mnist_split_indices(labels)
    assert len(np.intersect1d(tr, ho)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, ho])), np.arange(5000))
    tr2, ho2 = mnist_split_indices(labels)
    assert np.array_equal(ho, ho2) and np.array_equal(tr, tr2)
    # The split depends on its seed (so it is a real shuffle, not the file order).
    assert not np.array_equal(ho, mnist_split_indices(labels, seed=1)[1])


def test_mnist_tensors_range_padding_and_determinism(mnist):
    train, val = mnist
    x, y = train.tensors
    assert x.shape == (4500, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.long
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey replicated
    border = torch.cat([x[..., :2, :].flatten(), x[..., -2:, :].flatten(), x[..., :2].flatten(), x[..., -2:].flatten()])
    assert (border == -1.0).all()  # 2-pixel background padding 28 -> 32
    again = mnist_dataset("val")
    assert torch.equal(again.tensors[0], val.tensors[0]) and torch.equal(again.tensors[1], val.tensors[1])
    # Held-out digits are not in the train split (no pixel-identical duplicates across the split).
    train_keys = {bytes(r) for r in x[:, 0].numpy().astype(np.float32)}
    assert not any(bytes(r) in train_keys for r in val.tensors[0][:, 0].numpy().astype(np.float32))


def test_mnist_other_resolution():
    x, _ = mnist_dataset("val", resolution=16).tensors
    assert x.shape == (500, 3, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0


# ---------------------------------------------------------------------------------------------- generated shapes


def test_synthetic_deterministic_ranges_and_split_differs():
    a = synthetic_dataset("train", num_classes=6, resolution=16, samples_per_class=10, seed=3)
    b = synthetic_dataset("train", num_classes=6, resolution=16, samples_per_class=10, seed=3)
    v = synthetic_dataset("val", num_classes=6, resolution=16, samples_per_class=10, seed=3)
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert not torch.equal(a.tensors[0], v.tensors[0])
    x, y = a.tensors
    assert x.shape == (60, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert torch.bincount(y).tolist() == [10] * 6


def test_synthetic_is_class_separable():
    # The foreground colour alone identifies the class: nearest class-mean colour fitted on train is perfect on val.
    def fg_colour(x_N3HW):
        fg_N1HW = (x_N3HW.amax(1, keepdim=True) > 0).float()  # background is dark (< -0.7), shapes are saturated
        assert (fg_N1HW.flatten(1).sum(1) >= 4).all()  # every image actually shows a shape
        return (x_N3HW * fg_N1HW).flatten(2).sum(2) / fg_N1HW.flatten(2).sum(2)

    tr = synthetic_dataset("train", num_classes=8, resolution=16, samples_per_class=20)
    va = synthetic_dataset("val", num_classes=8, resolution=16, samples_per_class=20)
    ct, yt = fg_colour(tr.tensors[0]), tr.tensors[1]
    means = torch.stack([ct[yt == c].mean(0) for c in range(8)])
    pred = torch.cdist(fg_colour(va.tensors[0]), means).argmin(1)
    assert (pred == va.tensors[1]).all()


# ---------------------------------------------------------------------------------------------- image folder


def _write_png(path, size, colour, mode="RGB"):
    Image.new(mode, size, colour).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    for ci, cls in enumerate(["cat", "dog", "eel"]):
        d = root / "train" / cls
        d.mkdir(parents=True)
        for i in range(3):
            _write_png(d / f"{i}.png", (40 + 7 * i, 30), (80 * ci, 10 * i, 200))
    _write_png(root / "train" / "eel" / "grey.png", (20, 50), 128, mode="L")  # grey images must become RGB
    (root / "train" / "dog" / "broken.JPEG").write_bytes(b"this is not a jpeg")
    (root / "train" / "dog" / "notes.txt").write_text("ignored: not an image extension")
    return root


def test_imagefolder_skips_unreadable_with_count_and_warning(folder, caplog):
    with caplog.at_level(logging.WARNING, logger="var_mclr.data"):
        ds = build_dataset({"name": "imagefolder", "root": str(folder), "resolution": 16, "num_classes": 3}, "train")
    assert ds.num_skipped == 1
    assert len(ds) == 10
    assert ds.classes == ["cat", "dog", "eel"]
    assert any("broken.JPEG" in r.getMessage() for r in caplog.records)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    for i in range(len(ds)):
        x, _ = ds[i]
        assert x.shape == (3, 16, 16) and x.min() >= -1.0 and x.max() <= 1.0


def test_imagefolder_lazy_skip_without_verify(folder, caplog):
    ds = ImageFolderDataset(str(folder / "train"), resolution=8, train=False, verify=False)
    assert len(ds) == 11 and ds.num_skipped == 0
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("broken.JPEG")][0]
    with caplog.at_level(logging.WARNING, logger="var_mclr.data"):
        x, label = ds[bad]
    assert ds.num_skipped == 1 and x.shape == (3, 8, 8)
    assert label == ds.samples[bad][1]  # replaced by an image of the same class: the label stays true
    assert any("broken.JPEG" in r.getMessage() for r in caplog.records)


def test_imagefolder_val_transform_is_var_centre_crop(folder):
    # Centre crop after a LANCZOS resize of the shorter side to round(1.125 * res): a uniform image stays uniform
    # and the value maps to [-1, 1] exactly as x / 127.5 - 1.
    ds = ImageFolderDataset(str(folder / "train"), resolution=16, train=False)
    x, _ = ds[0]  # cat/0.png: colour (0, 0, 200)
    expected = torch.tensor([0, 0, 200]) / 255 * 2 - 1
    assert torch.allclose(x, expected.view(3, 1, 1).expand_as(x), atol=1e-6)
    assert torch.equal(ds[0][0], ds[0][0])  # no randomness outside training


def test_imagefolder_empty_class_is_an_error(folder):
    (folder / "train" / "fox").mkdir()
    with pytest.raises(ValueError, match="fox.*no readable images"):
        build_dataset({"name": "imagefolder", "root": str(folder), "resolution": 16}, "train")


def test_imagefolder_class_count_mismatch_is_an_error(folder):
    with pytest.raises(ValueError, match="3 class directories.*num_classes=1000"):
        build_dataset({"name": "imagefolder", "root": str(folder), "resolution": 16, "num_classes": 1000}, "train")


def test_imagefolder_missing_split_dir_is_an_error(folder, tmp_path):
    with pytest.raises(ValueError, match="has no val/ split; set data.heldout_share"):
        build_dataset({"name": "imagefolder", "root": str(folder), "resolution": 16}, "val")
    with pytest.raises(ValueError, match="does not exist"):
        build_dataset({"name": "imagefolder", "root": str(tmp_path / "nothing"), "resolution": 16}, "train")


# ---------------------------------------------------------------------------------------------- factory


def test_build_dataset_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown dataset name"):
        build_dataset({"name": "cifar"}, "train")
    with pytest.raises(ValueError, match=r"unknown key\(s\).*resolutoin"):
        build_dataset({"name": "mnist", "resolutoin": 32}, "train")
    with pytest.raises(ValueError, match="10 classes.*num_classes=5"):
        build_dataset({"name": "mnist", "num_classes": 5}, "train")
    with pytest.raises(ValueError, match="unknown split"):
        build_dataset({"name": "mnist"}, "test")
    with pytest.raises(ValueError, match="needs data.root"):
        build_dataset({"name": "imagefolder"}, "train")


def test_build_dataset_synthetic_and_mnist():
    ds = build_dataset({"name": "synthetic", "num_classes": 5, "resolution": 8, "samples_per_class": 3}, "val")
    assert len(ds) == 15 and ds.num_classes == 5 and ds[0][0].shape == (3, 8, 8)
    ds = build_dataset({"name": "mnist", "resolution": 32, "num_classes": 10}, "val")
    assert len(ds) == 500 and ds[0][0].shape == (3, 32, 32)


def test_a_key_left_out_takes_the_config_default():
    from var_mclr.config import DataConfig
    side = DataConfig().resolution
    assert build_dataset({"name": "mnist"}, "val").tensors[0].shape[-1] == side  # not MNIST's padded 32
    synthetic = build_dataset({"name": "synthetic"}, "val")
    assert synthetic.tensors[0].shape[-1] == side and synthetic.num_classes == DataConfig().num_classes
