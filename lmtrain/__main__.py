"""`python -m lmtrain ...` is the same as the `lmtrain` console script."""

import sys

from lmtrain.cli import main

if __name__ == "__main__":  # not when a spawned worker (lmtrain prepare --workers) imports it
    sys.exit(main())
