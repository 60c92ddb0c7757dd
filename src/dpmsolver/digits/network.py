"""Network architectures for the built-in 8x8 digits demo (pure torch).

* :class:`DigitsUNet` -- a small class-conditional eps-prediction U-Net
  (8x8 -> 4x4 -> 2x2) with FiLM-style time/class conditioning in every block.
* :class:`DigitsClassifier` -- a small CNN used to score generated digits
  (logits and penultimate features for a Frechet distance).

Both take images of shape ``(B, 1, 8, 8)`` in the ``[-1, 1]`` pixel range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DigitsClassifier", "DigitsUNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly non-integer) timesteps.

    Computed in float32 for accuracy (``sin(999 * f)`` is badly conditioned in
    half precision); callers cast the result to the working dtype.

    Args:
        t: timesteps of shape ``(B,)``.
        dim: embedding width (even).
        max_period: lowest frequency is ``1 / max_period``.

    Returns:
        ``(B, dim)`` float32 tensor ``[cos(t f_k), sin(t f_k)]``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _groups(channels: int) -> int:
    """Largest of (32, 16, 8, 4, 2, 1) that divides ``channels``."""
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def _zero_init(module: nn.Module) -> None:
    """Zero all parameters of ``module`` (residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with scale/shift conditioning."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip: nn.Module = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        _zero_init(self.conv2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the block; ``emb`` is the (B, emb_dim) activated conditioning vector."""
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over the spatial positions (residual)."""

    def __init__(self, channels: int, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)
        _zero_init(self.proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend across the ``H*W`` positions of ``x``."""
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # (B, heads, HW, d)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class DigitsUNet(nn.Module):
    """Small class-conditional U-Net predicting the noise ``eps`` for 8x8 digits.

    Resolutions 8x8 -> 4x4 -> 2x2 with ``channels * mult`` feature maps, residual
    blocks conditioned on a sinusoidal embedding of the (float) training
    timestep plus a learned class embedding (label ``num_classes`` = null label
    for classifier-free guidance), and self-attention at the two coarsest levels.

    Args:
        channels: base width.
        channel_mult: width multiplier per resolution (3 entries for 8/4/2).
        num_res_blocks: residual blocks per resolution on the way down.
        num_classes: number of real classes; label ``num_classes`` means "null".
        emb_dim: width of the conditioning embedding.
        dropout: dropout inside residual blocks.
        attn_heads: heads of the low-resolution self-attention (0 disables it).
    """

    def __init__(
        self,
        channels: int = 48,
        channel_mult: tuple[int, ...] = (1, 1, 1),
        num_res_blocks: int = 1,
        num_classes: int = 10,
        emb_dim: int = 128,
        dropout: float = 0.0,
        attn_heads: int = 4,
    ) -> None:
        super().__init__()
        self.config = {
            "channels": channels,
            "channel_mult": list(channel_mult),
            "num_res_blocks": num_res_blocks,
            "num_classes": num_classes,
            "emb_dim": emb_dim,
            "dropout": dropout,
            "attn_heads": attn_heads,
        }
        self.num_classes = num_classes
        self.null_label = num_classes
        self.t_dim = channels
        self.time_mlp = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(1, channels, 3, padding=1)

        levels = len(channel_mult)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skip_chs = [channels]
        ch = channels
        for lvl, mult in enumerate(channel_mult):
            out = channels * mult
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out, emb_dim, dropout))
                ch = out
                skip_chs.append(ch)
            self.down.append(blocks)
            if lvl < levels - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
                skip_chs.append(ch)

        self.mid1 = ResBlock(ch, ch, emb_dim, dropout)
        self.mid_attn: nn.Module = SelfAttention(ch, attn_heads) if attn_heads else nn.Identity()
        self.mid2 = ResBlock(ch, ch, emb_dim, dropout)

        self.up = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            out = channels * mult
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_chs.pop(), out, emb_dim, dropout))
                ch = out
            self.up.append(blocks)
            use_attn = attn_heads > 0 and lvl == 1
            self.up_attn.append(SelfAttention(ch, attn_heads) if use_attn else nn.Identity())
            if lvl > 0:
                self.upsample.append(nn.Conv2d(ch, ch, 3, padding=1))

        self.norm_out = nn.GroupNorm(_groups(ch), ch)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)
        _zero_init(self.conv_out)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict the noise.

        Args:
            x: noisy images ``(B, 1, 8, 8)``.
            t: training timesteps in ``[0, 999]`` (float allowed), shape ``(B,)`` or scalar.
            y: int64 labels ``(B,)`` or scalar; ``num_classes`` (10) is the null label.

        Returns:
            predicted ``eps`` with the shape and dtype of ``x``.
        """
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(b)
        y = torch.as_tensor(y, device=x.device, dtype=torch.long)
        if y.ndim == 0:
            y = y.expand(b)

        t_emb = timestep_embedding(t.reshape(b), self.t_dim).to(x.dtype)
        emb = F.silu(self.time_mlp(t_emb) + self.class_emb(y.reshape(b)))

        h = self.conv_in(x)
        skips = [h]
        for lvl, blocks in enumerate(self.down):
            for block in blocks.children():
                h = block(h, emb)
                skips.append(h)
            if lvl < len(self.downsample):
                h = self.downsample[lvl](h)
                skips.append(h)

        h = self.mid1(h, emb)
        h = self.mid_attn(h)
        h = self.mid2(h, emb)

        for i, blocks in enumerate(self.up):
            for block in blocks.children():
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            h = self.up_attn[i](h)
            if i < len(self.upsample):
                h = F.interpolate(h, scale_factor=2.0, mode="nearest")
                h = self.upsample[i](h)

        return self.conv_out(F.silu(self.norm_out(h)))


class DigitsClassifier(nn.Module):
    """Small CNN classifying 8x8 digits in ``[-1, 1]``.

    ``features`` returns the penultimate activations (``feature_dim`` wide) used
    for a Frechet distance between generated and real digits.

    Args:
        width: channels of the first conv stage (doubled for the second).
        feature_dim: width of the penultimate layer.
        num_classes: number of output logits.
        dropout: dropout before the last layer (training only).
    """

    def __init__(
        self,
        width: int = 32,
        feature_dim: int = 128,
        num_classes: int = 10,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        self.config = {
            "width": width,
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "dropout": dropout,
        }
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 2x2
            nn.Flatten(),
            nn.Linear(2 * w * 4, feature_dim),
            nn.SiLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of images ``(B, 1, 8, 8)``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)``."""
        return self.head(self.dropout(self.features(x)))
