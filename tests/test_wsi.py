"""Whole-slide image sources, tiles on demand, thumbnail tissue masks and virtual spot grids.

The slides are generated pyramidal TIFFs (4096 x 3072 px, JPEG tiles) built from real H&E patches of
../shared/data/her2st when it is present, else from generated stained-texture patches (so the readers are
tested everywhere; the patch source does not matter to them).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hevisum.errors import HevisumError
from hevisum.grid import disc_tissue_fraction, virtual_grid
from hevisum.io import wsi
from hevisum.io.wsi import open_image, read_tiles, tissue_thumbnail, write_pyramidal_tiff

tifffile = pytest.importorskip("tifffile")

BACKENDS = ["tifffile"] + (["openslide"] if wsi.openslide_available() else [])
W, H = 4096, 3072
SHARED_DATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve()


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _area(a: np.ndarray, f: int) -> np.ndarray:
    return np.asarray(Image.fromarray(a).reduce(f))


def _generated_patches(n: int = 12, size: int = 256, seed: int = 0) -> np.ndarray:
    """Pink stroma with purple nuclei: a stand-in for real patches when ../shared/data is absent."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        density = ndi.gaussian_filter(rng.random((size, size)), 6)
        density = (density - density.min()) / (np.ptp(density) + 1e-9)
        img = np.array([225.0, 150, 200]) - density[..., None] * np.array([60.0, 70, 30])
        nuclei = ndi.binary_dilation(rng.random((size, size)) < 0.01, iterations=3)
        img[nuclei] = (90, 60, 150)
        out.append(np.clip(img + rng.normal(0, 2, img.shape), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def patches() -> np.ndarray:
    image = SHARED_DATA / "her2st" / "images" / "C2.jpg"
    if image.is_file():
        return wsi.he_patches([image], n=12, seed=0)
    return _generated_patches()


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory, patches):
    path = tmp_path_factory.mktemp("wsi") / "slide.tif"
    slide = write_pyramidal_tiff(path, W, source_tiles=patches, um_per_px=0.5, tile=256, seed=3)
    return path, slide


@pytest.fixture(scope="module")
def ome_pyramid(tmp_path_factory, patches):
    path = tmp_path_factory.mktemp("wsi") / "slide.ome.tif"
    slide = write_pyramidal_tiff(path, 2048, source_tiles=patches, um_per_px=0.25, tile=256, seed=4,
                                 compression="zlib")
    return path, slide


# ------------------------------------------------------------------------------------------ sources


def test_generated_pyramid_structure(pyramid):
    path, slide = pyramid
    assert slide.downsamples == [1, 4, 16]
    with tifffile.TiffFile(path) as tif:
        pages = list(tif.pages)
        assert [p.shape for p in pages] == [(3072, 4096, 3), (768, 1024, 3), (192, 256, 3)]
        assert all(p.is_tiled and p.tilewidth == 256 for p in pages)
        assert [int(p.subfiletype) for p in pages] == [0, 1, 1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_source_levels_and_resolution(pyramid, backend):
    path, _ = pyramid
    with open_image(path, backend=backend) as src:
        assert src.backend == backend
        assert (src.width, src.height) == (W, H)
        assert src.levels == [(4096, 3072, 1.0), (1024, 768, 4.0), (256, 192, 16.0)]
        assert src.um_per_px == pytest.approx(0.5)
    with open_image(path, um_per_px=0.3, backend=backend) as src:
        assert src.um_per_px == 0.3  # the argument overrides the metadata


def test_default_backend_choice(pyramid, ome_pyramid, tmp_path):
    expected = "openslide" if wsi.openslide_available() else "tifffile"
    with open_image(pyramid[0]) as src:
        assert src.backend == expected  # generic tiled TIFF
    with open_image(ome_pyramid[0]) as src:
        assert src.backend == "tifffile"  # OME-TIFF, levels in SubIFDs
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    with open_image(tmp_path / "a.png") as src:
        assert src.backend == "pil" and src.levels == [(30, 20, 1.0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_region_matches_reference(pyramid, backend):
    path, slide = pyramid
    x, y, w, h = 800, 1200, 1600, 800  # crosses tile borders and blob edges
    ref = slide.region(x, y, w, h)
    with open_image(path, backend=backend) as src:
        full = src.read_region(x, y, w, h)
        assert full.shape == (h, w, 3) and full.dtype == np.uint8
        assert _mad(full, ref) < 3.5  # JPEG quality 90
        # at 1/2: still level 0, area-reduced
        half = src.read_region(x, y, w, h, out_size=(w // 2, h // 2))
        assert half.shape == (h // 2, w // 2, 3)
        assert _mad(half, _area(ref, 2)) < 2.5
        # at 1/4: level 1, which is the area-average of level 0 (up to JPEG)
        quarter = src.read_region(x, y, w, h, out_um_per_px=2.0)
        assert quarter.shape == (h // 4, w // 4, 3)
        assert _mad(quarter, slide.render(4, x // 4, y // 4, w // 4, h // 4)) < 6
        assert _mad(quarter, _area(ref, 4)) < 6
        # sub-pixel placement: a half-pixel shift moves the content by half a pixel, not one
        shifted = src.read_region(x + 0.5, y, 64, 64, out_size=64)
        a, b = src.read_region(x, y, 65, 64).astype(float), shifted.astype(float)
        assert np.abs(b[:, 1:-1] - (a[:, 1:-2] + a[:, 2:-1]) / 2).mean() < 1.0


def test_backends_agree(pyramid):
    if not wsi.openslide_available():
        pytest.skip("openslide is not installed")
    path, _ = pyramid
    with open_image(path, backend="tifffile") as a, open_image(path, backend="openslide") as b:
        for kw in ({}, {"out_size": (300, 200)}, {"out_size": (40, 30)}):
            assert _mad(a.read_region(1000, 500, 1200, 800, **kw), b.read_region(1000, 500, 1200, 800, **kw)) < 1.0


def test_best_level_is_chosen(pyramid):
    path, _ = pyramid
    with open_image(path, backend="tifffile") as src:
        assert [src.best_level(d) for d in (0.5, 1, 3.9, 3.95, 4, 10, 15.5, 15.9, 100)] == [0, 0, 0, 1, 1, 1, 1, 2, 2]
        # a read at exactly level 1's resolution returns level 1's pixels untouched
        level1 = tifffile.imread(path, key=1)
        got = src.read_region(1024, 512, 800, 400, out_size=(200, 100))
        np.testing.assert_array_equal(got, level1[128:228, 256:456])
        # coarser than level 1 but finer than level 2: resampled from level 1
        got = src.read_region(0, 0, W, H, out_size=(512, 384))
        assert _mad(got, _area(level1, 2)) < 1.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_thumbnail(pyramid, backend):
    path, slide = pyramid
    with open_image(path, backend=backend) as src:
        thumb, scale = src.thumbnail(1024)
        assert thumb.shape == (768, 1024, 3) and scale == 0.25
        assert _mad(thumb, slide.render(4, 0, 0, 1024, 768)) < 6
        small, s2 = src.thumbnail(300)
        assert small.shape == (225, 300, 3) and s2 == pytest.approx(300 / 4096)


def test_thumbnail_without_pyramid_reads_in_blocks(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (1000, 1500, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "flat.tif", img, tile=(128, 128), compression="zlib")
    monkeypatch.setattr(wsi, "_BLOCK_SOURCE_PX", 300)  # many small blocks
    with open_image(tmp_path / "flat.tif", backend="tifffile") as src:
        assert len(src.levels) == 1
        thumb, scale = src.thumbnail(150)
        assert thumb.shape == (100, 150, 3) and scale == 0.1
        assert _mad(thumb, _area(img, 10)) < 0.6


def test_ome_pyramid_in_subifds(ome_pyramid):
    path, slide = ome_pyramid
    with open_image(path) as src:
        assert src.backend == "tifffile"
        assert src.levels == [(2048, 1536, 1.0), (512, 384, 4.0)]
        assert src.um_per_px == pytest.approx(0.25)  # OME PhysicalSizeX
        # zlib: lossless, so level 0 is exactly the reference
        np.testing.assert_array_equal(src.read_region(300, 200, 256, 300), slide.region(300, 200, 256, 300))
        assert src.best_level(4.0) == 1


def test_um_per_px_from_resolution_tags(tmp_path):
    img = np.full((64, 64, 3), 128, np.uint8)
    tifffile.imwrite(tmp_path / "inch.tif", img, resolution=(25400 / 0.25, 25400 / 0.25), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "dpi72.tif", img, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "none.tif", img)
    assert open_image(tmp_path / "inch.tif").um_per_px == pytest.approx(0.25)
    assert open_image(tmp_path / "dpi72.tif").um_per_px is None  # a screen default, not a scan
    assert open_image(tmp_path / "none.tif").um_per_px is None
    assert open_image(tmp_path / "none.tif", um_per_px=1.5).um_per_px == 1.5
    Image.fromarray(img).save(tmp_path / "scan.png", dpi=(50800, 50800))
    assert open_image(tmp_path / "scan.png").um_per_px == pytest.approx(0.5)


def test_um_per_px_from_aperio_description(tmp_path):
    desc = "Aperio Image Library v12.0.5\n64x64 [0,0 64x64] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990"
    tifffile.imwrite(tmp_path / "a.svs", np.full((64, 64, 3), 200, np.uint8), description=desc, tile=(16, 16),
                     metadata=None)
    assert open_image(tmp_path / "a.svs", backend="tifffile").um_per_px == pytest.approx(0.499)


def test_without_openslide(pyramid, tmp_path, monkeypatch):
    monkeypatch.setattr(wsi, "openslide_available", lambda: False)
    path, slide = pyramid
    with open_image(path) as src:
        assert src.backend == "tifffile" and len(src.levels) == 3
    (tmp_path / "s.mrxs").write_bytes(b"\x00" * 10)
    with pytest.raises(HevisumError, match=r"s\.mrxs: \.mrxs slides need OpenSlide: pip install openslide-python"):
        open_image(tmp_path / "s.mrxs")
    with pytest.raises(HevisumError, match="needs OpenSlide"):
        open_image(path, backend="openslide")


def test_pil_and_tiff_pixel_conversions(tmp_path):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((40, 50)) < 0.5, 0, 255)
    on_white = np.where(rgba[..., 3:] == 255, rgba[..., :3], 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_array_equal(open_image(tmp_path / "a.png").read_region(0, 0, 50, 40), on_white)
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=["unassalpha"], tile=(16, 16))
    for backend in BACKENDS:
        np.testing.assert_array_equal(open_image(tmp_path / "a.tif", backend=backend).read_region(0, 0, 50, 40),
                                      on_white)
    grey16 = rng.integers(0, 65536, (40, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "g.tif", grey16, rowsperstrip=7)  # strips, not tiles
    got = open_image(tmp_path / "g.tif").read_region(0, 0, 50, 40)
    np.testing.assert_array_equal(got[..., 0], np.rint(grey16 / 257).astype(np.uint8))
    assert (got[..., 0] == got[..., 2]).all()
    Image.fromarray(grey16.astype(np.uint8) // 2, "L").save(tmp_path / "g.jpg", quality=95)
    assert open_image(tmp_path / "g.jpg").read_region(0, 0, 50, 40).shape == (40, 50, 3)
    planar = np.moveaxis(rgba[..., :3], -1, 0)
    tifffile.imwrite(tmp_path / "p.tif", planar, photometric="rgb", planarconfig="separate", tile=(16, 16))
    np.testing.assert_array_equal(open_image(tmp_path / "p.tif", backend="tifffile").read_region(0, 0, 50, 40),
                                  rgba[..., :3])


# ------------------------------------------------------------------------------------------ tiles


@pytest.mark.parametrize("backend", BACKENDS)
def test_read_tiles(pyramid, backend):
    path, slide = pyramid
    xy = np.array([[2000.0, 1500.0], [2100.5, 1499.5], [10.0, 10.0], [4090.0, 3070.0], [1000.0, 1000.0]])
    with open_image(path, backend=backend) as src:
        batches = list(read_tiles(src, xy, field_um=112.0, out_px=112, batch=2))
        assert [b.shape for b in batches] == [(2, 112, 112, 3), (2, 112, 112, 3), (1, 112, 112, 3)]
        assert all(b.dtype == np.uint8 for b in batches)
        tiles = np.concatenate(batches)
        # 112 µm at 0.5 µm/px = 224 level-0 px around (2000, 1500), halved
        assert _mad(tiles[0], _area(slide.region(1888, 1388, 224, 224), 2)) < 3
        # the corner spot's window is mostly outside the image: white there
        assert (tiles[2][:50, :50] == 255).all() and (tiles[3][-50:, -50:] == 255).all()
        same = list(read_tiles(src, xy[:1], side_px=224, out_px=112))[0]
        np.testing.assert_array_equal(same[0], tiles[0])
        # wide fields come from the coarser level
        wide = next(read_tiles(src, xy[:1], field_um=600, out_px=100))
        assert wide.shape == (1, 100, 100, 3)


def test_read_tiles_errors(pyramid, tmp_path):
    path, _ = pyramid
    src = open_image(path, backend="tifffile")
    with pytest.raises(HevisumError, match="exactly one of field_um"):
        read_tiles(src, np.zeros((1, 2)), out_px=10)
    with pytest.raises(HevisumError, match=r"shape \(n, 2\)"):
        read_tiles(src, np.zeros((3,)), side_px=10, out_px=10)
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(HevisumError, match=r"a\.png.*um/px\) is unknown"):
        read_tiles(open_image(tmp_path / "a.png"), np.zeros((1, 2)), field_um=50, out_px=10)


# ------------------------------------------------------------------------------------------ errors


def test_errors_name_the_file(pyramid, tmp_path):
    path, _ = pyramid
    with pytest.raises(HevisumError, match="nope.svs' not found"):
        open_image(tmp_path / "nope.svs")
    (tmp_path / "slide.czi").write_bytes(b"\x00" * 100)
    with pytest.raises(HevisumError, match=r"slide\.czi: unsupported image format '\.czi'; expected one of .*\.svs"):
        open_image(tmp_path / "slide.czi")
    (tmp_path / "broken.tif").write_bytes(b"this is not a TIFF at all" * 10)
    with pytest.raises(HevisumError, match=r"broken\.tif: .*expected SVS"):
        open_image(tmp_path / "broken.tif")
    (tmp_path / "broken.png").write_bytes(b"not a png" * 10)
    with pytest.raises(HevisumError, match=r"broken\.png: not an image file"):
        open_image(tmp_path / "broken.png")
    for backend in BACKENDS:
        with open_image(path, backend=backend) as src:
            with pytest.raises(HevisumError, match=r"slide\.tif: region \(x=4000, y=0, w=200, h=10\) lies outside the "
                                                   r"4096x3072 image; valid regions have 0 <= x, x \+ w <= 4096"):
                src.read_region(4000, 0, 200, 10)
            with pytest.raises(HevisumError, match=r"slide\.tif: .*w, h > 0"):
                src.read_region(0, 0, 0, 10)
            with pytest.raises(HevisumError, match=r"slide\.tif: give out_um_per_px or out_size, not both"):
                src.read_region(0, 0, 10, 10, out_size=5, out_um_per_px=1.0)
            assert src.read_region(4000, 0, 200, 10, pad=True)[:, 100:].min() == 255
    with pytest.raises(HevisumError, match="backend 'vips' is not one of"):
        open_image(path, backend="vips")
    with pytest.raises(HevisumError, match="um_per_px must be a positive number"):
        open_image(path, um_per_px=-1)


# ------------------------------------------------------------------------------------------ tissue and grid


def test_tissue_thumbnail_and_virtual_grid(pyramid):
    path, slide = pyramid
    with open_image(path, backend="tifffile") as src:
        thumb, mask, scale = tissue_thumbnail(src, 1024)
    assert mask.shape == thumb.shape[:2] == (768, 1024) and mask.dtype == bool
    truth = slide._alpha((np.arange(1024) + 0.5) / scale, (np.arange(768) + 0.5) / scale) > 0.5
    assert (mask & truth).sum() / (mask | truth).sum() > 0.85
    pitch = 200.0  # 100 µm at 0.5 µm/px
    grid = virtual_grid(mask, scale, pitch)
    assert list(grid.columns)[:5] == ["spot_id", "x", "y", "array_row", "array_col"]
    # one hexagonal spot per pitch^2 * sqrt(3)/2 of tissue
    tissue_px0 = truth.sum() / scale**2
    assert len(grid) == pytest.approx(tissue_px0 / (pitch**2 * math.sqrt(3) / 2), rel=0.15)
    assert (grid["tissue_fraction"] >= 0.5).all() and grid["spot_id"].is_unique
    assert truth[(grid["y"] * scale).astype(int), (grid["x"] * scale).astype(int)].mean() > 0.9
    square = virtual_grid(mask, scale, pitch, hexagonal=False)
    assert len(grid) / len(square) == pytest.approx(2 / math.sqrt(3), rel=0.06)


def test_virtual_grid_hexagonal_geometry():
    from scipy.spatial import cKDTree

    mask = np.ones((300, 400), dtype=bool)
    grid = virtual_grid(mask, 0.1, 100.0, min_tissue=0.0)  # a 4000 x 3000 px image, all tissue
    n_rows = math.floor((3000 - 50) / (100 * math.sqrt(3) / 2)) + 1
    assert grid["array_row"].max() + 1 == n_rows == 35
    assert len(grid) == n_rows * 40 - (n_rows // 2)  # odd rows are shifted: their last point falls off
    xy = grid[["x", "y"]].to_numpy()
    d, _ = cKDTree(xy).query(xy, k=7)
    interior = (xy[:, 0] > 200) & (xy[:, 0] < 3800) & (xy[:, 1] > 200) & (xy[:, 1] < 2800)
    np.testing.assert_allclose(d[interior, 1:], 100.0, rtol=1e-9)  # six neighbours at one pitch
    rows = grid.groupby("array_row")["y"].first().to_numpy()
    np.testing.assert_allclose(np.diff(rows), 100 * math.sqrt(3) / 2)
    odd = grid[grid["array_row"] == 1]
    assert odd["x"].iloc[0] == 100.0 and (odd["array_col"] % 2 == 1).all()
    assert (grid[grid["array_row"] == 0]["array_col"] % 2 == 0).all()
    assert grid["spot_id"].iloc[0] == "r0c0"
    square = virtual_grid(mask, 0.1, 100.0, hexagonal=False, min_tissue=0.0)
    assert len(square) == 30 * 40 and set(np.diff(np.sort(square["y"].unique()))) == {100.0}


def test_virtual_grid_min_tissue_and_scale():
    mask = np.zeros((100, 200), dtype=bool)
    mask[:, :100] = True  # left half is tissue
    grid = virtual_grid(mask, (0.5, 0.5), 20.0, hexagonal=False, spot_diameter_px=10.0)
    assert grid["x"].max() < 200 and len(grid) == 10 * 10
    frac = disc_tissue_fraction(mask, 0.5, np.array([[200.0, 50.0], [190.0, 50.0], [210.0, 50.0], [-50.0, 0.0]]), 20)
    assert frac[1] == 1.0 and frac[2] == 0.0 and 0.3 < frac[0] < 0.7 and frac[3] == 0.0
    assert len(virtual_grid(np.zeros((50, 50), bool), 1.0, 5.0)) == 0
    with pytest.raises(HevisumError, match="pitch_px_level0 must be a positive"):
        virtual_grid(mask, 1.0, 0)
    with pytest.raises(HevisumError, match="min_tissue must be in"):
        virtual_grid(mask, 1.0, 10, min_tissue=2)
