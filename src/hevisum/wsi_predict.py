"""Prediction on a whole-slide image without a spot table: ``hevisum predict RUN_DIR SLIDE --out DIR``.

A slide (SVS, NDPI, MRXS, TIFF pyramid, OME-TIFF, or a plain PNG/JPEG) is read region by region
(:mod:`hevisum.io.wsi`): its level 0 is never loaded. The steps:

1. the thumbnail (``tissue.max_side`` px) and its tissue mask (the run's ``[tissue]`` settings);
2. a virtual spot grid over the tissue (:func:`hevisum.grid.virtual_grid`), hexagonal by default, at the
   training slides' spot pitch in µm (``--grid-um`` to choose another);
3. the slide's own stain, estimated once from the tissue pixels of a sample of its tiles, and turned into a
   colour lookup table that maps every RGB colour the way :func:`hevisum.preprocess.stain.normalize` maps it to
   the run's stain target (:class:`SlideStain`);
4. one tile per grid spot and tile geometry, cut as the run cut its training tiles (``tiles.scale`` pitches,
   resized to ``tiles.size``; the encoder's own field of view or a wide one when the run used them), read on
   demand, stain-normalised, the background outside the tissue mask filled, and written batch by batch into
   memory-mapped tile caches in the work folder;
5. the run's selected method (or the stacker over its methods) on those tiles, as ``hevisum predict`` does for
   a spot table (:func:`hevisum.predict.predict_method`);
6. ``predictions.csv``, ``predictions.h5ad`` (scanpy/squidpy layout, level-0 pixel frame), ``slide.json`` and
   one heat map per chosen target under ``heatmaps/``.

Memory: the thumbnail and its mask, the colour lookup table (48 MB), one batch of tiles, and the features; the
tile caches live on disk and are deleted at the end.

Two pitches are kept apart: the *model pitch* (the training slides' pitch, in this slide's level-0 pixels) sets
what every tile covers and the neighbourhoods of smoothing and ring contexts, so the models see what they were
trained on; the *grid pitch* (``--grid-um``, by default the model pitch) only sets how far apart the grid spots
are. When the run does not know its training pitch in µm, ``--grid-um`` stands for it too.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import numpy as np
import pandas as pd

from hevisum.errors import HevisumError

__all__ = ["SlideStain", "fit_slide_stain", "is_slide_image", "predict_slide", "slide_id_for", "training_pitch_um"]

#: grid spots whose tiles sample the slide's own stain (evenly spread over the grid)
STAIN_SAMPLE_SPOTS = 256
#: targets drawn when none are asked for: the most variable predicted ones
DEFAULT_PLOTS = 4
_LUT_WIDTH = 4096  # 4096 x 4096 = every 24-bit colour


def is_slide_image(path: str | Path) -> bool:
    """True for a file whose suffix is a slide or image format of :mod:`hevisum.io.wsi` (not a folder)."""
    from hevisum.io.wsi import WSI_SUFFIXES

    p = Path(path)
    return p.suffix.lower() in WSI_SUFFIXES and not p.is_dir()


def slide_id_for(path: str | Path) -> str:
    """The slide's name: the file name without its suffix (``.ome.tif`` counted as one suffix)."""
    name = Path(path).name
    low = name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if low.endswith(suffix):
            return name[: -len(suffix)] or name
    return Path(name).stem or name


# ============================================================================================ training pitch


def training_pitch_um(run_dir: Path) -> tuple[float | None, str]:
    """``(spot pitch of the training slides in µm, where it was read)``, or ``(None, why not)``.

    Read from ``prep/spots.csv`` (``pitch_px`` x ``um_per_px`` of each training slide; the median over slides),
    else derived from ``prep/geometry.json`` when the run cut tiles of a physical field of view (``fov_um`` over
    the side in pixels gives the slide's µm/px, to within the rounding of the side).
    """
    prep = Path(run_dir) / "prep"
    spots_csv = prep / "spots.csv"
    if not spots_csv.is_file():
        return None, f"{spots_csv} is missing"
    try:
        head = pd.read_csv(spots_csv, nrows=0).columns
        cols = [c for c in ("slide", "split", "pitch_px", "um_per_px") if c in head]
        spots = pd.read_csv(spots_csv, usecols=cols, dtype={"slide": str, "split": str}, keep_default_na=False)
    except (OSError, ValueError) as e:
        return None, f"{spots_csv} cannot be read ({e})"
    if not {"slide", "pitch_px"} <= set(spots.columns) or spots.empty:
        return None, f"{spots_csv} has no per-slide pitch"
    if "split" in spots and (spots["split"] == "train").any():
        spots = spots[spots["split"] == "train"]
    per_slide = spots.groupby("slide", sort=True).first()
    pitch_px = pd.to_numeric(per_slide["pitch_px"], errors="coerce")
    if "um_per_px" in per_slide:
        um = pd.to_numeric(per_slide["um_per_px"], errors="coerce")
        pitch_um = (pitch_px * um).to_numpy(np.float64)
        pitch_um = pitch_um[np.isfinite(pitch_um) & (pitch_um > 0)]
        if pitch_um.size:
            return float(np.median(pitch_um)), f"training slides' pitch x um_per_px ({spots_csv})"
    um_geo = _um_from_geometry(prep / "geometry.json")
    if um_geo:
        pitch_um = np.array([pitch_px.get(s, np.nan) * u for s, u in um_geo.items()], dtype=np.float64)
        pitch_um = pitch_um[np.isfinite(pitch_um) & (pitch_um > 0)]
        if pitch_um.size:
            return float(np.median(pitch_um)), f"training slides' pitch x (field of view / tile side) " \
                                               f"({prep / 'geometry.json'})"
    return None, "the training slides' microns per pixel are not recorded in the run folder"


def _um_from_geometry(path: Path) -> dict[str, float]:
    """slide -> µm/px, from the physical tile geometries recorded in geometry.json."""
    try:
        geo = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    fov = {g.get("name"): float(g.get("fov_um") or 0) for g in geo.get("geometries", []) if isinstance(g, dict)}
    out = {}
    for slide, entries in (geo.get("slides") or {}).items():
        for name, e in (entries or {}).items():
            if fov.get(name, 0) > 0 and isinstance(e, dict) and e.get("physical") and e.get("side_px"):
                out[str(slide)] = fov[name] / float(e["side_px"])
                break
    return out


def _physical_geometries(run_dir: Path) -> dict[str, bool]:
    """geometry name -> whether the training tiles of that geometry were cut at a physical field of view."""
    try:
        geo = json.loads((Path(run_dir) / "prep" / "geometry.json").read_text())
    except (OSError, ValueError):
        return {}
    seen: dict[str, list[bool]] = {}
    for entries in (geo.get("slides") or {}).values():
        for name, e in (entries or {}).items():
            if isinstance(e, dict):
                seen.setdefault(name, []).append(bool(e.get("physical")))
    return {name: any(v) for name, v in seen.items()}


# ============================================================================================ stain


@dataclass
class SlideStain:
    """The mapping of a slide's colours to the run's stain target, estimated once for the whole slide.

    ``lut``: ``(2**24, 3)`` uint8, the normalised colour of every RGB colour (index ``r << 16 | g << 8 | b``),
    or None for ``stain.method = "none"``. ``n_pixels``: tissue pixels the slide's stain was estimated from.
    """

    method: str
    lut: np.ndarray | None
    n_pixels: int

    def apply(self, tiles: np.ndarray) -> np.ndarray:
        """Normalised copy of uint8 RGB pixels ``(..., 3)``."""
        if self.lut is None:
            return np.array(tiles, copy=True)
        t = np.asarray(tiles)
        idx = (t[..., 0].astype(np.uint32) << 16) | (t[..., 1].astype(np.uint32) << 8) | t[..., 2]
        return self.lut[idx]


def fit_slide_stain(target, pixels: np.ndarray, seed: int = 0) -> SlideStain:
    """:class:`SlideStain` of a slide whose tissue pixels ``(N, 3)`` are given.

    :func:`hevisum.preprocess.stain.normalize` estimates an image's own stain from its tissue (mask) pixels and
    maps every pixel with it. Here it is called once on an image holding the slide's tissue pixels (the mask)
    followed by all 2**24 colours (outside the mask): the normalised colours are the lookup table, so every tile
    of the slide is mapped exactly as ``normalize`` would map it, with one estimate for the whole slide.
    """
    from hevisum.preprocess.stain import normalize

    px = np.asarray(pixels, dtype=np.uint8).reshape(-1, 3)
    if target.method == "none":
        return SlideStain("none", None, len(px))
    w = _LUT_WIDTH
    head = -(-len(px) // w)  # rows holding the slide's pixels
    image = np.empty((head + w, w, 3), dtype=np.uint8)
    flat = image[:head].reshape(-1, 3)
    flat[:len(px)] = px
    flat[len(px):] = 255
    # lookup row i, column j holds colour i * 4096 + j = r << 16 | g << 8 | b (broadcast, no full-size temporaries)
    rows = np.arange(w, dtype=np.uint16)[:, None]
    cols = np.arange(w, dtype=np.uint16)[None, :]
    image[head:, :, 0] = (rows >> 4).astype(np.uint8)
    np.bitwise_or(((rows & 15) << 4).astype(np.uint8), (cols >> 8).astype(np.uint8), out=image[head:, :, 1])
    image[head:, :, 2] = (cols & 255).astype(np.uint8)
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask.reshape(-1)[:len(px)] = True
    out = normalize(image, target, mask, seed=seed)
    del image, mask
    lut = np.ascontiguousarray(out[head:].reshape(-1, 3))
    return SlideStain(target.method, lut, len(px))


# ============================================================================================ tiles


def tile_masks(mask: np.ndarray, scale: float, xy: np.ndarray, side: float, size: int) -> np.ndarray:
    """Tissue mask ``(n, size, size)`` of the tiles of side ``side`` level-0 px around ``xy``: the thumbnail
    ``mask`` (``scale`` thumbnail px per level-0 px) sampled at each tile pixel's centre (nearest pixel, as the
    training pipeline upsamples its mask); outside the mask is background."""
    h, w = mask.shape
    offs = (np.arange(size) + 0.5) * (side / size) - side / 2
    u = (np.asarray(xy[:, 0:1], np.float64) + offs[None, :]) * scale  # (n, size) thumbnail x of each column
    v = (np.asarray(xy[:, 1:2], np.float64) + offs[None, :]) * scale
    col, row = np.floor(u).astype(np.int64), np.floor(v).astype(np.int64)
    cin, rin = (col >= 0) & (col < w), (row >= 0) & (row < h)
    m = mask[np.clip(row, 0, h - 1)[:, :, None], np.clip(col, 0, w - 1)[:, None, :]]
    return m & rin[:, :, None] & cin[:, None, :]


@dataclass
class _Geometry:
    name: str  # "spot" or an extra geometry of the run (tiles_<name>.npy)
    side: float  # level-0 px
    size: int  # output px


def _geometries(cfg, methods: list[str], run_dir: Path, pitch_px: float, um_per_px: float) -> list[_Geometry]:
    """The tile caches the methods read, with their side in this slide's level-0 pixels."""
    from hevisum.pipeline import tile_geometries
    from hevisum.preprocess.tiles import tile_side

    out = [_Geometry("spot", float(tile_side(pitch_px, cfg.tiles.scale)), int(cfg.tiles.size))]
    physical = _physical_geometries(run_dir)
    for g in tile_geometries(cfg, methods):
        # a geometry the training slides could only cut at a multiple of the pitch (no µm/px) is cut so here too
        um = um_per_px if physical.get(g.name, True) else None
        out.append(_Geometry(g.name, float(g.side_px(pitch_px, um)[0]), int(g.size)))
    return out


def _write_tile_caches(src, spots: pd.DataFrame, geoms: list[_Geometry], stain: SlideStain, mask: np.ndarray,
                       scale: float, cfg, workdir: Path, progress: bool, batch: int) -> dict[str, np.ndarray]:
    """Cut, normalise and mask every tile of every geometry into ``workdir/tiles[_<name>].npy``, batch by batch;
    returns the caches opened read-only (memory-mapped)."""
    from tqdm.auto import tqdm

    from hevisum.io.wsi import read_tiles

    fill = {"white": 255, "black": 0}[cfg.tissue.fill]
    xy = spots[["x", "y"]].to_numpy(np.float64)
    n = len(xy)
    paths = {g.name: workdir / ("tiles.npy" if g.name == "spot" else f"tiles_{g.name}.npy") for g in geoms}
    arrays = {g.name: np.lib.format.open_memmap(paths[g.name], mode="w+", dtype=np.uint8,
                                                shape=(n, g.size, g.size, 3)) for g in geoms}
    with tqdm(total=n, desc="slide tiles", unit="spot", disable=not progress) as bar:
        for s0 in range(0, n, batch):
            chunk = xy[s0:s0 + batch]
            for g in geoms:
                raw = next(read_tiles(src, chunk, side_px=g.side, out_px=g.size, batch=len(chunk)))
                tiles = stain.apply(raw)
                if cfg.tissue.mask_background:
                    tiles[~tile_masks(mask, scale, chunk, g.side, g.size)] = fill
                arrays[g.name][s0:s0 + len(chunk)] = tiles
            bar.update(len(chunk))
    for a in arrays.values():
        a.flush()
    del arrays
    return {name: np.load(p, mmap_mode="r") for name, p in paths.items()}


def _stain_pixels(src, spots: pd.DataFrame, geom: _Geometry, mask: np.ndarray, scale: float) -> np.ndarray:
    """Tissue pixels of the spot tiles of up to :data:`STAIN_SAMPLE_SPOTS` grid spots spread over the grid: the
    slide's stain is estimated at the resolution its tiles are normalised at."""
    from hevisum.io.wsi import read_tiles

    n = len(spots)
    pick = np.unique(np.linspace(0, n - 1, min(n, STAIN_SAMPLE_SPOTS)).round().astype(np.int64))
    xy = spots[["x", "y"]].to_numpy(np.float64)[pick]
    parts = []
    for s0 in range(0, len(xy), 64):
        chunk = xy[s0:s0 + 64]
        tiles = next(read_tiles(src, chunk, side_px=geom.side, out_px=geom.size, batch=len(chunk)))
        parts.append(tiles[tile_masks(mask, scale, chunk, geom.side, geom.size)])
    return np.concatenate(parts) if parts else np.zeros((0, 3), np.uint8)


# ============================================================================================ prediction


def _positive(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise HevisumError(f"{name} must be a positive number, got {value!r}")
    return v


def _plot_columns(plot_targets: Sequence[str] | str | None, names: list[str]) -> list[int] | None:
    """Target column indices asked for by name or by ``C<i>``; None when none were asked for."""
    if plot_targets is None:
        return None
    items = [t.strip() for t in (plot_targets.split(",") if isinstance(plot_targets, str) else plot_targets)]
    items = [t for t in items if t]
    if not items:
        return None
    by_name = {str(n): i for i, n in enumerate(names)}
    out = []
    for t in items:
        if t in by_name:
            out.append(by_name[t])
        elif t[:1] in ("C", "c") and t[1:].isdigit() and 1 <= int(t[1:]) <= len(names):
            out.append(int(t[1:]) - 1)
        else:
            shown = ", ".join(map(str, names[:8])) + (", ..." if len(names) > 8 else "")
            raise HevisumError(f"--plot-targets: {t!r} is not a target of this run; give target names ({shown}) "
                               f"or C1..C{len(names)}")
    return list(dict.fromkeys(out))


def _methods(run_dir: Path, metrics: dict, method: str | None) -> tuple[str, list[str]]:
    from hevisum.methods import stacker_name

    best = method or metrics["selected"]
    stacked = best == stacker_name()
    methods = list(metrics.get("stack_methods") or []) if stacked else [best]
    if stacked and not methods:
        raise HevisumError(f"{run_dir / 'metrics.json'}: the stacker is selected but no stacked methods are listed")
    missing = [m for m in methods + ([best] if stacked else []) if not (run_dir / "models" / m).is_dir()]
    if missing:
        have = sorted(p.name for p in (run_dir / "models").iterdir() if p.is_dir())
        raise HevisumError(f"{run_dir}: no models of {missing} under models/; the run has {have}")
    return best, methods


def predict_slide(run_dir: str | Path, slide_path: str | Path, out: str | Path, *, grid_um: float | None = None,
                  um_per_px: float | None = None, hexagonal: bool = True, min_tissue: float = 0.5,
                  plot_targets: Sequence[str] | str | None = None, device: str = "auto", progress: bool = True,
                  force: bool = False, method: str | None = None, batch: int = 64) -> pd.DataFrame:
    """Predict every spot of a virtual grid over the tissue of one slide image; returns predictions.csv's table.

    grid_um: distance between grid spots in µm (default: the training slides' pitch; required when the run does
        not know it). um_per_px: the slide's µm per level-0 pixel when its file does not say (or to override it).
    hexagonal: Visium-like lattice (False: square). min_tissue: a grid spot is kept when this fraction of its
        disc is tissue. plot_targets: names or ``C<i>`` of the targets to draw (default: the 4 most variable).
    method: predict with this method of the run instead of the selected one.
    """
    from hevisum.grid import SPOT_DIAMETER_PITCHES, virtual_grid
    from hevisum.io.atomic import atomic_dir
    from hevisum.io.wsi import open_image, tissue_thumbnail
    from hevisum.methods import FitContext, load_model, stacker_name
    from hevisum.outputs import run_info
    from hevisum.pipeline import feature_store
    from hevisum.predict import load_run, predict_method
    from hevisum.preprocess.stain import StainTarget
    from hevisum.training import resolve_device

    run_dir, slide_path, out = Path(run_dir), Path(slide_path), Path(out)
    grid_um = _positive("--grid-um", grid_um)
    um_per_px = _positive("--um-per-px", um_per_px)
    if not 0.0 <= float(min_tissue) <= 1.0:
        raise HevisumError(f"--min-tissue must be in [0, 1], got {min_tissue!r}")
    run = load_run(run_dir)
    cfg, metrics, names = run["cfg"], run["metrics"], [str(n) for n in run["target_names"]]
    stain_target = StainTarget.from_dict(run["stain"])
    best, methods = _methods(run_dir, metrics, method)
    plot_cols = _plot_columns(plot_targets, names)
    model_um, pitch_source = training_pitch_um(run_dir)
    if model_um is None and grid_um is None:
        raise HevisumError(f"{run_dir}: the spot pitch of the training slides in µm is unknown ({pitch_source}); "
                           "pass --grid-um with the training spots' centre-to-centre distance in µm (Visium: 100, "
                           "legacy ST: 200)")
    if model_um is None:
        model_um, pitch_source = float(grid_um), "--grid-um (the run does not know its training pitch in µm)"
    grid_um = float(grid_um) if grid_um is not None else model_um
    device = resolve_device(device)
    slide_id = slide_id_for(slide_path)

    src = open_image(slide_path, um_per_px=um_per_px)
    try:
        if src.um_per_px is None:
            raise HevisumError(f"{slide_path}: the slide's resolution (µm per pixel) is not in the file; pass "
                               "--um-per-px (e.g. 0.25 for a 40x scan, 0.5 for 20x)")
        um = float(src.um_per_px)
        model_px, grid_px = model_um / um, grid_um / um
        geoms = _geometries(cfg, methods, run_dir, model_px, um)
        if max(g.side for g in geoms) < 4 or grid_px < 2:
            raise HevisumError(f"{slide_path}: a {grid_um:g} µm pitch is {grid_px:.2f} px at {um:g} µm/px; check "
                               "--grid-um and --um-per-px")
        thumb, mask, scale = tissue_thumbnail(src, cfg.tissue.max_side, background=cfg.tissue.background,
                                              blur_sigma=cfg.tissue.blur_sigma)
        diameter = SPOT_DIAMETER_PITCHES * grid_px
        grid = virtual_grid(mask, scale, grid_px, hexagonal=hexagonal, min_tissue=float(min_tissue),
                            spot_diameter_px=diameter, image_size=(src.width, src.height))
        if grid.empty:
            raise HevisumError(f"{slide_path}: no grid spot lies on tissue (tissue mask covers "
                               f"{float(mask.mean()):.1%} of the thumbnail; grid pitch {grid_um:g} µm, min tissue "
                               f"{float(min_tissue):g}); check the slide, or lower --min-tissue")
        spots = pd.DataFrame({
            "slide": slide_id, "spot_id": grid["spot_id"].astype(str).to_numpy(), "split": "test",
            "x": grid["x"].to_numpy(), "y": grid["y"].to_numpy(), "pitch_px": model_px,
            "in_tissue": np.ones(len(grid), dtype=np.int64), "array_row": grid["array_row"].to_numpy(),
            "array_col": grid["array_col"].to_numpy(), "tissue_fraction": grid["tissue_fraction"].to_numpy(),
        })
        if progress:
            print(f"[hevisum] {slide_id}: {src.width}x{src.height} px at {um:g} µm/px, {len(spots)} grid spots "
                  f"({'hexagonal' if hexagonal else 'square'}, {grid_um:g} µm apart); tiles of "
                  f"{cfg.tiles.scale:g} x {model_um:g} µm", flush=True)
        with atomic_dir(out, force=force, protect=[run_dir, slide_path], kind="predict") as tmp:
            work = tmp / "work"
            work.mkdir()
            stain = fit_slide_stain(stain_target, _stain_pixels(src, spots, geoms[0], mask, scale),
                                    seed=cfg.stain.seed)
            caches = _write_tile_caches(src, spots, geoms, stain, mask, scale, cfg, work, progress, batch)
            del stain  # the lookup table
            prep = SimpleNamespace(spots=spots, tiles=caches["spot"],
                                   extra_tiles={k: v for k, v in caches.items() if k != "spot"}, workdir=work)
            store = feature_store(prep, cfg, device, progress)
            ctx = FitContext(cfg=cfg, tiles=prep.tiles, device=device, seed=cfg.seed, progress=progress)
            per = [predict_method(run_dir, m, prep, store, ctx, progress) for m in methods]
            if best == stacker_name():
                st = load_model(run_dir / "models" / stacker_name()).method
                pred = st.predict(np.concatenate(per, axis=1), rows=np.arange(len(spots)), ctx=ctx)
            else:
                pred = per[0]
            pred = np.asarray(pred, dtype=np.float32)
            del prep, store, ctx, caches
            shutil.rmtree(work)
            info = {**run_info(cfg, best), "slide_path": str(slide_path), "slide_width": int(src.width),
                    "slide_height": int(src.height), "um_per_px": um, "grid": "hexagonal" if hexagonal else "square",
                    "grid_um": grid_um, "training_pitch_um": model_um, "training_pitch_source": pitch_source,
                    "tile_field_um": float(geoms[0].side * um), "min_tissue": float(min_tissue),
                    "n_spots": int(len(spots))}
            df = _write_outputs(tmp, spots, pred, names, thumb, scale, diameter, grid_px, info, plot_cols)
    finally:
        src.close()
    if progress:
        print(f"[hevisum] wrote {out}: {len(df)} grid spots of {slide_id} predicted with {best}")
    return df


# ============================================================================================ outputs


def _write_outputs(folder: Path, spots: pd.DataFrame, pred: np.ndarray, names: list[str], thumb: np.ndarray,
                   scale: float, diameter: float, grid_px: float, info: dict, plot_cols: list[int] | None):
    from hevisum.io.atomic import atomic_write_text
    from hevisum.outputs import SlideImages, prediction_frame, predictions_to_h5ad

    df = prediction_frame(spots, pred)
    df.insert(2, "x", spots["x"].to_numpy())
    df.insert(3, "y", spots["y"].to_numpy())
    df.to_csv(folder / "predictions.csv", index=False)
    slide = str(spots["slide"].iloc[0])
    full = spots.assign(pxl_col_in_fullres=spots["x"], pxl_row_in_fullres=spots["y"])
    images = SlideImages(thumb, float(scale), images={"hires": thumb},
                         scalefactors={"tissue_hires_scalef": float(scale), "spot_diameter_fullres": float(diameter)},
                         frame="fullres")
    predictions_to_h5ad(full, pred, names, folder / "predictions.h5ad", {slide: images}, info=info)
    if plot_cols is None:
        var = np.nanvar(pred, axis=0) if len(pred) > 1 else np.zeros(pred.shape[1])
        plot_cols = sorted(np.argsort(-var, kind="stable")[:DEFAULT_PLOTS].tolist())
    plotted = _heatmaps(folder / "heatmaps", spots, pred, names, thumb, scale, grid_px, info, plot_cols)
    atomic_write_text(folder / "slide.json", json.dumps({**{k: v for k, v in info.items() if k != "config"},
                                                         "heatmaps": plotted}, indent=1))
    return df


def _heatmaps(folder: Path, spots: pd.DataFrame, pred: np.ndarray, names: list[str], thumb: np.ndarray,
              scale: float, grid_px: float, info: dict, cols: list[int]) -> list[str]:
    """One PNG per target: its predicted values over the faded thumbnail, with a colour bar."""
    from matplotlib.figure import Figure

    from hevisum.names import safe_name
    from hevisum.report.plots import value_map

    folder.mkdir(parents=True, exist_ok=True)
    xy = spots[["x", "y"]].to_numpy(np.float64) * scale
    span = np.ptp(xy, axis=0) + 3 * grid_px * scale
    aspect = float(span[1] / max(span[0], 1e-9))
    width = 7.0
    height = float(np.clip(width * aspect, 2.5, 12.0))
    label = "rank score (0..1)" if info.get("units") == "rank" else "predicted value"
    written = []
    for c in cols:
        name = names[c] if c < len(names) else f"C{c + 1}"
        fig = Figure(figsize=(width + 1.2, height), dpi=120)
        ax = fig.add_subplot(1, 1, 1)
        title = f"{spots['slide'].iloc[0]}: {name}" + ("" if name == f"C{c + 1}" else f" (C{c + 1})")
        value_map(ax, thumb, xy, pred[:, c], grid_px * scale, title, label=label)
        path = folder / f"{safe_name(name)}.png"
        fig.savefig(path, bbox_inches="tight")
        written.append(str(path.relative_to(folder.parent)))
    return written
