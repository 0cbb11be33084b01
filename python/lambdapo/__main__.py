"""``python -m lambdapo``: the ``lambdapo`` command line (also under ``torchrun -m``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
