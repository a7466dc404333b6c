"""Tiles: one square crop per spot, resampled to the model input size, all in one on-disk uint8 array.

A tile's side in the slide is ``round(scale * pitch)`` pixels, centred on the spot's (rounded) centre; parts
beyond the image repeat the edge pixels (``np.pad(mode="edge")`` semantics), so a spot near or past the border
still gets a full tile. Tiles are area-averaged down (or bilinearly up) to ``size`` x ``size``. The 3 x 3
subtiles the model uses are slices of the tile (:func:`subtiles`), not stored separately.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np


@dataclass(frozen=True)
class TileGeometry:
    """An extra tile cache beside the spot tiles: a field of view around every spot and an output size.

    ``scale``: the side is ``scale`` x the slide's spot pitch (a wider context, say); ``fov_um``: the side is
    ``fov_um`` microns, cut at the slide's microns per pixel (an encoder's own scale). A slide without a known
    microns per pixel falls back to ``fallback_scale`` x pitch (recorded in qc.json).
    """

    name: str
    size: int
    scale: float = 0.0
    fov_um: float = 0.0
    fallback_scale: float = 3.0

    def side_px(self, pitch: float, um_per_px: float | None) -> tuple[int, bool]:
        """(side in slide pixels, True when the physical field of view was used)."""
        if self.fov_um > 0 and um_per_px:
            return max(1, int(round(self.fov_um / float(um_per_px)))), True
        return tile_side(pitch, self.scale if self.scale > 0 else self.fallback_scale), False

    def side_exact(self, pitch: float, um_per_px: float | None) -> float:
        """The side of :meth:`side_px` before rounding (tiles read from a full-resolution file use it)."""
        if self.fov_um > 0 and um_per_px:
            return float(self.fov_um) / float(um_per_px)
        return float(pitch) * (self.scale if self.scale > 0 else self.fallback_scale)

    def as_dict(self) -> dict:
        return asdict(self)


def tile_side(pitch: float, scale: float) -> int:
    """Side in slide pixels of the tile around a spot: ``round(scale * pitch)``, at least 1."""
    return max(1, int(round(scale * pitch)))


class SourceTiles:
    """Tiles of a slide whose full-resolution file is read region by region (``Slide.meta['level0']``).

    Spot positions and tile sides are given in the slide's working image (``x_work = x_level0 * sx``); each tile
    is read from the file's best pyramid level for its output size (:meth:`hevisum.io.wsi.ImageSource.read_region`),
    then stain-normalised with ``mapping`` (estimated on the working image) and its background (``mask``, the
    working image's tissue mask, sampled at the tile's pixels) set to ``fill``. Parts beyond the image are
    white. Only the tiles in flight are in memory. Use as a context manager (the file stays open inside).
    """

    def __init__(self, level0: dict, mapping=None, mask: np.ndarray | None = None,
                 fill: str | tuple[int, int, int] = "white") -> None:
        from hevisum.preprocess.tissue import fill_colour

        self.level0 = level0
        self.sx, self.sy = float(level0["sx"]), float(level0["sy"])
        self.mapping, self.mask, self.fill = mapping, mask, fill_colour(fill)
        self._src = None

    def __enter__(self) -> "SourceTiles":
        from hevisum.io.wsi import open_image

        self._src = open_image(self.level0["path"], backend=self.level0.get("backend"))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._src is not None:
            self._src.close()
            self._src = None

    def tiles(self, xy: np.ndarray, side: float, size: int) -> np.ndarray:
        """``(n, size, size, 3)`` uint8: squares of ``side`` working-image pixels centred on ``xy``."""
        if self._src is None:
            raise RuntimeError("SourceTiles is read inside its with-block")  # internal invariant
        xy = np.asarray(xy, dtype=np.float64)
        out = np.empty((len(xy), size, size, 3), dtype=np.uint8)
        w0, h0 = float(side) / self.sx, float(side) / self.sy  # the square in level-0 pixels
        frac = (np.arange(size) + 0.5) / size
        corners = xy / np.array([self.sx, self.sy]) - np.array([w0, h0]) / 2
        for i, (x0, y0) in enumerate(corners):
            out[i] = self._src.read_region(x0, y0, w0, h0, out_size=size, pad=True)
        if self.mapping is not None and len(out):
            out = self.mapping(out)  # normalised as the working image was: the same stain estimate
        if self.mask is not None:
            mh, mw = self.mask.shape
            for i, (x0, y0) in enumerate(corners):
                cols = np.clip(np.floor((x0 + frac * w0) * self.sx).astype(np.int64), 0, mw - 1)
                rows = np.clip(np.floor((y0 + frac * h0) * self.sy).astype(np.int64), 0, mh - 1)
                out[i][~self.mask[rows[:, None], cols[None, :]]] = self.fill
        return out


def extract_tiles(image: np.ndarray | SourceTiles, xy: np.ndarray, side: float, size: int) -> np.ndarray:
    """Tiles ``(n, size, size, 3)`` uint8 of side ``side`` centred on each spot ``xy`` (x, y), edge-padded.

    ``image`` is an RGB array, or a :class:`SourceTiles` reading the tiles from the slide's full-resolution file.
    """
    from PIL import Image

    if isinstance(image, SourceTiles):
        return image.tiles(xy, side, size)
    side = int(side)

    xy = np.asarray(xy, dtype=np.float64)
    h, w = image.shape[:2]
    out = np.empty((len(xy), size, size, 3), dtype=np.uint8)
    centre = np.rint(xy).astype(np.int64)
    offs = np.arange(side) - side // 2
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.BILINEAR
    for i, (cx, cy) in enumerate(centre):
        # clipped indices = edge padding, without padding the whole image
        rows = np.clip(cy + offs, 0, h - 1)
        cols = np.clip(cx + offs, 0, w - 1)
        crop = image[rows[:, None], cols[None, :]]
        if side == size:
            out[i] = crop
        else:
            out[i] = np.asarray(Image.fromarray(crop).resize((size, size), resample=resample))
    return out


def write_tiles(path: Path, jobs: Iterable[tuple], n_tiles: int, size: int, progress: bool = False,
                chunk: int = 256, extra: list[tuple[Path, int]] | None = None) -> np.memmap:
    """Write every tile into one ``.npy`` array ``(n_tiles, size, size, 3)`` uint8, batch by batch.

    jobs: ``(image, xy, side)`` per slide, in tile order, plus a fourth item (one side per ``extra`` cache) when
    ``extra`` lists further caches ``(path, size)`` to fill in the same pass over each image; together the jobs
    must hold exactly ``n_tiles`` spots. The files are memory-mapped while written, so only one batch of tiles is
    in memory at a time. Returns the main array opened read-only (``np.load(path, mmap_mode="r")``).
    """
    from tqdm.auto import tqdm

    caches = [(Path(path), size)] + [(Path(p), sz) for p, sz in (extra or [])]
    make_tile_caches(caches, n_tiles)
    row = 0
    with tqdm(total=n_tiles, desc="tiles", unit="tile", disable=not progress) as bar:
        for job in jobs:
            image, xy, side = job[:3]
            sides = list(job[3]) if len(job) > 3 else []
            if row + len(xy) > n_tiles:
                raise RuntimeError(f"the jobs hold more than the {n_tiles} tiles of the array")  # internal invariant
            fill_tiles(caches[:1 + len(sides)], row, image, xy, [side] + sides, chunk=chunk)
            row += len(xy)
            bar.update(len(xy))
    if row != n_tiles:
        raise RuntimeError(f"wrote {row} tiles but the array holds {n_tiles}")  # internal invariant
    return np.load(path, mmap_mode="r")


def make_tile_caches(caches: list[tuple[Path, int]], n_tiles: int) -> None:
    """Create every cache file ``(path, size)``: a ``.npy`` uint8 array ``(n_tiles, size, size, 3)``."""
    for path, size in caches:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_tiles, size, size, 3)).flush()


def fill_tiles(caches: list[tuple[Path, int]], row0: int, image: np.ndarray | SourceTiles, xy: np.ndarray,
               sides: list[float], chunk: int = 256) -> None:
    """Write one slide's tiles into rows ``row0 ..`` of every cache file ``(path, size)`` (made beforehand by
    :func:`make_tile_caches`), one side per cache; only one batch of tiles is in memory at a time."""
    arrays = [np.load(path, mmap_mode="r+") for path, _ in caches]
    for s0 in range(0, len(xy), chunk):
        for arr, (_, size), side in zip(arrays, caches, sides):
            batch = extract_tiles(image, xy[s0:s0 + chunk], side, size)
            arr[row0 + s0:row0 + s0 + len(batch)] = batch
    for arr in arrays:
        arr.flush()


def subtiles(tile_batch: np.ndarray) -> np.ndarray:
    """The 3 x 3 grid of subtiles of each tile: ``(B, S, S, C)`` -> ``(B, 9, S/3, S/3, C)``, row-major.

    Subtile ``k`` is ``tile[(k // 3) * s:(k // 3 + 1) * s, (k % 3) * s:(k % 3 + 1) * s]`` with ``s = S / 3``;
    index 4 is the centre.
    """
    b, h, w = tile_batch.shape[:3]
    if h != w or h % 3:
        raise ValueError(f"tiles must be square with a side divisible by 3, got {h}x{w}")
    s = h // 3
    rest = tile_batch.shape[3:]
    grid = tile_batch.reshape(b, 3, s, 3, s, *rest)
    grid = np.moveaxis(grid, 3, 2)  # (B, 3, 3, s, s, C): block row, block column first
    return grid.reshape(b, 9, s, s, *rest)
