"""Image grids and PNG files, written atomically.

PNG encoding uses Pillow (the ``demo`` extra installs it); where Pillow is absent a plain
encoder (zlib + struct, PNG spec ISO/IEC 15948) keeps the core dependency-free.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .io import atomic_write_bytes

__all__ = ["encode_png", "make_grid_image", "to_uint8", "write_png"]


def to_uint8(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """``(B, C, H, W)`` floats in ``value_range`` -> ``(B, H, W, C)`` uint8, clipped."""
    lo, hi = value_range
    y = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (y * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def make_grid_image(
    images: np.ndarray, nrow: int, *, scale: int = 1, pad: int = 1, pad_value: int = 0
) -> np.ndarray:
    """Tile ``(B, H, W, C)`` uint8 images into ``nrow`` columns (row-major), each upscaled by
    ``scale`` (nearest neighbour) with ``pad`` pixels between tiles."""
    if images.ndim != 4:
        raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
    b, h, w, c = images.shape
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    ncol = max(1, min(nrow, b))
    nrows = (b + ncol - 1) // ncol
    out = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(b):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        out[y0 : y0 + h, x0 : x0 + w] = images[i]
    return out


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an ``(H, W)`` or ``(H, W, C)`` uint8 image, C in {1, 3, 4}."""
    if image.dtype != np.uint8:
        raise ValueError("PNG images must be uint8")
    if image.ndim == 2:
        image = image[:, :, None]
    c = image.shape[2]
    if c not in (1, 3, 4):
        raise ValueError(f"PNG needs 1, 3 or 4 channels, got {c}")
    try:
        from PIL import Image
    except ImportError:
        return _plain_png(image)
    buf = io.BytesIO()
    Image.fromarray(image[:, :, 0] if c == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _plain_png(image: np.ndarray) -> bytes:
    """The fallback encoder: one IDAT chunk, filter type 0 on every row."""
    h, w, c = image.shape
    color = {1: 0, 3: 2, 4: 6}[c]
    raw = b"".join(b"\x00" + image[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + tag
            + data
            + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


def write_png(path: str | Path, image: np.ndarray) -> None:
    """Atomically write ``image`` (uint8) as a PNG file."""
    atomic_write_bytes(path, encode_png(image))


def grid_from_samples(
    x: Tensor, nrow: int, *, scale: int = 4, value_range: Sequence[float] = (-1.0, 1.0)
) -> np.ndarray:
    """Samples ``(B, C, H, W)`` -> one uint8 grid image."""
    lo, hi = value_range
    return make_grid_image(to_uint8(x, (lo, hi)), nrow, scale=scale, pad=max(1, scale // 2))
