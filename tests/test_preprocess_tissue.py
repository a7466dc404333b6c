"""Tissue masks on white and black backgrounds, padded and inverted slides, and background masking."""

from __future__ import annotations

import numpy as np
import pytest

from hevisum.preprocess.tissue import detect_background, mask_background, tissue_mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def synthetic_slide(background: str, seed: int = 0,
                    shape: tuple[int, int] = (420, 560)) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like image: a wavy blob of purple/pink texture with dark nuclei on white or black; and its mask."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    ang = np.arctan2(yy - h / 2, xx - w / 2)
    r = np.hypot((yy - h / 2) / (0.32 * h), (xx - w / 2) / (0.36 * w))
    truth = r < 1 + 0.08 * np.sin(5 * ang) + 0.05 * np.cos(3 * ang + 1)
    bg = np.array([242, 240, 244]) if background == "white" else np.array([8, 8, 10])
    img = np.empty((h, w, 3))
    img[:] = bg
    # tissue: eosin-pink stroma with varying density, haematoxylin-purple nuclei
    density = 0.5 + 0.5 * np.sin(xx / 37.0) * np.cos(yy / 29.0)
    pink = np.array([225, 150, 200]) - density[..., None] * np.array([35, 40, 20])
    img[truth] = pink[truth]
    nuclei = (rng.random((h, w)) < 0.02) & truth
    from scipy import ndimage as ndi

    nuclei = ndi.binary_dilation(nuclei, iterations=2) & truth
    img[nuclei] = np.array([90, 60, 150])
    img += rng.normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), truth


@pytest.mark.parametrize("background", ["white", "black"])
def test_tissue_mask_finds_tissue_on_white_and_black(background):
    img, truth = synthetic_slide(background)
    for mode in ("auto", background):
        m = tissue_mask(img, background=mode)
        assert m.shape == truth.shape and m.dtype == bool
        assert iou(m, truth) > 0.9, (mode, iou(m, truth))
    assert detect_background(img) == background


def test_wrong_background_mode_is_worse_than_auto():
    # the mode matters: telling it "white" for a black slide must not be what auto does
    img, truth = synthetic_slide("black", seed=1)
    assert iou(tissue_mask(img, "auto"), truth) > iou(tissue_mask(img, "white"), truth)


def test_tissue_mask_empty_slide_has_no_tissue():
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(240, 3, (200, 300, 3)), 0, 255).astype(np.uint8)
    assert tissue_mask(img).mean() < 0.01


def test_reduced_scale_matches_full_scale():
    img, truth = synthetic_slide("white", seed=2, shape=(600, 800))
    full = tissue_mask(img, max_side=2048)
    small = tissue_mask(img, max_side=200, blur_sigma=7.0 / 4)
    assert small.shape == full.shape
    assert iou(small, full) > 0.95


def test_tissue_mask_does_not_mutate_and_mask_background_fills():
    img, truth = synthetic_slide("white")
    before = img.copy()
    m = tissue_mask(img)
    out = mask_background(img, m, "white")
    assert np.array_equal(img, before)
    assert (out[~m] == 255).all() and np.array_equal(out[m], img[m])
    out_b = mask_background(img, m, (0, 0, 0))
    assert (out_b[~m] == 0).all()


def test_demo_black_background_slide(demo_two):
    s = demo_two[1]
    assert s.meta["background"] == "black"
    m = tissue_mask(s.image)
    assert iou(m, s.meta["tissue_mask"]) > 0.9
    assert detect_background(s.image) == "black"


@pytest.fixture(scope="module")
def demo_two():
    from hevisum.demo import DemoSpec, make_demo_slides

    return make_demo_slides(DemoSpec(seed=0, n_train=2, n_test=1, n_spots=150))


@pytest.fixture(scope="module")
def her2st_c3(shared_data):
    from hevisum.io.competition import read_competition_h5

    slides = read_competition_h5(shared_data / "challenge" / "her2st.h5")
    return next(s for s in slides if s.slide_id == "C3")


@pytest.mark.shared
def test_real_slide_inverted_and_black_padded(her2st_c3):
    img = her2st_c3.image
    ref = tissue_mask(img)
    assert 0.05 < ref.mean() < 0.5
    # inverted: a dark background with bright tissue
    inv = 255 - img
    assert detect_background(inv) == "black"
    assert iou(tissue_mask(inv), ref) > 0.9
    # black padding around a white-background scan: padding and glass are both background
    pad = np.pad(img, ((150, 150), (200, 200), (0, 0)))
    assert detect_background(pad) == "white"
    mp = tissue_mask(pad)
    assert not mp[:150].any() and not mp[:, :200].any()
    assert iou(mp[150:-150, 200:-200], ref) > 0.9


@pytest.mark.shared
def test_real_slide_spots_sit_on_tissue(her2st_c3):
    m = tissue_mask(her2st_c3.image)
    r = np.rint(her2st_c3.xy[:, 1]).astype(int)
    c = np.rint(her2st_c3.xy[:, 0]).astype(int)
    assert m[r, c].mean() > 0.95
