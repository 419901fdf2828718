"""Masked-autoencoder pretraining of a ViT-Tiny on CIFAR-10.

The reference experiment (one GPU; `python mae_pretrain.py` with no flags runs it too, saving to vit-t-mae.pt):
    python mae_pretrain.py --batch_size 512 --max_device_batch_size 256 --total_epoch 150 \
        --model_path vit-t-mae-150ep.pt
Several GPUs on one node, or several nodes (--batch_size stays the global batch):
    torchrun --nproc_per_node=4 mae_pretrain.py --batch_size 512 --max_device_batch_size 128
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 mae_pretrain.py
A tiny CPU run that needs no files (under a minute on 2 cores):
    python mae_pretrain.py --device cpu --dataset fake --fake_size 256 --total_epoch 2 --warmup_epoch 1 \
        --batch_size 64 --max_device_batch_size 32 --depth 2 --embed_dim 64 --num_heads 2 --patch_size 4 \
        --decoder_depth 1 --decoder_embed_dim 64 --decoder_num_heads 2 --model_path /tmp/mae.pt \
        --output_dir /tmp/mae_out --log_dir /tmp/mae_logs
"""
import contextlib
import dataclasses
import math
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

import data
import utils
from model import MAE, POOLS, MAEConfig, count_params, mask_noise, num_masked_patches, reconstruct

# Flags that define the run: a checkpoint only resumes under the same values (the schedule and the model
# must be the ones it was trained with). max_device_batch_size, devices, --model_path and --log_dir may change;
# --output_dir must hold the run's log.jsonl (load_resume).
RUN_DEFINING_FLAGS = ("seed", "batch_size", "base_learning_rate", "weight_decay", "min_lr", "mask_ratio",
                      "total_epoch", "warmup_epoch", "schedule", "norm_pix_loss", "augment", "dataset", "val_split",
                      "fake_size", *utils.MODEL_SIZE_FLAGS)
# Flags a resume may change that change what the kNN accuracy measures: its epochs before and after the change are
# then two protocols in one curve, so a resume that changes them says so (--eval_every changes only when it is taken).
KNN_PROTOCOL_FLAGS = ("knn_k", "knn_temperature", "knn_feature")
CHECKPOINT_FIELDS = {"model": dict, "optimizer": dict, "scaler": dict, "epoch": int, "losses": list, "evals": list,
                     "args": dict, "config": dict}
EVAL_METRICS = ("knn_acc", "val_loss", "val_psnr")
# What a run writes in --output_dir, besides each epoch's figure, recon_epoch_<epoch>.png.
OUTPUT_NAMES = ("args.json", "log.jsonl", "losses.npy", "eval_epochs.npy", *(f"{name}.npy" for name in EVAL_METRICS))
NUM_VIS = 16  # val images in the per-epoch reconstruction figure (2 rows of 8)


def get_args_parser():
    parser = utils.ArgumentParser(description="MAE pretraining of a ViT on CIFAR-10")
    # Schedule and optimisation (the reference's flags, same names and meaning)
    utils.add_schedule_args(parser, batch_size=512, max_device_batch_size=256, base_learning_rate=1.5e-4,
                            total_epoch=150, warmup_epoch=10, schedule="warmup_cosine",
                            draws="the masks (and --augment's crops and flips)")
    # MAE (defaults: MAEConfig's, as the model-size flags' are)
    parser.add_argument("--mask_ratio", type=utils.finite_float, default=MAEConfig().mask_ratio,
                        help="share of patches masked, in (0, 1)")
    parser.add_argument("--norm_pix_loss", action="store_true",
                        help="regress per-patch normalised pixels (MAE paper); figures borrow the hidden "
                        "patches' true mean and std, and there is no val PSNR")
    parser.add_argument("--augment", action="store_true",
                        help="random resized crop (scale 0.2-1) + horizontal flip; off in the reference")
    # Model size (ViT-Tiny by default; ViT-Small: --embed_dim 384 --num_heads 6)
    utils.add_model_size_args(parser, vit_t_defaults=True)
    # Monitoring the encoder while it trains
    parser.add_argument("--eval_every", type=int, default=25,
                        help="epochs between kNN / val-reconstruction evaluations, plus one at the end; each "
                             "costs under one epoch's FLOPs, so 25 keeps them under 5%% of the run (0: never)")
    parser.add_argument("--knn_k", type=int, default=20, help="neighbours in the weighted kNN vote")
    parser.add_argument("--knn_temperature", type=utils.finite_float, default=0.07, help="temperature of the kNN vote")
    parser.add_argument("--knn_feature", default="avg", choices=POOLS,
                        help="kNN feature, named as train_classifier.py's --global_pool: mean patch token (avg; "
                             "MAE's class token gets no loss of its own in pretraining) or class token")
    # Data
    data.add_data_args(parser)
    # Runtime
    utils.add_runtime_args(parser)
    parser.add_argument("--log_interval", type=int, default=25,
                        help="optimizer steps between progress-bar updates (each reads the loss from the GPU)")
    # Outputs and resuming
    parser.add_argument("--model_path", default="vit-t-mae.pt", help="checkpoint, rewritten after every epoch")
    parser.add_argument("--output_dir", default="outputs",
                        help="losses.npy, log.jsonl, args.json and one reconstruction PNG per epoch")
    parser.add_argument("--log_dir", default="logs/mae_pretrain", help="TensorBoard event files")
    parser.add_argument("--resume", default="", help="checkpoint to continue from (its next epoch)")
    parser.add_argument("--stop_after", type=int, default=0,
                        help="stop after this epoch, checkpoint kept, e.g. to fit a job's time limit; "
                             "continue with --resume (0: run to --total_epoch)")
    return parser


def check_args(args) -> None:
    """Every flag checked before anything is read or written, so bad input costs nothing."""
    utils.check_schedule_args(args)
    if args.schedule == "reference" and args.min_lr:  # its cosine ends at 0: the flag would be ignored
        utils.die(f"--min_lr {args.min_lr} is for --schedule warmup_cosine; the reference schedule ends at 0: pass "
                  "--schedule warmup_cosine, or leave --min_lr out")
    positive = ("log_interval", "knn_k", *utils.MODEL_SIZE_FLAGS)
    for name in positive:
        if getattr(args, name) < 1:
            utils.die(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not 0.0 < args.mask_ratio < 1.0:  # the loss is a mean over the masked patches: some must be masked
        utils.die(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.eval_every < 0 or args.knn_temperature <= 0:
        utils.die(f"--eval_every must be >= 0 and --knn_temperature > 0, got {args.eval_every} and "
                  f"{args.knn_temperature}")
    if args.stop_after < 0:
        utils.die(f"--stop_after must be >= 0, got {args.stop_after}")
    utils.check_run_outputs(args, "--model_path")
    # A run resumed from its --model_path replaces the file it resumes, which load_resume checks as such.
    if not (args.resume and os.path.realpath(args.resume) == os.path.realpath(args.model_path)):
        utils.check_replaces_own("--model_path", args.model_path, lambda ckpt: {"model", "config", "losses"} <=
                                 ckpt.keys() and "num_classes" not in ckpt, "a mae_pretrain.py checkpoint")
    utils.check_no_folder_at("--output_dir", args.output_dir, OUTPUT_NAMES, ["recon_epoch_*.png"])
    utils.check_data_args(args)


def load_resume(args, cfg):
    """-> (checkpoint, the log records of its epochs), or one-line death; read before anything is written."""
    ckpt = utils.load_checkpoint(args.resume, "--resume", CHECKPOINT_FIELDS)
    # A checkpoint from before --schedule existed ran warmup_cosine, the only schedule then (load_checkpoint has
    # checked that its args are a dict).
    ckpt["args"].setdefault("schedule", "warmup_cosine")
    utils.check_resumable(ckpt, args, RUN_DEFINING_FLAGS)
    # The curves go on from these lists: one loss per epoch, and the kNN evaluations so far.
    losses, epoch = ckpt["losses"], ckpt["epoch"]
    if len(losses) != epoch or not all(map(utils.is_number, losses)):
        shown = f"{losses[:4]!r}"[:-1] + (", ...]" if len(losses) > 4 else "]")
        utils.die(f"--resume {args.resume!r}: its losses should be one number per epoch up to its epoch {epoch}, "
                  f"found {len(losses)}: {shown[:100]}")
    metrics = monitor_metrics(args.norm_pix_loss)
    bad = [e for e in ckpt["evals"] if not (isinstance(e, dict) and e.keys() == {"epoch", *metrics}
                                            and type(e["epoch"]) is int
                                            and all(utils.is_number(e[name]) for name in metrics))]
    if bad:  # the record shown says which name is missing or extra (a checkpoint from before a metric was added)
        shown = repr(bad[0]) if len(repr(bad[0])) <= 100 else repr(bad[0])[:97] + "..."
        utils.die(f"--resume {args.resume!r}: its evals should be records of an integer epoch and the numbers "
                  f"{', '.join(metrics)} each, found {shown}")
    with torch.device("meta"):  # the model's shapes, without its memory
        model = MAE(cfg)
    utils.check_resume_state(ckpt, args, model, optimizer_groups(model, args))
    changed = {name: ckpt["args"].get(name) for name in KNN_PROTOCOL_FLAGS
               if ckpt["args"].get(name) != getattr(args, name)}
    if changed and ckpt["evals"]:
        now = " and ".join(f"--{name} {getattr(args, name)}" for name in changed)
        before = " and ".join(str(value) for value in changed.values())
        utils.warn(f"{now}, where --resume {args.resume!r} had {before}: the kNN accuracies from here on are not "
                   f"comparable with its {len(ckpt['evals'])} kNN evaluations (epochs up to "
                   f"{ckpt['evals'][-1]['epoch']}), though they share one curve")
    # losses.npy goes on from the checkpoint, log.jsonl from this file: it must hold the checkpoint's epochs with
    # its losses, or the two would disagree (a resume into another --output_dir, or one holding another run's log).
    return ckpt, utils.resumed_log(os.path.join(args.output_dir, "log.jsonl"), epoch,
                                   lambda r: r.get("loss") == losses[r["epoch"] - 1], "its losses", "--output_dir")


def optimizer_groups(model, args) -> list:
    """No weight decay on norms, biases and tokens: two groups."""
    return utils.weight_decay_groups(model, args.weight_decay)


def make_optimizer(model, args, device):
    """The MAE recipe's AdamW (betas 0.9, 0.95) over optimizer_groups."""
    return utils.make_adamw(optimizer_groups(model, args), utils.peak_lr(args), (0.9, 0.95), device)


def train_step(model, optimizer, scaler, train_images, batch_idx, lr, args, device, amp_dtype, loss_sum,
               graphs=None):
    """One optimizer step on the global batch `batch_idx`; adds each chunk's loss to the device-side loss_sum.
    With `graphs` (a utils.StepGraphs, --capture_step) each chunk's model work and the update replay its graphs.

    Under torchrun every process draws the same random numbers for the whole global batch, then takes its own
    slice: the processes see disjoint images, and each image gets the same mask (and crop) whatever the number
    of processes and chunks, so runs agree across world sizes.
    """
    rank, world_size, _ = utils.dist_env()
    mine = utils.shard(args.batch_size, rank, world_size)
    chunk = utils.device_chunk(args)
    accum_steps = utils.chunks_per_step(args)
    num_patches = (train_images.shape[-1] // args.patch_size) ** 2
    utils.set_lr(optimizer, lr)
    noise = mask_noise(args.batch_size, num_patches, device)[mine]
    # Per image: 4 numbers for random_resized_crop (area, aspect ratio, x, y), the 5th for the flip.
    crop_rand = torch.rand(args.batch_size, 5, device=device)[mine] if args.augment else None

    def forward_backward(imgs, chunk_noise):
        with utils.autocast(device, amp_dtype):
            loss, _, _ = model(imgs, noise=chunk_noise, masked_only=True)  # the loss reads no other patch
        # Chunks are equal-sized, so dividing by their number makes the summed gradient the batch mean.
        utils.backward(scaler.scale(loss / accum_steps), optimizer)
        return loss.detach()

    for c, chunk_idx in enumerate(batch_idx[mine].split(chunk)):
        utils.mark_chunk_begin()
        part = slice(c * chunk, (c + 1) * chunk)
        imgs = data.normalize(data.take(train_images, chunk_idx, device))
        if args.augment:
            imgs = data.random_resized_crop(imgs, scale=(0.2, 1.0), rand=crop_rand[part, :4])
            imgs = data.random_hflip(imgs, rand=crop_rand[part, 4])
        loss_sum += graphs.chunk(forward_backward, imgs, noise[part]) if graphs else forward_backward(imgs, noise[part])
    if graphs:
        graphs.update()
    else:
        utils.optimizer_step(optimizer, scaler)


def train_one_epoch(model, optimizer, scaler, train_images, args, epoch, device, amp_dtype, writer, graphs=None):
    """One pass over the training set, every process cutting the same permutation. The loss stays on the
    device and is read only every log_interval steps and at the end, so the GPU never waits for the host."""
    model.train()
    rank, world_size, _ = utils.dist_env()
    chunks_per_step = utils.chunks_per_step(args)
    batches = data.epoch_batches(len(train_images), args.batch_size, data.epoch_seed(args.seed, epoch),
                                 train_images.device)
    steps_per_epoch, peak_lr = len(batches), utils.peak_lr(args)
    total_steps, warmup_steps = args.total_epoch * steps_per_epoch, args.warmup_epoch * steps_per_epoch
    loss_sum = torch.zeros((), device=device)
    start = time.perf_counter()
    bar = tqdm(batches, desc=f"epoch {epoch}/{args.total_epoch}", leave=False, dynamic_ncols=True, disable=rank > 0)
    for i, batch_idx in enumerate(bar):
        step = (epoch - 1) * steps_per_epoch + i
        lr = utils.scheduled_lr(step, total_steps, warmup_steps, peak_lr, args)
        train_step(model, optimizer, scaler, train_images, batch_idx, lr, args, device, amp_dtype, loss_sum, graphs)
        if writer:
            writer.add_scalar("lr", lr, step)
        if (i + 1) % args.log_interval == 0 and rank == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / ((i + 1) * chunks_per_step):.4f}",
                            img_s=f"{(i + 1) * args.batch_size / (time.perf_counter() - start):,.0f}")
    # The epoch's one unconditional sync: the mean over every chunk of every process.
    mean_loss = utils.all_reduce_sum(loss_sum).item() / (len(batches) * chunks_per_step * world_size)
    seconds = time.perf_counter() - start
    return {"epoch": epoch, "loss": mean_loss, "lr": lr, "images_per_sec": len(batches) * args.batch_size / seconds,
            "seconds": seconds}


@torch.no_grad()
@utils.eager()
def reconstruct_val(model, val_imgs, noise, cfg, amp_dtype):
    """Masked input, reconstruction and original of the fixed val images, in [0, 1] for display. The mask
    noise is fixed too, so the figures of different epochs are directly comparable."""
    model.eval()
    with utils.autocast(val_imgs.device, amp_dtype):
        _, pred, mask = model(val_imgs, noise=noise)
    masked, recon = reconstruct(val_imgs, pred, mask, cfg.patch_size, cfg.norm_pix_loss)
    return data.denormalize(masked), data.denormalize(recon), data.denormalize(val_imgs)


def monitor_metrics(norm_pix_loss: bool) -> list:
    """The numbers each evaluation gives (evaluate says why there is no PSNR with norm_pix_loss)."""
    return [name for name in EVAL_METRICS if name != "val_psnr" or not norm_pix_loss]


@torch.no_grad()
@utils.eager()
def evaluate(model, train, val, val_noise, args, device, amp_dtype):
    """kNN accuracy of the encoder's features (train split as the bank, val split as queries), and the val
    reconstruction under fixed masks: masked MSE (the training loss) and PSNR of the masked patches in
    [0, 1] pixel space. Each process embeds and reconstructs a shard of both splits; features are gathered,
    sums are reduced; everything stays on the device until the numbers at the end.

    With norm_pix_loss there is no PSNR: the model predicts each hidden patch up to its mean and scale, and
    putting pixels back would borrow the true patch's own mean and std, 2 of its p*p*C values (a model that
    always predicts 0 would score about 20 dB on CIFAR-10 that way, above a trained pixel-target model)."""
    model.eval()
    bs = utils.eval_chunk(args.max_device_batch_size)

    def features(imgs):  # L2-normalised: the kNN's dot products are cosine similarities
        return F.normalize(model.encoder.pooled(imgs, args.knn_feature).float(), dim=1)
    bank = utils.embed_all(features, train.images, bs, amp_dtype, device)
    queries = utils.embed_all(features, val.images, bs, amp_dtype, device)
    pred = utils.knn_predict(bank, train.labels.to(device), queries, len(train.classes), args.knn_k,
                             args.knn_temperature)
    knn_acc = (pred == val.labels.to(device)).float().mean()  # the same on every process: all features gathered

    zero = torch.zeros((), device=device)
    loss_sum, sq_err_sum, masked_pixels = zero, zero, zero
    for chunk_idx in utils.shard_chunks(len(val), bs, val.images.device):
        imgs = data.normalize(data.take(val.images, chunk_idx, device))
        with utils.autocast(imgs.device, amp_dtype):
            loss, pred_patches, mask = model(imgs, noise=data.take(val_noise, chunk_idx, device))
        loss_sum = loss_sum + loss.float() * len(chunk_idx)
        if not model.cfg.norm_pix_loss:
            _, recon = reconstruct(imgs, pred_patches, mask, model.cfg.patch_size)
            # Visible patches are pasted back, so the squared error is non-zero only on masked pixels.
            sq_err_sum = sq_err_sum + (data.denormalize(recon) - data.denormalize(imgs)).pow(2).sum()
            masked_pixels = masked_pixels + mask.sum() * model.cfg.patch_size ** 2 * imgs.shape[1]
    loss_sum, sq_err_sum, masked_pixels = utils.all_reduce_sum(
        torch.stack([loss_sum, sq_err_sum, masked_pixels])).tolist()
    metrics = {"knn_acc": knn_acc.item(), "val_loss": loss_sum / len(val)}
    if not model.cfg.norm_pix_loss:
        metrics["val_psnr"] = 10 * math.log10(1 / max(sq_err_sum / max(masked_pixels, 1), 1e-10))
    return metrics


@utils.explains_compile_failure
@utils.explains_out_of_memory
@utils.with_attention_kernel
def main(args):
    # ---- setup: validate everything before touching the disk
    with utils.warnings_after_checks():  # the checks' warnings print when all of them have passed
        check_args(args)
        cfg = utils.mae_config(args, norm_pix_loss=args.norm_pix_loss)
        device = utils.resolve_device(args)
        utils.check_model_fits(lambda: MAE(cfg), device, cfg)
        utils.resolve_runtime(args, device)
        ckpt, resumed_log = load_resume(args, cfg) if args.resume else (None, [])
        train, val, steps_per_epoch = utils.load_training_data(args, cfg.img_size)
        if args.eval_every and args.knn_k > len(train):  # the vote would use fewer, and the figure name this k
            utils.die(f"--knn_k {args.knn_k} is more than the {len(train)} training images the kNN vote takes its "
                      f"neighbours from: pass at most {len(train)}")
        amp_dtype = utils.autocast_dtype(args, device)
        attention = utils.attention_choice(cfg, args.attention, device, amp_dtype, args.knn_feature == "token",
                                           decoder=True)
        utils.init_distributed(device)
        data_device = utils.data_device(train, val, device, args)  # after init: the processes decide together
        rank, world_size, _ = utils.dist_env()
        main_process = rank == 0  # only it prints and writes files
        log_print = print if main_process else (lambda *a, **k: None)
        torch.manual_seed(args.seed)

        log_print(f"config: {vars(args)}")
        log_print(f"data: {args.dataset}, {len(train)} train / {len(val)} val images, {steps_per_epoch} "
                  f"step{'s' * (steps_per_epoch != 1)} per epoch; device {device} x {world_size} process(es), "
                  f"autocast {amp_dtype}, attention {attention}; images in {utils.memory_name(data_device)}")
        if main_process:
            utils.warn_if_logged_before(args)
        utils.make_output_folders({"--output_dir": args.output_dir, "--log_dir": args.log_dir,
                                   "--model_path": os.path.dirname(os.path.abspath(args.model_path))}, device)
    if main_process:
        utils.save_json(os.path.join(args.output_dir, "args.json"), vars(args))
        utils.remove_epoch_files(args.output_dir, "recon_epoch_", ".png", after=ckpt["epoch"] if ckpt else -1)

    # ---- data: the whole uint8 dataset lives on the device (or, when it does not fit there, on the host)
    train, val = train.to(data_device), val.to(data_device)
    # Fixed mask noise for the validation images: figures and val losses of different epochs see the same masks.
    # It lives with the images, so evaluation takes both the same way.
    val_noise = mask_noise(len(val), cfg.num_patches, generator=torch.Generator().manual_seed(0)).to(data_device)
    vis_imgs, vis_noise = data.normalize(val.images[:NUM_VIS].to(device)), val_noise[:NUM_VIS].to(device)

    # ---- model and optimizer
    model = MAE(cfg).to(device)  # same initial weights on every process: same seed
    masked = num_masked_patches(cfg.num_patches, cfg.mask_ratio)  # what --mask_ratio rounds to: 0.999 keeps one
    log_print(f"model: {count_params(model.encoder) / 1e6:.2f}M encoder + {count_params(model.decoder) / 1e6:.2f}M "
              f"decoder parameters, {cfg.num_patches} patches, {masked} masked ({masked / cfg.num_patches:.1%})")
    optimizer = make_optimizer(model, args, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, losses, evals, log = 1, [], [], resumed_log
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when the checkpoint's run was not fp16; a new fp16 scale settles within steps
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, losses, evals = ckpt["epoch"] + 1, list(ckpt["losses"]), list(ckpt["evals"])
        log_print(f"resumed from {args.resume} at epoch {start_epoch}")
    utils.broadcast_state(model)
    train_model = utils.compile_model(model, args) if args.compile else model
    graphs = utils.StepGraphs(optimizer) if args.capture_step else None  # after the resume's load_state_dict
    writer = SummaryWriter(args.log_dir) if main_process else None
    background = utils.BackgroundWriter()  # figures, logs and checkpoints, written while the next epoch trains
    digests = {}  # epoch -> its checkpoint's encoder SHA-256: filled by the writer thread, read after its close()

    # ---- loop
    last_epoch = min(args.total_epoch, args.stop_after or args.total_epoch)
    for epoch in range(start_epoch, last_epoch + 1):
        utils.seed_epoch(args.seed, epoch)
        stats = train_one_epoch(train_model, optimizer, scaler, train.images, args, epoch, device, amp_dtype, writer,
                                graphs)
        if not math.isfinite(stats["loss"]):
            kept = f"The checkpoint at {args.model_path} still holds epoch {epoch - 1}" if epoch > 1 else \
                "This run wrote no checkpoint"
            raise SystemExit(f"epoch {epoch}: the loss is {stats['loss']}; stopping. {kept}. Try a lower "
                             "--base_learning_rate.")
        losses.append(stats["loss"])
        if args.eval_every and (epoch % args.eval_every == 0 or epoch == args.total_epoch):
            metrics = evaluate(model, train, val, val_noise, args, device, amp_dtype)
            evals.append({"epoch": epoch, **metrics})
            stats.update(metrics)
        log.append(stats)
        if main_process:
            figures = [t.cpu() for t in reconstruct_val(model, vis_imgs, vis_noise, cfg, amp_dtype)]
            checkpoint = utils.to_cpu({"model": model.state_dict(), "optimizer": utils.optimizer_state(optimizer),
                                       "scaler": scaler.state_dict(), "epoch": epoch, "losses": list(losses),
                                       "evals": list(evals), "args": vars(args),
                                       "config": dataclasses.asdict(cfg)})
            background.submit(save_epoch_outputs, args, writer, dict(stats), list(evals), list(log), figures,
                              checkpoint, digests)
        monitor = (f" | kNN {stats['knn_acc']:.2%} | val loss {stats['val_loss']:.4f}" if "knn_acc" in stats else "")
        monitor += f" | val PSNR {stats['val_psnr']:.2f} dB" if "val_psnr" in stats else ""
        log_print(f"epoch {epoch:3d}/{args.total_epoch} | loss {stats['loss']:.5f} | lr {stats['lr']:.2e} | "
                  f"{stats['images_per_sec']:,.0f} img/s | {stats['seconds']:.1f} s{monitor}")

    background.close()
    if writer:
        writer.close()
    if main_process:  # an epoch always ran: a resume with none left is refused
        best = min(range(len(losses)), key=losses.__getitem__)
        # The digest train_classifier.py prints and keeps for the encoder it starts from: the two logs then tell
        # which pretraining, and which of its epochs, a fine-tune used.
        log_print(f"done: best loss {losses[best]:.5f} at epoch {best + 1}, last {losses[-1]:.5f}; checkpoint "
                  f"{args.model_path} (its encoder's SHA-256 {digests[len(losses)][:12]})")
    if evals:
        best_knn = max(evals, key=lambda e: e["knn_acc"])
        log_print(f"kNN accuracy: last {evals[-1]['knn_acc']:.2%} (epoch {evals[-1]['epoch']}), best "
                  f"{best_knn['knn_acc']:.2%} (epoch {best_knn['epoch']})")
    if last_epoch < args.total_epoch:
        log_print(f"stopped after epoch {last_epoch} of {args.total_epoch} (--stop_after): the same command with "
                  f"--resume {args.model_path} continues the run")
    utils.close_distributed()


def recon_title(stats: dict, images: int) -> str:
    """The epoch's reconstruction figure's title: what its images are, and the epoch's numbers, the val ones (which
    are of the same images, under the same masks, and more) when the epoch was evaluated."""
    shown = "the val image" if images == 1 else f"the first {images} val images"  # --val_split 1 holds out one
    title = f"epoch {stats['epoch']}: {shown}, fixed masks | train loss {stats['loss']:.4f}"
    if "val_loss" in stats:
        title += f" | val loss {stats['val_loss']:.4f}"
    if "val_psnr" in stats:
        title += f", masked patches' PSNR {stats['val_psnr']:.2f} dB"
    return title


def save_epoch_outputs(args, writer, stats, evals, log, figures, checkpoint, digests):
    """Everything an epoch leaves on disk (main process, background thread): figure, TensorBoard, arrays,
    log, checkpoint. Takes CPU copies only, so training may go on meanwhile."""
    epoch = stats["epoch"]
    # Each epoch's log line names the encoder its checkpoint held, as train_classifier.py names the one it starts
    # from: plot_results.py tells from the two whether a fine-tune started from this run's last epoch. Hashed
    # here, off the training's critical path (a resumed run's earlier lines keep theirs).
    digests[epoch] = utils.encoder_digest(checkpoint["model"])
    log = [{**r, "encoder_sha256": digests[r["epoch"]]} if r["epoch"] in digests else r for r in log]
    masked, recon, original = figures
    utils.save_recon_figure(os.path.join(args.output_dir, f"recon_epoch_{epoch:03d}.png"), masked, recon,
                            original, title=recon_title(stats, len(masked)))
    writer.add_scalar("mae_loss", stats["loss"], epoch)
    writer.add_scalar("images_per_sec", stats["images_per_sec"], epoch)
    writer.add_image("mae_image", utils.recon_grid_tensor(masked, recon, original), epoch)
    names = monitor_metrics(args.norm_pix_loss) if evals else []
    if evals and evals[-1]["epoch"] == epoch:
        for name in names:
            writer.add_scalar(name, stats[name], epoch)
        for name in ("epoch", *names):
            utils.save_npy(os.path.join(args.output_dir, f"{'eval_epochs' if name == 'epoch' else name}.npy"),
                           [e[name] for e in evals], "int64" if name == "epoch" else "float64")
    # A monitor array this run does not write (none before its first evaluation) is an earlier run's in the same
    # --output_dir, which plot_results would draw beside this run's losses as this run's.
    written = ["eval_epochs", *names] if evals else []
    for name in ("eval_epochs", *EVAL_METRICS):
        if name not in written:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(args.output_dir, f"{name}.npy"))
    writer.flush()
    utils.save_npy(os.path.join(args.output_dir, "losses.npy"), checkpoint["losses"])
    utils.write_jsonl(os.path.join(args.output_dir, "log.jsonl"), log)
    utils.atomic_save(checkpoint, args.model_path)


if __name__ == "__main__":
    utils.exit_on_stop_signals()
    main(get_args_parser().parse_args())
