"""Evaluation metrics: per-spot Spearman (the competition metric), per-target Spearman/Pearson and MSE.

Arrays are ``(n_spots, n_targets)``: one row per spot, one column per target (cell type or gene).

Decisions (documented here because every report and test relies on them):

* Ties are ranked by their average rank, exactly as ``scipy.stats.spearmanr`` does, so a spot's
  Spearman is the Pearson correlation of its two average-rank vectors.
* A correlation is undefined (NaN) when either vector is constant: a spot whose predicted or true
  targets are all equal, or a target column that is constant across the spots. Such spots are left
  out of the mean and counted in ``n_undefined``; the score is the mean over the remaining spots
  (NaN, written as ``None`` in JSON, when none remain). Undefined targets are likewise left out of
  the per-target means and counted in ``n_undefined_targets``.
* Frames are joined on ``(slide, ID)``, never on row order.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy.stats import rankdata

from hevisum.errors import HevisumError

SLIDE_COL = "slide"
ID_COL = "ID"
_MAX_LISTED = 5  # how many names an error message lists before abbreviating


# ----------------------------------------------------------------------------------------------
# pure numpy metrics
# ----------------------------------------------------------------------------------------------


def _as_matrix_pair(pred: ArrayLike, truth: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert to two float64 ``(n_spots, n_targets)`` arrays of the same shape."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    if p.ndim != 2 or t.ndim != 2:
        raise HevisumError(
            f"pred has {p.ndim} dimension(s) and truth {t.ndim}; both must be 2-D (n_spots, n_targets)"
        )
    if p.shape != t.shape:
        raise HevisumError(
            f"pred has shape {p.shape} but truth has shape {t.shape}; both must be the same (n_spots, n_targets)"
        )
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise HevisumError(f"pred and truth have shape {p.shape}; need at least one spot and one target")
    for name, a in (("pred", p), ("truth", t)):
        bad = ~np.isfinite(a)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise HevisumError(
                f"{name} has {int(bad.sum())} non-finite value(s), first {a[i, j]} at spot {i}, target {j}; "
                "all values must be finite numbers"
            )
    return p, t


def _corr_along(x: np.ndarray, y: np.ndarray, axis: int, undefined: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x`` and ``y`` along ``axis``; NaN where ``undefined`` is True.

    ``undefined`` is decided by the caller from exact equality of the raw values: a float mean of
    equal numbers need not be exactly that number, so a near-zero variance is not a safe test.
    """
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    num = (xc * yc).sum(axis=axis)
    # sqrt of each sum separately: the product of two tiny sums could underflow to zero.
    den = np.sqrt((xc * xc).sum(axis=axis)) * np.sqrt((yc * yc).sum(axis=axis))
    undefined = undefined | (den == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / np.where(undefined, 1.0, den)
    # Rounding can push |r| a hair above 1; scipy clips the same way.
    r = np.clip(r, -1.0, 1.0)
    r[undefined] = np.nan
    return r


def _constant_along(a: np.ndarray, axis: int) -> np.ndarray:
    """True for each row (axis=1) or column (axis=0) whose values are all exactly equal."""
    first = np.take(a, [0], axis=axis) if a.shape[axis] else a
    return (a == first).all(axis=axis)


def per_spot_spearman(pred: ArrayLike, truth: ArrayLike) -> np.ndarray:
    """Spearman correlation between the predicted and true target vector of each spot.

    Returns an ``(n_spots,)`` array; NaN for spots where either vector is constant (as scipy).
    """
    p, t = _as_matrix_pair(pred, truth)
    undefined = _constant_along(p, 1) | _constant_along(t, 1)
    return _corr_along(rankdata(p, axis=1), rankdata(t, axis=1), axis=1, undefined=undefined)


def _nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values, NaN when there are none (without numpy's empty-slice warning)."""
    ok = values[~np.isnan(values)]
    return float(ok.mean()) if ok.size else math.nan


def mean_spot_spearman(pred: ArrayLike, truth: ArrayLike) -> float:
    """The competition score: mean per-spot Spearman over the spots where it is defined (NaN if none)."""
    return _nanmean(per_spot_spearman(pred, truth))


def per_target_spearman(pred: ArrayLike, truth: ArrayLike) -> np.ndarray:
    """Spearman correlation across spots for each target column; ``(n_targets,)``, NaN for constant columns."""
    p, t = _as_matrix_pair(pred, truth)
    undefined = _constant_along(p, 0) | _constant_along(t, 0)
    return _corr_along(rankdata(p, axis=0), rankdata(t, axis=0), axis=0, undefined=undefined)


def per_target_pearson(pred: ArrayLike, truth: ArrayLike) -> np.ndarray:
    """Pearson correlation across spots for each target column; ``(n_targets,)``, NaN for constant columns."""
    p, t = _as_matrix_pair(pred, truth)
    undefined = _constant_along(p, 0) | _constant_along(t, 0)
    return _corr_along(p, t, axis=0, undefined=undefined)


def mse(pred: ArrayLike, truth: ArrayLike) -> float:
    """Mean squared error over all spots and targets."""
    p, t = _as_matrix_pair(pred, truth)
    return float(np.mean((p - t) ** 2))


def _json_float(x: float) -> float | None:
    """Plain Python float, or None for NaN/inf so the result is valid JSON."""
    x = float(x)
    return x if math.isfinite(x) else None


def score(pred: ArrayLike, truth: ArrayLike, target_names: Sequence[str] | None = None) -> dict[str, Any]:
    """All metrics for one set of spots, as a JSON-serialisable dict (NaN written as None).

    Keys: n_spots, n_targets, spot_spearman (the competition metric), n_undefined (spots left out of
    it because a vector is constant), target_spearman_mean, target_pearson_mean, n_undefined_targets,
    mse, and per_target {name: {"spearman", "pearson"}}. ``target_names`` defaults to C1..Cn.
    """
    p, t = _as_matrix_pair(pred, truth)
    n_spots, n_targets = p.shape
    if target_names is None:
        names = [f"C{j + 1}" for j in range(n_targets)]
    else:
        names = [str(n) for n in target_names]
        if len(names) != n_targets:
            raise HevisumError(f"{len(names)} target names given for {n_targets} target columns; give one per column")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise HevisumError(f"target name {dup!r} appears more than once; target names must be unique")
    spot = per_spot_spearman(p, t)
    tsp = per_target_spearman(p, t)
    tpe = per_target_pearson(p, t)
    return {
        "n_spots": int(n_spots),
        "n_targets": int(n_targets),
        "spot_spearman": _json_float(_nanmean(spot)),
        "n_undefined": int(np.isnan(spot).sum()),
        "target_spearman_mean": _json_float(_nanmean(tsp)),
        "target_pearson_mean": _json_float(_nanmean(tpe)),
        "n_undefined_targets": int((np.isnan(tsp) | np.isnan(tpe)).sum()),
        "mse": _json_float(mse(p, t)),
        "per_target": {
            n: {"spearman": _json_float(s), "pearson": _json_float(r)} for n, s, r in zip(names, tsp, tpe)
        },
    }


# ----------------------------------------------------------------------------------------------
# tables: join predictions to truth on (slide, ID)
# ----------------------------------------------------------------------------------------------


def _listing(items: Sequence[str]) -> str:
    """'a, b, c' for short lists, 'a, b, c, d, e and 7 more' for long ones."""
    items = [str(i) for i in items]
    head = ", ".join(items[:_MAX_LISTED])
    return head if len(items) <= _MAX_LISTED else f"{head} and {len(items) - _MAX_LISTED} more"


def _clean_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Copy with stripped string column names (hand-edited CSV headers often carry spaces)."""
    out = df.copy()
    out.columns = [str(c).strip() for c in out.columns]
    return out


def _key_strings(col: pd.Series, name: str, column: str) -> pd.Series:
    """Turn a slide/ID column into stripped strings so '7', 7 and 7.0 join; errors on missing keys."""
    missing = col.isna().to_numpy()
    if missing.any():
        i = int(np.argmax(missing))
        raise HevisumError(f"{name}: column '{column}' is empty in {int(missing.sum())} row(s), first at row {i + 1}; "
                           "every row needs a value")
    if pd.api.types.is_float_dtype(col) and bool((np.isfinite(col) & (col == np.round(col))).all()):
        # A float ID column (e.g. written by a tool that went through NaN) still means integer IDs.
        col = col.astype(np.int64)
    return col.astype(str).str.strip()


def _require_id(df: pd.DataFrame, name: str) -> None:
    """Raise when the ID column is absent, listing the columns that are there."""
    if ID_COL not in df.columns:
        raise HevisumError(f"{name} has no '{ID_COL}' column (columns: {_listing(list(df.columns))}); "
                           f"expected columns {SLIDE_COL}, {ID_COL}, C1..Cn")


def _add_slide(pred: pd.DataFrame, truth: pd.DataFrame, names: tuple[str, str]) -> None:
    """Make sure both frames have a slide column, in place.

    Absent from both: one slide named "" (the competition submission format ``ID, C1..Cn``).
    Absent from one only: allowed when the other covers a single slide (a per-slide submission
    file), which is then assumed; otherwise the spots could not be matched unambiguously.
    """
    has = (SLIDE_COL in pred.columns, SLIDE_COL in truth.columns)
    if not any(has):
        pred[SLIDE_COL] = ""
        truth[SLIDE_COL] = ""
        return
    if all(has):
        return
    with_i = 0 if has[0] else 1
    frames = (pred, truth)
    other = frames[1 - with_i]
    slides = pd.unique(_key_strings(frames[with_i][SLIDE_COL], names[with_i], SLIDE_COL))
    if len(slides) != 1:
        raise HevisumError(
            f"{names[1 - with_i]} has no '{SLIDE_COL}' column but {names[with_i]} covers {len(slides)} slides "
            f"({_listing(list(slides))}); add a '{SLIDE_COL}' column to {names[1 - with_i]}"
        )
    other[SLIDE_COL] = slides[0]


def _numeric_block(df: pd.DataFrame, targets: list[str], keys: pd.DataFrame, name: str) -> np.ndarray:
    """The target columns as float64, raising on the first non-numeric or non-finite cell."""
    block = df[targets].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(block)
    if bad.any():
        i, j = np.argwhere(bad)[0]  # row-major: the first bad row, then its first bad column
        raw = df[targets[j]].iloc[i]
        # repr for text shows quotes/spaces; str for numbers avoids numpy's 'np.float64(nan)' spelling.
        shown = repr(raw) if isinstance(raw, str) else ("empty" if pd.isna(raw) else str(raw))
        raise HevisumError(
            f"{name}: column '{targets[j]}' row {i + 1} "
            f"(slide {keys[SLIDE_COL].iloc[i]!r}, ID {keys[ID_COL].iloc[i]!r}) is {shown}; "
            f"{int(bad.sum())} cell(s) are not finite numbers, all targets must be"
        )
    return block


def _keys(df: pd.DataFrame, name: str) -> pd.DataFrame:
    """(slide, ID) as strings; raises on duplicate pairs."""
    keys = pd.DataFrame({
        SLIDE_COL: _key_strings(df[SLIDE_COL], name, SLIDE_COL).to_numpy(),
        ID_COL: _key_strings(df[ID_COL], name, ID_COL).to_numpy(),
    })
    dup = keys.duplicated(keep=False).to_numpy()
    if dup.any():
        i = int(np.argmax(dup))
        n_pairs = int(keys[dup].drop_duplicates().shape[0])
        raise HevisumError(
            f"{name} has duplicate (slide, ID) rows: {n_pairs} pair(s) appear more than once, first slide "
            f"{keys[SLIDE_COL].iloc[i]!r}, ID {keys[ID_COL].iloc[i]!r}; each spot must appear once"
        )
    return keys


def evaluate_frames(
    pred: pd.DataFrame, truth: pd.DataFrame, names: tuple[str, str] = ("pred", "truth")
) -> dict[str, Any]:
    """Score predictions against truth, joined on (slide, ID), overall and per slide.

    Both frames have columns ``slide, ID, <targets...>`` (``slide`` may be absent from both, meaning
    one slide named ""). Target columns are matched by name. Every truth spot needs a prediction;
    predictions for spots not in the truth are ignored and counted in ``n_extra_predictions``.
    ``names`` (prediction name, truth name) are used in error messages, e.g. the file paths.
    Returns {"overall": score(...), "per_slide": {slide: score(...)}, "n_extra_predictions": k}.
    """
    pred_name, truth_name = names
    pred = _clean_columns(pred)
    truth = _clean_columns(truth)
    _require_id(pred, pred_name)
    _require_id(truth, truth_name)
    _add_slide(pred, truth, names)

    key_cols = {SLIDE_COL, ID_COL}
    targets = [c for c in truth.columns if c not in key_cols]
    pred_targets = [c for c in pred.columns if c not in key_cols]
    if not targets:
        raise HevisumError(f"{truth_name} has no target columns after '{SLIDE_COL}' and '{ID_COL}'; "
                           "expected e.g. C1..Cn")
    for name, cols in ((truth_name, targets), (pred_name, pred_targets)):
        if len(set(cols)) != len(cols):
            dup = next(c for c in cols if cols.count(c) > 1)
            raise HevisumError(f"{name} has column {dup!r} more than once; column names must be unique")
    missing = [c for c in targets if c not in set(pred_targets)]
    extra = [c for c in pred_targets if c not in set(targets)]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{pred_name} lacks {len(missing)} target column(s) of {truth_name}: {_listing(missing)}")
        if extra:
            parts.append(f"{pred_name} has {len(extra)} column(s) not in {truth_name}: {_listing(extra)}")
        raise HevisumError("target columns differ: " + "; ".join(parts)
                           + " (the prediction must have the same target columns as the truth)")

    truth_keys = _keys(truth, truth_name)
    pred_keys = _keys(pred, pred_name)
    if len(truth_keys) == 0:
        raise HevisumError(f"{truth_name} has no rows; nothing to evaluate")
    truth_vals = _numeric_block(truth, targets, truth_keys, truth_name)
    pred_vals = _numeric_block(pred, targets, pred_keys, pred_name)

    # Pair every truth spot with its prediction by (slide, ID); -1 marks a truth spot with none.
    pred_index = pd.MultiIndex.from_frame(pred_keys)
    truth_index = pd.MultiIndex.from_frame(truth_keys)
    pos = pred_index.get_indexer(truth_index)
    absent = pos < 0
    if absent.any():
        i = int(np.argmax(absent))
        raise HevisumError(
            f"{pred_name} has no prediction for {int(absent.sum())} of {len(truth_keys)} spot(s) in {truth_name}, "
            f"first slide {truth_keys[SLIDE_COL].iloc[i]!r}, ID {truth_keys[ID_COL].iloc[i]!r}; "
            "predict every truth spot"
        )
    matched = pred_vals[pos]

    overall = score(matched, truth_vals, targets)
    slides = truth_keys[SLIDE_COL].to_numpy()
    unique_slides = pd.unique(slides)
    per_slide: dict[str, Any] = {}
    if len(unique_slides) == 1:
        # Same spots: reuse the overall numbers rather than recompute them with different rounding.
        per_slide[str(unique_slides[0])] = copy.deepcopy(overall)
    else:
        for slide in unique_slides:  # a loop over slides, not spots; keeps the truth's slide order
            rows = slides == slide
            per_slide[str(slide)] = score(matched[rows], truth_vals[rows], targets)
    return {
        "overall": overall,
        "per_slide": per_slide,
        "n_extra_predictions": int(len(pred_keys) - len(truth_keys)),
    }


def _read_csv(path: Path, role: str) -> pd.DataFrame:
    """Read one CSV with slide and ID as text, turning I/O and parse problems into HevisumError."""
    expected = f"expected a CSV with columns {SLIDE_COL}, {ID_COL}, C1..Cn"
    if not path.exists():
        raise HevisumError(f"{role} file not found: {path} ({expected})")
    if not path.is_file():
        raise HevisumError(f"{role} path is not a file: {path} ({expected})")
    try:
        # Keys as text so IDs such as '007' or barcodes survive; unknown dtype keys are ignored by pandas.
        return pd.read_csv(path, dtype={SLIDE_COL: str, ID_COL: str})
    except pd.errors.EmptyDataError:
        raise HevisumError(f"{role} file is empty: {path} ({expected})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        msg = " ".join(str(e).split())
        raise HevisumError(f"{role} file {path} is not a readable CSV: {msg}") from None
    except OSError as e:
        raise HevisumError(f"cannot read {role} file {path}: {e.strerror or e}") from None


def evaluate_files(pred_path: str | Path, truth_path: str | Path) -> dict[str, Any]:
    """Read prediction and truth CSVs and score them with :func:`evaluate_frames`.

    Returns that result plus the "pred" and "truth" paths as given.
    """
    pred_path, truth_path = Path(pred_path), Path(truth_path)
    pred = _read_csv(pred_path, "prediction")
    truth = _read_csv(truth_path, "truth")
    result = evaluate_frames(pred, truth, names=(str(pred_path), str(truth_path)))
    return {"pred": str(pred_path), "truth": str(truth_path), **result}
