"""End-to-end tests of mae_pretrain.py on tiny CPU runs: outputs, resume, real images, bad input.

Run: python -m pytest -q tests/test_mae_pretrain.py
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import (FIXTURE_DIR, ROOT, TINY_MODEL, LrRecorder, check_resume_refuses_each_defining_flag,
                      logged_before_warning, stop_with_sigterm, tiny_pretrain_argv, warmup_cosine_lrs)


def test_two_epoch_run_writes_every_output(tmp_path, run_pretrain):
    run_pretrain(tiny_pretrain_argv(tmp_path))
    out, logs = tmp_path / "run" / "outputs", tmp_path / "run" / "logs"

    losses = np.load(out / "losses.npy")
    assert losses.shape == (2,) and np.all(np.isfinite(losses))

    for epoch in (1, 2):
        with Image.open(out / f"recon_epoch_{epoch:03d}.png") as im:
            assert im.width > 200 and im.height > 200

    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["loss"] for r in records] == pytest.approx(losses.tolist())
    assert {"lr", "images_per_sec", "seconds"} <= set(records[0])
    # An epoch's lr is that of its last step, as the per-step TensorBoard curve has it (4 steps an epoch).
    step_lrs = [e.value for e in EventAccumulator(str(logs), size_guidance={"scalars": 0}).Reload().Scalars("lr")]
    assert [r["lr"] for r in records] == pytest.approx([step_lrs[3], step_lrs[7]], rel=1e-6)
    saved = json.load(open(out / "args.json"))
    assert saved["total_epoch"] == 2
    # What ran, not the flags' None: fp32 and eager are the CPU's defaults, and CUDA graphs need CUDA.
    assert (saved["precision"], saved["compile"], saved["compile_mode"]) == ("fp32", False, "default")

    events = EventAccumulator(str(logs), size_guidance={"scalars": 0, "images": 0}).Reload()
    mae_loss = events.Scalars("mae_loss")
    assert [e.step for e in mae_loss] == [1, 2]
    assert [e.value for e in mae_loss] == pytest.approx(losses.tolist(), rel=1e-6)
    assert len(events.Scalars("lr")) == 2 * (128 // 32)  # one per optimizer step
    assert len(events.Images("mae_image")) == 2

    ckpt = torch.load(tmp_path / "run" / "mae.pt", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["losses"] == pytest.approx(losses.tolist())
    assert {"model", "optimizer", "scaler", "args", "config"} <= set(ckpt)
    assert isinstance(ckpt["args"], dict) and ckpt["config"]["embed_dim"] == 32

    # The default --eval_every (25) is longer than this run: the encoder is evaluated once, at the end,
    # and every sink gets the same numbers.
    assert np.load(out / "eval_epochs.npy").tolist() == [2] and np.load(out / "eval_epochs.npy").dtype == np.int64
    for name in ("knn_acc", "val_loss", "val_psnr"):
        values = np.load(out / f"{name}.npy")
        assert values.shape == (1,) and np.isfinite(values).all()
        assert "knn_acc" not in records[0] and records[1][name] == pytest.approx(values[0])
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(2, pytest.approx(values[0], rel=1e-6))]
        assert ckpt["evals"][0][name] == pytest.approx(values[0])
    assert 0.0 <= np.load(out / "knn_acc.npy")[0] <= 1.0
    # What the run checks for a folder in the way at its start (its OUTPUT_NAMES and the figures' pattern) is what
    # it wrote.
    import mae_pretrain
    assert sorted(os.listdir(out)) == sorted([*mae_pretrain.OUTPUT_NAMES, "recon_epoch_001.png", "recon_epoch_002.png"])


def test_the_model_starts_from_the_seeds_initialisation(tmp_path, run_pretrain, monkeypatch):
    """--seed sets the MAE's initial weights: the model a run builds is MAE(cfg) built right after
    torch.manual_seed(--seed), and another seed's differs (several seeds of a study start from other models)."""
    import mae_pretrain
    import utils
    built, real_mae = [], mae_pretrain.MAE

    def recording(cfg):
        model = real_mae(cfg)
        if not any(p.is_meta for p in model.parameters()):  # not the size checks' meta builds
            built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model
    monkeypatch.setattr(mae_pretrain, "MAE", recording)
    for seed in (7, 8):
        run_pretrain(tiny_pretrain_argv(tmp_path, "--seed", str(seed), "--total_epoch", "1", "--eval_every", "0",
                                        name=f"seed{seed}"))
    cfg = utils.mae_config(mae_pretrain.get_args_parser().parse_args(tiny_pretrain_argv(tmp_path)))
    torch.manual_seed(7)
    expected = real_mae(cfg).state_dict()
    assert len(built) == 2 and all(torch.equal(built[0][k], v) for k, v in expected.items())
    assert not torch.equal(built[0]["encoder.patch_embed.weight"], built[1]["encoder.patch_embed.weight"])


def test_a_fresh_run_leaves_no_monitor_array_or_figure_of_an_earlier_run_in_its_output_dir(tmp_path, run_pretrain):
    """A new run in the --output_dir of an earlier one removes the monitor arrays it does not write itself: all of
    them before its first evaluation, val_psnr.npy under --norm_pix_loss. plot_results drew the earlier run's kNN
    accuracy as this run's. The earlier run's figures of epochs this one does not reach go too; other files stay."""
    out = tmp_path / "run" / "outputs"
    run_pretrain(tiny_pretrain_argv(tmp_path, "--eval_every", "1"))
    assert {"eval_epochs.npy", "knn_acc.npy", "val_loss.npy", "val_psnr.npy"} <= set(os.listdir(out))
    others = ["recon_epoch_7.png.bak", "recon_epoch_x.png", "notes.txt", "recon_epoch_٣.png"]
    for name in others:
        (out / name).write_text("kept")
    run_pretrain(tiny_pretrain_argv(tmp_path, "--eval_every", "1", "--norm_pix_loss", "--total_epoch", "1"))
    assert np.load(out / "eval_epochs.npy").tolist() == [1] and not (out / "val_psnr.npy").exists()
    assert sorted(name for name in os.listdir(out) if name.startswith("recon_epoch_") and name not in others) == [
        "recon_epoch_001.png"]
    assert all((out / name).read_text() == "kept" for name in others)
    run_pretrain(tiny_pretrain_argv(tmp_path, "--eval_every", "0", "--total_epoch", "1"))
    assert not {"eval_epochs.npy", "knn_acc.npy", "val_loss.npy", "val_psnr.npy"} & set(os.listdir(out))


def test_the_reconstruction_figures_title_says_what_it_shows_and_the_epochs_val_numbers_when_evaluated():
    """The figure shows val images under fixed masks: its title says so, beside the training loss, and gives the val
    loss and PSNR of an evaluated epoch (no PSNR under --norm_pix_loss)."""
    import mae_pretrain
    stats = {"epoch": 3, "loss": 0.123456, "lr": 1e-4, "images_per_sec": 10.0, "seconds": 1.0}
    title = mae_pretrain.recon_title(stats, 16)
    assert title == "epoch 3: the first 16 val images, fixed masks | train loss 0.1235"
    assert mae_pretrain.recon_title({**stats, "knn_acc": 0.5, "val_loss": 0.2, "val_psnr": 17.256}, 9) == (
        "epoch 3: the first 9 val images, fixed masks | train loss 0.1235 | val loss 0.2000, masked patches' PSNR "
        "17.26 dB")
    assert mae_pretrain.recon_title({**stats, "knn_acc": 0.5, "val_loss": 0.2}, 16).endswith(
        "| train loss 0.1235 | val loss 0.2000")
    assert mae_pretrain.recon_title(stats, 1) == "epoch 3: the val image, fixed masks | train loss 0.1235"


def test_resume_continues_the_same_run(tmp_path, run_pretrain, capsys):
    import utils
    run_pretrain(tiny_pretrain_argv(tmp_path, "--eval_every", "1", name="straight"))
    split = tiny_pretrain_argv(tmp_path, "--eval_every", "1", name="split")
    capsys.readouterr()
    run_pretrain(split + ["--stop_after", "1"])
    assert capsys.readouterr().out.endswith(f"stopped after epoch 1 of 2 (--stop_after): the same command with "
                                            f"--resume {tmp_path / 'split' / 'mae.pt'} continues the run\n")
    assert len(np.load(tmp_path / "split" / "outputs" / "losses.npy")) == 1
    # Each log line names its epoch's checkpointed encoder: a resume keeps the earlier lines' as they were.
    first_digest = json.loads(open(tmp_path / "split" / "outputs" / "log.jsonl").readline())["encoder_sha256"]
    assert first_digest == utils.encoder_digest(torch.load(tmp_path / "split" / "mae.pt", weights_only=True)["model"])
    # The figure of an epoch past the checkpoint's is an earlier run's (one that went on from it, or another one):
    # the resume removes it, and keeps its own epochs' figures as they are.
    first = (tmp_path / "split" / "outputs" / "recon_epoch_001.png").read_bytes()
    (tmp_path / "split" / "outputs" / "recon_epoch_007.png").write_bytes(first)
    run_pretrain(split + ["--resume", str(tmp_path / "split" / "mae.pt")])
    captured = capsys.readouterr()
    assert "stopped after" not in captured.out
    assert "event files" not in captured.err  # a resume continues its own TensorBoard run
    assert sorted(name for name in os.listdir(tmp_path / "split" / "outputs") if name.endswith(".png")) == [
        "recon_epoch_001.png", "recon_epoch_002.png"]
    assert (tmp_path / "split" / "outputs" / "recon_epoch_001.png").read_bytes() == first

    straight = np.load(tmp_path / "straight" / "outputs" / "losses.npy")
    resumed = np.load(tmp_path / "split" / "outputs" / "losses.npy")
    assert len(resumed) == 2
    assert resumed == pytest.approx(straight, rel=1e-5)
    records = [json.loads(line) for line in open(tmp_path / "split" / "outputs" / "log.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    last_digest = utils.encoder_digest(torch.load(tmp_path / "split" / "mae.pt", weights_only=True)["model"])
    assert [r["encoder_sha256"] for r in records] == [first_digest, last_digest] and first_digest != last_digest
    for name in ("eval_epochs", "knn_acc", "val_loss", "val_psnr"):
        resumed_metric = np.load(tmp_path / "split" / "outputs" / f"{name}.npy")
        assert resumed_metric == pytest.approx(np.load(tmp_path / "straight" / "outputs" / f"{name}.npy"), rel=1e-5)
    assert np.load(tmp_path / "split" / "outputs" / "eval_epochs.npy").tolist() == [1, 2]
    a = torch.load(tmp_path / "straight" / "mae.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "mae.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)

    # A new run into the straight run's --log_dir: TensorBoard would draw the two as one, which a warning says.
    run_pretrain(tiny_pretrain_argv(tmp_path, name="straight"))
    log_dir = str(tmp_path / "straight" / "logs")
    assert [line for line in capsys.readouterr().err.splitlines() if "warning:" in line] == [
        f"{utils._prog()}: warning: {logged_before_warning(log_dir)}"]


def test_a_resume_logs_again_an_epoch_its_checkpoint_does_not_hold(tmp_path, run_pretrain):
    """log.jsonl is written before the checkpoint, so a run stopped between the two leaves a record of an epoch the
    checkpoint does not hold. A resume from that checkpoint trains that epoch again and logs it once: the log holds
    each epoch once, the resumed epoch's record being the new one (its loss is losses.npy's)."""
    argv = tiny_pretrain_argv(tmp_path, "--eval_every", "0")
    run_pretrain(argv + ["--stop_after", "1"])
    log_path = tmp_path / "run" / "outputs" / "log.jsonl"
    with open(log_path, "a") as f:  # epoch 2's record, written just before the run stopped
        f.write(json.dumps({"epoch": 2, "loss": 123.0, "lr": 0.0, "images_per_sec": 1.0, "seconds": 1.0}) + "\n")
    run_pretrain(argv + ["--resume", str(tmp_path / "run" / "mae.pt")])
    records = [json.loads(line) for line in open(log_path)]
    assert [r["epoch"] for r in records] == [1, 2]
    assert [r["loss"] for r in records] == pytest.approx(np.load(tmp_path / "run" / "outputs" / "losses.npy").tolist())


def test_an_epoch_without_evaluation_after_one_with_adds_no_monitor_numbers(tmp_path, run_pretrain):
    """--eval_every 2 in a 4-epoch run stopped after epoch 3: epoch 2 is evaluated, epoch 3 after it is not (as a
    resume's first epoch after a checkpoint with evaluations may be). Epoch 3 adds no monitor number to any sink
    (its log record, TensorBoard, the .npy curves) and the run ends normally."""
    run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "4", "--eval_every", "2", "--stop_after", "3"))
    out = tmp_path / "run" / "outputs"
    records = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [(r["epoch"], "knn_acc" in r) for r in records] == [(1, False), (2, True), (3, False)]
    assert np.load(out / "eval_epochs.npy").tolist() == [2] and np.load(out / "eval_epochs.npy").dtype == np.int64
    events = EventAccumulator(str(tmp_path / "run" / "logs"), size_guidance={"scalars": 0}).Reload()
    for name in ("knn_acc", "val_loss", "val_psnr"):
        assert [e.step for e in events.Scalars(name)] == [2], name
        assert np.load(out / f"{name}.npy").tolist() == pytest.approx([records[1][name]])


def test_each_epoch_masks_its_images_with_noise_of_its_own(tmp_path, run_pretrain, monkeypatch):
    """The training masks' noise comes from torch's RNG seeded at each epoch from (--seed, epoch)
    (utils.seed_epoch): every step of epoch 2 draws other noise than the same step of epoch 1, not the same
    sequence again. (A resumed epoch draws its own again: test_resume_continues_the_same_run.)"""
    from model import MAE
    noises, forward = [], MAE.forward

    def recording(self, imgs, *args, noise=None, masked_only=False, **kwargs):
        if masked_only:  # training; evaluation and the figures run with masked_only False
            noises.append(noise.clone())
        return forward(self, imgs, *args, noise=noise, masked_only=masked_only, **kwargs)
    monkeypatch.setattr(MAE, "forward", recording)
    run_pretrain(tiny_pretrain_argv(tmp_path, "--eval_every", "0"))
    assert len(noises) == 2 * 8  # 2 epochs of 4 steps of 2 chunks
    assert not any(torch.equal(a, b) for a, b in zip(noises[:8], noises[8:]))


def test_a_resume_that_changes_the_knn_protocol_says_its_accuracies_are_not_comparable(tmp_path, run_pretrain,
                                                                                         capsys):
    """--knn_k, --knn_temperature and --knn_feature may change on resume, but the kNN curve then joins two
    protocols: the resume says so in one warning that names the flags, both values and the evaluations it has.
    --eval_every changes only when the monitor runs, and passes without a word."""
    argv = tiny_pretrain_argv(tmp_path, "--total_epoch", "3", "--eval_every", "1")
    ckpt = str(tmp_path / "run" / "mae.pt")
    run_pretrain(argv + ["--stop_after", "1"])
    capsys.readouterr()
    run_pretrain(argv + ["--resume", ckpt, "--stop_after", "2", "--eval_every", "2"])
    assert "warning" not in capsys.readouterr().err
    run_pretrain(argv + ["--resume", ckpt, "--knn_k", "5", "--knn_temperature", "0.1", "--knn_feature", "token"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].endswith(f"warning: --knn_k 5 and --knn_temperature 0.1 and --knn_feature token, where --resume "
                                f"{ckpt!r} had 20 and 0.07 and avg: the kNN accuracies from here on are not comparable "
                                "with its 2 kNN evaluations (epochs up to 2), though they share one curve")
    assert np.load(tmp_path / "run" / "outputs" / "eval_epochs.npy").tolist() == [1, 2, 3]


def test_a_resume_that_changes_the_knn_protocol_before_any_evaluation_goes_on_without_a_word(tmp_path, run_pretrain,
                                                                                              capsys):
    """A checkpoint stopped before its first evaluation has no kNN accuracy a new protocol could be inconsistent
    with: a resume that changes --knn_k runs on, with no warning, and evaluates under the new protocol."""
    argv = tiny_pretrain_argv(tmp_path, "--eval_every", "2")
    run_pretrain(argv + ["--stop_after", "1"])
    assert torch.load(tmp_path / "run" / "mae.pt", weights_only=True)["evals"] == []
    capsys.readouterr()
    run_pretrain(argv + ["--resume", str(tmp_path / "run" / "mae.pt"), "--knn_k", "5"])
    assert "warning" not in capsys.readouterr().err
    assert np.load(tmp_path / "run" / "outputs" / "eval_epochs.npy").tolist() == [2]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_loss_stops_the_run_and_its_outputs_stay_those_of_the_last_good_epoch(tmp_path, run_pretrain,
                                                                                          monkeypatch, bad,
                                                                                          background_writers):
    """A loss of inf, not only nan, at epoch 2 stops the run with a message that names the epoch, the loss and the
    checkpoint's epoch; the checkpoint, losses.npy and log.jsonl stay those of epoch 1."""
    import mae_pretrain
    real_epoch = mae_pretrain.train_one_epoch

    def train_one_epoch(*args):
        stats = real_epoch(*args)
        return {**stats, "loss": bad} if args[5] == 2 else stats  # args[5]: the epoch
    monkeypatch.setattr(mae_pretrain, "train_one_epoch", train_one_epoch)
    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "3"))
    background_writers[0].close()  # what the interpreter's exit does
    ckpt = tmp_path / "run" / "mae.pt"
    assert str(exc.value.code).startswith(f"epoch 2: the loss is {bad}; stopping. The checkpoint at {ckpt} still "
                                          "holds epoch 1."), exc.value.code
    out = tmp_path / "run" / "outputs"
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1 and len(np.load(out / "losses.npy")) == 1
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == [1]


def test_a_non_finite_loss_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, run_pretrain, monkeypatch):
    """At epoch 1 there is no checkpoint of the run to point to (it said the checkpoint held epoch 0)."""
    import mae_pretrain
    real_epoch = mae_pretrain.train_one_epoch
    monkeypatch.setattr(mae_pretrain, "train_one_epoch", lambda *args: {**real_epoch(*args), "loss": math.nan})
    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path))
    assert exc.value.code == "epoch 1: the loss is nan; stopping. This run wrote no checkpoint. Try a lower " \
                             "--base_learning_rate."
    assert not (tmp_path / "run" / "mae.pt").exists()


def test_sigterm_ends_the_script_with_status_143_and_the_outputs_of_its_last_finished_epoch(tmp_path):
    """The script run as a command, stopped by SIGTERM in the middle of a long run: it exits with 128 + 15 after
    writing what its last finished epoch left (the checkpoint, losses.npy and log.jsonl agree), with no temporary
    file left behind."""
    out = tmp_path / "run" / "outputs"
    argv = tiny_pretrain_argv(tmp_path, "--total_epoch", "1000", "--eval_every", "0")
    assert stop_with_sigterm("mae_pretrain.py", argv, out / "log.jsonl") == 128 + 15
    epoch = torch.load(tmp_path / "run" / "mae.pt", weights_only=True)["epoch"]
    assert epoch >= 1 and len(np.load(out / "losses.npy")) == epoch
    assert [json.loads(line)["epoch"] for line in open(out / "log.jsonl")] == list(range(1, epoch + 1))
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]


def test_the_figures_show_the_first_val_images_under_the_val_metrics_masks_every_epoch(tmp_path, run_pretrain,
                                                                                      monkeypatch):
    """Each epoch's reconstruction figure shows the first 16 val images (not training images) under the noise the
    val metrics use for them, the same noise every epoch: the figures of two epochs hide the same patches."""
    import data
    import mae_pretrain
    real_reconstruct, real_evaluate = mae_pretrain.reconstruct_val, mae_pretrain.evaluate
    figures, evaluations = [], []

    def reconstruct_val(model, imgs, noise, *args):
        figures.append((imgs, noise))
        return real_reconstruct(model, imgs, noise, *args)

    def evaluate(model, train, val, val_noise, *args):
        evaluations.append((val.images, val_noise))
        return real_evaluate(model, train, val, val_noise, *args)
    monkeypatch.setattr(mae_pretrain, "reconstruct_val", reconstruct_val)
    monkeypatch.setattr(mae_pretrain, "evaluate", evaluate)
    run_pretrain(tiny_pretrain_argv(tmp_path, "--eval_every", "1"))
    assert len(figures) == len(evaluations) == 2
    val_images, val_noise = evaluations[0]
    for imgs, noise in figures:
        assert len(imgs) == len(noise) == 16 and torch.equal(imgs, data.normalize(val_images[:16]))
        assert noise is not None and torch.equal(noise, val_noise[:16])
    assert torch.equal(evaluations[1][1], val_noise)


def test_the_last_lines_name_the_best_loss_and_the_best_knn_accuracy_with_their_epochs(tmp_path, run_pretrain,
                                                                                       monkeypatch, capsys):
    """Scripted losses 0.3, 0.1, 0.1 and kNN accuracies 50%, 50%, 40%: the run ends by naming the lowest loss at
    epoch 2 (counted from 1) and the highest kNN accuracy at epoch 1, beside the last: of a tie, the first epoch,
    as train_classifier.py's best epoch."""
    import mae_pretrain
    real_epoch, real_evaluate = mae_pretrain.train_one_epoch, mae_pretrain.evaluate
    losses, knn = {1: 0.3, 2: 0.1, 3: 0.1}, iter([0.5, 0.5, 0.4])
    monkeypatch.setattr(mae_pretrain, "train_one_epoch",
                        lambda *args: {**real_epoch(*args), "loss": losses[args[5]]})  # args[5]: the epoch
    monkeypatch.setattr(mae_pretrain, "evaluate", lambda *args: {**real_evaluate(*args), "knn_acc": next(knn)})
    run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "3", "--eval_every", "1"))
    out = capsys.readouterr().out.splitlines()
    done = [line for line in out if line.startswith("done:")]
    assert len(done) == 1 and done[0].startswith("done: best loss 0.10000 at epoch 2, last 0.10000;"), done
    assert out[-1] == "kNN accuracy: last 40.00% (epoch 3), best 50.00% (epoch 1)", out[-1]


def test_the_pretraining_and_a_fine_tune_from_it_print_the_same_encoder_digest(tmp_path, run_pretrain, capsys):
    """The last line of mae_pretrain.py and the model line of train_classifier.py name the encoder by the digest
    the fine-tune keeps (utils.encoder_digest of the checkpoint's weights), so their logs can be matched."""
    import re

    import train_classifier
    import utils
    run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "1"))
    ckpt = tmp_path / "run" / "mae.pt"
    digest = utils.encoder_digest(torch.load(ckpt, weights_only=True)["model"])[:12]
    done = [line for line in capsys.readouterr().out.splitlines() if line.startswith("done:")]
    assert len(done) == 1 and done[0].endswith(f"checkpoint {ckpt} (its encoder's SHA-256 {digest})"), done
    train_classifier.main(train_classifier.get_args_parser().parse_args([
        "--dataset", "fake", "--fake_size", "64", "--batch_size", "32", "--total_epoch", "1", "--warmup_epoch", "1",
        "--device", "cpu", "--pretrained_model_path", str(ckpt), "--output_model_path", str(tmp_path / "cls.pt"),
        "--output_dir", str(tmp_path / "cls"), "--log_dir", str(tmp_path / "cls_logs"), *TINY_MODEL]))
    assert re.search(rf"^model: .*, encoder from {re.escape(str(ckpt))} \(its encoder's SHA-256 {digest}\);",
                     capsys.readouterr().out, re.MULTILINE)


def test_loss_falls_on_real_cifar10_images(tmp_path, run_pretrain):
    out = tmp_path / "real"
    run_pretrain(["--dataset", "folder", "--data_path", FIXTURE_DIR, "--val_split", "16",
                  "--batch_size", "11", "--max_device_batch_size", "11", "--total_epoch", "30",
                  "--warmup_epoch", "2", "--base_learning_rate", "0.03", "--device", "cpu",
                  "--model_path", str(out / "mae.pt"), "--output_dir", str(out / "outputs"),
                  "--log_dir", str(out / "logs"), *TINY_MODEL])
    losses = np.load(out / "outputs" / "losses.npy")
    assert len(losses) == 30
    assert losses[-3:].mean() < 0.8 * losses[:2].mean()


def test_validation_metrics_use_fixed_masks(tmp_path, monkeypatch):
    """Evaluation walks both splits in chunks of EVAL_CHUNK_FACTOR x --max_device_batch_size; its metrics do not
    depend on the global RNG, and the val loss is the model's masked loss over the whole val split, in uneven chunks
    as in one chunk larger than the split."""
    import data
    import mae_pretrain
    import utils
    from model import MAE, MAEConfig
    args = mae_pretrain.get_args_parser().parse_args(tiny_pretrain_argv(tmp_path))
    args.max_device_batch_size = 3  # evaluation's chunks of 4 x 3: the 32 val images in 12, 12 and 8
    chunk_sizes, shard_chunks, grad_modes = [], utils.shard_chunks, []

    def spy(n, chunk, device):
        chunks = shard_chunks(n, chunk, device)
        chunk_sizes.append([len(c) for c in chunks])
        grad_modes.append(torch.is_grad_enabled())  # off: with it, the bank's features would hold their graphs
        return chunks
    monkeypatch.setattr(utils, "shard_chunks", spy)
    train, val = data.load_data(args)
    model = MAE(MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                          decoder_num_heads=2))
    val_noise = torch.rand(len(val), 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first = mae_pretrain.evaluate(model, train, val, val_noise, args, torch.device("cpu"), None)
    torch.manual_seed(123)  # the global RNG must not matter
    second = mae_pretrain.evaluate(model, train, val, val_noise, args, torch.device("cpu"), None)
    assert first == second
    # Each evaluation: the 128 train images' kNN features, the 32 val images' features, then their reconstruction.
    assert (len(train), len(val)) == (128, 32)
    assert chunk_sizes == 2 * [[12] * 10 + [8], [12, 12, 8], [12, 12, 8]]
    assert grad_modes == 6 * [False]
    # The val loss is the model's own masked loss over the whole val split: the uneven chunks are weighted by size.
    with torch.no_grad():
        direct = model(data.normalize(val.images), noise=val_noise)[0].item()
    assert first["val_loss"] == pytest.approx(direct, rel=1e-5)
    args.max_device_batch_size = 16  # one chunk of 64 places, only 32 of them filled
    assert mae_pretrain.evaluate(model, train, val, val_noise, args, torch.device("cpu"), None)["val_loss"] == \
        pytest.approx(direct, rel=1e-5)
    # PSNR of masked pixels in [0, 1] units: the [-1, 1] loss is 4x the [0, 1] MSE (predictions unclamped).
    assert first["val_psnr"] >= 10 * np.log10(4 / direct) - 1e-3


def _tiny_mae(tmp_path, *extra):
    """(args, model) of tiny_pretrain_argv's run, with a seeded model."""
    import mae_pretrain
    import utils
    from model import MAE
    args = mae_pretrain.get_args_parser().parse_args(tiny_pretrain_argv(tmp_path, *extra))
    torch.manual_seed(0)
    return args, MAE(utils.mae_config(args, norm_pix_loss=args.norm_pix_loss))


def test_the_reconstruction_figure_under_norm_pix_loss_maps_predictions_back_with_each_patchs_mean_and_std(tmp_path):
    """Under --norm_pix_loss the model predicts per-patch normalised pixels: the figure's reconstruction puts them
    back with each true patch's mean and std (model.reconstruct's norm_pix_loss), not as pixels themselves."""
    import data
    import mae_pretrain
    from model import reconstruct
    args, model = _tiny_mae(tmp_path, "--norm_pix_loss")
    imgs = data.normalize(data.fake_images(4, seed=1).images)
    noise = torch.rand(4, model.cfg.num_patches, generator=torch.Generator().manual_seed(0))
    _, recon, original = mae_pretrain.reconstruct_val(model, imgs, noise, model.cfg, None)
    with torch.no_grad():
        _, pred, mask = model(imgs, noise=noise)
    mapped, raw = (data.denormalize(reconstruct(imgs, pred, mask, 4, norm_pix_loss=norm)[1]) for norm in (True, False))
    assert torch.allclose(recon, mapped, atol=1e-6) and not torch.allclose(recon, raw, atol=1e-2)
    assert torch.allclose(original, data.denormalize(imgs))


@pytest.mark.parametrize("feature", ["avg", "token"])
def test_knn_bank_and_queries_are_the_l2_normalised_pooled_features(tmp_path, monkeypatch, feature):
    """evaluate's kNN compares cosine similarities: the bank (train split) and the queries (val split) it hands
    utils.knn_predict are the encoder's features --knn_feature names (avg: the mean patch token, the default;
    token: the class token), each scaled to unit L2 norm."""
    import data
    import mae_pretrain
    import utils
    args, model = _tiny_mae(tmp_path, "--knn_feature", feature)
    train, val = data.load_data(args)
    seen, knn_predict = {}, utils.knn_predict

    def spy(bank, bank_labels, queries, *rest, **kwargs):
        seen.update(bank=bank.clone(), queries=queries.clone())
        return knn_predict(bank, bank_labels, queries, *rest, **kwargs)
    monkeypatch.setattr(utils, "knn_predict", spy)
    val_noise = torch.rand(len(val), 64, generator=torch.Generator().manual_seed(0))
    mae_pretrain.evaluate(model, train, val, val_noise, args, torch.device("cpu"), None)
    with torch.no_grad():
        for name, split in (("bank", train), ("queries", val)):
            tokens = model.encoder(data.normalize(split.images))  # (B, 1 + N, D), every token's output
            pooled = tokens[:, 1:].mean(dim=1) if feature == "avg" else tokens[:, 0]
            assert not torch.allclose(pooled.norm(dim=1), torch.ones(len(split)), atol=0.1)  # not unit by itself
            torch.testing.assert_close(seen[name].norm(dim=1), torch.ones(len(split)))
            torch.testing.assert_close(seen[name], F.normalize(pooled, dim=1), rtol=1e-5, atol=1e-5)


def test_knn_votes_over_every_class_of_the_dataset_with_the_flags_k_and_temperature(tmp_path, monkeypatch):
    """A dataset of 12 classes (CIFAR-100 has 100): the kNN's votes are counted over all 12, not CIFAR-10's 10, by
    the --knn_k nearest neighbours at --knn_temperature (7 and 0.5 here, not the defaults; test_utils checks the
    vote itself against one written out longhand), and its accuracy is that of the predictions it returns."""
    import inspect

    import data
    import mae_pretrain
    import utils
    args, model = _tiny_mae(tmp_path, "--knn_k", "7", "--knn_temperature", "0.5")
    train, val = data.fake_images(96, num_classes=12, seed=1), data.fake_images(24, num_classes=12, seed=2)
    assert val.labels.max() >= 10  # queries whose class a 10-class vote could not name
    seen, knn_predict = [], utils.knn_predict

    def spy(*args, **kwargs):
        call = inspect.signature(knn_predict).bind(*args, **kwargs)
        call.apply_defaults()
        seen.append({name: call.arguments[name] for name in ("num_classes", "k", "temperature")})
        predicted = knn_predict(*args, **kwargs)
        seen.append((predicted == val.labels).float().mean().item())
        return predicted
    monkeypatch.setattr(utils, "knn_predict", spy)
    val_noise = torch.rand(len(val), 64, generator=torch.Generator().manual_seed(0))
    metrics = mae_pretrain.evaluate(model, train, val, val_noise, args, torch.device("cpu"), None)
    assert seen[0] == {"num_classes": 12, "k": 7, "temperature": 0.5}
    assert metrics["knn_acc"] == pytest.approx(seen[1])


@pytest.mark.parametrize("constant", [0.3, 1.4])  # pixels 0.65, and 1.2, which [0, 1] clamps to 1
def test_val_psnr_is_10_log10_of_one_over_the_masked_pixels_mse(tmp_path, monkeypatch, constant):
    """val_psnr is 10 log10(1 / MSE) over the masked pixels (all channels), in [0, 1] units with the prediction
    clamped to [0, 1]. A decoder that predicts one constant (in normalised units) everywhere makes the MSE known:
    computed here longhand from the images and the mask noise (48 of 64 patches, the highest noise, are masked)."""
    import data
    import mae_pretrain
    args, model = _tiny_mae(tmp_path)
    train, val = data.load_data(args)
    p, grid = 4, 8  # patches of 4 x 4 pixels, 8 x 8 of them
    monkeypatch.setattr(model.decoder, "forward", lambda latent, ids_restore, masked_only: torch.full(
        (*ids_restore.shape, p * p * 3), constant))  # every patch: evaluation runs with masked_only False
    val_noise = torch.rand(len(val), grid * grid, generator=torch.Generator().manual_seed(0))
    metrics = mae_pretrain.evaluate(model, train, val, val_noise, args, torch.device("cpu"), None)

    predicted_pixel = min(max(constant * 0.5 + 0.5, 0.0), 1.0)  # data.denormalize, clamped
    images = val.images.double() / 255
    sq_err, count = 0.0, 0
    for b in range(len(val)):
        masked = sorted(range(grid * grid), key=lambda n: val_noise[b, n].item())[grid * grid - 48:]
        for n in masked:
            row, col = divmod(n, grid)
            patch = images[b, :, row * p:(row + 1) * p, col * p:(col + 1) * p]
            sq_err += (patch - predicted_pixel).pow(2).sum().item()
            count += patch.numel()
    assert count == len(val) * 48 * p * p * 3
    assert metrics["val_psnr"] == pytest.approx(10 * math.log10(1 / (sq_err / count)), rel=1e-5)


def test_augmented_step_crops_with_columns_0_to_3_and_flips_with_column_4_of_one_draw(tmp_path, monkeypatch):
    """With --augment a step draws one (batch, 5) block of uniform numbers: each image's crop gets its row's
    columns 0-3 (area, aspect ratio, x, y) and its flip column 4, chunk by chunk (two chunks of 16 here)."""
    import data
    import mae_pretrain
    args, model = _tiny_mae(tmp_path, "--augment")
    cpu = torch.device("cpu")
    optimizer = mae_pretrain.make_optimizer(model, args, cpu)
    crops, flips, draws = [], [], []
    random_resized_crop, random_hflip, rand = data.random_resized_crop, data.random_hflip, torch.rand

    def crop(imgs, *a, rand, **kw):
        crops.append(rand.clone())
        assert kw == {"scale": (0.2, 1.0)} and not a  # the MAE paper's crop scale, not timm's ImageNet 0.08
        return random_resized_crop(imgs, *a, rand=rand, **kw)

    def flip(imgs, rand):
        flips.append(rand.clone())
        return random_hflip(imgs, rand=rand)

    def recording_rand(*a, **kw):
        draws.append(rand(*a, **kw))
        return draws[-1]
    monkeypatch.setattr(data, "random_resized_crop", crop)
    monkeypatch.setattr(data, "random_hflip", flip)
    images = data.fake_images(64, seed=1).images
    with monkeypatch.context() as m:
        m.setattr(torch, "rand", recording_rand)
        mae_pretrain.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), images,
                                torch.randperm(64)[:32], 1e-4, args, cpu, None, torch.zeros(()))
    (draw,) = [d for d in draws if d.shape == (32, 5)]
    assert [len(c) for c in crops] == [len(f) for f in flips] == [16, 16]
    assert torch.equal(torch.cat(crops), draw[:, :4])
    assert torch.equal(torch.cat(flips), draw[:, 4])


@pytest.mark.parametrize("chunk", [16, 8])
def test_a_step_in_chunks_is_the_step_of_the_whole_batch_under_the_same_masks(tmp_path, chunk):
    """train_step on a global batch of 32 in chunks of 16 (or 8): each chunk's images get their own rows of the one
    (batch, patches) mask noise the step draws, and each chunk's loss is divided by the number of chunks, so the
    parameters move by -lr times the gradient of the whole batch's masked loss under that noise, and loss_sum gains
    the chunks' losses undivided. Reference: the same model, before the step, on all 32 images at once, the noise
    drawn from the same seed. (AdamW would hide a gradient scaled by the chunk count: plain SGD here.)"""
    import data
    import mae_pretrain
    import utils
    args, model = _tiny_mae(tmp_path, "--max_device_batch_size", str(chunk))
    images = data.fake_images(64, seed=1).images
    batch_idx = torch.randperm(64, generator=torch.Generator().manual_seed(1))[:32]
    torch.manual_seed(5)
    noise = torch.rand(32, 64)  # what train_step draws after the same seed
    imgs = data.normalize(images[batch_idx])
    grads = torch.autograd.grad(model(imgs, noise=noise, masked_only=True)[0], list(model.parameters()))
    with torch.no_grad():
        chunk_losses = [model(imgs[i:i + chunk], noise=noise[i:i + chunk], masked_only=True)[0].item()
                        for i in range(0, 32, chunk)]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    utils.allocate_grads(optimizer)
    loss_sum = torch.zeros(())
    torch.manual_seed(5)
    mae_pretrain.train_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), images, batch_idx, 0.5,
                            args, torch.device("cpu"), None, loss_sum)
    for p, p0, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g, rtol=0, atol=1e-6)
    assert loss_sum.item() == pytest.approx(sum(chunk_losses), rel=1e-5)


def test_captured_steps_train_as_the_uncaptured_ones_do(tmp_path, cpu_step_graphs):
    """--capture_step's bookkeeping (utils.StepGraphs), its CUDA graphs replaced by CPU stand-ins that rerun what
    they captured on the captured tensors (conftest.ReplayedFunction): six AdamW steps of two chunks, the lr changing
    every step, train to the bit as the same steps without it. So each chunk's images and mask noise reach the
    captured inputs, its loss is read from the captured outputs before the next chunk overwrites them, and the
    update follows each step's last chunk; the first two calls of each graph run eagerly, the third captures, and
    every call does its work once."""
    import copy

    import data
    import mae_pretrain
    import utils
    args, model = _tiny_mae(tmp_path, "--max_device_batch_size", "16")
    models = {"plain": model, "captured": copy.deepcopy(model)}
    images = data.fake_images(64, seed=1).images
    cpu, losses = torch.device("cpu"), {}
    for name, net in models.items():
        optimizer = mae_pretrain.make_optimizer(net, args, cpu)
        graphs = utils.StepGraphs(optimizer) if name == "captured" else None
        torch.manual_seed(3)  # the same batches and masks
        losses[name] = []
        for lr in (2 ** -10, 2 ** -11, 2 ** -9, 2 ** -13, 2 ** -10, 3 * 2 ** -12):  # float32's: see test_set_lr_fills
            loss_sum = torch.zeros(())
            mae_pretrain.train_step(net, optimizer, torch.amp.GradScaler("cpu", enabled=False), images,
                                    torch.randperm(64)[:32], lr, args, cpu, None, loss_sum, graphs)
            losses[name].append(loss_sum.item())
    chunk_graph, update_graph = cpu_step_graphs
    assert (chunk_graph.replays, update_graph.replays) == (12 - 2, 6 - 2)  # every call after the two eager ones
    assert losses["captured"] == losses["plain"]
    for a, b in zip(models["captured"].parameters(), models["plain"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_each_epoch_trains_on_its_own_order_at_the_scheduled_lr_and_reports_its_mean_chunk_loss(tmp_path,
                                                                                              monkeypatch):
    """train_one_epoch over 128 images, 4 steps of 32 in chunks of 16, for epochs 1 to 3 of a 3-epoch run with
    --min_lr, then epoch 2 again. Each epoch shows every image once, in an order of its own, cut from --seed and
    the epoch, so that an epoch run again (a resumed run's) shows its order again. Each optimizer step's logged lr
    is the warmup + cosine written out longhand, from the peak down to --min_lr. The epoch's loss is the mean of
    its chunks' losses, and its images per second are the 128 it showed over its seconds."""
    import data
    import mae_pretrain
    args, mae = _tiny_mae(tmp_path, "--total_epoch", "3", "--base_learning_rate", "1e-3", "--min_lr", "1e-5")
    chunk_losses, shown, take = [], [], data.take

    class Recording(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mae = mae

        def forward(self, imgs, **kwargs):
            out = self.mae(imgs, **kwargs)
            chunk_losses.append(out[0].item())
            return out

    def recording_take(source, idx, device):
        shown.extend(idx.tolist())
        return take(source, idx, device)
    monkeypatch.setattr(data, "take", recording_take)
    model, cpu, writer = Recording(), torch.device("cpu"), LrRecorder()
    optimizer = mae_pretrain.make_optimizer(model, args, cpu)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = data.fake_images(128, seed=1).images
    orders = []
    for epoch in (1, 2, 3, 2):
        shown.clear(), chunk_losses.clear()
        stats = mae_pretrain.train_one_epoch(model, optimizer, scaler, images, args, epoch, cpu, None, writer)
        assert sorted(shown) == list(range(128))
        orders.append(list(shown))
        assert len(chunk_losses) == 8 and stats["loss"] == pytest.approx(sum(chunk_losses) / 8, rel=1e-6)
        assert stats["images_per_sec"] * stats["seconds"] == pytest.approx(128)  # the 4 steps' 4 x 32 images
    assert len({tuple(order) for order in orders[:3]}) == 3 and orders[3] == orders[1]

    expected = warmup_cosine_lrs(1e-3 * 32 / 256, warmup=4, total=12, min_lr=1e-5)
    assert [step for step, _ in writer.lr] == [*range(12), *range(4, 8)]
    assert [lr for _, lr in writer.lr] == pytest.approx(expected + expected[4:8], rel=1e-9)


def test_reference_schedule_sets_the_reference_lr_at_every_step(tmp_path):
    """--schedule reference with the reference's proportions, a warmup longer than the run (5 of 3 epochs, as its
    200 of 150): each optimizer step's lr is peak * min((s + 1) / W, (1 + cos(pi s / T)) / 2), written out here,
    for 3 epochs of 4 steps. The lr rises, meets the cosine, and falls, never reaching the peak."""
    import data
    import mae_pretrain
    args, model = _tiny_mae(tmp_path, "--total_epoch", "3", "--warmup_epoch", "5", "--schedule", "reference",
                            "--base_learning_rate", "1e-3")
    mae_pretrain.check_args(args)
    cpu, writer = torch.device("cpu"), LrRecorder()
    optimizer = mae_pretrain.make_optimizer(model, args, cpu)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images = data.fake_images(128, seed=1).images
    for epoch in (1, 2, 3):
        mae_pretrain.train_one_epoch(model, optimizer, scaler, images, args, epoch, cpu, None, writer)
    peak = 1e-3 * 32 / 256
    expected = [peak * min((s + 1) / 20, 0.5 * (1 + math.cos(math.pi * s / 12))) for s in range(12)]
    assert [step for step, _ in writer.lr] == list(range(12))
    assert [lr for _, lr in writer.lr] == pytest.approx(expected, rel=1e-9)
    assert max(expected) < peak and expected.index(max(expected)) not in (0, 11)


def test_a_stop_after_past_the_last_epoch_ends_the_run_at_its_last_epoch(tmp_path, run_pretrain):
    """--stop_after beyond --total_epoch stops where the schedule ends: one epoch of a one-epoch run, not three."""
    run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "1", "--warmup_epoch", "0", "--stop_after", "3"))
    assert len(np.load(tmp_path / "run" / "outputs" / "losses.npy")) == 1
    assert torch.load(tmp_path / "run" / "mae.pt", weights_only=True)["epoch"] == 1


def test_weight_decay_flag_decays_the_weight_matrices_alone(tmp_path):
    """--weight_decay reaches AdamW's first group, which holds exactly the weight matrices (no norm, bias or token);
    the other group has no decay."""
    import mae_pretrain
    args, model = _tiny_mae(tmp_path, "--weight_decay", "0.1")
    decayed, undecayed = mae_pretrain.make_optimizer(model, args, torch.device("cpu")).param_groups
    assert (decayed["weight_decay"], undecayed["weight_decay"]) == (0.1, 0.0)
    matrices = {name for name, p in model.named_parameters() if p.ndim >= 2 and "token" not in name}
    names = {id(p): name for name, p in model.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} == matrices
    assert {names[id(p)] for p in undecayed["params"]} == set(names.values()) - matrices


def test_the_reconstruction_figure_masks_the_patches_its_fixed_noise_masks(tmp_path):
    """reconstruct_val masks by the noise it is given, whatever torch's RNG: the same panels after two different
    seeds, and the masked panel's blanked patches (normalised value 0: the mean pixel) are exactly those
    random_masking masks for that noise, so that every epoch's figure shows the same patches hidden."""
    import data
    import mae_pretrain
    from model import random_masking
    _, model = _tiny_mae(tmp_path)
    imgs = data.normalize(data.fake_images(4, seed=1).images)
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    panels = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        panels.append(mae_pretrain.reconstruct_val(model, imgs, noise, model.cfg, None))
    for a, b in zip(*panels):
        assert torch.equal(a, b)
    _, mask, _ = random_masking(torch.zeros(4, 64, 1), model.cfg.mask_ratio, noise)  # (B, N), 1 = masked
    masked_panel = panels[0][0]
    blank = (masked_panel == data.denormalize(torch.zeros(1, 3, 1, 1))).all(dim=1)  # (B, H, W)
    per_patch = blank.view(4, 8, 4, 8, 4).all(dim=4).all(dim=2).flatten(1)  # (B, N): every pixel blank
    assert torch.equal(per_patch, mask.bool())


# The flags a resumed pretraining may change: how it runs (chunking, devices, precision, compilation, attention),
# what it monitors and where its files are. Every other flag defines the run.
MAY_CHANGE_ON_RESUME = {"max_device_batch_size", "eval_every", "knn_k", "knn_temperature", "knn_feature", "data_path",
                        "data_on", "device", "precision", "compile", "compile_mode", "compile_scope", "capture_step",
                        "attention", "log_interval", "model_path", "output_dir", "log_dir", "resume", "stop_after"}


def test_resume_refuses_a_change_of_every_flag_that_defines_the_run(tmp_path, capsys):
    """Every flag of mae_pretrain.py but those a resume may change (MAY_CHANGE_ON_RESUME) is run-defining:
    utils.check_resumable, given mae_pretrain's RUN_DEFINING_FLAGS, refuses a checkpoint trained with another
    value of any of them in one line that names the flag and both values."""
    import mae_pretrain
    parser = mae_pretrain.get_args_parser()
    defining = {action.dest for action in parser._actions if action.dest != "help"} - MAY_CHANGE_ON_RESUME
    assert "mask_ratio" in defining and set(mae_pretrain.RUN_DEFINING_FLAGS) == defining
    saved = vars(parser.parse_args(tiny_pretrain_argv(tmp_path, "--resume", "mae.pt")))
    check_resume_refuses_each_defining_flag(saved, defining, MAY_CHANGE_ON_RESUME, mae_pretrain.RUN_DEFINING_FLAGS,
                                            capsys)


def test_resuming_a_finished_run_or_with_another_mask_ratio_is_refused(tmp_path, run_pretrain, capsys):
    """A checkpoint of the run's last epoch has nothing left to run: --resume of it is refused in one line, exit
    status 2, as is a resume with another --mask_ratio (main checks its RUN_DEFINING_FLAGS), and no file changes."""
    argv = tiny_pretrain_argv(tmp_path, "--total_epoch", "1", "--warmup_epoch", "0", "--eval_every", "0")
    run_pretrain(argv)
    capsys.readouterr()
    ckpt = str(tmp_path / "run" / "mae.pt")
    before = files_under(tmp_path / "run")
    for flags, expected in (([], f"--resume {ckpt!r} has already finished all 1 epochs"),
                            (["--mask_ratio", "0.5"], "was trained with --mask_ratio 0.75, this run has 0.5")):
        with pytest.raises(SystemExit) as exc:
            run_pretrain(argv + ["--resume", ckpt, *flags])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert files_under(tmp_path / "run") == before


def test_norm_pix_loss_run_reports_no_psnr_and_still_plots(tmp_path, run_pretrain):
    """Under --norm_pix_loss a PSNR would borrow each hidden patch's true mean and std (model.reconstruct), so
    no sink gets one; the other monitor numbers are written as usual and plot_results.py draws what there is."""
    import plot_results

    run_pretrain(tiny_pretrain_argv(tmp_path, "--norm_pix_loss", "--total_epoch", "1", "--warmup_epoch", "0"))
    out, logs = tmp_path / "run" / "outputs", tmp_path / "run" / "logs"
    record = json.loads(open(out / "log.jsonl").read().splitlines()[-1])
    assert {"knn_acc", "val_loss"} <= set(record) and "val_psnr" not in record
    assert (out / "knn_acc.npy").is_file() and (out / "val_loss.npy").is_file()
    assert not (out / "val_psnr.npy").exists()
    tags = EventAccumulator(str(logs)).Reload().Tags()["scalars"]
    assert {"knn_acc", "val_loss"} <= set(tags) and "val_psnr" not in tags
    ckpt = torch.load(tmp_path / "run" / "mae.pt", map_location="cpu", weights_only=True)
    assert "val_psnr" not in ckpt["evals"][0]

    plot_results.main(plot_results.get_args_parser().parse_args(
        ["--pretrain_dir", str(out), "--cls_dir", str(tmp_path / "none"), "--report", str(tmp_path / "r.md")]))
    assert (out / "pretrain_monitor.png").is_file()
    report = (tmp_path / "r.md").read_text()
    assert "kNN top-1 on val" in report and "PSNR" not in report


def test_attention_flag_sets_the_kernel_of_training_and_evaluation(tmp_path, run_pretrain):
    """--attention math: every attention of the run (training steps, the kNN and val evaluation, the figures) is
    the math kernel, none the CPU flash kernel torch picks by itself."""
    with torch.profiler.profile() as prof:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "1", "--attention", "math"))
    names = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" in names
    assert not any("flash" in name for name in names), sorted(n for n in names if "flash" in n)


@pytest.mark.parametrize("bad_flags, expected", [
    (["--batch_size", "30", "--max_device_batch_size", "16"], "--batch_size 30 is not divisible"),
    (["--mask_ratio", "1.0"], "--mask_ratio must be in (0, 1)"),
    (["--mask_ratio", "0"], "--mask_ratio must be in (0, 1), got 0.0"),
    (["--embed_dim", "400000"], "parameters need"),  # terabytes: more than any machine's memory
    (["--embed_dim", str(2 ** 40), "--num_heads", "1"], "no such model can be built"),  # past int64, even on meta
    (["--mask_ratio", "-0.5"], "--mask_ratio must be in (0, 1)"),
    (["--dataset", "folder", "--data_path", "/nonexistent/cifar"], "--data_path"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume '/nonexistent/ckpt.pt': no such file"),
    (["--resume", "{tmp}"], "--resume '{tmp}' is a folder, not a file"),
    (["--total_epoch", "0"], "--total_epoch"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--base_learning_rate", "nan"], "argument --base_learning_rate: must be a finite number, got 'nan'"),
    (["--knn_temperature", "inf"], "argument --knn_temperature: must be a finite number, got 'inf'"),
    (["--weight_decay", "x"], "argument --weight_decay: must be a number, got 'x'"),
    (["--base_learning_rate", "-1"], "--base_learning_rate must be > 0, --weight_decay and --min_lr >= 0, got -1.0"),
    (["--base_learning_rate", "1e308"], "--base_learning_rate 1e+308 x --batch_size 32 / 256 overflows to an "
                                         "infinite peak lr"),
    (["--mask_ratio", "0.01"], "--mask_ratio 0.01 masks none of the 64 patches"),
    (["--min_lr", "0.1"], "--min_lr 0.1 is above the peak lr 1.87e-05 (--base_learning_rate x --batch_size / 256)"),
    (["--schedule", "reference", "--min_lr", "1e-6"], "--min_lr 1e-06 is for --schedule warmup_cosine; the reference "
                                                       "schedule ends at 0"),
    (["--schedule", "cosine"], "argument --schedule: invalid choice: 'cosine'"),
    (["--decoder_num_heads", "3"], "--decoder_embed_dim 32 must be divisible by --decoder_num_heads 3"),
    (["--embed_dim", "30", "--num_heads", "3"], "--embed_dim 30 must be divisible by 4 (the sin-cos "
                                                 "position embedding's four parts)"),
    (["--seed", "-1"], "--seed must be in [0, 2^31), got -1"),
    (["--device", "mps"], "--device must be cuda, cuda:N or cpu, got 'mps'"),
    (["--attention", "cudnn"], "--attention cudnn cannot run on cpu"),  # a CUDA kernel
    (["--capture_step"], "--capture_step captures CUDA graphs: it needs a CUDA device, not cpu"),
    (["--fake_size", "2000000"], "--fake_size must be in [1, 1,000,000]"),
    (["--fake_size", "0"], "--fake_size must be in [1, 1,000,000], got 0"),
    (["--model_path", "{tmp}/run/outputs/args.json"], "--model_path must name a .pt or .pth file"),
    (["--model_path", ""], "--model_path must name a .pt or .pth file, got ''"),
    # a name longer than the file system allows (255 bytes on most), found at the first save before
    (["--model_path", "{tmp}/run/" + "m" * 300 + ".pt"], "--model_path: the file name '" + "m" * 24 + "'... is 303 "
                                                         "bytes, longer than the"),
    (["--output_dir", ""], "--output_dir must name a folder, got ''"),
    (["--log_dir", "{tmp}/a_file/logs"], "--log_dir: '{tmp}/a_file' is a file, so folder"),
    (["--model_path", "{tmp}/a_file/mae.pt"], "--model_path '{tmp}/a_file/mae.pt': '{tmp}/a_file' is a file, not"),
    (["--output_dir", "{tmp}/a_file"], "--output_dir '{tmp}/a_file' is a file, not a folder"),
    # the run makes its folders before training: the checkpoint, saved after an epoch, would find a folder there
    (["--model_path", "{tmp}/x/m.pt", "--output_dir", "{tmp}/x/m.pt"], "--model_path: '{tmp}/x/m.pt' is also "
                                                                      "--output_dir, the folder its figures"),
    (["--model_path", "{tmp}/x/m.pt", "--log_dir", "{tmp}/x/./m.pt"], "is also --log_dir"),
    (["--knn_k", "0"], "--knn_k must be >= 1, got 0"),  # topk(0): every image voted class 0
    (["--knn_temperature", "0"], "--knn_temperature > 0, got 25 and 0.0"),  # the votes' weights divide by it
    (["--val_split", "-1"], "--val_split must be >= 0, got -1"),
    (["--patch_size", "3"], "patch_size 3 must divide img_size 32"),
    (["--batch_size", "256"], "--batch_size 256 is larger than the 128 training images"),  # no step in an epoch
    (["--log_interval", "0"], "--log_interval must be >= 1, got 0"),  # the progress bar's step % 0
    (["--stop_after", "-1"], "--stop_after must be >= 0, got -1"),  # a run of no epoch
    (["--eval_every", "-1"], "--eval_every must be >= 0 and --knn_temperature > 0, got -1 and 0.07"),
    (["--warmup_epoch", "9" * 401], "--warmup_epoch must be at most 1,000,000,000, got 999"),  # float() overflowed
    # AdamW's decay step scales the weights by 1 - lr x decay, here by about -1.9e303: a nan loss after an epoch
    (["--weight_decay", "1e308"], "--weight_decay 1e+308 x the peak lr 1.87e-05 is 1.87e+303: AdamW scales the "
                                  "weights by 1 minus that at every step, so it must be below 1"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, run_pretrain, capsys, bad_flags, expected):
    (tmp_path / "a_file").write_text("in the way")
    argv = tiny_pretrain_argv(tmp_path, *[f.format(tmp=tmp_path) for f in bad_flags])
    with pytest.raises(SystemExit) as exc:
        run_pretrain(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected.format(tmp=tmp_path) in err, err
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing was created
    assert (tmp_path / "a_file").read_text() == "in the way"



def files_under(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_unwritable_outputs_are_refused_before_the_last_runs_files_change(tmp_path, run_pretrain, capsys,
                                                                          monkeypatch):
    run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "1"))
    capsys.readouterr()
    run_dir = tmp_path / "run"
    (run_dir / "folder.pt").mkdir()
    (run_dir / "read_only").mkdir()
    before = files_under(run_dir)
    # Root writes through file permissions, so a read-only folder is simulated the way the check sees one:
    # os.access says no (as it does on a read-only file system).
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not str(path).startswith(str(run_dir / "read_only"))
                        and real_access(path, mode))
    for flags, expected in ((["--model_path", str(run_dir / "folder.pt")], "is a folder, not a file"),
                            (["--model_path", str(run_dir / "read_only" / "mae.pt")], "cannot write in"),
                            (["--log_dir", str(run_dir / "read_only" / "logs")], "cannot write in")):
        with pytest.raises(SystemExit) as exc:
            run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "1", *flags))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert files_under(run_dir) == before

    # A refusal os.access does not foresee (a kernel file system such as /sys, an ACL): the folder is made only
    # after the data are loaded, and failing there is still one line that names the flag, before any file.
    real_makedirs = os.makedirs

    def makedirs(path, *args, **kwargs):
        if str(path).startswith(str(run_dir / "kernel_fs")):
            raise PermissionError(1, "Operation not permitted", str(path))
        return real_makedirs(path, *args, **kwargs)
    monkeypatch.setattr(os, "makedirs", makedirs)
    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "1", "--output_dir", str(run_dir / "kernel_fs")))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output_dir: cannot write in folder" in err, err
    assert files_under(run_dir) == before
    monkeypatch.setattr(os, "makedirs", real_makedirs)

    # A folder that exists and that os.access passes, where no file can be made: /proc, for root. (Run as another
    # user, os.access refuses it first, with the same start of the line.)
    if os.path.isdir("/proc"):
        with pytest.raises(SystemExit) as exc:
            run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "1", "--model_path", "/proc/mae.pt"))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--model_path: cannot write in" in err and "'/proc'" in err, err
        assert files_under(run_dir) == before


def test_a_folder_under_the_name_of_an_output_file_is_refused_before_anything_is_written(tmp_path, run_pretrain,
                                                                                        capsys):
    """A folder in --output_dir under the name of a file the run writes there (each name, and a later epoch's
    figure) ends the run at the start, in one line naming it: the first save failed on it with a traceback, after
    an epoch and after args.json had been rewritten."""
    out = tmp_path / "run" / "outputs"
    for name in ("args.json", "log.jsonl", "losses.npy", "eval_epochs.npy", "knn_acc.npy", "val_loss.npy",
                 "val_psnr.npy", "recon_epoch_001.png", "recon_epoch_150.png"):
        (out / name).mkdir(parents=True)
        with pytest.raises(SystemExit) as exc:
            run_pretrain(tiny_pretrain_argv(tmp_path))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith(
            f"--output_dir: {str(out / name)!r} is a folder: this script writes a file of that name there"), err
        assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == sorted(["outputs", name])
        (out / name).rmdir()


def test_resume_with_a_damaged_log_is_refused_before_anything_changes(tmp_path, run_pretrain, capsys):
    run_pretrain(tiny_pretrain_argv(tmp_path, "--stop_after", "1"))
    capsys.readouterr()
    (tmp_path / "run" / "outputs" / "log.jsonl").write_text('{"epoch": 1, "loss": 0.2}\n{"epoch": 2, "lo\n')
    before = files_under(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(tmp_path / "run" / "mae.pt")))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--output_dir: " in err and "not a readable JSON-lines log" in err
    assert files_under(tmp_path / "run") == before


def test_resume_into_a_folder_without_the_runs_log_is_refused_before_anything_changes(tmp_path, run_pretrain, capsys):
    """losses.npy goes on from the checkpoint and log.jsonl from --output_dir's: a resume into another folder, or
    one holding another run's log, would leave the two disagreeing (log.jsonl without the checkpoint's epochs, or
    with another run's losses for them). Refused in one line, exit status 2, nothing written."""
    run_pretrain(tiny_pretrain_argv(tmp_path, "--stop_after", "1"))
    run_pretrain(tiny_pretrain_argv(tmp_path, "--stop_after", "1", "--seed", "7", name="other"))
    resume = ["--resume", str(tmp_path / "run" / "mae.pt")]
    for folder in (tmp_path / "elsewhere", tmp_path / "other" / "outputs"):
        argv = tiny_pretrain_argv(tmp_path, *resume)
        argv[argv.index("--output_dir") + 1] = str(folder)
        before = files_under(tmp_path)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_pretrain(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.endswith(f"--resume: {str(folder / 'log.jsonl')!r} does not hold epochs 1 to 1 of the checkpoint "
                            "with its losses (is --output_dir that run's?)"), err
        assert len(err.splitlines()) == 1 and files_under(tmp_path) == before


def test_a_knn_k_above_the_training_images_is_refused_and_the_log_names_the_masked_patches(tmp_path, run_pretrain,
                                                                                          capsys):
    """The kNN vote cannot take more neighbours than the training images (the bank): a larger --knn_k would be cut
    down without a word while args.json and the figure named it. And the model line counts the patches masked,
    which --mask_ratio rounds to: 0.999 keeps one of 64."""
    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--knn_k", "129"))
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "--knn_k 129 is more than the 128 training images the kNN vote takes its neighbours from: pass at most 128")
    assert not (tmp_path / "run").exists()
    run_pretrain(tiny_pretrain_argv(tmp_path, "--knn_k", "128", "--mask_ratio", "0.999", "--total_epoch", "1"))
    assert "64 patches, 63 masked (98.4%)" in capsys.readouterr().out


@pytest.mark.parametrize("edit", ["missing weight", "unexpected weight", "weight size", "optimizer groups",
                                  "group sizes", "moment size", "group without betas"])
def test_resume_of_a_checkpoint_whose_state_does_not_fit_is_refused_before_anything_changes(tmp_path, run_pretrain,
                                                                                            capsys, edit):
    """A checkpoint of another version of this code, or an edited one, whose weights or optimizer state do not fit
    the model and optimizer the flags give: refused in one line, exit status 2, before any file is written
    (utils.check_resume_state). load_state_dict found it only after args.json had been rewritten, with a traceback;
    a moment of the wrong size was a segmentation fault."""
    run_pretrain(tiny_pretrain_argv(tmp_path, "--stop_after", "1"))
    capsys.readouterr()
    path = tmp_path / "run" / "mae.pt"
    ckpt = torch.load(path, weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    sizes = [len(group["params"]) for group in groups]
    if edit == "missing weight":
        del ckpt["model"]["decoder.pred.weight"]
        expected = "its weights do not fit this model (1 missing: decoder.pred.weight)"
    elif edit == "unexpected weight":  # a weight of another model: the load would leave it unused
        ckpt["model"]["decoder.extra"] = torch.zeros(1)
        expected = "its weights do not fit this model (1 unexpected: decoder.extra)"
    elif edit == "group sizes":  # as many groups, one parameter moved from the undecayed to the decayed
        groups[0]["params"].append(groups[1]["params"].pop())
        expected = (f"its optimizer state does not fit this run's optimizer (parameters per group: "
                    f"{[sizes[0] + 1, sizes[1] - 1]}, this run's {sizes})")
    elif edit == "moment size":  # the fused step read past it: a segmentation fault an epoch later
        index = groups[0]["params"][0]
        ckpt["optimizer"]["state"][index]["exp_avg"] = torch.zeros(3)
        expected = f"its optimizer state's exp_avg of parameter {index} has shape (3,), the parameter ("
    elif edit == "group without betas":  # a KeyError in the first step, after args.json was rewritten
        del groups[1]["betas"]
        expected = "its optimizer state has a parameter group without betas"
    elif edit == "weight size":
        ckpt["model"]["decoder.pred.bias"] = ckpt["model"]["decoder.pred.bias"][:-1]
        expected = "its weights do not fit this model (size mismatch for decoder.pred.bias: copying a param with shape"
    else:  # the decayed and the undecayed parameters in one group
        groups[0]["params"] += groups.pop()["params"]
        expected = (f"its optimizer state does not fit this run's optimizer (parameters per group: [{sum(sizes)}], "
                    f"this run's {sizes})")
    torch.save(ckpt, path)
    before = files_under(tmp_path / "run")
    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(path)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--resume {str(path)!r}: {expected}" in err, err
    assert files_under(tmp_path / "run") == before


def test_resume_of_a_checkpoint_with_fields_of_the_wrong_kind_is_refused_before_anything_changes(tmp_path,
                                                                                                 run_pretrain, capsys):
    """A hand-edited checkpoint whose fields hold values of the wrong type or range (an epoch as text, True, or 0;
    losses as a number, or not one per epoch; evals without their epoch): refused in one line, exit status 2, no
    file changed. They failed after the run had begun, with a traceback (a str compared with an int, an int
    iterated), or ran a schedule from a negative epoch."""
    run_pretrain(tiny_pretrain_argv(tmp_path, "--stop_after", "1"))
    capsys.readouterr()
    path = tmp_path / "run" / "mae.pt"
    saved = torch.load(path, weights_only=True)
    evals = "its evals should be records of an integer epoch and the numbers knn_acc, val_loss, val_psnr each"
    for key, value, expected in (
            ("epoch", "1", "not a checkpoint of this project (its epoch is of type str, not int)"),
            ("epoch", True, "not a checkpoint of this project (its epoch is of type bool, not int)"),
            ("losses", 7, "not a checkpoint of this project (its losses is of type int, not list)"),
            ("scaler", [], "not a checkpoint of this project (its scaler is of type list, not dict)"),
            ("epoch", 0, "records epoch 0, but a run's checkpoint follows epoch 1 or later"),
            ("losses", ["a"], "its losses should be one number per epoch up to its epoch 1, found 1: ['a']"),
            ("losses", [0.5, 0.4, 0.3, 0.2, 0.1],
             "its losses should be one number per epoch up to its epoch 1, found 5: [0.5, 0.4, 0.3, 0.2, ...]"),
            ("evals", [{"knn_acc": 0.1}], evals + ", found {'knn_acc': 0.1}"),
            ("evals", [{"epoch": 1, "knn_acc": 0.5}], evals),  # a KeyError at the next evaluation's save
            ("evals", [{"epoch": 1, 7: 0.5}], evals + ", found {'epoch': 1, 7: 0.5}"),  # sorted() raised TypeError
            ("losses", [10 ** 400], "its losses should be one number per epoch"),  # float() overflows
            ("evals", [{"epoch": 1, "knn_acc": 0.5, "val_loss": 0.1, "val_psnr": 10 ** 400}], evals)):
        torch.save({**saved, key: value}, path)
        before = files_under(tmp_path / "run")
        with pytest.raises(SystemExit) as exc:
            run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(path)))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--resume {str(path)!r}" in err and expected in err, (key, value, err)
        assert files_under(tmp_path / "run") == before


def test_resume_of_a_non_checkpoint_leaves_files_untouched(tmp_path, run_pretrain, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "outputs").mkdir(parents=True)
    bogus = run_dir / "mae.pt"
    bogus.write_bytes(b"this is not a checkpoint")
    old_losses = run_dir / "outputs" / "losses.npy"
    np.save(old_losses, np.array([0.5, 0.4]))
    before = {p: p.read_bytes() for p in (bogus, old_losses)}

    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(bogus)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a torch checkpoint (torch.save writes a zip archive; this file " \
        "starts b'this')" in err, err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(run_dir / "outputs")) == ["losses.npy"]

    # A real torch file that is not one of our checkpoints is refused too.
    torch.save({"weights": torch.zeros(3)}, bogus)
    with pytest.raises(SystemExit):
        run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(bogus)))
    assert "not a checkpoint of this project" in capsys.readouterr().err


def test_resume_with_a_different_schedule_is_refused(tmp_path, run_pretrain, capsys):
    """Another batch size, or another --schedule, is refused before anything changes. A checkpoint written before
    --schedule existed (its args without one) ran warmup_cosine: it resumes under that and is refused under
    reference."""
    argv = tiny_pretrain_argv(tmp_path, "--stop_after", "1")
    run_pretrain(argv)
    capsys.readouterr()
    ckpt = tmp_path / "run" / "mae.pt"
    before = ckpt.read_bytes()
    old = torch.load(ckpt, weights_only=True)
    del old["args"]["schedule"]
    torch.save(old, tmp_path / "old.pt")
    for path, flags, expected in ((ckpt, ["--batch_size", "64"], "--batch_size"),
                                  (ckpt, ["--schedule", "reference"], "with --schedule warmup_cosine, this run has "
                                                                      "reference"),
                                  (tmp_path / "old.pt", ["--schedule", "reference"], "with --schedule warmup_cosine, "
                                                                                      "this run has reference")):
        with pytest.raises(SystemExit) as exc:
            run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(path), *flags))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert ckpt.read_bytes() == before
    run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(tmp_path / "old.pt")))
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


def test_command_line_error_has_no_traceback(tmp_path):
    argv = tiny_pretrain_argv(tmp_path, "--batch_size", "30", "--max_device_batch_size", "16")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mae_pretrain.py"), *argv],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mae_pretrain.py: error: --batch_size 30 is not divisible by --max_device_batch_size 16"]
    assert proc.stdout == ""


@pytest.mark.parametrize("scope, graphs", [("model", 1), ("blocks", 3)])
def test_compiled_run_has_one_graph_per_program_and_no_recompilation(tmp_path, run_pretrain, compile_counter,
                                                                     scope, graphs):
    # Accumulation (two chunks per step), augmentation, the per-epoch evaluation and reconstruction figure,
    # two epochs: none of it may break a compiled graph or compile another. The whole model is one graph; with
    # --compile_scope blocks the encoder's blocks (17 tokens) share one, the decoder's first (65 tokens) another,
    # and its last, which computes the masked tokens' outputs alone (model.MAEDecoder), a third.
    run_pretrain(tiny_pretrain_argv(tmp_path, "--compile", "--compile_scope", scope, "--augment", "--eval_every", "1",
                                    "--decoder_depth", "2"))
    assert compile_counter.frame_count == graphs
    assert compile_counter.op_count > 0
