"""Benchmark `preprocess` on the real challenge files: seconds in all, per slide, per 1000 spots, per step.

    .venv/bin/python benchmarks/preprocess.py [--repeat N]

Reads ../shared/data/challenge/{her2st,mob}.h5 (relative to the repository), preprocesses each into a
temporary folder with the default config and prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "challenge"
DATASETS = ("her2st", "mob")
STEPS = ("read", "stain_fit", "normalise_mask", "realign", "tiling", "write")


def run_one(name: str) -> dict:
    """Read and preprocess one dataset; return its figures."""
    from hevisum.config import PreprocessConfig
    from hevisum.io.competition import read_competition_h5
    from hevisum.preprocess.pipeline import preprocess

    t0 = time.perf_counter()
    slides = read_competition_h5(DATA / f"{name}.h5")
    t_read = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t1 = time.perf_counter()
        prep = preprocess(slides, PreprocessConfig(), Path(tmp) / "work", progress=False)
        t_prep = time.perf_counter() - t1
        n_tiles = len(prep.tiles)
    n_spots = sum(s.n_spots for s in slides)
    total = t_read + t_prep
    steps = {"read": t_read, **{k: float(prep.timings.get(k, 0.0)) for k in STEPS[1:]}}
    return {"dataset": name, "slides": len(slides), "spots": n_spots, "tiles": n_tiles,
            "seconds": round(total, 3), "seconds_per_slide": round(total / len(slides), 3),
            "seconds_per_1000_spots": round(1000 * total / n_spots, 3),
            "steps": {k: round(v, 3) for k, v in steps.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1, help="runs per dataset; the fastest is reported (default 1)")
    args = ap.parse_args(argv)
    missing = [n for n in DATASETS if not (DATA / f"{n}.h5").is_file()]
    if missing:
        print(f"benchmark data not found: {[str(DATA / f'{n}.h5') for n in missing]} "
              "(place the shared/ folder beside the repository)", file=sys.stderr)
        return 2
    rows = []
    for name in DATASETS:
        runs = [run_one(name) for _ in range(max(1, args.repeat))]
        rows.append(min(runs, key=lambda r: r["seconds"]))
    head = f"{'dataset':8} {'slides':>6} {'spots':>6} {'tiles':>6} {'total s':>8} {'s/slide':>8} {'s/1k spots':>10}"
    step_head = "  ".join(f"{k:>14}" for k in STEPS)
    print(head + "  |  " + step_head)
    for r in rows:
        steps = "  ".join(f"{r['steps'][k]:14.2f}" for k in STEPS)
        print(f"{r['dataset']:8} {r['slides']:6d} {r['spots']:6d} {r['tiles']:6d} {r['seconds']:8.2f} "
              f"{r['seconds_per_slide']:8.2f} {r['seconds_per_1000_spots']:10.2f}  |  {steps}")
    import os

    print(json.dumps({"benchmark": "preprocess", "cpu_count": os.cpu_count(), "datasets": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
