"""Wall time of `hevisum run --profile reference` on the demo data: one process, two processes with the folds spread
over them, two processes with every rank in every fold (DistributedDataParallel).

    .venv/bin/python benchmarks/distributed.py [--epochs 30] [--rounds 1] [--nproc 2] [--keep DIR]

The demo dataset (``hevisum run``'s own: 4 Train slides, so 4 folds, and 1 Test slide, seed 0) is written once
and each configuration runs it as a fresh ``hevisum run`` process (the reference profile trains ``hevisum-cnn``
beside the baselines; ``--epochs`` overrides its 30 epochs to keep the measurement short):

    1 process         hevisum run DEMO --profile reference
    1 process, 1 thr  the same with OMP_NUM_THREADS=1 (torchrun's default for each rank)
    N spread          hevisum run DEMO --profile reference --nproc N --dist-folds spread
    N ddp-in-fold     hevisum run DEMO --profile reference --nproc N --dist-folds ddp

With ``--rounds R`` the three are run R times, interleaved, and the median is shown. Besides the wall time, the
table gives the largest difference of the CNN's out-of-fold predictions from the one-process runs' (spread folds
are fitted exactly as by one process with one thread: the thread count changes float summation order, which
training amplifies). Prints a table and, last, one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _oof(out: Path, name: str):
    import pandas as pd

    a = pd.read_csv(out / f"oof_{name}.csv")
    return a[[c for c in a.columns if c.startswith("C")]].to_numpy()


def _slug(label: str) -> str:
    return label.replace(",", "").replace(" ", "_")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="train.epochs of the reference profile (default 30)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repetitions (default 1)")
    ap.add_argument("--nproc", type=int, default=2, help="processes of the distributed runs (default 2)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the runs in DIR (default: a temporary folder)")
    a = ap.parse_args()

    import numpy as np

    from hevisum.demo import DemoSpec, write_demo
    from hevisum.methods import default_methods

    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="hevisum-dist-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    h5, _ = write_demo(tmp / "demo.h5", DemoSpec(), progress=False)
    cfg = tmp / "bench.toml"
    cfg.write_text(f"profile = \"reference\"\n[train]\nepochs = {a.epochs}\n")
    tile_methods = default_methods("reference")  # what the profile trains beside the baselines
    runs = {"1 process": [], "1 process, 1 thr": [],
            f"{a.nproc} spread": ["--nproc", str(a.nproc), "--dist-folds", "spread"],
            f"{a.nproc} ddp-in-fold": ["--nproc", str(a.nproc), "--dist-folds", "ddp"]}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    diffs: dict[str, dict[str, float]] = {}
    for r in range(a.rounds):
        for label, extra in runs.items():
            out = tmp / f"out-{r}-{_slug(label)}"
            shutil.rmtree(out, ignore_errors=True)
            env = dict(os.environ, HEVISUM_CACHE=str(tmp / f"cache-{r}-{_slug(label)}"))
            for k in ("WORLD_SIZE", "OMP_NUM_THREADS", "HEVISUM_DIST_FOLDS"):
                env.pop(k, None)
            if label.endswith("1 thr"):
                env["OMP_NUM_THREADS"] = "1"
            cmd = [sys.executable, "-m", "hevisum", "run", str(h5), "--config", str(cfg), "--profile", "reference",
                   "--quiet", "--out", str(out), *extra]
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            dt = time.perf_counter() - t0
            if p.returncode != 0:
                print(p.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{label} failed (exit {p.returncode}): {' '.join(cmd)}")
            seconds[label].append(dt)
            print(f"round {r + 1}: {label:18s} {dt:7.1f} s", file=sys.stderr, flush=True)
        for label in list(runs)[1:]:
            out = tmp / f"out-{r}-{_slug(label)}"
            d = diffs.setdefault(label, {})
            for ref in list(runs)[:2]:
                for m in tile_methods:
                    key = f"{m} vs {ref}"
                    d[key] = max(d.get(key, 0.0),
                                 float(np.abs(_oof(tmp / f"out-{r}-{_slug(ref)}", m) - _oof(out, m)).max()))
    med = {k: statistics.median(v) for k, v in seconds.items()}
    base = med["1 process"]
    n_folds = len(json.loads((tmp / "out-0-1_process" / "metrics.json").read_text())["folds"])
    print(f"\nhevisum run --profile reference (train.epochs = {a.epochs}) on the demo data ({n_folds} folds), "
          f"{os.cpu_count()} CPUs, {a.rounds} round(s), median wall time")
    print(f"{'configuration':18s} {'seconds':>8s} {'vs 1 process':>13s}   max |OOF difference| of "
          f"{', '.join(tile_methods)} from: 1 process; 1 process, 1 thr")
    for k, v in med.items():
        d = "; ".join(f"{x:.2g}" for x in diffs.get(k, {}).values()) or "-"
        print(f"{k:18s} {v:8.1f} {base / v:12.2f}x   {d}")
    if not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"epochs": a.epochs, "folds": n_folds, "rounds": a.rounds, "nproc": a.nproc,
                      "cpus": os.cpu_count(),
                      "seconds": seconds, "median_seconds": med, "speedup_vs_1": {k: base / v for k, v in med.items()},
                      "max_oof_diff_vs_1": diffs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
