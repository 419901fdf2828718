"""Tests of data.py's loading (and its errors), splitting, batching and batched augmentation: pretraining's resized
crop and flip, fine-tuning's random crop, TrivialAugment's ops and random erasing.

Run: python -m pytest -q tests/test_data.py
"""
import argparse
import math
import os
import pathlib
import shutil

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import data
from conftest import FIXTURE_DIR


def data_args(**kw):
    args = dict(dataset="fake", data_path="unused", val_split=0, fake_size=200)
    args.update(kw)
    return argparse.Namespace(**args)


def image_keys(images) -> set:
    """Each image's bytes: which images two sets share."""
    return {bytes(img.flatten().tolist()) for img in images}


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
    assert image_keys(train.images) | image_keys(val.images) == image_keys(full.images)
    assert not image_keys(train.images) & image_keys(val.images)
    assert len(train) == 150 and len(val) == 50


def test_the_fake_datasets_own_val_set_shares_no_image_with_its_training_set():
    """Without --val_split, --dataset fake has a val set of its own, a quarter of --fake_size (at least 16) drawn
    apart from the training images: none of them is a training image."""
    train, val = data.load_data(data_args())
    assert (len(train), len(val)) == (200, 50)
    assert len(image_keys(val.images)) == 50 and not image_keys(train.images) & image_keys(val.images)


def test_the_val_split_is_the_same_whatever_the_seed():
    """--val_split holds out the same images for every --seed: runs at other seeds (and a fine-tune of a pretraining
    made at another seed) are scored on the same val images, and val_images_pretrained_on can compare them."""
    splits = [data.load_data(argparse.Namespace(**vars(data_args(val_split=50)), seed=seed)) for seed in (1, 2, 42)]
    for train, val in splits[1:]:
        assert torch.equal(val.images, splits[0][1].images) and torch.equal(train.images, splits[0][0].images)


def test_a_smaller_val_split_holds_out_the_first_images_of_a_larger_one_in_random_order():
    """--val_split N holds out the first N images of one fixed permutation (val_images_pretrained_on counts on it): a
    smaller split's val images are the first ones of a larger split's, in the same order, and a larger split trains
    on a subset of a smaller one's images. The held-out images keep the permutation's order, so the val split of an
    image folder (sorted by class) does not come sorted by class."""
    small_train, small_val = data.load_data(data_args(val_split=20))
    large_train, large_val = data.load_data(data_args(val_split=50))
    assert torch.equal(large_val.images[:20], small_val.images)
    assert torch.equal(large_val.labels[:20], small_val.labels)
    assert image_keys(large_train.images) < image_keys(small_train.images)
    _, folder_val = data.load_data(data_args(dataset="folder", data_path=FIXTURE_DIR, val_split=10))
    assert folder_val.labels.tolist() != sorted(folder_val.labels.tolist())


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


def test_epoch_batches_use_every_image_when_the_batch_divides_them_and_every_epoch_has_its_own_order():
    """Only a partial batch is dropped: 100 images in batches of 10 are all used, each exactly once. Each epoch's
    seed gives its own permutation: ten epochs, ten different orders."""
    orders = []
    for epoch_seed in range(10):
        batches = data.epoch_batches(100, 10, epoch_seed=epoch_seed, device="cpu")
        assert len(batches) == 10 and all(len(b) == 10 for b in batches)
        orders.append(torch.cat(batches))
        assert torch.equal(orders[-1].sort().values, torch.arange(100))
    assert len({tuple(order.tolist()) for order in orders}) == 10


def test_epoch_seeds_differ_for_every_epoch_and_seed():
    """Two epochs of a run, or of two runs with different --seed, never shuffle alike: over seeds 0 to 4 and the
    reference's 150 epochs (and a long run's epoch 100,002), every (seed, epoch) has a seed of its own. The
    formula is pinned too: the README's runs were shuffled by it, and another would not reproduce them."""
    pairs = [(seed, epoch) for seed in range(5) for epoch in (*range(1, 151), 100_002)]
    assert len({data.epoch_seed(seed, epoch) for seed, epoch in pairs}) == len(pairs)
    assert data.epoch_seed(42, 7) == 42 * 100_003 + 7


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
    # A uniform draw below 1/2 flips: the probability is 1/2 exactly where the threshold is 0.5 exactly.
    flipped = data.random_hflip(x, rand=torch.tensor([0.4999, 0.5, 0.1]))
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


def test_an_image_too_large_to_decode_is_named_in_one_line(tmp_path, monkeypatch):
    """PIL refuses to decode an image of more than twice Image.MAX_IMAGE_PIXELS (about 179 million pixels) with an
    error that is not an OSError; lowered to 100 here, so that the fixture's 32x32 images count as such."""
    from PIL import Image
    root = _folder_dataset(tmp_path, {"train": {"a": 1}, "val": {"a": 1}})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    image = root / "train" / "a" / f"0{next((root / 'train' / 'a').iterdir()).suffix}"
    with pytest.raises(data.DataError, match=f"--data_path: cannot read image '{image}' \\(DecompressionBombError: "
                                             "Image size \\(1024 pixels\\) exceeds limit of 200 pixels\\)$"):
        data.load_data(data_args(dataset="folder", data_path=str(root)))


def test_a_truncated_or_unreadable_image_is_named_in_one_line_with_what_went_wrong(tmp_path, monkeypatch):
    from PIL import Image
    root = _folder_dataset(tmp_path, {"train": {"a": 2}, "val": {"a": 1}})
    image = sorted((root / "train" / "a").iterdir())[1]
    whole = image.read_bytes()
    image.write_bytes(whole[:len(whole) // 2])
    # PIL says "Truncated File Read" for a JPEG, "image file is truncated" for a PNG
    with pytest.raises(data.DataError, match=f"(?i)cannot read image '{image}' \\(OSError: [^)]*truncated"):
        data.load_data(data_args(dataset="folder", data_path=str(root)))
    image.write_bytes(whole)

    def unreadable(path, *args, **kwargs):  # as open() fails on a file without read permission (root reads any)
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(Image, "open", unreadable)
    with pytest.raises(data.DataError, match="cannot read image '.*' \\(PermissionError: Permission denied\\)$"):
        data.load_data(data_args(dataset="folder", data_path=str(root)))


def test_16_bit_grey_images_keep_their_top_8_bits_and_images_of_unknown_range_are_refused(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey to 255, an all-white image: the loader keeps the top 8 bits, as PIL
    does for 16-bit colour. A 32-bit integer or floating-point image has no known range: it is refused by name."""
    import numpy as np
    from PIL import Image
    grey16 = torch.randint(0, 65536, (32, 32), generator=torch.Generator().manual_seed(0)).numpy().astype(np.uint16)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(grey16).save(tmp_path / split / "a" / "grey16.png")
    with Image.open(tmp_path / "train" / "a" / "grey16.png") as im:
        assert im.mode in ("I;16", "I") and np.array_equal(np.asarray(im), grey16)  # the file holds all 16 bits
    train, _ = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    assert torch.equal(train.images[0], torch.from_numpy(grey16 >> 8).to(torch.uint8).expand(3, 32, 32))
    for name, pixels, kind in (("float.tiff", np.full((32, 32), 0.5, np.float32), "floating-point pixels, PIL mode F"),
                               ("int32.tiff", np.full((32, 32), 7, np.int32), "32-bit integer pixels, PIL mode I")):
        path = tmp_path / "train" / "a" / name
        Image.fromarray(pixels).save(path)
        with pytest.raises(data.DataError, match=f"^--data_path: cannot read image '{path}' \\({kind}, whose range "
                                                 "is unknown; 8- and 16-bit images are read\\)$"):
            data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
        path.unlink()


def test_a_palette_image_with_transparency_loads_its_palette_colours_without_a_warning(tmp_path):
    import warnings
    import numpy as np
    from PIL import Image
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    palette = Image.fromarray(pixels.numpy()).convert("P", palette=Image.Palette.ADAPTIVE)
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        palette.save(tmp_path / split / "a" / "p.png", transparency=bytes([0] * 10 + [128] * 246))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train, _ = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    expected = np.array(palette.convert("RGB"))  # the palette's colours, transparency left out
    assert torch.equal(train.images[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_val_folder_with_other_classes_is_refused_unless_val_split_holds_out_training_images(tmp_path):
    """Labels are indices into the sorted class folders: with other folders, val label 1 would be another class, so
    such a val/ is refused in one error naming the folders in only one split. With --val_split N the val set is N
    training images and val/ is not read: the same folder then loads, val and train both labelled by train/'s
    classes."""
    root = _folder_dataset(tmp_path, {"train": {"a": 2, "b": 2}, "val": {"a": 1, "c": 1}})
    expected = r"train/ and val/ need the same class folders \(in only one of them: b, c\)"
    with pytest.raises(data.DataError, match=expected):
        data.load_data(data_args(dataset="folder", data_path=str(root)))
    train, val = data.load_data(data_args(dataset="folder", data_path=str(root), val_split=1))
    assert (len(train), len(val)) == (3, 1)
    assert train.classes == val.classes == ["a", "b"]


def test_cifar_is_downloaded_under_an_exclusive_lock(tmp_path, monkeypatch):
    """torchrun's processes all load the data before any process group exists: the download must not be shared. The
    lock held during it is exclusive: another open file is refused even a shared lock on it (a shared lock held
    there would refuse only an exclusive one)."""
    import fcntl

    import numpy as np
    import torchvision
    held = []

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            with open(pathlib.Path(root) / ".download.lock", "a") as other:  # another open file, as another process
                try:
                    fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
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


def test_a_cifar_download_that_fails_leaves_no_folder_or_lock_it_made(tmp_path, monkeypatch):
    """No internet: one line naming --data_path, and neither the folder the download would have gone to (nor the
    folders above it that it made) nor its lock file is left behind; an existing folder stays, with what it held."""
    import torchvision

    class Offline:
        def __init__(self, root, train, download):
            raise RuntimeError("no internet")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    (tmp_path / "empty").mkdir()
    for name in ("new", "kept", "empty", "new_parent/new_child/cifar"):
        with pytest.raises(data.DataError, match=r"--dataset cifar10: could not load or download it into --data_path"):
            data.load_data(data_args(dataset="cifar10", data_path=str(tmp_path / name)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "kept"]
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"] and not list((tmp_path / "empty").iterdir())


def test_cifar_images_are_torchvisions_arrays_as_channels_first_with_their_labels(tmp_path, monkeypatch):
    """torchvision keeps CIFAR as (N, H, W, C) uint8 arrays and a list of labels: each image becomes (C, H, W) with
    pixel [c, y, x] = array [y, x, c], each label its target, for both splits."""
    import numpy as np
    import torchvision
    arrays = {True: np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8),
              False: np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)}

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data, self.targets, self.classes = arrays[train], list(range(len(arrays[train]))), list("abcde")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    train, val = data.load_data(data_args(dataset="cifar10", data_path=str(tmp_path)))
    for split, array in ((train, arrays[True]), (val, arrays[False])):
        assert split.images.shape == (len(array), 3, 32, 32) and split.classes == list("abcde")
        for i, (c, y, x) in enumerate([(0, 1, 30), (2, 31, 0), (1, 5, 17)]):
            assert split.images[i, c, y, x].item() == array[i, y, x, c]
        assert torch.equal(split.images.permute(0, 2, 3, 1), torch.from_numpy(array))
        assert split.labels.tolist() == list(range(len(array)))


def test_denormalize_clamps_out_of_range_values_to_the_displayable_range():
    """denormalize maps [-1, 1] back to [0, 1] and clamps anything outside (a reconstruction can overshoot)."""
    x = torch.tensor([-3.0, -1.5, -1.0, 0.0, 0.5, 1.0, 2.5])
    assert data.denormalize(x).tolist() == [0.0, 0.0, 0.0, 0.5, 0.75, 1.0, 1.0]


def test_resized_crop_takes_the_documented_area_aspect_and_position():
    """Crops checked on a coordinate image (channel 0: each pixel's column, channel 1: its row), which bilinear
    resizing reproduces exactly: area = scale[0] + (scale[1] - scale[0]) * u_area, aspect (width / height)
    log-uniform in ratio, width sqrt(area * aspect) and height sqrt(area / aspect) as fractions of the image
    (shrunk to 1 when they would not fit), placed from the left / top edge (u = 0) to the right / bottom edge
    (u = 1). Output pixel k then reads the image at left + (k + 1/2) * width - 1/2 pixels."""
    S = 32
    coords = torch.arange(S).float()
    x = torch.stack([coords.expand(S, S), coords.view(S, 1).expand(S, S)]).expand(4, 2, S, S)
    rand = torch.tensor([[0.375, 1.0, 1.0, 0.0],  # area 0.5, aspect 4/3, top-right corner
                         [0.375, 0.0, 0.0, 1.0],  # area 0.5, aspect 3/4, bottom-left corner
                         [1.0, 1.0, 0.3, 0.5],  # area 1, aspect 4/3: full width, height sqrt(3/4), centred
                         [1.0, 0.5, 0.3, 0.7]])  # area 1, aspect 1: the whole image
    out = data.random_resized_crop(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), rand=rand)
    k = torch.arange(S).double()
    for i, (u_area, u_ratio, u_x, u_y) in enumerate(rand.double().tolist()):
        area = 0.2 + 0.8 * u_area
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u_ratio)
        w, h = min(math.sqrt(area * aspect), 1.0), min(math.sqrt(area / aspect), 1.0)
        left, top = u_x * S * (1 - w), u_y * S * (1 - h)
        columns, rows = left + (k + 0.5) * w - 0.5, top + (k + 0.5) * h - 0.5
        # Inner pixels only: the outermost ones of a crop at an edge read half a pixel past the image's centres.
        torch.testing.assert_close(out[i, 0, 1:-1, 1:-1].double(), columns[1:-1].expand(S - 2, S - 2),
                                   rtol=0, atol=1e-4, msg=f"crop {i}: columns")
        torch.testing.assert_close(out[i, 1, 1:-1, 1:-1].double(), rows[1:-1, None].expand(S - 2, S - 2),
                                   rtol=0, atol=1e-4, msg=f"crop {i}: rows")
    assert torch.allclose(out[3], x[3], atol=1e-4)


def test_resized_crops_at_the_edges_read_only_the_image():
    """The outermost output pixels of a crop at an edge read up to half a pixel past the image's last pixel
    centres (the test above leaves them out); they read the image's edge, not a padding of zeros: every crop of a
    constant image, at each corner, at the smallest and the largest area, is that constant at every pixel."""
    x = torch.full((5, 3, 32, 32), 0.7)
    rand = torch.tensor([[0.0, 0.0, 0.0, 0.0],  # area 0.2, aspect 3/4, top-left corner
                         [0.0, 1.0, 1.0, 0.0],  # area 0.2, aspect 4/3, top-right
                         [0.0, 0.5, 0.0, 1.0],  # bottom-left
                         [0.3, 1.0, 1.0, 1.0],  # bottom-right
                         [1.0, 1.0, 0.5, 0.5]])  # full width
    torch.testing.assert_close(data.random_resized_crop(x, rand=rand), x)


def test_trivial_augment_draws_every_op_and_all_31_magnitude_levels():
    """TrivialAugmentWide's draws: each of the 14 ops uniformly, a magnitude uniform over 31 levels from 0 to the
    op's maximum inclusive (torchvision: linspace(0, max, 31)), and a random sign."""
    torch.manual_seed(0)
    op, magnitude = data.trivial_augment_draws(20_000, "cpu")
    num_ops = len(data.AUGMENT_OPS)
    assert num_ops == 14, "TrivialAugmentWide's op set has 14 ops"
    counts = torch.bincount(op, minlength=num_ops)
    assert len(counts) == num_ops
    assert (counts - 20_000 / num_ops).abs().max() < 160  # 4.4 standard deviations of a binomial count
    levels = magnitude.abs().unique()
    torch.testing.assert_close(levels, torch.linspace(0.0, 1.0, 31))
    assert magnitude.max() == 1.0 and magnitude.min() == -1.0
    level_counts = torch.bincount((magnitude.abs() * 30).round().long(), minlength=31)
    assert (level_counts - 20_000 / 31).abs().max() < 110  # 4.4 standard deviations
    assert abs((magnitude > 0).float().mean().item() - 0.5 * 30 / 31) < 0.016


def test_shear_y_agrees_with_torchvisions_affine():
    """shear_y at magnitude m shears by 0.99 * m (input y = y + 0.99 * m * x, the left column fixed): torchvision's
    affine with a vertical shear of atan(0.99 * m) degrees about the top-left corner, as its TrivialAugmentWide, up to
    nearest-pixel ties."""
    x = torch.rand(3, 3, 32, 32)
    for shear in (0.3, -0.5):
        op = torch.full((3,), data.AUGMENT_OPS.index("shear_y"))
        sheared = data.apply_augment_ops(x, op, torch.full((3,), shear / 0.99))
        reference = TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(shear))],
                              center=[0, 0])
        assert (sheared != reference).float().mean() < 0.01, shear


def _erased_rectangles(out):
    """(top, left, height, width) of the one rectangle of ones in each (1, H, W) image of zeros."""
    erased = out[:, 0] == 1
    rows, cols = erased.any(dim=2), erased.any(dim=1)
    assert torch.equal(erased, rows[:, :, None] & cols[:, None, :])  # one axis-aligned rectangle
    return rows.float().argmax(dim=1), cols.float().argmax(dim=1), rows.sum(dim=1), cols.sum(dim=1)


def test_random_erasing_rectangles_follow_their_draws_by_hand():
    """A rectangle's height is round(sqrt(share * H * W * aspect)), its width round(sqrt(share * H * W / aspect)),
    each shrunk to the image; it is placed at one of the H - h + 1 (W - w + 1) positions where it fits, u = 0
    the top (left) one and u near 1 the bottom (right) one. Values worked out by hand for 32x32 images."""
    x = torch.zeros(3, 1, 32, 32)
    draws = dict(share=torch.tensor([1 / 3, 0.02, 0.25]), aspect=torch.tensor([3.0, 1.0, 0.5]),
                 top=torch.tensor([0.999, 0.999, 0.5]), left=torch.tensor([0.999, 0.0, 0.5]),
                 erase=torch.zeros(3, 1, 1), noise=torch.ones(3, 1, 32, 32))
    top, left, h, w = _erased_rectangles(data.random_erasing(x, 1.0, draws))
    # h = sqrt(1024 / 3 * 3) = 32, w = sqrt(1024 / 9) = 10.7 -> 11, at the right edge (22 positions: left 21);
    # h = w = sqrt(20.48) = 4.5 -> 5, at the bottom (28 positions: top 27) and the left edge;
    # h = sqrt(128) = 11.3 -> 11, w = sqrt(512) = 22.6 -> 23, in the middle (floor(0.5 * 22) = 11, floor(0.5 * 10) = 5).
    assert h.tolist() == [32, 5, 11] and w.tolist() == [11, 5, 23]
    assert top.tolist() == [0, 27, 11] and left.tolist() == [21, 0, 5]


def test_random_erasing_rectangles_have_the_drawn_sizes_and_reach_every_edge():
    """Over 2000 default draws with prob 1: every rectangle's size is the formula's from its own share and aspect,
    every rectangle lies inside the image, and rectangles reach the bottom and right edges (and the top and left)."""
    H = W = 32
    torch.manual_seed(0)
    draws = data.erasing_draws((2000, 1, H, W), "cpu")
    draws["noise"] = torch.ones(2000, 1, H, W)
    top, left, h, w = _erased_rectangles(data.random_erasing(torch.zeros(2000, 1, H, W), 1.0, draws))
    def size(exact, got, limit):  # the formula's size; either neighbour where fp32 may round a near-half the other way
        sizes = {round(exact)} if abs(exact % 1 - 0.5) > 1e-4 else {math.floor(exact), math.ceil(exact)}
        return got in {min(max(s, 1), limit) for s in sizes}
    for i in range(2000):
        area = draws["share"][i].item() * H * W
        aspect = draws["aspect"][i].item()
        assert size(math.sqrt(area * aspect), h[i].item(), H), i
        assert size(math.sqrt(area / aspect), w[i].item(), W), i
    assert h.max() == H and w.max() == W  # tall and wide ones are shrunk to the image
    assert (top >= 0).all() and (top + h <= H).all() and (left >= 0).all() and (left + w <= W).all()
    assert (top[h < H] == 0).any() and (top + h)[h < H].max() == H
    assert (left[w < W] == 0).any() and (left + w)[w < W].max() == W


def test_image_folder_images_are_their_files_labelled_by_their_class_folder(tmp_path):
    """Every image of a folder split is its file decoded as RGB, labelled by its class folder's index among the
    sorted class names; read back here file by file with PIL."""
    import numpy as np
    from PIL import Image
    for split in ("train", "val"):
        shutil.copytree(pathlib.Path(FIXTURE_DIR, "train"), tmp_path / split)
    train, _ = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    classes = sorted(p.name for p in (tmp_path / "train").iterdir())
    assert train.classes == classes
    expected = []
    for label, name in enumerate(classes):
        for path in sorted((tmp_path / "train" / name).iterdir()):
            with Image.open(path) as im:
                expected.append((np.asarray(im.convert("RGB")).transpose(2, 0, 1).tobytes(), label))
    got = [(img.numpy().tobytes(), label) for img, label in zip(train.images, train.labels.tolist())]
    assert len(set(expected)) == 60 and sorted(got) == sorted(expected)


def test_image_folder_resizes_other_sizes_to_32_pixels_bicubic(tmp_path):
    """An image of another size is resized to the model's 32x32 with PIL's bicubic filter."""
    import numpy as np
    from PIL import Image
    pixels = torch.randint(0, 256, (40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(pixels.numpy()).save(tmp_path / split / "a" / "big.png")
    train, _ = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    expected = np.array(Image.fromarray(pixels.numpy()).resize((32, 32), Image.BICUBIC))
    assert torch.equal(train.images[0], torch.from_numpy(expected).permute(2, 0, 1))


def test_image_folder_converts_grey_and_transparent_images_and_resizes_one_side_off(tmp_path):
    """A greyscale PNG and an RGBA one load as RGB (PIL's convert), and an image 32 wide and 48 high is resized to
    32 x 32 though its width already fits: each as PIL makes it from the file."""
    import numpy as np
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    files = {name: Image.fromarray(torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).numpy())
             for name, shape in (("grey.png", (32, 32)), ("rgba.png", (32, 32, 4)), ("tall.png", (48, 32, 3)))}
    assert [files[name].mode for name in ("grey.png", "rgba.png")] == ["L", "RGBA"]
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for name, image in files.items():
            image.save(tmp_path / split / "a" / name)
    train, _ = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    assert train.images.shape == (3, 3, 32, 32)
    for i, name in enumerate(sorted(files)):  # the folder's files in name order
        with Image.open(tmp_path / "train" / "a" / name) as im:
            expected = np.array(im.convert("RGB").resize((32, 32), Image.BICUBIC))
        assert torch.equal(train.images[i], torch.from_numpy(expected).permute(2, 0, 1)), name


def test_image_folder_skips_hidden_folders_and_files_and_turns_images_upright(tmp_path):
    """A hidden folder (Jupyter's .ipynb_checkpoints, a .cache) is no class, in train/ or inside a class, and a
    hidden file (macOS's ._<name>, which is no image) no image: the classes and labels are the visible folders'. A
    JPEG stored sideways with an EXIF orientation (a phone's) loads as a viewer shows it: PIL's exif_transpose."""
    import numpy as np
    from PIL import Image
    pixels = torch.randint(0, 256, (16, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    sideways = Image.fromarray(pixels.numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
    for split in ("train", "val"):
        for name in ("a", "b", ".ipynb_checkpoints", "a/.cache"):
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / split / name / "0.png")
        (tmp_path / split / "a" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble, not a PNG")
        sideways.save(tmp_path / split / "b" / "phone.jpg", exif=exif, quality=95)
    train, val = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    assert train.classes == val.classes == ["a", "b"] and train.labels.tolist() == [0, 1, 1]
    with Image.open(tmp_path / "train" / "b" / "phone.jpg") as im:
        assert im.size == (48, 16)  # stored sideways
        upright = im.transpose(Image.Transpose.ROTATE_270).convert("RGB").resize((32, 32), Image.BICUBIC)
    assert torch.equal(train.images[2], torch.from_numpy(np.array(upright)).permute(2, 0, 1))


def test_image_folder_reads_each_image_once_through_link_loops_in_torchvisions_order(tmp_path):
    """A link back up to a class folder (a loop) or a second link to one of its folders would list their images
    again at every level of the walk; each real folder is walked once, so every image is read once. Without links,
    the images come in torchvision's ImageFolder order (folders by path: "b-x" before "b/c"), as before."""
    from PIL import Image
    from torchvision.datasets import ImageFolder
    for split in ("train", "val"):
        for i, sub in enumerate(("a", "a/b", "a/b/c", "a/b-x", "z")):
            (tmp_path / split / sub).mkdir(parents=True)
            Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / split / sub / f"{i}.png")
    plain, _ = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    reference = ImageFolder(str(tmp_path / "train"))
    order = [img[0, 0, 0].item() for img in plain.images]  # each image's red value is its folder's index
    assert order == [reference[i][0].getpixel((0, 0))[0] for i in range(5)] == [0, 1, 3, 2, 4]
    assert plain.labels.tolist() == [0, 0, 0, 0, 1]

    os.symlink("..", tmp_path / "train" / "a" / "b" / "up")  # a loop: a/b/up/b/up/... is a/b again
    os.symlink(tmp_path / "train" / "a" / "b-x", tmp_path / "train" / "z" / "again")  # another class's folder
    linked, _ = data.load_data(data_args(dataset="folder", data_path=str(tmp_path)))
    assert [img[0, 0, 0].item() for img in linked.images] == [0, 1, 3, 2, 4, 3]
    assert linked.labels.tolist() == [0, 0, 0, 0, 1, 1]


def test_an_image_folder_with_both_val_and_test_is_scored_on_val(tmp_path):
    """val/ is the held-out split when both val/ and test/ exist: the test split stays untouched for the end."""
    root = _folder_dataset(tmp_path, {"train": {"a": 2}, "val": {"a": 3}, "test": {"a": 5}})
    _, val = data.load_data(data_args(dataset="folder", data_path=str(root)))
    assert len(val) == 3


def test_a_small_fake_dataset_still_has_16_val_images():
    """--dataset fake holds out a quarter of --fake_size as its own val set, and never fewer than 16 images."""
    assert [len(data.load_data(data_args(fake_size=n))[1]) for n in (20, 64, 100)] == [16, 16, 25]


def _best_roll(images, reference, reach=8):
    """For each image, the mean squared difference to the roll of `reference` (by at most `reach` pixels each way)
    that matches it best, and that roll's (down, right) shift."""
    shifts = [(dy, dx) for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)]
    rolled = torch.stack([reference.roll(shift, dims=(1, 2)).flatten() for shift in shifts])  # (S, C * H * W)
    flat = images.flatten(1).double()  # |a - b|^2 = |a|^2 + |b|^2 - 2 a.b, one matmul for every roll
    rolled = rolled.double()
    mse = ((flat ** 2).sum(1, keepdim=True) + (rolled ** 2).sum(1) - 2 * flat @ rolled.T) / flat.shape[1]  # (N, S)
    best, where = mse.min(dim=1)
    return best, [shifts[i] for i in where.tolist()]


def test_fake_images_are_their_class_pattern_shifted_with_noise_the_same_for_every_seed():
    """Each fake image is its class's pattern rolled by up to 4 pixels each way, plus noise of std 0.1: aligned by a
    roll of at most 8, an image differs from another image of its class (the train set's first, the reference) by
    noise alone (mean squared difference about 2 * 0.1 ** 2), and from the other classes' by far more. The patterns
    are the same whatever the seed (train and val share classes), and the shifts differ from image to image."""
    train, val = data.fake_images(200, seed=1), data.fake_images(50, seed=2)
    assert train.classes == val.classes == [f"class_{i}" for i in range(10)]
    shifts = set()
    for c in range(10):
        reference = train.images[train.labels == c][0].float() / 255
        own = torch.cat([split.images[split.labels == c][:4] for split in (train, val)]).float() / 255
        other = torch.cat([split.images[split.labels != c][:4] for split in (train, val)]).float() / 255
        (own_mse, own_shifts), (other_mse, _) = _best_roll(own, reference), _best_roll(other, reference)
        assert own_mse.max() < 0.03 and other_mse.min() > 0.05, (c, own_mse, other_mse)
        # The noise is there, at its std: 2 * 0.1 ** 2 less what clamping to [0, 1] takes (0.017 to 0.020 measured),
        # from every image but the reference itself, which `own` holds too.
        assert (own_mse < 1e-9).sum() == 1 and own_mse[own_mse >= 1e-9].min() > 0.015, (c, own_mse)
        shifts.update(own_shifts)
    assert len(shifts) > 15 and max(max(abs(dy), abs(dx)) for dy, dx in shifts) <= 8


def test_data_flags_take_the_closed_ends_of_their_ranges():
    """--fake_size takes 1 and MAX_FAKE_SIZE (1,000,000) itself, --val_split takes 0; one step past either end is
    refused naming the flag and the value (checked without generating any image)."""
    for size in (1, data.MAX_FAKE_SIZE):
        data.check_data_args(data_args(fake_size=size))
    for size in (0, data.MAX_FAKE_SIZE + 1):
        with pytest.raises(data.DataError, match=f"--fake_size must be in \\[1, 1,000,000\\], got {size}$"):
            data.check_data_args(data_args(fake_size=size))
    data.check_data_args(data_args(val_split=0))
    with pytest.raises(data.DataError, match="--val_split must be >= 0, got -1$"):
        data.check_data_args(data_args(val_split=-1))


def test_the_fake_val_set_is_not_drawn_from_the_training_sets_random_stream():
    """--dataset fake's val images come from a generator of their own (seed 2, the training set's is 1): drawn from
    the training set's stream, the val labels would be the first training labels again, one for one."""
    train, val = data.load_data(data_args())
    assert not torch.equal(val.labels, train.labels[:len(val)])
    assert (val.labels == train.labels[:len(val)]).float().mean() < 0.3  # a tenth, for independent labels


def test_fake_images_are_shifted_by_minus_4_to_4_pixels_each_way():
    """Each fake image is its class pattern rolled by -4 to 4 pixels (nine values) each way: aligned with one image
    of its class, the other images of the class are found at shifts spanning exactly 8 pixels down and 8 across
    (relative to that image's own shift). Exactly, not at most: a range of -4 to 3 would span 7."""
    images = data.fake_images(1000, seed=1)
    for c in range(10):
        own = images.images[images.labels == c].float() / 255
        mse, shifts = _best_roll(own[1:], own[0])
        assert mse.max() < 0.03, c  # every image found: noise alone remains
        for axis in (0, 1):
            moved = [shift[axis] for shift in shifts]
            assert max(moved) - min(moved) == 8, (c, axis)


def test_erasing_draws_are_independent_and_follow_their_documented_ranges():
    """erasing_draws' defaults, as timm's RandomErasing: the area share uniform on [0.02, 1/3], the aspect ratio
    log-uniform on [0.3, 1/0.3] (its log uniform, so ratios r and 1/r equally likely), and each number its own draw:
    the five (share, log aspect, top, left, erase) pairwise uncorrelated. Checked on 20,000 draws by deciles,
    within 2% of each range (6 standard deviations)."""
    torch.manual_seed(0)
    d = data.erasing_draws((20_000, 1, 8, 8), "cpu")
    q = torch.linspace(0.1, 0.9, 9)
    log_aspect = d["aspect"].log()
    lo, hi = math.log(0.3), math.log(1 / 0.3)
    for values, (a, b) in ((d["share"], (0.02, 1 / 3)), (log_aspect, (lo, hi)), (d["top"], (0, 1)),
                           (d["left"], (0, 1)), (d["erase"].flatten(), (0, 1))):
        assert a <= values.min() and values.max() <= b
        torch.testing.assert_close(torch.quantile(values, q), a + (b - a) * q, rtol=0, atol=0.02 * (b - a))
    draws = torch.stack([d["share"], log_aspect, d["top"], d["left"], d["erase"].flatten()])
    correlation = torch.corrcoef(draws) - torch.eye(5)
    assert correlation.abs().max() < 0.05, correlation


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning augmentation: random crop, TrivialAugment's ops, random erasing

def test_random_crop_copies_a_padded_window_per_image():
    x = torch.rand(600, 3, 8, 8)
    torch.manual_seed(0)
    out = data.random_crop(x, 2)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    offsets = set()
    for b in range(len(x)):
        found = [(t, l) for t in range(5) for l in range(5) if torch.equal(out[b], padded[b, :, t:t + 8, l:l + 8])]
        assert found, b
        offsets.add(found[0])
    assert len(offsets) == 25  # every offset is drawn


def test_random_crop_offsets_are_top_then_left():
    """crop_draws' offsets are (top, left) into the image padded by `padding` reflected pixels (torch's reflect pad,
    the reference): offset (t, l) cuts rows t to t + H and columns l to l + W of the padded image."""
    x = torch.rand(3, 3, 8, 8)
    offsets = torch.tensor([[0, 4], [4, 1], [3, 3]])
    out = data.random_crop(x, 2, offsets)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for b, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(out[b], padded[b, :, top:top + 8, left:left + 8]), b


def _apply(x, name, magnitudes):
    op = torch.full((len(x),), data.AUGMENT_OPS.index(name))
    return data.apply_augment_ops(x, op, torch.tensor(magnitudes))


def test_augment_ops_match_torchvision_per_image():
    u8 = data.fake_images(4, seed=3).images
    u8[0, :, :4] = 255  # saturated pixels, so solarize and the blends clamp somewhere
    x = u8.float() / 255
    m = [-1.0, -0.3, 0.4, 1.0]
    for name, reference in {
        "brightness": lambda img, v: TF.adjust_brightness(img, 1 + 0.99 * v),
        "color": lambda img, v: TF.adjust_saturation(img, 1 + 0.99 * v),
        "contrast": lambda img, v: TF.adjust_contrast(img, 1 + 0.99 * v),
        "sharpness": lambda img, v: TF.adjust_sharpness(img, 1 + 0.99 * v),
        "solarize": lambda img, v: TF.solarize(img, 1 - abs(v)),
        "rotate": lambda img, v: TF.rotate(img, 135 * v),
        "autocontrast": lambda img, v: TF.autocontrast(img),
        "identity": lambda img, v: img,
    }.items():
        out = _apply(x, name, m)
        for i, v in enumerate(m):
            assert torch.allclose(out[i], reference(x[i:i + 1], v)[0], atol=1e-6), (name, v)
    # Ops defined on uint8 values: compare with torchvision on the uint8 images.
    for i, v in enumerate(m):
        bits = 8 - round(abs(v) * 6)
        assert torch.equal(_apply(x, "posterize", m)[i] * 255, TF.posterize(u8[i], bits).float())
    assert torch.equal(_apply(x, "equalize", m) * 255, TF.equalize(u8).float())


def test_autocontrast_stretches_each_channel_and_leaves_a_constant_one_as_it_is():
    """autocontrast maps each channel's lowest value to 0 and highest to 1, as torchvision's autocontrast does; a
    channel of one value has nothing to stretch and is left as it is (torchvision's too), and one of two grey levels
    a step apart is stretched all the same."""
    x = torch.rand(3, 3, 8, 8) * 0.5 + 0.2
    x[0, 1] = 0.6
    x[1] = 0.3
    x[2] = 0.5 + (torch.rand(3, 8, 8) < 0.5) / 255  # nearly flat: two levels, one uint8 step apart
    out = _apply(x, "autocontrast", [0.0, 0.0, 1.0])
    for i in range(3):
        assert torch.allclose(out[i], TF.autocontrast(x[i:i + 1])[0], atol=1e-5), i
    assert torch.equal(out[0, 1], x[0, 1]) and torch.equal(out[1], x[1])
    assert out[0, 0].min() == 0 and out[0, 0].max() == 1
    assert set(out[2].unique().tolist()) == {0.0, 1.0}


def test_geometric_ops_translate_exactly_and_mix_per_image():
    x = torch.rand(3, 3, 32, 32)
    shifted = _apply(x, "translate_x", [4 / 32, -8 / 32, 0.0])  # +4 px right, 8 px left, none
    assert torch.equal(shifted[0, ..., 4:], x[0, ..., :-4]) and shifted[0, ..., :4].eq(0).all()
    assert torch.equal(shifted[1, ..., :-8], x[1, ..., 8:]) and shifted[1, ..., -8:].eq(0).all()
    assert torch.equal(shifted[2], x[2])
    down = _apply(x, "translate_y", [3 / 32] * 3)
    assert torch.equal(down[:, :, 3:], x[:, :, :-3])
    # Shear about the top-left corner, as torchvision's TrivialAugmentWide shears (center=[0, 0]).
    sheared = _apply(x, "shear_x", [0.3 / 0.99] * 3)
    reference = TF.affine(x, angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(0.3)), 0.0],
                          center=[0, 0])
    assert (sheared != reference).float().mean() < 0.01
    # Fractional shifts are truncated to whole pixels, as TrivialAugmentWide's int(magnitude): level 29 of 30 is
    # 30.93 pixels, so 30 (rounding would give 31).
    for sign in (1, -1):
        shifted = _apply(x, "translate_x", [sign * 29 / 30] * 3)
        assert torch.equal(shifted, TF.affine(x, angle=0.0, translate=[sign * 30, 0], scale=1.0, shear=[0.0, 0.0]))
    # One batch, a different op per image: each image is exactly what its op alone gives.
    names = ["rotate", "equalize", "translate_y"]
    op = torch.tensor([data.AUGMENT_OPS.index(n) for n in names])
    mixed = data.apply_augment_ops(x, op, torch.tensor([0.5, 0.0, -0.25]))
    for i, (name, v) in enumerate(zip(names, [0.5, 0.0, -0.25])):
        assert torch.equal(mixed[i], _apply(x[i:i + 1], name, [v])[0])


def test_trivial_augment_draws_one_op_per_image():
    x = data.fake_images(512, seed=4).images.float() / 255
    torch.manual_seed(0)
    out = data.trivial_augment(x)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    changed = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert 0.75 < changed < 0.99  # identity and zero magnitudes leave about 1/14 + a little unchanged
    torch.manual_seed(0)
    assert torch.equal(data.trivial_augment(x), out)  # seeded by torch's RNG
    # Each image gets its own drawn op and magnitude: the batch gives what each image gives alone with its draw.
    op, magnitude = data.trivial_augment_draws(64, x.device)
    assert set(op.tolist()) == set(range(len(data.AUGMENT_OPS)))  # every op among 64 draws (seeded)
    alone = torch.cat([data.apply_augment_ops(x[i:i + 1], op[i:i + 1], magnitude[i:i + 1]) for i in range(64)])
    assert torch.allclose(data.trivial_augment(x[:64], (op, magnitude)), alone, atol=1e-6)


def test_random_erasing_fills_one_rectangle_per_erased_image():
    x = torch.zeros(2000, 3, 16, 16)
    torch.manual_seed(0)
    out = data.random_erasing(x, prob=1.0)
    erased = out != 0  # noise is never exactly 0
    assert torch.equal(erased, erased[:, :1].expand_as(erased))  # all channels, same pixels
    area = erased[:, 0].flatten(1).sum(dim=1).float()
    rows, cols = erased[:, 0].any(dim=2), erased[:, 0].any(dim=1)
    assert torch.equal(erased[:, 0], rows[:, :, None] & cols[:, None, :])  # exactly one axis-aligned rectangle
    assert area.min() >= 1 and area.max() <= 256 / 3 * 1.5 and area.mean() > 0.05 * 256
    # The noise is timm's 'pixel' mode: drawn for each channel of each pixel, not one grey value across the channels.
    noise = out.permute(0, 2, 3, 1)[erased[:, 0]]  # (erased pixels, 3)
    assert (noise[:, 0] != noise[:, 1]).all() and abs(torch.corrcoef(noise.T)[0, 1]) < 0.05
    assert torch.equal(data.random_erasing(x, prob=0.0), x)
    share = (data.random_erasing(x, prob=0.25) != 0).flatten(1).any(dim=1).float().mean().item()
    assert 0.21 < share < 0.29
