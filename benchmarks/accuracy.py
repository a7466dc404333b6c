"""Accuracy on the real data: feature variants of the default method beside the `mean` and `colour-ridge`
baselines, cross-validated on the training slides and scored on the test slides, in one run.

    python benchmarks/accuracy.py [--datasets her2st mob gbm her2st-folder] [--variants default probe ring1 ...]
                                  [--methods encoder-mlp hevisum-cnn ...] [--epochs N]

Datasets (../shared/data):
  her2st         challenge/her2st.h5 (3.2 um/px, no um/px in the file): leave-one-slide-out over C2-C5, test C6
  mob            challenge/mob.h5: leave-one-slide-out over MOB1-MOB2, test MOB3
  gbm            visium_gbm (one Visium section, hires image): cross-validation over 4 spatial blocks, no test
  her2st-folder  her2st/ (the original 0.69 um/px images, celltypes_subset), test C6: the same slides as
                 her2st.h5 at full resolution, where tissue-scale tiles are possible

Each dataset is preprocessed once (spot tiles, tissue-scale tiles and wide tiles in one pass); each variant then
changes only what the heads read. Variants:
  default   encoder-ridge: EfficientNet-Lite0 stage-pooled features + colour statistics, per-slide standardised
  probe     encoder-probe: the HEST-Benchmark probe (encoder embedding, PCA 256 + ridge)
  ring1     default + the mean features of the neighbours within one lattice ring
  ring2     default + the neighbours within two rings
  slide     default + the slide's mean features
  wide      default + features of a field of view of 6 pitches
  global    default without per-slide standardisation
  global+slide  no per-slide standardisation, with the slide's mean features
  tissue    default with the encoder's tiles cut at 112 um field of view (224 px at 0.5 um/px) from the
            full-resolution image; only where um/px is known (falls back to spot tiles, and says so)

``--methods`` adds other registered methods (default config) beside the variants, e.g. the reference CNN
(``--methods hevisum-cnn --epochs 20``; slow on a CPU).

Figures: per-spot Spearman (the competition metric) and per-target Pearson, CV over all out-of-fold spots and
on the test slide, and each variant's paired difference with `colour-ridge` (CV and test) with its standard
error over spots. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data").resolve()
DATASETS = {
    "her2st": {"inputs": ["challenge/her2st.h5"], "truth": "challenge/her2st_test_truth.csv", "reader": {}},
    "mob": {"inputs": ["challenge/mob.h5"], "truth": "challenge/mob_test_truth.csv", "reader": {}},
    "gbm": {"inputs": ["visium_gbm"], "truth": None, "reader": {}},
    "her2st-folder": {"inputs": ["her2st"], "truth": None, "reader": {"test_slides": ["C6"]}},
}
VARIANTS = {
    "default": ("encoder-ridge", {}),
    "probe": ("encoder-probe", {}),
    "ring1": ("encoder-ridge", {"features": {"context": ["ring1"]}}),
    "ring2": ("encoder-ridge", {"features": {"context": ["ring2"]}}),
    "slide": ("encoder-ridge", {"features": {"context": ["slide"]}}),
    "wide": ("encoder-ridge", {"features": {"context": ["wide"]}}),
    "global": ("encoder-ridge", {"models": {"feature_norm": "global"}}),
    "global+slide": ("encoder-ridge", {"models": {"feature_norm": "global"}, "features": {"context": ["slide"]}}),
    "tissue": ("encoder-ridge", {"features": {"tiles": "tissue"}}),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["her2st", "mob", "gbm"], choices=list(DATASETS))
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--methods", nargs="*", default=[], help="other registered methods to add (hevisum methods)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs for tile networks")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"real data not found at {DATA}: place the shared/ folder beside the repository", file=sys.stderr)
        return 2
    result: dict = {"variants": args.variants, "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for ds in args.datasets:
            result["datasets"][ds] = run_dataset(ds, args.variants, Path(tmp) / ds, args.seed, args.methods,
                                                 args.epochs)
    print(json.dumps(result))
    return 0


def run_dataset(ds: str, variants: list[str], work: Path, seed: int, methods: list[str] = (),
                epochs: int = 30) -> dict:
    from hevisum.config import load_run_config, merge
    from hevisum.cv import make_folds
    from hevisum.io import read_inputs
    from hevisum.methods import baseline_names
    from hevisum.pipeline import preprocess_stage, targets_stage

    spec = DATASETS[ds]
    t0 = time.perf_counter()
    slides = read_inputs([str(DATA / p) for p in spec["inputs"]], progress=False, **spec["reader"])
    base_over = {"seed": seed}
    # one preprocessing pass with every tile cache the variants need
    all_cfg = load_run_config(overrides=merge(base_over, {"features": {"context": ["wide"], "tiles": "tissue"}}))
    prep = preprocess_stage(slides, all_cfg, work / "prep", ["encoder-ridge"], progress=False)
    has_um = any(s.um_per_px for s in slides)
    del slides
    targets = targets_stage(prep, all_cfg)
    folds = make_folds(prep.spots, seed=seed)
    truth = _truth(prep, spec, folds)
    print(f"\n{ds}: {len(prep.spots)} spots, folds {folds.slide_ids}, test spots {len(folds.test_rows)}; "
          f"um/px {'known' if has_um else 'unknown'}; preprocessing {time.perf_counter() - t0:.0f} s")
    rows: dict = {}
    per_spot: dict = {}
    for name in baseline_names():
        rows[name], per_spot[name] = evaluate(name, name, {}, prep, targets, folds, truth, seed, base_over)
    for v in variants:
        if v == "tissue" and not has_um:
            print(f"  {v}: skipped (no microns per pixel in this input; tiles would be the spot tiles)")
            continue
        method, over = VARIANTS[v]
        rows[v], per_spot[v] = evaluate(v, method, over, prep, targets, folds, truth, seed, base_over)
    for m in methods:
        rows[m], per_spot[m] = evaluate(m, m, {"train": {"epochs": epochs}}, prep, targets, folds, truth, seed,
                                        base_over)
    ref = "colour-ridge"
    for name in rows:
        rows[name]["vs_colour_ridge"] = paired(per_spot[name], per_spot[ref])
        rows[name]["vs_mean"] = paired(per_spot[name], per_spot["mean"])
        rows[name]["folds_won_vs_colour_ridge"] = _won(rows[name], rows[ref])
    print(f"{'variant':<14}{'CV spot-S':>10}{'CV tgt-P':>10}{'test spot-S':>12}{'test tgt-P':>11}"
          f"{'CV - colour-ridge':>20}{'test - colour-ridge':>21}{'folds won':>10}{'s':>6}")
    for name, r in rows.items():
        vc = r["vs_colour_ridge"]
        print(f"{name:<14}{_f(r['cv_spot_spearman']):>10}{_f(r['cv_target_pearson']):>10}"
              f"{_f(r.get('test_spot_spearman')):>12}{_f(r.get('test_target_pearson')):>11}"
              f"{_pm(vc['cv_diff'], vc['cv_se']):>20}{_pm(vc.get('test_diff'), vc.get('test_se')):>21}"
              f"{r['folds_won_vs_colour_ridge']:>10}{r['seconds']:>6.0f}")
    return {"rows": rows, "folds": folds.slide_ids, "n_train": int(len(folds.train_rows)),
            "n_test": int(len(folds.test_rows)), "seconds": time.perf_counter() - t0}


def evaluate(label, method, over, prep, targets, folds, truth, seed, base_over):
    """CV (and test) of one method under one config variant, predictions smoothed as in `hevisum run`."""
    from hevisum.config import load_run_config, merge
    from hevisum.cv import cross_validate_method, summarise
    from hevisum.methods import FitContext, get_method
    from hevisum.metrics import per_spot_spearman, per_target_pearson
    from hevisum.pipeline import feature_store
    from hevisum.postprocess import smooth_rows

    t0 = time.perf_counter()
    cfg = load_run_config(overrides=merge(base_over, over))
    store = feature_store(prep, cfg, "cpu", False)
    X = store.for_method(get_method(method)(cfg))
    ctx = FitContext(cfg=cfg, tiles=prep.tiles, Y_fit=targets.fit, Y_raw=targets.raw, seed=seed)
    res = cross_validate_method(method, folds, targets.fit, cfg, ctx, features=X)
    oof = smooth_rows(res.oof, folds.train_rows, prep.spots, cfg)
    Yr = targets.raw[folds.train_rows]
    s = summarise(label, oof, Yr, folds.slides, targets.names)
    row = {"method": method, "cv_spot_spearman": s["cv_spot_spearman"], "cv_target_pearson": s["cv_target_pearson_mean"],
           "cv_folds": s["cv_fold_spot_spearman"]}
    spots = {"cv": per_spot_spearman(oof, Yr)}
    if truth is not None and len(folds.test_rows):
        test = smooth_rows(res.test_ensemble, folds.test_rows, prep.spots, cfg)
        row["test_spot_spearman"] = float(np.nanmean(per_spot_spearman(test, truth)))
        row["test_target_pearson"] = float(np.nanmean(per_target_pearson(test, truth)))
        spots["test"] = per_spot_spearman(test, truth)
    row["seconds"] = time.perf_counter() - t0
    return row, spots


def paired(a: dict, b: dict) -> dict:
    """Mean per-spot difference a - b and its paired standard error, CV and test."""
    out = {}
    for k in ("cv", "test"):
        if k in a and k in b:
            d = a[k] - b[k]
            d = d[np.isfinite(d)]
            out[f"{k}_diff"] = float(d.mean())
            out[f"{k}_se"] = float(d.std(ddof=1) / np.sqrt(len(d)))
    return out


def _truth(prep, spec, folds):
    """The test slides' raw targets, in the order of folds.test_rows (None without a test truth)."""
    import pandas as pd

    if not len(folds.test_rows):
        return None
    path = DATA / spec["truth"] if spec["truth"] else prep.workdir / "test_truth.csv"
    if not Path(path).is_file():
        return None
    t = pd.read_csv(path)
    t["slide"], t["ID"] = t["slide"].astype(str), t["ID"].astype(str)
    sp = prep.spots.iloc[folds.test_rows]
    keys = list(zip(sp["slide"].astype(str), sp["spot_id"].astype(str)))
    cols = [f"C{i + 1}" for i in range(len(prep.target_names))]
    return t.set_index(["slide", "ID"]).loc[keys, cols].to_numpy(np.float64)


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


def _pm(d, se) -> str:
    return "-" if d is None else f"{d:+.4f}±{se:.4f}"


def _won(row: dict, ref: dict) -> str:
    a, b = row["cv_folds"], ref["cv_folds"]
    return f"{sum(a[k] > b[k] for k in a)}/{len(a)}"


if __name__ == "__main__":
    sys.exit(main())
