"""torchrun (gloo on the CPU): sharding, one-process results, outputs, resume across world sizes, failures.

Run: python -m pytest -q tests/test_distributed.py
"""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_MODEL, TORCHRUN, tiny_pretrain_argv

TIMEOUT = 300  # generous for a loaded 2-core machine; a hang would exceed it and fail the test


def run(cmd, cwd, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=TIMEOUT)


def run_side_by_side(cwd, *cmds_and_envs):
    """run() each (command, extra environment) at once, each in its own processes: most of a short run is its
    start-up (imports, on one core), which two cores overlap. At most one torchrun among them, so that no two
    launchers look for free ports at the same time. -> their CompletedProcesses, in order."""
    with ThreadPoolExecutor(len(cmds_and_envs)) as pool:
        return list(pool.map(lambda cmd_env: run(cmd_env[0], cwd, cmd_env[1]), cmds_and_envs))


def pretrain_cmd(launcher, tmp_path, *extra, name):
    return [*launcher, os.path.join(ROOT, "mae_pretrain.py"),
            *tiny_pretrain_argv(tmp_path, "--eval_every", "1", *extra, name=name)]


@pytest.fixture(scope="module")
def one_process_pretraining(tmp_path_factory):
    """The one-process pretraining that the torchrun pretrainings are compared with, and whose checkpoint the
    classifier runs start from: the same command for each, so run once for the module. -> its folder (mae.pt,
    outputs/)."""
    tmp_path = tmp_path_factory.mktemp("one_process")
    proc = run(pretrain_cmd([sys.executable], tmp_path, name="single"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / "single"


# The second: each process compiles its model and averages the gradients outside the graphs (the blocks scope,
# which compiles fastest: inductor's C++ backend, about 20 s), against the same eager one-process run.
@pytest.mark.parametrize("double_flags", [[], ["--compile", "--compile_scope", "blocks"]])
def test_two_processes_match_one_process_and_write_one_set_of_outputs(tmp_path, double_flags,
                                                                     one_process_pretraining):
    double = run(pretrain_cmd(TORCHRUN, tmp_path, *double_flags, name="double"), tmp_path)
    assert double.returncode == 0, double.stderr[-2000:]

    # Same global batch, same seed, same per-image masks: only the order of floating-point sums differs
    # (two half-batch gradients averaged by all-reduce vs two accumulated chunks, and compiled kernels), hence a
    # tolerance.
    for name in ("losses", "knn_acc", "val_loss", "val_psnr"):
        one = np.load(one_process_pretraining / "outputs" / f"{name}.npy")
        two = np.load(tmp_path / "double" / "outputs" / f"{name}.npy")
        assert two == pytest.approx(one, rel=1e-4), name

    # Exactly one writer: one event file, one line per epoch, one summary line per epoch on stdout.
    assert len(os.listdir(tmp_path / "double" / "logs")) == 1
    assert len(open(tmp_path / "double" / "outputs" / "log.jsonl").readlines()) == 2
    assert double.stdout.count("epoch   2/2 |") == 1
    assert "x 2 process(es)" in double.stdout


def test_resume_on_another_number_of_processes(tmp_path, one_process_pretraining):
    first = run(pretrain_cmd(TORCHRUN, tmp_path, "--stop_after", "1", name="split"), tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    ckpt = str(tmp_path / "split" / "mae.pt")
    second = run(pretrain_cmd([sys.executable], tmp_path, "--resume", ckpt, name="split"), tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed = np.load(tmp_path / "split" / "outputs" / "losses.npy")
    assert resumed == pytest.approx(np.load(one_process_pretraining / "outputs" / "losses.npy"), rel=1e-4)


def check_world_size_error(script_cmd, module, tmp_path, monkeypatch, capsys):
    """A world size that does not divide --batch_size: under torchrun the run ends non-zero without a hang and
    without writing anything; and each rank, whichever it is, stops by itself with status 2 and one line. The
    per-rank half runs the script's main in this process with torchrun's variables set by hand: the check runs
    before any process group exists, and under torchrun the first rank to fail may get the others killed before
    they print."""
    script = f"{module.__name__}.py"
    bad = ["--batch_size", "31", "--max_device_batch_size", "31"]
    proc = run(script_cmd(TORCHRUN, tmp_path, *bad, name="bad"), tmp_path)
    assert proc.returncode != 0
    assert "not divisible by the 2 processes" in proc.stderr
    # torchrun reports the failed children with a traceback of its own; none comes from our script.
    assert f'{script}", line' not in proc.stderr
    argv = script_cmd([], tmp_path, *bad, name="bad")[1:]  # the flags, after the script's path
    monkeypatch.setattr(sys, "argv", [os.path.join(ROOT, script)])  # the error names the script, as it would
    for rank in ("0", "1"):
        for name in ("RANK", "LOCAL_RANK"):
            monkeypatch.setenv(name, rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(SystemExit) as exc:
            module.main(module.get_args_parser().parse_args(argv))
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"{script}: error: --batch_size 31 is not divisible by the 2 processes of this run "
            "(torchrun --nproc_per_node x --nnodes)"]
    assert not (tmp_path / "bad").exists()


def test_world_size_that_does_not_divide_the_batch_fails_on_every_rank(tmp_path, monkeypatch, capsys):
    import mae_pretrain
    check_world_size_error(pretrain_cmd, mae_pretrain, tmp_path, monkeypatch, capsys)


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


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    """tests/helpers/collectives.py run once under torchrun for the two tests below (a launch is most of their
    time): -> the folder of its rank<N>.txt and rank<N>.pt."""
    tmp_path = tmp_path_factory.mktemp("collectives")
    proc = run([*TORCHRUN, os.path.join(ROOT, "tests", "helpers", "collectives.py")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path


def test_a_start_up_decision_holds_only_if_it_holds_on_every_process(collectives):
    # utils.data_device's --data_on auto: one process short of GPU memory puts every process's data in host memory.
    assert [(collectives / f"rank{rank}.txt").read_text() for rank in (0, 1)] == ["False True", "False True"]


def test_processes_start_from_rank_0s_state_and_step_with_the_mean_gradient(collectives):
    # What DistributedDataParallel would guarantee, done by utils.broadcast_state and utils.average_gradients.
    ranks = [torch.load(collectives / f"rank{rank}.pt") for rank in (0, 1)]
    assert not torch.equal(ranks[0]["built"]["0.weight"], ranks[1]["built"]["0.weight"])  # different seeds
    for r in ranks:
        for name, tensor in ranks[0]["built"].items():
            assert torch.equal(r["state"][name], tensor), name  # parameters and buffers: rank 0's
    assert ranks[0]["in_place"] and ranks[1]["in_place"]
    for own0, own1, avg0, avg1 in zip(ranks[0]["own"], ranks[1]["own"], ranks[0]["averaged"], ranks[1]["averaged"]):
        assert torch.equal(avg0, avg1)
        torch.testing.assert_close(avg0, (own0 + own1) / 2)


def classifier_cmd(launcher, tmp_path, *extra, name):
    out = tmp_path / name
    return [*launcher, os.path.join(ROOT, "train_classifier.py"), "--dataset", "fake", "--fake_size", "128",
            "--batch_size", "32", "--max_device_batch_size", "16", "--total_epoch", "2", "--warmup_epoch", "1",
            "--device", "cpu", "--log_interval", "1", "--output_model_path", str(out / "cls.pt"),
            "--output_dir", str(out / "cls_outputs"), "--log_dir", str(out / "logs"), *TINY_MODEL, *extra]


def test_classifier_on_two_processes_matches_one_process(tmp_path):
    # The plain recipe has no random augmentation, so the only difference is the order of floating-point sums.
    single, double = run_side_by_side(
        tmp_path, *((classifier_cmd(launcher, tmp_path, "--recipe", "plain", name=name), None)
                    for launcher, name in (([sys.executable], "single"), (TORCHRUN, "double"))))
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-2000:]
    for name in ("train_loss", "train_acc", "val_loss", "val_acc"):
        one = np.load(tmp_path / "single" / "cls_outputs" / f"scratch_{name}.npy")
        two = np.load(tmp_path / "double" / "cls_outputs" / f"scratch_{name}.npy")
        assert two == pytest.approx(one, rel=1e-4, abs=1e-6), name
    assert np.array_equal(np.load(tmp_path / "double" / "cls_outputs" / "scratch_val_preds.npy"),
                          np.load(tmp_path / "single" / "cls_outputs" / "scratch_val_preds.npy"))
    assert len(os.listdir(tmp_path / "double" / "logs")) == 1
    assert double.stdout.count("epoch   2/2 |") == 1


def test_linear_probe_and_finetune_recipe_run_under_torchrun(tmp_path, one_process_pretraining):
    probe = ["--pretrained_model_path", str(one_process_pretraining / "mae.pt"), "--linear_probe"]
    # The fine-tune records each process's augmentation draws (tests/helpers/classifier_draws.py).
    finetune = classifier_cmd(TORCHRUN, tmp_path, *probe[:2], name="pretrained")
    finetune[len(TORCHRUN)] = os.path.join(ROOT, "tests", "helpers", "classifier_draws.py")
    # The probe's one-process reference beside the same command stopped after epoch 1, which then goes on on two
    # processes (their features computed and their head trained there, their BatchNorm statistics averaged over
    # them, and the checkpoint of another number of processes resumed); then the fine-tune.
    probe_cmd = classifier_cmd([sys.executable], tmp_path, *probe, name="linprobe")
    single, stopped = run_side_by_side(
        tmp_path, (classifier_cmd([sys.executable], tmp_path, *probe, name="linprobe_single"), None),
        ([*probe_cmd, "--stop_after", "1"], None))
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    linprobe = run([*TORCHRUN, *probe_cmd[1:], "--resume", str(tmp_path / "linprobe" / "cls_last.pt")], tmp_path)
    pretrained = run(finetune, tmp_path)
    for proc, run_name in ((linprobe, "linprobe"), (pretrained, "pretrained")):
        assert proc.returncode == 0, proc.stderr[-2000:]
        acc = np.load(tmp_path / run_name / "cls_outputs" / f"{run_name}_val_acc.npy")
        assert acc.shape == (2,) and np.all((0 <= acc) & (acc <= 1))
    # The finetune recipe seeds each epoch's draws from (--seed, epoch, rank): the two processes, which hold other
    # images, draw other crops, ops and erasing for them, chunk after chunk.
    ranks = [torch.load(tmp_path / f"draws_rank{rank}.pt") for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) > 0  # a chunk's draws each: 16 images a process
    for chunk0, chunk1 in zip(*ranks):
        assert set(chunk0) >= {"crop", "trivial", "erase"}
        assert not torch.equal(chunk0["crop"], chunk1["crop"])
        assert not torch.equal(chunk0["erase"]["noise"], chunk1["erase"]["noise"])
    # The probe draws no random numbers: its head, and the BatchNorm statistics it evaluates with (averaged over the
    # processes, and weighting the two epochs' chunks alike), follow one process's run up to the order of
    # floating-point sums.
    assert single.returncode == 0, single.stderr[-2000:]
    for name in ("train_loss", "val_loss", "val_acc"):
        one = np.load(tmp_path / "linprobe_single" / "cls_outputs" / f"linprobe_{name}.npy")
        two = np.load(tmp_path / "linprobe" / "cls_outputs" / f"linprobe_{name}.npy")
        assert two == pytest.approx(one, rel=1e-4, abs=1e-6), name
    one, two = (torch.load(tmp_path / name / "cls_last.pt")["model"] for name in ("linprobe_single", "linprobe"))
    assert torch.equal(two["head_norm.num_batches_tracked"], one["head_norm.num_batches_tracked"])
    for name in ("head_norm.running_mean", "head_norm.running_var"):
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7, msg=name)


def test_classifier_world_size_that_does_not_divide_the_batch_fails(tmp_path, monkeypatch, capsys):
    import train_classifier
    check_world_size_error(classifier_cmd, train_classifier, tmp_path, monkeypatch, capsys)
