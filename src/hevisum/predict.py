"""Prediction from a finished run folder alone: `hevisum predict RUN_DIR INPUT --out DIR`.

The run folder carries everything needed: the resolved config, the stain target, the target names,
every fold model (safetensors + JSON describing itself) and the stacker. Nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.errors import HevisumError
from hevisum.outputs import prediction_frame, run_info, slide_images, write_prediction_outputs


def load_run(run_dir: Path) -> dict:
    """Read what a run folder needs for prediction; clear errors when something is missing or damaged."""
    from hevisum.config import load_run_config

    run_dir = Path(run_dir)
    need = ["config.toml", "metrics.json", "target_names.json", "stain.json", "models"]
    missing = [n for n in need if not (run_dir / n).exists()]
    if missing:
        raise HevisumError(f"{run_dir}: not a finished hevisum run folder (missing {', '.join(missing)}); "
                           "point RUN_DIR at the --out folder of 'hevisum run'")
    out = {"cfg": load_run_config(run_dir / "config.toml")}
    for key, name in (("metrics", "metrics.json"), ("target_names", "target_names.json"), ("stain", "stain.json")):
        try:
            out[key] = json.loads((run_dir / name).read_text())
        except (ValueError, OSError) as e:
            raise HevisumError(f"{run_dir / name}: damaged ({e}); run 'hevisum run' again") from None
    if not isinstance(out["metrics"], dict) or "selected" not in out["metrics"]:
        raise HevisumError(f"{run_dir / 'metrics.json'}: damaged (no 'selected' method); run 'hevisum run' again")
    return out


def predict_method(run_dir: Path, name: str, prep, store, ctx, progress: bool) -> np.ndarray:
    """Rank-average of the fold models of one method over every spot of ``prep``, each smoothed first (as in
    `hevisum run`)."""
    from hevisum.cv import rank_average
    from hevisum.pipeline import fold_models
    from hevisum.postprocess import smooth_rows

    rows = np.arange(len(prep.spots))
    models = fold_models(run_dir, name)
    X = store.for_method(models[0].method)
    preds = [lm.method.predict(X, rows=rows, ctx=ctx) for lm in models]
    return rank_average([smooth_rows(p, rows, prep.spots, ctx.cfg) for p in preds])


def predict_from_run(run_dir: Path, input_path: str, out: Path, reader_kwargs: dict | None = None,
                     progress: bool = True, device: str = "auto", force: bool = False) -> pd.DataFrame:
    """Predict every spot of every slide in ``input_path`` with the run's selected method."""
    from hevisum.io import read_inputs
    from hevisum.io.atomic import atomic_dir
    from hevisum.methods import FitContext, load_model, stacker_name
    from hevisum.pipeline import feature_store, preprocess_stage
    from hevisum.preprocess.stain import StainTarget
    from hevisum.training import resolve_device

    run_dir = Path(run_dir)
    run = load_run(run_dir)
    cfg, metrics, names = run["cfg"], run["metrics"], run["target_names"]
    device = resolve_device(device)
    best = metrics["selected"]
    stacked = best == stacker_name()
    methods = list(metrics.get("stack_methods") or []) if stacked else [best]
    if stacked and not methods:
        raise HevisumError(f"{run_dir / 'metrics.json'}: the stacker is selected but no stacked methods are listed")
    with atomic_dir(Path(out), force=force, protect=[run_dir, Path(input_path)], kind="predict") as tmp:
        slides = read_inputs([input_path], **(reader_kwargs or {}))
        thumbs = {s.slide_id: slide_images(s) for s in slides}
        prep = preprocess_stage(slides, cfg, tmp / "prep", methods, progress,
                                stain_target=StainTarget.from_dict(run["stain"]), keep_all_spots=True)
        del slides
        store = feature_store(prep, cfg, device, progress)
        ctx = FitContext(cfg=cfg, tiles=prep.tiles, device=device, seed=cfg.seed, progress=progress)
        per = [predict_method(run_dir, m, prep, store, ctx, progress) for m in methods]
        if stacked:
            # Same inputs as at training time: each method's rank-average over its fold models.
            st = load_model(run_dir / "models" / stacker_name()).method
            pred = st.predict(np.concatenate(per, axis=1), rows=np.arange(len(prep.spots)), ctx=ctx)
        else:
            pred = per[0]
        pred = np.asarray(pred, dtype=np.float32)
        write_prediction_outputs(tmp, prep.spots, pred, names, thumbs, info=run_info(cfg, best))
        df = prediction_frame(prep.spots, pred)
    if progress:
        print(f"[hevisum] wrote {out}: {len(df)} spots predicted with {best}")
    return df
