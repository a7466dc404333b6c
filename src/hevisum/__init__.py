"""hevisum: predict spatial-transcriptomics spot profiles from H&E images.

The Python API (see :mod:`hevisum.api`)::

    hevisum.read(path, **opts) -> list[Slide]
    hevisum.run(data, out, config=None, **opts) -> RunResult
    hevisum.predict(run_dir, data) -> AnnData
    hevisum.evaluate(pred, truth) -> dict

Everything is imported on first use: ``import hevisum`` loads neither torch nor numpy.
"""

import sys as _sys
import types as _types

from hevisum.errors import HevisumError

__all__ = ["HevisumError", "Slide", "__version__", "evaluate", "predict", "read", "run"]
__version__ = "0.1.0"

_API = ("read", "run", "evaluate")


def __getattr__(name: str):
    # Lazy: `hevisum --help` should not pay for numpy and pandas, `import hevisum` not for torch.
    if name == "Slide":
        from hevisum.slide import Slide

        return Slide
    if name in _API:
        from hevisum import api

        return getattr(api, name)
    raise AttributeError(f"module 'hevisum' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(_types.ModuleType):
    """``hevisum.predict`` is the API function, although a submodule ``hevisum/predict.py`` exists too: importing
    a submodule sets it as an attribute of its package, which would replace the function. This property keeps
    the function visible and the submodule importable (``from hevisum.predict import predict_from_run``)."""

    @property
    def predict(self):
        from hevisum.api import predict

        return predict

    @predict.setter
    def predict(self, module) -> None:  # the import system sets the submodule here: keep it aside
        self.__dict__["_predict_module"] = module


_sys.modules[__name__].__class__ = _Package
