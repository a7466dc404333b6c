"""Tests for hevisum.models: the reference CNN, EfficientNet-Lite0, baselines, stackers and the factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hevisum.errors import HevisumError
from hevisum.models import (
    COLOUR_FEATURE_NAMES,
    MODEL_NAMES,
    EfficientNetLite0,
    EffNetRegressor,
    MeanBaseline,
    MLPHead,
    RidgeHead,
    RidgeStacker,
    StackingMLP,
    VisionMLP_MultiTask,
    colour_features,
    create_model,
    extract_features,
    fit_stacker,
    load_pretrained_lite0,
    model_config,
    normalise_uint8,
)
from hevisum.models.cnn import split_subtiles
from hevisum.models.effnet import lite0_weights_path


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _smooth_tiles(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields: natural-image-like low-frequency content, uint8 (n, size, size, 3)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand((n, 3, 6, 6), generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    return (fine.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()


def _real_image_tiles(n: int, size: int) -> np.ndarray:
    """Crops of a real photograph (skimage's astronaut), or smooth fields when skimage data is unavailable."""
    try:
        from skimage import data

        img = data.astronaut()
    except Exception:  # sample data missing: synthetic content is still a valid input
        return _smooth_tiles(n, size)
    rng = np.random.default_rng(0)
    ys = rng.integers(0, img.shape[0] - size, n)
    xs = rng.integers(0, img.shape[1] - size, n)
    return np.stack([img[y : y + size, x : x + size] for y, x in zip(ys, xs)])


# ---------------------------------------------------------------- reference CNN


def test_cnn_parameter_count_matches_reference() -> None:
    assert _n_params(VisionMLP_MultiTask(n_outputs=35)) == 6_679_843


def test_cnn_shapes_and_eval_determinism() -> None:
    torch.manual_seed(0)
    model = VisionMLP_MultiTask(n_outputs=35).eval()
    x = normalise_uint8(_smooth_tiles(2, 78))
    with torch.no_grad():
        out1, out2 = model(x), model(x)
        feats = model.forward_features(x)
    assert out1.shape == (2, 35)
    assert feats.shape == (2, 384)
    assert torch.equal(out1, out2)
    assert torch.allclose(model.forward_head(feats), out1)


def test_cnn_rejects_bad_tile_size() -> None:
    with pytest.raises(HevisumError, match="divisible by 3"):
        VisionMLP_MultiTask(4)(torch.zeros(1, 3, 77, 77))


def test_split_subtiles_is_row_major_with_centre_at_4() -> None:
    x = torch.arange(9, dtype=torch.float32).view(1, 1, 3, 3).repeat_interleave(2, 2).repeat_interleave(2, 3)
    sub = split_subtiles(x)  # 6×6 tile whose 2×2 blocks hold 0..8 in row-major order
    assert sub.shape == (1, 9, 1, 2, 2)
    assert sub[0, :, 0, 0, 0].tolist() == list(range(9))


def test_normalise_uint8_layout_and_values() -> None:
    tiles = np.zeros((2, 4, 5, 3), np.uint8)
    tiles[..., 0] = 255
    x = normalise_uint8(tiles)
    assert x.shape == (2, 3, 4, 5) and x.dtype == torch.float32
    assert torch.allclose(x[:, 0], torch.full((2, 4, 5), (1 - 0.485) / 0.229))
    assert torch.allclose(x[:, 1], torch.full((2, 4, 5), -0.456 / 0.224))
    with pytest.raises(HevisumError, match="uint8"):
        normalise_uint8(np.zeros((1, 4, 4, 3), np.float32))


# ---------------------------------------------------------------- EfficientNet-Lite0


@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0:
    return load_pretrained_lite0()


def test_effnet_strict_load_matches_every_key(lite0: EfficientNetLite0) -> None:
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(lite0.state_dict())
    for key, value in state.items():
        assert torch.equal(lite0.state_dict()[key], value), key
    assert _n_params(lite0) == 4_652_008


def test_effnet_missing_file_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(HevisumError, match="not found"):
        load_pretrained_lite0(tmp_path / "nope.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"x": torch.zeros(1)}, bad)
    with pytest.raises(HevisumError, match="not an EfficientNet-Lite0"):
        load_pretrained_lite0(bad)


def test_pretrained_features_differ_from_random_init(lite0: EfficientNetLite0) -> None:
    torch.manual_seed(0)
    random_net = EfficientNetLite0().eval()
    x = normalise_uint8(_smooth_tiles(4, 96))
    with torch.no_grad():
        f_pre, f_rand = lite0.forward_features(x), random_net.forward_features(x)
    assert f_pre.shape == (4, 1280)
    cos = torch.nn.functional.cosine_similarity(f_pre, f_rand, dim=1)
    assert cos.max() < 0.9
    # loaded BatchNorm statistics are not the fresh defaults (mean 0, var 1)
    assert lite0._bn1.running_var.mean().item() != pytest.approx(1.0, abs=1e-3)


def test_pretrained_classifier_gives_proper_softmax(lite0: EfficientNetLite0) -> None:
    x = normalise_uint8(_smooth_tiles(1, 224))
    with torch.no_grad():
        probs = lite0(x).softmax(dim=1)
    assert torch.isfinite(probs).all()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)
    # a trained ImageNet classifier is not uniform on any input
    assert probs.max().item() > 5.0 / 1000


def test_pretrained_classifier_recognises_a_cat(lite0: EfficientNetLite0) -> None:
    data = pytest.importorskip("skimage.data")
    try:
        img = data.chelsea()  # a tabby cat photograph shipped with scikit-image
    except Exception:
        pytest.skip("scikit-image sample image unavailable")
    side = min(img.shape[:2])
    y0, x0 = (img.shape[0] - side) // 2, (img.shape[1] - side) // 2
    crop = np.ascontiguousarray(img[y0 : y0 + side, x0 : x0 + side])[None]
    x = torch.nn.functional.interpolate(normalise_uint8(crop), size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top5 = lite0(x).topk(5, dim=1).indices[0].tolist()
    assert set(top5) & {281, 282, 283, 284, 285}, top5  # ImageNet domestic-cat classes


def test_extract_features_bf16_close_to_fp32(lite0: EfficientNetLite0) -> None:
    tiles = _real_image_tiles(8, 78)
    f32 = extract_features(lite0, tiles, batch_size=8, input_size=112, autocast_bf16=False)
    bf16 = extract_features(lite0, tiles, batch_size=8, input_size=112, autocast_bf16=True)
    assert f32.dtype == np.float32 and bf16.dtype == np.float32 and f32.shape == (8, 1280)
    cos = (f32 * bf16).sum(1) / (np.linalg.norm(f32, axis=1) * np.linalg.norm(bf16, axis=1))
    assert cos.min() > 0.99


def test_extract_features_memmap_and_uneven_batches(lite0: EfficientNetLite0, tmp_path) -> None:
    tiles = _smooth_tiles(7, 64, seed=3)
    mm = np.lib.format.open_memmap(tmp_path / "tiles.npy", mode="w+", dtype=np.uint8, shape=tiles.shape)
    mm[:] = tiles
    mm.flush()
    mm_ro = np.load(tmp_path / "tiles.npy", mmap_mode="r")
    lite0.train()  # extract_features must switch to eval and restore the mode
    out_a = extract_features(lite0, mm_ro, batch_size=3, autocast_bf16=False)
    assert lite0.training
    lite0.eval()
    out_b = extract_features(lite0, tiles, batch_size=7, autocast_bf16=False)
    assert out_a.shape == (7, 1280)
    np.testing.assert_allclose(out_a, out_b, rtol=1e-4, atol=1e-4)
    with pytest.raises(HevisumError, match="uint8"):
        extract_features(lite0, tiles.astype(np.float32))


def test_stage_features_pool_every_stage_and_end_with_the_embedding(lite0: EfficientNetLite0) -> None:
    tiles = _real_image_tiles(6, 78)
    head = extract_features(lite0, tiles, batch_size=4, input_size=112, autocast_bf16=False)
    st = extract_features(lite0, tiles, batch_size=4, input_size=112, autocast_bf16=False, stages=True)
    widths = [16, 24, 40, 80, 112, 192, 320]
    assert st.shape == (6, 2 * sum(widths) + 1280)
    np.testing.assert_allclose(st[:, -1280:], head, rtol=1e-4, atol=1e-4)
    # the first stage's mean/std pools, recomputed by hand from the stem and block 0
    x = torch.nn.functional.interpolate(normalise_uint8(torch.from_numpy(tiles)), size=(112, 112), mode="bilinear",
                                        align_corners=False, antialias=False)
    with torch.no_grad():
        h = lite0._blocks[0](torch.nn.functional.relu6(lite0._bn0(lite0._conv_stem(x))))
    np.testing.assert_allclose(st[:, :16], h.mean(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st[:, 16:32], h.std(dim=(2, 3)).numpy(), rtol=1e-4, atol=1e-5)


def test_effnet_regressor_freeze_and_shapes() -> None:
    model = EffNetRegressor(5, pretrained=False, freeze=True)
    model.train()
    assert not model.encoder.training
    assert all(not p.requires_grad for p in model.encoder.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    x = torch.randn(2, 3, 78, 78)
    assert model(x).shape == (2, 5)
    assert model.forward_features(x).shape == (2, 1280)


# ---------------------------------------------------------------- baselines


def test_mean_baseline_predicts_training_mean() -> None:
    y = np.random.default_rng(0).normal(size=(20, 4))
    pred = MeanBaseline().fit(None, y).predict(np.zeros((3, 7)))
    np.testing.assert_allclose(pred, np.tile(y.mean(0), (3, 1)))


def test_ridge_head_learns_linear_signal() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20)) * rng.uniform(0.1, 10, 20)  # uneven feature scales: the scaler must cope
    w = rng.normal(size=(20, 3))
    y = x @ w + rng.normal(scale=0.5, size=(400, 3))
    head = RidgeHead().fit(x[:300], y[:300])
    pred = head.predict(x[300:])
    r2 = 1 - ((pred - y[300:]) ** 2).sum(0) / ((y[300:] - y[300:].mean(0)) ** 2).sum(0)
    assert r2.min() > 0.9
    assert head.alpha_ in set(np.logspace(-2, 5, 15).tolist())


def test_mlp_head_is_deterministic_and_learns() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 8))
    y = np.tanh(x @ rng.normal(size=(8, 2))) + rng.normal(scale=0.05, size=(300, 2))  # smooth non-linear signal
    a = MLPHead(hidden=64, epochs=60, seed=3).fit(x[:240], y[:240]).predict(x[240:])
    b = MLPHead(hidden=64, epochs=60, seed=3).fit(x[:240], y[:240]).predict(x[240:])
    np.testing.assert_array_equal(a, b)
    mse_model = ((a - y[240:]) ** 2).mean()
    mse_mean = ((y[:240].mean(0) - y[240:]) ** 2).mean()
    assert mse_model < 0.6 * mse_mean


def test_colour_features_separate_eosin_from_haematoxylin() -> None:
    rng = np.random.default_rng(0)

    def tile(rgb: tuple[int, int, int]) -> np.ndarray:
        return np.clip(np.array(rgb) + rng.normal(0, 8, (78, 78, 3)), 0, 255).astype(np.uint8)

    pink, purple = tile((230, 110, 175)), tile((110, 70, 160))  # eosin-rich stroma vs haematoxylin-rich nuclei
    feats = colour_features(np.stack([pink, purple]))
    assert feats.shape == (2, len(COLOUR_FEATURE_NAMES)) and np.isfinite(feats).all()
    col = {name: i for i, name in enumerate(COLOUR_FEATURE_NAMES)}
    for region in ("tile", "centre"):
        assert feats[1, col[f"{region}_h_mean"]] > feats[0, col[f"{region}_h_mean"]] + 0.2
        assert feats[0, col[f"{region}_e_mean"]] > feats[1, col[f"{region}_e_mean"]]
        assert feats[0, col[f"{region}_e_fraction"]] > feats[1, col[f"{region}_e_fraction"]] + 0.3


def test_colour_features_chunked_memmap_equals_in_memory(tmp_path) -> None:
    tiles = _smooth_tiles(5, 30, seed=2)
    path = tmp_path / "t.npy"
    np.save(path, tiles)
    np.testing.assert_allclose(
        colour_features(np.load(path, mmap_mode="r"), chunk_size=2), colour_features(tiles), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------- stacking


def test_stacking_mlp_layers() -> None:
    net = StackingMLP(210, 35)
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(512, 210), (256, 512), (35, 256)]
    kinds = [type(m).__name__ for m in net.net]
    assert kinds[:4] == ["Linear", "LeakyReLU", "BatchNorm1d", "Dropout"]
    assert net.net[3].p == 0.2 and net.net[1].negative_slope == 0.01


def _stacking_data(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(360, 3))
    # three noisy "fold models" each seeing the truth through a different linear distortion
    x = np.concatenate([y @ rng.normal(size=(3, 3)) + rng.normal(scale=0.3, size=y.shape) for _ in range(3)], 1)
    groups = np.repeat(np.array(["S1", "S2", "S3"]), 120)
    return x, y, groups


def test_fit_stacker_deterministic_and_learns() -> None:
    x, y, groups = _stacking_data()
    train, test = np.arange(360) < 300, np.arange(360) >= 300
    a = fit_stacker(x[train], y[train], groups[train], seed=7, max_epochs=40)
    b = fit_stacker(x[train], y[train], groups[train], seed=7, max_epochs=40)
    pa, pb = a.predict(x[test]), b.predict(x[test])
    np.testing.assert_array_equal(pa, pb)
    assert a.held_out_group_ in {"S1", "S2", "S3"}
    mse_model = ((pa - y[test]) ** 2).mean()
    mse_mean = ((y[train].mean(0) - y[test]) ** 2).mean()
    assert mse_model < 0.5 * mse_mean


def test_fit_stacker_random_split_and_ridge() -> None:
    x, y, _ = _stacking_data(1)
    fitted = fit_stacker(x, y, None, seed=0, max_epochs=5)
    assert fitted.held_out_group_ is None and fitted.predict(x[:4]).shape == (4, 3)
    ridge = fit_stacker(x, y, kind="ridge")
    assert isinstance(ridge, RidgeStacker) and ridge.predict(x[:4]).shape == (4, 3)
    with pytest.raises(HevisumError, match="valid"):
        fit_stacker(x, y, kind="forest")


# ---------------------------------------------------------------- factory


def test_create_model_and_rebuild_from_config() -> None:
    assert MODEL_NAMES == ("hevisum-cnn", "effnet-lite0")
    cnn = create_model("hevisum-cnn", 35)
    cfg = model_config(cnn)
    assert cfg == {"name": "hevisum-cnn", "hparams": {"n_outputs": 35, "dropout": 0.1}}
    rebuilt = create_model(cfg["name"], **cfg["hparams"])
    rebuilt.load_state_dict(cnn.state_dict(), strict=True)
    eff = create_model("effnet-lite0", 4, pretrained=False)
    assert isinstance(eff, EffNetRegressor) and eff.hparams["pretrained"] is False
    assert isinstance(create_model(**{"name": "effnet-lite0", **model_config(eff)["hparams"]}), EffNetRegressor)


def test_create_model_errors() -> None:
    with pytest.raises(HevisumError, match="hevisum-cnn, effnet-lite0"):
        create_model("resnet50", 35)
    with pytest.raises(HevisumError, match="valid options"):
        create_model("hevisum-cnn", 35, width=3)
