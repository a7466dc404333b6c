"""Preprocessing: tissue masks, stain normalisation, spot realignment and filtering, target ranks, tiles.

Pure array functions live in the step modules; :func:`preprocess` runs them on slides and writes a work folder.
"""

from hevisum.preprocess.pipeline import Prepared, load_prepared, preprocess
from hevisum.preprocess.spots import estimate_shift, invalid_spots, spot_pitch
from hevisum.preprocess.stain import (
    StainTarget,
    fit_macenko,
    fit_reinhard,
    normalize_macenko,
    normalize_reinhard,
)
from hevisum.preprocess.targets import rank_targets
from hevisum.preprocess.tiles import subtiles
from hevisum.preprocess.tissue import mask_background, tissue_mask

__all__ = [
    "Prepared", "StainTarget", "estimate_shift", "fit_macenko", "fit_reinhard", "invalid_spots", "load_prepared",
    "mask_background", "normalize_macenko", "normalize_reinhard", "preprocess", "rank_targets", "spot_pitch",
    "subtiles", "tissue_mask",
]
