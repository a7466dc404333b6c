"""Second-level models that combine fold models' out-of-fold predictions: the reference StackingMLP and a ridge.

Feed these out-of-fold predictions only (each spot predicted by the fold model that did not train on it): the
reference fed in-sample predictions, which makes the stacker trust overfitted models and its validation optimistic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from hevisum.errors import HevisumError
from hevisum.models.baselines import RidgeHead, _check_xy, _Standardiser
from hevisum.models.regress import train_regressor


class StackingMLP(nn.Module):
    """The reference meta-model: n_inputs → 512 → 256 → n_outputs.

    Each hidden layer is Linear → LeakyReLU(0.01) → BatchNorm1d → Dropout(0.2) (BatchNorm after the activation,
    as in the reference).
    """

    def __init__(
        self, n_inputs: int, n_outputs: int, hidden: tuple[int, ...] = (512, 256), dropout: float = 0.2
    ) -> None:
        super().__init__()
        for name, value in (("n_inputs", n_inputs), ("n_outputs", n_outputs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise HevisumError(f"{name} must be a positive integer, got {value!r}")
        self.hparams: dict[str, Any] = {
            "n_inputs": n_inputs, "n_outputs": n_outputs, "hidden": tuple(hidden), "dropout": float(dropout),
        }  # fmt: skip
        layers: list[nn.Module] = []
        width = n_inputs
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LeakyReLU(0.01), nn.BatchNorm1d(h), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, n_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_inputs) → (B, n_outputs)."""
        return self.net(x)


def _validation_split(n: int, groups: np.ndarray | None, seed: int) -> tuple[np.ndarray, np.ndarray, Any]:
    """(train rows, validation rows, held-out group or None): one whole group when groups has ≥ 2, else 80/20."""
    rng = np.random.default_rng(seed)
    if groups is not None:
        g = np.asarray(groups)
        if g.ndim != 1 or len(g) != n:
            raise HevisumError(f"groups must be a 1-D array with one slide id per row ({n}), got shape {g.shape}")
        uniq = np.unique(g)
        if len(uniq) >= 2:
            held = uniq[rng.integers(len(uniq))]
            return np.flatnonzero(g != held), np.flatnonzero(g == held), held
        # a single slide cannot be held out against itself: fall through to a random split
    order = rng.permutation(n)
    n_val = max(1, int(round(0.2 * n)))
    return np.sort(order[n_val:]), np.sort(order[:n_val]), None


class FittedStacker:
    """A trained :class:`StackingMLP` with its input scaler; ``predict`` takes and returns numpy arrays."""

    def __init__(
        self, net: StackingMLP, scaler: _Standardiser, history: list[dict[str, float]], held_out: Any
    ) -> None:
        self.net = net
        self._scaler = scaler
        self.history_ = history
        #: the slide id used for validation (None when the split was random)
        self.held_out_group_ = held_out
        self.n_features_in_ = int(net.hparams["n_inputs"])

    def predict(self, X: Any) -> np.ndarray:
        """(N, n_inputs) out-of-fold style predictions → (N, n_outputs)."""
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.n_features_in_:
            raise HevisumError(f"X must have shape (N, {self.n_features_in_}), got {x.shape}")
        self.net.eval()
        with torch.inference_mode():
            return self.net(torch.as_tensor(self._scaler.transform(x), dtype=torch.float32)).double().numpy()

    def params(self) -> dict:
        """JSON-safe constructor arguments of the network."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.net.hparams.items()}

    def state(self) -> dict[str, np.ndarray]:
        """Input scaler and network weights as plain arrays (saved as safetensors)."""
        st = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        st.update({"x_mean": self._scaler.mean_, "x_scale": self._scaler.scale_})
        return st


def load_stacker_state(params: dict, st: dict[str, np.ndarray]) -> FittedStacker:
    """Rebuild a :class:`FittedStacker` from :meth:`FittedStacker.params` and :meth:`FittedStacker.state`."""
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in params.items() if k != "methods"}
    net = StackingMLP(**kw)
    net.load_state_dict({k[4:]: torch.from_numpy(np.array(v)) for k, v in st.items() if k.startswith("net.")},
                        strict=True)
    scaler = _Standardiser()
    scaler.mean_, scaler.scale_ = st["x_mean"], st["x_scale"]
    return FittedStacker(net, scaler, [], None)


class RidgeStacker(RidgeHead):
    """Ridge regression over the same stacked inputs, with the stacker's ``fit(X, Y, groups=None)`` interface.

    ``alpha`` None chooses it by leave-one-out CV over :data:`hevisum.models.baselines.RIDGE_ALPHAS`.
    """

    def fit(self, X: Any, Y: Any, groups: np.ndarray | None = None) -> RidgeStacker:
        """Fit on all rows; with ``groups`` (slide ids) the penalty is chosen by leave-one-slide-out."""
        super().fit(X, Y, groups)
        return self


def fit_stacker(
    X_oof: np.ndarray,
    Y: np.ndarray,
    groups: np.ndarray | None = None,
    seed: int = 0,
    max_epochs: int = 200,
    kind: str = "mlp",
    batch_size: int = 64,
    lr: float = 1e-3,
    patience: int = 20,
    lr_patience: int = 10,
) -> FittedStacker | RidgeStacker:
    """Fit a stacker on out-of-fold predictions ``X_oof`` (N, n_models·T) against targets ``Y`` (N, T).

    ``kind='mlp'``: the reference recipe — :class:`StackingMLP`, MSE, Adam (lr 1e-3), ReduceLROnPlateau (×0.5,
    patience 10), early stopping (patience 20) keeping the best-validation weights, batch 64. Validation holds out
    one whole slide (chosen with ``seed``) when ``groups`` has at least two slides, else a random 20 % of rows.
    Inputs are standardised with statistics from the training rows (the reference fed raw ranks). Same seed →
    identical predictions on CPU; torch's global random state is left untouched.
    ``kind='ridge'``: :class:`RidgeStacker` with a cross-validated alpha.
    """
    if kind not in ("mlp", "ridge"):
        raise HevisumError(f"unknown stacker kind {kind!r}; valid: 'mlp', 'ridge'")
    x, y = _check_xy(X_oof, Y)
    if kind == "ridge":
        return RidgeStacker().fit(x, y, groups)
    for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size), ("patience", patience)):
        if not isinstance(value, int) or value < 1:
            raise HevisumError(f"{name} must be a positive integer, got {value!r}")
    if len(x) < 5:
        raise HevisumError(f"fit_stacker needs at least 5 rows to hold out a validation split, got {len(x)}")
    train, val, held = _validation_split(len(x), groups, seed)
    scaler = _Standardiser().fit(x[train])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = StackingMLP(x.shape[1], y.shape[1])
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        history = train_regressor(
            net, opt, scaler.transform(x[train]), y[train], scaler.transform(x[val]), y[val],
            max_epochs=max_epochs, batch_size=batch_size, patience=patience, seed=seed, lr_patience=lr_patience,
        )  # fmt: skip
    return FittedStacker(net, scaler, history, held)
