"""`hevisum predict RUN_DIR SLIDE`: a virtual spot grid over a slide image without spots, predicted by a run.

A tiny run on generated demo data (no µm/px, so `--grid-um` is needed), then a 3000 x 2250 px pyramidal TIFF at
1 µm/px built from real H&E patches of ../shared/data/her2st (skipped when absent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hevisum.demo import DemoSpec
from helpers import cli, demo_inputs

SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()
HER2ST_IMAGE = SHARED_DATA / "her2st" / "images" / "C2.jpg"

TINY_CONFIG = """
seed = 1
[models]
methods = ["encoder-ridge"]
[encoder]
input_px = 64
[stacking]
enabled = false
[train]
num_workers = 0
[tiles]
size = 30
[realign]
enabled = false
"""
W, PITCH = 3000, 100.0  # slide width in px (1 µm/px) and grid pitch in µm


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    if not HER2ST_IMAGE.is_file():
        pytest.skip(f"real data not found at {HER2ST_IMAGE} (place the shared/ folder beside the repository)")
    from hevisum.io.wsi import he_patches, write_pyramidal_tiff

    tmp = tmp_path_factory.mktemp("wsi_predict")
    h5, _, cfg = demo_inputs(tmp, DemoSpec(n_train=2, n_test=1, n_spots=40, n_targets=6, seed=2), TINY_CONFIG,
                             h5_name="demo.h5")
    run = tmp / "run"
    cli("run", str(h5), "--out", str(run), "--config", str(cfg), "--quiet")
    patches = he_patches([HER2ST_IMAGE], n=12, seed=0)
    slide_path = tmp / "slide.tif"
    slide = write_pyramidal_tiff(slide_path, W, source_tiles=patches, um_per_px=1.0, seed=3)
    pred = tmp / "pred"
    cli("predict", str(run), str(slide_path), "--out", str(pred), "--grid-um", str(PITCH), "--quiet")
    return {"tmp": tmp, "run": run, "slide_path": slide_path, "slide": slide, "pred": pred, "patches": patches}


def _nearest(xy: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return d[:, 1]


def test_the_grid_lies_on_tissue_in_the_level0_frame_with_hexagonal_spacing(setup):
    import anndata as ad

    from hevisum.io.wsi import open_image, tissue_thumbnail

    slide = setup["slide"]
    adata = ad.read_h5ad(setup["pred"] / "predictions.h5ad")
    xy = adata.obsm["spatial"]
    n = adata.n_obs
    assert xy.shape == (n, 2) and n > 50
    # inside the level-0 frame
    assert (xy[:, 0] > 0).all() and (xy[:, 0] < slide.width).all()
    assert (xy[:, 1] > 0).all() and (xy[:, 1] < slide.height).all()
    # on tissue: the slide's own pixels under the spot centres are not glass
    glass = np.array([241.0, 240.0, 243.0])
    on_tissue = [np.abs(slide.region(int(x) - 4, int(y) - 4, 8, 8).reshape(-1, 3) - glass).max(axis=1).mean() > 8
                 for x, y in xy]
    assert np.mean(on_tissue) > 0.95
    # hexagonal lattice at the asked pitch: six neighbours one pitch away, rows pitch * sqrt(3) / 2 apart
    assert np.allclose(_nearest(xy), PITCH, atol=1e-6)
    obs = adata.obs
    assert (obs["in_tissue"] == 1).all()
    rows = obs["array_row"].to_numpy()
    assert np.allclose(xy[:, 1], PITCH / 2 + rows * PITCH * math.sqrt(3) / 2)
    assert ((obs["array_col"].to_numpy() - rows) % 2 == 0).all()  # Visium: even columns on even rows
    # as many spots as the tissue area holds (the mask's area over one spot's hexagonal cell)
    with open_image(setup["slide_path"]) as src:
        _, mask, scale = tissue_thumbnail(src, 2048)
    cells = mask.mean() * slide.width * slide.height / (PITCH**2 * math.sqrt(3) / 2)
    assert 0.75 * cells < n < 1.15 * cells


def test_predictions_follow_the_scanpy_layout_with_units_and_heatmaps(setup):
    import anndata as ad
    from PIL import Image

    pred, run = setup["pred"], setup["run"]
    adata = ad.read_h5ad(pred / "predictions.h5ad")
    assert adata.n_vars == 6 and np.isfinite(adata.X).all()
    assert adata.X.min() >= 0 and adata.X.max() <= 1  # rank scores
    lib = adata.uns["spatial"]["slide"]
    hires = lib["images"]["hires"]
    f = lib["scalefactors"]["tissue_hires_scalef"]
    assert hires.ndim == 3 and max(hires.shape[:2]) == 2048
    assert f == pytest.approx(2048 / W)
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(0.55 * PITCH)
    small = adata.obsm["spatial"] * f
    assert (small[:, 0] < hires.shape[1]).all() and (small[:, 1] < hires.shape[0]).all()
    info = adata.uns["hevisum"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert info["units"] == "rank" and info["method"] == metrics["selected"]
    assert info["um_per_px"] == pytest.approx(1.0) and info["grid_um"] == pytest.approx(PITCH)
    assert info["tile_field_um"] == pytest.approx(3 * PITCH)  # tiles.scale pitches; the demo run has no µm/px
    df = pd.read_csv(pred / "predictions.csv")
    assert list(df.columns) == ["slide", "ID", "x", "y"] + [f"C{i + 1}" for i in range(6)]
    assert (df["ID"].astype(str).to_numpy() == adata.obs["ID"].astype(str).to_numpy()).all()
    np.testing.assert_allclose(df[["x", "y"]].to_numpy(), adata.obsm["spatial"])
    np.testing.assert_allclose(df.iloc[:, 4:].to_numpy(), adata.X, atol=1e-6)
    # heat maps of the 4 most variable predicted targets, over the thumbnail
    pngs = sorted((pred / "heatmaps").glob("*.png"))
    var = np.argsort(-adata.X.var(axis=0), kind="stable")[:4]
    assert [p.stem for p in pngs] == sorted(f"C{i + 1}" for i in var)
    for p in pngs:
        with Image.open(p) as im:
            assert im.width > 400 and im.height > 300


def test_a_second_prediction_is_identical_and_draws_the_asked_targets(setup):
    import anndata as ad

    again = setup["tmp"] / "pred_again"
    cli("predict", str(setup["run"]), str(setup["slide_path"]), "--out", str(again), "--grid-um", str(PITCH),
       "--plot-targets", "C2,C5", "--quiet")
    assert (again / "predictions.csv").read_bytes() == (setup["pred"] / "predictions.csv").read_bytes()
    a, b = (ad.read_h5ad(p / "predictions.h5ad") for p in (setup["pred"], again))
    assert np.array_equal(a.X, b.X) and np.array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert sorted(p.name for p in (again / "heatmaps").iterdir()) == ["C2.png", "C5.png"]
    assert not (again / "work").exists()  # the tile caches are gone


def test_an_encoder_method_and_a_square_grid_on_a_png_with_um_per_px_given(setup):
    from PIL import Image

    from hevisum.io.wsi import SyntheticSlide
    from hevisum.wsi_predict import predict_slide

    img = SyntheticSlide(1200, 900, setup["patches"], seed=5).region(0, 0, 1200, 900)
    png = setup["tmp"] / "plain.png"
    Image.fromarray(img).save(png)  # no dpi: the resolution is unknown
    out = setup["tmp"] / "pred_png"
    df = predict_slide(setup["run"], png, out, grid_um=60, um_per_px=0.5, hexagonal=False, method="encoder-ridge",
                       progress=False)
    xy = df[["x", "y"]].to_numpy()
    assert len(df) > 10 and np.isfinite(df.iloc[:, 4:].to_numpy()).all()
    assert np.allclose(_nearest(xy), 120.0)  # 60 µm at 0.5 µm/px, square lattice
    assert np.allclose(np.diff(np.unique(xy[:, 1])) % 120.0, 0)
    assert json.loads((out / "slide.json").read_text())["method"] == "encoder-ridge"


def test_a_slide_without_um_per_px_is_refused_in_one_line(setup):
    from PIL import Image

    png = setup["tmp"] / "nodpi.png"
    Image.fromarray(np.asarray(setup["patches"][0])).save(png)
    out = setup["tmp"] / "refused"
    p = cli("predict", str(setup["run"]), str(png), "--out", str(out), "--grid-um", "100", check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "--um-per-px" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists() and not list(setup["tmp"].glob("refused.*"))


def test_a_run_without_its_pitch_in_um_needs_grid_um(setup):
    out = setup["tmp"] / "refused_pitch"
    p = cli("predict", str(setup["run"]), str(setup["slide_path"]), "--out", str(out), check=False)
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and "--grid-um" in p.stderr and "Traceback" not in p.stderr
    assert not out.exists()
    p = cli("predict", str(setup["run"]), str(setup["slide_path"]), "--out", str(out), "--grid-um", "100",
            "--plot-targets", "C99", check=False)
    assert p.returncode == 2 and "C99" in p.stderr and not out.exists()


def test_grid_options_with_a_spot_table_input_are_refused(setup, tmp_path):
    p = cli("predict", str(setup["run"]), str(setup["tmp"] / "demo.h5"), "--out", str(tmp_path / "o"), "--square",
            check=False)
    assert p.returncode == 2 and "--square" in p.stderr and not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- units


def test_the_training_pitch_in_um_comes_from_the_run_folder(tmp_path):
    from hevisum.wsi_predict import training_pitch_um

    prep = tmp_path / "prep"
    prep.mkdir()
    spots = pd.DataFrame({"slide": ["a", "a", "b", "c"], "split": ["train", "train", "train", "test"],
                          "pitch_px": [200.0, 200.0, 100.0, 50.0], "um_per_px": [0.5, 0.5, 1.0, np.nan]})
    spots.to_csv(prep / "spots.csv", index=False)
    assert training_pitch_um(tmp_path)[0] == pytest.approx(100.0)
    spots.drop(columns="um_per_px").to_csv(prep / "spots.csv", index=False)
    assert training_pitch_um(tmp_path)[0] is None
    # tissue-scale tiles of a physical field of view give µm/px too: 112 µm over 224 px
    (prep / "geometry.json").write_text(json.dumps({
        "geometries": [{"name": "tissue", "size": 224, "scale": 0.0, "fov_um": 112.0, "fallback_scale": 3.0}],
        "slides": {"a": {"tissue": {"side_px": 224, "physical": True}},
                   "b": {"tissue": {"side_px": 112, "physical": True}}}}))
    assert training_pitch_um(tmp_path)[0] == pytest.approx(100.0)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_the_slide_stain_lookup_maps_colours_as_normalize_does(method):
    from hevisum.preprocess.stain import fit_target, normalize
    from hevisum.wsi_predict import fit_slide_stain

    rng = np.random.default_rng(0)
    # pink stroma with purple nuclei, and a target fitted on a bluer copy
    base = np.array([220.0, 150, 200]) + rng.normal(0, 12, (96, 96, 3))
    base[rng.random((96, 96)) < 0.2] = (100, 60, 150)
    image = np.clip(base, 0, 255).astype(np.uint8)
    target = fit_target(method, np.clip(image * np.array([0.9, 0.95, 1.05]), 0, 255).astype(np.uint8))
    mask = np.ones(image.shape[:2], bool)
    mask[:10] = False
    expected = normalize(image, target, mask, seed=0)
    got = fit_slide_stain(target, image[mask], seed=0).apply(image)
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999
