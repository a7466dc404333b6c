"""The Python API: hevisum.read / run / predict / evaluate with AnnData in and out, and the notebook that shows
it (notebooks/10_python_api.ipynb), executed headless."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hevisum
from hevisum.demo import DemoSpec, make_demo_slides
from hevisum.errors import HevisumError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "10_python_api.ipynb"
FAST = {"models": {"methods": ["mean"]}, "stacking": {"enabled": False}}  # the baselines only


def scanpy_anndata(slides):
    """The demo slides as a scanpy/squidpy user holds them: one AnnData, barcodes as obs_names, obs['slide'],
    obsm['spatial'] in full-resolution pixels, per library a 'hires' image at half resolution with its scale
    factor, the targets in obsm['proportions'] (NaN for the test slide)."""
    import anndata as ad

    obs, xy, props, spatial = [], [], [], {}
    n_t = next(s.targets.shape[1] for s in slides if s.targets is not None)
    for s in slides:
        obs.append(pd.DataFrame({"slide": s.slide_id, "split": s.split},
                                index=[f"{s.slide_id}-AC{i}-1" for i in s.spot_ids]))
        xy.append(s.xy * 2.0)  # full resolution: twice the image below
        props.append(s.targets if s.targets is not None else np.full((s.n_spots, n_t), np.nan))
        spatial[s.slide_id] = {"images": {"hires": s.image},
                               "scalefactors": {"tissue_hires_scalef": 0.5, "spot_diameter_fullres": 40.0,
                                                "tissue_lowres_scalef": 0.125}}
    adata = ad.AnnData(obs=pd.concat(obs))
    adata.obsm["spatial"] = np.concatenate(xy)
    adata.obsm["proportions"] = np.concatenate(props)
    adata.uns["spatial"] = spatial
    return adata


@pytest.fixture(scope="module")
def api_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    slides = make_demo_slides(DemoSpec(n_train=3, n_test=1, n_spots=80, n_targets=5, seed=4), progress=False)
    adata = scanpy_anndata(slides)
    result = hevisum.run(adata, tmp / "run", config=FAST, progress=False)
    return {"adata": adata, "result": result, "tmp": tmp}


def test_import_hevisum_loads_neither_torch_nor_numpy():
    code = ("import sys, hevisum; heavy = [m for m in ('torch', 'numpy', 'pandas') if m in sys.modules]; "
            "print(heavy, callable(hevisum.predict), hevisum.run.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "True", "hevisum.api"]


def test_predict_stays_the_function_when_the_submodule_is_imported():
    from hevisum.predict import predict_from_run  # noqa: F401  (the module hevisum/predict.py)
    import hevisum.api

    assert hevisum.predict is hevisum.api.predict
    assert sys.modules["hevisum.predict"].predict_from_run is predict_from_run


def test_run_takes_an_in_memory_anndata(api_run):
    result, adata = api_run["result"], api_run["adata"]
    assert result.metrics["folds"] == ["S_1", "S_2", "S_3"] and result.metrics["n_test_spots"] > 0
    assert (result.out / "report.html").is_file()
    import anndata as ad

    pred = ad.read_h5ad(result.out / "predictions.h5ad")
    # the user's barcodes, coordinates (full resolution) and scale factors
    assert pred.obs_names.isin(adata.obs_names).all()
    assert np.array_equal(pred.obsm["spatial"], adata[pred.obs_names].obsm["spatial"])
    assert pred.uns["spatial"]["S_1"]["scalefactors"] == adata.uns["spatial"]["S_1"]["scalefactors"]
    assert set(pred.obs["split"]) == {"test", "train_oof"}


def test_predict_returns_an_anndata_that_joins_the_input(api_run):
    adata = api_run["adata"]
    test = adata[adata.obs["slide"] == "S_4"].copy()
    del test.obsm["proportions"]
    pred = hevisum.predict(api_run["result"].out, test)
    assert list(pred.obs_names) == list(test.obs_names)
    assert np.array_equal(pred.obsm["spatial"], test.obsm["spatial"])
    assert pred.uns["spatial"]["S_4"]["images"]["hires"].shape == test.uns["spatial"]["S_4"]["images"]["hires"].shape
    assert pred.uns["hevisum"]["units"] == "rank" and pred.n_vars == 5 and np.isfinite(pred.X).all()
    # the same predictions as the run's own test predictions
    run_pred = pd.read_csv(api_run["result"].out / "predictions.csv", dtype={"ID": str})
    np.testing.assert_allclose(pred.X, run_pred.iloc[:, 2:].to_numpy(), atol=1e-5)


def test_read_takes_slides_paths_and_anndata(api_run, tmp_path):
    slides = hevisum.read(api_run["adata"])
    assert [s.slide_id for s in slides] == ["S_1", "S_2", "S_3", "S_4"]
    assert [s.split for s in slides] == ["train", "train", "train", "test"]
    assert slides[0].spot_ids[0].startswith("S_1-AC")
    path = tmp_path / "a.h5ad"
    api_run["adata"].write_h5ad(path)
    assert [s.n_spots for s in hevisum.read(path)] == [s.n_spots for s in slides]
    with pytest.raises(HevisumError, match="unknown option"):
        hevisum.read(path, colour="blue")


def test_evaluate_takes_frames_paths_and_anndata(api_run):
    out = api_run["result"].out
    import anndata as ad

    pred = ad.read_h5ad(out / "predictions.h5ad")
    oof = pred[pred.obs["split"] == "train_oof"]
    by_anndata = hevisum.evaluate(oof, oof)
    metrics = json.loads((out / "metrics.json").read_text())
    assert by_anndata["overall"]["spot_spearman"] == pytest.approx(
        metrics["methods"][metrics["selected"]]["cv_spot_spearman"], abs=1e-6)
    frame = pd.read_csv(out / f"oof_{metrics['selected']}.csv", dtype={"ID": str})
    truth = frame.copy()
    truth.iloc[:, 2:] = np.asarray(oof.layers["truth"])[
        pd.Index(oof.obs["ID"].astype(str)).get_indexer(frame["ID"])]
    truth_csv = api_run["tmp"] / "truth.csv"
    truth.to_csv(truth_csv, index=False)
    by_path = hevisum.evaluate(out / f"oof_{metrics['selected']}.csv", truth_csv)
    assert by_path["overall"]["spot_spearman"] == pytest.approx(by_anndata["overall"]["spot_spearman"], abs=1e-6)


def test_run_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(HevisumError, match="cannot read a dict"):
        hevisum.run([{"not": "data"}], tmp_path / "out", progress=False)
    with pytest.raises(HevisumError, match="config must be"):
        hevisum.run(None, tmp_path / "out", config=3, progress=False)


# ------------------------------------------------------------------------------------------ the notebook


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert not [c for c in nb.cells if c.cell_type == "code" and (c.outputs or c.execution_count)]
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    assert "import hevisum.api" not in "".join(c.source for c in nb.cells)  # only the public API


@pytest.mark.slow
def test_notebook_runs_headless_on_demo_data(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # "python3" is this interpreter, with no user profile; temporary files go under tmp_path
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (hevisum tests)", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = sorted(p.name for p in NOTEBOOK.parent.iterdir())
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{NOTEBOOK.name}: a cell raised\n{err}", pytrace=False)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    text = json.dumps([o.get("text", "") for o in outputs])
    assert "selected:" in text and "units: rank" in text
    assert sorted(p.name for p in NOTEBOOK.parent.iterdir()) == before  # nothing written beside it
