"""Benchmark `preprocess` on the real challenge files: seconds in all, per slide, per 1000 spots, per step, with one
process and with a pool of worker processes (per-slide steps), in the same run.

    .venv/bin/python benchmarks/preprocess.py [--repeat N] [--workers N]

Reads ../shared/data/challenge/{her2st,mob}.h5 (relative to the repository), preprocesses each into a
temporary folder with the default config, once with 1 process (the baseline) and once with ``--workers`` (default:
one per CPU, at most 4), checks that both wrote the same tiles, and prints a table; the last line is one JSON object
with the figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "challenge"
DATASETS = ("her2st", "mob")
STEPS = ("read", "stain_fit", "normalise_mask", "realign", "tiling", "write")


def run_one(name: str, workers: int) -> dict:
    """Read and preprocess one dataset with ``workers`` processes; return its figures."""
    from hevisum.config import PreprocessConfig
    from hevisum.io.competition import read_competition_h5
    from hevisum.preprocess.pipeline import preprocess

    t0 = time.perf_counter()
    slides = read_competition_h5(DATA / f"{name}.h5")
    t_read = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        prep = preprocess(slides, PreprocessConfig(), Path(tmp) / "work", progress=False, workers=workers)
        t_prep = time.perf_counter() - t1
        n_tiles = len(prep.tiles)
        digest = hashlib.sha1(np.asarray(prep.tiles).tobytes()).hexdigest()
    n_spots = sum(s.n_spots for s in slides)
    total = t_read + t_prep
    steps = {"read": t_read, **{k: float(prep.timings.get(k, 0.0)) for k in STEPS[1:]}}
    return {"dataset": name, "workers": workers, "tiles_sha1": digest,
            "slides": len(slides), "spots": n_spots, "tiles": n_tiles,
            "seconds": round(total, 3), "seconds_per_slide": round(total / len(slides), 3),
            "seconds_per_1000_spots": round(1000 * total / n_spots, 3),
            "steps": {k: round(v, 3) for k, v in steps.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per dataset; the fastest is reported (default 1)")
    ap.add_argument("--workers", type=int, default=0, help="processes of the pool (default 0: one per CPU, at most 4)")
    args = ap.parse_args(argv)
    from hevisum.workers import resolve

    pool = resolve(args.workers)
    missing = [n for n in DATASETS if not (DATA / f"{n}.h5").is_file()]
    if missing:
        print(f"benchmark data not found: {[str(DATA / f'{n}.h5') for n in missing]} "
              "(place the shared/ folder beside the repository)", file=sys.stderr)
        return 2
    rows = []
    for name in DATASETS:
        for w in (1, pool):
            runs = [run_one(name, w) for _ in range(max(1, args.repeat))]
            rows.append(min(runs, key=lambda r: r["seconds"]))
    head = f"{'dataset':8} {'procs':>5} {'slides':>6} {'spots':>6} {'tiles':>6} {'total s':>8} {'s/slide':>8} {'s/1k spots':>10}"
    step_head = "  ".join(f"{k:>14}" for k in STEPS)
    print(head + "  |  " + step_head)
    for r in rows:
        steps = "  ".join(f"{r['steps'][k]:14.2f}" for k in STEPS)
        print(f"{r['dataset']:8} {r['workers']:5d} {r['slides']:6d} {r['spots']:6d} {r['tiles']:6d} {r['seconds']:8.2f} "
              f"{r['seconds_per_slide']:8.2f} {r['seconds_per_1000_spots']:10.2f}  |  {steps}")
    import os

    for name in DATASETS:
        one, many = [r for r in rows if r["dataset"] == name][:2]
        same = "the same tiles" if one["tiles_sha1"] == many["tiles_sha1"] else "DIFFERENT tiles"
        print(f"{name}: {many['workers']} processes {one['seconds'] / many['seconds']:.2f}x the speed of 1 "
              f"({one['seconds']:.1f} s -> {many['seconds']:.1f} s), {same}")
    print(json.dumps({"benchmark": "preprocess", "cpu_count": os.cpu_count(), "datasets": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
