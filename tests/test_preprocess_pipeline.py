"""The preprocessing pipeline and its work folder; the `hevisum preprocess` command."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from hevisum.config import PreprocessConfig, RealignConfig, StainConfig, TissueConfig, dump_config, load_config
from hevisum.errors import HevisumError
from hevisum.preprocess.pipeline import load_prepared, preprocess
from hevisum.preprocess.stain import StainTarget, fit_macenko

QC_KEYS = {"shift_px", "pitch_px", "n_spots", "n_valid", "tissue_fraction", "realign"}
FILES = ["config.toml", "spots.csv", "tiles.npy", "targets.npy", "ranks.npy", "target_names.json", "stain.json",
         "dropped_spots.csv", "test_truth.csv", "qc.json", "qc/overview.png"]


@pytest.fixture(scope="module")
def small_slides():
    from hevisum.demo import DemoSpec, make_demo_slides

    return make_demo_slides(DemoSpec(seed=0, n_train=3, n_test=1, n_spots=60, n_targets=8))


@pytest.fixture(scope="module")
def prepared(small_slides, tmp_path_factory):
    return preprocess(small_slides, PreprocessConfig(), tmp_path_factory.mktemp("prep") / "work", progress=False)


def test_workdir_files_and_tables(prepared, small_slides):
    wd = prepared.workdir
    for f in FILES:
        assert (wd / f).is_file(), f
    for s in small_slides:
        assert (wd / "qc" / f"{s.slide_id}_realign.png").is_file()
    assert not [p for p in wd.parent.iterdir() if p.name.startswith(".")]  # no temp folders left
    sp = pd.read_csv(wd / "spots.csv", dtype={"spot_id": str})
    assert list(sp.columns[:10]) == ["slide", "spot_id", "split", "x", "y", "x_in", "y_in", "pitch_px", "tile_px",
                                     "valid"]
    assert "test_set" in sp.columns
    tiles = np.load(wd / "tiles.npy", mmap_mode="r")
    assert tiles.shape == (len(sp), 78, 78, 3) and tiles.dtype == np.uint8
    # realigned = input + the slide's shift from qc.json
    qc = json.loads((wd / "qc.json").read_text())
    assert set(qc) == {s.slide_id for s in small_slides}
    for sid, q in qc.items():
        assert set(q) == QC_KEYS
        rows = sp[sp["slide"] == sid]
        np.testing.assert_allclose(rows["x"] - rows["x_in"], q["shift_px"][0], atol=1e-6)
        np.testing.assert_allclose(rows["y"] - rows["y_in"], q["shift_px"][1], atol=1e-6)
    # one tile per valid training spot and per test spot
    for s in small_slides:
        n_rows = int((sp["slide"] == s.slide_id).sum())
        assert n_rows == (qc[s.slide_id]["n_valid"] if s.split == "train" else s.n_spots)
    targets, ranks = np.load(wd / "targets.npy"), np.load(wd / "ranks.npy")
    train = (sp["split"] == "train").to_numpy()
    assert targets.shape == ranks.shape == (len(sp), 8) and targets.dtype == np.float32
    assert np.isnan(targets[~train]).all() and np.isnan(ranks[~train]).all()
    assert np.isfinite(targets[train]).all()
    np.testing.assert_allclose(ranks[train].sum(axis=1), 8 * 9 / 2)
    # targets joined by spot id, not by row order
    s1 = small_slides[0]
    rows = sp.index[sp["slide"] == s1.slide_id]
    ids = sp.loc[rows, "spot_id"].astype(int).to_numpy()
    np.testing.assert_allclose(targets[rows], s1.targets[ids].astype(np.float32))
    truth = pd.read_csv(wd / "test_truth.csv")
    assert list(truth.columns) == ["slide", "ID"] + [f"C{i}" for i in range(1, 9)]
    assert len(truth) == small_slides[-1].n_spots
    assert json.loads((wd / "target_names.json").read_text()) == [f"C{i}" for i in range(1, 9)]


def test_demo_shifts_are_undone(prepared, small_slides):
    for s in small_slides:
        dx, dy = prepared.qc[s.slide_id]["shift_px"]
        ax, ay = s.meta["applied_shift"]
        assert np.hypot(dx + ax, dy + ay) < 0.15 * prepared.qc[s.slide_id]["pitch_px"], s.slide_id


def test_config_reloads_and_prepared_reloads(prepared):
    cfg = load_config(PreprocessConfig, prepared.workdir / "config.toml")
    assert cfg == PreprocessConfig()
    again = load_prepared(prepared.workdir)
    pd.testing.assert_frame_equal(again.spots, prepared.spots)
    np.testing.assert_array_equal(again.tiles, prepared.tiles)
    np.testing.assert_array_equal(again.ranks, prepared.ranks)
    assert again.stain == prepared.stain and again.qc == prepared.qc and again.config == prepared.config
    assert isinstance(again.tiles, np.memmap)


def test_config_round_trip_and_checks(tmp_path):
    cfg = PreprocessConfig(realign=RealignConfig(manual={"S_1": [1.5, -2.0], "slide 2": [0, 3]}),
                           tissue=TissueConfig(background="black", fill="black"))
    dump_config(cfg, tmp_path / "c.toml")
    assert load_config(PreprocessConfig, tmp_path / "c.toml") == cfg
    for bad, match in ((("tissue", "fill", "grey"), "tissue.fill"), (("realign", "min_gain", 2.0), "min_gain"),
                       (("tiles", "size", 80), "multiple of 3"), (("realign", "manual", {"S_1": [1]}), "dx, dy")):
        with pytest.raises(HevisumError, match=match):
            load_config(PreprocessConfig, overrides={bad[0]: {bad[1]: bad[2]}})


def test_prepared_rows_slides_and_summary(prepared, small_slides):
    assert prepared.slide_ids() == [s.slide_id for s in small_slides]
    assert prepared.slide_ids("test") == [small_slides[-1].slide_id]
    train = prepared.rows("train")
    test = prepared.rows("test")
    assert len(train) + len(test) == len(prepared.spots)
    assert (prepared.spots.loc[test, "split"] == "test").all()
    one = prepared.rows(slides="S_2")
    assert set(prepared.spots.loc[one, "slide"]) == {"S_2"}
    np.testing.assert_array_equal(prepared.rows("train", ["S_2"]), one)
    with pytest.raises(HevisumError, match="S_9"):
        prepared.rows(slides=["S_9"])
    line = prepared.summary()
    assert "\n" not in line and "4 slides" in line and f"{len(prepared.tiles)} tiles" in line


def test_tile_centres_show_the_spot(prepared, small_slides):
    # the tile centre is the spot's pixel of the normalised slide: compare against a fresh normalisation
    from hevisum.preprocess.stain import normalize
    from hevisum.preprocess.tiles import extract_tiles
    from hevisum.preprocess.tissue import mask_background, tissue_mask

    s = small_slides[2]
    rows = prepared.rows(slides=s.slide_id)
    m = tissue_mask(s.image)
    img = mask_background(normalize(s.image, prepared.stain, m), m, "white")
    xy = prepared.spots.loc[rows, ["x", "y"]].to_numpy(float)
    side = int(prepared.spots.loc[rows[0], "tile_px"])
    np.testing.assert_array_equal(prepared.tiles[rows], extract_tiles(img, xy, side, 78))


def _shifted_copy(slide, dx: float):
    sp = slide.spots.copy()
    sp["x"] = sp["x"] + dx
    return dataclasses.replace(slide, spots=sp)


def test_invalid_training_spots_dropped_test_spots_kept(small_slides, tmp_path):
    # without realignment, a grid moved half off the tissue loses its off-tissue training spots
    train, test = small_slides[0], small_slides[-1]
    w = train.image.shape[1]
    moved = _shifted_copy(train, 0.3 * w)
    moved = moved.with_spots(moved.spots[moved.spots["x"] < w].reset_index(drop=True),
                             moved.targets[(moved.spots["x"] < w).to_numpy()])
    test_moved = _shifted_copy(test, 0.3 * test.image.shape[1])
    inside = (test_moved.spots["x"] < test.image.shape[1]).to_numpy()
    test_moved = dataclasses.replace(test_moved.with_spots(test_moved.spots[inside].reset_index(drop=True)),
                                     meta={**test.meta, "truth": test.meta["truth"][inside]})
    cfg = PreprocessConfig(realign=RealignConfig(enabled=False))
    prep = preprocess([moved, test_moved], cfg, tmp_path / "w", progress=False)
    q = prep.qc
    assert q[moved.slide_id]["n_valid"] < moved.n_spots  # some spots went off tissue
    assert len(prep.rows(slides=moved.slide_id)) == q[moved.slide_id]["n_valid"]
    assert len(prep.rows(slides=test_moved.slide_id)) == test_moved.n_spots  # every test spot kept
    dropped = pd.read_csv(tmp_path / "w" / "dropped_spots.csv", dtype={"spot_id": str})
    assert list(dropped.columns) == ["slide", "spot_id", "x", "y"]
    assert len(dropped) == moved.n_spots - q[moved.slide_id]["n_valid"]
    assert not set(dropped["spot_id"]) & set(prep.spots.loc[prep.rows(slides=moved.slide_id), "spot_id"])
    # keep_all_spots (prediction) keeps them, marked invalid
    keep = preprocess([moved, test_moved], cfg, tmp_path / "w2", progress=False, keep_all_spots=True)
    assert len(keep.rows(slides=moved.slide_id)) == moved.n_spots
    assert (~keep.spots["valid"]).sum() >= moved.n_spots - q[moved.slide_id]["n_valid"]


def test_manual_shift_and_test_spots_off_the_image_keep_tiles(small_slides, tmp_path):
    test = small_slides[-1]
    big = -float(test.xy[:, 0].max()) - 10  # every test spot ends left of the image
    cfg = PreprocessConfig(realign=RealignConfig(manual={test.slide_id: [big, 0.0]}))
    prep = preprocess([small_slides[0], test], cfg, tmp_path / "w", progress=False)
    assert prep.qc[test.slide_id]["shift_px"] == [big, 0.0]
    rows = prep.rows(slides=test.slide_id)
    assert len(rows) == test.n_spots and (prep.spots.loc[rows, "x"] < 0).all()
    # edge padding: a tile wholly left of the image repeats the image's first column
    tiles = np.asarray(prep.tiles[rows])
    far = (prep.spots.loc[rows, "x"] < -prep.spots.loc[rows, "tile_px"] / 2).to_numpy()
    assert far.any()
    assert (tiles[far] == tiles[far][:, :, :1]).all()
    # a truth table that does not match the spots is refused
    bad = dataclasses.replace(test, meta={**test.meta, "truth": test.meta["truth"][:5]})
    with pytest.raises(HevisumError, match="truth"):
        preprocess([small_slides[0], bad], cfg, tmp_path / "w2", progress=False)


def test_unknown_manual_slide_fails_before_writing(small_slides, tmp_path):
    cfg = PreprocessConfig(realign=RealignConfig(manual={"nope": [1.0, 2.0]}))
    with pytest.raises(HevisumError, match=r"nope.*S_1"):
        preprocess(small_slides, cfg, tmp_path / "w", progress=False)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(HevisumError, match="reference_slide"):
        preprocess(small_slides, PreprocessConfig(stain=StainConfig(reference_slide="X")), tmp_path / "w",
                   progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_nothing_and_keeps_the_old_folder(small_slides, tmp_path, monkeypatch):
    from hevisum.io.atomic import atomic_dir

    out = tmp_path / "w"
    with atomic_dir(out, kind="prep") as t:  # a work folder an earlier preprocess finished
        (t / "old.txt").write_text("previous run")
    import hevisum.preprocess.pipeline as pipeline

    def disk_full(*args, **kwargs):  # the disk fills up while the tables are written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.np, "save", disk_full)
    with pytest.raises(OSError):
        pipeline.preprocess(small_slides[:2], PreprocessConfig(), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
    assert sorted(p.name for p in out.iterdir()) == [".hevisum-run.json", "old.txt"]
    assert (out / "old.txt").read_text() == "previous run"


def test_stain_fitted_on_training_slides_only(small_slides, tmp_path):
    # a test slide with a very different stain must not change the fitted target
    train, test = small_slides[:2], small_slides[-1]
    odd = dataclasses.replace(test, image=np.ascontiguousarray(test.image[..., ::-1]))  # blue <-> red
    a = preprocess(train + [test], PreprocessConfig(), tmp_path / "a", progress=False)
    b = preprocess(train + [odd], PreprocessConfig(), tmp_path / "b", progress=False)
    assert a.stain == b.stain and not a.stain.fallback
    # a reference slide: the target comes from that slide alone
    c = preprocess(train + [test], PreprocessConfig(stain=StainConfig(reference_slide=train[1].slide_id)),
                   tmp_path / "c", progress=False)
    assert c.stain != a.stain


def test_given_stain_target_is_used_as_is(small_slides, tmp_path):
    target = fit_macenko(small_slides[0].image[100:200, 100:200])
    prep = preprocess(small_slides[-1:], PreprocessConfig(), tmp_path / "w", progress=False, stain_target=target,
                      keep_all_spots=True)
    assert prep.stain == target
    assert StainTarget.from_dict(json.loads((tmp_path / "w" / "stain.json").read_text())) == target
    assert prep.targets.shape == (small_slides[-1].n_spots, 0)
    # without a target, test-only input cannot fit one
    with pytest.raises(HevisumError, match="training slides"):
        preprocess(small_slides[-1:], PreprocessConfig(), tmp_path / "x", progress=False)


def test_cli_unknown_config_key_exits_2_naming_it(tmp_path, capsys):
    from hevisum.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text("[realign]\nenabled = true\nmax_shift = 2\n")
    rc = main(["preprocess", str(tmp_path / "in.h5"), "--out", str(tmp_path / "w"), "--config", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "realign.max_shift" in err and "max_shift_pitches" in err
    assert not (tmp_path / "w").exists()


def test_cli_preprocess_demo_file(tmp_path, capsys):
    from hevisum.cli import main
    from hevisum.demo import DemoSpec, write_demo

    h5, _ = write_demo(tmp_path / "demo.h5", DemoSpec(seed=1, n_train=2, n_test=1, n_spots=50, n_targets=5))
    rc = main(["preprocess", str(h5), "--out", str(tmp_path / "w"), "--tile-size", "30", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 slides (2 train, 1 test)" in out
    prep = load_prepared(tmp_path / "w")
    assert prep.tiles.shape[1:] == (30, 30, 3) and prep.config.tiles.size == 30


@pytest.mark.shared
def test_real_her2st_one_tile_per_spot_on_tissue(shared_data, tmp_path):
    from hevisum.io.competition import read_competition_h5

    slides = read_competition_h5(shared_data / "challenge" / "her2st.h5")
    prep = preprocess(slides, PreprocessConfig(), tmp_path / "w", progress=False)
    sp = pd.read_csv(tmp_path / "w" / "spots.csv", dtype={"spot_id": str})
    qc = json.loads((tmp_path / "w" / "qc.json").read_text())
    expected = sum(q["n_valid"] if s.split == "train" else s.n_spots for s, q in zip(slides, qc.values()))
    assert len(sp) == len(prep.tiles) == expected
    assert (sp.groupby("slide").size() == pd.Series({s.slide_id: (qc[s.slide_id]["n_valid"] if s.split == "train"
                                                                  else s.n_spots) for s in slides})).all()
    assert set(sp.loc[sp["split"] == "test", "test_set"].unique()) <= {1, 2}
    # the centre subtile of (almost) every tile is tissue: not the white background fill
    centre = np.asarray(prep.tiles[:, 26:52, 26:52])
    tissue_share = (centre.min(axis=-1) < 235).mean(axis=(1, 2))
    assert (tissue_share > 0.5).mean() >= 0.95, (tissue_share > 0.5).mean()
    for s in slides:
        assert abs(qc[s.slide_id]["pitch_px"] - 59) < 2
        assert np.hypot(*qc[s.slide_id]["shift_px"]) < 0.3 * qc[s.slide_id]["pitch_px"]


def test_a_pool_of_workers_writes_the_same_work_folder(small_slides, tmp_path):
    """Per-slide steps in 2 forked processes: every file but timings.json is byte-identical to one process (tile
    caches of an extra geometry included)."""
    from hevisum.preprocess.tiles import TileGeometry

    geo = [TileGeometry("wide", 24, scale=6.0)]
    one = preprocess(small_slides, PreprocessConfig(), tmp_path / "one", progress=False, geometries=geo, workers=1)
    two = preprocess(small_slides, PreprocessConfig(), tmp_path / "two", progress=False, geometries=geo, workers=2)
    files = sorted(p.relative_to(one.workdir) for p in one.workdir.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two.workdir) for p in two.workdir.rglob("*") if p.is_file())
    assert "tiles_wide.npy" in {str(f) for f in files}
    for f in files:
        if f.name not in ("timings.json", ".hevisum-run.json"):  # times; the marker says when
            assert (one.workdir / f).read_bytes() == (two.workdir / f).read_bytes(), f
    assert np.asarray(two.tiles).any()  # the workers' writes reached the files


def test_a_workers_error_is_raised_in_the_caller(small_slides, tmp_path):
    """A slide whose full-resolution file went missing after reading fails inside a worker (when its tiles are
    read): the caller gets the same one line as with one process, and no work folder is left."""
    gone = tmp_path / "gone.tif"
    meta = dict(small_slides[1].meta, level0={"path": str(gone), "backend": "tifffile", "sx": 1.0, "sy": 1.0})
    slides = [small_slides[0], dataclasses.replace(small_slides[1], meta=meta)]
    with pytest.raises(HevisumError) as e1:
        preprocess(slides, PreprocessConfig(), tmp_path / "w1", progress=False, workers=1)
    with pytest.raises(HevisumError) as e2:
        preprocess(slides, PreprocessConfig(), tmp_path / "w2", progress=False, workers=2)
    assert str(gone) in str(e1.value) and str(e1.value) == str(e2.value)
    assert not (tmp_path / "w1").exists() and not (tmp_path / "w2").exists()
