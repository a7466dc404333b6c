"""Methods that fit a head on cached per-tile features: the baselines, ridge, a HEST-style probe, an MLP."""

from __future__ import annotations

import numpy as np

from hevisum.methods.base import FeatureSpec, FitContext, Method, context_specs, register_method


@register_method
class MeanMethod(Method):
    """The training mean profile for every spot: the floor any image model must beat."""

    name = "mean"
    summary = "training-mean profile (baseline)"
    baseline = True

    def fit(self, X, Y, *, rows, groups, ctx: FitContext) -> "MeanMethod":
        self.tensors = {"mean": Y.mean(axis=0).astype(np.float32)}
        return self

    def predict(self, X, *, rows, ctx) -> np.ndarray:
        return np.repeat(self.tensors["mean"][None, :], len(rows), axis=0).astype(np.float32)


class _RidgeMethod(Method):
    """Standardised features → multi-output ridge; the penalty is chosen by leave-one-slide-out inside the fold."""

    def fit(self, X, Y, *, rows, groups, ctx: FitContext) -> "_RidgeMethod":
        from hevisum.models.baselines import RidgeHead

        self._head = RidgeHead(alpha=self.cfg.models.ridge_alpha or None).fit(X, Y, groups)
        self.params, self.tensors = {"alpha": self._head.alpha_}, self._head.state()
        return self

    def restore(self) -> None:
        from hevisum.models.baselines import RidgeHead

        self._head = RidgeHead.from_state(self.tensors)

    def predict(self, X, *, rows, ctx) -> np.ndarray:
        return self._head.predict(X).astype(np.float32)


@register_method
class ColourRidge(_RidgeMethod):
    name = "colour-ridge"
    summary = "colour, haematoxylin/eosin and texture statistics + ridge (baseline)"
    baseline = True

    def features(self) -> list[FeatureSpec]:
        return [FeatureSpec("colour")]


@register_method
class EncoderRidge(_RidgeMethod):
    name = "encoder-ridge"
    summary = "frozen encoder features (+ colour statistics, + configured context) + ridge"
    profiles = ("fast",)

    def features(self) -> list[FeatureSpec]:
        return [FeatureSpec("encoder", view="stages"), FeatureSpec("colour"), *context_specs(self.cfg, "stages")]


@register_method
class EncoderProbe(Method):
    """The HEST-Benchmark probe: the encoder's embedding, PCA to 256 components, ridge."""

    name = "encoder-probe"
    summary = "frozen encoder features, PCA 256 + ridge (the HEST-Benchmark probe)"
    n_components = 256

    def features(self) -> list[FeatureSpec]:
        return [FeatureSpec("encoder"), *context_specs(self.cfg)]

    def fit(self, X, Y, *, rows, groups, ctx) -> "EncoderProbe":
        from hevisum.models.baselines import RidgeHead

        mean = X.mean(axis=0)
        _, sv, vt = np.linalg.svd(X - mean, full_matrices=False)
        # components with (numerically) no variance in the training rows would be scaled up by the head's
        # standardisation and blow up on new slides: keep those carrying variance, at most n_components
        keep = int(np.sum(sv > 1e-3 * sv[0])) if len(sv) and sv[0] > 0 else 1
        k = int(max(1, min(self.n_components, X.shape[0] - 2, X.shape[1], keep)))
        comps = vt[:k]
        self._head = RidgeHead(alpha=self.cfg.models.ridge_alpha or None).fit((X - mean) @ comps.T, Y, groups)
        self.params = {"alpha": self._head.alpha_, "n_components": k}
        self.tensors = {"pca_mean": mean.astype(np.float64), "pca_components": comps.astype(np.float64),
                        **{f"head.{n}": v for n, v in self._head.state().items()}}
        return self

    def restore(self) -> None:
        from hevisum.models.baselines import RidgeHead

        self._head = RidgeHead.from_state({n[5:]: v for n, v in self.tensors.items() if n.startswith("head.")})

    def predict(self, X, *, rows, ctx) -> np.ndarray:
        Z = (X - self.tensors["pca_mean"]) @ self.tensors["pca_components"].T
        return self._head.predict(Z).astype(np.float32)


@register_method
class EncoderMLP(Method):
    """Standardised encoder features → a one-hidden-layer MLP with early stopping."""

    name = "encoder-mlp"
    summary = "frozen encoder features + a small MLP"
    profiles = ("fast",)

    def features(self) -> list[FeatureSpec]:
        return [FeatureSpec("encoder"), *context_specs(self.cfg)]

    def fit(self, X, Y, *, rows, groups, ctx) -> "EncoderMLP":
        from hevisum.models.baselines import MLPHead

        self._head = MLPHead(seed=ctx.seed).fit(X, Y)
        self.params, self.tensors = self._head.params(), self._head.state()
        return self

    def restore(self) -> None:
        from hevisum.models.baselines import MLPHead

        self._head = MLPHead.from_state(self.params, self.tensors)

    def predict(self, X, *, rows, ctx) -> np.ndarray:
        return self._head.predict(X).astype(np.float32)
