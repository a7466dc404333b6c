"""Whole-slide images read region by region: pyramids, tiles on demand, thumbnails and generated test slides.

This module never loads the whole image of a pyramidal or tiled file, so slide size is bounded by disk, not RAM.
The readers of slides with spots use it too (:func:`read_slide_image`): such a file becomes a working image for
masks and realignment, and the tiles are read from the file (``Slide.meta['level0']``).

Sources (:func:`open_image` picks one from the file; ``backend=`` forces it)
---------------------------------------------------------------------------
- ``openslide``: SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, SVSLIDE and generic tiled TIFF, when ``openslide-python``
  (and its library, e.g. ``openslide-bin``) is importable.
- ``tifffile``: OME-TIFF, BigTIFF and TIFF pyramids (levels as SubIFDs or as reduced-resolution pages), stripped
  TIFF, and the TIFF-based vendor formats (SVS, NDPI, SCN, BIF) when OpenSlide is missing. Tiles or strips are
  decoded on demand and kept in a small LRU cache.
- ``pil``: PNG, JPEG, BMP: decoded whole into memory, as :mod:`hevisum.io.images` does.

Pixels: greyscale becomes 3 equal channels, 16-bit is scaled by the type's full range, an alpha channel is
composited onto white (OpenSlide reports areas outside the scanned region as transparent). A region partly
outside the image is an error for :meth:`ImageSource.read_region` unless ``pad=True``; :func:`read_tiles` always
pads with white.

Microns per pixel (level 0), first found of: the ``um_per_px`` argument; OpenSlide's ``openslide.mpp-x``; OME
``PhysicalSizeX`` (with its unit); the Aperio ``MPP`` field; the TIFF ``XResolution`` tag with ``ResolutionUnit``
inch or centimetre; a PNG/JPEG ``dpi``. Values from metadata outside 0.05-40 µm/px are ignored (72, 96 or 300 dpi
are screen or print defaults, not a scan resolution); the result is ``None`` when nothing is known.

Resolution: a region read at ``out_um_per_px`` or ``out_size`` comes from the coarsest pyramid level whose
downsample is at most the requested one (2 % tolerance, so rounding an output size never forces a 16x larger
read), then is resampled to the output with an area filter (bilinear when enlarging), with sub-pixel exact
placement. Large windows are resampled block by block, so a thumbnail of a slide without a pyramid never holds
level 0.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from hevisum.errors import HevisumError

if TYPE_CHECKING:  # pragma: no cover
    pass

__all__ = [
    "ImageSource",
    "SyntheticSlide",
    "WSI_SUFFIXES",
    "he_patches",
    "open_image",
    "openslide_available",
    "read_slide_image",
    "read_tiles",
    "tissue_thumbnail",
    "write_pyramidal_tiff",
]

#: vendor formats OpenSlide reads (MRXS, VMS/VMU need it; the TIFF-based ones fall back to tifffile)
OPENSLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide")
TIFF_BASED_VENDOR = (".svs", ".ndpi", ".scn", ".bif", ".svslide")
TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".tf2")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
WSI_SUFFIXES = OPENSLIDE_SUFFIXES + TIFF_SUFFIXES + PIL_SUFFIXES
BACKENDS = ("openslide", "tifffile", "pil")
_VALID = "SVS, NDPI, MRXS, SCN, VMS, BIF, (OME-/Big)TIFF, PNG, JPEG or BMP"

# plausible scan resolutions; metadata outside this range is a screen/print default, not a scan
_MIN_UM, _MAX_UM = 0.05, 40.0
# a level is "as fine as" the request when its downsample is at most this much above it
_LEVEL_TOLERANCE = 1.02
# resampling works on source windows of at most this many pixels per side
_BLOCK_SOURCE_PX = 2048
# decoded-segment cache of the tifffile source
_CACHE_BYTES = 96 * 2**20


def openslide_available() -> bool:
    """True when ``openslide`` (the Python binding and its C library) can be imported."""
    try:
        import openslide  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


# =============================================================================================== sources


class ImageSource:
    """A slide image read region by region. Coordinates are level-0 pixels, x = column, y = row.

    Attributes: ``path``, ``backend`` (``"openslide"``, ``"tifffile"`` or ``"pil"``), ``width``, ``height``
    (level 0), ``um_per_px`` (level 0, ``None`` if unknown), ``levels``: ``[(width, height, downsample), ...]``
    from level 0 (downsample 1) to the coarsest.
    """

    backend = ""

    def __init__(self, path: Path, levels: list[tuple[int, int]], um_per_px: float | None,
                 downsamples: list[tuple[float, float]] | None = None) -> None:
        self.path = Path(path)
        self.width, self.height = int(levels[0][0]), int(levels[0][1])
        if downsamples is None:
            downsamples = [(self.width / w, self.height / h) for w, h in levels]
        self._dims = [(int(w), int(h)) for w, h in levels]
        self._ds = [(float(a), float(b)) for a, b in downsamples]
        self.levels = [(w, h, (a + b) / 2) for (w, h), (a, b) in zip(self._dims, self._ds)]
        self.um_per_px = um_per_px

    # --------------------------------------------------------------------------------------- public API

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file."""

    def __repr__(self) -> str:
        um = f"{self.um_per_px:.4g} um/px" if self.um_per_px else "um/px unknown"
        return (f"<{type(self).__name__} {self.path.name!r} {self.width}x{self.height}, "
                f"{len(self.levels)} level(s), {um}>")

    def best_level(self, downsample: float) -> int:
        """Index of the coarsest level whose downsample is at most ``downsample`` (2 % tolerance); 0 if none."""
        best = 0
        for i, (_, _, ds) in enumerate(self.levels):
            if ds <= downsample * _LEVEL_TOLERANCE and ds > self.levels[best][2]:
                best = i
        return best

    def read_region(self, x: float, y: float, w: float, h: float, *, out_um_per_px: float | None = None,
                    out_size: int | tuple[int, int] | None = None, pad: bool = False) -> np.ndarray:
        """The level-0 rectangle ``(x, y, w, h)`` as RGB uint8 ``(h', w', 3)``.

        Output size: ``out_size`` (``(width, height)`` or one int for a square), or the size at
        ``out_um_per_px`` (needs :attr:`um_per_px`), or ``(round(w), round(h))`` at level-0 resolution.
        The pixels come from :meth:`best_level` for the requested downsample, resampled with an area filter.
        ``pad=False``: a rectangle reaching outside the image is an error; ``pad=True``: that part is white.
        """
        x, y, w, h = (float(v) for v in (x, y, w, h))
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            raise HevisumError(f"{self.path}: region (x={x:g}, y={y:g}, w={w:g}, h={h:g}) needs finite x, y and "
                               "w, h > 0")
        eps = 1e-6
        if not pad and (x < -eps or y < -eps or x + w > self.width + eps or y + h > self.height + eps):
            raise HevisumError(
                f"{self.path}: region (x={x:g}, y={y:g}, w={w:g}, h={h:g}) lies outside the {self.width}x"
                f"{self.height} image; valid regions have 0 <= x, x + w <= {self.width}, 0 <= y, "
                f"y + h <= {self.height} (level-0 pixels)"
            )
        ow, oh = self._out_size(w, h, out_um_per_px, out_size)
        from hevisum.io.images import MAX_PIXELS

        if ow * oh > MAX_PIXELS:
            raise HevisumError(
                f"{self.path}: the requested output is {ow}x{oh} px ({ow * oh / 1e6:.0f} Mpx), above the "
                f"{MAX_PIXELS / 1e6:.0f} Mpx limit of one read; read a smaller region or ask for out_size / "
                "out_um_per_px"
            )
        level = self.best_level(min(w / ow, h / oh))
        return self._resample(level, x, y, w, h, ow, oh)

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The whole slide with its longer side ``max_side`` px (never enlarged): ``(image, scale)``.

        ``scale`` maps level-0 pixels to thumbnail pixels (``x_thumb = x * scale``), exactly along the longer side
        and within half a thumbnail pixel along the other.
        """
        if not isinstance(max_side, (int, np.integer)) or max_side < 8:
            raise HevisumError(f"{self.path}: thumbnail max_side must be an integer >= 8, got {max_side!r}")
        scale = min(1.0, max_side / max(self.width, self.height))
        tw, th = max(1, round(self.width * scale)), max(1, round(self.height * scale))
        img = self.read_region(0, 0, self.width, self.height, out_size=(tw, th))
        exact = tw / self.width if self.width >= self.height else th / self.height
        return img, exact

    # --------------------------------------------------------------------------------------- internals

    def _out_size(self, w: float, h: float, out_um: float | None,
                  out_size: int | tuple[int, int] | None) -> tuple[int, int]:
        if out_um is not None and out_size is not None:
            raise HevisumError(f"{self.path}: give out_um_per_px or out_size, not both")
        if out_size is not None:
            if isinstance(out_size, (int, np.integer)):
                ow = oh = int(out_size)
            else:
                try:
                    ow, oh = (int(v) for v in out_size)
                except (TypeError, ValueError):
                    raise HevisumError(f"{self.path}: out_size must be an int or (width, height), got "
                                       f"{out_size!r}") from None
            if ow < 1 or oh < 1:
                raise HevisumError(f"{self.path}: out_size must be at least 1x1 px, got {out_size!r}")
            return ow, oh
        if out_um is not None:
            if not (isinstance(out_um, (int, float, np.floating)) and math.isfinite(out_um) and out_um > 0):
                raise HevisumError(f"{self.path}: out_um_per_px must be a positive number, got {out_um!r}")
            if self.um_per_px is None:
                raise HevisumError(
                    f"{self.path}: the image resolution (um/px) is unknown, so out_um_per_px cannot be used; pass "
                    "um_per_px= when opening the image, or ask for out_size"
                )
            f = self.um_per_px / float(out_um)
            return max(1, round(w * f)), max(1, round(h * f))
        return max(1, round(w)), max(1, round(h))

    def _resample(self, level: int, x: float, y: float, w: float, h: float, ow: int, oh: int) -> np.ndarray:
        """Level-0 rectangle -> ``(oh, ow, 3)`` from ``level``: sub-pixel exact box, area filter, in blocks."""
        from PIL import Image

        dsx, dsy = self._ds[level]
        lw, lh = self._dims[level]
        lx0, ly0, lx1, ly1 = x / dsx, y / dsy, (x + w) / dsx, (y + h) / dsy
        ix0, iy0 = round(lx0), round(ly0)
        if (ow, oh) == (round(lx1 - lx0), round(ly1 - ly0)) and abs(lx0 - ix0) < 1e-6 and abs(ly0 - iy0) < 1e-6 \
                and abs(lx1 - lx0 - ow) < 1e-6 and abs(ly1 - ly0 - oh) < 1e-6:
            return self._window(level, ix0, iy0, ow, oh)
        sx, sy = (lx1 - lx0) / ow, (ly1 - ly0) / oh  # level pixels per output pixel
        resample = Image.Resampling.BOX if min(sx, sy) >= 1.0 else Image.Resampling.BILINEAR
        bx = max(1, int(_BLOCK_SOURCE_PX / max(sx, 1.0)))
        by = max(1, int(_BLOCK_SOURCE_PX / max(sy, 1.0)))
        if bx >= ow and by >= oh:
            bx, by = ow, oh
        out = np.empty((oh, ow, 3), dtype=np.uint8)
        for oy0 in range(0, oh, by):
            oy1 = min(oh, oy0 + by)
            fy0, fy1 = ly0 + oy0 * sy, ly0 + oy1 * sy
            wy0, wy1 = _window_bounds(fy0, fy1, lh)
            for ox0 in range(0, ow, bx):
                ox1 = min(ow, ox0 + bx)
                fx0, fx1 = lx0 + ox0 * sx, lx0 + ox1 * sx
                wx0, wx1 = _window_bounds(fx0, fx1, lw)
                win = self._window(level, wx0, wy0, wx1 - wx0, wy1 - wy0)
                box = (_clamp(fx0 - wx0, wx1 - wx0), _clamp(fy0 - wy0, wy1 - wy0),
                       _clamp(fx1 - wx0, wx1 - wx0), _clamp(fy1 - wy0, wy1 - wy0))
                im = Image.fromarray(win).resize((ox1 - ox0, oy1 - oy0), resample, box=box)
                out[oy0:oy1, ox0:ox1] = np.asarray(im)
        return out

    def _window(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Integer level-pixel window ``(h, w, 3)``; white where it leaves the level."""
        lw, lh = self._dims[level]
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + w, lw), min(y0 + h, lh)
        if (cx0, cy0, cx1, cy1) == (x0, y0, x0 + w, y0 + h):
            return self._read_level(level, x0, y0, w, h)
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        if cx0 < cx1 and cy0 < cy1:
            out[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] = self._read_level(level, cx0, cy0, cx1 - cx0, cy1 - cy0)
        return out

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of a window inside ``level`` (integer level pixels). Backends implement it."""
        raise NotImplementedError


def _window_bounds(f0: float, f1: float, n: int) -> tuple[int, int]:
    """Integer source span covering [f0, f1), with one pixel of context inside the level for bilinear."""
    a, b = math.floor(f0 + 1e-9), math.ceil(f1 - 1e-9)
    if b <= a:
        b = a + 1
    if a - 1 >= 0:
        a -= 1
    if b + 1 <= n:
        b += 1
    return a, b


def _clamp(v: float, hi: int) -> float:
    return min(max(v, 0.0), float(hi))


def _rgb(a: np.ndarray, where: str, minis_white: bool = False) -> np.ndarray:
    """Decoded pixels (H, W[, C]) of any integer/float depth -> RGB uint8; alpha composited onto white."""
    from hevisum.io.images import _to_uint8

    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise HevisumError(f"{where}: decoded pixels have shape {a.shape}; expected greyscale, RGB or RGBA")
    a = _to_uint8(a, where)
    if minis_white:
        a = 255 - a
    if a.shape[2] in (2, 4) and a[:, :, -1].min() == 255:
        a = a[:, :, :-1]
    elif a.shape[2] in (2, 4):
        alpha = a[:, :, -1:].astype(np.uint16)
        colour = a[:, :, :-1].astype(np.uint16)
        # round(colour * alpha / 255 + 255 * (1 - alpha / 255)) in integers
        a = ((colour * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def _plausible_um(um: float | None) -> float | None:
    if um is None or not math.isfinite(um) or not (_MIN_UM <= um <= _MAX_UM):
        return None
    return float(um)


class PILSource(ImageSource):
    """PNG / JPEG / BMP, decoded whole into memory (one level)."""

    backend = "pil"

    def __init__(self, path: Path, um_per_px: float | None = None) -> None:
        from PIL import Image, UnidentifiedImageError

        from hevisum.io.images import MAX_PIXELS, _pil_limit, _pil_to_array

        with _pil_limit():
            try:
                im = Image.open(path)
            except UnidentifiedImageError:
                raise HevisumError(f"{path}: not an image file PIL can read; expected {_VALID}") from None
            except OSError as e:
                raise HevisumError(f"{path}: cannot open image ({e}); expected {_VALID}") from None
            with im:
                w, h = im.size
                if w * h > MAX_PIXELS:
                    raise HevisumError(
                        f"{path}: image is {w}x{h} px ({w * h / 1e6:.0f} Mpx), above the {MAX_PIXELS / 1e6:.0f} Mpx "
                        "limit for PNG/JPEG (decoded whole); convert it to a tiled pyramidal TIFF"
                    )
                dpi = im.info.get("dpi")
                try:
                    im.load()
                    arr = _pil_to_array(im, path)
                except HevisumError:
                    raise
                except (OSError, ValueError, SyntaxError) as e:
                    raise HevisumError(f"{path}: cannot decode image ({e}); expected {_VALID}") from None
        self._image = _rgb(arr, str(path))
        meta = None
        try:
            if dpi and float(dpi[0]) > 0:
                meta = _plausible_um(25400.0 / float(dpi[0]))
        except (TypeError, ValueError, IndexError):
            meta = None
        super().__init__(path, [(w, h)], um_per_px if um_per_px is not None else meta)

    def close(self) -> None:
        """Drop the decoded image."""
        self._image = np.zeros((1, 1, 3), dtype=np.uint8)

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        return self._image[y0:y0 + h, x0:x0 + w]


class OpenSlideSource(ImageSource):
    """Any format OpenSlide reads; regions come from ``OpenSlide.read_region`` (RGBA composited onto white)."""

    backend = "openslide"

    def __init__(self, path: Path, um_per_px: float | None = None) -> None:
        import openslide

        try:
            self._slide = openslide.OpenSlide(str(path))
        except (openslide.OpenSlideError, OSError, ValueError) as e:
            raise HevisumError(f"{path}: OpenSlide cannot read this file ({_first_line(e)}); expected {_VALID}") \
                from None
        s = self._slide
        props = s.properties
        meta = None
        for key in ("openslide.mpp-x", "openslide.mpp-y"):
            try:
                meta = _plausible_um(float(props[key]))
            except (KeyError, ValueError):
                continue
            if meta is not None:
                break
        if meta is None:
            meta = _um_from_resolution(props.get("tiff.XResolution"), props.get("tiff.ResolutionUnit"))
        downs = [(float(d), float(d)) for d in s.level_downsamples]
        super().__init__(path, [tuple(d) for d in s.level_dimensions], um_per_px if um_per_px is not None else meta,
                         downs)
        self.properties = dict(props)

    def close(self) -> None:
        """Close the OpenSlide handle."""
        self._slide.close()

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        ds = self._ds[level][0]
        loc = (int(round(x0 * ds)), int(round(y0 * ds)))
        try:
            rgba = np.asarray(self._slide.read_region(loc, level, (int(w), int(h))))
        except Exception as e:  # openslide.OpenSlideError and friends: the file is damaged
            raise HevisumError(f"{self.path}: cannot read level {level} at {loc} ({_first_line(e)})") from None
        return _rgb(rgba, str(self.path))


def _um_from_resolution(res: Any, unit: Any) -> float | None:
    """µm/px from a TIFF XResolution (pixels per unit) and ResolutionUnit (2/inch, 3/centimeter)."""
    try:
        if isinstance(res, tuple):
            value = float(res[0]) / float(res[1])
        else:
            value = float(res)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not value > 0:
        return None
    u = str(getattr(unit, "name", unit)).lower()
    if u in ("2", "inch"):
        return _plausible_um(25400.0 / value)
    if u in ("3", "centimeter", "centimetre"):
        return _plausible_um(10000.0 / value)
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


_OME_UNITS = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4,
              "pm": 1e-6}


class TiffSource(ImageSource):
    """TIFF, BigTIFF, OME-TIFF and TIFF-based vendor pyramids through ``tifffile``, decoded segment by segment."""

    backend = "tifffile"

    def __init__(self, path: Path, um_per_px: float | None = None) -> None:
        import tifffile

        self.path = Path(path)
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series
        except Exception as e:  # tifffile raises TiffFileError, ValueError, struct.error... on damaged files
            raise HevisumError(f"{path}: not a TIFF file tifffile can read ({_first_line(e)}); expected {_VALID}") \
                from None
        if not series:
            raise HevisumError(f"{path}: TIFF file holds no image; expected {_VALID}")
        try:
            self._levels = self._find_levels(series)
        except HevisumError:
            self._tif.close()
            raise
        except Exception as e:  # unexpected structure in a damaged file
            self._tif.close()
            raise HevisumError(f"{path}: cannot read the TIFF structure ({_first_line(e)}); expected {_VALID}") \
                from None
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = _CACHE_BYTES
        dims = [lvl["dims"] for lvl in self._levels]
        super().__init__(path, dims, um_per_px if um_per_px is not None else self._metadata_um())

    # ---------------------------------------------------------------------------------------------- levels

    def _find_levels(self, series: Sequence[Any]) -> list[dict]:
        base = series[0]
        levels = list(base.levels)
        if len(levels) == 1:
            # a pyramid written as unrelated pages: further series with the same aspect ratio and channels
            w0, h0 = _series_dims(base, self.path_str)
            extra = []
            for s in series[1:]:
                try:
                    w, h = _series_dims(s, self.path_str)
                except HevisumError:
                    continue
                if w < w0 and abs(w / h - w0 / h0) < 0.02 * (w0 / h0) and _samples(s) == _samples(base):
                    extra.append(s)
            levels += sorted(extra, key=lambda s: -_series_dims(s, self.path_str)[0])
        out = []
        for s in levels:
            w, h = _series_dims(s, self.path_str)
            page = s.keyframe if len(s.pages) == 1 else None
            fast = page is not None and _fast_page(page)
            out.append({"series": s, "dims": (w, h), "page": page if fast else None, "zarr": None})
        return out

    @property
    def path_str(self) -> str:
        return str(self.path)

    def _metadata_um(self) -> float | None:
        tif = self._tif
        if tif.is_ome and tif.ome_metadata:
            um = _ome_um(tif.ome_metadata)
            if um is not None:
                return um
        page = self._levels[0]["series"].keyframe
        if tif.is_svs:
            m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
            if m:
                um = _plausible_um(float(m.group(1)))
                if um is not None:
                    return um
        tags = page.tags
        res = tags.get("XResolution")
        unit = tags.get("ResolutionUnit")
        if res is None:
            return None
        return _um_from_resolution(res.value, unit.value if unit is not None else 2)

    # ---------------------------------------------------------------------------------------------- reading

    def close(self) -> None:
        """Close the file and drop cached tiles."""
        self._cache.clear()
        self._cache_bytes = 0
        self._tif.close()

    def _read_level(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        lvl = self._levels[level]
        page = lvl["page"]
        if page is None:
            return self._read_zarr(lvl, x0, y0, w, h)
        sh, sw = page.chunks[0], page.chunks[1]  # segment height, width
        ncols = page.chunked[1]
        out = np.empty((h, w, 3), dtype=np.uint8)
        for r in range(y0 // sh, (y0 + h - 1) // sh + 1):
            for c in range(x0 // sw, (x0 + w - 1) // sw + 1):
                seg = self._segment(level, page, r * ncols + c)
                sy, sx = r * sh, c * sw
                a0, a1 = max(y0, sy), min(y0 + h, sy + seg.shape[0])
                b0, b1 = max(x0, sx), min(x0 + w, sx + seg.shape[1])
                if a0 < a1 and b0 < b1:
                    out[a0 - y0:a1 - y0, b0 - x0:b1 - x0] = seg[a0 - sy:a1 - sy, b0 - sx:b1 - sx]
        return out

    def _segment(self, level: int, page: Any, index: int) -> np.ndarray:
        key = (level, index)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        fh = self._tif.filehandle
        try:
            if count:
                fh.seek(offset)
                data = fh.read(count)
                seg = page.decode(data, index, jpegtables=page.jpegtables)[0]
            else:
                seg = None
        except Exception as e:  # codec errors from imagecodecs/zlib on damaged data
            raise HevisumError(f"{self.path}: cannot decode level {level} segment {index} ({_first_line(e)})") \
                from None
        if seg is None:  # sparse file: a missing tile is background
            sh, sw = page.chunks[0], page.chunks[1]
            rgb = np.full((sh, sw, 3), 255, dtype=np.uint8)
        else:
            seg = np.asarray(seg).reshape(seg.shape[-3:])
            rgb = _rgb(seg, str(self.path), minis_white=int(page.photometric) == 0)
        self._cache[key] = rgb
        self._cache_bytes += rgb.nbytes
        while self._cache_bytes > self.cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes
        return rgb

    def _read_zarr(self, lvl: dict, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Fallback for layouts the segment reader does not handle (planar RGB, channels as pages, NDPI)."""
        try:
            import zarr
        except ImportError:
            raise HevisumError(f"{self.path}: this TIFF layout (planar, multi-page or NDPI) needs zarr: pip install "
                               "zarr, or install OpenSlide (pip install openslide-python openslide-bin)") from None

        s = lvl["series"]
        if lvl["zarr"] is None:
            lvl["zarr"] = zarr.open(s.aszarr(), mode="r")
        axes = s.axes
        index: list[Any] = []
        for ax, n in zip(axes, s.shape):
            if ax == "Y":
                index.append(slice(y0, y0 + h))
            elif ax == "X":
                index.append(slice(x0, x0 + w))
            elif ax in "SC" and n <= 4:
                index.append(slice(None))
            else:
                index.append(0)
        try:
            a = np.asarray(lvl["zarr"][tuple(index)])
        except Exception as e:
            raise HevisumError(f"{self.path}: cannot read pixels ({_first_line(e)})") from None
        kept = [ax for ax, i in zip(axes, index) if isinstance(i, slice)]
        order = [kept.index("Y"), kept.index("X")] + [i for i, ax in enumerate(kept) if ax not in "YX"]
        return _rgb(np.transpose(a, order), str(self.path))


def _series_dims(s: Any, where: str) -> tuple[int, int]:
    axes = s.axes
    if "Y" not in axes or "X" not in axes:
        raise HevisumError(f"{where}: TIFF series has axes {axes!r}; expected an image with Y and X axes")
    return int(s.shape[axes.index("X")]), int(s.shape[axes.index("Y")])


def _samples(s: Any) -> int:
    axes = s.axes
    return int(s.shape[axes.index("S")]) if "S" in axes else 1


def _fast_page(page: Any) -> bool:
    """Pages the segment reader handles: one image plane, interleaved samples, RGB/YCbCr/greyscale."""
    try:
        return (
            int(page.imagedepth) == 1
            and (int(page.planarconfig) == 1 or int(page.samplesperpixel) == 1)
            and int(page.photometric) in (0, 1, 2, 6)  # MINISWHITE, MINISBLACK, RGB, YCBCR
            and int(page.samplesperpixel) in (1, 2, 3, 4)
            and not page.is_ndpi
            and len(page.dataoffsets) == int(np.prod(page.chunked))
            and len(page.chunked) >= 2
            and int(np.prod(page.chunked[2:])) == 1
        )
    except (AttributeError, TypeError, ValueError):
        return False


def _ome_um(xml: str) -> float | None:
    m = re.search(r"<Pixels\b[^>]*>", xml)
    if not m:
        return None
    tag = m.group(0)
    size = re.search(r'PhysicalSizeX="([^"]+)"', tag)
    if not size:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tag)
    factor = _OME_UNITS.get(unit.group(1) if unit else "µm")
    try:
        return None if factor is None else _plausible_um(float(size.group(1)) * factor)
    except ValueError:
        return None


def open_image(path: str | Path, um_per_px: float | None = None, *, backend: str | None = None) -> ImageSource:
    """Open a slide image for region reads; see the module notes for the format rules.

    um_per_px: level-0 microns per pixel; overrides what the file says (use it when the metadata is missing or
        wrong).
    backend: ``"openslide"``, ``"tifffile"`` or ``"pil"`` to force a reader; ``None`` chooses from the file.
    """
    p = Path(path)
    if not p.exists():
        raise HevisumError(f"image file {str(p)!r} not found; expected a {_VALID} file")
    if p.is_dir():
        raise HevisumError(f"{p}: is a folder; expected a whole-slide image file ({_VALID})")
    if um_per_px is not None:
        try:
            um_ok = math.isfinite(float(um_per_px)) and float(um_per_px) > 0
        except (TypeError, ValueError):
            um_ok = False
        if not um_ok:
            raise HevisumError(f"{p}: um_per_px must be a positive number, got {um_per_px!r}")
        um_per_px = float(um_per_px)
    if backend is None:
        backend = _choose_backend(p)
    elif backend not in BACKENDS:
        raise HevisumError(f"{p}: backend {backend!r} is not one of {list(BACKENDS)}")
    if backend == "openslide":
        if not openslide_available():
            raise HevisumError(f"{p}: reading this format needs OpenSlide: pip install openslide-python openslide-bin")
        return OpenSlideSource(p, um_per_px)
    if backend == "tifffile":
        return TiffSource(p, um_per_px)
    return PILSource(p, um_per_px)


def _choose_backend(p: Path) -> str:
    suffix = p.suffix.lower()
    if suffix in PIL_SUFFIXES:
        return "pil"
    if suffix in OPENSLIDE_SUFFIXES:
        if openslide_available():
            return "openslide"
        if suffix in TIFF_BASED_VENDOR:
            return "tifffile"
        raise HevisumError(
            f"{p}: {suffix} slides need OpenSlide: pip install openslide-python openslide-bin (or convert the slide "
            "to a pyramidal TIFF)"
        )
    if suffix in TIFF_SUFFIXES:
        if p.name.lower().endswith((".ome.tif", ".ome.tiff", ".ome.btf")) or _tiff_wants_tifffile(p):
            return "tifffile"
        if openslide_available():
            import openslide

            try:
                if openslide.OpenSlide.detect_format(str(p)):
                    return "openslide"
            except Exception:  # an unreadable file: tifffile gives the clearer message
                pass
        return "tifffile"
    raise HevisumError(
        f"{p}: unsupported image format {suffix or '(no suffix)'!r}; expected one of {', '.join(WSI_SUFFIXES)}"
    )


def _tiff_wants_tifffile(p: Path) -> bool:
    """OME-TIFF or a pyramid in SubIFDs (OpenSlide would see level 0 only)."""
    try:
        import tifffile

        with tifffile.TiffFile(p) as tif:
            return bool(tif.is_ome or tif.pages[0].subifds)
    except Exception:
        return True  # let TiffSource report what is wrong


# =============================================================================================== tiles


def read_tiles(source: ImageSource, xy_level0: np.ndarray, *, field_um: float | None = None,
               side_px: float | None = None, out_px: int, batch: int = 64) -> Iterator[np.ndarray]:
    """Square windows centred on each (x, y) (level-0 pixels), yielded as uint8 batches ``(n, out_px, out_px, 3)``.

    The window side is ``field_um`` microns (needs ``source.um_per_px``) or ``side_px`` level-0 pixels; each is
    read on demand from the best pyramid level and area-resampled to ``out_px``; parts outside the image are white.
    Only one batch (and the source's small tile cache) is in memory at a time.
    """
    where = str(getattr(source, "path", "image"))
    if (field_um is None) == (side_px is None):
        raise HevisumError(f"{where}: give exactly one of field_um (microns) or side_px (level-0 pixels)")
    if field_um is not None:
        if not (math.isfinite(float(field_um)) and float(field_um) > 0):
            raise HevisumError(f"{where}: field_um must be a positive number, got {field_um!r}")
        if source.um_per_px is None:
            raise HevisumError(f"{where}: the image resolution (um/px) is unknown, so field_um cannot be used; pass "
                               "um_per_px= to open_image or give side_px")
        side = float(field_um) / source.um_per_px
    else:
        side = float(side_px)  # type: ignore[arg-type]
        if not (math.isfinite(side) and side > 0):
            raise HevisumError(f"{where}: side_px must be a positive number, got {side_px!r}")
    if not isinstance(out_px, (int, np.integer)) or isinstance(out_px, bool) or out_px < 1:
        raise HevisumError(f"{where}: out_px must be a positive integer, got {out_px!r}")
    if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
        raise HevisumError(f"{where}: batch must be a positive integer, got {batch!r}")
    xy = np.asarray(xy_level0, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise HevisumError(f"{where}: spot centres must have shape (n, 2) (x, y), got {xy.shape}")
    if not np.isfinite(xy).all():
        raise HevisumError(f"{where}: spot centre {int(np.flatnonzero(~np.isfinite(xy).all(1))[0])} is not finite")
    return _tile_batches(source, xy, side, int(out_px), int(batch))


def _tile_batches(source: ImageSource, xy: np.ndarray, side: float, out_px: int, batch: int) -> Iterator[np.ndarray]:
    half = side / 2
    for start in range(0, len(xy), batch):
        chunk = xy[start:start + batch]
        out = np.empty((len(chunk), out_px, out_px, 3), dtype=np.uint8)
        for i, (x, y) in enumerate(chunk):
            out[i] = source.read_region(x - half, y - half, side, side, out_size=out_px, pad=True)
        yield out


# =============================================================================================== training slides

#: longer side of the in-memory working image of a slide read lazily for training (masks, stain statistics,
#: realignment, QC; its tiles come from the file at full resolution): the smallest that gives the spot pitch
#: WORKING_PITCH_PX pixels, between WORKING_SIDE_MIN (Space Ranger's hires image is 2000 px) and WORKING_SIDE
WORKING_SIDE_MIN, WORKING_SIDE, WORKING_PITCH_PX = 2048, 4096, 24.0


def working_side(width: int, height: int, xy_level0: np.ndarray | None = None) -> int:
    """The working image's longer side for a ``width`` x ``height`` file whose spots lie at ``xy_level0``."""
    side = WORKING_SIDE_MIN
    if xy_level0 is not None and len(xy_level0) >= 2:
        from hevisum.preprocess.spots import spot_pitch

        try:
            pitch = spot_pitch(xy_level0)
        except ValueError:
            pitch = 0.0
        if pitch > 0:
            side = int(np.ceil(max(width, height) * WORKING_PITCH_PX / pitch))
    return int(min(max(side, WORKING_SIDE_MIN), WORKING_SIDE))


def wants_lazy(path: str | Path) -> bool:
    """True for files whose regions can be read without decoding the whole image (tiled or pyramidal TIFF, vendor
    formats); PNG, JPEG and BMP are decoded whole."""
    return Path(path).suffix.lower() in OPENSLIDE_SUFFIXES + TIFF_SUFFIXES


def read_slide_image(path: str | Path, max_side: int | None = None, xy: np.ndarray | None = None
                     ) -> tuple[np.ndarray, tuple[float, float], dict | None]:
    """A slide's image for the readers: ``(image, (sx, sy), level0)``; ``x_image = x_file * sx``.

    Tiled or pyramidal files (TIFF, SVS, NDPI, ...) larger than a working image are not decoded whole: the image
    returned is a working copy of the whole slide (longer side :func:`working_side`: 2048-4096 px, so that the
    spot pitch of ``xy``, the spots in the file's pixels, shows about 24 px; at most ``max_side``), read from the
    best pyramid level block by block, and ``level0`` = ``{"path", "backend", "width", "height", "sx", "sy",
    "um_per_px"}`` (JSON-safe) tells where the full-resolution pixels are (tiles are read from there on demand,
    see :class:`hevisum.preprocess.tiles.SourceTiles`). Anything else is read as :func:`read_image_scaled` does,
    with ``level0 = None``.
    """
    from hevisum.io.images import read_image_scaled

    src = None
    if wants_lazy(path) and Path(path).is_file():
        try:
            src = open_image(path)
        except HevisumError:
            src = None  # not readable region by region: read_image_scaled says what is wrong, or reads it whole
    if src is not None:
        with src:
            side = working_side(src.width, src.height, xy)
            side = side if max_side is None else min(int(max_side), side)
            if max(src.width, src.height) > side:
                img, _ = src.thumbnail(side)
                sx, sy = img.shape[1] / src.width, img.shape[0] / src.height
                level0 = {"path": str(Path(path).resolve()), "backend": src.backend, "width": src.width,
                          "height": src.height, "sx": sx, "sy": sy, "um_per_px": src.um_per_px}
                return img, (sx, sy), level0
    image, scale = read_image_scaled(path, max_side)
    return image, scale, None


# =============================================================================================== tissue


def tissue_thumbnail(source: ImageSource, max_side: int = 2048, *, background: str = "auto",
                     blur_sigma: float = 7.0) -> tuple[np.ndarray, np.ndarray, float]:
    """``(thumbnail, tissue mask, scale)``: :func:`hevisum.preprocess.tissue.tissue_mask` on the slide's thumbnail.

    ``scale`` maps level-0 pixels to thumbnail (and mask) pixels; pass it to :func:`hevisum.grid.virtual_grid`.
    """
    from hevisum.preprocess.tissue import tissue_mask

    thumb, scale = source.thumbnail(max_side)
    mask = tissue_mask(thumb, background=background, blur_sigma=blur_sigma, max_side=max(thumb.shape[:2]))
    return thumb, mask, scale


# =============================================================================================== generated slides

_GLASS = np.array([241.0, 240.0, 243.0], dtype=np.float32)


class SyntheticSlide:
    """An H&E-like slide defined procedurally, so any region of any pyramid level is rendered on demand.

    Level 0 is a mosaic of real H&E patches (one per ``tile`` x ``tile`` cell, randomly chosen, flipped and
    transposed) shown through smooth random tissue blobs on light glass. A level with downsample ``d`` (a power of
    ``level_factor``, at most ``tile``) is the same mosaic built from patches area-reduced by ``d``, with the blob
    mask evaluated at the level's pixel centres: it equals the area-average of level 0 except within a few pixels
    of blob edges.
    """

    def __init__(self, width: int, height: int, patches: np.ndarray, *, tile: int = 256, seed: int = 0,
                 level_factor: int = 4) -> None:
        if width < 16 or height < 16:
            raise HevisumError(f"synthetic slide must be at least 16x16 px, got {width}x{height}")
        if level_factor < 2:
            raise HevisumError(f"level_factor must be at least 2, got {level_factor}")
        p = np.asarray(patches)
        if p.ndim != 4 or p.shape[-1] != 3 or p.dtype != np.uint8 or p.shape[1] != p.shape[2] or len(p) == 0:
            raise HevisumError(f"source tiles must be uint8 (n, s, s, 3) with n >= 1, got {p.dtype} {p.shape}")
        if tile < 16 or tile & (tile - 1):
            raise HevisumError(f"tile must be a power of two >= 16, got {tile}")
        if p.shape[1] != tile:
            p = _resize_stack(p, tile)
        self.width, self.height, self.tile, self.seed = int(width), int(height), int(tile), int(seed)
        rng = np.random.default_rng(seed)
        self.ntx, self.nty = -(-self.width // tile), -(-self.height // tile)
        self._idx = rng.integers(0, len(p), size=(self.nty, self.ntx))
        self._orient = rng.integers(0, 8, size=(self.nty, self.ntx))
        self._patches = {1: p}
        # a stream of its own: the same seed lays out the same blobs at every slide size
        self._field = _blob_field(np.random.default_rng([seed, 1]), self.width, self.height)
        ds = [1]
        while ds[-1] * level_factor <= tile and max(self.width, self.height) / (ds[-1] * level_factor) >= tile:
            ds.append(ds[-1] * level_factor)
        self.downsamples = ds

    def level_dims(self, d: int) -> tuple[int, int]:
        """(width, height) of the level with downsample ``d``."""
        return -(-self.width // d), -(-self.height // d)

    def region(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Level-0 pixels of a rectangle (the in-memory reference for what the file holds)."""
        return self.render(1, x, y, w, h)

    def render(self, d: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """RGB uint8 ``(h, w, 3)`` of level pixels ``[x0, x0 + w) x [y0, y0 + h)`` at downsample ``d``."""
        t = self.tile
        if d not in self._patches:
            self._patches[d] = _reduce_stack(self._patches[1], d)
        pd_ = self._patches[d]
        b = t // d
        xs = np.arange(x0, x0 + w, dtype=np.int64) * d
        ys = np.arange(y0, y0 + h, dtype=np.int64) * d
        tc, u = np.minimum(xs // t, self.ntx - 1), (xs % t) // d
        tr, v = np.minimum(ys // t, self.nty - 1), (ys % t) // d
        idx = self._idx[tr[:, None], tc[None, :]]
        o = self._orient[tr[:, None], tc[None, :]]
        uu = np.where(o & 1, b - 1 - u[None, :], u[None, :])
        vv = np.where(o & 2, b - 1 - v[:, None], v[:, None])
        tr_ = (o & 4).astype(bool)
        pix = pd_[idx, np.where(tr_, uu, vv), np.where(tr_, vv, uu)].astype(np.float32)
        alpha = self._alpha((np.arange(x0, x0 + w) + 0.5) * d, (np.arange(y0, y0 + h) + 0.5) * d)
        out = _GLASS + (pix - _GLASS) * alpha[:, :, None]
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)

    def _alpha(self, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
        """Tissue opacity at level-0 points: the blob field, bilinearly interpolated, through a steep ramp."""
        g = self._field
        gh, gw = g.shape
        gx = np.clip(cx * gw / self.width - 0.5, 0, gw - 1)
        gy = np.clip(cy * gh / self.height - 0.5, 0, gh - 1)
        jx = np.minimum(gx.astype(np.int64), gw - 2)
        jy = np.minimum(gy.astype(np.int64), gh - 2)
        fx = (gx - jx).astype(np.float32)[None, :]
        fy = (gy - jy).astype(np.float32)[:, None]
        r0, r1 = g[jy][:, jx], g[jy + 1][:, jx]
        r0b, r1b = g[jy][:, jx + 1], g[jy + 1][:, jx + 1]
        f = (1 - fy) * ((1 - fx) * r0 + fx * r0b) + fy * ((1 - fx) * r1 + fx * r1b)
        return np.clip((f - 0.5) / 0.02 + 0.5, 0.0, 1.0)


def _blob_field(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth field on a coarse grid (128 cells across); above 0.5 is tissue (about a third of the slide)."""
    from scipy import ndimage as ndi

    gw = 128
    gh = max(8, round(gw * height / width))
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float64)
    env = np.zeros((gh, gw))
    n_blobs = int(rng.integers(3, 6))
    for _ in range(n_blobs):
        cx, cy = rng.uniform(0.2, 0.8) * gw, rng.uniform(0.2, 0.8) * gh
        ax, ay = rng.uniform(0.08, 0.2) * gw, rng.uniform(0.08, 0.2) * gw
        th = rng.uniform(0, np.pi)
        dx, dy = xx - cx, yy - cy
        rx = (dx * np.cos(th) + dy * np.sin(th)) / ax
        ry = (-dx * np.sin(th) + dy * np.cos(th)) / ay
        env = np.maximum(env, np.exp(-(rx**2 + ry**2)))
    noise = ndi.gaussian_filter(rng.standard_normal((gh, gw)), 3.0)
    noise /= noise.std() + 1e-12
    field = env * (1.0 + 0.18 * noise)
    return field.astype(np.float32) * (0.5 / 0.45)  # the envelope at 0.45 (+ noise) is the tissue edge


def _reduce_stack(p: np.ndarray, d: int) -> np.ndarray:
    n, s = p.shape[:2]
    b = s // d
    return p.reshape(n, b, d, b, d, 3).mean(axis=(2, 4)).round().astype(np.uint8)


def _resize_stack(p: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(x).resize((size, size), Image.Resampling.BOX
                                                          if x.shape[0] > size else Image.Resampling.BILINEAR))
                     for x in p])


def he_patches(images: Sequence[str | Path], *, size: int = 256, n: int = 48, seed: int = 0,
               min_tissue: float = 0.95) -> np.ndarray:
    """``n`` square H&E patches ``(n, size, size, 3)`` cut at full resolution from tissue in the given images.

    Patch positions are drawn at random among windows that the tissue mask (computed on a 2048 px copy) covers
    at least ``min_tissue``; patches are spread evenly over the images.
    """
    from PIL import Image

    from hevisum.io.images import _pil_limit, read_image_scaled
    from hevisum.preprocess.tissue import tissue_mask

    paths = [Path(p) for p in images]
    if not paths:
        raise HevisumError("he_patches needs at least one image")
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    for k, path in enumerate(paths):
        want = n // len(paths) + (1 if k < n % len(paths) else 0)
        if want == 0:
            continue
        small, (sx, sy) = read_image_scaled(path, max_side=2048)
        mask = tissue_mask(small)
        sw, sh = max(1, round(size * sx)), max(1, round(size * sy))
        integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        frac = (integral[sh:, sw:] - integral[:-sh, sw:] - integral[sh:, :-sw] + integral[:-sh, :-sw]) / (sw * sh)
        rows, cols = np.nonzero(frac >= min_tissue)
        if len(rows) == 0:
            raise HevisumError(f"{path}: no {size} px window is {min_tissue:.0%} tissue; pick another image")
        pick = rng.choice(len(rows), size=want, replace=len(rows) < want)
        with _pil_limit(), Image.open(path) as im:
            if im.mode != "RGB":
                im = im.convert("RGB")
            for i in pick:
                x0, y0 = int(cols[i] / sx), int(rows[i] / sy)
                x0, y0 = min(x0, im.width - size), min(y0, im.height - size)
                out.append(np.asarray(im.crop((x0, y0, x0 + size, y0 + size))))
    return np.stack(out)


def write_pyramidal_tiff(path: str | Path, width: int, *, source_tiles: np.ndarray | Sequence[str | Path],
                         um_per_px: float = 0.5, tile: int = 256, seed: int = 0, height: int | None = None,
                         compression: str | None = None, quality: int = 90, level_factor: int = 4,
                         ome: bool | None = None) -> SyntheticSlide:
    """Write an H&E-like tiled pyramidal TIFF of ``width`` x ``height`` px, tile by tile (never the whole image).

    source_tiles: H&E patches ``(n, s, s, 3)`` uint8, or image paths to cut them from (:func:`he_patches`).
    height: default ``round(0.75 * width)``.
    compression: ``"jpeg"`` (needs ``imagecodecs``; the default when it is installed, quality ``quality``) or
        ``"zlib"`` (the default otherwise).
    ome: write OME-TIFF with the reduced levels as SubIFDs (read by tifffile) instead of a generic pyramid of
        reduced-resolution pages (read by OpenSlide and tifffile). Default: from the file name (``.ome.tif``).

    Levels have downsamples ``level_factor**k`` down to about one tile; every page carries its resolution in
    XResolution/YResolution (centimetre unit), and OME files also ``PhysicalSizeX``. Returns the
    :class:`SyntheticSlide` that renders the same pixels, as the in-memory reference.
    """
    import tifffile

    p = Path(path)
    if height is None:
        height = max(16, round(0.75 * width))
    if isinstance(source_tiles, np.ndarray):
        patches = source_tiles
    else:
        patches = he_patches(list(source_tiles), size=tile, seed=seed)
    slide = SyntheticSlide(int(width), int(height), patches, tile=tile, seed=seed, level_factor=level_factor)
    if compression is None:
        try:
            import imagecodecs  # noqa: F401

            compression = "jpeg"
        except ImportError:
            compression = "zlib"
    if compression not in ("jpeg", "zlib"):
        raise HevisumError(f"compression must be 'jpeg' or 'zlib', got {compression!r}")
    cargs = {"level": int(quality)} if compression == "jpeg" else {"level": 6}
    if ome is None:
        ome = p.name.lower().endswith((".ome.tif", ".ome.tiff"))
    # the uncompressed size decides BigTIFF: the compressed file stays far below it
    bigtiff = slide.width * slide.height * 3 * 4 / 3 > 2**31
    p.parent.mkdir(parents=True, exist_ok=True)

    def tiles(d: int, lw: int, lh: int) -> Iterator[np.ndarray]:
        for r in range(0, lh, tile):
            for c in range(0, lw, tile):
                yield slide.render(d, c, r, tile, tile)

    ds = slide.downsamples
    with tifffile.TiffWriter(p, bigtiff=bigtiff, ome=bool(ome)) as tw:
        for k, d in enumerate(ds):
            lw, lh = slide.level_dims(d)
            um = um_per_px * slide.width / lw
            kwargs: dict[str, Any] = dict(
                shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb", compression=compression,
                compressionargs=cargs, resolution=(1e4 / um, 1e4 * lh / (um_per_px * slide.height)),
                resolutionunit="CENTIMETER",
            )
            if k == 0:
                if ome:
                    kwargs["subifds"] = len(ds) - 1
                    kwargs["metadata"] = {"axes": "YXS", "PhysicalSizeX": um_per_px, "PhysicalSizeXUnit": "µm",
                                          "PhysicalSizeY": um_per_px, "PhysicalSizeYUnit": "µm"}
                else:
                    kwargs["metadata"] = None
                    kwargs["description"] = f"synthetic H&E slide {slide.width}x{slide.height}, seed {seed}"
            else:
                kwargs["subfiletype"] = 1
                if not ome:
                    kwargs["metadata"] = None
            tw.write(tiles(d, lw, lh), **kwargs)
    return slide
