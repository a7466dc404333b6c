"""The main job, `hevisum run`: a sequence of stages, each returning a typed result.

    read -> preprocess -> targets and folds -> cross-validate every method -> stack -> select -> test -> report

The run folder is built in ``OUT.partial/`` and moved onto ``OUT`` at the end (see :mod:`hevisum.io.atomic`),
so a failed run leaves no half-written folder. What it holds:

    config.toml            resolved configuration
    target_names.json      names of the target columns C1..Cn
    stain.json             the stain target fitted on the training slides
    prep/                  the preprocessing work folder (tile caches, feature cache, qc.json, QC PNGs)
    models/<method>/fold_<slide>/   one fitted model per fold (safetensors + JSON describing itself)
    models/stacking/       the stacker fitted on out-of-fold predictions
    oof_<method>.csv       out-of-fold predictions of every training spot
    predictions.csv        slide, ID, C1..Cn for every test spot (the selected method)
    submission_<slide>.csv ID, C1..Cn in the competition format, every test spot in file order
    predictions.h5ad       predictions with spot coordinates and image, for scanpy/squidpy
    metrics.json           cross-validation (and test, when truth is known) metrics of every method
    report.html            figures: methods vs baselines, per-target bars, loss curves, spatial maps
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hevisum.config import RunConfig, dump_config, load_run_config, to_dict
from hevisum.cv import (
    Folds,
    MethodCV,
    Selection,
    StackCV,
    cross_validate_method,
    cross_validate_stacking,
    fit_targets,
    make_folds,
    select_method,
    stack_inputs,
    stack_test_inputs,
    summarise,
)
from hevisum.errors import HevisumError
from hevisum.io.atomic import atomic_write_text
from hevisum.methods import (
    FitContext,
    baseline_names,
    canonical_name,
    default_methods,
    get_method,
    load_model,
    stacker_name,
)
from hevisum.methods.base import _json_safe
from hevisum.names import safe_name
from hevisum.outputs import prediction_frame, slide_images, write_prediction_outputs
from hevisum.postprocess import smooth_rows

log = logging.getLogger("hevisum")


def say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[hevisum] {msg}", flush=True)


# ------------------------------------------------------------------------------------------- typed results


@dataclass
class Targets:
    raw: np.ndarray  # (N, T) per tile-cache row, NaN for test spots
    fit: np.ndarray  # what the models are fitted to (per-spot ranks 0..1 by default)
    names: list[str]


@dataclass
class CVResult:
    folds: Folds
    results: list[MethodCV]
    summaries: dict[str, dict]
    stack: StackCV | None
    selection: Selection
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class TestResult:
    preds: dict[str, np.ndarray]  # method -> (n_test, T), every method and the stacker
    metrics: dict | None  # method -> evaluate_frames output, when truth is known


@dataclass
class RunResult:
    """What `hevisum run` produced; ``metrics`` is metrics.json's content."""

    out: Path
    cfg: RunConfig
    prep: object
    targets: Targets
    cv: CVResult
    test: TestResult
    metrics: dict
    thumbs: dict


# ------------------------------------------------------------------------------------------- stages


def resolve_methods(cfg: RunConfig) -> list[str]:
    """Baselines first, then the configured methods (registered names, aliases resolved), without repeats."""
    names = [canonical_name(m) for m in cfg.models.methods] or default_methods(cfg.profile)
    for m in names:
        get_method(m)  # a clear error for an unknown name
    if stacker_name() in names:
        raise HevisumError(f"models.methods lists {stacker_name()!r}; stacking is switched by [stacking] enabled")
    return list(dict.fromkeys([*baseline_names(), *names]))


def tile_geometries(cfg: RunConfig, methods: list[str]) -> list:
    """The extra tile caches the methods' features need beside the spot tiles."""
    from hevisum.preprocess.tiles import TileGeometry

    specs = [s for m in methods for s in get_method(m)(cfg).features()]
    geoms = []
    if cfg.features.tiles == "tissue" and any(s.source == "encoder" for s in specs):
        geoms.append(TileGeometry("tissue", fov_um=_tissue_fov(cfg), size=_encoder_px(cfg)))
    if any(s.geometry == "wide" for s in specs):
        geoms.append(TileGeometry("wide", scale=cfg.features.wide_scale, size=cfg.tiles.size))
    return geoms


def _encoder_px(cfg: RunConfig) -> int:
    from hevisum.encoders import get_preset

    return int(cfg.encoder.input_px or get_preset(cfg.encoder.name).input_px)


def _tissue_fov(cfg: RunConfig) -> float:
    from hevisum.encoders import get_preset

    if cfg.features.tissue_fov_um > 0:
        return float(cfg.features.tissue_fov_um)
    p = get_preset(cfg.encoder.name)
    return float(p.input_px * p.um_per_px) if p.um_per_px else 112.0


def read_stage(inputs: list[str] | None, reader_kwargs: dict, tmp: Path, cfg: RunConfig, truth: str | None,
               progress: bool) -> tuple[list, str | None]:
    """The input slides (or the generated demo dataset) and the truth file to score the test slides with."""
    if inputs:
        from hevisum.io import read_inputs

        return read_inputs(inputs, **reader_kwargs), truth
    from hevisum.demo import DemoSpec, write_demo
    from hevisum.io.competition import read_competition_h5

    say("no input given: generating the demo dataset", progress)
    h5, truth_csv = write_demo(tmp / "data" / "demo.h5", DemoSpec(seed=cfg.seed))
    return read_competition_h5(h5), truth or str(truth_csv)


def preprocess_stage(slides: list, cfg: RunConfig, workdir: Path, methods: list[str], progress: bool,
                     resume: bool = False, stain_target=None, keep_all_spots: bool = False):
    """Preprocess (or, with ``resume``, reuse a finished work folder made from the same inputs and config)."""
    from hevisum.preprocess.pipeline import load_prepared, preprocess

    geoms = tile_geometries(cfg, methods)
    digest = _digest({"config": to_dict(cfg.preprocess_config()), "geometries": [g.as_dict() for g in geoms],
                      "inputs": [_slide_digest(s) for s in slides], "keep_all": keep_all_spots})
    stamp = workdir / "inputs.digest"
    if resume and stamp.is_file() and stamp.read_text() == digest:
        say("resume: reusing the preprocessed work folder (same inputs and config)", progress)
        return load_prepared(workdir)
    if resume and workdir.exists():
        say("resume: inputs or preprocessing config changed, preprocessing again", progress)
    if workdir.exists():
        shutil.rmtree(workdir)
    prep = preprocess(slides, cfg.preprocess_config(), workdir, progress=progress, geometries=geoms,
                      stain_target=stain_target, keep_all_spots=keep_all_spots)
    atomic_write_text(stamp, digest)
    return prep


def targets_stage(prep, cfg: RunConfig) -> Targets:
    raw = np.asarray(prep.targets, dtype=np.float32)
    return Targets(raw=raw, fit=fit_targets(raw, np.asarray(prep.ranks), cfg), names=list(prep.target_names))


def feature_store(prep, cfg: RunConfig, device: str, progress: bool):
    """The features of a preprocessed work folder (see :meth:`hevisum.features.FeatureStore.for_prep`)."""
    from hevisum.features import FeatureStore

    return FeatureStore.for_prep(prep, cfg, device, progress)


def cross_validate_stage(prep, targets: Targets, methods: list[str], cfg: RunConfig, out: Path, device: str,
                         progress: bool, resume: bool = False, folds: Folds | None = None) -> CVResult:
    """Leave-one-slide-out for every method; fold models saved as they finish (and reused on resume). Under torchrun
    the folds may be spread over the ranks (see :func:`hevisum.cv.cross_validate_method`)."""
    from hevisum import distributed

    folds = folds if folds is not None else make_folds(prep.spots, seed=cfg.seed)
    store = feature_store(prep, cfg, device, progress)
    ctx = FitContext(cfg=cfg, tiles=prep.tiles, Y_fit=targets.fit, Y_raw=targets.raw, device=device, seed=cfg.seed,
                     progress=progress)
    Yr, Yf = targets.raw[folds.train_rows], targets.fit[folds.train_rows]
    results, summaries, seconds = [], {}, {}
    for name in methods:
        t0 = time.perf_counter()
        spread = distributed.spread_folds(len(folds.slide_ids))
        say(f"cross-validating {name} over {len(folds.slide_ids)} folds"
            f"{f' (spread over {distributed.world()} processes)' if spread else ''}", progress)
        X = store.for_method(get_method(name)(cfg))
        res = cross_validate_method(name, folds, targets.fit, cfg, ctx, features=X,
                                    fold_dir=lambda held, n=name: out / "models" / n / f"fold_{safe_name(held)}",
                                    target_names=targets.names, resume=resume,
                                    on_reuse=lambda held, n=name: say(f"resume: reusing {n} fold {held}", progress))
        # one set of predictions: smoothed, then scored overall and per fold
        res.oof = smooth_rows(res.oof, folds.train_rows, prep.spots, cfg)
        res.test_folds = [smooth_rows(p, folds.test_rows, prep.spots, cfg) for p in res.test_folds]
        results.append(res)
        summaries[name] = summarise(name, res.oof, Yr, folds.slides, targets.names, Yf)
        seconds[name] = summaries[name]["seconds"] = time.perf_counter() - t0
        say(f"{name}: CV per-spot Spearman {_fmt(summaries[name]['cv_spot_spearman'])}", progress)
        prediction_frame(prep.spots.iloc[folds.train_rows], res.oof).to_csv(out / f"oof_{name}.csv", index=False)
    stack = None
    stacker = stacker_name()
    if cfg.stacking.enabled and len(results) >= 2:
        say(f"stacking {len(results)} methods ({cfg.stacking.model}), nested leave-one-slide-out", progress)
        stack = cross_validate_stacking(stack_inputs(results), Yf, folds.slides,
                                        stack_test_inputs(results) if len(folds.test_rows) else np.zeros((0, 0)),
                                        cfg, [r.name for r in results], seed=cfg.seed)
        summaries[stacker] = summarise(stacker, stack.oof, Yr, folds.slides, targets.names, Yf)
        stack.final.save(out / "models" / stacker, train_slides=folds.slide_ids, target_names=targets.names)
        prediction_frame(prep.spots.iloc[folds.train_rows], stack.oof).to_csv(out / f"oof_{stacker}.csv",
                                                                              index=False)
    selection = select_method(summaries, baseline_names(), stacker if stack is not None else None)
    return CVResult(folds=folds, results=results, summaries=summaries, stack=stack, selection=selection,
                    seconds=seconds)


def test_stage(prep, cv: CVResult, targets: Targets, cfg: RunConfig, truth_df: pd.DataFrame | None,
               truth_name: str, out: Path, thumbs: dict) -> TestResult:
    """Predict the test slides with every method; write the selected one's outputs (test spots and the
    out-of-fold predictions of the training spots); score when truth is known."""
    from hevisum.outputs import run_info, truth_rows

    folds = cv.folds
    preds = {r.name: r.test_ensemble for r in cv.results}
    if cv.stack is not None:
        preds[stacker_name()] = cv.stack.test
    selected = cv.selection.selected
    oof = cv.stack.oof if cv.stack is not None and selected == stacker_name() else \
        next(r.oof for r in cv.results if r.name == selected)
    n_t = len(targets.names)
    rows = np.concatenate([folds.test_rows, folds.train_rows])
    order = np.argsort(rows, kind="stable")  # tile order
    spots = prep.spots.iloc[folds.test_rows]
    test_pred = preds[selected] if len(folds.test_rows) else np.zeros((0, n_t), np.float32)
    write_prediction_outputs(
        out, prep.spots.iloc[rows[order]], np.concatenate([test_pred, oof])[order], targets.names, thumbs,
        split=np.array(["test"] * len(folds.test_rows) + ["train_oof"] * len(folds.train_rows))[order],
        truth=np.concatenate([truth_rows(spots, truth_df, n_t), targets.raw[folds.train_rows]])[order],
        info=run_info(cfg, selected))
    if not len(folds.test_rows):
        return TestResult(preds={}, metrics=None)
    for name, pred in preds.items():
        prediction_frame(spots, pred).to_csv(out / f"test_{name}.csv", index=False)
    metrics = None
    if truth_df is not None:
        from hevisum.metrics import evaluate_frames

        metrics = {name: evaluate_frames(prediction_frame(spots, pred), truth_df,
                                         names=(f"test predictions of {name}", truth_name))
                   for name, pred in preds.items()}
        _add_fit_space_mse(metrics, preds, truth_df, spots, cfg)
    return TestResult(preds=preds, metrics=metrics)


# ------------------------------------------------------------------------------------------- the run


def run_pipeline(inputs: list[str] | None, out: Path, config_path: str | None = None, profile: str | None = None,
                 truth: str | None = None, seed: int | None = None, reader_kwargs: dict | None = None,
                 device: str = "auto", progress: bool = True, overrides: dict | None = None, force: bool = False,
                 resume: bool = False) -> dict:
    """Run everything and return metrics.json's content (see :func:`run` for the typed result)."""
    return run(inputs, out, config_path=config_path, profile=profile, truth=truth, seed=seed,
               reader_kwargs=reader_kwargs, device=device, progress=progress, overrides=overrides, force=force,
               resume=resume).metrics


def run(inputs: list[str] | None, out: Path, *, config_path: str | None = None, profile: str | None = None,
        truth: str | None = None, seed: int | None = None, reader_kwargs: dict | None = None, device: str = "auto",
        progress: bool = True, overrides: dict | None = None, force: bool = False, resume: bool = False) -> RunResult:
    """Run every stage and write the run folder ``out``."""
    from hevisum import distributed
    from hevisum.training import resolve_device

    t_start = time.perf_counter()
    cfg = load_run_config(config_path, profile=profile, seed=seed, overrides=overrides)
    methods = resolve_methods(cfg)
    device = resolve_device(device)
    if distributed.init_from_env(device):  # started by torchrun: only rank 0 reports progress and writes OUT
        device, progress = distributed.rank_device(device), progress and distributed.is_main()
    if any(s.source == "encoder" for m in methods for s in get_method(m)(cfg).features()):
        from hevisum.features import load_configured_encoder

        load_configured_encoder(cfg, device)  # a missing or wrong weight file stops the run before any work
    if truth is not None and not Path(truth).is_file():
        raise HevisumError(f"truth file {truth!r} not found; expected a CSV with columns slide, ID, C1..Cn")
    out = Path(out)
    protect = ([Path(p) for p in (inputs or [])] + ([Path(truth)] if truth else [])
               + ([Path(config_path)] if config_path else []))
    with distributed.run_folder(out, force=force, resume=resume, protect=protect, kind="run") as tmp:
        slides, truth = read_stage(inputs, dict(reader_kwargs or {}), tmp, cfg, truth, progress)
        dump_config(cfg, tmp / "config.toml")
        say(f"preprocessing {len(slides)} slide(s)", progress)
        prep = preprocess_stage(slides, cfg, tmp / "prep", methods, progress, resume=resume)
        thumbs = {s.slide_id: slide_images(s) for s in slides}
        del slides
        say(prep.summary(), progress)
        targets = targets_stage(prep, cfg)
        atomic_write_text(tmp / "target_names.json", json.dumps(targets.names, indent=1))
        shutil.copyfile(prep.workdir / "stain.json", tmp / "stain.json")
        truth_df = _truth_frame(truth, prep)
        folds = make_folds(prep.spots, seed=cfg.seed)
        if truth and len(folds.test_rows):
            _check_truth(prep, folds, truth_df, truth)
        cv = cross_validate_stage(prep, targets, methods, cfg, tmp, device, progress, resume=resume, folds=folds)
        sel = cv.selection
        say(f"selected {sel.selected} (best cross-validated per-spot Spearman"
            f"{'' if sel.selected != stacker_name() else ', stacker beats the best single method beyond fold noise'})",
            progress)
        for w in sel.warnings:
            say(f"warning: {w}", distributed.is_main())
        test = test_stage(prep, cv, targets, cfg, truth_df, str(truth), tmp, thumbs)
        metrics: dict = {"selected": sel.selected, "selection": sel.as_dict(), "profile": cfg.profile,
                         "device": device, "seed": cfg.seed, "encoder": cfg.encoder.name, "methods": cv.summaries,
                         "folds": cv.folds.slide_ids, "n_train_spots": int(len(cv.folds.train_rows)),
                         "n_test_spots": int(len(cv.folds.test_rows)),
                         "stack_methods": [r.name for r in cv.results] if cv.stack is not None else []}
        if test.metrics is not None:
            metrics["test"] = test.metrics
            say(f"test per-spot Spearman of {sel.selected}: "
                f"{_fmt(test.metrics[sel.selected]['overall']['spot_spearman'])}", progress)
        elif not len(cv.folds.test_rows):
            say("no test slides: cross-validation only", progress)
        metrics["seconds"] = time.perf_counter() - t_start
        atomic_write_text(tmp / "metrics.json", json.dumps(_json_safe(metrics), indent=2))
        result = RunResult(out=out, cfg=cfg, prep=prep, targets=targets, cv=cv, test=test, metrics=metrics,
                           thumbs=thumbs)
        from hevisum.outputs import format_written
        from hevisum.report.html import write_report

        if distributed.is_main():  # the other ranks' folders are scratch; rank 0 reports alone
            with distributed.local():
                write_report(tmp, result)  # adds the embedding QC to metrics
        atomic_write_text(tmp / "metrics.json", json.dumps(_json_safe(metrics), indent=2))
        say(format_written(tmp, out), progress)
    say(f"done in {time.perf_counter() - t_start:.0f} s: {out}/report.html", progress)
    return result


# ------------------------------------------------------------------------------------------- helpers


def _fmt(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.4f}"


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(_json_safe(obj), sort_keys=True, default=str).encode()).hexdigest()


def _slide_digest(s) -> str:
    """A fingerprint of a slide's content: id, split, image (sampled), spots and targets."""
    h = hashlib.sha1()
    h.update(f"{s.slide_id}|{s.split}|{s.um_per_px}|{s.image.shape}".encode())
    img = np.asarray(s.image)
    h.update(np.ascontiguousarray(img[:: max(1, img.shape[0] // 64), :: max(1, img.shape[1] // 64)]).tobytes())
    level0 = (s.meta or {}).get("level0")
    if isinstance(level0, dict):  # tiles come from this file: its identity and the map onto the working image
        st = Path(level0["path"]).stat()
        h.update(json.dumps({**level0, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, sort_keys=True,
                            default=str).encode())
    h.update(pd.util.hash_pandas_object(s.spots.astype(str), index=False).to_numpy().tobytes())
    if s.targets is not None:
        h.update(np.ascontiguousarray(np.asarray(s.targets, dtype=np.float64)).tobytes())
    return h.hexdigest()


def _check_truth(prep, folds: Folds, truth_df, truth: str) -> None:
    """Check that the truth file names these test spots before any training, not after it."""
    from hevisum.metrics import evaluate_frames

    probe = np.tile(np.arange(len(prep.target_names), dtype=np.float32), (len(folds.test_rows), 1))
    evaluate_frames(prediction_frame(prep.spots.iloc[folds.test_rows], probe), truth_df,
                    names=("the input's test spots (slide, ID)", str(truth)))


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
    known = keys.isin(t.index)  # only the test spots the truth file covers
    T = t.loc[keys[known], cols].to_numpy(np.float64)
    T_fit = fit_targets(T, rank_targets(T, cfg.targets.tie_tol), cfg)
    for name, pred in preds.items():
        test[name]["overall"]["mse_fit_space"] = mse(np.asarray(pred)[known], T_fit)


def _truth_frame(truth: str | None, prep) -> pd.DataFrame | None:
    if truth:
        return pd.read_csv(truth)  # existence checked before any work started
    p = prep.workdir / "test_truth.csv"
    return pd.read_csv(p) if p.is_file() else None


def fold_models(run_dir: Path, name: str) -> list:
    """The saved fold models of one method of a run folder (see :func:`hevisum.methods.load_model`)."""
    folders = sorted((Path(run_dir) / "models" / name).glob("fold_*"))
    if not folders:
        raise HevisumError(f"{run_dir}: no fold models for method {name!r} under models/{name}/")
    return [load_model(f) for f in folders]
