"""10x Visium Space Ranger output: ``spatial/`` (positions, scale factors, images) and optional targets.

Layout read (the folder given is the one holding ``spatial/``, or ``spatial/`` itself)::

    <sample>/spatial/tissue_positions.csv        v2: header barcode,in_tissue,array_row,array_col,
                                                 pxl_row_in_fullres,pxl_col_in_fullres
    <sample>/spatial/tissue_positions_list.csv   v1: same columns, no header
    <sample>/spatial/tissue_positions.parquet    v2 as parquet (needs pyarrow or fastparquet)
    <sample>/spatial/scalefactors_json.json      tissue_hires_scalef, tissue_lowres_scalef, spot_diameter_fullres
    <sample>/spatial/tissue_hires_image.png, tissue_lowres_image.png
    <sample>/filtered_feature_bc_matrix.h5       10x HDF5 counts (targets='h5')
    <sample>/<one table named *proportion* or *celltype*>   barcode-keyed targets (used when targets=None)

Coordinates: ``x = pxl_col_in_fullres * scalef``, ``y = pxl_row_in_fullres * scalef`` for the image used.
The spot table also keeps ``in_tissue``, ``array_row``, ``array_col``, ``pxl_row_in_fullres`` and
``pxl_col_in_fullres`` as read, and ``meta['scalefactors']`` / ``meta['spatial_dir']`` the original scale factors
and folder, so ``predictions.h5ad`` is written in the input's full-resolution frame.
Only in-tissue spots are kept, then only those with a targets row (``meta['n_dropped_no_target']``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hevisum.errors import HevisumError
from hevisum.io.images import IMAGE_SUFFIXES
from hevisum.io.wsi import read_slide_image
from hevisum.io.tables import (
    GeneCounts,
    LoadedSlide,
    apply_test_split,
    is_table_file,
    looks_like_counts,
    match_keys,
    numeric_matrix,
    read_table,
    require_columns,
    resolve_gene_targets,
    show_value,
    to_csr_counts,
)
from hevisum.slide import Slide

VISIUM_SPOT_UM = 55.0  # a Visium spot is 55 µm across; Space Ranger gives its diameter in full-res pixels
POSITION_COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
POSITION_FILES = ("tissue_positions.csv", "tissue_positions.parquet", "tissue_positions_list.csv")
H5_NAME = "filtered_feature_bc_matrix.h5"
_MAX_H5_ENTRIES = 2_000_000_000  # non-zero counts in a 10x matrix: far above any Visium sample
IMAGE_CHOICES = ("auto", "hires", "lowres", "full")


def find_visium_folders(path: str | Path) -> tuple[Path, Path] | None:
    """``(sample folder, spatial folder)`` when ``path`` is a Space Ranger sample folder or its ``spatial/``."""
    p = Path(path)
    if not p.is_dir():
        return None
    if (p / "spatial").is_dir():
        return p, p / "spatial"
    if (p / "scalefactors_json.json").is_file() or any((p / n).is_file() for n in POSITION_FILES):
        return p.parent, p
    return None


def is_visium_folder(path: str | Path) -> bool:
    """True for a Space Ranger sample folder (with ``spatial/``) or a ``spatial/`` folder."""
    return find_visium_folders(path) is not None


def read_positions(spatial: Path) -> pd.DataFrame:
    """The spot positions table (v2 CSV, parquet or v1 CSV) with the six standard columns."""
    for name in POSITION_FILES:
        p = spatial / name
        if not p.is_file():
            continue
        if p.suffix == ".parquet":
            try:
                df = pd.read_parquet(p)
            except ImportError:
                raise HevisumError(
                    f"{p}: reading parquet needs the pyarrow package (not installed); install it, or convert the "
                    "file to tissue_positions.csv"
                ) from None
            except Exception as e:  # noqa: BLE001 - parquet engines raise their own types for damaged files
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise HevisumError(f"{p}: cannot read as parquet ({first}); expected Space Ranger's "
                                   "tissue_positions.parquet") from None
        else:
            first = p.read_text(errors="replace").split("\n", 1)[0]
            has_header = first.split(",")[0].strip().lower() == "barcode"
            df = read_table(p, "spot positions", index_col=None, header=0 if has_header else None)
            if not has_header:
                if df.shape[1] != len(POSITION_COLUMNS):
                    raise HevisumError(
                        f"{p}: {df.shape[1]} columns without a header; expected the 6 Space Ranger v1 columns "
                        f"{POSITION_COLUMNS}"
                    )
                df.columns = POSITION_COLUMNS
        require_columns(df, POSITION_COLUMNS, p, "the Space Ranger columns " + ", ".join(POSITION_COLUMNS))
        df = df[POSITION_COLUMNS].copy()
        df["barcode"] = df["barcode"].astype(str)
        dup = df["barcode"].duplicated()
        if dup.any():
            b = df["barcode"][dup].iloc[0]
            rows = [int(i) + 1 for i in np.flatnonzero((df["barcode"] == b).to_numpy())[:2]]
            raise HevisumError(f"{p}: barcode {b!r} appears {int((df['barcode'] == b).sum())} times (rows {rows[0]} "
                               f"and {rows[1]}); each barcode needs exactly one row")
        for col in POSITION_COLUMNS[1:]:
            df[col] = pd.to_numeric(df[col], errors="coerce")
            bad = ~np.isfinite(df[col].to_numpy(dtype=np.float64, na_value=np.nan))
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise HevisumError(f"{p}: column {col!r} has a non-numeric, missing or infinite value at barcode "
                                   f"{df['barcode'].iloc[i]!r}")
        df.attrs["source"] = str(p)
        return df
    found = sorted(x.name for x in spatial.iterdir()) if spatial.is_dir() else []
    raise HevisumError(f"{spatial}: no spot positions file; expected one of {list(POSITION_FILES)} (found {found})")


def read_scalefactors(spatial: Path) -> dict:
    """``scalefactors_json.json`` as a dict."""
    p = spatial / "scalefactors_json.json"
    if not p.is_file():
        found = sorted(x.name for x in spatial.iterdir())
        raise HevisumError(f"{spatial}: scalefactors_json.json not found (found {found}); it gives "
                           "tissue_hires_scalef / tissue_lowres_scalef to place spots on the images")
    try:
        sf = json.loads(p.read_text())
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HevisumError(f"{p}: not valid JSON ({str(e)[:200]})") from None
    if not isinstance(sf, dict):
        raise HevisumError(f"{p}: expected a JSON object with tissue_hires_scalef, tissue_lowres_scalef")
    return sf


def _scalef(sf: dict, key: str, p: Path) -> float:
    if key not in sf:
        raise HevisumError(f"{p}: missing field {key!r}; fields found: {sorted(sf)}")
    v = sf[key]
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v < 1e6:
        raise HevisumError(f"{p}: field {key!r} is {v!r}; expected a positive finite number")
    return float(v)


def _choose_image(root: Path, spatial: Path, image: str, sf: dict) -> tuple[Path, float, str]:
    """(image file, scale from full-res px to it, label) for the ``image`` option."""
    sfp = spatial / "scalefactors_json.json"

    def res_file(res: str) -> Path | None:
        cands = [p for p in sorted(spatial.glob(f"tissue_{res}_image.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        return cands[0] if cands else None

    if image not in IMAGE_CHOICES:
        p = Path(image)
        if p.suffix.lower() in IMAGE_SUFFIXES:
            if not p.is_file():
                raise HevisumError(f"full-resolution image {str(p)!r} not found")
            return p, 1.0, "full"
        raise HevisumError(f"image option {image!r} is not one of {list(IMAGE_CHOICES)} or an image file path")
    if image == "full":
        cands = [p for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if len(cands) != 1:
            raise HevisumError(
                f"{root}: --image full needs exactly one full-resolution image ({', '.join(IMAGE_SUFFIXES)}) beside "
                f"spatial/, found {[p.name for p in cands]}; Space Ranger's spatial/ only holds hires/lowres copies "
                "(use --image hires or lowres, or place the original image there)"
            )
        return cands[0], 1.0, "full"
    order = ["hires", "lowres"] if image == "auto" else [image]
    for res in order:
        f = res_file(res)
        if f is not None:
            return f, _scalef(sf, f"tissue_{res}_scalef", sfp), res
    found = sorted(p.name for p in spatial.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    raise HevisumError(
        f"{spatial}: no tissue_{order[0]}_image.png{' or tissue_lowres_image.png' if image == 'auto' else ''} "
        f"(images found: {found}); valid --image choices here: "
        f"{[r for r in ('hires', 'lowres') if res_file(r)] or 'none'}"
    )


def _find_default_table(root: Path) -> Path | None:
    """The single ``*proportion*``/``*celltype*`` table beside ``spatial/``; None if there is none."""
    cands = [p for p in sorted(root.iterdir()) if p.is_file() and is_table_file(p)
             and any(w in p.name.lower() for w in ("proportion", "celltype"))]
    if len(cands) > 1:
        raise HevisumError(
            f"{root}: several target tables {[p.name for p in cands]}; choose one with --targets <path> "
            "(or --targets h5 for gene counts)"
        )
    return cands[0] if cands else None


def read_10x_h5(path: str | Path) -> tuple[sp.csr_matrix, list[str], list[str]]:
    """A 10x feature-barcode HDF5 matrix as ``(counts spots x genes CSR, barcodes, gene names)``.

    Reads ``matrix/{data,indices,indptr,shape,barcodes,features/{name,id,feature_type}}`` (Space Ranger >= 1
    / Cell Ranger >= 3; the older per-genome layout with ``genes``/``gene_names`` too). Only
    ``Gene Expression`` features are kept; duplicated gene names get their id appended (``NAME_ID``).
    """
    import h5py

    p = Path(path)
    if not p.is_file():
        raise HevisumError(f"10x matrix file {str(p)!r} not found")
    if not h5py.is_hdf5(p):
        raise HevisumError(f"{p}: not an HDF5 file; expected a 10x filtered_feature_bc_matrix.h5")
    from hevisum.io.competition import open_h5

    try:
        return _read_10x_h5(p, open_h5)
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise HevisumError(f"{p}: not a valid 10x feature-barcode matrix ({type(e).__name__}: {first}); expected "
                           "matrix/data, indices, indptr, shape, barcodes and features/name as Space Ranger writes "
                           "them") from None


def _read_10x_h5(p: Path, open_h5) -> tuple[sp.csr_matrix, list[str], list[str]]:
    import h5py

    with open_h5(p) as f:
        if "matrix" in f:
            g = f["matrix"]
            need = ["data", "indices", "indptr", "shape", "barcodes", "features"]
            missing = [k for k in need if k not in g]
            if missing:
                raise HevisumError(f"{p}: group 'matrix' lacks {missing}; found {sorted(g.keys())}")
            feat = g["features"]
            if "name" not in feat and "id" not in feat:
                raise HevisumError(f"{p}: matrix/features has neither 'name' nor 'id'; found {sorted(feat.keys())}")
            ids = _strs(feat["id"][()]) if "id" in feat else None
            names = _strs(feat["name"][()]) if "name" in feat else list(ids)
            if ids is None:
                ids = list(names)
            ftype = _strs(feat["feature_type"][()]) if "feature_type" in feat else ["Gene Expression"] * len(names)
        else:
            groups = [k for k in f.keys() if isinstance(f[k], h5py.Group)]
            if len(groups) != 1 or not {"data", "indices", "indptr", "shape", "barcodes"} <= set(f[groups[0]].keys()):
                raise HevisumError(f"{p}: no group 'matrix'; found {sorted(f.keys())}; expected a 10x feature-barcode "
                                   "matrix (matrix/data, indices, indptr, shape, barcodes, features)")
            g = f[groups[0]]
            ids = _strs(g["genes"][()]) if "genes" in g else None
            names = _strs(g["gene_names"][()]) if "gene_names" in g else list(ids or [])
            if ids is None:
                ids = list(names)
            ftype = ["Gene Expression"] * len(names)
        for key in ("data", "indices", "indptr", "barcodes"):
            if not isinstance(g[key], h5py.Dataset) or g[key].size > _MAX_H5_ENTRIES:
                raise HevisumError(f"{p}: {g.name}/{key} is not a dataset of at most {_MAX_H5_ENTRIES} entries")
        shape = tuple(int(v) for v in g["shape"][()])
        data, indices, indptr = g["data"][()], g["indices"][()], g["indptr"][()]
        barcodes = _strs(g["barcodes"][()])
    n_genes, n_bc = shape
    if len(names) != n_genes or len(barcodes) != n_bc or len(indptr) != n_bc + 1:
        raise HevisumError(f"{p}: matrix shape {shape} does not match {len(names)} features, {len(barcodes)} barcodes "
                           f"and {len(indptr)} indptr entries")
    # Stored column-compressed with genes as rows and barcodes as columns: the transpose is spots x genes CSR.
    m = sp.csc_matrix((data, indices, indptr), shape=(n_genes, n_bc)).T.tocsr()
    keep = np.asarray([t == "Gene Expression" for t in ftype])
    if not keep.any():
        raise HevisumError(f"{p}: no 'Gene Expression' features (feature types: {sorted(set(ftype))})")
    m = m[:, np.flatnonzero(keep)]
    names = [n for n, k in zip(names, keep) if k]
    ids = [i for i, k in zip(ids, keep) if k]
    counts = pd.Series(names).value_counts()
    dups = set(counts[counts > 1].index)
    names = [f"{n}_{i}" if n in dups else n for n, i in zip(names, ids)]
    return m, barcodes, names


def _strs(a) -> list[str]:
    return [x.decode("utf-8", errors="replace") if isinstance(x, bytes) else str(x) for x in np.asarray(a).ravel()]


def load_visium(path: str | Path, *, targets: str | None = None, image: str = "auto",
                slide_id: str | None = None, max_side: int | None = None) -> list[LoadedSlide]:
    """Read one Space Ranger sample; gene-count targets are left pending (see :func:`read_visium`)."""
    found = find_visium_folders(path)
    if found is None:
        raise HevisumError(f"{path}: not a Space Ranger folder (no spatial/ with tissue_positions*.csv and "
                           "scalefactors_json.json)")
    root, spatial = found
    sid = slide_id or root.resolve().name or "visium"
    pos = read_positions(spatial)
    pos_src = pos.attrs["source"]
    sf = read_scalefactors(spatial)
    img_path, scale, label = _choose_image(root, spatial, image, sf)

    bad = ~pos["in_tissue"].isin([0, 1])
    if bad.any():
        raise HevisumError(f"{pos_src}: column 'in_tissue' has value {show_value(pos['in_tissue'][bad].iloc[0])} at "
                           f"barcode {pos['barcode'][bad].iloc[0]!r}; expected 0 or 1")
    n_all = len(pos)
    pos = pos[pos["in_tissue"] == 1].reset_index(drop=True)
    if len(pos) == 0:
        raise HevisumError(f"{pos_src}: no spot has in_tissue == 1 (of {n_all}); the slide would be empty")

    img, (sx, sy), level0 = read_slide_image(
        img_path, max_side, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(np.float64) * scale)
    x = pos["pxl_col_in_fullres"].to_numpy(np.float64) * scale * sx
    y = pos["pxl_row_in_fullres"].to_numpy(np.float64) * scale * sy
    spots = pd.DataFrame({"spot_id": pos["barcode"].to_numpy(), "x": x, "y": y,
                          "array_row": pos["array_row"].to_numpy(np.int64),
                          "array_col": pos["array_col"].to_numpy(np.int64),
                          # the input's own frame, kept for the outputs (predictions.h5ad joins the user's data)
                          "in_tissue": pos["in_tissue"].to_numpy(np.int64),
                          "pxl_row_in_fullres": pos["pxl_row_in_fullres"].to_numpy(np.float64),
                          "pxl_col_in_fullres": pos["pxl_col_in_fullres"].to_numpy(np.float64)})
    meta: dict = {"format": "visium", "image": label, "image_file": str(img_path), "scale": scale * sx,
                  "n_in_tissue": len(pos), "n_positions": n_all, "positions_file": pos_src,
                  "spatial_dir": str(spatial),
                  "scalefactors": {k: float(v) for k, v in sf.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}}
    um_per_px = None
    diam = sf.get("spot_diameter_fullres")
    if isinstance(diam, (int, float)) and not isinstance(diam, bool) and 0 < diam < 1e7:
        um_per_px = VISIUM_SPOT_UM / (float(diam) * scale * sx)
        meta["spot_diameter_px"] = float(diam) * scale * sx
    else:
        meta["um_per_px_note"] = "scalefactors_json.json has no spot_diameter_fullres; um_per_px unknown"
    if level0 is not None:
        meta["level0"] = level0  # tiles are read from the full-resolution file, not from the working image
    elif max_side is not None and (sx, sy) != (1.0, 1.0):
        meta["downscale"] = (sx, sy)

    base = Slide(slide_id=sid, image=img, spots=spots, um_per_px=um_per_px, source=str(root), meta=meta)
    where = f"{root}: slide {sid!r}"

    if targets is None:
        table = _find_default_table(root)
        if table is None:
            meta["targets_kind"] = "none"
            return [LoadedSlide(base)]
        return [_with_table(base, table, where)]
    if targets == "h5" or (targets.lower().endswith(".h5") and Path(targets).is_file()):
        h5 = root / H5_NAME if targets == "h5" else Path(targets)
        if not h5.is_file():
            found = sorted(p.name for p in root.glob("*.h5"))
            raise HevisumError(f"{root}: --targets h5 needs {H5_NAME} beside spatial/ (found .h5 files: {found})")
        counts, barcodes, genes = read_10x_h5(h5)
        km = match_keys(spots["spot_id"].tolist(), barcodes, str(h5), where, "barcode")
        slide = base.with_spots(spots.iloc[km.order].reset_index(drop=True))
        slide.meta = dict(meta, n_dropped_no_target=km.n_spots_dropped, targets_source=str(h5))
        return [LoadedSlide(slide, GeneCounts(counts[km.rows], genes, str(h5)))]
    p = Path(targets)
    if not p.is_file() and (root / targets).is_file():
        p = root / targets  # a name relative to the sample folder
    if not p.is_file():
        raise HevisumError(f"targets {targets!r} not found (also looked in {root}); for Visium use a TSV/CSV path "
                           "keyed by barcode, or 'h5' for filtered_feature_bc_matrix.h5")
    return [_with_table(base, p, where)]


def _with_table(base: Slide, table: Path, where: str) -> LoadedSlide:
    """Join a barcode-keyed table: values as targets, or counts (integers) left pending for gene selection."""
    df = read_table(table, "targets table")
    for name in ("barcode", "Barcode", "barcodes", "spot_id"):
        if name in df.columns:
            df = df.set_index(name)
            break
    values = numeric_matrix(df, table)
    km = match_keys(base.spots["spot_id"].tolist(), df.index.astype(str).tolist(), str(table), where, "barcode")
    slide = base.with_spots(base.spots.iloc[km.order].reset_index(drop=True))
    slide.meta = dict(base.meta, n_dropped_no_target=km.n_spots_dropped, n_target_rows_unmatched=km.n_rows_unmatched,
                      targets_source=str(table))
    vals = values[km.rows]
    names = [str(c) for c in df.columns]
    if looks_like_counts(vals):
        return LoadedSlide(slide, GeneCounts(to_csr_counts(vals), names, str(table)))
    slide.targets, slide.target_names = vals, names
    slide.meta["targets_kind"] = "table"
    return LoadedSlide(slide)


def read_visium(path: str | Path, *, targets: str | None = None, image: str = "auto", top_genes: int = 50,
                genes: Sequence[str] | None = None, slide_id: str | None = None,
                test_slides: Sequence[str] | None = None, max_side: int | None = None) -> list[Slide]:
    """Read a Space Ranger sample folder as one :class:`Slide` (spot ids = barcodes).

    ``targets``: None = the single ``*proportion*``/``*celltype*`` table beside ``spatial/`` if there is one,
    else no targets (the slide is then Test); ``'h5'`` = ``filtered_feature_bc_matrix.h5`` (or a path to another
    10x ``.h5``) turned into the
    ``top_genes`` most variable genes of ``log1p(counts/total*1e4)`` (or the named ``genes``); a path = a
    TSV/CSV keyed by barcode (integer tables are treated as counts). ``image``: ``auto`` (hires, else lowres),
    ``hires``, ``lowres``, ``full`` (the one image file beside spatial/) or an image path (full resolution).
    """
    loaded = load_visium(path, targets=targets, image=image, slide_id=slide_id, max_side=max_side)
    slides = apply_test_split(resolve_gene_targets(loaded, top_genes, genes), test_slides, str(path))
    return [s.validate() for s in slides]
