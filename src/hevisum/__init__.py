"""hevisum: predict spatial-transcriptomics spot profiles from H&E images."""

from hevisum.errors import HevisumError
from hevisum.slide import Slide

__all__ = ["HevisumError", "Slide", "__version__"]
__version__ = "0.1.0"
