"""Legacy Spatial Transcriptomics (Ståhl et al. 2016 arrays): an image, a spot table, a targets table.

One section = three files:

- an H&E image (JPG/PNG/TIFF, usually full resolution);
- a spot table (TSV, header) with array ``x``, ``y``, image ``pixel_x``, ``pixel_y`` and optional ``selected``
  (1 = under tissue, kept);
- a targets table whose rows are keyed ``"{x}x{y}"`` (array coordinates) and whose columns are targets:
  proportions (used as is) or raw counts (integers: normalised and reduced to the most variable genes).

Two folder layouts are recognised:

- her2st-like: ``images/<sec>.jpg``, ``spots/<sec>_selection.tsv`` and one folder per kind of targets
  (``celltypes_subset/<sec>.tsv``, ``celltypes_major/<sec>.tsv``, ``counts/<sec>.tsv.gz``);
- MOB-like: ``<sec>.jpg``, ``alignment_table_<sec>.tsv``, ``<sec>.tsv`` (counts) side by side.

Spots are kept in the targets table's row order (as the organisers' competition files do) and only when
they are selected and have a targets row; ``meta['n_dropped_no_target']`` counts the others.
Microns per pixel are not stored in these files: they are estimated from the spot grid (see
:func:`estimate_um_per_px`) and flagged ``meta['um_per_px_estimated'] = True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hevisum.errors import HevisumError
from hevisum.io.images import IMAGE_SUFFIXES, find_image
from hevisum.io.wsi import read_slide_image
from hevisum.io.tables import (
    GeneCounts,
    LoadedSlide,
    apply_test_split,
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

SPOT_COLUMNS = ["x", "y", "pixel_x", "pixel_y"]
# Array step between neighbouring spot positions. The 1k array (1007 spots, 33 x 35 square grid) has 200 µm
# centre-to-centre. The "2k" array fills the same capture area with about twice the spots on a checkerboard
# (x + y always even), so one step of array x is half that: 100 µm. These are the physical layouts; the image
# scale is derived from how many pixels one step spans.
ST_1K_STEP_UM = 200.0
ST_2K_X_STEP_UM = 100.0
_SLIDE_PLACEHOLDER = "{slide}"


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def spot_key(x, y) -> str:
    """The ``"{x}x{y}"`` key of an array position (integers printed without decimals)."""
    return f"{_int_str(x)}x{_int_str(y)}"


def _int_str(v) -> str:
    f = float(v)
    return str(int(f)) if f.is_integer() else str(v)


def estimate_um_per_px(array_xy: np.ndarray, pixel_xy: np.ndarray) -> dict | None:
    """Estimate microns per pixel from the spot grid: fit pixel = A @ array + b, then use the array's step.

    Returns ``{'um_per_px', 'spot_pitch_px', 'array'}`` or None when the spots do not span a 2-D grid.
    Square grid (1k array): one step in x or y = 200 µm; checkerboard (2k array): one step in x = 100 µm.
    ``spot_pitch_px`` is the nearest-neighbour distance (one step on the 1k grid, one diagonal step on the 2k).
    """
    a = np.asarray(array_xy, dtype=np.float64)
    p = np.asarray(pixel_xy, dtype=np.float64)
    if len(a) < 3 or not (np.isfinite(a).all() and np.isfinite(p).all()):
        return None
    design = np.column_stack([a, np.ones(len(a))])
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, p, rcond=None)
    step_x = float(np.linalg.norm(coef[0]))  # pixels per +1 of array x
    step_y = float(np.linalg.norm(coef[1]))
    if not (step_x > 1e-6 and step_y > 1e-6 and np.isfinite(step_x) and np.isfinite(step_y)):
        return None  # pixel positions that do not follow the array (e.g. all spots at one pixel)
    parity = np.mod(np.rint(a[:, 0] + a[:, 1]), 2)
    if np.all(parity == parity[0]):
        pitch = float(np.linalg.norm(coef[0] + coef[1]))
        return {"um_per_px": ST_2K_X_STEP_UM / step_x, "spot_pitch_px": pitch,
                "array": "2k (checkerboard grid, 100 µm per array x step)"}
    step = (step_x + step_y) / 2
    return {"um_per_px": ST_1K_STEP_UM / step, "spot_pitch_px": step,
            "array": "1k (square grid, 200 µm centre-to-centre)"}


def read_spot_table(path: str | Path) -> pd.DataFrame:
    """The spot table with integer array ``x``, ``y``, float ``pixel_x``, ``pixel_y`` and ``selected`` (0/1)."""
    p = Path(path)
    df = read_table(p, "spot table", index_col=None)
    require_columns(df, SPOT_COLUMNS, p, "x, y (array), pixel_x, pixel_y (image pixels) and optionally selected")
    for c in SPOT_COLUMNS + (["selected"] if "selected" in df.columns else []):
        v = pd.to_numeric(df[c], errors="coerce")
        bad = ~np.isfinite(v.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise HevisumError(f"{p}: column {c!r} row {i + 1} is {show_value(df[c].iloc[i])}; expected a finite "
                               "number")
        df[c] = v
    if "selected" not in df.columns:
        df["selected"] = 1
    return df


def load_legacy_st(image_path: str | Path, spots_path: str | Path, targets_path: str | Path | None,
                   slide_id: str, *, counts: bool | None = None, max_side: int | None = None) -> LoadedSlide:
    """Read one section; counts are left pending for joint gene selection (see :func:`read_legacy_st`)."""
    spots_path = Path(spots_path)
    table = read_spot_table(spots_path)
    est = estimate_um_per_px(table[["x", "y"]].to_numpy(), table[["pixel_x", "pixel_y"]].to_numpy())
    n_rows = len(table)
    table = table[table["selected"] == 1].reset_index(drop=True)
    if len(table) == 0:
        raise HevisumError(f"{spots_path}: no spot has selected == 1 (of {n_rows}); the slide would be empty")
    keys = [spot_key(x, y) for x, y in zip(table["x"], table["y"])]
    dup = pd.Index(keys)[pd.Index(keys).duplicated()]
    if len(dup):
        raise HevisumError(f"{spots_path}: array position {dup[0]!r} appears twice among the selected spots")

    img, (sx, sy), level0 = read_slide_image(image_path, max_side,
                                             table[["pixel_x", "pixel_y"]].to_numpy(np.float64))
    spots = pd.DataFrame({"spot_id": keys, "x": table["pixel_x"].to_numpy(np.float64) * sx,
                          "y": table["pixel_y"].to_numpy(np.float64) * sy,
                          "array_x": table["x"].to_numpy(), "array_y": table["y"].to_numpy()})
    meta: dict = {"format": "legacy_st", "image_file": str(image_path), "spots_file": str(spots_path),
                  "n_selected": len(table)}
    um = None
    if est is not None:
        um = est["um_per_px"] / sx
        meta.update({"um_per_px_estimated": True, "st_array": est["array"], "spot_pitch_px": est["spot_pitch_px"] * sx})
    if level0 is not None:
        meta["level0"] = level0  # tiles are read from the full-resolution file, not from the working image
    elif (sx, sy) != (1.0, 1.0):
        meta["downscale"] = (sx, sy)
    base = Slide(slide_id=slide_id, image=img, spots=spots, um_per_px=um, source=str(spots_path.parent), meta=meta)
    if targets_path is None:
        base.meta["targets_kind"] = "none"
        return LoadedSlide(base)

    tp = Path(targets_path)
    df = read_table(tp, "targets table")
    values = numeric_matrix(df, tp)
    km = match_keys(keys, df.index.astype(str).tolist(), str(tp), f"{spots_path} (selected spots)", "'{x}x{y}' key")
    slide = base.with_spots(spots.iloc[km.order].reset_index(drop=True))
    slide.meta = dict(meta, n_dropped_no_target=km.n_spots_dropped, n_target_rows_unmatched=km.n_rows_unmatched,
                      targets_source=str(tp))
    vals = values[km.rows]
    names = [str(c) for c in df.columns]
    is_counts = looks_like_counts(vals) if counts is None else counts
    if is_counts:
        if not looks_like_counts(vals) and (vals < 0).any():
            raise HevisumError(f"{tp}: counts table has negative values; expected raw UMI counts")
        return LoadedSlide(slide, GeneCounts(to_csr_counts(vals), names, str(tp)))
    slide.targets, slide.target_names = vals, names
    slide.meta["targets_kind"] = "table"
    return LoadedSlide(slide)


def read_legacy_st(image_path: str | Path, spots_path: str | Path, targets_path: str | Path | None,
                   slide_id: str, *, counts: bool | None = None, top_genes: int = 50,
                   genes: Sequence[str] | None = None, max_side: int | None = None) -> Slide:
    """Read one legacy ST section as a :class:`Slide` (spot ids ``"{x}x{y}"``).

    ``counts``: None = decide from the values (non-negative integers are counts), True/False to force.
    Counts become ``log1p(counts/total*1e4)`` of the ``top_genes`` most variable genes (or ``genes``).
    ``targets_path=None`` gives a Test slide without targets.
    """
    loaded = load_legacy_st(image_path, spots_path, targets_path, slide_id, counts=counts, max_side=max_side)
    slide = apply_test_split(resolve_gene_targets([loaded], top_genes, genes), None)[0]
    return slide.validate()


# ------------------------------------------------------------------------------------------- folders
def is_her2st_folder(path: str | Path) -> bool:
    """A folder with ``spots/<sec>_selection.tsv`` and ``images/``."""
    p = Path(path)
    return (p / "spots").is_dir() and (p / "images").is_dir() and any((p / "spots").glob("*_selection.tsv"))


def is_mob_folder(path: str | Path) -> bool:
    """A folder with ``alignment_table_<sec>.tsv`` files."""
    p = Path(path)
    return p.is_dir() and any(p.glob("alignment_table_*.tsv"))


def is_legacy_st_folder(path: str | Path) -> bool:
    """Either legacy ST folder layout."""
    return is_her2st_folder(path) or is_mob_folder(path)


def _targets_from_pattern(pattern: str, sec: str) -> Path:
    return Path(pattern.replace(_SLIDE_PLACEHOLDER, sec))


def _section_image(folder: Path, sec: str) -> Path:
    """The image of section ``sec`` in ``folder``; a clear error when there is none."""
    img = find_image(folder, sec)
    if img is None:
        raise HevisumError(f"{folder}: no image for section {sec!r} (expected {sec}.jpg, "
                           f"or another of {', '.join(IMAGE_SUFFIXES)})")
    return img


def _her2st_sections(root: Path, targets: str | None) -> tuple[list[tuple[str, Path, Path, Path]], bool | None, str]:
    """[(section, image, spots, targets)], counts flag, description of the targets chosen."""
    spots_dir, images_dir = root / "spots", root / "images"
    secs = sorted((p.name[: -len("_selection.tsv")] for p in spots_dir.glob("*_selection.tsv")), key=_natural_key)
    kinds = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("spots", "images"))
    if targets is None:
        if "celltypes_subset" in kinds:
            targets = "celltypes_subset"
        elif len(kinds) == 1:
            targets = kinds[0]
        else:
            raise HevisumError(f"{root}: choose the targets with --targets, one of {kinds} or a path pattern with "
                               f"{_SLIDE_PLACEHOLDER}")
    counts: bool | None = None
    if _SLIDE_PLACEHOLDER in targets:
        pattern = targets
    elif targets in kinds:
        counts = True if targets == "counts" else None
        pattern = None
    else:
        raise HevisumError(f"{root}: --targets {targets!r} is not one of the target folders {kinds}, nor a path "
                           f"pattern containing {_SLIDE_PLACEHOLDER} (e.g. props/{_SLIDE_PLACEHOLDER}.tsv)")
    out = []
    for sec in secs:
        img = _section_image(images_dir, sec)
        if pattern is not None:
            tp = _targets_from_pattern(pattern, sec)
        else:
            folder = root / targets
            # names compared as they are (a section name may hold glob characters such as '[' or '*')
            cands = [folder / n for n in (f"{sec}.csv", f"{sec}.csv.gz", f"{sec}.tsv", f"{sec}.tsv.gz")
                     if (folder / n).is_file()]
            if not cands:
                raise HevisumError(f"{folder}: no targets table for section {sec!r} (expected {sec}.tsv or "
                                   f"{sec}.tsv.gz)")
            tp = cands[0]
        out.append((sec, img, spots_dir / f"{sec}_selection.tsv", tp))
    return out, counts, targets


def _mob_sections(root: Path, targets: str | None) -> tuple[list[tuple[str, Path, Path, Path]], bool | None, str]:
    secs = sorted((p.name[len("alignment_table_"): -len(".tsv")] for p in root.glob("alignment_table_*.tsv")),
                  key=_natural_key)
    if targets is not None and _SLIDE_PLACEHOLDER not in targets and targets != "counts":
        raise HevisumError(f"{root}: --targets {targets!r} is not 'counts' nor a path pattern containing "
                           f"{_SLIDE_PLACEHOLDER} (e.g. props/{_SLIDE_PLACEHOLDER}.tsv)")
    out = []
    for sec in secs:
        img = _section_image(root, sec)
        if targets is not None and _SLIDE_PLACEHOLDER in targets:
            tp = _targets_from_pattern(targets, sec)
        else:
            cands = [root / f"{sec}.tsv", root / f"{sec}.tsv.gz"]
            tp = next((c for c in cands if c.is_file()), cands[0])
        out.append((sec, img, root / f"alignment_table_{sec}.tsv", tp))
    return out, (True if targets == "counts" else None), targets or "counts"


def load_legacy_st_folder(path: str | Path, *, targets: str | None = None, image: str = "auto",
                          max_side: int | None = None, progress: bool = True) -> list[LoadedSlide]:
    """Read every section of a her2st-like or MOB-like folder (gene counts left pending)."""
    from tqdm import tqdm

    root = Path(path)
    if image not in ("auto", "full"):
        raise HevisumError(f"--image {image!r} applies to Visium/AnnData inputs; {root} holds one full-resolution "
                           "image per section (use auto or full)")
    if is_her2st_folder(root):
        sections, counts, chosen = _her2st_sections(root, targets)
        layout = "her2st"
    elif is_mob_folder(root):
        sections, counts, chosen = _mob_sections(root, targets)
        layout = "mob"
    else:
        raise HevisumError(f"{root}: not a legacy ST folder (expected spots/<sec>_selection.tsv + images/, or "
                           "alignment_table_<sec>.tsv + <sec>.jpg + <sec>.tsv)")
    loaded = []
    for sec, img, spots, tp in tqdm(sections, desc=f"reading {root.name}", unit="section",
                                    disable=None if progress else True):
        ls = load_legacy_st(img, spots, tp, sec, counts=counts, max_side=max_side)
        ls.slide.source = str(root)
        ls.slide.meta.update({"layout": layout, "targets_choice": chosen})
        if layout == "her2st":
            # HER2ST names sections <patient letter><section number> (A1..H3): sections of one patient are a group,
            # so cross-validation holds out whole patients when there are several
            m = re.match(r"[A-Za-z]+", sec)
            ls.slide.meta["group"] = m.group(0) if m else sec
        loaded.append(ls)
    return loaded


def read_legacy_st_folder(path: str | Path, *, targets: str | None = None, image: str = "auto",
                          top_genes: int = 50, genes: Sequence[str] | None = None,
                          test_slides: Sequence[str] | None = None, max_side: int | None = None,
                          progress: bool = True) -> list[Slide]:
    """Read all sections of a legacy ST folder, one :class:`Slide` each.

    ``targets`` (her2st-like): ``celltypes_subset`` (default), ``celltypes_major``, ``counts`` or a path
    pattern with ``{slide}``; (MOB-like): ``counts`` (default) or a pattern. Gene counts are reduced to the
    ``top_genes`` most variable genes chosen jointly over all sections read. ``test_slides`` become Test
    (their targets move to ``meta['truth']``).
    """
    loaded = load_legacy_st_folder(path, targets=targets, image=image, max_side=max_side, progress=progress)
    slides = apply_test_split(resolve_gene_targets(loaded, top_genes, genes), test_slides, str(path))
    return [s.validate() for s in slides]
