"""Per-tile features computed once and cached beside the tile cache.

Frozen-encoder features are the fast profile's whole cost: computing them once per tile (not once per
fold and epoch) is what makes cross-validation of several heads cheap on a CPU.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from hevisum.io.atomic import atomic_path

FEATURE_KINDS = ("colour", "effnet", "effnet-stages")


def _cache_path(workdir: Path, kind: str, params: dict) -> Path:
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    return workdir / "features" / f"{kind}-{key}.npy"


def compute_features(tiles: np.ndarray, kind: str, *, input_size: int = 112, tta: bool = False,
                     device: str = "cpu", precision: str = "auto", progress: bool = False) -> np.ndarray:
    """Features (N, F) float32 of every tile, for ``kind`` in :data:`FEATURE_KINDS`.

    ``effnet``: ImageNet-pretrained EfficientNet-Lite0, global-average-pooled 1280-vector, tiles resized
    to ``input_size``; with ``tta`` the features of the 8 flips/rotations are averaged.
    ``effnet-stages``: the same network, every stage's output pooled (mean and standard deviation) beside the
    1280-vector: 2848 features from the same forward pass.
    ``colour``: colour, haematoxylin/eosin and texture statistics (no network).
    """
    if kind == "colour":
        from hevisum.models.baselines import colour_features

        return np.asarray(colour_features(tiles), dtype=np.float32)
    if kind in ("effnet", "effnet-stages"):
        from hevisum.models.effnet import extract_features, load_pretrained_lite0
        from hevisum.training import autocast_dtype

        encoder = load_pretrained_lite0()
        bf16 = autocast_dtype(precision, device) is not None
        stages = kind == "effnet-stages"
        if not tta:
            return extract_features(encoder, tiles, input_size=input_size, device=device, autocast_bf16=bf16,
                                    progress=progress, stages=stages).astype(np.float32)
        acc = None
        for k, view in enumerate(_dihedral_np_views()):
            f = extract_features(encoder, _LazyView(tiles, view), input_size=input_size, device=device,
                                 autocast_bf16=bf16, progress=progress, stages=stages)
            acc = f if acc is None else acc + f
        return (acc / 8).astype(np.float32)
    from hevisum.errors import HevisumError

    raise HevisumError(f"unknown feature kind {kind!r}; valid kinds are {list(FEATURE_KINDS)}")


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


def cached_features(workdir: Path, tiles: np.ndarray, kind: str, **params) -> np.ndarray:
    """Compute features once per (tile cache, kind, parameters) and keep them in ``workdir/features``.

    ``effnet`` is read off the cached ``effnet-stages`` (its last 1280 columns): one forward pass serves both.
    """
    if kind == "effnet":
        from hevisum.models.effnet import HEAD_CHANNELS

        return cached_features(workdir, tiles, "effnet-stages", **params)[:, -HEAD_CHANNELS:]
    key_params = {k: v for k, v in params.items() if k not in ("progress", "device")}
    key_params["n_tiles"] = int(len(tiles))
    key_params["tile_shape"] = list(tiles.shape[1:])
    path = _cache_path(Path(workdir), kind, {"kind": kind, **key_params})
    if path.is_file():
        arr = np.load(path, allow_pickle=False)
        if arr.shape[0] == len(tiles):
            return arr
    feats = compute_features(tiles, kind, **params)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, feats, allow_pickle=False)
    return feats
