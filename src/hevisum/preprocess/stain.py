"""Stain normalisation: Macenko (stain vectors in optical density) and Reinhard (LAB mean and spread).

Fit then apply: a :class:`StainTarget` is fitted once on tissue pixels of the training slides (or of one
reference slide) and every slide is mapped to it. Pure numpy; large images are processed in row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from hevisum.errors import HevisumError

METHODS = ("macenko", "reinhard", "none")

# Macenko defaults: transmitted light intensity, angle percentile, optical-density floor.
IO, ALPHA, BETA = 240.0, 1.0, 0.15
# A classic H&E reference (columns: haematoxylin, eosin OD vectors) and its 99th-percentile concentrations,
# used when a fit has too few tissue pixels.
DEFAULT_HE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
DEFAULT_MAX_CONC = np.array([1.9705, 1.0308])
# Fewer stained pixels than this and the stain vectors are not estimated.
MIN_PIXELS = 100
# Pixels used to estimate a source image's own stains (a fixed-seed subsample above this).
MAX_ESTIMATE_PIXELS = 1_000_000
_ROWS_PER_BLOCK = 256

#: a per-pixel stain map: uint8 ``(..., 3)`` in, uint8 of the same shape out
Mapping = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class StainTarget:
    """What every slide is normalised to.

    method: ``"macenko"``, ``"reinhard"`` or ``"none"``.
    stain_matrix: Macenko OD vectors ``(3, 2)`` (columns: haematoxylin, eosin; unit length).
    max_conc: Macenko 99th-percentile stain concentrations ``(2,)``.
    lab_mean, lab_std: Reinhard LAB statistics ``(3,)`` of tissue pixels.
    n_pixels: how many pixels the fit saw.
    fallback: True when the fit had too few tissue pixels and the defaults were used.
    """

    method: str = "none"
    stain_matrix: tuple | None = None
    max_conc: tuple | None = None
    lab_mean: tuple | None = None
    lab_std: tuple | None = None
    io: float = IO
    n_pixels: int = 0
    fallback: bool = False

    @property
    def he(self) -> np.ndarray:
        """The Macenko stain matrix as a ``(3, 2)`` float array."""
        return np.asarray(self.stain_matrix, dtype=np.float64).reshape(3, 2)

    def to_dict(self) -> dict:
        """JSON-safe dict (lists and plain numbers)."""
        def lst(v):
            return None if v is None else np.asarray(v, dtype=np.float64).tolist()

        return {"method": self.method, "stain_matrix": lst(self.stain_matrix), "max_conc": lst(self.max_conc),
                "lab_mean": lst(self.lab_mean), "lab_std": lst(self.lab_std), "io": float(self.io),
                "n_pixels": int(self.n_pixels), "fallback": bool(self.fallback)}

    @classmethod
    def from_dict(cls, d: dict) -> "StainTarget":
        """Inverse of :meth:`to_dict`; a :class:`HevisumError` names a missing or malformed field."""
        if not isinstance(d, dict):
            raise HevisumError(f"stain target must be a JSON object, got {type(d).__name__}")
        method = d.get("method")
        if method not in METHODS:
            raise HevisumError(f"stain target method {method!r} is not one of {list(METHODS)}")
        need = {"macenko": {"stain_matrix": (3, 2), "max_conc": (2,)},
                "reinhard": {"lab_mean": (3,), "lab_std": (3,)}, "none": {}}[method]
        vals: dict = {}
        for key in ("stain_matrix", "max_conc", "lab_mean", "lab_std"):
            v = d.get(key)
            if v is None:
                if key in need:
                    raise HevisumError(f"stain target ({method}) has no {key!r}")
                vals[key] = None
                continue
            arr = np.asarray(v, dtype=np.float64)
            if key in need and arr.shape != need[key] or not np.isfinite(arr).all():
                raise HevisumError(f"stain target field {key!r} must be finite numbers of shape {need.get(key)}, "
                                   f"got {v!r}")
            vals[key] = _tup(arr)
        return cls(method=method, io=float(d.get("io", IO)), n_pixels=int(d.get("n_pixels", 0)),
                   fallback=bool(d.get("fallback", False)), **vals)


def _tup(a: np.ndarray) -> tuple:
    """Nested tuples: hashable and immutable, so the frozen target really is frozen."""
    return tuple(_tup(x) for x in a) if a.ndim > 1 else tuple(float(x) for x in a)


def as_pixels(pixels_or_images: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Stack RGB images ``(H, W, 3)`` and/or pixel lists ``(N, 3)`` into one ``(N, 3)`` uint8 array."""
    items = [pixels_or_images] if isinstance(pixels_or_images, np.ndarray) else list(pixels_or_images)
    flat = [np.asarray(a).reshape(-1, 3) for a in items if np.asarray(a).size]
    if not flat:
        return np.zeros((0, 3), dtype=np.uint8)
    return np.concatenate(flat).astype(np.uint8, copy=False)


# ----------------------------------------------------------------------------------------------- Macenko


def fit_macenko(pixels_or_images: np.ndarray | Sequence[np.ndarray], io: float = IO, alpha: float = ALPHA,
                beta: float = BETA) -> StainTarget:
    """Fit a Macenko target (stain matrix + max concentrations) on RGB pixels or images.

    Falls back to the classic H&E reference (``fallback=True``) when fewer than 100 pixels are stained.
    """
    px = as_pixels(pixels_or_images)
    est = _macenko_estimate(px, io, alpha, beta)
    if est is None:
        return StainTarget(method="macenko", stain_matrix=_tup(DEFAULT_HE), max_conc=_tup(DEFAULT_MAX_CONC),
                           io=io, n_pixels=len(px), fallback=True)
    he, max_conc = est
    return StainTarget(method="macenko", stain_matrix=_tup(he), max_conc=_tup(max_conc), io=io, n_pixels=len(px))


def normalize_macenko(image: np.ndarray, target: StainTarget, mask: np.ndarray | None = None,
                      alpha: float = ALPHA, beta: float = BETA, seed: int = 0) -> np.ndarray:
    """Map ``image`` (H, W, 3 uint8) to ``target``'s stains; returns a new uint8 image.

    The image's own stain vectors and concentrations are estimated from ``mask`` pixels (all pixels when
    None; a fixed-seed subsample of 1e6 when more). An image with too few stained pixels is returned
    unchanged (copied).
    """
    return apply_mapping(image, _macenko_mapping(image, target, mask, alpha, beta, seed))


def _macenko_mapping(image: np.ndarray, target: StainTarget, mask: np.ndarray | None, alpha: float, beta: float,
                     seed: int) -> Mapping | None:
    """The per-pixel map of ``image``'s stains onto ``target``'s (None when the image has too few stained pixels)."""
    io = float(target.io)
    est = _macenko_estimate(_sample(image, mask, seed), io, alpha, beta)
    if est is None:
        return None
    he_src, max_src = est
    # concentrations of the image's own stains -> rescaled to the target's range -> recombined with its stains
    unmix = np.linalg.pinv(he_src)  # (2, 3): least squares per pixel, as one matrix product
    scale = np.asarray(target.max_conc, dtype=np.float64) / np.maximum(max_src, 1e-6)
    mix = target.he * scale[None, :]  # (3, 2)
    proj = (mix @ unmix).T.astype(np.float32)  # (3, 3): OD_out = OD_in @ proj
    od_of = (-np.log((np.arange(256) + 1.0) / io)).astype(np.float32)  # optical density of each uint8 value

    def apply(block: np.ndarray) -> np.ndarray:
        od = od_of[block]  # optical density by table lookup
        rgb = np.float32(io) * np.exp(-(od @ proj))  # recombined with the target stains, back to intensities
        return np.rint(np.clip(rgb, 0, 255)).astype(np.uint8)

    return apply


def _macenko_estimate(px: np.ndarray, io: float, alpha: float, beta: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(stain matrix (3, 2), 99th-percentile concentrations (2,)) of RGB pixels ``(N, 3)``, or None."""
    if len(px) == 0:
        return None
    od = -np.log((px.astype(np.float64) + 1.0) / io)  # optical density
    odhat = od[(od >= beta).all(axis=1)]  # drop transparent (unstained) pixels
    if len(odhat) < MIN_PIXELS:
        return None
    cov = np.cov(odhat.T)
    if not np.isfinite(cov).all():
        return None
    _, vecs = np.linalg.eigh(cov)  # eigenvalues ascending
    plane = vecs[:, 1:3]  # the plane of the two largest
    plane = plane * np.where(plane.sum(axis=0) < 0, -1.0, 1.0)[None, :]  # a fixed sign: OD is positive
    proj = odhat @ plane  # project stained pixels onto the plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])  # angle of each pixel in the plane
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)  # robust extreme angles
    v_lo = plane @ np.array([np.cos(lo), np.sin(lo)])
    v_hi = plane @ np.array([np.cos(hi), np.sin(hi)])
    # haematoxylin first: the vector with the larger red OD
    he = np.stack([v_lo, v_hi], axis=1) if v_lo[0] > v_hi[0] else np.stack([v_hi, v_lo], axis=1)
    he = he * np.where(he.sum(axis=0) < 0, -1.0, 1.0)[None, :]
    if np.linalg.matrix_rank(he) < 2:
        return None
    conc = np.linalg.pinv(he) @ od.T  # concentrations of every pixel (2, N)
    max_conc = np.percentile(conc, 99, axis=1)  # robust maximum
    if not np.isfinite(max_conc).all() or (max_conc <= 1e-6).any():
        return None
    return he, max_conc


# ----------------------------------------------------------------------------------------------- Reinhard


def fit_reinhard(pixels_or_images: np.ndarray | Sequence[np.ndarray]) -> StainTarget:
    """Fit a Reinhard target: LAB mean and standard deviation of RGB pixels (neutral defaults when empty)."""
    px = as_pixels(pixels_or_images)
    if len(px) < MIN_PIXELS:
        return StainTarget(method="reinhard", lab_mean=(65.0, 20.0, -10.0), lab_std=(15.0, 8.0, 6.0),
                           n_pixels=len(px), fallback=True)
    lab = _rgb2lab(px)
    return StainTarget(method="reinhard", lab_mean=_tup(lab.mean(axis=0)),
                       lab_std=_tup(np.maximum(lab.std(axis=0), 1e-3)), n_pixels=len(px))


def normalize_reinhard(image: np.ndarray, target: StainTarget, mask: np.ndarray | None = None,
                       seed: int = 0) -> np.ndarray:
    """Match the LAB mean and standard deviation of ``image``'s (``mask``) pixels to ``target``'s."""
    return apply_mapping(image, _reinhard_mapping(image, target, mask, seed))


def _reinhard_mapping(image: np.ndarray, target: StainTarget, mask: np.ndarray | None, seed: int) -> Mapping | None:
    """The per-pixel LAB standardisation of ``image`` onto ``target`` (None with too few pixels)."""
    src = _sample(image, mask, seed)
    if len(src) < MIN_PIXELS:
        return None
    lab = _rgb2lab(src)
    mu_s, sd_s = lab.mean(axis=0), np.maximum(lab.std(axis=0), 1e-3)
    mu_t, sd_t = np.asarray(target.lab_mean), np.asarray(target.lab_std)

    def apply(block: np.ndarray) -> np.ndarray:
        lab = (_rgb2lab(block.reshape(-1, 3)) - mu_s) / sd_s * sd_t + mu_t  # standardise, take the target's
        return _lab2rgb(lab).reshape(block.shape)

    return apply


def _rgb2lab(px: np.ndarray) -> np.ndarray:
    from skimage.color import rgb2lab

    return rgb2lab(px.reshape(-1, 1, 3).astype(np.float64) / 255.0).reshape(-1, 3)


def _lab2rgb(lab: np.ndarray) -> np.ndarray:
    from skimage.color import lab2rgb

    rgb = lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3)
    return np.rint(np.clip(rgb * 255.0, 0, 255)).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- dispatch


def fit_target(method: str, pixels_or_images: np.ndarray | Sequence[np.ndarray]) -> StainTarget:
    """Fit a target of ``method`` (macenko | reinhard | none) on RGB pixels or images."""
    if method == "macenko":
        return fit_macenko(pixels_or_images)
    if method == "reinhard":
        return fit_reinhard(pixels_or_images)
    if method == "none":
        return StainTarget(method="none")
    raise ValueError(f"stain method must be one of {METHODS}, got {method!r}")


def normalize(image: np.ndarray, target: StainTarget, mask: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """Normalise ``image`` to ``target`` with the target's method (``none`` returns a copy)."""
    return apply_mapping(image, stain_mapping(image, target, mask, seed))


def stain_mapping(image: np.ndarray, target: StainTarget, mask: np.ndarray | None = None,
                  seed: int = 0) -> Mapping | None:
    """The function that normalises pixels of ``image`` to ``target``: estimated once on ``image`` (its ``mask``
    pixels), then applied to any uint8 array ``(..., 3)`` of the same slide, e.g. tiles read later from its
    full-resolution file. None when there is nothing to do (method ``none``, too few stained pixels)."""
    if target.method == "macenko":
        return _macenko_mapping(image, target, mask, ALPHA, BETA, seed)
    if target.method == "reinhard":
        return _reinhard_mapping(image, target, mask, seed)
    return None


def apply_mapping(image: np.ndarray, mapping: Mapping | None) -> np.ndarray:
    """``mapping`` applied to ``image`` in row blocks (a copy of ``image`` when None)."""
    if mapping is None:
        return image.copy()
    out = np.empty_like(image)
    for r0 in range(0, image.shape[0], _ROWS_PER_BLOCK):
        out[r0:r0 + _ROWS_PER_BLOCK] = mapping(image[r0:r0 + _ROWS_PER_BLOCK])
    return out


def tissue_patch_pixels(image: np.ndarray, mask: np.ndarray, patch_size: int, n_patches: int,
                        min_tissue: float, rng: np.random.Generator) -> np.ndarray:
    """Tissue pixels ``(N, 3)`` of ``n_patches`` random square patches holding >= ``min_tissue`` tissue.

    Patches lie on a grid of stride ``patch_size // 4``. When too few qualify, the most tissue-rich patches
    make up the number; a slide without tissue gives no pixels. Only pixels inside ``mask`` are returned, so
    background (white glass or black) never reaches the stain fit.
    """
    h, w = mask.shape
    size = int(min(patch_size, h, w))
    stride = max(1, size // 4)
    nb = size // stride  # blocks per patch side
    # tissue count per stride x stride block, then per patch by summing nb x nb blocks (integral image)
    rows = np.add.reduceat(mask, np.arange(0, h, stride), axis=0, dtype=np.int64)
    blocks = np.add.reduceat(rows, np.arange(0, w, stride), axis=1)
    integ = np.pad(blocks.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    by, bx = blocks.shape
    if by < nb or bx < nb:
        return np.zeros((0, 3), dtype=np.uint8)
    counts = integ[nb:, nb:] - integ[:-nb, nb:] - integ[nb:, :-nb] + integ[:-nb, :-nb]
    frac = counts / float(size * size)
    # keep patches fully inside the image
    ys, xs = np.meshgrid(np.arange(frac.shape[0]) * stride, np.arange(frac.shape[1]) * stride, indexing="ij")
    inside = (ys + size <= h) & (xs + size <= w)
    frac = np.where(inside, frac, -1.0)
    good = np.flatnonzero(frac.ravel() >= min_tissue)
    if len(good) >= n_patches:
        pick = rng.choice(good, size=n_patches, replace=False)
    else:
        order = np.argsort(-frac.ravel(), kind="stable")
        order = order[frac.ravel()[order] > 0]
        pick = order[:n_patches]
    out = []
    for i in pick:
        y, x = int(ys.ravel()[i]), int(xs.ravel()[i])
        patch, pm = image[y:y + size, x:x + size], mask[y:y + size, x:x + size]
        out.append(patch[pm])
    return as_pixels(out)


def _sample(image: np.ndarray, mask: np.ndarray | None, seed: int) -> np.ndarray:
    """The pixels used to estimate an image's own stain statistics (mask pixels; subsampled when many)."""
    px = image.reshape(-1, 3) if mask is None else image[mask]
    if len(px) > MAX_ESTIMATE_PIXELS:
        idx = np.random.default_rng(seed).choice(len(px), MAX_ESTIMATE_PIXELS, replace=False)
        px = px[np.sort(idx)]
    return px
