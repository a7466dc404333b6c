"""Tiles: one square crop per spot, resampled to the model input size, all in one on-disk uint8 array.

A tile's side in the slide is ``round(scale * pitch)`` pixels, centred on the spot's (rounded) centre; parts
beyond the image repeat the edge pixels (``np.pad(mode="edge")`` semantics), so a spot near or past the border
still gets a full tile. Tiles are area-averaged down (or bilinearly up) to ``size`` x ``size``. The 3 x 3
subtiles the model uses are slices of the tile (:func:`subtiles`), not stored separately.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np


def tile_side(pitch: float, scale: float) -> int:
    """Side in slide pixels of the tile around a spot: ``round(scale * pitch)``, at least 1."""
    return max(1, int(round(scale * pitch)))


def extract_tiles(image: np.ndarray, xy: np.ndarray, side: int, size: int) -> np.ndarray:
    """Tiles ``(n, size, size, 3)`` uint8 of side ``side`` centred on each spot ``xy`` (x, y), edge-padded."""
    from PIL import Image

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


def write_tiles(path: Path, jobs: Iterable[tuple[np.ndarray, np.ndarray, int]], n_tiles: int, size: int,
                progress: bool = False, chunk: int = 256) -> np.memmap:
    """Write every tile into one ``.npy`` array ``(n_tiles, size, size, 3)`` uint8, batch by batch.

    jobs: ``(image, xy, side)`` per slide, in tile order; together they must hold exactly ``n_tiles`` spots.
    The file is memory-mapped while written, so only one batch of tiles is in memory at a time.
    Returns the array opened read-only (``np.load(path, mmap_mode="r")``).
    """
    from tqdm.auto import tqdm

    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_tiles, size, size, 3))
    row = 0
    with tqdm(total=n_tiles, desc="tiles", unit="tile", disable=not progress) as bar:
        for image, xy, side in jobs:
            for s0 in range(0, len(xy), chunk):
                batch = extract_tiles(image, xy[s0:s0 + chunk], side, size)
                arr[row:row + len(batch)] = batch
                row += len(batch)
                bar.update(len(batch))
    if row != n_tiles:
        raise RuntimeError(f"wrote {row} tiles but the array holds {n_tiles}")  # internal invariant
    arr.flush()
    del arr
    return np.load(path, mmap_mode="r")


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
