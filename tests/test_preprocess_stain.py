"""Stain normalisation: Macenko against torchstain's numpy implementation, Reinhard, fallbacks, the target file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hevisum.errors import HevisumError
from hevisum.preprocess.stain import (
    DEFAULT_HE,
    StainTarget,
    fit_macenko,
    fit_reinhard,
    normalize,
    normalize_macenko,
    normalize_reinhard,
    tissue_patch_pixels,
)

IO = 240.0


def stained(conc: np.ndarray, he: np.ndarray) -> np.ndarray:
    """RGB image from stain concentrations (H, W, 2) and OD stain vectors (3, 2) by Beer-Lambert."""
    od = conc @ he.T
    return np.clip(np.rint(IO * np.exp(-od)), 0, 255).astype(np.uint8)


def concentrations(seed: int, shape=(160, 200)) -> np.ndarray:
    """Smooth random H and E amounts (patches of pure H, pure E and mixtures) with a tissue-free corner."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    c = np.stack([ndi.gaussian_filter(rng.random(shape), 3) for _ in range(2)], axis=-1)
    c = (c - c.min(axis=(0, 1))) / np.ptp(c, axis=(0, 1))
    c = np.clip(c - 0.4, 0, None) / 0.6 * np.array([1.6, 1.4]) + 0.02
    c[: shape[0] // 4, : shape[1] // 4] = 0.01
    return c


HE_A = np.array([[0.65, 0.20], [0.70, 0.90], [0.29, 0.38]])
HE_B = np.array([[0.55, 0.25], [0.75, 0.80], [0.37, 0.55]])
HE_A, HE_B = HE_A / np.linalg.norm(HE_A, axis=0), HE_B / np.linalg.norm(HE_B, axis=0)


def test_macenko_recovers_known_stain_vectors():
    img = stained(concentrations(0), HE_B)
    t = fit_macenko(img)
    assert t.method == "macenko" and not t.fallback
    # the extreme angles of a mixture are its pure stains, up to the 1 % percentile cut
    assert np.abs(t.he - HE_B).max() < 0.08


def test_macenko_maps_a_restained_image_to_the_target_stain():
    conc = concentrations(1)
    src, ref = stained(conc, HE_A), stained(conc, HE_B)
    target = fit_macenko(ref)
    out = normalize_macenko(src, target)
    before = np.abs(src.astype(int) - ref).mean()
    after = np.abs(out.astype(int) - ref).mean()
    assert out.dtype == np.uint8 and out.shape == src.shape
    assert after < 0.25 * before and after < 4.0, (before, after)


def real_crops(shared_data):
    from hevisum.io.competition import read_competition_h5

    slides = read_competition_h5(shared_data / "challenge" / "her2st.h5")
    target = slides[0].image[1100:1400, 900:1200]
    sources = [s.image[y:y + 400, x:x + 400] for s, (y, x) in zip(slides[1:], [(700, 600), (900, 500), (800, 600)])]
    return target, sources


@pytest.mark.shared
def test_macenko_agrees_with_torchstain(shared_data):
    torchstain = pytest.importorskip("torchstain")
    target_img, sources = real_crops(shared_data)
    # plus a synthetic pair with a strong stain difference
    conc = concentrations(2)
    sources.append(stained(conc, HE_A))
    for i, src in enumerate(sources):
        tgt = target_img if i < 3 else stained(concentrations(3), HE_B)
        ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
        ts.fit(tgt)
        ref, _, _ = ts.normalize(src, stains=False)
        ours_t = fit_macenko(tgt)
        np.testing.assert_allclose(ours_t.he, ts.HERef, atol=1e-9)
        np.testing.assert_allclose(ours_t.max_conc, ts.maxCRef, rtol=1e-9)
        ours = normalize_macenko(src, ours_t)
        d = np.abs(ours.astype(int) - ref.astype(int))
        # torchstain truncates to uint8, we round: at most one grey level apart, about half a level on average
        assert d.max() <= 1, d.max()
        assert d.mean() < 0.6, d.mean()


def test_reinhard_matches_target_lab_statistics():
    from skimage.color import rgb2lab

    ref = stained(concentrations(4), HE_B)
    src = stained(concentrations(5) * 0.6, HE_A)
    t = fit_reinhard(ref)
    out = normalize_reinhard(src, t)
    lab = rgb2lab(out.astype(float) / 255).reshape(-1, 3)
    lab_src = rgb2lab(src.astype(float) / 255).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(0), t.lab_mean, atol=1.5)
    np.testing.assert_allclose(lab.std(0), t.lab_std, rtol=0.08, atol=0.5)
    # and it did move: the source statistics were far from the target
    assert np.abs(lab_src.mean(0) - np.asarray(t.lab_mean)).max() > 5


def test_little_tissue_falls_back_and_never_gives_nan():
    blank = np.full((64, 64, 3), 250, np.uint8)
    t = fit_macenko(blank)
    assert t.fallback and np.allclose(t.he, DEFAULT_HE)
    assert np.isfinite(t.he).all() and np.isfinite(t.max_conc).all()
    # an image with (almost) no stained pixels is returned unchanged
    img = blank.copy()
    img[5, 5] = (120, 80, 160)
    out = normalize_macenko(img, fit_macenko(stained(concentrations(6), HE_B)))
    np.testing.assert_array_equal(out, img)
    assert fit_reinhard(np.zeros((0, 3), np.uint8)).fallback
    assert np.isfinite(fit_reinhard(np.zeros((0, 3), np.uint8)).lab_std).all()


def test_mask_limits_the_source_estimate_to_tissue():
    # a black background would wreck the stain estimate if it were counted (black = very high OD)
    conc = concentrations(7)
    img = stained(conc, HE_A)
    mask = np.ones(img.shape[:2], bool)
    mask[:, :60] = False
    black = img.copy()
    black[~mask] = 0
    target = fit_macenko(stained(concentrations(8), HE_B))
    with_mask = normalize_macenko(black, target, mask)
    clean = normalize_macenko(img, target, mask)
    np.testing.assert_array_equal(with_mask[mask], clean[mask])


def test_normalisation_does_not_mutate_and_none_is_identity():
    img = stained(concentrations(9), HE_A)
    before = img.copy()
    for t in (fit_macenko(img), fit_reinhard(img), StainTarget(method="none")):
        out = normalize(img, t)
        assert out is not img
    np.testing.assert_array_equal(img, before)
    np.testing.assert_array_equal(normalize(img, StainTarget(method="none")), img)


def test_stain_target_round_trips_through_json():
    img = stained(concentrations(10), HE_B)
    for t in (fit_macenko(img), fit_reinhard(img), StainTarget(method="none")):
        back = StainTarget.from_dict(json.loads(json.dumps(t.to_dict())))
        assert back == t
    with pytest.raises(HevisumError, match="stain_matrix"):
        StainTarget.from_dict({"method": "macenko", "max_conc": [1, 1]})
    with pytest.raises(HevisumError, match="method"):
        StainTarget.from_dict({"method": "vahadane"})


def test_tissue_patches_are_mostly_tissue_and_seeded():
    img = stained(concentrations(11, shape=(600, 700)), HE_A)
    mask = np.zeros(img.shape[:2], bool)
    mask[100:500, 150:650] = True
    a = tissue_patch_pixels(img, mask, 128, 5, 0.5, np.random.default_rng(0))
    b = tissue_patch_pixels(img, mask, 128, 5, 0.5, np.random.default_rng(0))
    c = tissue_patch_pixels(img, mask, 128, 5, 0.5, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # only mask pixels, at least half of each 128 x 128 patch
    assert 5 * 0.5 * 128 * 128 <= len(a) <= 5 * 128 * 128
    # no tissue at all: nothing to fit on
    assert len(tissue_patch_pixels(img, np.zeros_like(mask), 128, 5, 0.5, np.random.default_rng(0))) == 0
