"""The reference multi-branch CNN (``VisionMLP_MultiTask``) and the shared image normalisation.

The network sees one spot tile (3×S×S, S divisible by 3, 78 px by default) through three branches:

* the whole tile,
* the 3×3 grid of subtiles (one shared encoder, features averaged over the 9 subtiles),
* the centre subtile alone (same structure, its own weights),

and a small MLP decoder maps the concatenated 3×128 embedding to the targets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hevisum.errors import HevisumError

#: ImageNet channel statistics (RGB, on the 0..1 scale); every image model in hevisum is fed tiles scaled this way.
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalise_uint8(
    tiles: torch.Tensor | np.ndarray,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Turn uint8 RGB tiles (N, H, W, 3) into a float (N, 3, H, W) tensor: x/255 normalised by ImageNet mean/std.

    A numpy array is wrapped without copying; the conversion to float happens on ``device`` (the tensor's own
    device when None), so a GPU does the arithmetic when one is used.
    """
    if isinstance(tiles, np.ndarray):
        # torch must not wrap read-only memory (e.g. a memmap opened with mode 'r'); copy only in that case
        arr = np.ascontiguousarray(tiles)
        tiles = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    if not isinstance(tiles, torch.Tensor):
        raise HevisumError(f"tiles must be a uint8 tensor or numpy array of shape (N, H, W, 3), got {type(tiles).__name__}")
    if tiles.dtype != torch.uint8:
        raise HevisumError(f"tiles must have dtype uint8 (0..255 RGB), got {tiles.dtype}")
    if tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise HevisumError(f"tiles must have shape (N, H, W, 3), got {tuple(tiles.shape)}")
    if device is not None:
        tiles = tiles.to(device, non_blocking=True)
    x = tiles.permute(0, 3, 1, 2).to(dtype).div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=dtype, device=x.device).view(1, 3, 1, 1)
    # contiguous_format: the permuted view would otherwise stay channels-last, which some CPU kernels handle slowly
    return x.sub_(mean).div_(std).contiguous()


class ResidualBlock(nn.Module):
    """conv3×3 → BN → SiLU → conv3×3 → BN → SiLU, plus a shortcut (1×1 conv + BN when channels change)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        # Convolutions keep PyTorch's default bias=True even before BN: that is what the reference does and
        # what its published parameter count (6,679,843) requires.
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.SiLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.SiLU(inplace=True),
        )
        if in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Body plus shortcut."""
        return self.body(x) + self.shortcut(x)


def _stem() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.SiLU(inplace=True), nn.MaxPool2d(2))


def _mlp(widths: list[int], dropout: float) -> nn.Sequential:
    """Dropout before and LeakyReLU(0.01) after every Linear, the reference's encoder-head pattern."""
    layers: list[nn.Module] = []
    for w_in, w_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Dropout(dropout), nn.Linear(w_in, w_out), nn.LeakyReLU(0.01)]
    return nn.Sequential(*layers)


class MultiScalePool(nn.Module):
    """Adaptive average pools at several grid sizes, flattened and concatenated (a small spatial pyramid)."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.pools = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) → (B, C·Σ s²)."""
        return torch.cat([p(x).flatten(1) for p in self.pools], dim=1)


class TileEncoder(nn.Module):
    """Whole-tile branch: 4 stages down to 256 channels (9×9 at 78 px), pools 1×1 + 3×3 (2560) → 512 → 256 → 128."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _stem(),
            ResidualBlock(32, 64), ResidualBlock(64, 64), nn.MaxPool2d(2),
            ResidualBlock(64, 128), ResidualBlock(128, 128), nn.MaxPool2d(2),
            ResidualBlock(128, 256), ResidualBlock(256, 256),
        )  # fmt: skip
        self.pool = MultiScalePool((1, 3))
        self.mlp = _mlp([256 * (1 + 9), 512, 256, 128], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 128)."""
        return self.mlp(self.pool(self.features(x)))


class SubtileEncoder(nn.Module):
    """Subtile branch: 3 stages down to 128 channels (6×6 at 26 px), pools 1×1 + 2×2 + 3×3 (1792) → 256 → 128.

    ``forward_pooled`` stops before the MLP so the grid branch can average the 9 subtiles' pooled features first.
    """

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _stem(),
            ResidualBlock(32, 64), ResidualBlock(64, 64), nn.MaxPool2d(2),
            ResidualBlock(64, 128), ResidualBlock(128, 128),
        )  # fmt: skip
        self.pool = MultiScalePool((1, 2, 3))
        self.mlp = _mlp([128 * (1 + 4 + 9), 256, 128], dropout)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) → (B, 1792), before the MLP."""
        return self.pool(self.features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, s, s) → (B, 128)."""
        return self.mlp(self.forward_pooled(x))


def split_subtiles(x: torch.Tensor) -> torch.Tensor:
    """Cut (B, C, S, S) tiles into their 3×3 grid of subtiles, row-major: (B, 9, C, S/3, S/3); index 4 is the centre."""
    b, c, h, w = x.shape
    s = h // 3
    # (B, C, row, s, col, s) → (B, row, col, C, s, s)
    return x.reshape(b, c, 3, s, 3, s).permute(0, 2, 4, 1, 3, 5).reshape(b, 9, c, s, s)


class VisionMLP_MultiTask(nn.Module):  # noqa: N801  (the reference's class name, kept so the two are easy to compare)
    """The reference HEVisum CNN: tile, subtile-grid and centre-subtile branches → MLP decoder.

    Input: a float batch (B, 3, S, S) already scaled by :func:`normalise_uint8`, S divisible by 3 (78 by default;
    the subtiles are S/3 wide and are sliced inside the model). Output: (B, n_outputs), no output activation.

    Reading of the spec that gives the reference's 6,679,843 parameters for 35 outputs: every convolution has a
    bias (PyTorch's default, even before BatchNorm: stems, residual bodies and 1×1 shortcuts alike), and the encoder
    MLPs put Dropout before every Linear, the first included. Without conv biases the count would be 6,675,587.

    Like timm models it splits into ``forward_features`` (the 384-d embedding) and ``forward_head``.
    ``hparams`` holds the constructor arguments so :func:`hevisum.models.factory.create_model` can rebuild it.
    """

    model_name = "hevisum-cnn"
    num_features = 384

    def __init__(self, n_outputs: int = 35, dropout: float = 0.1) -> None:
        super().__init__()
        if not isinstance(n_outputs, int) or isinstance(n_outputs, bool) or n_outputs < 1:
            raise HevisumError(f"n_outputs must be a positive integer, got {n_outputs!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise HevisumError(f"dropout must be in [0, 1), got {dropout!r}")
        self.hparams: dict[str, Any] = {"n_outputs": n_outputs, "dropout": float(dropout)}
        self.n_outputs = n_outputs
        self.tile_encoder = TileEncoder(dropout)
        self.subtile_encoder = SubtileEncoder(dropout)
        self.center_encoder = SubtileEncoder(dropout)
        self.decoder = nn.Sequential(
            nn.Linear(3 * 128, 256), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(128, 64), nn.LeakyReLU(0.01), nn.Dropout(dropout),
            nn.Linear(64, n_outputs),
        )  # fmt: skip

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) → (B, 384): tile, mean-of-subtiles and centre-subtile embeddings concatenated."""
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3] or x.shape[2] % 3 or x.shape[2] < 12:
            raise HevisumError(
                f"input must be a (B, 3, S, S) batch with S divisible by 3 and at least 12, got {tuple(x.shape)}"
            )
        b = x.shape[0]
        subtiles = split_subtiles(x)  # (B, 9, 3, s, s)
        s = subtiles.shape[-1]
        tile_emb = self.tile_encoder(x)
        # the 9 subtiles go through the shared encoder as one batch; their pooled features are averaged
        # before the MLP, as in the reference
        pooled = self.subtile_encoder.forward_pooled(subtiles.reshape(b * 9, 3, s, s))
        grid_emb = self.subtile_encoder.mlp(pooled.view(b, 9, -1).mean(dim=1))
        centre_emb = self.center_encoder(subtiles[:, 4])
        return torch.cat([tile_emb, grid_emb, centre_emb], dim=1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """(B, 384) → (B, n_outputs)."""
        return self.decoder(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) normalised tiles → (B, n_outputs) predictions."""
        return self.forward_head(self.forward_features(x))
