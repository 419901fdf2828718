"""What the scripts share: argument errors, the lr schedule, optimizer groups, checkpoints, logs, figures."""
import argparse
import contextlib
import fnmatch
import functools
import glob
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm import tqdm

import data
from model import Block, MAEConfig, count_params, num_masked_patches


# ----------------------------------------------------------------------------------------------------------
# Errors the user caused: one line, exit status 2, nothing on disk touched

def _prog() -> str:
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"


def die(message: str):
    """Report bad input in one line on stderr and exit with status 2 (argparse's convention)."""
    print(f"{_prog()}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# Warnings held back while a script checks its inputs (warnings_after_checks); None when they print at once.
_held_warnings = None


def warn(message: str) -> None:
    """One line on stderr about input that is allowed but probably not meant."""
    _emit_warning(f"{_prog()}: warning: {message}")


def _emit_warning(line: str) -> None:
    if _held_warnings is not None:
        _held_warnings.append(line)
    else:
        print(line, file=sys.stderr)


@contextlib.contextmanager
def warnings_after_checks():
    """The scripts check their inputs inside this block, and the warnings those checks give print when it ends.
    A bad input found by a later check (die) is then the one line printed, without warnings about a run that will
    not start; so is the GPU running out of memory in a check (attention_choice runs attention at the model's
    shapes), which explains_out_of_memory turns into one line. Any other exception prints them before it
    propagates."""
    global _held_warnings
    previous, held = _held_warnings, []
    _held_warnings = held
    try:
        yield
    except BaseException as error:
        if isinstance(error, SystemExit) or any(map(_out_of_memory, cause_chain(error))):
            held.clear()
        raise
    finally:
        _held_warnings = previous
        for line in held:
            _emit_warning(line)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help gives each flag's default after its text, where it has one: not for a switch that is off, an empty
    value, nor None, which each script resolves at run time (from the device, or a checkpoint) as the text says.
    Lines break at spaces only, so a path or a value (vit-t-mae.pt) stays whole."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _get_help_string(self, action):
        default = action.default
        empty = isinstance(default, (str, list, tuple)) and not default
        if default is None or default is False or default is argparse.SUPPRESS or empty \
                or "%(default)" in (action.help or ""):
            return action.help
        return f"{action.help} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors (argparse prints the whole usage block before the message) and the defaults
    in --help."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, formatter_class=DefaultsHelpFormatter, **kwargs)

    def error(self, message):
        die(message)


def finite_float(text: str) -> float:
    """argparse type of every float flag: nan and inf would pass every range check (each comparison with nan is
    False) and only show an epoch later, as a non-finite loss."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


CHECKPOINT_SUFFIXES = (".pt", ".pth")


def check_output_file(flag: str, path: str, suffixes: tuple, create_folder: bool = True) -> None:
    """An output file that can be written: with one of `suffixes` (so it cannot replace another output or input,
    such as args.json or a log), not a folder, in a writable folder that exists or can be made. Checked before
    anything is written: found at the first save, a bad path would cost an epoch and the last run's logs."""
    if not path.endswith(suffixes):
        die(f"{flag} must name a {' or '.join(suffixes)} file, got {path!r}")
    if os.path.isdir(path):
        die(f"{flag} {path!r} is a folder, not a file")
    check_name_length(flag, path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isfile(folder):
        die(f"{flag} {path!r}: {folder!r} is a file, not a folder")
    check_output_folder(flag, folder, create=create_folder)


def check_name_length(flag: str, path: str) -> None:
    """One-line death when the file name of `path` is longer than its file system takes (255 bytes on most): found
    at the first save, it would cost an epoch."""
    try:  # the folder may be made later, on the file system of its nearest ancestor
        limit = os.pathconf(nearest_existing(os.path.dirname(os.path.abspath(path))), "PC_NAME_MAX")
    except (OSError, ValueError):  # no such query here: the common limit
        limit = 255
    name = os.path.basename(path)
    if len(os.fsencode(name)) > limit:
        die(f"{flag}: the file name {name[:24]!r}... is {len(os.fsencode(name))} bytes, longer than the {limit} its "
            "file system allows")


def check_run_outputs(args, checkpoint_flag: str, *beside: str) -> None:
    """A training script's outputs: its checkpoint (named by checkpoint_flag; `beside`, the ones it writes next to
    it), --output_dir and --log_dir."""
    checkpoints = [getattr(args, checkpoint_flag.lstrip("-")), *beside]
    for path in checkpoints:
        check_output_file(checkpoint_flag, path, CHECKPOINT_SUFFIXES)
    check_output_folder("--output_dir", args.output_dir)
    check_output_folder("--log_dir", args.log_dir)
    # The run makes its folders first: a checkpoint named as one of them would fail when the first epoch is saved.
    for path in checkpoints:
        for flag, folder in (("--output_dir", args.output_dir), ("--log_dir", args.log_dir)):
            if os.path.realpath(path) == os.path.realpath(folder):
                die(f"{checkpoint_flag}: {path!r} is also {flag}, the folder its figures and logs go to: choose "
                    "another name for one of them")


def load_checkpoint_keys(path: str):
    """A checkpoint's dict, its tensors mapped rather than read (mmap): enough to look at its keys."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def check_replaces_own(flag: str, path: str, own, what: str, load=load_checkpoint_keys) -> None:
    """One-line death when `path` holds a file that `own` (the dict load(path) gives -> bool) does not take for
    `what` ("a mae_pretrain.py checkpoint"): a rerun replaces its own earlier output, never another file. The other
    script's checkpoint, named by a slip of the flag (the pretraining's under the fine-tune's --output_model_path),
    is the training it took."""
    if not os.path.isfile(path):
        return
    try:
        obj = load(path)
    except Exception:  # not the format `load` reads (not a torch zip archive of plain tensors, not JSON, ...)
        obj = None
    if not (isinstance(obj, dict) and own(obj)):
        die(f"{flag} {path!r} is a file but not {what}, and this run would replace it: choose another name, or move "
            "that file")


def make_output_folders(folders: dict, device: torch.device) -> None:
    """Make the run's output folders, {flag: folder}, on rank 0 (the one process that writes), and write and delete
    a file in each. The checks above ask os.access, which cannot foresee every refusal (a read-only mount, an ACL,
    a kernel file system such as /proc, where root passes it), so a folder that cannot be made or written in ends
    the run here in one line that names its flag, before any file is written; under torchrun every process learns
    of it and stops with it, rather than in a collective rank 0 left."""
    error, made = None, []
    if dist_env()[0] == 0:
        for flag, folder in folders.items():
            error = write_refusal(flag, folder, made)
            if error:
                break
    if not all_processes(error is None, device):
        for top in reversed(made):  # a refused run leaves nothing behind, not even the folders it made for it
            for folder, _, _ in os.walk(top, topdown=False):
                with contextlib.suppress(OSError):  # only empty ones: rmdir refuses the others
                    os.rmdir(folder)
        die(error or "rank 0 could not make the output folders (its own line says which)")


def write_refusal(flag: str, folder: str, made: list | None = None) -> str | None:
    """Make `folder` if it is missing and write and delete a file in it: None if that worked, else the one-line
    reason, naming the flag. The topmost folder it would make goes to `made`, for removal if the run is refused."""
    top, parent = None, os.path.abspath(folder)
    while not os.path.lexists(parent) and parent != os.path.dirname(parent):
        top, parent = parent, os.path.dirname(parent)
    if top is not None and made is not None:
        made.append(top)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        return f"{flag}: cannot write in folder {folder!r} ({e.strerror or e})"
    return None


def check_not_a_file(flag: str, folder: str) -> None:
    """One-line death when `folder` names a file: a folder may be missing, not a file."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        die(f"{flag} {folder!r} is a file, not a folder")


def check_no_folder_at(flag: str, folder: str, names, patterns=()) -> None:
    """One-line death when `folder` holds a folder under the name of a file the script writes there (`names`, and
    the fnmatch `patterns` of names that vary, such as an epoch's figure): the write would fail with a traceback,
    at the end of an epoch or between two figures, after other files had been rewritten. A link to a folder is not
    in the way (the file replaces the link, as any link)."""
    if not os.path.isdir(folder):
        return
    in_the_way = [name for name in names if stat.S_ISDIR(_lstat_mode(os.path.join(folder, name)))]
    if patterns:
        try:  # a folder one may write in but not list (mode 333) is written all the same: its patterns go unchecked
            in_the_way += [entry.name for entry in os.scandir(folder) if entry.is_dir(follow_symlinks=False)
                           and any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)]
        except OSError:
            pass
    if in_the_way:
        die(f"{flag}: {os.path.join(folder, in_the_way[0])!r} is a folder: this script writes a file of that name "
            "there")


def _lstat_mode(path: str) -> int:
    """The mode of `path` itself (not of what a link points to); 0 if there is nothing there."""
    try:
        return os.lstat(path).st_mode
    except OSError:
        return 0


def nearest_existing(path: str) -> str:
    """`path` (absolute) if it exists, else its nearest ancestor that does."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def holds_summaries(event_file: str) -> bool:
    """Whether a TensorBoard event file holds a logged value: a run stopped before its first one (Ctrl-C, a failed
    compilation) left a file of the header alone. An unreadable file counts as holding some."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    try:
        return any(event.HasField("summary") for event in EventFileLoader(event_file).Load())
    except Exception:  # not an event file after all, or one cut short: it may hold curves
        return True


def warn_if_logged_before(args) -> None:
    """A warning when a new run (not a resume) finds TensorBoard event files with logged values in its --log_dir:
    TensorBoard reads a folder's event files as one run, so an earlier run's curves and this one's would be drawn as
    one line that jumps back at every epoch. They are left as they are."""
    if args.resume:
        return
    if any(map(holds_summaries, glob.glob(os.path.join(glob.escape(args.log_dir), "events.out.tfevents.*")))):
        warn(f"--log_dir {args.log_dir!r} holds an earlier run's TensorBoard event files, and TensorBoard would draw "
             "this run's curves into theirs as one run: pass another --log_dir, or move those files")


def check_output_folder(flag: str, folder: str, create: bool = True) -> None:
    """An output folder that exists and is writable, or (with create) can be made inside a writable folder."""
    if not folder:
        die(f"{flag} must name a folder, got ''")
    check_not_a_file(flag, folder)
    existing = nearest_existing(os.path.abspath(folder))  # where the folder would be made
    if existing != os.path.abspath(folder):
        if not create:
            die(f"{flag}: folder {folder!r} does not exist")
        if not os.path.isdir(existing):
            die(f"{flag}: {existing!r} is a file, so folder {folder!r} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        die(f"{flag}: cannot write in {existing!r} (no permission, or a read-only file system)")
    # os.access passes some folders that take no file (/proc, for root). A folder to be made is tried when the run
    # makes it (make_output_folders); one that must exist already is tried now, before any work.
    if not create and (why := write_refusal(flag, folder)):
        die(why)


# ----------------------------------------------------------------------------------------------------------
# Schedule and optimizer

def add_schedule_args(parser, batch_size: int, max_device_batch_size: int, base_learning_rate: float,
                      total_epoch: int, warmup_epoch: int, schedule: str | None, draws: str) -> None:
    """The optimisation flags both training scripts share: the reference's names and meanings, their defaults
    (a schedule of None: the script sets it after parsing). draws: the script's random draws, which --seed seeds."""
    parser.add_argument("--seed", type=int, default=42, help=f"seeds initialisation, shuffling and {draws}")
    parser.add_argument("--batch_size", type=int, default=batch_size,
                        help="effective (global) batch per optimizer step, gradients accumulated over chunks")
    parser.add_argument("--max_device_batch_size", type=int, default=max_device_batch_size,
                        help="largest chunk put through the model at once in training (evaluation, without gradients, "
                             f"takes {EVAL_CHUNK_FACTOR}x as many); must divide each process's batch")
    parser.add_argument("--base_learning_rate", type=finite_float, default=base_learning_rate,
                        help="peak lr is base_learning_rate * batch_size / 256")
    parser.add_argument("--weight_decay", type=finite_float, default=0.05, help="AdamW decoupled weight decay")
    parser.add_argument("--min_lr", type=finite_float, default=0.0, help="lr at the end of the cosine")
    parser.add_argument("--total_epoch", type=int, default=total_epoch, help="epochs of training")
    parser.add_argument("--warmup_epoch", type=int, default=warmup_epoch, help="epochs of linear lr warmup")
    parser.add_argument("--schedule", default=schedule, choices=("warmup_cosine", "reference"),
                        help="warmup_cosine: linear warmup, then a cosine down to --min_lr; reference: the reference "
                             "implementation's min(linear warmup, a cosine over the whole run) down to 0, per step "
                             "here, per epoch there")


def device_chunk(args) -> int:
    """Images per forward pass on one device: the process's share of the batch, at most max_device_batch_size
    (as in the reference, a max_device_batch_size above the batch means no accumulation)."""
    return min(args.max_device_batch_size, args.batch_size // dist_env()[1])


def chunks_per_step(args) -> int:
    """Chunks (forward and backward passes) per optimizer step on each process: the gradient accumulation."""
    return (args.batch_size // dist_env()[1]) // device_chunk(args)


# Evaluation's chunks are this many times --max_device_batch_size. Without gradients a forward pass holds one
# block's activations at a time, where a training chunk keeps every block's for the backward, so four times the
# images still take less memory than a training chunk (the ViT-T classifier under bf16 autocast, by peak memory on
# a CPU: 1.5 to 2.1 MB an image for a no-grad forward, 21 MB for a training forward and backward). And evaluation
# runs eager, where at 128 images a chunk ViT-T's kernels are short enough for the host's launches to set the
# pace: a quarter of the chunks is a quarter of the launches.
EVAL_CHUNK_FACTOR = 4


def eval_chunk(max_device_batch_size: int) -> int:
    """Images per forward pass in evaluation (kNN features, val reconstruction, val pass, a probe's features)."""
    return EVAL_CHUNK_FACTOR * max_device_batch_size


# The model-size flags of all three scripts, named as MAEConfig's fields (whose defaults are ViT-T's).
MODEL_SIZE_FLAGS = {"patch_size": "patch side in pixels", "embed_dim": "encoder width, a multiple of 4 and of "
                    "--num_heads", "depth": "encoder blocks", "num_heads": "encoder attention heads",
                    "decoder_embed_dim": "decoder width, a multiple of 4 and of --decoder_num_heads",
                    "decoder_depth": "decoder blocks", "decoder_num_heads": "decoder attention heads"}


def add_model_size_args(parser, vit_t_defaults: bool, unused=()) -> None:
    """--patch_size ... --decoder_num_heads. They default to ViT-T's values, or with vit_t_defaults=False to None
    for a script that fills them in from elsewhere (a checkpoint, a preset); `unused` flags are accepted so
    that another script's command line works, and say so."""
    vit_t = MAEConfig()
    for name, text in MODEL_SIZE_FLAGS.items():
        value = getattr(vit_t, name)
        if name in unused:
            help_text = "unused by this script"
        else:
            help_text = text if vit_t_defaults else f"{text} (ViT-T: {value})"
        parser.add_argument(f"--{name}", type=int, default=value if vit_t_defaults else None, help=help_text)


def model_config(**fields) -> MAEConfig:
    """MAEConfig(**fields), with its complaint as one-line death. Its fields are the flags' names: the complaint
    names them as flags ("--embed_dim 30 must be divisible by ..."); the others (img_size) stay as they are."""
    try:
        return MAEConfig(**fields)
    except ValueError as e:
        die(re.sub(rf"\b({'|'.join(map(re.escape, fields))})\b", r"--\1", str(e)))


def mae_config(args, **fields) -> MAEConfig:
    """The MAE the flags give (model size, --mask_ratio, and `fields`), or one-line death; as the loss is a mean over
    the masked patches, --mask_ratio must mask at least one of them at this --patch_size."""
    cfg = model_config(mask_ratio=args.mask_ratio, **{name: getattr(args, name) for name in MODEL_SIZE_FLAGS},
                       **fields)
    if cfg.num_patches == 1:  # no --mask_ratio below 1 masks the only patch: the flag at fault is this one
        die(f"--patch_size {args.patch_size} cuts the {cfg.img_size}x{cfg.img_size} image into 1 patch, but the MAE "
            f"hides some patches and shows others: pass at most {cfg.img_size // 2}")
    if num_masked_patches(cfg.num_patches, cfg.mask_ratio) == 0:
        die(f"--mask_ratio {args.mask_ratio} masks none of the {cfg.num_patches} patches (--patch_size "
            f"{args.patch_size}): at least one must be masked, i.e. mask_ratio >= 1/{cfg.num_patches}")
    return cfg


def check_data_args(args) -> None:
    """data.check_data_args, with its error as one-line death."""
    try:
        data.check_data_args(args)
    except data.DataError as e:
        die(str(e))


def load_training_data(args, img_size: int):
    """-> (train, val, steps_per_epoch) following the dataset flags, or one-line death on bad data flags."""
    try:
        train, val = data.load_data(args, img_size)
    except data.DataError as e:
        die(str(e))
    steps_per_epoch = len(train) // args.batch_size
    if steps_per_epoch == 0:
        die(f"--batch_size {args.batch_size} is larger than the {len(train)} training images")
    return train, val, steps_per_epoch


# Bytes a parameter takes in training: its fp32 weight and gradient, and AdamW's two fp32 moments.
TRAINING_BYTES_PER_PARAMETER = 16


def check_model_fits(build, device: torch.device, cfg: MAEConfig | None = None) -> None:
    """One-line death when the model-size flags ask for a model whose weights, gradients and AdamW moments alone
    exceed all of the device's memory (--embed_dim 100000, say), which would otherwise end in an allocation error's
    traceback. build() runs on the meta device, allocating nothing. The device's total, not what is free now, is
    the bound: no model that could run is refused. With the model's `cfg`, its encoder's blocks (cfg.depth copies
    of one) are counted first: building a depth of 100,000 on the meta device alone took minutes."""
    total = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
             else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    try:
        with torch.device("meta"):
            if cfg is not None:
                blocks = cfg.depth * count_params(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio))
                _die_if_over(blocks, total, device, "at least ", " (its encoder's blocks alone)")
            params = count_params(build())
    # Sizes past int64's range even for the shapes: "Storage size calculation overflowed" (RuntimeError), or a size
    # itself past it (TypeError: "Overflow when unpacking long long").
    except (RuntimeError, TypeError, OverflowError) as e:
        die(f"model-size flags (--embed_dim, --depth, ...): no such model can be built ({str(e).splitlines()[0]})")
    _die_if_over(params, total, device)


def _die_if_over(params: int, total: int, device: torch.device, at_least: str = "", counted: str = "") -> None:
    need = TRAINING_BYTES_PER_PARAMETER * params
    if need > total:
        die(f"model-size flags (--embed_dim, --depth, ...): {at_least}{params:,} parameters need {need / 2 ** 30:,.1f} "
            f"GiB for weights, gradients and AdamW's moments{counted}, more than the {total / 2 ** 30:,.1f} GiB of "
            f"{device.type}")


def memory_name(data_device: torch.device) -> str:
    """Where data_device put the images, as the scripts' start-up line says it."""
    return "host memory" if data_device.type == "cpu" else "GPU memory"


def data_device(train, val, device: torch.device, args) -> torch.device:
    """Where the uint8 images live while training (--data_on): on the GPU when they fit, else in host memory
    (data.take copies each batch over). At 3 KB per 32x32 image CIFAR-10 takes 184 MB with its test split, so
    host memory is for large image folders or small GPUs. Training ViT-T at batch 256 needs a few GiB next to the
    data, hence the 80% share. Decided before any file is written, so --data_on device on a GPU too small stops
    with one line rather than an out-of-memory traceback. Under torchrun (called after init_distributed) the
    processes decide together: one training from host memory alone would hold the others back unannounced."""
    if device.type != "cuda" or args.data_on == "host":  # resolve_device allows cuda or cpu: the rest is the CPU
        return torch.device("cpu")
    needed = train.images.nbytes + val.images.nbytes
    free = torch.cuda.mem_get_info(device)[0]
    fits_here = needed <= 0.8 * free
    if all_processes(fits_here, device):
        return device
    where = f"the {free / 2 ** 30:.2f} GiB free on {device}" if not fits_here else "another process's free GPU memory"
    message = (f"--dataset {args.dataset}: its {len(train) + len(val):,} images take {needed / 2 ** 30:.2f} GiB, more "
               f"than 80% of {where}")
    if args.data_on == "device":
        die(f"--data_on device: {message}; use --data_on host or auto")
    if dist_env()[0] == 0:
        print(f"{message}: they stay in host memory and each batch is copied over (--data_on host)")
    return torch.device("cpu")


MAX_EPOCHS = 10 ** 9  # for --total_epoch and --warmup_epoch: far past any run, far inside a float's range


def check_schedule_args(args) -> None:
    """The shared flags' checks, including the split of the global batch over processes and chunks."""
    for name in ("batch_size", "max_device_batch_size", "total_epoch"):
        if getattr(args, name) < 1:
            die(f"--{name} must be >= 1, got {getattr(args, name)}")
    world_size = dist_env()[1]
    if args.batch_size % world_size:
        die(f"--batch_size {args.batch_size} is not divisible by the {world_size} processes of this run "
            "(torchrun --nproc_per_node x --nnodes)")
    if (args.batch_size // world_size) % device_chunk(args):
        die(f"--batch_size {args.batch_size} is not divisible by --max_device_batch_size "
            f"{args.max_device_batch_size}" + (f" x {world_size} processes" if world_size > 1 else ""))
    if args.warmup_epoch < 0:
        die(f"--warmup_epoch must be >= 0, got {args.warmup_epoch}")
    # The schedule is computed in floats: an epoch count of hundreds of digits overflowed float() after the run began.
    for name in ("total_epoch", "warmup_epoch"):
        if getattr(args, name) > MAX_EPOCHS:
            die(f"--{name} must be at most {MAX_EPOCHS:,}, got {getattr(args, name)}")
    if args.base_learning_rate <= 0 or args.weight_decay < 0 or args.min_lr < 0:
        die(f"--base_learning_rate must be > 0, --weight_decay and --min_lr >= 0, got {args.base_learning_rate}, "
            f"{args.weight_decay} and {args.min_lr}")
    if not math.isfinite(peak_lr(args)):
        die(f"--base_learning_rate {args.base_learning_rate} x --batch_size {args.batch_size} / 256 overflows to an "
            "infinite peak lr: give a smaller --base_learning_rate")
    if peak_lr(args) * args.weight_decay >= 1:  # AdamW scales the weights by 1 - lr x decay at every step
        die(f"--weight_decay {args.weight_decay} x the peak lr {peak_lr(args):.2e} is "
            f"{peak_lr(args) * args.weight_decay:.3g}: AdamW scales the weights by 1 minus that at every step, so it "
            "must be below 1: give a smaller --weight_decay")
    if args.min_lr > peak_lr(args):
        die(f"--min_lr {args.min_lr} is above the peak lr {peak_lr(args):.2e} (--base_learning_rate x --batch_size / "
            "256), so the cosine would raise the lr: give a smaller --min_lr")
    # A short trial run with the default warmup. (Under the reference schedule the lr never reaches its peak anyway,
    # and a warmup past the run is the reference's own setting: 200 of 150 epochs.)
    if args.warmup_epoch > args.total_epoch and args.schedule != "reference" and dist_env()[0] == 0:
        warn(f"--warmup_epoch {args.warmup_epoch} is longer than --total_epoch {args.total_epoch}: the lr rises "
             f"for the whole run and never reaches its peak {peak_lr(args):.2e}")
    check_seed(args.seed)


def check_seed(seed: int) -> None:
    # Seeds are mixed with the epoch and rank (seed_epoch) into torch's 64-bit seed: 31 bits leave room for that.
    if not 0 <= seed < 2 ** 31:
        die(f"--seed must be in [0, 2^31), got {seed}")


def peak_lr(args) -> float:
    """The lr at the end of warmup: --base_learning_rate scaled by the global batch, batch_size / 256 (the
    reference's rule, MAE's linear scaling)."""
    return args.base_learning_rate * args.batch_size / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0) -> float:
    """Linear warmup to peak_lr over warmup_steps (step 0 already at peak_lr / warmup_steps, not 0), then
    half-cosine down to min_lr at total_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def scheduled_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float, args) -> float:
    """The lr of optimizer step `step` under --schedule: warmup_cosine (lr_at, down to --min_lr) or reference."""
    if args.schedule == "reference":
        # The reference's LambdaLR: min(linear warmup, half-cosine over the whole run, warmup included), down to
        # 0. It steps once per epoch; we evaluate the same curve at every optimizer step.
        warmup = (step + 1) / warmup_steps if warmup_steps else 1.0
        return peak_lr * min(warmup, 0.5 * (1 + math.cos(math.pi * step / total_steps)))
    return lr_at(step, total_steps, warmup_steps, peak_lr, args.min_lr)


def set_lr(optimizer, lr: float) -> None:
    # lr_scale lets layer-wise decay's groups keep their ratio to the scheduled lr.
    for group in optimizer.param_groups:
        value = lr * group.get("lr_scale", 1.0)
        if isinstance(group["lr"], torch.Tensor):  # StepGraphs': the captured update reads the lr from there
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() as a checkpoint keeps it: the same whether or not StepGraphs captured the updates,
    which hold each group's lr in a tensor and set capturable. A run without them (a CPU one, say) then resumes it
    as it would its own."""
    state = optimizer.state_dict()
    for group in state["param_groups"]:  # state_dict's own copies of the groups' settings
        if isinstance(group["lr"], torch.Tensor):
            group["lr"] = group["lr"].item()  # once per checkpoint, not per step
        group["capturable"] = False
    return state


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list:
    """Decay only weight matrices: no decay on norms, biases and the class and mask tokens, as DeiT and the MAE
    fine-tuning code do (the official MAE pretraining decays its two tokens: a few hundred numbers either way).
    The position embeddings are fixed buffers, not parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(("cls_token", "mask_token")):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(param_groups, lr: float, betas, device: torch.device):
    """Fused AdamW; every parameter it updates gets its .grad here, zeroed, for good: the training steps add into
    these buffers chunk after chunk and zero them in place (zero_grad(set_to_none=False))."""
    # The fused kernel updates all parameters in a few launches instead of several per tensor, and keeps the
    # step count on the device (the unfused path reads it back with .item() every step). CPU runs use it too,
    # so they take the same path the GPU does.
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))
    # Left to autograd, a step's first gradient would become the .grad itself. Under CUDA graphs (--compile_mode
    # reduce-overhead) that tensor lives in the graphs' memory, which the next chunk's forward reuses, so the
    # next chunk's backward would add into overwritten memory: torch.compile stops with "accessing [gradient]
    # tensor output of CUDAGraphs that has been overwritten by a subsequent run" (torch 2.14; 2.11 omits
    # "gradient"). Preallocated buffers are the remedy torch's own message proposes.
    allocate_grads(optimizer)
    return optimizer


def allocate_grads(optimizer) -> None:
    """A zeroed .grad for every parameter the optimizer updates: the buffers that backward() adds into. They are
    views of one flat buffer per dtype and device, in the optimizer's order, so that under torchrun the gradients
    are averaged in one all-reduce of that buffer, without copying them into it and back (average_gradients), as
    DistributedDataParallel's gradient_as_bucket_view does."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for dtype, device in dict.fromkeys((p.dtype, p.device) for p in params):
        same = [p for p in params if (p.dtype, p.device) == (dtype, device)]
        flat = torch.zeros(sum(p.numel() for p in same), dtype=dtype, device=device)
        offset = 0
        for p in same:  # narrow, not split: torch 2.6 refuses in-place adds into views that split made together
            p.grad = flat.narrow(0, offset, p.numel()).view_as(p)
            offset += p.numel()


def grad_buffers(optimizer) -> list:
    """The flat buffers allocate_grads put the optimizer's .grad views in, each once, in the optimizer's order."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
    # A .grad replaced since allocate_grads (by None, by a tensor of its own, or by a view of another tensor) would
    # be left out of the average, or bring a tensor of another size into the all-reduce.
    if any(g is None or g._base is None for g in grads):
        raise RuntimeError("every .grad must be a view of a buffer from utils.allocate_grads")
    bases = list({id(g._base): g._base for g in grads}.values())
    if sum(g.numel() for g in grads) != sum(base.numel() for base in bases):
        raise RuntimeError("every .grad must be a view of a buffer from utils.allocate_grads, which they fill")
    return bases


def mark_chunk_begin() -> None:
    """Tell torch's CUDA-graph trees (--compile_mode reduce-overhead) that a chunk starts (call it before the
    chunk's input work and forward), so that they replay each chunk's graphs from their root. Left to guess where a
    step starts, they left their fast path with --compile_scope blocks, where one graph runs once per block (H200,
    torch 2.11: "Unable to hit fast path of CUDAGraphs because of pending, uninvoked backwards. Consider ... using
    torch.compiler.cudagraph_mark_step_begin() before each model invocation"). The outputs of the chunk before are
    consumed by then: its loss is queued into a device-side sum, its gradients added into the .grad buffers. Without
    CUDA graphs this does nothing. Without CUDA there are none, and the call is skipped: its first call imports
    inductor's graph trees, 1.2 s of a CPU run (2-core CPU, torch 2.14.1)."""
    if torch.cuda.is_initialized():
        torch.compiler.cudagraph_mark_step_begin()


def backward(loss: torch.Tensor, optimizer) -> None:
    """loss.backward() for a chunk: its gradients are added into the optimizer's .grad buffers (allocate_grads').

    autograd adds each parameter's gradient into its .grad with its own kernel, launched eagerly after the
    compiled backward: on an H200 those fp32 additions took 0.58 ms of a 20.5 ms pretraining step's kernels
    (bench.py --profile, 2026-11-28), besides a launch per parameter and chunk on the host. Here autograd hands
    the gradients over and one multi-tensor add takes them all. The sums are the same, bit for bit. (Eager, a chunk's
    gradients are then all held until the add, one gradient-sized buffer more at the end of its backward.)"""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    # materialize_grads: a parameter the loss does not reach gets zeros, as its .grad would stay under backward().
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    torch._foreach_add_([p.grad for p in params], grads)


def optimizer_step(optimizer, scaler) -> None:
    """The step after a batch's last chunk: gradients averaged over the processes, the (fp16: unscaled) update,
    and the .grad buffers zeroed in place, so they stay (make_adamw says why)."""
    average_gradients(optimizer)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=False)


class StepGraphs:
    """--capture_step: each chunk's forward, loss, backward and gradient adds as one CUDA graph, and the optimizer's
    update with the zeroing of the .grad buffers as another, both captured here (torch.cuda.graph) and replayed every
    step. A replay is one launch for the whole graph, where torch's CUDA-graph trees (--compile_mode reduce-overhead)
    still leave the host its checks, autograd's engine, the gradients' add and AdamW's launches: on an H200 the host
    took 9.0 ms to queue a 9.1 ms fine-tuning step (bench.py --profile, 744b996, 2026-11-30), so it set the pace.
    Captured, it queued one in 2.65 ms, and the step took 9.07 ms against 10.98 with torch's graphs on the same
    H200 (bench.py at 6ceebee, 2026-11-30): the GPU sets the pace.

    The first `warmup` calls of each graph run eagerly: they compile, make AdamW's state and initialise cuBLAS and
    cuDNN, none of which a capture may do. The next call captures and then replays, so every call does its work.
    A graph replays what it captured, reading and writing the same memory each time. So:
    - a chunk's input tensors are copied into the graph's own (chunk() takes them; same shapes every call);
    - what the chunk function returns is the graph's memory, overwritten by the next replay: read it, or add it into
      a sum, before the next call;
    - each group's lr lives in a tensor the update reads (utils.set_lr fills it; optimizer_state saves a float);
    - the function passed at the capture is the one replayed: one StepGraphs per model and optimizer.
    Random draws inside (drop path) stay random: torch advances the generator's offset at every replay. What runs
    between the graphs stays eager: the input work, mixup's host-side draws and, under torchrun, the gradients'
    all-reduce."""

    WARMUP = 2  # eager calls of each graph before its capture

    def __init__(self, optimizer, warmup: int = WARMUP):
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=group["params"][0].device)
        self.optimizer = optimizer
        self.chunk_call = CapturedCall(warmup)
        self.update_call = CapturedCall(warmup, before_capture=self._make_capturable)

    def chunk(self, fn, *inputs: torch.Tensor):
        """fn(*inputs) for one chunk: eager during the warm-up, then captured, then replayed on `inputs`' values."""
        return self.chunk_call(fn, *inputs)

    def update(self) -> None:
        """The step after a batch's last chunk (optimizer_step's, less fp16's scaler, which reads back to the host)."""
        average_gradients(self.optimizer)  # eager, between the graphs: an all-reduce under torchrun
        self.update_call(self._update)

    def _update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)

    def _make_capturable(self) -> None:
        # Only at the capture: torch refuses to capture AdamW's step without it, and warns when a step runs
        # uncaptured with it. The fused step keeps its step count on the device either way.
        for group in self.optimizer.param_groups:
            group["capturable"] = True


class CapturedCall:
    """fn(*inputs): eager for the first `warmup` calls, captured as a CUDA graph at the next (then replayed, so that
    it too does its work), replayed after that on the values of the tensors passed, copied into the captured ones.
    It returns the captured outputs, which every replay rewrites."""

    def __init__(self, warmup: int, before_capture=None):
        self.warmup, self.before_capture, self.calls = warmup, before_capture, 0
        self.graph = self.inputs = self.outputs = None

    def __call__(self, fn, *inputs: torch.Tensor):
        if self.graph is not None:
            if [t.shape for t in inputs] != [t.shape for t in self.inputs]:
                raise ValueError(f"CapturedCall: inputs of shapes {[tuple(t.shape) for t in inputs]}, captured "
                                 f"with {[tuple(t.shape) for t in self.inputs]}")
            if inputs:
                torch._foreach_copy_(self.inputs, list(inputs))
        else:
            self.calls += 1
            if self.calls <= self.warmup:
                return _warm_up(fn, *inputs)
            if self.before_capture is not None:
                self.before_capture()
            self.inputs = [t.clone() for t in inputs]
            self.graph, self.outputs = _capture(fn, *self.inputs)
        self.graph.replay()
        return self.outputs


def _warm_up(fn, *inputs):
    """fn(*inputs) on a side stream, as torch's recipe warms up before a capture, then waited for: a warm-up call
    happens twice per graph, and a full wait spares the allocator's cross-stream bookkeeping."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        outputs = fn(*inputs)
    torch.cuda.synchronize()
    return outputs


def _capture(fn, *inputs) -> tuple:
    """(the CUDA graph of fn(*inputs), its outputs). Capturing records the kernels without running them."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn(*inputs)
    return graph, outputs


def average_gradients(optimizer) -> None:
    """Under torchrun: replace every process's accumulated .grad by the mean over the processes, once per
    optimizer step, after its last chunk. A single process does nothing.

    This is the all-reduce DistributedDataParallel would do, without wrapping the model: the model every process
    compiles is then the one-GPU program (one graph, CUDA graphs by default), where DDP splits the compiled graph
    at its gradient buckets and hooks its all-reduce into the backward. The price: the all-reduce no longer overlaps
    the backward; for the ViT-T MAE's 7.2M parameters it is one 29 MB all-reduce per step (one flat buffer, so one
    collective rather than one per parameter, and no copies: allocate_grads)."""
    world_size = dist_env()[1]
    if world_size == 1:
        return
    for flat in grad_buffers(optimizer):  # the .grad tensors are views of these: averaged in place
        dist.all_reduce(flat)  # a sum: gloo, the CPU's backend, has no average
        flat /= world_size


def broadcast_state(model: torch.nn.Module) -> None:
    """Under torchrun: every process starts from rank 0's parameters and buffers. The processes build them from the
    same seed and files already; this makes it so whatever the machines, as DDP does at its construction."""
    if dist.is_initialized():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, 0)


# ----------------------------------------------------------------------------------------------------------
# Device, precision, compilation

# --attention's kernels of F.scaled_dot_product_attention, which model.Attention calls.
ATTENTION_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                      "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}


def add_runtime_args(parser) -> None:
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:N or cpu (default: cuda when available, else cpu after a warning)")
    parser.add_argument("--precision", default=None, choices=("bf16", "fp16", "fp32"),
                        help="autocast dtype (default: bf16 on CUDA GPUs with bf16 arithmetic, compute capability "
                             "8.0 and up; fp16, with a grad scaler, on older ones; fp32 on the CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: on for CUDA, off for CPU)")
    parser.add_argument("--compile_mode", default=None,
                        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
                        help="torch.compile mode; reduce-overhead adds CUDA graphs, the max-autotune modes "
                             "search kernels for minutes first (default: reduce-overhead when compiling on "
                             "CUDA without --capture_step, as with --no-capture_step or fp16, under torchrun "
                             "too; else default)")
    parser.add_argument("--compile_scope", default="model", choices=("model", "blocks"),
                        help="what torch.compile compiles: the whole training model as one graph, or each "
                             "transformer block on its own (one graph per block shape, shared by all the blocks "
                             "of that shape: a fraction of the compile time; the rest runs eager)")
    parser.add_argument("--capture_step", action=argparse.BooleanOptionalAction, default=None,
                        help="capture each chunk's forward and backward, and the optimizer's update, as two CUDA "
                             "graphs of this project's own, replayed every step (utils.StepGraphs): CUDA, bf16 or "
                             "fp32; the model then compiles without torch's CUDA graphs (--compile_mode default, "
                             "or max-autotune-no-cudagraphs). Default: on when compiling on CUDA in bf16 or fp32 "
                             "with no --compile_mode given, else off")
    parser.add_argument("--attention", default="auto", choices=("auto", *ATTENTION_BACKENDS),
                        help="the kernel every attention runs with: auto lets torch choose per shape; a name "
                             "restricts it to that kernel (cudnn and efficient need CUDA)")


def attention_kernel(name: str):
    """--attention `name` as a context: F.scaled_dot_product_attention inside it runs that kernel. Under
    torch.compile the kernel is chosen when a graph is traced, which happens inside it, at the first call."""
    return contextlib.nullcontext() if name == "auto" else sdpa_kernel(ATTENTION_BACKENDS[name])


def with_attention_kernel(main):
    """Decorates a script's main(args): the whole run (training, evaluation, figures, a probe's features) computes
    attention with --attention's kernel, so no call site can miss it. main checks the choice with
    attention_choice, which stops with one line when the kernel cannot run here."""
    @functools.wraps(main)
    def run(args):
        with attention_kernel(args.attention):
            return main(args)
    return run


# How cuBLAS and cuDNN 9 name a failed allocation of GPU memory in the RuntimeError torch raises for them ("CUDA
# error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`", "cuDNN error: CUDNN_STATUS_..."). cuDNN 9's
# CUDNN_STATUS_ALLOC_FAILED is a deprecated alias of its HOST_ALLOCATION_FAILED, and its messages never use it.
OUT_OF_MEMORY_STATUSES = ("CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED")


def _out_of_memory(error: BaseException) -> bool:
    """Whether this one error (not its causes) is the GPU running out of memory, as torch or cuBLAS/cuDNN say it."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and any(status in str(error) for status in OUT_OF_MEMORY_STATUSES))


def cause_chain(error: BaseException) -> list:
    """The error, then what caused it (raise ... from), or was being handled when it was raised, and so on."""
    chain, cause = [], error
    while cause is not None and all(cause is not seen for seen in chain):
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return chain


COMPILE_FAILURE_NOTE = "torch.compile failed to compile this model (above): --no-compile runs the same training " \
                       "without it, slower"


def explains_compile_failure(main):
    """Decorates a script's main(args): when torch.compile's backend fails while compiling (inductor, or Triton
    under it: Triton 3.6 could not compile one loss kernel at the tests' tiny model, H200, 2026-11-30), the
    traceback stays, as the report to file with torch or Triton, and ends with COMPILE_FAILURE_NOTE, the way to
    go on meanwhile. Python 3.11's exception notes carry it; older Pythons show the traceback alone."""
    @functools.wraps(main)
    def run(args):
        try:
            return main(args)
        except Exception as error:
            import torch._dynamo
            if hasattr(error, "add_note") and any(isinstance(cause, torch._dynamo.exc.BackendCompilerFailed)
                                                  for cause in cause_chain(error)):
                error.add_note(COMPILE_FAILURE_NOTE)  # inductor's InductorError is a BackendCompilerFailed too
            raise
    return run


def explains_out_of_memory(main):
    """Decorates a script's main(args): the GPU running out of memory ends the run with one line that names the
    flag to lower, exit status 2, instead of a traceback. A training step's memory grows with its chunk (at most
    --max_device_batch_size images, and at most each process's share of --batch_size), evaluation's with its own
    chunks of 4× the flag. torch.compile may raise the error wrapped in one of its own: the chain of causes is
    searched, and its innermost match gives the detail (a wrapper may quote the error in a message of its own).
    cuBLAS and cuDNN, which make some allocations of their own, report it as a RuntimeError naming their status
    (OUT_OF_MEMORY_STATUSES), and that counts too. NCCL's own report ("unhandled cuda error") does not say what
    failed, so it stays as it is."""
    @functools.wraps(main)
    def run(args):
        try:
            return main(args)
        except Exception as error:
            matches = [cause for cause in cause_chain(error) if _out_of_memory(cause)]
            if not matches:
                raise
            cause = matches[-1]
            detail = str(cause).strip().splitlines()[0][:160] if str(cause).strip() else "no detail"
            training = hasattr(args, "batch_size")  # bench.py has a batch size per phase, and times these chunks
            chunk = device_chunk(args) if training else args.max_device_batch_size
            die(f"--max_device_batch_size {args.max_device_batch_size}: out of GPU memory in chunks of {chunk} images "
                f"({detail}); pass a value below {chunk}" + (": the gradients accumulate over the chunks, so the "
                                                             "result does not depend on it" if training else ""))
    return run


def attention_choice(cfg: MAEConfig, name: str, device: torch.device, amp_dtype,
                     class_token_query: bool = False, decoder: bool = False) -> str:
    """The kernel attention runs with at the encoder's full shapes (1 + N tokens, with gradients) under
    --attention `name`, as torch's dispatcher picks it; one-line death, before a run would meet it, when the named
    kernel cannot run them, or, if asked, the class token's query alone over the 1 + N keys (the last block of a
    model pooled on the class token: model.Block's `queries`), or the decoder's heads (whose width may differ), all
    1 + N tokens' queries and, in its last block in training, the masked tokens' alone."""
    def tokens(length, heads, dim):  # (batch, heads, length, head dim)
        return torch.zeros(1, heads, length, dim // heads, device=device, dtype=amp_dtype or torch.float32,
                           requires_grad=True)
    k = tokens(1 + cfg.num_patches, cfg.num_heads, cfg.embed_dim)
    others = [(tokens(1, cfg.num_heads, cfg.embed_dim), k)] if class_token_query else []
    if decoder:
        k_decoder = tokens(1 + cfg.num_patches, cfg.decoder_num_heads, cfg.decoder_embed_dim)
        others.append((k_decoder, k_decoder))
        num_masked = num_masked_patches(cfg.num_patches, cfg.mask_ratio)
        if num_masked:
            others.append((tokens(num_masked, cfg.decoder_num_heads, cfg.decoder_embed_dim), k_decoder))
    for q, keys in [*others, (k, k)]:  # the encoder's last: its choice is the one returned
        try:
            with attention_kernel(name):
                choice = torch._fused_sdp_choice(q, keys, keys)
        except RuntimeError as e:  # none of the allowed kernels fits these shapes, dtype and device
            die(f"--attention {name} cannot run on {device} at head dim {keys.shape[-1]} in {keys.dtype} "
                f"({str(e).splitlines()[0]}); choose auto or another kernel")
    return SDPBackend(choice).name.lower()


def resolve_device(args) -> torch.device:
    """--device as a torch.device (its default filled in args); under torchrun each process takes the GPU of its
    local rank."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cpu" and dist_env()[0] == 0:  # a torch without CUDA, or no driver, is a common surprise
            warn("no CUDA GPU is available (torch.cuda.is_available() is False), so this runs on the CPU, far more "
                 "slowly; pass --device cpu to run there without this warning")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        die(f"--device {args.device}: CUDA is not available on this machine (use --device cpu)")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    # cpu:N parses, but torch has one CPU device: an N would be ignored.
    if device is None or device.type not in ("cuda", "cpu") or (device.type == "cpu" and device.index is not None):
        die(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if device.type == "cuda" and dist_env()[1] > 1:
        device = torch.device("cuda", dist_env()[2])
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            die(f"--device {args.device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        # The current device too: what names no device (CUDA events, streams, bench.py's timing) follows it.
        torch.cuda.set_device(device)
    return device


def default_precision(device: torch.device) -> str:
    """fp32 on the CPU, where bf16 autocast is slow. On CUDA bf16 where the GPU has bf16 arithmetic; on older GPUs
    (V100, T4, RTX 20 series) fp16 with a grad scaler, the MAE paper's own precision: there bf16 runs emulated,
    slower than fp32, and inductor leaves graphs with bf16 tensors uncompiled."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16(device) else "fp16"


def native_bf16(device: torch.device) -> bool:
    # torch.cuda.is_bf16_supported() answers True on these older GPUs too: it counts emulation.
    return torch.cuda.get_device_capability(device)[0] >= 8  # Ampere (A100, RTX 30 series) and later


def autocast_dtype(args, device: torch.device):
    """The autocast dtype, or None for plain fp32. The CPU defaults to fp32: bf16 autocast is slow there."""
    precision = args.precision or default_precision(device)
    if precision == "fp16" and device.type != "cuda":
        die("--precision fp16 needs --device cuda (use bf16 or fp32 on the CPU)")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def autocast(device: torch.device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def compile_enabled(args, device: torch.device) -> bool:
    """Whether to torch.compile: --compile (default on CUDA) where it can work; one warning, and eager, where not.

    torch.compile itself is lazy and only fails at the first call, so what it needs is checked up front:
    TorchDynamo support for this Python and platform, Triton for CUDA kernels, a C++ compiler for CPU ones.
    """
    if not compile_requested(args, device):
        return False
    reason = _compile_unavailable(device)
    if reason:
        if dist_env()[0] == 0:  # once per run, in one line
            warn(f"torch.compile is unavailable ({reason}); running eager")
        return False
    return True


def compile_requested(args, device: torch.device) -> bool:
    """--compile, or its default: on for CUDA, off for the CPU."""
    return args.compile if args.compile is not None else device.type == "cuda"


def resolve_runtime(args, device: torch.device) -> None:
    """Fill the defaults of --precision, --compile, --capture_step and --compile_mode in place, so that args.json
    and the printed config name what runs: --compile becomes whether torch.compile will run (compile_enabled: False,
    after one warning, where it cannot work). A compile mode or scope given without compilation is refused.

    On CUDA a compiled step runs as CUDA graphs: the step's own (--capture_step, the default where it can run), or
    torch's (reduce-overhead, the default mode without it). Without graphs a ViT-T step is bound by the
    host launching its kernels one by one (bench.py on an H200, 2026-11-28: 80.4 ms per pretraining step at batch
    512 in the default mode, 21.6 ms with CUDA graphs; 26.8 ms and 9.6 ms per fine-tuning step at 128). Under
    torchrun too: each process compiles the one-GPU model and averages the gradients itself (average_gradients),
    so no DistributedDataParallel comes between the graphs and the all-reduce."""
    if not compile_requested(args, device):
        # Taken without compilation, these would do nothing and still be recorded in args.json as if they had.
        for flag, value, inert in (("--compile_mode", args.compile_mode, (None, "default")),
                                   ("--compile_scope", args.compile_scope, ("model",))):
            if value not in inert:
                die(f"{flag} {value} needs compilation, which is off (pass --compile)")
    args.precision = args.precision or default_precision(device)
    if args.precision == "bf16" and device.type == "cuda" and not native_bf16(device) and dist_env()[0] == 0:
        warn(f"--precision bf16: {torch.cuda.get_device_name(device)} has no bf16 arithmetic (compute capability "
             f"below 8.0), so it runs emulated, slower than fp32, and torch.compile leaves its graphs eager; "
             f"fp16, this GPU's default, does neither")
    args.compile = compile_enabled(args, device)
    if args.capture_step is None:
        # On where the step would otherwise replay torch's CUDA graphs, which it beats (StepGraphs' H200 numbers).
        # A --compile_mode given keeps its own graphs or none; fp16's grad scaler cannot be captured.
        args.capture_step = (device.type == "cuda" and args.compile and args.compile_mode is None
                             and args.precision != "fp16")
    if args.capture_step:
        check_capture_step(args, device)
    if args.compile_mode is None:
        trees = device.type == "cuda" and args.compile and not args.capture_step
        args.compile_mode = "reduce-overhead" if trees else "default"


def check_capture_step(args, device: torch.device) -> None:
    """One-line death where --capture_step cannot run (call with --precision resolved)."""
    if args.compile_mode in ("reduce-overhead", "max-autotune"):
        # torch's CUDA-graph trees would capture inside StepGraphs' capture, which CUDA does not allow.
        die(f"--capture_step captures CUDA graphs of its own; --compile_mode {args.compile_mode} adds torch's: "
            "use default or max-autotune-no-cudagraphs")
    if device.type != "cuda":
        die(f"--capture_step captures CUDA graphs: it needs a CUDA device, not {device}")
    if args.precision == "fp16":
        die("--capture_step: fp16's grad scaler reads its overflow check back to the host every step, which a "
            "captured step cannot; use --precision bf16 or fp32")


def compile_model(model: torch.nn.Module, args) -> torch.nn.Module:
    """torch.compile the model per --compile_mode and --compile_scope (call where args.compile says so, once
    resolve_runtime has resolved it)."""
    mode = None if args.compile_mode == "default" else args.compile_mode
    if args.compile_scope == "model":
        return torch.compile(model, mode=mode)
    # Regional compilation: each block compiled in place (its state_dict keys unchanged). All blocks of one shape
    # share a graph (model.DropPath keeps the drop rates out of it); dynamic=False gives the encoder and the
    # decoder, whose token counts differ, a static graph each.
    for block in (m for m in model.modules() if isinstance(m, Block)):
        block.compile(mode=mode, dynamic=False)
    return model


def _compile_unavailable(device: torch.device):
    """Why torch.compile cannot work here, or None. Only these known causes fall back to eager: any other error
    (a bug of ours, or the compiler rejecting the model) should surface as one, not as a warning."""
    import torch._dynamo
    from torch.utils._triton import has_triton
    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    if device.type == "cuda" and not has_triton():  # also False on GPUs Triton does not support: before Volta
        return "Triton is not installed, or does not support this GPU (compute capability below 7.0)"
    if device.type == "cpu" and not _has_cpp_compiler():
        return "inductor finds no C++ compiler for CPU code"
    return None


@contextlib.contextmanager
def eager():
    """A context (or decorator) in which compiled code runs eagerly. Evaluation runs in it: compiled, it would
    compile again (for no_grad, and for a last partial batch) at a cost far above what it saves, and with
    --compile_scope blocks the evaluated model's blocks are the compiled ones. The stance is set on entry, not when
    a module decorates a function with it: set_stance imports torch._dynamo, about 2.5 s of a process's start-up on
    a 2-core CPU, which an eager run would otherwise pay for nothing."""
    with torch.compiler.set_stance("force_eager"):
        yield


def _has_cpp_compiler() -> bool:
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        get_cpp_compiler()  # raises when none of the compilers it searches for is installed
        return True
    except Exception:
        return False


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seed torch's RNGs (masks, augmentation) and numpy's (timm's Mixup draws from it) from (seed, epoch, rank):
    a resumed run draws exactly what an uninterrupted one would, with no RNG state to carry in the checkpoint."""
    value = seed * 1_000_003 + epoch * 1009 + rank
    torch.manual_seed(value)
    np.random.seed(value % 2 ** 32)


# ----------------------------------------------------------------------------------------------------------
# Files: everything is written to a temporary name and renamed, so a kill never leaves a broken file

def to_cpu(obj):
    """A copy of a nest of dicts, lists and tensors with every tensor copied to the CPU: a snapshot that later
    in-place updates (the next optimizer step) cannot change."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class BackgroundWriter:
    """Runs the per-epoch file writing (figures, logs, checkpoints) on one thread, in order, so the GPU goes on
    with the next epoch meanwhile. Jobs must get CPU snapshots only (to_cpu). submit() first waits for the
    previous job, which has had a whole epoch to finish, and re-raises its error; close() waits for the last."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pending = None

    def submit(self, fn, *args) -> None:
        self.wait()
        self._pending = self._pool.submit(fn, *args)

    def wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def close(self) -> None:
        self.wait()
        self._pool.shutdown()


def exit_on_stop_signals() -> None:
    """Make SIGTERM (a scheduler's time limit, torchrun stopping its workers) and SIGINT (Ctrl-C) end the script as
    an exception does: the interpreter exits normally, so the BackgroundWriter's thread finishes the epoch outputs
    it holds (SIGTERM's default handler kills the process mid-job and the last finished epoch would be lost). One
    line says so, in place of Ctrl-C's traceback; exit status 128 + the signal's number, as a shell reports a
    process the signal ended (143, 130)."""
    def stop(signum, frame):
        # tqdm.write: on a line of its own, not after the progress bar's
        tqdm.write(f"{os.path.basename(sys.argv[0])}: stopped by {signal.Signals(signum).name}: the files hold every "
                   "finished epoch", file=sys.stderr)
        sys.exit(128 + signum)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside `path`, with its extension (np.save, savefig and PIL choose the format by it),
    to write the whole file under; rename it to `path` when the block ends, so that a reader, or a run stopped
    mid-write, never sees half a file and the file before stays whole until then. If the block fails, the
    temporary file is deleted. The name is new for each call: a stale file or folder, or another writer of the
    same path, never collides with it."""
    stem, ext = os.path.splitext(path)
    # The stem is cut short, so that the temporary name is not longer than the file system takes when the name
    # itself is close to it (50 characters of it still say whose temporary file a leftover one is).
    folder, name = os.path.split(stem)
    tmp = os.path.join(folder, f"{name[:50]}.tmp-{os.getpid()}-{secrets.token_hex(4)}{ext}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_copy(src: str, dst: str) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def save_npy(path: str, values, dtype=np.float64) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, np.asarray(values, dtype=dtype))


def save_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)


def write_jsonl(path: str, records: list) -> None:
    """Rewrite the whole log: on resume it then holds exactly the epochs the checkpoint has, once each."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def remove_epoch_files(folder: str, prefix: str, suffix: str, after: int) -> None:
    """Remove the files <prefix><epoch><suffix> in `folder` (an epoch's figure) whose epoch is past `after`, the
    last epoch this run holds (-1 for a new run): a run writes them epoch by epoch, so these are an earlier run's in
    the same folder, which would sit among this run's as its own. A folder that cannot be listed keeps them."""
    epoch_file = re.compile(re.escape(prefix) + "([0-9]+)" + re.escape(suffix))
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        match = epoch_file.fullmatch(name)
        if match and int(match.group(1)) > after:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def read_jsonl(path: str, flag: str) -> list:
    """The records of a per-epoch log (each a dict with an int "epoch"); [] if there is none; one-line death,
    naming the flag, if it is not such a log."""
    if not os.path.exists(path):
        return []
    if not os.path.isfile(path):  # a fifo would block the read for ever
        die(f"{flag}: {path!r} is not a regular file")
    try:
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError) as e:  # unreadable, not JSON, not text
        die(f"{flag}: {path!r} is not a readable JSON-lines log ({type(e).__name__}: {str(e)[:80]})")
    if not all(isinstance(r, dict) and type(r.get("epoch")) is int for r in records):  # bool is an int to isinstance
        die(f"{flag}: {path!r} is not a per-epoch log (every line must be an object with an integer 'epoch')")
    return records


def resumed_log(path: str, epoch: int, holds, what: str, folder_flags: str) -> list:
    """The records of a run's per-epoch log up to its --resume checkpoint's epoch, or one-line death unless they are
    epochs 1 to `epoch`, each taken by holds(record) for the checkpoint's: the resumed run goes on from them, so a
    log of another folder or run (a resume into another --output_dir) would leave it disagreeing with itself."""
    log = [r for r in read_jsonl(path, "--output_dir") if r["epoch"] <= epoch]
    if [r["epoch"] for r in log] != list(range(1, epoch + 1)) or not all(map(holds, log)):
        die(f"--resume: {path!r} does not hold epochs 1 to {epoch} of the checkpoint with {what} (is {folder_flags} "
            "that run's?)")
    return log


def weights_digest(state_dict: dict) -> str:
    """SHA-256 of a state_dict's names, dtypes, shapes and bytes: which weights a checkpoint holds, whatever its
    file's name and wherever it lies."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encoder_digest(mae_state: dict) -> str:
    """weights_digest of an MAE state_dict's encoder: what a fine-tune starts from, named the same way by
    mae_pretrain.py when it finishes and by train_classifier.py when it loads the checkpoint."""
    return weights_digest({name: t for name, t in mae_state.items() if name.startswith("encoder.")})


def check_resumable(ckpt: dict, args, run_defining_flags) -> None:
    """One-line death unless the --resume checkpoint ran under this run's values of the flags that define a run,
    and has epochs left to run (before --stop_after, when given)."""
    if ckpt["epoch"] < 1:  # checkpoints are written after an epoch: this one was edited, or is another program's
        die(f"--resume {args.resume!r} records epoch {ckpt['epoch']}, but a run's checkpoint follows epoch 1 or later")
    for name in run_defining_flags:
        given = getattr(args, name)
        if name not in ckpt["args"]:  # written before the flag existed, or edited: its value is unknown
            die(f"--resume {args.resume!r} does not record --{name} (this run has {given}), so it cannot be shown "
                "to continue this run's schedule; start the run afresh")
        saved = ckpt["args"][name]
        if saved != given:
            die(f"--resume {args.resume!r} was trained with --{name} {saved}, this run has {given}: pass the same "
                "value to continue its schedule")
    if ckpt["epoch"] >= args.total_epoch:
        die(f"--resume {args.resume!r} has already finished all {args.total_epoch} epochs")
    # Else the run would train nothing, say nothing, and still rewrite its args.json.
    if args.stop_after and args.stop_after <= ckpt["epoch"]:
        die(f"--stop_after {args.stop_after} is not after epoch {ckpt['epoch']}, where --resume {args.resume!r} "
            "stopped: no epoch would run; pass a later epoch, or 0 to run to --total_epoch")


def load_checkpoint(path: str, flag: str, fields: dict, optional: dict | None = None) -> dict:
    """Load a checkpoint safely (weights_only: plain tensors and containers, no code runs) or die in one line
    naming the flag. `fields` maps each key it must hold to the type (or tuple of types) of its value; `optional`
    does the same for keys it may lack. A value of the wrong type (a hand-edited file, another program's) would
    otherwise fail far from here, in a comparison or a loop, with a traceback."""
    if os.path.isdir(path):
        die(f"{flag} {path!r} is a folder, not a file")
    if not os.path.isfile(path):
        die(f"{flag} {path!r}: no such file")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (an old torch, a bare pickle); anything else fails in torch.load with an
    # error that names a byte or a weights_only setting, not the cause.
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        die(f"{flag} {path!r}: not a torch checkpoint (torch.save writes a zip archive; this file starts "
            f"{head!r})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, truncated, or holds pickled objects
        die(f"{flag} {path!r}: not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    if not isinstance(ckpt, dict):
        die(f"{flag} {path!r}: not a checkpoint of this project (expected a dict, found {type(ckpt).__name__})")
    missing = [k for k in fields if k not in ckpt]
    if missing:
        die(f"{flag} {path!r}: not a checkpoint of this project (missing {', '.join(missing)})")
    checked = [*fields.items(), *(optional or {}).items()]
    wrong = [f"its {key} is of type {type(ckpt[key]).__name__}, not {_type_names(kind)}"
             for key, kind in checked if key in ckpt and not _is_a(ckpt[key], kind)]
    if wrong:
        die(f"{flag} {path!r}: not a checkpoint of this project ({'; '.join(wrong)})")
    # A weight of NaN or infinity (a damaged file) would train into a non-finite loss an epoch later, whose message
    # blames the learning rate. The scripts stop a run at a non-finite loss, before that epoch's checkpoint.
    broken = [str(name) for name, value in ckpt.get("model", {}).items()
              if isinstance(value, torch.Tensor) and value.is_floating_point() and not value.isfinite().all()]
    if broken:
        die(f"{flag} {path!r}: its weights hold NaN or infinite values ({', '.join(broken[:3])}"
            f"{f' and {len(broken) - 3} more' if len(broken) > 3 else ''}): a damaged file")
    return ckpt


def _is_a(value, kind) -> bool:
    """isinstance, except that a bool is not an int: True is no epoch or class count."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)


def is_number(value) -> bool:
    """An int or float a float can hold: a value a curve can hold. Not a bool, nor an int past 1.8e308 (JSON and
    pickles take any int; float() of it raises OverflowError)."""
    if not _is_a(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:
        return False
    return True


def _type_names(kind) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def load_state_dict_checked(module: torch.nn.Module, state) -> str:
    """module.load_state_dict(state), each key and size checked: '' when it loaded, else what does not fit, in a few
    words for a one-line error. A module on the meta device (a check with no memory) takes the state's tensors by
    assignment: copying into a meta tensor does nothing but warn."""
    if not isinstance(state, dict):
        return f"its weights are a {type(state).__name__}, not a state_dict"
    # load_state_dict fails on a key that is no name; a meta tensor has no values to copy; a complex one is taken
    # whole into a model on the meta device, and loses its imaginary part, with a warning, into a real one.
    odd = [key for key, value in state.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor)
           or value.is_meta or value.is_complex()]
    if odd:
        return f"entries that are not a name with a real tensor of values: {', '.join(map(repr, odd[:3]))}"
    meta = any(t.is_meta for t in module.state_dict().values())
    try:
        result = module.load_state_dict(state, strict=False, assign=meta)
    except RuntimeError as e:  # a size mismatch (odd entries were refused above)
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()] or str(e).splitlines()
        return lines[0][:200]
    return "; ".join(f"{len(keys)} {label}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                     for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
                     if keys)


def check_resume_state(ckpt: dict, args, model: torch.nn.Module, param_groups: list) -> None:
    """One-line death unless the --resume checkpoint's weights load into `model` (built on the meta device) and its
    optimizer state has the groups of `param_groups`, of as many parameters each, as torch's load_state_dict wants.
    A checkpoint of an older version of this code or a hand-edited one would otherwise fail there with a traceback,
    once the run had rewritten its args.json."""
    mismatch = load_state_dict_checked(model, ckpt["model"])
    if mismatch:
        die(f"--resume {args.resume!r}: its weights do not fit this model ({mismatch})")
    saved = ckpt["optimizer"]
    # Checked by type, not by trying: a tensor where a dict or list belongs takes a name as an index and raises
    # IndexError, and has a len().
    readable = (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
                and isinstance(saved.get("param_groups"), list)
                and all(isinstance(group, dict) and isinstance(group.get("params"), list)
                        for group in saved["param_groups"]))
    if not readable:
        die(f"--resume {args.resume!r}: its optimizer state is not an optimizer's state_dict")
    saved_sizes = [len(group["params"]) for group in saved["param_groups"]]
    sizes = [len(group["params"]) for group in param_groups]
    if saved_sizes != sizes:
        die(f"--resume {args.resume!r}: its optimizer state does not fit this run's optimizer (parameters per group: "
            f"{saved_sizes}, this run's {sizes})")
    # AdamW's own hyperparameters come from the saved groups (torch fills in only the keys newer versions added).
    for group in saved["param_groups"]:
        if missing := [key for key in ("lr", "betas", "eps", "weight_decay") if key not in group]:
            die(f"--resume {args.resume!r}: its optimizer state has a parameter group without {', '.join(missing)}")
    # Each parameter's moments must have its shape: the fused step reads them at the parameter's size, and one of
    # another size was a segmentation fault (or memory silently overwritten) an epoch into the run.
    for saved_group, group in zip(saved["param_groups"], param_groups):
        for index, param in zip(saved_group["params"], group["params"]):
            moments = saved["state"].get(index, {})
            if not isinstance(moments, dict):
                die(f"--resume {args.resume!r}: its optimizer state for parameter {index} is not a dict")
            for name, value in moments.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                    die(f"--resume {args.resume!r}: its optimizer state's {name} of parameter {index} has shape "
                        f"{tuple(value.shape)}, the parameter {tuple(param.shape)}")


# ----------------------------------------------------------------------------------------------------------
# Figures

def save_recon_figure(path: str, masked, recon, original, title: str = "", ncol: int = 8, scale: int = 3) -> None:
    """Three panels, each a grid of the same images: masked input, reconstruction (visible patches pasted
    back), original; the title above. Images are (B, 3, H, W) floats in [0, 1], drawn `scale` times enlarged.

    Drawn with PIL rather than matplotlib: pretraining writes one every epoch from the background thread, and the
    training loop on the main thread, which launches the GPU's work, loses what the figure holds of the GIL:
    105 to 122 ms per figure with matplotlib, 6 ms with PIL, on this repository's 2-core CPU (README, Speed: The
    fast path learns as the plain one does)."""
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import make_grid

    try:
        font = ImageFont.load_default(size=14)  # a scalable font: Pillow >= 10.1 with FreeType
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    panels = [("masked input", masked), ("reconstruction (visible patches pasted back)", recon),
              ("original", original)]
    grids = [Image.fromarray(make_grid(imgs.float().cpu().clamp(0, 1), nrow=ncol, padding=1, pad_value=1.0)
                             .mul(255).round().byte().permute(1, 2, 0).numpy()) for _, imgs in panels]
    w, h = grids[0].width * scale, grids[0].height * scale
    line, margin = 24, 10  # a text line's height, the border
    # As wide as the widest line of text too: a val set of a few images makes a grid narrower than the title.
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(w, *(math.ceil(measure.textlength(text, font=font)) for text in (title, *(n for n, _ in panels))))
    canvas = Image.new("RGB", (width + 2 * margin, line + 3 * (line + h) + margin), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((canvas.width // 2, 4), title, fill="black", font=font, anchor="ma")
    for i, ((label, _), grid) in enumerate(zip(panels, grids)):
        top = line + i * (line + h)
        draw.text((canvas.width // 2, top + 4), label, fill="black", font=font, anchor="ma")
        canvas.paste(grid.resize((w, h), Image.NEAREST), ((canvas.width - w) // 2, top + line))
    with atomic_path(path) as tmp:
        canvas.save(tmp)


def recon_grid_tensor(masked, recon, original, ncol: int = 8) -> torch.Tensor:
    """The same three panels as one (3, H, W) image for TensorBoard."""
    from torchvision.utils import make_grid
    grids = [make_grid(x.float().cpu(), nrow=ncol, padding=1, pad_value=1.0) for x in (masked, recon, original)]
    return torch.cat(grids, dim=1)


# ----------------------------------------------------------------------------------------------------------
# Monitoring representations during pretraining

def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-nearest-neighbour classification, the usual self-supervised protocol (Wu et al. 2018, DINO).

    bank (M, D) and queries (Q, D) are L2-normalised features, so a dot product is the cosine similarity.
    Each query's k most similar bank entries vote for their label with weight exp(similarity / temperature).
    Queries go in chunks so the (chunk, M) similarity matrix stays small. Returns (Q,) predicted labels.
    """
    k = min(k, bank.shape[0])
    preds = []
    for q in queries.split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (q, k)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=sim.dtype)
        # Weights relative to the nearest neighbour's (topk sorts): the vote is unchanged, and exp cannot overflow
        # at a small temperature (exp(1 / 0.01) already does in fp32).
        votes.scatter_add_(1, bank_labels[idx], ((sim - sim[:, :1]) / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning

def layer_decay_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float, num_blocks: int) -> list:
    """Optimizer groups with layer-wise lr decay (BEiT, MAE fine-tuning): pretrained lower layers hold general
    features and move less. A parameter at layer id d gets lr_scale layer_decay ** (num_blocks + 1 - d), where d
    is 0 for the patch embedding and class token, i + 1 for transformer block i (a name with 'blocks.<i>.') and
    num_blocks + 1 for everything after the blocks (final norm, head), which keeps the full lr. Weight decay
    follows weight_decay_groups; frozen parameters are left out. Parameters with the same lr scale and weight
    decay share a group: the fused AdamW runs once per group, and each group costs host time and launches every
    step, so layer_decay 1 gives two groups, not one per layer and decay."""
    decayed = {id(p) for p in weight_decay_groups(model, weight_decay)[0]["params"]}
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        block = re.search(r"(?:^|\.)blocks\.(\d+)\.", name)
        if block:
            layer_id = int(block.group(1)) + 1
        elif any(part in name for part in ("patch_embed", "cls_token")):
            layer_id = 0
        else:
            layer_id = num_blocks + 1
        lr_scale = layer_decay ** (num_blocks + 1 - layer_id)
        decay = weight_decay if id(p) in decayed else 0.0
        groups.setdefault((lr_scale, decay), {"params": [], "weight_decay": decay, "lr_scale": lr_scale})
        groups[(lr_scale, decay)]["params"].append(p)
    return list(groups.values())


# Okabe-Ito colours, distinguishable with every common colour-vision deficiency: the prediction grids' here, and
# plot_results' figures'.
BLUE, ORANGE, GREEN, VERMILLION, PURPLE = "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7"
# A right prediction's title, a wrong one's: blue and vermillion, which readers with a red-green colour deficiency
# tell apart, and a mark that a greyscale print keeps (matplotlib's red and green are equally grey).
RIGHT_COLOUR, WRONG_COLOUR = BLUE, VERMILLION


def prediction_grid(images, predicted, true, classes, title: str = "", ncol: int = 4):
    """A matplotlib Figure of images (B, 3, H, W) in [0, 1], each titled '✓ <predicted>' when right and
    '✗ <predicted> (true: <true>)' when wrong; under `title`, how many of the images shown are right."""
    # matplotlib's object API, not pyplot: pyplot keeps global state and this runs in a background thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    nrow = math.ceil(len(images) / ncol)
    fig = Figure(figsize=(2.2 * ncol, 2.3 * nrow + 0.7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    right = 0
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(images):
            continue
        p, t = int(predicted[i]), int(true[i])
        right += p == t
        ax.imshow(images[i].float().cpu().permute(1, 2, 0).numpy(), interpolation="nearest")
        text = f"✓ {classes[p]}" if p == t else f"✗ {classes[p]} (true: {classes[t]})"
        ax.set_title(text, fontsize=8, color=RIGHT_COLOUR if p == t else WRONG_COLOUR)
    # A title wider than its column (CIFAR-100's "✗ computer_keyboard (true: lawn_mower)") would run into its
    # neighbours': the true class goes on a line of its own, and the rows grow by that line so that the images keep
    # their size. A name wider than the column on its own (a folder's long class name) is set smaller.
    renderer = fig.canvas.get_renderer()
    column = 0.95 * fig.bbox.width / ncol

    def width(ax):
        return ax.title.get_window_extent(renderer).width
    wrapped = [ax for ax in axes.flat if width(ax) > column and " (true: " in ax.get_title()]
    for ax in wrapped:
        ax.title.set_text(ax.get_title().replace(" (true: ", "\n(true: "))
    for ax in axes.flat:
        if width(ax) > column:
            ax.title.set_fontsize(8 * column / width(ax))
    if wrapped:
        fig.set_size_inches(2.2 * ncol, 2.5 * nrow + 0.7)
    shown = f"{right} of these {len(images)} predicted right (✓), {len(images) - right} wrong (✗)"
    fig.suptitle(f"{title}\n{shown}" if title else shown, fontsize=11)
    fig.tight_layout()
    return fig


def save_prediction_grid(path: str, images, predicted, true, classes, title: str = "", ncol: int = 4) -> None:
    """prediction_grid's figure, saved as a PNG."""
    fig = prediction_grid(images, predicted, true, classes, title, ncol)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=150)


# ----------------------------------------------------------------------------------------------------------
# Several processes (torchrun): rank 0 writes, everyone computes

def dist_env():
    """(rank, world_size, local_rank) from torchrun's environment variables; (0, 1, 0) for a plain run."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: torch.device) -> None:
    """Join torchrun's process group: NCCL between GPUs, gloo on the CPU. A plain run does nothing."""
    if dist_env()[1] > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def close_distributed() -> None:
    """Leave the process group once every rank's collectives have finished.

    gloo's worker threads free each finished collective after its caller has moved on, and freeing a collective's
    last reference to a Python tensor takes the GIL, which the main thread holds while it destroys the group and
    joins those threads: a deadlock at exit, in one rank of a 2-process CPU run. With only a barrier here torch
    2.6 hung in 7 of 30 such runs; with a last all-reduce of a tensor Python keeps until the group is gone, and 50
    ms without the GIL for the workers to finish, in none of 90 (this repository's CPU machine, 2026-11-28)."""
    if dist.is_initialized():
        done = torch.zeros(1, device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(done)
        time.sleep(0.05)  # releases the GIL
        dist.destroy_process_group()
        del done  # only now: its collective's last reference was not the worker's


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place); identity for a single process."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_processes(ok: bool, device: torch.device) -> bool:
    """Whether `ok` holds on every process (ok itself for a single process). Reads the result back: for start-up
    decisions, not for the training loop."""
    if not dist.is_initialized():
        return ok
    return all_reduce_sum(torch.tensor(float(not ok), device=device)).item() == 0


def all_gather_cat(t: torch.Tensor, n: int) -> torch.Tensor:
    """Concatenate every rank's shard (t holds this rank's shard(n, rank, world_size) rows) along dim 0, in
    rank order, back into all n rows. The shard sizes follow from n, so nothing is read back to the host."""
    if not dist.is_initialized():
        return t
    world_size = dist.get_world_size()
    sizes = [len(range(n)[shard(n, rank, world_size)]) for rank in range(world_size)]
    padded = torch.zeros(max(sizes), *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[:t.shape[0]] = t  # all_gather needs equal shapes
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def shard(n: int, rank: int, world_size: int) -> slice:
    """This rank's contiguous share of n items; the shares are disjoint and cover all n."""
    return slice(n * rank // world_size, n * (rank + 1) // world_size)


def shard_chunks(n: int, chunk: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """This process's shard of range(n), in order, as index tensors on `device` of at most `chunk` items each:
    how every evaluation walks a split, so that gathering the shards in rank order restores the split's order."""
    # A chunk past the split is the split (and split() takes no size past int64: 4 x --max_device_batch_size 2**61).
    return torch.arange(n, device=device)[shard(n, *dist_env()[:2])].split(max(1, min(chunk, n)))


@torch.no_grad()
def embed_all(fn, images: torch.Tensor, batch_size: int, amp_dtype, device: torch.device) -> torch.Tensor:
    """fn (normalised images -> (B, D) features) over every uint8 image, in batches, as float32 on `device`
    (the images may live on the host). Each process embeds its shard and the shards are gathered, so every
    process gets all N rows."""
    feats = []
    for chunk_idx in shard_chunks(len(images), batch_size, images.device):
        with autocast(device, amp_dtype):
            feats.append(fn(data.normalize(data.take(images, chunk_idx, device))).float())
    return all_gather_cat(torch.cat(feats), len(images))
