"""Tests of model.py: shapes, masking, patch layout, the loss definition.

Run: python -m pytest -q tests/test_model.py
"""
from functools import partial

import pytest
import timm.models.vision_transformer
import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

from model import (MAE, Block, DropPath, MAEConfig, MAEDecoder, MAEEncoder, RunningMeanBatchNorm, ViTClassifier,
                   encoder_state_from_mae, masked_mse, normalize_patches, num_masked_patches, patchify,
                   random_masking, reconstruct, sincos_pos_embed, to_shuffled_order, unpatchify)

SMALL = dict(embed_dim=32, depth=2, num_heads=2, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)


def test_default_config_is_vit_tiny_patch2():
    cfg = MAEConfig()
    assert (cfg.img_size, cfg.patch_size, cfg.num_patches) == (32, 2, 256)
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio) == (192, 12, 3, 4.0)
    assert (cfg.decoder_depth, cfg.decoder_num_heads, cfg.mask_ratio) == (4, 3, 0.75)


def test_output_shapes():
    cfg = MAEConfig(**SMALL)
    model = MAE(cfg)
    imgs = torch.randn(5, 3, 32, 32)
    loss, pred, mask = model(imgs)
    assert loss.shape == ()
    assert pred.shape == (5, 256, 2 * 2 * 3)
    assert mask.shape == (5, 256)
    latent, _, _ = model.encoder.forward_masked(imgs, 0.75)
    assert latent.shape == (5, 1 + 64, 32)  # class token + the visible quarter
    assert model.encoder(imgs).shape == (5, 1 + 256, 32)
    assert ViTClassifier(cfg, num_classes=10)(imgs).shape == (5, 10)
    assert ViTClassifier(cfg, num_classes=7, global_pool="avg", linear_probe=True)(imgs).shape == (5, 7)


@pytest.mark.parametrize("mask_ratio", [0.0, 0.25, 0.5, 0.75, 0.9, 0.95])
def test_exactly_int_n_ratio_masked_per_sample(mask_ratio):
    x = torch.randn(6, 256, 8)
    x_visible, mask, _ = random_masking(x, mask_ratio)
    assert torch.all(mask.sum(dim=1) == int(256 * mask_ratio))
    assert x_visible.shape == (6, 256 - int(256 * mask_ratio), 8)


def test_visible_tokens_are_the_unmasked_ones_and_restore_undoes_the_shuffle():
    B, N = 4, 64
    x = torch.arange(N).float().view(1, N, 1).expand(B, N, 3).clone()  # each token carries its own index
    x_visible, mask, ids_restore = random_masking(x, 0.75)
    for b in range(B):
        kept = x_visible[b, :, 0].long().sort().values
        assert torch.equal(kept, torch.nonzero(mask[b] == 0).flatten())
    # Re-assembling visible + placeholders in shuffled order and gathering with ids_restore gives image order.
    shuffled = torch.cat([x_visible, torch.full((B, N - x_visible.shape[1], 3), -1.0)], dim=1)
    restored = shuffled.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, 3))
    assert torch.equal(restored[..., 0] >= 0, mask == 0)
    assert torch.equal(restored[mask == 0], x[mask == 0])


def test_encoder_sees_only_the_visible_patches():
    cfg = MAEConfig(**SMALL)
    model = MAE(cfg).eval()
    seen = {}
    model.encoder.blocks[0].register_forward_pre_hook(lambda m, inp: seen.setdefault("x", inp[0]))
    imgs = torch.randn(3, 3, 32, 32)
    _, _, mask = model(imgs)
    tokens = model.encoder.embed(imgs)
    first_block_input = seen["x"][:, 1:]  # drop the class token
    for b in range(3):
        expected = tokens[b][mask[b] == 0]  # visible tokens in image order
        got = first_block_input[b]
        # The encoder receives them in shuffled order: compare as sets by sorting on a fixed projection.
        key = torch.randn(cfg.embed_dim)
        assert torch.allclose(got[(got @ key).argsort()], expected[(expected @ key).argsort()], atol=1e-6)


@pytest.mark.parametrize("patch_size", [2, 4])
def test_patch_embedding_is_the_convolution_of_its_weights_with_positions_added(patch_size):
    # embed applies the Conv2d's parameters as a linear map on flattened patches; torch's own convolution with the
    # same parameters is the reference, token n being grid cell n in row-major order.
    torch.manual_seed(0)
    encoder = MAE(MAEConfig(**SMALL, patch_size=patch_size)).encoder
    imgs = torch.randn(3, 3, 32, 32)
    conv = torch.nn.functional.conv2d(imgs, encoder.patch_embed.weight, encoder.patch_embed.bias, stride=patch_size)
    expected = conv.flatten(2).transpose(1, 2) + encoder.pos_embed
    torch.testing.assert_close(encoder.embed(imgs), expected, rtol=1e-5, atol=1e-5)
    assert list(encoder.patch_embed.state_dict()) == ["weight", "bias"]
    assert encoder.patch_embed.weight.shape == (32, 3, patch_size, patch_size)  # checkpoints keep the conv's shape


def test_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 32, 32)
    for p in (2, 4, 8):
        patches = patchify(x, p)
        assert patches.shape == (2, (32 // p) ** 2, p * p * 3)
        assert torch.equal(unpatchify(patches, p), x)
    patches = patchify(x, 4)
    # Patch 1 is the second patch of the first row; its first pixel is x[:, :, 0, 4].
    assert torch.equal(patches[:, 1, :3], x[:, :, 0, 4])


def test_loss_ignores_visible_patches_of_the_prediction():
    model = MAE(MAEConfig(**SMALL))
    imgs = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 256)
    loss, pred, mask = model(imgs, noise=noise)
    target = patchify(imgs, 2)
    changed = pred + 5.0 * (1 - mask).unsqueeze(-1) * torch.randn_like(pred)
    assert torch.allclose(masked_mse(changed, target, mask), loss)
    changed_masked = pred + 0.5 * mask.unsqueeze(-1) * torch.randn_like(pred)
    assert not torch.allclose(masked_mse(changed_masked, target, mask), loss)


@pytest.mark.parametrize("mask_ratio", [0.75, 0.5])
def test_loss_equals_reference_formula_longhand(mask_ratio):
    cfg = MAEConfig(**SMALL, mask_ratio=mask_ratio)
    imgs = torch.randn(3, 3, 32, 32)
    loss, pred, mask = MAE(cfg)(imgs)
    # The reference: predicted image and a pixel-level mask, mean over everything, divided by mask_ratio.
    pred_img = unpatchify(pred, 2)
    pixel_mask = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 12), 2)
    reference = torch.mean((pred_img - imgs) ** 2 * pixel_mask) / mask_ratio
    assert torch.allclose(loss, reference, rtol=1e-5)
    # And the definition itself, summed by hand over masked patches.
    total, count = 0.0, 0
    target = patchify(imgs, 2)
    for b in range(3):
        for n in range(256):
            if mask[b, n] == 1:
                total += ((pred[b, n] - target[b, n]) ** 2).mean().item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_counts_stay_exact_under_low_precision_autocast(dtype):
    # 343 images x 192 masked patches = 65,856 masked patches: past fp16's largest number (65,504), and with 11
    # significant bits, more than bf16 holds. The loss divides by that count, the val PSNR by a multiple of it.
    cfg = MAEConfig(embed_dim=16, depth=1, num_heads=1, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1)
    torch.manual_seed(0)
    model, imgs, noise = MAE(cfg), torch.randn(343, 3, 32, 32), torch.rand(343, 256)
    with torch.autocast("cpu", dtype=dtype):
        loss, pred, mask = model(imgs, noise=noise)
    assert mask.dtype == torch.float32 and mask.sum().item() == 343 * 192
    expected = masked_mse(pred.float(), patchify(imgs, 2), mask.bool().double()).item()
    assert loss.item() == pytest.approx(expected, rel=1e-5) and loss.item() > 0


def test_norm_pix_loss_target_and_reconstruction():
    cfg = MAEConfig(**SMALL, norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = MAE(cfg)(imgs)
    normed, mean, std = normalize_patches(patchify(imgs, 2))
    assert torch.allclose(loss, masked_mse(pred, normed, mask))
    # A perfect normalised prediction must reconstruct the original image exactly once de-normalised.
    masked_view, recon = reconstruct(imgs, normed, mask, 2, norm_pix_loss=True)
    assert torch.allclose(recon, imgs, atol=1e-5)
    assert torch.all(masked_view[unpatchify(mask.unsqueeze(-1).expand(-1, -1, 12), 2) == 1] == 0)


def test_same_seed_same_mask_and_loss_other_seed_other_mask():
    model = MAE(MAEConfig(**SMALL))
    imgs = torch.randn(2, 3, 32, 32)

    def run(seed):
        torch.manual_seed(seed)
        loss, _, mask = model(imgs)
        return loss, mask
    (l1, m1), (l2, m2), (_, m3) = run(0), run(0), run(1)
    assert torch.equal(m1, m2) and torch.equal(l1, l2)
    assert not torch.equal(m1, m3)


def test_bad_mask_ratio_is_a_clear_error():
    for ratio in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="mask_ratio"):
            MAEConfig(mask_ratio=ratio)
    model = MAE(MAEConfig(**SMALL))
    with pytest.raises(ValueError, match="mask_ratio"):
        model(torch.randn(1, 3, 32, 32), mask_ratio=1.0)


def test_classifier_takes_the_encoder_weights():
    cfg = MAEConfig(**SMALL)
    mae = MAE(cfg)
    clf = ViTClassifier(cfg, num_classes=10)
    result = clf.encoder.load_state_dict(encoder_state_from_mae(mae.state_dict()))
    assert not result.missing_keys and not result.unexpected_keys
    for name, p in mae.encoder.state_dict().items():
        assert torch.equal(clf.encoder.state_dict()[name], p)


def test_drop_path_zeroes_whole_samples_and_keeps_the_expectation():
    torch.manual_seed(0)
    x = torch.ones(4000, 3, 2)
    y = DropPath(0.25).train()(x)
    per_sample = y.flatten(1)
    zeroed = (per_sample == 0).all(dim=1)
    assert (zeroed | (per_sample == 1 / 0.75).all(dim=1)).all()  # each sample dropped or scaled as a whole
    assert abs(zeroed.float().mean().item() - 0.25) < 0.03  # 4.4 standard deviations of a binomial share
    assert torch.equal(DropPath(0.25).eval()(x), x)
    assert torch.equal(DropPath(0.0).train()(x), x)


def test_drop_path_rates_grow_with_depth_and_are_not_saved():
    cfg = MAEConfig(**{**SMALL, "depth": 5})
    model = ViTClassifier(cfg, 10, drop_path_rate=0.2)
    for block, rate in zip(model.encoder.blocks, (0.0, 0.05, 0.1, 0.15, 0.2)):
        assert block.drop_path1.drop_prob.item() == block.drop_path2.drop_prob.item() == pytest.approx(rate)
    # Non-persistent: checkpoints with and without drop path have the same keys.
    assert model.state_dict().keys() == ViTClassifier(cfg, 10).state_dict().keys()


def test_probe_norm_is_batchnorm_with_a_plain_mean_of_the_batch_statistics():
    """Train mode: the output and running statistics of torch's BatchNorm1d(momentum=None), which averages every
    batch's statistics equally (the batches here are of equal size), and torch's own eval-mode normalisation; the
    same state_dict keys, the count one of images. And no host read of the count: a compiled step stays one
    graph."""
    torch.manual_seed(0)
    ours, torchs = RunningMeanBatchNorm(8), nn.BatchNorm1d(8, eps=1e-6, affine=False, momentum=None)
    for scale in (1.0, 3.0, 0.5):
        x = torch.randn(16, 8) * scale + scale
        torch.testing.assert_close(ours(x), torchs(x))
    assert list(ours.state_dict()) == list(torchs.state_dict())
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(ours.state_dict()[name], torchs.state_dict()[name])
    assert torchs.num_batches_tracked.item() == 3 and ours.num_batches_tracked.item() == 3 * 16
    ours.eval(), torchs.eval()
    x = torch.randn(4, 8)
    torch.testing.assert_close(ours(x), torchs(x))

    from torch._dynamo.testing import CompileCounter
    ours.train()
    counter = CompileCounter()
    step = torch.compile(ours, backend=counter, fullgraph=True)  # fullgraph: a graph break would raise
    for _ in range(3):
        step(torch.randn(16, 8))
    assert counter.frame_count == 1 and ours.num_batches_tracked.item() == 6 * 16
    with pytest.raises(ValueError, match="at least 2 samples"):
        ours(torch.randn(1, 8))


def test_block_is_timms_vit_block_with_its_parameters_in_its_order():
    """model.Block is written out (for `queries`) but must stay timm's ViT block: the same state_dict keys in the
    same order (checkpoints and optimizer states carry over) and, with the same weights, the same output."""
    torch.manual_seed(0)
    ours = Block(32, 2, 4.0)
    theirs = timm.models.vision_transformer.Block(32, 2, 4.0, qkv_bias=True,
                                                  norm_layer=partial(nn.LayerNorm, eps=1e-6))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [t.shape for t in ours.state_dict().values()] == [t.shape for t in theirs.state_dict().values()]
    theirs.load_state_dict({k: torch.randn_like(v) for k, v in ours.state_dict().items()})
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 9, 32)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)


def test_block_drops_each_residual_branch_per_sample_in_training():
    """In training, a Block with drop path 0.5 is x + keep1 * attn(norm1(x)) / 0.5, then + keep2 * mlp(norm2(.)) /
    0.5, written out here with the per-sample draws replayed from the same seed in the same order (the attention's
    branch first): each of the two branches is dropped on its own."""
    torch.manual_seed(0)
    block, x = Block(16, 2, 4.0, drop_path=0.5).train(), torch.randn(8, 5, 16)
    torch.manual_seed(1)
    out = block(x)
    torch.manual_seed(1)
    keep1, keep2 = ((torch.rand(8, 1, 1) < 0.5).float() for _ in range(2))
    with torch.no_grad():
        h = x + keep1 * block.attn(block.norm1(x)) / 0.5
        expected = h + keep2 * block.mlp(block.norm2(h)) / 0.5
    assert 0 < keep1.sum() < 8 and 0 < keep2.sum() < 8 and not torch.equal(keep1, keep2)  # a test of both branches
    torch.testing.assert_close(out.detach(), expected)


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.3])
def test_class_token_only_gives_the_full_outputs_class_token_and_its_gradients(drop_path_rate):
    """The classifier pooled on the class token runs its last block for that token alone: its logits and every
    parameter's gradient are those of the full encoder output's class token (drop path included: the same
    per-sample draws, in the same order)."""
    cfg = MAEConfig(**{**SMALL, "depth": 3})
    torch.manual_seed(0)
    model = ViTClassifier(cfg, 10, drop_path_rate=drop_path_rate).train()
    imgs = torch.randn(4, 3, 32, 32)

    def logits_and_grads(features):
        model.zero_grad()
        torch.manual_seed(1)
        logits = model.head(features(imgs))
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    got, got_grads = logits_and_grads(model.features)
    assert model.encoder(imgs, class_token_only=True).shape == (4, 1, 32)
    expected, expected_grads = logits_and_grads(lambda x: model.encoder(x)[:, 0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
    assert expected_grads["encoder.blocks.2.mlp.fc1.weight"].abs().sum() > 0  # the last block's MLP does count


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("decoder_depth", [1, 2])
def test_masked_only_gives_the_full_predictions_masked_patches_and_the_same_loss_and_gradients(decoder_depth,
                                                                                                norm_pix_loss):
    """Training predicts the masked patches alone (the decoder's last block and pixel head run for them only): its
    predictions are the full forward's at the masked patches, in the order of the shuffle, and its loss and every
    parameter's gradient are the full forward's."""
    cfg = MAEConfig(**{**SMALL, "decoder_depth": decoder_depth}, norm_pix_loss=norm_pix_loss)
    torch.manual_seed(0)
    model = MAE(cfg)
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 256)

    def run(masked_only):
        model.zero_grad()
        loss, pred, mask = model(imgs, noise=noise, masked_only=masked_only)
        loss.backward()
        return loss.detach(), pred.detach(), mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, pred, mask, grads = run(masked_only=True)
    full_loss, full_pred, full_mask, full_grads = run(masked_only=False)
    assert pred.shape == (4, 192, 12) and torch.equal(mask, full_mask)
    masked_ids = noise.argsort(dim=1)[:, 64:]  # the hidden patches, lowest noise first
    torch.testing.assert_close(pred, full_pred[torch.arange(4)[:, None], masked_ids], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, full_loss, rtol=1e-5, atol=1e-7)
    for name, grad in full_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert full_grads["decoder.blocks.%d.mlp.fc1.weight" % (decoder_depth - 1)].abs().sum() > 0


def test_to_shuffled_order_is_random_maskings_order():
    """Its first N_visible rows are random_masking's visible tokens, in their order; the rest are the masked patches
    in ascending noise, as an argsort of the noise puts them."""
    noise, x = torch.rand(3, 16), torch.randn(3, 16, 5)
    visible, _, ids_restore = random_masking(x, 0.75, noise)
    shuffled = to_shuffled_order(x, ids_restore)
    assert torch.equal(shuffled[:, :4], visible)
    assert torch.equal(shuffled, x[torch.arange(3)[:, None], noise.argsort(dim=1)])


def test_both_forwards_take_their_loss_from_masked_mse_alone(monkeypatch):
    """model.masked_mse is the one place to change the loss: an L1 loss put there is what the training forward
    (masked_only) and the evaluation forward both return, each the mean absolute error of its masked patches."""
    import model as model_module

    def l1(pred, target, mask):
        err = (pred - target).abs()
        return err.mean() if mask is None else (err.mean(dim=-1) * mask).sum() / mask.sum()
    monkeypatch.setattr(model_module, "masked_mse", l1)
    torch.manual_seed(0)
    mae, imgs, noise = MAE(MAEConfig(**SMALL)), torch.randn(2, 3, 32, 32), torch.rand(2, 256)
    full_loss, pred, mask = mae(imgs, noise=noise)
    masked_loss, _, _ = mae(imgs, noise=noise, masked_only=True)
    expected = ((pred - patchify(imgs, 2)).abs().mean(dim=-1) * mask).sum() / mask.sum()  # written out
    torch.testing.assert_close(full_loss, expected)
    torch.testing.assert_close(masked_loss, expected)


def test_with_nothing_masked_the_loss_is_zero_in_both_forwards_and_masked_only_predicts_nothing():
    """Nothing to reconstruct: a loss of 0, not 0/0's NaN, in training's forward and in evaluation's."""
    model, imgs = MAE(MAEConfig(**SMALL)), torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs, mask_ratio=0.0, masked_only=True)
    assert pred.shape == (2, 0, 12) and loss.item() == 0.0 and mask.sum() == 0
    loss, pred, mask = model(imgs, mask_ratio=0.0)
    assert pred.shape == (2, 256, 12) and loss.item() == 0.0 and mask.sum() == 0


def test_random_masking_keeps_the_lowest_noise_tokens_in_ascending_noise_order():
    """With a given noise, the visible tokens are those of the smallest noise, smallest first (the MAE reference's
    ascending argsort); mask and ids_restore follow from that order, here worked out by hand."""
    noise = torch.tensor([[0.7, 0.1, 0.9, 0.3, 0.5, 0.2, 0.8, 0.4]])
    x = torch.arange(8).float().view(1, 8, 1).expand(1, 8, 2)  # each token carries its own index
    x_visible, mask, ids_restore = random_masking(x, 0.5, noise)
    # Ascending noise: tokens 1 (0.1), 5 (0.2), 3 (0.3), 7 (0.4) are kept, then 4, 0, 6, 2 are hidden.
    assert x_visible[0, :, 0].tolist() == [1, 5, 3, 7]
    assert mask[0].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert ids_restore[0].tolist() == [5, 0, 7, 2, 4, 1, 6, 3]  # token n's place in the shuffled order
    # Random noise: every visible token's noise is below every hidden one's, and they come in ascending order.
    noise = torch.rand(4, 64)
    x = torch.arange(64).float().view(1, 64, 1).expand(4, 64, 2)
    x_visible, mask, _ = random_masking(x, 0.75, noise)
    for b in range(4):
        kept_noise = noise[b, x_visible[b, :, 0].long()]
        assert torch.all(kept_noise[1:] > kept_noise[:-1])
        assert kept_noise.max() < noise[b][mask[b] == 1].min()


def test_decoder_places_visible_tokens_and_mask_tokens_at_their_image_positions():
    """The decoder input written out longhand: the mask token at every image position, visible token j (the one of
    the j-th smallest noise) at its own position, the fixed positions added, the class token in front; then
    blocks, norm and pixel head, class token dropped. The decoder's gather must give exactly that."""
    torch.manual_seed(0)
    cfg = MAEConfig(patch_size=8, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
                    decoder_num_heads=2)
    decoder = MAE(cfg).decoder.eval()
    B, N = 3, cfg.num_patches
    noise = torch.rand(B, N)
    visible, _, ids_restore = random_masking(torch.randn(B, N, 16), 0.75, noise)
    latent = torch.cat([torch.randn(B, 1, 16), visible], dim=1)
    got = decoder(latent, ids_restore)
    embedded = decoder.decoder_embed(latent)
    expected = []
    for b in range(B):
        tokens = decoder.mask_token[0].expand(N, -1).clone()
        tokens[noise[b].argsort()[:visible.shape[1]]] = embedded[b, 1:]
        x = torch.cat([embedded[b, :1], tokens + decoder.pos_embed[0]])[None]
        for block in decoder.blocks:
            x = block(x)
        expected.append(decoder.pred(decoder.norm(x))[0, 1:])
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_class_token_pooling_runs_the_last_blocks_projection_and_mlp_for_the_class_token_alone():
    """pooled('token') gives the full encoder output's class token (test above) at fewer FLOPs, counted by torch's
    FlopCounterMode: the last block's attention projection and MLP (9 D^2 multiply-adds a token) run for the class
    token alone, so at least those of the N patch tokens are saved. Taking the class token from the full output
    gives the same numbers and saves nothing."""
    from torch.utils.flop_counter import FlopCounterMode
    cfg = MAEConfig(**SMALL)
    model = ViTClassifier(cfg, 10, global_pool="token").eval()
    imgs = torch.randn(2, 3, 32, 32)

    def flops(features):
        with FlopCounterMode(display=False) as counter:
            out = features(imgs)
        return counter.get_total_flops(), out
    full, expected = flops(lambda x: model.encoder(x)[:, 0])
    token, got = flops(lambda x: model.encoder.pooled(x, "token"))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    d, n = cfg.embed_dim, cfg.num_patches
    assert full - token >= 2 * len(imgs) * n * 9 * d * d, (full, token)


def test_avg_pooling_is_the_mean_of_the_patch_tokens_without_the_class_token():
    """global_pool='avg' averages the N patch tokens of the encoder output; the class token is left out."""
    torch.manual_seed(0)
    model = ViTClassifier(MAEConfig(**SMALL), num_classes=10, global_pool="avg").eval()
    imgs = torch.randn(2, 3, 32, 32)
    tokens = model.encoder(imgs)  # (B, 1 + N, D)
    expected = sum(tokens[:, 1 + n] for n in range(256)) / 256
    torch.testing.assert_close(model.encoder.pooled(imgs, "avg"), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.features(imgs), expected, rtol=1e-5, atol=1e-5)
    # Any other name is refused, not taken for the mean: a pooling added to POOLS must be added here too.
    with pytest.raises(ValueError, match="pool must be one of \\('token', 'avg'\\), got 'max'"):
        model.encoder.pooled(imgs, "max")
    with pytest.raises(ValueError, match="global_pool must be one of"):
        ViTClassifier(MAEConfig(**SMALL), num_classes=10, global_pool="max")


def test_linear_probe_normalises_the_features_with_the_running_statistics_before_the_head():
    """linear_probe in eval mode: logits = head((features - running_mean) / sqrt(running_var + eps)), eps 1e-6."""
    torch.manual_seed(0)
    model = ViTClassifier(MAEConfig(**SMALL), num_classes=5, linear_probe=True).eval()
    running_mean, running_var = torch.randn(32), torch.rand(32) * 4 + 0.1
    model.head_norm.running_mean.copy_(running_mean)
    model.head_norm.running_var.copy_(running_var)
    imgs = torch.randn(3, 3, 32, 32)
    features = model.features(imgs)
    expected = model.head((features - running_mean) / torch.sqrt(running_var + 1e-6))
    torch.testing.assert_close(model(imgs), expected, rtol=1e-5, atol=1e-5)


def test_reconstruct_pastes_the_prediction_into_the_masked_patches_only():
    """Masked input: zeros on the masked patches, the image elsewhere. Reconstruction: the prediction on the masked
    patches, the image on the visible ones."""
    imgs = torch.randn(2, 3, 8, 8)  # a 4x4 grid of 2x2 patches
    mask = torch.zeros(2, 16)
    mask[0, [0, 5, 15]] = 1
    mask[1, [3, 4, 8, 9, 10]] = 1
    masked_input, pasted = reconstruct(imgs, torch.zeros(2, 16, 12), mask, 2)
    pixel_mask = mask.view(2, 1, 4, 1, 4, 1).expand(2, 3, 4, 2, 4, 2).reshape(2, 3, 8, 8)  # patch -> its pixels
    # Patch n is grid cell (n // 4, n % 4): patch 5 of image 0 and patch 3 of image 1, 12 pixels per patch.
    assert pixel_mask[0, :, 2:4, 2:4].eq(1).all() and pixel_mask[1, :, 0:2, 6:8].eq(1).all()
    assert pixel_mask.sum() == (3 + 5) * 12
    expected = torch.where(pixel_mask == 1, torch.zeros_like(imgs), imgs)
    assert torch.equal(masked_input, expected)
    assert torch.equal(pasted, expected)
    _, pasted = reconstruct(imgs, torch.full((2, 16, 12), 7.0), mask, 2)
    assert torch.equal(pasted, torch.where(pixel_mask == 1, torch.full_like(imgs, 7.0), imgs))


def test_normalize_patches_uses_the_unbiased_variance_longhand():
    """The MAE reference's norm_pix_loss: (patch - mean) / sqrt(var + 1e-6), var with torch's default (unbiased)
    correction, i.e. sum of squared deviations / (P - 1)."""
    patches = torch.randn(2, 5, 12) * 3 + 1
    normed, mean, std = normalize_patches(patches)
    P = patches.shape[-1]
    mean_longhand = patches.sum(dim=-1, keepdim=True) / P
    var_longhand = ((patches - mean_longhand) ** 2).sum(dim=-1, keepdim=True) / (P - 1)
    std_longhand = (var_longhand + 1e-6) ** 0.5
    torch.testing.assert_close(mean, mean_longhand)
    torch.testing.assert_close(std, std_longhand)
    torch.testing.assert_close(normed, (patches - mean_longhand) / std_longhand)


def test_encoder_is_timms_vision_transformer_with_an_unpositioned_class_token():
    """The encoder's forward equals timm's VisionTransformer (no_embed_class: the class token carries no position,
    as in DeiT-3 and the MAE code) loaded with the same weights and our fixed sin-cos positions: the conv patch
    embedding in row-major patch order, the class token in front, the blocks, then the final norm."""
    torch.manual_seed(0)
    cfg = MAEConfig(**{**SMALL, "patch_size": 4})
    ours = MAE(cfg).encoder.eval()
    nn.init.normal_(ours.cls_token, std=1.0)  # large enough that a position added to it would show
    theirs = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0, num_classes=0,
        no_embed_class=True, norm_layer=partial(nn.LayerNorm, eps=1e-6)).eval()
    state = {k.replace("patch_embed.", "patch_embed.proj."): v for k, v in ours.state_dict().items()}
    theirs.load_state_dict({**state, "pos_embed": ours.pos_embed}, strict=True)
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(imgs), theirs.forward_features(imgs), rtol=1e-5, atol=1e-5)


def test_every_layer_norm_has_maes_eps():
    """Every LayerNorm of the MAE and of the classifier, blocks and final norms of encoder and decoder alike, has the
    MAE code's (and timm's ViT's) eps of 1e-6. torch's default 1e-5 moves the outputs by about 3e-6 at
    initialisation, below what the comparison with timm above can see."""
    for model in (MAE(MAEConfig(**SMALL)), ViTClassifier(MAEConfig(**SMALL), num_classes=10)):
        norms = {name: m.eps for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
        assert norms and set(norms.values()) == {1e-6}, norms
    assert {"encoder.norm", "decoder.norm"} <= {name for name, m in MAE(MAEConfig(**SMALL)).named_modules()
                                                if isinstance(m, nn.LayerNorm)}


def test_patchify_is_the_official_maes_nchpwq_to_nhwpqc_and_unpatchify_its_inverse():
    """The MAE reference's patchify, written out: reshape to (n, c, h, p, w, q), einsum 'nchpwq->nhwpqc', flatten.
    Patch n is grid cell (n // w, n % w) and its vector runs over the pixel row p, then column q, then channel."""
    imgs = torch.randn(2, 3, 16, 16)
    for p in (2, 4):
        h = w = 16 // p
        reference = torch.einsum("nchpwq->nhwpqc", imgs.reshape(2, 3, h, p, w, p)).reshape(2, h * w, p * p * 3)
        assert torch.equal(patchify(imgs, p), reference)
        assert torch.equal(unpatchify(reference, p), imgs)
    one_channel = torch.randn(2, 1, 8, 8)
    assert torch.equal(unpatchify(patchify(one_channel, 2), 2, channels=1), one_channel)


@pytest.mark.parametrize("num_patches, mask_ratio, masked", [(10, 0.75, 7), (49, 0.75, 36), (64, 0.9, 57),
                                                             (16, 0.5, 8)])
def test_the_masked_count_is_n_times_the_ratio_rounded_down(num_patches, mask_ratio, masked):
    """int(N * mask_ratio) patches are hidden, rounded down even where the fraction is .5 or more (7.5 -> 7,
    36.75 -> 36), so every sample keeps at least N - N * mask_ratio visible."""
    assert num_masked_patches(num_patches, mask_ratio) == masked
    x_visible, mask, _ = random_masking(torch.randn(3, num_patches, 4), mask_ratio)
    assert mask.sum(dim=1).tolist() == [masked] * 3 and x_visible.shape == (3, num_patches - masked, 4)


def test_probe_norm_adds_eps_to_the_variance_as_batchnorm_does():
    """Features of a tiny variance (1e-6, the size of eps): normalised by sqrt(var + eps) exactly as torch's
    BatchNorm1d, where leaving eps out would scale them by sqrt(2) more."""
    torch.manual_seed(0)
    ours, torchs = RunningMeanBatchNorm(4), nn.BatchNorm1d(4, eps=1e-6, affine=False, momentum=None)
    x = torch.randn(32, 4) * 1e-3
    torch.testing.assert_close(ours(x), torchs(x))
    ours.eval(), torchs.eval()
    torch.testing.assert_close(ours(x), torchs(x))


def test_probe_norm_counts_every_process_images_so_a_checkpoint_resumes_on_other_processes_and_chunks():
    """Two processes' probe norms, each fed every other chunk of 8 and then averaged as train_classifier's
    distribute_bn averages them (running mean and variance; the count as it is), then one process going on from
    that state: in chunks of 8, its statistics are those of one process fed every chunk; in one chunk of 16 (the
    default flags' chunk on one process where two take 8 each), its mean is. Counting each process's own chunks
    would weight the first resumed chunks 1/3 where they count 1/5 (or 1/3 of the images); counting all processes'
    chunks, the chunk of 16 1/5."""
    torch.manual_seed(0)
    chunks = [torch.randn(8, 4) * (1 + k) + k for k in range(6)]
    one = RunningMeanBatchNorm(4)
    for chunk in chunks:
        one(chunk)
    ranks = [RunningMeanBatchNorm(4, world_size=2) for _ in range(2)]
    for k, chunk in enumerate(chunks[:4]):
        ranks[k % 2](chunk)
    state = ranks[0].state_dict()
    for name in ("running_mean", "running_var"):
        state[name] = (ranks[0].state_dict()[name] + ranks[1].state_dict()[name]) / 2
    assert state["num_batches_tracked"].item() == 32  # the four chunks' images
    same_chunks, one_chunk = RunningMeanBatchNorm(4), RunningMeanBatchNorm(4)
    same_chunks.load_state_dict(state), one_chunk.load_state_dict(state)
    for chunk in chunks[4:]:
        same_chunks(chunk)
    one_chunk(torch.cat(chunks[4:]))
    assert same_chunks.num_batches_tracked.item() == one_chunk.num_batches_tracked.item() == 48
    torch.testing.assert_close(same_chunks.running_mean, one.running_mean)
    torch.testing.assert_close(same_chunks.running_var, one.running_var)
    torch.testing.assert_close(one_chunk.running_mean, one.running_mean)


def test_probe_norm_computes_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the probe norm sees bf16 features; it normalises them in fp32 (autocast runs torch's
    batch_norm in fp32 too), returns fp32 and keeps fp32 running statistics equal to those of the fp32 input."""
    torch.manual_seed(0)
    x = (torch.randn(16, 8) * 2 + 1).bfloat16()
    ours, reference = RunningMeanBatchNorm(8), nn.BatchNorm1d(8, eps=1e-6, affine=False, momentum=None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    assert out.dtype == torch.float32 and ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    torch.testing.assert_close(out, reference(x.float()))
    torch.testing.assert_close(ours.running_var, reference.running_var)


def test_position_embeddings_are_the_2d_sin_cos_of_each_patchs_row_and_column():
    """The fixed position embedding of the patch in row r and column c of the grid (row-major, patchify's order),
    written out longhand: the quarters sin(r w), sin(c w), cos(r w), cos(c w), w_k = 10000^(-k / (D/4)), k < D/4.
    It is the MAE paper's 2-D sin-cos embedding; the MAE code orders the quarters (c: sin, cos), (r: sin, cos), a
    permutation of the channels that trains alike. The buffers are not saved in checkpoints, so a change of
    formula would silently give every saved model other positions: checked for the encoder and, at another width,
    the decoder."""
    cfg = MAEConfig(decoder_embed_dim=128, decoder_num_heads=2)
    cell = torch.arange(cfg.num_patches, dtype=torch.float64)
    rows, cols = torch.div(cell, cfg.grid_size, rounding_mode="floor"), cell % cfg.grid_size
    for module, dim in ((MAEEncoder(cfg), cfg.embed_dim), (MAEDecoder(cfg), cfg.decoder_embed_dim)):
        quarter = dim // 4
        w = 10000.0 ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        r, c = rows[:, None] * w, cols[:, None] * w  # (N, D/4)
        expected = torch.cat([r.sin(), c.sin(), r.cos(), c.cos()], dim=1)
        assert module.pos_embed.shape == (1, cfg.num_patches, dim)
        torch.testing.assert_close(module.pos_embed[0].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("grid_size, dim", [(16, 192), (8, 32), (4, 24), (1, 4)])
def test_position_embedding_is_timms_to_the_bit(grid_size, dim):
    """model.sincos_pos_embed is written out (model.py imports no timm) but must equal timm's
    build_sincos2d_pos_embed exactly, the function the models used before: every model trained with it keeps its
    positions bit for bit, not to the 1e-6 of the longhand test above."""
    ours = sincos_pos_embed(grid_size, dim)
    assert ours.shape == (1, grid_size ** 2, dim) and ours.dtype == torch.float32
    assert torch.equal(ours[0], build_sincos2d_pos_embed([grid_size, grid_size], dim))


def test_weights_start_as_maes_initialisation_not_torchs_defaults():
    """MAE's initialisation, read off the weights of a ViT-T MAE and classifier: every linear layer's weight (and
    the patch embedding's, a linear map on flattened patches of 2 x 2 x 3 values) xavier-uniform, within
    sqrt(6 / (fan_in + fan_out)) and of variance 2 / (fan_in + fan_out), with zero bias; the class and mask tokens
    and the pixel head normal of std 0.02, the classifier's head of std 0.01. torch's defaults differ: a linear
    layer's weights have variance 1 / (3 fan_in) (at 192 -> 192, a third of xavier's) and nonzero biases, the
    tokens would stay zero. Matrices of 24,576 values or more hold the sample variance within 1% of its own."""
    torch.manual_seed(0)
    cfg = MAEConfig(decoder_embed_dim=128, decoder_num_heads=2)
    mae, classifier = MAE(cfg), ViTClassifier(cfg, num_classes=10)
    for name, model in (("mae", mae), ("classifier", classifier)):
        patch_embed = model.encoder.patch_embed.weight.flatten(1)
        special = {model.encoder.patch_embed, *([mae.decoder.pred] if model is mae else [classifier.head])}
        linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m not in special]
        matrices = [(f"{name}.patch_embed", patch_embed)] + [(f"{name}.{n}", m.weight) for n, m in linears]
        for where, weight in matrices:
            fan_out, fan_in = weight.shape
            assert weight.abs().max().item() <= (6 / (fan_in + fan_out)) ** 0.5, where
            assert weight.var().item() == pytest.approx(2 / (fan_in + fan_out), rel=0.05), where
        for n, m in model.named_modules():
            if isinstance(m, nn.Linear):
                assert torch.all(m.bias == 0), f"{name}.{n}"
    # Each tolerance about 3 standard errors of a sample std (1 / sqrt(2 n) relative): 192 and 128 tokens' values,
    # and the pixel head's 1,536.
    for token in (mae.encoder.cls_token, mae.decoder.mask_token):
        assert token.std().item() == pytest.approx(0.02, rel=0.2)
    assert mae.decoder.pred.weight.std().item() == pytest.approx(0.02, rel=0.06)
    assert classifier.head.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_random_masking_draws_each_samples_own_noise_from_torchs_rng():
    """Without noise, random_masking draws (B, N) uniform noise from torch's RNG, one row per sample (the MAE
    reference's torch.rand(N, L)): the same masks as passing that draw explicitly, and a batch of identical images
    gets a different mask for each of them."""
    x = torch.randn(1, 64, 4).expand(8, 64, 4)  # eight copies of one image
    torch.manual_seed(0)
    visible, mask, ids_restore = random_masking(x, 0.75)
    torch.manual_seed(0)
    noise = torch.rand(8, 64)
    expected = random_masking(x, 0.75, noise)
    assert torch.equal(mask, expected[1]) and torch.equal(ids_restore, expected[2]) and torch.equal(visible,
                                                                                                     expected[0])
    assert len({tuple(row.tolist()) for row in mask}) == 8


def test_normalize_patches_keeps_eps_inside_the_square_root_for_nearly_flat_patches():
    """The reference's (var + 1e-6) ** 0.5 matters where a patch is nearly flat (a clear sky): a constant patch has
    std sqrt(1e-6) = 1e-3, not 1e-6, and a patch varying by 1e-4 (variance 1e-8, far below eps) is normalised to
    about a tenth of its unit-variance value, its noise damped rather than blown up to unit variance."""
    flat = torch.full((1, 1, 12), 0.3)
    _, mean, std = normalize_patches(flat)
    torch.testing.assert_close(std, torch.full((1, 1, 1), 1e-3))
    wiggle = 0.3 + 1e-4 * torch.tensor([1.0, -1.0] * 6, dtype=torch.float64).view(1, 1, 12)
    mean = wiggle.sum() / 12
    var = ((wiggle - mean) ** 2).sum() / 11  # 12 / 11 * 1e-8
    normed, _, std = normalize_patches(wiggle)
    torch.testing.assert_close(std.flatten(), ((var + 1e-6) ** 0.5).view(1))
    torch.testing.assert_close(normed, (wiggle - mean) / (var + 1e-6) ** 0.5)
    assert normed.abs().max() < 0.11


def test_a_model_without_drop_path_draws_no_random_numbers_in_training():
    """drop_path_rate 0 gives no DropPath at all (Block's None), so a training forward of the classifier leaves
    torch's RNG where it was: the augmentation and mixup draws that follow are those of a run without stochastic
    depth. With a rate above 0 every block draws (the check can fail)."""
    cfg = MAEConfig(**SMALL)
    imgs = torch.randn(4, 3, 32, 32)
    for rate, draws in ((0.0, False), (0.1, True)):
        model = ViTClassifier(cfg, num_classes=10, drop_path_rate=rate).train()
        torch.manual_seed(0)
        model(imgs)
        assert (not torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())) == draws, rate


@pytest.mark.parametrize("name", ["img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads"])
def test_config_refuses_a_size_of_0_naming_it(name):
    """Every size of MAEConfig must be at least 1; 0 is refused in one ValueError that names the field (a depth of 0
    would otherwise fail later, unpacking an empty list of blocks)."""
    with pytest.raises(ValueError, match=f"sizes must be >= 1, got {name} 0"):
        MAEConfig(**{**SMALL, name: 0})


def test_config_refuses_a_decoder_width_its_heads_do_not_divide():
    """The decoder's width must be divisible by its heads, as the encoder's: 24 by 5 is refused, naming both."""
    with pytest.raises(ValueError, match="decoder_embed_dim 24 must be divisible by decoder_num_heads 5"):
        MAEConfig(**{**SMALL, "decoder_num_heads": 5})
    with pytest.raises(ValueError, match="embed_dim 32 must be divisible by num_heads 3"):
        MAEConfig(**{**SMALL, "num_heads": 3})


@pytest.mark.parametrize("name", ["embed_dim", "decoder_embed_dim"])
def test_config_refuses_a_width_the_position_embedding_cannot_split_in_four(name):
    """The sin-cos position embedding gives each of its four parts a quarter of the width: 30 (3 heads of 10) is
    refused in one ValueError naming the field, not by an assertion deep inside the embedding."""
    heads = "num_heads" if name == "embed_dim" else "decoder_num_heads"
    with pytest.raises(ValueError, match=f"{name} 30 must be divisible by 4"):
        MAEConfig(**{**SMALL, name: 30, heads: 3})
