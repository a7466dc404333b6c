"""The training loop: schedule, same-seed determinism, precision paths, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hevisum.config import TrainConfig
from hevisum.models.factory import create_model
from hevisum.training import (
    augment_batch,
    dihedral_views,
    inference_copy,
    lr_at,
    predict_tiles,
    train_tile_model,
)


def _toy(n: int = 40, T: int = 6, seed: int = 0):
    """Tiles whose mean colour encodes the targets, so a network can learn something in a few steps."""
    rng = np.random.default_rng(seed)
    Y = rng.random((n, T)).astype(np.float32)
    tiles = rng.integers(0, 60, (n, 78, 78, 3)).astype(np.uint8)
    tiles[..., 0] += (Y[:, 0] * 190).astype(np.uint8)[:, None, None]
    tiles[..., 2] += (Y[:, 1] * 190).astype(np.uint8)[:, None, None]
    return tiles, Y


def test_lr_schedule_is_cosine_from_lr_to_min_lr():
    assert lr_at(0, 100, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert lr_at(99, 100, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert lr_at(49.5, 100, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    steps = [lr_at(i, 50, 1e-3, 1e-6) for i in range(50)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_gives_the_same_predictions(workers):
    tiles, Y = _toy(24)
    cfg = TrainConfig(epochs=2, batch_size=8, patience=5, augment=True, num_workers=workers)
    train, val = np.arange(16), np.arange(16, 24)
    preds = []
    for _ in range(2):
        torch.manual_seed(123)  # a different global state must not matter: the loop seeds itself
        net = create_model("hevisum-cnn", Y.shape[1])
        res = train_tile_model(net, tiles, train, val, Y, Y[val], cfg, seed=7)
        assert len(res.log) == 2 and {"epoch", "train_loss", "val_loss", "val_spearman", "lr"} <= set(res.log)
        preds.append(predict_tiles(net, tiles, val, batch_size=16))
    np.testing.assert_array_equal(preds[0], preds[1])
    # And another seed gives other weights.
    net = create_model("hevisum-cnn", Y.shape[1])
    train_tile_model(net, tiles, train, val, Y, Y[val], cfg, seed=8)
    assert not np.array_equal(predict_tiles(net, tiles, val, batch_size=16), preds[0])


def test_bfloat16_inference_agrees_with_float32():
    tiles, Y = _toy(24)
    torch.manual_seed(0)
    net = create_model("hevisum-cnn", Y.shape[1])
    rows = np.arange(24)
    p32 = predict_tiles(net, tiles, rows, precision="fp32")
    pbf = predict_tiles(net, tiles, rows, precision="auto")
    assert p32.shape == pbf.shape == (24, Y.shape[1])
    r = np.corrcoef(p32.ravel(), pbf.ravel())[0, 1]
    assert r > 0.99, r
    # The model itself stays float32 (prediction works on a copy).
    assert next(net.parameters()).dtype == torch.float32


def test_inference_copy_folds_batchnorm_into_convolutions_without_changing_outputs():
    torch.manual_seed(0)
    net = create_model("hevisum-cnn", 5).eval()
    g = torch.Generator().manual_seed(1)
    n_bn = 0
    for m in net.modules():  # BatchNorm statistics and affine parameters as after training, not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            n_bn += 1
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    fused = inference_copy(net)
    assert n_bn > 10 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_bn  # the original is untouched
    x = torch.rand(4, 3, 78, 78)
    with torch.no_grad():
        np.testing.assert_allclose(fused(x).numpy(), net(x).numpy(), rtol=1e-4, atol=1e-4)
    assert next(inference_copy(net, torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_augmentation_and_tta_views_are_the_dihedral_group():
    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(2, 4, 4, 3)
    views = dihedral_views(x)
    assert len(views) == 8
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        a = augment_batch(x, gen)
        assert any(torch.equal(a, v) for v in views)


def test_early_stopping_keeps_the_best_epoch():
    tiles, Y = _toy(30)
    cfg = TrainConfig(epochs=4, batch_size=10, patience=1, lr=3e-3)
    net = create_model("hevisum-cnn", Y.shape[1])
    res = train_tile_model(net, tiles, np.arange(20), np.arange(20, 30), Y, Y[20:], cfg, seed=0)
    best = res.log["val_spearman"].max()
    assert res.best_score == pytest.approx(best)
    assert res.best_epoch == int(res.log.loc[res.log["val_spearman"].idxmax(), "epoch"])
    # The returned weights are the best epoch's: re-predicting reproduces its validation score.
    from hevisum.metrics import mean_spot_spearman

    again = mean_spot_spearman(predict_tiles(net, tiles, np.arange(20, 30), batch_size=64), Y[20:])
    assert again == pytest.approx(best, abs=1e-6)


def test_effnet_finetune_trains_end_to_end_from_pretrained_weights():
    tiles, Y = _toy(24)
    net = create_model("effnet-lite0", Y.shape[1], pretrained=True)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = TrainConfig(epochs=1, batch_size=8, patience=2)
    res = train_tile_model(net, tiles, np.arange(16), np.arange(16, 24), Y, Y[16:], cfg, seed=0)
    assert len(res.log) == 1 and np.isfinite(res.log["train_loss"]).all()
    # Fine-tuning moves the encoder too, not only the head.
    changed = [k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert any(not k.startswith("head") and "classifier" not in k for k in changed), changed[:5]
