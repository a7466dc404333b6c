"""The methods cross-validation compares, behind one interface: fit on rows, predict rows, save, load.

Feature methods (``mean``, ``colour-ridge``, ``effnet-ridge``, ``effnet-mlp``) fit a head on cached
per-tile features. Tile methods (``hevisum-cnn``, ``effnet-finetune``) train a network on the tiles.
Every fitted method saves to a folder as safetensors + JSON and reloads without unpickling anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hevisum.config import FEATURE_METHODS, TILE_METHODS, RunConfig
from hevisum.errors import HevisumError

# The cached per-tile features each feature method reads (several are concatenated).
FEATURE_OF: dict[str, tuple[str, ...]] = {"mean": (), "colour-ridge": ("colour",), "effnet-ridge": ("effnet",),
                                          "effnet-colour-ridge": ("effnet", "colour"), "effnet-mlp": ("effnet",),
                                          "effnet-stages-ridge": ("effnet-stages", "colour")}
RIDGE_METHODS = ("colour-ridge", "effnet-ridge", "effnet-colour-ridge", "effnet-stages-ridge")
NETWORK_OF = {"hevisum-cnn": "hevisum-cnn", "effnet-finetune": "effnet-lite0"}


def _save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    from hevisum.io.atomic import atomic_path

    with atomic_path(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))


def _load_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@dataclass
class FittedMethod:
    """One fitted method of one fold: its name, what it was trained on, and its parameters."""

    name: str
    train_slides: list[str]
    params: dict = field(default_factory=dict)  # JSON-safe hyper-parameters
    tensors: dict = field(default_factory=dict)  # numpy arrays (heads) or the network state dict
    log: object = None  # per-epoch DataFrame for tile methods

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        _save_tensors(folder / "model.safetensors", self.tensors)
        from hevisum.io.atomic import atomic_write_text

        atomic_write_text(folder / "model.json", json.dumps(
            {"name": self.name, "train_slides": self.train_slides, "params": self.params}, indent=2))
        if self.log is not None and len(self.log):
            self.log.to_csv(folder / "log.csv", index=False)
            _loss_png(self.log, folder / "loss_curve.png", f"{self.name}, trained on {', '.join(self.train_slides)}")

    @classmethod
    def load(cls, folder: Path) -> "FittedMethod":
        meta_path = folder / "model.json"
        if not meta_path.is_file():
            raise HevisumError(f"{folder}: no model.json; not a saved hevisum model folder")
        meta = json.loads(meta_path.read_text())
        return cls(name=meta["name"], train_slides=meta["train_slides"], params=meta["params"],
                   tensors=_load_tensors(folder / "model.safetensors"))


def _loss_png(log, path: Path, title: str) -> None:
    """The fold's training/validation loss and validation per-spot Spearman per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hevisum.report.plots import loss_curves

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    loss_curves(a1, a2, {"": log})
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit_feature_method(name: str, X: np.ndarray | None, Y: np.ndarray, train_slides: list[str], cfg: RunConfig,
                       seed: int, groups: np.ndarray | None = None) -> FittedMethod:
    """Fit a feature method on rows (X may be None for ``mean``); ``groups`` are the rows' slides (or blocks)."""
    if name == "mean":
        return FittedMethod(name, train_slides, {}, {"mean": Y.mean(axis=0).astype(np.float32)})
    if name in RIDGE_METHODS:
        from hevisum.models.baselines import RidgeHead

        head = RidgeHead(alpha=cfg.models.ridge_alpha or None).fit(X, Y, groups)
        return FittedMethod(name, train_slides, {"alpha": head.alpha_}, head.state())
    if name == "effnet-mlp":
        from hevisum.models.baselines import MLPHead

        head = MLPHead(seed=seed).fit(X, Y)
        return FittedMethod(name, train_slides, head.params(), head.state())
    raise HevisumError(f"{name!r} is not a feature method; feature methods are {list(FEATURE_METHODS)}")


def predict_feature_method(fm: FittedMethod, X: np.ndarray | None, n_rows: int) -> np.ndarray:
    """Predictions (n_rows, T) of a fitted feature method."""
    if fm.name == "mean":
        return np.repeat(fm.tensors["mean"][None, :], n_rows, axis=0).astype(np.float32)
    if fm.name in RIDGE_METHODS:
        from hevisum.models.baselines import RidgeHead

        return RidgeHead.from_state(fm.tensors).predict(X).astype(np.float32)
    if fm.name == "effnet-mlp":
        from hevisum.models.baselines import MLPHead

        return MLPHead.from_state(fm.params, fm.tensors).predict(X).astype(np.float32)
    raise HevisumError(f"cannot predict with {fm.name!r}")


def build_network(name: str, n_outputs: int, pretrained: bool = True):
    """The torch network behind a tile method."""
    from hevisum.models.factory import create_model

    if name not in NETWORK_OF:
        raise HevisumError(f"{name!r} is not a tile method; tile methods are {list(TILE_METHODS)}")
    if name == "effnet-finetune":
        return create_model(NETWORK_OF[name], n_outputs, pretrained=pretrained)
    return create_model(NETWORK_OF[name], n_outputs)


def network_from_fitted(fm: FittedMethod, n_outputs: int):
    """Rebuild a tile method's network from saved tensors (no pickle anywhere)."""
    import torch

    net = build_network(fm.name, n_outputs, pretrained=False)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in fm.tensors.items()}, strict=True)
    return net.eval()
