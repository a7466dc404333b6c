"""Baselines that need no deep network: a mean profile, hand-made colour/texture features, ridge and MLP heads.

Everything here takes numpy arrays and returns numpy arrays. Only :class:`MLPHead` uses torch, imported when fitted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hevisum.errors import HevisumError

#: Regularisation grid searched by :class:`RidgeHead` (and the ridge stacker) when no alpha is given.
RIDGE_ALPHAS: np.ndarray = np.logspace(-2, 7, 19)  # wide: on real slides the best penalty is often large

# Ruifrok & Johnston (2001) stain vectors (optical density per RGB channel) for haematoxylin, eosin and DAB.
# DAB is absent from H&E; it is kept as the third row so the matrix is square and invertible and the residual
# colour has somewhere to go instead of leaking into H or E.
_RUIFROK_HED = np.array(
    [
        [0.65, 0.70, 0.29],
        [0.07, 0.99, 0.11],
        [0.27, 0.57, 0.78],
    ]
)
_STAINS_FROM_OD = np.linalg.inv(_RUIFROK_HED / np.linalg.norm(_RUIFROK_HED, axis=1, keepdims=True))

_REGION_FEATURES = (
    "r_mean", "g_mean", "b_mean", "r_std", "g_std", "b_std",
    "hue_cos", "hue_sin", "sat_mean", "sat_std", "val_mean", "val_std",
    "od_mean", "h_mean", "h_std", "h_p90", "e_mean", "e_std", "e_p90", "e_fraction",
    "grad_mean", "grad_std", "grey_p10", "grey_p50", "grey_p90",
)  # fmt: skip
#: Names of the columns returned by :func:`colour_features`, whole tile first, then the centre third.
COLOUR_FEATURE_NAMES: tuple[str, ...] = tuple(
    f"{region}_{name}" for region in ("tile", "centre") for name in _REGION_FEATURES
)


def _as_2d(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise HevisumError(f"{name} must be a non-empty 2-D array (rows = spots), got shape {np.shape(a)}")
    if not np.all(np.isfinite(arr)):
        raise HevisumError(f"{name} contains NaN or infinite values; remove or impute them first")
    return arr


def _check_xy(X: Any, Y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = _as_2d(X, "X"), _as_2d(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise HevisumError(f"X and Y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")
    return x, y


class MeanBaseline:
    """Predicts the training mean profile for every spot (the floor any model must beat)."""

    def fit(self, X: Any, Y: Any) -> MeanBaseline:
        """Store the column means of ``Y``; ``X`` is ignored (it may be None)."""
        y = _as_2d(Y, "Y")
        self.mean_ = y.mean(axis=0)
        return self

    def predict(self, X: Any) -> np.ndarray:
        """(N, T) copies of the training mean; N = len(X)."""
        if not hasattr(self, "mean_"):
            raise HevisumError("MeanBaseline is not fitted: call fit(X, Y) first")
        return np.tile(self.mean_, (len(X), 1))


def _region_stats(rgb: np.ndarray) -> np.ndarray:
    """Per-tile statistics of a float RGB batch (n, h, w, 3) on the 0..255 scale → (n, 25)."""
    n = rgb.shape[0]
    flat = rgb.reshape(n, -1, 3)
    feats: list[np.ndarray] = [flat.mean(axis=1), flat.std(axis=1)]

    # HSV-like: value = max, saturation = chroma / max; hue summarised on the circle (cos, sin of the mean angle
    # weighted by chroma) because an arithmetic mean of hue angles is meaningless across the 0/360 wrap
    mx, mn = flat.max(axis=2), flat.min(axis=2)
    chroma = mx - mn
    sat = np.where(mx > 0, chroma / np.maximum(mx, 1e-6), 0.0)
    r, g, b = flat[..., 0], flat[..., 1], flat[..., 2]
    # hexagonal hue approximation: atan2(√3 (g − b), 2r − g − b), exact enough for a summary statistic
    angle = np.arctan2(np.sqrt(3.0) * (g - b), 2.0 * r - g - b)
    w = chroma / np.maximum(chroma.sum(axis=1, keepdims=True), 1e-6)
    feats += [
        (w * np.cos(angle)).sum(axis=1, keepdims=True),
        (w * np.sin(angle)).sum(axis=1, keepdims=True),
        sat.mean(axis=1, keepdims=True), sat.std(axis=1, keepdims=True),
        mx.mean(axis=1, keepdims=True) / 255.0, mx.std(axis=1, keepdims=True) / 255.0,
    ]  # fmt: skip

    # colour deconvolution: Beer-Lambert optical density, then stain concentrations via the inverse stain matrix
    od = -np.log10((flat + 1.0) / 256.0)
    stains = od @ _STAINS_FROM_OD
    h, e = stains[..., 0], stains[..., 1]
    feats += [
        od.mean(axis=(1, 2))[:, None],
        h.mean(axis=1, keepdims=True), h.std(axis=1, keepdims=True), np.quantile(h, 0.9, axis=1)[:, None],
        e.mean(axis=1, keepdims=True), e.std(axis=1, keepdims=True), np.quantile(e, 0.9, axis=1)[:, None],
    ]  # fmt: skip
    # stain balance, independent of how dark the tile is: eosin's share of the (non-negative) stain amounts
    h_sum, e_sum = np.clip(h, 0, None).sum(axis=1), np.clip(e, 0, None).sum(axis=1)
    feats.append((e_sum / np.maximum(h_sum + e_sum, 1e-6))[:, None])

    # texture on the luminance: central-difference gradient magnitude and a few grey-level quantiles
    grey = rgb @ np.array([0.299, 0.587, 0.114])
    gy, gx = np.gradient(grey, axis=(1, 2))
    mag = np.hypot(gx, gy).reshape(n, -1)
    q = np.quantile(grey.reshape(n, -1), [0.1, 0.5, 0.9], axis=1).T
    feats += [mag.mean(axis=1, keepdims=True), mag.std(axis=1, keepdims=True), q]
    return np.concatenate(feats, axis=1)


def colour_features(tiles_uint8: np.ndarray, chunk_size: int = 256) -> np.ndarray:
    """Colour, stain and texture statistics per tile: (N, S, S, 3) uint8 → (N, 50) float32.

    For the whole tile and for its centre third (the spot itself): RGB mean/std, HSV-like hue (circular),
    saturation and value statistics, optical density, Ruifrok H&E stain concentration mean/std/90th percentile and
    eosin fraction E/(H+E),
    gradient magnitude mean/std and grey-level 10/50/90 % quantiles. Column names are :data:`COLOUR_FEATURE_NAMES`.
    Works chunk by chunk, so a ``np.memmap`` is never read whole.
    """
    shape = getattr(tiles_uint8, "shape", None)
    if shape is None or len(shape) != 4 or shape[-1] != 3 or getattr(tiles_uint8, "dtype", None) != np.uint8:
        raise HevisumError(
            f"tiles_uint8 must be a uint8 array of shape (N, S, S, 3), got "
            f"{getattr(tiles_uint8, 'dtype', type(tiles_uint8).__name__)} {shape}"
        )
    if shape[1] < 3 or shape[2] < 3:
        raise HevisumError(f"tiles must be at least 3×3 pixels, got {shape[1]}×{shape[2]}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise HevisumError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    n, sh, sw = int(shape[0]), int(shape[1]), int(shape[2])
    h0, h1, w0, w1 = sh // 3, sh - sh // 3, sw // 3, sw - sw // 3
    out = np.empty((n, len(COLOUR_FEATURE_NAMES)), dtype=np.float32)
    for start in range(0, n, chunk_size):
        chunk = np.asarray(tiles_uint8[start : start + chunk_size], dtype=np.float64)
        out[start : start + len(chunk)] = np.concatenate(
            [_region_stats(chunk), _region_stats(chunk[:, h0:h1, w0:w1])], axis=1
        )
    return out


class _Standardiser:
    """Column z-scores fitted on training data; constant columns are left centred but unscaled."""

    def fit(self, x: np.ndarray) -> _Standardiser:
        self.mean_ = x.mean(axis=0)
        sd = x.std(axis=0)
        self.scale_ = np.where(sd > 1e-12, sd, 1.0)
        return self

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) / self.scale_


def choose_alpha_by_groups(X: np.ndarray, Y: np.ndarray, groups: np.ndarray, alphas: np.ndarray) -> float:
    """The ridge penalty with the best mean per-spot Spearman on held-out groups (leave one group out).

    One SVD per held-out group gives the fit for every alpha at once.
    """
    from hevisum.metrics import mean_spot_spearman

    scores = np.zeros(len(alphas))
    for g in np.unique(groups):
        m = groups == g
        xm, ym = X[~m].mean(axis=0), Y[~m].mean(axis=0)
        U, S, Vt = np.linalg.svd(X[~m] - xm, full_matrices=False)
        UtY = U.T @ (Y[~m] - ym)
        Xte = (X[m] - xm) @ Vt.T
        for i, a in enumerate(alphas):
            pred = (Xte * (S / (S**2 + a))) @ UtY + ym
            v = mean_spot_spearman(pred, Y[m])
            scores[i] += v if np.isfinite(v) else -1.0
    return float(alphas[int(np.argmax(scores))])


class RidgeHead:
    """Standardised features → multi-output ridge regression.

    ``alpha`` None picks one alpha for all targets from :data:`RIDGE_ALPHAS`: with ``groups`` (slide ids, or
    spatial blocks) of at least two values, by leave-one-group-out on the mean per-spot Spearman; otherwise
    by efficient leave-one-out CV (``RidgeCV``). Neighbouring spots are correlated, so leave-one-out picks
    penalties that are too small for a new slide; whole groups do not. A number fits ``Ridge(alpha)``
    directly. ``alpha_`` holds the value used after ``fit``.
    """

    def __init__(self, alpha: float | None = None) -> None:
        if alpha is not None and not (np.isfinite(alpha) and alpha > 0):
            raise HevisumError(f"alpha must be None (cross-validated) or a positive number, got {alpha!r}")
        self.alpha = alpha

    def fit(self, X: Any, Y: Any, groups: Any = None) -> RidgeHead:
        """Fit the scaler and the ridge on (N, F) features and (N, T) targets (``groups``: see the class)."""
        from sklearn.linear_model import Ridge, RidgeCV

        x, y = _check_xy(X, Y)
        self._scaler = _Standardiser().fit(x)
        xs = self._scaler.transform(x)
        self._squeeze = np.ndim(Y) == 1
        if self.alpha is None and groups is not None and len(np.unique(groups)) >= 2 and y.shape[1] >= 3:
            self.alpha_ = choose_alpha_by_groups(xs, y, np.asarray(groups), RIDGE_ALPHAS)
            self._model = Ridge(alpha=self.alpha_).fit(xs, y)
        elif self.alpha is None:
            self._model = RidgeCV(alphas=RIDGE_ALPHAS).fit(xs, y)
            self.alpha_ = float(self._model.alpha_)
        else:
            self._model = Ridge(alpha=self.alpha).fit(xs, y)
            self.alpha_ = float(self.alpha)
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, X: Any) -> np.ndarray:
        """(N, F) features → (N, T) predictions."""
        if not hasattr(self, "_model"):
            raise HevisumError(f"{type(self).__name__} is not fitted: call fit(X, Y) first")
        x = _as_2d(X, "X")
        if x.shape[1] != self.n_features_in_:
            raise HevisumError(f"X has {x.shape[1]} features but the model was fitted on {self.n_features_in_}")
        pred = np.asarray(self._model.predict(self._scaler.transform(x)))
        return pred.reshape(len(x), -1)

    def state(self) -> dict[str, np.ndarray]:
        """The fitted parameters as plain arrays (saved as safetensors; nothing pickled)."""
        return {"x_mean": self._scaler.mean_, "x_scale": self._scaler.scale_,
                "coef": np.atleast_2d(np.asarray(self._model.coef_, dtype=np.float64)),
                "intercept": np.atleast_1d(np.asarray(self._model.intercept_, dtype=np.float64)),
                "alpha": np.array([self.alpha_])}

    @classmethod
    def from_state(cls, st: dict[str, np.ndarray]) -> "RidgeHead":
        """Rebuild a fitted head from :meth:`state`."""
        from sklearn.linear_model import Ridge

        head = cls(alpha=float(st["alpha"][0]))
        head._scaler = _Standardiser()
        head._scaler.mean_, head._scaler.scale_ = st["x_mean"], st["x_scale"]
        model = Ridge(alpha=head.alpha)
        model.coef_, model.intercept_ = st["coef"], st["intercept"]
        model.n_features_in_ = st["coef"].shape[1]
        head._model, head.alpha_, head.n_features_in_, head._squeeze = model, head.alpha, st["coef"].shape[1], False
        return head


class MLPHead:
    """Standardised features → Linear → GELU → Dropout → Linear, trained with AdamW on MSE (standardised targets).

    Early stopping on a held-out ``val_fraction`` of the rows (random, from ``seed``) keeps the best-validation
    weights. The same seed gives the same predictions on CPU; torch's global random state is left untouched.
    """

    def __init__(
        self,
        hidden: int = 256,
        epochs: int = 200,
        seed: int = 0,
        lr: float = 1e-3,
        weight_decay: float = 1e-2,
        dropout: float = 0.1,
        batch_size: int = 128,
        patience: int = 20,
        val_fraction: float = 0.1,
    ) -> None:
        for name, value in (("hidden", hidden), ("epochs", epochs), ("batch_size", batch_size), ("patience", patience)):
            if not isinstance(value, int) or value < 1:
                raise HevisumError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise HevisumError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        if not 0.0 <= dropout < 1.0:
            raise HevisumError(f"dropout must be in [0, 1), got {dropout!r}")
        self.hidden, self.epochs, self.seed = hidden, epochs, seed
        self.lr, self.weight_decay, self.dropout = lr, weight_decay, dropout
        self.batch_size, self.patience, self.val_fraction = batch_size, patience, val_fraction

    def fit(self, X: Any, Y: Any) -> MLPHead:
        """Fit on (N, F) features and (N, T) targets (N ≥ 10 so that a validation split exists)."""
        import torch
        from torch import nn

        from hevisum.models.regress import train_regressor

        x, y = _check_xy(X, Y)
        if len(x) < 10:
            raise HevisumError(f"MLPHead needs at least 10 rows to hold out a validation split, got {len(x)}")
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(len(x))
        n_val = max(1, int(round(self.val_fraction * len(x))))
        val, train = order[:n_val], order[n_val:]
        self._xs = _Standardiser().fit(x[train])
        self._ys = _Standardiser().fit(y[train])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self._net = nn.Sequential(
                nn.Linear(x.shape[1], self.hidden), nn.GELU(), nn.Dropout(self.dropout),
                nn.Linear(self.hidden, y.shape[1]),
            )  # fmt: skip
            opt = torch.optim.AdamW(self._net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
            self.history_ = train_regressor(
                self._net, opt,
                self._xs.transform(x[train]), self._ys.transform(y[train]),
                self._xs.transform(x[val]), self._ys.transform(y[val]),
                max_epochs=self.epochs, batch_size=self.batch_size, patience=self.patience, seed=self.seed,
            )  # fmt: skip
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, X: Any) -> np.ndarray:
        """(N, F) features → (N, T) predictions."""
        import torch

        if not hasattr(self, "_net"):
            raise HevisumError("MLPHead is not fitted: call fit(X, Y) first")
        x = _as_2d(X, "X")
        if x.shape[1] != self.n_features_in_:
            raise HevisumError(f"X has {x.shape[1]} features but the model was fitted on {self.n_features_in_}")
        self._net.eval()
        with torch.inference_mode():
            z = self._net(torch.as_tensor(self._xs.transform(x), dtype=torch.float32)).double().numpy()
        return z * self._ys.scale_ + self._ys.mean_

    def params(self) -> dict:
        """Hyper-parameters and shapes, JSON-safe: with :meth:`state` they rebuild the fitted head."""
        return {"hidden": self.hidden, "epochs": self.epochs, "seed": self.seed, "lr": self.lr,
                "weight_decay": self.weight_decay, "dropout": self.dropout, "batch_size": self.batch_size,
                "patience": self.patience, "val_fraction": self.val_fraction,
                "n_features": int(self.n_features_in_), "n_outputs": int(self._ys.mean_.shape[0])}

    def state(self) -> dict[str, np.ndarray]:
        """Scalers and network weights as plain arrays."""
        st = {f"net.{k}": v.detach().cpu().numpy() for k, v in self._net.state_dict().items()}
        st.update({"x_mean": self._xs.mean_, "x_scale": self._xs.scale_, "y_mean": self._ys.mean_,
                   "y_scale": self._ys.scale_})
        return st

    @classmethod
    def from_state(cls, params: dict, st: dict[str, np.ndarray]) -> "MLPHead":
        """Rebuild a fitted head from :meth:`params` and :meth:`state`."""
        import torch
        from torch import nn

        p = dict(params)
        n_in, n_out = p.pop("n_features"), p.pop("n_outputs")
        head = cls(**p)
        head._xs, head._ys = _Standardiser(), _Standardiser()
        head._xs.mean_, head._xs.scale_ = st["x_mean"], st["x_scale"]
        head._ys.mean_, head._ys.scale_ = st["y_mean"], st["y_scale"]
        head._net = nn.Sequential(nn.Linear(n_in, head.hidden), nn.GELU(), nn.Dropout(head.dropout),
                                  nn.Linear(head.hidden, n_out))
        head._net.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in st.items()
                                   if k.startswith("net.")}, strict=True)
        head.n_features_in_ = n_in
        return head
