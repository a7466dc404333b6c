"""Virtual spot grids: a Visium-like lattice laid over the tissue of a slide that has no spot table.

Lattice
-------
- Hexagonal (default, as Visium): rows ``pitch * sqrt(3) / 2`` apart, odd rows shifted right by half a pitch, so
  every spot has six neighbours at exactly one pitch. ``array_col`` follows Visium: even on even rows, odd on odd
  rows (``array_col = 2 * column + row % 2``), so the six neighbours of ``(r, c)`` are ``(r, c ± 2)`` and
  ``(r ± 1, c ± 1)``.
- Square: rows and columns one pitch apart; ``array_col`` is the column.

The first grid point is at ``(pitch / 2, pitch / 2)`` of level 0 and the lattice covers the whole image, so two
slides of the same size get the same grid whatever their tissue. A point is kept when the disc of the spot
(diameter ``spot_diameter_px``, by default 0.55 pitch: Visium's 55 µm spots at 100 µm pitch) is at least
``min_tissue`` tissue in the mask, measured on 69 points spread over the disc (nearest mask pixel each).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from hevisum.errors import HevisumError

__all__ = ["disc_tissue_fraction", "virtual_grid"]

#: default spot diameter as a fraction of the pitch (Visium: 55 µm spots, 100 µm apart)
SPOT_DIAMETER_PITCHES = 0.55


def _disc_offsets(k: int = 9) -> np.ndarray:
    """Sample offsets inside the unit disc: the centres of a k x k grid over [-1, 1]^2 that fall in it."""
    c = (np.arange(k) + 0.5) / k * 2 - 1
    xx, yy = np.meshgrid(c, c)
    inside = xx**2 + yy**2 <= 1.0
    return np.stack([xx[inside], yy[inside]], axis=1)


_OFFSETS = _disc_offsets()


def _scales(mask_scale: float | tuple[float, float]) -> tuple[float, float]:
    if isinstance(mask_scale, (tuple, list, np.ndarray)):
        if len(mask_scale) != 2:
            raise HevisumError(f"mask_scale must be a number or (sx, sy), got {mask_scale!r}")
        sx, sy = float(mask_scale[0]), float(mask_scale[1])
    else:
        sx = sy = float(mask_scale)
    if not (math.isfinite(sx) and math.isfinite(sy) and sx > 0 and sy > 0):
        raise HevisumError(f"mask_scale must be positive (mask pixels per level-0 pixel), got {mask_scale!r}")
    return sx, sy


def disc_tissue_fraction(mask: np.ndarray, mask_scale: float | tuple[float, float], xy: np.ndarray,
                         diameter_px: float) -> np.ndarray:
    """Fraction of tissue in the disc of ``diameter_px`` level-0 px around each level-0 point ``xy`` ``(n, 2)``.

    ``mask`` is boolean, in pixels of ``mask = level0 * mask_scale``; points outside the mask count as background.
    """
    m = np.asarray(mask, dtype=bool)
    sx, sy = _scales(mask_scale)
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    h, w = m.shape
    r = diameter_px / 2
    out = np.empty(len(xy), dtype=np.float64)
    step = max(1, 2_000_000 // len(_OFFSETS))  # bounds the (points x samples) arrays
    for s in range(0, len(xy), step):
        pts = xy[s:s + step]
        px = (pts[:, 0:1] + r * _OFFSETS[None, :, 0]) * sx
        py = (pts[:, 1:2] + r * _OFFSETS[None, :, 1]) * sy
        col, row = np.floor(px).astype(np.int64), np.floor(py).astype(np.int64)
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        hit = m[np.clip(row, 0, h - 1), np.clip(col, 0, w - 1)] & inside
        out[s:s + step] = hit.mean(axis=1)
    return out


def virtual_grid(mask: np.ndarray, mask_scale: float | tuple[float, float], pitch_px_level0: float, *,
                 hexagonal: bool = True, min_tissue: float = 0.5, spot_diameter_px: float | None = None,
                 image_size: tuple[int, int] | None = None) -> pd.DataFrame:
    """Spots of a hexagonal (Visium-like) or square lattice over the tissue in ``mask``.

    mask: boolean tissue mask (e.g. of a thumbnail); its pixel = level-0 pixel x ``mask_scale``.
    mask_scale: mask pixels per level-0 pixel, one number or ``(sx, sy)``.
    pitch_px_level0: distance between neighbouring spots, in level-0 pixels.
    min_tissue: keep a spot when at least this fraction of its disc is tissue (0 keeps every grid point, glass
        included; 1 only spots fully on tissue).
    spot_diameter_px: disc diameter in level-0 pixels; default ``0.55 * pitch``.
    image_size: level-0 ``(width, height)``; default ``mask.shape / mask_scale``.

    Returns a table ``spot_id`` (``"r{array_row}c{array_col}"``), ``x``, ``y`` (level-0 pixels),
    ``array_row``, ``array_col`` and ``tissue_fraction``, in row-major order (row by row, left to right).
    """
    m = np.asarray(mask)
    if m.ndim != 2 or m.size == 0:
        raise HevisumError(f"tissue mask must be a non-empty 2-D array, got shape {m.shape}")
    m = m.astype(bool, copy=False)
    sx, sy = _scales(mask_scale)
    pitch = float(pitch_px_level0)
    if not (math.isfinite(pitch) and pitch > 0):
        raise HevisumError(f"pitch_px_level0 must be a positive number of level-0 pixels, got {pitch_px_level0!r}")
    if not (0.0 <= float(min_tissue) <= 1.0):
        raise HevisumError(f"min_tissue must be in [0, 1], got {min_tissue!r}")
    diameter = SPOT_DIAMETER_PITCHES * pitch if spot_diameter_px is None else float(spot_diameter_px)
    if not (math.isfinite(diameter) and diameter > 0):
        raise HevisumError(f"spot_diameter_px must be a positive number, got {spot_diameter_px!r}")
    if image_size is None:
        width, height = m.shape[1] / sx, m.shape[0] / sy
    else:
        width, height = float(image_size[0]), float(image_size[1])
    dy = pitch * math.sqrt(3) / 2 if hexagonal else pitch
    n_rows = max(0, math.floor((height - pitch / 2) / dy) + 1) if height > pitch / 2 else 0
    n_cols = max(0, math.floor((width - pitch / 2) / pitch) + 1) if width > pitch / 2 else 0
    if n_rows * n_cols > 50_000_000:
        raise HevisumError(
            f"a pitch of {pitch:g} px gives {n_rows * n_cols:,} grid points on a {width:.0f}x{height:.0f} image; "
            "check that the pitch is in level-0 pixels"
        )
    parts = []
    # one block of rows at a time keeps memory bounded for fine grids on big slides
    rows_per_block = max(1, 1_000_000 // max(n_cols, 1))
    for r0 in range(0, n_rows, rows_per_block):
        rows = np.arange(r0, min(n_rows, r0 + rows_per_block))
        rr, cc = np.meshgrid(rows, np.arange(n_cols), indexing="ij")
        shift = (rr % 2) * 0.5 if hexagonal else np.zeros_like(rr, dtype=float)
        x = pitch / 2 + (cc + shift) * pitch
        y = pitch / 2 + rr * dy
        ok = x < width
        x, y, rr, cc = x[ok], y[ok], rr[ok], cc[ok]
        frac = disc_tissue_fraction(m, (sx, sy), np.stack([x, y], axis=1), diameter)
        keep = frac >= float(min_tissue) if min_tissue > 0 else np.ones(len(frac), dtype=bool)
        acol = 2 * cc + rr % 2 if hexagonal else cc
        parts.append((x[keep], y[keep], rr[keep], acol[keep], frac[keep]))
    if parts:
        x, y, ar, ac, fr = (np.concatenate(v) for v in zip(*parts))
    else:
        x = y = fr = np.zeros(0)
        ar = ac = np.zeros(0, dtype=np.int64)
    ids = [f"r{a}c{b}" for a, b in zip(ar.tolist(), ac.tolist())]
    return pd.DataFrame({"spot_id": pd.Series(ids, dtype=object), "x": x.astype(np.float64),
                         "y": y.astype(np.float64), "array_row": ar.astype(np.int64),
                         "array_col": ac.astype(np.int64), "tissue_fraction": fr.astype(np.float64)})
