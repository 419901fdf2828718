"""Masked autoencoder (MAE) with a ViT-Tiny encoder for 32x32 images, and the ViT classifier built from it.

The split follows the MAE paper (He et al., 2021): patchify -> random_masking -> encoder on the visible
patches -> decoder on all positions (mask tokens for the hidden ones; in training its last block and pixel head
compute the masked positions alone, all the loss reads) -> MSE on the masked patches only.
Only nn.Modules and pure tensor functions live here: no argparse, files, optimizers or data.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

# The features MAEEncoder.pooled gives: the class token's output, or the mean patch token.
POOLS = ("token", "avg")


@dataclass
class MAEConfig:
    """The model's sizes and MAE settings. The scripts take their flags' defaults from these (--patch_size ...
    --decoder_num_heads, --mask_ratio) and build the model from the flags, so a run's values are its command's."""
    img_size: int = 32  # input height and width in pixels
    patch_size: int = 2  # 2x2 patches -> a 16x16 grid of 256 tokens, as in the reference ViT-T
    in_chans: int = 3  # RGB
    embed_dim: int = 192  # encoder width (ViT-Tiny; ViT-Small is 384 with 6 heads)
    depth: int = 12  # encoder blocks
    num_heads: int = 3  # encoder attention heads (head dim 64)
    mlp_ratio: float = 4.0  # hidden width of every MLP relative to its block's width
    decoder_embed_dim: int = 192  # decoder width; the reference uses the encoder's width
    decoder_depth: int = 4  # decoder blocks
    decoder_num_heads: int = 3  # decoder attention heads
    mask_ratio: float = 0.75  # share of patches hidden from the encoder during pretraining
    norm_pix_loss: bool = False  # regress per-patch normalised pixels (MAE paper) instead of raw ones

    def __post_init__(self):
        sizes = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                 "decoder_depth", "decoder_num_heads")
        small = [f"{name} {getattr(self, name)}" for name in sizes if getattr(self, name) < 1]
        if small:
            raise ValueError(f"sizes must be >= 1, got {', '.join(small)}")
        if self.img_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide img_size {self.img_size}")
        for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
            if getattr(self, width) % getattr(self, heads):
                raise ValueError(f"{width} {getattr(self, width)} must be divisible by {heads} "
                                 f"{getattr(self, heads)}")
            # The fixed sin-cos position embedding gives a quarter of the width to each of sin(row), sin(column),
            # cos(row) and cos(column).
            if getattr(self, width) % 4:
                raise ValueError(f"{width} {getattr(self, width)} must be divisible by 4 (the sin-cos position "
                                 "embedding's four parts)")
        check_mask_ratio(self.mask_ratio)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


def check_mask_ratio(mask_ratio: float) -> None:
    # 1.0 would leave the encoder with no tokens at all; fail here rather than deep inside attention.
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")


# ----------------------------------------------------------------------------------------------------------
# Pure tensor functions

def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order."""
    return rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int = 3) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W); the inverse of patchify for square images."""
    grid = int(patches.shape[1] ** 0.5)
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid, p1=patch_size, p2=patch_size,
                     c=channels)


def num_masked_patches(num_patches: int, mask_ratio: float) -> int:
    # Defined by the masked count so that exactly int(N * mask_ratio) patches are hidden for every ratio.
    return int(num_patches * mask_ratio)


def mask_noise(batch: int, num_patches: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, num_patches) uniform noise, whose per-row argsort is random_masking's shuffle. Training, the fixed val
    masks and bench.py all draw it here: the one place to change to draw masks another way."""
    return torch.rand(batch, num_patches, device=device, generator=generator)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Per-sample random shuffle of the tokens, keeping the first N - int(N * mask_ratio) of them.

    x: (B, N, D). noise: optional (B, N) uniform noise; by default drawn from torch's RNG on x's device,
    so --seed reproduces the masks and no host round-trip is needed.
    Returns x_visible (B, N_visible, D), mask (B, N) float32 with 1 = masked, ids_restore (B, N).
    """
    B, N, D = x.shape
    num_visible = N - num_masked_patches(N, mask_ratio)
    if noise is None:
        noise = mask_noise(B, N, x.device)
    ids_shuffle = noise.argsort(dim=1)  # ascending: the lowest-noise tokens are kept
    ids_restore = ids_shuffle.argsort(dim=1)  # position of each original token in the shuffled order
    ids_keep = ids_shuffle[:, :num_visible]
    x_visible = x.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    # A token is masked exactly when its rank in the shuffle falls past the visible ones. float32 whatever the
    # autocast dtype: the loss and the val PSNR divide by mask sums, which bf16 rounds above 256 and fp16 turns
    # to inf above 65,504 (342 images of 192 masked patches).
    mask = (ids_restore >= num_visible).float()
    return x_visible, mask, ids_restore


def to_shuffled_order(x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """(B, N, D) rows in image order -> the same rows in random_masking's shuffled order (row ids_restore[b, n] holds
    x[b, n]): visible patches first, then masked ones. A scatter, so that no argsort has to invert ids_restore."""
    index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.empty_like(x).scatter_(1, index, x)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over the masked patches only: (err * mask).sum() / mask.sum(). The MAE's loss, in
    training and in evaluation: the one place to change it.

    pred, target: (B, N, P); mask: (B, N). With a masked share of exactly mask_ratio this equals the
    reference's mean((pred - img)**2 * pixel_mask) / mask_ratio. mask None: every row is a masked patch (the
    masked_only forward's), and the mean is the plain mean.
    """
    sq_err = (pred.float() - target.float()).pow(2)  # (B, N, P)
    if mask is None:
        # Written without a mask: a mask of ones, its sum clamped, made torch 2.11's inductor fuse a loss kernel
        # that Triton 3.6 failed to compile at patch size 4 (H200, 2026-11-30). 0 when nothing is masked.
        return sq_err.sum() / max(sq_err.numel(), 1)
    err = sq_err.mean(dim=-1)  # (B, N) per-patch error
    # clamp: with mask_ratio 0 there is nothing to reconstruct and the loss is 0 rather than 0/0.
    return (err * mask).sum() / mask.sum().clamp(min=1)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6):
    """Per-patch standardisation used by norm_pix_loss. Returns (normalised, mean, std)."""
    mean = patches.mean(dim=-1, keepdim=True)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    return (patches - mean) / std, mean, std


def reconstruct(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                norm_pix_loss: bool = False):
    """Images for inspection: (masked input, reconstruction with the visible patches pasted back).

    With norm_pix_loss the prediction is in per-patch normalised units; it is mapped back with the true
    patches' mean and std, which the model never saw: a picture of the structure it predicts, not pixels it
    could produce (mae_pretrain.evaluate computes no PSNR for it).
    """
    target = patchify(imgs, patch_size)
    pred = pred.float()
    if norm_pix_loss:
        _, mean, std = normalize_patches(target)
        pred = pred * std + mean
    m = mask.unsqueeze(-1)  # (B, N, 1)
    channels = imgs.shape[1]
    masked = unpatchify(target * (1 - m), patch_size, channels)
    pasted = unpatchify(pred * m + target * (1 - m), patch_size, channels)
    return masked, pasted


# ----------------------------------------------------------------------------------------------------------
# Modules

def sincos_pos_embed(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE paper), (1, N, dim), patches in row-major order: sin(row · f),
    sin(column · f), cos(row · f), cos(column · f), a quarter of the width each, at the dim / 4 frequencies
    f_i = 10000^(-i / (dim / 4)), i < dim / 4. The layout of timm's build_sincos2d_pos_embed, to the bit
    (tests/test_model.py)."""
    freqs = 1.0 / 10000.0 ** (torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    rows, columns = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    angles = torch.stack([rows.flatten(), columns.flatten()], dim=1).float().unsqueeze(-1) * freqs  # (N, 2, dim/4)
    return torch.cat([angles.sin(), angles.cos()], dim=1).flatten(1).unsqueeze(0)


def _init_weights(module: nn.Module) -> None:
    # MAE's initialisation: xavier-uniform linears with zero bias, unit LayerNorms.
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class DropPath(nn.Module):
    """Stochastic depth: in training, each sample's residual branch is zeroed with probability drop_prob and
    scaled by 1 / (1 - drop_prob) otherwise (timm's DropPath). The rate is a buffer rather than a Python float
    so that blocks of different rates are one program to torch.compile (--compile_scope blocks compiles a
    block once for all of them); a rate of 0 keeps every sample."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.register_buffer("drop_prob", torch.tensor(float(drop_prob)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        keep = torch.rand(x.shape[0], *(1,) * (x.dim() - 1), device=x.device) < keep_prob  # (B, 1, 1)
        return x * (keep / keep_prob).to(x.dtype)


class RunningMeanBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d without affine parameters (the MAE paper's linear-probe norm) whose running statistics are the
    mean of every training batch's, weighted by its images, not a moving average. The frozen encoder's features do
    not drift, so nothing is lost; and averaged over torchrun's processes (train_classifier: distribute_bn) they
    equal one process's over the same chunks, where a moving average follows each process's number of chunks.
    nn.BatchNorm1d(momentum=None) keeps the same mean (of equal batches) but reads its batch count back to the
    host every step, which breaks a compiled graph: here the update is tensor arithmetic. Same buffers.

    num_batches_tracked counts images here, those of all world_size processes training in step (each counts its
    own chunk for all of them): the run's images so far, whatever the number of processes and the chunk size, so
    that a run resumed on other ones weights its earlier chunks right."""

    def __init__(self, dim: int, world_size: int = 1):
        super().__init__(dim, eps=1e-6, affine=False)
        self.world_size = world_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)  # normalised with the running statistics
        if len(x) < 2:  # as nn.BatchNorm1d: one sample has no variance to normalise by
            raise ValueError(f"RunningMeanBatchNorm needs at least 2 samples per batch in training, got {len(x)}")
        x = x.float()  # as autocast runs batch_norm
        var, mean = torch.var_mean(x, dim=0, correction=0)
        with torch.no_grad():
            images = len(x) * self.world_size  # this chunk's, and the other processes' chunks of this step
            self.num_batches_tracked.add_(images)
            weight = images / self.num_batches_tracked  # one process's k-th of equal chunks counts 1/k
            self.running_mean.lerp_(mean, weight)
            self.running_var.lerp_(var * (len(x) / (len(x) - 1)), weight)  # unbiased, as BatchNorm keeps it
        return (x - mean) * torch.rsqrt(var + self.eps)


class Attention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (the kernel --attention names, or torch's
    choice), its operations in the order of timm's vision_transformer.Attention."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, queries: slice | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, Q, D): the Q tokens x[:, queries] (default all N) attend to all N."""
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if queries is not None:
            q = q[:, :, queries]  # keys and values stay all N tokens'
        x = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Q, head_dim)
        return self.proj(rearrange(x, "b h q d -> b q (h d)"))


class Mlp(nn.Module):
    """The transformer's feed-forward part, fc1 -> GELU (exact, as MAE's) -> fc2; its parameters are named as timm's
    Mlp's, which has dropout and norm slots that ViT leaves empty. Written out rather than imported, with the
    sin-cos embedding above, so that model.py needs nothing beyond torch and einops: importing timm.layers (which
    loads torchvision's models) cost every process that imports model.py about 2.5 s on a 2-core CPU."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (ViT, MAE): x + attn(norm1(x)), then x + mlp(norm2(x)).

    Its parameters and their order are those of timm's vision_transformer.Block (qkv bias on, no layer scale), so
    state_dicts and optimizer states carry over. It is written out here for `queries`, which timm's block has no
    way to say: a classifier that reads only the class token needs the last block's output for that one token, and
    the MAE's loss the decoder's last block's for the masked patches alone.
    drop_path None means no stochastic depth (and no random draws); a rate, model.DropPath at that rate."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)  # MAE's eps, and that of timm 1.0.31's Block by default
        self.attn = Attention(dim, num_heads)
        self.drop_path1 = nn.Identity() if drop_path is None else DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))  # fc1, GELU, fc2
        self.drop_path2 = nn.Identity() if drop_path is None else DropPath(drop_path)

    def forward(self, x: torch.Tensor, queries: slice | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, Q, D): the outputs of the Q tokens x[:, queries] (default all N); every token still
        serves as a key and a value, so those Q rows equal the full output's, at a fraction of the work."""
        attended = self.attn(self.norm1(x), queries)
        if queries is not None:
            x = x[:, queries]
        x = x + self.drop_path1(attended)
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MAEEncoder(nn.Module):
    """ViT encoder: patch embedding + fixed sin-cos positions + class token + transformer blocks."""

    def __init__(self, cfg: MAEConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_chans, cfg.embed_dim, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.grid_size, cfg.embed_dim), persistent=False)
        # Stochastic depth grows linearly with depth, as in DeiT and the MAE fine-tuning recipe; with any, every
        # block gets a DropPath (the first one at rate 0) so that all blocks have the same structure.
        # On the CPU whatever the default device: the rates are read back as Python floats, which a module
        # built on the meta device (utils.check_model_fits) could not do.
        rates = torch.linspace(0, drop_path_rate, cfg.depth, device="cpu").tolist() if drop_path_rate > 0 \
            else [None] * cfg.depth
        self.blocks = nn.ModuleList(Block(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.embed_dim, eps=1e-6)

        self.apply(_init_weights)
        # The patch embedding is a linear map on flattened patches; initialise it like one.
        nn.init.xavier_uniform_(self.patch_embed.weight.view(cfg.embed_dim, -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch tokens with positions added."""
        # Kernel = stride: the conv is a linear map on each patch flattened as (c p1 p2), its weight's own order,
        # and is applied as one. As a conv its backward is ATen's convolution backward, bias-gradient sum included;
        # as a linear, torch.compile lowers that sum into kernels of its own. The parameters stay the conv's:
        # checkpoints do not change.
        p = self.cfg.patch_size
        patches = rearrange(imgs, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)
        x = F.linear(patches, self.patch_embed.weight.flatten(1), self.patch_embed.bias)  # (B, N, D)
        return x + self.pos_embed.to(x.dtype)

    def transform(self, x: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """Prepend the class token (which carries no position) and run the blocks: (B, 1 + L, D), or with
        class_token_only the class token's output alone, (B, 1, D), the last block run for that token only."""
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        *blocks, last = self.blocks
        for block in blocks:
            x = block(x)
        return self.norm(last(x, slice(0, 1) if class_token_only else None))

    def forward(self, imgs: torch.Tensor, class_token_only: bool = False) -> torch.Tensor:
        """All patches, no masking (fine-tuning, probing, feature extraction): (B, 1 + N, D), or (B, 1, D) with
        class_token_only."""
        return self.transform(self.embed(imgs), class_token_only)

    def pooled(self, imgs: torch.Tensor, pool: str) -> torch.Tensor:
        """(B, C, H, W) -> (B, D): the class token's output ('token') or the mean patch token ('avg'). For the
        class token the last block runs for it alone: for ViT-T 6.6% fewer of the encoder's matrix-product FLOPs
        (bench.classifier_forward_flops), the same numbers."""
        if pool == "token":
            return self.forward(imgs, class_token_only=True)[:, 0]
        if pool == "avg":
            return self.forward(imgs)[:, 1:].mean(dim=1)
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")  # a new one must not pass as 'avg'

    def forward_masked(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Visible patches only: latent (B, 1 + N_visible, D), mask (B, N), ids_restore (B, N)."""
        x_visible, mask, ids_restore = random_masking(self.embed(imgs), mask_ratio, noise)
        return self.transform(x_visible), mask, ids_restore


class MAEDecoder(nn.Module):
    """Lightweight transformer that fills mask tokens in at the hidden positions and predicts pixels."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.decoder_embed = nn.Linear(cfg.embed_dim, cfg.decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_embed_dim))
        self.register_buffer("pos_embed", sincos_pos_embed(cfg.grid_size, cfg.decoder_embed_dim),
                             persistent=False)
        self.blocks = nn.ModuleList(
            Block(cfg.decoder_embed_dim, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth))
        self.norm = nn.LayerNorm(cfg.decoder_embed_dim, eps=1e-6)
        self.pred = nn.Linear(cfg.decoder_embed_dim, cfg.patch_size ** 2 * cfg.in_chans)

        self.apply(_init_weights)
        nn.init.normal_(self.mask_token, std=0.02)
        # Small output weights start the predictions near the mean pixel; xavier here would start them as noise
        # of variance ~2 (for 192 -> 12), which the first epoch would spend undoing.
        nn.init.trunc_normal_(self.pred.weight, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, masked_only: bool = False) -> torch.Tensor:
        """latent (B, 1 + N_visible, D_enc), ids_restore (B, N) -> per-patch pixels (B, N, p*p*C) in image order;
        with masked_only, (B, N_masked, p*p*C) for the masked patches alone, in the shuffled order (the patches
        to_shuffled_order(., ids_restore)[:, N_visible:]), the last block and the pixel head computing those rows
        alone."""
        x = self.decoder_embed(latent)
        B, N = ids_restore.shape
        num_visible = latent.shape[1] - 1
        mask_tokens = self.mask_token.to(x.dtype).expand(B, N - num_visible, -1)
        # The tokens stay in the shuffled order, [class, visible, masked], each with its own image position added:
        # attention sees positions only through these embeddings, so every token's output is what it would be in
        # image order, and the masked tokens, last, can be the last block's only queries.
        pos = to_shuffled_order(self.pos_embed.to(x.dtype).expand(B, -1, -1), ids_restore)  # (B, N, D_dec)
        x = torch.cat([x[:, :1], torch.cat([x[:, 1:], mask_tokens], dim=1) + pos], dim=1)  # (B, 1 + N, D_dec)
        *blocks, last = self.blocks
        for block in blocks:
            x = block(x)
        # No prediction is made for the class token: its output would go unread.
        pred = self.pred(self.norm(last(x, slice(1 + num_visible if masked_only else 1, None))))
        if masked_only:
            return pred
        return pred.gather(1, ids_restore.unsqueeze(-1).expand(-1, -1, pred.shape[-1]))  # back to image order


class MAE(nn.Module):
    """forward(imgs) -> (loss, pred, mask); pred (B, N, p*p*C) in patch space, mask (B, N), 1 = masked.

    forward(imgs, masked_only=True), as training runs it, predicts the masked patches alone (the loss reads no
    other): the same loss at 3% fewer FLOPs for ViT-T (bench.mae_forward_flops), pred (B, N_masked, p*p*C) in the
    decoder's shuffled order; mask stays (B, N) in image order, so reconstruct takes the full forward's pred only."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = MAEEncoder(cfg)
        self.decoder = MAEDecoder(cfg)

    def forward(self, imgs: torch.Tensor, mask_ratio: float | None = None, noise: torch.Tensor | None = None,
                masked_only: bool = False):
        mask_ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        check_mask_ratio(mask_ratio)
        latent, mask, ids_restore = self.encoder.forward_masked(imgs, mask_ratio, noise)
        pred = self.decoder(latent, ids_restore, masked_only)
        return self.forward_loss(imgs, pred, mask, ids_restore, masked_only), pred, mask

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, ids_restore: torch.Tensor,
                     masked_only: bool = False) -> torch.Tensor:
        """masked_mse against the pixel targets, for both forwards (training's and evaluation's). pred: the full
        forward's (B, N, P) in image order, or with masked_only the masked patches' (B, N_masked, P) in the
        decoder's shuffled order."""
        target = patchify(imgs, self.cfg.patch_size)  # (B, N, P)
        if self.cfg.norm_pix_loss:
            target = normalize_patches(target)[0]
        if not masked_only:
            return masked_mse(pred, target, mask)
        # The masked patches come last in the shuffled order: every row of pred is one.
        return masked_mse(pred, to_shuffled_order(target, ids_restore)[:, target.shape[1] - pred.shape[1]:], None)


class ViTClassifier(nn.Module):
    """The MAE encoder with a classification head on the class token (or on the mean patch token).

    linear_probe puts a BatchNorm without affine parameters in front of the head, as the MAE paper does
    for linear probing: it rescales the frozen features without changing what a linear head can express.
    world_size: the processes that train it in step, whose chunks that BatchNorm counts (RunningMeanBatchNorm).
    """

    def __init__(self, cfg: MAEConfig, num_classes: int, global_pool: str = "token", drop_path_rate: float = 0.0,
                 linear_probe: bool = False, world_size: int = 1):
        super().__init__()
        if global_pool not in POOLS:
            raise ValueError(f"global_pool must be one of {POOLS}, got {global_pool!r}")
        self.cfg = cfg
        self.global_pool = global_pool
        self.encoder = MAEEncoder(cfg, drop_path_rate)
        self.head_norm = RunningMeanBatchNorm(cfg.embed_dim, world_size) if linear_probe else nn.Identity()
        self.head = nn.Linear(cfg.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)  # MAE's linear-probe value (its fine-tuning: 2e-5)
        nn.init.zeros_(self.head.bias)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) pooled representation."""
        return self.encoder.pooled(imgs, self.global_pool)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_norm(self.features(imgs)))


def encoder_state_from_mae(mae_state: dict) -> dict:
    """The encoder's entries of an MAE state_dict, with the 'encoder.' prefix removed."""
    return {k[len("encoder."):]: v for k, v in mae_state.items() if k.startswith("encoder.")}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())

