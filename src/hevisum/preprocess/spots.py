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

Whether to apply the shift (``realign``): the estimate above always proposes some shift, and on a slide that
is already aligned the best of many noisy shifts still scores a little better than no shift (a spot whose
centre sits on the tissue edge, an empty site on a frayed border). So the proposal is applied only when it
raises the *on-tissue evidence* of the grid by a clear margin over the unshifted grid:

    evidence(d) = sum over spots of e(spot + d)  -  sum over empty sites of e(site + d),
    e(p) = tanh(signed distance from p to the tissue edge / (0.1 pitch))     (+ inside, - outside)

    margin = (evidence(proposed) - evidence(0)) / (number of constraints near the tissue edge)

and the shift is applied when ``margin >= min_margin`` (default :data:`MIN_MARGIN`, 0.15). ``e`` is +-1 from
about 0.4 pitch away from the edge and changes smoothly across it, so one spot grazing an edge counts little and
a grid that sits clearly off the tissue counts a lot. Only the constraints near the edge are counted (those deep
on the same side at both positions add the same to both scores), which keeps the margin comparable between a
small section and a capture area full of tissue. Measured (``docs/reliability.md``): the published HER2ST, MOB
and Visium slides score at most 0.07; the same slides moved by 0.6 pitch or more score 0.21 and above, the demo's
shifted slides 0.5 and above.

Legacy ST arrays also leave a faint imprint of every printed spot on the glass. Where enough of them are visible
around the grid and agree, they correct the proposal to about a pixel (:func:`imprint_offset`); the tissue
outline alone leaves 0.1-0.25 pitch of doubt on real slides (HER2ST C3: 13.5 px).
"""

from __future__ import annotations

from dataclasses import dataclass

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
# A proposed shift is applied only when it raises the on-tissue evidence by this margin (see the module notes).
MIN_MARGIN = 0.15
# Width of the evidence's transition across the tissue edge, in pitches; and the working scale of its distance
# map (the pitch spans about this many pixels there, or the full resolution when less).
_EVIDENCE_SOFTNESS = 0.1
_EVIDENCE_PITCH_PX = 32.0
# |evidence| above this is "deep inside" or "far outside" (more than ~0.4 pitch from the edge).
_SATURATED = 0.999
# Array imprints (see imprint_offset): disc radius and search window in pitches, the least disc-vs-ring contrast
# (grey levels, 0..255), how many sites must agree and how closely (pitches), and the least pitch (px) at which
# a disc can be seen at all.
_IMPRINT_RADIUS = 0.28
_IMPRINT_WINDOW = 0.35
_IMPRINT_CONTRAST = 1.0
_IMPRINT_MIN_SITES = 8
_IMPRINT_AGREE = 0.08
_IMPRINT_MIN_PITCH_PX = 16.0


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
    (fallback). This is the estimate alone; :func:`realign` decides whether it is worth applying.
    """
    return _estimate(mask, xy, pitch, max_shift, min_gain)[0]


def _estimate(mask: np.ndarray, xy: np.ndarray, pitch: float, max_shift: float,
              min_gain: float) -> tuple[tuple[float, float], str, np.ndarray, np.ndarray, np.ndarray | None]:
    """(shift, method, constraint points, their weights, lattice offsets): the lattice search or the footprint
    fallback (offsets None)."""
    xy = np.asarray(xy, dtype=np.float64)
    if max_shift <= 0 or len(xy) == 0 or not mask.any() or mask.all():
        return (0.0, 0.0), "none", xy, np.ones(len(xy)), None
    offsets = lattice_offsets(xy, pitch)
    if offsets is None:
        shift = _estimate_shift_footprint(mask, xy, pitch, max_shift, min_gain)
        return shift, "footprint", xy, np.ones(len(xy)), None
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
        return (0.0, 0.0), "lattice", points, weights, offsets
    shift = (float(np.clip(dx, -max_shift, max_shift)), float(np.clip(dy, -max_shift, max_shift)))
    return shift, "lattice", points, weights, offsets


@dataclass(frozen=True)
class Realignment:
    """What :func:`realign` found for one slide, and whether it moved the spots.

    shift: the ``(dx, dy)`` applied to every spot centre, pixels (``(0, 0)`` when not applied).
    proposed: the best shift found (applied or not): the tissue search, refined by the array's imprints when
        they are visible (``n_imprints`` > 0).
    score_before, score_after: on-tissue evidence of the unshifted grid and of the grid moved by ``proposed``,
        per constraint near the tissue edge (each in [-1, 1]; see the module notes).
    margin: ``score_after - score_before``; the shift is applied when ``margin >= min_margin``.
    method: ``lattice``, ``footprint`` (scattered spots), ``none`` (nothing to search: no tissue, all tissue,
        an empty window), ``manual`` (set in the config) or ``off`` (realignment disabled).
    n_edge: constraints near the tissue edge (the denominator of the scores).
    n_imprints: array-spot imprints on the glass that agreed on the refinement (0: none used).
    """

    shift: tuple[float, float]
    proposed: tuple[float, float]
    score_before: float | None
    score_after: float | None
    margin: float | None
    min_margin: float | None
    applied: bool
    method: str
    n_edge: int = 0
    n_imprints: int = 0

    @classmethod
    def fixed(cls, shift: tuple[float, float], method: str) -> "Realignment":
        """A shift that was not searched for (``manual``) or no realignment at all (``off``)."""
        shift = (float(shift[0]), float(shift[1]))
        return cls(shift=shift, proposed=shift, score_before=None, score_after=None, margin=None, min_margin=None,
                   applied=shift != (0.0, 0.0), method=method)

    def as_dict(self) -> dict:
        """The qc.json record (plain JSON types; scores rounded to 5 decimals)."""
        def r(v):
            return None if v is None else round(float(v), 5)

        return {"method": self.method, "applied": bool(self.applied),
                "proposed_px": [r(self.proposed[0]), r(self.proposed[1])],
                "score_before": r(self.score_before), "score_after": r(self.score_after),
                "margin": r(self.margin), "min_margin": r(self.min_margin), "n_edge": int(self.n_edge),
                "n_imprints": int(self.n_imprints)}


def realign(mask: np.ndarray, xy: np.ndarray, pitch: float, max_shift: float, min_margin: float = MIN_MARGIN,
            min_gain: float = 0.01, image: np.ndarray | None = None) -> Realignment:
    """Search the shift that puts the spot grid on the tissue, and apply it only when it clearly helps.

    The proposal is :func:`estimate_shift`'s; with the slide's ``image``, it is then refined by the spot
    array's imprints on the glass around the grid when enough of them are visible and agree
    (:func:`imprint_offset`). It is applied when it raises the on-tissue evidence by at least ``min_margin``
    over the unshifted grid (module notes). A slide that is already aligned keeps ``(0, 0)`` even when a
    slightly different position scores a little better.
    """
    xy = np.asarray(xy, dtype=np.float64)
    proposed, method, points, weights, offsets = _estimate(mask, xy, pitch, max_shift, min_gain)
    if method == "none" or len(points) == 0:
        return Realignment(shift=(0.0, 0.0), proposed=proposed, score_before=None, score_after=None, margin=None,
                           min_margin=float(min_margin), applied=False, method="none")
    n_imprints = 0
    if image is not None and offsets is not None:
        found = imprint_offset(image, mask, xy + np.asarray(proposed), pitch, offsets)
        if found is not None:
            (ox, oy), n_imprints = found
            proposed = (float(np.clip(proposed[0] + ox, -max_shift, max_shift)),
                        float(np.clip(proposed[1] + oy, -max_shift, max_shift)))
    evidence, k = tissue_evidence(mask, pitch)
    d = np.asarray(proposed, dtype=np.float64)
    before = _sample(evidence, (points + 0.5) / k - 0.5)
    after = _sample(evidence, (points + d + 0.5) / k - 0.5)
    # the constraints that count: all but those deep on the same side (tissue or not) at both positions, which
    # add the same to both scores
    same = ((before > _SATURATED) & (after > _SATURATED)) | ((before < -_SATURATED) & (after < -_SATURATED))
    near = ~same
    n_edge = int(near.sum())
    denom = max(n_edge, 1)
    sb = float((weights * before)[near].sum() / denom)
    sa = float((weights * after)[near].sum() / denom)
    margin = sa - sb
    applied = proposed != (0.0, 0.0) and margin >= min_margin
    return Realignment(shift=proposed if applied else (0.0, 0.0), proposed=proposed, score_before=sb,
                       score_after=sa, margin=margin, min_margin=float(min_margin), applied=bool(applied),
                       method=method, n_edge=n_edge, n_imprints=n_imprints)


def imprint_offset(image: np.ndarray, mask: np.ndarray, xy: np.ndarray, pitch: float,
                   offsets: np.ndarray) -> tuple[tuple[float, float], int] | None:
    """``((dx, dy), n)``: how far the array's spot imprints on the glass lie from the lattice sites around the
    grid ``xy``, or None when they are not visible.

    Legacy ST arrays leave every printed spot as a faint grey disc on the glass, also where no tissue lies.
    The lattice sites one and two steps beyond the grid that lie well off the tissue are each searched, within
    :data:`_IMPRINT_WINDOW` pitch, for the spot-sized disc that is darkest against its surrounding ring. When at
    least :data:`_IMPRINT_MIN_SITES` sites (and half of those searched) find one at the same offset (within
    :data:`_IMPRINT_AGREE` pitch), that common offset is the remaining error of the grid: the imprints fix
    the grid's position to a pixel or two where the tissue outline alone leaves a tenth of a pitch or more.
    """
    if pitch < _IMPRINT_MIN_PITCH_PX:
        return None
    xy = np.asarray(xy, dtype=np.float64)
    ring1 = empty_sites(xy, pitch, offsets)
    ring2 = empty_sites(np.concatenate([xy, ring1]), pitch, offsets) if len(ring1) else ring1
    sites = np.concatenate([ring1, ring2])
    if len(sites) < _IMPRINT_MIN_SITES:
        return None
    r_disc = _IMPRINT_RADIUS * pitch
    rk = int(np.ceil(0.5 * pitch))
    yy, xx = np.mgrid[-rk:rk + 1, -rk:rk + 1]
    rr = np.hypot(yy, xx)
    disc, ring = rr <= r_disc, (rr > r_disc + 1) & (rr <= 0.5 * pitch)
    if disc.sum() < 4 or ring.sum() < 4:
        return None
    kernel = ring / ring.sum() - disc / disc.sum()  # > 0 where the disc is darker than its ring
    win = int(np.ceil(_IMPRINT_WINDOW * pitch))
    clear = int(np.ceil(0.1 * pitch))  # no tissue under any disc or ring searched, nor this close to them
    h, w = mask.shape
    found = []
    for sx, sy in sites:
        cx, cy = int(round(sx)), int(round(sy))
        y0, y1, x0, x1 = cy - win - rk, cy + win + rk + 1, cx - win - rk, cx + win + rk + 1
        if y0 - clear < 0 or x0 - clear < 0 or y1 + clear > h or x1 + clear > w:
            continue
        if mask[y0 - clear:y1 + clear, x0 - clear:x1 + clear].any():
            continue
        grey = image[y0:y1, x0:x1].astype(np.float32).mean(axis=2) if image.ndim == 3 else \
            image[y0:y1, x0:x1].astype(np.float32)
        resp = fftconvolve(grey, kernel[::-1, ::-1], mode="valid")  # (2 win + 1)^2 candidate centres
        iy, ix = np.unravel_index(int(np.argmax(resp)), resp.shape)
        on_border = iy in (0, resp.shape[0] - 1) or ix in (0, resp.shape[1] - 1)
        if on_border or float(resp[iy, ix] - np.median(resp)) < _IMPRINT_CONTRAST:
            found.append(None)
            continue
        found.append((ix - win + cx - sx, iy - win + cy - sy))
    hits = np.array([f for f in found if f is not None], dtype=np.float64).reshape(-1, 2)
    if len(hits) < _IMPRINT_MIN_SITES:
        return None
    # the offset most others agree with
    dist = np.hypot(hits[:, None, 0] - hits[None, :, 0], hits[:, None, 1] - hits[None, :, 1])
    agree = dist < _IMPRINT_AGREE * pitch
    best = int(np.argmax(agree.sum(axis=1)))
    inliers = agree[best]
    n = int(inliers.sum())
    if n < _IMPRINT_MIN_SITES or n < 0.5 * len(found):
        return None
    dx, dy = hits[inliers].mean(axis=0)
    return (float(dx), float(dy)), n


def tissue_evidence(mask: np.ndarray, pitch: float) -> tuple[np.ndarray, int]:
    """``(e, k)``: the on-tissue evidence ``tanh(signed distance to the edge / (0.1 pitch))`` on blocks of
    ``k`` x ``k`` pixels (``k`` brings the pitch to about 32 px; 1 for small pitches). Point ``p`` (image px)
    lies at ``(p + 0.5) / k - 0.5`` in it."""
    k = max(1, int(pitch // _EVIDENCE_PITCH_PX))
    m = _block_mean(mask, k) >= 0.5 if k > 1 else np.asarray(mask, dtype=bool)
    if not m.any():
        return -np.ones(m.shape), k
    if m.all():
        return np.ones(m.shape), k
    inside = ndi.distance_transform_edt(m)
    outside = ndi.distance_transform_edt(~m)
    signed = np.where(m, inside - 0.5, 0.5 - outside) * k
    return np.tanh(signed / (_EVIDENCE_SOFTNESS * pitch)), k


def _sample(m: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear samples of the float map ``m`` at ``points`` (x, y); outside the map counts as -1."""
    h, w = m.shape
    fr, fc = np.floor(points[:, 1]), np.floor(points[:, 0])
    ar, ac = points[:, 1] - fr, points[:, 0] - fc
    rows, cols = fr.astype(np.int64), fc.astype(np.int64)
    out = np.zeros(len(points))
    for oy, ox, wt in ((0, 0, (1 - ar) * (1 - ac)), (0, 1, (1 - ar) * ac), (1, 0, ar * (1 - ac)), (1, 1, ar * ac)):
        r, c = rows + oy, cols + ox
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        out += np.where(inside, m[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)], -1.0) * wt
    return out


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
