"""Image encoders: published pathology and ImageNet networks, defined here with timm's parameter names.

``hevisum encoders`` lists the presets. Weights come from a local file the user downloaded (never fetched by
hevisum), except effnet-lite0 whose ImageNet weights ship with an installed package::

    from hevisum.encoders import load_encoder, encode_tiles
    enc = load_encoder("uni", weights="pytorch_model.bin")
    feats = encode_tiles(enc, tiles_uint8)          # (N, enc.feature_dim) float32

Names resolve lazily: importing ``hevisum.encoders`` or ``hevisum.encoders.registry`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "EncoderPreset": "registry",
    "register_encoder": "registry",
    "get_preset": "registry",
    "list_presets": "registry",
    "preset_names": "registry",
    "DEFAULT_ENCODER": "registry",
    "Encoder": "encoder",
    "load_encoder": "encoder",
    "build_encoder": "encoder",
    "build_architecture": "encoder",
    "encode_tiles": "encoder",
    "prepare_state_dict": "encoder",
    "weights_digest": "weights",
    "VisionTransformer": "vit",
    "ResNet50": "resnet",
    "hf_to_timm": "hf",
    "timm_to_lite0": "lite0",
    "lite0_to_timm": "lite0",
}

__all__ = sorted(_EXPORTS)

# The built-in presets register themselves on import (no torch needed). A new encoder is one module beside
# these that calls register_encoder(...), plus its import here (docs/extending.md).
from hevisum.encoders import presets  # noqa: E402,F401


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hevisum.encoders' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hevisum.encoders.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
