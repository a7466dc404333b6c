"""End to end: `hevisum run`, `hevisum predict` and `hevisum evaluate` through the real CLI on generated data."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from hevisum.demo import DemoSpec
from helpers import cli, demo_inputs

TINY_CONFIG = """
seed = 3
[models]
methods = ["encoder-ridge", "hevisum-cnn"]
[train]
epochs = 2
batch_size = 16
max_spots_per_epoch = 48
num_workers = 0
[stacking]
model = "mlp"
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("run")
    h5, truth, cfg = demo_inputs(tmp, DemoSpec(n_train=3, n_test=1, n_spots=60, n_targets=12, seed=5), TINY_CONFIG)
    out = tmp / "out"
    cli("run", str(h5), "--out", str(out), "--config", str(cfg), "--truth", str(truth), "--quiet")
    return {"h5": h5, "truth": truth, "out": out, "tmp": tmp}


def test_run_writes_a_complete_self_describing_folder(tiny_run):
    out = tiny_run["out"]
    for name in ("config.toml", "metrics.json", "target_names.json", "stain.json", "predictions.csv",
                 "predictions.h5ad", "report.html", "prep/qc.json", "models/stacking/model.safetensors"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"mean", "colour-ridge", "encoder-ridge", "hevisum-cnn", "stacking"}
    assert metrics["folds"] == ["S_1", "S_2", "S_3"]
    for m in ("encoder-ridge", "hevisum-cnn"):
        assert len(list((out / "models" / m).glob("fold_*/model.safetensors"))) == 3
    # The tile model logs every epoch of every fold.
    log = pd.read_csv(next((out / "models" / "hevisum-cnn").glob("fold_*/log.csv")))
    assert list(log.columns[:5]) == ["epoch", "train_loss", "val_loss", "val_spearman", "lr"]
    # The report shows the figures it names.
    html = (out / "report.html").read_text()
    for src in [s.split("'")[0] for s in html.split("src='")[1:]]:
        assert (out / src).is_file(), src
    assert "loss_curves.png" in html and "methods.png" in html


def test_submission_is_in_the_competition_format(tiny_run):
    out, h5 = tiny_run["out"], tiny_run["h5"]
    import h5py

    with h5py.File(h5) as f:
        (slide,) = list(f["spots/Test"].keys())
        n_test = len(f["spots/Test"][slide])
    sub = pd.read_csv(out / f"submission_{slide}.csv")
    assert list(sub.columns) == ["ID"] + [f"C{i + 1}" for i in range(12)]
    assert sub["ID"].tolist() == list(range(n_test))  # every test spot, in file order
    assert np.isfinite(sub.iloc[:, 1:].to_numpy()).all()
    pred = pd.read_csv(out / "predictions.csv")
    assert list(pred.columns[:2]) == ["slide", "ID"] and len(pred) == n_test


def test_evaluate_cli_agrees_with_the_run_metrics(tiny_run):
    out = tiny_run["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    proc = cli("evaluate", "--pred", str(out / "predictions.csv"), "--truth", str(tiny_run["truth"]))
    scored = json.loads(proc.stdout)
    best = metrics["selected"]
    assert scored["overall"]["spot_spearman"] == pytest.approx(metrics["test"][best]["overall"]["spot_spearman"])


def test_predict_from_the_run_folder_alone_reproduces_the_test_predictions(tiny_run):
    out, tmp = tiny_run["out"], tiny_run["tmp"]
    cli("predict", str(out), str(tiny_run["h5"]), "--out", str(tmp / "pred"), "--quiet")
    a = pd.read_csv(out / "predictions.csv")
    b = pd.read_csv(tmp / "pred" / "predictions.csv")
    b = b[b["slide"].isin(a["slide"].unique())].reset_index(drop=True)
    assert (a["ID"].astype(str) == b["ID"].astype(str)).all()
    np.testing.assert_allclose(a.iloc[:, 2:].to_numpy(), b.iloc[:, 2:].to_numpy(), atol=1e-5)
    # Training slides are predicted too (every spot kept).
    assert set(pd.read_csv(tmp / "pred" / "predictions.csv")["slide"]) == {"S_1", "S_2", "S_3", "S_4"}


def test_predictions_h5ad_follows_the_scanpy_spatial_convention(tiny_run):
    import anndata as ad

    adata = ad.read_h5ad(tiny_run["out"] / "predictions.h5ad")
    assert adata.obsm["spatial"].shape == (adata.n_obs, 2)
    assert adata.n_vars == 12
    lib = adata.obs["slide"].iloc[0]
    sp = adata.uns["spatial"][lib]
    assert sp["images"]["hires"].ndim == 3
    assert "tissue_hires_scalef" in sp["scalefactors"] and "spot_diameter_fullres" in sp["scalefactors"]
    # Scaled spot coordinates fall inside the stored image.
    xy = adata.obsm["spatial"] * sp["scalefactors"]["tissue_hires_scalef"]
    h, w = sp["images"]["hires"].shape[:2]
    assert (xy[:, 0] < w).all() and (xy[:, 1] < h).all()


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc = cli("run", str(tmp_path / "missing.h5"), "--out", str(out), check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "missing.h5" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[train]\nepocs = 3\n")
    proc = cli("run", "--out", str(out), "--config", str(cfg), check=False)
    assert proc.returncode == 2 and "train.epocs" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_default_run_on_demo_data_learns_the_image_signal(tmp_path):
    """What `make run` does: no input, the fast profile, the generated demo dataset."""
    out = tmp_path / "demo"
    cli("run", "--out", str(out), "--quiet")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["profile"] == "fast" and metrics["selected"] not in ("mean", "colour-ridge")
    test = metrics["test"]
    best = test[metrics["selected"]]["overall"]["spot_spearman"]
    assert best > test["mean"]["overall"]["spot_spearman"] + 0.1
    assert metrics["seconds"] < 300


def test_a_truth_file_for_other_spots_is_refused_before_any_training(tiny_run, tmp_path):
    truth = pd.read_csv(tiny_run["truth"])
    truth["ID"] = truth["ID"] + 1000  # the IDs of some other file
    bad = tmp_path / "other_truth.csv"
    truth.to_csv(bad, index=False)
    out = tmp_path / "out"
    proc = cli("run", str(tiny_run["h5"]), "--out", str(out), "--config", str(tiny_run["tmp"] / "tiny.toml"),
               "--truth", str(bad), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error:") and "other_truth.csv" in err[-1] and "test spots" in err[-1]
    assert not any("cross-validating" in line for line in err)  # refused before the first method ran
    assert not out.exists()


def test_test_mse_is_also_reported_in_the_space_the_models_were_fitted_in(tiny_run):
    from scipy.stats import rankdata

    m = json.loads((tiny_run["out"] / "metrics.json").read_text())
    pred = pd.read_csv(tiny_run["out"] / f"test_{m['selected']}.csv")
    truth = pd.read_csv(tiny_run["truth"]).merge(pred[["slide", "ID"]], on=["slide", "ID"])
    cols = [c for c in pred.columns if c.startswith("C")]
    t = truth.set_index(["slide", "ID"]).loc[list(zip(pred["slide"], pred["ID"])), cols].to_numpy()
    fit = (rankdata(t, axis=1) - 1) / (t.shape[1] - 1)  # default: plain per-spot ranks scaled 0..1
    overall = m["test"][m["selected"]]["overall"]
    assert overall["mse_fit_space"] == pytest.approx(float(((pred[cols].to_numpy() - fit) ** 2).mean()), rel=1e-4)
    assert overall["mse_fit_space"] < 0.2  # rank-space predictions against rank-space truth


def test_a_truth_file_in_the_submission_layout_without_a_slide_column_scores_the_run(tiny_run, tmp_path):
    truth = pd.read_csv(tiny_run["truth"]).drop(columns=["slide"])  # ID, C1..Cn: one test slide
    bare = tmp_path / "truth_ids_only.csv"
    truth.to_csv(bare, index=False)
    cfg = tmp_path / "ridge.toml"
    cfg.write_text('[models]\nmethods = ["encoder-ridge"]\n')
    out = tmp_path / "out"
    cli("run", str(tiny_run["h5"]), "--out", str(out), "--config", str(cfg), "--truth", str(bare), "--quiet")
    overall = json.loads((out / "metrics.json").read_text())["test"]["encoder-ridge"]["overall"]
    assert np.isfinite(overall["spot_spearman"]) and 0 <= overall["mse_fit_space"] < 0.2
