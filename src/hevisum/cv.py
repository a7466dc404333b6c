"""Leave-one-slide-out cross-validation, out-of-fold predictions, ensembles and leak-free stacking.

Every training spot gets exactly one out-of-fold (OOF) prediction per method: the one from the fold
model that never saw its slide. Stacking is fitted on OOF predictions only, and its own score is
estimated by a second leave-one-slide-out over those OOF rows (nested), so no number we report was
computed on predictions a model made for spots it trained on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd

from hevisum.config import RunConfig
from hevisum.errors import HevisumError
from hevisum.methods import FitContext, Method, get_method, stacker_name
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
    """Folds from a prepared spots table (columns slide, split, x, y, optional group; row order = tile order).

    When a ``group`` column (a patient, say) puts several training slides in one group and there are at least two
    groups: leave one group out. Else with two or more training slides: leave one slide out. With a single training slide (one Visium
    section, say) there is no other slide to hold out, so the slide is cut into ``n_blocks`` spatially
    contiguous blocks (k-means on the spot coordinates) and each block is held out in turn; neighbouring
    spots are correlated, so whole blocks, not random spots, keep the estimate honest.
    """
    train = spots.index[spots["split"] == "train"].to_numpy()
    test = spots.index[spots["split"] == "test"].to_numpy()
    slides = spots.loc[train, "slide"].astype(str).to_numpy()
    if "group" in spots:
        groups = spots.loc[train, "group"].astype(str).to_numpy()
        pairs = set(zip(slides.tolist(), groups.tolist()))
        # groups (patients) with several slides: hold out whole groups, so no patient is in both sides of a fold
        if len(set(groups.tolist())) >= 2 and len(pairs) > len(set(groups.tolist())):
            return Folds(slides=groups, train_rows=train, test_rows=test)
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
    """One method's cross-validation: OOF predictions, test predictions per fold model, the fold models."""

    name: str
    oof: np.ndarray  # (n_train_rows, T), aligned with Folds.train_rows
    test_folds: list[np.ndarray]  # per fold (n_test_rows, T)
    models: list = field(default_factory=list)  # fitted Method per fold, in Folds.slide_ids order

    @property
    def test_ensemble(self) -> np.ndarray:
        return rank_average(self.test_folds) if self.test_folds else np.zeros((0, self.oof.shape[1]), np.float32)


def fit_targets(raw: np.ndarray, ranks: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """What the models are fitted to: per-spot ranks scaled 0..1 (default) or the raw values."""
    from hevisum.training import scale_rank_targets

    return scale_rank_targets(ranks) if cfg.train.target == "rank" else raw.astype(np.float32)


def cross_validate_method(name: str, folds: Folds, Y_fit: np.ndarray, cfg: RunConfig, ctx: FitContext,
                          features: np.ndarray | None = None, fold_dir=None, target_names: list[str] | None = None,
                          resume: bool = False, on_reuse=None) -> MethodCV:
    """Leave-one-slide-out for one registered method.

    ``Y_fit`` and ``features`` are indexed by tile-cache row (``ctx`` carries the tiles and raw targets that
    tile methods need). Each fold's model is fitted on the other slides and predicts the held-out slide (its
    out-of-fold rows) and every test spot. With ``fold_dir(held) -> folder`` every fold model is saved as soon as
    it is fitted, with a digest of what it was fitted on (config, rows, targets, features); with ``resume`` a
    saved fold model whose digest matches is loaded instead of fitted again.

    Under torchrun, when :func:`hevisum.distributed.spread_folds` says so, the folds are spread over the ranks
    (:func:`hevisum.distributed.assign_folds`, weighted by training rows): each rank fits its folds alone, exactly
    as one process would (same per-fold seed, no DDP), then the predictions are gathered on every rank and the
    fitted models on rank 0, which saves every fold model. ``models`` then holds, on a rank other than 0, None for
    the folds fitted elsewhere.
    """
    from hevisum import distributed

    T = Y_fit.shape[1]
    oof = np.full((len(folds.train_rows), T), np.nan, dtype=np.float32)
    ids = folds.slide_ids
    spread = distributed.spread_folds(len(ids))
    owner = (distributed.assign_folds([int(np.sum(folds.slides != h)) for h in ids], distributed.world())
             if spread else [distributed.rank()] * len(ids))
    me = distributed.rank()
    test_folds: list = [None] * len(ids)
    models: list = [None] * len(ids)
    mine = []  # spread: what this rank sends (fold index, OOF, test predictions, model state for rank 0)
    for k, held in enumerate(ids):
        if owner[k] != me:
            continue
        if spread:
            distributed.fault_point("fold")  # outside local(): rank() is the real rank here
        with distributed.local() if spread else contextlib.nullcontext():
            m, held_pred, test_pred = _fold(name, k, held, folds, Y_fit, cfg, ctx, features, fold_dir, target_names,
                                            resume, on_reuse, save=not spread or me == 0)
        oof[folds.split(held)[1]], test_folds[k], models[k] = held_pred, test_pred, m
        if spread:
            state = None if me == 0 else (dict(m.params), dict(m.tensors), m.log)
            mine.append((k, held_pred, test_pred, state))
    if spread:
        for got in distributed.all_gather_object(mine):
            for k, held_pred, test_pred, state in got:
                if owner[k] == me:
                    continue
                oof[folds.split(ids[k])[1]], test_folds[k] = held_pred, test_pred
                if me == 0:  # rank 0 writes the fold models the other ranks fitted, as one process would
                    models[k] = _restored(name, cfg, state)
                    if fold_dir is not None:
                        _save_fold(models[k], fold_dir(ids[k]), folds, ids[k], target_names,
                                   _fold_digest(name, cfg, *_fold_data(folds, ids[k], k, Y_fit, features, ctx)))
    return MethodCV(name=name, oof=oof, test_folds=test_folds if len(folds.test_rows) else [], models=models)


def _fold_data(folds: Folds, held: str, k: int, Y_fit: np.ndarray, features: np.ndarray | None,
               ctx: FitContext) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """What fold ``k`` (holding out ``held``) is fitted on: its training rows, their targets and features, seed."""
    fit_rows = folds.train_rows[folds.split(held)[0]]
    return fit_rows, Y_fit[fit_rows], None if features is None else features[fit_rows], ctx.seed + 1000 * k


def _fold(name: str, k: int, held: str, folds: Folds, Y_fit: np.ndarray, cfg: RunConfig, ctx: FitContext,
          features: np.ndarray | None, fold_dir, target_names: list[str] | None, resume: bool, on_reuse,
          save: bool = True) -> tuple[Method, np.ndarray, np.ndarray | None]:
    """Fit (or, with ``resume``, reload) fold ``k``'s model; its predictions of the held-out and the test rows.
    ``save``: write the model to ``fold_dir(held)`` (and keep a per-epoch checkpoint beside it while training)."""
    from hevisum.methods import load_model

    fit_mask, held_mask = folds.split(held)
    fit_rows, Y_rows, X_fit, seed = _fold_data(folds, held, k, Y_fit, features, ctx)
    held_rows = folds.train_rows[held_mask]
    fctx = replace(ctx, seed=seed, desc=f"{name} fold {held}")
    folder = fold_dir(held) if fold_dir is not None and save else None
    digest = _fold_digest(name, cfg, fit_rows, Y_rows, X_fit, seed)
    m = None
    if resume and folder is not None and (folder / "model.json").is_file():
        try:
            loaded = load_model(folder)
            if loaded.meta.get("digest") == digest:
                m = loaded.method
                if on_reuse is not None:
                    on_reuse(held)
        except HevisumError:
            m = None
    if m is None:
        if folder is not None:
            # a network's per-epoch state, named by what it is fitted on: a resumed run continues it
            fctx = replace(fctx, checkpoint=folder.parent / f".{folder.name}.{digest[:16]}.ckpt")
        m = get_method(name)(cfg).fit(X_fit, Y_rows, rows=fit_rows, groups=folds.slides[fit_mask], ctx=fctx)
        if folder is not None:
            _save_fold(m, folder, folds, held, target_names, digest)
    held_pred = m.predict(None if features is None else features[held_rows], rows=held_rows, ctx=fctx)
    test_pred = (m.predict(None if features is None else features[folds.test_rows], rows=folds.test_rows, ctx=fctx)
                 if len(folds.test_rows) else None)
    return m, held_pred, test_pred


def _save_fold(m: Method, folder, folds: Folds, held: str, target_names: list[str] | None, digest: str) -> None:
    """Save a fold model (with the slides it was fitted on) and drop its per-epoch checkpoints."""
    m.save(folder, train_slides=sorted(set(folds.slides[folds.split(held)[0]].tolist())),
           target_names=list(target_names or []), digest=digest)
    for stale in folder.parent.glob(f".{folder.name}.*.ckpt"):
        stale.unlink()


def _restored(name: str, cfg: RunConfig, state: tuple) -> Method:
    """A fold model fitted on another rank, rebuilt from its (params, tensors, log)."""
    params, tensors, log = state
    m = get_method(name)(cfg)
    m.params, m.tensors, m.log = dict(params), dict(tensors), log
    m.restore()
    return m


def _fold_digest(name: str, cfg: RunConfig, rows: np.ndarray, Y: np.ndarray, X: np.ndarray | None, seed: int) -> str:
    """What a fold model depends on: method, configuration, training rows, their targets and features, seed."""
    import hashlib
    import json

    from hevisum.config import to_dict

    h = hashlib.sha1(json.dumps({"method": name, "config": to_dict(cfg), "seed": seed}, sort_keys=True,
                                default=str).encode())
    for a in (rows, Y, X):
        if a is not None:
            h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def fold_scores(oof: np.ndarray, Y_raw_train: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """Mean per-spot Spearman of the OOF predictions on each held-out slide (or block)."""
    return {g: mean_spot_spearman(oof[groups == g], Y_raw_train[groups == g]) for g in dict.fromkeys(groups.tolist())}


# ---------------------------------------------------------------- stacking


def stack_inputs(results: list[MethodCV]) -> np.ndarray:
    """Stacker inputs for training spots: each method's OOF per-spot ranks, side by side."""
    return np.concatenate([spot_ranks(r.oof) for r in results], axis=1)


def stack_test_inputs(results: list[MethodCV]) -> np.ndarray:
    """Stacker inputs for test spots: each method's rank-average over fold models, side by side."""
    return np.concatenate([r.test_ensemble for r in results], axis=1)


@dataclass
class StackCV:
    oof: np.ndarray  # nested out-of-fold stacked predictions for the training rows
    final: Method  # stacker fitted on all OOF rows
    test: np.ndarray  # its predictions for the test rows


def cross_validate_stacking(X_oof: np.ndarray, Y_fit_train: np.ndarray, slides: np.ndarray, X_test: np.ndarray,
                            cfg: RunConfig, methods: list[str], seed: int = 0) -> StackCV:
    """Nested leave-one-slide-out over OOF rows: the stacker that scores slide s never saw s's rows.

    ``X_oof`` must be out-of-fold predictions (see :func:`stack_inputs`); feeding it in-sample
    predictions is exactly the reference's leak, and this score would then be optimistic.
    """
    cls = get_method(stacker_name())
    ctx = FitContext(cfg=cfg, seed=seed)

    def fit(rows_mask):
        st = cls(cfg)
        st.params = {"methods": list(methods)}
        rows = np.flatnonzero(rows_mask)
        return st.fit(X_oof[rows_mask], Y_fit_train[rows_mask], rows=rows, groups=slides[rows_mask], ctx=ctx)

    oof = np.full_like(Y_fit_train, np.nan, dtype=np.float32)
    for held in dict.fromkeys(slides.tolist()):
        m = slides == held
        oof[m] = fit(~m).predict(X_oof[m], rows=np.flatnonzero(m), ctx=ctx)
    final = fit(np.ones(len(slides), dtype=bool))
    test = (final.predict(X_test, rows=np.arange(len(X_test)), ctx=ctx) if len(X_test)
            else np.zeros((0, Y_fit_train.shape[1]), np.float32))
    return StackCV(oof=oof, final=final, test=np.asarray(test, dtype=np.float32))


def summarise(name: str, oof: np.ndarray, Y_raw_train: np.ndarray, groups: np.ndarray, target_names: list[str],
              Y_fit_train: np.ndarray | None = None) -> dict:
    """Metrics of one method over all OOF rows and per held-out slide, from the same predictions.

    Correlations are against the raw targets (ranks are all they see). ``cv_mse`` compares like with like: the
    predictions with the targets the models were fitted to (``Y_fit_train``: per-spot ranks scaled 0..1 by
    default), not rank-space predictions with raw values.
    """
    s = score(oof, Y_raw_train, target_names)
    s["mse"] = mse(oof, Y_raw_train if Y_fit_train is None else Y_fit_train)
    folds_ = fold_scores(oof, Y_raw_train, groups)
    return {"method": name, "cv_spot_spearman": s["spot_spearman"],
            "cv_fold_spot_spearman": {k: float(v) for k, v in folds_.items()},
            "cv_fold_mean": float(np.nanmean(list(folds_.values()))),
            "cv_target_pearson_mean": s["target_pearson_mean"], "cv_target_spearman_mean": s["target_spearman_mean"],
            "cv_mse": s["mse"], "cv": s}


@dataclass
class Selection:
    """The method a run hands the user, and why."""

    selected: str
    best_single: str
    best_baseline: str
    beats_baselines: bool
    stack_margin: float | None = None  # mean paired fold difference stacker - best single
    stack_noise: float | None = None  # its standard error over folds
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def select_method(summaries: dict[str, dict], baselines: list[str], stacker: str | None = None) -> Selection:
    """Choose by cross-validation only, never by test truth.

    Every single method, the baselines included, is a candidate, so a user never gets a model whose CV is below
    ``mean`` or ``colour-ridge``. The stacker is chosen only when its nested CV beats the best single method by
    more than the fold-to-fold noise: the mean paired per-fold difference must exceed its standard error.
    """
    singles = [k for k in summaries if k != stacker]
    best_single = max(singles, key=lambda k: _nan_low(summaries[k]["cv_spot_spearman"]))
    present = [b for b in baselines if b in summaries]
    best_base = max(present, key=lambda k: _nan_low(summaries[k]["cv_spot_spearman"])) if present else best_single
    sel = Selection(selected=best_single, best_single=best_single, best_baseline=best_base,
                    beats_baselines=best_single not in present)
    if stacker and stacker in summaries:
        a = summaries[stacker]["cv_fold_spot_spearman"]
        b = summaries[best_single]["cv_fold_spot_spearman"]
        d = np.array([a[k] - b[k] for k in a if k in b and np.isfinite(a[k]) and np.isfinite(b[k])])
        if len(d) >= 2:
            sel.stack_margin = float(d.mean())
            sel.stack_noise = float(d.std(ddof=1) / np.sqrt(len(d)))
            if sel.stack_margin > sel.stack_noise and sel.stack_margin > 0:
                sel.selected = stacker
                sel.beats_baselines = True
    if not sel.beats_baselines:
        sel.warnings.append(
            f"no method beats the baselines in cross-validation: the selected model is the baseline "
            f"{sel.selected!r} (CV per-spot Spearman {_nan_low(summaries[sel.selected]['cv_spot_spearman']):.4f}); "
            "the image models add nothing measurable on these slides")
    return sel


def _nan_low(v) -> float:
    return -np.inf if v is None or not np.isfinite(v) else float(v)
