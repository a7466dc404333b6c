"""What a run or a prediction writes for the user: predictions.csv, submission_<slide>.csv, predictions.h5ad.

``predictions.h5ad`` is meant to be joined onto the user's own data:

- ``obs_names`` are the input's spot ids (Visium barcodes, the reader's spot ids); only when two slides share a
  spot id are they made unique, as ``anndata.concat(..., index_unique="-")`` does (``<spot id>-<slide>``);
  ``obs`` holds ``slide``, ``ID`` (the spot id), ``library_id`` (the slide's ``uns['spatial']`` key: its id, made
  safe for HDF5 when it holds ``/``), ``split`` (``test`` / ``train_oof``) and, when the input had them,
  ``in_tissue``, ``array_row``, ``array_col``;
- ``X`` holds the predictions, ``layers['truth']`` the truth where it is known (NaN elsewhere);
- ``obsm['spatial']`` is in the input's own frame: Visium (and AnnData inputs) full-resolution pixels
  (``pxl_col_in_fullres, pxl_row_in_fullres``), with the input's images and scale factors under
  ``uns['spatial'][library_id]`` (scanpy's layout); other inputs: pixels of the image hevisum read, with a thumbnail
  as ``hires`` and its scale factor;
- ``uns['hevisum']`` states the units of ``X``, the method, the encoder and the run's config (JSON).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.names import safe_name

FULLRES_COLUMNS = ("pxl_col_in_fullres", "pxl_row_in_fullres")  # x, y in the input's full-resolution frame
SPOT_COLUMNS = ("in_tissue", "array_row", "array_col")  # the input's own spot columns carried into obs
UNITS = {
    "rank": "per-spot rank scores in 0..1 (higher = more abundant relative to the spot's other targets); "
            "not proportions and not expression values",
    "raw": "the targets' own units (the models were fitted to the raw values)",
}


def thumbnail(image: np.ndarray, max_side: int = 1000) -> tuple[np.ndarray, float]:
    """A downsampled copy of an image for plots and .h5ad files, and the scale factor applied."""
    h, w = image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f >= 1.0:
        return image, 1.0
    step = int(np.ceil(1 / f))
    small = image[::step, ::step]
    return np.ascontiguousarray(small), 1.0 / step


@dataclass
class SlideImages:
    """What the outputs need of one slide besides its spots.

    ``thumb`` and ``scale``: a downsampled copy of the image the spots' ``x, y`` refer to, and thumb pixels per
    image pixel (iterating gives ``(thumb, scale)``, as :func:`thumbnail` returns). ``images`` and
    ``scalefactors``: ``uns['spatial'][slide]`` of predictions.h5ad. ``frame``: ``'fullres'`` when
    ``obsm['spatial']`` is the input's full-resolution frame (spot columns ``pxl_col_in_fullres``,
    ``pxl_row_in_fullres``), ``'image'`` when it is the image's pixels, ``'level0'`` when it is the pixels of a
    full-resolution file read region by region (spot ``x, y`` divided by ``level0`` = the working image's
    ``(sx, sy)``).
    """

    thumb: np.ndarray
    scale: float
    images: dict = field(default_factory=dict)
    scalefactors: dict = field(default_factory=dict)
    frame: str = "image"
    level0: tuple[float, float] = (1.0, 1.0)

    def __iter__(self):
        return iter((self.thumb, self.scale))


def slide_images(slide, max_side: int = 1000) -> SlideImages:
    """:class:`SlideImages` of a :class:`~hevisum.slide.Slide`: a Visium sample's own hires/lowres images and
    scalefactors_json.json, an AnnData input's ``uns['spatial']`` library, else a thumbnail of the image."""
    thumb, scale = thumbnail(slide.image, max_side)
    meta = slide.meta or {}
    fullres = all(c in slide.spots.columns for c in FULLRES_COLUMNS)
    sf = meta.get("scalefactors")
    images: dict = {}
    if fullres and isinstance(sf, dict) and meta.get("spatial_dir"):
        from hevisum.io.images import IMAGE_SUFFIXES, read_image

        folder = Path(meta["spatial_dir"])
        for res in ("hires", "lowres"):
            files = [p for p in sorted(folder.glob(f"tissue_{res}_image.*")) if p.suffix.lower() in IMAGE_SUFFIXES]
            if files and f"tissue_{res}_scalef" in sf:
                images[res] = read_image(files[0])
    elif fullres and isinstance(sf, dict) and isinstance(meta.get("library_images"), dict):
        images = {k: v for k, v in meta["library_images"].items() if f"tissue_{k}_scalef" in sf}
    if images:
        return SlideImages(thumb, scale, images=images, scalefactors=dict(sf), frame="fullres")
    lv = meta.get("level0")
    sx, sy = (float(lv["sx"]), float(lv["sy"])) if isinstance(lv, dict) else (1.0, 1.0)
    factors = {"tissue_hires_scalef": float(scale) * sx}
    if meta.get("spot_diameter_px"):
        factors["spot_diameter_fullres"] = float(meta["spot_diameter_px"]) / sx
    return SlideImages(thumb, scale, images={"hires": thumb}, scalefactors=factors,
                       frame="level0" if isinstance(lv, dict) else "image", level0=(sx, sy))


def _as_images(value) -> SlideImages:
    if isinstance(value, SlideImages):
        return value
    img, scale = value  # (thumbnail, scale) as thumbnail() returns
    return SlideImages(img, float(scale), images={"hires": img}, scalefactors={"tissue_hires_scalef": float(scale)})


def run_info(cfg, method: str) -> dict:
    """``uns['hevisum']`` of a run's predictions: units, method, encoder and the resolved config as JSON."""
    from hevisum import __version__
    from hevisum.config import to_dict

    units = "rank" if cfg.train.target == "rank" else "raw"
    return {"units": units, "units_note": UNITS[units], "method": str(method), "encoder": str(cfg.encoder.name),
            "profile": str(cfg.profile), "version": __version__,
            "config": json.dumps(to_dict(cfg), sort_keys=True, default=str)}


def obs_names(slides: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """The spot ids, unless two slides share one: then ``<spot id>-<slide>`` (``anndata.concat``'s
    ``index_unique="-"``), so several slides' predictions still join their concatenated AnnData."""
    ids = np.asarray(ids, dtype=str)
    if not pd.Index(ids).duplicated().any():
        return ids
    names = np.char.add(np.char.add(ids, "-"), np.asarray(slides, dtype=str))
    if pd.Index(names).duplicated().any():  # only with a spot listed twice on one slide: anndata's make-unique
        seen: dict[str, int] = {}
        out = []
        for n in names.tolist():
            k = seen.get(n, 0)
            seen[n] = k + 1
            out.append(n if k == 0 else f"{n}-{k}")
        names = np.asarray(out, dtype=str)
    return names


def library_key(slide: str) -> str:
    """The ``uns['spatial']`` key of a slide: its id, unless HDF5 cannot store that as a name (``/``, NUL,
    ``.`` or ``..``): then :func:`~hevisum.names.safe_name` of it."""
    s = str(slide)
    return safe_name(s) if ("/" in s or "\0" in s or s in (".", "..") or not s) else s


def predictions_to_h5ad(spots: pd.DataFrame, pred: np.ndarray, target_names: list[str], path: Path,
                        thumbnails: dict | None = None, *, split=None, truth: np.ndarray | None = None,
                        info: dict | None = None) -> None:
    """Write predictions as AnnData (see the module notes for the layout). ``spots``: rows of a prepared spots
    table; ``thumbnails``: slide -> :class:`SlideImages` (or ``(thumbnail, scale)``); ``split``: per row
    (``test`` / ``train_oof``); ``truth``: (n, T) with NaN where unknown; ``info``: ``uns['hevisum']``."""
    import anndata as ad

    from hevisum.io.atomic import atomic_path

    slides = spots["slide"].astype(str).to_numpy()
    ids = spots["spot_id"].astype(str).to_numpy()
    order = list(dict.fromkeys(slides))
    obs = pd.DataFrame({"slide": pd.Categorical(slides, categories=order), "ID": ids},
                       index=pd.Index(obs_names(slides, ids)))
    obs["library_id"] = pd.Categorical([library_key(s) for s in slides], categories=[library_key(s) for s in order])
    if split is not None:
        obs["split"] = pd.Categorical(np.asarray(split, dtype=str), categories=["test", "train_oof"])
    for col in SPOT_COLUMNS:
        if col in spots.columns:
            v = _numbers(spots[col])
            if np.isfinite(v).any():  # integers stay integers where every slide has the column
                obs[col] = v.astype(np.int64) if np.isfinite(v).all() and (v == np.round(v)).all() else v
    var = pd.DataFrame(index=pd.Index([str(n) for n in target_names]))
    var["column"] = [f"C{i + 1}" for i in range(len(target_names))]
    if var.index.duplicated().any():
        var.index = var["column"].to_numpy()
    adata = ad.AnnData(X=np.asarray(pred, dtype=np.float32), obs=obs, var=var)
    if truth is not None:
        adata.layers["truth"] = np.asarray(truth, dtype=np.float32)
    views = {s: _as_images(v) for s, v in (thumbnails or {}).items()}
    xy = spots[["x", "y"]].to_numpy(dtype=np.float64)
    spatial: dict = {}
    for slide in order:
        rows = slides == slide
        v = views.get(slide)
        if v is not None and v.frame == "fullres" and all(c in spots.columns for c in FULLRES_COLUMNS):
            full = np.column_stack([_numbers(spots.loc[rows, c]) for c in FULLRES_COLUMNS])
            if np.isfinite(full).all():
                xy[rows] = full
            else:
                v = SlideImages(v.thumb, v.scale, {"hires": v.thumb}, {"tissue_hires_scalef": v.scale})
        elif v is not None and v.frame == "level0":
            xy[rows] = xy[rows] / np.asarray(v.level0, dtype=np.float64)  # the full-resolution file's pixels
        if v is None:
            continue
        factors = {k: float(f) for k, f in v.scalefactors.items()}
        if "spot_diameter_fullres" not in factors and "pitch_px" in spots.columns:
            factors["spot_diameter_fullres"] = 0.5 * float(spots.loc[rows, "pitch_px"].median()) / v.level0[0]
        spatial[library_key(slide)] = {"images": dict(v.images), "scalefactors": factors,
                          "metadata": {"frame": "fullres" if v.frame in ("fullres", "level0") else "image"}}
    adata.obsm["spatial"] = xy
    if spatial:
        adata.uns["spatial"] = spatial
    if info:
        adata.uns["hevisum"] = dict(info)
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def _numbers(col: pd.Series) -> np.ndarray:
    """A spot column as float64, NaN where empty or not a number (a column only some slides have is read back
    from spots.csv as text with empty cells)."""
    return pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def write_prediction_outputs(folder: Path, spots: pd.DataFrame, pred: np.ndarray, target_names: list[str],
                             thumbnails: dict | None = None, *, split=None, truth: np.ndarray | None = None,
                             info: dict | None = None) -> None:
    """predictions.csv (slide, ID, C1..Cn), submission_<slide>.csv (ID, C1..Cn, file order), predictions.h5ad.

    With ``split`` (``test`` / ``train_oof`` per row): predictions.csv and the submissions hold the test spots,
    or, when there are none, predictions.csv the out-of-fold predictions of the training spots; predictions.h5ad
    holds every row. Without it every row is a prediction (``hevisum predict``).
    """
    folder = Path(folder)
    split_arr = None if split is None else np.asarray(split, dtype=str)
    test = np.ones(len(spots), bool) if split_arr is None else split_arr == "test"
    shown = test if test.any() else np.ones(len(spots), bool)
    df = prediction_frame(spots[shown], np.asarray(pred)[shown])
    df.to_csv(folder / "predictions.csv", index=False)
    if test.any():
        for slide, sub in prediction_frame(spots[test], np.asarray(pred)[test]).groupby("slide", sort=False):
            sub = sub.drop(columns="slide")
            if sub["ID"].str.fullmatch(r"\d+").all():  # competition IDs are row numbers: file order
                sub = sub.assign(ID=sub["ID"].astype(int)).sort_values("ID", kind="stable")
            sub.to_csv(folder / f"submission_{safe_name(slide)}.csv", index=False)
    predictions_to_h5ad(spots, pred, target_names, folder / "predictions.h5ad", thumbnails, split=split_arr,
                        truth=truth, info=info)


def prediction_frame(spots: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """slide, ID, C1..Cn for the given spots (rows of a prepared spots table) and predictions."""
    df = pd.DataFrame(np.asarray(pred, dtype=np.float32), columns=[f"C{i + 1}" for i in range(pred.shape[1])])
    df.insert(0, "ID", spots["spot_id"].astype(str).to_numpy())
    df.insert(0, "slide", spots["slide"].astype(str).to_numpy())
    return df


def truth_rows(spots: pd.DataFrame, truth_df: pd.DataFrame | None, n_targets: int) -> np.ndarray:
    """The truth of ``spots`` from a (slide, ID, C1..Cn) frame, NaN for spots it does not name."""
    out = np.full((len(spots), n_targets), np.nan, dtype=np.float32)
    cols = [f"C{i + 1}" for i in range(n_targets)]
    if truth_df is None or not len(spots) or "ID" not in truth_df or not set(cols) <= set(truth_df.columns):
        return out
    slide = truth_df["slide"].astype(str) if "slide" in truth_df else pd.Series(
        [str(spots["slide"].iloc[0])] * len(truth_df), index=truth_df.index)
    key = pd.MultiIndex.from_arrays([slide.to_numpy(), truth_df["ID"].astype(str).to_numpy()])
    if key.duplicated().any():
        return out
    pos = key.get_indexer(pd.MultiIndex.from_arrays([spots["slide"].astype(str).to_numpy(),
                                                     spots["spot_id"].astype(str).to_numpy()]))
    vals = truth_df[cols].apply(pd.to_numeric, errors="coerce").to_numpy(np.float32)
    found = pos >= 0
    out[found] = vals[pos[found]]
    return out


# ------------------------------------------------------------------------------------------- files written

_DESCRIBED = [
    ("report.html", "the report: self-contained, every figure embedded (open it in a browser, or mail it)"),
    ("predictions.h5ad", "predictions (test spots and out-of-fold training spots) in the input's frame, with "
                         "truth where known, for scanpy/squidpy"),
    ("predictions.csv", "slide, ID, C1..Cn of the selected method (test spots; without test slides the "
                        "out-of-fold predictions of the training spots)"),
    ("submission_*.csv", "ID, C1..Cn per test slide, in the competition format"),
    ("metrics.json", "cross-validation (and test) metrics of every method, the selection and embedding QC"),
    ("per_target.csv", "per-target Pearson and Spearman of the selected method beside the best baseline"),
    ("oof_*.csv", "out-of-fold predictions of every training spot, one file per method"),
    ("test_*.csv", "test predictions of every method"),
    ("figures/", "the report's figures as PNG files"),
    ("models/", "every fold model and the stacker (enough for 'hevisum predict')"),
    ("config.toml", "the resolved configuration"),
    ("target_names.json", "names of the target columns C1..Cn"),
    ("stain.json", "the stain target fitted on the training slides"),
    ("explain/", "explanation figures"),
    ("prep/", "the preprocessing work folder (tile caches, spots.csv, QC figures)"),
]


def written_files(folder: Path) -> list[tuple[str, str]]:
    """``(name, what it is)`` for what ``folder`` holds, the user-facing files first (patterns such as
    ``submission_*.csv`` summarised in one line with their count)."""
    import fnmatch

    folder = Path(folder)
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    out, seen = [], set()
    for pattern, what in _DESCRIBED:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            continue
        seen.update(hits)
        out.append((hits[0] if len(hits) == 1 else f"{pattern} ({len(hits)} files)", what))
    out += [(n, "") for n in names if n not in seen]
    return out


def format_written(folder: Path, shown_as: Path | None = None) -> str:
    """The closing list `hevisum run` prints: every file of ``folder``, as it will be named under
    ``shown_as``."""
    base = Path(shown_as if shown_as is not None else folder)
    rows = written_files(folder)
    width = max((len(n) for n, _ in rows), default=0)
    return "\n".join([f"files written in {base}:"] + [f"  {n:<{width}}  {w}".rstrip() for n, w in rows])
