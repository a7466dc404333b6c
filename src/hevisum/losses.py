"""Training losses for per-spot profile prediction (the metric is the per-spot Spearman over targets).

All losses take ``pred`` and ``target`` of shape (B, T) — one row per spot, T targets — and return a scalar.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hevisum.errors import HevisumError

#: Names accepted by :func:`make_loss`.
LOSS_NAMES: tuple[str, ...] = ("hybrid", "mse", "spearman", "mse+spearman")

LossFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def per_spot_pearson(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of ``pred`` with the same row of ``target`` over the last dim → (B,).

    A constant row has no defined correlation; ``eps`` in the denominator makes it 0 instead of NaN.
    """
    pc = pred - pred.mean(dim=-1, keepdim=True)
    tc = target - target.mean(dim=-1, keepdim=True)
    cov = (pc * tc).sum(dim=-1)
    denom = torch.sqrt((pc * pc).sum(dim=-1) * (tc * tc).sum(dim=-1))
    return cov / (denom + eps)


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries."""
    return F.mse_loss(pred, target)


def hybrid_alpha(epoch: float, a0: float = 0.3, a1: float = 0.9, ramp_epochs: int = 15) -> float:
    """Weight of the correlation term: ``a0`` at epoch 0 rising linearly to ``a1`` at ``ramp_epochs``, then ``a1``."""
    if ramp_epochs <= 0:
        return a1
    t = min(max(epoch, 0) / ramp_epochs, 1.0)
    return a0 + (a1 - a0) * t


def hybrid_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    epoch: int,
    a0: float = 0.3,
    a1: float = 0.9,
    ramp_epochs: int = 15,
) -> torch.Tensor:
    """The reference loss ``mse · (1 − a + a · (1 − mean per-spot Pearson))`` with ``a`` = :func:`hybrid_alpha`.

    Early epochs are mostly plain MSE (get the scale right); later ones weight the per-spot correlation more, which
    is what the Spearman metric rewards.
    """
    a = hybrid_alpha(epoch, a0, a1, ramp_epochs)
    mse = F.mse_loss(pred, target)
    return mse * (1.0 - a + a * (1.0 - per_spot_pearson(pred, target).mean()))


def soft_rank(x: torch.Tensor, regularization_strength: float = 0.1) -> torch.Tensor:
    """Differentiable ranks along the last dim: ``rank_i = 0.5 + Σ_j sigmoid((x_i − x_j) / τ)`` (1-based).

    τ = ``regularization_strength``, in the units of ``x``; as τ → 0 this tends to the ordinal ranks 1..n (ties get
    the average rank). Pairwise, so O(n²) memory per row — fine for the tens of targets used here.
    """
    if not regularization_strength > 0:
        raise HevisumError(f"regularization_strength must be > 0, got {regularization_strength!r}")
    diff = (x.unsqueeze(-1) - x.unsqueeze(-2)) / regularization_strength  # (..., n, n): x_i − x_j
    # the j = i term contributes sigmoid(0) = 0.5, so the smallest of n distinct values gets rank 1
    return 0.5 + torch.sigmoid(diff).sum(dim=-1)


def hard_rank(x: torch.Tensor) -> torch.Tensor:
    """Average ranks (1-based, ties share the mean rank, like ``scipy.stats.rankdata``) along the last dim; no grad."""
    with torch.no_grad():
        xi, xj = x.unsqueeze(-1), x.unsqueeze(-2)
        less = (xj < xi).sum(dim=-1)
        equal = (xj == xi).sum(dim=-1)
        return less.to(x.dtype) + (equal.to(x.dtype) + 1.0) / 2.0


def spearman_loss(
    pred: torch.Tensor, target: torch.Tensor, tau: float = 0.1, standardise: bool = True
) -> torch.Tensor:
    """``1 − mean per-spot Pearson(soft_rank(pred), rank(target))``: a differentiable 1 − Spearman.

    With ``standardise`` each prediction row is z-scored before ranking, so τ is in units of that row's standard
    deviation and the loss does not depend on the predictions' scale (Spearman does not either).
    """
    if standardise:
        mu = pred.mean(dim=-1, keepdim=True)
        sd = pred.std(dim=-1, keepdim=True)
        pred = (pred - mu) / (sd + 1e-8)
    return 1.0 - per_spot_pearson(soft_rank(pred, tau), hard_rank(target)).mean()


def make_loss(name: str, *, tau: float = 0.1, spearman_weight: float = 1.0, **hybrid_kwargs: float) -> LossFn:
    """The loss called ``name`` as a callable ``(pred, target, epoch) -> scalar``.

    'hybrid': :func:`hybrid_loss` (``hybrid_kwargs``: a0, a1, ramp_epochs); 'mse'; 'spearman': :func:`spearman_loss`;
    'mse+spearman': MSE + ``spearman_weight`` · Spearman loss. ``tau`` is the soft-rank temperature.
    """
    if name not in LOSS_NAMES:
        raise HevisumError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    if hybrid_kwargs and name != "hybrid":
        raise HevisumError(f"options {sorted(hybrid_kwargs)} only apply to the 'hybrid' loss, not {name!r}")
    unknown = sorted(set(hybrid_kwargs) - {"a0", "a1", "ramp_epochs"})
    if unknown:
        raise HevisumError(f"unknown hybrid loss options {unknown}; valid: a0, a1, ramp_epochs")
    if not tau > 0:
        raise HevisumError(f"tau must be > 0, got {tau!r}")

    def hybrid(pred: torch.Tensor, target: torch.Tensor, epoch: int) -> torch.Tensor:
        return hybrid_loss(pred, target, epoch, **hybrid_kwargs)  # type: ignore[arg-type]

    def mse(pred: torch.Tensor, target: torch.Tensor, epoch: int) -> torch.Tensor:
        return F.mse_loss(pred, target)

    def spearman(pred: torch.Tensor, target: torch.Tensor, epoch: int) -> torch.Tensor:
        return spearman_loss(pred, target, tau)

    def mse_spearman(pred: torch.Tensor, target: torch.Tensor, epoch: int) -> torch.Tensor:
        return F.mse_loss(pred, target) + spearman_weight * spearman_loss(pred, target, tau)

    return {"hybrid": hybrid, "mse": mse, "spearman": spearman, "mse+spearman": mse_spearman}[name]
