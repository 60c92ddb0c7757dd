"""Sample quality on the built-in digits model: class accuracy and a Frechet distance.

The shipped classifier (:func:`dpmsolver.digits.load_classifier`) scores samples: *class
accuracy* is the fraction of conditional samples it assigns to the requested class, and
the *Frechet distance* compares Gaussians fitted to its penultimate-layer features of
generated digits and of the held-out real digits (Heusel et al. 2017's FID formula, with a
local feature extractor instead of Inception, whose weights cannot be downloaded here).
Where torch-fidelity is installed and its Inception weights are already in torch's hub
cache, :func:`inception_fid` gives the real FID as well.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = [
    "classify",
    "frechet_distance",
    "inception_fid",
    "inception_fid_unavailable",
    "real_digits",
]

# torch-fidelity's port of the TF Inception used by the original FID code (Heusel et al. 2017)
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` for feature rows ``a``, ``b``.

    The matrix square root's trace is computed as ``sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2)))``
    (a symmetric positive semi-definite matrix), which needs no scipy and stays real.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature arrays must be (n, d) with equal d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = root_a @ s_b @ root_a
    tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt)


def classify(
    classifier: torch.nn.Module, x: Tensor, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted labels, penultimate features)`` of samples ``x`` (``(B, 1, 8, 8)`` in
    [-1, 1]; values are clipped to that range first, as an image would be)."""
    preds, feats = [], []
    device = next(classifier.parameters()).device
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            xb = x[i : i + batch].to(device=device, dtype=torch.float32).clamp(-1, 1)
            preds.append(classifier(xb).argmax(1).cpu())
            feats.append(classifier.features(xb).cpu())  # type: ignore[operator]
    return torch.cat(preds).numpy(), torch.cat(feats).double().numpy()


def real_digits() -> tuple[Tensor, Tensor]:
    """The held-out real digits (images in [-1, 1], labels) of the training split."""
    from ..digits.train import load_digits_split

    _, _, x_test, y_test = load_digits_split()
    return x_test, y_test


def inception_fid_unavailable() -> str | None:
    """Why :func:`inception_fid` cannot run here, or ``None`` when it can (torch-fidelity
    importable and its Inception weights in ``torch.hub.get_dir()/checkpoints``: we never
    trigger a download)."""
    try:
        importlib.import_module("torch_fidelity")
    except ImportError:
        return "torch-fidelity is not installed"
    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not path.is_file():
        return f"torch-fidelity's Inception weights are not at {path}"
    return None


class _Uint8Images(Dataset[Tensor]):
    """Images in [-1, 1] as the 3-channel uint8 tensors torch-fidelity reads (it resizes to
    299 x 299 itself)."""

    def __init__(self, x: Tensor) -> None:
        x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        self.x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i: int) -> Tensor:
        return self.x[i]


def inception_fid(samples: Tensor, real: Tensor, *, device: torch.device | str = "cpu") -> float:
    """The Frechet Inception Distance (Heusel et al. 2017, Eq. 6) between ``samples`` and
    ``real`` (``(B, C, H, W)`` in [-1, 1], C = 1 or 3), computed by torch-fidelity.

    Raises ``RuntimeError`` naming the reason when it is unavailable."""
    reason = inception_fid_unavailable()
    if reason is not None:
        raise RuntimeError(f"real FID unavailable: {reason}")
    tf = importlib.import_module("torch_fidelity")
    metrics = tf.calculate_metrics(
        input1=_Uint8Images(samples),
        input2=_Uint8Images(real),
        fid=True,
        cuda=torch.device(device).type == "cuda",
        cache=False,
        verbose=False,
    )
    return float(metrics["frechet_inception_distance"])
