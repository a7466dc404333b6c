"""Image files (JPG, PNG, TIFF) and in-memory image arrays -> RGB uint8 ``(H, W, 3)``.

Decisions
---------
- Greyscale (``L``, ``1``, ``I;16``...) becomes 3 equal channels (CytAssist images are greyscale).
- 16-bit (and other integer depths above 8 bits) are scaled to 0..255 by the type's full range, not by the
  image's own maximum, so two scans of the same kind keep comparable brightness.
- An alpha channel that is fully opaque (all 255) is dropped silently: many tools save RGBA by default.
  An alpha channel with transparent pixels is an error: what lies under a transparent pixel is not defined,
  and guessing (white? black?) would silently change the tissue mask and the stain statistics.
- PIL's decompression-bomb limit (~89 Mpx) is raised for our reads: legacy ST full-resolution JPGs are
  ~92 Mpx. We keep our own, higher ceiling (:data:`MAX_PIXELS`) so a corrupt header still fails cleanly.
"""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path
from typing import Iterator

import numpy as np

from hevisum.errors import HevisumError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".btf", ".bmp")
# About 1.2 Gpx: a 35k x 35k whole-slide export. Beyond that the RGB array alone is > 3.6 GB.
MAX_PIXELS = 1_200_000_000


@contextlib.contextmanager
def _pil_limit() -> Iterator[None]:
    """Lift PIL's global decompression-bomb limit for the duration of one read, then restore it."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def to_rgb_uint8(array: np.ndarray, where: str) -> np.ndarray:
    """Turn an image array into RGB uint8 ``(H, W, 3)``; ``where`` names it in error messages.

    Accepts ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` and ``(H, W, 4)`` (opaque alpha only); uint8, wider
    unsigned/signed integers (scaled by their full range: 16-bit / 257) and floats in [0, 1] or [0, 255].
    Returns a new array (the input is never modified) unless it is already RGB uint8.
    """
    a = np.asarray(array)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise HevisumError(
            f"{where}: image has shape {a.shape}; expected (H, W) greyscale, (H, W, 3) RGB or (H, W, 4) RGBA"
        )
    a = _to_uint8(a, where)
    if a.shape[2] in (2, 4):  # grey+alpha or RGBA
        alpha = a[:, :, -1]
        n_transparent = int(np.count_nonzero(alpha != 255))
        if n_transparent:
            raise HevisumError(
                f"{where}: image has an alpha channel with {n_transparent} transparent pixel(s) "
                f"({100.0 * n_transparent / alpha.size:.1f}%); expected an RGB image: flatten it onto the "
                "slide background (e.g. white) or save it without transparency"
            )
        a = a[:, :, :-1]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    if a.shape[0] < 1 or a.shape[1] < 1:
        raise HevisumError(f"{where}: image is empty (shape {a.shape})")
    return np.ascontiguousarray(a)


def _to_uint8(a: np.ndarray, where: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        info = np.iinfo(a.dtype)
        lo, hi = (0, info.max) if info.min == 0 else (info.min, info.max)
        if info.min < 0:
            # Signed images (rare: 'I' mode from 16-bit PNG) hold non-negative data; scale by the 16-bit range
            # when the values fit it, else by the type's range.
            mx = int(a.max()) if a.size else 0
            mn = int(a.min()) if a.size else 0
            if mn < 0:
                raise HevisumError(f"{where}: image has negative pixel values (min {mn}); expected 0..255 or 0..65535")
            lo, hi = (0, 65535) if mx <= 65535 else (0, info.max)
        scaled = (a.astype(np.float64) - lo) * (255.0 / (hi - lo))
        return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        if not finite.all():
            raise HevisumError(f"{where}: image has {int((~finite).sum())} non-finite pixel values")
        mn = float(a.min()) if a.size else 0.0
        mx = float(a.max()) if a.size else 0.0
        if mn < 0:
            raise HevisumError(f"{where}: float image has negative values (min {mn:g}); expected [0, 1] or [0, 255]")
        if mx <= 1.0:
            return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)
        if mx <= 255.0:
            return np.clip(np.rint(a), 0, 255).astype(np.uint8)
        raise HevisumError(f"{where}: float image has values up to {mx:g}; expected [0, 1] or [0, 255]")
    raise HevisumError(f"{where}: image dtype {a.dtype} is not supported; expected uint8, uint16 or float")


def read_image(path: str | Path) -> np.ndarray:
    """Read a JPG/PNG/TIFF file as RGB uint8 ``(H, W, 3)`` at full resolution (see module notes)."""
    image, _ = read_image_scaled(path, max_side=None)
    return image


def read_image_scaled(path: str | Path, max_side: int | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """Read an image file, shrunk so its longer side is at most ``max_side`` px (``None``: full size).

    Returns ``(image, (sx, sy))``: multiply x (column) coordinates by ``sx`` and y (row) by ``sy`` to map
    full-resolution pixels onto the returned image. JPEGs are decoded directly at a reduced size when
    ``max_side`` allows it (much faster and lighter than decoding 90 Mpx and shrinking).
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise HevisumError(f"image file {str(p)!r} not found")
    if max_side is not None and max_side < 8:
        raise HevisumError(f"max_side must be at least 8 px, got {max_side}")
    with _pil_limit():
        try:
            im = Image.open(p)
        except UnidentifiedImageError:
            raise HevisumError(
                f"{p}: not an image file PIL can read; expected {', '.join(IMAGE_SUFFIXES)}"
            ) from None
        except (OSError, ValueError, SyntaxError, struct.error, EOFError) as e:
            # damaged headers: PIL raises any of these
            raise HevisumError(f"{p}: cannot open image ({_one_line(e)}); the file may be damaged") from None
        with im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise HevisumError(
                    f"{p}: image is {w}x{h} px ({w * h / 1e6:.0f} Mpx), above the {MAX_PIXELS / 1e6:.0f} Mpx limit; "
                    "export a downscaled copy (and scale the spot coordinates) first"
                )
            target = _target_size(w, h, max_side)
            if target != (w, h) and im.format == "JPEG":
                # JPEG can decode at 1/2, 1/4, 1/8 scale; draft picks the largest reduction still >= target.
                im.draft(None, target)
            try:
                im.load()
                arr = _pil_to_array(im, p)
            except HevisumError:
                raise
            except (OSError, ValueError, SyntaxError, struct.error, EOFError, IndexError, TypeError) as e:
                arr = _tiff_fallback(p, e)
    arr = to_rgb_uint8(arr, str(p))
    if target != (arr.shape[1], arr.shape[0]):
        arr = _resize(arr, target)
    return arr, (target[0] / w, target[1] / h)


def _pil_to_array(im, p: Path) -> np.ndarray:
    mode = im.mode
    if mode in ("RGB", "L", "RGBA", "LA", "I;16", "I;16B", "I;16L", "I", "1"):
        return np.asarray(im)
    if mode == "P":
        # Palette images may carry transparency in the palette: expand to RGBA so the alpha rule applies.
        return np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
    if mode == "PA":
        return np.asarray(im.convert("RGBA"))
    if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    if mode == "F":
        return np.asarray(im)
    raise HevisumError(f"{p}: image mode {mode!r} is not supported; expected RGB, greyscale or 16-bit")


def _tiff_fallback(p: Path, err: Exception) -> np.ndarray:
    """PIL cannot decode some TIFFs (16-bit RGB, tiled BigTIFF); tifffile can when it is installed."""
    if p.suffix.lower() in (".tif", ".tiff", ".btf"):
        try:
            import tifffile
        except ImportError:
            tifffile = None
        if tifffile is not None:
            try:
                return np.asarray(tifffile.imread(p))  # series 0, full-resolution level
            except Exception as e2:  # noqa: BLE001 - any decoder failure becomes one user error below
                err = e2
    raise HevisumError(f"{p}: cannot decode image ({_one_line(err)}); expected an 8- or 16-bit RGB or greyscale "
                       "image")


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (decoders sometimes write several), shortened."""
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _target_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    if max_side is None or max(w, h) <= max_side:
        return (w, h)
    s = max_side / max(w, h)
    return (max(1, round(w * s)), max(1, round(h * s)))


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with _pil_limit():
        # BOX averages every source pixel that falls in a target pixel: the right filter for shrinking.
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def downscale_image(image: np.ndarray, max_side: int) -> tuple[np.ndarray, tuple[float, float]]:
    """Shrink an RGB uint8 image so its longer side is at most ``max_side`` (area averaging).

    Returns ``(image, (sx, sy))`` with the per-axis factors to apply to x and y coordinates; an image already
    small enough is returned as is with ``(1.0, 1.0)``. The input is not modified.
    """
    if max_side < 8:
        raise HevisumError(f"max_side must be at least 8 px, got {max_side}")
    h, w = image.shape[:2]
    target = _target_size(w, h, max_side)
    if target == (w, h):
        return image, (1.0, 1.0)
    return _resize(image, target), (target[0] / w, target[1] / h)


def find_image(folder: Path, stem: str) -> Path | None:
    """The image file ``<folder>/<stem>.<ext>`` for any supported extension (case-insensitive), or None."""
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.stem == stem and p.suffix.lower() in IMAGE_SUFFIXES:
            return p
    return None
