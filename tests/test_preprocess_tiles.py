"""Tiles: centring, edge padding, area-averaged resampling, subtiles and the on-disk tile array."""

from __future__ import annotations

import numpy as np

from hevisum.preprocess.tiles import extract_tiles, subtiles, tile_side, write_tiles


def gradient_image(h: int = 120, w: int = 150) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)


def test_tile_side_rounds_scale_times_pitch():
    assert tile_side(26.0, 3.0) == 78
    assert tile_side(59.0085, 3.0) == 177
    assert tile_side(0.1, 3.0) == 1


def test_tiles_are_centred_crops_with_edge_padding():
    img = gradient_image()
    xy = np.array([[60.0, 50.0], [0.0, 0.0], [149.4, 119.0], [-20.0, 130.0]])
    tiles = extract_tiles(img, xy, side=9, size=9)
    assert tiles.shape == (4, 9, 9, 3) and tiles.dtype == np.uint8
    np.testing.assert_array_equal(tiles[0], img[46:55, 56:65])
    assert tuple(tiles[0][4, 4]) == tuple(img[50, 60])  # the spot pixel is the tile centre
    padded = np.pad(img, ((20, 20), (25, 25), (0, 0)), mode="edge")
    for t, (x, y) in zip(tiles[1:], xy[1:]):
        r, c = int(round(y)) + 20 - 4, int(round(x)) + 25 - 4
        np.testing.assert_array_equal(t, padded[r:r + 9, c:c + 9])


def test_resampling_averages_areas():
    # a 1-px checkerboard averages to mid grey when halved; a constant image stays constant
    img = np.zeros((100, 100, 3), np.uint8)
    img[::2, ::2] = 200
    img[1::2, 1::2] = 200
    t = extract_tiles(img, np.array([[50.0, 50.0]]), side=60, size=30)[0]
    assert abs(float(t.mean()) - 100) < 2 and t.std() < 2
    const = np.full((80, 80, 3), 77, np.uint8)
    np.testing.assert_array_equal(extract_tiles(const, np.array([[10.0, 70.0]]), 45, 78)[0], 77)


def test_subtiles_follow_the_slicing_definition():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 255, (3, 78, 78, 3), dtype=np.uint8)
    sub = subtiles(tiles)
    assert sub.shape == (3, 9, 26, 26, 3)
    for k in range(9):
        r, c = k // 3, k % 3
        np.testing.assert_array_equal(sub[:, k], tiles[:, r * 26:(r + 1) * 26, c * 26:(c + 1) * 26])


def test_write_tiles_one_memmapped_array(tmp_path):
    img_a, img_b = gradient_image(), 255 - gradient_image(90, 90)
    xa = np.array([[10.0, 10.0], [70.0, 60.0], [140.0, 100.0]])
    xb = np.array([[45.0, 45.0], [5.0, 80.0]])
    arr = write_tiles(tmp_path / "tiles.npy", [(img_a, xa, 30), (img_b, xb, 21)], 5, 12, chunk=2)
    assert isinstance(arr, np.memmap) and arr.shape == (5, 12, 12, 3) and arr.dtype == np.uint8
    again = np.load(tmp_path / "tiles.npy", mmap_mode="r")
    np.testing.assert_array_equal(again[:3], extract_tiles(img_a, xa, 30, 12))
    np.testing.assert_array_equal(again[3:], extract_tiles(img_b, xb, 21, 12))
    assert list(tmp_path.iterdir()) == [tmp_path / "tiles.npy"]  # one file, not one per spot
