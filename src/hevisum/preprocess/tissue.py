"""Tissue detection on white or black backgrounds, and background masking.

The tissue score of a pixel is ``sqrt(chroma * contrast)``: H&E tissue is both coloured (chroma = max - min
channel) and away from the background's brightness (contrast). Needing both keeps out the faint pink haze of
eosin around sections (coloured but bright), grey fiducial frames and pen-free glass (contrast but no colour),
and black padding around a white-background scan (neither). Greyscale images have no chroma; they are scored by
contrast alone. The score is blurred and thresholded with Otsu's method at a reduced scale, then small specks and
holes are removed and the mask is upsampled to the image size.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

BACKGROUNDS = ("auto", "white", "black")

# A pixel this dark (mean channel, 0..1) and connected to the image border is padding, not glass or tissue.
_PAD_GREY = 0.08
# Below this 99th-percentile chroma the image is treated as greyscale (contrast-only score).
_GREY_IMAGE_CHROMA = 0.04
# Otsu on an image without tissue splits noise; a threshold below this score means "no tissue here".
_MIN_THRESHOLD = 0.03


def tissue_mask(image: np.ndarray, background: str = "auto", blur_sigma: float = 7.0,
                max_side: int = 2048) -> np.ndarray:
    """Boolean ``(H, W)`` mask of tissue in an RGB uint8 image.

    background: ``"white"`` (bright glass), ``"black"`` (dark background) or ``"auto"`` (decided from the
        border pixels; a black border around bright glass counts as padding of a white-background image).
    blur_sigma: Gaussian blur of the tissue score, in pixels of the working scale.
    max_side: the mask is computed on the image shrunk (area average) to at most this side, then upsampled.
    """
    return tissue_masks(image, [blur_sigma], background, max_side)[0]


def tissue_masks(image: np.ndarray, blur_sigmas: Sequence[float], background: str = "auto",
                 max_side: int = 2048) -> list[np.ndarray]:
    """:func:`tissue_mask` at several blurs, sharing the tissue score (the costly part) between them."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS}, got {background!r}")
    h, w = image.shape[:2]
    # work at a reduced scale: big slides would otherwise cost seconds per blur
    factor = working_factor((h, w), max_side)
    score, padding = _tissue_score(_shrink(image, factor), background)
    masks = []
    for sigma in blur_sigmas:
        blurred = ndi.gaussian_filter(score, sigma) if sigma > 0 else score
        # Otsu over all pixels (padding scores 0, like glass); a subsample keeps it fast
        vals = blurred.ravel()
        thr = max(_otsu(vals[:: max(1, vals.size // 500_000)]), _MIN_THRESHOLD)
        mask = _clean((blurred > thr) & ~padding, min_size=max(16, int(2e-4 * blurred.size)))
        masks.append(_upsample(mask, factor, (h, w)) if factor > 1 else mask)
    return masks


def _tissue_score(small: np.ndarray, background: str) -> tuple[np.ndarray, np.ndarray]:
    """(unblurred tissue score, padding mask) of an image at the working scale."""
    # per-channel elementwise max/min/sum: much faster than reductions over the last (strided) axis
    r, g, b = small[..., 0], small[..., 1], small[..., 2]
    value = np.maximum(np.maximum(r, g), b).astype(np.float32) / 255.0
    chroma = value - np.minimum(np.minimum(r, g), b).astype(np.float32) / 255.0
    grey = (r.astype(np.float32) + g + b) / (3 * 255.0)
    # padding: near-black, colourless pixels connected to the border (rotated or letterboxed scans)
    padding = _border_connected((grey < _PAD_GREY) & (chroma < 0.05))
    mode, bg_level = _background_level(grey, padding, background)
    # on white glass only darker than the glass counts; on a black background only brighter, measured on the
    # brightest channel so that dark, saturated nuclei (deep purple) still stand out from black
    if mode == "white":
        contrast = np.clip(bg_level - grey, 0, None)
    else:
        contrast = np.clip(value - np.percentile(value[:: max(1, value.size // 500_000)], 10), 0, None)
    use_chroma = np.percentile(chroma[~padding], 99) >= _GREY_IMAGE_CHROMA if (~padding).any() else False
    score = np.sqrt(chroma * contrast) if use_chroma else contrast
    score[padding] = 0.0
    return score, padding


def working_factor(shape: tuple[int, ...], max_side: int = 2048) -> int:
    """The integer shrink factor :func:`tissue_mask` works at for an image of this shape."""
    return max(1, int(np.ceil(max(shape[:2]) / max_side)))


def fill_colour(fill: str | tuple[int, int, int]) -> np.ndarray:
    """The RGB uint8 colour of a background ``fill``: "white", "black" or an RGB triple."""
    colour = {"white": (255, 255, 255), "black": (0, 0, 0)}.get(fill, fill) if isinstance(fill, str) else fill
    if isinstance(colour, str):
        raise ValueError(f"fill must be 'white', 'black' or an RGB triple, got {fill!r}")
    return np.asarray(colour, dtype=np.uint8)


def mask_background(image: np.ndarray, mask: np.ndarray, fill: str | tuple[int, int, int] = "white") -> np.ndarray:
    """A copy of ``image`` with pixels outside ``mask`` set to ``fill`` ("white", "black" or an RGB triple)."""
    out = image.copy()
    out[~mask] = fill_colour(fill)
    return out


def detect_background(image: np.ndarray) -> str:
    """``"white"`` or ``"black"``: the background of ``image`` judged from its border pixels (see tissue_mask)."""
    rgb = _shrink(image, max(1, int(np.ceil(max(image.shape[:2]) / 1024)))).astype(np.float32) / 255.0
    grey = rgb.mean(axis=2)
    padding = _border_connected((grey < _PAD_GREY) & (rgb.max(axis=2) - rgb.min(axis=2) < 0.05))
    return _background_level(grey, padding, "auto")[0]


# ----------------------------------------------------------------------------------------------- helpers


def _background_level(grey: np.ndarray, padding: np.ndarray, background: str) -> tuple[str, float]:
    """(mode, grey level of the background). Auto mode reads the border ring inside any padding."""
    ring = _border_ring(grey.shape, width=max(2, min(grey.shape) // 50))
    if background == "auto":
        border = grey[ring & ~padding]
        if border.size < 0.05 * ring.sum():
            # the border is all padding: look just inside it instead
            inner = ndi.binary_dilation(padding, iterations=3) & ~padding
            border = grey[inner]
        if border.size == 0:
            border = grey[ring]
        mode = "white" if np.median(border) > 0.5 else "black"
    else:
        mode = background
    # the background level: a high (white) or low (black) percentile of the non-padding pixels, assuming
    # at least a tenth of the slide is background
    vals = grey[~padding] if (~padding).any() else grey.ravel()
    level = float(np.percentile(vals[:: max(1, vals.size // 500_000)], 90 if mode == "white" else 10))
    return mode, level


def _border_ring(shape: tuple[int, int], width: int) -> np.ndarray:
    ring = np.zeros(shape, dtype=bool)
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
    return ring


def _border_connected(candidate: np.ndarray) -> np.ndarray:
    """The parts of ``candidate`` connected to the image border."""
    if not candidate.any():
        return candidate
    labels, n = ndi.label(candidate)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    edge = edge[edge > 0]
    return np.isin(labels, edge) if edge.size else np.zeros_like(candidate)


def _shrink(image: np.ndarray, factor: int) -> np.ndarray:
    """Area-average an RGB uint8 image by an integer factor (PIL's box reduction; ragged edge blocks are
    averaged over the pixels they have). Returns uint8 unchanged when ``factor`` is 1, float32 otherwise."""
    if factor <= 1:
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).reduce(factor)).astype(np.float32)


def _upsample(mask: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour upsampling by an integer factor, cropped to ``shape``."""
    rows = np.minimum(np.arange(shape[0]) // factor, mask.shape[0] - 1)
    cols = np.minimum(np.arange(shape[1]) // factor, mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold: the cut that maximises the between-class variance of the histogram."""
    values = values[np.isfinite(values)]
    if values.size == 0 or values.min() == values.max():
        return float(values.max()) if values.size else 0.0
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _clean(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop connected specks smaller than ``min_size`` px and fill holes smaller than it."""
    labels, n = ndi.label(mask)
    if n:
        sizes = np.bincount(labels.ravel())
        keep = sizes >= min_size
        keep[0] = False
        mask = keep[labels]
    holes, n = ndi.label(~mask)
    if n:
        sizes = np.bincount(holes.ravel())
        # a hole touching the border is background, whatever its size
        edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        small = sizes < min_size
        small[0] = False
        small[edge] = False
        mask = mask | small[holes]
    return mask
