"""AnnData ``.h5ad`` in the scanpy/squidpy spatial convention, read and written with ``anndata`` only.

Read:
- spot centres: ``obsm['spatial']`` (x, y) in full-resolution pixels;
- image: ``uns['spatial'][library]['images']['hires'|'lowres']`` with
  ``uns['spatial'][library]['scalefactors']['tissue_<res>_scalef']`` (coordinates are scaled to it), else an
  image file named by ``uns['image_path']`` (str, or dict slide -> path; relative to the .h5ad) or by ``image``;
- slides: one per value of ``obs['slide']`` (or ``obs['library_id']``), else one slide;
- targets: ``None`` = ``obsm['proportions']`` if present, else ``X`` (counts, i.e. non-negative integers,
  become the most variable genes of log1p(counts/total*1e4)); ``'X'`` = X as is; ``'counts'`` =
  ``layers['counts']`` (or X) as counts; any other name = that ``obsm`` key or layer;
- split: ``obs['split']`` ('train'/'test') when present; a Test slide's values go to ``meta['truth']``;
- kept for the outputs: ``obsm['spatial']`` as the spot columns ``pxl_col_in_fullres``/``pxl_row_in_fullres``,
  ``obs`` ``in_tissue``/``array_row``/``array_col`` when numeric, and the library's id, scale factors and images
  (``meta['library_id']``, ``meta['scalefactors']``, ``meta['library_images']``).

Written (:func:`write_h5ad`): X = targets (NaN rows for Test slides without truth), ``var_names`` = target
names, ``obs`` = slide, spot_id, split, ``obsm['spatial']`` in image pixels, and per slide
``uns['spatial'][slide]`` with ``images/hires`` (the slide image), ``scalefactors`` (tissue_hires_scalef 1.0,
spot_diameter_fullres) and ``metadata`` (um_per_px...), so scanpy's ``pl.spatial`` can draw it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hevisum.errors import HevisumError
from hevisum.io.atomic import atomic_path
from hevisum.io.images import to_rgb_uint8
from hevisum.io.wsi import read_slide_image
from hevisum.io.tables import (
    GeneCounts,
    LoadedSlide,
    apply_test_split,
    looks_like_counts,
    resolve_gene_targets,
    to_csr_counts,
)
from hevisum.slide import Slide, check_same_targets, check_unique_ids

SLIDE_KEYS = ("slide", "library_id")
SPLIT_KEY = "split"


def _read_anndata(p: Path):
    import anndata as ad
    import h5py

    if not p.is_file():
        raise HevisumError(f"input file {str(p)!r} not found")
    if not h5py.is_hdf5(p):
        raise HevisumError(f"{p}: not an HDF5/.h5ad file ({p.stat().st_size} bytes); it may be truncated or damaged, "
                           "or another format with this suffix")
    _check_declared_sizes(p)
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # noqa: BLE001 - anndata raises many types for malformed files
        raise HevisumError(f"{p}: cannot read as AnnData ({type(e).__name__}: {_one_line(e)})") from None


# Largest dataset an .h5ad may declare before anything is read (AnnData reads every array whole).
MAX_DATASET_BYTES = 16 * 2**30


def _check_declared_sizes(p: Path) -> None:
    """Refuse, before reading, a file declaring an image above the pixel limit or any array above
    :data:`MAX_DATASET_BYTES` (a damaged or hostile header would otherwise allocate it)."""
    import h5py

    from hevisum.io.competition import open_h5
    from hevisum.io.images import MAX_PIXELS

    def visit(name: str, obj) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.shape is None:
            return
        shape = obj.shape
        if len(shape) == 3 and shape[2] in (1, 3, 4) and shape[0] * shape[1] > MAX_PIXELS:
            raise HevisumError(f"{p}: {name} declares a {shape[1]}x{shape[0]} px image "
                               f"({shape[0] * shape[1] / 1e6:.0f} Mpx), above the {MAX_PIXELS / 1e6:.0f} Mpx limit; "
                               "store a downscaled copy (and scale the spot coordinates)")
        nbytes = int(np.prod(shape, dtype=np.float64) * max(obj.dtype.itemsize, 1))
        if nbytes > MAX_DATASET_BYTES:
            raise HevisumError(f"{p}: {name} declares {shape} ({nbytes / 2**30:.0f} GiB), above the "
                               f"{MAX_DATASET_BYTES / 2**30:.0f} GiB this reader holds in memory")

    with open_h5(p) as f:
        f.visititems(visit)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:200] if lines else type(e).__name__


def _slide_groups(adata, p: Path) -> tuple[str | None, list[str]]:
    for key in SLIDE_KEYS:
        if key in adata.obs.columns:
            vals = adata.obs[key].astype(str)
            order = list(dict.fromkeys(vals))  # first-appearance order
            return key, order
    libs = list((adata.uns.get("spatial") or {}).keys())
    return None, [libs[0] if len(libs) == 1 else p.stem]


def _file_image(f: Path, max_side: int | None) -> tuple[np.ndarray, float, float, dict]:
    """A full-resolution image file: (working image, sx, sy, meta), ``meta['level0']`` when read lazily."""
    arr, (sx, sy), level0 = read_slide_image(f, max_side)
    meta: dict = {"image": "full", "image_file": str(f)}
    if level0 is not None:
        meta["level0"] = level0
    return arr, sx, sy, meta


def _image_for(adata, sid: str, p: Path, image: str, max_side: int | None,
               n_slides: int) -> tuple[np.ndarray, float, float, dict]:
    """(image, sx, sy, meta) where full-res x * sx, y * sy are positions in the returned image."""
    spatial = adata.uns.get("spatial") or {}
    meta: dict = {}
    if image not in ("auto", "hires", "lowres", "full"):
        return _file_image(Path(image), max_side)
    lib = spatial.get(sid) if isinstance(spatial, dict) else None
    if lib is None and isinstance(spatial, dict) and len(spatial) == 1 and n_slides == 1:
        # One slide and one library: they belong together whatever the library is called.
        lib = next(iter(spatial.values()))
    if lib is not None and not isinstance(lib, dict):
        raise HevisumError(f"{p}: uns['spatial'][{sid!r}] is a {type(lib).__name__}; expected a mapping with "
                           "images and scalefactors")
    if lib is not None and image != "full":
        images = lib.get("images") or {}
        scal = lib.get("scalefactors") or {}
        if not isinstance(images, dict) or not isinstance(scal, dict):
            raise HevisumError(f"{p}: uns['spatial'][{sid!r}] images and scalefactors must be mappings")
        order = ["hires", "lowres"] if image == "auto" else [image]
        for res in order:
            if res in images:
                key = f"tissue_{res}_scalef"
                if key not in scal:
                    raise HevisumError(f"{p}: uns['spatial'][{sid!r}]['scalefactors'] lacks {key!r}; found "
                                       f"{sorted(scal)}")
                s = scal[key]
                s = float(np.asarray(s).ravel()[0]) if np.asarray(s).dtype.kind in "iuf" and np.size(s) == 1 else None
                if s is None or not 0 < s < 1e6:
                    raise HevisumError(f"{p}: uns['spatial'][{sid!r}]['scalefactors'][{key!r}] is {scal[key]!r}; "
                                       "expected a positive finite number")
                arr = to_rgb_uint8(np.asarray(images[res]), f"{p}: uns['spatial'][{sid!r}]['images'][{res!r}]")
                meta.update({"image": res})
                if "spot_diameter_fullres" in scal:
                    meta["spot_diameter_px"] = float(scal["spot_diameter_fullres"]) * s
                return arr, s, s, meta
        if image != "auto":
            raise HevisumError(f"{p}: uns['spatial'][{sid!r}]['images'] has no {image!r} image; found "
                               f"{sorted(images)}")
    ip = adata.uns.get("image_path")
    if isinstance(ip, dict):
        ip = ip.get(sid)
    if isinstance(ip, str) and ip:
        f = Path(ip) if Path(ip).is_absolute() else p.parent / ip
        return _file_image(f, max_side)
    raise HevisumError(
        f"{p}: no image for slide {sid!r}: expected uns['spatial'][{sid!r}]['images']['hires'|'lowres'] with "
        f"scalefactors, or uns['image_path'] (libraries found: {sorted(spatial) if isinstance(spatial, dict) else []})"
    )


def _targets_matrix(adata, targets: str | None, p: Path) -> tuple[np.ndarray | sp.spmatrix | None, list[str] | None,
                                                                   bool | None, str]:
    """(values, names, counts flag (None = detect), description)."""
    if targets is None:
        if "proportions" in adata.obsm:
            return (*_obsm_values(adata, "proportions", p), False, "obsm['proportions']")
        if adata.n_vars == 0 or adata.X is None:
            return None, None, False, "none"
        marks = adata.uns.get("hevisum")
        detect = None if not isinstance(marks, dict) or marks.get("targets_kind") != "values" else False
        return adata.X, list(map(str, adata.var_names)), detect, "X"
    if targets == "X":
        if adata.X is None:
            raise HevisumError(f"{p}: targets 'X' asked for but the file has no X matrix")
        return adata.X, list(map(str, adata.var_names)), False, "X"
    if targets == "counts":
        m = adata.layers["counts"] if "counts" in adata.layers else adata.X
        return m, list(map(str, adata.var_names)), True, "layers['counts']" if "counts" in adata.layers else "X"
    if targets in adata.obsm:
        return (*_obsm_values(adata, targets, p), None, f"obsm[{targets!r}]")
    if targets in adata.layers:
        return adata.layers[targets], list(map(str, adata.var_names)), None, f"layers[{targets!r}]"
    raise HevisumError(f"{p}: targets {targets!r} is neither 'X', 'counts', an obsm key {sorted(adata.obsm.keys())} "
                       f"nor a layer {sorted(adata.layers.keys())}")


def _obsm_values(adata, key: str, p: Path) -> tuple[np.ndarray, list[str]]:
    v = adata.obsm[key]
    if isinstance(v, pd.DataFrame):
        return v.to_numpy(dtype=np.float64), [str(c) for c in v.columns]
    arr = v.toarray() if sp.issparse(v) else np.asarray(v, dtype=np.float64)
    names = adata.uns.get(f"{key}_names")
    names = [str(n) for n in names] if names is not None else [f"C{i + 1}" for i in range(arr.shape[1])]
    if len(names) != arr.shape[1]:
        raise HevisumError(f"{p}: uns['{key}_names'] has {len(names)} names for {arr.shape[1]} columns of "
                           f"obsm[{key!r}]")
    return arr, names


def _library_meta(spatial, sid: str, n_slides: int) -> dict:
    """``library_id``, the original ``scalefactors`` and ``library_images`` of the slide's ``uns['spatial']``
    library, as given (for the outputs); empty when there is none."""
    if not isinstance(spatial, dict) or not spatial:
        return {}
    lib_id = sid if sid in spatial else (next(iter(spatial)) if len(spatial) == 1 and n_slides == 1 else None)
    lib = spatial.get(lib_id) if lib_id is not None else None
    if not isinstance(lib, dict):
        return {}
    out: dict = {"library_id": str(lib_id)}
    sf = lib.get("scalefactors")
    if isinstance(sf, dict):
        out["scalefactors"] = {str(k): float(np.asarray(v).ravel()[0]) for k, v in sf.items()
                               if np.asarray(v).dtype.kind in "iuf" and np.size(v) == 1}
    images = lib.get("images")
    if isinstance(images, dict):
        out["library_images"] = {k: np.asarray(v) for k, v in images.items() if k in ("hires", "lowres")}
    return out


def load_h5ad(path: str | Path, *, targets: str | None = None, image: str = "auto",
              max_side: int | None = None) -> list[LoadedSlide]:
    """Read an .h5ad into slides; counts are left pending for joint gene selection (see :func:`read_h5ad`)."""
    p = Path(path)
    adata = _read_anndata(p)
    try:
        return _load(adata, p, targets, image, max_side)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        # content of an unexpected type somewhere in obs/obsm/uns (a string where numbers belong, a list where a
        # mapping belongs): one line naming the file and the problem
        raise HevisumError(f"{p}: unexpected AnnData content ({type(e).__name__}: {_one_line(e)}); expected the "
                           "scanpy/squidpy spatial layout: obsm['spatial'] numbers, uns['spatial'][library] with "
                           "images and scalefactors, numeric targets") from None


def _load(adata, p: Path, targets: str | None, image: str, max_side: int | None) -> list[LoadedSlide]:
    if "spatial" not in adata.obsm:
        raise HevisumError(f"{p}: missing obsm['spatial'] (spot x, y in full-resolution pixels); obsm keys found: "
                           f"{sorted(adata.obsm.keys())}")
    raw_xy = adata.obsm["spatial"]
    raw_xy = raw_xy.to_numpy() if isinstance(raw_xy, pd.DataFrame) else np.asarray(raw_xy)
    if raw_xy.dtype.kind not in "iuf":
        raise HevisumError(f"{p}: obsm['spatial'] has type {raw_xy.dtype}; expected numbers (x, y in pixels)")
    xy_all = np.asarray(raw_xy, dtype=np.float64)
    if xy_all.ndim != 2 or xy_all.shape[1] < 2:
        raise HevisumError(f"{p}: obsm['spatial'] has shape {xy_all.shape}; expected (n_spots, 2) x, y")
    if adata.n_obs == 0:
        raise HevisumError(f"{p}: no spots (obs is empty)")
    values, names, counts_flag, described = _targets_matrix(adata, targets, p)
    key, sids = _slide_groups(adata, p)
    spot_ids = (adata.obs["spot_id"].astype(str).to_numpy() if "spot_id" in adata.obs.columns
                else np.asarray(adata.obs_names, dtype=str))
    splits = adata.obs[SPLIT_KEY].astype(str).to_numpy() if SPLIT_KEY in adata.obs.columns else None
    loaded: list[LoadedSlide] = []
    for sid in sids:
        rows = (np.flatnonzero(adata.obs[key].astype(str).to_numpy() == sid) if key is not None
                else np.arange(adata.n_obs))
        img, sx, sy, meta = _image_for(adata, sid, p, image, max_side, len(sids))
        xy = xy_all[rows, :2]
        spots = pd.DataFrame({"spot_id": spot_ids[rows], "x": xy[:, 0] * sx, "y": xy[:, 1] * sy})
        # the input's own frame and spot columns, kept for the outputs (predictions.h5ad joins the user's data)
        spots["pxl_col_in_fullres"], spots["pxl_row_in_fullres"] = xy[:, 0], xy[:, 1]
        for col in ("in_tissue", "array_row", "array_col"):
            if col in adata.obs.columns and pd.api.types.is_numeric_dtype(adata.obs[col]):
                spots[col] = adata.obs[col].to_numpy()[rows]
        meta.update(_library_meta(adata.uns.get("spatial"), sid, len(sids)))
        um = None
        lib_md = ((adata.uns.get("spatial") or {}).get(sid) or {}).get("metadata") or {}
        if "um_per_px" in lib_md:
            # metadata['um_per_px'] is per full-resolution pixel (our writer: the stored image, scalef 1.0).
            um = float(lib_md["um_per_px"]) / sx
        meta.update({"format": "h5ad", "targets_source": described, "scale": sx})
        for k in ("applied_shift",):
            if k in lib_md:
                meta[k] = tuple(float(v) for v in np.asarray(lib_md[k]).ravel())
        split = "train"
        if splits is not None:
            sv = set(splits[rows])
            if len(sv) != 1 or not sv <= {"train", "test"}:
                raise HevisumError(f"{p}: obs['split'] of slide {sid!r} is {sorted(sv)}; expected one of "
                                   "'train'/'test' per slide")
            split = sv.pop()
        slide = Slide(slide_id=sid, image=img, spots=spots, um_per_px=um, split=split, source=str(p), meta=meta)
        if values is None:
            slide.meta["targets_kind"] = "none"
            loaded.append(LoadedSlide(slide))
            continue
        v = values[rows]
        kind = v.dtype.kind if hasattr(v, "dtype") else np.asarray(v).dtype.kind
        if kind not in "iufb":
            raise HevisumError(f"{p}: targets ({described}) have type {v.dtype if hasattr(v, 'dtype') else '?'}; "
                               "expected numbers")
        v = sp.csr_matrix(v, dtype=np.float64) if sp.issparse(v) else np.asarray(v, dtype=np.float64)
        if split == "test" and not sp.issparse(v) and not np.isfinite(v).any():
            slide.meta["targets_kind"] = "none"  # a Test slide written without truth
            loaded.append(LoadedSlide(slide))
            continue
        is_counts = looks_like_counts(v) if counts_flag is None else counts_flag
        if is_counts:
            hv = None
            if "highly_variable" in adata.var and len(adata.var) == len(names):
                flags = np.asarray(adata.var["highly_variable"]).astype(bool)
                hv = [n for n, f in zip(names, flags) if f] or None
            loaded.append(LoadedSlide(slide, GeneCounts(to_csr_counts(v), list(names), f"{p} {described}", hv)))
            continue
        slide.targets = v.toarray() if sp.issparse(v) else v
        slide.target_names = list(names)
        slide.meta["targets_kind"] = "table"
        loaded.append(LoadedSlide(slide))
    return loaded


def read_h5ad(path: str | Path, *, targets: str | None = None, image: str = "auto", top_genes: int = 50,
              genes: Sequence[str] | None = None, test_slides: Sequence[str] | None = None,
              max_side: int | None = None) -> list[Slide]:
    """Read an AnnData file (scanpy/squidpy spatial layout, or one written by :func:`write_h5ad`) as slides.

    See the module notes for where the coordinates, images, slides, targets and split come from.
    Slides marked Test in ``obs['split']`` or named in ``test_slides`` keep their values in ``meta['truth']``.
    """
    loaded = load_h5ad(path, targets=targets, image=image, max_side=max_side)
    slides = resolve_gene_targets(loaded, top_genes, genes)
    marked = [s.slide_id for s in slides if s.split == "test"]
    slides = apply_test_split(slides, list(dict.fromkeys(marked + list(test_slides or []))), str(path))
    return [s.validate() for s in slides]


def _spot_diameter_px(s: Slide) -> float:
    """For plotting: the reader's spot diameter, else half the median nearest-neighbour distance."""
    if s.meta.get("spot_diameter_px"):
        return float(s.meta["spot_diameter_px"])
    xy = s.xy
    if len(xy) < 2:
        return 10.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]) / 2)


def write_h5ad(slides: Sequence[Slide], path: str | Path) -> None:
    """Write slides to one ``.h5ad`` (see the module notes), atomically; :func:`read_h5ad` reads it back.

    Train slides need targets with the same names; a Test slide's ``meta['truth']`` (same names) is stored in
    its X rows, otherwise those rows are NaN.
    """
    import anndata as ad

    slides = list(slides)
    if not slides:
        raise HevisumError("no slides to write")
    check_unique_ids(slides)
    for s in slides:
        s.validate()
    names = check_same_targets([s for s in slides if s.split == "train"])
    for s in slides:
        if s.split == "train" and s.targets is None:
            raise HevisumError(f"{s.where()}: a Train slide needs targets; mark it as Test instead "
                               f"(--test {s.slide_id!r})")
    n_t = len(names) if names else 0
    if names is not None and len(set(names)) != len(names):
        dup = pd.Index(names)[pd.Index(names).duplicated()][0]
        raise HevisumError(f"target name {dup!r} appears twice; .h5ad var names must be unique")
    blocks, obs_parts, xy_parts = [], [], []
    uns_spatial: dict = {}
    for s in slides:
        block = np.full((s.n_spots, n_t), np.nan)
        if s.targets is not None:
            block = np.asarray(s.targets, dtype=np.float64)
        elif n_t and s.meta.get("truth") is not None and list(s.meta.get("truth_names") or []) == list(names):
            block = np.asarray(s.meta["truth"], dtype=np.float64)
        blocks.append(block)
        obs_parts.append(pd.DataFrame({
            "slide": s.slide_id, "spot_id": s.spot_ids, "split": s.split,
        }, index=[f"{s.slide_id}:{i}" for i in s.spot_ids]))
        xy_parts.append(s.xy)
        md: dict = {"source": s.source or ""}
        if s.um_per_px:
            md["um_per_px"] = float(s.um_per_px)
        if "applied_shift" in s.meta:
            md["applied_shift"] = np.asarray(s.meta["applied_shift"], dtype=np.float64)
        uns_spatial[s.slide_id] = {
            "images": {"hires": s.image},
            "scalefactors": {"tissue_hires_scalef": 1.0, "spot_diameter_fullres": _spot_diameter_px(s)},
            "metadata": md,
        }
    obs = pd.concat(obs_parts)
    obs["slide"] = pd.Categorical(obs["slide"], categories=[s.slide_id for s in slides])
    obs["split"] = pd.Categorical(obs["split"], categories=["train", "test"])
    # float64 so targets read back bit-identical.
    X = np.concatenate(blocks, axis=0) if n_t else np.zeros((len(obs), 0), np.float64)
    var = pd.DataFrame(index=pd.Index(names or [], dtype=str))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm["spatial"] = np.concatenate(xy_parts, axis=0)
    adata.uns["spatial"] = uns_spatial
    adata.uns["hevisum"] = {"targets_kind": "values"}  # X holds targets as is: never re-normalise as counts
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression="gzip", compression_opts=1)
