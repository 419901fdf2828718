"""Tests of train_classifier.py on tiny CPU runs (scratch, MAE-pretrained, linear probe), of its checkpoint
loading and bad-input handling, of how its recipes compose data.py's augmentation (the ops themselves are tested in
test_data.py), of the layer decay it uses, and of the bf16 (eager and compiled) fine-tuning loss curve against
fp32.

Run: python -m pytest -q tests/test_train_classifier.py
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

import data
import train_classifier
import utils
from conftest import (FIXTURE_DIR, ROOT, TINY_MODEL, LrRecorder, check_resume_refuses_each_defining_flag,
                      logged_before_warning, stop_with_sigterm, tiny_pretrain_argv, warmup_cosine_lrs)
from model import MAEConfig, ViTClassifier

FAKE_TRAIN, FAKE_VAL, BATCH = 128, 32, 32  # --dataset fake --fake_size 128 holds out max(128 // 4, 16) val images
STEPS = FAKE_TRAIN // BATCH


@pytest.fixture(autouse=True)
def one_thread():
    # On a shared 2-core machine two intra-op threads per process thrash; these models are far too small to
    # gain from them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mae_ckpt(tmp_path_factory):
    """A tiny mae_pretrain.py checkpoint, made once for the module."""
    import mae_pretrain
    argv = tiny_pretrain_argv(tmp_path_factory.mktemp("pretrain"))
    mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(argv))
    return argv[argv.index("--model_path") + 1]


def cls_argv(tmp_path, *extra, name="run", epochs=2):
    """Flags for a seconds-long train_classifier.py run on --dataset fake, every output under tmp_path/name."""
    out = tmp_path / name
    return ["--dataset", "fake", "--fake_size", str(FAKE_TRAIN), "--batch_size", str(BATCH),
            "--max_device_batch_size", "16", "--total_epoch", str(epochs), "--warmup_epoch", "1",
            "--device", "cpu", "--log_interval", "1", "--output_model_path", str(out / "cls.pt"),
            "--output_dir", str(out / "cls_outputs"), "--log_dir", str(out / "logs"), *TINY_MODEL, *extra]


def parse(argv):
    return train_classifier.get_args_parser().parse_args(argv)


def run_cls(argv):
    train_classifier.main(parse(argv))


def refused_in_one_line(argv, folder, capsys) -> str:
    """run_cls(argv) stops with exit status 2 and one line on stderr, and no file under `folder` changes: -> the line.
    What was printed before the call is dropped."""
    capsys.readouterr()
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as exc:
        run_cls(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before
    return err


def mae_encoder(path):
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    return {k: v for k, v in state.items() if k.startswith("encoder.")}


def check_run_outputs(run_dir, run, epochs, argv):
    """Every output of the contract exists, parses and agrees with the others; returns the summary."""
    out = run_dir / "cls_outputs"
    arrays = {name: np.load(out / f"{run}_{name}.npy") for name in ("train_loss", "train_acc", "val_loss", "val_acc")}
    for name, values in arrays.items():
        assert values.shape == (epochs,) and np.all(np.isfinite(values)), name
    for name in ("train_acc", "val_acc"):
        assert np.all((arrays[name] >= 0) & (arrays[name] <= 1))

    records = [json.loads(line) for line in open(out / f"{run}_log.jsonl")]
    assert [r["epoch"] for r in records] == list(range(1, epochs + 1))
    assert set(records[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_sec",
                               "seconds"}
    for name, values in arrays.items():
        assert [r[name] for r in records] == pytest.approx(values.tolist())

    summary = json.load(open(out / f"{run}_summary.json"))
    val_acc = arrays["val_acc"]
    assert summary["run"] == run and summary["epochs"] == epochs
    assert summary["best_val_acc"] == pytest.approx(val_acc.max())
    assert summary["best_epoch"] == int(np.argmax(val_acc)) + 1
    assert summary["final_val_acc"] == pytest.approx(val_acc[-1])
    assert summary["classes"] == [f"class_{i}" for i in range(10)]
    assert {"linear_probe", "pretrained_model_path", "recipe"} <= set(summary)

    # The val labels are the dataset's, and the saved predictions give the last epoch's accuracy.
    _, val = data.load_data(parse(argv))
    preds, labels = np.load(out / f"{run}_val_preds.npy"), np.load(out / f"{run}_val_labels.npy")
    assert preds.dtype == labels.dtype == np.int64 and preds.shape == labels.shape == (FAKE_VAL,)
    assert np.array_equal(labels, val.labels.numpy())
    assert (preds == labels).mean() == pytest.approx(val_acc[-1])

    for epoch in (0, (epochs + 1) // 2, epochs):
        with Image.open(out / f"{run}_preds_epoch_{epoch}.png") as im:
            assert im.width > 300 and im.height > 300
    assert sorted(p for p in os.listdir(out) if p.endswith(".png")) == sorted(
        [f"{run}_preds_grid.png"] + [f"{run}_preds_epoch_{e}.png" for e in {0, (epochs + 1) // 2, epochs}])
    assert (out / f"{run}_preds_grid.png").read_bytes() == (out / f"{run}_preds_epoch_{epochs}.png").read_bytes()
    # What the run checks for a folder in the way at its start (OUTPUT_NAMES and the epochs' figures) is what it wrote.
    assert sorted(os.listdir(out)) == sorted([f"{run}_{name}" for name in train_classifier.OUTPUT_NAMES] + [
        f"{run}_preds_epoch_{e}.png" for e in {0, (epochs + 1) // 2, epochs}])
    saved = json.load(open(out / f"{run}_args.json"))
    assert saved["run_name"] == run and saved["compile_mode"] == "default"  # resolved, not the flag's None

    events = EventAccumulator(str(run_dir / "logs"), size_guidance={"scalars": 0}).Reload()
    for name, values in arrays.items():
        scalars = events.Scalars(name)
        assert [e.step for e in scalars] == list(range(1, epochs + 1))
        assert [e.value for e in scalars] == pytest.approx(values.tolist(), rel=1e-5)
    assert len(events.Scalars("lr")) == epochs * STEPS

    best = torch.load(run_dir / "cls.pt", map_location="cpu", weights_only=True)
    last = torch.load(run_dir / "cls_last.pt", map_location="cpu", weights_only=True)
    assert set(best) == {"model", "epoch", "val_acc", "args", "config", "num_classes", "classes", "pretrained_sha256"}
    assert set(last) == set(best) | {"optimizer", "scaler"}
    assert (best["epoch"], best["val_acc"]) == (summary["best_epoch"], pytest.approx(summary["best_val_acc"]))
    assert (last["epoch"], last["val_acc"]) == (epochs, pytest.approx(val_acc[-1]))
    assert best["num_classes"] == 10 and best["classes"] == summary["classes"]
    assert (best["pretrained_sha256"] is None) == (run == "scratch") and best["pretrained_sha256"] == \
        summary["pretrained_sha256"]

    # The best checkpoint, rebuilt from what it holds and run on the val images here, has the accuracy it claims.
    model = ViTClassifier(MAEConfig(**best["config"]), best["num_classes"], best["args"]["global_pool"],
                          linear_probe=best["args"]["linear_probe"])
    model.load_state_dict(best["model"])
    with torch.no_grad():
        predicted = model.eval()(data.normalize(val.images)).argmax(dim=-1)
    assert (predicted == val.labels).float().mean().item() == pytest.approx(best["val_acc"])
    return summary


# ----------------------------------------------------------------------------------------------------------
# End-to-end runs

def test_scratch_run_writes_every_output(tmp_path):
    argv = cls_argv(tmp_path)
    run_cls(argv)
    summary = check_run_outputs(tmp_path / "run", "scratch", 2, argv)
    assert summary["recipe"] == "finetune" and summary["pretrained_model_path"] is None
    # The recipe, but for layer decay, which only applies to a pretrained encoder.
    assert summary["recipe_settings"] == {**train_classifier.RECIPES["finetune"], "layer_decay": 1.0}
    events = EventAccumulator(str(tmp_path / "run" / "logs"), size_guidance={"scalars": 0}).Reload()
    # finetune: linear warmup over --warmup_epoch, then cosine to --min_lr 0, one value per optimizer step.
    expected = warmup_cosine_lrs(1e-3 * BATCH / 256, warmup=STEPS, total=2 * STEPS)
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(expected, rel=1e-6)
    # An epoch's logged lr is that of its last step.
    log = [json.loads(line) for line in open(tmp_path / "run" / "cls_outputs" / "scratch_log.jsonl")]
    assert [r["lr"] for r in log] == pytest.approx([expected[STEPS - 1], expected[2 * STEPS - 1]], rel=1e-6)


def test_a_scratch_model_starts_from_the_seeds_initialisation(tmp_path, monkeypatch):
    """--seed sets the classifier's initial weights: the model a run builds is build_model's right after
    torch.manual_seed(--seed), and another seed's differs."""
    built, real_build = [], train_classifier.build_model

    def recording(*args):
        model = real_build(*args)
        if not any(p.is_meta for p in model.parameters()):  # not the size check's meta build
            built.append({k: v.clone() for k, v in model.state_dict().items()})
        return model
    monkeypatch.setattr(train_classifier, "build_model", recording)
    for seed in (7, 8):
        run_cls(cls_argv(tmp_path, "--seed", str(seed), name=f"seed{seed}", epochs=1))
    args = parse(cls_argv(tmp_path, "--seed", "7"))
    train_classifier.resolve_recipe(args)
    torch.manual_seed(7)
    expected = real_build(args, train_classifier.model_config(args, None), 10, None).state_dict()
    assert len(built) == 2 and all(torch.equal(built[0][k], v) for k, v in expected.items())
    assert not torch.equal(built[0]["head.weight"], built[1]["head.weight"])


def test_plain_run_learns_the_fake_classes_and_shows_its_predictions(tmp_path, monkeypatch):
    shown = {}
    save_grid = utils.save_prediction_grid

    def spy(path, images, predicted, true, classes, title=""):
        shown[os.path.basename(path)] = (images.clone(), list(map(int, predicted)), list(map(int, true)))
        titles[os.path.basename(path)] = title
        save_grid(path, images, predicted, true, classes, title=title)
    titles = {}
    monkeypatch.setattr(utils, "save_prediction_grid", spy)
    # Catches what the output checks cannot: labels out of step with images, a head that does not train.
    argv = cls_argv(tmp_path, "--recipe", "plain", "--fake_size", "256", "--base_learning_rate", "3e-3", epochs=8)
    run_cls(argv)
    out = tmp_path / "run" / "cls_outputs"
    val_acc = np.load(out / "scratch_val_acc.npy")
    assert val_acc[0] < 0.5 < val_acc[-1]  # 10 classes: chance is 0.1
    assert titles["scratch_preds_epoch_8.png"] == f"scratch, epoch 8, val acc {val_acc[-1]:.2%} over all 64 val images"

    # The last grid shows 16 different val images with the predictions and labels saved for them.
    preds, labels = np.load(out / "scratch_val_preds.npy"), np.load(out / "scratch_val_labels.npy")
    _, val = data.load_data(parse(argv))
    images, predicted, true = shown["scratch_preds_epoch_8.png"]
    where = [[j for j in range(len(val)) if torch.equal(images[i], val.images[j].float() / 255)]
             for i in range(len(images))]
    assert len(images) == 16 and all(len(w) == 1 for w in where) and len({w[0] for w in where}) == 16
    # Evenly spaced through the val split, first and last included: a folder's val images come sorted by class.
    assert [w[0] for w in where] == torch.linspace(0, len(val) - 1, 16).round().long().tolist()
    assert predicted == [preds[w[0]] for w in where] and true == [labels[w[0]] for w in where]
    assert len(set(predicted)) > 3


def test_each_epoch_draws_augmentation_of_its_own(tmp_path, monkeypatch):
    """The finetune recipe's random numbers are seeded from (--seed, epoch, rank) at each epoch's start: the first
    chunk of epoch 2 gets other crops, ops and erasing than the first chunk of epoch 1, and within an epoch each
    chunk draws anew. (A resumed run draws what a straight one did: test_resume_continues_the_same_run.)"""
    draws, augment_draws = [], train_classifier.augment_draws

    def recording(*args, **kwargs):
        draws.append(augment_draws(*args, **kwargs))
        return draws[-1]
    monkeypatch.setattr(train_classifier, "augment_draws", recording)
    run_cls(cls_argv(tmp_path))
    chunks = STEPS * BATCH // 16  # per epoch: --max_device_batch_size 16
    assert len(draws) == 2 * chunks and set(draws[0]) >= {"crop", "trivial", "erase"}

    def leaves(x):  # the tensors of a nest of dicts and tuples
        if isinstance(x, (dict, tuple)):
            return [t for v in (x.values() if isinstance(x, dict) else x) for t in leaves(v)]
        return [x]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(leaves(a), leaves(b), strict=True))
    assert not same(draws[0], draws[chunks]) and not same(draws[0], draws[1])


def script_val_accuracies(monkeypatch, accuracies) -> None:
    """Replace the val accuracy evaluate returns, epoch after epoch, by these (its loss and predictions stay)."""
    scripted, evaluate = iter(accuracies), train_classifier.evaluate

    def scripted_evaluate(*args, **kwargs):
        val_loss, _, predicted = evaluate(*args, **kwargs)
        return val_loss, next(scripted), predicted
    monkeypatch.setattr(train_classifier, "evaluate", scripted_evaluate)


def test_the_best_checkpoint_is_the_first_epoch_of_the_best_val_accuracy(tmp_path, monkeypatch, capsys):
    """With val accuracies 0.5, 0.5, 0.4 (evaluate's own, replaced), the best epoch is 1: a later epoch that only
    equals the best does not replace its checkpoint. The last checkpoint is epoch 3's."""
    script_val_accuracies(monkeypatch, [0.5, 0.5, 0.4])
    run_cls(cls_argv(tmp_path, epochs=3))
    summary = json.load(open(tmp_path / "run" / "cls_outputs" / "scratch_summary.json"))
    assert (summary["best_epoch"], summary["best_val_acc"], summary["final_val_acc"]) == (1, 0.5, 0.4)
    assert "done (scratch): best val acc 50.00% at epoch 1, final 40.00% (epoch 3)" in capsys.readouterr().out
    best, last = (torch.load(tmp_path / "run" / name, map_location="cpu", weights_only=True)
                  for name in ("cls.pt", "cls_last.pt"))
    assert (best["epoch"], best["val_acc"], last["epoch"], last["val_acc"]) == (1, 0.5, 3, 0.4)


def test_a_resumed_run_keeps_the_first_epoch_of_a_tied_best_val_accuracy(tmp_path, monkeypatch):
    """Val accuracies 0.5, 0.5 in a run stopped after epoch 2, then 0.4 in its resumed epoch 3: the best epoch the
    resume rebuilds from the log is the first of the tie, 1, as an uninterrupted run's is (the test above)."""
    argv = cls_argv(tmp_path, "--recipe", "plain", "--fake_size", "64", epochs=3)
    script_val_accuracies(monkeypatch, [0.5, 0.5, 0.4])
    run_cls(argv + ["--stop_after", "2"])
    run_cls(argv + ["--resume", str(tmp_path / "run" / "cls_last.pt")])
    summary = json.load(open(tmp_path / "run" / "cls_outputs" / "scratch_summary.json"))
    assert (summary["best_epoch"], summary["best_val_acc"], summary["final_val_acc"]) == (1, 0.5, 0.4)


def test_a_first_epoch_of_zero_val_accuracy_is_the_best_so_far(tmp_path, monkeypatch):
    """Val accuracy 0 at every epoch (a probe of a random encoder on a few images may score it): the first epoch is
    still the best so far, so the best checkpoint exists and holds epoch 1, and the summary names epoch 1."""
    script_val_accuracies(monkeypatch, [0.0, 0.0])
    run_cls(cls_argv(tmp_path, "--recipe", "plain", "--fake_size", "64"))
    summary = json.load(open(tmp_path / "run" / "cls_outputs" / "scratch_summary.json"))
    assert (summary["best_epoch"], summary["best_val_acc"]) == (1, 0.0)
    assert torch.load(tmp_path / "run" / "cls.pt", map_location="cpu", weights_only=True)["epoch"] == 1


def test_a_dataset_of_12_classes_trains_with_mixup_over_all_12(tmp_path, monkeypatch):
    """--dataset fake made of 12 classes (CIFAR-100 has 100): the finetune recipe's Mixup builds its targets over
    all 12 (labels 10 and 11 among them) and the head has 12 outputs, not CIFAR-10's 10."""
    import functools
    monkeypatch.setattr(data, "fake_images", functools.partial(data.fake_images, num_classes=12))
    run_cls(cls_argv(tmp_path, "--fake_size", "64", epochs=1))
    last = torch.load(tmp_path / "run" / "cls_last.pt", map_location="cpu", weights_only=True)
    assert last["num_classes"] == 12 and last["model"]["head.weight"].shape[0] == 12


def test_a_resume_without_the_log_of_an_earlier_epoch_is_refused(tmp_path, capsys):
    """The curves and the best epoch are rebuilt from the log: a log that lacks epoch 1 of a checkpoint of epoch 2
    (its last record there) is refused in one line, nothing changed."""
    argv = cls_argv(tmp_path, "--recipe", "plain", "--fake_size", "64", epochs=3)
    run_cls(argv + ["--stop_after", "2"])
    log = tmp_path / "run" / "cls_outputs" / "scratch_log.jsonl"
    log.write_text(log.read_text().splitlines(keepends=True)[1])  # epoch 2's record alone
    err = refused_in_one_line(argv + ["--resume", str(tmp_path / "run" / "cls_last.pt")], tmp_path / "run", capsys)
    assert f"--resume: {str(log)!r} does not hold epochs 1 to 2 of the checkpoint" in err, err


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_a_non_finite_training_loss_stops_the_run_and_its_checkpoints_stay_those_of_earlier_epochs(
        tmp_path, monkeypatch, bad, background_writers):
    """A training loss of inf, not only nan, at epoch 2 stops the run with a message that names the epoch, the loss
    and both checkpoints; the best and the last checkpoint and the log stay those of epoch 1."""
    real_epoch = train_classifier.train_one_epoch

    def train_one_epoch(*args):
        stats = real_epoch(*args)
        return {**stats, "train_loss": bad} if args[10] == 2 else stats  # args[10]: the epoch
    monkeypatch.setattr(train_classifier, "train_one_epoch", train_one_epoch)
    with pytest.raises(SystemExit) as exc:
        run_cls(cls_argv(tmp_path, epochs=3))
    background_writers[0].close()  # what the interpreter's exit does
    run = tmp_path / "run"
    assert str(exc.value.code).startswith(f"epoch 2: the training loss is {bad}; stopping. {run / 'cls.pt'} and "
                                          f"{run / 'cls_last.pt'} still hold earlier epochs."), exc.value.code
    for name in ("cls.pt", "cls_last.pt"):
        assert torch.load(run / name, map_location="cpu", weights_only=True)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in open(run / "cls_outputs" / "scratch_log.jsonl")] == [1]


def test_a_non_finite_training_loss_in_the_first_epoch_says_no_checkpoint_was_written(tmp_path, monkeypatch):
    """At epoch 1 there is no checkpoint of the run to point to (it said both held earlier epochs)."""
    real_epoch = train_classifier.train_one_epoch
    monkeypatch.setattr(train_classifier, "train_one_epoch",
                        lambda *args: {**real_epoch(*args), "train_loss": math.nan})
    with pytest.raises(SystemExit) as exc:
        run_cls(cls_argv(tmp_path))
    assert exc.value.code == "epoch 1: the training loss is nan; stopping. This run wrote no checkpoint. Try a " \
                             "lower --base_learning_rate."
    assert not (tmp_path / "run" / "cls.pt").exists() and not (tmp_path / "run" / "cls_last.pt").exists()


def test_sigterm_ends_the_script_with_status_143_and_the_outputs_of_its_last_finished_epoch(tmp_path):
    """The script run as a command, stopped by SIGTERM in the middle of a long run: it exits with 128 + 15 after
    writing what its last finished epoch left (the last checkpoint and the log agree), with no temporary file left
    behind."""
    log = tmp_path / "run" / "cls_outputs" / "scratch_log.jsonl"
    assert stop_with_sigterm("train_classifier.py", cls_argv(tmp_path, epochs=1000), log) == 128 + 15
    epoch = torch.load(tmp_path / "run" / "cls_last.pt", map_location="cpu", weights_only=True)["epoch"]
    assert epoch >= 1 and [json.loads(line)["epoch"] for line in open(log)] == list(range(1, epoch + 1))
    assert not [p for p in (tmp_path / "run").rglob("*") if ".tmp" in p.name]


def test_a_stop_after_past_the_last_epoch_ends_the_run_at_its_last_epoch(tmp_path):
    """--stop_after beyond --total_epoch stops where the schedule ends: one epoch of a one-epoch run, not three."""
    run_cls(cls_argv(tmp_path, "--warmup_epoch", "0", "--stop_after", "3", epochs=1))
    assert len(np.load(tmp_path / "run" / "cls_outputs" / "scratch_val_acc.npy")) == 1
    assert torch.load(tmp_path / "run" / "cls_last.pt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("rate", [0.1, 0.0])
def test_drop_path_flag_sets_each_blocks_rate_rising_linearly_with_depth(tmp_path, rate):
    """--drop_path r gives the encoder's blocks stochastic depth at rates 0 to r, linear in depth (DeiT, MAE's
    fine-tuning); 0 gives no DropPath at all (no random draws)."""
    from model import DropPath
    args = parse(cls_argv(tmp_path, "--drop_path", str(rate), "--depth", "3"))
    train_classifier.resolve_recipe(args)  # the recipe's other flags, as main does
    model = train_classifier.build_model(args, train_classifier.model_config(args, None), 10, None)
    for block, expected in zip(model.encoder.blocks, [0.0, rate / 2, rate], strict=True):
        for drop in (block.drop_path1, block.drop_path2):
            if rate:
                assert isinstance(drop, DropPath) and drop.drop_prob.item() == pytest.approx(expected)
            else:
                assert isinstance(drop, torch.nn.Identity)


@pytest.mark.parametrize("extra", [[], ["--linear_probe"]])  # the probe trains its head on precomputed features
def test_resume_continues_the_same_run(tmp_path, mae_ckpt, extra, monkeypatch, capsys):
    """Three epochs straight, and one then two more with --resume: the same curves, best epoch and weights. The
    finetune recipe draws augmentation, mixup and drop path from per-epoch seeds, so a resumed epoch draws what
    the straight run's did. The resume draws the grids of its own epochs only: the one before training stays the
    first run's. Grids in the folder of epochs a run has not trained, and the final grid, are an earlier run's:
    plot_results showed such a final grid as the run's. Each run removes its own of those, not another run's."""
    flags = ["--pretrained_model_path", mae_ckpt, *extra]
    run_cls(cls_argv(tmp_path, *flags, name="straight", epochs=3))
    split = cls_argv(tmp_path, *flags, name="split", epochs=3)
    out = tmp_path / "split" / "cls_outputs"
    run = "linprobe" if extra else "pretrained"
    out.mkdir(parents=True)
    for name in (f"{run}_preds_grid.png", f"{run}_preds_epoch_3.png"):  # an earlier run of the same name's
        shutil.copy(tmp_path / "straight" / "cls_outputs" / name, out / name)
    (out / "scratch_preds_epoch_3.png").write_bytes(b"another run's")
    capsys.readouterr()
    run_cls(split + ["--stop_after", "1"])
    assert capsys.readouterr().out.endswith(f"stopped after epoch 1 of 3 (--stop_after): the same command with "
                                            f"--resume {tmp_path / 'split' / 'cls_last.pt'} continues the run\n")
    assert len(np.load(out / f"{run}_val_acc.npy")) == 1
    assert not (out / f"{run}_preds_grid.png").exists()  # the run's final grid comes at its last epoch
    assert sorted(name for name in os.listdir(out) if name.endswith(".png")) == [
        f"{run}_preds_epoch_0.png", "scratch_preds_epoch_3.png"]  # grids at epochs 0, 2 and 3
    before = (out / f"{run}_preds_epoch_0.png").read_bytes()
    shutil.copy(out / f"{run}_preds_epoch_0.png", out / f"{run}_preds_epoch_9.png")
    if extra:  # as an older version wrote it: the probe's BatchNorm counted chunks, which the resume recounts
        ckpt = torch.load(tmp_path / "split" / "cls_last.pt", weights_only=True)
        ckpt["model"]["head_norm.num_batches_tracked"].fill_(7)
        torch.save(ckpt, tmp_path / "split" / "cls_last.pt")
    grids, save_grid = [], utils.save_prediction_grid
    monkeypatch.setattr(utils, "save_prediction_grid", lambda path, *args, **kwargs: (
        grids.append(os.path.basename(path)), save_grid(path, *args, **kwargs)))
    capsys.readouterr()
    run_cls(split + ["--resume", str(tmp_path / "split" / "cls_last.pt")])
    assert "event files" not in capsys.readouterr().err  # a resume continues its own TensorBoard run
    assert sorted(grids) == [f"{run}_preds_epoch_2.png", f"{run}_preds_epoch_3.png"]
    assert not (out / f"{run}_preds_epoch_9.png").exists()
    assert (out / f"{run}_preds_epoch_0.png").read_bytes() == before
    assert (out / "scratch_preds_epoch_3.png").read_bytes() == b"another run's"

    straight = tmp_path / "straight" / "cls_outputs"
    for name in train_classifier.CURVES:
        resumed = np.load(out / f"{run}_{name}.npy")
        assert len(resumed) == 3 and resumed == pytest.approx(np.load(straight / f"{run}_{name}.npy"), rel=1e-5)
    assert [json.loads(line)["epoch"] for line in open(out / f"{run}_log.jsonl")] == [1, 2, 3]
    a, b = (json.load(open(folder / f"{run}_summary.json")) for folder in (straight, out))
    assert (a["best_epoch"], a["epochs"]) == (b["best_epoch"], b["epochs"]) == (a["best_epoch"], 3)
    assert (out / f"{run}_preds_grid.png").is_file()
    for name in ("cls.pt", "cls_last.pt"):
        x, y = (torch.load(tmp_path / d / name, weights_only=True)["model"] for d in ("straight", "split"))
        assert all(torch.allclose(x[k].float(), y[k].float(), atol=1e-5) for k in x)


def test_bad_resume_is_one_line_and_changes_nothing(tmp_path, mae_ckpt, capsys):
    argv = cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, epochs=2)
    run_cls(argv + ["--stop_after", "1"])
    run_dir = tmp_path / "run"
    last, best = str(run_dir / "cls_last.pt"), str(run_dir / "cls.pt")
    moved = run_dir / "elsewhere"
    for flags, expected in (
            (["--resume", best], "is a best-epoch checkpoint, which keeps no optimizer state"),
            (["--resume", last, "--seed", "1"], "was trained with --seed 42, this run has 1"),
            (["--resume", last, "--mixup", "0.5"], "was trained with --mixup 0.8, this run has 0.5"),
            (["--resume", last, "--total_epoch", "1"], "was trained with --total_epoch 2, this run has 1"),
            # The reference schedule ignores --min_lr; the finetune recipe's warmup_cosine ends at it.
            (["--resume", last, "--min_lr", "1e-6"], "was trained with --min_lr 0.0, this run has 1e-06"),
            (["--resume", last, "--output_dir", str(moved)], "does not hold epochs 1 to 1 of the checkpoint"),
            (["--resume", last, "--stop_after", "-1"], "--stop_after must be >= 0, got -1"),
            (["--resume", last, "--stop_after", "1"], "--stop_after 1 is not after epoch 1, where --resume"),
            # The file to resume named as the best checkpoint too (mae_pretrain.py's way), however it is spelled; and
            # a new name, where the resumed run would report as its best a file it has not written.
            (["--resume", last, "--output_model_path", f"{run_dir}/./cls_last.pt"],
             f"is not the _last.pt of --output_model_path '{run_dir}/./cls_last.pt', '{run_dir}/./cls_last_last.pt': "
             f"pass the run's best-checkpoint name, whose _last.pt is --resume (it was '{best}')"),
            (["--resume", last, "--output_model_path", f"{run_dir}/other.pt"],
             f"is not the _last.pt of --output_model_path '{run_dir}/other.pt', '{run_dir}/other_last.pt'")):
        err = refused_in_one_line(argv + flags, run_dir, capsys)
        assert expected in err, err
    assert not moved.exists()


def test_a_resume_of_another_model_names_the_config_fields_that_differ(tmp_path, capsys):
    """A _last.pt whose model config is not the one these flags give (another version of this code, which had
    another field or lacked one; an edited file) is refused naming each field that differs, with both values."""
    argv = cls_argv(tmp_path, epochs=2)
    run_cls(argv + ["--stop_after", "1"])
    last = tmp_path / "run" / "cls_last.pt"
    ckpt = torch.load(last, weights_only=True)
    del ckpt["config"]["norm_pix_loss"]
    ckpt["config"].update(depth=ckpt["config"]["depth"] + 1, loss="l1")
    torch.save(ckpt, last)
    depth = ckpt["config"]["depth"]
    err = refused_in_one_line(argv + ["--resume", str(last)], tmp_path / "run", capsys)
    assert err.endswith(f"--resume {str(last)!r} holds another model than these flags give: depth {depth} there, "
                        f"{depth - 1} here; loss l1 there, (absent) here; norm_pix_loss (absent) there, False "
                        "here"), err


def test_a_run_replaces_its_own_checkpoints_and_no_other_file(tmp_path, mae_ckpt, capsys):
    """A rerun under the same names replaces its earlier checkpoints (and warns that its TensorBoard events join the
    earlier run's, which stay); a file under a checkpoint's name that is not
    this script's checkpoint (the pretraining's, named by a slip of the flag; the fine-tune's under the pretraining's
    --model_path; any other file) is refused in one line, exit status 2, and stays as it was."""
    import mae_pretrain
    run_cls(cls_argv(tmp_path, epochs=1))
    assert "event files" not in capsys.readouterr().err
    run_cls(cls_argv(tmp_path, "--recipe", "plain", epochs=1))  # the same names again: replaced
    assert torch.load(tmp_path / "run" / "cls_last.pt", weights_only=True)["args"]["recipe"] == "plain"
    # The first run's TensorBoard events stay, and a warning says the two runs would be drawn as one.
    log_dir = str(tmp_path / "run" / "logs")
    assert [line for line in capsys.readouterr().err.splitlines() if "warning:" in line] == [
        f"{utils._prog()}: warning: {logged_before_warning(log_dir)}"]
    assert len(os.listdir(log_dir)) == 2
    run_dir = tmp_path / "run"
    shutil.copyfile(mae_ckpt, run_dir / "mae.pt")
    shutil.copyfile(mae_ckpt, run_dir / "other_last.pt")
    (run_dir / "notes.pt").write_text("not a checkpoint")
    for path, named in ((run_dir / "mae.pt", run_dir / "mae.pt"), (run_dir / "other.pt", run_dir / "other_last.pt"),
                        (run_dir / "notes.pt", run_dir / "notes.pt")):
        argv = cls_argv(tmp_path, epochs=1)
        argv[argv.index("--output_model_path") + 1] = str(path)
        assert f"--output_model_path {str(named)!r} is a file but not a train_classifier.py checkpoint, and this run " \
               "would replace it: choose another name, or move that file" in refused_in_one_line(argv, run_dir, capsys)

    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    argv = tiny_pretrain_argv(tmp_path, name="pre")
    argv[argv.index("--model_path") + 1] = str(run_dir / "cls.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"--model_path {str(run_dir / 'cls.pt')!r} is a file but not a mae_pretrain.py checkpoint, "
                        "and this run would replace it: choose another name, or move that file"), err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    assert not (tmp_path / "pre").exists()


@pytest.mark.parametrize("edit", ["missing weight", "optimizer groups", "moment size"])
def test_resume_of_a_checkpoint_whose_state_does_not_fit_is_refused_before_anything_changes(tmp_path, mae_ckpt,
                                                                                            capsys, edit):
    """A _last.pt of another version of this code, or an edited one, whose weights or optimizer state do not fit the
    classifier and optimizer (its layer-decay groups) the flags give: refused in one line, exit status 2, no file
    changed (utils.check_resume_state)."""
    argv = cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, epochs=2)
    run_cls(argv + ["--stop_after", "1"])
    capsys.readouterr()
    last = tmp_path / "run" / "cls_last.pt"
    ckpt = torch.load(last, weights_only=True)
    groups = ckpt["optimizer"]["param_groups"]
    if edit == "missing weight":
        del ckpt["model"]["head.weight"]
        expected = "its weights do not fit this model (1 missing: head.weight)"
    elif edit == "moment size":  # an epoch ran on memory the fused step overwrote, then a segmentation fault
        index = groups[-1]["params"][-1]
        ckpt["optimizer"]["state"][index]["exp_avg_sq"] = torch.zeros(3)
        expected = f"its optimizer state's exp_avg_sq of parameter {index} has shape (3,), the parameter ("
    else:
        sizes = [len(group["params"]) for group in groups]
        groups[0]["params"] += groups.pop()["params"]
        merged = [sizes[0] + sizes[-1], *sizes[1:-1]]
        expected = f"its optimizer state does not fit this run's optimizer (parameters per group: {merged}, this " \
                   f"run's {sizes})"
    torch.save(ckpt, last)
    err = refused_in_one_line(argv + ["--resume", str(last)], tmp_path / "run", capsys)
    assert f"--resume {str(last)!r}: {expected}" in err, err


def test_resume_of_a_checkpoint_with_fields_of_the_wrong_kind_is_refused_before_anything_changes(tmp_path, capsys):
    """A hand-edited _last.pt whose fields hold the wrong type (the class count as text, the encoder's digest as a
    number, the epoch as True) or an epoch before 1: refused in one line, exit status 2, no file changed. The class
    count and the digest are optional (older checkpoints lack them), so they are checked only when present."""
    argv = cls_argv(tmp_path, epochs=2)
    run_cls(argv + ["--stop_after", "1"])
    last = tmp_path / "run" / "cls_last.pt"
    saved = torch.load(last, weights_only=True)
    for key, value, expected in (
            ("num_classes", "10", "not a checkpoint of this project (its num_classes is of type str, not int)"),
            ("pretrained_sha256", 5,
             "not a checkpoint of this project (its pretrained_sha256 is of type int, not str or NoneType)"),
            ("classes", "airplane", "not a checkpoint of this project (its classes is of type str, not list)"),
            ("epoch", True, "not a checkpoint of this project (its epoch is of type bool, not int)"),
            ("epoch", 0, "records epoch 0, but a run's checkpoint follows epoch 1 or later"),
            ("num_classes", -1, "its num_classes -1 is not a count of classes (it names 10)"),
            ("num_classes", 11, "its num_classes 11 is not a count of classes (it names 10)")):
        torch.save({**saved, key: value}, last)
        err = refused_in_one_line(argv + ["--resume", str(last)], tmp_path / "run", capsys)
        assert f"--resume {str(last)!r}" in err and expected in err, (key, value, err)
    # An older checkpoint names no classes: a count past int64 fails in torch, and is one line too.
    torch.save({**{k: v for k, v in saved.items() if k != "classes"}, "num_classes": 10 ** 20}, last)
    err = refused_in_one_line(argv + ["--resume", str(last)], tmp_path / "run", capsys)
    assert err.endswith(f"--resume {str(last)!r}: its num_classes {10 ** 20} builds no classifier"), err


def test_a_folder_under_the_name_of_an_output_file_is_refused_before_anything_is_written(tmp_path, capsys):
    """A folder in --output_dir under the name of a file the run writes there (<run>_<name>; a run name with
    characters that are wildcards to fnmatch): one line at the start, no file written. The save failed on it with
    a traceback at the end of the first epoch."""
    out = tmp_path / "run" / "outputs"
    for run, name in (("scratch", "args.json"), ("scratch", "summary.json"), ("scratch", "val_acc.npy"),
                      ("scratch", "preds_epoch_7.png"), ("a[1]*", "preds_grid.png"), ("a[1]*", "log.jsonl")):
        (out / f"{run}_{name}").mkdir(parents=True)
        argv = cls_argv(tmp_path, "--run_name", run, "--output_dir", str(out))
        err = refused_in_one_line(argv, tmp_path / "run", capsys)
        assert err.endswith(f"--output_dir: {str(out / f'{run}_{name}')!r} is a folder: this script writes a file of "
                            "that name there"), err
        assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == sorted(["outputs", f"{run}_{name}"])
        (out / f"{run}_{name}").rmdir()
    (out / "a1x_log.jsonl").mkdir()  # what the wildcards would match, were they not escaped: no output's name
    run_cls(cls_argv(tmp_path, "--run_name", "a[1]*", "--output_dir", str(out), epochs=1))
    assert (out / "a[1]*_log.jsonl").is_file()


def test_resume_checks_the_pretrained_weights_not_their_path(tmp_path, mae_ckpt, capsys):
    """A pretrained fine-tune resumes with its MAE checkpoint at another path (the same weights). It is refused,
    in one line with status 2 and nothing changed, when its path now holds another encoder (as a pretraining's does
    after its next epoch) or none is given; a run from scratch is refused a checkpoint. A checkpoint written
    before the weights' digest was kept falls back to comparing the paths."""
    mae = torch.load(mae_ckpt, weights_only=True)
    first = tmp_path / "first" / "mae.pt"
    first.parent.mkdir()
    torch.save(mae, first)
    run_cls(cls_argv(tmp_path, "--pretrained_model_path", str(first), "--stop_after", "1"))
    last = tmp_path / "run" / "cls_last.pt"
    assert torch.load(last, weights_only=True)["pretrained_sha256"] == utils.encoder_digest(mae["model"])
    torch.save({**mae, "model": {**mae["model"], "encoder.cls_token": mae["model"]["encoder.cls_token"] + 1e-3}},
               first)  # the pretraining went on
    no_digest = tmp_path / "no_digest_last.pt"
    torch.save({k: v for k, v in torch.load(last, weights_only=True).items() if k != "pretrained_sha256"}, no_digest)
    run_cls(cls_argv(tmp_path, "--stop_after", "1", name="scratch"))
    scratch_last = str(tmp_path / "scratch" / "cls_last.pt")
    capsys.readouterr()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for flags, expected in (
            (["--resume", str(last), "--pretrained_model_path", str(first)],
             f"--pretrained_model_path {str(first)!r} holds another encoder than the MAE checkpoint --resume "
             f"{str(last)!r} started from ({str(first)!r} then; its weights' SHA-256 "),
            (["--resume", str(last)], f"started from the MAE checkpoint {str(first)!r}: pass it as "
                                      "--pretrained_model_path"),
            (["--resume", mae_ckpt, "--pretrained_model_path", mae_ckpt],
             f"--resume {mae_ckpt!r} is not a train_classifier.py checkpoint (no num_classes); an MAE checkpoint "
             "to start from goes to --pretrained_model_path"),
            (["--resume", scratch_last, "--pretrained_model_path", mae_ckpt, "--run_name", "scratch"],
             f"--resume {scratch_last!r} started from random weights: leave out --pretrained_model_path"),
            (["--resume", str(no_digest), "--pretrained_model_path", mae_ckpt],
             f"was trained with --pretrained_model_path {str(first)}, this run has {mae_ckpt}")):
        with pytest.raises(SystemExit) as exc:
            run_cls(cls_argv(tmp_path, *flags))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    run_cls(cls_argv(tmp_path, "--resume", str(last), "--pretrained_model_path", mae_ckpt))  # moved, same weights
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "cls_outputs" / "pretrained_log.jsonl")] \
        == [1, 2]


def test_resume_on_images_of_other_classes_is_refused_before_anything_changes(tmp_path, capsys):
    """--data_path may change on a resume (the images moved), their classes may not: another number would not fit
    the head, other names would continue the run on another labelling. Refused in one line, exit status 2, before
    anything is written."""
    images = tmp_path / "images"
    shutil.copytree(FIXTURE_DIR, images)
    argv = cls_argv(tmp_path, "--dataset", "folder", "--data_path", str(images), "--val_split", "10", "--recipe",
                    "plain", epochs=2)
    run_cls(argv + ["--stop_after", "1"])
    (images / "train" / "cat").rename(images / "train" / "kitten")
    last = str(tmp_path / "run" / "cls_last.pt")
    err = refused_in_one_line(argv + ["--resume", last], tmp_path / "run", capsys)
    classes = sorted(os.listdir(FIXTURE_DIR + "/train"))
    renamed = sorted(["kitten" if name == "cat" else name for name in classes])
    assert err.endswith(f"--resume {last!r} trained on 10 classes ({classes}); these images have 10 ({renamed})"), err


def test_a_reference_schedule_run_resumes_whatever_min_lr_its_checkpoint_kept(tmp_path):
    """The reference schedule ignores --min_lr, which check_args now refuses with it; a checkpoint of a plain-recipe
    run that was given one (before that check) still resumes: its min_lr is not compared."""
    argv = cls_argv(tmp_path, "--recipe", "plain", "--fake_size", "64", epochs=2)
    run_cls(argv + ["--stop_after", "1"])
    last = tmp_path / "run" / "cls_last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["args"]["min_lr"] = 1e-6
    torch.save(ckpt, last)
    run_cls(argv + ["--resume", str(last)])
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "run" / "cls_outputs" / "scratch_log.jsonl")] \
        == [1, 2]


def test_resuming_a_finished_run_is_refused_and_changes_nothing(tmp_path, capsys):
    """A _last.pt of the run's last epoch has nothing left to run: --resume of it is refused in one line, exit
    status 2, and no file of the run changes."""
    argv = cls_argv(tmp_path, "--recipe", "plain", "--fake_size", "64", epochs=1)  # two steps of 32
    run_cls(argv)
    last = str(tmp_path / "run" / "cls_last.pt")
    err = refused_in_one_line(argv + ["--resume", last], tmp_path / "run", capsys)
    assert f"--resume {last!r} has already finished all 1 epochs" in err, err


# The flags a resumed fine-tuning may change: how it runs (chunking, devices, precision, compilation, attention,
# logging) and where its files are. The model-size flags must give the checkpoint's config (load_resume compares
# the two); every other flag defines the run.
MAY_CHANGE_ON_RESUME = {"max_device_batch_size", "data_path", "data_on", "device", "precision", "compile",
                        "compile_mode", "compile_scope", "capture_step", "attention", "log_interval",
                        "output_model_path", "output_dir", "run_name", "log_dir", "resume", "stop_after",
                        "pretrained_model_path"}  # its weights must be the same (check_same_start), not its name


def test_resume_refuses_a_change_of_every_flag_that_defines_the_run(tmp_path, capsys):
    """Every flag of train_classifier.py but those a resume may change (MAY_CHANGE_ON_RESUME) and the model sizes
    is run-defining: utils.check_resumable, given train_classifier's RUN_DEFINING_FLAGS, refuses a checkpoint
    trained with another value of any of them (the recipe's parts as resolved) in one line naming the flag."""
    parser = train_classifier.get_args_parser()
    flags = {action.dest for action in parser._actions if action.dest != "help"}
    defining = flags - MAY_CHANGE_ON_RESUME - set(utils.MODEL_SIZE_FLAGS)
    assert set(train_classifier.RECIPE_FLAGS) <= defining and set(train_classifier.RUN_DEFINING_FLAGS) == defining
    args = parse(cls_argv(tmp_path, "--resume", "last.pt"))
    train_classifier.resolve_recipe(args)
    saved = vars(args)
    check_resume_refuses_each_defining_flag(saved, defining, MAY_CHANGE_ON_RESUME, train_classifier.RUN_DEFINING_FLAGS,
                                            capsys)


def test_pretrained_plain_run_writes_every_output_with_the_reference_schedule(tmp_path, mae_ckpt):
    argv = cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, "--recipe", "plain", epochs=3)
    run_cls(argv)
    summary = check_run_outputs(tmp_path / "run", "pretrained", 3, argv)
    assert summary["pretrained_model_path"] == mae_ckpt and summary["recipe"] == "plain"
    events = EventAccumulator(str(tmp_path / "run" / "logs"), size_guidance={"scalars": 0}).Reload()
    # The reference's lr: min((e + 1) / warmup, cosine over the whole run), here per step.
    total, warmup, peak = 3 * STEPS, STEPS, 1e-3 * BATCH / 256
    expected = [peak * min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / total))) for s in range(total)]
    assert [e.value for e in events.Scalars("lr")] == pytest.approx(expected, rel=1e-6)


def test_linear_probe_trains_the_head_only(tmp_path, mae_ckpt, capsys):
    argv = cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, "--linear_probe")
    run_cls(argv)
    summary = check_run_outputs(tmp_path / "run", "linprobe", 2, argv)
    assert summary["linear_probe"] is True
    assert summary["recipe_settings"] == {**train_classifier.PROBE_SETTINGS, "schedule": "warmup_cosine"}
    # The settings line says they are the probe's, not --recipe's (finetune, by default): those are its schedule only.
    model_line, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("model: ")]
    assert "; linear probe, with the probe's settings and recipe finetune's lr schedule: {'crop_padding': 0, " in \
        model_line

    pretrained = mae_encoder(mae_ckpt)
    args = parse(argv)
    train_classifier.check_args(args)
    torch.manual_seed(args.seed)  # as main() does, so this is the head the probe started from
    initial = train_classifier.build_model(args, MAEConfig(**torch.load(mae_ckpt, weights_only=True)["config"]),
                                           10, torch.load(mae_ckpt, weights_only=True)["model"])
    for name in ("cls.pt", "cls_last.pt"):
        state = torch.load(tmp_path / "run" / name, weights_only=True)["model"]
        assert all(torch.equal(state[k], v) for k, v in pretrained.items()), name  # bit-identical encoder
        assert not torch.equal(state["head.weight"], initial.head.weight)
        assert state["head_norm.running_var"].ne(1).all()  # BatchNorm statistics were learnt
    optimizer = torch.load(tmp_path / "run" / "cls_last.pt", weights_only=True)["optimizer"]
    assert sum(len(g["params"]) for g in optimizer["param_groups"]) == 2  # head.weight and head.bias


def test_a_probe_step_on_augmented_images_leaves_the_encoder_unchanged(tmp_path, mae_ckpt):
    # With augmentation the frozen encoder runs every step (no cached features): the path where it could drift.
    args = parse(cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, "--linear_probe", "--hflip",
                          "--crop_padding", "2"))
    train_classifier.check_args(args)
    mae_state, config, _ = train_classifier.load_pretrained(args.pretrained_model_path)
    model = train_classifier.build_model(args, train_classifier.model_config(args, config), 10, mae_state)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    optimizer = utils.make_adamw(utils.layer_decay_groups(model, 0.05, 1.0, 2), 1e-3, (0.9, 0.999), torch.device("cpu"))
    images = data.fake_images(64).images
    labels = data.fake_images(64).labels
    stats = train_classifier.train_one_epoch(
        model, model.encoder, optimizer, torch.amp.GradScaler("cpu", enabled=False), images, labels,
        lambda x: train_classifier.augment(x, args), None, torch.nn.CrossEntropyLoss(), args, 1,
        torch.device("cpu"), None, SummaryWriter(str(tmp_path / "tb")))
    assert math.isfinite(stats["train_loss"])
    assert not model.encoder.training and model.head_norm.training
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(model.head.weight, head_before)


@pytest.mark.parametrize("augmented", [False, True])
def test_a_probe_trains_on_features_computed_once_only_when_its_images_are_not_augmented(tmp_path, mae_ckpt,
                                                                                         augmented):
    """Without augmentation a probe's features are the same every epoch: the head (BatchNorm and linear layer)
    trains on the frozen encoder's features, computed once, here against the encoder run on the images. With any
    augmentation (--hflip) each step must embed its own augmented views: the model trains on the uint8 images, its
    encoder frozen."""
    args = parse(cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, "--linear_probe",
                          *(["--hflip"] if augmented else [])))
    train_classifier.check_args(args)
    mae_state, config, _ = train_classifier.load_pretrained(args.pretrained_model_path)
    model = train_classifier.build_model(args, train_classifier.model_config(args, config), 10, mae_state)
    images, val_images = data.fake_images(8).images, data.fake_images(4, seed=1).images
    net, frozen, inputs, val_inputs, _, _ = train_classifier.training_inputs(model, images, val_images, 4, args,
                                                                            torch.device("cpu"), None)
    if augmented:
        assert net is model and frozen is model.encoder and inputs is images and val_inputs is val_images
        return
    assert frozen is None and list(net) == [model.head_norm, model.head]
    with torch.no_grad():
        for features, split in ((inputs, images), (val_inputs, val_images)):
            torch.testing.assert_close(features, model.eval().features(data.normalize(split)))


def test_val_images_the_mae_trained_on_are_counted_and_warned_about(tmp_path, mae_ckpt, capsys, monkeypatch):
    """--val_split N holds out the first N of one fixed permutation: a pretraining on the same images that held
    out M < N trained on N - M of the fine-tune's val images; other data, or the dataset's own val split, none."""
    def seen(pretrain, **flags):
        args = parse(cls_argv(tmp_path, *[str(v) for k, v in flags.items() for v in (f"--{k}", v)]))
        return train_classifier.val_images_pretrained_on(args, pretrain)
    fake = {"dataset": "fake", "fake_size": FAKE_TRAIN, "data_path": "data"}
    assert seen({**fake, "val_split": 0}, val_split=32) == 32
    assert seen({**fake, "val_split": 20}, val_split=32) == 12
    assert seen({**fake, "val_split": 32}, val_split=32) == 0
    assert seen({**fake, "val_split": 40}, val_split=32) == 0  # its held-out images include all of ours
    assert seen({**fake, "val_split": 0}, val_split=0) == 0  # our val split is the dataset's own
    assert seen({**fake, "val_split": 0, "fake_size": 256}, val_split=32) == 0  # other images
    assert seen({}, val_split=32) == 0  # a checkpoint without args: nothing to tell
    folder = {"dataset": "folder", "data_path": str(tmp_path / "imgs"), "val_split": 0}
    assert seen(folder, dataset="folder", data_path=tmp_path / "imgs", val_split=5) == 5
    assert seen(folder, dataset="folder", data_path=tmp_path / "other", val_split=5) == 0

    # mae_ckpt pretrained on all 128 fake images: a fine-tune holding out 32 of them is told, in one line.
    run_cls(cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, "--val_split", "32", epochs=1))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "its MAE trained on 32 of these 32 val images" in warnings[0], warnings

    # The warning waits for the last check (the output folders, refused here): a bad input's error is the one line.
    monkeypatch.setattr(utils, "write_refusal",
                        lambda flag, folder, made=None: f"{flag}: cannot write in folder {folder!r} (x)")
    argv = cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, "--val_split", "32", epochs=1, name="refused")
    assert "error: --output_dir: cannot write in folder" in refused_in_one_line(argv, tmp_path, capsys)


def test_pretrained_encoder_gets_exactly_the_checkpoints_weights_and_only_the_head_is_new(tmp_path, mae_ckpt):
    args = parse(cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt))
    train_classifier.check_args(args)
    mae_state, config, _ = train_classifier.load_pretrained(mae_ckpt)
    cfg = train_classifier.model_config(args, config)
    assert dataclasses.asdict(cfg) == torch.load(mae_ckpt, weights_only=True)["config"]
    # args.json records the sizes of the MAE the encoder came from, its decoder's included.
    assert {name: getattr(args, name) for name in utils.MODEL_SIZE_FLAGS} == \
        {name: config[name] for name in utils.MODEL_SIZE_FLAGS}
    heads = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = train_classifier.build_model(args, cfg, 10, mae_state)
        state = model.state_dict()
        expected = mae_encoder(mae_ckpt)
        assert {k for k in state if k.startswith("encoder.")} == set(expected)
        assert all(torch.equal(state[k], v) for k, v in expected.items())
        assert set(state) - set(expected) == {"head.weight", "head.bias"}
        heads.append(state["head.weight"])
    assert not torch.equal(*heads)  # the head is the only thing the seed decides


def test_evaluate_scores_the_whole_split_in_order_whatever_the_chunk():
    torch.manual_seed(0)
    net = ViTClassifier(MAEConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2), num_classes=10).eval()
    images = torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (11,))
    with torch.no_grad():
        logits = net(data.normalize(images))  # one pass over all 11, the independent reference
    for chunk in (4, 64):  # chunks of 4, 4 and 3; one chunk
        loss, acc, predicted = train_classifier.evaluate(net, images, labels, data.normalize, chunk,
                                                         torch.device("cpu"), None)
        assert torch.equal(predicted, logits.argmax(dim=-1))
        assert loss == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
        assert acc == pytest.approx((predicted == labels).float().mean().item())


def _linear_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10))


def test_train_step_accumulates_the_batch_mean_gradient_and_counts_against_the_unmixed_labels():
    """One step of a 16-image batch in 4 chunks, with a mixing function whose soft targets (the next class) never
    name the true label: the parameters move by -lr times the gradient of the whole batch's mean loss (the chunks'
    gradients summed, each loss divided by the 4 chunks), loss_sum gains the 4 chunk losses undivided, and correct
    counts predictions equal to the true labels, not to the targets' argmax. Reference: the same net, before the
    step, on the whole batch at once."""
    args = SimpleNamespace(batch_size=16, max_device_batch_size=4)
    net = _linear_net()
    before = [p.detach().clone() for p in net.parameters()]
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batch_idx = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        predicted = net(data.normalize(images)).argmax(dim=-1)
    labels = torch.where(torch.arange(16) < 5, predicted, (predicted - 1) % 10)  # 5 right; 11 with target's argmax

    def mix(x, y):
        return x, F.one_hot((y + 1) % 10, 10).float()
    criterion = train_classifier.make_criterion(args, mix)
    reference = criterion(net(data.normalize(images[batch_idx])), F.one_hot((labels[batch_idx] + 1) % 10, 10).float())
    grads = torch.autograd.grad(reference, list(net.parameters()))
    chunk_losses = [criterion(net(data.normalize(images[i])), F.one_hot((labels[i] + 1) % 10, 10).float()).item()
                    for i in batch_idx.split(4)]

    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    utils.allocate_grads(optimizer)
    loss_sum, correct = torch.zeros(()), torch.zeros(())
    train_classifier.train_step(net, optimizer, torch.amp.GradScaler("cpu", enabled=False), images, labels, batch_idx,
                                0.5, data.normalize, mix, criterion, args, torch.device("cpu"), None, loss_sum, correct)
    for p, p0, g in zip(net.parameters(), before, grads):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * g, rtol=0, atol=1e-6)
    assert loss_sum.item() == pytest.approx(sum(chunk_losses), rel=1e-5)
    assert correct.item() == 5


def test_captured_steps_with_the_finetune_recipe_train_as_the_uncaptured_ones_do(cpu_step_graphs):
    """--capture_step's bookkeeping (utils.StepGraphs) with the reference fine-tune's recipe, its CUDA graphs
    replaced by CPU stand-ins that rerun what they captured on the captured tensors (conftest.ReplayedFunction): the
    augmentation and mixup/CutMix (numpy's draws on the host) stay eager between the graphs, and drop path draws
    inside the chunk's. Six steps of two chunks, the lr changing every step, train to the bit as without it: loss and
    correct counts read from the captured outputs, every call doing its work once."""
    import copy
    args = train_classifier.get_args_parser().parse_args(["--batch_size", "32", "--max_device_batch_size", "16",
                                                          *TINY_MODEL])
    train_classifier.resolve_recipe(args)
    assert args.drop_path > 0 and args.mixup > 0  # the recipe's random parts are in the step
    torch.manual_seed(0)
    cfg = MAEConfig(**{name: getattr(args, name) for name in utils.MODEL_SIZE_FLAGS})
    nets = {"plain": ViTClassifier(cfg, 10, args.global_pool, args.drop_path)}
    nets["captured"] = copy.deepcopy(nets["plain"])
    images = data.fake_images(64, seed=1)
    cpu, sums = torch.device("cpu"), {}
    prepare, mixup = train_classifier.augmentation(args, compiled=False), train_classifier.make_mixup(args, 10)
    criterion = train_classifier.make_criterion(args, mixup)
    for name, net in nets.items():
        net.train()
        optimizer = train_classifier.make_optimizer(net, args, cpu)
        graphs = utils.StepGraphs(optimizer) if name == "captured" else None
        utils.seed_epoch(0, 1)  # torch's and numpy's generators: the same batches, views, mixes and drops
        sums[name] = []
        for lr in (2 ** -10, 2 ** -11, 2 ** -9, 2 ** -13, 2 ** -10, 3 * 2 ** -12):  # float32's (test_utils.py)
            loss_sum, correct = torch.zeros(()), torch.zeros(())
            train_classifier.train_step(net, optimizer, torch.amp.GradScaler("cpu", enabled=False), images.images,
                                        images.labels, torch.randperm(64)[:32], lr, prepare, mixup, criterion, args,
                                        cpu, None, loss_sum, correct, graphs)
            sums[name].append((loss_sum.item(), correct.item()))
    chunk_graph, update_graph = cpu_step_graphs
    assert (chunk_graph.replays, update_graph.replays) == (12 - 2, 6 - 2)  # every call after the two eager ones
    assert sums["captured"] == sums["plain"]
    for a, b in zip(nets["captured"].parameters(), nets["plain"].parameters(), strict=True):
        assert torch.equal(a, b)


def test_each_epoch_shows_the_training_images_in_its_own_order_at_the_scheduled_lr():
    """train_one_epoch cuts a permutation of its own for every epoch (from --seed and the epoch): two epochs show
    the 32 images in two different orders, each image once, and an epoch run again shows its order again. Each
    optimizer step logs the lr of the warmup + cosine written out longhand, from the peak down to --min_lr."""
    args = SimpleNamespace(batch_size=8, max_device_batch_size=8, seed=42, total_epoch=2, warmup_epoch=1,
                           base_learning_rate=1e-2, schedule="warmup_cosine", min_lr=1e-5, log_interval=100)
    images = torch.arange(32).view(32, 1, 1, 1).expand(32, 3, 8, 8).to(torch.uint8)  # image i: every pixel i
    labels = torch.zeros(32, dtype=torch.int64)
    net = _linear_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    utils.allocate_grads(optimizer)
    writer, orders = LrRecorder(), []
    for epoch in (1, 2, 1):
        shown = []

        def prepare(x):
            shown.extend(x[:, 0, 0, 0].tolist())
            return data.normalize(x)
        train_classifier.train_one_epoch(net, None, optimizer, torch.amp.GradScaler("cpu", enabled=False), images,
                                         labels, prepare, None, torch.nn.CrossEntropyLoss(), args, epoch,
                                         torch.device("cpu"), None, writer)
        assert sorted(shown) == list(range(32))
        orders.append(shown)
    assert orders[0] != orders[1] and orders[0] == orders[2]
    expected = warmup_cosine_lrs(1e-2 * 8 / 256, warmup=4, total=8, min_lr=1e-5)
    assert [step for step, _ in writer.lr] == [*range(8), *range(4)]
    assert [lr for _, lr in writer.lr] == pytest.approx(expected + expected[:4], rel=1e-9)


def test_train_accuracy_counts_the_images_the_epoch_showed():
    """36 images in batches of 8: an epoch shows 32 (the partial batch is dropped). With labels the net already
    predicts and an lr of 0, train_acc is 32 correct of the 32 shown, 1.0, not 32 of 36."""
    args = SimpleNamespace(batch_size=8, max_device_batch_size=8, seed=42, total_epoch=1, warmup_epoch=0,
                           base_learning_rate=0.0, schedule="warmup_cosine", min_lr=0.0, log_interval=100)
    images = torch.randint(0, 256, (36, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    net = _linear_net()
    with torch.no_grad():
        labels = net(data.normalize(images)).argmax(dim=-1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    utils.allocate_grads(optimizer)
    stats = train_classifier.train_one_epoch(net, None, optimizer, torch.amp.GradScaler("cpu", enabled=False), images,
                                             labels, data.normalize, None, torch.nn.CrossEntropyLoss(), args, 1,
                                             torch.device("cpu"), None, None)
    assert stats["train_acc"] == 1.0


def test_train_loss_is_the_mean_of_the_epochs_chunk_losses():
    """32 images in batches of 8, chunks of 4: 4 steps of 2 chunks. The epoch's train_loss is the mean of the 8
    chunk losses the criterion returned (each the mean over its 4 images), not of the 4 steps' sums; its images per
    second are the 32 it showed over its seconds."""
    args = SimpleNamespace(batch_size=8, max_device_batch_size=4, seed=42, total_epoch=1, warmup_epoch=0,
                           base_learning_rate=1e-2, schedule="warmup_cosine", min_lr=0.0, log_interval=100)
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(1))
    net, chunk_losses = _linear_net(), []

    def criterion(logits, target):
        loss = F.cross_entropy(logits, target)
        chunk_losses.append(loss.item())
        return loss
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    utils.allocate_grads(optimizer)
    stats = train_classifier.train_one_epoch(net, None, optimizer, torch.amp.GradScaler("cpu", enabled=False), images,
                                             labels, data.normalize, None, criterion, args, 1,
                                             torch.device("cpu"), None, None)
    assert len(chunk_losses) == 8
    assert stats["train_loss"] == pytest.approx(sum(chunk_losses) / 8, rel=1e-6)
    assert stats["images_per_sec"] * stats["seconds"] == pytest.approx(32)


def test_a_pretraining_on_another_dataset_saw_none_of_the_val_images():
    """val_images_pretrained_on compares datasets first: CIFAR-100 downloaded into the same --data_path as CIFAR-10
    shares no image with it, so an MAE pretrained on CIFAR-10 saw none of a CIFAR-100 run's held-out images, while
    one pretrained on CIFAR-100 there, holding out 10, saw the other 22."""
    args = SimpleNamespace(dataset="cifar100", data_path="data", fake_size=2000, val_split=32)
    assert train_classifier.val_images_pretrained_on(args, {"dataset": "cifar10", "data_path": "data",
                                                            "val_split": 0}) == 0
    assert train_classifier.val_images_pretrained_on(args, {"dataset": "cifar100", "data_path": "data",
                                                            "val_split": 10}) == 22


@pytest.mark.parametrize("edge", [["--random_erase", "1"], ["--random_erase", "0"], ["--label_smoothing", "0"],
                                  ["--drop_path", "0"], ["--layer_decay", "1"], ["--crop_padding", "0"],
                                  ["--mixup", "0", "--cutmix", "0"]])
def test_each_recipe_flag_takes_the_ends_of_its_range_that_it_allows(tmp_path, edge):
    """The closed ends of each range the bad-input message states ("in [0, 1]" for --random_erase: erase every
    image) pass the checks."""
    train_classifier.check_args(parse(cls_argv(tmp_path, *edge)))


def test_decoder_flags_are_accepted_and_unused_from_scratch(tmp_path):
    # mae_pretrain.py's model flags work here; a decoder whose widths would not split into its heads builds
    # nothing in a classifier, so it is not an error.
    args = parse(cls_argv(tmp_path, "--decoder_embed_dim", "32", "--decoder_num_heads", "5"))
    train_classifier.check_args(args)
    cfg = train_classifier.model_config(args, None)
    assert (cfg.embed_dim, cfg.depth, cfg.patch_size) == (32, 2, 4)  # the encoder flags are used
    # args.json records the model that was trained: an encoder of those sizes, and no decoder.
    assert (args.embed_dim, args.depth, args.patch_size) == (32, 2, 4)
    assert (args.decoder_embed_dim, args.decoder_depth, args.decoder_num_heads) == (None, None, None)


def test_the_reference_commands_and_the_probe_parse_as_written():
    common = ["--total_epoch", "50", "--batch_size", "128", "--max_device_batch_size", "128"]
    scratch = parse(common + ["--output_model_path", "vit-t-classifier-from_scratch.pt"])
    pretrained = parse(common + ["--pretrained_model_path", "vit-t-mae-150ep.pt",
                                 "--output_model_path", "vit-t-classifier-from_pretrained.pt"])
    probe = parse(["--linear_probe", "--pretrained_model_path", "vit-t-mae-150ep.pt"])
    for args in (scratch, pretrained, probe):
        train_classifier.resolve_recipe(args)
    assert (scratch.run_name, pretrained.run_name, probe.run_name) == ("scratch", "pretrained", "linprobe")
    assert scratch.log_dir == os.path.join("logs", "classifier", "scratch")
    assert probe.output_model_path == "vit-t-classifier-linprobe.pt"  # given none, each run its own checkpoint
    defaults = [parse([]), parse(["--pretrained_model_path", "mae.pt"])]
    for args in defaults:
        train_classifier.resolve_recipe(args)
    assert [args.output_model_path for args in defaults] == ["vit-t-classifier-scratch.pt",
                                                             "vit-t-classifier-pretrained.pt"]
    assert (scratch.total_epoch, scratch.batch_size, scratch.base_learning_rate, scratch.weight_decay,
            scratch.warmup_epoch, scratch.seed) == (50, 128, 1e-3, 0.05, 5, 42)
    # Both arms get the same recipe; layer decay, which only has pretrained layers to act on, is 1 from scratch.
    recipe = {name: getattr(scratch, name) for name in train_classifier.RECIPE_FLAGS}
    assert recipe == {name: getattr(pretrained, name) for name in train_classifier.RECIPE_FLAGS} | {"layer_decay": 1.0}
    assert pretrained.layer_decay == train_classifier.RECIPES["finetune"]["layer_decay"]


# ----------------------------------------------------------------------------------------------------------
# Recipe

def test_each_image_flag_alone_makes_the_view_random_and_the_others_do_not():
    """augments_images decides whether a linear probe may compute its frozen features once: any recipe flag that
    changes the images (by itself, over the plain recipe) must say yes, the loss and optimiser flags no."""
    for name in train_classifier.RECIPE_FLAGS:
        args = parse(["--recipe", "plain"])
        train_classifier.resolve_recipe(args)
        setattr(args, name, train_classifier.RECIPES["finetune"][name])
        images = data.fake_images(8).images
        changes_images = name in train_classifier.IMAGE_FLAGS
        assert train_classifier.augments_images(args) == changes_images, name
        if name not in ("mixup", "cutmix"):  # those mix in make_mixup, after augment
            torch.manual_seed(0)
            assert torch.equal(train_classifier.augment(images, args), data.normalize(images)) != changes_images, name


def test_plain_recipe_is_unaugmented_and_flags_override_the_recipe():
    args = parse(["--recipe", "plain"])
    train_classifier.resolve_recipe(args)
    images = data.fake_images(8).images
    assert torch.equal(train_classifier.augment(images, args), data.normalize(images))
    assert not train_classifier.augments_images(args) and train_classifier.make_mixup(args, 10) is None
    assert (args.label_smoothing, args.drop_path, args.layer_decay, args.schedule) == (0, 0, 1, "reference")

    args = parse(["--recipe", "plain", "--mixup", "0.2", "--no-hflip"])
    train_classifier.resolve_recipe(args)
    assert args.mixup == 0.2 and args.cutmix == 0 and args.hflip is False
    args = parse(["--cutmix", "0", "--layer_decay", "0.9"])
    train_classifier.resolve_recipe(args)
    assert (args.cutmix, args.layer_decay, args.mixup, args.crop_padding) == (0, 0.9, 0.8, 4)
    torch.manual_seed(0)
    assert not torch.equal(train_classifier.augment(images, args), data.normalize(images))


def test_label_smoothing_is_the_criterions_without_mixup_and_mixups_with_it():
    """Without mixup the criterion is cross-entropy with --label_smoothing (torch's, on fixed logits), not the plain
    one; with mixup it is the soft-target cross-entropy of the targets Mixup has already smoothed."""
    args = parse(["--recipe", "plain", "--label_smoothing", "0.1"])
    train_classifier.resolve_recipe(args)
    g = torch.Generator().manual_seed(0)
    logits, labels = 3 * torch.randn(16, 10, generator=g), torch.randint(10, (16,), generator=g)
    assert train_classifier.make_mixup(args, 10) is None
    loss = train_classifier.make_criterion(args, None)(logits, labels).item()
    assert loss == pytest.approx(F.cross_entropy(logits, labels, label_smoothing=0.1).item(), rel=1e-6)
    assert loss != pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-3)

    args = parse(["--recipe", "plain", "--label_smoothing", "0.1", "--mixup", "0.8"])
    train_classifier.resolve_recipe(args)
    targets = torch.softmax(torch.randn(16, 10, generator=g), dim=1)
    loss = train_classifier.make_criterion(args, train_classifier.make_mixup(args, 10))(logits, targets).item()
    assert loss == pytest.approx(-(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean().item(), rel=1e-6)


def test_random_erasing_fills_normal_noise_in_normalised_units():
    """augment with only --random_erase 1: every image gets one rectangle of the draws' N(0, 1) noise, in normalised
    units (erasing comes after the normalisation: mean 0, std 1 there), and every pixel outside it is exactly
    data.normalize's."""
    args = parse(["--recipe", "plain", "--random_erase", "1.0"])
    train_classifier.resolve_recipe(args)
    images = data.fake_images(256, seed=5).images
    torch.manual_seed(0)
    draws = train_classifier.augment_draws(images.shape, args, torch.device("cpu"))
    out = train_classifier.augment(images, args, draws)
    # Where the rectangles are: erasing images of inf with the same draws leaves finite noise there only.
    erase = draws["erase"]
    inside = data.random_erasing(torch.full(images.shape, math.inf), 1.0, erase).isfinite()
    assert inside.flatten(1).any(dim=1).all() and not inside.flatten(1).all(dim=1).any()
    assert torch.equal(out[~inside], data.normalize(images)[~inside])
    fill = out[inside]
    assert torch.equal(fill, erase["noise"][inside])
    assert abs(fill.mean().item()) < 0.02 and abs(fill.std().item() - 1) < 0.02, (fill.mean(), fill.std())


def test_trivial_augment_works_on_pixels_in_0_1_before_the_normalisation():
    """augment with only --auto_augment trivial: TrivialAugment's ops are defined on [0, 1] pixels (solarize's
    threshold, posterize's bits, the fill of a rotation), so the view is data.trivial_augment of the images / 255,
    then normalised, written out here with the same draws."""
    args = parse(["--recipe", "plain", "--auto_augment", "trivial"])
    train_classifier.resolve_recipe(args)
    images = data.fake_images(64, seed=3).images
    torch.manual_seed(0)
    draws = train_classifier.augment_draws(images.shape, args, torch.device("cpu"))
    expected = (data.trivial_augment(images.float() / 255, draws["trivial"]) - data.PIXEL_MEAN) / data.PIXEL_STD
    torch.testing.assert_close(train_classifier.augment(images, args, draws), expected, rtol=0, atol=1e-6)


def test_recipe_layer_decay_applies_to_pretrained_runs_only():
    scratch = parse([])
    train_classifier.resolve_recipe(scratch)
    pretrained = parse(["--pretrained_model_path", "mae.pt"])
    train_classifier.resolve_recipe(pretrained)
    assert scratch.layer_decay == 1.0 and pretrained.layer_decay == 0.75
    # Everything else of the recipe is the same for both arms.
    assert all(getattr(scratch, n) == getattr(pretrained, n) for n in train_classifier.RECIPE_FLAGS
               if n != "layer_decay")
    explicit = parse(["--layer_decay", "0.8"])
    train_classifier.resolve_recipe(explicit)
    assert explicit.layer_decay == 0.8


@pytest.mark.parametrize("num_classes", [10, 100])  # CIFAR-10, and CIFAR-100's labels up to 93 here
@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_targets_are_distributions_matching_the_mixed_images(mixup, cutmix, num_classes):
    args = parse(["--mixup", str(mixup), "--cutmix", str(cutmix), "--label_smoothing", "0.1"])
    train_classifier.resolve_recipe(args)
    mix = train_classifier.make_mixup(args, num_classes=num_classes)
    # Rising labels: every image's partner (the reversed batch) has another class.
    labels = torch.arange(16) * num_classes // 16
    off, on = 0.1 / num_classes, 1 - 0.1 + 0.1 / num_classes
    kinds = set()
    for seed in range(8):
        np.random.seed(seed)
        x = torch.rand(16, 3, 32, 32)
        mixed, target = mix(x.clone(), labels)
        assert target.shape == (16, num_classes) and target.min() >= 0
        assert torch.allclose(target.sum(dim=1), torch.ones(16), atol=1e-6)
        lam = ((target[0, labels[0]] - off) / (on - off)).item()
        # Longhand: lam of the smoothed one-hot of the own label, 1 - lam of the partner's.
        smooth = torch.full((16, num_classes), off).scatter_(1, labels[:, None], on)
        assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)
        if lam > 1 - 1e-6:  # a CutMix box too small to hold a pixel: nothing was mixed, neither kind
            assert torch.allclose(mixed, x, atol=1e-6)
            continue
        from_partner = mixed == x.flip(0)
        if torch.equal(from_partner | (mixed == x), torch.ones_like(from_partner)) and lam < 1 - 1e-6:
            kinds.add("cutmix")  # every pixel is its own or its partner's, the partner's on a 1 - lam share
            assert from_partner.float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
        else:
            kinds.add("mixup")
            assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert kinds == ({"mixup"} if not cutmix else {"cutmix"} if not mixup else {"mixup", "cutmix"})


def test_mixup_mixes_every_chunk_by_cutmix_half_the_time_with_each_flags_alpha_and_smoothing():
    """make_mixup sets timm's Mixup as the MAE recipe does: every chunk is mixed (prob 1), by CutMix or by mixup with
    probability 1/2 each (switch_prob 0.5), lam ~ Beta(alpha, alpha) with --cutmix's or --mixup's own alpha, so
    E[lam (1 - lam)] = alpha / (2 (2 alpha + 1)), and the targets smoothed by --label_smoothing (0.2 here, not timm's
    default 0.1). Mixup's mean lies within 4 standard errors of its alpha's (about 500 chunks: 0.0040 at alpha 0.5),
    so that the recipe's 0.8 (0.154) would be caught. CutMix's lam is corrected to the area its box keeps inside the
    image, which lowers the mean (0.198 measured against the formula's 0.214 at alpha 3): it gets the old margin."""
    args = parse(["--mixup", "0.5", "--cutmix", "3.0", "--label_smoothing", "0.2"])
    train_classifier.resolve_recipe(args)
    mix = train_classifier.make_mixup(args, num_classes=10)
    labels = torch.tensor([0, 1])
    off, on = 0.2 / 10, 1 - 0.2 + 0.2 / 10
    smooth = torch.full((2, 10), off).scatter_(1, labels[:, None], on)
    spread = {"mixup": [], "cutmix": []}  # lam (1 - lam) of each chunk, by how it was mixed
    np.random.seed(0)
    torch.manual_seed(0)
    for _ in range(1000):
        x = torch.rand(2, 3, 32, 32)
        mixed, target = mix(x.clone(), labels)
        lam = ((target[0, 0] - off) / (on - off)).item()
        assert torch.allclose(target, lam * smooth + (1 - lam) * smooth.flip(0), atol=1e-6)
        assert lam < 1 - 1e-6  # mixed (prob 1): never the own image alone
        if ((mixed == x) | (mixed == x.flip(0))).all():  # every pixel its own or the partner's
            assert (mixed == x.flip(0)).float().mean().item() == pytest.approx(1 - lam, abs=1e-6)
            spread["cutmix"].append(lam * (1 - lam))
        else:
            assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
            spread["mixup"].append(lam * (1 - lam))
    assert abs(len(spread["cutmix"]) - 500) < 64  # 4 standard deviations of a binomial count
    assert np.mean(spread["mixup"]) == pytest.approx(0.5 / (2 * 2.0), abs=4 * 0.0040)  # 0.8 would give 0.154
    assert np.mean(spread["cutmix"]) == pytest.approx(3.0 / (2 * 7.0), abs=0.03)
    # timm's Mixup holds each flag's value where its draws read it.
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.mix_prob, mix.switch_prob, mix.label_smoothing) == (
        0.5, 3.0, 1.0, 0.5, 0.2)


def test_make_optimizer_decays_the_lr_by_layer_for_a_pretrained_encoder_only():
    """make_optimizer: AdamW at the peak lr with betas (0.9, 0.999), each parameter at lr scale
    layer_decay ** (depth + 1 - layer) (layer 0 the patch embedding and class token, i + 1 block i, depth + 1 the
    final norm and head): the recipe's 0.75 for a pretrained encoder, 1 for every parameter from scratch."""
    depth = 3
    for argv, decay in (([], 1.0), (["--pretrained_model_path", "mae.pt"], 0.75)):
        args = parse(argv + ["--batch_size", "64"])
        train_classifier.resolve_recipe(args)
        model = ViTClassifier(MAEConfig(embed_dim=32, depth=depth, num_heads=2, patch_size=4), num_classes=10)
        optimizer = train_classifier.make_optimizer(model, args, torch.device("cpu"))
        group = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        assert len(group) == len(list(model.parameters()))
        for name, p in model.named_parameters():
            if name.startswith(("encoder.patch_embed", "encoder.cls_token")):
                layer = 0
            elif name.startswith("encoder.blocks."):
                layer = int(name.split(".")[2]) + 1
            else:
                layer = depth + 1
            assert group[id(p)]["lr_scale"] == pytest.approx(decay ** (depth + 1 - layer)), (argv, name)
            assert group[id(p)]["lr"] == pytest.approx(1e-3 * 64 / 256) and group[id(p)]["betas"] == (0.9, 0.999)


def test_layer_decay_gives_each_block_its_lr_scale():
    depth, decay = 3, 0.75
    model = ViTClassifier(MAEConfig(embed_dim=32, depth=depth, num_heads=2, patch_size=4), num_classes=10)
    groups = utils.layer_decay_groups(model, weight_decay=0.05, layer_decay=decay, num_blocks=depth)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    utils.set_lr(optimizer, 2e-3)
    where = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        if name.startswith(("encoder.patch_embed", "encoder.cls_token")):
            layer = 0
        elif name.startswith("encoder.blocks."):
            layer = int(name.split(".")[2]) + 1
        else:  # encoder.norm, head
            layer = depth + 1
        group = where[id(p)]
        assert group["lr"] == pytest.approx(2e-3 * decay ** (depth + 1 - layer)), name
        assert group["weight_decay"] == (0.0 if p.ndim == 1 or name.endswith("cls_token") else 0.05), name
    assert where[id(model.encoder.blocks[0].attn.qkv.weight)]["lr"] == pytest.approx(2e-3 * 0.75 ** 3)
    assert where[id(model.head.weight)]["lr"] == pytest.approx(2e-3)
    assert len(groups) == 2 * (depth + 2)  # a group per layer id and decay: each lr scale differs

    # layer_decay 1: one lr scale, so only the weight decay splits the parameters, as weight_decay_groups does.
    groups = utils.layer_decay_groups(model, 0.05, 1.0, depth)
    assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.0, 1.0), (0.05, 1.0)]
    plain = utils.weight_decay_groups(model, 0.05)
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in plain[0]["params"]}
    assert {id(p) for p in groups[0]["params"]} == {id(p) for p in plain[1]["params"]}

    model.encoder.requires_grad_(False)  # the probe: frozen parameters are left out
    groups = utils.layer_decay_groups(model, 0.05, decay, depth)
    assert sum(len(g["params"]) for g in groups) == 2


def test_a_prediction_grids_long_class_names_stay_over_their_own_image():
    """CIFAR-100's names ("✗ computer_keyboard (true: lawn_mower)") ran into the next image's title: a title wider
    than its column puts the true class on a second line, and a name too wide on its own (a folder's) is set
    smaller, so that no two titles overlap; the rows grow, so that the images keep their size. Short titles stay on
    one line."""
    names = ["computer_keyboard", "lawn_mower", "cat", "dog", "an_unusually_long_class_name_from_a_folder"]
    images = torch.full((8, 3, 32, 32), 0.5)
    fig = utils.prediction_grid(images, [0, 1, 2, 3, 1, 0, 4, 2], [1, 1, 2, 3, 0, 0, 4, 3], names,
                                title="pretrained, epoch 50")
    renderer = fig.canvas.get_renderer()
    titled = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in titled] == [
        "✗ computer_keyboard\n(true: lawn_mower)", "✓ lawn_mower", "✓ cat", "✓ dog",
        "✗ lawn_mower\n(true: computer_keyboard)", "✓ computer_keyboard",
        "✓ an_unusually_long_class_name_from_a_folder", "✗ cat (true: dog)"]
    boxes = [ax.title.get_window_extent(renderer) for ax in titled]
    for i, box in enumerate(boxes):
        assert fig.bbox.x0 <= box.x0 and box.x1 <= fig.bbox.x1, titled[i].get_title()
        assert not any(box.overlaps(other) for other in boxes[i + 1:]), titled[i].get_title()
        # each title over its own image, above it
        image = titled[i].get_window_extent(renderer)
        assert image.x0 - 10 <= box.x0 and box.x1 <= image.x1 + 10 and box.y0 >= image.y1 - 1, titled[i].get_title()
    assert titled[6].title.get_fontsize() < titled[5].title.get_fontsize() == 8
    # The images are as large as in a grid of short titles.
    short = utils.prediction_grid(images, [0, 1, 2, 3, 1, 0, 3, 2], [1, 1, 2, 3, 0, 0, 2, 3],
                                  ["cat", "dog", "fox", "owl"])
    sizes = [[ax.get_window_extent(f.canvas.get_renderer()).height for ax in f.axes] for f in (fig, short)]
    assert sizes[0] == pytest.approx(sizes[1], rel=0.03)


def test_prediction_grid_marks_each_image_right_or_wrong_in_colour_and_in_its_text(tmp_path):
    """Right and wrong differ in a sign a greyscale print keeps (✓, ✗, the true class), not only in colour (the
    red and green of before were the same grey), and the title counts them among the images shown."""
    images = torch.full((3, 3, 32, 32), 0.5)
    fig = utils.prediction_grid(images, [0, 0, 1], [0, 1, 1], ["cat", "dog"], title="scratch, epoch 2")
    titles = [(ax.get_title(), ax.title.get_color()) for ax in fig.axes if ax.get_title()]
    assert titles == [("✓ cat", utils.RIGHT_COLOUR), ("✗ cat (true: dog)", utils.WRONG_COLOUR),
                      ("✓ dog", utils.RIGHT_COLOUR)]
    assert fig._suptitle.get_text() == "scratch, epoch 2\n2 of these 3 predicted right (✓), 1 wrong (✗)"

    def colour_pixels(predicted):  # the file shows those colours: the one that was right, the other that was wrong
        path = str(tmp_path / "grid.png")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a glyph the font lacks is a warning, and a box in the figure
            utils.save_prediction_grid(path, images[:2], predicted, [0, 1], ["cat", "dog"])
        rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
        return [(np.abs(rgb - np.array(Image.new("RGB", (1, 1), colour).getpixel((0, 0)))).sum(-1) < 40).sum()
                for colour in (utils.RIGHT_COLOUR, utils.WRONG_COLOUR)]

    right, wrong = colour_pixels([0, 1])
    assert right > 20 and wrong == 0
    right, wrong = colour_pixels([1, 1])
    assert right > 20 and wrong > 20
    right, wrong = colour_pixels([1, 0])
    assert right == 0 and wrong > 20


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line, status 2, nothing written

def _make_bad_checkpoints(tmp_path, mae_ckpt):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "text.pt").write_bytes(b"this is not a checkpoint")
    np.save(folder / "array.npy", np.zeros(3))
    (folder / "truncated.pt").write_bytes(open(mae_ckpt, "rb").read()[:4096])  # a zip cut short
    torch.save({"model": {}}, folder / "no_config.pt")
    good = torch.load(mae_ckpt, weights_only=True)
    cfg = MAEConfig(**good["config"])
    torch.save({"model": ViTClassifier(cfg, 10).state_dict(), "config": good["config"]}, folder / "classifier.pt")
    torch.save({**good, "config": {**good["config"], "embed_dim": 64}}, folder / "other_size.pt")
    torch.save({**good, "config": {**good["config"], "patch_size": 0}}, folder / "zero_patch.pt")
    # a hand-edited config: torch's error at the model's build runs to a dozen lines, C++ frames included
    torch.save({**good, "config": {**good["config"], "mlp_ratio": "4"}}, folder / "text_mlp_ratio.pt")
    for name, ratio in (("huge_mlp_ratio", 1e308), ("negative_mlp_ratio", -1.0)):  # OverflowError, RuntimeError
        torch.save({**good, "config": {**good["config"], "mlp_ratio": ratio}}, folder / f"{name}.pt")
    torch.save({**good, "model": {**good["model"], 5: torch.zeros(1)}}, folder / "int_key.pt")
    nan = good["model"]["encoder.cls_token"].clone()
    nan[0, 0, 3] = math.nan
    torch.save({**good, "model": {**good["model"], "encoder.cls_token": nan}}, folder / "nan_weight.pt")
    (folder / "a_folder.pt").mkdir()
    (folder / "blocked_last.pt").mkdir()  # where --output_model_path blocked.pt would put its last epoch
    shutil.copyfile(mae_ckpt, folder / "pre_last.pt")  # an MAE checkpoint named as --output_model_path pre.pt's last
    return folder


def test_the_mixing_alphas_allowed_draw_what_a_beta_distribution_does_where_smaller_and_larger_ones_do_not():
    """numpy's Beta draw (timm's Mixup takes its lambda from it) is NaN now and then at an alpha near the smallest
    normal float, which the check used to allow, and always 0 (no mixing) at one near the largest. At the bounds
    check_args sets, a million draws are 0 or 1 at the low one (as Beta(a, a) is as a -> 0) and 0.5 at the high
    one (as it is as a -> inf)."""
    rng, low, high = np.random.RandomState(0), 1 / train_classifier.MAX_MIX_ALPHA, train_classifier.MAX_MIX_ALPHA
    assert np.isnan(rng.beta(2.3e-308, 2.3e-308, size=1_000_000)).any()
    assert set(np.unique(rng.beta(1e308, 1e308, size=1000))) == {0.0}
    draws = rng.beta(low, low, size=1_000_000)
    assert set(np.unique(draws)) == {0.0, 1.0} and 0.49 < draws.mean() < 0.51
    assert set(np.unique(rng.beta(high, high, size=1000))) == {0.5}


@pytest.mark.parametrize("bad_flags, expected", [
    (["--batch_size", "30", "--max_device_batch_size", "16"], "--batch_size 30 is not divisible"),
    (["--batch_size", "30", "--max_device_batch_size", "15"], "--max_device_batch_size 15 gives chunks of 15 "
                                                              "images, which must be even with --mixup/--cutmix"),
    (["--batch_size", "15", "--max_device_batch_size", "16"], "--batch_size 15 gives chunks of 15 images"),
    (["--pretrained_model_path", "/nonexistent/mae.pt"], "no such file"),
    (["--pretrained_model_path", "{ckpts}/a_folder.pt"], "a_folder.pt' is a folder, not a file"),
    # a damaged file: it trained into a NaN loss whose message blamed the learning rate
    (["--pretrained_model_path", "{ckpts}/nan_weight.pt"], "nan_weight.pt': its weights hold NaN or infinite values "
                                                           "(encoder.cls_token): a damaged file"),
    (["--pretrained_model_path", "{ckpts}/text.pt"], "not a torch checkpoint (torch.save writes a zip archive; "
                                                     "this file starts b'this')"),
    (["--pretrained_model_path", "{ckpts}/array.npy"], "not a torch checkpoint"),
    (["--pretrained_model_path", "{ckpts}/truncated.pt"], "not a readable checkpoint"),
    (["--pretrained_model_path", "{ckpts}/no_config.pt"], "missing config"),
    (["--pretrained_model_path", "{ckpts}/classifier.pt"], "classifier.pt' holds a classifier (a head, no decoder): a "
                                                           "train_classifier.py checkpoint; pass the mae_pretrain.py"),
    (["--pretrained_model_path", "{ckpts}/other_size.pt"], "not an MAE checkpoint of its config (size mismatch for"),
    (["--pretrained_model_path", "{ckpts}/zero_patch.pt"], "its config is not an MAEConfig (sizes must be >= 1, got "
                                                            "patch_size 0)"),
    (["--pretrained_model_path", "{mae}", "--embed_dim", "64"], "--embed_dim 64 does not match"),
    (["--label_smoothing", "1.0"], "--label_smoothing must be in [0, 1)"),
    (["--recipe", "plain", "--min_lr", "1e-5"], "--min_lr 1e-05 is for --schedule warmup_cosine; the reference "
                                                 "schedule (the plain recipe's) ends at 0"),
    (["--schedule", "reference", "--min_lr", "1e-5"], "--min_lr 1e-05 is for --schedule warmup_cosine"),
    (["--embed_dim", "400000"], "parameters need"),  # terabytes: more than any machine's memory
    # Attention is tried at the model's shapes on the device: only after the size check, which allocates nothing
    # (at this width one head's 65 queries alone are 26 GB, more than the test machine's memory).
    (["--embed_dim", "100000000", "--num_heads", "1"], "parameters need"),
    (["--embed_dim", str(2 ** 40), "--num_heads", "1"], "no such model can be built (Storage size calculation "
                                                         "overflowed"),
    (["--pretrained_model_path", "{ckpts}/text_mlp_ratio.pt"], "its config is not an MAEConfig"),
    (["--pretrained_model_path", "{ckpts}/huge_mlp_ratio.pt"], "its config is not an MAEConfig"),
    (["--pretrained_model_path", "{ckpts}/negative_mlp_ratio.pt"], "its config is not an MAEConfig"),
    (["--pretrained_model_path", "{ckpts}/int_key.pt"], "entries that are not a name with a real tensor of values: 5"),
    (["--embed_dim", str(2 ** 64), "--num_heads", "1"], "no such model can be built"),  # a size past int64
    (["--layer_decay", "0"], "--layer_decay must be in (0, 1]"),
    (["--crop_padding", "32"], "--crop_padding must be in [0, 32)"),
    (["--linear_probe", "--drop_path", "0.1"], "--drop_path and --layer_decay do not apply"),
    (["--run_name", "a/b"], "--run_name"),
    (["--recipe", "fancy"], "--recipe"),
    (["--total_epoch", "0"], "--total_epoch"),
    (["--mixup", "inf"], "argument --mixup: must be a finite number, got 'inf'"),
    (["--pretrained_model_path", ""], "--pretrained_model_path must name a file"),
    (["--pretrained_model_path", "{mae}", "--output_model_path", "{mae}"], "would overwrite --pretrained_model_path"),
    # ... nor its last epoch's checkpoint, <stem>_last.pt, which the run writes beside --output_model_path
    (["--pretrained_model_path", "{ckpts}/pre_last.pt", "--output_model_path", "{ckpts}/pre.pt"],
     "would overwrite --pretrained_model_path"),
    (["--output_model_path", "{ckpts}/cls.json"], "--output_model_path must name a .pt or .pth file"),
    (["--output_dir", "{ckpts}/text.pt"], "is a file, not a folder"),
    (["--device", "meta"], "--device must be cuda, cuda:N or cpu"),
    (["--attention", "cudnn"], "--attention cudnn cannot run on cpu"),  # a CUDA kernel
    (["--capture_step"], "--capture_step captures CUDA graphs: it needs a CUDA device, not cpu"),
    (["--output_model_path", "{ckpts}/blocked.pt"], "blocked_last.pt' is a folder, not a file"),
    # the run makes its folders before training: the checkpoints, saved after an epoch, would find a folder there
    (["--output_model_path", "{ckpts}/c.pt", "--output_dir", "{ckpts}/c_last.pt"],
     "/c_last.pt' is also --output_dir, the folder its figures and logs go to: choose another name for one"),
    (["--output_model_path", "{ckpts}/c.pt", "--log_dir", "{ckpts}/c.pt"], "c.pt' is also --log_dir"),
    (["--linear_probe", "--pretrained_model_path", "{mae}", "--max_device_batch_size", "1"],
     "--max_device_batch_size 1 gives chunks of 1 image: the linear probe's BatchNorm needs at least 2"),
    # CutMix alone mixes too (the plain recipe has neither, the finetune recipe both).
    (["--recipe", "plain", "--cutmix", "1", "--batch_size", "30", "--max_device_batch_size", "15"],
     "--max_device_batch_size 15 gives chunks of 15 images, which must be even with --mixup/--cutmix"),
    (["--mixup", "-0.1"], "--mixup must be 0 (off) or in [1e-300, 1e+300], got -0.1"),
    (["--cutmix", "-1"], "--cutmix must be 0 (off) or in [1e-300, 1e+300], got -1.0"),
    (["--mixup", "2.3e-308"], "--mixup must be 0 (off) or in [1e-300, 1e+300], got 2.3e-308"),  # NaN draws at times
    (["--cutmix", "1e308"], "--cutmix must be 0 (off) or in [1e-300, 1e+300], got 1e+308"),  # no mixing, silently
    (["--drop_path", "1.0"], "--drop_path must be in [0, 1), got 1.0"),  # every residual branch dropped
    (["--random_erase", "1.5"], "--random_erase must be in [0, 1], got 1.5"),
    (["--crop_padding", "-1"], "--crop_padding must be >= 0, got -1"),
    (["--log_interval", "0"], "--log_interval must be >= 1, got 0"),
    (["--total_epoch", "1" * 400], "--total_epoch must be at most 1,000,000,000, got 111"),
    (["--run_name", ".."], "--run_name must be a plain file-name prefix, got '..'"),
    # its longest output name, <run>_preds_epoch_<total_epoch>.png, longer than the file system allows (255 bytes on
    # most): found when its first file was saved
    (["--run_name", "r" * 300], "--run_name: the file name '" + "r" * 24 + "'... is 318 bytes, longer than the"),
    (["--linear_probe", "--pretrained_model_path", "{mae}", "--layer_decay", "0.8"],
     "--drop_path and --layer_decay do not apply with --linear_probe"),
    # The decoder flags build nothing here, but given with a checkpoint they must be its MAE's too.
    (["--pretrained_model_path", "{mae}", "--decoder_depth", "3"], "--decoder_depth 3 does not match "
                                                                    "--pretrained_model_path's 1"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, mae_ckpt, capsys, bad_flags, expected):
    ckpts = _make_bad_checkpoints(tmp_path, mae_ckpt)
    before = {p: p.read_bytes() for p in ckpts.iterdir() if p.is_file()}
    flags = [f.format(ckpts=ckpts, mae=mae_ckpt) for f in bad_flags]
    with pytest.raises(SystemExit) as exc:
        run_cls(cls_argv(tmp_path, *flags))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "run").exists()  # nothing was created
    assert {p: p.read_bytes() for p in ckpts.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("extra", [[], ["--linear_probe"]])  # the probe's features are computed before the loop
def test_attention_flag_sets_the_kernel_of_the_whole_run(tmp_path, mae_ckpt, extra):
    """--attention math: every attention of the run (training, validation, the probe's precomputed features, the
    prediction grids) is the math kernel, none the CPU flash kernel torch picks by itself."""
    with torch.profiler.profile() as prof:
        run_cls(cls_argv(tmp_path, "--pretrained_model_path", str(mae_ckpt), "--attention", "math", *extra,
                         epochs=1))
    names = {event.key for event in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" in names
    assert not any("flash" in name for name in names), sorted(n for n in names if "flash" in n)


def test_command_line_error_has_no_traceback(tmp_path):
    argv = cls_argv(tmp_path, "--pretrained_model_path", str(tmp_path / "missing.pt"))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_classifier.py"), *argv],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"train_classifier.py: error: --pretrained_model_path '{tmp_path / 'missing.pt'}': no such file"]
    assert proc.stdout == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("scope", ["model", "blocks"])
@pytest.mark.parametrize("extra", [["--recipe", "finetune"], ["--recipe", "plain", "--linear_probe", "--hflip"]])
def test_compiled_run_is_one_graph_with_no_recompilation(tmp_path, mae_ckpt, compile_counter, extra, scope):
    # Two graphs: the model, and the augmentation (train_classifier.augmentation). 96 fake images hold out 24 for
    # validation: a partial last val chunk of 8, and evaluation under no_grad. Neither may compile another graph,
    # and mixup, drop path, the augmentation's random draws or the frozen encoder of an augmented probe may not
    # break one. With --compile_scope blocks the blocks share one graph, whatever their drop-path rates, and the
    # last, which computes the class token's output alone (model.Block's `queries`), has one of its own.
    argv = cls_argv(tmp_path, "--compile", "--compile_scope", scope, "--pretrained_model_path", mae_ckpt, *extra)
    argv[argv.index("--fake_size") + 1] = "96"
    train_classifier.main(parse(argv))
    model_graphs = 1 if scope == "model" else 2
    assert compile_counter.frame_count == 1 + model_graphs
    # one of them train_classifier.augment's (its input: the uint8 chunk), the others the model's
    augment_graph = ["images_u8" in " ".join(names) for names in compile_counter.graph_inputs]
    assert sorted(augment_graph) == [False] * model_graphs + [True], compile_counter.graph_inputs
    assert compile_counter.op_count > 0


def test_compiled_augmentation_gives_eager_views_at_the_same_seed():
    # train_classifier.augmentation draws the random numbers eagerly and compiles the rest (inductor's C++ kernels,
    # about 10 s), so a seed gives the same views compiled or not: the graph holds no random op whose numbers
    # would depend on inductor. Measured on 2026-11-28: largest difference 2.4e-7.
    args = parse(["--pretrained_model_path", "(unused)"])
    train_classifier.resolve_recipe(args)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    torch._dynamo.reset()  # no cache of an earlier test's compilations, full or not
    views = []
    for compiled in (True, False):
        torch.manual_seed(0)
        views.append(train_classifier.augmentation(args, compiled)(images))
    assert (views[0] - data.normalize(images)).abs().mean() > 0.1  # augmented, not just normalised
    assert not torch.equal(views[0], views[1])  # inductor's kernels, not eager's, ran
    torch.testing.assert_close(views[0], views[1], rtol=0, atol=1e-6)


def test_bf16_fine_tuning_curve_stays_within_bf16_tolerance_of_fp32(tmp_path, mae_ckpt):
    # The fast path of fine-tuning as the GPU runs it (bf16 autocast; bf16 compiled by inductor's C++ backend,
    # about 30 s of compilation), on the full finetune recipe from the MAE encoder: augmentation, mixup/CutMix,
    # label smoothing, drop path, layer decay. The augmentation (compiled too) and the mixing draw their numbers
    # eagerly; inductor's fallback_random makes the compiled drop path draw eager's numbers, so only the arithmetic
    # differs. Measured on 2026-11-28: largest relative gaps 2.6e-5 (bf16) and 2.1e-5 (compiled).
    import torch._inductor.config as inductor_config
    curves = {}
    for name, flags in (("fp32", ["--precision", "fp32"]), ("bf16", ["--precision", "bf16"]),
                        ("bf16_compiled", ["--precision", "bf16", "--compile"])):
        argv = cls_argv(tmp_path, "--pretrained_model_path", mae_ckpt, "--base_learning_rate", "1e-2", *flags,
                        name=name, epochs=6)
        with inductor_config.patch(fallback_random=True):
            run_cls(argv)
        curves[name] = np.load(tmp_path / name / "cls_outputs" / "pretrained_train_loss.npy")
    fp32, bf16, compiled = curves["fp32"], curves["bf16"], curves["bf16_compiled"]
    # The model learns (slowly: mixup and smoothing on 128 images), so the curve is a trajectory, its change
    # many times the tolerance, and not one number.
    assert fp32[-1] < 0.99 * fp32[0]
    assert not np.array_equal(fp32, bf16)  # autocast did run in bf16
    assert not np.array_equal(bf16, compiled)  # inductor's kernels, not eager's, ran
    np.testing.assert_allclose(bf16, fp32, rtol=2 ** -10)
    np.testing.assert_allclose(compiled, fp32, rtol=2 ** -10)
    for name in curves:  # bf16 has fp32's range: no loss scaling, so an empty grad-scaler state (fp16 alone has one)
        assert torch.load(tmp_path / name / "cls_last.pt", map_location="cpu", weights_only=True)["scaler"] == {}
