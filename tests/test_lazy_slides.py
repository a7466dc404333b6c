"""Training slides whose full-resolution image is read region by region (Visium ``--fullres``, tiled TIFF).

The full-resolution file here is the real Visium glioblastoma hires image (../shared/data/visium_gbm) enlarged to
the Space Ranger frame it came from (1 / tissue_hires_scalef = 4.096 x: 8192 px wide) and written as a tiled
TIFF, tile by tile, so the test itself never holds it whole either.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hevisum.config import RunConfig, load_config
from hevisum.io import read_inputs
from hevisum.io.wsi import WORKING_SIDE, WORKING_SIDE_MIN
from hevisum.preprocess.pipeline import preprocess

TILE = 256


def write_enlarged_tiff(src: np.ndarray, path: Path, factor: float) -> tuple[int, int]:
    """``src`` enlarged ``factor`` x (bilinear, sub-pixel exact boxes) into a tiled JPEG TIFF, one tile at a time."""
    import tifffile
    from PIL import Image

    h, w = round(src.shape[0] * factor), round(src.shape[1] * factor)
    im = Image.fromarray(src)

    def tiles():
        for r in range(0, h, TILE):
            for c in range(0, w, TILE):
                tw, th = min(TILE, w - c), min(TILE, h - r)
                box = (c / factor, r / factor, min((c + tw) / factor, src.shape[1]), min((r + th) / factor, src.shape[0]))
                out = np.full((TILE, TILE, 3), 255, np.uint8)
                out[:th, :tw] = np.asarray(im.resize((tw, th), Image.Resampling.BILINEAR, box=box))
                yield out

    tifffile.imwrite(path, tiles(), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE), photometric="rgb",
                     compression="jpeg", compressionargs={"level": 90})
    return w, h


@pytest.fixture(scope="module")
def gbm_fullres(shared_data, tmp_path_factory):
    from hevisum.io.images import read_image

    folder = shared_data / "visium_gbm"
    sf = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    path = tmp_path_factory.mktemp("fullres") / "gbm_fullres.tif"
    size = write_enlarged_tiff(read_image(folder / "spatial" / "tissue_hires_image.png"), path,
                               1.0 / sf["tissue_hires_scalef"])
    return folder, path, size, sf


def _config(tmp_path: Path, text: str) -> RunConfig:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return load_config(RunConfig, p)


def test_visium_fullres_is_read_as_a_working_image_with_a_map_to_the_file(gbm_fullres):
    folder, path, (w, h), sf = gbm_fullres
    (s,) = read_inputs([folder], image=str(path), progress=False)
    lv = s.meta["level0"]
    assert (lv["width"], lv["height"]) == (w, h) and Path(lv["path"]) == path.resolve()
    # a working copy, not the 8192 px file: the spot pitch about 24 px, within the working bounds
    assert WORKING_SIDE_MIN <= max(s.image.shape[:2]) <= WORKING_SIDE < max(w, h)
    assert s.image.shape[1] == round(w * lv["sx"]) and s.image.shape[0] == round(h * lv["sy"])
    # spots: the Space Ranger full-resolution positions mapped onto the working image, kept as read
    np.testing.assert_allclose(s.spots["x"], s.spots["pxl_col_in_fullres"] * lv["sx"])
    np.testing.assert_allclose(s.spots["y"], s.spots["pxl_row_in_fullres"] * lv["sy"])
    # microns per working pixel from the 55 um spot diameter
    assert s.um_per_px == pytest.approx(55.0 / (sf["spot_diameter_fullres"] * lv["sx"]))


def test_lazy_tiles_equal_tiles_cut_from_the_whole_image_in_memory(gbm_fullres, tmp_path):
    """Without stain normalisation and background fill, tiles read region by region from the file are the
    tiles cut from the same file decoded whole, byte for byte; with them, within a grey level or so once both
    use the same stain target (the lazy path estimates each slide's own stains on the working image)."""
    import tifffile

    folder, path, _, _ = gbm_fullres
    (lazy,) = read_inputs([folder], image=str(path), progress=False)
    lv = lazy.meta["level0"]
    spots = lazy.spots.assign(x=lazy.spots["x"] / lv["sx"], y=lazy.spots["y"] / lv["sy"])
    whole = replace(lazy, image=tifffile.imread(path), spots=spots, um_per_px=lazy.um_per_px * lv["sx"],
                    meta={k: v for k, v in lazy.meta.items() if k != "level0"})
    # the same spots kept on both sides, so tiles compare row by row
    # realignment is not what is compared here (and would cost most of the time on the 8192 px image)
    common = "[realign]\nenabled = false\n[spots]\ndrop_invalid = false\n"
    plain = _config(tmp_path, common + '[stain]\nmethod = "none"\n[tissue]\nmask_background = false\n')
    a = preprocess([whole], plain.preprocess_config(), tmp_path / "whole", progress=False)
    raw = preprocess([lazy], plain.preprocess_config(), tmp_path / "lazy", progress=False)
    assert list(a.spots["spot_id"]) == list(raw.spots["spot_id"])
    np.testing.assert_array_equal(np.asarray(a.tiles), np.asarray(raw.tiles))

    full = _config(tmp_path, common).preprocess_config()
    a = preprocess([whole], full, tmp_path / "whole_n", progress=False)
    b = preprocess([lazy], full, tmp_path / "lazy_n", progress=False, stain_target=a.stain)
    diff = np.abs(np.asarray(a.tiles, dtype=np.int16) - np.asarray(b.tiles, dtype=np.int16))
    assert diff.mean() < 2.0, diff.mean()
    assert np.median(diff.mean(axis=(1, 2, 3))) < 2.0
    # and it is normalised at all: the raw tiles are further from the normalised ones than the two paths are
    assert np.abs(np.asarray(raw.tiles, dtype=np.int16) - np.asarray(b.tiles, dtype=np.int16)).mean() > 2 * diff.mean()


def test_tissue_scale_tiles_come_from_full_resolution_pixels(gbm_fullres, tmp_path):
    """An encoder's own field of view (here 112 um at 224 px, 0.5 um/px) is read from the file, not enlarged from
    the working image: its tiles hold more detail (higher gradient energy) than the same field cut from the
    working image and enlarged."""
    from hevisum.preprocess.tiles import TileGeometry

    folder, path, _, _ = gbm_fullres
    (lazy,) = read_inputs([folder], image=str(path), progress=False)
    plain = _config(tmp_path, '[stain]\nmethod = "none"\n[tissue]\nmask_background = false\n'
                              '[realign]\nenabled = false\n').preprocess_config()
    geo = TileGeometry("enc", 224, fov_um=112.0)
    p_lazy = preprocess([lazy], plain, tmp_path / "lazy", progress=False, geometries=[geo])
    small = replace(lazy, meta={k: v for k, v in lazy.meta.items() if k != "level0"})
    p_small = preprocess([small], plain, tmp_path / "small", progress=False, geometries=[geo])
    g = json.loads((p_lazy.workdir / "geometry.json").read_text())["slides"][lazy.slide_id]["enc"]
    assert g["physical"]

    def detail(t):
        t = np.asarray(t[:200], dtype=np.float32).mean(axis=3)
        return float(np.mean(np.abs(np.diff(t, axis=1))) + np.mean(np.abs(np.diff(t, axis=2))))

    assert detail(p_lazy.extra_tiles["enc"]) > 1.5 * detail(p_small.extra_tiles["enc"])


def test_cli_preprocess_with_fullres_keeps_the_space_ranger_frame(gbm_fullres, tmp_path):
    from hevisum.cli import main

    folder, path, _, _ = gbm_fullres
    out = tmp_path / "prep"
    assert main(["preprocess", str(folder), "--fullres", str(path), "--out", str(out), "--quiet"]) == 0
    spots = pd.read_csv(out / "spots.csv")
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None,
                      names=["barcode", "in_tissue", "array_row", "array_col", "row", "col"]).set_index("barcode")
    got = pos.loc[spots["spot_id"]]
    np.testing.assert_array_equal(spots["pxl_row_in_fullres"].to_numpy(), got["row"].to_numpy())
    np.testing.assert_array_equal(spots["pxl_col_in_fullres"].to_numpy(), got["col"].to_numpy())
    assert len(np.load(out / "tiles.npy", mmap_mode="r")) == len(spots)
