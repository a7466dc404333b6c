"""`hevisum explain` through the real CLI on a tiny finished run: a tile network and a frozen-encoder ridge head.

Completeness (attributions summing to f(tile) − f(baseline)) is asserted within 5 % for the tile network. The
ridge head's chain through EfficientNet-Lite0 is asserted on exactness instead (its output equals the method's
prediction less the non-encoder blocks' contribution): with pooled ReLU6 features behind a per-slide z-score
its integral need not converge (see ``hevisum.explain.integrated_gradients``), so its completeness is only
reported.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest

from hevisum.demo import DemoSpec, write_demo
from helpers import cli, demo_inputs

TINY_CONFIG = """
seed = 3
[models]
methods = ["encoder-ridge", "hevisum-cnn"]
[train]
epochs = 2
max_spots_per_epoch = 32
num_workers = 0
[encoder]
input_px = 48
[stacking]
enabled = false
"""
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("explain")
    h5, _, cfg = demo_inputs(tmp, DemoSpec(n_train=3, n_test=1, n_spots=40, n_targets=6), TINY_CONFIG)
    out = tmp / "run"
    cli("run", str(h5), "--out", str(out), "--config", str(cfg), "--quiet")
    # new slides, unseen by the run
    new, _ = write_demo(tmp / "new.h5", DemoSpec(n_train=1, n_test=1, n_spots=40, n_targets=6, seed=11),
                        progress=False)
    return {"h5": h5, "run": out, "tmp": tmp, "new": new}


def _is_png(path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_explain_tile_network(tiny_run):
    out = tiny_run["tmp"] / "ex_cnn"
    cli("explain", str(tiny_run["run"]), str(tiny_run["h5"]), "--out", str(out), "--method", "hevisum-cnn",
        "--spots", "S_4:0", "--targets", "C2", "--steps", "16", "--max-steps", "256", "--quiet")
    res = json.loads((out / "explain.json").read_text())
    assert res["method"] == "hevisum-cnn" and res["n_fold_models"] == 3 and res["kind"] == "tile network"
    assert [t["column"] for t in res["targets"]] == ["C2"]
    assert [(r["slide"], r["spot_id"]) for r in res["spots"]] == [("S_4", "0")]
    assert res["forward_check_max_abs_error"] < 1e-4
    for r in res["spots"]:
        diff = r["output"] - r["baseline_output"]
        assert r["output_difference"] == pytest.approx(diff, abs=1e-12)
        assert r["completeness_error"] == pytest.approx(abs(r["attribution_sum"] - diff) / abs(diff))
        assert r["completeness_error"] <= 0.05, r
        assert r["fold_completeness_error_max"] <= 0.05, r
        assert 0.0 <= r["prediction"] <= 1.0
        assert _is_png(out / r["tile_png"]) and _is_png(out / r["slide_png"])
    assert (out / "tiles" / "S_4" / "C2" / "0.png").is_file()
    assert sorted(p.name for p in (out / "slides").iterdir()) == ["S_4__C2.png"]
    csv = pd.read_csv(out / "explain.csv")
    assert len(csv) == 1 and {"prediction", "output_difference", "attribution_sum", "completeness_error"} <= set(csv)
    assert not (out / "work").exists()  # the temporary preprocessing folder is not left behind


def test_explain_encoder_ridge_defaults(tiny_run):
    """New slides; default targets (the 2 most variable) and spots (per slide, the most extreme prediction)."""
    out = tiny_run["tmp"] / "ex_ridge"
    cli("explain", str(tiny_run["run"]), str(tiny_run["new"]), "--out", str(out), "--method", "encoder-ridge",
        "--n-spots", "1", "--steps", "32", "--max-steps", "32", "--quiet")
    res = json.loads((out / "explain.json").read_text())
    assert res["kind"] == "encoder features + ridge head" and len(res["targets"]) == 2
    # the chain reproduces the method's output less the colour block's contribution
    assert res["forward_check_max_abs_error"] < 1e-4
    assert any("colour" in n for n in res["notes"])
    slides = sorted({r["slide"] for r in res["spots"]})
    assert slides == ["S_1", "S_2"] and len(res["spots"]) == 2 * 2
    for r in res["spots"]:
        assert np.isfinite(r["completeness_error"]) and r["steps"] == 32
        assert _is_png(out / r["tile_png"])
    for s in slides:
        for t in res["targets"]:
            assert _is_png(out / "slides" / f"{s}__{t['name']}.png")
    assert res["completeness"]["n_pairs"] == 4


def test_ridge_chain_equals_prediction_less_other_blocks(tiny_run, tmp_path):
    """Independently of the command: per fold model, encoder → slide z-score → ridge map on the encoder columns
    equals the method's prediction minus the colour block's contribution, to 1e-4."""
    import torch

    from hevisum.explain import feature_head_forward, fold_ridge_head, slide_statistics
    from hevisum.explain_run import _module_classes
    from hevisum.features import FeatureStore
    from hevisum.methods import FitContext
    from hevisum.pipeline import fold_models
    from hevisum.preprocess.pipeline import load_prepared

    prep = load_prepared(tiny_run["run"] / "prep")
    models = fold_models(tiny_run["run"], "encoder-ridge")
    cfg = models[0].method.cfg
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision="fp32"))
    store = FeatureStore(workdir=tmp_path, tiles={"spot": prep.tiles}, spots=prep.spots, cfg=cfg)
    X = store.for_method(models[0].method)
    base = store.base("encoder", "spot", "stages")
    n_enc = base.shape[1]
    assert n_enc == 2848 and X.shape[1] > n_enc  # stage-pooled features, then colour statistics
    slides = prep.spots["slide"].astype(str).to_numpy()
    rows = np.flatnonzero(slides == "S_2")[:4]
    EncoderPixels = _module_classes()[0]
    embed = EncoderPixels(store.encoder(), store.input_px(), True, False)
    mean, std = slide_statistics(base[slides == "S_2"])
    ctx = FitContext(cfg=cfg, tiles=prep.tiles)
    for lm in models:
        w, b = fold_ridge_head(lm.method.tensors)
        chain = feature_head_forward(embed, mean, std, w, b, columns=slice(0, n_enc))
        with torch.no_grad():
            got = chain(torch.from_numpy(np.asarray(prep.tiles[rows], dtype=np.float32))).numpy()
        want = lm.method.predict(X[rows], rows=rows, ctx=ctx) - X[rows, n_enc:].astype(np.float64) @ w[:, n_enc:].T
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_bad_target_is_one_line_and_exit_2(tiny_run):
    out = tiny_run["tmp"] / "ex_bad"
    proc = cli("explain", str(tiny_run["run"]), str(tiny_run["h5"]), "--out", str(out), "--targets", "C2,nope",
               "--method", "hevisum-cnn", "--quiet", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown target 'nope'"), proc.stderr
    assert not out.exists() and not out.with_name("ex_bad.partial").exists()


def test_method_that_cannot_be_explained_names_the_ones_that_can(tiny_run):
    proc = cli("explain", str(tiny_run["run"]), str(tiny_run["h5"]), "--out", str(tiny_run["tmp"] / "ex_no"),
               "--method", "colour-ridge", "--quiet", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "encoder-ridge" in lines[0] and "hevisum-cnn" in lines[0] and "--method NAME" in lines[0]
