"""What only a GPU can check: the host-resident data path (--data_on host) against data on the GPU, the scripts' fast
path (bf16, torch.compile of the model and of the augmentation, CUDA graphs with gradient accumulation, and with
two processes) on CUDA, and fp16. Skipped on a machine without CUDA, such as CI's; every other test file runs on the
CPU.

Run (on a machine with a GPU): python -m pytest -q tests/test_gpu.py
"""
import json
import os
import subprocess

import pytest
import torch

from conftest import ROOT, TINY_MODEL, TORCHRUN, tiny_pretrain_argv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def read_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def close(a, b, rel):
    return abs(a - b) <= rel * max(abs(a), abs(b))


# --fake_size 128 holds out 32 val images: an accuracy may move by one of them, when the last bits of a score differ.
ONE_VAL_IMAGE = 1 / 32 + 1e-9


def test_pretraining_from_host_memory_follows_the_run_with_the_data_on_the_gpu(tmp_path, run_pretrain):
    """Same seed, same batches, same masks: only where the uint8 images are gathered differs, so the curves agree
    up to the GPU's non-deterministic atomics (the gather's backward) and their rare effect on one prediction."""
    logs = {}
    for where in ("device", "host"):
        run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", "--data_on", where, "--precision", "fp32",
                                        "--no-compile", "--eval_every", "1", name=where))
        logs[where] = read_log(tmp_path / where / "outputs" / "log.jsonl")
    for on_gpu, on_host in zip(logs["device"], logs["host"], strict=True):
        for key in ("loss", "val_loss"):
            assert close(on_gpu[key], on_host[key], 1e-4), (key, on_gpu, on_host)
        assert abs(on_gpu["knn_acc"] - on_host["knn_acc"]) <= ONE_VAL_IMAGE, (on_gpu, on_host)


@pytest.mark.parametrize("mode", ["scratch", "probe"])
def test_fine_tuning_from_host_memory_follows_the_run_with_the_data_on_the_gpu(tmp_path, run_pretrain, mode):
    """From scratch (augmented batches taken from host memory) and the linear probe from an MAE checkpoint (the
    frozen encoder's features computed once from host memory, then kept on the GPU)."""
    import train_classifier
    extra = ["--recipe", "plain"]
    if mode == "probe":
        run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", "--total_epoch", "1", name="mae"))
        extra = ["--linear_probe", "--pretrained_model_path", str(tmp_path / "mae" / "mae.pt")]
    logs = {}
    for where in ("device", "host"):
        out = tmp_path / where
        train_classifier.main(train_classifier.get_args_parser().parse_args([
            "--dataset", "fake", "--fake_size", "128", "--batch_size", "32", "--max_device_batch_size", "16",
            "--total_epoch", "2", "--warmup_epoch", "1", "--device", "cuda", "--data_on", where, "--precision",
            "fp32", "--no-compile", "--run_name", "run", "--output_dir", str(out),
            "--output_model_path", str(out / "cls.pt"), "--log_dir", str(out / "logs"), *extra,
            *(TINY_MODEL if mode == "scratch" else [])]))
        logs[where] = read_log(out / "run_log.jsonl")
    for on_gpu, on_host in zip(logs["device"], logs["host"], strict=True):
        for key in ("train_loss", "val_loss"):
            assert close(on_gpu[key], on_host[key], 1e-4), (key, on_gpu, on_host)
        assert abs(on_gpu["val_acc"] - on_host["val_acc"]) <= ONE_VAL_IMAGE, (on_gpu, on_host)


def test_fast_path_on_the_gpu_learns_as_fp32_does(tmp_path, run_pretrain):
    """bf16 autocast and torch.compile (inductor, Triton) on CUDA in torch.compile's default mode (CUDA graphs,
    the default on one GPU, are the next test's): the 2-epoch loss curve stays close to plain fp32 eager. On the
    CPU the same comparison stays within 2^-10 (tests/test_mae_pretrain.py); 2^-8, one bf16 rounding, leaves room
    for the GPU's other kernels."""
    losses = {}
    for name, flags in (("plain", ["--precision", "fp32", "--no-compile"]),
                        ("fast", ["--precision", "bf16", "--compile", "--compile_mode", "default"])):
        run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", *flags, name=name))
        losses[name] = [r["loss"] for r in read_log(tmp_path / name / "outputs" / "log.jsonl")]
    assert all(close(a, b, 2 ** -8) for a, b in zip(losses["plain"], losses["fast"], strict=True)), losses
    assert losses["plain"] != losses["fast"]  # bf16 and the compiled kernels did run: the numbers differ


def test_compiled_augmentation_on_the_gpu_matches_eager():
    """The finetune recipe's augmentation as train_classifier.py compiles it (inductor, Triton kernels) against eager,
    on the same 256 images and seed. Its random numbers are drawn eagerly either way, so only the arithmetic can
    differ: a rounding at a pixel-level or nearest-neighbour boundary may flip a few values, no more. On the CPU the
    two agree to 1e-6 (tests/test_train_classifier.py)."""
    import train_classifier
    args = train_classifier.get_args_parser().parse_args(["--pretrained_model_path", "(unused)"])
    train_classifier.resolve_recipe(args)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device="cuda")
    torch._dynamo.reset()  # no cache of an earlier test's compilations, full or not
    views = {}
    for compiled in (True, False):
        torch.manual_seed(0)
        views[compiled] = train_classifier.augmentation(args, compiled)(images)
    differs = (views[True] - views[False]).abs() > 1e-3
    assert differs.float().mean() < 0.01, f"{differs.float().mean():.2%} of the values differ"


def accumulated_grads_match_autograd(device, mode):
    """Three steps of two chunks each through utils.backward on the model compiled in `mode`, the .grad buffers
    zeroed in place between steps as the scripts do, against loss.backward() on an eager copy: in fp32 (matrix
    products without TF32, torch's default, which nothing in the project changes) only the kernels' summation order
    differs. A chunk adding graph memory that a later replay had overwritten would be off by whole gradients (and
    torch.compile raises when it notices)."""
    import copy

    import utils
    from model import MAE, MAEConfig
    torch.manual_seed(0)
    cfg = MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2)
    models = {"compiled": MAE(cfg).to(device)}
    models["eager"] = copy.deepcopy(models["compiled"])
    optimizers = {name: utils.make_adamw(utils.weight_decay_groups(m, 0.05), 1e-3, (0.9, 0.95), device)
                  for name, m in models.items()}
    compiled = torch.compile(models["compiled"], mode=mode)
    for step in range(3):
        imgs = torch.randn(2, 8, 3, 32, 32, device=device)
        noise = torch.rand(2, 8, cfg.num_patches, device=device)
        for chunk in range(2):
            utils.backward(compiled(imgs[chunk], noise=noise[chunk])[0] / 2, optimizers["compiled"])
            (models["eager"](imgs[chunk], noise=noise[chunk])[0] / 2).backward()
        for (name, p), ref in zip(models["compiled"].named_parameters(), models["eager"].parameters(), strict=True):
            torch.testing.assert_close(p.grad, ref.grad, rtol=1e-3, atol=1e-6,
                                       msg=lambda m: f"{name}, step {step}: {m}")
        for optimizer in optimizers.values():
            optimizer.zero_grad(set_to_none=False)


def test_utils_backward_under_cuda_graphs_accumulates_what_autograd_does():
    accumulated_grads_match_autograd(torch.device("cuda"), "reduce-overhead")


def training_curve(tmp_path, run_pretrain, script, name, flags) -> list:
    """Each epoch's training loss of a 2-epoch run on CUDA, batch 32 in chunks of 16, the tiny model, with `flags`:
    mae_pretrain.py's (tiny_pretrain_argv) or train_classifier.py's from scratch with the plain recipe; its files
    under tmp_path / name."""
    import train_classifier
    if script == "pretrain":
        run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", *flags, name=name))
        return [r["loss"] for r in read_log(tmp_path / name / "outputs" / "log.jsonl")]
    out = tmp_path / name
    train_classifier.main(train_classifier.get_args_parser().parse_args([
        "--dataset", "fake", "--fake_size", "128", "--batch_size", "32", "--max_device_batch_size", "16",
        "--total_epoch", "2", "--warmup_epoch", "1", "--device", "cuda", "--recipe", "plain", "--run_name", "run",
        "--output_dir", str(out), "--output_model_path", str(out / "cls.pt"), "--log_dir", str(out / "logs"),
        *TINY_MODEL, *flags]))
    return [r["train_loss"] for r in read_log(out / "run_log.jsonl")]


@pytest.mark.parametrize("scope", ["model", "blocks"])
@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_cuda_graphs_with_gradient_accumulation_learn_as_fp32_does(tmp_path, run_pretrain, script, scope):
    """--compile_mode reduce-overhead (the default when compiling on CUDA) with two chunks per step (batch 32,
    chunks of 16): each chunk's backward adds into the .grad buffers utils.make_adamw allocated, outside the graphs'
    memory, which the next chunk's replay reuses. The curve stays as close to fp32 eager as torch.compile's default
    mode's (above). With --compile_scope blocks, one graph serves every block of a shape, replayed block after block
    with eager work between them."""
    graphs = ["--precision", "bf16", "--compile", "--compile_mode", "reduce-overhead", "--compile_scope", scope]
    losses = {name: training_curve(tmp_path, run_pretrain, script, name, flags)
              for name, flags in (("plain", ["--precision", "fp32", "--no-compile"]), ("graphs", graphs))}
    assert len(losses["graphs"]) == 2 and all(
        close(a, b, 2 ** -8) for a, b in zip(losses["plain"], losses["graphs"], strict=True)), losses


def test_captured_steps_replay_what_the_uncaptured_steps_compute():
    """utils.StepGraphs through mae_pretrain.train_step: five steps of two chunks each, the lr changing every step,
    in fp32 on an eager model, against the same steps without graphs. The first two calls of each graph run eagerly,
    the third captures and replays, the rest replay: every one of them must do its step, with the step's lr and
    inputs (a replay of stale inputs or of the captured lr, or a capture that did not also run its step, would be
    off by whole updates, a fifth of how far the five steps move the weights). The kernels are the same, so only
    atomics' order can differ, and with it, where a gradient is near 0, the sign of AdamW's first steps: a few
    weights off by 2 lr, a few thousandths of the distance moved. The lrs are float32's, as the graphs' lr tensors
    hold them (tests/test_utils.py, test_set_lr_fills...)."""
    import copy

    import mae_pretrain
    import utils
    from model import MAE, MAEConfig
    device = torch.device("cuda")
    torch.manual_seed(0)
    cfg = MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2)
    models = {"plain": MAE(cfg).to(device)}
    models["captured"] = copy.deepcopy(models["plain"])
    args = mae_pretrain.get_args_parser().parse_args(["--batch_size", "32", "--max_device_batch_size", "16",
                                                      "--patch_size", "4"])
    images = torch.randint(0, 256, (160, 3, 32, 32), dtype=torch.uint8, device=device)
    start = [p.detach().clone() for p in models["plain"].parameters()]
    losses = {}
    for name, model in models.items():
        optimizer = mae_pretrain.make_optimizer(model, args, device)
        graphs = utils.StepGraphs(optimizer) if name == "captured" else None
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        torch.manual_seed(1)  # the same masks and crops
        losses[name] = []
        for step, lr in enumerate((2 ** -10, 2 ** -11, 2 ** -9, 2 ** -13, 2 ** -10)):
            loss_sum = torch.zeros((), device=device)
            batch_idx = torch.arange(step * 32, (step + 1) * 32, device=device)
            mae_pretrain.train_step(model, optimizer, scaler, images, batch_idx, lr, args, device, None, loss_sum,
                                    graphs)
            losses[name].append(loss_sum.item())
    assert graphs.chunk_call.graph is not None and graphs.update_call.graph is not None  # captured, replayed since
    torch.testing.assert_close(losses["captured"], losses["plain"], rtol=1e-4, atol=0)
    moved = sum((p - p0).abs().sum().item() for p, p0 in zip(models["plain"].parameters(), start, strict=True))
    apart = sum((a - b).abs().sum().item()
                for a, b in zip(models["captured"].parameters(), models["plain"].parameters(), strict=True))
    assert apart < 1e-3 * moved, (apart, moved)


@pytest.mark.parametrize("scope", ["model", "blocks"])
@pytest.mark.parametrize("script", ["pretrain", "finetune"])
def test_captured_steps_learn_as_the_uncaptured_ones_do(tmp_path, run_pretrain, script, scope):
    """The scripts with --capture_step (bf16, compiled in torch.compile's default mode, two chunks per step) against
    the same flags without it: the same kernels, captured and replayed, so the curves agree to far better than
    bf16's rounding; and both stay as close to fp32 eager as the other fast paths' do. With --compile_scope blocks
    the capture holds the blocks' compiled kernels and the eager work between them. Fine-tuning runs the plain
    recipe here (nothing random inside the graph); the next test runs the finetune recipe's."""
    compiled = ["--precision", "bf16", "--compile", "--compile_scope", scope]
    losses = {name: training_curve(tmp_path, run_pretrain, script, name, flags) for name, flags in (
        ("plain", ["--precision", "fp32", "--no-compile"]), ("compiled", [*compiled, "--compile_mode", "default"]),
        ("captured", [*compiled, "--capture_step"]))}
    assert len(losses["captured"]) == 2, losses
    assert all(close(a, b, 1e-3) for a, b in zip(losses["compiled"], losses["captured"], strict=True)), losses
    assert all(close(a, b, 2 ** -8) for a, b in zip(losses["plain"], losses["captured"], strict=True)), losses


def test_captured_fine_tuning_with_the_finetune_recipe_learns(tmp_path):
    """The reference fine-tune's path under --capture_step: the recipe's compiled augmentation and mixup/CutMix stay
    eager between the graphs (mixup draws on the host), drop path draws inside the chunk's graph at every replay. Its
    random numbers need not follow the uncaptured run's, so the check is that it trains: three epochs, the training
    loss falling and finite, a checkpoint a CPU run can load."""
    import train_classifier
    out = tmp_path / "run"
    train_classifier.main(train_classifier.get_args_parser().parse_args([
        "--dataset", "fake", "--fake_size", "256", "--batch_size", "32", "--max_device_batch_size", "16",
        "--total_epoch", "3", "--warmup_epoch", "1", "--device", "cuda", "--capture_step", "--run_name", "run",
        "--output_dir", str(out), "--output_model_path", str(out / "cls.pt"), "--log_dir", str(out / "logs"),
        *TINY_MODEL]))
    log = read_log(out / "run_log.jsonl")
    args = json.loads((out / "run_args.json").read_text())
    assert args["capture_step"] and args["compile_mode"] == "default" and args["drop_path"] > 0 and args["mixup"] > 0
    assert all(0 < r["train_loss"] < 10 for r in log) and log[-1]["train_loss"] < log[0]["train_loss"], log
    saved = torch.load(out / "cls_last.pt", weights_only=True, map_location="cpu")["optimizer"]["param_groups"]
    assert all(type(group["lr"]) is float and group["capturable"] is False for group in saved)


def small_bench(tmp_path, *flags) -> dict:
    """The JSON of bench.py on CUDA with `flags`: the small preset, fine-tuning at batch 32, 3 steps timed once after
    3 of warm-up, the shared inductor cache."""
    import bench
    out = tmp_path / "bench.json"
    bench.main(bench.get_args_parser().parse_args([
        "--device", "cuda", "--preset", "small", "--finetune_batch_size", "32", "--max_device_batch_size", "32",
        "--steps", "3", "--warmup_steps", "3", "--repeats", "1", "--epoch_images", "256", "--eval_images", "64",
        "--compile_cache", "shared", "--json", str(out), *flags]))
    return json.loads(out.read_text())


def test_bench_times_captured_steps(tmp_path):
    """bench.py --capture_step (its graphs captured in the warm-up): both phases time, in the compile mode it
    resolves to, and the projection is made."""
    result = small_bench(tmp_path, "--pretrain_batch_size", "64", "--capture_step")
    assert result["config"]["capture_step"] and result["config"]["compile_mode"] == "default"
    for phase in ("pretrain", "finetune"):
        assert result[phase]["ms_per_step"] > 0 and 0 < result[phase]["mean_loss"] < 10, result[phase]
    assert result["projection"]["minutes"] > 0


def test_augmented_probe_under_cuda_graphs_resumes_where_it_stopped(tmp_path, run_pretrain):
    """With --hflip the probe's frozen encoder runs every step, so the whole classifier is compiled and its step
    captured as CUDA graphs (the defaults on CUDA), and model.RunningMeanBatchNorm updates its statistics inside the
    graph. A run stopped after its first epoch and resumed (the weights loaded in place, under the graphs'
    parameters) continues the straight run: same batches, flips and kernels, so the curves agree to far better than
    bf16's rounding."""
    import train_classifier
    run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", "--total_epoch", "1", name="mae"))

    def run(name, *flags):
        out = tmp_path / name
        train_classifier.main(train_classifier.get_args_parser().parse_args([
            "--dataset", "fake", "--fake_size", "128", "--batch_size", "32", "--max_device_batch_size", "16",
            "--total_epoch", "3", "--warmup_epoch", "1", "--device", "cuda", "--linear_probe", "--hflip",
            "--pretrained_model_path", str(tmp_path / "mae" / "mae.pt"), "--run_name", "run", "--output_dir",
            str(out), "--output_model_path", str(out / "cls.pt"), "--log_dir", str(out / "logs"), *flags]))
        return read_log(out / "run_log.jsonl")
    straight = run("straight")
    ran = json.loads((tmp_path / "straight" / "run_args.json").read_text())
    assert ran["capture_step"] and ran["compile_mode"] == "default"
    run("split", "--stop_after", "1")
    resumed = run("split", "--resume", str(tmp_path / "split" / "cls_last.pt"))
    assert [r["epoch"] for r in resumed] == [1, 2, 3]
    for a, b in zip(straight, resumed, strict=True):
        for key in ("train_loss", "val_loss"):
            assert close(a[key], b[key], 1e-3), (key, a, b)
        assert abs(a["val_acc"] - b["val_acc"]) <= ONE_VAL_IMAGE, (a, b)


def test_two_processes_with_cuda_graphs_learn_as_one_fp32_process_does(tmp_path, run_pretrain):
    """torchrun's path with the scripts' defaults (bf16, compiled, the step captured under torchrun too): each
    process replays the one-GPU graphs and averages the gradients between them (utils.average_gradients). Two
    processes share the one GPU over gloo (tests/helpers/shared_gpu.py; NCCL refuses two ranks on one device). Each
    takes half of the batch of 32, one chunk of 16, so the curve is compared with one fp32 eager process as the
    other CUDA-graph tests compare theirs."""
    run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", "--precision", "fp32", "--no-compile",
                                    name="plain"))
    helper = os.path.join(ROOT, "tests", "helpers", "shared_gpu.py")
    proc = subprocess.run([*TORCHRUN, helper, *tiny_pretrain_argv(tmp_path, "--device", "cuda", name="double")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 process(es)" in proc.stdout
    ran = json.loads((tmp_path / "double" / "outputs" / "args.json").read_text())
    assert ran["capture_step"] and ran["compile_mode"] == "default"
    losses = {name: [r["loss"] for r in read_log(tmp_path / name / "outputs" / "log.jsonl")]
              for name in ("plain", "double")}
    assert len(losses["double"]) == 2 and all(
        close(a, b, 2 ** -8) for a, b in zip(*losses.values(), strict=True)), losses


def test_fp16_resumes_a_bf16_checkpoint_and_keeps_its_losses_finite(tmp_path, run_pretrain):
    """A bf16 run saves an empty GradScaler state (its scaler is off); resuming it in fp16 starts a new scale
    instead of failing to load it. With fp16's range, the mask counts of a chunk of 400 images (76,800 masked
    patches at patch size 2) would overflow if the mask were fp16 (model.random_masking keeps it float32)."""
    common = ["--fake_size", "800", "--batch_size", "400", "--max_device_batch_size", "400", "--patch_size", "2",
              "--eval_every", "1"]
    run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", "--precision", "bf16", "--no-compile",
                                    "--stop_after", "1", *common))
    run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", "--precision", "fp16", "--no-compile",
                                    "--resume", str(tmp_path / "run" / "mae.pt"), *common))
    log = read_log(tmp_path / "run" / "outputs" / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]
    assert all(0 < r["loss"] < 10 and 0 < r["val_loss"] < 10 and r["val_psnr"] < 60 for r in log), log


def test_fp16_under_cuda_graphs_skips_and_learns_as_fp16_eager_does(tmp_path, run_pretrain, monkeypatch):
    """fp16, the default on GPUs without bf16 arithmetic (utils.default_precision), with CUDA graphs and two chunks
    per step: the scaled chunks' gradients add into the .grad buffers outside the graphs, and the fused AdamW step
    unscales them and skips a step whose gradients overflowed. The grad scaler starts at 2^24 here, where the tiny
    model's first gradients overflow fp16 (at 2^16 its largest is about 500, on the CPU), so the runs skip their
    first steps and halve the scale. Run eager, the same steps overflow: both end at the same lower scale, and
    their curves agree as the bf16 ones above agree with fp32."""
    import functools
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24))
    for name, flags in (("eager", ["--no-compile"]), ("graphs", ["--compile", "--compile_mode", "reduce-overhead"])):
        run_pretrain(tiny_pretrain_argv(tmp_path, "--device", "cuda", "--precision", "fp16", *flags, name=name))
    losses = {name: [r["loss"] for r in read_log(tmp_path / name / "outputs" / "log.jsonl")]
              for name in ("eager", "graphs")}
    scales = {name: torch.load(tmp_path / name / "mae.pt", weights_only=True)["scaler"]["scale"]
              for name in ("eager", "graphs")}
    assert scales["eager"] == scales["graphs"] < 2.0 ** 24, scales  # the same steps were skipped, and some were
    assert len(losses["graphs"]) == 2 and all(
        close(a, b, 2 ** -8) for a, b in zip(*losses.values(), strict=True)), losses


def test_profile_on_the_gpu_names_kernel_launchers_and_the_hosts_records(tmp_path):
    """bench.py --profile on CUDA (compiled, CUDA graphs, the pretrained fine-tune's 2 x (depth + 2) optimizer
    groups): every kernel carries its launchers, fused AdamW's kernels are launched inside the optimizer's step, and
    the host's records hold Dynamo's guard checks and that step. The CPU tests give the profiler stand-ins; only a
    card's profiler links kernels to the records that launched them."""
    # torch's CUDA graphs, not the captured step (the default), whose replays launch no optimizer step to name
    prof = small_bench(tmp_path, "--phases", "finetune", "--profile", "--no-capture_step")["finetune"]["profile"]
    assert all("launched_by" in kernel for kernel in prof["all"])
    # the fused AdamW kernel (torch's FusedOptimizerTensorListMetadata), launched by the optimizer's own operator
    adamw = [kernel for kernel in prof["all"] if "FusedOptimizer" in kernel["name"]]
    assert adamw and all(any(operator == "aten::_fused_adamw_" and outer.startswith("Optimizer.step")
                             for operator, outer, _ in kernel["launched_by"]) for kernel in adamw), adamw
    host = {record["name"]: record for record in prof["host_records"]}
    assert host["TorchDynamo Cache Lookup"]["calls_per_step"] >= 1  # the model's and the augmentation's guards
    assert host["Optimizer.step#AdamW.step"]["calls_per_step"] == 1
    # That step's span on the device's timeline is the profiler's annotation, not a kernel: never summed with them
    # (an H200's run at 744b996 listed it among the kernels, 1.26 ms per fine-tuning step counted twice).
    assert not [kernel["name"] for kernel in prof["all"] if kernel["name"].startswith("Optimizer.")]
