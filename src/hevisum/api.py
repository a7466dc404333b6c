"""The Python API: read, run, predict and evaluate from a script or notebook, AnnData in and AnnData out.

    import hevisum

    slides = hevisum.read("sample/")                            # list[Slide], any input the CLI reads
    result = hevisum.run(slides, "runs/one", config={"stacking": {"enabled": False}})
    pred = hevisum.predict("runs/one", adata)                   # AnnData, joinable onto ``adata``
    scores = hevisum.evaluate(pred, truth)                      # the numbers `hevisum evaluate` prints

Data may be given as a path (or a list of paths) the CLI reads, an in-memory :class:`anndata.AnnData` in the
scanpy/squidpy spatial layout (``obsm['spatial']``, the image under ``uns['spatial'][library]``, targets in
``obsm['proportions']`` or ``X``), or :class:`~hevisum.slide.Slide` objects. In-memory data is written to a
temporary ``.h5ad`` and read by the same readers as the CLI's, so the API and the CLI run the very same
pipeline.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from hevisum.errors import HevisumError

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import pandas as pd

    from hevisum.pipeline import RunResult
    from hevisum.slide import Slide

__all__ = ["evaluate", "predict", "read", "run"]

READER_OPTIONS = ("targets", "image", "top_genes", "genes", "test_slides", "slide_id", "max_side", "progress")


def read(data, **opts) -> list[Slide]:
    """Read slides: ``data`` is a path (competition HDF5, Visium folder, legacy ST folder, .h5ad), a list of
    paths, or an in-memory AnnData. ``opts`` are :func:`hevisum.io.read_inputs`'s: ``targets``, ``image``,
    ``top_genes``, ``genes``, ``test_slides``, ``slide_id``, ``max_side``."""
    from hevisum.io import read_inputs

    _check_options(opts, READER_OPTIONS, "read")
    with _as_paths(data) as paths:
        return read_inputs(paths, **_marked_tests(opts, data))


def run(data, out: str | Path, config: None | str | Path | dict = None, *,
        truth: None | str | Path | pd.DataFrame = None, profile: str | None = None, seed: int | None = None,
        device: str = "auto", progress: bool = True, force: bool = False, resume: bool = False,
        **reader_opts) -> RunResult:
    """`hevisum run` from Python: read ``data``, cross-validate, select, predict, and write the run folder
    ``out``; returns the typed :class:`~hevisum.pipeline.RunResult` (``.metrics`` is metrics.json's content).

    ``data``: paths, an AnnData, slides, or None for the generated demo dataset. ``config``: a TOML file, or a
    dict of the same sections (``{"train": {"epochs": 5}, "stacking": {"enabled": False}}``).
    ``truth``: the test slides' truth (CSV path or a frame with slide, ID, C1..Cn). ``reader_opts`` as in
    :func:`read`.
    """
    from hevisum.pipeline import run as run_pipeline

    _check_options(reader_opts, READER_OPTIONS, "run")
    config_path, overrides = _config(config)
    with tempfile.TemporaryDirectory(prefix="hevisum-api-") as tmp:
        truth_path = _truth_path(truth, Path(tmp))
        with _as_paths(data, allow_none=True) as paths:
            return run_pipeline(paths, Path(out), config_path=config_path, profile=profile, truth=truth_path,
                                seed=seed, reader_kwargs=_marked_tests(reader_opts, data), device=device,
                                progress=progress, overrides=overrides, force=force, resume=resume)


def predict(run_dir: str | Path, data, *, out: str | Path | None = None, device: str = "auto",
            progress: bool = False, force: bool = False, **reader_opts) -> anndata.AnnData:
    """Predict every spot of ``data`` with a finished run folder; returns the predictions as an in-memory
    AnnData (the layout of predictions.h5ad: the input's spot ids as ``obs_names``, ``obsm['spatial']`` in the
    input's frame, ``uns['hevisum']`` with the units). ``out``: also keep the prediction folder there."""
    import anndata as ad

    from hevisum.predict import predict_from_run

    _check_options(reader_opts, READER_OPTIONS, "predict")
    with tempfile.TemporaryDirectory(prefix="hevisum-api-") as tmp:
        folder = Path(out) if out is not None else Path(tmp) / "prediction"
        with _as_paths(data) as paths:
            if len(paths) != 1:
                raise HevisumError(f"predict takes one input (a path, an AnnData or slides), got {len(paths)}")
            predict_from_run(Path(run_dir), paths[0], folder, reader_kwargs=reader_opts, progress=progress,
                             device=device, force=force)
        return ad.read_h5ad(folder / "predictions.h5ad")  # read whole into memory before the folder goes


def evaluate(pred, truth) -> dict[str, Any]:
    """Score predictions against truth as `hevisum evaluate` does (per-spot Spearman, per-target Spearman and
    Pearson, MSE; overall and per slide). Each of ``pred`` and ``truth`` is a frame (slide, ID, C1..Cn), a CSV
    path, or an AnnData (``X`` for predictions; for truth ``layers['truth']`` when present, else ``X``) or its
    .h5ad path; spots are joined on (slide, ID)."""
    from hevisum.metrics import evaluate_frames

    return evaluate_frames(_frame(pred, "predictions", "pred"), _frame(truth, "truth", "truth"),
                           names=(_name(pred, "predictions"), _name(truth, "truth")))


# ------------------------------------------------------------------------------------------- helpers


def _check_options(opts: dict, allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise HevisumError(f"hevisum.{where}: unknown option(s) {unknown}; reader options are {list(allowed)}")


def _config(config) -> tuple[str | None, dict | None]:
    if config is None:
        return None, None
    if isinstance(config, dict):
        return None, config
    if isinstance(config, (str, Path)):
        return str(config), None
    raise HevisumError(f"config must be None, a TOML path or a dict of sections, got {type(config).__name__}")


def _truth_path(truth, tmp: Path) -> str | None:
    if truth is None or isinstance(truth, (str, Path)):
        return None if truth is None else str(truth)
    import pandas as pd

    if isinstance(truth, pd.DataFrame):
        path = tmp / "truth.csv"
        truth.to_csv(path, index=False)
        return str(path)
    raise HevisumError(f"truth must be a CSV path or a DataFrame (slide, ID, C1..Cn), got {type(truth).__name__}")


def _is_anndata(x) -> bool:
    try:
        import anndata as ad
    except ImportError:  # pragma: no cover - anndata is a dependency
        return False
    return isinstance(x, ad.AnnData)


def _marked_tests(opts: dict, data) -> dict:
    """``opts`` with the slides ``data`` itself marks as Test (Slide.split, obs['split']) added to
    ``test_slides``, so a Test slide that carries its truth keeps it as truth."""
    from hevisum.slide import Slide

    items = [data] if isinstance(data, Slide) or _is_anndata(data) else \
        (list(data) if isinstance(data, (list, tuple)) else [])
    marked: list[str] = []
    for x in items:
        if isinstance(x, Slide) and x.split == "test":
            marked.append(x.slide_id)
        elif _is_anndata(x) and "split" in x.obs.columns:
            key = next((k for k in ("slide", "library_id") if k in x.obs.columns), None)
            if key is not None:
                test = x.obs["split"].astype(str).to_numpy() == "test"
                marked += list(dict.fromkeys(x.obs[key].astype(str).to_numpy()[test].tolist()))
    if not marked:
        return dict(opts)
    return dict(opts, test_slides=list(dict.fromkeys([*(opts.get("test_slides") or []), *marked])))


@contextmanager
def _as_paths(data, allow_none: bool = False) -> Iterator[list[str] | None]:
    """``data`` as input paths: paths as they are; an AnnData or slides written to a temporary .h5ad (removed
    on exit)."""
    from hevisum.slide import Slide

    if data is None:
        if not allow_none:
            raise HevisumError("no data given: pass a path, a list of paths, an AnnData or a list of slides")
        yield None
        return
    if isinstance(data, (str, Path)):
        yield [str(data)]
        return
    items = [data] if isinstance(data, Slide) or _is_anndata(data) else list(data)
    if not items:
        raise HevisumError("no data given: the list is empty")
    if all(isinstance(x, (str, Path)) for x in items):
        yield [str(x) for x in items]
        return
    for x in items:
        if not isinstance(x, (str, Path, Slide)) and not _is_anndata(x):
            raise HevisumError(f"cannot read a {type(x).__name__}: pass paths, an AnnData or Slide objects")
    with tempfile.TemporaryDirectory(prefix="hevisum-api-") as tmp:
        paths: list[str] = []
        for i, x in enumerate(items):
            if isinstance(x, (str, Path)):
                paths.append(str(x))
                continue
            # one file per slide: a slide id HDF5 cannot use as a name (a "/" in it) still pairs with its image
            p = Path(tmp) / str(i) / ("anndata.h5ad" if _is_anndata(x) else "slide.h5ad")
            p.parent.mkdir()
            (x if _is_anndata(x) else slides_to_anndata([x])).write_h5ad(p)
            paths.append(str(p))
        yield paths


def slides_to_anndata(slides: Sequence[Slide]) -> anndata.AnnData:
    """Slides as one AnnData in the layout the .h5ad reader reads back to the same slides: ``obs`` slide,
    spot_id, split and the numeric spot columns; ``X`` the targets (a test slide's truth, else NaN);
    ``obsm['spatial']`` in the input's full-resolution frame when the slide knows it (spot columns
    ``pxl_col_in_fullres``, ``pxl_row_in_fullres``), else image pixels; the image under
    ``uns['spatial'][slide]`` with its scale factor (and the input's other scale factors)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from hevisum.outputs import FULLRES_COLUMNS, library_key, obs_names
    from hevisum.slide import check_same_targets, check_unique_ids

    slides = list(slides)
    check_unique_ids(slides)
    for s in slides:
        s.validate()
    names = check_same_targets([s for s in slides if s.split == "train"])
    if names is None:
        names = next((list(s.meta.get("truth_names") or []) for s in slides if s.meta.get("truth") is not None), [])
    n_t = len(names)
    obs_parts, xy_parts, blocks, spatial = [], [], [], {}
    for s in slides:
        sp = s.spots.reset_index(drop=True)
        obs = pd.DataFrame({"slide": s.slide_id, "spot_id": s.spot_ids, "split": s.split})
        for col in sp.columns:
            if col not in ("spot_id", "x", "y", "test_set", *FULLRES_COLUMNS) \
                    and pd.api.types.is_numeric_dtype(sp[col]) and not pd.api.types.is_bool_dtype(sp[col]):
                obs[col] = sp[col].to_numpy()
        obs_parts.append(obs)
        scale = float(s.meta.get("scale") or 0.0)
        full = all(c in sp.columns for c in FULLRES_COLUMNS) and scale > 0
        if full:
            xy = sp[list(FULLRES_COLUMNS)].to_numpy(np.float64)
            full = bool(np.isfinite(xy).all())
        if not full:
            xy, scale = s.xy, 1.0
        xy_parts.append(xy)
        factors = dict(s.meta.get("scalefactors") or {}) if full else {}
        factors = {k: float(v) for k, v in factors.items() if k != "tissue_hires_scalef"}
        factors["tissue_hires_scalef"] = scale
        if "spot_diameter_fullres" not in factors and s.meta.get("spot_diameter_px"):
            factors["spot_diameter_fullres"] = float(s.meta["spot_diameter_px"]) / scale
        md: dict = {"source": s.source or ""}
        if s.um_per_px:
            md["um_per_px"] = float(s.um_per_px) * scale  # per full-resolution pixel
        spatial[library_key(s.slide_id)] = {"images": {"hires": s.image}, "scalefactors": factors, "metadata": md}
        block = np.full((s.n_spots, n_t), np.nan)
        if s.targets is not None and s.split == "train":
            block = np.asarray(s.targets, dtype=np.float64)
        elif s.meta.get("truth") is not None and list(s.meta.get("truth_names") or names) == names:
            block = np.asarray(s.meta["truth"], dtype=np.float64)
        blocks.append(block)
    obs = pd.concat(obs_parts, ignore_index=True)
    obs.index = pd.Index(obs_names(obs["slide"].to_numpy(), obs["spot_id"].to_numpy()))
    obs["slide"] = pd.Categorical(obs["slide"], categories=[s.slide_id for s in slides])
    obs["split"] = pd.Categorical(obs["split"], categories=["train", "test"])
    adata = ad.AnnData(X=np.concatenate(blocks) if n_t else np.zeros((len(obs), 0)), obs=obs,
                       var=pd.DataFrame(index=pd.Index([str(n) for n in names], dtype=str)))
    adata.obsm["spatial"] = np.concatenate(xy_parts)
    adata.uns["spatial"] = spatial
    adata.uns["hevisum"] = {"targets_kind": "values"}  # X holds targets as they are: never counts
    return adata


def _frame(x, role: str, which: str) -> pd.DataFrame:
    import pandas as pd

    if isinstance(x, pd.DataFrame):
        return x
    if isinstance(x, (str, Path)):
        p = Path(x)
        if p.suffix.lower() == ".h5ad":
            import anndata as ad

            if not p.is_file():
                raise HevisumError(f"{role} file not found: {p}")
            return _anndata_frame(ad.read_h5ad(p), which)
        from hevisum.metrics import _read_csv

        return _read_csv(p, "prediction" if which == "pred" else "truth")
    if _is_anndata(x):
        return _anndata_frame(x, which)
    raise HevisumError(f"{role}: expected a DataFrame (slide, ID, C1..Cn), a CSV or .h5ad path or an AnnData, got "
                       f"{type(x).__name__}")


def _anndata_frame(adata, which: str) -> pd.DataFrame:
    """slide, ID, target columns of an AnnData: predictions from ``X``; truth from ``layers['truth']`` when present
    (rows without truth left out), else ``X``. Columns are ``var['column']`` (C1..Cn) when present."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    m = adata.layers["truth"] if which == "truth" and "truth" in adata.layers else adata.X
    m = m.toarray() if sp.issparse(m) else np.asarray(m, dtype=np.float64)
    cols = adata.var["column"].astype(str).tolist() if "column" in adata.var else [str(v) for v in adata.var_names]
    df = pd.DataFrame(m, columns=cols)
    ids = adata.obs["ID"] if "ID" in adata.obs else (adata.obs["spot_id"] if "spot_id" in adata.obs
                                                      else pd.Series(adata.obs_names))
    df.insert(0, "ID", np.asarray(ids, dtype=str))
    slide = adata.obs["slide"] if "slide" in adata.obs else None
    if slide is not None:
        df.insert(0, "slide", np.asarray(slide, dtype=str))
    if which == "truth":
        df = df[np.isfinite(m).all(axis=1)].reset_index(drop=True)
    return df


def _name(x, role: str) -> str:
    return str(x) if isinstance(x, (str, Path)) else role
