"""predictions.h5ad joins the user's own data: a single-slide Visium run on real data, joined by barcode onto the
AnnData scanpy's read_visium would build from the same Space Ranger folder."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from hevisum.outputs import format_written, obs_names, truth_rows, written_files

# the baselines only: the run takes about a minute on two cores, most of it preprocessing and the report
BASELINES_ONLY = """
seed = 0
[models]
methods = ["mean"]
[stacking]
enabled = false
"""


@pytest.fixture(scope="module")
def gbm_run(shared_data, tmp_path_factory):
    sample = shared_data / "visium_gbm"
    if not (sample / "spatial").is_dir():
        pytest.skip(f"{sample} not found")
    tmp = tmp_path_factory.mktemp("gbm")
    cfg = tmp / "baselines.toml"
    cfg.write_text(BASELINES_ONLY)
    out = tmp / "run"
    proc = subprocess.run([sys.executable, "-m", "hevisum.cli", "run", str(sample), "--out", str(out),
                           "--config", str(cfg), "--quiet"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"sample": sample, "out": out, "stdout": proc.stdout}


def scanpy_layout(spatial):
    """What ``scanpy.read_visium`` builds from spatial/ (without the counts): barcodes as obs_names, the position
    columns in obs, obsm['spatial'] = (pxl_col_in_fullres, pxl_row_in_fullres), the images and scale factors
    under uns['spatial'][library_id]."""
    import anndata as ad
    from PIL import Image

    pos = pd.read_csv(spatial / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres",
                             "pxl_col_in_fullres"]).set_index("barcode")
    adata = ad.AnnData(obs=pos[["in_tissue", "array_row", "array_col"]])
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    adata.uns["spatial"] = {"lib": {
        "images": {r: np.asarray(Image.open(spatial / f"tissue_{r}_image.png")) for r in ("hires", "lowres")},
        "scalefactors": json.loads((spatial / "scalefactors_json.json").read_text())}}
    return adata


@pytest.mark.shared
def test_single_slide_visium_run_joins_the_users_anndata_by_barcode(gbm_run):
    import anndata as ad

    out, spatial = gbm_run["out"], gbm_run["sample"] / "spatial"
    pred = ad.read_h5ad(out / "predictions.h5ad")
    mine = scanpy_layout(spatial)
    # every prediction is a barcode of the user's data, in tissue (a few off-tissue spots were dropped)
    assert pred.obs_names.isin(mine.obs_names).all()
    assert pred.n_obs > 0.99 * int((mine.obs["in_tissue"] == 1).sum())
    joined = mine[pred.obs_names]
    assert np.array_equal(pred.obsm["spatial"], joined.obsm["spatial"])  # exactly: the same full-res pixels
    for col in ("in_tissue", "array_row", "array_col"):
        assert np.array_equal(pred.obs[col].to_numpy(), joined.obs[col].to_numpy()), col
    # a single-slide run still has predictions: the out-of-fold ones, with the truth beside them
    assert set(pred.obs["split"]) == {"train_oof"}
    assert set(pred.obs["slide"]) == {"visium_gbm"}
    table = pd.read_csv(gbm_run["sample"] / "celltype_proportions_rctd.tsv", sep="\t", index_col=0)
    assert list(pred.var_names) == list(table.columns)
    np.testing.assert_allclose(pred.layers["truth"], table.loc[pred.obs_names].to_numpy(), rtol=1e-6, atol=1e-7)
    assert np.isfinite(pred.X).all()
    # the library: the Space Ranger images and scale factors, as read_visium keeps them
    lib = pred.uns["spatial"]["visium_gbm"]
    assert lib["scalefactors"] == pytest.approx(mine.uns["spatial"]["lib"]["scalefactors"], rel=0, abs=0)
    for res in ("hires", "lowres"):
        assert lib["images"][res].shape[:2] == mine.uns["spatial"]["lib"]["images"][res].shape[:2]
    xy = pred.obsm["spatial"] * lib["scalefactors"]["tissue_hires_scalef"]
    h, w = lib["images"]["hires"].shape[:2]
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()
    info = pred.uns["hevisum"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert info["units"] == "rank" and "not proportions" in info["units_note"]
    assert info["method"] == metrics["selected"] and info["encoder"] == metrics["encoder"]
    assert json.loads(info["config"])["models"]["methods"] == ["mean"]


@pytest.mark.shared
def test_single_slide_run_writes_predictions_csv_and_lists_its_files(gbm_run):
    out = gbm_run["out"]
    csv = pd.read_csv(out / "predictions.csv", dtype={"slide": str, "ID": str})
    oof = pd.read_csv(out / f"oof_{json.loads((out / 'metrics.json').read_text())['selected']}.csv",
                      dtype={"slide": str, "ID": str})
    pd.testing.assert_frame_equal(csv, oof, check_dtype=False)  # no test slides: the out-of-fold predictions
    assert not list(out.glob("submission_*.csv"))
    names = [n for n, _ in written_files(out)]
    assert names[:3] == ["report.html", "predictions.h5ad", "predictions.csv"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert "embedding_qc" in metrics and "silhouette_slide" in metrics["embedding_qc"]


def test_obs_names_keep_spot_ids_unless_slides_collide():
    assert obs_names(np.array(["a", "a", "b"]), np.array(["x", "y", "z"])).tolist() == ["x", "y", "z"]
    assert obs_names(np.array(["a", "b"]), np.array(["0", "0"])).tolist() == ["0-a", "0-b"]


def test_truth_rows_joins_on_slide_and_id():
    spots = pd.DataFrame({"slide": ["s", "s", "t"], "spot_id": ["1", "2", "1"]})
    truth = pd.DataFrame({"slide": ["t", "s"], "ID": [1, 2], "C1": [5.0, 6.0], "C2": [7.0, 8.0]})
    got = truth_rows(spots, truth, 2)
    assert np.isnan(got[0]).all() and got[1].tolist() == [6.0, 8.0] and got[2].tolist() == [5.0, 7.0]
    assert np.isnan(truth_rows(spots, None, 2)).all()


def test_format_written_lists_user_files_first(tmp_path):
    for name in ("config.toml", "predictions.csv", "report.html", "submission_a.csv", "submission_b.csv"):
        (tmp_path / name).write_text("x")
    (tmp_path / "models").mkdir()
    text = format_written(tmp_path)
    lines = text.splitlines()
    assert lines[1].split()[0] == "report.html" and "submission_*.csv (2 files)" in text
    assert "models/" in text and "config.toml" in text


def test_h5ad_keeps_each_slides_own_frame_in_a_mixed_run(tmp_path):
    """A Visium slide (full-resolution frame) beside a slide read from an image (image pixels), with the spot
    columns only the first has read back from spots.csv as text with empty cells; a slide id with '/'."""
    import anndata as ad

    from hevisum.outputs import SlideImages, library_key, predictions_to_h5ad

    spots = pd.DataFrame({"slide": ["v", "v", "a/b"], "spot_id": ["AC-1", "GT-1", "0"],
                          "x": [10.0, 20.0, 5.0], "y": [30.0, 40.0, 6.0], "pitch_px": [9.0, 9.0, 4.0],
                          "pxl_col_in_fullres": ["100.25", "200.5", ""], "pxl_row_in_fullres": ["300", "400", ""],
                          "in_tissue": ["1", "1", ""]})
    hires, lowres = np.zeros((50, 60, 3), np.uint8), np.zeros((10, 12, 3), np.uint8)
    views = {"v": SlideImages(hires, 1.0, {"hires": hires, "lowres": lowres},
                              {"tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.02,
                               "spot_diameter_fullres": 90.0}, frame="fullres"),
             "a/b": (np.ones((8, 8, 3), np.uint8), 0.5)}
    truth = np.array([[1.0, 0.0], [0.5, 0.5], [np.nan, np.nan]])
    predictions_to_h5ad(spots, np.array([[0.1, 0.9], [0.2, 0.8], [0.3, 0.7]]), ["T cell", "B cell"],
                        tmp_path / "p.h5ad", views, split=["train_oof", "train_oof", "test"], truth=truth,
                        info={"units": "rank"})
    a = ad.read_h5ad(tmp_path / "p.h5ad")
    assert list(a.obs_names) == ["AC-1", "GT-1", "0"] and list(a.var_names) == ["T cell", "B cell"]
    np.testing.assert_array_equal(a.obsm["spatial"], [[100.25, 300.0], [200.5, 400.0], [5.0, 6.0]])
    assert library_key("a/b") != "a/b" and set(a.uns["spatial"]) == {"v", library_key("a/b")}
    assert list(a.obs["library_id"]) == ["v", "v", library_key("a/b")]
    assert a.uns["spatial"]["v"]["scalefactors"]["tissue_lowres_scalef"] == 0.02
    assert set(a.uns["spatial"]["v"]["images"]) == {"hires", "lowres"}
    assert a.uns["spatial"][library_key("a/b")]["scalefactors"]["tissue_hires_scalef"] == 0.5
    np.testing.assert_array_equal(a.obs["in_tissue"].to_numpy()[:2], [1, 1])
    assert np.isnan(a.layers["truth"][2]).all() and a.uns["hevisum"]["units"] == "rank"
