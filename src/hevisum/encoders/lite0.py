"""EfficientNet-Lite0 as an encoder: the network of :mod:`hevisum.models.effnet`, plus timm's key names.

Our module keeps the names of the efficientnet-pytorch checkpoint that ships with the package (``_conv_stem``,
``_blocks.<i>._expand_conv`` …). A state dict saved from timm's ``tf_efficientnet_lite0`` (``conv_stem``,
``blocks.<stage>.<repeat>.conv_pw`` …) describes the same network, TF "SAME" padding and BatchNorm eps 1e-3
included, so :func:`timm_to_lite0` renames its keys one to one and it loads strictly.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from hevisum.models.effnet import LITE0_STAGES, EfficientNetLite0

# timm top-level names → ours
_TOP = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1", "classifier": "_fc"}
# inside a block: timm's DepthwiseSeparable (first stage, no expansion) and InvertedResidual (the others)
_DS = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
_IR = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv", "bn2": "_bn1",
       "conv_pwl": "_project_conv", "bn3": "_bn2"}


def _block_index() -> dict[tuple[int, int], int]:
    """(stage, repeat) → position in our flat ``_blocks`` list."""
    out: dict[tuple[int, int], int] = {}
    i = 0
    for stage, spec in enumerate(LITE0_STAGES):
        for r in range(spec[4]):
            out[(stage, r)] = i
            i += 1
    return out


_BLOCKS = _block_index()
_BLOCKS_INV = {v: k for k, v in _BLOCKS.items()}


def is_timm_lite0(keys: Iterator[str] | list[str]) -> bool:
    """True when the keys use timm's names (``conv_stem.weight`` present)."""
    return "conv_stem.weight" in set(keys)


def timm_to_lite0(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm ``tf_efficientnet_lite0`` state dict to our module's names (unknown keys pass unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        if parts[0] in _TOP:
            new = ".".join([_TOP[parts[0]], *parts[1:]])
        elif parts[0] == "blocks" and len(parts) >= 5 and parts[1].isdigit() and parts[2].isdigit():
            stage, rep = int(parts[1]), int(parts[2])
            table = _DS if stage == 0 else _IR
            if (stage, rep) in _BLOCKS and parts[3] in table:
                new = ".".join(["_blocks", str(_BLOCKS[(stage, rep)]), table[parts[3]], *parts[4:]])
        out[new] = value
    return out


def lite0_to_timm(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names → timm's (inverse of :func:`timm_to_lite0`)."""
    top = {v: k for k, v in _TOP.items()}
    ds = {v: k for k, v in _DS.items()}
    ir = {v: k for k, v in _IR.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        if parts[0] in top:
            new = ".".join([top[parts[0]], *parts[1:]])
        elif parts[0] == "_blocks" and len(parts) >= 4 and parts[1].isdigit():
            stage, rep = _BLOCKS_INV[int(parts[1])]
            table = ds if stage == 0 else ir
            if parts[2] in table:
                new = ".".join(["blocks", str(stage), str(rep), table[parts[2]], *parts[3:]])
        out[new] = value
    return out


def build_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 without classifier (random weights)."""
    return EfficientNetLite0(num_classes=0)
