"""Synthetic H&E-like slides with spots and cell-type abundances: the built-in demo dataset.

Every slide is drawn from a few smooth *latent fields* (3 to 5 values per pixel). The same fields drive
both sides of the task, with one mapping shared by all slides, so a model can learn targets from image
tiles and carry what it learned to an unseen slide:

* image: nuclei density, eosin intensity, nuclear size, stroma texture frequency and (with 5 fields)
  a haematoxylin tint of the stroma, rendered with the Beer-Lambert colour model of H&E;
* targets: ``softmax(bias + weights @ z + noise)`` at each spot centre, small values replaced by the
  ~1e-10 jitter that deconvolution tools leave for absent types.

On top of that come the nuisances a real pipeline must handle: per-slide stain variation, a wavy tissue
outline with a hole, one slide on a black background, and spot grids shifted against the image on some
slides (the shift is recorded in ``meta['applied_shift']`` and, in the HDF5 file, as the ``applied_shift``
attribute of the spots dataset).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from hevisum.errors import HevisumError
from hevisum.slide import Slide

# Optical-density directions of haematoxylin (blue-purple) and eosin (pink), unit RGB vectors between the
# textbook colour-deconvolution values and common Macenko normalisation references.
_H_OD = np.array([0.62, 0.71, 0.33]) / np.linalg.norm([0.62, 0.71, 0.33])
_E_OD = np.array([0.12, 0.90, 0.42]) / np.linalg.norm([0.12, 0.90, 0.42])

# What each latent field controls in the image, in field order (the first ``n_latent`` are used).
APPEARANCE = ("nuclei_density", "eosin", "nuclear_size", "texture", "stroma_hue")

# A type whose share falls below this is "absent" and gets a ~1e-10 value, as in real deconvolution output.
_ABSENT_BELOW = 0.012

# CLI flag for each DemoSpec field the CLI exposes, so errors name what the user typed.
_FLAGS = {"n_train": "--n-train", "n_test": "--n-test", "n_spots": "--spots", "n_targets": "--n-targets",
          "seed": "--seed"}

_MAX_SIDE_PX = 4000  # keeps a demo slide (and the arrays drawing it) to a few hundred MB at most


@dataclass(frozen=True)
class DemoSpec:
    """What to generate. Every field is checked on construction (:class:`HevisumError` when invalid).

    n_train, n_test: number of Train slides (with targets) and Test slides (truth kept in ``meta``).
    n_spots: approximate in-tissue spots per slide; the image size follows from it and ``pitch_px``.
    n_targets: number of abundance columns ``C1..Cn``.
    seed: makes everything reproducible; another seed gives other slides and another latent->target map.
    pitch_px: centre-to-centre spot distance in image pixels.
    grid: ``"hex"`` (Visium-like) or ``"square"`` (legacy ST-like) spot grid.
    n_latent: number of latent fields (3..5) shared by image and targets.
    field_scale_pitch: smoothness of the latent fields (Gaussian sigma) in spot pitches.
    target_noise: standard deviation of the per-spot noise added to the target logits.
    shift_max_pitch: largest spot-grid shift in pitches (0 disables shifts); shifted are the Train slides
        with even index (1st, 3rd...) and every Test slide, by 0.4 to 1 times this amount.
    black_background: draw the 2nd Train slide (the 1st when there is only one) on black instead of white.
    """

    n_train: int = 4
    n_test: int = 1
    n_spots: int = 300
    n_targets: int = 35
    seed: int = 0
    pitch_px: float = 26.0
    grid: str = "hex"
    n_latent: int = 4
    field_scale_pitch: float = 2.0
    target_noise: float = 0.35
    shift_max_pitch: float = 1.0
    black_background: bool = True

    def __post_init__(self) -> None:
        _check_int("n_train", self.n_train, 1, 100)
        _check_int("n_test", self.n_test, 1, 20)
        _check_int("n_spots", self.n_spots, 20, 20000)
        _check_int("n_targets", self.n_targets, 2, 1000)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_float("pitch_px", self.pitch_px, 8.0, 200.0)
        if self.grid not in ("hex", "square"):
            raise HevisumError(f"DemoSpec: grid must be 'hex' or 'square', got {self.grid!r}")
        _check_int("n_latent", self.n_latent, 3, len(APPEARANCE))
        _check_float("field_scale_pitch", self.field_scale_pitch, 0.5, 10.0)
        _check_float("target_noise", self.target_noise, 0.0, 3.0)
        _check_float("shift_max_pitch", self.shift_max_pitch, 0.0, 1.2)
        if not isinstance(self.black_background, (bool, np.bool_)):
            raise HevisumError(f"DemoSpec: black_background must be True or False, got {self.black_background!r}")
        side = 2 * math.sqrt(self.n_spots * _cell_area(self.pitch_px, self.grid) / math.pi) * 1.45
        if side > _MAX_SIDE_PX:
            raise HevisumError(
                f"DemoSpec: n_spots={self.n_spots} at pitch_px={self.pitch_px:g} needs images of about "
                f"{side:.0f} px; keep them under {_MAX_SIDE_PX} px (fewer spots or a smaller pitch)"
            )

    @property
    def n_slides(self) -> int:
        return self.n_train + self.n_test

    @property
    def target_names(self) -> list[str]:
        return [f"C{i + 1}" for i in range(self.n_targets)]


def _field_name(name: str) -> str:
    return f"{name} ({_FLAGS[name]})" if name in _FLAGS else name


def _check_int(name: str, value: object, lo: int, hi: int) -> None:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)) and lo <= value <= hi
    if not ok:
        raise HevisumError(f"DemoSpec: {_field_name(name)} must be an integer in {lo}..{hi}, got {value!r}")


def _check_float(name: str, value: object, lo: float, hi: float) -> None:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and math.isfinite(float(value)) and lo <= float(value) <= hi)
    if not ok:
        raise HevisumError(f"DemoSpec: {_field_name(name)} must be a number in [{lo:g}, {hi:g}], got {value!r}")


def _cell_area(pitch: float, grid: str) -> float:
    """Tissue area per spot of a grid with this pitch."""
    return pitch * pitch * (math.sqrt(3) / 2 if grid == "hex" else 1.0)


# ----------------------------------------------------------------------------------------------
# pure numeric pieces: arrays (and an explicit rng) in, arrays out
# ----------------------------------------------------------------------------------------------


def latent_to_abundance_map(n_targets: int, n_latent: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw the map shared by all slides: ``bias`` ``(n_targets,)`` and ``weights`` ``(n_targets, n_latent)``.

    Each type responds to a random subset of the latent fields (at least one), so types form groups
    that rise and fall together, as cell types of one tissue compartment do.
    """
    bias = rng.normal(0.0, 0.7, n_targets)
    use = rng.random((n_targets, n_latent)) < 0.6
    use[np.arange(n_targets), rng.integers(0, n_latent, n_targets)] = True
    weights = rng.normal(0.0, 0.7, (n_targets, n_latent)) * use
    return bias, weights


def abundances_from_latent(z: np.ndarray, bias: np.ndarray, weights: np.ndarray, noise: float,
                           rng: np.random.Generator) -> np.ndarray:
    """Abundances ``(n_spots, n_targets)`` from latent values ``z`` ``(n_spots, n_latent)``.

    Rows are non-negative and sum to 1: a softmax of noisy logits, then shares below 1.2 % set to a
    row-specific ~1e-10 value with tiny jitter (how deconvolution output encodes absent types; their
    order is noise and cannot be predicted, as in real data).
    """
    logits = bias[None, :] + z @ weights.T + noise * rng.standard_normal((len(z), len(bias)))
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    absent = p < _ABSENT_BELOW
    absent[np.arange(len(p)), p.argmax(axis=1)] = False  # a spot always holds something
    p = np.where(absent, 0.0, p)
    p /= p.sum(axis=1, keepdims=True)
    tiny = 10.0 ** rng.uniform(-10.3, -9.7, (len(p), 1)) * (1.0 + 0.003 * rng.standard_normal(p.shape))
    p = np.where(absent, tiny, p)
    return p / p.sum(axis=1, keepdims=True)


def smooth_fields(shape: tuple[int, int], n: int, sigma_px: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` smooth Gaussian random fields of ``shape``, ``(n, H, W)`` float32, roughly unit variance.

    White noise is filtered on a grid 4x coarser than ``sigma_px`` and interpolated up, which keeps
    wide kernels cheap; the fields are smooth at that scale anyway.
    """
    h, w = shape
    step = max(sigma_px / 4.0, 1.0)
    gh, gw = int(math.ceil(h / step)) + 2, int(math.ceil(w / step)) + 2
    coarse = ndimage.gaussian_filter(rng.standard_normal((n, gh, gw)), sigma=(0, 4.0, 4.0), mode="wrap")
    coarse /= coarse.reshape(n, -1).std(axis=1)[:, None, None]
    yy = np.arange(h, dtype=np.float64) / step
    xx = np.arange(w, dtype=np.float64) / step
    out = np.empty((n, h, w), dtype=np.float32)
    for k in range(n):
        # separable linear interpolation: rows first, then columns
        rows = _interp_axis(coarse[k], yy, axis=0)
        out[k] = _interp_axis(rows, xx, axis=1)
    return out


def _interp_axis(a: np.ndarray, pos: np.ndarray, axis: int) -> np.ndarray:
    i0 = np.floor(pos).astype(np.int64)
    t = (pos - i0).astype(np.float64)
    a0 = np.take(a, i0, axis=axis)
    a1 = np.take(a, i0 + 1, axis=axis)
    t = t[:, None] if axis == 0 else t[None, :]
    return a0 * (1.0 - t) + a1 * t


def _unit_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma)
    return (f - f.mean()) / (f.std() + 1e-8)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass(frozen=True)
class _Outline:
    """A wavy blob in units of its mean radius: r(theta) = 1 + sum_k a_k cos(k theta + phi_k), stretched."""

    amp: np.ndarray
    phase: np.ndarray
    stretch: float
    hole: tuple[float, float, float, np.ndarray, np.ndarray] | None  # (cx, cy, radius, amp, phase), unit coords

    def radius(self, theta: np.ndarray) -> np.ndarray:
        return _wavy(theta, self.amp, self.phase)

    def unit_area(self) -> float:
        theta = np.linspace(0.0, 2 * math.pi, 2048, endpoint=False)
        area = 0.5 * float(np.mean(self.radius(theta) ** 2)) * 2 * math.pi
        if self.hole is not None:
            _, _, rh, ha, hp = self.hole
            area -= 0.5 * float(np.mean((rh * _wavy(theta, ha, hp)) ** 2)) * 2 * math.pi
        return area


def _wavy(theta: np.ndarray, amp: np.ndarray, phase: np.ndarray) -> np.ndarray:
    k = np.arange(2, 2 + len(amp))
    return 1.0 + np.sum(amp[:, None] * np.cos(k[:, None] * theta[None, :] + phase[:, None]), axis=0)


def _draw_outline(rng: np.random.Generator) -> _Outline:
    k = np.arange(2, 8)
    amp = rng.uniform(0.0, 0.09, len(k)) / np.sqrt(k - 1)  # sum <= 0.3: the blob never pinches off
    phase = rng.uniform(0, 2 * math.pi, len(k))
    stretch = float(np.exp(rng.uniform(-0.22, 0.22)))
    # A hole (tear, lumen) in every slide: spots there are off tissue, which realignment can exploit.
    ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0.0, 0.3)
    hole = (dist * math.cos(ang), dist * math.sin(ang), float(rng.uniform(0.1, 0.18)),
            rng.uniform(0.0, 0.08, 3), rng.uniform(0, 2 * math.pi, 3))
    return _Outline(amp, phase, stretch, hole)


def tissue_mask(shape: tuple[int, int], centre: tuple[float, float], radius_px: float, outline: _Outline,
                edge_noise: np.ndarray) -> np.ndarray:
    """Boolean ``(H, W)`` mask of the blob ``outline`` of mean radius ``radius_px`` centred at ``(x, y)``.

    ``edge_noise`` (an ``(H, W)`` field, about ±1) roughens the outline at a finer scale than its waves.
    """
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ux = (xx - centre[0]) / (radius_px * outline.stretch)
    uy = (yy - centre[1]) * outline.stretch / radius_px
    rough = 0.035 * edge_noise
    inside = np.hypot(ux, uy) < _radius_lookup(np.arctan2(uy, ux), outline.amp, outline.phase) + rough
    if outline.hole is not None:
        hx, hy, rh, ha, hp = outline.hole
        hole_r = rh * _radius_lookup(np.arctan2(uy - hy, ux - hx), ha, hp)
        inside &= np.hypot(ux - hx, uy - hy) > hole_r + rough * 0.5
    return inside


def _radius_lookup(theta: np.ndarray, amp: np.ndarray, phase: np.ndarray, n: int = 4096) -> np.ndarray:
    """``_wavy`` at every angle of an image via a table of ``n`` angles (cosines per pixel are slow)."""
    table = _wavy(np.linspace(-math.pi, math.pi, n, endpoint=False), amp, phase).astype(np.float32)
    idx = np.rint((theta + math.pi) * (n / (2 * math.pi))).astype(np.int64) % n
    return table[idx]


def spot_grid(shape: tuple[int, int], pitch: float, grid: str, rng: np.random.Generator) -> np.ndarray:
    """Integer spot centres ``(n, 2)`` (x, y) of a hex or square grid with random phase covering ``shape``.

    Rows run top to bottom and spots left to right within a row, so row order is reading order.
    """
    h, w = shape
    dy = pitch * math.sqrt(3) / 2 if grid == "hex" else pitch
    x0, y0 = rng.uniform(0, pitch), rng.uniform(0, dy)
    rows = np.arange(y0, h, dy)
    pts = []
    for i, y in enumerate(rows):
        off = pitch / 2 if (grid == "hex" and i % 2) else 0.0
        xs = np.arange(x0 + off, w, pitch)
        pts.append(np.column_stack([xs, np.full_like(xs, y)]))
    xy = np.rint(np.concatenate(pts))
    keep = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    return xy[keep]


def render_he(tissue: np.ndarray, fields: np.ndarray, pitch: float, rng: np.random.Generator, *,
              stain_h: np.ndarray = _H_OD, stain_e: np.ndarray = _E_OD, white: np.ndarray | None = None,
              black_background: bool = False) -> np.ndarray:
    """Render an H&E-like RGB uint8 image from a tissue mask and latent fields ``(n_latent, H, W)``.

    Field k controls ``APPEARANCE[k]``. Colours follow Beer-Lambert: ``rgb = white * exp(-(cH*h + cE*e))``
    with per-pixel haematoxylin/eosin amounts ``cH, cE`` and stain directions ``h, e``.
    """
    h, w = tissue.shape
    n_latent = len(fields)
    white = np.array([244.0, 242.0, 246.0]) if white is None else np.asarray(white, dtype=np.float64)
    soft = ndimage.gaussian_filter(tissue.astype(np.float32), 1.2)  # tissue edges are not pixel-sharp
    f_density, f_eosin, f_size = fields[0], fields[1], fields[2]
    f_texture = fields[3] if n_latent > 3 else None
    f_hue = fields[4] if n_latent > 4 else None

    # Stroma: fibres whose dominant frequency follows the texture field (fine where high, coarse where low).
    fine = _unit_noise((h, w), 1.0, rng)
    coarse = _unit_noise((h, w), 3.5, rng)
    mix = _sigmoid(1.6 * f_texture) if f_texture is not None else 0.5
    fibres = _sigmoid(1.8 * (mix * fine + (1.0 - mix) * coarse))
    c_e = 0.62 * np.exp(0.28 * f_eosin) * (0.55 + 0.75 * fibres)
    c_h = 0.07 * np.exp(0.6 * f_hue) if f_hue is not None else np.full((h, w), 0.07, np.float32)

    # Nuclei: an inhomogeneous Poisson process (thinning), density and size set by their fields.
    base_density = 0.006 * (26.0 / pitch) ** 2  # nuclei per px^2, scaled so cells keep their size in pitches
    log_gain = 0.75 * np.clip(f_density, -3, 3)
    lam_max = base_density * math.exp(0.75 * 3)
    n_cand = rng.poisson(lam_max * h * w)
    cx, cy = rng.uniform(0, w, n_cand), rng.uniform(0, h, n_cand)
    ix, iy = np.minimum(cx.astype(np.int64), w - 1), np.minimum(cy.astype(np.int64), h - 1)
    accept = rng.random(n_cand) < np.exp(log_gain[iy, ix] - 0.75 * 3) * tissue[iy, ix]
    cx, cy, ix, iy = cx[accept], cy[accept], ix[accept], iy[accept]
    n_nuc = len(cx)
    a = pitch * 0.12 * np.exp(0.3 * np.clip(f_size[iy, ix], -3, 3)) * rng.uniform(0.8, 1.2, n_nuc)
    b = a * rng.uniform(0.55, 0.9, n_nuc)
    ang = rng.uniform(0, math.pi, n_nuc)
    dark = rng.uniform(0.85, 1.15, n_nuc)
    nuc, halo = _stamp_ellipses((h, w), cx, cy, a, b, ang, dark)
    chromatin = 0.85 + 0.15 * fine
    c_h = c_h + 1.55 * np.minimum(nuc, 1.3) * chromatin
    c_e = c_e + 0.35 * np.minimum(halo, 1.0)  # cytoplasm: a pinker rim around each nucleus

    c_h = ndimage.gaussian_filter(c_h * soft, 0.6)
    c_e = ndimage.gaussian_filter(c_e * soft, 0.6)
    sh, se = np.asarray(stain_h, np.float32), np.asarray(stain_e, np.float32)
    od = c_h.astype(np.float32)[..., None] * sh + c_e.astype(np.float32)[..., None] * se
    rgb = white.astype(np.float32) * np.exp(-od)
    if black_background:
        # Scanners or masking sometimes leave black around the tissue; blend along the soft edge.
        dark_bg = np.array([10.0, 9.0, 12.0], np.float32)
        rgb = rgb * soft[..., None] + dark_bg * (1.0 - soft[..., None])
    rgb += 2.5 * rng.standard_normal(rgb.shape, dtype=np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _stamp_ellipses(shape: tuple[int, int], cx: np.ndarray, cy: np.ndarray, a: np.ndarray, b: np.ndarray,
                    ang: np.ndarray, dark: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum soft-edged filled ellipses (and a 1.8x larger rim) into two ``(H, W)`` maps, vectorised.

    Nuclei are stamped in groups of equal patch radius, so small nuclei do not pay for the largest patch.
    """
    h, w = shape
    out_n, out_h = np.zeros(h * w), np.zeros(h * w)
    patch_r = np.ceil(1.8 * a + 1.5).astype(np.int64)
    for r in np.unique(patch_r):
        sel = patch_r == r
        off = np.arange(-r, r + 1)
        oy, ox = np.meshgrid(off, off, indexing="ij")
        px = np.rint(cx[sel]).astype(np.int64)[:, None] + ox.ravel()[None, :]
        py = np.rint(cy[sel]).astype(np.int64)[:, None] + oy.ravel()[None, :]
        dx = (px - cx[sel, None]).astype(np.float32)
        dy = (py - cy[sel, None]).astype(np.float32)
        cos = np.cos(ang[sel, None]).astype(np.float32)
        sin = np.sin(ang[sel, None]).astype(np.float32)
        bs = b[sel, None].astype(np.float32)
        d = np.hypot((dx * cos + dy * sin) / a[sel, None].astype(np.float32), (dy * cos - dx * sin) / bs)
        # about one pixel of soft edge (d is in radii; multiplying by b converts to pixels)
        body = np.clip((1.0 - d) * bs + 0.5, 0.0, 1.0) * dark[sel, None].astype(np.float32)
        rim = np.clip((1.0 - d / 1.8) * bs + 0.5, 0.0, 1.0)
        ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
        idx = (py * w + px)[ok]
        out_n += np.bincount(idx, weights=body[ok], minlength=h * w)
        out_h += np.bincount(idx, weights=rim[ok], minlength=h * w)
    return out_n.reshape(h, w).astype(np.float32), out_h.reshape(h, w).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# slides
# ----------------------------------------------------------------------------------------------


def _shifted(spec: DemoSpec, index: int) -> bool:
    """Which slides get a shifted grid: Train slides 1, 3, 5... (even index) and every Test slide."""
    return spec.shift_max_pitch > 0 and (index >= spec.n_train or index % 2 == 0)


def _black(spec: DemoSpec, index: int) -> bool:
    return spec.black_background and index == min(1, spec.n_train - 1)


def _draw_shift(spec: DemoSpec, rng: np.random.Generator) -> tuple[float, float]:
    """A whole-pixel shift of 0.4..1 x shift_max_pitch pitches in a random direction (never (0, 0))."""
    mag = rng.uniform(0.4, 1.0) * spec.shift_max_pitch * spec.pitch_px
    ang = rng.uniform(0, 2 * math.pi)
    dx, dy = round(mag * math.cos(ang)), round(mag * math.sin(ang))
    if dx == 0 and dy == 0:
        dx = 1
    return float(dx), float(dy)


def make_demo_slide(spec: DemoSpec, index: int, bias: np.ndarray, weights: np.ndarray,
                    seed_seq: np.random.SeedSequence) -> Slide:
    """Slide number ``index`` (0-based; Train first, then Test) of ``spec`` from its own seed sequence."""
    rng = np.random.default_rng(seed_seq)
    pitch = float(spec.pitch_px)
    is_test = index >= spec.n_train
    slide_id = f"S_{index + 1}"

    # Tissue outline sized so that about n_spots grid points fall on it.
    outline = _draw_outline(rng)
    radius = math.sqrt(spec.n_spots * _cell_area(pitch, spec.grid) / outline.unit_area())
    theta = np.linspace(0, 2 * math.pi, 720, endpoint=False)
    r_max = float(outline.radius(theta).max()) + 0.05
    margin = int(math.ceil(1.2 * pitch * spec.shift_max_pitch + 0.5 * pitch)) + 12  # shifted spots stay inside
    half_w = radius * outline.stretch * r_max
    half_h = radius / outline.stretch * r_max
    w, h = int(math.ceil(2 * (half_w + margin))), int(math.ceil(2 * (half_h + margin)))
    centre = (w / 2 + rng.uniform(-2, 2), h / 2 + rng.uniform(-2, 2))
    tissue = tissue_mask((h, w), centre, radius, outline, _unit_noise((h, w), 0.25 * pitch, rng))

    # Latent fields: smooth, standardised on tissue, plus a small slide-level offset (slides differ a bit).
    fields = smooth_fields((h, w), spec.n_latent, spec.field_scale_pitch * pitch, rng)
    on = fields[:, tissue]
    fields = (fields - on.mean(axis=1)[:, None, None]) / (on.std(axis=1)[:, None, None] + 1e-8)
    fields += rng.normal(0.0, 0.3, spec.n_latent)[:, None, None].astype(np.float32)

    # Per-slide stain variation: stain directions, amounts and the scanner's white point.
    stain_h = _H_OD + rng.normal(0, 0.03, 3)
    stain_e = _E_OD + rng.normal(0, 0.03, 3)
    stain_h = np.abs(stain_h) / np.linalg.norm(stain_h) * rng.uniform(0.9, 1.1)
    stain_e = np.abs(stain_e) / np.linalg.norm(stain_e) * rng.uniform(0.9, 1.1)
    white = np.clip(244.0 + rng.normal(0, 3.0, 3), 225, 255)
    image = render_he(tissue, fields, pitch, rng, stain_h=stain_h, stain_e=stain_e, white=white,
                      black_background=_black(spec, index))

    # Spots: grid points whose true centre is on tissue, then the (possibly) shifted stored coordinates.
    grid = spot_grid((h, w), pitch, spec.grid, rng)
    gx, gy = grid[:, 0].astype(np.int64), grid[:, 1].astype(np.int64)
    true_xy = grid[tissue[gy, gx]]
    tx, ty = true_xy[:, 0].astype(np.int64), true_xy[:, 1].astype(np.int64)
    z = fields[:, ty, tx].T.astype(np.float64)
    targets = abundances_from_latent(z, bias, weights, spec.target_noise, rng)
    shift = _draw_shift(spec, rng) if _shifted(spec, index) else (0.0, 0.0)
    xy = true_xy + np.array(shift)[None, :]
    # Internal invariant: the margin was sized for the largest allowed shift.
    assert (xy >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] < h).all()

    spots = pd.DataFrame({"spot_id": np.arange(len(xy)).astype(str), "x": xy[:, 0], "y": xy[:, 1]})
    names = spec.target_names
    meta: dict = {"applied_shift": shift, "true_xy": true_xy, "latent": z, "grid": spec.grid,
                  "pitch_px": pitch, "background": "black" if _black(spec, index) else "white",
                  "tissue_mask": tissue}
    if is_test:
        # Public/private halves of the leaderboard, as in the competition file's Test_Set column.
        spots["test_set"] = rng.integers(1, 3, len(spots))
        meta["truth"], meta["truth_names"] = targets, names
    slide = Slide(slide_id=slide_id, image=image, spots=spots, targets=None if is_test else targets,
                  target_names=None if is_test else names, um_per_px=None, split="test" if is_test else "train",
                  source=f"demo(seed={spec.seed})", meta=meta)
    return slide.validate()


def make_demo_slides(spec: DemoSpec | None = None, *, progress: bool = False) -> list[Slide]:
    """All slides of ``spec``: ``n_train`` Train slides with targets, then ``n_test`` Test slides.

    Test slides have ``targets=None``; their truth is in ``meta['truth']`` (names in ``meta['truth_names']``).
    Every slide's ``meta`` holds ``applied_shift`` ((0, 0) when unshifted; stored = true + shift),
    ``true_xy``, ``latent`` (per-spot latent values), ``tissue_mask``, ``grid``, ``pitch_px`` and ``background``.
    """
    spec = DemoSpec() if spec is None else spec
    # Child 0 draws the latent->target map shared by all slides; child i+1 draws slide i. Children depend
    # only on (seed, index), so adding slides leaves the earlier ones unchanged.
    children = np.random.SeedSequence(spec.seed).spawn(spec.n_slides + 1)
    bias, weights = latent_to_abundance_map(spec.n_targets, spec.n_latent, np.random.default_rng(children[0]))
    from tqdm.auto import tqdm

    # The default dataset takes about a second; the bar only shows up for large specs (delay).
    indices = tqdm(range(spec.n_slides), desc="demo slides", unit="slide", disable=not progress, delay=2.0)
    return [make_demo_slide(spec, i, bias, weights, children[i + 1]) for i in indices]


def demo_truth_frame(slides: list[Slide]) -> pd.DataFrame:
    """The Test slides' truth as a table ``slide, ID, C1..Cn`` (``ID`` = row in ``spots/Test/<slide>``)."""
    frames = []
    for s in slides:
        if s.split != "test":
            continue
        truth = s.meta.get("truth")
        if truth is None:
            raise HevisumError(f"{s.where()}: test slide has no meta['truth'] to write as truth")
        truth = np.asarray(truth, dtype=np.float64)
        cols = [f"C{i + 1}" for i in range(truth.shape[1])]
        df = pd.DataFrame(truth, columns=cols)
        df.insert(0, "ID", np.arange(len(truth), dtype=np.int64))
        df.insert(0, "slide", s.slide_id)
        frames.append(df)
    if not frames:
        raise HevisumError("no Test slides among the slides; the truth table needs at least one")
    return pd.concat(frames, ignore_index=True)


def truth_path_for(path: str | Path) -> Path:
    """Where :func:`write_demo` puts the Test truth for the HDF5 file ``path``: ``<stem>_test_truth.csv``."""
    p = Path(path)
    return p.with_name(f"{p.stem}_test_truth.csv")


def write_demo(path: str | Path, spec: DemoSpec | None = None, *, progress: bool = True) -> tuple[Path, Path]:
    """Generate the demo dataset and write it: the competition HDF5 at ``path`` and the Test truth CSV beside it.

    Both files are written atomically. Returns ``(h5_path, truth_csv_path)``; the truth CSV is named by
    :func:`truth_path_for` (``<stem>_test_truth.csv``).
    """
    from hevisum.io.atomic import atomic_path
    from hevisum.io.competition import write_competition_h5

    h5 = Path(path)
    if h5.is_dir():
        raise HevisumError(f"output {str(h5)!r} is a folder; give a file name such as {str(h5 / 'demo.h5')!r}")
    truth_csv = truth_path_for(h5)
    slides = make_demo_slides(spec, progress=progress)
    truth = demo_truth_frame(slides)
    write_competition_h5(slides, h5)
    with atomic_path(truth_csv) as tmp:
        truth.to_csv(tmp, index=False)
    return h5, truth_csv
