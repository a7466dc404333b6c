"""What a run or a prediction writes for the user: predictions.csv, submission_<slide>.csv, predictions.h5ad."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.names import safe_name


def thumbnail(image: np.ndarray, max_side: int = 1000) -> tuple[np.ndarray, float]:
    """A downsampled copy of an image for plots and .h5ad files, and the scale factor applied."""
    h, w = image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f >= 1.0:
        return image, 1.0
    step = int(np.ceil(1 / f))
    small = image[::step, ::step]
    return np.ascontiguousarray(small), 1.0 / step


def predictions_to_h5ad(spots: pd.DataFrame, pred: np.ndarray, target_names: list[str], path: Path,
                        thumbnails: dict[str, tuple[np.ndarray, float]] | None = None) -> None:
    """Write predictions as AnnData: X = predictions, obsm['spatial'] = spot (x, y) in image pixels and,
    when thumbnails are given, uns['spatial'][slide] with the image and scale factors (the scanpy/squidpy
    convention, so ``sc.pl.spatial(adata, library_id=slide, color=target)`` plots it)."""
    import anndata as ad

    from hevisum.io.atomic import atomic_path

    obs = pd.DataFrame({"slide": spots["slide"].astype(str).to_numpy(), "ID": spots["spot_id"].astype(str).to_numpy()})
    obs.index = (obs["slide"] + ":" + obs["ID"]).to_numpy()
    var = pd.DataFrame(index=pd.Index([str(n) for n in target_names]))
    var["column"] = [f"C{i + 1}" for i in range(len(target_names))]
    if var.index.duplicated().any():
        var.index = var["column"].to_numpy()
    adata = ad.AnnData(X=np.asarray(pred, dtype=np.float32), obs=obs, var=var)
    adata.obsm["spatial"] = spots[["x", "y"]].to_numpy(dtype=np.float64)
    if thumbnails:
        spatial = {}
        for slide in obs["slide"].unique():
            if slide not in thumbnails:
                continue
            img, scale = thumbnails[slide]
            pitch = float(spots.loc[spots["slide"].astype(str) == slide, "pitch_px"].median()) if "pitch_px" in spots else 50.0
            spatial[slide] = {"images": {"hires": img},
                              "scalefactors": {"tissue_hires_scalef": float(scale),
                                               "spot_diameter_fullres": 0.5 * pitch}}
        adata.uns["spatial"] = spatial
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp)


def write_prediction_outputs(folder: Path, spots: pd.DataFrame, pred: np.ndarray, target_names: list[str],
                             thumbnails: dict | None = None) -> None:
    """predictions.csv (slide, ID, C1..Cn), submission_<slide>.csv (ID, C1..Cn, file order), predictions.h5ad."""
    df = prediction_frame(spots, pred)
    df.to_csv(folder / "predictions.csv", index=False)
    for slide, sub in df.groupby("slide", sort=False):
        sub = sub.drop(columns="slide")
        if sub["ID"].str.fullmatch(r"\d+").all():  # competition IDs are row numbers: file order
            sub = sub.assign(ID=sub["ID"].astype(int)).sort_values("ID", kind="stable")
        sub.to_csv(folder / f"submission_{safe_name(slide)}.csv", index=False)
    predictions_to_h5ad(spots, pred, target_names, folder / "predictions.h5ad", thumbnails)


def prediction_frame(spots: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """slide, ID, C1..Cn for the given spots (rows of a prepared spots table) and predictions."""
    df = pd.DataFrame(np.asarray(pred, dtype=np.float32), columns=[f"C{i + 1}" for i in range(pred.shape[1])])
    df.insert(0, "ID", spots["spot_id"].astype(str).to_numpy())
    df.insert(0, "slide", spots["slide"].astype(str).to_numpy())
    return df
