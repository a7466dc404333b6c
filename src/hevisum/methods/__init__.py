"""Methods behind one interface, found by name in one registry.

Built in: the baselines ``mean`` and ``colour-ridge``; heads on frozen encoder features ``encoder-ridge``,
``encoder-probe``, ``encoder-mlp``; tile networks ``hevisum-cnn`` and ``effnet-finetune``; the ``stacking``
stacker. A new method is one module with a registered :class:`Method` subclass, imported below.
"""

from hevisum.methods.base import (
    ALIASES,
    FeatureSpec,
    FitContext,
    LoadedModel,
    Method,
    baseline_names,
    canonical_name,
    default_methods,
    get_method,
    load_model,
    method_names,
    register_method,
    stacker_name,
)
from hevisum.methods import heads, stacking, tiles  # noqa: E402,F401  (registration)

# Names of earlier releases: ridge on EfficientNet-Lite0 features (pooled, with colour statistics, or every stage
# pooled with colour statistics, the best of the three) is now encoder-ridge; the MLP head is encoder-mlp.
ALIASES.update({"effnet-ridge": "encoder-ridge", "effnet-colour-ridge": "encoder-ridge",
                "effnet-stages-ridge": "encoder-ridge", "effnet-mlp": "encoder-mlp"})

__all__ = ["ALIASES", "FeatureSpec", "FitContext", "LoadedModel", "Method", "baseline_names", "canonical_name", "default_methods",
           "get_method", "load_model", "method_names", "register_method", "stacker_name"]
