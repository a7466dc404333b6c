"""The preprocessing pipeline: slides in, a self-describing work folder out.

Steps, each switchable in :class:`~hevisum.config.PreprocessConfig`:

1. tissue mask of every slide (white or black background);
2. stain target fitted on tissue patches of the training slides (or one reference slide), unless given;
3. realignment: one global shift per slide (estimated, or set by hand), applied to every spot;
4. invalid training spots (no tissue under them) dropped; every test spot kept;
5. stain normalisation and background fill, then one tile per kept spot into ``tiles.npy``;
6. per-spot ranks of the targets; QC numbers and plots.

Work folder (written whole or not at all)::

    config.toml         resolved PreprocessConfig
    spots.csv           one row per tile, in tile order: slide, spot_id, split, x, y (realigned), x_in, y_in,
                        pitch_px, tile_px, valid, test_set (when present), extra input columns
    tiles.npy           uint8 (N, size, size, 3), np.load(..., mmap_mode="r")
    targets.npy         float32 (N, T), NaN rows for test spots;  ranks.npy: per-spot ranks 1..T, same layout
    target_names.json   the T target names
    stain.json          StainTarget.to_dict()
    dropped_spots.csv   slide, spot_id, x, y of the training spots dropped as invalid
    test_truth.csv      slide, ID, C1..Cn: the truth of test slides that carry it (meta['truth'])
    qc.json             {slide: {shift_px, pitch_px, n_spots, n_valid, tissue_fraction, realign}}; realign = how the
                        shift was decided: {method, applied, proposed_px, score_before, score_after, margin,
                        min_margin, n_edge} (see hevisum.preprocess.spots.realign)
    qc/<slide>_realign.png, qc/overview.png
    timings.json        seconds per step
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from hevisum.config import PreprocessConfig, dump_config, load_config
from hevisum.errors import HevisumError
from hevisum.io.atomic import atomic_dir, check_output
from hevisum.preprocess import qc_plots
from hevisum.names import safe_name
from hevisum.preprocess.spots import Realignment, invalid_spots, realign, spot_pitch
from hevisum.preprocess.stain import StainTarget, apply_mapping, fit_target, stain_mapping, tissue_patch_pixels
from hevisum.preprocess.targets import rank_targets
from hevisum.preprocess.tiles import SourceTiles, TileGeometry, fill_tiles, make_tile_caches, tile_side
from hevisum.preprocess.tissue import mask_background, tissue_mask, tissue_masks, working_factor
from hevisum.slide import Slide, check_same_targets, check_unique_ids

STEPS = ("stain_fit", "normalise_mask", "realign", "tiling", "write")
_FILES = ("config.toml", "spots.csv", "tiles.npy", "targets.npy", "ranks.npy", "target_names.json", "stain.json",
          "qc.json")
_SPOT_COLUMNS = ["slide", "spot_id", "split", "x", "y", "x_in", "y_in", "pitch_px", "tile_px", "valid"]


@dataclass
class Prepared:
    """A preprocessed work folder, loaded: spots table, tile cache (memory-mapped), targets and QC."""

    workdir: Path
    spots: pd.DataFrame
    tiles: np.ndarray
    targets: np.ndarray
    ranks: np.ndarray
    target_names: list[str]
    qc: dict
    stain: StainTarget
    config: PreprocessConfig
    timings: dict = field(default_factory=dict)
    extra_tiles: dict = field(default_factory=dict)  # geometry name -> (N, S, S, 3) uint8, tiles_<name>.npy

    def rows(self, split: str | None = None, slides: Sequence[str] | str | None = None) -> np.ndarray:
        """Row indices (tile order) of the spots of ``split`` and/or ``slides``."""
        keep = np.ones(len(self.spots), dtype=bool)
        if split is not None:
            keep &= (self.spots["split"] == split).to_numpy()
        if slides is not None:
            names = [slides] if isinstance(slides, str) else list(slides)
            known = set(self.slide_ids())
            unknown = [s for s in names if s not in known]
            if unknown:
                raise HevisumError(f"slide(s) {unknown} not in {self.workdir}; slides are {self.slide_ids()}")
            keep &= self.spots["slide"].isin(names).to_numpy()
        return np.flatnonzero(keep)

    def slide_ids(self, split: str | None = None) -> list[str]:
        """Slide ids in tile order (only those of ``split`` when given)."""
        sp = self.spots if split is None else self.spots[self.spots["split"] == split]
        return list(dict.fromkeys(sp["slide"].astype(str)))

    def summary(self) -> str:
        """One line: slides, spots, tiles and the shifts applied."""
        n_train = len(self.slide_ids("train"))
        n_test = len(self.slide_ids("test"))
        dropped = sum(int(q["n_spots"]) for q in self.qc.values()) - len(self.spots)
        shifts = ", ".join(f"{s} ({q['shift_px'][0]:+.1f}, {q['shift_px'][1]:+.1f})" for s, q in self.qc.items())
        side = self.tiles.shape[1] if self.tiles.ndim == 4 else 0
        return (f"{len(self.qc)} slides ({n_train} train, {n_test} test), {len(self.spots)} spots -> "
                f"{len(self.tiles)} tiles {side}x{side} ({dropped} dropped); stain {self.stain.method}; "
                f"shifts px: {shifts}")


def preprocess(slides: Sequence[Slide], cfg: PreprocessConfig, workdir: Path, progress: bool = True,
               stain_target: StainTarget | None = None, keep_all_spots: bool = False,
               geometries: Sequence[TileGeometry] = (), force: bool = False,
               protect: Sequence[str | Path | None] = (), workers: int | None = None) -> Prepared:
    """Run the preprocessing pipeline on ``slides`` and write ``workdir`` (see the module doc).

    stain_target: use this target instead of fitting one (prediction with a saved run).
    keep_all_spots: keep every spot, also training spots without tissue (prediction).
    geometries: further tile caches (``tiles_<name>.npy``) cut in the same pass, e.g. an encoder's own field of
    view at its microns per pixel, or a wider context; ``geometry.json`` records each slide's side in pixels.
    workers: processes for the per-slide steps (masks, realignment, normalisation, tiles); None = the process-wide
    setting (:mod:`hevisum.workers`), 0 = one per CPU (at most 4). The work folder is the same bytes whatever the
    number.
    A failure leaves no work folder behind (and an existing one untouched).
    """
    slides = list(slides)
    workdir = Path(workdir)
    # ---- check everything that can be checked before any work or writing
    target_names = _check_inputs(slides, cfg, stain_target)
    check_output(workdir, force=force, protect=protect, kind="prep")
    pitches = {s.slide_id: _pitch(s, cfg) for s in slides}
    timings = {k: 0.0 for k in STEPS}

    from hevisum import workers as procs

    n_workers = max(1, min(procs.workers() if workers is None else procs.resolve(workers), len(slides)))
    shared = {"slides": slides, "cfg": cfg, "pitches": pitches, "keep_all": keep_all_spots}

    # ---- 1, 3-4. per slide: tissue masks (the main one, and a sharp-edged one for realignment, sharing the
    # tissue score), realignment and invalid spots
    t0 = time.perf_counter()
    masks: dict[str, np.ndarray] = {}
    plans = []
    secs: dict[str, float] = {}
    for s, (mask, plan, took) in zip(slides, map_slides(_mask_and_plan, range(len(slides)), shared, n_workers,
                                                         progress and "tissue masks, realign")):
        masks[s.slide_id] = mask
        plans.append(plan)
        _add(secs, took)
    _share_wall(timings, time.perf_counter() - t0, secs)
    rows = np.concatenate([[0], np.cumsum([int(p["keep"].sum()) for p in plans])]).tolist()  # each slide's first row
    n_tiles = rows[-1]

    # ---- 2. stain target: fitted on tissue patches of the training slides (or the reference slide) only
    t0 = time.perf_counter()
    target = stain_target if stain_target is not None else _fit_stain(slides, masks, cfg)
    timings["stain_fit"] += time.perf_counter() - t0

    with atomic_dir(workdir, force=force, protect=protect, kind="prep") as tmp:
        # ---- 5. per slide: normalise, then its tiles into its rows of every tile cache (files made here, filled
        # by whichever process does the slide: the same bytes in any order)
        t0 = time.perf_counter()
        caches = [(tmp / "tiles.npy", cfg.tiles.size)] + [(tmp / f"tiles_{g.name}.npy", g.size) for g in geometries]
        make_tile_caches(caches, n_tiles)
        shared.update(masks=masks, plans=plans, target=target, geometries=list(geometries), caches=caches, rows=rows)
        thumbs: dict[str, np.ndarray] = {}
        geom_qc: dict = {}
        secs = {}
        for s, (thumb, gq, took) in zip(slides, map_slides(_normalise_and_tile, range(len(slides)), shared,
                                                            n_workers, progress and "tiles")):
            thumbs[s.slide_id], geom_qc[s.slide_id] = thumb, gq
            _add(secs, took)
        _share_wall(timings, time.perf_counter() - t0, secs)
        (tmp / "geometry.json").write_text(json.dumps(
            {"geometries": [g.as_dict() for g in geometries], "slides": geom_qc}, indent=1))

        # ---- 6. tables, targets, ranks, QC
        t0 = time.perf_counter()
        spots, targets, dropped, qc = _tables(slides, plans, masks, target_names)
        ranks = rank_targets(targets, cfg.targets.tie_tol) if targets.shape[1] else targets.copy()
        spots.to_csv(tmp / "spots.csv", index=False)
        np.save(tmp / "targets.npy", targets)
        np.save(tmp / "ranks.npy", ranks)
        (tmp / "target_names.json").write_text(json.dumps(target_names))
        (tmp / "stain.json").write_text(json.dumps(target.to_dict(), indent=1))
        dropped.to_csv(tmp / "dropped_spots.csv", index=False)
        truth = _test_truth(slides)
        if truth is not None:
            truth.to_csv(tmp / "test_truth.csv", index=False)
        (tmp / "qc.json").write_text(json.dumps(qc, indent=1))
        dump_config(cfg, tmp / "config.toml")
        _write_qc_plots(tmp / "qc", slides, plans, masks, thumbs)
        timings["write"] += time.perf_counter() - t0
        (tmp / "timings.json").write_text(json.dumps(timings, indent=1))
    prepared = load_prepared(workdir)
    prepared.timings = timings
    return prepared


# ----------------------------------------------------------------------------------------------- per slide, in a pool


_SHARED: dict = {}  # what the per-slide functions read: set before the pool forks, inherited, never pickled


def map_slides(fn, items, shared: dict, workers: int, progress: str | bool = False) -> list:
    """``[fn(shared, i) for i in items]``, in order; with ``workers`` > 1 in a pool of forked processes.

    Forked workers inherit ``shared`` (slides, masks, config) without copying or pickling it; only ``fn``'s results
    travel back. Each slide's work depends on that slide alone (its own random streams), so the results and the
    tiles written are the same bytes whatever the number of workers. A worker's exception is raised here.
    """
    import multiprocessing as mp

    from tqdm.auto import tqdm

    items = list(items)
    bar = tqdm(total=len(items), desc=progress or "", unit="slide", disable=not progress)
    try:
        if workers <= 1 or len(items) <= 1 or "fork" not in mp.get_all_start_methods():
            out = []
            for i in items:
                out.append(fn(shared, i))
                bar.update(1)
            return out
        from concurrent.futures import ProcessPoolExecutor

        _SHARED.clear()
        _SHARED.update(shared)
        try:
            # an error cancels the slides not started and waits for the running ones to finish (no worker is killed
            # holding a queue lock, which can hang a multiprocessing.Pool's terminate)
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as ex:
                futures = [ex.submit(_in_worker, fn, i) for i in items]
                out = []
                try:
                    for f in futures:
                        out.append(f.result())
                        bar.update(1)
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
                return out
        finally:
            _SHARED.clear()
    finally:
        bar.close()


def _in_worker(fn, i):
    return fn(_SHARED, i)


def _add(total: dict, part: dict) -> None:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v


def _share_wall(timings: dict, wall: float, secs: dict) -> None:
    """Add a stage's wall time to its steps in proportion to the seconds its slides spent in each."""
    busy = sum(secs.values())
    for k, v in secs.items():
        timings[k] += wall * (v / busy if busy > 0 else 1.0 / len(secs))


def _mask_and_plan(shared: dict, i: int) -> tuple[np.ndarray, dict, dict]:
    """Slide ``i``: tissue mask (+ the sharp one realignment uses) and its plan (shift, validity, kept spots)."""
    s, cfg = shared["slides"][i], shared["cfg"]
    pitch = shared["pitches"][s.slide_id]
    t0 = time.perf_counter()
    sigmas = [cfg.tissue.blur_sigma]
    if cfg.realign.enabled and s.slide_id not in cfg.realign.manual:
        sigmas.append(_realign_sigma(s.image.shape, pitch, cfg))
    got = tissue_masks(s.image, sigmas, cfg.tissue.background, cfg.tissue.max_side)
    t1 = time.perf_counter()
    plan = _plan_slide(s, got[0], got[1] if len(got) > 1 else None, pitch, cfg, shared["keep_all"])
    return got[0], plan, {"normalise_mask": t1 - t0, "realign": time.perf_counter() - t1}


def _normalise_and_tile(shared: dict, i: int) -> tuple[np.ndarray, dict, dict]:
    """Slide ``i``: stain-normalise, fill the background, write its tiles into its rows of every cache file.
    Returns (QC thumbnail of the normalised image, geometry QC, seconds per step)."""
    s, cfg, plan = shared["slides"][i], shared["cfg"], shared["plans"][i]
    mask, geometries = shared["masks"][s.slide_id], shared["geometries"]
    t0 = time.perf_counter()
    mapping = stain_mapping(s.image, shared["target"], mask, seed=cfg.stain.seed)
    image = apply_mapping(s.image, mapping)
    if cfg.tissue.mask_background:
        image = mask_background(image, mask, cfg.tissue.fill)
    thumb = qc_plots.thumbnail(image, qc_plots.thumb_step(image.shape, 500)).copy()
    t1 = time.perf_counter()
    sides = [g.side_px(plan["pitch"], s.um_per_px) for g in geometries]
    geom_qc = {g.name: {"side_px": sd, "physical": phys} for g, (sd, phys) in zip(geometries, sides)}
    xy = plan["xy"][plan["keep"]]
    row0 = shared["rows"][i]
    level0 = s.meta.get("level0")
    if not isinstance(level0, dict):
        fill_tiles(shared["caches"], row0, image, xy, [plan["tile_px"]] + [sd for sd, _ in sides])
    else:
        # a file read region by region: every tile from its full-resolution pixels, at exact sides
        del image
        with SourceTiles(level0, mapping, mask if cfg.tissue.mask_background else None, cfg.tissue.fill) as src:
            fill_tiles(shared["caches"], row0, src, xy, [cfg.tiles.scale * plan["pitch"]]
                       + [g.side_exact(plan["pitch"], s.um_per_px) for g in geometries])
    return thumb, geom_qc, {"normalise_mask": t1 - t0, "tiling": time.perf_counter() - t1}


def load_prepared(workdir: str | Path) -> Prepared:
    """Load a work folder written by :func:`preprocess` (tiles memory-mapped, read-only)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        raise HevisumError(f"preprocessed work folder {str(workdir)!r} not found; run 'hevisum preprocess' first")
    missing = [f for f in _FILES if not (workdir / f).is_file()]
    if missing:
        raise HevisumError(f"{workdir}: not a complete preprocessed work folder, missing {missing}")
    # ids stay strings ("NA" or "007" are valid spot ids)
    # round_trip: coordinates come back bit for bit (full-resolution Visium positions are joined on them)
    spots = pd.read_csv(workdir / "spots.csv", dtype={"slide": str, "spot_id": str, "split": str},
                        keep_default_na=False, float_precision="round_trip")
    if "test_set" in spots:
        spots["test_set"] = pd.to_numeric(spots["test_set"], errors="coerce").astype("Int64")
    tiles = np.load(workdir / "tiles.npy", mmap_mode="r")
    targets = np.load(workdir / "targets.npy")
    ranks = np.load(workdir / "ranks.npy")
    if not (len(spots) == len(tiles) == len(targets) == len(ranks)):
        raise HevisumError(f"{workdir}: spots.csv ({len(spots)} rows), tiles.npy ({len(tiles)}), targets.npy "
                           f"({len(targets)}) and ranks.npy ({len(ranks)}) disagree; preprocess again")
    timings_path = workdir / "timings.json"
    extra = {p.stem[len("tiles_"):]: np.load(p, mmap_mode="r") for p in sorted(workdir.glob("tiles_*.npy"))}
    return Prepared(extra_tiles=extra,
        workdir=workdir, spots=spots, tiles=tiles, targets=targets, ranks=ranks,
        target_names=list(json.loads((workdir / "target_names.json").read_text())),
        qc=json.loads((workdir / "qc.json").read_text()),
        stain=StainTarget.from_dict(json.loads((workdir / "stain.json").read_text())),
        config=load_config(PreprocessConfig, workdir / "config.toml"),
        timings=json.loads(timings_path.read_text()) if timings_path.is_file() else {},
    )


# ----------------------------------------------------------------------------------------------- steps


def _check_inputs(slides: list[Slide], cfg: PreprocessConfig, stain_target: StainTarget | None) -> list[str]:
    """Validate slides and config against each other; return the target names (empty without targets)."""
    if not slides:
        raise HevisumError("no slides to preprocess")
    check_unique_ids(slides)
    for s in slides:
        s.validate()
        if s.split == "train" and s.targets is None:
            raise HevisumError(f"{s.where()}: a training slide needs targets; mark it as a test slide instead")
        t = s.targets
        if s.split == "train" and t is not None and np.size(t) and float(np.max(t)) == float(np.min(t)):
            raise HevisumError(
                f"{s.where()}: every target of every spot is {float(np.max(t)):g}; a training slide needs targets "
                f"that vary (if its targets are unknown, mark it as Test: --test {s.slide_id!r})"
            )
    ids = [s.slide_id for s in slides]
    unknown = [k for k in cfg.realign.manual if k not in ids]
    if unknown:
        raise HevisumError(f"realign.manual names unknown slide(s) {unknown}; slides are {ids}")
    for s in slides:
        truth = s.meta.get("truth")
        if s.split == "test" and truth is not None:
            shape = np.shape(truth)
            if len(shape) != 2 or shape[0] != s.n_spots:
                raise HevisumError(f"{s.where()}: meta['truth'] has shape {shape}; expected ({s.n_spots}, "
                                   "n_targets), one row per spot")
    ref = cfg.stain.reference_slide
    if ref and ref not in ids:
        raise HevisumError(f"stain.reference_slide = {ref!r} is not a slide; slides are {ids}")
    if stain_target is None and cfg.stain.method != "none" and not ref and not any(s.split == "train" for s in slides):
        raise HevisumError(f"stain.method = {cfg.stain.method!r} fits its target on training slides, but all "
                           f"slides {ids} are test slides; set stain.reference_slide to one of them, "
                           "pass a saved stain target, or set stain.method = 'none'")
    return list(check_same_targets([s for s in slides if s.split == "train"]) or [])


def _pitch(s: Slide, cfg: PreprocessConfig) -> float:
    """The slide's spot pitch: from the config when set, else measured from its spots."""
    if cfg.tiles.pitch_px > 0:
        return float(cfg.tiles.pitch_px)
    try:
        return spot_pitch(s.xy)
    except ValueError as e:
        raise HevisumError(f"{s.where()}: cannot measure the spot pitch ({e}); set tiles.pitch_px in the config") \
            from None


def _fit_stain(slides: list[Slide], masks: dict, cfg: PreprocessConfig) -> StainTarget:
    """Fit the stain target on tissue patches of the reference slide, or of every training slide."""
    sc = cfg.stain
    if sc.method == "none":
        return fit_target("none", np.zeros((0, 3), np.uint8))
    fit_on = [s for s in slides if s.slide_id == sc.reference_slide] if sc.reference_slide else \
        [s for s in slides if s.split == "train"]
    pixels = []
    for i, s in enumerate(fit_on):
        # one random stream per slide: adding a slide does not change the others' patches
        rng = np.random.default_rng([sc.seed, i])
        pixels.append(tissue_patch_pixels(s.image, masks[s.slide_id], sc.patch_size, sc.n_patches,
                                          sc.min_tissue, rng))
    return fit_target(sc.method, pixels)


def _plan_slide(s: Slide, mask: np.ndarray, sharp: np.ndarray | None, pitch: float, cfg: PreprocessConfig,
                keep_all: bool) -> dict:
    """Shift, realigned coordinates, validity and which spots get a tile, for one slide."""
    xy_in = s.xy
    if s.slide_id in cfg.realign.manual:
        decision = Realignment.fixed(tuple(float(v) for v in cfg.realign.manual[s.slide_id]), "manual")
    elif cfg.realign.enabled:
        if sharp is None:
            sharp = realignment_mask(s.image, pitch, cfg)
        # applied only when it raises the on-tissue evidence by a clear margin over the unshifted grid
        decision = realign(sharp, xy_in, pitch, cfg.realign.max_shift_pitches * pitch, image=s.image,
                           min_margin=float(cfg.realign.min_margin),
                           min_gain=cfg.realign.min_gain)
    else:
        decision = Realignment.fixed((0.0, 0.0), "off")
    dx, dy = decision.shift
    xy = xy_in + np.array([dx, dy])
    window = cfg.spots.window_pitches * pitch
    valid = ~invalid_spots(mask, xy, window, cfg.spots.min_tissue)
    if s.split == "train" and cfg.spots.drop_invalid and not keep_all:
        keep = valid
    else:
        keep = np.ones(len(xy), dtype=bool)  # test spots (and prediction) keep every spot
    return {"shift": (float(dx), float(dy)), "realign": decision, "xy": xy, "valid": valid, "keep": keep,
            "pitch": pitch, "tile_px": tile_side(pitch, cfg.tiles.scale)}


def realignment_mask(image: np.ndarray, pitch: float, cfg: PreprocessConfig) -> np.ndarray:
    """The tissue mask realignment uses: blurred by ``realign.blur_pitches`` pitches only (sharp edges pin
    the spot grid down; the blur of the main mask would move them by a good part of a pitch)."""
    return tissue_mask(image, cfg.tissue.background, _realign_sigma(image.shape, pitch, cfg), cfg.tissue.max_side)


def _realign_sigma(shape: tuple[int, ...], pitch: float, cfg: PreprocessConfig) -> float:
    """Blur (working-scale px) of the realignment mask: ``realign.blur_pitches`` pitches, at most the main blur."""
    return min(cfg.realign.blur_pitches * pitch / working_factor(shape, cfg.tissue.max_side), cfg.tissue.blur_sigma)


def _tables(slides: list[Slide], plans: list[dict], masks: dict, target_names: list[str]):
    """spots.csv rows, targets (N, T), dropped spots and qc.json, in tile order."""
    frames, ys, dropped, qc = [], [], [], {}
    has_test_set = any("test_set" in s.spots for s in slides)
    n_t = len(target_names)
    for s, plan in zip(slides, plans):
        keep, xy = plan["keep"], plan["xy"]
        sp = s.spots.reset_index(drop=True)
        df = pd.DataFrame({
            "slide": s.slide_id, "spot_id": sp["spot_id"].astype(str).to_numpy(), "split": s.split,
            "x": xy[:, 0], "y": xy[:, 1], "x_in": sp["x"].to_numpy(float), "y_in": sp["y"].to_numpy(float),
            "pitch_px": plan["pitch"], "tile_px": plan["tile_px"], "valid": plan["valid"],
            "group": str(s.meta.get("group", s.slide_id)), "um_per_px": s.um_per_px or np.nan,
        })
        if has_test_set:
            df["test_set"] = pd.array(sp["test_set"], dtype="Int64") if "test_set" in sp else \
                pd.array([pd.NA] * len(sp), dtype="Int64")
        # other input columns (barcode, array position...) travel along
        for col in sp.columns:
            if col not in df.columns and col not in ("x", "y"):
                df[col] = sp[col].to_numpy()
        frames.append(df[keep])
        if s.targets is not None and s.split == "train":
            ys.append(np.asarray(s.targets, dtype=np.float32)[keep])
        else:
            ys.append(np.full((int(keep.sum()), n_t), np.nan, dtype=np.float32))
        gone = ~keep
        dropped.append(pd.DataFrame({"slide": s.slide_id, "spot_id": df["spot_id"][gone].to_numpy(),
                                     "x": xy[gone, 0], "y": xy[gone, 1]}))
        qc[s.slide_id] = {"shift_px": [float(plan["shift"][0]), float(plan["shift"][1])],
                          "pitch_px": float(plan["pitch"]), "n_spots": int(len(xy)),
                          "n_valid": int(plan["valid"].sum()),
                          "tissue_fraction": round(float(masks[s.slide_id].mean()), 5),
                          "realign": plan["realign"].as_dict()}
    spots = pd.concat(frames, ignore_index=True)
    spots = spots[_SPOT_COLUMNS + [c for c in spots.columns if c not in _SPOT_COLUMNS]]
    targets = np.concatenate(ys) if ys else np.zeros((0, n_t), np.float32)
    return spots, targets, pd.concat(dropped, ignore_index=True), qc


def _test_truth(slides: list[Slide]) -> pd.DataFrame | None:
    """slide, ID, C1..Cn of the test slides that carry their truth in ``meta['truth']``."""
    frames = []
    for s in slides:
        truth = s.meta.get("truth")
        if s.split != "test" or truth is None:
            continue
        truth = np.asarray(truth, dtype=np.float64)
        df = pd.DataFrame(truth, columns=[f"C{i + 1}" for i in range(truth.shape[1])])
        df.insert(0, "ID", s.spots["spot_id"].astype(str).to_numpy())
        df.insert(0, "slide", s.slide_id)
        frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else None


def _write_qc_plots(folder: Path, slides: list[Slide], plans: list[dict], masks: dict, thumbs: dict) -> None:
    """qc/<slide>_realign.png (spots before/after on the raw slide) and qc/overview.png (all slides)."""
    folder.mkdir(parents=True, exist_ok=True)
    for s, plan in zip(slides, plans):
        fig, (ax,) = qc_plots.new_figure(1, ncols=1, size=6.5)
        dx, dy = plan["shift"]
        r = plan["realign"]
        how = r.method
        if r.margin is not None:
            px, py = r.proposed
            how = (f"{'applied' if r.applied else 'not applied'}: best ({px:+.1f}, {py:+.1f}) px, evidence "
                   f"{r.score_before:+.2f} -> {r.score_after:+.2f}, margin {r.margin:+.2f} (needs {r.min_margin:.2f})")
        qc_plots.plot_realign(ax, s.image, masks[s.slide_id], s.xy, plan["xy"],
                              title=[f"{s.slide_id} ({s.split}): shift ({dx:+.1f}, {dy:+.1f}) px, "
                                     f"pitch {plan['pitch']:.1f} px", how])
        qc_plots.save_figure(fig, folder / f"{safe_name(s.slide_id)}_realign.png")
    fig, axes = qc_plots.new_figure(len(slides), ncols=4)
    for ax, s, plan in zip(axes, slides, plans):
        img = thumbs[s.slide_id]
        step = qc_plots.thumb_step(s.image.shape, 500)
        xy = (plan["xy"] + 0.5) / step - 0.5
        n_bad = int((~plan["valid"]).sum())
        qc_plots.plot_slide_qc(ax, img, xy, plan["valid"], max_side=10**6,
                               title=f"{s.slide_id} ({s.split}) {len(xy)} spots, {n_bad} off tissue")
    qc_plots.save_figure(fig, folder / "overview.png")
