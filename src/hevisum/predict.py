"""Prediction from a finished run folder alone: `hevisum predict RUN_DIR INPUT --out DIR`.

The run folder carries everything needed: the resolved config, the stain target, the target names,
every fold model (safetensors + JSON) and the stacker. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.errors import HevisumError


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
        sub.to_csv(folder / f"submission_{slide}.csv", index=False)
    predictions_to_h5ad(spots, pred, target_names, folder / "predictions.h5ad", thumbnails)


def prediction_frame(spots: pd.DataFrame, pred: np.ndarray) -> pd.DataFrame:
    """slide, ID, C1..Cn for the given spots (rows of a prepared spots table) and predictions."""
    df = pd.DataFrame(np.asarray(pred, dtype=np.float32), columns=[f"C{i + 1}" for i in range(pred.shape[1])])
    df.insert(0, "ID", spots["spot_id"].astype(str).to_numpy())
    df.insert(0, "slide", spots["slide"].astype(str).to_numpy())
    return df


def load_run(run_dir: Path) -> dict:
    """Read what a run folder needs for prediction; clear errors when something is missing."""
    from hevisum.config import load_run_config

    run_dir = Path(run_dir)
    need = ["config.toml", "metrics.json", "target_names.json", "stain.json", "models"]
    missing = [n for n in need if not (run_dir / n).exists()]
    if missing:
        raise HevisumError(f"{run_dir}: not a finished hevisum run folder (missing {', '.join(missing)}); "
                           "point RUN_DIR at the --out folder of 'hevisum run'")
    return {"cfg": load_run_config(run_dir / "config.toml"),
            "metrics": json.loads((run_dir / "metrics.json").read_text()),
            "target_names": json.loads((run_dir / "target_names.json").read_text()),
            "stain": json.loads((run_dir / "stain.json").read_text())}


def predict_method(run_dir: Path, name: str, prep, cfg, n_outputs: int, device: str, progress: bool) -> np.ndarray:
    """Rank-average of the fold models of one method over every spot of ``prep``."""
    from hevisum.cv import rank_average
    from hevisum.methods import FittedMethod, network_from_fitted, predict_feature_method
    from hevisum.pipeline import get_method_features

    folders = sorted((run_dir / "models" / name).glob("fold_*"))
    if not folders:
        raise HevisumError(f"{run_dir}: no fold models for method {name!r} under models/{name}/")
    rows = np.arange(len(prep.spots))
    feats = get_method_features(name, prep, cfg, device, progress)
    preds = []
    for f in folders:
        fm = FittedMethod.load(f)
        if name in ("hevisum-cnn", "effnet-finetune"):
            from hevisum.training import predict_tiles

            net = network_from_fitted(fm, n_outputs)
            preds.append(predict_tiles(net, prep.tiles, rows, device=device, precision=cfg.train.precision,
                                       tta=cfg.train.tta, progress=progress, desc=f"{name} {f.name}"))
        else:
            preds.append(predict_feature_method(fm, feats, len(rows)))
    from hevisum.pipeline import maybe_smooth

    # As in `hevisum run`: smooth each fold model's predictions, then rank-average them.
    return rank_average([maybe_smooth(p, rows, prep, cfg) for p in preds])


def predict_from_run(run_dir: Path, input_path: str, out: Path, reader_kwargs: dict | None = None,
                     progress: bool = True, device: str = "auto") -> pd.DataFrame:
    """Predict every spot of every slide in ``input_path`` with the run's selected method."""
    from hevisum.io import read_inputs
    from hevisum.io.atomic import atomic_dir
    from hevisum.preprocess.pipeline import preprocess
    from hevisum.preprocess.stain import StainTarget
    from hevisum.training import resolve_device

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    cfg, metrics, names = run["cfg"], run["metrics"], run["target_names"]
    device = resolve_device(device)
    slides = read_inputs([input_path], **(reader_kwargs or {}))
    thumbs = {s.slide_id: thumbnail(s.image) for s in slides}
    best = metrics["selected"]
    with atomic_dir(Path(out)) as tmp:
        prep = preprocess(slides, cfg.preprocess_config(), tmp / "prep", progress=progress,
                          stain_target=StainTarget.from_dict(run["stain"]), keep_all_spots=True)
        del slides
        if best == "stacking":
            methods = metrics["stack_methods"]
            # Same inputs as at training time: each method's rank-average over its fold models.
            per = [predict_method(run_dir, m, prep, cfg, len(names), device, progress) for m in methods]
            X = np.concatenate(per, axis=1)
            pred = load_stacker(run_dir / "models" / "stacking", cfg).predict(X)
        else:
            pred = predict_method(run_dir, best, prep, cfg, len(names), device, progress)
        pred = np.asarray(pred, dtype=np.float32)
        write_prediction_outputs(tmp, prep.spots, pred, names, thumbs)
        df = prediction_frame(prep.spots, pred)
    if progress:
        print(f"[hevisum] wrote {out}: {len(df)} spots predicted with {best}")
    return df


def load_stacker(folder: Path, cfg):
    """The saved stacker, ready to predict."""
    from hevisum.methods import FittedMethod
    from hevisum.models.baselines import RidgeHead

    fm = FittedMethod.load(folder)
    if fm.name == "stacking-ridge":
        return RidgeHead.from_state(fm.tensors)
    from hevisum.models.stacking import load_stacker_state

    return load_stacker_state(fm.params, fm.tensors)
