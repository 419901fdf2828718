"""How fast one pretraining step and one fine-tuning step run, and what that makes of the reference experiment.

Times the scripts' own optimizer steps, mae_pretrain.train_step and train_classifier.train_step (uint8 images on
the device, or in host memory with --data_on host, normalised and, for fine-tuning, augmented and mixed per the
recipe in batch, autocast, gradients accumulated over --max_device_batch_size chunks, fused AdamW), after warm-up,
with CUDA events on a GPU, then one epoch of each script's own loop, train_one_epoch. Prints images/s, ms per step
(bare, and within the epoch), the FLOPs counted analytically, the achieved TFLOP/s as a share of a bf16
matrix-product peak measured in the same run, the host syncs of one step, the fine-tuning step's input work
(augmentation, mixup) alone, the time of each script's evaluation, and the projected wall time of the reference
experiment (150 pretraining epochs at batch 512, then two 50-epoch fine-tunes at batch 128, on CIFAR-10's 50,000
images, at the epochs' step times; compilation from an empty cache and evaluation included).

On one GPU (ViT-T, the reference batch sizes):
    python bench.py --json bench.json
Seconds on a CPU (a small model at batch 64 / 32 unless flags say otherwise; the numbers only show that it runs):
    python bench.py --device cpu
"""
import argparse
import collections
import contextlib
import cProfile
import dataclasses
import datetime
import json
import os
import platform
import pstats
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.tensorboard import SummaryWriter

import data
import mae_pretrain
import train_classifier
import utils
from model import MAE, MAEConfig, ViTClassifier, mask_noise, num_masked_patches

# The reference experiment whose wall time is projected (issue #5): CIFAR-10's training split, 150 epochs of
# pretraining, then two fine-tunes (from the MAE encoder and from scratch) of 50 epochs each.
REFERENCE_TRAIN_IMAGES = 50_000
REFERENCE_PRETRAIN_EPOCHS = 150
REFERENCE_FINETUNE_EPOCHS = 50
REFERENCE_FINETUNE_RUNS = 2
REFERENCE_BATCH_SIZES = (512, 128)  # pretraining, fine-tuning
# Its evaluations, as the scripts run them by default: mae_pretrain.py's monitor every --eval_every epochs and
# after the last (kNN with the 50,000 training images as the bank and CIFAR-10's 10,000 test images as queries,
# plus the val reconstruction), and train_classifier.py's pass over the 10,000 val images after every epoch.
REFERENCE_VAL_IMAGES = 10_000
_EVAL_EVERY = mae_pretrain.get_args_parser().get_default("eval_every")
REFERENCE_PRETRAIN_EVALS = len(set(range(_EVAL_EVERY, REFERENCE_PRETRAIN_EPOCHS + 1, _EVAL_EVERY))
                               | {REFERENCE_PRETRAIN_EPOCHS})
REFERENCE_FINETUNE_EVALS = REFERENCE_FINETUNE_RUNS * REFERENCE_FINETUNE_EPOCHS
KNN_BANK_PER_VAL_IMAGE = REFERENCE_TRAIN_IMAGES // REFERENCE_VAL_IMAGES  # 5: CIFAR-10's train / test ratio

# Model sizes: ViT-T as the scripts default to, and a small model that takes milliseconds per step on a CPU.
PRESETS = {
    "vit-t": {name: getattr(MAEConfig(), name) for name in utils.MODEL_SIZE_FLAGS},
    "small": dict(patch_size=4, embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=64, decoder_depth=1,
                  decoder_num_heads=2),
}
# The peak is timed on a square matrix product of this side: large enough to fill an H100/H200 (and far past
# its L2), small enough to take milliseconds on a CPU.
PEAK_MATMUL_SIZE = {"cuda": 8192, "cpu": 1024}
PEAK_MATMUL_ITERS = {"cuda": 20, "cpu": 3}
TRAIN_FLOPS_PER_FORWARD = 3  # forward + backward, the backward being two matmuls (input and weight grads) per one


def get_args_parser():
    parser = utils.ArgumentParser(description="Time MAE pretraining and fine-tuning steps; project the reference "
                                              "experiment's wall time")
    # What is timed
    parser.add_argument("--pretrain_batch_size", type=int, default=None,
                        help="effective pretraining batch per optimizer step (default: the reference's 512 on "
                             "CUDA, 64 on the CPU)")
    parser.add_argument("--finetune_batch_size", type=int, default=None,
                        help="effective fine-tuning batch per optimizer step (default: the reference's 128 on "
                             "CUDA, 32 on the CPU)")
    parser.add_argument("--max_device_batch_size", type=int, default=None,
                        help="largest chunk put through the model at once, gradients accumulated over chunks as "
                             "in mae_pretrain.py; must divide each batch size larger than it (default: 256 on "
                             "CUDA as in mae_pretrain.py, 32 on the CPU)")
    parser.add_argument("--mask_ratio", type=utils.finite_float, default=MAEConfig().mask_ratio,
                        help="share of patches masked, in (0, 1)")
    parser.add_argument("--num_classes", type=int, default=10, help="classifier outputs (CIFAR-10: 10)")
    parser.add_argument("--phases", default="both", choices=("both", "pretrain", "finetune"),
                        help="which steps to time: both, which the projection needs, or one alone, in about half "
                             "the time, to compare variants of that phase (no evaluation timing, no projection)")
    parser.add_argument("--finetune_recipe", default="finetune", choices=tuple(train_classifier.RECIPES),
                        help="train_classifier.py recipe whose step is timed (augmentation, mixup, loss)")
    parser.add_argument("--epoch_images", type=int, default=None,
                        help="images of one epoch run by each script's own train_one_epoch after the timed steps, "
                             "whose time per step the projection uses (default: CIFAR-10's 50,000 on CUDA; on the "
                             "CPU four of the larger batch, 256)")
    parser.add_argument("--eval_images", type=int, default=None,
                        help="val images of each timed evaluation, with 5x as many as the kNN bank; the times are "
                             "scaled to the reference's 10,000 (default: 10,000 on CUDA, 64 on the CPU)")
    # How it is timed
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps per timed repeat (default: 20 on CUDA, 2 on the CPU)")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help="untimed steps first, which pay for compilation and allocation (default: 5 on CUDA, "
                             "1 on the CPU)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repeats; the median is reported (default: 5 on CUDA, 3 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model, the images and the batches")
    parser.add_argument("--data_on", default="device", choices=("device", "host"),
                        help="where the images live, as the training scripts' --data_on: device (the GPU), or host "
                             "(CPU memory, each batch copied over: the path for datasets the GPU cannot hold)")
    # Model size: a preset, and any of its values overridden one by one
    parser.add_argument("--preset", default=None, choices=tuple(PRESETS),
                        help="model sizes (default: vit-t on CUDA, small on the CPU); the flags below override it")
    utils.add_model_size_args(parser, vit_t_defaults=False)
    # Runtime: --device, --precision, --compile, --compile_mode, --compile_scope, --attention as the training
    # scripts take them
    utils.add_runtime_args(parser)
    parser.add_argument("--inductor", nargs="+", default=[], metavar="KEY=VALUE",
                        help="torch._inductor.config settings for the timed phases' compilation, to try them (e.g. "
                             "coordinate_descent_tuning=true); each value is read as its setting's type")
    parser.add_argument("--compile_cache", default="fresh", choices=("fresh", "shared"),
                        help="fresh: compile into an empty temporary inductor cache, removed at the end, so the "
                             "compile seconds are a first run's on this machine; shared: inductor's usual on-disk "
                             "cache, which earlier runs may have filled")
    # Output
    parser.add_argument("--profile", action="store_true",
                        help="also run --steps more steps of each phase under torch.profiler and print where the "
                             "device's time goes: the kernels (CPU: operators) with the most self time per step "
                             "(on a GPU, with who launched each, and the host's guard checks and optimizer step); "
                             "then --steps more under cProfile, for where the host's time goes: the Python "
                             "functions and built-ins with the most self and cumulative time per step")
    parser.add_argument("--json", default="", help="also write the results to this JSON file")
    return parser


def resolve_defaults(args, device: torch.device) -> None:
    """Fill the device-dependent defaults in place, so the printed and saved config is the one that ran."""
    on_cuda = device.type == "cuda"
    for name, cuda_default, cpu_default in (("pretrain_batch_size", 512, 64), ("finetune_batch_size", 128, 32),
                                            ("max_device_batch_size", 256, 32), ("steps", 20, 2),
                                            ("warmup_steps", 5, 1), ("repeats", 5, 3),
                                            ("eval_images", REFERENCE_VAL_IMAGES, 64)):
        if getattr(args, name) is None:
            setattr(args, name, cuda_default if on_cuda else cpu_default)
    if args.epoch_images is None:  # on the CPU, 4 steps of the larger batch
        largest = max(args.pretrain_batch_size, args.finetune_batch_size)
        args.epoch_images = REFERENCE_TRAIN_IMAGES if on_cuda else min(4 * largest, REFERENCE_TRAIN_IMAGES)
    utils.resolve_runtime(args, device)  # --compile: False, with one warning, where it cannot work
    args.preset = args.preset or ("vit-t" if on_cuda else "small")
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def load_json(path: str):
    with open(path) as f:
        return json.load(f)


def is_a_result(obj: dict) -> bool:
    """Whether a JSON object is a bench.py result (what --json writes): a rerun may replace it, and no other file
    (a training script's args.json or summary named by a slip)."""
    return str(obj.get("command", "")).startswith("python bench.py") and "matmul_peak" in obj


def check_args(args) -> MAEConfig:
    """Every flag checked before any work, and before --json is written."""
    positive = ("pretrain_batch_size", "finetune_batch_size", "max_device_batch_size", "num_classes", "steps",
                "warmup_steps", "repeats", "eval_images", *utils.MODEL_SIZE_FLAGS)  # --epoch_images: its range below
    for name in positive:
        if getattr(args, name) < 1:
            utils.die(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.eval_images > REFERENCE_VAL_IMAGES:
        utils.die(f"--eval_images must be at most the reference's {REFERENCE_VAL_IMAGES:,}, got {args.eval_images}")
    # Only the phases that run: a batch size of the other one is not used (its default need not fit the chunk).
    timed = [f"{phase}_batch_size" for phase in ("pretrain", "finetune") if args.phases in ("both", phase)]
    for name in timed:
        batch = getattr(args, name)
        if batch > REFERENCE_TRAIN_IMAGES:
            utils.die(f"--{name} must be at most the {REFERENCE_TRAIN_IMAGES:,} images of CIFAR-10, got {batch}")
        if batch % chunk_size(batch, args):
            utils.die(f"--{name} {batch} is not divisible by --max_device_batch_size {args.max_device_batch_size}")
    largest = max(getattr(args, name) for name in timed)
    if not largest <= args.epoch_images <= REFERENCE_TRAIN_IMAGES:
        utils.die(f"--epoch_images must be in [{largest}, {REFERENCE_TRAIN_IMAGES:,}] (a batch of each phase timed at "
                  f"least, CIFAR-10's images at most), got {args.epoch_images}")
    if not 0.0 < args.mask_ratio < 1.0:  # the loss is a mean over the masked patches: some must be masked
        utils.die(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.inductor and not args.compile:
        utils.die("--inductor needs compilation, which is off (pass --compile)")
    if args.compile_cache != "fresh" and not args.compile:  # else kept in the config as if it had counted
        utils.die(f"--compile_cache {args.compile_cache} needs compilation, which is off (pass --compile)")
    if args.capture_step and args.warmup_steps <= utils.StepGraphs.WARMUP:
        # The step after the eager ones captures its graphs: the warm-up, not the timing, must hold it.
        utils.die(f"--warmup_steps must be at least {utils.StepGraphs.WARMUP + 1} with --capture_step (on by default "
                  f"on CUDA; --no-capture_step turns it off), got {args.warmup_steps}")
    if args.json:  # checked now, not after minutes of timing
        utils.check_output_file("--json", args.json, (".json",), create_folder=False)
        utils.check_replaces_own("--json", args.json, is_a_result, "a bench.py result", load=load_json)
    recipe = train_classifier.RECIPES[args.finetune_recipe]
    if args.phases != "pretrain" and (recipe["mixup"] or recipe["cutmix"]) \
            and chunk_size(args.finetune_batch_size, args) % 2:
        utils.die(f"--finetune_batch_size {args.finetune_batch_size} gives chunks of "
                  f"{chunk_size(args.finetune_batch_size, args)} images, which must be even with the "
                  f"{args.finetune_recipe} recipe's mixup/CutMix (each chunk is mixed with its own reverse)")
    utils.check_seed(args.seed)
    return utils.mae_config(args)


def chunk_size(batch_size: int, args) -> int:
    return min(batch_size, args.max_device_batch_size)


# ----------------------------------------------------------------------------------------------------------
# FLOPs, counted analytically

def block_flops(tokens: int, width: int, mlp_ratio: float, queries: int | None = None) -> int:
    """Forward FLOPs of one pre-norm transformer block on `tokens` tokens of `width` (one image), its output
    computed for `queries` of them (model.Block's `queries`; default all).

    A matrix product of (M, K) by (K, N) is 2*M*K*N FLOPs (a multiply and an add). With L tokens, Q queries,
    width D and MLP hidden width H = int(mlp_ratio * D):
        qkv projection        2 * L * D * 3D   (for every token: the keys and values need all of them)
        scores Q K^T          2 * Q * L * D    (summed over heads: heads * head_dim = D)
        weighted sum A V      2 * Q * L * D
        output projection     2 * Q * D * D
        MLP (two linears)     2 * Q * D * H * 2
    LayerNorms, softmax, GELU, residual adds and biases are left out: they are O(L * D) and run far below the
    matrix units' rate, so counting them would flatter the achieved TFLOP/s rather than measure it.
    """
    queries = tokens if queries is None else queries
    hidden = int(width * mlp_ratio)
    return 2 * width * (3 * tokens * width + queries * (width + 2 * hidden)) + 4 * queries * tokens * width


def mae_forward_flops(cfg: MAEConfig, masked_only: bool = True) -> dict:
    """Forward FLOPs of model.MAE per image, by part (matrix products only, as in block_flops).

    The patch embedding sees all N patches (positions are added before masking), the encoder the class token
    plus the N_visible = N - int(N * mask_ratio) kept patches, the decoder the class token plus all N positions
    (mask tokens filled in). Its last block computes the outputs the pixel head reads: with masked_only, as training
    runs the model, those of the N - N_visible masked tokens alone (the default here, where model.MAE's forward
    defaults to every patch); otherwise all N patch tokens' (not the class token's).
    """
    n, patch_dim = cfg.num_patches, cfg.patch_size ** 2 * cfg.in_chans
    visible = n - num_masked_patches(n, cfg.mask_ratio)
    predicted = n - visible if masked_only else n
    return {
        "patch_embed": 2 * n * patch_dim * cfg.embed_dim,
        "encoder": cfg.depth * block_flops(1 + visible, cfg.embed_dim, cfg.mlp_ratio),
        "decoder_embed": 2 * (1 + visible) * cfg.embed_dim * cfg.decoder_embed_dim,
        "decoder": (cfg.decoder_depth - 1) * block_flops(1 + n, cfg.decoder_embed_dim, cfg.mlp_ratio)
        + block_flops(1 + n, cfg.decoder_embed_dim, cfg.mlp_ratio, predicted),
        "pred": 2 * predicted * cfg.decoder_embed_dim * patch_dim,
    }


def classifier_forward_flops(cfg: MAEConfig, num_classes: int, global_pool: str = "token") -> dict:
    """Forward FLOPs of model.ViTClassifier per image, by part: the encoder on the class token plus all N
    patches (pooled on the class token, its last block computes that token's output alone), and a linear head
    on one pooled D-vector."""
    n, patch_dim = cfg.num_patches, cfg.patch_size ** 2 * cfg.in_chans
    last_queries = 1 if global_pool == "token" else None
    return {
        "patch_embed": 2 * n * patch_dim * cfg.embed_dim,
        "encoder": (cfg.depth - 1) * block_flops(1 + n, cfg.embed_dim, cfg.mlp_ratio)
        + block_flops(1 + n, cfg.embed_dim, cfg.mlp_ratio, last_queries),
        "head": 2 * cfg.embed_dim * num_classes,
    }


# ----------------------------------------------------------------------------------------------------------
# Timing

def timed(fn, iters: int, device: torch.device) -> float:
    """Seconds per call of fn over `iters` back-to-back calls. On CUDA two events bracket the calls and the host
    waits once, at the end, so the time is the device's, launch gaps included; on the CPU, perf_counter."""
    return timed_with_host(fn, iters, device)[0]


HOST_TIMED_CALLS = 4  # calls whose queueing timed_with_host times: few enough not to fill CUDA's launch queue


def timed_with_host(fn, iters: int, device: torch.device) -> tuple:
    """(timed's seconds per call, the host's seconds per call to queue one). The host's time is that of the first
    HOST_TIMED_CALLS calls: later ones may wait for room in CUDA's launch queue (about a thousand launches), which
    would count the device's pace as the host's. On a GPU, a host far faster than the device means the device sets
    the pace; one about as slow means the host does, and taking work off it (launches, Python operations) would
    shorten the step. On the CPU both are the same."""
    on_cuda, stamps = device.type == "cuda", []
    begin = time.perf_counter()
    if on_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    for _ in range(iters):
        fn()
        stamps.append(time.perf_counter())
    if not on_cuda:
        seconds = (stamps[-1] - begin) / iters
        return seconds, seconds
    end.record()
    end.synchronize()
    queued = min(iters, HOST_TIMED_CALLS)
    return start.elapsed_time(end) / 1e3 / iters, (stamps[queued - 1] - begin) / queued


PROFILE_TOP = 12  # kernels listed per phase by --profile
PROFILE_NAME_CHARS = 90  # CUTLASS and Triton kernel names run to hundreds of characters
# The host's records that --profile prints for a GPU's steps (the JSON's host_records keeps all of them): Dynamo's
# guard checks before each compiled call, and the optimizer.
HOST_RECORDS_SHOWN = ("TorchDynamo Cache Lookup", "Pregraph bytecode", "Optimizer.step#AdamW.step",
                      "Optimizer.zero_grad#AdamW.zero_grad")
# What --profile sums each kernel (CPU: operator) under, by its name: the first pattern that matches wins.
# Inductor names a fused kernel after the operators it fuses, which may include attention's or a matmul's
# (triton_poi_fused__scaled_dot_product_..., a layout copy): its names are read first, its GEMM templates (with
# max-autotune) being matrix products. Attention comes before the products: the names of cuDNN's and CUTLASS's
# attention kernels may mention GEMMs. On a CPU the fused C++ kernels run inside one record per compiled graph.
KERNEL_KINDS = (
    ("matrix products", re.compile(r"^triton_tem_")),
    ("inductor's fused kernels", re.compile(r"^triton_|^## Call CompiledFxGraph")),
    ("attention", re.compile(r"flash|fmha|sdpa|scaled_dot_product|attention", re.IGNORECASE)),
    ("matrix products", re.compile(r"gemm|nvjet|xmma|cublas|aten::(mm|addmm|bmm|baddbmm|matmul|linear|convolution|"
                                   r"_convolution|mkldnn_convolution|convolution_backward)$", re.IGNORECASE)),
)


def kernel_kind(name: str) -> str:
    return next((kind for kind, pattern in KERNEL_KINDS if pattern.search(name)), "other")


def kernel_launchers(events, steps: int) -> dict:
    """Who launched each kernel: for each kernel name, [operator, outermost, launches per step] for each pair seen,
    the most launches first. `operator` is the profiler's innermost record open when the kernel was queued (an
    eager kernel's ATen operator; a CUDA graph's kernels, whatever record was open around its replay) and
    `outermost` the top of its stack of records (an autograd node, Optimizer.step, a compiled graph's call). This is
    how a card's profile tells an eager kernel, with its host-side launch, from one a graph replays, and where in
    the step an eager one comes from. events: torch.profiler's events(), whose CPU records hold their kernels."""
    launches = collections.Counter()
    for event in events:
        kernels = getattr(event, "kernels", None)
        if not kernels:
            continue
        outermost = event
        while outermost.cpu_parent is not None:
            outermost = outermost.cpu_parent
        for kernel in kernels:
            launches[kernel.name, event.name, outermost.name] += 1
    launchers = {}
    for (kernel, operator, outer), count in launches.most_common():
        launchers.setdefault(kernel, []).append([operator, outer, count / steps])
    return launchers


def device_time_profile(run_steps, steps: int, device: torch.device) -> dict:
    """Self time per step of each kernel (CPU: operator) over `steps` steps run by run_steps() under torch.profiler,
    the largest first, and their sum: the device's busy time per step. On a GPU the kernels of one stream run one
    after another, so a step's time minus its busy time is the device waiting, for the host or for nothing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    on_cuda = device.type == "cuda"
    # On a GPU the host's records are kept too, for kernel_launchers; only the kernels' own records are summed (an
    # operator's device time is its kernels').
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]) as prof:
        run_steps()
        synchronize(device)
    # (name, ms per step, launches per step); the profiler counts microseconds
    averages = prof.key_averages()
    # With the host's records kept, the profiler also puts a user annotation's span on the device's timeline
    # ("Optimizer.step#AdamW.step": from its first kernel's start to its last's end): a device record, but no
    # kernel. Summed, it counted the optimizer's kernels twice (1.26 ms of a 9.11 ms fine-tuning step on an H200,
    # 744b996); torch's own table (key_averages().table()) leaves is_user_annotation records out too.
    ms = [(e.key, (e.self_device_time_total if on_cuda else e.self_cpu_time_total) / 1e3 / steps, e.count / steps)
          for e in averages if not on_cuda or (e.device_type != DeviceType.CPU and not e.is_user_annotation)]
    ms = sorted((item for item in ms if item[1] > 0), key=lambda item: -item[1])
    kinds = dict.fromkeys([*(kind for kind, _ in KERNEL_KINDS), "other"], 0.0)
    for name, t, _ in ms:
        kinds[kernel_kind(name)] += t
    launchers = kernel_launchers(prof.events(), steps) if on_cuda else {}
    # "all" keeps every kernel, whole names and launch counts, so that a card's run can be read apart afterwards
    # (what a kind holds, a kernel launched once per parameter, ...) without another lease.
    result = {"what": "CUDA kernels" if on_cuda else "CPU operators", "busy_ms_per_step": sum(t for _, t, _ in ms),
              "kinds_ms_per_step": kinds, "top": [[name[:PROFILE_NAME_CHARS], t] for name, t, _ in ms[:PROFILE_TOP]],
              "all": [{"name": name, "kind": kernel_kind(name), "ms_per_step": t, "calls_per_step": calls,
                       **({"launched_by": launchers.get(name, [])} if on_cuda else {})} for name, t, calls in ms]}
    if on_cuda:
        # The host's records of the same steps, their time with what runs inside them and without, the most
        # first (at least a microsecond per step): Dynamo's guard checks ("TorchDynamo Cache Lookup"), the
        # optimizer's step, the operators run eagerly. The profiler's own cost per record is in them.
        host = sorted(((e.key, e.cpu_time_total / 1e3 / steps, e.self_cpu_time_total / 1e3 / steps, e.count / steps)
                       for e in averages if e.device_type == DeviceType.CPU), key=lambda row: -row[1])
        result["host_records"] = [{"name": name, "cpu_ms_per_step": total, "self_cpu_ms_per_step": own,
                                   "calls_per_step": calls} for name, total, own, calls in host if total >= 1e-3]
    return result


def host_function_name(file: str, line: int, function: str) -> str:
    """cProfile's (file, line, function) as `function (path:line)`, the path from the package root (torch/...) or
    the file's name; a built-in (file "~") as cProfile names it, say <method 'item' of 'torch._C.TensorBase' ...>."""
    if file == "~":
        return function
    path = os.path.normpath(file).split(os.sep)
    # the last site-packages (or dist-packages) folder in the path: the package's own folders follow it
    cut = max((i for i, part in enumerate(path) if part in ("site-packages", "dist-packages")), default=len(path) - 2)
    return f"{function} ({'/'.join(path[cut + 1:])}:{line})"


def host_time_profile(run_step, steps: int, device: torch.device) -> dict:
    """Where the host's time goes while it queues a step: cProfile over `steps` steps, each begun with the device
    idle (it waits for the device between steps, outside the profile), so that no call waits for room in CUDA's
    launch queue and counts the device's pace as the host's. For each Python function and built-in, its self time
    (tottime) and cumulative time per step, the largest first. This is the host's side that device_time_profile
    cannot see: on a GPU, a step whose host_ms_per_step is close to its ms_per_step waits for the host (torch's CUDA
    graph trees, Dynamo's guards, the optimizer's Python, the launches). cProfile's own cost per Python call
    inflates the Python-heavy parts, so the shares compare, not the sum with host_ms_per_step."""
    profiler = cProfile.Profile()
    for _ in range(steps):
        synchronize(device)
        profiler.enable()
        run_step()
        profiler.disable()
    synchronize(device)
    # pstats' table: (file, line, function) -> (primitive calls, calls, self s, cumulative s, callers)
    rows = [(host_function_name(*where), self_s * 1e3 / steps, cumulative_s * 1e3 / steps, calls / steps)
            for where, (_, calls, self_s, cumulative_s, _) in pstats.Stats(profiler).stats.items()]
    rows.sort(key=lambda row: -row[1])
    by_cumulative = sorted(rows, key=lambda row: -row[2])
    return {"what": "host (cProfile)", "ms_per_step": sum(row[1] for row in rows),
            "top_self": [[name[:PROFILE_NAME_CHARS], ms] for name, ms, _, _ in rows[:PROFILE_TOP]],
            "top_cumulative": [[name[:PROFILE_NAME_CHARS], ms] for name, _, ms, _ in by_cumulative[:PROFILE_TOP]],
            # the functions with at least a microsecond of self time per step, whole names
            "all": [{"name": name, "self_ms_per_step": self_ms, "cumulative_ms_per_step": cumulative_ms,
                     "calls_per_step": calls} for name, self_ms, cumulative_ms, calls in rows if self_ms >= 1e-3]}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, repeats: int, dtype: torch.dtype) -> dict:
    """The matrix units' achievable rate: a large square product on random data in the dtype the model's matrix
    products run in (--precision: by default bf16 on a GPU with bf16 arithmetic, fp16 on an older one, fp32 on the
    CPU), timed like the steps, median over repeats."""
    n, iters = PEAK_MATMUL_SIZE[device.type], PEAK_MATMUL_ITERS[device.type]
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(n, n, device=device, dtype=dtype)
    def product():
        torch.mm(a, b, out=out)
    timed(product, 2, device)  # cuBLAS handle and heuristics
    seconds = statistics.median(timed(product, iters, device) for _ in range(repeats))
    return {"dtype": str(dtype).replace("torch.", ""), "size": n, "tflops": 2 * n ** 3 / seconds / 1e12}


# ----------------------------------------------------------------------------------------------------------
# Host syncs: operators that make the host wait for the GPU

# Their result (a Python number, or a shape that depends on the data) exists only once the GPU has computed it,
# so the host stops queueing work until then.
SYNCING_OPS = {"_local_scalar_dense",  # .item(), float(t), bool(t), `if t:`
               "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
               "unique_dim_consecutive", "bincount", "equal"}


class HostSyncRecorder(TorchDispatchMode):
    """Records every operator run under it that would make the host wait for a GPU: SYNCING_OPS, boolean-mask
    indexing (its output size is a count of the mask), copies from the GPU to the host, and copies to the GPU
    that are blocking or from unpinned host memory. Operators are what it sees, so it finds them on a CPU run too,
    where nothing waits, except the copies, which need a GPU (or the meta device standing in for one)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNCING_OPS or (name == "repeat_interleave" and func._overloadname != "self_int"
                                   and kwargs.get("output_size") is None and len(args) < 4):
            self.syncs.append(name)
        elif name in ("index", "index_put", "index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.syncs.append(f"{name} (boolean mask)")
        out = func(*args, **kwargs)
        if name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor):
            source = args[1] if name == "copy_" else args[0]
            if out.device.type == "cpu" and isinstance(source, torch.Tensor) and source.device.type != "cpu":
                self.syncs.append(f"{name} to the host")
            elif out.device.type != "cpu" and isinstance(source, torch.Tensor) and source.device.type == "cpu":
                non_blocking = kwargs.get("non_blocking", False) or (name == "copy_" and len(args) > 2 and args[2])
                if not non_blocking:  # a blocking copy waits for the stream to drain
                    self.syncs.append(f"{name} to the device, blocking")
                elif not source.is_pinned():  # a pageable one waits for its transfer
                    self.syncs.append(f"{name} from unpinned host memory")
        return out


# ----------------------------------------------------------------------------------------------------------
# The steps

@dataclasses.dataclass
class Phase:
    """One of the two steps the reference experiment repeats, run by the training script's own train_step."""
    name: str
    model: torch.nn.Module
    make_optimizer: object  # (model) -> the script's optimizer for it: its groups, lr, betas
    peak_lr: float  # the script's lr at the end of warm-up (a group's lr_scale multiplies it)
    batch_size: int
    step: object  # (model, optimizer, scaler, batch_idx, lr, loss_sum, amp_dtype, graphs) -> None: one step
    flops_forward: int  # analytic forward FLOPs per image
    inputs: object = None  # (batch_idx) -> None: the step's input work alone, as the step does it; None: not timed
    inputs_eager: object = None  # the same, eager, where the step runs it compiled; else None
    epoch: object = None  # (model, optimizer, scaler, amp_dtype, writer, graphs) -> None: train_one_epoch


def compile_cache(args):
    """Where the timed phases compile. The reference experiment's wall time counts a first run on a machine, whose
    inductor cache is empty: with --compile_cache fresh they compile into an empty temporary one (torch's own
    test helper; Triton's kernels go under it too), deleted afterwards. The fine-tuning phase, compiled after the
    pretraining one, then finds the pretraining's kernels cached, as the experiment's first fine-tune does."""
    if args.compile and args.compile_cache == "fresh":
        from torch._inductor.utils import fresh_inductor_cache
        return fresh_inductor_cache()
    return contextlib.nullcontext()


def command_line(args, **overrides) -> list:
    """bench.py's flags that reproduce `args` (as resolved: defaults made explicit), with `overrides` in place of
    some values; parsing them gives back the same namespace."""
    argv = []
    for action in get_args_parser()._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = overrides.get(action.dest, getattr(args, action.dest))
        flag = action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction):
            argv += [] if value is None else [flag if value else f"--no-{flag[2:]}"]
        elif action.nargs == 0:  # store_true
            argv += [flag] if value else []
        elif isinstance(value, list):
            argv += [flag, *map(str, value)] if value else []
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def second_finetune_compile_s(args) -> float | None:
    """Compile seconds of the experiment's second fine-tune: like the second train_classifier.py, a new process that
    compiles the fine-tuning step with the inductor cache the first filled (inherited: with --compile_cache fresh,
    this process's temporary one). It times that phase alone, briefly; None, with a line saying why, if it fails,
    and the projection then counts the first fine-tune's compilation twice, an upper bound."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "second.json")
        # One repeat and the shortest epoch check_args allows for the fine-tuning phase alone, one step: the
        # compile seconds are what is wanted.
        argv = command_line(args, phases="finetune", compile_cache="shared", profile=False, json=out, repeats=1,
                            epoch_images=args.finetune_batch_size)
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *argv], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"second fine-tune's compilation: not measured, its process failed ({last}); the projection "
                  "counts the first's twice")
            return None
        return load_json(out)["finetune"]["compile_s"]


def inductor_settings(args) -> dict:
    """--inductor's KEY=VALUE pairs as a dict for torch._inductor.config.patch, each value of its setting's type;
    one-line death for an unknown setting or a value its type cannot take."""
    import torch._inductor.config as inductor_config
    known, settings = inductor_config.get_config_copy(), {}
    for pair in args.inductor:
        key, _, text = pair.partition("=")
        if key not in known:
            utils.die(f"--inductor {pair}: torch._inductor.config has no setting {key!r} (KEY=VALUE, e.g. "
                      "coordinate_descent_tuning=true)")
        current = known[key]
        try:
            if isinstance(current, bool):
                value = {"true": True, "false": False, "1": True, "0": False}[text.lower()]
            elif isinstance(current, (int, float)):
                value = type(current)(text)
            elif current is None or isinstance(current, str):
                value = text
            else:
                raise ValueError
        except (KeyError, ValueError):
            utils.die(f"--inductor {pair}: {key} takes {type(current).__name__} values, not {text!r}")
        settings[key] = value
    return settings


def pretrain_phase(cfg: MAEConfig, images, args, device: torch.device) -> Phase:
    """mae_pretrain.train_step with the script's own flags at this batch size."""
    script_args = mae_pretrain.get_args_parser().parse_args([
        "--batch_size", str(args.pretrain_batch_size), "--max_device_batch_size", str(args.max_device_batch_size),
        "--patch_size", str(cfg.patch_size), "--total_epoch", str(REFERENCE_PRETRAIN_EPOCHS)])

    def step(model, optimizer, scaler, batch_idx, lr, loss_sum, amp_dtype, graphs):
        mae_pretrain.train_step(model, optimizer, scaler, images, batch_idx, lr, script_args, device, amp_dtype,
                                loss_sum, graphs)

    def epoch(model, optimizer, scaler, amp_dtype, writer, graphs):
        mae_pretrain.train_one_epoch(model, optimizer, scaler, images[:args.epoch_images], script_args, 1, device,
                                     amp_dtype, writer, graphs)
    return Phase("pretrain", MAE(cfg), lambda net: mae_pretrain.make_optimizer(net, script_args, device),
                 utils.peak_lr(script_args), args.pretrain_batch_size, step, sum(mae_forward_flops(cfg).values()),
                 epoch=epoch)


def finetune_phase(cfg: MAEConfig, images, labels, args, device: torch.device) -> Phase:
    """train_classifier.train_step with the --finetune_recipe's augmentation, mixup and loss."""
    script_args = train_classifier.get_args_parser().parse_args([
        "--recipe", args.finetune_recipe, "--batch_size", str(args.finetune_batch_size),
        "--max_device_batch_size", str(args.max_device_batch_size), "--pretrained_model_path", "(timing only)",
        "--total_epoch", str(REFERENCE_FINETUNE_EPOCHS)])
    train_classifier.resolve_recipe(script_args)
    mixup = train_classifier.make_mixup(script_args, args.num_classes)
    criterion = train_classifier.make_criterion(script_args, mixup)
    prepare = train_classifier.augmentation(script_args, args.compile)

    correct = torch.zeros((), device=device)  # the step adds into it, as the script's into its epoch's count

    def step(model, optimizer, scaler, batch_idx, lr, loss_sum, amp_dtype, graphs):
        train_classifier.train_step(model, optimizer, scaler, images, labels, batch_idx, lr, prepare, mixup,
                                    criterion, script_args, device, amp_dtype, loss_sum, correct, graphs)

    def input_work(view):
        # train_step's input work, chunk by chunk, without the model: eager, hundreds of small operators per chunk
        # (about 250 for the finetune recipe, views included); compiled, a few fused kernels and mixup's dozen.
        def inputs(batch_idx):
            for chunk_idx in batch_idx.split(chunk_size(args.finetune_batch_size, args)):
                x, y = view(data.take(images, chunk_idx, device)), data.take(labels, chunk_idx, device)
                if mixup is not None:
                    mixup(x, y)
        return inputs

    def epoch(model, optimizer, scaler, amp_dtype, writer, graphs):
        train_classifier.train_one_epoch(model, None, optimizer, scaler, images[:args.epoch_images],
                                         labels[:args.epoch_images], prepare, mixup, criterion, script_args, 1,
                                         device, amp_dtype, writer, graphs)

    model = ViTClassifier(cfg, args.num_classes, script_args.global_pool, script_args.drop_path)
    # The pretrained fine-tune's optimizer: with the recipe's layer decay, one group per layer and weight decay,
    # each a launch and host work every step (the scratch fine-tune's two groups cost less).
    return Phase("finetune", model,
                 lambda net: train_classifier.make_optimizer(net, script_args, device),
                 utils.peak_lr(script_args), args.finetune_batch_size, step,
                 sum(classifier_forward_flops(cfg, args.num_classes, script_args.global_pool).values()),
                 input_work(prepare),
                 input_work(train_classifier.augmentation(script_args, compiled=False)) if args.compile else None,
                 epoch)


def bench_phase(phase: Phase, args, device: torch.device, data_device: torch.device, amp_dtype,
                peak_tflops: float) -> dict:
    """Warm up, then time `repeats` runs of `steps` optimizer steps each. Compilation happens in the first
    warm-up step; its cost is estimated as the warm-up's wall time less the same number of steps at the timed
    rate."""
    model = phase.model.to(device)
    optimizer = phase.make_optimizer(model)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    train_model = utils.compile_model(model, args) if args.compile else model
    graphs = utils.StepGraphs(optimizer) if args.capture_step else None  # captured in the warm-up
    chunk = chunk_size(phase.batch_size, args)
    # The last: the host-sync check; then --profile's two runs (the device's kernels, the host's functions).
    total_steps = args.warmup_steps + args.repeats * args.steps + 1 + (2 * args.steps if args.profile else 0)
    # Successive epochs' permutations cut into index batches, made before the clock starts as an epoch makes
    # them before its loop.
    batches, epoch = [], 0
    while len(batches) < total_steps:
        epoch += 1
        batches += data.epoch_batches(REFERENCE_TRAIN_IMAGES, phase.batch_size, data.epoch_seed(args.seed, epoch),
                                      data_device)
    batches = iter(batches[:total_steps])
    loss_sum = torch.zeros((), device=device)
    step = 0

    def one_step(step_model=train_model):
        nonlocal step
        # Warmup then cosine, so the lr changes every step as it does in training.
        lr = utils.lr_at(step, total_steps, min(10, total_steps // 2), phase.peak_lr)
        phase.step(step_model, optimizer, scaler, next(batches), lr, loss_sum, amp_dtype, graphs)
        step += 1

    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(args.warmup_steps):
        one_step()
    synchronize(device)
    warmup_s = time.perf_counter() - begin
    step_s, host_s = zip(*(timed_with_host(one_step, args.steps, device) for _ in range(args.repeats)))
    seconds = statistics.median(step_s)
    # One epoch as the script runs it: its train_one_epoch, with the lr set (and logged to TensorBoard, here in a
    # temporary folder) every step, the progress bar, and the loss read every --log_interval steps and at the end.
    # The experiment repeats that, so the projection takes its time per step; the difference from the bare steps
    # above is the loop's own cost.
    with tempfile.TemporaryDirectory() as logs, SummaryWriter(logs) as writer:
        synchronize(device)
        begin = time.perf_counter()
        phase.epoch(train_model, optimizer, scaler, amp_dtype, writer, graphs)
        synchronize(device)
        epoch_s = time.perf_counter() - begin
    epoch_steps = args.epoch_images // phase.batch_size
    # One more step, eager (a compiled graph is checked by Dynamo itself: a sync inside would break it), with
    # every operator recorded: the step must queue its whole work without waiting for the device.
    with utils.eager(), HostSyncRecorder() as recorder:
        one_step(model)
    synchronize(device)
    # The input work alone, timed like the steps: on a GPU with the same stream and launch gaps, so within the
    # step it costs at most this (less where the device runs it while the host is still queueing). Where the step
    # compiles it, the eager time beside it bounds what the compilation saves (within the step, part of the eager
    # launches overlap the model's work).
    input_idx = data.epoch_batches(REFERENCE_TRAIN_IMAGES, phase.batch_size, args.seed, data_device)[0]

    def input_ms(inputs):
        if inputs is None:
            return None
        inputs(input_idx)  # untimed, as the steps' warm-up
        return 1e3 * statistics.median(timed(lambda: inputs(input_idx), args.steps, device)
                                       for _ in range(args.repeats))
    profiled = device_time_profile(lambda: [one_step() for _ in range(args.steps)], args.steps, device) \
        if args.profile else None
    host_profiled = host_time_profile(one_step, args.steps, device) if args.profile else None
    train_flops = TRAIN_FLOPS_PER_FORWARD * phase.flops_forward
    tflops = train_flops * phase.batch_size / seconds / 1e12
    return {
        "phase": phase.name, "batch_size": phase.batch_size, "chunk": chunk, "ms_per_step": seconds * 1e3,
        "epoch_steps": epoch_steps, "epoch_s": epoch_s, "epoch_ms_per_step": epoch_s / epoch_steps * 1e3,
        "ms_per_step_repeats": [s * 1e3 for s in step_s], "host_ms_per_step": statistics.median(host_s) * 1e3,
        "images_per_sec": phase.batch_size / seconds,
        "flops_per_image_forward": phase.flops_forward, "flops_per_image_train": train_flops, "tflops": tflops,
        "percent_of_peak": 100 * tflops / peak_tflops, "warmup_s": warmup_s,
        "compile_s": max(0.0, warmup_s - args.warmup_steps * seconds),
        "mean_loss": loss_sum.item() / (total_steps * (phase.batch_size // chunk)),
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None,
        "host_syncs": sorted(set(recorder.syncs)), "input_ms_per_step": input_ms(phase.inputs),
        "input_ms_per_step_eager": input_ms(phase.inputs_eager), "profile": profiled, "host_profile": host_profiled,
    }


def bench_evaluation(cfg: MAEConfig, images, labels, args, device: torch.device, data_device: torch.device,
                     amp_dtype) -> dict:
    """Seconds of one mae_pretrain.evaluate (kNN over 5x --eval_images bank images, val reconstruction) and one
    train_classifier.evaluate (val pass), eager as the scripts run them, median of up to 3 after one untimed
    call. Both are forward passes over their images, so the seconds scale linearly to the reference's 10,000
    val images (the kNN's similarity product, 2 x bank x queries x width FLOPs, is under 1% of the passes)."""
    num_val = args.eval_images
    num_bank = KNN_BANK_PER_VAL_IMAGE * num_val
    classes = [str(c) for c in range(args.num_classes)]
    g = torch.Generator().manual_seed(args.seed + 1)
    val = data.ImageSet(torch.randint(0, 256, (num_val, *images.shape[1:]), dtype=torch.uint8, generator=g),
                        torch.randint(0, args.num_classes, (num_val,), generator=g), classes).to(data_device)
    bank = data.ImageSet(images[:num_bank], labels[:num_bank], classes)
    val_noise = mask_noise(num_val, cfg.num_patches, generator=g).to(data_device)  # with the images, as the script
    script_args = mae_pretrain.get_args_parser().parse_args(["--max_device_batch_size",
                                                             str(args.max_device_batch_size)])
    mae = MAE(cfg).to(device)
    classifier = ViTClassifier(cfg, args.num_classes).to(device).eval()

    def seconds(fn) -> float:
        fn()
        times = []
        for _ in range(min(args.repeats, 3)):
            synchronize(device)
            begin = time.perf_counter()
            fn()  # ends by reading its numbers back to the host, as in the scripts
            synchronize(device)
            times.append(time.perf_counter() - begin)
        return statistics.median(times)

    pretrain_s = seconds(lambda: mae_pretrain.evaluate(mae, bank, val, val_noise, script_args, device, amp_dtype))
    # train_classifier.py's --max_device_batch_size is the fine-tuning chunk here (128 in the reference's
    # fine-tuning commands).
    finetune_chunk = utils.eval_chunk(chunk_size(args.finetune_batch_size, args))
    finetune_s = seconds(lambda: train_classifier.evaluate(classifier, val.images, val.labels, data.normalize,
                                                           finetune_chunk, device, amp_dtype))
    scale = REFERENCE_VAL_IMAGES / num_val
    return {"val_images": num_val, "bank_images": num_bank, "pretrain_eval_s": pretrain_s,
            "finetune_eval_s": finetune_s, "scale_to_reference": scale,
            "reference_seconds": scale * (REFERENCE_PRETRAIN_EVALS * pretrain_s
                                          + REFERENCE_FINETUNE_EVALS * finetune_s)}


def project_reference(pretrain: dict, finetune: dict, evaluation: dict, peak_tflops: float,
                      second_compile_s: float | None = None) -> dict:
    """Wall time of the reference experiment's optimizer steps at the step times of the timed epochs (the scripts'
    loops, not the bare steps), plus one compilation per run (the pretraining and each fine-tune compile their own
    model; the second fine-tune's as second_finetune_compile_s measured it, else the first's again, an upper bound),
    plus its evaluations."""
    pretrain_steps = REFERENCE_PRETRAIN_EPOCHS * (REFERENCE_TRAIN_IMAGES // pretrain["batch_size"])
    finetune_steps = (REFERENCE_FINETUNE_RUNS * REFERENCE_FINETUNE_EPOCHS
                      * (REFERENCE_TRAIN_IMAGES // finetune["batch_size"]))
    steps_s = (pretrain_steps * pretrain["epoch_ms_per_step"] / 1e3
               + finetune_steps * finetune["epoch_ms_per_step"] / 1e3)
    second = finetune["compile_s"] if second_compile_s is None else second_compile_s
    compile_s = pretrain["compile_s"] + finetune["compile_s"] + (REFERENCE_FINETUNE_RUNS - 1) * second
    total_flops = (pretrain_steps * pretrain["batch_size"] * pretrain["flops_per_image_train"]
                   + finetune_steps * finetune["batch_size"] * finetune["flops_per_image_train"])
    eval_s = evaluation["reference_seconds"]
    input_ms = finetune["input_ms_per_step"]
    return {"pretrain_steps": pretrain_steps, "finetune_steps": finetune_steps, "steps_minutes": steps_s / 60,
            "finetune_input_minutes_at_most": None if input_ms is None else finetune_steps * input_ms / 1e3 / 60,
            "compile_minutes": compile_s / 60, "second_finetune_compile_s": second_compile_s,
            "evaluation_minutes": eval_s / 60,
            "minutes": (steps_s + compile_s + eval_s) / 60, "total_pflop": total_flops / 1e15,
            "floor_minutes_at_peak": total_flops / (peak_tflops * 1e12) / 60}


# ----------------------------------------------------------------------------------------------------------

def code_version() -> str | None:
    """This checkout's commit, with '+changes' when tracked files differ from it; None outside a git checkout (or
    without git). The JSON keeps it, so that a row of numbers can name the code that produced it."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=30)
        changes = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if commit.returncode or changes.returncode:
        return None
    return commit.stdout.strip() + ("+changes" if changes.stdout.strip() else "")


def library_versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    # Python's too: torch.compile's per-call guard checks take a faster path from CPython 3.12 on
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "triton": triton_version, "python": platform.python_version()}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU, {threads} thread{'s' if threads > 1 else ''}"


def flops_line(parts: dict) -> str:
    return " + ".join(f"{name} {value / 1e9:.4g}" for name, value in parts.items())


def print_report(args, device: torch.device, pretrain: dict | None, finetune: dict | None, evaluation: dict | None,
                 projection: dict | None) -> None:
    """The phases' table and what bench measured around them; the projection where both phases ran."""
    results = [r for r in (pretrain, finetune) if r is not None]  # the phases timed
    both = args.phases == "both"
    print(f"{'phase':<9} {'batch':>6} {'chunk':>6} {'compile s':>10} {'ms/step':>9} {'images/s':>10} "
          f"{'TFLOP/s':>9} {'% of peak':>10} {'GiB':>6} {'in epoch':>9}")
    for r in results:
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        print(f"{r['phase']:<9} {r['batch_size']:>6} {r['chunk']:>6} {r['compile_s']:>10.1f} "
              f"{r['ms_per_step']:>9.2f} {r['images_per_sec']:>10,.0f} {r['tflops']:>9.3f} "
              f"{r['percent_of_peak']:>9.1f}% {memory:>6} {r['epoch_ms_per_step']:>9.2f}")
    print(f"(ms/step: median of {args.repeats} x {args.steps} steps after {args.warmup_steps} warm-up; compile s: "
          f"the warm-up's extra time{'' if args.compile else ', here without compilation: first-step set-up'}; "
          f"in epoch: ms per step of one epoch run by the script's train_one_epoch, which the projection uses, of "
          + ", ".join(f"{args.epoch_images // r['batch_size']} x {r['batch_size']} images ({r['phase']})"
                      for r in results)
          + (f"; fine-tune: train_classifier.py's step with --recipe {args.finetune_recipe})" if finetune is not None
             else ")"))
    for r in results:
        print(f"host syncs in one {r['phase']} step (eager, every operator recorded): "
              f"{', '.join(r['host_syncs']) or 'none'}")
    if device.type == "cuda":
        print(f"host's time to queue a step (the first {HOST_TIMED_CALLS} of each repeat): "
              + ", ".join(f"{r['phase']} {r['host_ms_per_step']:.2f} ms of {r['ms_per_step']:.2f}" for r in results)
              + " (well under: the GPU sets the pace; close: the host does)")
    if finetune is not None:
        eager_ms = finetune["input_ms_per_step_eager"]
        share = (f"; within the step it costs at most that, {projection['finetune_input_minutes_at_most']:.1f} min "
                 "of the projection below") if both else ""
        print(f"fine-tuning input work alone (each chunk taken, augmented and mixed as the step does it, "
              f"augmentation {'compiled' if args.compile else 'eager'}): {finetune['input_ms_per_step']:.2f} ms per "
              f"step{'' if eager_ms is None else f' (eager: {eager_ms:.2f})'}, "
              f"{100 * finetune['input_ms_per_step'] / finetune['ms_per_step']:.0f}% of the step{share}")
    for r in results if args.profile else ():
        print_profile(r, args)
    if not both:
        print(f"evaluation and projection: left out (--phases {args.phases}; they need both phases)")
    else:
        batches = (pretrain["batch_size"], finetune["batch_size"])
        note = "" if batches == REFERENCE_BATCH_SIZES else (f"; NOTE: at batch sizes {batches}, the reference's are "
                                                            f"{REFERENCE_BATCH_SIZES}")
        print(f"evaluation (eager, median of {min(args.repeats, 3)}): mae_pretrain.py's monitor "
              f"{evaluation['pretrain_eval_s']:.3f} s "
              f"(kNN over {evaluation['bank_images']:,} bank + {evaluation['val_images']:,} val images, val "
              f"reconstruction), train_classifier.py's val pass {evaluation['finetune_eval_s']:.3f} s "
              f"({evaluation['val_images']:,} images)")
        second = projection["second_finetune_compile_s"]
        fresh = ", from an empty cache" if args.compile_cache == "fresh" else ""
        cache_note = "" if not args.compile else (
            f"{fresh}: pretraining {pretrain['compile_s']:.1f} s, fine-tuning {finetune['compile_s']:.1f} s, the "
            "second fine-tune " + ("as much (not measured)" if second is None
                                   else f"{second:.1f} s from the cache the first filled"))
        print(f"projected wall time of the reference experiment: {projection['minutes']:.1f} min = "
              f"{REFERENCE_PRETRAIN_EPOCHS} x {REFERENCE_TRAIN_IMAGES // batches[0]} pretraining steps + "
              f"{REFERENCE_FINETUNE_RUNS} x {REFERENCE_FINETUNE_EPOCHS} x {REFERENCE_TRAIN_IMAGES // batches[1]} "
              f"fine-tuning steps ({projection['steps_minutes']:.1f} min) + compilation "
              f"({projection['compile_minutes']:.1f} min{cache_note}) + {REFERENCE_PRETRAIN_EVALS} monitor "
              f"evaluations and {REFERENCE_FINETUNE_EVALS} val passes at {REFERENCE_VAL_IMAGES:,} val images "
              f"({projection['evaluation_minutes']:.1f} min){note}")
        print(f"  not included: start-up (data loading), figures and checkpoints (written by a background thread). Its "
              f"{projection['total_pflop']:.2f} PFLOP of training would take {projection['floor_minutes_at_peak']:.1f} "
              "min at the measured matmul peak")


def print_profile(r: dict, args) -> None:
    """Where a phase's step time goes: the device's kernels (torch.profiler) and the host's functions (cProfile)."""
    prof = r["profile"]
    print(f"where a {r['phase']} step's time goes (torch.profiler, {args.steps} steps; self time per step): "
          f"{prof['busy_ms_per_step']:.2f} ms in {prof['what']}, against {r['ms_per_step']:.2f} ms per timed step")
    print("  by kind: " + ", ".join(f"{kind} {ms:.3f} ms" for kind, ms in prof["kinds_ms_per_step"].items()))
    for (name, ms), kernel in zip(prof["top"], prof["all"]):
        # the most frequent launcher, where the profile has them (a GPU's)
        by = "".join(f"  <- {operator} in {outer} ({calls:g} per step)"
                     for operator, outer, calls in kernel.get("launched_by", [])[:1])
        print(f"  {ms:8.3f} ms {100 * ms / prof['busy_ms_per_step']:5.1f}%  {name}{by}")
    shown = [record for record in prof.get("host_records", []) if record["name"] in HOST_RECORDS_SHOWN]
    if shown:
        print("  the host's side of the same steps (the profiler's records, its own cost included): " + "; ".join(
            f"{record['name']} {record['cpu_ms_per_step']:.3f} ms in {record['calls_per_step']:g} calls"
            for record in shown))
    host = r["host_profile"]
    print(f"where the host's time goes while it queues a {r['phase']} step (cProfile, {args.steps} steps, each "
          f"begun with the device idle; self time per step, cProfile's own cost included): "
          f"{host['ms_per_step']:.2f} ms, against {r['host_ms_per_step']:.2f} ms unprofiled")
    for name, ms in host["top_self"]:
        print(f"  {ms:8.3f} ms {100 * ms / host['ms_per_step']:5.1f}%  {name}")
    print("  by cumulative time (a function and what it calls): "
          + "; ".join(f"{name} {ms:.3f} ms" for name, ms in host["top_cumulative"]))


@utils.explains_compile_failure
@utils.explains_out_of_memory
@utils.with_attention_kernel
def main(args):
    # ---- setup: validate everything before any work or file
    with utils.warnings_after_checks():  # the checks' warnings print when all of them have passed
        if utils.dist_env()[1] > 1:  # its steps would wait for a process group it never joins
            utils.die(f"bench.py times one process: run it with python, not torchrun (WORLD_SIZE="
                      f"{utils.dist_env()[1]})")
        device = utils.resolve_device(args)
        resolve_defaults(args, device)
        cfg = check_args(args)
        amp_dtype = utils.autocast_dtype(args, device)
        inductor = inductor_settings(args)
        for build in (lambda: MAE(cfg), lambda: ViTClassifier(cfg, args.num_classes)):
            utils.check_model_fits(build, device, cfg)
        # after the size check: it puts tensors of the model's shapes on the device, to ask which kernel would run
        attention = utils.attention_choice(cfg, args.attention, device, amp_dtype, class_token_query=True,
                                           decoder=True)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = shlex.join(["python", os.path.basename(sys.argv[0]) or "bench.py", *sys.argv[1:]])
    print(f"config: {vars(args)}")
    compiled = (f"on ({args.compile_mode}, scope {args.compile_scope}, {args.compile_cache} cache"
                f"{''.join(f', {key}={value}' for key, value in inductor.items())})")
    print(f"bench: {date}, {describe_device(device)}, torch {torch.__version__}, autocast {amp_dtype}, "
          f"compile {compiled if args.compile else 'off'}{', step captured' if args.capture_step else ''}, "
          f"data on {args.data_on}, attention {args.attention}"
          f"{f' ({attention})' if args.attention == 'auto' else ''}")
    print(f"model: {args.preset} preset + flags: patch {cfg.patch_size} ({cfg.num_patches} tokens), encoder "
          f"{cfg.embed_dim} x {cfg.depth} blocks ({cfg.num_heads} heads), decoder {cfg.decoder_embed_dim} x "
          f"{cfg.decoder_depth} ({cfg.decoder_num_heads} heads), mask ratio {cfg.mask_ratio}")

    # ---- the ceiling, and the FLOPs per image
    peak = matmul_peak(device, args.repeats, amp_dtype or torch.float32)
    print(f"matmul peak: {peak['dtype']} {peak['size']}^3 product, {peak['tflops']:.3f} TFLOP/s "
          f"(median of {args.repeats})")
    mae_parts, cls_parts = mae_forward_flops(cfg), classifier_forward_flops(cfg, args.num_classes)
    mae_fwd, cls_fwd = sum(mae_parts.values()), sum(cls_parts.values())
    print(f"FLOPs per image, analytic (matrix products; a training step = {TRAIN_FLOPS_PER_FORWARD} x forward), "
          "GFLOP:")
    print(f"  pretrain forward {mae_fwd / 1e9:.4f} = {flops_line(mae_parts)}; training "
          f"{TRAIN_FLOPS_PER_FORWARD * mae_fwd / 1e9:.4f}")
    print(f"  finetune forward {cls_fwd / 1e9:.4f} = {flops_line(cls_parts)}; training "
          f"{TRAIN_FLOPS_PER_FORWARD * cls_fwd / 1e9:.4f}")

    # ---- data: uint8 images where --data_on puts them, as the scripts keep CIFAR-10 (random pixels: the speed is
    # the same)
    data_device = torch.device("cpu") if args.data_on == "host" else device
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randint(0, 256, (REFERENCE_TRAIN_IMAGES, cfg.in_chans, cfg.img_size, cfg.img_size),
                           dtype=torch.uint8, generator=g).to(data_device)
    labels = torch.randint(0, args.num_classes, (REFERENCE_TRAIN_IMAGES,), generator=g).to(data_device)

    # ---- the two steps, each with its own model and optimizer, as each script builds them
    torch.manual_seed(args.seed)
    import torch._inductor.config as inductor_config
    both = args.phases == "both"
    pretrain = finetune = evaluation = projection = None
    with compile_cache(args), inductor_config.patch(inductor):
        if args.phases in ("both", "pretrain"):
            pretrain = bench_phase(pretrain_phase(cfg, images, args, device), args, device, data_device, amp_dtype,
                                   peak["tflops"])
        if args.phases in ("both", "finetune"):
            finetune = bench_phase(finetune_phase(cfg, images, labels, args, device), args, device, data_device,
                                   amp_dtype, peak["tflops"])
        # Only for the projection of record, a first run's (--compile_cache fresh): the variants compared with
        # --compile_cache shared are about step times, and the extra process would cost each of them its start-up.
        measure_second = both and args.compile and args.compile_cache == "fresh"
        second_compile_s = second_finetune_compile_s(args) if measure_second else None
    if both:
        evaluation = bench_evaluation(cfg, images, labels, args, device, data_device, amp_dtype)
        projection = project_reference(pretrain, finetune, evaluation, peak["tflops"], second_compile_s)

    # ---- report
    print_report(args, device, pretrain, finetune, evaluation, projection)
    if args.json:
        utils.save_json(args.json, {
            "date": date, "command": command, "code": code_version(), "device": describe_device(device),
            "torch": torch.__version__, "versions": library_versions(),
            "autocast": str(amp_dtype), "compile": args.compile, "attention_kernel": attention, "config": vars(args),
            "model": dataclasses.asdict(cfg),
            "matmul_peak": peak, "flops_per_image_forward": {"pretrain": mae_parts, "finetune": cls_parts},
            "pretrain": pretrain, "finetune": finetune, "evaluation": evaluation, "projection": projection})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
