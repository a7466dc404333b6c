"""Tests for hevisum.losses: correlations, the hybrid schedule, soft ranks and the Spearman loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hevisum.errors import HevisumError
from hevisum.losses import (
    LOSS_NAMES,
    hard_rank,
    hybrid_alpha,
    hybrid_loss,
    make_loss,
    mse_loss,
    per_spot_pearson,
    soft_rank,
    spearman_loss,
)


def test_per_spot_pearson_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 35)), rng.normal(size=(6, 35))
    b[0] = a[0] * 2 + 1  # a perfectly correlated row
    got = per_spot_pearson(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    want = [stats.pearsonr(x, y)[0] for x, y in zip(a, b)]
    np.testing.assert_allclose(got, want, atol=1e-7)


def test_per_spot_pearson_constant_row_is_zero_not_nan() -> None:
    out = per_spot_pearson(torch.ones(1, 5), torch.arange(5.0)[None])
    assert torch.isfinite(out).all() and out.item() == 0.0


def test_hybrid_schedule() -> None:
    assert hybrid_alpha(0) == pytest.approx(0.3)
    assert hybrid_alpha(15) == pytest.approx(0.9)
    assert hybrid_alpha(30) == pytest.approx(0.9)
    assert hybrid_alpha(7.5) == pytest.approx(0.6)


def test_hybrid_loss_formula() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(8, 35), torch.randn(8, 35)
    mse = mse_loss(pred, target)
    r = per_spot_pearson(pred, target).mean()
    for epoch, a in ((0, 0.3), (15, 0.9)):
        expected = mse * (1 - a + a * (1 - r))
        assert hybrid_loss(pred, target, epoch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_soft_rank_tends_to_rankdata() -> None:
    rng = np.random.default_rng(0)
    x = rng.permutation(35).astype(np.float64)[None] + rng.uniform(0, 0.5, (4, 35))  # distinct, gaps ≥ 0.5
    got = soft_rank(torch.from_numpy(x), regularization_strength=0.02).numpy()
    want = np.stack([stats.rankdata(row) for row in x])
    assert np.abs(got - want).max() < 0.05


def test_hard_rank_averages_ties_like_scipy() -> None:
    x = torch.tensor([[0.0, 0.0, 0.3, 0.1, 0.0, 0.3]])
    np.testing.assert_allclose(hard_rank(x)[0].numpy(), stats.rankdata(x[0].numpy()))


def test_spearman_loss_matches_scipy_at_small_tau() -> None:
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=(16, 35)), rng.normal(size=(16, 35))
    target[:, :5] = 0.0  # ties in the target, as with zero cell-type proportions
    loss = spearman_loss(torch.from_numpy(pred), torch.from_numpy(target), tau=1e-3).item()
    want = 1 - np.mean([stats.spearmanr(p, t)[0] for p, t in zip(pred, target)])
    assert loss == pytest.approx(want, abs=1e-3)


def test_spearman_loss_gradients_flow() -> None:
    torch.manual_seed(0)
    pred = torch.randn(4, 35, requires_grad=True)
    spearman_loss(pred, torch.randn(4, 35), tau=0.1).backward()
    assert pred.grad is not None
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_make_loss_callables() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10)
    for name in LOSS_NAMES:
        value = make_loss(name)(pred, target, 3)
        assert value.ndim == 0 and torch.isfinite(value)
    combined = make_loss("mse+spearman", spearman_weight=0.5)(pred, target, 0)
    expected = mse_loss(pred, target) + 0.5 * spearman_loss(pred, target, 0.1)
    assert combined.item() == pytest.approx(expected.item(), rel=1e-6)
    assert make_loss("hybrid", a0=0.0, a1=0.0)(pred, target, 5).item() == pytest.approx(mse_loss(pred, target).item())


def test_make_loss_unknown_raises() -> None:
    with pytest.raises(HevisumError, match="hybrid, mse, spearman, mse\\+spearman"):
        make_loss("huber")
    with pytest.raises(HevisumError, match="only apply"):
        make_loss("mse", a0=0.1)
