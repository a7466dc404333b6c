"""hevisum: predict spatial-transcriptomics spot profiles from H&E images."""

from hevisum.errors import HevisumError

__all__ = ["HevisumError", "Slide", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `hevisum --help` should not pay for numpy and pandas.
    if name == "Slide":
        from hevisum.slide import Slide

        return Slide
    raise AttributeError(f"module 'hevisum' has no attribute {name!r}")
