"""The stacker: a ridge (or the reference's StackingMLP) over other methods' out-of-fold per-spot ranks."""

from __future__ import annotations

import numpy as np

from hevisum.methods.base import FitContext, Method, register_method


@register_method
class Stacking(Method):
    """Fitted on out-of-fold predictions only; its inputs are each stacked method's per-spot ranks, side by
    side, in the order of ``params["methods"]``."""

    name = "stacking"
    summary = "ridge (or StackingMLP) over the other methods' out-of-fold per-spot ranks"
    stacker = True

    def fit(self, X, Y, *, rows, groups, ctx: FitContext) -> "Stacking":
        from hevisum.models.stacking import fit_stacker

        kind = self.cfg.stacking.model
        self._st = fit_stacker(X, Y, groups=groups, seed=ctx.seed, kind=kind)
        methods = self.params.get("methods", [])
        self.params = {"methods": methods, "kind": kind, **(self._st.params() if kind == "mlp" else {})}
        self.tensors = self._st.state()
        return self

    def restore(self) -> None:
        from hevisum.models.baselines import RidgeHead
        from hevisum.models.stacking import load_stacker_state

        if self.params.get("kind", "ridge") == "ridge":
            self._st = RidgeHead.from_state(self.tensors)
        else:
            self._st = load_stacker_state({k: v for k, v in self.params.items() if k not in ("methods", "kind")},
                                          self.tensors)

    def predict(self, X, *, rows, ctx) -> np.ndarray:
        return np.asarray(self._st.predict(X), dtype=np.float32)
