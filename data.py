"""Datasets as uint8 tensors in memory (on the GPU when training there), batched on the device.

CIFAR-sized data is small (CIFAR-10's train split is 150 MB as uint8), so every split is decoded once into a
(N, 3, H, W) uint8 tensor. Shuffling is a randperm, batches are an index_select, and augmentation runs in batch
on the device: no DataLoader workers, no per-image Python on the training path. Every supported dataset is
decoded at the model's 32x32 (3 KB per image), so a million images take 3 GB and usually live on the GPU. One
that does not fit there (--data_on, utils.data_device) stays in host memory instead: each batch is gathered into
pinned memory and copied to the GPU asynchronously (take), which is what a DataLoader would do for data already
decoded, minus the worker processes.
"""
import contextlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = ("cifar10", "cifar100", "folder", "fake")
DATA_ON = ("auto", "device", "host")
MAX_FAKE_SIZE = 1_000_000  # 3 GB of uint8 images, generated one by one at start-up
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
    parser.add_argument("--data_on", default="auto", choices=DATA_ON,
                        help="where the uint8 images live while training: device (on the GPU, the fastest), host "
                             "(CPU memory, each batch gathered there and copied to the GPU asynchronously; for "
                             "datasets the GPU cannot hold), auto (device when both splits take at most 80%% "
                             "of the GPU's free memory, else host)")


def check_data_args(args) -> None:
    if args.val_split < 0:
        raise DataError(f"--val_split must be >= 0, got {args.val_split}")
    if not 1 <= args.fake_size <= MAX_FAKE_SIZE:
        raise DataError(f"--fake_size must be in [1, {MAX_FAKE_SIZE:,}], got {args.fake_size}")
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
        if val is not None and val.classes != train.classes:  # labels are class indices: they must mean the same
            only_one = sorted(set(val.classes) ^ set(train.classes))
            raise DataError(f"--data_path {args.data_path!r}: train/ and {os.path.basename(val_dir)}/ need the same "
                            f"class folders (in only one of them: {', '.join(only_one[:5])})")
    if args.val_split:
        if args.val_split >= len(train):
            raise DataError(f"--val_split must be smaller than the {len(train)} training images, "
                            f"got {args.val_split}")
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
        # The held-out images stay in random order, so the first few (the ones the figures show) mix classes
        # even when the source is sorted by class, as an image folder is.
        held_out, kept = perm[:args.val_split], perm[args.val_split:].sort().values
        train, val = train.subset(kept), train.subset(held_out)
    return train, val


def _folder_val_dir(root: str):
    for name in ("val", "test"):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


@contextlib.contextmanager
def _download_lock(root: str):
    """An exclusive lock on `root` for the length of a download. Under torchrun every process loads the data
    before any process group exists, and torchvision writes the archive under its final name as it arrives: two
    processes downloading at once would write one file together. With the lock the first one downloads and the
    others find the archive complete (torchvision checks its MD5) and only extract it. Where no lock file can be
    made (a read-only folder, a system without fcntl), nothing can be downloaded into it by us either: no lock.
    A failed load leaves no lock file it made, nor a folder it made (root, or one above it) that holds nothing else."""
    path = os.path.join(root, ".download.lock")
    made_lock, made_folders, folder = not os.path.lexists(path), [], os.path.abspath(root)
    while not os.path.lexists(folder):  # what makedirs will make, root first
        made_folders.append(folder)
        folder = os.path.dirname(folder)
    try:
        import fcntl
        os.makedirs(root, exist_ok=True)
        lock = open(path, "a")
    except (ImportError, OSError):
        yield
        return
    try:
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            yield
    except BaseException:
        with contextlib.suppress(OSError):
            if made_lock:
                os.remove(path)
            for folder in made_folders:
                os.rmdir(folder)  # refused where a download left a file, and so above it too
        raise


def _torchvision_cifar(name: str, root: str):
    import torchvision
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        with _download_lock(root):
            splits = [cls(root, train=train, download=True) for train in (True, False)]
    except Exception as e:  # torchvision raises URLError, RuntimeError, ... depending on what failed
        raise DataError(f"--dataset {name}: could not load or download it into --data_path {root!r} "
                        f"({type(e).__name__}: {e}); without internet, --dataset folder reads images from a folder "
                        "and --dataset fake needs none") from None
    return tuple(ImageSet(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(),
                          torch.tensor(s.targets, dtype=torch.int64), list(s.classes)) for s in splits)


def _image_files(class_dir: str, extensions: tuple) -> list:
    """The image files under a class folder, in torchvision's ImageFolder order (folders by path, files by name),
    without hidden entries (.ipynb_checkpoints/, .cache/, macOS's ._<name> files: a hidden file is no image), and
    each real folder walked once: a link back up to a folder above (a loop) would list its images again at every
    level, some 40 times over, before the system's limit on nested links stops the walk."""
    walked, found = set(), []
    for folder, subfolders, files in os.walk(class_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in walked:
            subfolders.clear()
            continue
        walked.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))  # the first path is kept
        found.append((folder, sorted(name for name in files
                                     if not name.startswith(".") and name.lower().endswith(extensions))))
    return [os.path.join(folder, name) for folder, names in sorted(found) for name in names]


def _image_folder(root: str, img_size: int) -> ImageSet:
    from PIL import Image, ImageOps, UnidentifiedImageError
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    class VisibleImageFolder(ImageFolder):
        """ImageFolder without hidden entries (a hidden folder in train/ would be a class of its own, its labels
        shifted by one) and without the images a link loop would repeat: see _image_files."""
        def find_classes(self, directory):
            classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: i for i, name in enumerate(classes)}

        @staticmethod
        def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
            per_class = {name: _image_files(os.path.join(directory, name), IMG_EXTENSIONS) for name in class_to_idx}
            empty = [name for name, paths in sorted(per_class.items()) if not paths]
            if empty:
                raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}. Supported "
                                        f"extensions are: {', '.join(IMG_EXTENSIONS)}")
            return [(path, class_to_idx[name]) for name, paths in sorted(per_class.items()) for path in paths]

    try:
        folder = VisibleImageFolder(root)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"--data_path: cannot read image folder {root!r} ({e})") from None

    def load(path):
        try:
            with Image.open(path) as im:
                sixteen_bit = im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG")
                if im.mode in ("I", "F") and not sixteen_bit:
                    kind = "32-bit integer" if im.mode == "I" else "floating-point"
                    raise DataError(f"--data_path: cannot read image {path!r} ({kind} pixels, PIL mode {im.mode}, "
                                    "whose range is unknown; 8- and 16-bit images are read)")
                # upright as a viewer shows it (a phone's JPEG is stored sideways, with an EXIF orientation)
                im = ImageOps.exif_transpose(im)
                if sixteen_bit:
                    # PIL's convert clips 16-bit grey (a PNG's, a TIFF's) to 255, an all-white image: keep the top
                    # 8 bits instead, as PIL does when it reads 16-bit colour.
                    im = Image.fromarray((np.asarray(im).astype(np.int64) >> 8).clip(0, 255).astype(np.uint8))
                elif im.mode == "P" and "transparency" in im.info:
                    im = im.convert("RGBA")  # the same RGB in the end, without PIL's warning about the palette
                im = im.convert("RGB")
                if im.size != (img_size, img_size):
                    im = im.resize((img_size, img_size), Image.BICUBIC)
                return np.asarray(im)
        # PIL's UnidentifiedImageError for a file that is not an image (its message repeats the path), an OSError
        # for a truncated one ("Truncated File Read") or an unreadable one (its strerror, without the path);
        # its DecompressionBombError, not an OSError, for one too large to decode safely, whose message then gives
        # the size.
        except (OSError, Image.DecompressionBombError) as e:
            said = getattr(e, "strerror", None) or str(e).split(",")[0]
            said = f": {said}" if said and not isinstance(e, UnidentifiedImageError) else ""
            raise DataError(f"--data_path: cannot read image {path!r} ({type(e).__name__}{said})") from None

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


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch `epoch`'s permutation (epoch_batches) in a run of --seed `seed`. A function of the two
    alone, so that every process cuts the same permutation and a resumed run shuffles as an uninterrupted one. For
    epochs below 100,003 (a prime), no two epochs share a seed, in one run or across two runs' seeds."""
    return seed * 100_003 + epoch


def epoch_batches(num_images: int, batch_size: int, epoch_seed: int, device) -> list:
    """A fresh permutation for the epoch, cut into full batches of indices on `device`.

    The last partial batch is dropped: static shapes let torch.compile and CUDA graphs reuse one program,
    and a different random handful of images is left out each epoch, so none is systematically unseen.
    """
    perm = torch.randperm(num_images, generator=torch.Generator().manual_seed(epoch_seed)).to(device)
    num_batches = num_images // batch_size
    return list(perm[:num_batches * batch_size].view(num_batches, batch_size))


def take(source: torch.Tensor, idx: torch.Tensor, device: torch.device) -> torch.Tensor:
    """source[idx] on `device`; idx lives on source's device (epoch_batches cuts the batches there).

    Host-resident data is gathered into pinned memory and copied with non_blocking: the copy (under 1 MB for a
    chunk of 256 images) is queued on the GPU's stream between the previous step's kernels, and the host goes on
    to gather the next batch while the GPU works, so neither waits for the other."""
    if source.device.type == "cpu" and device.type == "cuda":
        rows = torch.empty((len(idx), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
        return torch.index_select(source, 0, idx, out=rows).to(device, non_blocking=True)
    return source[idx]


def random_resized_crop(x: torch.Tensor, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), rand=None) -> torch.Tensor:
    """Batched RandomResizedCrop back to the input size, bilinear, one crop per image, on x's device.

    Areas are drawn uniformly from `scale` and aspect ratios log-uniformly from `ratio` (as torchvision does);
    crops that would not fit are shrunk to fit instead of being redrawn, which keeps this branch-free.
    rand: optional (B, 4) uniform [0, 1) numbers to draw from (area, ratio, x, y); by default torch's RNG.
    """
    B = x.shape[0]
    u = torch.rand(B, 4, device=x.device) if rand is None else rand
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    aspect = (math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]).exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop width and height as fractions of the image
    h = (area / aspect).sqrt().clamp(max=1.0)
    cx = (u[:, 2] * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates, crop inside the image
    cy = (u[:, 3] * 2 - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="reflection", align_corners=False)


def random_hflip(x: torch.Tensor, rand=None) -> torch.Tensor:
    """Flip each image left-right with probability 1/2, in batch. rand: optional (B,) uniform numbers."""
    u = torch.rand(x.shape[0], device=x.device) if rand is None else rand
    flip = (u < 0.5).view(-1, 1, 1, 1)
    return torch.where(flip, x.flip(-1), x)


# ----------------------------------------------------------------------------------------------------------
# Classification augmentation, batched on the device: one draw per image, no per-image Python. Each random op
# takes its random numbers as an optional argument, made by its *_draws function: train_classifier.py draws them
# eagerly and compiles the rest, which then holds no random op (the same numbers compiled or eager, whatever
# inductor does with random ops).

def crop_draws(batch: int, padding: int, device) -> torch.Tensor:
    """Each image's random (top, left) offset into the padded image, in [0, 2 * padding]: (B, 2) int64."""
    return torch.cat([torch.randint(2 * padding + 1, (batch, 1), device=device) for _ in ("top", "left")], dim=1)


def random_crop(x: torch.Tensor, padding: int, offsets=None) -> torch.Tensor:
    """Pad every side by `padding` pixels (reflected) and cut each image's own random crop back to the input
    size, the standard CIFAR crop. Integer offsets and a gather, so pixels are copied exactly.
    offsets: optional crop_draws(B, padding, ...); drawn here by default."""
    B, C, H, W = x.shape
    offsets = crop_draws(B, padding, x.device) if offsets is None else offsets
    padded = F.pad(x, (padding,) * 4, mode="reflect")  # (B, C, H + 2p, W + 2p)
    rows = offsets[:, :1] + torch.arange(H, device=x.device)  # (B, H) source row of every output row
    cols = offsets[:, 1:] + torch.arange(W, device=x.device)  # (B, W)
    x = padded.gather(2, rows[:, None, :, None].expand(B, C, H, padded.shape[-1]))
    return x.gather(3, cols[:, None, None, :].expand(B, C, H, W))


# TrivialAugment (Müller & Hutter, 2021), "wide" ranges as in torchvision's TrivialAugmentWide: each image gets one
# op, drawn uniformly, at a magnitude drawn uniformly from 31 levels, with a random sign for the signed ops.
GEOMETRIC_OPS = ("shear_x", "shear_y", "translate_x", "translate_y", "rotate")  # one grid_sample does them all
AUGMENT_OPS = ("identity", *GEOMETRIC_OPS, "brightness", "color", "contrast", "sharpness", "posterize", "solarize",
               "autocontrast", "equalize")
MAGNITUDE_LEVELS = 31
MAX_SHEAR, MAX_TRANSLATE_PX, MAX_ROTATE_DEG, MAX_ENHANCE = 0.99, 32.0, 135.0, 0.99


def trivial_augment_draws(batch: int, device) -> tuple:
    """Each image's op (an index into AUGMENT_OPS) and signed magnitude in [-1, 1]: two (B,) tensors."""
    op = torch.randint(len(AUGMENT_OPS), (batch,), device=device)
    magnitude = torch.randint(MAGNITUDE_LEVELS, (batch,), device=device) / (MAGNITUDE_LEVELS - 1)
    sign = torch.randint(2, (batch,), device=device) * 2 - 1
    return op, magnitude * sign


def trivial_augment(x: torch.Tensor, draws=None) -> torch.Tensor:
    """Batched TrivialAugmentWide on (B, 3, H, W) images in [0, 1]. draws: optional trivial_augment_draws(B, ...);
    drawn here by default."""
    op, magnitude = trivial_augment_draws(x.shape[0], x.device) if draws is None else draws
    return apply_augment_ops(x, op, magnitude)


def apply_augment_ops(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Image i gets AUGMENT_OPS[op[i]] at signed magnitude[i] in [-1, 1] (unsigned ops use its absolute value).

    x: (B, 3, H, W) in [0, 1], square. Every op is computed for the whole batch and selected per image: the ops
    are a few elementwise passes over 32x32 images, far cheaper than the model, and the shapes stay static.
    The geometric ops share one grid_sample with per-image matrices (nearest, black fill, as torchvision).
    """
    import torchvision.transforms.v2.functional as TF

    B, _, _, W = x.shape
    m = magnitude.to(x.dtype)
    is_op = {name: op == i for i, name in enumerate(AUGMENT_OPS)}
    zero = torch.zeros_like(m)

    # Geometry, in grid_sample's [-1, 1] coordinates: output pixel (u, v) reads input theta @ (u, v, 1).
    angle = torch.where(is_op["rotate"], torch.deg2rad(MAX_ROTATE_DEG * m), zero)
    shear_x = torch.where(is_op["shear_x"], MAX_SHEAR * m, zero)
    shear_y = torch.where(is_op["shear_y"], MAX_SHEAR * m, zero)
    # A positive translation moves the content right / down by MAX_TRANSLATE_PX * m pixels, truncated to whole
    # pixels as torchvision's int(magnitude).
    pixels = torch.trunc(MAX_TRANSLATE_PX * m)
    # torchvision shears about the image's top-left corner (center=[0, 0], as PIL's AutoAugment): the top row
    # (shear_x) or the left column (shear_y), at -1 here, stays in place, whence the shear added to the shift.
    shift_x = torch.where(is_op["translate_x"], -2 * pixels / W, zero) + shear_x
    shift_y = torch.where(is_op["translate_y"], -2 * pixels / W, zero) + shear_y
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([torch.stack([cos, shear_x - sin, shift_x], dim=1),
                         torch.stack([sin + shear_y, cos, shift_y], dim=1)], dim=1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)

    # Colour ops blend each image with a degenerate version of itself (torchvision's definitions: black,
    # grayscale, mean gray, 3x3 blur) by a per-image factor 1 + 0.99 * m.
    factor = (1 + MAX_ENHANCE * m).view(B, 1, 1, 1)
    blends = {"brightness": torch.zeros_like(x), "color": TF.adjust_saturation(x, 0.0),
              "contrast": TF.adjust_contrast(x, 0.0), "sharpness": TF.adjust_sharpness(x, 0.0)}
    levels = (x * 255).round()  # the uint8 values the posterize and equalize ops are defined on
    bits = 8 - (m.abs() * 6).round()  # 8 bits at magnitude 0 down to 2 at magnitude 1
    step = (2 ** (8 - bits)).view(B, 1, 1, 1)
    threshold = (1 - m.abs()).view(B, 1, 1, 1)  # solarize everything above it: 1 (nothing) down to 0 (all)
    results = {
        "posterize": (levels / step).floor() * step / 255,
        "solarize": torch.where(x >= threshold, 1 - x, x),
        "autocontrast": _autocontrast(x),
        "equalize": TF.equalize(levels.to(torch.uint8)).to(x.dtype) / 255,
    }
    for name, degenerate in blends.items():
        results[name] = (degenerate + factor * (x - degenerate)).clamp(0, 1)

    geometric = torch.stack([is_op[name] for name in GEOMETRIC_OPS]).any(dim=0)
    out = torch.where(geometric.view(B, 1, 1, 1), warped, x)
    for name, result in results.items():
        out = torch.where(is_op[name].view(B, 1, 1, 1), result, out)
    return out


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    # torchvision's autocontrast, with torch.where in place of its boolean-mask assignment (a host sync on CUDA).
    low, high = x.amin(dim=(-2, -1), keepdim=True), x.amax(dim=(-2, -1), keepdim=True)
    flat = high == low  # a constant channel is left as it is
    return ((x - torch.where(flat, 0, low)) / torch.where(flat, 1, high - low)).clamp(0, 1)


def erasing_draws(shape, device, scale=(0.02, 1 / 3), ratio=(0.3, 1 / 0.3)) -> dict:
    """Random erasing's numbers for images of `shape` (B, C, H, W): each rectangle's area as a share of the image,
    drawn uniformly from `scale`, its log-uniform aspect ratio from `ratio`, uniform numbers placing it and
    deciding whether it is erased at all, and the normal noise it is filled with."""
    B = shape[0]
    share = torch.empty(B, device=device).uniform_(*scale)
    aspect = torch.empty(B, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    top, left = torch.rand(B, device=device), torch.rand(B, device=device)
    return dict(share=share, aspect=aspect, top=top, left=left, erase=torch.rand(B, 1, 1, device=device),
                noise=torch.randn(shape, device=device))


def random_erasing(x: torch.Tensor, prob: float, draws=None) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020) as timm applies it in the MAE recipe ('pixel' mode): with probability
    `prob` per image, one rectangle (by erasing_draws' defaults, of area 0.02 to 1/3 of the image and log-uniform
    aspect ratio 0.3 to 1/0.3) is filled with per-pixel normal noise. x: normalised (B, C, H, W). Rectangles that
    would not fit are shrunk to fit instead of redrawn (timm retries up to 10 times), which keeps this branch-free.
    draws: optional erasing_draws(x.shape, ...); drawn here by default."""
    B, _, H, W = x.shape
    d = erasing_draws(x.shape, x.device) if draws is None else draws
    area = d["share"] * H * W
    h = (area * d["aspect"]).sqrt().round().clamp(1, H)
    w = (area / d["aspect"]).sqrt().round().clamp(1, W)
    top = (d["top"] * (H - h + 1)).floor()
    left = (d["left"] * (W - w + 1)).floor()
    rows = torch.arange(H, device=x.device).view(1, H, 1)
    cols = torch.arange(W, device=x.device).view(1, 1, W)
    inside = ((rows >= top.view(B, 1, 1)) & (rows < (top + h).view(B, 1, 1))
              & (cols >= left.view(B, 1, 1)) & (cols < (left + w).view(B, 1, 1)))  # (B, H, W)
    erase = inside & (d["erase"] < prob)
    return torch.where(erase.unsqueeze(1), d["noise"], x)
