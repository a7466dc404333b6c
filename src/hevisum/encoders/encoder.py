"""Building, loading and running encoders: ``load_encoder`` → :class:`Encoder` → ``encode_tiles``.

:class:`Encoder` wraps one architecture (``backbone``, timm parameter names) with its preset: ``embed(x)``
takes float images in [0, 1] (N, 3, H, W), applies the preset's mean/std and pooling and returns
(N, ``feature_dim``). :func:`encode_tiles` feeds it uint8 tiles batch by batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hevisum.encoders.hf import hf_pos_grid, hf_to_timm, is_hf_layout
from hevisum.encoders.lite0 import build_lite0, is_timm_lite0, timm_to_lite0
from hevisum.encoders.registry import EncoderPreset, get_preset
from hevisum.encoders.resnet import ResNet50
from hevisum.encoders.vit import VisionTransformer
from hevisum.encoders.weights import (
    read_weight_file,
    select_prefixed,
    strip_common_prefix,
    unwrap_state_dict,
    weights_digest,
)
from hevisum.errors import HevisumError

#: Classifier heads a feature extractor does not use; dropped from weight files before the strict load.
_HEAD_KEYS: dict[str, tuple[str, ...]] = {
    "vit": ("head.weight", "head.bias"),
    "resnet50": ("fc.weight", "fc.bias"),
    "effnet-lite0": ("_fc.weight", "_fc.bias"),
}
#: Feature length of EfficientNet-Lite0's stage-pooled features (``embed(x, stages=True)``).
LITE0_STAGES_DIM = 2848


def build_architecture(preset: EncoderPreset, **overrides: Any) -> nn.Module:
    """The preset's network with random weights (on the current default device: use ``torch.device("meta")``
    to build the largest ones without allocating memory)."""
    if preset.architecture == "vit":
        return VisionTransformer(**{**preset.kwargs, **overrides})
    if preset.architecture == "resnet50":
        return ResNet50(**overrides)
    if preset.architecture == "effnet-lite0":
        return build_lite0()
    raise HevisumError(f"unknown architecture {preset.architecture!r} in preset {preset.name}")


def _feature_dim(preset: EncoderPreset, pooling: str, backbone: nn.Module) -> int:
    if preset.architecture == "vit":
        return VisionTransformer.pooled_dim(backbone.embed_dim, pooling)
    return int(backbone.num_features)


class Encoder(nn.Module):
    """A frozen image encoder: normalisation + backbone + pooling, described by its preset.

    Attributes: ``preset``; ``feature_dim`` (length of one embedding); ``pooling``; ``weights_path`` and
    ``weights_sha256`` (the file the weights came from and its digest, None for random weights);
    ``stages_feature_dim`` (2848 for EfficientNet-Lite0, whose ``embed(x, stages=True)`` returns the mean and
    standard deviation of every stage's output plus the 1280-d embedding; None for the others).
    """

    def __init__(self, preset: EncoderPreset, backbone: nn.Module, pooling: str | None = None) -> None:
        super().__init__()
        pooling = pooling or preset.pooling
        allowed = ("cls", "cls+mean") if preset.architecture == "vit" else ("avg",)
        if pooling not in allowed:
            raise HevisumError(f"encoder {preset.name} pools with {' or '.join(allowed)}, got {pooling!r}")
        self.preset = preset
        self.pooling = pooling
        self.backbone = backbone
        self.feature_dim = _feature_dim(preset, pooling, backbone)
        self.stages_feature_dim = LITE0_STAGES_DIM if preset.architecture == "effnet-lite0" else None
        self.weights_path: str | None = None
        self.weights_sha256: str | None = None
        self.register_buffer("mean", torch.tensor(preset.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preset.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def name(self) -> str:
        """The preset's name."""
        return self.preset.name

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] → (x - mean) / std with the preset's statistics."""
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def embed(self, x: torch.Tensor, stages: bool = False) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1], already at the encoder's input size → (N, feature_dim).

        ``stages=True`` (EfficientNet-Lite0 only) returns the (N, 2848) stage-pooled features instead.
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise HevisumError(f"embed takes a float tensor (N, 3, H, W), got shape {tuple(x.shape)}")
        x = self.normalise(x)
        arch = self.preset.architecture
        if stages:
            if arch != "effnet-lite0":
                raise HevisumError(f"stage-pooled features exist only for effnet-lite0, not {self.preset.name}")
            return self.backbone.forward_stages(x)
        if arch == "vit":
            return self.backbone.pool(self.backbone.forward_features(x), self.pooling)
        if arch == "effnet-lite0":
            return self.backbone.forward_features(x)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`embed`."""
        return self.embed(x)

    def extra_repr(self) -> str:
        return f"preset={self.preset.name}, pooling={self.pooling}, feature_dim={self.feature_dim}"


def build_encoder(name: str | EncoderPreset, *, pooling: str | None = None, **overrides: Any) -> Encoder:
    """An :class:`Encoder` for a preset with random weights (tests, shape checks; ``torch.device("meta")``
    context for the large ones)."""
    preset = name if isinstance(name, EncoderPreset) else get_preset(name)
    return Encoder(preset, build_architecture(preset, **overrides), pooling=pooling).eval()


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _list(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", …" if len(keys) > n else "")


def prepare_state_dict(
    preset: EncoderPreset, state: dict[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], path: Any
) -> dict[str, torch.Tensor]:
    """Turn a file's state dict into exactly the backbone's keys and shapes, or raise a one-line HevisumError.

    Strips wrapper prefixes, maps the transformers layout (ViT) or timm's EfficientNet-Lite0 names, drops
    classifier heads, then compares keys and shapes with ``expected`` (what the backbone's state dict has).
    """
    state = strip_common_prefix(state)
    notes: list[str] = []
    if preset.architecture == "vit" and is_hf_layout(state):
        state, unmapped = hf_to_timm(state)
        if unmapped:
            notes.append(f"{len(unmapped)} transformers keys not understood ({_list(unmapped, 3)})")
    elif preset.architecture == "effnet-lite0" and is_timm_lite0(state):
        state = timm_to_lite0(state)
    for key in _HEAD_KEYS.get(preset.architecture, ()):
        state.pop(key, None)
    if set(state) != set(expected):
        picked = select_prefixed(state, set(expected))
        if picked is not None:
            state = picked
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    what = f"{preset.name} ({preset.timm_name}" + (", transformers layout)" if preset.layout == "hf" else ")")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        parts += notes
        raise HevisumError(f"{path} does not hold the weights of {what}: {'; '.join(parts)}")
    bad = [(k, _shape(state[k]), tuple(expected[k])) for k in expected if _shape(state[k]) != tuple(expected[k])]
    if bad:
        key, got, want = bad[0]
        more = f" (and {len(bad) - 1} more mismatched tensors)" if len(bad) > 1 else ""
        raise HevisumError(
            f"{path} does not hold the weights of {what}: '{key}' has shape {got} in the file, expected {want}{more}"
        )
    return state


def _hf_overrides(preset: EncoderPreset, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """For a transformers-layout file, build the ViT at the position grid the file was trained with."""
    if preset.architecture != "vit" or not is_hf_layout(state):
        return {}
    try:
        grid = hf_pos_grid(strip_common_prefix(dict(state)))
    except HevisumError:
        return {}
    patch = preset.kwargs.get("patch_size", 16)
    if grid and grid * patch != preset.kwargs.get("img_size"):
        return {"img_size": grid * patch}
    return {}


def load_encoder(
    name: str | EncoderPreset,
    weights: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    pooling: str | None = None,
) -> Encoder:
    """The preset's encoder with weights from a local file, strictly loaded, frozen, in eval mode on ``device``.

    ``weights``: a ``.safetensors`` file or a torch file holding a plain state dict (read with
    ``weights_only=True``; ``state_dict``/``model``/``teacher`` containers and ``module.``/``backbone.``
    wrappers are unwrapped); transformers-layout files are mapped onto timm names. None is allowed only for the
    built-in preset (effnet-lite0, whose weights ship with an installed package). Nothing is ever downloaded.
    ``pooling`` overrides the preset's pooling (``cls``/``cls+mean`` for ViTs).
    The result records ``weights_path`` and ``weights_sha256`` (see :func:`weights_digest`).
    """
    preset = name if isinstance(name, EncoderPreset) else get_preset(name)
    if weights is None or str(weights) == "":
        if not preset.builtin:
            raise HevisumError(
                f"encoder {preset.name} needs its weight file, which hevisum never downloads: get "
                f"{preset.weight_file} from {preset.source} (accept its licence there) and pass "
                f"--encoder-weights PATH"
            )
        from hevisum.models.effnet import lite0_weights_path, load_pretrained_lite0

        path = lite0_weights_path()
        backbone = load_pretrained_lite0(path)
        backbone.reset_classifier(0)
        encoder = Encoder(preset, backbone, pooling=pooling)
    else:
        path = Path(weights).expanduser()
        state = unwrap_state_dict(read_weight_file(path), path)
        overrides = _hf_overrides(preset, state)
        with torch.device("meta"):
            backbone = build_architecture(preset, **overrides)
        expected = {k: _shape(v) for k, v in backbone.state_dict().items()}
        state = prepare_state_dict(preset, state, expected, path)
        dtype_ok = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
        backbone.load_state_dict(dtype_ok, strict=True, assign=True)
        encoder = Encoder(preset, backbone, pooling=pooling)
    encoder.requires_grad_(False)
    encoder.weights_path = str(path)
    encoder.weights_sha256 = weights_digest(path)
    return encoder.to(device).eval()


def _check_tiles(tiles: Any) -> tuple[int, int, int]:
    shape = getattr(tiles, "shape", None)
    dtype = getattr(tiles, "dtype", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
        raise HevisumError(
            f"tiles must be a uint8 array of shape (N, H, W, 3), got {dtype or type(tiles).__name__} {shape}"
        )
    return int(shape[0]), int(shape[1]), int(shape[2])


def encode_tiles(
    encoder: Encoder,
    tiles: Any,
    *,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    bf16: bool = False,
    progress: bool = False,
    input_px: int | None = None,
    stages: bool = False,
) -> np.ndarray:
    """Embed uint8 RGB tiles (N, H, W, 3) → float32 (N, feature_dim).

    Tiles are read ``batch_size`` at a time (a ``np.memmap`` is never loaded whole), scaled to [0, 1], resized
    to ``input_px`` (default: the preset's) with bilinear interpolation (antialiased when shrinking) when their
    size differs, and embedded under ``inference_mode`` (bfloat16 autocast when ``bf16``). The encoder is moved
    to ``device`` and put in eval mode. ``stages`` (effnet-lite0) returns the 2848-d stage-pooled features.
    """
    if not isinstance(encoder, Encoder):
        raise HevisumError(f"encode_tiles takes an Encoder from load_encoder, got {type(encoder).__name__}")
    n, h, w = _check_tiles(tiles)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise HevisumError(f"batch_size must be a positive integer, got {batch_size!r}")
    px = int(input_px or encoder.preset.input_px)
    patch = encoder.preset.patch_size
    if px < 16 or (patch and px % patch):
        extra = f" and a multiple of the patch size {patch}" if patch else ""
        raise HevisumError(f"input_px {px} must be >= 16{extra}")
    dim = encoder.stages_feature_dim if stages else encoder.feature_dim
    if stages and dim is None:
        raise HevisumError(f"stage-pooled features exist only for effnet-lite0, not {encoder.preset.name}")
    dev = torch.device(device)
    encoder.to(dev).eval()
    out = np.empty((n, int(dim)), dtype=np.float32)
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=math.ceil(n / batch_size), desc=f"{encoder.preset.name} features", unit="batch")
    with torch.inference_mode():
        for start in starts:
            batch = np.ascontiguousarray(np.asarray(tiles[start:start + batch_size], dtype=np.uint8))
            if not batch.flags.writeable:
                batch = batch.copy()
            x = torch.from_numpy(batch).to(dev).permute(0, 3, 1, 2).float().div_(255.0)
            if (h, w) != (px, px):
                x = F.interpolate(x, size=(px, px), mode="bilinear", align_corners=False, antialias=px < max(h, w))
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=bool(bf16)):
                feats = encoder.embed(x, stages=stages)
            out[start:start + len(batch)] = feats.float().cpu().numpy()
    return out
