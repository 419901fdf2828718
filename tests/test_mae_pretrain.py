"""End-to-end tests of mae_pretrain.py on tiny CPU runs: outputs, resume, real images, bad input.

Run: python -m pytest -q tests/test_mae_pretrain.py
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import FIXTURE_DIR, ROOT, TINY_MODEL, tiny_pretrain_argv


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
    assert json.load(open(out / "args.json"))["total_epoch"] == 2

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
    assert np.load(out / "eval_epochs.npy").tolist() == [2]
    for name in ("knn_acc", "val_loss", "val_psnr"):
        values = np.load(out / f"{name}.npy")
        assert values.shape == (1,) and np.isfinite(values).all()
        assert "knn_acc" not in records[0] and records[1][name] == pytest.approx(values[0])
        assert [(e.step, e.value) for e in events.Scalars(name)] == [(2, pytest.approx(values[0], rel=1e-6))]
        assert ckpt["evals"][0][name] == pytest.approx(values[0])
    assert 0.0 <= np.load(out / "knn_acc.npy")[0] <= 1.0


def test_resume_continues_the_same_run(tmp_path, run_pretrain):
    run_pretrain(tiny_pretrain_argv(tmp_path, "--eval_every", "1", name="straight"))
    split = tiny_pretrain_argv(tmp_path, "--eval_every", "1", name="split")
    run_pretrain(split + ["--stop_after", "1"])
    assert len(np.load(tmp_path / "split" / "outputs" / "losses.npy")) == 1
    run_pretrain(split + ["--resume", str(tmp_path / "split" / "mae.pt")])

    straight = np.load(tmp_path / "straight" / "outputs" / "losses.npy")
    resumed = np.load(tmp_path / "split" / "outputs" / "losses.npy")
    assert len(resumed) == 2
    assert resumed == pytest.approx(straight, rel=1e-5)
    records = [json.loads(line) for line in open(tmp_path / "split" / "outputs" / "log.jsonl")]
    assert [r["epoch"] for r in records] == [1, 2]
    for name in ("eval_epochs", "knn_acc", "val_loss", "val_psnr"):
        resumed_metric = np.load(tmp_path / "split" / "outputs" / f"{name}.npy")
        assert resumed_metric == pytest.approx(np.load(tmp_path / "straight" / "outputs" / f"{name}.npy"), rel=1e-5)
    assert np.load(tmp_path / "split" / "outputs" / "eval_epochs.npy").tolist() == [1, 2]
    a = torch.load(tmp_path / "straight" / "mae.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "split" / "mae.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


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


def test_validation_metrics_use_fixed_masks(tmp_path):
    import data
    import mae_pretrain
    from model import MAE, MAEConfig
    args = mae_pretrain.get_args_parser().parse_args(tiny_pretrain_argv(tmp_path))
    train, val = data.load_data(args)
    model = MAE(MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                          decoder_num_heads=2))
    val_noise = torch.rand(len(val), 64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    first = mae_pretrain.evaluate(model, train, val, val_noise, args, None)
    torch.manual_seed(123)  # the global RNG must not matter
    second = mae_pretrain.evaluate(model, train, val, val_noise, args, None)
    assert first == second
    # The val loss is the model's own masked loss over the val split, batch-weighted.
    with torch.no_grad():
        direct = model(data.normalize(val.images), noise=val_noise)[0].item()
    assert first["val_loss"] == pytest.approx(direct, rel=1e-5)
    # PSNR of masked pixels in [0, 1] units: the [-1, 1] loss is 4x the [0, 1] MSE (predictions unclamped).
    assert first["val_psnr"] >= 10 * np.log10(4 / direct) - 1e-3


@pytest.mark.parametrize("bad_flags, expected", [
    (["--batch_size", "30", "--max_device_batch_size", "16"], "--batch_size 30 is not divisible"),
    (["--mask_ratio", "1.0"], "--mask_ratio must be in [0, 1)"),
    (["--mask_ratio", "-0.5"], "--mask_ratio must be in [0, 1)"),
    (["--dataset", "folder", "--data_path", "/nonexistent/cifar"], "--data_path"),
    (["--resume", "/nonexistent/ckpt.pt"], "--resume"),
    (["--total_epoch", "0"], "--total_epoch"),
    (["--dataset", "imagenet"], "--dataset"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, run_pretrain, capsys, bad_flags, expected):
    argv = tiny_pretrain_argv(tmp_path, *bad_flags)
    with pytest.raises(SystemExit) as exc:
        run_pretrain(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "run").exists()  # nothing was created


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
    assert len(err.splitlines()) == 1 and "not a readable checkpoint" in err
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(os.listdir(run_dir / "outputs")) == ["losses.npy"]

    # A real torch file that is not one of our checkpoints is refused too.
    torch.save({"weights": torch.zeros(3)}, bogus)
    with pytest.raises(SystemExit):
        run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(bogus)))
    assert "not a checkpoint of this project" in capsys.readouterr().err


def test_resume_with_a_different_schedule_is_refused(tmp_path, run_pretrain, capsys):
    argv = tiny_pretrain_argv(tmp_path, "--stop_after", "1")
    run_pretrain(argv)
    ckpt = tmp_path / "run" / "mae.pt"
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit) as exc:
        run_pretrain(tiny_pretrain_argv(tmp_path, "--resume", str(ckpt), "--batch_size", "64"))
    assert exc.value.code == 2
    assert "--batch_size" in capsys.readouterr().err
    assert ckpt.read_bytes() == before


def test_command_line_error_has_no_traceback(tmp_path):
    argv = tiny_pretrain_argv(tmp_path, "--batch_size", "30", "--max_device_batch_size", "16")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mae_pretrain.py"), *argv],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mae_pretrain.py: error: --batch_size 30 is not divisible by --max_device_batch_size 16"]
    assert proc.stdout == ""


@pytest.mark.parametrize("scope, graphs", [("model", 1), ("blocks", 2)])
def test_compiled_run_has_one_graph_per_program_and_no_recompilation(tmp_path, run_pretrain, compile_counter,
                                                                     scope, graphs):
    # Accumulation (two chunks per step), augmentation, the per-epoch evaluation and reconstruction figure,
    # two epochs: none of it may break a compiled graph or compile another. The whole model is one graph; with
    # --compile_scope blocks the encoder's blocks (17 tokens) share one, the decoder's (65 tokens) another.
    run_pretrain(tiny_pretrain_argv(tmp_path, "--compile", "--compile_scope", scope, "--augment", "--eval_every", "1"))
    assert compile_counter.frame_count == graphs
    assert compile_counter.op_count > 0
