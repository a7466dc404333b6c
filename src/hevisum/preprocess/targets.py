"""Per-spot rank transform of the targets (the competition metric only sees ranks within a spot).

Ties: deconvolution output gives absent cell types tiny jittered values (~1e-10). With ``tie_tol > 0``, values
of one spot that differ by at most ``tie_tol * max|row|`` are chained into one tie group (single linkage over the
sorted values: a run of values, each within the tolerance of the next) and all get the group's average rank, as
``scipy.stats.rankdata(method="average")`` does for exact ties; chaining keeps the result independent of where the
group starts. ``tie_tol = 0`` (the pipeline's default) gives plain ranks. Measured on HER2ST, the order of the tiny
values repeats across slides and plain ranks train better models, so collapsing is an option, not the default.
"""

from __future__ import annotations

import numpy as np


def rank_targets(Y: np.ndarray, tie_tol: float = 0.0) -> np.ndarray:
    """Ranks 1..T of each row of ``Y`` ``(n, T)`` as float32, average ranks for (near-)ties.

    Rows holding a NaN (spots without targets) come back as all-NaN rows.
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"targets must be 2-D (n_spots, n_targets), got shape {Y.shape}")
    n, t = Y.shape
    out = np.full((n, t), np.nan, dtype=np.float32)
    ok = np.isfinite(Y).all(axis=1)
    if t == 0 or not ok.any():
        return out
    y = Y[ok]
    order = np.argsort(y, axis=1, kind="stable")
    s = np.take_along_axis(y, order, axis=1)  # each row sorted ascending
    tol = tie_tol * np.abs(y).max(axis=1, keepdims=True)
    # a new tie group starts where the step to the previous sorted value exceeds the tolerance
    new = np.ones_like(s, dtype=bool)
    new[:, 1:] = np.diff(s, axis=1) > tol
    pos = np.broadcast_to(np.arange(t), s.shape)
    first = np.maximum.accumulate(np.where(new, pos, 0), axis=1)  # first position of each value's group
    # last position of the group: where the next group starts, minus one (scanned from the right)
    ends = np.ones_like(new)
    ends[:, :-1] = new[:, 1:]
    last = np.minimum.accumulate(np.where(ends, pos, t - 1)[:, ::-1], axis=1)[:, ::-1]
    ranks_sorted = (first + last) / 2.0 + 1.0  # average of the 1-based positions in the group
    ranks = np.empty_like(ranks_sorted)
    np.put_along_axis(ranks, order, ranks_sorted, axis=1)
    out[ok] = ranks.astype(np.float32)
    return out
