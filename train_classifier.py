"""Fine-tune a ViT classifier on CIFAR-10 from scratch or from an MAE-pretrained encoder, or linearly probe one.

The reference comparison (one GPU each; outputs go to cls_outputs/ prefixed `scratch_` and `pretrained_`):
    python train_classifier.py --total_epoch 50 --batch_size 128 --max_device_batch_size 128 \
        --output_model_path vit-t-classifier-from_scratch.pt
    python train_classifier.py --total_epoch 50 --batch_size 128 --max_device_batch_size 128 \
        --pretrained_model_path vit-t-mae-150ep.pt --output_model_path vit-t-classifier-from_pretrained.pt
Both run the MAE fine-tuning recipe by default; for the reference's own run (no augmentation) add `--recipe plain`
to both, with outputs of their own (README, Fine-tuning: `--output_dir`, `--log_dir`, `--output_model_path`).
Representation quality without fine-tuning (frozen encoder, linear head on the class token):
    python train_classifier.py --linear_probe --pretrained_model_path vit-t-mae-150ep.pt \
        --output_model_path vit-t-linprobe.pt
Several GPUs or nodes (--batch_size stays the global batch), e.g.:
    torchrun --nproc_per_node=4 train_classifier.py --total_epoch 50 --batch_size 128 --max_device_batch_size 32 \
        --pretrained_model_path vit-t-mae-150ep.pt --output_model_path vit-t-classifier-from_pretrained.pt
A tiny CPU run that needs no files (seconds):
    python train_classifier.py --device cpu --dataset fake --fake_size 256 --total_epoch 2 --warmup_epoch 1 \
        --batch_size 64 --max_device_batch_size 32 --depth 2 --embed_dim 64 --num_heads 2 --patch_size 4 \
        --output_model_path /tmp/cls.pt --output_dir /tmp/cls_out --log_dir /tmp/cls_logs
"""
import argparse
import contextlib
import dataclasses
import glob
import math
import os
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import data
import utils
from model import MAE, POOLS, MAEConfig, ViTClassifier, count_params, encoder_state_from_mae

# Every recipe part is a flag; a flag given on the command line overrides the recipe's value.
# finetune: the MAE paper's fine-tuning recipe (He et al. 2021, appendix A.2: mixup 0.8, cutmix 1.0, label
# smoothing 0.1, drop path 0.1, random erasing 0.25, 5 warmup epochs, layer decay 0.65-0.75) scaled to CIFAR: the
# standard 4-pixel padded crop + flip in place of RandomResizedCrop, and TrivialAugment (Mueller & Hutter 2021,
# which matches or beats RandAugment on CIFAR without a magnitude to tune) in place of RandAugment(9, 0.5).
# These values come from the literature; they were not tuned here (no GPU was available when this was written).
# plain: the reference implementation's run, no augmentation or regularisation, its lr schedule.
RECIPES = {
    "finetune": dict(crop_padding=4, hflip=True, auto_augment="trivial", mixup=0.8, cutmix=1.0,
                     label_smoothing=0.1, drop_path=0.1, layer_decay=0.75, random_erase=0.25,
                     schedule="warmup_cosine"),
    "plain": dict(crop_padding=0, hflip=False, auto_augment="none", mixup=0.0, cutmix=0.0, label_smoothing=0.0,
                  drop_path=0.0, layer_decay=1.0, random_erase=0.0, schedule="reference"),
}
RECIPE_FLAGS = tuple(RECIPES["plain"])  # a new recipe part needs a value in each recipe, "off" in plain
# The recipe flags that change the images a model is shown, where the rest change its loss or its optimisation.
IMAGE_FLAGS = ("crop_padding", "hflip", "auto_augment", "mixup", "cutmix", "random_erase")
# Flags that define the run: a checkpoint only resumes under the same values (its schedule, recipe, starting point
# and data). max_device_batch_size, devices and output paths may change; the model must be the checkpoint's.
# The starting point is checked by its weights instead (check_same_start), not by --pretrained_model_path's text.
RUN_DEFINING_FLAGS = ("seed", "batch_size", "base_learning_rate", "weight_decay", "min_lr", "total_epoch",
                      "warmup_epoch", "recipe", *RECIPE_FLAGS, "linear_probe", "global_pool", "dataset", "val_split",
                      "fake_size")
# The linear probe (MAE paper) trains a linear head on frozen features: no augmentation, nothing that regularises
# or schedules the encoder (the plain recipe's values). Its lr schedule still comes from --recipe.
PROBE_SETTINGS = {name: value for name, value in RECIPES["plain"].items() if name != "schedule"}
NUM_VIS = 16  # val images in the prediction grids (4 x 4)
DECODER_FLAGS = ("decoder_embed_dim", "decoder_depth", "decoder_num_heads")  # accepted, unused: no decoder here
CURVES = ("train_loss", "train_acc", "val_loss", "val_acc")  # one value per epoch, each to <run>_<name>.npy
MAX_MIX_ALPHA = 1e300  # --mixup/--cutmix alphas but 0 lie in [1 / this, this] (check_args says why)
# What a run writes in --output_dir, each as <run>_<name>, besides a prediction figure at some epochs,
# <run>_preds_epoch_<epoch>.png.
OUTPUT_NAMES = (*(f"{curve}.npy" for curve in CURVES), "log.jsonl", "summary.json", "val_preds.npy", "val_labels.npy",
                "args.json", "preds_grid.png")


def get_args_parser():
    parser = utils.ArgumentParser(description="ViT classifier on CIFAR-10: from scratch, from MAE, or linear probe")
    # Schedule and optimisation (the reference's flags, same names and meaning; --min_lr only with the
    # warmup_cosine schedule, the reference's goes to 0). --schedule defaults to --recipe's (resolve_recipe).
    utils.add_schedule_args(parser, batch_size=128, max_device_batch_size=128, base_learning_rate=1e-3,
                            total_epoch=100, warmup_epoch=5, schedule=None,
                            draws="the recipe's draws (augmentation, mixup, drop path)")
    # Starting point
    parser.add_argument("--pretrained_model_path", default=None,
                        help="mae_pretrain.py checkpoint whose encoder starts the classifier (default: from scratch)")
    parser.add_argument("--linear_probe", action="store_true",
                        help="freeze the encoder and train only BatchNorm (no affine) + a linear head (without "
                             "--pretrained_model_path: a random encoder, the probe's baseline)")
    parser.add_argument("--global_pool", default="token", choices=POOLS,
                        help="classify the class token (as the reference) or the mean patch token")
    # Recipe: each part below defaults to the recipe's value, or the probe's (no augmentation) with --linear_probe
    parser.add_argument("--recipe", default="finetune", choices=tuple(RECIPES),
                        help="finetune: MAE fine-tuning recipe scaled to CIFAR; plain: the reference (no augmentation)")
    parser.add_argument("--crop_padding", type=int, default=None,
                        help="random crop after padding each side by this many reflected pixels (0: off)")
    parser.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None,
                        help="random horizontal flip")
    parser.add_argument("--auto_augment", default=None, choices=("trivial", "none"),
                        help="TrivialAugmentWide, one random op per image, batched on the device")
    parser.add_argument("--mixup", type=utils.finite_float, default=None, help="mixup alpha (0: off)")
    parser.add_argument("--cutmix", type=utils.finite_float, default=None,
                        help="cutmix alpha (0: off); with mixup too, each chunk uses one of them at random")
    parser.add_argument("--label_smoothing", type=utils.finite_float, default=None, help="label smoothing, in [0, 1)")
    parser.add_argument("--drop_path", type=utils.finite_float, default=None,
                        help="stochastic depth rate of the last block")
    parser.add_argument("--layer_decay", type=utils.finite_float, default=None,
                        help="layer-wise lr decay in (0, 1] (1: off): block i's lr scales by decay**(depth - i)")
    parser.add_argument("--random_erase", type=utils.finite_float, default=None,
                        help="random erasing probability per image")
    # Model size from scratch (ViT-Tiny by default); with --pretrained_model_path the checkpoint's, and a flag
    # given must agree with it. The decoder flags are accepted so that mae_pretrain.py's flags work here too.
    utils.add_model_size_args(parser, vit_t_defaults=False, unused=DECODER_FLAGS)
    # Data
    data.add_data_args(parser)
    # Runtime
    utils.add_runtime_args(parser)
    parser.add_argument("--log_interval", type=int, default=25,
                        help="optimizer steps between progress-bar updates (each reads the loss from the GPU)")
    # Outputs
    parser.add_argument("--output_model_path", default=None,
                        help="the best checkpoint by val accuracy (default: vit-t-classifier-<run>.pt); "
                             "<stem>_last.pt beside it holds the last epoch")
    parser.add_argument("--output_dir", default="cls_outputs",
                        help="<run>_*.npy, <run>_log.jsonl, <run>_summary.json, prediction grids")
    parser.add_argument("--run_name", default=None,
                        help="prefix of every output (default: pretrained, scratch, or linprobe)")
    parser.add_argument("--log_dir", default=None, help="TensorBoard event files (default: logs/classifier/<run>)")
    parser.add_argument("--resume", default="", help="the run's <stem>_last.pt, to continue from its next epoch "
                        "(give the run's other flags again)")
    parser.add_argument("--stop_after", type=int, default=0,
                        help="stop after this epoch, checkpoints kept, e.g. to fit a job's time limit; continue "
                             "with --resume (0: run to --total_epoch)")
    return parser


# ----------------------------------------------------------------------------------------------------------
# Setup: flags, recipe, model

def resolve_recipe(args) -> None:
    """Fill every recipe flag that was not given from the recipe (or from the probe's settings)."""
    if args.layer_decay is None and not args.pretrained_model_path:
        # Layer decay keeps pretrained lower layers near their pretrained values. From scratch there is nothing
        # to keep, and 0.75 ** 13 would leave the patch embedding 2% of the lr, handicapping the baseline and
        # inflating what pretraining seems worth; so the recipe's value applies to pretrained runs only.
        args.layer_decay = 1.0
    for name in RECIPE_FLAGS:
        if getattr(args, name) is None:
            source = PROBE_SETTINGS if args.linear_probe and name in PROBE_SETTINGS else RECIPES[args.recipe]
            setattr(args, name, source[name])
    if args.run_name is None:
        args.run_name = "linprobe" if args.linear_probe else "pretrained" if args.pretrained_model_path else "scratch"
    if args.log_dir is None:
        args.log_dir = os.path.join("logs", "classifier", args.run_name)
    if args.output_model_path is None:  # one per run, as every other output: a comparison's runs keep theirs
        args.output_model_path = f"vit-t-classifier-{args.run_name}.pt"


def check_args(args) -> None:
    """Every flag checked before anything is read or written, so bad input costs nothing."""
    resolve_recipe(args)
    utils.check_schedule_args(args)
    if args.schedule == "reference" and args.min_lr:  # its cosine ends at 0: the flag would be ignored
        utils.die(f"--min_lr {args.min_lr} is for --schedule warmup_cosine; the reference schedule (the plain "
                  "recipe's) ends at 0: pass --schedule warmup_cosine, or leave --min_lr out")
    if args.log_interval < 1:
        utils.die(f"--log_interval must be >= 1, got {args.log_interval}")
    for name in utils.MODEL_SIZE_FLAGS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            utils.die(f"--{name} must be >= 1, got {getattr(args, name)}")
    # numpy's Beta draw at a tiny alpha takes log(U) / alpha, which overflows to a NaN draw (and loss) below about
    # 4e-306 (log(U) >= -745); 1e-300 leaves room, and mixes as 0 would: each draw is 0 or 1. At a huge one the sum
    # of the two alphas overflows (from about 9e307) and every draw is 0, no mixing at all, with no word.
    alpha = (lambda v: v == 0 or 1 / MAX_MIX_ALPHA <= v <= MAX_MIX_ALPHA,
             f"0 (off) or in [{1 / MAX_MIX_ALPHA:g}, {MAX_MIX_ALPHA:g}]")
    allowed = {"crop_padding": (lambda v: v >= 0, ">= 0"), "mixup": alpha, "cutmix": alpha,
               "label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
               "drop_path": (lambda v: 0 <= v < 1, "in [0, 1)"), "layer_decay": (lambda v: 0 < v <= 1, "in (0, 1]"),
               "random_erase": (lambda v: 0 <= v <= 1, "in [0, 1]")}
    for name, (ok, allowed_text) in allowed.items():
        if not ok(getattr(args, name)):
            utils.die(f"--{name} must be {allowed_text}, got {getattr(args, name)}")
    chunk, world_size = utils.device_chunk(args), utils.dist_env()[1]
    # The flag that sets the chunk: --max_device_batch_size, or a process's share of the batch when smaller.
    source = f"--max_device_batch_size {args.max_device_batch_size}" if chunk == args.max_device_batch_size \
        else f"--batch_size {args.batch_size}" + (f" over {world_size} processes" if world_size > 1 else "")
    if (args.mixup or args.cutmix) and chunk % 2:
        utils.die(f"{source} gives chunks of {chunk} images, which must be even with --mixup/--cutmix (each chunk "
                  "is mixed with its own reverse)")
    if args.linear_probe and chunk < 2:
        utils.die(f"{source} gives chunks of {chunk} image: the linear probe's BatchNorm needs at least 2 per chunk")
    if args.linear_probe and (args.drop_path or args.layer_decay != 1):
        utils.die("--drop_path and --layer_decay do not apply with --linear_probe (the encoder is frozen)")
    if not args.run_name or args.run_name in (".", "..") or "/" in args.run_name or os.sep in args.run_name:
        utils.die(f"--run_name must be a plain file-name prefix, got {args.run_name!r}")
    longest = max((*OUTPUT_NAMES, f"preds_epoch_{args.total_epoch}.png"), key=len)
    utils.check_name_length("--run_name", os.path.join(args.output_dir, f"{args.run_name}_{longest}"))
    if args.pretrained_model_path == "":
        utils.die("--pretrained_model_path must name a file (leave the flag out to train from scratch)")
    if args.stop_after < 0:
        utils.die(f"--stop_after must be >= 0, got {args.stop_after}")
    # The last epoch's checkpoint goes beside the best: found a folder there only at the end of the first epoch, the
    # run would already have rewritten the last run's log and best checkpoint.
    utils.check_run_outputs(args, "--output_model_path", last_path(args))
    run = args.run_name
    utils.check_no_folder_at("--output_dir", args.output_dir, [f"{run}_{name}" for name in OUTPUT_NAMES],
                             [glob.escape(f"{run}_") + "preds_epoch_*.png"])
    if args.pretrained_model_path:
        pretrained = os.path.realpath(args.pretrained_model_path)
        if pretrained in (os.path.realpath(args.output_model_path), os.path.realpath(last_path(args))):
            utils.die(f"--output_model_path {args.output_model_path!r} would overwrite --pretrained_model_path "
                      f"{args.pretrained_model_path!r} (it or its _last.pt): choose another name")
    for path in (args.output_model_path, last_path(args)):
        utils.check_replaces_own("--output_model_path", path, lambda ckpt: "num_classes" in ckpt,
                                 "a train_classifier.py checkpoint")
    utils.check_data_args(args)


def last_path(args) -> str:
    """Where the last epoch's checkpoint goes: <stem>_last.pt beside --output_model_path (the best epoch's)."""
    return f"{os.path.splitext(args.output_model_path)[0]}_last.pt"


def load_resume(args, cfg: MAEConfig, pretrained_sha256: str | None):
    """-> (the run's last-epoch checkpoint, the log records of its epochs), or one-line death; read before
    anything is written."""
    # The keys an MAE checkpoint has too are required; the others are checked below, for what their absence means.
    ckpt = utils.load_checkpoint(args.resume, "--resume", {"model": dict, "epoch": int, "args": dict, "config": dict},
                                 optional={"num_classes": int, "optimizer": dict, "scaler": dict, "classes": list,
                                           "pretrained_sha256": (str, type(None))})
    if "num_classes" not in ckpt:  # an MAE checkpoint has the other keys too
        utils.die(f"--resume {args.resume!r} is not a train_classifier.py checkpoint (no num_classes); an MAE "
                  "checkpoint to start from goes to --pretrained_model_path")
    if "optimizer" not in ckpt:
        utils.die(f"--resume {args.resume!r} is a best-epoch checkpoint, which keeps no optimizer state: resume from "
                  "the run's <stem>_last.pt")
    check_same_start(ckpt, args, pretrained_sha256)  # first: a recipe's defaults follow the starting point
    # The reference schedule ignores --min_lr (check_args refuses one now, as it did not always): not compared.
    ignored = ("min_lr",) if args.schedule == "reference" else ()
    utils.check_resumable(ckpt, args, [name for name in RUN_DEFINING_FLAGS if name not in ignored])
    there, here = ckpt["config"], dataclasses.asdict(cfg)
    if there != here:  # named field by field: a whole config of 12 fields hides the one that differs
        differ = [f"{name} {there.get(name, '(absent)')} there, {here.get(name, '(absent)')} here"
                  for name in sorted({*there, *here}) if there.get(name, ...) != here.get(name, ...)]
        utils.die(f"--resume {args.resume!r} holds another model than these flags give: {'; '.join(differ)}")
    num_classes, names = ckpt["num_classes"], ckpt.get("classes")
    if num_classes < 1 or (names is not None and len(names) != num_classes):
        utils.die(f"--resume {args.resume!r}: its num_classes {num_classes} is not a count of classes"
                  + (f" (it names {len(names)})" if names is not None else ""))
    try:
        with torch.device("meta"):  # the model's shapes, without its memory
            model = build_model(args, cfg, num_classes, None)
    except (RuntimeError, TypeError, OverflowError):  # a count past int64 (an old checkpoint names no classes)
        utils.die(f"--resume {args.resume!r}: its num_classes {num_classes} builds no classifier")
    utils.check_resume_state(ckpt, args, model, optimizer_groups(model, args))
    # The curves and the best epoch are rebuilt from these records: all of the checkpoint's epochs must be there.
    log = utils.resumed_log(os.path.join(args.output_dir, f"{args.run_name}_log.jsonl"), ckpt["epoch"],
                            lambda r: all(utils.is_number(r.get(name)) for name in CURVES),
                            f"their {', '.join(CURVES)}", "--output_dir or --run_name")
    # The run's best epoch so far is in the best checkpoint beside --resume. Under another --output_model_path the
    # resumed run would name as its best a file that holds none of its epochs until one beats that best (and the
    # resume file itself as the best would be replaced by a checkpoint that cannot resume).
    if os.path.realpath(args.resume) != os.path.realpath(last_path(args)):
        utils.die(f"--resume {args.resume!r} is not the _last.pt of --output_model_path {args.output_model_path!r}, "
                  f"{last_path(args)!r}: pass the run's best-checkpoint name, whose _last.pt is --resume (it was "
                  f"{ckpt['args'].get('output_model_path')!r})")
    return ckpt, log


def check_same_start(ckpt: dict, args, pretrained_sha256: str | None) -> None:
    """One-line death unless the resumed run starts from the MAE encoder it started from (or from scratch, as it
    did). The encoder's weights decide, not the path: a pretraining rewrites its checkpoint after every epoch, so
    the same path may hold another encoder by now, and a moved file holds the same one (a linear probe would
    recompute its features from whatever the file holds)."""
    if "pretrained_sha256" not in ckpt:  # a checkpoint that predates the digest: the path is all it kept
        utils.check_resumable(ckpt, args, ("pretrained_model_path",))
        return
    saved, then = ckpt["pretrained_sha256"], ckpt["args"].get("pretrained_model_path")
    if saved == pretrained_sha256:
        return
    if saved is None:
        utils.die(f"--resume {args.resume!r} started from random weights: leave out --pretrained_model_path")
    if pretrained_sha256 is None:
        utils.die(f"--resume {args.resume!r} started from the MAE checkpoint {then!r}: pass it as "
                  "--pretrained_model_path")
    utils.die(f"--pretrained_model_path {args.pretrained_model_path!r} holds another encoder than the MAE checkpoint "
              f"--resume {args.resume!r} started from ({then!r} then; its weights' SHA-256 {saved[:12]}, now "
              f"{pretrained_sha256[:12]}): pass that checkpoint")


def load_pretrained(path: str):
    """-> (MAE state_dict, config dict, args dict: {} if it has none) of a mae_pretrain.py checkpoint, or one-line
    death if it is not one."""
    flag = f"--pretrained_model_path {path!r}"
    ckpt = utils.load_checkpoint(path, "--pretrained_model_path", {"model": dict, "config": dict})
    try:
        with torch.device("meta"):  # the model's shapes, without its memory
            mae = MAE(MAEConfig(**ckpt["config"]))
    # a field of the wrong type or an unknown one (TypeError, ValueError); a size that overflows (an mlp_ratio of
    # 1e308: OverflowError) or is negative (RuntimeError)
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        utils.die(f"{flag}: its config is not an MAEConfig ({str(e).splitlines()[0]})")
    if "head.weight" in ckpt["model"] and not any(key.startswith("decoder.") for key in ckpt["model"]):
        utils.die(f"{flag} holds a classifier (a head, no decoder): a train_classifier.py checkpoint; pass the "
                  "mae_pretrain.py checkpoint (its --model_path) to fine-tune from the MAE encoder")
    # The whole MAE must match its own config: this tells a wrong file (another model) from a checkpoint whose
    # encoder we can use.
    mismatch = utils.load_state_dict_checked(mae, ckpt["model"])
    if mismatch:
        utils.die(f"{flag}: not an MAE checkpoint of its config ({mismatch})")
    return ckpt["model"], ckpt["config"], ckpt["args"] if isinstance(ckpt.get("args"), dict) else {}


def val_images_pretrained_on(args, pretrain_args: dict) -> int:
    """How many of this run's val images the MAE trained on. --val_split N holds out the first N images of one
    fixed permutation of the training set (data.load_data), so a pretraining on the same training set that held
    out M < N of them trained on N - M of ours; with N = 0 the val split is the dataset's own (its test split)."""
    if not args.val_split or pretrain_args.get("dataset") != args.dataset:
        return 0
    if args.dataset == "fake":
        same_images = pretrain_args.get("fake_size") == args.fake_size
    else:
        same_images = os.path.realpath(str(pretrain_args.get("data_path"))) == os.path.realpath(args.data_path)
    pretrain_held_out = pretrain_args.get("val_split")
    if not same_images or not isinstance(pretrain_held_out, int):
        return 0
    return max(args.val_split - pretrain_held_out, 0)


def model_config(args, pretrained_config: dict | None) -> MAEConfig:
    """The checkpoint's config when fine-tuning from one (model flags given must agree), else the flags'."""
    if pretrained_config is not None:
        cfg = MAEConfig(**pretrained_config)
        for name in utils.MODEL_SIZE_FLAGS:
            given, saved = getattr(args, name), getattr(cfg, name)
            if given is not None and given != saved:
                utils.die(f"--{name} {given} does not match --pretrained_model_path's {saved} "
                          "(leave it out to use the checkpoint's)")
    else:
        # The decoder flags build nothing here, so they are left out rather than checked against each other.
        given = {name: getattr(args, name) for name in utils.MODEL_SIZE_FLAGS if name not in DECODER_FLAGS}
        cfg = utils.model_config(**{name: value for name, value in given.items() if value is not None})
    if args.crop_padding >= cfg.img_size:
        utils.die(f"--crop_padding must be in [0, {cfg.img_size}), got {args.crop_padding}")
    for name in utils.MODEL_SIZE_FLAGS:  # args.json then records the model that was actually trained
        # From scratch no decoder exists: null rather than sizes nothing was built with. From a checkpoint they
        # are the sizes of the MAE the encoder came from.
        built = pretrained_config is not None or name not in DECODER_FLAGS
        setattr(args, name, getattr(cfg, name) if built else None)
    return cfg


def build_model(args, cfg: MAEConfig, num_classes: int, mae_state: dict | None) -> ViTClassifier:
    """The classifier; with mae_state its encoder is the checkpoint's and only the head starts from random."""
    model = ViTClassifier(cfg, num_classes, args.global_pool, args.drop_path, linear_probe=args.linear_probe,
                          world_size=utils.dist_env()[1])
    if mae_state is not None:
        mismatch = utils.load_state_dict_checked(model.encoder, encoder_state_from_mae(mae_state))
        if mismatch:  # load_pretrained has checked the MAE against its own config
            utils.die(f"--pretrained_model_path {args.pretrained_model_path!r}: its encoder does not fit the "
                      f"classifier ({mismatch})")
    if args.linear_probe:
        model.encoder.requires_grad_(False)
    return model


def augments_images(args) -> bool:
    return any(getattr(args, name) != RECIPES["plain"][name] for name in IMAGE_FLAGS)


def augment_draws(shape, args, device) -> dict:
    """Every random number augment uses for a chunk of `shape` (B, C, H, W), drawn eagerly, so that a compiled
    augment holds no random op."""
    batch, draws = shape[0], {}
    if args.crop_padding:
        draws["crop"] = data.crop_draws(batch, args.crop_padding, device)
    if args.hflip:
        draws["flip"] = torch.rand(batch, device=device)
    if args.auto_augment == "trivial":
        draws["trivial"] = data.trivial_augment_draws(batch, device)
    if args.random_erase:
        draws["erase"] = data.erasing_draws(shape, device)
    return draws


def augment(images_u8: torch.Tensor, args, draws=None) -> torch.Tensor:
    """The training view of a batch, on its device: uint8 (B, C, H, W) -> normalised float. With no augmentation
    these are exactly data.normalize's operations. draws: augment_draws' numbers; drawn here by default."""
    d = augment_draws(images_u8.shape, args, images_u8.device) if draws is None else draws
    x = images_u8.float() / 255  # the photometric ops are defined on [0, 1]
    if args.crop_padding:
        x = data.random_crop(x, args.crop_padding, d["crop"])
    if args.hflip:
        x = data.random_hflip(x, d["flip"])
    if args.auto_augment == "trivial":
        x = data.trivial_augment(x, d["trivial"])
    x = (x - data.PIXEL_MEAN) / data.PIXEL_STD
    if args.random_erase:  # after normalisation: the noise it fills in is N(0, 1) in normalised units
        x = data.random_erasing(x, args.random_erase, d["erase"])
    return x


def augmentation(args, compiled: bool):
    """augment(., args) as a function of uint8 chunks, compiled when the model is. The finetune recipe's view is
    about 250 small eager operators per chunk (crop, flip, TrivialAugment's 14 ops, random erasing), each a kernel
    launch on a GPU; compiled, they are one graph of a few fused kernels. Its random numbers are drawn eagerly
    beforehand (about 20 operators), so the graph holds no random op: compiled or eager, a seed gives the same
    views. Compiled in torch.compile's default mode whatever --compile_mode says: elementwise kernels gain nothing
    from autotuning."""
    apply = torch.compile(augment, dynamic=False) if compiled else augment

    def view(images_u8):
        return apply(images_u8, args, augment_draws(images_u8.shape, args, images_u8.device))
    return view


def optimizer_groups(model: ViTClassifier, args) -> list:
    """A group per lr scale and weight decay: 2 with --layer_decay 1, 2 × (depth + 2) with the recipe's 0.75 on a
    pretrained encoder."""
    return utils.layer_decay_groups(model, args.weight_decay, args.layer_decay, model.cfg.depth)


def make_optimizer(model: ViTClassifier, args, device):
    """AdamW with layer-wise lr decay (optimizer_groups)."""
    return utils.make_adamw(optimizer_groups(model, args), utils.peak_lr(args), (0.9, 0.999), device)


def make_criterion(args, mixup):
    """Cross-entropy. Mixup's targets are class probabilities, which torch's cross-entropy takes as they are; Mixup
    has already smoothed them, so the loss smooths only the hard labels of unmixed runs."""
    return nn.CrossEntropyLoss(label_smoothing=0.0 if mixup is not None else args.label_smoothing)


def make_mixup(args, num_classes: int):
    """timm's Mixup in 'batch' mode (one lam and box per chunk, batched on the device), which also applies the
    label smoothing to the mixed targets; None when both mixup and cutmix are off."""
    if not (args.mixup or args.cutmix):
        return None
    # Imported here, not at the top: importing timm loads torchvision's models and costs every process about 3 s
    # of start-up, which --help, a flag error and the runs that do not mix would pay for nothing.
    from timm.data import Mixup
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.label_smoothing,
                 num_classes=num_classes)


def training_inputs(model: ViTClassifier, train_images, val_images, eval_chunk: int, args, device, amp_dtype):
    """What trains on what -> (net, frozen encoder or None, train inputs, val inputs, prepare_train, prepare_eval).
    A linear probe on unaugmented images trains its head on the frozen encoder's features, computed once (an
    epoch is then a pass of the head over (N, D) floats); every other run trains the model on uint8 images,
    viewed by prepare_train (augment, compiled when the model is) and prepare_eval (data.normalize)."""
    if args.linear_probe and not augments_images(args):
        model.eval()
        train_inputs = utils.embed_all(model.features, train_images, eval_chunk, amp_dtype, device)
        val_inputs = utils.embed_all(model.features, val_images, eval_chunk, amp_dtype, device)
        return nn.Sequential(model.head_norm, model.head), None, train_inputs, val_inputs, nn.Identity(), nn.Identity()
    frozen = model.encoder if args.linear_probe else None
    return model, frozen, train_images, val_images, augmentation(args, args.compile), data.normalize


# ----------------------------------------------------------------------------------------------------------
# Training and evaluation

def train_step(net, optimizer, scaler, inputs, labels, batch_idx, lr, prepare, mixup, criterion, args, device,
               amp_dtype, loss_sum, correct, graphs=None):
    """One optimizer step on this process's slice of the global batch `batch_idx`; adds each chunk's loss and
    correct count (against the unmixed labels) to the device-side sums. With `graphs` (a utils.StepGraphs,
    --capture_step) each chunk's model work and the update replay its graphs; the input work and mixup stay eager
    (mixup draws on the host)."""
    rank, world_size, _ = utils.dist_env()
    chunk = utils.device_chunk(args)
    accum_steps = utils.chunks_per_step(args)
    utils.set_lr(optimizer, lr)

    def forward_backward(x, target, y):
        with utils.autocast(device, amp_dtype):
            logits = net(x)
        loss = criterion(logits.float(), target)
        # Chunks are equal-sized, so dividing by their number makes the summed gradient the batch mean.
        utils.backward(scaler.scale(loss / accum_steps), optimizer)
        return loss.detach(), (logits.argmax(dim=-1) == y).sum()

    for chunk_idx in batch_idx[utils.shard(args.batch_size, rank, world_size)].split(chunk):
        utils.mark_chunk_begin()
        x, y = prepare(data.take(inputs, chunk_idx, device)), data.take(labels, chunk_idx, device)
        x, target = mixup(x, y) if mixup is not None else (x, y)
        loss, chunk_correct = (graphs.chunk(forward_backward, x, target, y) if graphs
                               else forward_backward(x, target, y))
        loss_sum += loss
        correct += chunk_correct
    if graphs:
        graphs.update()
    else:
        utils.optimizer_step(optimizer, scaler)


def train_one_epoch(net, frozen, optimizer, scaler, inputs, labels, prepare, mixup, criterion, args, epoch, device,
                    amp_dtype, writer, graphs=None):
    """One pass over the training set, every process cutting the same permutation. Loss and correct counts stay
    on the device and are read only every log_interval steps and at the end."""
    net.train()
    if frozen is not None:
        frozen.eval()  # the probed encoder stays exactly as pretrained
    rank, world_size, _ = utils.dist_env()
    chunks_per_step = utils.chunks_per_step(args)
    batches = data.epoch_batches(len(labels), args.batch_size, data.epoch_seed(args.seed, epoch), inputs.device)
    steps_per_epoch, peak_lr = len(batches), utils.peak_lr(args)
    total_steps, warmup_steps = args.total_epoch * steps_per_epoch, args.warmup_epoch * steps_per_epoch
    loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch}/{args.total_epoch}", leave=False, dynamic_ncols=True, disable=rank > 0)
    for i, batch_idx in enumerate(bar):
        step = (epoch - 1) * steps_per_epoch + i
        lr = utils.scheduled_lr(step, total_steps, warmup_steps, peak_lr, args)
        train_step(net, optimizer, scaler, inputs, labels, batch_idx, lr, prepare, mixup, criterion, args, device,
                   amp_dtype, loss_sum, correct, graphs)
        if writer:
            writer.add_scalar("lr", lr, step)
        if (i + 1) % args.log_interval == 0 and rank == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / ((i + 1) * chunks_per_step):.4f}",
                            acc=f"{correct.item() * world_size / ((i + 1) * args.batch_size):.2%}")
    seconds = time.perf_counter() - start
    num_seen = len(batches) * args.batch_size
    loss_sum, correct = utils.all_reduce_sum(torch.stack([loss_sum, correct])).tolist()
    return {"train_loss": loss_sum / (len(batches) * chunks_per_step * world_size), "train_acc": correct / num_seen,
            "lr": lr, "images_per_sec": num_seen / seconds, "seconds": seconds}


@torch.no_grad()
@utils.eager()
def evaluate(net, inputs, labels, prepare, batch_size, device, amp_dtype):
    """Cross-entropy (no smoothing) and accuracy over the whole split, in order, nothing dropped; each process
    takes a shard. The labels live where the inputs do (host or device memory).
    -> (mean loss, accuracy, predicted labels of the whole split on the host)."""
    net.eval()
    loss_sum, predicted = torch.zeros((), device=device), []
    for chunk_idx in utils.shard_chunks(len(labels), batch_size, inputs.device):  # labels live with the inputs
        with utils.autocast(device, amp_dtype):
            logits = net(prepare(data.take(inputs, chunk_idx, device)))
        loss_sum += F.cross_entropy(logits.float(), data.take(labels, chunk_idx, device), reduction="sum")
        predicted.append(logits.argmax(dim=-1))
    labels = labels.to(device)
    predicted = utils.all_gather_cat(torch.cat(predicted), len(labels))
    accuracy = (predicted == labels).sum() / len(labels)
    return utils.all_reduce_sum(loss_sum).item() / len(labels), accuracy.item(), predicted.cpu()


# ----------------------------------------------------------------------------------------------------------

def check_same_classes(ckpt: dict, args, classes: list) -> None:
    """One-line death unless the resumed checkpoint trained on these classes. --data_path may change on a resume
    (the images may have moved), so the classes are compared: another number would not fit the head, and other
    names would continue the run on another labelling."""
    if ckpt["num_classes"] != len(classes) or ckpt.get("classes", classes) != classes:
        utils.die(f"--resume {args.resume!r} trained on {ckpt['num_classes']} classes ({ckpt.get('classes')}); "
                  f"these images have {len(classes)} ({classes})")


def model_line(model: ViTClassifier, args, pretrained_sha256: str | None) -> str:
    """The start-up line that says what trains: its size, where its encoder comes from, and the recipe."""
    start = "from scratch" if pretrained_sha256 is None else \
        f"encoder from {args.pretrained_model_path} (its encoder's SHA-256 {pretrained_sha256[:12]})"
    settings = f"linear probe, with the probe's settings and recipe {args.recipe}'s lr schedule" \
        if args.linear_probe else f"recipe {args.recipe}"  # a probe's recipe gives it its schedule alone
    return (f"model: {count_params(model) / 1e6:.2f}M parameters, {start}; {settings}: "
            f"{ {name: getattr(args, name) for name in RECIPE_FLAGS} }")


def output_paths(args) -> dict:
    """OUTPUT_NAMES -> where the run writes each in --output_dir (a name left out of OUTPUT_NAMES is a KeyError:
    the start-up check for a folder in the way reads that tuple)."""
    return {name: os.path.join(args.output_dir, f"{args.run_name}_{name}") for name in OUTPUT_NAMES}


def load_training_state(ckpt: dict, model: ViTClassifier, optimizer, scaler, args, steps_per_epoch: int) -> int:
    """Load a resumed run's weights, optimizer and scaler state in place -> the epoch to start from."""
    # In place, so the compiled model and its CUDA graphs see the loaded weights. A probe's features were computed
    # from the encoder as pretrained, which the probe froze: the checkpoint holds the same encoder.
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt.get("scaler"):  # empty when the checkpoint's run was not fp16
        scaler.load_state_dict(ckpt["scaler"])
    if args.linear_probe:
        # The probe's BatchNorm weights each chunk by its images over the run's images so far: set from the
        # run's progress, as the count of an older version's checkpoint was of each process's chunks.
        model.head_norm.num_batches_tracked.fill_(ckpt["epoch"] * steps_per_epoch * args.batch_size)
    utils.broadcast_state(model)  # rank 0's, as at the start: each process read the file on its own
    return ckpt["epoch"] + 1


def best_so_far(log: list) -> tuple:
    """-> (best val accuracy, its epoch) over the log's epochs, the first of a tie; (-1.0, 0) for none, so that
    any first epoch is the best so far."""
    best_acc, best_epoch = -1.0, 0
    for record in log:
        if record["val_acc"] > best_acc:
            best_acc, best_epoch = record["val_acc"], record["epoch"]
    return best_acc, best_epoch


class Shown(NamedTuple):
    """The val images the prediction figures show."""
    idx: torch.Tensor  # (NUM_VIS,) their indices in the val split
    images: torch.Tensor  # (NUM_VIS, 3, H, W) uint8
    labels: torch.Tensor  # (NUM_VIS,)
    classes: list  # the class names


def save_grid(args, shown: Shown, epoch: int, predicted, note: str) -> None:
    """The prediction figure of an epoch (0: before training) over the `shown` val images."""
    utils.save_prediction_grid(os.path.join(args.output_dir, f"{args.run_name}_preds_epoch_{epoch}.png"),
                               shown.images.float() / 255, predicted, shown.labels, shown.classes,
                               title=f"{args.run_name}, epoch {epoch}{note}")


def save_epoch_outputs(args, writer, log, val_predicted, snapshot, improved, summary, shown: Shown) -> None:
    """Everything an epoch leaves on disk (main process, background thread): arrays, TensorBoard, log,
    checkpoints, summary, and the prediction figure at the middle and last epochs. Takes CPU copies only, so
    training may go on meanwhile."""
    path, stats = output_paths(args), log[-1]
    for name in CURVES:
        utils.save_npy(path[f"{name}.npy"], [r[name] for r in log])
        writer.add_scalar(name, stats[name], stats["epoch"])
    writer.flush()
    utils.write_jsonl(path["log.jsonl"], log)
    utils.save_npy(path["val_preds.npy"], val_predicted, dtype=np.int64)
    if improved:
        utils.atomic_save({k: v for k, v in snapshot.items() if k not in ("optimizer", "scaler")},
                          args.output_model_path)
    utils.atomic_save(snapshot, last_path(args))
    utils.save_json(path["summary.json"], summary)
    if stats["epoch"] in {(args.total_epoch + 1) // 2, args.total_epoch}:  # and epoch 0, before training
        save_grid(args, shown, stats["epoch"], val_predicted[shown.idx],
                  f", val acc {stats['val_acc']:.2%} over all {len(val_predicted):,} val images")


@utils.explains_compile_failure
@utils.explains_out_of_memory
@utils.with_attention_kernel
def main(args):
    # ---- setup: validate everything before touching the disk
    with utils.warnings_after_checks():  # the checks' warnings print when all of them have passed
        check_args(args)
        mae_state, pretrained_config, pretrain_args = load_pretrained(args.pretrained_model_path) \
            if args.pretrained_model_path else (None, None, {})
        pretrained_sha256 = None if mae_state is None else utils.encoder_digest(mae_state)
        cfg = model_config(args, pretrained_config)
        ckpt, resumed_log = load_resume(args, cfg, pretrained_sha256) if args.resume else (None, [])
        device = utils.resolve_device(args)
        utils.resolve_runtime(args, device)
        amp_dtype = utils.autocast_dtype(args, device)
        train, val, steps_per_epoch = utils.load_training_data(args, cfg.img_size)
        classes, num_classes = list(train.classes), len(train.classes)
        if ckpt is not None:
            check_same_classes(ckpt, args, classes)
        utils.check_model_fits(lambda: build_model(args, cfg, num_classes, None), device, cfg)
        # after the size check: it puts tensors of the model's shapes on the device, to ask which kernel would run
        attention = utils.attention_choice(cfg, args.attention, device, amp_dtype, args.global_pool == "token")
        utils.init_distributed(device)
        data_device = utils.data_device(train, val, device, args)  # after init: the processes decide together
        rank, world_size, _ = utils.dist_env()
        main_process = rank == 0  # only it prints and writes files
        log_print = print if main_process else (lambda *a, **k: None)
        torch.manual_seed(args.seed)  # the same initial weights on every process
        model = build_model(args, cfg, num_classes, mae_state).to(device)
        utils.broadcast_state(model)

        path, last_model_path = output_paths(args), last_path(args)
        log_print(f"config: {vars(args)}")
        log_print(f"data: {args.dataset}, {len(train)} train / {len(val)} val images, {num_classes} classes, "
                  f"{steps_per_epoch} step{'s' * (steps_per_epoch != 1)} per epoch; device {device} x {world_size} "
                  f"process(es), autocast {amp_dtype}, attention {attention}; images in "
                  f"{utils.memory_name(data_device)}")
        log_print(model_line(model, args, pretrained_sha256))
        seen = val_images_pretrained_on(args, pretrain_args)
        if seen and main_process:  # allowed (the labels were never seen), but the val accuracy is then optimistic
            utils.warn(f"--pretrained_model_path: its MAE trained on {seen} of these {args.val_split} val images (it "
                       f"held out --val_split {pretrain_args['val_split']}); pretrain with --val_split "
                       f"{args.val_split} or more for a val accuracy on unseen images")
        if main_process:
            utils.warn_if_logged_before(args)
        utils.make_output_folders({"--output_dir": args.output_dir, "--log_dir": args.log_dir,
                                   "--output_model_path": os.path.dirname(os.path.abspath(args.output_model_path))},
                                  device)
    if main_process:
        utils.save_json(path["args.json"], vars(args))
        # An earlier run's grids: those of epochs this run has not trained, and the final one, which this run
        # writes at its last epoch. plot_results reports <run>_preds_grid.png as this run's.
        utils.remove_epoch_files(args.output_dir, f"{args.run_name}_preds_epoch_", ".png",
                                 after=ckpt["epoch"] if ckpt else -1)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path["preds_grid.png"])

    # ---- data: the whole uint8 dataset lives on the device (or, when it does not fit there, on the host)
    train_images, val_images = train.images.to(data_device), val.images.to(data_device)
    # Evenly spaced through the val split: a folder's images come sorted by class.
    vis_idx = torch.linspace(0, len(val) - 1, min(NUM_VIS, len(val))).round().long()
    vis_images, vis_labels = val.images[vis_idx], val.labels[vis_idx]
    if main_process:
        utils.save_npy(path["val_labels.npy"], val.labels, dtype=np.int64)

    # ---- what trains on what
    eval_chunk = utils.eval_chunk(args.max_device_batch_size)  # no gradients: larger chunks than training's
    net, frozen, train_inputs, val_inputs, prepare_train, prepare_eval = training_inputs(
        model, train_images, val_images, eval_chunk, args, device, amp_dtype)
    # Batches are cut where the inputs live: the labels go there too.
    train_labels, val_labels = train.labels.to(train_inputs.device), val.labels.to(val_inputs.device)
    # Evaluation runs eager (utils.eager); a probe's head alone, on precomputed features, has nothing to compile.
    train_net = utils.compile_model(net, args) if args.compile and net is model else net

    # ---- optimizer and loss
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    log, start_epoch = resumed_log, 1
    if ckpt is not None:
        start_epoch = load_training_state(ckpt, model, optimizer, scaler, args, steps_per_epoch)
        log_print(f"resumed from {args.resume} at epoch {start_epoch}")
    graphs = utils.StepGraphs(optimizer) if args.capture_step else None  # after the resume's load_state_dict
    mixup = make_mixup(args, num_classes)
    criterion = make_criterion(args, mixup)
    writer = SummaryWriter(args.log_dir) if main_process else None
    background = utils.BackgroundWriter()  # arrays, logs, checkpoints and grids, written while training goes on
    shown = Shown(vis_idx, vis_images, vis_labels, classes)
    if main_process and ckpt is None:
        with torch.no_grad(), utils.eager(), utils.autocast(device, amp_dtype):
            initial = model.eval()(data.normalize(vis_images.to(device))).argmax(dim=-1).cpu()
        background.submit(save_grid, args, shown, 0, initial, " (before training)")

    # ---- loop
    best_acc, best_epoch = best_so_far(log)  # a resumed run's epochs so far
    last_epoch = min(args.total_epoch, args.stop_after or args.total_epoch)
    for epoch in range(start_epoch, last_epoch + 1):
        utils.seed_epoch(args.seed, epoch, rank)  # augmentation and mixup differ per process, as images do
        stats = train_one_epoch(train_net, frozen, optimizer, scaler, train_inputs, train_labels, prepare_train, mixup,
                                criterion, args, epoch, device, amp_dtype, writer, graphs)
        if not math.isfinite(stats["train_loss"]):
            kept = f"{args.output_model_path} and {last_model_path} still hold earlier epochs" if epoch > 1 else \
                "This run wrote no checkpoint"
            raise SystemExit(f"epoch {epoch}: the training loss is {stats['train_loss']}; stopping. {kept}. Try a "
                             "lower --base_learning_rate.")
        if world_size > 1:
            # Each process's BatchNorm (the probe's head_norm) tracked its own shard's statistics: evaluate and
            # save their mean. Training normalises each chunk with its own statistics, on one GPU as on several.
            from timm.utils import distribute_bn  # here, as make_mixup's Mixup: only runs on several processes use it
            distribute_bn(model, world_size, reduce=True)
        val_loss, val_acc, val_predicted = evaluate(net, val_inputs, val_labels, prepare_eval, eval_chunk,
                                                    device, amp_dtype)
        stats.update(val_loss=val_loss, val_acc=val_acc)
        log.append({"epoch": epoch, **stats})
        improved = val_acc > best_acc
        if improved:
            best_acc, best_epoch = val_acc, epoch
        if main_process:
            snapshot = utils.to_cpu({
                "model": model.state_dict(), "optimizer": utils.optimizer_state(optimizer),
                "scaler": scaler.state_dict(), "epoch": epoch, "val_acc": val_acc, "args": vars(args),
                "config": dataclasses.asdict(cfg),
                "num_classes": num_classes, "classes": classes, "pretrained_sha256": pretrained_sha256})
            summary = {
                "run": args.run_name, "best_val_acc": best_acc, "best_epoch": best_epoch, "final_val_acc": val_acc,
                "epochs": epoch, "total_epoch": args.total_epoch, "linear_probe": args.linear_probe,
                "pretrained_model_path": args.pretrained_model_path, "pretrained_sha256": pretrained_sha256,
                "recipe": args.recipe,
                "recipe_settings": {name: getattr(args, name) for name in RECIPE_FLAGS}, "classes": classes}
            background.submit(save_epoch_outputs, args, writer, list(log), val_predicted, snapshot, improved,
                              summary, shown)
        log_print(f"epoch {epoch:3d}/{args.total_epoch} | train loss {stats['train_loss']:.4f} acc "
                  f"{stats['train_acc']:.2%} | val loss {val_loss:.4f} acc {val_acc:.2%} | lr {stats['lr']:.2e} | "
                  f"{stats['images_per_sec']:,.0f} img/s | {stats['seconds']:.1f} s")

    background.close()
    if main_process:
        writer.close()
        if last_epoch == args.total_epoch:
            utils.atomic_copy(os.path.join(args.output_dir, f"{args.run_name}_preds_epoch_{args.total_epoch}.png"),
                              path["preds_grid.png"])
    log_print(f"done ({args.run_name}): best val acc {best_acc:.2%} at epoch {best_epoch}, final "
              f"{log[-1]['val_acc']:.2%} (epoch {log[-1]['epoch']}); best checkpoint {args.output_model_path}, last "
              f"{last_model_path}")
    if last_epoch < args.total_epoch:
        log_print(f"stopped after epoch {last_epoch} of {args.total_epoch} (--stop_after): the same command with "
                  f"--resume {last_model_path} continues the run")
    utils.close_distributed()


if __name__ == "__main__":
    utils.exit_on_stop_signals()
    main(get_args_parser().parse_args())
