"""Tests of bench.py: the analytic FLOP count against torch's own counter, the timed step against plain autograd,
the CPU command end to end (no host syncs in either step), the host-sync recorder, bad flags, and the bf16 fast
path's loss curve against fp32 in mae_pretrain.py.

Run: python -m pytest -q tests/test_bench.py
One test compiles a tiny model with inductor's CPU backend (about 40 s); the compiled path's speed is timed by
bench.py on a GPU.
"""
import json
import os
import platform
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import utils
from conftest import ROOT, tiny_pretrain_argv, warmup_cosine_lrs
from model import MAE, MAEConfig, ViTClassifier

# ViT-T as the scripts run it, and a lopsided model in which every term of the formula has its own size
# (mask ratio 0.6 of 64 patches is not a whole number of patches; the decoder is narrower; MLP ratio 2.5).
CONFIGS = {
    "vit-t": MAEConfig(),
    "lopsided": MAEConfig(patch_size=4, embed_dim=48, depth=2, num_heads=3, decoder_embed_dim=32, decoder_depth=3,
                          decoder_num_heads=2, mlp_ratio=2.5, mask_ratio=0.6),
}


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on CI's few shared cores, OpenMP threads that spin-wait for each other made a CPU step
    60x slower (5 s instead of 77 ms, measured under load on 2 cores). These tests check numbers, not speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def counted_flops(fn) -> int:
    """FLOPs that torch's FlopCounterMode sees while fn runs. The math attention kernel runs attention as
    matrix products the counter knows; the CPU's fused kernel is not in its table."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_flop_formulas_match_torchs_flop_counter(name):
    cfg, batch = CONFIGS[name], 3
    torch.manual_seed(0)
    imgs = torch.randn(batch, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        mae_counted = counted_flops(lambda: MAE(cfg)(imgs))
        mae_training_counted = counted_flops(lambda: MAE(cfg)(imgs, masked_only=True))
        cls_counted = {pool: counted_flops(lambda: ViTClassifier(cfg, num_classes=7, global_pool=pool)(imgs))
                       for pool in ("token", "avg")}
    assert sum(bench.mae_forward_flops(cfg, masked_only=False).values()) * batch == mae_counted
    assert sum(bench.mae_forward_flops(cfg).values()) * batch == mae_training_counted < mae_counted
    for pool, counted in cls_counted.items():
        assert sum(bench.classifier_forward_flops(cfg, num_classes=7, global_pool=pool).values()) * batch == counted
    # the class token's pooling: the last block computes one token's output
    assert cls_counted["token"] < cls_counted["avg"]


def test_vit_t_numbers_match_the_issues_figures():
    # Issue #5: 31,100 images/s at batch 4096 is "about 172 TFLOP/s" of pretraining, a plain MAE step: the decoder
    # predicts every patch.
    train_flops = bench.TRAIN_FLOPS_PER_FORWARD * sum(bench.mae_forward_flops(MAEConfig(), masked_only=False).values())
    assert 31_100 * train_flops / 1e12 == pytest.approx(172, abs=1)


def test_a_training_step_is_three_forwards():
    # The backward pass is two matrix products (input and weight gradients) per forward one; only the patch
    # embedding has no input gradient, which keeps the count a hair under 3x.
    cfg = CONFIGS["vit-t"]
    torch.manual_seed(0)
    model, imgs = MAE(cfg), torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, cfg.num_patches)
    forward = counted_flops(lambda: model(imgs, noise=noise))
    train = counted_flops(lambda: model(imgs, noise=noise)[0].backward())
    assert train / forward == pytest.approx(bench.TRAIN_FLOPS_PER_FORWARD, rel=2e-3)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_step_with_accumulation_follows_the_full_batch_gradient(phase):
    """One step of the scripts' train_step (mae_pretrain's; train_classifier's with the plain recipe) with chunks of
    4 and of 16 moves the weights exactly as plain SGD on the mean loss of the whole batch of 16, computed directly
    with the same mask noise."""
    cfg = MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2)
    batch, lr = 16, 0.5
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (40,), generator=g)
    batch_idx = torch.randperm(40, generator=g)[:batch]
    args = SimpleNamespace(pretrain_batch_size=batch, finetune_batch_size=batch, num_classes=10,
                           finetune_recipe="plain", max_device_batch_size=batch, compile=False)
    make = bench.pretrain_phase if phase == "pretrain" else bench.finetune_phase
    cpu = torch.device("cpu")
    extra = (images, args, cpu) if phase == "pretrain" else (images, labels, args, cpu)

    torch.manual_seed(1)
    reference = make(cfg, *extra).model
    torch.manual_seed(2)
    noise = torch.rand(batch, cfg.num_patches)
    imgs = (images[batch_idx].float() / 255 - 0.5) / 0.5  # data.normalize, written out
    if phase == "pretrain":
        loss = reference(imgs, noise=noise)[0]
    else:
        loss = F.cross_entropy(reference(imgs), labels[batch_idx])
    loss.backward()
    expected = {n: p.detach() - lr * p.grad for n, p in reference.named_parameters() if p.grad is not None}

    for chunk in (4, 16):
        args.max_device_batch_size = chunk  # read by the script's flags the phase builds
        torch.manual_seed(1)
        step = make(cfg, *extra)
        optimizer = torch.optim.SGD(step.model.parameters(), lr=lr)
        utils.allocate_grads(optimizer)  # the .grad buffers the steps add into, as utils.make_adamw's
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss_sum = torch.zeros(())
        torch.manual_seed(2)  # the scripts' train_step draws the batch's noise first, as the reference did above
        step.step(step.model, optimizer, scaler, batch_idx, lr, loss_sum, None, None)
        got = dict(step.model.named_parameters())
        for name, value in expected.items():
            torch.testing.assert_close(got[name].detach(), value, rtol=1e-5, atol=1e-6, msg=f"{name}, chunk {chunk}")
        # the device-side sum holds each chunk's mean loss once
        assert loss_sum.item() / (batch // chunk) == pytest.approx(loss.item(), rel=1e-5)


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_steps_accumulate_into_the_grad_buffers_the_optimizer_allocated(phase):
    """utils.make_adamw gives every trainable parameter a zeroed .grad; the scripts' steps add each chunk's gradient
    into those very tensors and zero them in place. Under CUDA graphs a .grad that autograd allocated would live in
    the graphs' memory, overwritten by the next chunk's replay (tests/test_gpu.py runs that case)."""
    cfg = MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    args = SimpleNamespace(pretrain_batch_size=16, finetune_batch_size=16, num_classes=10, finetune_recipe="plain",
                           max_device_batch_size=8, compile=False)  # two chunks per step
    cpu = torch.device("cpu")
    step = bench.pretrain_phase(cfg, images, args, cpu) if phase == "pretrain" else \
        bench.finetune_phase(cfg, images, labels, args, cpu)
    optimizer = step.make_optimizer(step.model)
    params = [p for p in step.model.parameters() if p.requires_grad]
    buffers = [p.grad for p in params]
    assert all(g is not None and not g.any() for g in buffers)
    before = [p.detach().clone() for p in params]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        step.step(step.model, optimizer, scaler, torch.randperm(40)[:16], 1e-3, torch.zeros(()), None, None)
    assert all(p.grad is g and not g.any() for p, g in zip(params, buffers))
    assert all(not torch.equal(p, b) for p, b in zip(params, before))  # every parameter was trained


def test_phases_step_the_optimizers_the_scripts_build():
    """Pretraining: the MAE recipe's AdamW. Fine-tuning: the pretrained fine-tune's, whose layer decay gives a group
    per layer and weight decay, each a launch and host work every step; bench.py once timed two groups instead."""
    cfg = MAEConfig(patch_size=4, embed_dim=32, depth=3, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2)
    images, labels = torch.zeros(8, 3, 32, 32, dtype=torch.uint8), torch.zeros(8, dtype=torch.long)
    args = SimpleNamespace(pretrain_batch_size=512, finetune_batch_size=128, num_classes=10,
                           finetune_recipe="finetune", max_device_batch_size=128, compile=False)
    cpu = torch.device("cpu")

    pretrain = bench.pretrain_phase(cfg, images, args, cpu)
    optimizer = pretrain.make_optimizer(pretrain.model)
    assert pretrain.peak_lr == pytest.approx(1.5e-4 * 512 / 256)  # mae_pretrain.py's defaults
    assert [(g["lr"], g["betas"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (pretrain.peak_lr, (0.9, 0.95), 0.05), (pretrain.peak_lr, (0.9, 0.95), 0.0)]

    finetune = bench.finetune_phase(cfg, images, labels, args, cpu)
    optimizer = finetune.make_optimizer(finetune.model)
    assert finetune.peak_lr == pytest.approx(1e-3 * 128 / 256)  # train_classifier.py's defaults
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(finetune.model.named_parameters())
    # 0.75 ** (depth + 1 - layer): the patch embedding at layer 0, block i at i + 1, the head at depth + 1
    assert scale[id(named["encoder.patch_embed.weight"])] == pytest.approx(0.75 ** 4)
    assert scale[id(named["encoder.blocks.1.attn.qkv.weight"])] == pytest.approx(0.75 ** 2)
    assert scale[id(named["head.weight"])] == 1.0
    assert len(optimizer.param_groups) == 2 * (cfg.depth + 2)  # each layer has decayed and undecayed tensors
    assert {g["betas"] for g in optimizer.param_groups} == {(0.9, 0.999)}


@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_each_chunk_marks_a_new_cuda_graph_step_between_the_last_backward_and_its_forward(phase, monkeypatch):
    """utils.mark_chunk_begin (torch.compiler.cudagraph_mark_step_begin) once per chunk, after the chunk before has
    been through backward and before the chunk's forward: CUDA-graph trees may then reuse the memory of the chunk
    before's outputs. tests/test_gpu.py runs both compile scopes under CUDA graphs. Without CUDA there are no CUDA
    graphs, and no marks (the first would import inductor's graph trees, for nothing)."""
    cfg = MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    args = SimpleNamespace(pretrain_batch_size=16, finetune_batch_size=16, num_classes=10, finetune_recipe="plain",
                           max_device_batch_size=8, compile=False)  # two chunks per step
    cpu = torch.device("cpu")
    step = bench.pretrain_phase(cfg, images, args, cpu) if phase == "pretrain" else \
        bench.finetune_phase(cfg, images, torch.randint(0, 10, (40,)), args, cpu)
    optimizer = step.make_optimizer(step.model)
    events, backward = [], utils.backward
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    monkeypatch.setattr(utils, "backward", lambda *a: (events.append("backward"), backward(*a)))
    step.model.register_forward_pre_hook(lambda *_: events.append("forward"))
    for cuda, expected in ((True, ["mark", "forward", "backward"] * 2), (False, ["forward", "backward"] * 2)):
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: cuda)  # the step itself runs on the CPU here
        events.clear()
        step.step(step.model, optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.randperm(40)[:16], 1e-3,
                  torch.zeros(()), None, None)
        assert events == expected


@pytest.mark.parametrize("phase, expected_reads", [("pretrain", 3), ("finetune", 4)])
def test_a_scripts_epoch_reads_values_back_only_every_log_interval_steps(phase, expected_reads):
    """The epoch bench.py times is the script's own train_one_epoch: 52 steps of 2 images with the default
    --log_interval 25 read the running loss back at steps 25 and 50 (fine-tuning: the loss and the correct count)
    and pretraining its mean at the end (fine-tuning's final .tolist() reads without an operator the recorder
    sees), and nothing else: no step waits for the device."""
    cfg = MAEConfig(patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                    decoder_num_heads=2)
    images = torch.randint(0, 256, (104, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (104,))
    args = SimpleNamespace(pretrain_batch_size=2, finetune_batch_size=2, num_classes=10, finetune_recipe="plain",
                           max_device_batch_size=2, compile=False, epoch_images=104)
    cpu = torch.device("cpu")
    timed = bench.pretrain_phase(cfg, images, args, cpu) if phase == "pretrain" else \
        bench.finetune_phase(cfg, images, labels, args, cpu)
    optimizer = timed.make_optimizer(timed.model)
    with bench.HostSyncRecorder() as recorder:
        timed.epoch(timed.model, optimizer, torch.amp.GradScaler("cpu", enabled=False), None, None, None)
    assert recorder.syncs == ["_local_scalar_dense"] * expected_reads


def test_compiled_fine_tuning_times_its_input_work_compiled_and_eager(compile_counter):
    """With compilation on, the fine-tuning phase runs its augmentation compiled, as train_classifier.py does, and
    also times it eager: the difference is what compiling it saves. Dynamo's counting backend traces it (one graph,
    the recipe's crop, flip, TrivialAugment and random erasing) without generating code."""
    cfg = MAEConfig(patch_size=4, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                    decoder_num_heads=2)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    args = SimpleNamespace(finetune_batch_size=16, num_classes=10, finetune_recipe="finetune",
                           max_device_batch_size=8, compile=True)
    phase = bench.finetune_phase(cfg, images, labels, args, torch.device("cpu"))
    phase.inputs_eager(torch.arange(16))
    assert compile_counter.frame_count == 0
    phase.inputs(torch.arange(16))  # two chunks of 8, one graph
    assert compile_counter.frame_count == 1 and compile_counter.op_count > 100
    args.compile = False
    assert bench.finetune_phase(cfg, images, labels, args, torch.device("cpu")).inputs_eager is None


def test_fine_tunings_input_work_takes_and_mixes_each_chunk_as_the_step_does(monkeypatch):
    """The input work timed alone is train_step's, chunk by chunk: a batch of 16 at --max_device_batch_size 8 is two
    chunks of 8 taken (images and labels) and mixed (the finetune recipe's mixup pairs each chunk with its own
    reverse), not one batch of 16."""
    cfg = MAEConfig(patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                    decoder_num_heads=2)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (40,))
    taken, mixed, real_take, real_make_mixup = [], [], bench.data.take, bench.train_classifier.make_mixup

    def make_mixup(*args):
        mixup = real_make_mixup(*args)
        return lambda x, y: (mixed.append(len(x)), mixup(x, y))[1]
    monkeypatch.setattr(bench.data, "take", lambda source, idx, device: (taken.append(len(idx)),
                                                                          real_take(source, idx, device))[1])
    monkeypatch.setattr(bench.train_classifier, "make_mixup", make_mixup)
    args = SimpleNamespace(finetune_batch_size=16, num_classes=10, finetune_recipe="finetune",
                           max_device_batch_size=8, compile=False)
    phase = bench.finetune_phase(cfg, images, labels, args, torch.device("cpu"))
    phase.inputs(torch.randperm(40)[:16])
    assert taken == [8, 8, 8, 8] and mixed == [8, 8]


def test_inductor_settings_take_each_value_as_their_settings_type():
    """Each value takes its setting's type: bool, int, str, and float (max_autotune_subproc_result_timeout_seconds,
    60.0 by default in torch 2.6 to 2.14: "2" is 2.0, a float, not the int 2)."""
    args = SimpleNamespace(inductor=["coordinate_descent_tuning=true", "triton.cudagraph_trees=0",
                                     "unroll_reductions_threshold=4", "max_autotune_gemm_backends=ATEN",
                                     "max_autotune_subproc_result_timeout_seconds=2"])
    settings = bench.inductor_settings(args)
    assert settings == {"coordinate_descent_tuning": True, "triton.cudagraph_trees": False,
                        "unroll_reductions_threshold": 4, "max_autotune_gemm_backends": "ATEN",
                        "max_autotune_subproc_result_timeout_seconds": 2.0}
    assert [type(value) for value in settings.values()] == [bool, bool, int, str, float]
    import torch._inductor.config as inductor_config
    with inductor_config.patch(settings):  # as main applies them around the timed phases
        assert inductor_config.coordinate_descent_tuning is True and inductor_config.triton.cudagraph_trees is False
    assert bench.inductor_settings(SimpleNamespace(inductor=[])) == {}


@pytest.mark.parametrize("attention, kernel", [("math", "aten::_scaled_dot_product_attention_math"),
                                               ("flash", "aten::_scaled_dot_product_flash_attention_for_cpu")])
def test_attention_flag_runs_every_attention_with_that_kernel(attention, kernel):
    """--attention names the kernel behind F.scaled_dot_product_attention in the timed work: the operators a
    classifier's training step records are that kernel's, and attention_choice reports it."""
    cfg = MAEConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2)
    assert utils.attention_choice(cfg, attention, torch.device("cpu"), None) == \
        {"math": "math", "flash": "flash_attention"}[attention]
    model = ViTClassifier(cfg, num_classes=10)
    with utils.attention_kernel(attention), torch.profiler.profile() as prof:
        model(torch.randn(4, 3, 32, 32)).sum().backward()
    names = {event.key for event in prof.key_averages()}
    assert kernel in names
    other = {"aten::_scaled_dot_product_attention_math", "aten::_scaled_dot_product_flash_attention_for_cpu"} - {kernel}
    assert not other & names


def test_fresh_compile_cache_is_empty_used_and_removed_after(tmp_path, monkeypatch):
    """--compile_cache fresh compiles into an empty folder of its own, so the compile seconds are a first run's; the
    cache the user had is left as it was. One small function compiled with inductor: views alone, so that inductor
    writes its wrapper code and graph caches there without compiling a C++ kernel (a few seconds, where a kernel
    from an empty cache takes over ten on 2 cores)."""
    user_cache = tmp_path / "user_cache"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(user_cache))
    args = SimpleNamespace(compile=True, compile_cache="fresh")
    with bench.compile_cache(args):
        folder = os.environ["TORCHINDUCTOR_CACHE_DIR"]
        assert folder != str(user_cache) and os.listdir(folder) == []
        x = torch.arange(6.0)
        torch.testing.assert_close(torch.compile(lambda t: t.view(2, 3).t())(x), x.view(2, 3).t())
        assert os.listdir(folder)  # inductor wrote its code there
    assert not os.path.exists(folder) and os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(user_cache)
    assert not user_cache.exists()
    for shared in (SimpleNamespace(compile=True, compile_cache="shared"),
                   SimpleNamespace(compile=False, compile_cache="fresh")):
        with bench.compile_cache(shared):
            assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(user_cache)


def test_profile_lists_where_each_steps_time_goes(tmp_path, capsys):
    """--profile runs --steps more steps of each phase under torch.profiler and lists the kernels (on the CPU, the
    operators) with the most self time per step, largest first, with their sum."""
    out = tmp_path / "bench.json"
    bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--profile", "--steps", "1", "--repeats", "1",
                                                   "--eval_images", "8", "--json", str(out)]))
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    for name in ("pretrain", "finetune"):
        prof = r[name]["profile"]
        assert prof["what"] == "CPU operators"
        names, times = zip(*prof["top"])
        assert len(times) == bench.PROFILE_TOP and list(times) == sorted(times, reverse=True) and times[-1] > 0
        assert sum(times) < prof["busy_ms_per_step"]  # the sum is over every operator, the list its largest
        assert {"aten::mm", "aten::addmm"} & set(names)  # the matrix products, where a step's arithmetic is
        kinds = prof["kinds_ms_per_step"]
        assert sum(kinds.values()) == pytest.approx(prof["busy_ms_per_step"])  # every operator in one kind
        # the JSON keeps all of them, whole names, kinds and launches per step (one step here)
        every = prof["all"]
        assert [e["name"][:bench.PROFILE_NAME_CHARS] for e in every[:bench.PROFILE_TOP]] == list(names)
        assert sum(e["ms_per_step"] for e in every) == pytest.approx(prof["busy_ms_per_step"])
        for kind in kinds:
            assert sum(e["ms_per_step"] for e in every if e["kind"] == kind) == pytest.approx(kinds[kind])
        assert all(e["calls_per_step"] >= 1 for e in every)
        # utils.backward's, one per chunk (2 and 1 here); fused AdamW's step counts, one per parameter group: 2 in
        # pretraining, a decayed and an undecayed one per layer in the (pretrained) fine-tuning's layer decay
        groups = 2 if name == "pretrain" else 2 * (bench.PRESETS["small"]["depth"] + 2)
        assert next(e for e in every if e["name"] == "aten::_foreach_add_")["calls_per_step"] == \
            (2 if name == "pretrain" else 1) + groups
        assert kinds["matrix products"] > 0 and kinds["attention"] > 0 and kinds["other"] > 0
        assert f"where a {name} step's time goes" in printed and f"%  {names[0]}\n" in printed
        # the host's side, by cProfile: the largest self and cumulative times per step, each list largest first
        host = r[name]["host_profile"]
        assert host["what"] == "host (cProfile)"
        for key in ("top_self", "top_cumulative"):
            times = [ms for _, ms in host[key]]
            assert len(times) == bench.PROFILE_TOP and times == sorted(times, reverse=True) and times[-1] > 0
        assert sum(e["self_ms_per_step"] for e in host["all"]) <= host["ms_per_step"] + 1e-9
        assert [e["name"][:bench.PROFILE_NAME_CHARS] for e in host["all"][:bench.PROFILE_TOP]] == \
            [n for n, _ in host["top_self"]]
        # the script's own train_step (one call per step) holds nearly all of the step's host time
        script = "mae_pretrain.py" if name == "pretrain" else "train_classifier.py"
        train_step = next(e for e in host["all"] if e["name"].startswith(f"train_step ({script}:"))
        assert train_step["calls_per_step"] == 1 and train_step["cumulative_ms_per_step"] > 0.5 * host["ms_per_step"]
        assert f"where the host's time goes while it queues a {name} step" in printed
        assert f"%  {host['top_self'][0][0]}\n" in printed


def test_profile_prints_a_gpus_launchers_and_host_records(monkeypatch, capsys):
    """What --profile prints from a GPU's profile, which only a card makes: each listed kernel's most frequent
    launcher after an arrow, and a line of the host's records (the guard checks, the optimizer). A CPU run's profile,
    given those fields, stands in for the card's."""
    profile_on_cpu = bench.device_time_profile

    def as_on_a_gpu(run_steps, steps, device):
        prof = profile_on_cpu(run_steps, steps, device)
        for kernel in prof["all"]:
            kernel["launched_by"] = [["aten::sum", "CompiledFunctionBackward", 46.0], ["aten::mean", "x", 1.0]]
        prof["host_records"] = [{"name": "Optimizer.step#AdamW.step", "cpu_ms_per_step": 0.5,
                                 "self_cpu_ms_per_step": 0.1, "calls_per_step": 1.0},
                                {"name": "aten::empty", "cpu_ms_per_step": 0.4, "self_cpu_ms_per_step": 0.4,
                                 "calls_per_step": 9.0},
                                {"name": "TorchDynamo Cache Lookup", "cpu_ms_per_step": 0.25,
                                 "self_cpu_ms_per_step": 0.25, "calls_per_step": 2.0}]
        return prof
    monkeypatch.setattr(bench, "device_time_profile", as_on_a_gpu)
    bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--phases", "finetune", "--profile",
                                                   "--steps", "1", "--repeats", "1", "--eval_images", "8"]))
    lines = capsys.readouterr().out.splitlines()
    listed = [line for line in lines if line.endswith("  <- aten::sum in CompiledFunctionBackward (46 per step)")]
    assert len(listed) == bench.PROFILE_TOP  # the most frequent launcher only
    assert "  the host's side of the same steps (the profiler's records, its own cost included): " \
           "Optimizer.step#AdamW.step 0.500 ms in 1 calls; TorchDynamo Cache Lookup 0.250 ms in 2 calls" in lines


@pytest.mark.parametrize("phase, other", [("pretrain", "finetune"), ("finetune", "pretrain")])
def test_one_phase_alone_times_that_phase_and_projects_nothing(tmp_path, capsys, monkeypatch, phase, other):
    """--phases pretrain|finetune times that step alone (its row, its epoch), and leaves out what needs both: the
    evaluations and the projection. The fine-tuning rule on odd chunks binds only when fine-tuning is timed. The
    epoch runs --epoch_images images (its ms per step divides by their steps), and the printed row gives the
    JSON's images/s and share of the peak."""
    import mae_pretrain
    import train_classifier
    epoch_images = []
    for script, images_arg in ((mae_pretrain, 3), (train_classifier, 4)):  # train_one_epoch's images argument
        def recording(*a, real=script.train_one_epoch, at=images_arg, **kw):
            epoch_images.append(len(a[at]))
            return real(*a, **kw)
        monkeypatch.setattr(script, "train_one_epoch", recording)
    out = tmp_path / "bench.json"
    odd = ["--finetune_batch_size", "31"] if phase == "pretrain" else []  # chunks of 31: odd
    bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--phases", phase, "--steps", "1",
                                                   "--repeats", "1", "--json", str(out), *odd]))
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert r[other] is None and r["evaluation"] is None and r["projection"] is None
    assert r[phase]["ms_per_step"] > 0 and r[phase]["epoch_ms_per_step"] > 0
    assert re.search(rf"^{phase} +\d+", printed, re.M) and not re.search(rf"^{other} +\d+", printed, re.M)
    assert epoch_images == [r["config"]["epoch_images"]] == [256]
    row = re.search(rf"^{phase} .*$", printed, re.M).group(0).split()
    assert row[5:8] == [f"{r[phase]['images_per_sec']:,.0f}", f"{r[phase]['tflops']:.3f}",
                        f"{r[phase]['percent_of_peak']:.1f}%"], row
    assert f"evaluation and projection: left out (--phases {phase}" in printed
    assert "projected wall time" not in printed
    assert ("fine-tuning input work alone" in printed) == (phase == "finetune")
    # The footnote gives the epoch the phase ran (4 steps of 64, 8 of 32), and names the fine-tuning recipe only
    # when fine-tuning was timed.
    batch = r["config"][f"{phase}_batch_size"]
    assert f"which the projection uses, of {256 // batch} x {batch} images ({phase})" in printed
    assert ("train_classifier.py's step with --recipe" in printed) == (phase == "finetune")


@pytest.mark.parametrize("device, preset, sizes, batch_sizes, timing", [
    ("cuda", "vit-t", (192, 12, 3), (512, 128), (256, 20, 5, 5, 10_000, 50_000)),
    ("cpu", "small", (64, 2, 2), (64, 32), (32, 2, 1, 3, 64, 256))])
def test_the_defaults_are_vit_t_at_the_references_batches_on_cuda_and_a_small_model_on_the_cpu(monkeypatch, device,
                                                                                               preset, sizes,
                                                                                               batch_sizes, timing):
    """Without flags bench times ViT-T (width 192, 12 blocks, 3 heads) at the scripts' batches, 512 for pretraining
    and 128 for fine-tuning, on CUDA; on the CPU a 2-block model of width 64 at 64 and 32, which takes seconds. A
    CUDA device needs no GPU to resolve its defaults once compilation and bf16 are answered for. The timing flags
    take the defaults their help gives: --max_device_batch_size, --steps, --warmup_steps, --repeats, --eval_images
    and --epoch_images of 256, 20, 5, 5, 10,000 and 50,000 on CUDA; 32, 2, 1, 3, 64 and four of the larger batch
    (256) on the CPU."""
    monkeypatch.setattr(utils, "_compile_unavailable", lambda device: None)
    monkeypatch.setattr(utils, "native_bf16", lambda device: True)  # an H100's answer
    args = bench.get_args_parser().parse_args(["--device", device])
    bench.resolve_defaults(args, torch.device(device))
    assert args.preset == preset
    assert (args.embed_dim, args.depth, args.num_heads) == sizes
    assert (args.pretrain_batch_size, args.finetune_batch_size) == batch_sizes
    assert (args.max_device_batch_size, args.steps, args.warmup_steps, args.repeats, args.eval_images,
            args.epoch_images) == timing


def test_code_version_is_the_commit_with_changes_when_git_reports_modified_tracked_files(monkeypatch):
    """code_version is `git rev-parse --short HEAD`, with "+changes" appended when `git status --porcelain
    --untracked-files=no` lists a modified tracked file, and without it when it lists none; None when git fails."""
    status = {"returncode": 0, "stdout": ""}

    def fake_git(command, **kwargs):
        if "rev-parse" in command:
            return subprocess.CompletedProcess(command, 0, stdout="abc1234\n", stderr="")
        assert command[-3:] == ["status", "--porcelain", "--untracked-files=no"], command
        return subprocess.CompletedProcess(command, status["returncode"], stdout=status["stdout"], stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_git)
    assert bench.code_version() == "abc1234"
    status["stdout"] = " M bench.py\n"
    assert bench.code_version() == "abc1234+changes"
    status["returncode"] = 128
    assert bench.code_version() is None


def test_command_line_gives_back_the_resolved_flags():
    """bench.command_line(args) parses back to the same namespace (defaults made explicit, --no-compile, lists),
    and with overrides to those values instead."""
    parser = bench.get_args_parser()
    args = parser.parse_args(["--device", "cpu", "--no-compile", "--inductor", "a=1", "b=2", "--profile"])
    bench.resolve_defaults(args, torch.device("cpu"))
    assert vars(parser.parse_args(bench.command_line(args))) == vars(args)
    changed = parser.parse_args(bench.command_line(args, phases="finetune", profile=False, compile=True,
                                                   inductor=[], repeats=1))
    assert vars(changed) == {**vars(args), "phases": "finetune", "profile": False, "compile": True, "inductor": [],
                             "repeats": 1}


@pytest.mark.parametrize("case", ["measured", "child fails", "shared cache"])
def test_the_second_fine_tunes_compilation_is_measured_in_a_new_process(tmp_path, capsys, monkeypatch, case):
    """With compilation on, the projection counts the second fine-tune's compile seconds as a new bench.py process
    measures them, timing the fine-tuning phase alone from the cache this one filled (its environment, so a fresh
    cache's folder, is inherited). Here that process is a stand-in that checks its flags and reports 2.5 s; if it
    fails, the projection counts the first fine-tune's seconds again, and says so. The flags it gets pass bench's own
    checks (an epoch shorter than the fine-tuning batch would make it die at once, unmeasured), and run one step.
    With --compile_cache shared (runs that compare step times) no such process starts. (torch.compile is the
    identity here: the plumbing, not compilation, is under test, and tracing each case's models took seconds.)"""
    children, real_run = [], subprocess.run
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: model)

    def child(argv, **kwargs):
        if argv[:2] != [sys.executable, os.path.join(ROOT, "bench.py")]:
            return real_run(argv, **kwargs)  # e.g. inductor asking the C++ compiler its version
        flags = bench.get_args_parser().parse_args(argv[2:])
        children.append(flags)
        bench.resolve_defaults(flags, torch.device("cpu"))
        bench.check_args(flags)  # flags the real process would run with, not die on
        if case == "measured":
            with open(flags.json, "w") as f:
                json.dump({"finetune": {"compile_s": 2.5}}, f)
        return subprocess.CompletedProcess(argv, 0 if case == "measured" else 1, "", "RuntimeError: no room\n")
    monkeypatch.setattr(bench.subprocess, "run", child)
    out = tmp_path / "bench.json"
    cache = ["--compile_cache", "shared"] if case == "shared cache" else []
    bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--compile", "--steps", "1", "--repeats", "2",
                                                   "--eval_images", "8", "--json", str(out), *cache]))
    printed = capsys.readouterr().out
    r = json.loads(out.read_text())
    first = r["finetune"]["compile_s"]
    second = 2.5 if case == "measured" else None
    assert r["projection"]["second_finetune_compile_s"] == second
    expected = r["pretrain"]["compile_s"] + first + (first if second is None else second)
    assert r["projection"]["compile_minutes"] == pytest.approx(expected / 60)
    if case == "shared cache":
        assert children == [] and "the second fine-tune as much (not measured)" in printed
        return
    (flags,) = children
    assert (flags.phases, flags.compile_cache, flags.profile, flags.repeats, flags.compile) == \
        ("finetune", "shared", False, 1, True)
    assert (flags.finetune_batch_size, flags.preset, flags.device) == (32, "small", "cpu")  # as this run's
    assert flags.epoch_images == 32  # the shortest epoch check_args allows with --phases finetune: one batch
    if case == "child fails":
        assert "second fine-tune's compilation: not measured, its process failed (RuntimeError: no room)" in printed
        assert "the second fine-tune as much (not measured)" in printed
    else:
        assert "the second fine-tune 2.5 s from the cache the first filled" in printed


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
     "cublas", "matrix products"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matrix products"),
    ("triton_tem_fused_addmm_gelu_0", "matrix products"),  # max-autotune's GEMM template, its epilogue fused
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t"
     ">>(pytorch_flash::Flash_fwd_params)", "attention"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<cutlass::arch::Sm80, "
     "cutlass::gemm::GemmShape<64, 64, 32>>::Params)", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x128_4x1x1_kernel0_0", "attention"),
    ("triton_per_fused__scaled_dot_product_flash_attention_native_layer_norm_0", "inductor's fused kernels"),
    ("## Call CompiledFxGraph fqjo67qi3ibfo3hrfqvgs7zrbgcbkybeddoghzk4hp56xmpdrvcq ##", "inductor's fused kernels"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>", "other"),
    ("aten::addmm", "matrix products"),
    ("aten::bmm", "matrix products"),  # the math attention's products on a CPU, and einsum's
    ("aten::baddbmm", "matrix products"),
    ("aten::convolution_backward", "matrix products"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::gelu", "other"),
    ("aten::mm_like_op_that_is_not_mm", "other"),
])
def test_profile_sorts_kernels_into_kinds_by_name(name, kind):
    assert bench.kernel_kind(name) == kind


def test_timed_with_host_times_the_queueing_of_the_first_calls_only(monkeypatch):
    """On a GPU the host's time per step is that of the first HOST_TIMED_CALLS calls: later ones may wait for room
    in CUDA's launch queue, the device's pace. Here CUDA events are stand-ins on the host's clock and a call takes
    2 ms while the queue has room, then 30 ms, as if waiting for it."""
    import time as clock

    class Event:  # torch.cuda.Event's interface, on the host's clock
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = clock.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)
    calls = []

    def step():
        clock.sleep(0.002 if len(calls) < bench.HOST_TIMED_CALLS else 0.030)
        calls.append(1)
    seconds, host = bench.timed_with_host(step, 10, torch.device("cuda"))
    assert len(calls) == 10
    assert 0.002 <= host < 0.010  # the first 4 calls' 2 ms each (and the loop's own microseconds)
    assert seconds >= (4 * 0.002 + 6 * 0.030) / 10  # the events bracket all 10
    cpu_seconds, cpu_host = bench.timed_with_host(step, 2, torch.device("cpu"))
    assert cpu_seconds == cpu_host >= 0.030


class FakeClock:
    """bench's time.perf_counter, on a clock that moves only when a test advances it: timings are then exact."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def test_timed_with_host_divides_each_clock_by_the_calls_it_timed(monkeypatch):
    """Exact arithmetic on a clock that moves only when a call runs. CUDA (events on the same clock): 10 calls, the
    first HOST_TIMED_CALLS of 2 ms and the rest of 30 ms, are the events' span over 10 per call and the host's 2 ms
    per queued call; with fewer calls than that, the host's time is over those calls. CPU: both are the wall time
    over the calls, 10, 30 and 20 ms giving 20 ms."""
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)

    class Event:  # torch.cuda.Event's interface, on the fake clock
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = clock.now

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    monkeypatch.setattr(torch.cuda, "Event", Event)

    def calls(*seconds):
        durations = iter(seconds)
        return lambda: clock.advance(next(durations))
    queued = bench.HOST_TIMED_CALLS
    seconds, host = bench.timed_with_host(calls(*[0.002] * queued, *[0.030] * (10 - queued)), 10,
                                          torch.device("cuda"))
    assert seconds == pytest.approx((queued * 0.002 + (10 - queued) * 0.030) / 10)
    assert host == pytest.approx(0.002)
    assert bench.timed_with_host(calls(0.004, 0.006), 2, torch.device("cuda")) == pytest.approx((0.005, 0.005))
    assert bench.timed_with_host(calls(0.010, 0.030, 0.020), 3, torch.device("cpu")) == pytest.approx((0.020, 0.020))
    assert bench.timed(calls(0.010, 0.030, 0.020), 3, torch.device("cpu")) == pytest.approx(0.020)


def test_matmul_peak_is_two_n_cubed_flops_over_the_median_repeat(monkeypatch):
    """An (n, n) by (n, n) product is n^3 multiply-adds, 2 n^3 FLOPs; the rate is taken at the median of the
    repeats' seconds per product (0.5, 0.1 and 0.2 s here: 0.2), after an untimed warm-up of 2 products whose
    time (9 s, the library's set-up) counts for nothing."""
    times, calls = iter([9.0, 0.5, 0.1, 0.2]), []

    def timed(fn, iters, device):
        calls.append(iters)
        return next(times)
    monkeypatch.setattr(bench, "timed", timed)
    peak = bench.matmul_peak(torch.device("cpu"), 3, torch.float32)
    assert calls == [2, 3, 3, 3]  # warm-up, then PEAK_MATMUL_ITERS["cpu"] products in each repeat
    assert (peak["dtype"], peak["size"]) == ("float32", 1024)
    assert peak["tflops"] == pytest.approx(2 * 1024 ** 3 / 0.2 / 1e12)


@pytest.mark.parametrize("warmup_step_s, compile_s", [(0.25, 0.75 - 3 * 0.020), (0.005, 0.0)])
def test_bench_phase_reports_the_median_repeat_and_the_rates_it_implies(monkeypatch, warmup_step_s, compile_s):
    """bench_phase's numbers from made-up timings on a clock that moves only when told: 3 warm-up steps of 0.25 s,
    3 repeats at 10, 40 and 20 ms per step (the host's 4, 1 and 2 ms), an epoch of 24 images (3 steps of 8) in
    0.6 s, 10^9 forward FLOPs per image and a 4 TFLOP/s peak. The median repeat is 20 ms: 400 images/s, 1.2 TFLOP/s
    of training (3 forwards), 30% of the peak; the compile estimate is the warm-up less 3 steps at that rate, and 0
    when warm-up steps of 5 ms (nothing compiled, a noisy clock) outrun the timed ones, not a negative time that the
    projection would subtract. Each step of 2 chunks adds its chunks' mean losses, 0.25 each, to the device-side
    sum. The input work alone, on one batch, is the median of its repeats too, in ms: 3, 1 and 2 ms (eager: 9, 5 and
    7 ms). Each step gets the lr of its step of a warmup-cosine schedule over the 10 steps: as in training, the lr
    changes every step."""
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    repeats = iter([(0.010, 0.004), (0.040, 0.001), (0.020, 0.002)])

    def timed_with_host(fn, iters, device):
        for _ in range(iters):
            fn()
        return next(repeats)
    monkeypatch.setattr(bench, "timed_with_host", timed_with_host)
    input_s, inputs = {"compiled": iter([0.003, 0.001, 0.002]), "eager": iter([0.009, 0.005, 0.007])}, []

    def timed(fn, iters, device):
        fn()
        return next(input_s[inputs[-1][0]])
    monkeypatch.setattr(bench, "timed", timed)
    batches, lrs = [], []

    def step(model, optimizer, scaler, batch_idx, lr, loss_sum, amp_dtype, graphs):
        batches.append(len(batch_idx))
        lrs.append(lr)
        clock.advance(warmup_step_s)
        loss_sum.add_(2 * 0.25)
    phase = bench.Phase("pretrain", torch.nn.Linear(2, 2), lambda net: torch.optim.SGD(net.parameters(), lr=0.1),
                        0.1, 8, step, 10 ** 9, inputs=lambda idx: inputs.append(("compiled", len(idx))),
                        inputs_eager=lambda idx: inputs.append(("eager", len(idx))),
                        epoch=lambda *_: clock.advance(0.6))
    args = SimpleNamespace(compile=False, capture_step=False, warmup_steps=3, repeats=3, steps=2, profile=False,
                           seed=0, epoch_images=24, max_device_batch_size=4)
    cpu = torch.device("cpu")
    r = bench.bench_phase(phase, args, cpu, cpu, None, 4.0)
    assert batches == [8] * (3 + 3 * 2 + 1)  # warm-up, the repeats, the host-sync check
    # The lr changes every step as in training: warmup over 5 of the 10 steps (min(10, 10 // 2)), then cosine.
    assert lrs == pytest.approx(warmup_cosine_lrs(0.1, 5, 10))
    assert (r["phase"], r["batch_size"], r["chunk"]) == ("pretrain", 8, 4)
    assert r["ms_per_step_repeats"] == pytest.approx([10.0, 40.0, 20.0])
    assert r["ms_per_step"] == pytest.approx(20.0) and r["host_ms_per_step"] == pytest.approx(2.0)
    assert r["images_per_sec"] == pytest.approx(400.0)
    assert (r["flops_per_image_forward"], r["flops_per_image_train"]) == (10 ** 9, 3 * 10 ** 9)
    assert r["tflops"] == pytest.approx(1.2) and r["percent_of_peak"] == pytest.approx(30.0)
    assert r["warmup_s"] == pytest.approx(3 * warmup_step_s) and r["compile_s"] == pytest.approx(compile_s)
    assert (r["epoch_steps"], r["epoch_s"]) == (3, pytest.approx(0.6))
    assert r["epoch_ms_per_step"] == pytest.approx(200.0)
    assert r["mean_loss"] == pytest.approx(0.25)
    assert inputs == [("compiled", 8)] * 4 + [("eager", 8)] * 4  # one untimed call each, then the 3 repeats
    assert r["input_ms_per_step"] == pytest.approx(2.0) and r["input_ms_per_step_eager"] == pytest.approx(7.0)
    assert r["host_syncs"] == [] and r["peak_memory_gib"] is None


@pytest.mark.parametrize("finetune_batch_size, finetune_chunk", [(16, 8), (4, 4)])
def test_evaluations_are_timed_as_the_median_of_three_and_scaled_to_the_reference(monkeypatch, finetune_batch_size,
                                                                                  finetune_chunk):
    """Each script's evaluation runs once untimed, then three timed times (even with 5 repeats), the median kept;
    the monitor's kNN bank is 5x the val images. The seconds scale linearly to the reference's 10,000 val images
    (2,500x the 4 here), for its 6 monitor evaluations and 2 x 50 val passes. The scripts' evaluate functions are
    stand-ins that take made-up seconds on a clock that moves only when told. Each gets what its script passes: the
    monitor the training chunk as --max_device_batch_size (it takes its evaluation chunk from that), the val pass
    the evaluation chunk itself, 4x (utils.EVAL_CHUNK_FACTOR) the fine-tuning chunk: 8 for a batch of 16 in two
    chunks, and the whole batch of 4 when it is smaller than --max_device_batch_size 8 (as the reference's 128 under
    256: train_classifier.py is run with --max_device_batch_size 128), with data.normalize as the script's val
    pass."""
    clock = FakeClock()
    monkeypatch.setattr(bench, "time", clock)
    monitor_s, val_pass_s, seen = iter([100.0, 3.0, 1.0, 2.0, 50.0, 50.0]), iter([100.0, 0.4, 0.1, 0.2, 9.0, 9.0]), []
    val_passes = []

    def monitor(model, bank, val, val_noise, script_args, *_):
        seen.append((len(bank), len(val), tuple(val_noise.shape), script_args.max_device_batch_size))
        clock.advance(next(monitor_s))

    def val_pass(net, inputs, labels, prepare, batch_size, *_):
        val_passes.append((len(inputs), len(labels), prepare, batch_size))
        clock.advance(next(val_pass_s))
    monkeypatch.setattr(bench.mae_pretrain, "evaluate", monitor)
    monkeypatch.setattr(bench.train_classifier, "evaluate", val_pass)
    cfg = MAEConfig(patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                    decoder_num_heads=2)
    images, labels = torch.zeros(40, 3, 32, 32, dtype=torch.uint8), torch.zeros(40, dtype=torch.long)
    args = SimpleNamespace(eval_images=4, num_classes=10, seed=0, max_device_batch_size=8,
                           finetune_batch_size=finetune_batch_size, repeats=5)
    cpu = torch.device("cpu")
    e = bench.bench_evaluation(cfg, images, labels, args, cpu, cpu, None)
    assert seen == [(20, 4, (4, cfg.num_patches), 8)] * 4
    assert val_passes == [(4, 4, bench.data.normalize, utils.EVAL_CHUNK_FACTOR * finetune_chunk)] * 4
    assert (e["val_images"], e["bank_images"], e["scale_to_reference"]) == (4, 20, 2500.0)
    assert e["pretrain_eval_s"] == pytest.approx(2.0) and e["finetune_eval_s"] == pytest.approx(0.2)
    assert e["reference_seconds"] == pytest.approx(2500 * (6 * 2.0 + 100 * 0.2))


def test_projection_counts_the_reference_steps_compilations_evaluations_and_flops():
    """The reference experiment at made-up step times: 150 epochs of 50,000 // 500 = 100 pretraining steps at the
    epoch's 40 ms (not the bare step's 30), 2 x 50 epochs of 50,000 // 250 = 200 fine-tuning steps at 10 ms: 800 s.
    Compilation: the pretraining's 30 s, the first fine-tune's 20 s and the second's 5 s as measured, or 20 s again
    when it was not. Evaluation: its 120 s. Training FLOPs: 15,000 steps x 500 images x 6 GFLOP + 20,000 x 250 x
    3 GFLOP = 60 PFLOP, 2 minutes at a 500 TFLOP/s peak; the input work, 2 ms of 20,000 steps, 40 s at most."""
    pretrain = {"batch_size": 500, "ms_per_step": 30.0, "epoch_ms_per_step": 40.0, "compile_s": 30.0,
                "flops_per_image_train": 6e9}
    finetune = {"batch_size": 250, "ms_per_step": 8.0, "epoch_ms_per_step": 10.0, "compile_s": 20.0,
                "flops_per_image_train": 3e9, "input_ms_per_step": 2.0}
    evaluation = {"reference_seconds": 120.0}
    p = bench.project_reference(pretrain, finetune, evaluation, 500.0, second_compile_s=5.0)
    assert (p["pretrain_steps"], p["finetune_steps"]) == (150 * 100, 2 * 50 * 200)
    assert p["steps_minutes"] == pytest.approx(800 / 60)
    assert p["compile_minutes"] == pytest.approx((30 + 20 + 5) / 60) and p["second_finetune_compile_s"] == 5.0
    assert p["evaluation_minutes"] == pytest.approx(2.0)
    assert p["minutes"] == pytest.approx((800 + 55 + 120) / 60)
    assert p["total_pflop"] == pytest.approx(60.0) and p["floor_minutes_at_peak"] == pytest.approx(2.0)
    assert p["finetune_input_minutes_at_most"] == pytest.approx(40 / 60)
    unmeasured = bench.project_reference(pretrain, {**finetune, "input_ms_per_step": None}, evaluation, 500.0)
    assert unmeasured["compile_minutes"] == pytest.approx((30 + 20 + 20) / 60)
    assert unmeasured["second_finetune_compile_s"] is None and unmeasured["finetune_input_minutes_at_most"] is None
    # At the reference batches the last partial batch of each epoch is dropped, as the scripts drop it: 50,000 // 512
    # = 97 and 50,000 // 128 = 390 steps per epoch (14,550 and 39,000 in all, the README's counts).
    reference = bench.project_reference({**pretrain, "batch_size": 512}, {**finetune, "batch_size": 128}, evaluation,
                                        500.0)
    assert (reference["pretrain_steps"], reference["finetune_steps"]) == (14_550, 39_000)


def stand_in_profiler(averages, events=(), activities_seen=None):
    """A stand-in for torch.profiler.profile whose key_averages() and events() hold the given made-up records;
    it notes the activities it was asked for in activities_seen."""
    class Profile:
        def __init__(self, activities):
            if activities_seen is not None:
                activities_seen.extend(activities)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self):
            return averages

        def events(self):
            return list(events)
    return Profile


def test_device_time_profile_gives_each_operators_self_time_per_step_largest_first(monkeypatch):
    """Per step of 4: each operator's self time (the profiler's microseconds, in ms) and launches, largest first,
    those with no self time left out; each summed under its kind, the busy time their sum; the listed names cut to
    PROFILE_NAME_CHARS, the JSON's whole. The profiler is a stand-in holding made-up events."""
    attention = "fmha_cutlassF_" + "k" * 100
    events = [SimpleNamespace(key="aten::add_", self_cpu_time_total=400.0, count=4),
              SimpleNamespace(key="aten::mm", self_cpu_time_total=8000.0, count=8),
              SimpleNamespace(key="aten::empty", self_cpu_time_total=0.0, count=12),
              SimpleNamespace(key=attention, self_cpu_time_total=2000.0, count=4)]

    monkeypatch.setattr(torch.profiler, "profile", stand_in_profiler(events))
    ran = []
    prof = bench.device_time_profile(lambda: ran.append("steps"), 4, torch.device("cpu"))
    assert ran == ["steps"] and prof["what"] == "CPU operators"
    assert prof["busy_ms_per_step"] == pytest.approx(2.6)
    assert prof["top"] == [["aten::mm", pytest.approx(2.0)], [attention[:bench.PROFILE_NAME_CHARS], pytest.approx(0.5)],
                           ["aten::add_", pytest.approx(0.1)]]
    assert prof["kinds_ms_per_step"] == pytest.approx({"matrix products": 2.0, "inductor's fused kernels": 0.0,
                                                       "attention": 0.5, "other": 0.1})
    assert prof["all"] == [
        {"name": "aten::mm", "kind": "matrix products", "ms_per_step": pytest.approx(2.0), "calls_per_step": 2.0},
        {"name": attention, "kind": "attention", "ms_per_step": pytest.approx(0.5), "calls_per_step": 1.0},
        {"name": "aten::add_", "kind": "other", "ms_per_step": pytest.approx(0.1), "calls_per_step": 1.0}]


def profiler_record(name, parent=None, kernels=()):
    """A CPU record of torch.profiler's events(): its name, the record around it, the kernels it launched."""
    return SimpleNamespace(name=name, cpu_parent=parent,
                           kernels=[SimpleNamespace(name=k, device=0, duration=1.0) for k in kernels])


def test_kernel_launchers_name_each_kernels_operator_and_outermost_record_per_step():
    """Each kernel's launches per step by (innermost record, outermost record), the most first; records that
    launched nothing, and kernels nobody launched, are absent."""
    backward = profiler_record("autograd::engine::evaluate_function: CompiledFunctionBackward")
    graph_call = profiler_record("## Call CompiledFxGraph abc ##", backward)
    optimizer = profiler_record("Optimizer.step#AdamW.step")
    events = [backward, graph_call,
              *(profiler_record("aten::sum", graph_call, ["reduce_kernel"]) for _ in range(6)),
              profiler_record("aten::sum", profiler_record("aten::mean", optimizer), ["reduce_kernel"]),
              profiler_record("aten::_fused_adamw_", optimizer, ["FusedOptimizer", "FusedOptimizer"]),
              profiler_record("aten::mm", None, ["nvjet"]), optimizer, profiler_record("aten::empty")]
    launchers = bench.kernel_launchers(events, steps=2)
    assert launchers == {
        "reduce_kernel": [["aten::sum", backward.name, 3.0], ["aten::sum", optimizer.name, 0.5]],
        "FusedOptimizer": [["aten::_fused_adamw_", optimizer.name, 1.0]],
        "nvjet": [["aten::mm", "aten::mm", 0.5]]}


def test_device_time_profile_on_a_gpu_times_kernels_alone_and_says_who_launched_them(monkeypatch):
    """On CUDA the host's records are profiled too, to name each kernel's launcher (launched_by in the JSON) and
    to time the host's side (host_records), but only the kernels' records are summed: an operator's device time is
    its kernels', and an annotation's span on the device is theirs too, counted once. The profiler is a stand-in; the
    device is never touched."""
    from torch.autograd import DeviceType
    host, device = DeviceType.CPU, DeviceType.CUDA
    def record(key, device_us, count, device_type, cpu_us=0.0, self_cpu_us=0.0, annotation=False):  # key_averages'
        return SimpleNamespace(key=key, self_device_time_total=device_us, count=count, device_type=device_type,
                               cpu_time_total=cpu_us, self_cpu_time_total=self_cpu_us, is_user_annotation=annotation)
    averages = [record("aten::sum", 300.0, 2, host, cpu_us=40.0, self_cpu_us=30.0),
                record("reduce_kernel", 300.0, 2, device),
                record("nvjet_gemm", 900.0, 4, device),
                # the span of the optimizer's kernels on the device's timeline, which is no kernel of its own
                record("Optimizer.step#AdamW.step", 1500.0, 2, device, annotation=True),
                record("TorchDynamo Cache Lookup", 0.0, 2, host, cpu_us=600.0, self_cpu_us=600.0),
                record("aten::empty", 0.0, 2, host, cpu_us=1.0, self_cpu_us=1.0)]
    backward = profiler_record("CompiledFunctionBackward")
    events = [backward, profiler_record("aten::sum", backward, ["reduce_kernel", "reduce_kernel"])]
    profiled = []
    monkeypatch.setattr(torch.profiler, "profile", stand_in_profiler(averages, events, profiled))
    monkeypatch.setattr(bench, "synchronize", lambda device: None)
    prof = bench.device_time_profile(lambda: None, 2, torch.device("cuda"))
    assert set(profiled) == {torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA}
    assert prof["what"] == "CUDA kernels" and prof["busy_ms_per_step"] == pytest.approx(0.6)
    assert prof["all"] == [
        {"name": "nvjet_gemm", "kind": "matrix products", "ms_per_step": pytest.approx(0.45), "calls_per_step": 2.0,
         "launched_by": []},
        {"name": "reduce_kernel", "kind": "other", "ms_per_step": pytest.approx(0.15), "calls_per_step": 1.0,
         "launched_by": [["aten::sum", "CompiledFunctionBackward", 1.0]]}]
    # the host's records, by their time with what runs inside them, those under a microsecond a step left out
    assert prof["host_records"] == [
        {"name": "TorchDynamo Cache Lookup", "cpu_ms_per_step": pytest.approx(0.3),
         "self_cpu_ms_per_step": pytest.approx(0.3), "calls_per_step": 1.0},
        {"name": "aten::sum", "cpu_ms_per_step": pytest.approx(0.02), "self_cpu_ms_per_step": pytest.approx(0.015),
         "calls_per_step": 1.0}]


def test_host_time_profile_times_each_function_per_step_with_the_device_idle_before_each_step(monkeypatch):
    """cProfile's self and cumulative time per step of every function and built-in, largest self time first; it
    waits for the device before each step and after the last, outside the profile."""
    waits, steps = [], []
    monkeypatch.setattr(bench, "synchronize", lambda device: waits.append(len(steps)))

    def inner():
        time.sleep(0.003)

    def run_step():
        steps.append(1)
        inner()
    prof = bench.host_time_profile(run_step, 3, torch.device("cpu"))
    assert waits == [0, 1, 2, 3]
    by_name = {e["name"].split(" (")[0]: e for e in prof["all"]}
    sleep, wrapper = by_name["<built-in method time.sleep>"], by_name["inner"]
    assert sleep["calls_per_step"] == wrapper["calls_per_step"] == by_name["run_step"]["calls_per_step"] == 1
    assert sleep["self_ms_per_step"] >= 3 * 0.95 and sleep["cumulative_ms_per_step"] == sleep["self_ms_per_step"]
    assert wrapper["self_ms_per_step"] < sleep["self_ms_per_step"] <= wrapper["cumulative_ms_per_step"]
    assert wrapper["name"].startswith("inner (test_bench.py:")  # a file outside any package: its name
    assert prof["top_self"][0] == [sleep["name"], sleep["self_ms_per_step"]]
    assert prof["top_cumulative"][0][0].startswith("run_step (test_bench.py:")
    assert prof["ms_per_step"] >= sum(e["self_ms_per_step"] for e in prof["all"])


@pytest.mark.parametrize("where, name", [
    (("~", 0, "<method 'item' of 'torch._C.TensorBase' objects>"), "<method 'item' of 'torch._C.TensorBase' objects>"),
    (("/venv/lib/python3.11/site-packages/torch/_inductor/cudagraph_trees.py", 12, "run"),
     "run (torch/_inductor/cudagraph_trees.py:12)"),
    (("/usr/lib/python3/dist-packages/a/site-packages/b/c.py", 3, "f"), "f (b/c.py:3)"),  # the last such folder
    (("/home/user/repo/utils.py", 404, "backward"), "backward (utils.py:404)")])
def test_host_function_names_keep_the_package_path_or_the_files_name(where, name):
    assert bench.host_function_name(*where) == name


def test_cpu_command_runs_in_seconds_and_its_numbers_agree(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench.py"), "--device", "cpu", "--json", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # as the one_thread fixture
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["command"] == f"python bench.py --device cpu --json {out}"
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:  # a git checkout, as CI's clone: the JSON names its commit
        assert r["code"] in (commit.stdout.strip(), commit.stdout.strip() + "+changes")
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["python"] == platform.python_version()
    assert set(r["versions"]) == {"torch", "cuda", "cudnn", "triton", "python"}
    assert r["compile"] is False and r["config"]["preset"] == "small" and r["config"]["compile_mode"] == "default"
    cfg = MAEConfig(**r["model"])
    peak = r["matmul_peak"]["tflops"]
    assert peak > 0
    expected_forward = {"pretrain": sum(bench.mae_forward_flops(cfg).values()),
                        "finetune": sum(bench.classifier_forward_flops(cfg, 10).values())}
    # the JSON's FLOPs by part: each phase's own model
    assert r["flops_per_image_forward"] == {"pretrain": bench.mae_forward_flops(cfg),
                                            "finetune": bench.classifier_forward_flops(cfg, 10)}
    for name in ("pretrain", "finetune"):
        p = r[name]
        assert p["flops_per_image_forward"] == expected_forward[name]
        assert p["flops_per_image_train"] == 3 * expected_forward[name]
        assert p["ms_per_step"] > 0 and p["images_per_sec"] > 0 and np.isfinite(p["mean_loss"])
        assert len(p["ms_per_step_repeats"]) == r["config"]["repeats"]
        assert p["ms_per_step"] == pytest.approx(np.median(p["ms_per_step_repeats"]))
        assert 0 < p["host_ms_per_step"]  # on the CPU the host runs the step: its median time, taken apart
        assert p["images_per_sec"] == pytest.approx(p["batch_size"] / (p["ms_per_step"] / 1e3))
        assert p["tflops"] == pytest.approx(p["flops_per_image_train"] * p["images_per_sec"] / 1e12)
        assert p["percent_of_peak"] == pytest.approx(100 * p["tflops"] / peak)
        assert p["compile_s"] >= 0
        # The recipe's augmentation, mixup, accumulation and fused AdamW queue a whole step without reading
        # anything back (HostSyncRecorder is tested below).
        assert p["host_syncs"] == []
        assert p["profile"] is None and p["host_profile"] is None  # --profile only
        # One epoch of the script's own loop over the first 256 images: 4 steps of 64, 8 of 32.
        assert p["epoch_steps"] == 256 // p["batch_size"] and p["epoch_s"] > 0
        assert p["epoch_ms_per_step"] == pytest.approx(p["epoch_s"] / p["epoch_steps"] * 1e3)
    assert (r["pretrain"]["batch_size"], r["pretrain"]["chunk"], r["finetune"]["batch_size"]) == (64, 32, 32)
    # The fine-tuning step's input work (take, augment, mix) is timed on its own; the pretraining's is not. Nothing
    # is compiled, so there is no eager time to set beside it.
    assert r["pretrain"]["input_ms_per_step"] is None and r["finetune"]["input_ms_per_step"] > 0
    assert r["pretrain"]["input_ms_per_step_eager"] is None and r["finetune"]["input_ms_per_step_eager"] is None

    # Evaluations timed on 64 val images (and a 320-image kNN bank), scaled to 10,000: mae_pretrain.py's monitor
    # at epochs 25, 50, ..., 150 and a val pass after each of the 2 x 50 fine-tuning epochs.
    e = r["evaluation"]
    assert (e["val_images"], e["bank_images"], e["scale_to_reference"]) == (64, 320, 10_000 / 64)
    assert e["pretrain_eval_s"] > 0 and e["finetune_eval_s"] > 0
    eval_s = 10_000 / 64 * (6 * e["pretrain_eval_s"] + 100 * e["finetune_eval_s"])

    # 150 epochs of 50,000 // 64 steps, then 2 x 50 epochs of 50,000 // 32 steps, each at the step time of the
    # scripts' loops, plus three compilations and the evaluations.
    proj = r["projection"]
    assert (proj["pretrain_steps"], proj["finetune_steps"]) == (150 * 781, 100 * 1562)
    minutes = (150 * 781 * r["pretrain"]["epoch_ms_per_step"]
               + 100 * 1562 * r["finetune"]["epoch_ms_per_step"]) / 1e3 / 60 \
        + (r["pretrain"]["compile_s"] + 2 * r["finetune"]["compile_s"]) / 60 + eval_s / 60
    assert proj["evaluation_minutes"] == pytest.approx(eval_s / 60)
    assert proj["minutes"] == pytest.approx(minutes) and proj["minutes"] > 0
    assert proj["finetune_input_minutes_at_most"] == pytest.approx(
        100 * 1562 * r["finetune"]["input_ms_per_step"] / 1e3 / 60)

    # The printed report says the same numbers.
    printed = re.search(r"projected wall time of the reference experiment: ([\d.]+) min", proc.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(proj["minutes"], abs=0.05)
    row = re.search(r"^pretrain +64 +32 +[\d.]+ +([\d.]+) +([\d,]+) .* ([\d.]+)$", proc.stdout, re.M)
    assert row and float(row.group(1)) == pytest.approx(r["pretrain"]["ms_per_step"], abs=0.005)
    assert float(row.group(3)) == pytest.approx(r["pretrain"]["epoch_ms_per_step"], abs=0.005)
    assert f"pretrain forward {expected_forward['pretrain'] / 1e9:.4f}" in proc.stdout
    printed = re.search(r"fine-tuning input work alone .*: ([\d.]+) ms per step", proc.stdout)
    assert printed and float(printed.group(1)) == pytest.approx(r["finetune"]["input_ms_per_step"], abs=0.005)


@pytest.mark.parametrize("batches, note", [
    ((64, 32), "; NOTE: at batch sizes (64, 32), the reference's are (512, 128)"), ((512, 128), "")])
def test_the_printed_report_gives_the_projection_the_input_shares_and_a_note_off_the_reference_batches(
        monkeypatch, capsys, batches, note):
    """bench.main's printed lines from made-up timings (the peak, each phase and the evaluations are stand-ins): the
    fine-tuning input work's 2 ms is 25% of the 8 ms timed step (not of the 10 ms epoch step); the projection is
    150 x 50,000 // B1 pretraining steps at the epoch's 40 ms, 2 x 50 x 50,000 // B2 fine-tuning steps at 10 ms,
    30 + 20 + 20 s of compilation and 600 s of evaluation, written out longhand here; a note names batch sizes
    other than the reference's 512 and 128, and only those."""
    monkeypatch.setattr(bench, "matmul_peak", lambda *_: {"dtype": "float32", "size": 1024, "tflops": 1.0})

    def bench_phase(phase, args, *_):
        times = {"pretrain": (30.0, 40.0, 30.0), "finetune": (8.0, 10.0, 20.0)}[phase.name]
        return {"phase": phase.name, "batch_size": phase.batch_size, "chunk": bench.chunk_size(phase.batch_size, args),
                "ms_per_step": times[0], "epoch_ms_per_step": times[1], "compile_s": times[2], "images_per_sec": 1.0,
                "tflops": 0.5, "percent_of_peak": 50.0, "peak_memory_gib": None, "host_syncs": [],
                "flops_per_image_train": 1e9, "input_ms_per_step": 2.0 if phase.name == "finetune" else None,
                "input_ms_per_step_eager": None, "profile": None, "host_profile": None}
    monkeypatch.setattr(bench, "bench_phase", bench_phase)
    monkeypatch.setattr(bench, "bench_evaluation", lambda *_: {
        "val_images": 64, "bank_images": 320, "pretrain_eval_s": 1.0, "finetune_eval_s": 0.1,
        "scale_to_reference": 10_000 / 64, "reference_seconds": 600.0})
    bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--pretrain_batch_size", str(batches[0]),
                                                   "--finetune_batch_size", str(batches[1])]))
    printed = capsys.readouterr().out
    assert re.search(r"fine-tuning input work alone .*: 2\.00 ms per step, 25% of the step; ", printed)
    pretrain_steps, finetune_steps = 150 * (50_000 // batches[0]), 2 * 50 * (50_000 // batches[1])
    minutes = (pretrain_steps * 0.040 + finetune_steps * 0.010 + 30 + 20 + 20 + 600) / 60
    line = next(line for line in printed.splitlines() if line.startswith("projected wall time"))
    assert line.startswith(f"projected wall time of the reference experiment: {minutes:.1f} min = 150 x "
                           f"{50_000 // batches[0]} pretraining steps + 2 x 50 x {50_000 // batches[1]} fine-tuning "
                           "steps")
    assert line.endswith(f"6 monitor evaluations and 100 val passes at 10,000 val images (10.0 min){note}")


def test_host_sync_recorder_flags_what_makes_the_host_wait_and_nothing_else():
    x, idx = torch.randn(8, 4), torch.tensor([0, 2, 5])
    syncing = [
        ("_local_scalar_dense", lambda: x.sum().item()),
        ("_local_scalar_dense", lambda: bool(x[0, 0] > 0)),  # as `if tensor:` does
        ("nonzero", lambda: torch.nonzero(x > 0)),
        ("masked_select", lambda: torch.masked_select(x, x > 0)),
        ("index (boolean mask)", lambda: x[x[:, 0] > 0]),
        ("index_put_ (boolean mask)", lambda: x.clone().index_put_((x > 0,), torch.tensor(0.0))),
        ("repeat_interleave", lambda: torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]))),
        ("_unique2", lambda: torch.unique(idx, return_inverse=True)),
        ("bincount", lambda: torch.bincount(idx)),  # its length is the largest index
        ("equal", lambda: torch.equal(x, x)),  # a Python bool
        # The meta device stands in for a GPU: a blocking copy to it, or one from pageable memory, is flagged.
        ("_to_copy to the device, blocking", lambda: x.to("meta")),
        ("_to_copy to the device, blocking", lambda: torch.tensor(0.5).to("meta")),
        ("_to_copy from unpinned host memory", lambda: x.to("meta", non_blocking=True)),
        ("copy_ to the device, blocking", lambda: torch.empty(8, 4, device="meta").copy_(x)),
        ("copy_ from unpinned host memory", lambda: torch.empty(8, 4, device="meta").copy_(x, non_blocking=True)),
    ]
    for expected, fn in syncing:
        with bench.HostSyncRecorder() as recorder:
            fn()
        assert expected in recorder.syncs, (expected, recorder.syncs)
    with bench.HostSyncRecorder() as recorder:  # the sync-free forms of the same operations
        torch.where(x > 0, x, 0.0)
        x[idx]
        x.masked_fill(x > 0, 0.0)
        torch.arange(3).repeat_interleave(2)
        torch.arange(3).repeat_interleave(torch.tensor([1, 2, 3]), output_size=6)
        x.argsort(dim=1).gather(1, torch.zeros(8, 1, dtype=torch.long))
    assert recorder.syncs == []


def test_only_the_batch_sizes_of_the_phases_timed_are_checked(capsys):
    """--phases finetune with chunks of 31 runs, though the default pretraining batch (64) is not a multiple of 31:
    that phase is not timed. Both phases check both batch sizes, and --epoch_images' floor is the timed phases'."""
    argv = ["--device", "cpu", "--finetune_recipe", "plain", "--finetune_batch_size", "31",
            "--max_device_batch_size", "31"]
    def check(*flags):
        args = bench.get_args_parser().parse_args([*argv, *flags])
        bench.resolve_defaults(args, torch.device("cpu"))
        bench.check_args(args)
    check("--phases", "finetune", "--epoch_images", "31")
    assert capsys.readouterr().err == ""
    for phases, expected in (("both", "--pretrain_batch_size 64 is not divisible by --max_device_batch_size 31"),
                             ("finetune", "--epoch_images must be in [31, 50,000]")):
        with pytest.raises(SystemExit) as exc:
            check("--phases", phases, "--epoch_images", "30")
        assert exc.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--warmup_steps", "0"], "--warmup_steps must be >= 1"),
    (["--pretrain_batch_size", "48", "--max_device_batch_size", "32"],
     "--pretrain_batch_size 48 is not divisible by --max_device_batch_size 32"),
    (["--finetune_batch_size", "60000"], "--finetune_batch_size must be at most"),
    # one past each upper bound: the bound's own check says so, not a later one that it happens to trip
    (["--pretrain_batch_size", "50001"], "--pretrain_batch_size must be at most the 50,000 images of CIFAR-10, got "
                                         "50001"),
    (["--epoch_images", "50001"], "--epoch_images must be in [64, 50,000]"),
    (["--mask_ratio", "1.0"], "--mask_ratio must be in (0, 1)"),
    (["--mask_ratio", "0.01"], "--mask_ratio 0.01 masks none of the"),  # the loss would be a mean over no patch
    (["--eval_images", "0"], "--eval_images must be >= 1"),
    (["--epoch_images", "0"], "--epoch_images must be in [64, 50,000]"),  # its one range, not ">= 1" first
    # no mask ratio in (0, 1) masks one patch of one: the flag to change is --patch_size
    (["--patch_size", "32"], "--patch_size 32 cuts the 32x32 image into 1 patch, but the MAE hides some patches and "
                             "shows others: pass at most 16"),
    (["--compile_cache", "shared"], "--compile_cache shared needs compilation, which is off"),
    (["--epoch_images", "32"], "--epoch_images must be in [64, 50,000]"),  # less than a pretraining batch
    (["--eval_images", "10001"], "--eval_images must be at most the reference's 10,000"),
    (["--embed_dim", "64", "--num_heads", "3"], "--embed_dim 64 must be divisible by --num_heads 3"),
    (["--embed_dim", "400000"], "parameters need"),  # terabytes: more than any machine's memory
    # /proc: root passes os.access there, but no file can be made (another user is refused by os.access first)
    (["--json", "/proc/out.json"], "--json: cannot write in"),
    # attention runs at the model's shapes only after the size check (one head's queries: 26 GB)
    (["--embed_dim", "100000000", "--num_heads", "1"], "parameters need"),
    (["--embed_dim", str(2 ** 40), "--num_heads", "1"], "no such model can be built"),  # past int64, even on meta
    (["--compile_mode", "reduce-overhead", "--no-compile"],
     "--compile_mode reduce-overhead needs compilation, which is off"),
    (["--compile_mode", "max-autotune"], "--compile_mode max-autotune needs compilation"),  # off by default on CPU
    (["--compile_scope", "blocks"], "--compile_scope blocks needs compilation"),
    (["--inductor", "coordinate_descent_tuning=true"], "--inductor needs compilation"),
    (["--compile", "--inductor", "nope=1"], "torch._inductor.config has no setting 'nope'"),
    (["--compile", "--inductor", "coordinate_descent_tuning=maybe"],
     "coordinate_descent_tuning takes bool values, not 'maybe'"),
    (["--compile", "--inductor", "unroll_reductions_threshold=2.5"],
     "unroll_reductions_threshold takes int values, not '2.5'"),
    (["--precision", "fp16"], "--precision fp16 needs --device cuda"),
    (["--json", "/nonexistent/dir/bench.json"], "--json"),
    (["--json", "bench.txt"], "--json must name a .json file, got 'bench.txt'"),
    (["--mask_ratio", "nan"], "argument --mask_ratio: must be a finite number, got 'nan'"),
    (["--seed", "99999999999999999999"], "--seed must be in [0, 2^31)"),
    (["--finetune_batch_size", "31"], "--finetune_batch_size 31 gives chunks of 31"),
    (["--device", "meta"], "--device must be cuda, cuda:N or cpu, got 'meta'"),
    (["--device", "cpu:1"], "--device must be cuda, cuda:N or cpu, got 'cpu:1'"),  # torch has one CPU device
    (["--attention", "cudnn"], "--attention cudnn cannot run on cpu"),  # a CUDA kernel
    (["--capture_step"], "--capture_step captures CUDA graphs: it needs a CUDA device, not cpu"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
])
def test_bad_flags_are_one_line_and_status_2(flags, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--json", "out.json", *flags]))
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and expected in captured.err
    assert captured.out == "" and os.listdir(tmp_path) == []


def test_json_replaces_an_earlier_result_only(tmp_path, capsys):
    """--json replaces an earlier bench.py result; another file under its name (a training script's args.json or
    summary, named by a slip) is refused in one line, exit status 2, and stays as it was, as the training scripts
    replace only their own checkpoints. Checked before any timing."""
    args_json = tmp_path / "args.json"
    args_json.write_text('{"seed": 42, "batch_size": 512}')
    earlier = tmp_path / "bench.json"
    earlier.write_text(json.dumps({"command": "python bench.py --device cpu", "matmul_peak": {}}))
    for path in (earlier, tmp_path / "new.json"):  # its own, replaced; nothing there
        utils.check_replaces_own("--json", str(path), bench.is_a_result, "a bench.py result", load=bench.load_json)
    for path in (args_json, tmp_path / "notes.json"):
        path.write_text(path.read_text() if path.exists() else "not JSON")
        before = path.read_bytes()
        with pytest.raises(SystemExit) as exc:
            bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--json", str(path)]))
        assert exc.value.code == 2 and path.read_bytes() == before
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.strip().endswith(
            f"--json {str(path)!r} is a file but not a bench.py result, and this run would replace it: choose another "
            "name, or move that file")


def test_capture_step_needs_warm_up_steps_that_hold_the_capture(capsys):
    """With --capture_step the step after StepGraphs' eager ones captures the graphs: it must fall in the warm-up,
    not in the timed steps. (On a CPU resolve_runtime refuses --capture_step itself, so the check is asked here.)"""
    args = bench.get_args_parser().parse_args(["--device", "cpu", "--warmup_steps", str(utils.StepGraphs.WARMUP)])
    bench.resolve_defaults(args, torch.device("cpu"))
    args.capture_step = True  # as on a CUDA device
    with pytest.raises(SystemExit) as exc:
        bench.check_args(args)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--warmup_steps must be at least {utils.StepGraphs.WARMUP + 1} with --capture_step (on by default on CUDA; "
        "--no-capture_step turns it off), got 2")
    args.warmup_steps = utils.StepGraphs.WARMUP + 1
    bench.check_args(args)


def test_torchrun_is_refused_in_one_line(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as exc:
        bench.main(bench.get_args_parser().parse_args(["--device", "cpu", "--json", "out.json"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "run it with python, not torchrun (WORLD_SIZE=2)" in err
    assert os.listdir(tmp_path) == []


# bf16 keeps 8 significant bits: rounding a number changes it by up to 2^-8 (0.4%) of itself, so a bf16 number
# has 2 to 3 significant digits. An epoch's loss is a mean over ~300k squared errors (4 steps x 32 images x 48
# masked patches x 48 values) whose rounding errors largely cancel. At a fixed seed the two curves should therefore
# agree far more closely than one bf16 rounding of the loss. We ask for 2^-10 (about 1e-3), a quarter of one
# bf16 rounding. Measured on this test's runs (2026-11-28): at most 4.2e-5 eager, 3.2e-5 compiled, a 20x margin.
# A different seed moves the first epoch's loss by 1.4e-2, so the bound does tell runs apart.
BF16_RTOL = 2 ** -10


def test_bf16_loss_curve_stays_within_bf16_tolerance_of_fp32(tmp_path, run_pretrain):
    # The fast path as the GPU runs it: bf16 autocast, and bf16 with the model compiled by inductor (its C++
    # backend here, about 40 s of compilation; measured gap 3.2e-5). The model draws no random numbers (the
    # mask noise comes from train_step), so compiled and eager runs see the same masks.
    curves = {}
    for name, flags in (("fp32", ["--precision", "fp32"]), ("bf16", ["--precision", "bf16"]),
                        ("bf16_compiled", ["--precision", "bf16", "--compile"])):
        run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "4", "--base_learning_rate", "0.03", *flags,
                                        name=name))
        curves[name] = np.load(tmp_path / name / "outputs" / "losses.npy")
    fp32, bf16, compiled = curves["fp32"], curves["bf16"], curves["bf16_compiled"]
    assert len(fp32) == len(bf16) == len(compiled) == 4
    assert fp32[-1] < 0.98 * fp32[0]  # the model learns, so the curve is a trajectory and not one number
    assert not np.array_equal(fp32, bf16)  # autocast did run in bf16
    assert not np.array_equal(bf16, compiled)  # inductor's kernels, not eager's, ran
    np.testing.assert_allclose(bf16, fp32, rtol=BF16_RTOL)
    np.testing.assert_allclose(compiled, fp32, rtol=BF16_RTOL)

    run_pretrain(tiny_pretrain_argv(tmp_path, "--total_epoch", "4", "--base_learning_rate", "0.03",
                                    "--precision", "fp32", "--seed", "43", "--stop_after", "1", name="seed43"))
    other_seed = np.load(tmp_path / "seed43" / "outputs" / "losses.npy")
    assert abs(other_seed[0] - fp32[0]) > 5 * BF16_RTOL * fp32[0]
