"""Model zoo: the reference CNN, EfficientNet-Lite0, baseline regressors, stackers and one factory.

Names are resolved lazily: ``from hevisum.models import RidgeHead`` imports only the numpy/sklearn module, and
torch is loaded the first time a torch model is asked for (keeps ``hevisum --help`` instant).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "VisionMLP_MultiTask": "cnn",
    "ResidualBlock": "cnn",
    "normalise_uint8": "cnn",
    "split_subtiles": "cnn",
    "IMAGENET_MEAN": "cnn",
    "IMAGENET_STD": "cnn",
    "EfficientNetLite0": "effnet",
    "EffNetRegressor": "effnet",
    "load_pretrained_lite0": "effnet",
    "lite0_weights_path": "effnet",
    "extract_features": "effnet",
    "MeanBaseline": "baselines",
    "RidgeHead": "baselines",
    "MLPHead": "baselines",
    "colour_features": "baselines",
    "COLOUR_FEATURE_NAMES": "baselines",
    "RIDGE_ALPHAS": "baselines",
    "StackingMLP": "stacking",
    "FittedStacker": "stacking",
    "RidgeStacker": "stacking",
    "fit_stacker": "stacking",
    "create_model": "factory",
    "model_config": "factory",
    "MODEL_NAMES": "factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first access."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hevisum.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hevisum.models.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
