"""Post-processing of predictions: spatial smoothing over neighbouring spots of the same slide."""

from __future__ import annotations

import numpy as np


def smooth_predictions(pred: np.ndarray, xy: np.ndarray, slides: np.ndarray, sigma_px: np.ndarray | float) -> np.ndarray:
    """Gaussian-weighted average of each spot's prediction with its neighbours on the same slide.

    ``sigma_px`` is a scalar or one value per spot (e.g. a slide's pitch times ``sigma_pitches``).
    Neighbours further than 3 sigma are ignored. Returns a new array; ``pred`` is not changed.
    """
    from scipy.spatial import cKDTree

    out = np.empty_like(pred, dtype=np.float32)
    sig = np.broadcast_to(np.asarray(sigma_px, dtype=np.float64), (len(pred),))
    for s in dict.fromkeys(np.asarray(slides).tolist()):
        idx = np.flatnonzero(slides == s)
        pts = xy[idx]
        sigma = float(np.median(sig[idx]))
        tree = cKDTree(pts)
        pairs = tree.sparse_distance_matrix(tree, 3 * sigma, output_type="coo_matrix")
        from scipy.sparse import coo_matrix, identity

        w = coo_matrix((np.exp(-0.5 * (pairs.data / sigma) ** 2), (pairs.row, pairs.col)), shape=(len(idx), len(idx)))
        w = (w + identity(len(idx), format="coo")).tocsr()  # the spot itself (distance 0 is not stored)
        norm = np.asarray(w.sum(axis=1)).ravel()
        out[idx] = (w @ pred[idx]) / norm[:, None]
    return out


def smooth_rows(pred: np.ndarray, rows: np.ndarray, spots, cfg) -> np.ndarray:
    """``pred`` for tile-cache ``rows`` of the prepared ``spots`` table, smoothed as ``cfg.smoothing`` says."""
    if not cfg.smoothing.enabled or len(rows) == 0:
        return pred
    sp = spots.iloc[rows]
    return smooth_predictions(pred, sp[["x", "y"]].to_numpy(float), sp["slide"].astype(str).to_numpy(),
                              sp["pitch_px"].to_numpy(float) * cfg.smoothing.sigma_pitches)
