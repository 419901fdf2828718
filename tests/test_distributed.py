"""torchrun (DistributedDataParallel over gloo on the CPU): sharding, outputs, resume across world sizes,
failures.

Run: python -m pytest -q tests/test_distributed.py
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_pretrain_argv

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TIMEOUT = 300  # generous for a loaded 2-core machine; a hang would exceed it and fail the test


def run(cmd, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=TIMEOUT)


def pretrain_cmd(launcher, tmp_path, *extra, name):
    return [*launcher, os.path.join(ROOT, "mae_pretrain.py"),
            *tiny_pretrain_argv(tmp_path, "--eval_every", "1", *extra, name=name)]


def test_two_processes_match_one_process_and_write_one_set_of_outputs(tmp_path):
    single = run(pretrain_cmd([sys.executable], tmp_path, name="single"), tmp_path)
    assert single.returncode == 0, single.stderr[-2000:]
    double = run(pretrain_cmd(TORCHRUN, tmp_path, name="double"), tmp_path)
    assert double.returncode == 0, double.stderr[-2000:]

    # Same global batch, same seed, same per-image masks: only the order of floating-point sums differs
    # (two half-batch gradients averaged by all-reduce vs two accumulated chunks), hence a tolerance.
    for name in ("losses", "knn_acc", "val_loss", "val_psnr"):
        one = np.load(tmp_path / "single" / "outputs" / f"{name}.npy")
        two = np.load(tmp_path / "double" / "outputs" / f"{name}.npy")
        assert two == pytest.approx(one, rel=1e-4), name

    # Exactly one writer: one event file, one line per epoch, one summary line per epoch on stdout.
    assert len(os.listdir(tmp_path / "double" / "logs")) == 1
    assert len(open(tmp_path / "double" / "outputs" / "log.jsonl").readlines()) == 2
    assert double.stdout.count("epoch   2/2 |") == 1
    assert "x 2 process(es)" in double.stdout


def test_resume_on_another_number_of_processes(tmp_path):
    straight = run(pretrain_cmd([sys.executable], tmp_path, name="straight"), tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]
    first = run(pretrain_cmd(TORCHRUN, tmp_path, "--stop_after", "1", name="split"), tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = str(tmp_path / "split" / "mae.pt")
    second = run(pretrain_cmd([sys.executable], tmp_path, "--resume", ckpt, name="split"), tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = np.load(tmp_path / "split" / "outputs" / "losses.npy")
    assert resumed == pytest.approx(np.load(tmp_path / "straight" / "outputs" / "losses.npy"), rel=1e-4)


def test_world_size_that_does_not_divide_the_batch_fails_on_every_rank(tmp_path):
    proc = run(pretrain_cmd(TORCHRUN, tmp_path, "--batch_size", "31", "--max_device_batch_size", "31",
                            name="bad"), tmp_path)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "error: --batch_size 31" in line]
    assert len(lines) == 2 and all("not divisible by the 2 processes" in line for line in lines)
    # torchrun reports the failed children with a traceback of its own; none comes from our script.
    assert 'mae_pretrain.py", line' not in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_a_failing_rank_ends_the_whole_run(tmp_path):
    argv = tiny_pretrain_argv(tmp_path, "--total_epoch", "3", name="crash")
    proc = run([*TORCHRUN, os.path.join(ROOT, "tests", "helpers", "crash_one_rank.py"), *argv], tmp_path)
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    # Rank 0 was stopped by torchrun, not left waiting in a collective. Epoch 1's outputs are written in the
    # background and may or may not have landed before the stop; nothing beyond epoch 1 can exist.
    losses = tmp_path / "crash" / "outputs" / "losses.npy"
    assert not losses.exists() or len(np.load(losses)) == 1
    assert not (tmp_path / "crash" / "outputs" / "recon_epoch_002.png").exists()
