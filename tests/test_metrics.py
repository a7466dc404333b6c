"""Metrics checked against scipy on hand-made and random data, plus the table join, files and CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from hevisum.errors import HevisumError
from hevisum.metrics import (
    evaluate_files,
    evaluate_frames,
    mean_spot_spearman,
    mse,
    per_spot_spearman,
    per_target_pearson,
    per_target_spearman,
    score,
)

REPO = Path(__file__).resolve().parents[1]


def _scipy_spot(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Reference: scipy.stats.spearmanr row by row (NaN for constant rows, its warning silenced)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p, t in zip(pred, truth):
            out.append(stats.spearmanr(p, t).statistic)
    return np.array(out, dtype=float)


def _frame(values: np.ndarray, slides: list[str], ids: list[object], names: list[str] | None = None) -> pd.DataFrame:
    names = names or [f"C{j + 1}" for j in range(values.shape[1])]
    df = pd.DataFrame(values, columns=names)
    df.insert(0, "ID", ids)
    df.insert(0, "slide", slides)
    return df


def _two_slide_data(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    n, k = 30, 6
    truth = rng.random((n, k))
    pred = truth + 0.3 * rng.standard_normal((n, k))
    slides = ["A"] * 12 + ["B"] * 18
    ids = list(range(12)) + list(range(18))  # IDs repeat across slides: the join must use both keys
    return _frame(pred, slides, ids), _frame(truth, slides, ids)


# ---- pure functions ---------------------------------------------------------------------------


def test_perfect_prediction_scores_one() -> None:
    rng = np.random.default_rng(1)
    t = rng.random((20, 7))
    assert np.allclose(per_spot_spearman(t, t), 1.0)
    assert mean_spot_spearman(t, t) == pytest.approx(1.0)
    # A monotone transform keeps ranks, so Spearman stays 1 while Pearson does not need to.
    assert mean_spot_spearman(np.exp(5 * t), t) == pytest.approx(1.0)
    assert mse(t, t) == 0.0


def test_reversed_prediction_scores_minus_one() -> None:
    t = np.tile(np.arange(6, dtype=float), (4, 1))
    assert np.allclose(per_spot_spearman(-t, t), -1.0)
    assert mean_spot_spearman(t[:, ::-1], t) == pytest.approx(-1.0)


def test_ties_match_scipy_row_by_row() -> None:
    pred = np.array([
        [0.1, 0.1, 0.3, 0.2, 0.2],
        [1.0, 2.0, 2.0, 2.0, 0.0],
        [5.0, 4.0, 3.0, 3.0, 3.0],
    ])
    truth = np.array([
        [0.0, 0.2, 0.2, 0.1, 0.4],
        [3.0, 3.0, 1.0, 2.0, 2.0],
        [1.0, 1.0, 2.0, 2.0, 0.5],
    ])
    ours = per_spot_spearman(pred, truth)
    ref = _scipy_spot(pred, truth)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    assert mean_spot_spearman(pred, truth) == pytest.approx(ref.mean(), abs=1e-12)


def test_random_data_matches_scipy_loops() -> None:
    rng = np.random.default_rng(2)
    n, k = 50, 12
    truth = rng.random((n, k))
    pred = truth + rng.standard_normal((n, k))
    pred[:, 3] = np.round(pred[:, 3], 1)  # some ties across spots too

    np.testing.assert_allclose(per_spot_spearman(pred, truth), _scipy_spot(pred, truth), atol=1e-12)
    ref_ts = [stats.spearmanr(pred[:, j], truth[:, j]).statistic for j in range(k)]
    ref_tp = [stats.pearsonr(pred[:, j], truth[:, j]).statistic for j in range(k)]
    np.testing.assert_allclose(per_target_spearman(pred, truth), ref_ts, atol=1e-12)
    np.testing.assert_allclose(per_target_pearson(pred, truth), ref_tp, atol=1e-12)
    assert mse(pred, truth) == pytest.approx(np.mean((pred - truth) ** 2))


def test_constant_row_is_undefined_and_excluded() -> None:
    rng = np.random.default_rng(3)
    truth = rng.random((5, 4))
    pred = truth.copy()
    pred[1] = 0.7  # constant prediction for spot 1
    truth[3] = 0.1 + 0.2  # constant truth for spot 3 (a value whose float mean is not exact)
    r = per_spot_spearman(pred, truth)
    assert np.isnan(r[1]) and np.isnan(r[3])
    assert np.isnan(_scipy_spot(pred, truth)[[1, 3]]).all()
    assert mean_spot_spearman(pred, truth) == pytest.approx(1.0)  # mean over the 3 defined spots
    s = score(pred, truth)
    assert s["n_undefined"] == 2 and s["n_spots"] == 5 and s["spot_spearman"] == pytest.approx(1.0)


def test_all_rows_undefined_gives_none() -> None:
    t = np.ones((3, 4))
    assert math.isnan(mean_spot_spearman(t, t))
    s = score(t, t)
    assert s["spot_spearman"] is None and s["n_undefined"] == 3
    assert s["target_spearman_mean"] is None and s["n_undefined_targets"] == 4
    json.dumps(s, allow_nan=False)


def test_constant_column_gives_nan_per_target() -> None:
    rng = np.random.default_rng(4)
    truth = rng.random((10, 3))
    truth[:, 1] = 0.3
    pred = truth + 0.01 * rng.random((10, 3))
    assert np.isnan(per_target_spearman(pred, truth)[1])
    assert np.isnan(per_target_pearson(pred, truth)[1])
    s = score(pred, truth, ["a", "b", "c"])
    assert s["per_target"]["b"] == {"spearman": None, "pearson": None}
    assert s["n_undefined_targets"] == 1
    assert s["target_pearson_mean"] == pytest.approx(np.mean(per_target_pearson(pred, truth)[[0, 2]]))


def test_score_is_plain_json() -> None:
    rng = np.random.default_rng(5)
    t = rng.random((8, 3))
    s = score(t + 0.1 * rng.random((8, 3)), t, ["x", "y", "z"])
    assert set(s) >= {"n_spots", "spot_spearman", "n_undefined", "target_spearman_mean", "target_pearson_mean",
                      "mse", "per_target"}
    assert list(s["per_target"]) == ["x", "y", "z"]
    assert type(s["spot_spearman"]) is float and type(s["n_spots"]) is int
    assert json.loads(json.dumps(s, allow_nan=False)) == s


def test_shape_mismatch_and_nan_input_raise() -> None:
    with pytest.raises(HevisumError, match="shape"):
        per_spot_spearman(np.zeros((3, 4)), np.zeros((3, 5)))
    bad = np.ones((2, 3))
    bad[1, 2] = np.nan
    with pytest.raises(HevisumError, match="pred.*non-finite.*spot 1, target 2"):
        mse(bad, np.ones((2, 3)))
    with pytest.raises(HevisumError, match="3 target names"):
        score(np.eye(4), np.eye(4), ["a", "b", "c"])


# ---- frames ---------------------------------------------------------------------------------


def test_evaluate_frames_joins_on_slide_and_id_not_row_order() -> None:
    pred, truth = _two_slide_data()
    shuffled = pred.sample(frac=1.0, random_state=0).reset_index(drop=True)
    assert not shuffled["ID"].equals(pred["ID"])
    res = evaluate_frames(shuffled, truth)
    ref = evaluate_frames(pred, truth)
    assert res == ref

    p = pred.iloc[:, 2:].to_numpy()
    t = truth.iloc[:, 2:].to_numpy()
    assert res["overall"]["spot_spearman"] == pytest.approx(_scipy_spot(p, t).mean(), abs=1e-12)
    assert list(res["per_slide"]) == ["A", "B"]
    assert res["per_slide"]["A"]["n_spots"] == 12
    assert res["per_slide"]["B"]["spot_spearman"] == pytest.approx(_scipy_spot(p[12:], t[12:]).mean(), abs=1e-12)
    assert res["n_extra_predictions"] == 0


def test_target_columns_matched_by_name_and_extra_rows_counted() -> None:
    pred, truth = _two_slide_data()
    ref = evaluate_frames(pred, truth)
    reordered = pred[["slide", "ID"] + [f"C{j}" for j in (6, 2, 4, 1, 5, 3)]]
    extra = pd.DataFrame({"slide": ["C"], "ID": [0], **{f"C{j}": [0.5] for j in range(1, 7)}})
    res = evaluate_frames(pd.concat([reordered, extra], ignore_index=True), truth)
    assert res["overall"] == ref["overall"]
    assert res["n_extra_predictions"] == 1


def test_ids_join_across_int_and_string_types() -> None:
    pred, truth = _two_slide_data()
    truth = truth.assign(ID=truth["ID"].astype(str))
    assert evaluate_frames(pred, truth)["overall"]["n_spots"] == 30


def test_no_slide_column_means_one_slide() -> None:
    pred, truth = _two_slide_data()
    pred, truth = pred[pred.slide == "A"].drop(columns="slide"), truth[truth.slide == "A"].drop(columns="slide")
    res = evaluate_frames(pred, truth)
    assert list(res["per_slide"]) == [""]
    assert res["overall"] == res["per_slide"][""]


def test_submission_without_slide_against_single_slide_truth() -> None:
    pred, truth = _two_slide_data()
    pa, ta = pred[pred.slide == "A"], truth[truth.slide == "A"]
    res = evaluate_frames(pa.drop(columns="slide"), ta)
    assert res["overall"] == evaluate_frames(pa, ta)["overall"]
    with pytest.raises(HevisumError, match=r"P\.csv has no 'slide' column but T\.csv covers 2 slides"):
        evaluate_frames(pred.drop(columns="slide"), truth, names=("P.csv", "T.csv"))


def test_missing_spot_raises_naming_count_and_first() -> None:
    pred, truth = _two_slide_data()
    pred = pred.drop(index=[13, 20])  # slide B, IDs 1 and 8
    with pytest.raises(HevisumError, match=r"P\.csv has no prediction for 2 of 30 .*slide 'B', ID '1'"):
        evaluate_frames(pred, truth, names=("P.csv", "T.csv"))


def test_missing_column_raises_naming_file() -> None:
    pred, truth = _two_slide_data()
    with pytest.raises(HevisumError, match=r"^P\.csv has no 'ID' column"):
        evaluate_frames(pred.drop(columns="ID"), truth, names=("P.csv", "T.csv"))
    with pytest.raises(HevisumError, match=r"P\.csv lacks 1 target column\(s\) of T\.csv: C4"):
        evaluate_frames(pred.drop(columns="C4"), truth, names=("P.csv", "T.csv"))


def test_extra_target_column_raises_naming_it() -> None:
    pred, truth = _two_slide_data()
    with pytest.raises(HevisumError, match=r"P\.csv has 1 column\(s\) not in T\.csv: C99"):
        evaluate_frames(pred.assign(C99=0.0), truth, names=("P.csv", "T.csv"))


@pytest.mark.parametrize("which", ["pred", "truth"])
def test_duplicate_rows_raise(which: str) -> None:
    pred, truth = _two_slide_data()
    frames = {"pred": pred, "truth": truth}
    frames[which] = pd.concat([frames[which], frames[which].iloc[[15]]], ignore_index=True)
    with pytest.raises(HevisumError, match=rf"^{which} has duplicate \(slide, ID\) rows: 1 pair.*slide 'B', ID '3'"):
        evaluate_frames(frames["pred"], frames["truth"])


def test_non_numeric_and_non_finite_predictions_raise() -> None:
    pred, truth = _two_slide_data()
    bad = pred.astype({"C3": object})
    bad.loc[5, "C3"] = "abc"
    with pytest.raises(HevisumError, match=r"^pred: column 'C3' row 6 \(slide 'A', ID '5'\) is 'abc'"):
        evaluate_frames(bad, truth)
    bad = pred.copy()
    bad.loc[20, "C2"] = np.inf
    bad.loc[25, "C1"] = np.nan
    with pytest.raises(HevisumError, match=r"column 'C2' row 21 .*2 cell\(s\) are not finite"):
        evaluate_frames(bad, truth)


# ---- files and CLI ------------------------------------------------------------------------------


def _write_pair(tmp_path: Path) -> tuple[Path, Path, float]:
    pred, truth = _two_slide_data(seed=7)
    p, t = tmp_path / "pred.csv", tmp_path / "truth.csv"
    pred.sample(frac=1.0, random_state=1).to_csv(p, index=False)
    truth.to_csv(t, index=False)
    expected = _scipy_spot(pred.iloc[:, 2:].to_numpy(), truth.iloc[:, 2:].to_numpy()).mean()
    return p, t, float(expected)


def test_evaluate_files_end_to_end(tmp_path: Path) -> None:
    p, t, expected = _write_pair(tmp_path)
    res = evaluate_files(p, t)
    assert res["pred"] == str(p) and res["truth"] == str(t)
    assert res["overall"]["spot_spearman"] == pytest.approx(expected, abs=1e-9)
    assert set(res["per_slide"]) == {"A", "B"}


def test_evaluate_files_missing_or_empty_file(tmp_path: Path) -> None:
    p, t, _ = _write_pair(tmp_path)
    with pytest.raises(HevisumError, match=r"prediction file not found: .*nope\.csv"):
        evaluate_files(tmp_path / "nope.csv", t)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(HevisumError, match=r"truth file is empty: .*empty\.csv"):
        evaluate_files(p, empty)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "hevisum.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_cli_evaluate_prints_json(tmp_path: Path) -> None:
    p, t, expected = _write_pair(tmp_path)
    out = _cli("evaluate", "--pred", str(p), "--truth", str(t))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["overall"]["spot_spearman"] == pytest.approx(expected, abs=1e-9)


def test_cli_evaluate_missing_file_is_one_line_error(tmp_path: Path) -> None:
    _, t, _ = _write_pair(tmp_path)
    out = _cli("evaluate", "--pred", str(tmp_path / "missing.csv"), "--truth", str(t))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing.csv" in lines[0]
    assert "Traceback" not in out.stderr


# ---- real data --------------------------------------------------------------------------------------


@pytest.mark.shared
def test_her2st_truth_against_itself_and_mean_profile(shared_data: Path) -> None:
    path = shared_data / "challenge" / "her2st_test_truth.csv"
    if not path.is_file():
        pytest.skip(f"{path} not found (the her2st challenge truth is needed for this test)")
    res = evaluate_files(path, path)
    overall = res["overall"]
    assert overall["n_spots"] > 0 and res["n_extra_predictions"] == 0
    assert overall["n_undefined"] < overall["n_spots"]
    assert overall["spot_spearman"] == pytest.approx(1.0)
    assert overall["mse"] == 0.0

    # A 'mean profile' prediction: every spot gets the column means of the truth.
    truth = pd.read_csv(path, dtype={"slide": str, "ID": str})
    targets = [c for c in truth.columns if c not in ("slide", "ID")]
    mean_pred = truth.copy()
    mean_pred[targets] = np.broadcast_to(truth[targets].mean().to_numpy(), (len(truth), len(targets)))
    res = evaluate_frames(mean_pred, truth)
    s = res["overall"]["spot_spearman"]
    assert s is not None and math.isfinite(s) and s < 1.0
    ref = _scipy_spot(mean_pred[targets].to_numpy(), truth[targets].to_numpy())
    assert s == pytest.approx(np.nanmean(ref), abs=1e-9)
    # Constant prediction columns: every per-target correlation is undefined.
    assert res["overall"]["target_spearman_mean"] is None
