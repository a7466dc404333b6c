"""``python -m hevisum``: the command line (also what ``torchrun -m hevisum run ...`` starts on every rank)."""

import sys

from hevisum.cli import main

if __name__ == "__main__":
    sys.exit(main())
