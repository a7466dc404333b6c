"""Leave-one-slide-out cross-validation, out-of-fold predictions, ensembles and leak-free stacking.

Every training spot gets exactly one out-of-fold (OOF) prediction per method: the one from the fold
model that never saw its slide. Stacking is fitted on OOF predictions only, and its own score is
estimated by a second leave-one-slide-out over those OOF rows (nested), so no number we report was
computed on predictions a model made for spots it trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from hevisum.config import FEATURE_METHODS, RunConfig
from hevisum.errors import HevisumError
from hevisum.methods import FittedMethod, build_network, fit_feature_method, predict_feature_method
from hevisum.metrics import mean_spot_spearman, mse, score


@dataclass
class Folds:
    """Leave-one-slide-out folds over the training rows of a tile cache."""

    slides: np.ndarray  # slide id of each training row
    train_rows: np.ndarray  # tile-cache row of each training row
    test_rows: np.ndarray  # tile-cache rows of the test spots (no truth used)

    @property
    def slide_ids(self) -> list[str]:
        """Held-out groups: slides in input order; spatial blocks of one slide in reading order."""
        ids = list(dict.fromkeys(self.slides.tolist()))
        return sorted(ids) if all("#block" in i for i in ids) else ids

    def split(self, held_out: str) -> tuple[np.ndarray, np.ndarray]:
        """Boolean masks over training rows: (fit, held out)."""
        held = self.slides == held_out
        return ~held, held


def make_folds(spots: pd.DataFrame, n_blocks: int = 4, seed: int = 0) -> Folds:
    """Folds from a prepared spots table (columns slide, split, x, y; row order = tile order).

    With two or more training slides: leave one slide out. With a single training slide (one Visium
    section, say) there is no other slide to hold out, so the slide is cut into ``n_blocks`` spatially
    contiguous blocks (k-means on the spot coordinates) and each block is held out in turn; neighbouring
    spots are correlated, so whole blocks, not random spots, keep the estimate honest.
    """
    train = spots.index[spots["split"] == "train"].to_numpy()
    test = spots.index[spots["split"] == "test"].to_numpy()
    slides = spots.loc[train, "slide"].astype(str).to_numpy()
    if len(train) == 0:
        raise HevisumError("no training spots with targets: mark at least one slide as Train (it needs targets)")
    if len(set(slides)) < 2:
        if len(train) < 10 * n_blocks:
            raise HevisumError(
                f"only one training slide ({slides[0]!r}) with {len(train)} spots: too few to cross-validate; "
                f"add training slides or use a slide with at least {10 * n_blocks} spots"
            )
        from sklearn.cluster import KMeans

        xy = spots.loc[train, ["x", "y"]].to_numpy(dtype=np.float64)
        labels = KMeans(n_clusters=n_blocks, n_init=10, random_state=seed).fit_predict(xy)
        # Name blocks in reading order (top to bottom) so fold names are stable and readable.
        order = np.argsort([xy[labels == k, 1].mean() for k in range(n_blocks)])
        rank = np.empty(n_blocks, dtype=int)
        rank[order] = np.arange(n_blocks)
        slides = np.array([f"{slides[0]}#block{rank[k] + 1}" for k in labels])
    return Folds(slides=slides, train_rows=train, test_rows=test)


def spot_ranks(pred: np.ndarray) -> np.ndarray:
    """Per-spot ranks (average for ties) scaled to 0..1: what the per-spot Spearman sees."""
    from scipy.stats import rankdata

    r = rankdata(pred, axis=1)
    return ((r - 1) / max(pred.shape[1] - 1, 1)).astype(np.float32)


def rank_average(preds: list[np.ndarray]) -> np.ndarray:
    """Rank-average ensemble: the mean of each model's per-spot ranks."""
    return np.mean([spot_ranks(p) for p in preds], axis=0).astype(np.float32)


@dataclass
class MethodCV:
    """One method's cross-validation: OOF predictions, test predictions per fold, fold scores, models."""

    name: str
    oof: np.ndarray  # (n_train_rows, T), aligned with Folds.train_rows
    test_folds: list[np.ndarray]  # per fold (n_test_rows, T)
    fold_scores: dict[str, float]  # held-out slide -> mean per-spot Spearman
    models: list[FittedMethod] = field(default_factory=list)

    @property
    def test_ensemble(self) -> np.ndarray:
        return rank_average(self.test_folds) if self.test_folds else np.zeros((0, self.oof.shape[1]), np.float32)


def fit_targets(raw: np.ndarray, ranks: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """What the models are fitted to: per-spot ranks scaled 0..1 (default) or the raw values."""
    from hevisum.training import scale_rank_targets

    return scale_rank_targets(ranks) if cfg.train.target == "rank" else raw.astype(np.float32)


def inner_validation(n: int, seed: int, frac: float = 0.15) -> np.ndarray:
    """Boolean mask of the rows held back for early stopping inside a fold (never the held-out slide)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=max(1, int(round(frac * n))), replace=False)] = True
    return mask


def cross_validate_method(name: str, folds: Folds, Y_fit: np.ndarray, Y_raw: np.ndarray, cfg: RunConfig, *,
                          features: np.ndarray | None = None, tiles: np.ndarray | None = None,
                          extra: np.ndarray | None = None, device: str = "cpu", progress: bool = False,
                          seed: int = 0) -> MethodCV:
    """Leave-one-slide-out for one method.

    ``Y_fit`` and ``Y_raw`` are indexed by tile-cache row; ``features`` likewise (feature methods).
    Fold scores compare OOF predictions with the raw targets (the competition metric).
    """
    T = Y_fit.shape[1]
    oof = np.full((len(folds.train_rows), T), np.nan, dtype=np.float32)
    test_folds: list[np.ndarray] = []
    scores: dict[str, float] = {}
    models: list[FittedMethod] = []
    for k, held in enumerate(folds.slide_ids):
        fit_mask, held_mask = folds.split(held)
        fit_rows, held_rows = folds.train_rows[fit_mask], folds.train_rows[held_mask]
        train_slides = sorted(set(folds.slides[fit_mask].tolist()))
        fold_seed = seed + 1000 * k
        if name in FEATURE_METHODS:
            X = features
            fm = fit_feature_method(name, None if X is None else X[fit_rows], Y_fit[fit_rows], train_slides, cfg,
                                    fold_seed, groups=folds.slides[fit_mask])
            oof[held_mask] = predict_feature_method(fm, None if X is None else X[held_rows], len(held_rows))
            if len(folds.test_rows):
                test_folds.append(predict_feature_method(fm, None if X is None else X[folds.test_rows],
                                                         len(folds.test_rows)))
        else:
            from hevisum.training import predict_tiles, train_tile_model

            val_mask = inner_validation(len(fit_rows), fold_seed)
            net = build_network(name, T)
            res = train_tile_model(net, tiles, fit_rows[~val_mask], fit_rows[val_mask], Y_fit,
                                   Y_raw[fit_rows[val_mask]], cfg.train, seed=fold_seed, device=device, extra=extra,
                                   progress=progress, desc=f"{name} fold {held}")
            fm = FittedMethod(name, train_slides,
                              {"best_epoch": res.best_epoch, "inner_val_spearman": res.best_score,
                               "seconds": res.seconds},
                              {k2: v.float().numpy() if v.is_floating_point() else v.numpy()
                               for k2, v in res.state_dict.items()}, log=res.log)
            kw = dict(batch_size=64, device=device, precision=cfg.train.precision, tta=cfg.train.tta, extra=extra)
            oof[held_mask] = predict_tiles(net, tiles, held_rows, **kw)
            if len(folds.test_rows):
                test_folds.append(predict_tiles(net, tiles, folds.test_rows, **kw))
        scores[held] = mean_spot_spearman(oof[held_mask], Y_raw[held_rows])
        models.append(fm)
    return MethodCV(name=name, oof=oof, test_folds=test_folds, fold_scores=scores, models=models)


# ---------------------------------------------------------------- stacking


def stack_inputs(results: list[MethodCV]) -> np.ndarray:
    """Stacker inputs for training spots: each method's OOF per-spot ranks, side by side."""
    return np.concatenate([spot_ranks(r.oof) for r in results], axis=1)


def stack_test_inputs(results: list[MethodCV]) -> np.ndarray:
    """Stacker inputs for test spots: each method's rank-average over fold models, side by side."""
    return np.concatenate([r.test_ensemble for r in results], axis=1)


def _fit_stacker(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, kind: str, seed: int):
    from hevisum.models.stacking import fit_stacker

    return fit_stacker(X, Y, groups=groups, seed=seed, kind=kind)


@dataclass
class StackCV:
    oof: np.ndarray  # nested out-of-fold stacked predictions for the training rows
    fold_scores: dict[str, float]
    final: object  # stacker fitted on all OOF rows
    test: np.ndarray  # its predictions for the test rows


def cross_validate_stacking(X_oof: np.ndarray, Y_fit_train: np.ndarray, Y_raw_train: np.ndarray,
                            slides: np.ndarray, X_test: np.ndarray, kind: str = "ridge", seed: int = 0) -> StackCV:
    """Nested leave-one-slide-out over OOF rows: the stacker that scores slide s never saw s's rows.

    ``X_oof`` must be out-of-fold predictions (see :func:`stack_inputs`); feeding it in-sample
    predictions is exactly the reference's leak, and this score would then be optimistic.
    """
    oof = np.full_like(Y_fit_train, np.nan, dtype=np.float32)
    scores: dict[str, float] = {}
    for held in dict.fromkeys(slides.tolist()):
        m = slides == held
        st = _fit_stacker(X_oof[~m], Y_fit_train[~m], slides[~m], kind, seed)
        oof[m] = st.predict(X_oof[m])
        scores[held] = mean_spot_spearman(oof[m], Y_raw_train[m])
    final = _fit_stacker(X_oof, Y_fit_train, slides, kind, seed)
    test = final.predict(X_test) if len(X_test) else np.zeros((0, Y_fit_train.shape[1]), np.float32)
    return StackCV(oof=oof, fold_scores=scores, final=final, test=np.asarray(test, dtype=np.float32))


def summarise(name: str, oof: np.ndarray, Y_raw_train: np.ndarray, fold_scores: dict[str, float],
              target_names: list[str], Y_fit_train: np.ndarray | None = None) -> dict:
    """Metrics of one method over all OOF rows plus its per-fold scores.

    Correlations are against the raw targets (ranks are all they see). ``cv_mse`` compares like with like: the
    predictions with the targets the models were fitted to (``Y_fit_train``: per-spot ranks scaled 0..1 by
    default), not rank-space predictions with raw values.
    """
    s = score(oof, Y_raw_train, target_names)
    s["mse"] = mse(oof, Y_raw_train if Y_fit_train is None else Y_fit_train)
    return {"method": name, "cv_spot_spearman": s["spot_spearman"],
            "cv_fold_spot_spearman": {k: float(v) for k, v in fold_scores.items()},
            "cv_fold_mean": float(np.nanmean(list(fold_scores.values()))),
            "cv_target_pearson_mean": s["target_pearson_mean"], "cv_target_spearman_mean": s["target_spearman_mean"],
            "cv_mse": s["mse"], "cv": s}
