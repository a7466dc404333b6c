"""Every folder of ../shared/data read with the matching reader: slide, spot and target counts, spots on tissue,
and the original-format folders against the organisers' competition files."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest

from hevisum.io import detect_format, read_input
from hevisum.io.competition import read_competition_h5
from hevisum.slide import Slide

pytestmark = pytest.mark.shared

HER2ST_SPOTS = {"C2": 187, "C3": 180, "C4": 184, "C5": 181, "C6": 178}
HER2ST_DROPPED = {"C2": 0, "C3": 2, "C4": 3, "C5": 2, "C6": 1}  # selected spots with no targets row
MOB_SPOTS = {"MOB1": 379, "MOB2": 407, "MOB3": 438}


def spots_on_tissue(s: Slide) -> tuple[float, float]:
    """(mean grey at spot centres, median grey of the image): tissue is darker than the glass around it.

    The median is taken on every 4th pixel: full-resolution her2st images are ~92 Mpx.
    """
    img = s.image
    h, w = img.shape[:2]
    r = max(2, int(min(h, w) * 0.002))
    at_spots = [img[max(0, int(y) - r): int(y) + r + 1, max(0, int(x) - r): int(x) + r + 1].mean() for x, y in s.xy]
    return float(np.mean(at_spots)), float(np.median(img[::4, ::4].mean(axis=2)))


def assert_on_tissue(s: Slide, margin: float = 20.0) -> None:
    at, median = spots_on_tissue(s)
    assert at < median - margin, f"{s.slide_id}: spots mean grey {at:.0f} not darker than background {median:.0f}"


def test_challenge_her2st_h5(shared_data):
    slides = read_input(shared_data / "challenge" / "her2st.h5")
    assert {s.slide_id: (s.split, s.n_spots) for s in slides} == {
        **{k: ("train", v) for k, v in HER2ST_SPOTS.items() if k != "C6"}, "C6": ("test", 178)}
    for s in slides:
        assert s.image.shape[1] == 2000
        assert_on_tissue(s)
        if s.split == "train":
            assert s.targets.shape == (s.n_spots, 41) and s.target_names[0] == "B-cells Memory"
            np.testing.assert_allclose(s.targets.sum(axis=1), 1.0, atol=1e-5)  # proportions


def test_challenge_mob_h5(shared_data):
    slides = read_input(shared_data / "challenge" / "mob.h5")
    assert {s.slide_id: (s.split, s.n_spots) for s in slides} == {
        "MOB1": ("train", 379), "MOB2": ("train", 407), "MOB3": ("test", 438)}
    for s in slides:
        assert s.image.shape == (1905, 1905, 3)
        assert_on_tissue(s)
        if s.split == "train":
            assert s.targets.shape[1] == 50 and s.target_names[0].startswith("ENSMUSG")


def test_mob_folder_reproduces_challenge_file(shared_data):
    """The original MOB files, read with MOB3 as Test, give exactly the organisers' mob.h5."""
    ours = read_input(shared_data / "mob", test_slides=["MOB3"], progress=False)
    theirs = {s.slide_id: s for s in read_competition_h5(shared_data / "challenge" / "mob.h5")}
    assert detect_format(shared_data / "mob") == "legacy_st"
    assert [s.slide_id for s in ours] == ["MOB1", "MOB2", "MOB3"]
    truth = pd.read_csv(shared_data / "challenge" / "mob_test_truth.csv")
    for s in ours:
        t = theirs[s.slide_id]
        assert (s.split, s.n_spots) == (t.split, MOB_SPOTS[s.slide_id])
        np.testing.assert_array_equal(s.image, t.image)
        np.testing.assert_allclose(s.xy, t.xy, atol=0.5)  # theirs rounded to integer pixels
        assert s.meta["n_dropped_no_target"] == 0
        assert 4.0 < s.um_per_px < 5.2 and s.meta["um_per_px_estimated"]  # 2k array, ~32 px spot pitch
        assert s.meta["spot_pitch_px"] == pytest.approx(32.3, abs=0.5)
        assert_on_tissue(s)
        if s.split == "train":
            assert s.target_names == t.target_names
            np.testing.assert_allclose(s.targets, t.targets, rtol=1e-12, atol=1e-12)
        else:
            assert s.meta["truth_names"] == ours[0].target_names
            exp = truth[truth["slide"] == "MOB3"].sort_values("ID").filter(regex=r"^C\d+$").to_numpy()
            np.testing.assert_allclose(s.meta["truth"], exp, rtol=1e-12, atol=1e-12)


def test_her2st_folder_full_resolution(shared_data):
    """The five original sections at full resolution (~9300 x 9900 px each) against the organisers' her2st.h5."""
    ours = read_input(shared_data / "her2st", test_slides=["C6"], progress=False)
    theirs = {s.slide_id: s for s in read_competition_h5(shared_data / "challenge" / "her2st.h5")}
    assert [s.slide_id for s in ours] == list(HER2ST_SPOTS)
    for s in ours:
        t = theirs[s.slide_id]
        h, w = s.image.shape[:2]
        assert 9000 < w < 9500 and 9800 < h < 10000
        assert (s.split, s.n_spots) == (t.split, HER2ST_SPOTS[s.slide_id])
        assert s.meta["n_dropped_no_target"] == HER2ST_DROPPED[s.slide_id]
        # theirs: the image resized to 2000 px wide, coordinates multiplied by 2000 / width and rounded
        np.testing.assert_allclose(s.xy * (2000 / w), t.xy, atol=0.51)
        assert s.um_per_px == pytest.approx(0.69, abs=0.02) and s.meta["st_array"].startswith("1k")
        assert s.meta["spot_pitch_px"] == pytest.approx(290, abs=5)
        assert s.spot_ids[0].count("x") == 1
        assert_on_tissue(s)
        values = s.targets if s.split == "train" else s.meta["truth"]
        assert values.shape == (s.n_spots, 41)
        if s.split == "train":
            assert s.target_names == t.target_names
            np.testing.assert_allclose(s.targets, t.targets, rtol=1e-6, atol=1e-7)


def test_her2st_folder_other_targets(shared_data):
    major = read_input(shared_data / "her2st", targets="celltypes_major", max_side=1000, progress=False)
    assert [s.targets.shape for s in major] == [(n, 8) for n in HER2ST_SPOTS.values()]
    assert max(major[0].image.shape[:2]) == 1000
    np.testing.assert_allclose(major[0].targets.sum(axis=1), 1.0, atol=1e-5)
    counts = read_input(shared_data / "her2st", targets="counts", test_slides=["C6"], max_side=1000, progress=False)
    names = counts[0].target_names
    assert len(names) == 50 and all(s.target_names == names for s in counts[:4])
    assert counts[4].meta["truth"].shape == (178, 50)
    assert "over 910 spots of 5 slide(s)" in counts[0].meta["gene_selection"]
    assert counts[0].targets.min() >= 0 and counts[0].targets.max() < 12  # log1p of counts per 10k


def test_visium_gbm(shared_data):
    (s,) = read_input(shared_data / "visium_gbm")
    assert detect_format(shared_data / "visium_gbm") == "visium"
    assert s.slide_id == "visium_gbm" and s.split == "train"
    assert s.meta["n_in_tissue"] == 1937 and s.meta["n_dropped_no_target"] == 2 and s.n_spots == 1935
    assert s.targets.shape == (1935, 54) and s.target_names[0] == "AClike"
    np.testing.assert_allclose(s.targets.sum(axis=1), 1.0, atol=1e-5)
    assert s.image.shape == (1861, 2000, 3) and s.meta["image"] == "hires"
    sf = json.loads((shared_data / "visium_gbm" / "spatial" / "scalefactors_json.json").read_text())
    pos = pd.read_csv(shared_data / "visium_gbm" / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    np.testing.assert_allclose(s.spots["x"], pos.loc[s.spot_ids, 5] * sf["tissue_hires_scalef"])
    np.testing.assert_allclose(s.spots["y"], pos.loc[s.spot_ids, 4] * sf["tissue_hires_scalef"])
    assert s.um_per_px == pytest.approx(55 / (sf["spot_diameter_fullres"] * sf["tissue_hires_scalef"]))
    assert_on_tissue(s)
    (low,) = read_input(shared_data / "visium_gbm", image="lowres")
    assert low.image.shape == (558, 600, 3)
    np.testing.assert_allclose(low.xy, s.xy * sf["tissue_lowres_scalef"] / sf["tissue_hires_scalef"], rtol=1e-6)


def test_visium_cytassist_placenta_h5(shared_data):
    folder = shared_data / "visium_cytassist_placenta"
    (s,) = read_input(folder, targets="h5")
    with h5py.File(folder / "filtered_feature_bc_matrix.h5") as f:
        n_barcodes = int(f["matrix/shape"][1])
    assert s.n_spots == n_barcodes == 2898 and s.meta["n_in_tissue"] == 2898
    assert s.targets.shape == (2898, 50) and s.meta["targets_kind"] == "genes"
    assert s.image.shape == (600, 600, 3) and s.meta["image"] == "lowres"
    assert "of 19465 genes" in s.meta["gene_selection"]
    assert_on_tissue(s)
    (bare,) = read_input(folder)  # no targets table beside spatial/: a Test slide without targets
    assert bare.split == "test" and bare.targets is None and bare.n_spots == 2898
