"""Shared helpers for the tests. Run the whole suite with: python -m pytest -q tests"""
import math
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
FIXTURE_DIR = os.path.join(ROOT, "tests", "fixtures", "cifar10_tiny")

# torchrun with two processes on this machine (gloo on the CPU; tests/helpers/shared_gpu.py shares one GPU).
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]

# A model small enough that a CPU epoch over a few hundred images takes about a second.
TINY_MODEL = ["--embed_dim", "32", "--depth", "2", "--num_heads", "2", "--decoder_embed_dim", "32",
              "--decoder_depth", "1", "--decoder_num_heads", "2", "--patch_size", "4"]


def tiny_pretrain_argv(tmp_path, *extra, name="run"):
    """Flags for a seconds-long mae_pretrain.py run on --dataset fake, every output under tmp_path."""
    out = tmp_path / name
    return ["--dataset", "fake", "--fake_size", "128", "--batch_size", "32", "--max_device_batch_size", "16",
            "--total_epoch", "2", "--warmup_epoch", "1", "--device", "cpu", "--log_interval", "1",
            "--model_path", str(out / "mae.pt"), "--output_dir", str(out / "outputs"),
            "--log_dir", str(out / "logs"), *TINY_MODEL, *extra]


def logged_before_warning(log_dir: str) -> str:
    """The warning (utils.warn_if_logged_before) of a new run into a --log_dir with an earlier run's TensorBoard
    curves, less its 'prog: warning: ' prefix."""
    return (f"--log_dir {log_dir!r} holds an earlier run's TensorBoard event files, and TensorBoard would draw this "
            "run's curves into theirs as one run: pass another --log_dir, or move those files")


def warmup_cosine_lrs(peak: float, warmup: int, total: int, min_lr: float = 0.0, steps: int | None = None) -> list:
    """The lr of steps 0 .. steps - 1 (default total) written out longhand, an independent reference for utils.lr_at
    and the lr the scripts log: linear warmup to peak over `warmup` steps, then half a cosine from peak down to
    min_lr at step `total`."""
    return [peak * (s + 1) / warmup if s < warmup else
            min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
            for s in range(total if steps is None else steps)]


def stop_with_sigterm(script: str, argv: list, log_path, timeout: float = 120.0) -> int:
    """Run `python script argv` in a process of its own until log_path holds a line (an epoch is done), then send it
    SIGTERM, as a scheduler's time limit does: -> its exit status."""
    proc = subprocess.Popen([sys.executable, script, *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not (os.path.exists(log_path) and open(log_path).read().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before an epoch"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:  # a failed test leaves no run behind
            proc.kill()
            proc.wait()


@pytest.fixture
def background_writers(monkeypatch) -> list:
    """Every utils.BackgroundWriter the test's code makes, kept in this list. A run that stops with an exception
    leaves its writer's last job to the interpreter's exit, which joins the writer's thread; a test in the same
    process joins it by closing the writer."""
    import utils
    writers = []

    class Writer(utils.BackgroundWriter):
        def __init__(self):
            super().__init__()
            writers.append(self)
    monkeypatch.setattr(utils, "BackgroundWriter", Writer)
    return writers


class LrRecorder:
    """A SummaryWriter for a train_one_epoch: keeps the (step, lr) pairs it logs, and fails on any other tag."""
    def __init__(self):
        self.lr = []

    def add_scalar(self, tag, value, step):
        assert tag == "lr"
        self.lr.append((step, value))


@pytest.fixture
def run_pretrain():
    """Parse argv with the script's own parser and run main, as the command line would."""
    import mae_pretrain

    def run(argv):
        return mae_pretrain.main(mae_pretrain.get_args_parser().parse_args(argv))
    return run


@pytest.fixture
def compile_counter(monkeypatch):
    """torch.compile with Dynamo's counting backend instead of inductor: the model is traced exactly as for
    real (seconds, no code generation) and every graph handed to the backend is counted. One graph over a
    whole run means no graph break (each would split it, and host syncs such as .item() or data-dependent
    shapes are breaks) and no recompilation (each would hand over another). counter.graph_inputs lists each
    graph's input names, to tell which function a graph came from."""
    import torch
    import torch._dynamo
    from torch._dynamo.testing import CompileCounter

    class InputRecordingCounter(CompileCounter):
        def __init__(self):
            super().__init__()
            self.graph_inputs = []

        def __call__(self, gm, example_inputs):
            self.graph_inputs.append([node.name for node in gm.graph.nodes if node.op == "placeholder"])
            return super().__call__(gm, example_inputs)

    counter, real_compile = InputRecordingCounter(), torch.compile
    torch._dynamo.reset()  # cached graphs of an earlier test would not be counted again
    monkeypatch.setattr(torch, "compile", lambda model, mode=None, **kwargs: real_compile(model, backend=counter,
                                                                                          **kwargs))
    yield counter
    torch._dynamo.reset()


class ReplayedFunction:
    """A CPU stand-in for a CUDA graph that utils.StepGraphs captured: replay() runs the captured function again on the
    captured input tensors and writes what it returns into the tensors the capture returned, as a graph rewrites its
    own memory. A real capture records without running; this one runs the function once, so the replay StepGraphs
    makes right after a capture runs nothing. What CUDA makes of a capture only a GPU checks (tests/test_gpu.py)."""

    def __init__(self, fn, inputs):
        self.fn, self.inputs, self.replays = fn, inputs, 0
        self.outputs = fn(*inputs)

    def replay(self):
        self.replays += 1
        if self.replays == 1:
            return
        outputs = self.fn(*self.inputs)
        if self.outputs is not None:
            pairs = zip(self.outputs, outputs) if isinstance(outputs, tuple) else [(self.outputs, outputs)]
            for captured, new in pairs:
                captured.copy_(new)


@pytest.fixture
def cpu_step_graphs(monkeypatch) -> list:
    """utils.StepGraphs on the CPU: its captures make ReplayedFunctions (listed, in order), its warm-up calls run in
    place (no side stream)."""
    import utils
    graphs = []

    def capture(fn, *inputs):
        graphs.append(ReplayedFunction(fn, inputs))
        return graphs[-1], graphs[-1].outputs
    monkeypatch.setattr(utils, "_capture", capture)
    monkeypatch.setattr(utils, "_warm_up", lambda fn, *inputs: fn(*inputs))
    return graphs


def _another_value(value):
    """A value of the same kind that differs from value (None, a flag left out, becomes a string)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}_other"


def check_resume_refuses_each_defining_flag(saved: dict, defining, may_change, run_defining_flags, capsys) -> None:
    """utils.check_resumable with a checkpoint of the run `saved` (its args): a run with another value of any
    defining flag is refused in one line, exit status 2, naming the flag and both values; another value of a flag
    that may change is accepted."""
    from types import SimpleNamespace

    import utils
    ckpt = {"args": dict(saved), "epoch": 1}
    utils.check_resumable(ckpt, SimpleNamespace(**saved), run_defining_flags)
    for name in sorted(defining):
        given = _another_value(saved[name])
        with pytest.raises(SystemExit) as exc:
            utils.check_resumable(ckpt, SimpleNamespace(**{**saved, name: given}), run_defining_flags)
        assert exc.value.code == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"--resume {saved['resume']!r} was trained with --{name} {saved[name]}, this run has {given}" in err, err
    for name in may_change:  # --stop_after to an epoch after the checkpoint's: check_resumable refuses the others
        given = ckpt["epoch"] + 1 if name == "stop_after" else _another_value(saved[name])
        utils.check_resumable(ckpt, SimpleNamespace(**{**saved, name: given}), run_defining_flags)
