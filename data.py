"""Datasets as uint8 tensors in memory (on the GPU when training there), batched on the device.

CIFAR-sized data is small (CIFAR-10's train split is 150 MB as uint8), so every split is decoded once into a
(N, 3, H, W) uint8 tensor. Shuffling is a randperm, batches are an index_select, and augmentation runs in batch
on the same device: no DataLoader workers, no per-image Python on the training path.
"""
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "cifar100", "folder", "fake")
# The reference normalises every channel with mean 0.5 and std 0.5, i.e. pixels in [-1, 1]. Keeping it makes
# our MAE loss directly comparable with the reference's numbers.
PIXEL_MEAN, PIXEL_STD = 0.5, 0.5
# Held-out validation images are chosen by a permutation with this fixed seed, independent of --seed, so every
# script and every run holds out exactly the same images.
VAL_SPLIT_SEED = 0


class DataError(Exception):
    """Bad dataset flags or files; the message names the flag and is shown to the user as one line."""


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list  # class names, indexed by label

    def __len__(self) -> int:
        return self.images.shape[0]

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


def add_data_args(parser) -> None:
    """The dataset flags shared by every script."""
    parser.add_argument("--dataset", default="cifar10", choices=DATASETS,
                        help="cifar10/cifar100 (torchvision download into --data_path), folder (an ImageFolder "
                             "tree with train/ and val/ or test/), or fake (synthetic, no files)")
    parser.add_argument("--data_path", default="data", help="dataset root (download target for cifar10/100)")
    parser.add_argument("--val_split", type=int, default=0,
                        help="hold out this many training images as the validation set (0: use the dataset's "
                             "own val/test split)")
    parser.add_argument("--fake_size", type=int, default=2000,
                        help="number of training images for --dataset fake (the val split is a quarter of it)")


def check_data_args(args) -> None:
    if args.val_split < 0:
        raise DataError(f"--val_split must be >= 0, got {args.val_split}")
    if args.fake_size < 1:
        raise DataError(f"--fake_size must be >= 1, got {args.fake_size}")
    if args.dataset == "folder":
        if not os.path.isdir(os.path.join(args.data_path, "train")):
            raise DataError(f"--data_path {args.data_path!r} has no train/ folder (--dataset folder needs "
                            "<data_path>/train/<class>/*.jpg)")
        if args.val_split == 0 and _folder_val_dir(args.data_path) is None:
            raise DataError(f"--data_path {args.data_path!r} has no val/ or test/ folder: add one or pass "
                            "--val_split N to hold out N training images")


def load_data(args, img_size: int = 32):
    """-> (train, val) ImageSets on the CPU, following the dataset flags."""
    check_data_args(args)
    if args.dataset == "fake":
        train = fake_images(args.fake_size, img_size, seed=1)
        val = fake_images(max(args.fake_size // 4, 16), img_size, seed=2)
    elif args.dataset in ("cifar10", "cifar100"):
        train, val = _torchvision_cifar(args.dataset, args.data_path)
    else:
        train = _image_folder(os.path.join(args.data_path, "train"), img_size)
        val_dir = _folder_val_dir(args.data_path)
        val = _image_folder(val_dir, img_size) if args.val_split == 0 else None
    if args.val_split:
        if args.val_split >= len(train):
            raise DataError(f"--val_split must be smaller than the {len(train)} training images, "
                            f"got {args.val_split}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        held_out, kept = perm[:args.val_split].sort().values, perm[args.val_split:].sort().values
        train, val = train.subset(kept), train.subset(held_out)
    return train, val


def _folder_val_dir(root: str):
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _torchvision_cifar(name: str, root: str):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        splits = [cls(root, train=train, download=True) for train in (True, False)]
    except Exception as e:  # torchvision raises URLError, RuntimeError, ... depending on what failed
        raise DataError(f"--dataset {name}: could not load or download it into --data_path {root!r} "
                        f"({type(e).__name__}: {e})") from None
    return tuple(ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                          torch.tensor(s.targets, dtype=torch.int64), list(s.classes)) for s in splits)


def _image_folder(root: str, img_size: int) -> ImageSet:
    from PIL import Image
    from torchvision.datasets import ImageFolder
    try:
        folder = ImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"--data_path: cannot read image folder {root!r} ({e})") from None

    def load(path):
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (img_size, img_size):
                im = im.resize((img_size, img_size), Image.BICUBIC)
            return np.asarray(im)

    # PIL releases the GIL while decoding, so threads decode tens of thousands of small files in seconds.
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
        arrays = list(pool.map(load, [path for path, _ in folder.samples]))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.tensor(folder.targets, dtype=torch.int64), list(folder.classes))


def fake_images(n: int, img_size: int = 32, num_classes: int = 10, seed: int = 0) -> ImageSet:
    """Synthetic, learnable images: each class is a smooth random colour pattern; every image is its class's
    pattern, randomly shifted, with noise. Generated in memory from a fixed seed, so runs need no files."""
    g = torch.Generator().manual_seed(seed)
    # Class prototypes are drawn from their own fixed seed, so train and val share the same classes.
    protos = torch.rand(num_classes, 3, 4, 4, generator=torch.Generator().manual_seed(1234))
    protos = F.interpolate(protos, size=(img_size, img_size), mode="bicubic", align_corners=False)
    labels = torch.randint(num_classes, (n,), generator=g)
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    images = torch.empty(n, 3, img_size, img_size)
    for i in range(n):  # once per dataset, at start-up: clarity over speed here
        images[i] = protos[labels[i]].roll(tuple(shifts[i].tolist()), dims=(1, 2))
    images = images + 0.1 * torch.randn(images.shape, generator=g)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageSet(images, labels, [f"class_{i}" for i in range(num_classes)])


# ----------------------------------------------------------------------------------------------------------
# Batches on the device

def normalize(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1] (the reference's Normalize(0.5, 0.5))."""
    return (images_u8.float() / 255 - PIXEL_MEAN) / PIXEL_STD


def denormalize(images: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize, clamped to [0, 1] for display."""
    return (images.float() * PIXEL_STD + PIXEL_MEAN).clamp(0, 1)


def epoch_batches(num_images: int, batch_size: int, epoch_seed: int, device) -> list:
    """A fresh permutation for the epoch, cut into full batches of indices on `device`.

    The last partial batch is dropped: static shapes let torch.compile and CUDA graphs reuse one program,
    and a different random handful of images is left out each epoch, so none is systematically unseen.
    """
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(epoch_seed)).to(device)
    num_batches = num_images // batch_size
    return list(perm[:num_batches * batch_size].view(num_batches, batch_size))


def random_resized_crop(x: torch.Tensor, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """Batched RandomResizedCrop back to the input size, bilinear, one crop per image, on x's device.

    Areas are drawn uniformly from `scale` and aspect ratios log-uniformly from `ratio` (as torchvision does);
    crops that would not fit are shrunk to fit instead of being redrawn, which keeps this branch-free.
    """
    B = x.shape[0]
    area = torch.empty(B, device=x.device).uniform_(*scale)
    log_r = torch.empty(B, device=x.device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = log_r.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (torch.rand(B, device=x.device) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop inside
    cy = (torch.rand(B, device=x.device) * 2 - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    """Flip each image left-right with probability 1/2, in batch."""
    flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(-1), x)

