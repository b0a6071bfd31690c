"""`python -m lmtrain ...` is the same as the `lmtrain` console script."""

import sys

from lmtrain.cli import main

sys.exit(main())
