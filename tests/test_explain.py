"""Integrated gradients on real networks: completeness, the frozen-encoder chain, overlays and hostile names.

Completeness: the attributions of a tile sum to f(tile) − f(baseline). The tests check it within 5 % of
|f(tile) − f(baseline)| for every tile/target pair, with fixed step counts measured to hold with a margin:

* ``VisionMLP_MultiTask`` (random init, 24 px tiles, 8 px subtiles; SiLU/LeakyReLU/max-pool): 64 Gauss-Legendre
  steps, black and white baselines (measured: at most 1.3 %).
* EfficientNet-Lite0 ``forward_stages`` stage statistics → per-slide z-score → ridge (72 px tiles resized to
  48 px): 128 steps, white and blurred baselines (measured: at most 1.5 %; 64 steps give up to 4.5 %).

The chain with Lite0's pooled 1280-d features (ReLU6 output) is checked for exactness against the pipeline's
prediction, not for completeness: channels almost never active on a slide get unit variance from the
standardisation and swing the output far beyond its end points along the path (see ``integrated_gradients``).
The relative criterion is undefined where f(tile) = f(baseline), so each tile explains the target it moves most.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from hevisum.errors import HevisumError
from hevisum.explain import (
    attribution_map,
    attribution_overlay,
    feature_head_forward,
    fold_ridge_head,
    integrated_gradients,
    lite0_embed,
    make_baseline,
    output_difference,
    overlay_rgb,
    save_png,
    save_slide_overlay,
    save_tile_overlays,
    slide_statistics,
    summarise_attributions,
    tile_model_forward,
)
from hevisum.models.baselines import RidgeHead
from hevisum.models.cnn import VisionMLP_MultiTask, normalise_uint8

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small batches: one thread is as fast and does not slow to a crawl when other jobs share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def he_tiles(n: int, size: int, seed: int = 0, fade: bool = False) -> np.ndarray:
    """Synthetic H&E-like uint8 tiles: pink stroma with purple nuclei blobs; ``fade`` mixes each with a random
    share of near-white background (tiles at the tissue edge)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        stroma = np.array([235.0, 190.0, 215.0]) + rng.normal(0, 15, 3)
        nuclei = np.array([90.0, 60.0, 150.0]) + rng.normal(0, 15, 3)
        blobs = gaussian_filter(rng.random((size, size)), rng.uniform(1.5, 4.0))
        mask = gaussian_filter((blobs > np.quantile(blobs, rng.uniform(0.5, 0.9))).astype(float), 1.0)[..., None]
        img = stroma * (1 - mask) + nuclei * mask + rng.normal(0, 12, (size, size, 3))
        if fade:
            share = rng.uniform(0, 1)
            img = (1 - share) * img + share * (250 + rng.normal(0, 3, (size, size, 3)))
        out.append(np.clip(img, 0, 255))
    return np.stack(out).astype(np.uint8)


def relative_error(delta: np.ndarray, diff: np.ndarray) -> np.ndarray:
    return np.abs(delta) / np.abs(diff)


@pytest.fixture(scope="module")
def cnn_forward():
    torch.manual_seed(0)
    return tile_model_forward(VisionMLP_MultiTask(n_outputs=5))


def fit_chain(embed, tiles):
    """Features of the slide's tiles → slide statistics → RidgeHead on synthetic targets → the chain."""
    with torch.no_grad():
        feats = embed(torch.from_numpy(tiles.astype(np.float32))).numpy()
    mean, std = slide_statistics(feats)
    z = (feats - mean) / std
    rng = np.random.default_rng(2)
    y = z[:, :40] @ rng.normal(size=(40, 4)) / 6 + rng.normal(size=(len(z), 4))
    head = RidgeHead().fit(z, y)
    chain = feature_head_forward(embed, mean, std, *fold_ridge_head(head))
    return {"chain": chain, "tiles": tiles, "feats": feats, "mean": mean, "std": std, "head": head}


@pytest.fixture(scope="module")
def slide_tiles():
    """A synthetic slide of 48 tiles, some faded towards the background as at the tissue edge."""
    return he_tiles(48, 72, seed=1, fade=True)


@pytest.fixture(scope="module")
def lite0_chain(slide_tiles):
    """Lite0 ``forward_stages`` (2848 columns, as the effnet-stages features) → slide z-score → ridge."""
    return fit_chain(lite0_embed(kind="effnet-stages", input_size=48), slide_tiles)


@pytest.fixture(scope="module")
def lite0_stage_chain(lite0_chain, slide_tiles):
    """The same encoder, stage statistics only (the first 1568 columns) → slide z-score → ridge."""
    enc = lite0_chain["chain"].embed.encoder
    return fit_chain(lite0_embed(enc, kind="effnet-stages", input_size=48, columns=slice(0, 1568)), slide_tiles)


def test_pixel_preprocessing_matches_normalise_uint8(cnn_forward):
    tiles = he_tiles(2, 24)
    x = cnn_forward.pre(torch.from_numpy(tiles.astype(np.float32)))
    torch.testing.assert_close(x, normalise_uint8(tiles), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = cnn_forward.model.eval()(normalise_uint8(tiles))
        torch.testing.assert_close(cnn_forward(torch.from_numpy(tiles.astype(np.float32))), expected)


@pytest.mark.parametrize("baseline", ["black", "white"])
def test_ig_completeness_cnn(cnn_forward, baseline):
    tiles = he_tiles(3, 24, seed=3)
    targets = [0, 2, 4]
    attr, delta = integrated_gradients(cnn_forward, tiles, targets, baseline=baseline, steps=64)
    assert attr.shape == tiles.shape and attr.dtype == np.float32
    assert delta.shape == (3,) and np.all(np.isfinite(attr))
    diff = output_difference(cnn_forward, tiles, targets, baseline=baseline)
    # delta is, by definition, sum(attr) − diff: check it against an independent forward pass
    np.testing.assert_allclose(attr.sum(axis=(1, 2, 3), dtype=np.float64) - diff, delta, atol=1e-5 * np.abs(diff).max())
    err = relative_error(delta, diff)
    print(f"cnn 24px {baseline} 64 steps: |f(x)-f(b)| {np.abs(diff)} relative error {err}")
    assert np.all(err < 0.05), err


def test_ig_refines_until_converged(cnn_forward):
    tiles = he_tiles(3, 24, seed=3)
    coarse_attr, coarse = integrated_gradients(cnn_forward, tiles, 1, baseline="black", steps=4)
    attr, delta = integrated_gradients(cnn_forward, tiles, 1, baseline="black", steps=4, rtol=0.05, max_steps=128)
    diff = output_difference(cnn_forward, tiles, 1, baseline="black")
    print(f"cnn refine: 4 steps {relative_error(coarse, diff)} → {relative_error(delta, diff)}")
    assert np.any(relative_error(coarse, diff) > 0.05)
    assert np.all(relative_error(delta, diff) < 0.05)


def test_lite0_embed_matches_extract_features(lite0_chain):
    from hevisum.models.effnet import extract_features

    tiles = lite0_chain["tiles"][:3]
    enc = lite0_chain["chain"].embed.encoder
    ref = extract_features(enc, tiles, input_size=48, autocast_bf16=False, stages=True)
    np.testing.assert_allclose(lite0_chain["feats"][:3], ref, rtol=1e-4, atol=1e-4)
    pooled = lite0_embed(enc, kind="effnet", input_size=48)
    with torch.no_grad():
        got = pooled(torch.from_numpy(tiles.astype(np.float32))).numpy()
    np.testing.assert_allclose(got, ref[:, -1280:], rtol=1e-4, atol=1e-4)


def test_feature_chain_equals_pipeline_prediction(lite0_chain):
    from hevisum.features import standardise_per_slide

    c = lite0_chain
    z = standardise_per_slide(c["feats"], np.zeros(len(c["feats"]), dtype=int))
    with torch.no_grad():
        out = c["chain"](torch.from_numpy(c["tiles"].astype(np.float32))).numpy()
    pred = c["head"].predict(z)
    np.testing.assert_allclose(out, pred, atol=1e-3 * np.abs(pred).max())
    # extra columns after the encoder's (e.g. colour statistics) are left out of the chain
    extra = np.random.default_rng(0).normal(size=(len(z), 5))
    head2 = RidgeHead(alpha=10.0).fit(np.hstack([z, extra]), pred)
    coef, intercept = fold_ridge_head(head2.state())
    chain2 = feature_head_forward(c["chain"].embed, c["mean"], c["std"], coef, intercept)
    with torch.no_grad():
        out2 = chain2(torch.from_numpy(c["tiles"].astype(np.float32))).numpy()
    expected = head2.predict(np.hstack([z, extra])) - extra @ coef[:, -5:].T
    np.testing.assert_allclose(out2, expected, atol=1e-3 * np.abs(expected).max())


def test_fold_ridge_head_with_and_without_pca():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 12)) * rng.uniform(0.1, 10, 12) + 3, rng.normal(size=(60, 3))
    head = RidgeHead(alpha=3.0).fit(x, y)
    coef, intercept = fold_ridge_head(head)
    np.testing.assert_allclose(x @ coef.T + intercept, head.predict(x), atol=1e-10)
    mean = x.mean(axis=0)
    comps = np.linalg.svd(x - mean, full_matrices=False)[2][:5]
    probe = RidgeHead(alpha=3.0).fit((x - mean) @ comps.T, y)
    coef, intercept = fold_ridge_head(probe.state(), pca_mean=mean, pca_components=comps)
    np.testing.assert_allclose(x @ coef.T + intercept, probe.predict((x - mean) @ comps.T), atol=1e-10)


@pytest.mark.parametrize("baseline", ["white", "blur"])
def test_ig_completeness_lite0_ridge_chain(lite0_stage_chain, baseline):
    chain, tiles = lite0_stage_chain["chain"], lite0_stage_chain["tiles"][:6]
    moves = np.stack([output_difference(chain, tiles, t, baseline=baseline) for t in range(4)], axis=1)
    targets = np.abs(moves).argmax(axis=1)
    assert len(set(targets.tolist())) >= 2
    attr, delta = integrated_gradients(chain, tiles, targets, baseline=baseline, steps=128, batch_size=32)
    diff = output_difference(chain, tiles, targets, baseline=baseline)
    err = relative_error(delta, diff)
    print(f"lite0 stage statistics, ridge, 48px, {baseline}, 128 steps: targets {targets} "
          f"|f(x)-f(b)| {np.abs(diff)} relative error {err}")
    assert np.all(np.isfinite(attr))
    assert np.all(err < 0.05), err


def test_linear_model_is_exact_and_state_is_restored():
    """For a linear model IG is exact at any step count: attribution = (x − baseline) × weight."""
    tiles = he_tiles(3, 6)
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(6 * 6 * 3, 2)).train()
    with torch.inference_mode():  # as a caller inside a prediction loop would be
        attr, delta = integrated_gradients(model, tiles, [1, 0, 1], baseline="white", steps=2)
    assert model.training and model[1].training  # modes given back
    w = model[2].weight.detach().numpy().reshape(2, 6, 6, 3)
    expected = (tiles.astype(np.float64) - 255.0) * w[[1, 0, 1]]
    np.testing.assert_allclose(attr, expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(delta) < 1e-3)


def test_baselines_and_inputs():
    tiles = he_tiles(2, 24)
    assert np.all(make_baseline(tiles, "black") == 0) and np.all(make_baseline(tiles, "white") == 255)
    blur = make_baseline(tiles, "blur")
    assert blur.shape == tiles.shape and blur.std() < tiles.astype(float).std()
    mean_tile = tiles.mean(axis=0)
    assert make_baseline(tiles, mean_tile).shape == tiles.shape
    with pytest.raises(HevisumError):
        make_baseline(tiles, "grey")
    with pytest.raises(HevisumError):
        integrated_gradients(lambda x: x.sum(dim=(1, 2)), tiles.astype(np.float32), 0)
    with pytest.raises(HevisumError, match="out of range"):
        integrated_gradients(lambda x: x.sum(dim=(1, 2)), tiles, 5, steps=2)


def test_summaries_and_maps():
    rng = np.random.default_rng(0)
    attr = rng.normal(size=(2, 12, 12, 3))
    np.testing.assert_allclose(summarise_attributions(attr, "sum"), attr.sum(axis=(1, 2, 3)))
    centre = summarise_attributions(attr, "centre")
    assert np.all((centre > 0) & (centre < 1))
    m = attribution_map(attr[0], mode="signed")
    assert m.min() >= -1 and m.max() <= 1 and m.min() < 0
    assert np.all(attribution_map(np.zeros((5, 5, 3))) == 0)
    rgb = overlay_rgb(he_tiles(1, 12)[0], attr[0])
    assert rgb.shape == (12, 12, 3) and rgb.dtype == np.uint8


def test_overlays_write_pngs_with_hostile_names(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # the hostile name really is hostile: unescaped, matplotlib's mathtext rejects it
    raw = Figure()
    FigureCanvasAgg(raw)
    raw.suptitle("$x^$")
    with pytest.raises(ValueError):
        raw.savefig(tmp_path / "raw.png")

    tiles = he_tiles(2, 24)
    attr = np.random.default_rng(1).normal(size=tiles.shape).astype(np.float32)
    paths = save_tile_overlays(tmp_path / "tiles", tiles, attr, ["<b>", "../../etc"], "$x^$")
    assert len(paths) == 2 and len(set(paths)) == 2
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC
        assert (tmp_path / "tiles") in p.parents
    fig = attribution_overlay(tiles[0], attr[0], mode="signed", title="$x^$ <b>")
    assert save_png(fig, tmp_path / "one.png").read_bytes()[:8] == PNG_MAGIC

    xy = np.random.default_rng(2).uniform(0, 1000, size=(50, 2))
    thumb = np.full((100, 100, 3), 230, np.uint8)
    for name, values in [("signed.png", np.linspace(-1, 1, 50)), ("positive.png", np.linspace(0, 3, 50))]:
        out = save_slide_overlay(tmp_path / name, thumb, xy, values, scale=0.1, title="$x^$", label="<b>")
        assert out.read_bytes()[:8] == PNG_MAGIC
    assert not list(tmp_path.rglob("*.tmp"))


def test_captum_needs_no_torchvision():
    import captum.attr  # noqa: F401

    import hevisum.explain  # noqa: F401

    assert "torchvision" not in sys.modules
