"""Tests of data.py's loading (and its errors), splitting, batching and pretraining augmentation.

Run: python -m pytest -q tests/test_data.py
"""
import argparse
import pathlib
import shutil

import pytest
import torch

import data
from conftest import FIXTURE_DIR


def data_args(**kw):
    args = dict(dataset="fake", data_path="unused", val_split=0, fake_size=200)
    args.update(kw)
    return argparse.Namespace(**args)


def test_image_folder_fixture_loads_as_uint8_with_class_names():
    train, val = data.load_data(data_args(dataset="folder", data_path=FIXTURE_DIR, val_split=10))
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (3, 32, 32)
    assert len(train) + len(val) == 60 and len(val) == 10
    assert train.classes[:2] == ["airplane", "automobile"] and len(train.classes) == 10


def test_val_split_is_disjoint_fixed_and_covers_the_training_set():
    full, _ = data.load_data(data_args())
    train, val = data.load_data(data_args(val_split=50))
    again_train, again_val = data.load_data(data_args(val_split=50))
    assert torch.equal(val.images, again_val.images) and torch.equal(train.images, again_train.images)
    # Every original image lands in exactly one of the two parts.
    key = lambda imgs: {bytes(img.flatten().tolist()) for img in imgs}  # noqa: E731
    assert key(train.images) | key(val.images) == key(full.images)
    assert not key(train.images) & key(val.images)
    assert len(train) == 150 and len(val) == 50


def test_val_split_errors_name_the_flag():
    with pytest.raises(data.DataError, match="--val_split"):
        data.load_data(data_args(val_split=200))
    with pytest.raises(data.DataError, match="--data_path"):
        data.load_data(data_args(dataset="folder", data_path="/nonexistent"))
    with pytest.raises(data.DataError, match="--val_split N"):  # train/ but no val/ or test/
        data.load_data(data_args(dataset="folder", data_path=FIXTURE_DIR))


def test_epoch_batches_drop_the_partial_batch_and_reshuffle_per_epoch():
    a = data.epoch_batches(103, 10, epoch_seed=1, device="cpu")
    b = data.epoch_batches(103, 10, epoch_seed=2, device="cpu")
    assert len(a) == 10 and all(len(x) == 10 for x in a)
    flat = torch.cat(a)
    assert len(set(flat.tolist())) == 100 and flat.max() < 103
    assert not torch.equal(flat, torch.cat(b))
    assert torch.equal(flat, torch.cat(data.epoch_batches(103, 10, epoch_seed=1, device="cpu")))


def test_take_gathers_the_rows_of_a_batch():
    images = data.fake_images(20).images
    idx = torch.tensor([7, 3, 3, 19])
    batch = data.take(images, idx, torch.device("cpu"))
    assert batch.shape == (4, 3, 32, 32) and torch.equal(batch, torch.stack([images[i] for i in (7, 3, 3, 19)]))


def test_normalize_matches_the_reference_transform():
    imgs = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    from torchvision.transforms import Normalize
    expected = Normalize(0.5, 0.5)(imgs.float() / 255)
    assert torch.allclose(data.normalize(imgs), expected)
    assert torch.allclose(data.denormalize(data.normalize(imgs)), imgs.float() / 255)


def test_full_centred_crop_is_the_identity_and_flip_flips():
    x = torch.randn(3, 3, 32, 32)
    # area 1, aspect 1 (the middle of the log-ratio range), centred: the crop is the whole image.
    rand = torch.tensor([[1.0, 0.5, 0.5, 0.5]]).expand(3, 4)
    assert torch.allclose(data.random_resized_crop(x, scale=(0.2, 1.0), rand=rand), x, atol=1e-5)
    # A quarter-area crop in the top-left corner, upsampled, equals that corner resized.
    rand = torch.tensor([[0.25, 0.5, 0.0, 0.0]]).expand(3, 4)
    corner = data.random_resized_crop(x, scale=(0.0, 1.0), rand=rand)
    expected = torch.nn.functional.interpolate(x[:, :, :16, :16], size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(corner[:, :, 2:-2, 2:-2], expected[:, :, 2:-2, 2:-2], atol=1e-5)
    flipped = data.random_hflip(x, rand=torch.tensor([0.1, 0.9, 0.3]))
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    assert torch.equal(flipped[2], x[2].flip(-1))


def _folder_dataset(root, splits):
    """An image folder under root: splits maps 'train'/'val' to {class: number of images}, copied from the fixture."""
    source = sorted(pathlib.Path(FIXTURE_DIR, "train", "cat").iterdir())[0]
    for split, classes in splits.items():
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                shutil.copy(source, root / split / name / f"{i}{source.suffix}")
    return root


def test_a_file_that_is_not_an_image_is_named_in_one_line(tmp_path):
    root = _folder_dataset(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    bad = root / "train" / "b" / "9.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(data.DataError, match=f"--data_path: cannot read image '{bad}' \\(UnidentifiedImageError\\)"):
        data.load_data(data_args(dataset="folder", data_path=str(root)))


def test_val_folder_with_other_classes_is_refused(tmp_path):
    # Labels are indices into the sorted class folders: with other folders, val label 1 would be another class.
    root = _folder_dataset(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1}})
    expected = r"train/ and val/ need the same class folders \(in only one of them: b, c\)"
    with pytest.raises(data.DataError, match=expected):
        data.load_data(data_args(dataset="folder", data_path=str(root)))


def test_cifar_is_downloaded_under_an_exclusive_lock(tmp_path, monkeypatch):
    """torchrun's processes all load the data before any process group exists: the download must not be shared."""
    import fcntl

    import numpy as np
    import torchvision
    held = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            with open(pathlib.Path(root) / ".download.lock", "a") as other:  # another open file, as another process
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held.append(False)
                except BlockingIOError:
                    held.append(True)
            self.data = np.zeros((4 if train else 2, 32, 32, 3), dtype=np.uint8)
            self.targets, self.classes = [0] * len(self.data), ["a"]
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    train, val = data.load_data(data_args(dataset="cifar10", data_path=str(tmp_path / "new")))
    assert held == [True, True] and (len(train), len(val)) == (4, 2)
    with open(tmp_path / "new" / ".download.lock", "a") as after:  # released once loaded
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)
