"""Benchmark whole-slide reading at 10k, 20k and 40k px: time and peak memory of open -> thumbnail -> tissue mask ->
virtual grid -> every grid tile -> EfficientNet-Lite0 features, one fresh process per slide size; and of the
training path: the slide as the full-resolution image of a Visium folder (--fullres), read and preprocessed.

    .venv/bin/python benchmarks/scale.py [--sizes 10000 20000 40000] [--max-tiles 2000] [--backend auto]
                                         [--keep DIR]

Builds H&E-like pyramidal TIFFs (JPEG tiles, 0.5 µm/px, height 3/4 of the width) from real H&E patches of
../shared/data/her2st/images (relative to the repository) in a temporary folder, deleted afterwards. Each size is
measured in its own subprocess, so its peak RSS (``ru_maxrss``) is that size's alone. Features are computed for an
evenly spaced sample of at most ``--max-tiles`` grid tiles (the slow part on a small CPU); tile reading covers every
grid spot. Feature throughput is then compared on the same sample: one process with 1 or 2 torch threads, and a
pool of 2 processes with 1 thread each. The training path reads a generated Space Ranger folder (``--train-spots``
virtual-grid spots with random proportions) with the slide as its full-resolution image and preprocesses it; at the
smallest size it is also run with the whole image decoded into memory first, the baseline. Prints a table (ratios
to the smallest size) and, last, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "her2st" / "images"
UM_PER_PX = 0.5


def _rss_mb() -> float:
    """Peak resident set size of this process so far, MB.

    Linux: ``VmHWM`` of /proc/self/status, which starts afresh at exec; ``ru_maxrss`` would carry the parent's peak
    across fork + exec. Elsewhere: ``ru_maxrss`` (kB on Linux and BSD, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


# ----------------------------------------------------------------------------------------------- child: build


def build(path: Path, width: int, patches: Path, seed: int) -> dict:
    """Write one slide (run in its own process, so the writer's peak RSS is measured alone)."""
    import numpy as np

    from hevisum.io.wsi import write_pyramidal_tiff

    t0 = time.perf_counter()
    slide = write_pyramidal_tiff(path, width, source_tiles=np.load(patches), um_per_px=UM_PER_PX, seed=seed)
    return {"width": slide.width, "height": slide.height, "levels": slide.downsamples,
            "build_s": time.perf_counter() - t0, "build_peak_rss_mb": _rss_mb(), "file_mb": path.stat().st_size / 2**20}


# ----------------------------------------------------------------------------------------------- child: measure


def measure(path: Path, args: argparse.Namespace) -> dict:
    """Open -> thumbnail + mask -> grid -> read every tile -> features of a sample; times and peak RSS."""
    import numpy as np

    import hevisum.preprocess.tissue  # noqa: F401  (import time is not the pipeline's)
    from hevisum.grid import virtual_grid
    from hevisum.io.wsi import open_image, read_tiles, tissue_thumbnail

    out: dict = {"rss_imports_mb": _rss_mb(), "load_avg_start": os.getloadavg()[0]}
    t_all = time.perf_counter()
    t0 = time.perf_counter()
    src = open_image(path, backend=None if args.backend == "auto" else args.backend)
    out["backend"] = src.backend
    out["levels"] = [list(lv) for lv in src.levels]
    thumb, mask, scale = tissue_thumbnail(src, args.thumb)
    out["open_thumb_mask_s"] = time.perf_counter() - t0
    out["thumbnail"] = list(thumb.shape[:2])
    out["tissue_fraction"] = float(mask.mean())
    t0 = time.perf_counter()
    pitch_px = args.pitch_um / src.um_per_px
    grid = virtual_grid(mask, scale, pitch_px, image_size=(src.width, src.height))
    out["grid_s"] = time.perf_counter() - t0
    n = len(grid)
    out["spots"] = n
    xy = grid[["x", "y"]].to_numpy()
    n_sample = min(args.max_tiles, n)
    sample_idx = np.unique(np.linspace(0, n - 1, n_sample).round().astype(np.int64)) if n else np.zeros(0, int)
    sample = np.empty((len(sample_idx), args.out_px, args.out_px, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    pos, k, checksum = 0, 0, 0
    for batch in read_tiles(src, xy, field_um=args.field_pitches * args.pitch_um, out_px=args.out_px, batch=64):
        checksum += int(batch[:, ::16, ::16].sum())
        rows = np.arange(pos, pos + len(batch))
        hit = np.isin(rows, sample_idx)
        sample[k:k + int(hit.sum())] = batch[hit]
        k += int(hit.sum())
        pos += len(batch)
    out["tiles_s"] = time.perf_counter() - t0
    out["tiles_per_s"] = n / out["tiles_s"] if out["tiles_s"] > 0 else 0.0
    out["checksum"] = checksum
    out["rss_before_features_mb"] = _rss_mb()
    src.close()
    if args.save_sample:
        np.save(args.save_sample, sample)
    import torch

    from hevisum.models.effnet import extract_features, load_pretrained_lite0

    torch.set_num_threads(2)
    model = load_pretrained_lite0()
    extract_features(model, sample[:8])  # warm-up
    t0 = time.perf_counter()
    feats = extract_features(model, sample, batch_size=64)
    out["features_s"] = time.perf_counter() - t0
    out["features_n"] = int(len(feats))
    out["features_per_s"] = len(feats) / out["features_s"] if len(feats) else 0.0
    out["total_s"] = time.perf_counter() - t_all
    # read pipeline for every spot + features at the measured rate for every spot
    out["projected_all_features_s"] = n / out["features_per_s"] if out["features_per_s"] else 0.0
    out["peak_rss_mb"] = _rss_mb()
    out["load_avg_end"] = os.getloadavg()[0]
    return out


# ----------------------------------------------------------------------------------------------- child: training slide


def write_visium_folder(folder: Path, image: Path, args: argparse.Namespace) -> int:
    """A Space Ranger-style folder whose spots are the virtual grid over the slide's tissue (at most
    ``--train-spots``, evenly spread) with random cell-type proportions; the slide file is its full-resolution
    image. Returns the number of spots."""
    import numpy as np
    import pandas as pd

    from hevisum.grid import virtual_grid
    from hevisum.io.wsi import open_image, tissue_thumbnail

    with open_image(image) as src:
        _, mask, scale = tissue_thumbnail(src, args.thumb)
        grid = virtual_grid(mask, scale, args.pitch_um / src.um_per_px, image_size=(src.width, src.height))
        um = src.um_per_px
    keep = np.unique(np.linspace(0, len(grid) - 1, min(args.train_spots, len(grid))).round().astype(np.int64))
    grid = grid.iloc[keep].reset_index(drop=True)
    spatial = folder / "spatial"
    spatial.mkdir(parents=True)
    barcodes = [f"S{i:06d}-1" for i in range(len(grid))]
    pd.DataFrame({"barcode": barcodes, "in_tissue": 1, "array_row": grid["array_row"], "array_col": grid["array_col"],
                  "pxl_row_in_fullres": grid["y"].round(1), "pxl_col_in_fullres": grid["x"].round(1)}
                 ).to_csv(spatial / "tissue_positions.csv", index=False)
    (spatial / "scalefactors_json.json").write_text(json.dumps(
        {"spot_diameter_fullres": 55.0 / um, "tissue_hires_scalef": 1.0, "tissue_lowres_scalef": 1.0}))
    props = np.random.default_rng(args.seed).dirichlet(np.ones(8), size=len(grid))
    pd.DataFrame(props, index=pd.Index(barcodes, name="barcode"),
                 columns=[f"type{i}" for i in range(8)]).to_csv(folder / "proportions.tsv", sep="\t")
    return len(grid)


def measure_training(path: Path, args: argparse.Namespace) -> dict:
    """Read a Visium folder with this slide as ``--fullres`` and preprocess it (masks, stain fit, realignment,
    tiles): the training path. ``--in-memory``: the same with the whole image decoded into memory first (what
    every reader did before slides were read lazily)."""
    from dataclasses import replace

    import hevisum.preprocess.pipeline  # noqa: F401  (import time is not the pipeline's)
    from hevisum.config import RunConfig
    from hevisum.io import read_inputs
    from hevisum.preprocess.pipeline import preprocess

    tmp = Path(tempfile.mkdtemp(prefix="hevisum-train-"))
    try:
        n = write_visium_folder(tmp / "sample", path, args)
        out: dict = {"train_spots": n, "rss_imports_mb": _rss_mb()}
        t0 = time.perf_counter()
        (slide,) = read_inputs([tmp / "sample"], image=str(path), progress=False)
        if args.in_memory:
            import tifffile

            lv = slide.meta.pop("level0")
            spots = slide.spots.assign(x=slide.spots["x"] / lv["sx"], y=slide.spots["y"] / lv["sy"])
            slide = replace(slide, image=tifffile.imread(path), spots=spots, um_per_px=slide.um_per_px * lv["sx"])
        out["read_s"] = time.perf_counter() - t0
        out["working_image"] = list(slide.image.shape[:2])
        t0 = time.perf_counter()
        prep = preprocess([slide], RunConfig().preprocess_config(), tmp / "prep", progress=False)
        out["preprocess_s"] = time.perf_counter() - t0
        out["timings"] = prep.timings
        out["tiles"] = int(len(prep.tiles))
        out["peak_rss_mb"] = _rss_mb()
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- features: 1 vs 2 procs

_MODEL = None


def _init_worker(threads: int) -> None:
    global _MODEL
    import torch

    from hevisum.models.effnet import load_pretrained_lite0

    torch.set_num_threads(threads)
    _MODEL = load_pretrained_lite0()


def _features_part(job: tuple) -> float:
    """Embed rows [a, b) of the sample file; returns seconds of compute (after a barrier, so workers overlap)."""
    import numpy as np

    from hevisum.models.effnet import extract_features

    path, a, b, barrier = job
    tiles = np.load(path, mmap_mode="r")
    extract_features(_MODEL, np.asarray(tiles[a:a + 8]))  # warm-up
    if barrier is not None:
        barrier.wait()
    t0 = time.perf_counter()
    extract_features(_MODEL, tiles[a:b], batch_size=64)
    return time.perf_counter() - t0


def feature_scaling(sample: Path) -> dict:
    """spots/s of EfficientNet-Lite0 features: 1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread."""
    import multiprocessing as mp

    import numpy as np

    n = len(np.load(sample, mmap_mode="r"))
    out: dict = {"n": n, "load_avg_start": os.getloadavg()[0]}
    ctx = mp.get_context("spawn")
    for threads in (1, 2):
        with ctx.Pool(1, initializer=_init_worker, initargs=(threads,)) as pool:
            secs = pool.apply(_features_part, ((str(sample), 0, n, None),))
        out[f"1proc_{threads}thr_per_s"] = n / secs
    manager = ctx.Manager()
    barrier = manager.Barrier(2)
    with ctx.Pool(2, initializer=_init_worker, initargs=(1,)) as pool:
        t0 = time.perf_counter()
        half = n // 2
        secs = pool.map(_features_part, [(str(sample), 0, half, barrier), (str(sample), half, n, barrier)],
                        chunksize=1)
        wall = time.perf_counter() - t0
    manager.shutdown()
    # the slower worker bounds the pool; model loading and warm-up (before the barrier) are excluded
    out["2proc_1thr_per_s"] = n / max(secs)
    out["2proc_wall_incl_startup_s"] = wall
    out["load_avg_end"] = os.getloadavg()[0]
    return out


# ----------------------------------------------------------------------------------------------- driver


def _child(cmd: list[str]) -> dict:
    res = subprocess.run([sys.executable, __file__, *cmd], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        sys.stderr.write(res.stdout + res.stderr)
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _fmt(v: float, base: float | None, spec: str) -> str:
    s = format(v, spec)
    if base:
        s += f" ({v / base:.2f}x)"
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 20000, 40000], help="slide widths, px")
    ap.add_argument("--max-tiles", type=int, default=2000, help="tiles embedded per size (default 2000)")
    ap.add_argument("--backend", default="auto", choices=["auto", "openslide", "tifffile"])
    ap.add_argument("--pitch-um", type=float, default=100.0, help="virtual spot pitch, µm (Visium: 100)")
    ap.add_argument("--field-pitches", type=float, default=3.0, help="tile side in pitches (tiles.scale: 3)")
    ap.add_argument("--out-px", type=int, default=112, help="tile size fed to the encoder, px")
    ap.add_argument("--thumb", type=int, default=2048, help="thumbnail side for the tissue mask, px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-scaling", action="store_true", help="skip the 1 vs 2 processes feature comparison")
    ap.add_argument("--train-spots", type=int, default=3000,
                    help="spots of the training-slide measurement (a Visium folder with the slide as --fullres)")
    ap.add_argument("--no-train", action="store_true", help="skip the training-slide measurement")
    ap.add_argument("--keep", default="", help="build the slides in this folder, keep them and reuse them next time "
                                               "(default: a temporary folder, deleted)")
    ap.add_argument("--_build", nargs=3, metavar=("PATH", "WIDTH", "PATCHES"), help=argparse.SUPPRESS)
    ap.add_argument("--_measure", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--_scaling", metavar="SAMPLE", help=argparse.SUPPRESS)
    ap.add_argument("--_train", metavar="PATH", help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save-sample", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._build:
        print(json.dumps(build(Path(args._build[0]), int(args._build[1]), Path(args._build[2]), args.seed)))
        return 0
    if args._measure:
        print(json.dumps(measure(Path(args._measure), args)))
        return 0
    if args._scaling:
        print(json.dumps(feature_scaling(Path(args._scaling))))
        return 0
    if args._train:
        print(json.dumps(measure_training(Path(args._train), args)))
        return 0

    images = sorted(DATA.glob("*.jpg"))
    if not images:
        print(f"benchmark data not found: {DATA}/*.jpg (place the shared/ folder beside the repository)",
              file=sys.stderr)
        return 2
    import numpy as np

    from hevisum.io.wsi import he_patches

    common = ["--max-tiles", str(args.max_tiles), "--backend", args.backend, "--pitch-um", str(args.pitch_um),
              "--field-pitches", str(args.field_pitches), "--out-px", str(args.out_px), "--thumb", str(args.thumb),
              "--seed", str(args.seed)]
    rows = []
    scaling = None
    tmp = Path(tempfile.mkdtemp(prefix="hevisum-scale-"))
    keep = Path(args.keep) if args.keep else None
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        np.save(tmp / "patches.npy", he_patches(images[:3], n=48, seed=args.seed))
        print(f"patches: 48 x 256 px from {', '.join(p.name for p in images[:3])} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
        for i, width in enumerate(sorted(args.sizes)):
            path = (keep or tmp) / f"slide_{width}_seed{args.seed}.tif"
            info = path.with_suffix(".json")
            if keep is not None and path.is_file() and info.is_file():
                b = json.loads(info.read_text())
                print(f"reusing {path}", file=sys.stderr)
            else:
                b = _child(["--_build", str(path), str(width), str(tmp / "patches.npy"), "--seed", str(args.seed)])
                info.write_text(json.dumps(b))
                print(f"built {width} px: {b['file_mb']:.0f} MB in {b['build_s']:.0f} s", file=sys.stderr)
            extra = ["--save-sample", str(tmp / "sample.npy")] if i == 0 else []
            m = _child(["--_measure", str(path), *common, *extra])
            print(f"measured {width} px: {m['spots']} spots, {m['total_s']:.0f} s, peak {m['peak_rss_mb']:.0f} MB",
                  file=sys.stderr)
            if not args.no_train:
                tr = ["--_train", str(path), *common, "--train-spots", str(args.train_spots)]
                m["train"] = _child(tr)
                print(f"training path {width} px: {m['train']['tiles']} tiles, "
                      f"{m['train']['read_s'] + m['train']['preprocess_s']:.0f} s, peak {m['train']['peak_rss_mb']:.0f} MB",
                      file=sys.stderr)
                if i == 0:  # the baseline: the whole image decoded into memory, as readers did before
                    m["train_in_memory"] = _child([*tr, "--in-memory"])
            rows.append({**b, **m})
            if keep is None:
                path.unlink()
        if not args.no_scaling:
            scaling = _child(["--_scaling", str(tmp / "sample.npy")])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    base = rows[0]
    metrics = [
        ("level 0, Mpx", lambda r: r["width"] * r["height"] / 1e6, ".0f"),
        ("file, MB", lambda r: r["file_mb"], ".0f"),
        ("build, s", lambda r: r["build_s"], ".1f"),
        ("build peak RSS, MB", lambda r: r["build_peak_rss_mb"], ".0f"),
        ("grid spots", lambda r: r["spots"], ".0f"),
        ("open+thumbnail+mask, s", lambda r: r["open_thumb_mask_s"], ".2f"),
        ("virtual grid, s", lambda r: r["grid_s"], ".3f"),
        ("read all tiles, s", lambda r: r["tiles_s"], ".1f"),
        ("tiles read/s", lambda r: r["tiles_per_s"], ".0f"),
        ("features: tiles", lambda r: r["features_n"], ".0f"),
        ("features, spots/s (2 thr)", lambda r: r["features_per_s"], ".1f"),
        ("wall total, s", lambda r: r["total_s"], ".1f"),
        ("features for all spots, s (proj.)", lambda r: r["projected_all_features_s"], ".0f"),
        ("RSS after imports, MB", lambda r: r["rss_imports_mb"], ".0f"),
        ("peak RSS before features, MB", lambda r: r["rss_before_features_mb"], ".0f"),
        ("peak RSS with features, MB", lambda r: r["peak_rss_mb"], ".0f"),
    ]
    if not args.no_train:
        metrics += [
            ("train: spots (Visium --fullres)", lambda r: r["train"]["train_spots"], ".0f"),
            ("train: working image side, px", lambda r: max(r["train"]["working_image"]), ".0f"),
            ("train: read, s", lambda r: r["train"]["read_s"], ".1f"),
            ("train: preprocess, s", lambda r: r["train"]["preprocess_s"], ".1f"),
            ("train: peak RSS, MB", lambda r: r["train"]["peak_rss_mb"], ".0f"),
        ]
    label_w = max(len(m[0]) for m in metrics)
    dims = [f"{r['width']}x{r['height']}" for r in rows]
    head = " " * label_w + "".join(f"  {d:>20}" for d in dims)
    print(f"backend: {base['backend']}; pitch {args.pitch_um:g} µm, tile {args.field_pitches * args.pitch_um:g} µm "
          f"-> {args.out_px} px, thumbnail {args.thumb} px, {os.cpu_count()} CPUs; ratio to {base['width']} px")
    print(head)
    for label, fn, spec in metrics:
        b0 = fn(base)
        cells = "".join(f"  {_fmt(fn(r), b0 if r is not base else None, spec):>20}" for r in rows)
        print(f"{label:{label_w}}{cells}")
    worst = max(rows, key=lambda r: r["width"])
    print(f"claim: peak RSS at {worst['width']} px = {worst['peak_rss_mb']:.0f} MB "
          f"({'under' if worst['peak_rss_mb'] < 2048 else 'OVER'} 2 GB); growth from {base['width']} px: "
          f"{worst['peak_rss_mb'] - base['peak_rss_mb']:+.0f} MB for "
          f"{worst['width'] * worst['height'] / (base['width'] * base['height']):.0f}x the pixels")
    if not args.no_train:
        lazy, mem = base["train"], base.get("train_in_memory")
        wt = max(rows, key=lambda r: r["width"])["train"]
        print(f"claim: training slide read lazily, peak RSS at {worst['width']} px = {wt['peak_rss_mb']:.0f} MB "
              f"({'under' if wt['peak_rss_mb'] < 2048 else 'OVER'} 2 GB)")
        if mem:
            print(f"baseline at {base['width']} px, the whole image decoded into memory first: peak RSS "
                  f"{mem['peak_rss_mb']:.0f} MB vs {lazy['peak_rss_mb']:.0f} MB lazily "
                  f"({mem['peak_rss_mb'] / lazy['peak_rss_mb']:.2f}x); read + preprocess "
                  f"{mem['read_s'] + mem['preprocess_s']:.1f} s vs {lazy['read_s'] + lazy['preprocess_s']:.1f} s "
                  f"({(mem['read_s'] + mem['preprocess_s']) / (lazy['read_s'] + lazy['preprocess_s']):.2f}x)")
    if scaling:
        print(f"features on {scaling['n']} tiles of {args.out_px} px, spots/s: 1 process x 1 thread "
              f"{scaling['1proc_1thr_per_s']:.1f}; 1 process x 2 threads {scaling['1proc_2thr_per_s']:.1f}; "
              f"2 processes x 1 thread {scaling['2proc_1thr_per_s']:.1f}")
    loads = [r[k] for r in rows for k in ("load_avg_start", "load_avg_end")]
    print(f"load average (1 min) at the start and end of each measurement: {min(loads):.1f}-{max(loads):.1f} on "
          f"{os.cpu_count()} CPUs (other work on the machine slows the timings, multi-threaded torch most)")
    print(json.dumps({"benchmark": "scale", "cpu_count": os.cpu_count(), "backend": base["backend"],
                      "pitch_um": args.pitch_um, "out_px": args.out_px, "sizes": rows, "feature_scaling": scaling}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
