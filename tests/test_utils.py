"""Tests of utils.py: the lr schedule, weight-decay groups, the kNN classifier, and SIGTERM with a pending
background write.

Run: python -m pytest -q tests/test_utils.py
"""
import json
import math
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

import utils
from conftest import ROOT, logged_before_warning, warmup_cosine_lrs
from model import MAE, Block, MAEConfig, ViTClassifier


def test_lr_warmup_then_cosine():
    peak, total, warm = 1e-3, 100, 10
    lrs = [utils.lr_at(s, total, warm, peak) for s in range(total)]
    assert lrs[0] == pytest.approx(peak / warm) and lrs[warm - 1] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm]))  # rising during warmup
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))  # falling after
    assert lrs[warm + (total - warm) // 2] == pytest.approx(peak / 2, rel=1e-6)  # cosine midpoint
    assert utils.lr_at(total, total, warm, peak, min_lr=1e-5) == pytest.approx(1e-5)


def test_lr_cosine_runs_from_the_peak_down_to_min_lr():
    """With --min_lr > 0 the cosine starts at the peak where warmup ends, passes (peak + min_lr) / 2 halfway and
    ends at min_lr: at every step lr_at is the longhand min_lr + (peak - min_lr) * (1 + cos(pi * progress)) / 2."""
    peak, min_lr, total, warm = 1e-3, 2e-4, 100, 10
    lrs = [utils.lr_at(s, total, warm, peak, min_lr) for s in range(total + 1)]
    assert lrs[warm - 1] == pytest.approx(peak) and lrs[warm] == pytest.approx(peak)  # warmup's end, cosine's start
    assert lrs[warm + (total - warm) // 2] == pytest.approx((peak + min_lr) / 2, rel=1e-9)
    assert lrs[total - 1] == pytest.approx(min_lr, rel=1e-2) and lrs[total] == pytest.approx(min_lr, rel=1e-9)
    assert lrs == pytest.approx(warmup_cosine_lrs(peak, warm, total, min_lr, steps=total + 1), rel=1e-9)


def test_reference_schedule_is_the_minimum_of_warmup_and_a_cosine_over_the_whole_run():
    """utils.scheduled_lr under --schedule reference, step s of T with W warmup steps: peak * min((s + 1) / W,
    (1 + cos(pi s / T)) / 2), the reference's LambdaLR evaluated per step; with no warmup the cosine alone, the peak
    at step 0."""
    args = SimpleNamespace(schedule="reference", min_lr=0.0)
    lr = [utils.scheduled_lr(s, 20, 5, 2.0, args) for s in range(20)]
    assert lr == pytest.approx([2.0 * min((s + 1) / 5, 0.5 * (1 + math.cos(math.pi * s / 20))) for s in range(20)])
    assert lr[:5] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0 * 0.5 * (1 + math.cos(math.pi * 4 / 20))])
    no_warmup = [utils.scheduled_lr(s, 8, 0, 2.0, args) for s in range(8)]
    assert no_warmup == pytest.approx([1.0 + math.cos(math.pi * s / 8) for s in range(8)])
    assert no_warmup[0] == 2.0


def test_seed_epoch_draws_differ_by_seed_epoch_and_rank_and_repeat_for_the_same_ones():
    """seed_epoch(seed, epoch, rank) seeds torch's and numpy's RNGs: the same three give the same draws (a resumed
    epoch draws what the straight run's did), and any two keys that differ, in one place or in several, other draws:
    rank 1 of epoch 1 must not repeat rank 0 of epoch 2 (its masks would be another rank's a step later), nor seed 8
    repeat seed 7 one epoch on, as they would if the three were simply added."""
    from itertools import combinations
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()

    def draws(*key):
        utils.seed_epoch(*key)
        return torch.rand(4).tolist(), np.random.rand(4).tolist()
    try:
        keys = ((7, 1, 0), (7, 2, 0), (7, 1, 1), (8, 1, 0), (8, 0, 0), (7, 0, 2))
        drawn = {key: draws(*key) for key in keys}
        assert draws(7, 1, 0) == drawn[7, 1, 0]
        for key, other_key in combinations(keys, 2):
            for source, a, b in zip(("torch", "numpy"), drawn[key], drawn[other_key]):
                assert all(x != y for x, y in zip(a, b)), (key, other_key, source)
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)


def test_each_process_chunk_is_its_share_of_the_batch_at_most_max_device_batch_size(monkeypatch, capsys):
    """Under torchrun with 2 processes a global --batch_size 32 gives each process 16 images: one chunk of 16 when
    --max_device_batch_size is larger (64), which check_schedule_args accepts; four of 4 when it is 4. The chunk
    must divide each process's share, not the global batch: --batch_size 96 in chunks of 32 would do on one process,
    but its 48 images a process are not whole chunks of 32, refused in one line that names the processes."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert utils.dist_env() == (0, 2, 0)
    args = SimpleNamespace(batch_size=32, max_device_batch_size=64, total_epoch=2, warmup_epoch=1,
                           base_learning_rate=1e-3, weight_decay=0.05, min_lr=0.0, seed=0, schedule="warmup_cosine")
    assert (utils.device_chunk(args), utils.chunks_per_step(args)) == (16, 1)
    utils.check_schedule_args(args)  # passes: 16 images a process in chunks of 16
    args.max_device_batch_size = 4
    assert (utils.device_chunk(args), utils.chunks_per_step(args)) == (4, 4)
    utils.check_schedule_args(args)
    args.batch_size, args.max_device_batch_size = 96, 32
    with pytest.raises(SystemExit) as exc:
        utils.check_schedule_args(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith("error: --batch_size 96 is not divisible by --max_device_batch_size 32 x 2 processes"), err


def test_check_resumable_refuses_a_checkpoint_that_has_run_all_its_epochs_or_none(capsys):
    """A checkpoint with epochs left resumes; one whose epoch is --total_epoch (or beyond) has nothing left to run
    and is refused in one line, exit status 2, as is one before epoch 1."""
    args = SimpleNamespace(resume="last.pt", total_epoch=3, stop_after=0, seed=1)
    utils.check_resumable({"args": {"seed": 1}, "epoch": 2}, args, ("seed",))
    assert capsys.readouterr().err == ""
    for epoch in (3, 4):
        with pytest.raises(SystemExit) as exc:
            utils.check_resumable({"args": {"seed": 1}, "epoch": epoch}, args, ("seed",))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.endswith("error: --resume 'last.pt' has already finished all 3 epochs"), err
    for epoch in (0, -1):  # written after an epoch, a checkpoint never holds these: an edited or foreign file
        with pytest.raises(SystemExit) as exc:
            utils.check_resumable({"args": {"seed": 1}, "epoch": epoch}, args, ("seed",))
        assert exc.value.code == 2
        assert capsys.readouterr().err.strip().endswith(
            f"error: --resume 'last.pt' records epoch {epoch}, but a run's checkpoint follows epoch 1 or later")


def test_check_resumable_refuses_a_checkpoint_that_does_not_record_a_run_defining_flag(capsys):
    """A checkpoint whose args lack a run-defining flag (one written before the flag existed, or edited) cannot show
    it ran under this run's value: refused in one line naming the flag, not resumed under whatever value is given."""
    args = SimpleNamespace(resume="last.pt", total_epoch=3, stop_after=0, seed=1, val_split=0)
    with pytest.raises(SystemExit) as exc:
        utils.check_resumable({"args": {"seed": 1}, "epoch": 1}, args, ("seed", "val_split"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume 'last.pt' does not record --val_split (this run has 0)" in err


def test_check_resumable_refuses_a_stop_after_that_leaves_no_epoch_to_run(capsys):
    """--stop_after at or before the checkpoint's epoch would resume into no epoch at all: refused in one line, exit
    status 2; a later one, or 0 (run to --total_epoch), resumes."""
    for stop_after in (0, 3, 5):
        utils.check_resumable({"args": {}, "epoch": 2}, SimpleNamespace(resume="last.pt", total_epoch=5,
                                                                         stop_after=stop_after), ())
    assert capsys.readouterr().err == ""
    for stop_after in (1, 2):
        with pytest.raises(SystemExit) as exc:
            utils.check_resumable({"args": {}, "epoch": 2}, SimpleNamespace(resume="last.pt", total_epoch=5,
                                                                             stop_after=stop_after), ())
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert err.endswith(f"error: --stop_after {stop_after} is not after epoch 2, where --resume 'last.pt' "
                            "stopped: no epoch would run; pass a later epoch, or 0 to run to --total_epoch"), err


@pytest.mark.parametrize("warmup, total, rank, schedule, warned", [
    (10, 2, "0", "warmup_cosine", True), (2, 2, "0", "warmup_cosine", False), (10, 2, "1", "warmup_cosine", False),
    (10, 2, "0", "reference", False)])
def test_a_warmup_longer_than_the_run_is_a_one_line_warning_from_rank_0(monkeypatch, capsys, warmup, total, rank,
                                                                        schedule, warned):
    """Under warmup_cosine, from rank 0 only. Under the reference schedule the lr never reaches its peak, whatever
    the warmup (min(warmup, cosine) is below 1 wherever the warmup line is), and a warmup past the run is the
    reference's own: no warning."""
    monkeypatch.setenv("RANK", rank)
    args = SimpleNamespace(batch_size=64, max_device_batch_size=32, total_epoch=total, warmup_epoch=warmup,
                           base_learning_rate=1e-3, weight_decay=0.05, min_lr=0.0, seed=0, schedule=schedule)
    utils.check_schedule_args(args)
    err = capsys.readouterr().err
    assert err.count("\n") == warned
    assert ("--warmup_epoch 10 is longer than --total_epoch 2: the lr rises for the whole run and never reaches "
            "its peak 2.50e-04" in err) == warned


def test_no_weight_decay_on_norms_biases_and_tokens():
    model = MAE(MAEConfig(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                          decoder_num_heads=2))
    decay, no_decay = utils.weight_decay_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # Written out: the weight matrices of the patch embedding, the decoder's embedding and pixel head, and each
    # block's attention and MLP, and nothing else.
    blocks = {f"{part}.blocks.0.{layer}.weight" for part in ("encoder", "decoder")
              for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    matrices = {"encoder.patch_embed.weight", "decoder.decoder_embed.weight", "decoder.pred.weight", *blocks}
    assert {names[id(p)] for p in decay["params"]} == matrices
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - matrices


class OpCounter(TorchDispatchMode):
    """Counts every aten operator that runs under it, by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_backward_adds_each_chunk_into_the_buffers_in_one_multi_tensor_add():
    """Two chunks through utils.backward leave in the .grad buffers exactly what two loss.backward() calls do, in
    the same tensors, with one _foreach_add_ per chunk where autograd runs an add_ per parameter (on a GPU, a
    kernel launch each)."""
    cfg = MAEConfig(patch_size=8, embed_dim=16, depth=2, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                    decoder_num_heads=2)
    torch.manual_seed(0)
    models = {"autograd": MAE(cfg), "utils": MAE(cfg)}
    models["utils"].load_state_dict(models["autograd"].state_dict())
    optimizers = {name: utils.make_adamw(utils.weight_decay_groups(m, 0.05), 1e-3, (0.9, 0.95), torch.device("cpu"))
                  for name, m in models.items()}
    buffers = [p.grad for p in models["utils"].parameters()]
    imgs, noise = torch.randn(2, 4, 3, 32, 32), torch.rand(2, 4, cfg.num_patches)
    counts = {}
    for chunk in range(2):
        for name, model in models.items():
            loss = model(imgs[chunk], noise=noise[chunk])[0] / 2
            with OpCounter() as counter:
                loss.backward() if name == "autograd" else utils.backward(loss, optimizers[name])
            counts[name] = counter.ops
    num_params = len(buffers)
    assert counts["autograd"]["aten.add_.Tensor"] == num_params and "aten._foreach_add_.List" not in counts["autograd"]
    assert counts["utils"]["aten._foreach_add_.List"] == 1 and "aten.add_.Tensor" not in counts["utils"]
    for (name, p), ref, buffer in zip(models["utils"].named_parameters(), models["autograd"].parameters(), buffers):
        assert p.grad is buffer and torch.equal(p.grad, ref.grad), name
        assert p.grad.any(), name  # both chunks reached every parameter


def _longhand_knn(bank, labels, queries, num_classes, k, temperature):
    preds = []
    for q in queries.tolist():
        sims = [sum(a * b for a, b in zip(q, row)) for row in bank.tolist()]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[labels[i]] += math.exp(sims[i] / temperature)
        preds.append(max(range(num_classes), key=votes.__getitem__))
    return preds


def test_knn_vote_matches_longhand():
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    labels = torch.randint(4, (40,), generator=g)
    queries = F.normalize(torch.randn(25, 6, generator=g), dim=1)
    for k, t in ((1, 0.07), (5, 0.07), (20, 0.5), (20, 0.005)):  # exp(1 / 0.005) overflows fp32
        got = utils.knn_predict(bank, labels, queries, 4, k=k, temperature=t, chunk=7)
        assert got.tolist() == _longhand_knn(bank, labels.tolist(), queries, 4, k, t)


def test_knn_weights_each_query_by_its_own_nearest_neighbour_at_a_small_temperature():
    """At temperature 0.005 the votes are exp(similarity / 0.005), which overflows fp32; each query's weights are
    taken relative to its own nearest neighbour, whatever the other queries of its chunk. The second query's two
    nearest (label 1 at similarity 0.456, label 0 at -0.5) are far less similar than the first query's nearest (1.0):
    relative to that one, both weights would underflow to 0 and the vote fall to class 0 by default. The longhand
    vote, in float64, elects class 1 for both queries."""
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.05]]), dim=1)
    labels = torch.tensor([0, 1, 2, 1])
    queries = F.normalize(torch.tensor([[0.0, 1.0], [-0.5, -0.866]]), dim=1)
    got = utils.knn_predict(bank, labels, queries, 3, k=2, temperature=0.005)
    assert got.tolist() == _longhand_knn(bank, labels.tolist(), queries, 3, 2, 0.005) == [1, 1]


def test_knn_is_perfect_on_separable_clusters():
    g = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(5, 32, generator=g), dim=1)

    def sample(n):
        labels = torch.randint(5, (n,), generator=g)
        return F.normalize(centres[labels] + 0.05 * torch.randn(n, 32, generator=g), dim=1), labels
    bank, bank_labels = sample(500)
    queries, query_labels = sample(200)
    pred = utils.knn_predict(bank, bank_labels, queries, 5)
    assert (pred == query_labels).float().mean().item() == 1.0


def test_knn_is_near_chance_on_random_labels():
    g = torch.Generator().manual_seed(2)
    bank = F.normalize(torch.randn(2000, 16, generator=g), dim=1)
    queries = F.normalize(torch.randn(2000, 16, generator=g), dim=1)
    pred = utils.knn_predict(bank, torch.randint(10, (2000,), generator=g), queries, 10)
    acc = (pred == torch.randint(10, (2000,), generator=g)).float().mean().item()
    assert 0.06 < acc < 0.14  # chance is 0.10; the binomial std over 2000 queries is 0.007


@pytest.mark.parametrize("n, world_size", [(512, 4), (10, 3), (5, 8), (50_000, 7)])
def test_shards_are_disjoint_and_cover_everything(n, world_size):
    covered = []
    for rank in range(world_size):
        covered += list(range(n))[utils.shard(n, rank, world_size)]
    assert covered == list(range(n))  # in order, each item once


def test_shard_chunks_walk_this_process_shard_in_order(monkeypatch):
    cpu = torch.device("cpu")
    assert [c.tolist() for c in utils.shard_chunks(7, 3, cpu)] == [[0, 1, 2], [3, 4, 5], [6]]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert [c.tolist() for c in utils.shard_chunks(7, 2, cpu)] == [[3, 4], [5, 6]]  # shard(7, 1, 2) is 3..6
    # A chunk larger than the split is the whole split, however large: 4 x --max_device_batch_size 2**61 is past
    # what split() takes (int64).
    assert [c.tolist() for c in utils.shard_chunks(7, 4 * 2 ** 61, cpu)] == [[3, 4, 5, 6]]


# A script's last moments: an epoch's outputs handed to the background writer, the next epoch under way, and then
# a stop signal (SIGTERM, Ctrl-C's SIGINT), while the write is still going.
STOP_SIGNAL_SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[1])
import utils
if sys.argv[3] == "handler":
    utils.exit_on_stop_signals()
def write_epoch_outputs(path):
    time.sleep(1.0)
    with open(path, "w") as f:
        f.write("epoch 1")
writer = utils.BackgroundWriter()
writer.submit(write_epoch_outputs, sys.argv[2])
print("submitted", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("signum, handler", [(signal.SIGTERM, True), (signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_stop_signal_lets_the_background_writer_finish_its_job(tmp_path, signum, handler):
    """SIGTERM and Ctrl-C's SIGINT end the script in one line, after the background writer's job."""
    out = tmp_path / "outputs.txt"
    argv = [sys.executable, "-c", STOP_SIGNAL_SCRIPT, ROOT, str(out), "handler" if handler else "none"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "submitted"
    proc.send_signal(signum)
    returncode = proc.wait(timeout=30)
    if handler:
        assert returncode == 128 + signum and out.read_text() == "epoch 1"
        assert proc.stderr.read().splitlines() == [f"-c: stopped by {signum.name}: the files hold every finished epoch"]
    else:  # the default handler: killed mid-write, the epoch's outputs lost (what the handler is for)
        assert returncode == -signal.SIGTERM and not os.path.exists(out)


def test_each_attention_flag_enables_its_own_kernel_alone():
    """--attention flash / efficient / cudnn / math: inside utils.attention_kernel exactly that kernel of
    F.scaled_dot_product_attention is enabled (torch's switches, which hold on any device), and auto leaves all
    four as they were. On a CPU only math and flash run, so the GPU kernels' names are checked here."""
    sdp = torch.backends.cuda
    switches = {"flash": sdp.flash_sdp_enabled, "efficient": sdp.mem_efficient_sdp_enabled,
                "cudnn": sdp.cudnn_sdp_enabled, "math": sdp.math_sdp_enabled}
    before = {name: enabled() for name, enabled in switches.items()}
    for name in switches:
        with utils.attention_kernel(name):
            assert {other for other, enabled in switches.items() if enabled()} == {name}
        assert {other: enabled() for other, enabled in switches.items()} == before
    # auto leaves them as they were, whatever they were: one switched off beforehand stays off.
    with sdpa_kernel([SDPBackend.MATH, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        off = {name: enabled() for name, enabled in switches.items()}
        assert not off["flash"]
        with utils.attention_kernel("auto"):
            assert {other: enabled() for other, enabled in switches.items()} == off


def test_the_background_writer_runs_its_jobs_in_order_and_reraises_a_failed_ones_error():
    """Jobs run one after another, in the order given; a job's error is raised by the next submit (or by close),
    in the main thread, so that a failed write stops the run instead of being lost."""
    done = []
    writer = utils.BackgroundWriter()
    for i in range(5):
        writer.submit(done.append, i)
    writer.close()
    assert done == [0, 1, 2, 3, 4]
    writer = utils.BackgroundWriter()
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.submit(done.append, 5)
    writer = utils.BackgroundWriter()
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.close()
    assert done == [0, 1, 2, 3, 4]  # the job after a failed one did not run


def test_the_encoder_digest_names_the_encoders_weights_alone():
    """Two MAEs that differ in a decoder weight only have one encoder digest, another encoder weight gives another;
    and a classifier built from the MAE's encoder names it the same (the digest the fine-tune prints)."""
    from model import encoder_state_from_mae
    cfg = MAEConfig(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    state = MAE(cfg).state_dict()
    other_decoder = {**state, "decoder.pred.bias": state["decoder.pred.bias"] + 1}
    other_encoder = {**state, "encoder.norm.bias": state["encoder.norm.bias"] + 1}
    digest = utils.encoder_digest(state)
    assert utils.encoder_digest(other_decoder) == digest != utils.encoder_digest(other_encoder)
    classifier = ViTClassifier(cfg, 10)
    classifier.encoder.load_state_dict(encoder_state_from_mae(state))
    encoder = {f"encoder.{name}": t for name, t in classifier.encoder.state_dict().items()}
    assert utils.weights_digest(encoder) == digest


def test_an_optimizer_step_leaves_every_gradient_buffer_zeroed_in_place():
    """After each step the .grad buffers (allocate_grads') are zero and still the same tensors, so the next batch's
    chunks add into clean buffers."""
    net = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    utils.allocate_grads(optimizer)
    buffers = [p.grad for p in net.parameters()]
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for _ in range(2):
        utils.backward(net(torch.randn(3, 4)).sum(), optimizer)
        assert any(g.abs().sum() > 0 for g in buffers)
        utils.optimizer_step(optimizer, scaler)
        assert all(p.grad is g and not g.any() for p, g in zip(net.parameters(), buffers))


def test_an_fp16_optimizer_step_grows_the_loss_scale_and_an_overflowed_one_is_skipped_and_shrinks_it():
    """optimizer_step updates the GradScaler (fp16): a step with finite gradients moves the weights and, past
    growth_interval good steps, doubles the scale; one whose gradients overflowed leaves the weights as they were and
    halves it, as torch's GradScaler.update does. Without the update every step would run at the first scale, and an
    overflow there would skip every step after it."""
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    utils.allocate_grads(optimizer)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
    x = torch.ones(3, 2)
    weight = net.weight.detach().clone()
    utils.backward(scaler.scale(net(x).sum()), optimizer)
    utils.optimizer_step(optimizer, scaler)
    assert scaler.get_scale() == 2.0 ** 11 and not torch.equal(net.weight, weight)
    weight = net.weight.detach().clone()
    utils.backward(scaler.scale(net(x).sum() * float("inf")), optimizer)
    utils.optimizer_step(optimizer, scaler)
    assert scaler.get_scale() == 2.0 ** 10 and torch.equal(net.weight, weight)


def test_under_torchrun_a_process_takes_the_gpu_of_its_local_rank_not_its_global_rank(monkeypatch):
    """On the second node of a two-node run of 2 GPUs each, rank 3 is that node's second process (LOCAL_RANK 1): it
    takes cuda:1, which exists there; its global rank names cuda:3, which does not."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    for name, value in (("RANK", "3"), ("LOCAL_RANK", "1"), ("WORLD_SIZE", "4")):
        monkeypatch.setenv(name, value)
    assert utils.resolve_device(SimpleNamespace(device="cuda")) == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]


def test_a_numbered_gpu_becomes_the_current_device_and_a_missing_one_is_refused(monkeypatch, capsys):
    # CUDA events and streams that name no device go to the current one: bench.py's timing of --device cuda:1
    # would otherwise bracket GPU 0's stream.
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert utils.resolve_device(SimpleNamespace(device="cuda:1")) == torch.device("cuda", 1)
    assert utils.resolve_device(SimpleNamespace(device="cuda")) == torch.device("cuda")  # the current one, as is
    assert current == [torch.device("cuda", 1)]
    with pytest.raises(SystemExit) as exc:
        utils.resolve_device(SimpleNamespace(device="cuda:2"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith("error: --device cuda:2: this machine has 2 GPU(s), cuda:0 to cuda:1")
    assert current == [torch.device("cuda", 1)]


@pytest.mark.parametrize("cuda", [True, False])
def test_the_default_device_is_cuda_where_available_and_the_cpu_only_after_a_warning(monkeypatch, capsys, cuda):
    """A torch built without CUDA, or a machine without a driver, would otherwise train on the CPU unannounced."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = SimpleNamespace(device=None)
    assert utils.resolve_device(args) == torch.device("cuda" if cuda else "cpu")
    assert args.device == ("cuda" if cuda else "cpu")  # what args.json records
    err = capsys.readouterr().err.strip()
    assert err == ("" if cuda else f"{utils._prog()}: warning: no CUDA GPU is available (torch.cuda.is_available() "
                   "is False), so this runs on the CPU, far more slowly; pass --device cpu to run there without "
                   "this warning")
    assert utils.resolve_device(SimpleNamespace(device="cpu")) == torch.device("cpu")  # asked for: no warning
    assert capsys.readouterr().err == ""


def test_the_cpu_fallback_warning_comes_from_rank_0_alone(monkeypatch, capsys):
    """Under torchrun every process resolves --device: the warning that no GPU is there is one line for the run, from
    rank 0; the other ranks fall back to the CPU as well, silently."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, warned in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert utils.resolve_device(SimpleNamespace(device=None)) == torch.device("cpu")
        err = capsys.readouterr().err
        assert err.count("\n") == warned and ("warning: no CUDA GPU is available" in err) == warned


def test_a_new_run_into_a_log_folder_with_an_earlier_runs_curves_is_warned_and_the_folder_left_as_it_was(tmp_path,
                                                                                                         capsys):
    """TensorBoard draws a folder's event files as one run. An event file with logged values warns a new run; a
    resume, a folder without event files, and one whose event file holds the header alone (a run stopped before it
    logged anything) do not. The folder's name is taken literally: '[1]' is no glob pattern."""
    from torch.utils.tensorboard import SummaryWriter
    log_dir = tmp_path / "run[1]"

    def warning(resume=""):
        utils.warn_if_logged_before(SimpleNamespace(log_dir=str(log_dir), resume=resume))
        return capsys.readouterr().err

    log_dir.mkdir()
    (log_dir / "notes.txt").write_text("not an event file")
    assert warning() == ""
    SummaryWriter(str(log_dir)).close()  # the header alone
    assert warning() == ""
    with SummaryWriter(str(log_dir)) as writer:
        writer.add_scalar("loss", 1.0, 1)
    before = sorted(os.listdir(log_dir))
    assert warning() == f"{utils._prog()}: warning: {logged_before_warning(str(log_dir))}\n"
    assert warning(resume="run_last.pt") == ""
    assert sorted(os.listdir(log_dir)) == before and len(before) == 3


def test_warnings_given_while_the_inputs_are_checked_wait_for_the_checks_to_pass(capsys):
    """Inside warnings_after_checks a warning waits: the block's end prints them in order; a die() (SystemExit)
    drops them, so that its error is the one line, and so does the GPU running out of memory (torch's error, or
    cuBLAS's status, or either as the cause of another), which explains_out_of_memory makes one line; another
    exception prints them as it propagates. Either way the hold ends with the block."""
    prefix = f"{utils._prog()}: warning: "
    with utils.warnings_after_checks():
        utils.warn("first")
        utils.warn("second")
        assert capsys.readouterr().err == ""
    assert capsys.readouterr().err == f"{prefix}first\n{prefix}second\n"
    with pytest.raises(SystemExit), utils.warnings_after_checks():
        utils.warn("moot")
        utils.die("bad input")
    assert capsys.readouterr().err == f"{utils._prog()}: error: bad input\n"
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    def raise_(error):
        raise error

    def wrapped_oom():
        try:
            raise_(oom)
        except torch.OutOfMemoryError as cause:
            raise RuntimeError("compiled graph failed") from cause
    for raise_it in (lambda: raise_(oom), lambda: raise_(cublas), wrapped_oom):
        with pytest.raises(RuntimeError), utils.warnings_after_checks():
            utils.warn("moot")
            raise_it()
        assert capsys.readouterr().err == ""
    with pytest.raises(ZeroDivisionError), utils.warnings_after_checks():
        utils.warn("before a bug")
        1 / 0
    assert capsys.readouterr().err == f"{prefix}before a bug\n"
    utils.warn("after")
    assert capsys.readouterr().err == f"{prefix}after\n"


@pytest.mark.parametrize("script", ["mae_pretrain", "train_classifier", "bench"])
def test_without_a_gpu_a_bad_input_is_one_line_and_a_good_one_warns_before_any_work(tmp_path, monkeypatch, capsys,
                                                                                    script):
    """No --device on a machine without a GPU: an input refused once the device is resolved (--capture_step, which
    needs CUDA) is the one line printed, with no warning before it; inputs that pass get the warning before the run's
    first piece of work (its args.json, or bench's matmul peak)."""
    import importlib

    from conftest import TINY_MODEL
    module = importlib.import_module(script)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    fake = ["--dataset", "fake", "--fake_size", "64", "--batch_size", "32", "--log_dir", str(tmp_path / "logs"),
            "--output_dir", str(tmp_path / "out"), *TINY_MODEL]
    argv = {"mae_pretrain": [*fake, "--model_path", str(tmp_path / "mae.pt")],
            "train_classifier": [*fake, "--output_model_path", str(tmp_path / "cls.pt")],
            "bench": ["--phases", "pretrain", "--max_device_batch_size", "16"]}[script]
    with pytest.raises(SystemExit) as exit_:
        module.main(module.get_args_parser().parse_args([*argv, "--capture_step"]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{utils._prog()}: error: --capture_step captures CUDA graphs: it needs a CUDA device, not cpu"]
    assert not (tmp_path / "out").exists()

    class FirstWork(Exception):
        pass

    def first_work(*args, **kwargs):
        raise FirstWork
    monkeypatch.setattr(*((module, "matmul_peak") if script == "bench" else (utils, "save_json")), first_work)
    with pytest.raises(FirstWork):
        module.main(module.get_args_parser().parse_args(argv))
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("warning: no CUDA GPU is available (torch.cuda.is_available() is False), so this runs on "
                         "the CPU, far more slowly; pass --device cpu to run there without this warning")


def _explained(raise_it, capsys, max_device_batch_size: int, batch_size: int) -> str:
    """What a main decorated with utils.explains_out_of_memory prints when it calls raise_it(); exit status 2."""
    @utils.explains_out_of_memory
    def main(args):
        raise_it()
    with pytest.raises(SystemExit) as exc:
        main(SimpleNamespace(max_device_batch_size=max_device_batch_size, batch_size=batch_size))
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_out_of_gpu_memory_is_one_line_naming_the_chunk_size_even_when_wrapped(capsys):
    def expected(flag, chunk, detail):
        return (f"{utils._prog()}: error: --max_device_batch_size {flag}: out of GPU memory in chunks of {chunk} "
                f"images ({detail}); pass a value below {chunk}: the gradients accumulate over the chunks, so the "
                "result does not depend on it\n")
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                 "15.77 GiB\nof which 1.2 GiB is free.")
    # cuBLAS's and cuDNN's own allocations: a RuntimeError that names the status.
    cublas = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    cudnn = RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED")

    def raised(error):
        def raise_it():
            raise error
        return raise_it

    def wrapped(error, message):  # as torch.compile hands it on: another exception, raised from it
        def raise_it():
            try:
                raise error
            except Exception as e:
                raise RuntimeError(message.format(e)) from e
        return raise_it

    oom_detail = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 15.77 GiB"
    for raise_it in (raised(oom), wrapped(oom, "backend compiler failed")):
        assert _explained(raise_it, capsys, 256, 512) == expected(256, 256, oom_detail)
    # BackendCompilerFailed begins "backend='inductor' raised:" and quotes the error below: the detail is the
    # innermost match's. The chunk is at most the batch.
    for raise_it, detail in ((wrapped(cublas, "backend='inductor' raised:\nRuntimeError: {}"), str(cublas)),
                             (raised(cudnn), str(cudnn))):
        assert _explained(raise_it, capsys, 64, 32) == expected(64, 32, detail)

    for message in ("a bug", "CUDA error: CUBLAS_STATUS_NOT_INITIALIZED when calling `cublasCreate(handle)`"):
        @utils.explains_out_of_memory
        def other(args):
            raise RuntimeError(message)
        with pytest.raises(RuntimeError) as error:  # anything else surfaces as it is
            other(SimpleNamespace(max_device_batch_size=256, batch_size=512))
        assert str(error.value) == message


@pytest.mark.parametrize("script", ["mae_pretrain", "train_classifier", "bench"])
def test_every_script_explains_running_out_of_gpu_memory(tmp_path, monkeypatch, capsys, script):
    import importlib

    from conftest import TINY_MODEL, tiny_pretrain_argv
    module = importlib.import_module(script)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")
    monkeypatch.setattr(module, "matmul_peak" if script == "bench" else "train_one_epoch", out_of_memory)
    argv = {"mae_pretrain": tiny_pretrain_argv(tmp_path),
            "train_classifier": ["--dataset", "fake", "--fake_size", "64", "--batch_size", "32", "--device", "cpu",
                                 "--output_model_path", str(tmp_path / "cls.pt"), "--output_dir", str(tmp_path),
                                 "--log_dir", str(tmp_path / "logs"), *TINY_MODEL],
            "bench": ["--device", "cpu", "--max_device_batch_size", "16"]}[script]
    with pytest.raises(SystemExit) as exc:
        module.main(module.get_args_parser().parse_args(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    # The chunk that ran out: at most the flag, and at most the batch (train_classifier's default 128 > 32).
    flag, chunk = {"mae_pretrain": (16, 16), "train_classifier": (128, 32), "bench": (16, 16)}[script]
    assert err.endswith(f"error: --max_device_batch_size {flag}: out of GPU memory in chunks of {chunk} images (CUDA "
                        f"out of memory.); pass a value below {chunk}" + (
                            "" if script == "bench" else ": the gradients accumulate over the chunks, so the result "
                                                         "does not depend on it")), err


def failing_backend(graph_module, example_inputs):
    """A torch.compile backend that fails as Triton did on an H200 (2026-11-30)."""
    raise RuntimeError("PassManager::run failed")


def test_a_compiler_failure_keeps_its_traceback_and_ends_with_how_to_train_without_compilation():
    @utils.explains_compile_failure
    def main(args):
        return torch.compile(lambda x: x * 2, backend=failing_backend)(torch.ones(2))
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as error:  # the same error, not a SystemExit
        main(None)
    assert "PassManager::run failed" in str(error.value)
    assert error.value.__notes__ == [utils.COMPILE_FAILURE_NOTE] and "--no-compile" in utils.COMPILE_FAILURE_NOTE

    @utils.explains_compile_failure
    def wrapped(args):  # a compiler failure that another error reports
        try:
            main.__wrapped__(args)
        except RuntimeError as failure:
            raise ValueError("the step failed") from failure
    with pytest.raises(ValueError) as error:
        wrapped(None)
    assert error.value.__notes__ == [utils.COMPILE_FAILURE_NOTE]

    @utils.explains_compile_failure
    def other(args):
        raise RuntimeError("a bug")
    with pytest.raises(RuntimeError) as error:  # anything else surfaces as it is
        other(None)
    assert not hasattr(error.value, "__notes__")


@pytest.mark.parametrize("script", ["mae_pretrain", "train_classifier", "bench"])
def test_every_script_says_how_to_train_without_compilation_when_the_compiler_fails(tmp_path, monkeypatch, script):
    import importlib

    from conftest import TINY_MODEL, tiny_pretrain_argv
    module = importlib.import_module(script)

    def compile_model(model, args):
        # The model's first forward calls a compiled function whose backend fails: the same error, raised by Dynamo
        # from the script's step, without tracing the whole model first (seconds on 2 cores).
        failing = torch.compile(lambda x: x * 2, backend=failing_backend)

        def compile_first(module, inputs):
            failing(torch.ones(2))  # and return None: a value would replace the forward's inputs
        model.register_forward_pre_hook(compile_first)
        return model
    monkeypatch.setattr(utils, "compile_model", compile_model)
    argv = {"mae_pretrain": tiny_pretrain_argv(tmp_path, "--compile"),
            # --recipe plain: no augmentation, which would compile with inductor itself
            "train_classifier": ["--dataset", "fake", "--fake_size", "64", "--batch_size", "32", "--device", "cpu",
                                 "--recipe", "plain", "--compile", "--output_model_path", str(tmp_path / "cls.pt"),
                                 "--output_dir", str(tmp_path), "--log_dir", str(tmp_path / "logs"), *TINY_MODEL],
            "bench": ["--device", "cpu", "--compile", "--phases", "pretrain", "--max_device_batch_size", "16"]}[script]
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as error:
        module.main(module.get_args_parser().parse_args(argv))
    assert error.value.__notes__ == [utils.COMPILE_FAILURE_NOTE]


def test_the_data_lives_on_the_gpu_when_it_fits_else_on_the_host(monkeypatch, capsys):
    import data
    train = data.fake_images(100, seed=1)  # 100 x 3 KB
    val = data.fake_images(20, seed=2)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    needed = 120 * 3 * 32 * 32

    def args(data_on):
        return SimpleNamespace(dataset="fake", data_on=data_on)

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * needed, 80 * 2 ** 30))
    assert utils.data_device(train, val, cuda, args("auto")) == cuda  # 50% of the free memory: it fits
    assert utils.data_device(train, val, cuda, args("device")) == cuda
    assert utils.data_device(train, val, cuda, args("host")) == cpu
    assert capsys.readouterr().out == ""

    # All of the free memory would leave none for training: auto keeps the data on the host and says so...
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (needed, 80 * 2 ** 30))
    assert utils.data_device(train, val, cuda, args("auto")) == cpu
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "its 120 images take" in out and "--data_on host" in out
    # ... and --data_on device is refused in one line.
    with pytest.raises(SystemExit) as exc:
        utils.data_device(train, val, cuda, args("device"))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--data_on device: --dataset fake: its 120 images take" in err

    # Under torchrun the processes decide together: it fits on this GPU but not on another process's.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * needed, 80 * 2 ** 30))
    monkeypatch.setattr(utils, "all_processes", lambda ok, device: False)
    assert utils.data_device(train, val, cuda, args("auto")) == cpu
    assert "more than 80% of another process's free GPU memory" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        utils.data_device(train, val, cuda, args("device"))

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: pytest.fail("asked on the CPU"))
    assert all(utils.data_device(train, val, cpu, args(where)) == cpu for where in data.DATA_ON)


def test_the_val_images_count_towards_the_data_on_the_gpu_and_only_rank_0_says_where_they_went(monkeypatch, capsys):
    """data_device weighs the training and the val images together, as both go to the GPU: 100 training images fit
    in 80% of the free memory on their own, with the 20 val images they do not, so --data_on auto keeps them all on
    the host. Under torchrun each process decides (together), but rank 0 alone says so."""
    import data
    train, val = data.fake_images(100, seed=1), data.fake_images(20, seed=2)
    image = 3 * 32 * 32
    free = int(110 * image / 0.8)  # 80% of it: 110 images
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free, 80 * 2 ** 30))
    args = SimpleNamespace(dataset="fake", data_on="auto")
    assert utils.data_device(train, data.fake_images(10, seed=2), torch.device("cuda"), args) == torch.device("cuda")
    assert utils.data_device(train, val, torch.device("cuda"), args) == torch.device("cpu")
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and f"its 120 images take {120 * image / 2 ** 30:.2f} GiB" in out
    monkeypatch.setenv("RANK", "1")
    assert utils.data_device(train, val, torch.device("cuda"), args) == torch.device("cpu")
    assert capsys.readouterr().out == ""


def test_memory_name_says_host_memory_for_the_cpu_and_gpu_memory_for_cuda():
    """The start-up line says where the images live: host memory when data_device put them on the CPU (--data_on
    host, or no GPU), GPU memory on a CUDA device, numbered or not (constructing one needs no GPU)."""
    assert utils.memory_name(torch.device("cpu")) == "host memory"
    assert utils.memory_name(torch.device("cuda")) == "GPU memory"
    assert utils.memory_name(torch.device("cuda:1")) == "GPU memory"


def test_check_model_fits_counts_16_bytes_a_parameter_against_all_of_the_memory(monkeypatch, capsys):
    page, built_on = 4096, []

    def build():
        layer = torch.nn.Linear(1000, 1000)  # 1,001,000 parameters: 16,016,000 bytes in training
        built_on.append(layer.weight.device.type)
        return layer
    for pages, fits in ((16_016_000 // page + 1, True), (16_016_000 // page, False)):
        sizes = {"SC_PAGE_SIZE": page, "SC_PHYS_PAGES": pages}
        monkeypatch.setattr(os, "sysconf", lambda name, sizes=sizes: sizes[name])
        if fits:
            utils.check_model_fits(build, torch.device("cpu"))
            continue
        with pytest.raises(SystemExit) as exc:
            utils.check_model_fits(build, torch.device("cpu"))
        assert exc.value.code == 2
        assert "1,001,000 parameters need" in capsys.readouterr().err
    assert built_on == ["meta", "meta"]  # counted without allocating


def test_check_model_fits_refuses_a_deep_model_by_its_encoder_blocks_before_building_it(capsys):
    """Given the config, cfg.depth copies of one encoder block are counted first: a model they alone do not fit
    is refused without building it (a depth of 100,000 took minutes to build on the meta device), and one they
    fit is built and counted whole."""
    built = []
    cfg = MAEConfig(embed_dim=32, depth=10 ** 9, num_heads=2)
    with pytest.raises(SystemExit) as exc:
        utils.check_model_fits(lambda: built.append(cfg), torch.device("cpu"), cfg)
    assert exc.value.code == 2 and built == []
    per_block = 12 * 32 ** 2 + 13 * 32  # qkv, proj and the 4x MLP's weights; their biases and two LayerNorms'
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"at least {10 ** 9 * per_block:,} parameters need" in err and \
        "AdamW's moments (its encoder's blocks alone), more than" in err, err
    small = MAEConfig(embed_dim=32, depth=2, num_heads=2)
    utils.check_model_fits(lambda: built.append(small) or torch.nn.Linear(2, 2), torch.device("cpu"), small)
    assert built == [small] and capsys.readouterr().err == ""


def test_embed_all_embeds_every_image_in_order_onto_the_given_device():
    import data
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    feats = utils.embed_all(lambda x: x.flatten(1)[:, :2] * 2, images, 3, None, torch.device("cpu"))
    assert feats.dtype == torch.float32 and feats.shape == (10, 2)
    torch.testing.assert_close(feats, 2 * data.normalize(images).flatten(1)[:, :2])


def test_evaluation_indexes_each_split_where_its_images_lie(monkeypatch):
    """shard_chunks makes its index tensors on the device it is given, and embed_all asks for them on the images'
    device, not the model's: data.take indexes host-resident images (--data_on host) on the host and copies the rows
    over, and indices on the GPU could not index them. The meta device stands in for the GPU here."""
    import data
    chunks = utils.shard_chunks(10, 4, torch.device("meta"))
    assert [(c.device.type, len(c)) for c in chunks] == [("meta", 4), ("meta", 4), ("meta", 2)]
    seen, take = [], data.take

    def spy(source, idx, device):
        seen.append((idx.device.type, device.type))
        return take(source, idx, torch.device("cpu"))
    monkeypatch.setattr(data, "take", spy)
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    feats = utils.embed_all(lambda x: x.flatten(1)[:, :2], images, 4, None, torch.device("meta"))
    assert seen == [("cpu", "meta")] * 3
    assert torch.equal(feats, data.normalize(images).flatten(1)[:, :2])


def test_compile_falls_back_to_eager_with_one_warning_where_it_cannot_work(capsys, monkeypatch):
    import torch._inductor.config as inductor_config
    args = SimpleNamespace(compile=True, compile_mode="default", compile_scope="model")
    cpu = torch.device("cpu")
    with inductor_config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        assert not utils.compile_enabled(args, cpu)
        monkeypatch.setenv("RANK", "1")  # under torchrun only rank 0 says it
        assert not utils.compile_enabled(args, cpu)
        monkeypatch.delenv("RANK")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "warning: torch.compile is unavailable (inductor finds no C++ compiler" in err[0], err
    assert utils.compile_enabled(args, cpu)  # a compiler is there
    model = torch.nn.Linear(4, 2)
    compiled = utils.compile_model(model, args)  # compiled lazily
    assert compiled is not model and compiled._orig_mod is model
    assert not utils.compile_enabled(SimpleNamespace(compile=None), cpu)  # off by default on the CPU


@pytest.mark.parametrize("device, compile, precision, world_size, capture, expected", [
    ("cuda", None, None, "1", True, "default"),  # compiled by default on CUDA: the step captured as CUDA graphs
    ("cuda", True, "fp32", "1", True, "default"),
    ("cuda", None, None, "2", True, "default"),  # under torchrun too: no DDP comes between graphs and all-reduce
    ("cuda", None, "fp16", "1", False, "reduce-overhead"),  # the grad scaler cannot be captured: torch's graphs
    ("cuda", False, None, "1", False, "default"),  # nothing compiled: no mode that needs compilation
    ("cpu", None, None, "1", False, "default"),
    ("cpu", True, None, "1", False, "default"),  # CUDA graphs need CUDA
])
def test_cuda_compiles_and_captures_the_step_by_default(monkeypatch, device, compile, precision, world_size, capture,
                                                        expected):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setattr(utils, "_compile_unavailable", lambda device: None)  # Triton needs no GPU to be asked about
    monkeypatch.setattr(utils, "native_bf16", lambda device: True)  # an H100's answer
    args = SimpleNamespace(precision=precision, compile=compile, compile_mode=None, compile_scope="model",
                           capture_step=None)
    utils.resolve_runtime(args, torch.device(device))  # needs no GPU: it only reads the device's type
    assert (args.capture_step, args.compile_mode) == (capture, expected)
    if args.compile and device == "cuda":
        # A mode given keeps torch's graphs, or none, instead of the captured step.
        args.capture_step, args.compile_mode = None, "reduce-overhead"
        utils.resolve_runtime(args, torch.device(device))
        assert (args.capture_step, args.compile_mode) == (False, "reduce-overhead")
        args.capture_step, args.compile_mode = None, "default"
        utils.resolve_runtime(args, torch.device(device))
        assert (args.capture_step, args.compile_mode) == (False, "default")
        args.capture_step, args.compile_mode = False, None  # --no-capture_step: torch's graphs, as before
        utils.resolve_runtime(args, torch.device(device))
        assert (args.capture_step, args.compile_mode) == (False, "reduce-overhead")
    if args.compile:
        args.compile_mode = "max-autotune"
        utils.resolve_runtime(args, torch.device(device))
        assert args.compile_mode == "max-autotune"  # a mode asked for is kept


@pytest.mark.parametrize("flags", [{"compile_mode": "reduce-overhead"}, {"compile_mode": "max-autotune"},
                                   {"compile_scope": "blocks"}])
def test_compile_flags_without_compilation_are_refused(capsys, flags):
    args = SimpleNamespace(**{"precision": None, "compile": None, "compile_mode": None, "compile_scope": "model",
                              "capture_step": None, **flags})
    with pytest.raises(SystemExit) as exc:
        utils.resolve_runtime(args, torch.device("cpu"))  # the CPU compiles only when asked
    (flag, value), = flags.items()
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        f"--{flag} {value} needs compilation, which is off (pass --compile)")
    # "default" names no compilation of its own, so it goes with either.
    args = SimpleNamespace(precision=None, compile=False, compile_mode="default", compile_scope="model",
                           capture_step=None)
    utils.resolve_runtime(args, torch.device("cpu"))
    assert args.compile is False


@pytest.mark.parametrize("device, precision, expected", [("cuda", None, "bf16"), ("cpu", None, "fp32"),
                                                         ("cuda", "fp16", "fp16"), ("cpu", "bf16", "bf16")])
def test_resolved_runtime_names_what_runs(monkeypatch, capsys, device, precision, expected):
    """args.json records the precision and whether the run compiles, not the flags' None."""
    monkeypatch.setattr(utils, "_compile_unavailable", lambda device: None)
    monkeypatch.setattr(utils, "native_bf16", lambda device: True)  # an H100's answer
    args = SimpleNamespace(precision=precision, compile=None, compile_mode=None, compile_scope="model",
                           capture_step=None)
    utils.resolve_runtime(args, torch.device(device))
    assert args.precision == expected and args.compile is (device == "cuda")
    # Where torch.compile cannot work, the run is eager, and so is what it records: no CUDA graphs either.
    monkeypatch.setattr(utils, "_compile_unavailable", lambda device: "no compiler here")
    args = SimpleNamespace(precision=precision, compile=True, compile_mode=None, compile_scope="model",
                           capture_step=None)
    capsys.readouterr()
    utils.resolve_runtime(args, torch.device(device))
    assert "warning: torch.compile is unavailable (no compiler here); running eager" in capsys.readouterr().err
    assert args.compile is False and args.compile_mode == "default"


@pytest.mark.parametrize("capability, precision, expected, warned", [
    ((9, 0), None, "bf16", False), ((8, 0), None, "bf16", False),  # H100, A100
    ((7, 5), None, "fp16", False), ((7, 0), None, "fp16", False),  # T4, V100: no bf16 arithmetic
    ((7, 5), "bf16", "bf16", True), ((7, 5), "fp32", "fp32", False), ((8, 6), "bf16", "bf16", False),
])
def test_precision_defaults_to_fp16_on_gpus_without_bf16_arithmetic(monkeypatch, capsys, capability, precision,
                                                                    expected, warned):
    """On a GPU older than compute capability 8.0 bf16 is emulated and inductor skips its graphs: fp16 by default,
    and bf16 when asked for, after a warning that names the GPU."""
    monkeypatch.setattr(utils, "_compile_unavailable", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    args = SimpleNamespace(precision=precision, compile=None, compile_mode=None, compile_scope="model",
                           capture_step=None)
    utils.resolve_runtime(args, torch.device("cuda"))
    assert args.precision == expected and utils.autocast_dtype(args, torch.device("cuda")) == {
        "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[expected]
    err = capsys.readouterr().err
    assert ("warning: --precision bf16: Tesla T4 has no bf16 arithmetic" in err) is warned
    assert err.count("\n") == warned  # one line when warned, nothing otherwise


def test_weights_digest_names_the_weights_not_their_order_or_file():
    state = {"a.weight": torch.arange(6.0).reshape(2, 3), "b.bias": torch.zeros(3, dtype=torch.bfloat16),
             "c.count": torch.tensor(7)}
    digest = utils.weights_digest(state)
    assert len(digest) == 64 and utils.weights_digest(dict(reversed(list(state.items())))) == digest
    nudged = state["a.weight"].clone()
    nudged[1, 2] = torch.nextafter(nudged[1, 2], torch.tensor(100.0))  # one float's last bit
    for other in ({**state, "a.weight": nudged}, {**state, "a.weight": state["a.weight"].reshape(3, 2)},
                  {**state, "b.bias": torch.zeros(3)}, {**state, "c.count": torch.tensor(7, dtype=torch.int32)},
                  {"renamed.weight" if k == "a.weight" else k: v for k, v in state.items()}):
        assert utils.weights_digest(other) != digest


def test_weights_digest_tells_apart_dtypes_of_the_same_bytes():
    """Zeros in float32 and in int32, or in bf16 and in fp16, have the same bytes and shape: the dtype the digest
    hashes with them is what tells these weights apart."""
    for a, b in ((torch.float32, torch.int32), (torch.bfloat16, torch.float16)):
        zeros_a, zeros_b = torch.zeros(3, dtype=a), torch.zeros(3, dtype=b)
        assert torch.equal(zeros_a.view(torch.uint8), zeros_b.view(torch.uint8))
        assert utils.weights_digest({"w": zeros_a}) != utils.weights_digest({"w": zeros_b})


def test_compile_falls_back_to_eager_on_cuda_without_triton(monkeypatch, capsys):
    """No Triton, or a GPU it does not support (has_triton() checks both): one warning that says so, and eager."""
    import torch.utils._triton
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    monkeypatch.setattr(utils, "native_bf16", lambda device: True)
    args = SimpleNamespace(precision=None, compile=None, compile_mode=None, compile_scope="model",
                           capture_step=None)
    utils.resolve_runtime(args, torch.device("cuda"))
    assert args.compile is False and args.compile_mode == "default"
    assert capsys.readouterr().err.strip().endswith("warning: torch.compile is unavailable (Triton is not installed, "
                                                    "or does not support this GPU (compute capability below 7.0)); "
                                                    "running eager")


def test_compile_errors_other_than_a_missing_compiler_are_raised_not_warned(monkeypatch):
    def broken_compile(*args, **kwargs):
        raise TypeError("a bug in the call")
    monkeypatch.setattr(torch, "compile", broken_compile)
    args = SimpleNamespace(compile=True, compile_mode="default", compile_scope="model")
    assert utils.compile_enabled(args, torch.device("cpu"))
    with pytest.raises(TypeError, match="a bug in the call"):
        utils.compile_model(torch.nn.Linear(4, 2), args)


def test_compile_scope_blocks_compiles_every_block_in_place(monkeypatch):
    """Every encoder and decoder block, and nothing else, is compiled in place (state_dict keys unchanged), with
    static shapes: dynamic=False gives the encoder's and the decoder's token counts a graph each, where torch's
    default would recompile the second shape met as a dynamic graph."""
    calls = []

    def recording_compile(block, *positional, **kwargs):
        calls.append((block, positional, kwargs))
        return torch.nn.Module.compile(block, *positional, **kwargs)

    monkeypatch.setattr(Block, "compile", recording_compile)
    model = MAE(MAEConfig(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                          decoder_num_heads=2))
    keys = list(model.state_dict())
    args = SimpleNamespace(compile_mode="default", compile_scope="blocks")
    assert utils.compile_model(model, args) is model
    blocks = [*model.encoder.blocks, *model.decoder.blocks]
    assert len(blocks) == 3 and all(b._compiled_call_impl is not None for b in blocks)
    assert calls == [(block, (), {"mode": None, "dynamic": False}) for block in blocks]
    assert model.encoder.patch_embed._compiled_call_impl is None  # only the blocks
    assert list(model.state_dict()) == keys  # checkpoints keep their keys


def test_recon_figure_stacks_title_masked_reconstruction_original(tmp_path):
    """The per-epoch figure: the title on top, then the three panels in order (black, red and green images here,
    so each panel's rows can be found by colour), each image enlarged 3 times; written under its final name only."""
    import numpy as np
    from PIL import Image
    black, red, green = (torch.zeros(16, 3, 8, 8) for _ in range(3))
    red[:, 0], green[:, 1] = 1.0, 1.0
    path = tmp_path / "recon.png"
    utils.save_recon_figure(str(path), black, red, green, title="epoch 7, train loss 0.1234", ncol=8)
    assert os.listdir(tmp_path) == ["recon.png"]
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]

    def rows(mask):  # rows mostly of that colour: a panel's image rows, not a line of text
        return np.flatnonzero(mask.sum(axis=1) > mask.shape[1] // 2)
    black_rows = rows((r + g + b) == 0)
    red_rows, green_rows = rows((r == 255) & (g == 0) & (b == 0)), rows((g == 255) & (r == 0) & (b == 0))
    assert black_rows.max() < red_rows.min() and red_rows.max() < green_rows.min()
    # Each panel: 2 rows of 8-pixel images, 3 times enlarged (the white gaps between them are not counted).
    assert len(black_rows) == len(red_rows) == len(green_rows) == 2 * 8 * 3
    assert ((r[:black_rows.min()] + g[:black_rows.min()] + b[:black_rows.min()]) < 300).any()  # the title's text


def test_recon_figure_of_a_few_images_is_as_wide_as_its_text(tmp_path):
    """A val set of one image (--val_split 1) makes a grid 30 pixels wide: the figure widens to its longest line of
    text, which it had cut off, and centres the panels under it."""
    import numpy as np
    from PIL import Image
    one = torch.zeros(1, 3, 8, 8)
    path = tmp_path / "recon.png"
    title = "epoch 1: the val image, fixed masks | train loss 0.2753 | val loss 0.2750"
    utils.save_recon_figure(str(path), one, one, one, title=title)
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    dark = rgb.sum(axis=2) < 300
    assert rgb.shape[1] > 400 and not dark[:, :10].any() and not dark[:, -10:].any()  # the 10-pixel border is clear
    columns = np.flatnonzero(dark.sum(axis=0) >= 3 * 8 * 3)  # black down three enlarged images: the panels'
    assert len(columns) == 8 * 3 and abs((columns.min() + columns.max()) / 2 - rgb.shape[1] / 2) <= 2


def test_recon_grid_for_tensorboard_stacks_masked_reconstruction_original_top_to_bottom():
    """The TensorBoard image: the three panels one above another, in the figure's order, each a grid of ncol images
    a row, one white (1.0) pixel around and between them, written out longhand here. 10 images of 6 x 5 pixels in
    rows of 4: three rows, the last with two empty white places; masked input, reconstruction and original are
    different random images, so a panel out of place or beside another is seen."""
    h, w, ncol = 6, 5, 4
    masked, recon, original = (torch.rand(10, 3, h, w) * 0.9 for _ in range(3))  # below the white padding
    grid = utils.recon_grid_tensor(masked, recon, original, ncol=ncol)
    panel_h, panel_w = 3 * (h + 1) + 1, ncol * (w + 1) + 1
    expected = torch.ones(3, 3 * panel_h, panel_w)
    for p, images in enumerate((masked, recon, original)):
        for i, image in enumerate(images):
            top, left = p * panel_h + 1 + (i // ncol) * (h + 1), 1 + (i % ncol) * (w + 1)
            expected[:, top:top + h, left:left + w] = image
    assert grid.shape == expected.shape == (3, 3 * panel_h, panel_w)
    assert torch.equal(grid, expected)


def test_attention_choice_checks_the_class_tokens_single_query_when_asked(monkeypatch, capsys):
    """A model pooled on the class token runs its last block's attention for one query over 1 + N keys
    (model.Block's `queries`). A kernel named by --attention that could not run that shape is refused in one
    line before the run, rather than by a traceback at the first step; without the class-token path it is not
    asked about."""
    cfg = MAEConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2)  # 16 patches
    asked, choose = [], torch._fused_sdp_choice

    def no_single_query(q, k, v, *args, **kwargs):  # a kernel that cannot take one query
        asked.append((q.shape[-2], k.shape[-2]))
        if q.shape[-2] == 1:
            raise RuntimeError("No available kernel. Aborting execution.")
        return choose(q, k, v, *args, **kwargs)
    monkeypatch.setattr(torch, "_fused_sdp_choice", no_single_query)
    assert utils.attention_choice(cfg, "flash", torch.device("cpu"), None) == "flash_attention"
    assert asked == [(17, 17)]
    with pytest.raises(SystemExit) as exc:
        utils.attention_choice(cfg, "flash", torch.device("cpu"), None, class_token_query=True)
    assert exc.value.code == 2 and asked[1:] == [(1, 17)]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--attention flash cannot run on cpu" in err and "No available kernel" in err


def test_attention_choice_checks_the_decoders_heads_when_asked(monkeypatch, capsys):
    """The MAE's decoder may have heads of another width than the encoder's (--decoder_embed_dim,
    --decoder_num_heads). A kernel named by --attention that cannot run the decoder's head dim is refused in one
    line naming it, before the run, rather than by a traceback at the first step."""
    cfg = MAEConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=64, decoder_num_heads=1)
    asked, choose = [], torch._fused_sdp_choice

    def no_head_dim_64(q, k, v, *args, **kwargs):  # a kernel with a head-dim limit under 64
        asked.append((q.shape[1], q.shape[-1]))
        if q.shape[-1] == 64:
            raise RuntimeError("No available kernel. Aborting execution.")
        return choose(q, k, v, *args, **kwargs)
    monkeypatch.setattr(torch, "_fused_sdp_choice", no_head_dim_64)
    assert utils.attention_choice(cfg, "flash", torch.device("cpu"), None) == "flash_attention"
    assert asked == [(2, 16)]  # the encoder's 2 heads of 16
    with pytest.raises(SystemExit) as exc:
        utils.attention_choice(cfg, "flash", torch.device("cpu"), None, decoder=True)
    assert exc.value.code == 2 and asked[1:] == [(1, 64)]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--attention flash cannot run on cpu at head dim 64" in err


def test_attention_choice_checks_the_decoders_masked_queries_when_asked(monkeypatch, capsys):
    """In training the decoder's last block runs attention for the masked tokens' queries alone over all 1 + N keys
    (model.MAEDecoder, masked_only). A kernel named by --attention that could not run that shape is refused in one
    line before the run; the decoder's full shape is asked first."""
    cfg = MAEConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=64, decoder_num_heads=2,
                    mask_ratio=0.75)  # 16 patches, 12 of them masked
    asked, choose = [], torch._fused_sdp_choice

    def no_masked_queries(q, k, v, *args, **kwargs):  # a kernel that cannot take 12 queries over 17 keys
        asked.append((q.shape[-2], k.shape[-2], q.shape[-1]))
        if q.shape[-2] == 12:
            raise RuntimeError("No available kernel. Aborting execution.")
        return choose(q, k, v, *args, **kwargs)
    monkeypatch.setattr(torch, "_fused_sdp_choice", no_masked_queries)
    with pytest.raises(SystemExit) as exc:
        utils.attention_choice(cfg, "flash", torch.device("cpu"), None, decoder=True)
    assert exc.value.code == 2 and asked == [(17, 17, 32), (12, 17, 32)]
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--attention flash cannot run on cpu at head dim 32" in err


def test_layer_decay_reads_two_digit_block_numbers():
    """ViT-T has 12 blocks: 'blocks.10.' and 'blocks.11.' are layer ids 11 and 12, one and two below the head, so
    every parameter's lr scale is the longhand layer_decay ** (depth + 1 - layer id) at that depth too."""
    depth, decay = 12, 0.5
    model = ViTClassifier(MAEConfig(patch_size=8, embed_dim=8, depth=depth, num_heads=1), num_classes=10)
    scale = {id(p): g["lr_scale"] for g in utils.layer_decay_groups(model, 0.05, decay, depth) for p in g["params"]}
    for name, p in model.named_parameters():
        parts = name.split(".")
        layer = (int(parts[2]) + 1 if parts[1] == "blocks" else
                 0 if parts[1] in ("patch_embed", "cls_token") else depth + 1)
        assert scale[id(p)] == decay ** (depth + 1 - layer), name
    assert scale[id(model.encoder.blocks[11].mlp.fc2.weight)] == decay
    assert scale[id(model.encoder.blocks[10].norm1.bias)] == decay ** 2


def test_frozen_parameters_are_in_no_weight_decay_group():
    """AdamW's decoupled weight decay moves a parameter even when its gradient is zero, so a frozen one (the linear
    probe's encoder) must not be handed to the optimizer: weight_decay_groups leaves it out, and a step leaves it
    as it was."""
    model = ViTClassifier(MAEConfig(patch_size=8, embed_dim=16, depth=1, num_heads=2), num_classes=10)
    model.encoder.requires_grad_(False)
    groups = utils.weight_decay_groups(model, 0.05)
    assert [[id(p) for p in g["params"]] for g in groups] == [[id(model.head.weight)], [id(model.head.bias)]]
    frozen = {n: p.clone() for n, p in model.encoder.named_parameters()}
    optimizer = utils.make_adamw(groups, 1e-2, (0.9, 0.95), torch.device("cpu"))
    model(torch.randn(2, 3, 32, 32)).square().sum().backward()
    optimizer.step()
    for name, p in model.encoder.named_parameters():
        assert torch.equal(p, frozen[name]), name


def test_knn_with_k_above_the_bank_size_votes_with_the_whole_bank_and_a_tie_goes_to_the_lowest_class():
    """k larger than the bank (a small --fake_size run with the default k 20) takes every bank entry; a tie in the
    vote goes to the lowest class index (torch.argmax's first maximum, as the longhand's max)."""
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2]]), dim=1)
    labels = torch.tensor([1, 0, 2])
    queries = F.normalize(torch.tensor([[1.0, 0.1], [-1.0, 1.0]]), dim=1)
    got = utils.knn_predict(bank, labels, queries, 3, k=20, temperature=0.5)
    assert got.tolist() == _longhand_knn(bank, labels.tolist(), queries, 3, 3, 0.5)
    assert got.tolist() == utils.knn_predict(bank, labels, queries, 3, k=3, temperature=0.5).tolist()
    # A query halfway between bank entries of classes 2 and 1: equal similarities, equal weights, class 1 wins.
    tie = F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)
    bank = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    assert (tie @ bank.T)[0, 0] == (tie @ bank.T)[0, 1]
    assert utils.knn_predict(bank, torch.tensor([2, 1]), tie, 3, k=2).tolist() == [1]
    assert _longhand_knn(bank, [2, 1], tie, 3, 2, 0.07) == [1]


def test_backward_gives_a_parameter_the_loss_does_not_reach_a_zero_gradient():
    """A parameter the chunk's loss does not reach keeps a zero .grad buffer (the same tensor), as loss.backward()
    leaves it, rather than failing on autograd's None; the reached ones get exactly autograd's gradients."""
    torch.manual_seed(0)
    reached, unreached = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    params = [*reached.parameters(), *unreached.parameters()]
    optimizer = utils.make_adamw([{"params": params}], 1e-3, (0.9, 0.95), torch.device("cpu"))
    buffers = [p.grad for p in params]
    x = torch.randn(4, 3)
    utils.backward(reached(x).square().sum(), optimizer)
    expected = torch.autograd.grad(reached(x).square().sum(), list(reached.parameters()))
    assert all(p.grad is buffer for p, buffer in zip(params, buffers))
    for p, grad in zip(reached.parameters(), expected):
        torch.testing.assert_close(p.grad, grad)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in unreached.parameters())


def test_allocate_grads_makes_every_grad_a_zeroed_view_of_one_flat_buffer_per_dtype():
    """The .grad tensors are views of one buffer per dtype, laid out in the optimizer's order, so that
    average_gradients all-reduces those buffers whole; a .grad put in place of a view (None, a tensor of its own or
    a view of another tensor) is refused there, not left out of the average or all-reduced with a base of its own."""
    a, b = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(4))
    c = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    optimizer = torch.optim.SGD([{"params": [a, c]}, {"params": [b]}], lr=0.1)
    utils.allocate_grads(optimizer)
    flats = utils.grad_buffers(optimizer)
    assert [(flat.dtype, flat.numel()) for flat in flats] == [(torch.float32, 10), (torch.float64, 3)]
    assert all(p.grad.shape == p.shape and p.grad.dtype == p.dtype and not p.grad.any() for p in (a, b, c))
    flats[0].copy_(torch.arange(10.0))
    flats[1].copy_(torch.arange(3.0))
    assert a.grad.tolist() == [[0, 1, 2], [3, 4, 5]] and b.grad.tolist() == [6, 7, 8, 9]
    assert c.grad.tolist() == [0, 1, 2]
    for replacement in (None, torch.zeros(4), torch.zeros(8)[:4]):  # a tensor of its own, a view of another
        b.grad = replacement
        with pytest.raises(RuntimeError, match="allocate_grads"):
            utils.grad_buffers(optimizer)


def test_set_lr_gives_a_plain_group_the_lr_and_a_scaled_group_its_share():
    """Groups without lr_scale (pretraining's weight-decay groups) get the scheduled lr itself; a group with one
    (layer decay) gets lr * lr_scale."""
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [a]}, {"params": [b], "lr_scale": 0.25}], lr=1.0)
    utils.set_lr(optimizer, 0.1)
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.1 * 0.25]


def test_set_lr_fills_the_lr_tensors_of_captured_updates_in_place_and_they_train_as_floats_do():
    """utils.StepGraphs keeps each group's lr in a tensor, which its captured update reads at every replay: set_lr
    must fill those tensors, not replace them. Fused AdamW (utils.make_adamw's) then takes the steps it takes with
    float lrs, layer decay's lr_scale included, to the last bit: at lrs that float32, the tensors' dtype, holds
    exactly (at others the update differs by the lr's rounding to float32, a few parts in 10^8)."""
    torch.manual_seed(0)
    nets = {kind: torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)) for kind in ("float", "tensor")}
    nets["tensor"].load_state_dict(nets["float"].state_dict())
    optimizers = {kind: utils.make_adamw([{"params": net[0].parameters(), "lr_scale": 0.5},
                                          {"params": net[1].parameters()}], 1.0, (0.9, 0.95), torch.device("cpu"))
                  for kind, net in nets.items()}
    utils.StepGraphs(optimizers["tensor"])  # puts each group's lr in a tensor; nothing is captured here
    lr_tensors = [group["lr"] for group in optimizers["tensor"].param_groups]
    assert all(isinstance(t, torch.Tensor) for t in lr_tensors)
    x = torch.randn(8, 4)
    for lr in (2 ** -4, 3 * 2 ** -7, 0.0):
        for kind, optimizer in optimizers.items():
            utils.set_lr(optimizer, lr)
            utils.backward(nets[kind](x).square().mean(), optimizer)
            utils.optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False))
        assert all(group["lr"] is t for group, t in zip(optimizers["tensor"].param_groups, lr_tensors, strict=True))
        assert [t.item() for t in lr_tensors] == pytest.approx([lr * 0.5, lr])
        for a, b in zip(nets["float"].parameters(), nets["tensor"].parameters(), strict=True):
            assert torch.equal(a, b)


def test_optimizer_state_saves_float_lrs_and_no_capturable_and_leaves_the_optimizer_as_it_was():
    """A checkpoint written under --capture_step holds what one without it would: float lrs and capturable off, so
    that a run without StepGraphs (on a CPU, say) resumes it. The optimizer keeps its lr tensors."""
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.5)
    optimizer.param_groups[0].update(lr=torch.tensor(0.25), capturable=True)
    saved = utils.optimizer_state(optimizer)
    assert saved["param_groups"][0]["lr"] == 0.25 and type(saved["param_groups"][0]["lr"]) is float
    assert saved["param_groups"][0]["capturable"] is False
    assert isinstance(optimizer.param_groups[0]["lr"], torch.Tensor) and optimizer.param_groups[0]["capturable"]
    plain = utils.make_adamw(net.parameters(), 0.5, (0.9, 0.999), torch.device("cpu"))
    plain.load_state_dict(saved)
    net(torch.randn(3, 2)).sum().backward()
    plain.step()  # a CPU run steps with what it loaded
    assert plain.param_groups[0]["lr"] == 0.25


@pytest.mark.parametrize("device, flags, expected", [
    ("cuda", {}, "default"),  # compiled without torch's CUDA graphs: StepGraphs captures its own
    ("cuda", {"compile_mode": "max-autotune-no-cudagraphs"}, "max-autotune-no-cudagraphs"),
    ("cuda", {"compile": False}, "default"),  # an eager model's kernels are captured as well
    ("cuda", {"compile_mode": "reduce-overhead"},
     "--capture_step captures CUDA graphs of its own; --compile_mode reduce-overhead adds torch's: use default or "
     "max-autotune-no-cudagraphs"),
    ("cuda", {"compile_mode": "max-autotune"}, "--compile_mode max-autotune adds torch's"),
    ("cuda", {"precision": "fp16"}, "--capture_step: fp16's grad scaler reads its overflow check back to the host"),
    ("cpu", {}, "--capture_step captures CUDA graphs: it needs a CUDA device, not cpu"),
])
def test_capture_step_compiles_without_torchs_cuda_graphs_and_refuses_what_cannot_be_captured(
        monkeypatch, capsys, device, flags, expected):
    monkeypatch.setattr(utils, "_compile_unavailable", lambda device: None)
    monkeypatch.setattr(utils, "native_bf16", lambda device: True)  # an H100's answer
    args = SimpleNamespace(**{"precision": None, "compile": None, "compile_mode": None, "compile_scope": "model",
                              "capture_step": True, **flags})
    if "--" not in expected:
        utils.resolve_runtime(args, torch.device(device))  # needs no GPU: it only reads the device's type
        assert args.compile_mode == expected
        return
    with pytest.raises(SystemExit) as exc:
        utils.resolve_runtime(args, torch.device(device))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err


SCHEDULE = dict(batch_size=64, max_device_batch_size=32, total_epoch=2, warmup_epoch=0, base_learning_rate=1e-3,
                weight_decay=0.0, min_lr=0.0, seed=0, schedule="warmup_cosine")


@pytest.mark.parametrize("flag, value, expected", [
    ("batch_size", 0, "--batch_size must be >= 1, got 0"),
    ("max_device_batch_size", 0, "--max_device_batch_size must be >= 1, got 0"),
    ("total_epoch", 0, "--total_epoch must be >= 1, got 0"),
    ("warmup_epoch", -1, "--warmup_epoch must be >= 0, got -1"),
    ("base_learning_rate", 0.0, "--base_learning_rate must be > 0, --weight_decay and --min_lr >= 0, got 0.0, 0.0 "
                                "and 0.0"),
    ("weight_decay", -0.05, "--weight_decay and --min_lr >= 0, got 0.001, -0.05 and 0.0"),
    ("min_lr", -1e-6, "--weight_decay and --min_lr >= 0, got 0.001, 0.0 and -1e-06"),
    ("min_lr", 2.6e-4, "--min_lr 0.00026 is above the peak lr 2.50e-04 (--base_learning_rate x --batch_size / 256)"),
    ("seed", 2 ** 31, "--seed must be in [0, 2^31), got 2147483648"),
])
def test_check_schedule_args_refuses_each_value_out_of_range_and_accepts_the_edges(capsys, flag, value, expected):
    """The edges pass without a word (no warmup, no weight decay, min_lr 0, one epoch, and min_lr at the peak lr
    1e-3 x 64 / 256: a constant lr after warmup); one step past an edge is refused in one line that names the flag
    and the value, exit status 2."""
    args = SimpleNamespace(**SCHEDULE)
    utils.check_schedule_args(args)
    utils.check_schedule_args(SimpleNamespace(**{**SCHEDULE, "total_epoch": 1, "max_device_batch_size": 1}))
    utils.check_schedule_args(SimpleNamespace(**{**SCHEDULE, "min_lr": 1e-3 * 64 / 256}))
    assert capsys.readouterr().err == ""
    setattr(args, flag, value)
    with pytest.raises(SystemExit) as exc:
        utils.check_schedule_args(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_to_cpu_snapshots_are_copies_that_later_in_place_updates_cannot_change():
    """to_cpu copies every tensor of a nest of dicts, lists and tuples (an optimizer state_dict holds all three),
    keeping the containers' types and the other values: the next step's in-place updates leave the snapshot as it
    was."""
    weight = torch.ones(3, requires_grad=True)
    state = {"model": {"w": weight}, "epoch": 5, "param_groups": [{"betas": (0.9, 0.95), "lr": 1e-3}],
             "step": (torch.tensor(2.0),)}
    snapshot = utils.to_cpu(state)
    with torch.no_grad():
        weight.add_(1)
        state["step"][0].add_(1)
    assert torch.equal(snapshot["model"]["w"], torch.ones(3)) and not snapshot["model"]["w"].requires_grad
    assert snapshot["step"][0].item() == 2.0 and type(snapshot["step"]) is tuple
    assert snapshot["param_groups"] == [{"betas": (0.9, 0.95), "lr": 1e-3}] and snapshot["epoch"] == 5
    assert type(snapshot["param_groups"]) is list and type(snapshot["param_groups"][0]["betas"]) is tuple


def test_a_write_that_fails_halfway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    """atomic_save, atomic_copy, save_npy, save_json and write_jsonl write under a temporary name and rename when
    complete: a writer that stops halfway (a kill, a full disk; here one that writes part and raises, or a record
    json cannot write, such as a loss left a tensor, after the lines before it) leaves the file at the path as it
    was, so a failed epoch's outputs never cost the last good ones. Once they are written, only the final names are
    left."""
    import shutil
    ckpt, figure, new_figure = tmp_path / "mae.pt", tmp_path / "grid.png", tmp_path / "epoch_2.png"
    losses, summary, log = tmp_path / "losses.npy", tmp_path / "summary.json", tmp_path / "log.jsonl"
    utils.atomic_save({"epoch": 1}, str(ckpt))
    figure.write_bytes(b"epoch 1 figure")
    new_figure.write_bytes(b"epoch 2 figure")
    utils.save_npy(str(losses), [0.5])
    utils.save_json(str(summary), {"epoch": 1})
    utils.write_jsonl(str(log), [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}])
    saved = {path: path.read_bytes() for path in (ckpt, losses, summary, log)}

    def write_half(data, path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", write_half)
    monkeypatch.setattr(shutil, "copyfile", lambda src, dst: write_half(None, dst))
    monkeypatch.setattr(np, "save", lambda path, values: write_half(values, path))
    with pytest.raises(OSError):
        utils.atomic_save({"epoch": 2}, str(ckpt))
    with pytest.raises(OSError):
        utils.atomic_copy(str(new_figure), str(figure))
    with pytest.raises(OSError):
        utils.save_npy(str(losses), [0.5, 0.25])
    with pytest.raises(TypeError):  # json.dump has written '{"epoch": 2, "loss": ' when it meets the tensor
        utils.save_json(str(summary), {"epoch": 2, "loss": torch.tensor(0.25)})
    with pytest.raises(TypeError):  # a resumed epoch 2 rewrites the log: epoch 1's line is written, epoch 2's cannot be
        utils.write_jsonl(str(log), [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": torch.tensor(0.3)}])
    assert figure.read_bytes() == b"epoch 1 figure"
    assert [path.name for path in saved if path.read_bytes() != saved[path]] == []  # the files that changed
    # and the half-written temporary files are gone, not left to fill the disk
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (ckpt, figure, new_figure, losses, summary, log))
    monkeypatch.undo()
    utils.atomic_save({"epoch": 2}, str(ckpt))
    utils.atomic_copy(str(new_figure), str(figure))
    utils.save_npy(str(losses), [0.5, 0.25])
    utils.save_json(str(summary), {"epoch": 2, "loss": 0.25})
    utils.write_jsonl(str(log), [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.3}])
    assert torch.load(ckpt, weights_only=True) == {"epoch": 2} and figure.read_bytes() == b"epoch 2 figure"
    assert np.load(losses).tolist() == [0.5, 0.25] and json.loads(summary.read_text()) == {"epoch": 2, "loss": 0.25}
    assert utils.read_jsonl(str(log), "--output_dir") == [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.3}]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (ckpt, figure, new_figure, losses, summary, log))


def test_each_atomic_write_has_a_temporary_name_of_its_own_beside_the_file_with_its_extension(tmp_path):
    """atomic_path's temporary name is in the file's folder (a rename across file systems would not be atomic), ends
    in the file's extension (np.save, savefig and PIL pick the format by it), and is new for each write, so that two
    writers of one path, or a stale file or folder left by a killed run, never meet: here a folder under the first
    name and a second write of the same path while the first is open."""
    path = tmp_path / "mae.pt"
    with utils.atomic_path(str(path)) as first:
        os.mkdir(first)  # what a killed run, or anything else, may have left under a temporary name
        with utils.atomic_path(str(path)) as second:
            assert os.path.dirname(second) == str(tmp_path) and second.endswith(".pt") and second != first
            torch.save({"epoch": 1}, second)
        os.rmdir(first)
        torch.save({"epoch": 2}, first)
    assert torch.load(path, weights_only=True) == {"epoch": 2} and os.listdir(tmp_path) == ["mae.pt"]
    with pytest.raises(ValueError):  # a block that fails: its file deleted, the file at the path untouched
        with utils.atomic_path(str(path)) as tmp:
            torch.save({"epoch": 3}, tmp)
            raise ValueError
    assert torch.load(path, weights_only=True) == {"epoch": 2} and os.listdir(tmp_path) == ["mae.pt"]


def test_a_file_name_at_its_file_systems_limit_is_written_atomically_and_a_longer_one_is_refused(tmp_path, capsys):
    """A name as long as the file system allows is written (atomic_path's temporary name, which adds about 20
    characters, cuts the stem short rather than fail at the first save); check_name_length passes it, also in a
    folder still to be made, and refuses one byte more in one line naming the flag, exit status 2."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    path = tmp_path / ("m" * (limit - 3) + ".pt")
    utils.check_name_length("--model_path", str(tmp_path / "to_make" / path.name))
    utils.atomic_save({"epoch": 1}, str(path))
    assert torch.load(path, weights_only=True) == {"epoch": 1} and os.listdir(tmp_path) == [path.name]
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as exc:
        utils.check_name_length("--model_path", str(tmp_path / "to_make" / ("m" + path.name)))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        f"--model_path: the file name {'m' * 24!r}... is {limit + 1} bytes, longer than the {limit} its file system "
        "allows"), err


def test_a_folder_under_an_output_name_or_pattern_is_refused_and_a_link_or_an_unlistable_folder_is_not(
        tmp_path, capsys, monkeypatch):
    """check_no_folder_at: a real folder under one of the names, or matching a pattern, ends the run in one line
    (status 2); a file, a link to a folder (the write replaces the link) and a folder of another name do not. In a
    folder that cannot be listed (write and search permission only, which a run needs), the names are still
    checked, with no traceback."""
    (tmp_path / "other").mkdir()
    (tmp_path / "args.json").write_text("{}")
    (tmp_path / "log.jsonl").symlink_to(tmp_path / "other")
    (tmp_path / "recon_epoch_001.png").write_bytes(b"png")
    names, patterns = ["args.json", "log.jsonl", "losses.npy"], ["recon_epoch_*.png"]
    utils.check_no_folder_at("--output_dir", str(tmp_path), names, patterns)
    utils.check_no_folder_at("--output_dir", str(tmp_path / "missing"), names, patterns)
    for folder in ("losses.npy", "recon_epoch_012.png"):
        (tmp_path / folder).mkdir()
        with pytest.raises(SystemExit) as exc:
            utils.check_no_folder_at("--output_dir", str(tmp_path), names, patterns)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith(
            f"--output_dir: {str(tmp_path / folder)!r} is a folder: this script writes a file of that name there")
        (tmp_path / folder).rmdir()

    def unlistable(path):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "scandir", unlistable)
    (tmp_path / "recon_epoch_012.png").mkdir()
    utils.check_no_folder_at("--output_dir", str(tmp_path), names, patterns)  # the pattern cannot be checked
    (tmp_path / "losses.npy").mkdir()
    with pytest.raises(SystemExit):
        utils.check_no_folder_at("--output_dir", str(tmp_path), names, patterns)
    assert "losses.npy' is a folder" in capsys.readouterr().err


def test_a_jsonl_log_reads_back_what_was_written_and_anything_else_is_one_line(tmp_path, capsys):
    """write_jsonl writes one JSON object a line; read_jsonl gives them back, skipping blank lines, and [] for no
    log. A line that is not an object with an integer epoch ends the run in one line naming the flag, status 2."""
    path = tmp_path / "log.jsonl"
    records = [{"epoch": 1, "loss": 0.5}, {"epoch": 2, "loss": 0.25}]
    utils.write_jsonl(str(path), records)
    assert path.read_text().splitlines() == [json.dumps(r) for r in records]
    assert utils.read_jsonl(str(path), "--output_dir") == records
    path.write_text(path.read_text() + "\n  \n")  # an editor's trailing blank lines
    assert utils.read_jsonl(str(path), "--output_dir") == records
    assert utils.read_jsonl(str(tmp_path / "none.jsonl"), "--output_dir") == []
    for text in ('{"epoch": "1"}\n', '{"epoch": 1.0}\n', '{"epoch": true}\n', '{"loss": 0.5}\n', "[1, 2]\n"):
        path.write_text(text)
        with pytest.raises(SystemExit) as exc:
            utils.read_jsonl(str(path), "--output_dir")
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--output_dir: {str(path)!r} is not a per-epoch log" in err, err


def test_load_checkpoint_loads_plain_tensors_only_and_says_what_is_wrong(tmp_path, capsys):
    """A dict of tensors loads, in torch's zip format or its legacy pickle one; a bare tensor, a dict without a
    required key and a file that pickles an object (which a full unpickler would construct, running its code) are
    refused in one line naming the flag, exit status 2."""
    path = tmp_path / "ckpt.pt"
    good = {"model": {"w": torch.arange(3.0)}, "epoch": 2}
    for zip_format in (True, False):
        torch.save(good, path, _use_new_zipfile_serialization=zip_format)
        ckpt = utils.load_checkpoint(str(path), "--resume", {"model": dict, "epoch": int})
        assert torch.equal(ckpt["model"]["w"], good["model"]["w"]) and ckpt["epoch"] == 2
    for obj, expected in ((torch.zeros(3), "not a checkpoint of this project (expected a dict, found Tensor)"),
                          ({"model": {}}, "not a checkpoint of this project (missing epoch)"),
                          ({"model": {}, "epoch": SimpleNamespace(step=2)}, "not a readable checkpoint")):
        torch.save(obj, path)
        with pytest.raises(SystemExit) as exc:
            utils.load_checkpoint(str(path), "--resume", {"model": dict, "epoch": int})
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--resume {str(path)!r}: {expected}" in err, err


def test_load_checkpoint_checks_the_type_of_each_field_and_of_optional_ones_that_are_there(tmp_path, capsys):
    """Each field, and each optional one the file holds, must have its type (a bool is not an int); a missing
    optional field is no error. Every wrong field is named, in one line."""
    path = tmp_path / "ckpt.pt"
    fields, optional = {"model": dict, "epoch": int}, {"sha": (str, type(None)), "classes": list}
    for good in ({"model": {}, "epoch": 3}, {"model": {}, "epoch": 3, "sha": None, "classes": ["a"]},
                 {"model": {}, "epoch": 3, "sha": "ab"}):
        torch.save(good, path)
        assert utils.load_checkpoint(str(path), "--resume", fields, optional) == good
    for bad, expected in (
            ({"model": [], "epoch": 3}, "its model is of type list, not dict"),
            ({"model": {}, "epoch": True}, "its epoch is of type bool, not int"),
            ({"model": {}, "epoch": 3.0, "sha": 5},
             "its epoch is of type float, not int; its sha is of type int, not str or NoneType"),
            ({"model": {}, "epoch": 3, "classes": "ab"}, "its classes is of type str, not list")):
        torch.save(bad, path)
        with pytest.raises(SystemExit) as exc:
            utils.load_checkpoint(str(path), "--resume", fields, optional)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.endswith(f"not a checkpoint of this project ({expected})"), err


def test_is_number_takes_ints_and_floats_but_not_bools_text_or_ints_no_float_holds():
    assert [utils.is_number(v) for v in (1, 0.5, float("nan"), 2 ** 1000, True, "1", None, 10 ** 400)] == \
        [True] * 4 + [False] * 4


def test_a_log_that_is_no_regular_file_is_refused_in_one_line_not_read(tmp_path, capsys):
    """A fifo under a log's name blocked the read for ever."""
    path = tmp_path / "log.jsonl"
    os.mkfifo(path)
    with pytest.raises(SystemExit) as exc:
        utils.read_jsonl(str(path), "--output_dir")
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().endswith(f"--output_dir: {str(path)!r} is not a regular file")


def test_a_state_loads_into_a_meta_module_by_assignment_without_a_warning_and_into_a_real_one_by_copy():
    """load_state_dict_checked into a module on the meta device (how a --resume or --pretrained_model_path checkpoint
    is checked before training, with no memory) takes the state's tensors as they are, with no warning: a copy into
    a meta tensor does nothing but warn, once a parameter, lines every resumed run and fine-tune would print. Into a
    real module (the fine-tune's encoder) it copies: the parameters stay the module's own, so an optimizer built over
    them steps what the model uses, and hold the state's values."""
    import warnings

    def build():
        return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    state = {name: torch.randn_like(t) for name, t in build().state_dict().items()}
    with torch.device("meta"):
        meta_module = build()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert utils.load_state_dict_checked(meta_module, state) == ""
    assert [str(w.message) for w in caught] == []
    loaded = meta_module.state_dict()
    assert list(loaded) == list(state)
    for name, t in state.items():
        assert not loaded[name].is_meta and torch.equal(loaded[name], t), name
    real_module = build()
    parameters = list(real_module.parameters())
    assert utils.load_state_dict_checked(real_module, state) == ""
    assert all(a is b for a, b in zip(real_module.parameters(), parameters))
    for name, t in real_module.state_dict().items():
        assert torch.equal(t, state[name]) and t.data_ptr() != state[name].data_ptr(), name


def test_a_state_with_an_entry_that_is_no_named_tensor_with_values_is_said_in_a_few_words():
    """A key that is no name (load_state_dict's AttributeError), a value that is no tensor, a meta tensor (no
    values: copying it out raised NotImplementedError) or a complex one (loaded with a warning at most) is named,
    not a traceback."""
    module = torch.nn.Linear(3, 2)
    state = module.state_dict()
    for key, value in ((5, torch.zeros(1)), ("weight", [1.0]), ("bias", torch.zeros(2, device="meta")),
                       ("bias", torch.zeros(2, dtype=torch.complex64))):
        assert utils.load_state_dict_checked(module, {**state, key: value}) == \
            f"entries that are not a name with a real tensor of values: {key!r}"


def test_model_sizes_past_int64_are_one_line(capsys):
    """An --embed_dim of 2**64 fails in torch.empty with TypeError ("Overflow when unpacking long long"), past the
    shapes' int64 product ones with RuntimeError: both are one line."""
    for dim in (2 ** 64, 2 ** 40):
        with pytest.raises(SystemExit) as exc:
            utils.check_model_fits(lambda: torch.nn.Linear(dim, dim), torch.device("cpu"))
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "no such model can be built" in err, err


@pytest.mark.parametrize("optimizer", ["a tensor", "a list", "state a list", "a group a tensor",
                                       "a group without params", "params a tensor"])
def test_an_optimizer_state_that_is_not_a_state_dict_is_refused_in_one_line(capsys, optimizer):
    """check_resume_state refuses a --resume checkpoint whose optimizer entry is not an optimizer's state_dict (an
    edited file: weights_only loads tensors, lists and dicts in any nesting) in one line, exit status 2, before
    optimizer.load_state_dict would meet it with a traceback after args.json was rewritten. A tensor where a dict or
    list belongs is refused too: indexed by a name, it raised IndexError (and warned), not the error expected."""
    model = torch.nn.Linear(2, 2)
    groups = utils.weight_decay_groups(model, 0.05)
    good = torch.optim.AdamW(groups).state_dict()
    utils.check_resume_state({"model": model.state_dict(), "optimizer": good}, SimpleNamespace(resume="r.pt"), model,
                             groups)
    saved = {"a tensor": torch.zeros(2), "a list": [good],
             "state a list": {**good, "state": []},
             "a group a tensor": {**good, "param_groups": [good["param_groups"][0], torch.zeros(1)]},
             "a group without params": {**good, "param_groups": [{"lr": 1e-3}, good["param_groups"][1]]},
             "params a tensor": {**good, "param_groups": [{**good["param_groups"][0], "params": torch.zeros(1)},
                                                          good["param_groups"][1]]}}[optimizer]
    with pytest.raises(SystemExit) as exc:
        utils.check_resume_state({"model": model.state_dict(), "optimizer": saved}, SimpleNamespace(resume="r.pt"),
                                 model, groups)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "error: --resume 'r.pt': its optimizer state is not an optimizer's state_dict"), err


def test_all_gather_cat_puts_every_ranks_shard_back_in_rank_order(monkeypatch):
    """Under torchrun each of 3 processes holds its shard of 10 rows (3, 3 and 4 of them); all_gather needs equal
    shapes, so each sends its shard padded to 4 rows, and the padding is dropped again: every rank gets the 10 rows
    in order. all_gather is played here by a stand-in that hands over every rank's padded shard."""
    n, world_size = 10, 3
    rows = torch.arange(1.0, 2 * n + 1).view(n, 2)
    monkeypatch.setattr(utils.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(utils.dist, "get_world_size", lambda: world_size)

    def all_gather(parts, padded):
        assert padded.shape == (4, 2) and len(parts) == world_size
        for rank, part in enumerate(parts):
            shard = rows[utils.shard(n, rank, world_size)]
            part.copy_(torch.cat([shard, torch.zeros(4 - len(shard), 2)]))
    monkeypatch.setattr(utils.dist, "all_gather", all_gather)
    assert [len(rows[utils.shard(n, rank, world_size)]) for rank in range(world_size)] == [3, 3, 4]
    for rank in range(world_size):
        assert torch.equal(utils.all_gather_cat(rows[utils.shard(n, rank, world_size)], n), rows)


def test_embed_all_returns_float32_whatever_the_features_dtype():
    """Features computed in bf16 (under autocast) come back as float32: the kNN bank and the probe's inputs are
    fp32 whatever the precision."""
    import data
    images = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    feats = utils.embed_all(lambda x: x.flatten(1)[:, :3].bfloat16(), images, 2, None, torch.device("cpu"))
    assert feats.dtype == torch.float32
    assert torch.equal(feats, data.normalize(images).flatten(1)[:, :3].bfloat16().float())


def test_an_output_folder_must_be_writable_and_searchable_and_exist_unless_it_may_be_made(tmp_path, monkeypatch,
                                                                                          capsys):
    """A folder that does not exist passes when it can be made (create) and is refused when it must exist already;
    its nearest existing ancestor must allow writing and searching (w and x: a file is made in a folder through
    both), else one line names the flag."""
    def refused(folder, create=True):
        with pytest.raises(SystemExit) as exc:
            utils.check_output_folder("--cls_dir", str(folder), create=create)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        return err
    utils.check_output_folder("--cls_dir", str(tmp_path / "new" / "deeper"))
    assert f"--cls_dir: folder {str(tmp_path / 'new')!r} does not exist" in refused(tmp_path / "new", create=False)
    utils.check_output_folder("--cls_dir", str(tmp_path), create=False)
    # Root passes every permission check, so a folder with w but without x is simulated as os.access sees it.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: not mode & os.X_OK and real_access(path, mode))
    assert f"--cls_dir: cannot write in {str(tmp_path)!r}" in refused(tmp_path)


def test_output_folders_are_made_by_rank_0_alone_and_stop_at_the_first_that_fails(tmp_path, monkeypatch, capsys):
    """make_output_folders makes the folders in order and stops at the first that cannot be made, in one line that
    names its flag, without making the ones after it, and removes those it made before it (a refused run leaves
    nothing behind) but no folder that was there. Under torchrun rank 0 alone makes them, and every other rank
    stops too, in one line, when rank 0 could not (utils.all_processes is played by a stand-in here)."""
    cpu = torch.device("cpu")
    (tmp_path / "a_file").write_text("in the way")
    (tmp_path / "there" / "empty").mkdir(parents=True)
    folders = {"--output_dir": str(tmp_path / "out" / "nested"), "--model_path": str(tmp_path / "there" / "new"),
               "--log_dir": str(tmp_path / "a_file" / "logs"), "--cls_dir": str(tmp_path / "after")}
    with pytest.raises(SystemExit) as exc:
        utils.make_output_folders(folders, cpu)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"error: --log_dir: cannot write in folder {str(tmp_path / 'a_file' / 'logs')!r}" in err, err
    assert sorted(os.listdir(tmp_path)) == ["a_file", "there"] and os.listdir(tmp_path / "there") == ["empty"]

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    utils.make_output_folders({"--output_dir": str(tmp_path / "rank1")}, cpu)
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setattr(utils, "all_processes", lambda ok, device: False)
    with pytest.raises(SystemExit) as exc:
        utils.make_output_folders({"--output_dir": str(tmp_path / "rank1")}, cpu)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.endswith("error: rank 0 could not make the output folders (its own line says which)"), err


def test_save_npy_keeps_float64_by_default(tmp_path):
    """The per-epoch curves (losses.npy, accuracies) are saved as float64, so each value reads back as the Python
    float that was logged, bit for bit (float32 would round 0.1 to 0.10000000149)."""
    values = [0.1, 1 / 3, 2.5e-7, 123456.789]
    utils.save_npy(str(tmp_path / "losses.npy"), values)
    saved = np.load(tmp_path / "losses.npy")
    assert saved.dtype == np.float64 and saved.tolist() == values


def test_the_scripts_start_without_timm_or_the_compiler():
    """A fresh process that imports the three scripts (and with them model, utils and data) loads neither timm nor
    torch._dynamo: each cost about 2.5 s of a 2-core CPU's start-up, which `--help`, a one-line flag error and an
    eager run would pay for nothing. model.py writes out the two pieces it took from timm.layers, train_classifier
    imports timm's Mixup only when a run mixes, and utils.eager sets its stance when entered, not when a module
    decorates a function with it (that evaluation still runs eager under --compile, the compiled runs' tests check:
    no graph beyond training's)."""
    code = ("import sys, mae_pretrain, train_classifier, plot_results; "
            "print(sorted({'timm', 'torch._dynamo'} & set(sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"


def test_help_gives_each_default_a_flag_has_and_none_it_resolves_at_run_time():
    """--help ends a flag's text with its default, as the README's Flags tables give it; a flag whose default is
    None (resolved from the device or a checkpoint), empty, or a switch that is off gets no default to mislead."""
    import mae_pretrain
    options = {}
    for block in re.split(r"\n  (?=-)", mae_pretrain.get_args_parser().format_help()):
        options[block.split()[0]] = " ".join(block.split())
    assert options["--seed"].endswith("(default: 42)")
    assert options["--mask_ratio"].endswith("(default: 0.75)")
    assert options["--val_split"].endswith("(default: 0)")  # a default of 0 is a default
    assert options["--device"].endswith("(default: cuda when available, else cpu after a warning)")  # its own text
    for flag in ("--resume", "--augment", "--compile_mode", "--precision"):
        assert not re.search(r"\(default: (None|False|)\)$", options[flag]), options[flag]
