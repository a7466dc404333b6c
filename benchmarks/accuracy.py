"""Accuracy on the real data: every method beside the `mean` and `colour-ridge` baselines, in one run.

    python benchmarks/accuracy.py [--methods effnet-ridge effnet-mlp ...] [--epochs N] [--datasets her2st mob]

her2st.h5: leave-one-slide-out over C2-C5, predict C6, scored with her2st_test_truth.csv.
mob.h5:    leave-one-slide-out over MOB1-MOB2, predict MOB3, scored with mob_test_truth.csv.
Prints a table per dataset and, as the last line, one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = (REPO / ".." / "shared" / "data" / "challenge").resolve()
DATASETS = {"her2st": ("her2st.h5", "her2st_test_truth.csv"), "mob": ("mob.h5", "mob_test_truth.csv")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=["effnet-ridge", "effnet-colour-ridge", "effnet-stages-ridge", "effnet-mlp"],
                    help="methods besides the baselines (add hevisum-cnn for the reference CNN; slow on a CPU)")
    ap.add_argument("--epochs", type=int, default=30, help="epochs for tile models")
    ap.add_argument("--stacking", default="ridge", choices=["ridge", "mlp", "off"])
    ap.add_argument("--smoothing", default="on", choices=["on", "off"], help="spatial smoothing of predictions")
    ap.add_argument("--tta", action="store_true", help="test-time augmentation (8 flips/rotations)")
    ap.add_argument("--augment", action="store_true", help="flip/rotation augmentation when training tile models")
    ap.add_argument("--coords", action="store_true", help="spot coordinates as an extra input of the heads")
    ap.add_argument("--feature-norm", default="slide", choices=["slide", "global"])
    ap.add_argument("--target", default="rank", choices=["rank", "raw"])
    ap.add_argument("--tie-tol", type=float, default=0.0,
                    help="near-tie tolerance of the rank targets (0 = plain ranks; 1e-6 collapses HER2ST's ~1e-10 values)")
    ap.add_argument("--tile-size", type=int, default=78)
    ap.add_argument("--encoder-input", type=int, default=112)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not DATA.is_dir():
        print(f"real data not found at {DATA}: place the shared/ folder beside the repository", file=sys.stderr)
        return 2
    from hevisum.pipeline import run_pipeline

    methods_toml = ", ".join(f'"{m}"' for m in args.methods)
    config = (f'[models]\nmethods = [{methods_toml}]\nencoder_input = {args.encoder_input}\n'
              f'feature_norm = "{args.feature_norm}"\n'
              f'[train]\nepochs = {args.epochs}\ntta = {str(args.tta).lower()}\ntarget = "{args.target}"\n'
              f'augment = {str(args.augment).lower()}\ncoords = {str(args.coords).lower()}\n'
              f'[tiles]\nsize = {args.tile_size}\n[targets]\ntie_tol = {args.tie_tol}\n'
              f'[stacking]\nenabled = {str(args.stacking != "off").lower()}\n'
              f'model = "{args.stacking if args.stacking != "off" else "ridge"}"\n'
              f'[smoothing]\nenabled = {str(args.smoothing == "on").lower()}\n')
    result: dict = {"config": vars(args), "datasets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "bench.toml"
        cfg_path.write_text(config)
        for ds in args.datasets:
            h5, truth = DATASETS[ds]
            t0 = time.perf_counter()
            m = run_pipeline([str(DATA / h5)], Path(tmp) / ds, config_path=str(cfg_path), truth=str(DATA / truth),
                             seed=args.seed, progress=False)
            rows = {}
            for name, s in m["methods"].items():
                t = m["test"][name]["overall"]
                rows[name] = {"cv_spot_spearman": s["cv_spot_spearman"], "cv_target_pearson": s["cv_target_pearson_mean"],
                              "test_spot_spearman": t["spot_spearman"], "test_target_pearson": t["target_pearson_mean"]}
            base = max(rows["mean"]["test_spot_spearman"], rows["colour-ridge"]["test_spot_spearman"])
            best = m["selected"]
            margins = _margins(Path(tmp) / ds, DATA / truth, m, best)
            result["datasets"][ds] = {"methods": rows, "selected_by_cv": best, "seconds": time.perf_counter() - t0,
                                      "selected_minus_best_baseline_test": rows[best]["test_spot_spearman"] - base,
                                      "selected_vs_baselines": margins}
            print(f"\n{ds}: folds {m['folds']}, test slide(s) scored with {truth}; selected by CV: {best}")
            print(f"{'method':<20}{'CV spot-Spearman':>18}{'CV target-Pearson':>19}{'test spot-Spearman':>20}"
                  f"{'test target-Pearson':>21}")
            for name, r in rows.items():
                mark = " (baseline)" if name in ("mean", "colour-ridge") else (" <- selected" if name == best else "")
                print(f"{name:<20}{_f(r['cv_spot_spearman']):>18}{_f(r['cv_target_pearson']):>19}"
                      f"{_f(r['test_spot_spearman']):>20}{_f(r['test_target_pearson']):>21}{mark}")
            for b, mg in margins.items():
                print(f"{best} minus {b}: test {mg['test_diff']:+.4f} (paired standard error over test spots "
                      f"{mg['test_diff_se']:.4f}); better on {mg['cv_folds_better']} of {mg['cv_folds']} CV slides")
    print(json.dumps(result))
    return 0


def _margins(run: Path, truth_csv: Path, m: dict, best: str) -> dict:
    """The selected method against each baseline: the test difference in mean per-spot Spearman with its paired
    standard error over the test spots (one slide is a small sample), and on how many CV slides it scores higher."""
    import numpy as np
    import pandas as pd

    from hevisum.metrics import per_spot_spearman

    truth = pd.read_csv(truth_csv)
    targets = [c for c in truth.columns if c not in ("slide", "ID")]

    def spots(name: str) -> np.ndarray:
        pred = pd.read_csv(run / f"test_{name}.csv")
        both = truth[["slide", "ID"]].astype(str).merge(pred.astype({"slide": str, "ID": str}), on=["slide", "ID"])
        return per_spot_spearman(both[targets].to_numpy(float), truth[targets].to_numpy(float))

    ours, out = spots(best), {}
    folds = m["methods"][best]["cv_fold_spot_spearman"]
    for b in ("mean", "colour-ridge"):
        d = ours - spots(b)
        d = d[np.isfinite(d)]
        base_folds = m["methods"][b]["cv_fold_spot_spearman"]
        out[b] = {"test_diff": float(d.mean()), "test_diff_se": float(d.std(ddof=1) / np.sqrt(len(d))),
                  "cv_folds_better": int(sum(folds[k] > base_folds[k] for k in folds)), "cv_folds": len(folds)}
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.4f}"


if __name__ == "__main__":
    sys.exit(main())
