"""One object per slide: image, spots, targets and what is known about scale."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import pandas as pd

from hevisum.errors import HevisumError

SPLITS = ("train", "test")


@dataclass
class Slide:
    """An H&E slide with its spatial-transcriptomics spots.

    Attributes
    ----------
    slide_id: unique name of the slide (``S_1``, ``C2``, ``MOB1``, a Visium sample id...).
    image: RGB image, ``(H, W, 3)`` uint8.
    spots: table with at least ``spot_id`` (str), ``x`` and ``y`` (float, image pixels: x = column,
        y = row). Extra columns (``test_set``, ``barcode``...) travel along.
    targets: ``(n_spots, n_targets)`` float array in the row order of ``spots``; ``None`` for test slides
        whose truth is unknown.
    target_names: names of the target columns (``C1..Cn`` when nothing better is known).
    um_per_px: microns per image pixel when known.
    split: ``"train"`` or ``"test"``.
    source: where the slide was read from, used in error messages.
    """

    slide_id: str
    image: np.ndarray
    spots: pd.DataFrame
    targets: np.ndarray | None = None
    target_names: list[str] | None = None
    um_per_px: float | None = None
    split: str = "train"
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def n_spots(self) -> int:
        return len(self.spots)

    @property
    def xy(self) -> np.ndarray:
        """Spot centres as an ``(n, 2)`` float array of (x, y) image pixels."""
        return self.spots[["x", "y"]].to_numpy(dtype=np.float64)

    @property
    def spot_ids(self) -> np.ndarray:
        return self.spots["spot_id"].astype(str).to_numpy()

    def where(self) -> str:
        return f"{self.source}: slide {self.slide_id!r}" if self.source else f"slide {self.slide_id!r}"

    def with_spots(self, spots: pd.DataFrame, targets: np.ndarray | None = None) -> "Slide":
        """A copy with another spots table (and matching targets); the image is shared, not copied."""
        return replace(self, spots=spots.reset_index(drop=True), targets=targets)

    def validate(self) -> "Slide":
        """Check shapes, dtypes and values; raise :class:`HevisumError` naming the problem."""
        w = self.where()
        if not isinstance(self.slide_id, str) or not self.slide_id:
            raise HevisumError(f"{self.source or 'input'}: slide id {self.slide_id!r} is not a non-empty string")
        img = self.image
        if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
            shape = getattr(img, "shape", None)
            raise HevisumError(
                f"{w}: image has shape {shape}; expected an RGB image of shape (H, W, 3)"
                + (" (RGBA images: drop the alpha channel)" if shape is not None and len(shape) == 3 and shape[2] == 4 else "")
            )
        if img.dtype != np.uint8:
            raise HevisumError(f"{w}: image dtype is {img.dtype}; expected uint8 (0-255)")
        if img.shape[0] < 8 or img.shape[1] < 8:
            raise HevisumError(f"{w}: image is {img.shape[1]}x{img.shape[0]} px; expected at least 8x8")
        if self.split not in SPLITS:
            raise HevisumError(f"{w}: split {self.split!r} is not one of {list(SPLITS)}")
        for col in ("spot_id", "x", "y"):
            if col not in self.spots.columns:
                raise HevisumError(f"{w}: spots table has no column {col!r}; columns are {list(self.spots.columns)}")
        if self.n_spots == 0:
            raise HevisumError(f"{w}: slide has no spots; every slide needs at least one spot")
        for col in ("x", "y"):
            dt = self.spots[col].dtype
            if not (pd.api.types.is_numeric_dtype(dt) and not pd.api.types.is_bool_dtype(dt)
                    and not pd.api.types.is_complex_dtype(dt)):
                raise HevisumError(f"{w}: spot coordinate {col!r} has type {dt}; expected numbers (image pixels)")
        xy = self.xy
        if not np.isfinite(xy).all():
            bad = int(np.flatnonzero(~np.isfinite(xy).all(axis=1))[0])
            raise HevisumError(f"{w}: spot {self.spot_ids[bad]!r} has a non-finite coordinate "
                               f"(x={xy[bad, 0]:g}, y={xy[bad, 1]:g}); coordinates must be finite numbers")
        h, wd = img.shape[:2]
        outside = (xy[:, 0] < 0) | (xy[:, 0] >= wd) | (xy[:, 1] < 0) | (xy[:, 1] >= h)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise HevisumError(
                f"{w}: {int(outside.sum())} spot(s) lie outside the {wd}x{h} image, first {self.spot_ids[i]!r} at "
                f"(x={xy[i, 0]:g}, y={xy[i, 1]:g}); valid x is 0..{wd - 1}, y is 0..{h - 1}"
            )
        if self.n_spots >= 2 and (xy == xy[0]).all():
            raise HevisumError(
                f"{w}: all {self.n_spots} spots lie at the same pixel (x={xy[0, 0]:g}, y={xy[0, 1]:g}); spot "
                "centres must be the spots' own positions in image pixels"
            )
        ids = self.spots["spot_id"].astype(str)
        if ids.duplicated().any():
            raise HevisumError(f"{w}: duplicate spot id {ids[ids.duplicated()].iloc[0]!r}; spot ids must be unique")
        um = self.um_per_px
        if um is not None and not (isinstance(um, (int, float, np.floating, np.integer)) and not isinstance(um, bool)
                                   and np.isfinite(um) and 0 < um < 1e4):
            raise HevisumError(f"{w}: microns per pixel is {um!r}; expected a positive finite number (or unknown)")
        if self.targets is not None:
            t = self.targets
            if not isinstance(t, np.ndarray) or t.dtype.kind not in "iuf":
                raise HevisumError(f"{w}: targets have type {getattr(t, 'dtype', type(t).__name__)}; expected "
                                   "numbers, one row per spot and one column per target")
            if t.ndim != 2 or t.shape[0] != self.n_spots:
                raise HevisumError(f"{w}: targets have shape {t.shape}; expected ({self.n_spots}, n_targets)")
            if self.target_names is not None and len(self.target_names) != t.shape[1]:
                raise HevisumError(
                    f"{w}: {len(self.target_names)} target names for {t.shape[1]} target columns"
                )
            if self.target_names is not None:
                seen: set = set()
                for name in self.target_names:
                    if not isinstance(name, str) or not name:
                        raise HevisumError(f"{w}: target name {name!r} is not a non-empty string")
                    if name in seen:
                        raise HevisumError(f"{w}: target name {name!r} appears twice; target names must be unique")
                    seen.add(name)
            finite = np.isfinite(t)
            if not finite.all():
                r, c = np.argwhere(~finite)[0]
                name = self.target_names[c] if self.target_names else f"C{c + 1}"
                raise HevisumError(
                    f"{w}: target {name!r} of spot {self.spot_ids[r]!r} is {t[r, c]}; targets must be finite numbers "
                    f"({int((~finite).sum())} non-finite values in all)"
                )
        return self


def check_unique_ids(slides: Sequence[Slide]) -> None:
    """Raise when two slides share an id (ids key tiles, folds and predictions)."""
    seen: dict[str, str] = {}
    for s in slides:
        if s.slide_id in seen:
            raise HevisumError(
                f"duplicate slide id {s.slide_id!r} (in {seen[s.slide_id] or '?'} and {s.source or '?'}); "
                "slide ids must be unique: rename the folder or file of one of them"
            )
        seen[s.slide_id] = s.source


def check_same_targets(slides: Sequence[Slide]) -> list[str] | None:
    """All training slides must share target names; return them (None when no slide has targets)."""
    names: list[str] | None = None
    first = ""
    for s in slides:
        if s.targets is None:
            continue
        sn = list(s.target_names or [f"C{i + 1}" for i in range(s.targets.shape[1])])
        if names is None:
            names, first = sn, s.slide_id
        elif sn != names:
            raise HevisumError(
                f"slide {s.slide_id!r} has targets {sn[:3]}... ({len(sn)}) but slide {first!r} has "
                f"{names[:3]}... ({len(names)}); all training slides need the same targets in the same order"
            )
    return names
