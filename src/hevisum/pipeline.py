"""The main job, `hevisum run`: preprocess, cross-validate, ensemble, stack, predict, evaluate, report.

The run folder is built under a temporary name and renamed at the end, so a failed run leaves no
half-written folder. What it holds:

    config.toml            resolved configuration
    target_names.json      names of the target columns C1..Cn
    stain.json             the stain target fitted on the training slides
    prep/                  the preprocessing work folder (tile cache, qc.json, QC PNGs)
    models/<method>/fold_<slide>/   one fitted model per fold (safetensors + JSON)
    models/stacking/       the stacker fitted on out-of-fold predictions
    oof_<method>.csv       out-of-fold predictions of every training spot
    predictions.csv        slide, ID, C1..Cn for every test spot (the selected method)
    submission_<slide>.csv ID, C1..Cn in the competition format, every test spot in file order
    predictions.h5ad       predictions with spot coordinates and image, for scanpy/squidpy
    metrics.json           cross-validation (and test, when truth is known) metrics of every method
    report.html            figures: methods vs baselines, per-target bars, loss curves, spatial maps
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.config import RunConfig, dump_config, load_run_config
from hevisum.cv import (
    MethodCV,
    cross_validate_method,
    cross_validate_stacking,
    fit_targets,
    make_folds,
    stack_inputs,
    stack_test_inputs,
    summarise,
)
from hevisum.errors import HevisumError
from hevisum.io.atomic import atomic_dir, atomic_write_text
from hevisum.methods import FEATURE_OF
from hevisum.predict import prediction_frame, thumbnail, write_prediction_outputs

BASELINES = ("mean", "colour-ridge")


def say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[hevisum] {msg}", flush=True)


def method_list(cfg: RunConfig) -> list[str]:
    """Baselines first, then the configured methods, without repeats."""
    return list(dict.fromkeys([*BASELINES, *cfg.models.methods]))


def get_method_features(name: str, prep, cfg: RunConfig, device: str, progress: bool) -> np.ndarray | None:
    """The (cached) per-tile features a feature method reads, normalised as configured; None for tile methods."""
    from hevisum.features import cached_features

    kinds = FEATURE_OF.get(name)
    if not kinds:
        return None
    parts = []
    for kind in kinds:
        params: dict = {}
        if kind.startswith("effnet"):
            params = {"input_size": cfg.models.encoder_input, "tta": cfg.train.tta, "precision": cfg.train.precision}
        feats = cached_features(prep.workdir, prep.tiles, kind, device=device, progress=progress, **params)
        if cfg.models.feature_norm == "slide":
            feats = standardise_per_slide(feats, prep.spots["slide"].astype(str).to_numpy())
        parts.append(feats)
    feats = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    if cfg.train.coords:
        feats = np.concatenate([feats, slide_scaled_coords(prep.spots)], axis=1)
    return feats


def standardise_per_slide(X: np.ndarray, slides: np.ndarray) -> np.ndarray:
    """Z-score every feature within each slide. Uses no targets, so it is as legitimate on a test slide as on a
    training one, and it removes slide-wide offsets (stain, scanner, thickness) that do not carry over."""
    Z = np.empty(X.shape, dtype=np.float32)
    for s in dict.fromkeys(slides.tolist()):
        m = slides == s
        Z[m] = (X[m] - X[m].mean(axis=0)) / (X[m].std(axis=0) + 1e-6)
    return Z


def slide_scaled_coords(spots: pd.DataFrame) -> np.ndarray:
    """Spot (x, y) standardised within each slide (absolute positions mean nothing across slides)."""
    out = np.zeros((len(spots), 2), dtype=np.float32)
    for s, idx in spots.groupby("slide").indices.items():
        xy = spots.iloc[idx][["x", "y"]].to_numpy(dtype=np.float64)
        out[idx] = (xy - xy.mean(axis=0)) / (xy.std(axis=0) + 1e-6)
    return out


def maybe_smooth(pred: np.ndarray, rows: np.ndarray, prep, cfg: RunConfig) -> np.ndarray:
    if not cfg.smoothing.enabled or len(rows) == 0:
        return pred
    from hevisum.postprocess import smooth_predictions

    sp = prep.spots.iloc[rows]
    return smooth_predictions(pred, sp[["x", "y"]].to_numpy(float), sp["slide"].astype(str).to_numpy(),
                              sp["pitch_px"].to_numpy(float) * cfg.smoothing.sigma_pitches)


def run_pipeline(inputs: list[str] | None, out: Path, config_path: str | None = None, profile: str | None = None,
                 truth: str | None = None, seed: int | None = None, reader_kwargs: dict | None = None,
                 device: str = "auto", progress: bool = True) -> dict:
    """Run everything and return metrics.json's content. See the module docstring for the outputs."""
    from hevisum.preprocess.pipeline import preprocess
    from hevisum.training import resolve_device

    t_start = time.perf_counter()
    cfg = load_run_config(config_path, profile=profile, seed=seed)
    device = resolve_device(device)
    reader_kwargs = dict(reader_kwargs or {})
    if truth is not None and not Path(truth).is_file():
        raise HevisumError(f"truth file {truth!r} not found; expected a CSV with columns slide, ID, C1..Cn")
    out = Path(out)
    with atomic_dir(out) as tmp:
        # 1. Inputs (or the generated demo dataset).
        if inputs:
            from hevisum.io import read_inputs

            slides = read_inputs(inputs, **reader_kwargs)
        else:
            from hevisum.demo import DemoSpec, write_demo
            from hevisum.io.competition import read_competition_h5

            say("no input given: generating the demo dataset", progress)
            h5, truth_csv = write_demo(tmp / "data" / "demo.h5", DemoSpec(seed=cfg.seed))
            slides = read_competition_h5(h5)
            truth = truth or str(truth_csv)
        dump_config(cfg, tmp / "config.toml")
        # 2. Preprocess.
        say(f"preprocessing {len(slides)} slide(s)", progress)
        prep = preprocess(slides, cfg.preprocess_config(), tmp / "prep", progress=progress)
        thumbs = {s.slide_id: thumbnail(s.image) for s in slides}
        del slides
        say(prep.summary(), progress)
        target_names = list(prep.target_names)
        atomic_write_text(tmp / "target_names.json", json.dumps(target_names, indent=1))
        shutil.copyfile(prep.workdir / "stain.json", tmp / "stain.json")
        # 3. Cross-validate every method.
        folds = make_folds(prep.spots, seed=cfg.seed)
        truth_df = _truth_frame(truth, prep)
        if truth and len(folds.test_rows):
            # Check that the truth file names these test spots before any training, not after it.
            from hevisum.metrics import evaluate_frames

            probe = np.tile(np.arange(len(prep.target_names), dtype=np.float32), (len(folds.test_rows), 1))
            evaluate_frames(prediction_frame(prep.spots.iloc[folds.test_rows], probe), truth_df,
                            names=("the input's test spots (slide, ID)", str(truth)))
        Y_raw = np.asarray(prep.targets, dtype=np.float32)
        Y_fit = fit_targets(Y_raw, np.asarray(prep.ranks), cfg)
        Yr_train, Yf_train = Y_raw[folds.train_rows], Y_fit[folds.train_rows]
        results: list[MethodCV] = []
        summaries: dict[str, dict] = {}
        extra = None
        for name in method_list(cfg):
            t0 = time.perf_counter()
            say(f"cross-validating {name} over {len(folds.slide_ids)} folds", progress)
            feats = get_method_features(name, prep, cfg, device, progress)
            res = cross_validate_method(name, folds, Y_fit, Y_raw, cfg, features=feats, tiles=prep.tiles,
                                        extra=extra, device=device, progress=progress, seed=cfg.seed)
            res.oof = maybe_smooth(res.oof, folds.train_rows, prep, cfg)
            res.test_folds = [maybe_smooth(p, folds.test_rows, prep, cfg) for p in res.test_folds]
            results.append(res)
            summaries[name] = summarise(name, res.oof, Yr_train, res.fold_scores, target_names, Yf_train)
            summaries[name]["seconds"] = time.perf_counter() - t0
            say(f"{name}: CV per-spot Spearman {summaries[name]['cv_spot_spearman']:.4f}", progress)
            for fm, held in zip(res.models, folds.slide_ids):
                fm.save(tmp / "models" / name / f"fold_{held}")
            prediction_frame(prep.spots.iloc[folds.train_rows], res.oof).to_csv(tmp / f"oof_{name}.csv", index=False)
        test_preds = {r.name: r.test_ensemble for r in results}
        # 4. Stacking on out-of-fold predictions only.
        stack_methods = [r.name for r in results]
        if cfg.stacking.enabled and len(results) >= 2:
            say(f"stacking {len(results)} methods ({cfg.stacking.model}), nested leave-one-slide-out", progress)
            st = cross_validate_stacking(stack_inputs(results), Yf_train, Yr_train, folds.slides,
                                         stack_test_inputs(results) if len(folds.test_rows) else np.zeros((0, 0)),
                                         kind=cfg.stacking.model, seed=cfg.seed)
            summaries["stacking"] = summarise("stacking", st.oof, Yr_train, st.fold_scores, target_names, Yf_train)
            test_preds["stacking"] = st.test
            _save_stacker(st.final, cfg.stacking.model, stack_methods, tmp / "models" / "stacking")
            prediction_frame(prep.spots.iloc[folds.train_rows], st.oof).to_csv(tmp / "oof_stacking.csv", index=False)
        # 5. Select by cross-validation only (never by the test truth), predict the test slides. Baselines are
        # references, not candidates (the stacker sees them as inputs and can fall back on them).
        candidates = [k for k in summaries if k not in BASELINES] or list(summaries)
        best = max(candidates, key=lambda k: _nan_low(summaries[k]["cv_spot_spearman"]))
        say(f"selected {best} (best cross-validated per-spot Spearman)", progress)
        metrics: dict = {"selected": best, "profile": cfg.profile, "device": device, "seed": cfg.seed,
                         "methods": summaries, "folds": folds.slide_ids,
                         "n_train_spots": int(len(folds.train_rows)), "n_test_spots": int(len(folds.test_rows)),
                         "stack_methods": stack_methods}
        if len(folds.test_rows):
            write_prediction_outputs(tmp, prep.spots.iloc[folds.test_rows], test_preds[best], target_names, thumbs)
            for name, pred in test_preds.items():
                prediction_frame(prep.spots.iloc[folds.test_rows], pred).to_csv(tmp / f"test_{name}.csv", index=False)
            if truth_df is not None:
                from hevisum.metrics import evaluate_frames

                metrics["test"] = {name: evaluate_frames(prediction_frame(prep.spots.iloc[folds.test_rows], pred), truth_df,
                                                         names=(f"test predictions of {name}", str(truth)))
                                   for name, pred in test_preds.items()}
                _add_fit_space_mse(metrics["test"], test_preds, truth_df, prep.spots.iloc[folds.test_rows], cfg)
                say(f"test per-spot Spearman of {best}: {metrics['test'][best]['overall']['spot_spearman']:.4f}",
                    progress)
        else:
            say("no test slides: cross-validation only", progress)
        metrics["seconds"] = time.perf_counter() - t_start
        atomic_write_text(tmp / "metrics.json", json.dumps(_json_safe(metrics), indent=2))
        # 6. Report.
        from hevisum.report.html import write_report

        write_report(tmp, prep, metrics, results, folds, test_preds, target_names)
    say(f"done in {time.perf_counter() - t_start:.0f} s: {out}/report.html", progress)
    return metrics


def _add_fit_space_mse(test: dict, preds: dict, truth_df: pd.DataFrame, spots: pd.DataFrame, cfg: RunConfig) -> None:
    """``mse_fit_space``: each method's test MSE against the truth put in the space the models were fitted in
    (per-spot ranks scaled 0..1 by default); the plain ``mse`` beside it compares with the raw values, which only
    means something for ``train.target = "raw"``."""
    from hevisum.metrics import mse
    from hevisum.preprocess.targets import rank_targets

    keys = pd.MultiIndex.from_arrays([spots["slide"].astype(str), spots["spot_id"].astype(str)])
    cols = [f"C{i + 1}" for i in range(next(iter(preds.values())).shape[1])]  # as in prediction_frame
    # a truth file without a slide column covers the one test slide (evaluate_frames has already checked that)
    slide = truth_df["slide"].astype(str) if "slide" in truth_df else str(spots["slide"].iloc[0])
    t = truth_df.assign(slide=slide, ID=truth_df["ID"].astype(str)).set_index(["slide", "ID"])
    T = t.loc[keys, cols].to_numpy(np.float64)
    T_fit = fit_targets(T, rank_targets(T, cfg.targets.tie_tol), cfg)
    for name, pred in preds.items():
        test[name]["overall"]["mse_fit_space"] = mse(pred, T_fit)


def _truth_frame(truth: str | None, prep) -> pd.DataFrame | None:
    if truth:
        return pd.read_csv(truth)  # existence checked before any work started
    p = prep.workdir / "test_truth.csv"
    return pd.read_csv(p) if p.is_file() else None


def _nan_low(v) -> float:
    return -np.inf if v is None or not np.isfinite(v) else float(v)


def _save_stacker(stacker, kind: str, methods: list[str], folder: Path) -> None:
    from hevisum.methods import FittedMethod

    params = stacker.params() if kind == "mlp" else {}
    FittedMethod(f"stacking-{kind}", [], {"methods": methods, **params}, stacker.state()).save(folder)


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj
