"""Leave-one-slide-out folds, out-of-fold predictions, rank averaging and leak-free stacking."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from hevisum.config import RunConfig, from_dict
from hevisum.cv import (
    cross_validate_method,
    cross_validate_stacking,
    fit_targets,
    make_folds,
    rank_average,
    select_method,
    spot_ranks,
    stack_inputs,
    summarise,
)
from hevisum.methods import FitContext, load_model
from hevisum.errors import HevisumError
from hevisum.models.baselines import RidgeHead
from hevisum.metrics import mean_spot_spearman


def _spots(n_per_slide: int, slides: list[str], test: list[str] = ()) -> pd.DataFrame:
    rows = []
    for s in [*slides, *test]:
        for i in range(n_per_slide):
            rows.append({"slide": s, "spot_id": str(i), "split": "test" if s in test else "train", "x": 10.0 * i,
                         "y": 5.0, "pitch_px": 10.0})
    return pd.DataFrame(rows)


def _noise_problem(seed: int = 0, n: int = 60, n_feat: int = 400, T: int = 12):
    """Targets that are pure noise and features that let a weak ridge memorise training spots."""
    rng = np.random.default_rng(seed)
    spots = _spots(n, ["A", "B", "C", "D"])
    Y = rng.random((len(spots), T)).astype(np.float32)
    X = rng.normal(size=(len(spots), n_feat)).astype(np.float32)
    return spots, X, Y


def test_folds_hold_out_each_slide_once():
    folds = make_folds(_spots(5, ["A", "B", "C"], test=["T"]))
    assert folds.slide_ids == ["A", "B", "C"]
    assert len(folds.test_rows) == 5
    for s in folds.slide_ids:
        fit, held = folds.split(s)
        assert set(folds.slides[held]) == {s}
        assert s not in set(folds.slides[fit])
        assert not (fit & held).any()


def test_one_training_slide_is_cut_into_spatial_blocks():
    rng = np.random.default_rng(0)
    sp = _spots(200, ["A"], test=["T"])
    sp.loc[:, ["x", "y"]] = rng.uniform(0, 1000, (len(sp), 2))
    folds = make_folds(sp, n_blocks=4)
    assert folds.slide_ids == sorted(folds.slide_ids) and len(folds.slide_ids) == 4
    assert all(s.startswith("A#block") for s in folds.slide_ids)
    xy = sp.loc[folds.train_rows, ["x", "y"]].to_numpy()
    # Blocks are contiguous: each block's spots are closer to their own centre than to others' on average.
    centres = np.array([xy[folds.slides == s].mean(axis=0) for s in folds.slide_ids])
    own = np.linalg.norm(xy - centres[[folds.slide_ids.index(s) for s in folds.slides]], axis=1).mean()
    assert own < 0.6 * np.linalg.norm(xy - xy.mean(axis=0), axis=1).mean()


def test_too_few_spots_on_a_single_slide_is_an_error():
    with pytest.raises(HevisumError, match="too few to cross-validate"):
        make_folds(_spots(5, ["A"], test=["T"]))


def test_rank_average_equals_mean_of_per_spot_ranks():
    rng = np.random.default_rng(1)
    a, b = rng.random((4, 6)), rng.random((4, 6))
    expected = ((rankdata(a, axis=1) - 1) / 5 + (rankdata(b, axis=1) - 1) / 5) / 2
    np.testing.assert_allclose(rank_average([a, b]), expected, rtol=1e-6)
    # Rank averaging never changes a single model's per-spot Spearman.
    assert mean_spot_spearman(spot_ranks(a), b) == pytest.approx(mean_spot_spearman(a, b))


def _cv(name, folds, Y, cfg, X, **kw):
    return cross_validate_method(name, folds, Y, cfg, FitContext(cfg=cfg, Y_fit=Y, Y_raw=Y), features=X, **kw)


def test_every_training_spot_gets_a_prediction_from_the_model_that_never_saw_its_slide(tmp_path):
    spots, X, Y = _noise_problem()
    cfg = from_dict(RunConfig, {"models": {"ridge_alpha": 1e-3}})
    folds = make_folds(spots)
    res = _cv("encoder-ridge", folds, Y, cfg, X, fold_dir=lambda h: tmp_path / h, target_names=list("abcdefghijkl"))
    assert np.isfinite(res.oof).all()
    for held in folds.slide_ids:
        saved = load_model(tmp_path / held)  # each fold model describes itself
        assert held not in saved.train_slides and len(saved.train_slides) == 3
        assert saved.meta["config"]["models"]["ridge_alpha"] == 1e-3 and saved.meta["method"] == "encoder-ridge"
        # Re-predicting the held-out rows with that fold's saved model gives exactly the OOF rows.
        m = folds.slides == held
        rows = folds.train_rows[m]
        pred = saved.method.predict(X[rows], rows=rows, ctx=FitContext(cfg=cfg))
        np.testing.assert_allclose(pred, res.oof[m], rtol=1e-5, atol=1e-6)


def test_resume_reuses_a_saved_fold_model_only_when_what_it_was_fitted_on_matches(tmp_path):
    spots, X, Y = _noise_problem()
    cfg = from_dict(RunConfig, {"models": {"ridge_alpha": 1e-3}})
    folds = make_folds(spots)
    first = _cv("encoder-ridge", folds, Y, cfg, X, fold_dir=lambda h: tmp_path / h)
    reused: list[str] = []
    again = _cv("encoder-ridge", folds, Y, cfg, X, fold_dir=lambda h: tmp_path / h, resume=True,
                on_reuse=reused.append)
    assert reused == folds.slide_ids
    np.testing.assert_array_equal(first.oof, again.oof)
    # other features: the digest differs, every fold is fitted again
    reused.clear()
    _cv("encoder-ridge", folds, Y, cfg, X + 1.0, fold_dir=lambda h: tmp_path / h, resume=True, on_reuse=reused.append)
    assert reused == []


def test_stacking_sees_only_out_of_fold_predictions_and_the_test_catches_a_leak():
    """On pure-noise targets no honest score can exceed chance.

    A ridge with a tiny penalty and more features than spots memorises its training spots. If the
    stacker were fed in-sample predictions (the reference pipeline's leak), its validation would look
    excellent; fed out-of-fold predictions, it must score about zero.
    """
    spots, X, Y = _noise_problem()
    cfg = from_dict(RunConfig, {"models": {"ridge_alpha": 1e-3}})
    folds = make_folds(spots)
    results = [_cv(m, folds, Y, cfg, X) for m in ("mean", "encoder-ridge")]
    Ytr = Y[folds.train_rows]
    honest = cross_validate_stacking(stack_inputs(results), Ytr, folds.slides, np.zeros((0, 0)), cfg, ["a", "b"])
    honest_score = mean_spot_spearman(honest.oof, Ytr)
    assert abs(honest_score) < 0.15, honest_score

    # The leak, built by hand: predictions of a model fitted on all training spots, for those same spots.
    in_sample = RidgeHead(alpha=1e-3).fit(X[folds.train_rows], Ytr).predict(X[folds.train_rows])
    leaky_inputs = np.concatenate([spot_ranks(results[0].oof), spot_ranks(in_sample)], axis=1)
    leaky = cross_validate_stacking(leaky_inputs, Ytr, folds.slides, np.zeros((0, 0)), cfg, ["a", "b"])
    leaky_score = mean_spot_spearman(leaky.oof, Ytr)
    assert leaky_score > 0.6, leaky_score  # the check above would have caught this
    assert leaky_score - honest_score > 0.5


def test_stacking_learns_to_combine_methods_when_there_is_signal():
    rng = np.random.default_rng(3)
    spots = _spots(80, ["A", "B", "C"])
    T = 10
    latent = rng.normal(size=(len(spots), 5))
    Y = (latent @ rng.normal(size=(5, T)) + 0.3 * rng.normal(size=(len(spots), T))).astype(np.float32)
    X = np.concatenate([latent, rng.normal(size=(len(spots), 20))], axis=1).astype(np.float32)
    cfg = RunConfig()
    folds = make_folds(spots)
    results = [_cv(m, folds, Y, cfg, X) for m in ("mean", "encoder-ridge")]
    Ytr = Y[folds.train_rows]
    st = cross_validate_stacking(stack_inputs(results), Ytr, folds.slides, np.zeros((0, 0)), cfg, ["a", "b"])
    assert mean_spot_spearman(st.oof, Ytr) > mean_spot_spearman(results[0].oof, Ytr) + 0.2


def test_fit_targets_rank_space_is_scaled_ranks():
    raw = np.array([[0.1, 0.5, 0.2], [3.0, 1.0, 2.0]], dtype=np.float32)
    ranks = rankdata(raw, axis=1).astype(np.float32)
    cfg = RunConfig()
    np.testing.assert_allclose(fit_targets(raw, ranks, cfg), [[0, 1, 0.5], [1, 0, 0.5]])
    cfg_raw = from_dict(RunConfig, {"train": {"target": "raw"}})
    np.testing.assert_allclose(fit_targets(raw, ranks, cfg_raw), raw)


def test_summary_mse_compares_predictions_with_the_targets_they_were_fitted_to():
    rng = np.random.default_rng(0)
    raw = rng.gamma(1.0, 5.0, (40, 6))  # raw values far from the 0..1 rank scale
    fit = fit_targets(raw, rankdata(raw, axis=1), RunConfig())
    oof = fit + rng.normal(0, 0.1, fit.shape)  # good rank-space predictions
    s = summarise("m", oof, raw, np.array(["a"] * 20 + ["b"] * 20), [f"C{i}" for i in range(6)], fit)
    assert s["cv_mse"] == pytest.approx(float(((oof - fit) ** 2).mean()), rel=1e-6)
    assert s["cv_mse"] < 0.02  # against the raw values it would be about 50
    assert s["cv_spot_spearman"] == pytest.approx(mean_spot_spearman(oof, raw))


def test_summary_fold_scores_come_from_the_same_predictions_as_the_overall_score():
    rng = np.random.default_rng(1)
    raw = rng.random((30, 5))
    oof = raw + rng.normal(0, 0.3, raw.shape)
    groups = np.repeat(["a", "b", "c"], 10)
    s = summarise("m", oof, raw, groups, list("vwxyz"))
    for g in "abc":
        m = groups == g
        assert s["cv_fold_spot_spearman"][g] == pytest.approx(mean_spot_spearman(oof[m], raw[m]))


def _summ(folds: dict[str, float]) -> dict:
    return {"cv_spot_spearman": float(np.mean(list(folds.values()))), "cv_fold_spot_spearman": folds}


def test_selection_never_hands_over_a_model_below_the_baselines():
    s = {"mean": _summ({"a": 0.60, "b": 0.62}), "colour-ridge": _summ({"a": 0.64, "b": 0.66}),
         "encoder-ridge": _summ({"a": 0.61, "b": 0.63})}
    sel = select_method(s, ["mean", "colour-ridge"])
    assert sel.selected == "colour-ridge" and not sel.beats_baselines
    assert sel.warnings and "baseline" in sel.warnings[0]
    s["encoder-ridge"] = _summ({"a": 0.66, "b": 0.67})
    sel = select_method(s, ["mean", "colour-ridge"])
    assert sel.selected == "encoder-ridge" and sel.beats_baselines and not sel.warnings


def test_the_stacker_is_selected_only_beyond_its_fold_to_fold_noise():
    s = {"mean": _summ({"a": 0.5, "b": 0.5, "c": 0.5}), "encoder-ridge": _summ({"a": 0.60, "b": 0.62, "c": 0.64})}
    # higher on average, but one fold lower and the others barely higher: within the noise
    s["stacking"] = _summ({"a": 0.58, "b": 0.64, "c": 0.66})
    assert select_method(s, ["mean"], "stacking").selected == "encoder-ridge"
    # higher on every fold by a steady margin: beyond the noise
    s["stacking"] = _summ({"a": 0.62, "b": 0.64, "c": 0.67})
    sel = select_method(s, ["mean"], "stacking")
    assert sel.selected == "stacking" and sel.stack_margin > sel.stack_noise
