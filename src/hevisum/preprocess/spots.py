"""Spot geometry: pitch, automatic realignment of the spot grid onto the tissue, and invalid spots.

Realignment (``estimate_shift``) finds the one global shift ``(dx, dy)`` that, added to every spot centre, puts
the spot grid on the tissue. Spots are placed where the tissue is, so a good shift satisfies two kinds of
constraint at once: every spot centre lies on tissue, and every *empty grid site* next to the grid (a lattice
position one step beyond a boundary spot, where no spot was kept) lies on background. The spot lattice is read
from the nearest-neighbour vectors; each shift in the search window is scored as

    score(d) = sum over spots of m(spot + d)  -  sum over empty sites of m(site + d),   m = +1 tissue, -1 not

(m sampled bilinearly, -1 outside the image) for every whole-pixel shift in the window at full resolution (big
slides: first on block means at a scale where the pitch is ~8 px, then at full resolution around that peak).
The answer is the score-weighted centroid of the shifts (weights ``exp((score - best) / 2)``): sub-pixel, and
it moves with the spots when the best shifts form a plateau. When the best shift satisfies fewer than
``min_gain`` x (number of constraints) more constraints than no shift, ``(0, 0)`` is kept. Spot layouts without
a lattice (fewer than 8 spots, scattered spots) fall back to cross-correlating a rendered spot footprint
(+1 within half a pitch of a spot, -1 beyond 0.75 pitch) with the signed tissue map by FFT.

Both need a tissue mask with accurate edges: the pipeline computes one with a blur of 0.05 pitch for this step
(``RealignConfig.blur_pitches``); the main mask's blur would move the edges by a good part of a pitch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import fftconvolve
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

# Working scales: the coarse search sees a pitch of about this many pixels, the refinement about this many.
_COARSE_PITCH_PX = 8.0
_FINE_PITCH_PX = 64.0
# Footprint fallback, template zones in pitches: +1 up to the inner radius, 0 up to the outer one, -1 beyond.
_INNER, _OUTER = 0.5, 0.75
# Softness of the centroid over near-best shifts, in satisfied constraints.
_TAU = 2.0
# Largest share of lattice steps that may land half-way between spots for the spots to count as a lattice.
_MAX_AMBIGUOUS = 0.1
# Shifts x points evaluated at full resolution before switching to a coarse-to-fine search.
_FULL_SEARCH_BUDGET = 2e7


def spot_pitch(xy: np.ndarray) -> float:
    """Centre-to-centre spot distance: the median nearest-neighbour distance (robust to missing spots).

    Raises ValueError with fewer than two distinct spots.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        raise ValueError("the spot pitch needs at least two spots")
    d, _ = cKDTree(xy).query(xy, k=2)
    nn = d[:, 1]
    nn = nn[nn > 0]  # duplicated coordinates say nothing about the pitch
    if nn.size == 0:
        raise ValueError("all spots share the same coordinates; the spot pitch is undefined")
    return float(np.median(nn))


def estimate_shift(mask: np.ndarray, xy: np.ndarray, pitch: float, max_shift: float,
                   min_gain: float = 0.01) -> tuple[float, float]:
    """The global ``(dx, dy)`` (pixels) to add to the spot centres ``xy`` so that the spot grid lies on tissue.

    mask: boolean tissue mask ``(H, W)``; xy: ``(n, 2)`` spot centres (x = column, y = row); pitch: spot pitch
    in px; max_shift: search radius in px (each axis); min_gain: keep ``(0, 0)`` unless the best shift does
    better by at least this fraction of the number of constraints (lattice method) or of the footprint area
    (fallback).
    """
    xy = np.asarray(xy, dtype=np.float64)
    if max_shift <= 0 or len(xy) == 0 or not mask.any() or mask.all():
        return 0.0, 0.0
    offsets = lattice_offsets(xy, pitch)
    if offsets is None:
        return _estimate_shift_footprint(mask, xy, pitch, max_shift, min_gain)
    empty = empty_sites(xy, pitch, offsets)
    points = np.concatenate([xy, empty])
    weights = np.concatenate([np.ones(len(xy)), -np.ones(len(empty))])
    radius = int(np.ceil(max_shift))
    if (2 * radius + 1) ** 2 * len(points) <= _FULL_SEARCH_BUDGET:
        # every shift of the window at full resolution
        fine = _point_scores(mask, points, weights, (0, 0), radius)
        centre, r2 = (0, 0), radius
    else:
        # big slides: every shift on block means at a scale where the pitch is ~8 px, then full
        # resolution a few coarse pixels around the coarse peak
        k = max(1, int(pitch // _COARSE_PITCH_PX))
        rk = int(np.ceil(max_shift / k))
        coarse = _point_scores(2.0 * _block_mean(mask, k) - 1.0, (points + 0.5) / k - 0.5, weights, (0, 0), rk)
        cy, cx = _plateau_centre(coarse)
        centre = (int(round((cy - rk) * k)), int(round((cx - rk) * k)))
        r2 = 2 * k + 2
        fine = _point_scores(mask, points, weights, centre, r2)
    dy, dx = _soft_centroid(fine, _TAU)
    dy, dx = dy + centre[0] - r2, dx + centre[1] - r2
    # prefer no shift when the gain is within noise (a well-aligned slide stays as it is)
    zero = float(_point_scores(mask, points, weights, (0, 0), 0)[0, 0])
    if float(fine.max()) - zero <= min_gain * len(points):
        return 0.0, 0.0
    return float(np.clip(dx, -max_shift, max_shift)), float(np.clip(dy, -max_shift, max_shift))


def lattice_offsets(xy: np.ndarray, pitch: float) -> np.ndarray | None:
    """The neighbour offsets ``(m, 2)`` of the spot lattice (6 for hex, 4 for square grids), or None.

    Read from the vectors between each spot and its neighbours at 0.75..1.25 pitch: their directions
    (folded to a half turn) form 2 or 3 tight clusters; each cluster's mean vector ``v`` gives ``+v`` and ``-v``.
    None when fewer than two directions stand out (scattered spots, or fewer than 8 spots).
    """
    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 8:
        return None
    dist, idx = cKDTree(xy).query(xy, k=min(9, len(xy)))
    vec = (xy[idx[:, 1:]] - xy[:, None, :]).reshape(-1, 2)
    d = dist[:, 1:].ravel()
    vec = vec[(d > 0.75 * pitch) & (d < 1.25 * pitch)]
    if len(vec) < 8:
        return None
    # fold opposite directions together: angles in [0, pi)
    ang = np.arctan2(vec[:, 1], vec[:, 0])
    flip = ang < 0
    vec[flip] *= -1
    ang = np.mod(ang, np.pi)
    grid = np.linspace(0, np.pi, 180, endpoint=False)
    remaining = np.ones(len(vec), dtype=bool)
    offsets: list[np.ndarray] = []
    for _ in range(4):
        # the densest direction among the vectors not yet assigned (+-10 degrees, circular over a half turn)
        gap = np.abs((ang[remaining][None, :] - grid[:, None] + np.pi / 2) % np.pi - np.pi / 2)
        peak = grid[int(np.argmax((gap < np.radians(10)).sum(axis=1)))]
        members = remaining & (np.abs((ang - peak + np.pi / 2) % np.pi - np.pi / 2) < np.radians(12))
        if members.sum() < 0.15 * len(vec):
            break
        # orient members along the peak direction before averaging (folding splits directions near 0 / pi)
        u = np.array([np.cos(peak), np.sin(peak)])
        mv = vec[members]
        v = (mv * np.sign(mv @ u)[:, None]).mean(axis=0)
        offsets += [v, -v]
        remaining &= ~members
        if remaining.sum() < 0.15 * len(vec):
            break
    if len(offsets) < 4 or remaining.sum() > 0.2 * len(vec):
        return None
    offsets_arr = np.array(offsets)
    # a lattice predicts its neighbours: a step from a spot lands on a spot or clearly between spots, rarely
    # half-way (scattered spots land anywhere)
    cand = (xy[:, None, :] + offsets_arr[None, :, :]).reshape(-1, 2)
    dc, _ = cKDTree(xy).query(cand)
    ambiguous = np.mean((dc > 0.3 * pitch) & (dc < 0.6 * pitch))
    return offsets_arr if ambiguous <= _MAX_AMBIGUOUS else None


def empty_sites(xy: np.ndarray, pitch: float, offsets: np.ndarray) -> np.ndarray:
    """Lattice positions one step from a spot where there is no spot: ``(m, 2)``, each site once."""
    xy = np.asarray(xy, dtype=np.float64)
    cand = (xy[:, None, :] + offsets[None, :, :]).reshape(-1, 2)
    d, _ = cKDTree(xy).query(cand)
    cand = cand[d > 0.5 * pitch]
    if len(cand) == 0:
        return cand
    # several boundary spots propose the same site: merge proposals closer than 0.35 pitch
    tree = cKDTree(cand)
    n, label = connected_components(tree.sparse_distance_matrix(tree, 0.35 * pitch), directed=False)
    out = np.zeros((n, 2))
    np.add.at(out, label, cand)
    return out / np.bincount(label, minlength=n)[:, None]


def tissue_fraction_at(mask: np.ndarray, xy: np.ndarray, window: float) -> np.ndarray:
    """Fraction of tissue in the ``window`` x ``window`` px square centred on each spot (outside the image = 0)."""
    xy = np.asarray(xy, dtype=np.float64)
    h, w = mask.shape
    side = max(1, int(round(window)))
    # pixel rows r0..r0+side-1 centred on the spot's pixel
    c = np.rint(xy).astype(np.int64)
    r0 = c[:, 1] - side // 2
    c0 = c[:, 0] - side // 2
    out = np.zeros(len(xy), dtype=np.float64)
    for i in range(len(xy)):
        ra, rb = max(r0[i], 0), min(r0[i] + side, h)
        ca, cb = max(c0[i], 0), min(c0[i] + side, w)
        if ra < rb and ca < cb:
            out[i] = np.count_nonzero(mask[ra:rb, ca:cb]) / (side * side)
    return out


def invalid_spots(mask: np.ndarray, xy: np.ndarray, window: float, min_tissue: float = 0.0) -> np.ndarray:
    """Boolean ``(n,)``: True where the ``window``-px square around a spot holds at most ``min_tissue`` tissue.

    With ``min_tissue=0`` a spot is invalid only when its window holds no tissue at all (the reference rule:
    a 26 x 26 px window at a pitch of 25 px).
    """
    return tissue_fraction_at(mask, xy, window) <= min_tissue


# ----------------------------------------------------------------------------------------------- helpers


def _point_scores(m: np.ndarray, points: np.ndarray, weights: np.ndarray, centre: tuple[int, int],
                  radius: int) -> np.ndarray:
    """``sum_i w_i m(p_i + d)`` for every shift ``d = centre + (i, j)``, ``|i|, |j| <= radius``; ``(2r+1, 2r+1)``.

    ``m`` is a boolean mask (+1 / -1) or a float map in [-1, 1], sampled bilinearly (so the scores move
    smoothly with sub-pixel spot positions); points outside it count as background (-1).
    """
    h, w = m.shape
    signed = m.dtype == bool
    fr, fc = np.floor(points[:, 1]), np.floor(points[:, 0])
    ar, ac = points[:, 1] - fr, points[:, 0] - fc  # bilinear weights
    rows, cols = fr.astype(np.int64), fc.astype(np.int64)
    dxs = np.arange(-radius, radius + 1) + centre[1]
    out = np.empty((2 * radius + 1, 2 * radius + 1))
    corners = ((0, 0, (1 - ar) * (1 - ac)), (0, 1, (1 - ar) * ac), (1, 0, ar * (1 - ac)), (1, 1, ar * ac))
    # one row of shifts at a time keeps memory at (2r+1) x n
    for i, dy in enumerate(range(centre[0] - radius, centre[0] + radius + 1)):
        total = np.zeros((len(dxs), len(points)))
        for oy, ox, wt in corners:
            r = rows[None, :] + dy + oy
            c = cols[None, :] + dxs[:, None] + ox
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            v = m[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]
            v = np.where(v, 1.0, -1.0) if signed else v.astype(np.float64)
            total += np.where(inside, v, -1.0) * wt[None, :]
        out[i] = total @ weights
    return out


def _plateau_centre(scores: np.ndarray) -> tuple[float, float]:
    """``(row, col)`` of the best score; the centre of the largest flat top when several shifts tie."""
    top = scores.max()
    flat = scores >= top - 1e-9 * max(1.0, float(np.abs(scores).max()))
    labels, n = ndi.label(flat)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        flat = labels == int(np.argmax(sizes))
    r, c = np.argwhere(flat).mean(axis=0)
    return float(r), float(c)


def _soft_centroid(scores: np.ndarray, tau: float) -> tuple[float, float]:
    """``(row, col)``: centroid of the shifts weighted by ``exp((score - best) / tau)``."""
    wts = np.exp((scores - scores.max()) / tau)
    rr, cc = np.mgrid[0:scores.shape[0], 0:scores.shape[1]]
    return float((wts * rr).sum() / wts.sum()), float((wts * cc).sum() / wts.sum())


def _estimate_shift_footprint(mask: np.ndarray, xy: np.ndarray, pitch: float, max_shift: float,
                              min_gain: float) -> tuple[float, float]:
    """Fallback without a lattice: correlate the spot footprint with the signed tissue map (see module doc)."""
    # coarse: every shift in the window at a scale where the pitch is ~8 px
    k1 = max(1, int(pitch // _COARSE_PITCH_PX))
    r1 = int(np.ceil(max_shift / k1))
    grid1 = _Grid(mask, xy, pitch, max_shift, k1)
    s1 = grid1.scores((0, 0), r1)
    cy, cx = _peak(s1, (0, 0), r1, limit=max_shift / k1)
    # refine: near full resolution, in a window of a few coarse pixels around the coarse peak
    k2 = max(1, int(pitch // _FINE_PITCH_PX))
    grid2 = grid1 if k2 == k1 else _Grid(mask, xy, pitch, max_shift, k2)
    centre = (int(round(cy * k1 / k2)), int(round(cx * k1 / k2)))
    r2 = int(np.ceil(k1 / k2)) + 2
    s2 = grid2.scores(centre, r2)
    fy, fx = _peak(s2, centre, r2, limit=max_shift / k2)
    dy, dx = fy * k2, fx * k2
    if float(s2.max()) - grid2.score_at_zero() <= min_gain * grid2.footprint_area:
        return 0.0, 0.0
    return float(np.clip(dx, -max_shift, max_shift)), float(np.clip(dy, -max_shift, max_shift))


class _Grid:
    """The signed tissue map and the spot-footprint template at one scale (1 px = ``k`` image px)."""

    def __init__(self, mask: np.ndarray, xy: np.ndarray, pitch: float, max_shift: float, k: int) -> None:
        self.k = k
        # signed map: tissue fraction of each k x k block mapped to [-1, 1]
        self.signed = 2.0 * _block_mean(mask, k) - 1.0
        # spot centres in block units (block j covers image px [j k, (j + 1) k))
        p = (xy + 0.5) / k - 0.5
        margin = (pitch * (1.0 + _OUTER) + max_shift) / k
        self.y0 = int(np.floor(p[:, 1].min() - margin))
        self.x0 = int(np.floor(p[:, 0].min() - margin))
        y1 = int(np.ceil(p[:, 1].max() + margin)) + 1
        x1 = int(np.ceil(p[:, 0].max() + margin)) + 1
        hb, wb = y1 - self.y0, x1 - self.x0
        # distance from each template pixel to the nearest spot (spots rasterised, then an exact EDT)
        seeds = np.ones((hb, wb), dtype=bool)
        ri = np.clip(np.rint(p[:, 1] - self.y0).astype(np.int64), 0, hb - 1)
        ci = np.clip(np.rint(p[:, 0] - self.x0).astype(np.int64), 0, wb - 1)
        seeds[ri, ci] = False
        dist = ndi.distance_transform_edt(seeds) * k
        self.template = np.where(dist <= _INNER * pitch, 1.0, np.where(dist <= _OUTER * pitch, 0.0, -1.0))
        self.footprint_area = float((self.template > 0).sum())

    def _signed_region(self, y0: int, x0: int, hb: int, wb: int) -> np.ndarray:
        """The signed map over rows y0..y0+hb, columns x0..x0+wb; outside the image is background (-1)."""
        out = -np.ones((hb, wb), dtype=np.float64)
        h, w = self.signed.shape
        ya, yb = max(y0, 0), min(y0 + hb, h)
        xa, xb = max(x0, 0), min(x0 + wb, w)
        if ya < yb and xa < xb:
            out[ya - y0:yb - y0, xa - x0:xb - x0] = self.signed[ya:yb, xa:xb]
        return out

    def scores(self, centre: tuple[int, int], radius: int) -> np.ndarray:
        """Score of every shift ``centre + (i, j)``, ``|i|, |j| <= radius`` (block units), as a square array."""
        hb, wb = self.template.shape
        cy, cx = centre
        region = self._signed_region(self.y0 + cy - radius, self.x0 + cx - radius, hb + 2 * radius, wb + 2 * radius)
        # correlation = convolution with the flipped template; 'valid' leaves exactly the shifts asked for
        return fftconvolve(region, self.template[::-1, ::-1], mode="valid")

    def score_at_zero(self) -> float:
        hb, wb = self.template.shape
        return float((self.template * self._signed_region(self.y0, self.x0, hb, wb)).sum())


def _block_mean(mask: np.ndarray, k: int) -> np.ndarray:
    """Mean of each ``k`` x ``k`` block of a boolean mask (the ragged edge averaged over what is there)."""
    if k == 1:
        return mask.astype(np.float64)
    h, w = mask.shape
    hk, wk = -(-h // k), -(-w // k)
    # row sums per block via reduceat keep this at one pass over the mask
    rows = np.add.reduceat(mask, np.arange(0, h, k), axis=0, dtype=np.float64)
    sums = np.add.reduceat(rows, np.arange(0, w, k), axis=1)
    counts = np.outer(np.diff(np.append(np.arange(0, h, k), h)), np.diff(np.append(np.arange(0, w, k), w)))
    assert sums.shape == (hk, wk)
    return sums / counts


def _peak(scores: np.ndarray, centre: tuple[int, int], radius: int, limit: float) -> tuple[float, float]:
    """Sub-pixel location ``(dy, dx)`` of the maximum of a score window (in the window's own units).

    A flat top (several shifts scoring the same) gives the centre of that plateau, so the answer moves with
    the spots instead of sticking to one end of it; a single peak is refined with a parabola per axis.
    """
    top = scores.max()
    tol = 1e-9 * max(1.0, float(np.abs(scores).max()))
    flat = scores >= top - tol
    labels, _ = ndi.label(flat)
    iy, ix = np.unravel_index(int(np.argmax(scores)), scores.shape)
    plateau = labels == labels[iy, ix]
    if plateau.sum() > 1:
        py, px = np.argwhere(plateau).mean(axis=0)
    else:
        py, px = float(iy), float(ix)
        if 0 < iy < scores.shape[0] - 1:
            py += _parabola(scores[iy - 1, ix], scores[iy, ix], scores[iy + 1, ix])
        if 0 < ix < scores.shape[1] - 1:
            px += _parabola(scores[iy, ix - 1], scores[iy, ix], scores[iy, ix + 1])
    dy, dx = centre[0] + py - radius, centre[1] + px - radius
    return float(np.clip(dy, -limit, limit)), float(np.clip(dx, -limit, limit))


def _parabola(a: float, b: float, c: float) -> float:
    """Offset (in [-0.5, 0.5]) of the vertex of the parabola through (-1, a), (0, b), (1, c)."""
    den = a - 2 * b + c
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))
