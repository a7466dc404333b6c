"""One entry point for the torch image models, so configs and checkpoints name a model by a string.

Every model built here stores its constructor arguments in ``model.hparams``; ``model_config(model)`` returns
``{"name": ..., "hparams": {...}}`` and ``create_model(cfg["name"], **cfg["hparams"])`` rebuilds the same
architecture (then load the checkpoint's state dict into it).
"""

from __future__ import annotations

import inspect
from typing import Any

from hevisum.errors import HevisumError

#: Names accepted by :func:`create_model`.
MODEL_NAMES: tuple[str, ...] = ("hevisum-cnn", "effnet-lite0")


def _model_class(name: str) -> type:
    # imported here so that asking for one model never pays for the other's imports
    if name == "hevisum-cnn":
        from hevisum.models.cnn import VisionMLP_MultiTask

        return VisionMLP_MultiTask
    if name == "effnet-lite0":
        from hevisum.models.effnet import EffNetRegressor

        return EffNetRegressor
    raise HevisumError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")


def create_model(name: str, n_outputs: int, **kwargs: Any) -> Any:
    """Build the torch model called ``name`` with ``n_outputs`` outputs.

    'hevisum-cnn' → :class:`~hevisum.models.cnn.VisionMLP_MultiTask` (kwargs: dropout);
    'effnet-lite0' → :class:`~hevisum.models.effnet.EffNetRegressor` (kwargs: pretrained=True, freeze, dropout).
    """
    cls = _model_class(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "n_outputs")]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise HevisumError(
            f"model {name!r} does not take {', '.join(unknown)}; valid options: {', '.join(accepted) or 'none'}"
        )
    return cls(n_outputs=n_outputs, **kwargs)


def model_config(model: Any) -> dict[str, Any]:
    """``{"name": ..., "hparams": {...}}`` for a model built by :func:`create_model` (to store in a checkpoint)."""
    name = getattr(model, "model_name", None)
    hparams = getattr(model, "hparams", None)
    if name not in MODEL_NAMES or not isinstance(hparams, dict):
        raise HevisumError(
            f"{type(model).__name__} was not built by create_model; valid model names: {', '.join(MODEL_NAMES)}"
        )
    return {"name": name, "hparams": dict(hparams)}
