"""Network architectures for the built-in 8x8 digits demo (pure torch).

* :class:`DigitsUNet` -- a small class-conditional eps-prediction U-Net
  (8x8 -> 4x4 -> 2x2) with FiLM-style time/class conditioning in every block.
* :class:`DigitsDiT` -- a small class-conditional DiT-style transformer (patch size 2,
  16 tokens, adaLN-Zero conditioning) used as a rectified-flow velocity predictor.
* :class:`DigitsEDM` -- Karras et al. 2022 ("EDM") preconditioning around a
  :class:`DigitsUNet`: ``D(x; sigma) = c_skip x + c_out F(c_in x; c_noise)``.
* :class:`DigitsClassifier` -- a small CNN used to score generated digits
  (logits and penultimate features for a Frechet distance).

All take images of shape ``(B, 1, 8, 8)`` in the ``[-1, 1]`` pixel range.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .frozen import FrozenGraph

__all__ = [
    "DigitsClassifier",
    "DigitsDiT",
    "DigitsEDM",
    "DigitsUNet",
    "edm_preconditioning",
    "timestep_embedding",
]


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


def _conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 3x3 convolution; for inference on the CPU, on maps of 4x4 and up,
    computed from a channels-last copy of ``x`` and returned in NCHW again. oneDNN's
    direct kernels run these shapes 1.3-1.8x faster from channels-last input than from
    NCHW, while GroupNorm's NCHW kernel is 3-6x faster than its channels-last one
    (``python benchmarks/tune_stages.py --forward``; the same sums, in another order)."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.shape[-1] < 4:
        return conv(x)
    return conv(x.contiguous(memory_format=torch.channels_last)).contiguous()


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
        h = _conv(self.conv1, F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = _conv(self.conv2, self.dropout(F.silu(h)))
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
        self._frozen = FrozenGraph()

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
        # inference on the CPU runs a frozen graph of _core (dpmsolver.digits.frozen)
        return self._frozen(self, self._core, x, t.reshape(b), y.reshape(b))

    def _core(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on ``(B,)`` times and labels."""
        t_emb = timestep_embedding(t, self.t_dim).to(x.dtype)
        emb = F.silu(self.time_mlp(t_emb) + self.class_emb(y))

        h = _conv(self.conv_in, x)
        skips = [h]
        for lvl, blocks in enumerate(self.down):
            for block in blocks.children():
                h = block(h, emb)
                skips.append(h)
            if lvl < len(self.downsample):
                h = _conv(self.downsample[lvl], h)
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
                h = _conv(self.upsample[i], h)

        return _conv(self.conv_out, F.silu(self.norm_out(h)))


def _as_batch(v: torch.Tensor | float, b: int, device: torch.device) -> torch.Tensor:
    """``v`` (scalar or ``(B,)``) as a ``(B,)`` tensor on ``device``."""
    v = torch.as_tensor(v, device=device)
    if v.ndim == 0:
        v = v.expand(b)
    return v.reshape(b)


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding ``(grid * grid, dim)`` (as in DiT / MAE).

    Half of the channels encode the row, half the column, each with
    ``timestep_embedding``'s frequencies (``max_period`` 10000).
    """
    if dim % 4:
        raise ValueError(f"the DiT width must be a multiple of 4, got {dim}")
    pos = torch.arange(grid, dtype=torch.float32)
    rows = timestep_embedding(pos.repeat_interleave(grid), dim // 2)
    cols = timestep_embedding(pos.repeat(grid), dim // 2)
    return torch.cat([rows, cols], dim=1)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, "DiT", Sec. 3.2).

    The conditioning vector regresses per-channel shift, scale and a residual gate for
    the attention and MLP branches; the regression layer starts at zero, so every
    block starts as the identity.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)
        )
        self.ada = nn.Linear(dim, 6 * dim)
        _zero_init(self.ada)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``x``: tokens ``(B, N, dim)``; ``c``: activated conditioning ``(B, dim)``."""
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        qkv = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class DigitsDiT(nn.Module):
    """Small class-conditional DiT-style transformer for 8x8 digits (flow prediction).

    The image is cut into ``patch_size`` x ``patch_size`` patches (16 tokens for
    patch size 2), linearly embedded, given a fixed 2D sine-cosine position
    embedding and passed through ``depth`` adaLN-Zero transformer blocks
    (Peebles & Xie 2023, "DiT"). The conditioning vector is an MLP of the
    sinusoidal embedding of the network time plus a learned class embedding
    (label ``num_classes`` = null label for classifier-free guidance). A final
    adaLN-modulated, zero-initialised linear layer maps tokens back to patches.

    As a rectified-flow model (Liu et al. 2023; Esser et al. 2024, "SD3") it
    predicts the velocity ``u = eps - x0`` of ``x_s = (1 - s) x0 + s eps`` and
    takes the network time ``t = 1000 s`` (diffusers' flow-transformer convention).

    Args:
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP hidden width / ``dim``.
        patch_size: patch side (must divide ``image_size``).
        image_size: image side.
        num_classes: number of real classes; label ``num_classes`` means "null".
    """

    def __init__(
        self,
        dim: int = 96,
        depth: int = 6,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        patch_size: int = 2,
        image_size: int = 8,
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch size {patch_size} does not divide image size {image_size}")
        self.config = {
            "dim": dim,
            "depth": depth,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "patch_size": patch_size,
            "image_size": image_size,
            "num_classes": num_classes,
        }
        self.num_classes = num_classes
        self.null_label = num_classes
        self.patch_size = patch_size
        self.grid = image_size // patch_size
        self.dim = dim
        self.patch_embed = nn.Linear(patch_size * patch_size, dim)
        self.register_buffer("pos_embed", _sincos_2d(dim, self.grid), persistent=False)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.class_emb = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList([DiTBlock(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, patch_size * patch_size)
        _zero_init(self.ada_out)
        _zero_init(self.out)
        self._frozen = FrozenGraph()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predict the flow velocity ``eps - x0``.

        Args:
            x: noisy images ``(B, 1, 8, 8)``, ``x_s = (1 - s) x0 + s eps``.
            t: network time ``1000 s`` in ``[0, 1000]`` (float), shape ``(B,)`` or scalar.
            y: int64 labels ``(B,)`` or scalar; ``num_classes`` (10) is the null label.

        Returns:
            predicted velocity with the shape and dtype of ``x``.
        """
        b = x.shape[0]
        t = _as_batch(t, b, x.device)
        y = _as_batch(torch.as_tensor(y, dtype=torch.long), b, x.device)
        # inference on the CPU runs a frozen graph of _core (dpmsolver.digits.frozen)
        return self._frozen(self, self._core, x, t, y)

    def _core(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on ``(B,)`` times and labels."""
        b, _, h, w = x.shape
        p, g = self.patch_size, self.grid
        tokens = x.reshape(b, h // p, p, w // p, p).permute(0, 1, 3, 2, 4).reshape(b, g * g, p * p)
        z = self.patch_embed(tokens) + self.pos_embed.to(x.dtype)
        t_emb = timestep_embedding(t, self.dim).to(x.dtype)
        c = F.silu(self.time_mlp(t_emb) + self.class_emb(y))
        for block in self.blocks:
            z = block(z, c)
        shift, scale = self.ada_out(c)[:, None].chunk(2, dim=-1)
        out = self.out(self.norm_out(z) * (1 + scale) + shift)
        return out.reshape(b, g, g, p, p).permute(0, 1, 3, 2, 4).reshape(b, 1, h, w)


def edm_preconditioning(
    sigma: torch.Tensor, sigma_data: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1, "Ours" column).

    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``.

    Args:
        sigma: noise levels (any shape, positive).
        sigma_data: standard deviation of the data.

    Returns:
        ``(c_skip, c_out, c_in, c_noise)``, each of ``sigma``'s shape and dtype.
    """
    sd2 = sigma_data**2
    s2 = sigma * sigma
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / (s2 + sd2).sqrt()
    c_in = 1.0 / (s2 + sd2).sqrt()
    c_noise = sigma.log() / 4.0
    return c_skip, c_out, c_in, c_noise


class DigitsEDM(nn.Module):
    """Class-conditional EDM denoiser for 8x8 digits (Karras et al. 2022, Sec. 5, Table 1).

    ``D(x; sigma, y) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x; c_noise(sigma), y)``
    with the raw network ``F`` a :class:`DigitsUNet` (its time input receives
    ``c_noise = ln(sigma) / 4``, as EDM feeds its positional embedding), see
    :func:`edm_preconditioning`. It is a variance-exploding model: ``x = x0 + sigma eps``,
    and the call returns the denoised ``x0`` estimate ("x0 prediction") given the
    noise level ``sigma`` itself as the time.

    Args:
        sigma_data: standard deviation of the training data (the preconditioning's ``sd``).
        sigma_min: smallest noise level the model is meant to be sampled at.
        sigma_max: largest noise level the model is meant to be sampled at.
        unet: keyword arguments of the inner :class:`DigitsUNet` (default: its defaults).
    """

    def __init__(
        self,
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        unet: dict[str, object] | None = None,
    ) -> None:
        super().__init__()
        net_kwargs = dict(unet or {})
        if "channel_mult" in net_kwargs:
            net_kwargs["channel_mult"] = tuple(net_kwargs["channel_mult"])  # type: ignore[arg-type]
        self.net = DigitsUNet(**net_kwargs)  # type: ignore[arg-type]
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.num_classes = self.net.num_classes
        self.null_label = self.net.null_label
        self.config = {
            "sigma_data": self.sigma_data,
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "unet": self.net.config,
        }

    def preconditioning(
        self, sigma: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at ``sigma`` for this model's ``sigma_data``."""
        return edm_preconditioning(sigma, self.sigma_data)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Denoise: return ``D(x; sigma, y)``, the estimate of the clean image ``x0``.

        Args:
            x: noisy images ``x0 + sigma eps`` of shape ``(B, 1, 8, 8)``.
            sigma: noise levels, shape ``(B,)`` or scalar (positive).
            y: int64 labels ``(B,)`` or scalar; ``num_classes`` (10) is the null label.

        Returns:
            the denoised images, with the shape and dtype of ``x``. The coefficients are
            computed in float32 (or float64 for float64 inputs).
        """
        b = x.shape[0]
        cdtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        sigma = _as_batch(sigma, b, x.device).to(cdtype)
        c_skip, c_out, c_in, c_noise = (c.view(b, 1, 1, 1) for c in self.preconditioning(sigma))
        f = self.net((c_in * x).to(x.dtype), c_noise.reshape(b), y)
        return (c_skip * x + c_out * f).to(x.dtype)


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
