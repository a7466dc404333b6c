"""Integrated-gradients attributions of spot predictions to the pixels of their H&E tiles, and overlays.

Everything here takes plain objects (a torch module, numpy arrays) so it serves any model, whichever run or
method produced it:

* :func:`integrated_gradients` attributes one target of a differentiable ``forward`` to the pixels of uint8
  tiles with captum's ``IntegratedGradients``. ``forward`` takes **NHWC float pixel values on the 0..255 scale**
  (the uint8 tile as float) and returns (N, T); the preprocessing lives inside it, so attributions are in the
  input pixels' space and have the tiles' shape (N, H, W, 3).
* :func:`tile_model_forward` wraps a tile network (e.g. ``VisionMLP_MultiTask``, ``EffNetRegressor``) that takes
  :func:`hevisum.models.cnn.normalise_uint8` batches into such a ``forward``.
* :func:`feature_head_forward` builds the same for frozen-encoder ridge methods: encoder → per-slide z-score
  (the slide's statistics as constants) → linear head, with :func:`lite0_embed` for EfficientNet-Lite0 and
  :func:`fold_ridge_head` to turn a fitted :class:`~hevisum.models.baselines.RidgeHead` into one linear map.
* :func:`attribution_overlay`, :func:`overlay_rgb` and :func:`slide_overlay` draw the results;
  :func:`save_png`, :func:`save_tile_overlays` and :func:`save_slide_overlay` write PNGs atomically.

Integrated gradients (Sundararajan et al. 2017) integrates the gradient along the straight path from a baseline
image to the tile; by construction the attributions sum to f(tile) − f(baseline) up to the error of the numerical
integral, reported per tile as ``convergence_delta`` (captum's sign: sum of attributions minus the difference).
Networks with ReLU6 (EfficientNet-Lite) have gradients that jump along the path, so the integral converges more
slowly than for smooth networks: check ``convergence_delta`` and raise ``steps`` when it is not small.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hevisum.errors import HevisumError
from hevisum.models.cnn import IMAGENET_MEAN, IMAGENET_STD
from hevisum.names import plot_text, safe_name

#: Baselines understood by name: all-black (0), all-white (255) and the tile itself, Gaussian-blurred.
BASELINES = ("black", "white", "blur")
#: Integration rules of captum's IntegratedGradients.
IG_METHODS = ("gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle")
#: Per-spot summaries of an attribution map (see :func:`summarise_attributions`).
SUMMARIES = ("sum", "abs", "centre")
#: Ways to turn the channel-summed attribution into a heat map (see :func:`attribution_map`).
MAP_MODES = ("abs", "signed", "positive", "negative")

# ---------------------------------------------------------------------------------------------------------------
# Differentiable preprocessing and forward chains
# ---------------------------------------------------------------------------------------------------------------


class PixelInput(nn.Module):
    """NHWC float pixel values on the 0..255 scale → the float NCHW batch the image models expect.

    The same arithmetic as :func:`hevisum.models.cnn.normalise_uint8` (x/255, then ImageNet mean/std), but on a
    float tensor and differentiable. ``input_size`` resizes the batch like
    :func:`hevisum.models.effnet.extract_features` does (bilinear, antialiased when shrinking).
    """

    def __init__(self, input_size: int | None = None) -> None:
        super().__init__()
        if input_size is not None and (not isinstance(input_size, int) or isinstance(input_size, bool)
                                       or input_size < 1):
            raise HevisumError(f"input_size must be None or a positive integer (pixels), got {input_size!r}")
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) pixel values → (N, 3, H', W') normalised (H' = W' = ``input_size`` when set)."""
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise HevisumError(f"pixels must have shape (N, H, W, 3), got {tuple(pixels.shape)}")
        x = pixels.permute(0, 3, 1, 2).to(self.mean.dtype) / 255.0
        x = ((x - self.mean) / self.std).contiguous()
        size = self.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=size < x.shape[-1])
        return x


class PixelModel(nn.Module):
    """A tile network behind :class:`PixelInput`: NHWC pixel values (0..255) → the network's (N, T) outputs."""

    def __init__(self, model: nn.Module, input_size: int | None = None) -> None:
        super().__init__()
        self.pre = PixelInput(input_size)
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) pixel values → (N, T)."""
        return self.model(self.pre(pixels))


def tile_model_forward(model: nn.Module, *, input_size: int | None = None) -> PixelModel:
    """The ``forward`` for :func:`integrated_gradients` of a tile network fed :func:`normalise_uint8` batches.

    ``input_size`` resizes the tiles first when the network was trained on resized tiles. The model is put in
    eval mode (dropout off, BatchNorm on its running statistics), as at prediction time.
    """
    if not isinstance(model, nn.Module):
        raise HevisumError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return PixelModel(model, input_size).eval()


class EncoderEmbed(nn.Module):
    """Pixels → :class:`PixelInput` → one feature method of an encoder (``forward_features``,
    ``forward_stages`` ...): the frozen-encoder features of a tile, differentiable w.r.t. its pixels.
    ``columns`` (a slice or indices) keeps only those feature columns."""

    def __init__(self, encoder: nn.Module, method: str = "forward_features", input_size: int | None = None,
                 columns: slice | Sequence[int] | None = None) -> None:
        super().__init__()
        if not callable(getattr(encoder, method, None)):
            raise HevisumError(f"encoder {type(encoder).__name__} has no {method} method")
        self.pre = PixelInput(input_size)
        self.encoder = encoder
        self.method = method
        self.columns = columns if columns is None or isinstance(columns, slice) else list(columns)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) pixel values → (N, F) features."""
        f = getattr(self.encoder, self.method)(self.pre(pixels)).float()
        return f if self.columns is None else f[:, self.columns]


def lite0_embed(encoder: nn.Module | None = None, *, kind: str = "effnet", input_size: int | None = 112,
                columns: slice | Sequence[int] | None = None) -> EncoderEmbed:
    """EfficientNet-Lite0 features of pixel tiles, as :func:`hevisum.features.compute_features` computes them.

    ``kind`` ``"effnet"``: ``forward_features``, the pooled 1280-d embedding; ``"effnet-stages"``:
    ``forward_stages``, every stage's mean and standard deviation then the 1280-d embedding (2848 columns, the
    pooled features last; ``columns=slice(0, 1568)`` keeps the stage statistics alone). ``encoder`` None loads
    the ImageNet weights (:func:`load_pretrained_lite0`).
    ``input_size`` must be the size the features were computed at (``models.encoder_input`` of the run).
    The features are computed in float32 here; cached features may come from bfloat16 autocast, so they agree
    to bfloat16 precision only.
    """
    methods = {"effnet": "forward_features", "pooled": "forward_features",
               "effnet-stages": "forward_stages", "stages": "forward_stages"}
    if kind not in methods:
        raise HevisumError(f"kind must be 'effnet' (pooled) or 'effnet-stages', got {kind!r}")
    if encoder is None:
        from hevisum.models.effnet import load_pretrained_lite0

        encoder = load_pretrained_lite0()
    return EncoderEmbed(encoder, methods[kind], input_size, columns).eval()


def slide_statistics(features: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std + eps) of one slide's (N, F) features: the constants of
    :func:`hevisum.pipeline.standardise_per_slide`, whose z-score is ``(x - mean) / (std + 1e-6)``."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] == 0:
        raise HevisumError(f"features must be a non-empty (N, F) array of one slide, got shape {x.shape}")
    return x.mean(axis=0), x.std(axis=0) + eps


def fold_ridge_head(head: Any, *, pca_mean: np.ndarray | None = None,
                    pca_components: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(coef (T, F), intercept (T,)) of a fitted :class:`~hevisum.models.baselines.RidgeHead` with its own
    feature scaler folded in: ``RidgeHead.predict(X) == X @ coef.T + intercept``.

    ``head`` is the head or its :meth:`~hevisum.models.baselines.RidgeHead.state` dict (x_mean, x_scale, coef,
    intercept). A head fitted on a PCA projection ``(X - pca_mean) @ pca_components.T`` (the encoder probe)
    gives the map on X itself when both are given.
    """
    st = head.state() if hasattr(head, "state") else head
    try:
        x_mean, x_scale = np.asarray(st["x_mean"], np.float64), np.asarray(st["x_scale"], np.float64)
        coef = np.atleast_2d(np.asarray(st["coef"], np.float64))
        intercept = np.atleast_1d(np.asarray(st["intercept"], np.float64))
    except (KeyError, TypeError):
        msg = "head must be a fitted RidgeHead or its state() (x_mean, x_scale, coef, intercept)"
        raise HevisumError(msg) from None
    if coef.shape[1] != x_mean.shape[0] or x_scale.shape != x_mean.shape:
        raise HevisumError(f"ridge state shapes disagree: coef {coef.shape}, x_mean {x_mean.shape}, "
                           f"x_scale {x_scale.shape}")
    w = coef / x_scale
    b = intercept - w @ x_mean
    if (pca_mean is None) != (pca_components is None):
        raise HevisumError("give both pca_mean and pca_components, or neither")
    if pca_components is not None:
        comps = np.atleast_2d(np.asarray(pca_components, np.float64))
        centre = np.asarray(pca_mean, np.float64).ravel()
        if comps.shape[0] != w.shape[1] or comps.shape[1] != centre.shape[0]:
            raise HevisumError(f"pca_components {comps.shape} and pca_mean {centre.shape} do not fit a head on "
                               f"{w.shape[1]} components")
        w = w @ comps
        b = b - w @ centre
    return w, b


class FeatureHeadForward(nn.Module):
    """encoder features → (x − mean) / std with fixed slide statistics → linear head (weight (T, F), bias (T,)).

    ``forward`` maps whatever ``embed`` takes (pixels, for :func:`lite0_embed`) to (N, T) predictions;
    ``features`` stops after the standardisation.
    """

    def __init__(self, embed: nn.Module | Callable[[torch.Tensor], torch.Tensor], mean: torch.Tensor,
                 std: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.embed = embed
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The standardised features (N, F)."""
        f = self.embed(x)
        if f.ndim != 2 or f.shape[1] != self.mean.shape[0]:
            raise HevisumError(f"the encoder returned features of shape {tuple(f.shape)}, but the slide statistics "
                               f"have {self.mean.shape[0]} columns")
        return (f.to(self.mean.dtype) - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T) predictions."""
        return self.features(x) @ self.weight.T + self.bias


def feature_head_forward(encoder_embed: nn.Module | Callable[[torch.Tensor], torch.Tensor],
                         mean: np.ndarray | None, std: np.ndarray | None, coef: np.ndarray,
                         intercept: np.ndarray | float, *, columns: Sequence[int] | slice | None = None
                         ) -> FeatureHeadForward:
    """The differentiable chain of a frozen-encoder ridge method: ``encoder_embed`` → per-slide z-score → linear.

    ``encoder_embed`` maps the attribution input to (N, F) features (:func:`lite0_embed` for EfficientNet-Lite0,
    which takes pixels). ``mean`` and ``std`` (F,) are the slide's feature statistics, held constant (the
    divisor as used, i.e. with the epsilon: :func:`slide_statistics`); None for both skips the standardisation
    (runs with ``feature_norm`` other than ``slide``). ``coef`` (T, F_total) or (F_total,) and ``intercept`` are
    the head's linear map on the standardised features: for a :class:`RidgeHead`, :func:`fold_ridge_head`.

    ``columns`` picks the coefficient columns the encoder features feed (default: the first F). Columns that a
    method concatenates after the encoder's (colour statistics, coordinates) are left out: the chain's output is
    the prediction minus their contribution, and the attributions explain the encoder's part of the prediction.
    """
    w = np.asarray(coef, dtype=np.float64)
    if w.ndim == 1:
        w = w[None, :]
    b = np.atleast_1d(np.asarray(intercept, dtype=np.float64))
    if w.ndim != 2 or b.ndim != 1 or b.shape[0] not in (1, w.shape[0]):
        raise HevisumError(f"coef must be (T, F) and intercept (T,), got {np.shape(coef)} and {np.shape(intercept)}")
    if (mean is None) != (std is None):
        raise HevisumError("give both mean and std (the slide's statistics) or neither")
    if mean is not None:
        m = np.asarray(mean, dtype=np.float64).ravel()
        s = np.asarray(std, dtype=np.float64).ravel()
        if m.shape != s.shape:
            raise HevisumError(f"mean and std must have the same length, got {m.shape[0]} and {s.shape[0]}")
        if not (np.all(np.isfinite(m)) and np.all(np.isfinite(s)) and np.all(s > 0)):
            raise HevisumError("mean must be finite and std finite and positive (add an epsilon to zero stds)")
    n_feat = None if mean is None else m.shape[0]
    if columns is None:
        if n_feat is None:
            n_feat = w.shape[1]
        if n_feat > w.shape[1]:
            raise HevisumError(f"the slide statistics have {n_feat} columns but coef only {w.shape[1]}")
        w = w[:, :n_feat]
    else:
        w = w[:, columns]
        if n_feat is not None and w.shape[1] != n_feat:
            raise HevisumError(f"columns select {w.shape[1]} coefficients but the slide statistics have {n_feat}")
        n_feat = w.shape[1]
    if mean is None:
        m, s = np.zeros(n_feat), np.ones(n_feat)
    b = np.broadcast_to(b, (w.shape[0],)).copy()

    def t(a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=torch.float32)

    module = FeatureHeadForward(encoder_embed, t(m), t(s), t(w), t(b))
    return module.eval()


# ---------------------------------------------------------------------------------------------------------------
# Integrated gradients
# ---------------------------------------------------------------------------------------------------------------


def _check_tiles(tiles: Any) -> np.ndarray:
    if getattr(tiles, "dtype", None) != np.uint8 or getattr(tiles, "ndim", 0) != 4 or tiles.shape[-1] != 3:
        raise HevisumError(
            f"tiles must be a uint8 array of shape (N, H, W, 3), got "
            f"{getattr(tiles, 'dtype', type(tiles).__name__)} {getattr(tiles, 'shape', None)}"
        )
    return np.asarray(tiles)


def make_baseline(tiles_uint8: np.ndarray, baseline: str | np.ndarray = "black", *,
                  blur_sigma: float | None = None) -> np.ndarray:
    """The float32 (N, H, W, 3) baseline images (0..255 scale) for :func:`integrated_gradients`.

    ``"black"``: zeros; ``"white"``: 255 everywhere; ``"blur"``: each tile Gaussian-blurred over its rows and
    columns with ``blur_sigma`` px (default: an eighth of the tile's side), which keeps the colour but removes the
    structure. An array of shape (H, W, 3) (one image for all tiles) or (N, H, W, 3) is used as given.
    """
    tiles = _check_tiles(tiles_uint8)
    if isinstance(baseline, str):
        if baseline == "black":
            return np.zeros(tiles.shape, dtype=np.float32)
        if baseline == "white":
            return np.full(tiles.shape, 255.0, dtype=np.float32)
        if baseline == "blur":
            from scipy.ndimage import gaussian_filter

            sigma = min(tiles.shape[1:3]) / 8.0 if blur_sigma is None else float(blur_sigma)
            if not sigma > 0:
                raise HevisumError(f"blur_sigma must be positive, got {blur_sigma!r}")
            return gaussian_filter(tiles.astype(np.float32), sigma=(0, sigma, sigma, 0), mode="reflect")
        raise HevisumError(f"baseline must be one of {list(BASELINES)} or an array, got {baseline!r}")
    arr = np.asarray(baseline, dtype=np.float32)
    if arr.shape == tiles.shape[1:]:
        arr = np.broadcast_to(arr, tiles.shape)
    if arr.shape != tiles.shape:
        raise HevisumError(f"a baseline array must have shape {tiles.shape[1:]} or {tiles.shape}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise HevisumError("the baseline array contains NaN or infinite values")
    return np.ascontiguousarray(arr)


@contextlib.contextmanager
def _prepared(forward: Any, device: torch.device) -> Iterator[None]:
    """Run an ``nn.Module`` in eval mode on ``device``; afterwards every submodule gets its own training flag
    back and the module returns to the device of its first parameter or buffer."""
    if not isinstance(forward, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in forward.modules()]
    first = next(itertools.chain(forward.parameters(), forward.buffers()), None)
    home = first.device if first is not None else None
    forward.to(device).eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        if home is not None:
            forward.to(home)


def _targets(target_index: int | Sequence[int] | np.ndarray, n: int) -> list[int]:
    if isinstance(target_index, (int, np.integer)) and not isinstance(target_index, bool):
        idx = [int(target_index)] * n
    else:
        arr = np.asarray(target_index)
        if arr.ndim != 1 or arr.shape[0] != n or not np.issubdtype(arr.dtype, np.integer):
            raise HevisumError(f"target_index must be an integer or {n} integers (one per tile), got {target_index!r}")
        idx = [int(i) for i in arr]
    if any(i < 0 for i in idx):
        raise HevisumError(f"target_index must be >= 0, got {min(idx)}")
    return idx


def integrated_gradients(
    forward: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    tiles_uint8: np.ndarray,
    target_index: int | Sequence[int] | np.ndarray,
    *,
    baseline: str | np.ndarray = "black",
    steps: int = 64,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    method: str = "gausslegendre",
    blur_sigma: float | None = None,
    rtol: float | None = None,
    max_steps: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Integrated-gradients attributions of output ``target_index`` to the pixels of each tile.

    ``forward`` maps a float32 tensor of **NHWC pixel values on the 0..255 scale** to (N, T) outputs, with the
    model's preprocessing inside (:func:`tile_model_forward`, :func:`feature_head_forward`). ``tiles_uint8`` is
    (N, H, W, 3) uint8; ``target_index`` one output column for all tiles or one per tile. ``baseline``: see
    :func:`make_baseline`. ``steps`` points of captum's integration ``method`` (Gauss-Legendre by default);
    ``batch_size`` is the most images one forward/backward pass sees. An ``nn.Module`` is run in eval mode on
    ``device`` and put back in its previous mode and on its previous device afterwards.

    ``rtol`` refines where the integral has not converged: tiles whose |convergence_delta| exceeds
    ``rtol`` × |f(tile) − f(baseline)| are attributed again with twice the steps, until they pass or the steps
    would exceed ``max_steps``.

    How many steps suffice depends on the network and the baseline. A smooth network (SiLU, LeakyReLU, such as
    ``VisionMLP_MultiTask``) is within a few percent at 64. EfficientNet-Lite0 (ReLU6) behind a per-slide z-score
    and a ridge head needs 64 to 128 for its stage statistics with a white or blurred baseline, more with a black
    one (far from any H&E tile). Its pooled 1280-d features are harder: a ReLU6 channel that is almost never
    active on the slide gets unit variance from the standardisation, and where it switches on along the path
    it swings the prediction far beyond both end points, so the integral may not converge even at 512 steps.
    Always look at ``convergence_delta`` relative to f(tile) − f(baseline) (:func:`output_difference`).

    Returns (attributions float32 (N, H, W, 3): one value per pixel and channel of the uint8 input, in the
    output's units; convergence_delta float32 (N,) = sum of the tile's attributions − (f(tile) − f(baseline))).
    """
    from captum.attr import IntegratedGradients

    tiles = _check_tiles(tiles_uint8)
    n = tiles.shape[0]
    targets = _targets(target_index, n)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 2:
        raise HevisumError(f"steps must be an integer >= 2, got {steps!r}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise HevisumError(f"batch_size must be a positive integer, got {batch_size!r}")
    if rtol is not None and not (np.isfinite(rtol) and rtol > 0):
        raise HevisumError(f"rtol must be None or a positive number, got {rtol!r}")
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < steps:
        raise HevisumError(f"max_steps must be an integer >= steps ({steps}), got {max_steps!r}")
    if method not in IG_METHODS:
        raise HevisumError(f"method must be one of {list(IG_METHODS)}, got {method!r}")
    if not callable(forward):
        raise HevisumError(f"forward must be a callable (a torch module), got {type(forward).__name__}")
    base = make_baseline(tiles, baseline, blur_sigma=blur_sigma)
    dev = torch.device(device)
    attributions = np.zeros(tiles.shape, dtype=np.float32)
    deltas = np.zeros(n, dtype=np.float32)
    if n == 0:
        return attributions, deltas

    def checked(x: torch.Tensor) -> torch.Tensor:
        out = forward(x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            raise HevisumError(f"forward must return an (N, T) tensor, got "
                               f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}")
        if max(targets) >= out.shape[1]:
            raise HevisumError(f"target_index {max(targets)} is out of range for {out.shape[1]} outputs")
        return out.float()

    ig = IntegratedGradients(checked)

    def attribute(rows: np.ndarray, n_steps: int) -> None:
        for start in range(0, len(rows), batch_size):
            sel = rows[start : start + batch_size]
            x = torch.from_numpy(tiles[sel].astype(np.float32)).to(dev)
            b = torch.from_numpy(np.ascontiguousarray(base[sel])).to(dev)
            attr, delta = ig.attribute(x, baselines=b, target=[targets[i] for i in sel], n_steps=n_steps,
                                       method=method, internal_batch_size=batch_size,
                                       return_convergence_delta=True)
            attributions[sel] = attr.detach().float().cpu().numpy()
            deltas[sel] = delta.detach().float().cpu().numpy()

    # attributions need autograd even when the caller is inside torch.inference_mode()/no_grad()
    with _prepared(forward, dev), torch.inference_mode(False), torch.enable_grad():
        attribute(np.arange(n), steps)
        n_steps = steps
        while rtol is not None and 2 * n_steps <= max_steps:
            # f(tile) − f(baseline) = sum of attributions − delta, by the definition of delta
            diff = attributions.sum(axis=(1, 2, 3), dtype=np.float64) - deltas
            todo = np.flatnonzero(np.abs(deltas) > rtol * np.abs(diff))
            if todo.size == 0:
                break
            n_steps *= 2
            attribute(todo, n_steps)
    return attributions, deltas


def output_difference(forward: nn.Module | Callable[[torch.Tensor], torch.Tensor], tiles_uint8: np.ndarray,
                      target_index: int | Sequence[int] | np.ndarray, *, baseline: str | np.ndarray = "black",
                      blur_sigma: float | None = None, batch_size: int = 16,
                      device: str | torch.device = "cpu") -> np.ndarray:
    """f(tile) − f(baseline) of output ``target_index`` per tile (N,) float64: what the attributions of
    :func:`integrated_gradients` sum to, e.g. to express ``convergence_delta`` relative to it."""
    tiles = _check_tiles(tiles_uint8)
    targets = np.asarray(_targets(target_index, tiles.shape[0]))
    base = make_baseline(tiles, baseline, blur_sigma=blur_sigma)
    dev = torch.device(device)
    out = np.zeros(tiles.shape[0], dtype=np.float64)
    with _prepared(forward, dev), torch.no_grad():
        for start in range(0, tiles.shape[0], batch_size):
            sl = slice(start, start + batch_size)
            x = torch.from_numpy(tiles[sl].astype(np.float32)).to(dev)
            b = torch.from_numpy(np.ascontiguousarray(base[sl])).to(dev)
            rows = torch.arange(x.shape[0])
            t = torch.as_tensor(targets[sl])
            fx, fb = forward(x).float().cpu()[rows, t], forward(b).float().cpu()[rows, t]
            out[sl] = (fx - fb).double().numpy()
    return out


# ---------------------------------------------------------------------------------------------------------------
# Summaries and overlays
# ---------------------------------------------------------------------------------------------------------------


def _check_attr(attribution: Any, ndim: int) -> np.ndarray:
    a = np.asarray(attribution, dtype=np.float64)
    if a.ndim != ndim or a.shape[-1] != 3:
        want = "(H, W, 3)" if ndim == 3 else "(N, H, W, 3)"
        raise HevisumError(f"attributions must have shape {want}, got {a.shape}")
    return np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def summarise_attributions(attributions: np.ndarray, how: str = "abs") -> np.ndarray:
    """One number per tile (N,) float64 from (N, H, W, 3) attributions.

    ``"sum"``: the signed total (≈ f(tile) − f(baseline)); ``"abs"``: the total magnitude, Σ |channel sum| over
    the pixels; ``"centre"``: the share of that magnitude in the tile's centre third (the spot itself rather than
    its surroundings), 0..1 (NaN for an all-zero map).
    """
    a = _check_attr(attributions, 4)
    per_px = a.sum(axis=-1)
    if how == "sum":
        return per_px.sum(axis=(1, 2))
    mag = np.abs(per_px)
    total = mag.sum(axis=(1, 2))
    if how == "abs":
        return total
    if how == "centre":
        h, w = mag.shape[1:3]
        inner = mag[:, h // 3 : h - h // 3, w // 3 : w - w // 3].sum(axis=(1, 2))
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, inner / np.where(total > 0, total, 1.0), np.nan)
    raise HevisumError(f"how must be one of {list(SUMMARIES)}, got {how!r}")


def attribution_map(attribution: np.ndarray, *, mode: str = "abs", clip_percentile: float = 99.0) -> np.ndarray:
    """(H, W) heat map of a tile's (H, W, 3) attribution, scaled to [0, 1] (``"signed"``: [−1, 1]).

    The attribution is summed over the colour channels per pixel, then ``"abs"`` takes its magnitude,
    ``"positive"``/``"negative"`` keep one sign (as a magnitude), ``"signed"`` keeps both. The map is divided by
    the ``clip_percentile`` percentile of its magnitude and clipped, so a few extreme pixels do not wash out the
    rest.
    """
    if mode not in MAP_MODES:
        raise HevisumError(f"mode must be one of {list(MAP_MODES)}, got {mode!r}")
    if not 0 < clip_percentile <= 100:
        raise HevisumError(f"clip_percentile must be in (0, 100], got {clip_percentile!r}")
    s = _check_attr(attribution, 3).sum(axis=-1)
    if mode == "abs":
        s = np.abs(s)
    elif mode == "positive":
        s = np.clip(s, 0, None)
    elif mode == "negative":
        s = np.clip(-s, 0, None)
    scale = float(np.percentile(np.abs(s), clip_percentile))
    if not scale > 0:
        scale = float(np.abs(s).max())
    if not scale > 0:
        return np.zeros(s.shape, dtype=np.float64)
    lo = -1.0 if mode == "signed" else 0.0
    return np.clip(s / scale, lo, 1.0)


def _default_cmap(mode: str) -> str:
    return "RdBu_r" if mode == "signed" else "inferno"


def overlay_rgb(tile: np.ndarray, attribution: np.ndarray, *, mode: str = "abs", clip_percentile: float = 99.0,
                alpha: float = 0.6, cmap: str | None = None) -> np.ndarray:
    """The tile (H, W, 3) uint8 with the heat map of :func:`attribution_map` blended over it → (H, W, 3) uint8.

    Each pixel's opacity is ``alpha`` × its normalised magnitude, so unimportant tissue stays visible.
    """
    import matplotlib

    t = np.asarray(tile)
    if t.dtype != np.uint8 or t.ndim != 3 or t.shape[-1] != 3:
        raise HevisumError(f"tile must be a uint8 (H, W, 3) array, got {t.dtype} {t.shape}")
    if np.shape(attribution)[:2] != t.shape[:2]:
        raise HevisumError(f"attribution {np.shape(attribution)} does not match the tile {t.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise HevisumError(f"alpha must be in [0, 1], got {alpha!r}")
    m = attribution_map(attribution, mode=mode, clip_percentile=clip_percentile)
    colours = matplotlib.colormaps[cmap or _default_cmap(mode)]((m + 1) / 2 if mode == "signed" else m)[..., :3]
    a = alpha * np.abs(m)[..., None]
    out = (1 - a) * (t / 255.0) + a * colours
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def attribution_overlay(tile: np.ndarray, attribution: np.ndarray, ax: Any = None, *, mode: str = "abs",
                        clip_percentile: float = 99.0, alpha: float = 0.6, cmap: str | None = None,
                        title: str | None = None, colorbar: bool = True):
    """Draw the tile with its attribution heat map (see :func:`overlay_rgb`) on ``ax`` (a new Figure when None).

    ``title`` (a target or spot name) is shown as plain text, never as math. Returns the Figure.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    rgb = overlay_rgb(tile, attribution, mode=mode, clip_percentile=clip_percentile, alpha=alpha, cmap=cmap)
    fig = ax.figure if ax is not None else _new_figure((4.2, 3.6))
    if ax is None:
        ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rgb, interpolation="nearest")
    ax.set_axis_off()
    if title is not None:
        ax.set_title(plot_text(title), fontsize=9)
    if colorbar:
        norm = Normalize(-1.0, 1.0) if mode == "signed" else Normalize(0.0, 1.0)
        sm = ScalarMappable(norm=norm, cmap=cmap or _default_cmap(mode))
        cb = fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.04)
        cb.set_label(plot_text(f"attribution ({mode}, / p{clip_percentile:g})"), fontsize=7)
        cb.ax.tick_params(labelsize=6)
    return fig


def slide_overlay(thumbnail: np.ndarray | None, xy: np.ndarray, values: np.ndarray, *, scale: float = 1.0,
                  ax: Any = None, title: str | None = None, label: str | None = None, cmap: str | None = None,
                  size: float | None = None, clip_percentile: float = 99.0, alpha: float = 0.5):
    """Per-spot values (e.g. :func:`summarise_attributions`) as coloured dots over the slide thumbnail.

    ``xy`` (N, 2) are spot centres (x, y) in full-resolution pixels; ``scale`` maps them to the thumbnail
    (thumbnail px per full-resolution px). Values with both signs get a diverging map centred on 0; the colour
    range is clipped at the ``clip_percentile`` percentile of the magnitudes. ``thumbnail`` None draws the spots
    alone (y pointing down, as on the image). Returns the Figure.
    """
    from matplotlib.colors import Normalize

    pts = np.asarray(xy, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64).ravel()
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] != v.shape[0]:
        raise HevisumError(f"xy must be (N, 2) and values (N,), got {pts.shape} and {np.shape(values)}")
    if not (np.isfinite(scale) and scale > 0):
        raise HevisumError(f"scale must be a positive number, got {scale!r}")
    p = pts * scale
    finite = np.isfinite(v)
    mags = np.abs(v[finite])
    top = float(np.percentile(mags, clip_percentile)) if mags.size else 1.0
    top = top if top > 0 else 1.0
    signed = bool(finite.any() and v[finite].min() < 0 < v[finite].max())
    if signed:
        norm, cm = Normalize(-top, top), cmap or "RdBu_r"
    else:
        lo = float(v[finite].min()) if finite.any() else 0.0
        hi = float(v[finite].max()) if finite.any() else 1.0
        if lo >= 0:
            lo, hi = 0.0, min(hi, top) if hi > 0 else 1.0
        norm, cm = Normalize(lo, hi if hi > lo else lo + 1.0), cmap or "viridis"
    fig = ax.figure if ax is not None else _new_figure((6.0, 5.0))
    if ax is None:
        ax = fig.add_subplot(1, 1, 1)
    if thumbnail is not None:
        thumb = np.asarray(thumbnail)
        ax.imshow(thumb, alpha=alpha, interpolation="nearest")
    if size is None:
        size = float(np.clip(20000.0 / max(len(v), 1), 2.0, 30.0))
    sc = ax.scatter(p[finite, 0], p[finite, 1], c=v[finite], s=size, cmap=cm, norm=norm, linewidths=0)
    if (~finite).any():
        ax.scatter(p[~finite, 0], p[~finite, 1], s=size, c="#bdbdbd", marker="x", linewidths=0.5)
    if thumbnail is None:
        ax.set_aspect("equal")
        ax.invert_yaxis()
    ax.set_axis_off()
    if title is not None:
        ax.set_title(plot_text(title), fontsize=9)
    cb = fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04)
    if label is not None:
        cb.set_label(plot_text(label), fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


# ---------------------------------------------------------------------------------------------------------------
# Writing PNGs
# ---------------------------------------------------------------------------------------------------------------


def save_png(fig: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Write a Figure to ``path`` as PNG, atomically (a temporary file renamed into place)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from hevisum.io.atomic import atomic_path

    path = Path(path)
    if fig.canvas is None or not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        # the temporary name ends in .tmp, so the format is given explicitly
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def save_tile_overlays(out_dir: str | Path, tiles_uint8: np.ndarray, attributions: np.ndarray,
                       spot_ids: Sequence[object], target: object, *, dpi: int = 120, **overlay_kw: Any
                       ) -> list[Path]:
    """One overlay PNG per tile: ``out_dir/<target>/<spot>.png`` (both names made safe with
    :func:`hevisum.names.safe_name`), titled with the spot and target names. Returns the paths in tile order.
    ``overlay_kw`` go to :func:`attribution_overlay`."""
    tiles = _check_tiles(tiles_uint8)
    attrs = _check_attr(attributions, 4)
    ids = list(spot_ids)
    if not (len(ids) == tiles.shape[0] == attrs.shape[0]):
        raise HevisumError(f"got {tiles.shape[0]} tiles, {attrs.shape[0]} attributions and {len(ids)} spot ids")
    folder = Path(out_dir) / safe_name(target)
    paths = []
    for tile, attr, spot in zip(tiles, attrs, ids, strict=True):
        fig = attribution_overlay(tile, attr, title=f"{spot} · {target}", **overlay_kw)
        paths.append(save_png(fig, folder / f"{safe_name(spot)}.png", dpi=dpi))
    return paths


def save_slide_overlay(path: str | Path, thumbnail: np.ndarray | None, xy: np.ndarray, values: np.ndarray, *,
                       dpi: int = 120, **overlay_kw: Any) -> Path:
    """:func:`slide_overlay` written to ``path`` as PNG (atomically). Build ``path`` with
    :func:`hevisum.names.safe_name` for any slide or target name in it."""
    return save_png(slide_overlay(thumbnail, xy, values, **overlay_kw), path, dpi=dpi)
