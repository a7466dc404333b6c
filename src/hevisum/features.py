"""Per-tile features computed once, cached beside the tile cache, and assembled for a method.

Frozen-encoder features are the fast profile's whole cost: computing them once per tile (not once per fold and
epoch) is what makes cross-validation of several heads cheap on a CPU. The cache key holds the encoder, the
digest of its weight file, the view, the tile geometry and the inference settings, so a second run with the same
encoder and tiles reads them back.

A method's input is the concatenation of its :class:`~hevisum.methods.FeatureSpec` blocks. Each block is a base
feature (colour statistics, or the encoder's features of the spot tile or of a wider field of view), optionally
turned into spatial context (the mean over the spot's neighbours within one or two lattice rings, or the slide's
mean), then standardised as ``models.feature_norm`` says.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hevisum.io.atomic import atomic_path

log = logging.getLogger("hevisum")


@dataclass
class FeatureStore:
    """Where features come from for one preprocessed work folder: its tile caches and a loaded encoder."""

    workdir: Path
    tiles: dict  # geometry name -> (N, S, S, 3) uint8 array
    spots: object  # the prepared spots table (slide, x, y, pitch_px), row order = tile order
    cfg: object
    device: str = "cpu"
    progress: bool = False
    workers: int | None = None  # processes for encoder features on a CPU (see pool_size); None = as asked
    # (hevisum.workers.explicit), else this process only
    _encoder: object = None
    _digest: str | None = None
    _memo: dict = field(default_factory=dict)

    @classmethod
    def for_prep(cls, prep, cfg, device: str = "cpu", progress: bool = False,
                 workers: int | None = None) -> "FeatureStore":
        """The store of a preprocessed work folder: its spot tiles and extra tile caches; with ``features.tiles =
        "tissue"`` the encoder sees the tissue-scale cache instead of the spot tiles (when the slides had µm/px)."""
        tiles = {"spot": prep.tiles, **prep.extra_tiles}
        if cfg.features.tiles == "tissue" and "tissue" in prep.extra_tiles:
            tiles["spot"] = prep.extra_tiles["tissue"]
        elif cfg.features.tiles == "tissue":
            log.info("features.tiles = 'tissue' needs microns per pixel; the slides have none: using spot tiles")
        return cls(workdir=prep.workdir, tiles=tiles, spots=prep.spots, cfg=cfg, device=device, progress=progress,
                   workers=workers)

    # ---------------------------------------------------------------- encoder
    def encoder(self):
        if self._encoder is None:
            self._encoder, self._digest = load_configured_encoder(self.cfg, self.device)
        return self._encoder

    def encoder_key(self) -> dict:
        self.encoder()
        return {"encoder": self.cfg.encoder.name, "weights": self._digest, "input_px": self.input_px(),
                "tta": self.cfg.train.tta, "precision": self.cfg.train.precision}

    def input_px(self) -> int:
        return int(self.cfg.encoder.input_px or self.encoder().preset.input_px)

    # ---------------------------------------------------------------- blocks
    def base(self, source: str, geometry: str, view: str) -> np.ndarray:
        """Colour statistics or encoder features of every tile of ``geometry`` (cached on disk)."""
        memo_key = (source, geometry, view)
        if memo_key in self._memo:
            return self._memo[memo_key]
        tiles = self.tiles[geometry]
        key = {"source": source, "view": view, "n_tiles": int(len(tiles)), "tile_shape": list(tiles.shape[1:]),
               "geometry": geometry, "tiles_id": _tiles_id(tiles)}
        if source == "encoder":
            key.update(self.encoder_key())
        path = _cache_path(self.workdir, f"{source}-{view}", key)
        shared = _cache_path(shared_cache_dir(), f"{source}-{view}", key) if source == "encoder" else None
        feats = None
        for p in (path, shared):
            if feats is None and p is not None and p.is_file():
                try:
                    feats = np.load(p, allow_pickle=False)
                except (OSError, ValueError):
                    feats = None
                if feats is not None and feats.shape[0] != len(tiles):
                    feats = None
        from hevisum import distributed

        if source == "encoder" and distributed.active() and any(distributed.all_gather_object(feats is None)):
            feats = None  # the ranks encode together: all of them, or none
        if feats is None:
            if source == "colour":
                from hevisum.models.baselines import colour_features

                feats = np.asarray(colour_features(tiles), dtype=np.float32)
            elif view == "embed" and getattr(self.encoder(), "stages_feature_dim", None):
                # a CNN's stage-pooled features end with its embedding: one forward pass serves both views
                feats = np.ascontiguousarray(self.base(source, geometry, "stages")[:, -self.encoder().feature_dim:])
            else:
                feats = self._encode(tiles, view)
            if shared is not None and distributed.is_main():
                _save_npy(shared, feats)
        if not path.is_file() and distributed.is_main():
            _save_npy(path, feats)
        self._memo[memo_key] = feats
        return feats

    def _encode(self, tiles: np.ndarray, view: str) -> np.ndarray:
        from hevisum.training import autocast_dtype

        enc = self.encoder()
        import torch

        bf16 = autocast_dtype(self.cfg.train.precision, self.device) == torch.bfloat16
        kw = dict(device=self.device, bf16=bf16, progress=self.progress, input_px=self.input_px(),
                  stages=view == "stages")
        from hevisum import distributed

        if distributed.active():
            # each rank encodes a contiguous shard (cut on batch boundaries), then every rank gets all the rows
            lo, hi = distributed.shard(len(tiles), align=32)
            kw["progress"] = self.progress and distributed.is_main()
            counts = [b - a for a, b in distributed.all_gather_object((lo, hi))]
            tiles = tiles[lo:hi]
            distributed.fault_point("encode")
        from hevisum import workers as procs

        n = (procs.explicit() or 1) if self.workers is None else procs.resolve(self.workers)
        pool = 1 if distributed.active() else pool_size(n, len(tiles), self.device, tiles)
        if pool > 1:
            feats = _encode_in_pool(self.cfg, tiles, kw, pool)
        else:
            feats = _encode_rows(enc, tiles, kw, self.cfg.train.tta)
        if distributed.active():
            feats = distributed.all_gather_rows(feats, counts)
        return feats

    def block(self, spec) -> np.ndarray:
        """One feature block of a method, context applied and standardised."""
        view = "embed"
        if spec.source == "encoder" and spec.view == "stages" and getattr(self.encoder(), "stages_feature_dim", None):
            view = "stages"  # encoders without stage pooling (the ViTs) give their embedding
        X = self.base(spec.source, spec.geometry, view)
        slides = self.spots["slide"].astype(str).to_numpy()
        norm = self.cfg.models.feature_norm
        if spec.context in ("ring1", "ring2"):
            X = neighbour_mean(X, self.spots, rings=int(spec.context[-1]))
        elif spec.context == "slide":
            # the slide's own mean: standardising it within the slide would zero it, so it is left as is
            # (the heads standardise it with the training rows' statistics)
            return slide_mean(X, slides)
        if norm == "slide":
            X = standardise_per_slide(X, slides)
        return X

    def for_method(self, method) -> np.ndarray | None:
        """The (N, F) input of ``method`` for every tile-cache row, or None when it reads no features."""
        specs = method.features()
        if not specs:
            return None
        parts = [self.block(s) for s in specs]
        X = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
        if self.cfg.train.coords:
            X = np.concatenate([X, slide_scaled_coords(self.spots)], axis=1)
        return X.astype(np.float32, copy=False)


def _encode_rows(enc, tiles, kw: dict, tta: bool) -> np.ndarray:
    """Encoder features of ``tiles`` (the mean over the 8 dihedral views with ``tta``)."""
    from hevisum.encoders import encode_tiles

    if not tta:
        return encode_tiles(enc, tiles, **kw)
    acc = None
    for v in _dihedral_np_views():
        f = encode_tiles(enc, _LazyView(tiles, v), **kw)
        acc = f if acc is None else acc + f
    return (acc / 8).astype(np.float32)


#: below this many tiles a pool costs more (starting processes, loading the encoder) than it saves
POOL_MIN_TILES = 2048


def pool_size(workers: int, n_tiles: int, device: str, tiles) -> int:
    """Processes to encode ``n_tiles`` with: ``workers`` on a CPU for a tile cache on disk (a pool reads it by
    path) of at least :data:`POOL_MIN_TILES` tiles; else 1 (this process)."""
    if workers <= 1 or not str(device).startswith("cpu") or not getattr(tiles, "filename", None):
        return 1
    return int(min(workers, max(1, n_tiles // (POOL_MIN_TILES // 2)))) if n_tiles >= POOL_MIN_TILES else 1


def _encode_in_pool(cfg, tiles, kw: dict, workers: int) -> np.ndarray:
    """Encode contiguous shards of a memory-mapped tile cache in ``workers`` fresh processes, each with its share of
    the CPU's threads, and put the rows back in order (each tile's features depend on that tile alone)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    from tqdm.auto import tqdm

    from hevisum.errors import HevisumError
    from hevisum.workers import cpu_count

    n = len(tiles)
    blocks = -(-n // 32)  # shards cut on batch boundaries: every batch is the one a single process would run
    bounds = [(min(n, blocks * r // workers * 32), min(n, blocks * (r + 1) // workers * 32)) for r in range(workers)]
    job_kw = dict(kw, progress=False)
    parts = []
    try:
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_pool_init,
                                 initargs=(cfg, max(1, cpu_count() // workers))) as ex:
            futures = [ex.submit(_pool_encode, str(tiles.filename), lo, hi, job_kw, bool(cfg.train.tta))
                       for lo, hi in bounds]
            with tqdm(total=n, desc=f"{cfg.encoder.name} features ({workers} processes)", unit="tile",
                      disable=not kw.get("progress")) as bar:
                for f, (lo, hi) in zip(futures, bounds):
                    parts.append(f.result())
                    bar.update(hi - lo)
    except BrokenProcessPool:
        raise HevisumError(f"a feature worker process died (out of memory?) while encoding {n} tiles in {workers} "
                           "processes; run again with --workers 1") from None
    return np.concatenate(parts)


_POOL_ENCODER: list = []


def _pool_init(cfg, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _POOL_ENCODER[:] = [load_configured_encoder(cfg, "cpu")[0]]


def _pool_encode(path: str, lo: int, hi: int, kw: dict, tta: bool) -> np.ndarray:
    tiles = np.load(path, mmap_mode="r")
    return _encode_rows(_POOL_ENCODER[0], tiles[lo:hi], kw, tta)


_LOADED: dict = {}


def load_configured_encoder(cfg, device: str = "cpu"):
    """The run's encoder (``[encoder]`` of ``cfg``) and its weight digest, loaded once per process: `hevisum run`
    calls this before any work, so a missing or wrong weight file is refused in seconds, not after preprocessing."""
    from hevisum.encoders import load_encoder, weights_digest

    key = (cfg.encoder.name, cfg.encoder.weights, device)
    if key not in _LOADED:
        _LOADED.clear()  # one encoder at a time: they can be large
        enc = load_encoder(cfg.encoder.name, weights=cfg.encoder.weights or None, device=device)
        _LOADED[key] = (enc, weights_digest(cfg.encoder.weights) if cfg.encoder.weights else "builtin")
    return _LOADED[key]


def _tiles_id(tiles, chunk: int = 1024) -> str:
    """A digest of every pixel of a tile cache (read chunk by chunk, so a memory-mapped cache stays on disk)."""
    h = hashlib.sha1(str(tuple(tiles.shape)).encode())
    for s in range(0, len(tiles), chunk):
        h.update(np.ascontiguousarray(np.asarray(tiles[s:s + chunk])).tobytes())
    return h.hexdigest()[:16]


def shared_cache_dir() -> Path:
    """Encoder features shared between runs: ``$HEVISUM_CACHE`` or ``~/.cache/hevisum``, under ``features/``.
    Keyed by encoder, weight-file digest, tile geometry and a digest of every tile, so a second run on the same
    slides with the same encoder reads its features back instead of computing them."""
    import os

    root = os.environ.get("HEVISUM_CACHE") or str(Path.home() / ".cache" / "hevisum")
    return Path(root)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
    except OSError as e:  # a read-only or full shared cache must not fail the run
        log.warning("could not write the feature cache %s: %s", path, e)


def _cache_path(workdir: Path, kind: str, params: dict) -> Path:
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return Path(workdir) / "features" / f"{kind}-{key}.npy"


def standardise_per_slide(X: np.ndarray, slides: np.ndarray) -> np.ndarray:
    """Z-score every feature within each slide. Uses no targets, so it is as legitimate on a test slide as on a
    training one, and it removes slide-wide offsets (stain, scanner, thickness) that do not carry over."""
    Z = np.empty(X.shape, dtype=np.float32)
    for s in dict.fromkeys(slides.tolist()):
        m = slides == s
        Z[m] = (X[m] - X[m].mean(axis=0)) / (X[m].std(axis=0) + 1e-6)
    return Z


def slide_mean(X: np.ndarray, slides: np.ndarray) -> np.ndarray:
    """Every row replaced by its slide's mean feature vector (a slide-level summary)."""
    out = np.empty(X.shape, dtype=np.float32)
    for s in dict.fromkeys(slides.tolist()):
        m = slides == s
        out[m] = X[m].mean(axis=0)
    return out


def neighbour_mean(X: np.ndarray, spots, rings: int = 1) -> np.ndarray:
    """Mean feature vector of each spot's neighbours on its slide within ``rings`` lattice rings (centre
    distance up to ``rings + 0.5`` pitches, the spot itself excluded); a spot without neighbours keeps its own."""
    from scipy.spatial import cKDTree

    out = np.array(X, dtype=np.float32, copy=True)
    slides = spots["slide"].astype(str).to_numpy()
    xy = spots[["x", "y"]].to_numpy(np.float64)
    pitch = spots["pitch_px"].to_numpy(np.float64)
    for s in dict.fromkeys(slides.tolist()):
        idx = np.flatnonzero(slides == s)
        tree = cKDTree(xy[idx])
        radius = (rings + 0.5) * float(np.median(pitch[idx]))
        for k, nb in enumerate(tree.query_ball_point(xy[idx], r=radius)):
            nb = [j for j in nb if j != k]
            if nb:
                out[idx[k]] = X[idx[nb]].mean(axis=0)
    return out


def slide_scaled_coords(spots) -> np.ndarray:
    """Spot (x, y) standardised within each slide (absolute positions mean nothing across slides)."""
    out = np.zeros((len(spots), 2), dtype=np.float32)
    for _, idx in spots.groupby("slide").indices.items():
        xy = spots.iloc[idx][["x", "y"]].to_numpy(dtype=np.float64)
        out[idx] = (xy - xy.mean(axis=0)) / (xy.std(axis=0) + 1e-6)
    return out


def _dihedral_np_views():
    for flip in (False, True):
        for k in range(4):
            yield (flip, k)


class _LazyView:
    """A flipped/rotated view of an (N, S, S, 3) array, materialised batch by batch."""

    def __init__(self, tiles: np.ndarray, view: tuple[bool, int]):
        self.tiles, self.flip, self.k = tiles, view[0], view[1]
        self.shape, self.dtype = tiles.shape, tiles.dtype

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, idx):
        x = np.asarray(self.tiles[idx])
        if self.flip:
            x = x[..., :, ::-1, :]
        return np.ascontiguousarray(np.rot90(x, self.k, axes=(-3, -2)))
