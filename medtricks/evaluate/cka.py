"""Centered kernel alignment (CKA): how alike two layers' representations of the same images are.

* :func:`linear_cka` -- linear CKA of Kornblith et al. (ICML 2019), eq. 5 with the feature-space
  form for few features and the Gram form for many (the same number):
  ``CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with column-centred ``Xc``, ``Yc``.
* :class:`MinibatchCKA` / :func:`minibatch_cka` -- minibatch CKA of Nguyen, Raghu & Kornblith (ICLR
  2021, "Do wide and deep networks learn the same things?"), eq. 2-3: the *unbiased* HSIC estimator
  of Song et al. (2012) on each minibatch's linear Gram matrices, averaged over the minibatches,
  then ``CKA = mean HSIC(K, L) / sqrt(mean HSIC(K, K) * mean HSIC(L, L))``. Only m x m Gram matrices
  are kept, so the activations of a large layer on many images never have to be held at once.

Both are 1 for identical representations, symmetric, invariant to orthogonal transforms and to
isotropic scaling of either representation, and *not* invariant to arbitrary invertible linear
transforms (tests/evaluate/test_cka.py checks each on random data). Everything is computed in float64.

Why not a package: the PyPI candidates (``torch-cka``, last release 2021; ``ckatorch``, which pulls
seaborn/safetensors and hooks models its own way) bring their own hook and plotting machinery for
what is ~40 lines of algebra; this module is those lines, checked against the paper's invariances.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medtricks.errors import ConfigError

__all__ = ["linear_cka", "minibatch_cka", "MinibatchCKA", "unbiased_hsic", "gram_linear"]


def _as_2d(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    t = t.detach().to(device="cpu", dtype=torch.float64)
    if t.ndim < 2:
        raise ConfigError(f"{name}: expected activations of shape (n_images, features...), got shape {tuple(t.shape)}")
    return t.reshape(t.shape[0], -1)


def gram_linear(x) -> torch.Tensor:
    """Linear-kernel Gram matrix ``X X^T`` (float64) of activations ``(n, features...)``."""
    x = _as_2d(x, "gram_linear")
    return x @ x.T


def linear_cka(x, y) -> float:
    """Linear CKA between two representations of the same ``n`` images (Kornblith et al. 2019).

    ``x``: ``(n, p1, ...)``, ``y``: ``(n, p2, ...)`` (trailing dimensions are flattened); numpy or torch.

    Example:
        >>> x = torch.randn(100, 8)
        >>> round(linear_cka(x, 3 * x), 6)
        1.0
    """
    x, y = _as_2d(x, "linear_cka x"), _as_2d(y, "linear_cka y")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"linear_cka: x has {x.shape[0]} images, y has {y.shape[0]}; expected the same images")
    if x.shape[0] < 2:
        raise ConfigError("linear_cka: needs at least 2 images")
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    n = x.shape[0]
    if max(x.shape[1], y.shape[1]) <= n:  # feature space: p x p products
        xy = torch.linalg.matrix_norm(y.T @ x) ** 2
        xx = torch.linalg.matrix_norm(x.T @ x)
        yy = torch.linalg.matrix_norm(y.T @ y)
    else:  # Gram form (centred Grams): tr(K L) = <K, L>_F, the same value for wide layers
        k, l_ = x @ x.T, y @ y.T
        xy = (k * l_).sum()
        xx = torch.linalg.matrix_norm(k)
        yy = torch.linalg.matrix_norm(l_)
    denom = xx * yy
    return float(xy / denom) if denom > 0 else float("nan")


def unbiased_hsic(k: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
    """Unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021 eq. 3) of two ``(m, m)`` Gram
    matrices (``m >= 4``); batched over leading dimensions (``(..., m, m)``)."""
    m = k.shape[-1]
    if m < 4:
        raise ConfigError(f"unbiased_hsic: needs minibatches of at least 4 images, got {m}")
    k = k.clone()
    l_ = l_.clone()
    k.diagonal(dim1=-2, dim2=-1).zero_()
    l_.diagonal(dim1=-2, dim2=-1).zero_()
    trace_kl = (k * l_.transpose(-2, -1)).sum((-2, -1))
    sums = k.sum((-2, -1)) * l_.sum((-2, -1)) / ((m - 1) * (m - 2))
    cross = (k.sum(-1) * l_.sum(-2)).sum(-1) * 2 / (m - 2)  # 1^T K L 1
    return (trace_kl + sums - cross) / (m * (m - 3))


class MinibatchCKA:
    """Accumulates minibatch CKA between every layer of one set and every layer of another.

    Call :meth:`update` with each minibatch's activations (lists of ``(m, features...)`` tensors,
    the same ``m`` images for both lists); :meth:`compute` returns the ``(len(a), len(b))`` matrix.

    Example:
        >>> acc = MinibatchCKA(1, 1)
        >>> for _ in range(4):
        ...     x = torch.randn(32, 10)
        ...     acc.update([x], [2 * x])
        >>> round(float(acc.compute()[0, 0]), 6)
        1.0
    """

    def __init__(self, n_a: int, n_b: int) -> None:
        self.xy = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.xx = torch.zeros(n_a, dtype=torch.float64)
        self.yy = torch.zeros(n_b, dtype=torch.float64)
        self.batches = 0
        self.images = 0

    def update(self, feats_a: Sequence, feats_b: Sequence) -> None:
        if len(feats_a) != self.xx.shape[0] or len(feats_b) != self.yy.shape[0]:
            raise ConfigError(
                f"MinibatchCKA.update: expected {self.xx.shape[0]} and {self.yy.shape[0]} layers, "
                f"got {len(feats_a)} and {len(feats_b)}"
            )
        ka = torch.stack([gram_linear(f) for f in feats_a])  # (A, m, m)
        kb = torch.stack([gram_linear(f) for f in feats_b])  # (B, m, m)
        if ka.shape[-1] != kb.shape[-1]:
            raise ConfigError(
                f"MinibatchCKA.update: {ka.shape[-1]} vs {kb.shape[-1]} images; expected the same minibatch"
            )
        self.xx += unbiased_hsic(ka, ka)
        self.yy += unbiased_hsic(kb, kb)
        self.xy += unbiased_hsic(ka[:, None], kb[None, :])
        self.batches += 1
        self.images += int(ka.shape[-1])

    def compute(self) -> np.ndarray:
        if not self.batches:
            raise ConfigError("MinibatchCKA.compute: no minibatch was added")
        denom = torch.sqrt(torch.clamp(self.xx[:, None] * self.yy[None, :], min=0))
        out = torch.where(denom > 0, self.xy / denom, torch.full_like(denom, float("nan")))
        return out.numpy()


def minibatch_cka(x, y, batch_size: int = 64) -> float:
    """Minibatch CKA between two representations of the same images (Nguyen et al. 2021), over
    consecutive minibatches of ``batch_size`` (a last batch of fewer than 4 images is left out).

    Example:
        >>> x = torch.randn(256, 8)
        >>> round(minibatch_cka(x, -x, batch_size=64), 6)
        1.0
    """
    x, y = _as_2d(x, "minibatch_cka x"), _as_2d(y, "minibatch_cka y")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(f"minibatch_cka: x has {x.shape[0]} images, y has {y.shape[0]}; expected the same images")
    if batch_size < 4:
        raise ConfigError(f"minibatch_cka: batch_size={batch_size}; expected at least 4")
    acc = MinibatchCKA(1, 1)
    for start in range(0, x.shape[0], batch_size):
        xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        if xb.shape[0] >= 4:
            acc.update([xb], [yb])
    return float(acc.compute()[0, 0])
