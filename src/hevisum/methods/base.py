"""The Method interface and its registry.

A *method* turns rows of the tile cache into predictions of every target. It declares what it reads
(:attr:`Method.features`: cached per-tile features, or the tiles themselves), fits on training rows, predicts
rows, and saves itself as ``model.safetensors`` + ``model.json``. The JSON holds the method's name, its
hyper-parameters, the features it read and the whole run configuration that made it, so a fold model folder
describes itself without the run folder around it. Nothing is pickled.

Adding a method is one new module with a :class:`Method` subclass decorated by :func:`register_method`, plus
its import in :mod:`hevisum.methods` (see docs/extending.md). No other module matches method names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hevisum.errors import HevisumError

if TYPE_CHECKING:  # pragma: no cover
    from hevisum.config import RunConfig

MODEL_FORMAT = "hevisum-model/2"

# ------------------------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSpec:
    """One block of per-tile features a method reads.

    source: ``colour`` (colour, haematoxylin/eosin and texture statistics) or ``encoder`` (the run's encoder,
        ``models.encoder``; for EfficientNet-Lite0 every stage pooled, see :mod:`hevisum.features`).
    context: ``""`` (the spot itself), ``ring1`` / ``ring2`` (mean over the spot's neighbours within 1 or 2
        lattice rings), ``slide`` (the slide's mean, the same for every spot of a slide).
    geometry: which tiles the features are computed on: ``spot`` (the tile cache) or ``wide`` (a larger field of
        view around the spot, ``features.wide_scale`` pitches).
    """

    source: str
    context: str = ""
    geometry: str = "spot"
    view: str = "embed"  # encoder only: "embed" (the preset's pooling) or "stages" (every stage pooled, CNNs)

    def label(self) -> str:
        parts = [self.source if self.view == "embed" else f"{self.source}-{self.view}"]
        if self.geometry != "spot":
            parts.append(self.geometry)
        if self.context:
            parts.append(self.context)
        return ":".join(parts)


SOURCES = ("colour", "encoder")
CONTEXTS = ("", "ring1", "ring2", "slide")
GEOMETRIES = ("spot", "wide")


def context_specs(cfg: "RunConfig", view: str = "embed") -> list[FeatureSpec]:
    """The context blocks ``features.context`` adds to an encoder method: neighbour rings, the slide's mean, and
    the encoder's features of a wider field of view."""
    return [FeatureSpec("encoder", geometry="wide", view=view) if c == "wide"
            else FeatureSpec("encoder", context=c, view=view) for c in cfg.features.context]


# ------------------------------------------------------------------------------------------- methods


@dataclass
class FitContext:
    """What a method may use besides its feature rows: the tiles (tile methods), every row's fit targets and raw
    targets (for an inner validation split), where to run, and a seed."""

    cfg: "RunConfig"
    tiles: Any = None  # (N, S, S, 3) uint8, memory-mapped
    Y_fit: np.ndarray | None = None  # (N, T) every tile-cache row
    Y_raw: np.ndarray | None = None
    device: str = "cpu"
    seed: int = 0
    progress: bool = False
    desc: str = ""
    checkpoint: Path | None = None  # where a trained network keeps its per-epoch training state (resume)


class Method:
    """Base class: subclasses set :attr:`name` and implement :meth:`fit` and :meth:`predict`.

    After :meth:`fit`, ``params`` (JSON-safe) and ``tensors`` (numpy arrays) hold everything :meth:`restore`
    needs; ``log`` may hold a per-epoch DataFrame.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: a reference every run reports (and a candidate for selection)
    baseline: ClassVar[bool] = False
    #: trains a network on the tiles (needs FitContext.tiles) rather than a head on features
    uses_tiles: ClassVar[bool] = False
    #: combines other methods' out-of-fold predictions (see hevisum.methods.stacking)
    stacker: ClassVar[bool] = False
    #: the profiles that run this method when ``models.methods`` is empty
    profiles: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: "RunConfig") -> None:
        self.cfg = cfg
        self.params: dict = {}
        self.tensors: dict[str, np.ndarray] = {}
        self.log = None

    # What the method reads: feature blocks, concatenated in this order (empty = none, e.g. ``mean``).
    def features(self) -> list[FeatureSpec]:
        return []

    def fit(self, X: np.ndarray | None, Y: np.ndarray, *, rows: np.ndarray, groups: np.ndarray,
            ctx: FitContext) -> "Method":
        raise NotImplementedError

    def predict(self, X: np.ndarray | None, *, rows: np.ndarray, ctx: FitContext) -> np.ndarray:
        raise NotImplementedError

    def restore(self) -> None:
        """Rebuild internal state from ``params`` and ``tensors`` (after loading); the default needs nothing."""

    # ------------------------------------------------------------------ saving
    def save(self, folder: Path, *, train_slides: list[str], target_names: list[str], digest: str = "") -> None:
        """``model.safetensors`` + ``model.json`` (+ ``log.csv`` and a loss-curve PNG for trained networks)."""
        from safetensors.numpy import save_file

        from hevisum.config import to_dict
        from hevisum.io.atomic import atomic_path, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file({k: np.ascontiguousarray(v) for k, v in self.tensors.items()}, str(tmp))
        from hevisum import __version__

        meta = {"format": MODEL_FORMAT, "method": self.name, "hevisum": __version__, "params": self.params,
                "features": [asdict(f) for f in self.features()], "train_slides": list(train_slides),
                "target_names": list(target_names), "config": to_dict(self.cfg), "digest": digest}
        atomic_write_text(folder / "model.json", json.dumps(_json_safe(meta), indent=1))
        if self.log is not None and len(self.log):
            self.log.to_csv(folder / "log.csv", index=False)
            _loss_png(self.log, folder / "loss_curve.png", f"{self.name}, trained on {', '.join(train_slides)}")


@dataclass
class LoadedModel:
    method: Method
    train_slides: list[str]
    target_names: list[str]
    meta: dict = field(default_factory=dict)


def load_model(folder: Path) -> LoadedModel:
    """A fitted method back from its folder: the registry finds the class named in ``model.json``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from hevisum.config import RunConfig, from_dict

    folder = Path(folder)
    meta_path, tensor_path = folder / "model.json", folder / "model.safetensors"
    if not meta_path.is_file():
        raise HevisumError(f"{folder}: no model.json; not a saved hevisum model folder")
    try:
        meta = json.loads(meta_path.read_text())
        name, params, cfg_dict = meta["method"], meta["params"], meta["config"]
    except (ValueError, KeyError, TypeError) as e:
        raise HevisumError(f"{meta_path}: damaged or not written by this version of hevisum ({e}); "
                           "run 'hevisum run' again to rebuild the run folder") from None
    if meta.get("format") != MODEL_FORMAT:
        raise HevisumError(f"{meta_path}: model format {meta.get('format')!r}, this hevisum reads "
                           f"{MODEL_FORMAT!r}; run 'hevisum run' again to rebuild the run folder")
    if not tensor_path.is_file():
        raise HevisumError(f"{folder}: model.json without model.safetensors; the run folder is incomplete")
    try:
        tensors = load_file(str(tensor_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise HevisumError(f"{tensor_path}: damaged weight file ({e}); run 'hevisum run' again") from None
    cfg = from_dict(RunConfig, cfg_dict)
    method = get_method(name)(cfg)
    method.params, method.tensors = dict(params), dict(tensors)
    try:
        method.restore()
    except (KeyError, ValueError, RuntimeError) as e:
        raise HevisumError(f"{folder}: the saved {name!r} model does not match its description ({e})") from None
    return LoadedModel(method, list(meta.get("train_slides", [])), list(meta.get("target_names", [])), meta)


# ------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Method]] = {}
#: names earlier releases used, mapped onto the registered method that does the same job
ALIASES: dict[str, str] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available under ``cls.name`` (unique)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def method_names(*, include_stackers: bool = False) -> list[str]:
    """Registered names in registration order (stackers only when asked)."""
    return [n for n, c in _REGISTRY.items() if include_stackers or not c.stacker]


def baseline_names() -> list[str]:
    return [n for n, c in _REGISTRY.items() if c.baseline]


def default_methods(profile: str) -> list[str]:
    """The methods a profile runs (beside the baselines) when the configuration names none."""
    return [n for n, c in _REGISTRY.items() if profile in c.profiles]


def stacker_name() -> str:
    return next(n for n, c in _REGISTRY.items() if c.stacker)


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def get_method(name: str) -> type[Method]:
    """The registered class for ``name`` (or an alias of it); a clear error listing the valid names."""
    cls = _REGISTRY.get(canonical_name(name))
    if cls is None:
        raise HevisumError(f"unknown method {name!r}; valid methods are {method_names(include_stackers=True)}")
    return cls


# ------------------------------------------------------------------------------------------- helpers


def _json_safe(obj):
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return None if not np.isfinite(obj) else float(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def _loss_png(log, path: Path, title: str) -> None:
    """The fold's training/validation loss and validation per-spot Spearman per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from hevisum.names import plot_text
    from hevisum.report.plots import loss_curves

    # a Figure of its own (not pyplot): the session's plotting backend, e.g. inline in a notebook, is left alone
    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    a1, a2 = fig.subplots(1, 2)
    loss_curves(a1, a2, {"": log})
    fig.suptitle(plot_text(title), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
