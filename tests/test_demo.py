"""The built-in demo dataset: determinism, layout, shifts, file round trip, CLI and a learnable signal."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata, spearmanr

from hevisum.demo import DemoSpec, demo_truth_frame, make_demo_slides, write_demo
from hevisum.errors import HevisumError
from hevisum.io.competition import read_competition_h5

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def slides():
    return make_demo_slides(DemoSpec(seed=0))


def _all_targets(s):
    return s.targets if s.targets is not None else s.meta["truth"]


def _background(image: np.ndarray) -> np.ndarray:
    """Background colour: median of the four 8x8 image corners (the tissue never reaches them)."""
    c = np.concatenate([image[:8, :8], image[:8, -8:], image[-8:, :8], image[-8:, -8:]]).reshape(-1, 3)
    return np.median(c, axis=0)


def _on_tissue(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Whether the 5x5 mean colour around each (x, y) differs clearly from the background colour."""
    bg = _background(image).astype(np.float64)
    pad = np.pad(image.astype(np.float64), ((2, 2), (2, 2), (0, 0)), mode="edge")
    x, y = np.rint(xy[:, 0]).astype(int), np.rint(xy[:, 1]).astype(int)
    win = np.stack([pad[y + dy, x + dx] for dy in range(5) for dx in range(5)]).mean(axis=0)
    return np.linalg.norm(win - bg, axis=1) > 40


def _tile_features(s, half: int) -> np.ndarray:
    """Mean and std of RGB in a (2*half)-px tile around each TRUE spot centre."""
    img = np.pad(s.image.astype(np.float64), ((half, half), (half, half), (0, 0)), mode="edge")
    xy = s.xy - np.asarray(s.meta["applied_shift"])
    out = []
    for x, y in np.rint(xy).astype(int):
        t = img[y:y + 2 * half, x:x + 2 * half].reshape(-1, 3)
        out.append(np.r_[t.mean(0), t.std(0)])
    return np.asarray(out)


def _per_spot_spearman(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([spearmanr(p, t)[0] for p, t in zip(pred, truth)]))


def _ridge(x: np.ndarray, y: np.ndarray, x_new: np.ndarray, lam: float = 1.0) -> np.ndarray:
    a = np.c_[x, np.ones(len(x))]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ y)
    return np.c_[x_new, np.ones(len(x_new))] @ w


# ----------------------------------------------------------------------------------------------


def test_spec_validation_names_field_and_range():
    with pytest.raises(HevisumError, match=r"n_train \(--n-train\) must be an integer in 1\.\.100, got 0"):
        DemoSpec(n_train=0)
    with pytest.raises(HevisumError, match=r"pitch_px must be a number in \[8, 200\], got -3"):
        DemoSpec(pitch_px=-3)
    with pytest.raises(HevisumError, match=r"shift_max_pitch must be a number in \[0, 1\.2\]"):
        DemoSpec(shift_max_pitch=2.0)
    with pytest.raises(HevisumError, match="grid must be 'hex' or 'square'"):
        DemoSpec(grid="round")
    with pytest.raises(HevisumError, match=r"n_spots \(--spots\)"):
        DemoSpec(n_spots=True)
    with pytest.raises(HevisumError, match="seed"):
        DemoSpec(seed=-1)


def test_deterministic_for_a_seed_and_different_across_seeds(slides):
    again = make_demo_slides(DemoSpec(seed=0))
    for a, b in zip(slides, again):
        assert a.image.tobytes() == b.image.tobytes()
        assert np.array_equal(_all_targets(a), _all_targets(b))
        assert a.spots.equals(b.spots)
        assert a.meta["applied_shift"] == b.meta["applied_shift"]
    other = make_demo_slides(DemoSpec(seed=1))
    assert all(a.image.shape != b.image.shape or not np.array_equal(a.image, b.image)
               for a, b in zip(slides, other))
    assert not np.allclose(_all_targets(slides[0])[:50].mean(0), _all_targets(other[0])[:50].mean(0))


def test_counts_ids_and_targets(slides):
    spec = DemoSpec()
    assert [s.split for s in slides] == ["train"] * 4 + ["test"]
    assert [s.slide_id for s in slides] == ["S_1", "S_2", "S_3", "S_4", "S_5"]
    for s in slides:
        assert 0.85 * spec.n_spots <= s.n_spots <= 1.15 * spec.n_spots
        assert s.spots["spot_id"].tolist() == [str(i) for i in range(s.n_spots)]
        assert 500 <= max(s.image.shape[:2]) <= 850 and s.image.dtype == np.uint8
        t = _all_targets(s)
        assert t.shape == (s.n_spots, 35)
        assert (t > 0).all()
        np.testing.assert_allclose(t.sum(axis=1), 1.0, atol=1e-9)
        # like deconvolution output: many absent types at ~1e-10, a few dominant ones
        absent = t < 1e-6
        assert 0.3 < absent.mean() < 0.75
        assert np.all((t[absent] > 1e-11) & (t[absent] < 1e-9))
        assert 0.15 < np.sort(t, axis=1)[:, -1].mean() < 0.6
    assert slides[-1].targets is None and slides[-1].meta["truth_names"] == [f"C{i}" for i in range(1, 36)]
    assert slides[0].target_names == [f"C{i}" for i in range(1, 36)]


def test_composition_varies_between_regions(slides):
    # The dominant type changes across a slide, so the mean profile cannot explain every spot.
    t = slides[0].targets
    assert len(np.unique(t.argmax(axis=1))) >= 5
    rho = [spearmanr(row, t.mean(0))[0] for row in t]
    assert np.percentile(rho, 10) < 0.3


def test_looks_like_he(slides):
    s = slides[0]
    bg = _background(s.image)
    assert (bg > 220).all()  # white background
    tissue = s.meta["tissue_mask"]
    px = s.image[tissue].astype(np.float64)
    r, g, b = px.mean(0)
    assert g < r - 15 and g < b - 10  # pink/purple tissue: green absorbed by both stains
    # nuclei: a few per cent of tissue pixels are dark and bluish (B > R)
    dark = px.sum(1) < 330
    assert 0.02 < dark.mean() < 0.5
    assert (px[dark, 2] > px[dark, 0]).mean() > 0.6
    black = [x for x in slides if x.meta["background"] == "black"]
    assert len(black) == 1 and (_background(black[0].image) < 30).all()


def test_spots_inside_image_and_on_tissue_once_unshifted(slides):
    for s in slides:
        h, w = s.image.shape[:2]
        xy = s.xy
        assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
        true_xy = xy - np.asarray(s.meta["applied_shift"])
        np.testing.assert_array_equal(true_xy, s.meta["true_xy"])
        assert _on_tissue(s.image, true_xy).mean() > 0.97, s.slide_id


def test_shifted_slides_put_spots_off_tissue(slides):
    spec = DemoSpec()
    shifts = {s.slide_id: s.meta["applied_shift"] for s in slides}
    shifted = [s for s in slides if s.meta["applied_shift"] != (0.0, 0.0)]
    assert len([s for s in shifted if s.split == "train"]) >= 2
    assert all(s.meta["applied_shift"] != (0.0, 0.0) for s in slides if s.split == "test")
    assert any(s.meta["applied_shift"] == (0.0, 0.0) for s in slides), shifts
    for s in shifted:
        mag = float(np.hypot(*s.meta["applied_shift"]))
        assert 0.3 * spec.pitch_px <= mag <= 1.2 * spec.pitch_px, shifts
        off_stored = 1 - _on_tissue(s.image, s.xy).mean()
        off_true = 1 - _on_tissue(s.image, s.meta["true_xy"]).mean()
        # a clearly measurable number of stored spots lands on background
        assert off_stored >= 0.02 and off_stored > off_true + 0.015, (s.slide_id, off_stored, off_true)
    for s in slides:
        if s.meta["applied_shift"] == (0.0, 0.0):
            assert 1 - _on_tissue(s.image, s.xy).mean() < 0.03


def test_write_demo_round_trip(tmp_path):
    spec = DemoSpec(n_train=2, n_test=1, n_spots=120, n_targets=12, seed=5)
    h5, csv = write_demo(tmp_path / "d.h5", spec)
    assert h5 == tmp_path / "d.h5" and csv == tmp_path / "d_test_truth.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "d_test_truth.csv"]  # no temp files left
    made = make_demo_slides(spec)
    read = read_competition_h5(h5)
    assert [s.slide_id for s in read] == [s.slide_id for s in made]
    for a, b in zip(made, read):
        assert b.split == a.split
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.xy, b.xy)
        assert b.meta["applied_shift"] == a.meta["applied_shift"]
        if a.split == "train":
            np.testing.assert_array_equal(a.targets, b.targets)
            assert b.target_names == [f"C{i}" for i in range(1, 13)]
    truth = pd.read_csv(csv, float_precision="round_trip")
    assert list(truth.columns) == ["slide", "ID"] + [f"C{i}" for i in range(1, 13)]
    test = made[-1]
    assert (truth["slide"] == test.slide_id).all()
    assert truth["ID"].tolist() == list(range(test.n_spots))
    np.testing.assert_array_equal(truth.iloc[:, 2:].to_numpy(), test.meta["truth"])
    assert demo_truth_frame(made).equals(truth)
    with pytest.raises(HevisumError, match="is a folder"):
        write_demo(tmp_path, spec)


def test_truth_frame_needs_a_test_slide(slides):
    with pytest.raises(HevisumError, match="no Test slides"):
        demo_truth_frame(slides[:2])


def test_cli_demo_data(tmp_path):
    out = tmp_path / "out.h5"
    r = subprocess.run([sys.executable, "-m", "hevisum.cli", "demo-data", str(out), "--seed", "3"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and (tmp_path / "out_test_truth.csv").is_file()
    assert len(read_competition_h5(out)) == 5
    bad = subprocess.run([sys.executable, "-m", "hevisum.cli", "demo-data", str(tmp_path / "x.h5"), "--spots", "3"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and "error: DemoSpec: n_spots (--spots)" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_cli_demo_data_replaces_only_what_it_wrote(tmp_path):
    """A second demo-data over its own files replaces them; a file hevisum did not write (the HDF5, or a truth CSV
    beside a new name) is refused with one line and left as it was, unless --force."""
    from hevisum.cli import main

    out = tmp_path / "d.h5"
    assert main(["demo-data", str(out), "--seed", "1", "--spots", "40", "--n-train", "2"]) == 0
    assert main(["demo-data", str(out), "--seed", "2", "--spots", "40", "--n-train", "2"]) == 0  # ours: replaced
    mine = tmp_path / "mine.h5"
    mine.write_bytes(b"user data")
    assert main(["demo-data", str(mine), "--spots", "40"]) == 2
    assert mine.read_bytes() == b"user data" and not (tmp_path / "mine_test_truth.csv").exists()
    csv = tmp_path / "new_test_truth.csv"
    csv.write_text("user,table\n")
    assert main(["demo-data", str(tmp_path / "new.h5"), "--spots", "40"]) == 2
    assert csv.read_text() == "user,table\n" and not (tmp_path / "new.h5").exists()
    assert main(["demo-data", str(mine), "--spots", "40", "--n-train", "2", "--force"]) == 0
    assert len(read_competition_h5(mine)) == 3


def test_fast():
    t0 = time.process_time()
    make_demo_slides(DemoSpec(seed=11))
    assert time.process_time() - t0 < 5.0


def test_signal_is_learnable_across_slides(slides):
    """Tile colour statistics + ridge, fitted on the Train slides, beat the mean profile on the Test slide."""
    half = int(round(1.5 * DemoSpec().pitch_px))  # a 3-pitch tile
    train, test = slides[:-1], slides[-1]
    feats = [_tile_features(s, half) for s in slides]
    y = np.vstack([s.targets for s in train])
    ranks = rankdata(y, axis=1)  # the metric only sees ranks
    truth = test.meta["truth"]
    mean_score = _per_spot_spearman(np.tile(y.mean(0), (len(truth), 1)), truth)

    x = np.vstack(feats[:-1])
    mu, sd = x.mean(0), x.std(0)
    raw_score = _per_spot_spearman(_ridge((x - mu) / sd, ranks, (feats[-1] - mu) / sd), truth)
    # features standardised per slide: a crude stand-in for stain normalisation
    per_slide = [(f - f.mean(0)) / f.std(0) for f in feats]
    norm_score = _per_spot_spearman(_ridge(np.vstack(per_slide[:-1]), ranks, per_slide[-1]), truth)
    print(f"per-spot Spearman on {test.slide_id}: mean profile {mean_score:.3f}, ridge {raw_score:.3f}, "
          f"ridge on per-slide standardised features {norm_score:.3f}")
    assert raw_score > mean_score + 0.05
    assert norm_score > mean_score + 0.05


@pytest.mark.parametrize("kw", [dict(grid="square", n_latent=5, seed=2), dict(n_latent=3, shift_max_pitch=0.0, seed=4)])
def test_variants_grid_pitch_and_no_shift(kw):
    from scipy.spatial import cKDTree

    spec = DemoSpec(n_train=2, n_test=1, n_spots=150, **kw)
    made = make_demo_slides(spec)
    for s in made:
        nn = cKDTree(s.xy).query(s.xy, k=2)[0][:, 1]
        assert abs(np.median(nn) - spec.pitch_px) <= 1.0  # centre-to-centre pitch as asked
        assert s.meta["grid"] == spec.grid and s.meta["latent"].shape == (s.n_spots, spec.n_latent)
    if spec.shift_max_pitch == 0:
        assert all(s.meta["applied_shift"] == (0.0, 0.0) for s in made)
