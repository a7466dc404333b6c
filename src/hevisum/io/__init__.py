"""Readers (one module per input format) and writers. All readers return lists of :class:`Slide`.

:func:`read_input` / :func:`read_inputs` detect the format from the path:

- a competition HDF5 file (``images/`` + ``spots/`` groups)             -> :mod:`hevisum.io.competition`
- an AnnData ``.h5ad``                                                  -> :mod:`hevisum.io.anndata_io`
- a 10x Visium Space Ranger folder (holding ``spatial/``) or ``spatial/`` -> :mod:`hevisum.io.visium`
- a legacy ST folder (her2st-like ``images/`` + ``spots/``, or MOB-like
  ``alignment_table_<sec>.tsv`` + ``<sec>.jpg`` + ``<sec>.tsv``)            -> :mod:`hevisum.io.legacy_st`
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from hevisum.errors import HevisumError
from hevisum.slide import Slide, check_same_targets, check_unique_ids

SUPPORTED_FORMATS = (
    "a competition HDF5 file (images/ + spots/ groups), an AnnData .h5ad, a 10x Visium Space Ranger folder "
    "(containing spatial/) or its spatial/ folder, a legacy ST folder (images/ + spots/<sec>_selection.tsv + "
    "target folders, or alignment_table_<sec>.tsv + <sec>.jpg + <sec>.tsv)"
)

__all__ = ["SUPPORTED_FORMATS", "detect_format", "read_input", "read_inputs"]


def detect_format(path: str | Path) -> str:
    """``'competition'``, ``'h5ad'``, ``'visium'`` or ``'legacy_st'`` for ``path``; HevisumError otherwise."""
    from hevisum.io.images import IMAGE_SUFFIXES
    from hevisum.io.legacy_st import is_legacy_st_folder
    from hevisum.io.visium import is_visium_folder

    p = Path(path)
    if not p.exists():
        raise HevisumError(f"input {str(p)!r} not found; supported inputs: {SUPPORTED_FORMATS}")
    if p.is_dir():
        if is_visium_folder(p):
            return "visium"
        if is_legacy_st_folder(p):
            return "legacy_st"
        shown = sorted(x.name for x in p.iterdir())[:10]
        raise HevisumError(f"{p}: folder not recognised (contains {shown}); supported inputs: {SUPPORTED_FORMATS}")
    if p.suffix.lower() == ".h5ad":
        return "h5ad"
    import h5py

    if h5py.is_hdf5(p):
        from hevisum.io.competition import open_h5

        with open_h5(p) as f:
            keys = sorted(f.keys())
            if "images" in f or "spots" in f:
                return "competition"  # its reader names a missing images/ or spots/ group
            if "obs" in f and "X" in f:
                return "h5ad"
            if "matrix" in f:
                raise HevisumError(
                    f"{p}: a 10x feature matrix holds counts but no image or spot positions; pass the Space Ranger "
                    "folder that contains it and spatial/, with --targets h5"
                )
        raise HevisumError(f"{p}: HDF5 file with groups {keys} is not a supported layout; supported inputs: "
                           f"{SUPPORTED_FORMATS}")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        raise HevisumError(f"{p}: an image alone has no spots; supported inputs: {SUPPORTED_FORMATS}")
    if p.suffix.lower() in (".h5", ".hdf5", ".he5"):
        raise HevisumError(f"{p}: not an HDF5 file ({p.stat().st_size} bytes); it may be truncated or damaged: write "
                           "or copy it again")
    raise HevisumError(f"{p}: unsupported input file; supported inputs: {SUPPORTED_FORMATS}")


def _load(path: str | Path, *, targets: str | None, image: str, max_side: int | None, slide_id: str | None,
          progress: bool) -> list:
    """Read one input into LoadedSlide objects (gene-count targets still pending)."""
    from hevisum.io.tables import LoadedSlide

    fmt = detect_format(path)
    if fmt == "competition":
        from hevisum.io.competition import read_competition_h5

        if targets is not None:
            raise HevisumError(f"{path}: --targets {targets!r} does not apply to a competition HDF5 file (its targets "
                               "are the C1..Cn fields of spots/Train)")
        out = []
        for s in read_competition_h5(path):
            meta = dict(s.meta, format="competition")
            out.append(LoadedSlide(replace(s, meta=meta)))
        loaded = out
    elif fmt == "h5ad":
        from hevisum.io.anndata_io import load_h5ad

        loaded = load_h5ad(path, targets=targets, image=image, max_side=max_side)
    elif fmt == "visium":
        from hevisum.io.visium import load_visium

        loaded = load_visium(path, targets=targets, image=image, max_side=max_side)
    else:
        from hevisum.io.legacy_st import load_legacy_st_folder

        loaded = load_legacy_st_folder(path, targets=targets, image=image, max_side=max_side, progress=progress)
    if slide_id is not None:
        if len(loaded) != 1:
            raise HevisumError(f"{path}: slide_id {slide_id!r} can only rename a single-slide input; this one has "
                               f"{[ls.slide.slide_id for ls in loaded]}")
        loaded[0].slide = replace(loaded[0].slide, slide_id=slide_id)
    if max_side is not None:
        for ls in loaded:
            ls.slide = _downscale_slide(ls.slide, max_side)
    return loaded


MANIFEST_COLUMNS = ("path", "slide", "split", "group", "fullres", "targets", "um_per_px")


def is_manifest(path: str | Path) -> bool:
    """A CSV whose header names a ``path`` column: one input per row (see :func:`_load_manifest`)."""
    p = Path(path)
    if p.suffix.lower() != ".csv" or not p.is_file():
        return False
    try:
        with open(p, encoding="utf-8") as fh:
            head = fh.readline()
    except (OSError, UnicodeDecodeError):
        return False
    return "path" in [c.strip().lower() for c in head.split(",")]


def _load_manifest(path: Path, *, targets, image, max_side, progress) -> tuple[list, list[str]]:
    """Read the inputs a manifest CSV lists: ``path, slide, split, group`` and optionally ``fullres, targets,
    um_per_px``. Paths are relative to the manifest's folder. ``slide`` picks one slide of a multi-slide input
    (or names a single-slide one); ``split`` is train or test; ``group`` (a patient) makes cross-validation hold out
    whole groups; ``fullres`` is the full-resolution image of a Visium folder; ``targets`` overrides --targets for
    the row; ``um_per_px`` sets the scale where the input has none."""
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise HevisumError(f"{path}: not a readable manifest CSV ({str(e).splitlines()[0]})") from None
    df.columns = [c.strip().lower() for c in df.columns]
    unknown = [c for c in df.columns if c not in MANIFEST_COLUMNS]
    if unknown:
        raise HevisumError(f"{path}: unknown manifest column(s) {unknown}; valid columns are {list(MANIFEST_COLUMNS)}")
    if df.empty:
        raise HevisumError(f"{path}: the manifest lists no inputs")
    out, test_ids = [], []
    seen: dict = {}
    for i, row in df.iterrows():
        where = f"{path}, row {i + 2}"
        rel = row.get("path", "").strip()
        if not rel:
            raise HevisumError(f"{where}: empty path")
        p = (path.parent / rel) if not Path(rel).is_absolute() else Path(rel)
        split = row.get("split", "").strip().lower()
        if split not in ("", "train", "test"):
            raise HevisumError(f"{where}: split {split!r} is not valid; use train or test")
        um = row.get("um_per_px", "").strip()
        try:
            um_val = float(um) if um else None
        except ValueError:
            um_val = None
        if um and not (um_val and np.isfinite(um_val) and 0 < um_val < 1000):
            raise HevisumError(f"{where}: um_per_px {um!r} must be a positive number of microns per pixel")
        fullres = row.get("fullres", "").strip()
        key = (str(p.resolve()), row.get("targets", "").strip() or targets, fullres)
        if key not in seen:  # rows naming slides of one multi-slide input read it once
            seen[key] = _load(str(p), targets=key[1], image=str(path.parent / fullres) if fullres else image,
                              max_side=max_side, slide_id=None, progress=progress)
        items = list(seen[key])
        want = row.get("slide", "").strip()
        if want:
            picked = [ls for ls in items if ls.slide.slide_id == want]
            if not picked and len(items) == 1:
                items[0].slide = replace(items[0].slide, slide_id=want)
                picked = items
            if not picked:
                raise HevisumError(f"{where}: slide {want!r} is not in {p}; it has "
                                   f"{[ls.slide.slide_id for ls in items]}")
            items = picked
        for ls in items:
            s = ls.slide
            meta = dict(s.meta)
            if row.get("group", "").strip():
                meta["group"] = row["group"].strip()
            ls.slide = replace(s, meta=meta, um_per_px=um_val or s.um_per_px)
            if split == "test":
                test_ids.append(s.slide_id)
            elif split == "train" and s.split == "test":
                raise HevisumError(f"{where}: slide {s.slide_id!r} is a test slide in {p}; it cannot be a training "
                                   "slide")
        out.extend(items)
    return out, test_ids


def _downscale_slide(s: Slide, max_side: int) -> Slide:
    """Images already in memory (competition, .h5ad) shrunk to ``max_side``; coordinates follow."""
    from hevisum.io.images import downscale_image

    if max(s.image.shape[:2]) <= max_side:
        return s
    img, (sx, sy) = downscale_image(s.image, max_side)
    spots = s.spots.copy()
    spots["x"] = spots["x"] * sx
    spots["y"] = spots["y"] * sy
    meta = dict(s.meta, downscale=(sx, sy))
    if isinstance(meta.get("level0"), dict):  # working image of a file read lazily: keep the map to its pixels
        lv = meta["level0"]
        meta["level0"] = dict(lv, sx=float(lv["sx"]) * sx, sy=float(lv["sy"]) * sy)
    return replace(s, image=img, spots=spots, um_per_px=s.um_per_px / sx if s.um_per_px else None, meta=meta)


def read_inputs(paths: Sequence[str | Path], *, targets: str | None = None, image: str = "auto",
                top_genes: int = 50, test_slides: Sequence[str] | None = None,
                genes: Sequence[str] | None = None, slide_id: str | None = None,
                max_side: int | None = None, progress: bool = True) -> list[Slide]:
    """Read several inputs as one list of slides (the CLI's entry point).

    Every input is read with the same options; gene-count targets choose their ``top_genes`` genes jointly
    over all count slides of all inputs (or use ``genes``); ``test_slides`` may name slides of any input.
    Then slide ids must be unique, every slide valid, and every Train slide must have the same targets.

    Parameters
    ----------
    targets: which targets where an input offers several (see the readers): her2st folders
        ``celltypes_subset`` / ``celltypes_major`` / ``counts`` / a pattern with ``{slide}``; Visium ``h5`` or a
        table path; .h5ad ``X`` / ``counts`` / an obsm key or layer.
    image: ``auto``, ``hires``, ``lowres``, ``full`` (Visium / .h5ad), or a full-resolution image path.
    top_genes: genes kept when targets are counts (most variable log1p(counts/total*1e4)).
    test_slides: slide ids to treat as Test (targets moved to ``meta['truth']``).
    genes: explicit gene list instead of the most variable ones (e.g. those of a finished run).
    slide_id: new id for a single-slide input (only with one input).
    max_side: shrink every image so its longer side is at most this many pixels (coordinates follow).
    progress: show progress bars on multi-section folders.
    """
    from hevisum.io.tables import apply_test_split, resolve_gene_targets

    paths = list(paths)
    if not paths:
        raise HevisumError(f"no input given; supported inputs: {SUPPORTED_FORMATS}")
    if slide_id is not None and len(paths) > 1:
        raise HevisumError(f"slide_id {slide_id!r} can only rename one input, got {len(paths)} inputs")
    loaded = []
    for p in paths:
        if is_manifest(p):
            if len(paths) > 1 or slide_id is not None:
                raise HevisumError(f"{p}: a manifest lists every input itself; give it alone, without slide_id")
            items, manifest_test = _load_manifest(Path(p), targets=targets, image=image, max_side=max_side,
                                                  progress=progress)
            loaded.extend(items)
            test_slides = list(test_slides or []) + manifest_test
            continue
        loaded.extend(_load(p, targets=targets, image=image, max_side=max_side, slide_id=slide_id,
                            progress=progress))
    check_unique_ids([ls.slide for ls in loaded])
    slides = resolve_gene_targets(loaded, top_genes, genes)
    # test slides an input marks itself (an .h5ad's obs["split"]) but that still carry values: those are truth
    marked = [s.slide_id for s in slides if s.split == "test" and s.targets is not None]
    slides = apply_test_split(slides, list(test_slides or []) + marked, ", ".join(map(str, paths)))
    for s in slides:
        s.validate()
    check_same_targets([s for s in slides if s.split == "train"])
    return slides


def read_input(path: str | Path, *, targets: str | None = None, image: str = "auto", top_genes: int = 50,
               test_slides: Sequence[str] | None = None, genes: Sequence[str] | None = None,
               slide_id: str | None = None, max_side: int | None = None, progress: bool = True) -> list[Slide]:
    """Read one input (format detected from the path) as a list of slides; see :func:`read_inputs`."""
    return read_inputs([path], targets=targets, image=image, top_genes=top_genes, test_slides=test_slides,
                       genes=genes, slide_id=slide_id, max_side=max_side, progress=progress)
