"""Readers and writers on tiny files generated here: every format, exact coordinates, targets, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hevisum.errors import HevisumError
from hevisum.io import detect_format, read_input, read_inputs
from hevisum.io.anndata_io import read_h5ad, write_h5ad
from hevisum.io.competition import write_competition_h5
from hevisum.io.images import downscale_image, read_image, read_image_scaled, to_rgb_uint8
from hevisum.io.legacy_st import estimate_um_per_px, read_legacy_st, read_legacy_st_folder
from hevisum.io.tables import normalize_counts, resolve_gene_targets
from hevisum.io.visium import read_10x_h5, read_visium
from hevisum.slide import Slide

RNG_SEED = 0


# ------------------------------------------------------------------------------------------ helpers
def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A light background with a darker 'tissue' block in the middle (spots sit on it)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 235, np.uint8)
    img[h // 8: h - h // 8, w // 8: w - w // 8] = rng.integers(80, 160, size=(h - 2 * (h // 8), w - 2 * (w // 8), 3))
    return img


def _save(img: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def _expected_genes(counts_list: list[np.ndarray], genes: list[str], n: int) -> tuple[list[str], list[np.ndarray]]:
    """The reference computation, dense numpy: normalise each, variance over all rows, top n, stable."""
    norm = [np.log1p(c / c.sum(axis=1, keepdims=True) * 1e4) for c in counts_list]
    var = np.concatenate(norm).var(axis=0)
    order = np.argsort(-var, kind="stable")[:n]
    return [genes[i] for i in order], [m[:, order] for m in norm]


# ------------------------------------------------------------------------------------------ images
def test_read_image_rgb_grey_16bit_alpha(tmp_path):
    img = _rgb(20, 30)
    np.testing.assert_array_equal(read_image(_save(img, tmp_path / "a.png")), img)
    np.testing.assert_array_equal(read_image(_save(img, tmp_path / "a.tif")), img)
    jpg = read_image(_save(img, tmp_path / "a.jpg"))
    assert jpg.shape == (20, 30, 3) and jpg.dtype == np.uint8  # lossy: compare average colour only
    assert np.abs(jpg.mean(axis=(0, 1)) - img.mean(axis=(0, 1))).max() < 3

    grey = img[:, :, 0]
    out = read_image(_save(grey, tmp_path / "g.png"))
    assert out.shape == (20, 30, 3)
    np.testing.assert_array_equal(out[:, :, 0], grey)
    np.testing.assert_array_equal(out[:, :, 2], grey)

    g16 = (grey.astype(np.uint16) * 257)  # 16-bit of the same picture: must map back exactly
    Image.fromarray(g16).save(tmp_path / "g16.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[:, :, 1], grey)

    opaque = np.dstack([img, np.full((20, 30), 255, np.uint8)])
    np.testing.assert_array_equal(read_image(_save(opaque, tmp_path / "o.png")), img)
    transparent = opaque.copy()
    transparent[0, :5, 3] = 0
    _save(transparent, tmp_path / "t.png")
    with pytest.raises(HevisumError, match=r"t\.png.*alpha channel with 5 transparent"):
        read_image(tmp_path / "t.png")


def test_read_image_errors_and_pil_limit(tmp_path, monkeypatch):
    with pytest.raises(HevisumError, match="nope.png' not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(HevisumError, match=r"bad\.jpg: not an image file"):
        read_image(tmp_path / "bad.jpg")
    # PIL refuses images above MAX_IMAGE_PIXELS; our reads lift the limit (her2st JPGs are ~92 Mpx) and restore it.
    _save(_rgb(40, 40), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert read_image(tmp_path / "big.png").shape == (40, 40, 3)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_to_rgb_uint8_conversions():
    f = np.zeros((4, 4, 3), np.float32)
    f[0, 0] = 1.0
    out = to_rgb_uint8(f, "x")
    assert out.dtype == np.uint8 and out[0, 0, 0] == 255 and out[1, 1, 0] == 0
    with pytest.raises(HevisumError, match="x: image has shape \\(4, 4, 5\\)"):
        to_rgb_uint8(np.zeros((4, 4, 5), np.uint8), "x")
    src = np.zeros((4, 4), np.uint8)
    to_rgb_uint8(src, "x")
    assert src.shape == (4, 4)  # input untouched


def test_downscale_scale_factors(tmp_path):
    img = np.zeros((16, 24, 3), np.uint8)
    img[:, :12] = 200  # left half bright: block means survive the shrink
    img[0, 0] = 0  # one dark pixel: its 2x2 block averages to 150
    small, (sx, sy) = downscale_image(img, 12)
    assert small.shape == (8, 12, 3) and (sx, sy) == (0.5, 0.5)
    assert small[0, 0, 0] == 150 and small[1:, :6].min() == 200 and small[:, 6:].max() == 0
    same, s = downscale_image(img, 24)
    assert same is img and s == (1.0, 1.0)
    big = _rgb(100, 160)
    _save(big, tmp_path / "b.jpg")
    arr, (sx, sy) = read_image_scaled(tmp_path / "b.jpg", max_side=40)
    assert arr.shape == (25, 40, 3) and (sx, sy) == (0.25, 0.25)


# ------------------------------------------------------------------------------------------ Visium
FULL_H, FULL_W = 800, 1000
HIRES, LOWRES, DIAM = 0.5, 0.1, 60.0


def _positions() -> pd.DataFrame:
    rows = []
    for i in range(12):
        r, c = divmod(i, 4)
        rows.append({"barcode": f"BC{i:02d}-1", "in_tissue": int(i not in (0, 5, 11)), "array_row": r,
                     "array_col": c * 2, "pxl_row_in_fullres": 200.0 + 100 * r + 0.25 * i,
                     "pxl_col_in_fullres": 150.0 + 150 * c + 0.5 * i})
    return pd.DataFrame(rows)


def make_visium(root: Path, version: str = "v2", hires: bool = True, lowres: bool = True,
                table: bool = False, h5_counts: np.ndarray | None = None, genes: list[str] | None = None) -> Path:
    spatial = root / "spatial"
    spatial.mkdir(parents=True)
    pos = _positions()
    if version == "v2":
        pos.to_csv(spatial / "tissue_positions.csv", index=False)
    else:
        pos.to_csv(spatial / "tissue_positions_list.csv", index=False, header=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps(
        {"tissue_hires_scalef": HIRES, "tissue_lowres_scalef": LOWRES, "spot_diameter_fullres": DIAM,
         "fiducial_diameter_fullres": 90.0}))
    if hires:
        _save(_rgb(int(FULL_H * HIRES), int(FULL_W * HIRES)), spatial / "tissue_hires_image.png")
    if lowres:
        _save(_rgb(int(FULL_H * LOWRES), int(FULL_W * LOWRES)), spatial / "tissue_lowres_image.png")
    if table:
        bcs = pos["barcode"][pos["in_tissue"] == 1].tolist()
        kept = [b for b in bcs if b != "BC03-1"] + ["BC00-1"]  # one in-tissue spot missing, one extra row
        vals = np.random.default_rng(1).dirichlet(np.ones(3), size=len(kept))
        pd.DataFrame(vals, index=kept, columns=["T1", "T2", "T3"]).to_csv(root / "celltype_props.tsv", sep="\t")
    if h5_counts is not None:
        write_10x_h5(root / "filtered_feature_bc_matrix.h5", h5_counts, pos["barcode"].tolist(), genes)
    return root


def write_10x_h5(path: Path, counts: np.ndarray, barcodes: list[str], genes: list[str],
                 feature_types: list[str] | None = None) -> None:
    """Write a spots x genes dense matrix in the 10x HDF5 layout (genes x barcodes, column-compressed)."""
    import scipy.sparse as sp

    m = sp.csc_matrix(counts.T)  # genes x barcodes, compressed by barcode
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data.astype(np.int32), m.indices.astype(np.int64), m.indptr
        g["shape"] = np.asarray(m.shape, np.int32)
        g["barcodes"] = np.asarray(barcodes, dtype="S")
        fg = g.create_group("features")
        fg["name"] = np.asarray(genes, dtype="S")
        fg["id"] = np.asarray([f"ID{i}" for i in range(len(genes))], dtype="S")
        fg["feature_type"] = np.asarray(feature_types or ["Gene Expression"] * len(genes), dtype="S")


def test_visium_coordinates_in_tissue_and_versions(tmp_path):
    pos = _positions()
    inside = pos[pos["in_tissue"] == 1]
    for version in ("v1", "v2"):
        root = make_visium(tmp_path / version, version=version)
        (s,) = read_visium(root)
        assert s.slide_id == version and s.split == "test" and s.targets is None  # no targets -> Test
        assert s.spot_ids.tolist() == inside["barcode"].tolist()
        np.testing.assert_array_equal(s.spots["x"], inside["pxl_col_in_fullres"] * HIRES)
        np.testing.assert_array_equal(s.spots["y"], inside["pxl_row_in_fullres"] * HIRES)
        assert s.image.shape == (400, 500, 3) and s.meta["image"] == "hires"
        assert s.um_per_px == pytest.approx(55.0 / (DIAM * HIRES))
        assert s.meta["n_in_tissue"] == 9 and s.meta["n_positions"] == 12
    (low,) = read_visium(tmp_path / "v2", image="lowres")
    np.testing.assert_allclose(low.xy, inside[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy() * LOWRES)
    assert low.image.shape == (80, 100, 3)
    (sp_only,) = read_visium(tmp_path / "v2" / "spatial")  # the spatial/ folder itself
    assert sp_only.slide_id == "v2" and sp_only.n_spots == 9
    root = make_visium(tmp_path / "nohires", hires=False)
    assert read_visium(root)[0].meta["image"] == "lowres"
    with pytest.raises(HevisumError, match="no tissue_hires_image.png.*valid --image choices here: \\['lowres'\\]"):
        read_visium(root, image="hires")
    with pytest.raises(HevisumError, match="--image full needs exactly one full-resolution image"):
        read_visium(root, image="full")
    full = _save(_rgb(FULL_H, FULL_W), tmp_path / "nohires" / "fullres.tif")
    (f,) = read_visium(root, image="full")
    assert f.image.shape == (FULL_H, FULL_W, 3) and f.meta["image_file"] == str(full)
    np.testing.assert_array_equal(f.spots["x"], inside["pxl_col_in_fullres"])


def test_visium_table_targets_by_barcode(tmp_path):
    root = make_visium(tmp_path / "S1", table=True)
    (s,) = read_visium(root, slide_id="renamed", test_slides=None)
    table = pd.read_csv(root / "celltype_props.tsv", sep="\t", index_col=0, float_precision="round_trip")
    assert s.slide_id == "renamed" and s.split == "train"
    assert s.meta["n_dropped_no_target"] == 1 and s.meta["n_target_rows_unmatched"] == 1
    assert "BC03-1" not in s.spot_ids and s.n_spots == 8
    np.testing.assert_array_equal(s.targets, table.loc[s.spot_ids].to_numpy())
    assert s.target_names == ["T1", "T2", "T3"]
    pos = _positions().set_index("barcode")
    np.testing.assert_array_equal(s.spots["x"], pos.loc[s.spot_ids, "pxl_col_in_fullres"] * HIRES)
    # the same table given explicitly as CSV gives the same slide; as test it keeps the truth
    table.to_csv(tmp_path / "t.csv")
    (t,) = read_visium(root, targets=str(tmp_path / "t.csv"), test_slides=["S1"])
    assert t.split == "test" and t.targets is None
    np.testing.assert_array_equal(t.meta["truth"], s.targets)
    # a second candidate table makes the default ambiguous
    table.to_csv(root / "proportions_other.csv")
    with pytest.raises(HevisumError, match="several target tables.*--targets"):
        read_visium(root)


def test_visium_no_barcode_match_names_both_sides(tmp_path):
    root = make_visium(tmp_path / "S1")
    pd.DataFrame({"T1": [0.5, 0.5]}, index=["BC01", "BC02"]).to_csv(tmp_path / "t.tsv", sep="\t")
    with pytest.raises(HevisumError,
                       match=r"t\.tsv: no barcode matches.*table has e\.g\. 'BC01'.*spots have e\.g\. 'BC01-1'"):
        read_visium(root, targets=str(tmp_path / "t.tsv"))


def test_read_10x_h5_and_h5_targets(tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    n_genes = 30
    counts = rng.poisson(rng.uniform(0.2, 8, size=n_genes), size=(12, n_genes)).astype(np.int64)
    counts[:, 5] = 0  # an all-zero gene
    genes = [f"G{i}" for i in range(n_genes)]
    genes[7] = genes[8] = "DUP"
    root = make_visium(tmp_path / "S1", h5_counts=counts, genes=genes)
    m, barcodes, names = read_10x_h5(root / "filtered_feature_bc_matrix.h5")
    np.testing.assert_array_equal(m.toarray(), counts)
    assert barcodes == _positions()["barcode"].tolist()
    assert names[7] == "DUP_ID7" and names[8] == "DUP_ID8" and names[0] == "G0"

    (s,) = read_visium(root, targets="h5", top_genes=10)
    inside = (_positions()["in_tissue"] == 1).to_numpy()
    exp_names, (exp,) = _expected_genes([counts[inside].astype(float)], names, 10)
    assert s.target_names == exp_names and s.split == "train"
    np.testing.assert_allclose(s.targets, exp, rtol=1e-12)
    assert s.meta["targets_kind"] == "genes" and "top 10 of 30 genes" in s.meta["gene_selection"]
    (by_path,) = read_visium(root, targets=str(root / "filtered_feature_bc_matrix.h5"), top_genes=10)
    np.testing.assert_array_equal(by_path.targets, s.targets)
    (g,) = read_visium(root, targets="h5", genes=["G3", "G1"])
    assert g.target_names == ["G3", "G1"]
    with pytest.raises(HevisumError, match=r"requested gene\(s\) \['NOPE'\] not found"):
        read_visium(root, targets="h5", genes=["NOPE"])


def test_10x_h5_keeps_gene_expression_only(tmp_path):
    counts = np.arange(12, dtype=np.int64).reshape(3, 4)
    write_10x_h5(tmp_path / "m.h5", counts, ["a", "b", "c"], ["g0", "g1", "ab", "g3"],
                 ["Gene Expression", "Gene Expression", "Antibody Capture", "Gene Expression"])
    m, _, names = read_10x_h5(tmp_path / "m.h5")
    assert names == ["g0", "g1", "g3"]
    np.testing.assert_array_equal(m.toarray(), counts[:, [0, 1, 3]])
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_group("matrix").create_dataset("data", data=[1])
    with pytest.raises(HevisumError, match=r"bad\.h5: group 'matrix' lacks \['indices'"):
        read_10x_h5(tmp_path / "bad.h5")


def test_visium_bad_inputs(tmp_path):
    root = make_visium(tmp_path / "S1")
    pos = pd.read_csv(root / "spatial" / "tissue_positions.csv").drop(columns=["pxl_row_in_fullres"])
    pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(HevisumError, match=r"tissue_positions\.csv: missing column\(s\) \['pxl_row_in_fullres'\]; "
                                           r"columns found: \['barcode', 'in_tissue'"):
        read_visium(root)

    root = make_visium(tmp_path / "S2")
    sf = json.loads((root / "spatial" / "scalefactors_json.json").read_text())
    del sf["tissue_hires_scalef"]
    (root / "spatial" / "scalefactors_json.json").write_text(json.dumps(sf))
    with pytest.raises(HevisumError, match="missing field 'tissue_hires_scalef'; fields found"):
        read_visium(root)
    (root / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(HevisumError, match="scalefactors_json.json not found"):
        read_visium(root)

    root = make_visium(tmp_path / "S3")
    pos = _positions()
    pos.loc[1, "pxl_col_in_fullres"] = 5000.0  # far outside the image
    pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(HevisumError, match=r"1 spot\(s\) lie outside the 500x400 image, first 'BC01-1'"):
        read_visium(root)

    root = make_visium(tmp_path / "S4")
    pos = _positions().assign(in_tissue=0)
    pos.to_csv(root / "spatial" / "tissue_positions.csv", index=False)
    with pytest.raises(HevisumError, match="no spot has in_tissue == 1.*empty"):
        read_visium(root)

    with pytest.raises(HevisumError, match="--targets h5 needs filtered_feature_bc_matrix.h5"):
        read_visium(make_visium(tmp_path / "S5"), targets="h5")

    root = make_visium(tmp_path / "S6")
    (root / "spatial" / "tissue_positions.csv").unlink()
    (root / "spatial" / "tissue_positions.parquet").write_bytes(b"PAR1")
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        with pytest.raises(HevisumError, match="parquet needs the pyarrow package"):
            read_visium(root)
    (root / "spatial" / "tissue_positions.parquet").unlink()
    with pytest.raises(HevisumError, match="no spot positions file; expected one of"):
        read_visium(root)


def test_visium_nan_target_rejected(tmp_path):
    root = make_visium(tmp_path / "S1", table=True)
    t = pd.read_csv(root / "celltype_props.tsv", sep="\t", index_col=0)
    t.iloc[2, 1] = np.nan
    t.to_csv(root / "celltype_props.tsv", sep="\t")
    with pytest.raises(HevisumError, match=r"target 'T2' of spot '.*' is nan; targets must be finite"):
        read_visium(root)


# ------------------------------------------------------------------------------------------ legacy ST
def _grid(n: int = 5, checker: bool = False) -> list[tuple[int, int]]:
    pts = [(x, y) for x in range(2, 2 + n) for y in range(3, 3 + n)]
    return [(x, y) for x, y in pts if (x + y) % 2 == 0] if checker else pts


def write_section(folder: Path, img_path: Path, spots_path: Path, targets_path: Path | None, *, seed: int,
                  counts_genes: list[str] | None = None, checker: bool = False, step: float = 50.0,
                  drop_one: bool = True) -> dict:
    """A legacy ST section: image, spot table (x, y, pixel_x, pixel_y, selected), targets keyed '{x}x{y}'."""
    rng = np.random.default_rng(seed)
    pts = _grid(checker=checker)
    tbl = pd.DataFrame({"x": [p[0] for p in pts], "y": [p[1] for p in pts]})
    tbl["new_x"] = tbl["x"] + 0.01
    tbl["new_y"] = tbl["y"] - 0.01
    tbl["pixel_x"] = 20.0 + step * (tbl["x"] - 2) + 0.3
    tbl["pixel_y"] = 30.0 + (step * 1.1 if checker else step) * (tbl["y"] - 3) + 0.7
    tbl["selected"] = 1
    tbl.loc[0, "selected"] = 0
    _save(_rgb(400, 380, seed), img_path)
    spots_path.parent.mkdir(parents=True, exist_ok=True)
    tbl.to_csv(spots_path, sep="\t", index=False)
    keys = [f"{x}x{y}" for x, y in zip(tbl["x"], tbl["y"])]
    sel_keys = [k for k, s in zip(keys, tbl["selected"]) if s == 1]
    # rows: reversed order (the reader must follow the table's order), one selected spot missing, the
    # unselected one present (ignored)
    rows = list(reversed(sel_keys[1:] if drop_one else sel_keys)) + [keys[0]]
    if counts_genes is None:
        vals = rng.dirichlet(np.ones(4), size=len(rows))
        df = pd.DataFrame(vals, index=rows, columns=["A", "B", "C", "D"])
    else:
        lam = rng.uniform(0.5, 20, size=len(counts_genes))
        df = pd.DataFrame(rng.poisson(lam, size=(len(rows), len(counts_genes))), index=rows, columns=counts_genes)
    if targets_path is not None:
        targets_path.parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(targets_path, sep="\t", compression="gzip" if targets_path.name.endswith(".gz") else None)
    return {"table": tbl, "targets": df, "rows": rows}


def make_her2st(root: Path, secs=("A1", "A2")) -> dict:
    genes = [f"g{i}" for i in range(25)]
    info = {}
    for i, sec in enumerate(secs):
        info[sec] = write_section(root, root / "images" / f"{sec}.jpg", root / "spots" / f"{sec}_selection.tsv",
                                  root / "celltypes_subset" / f"{sec}.tsv", seed=10 + i)
        rows = info[sec]["rows"]
        rng = np.random.default_rng(20 + i)
        (root / "celltypes_major").mkdir(exist_ok=True)
        pd.DataFrame(rng.dirichlet(np.ones(2), size=len(rows)), index=rows, columns=["M1", "M2"]).to_csv(
            root / "celltypes_major" / f"{sec}.tsv", sep="\t")
        # each section's counts table lists a different gene subset (absent = not detected = 0)
        sub = genes[i:]
        (root / "counts").mkdir(exist_ok=True)
        cnt = pd.DataFrame(rng.poisson(rng.uniform(0.5, 20, size=len(sub)), size=(len(rows), len(sub))),
                           index=rows, columns=sub)
        cnt.to_csv(root / "counts" / f"{sec}.tsv.gz", sep="\t", compression="gzip")
        info[sec]["counts"] = cnt
    return info


def test_her2st_layout_keys_order_and_targets(tmp_path):
    root = tmp_path / "her2"
    info = make_her2st(root)
    slides = read_legacy_st_folder(root, progress=False)
    assert [s.slide_id for s in slides] == ["A1", "A2"] and detect_format(root) == "legacy_st"
    for s in slides:
        tbl, df = info[s.slide_id]["table"], info[s.slide_id]["targets"]
        exp_ids = [k for k in df.index if k != f"{tbl.x[0]}x{tbl.y[0]}"]  # table order, unselected dropped
        assert s.spot_ids.tolist() == exp_ids
        assert s.meta["n_dropped_no_target"] == 1 and s.meta["n_target_rows_unmatched"] == 1
        np.testing.assert_array_equal(s.targets, df.loc[exp_ids].to_numpy())
        t = tbl.assign(key=[f"{x}x{y}" for x, y in zip(tbl.x, tbl.y)]).set_index("key")
        np.testing.assert_array_equal(s.spots["x"], t.loc[exp_ids, "pixel_x"])
        np.testing.assert_array_equal(s.spots["y"], t.loc[exp_ids, "pixel_y"])
        assert s.target_names == ["A", "B", "C", "D"]
        assert s.um_per_px == pytest.approx(200.0 / 50.0) and s.meta["um_per_px_estimated"] is True
    major = read_legacy_st_folder(root, targets="celltypes_major", test_slides=["A2"], progress=False)
    assert major[0].target_names == ["M1", "M2"] and major[1].split == "test" and major[1].targets is None
    assert major[1].meta["truth"].shape == (major[1].n_spots, 2)
    with pytest.raises(HevisumError, match=r"--targets 'nope' is not one of the target folders \['celltypes_major', "
                                           r"'celltypes_subset', 'counts'\]"):
        read_legacy_st_folder(root, targets="nope", progress=False)
    with pytest.raises(HevisumError, match=r"--test slide 'A9' not found; slides are \['A1', 'A2'\]"):
        read_legacy_st_folder(root, test_slides=["A9"], progress=False)
    # a pattern with {slide}
    pat = str(root / "celltypes_major" / "{slide}.tsv")
    assert read_legacy_st_folder(root, targets=pat, progress=False)[1].target_names == ["M1", "M2"]


def test_her2st_counts_genes_chosen_jointly(tmp_path):
    root = tmp_path / "her2"
    info = make_her2st(root)
    slides = read_legacy_st_folder(root, targets="counts", top_genes=6, progress=False)
    union = [f"g{i}" for i in range(25)]
    mats = []
    for s in slides:
        cnt = info[s.slide_id]["counts"].reindex(columns=union, fill_value=0)
        mats.append(cnt.loc[s.spot_ids].to_numpy(float))
    exp_names, exp_vals = _expected_genes(mats, union, 6)
    for s, ev in zip(slides, exp_vals):
        assert s.target_names == exp_names
        np.testing.assert_allclose(s.targets, ev, rtol=1e-12)
        assert s.meta["n_selected_genes_absent"] == sum(g not in info[s.slide_id]["counts"].columns for g in exp_names)


def make_mob(root: Path, secs=("M1", "M2", "M3"), genes=None, seed0=0) -> dict:
    genes = genes or [f"ENS{i:03d}" for i in range(40)]
    return {sec: write_section(root, root / f"{sec}.jpg", root / f"alignment_table_{sec}.tsv", root / f"{sec}.tsv",
                               seed=seed0 + i, counts_genes=genes, checker=True, step=20.0, drop_one=False)
            for i, sec in enumerate(secs)}


def test_mob_layout_counts_and_um_estimate(tmp_path):
    root = tmp_path / "mob"
    info = make_mob(root)
    slides = read_input(root, test_slides=["M3"], top_genes=8, progress=False)
    assert [(s.slide_id, s.split) for s in slides] == [("M1", "train"), ("M2", "train"), ("M3", "test")]
    genes = list(info["M1"]["targets"].columns)
    mats = [info[s.slide_id]["targets"].loc[s.spot_ids].to_numpy(float) for s in slides]
    exp_names, exp_vals = _expected_genes(mats, genes, 8)  # chosen over all three sections, the test one too
    assert slides[0].target_names == exp_names and slides[1].target_names == exp_names
    np.testing.assert_allclose(slides[0].targets, exp_vals[0], rtol=1e-12)
    np.testing.assert_allclose(slides[2].meta["truth"], exp_vals[2], rtol=1e-12)
    assert slides[2].meta["truth_names"] == exp_names
    # checkerboard grid, 20 px per array x step -> 100 µm / 20 px
    assert slides[0].um_per_px == pytest.approx(5.0)
    assert slides[0].meta["st_array"].startswith("2k")
    assert slides[0].meta["spot_pitch_px"] == pytest.approx(np.hypot(20.0, 22.0))


def test_estimate_um_per_px_square_and_rotated():
    pts = np.array(_grid(6), float)
    theta = 0.1
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pix = (pts * 80.0) @ rot.T + 17.0
    est = estimate_um_per_px(pts, pix)
    assert est["um_per_px"] == pytest.approx(2.5) and est["spot_pitch_px"] == pytest.approx(80.0)
    assert estimate_um_per_px(pts[:2], pix[:2]) is None


def test_read_legacy_st_single_and_errors(tmp_path):
    info = write_section(tmp_path, tmp_path / "im.png", tmp_path / "spots.tsv", tmp_path / "t.tsv", seed=3)
    s = read_legacy_st(tmp_path / "im.png", tmp_path / "spots.tsv", tmp_path / "t.tsv", "one")
    assert s.slide_id == "one" and s.n_spots == len(info["rows"]) - 1 and s.split == "train"
    t = read_legacy_st(tmp_path / "im.png", tmp_path / "spots.tsv", None, "one")
    assert t.split == "test" and t.targets is None and t.n_spots == len(info["table"]) - 1

    info["table"].drop(columns=["pixel_y"]).to_csv(tmp_path / "s2.tsv", sep="\t", index=False)
    with pytest.raises(HevisumError, match=r"s2\.tsv: missing column\(s\) \['pixel_y'\]; columns found: \['x', 'y', "
                                           r"'new_x', 'new_y', 'pixel_x', 'selected'\]"):
        read_legacy_st(tmp_path / "im.png", tmp_path / "s2.tsv", tmp_path / "t.tsv", "one")
    bad = info["targets"].copy()
    bad.index = [f"s{i}" for i in range(len(bad))]
    bad.to_csv(tmp_path / "t2.tsv", sep="\t")
    with pytest.raises(HevisumError, match=r"t2\.tsv: no '\{x\}x\{y\}' key matches.*table has e\.g\. 's0'.*spots have "
                                           r"e\.g\. '2x4'"):
        read_legacy_st(tmp_path / "im.png", tmp_path / "spots.tsv", tmp_path / "t2.tsv", "one")
    info["table"].assign(selected=0).to_csv(tmp_path / "s3.tsv", sep="\t", index=False)
    with pytest.raises(HevisumError, match=r"no spot has selected == 1.*empty"):
        read_legacy_st(tmp_path / "im.png", tmp_path / "s3.tsv", tmp_path / "t.tsv", "one")
    with pytest.raises(HevisumError, match="targets table .*nope.tsv' not found"):
        read_legacy_st(tmp_path / "im.png", tmp_path / "spots.tsv", tmp_path / "nope.tsv", "one")
    # a semi-transparent image is refused with the file named
    rgba = np.dstack([_rgb(400, 380), np.full((400, 380), 128, np.uint8)])
    _save(rgba, tmp_path / "rgba.png")
    with pytest.raises(HevisumError, match=r"rgba\.png: image has an alpha channel"):
        read_legacy_st(tmp_path / "rgba.png", tmp_path / "spots.tsv", tmp_path / "t.tsv", "one")


# ------------------------------------------------------------------------------------------ AnnData
def _slides_for_h5ad() -> list[Slide]:
    rng = np.random.default_rng(RNG_SEED)
    out = []
    for i, (sid, split) in enumerate([("A", "train"), ("B", "train"), ("C", "test"), ("D", "test")]):
        n = 6 + i
        spots = pd.DataFrame({"spot_id": [f"s{j}" for j in range(n)], "x": rng.uniform(5, 45, n),
                              "y": rng.uniform(5, 35, n)})
        t = rng.dirichlet(np.ones(3), size=n)
        meta = {"applied_shift": (3.0, -2.0)} if sid == "A" else {}
        s = Slide(sid, _rgb(40, 50, i), spots, t if split == "train" else None, ["p", "q", "r"] if split == "train"
                  else None, um_per_px=2.0 + i, split=split, meta=meta)
        if sid == "C":
            s.meta.update(truth=t, truth_names=["p", "q", "r"])
        out.append(s)
    return out


def test_h5ad_round_trip_and_scanpy_layout(tmp_path):
    import anndata as ad

    slides = _slides_for_h5ad()
    write_h5ad(slides, tmp_path / "out.h5ad")
    assert not list(tmp_path.glob(".out.h5ad.*"))  # no temp file left
    back = read_h5ad(tmp_path / "out.h5ad")
    assert [(s.slide_id, s.split) for s in back] == [(s.slide_id, s.split) for s in slides]
    for a, b in zip(slides, back):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.xy, b.xy)
        assert a.spot_ids.tolist() == b.spot_ids.tolist() and a.um_per_px == pytest.approx(b.um_per_px)
        if a.targets is not None:
            np.testing.assert_array_equal(a.targets, b.targets)
            assert b.target_names == ["p", "q", "r"]
    np.testing.assert_array_equal(back[2].meta["truth"], slides[2].meta["truth"])
    assert "truth" not in back[3].meta and back[3].targets is None
    assert back[0].meta["applied_shift"] == (3.0, -2.0)
    adata = ad.read_h5ad(tmp_path / "out.h5ad")
    lib = adata.uns["spatial"]["B"]
    assert lib["images"]["hires"].shape == (40, 50, 3) and lib["scalefactors"]["tissue_hires_scalef"] == 1.0
    assert lib["scalefactors"]["spot_diameter_fullres"] > 0
    np.testing.assert_array_equal(adata.obsm["spatial"][adata.obs["slide"] == "B"], slides[1].xy)


def test_h5ad_scanpy_convention_counts_and_proportions(tmp_path):
    import anndata as ad

    rng = np.random.default_rng(RNG_SEED)
    n, g = 10, 15
    counts = rng.poisson(rng.uniform(0.5, 9, g), size=(n, g)).astype(np.float32)
    full_xy = np.column_stack([rng.uniform(50, 350, n), rng.uniform(40, 250, n)])
    img = _rgb(75, 100).astype(np.float32) / 255.0  # scanpy keeps float images in [0, 1]
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=[f"bc{i}" for i in range(n)]),
                       var=pd.DataFrame(index=[f"gene{j}" for j in range(g)]))
    adata.obsm["spatial"] = full_xy
    adata.uns["spatial"] = {"lib1": {"images": {"hires": img},
                                     "scalefactors": {"tissue_hires_scalef": 0.25, "spot_diameter_fullres": 20.0}}}
    adata.write_h5ad(tmp_path / "sc.h5ad")
    (s,) = read_h5ad(tmp_path / "sc.h5ad", top_genes=5)
    assert s.slide_id == "lib1" and s.image.dtype == np.uint8 and s.image.shape == (75, 100, 3)
    np.testing.assert_allclose(s.xy, full_xy * 0.25)
    exp_names, (exp,) = _expected_genes([counts.astype(float)], list(adata.var_names), 5)
    assert s.target_names == exp_names
    np.testing.assert_allclose(s.targets, exp, rtol=1e-6)
    (x,) = read_h5ad(tmp_path / "sc.h5ad", targets="X")  # as is
    np.testing.assert_array_equal(x.targets, counts)

    adata.obsm["proportions"] = pd.DataFrame(rng.dirichlet(np.ones(4), size=n), index=adata.obs_names,
                                             columns=list("wxyz"))
    adata.obs["slide"] = ["s1"] * 6 + ["s2"] * 4
    adata.uns["spatial"] = {k: {"images": {"lowres": _rgb(30, 40)},
                                "scalefactors": {"tissue_lowres_scalef": 0.1}} for k in ("s1", "s2")}
    adata.write_h5ad(tmp_path / "two.h5ad")
    a, b = read_h5ad(tmp_path / "two.h5ad")
    assert (a.slide_id, a.n_spots, b.slide_id, b.n_spots) == ("s1", 6, "s2", 4)
    assert a.target_names == list("wxyz")
    np.testing.assert_allclose(b.xy, full_xy[6:] * 0.1)

    del adata.obsm["spatial"]
    adata.write_h5ad(tmp_path / "nospatial.h5ad")
    with pytest.raises(HevisumError, match=r"nospatial\.h5ad: missing obsm\['spatial'\].*obsm keys found: "
                                           r"\['proportions'\]"):
        read_h5ad(tmp_path / "nospatial.h5ad")


def test_h5ad_missing_image_and_bad_image(tmp_path):
    import anndata as ad

    adata = ad.AnnData(X=np.ones((3, 2)), obs=pd.DataFrame(index=["a", "b", "c"]))
    adata.obsm["spatial"] = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    adata.write_h5ad(tmp_path / "noimg.h5ad")
    with pytest.raises(HevisumError, match=r"no image for slide 'noimg'.*uns\['spatial'\]"):
        read_h5ad(tmp_path / "noimg.h5ad")
    _save(_rgb(20, 20), tmp_path / "pic.png")
    adata.uns["image_path"] = "pic.png"  # relative to the .h5ad
    adata.write_h5ad(tmp_path / "withpath.h5ad")
    (s,) = read_h5ad(tmp_path / "withpath.h5ad")
    assert s.image.shape == (20, 20, 3) and s.xy[2].tolist() == [3.0, 3.0]
    adata.uns["spatial"] = {"lib": {"images": {"hires": np.zeros((20, 20, 5), np.uint8)},
                                    "scalefactors": {"tissue_hires_scalef": 1.0}}}
    adata.write_h5ad(tmp_path / "badimg.h5ad")
    with pytest.raises(HevisumError, match=r"images'\]\['hires'\]: image has shape \(20, 20, 5\); expected"):
        read_h5ad(tmp_path / "badimg.h5ad")


def test_write_h5ad_refuses_train_without_targets_and_leaves_nothing(tmp_path):
    slides = _slides_for_h5ad()
    slides[1].targets = None
    with pytest.raises(HevisumError, match="slide 'B': a Train slide needs targets"):
        write_h5ad(slides, tmp_path / "x.h5ad")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ dispatcher
def test_read_inputs_joint_genes_and_duplicates(tmp_path):
    make_mob(tmp_path / "a", secs=("M1", "M2"), seed0=0)
    make_mob(tmp_path / "b", secs=("M3",), seed0=7)
    both = read_inputs([tmp_path / "a", tmp_path / "b"], top_genes=7, progress=False)
    names = {tuple(s.target_names) for s in both}
    assert len(names) == 1  # one gene selection across the two inputs
    mats = [pd.read_csv(tmp_path / d / f"{s}.tsv", sep="\t", index_col=0) for d, s in
            (("a", "M1"), ("a", "M2"), ("b", "M3"))]
    mats = [m.loc[sl.spot_ids].to_numpy(float) for m, sl in zip(mats, both)]
    exp_names, _ = _expected_genes(mats, list(pd.read_csv(tmp_path / "a" / "M1.tsv", sep="\t", index_col=0).columns), 7)
    assert list(names.pop()) == exp_names

    make_mob(tmp_path / "c", secs=("M1",), seed0=3)
    with pytest.raises(HevisumError, match=r"duplicate slide id 'M1'"):
        read_inputs([tmp_path / "a", tmp_path / "c"], progress=False)
    make_mob(tmp_path / "d", secs=("X1",), genes=[f"SYM{i}" for i in range(40)])
    with pytest.raises(HevisumError, match="share none with slide 'M1'"):
        read_inputs([tmp_path / "a", tmp_path / "d"], progress=False)


def test_read_inputs_bad_paths(tmp_path):
    with pytest.raises(HevisumError, match=r"input '.*missing_dir' not found; supported inputs: a competition HDF5"):
        read_input(tmp_path / "missing_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HevisumError, match=r"empty: folder not recognised.*supported inputs"):
        read_input(tmp_path / "empty")
    _save(_rgb(10, 10), tmp_path / "lonely.png")
    with pytest.raises(HevisumError, match="an image alone has no spots"):
        read_input(tmp_path / "lonely.png")
    write_10x_h5(tmp_path / "m.h5", np.ones((2, 2), np.int64), ["a", "b"], ["g", "h"])
    with pytest.raises(HevisumError, match="a 10x feature matrix holds counts but no image"):
        read_input(tmp_path / "m.h5")
    with h5py.File(tmp_path / "half.h5", "w") as f:
        f.create_group("images/Train")
    with pytest.raises(HevisumError, match=r"half\.h5: missing group 'spots'"):
        read_input(tmp_path / "half.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f.create_group("foo")
    with pytest.raises(HevisumError, match=r"HDF5 file with groups \['foo'\] is not a supported layout"):
        read_input(tmp_path / "other.h5")


def test_competition_round_trip_via_read_input(tmp_path):
    root = tmp_path / "mob"
    make_mob(root)
    slides = read_input(root, test_slides=["M2"], top_genes=5, progress=False)
    write_competition_h5(slides, tmp_path / "c.h5")
    back = {s.slide_id: s for s in read_input(tmp_path / "c.h5")}
    assert {k: (s.split, s.n_spots) for k, s in back.items()} == {s.slide_id: (s.split, s.n_spots) for s in slides}
    for a in slides:
        b = back[a.slide_id]
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_allclose(a.xy, b.xy, atol=0.5)  # the competition layout stores integer pixels
        assert b.um_per_px == pytest.approx(a.um_per_px)
        if a.targets is not None:
            np.testing.assert_array_equal(a.targets, b.targets)
            assert b.target_names == a.target_names
    with pytest.raises(HevisumError, match="does not apply to a competition HDF5"):
        read_input(tmp_path / "c.h5", targets="counts")
    moved = read_input(tmp_path / "c.h5", test_slides=["M1"])
    assert moved[0].split == "test" and moved[0].meta["truth"].shape == (slides[0].n_spots, 5)


def test_max_side_scales_coordinates(tmp_path):
    root = tmp_path / "mob"
    make_mob(root)
    full = read_input(root, progress=False)
    small = read_input(root, max_side=95, progress=False)
    for a, b in zip(full, small):
        sx, sy = b.meta["downscale"]
        assert max(b.image.shape[:2]) == 95
        np.testing.assert_allclose(b.xy, a.xy * [sx, sy])
        assert b.um_per_px == pytest.approx(a.um_per_px / sx)


def test_normalize_counts_zero_total_row():
    m = normalize_counts(np.array([[0, 0], [1, 3]]))
    np.testing.assert_allclose(m.toarray(), [[0, 0], np.log1p(np.array([0.25, 0.75]) * 1e4)])
    with pytest.raises(HevisumError, match="top_genes must be at least 1"):
        resolve_gene_targets([], top_genes=0)
