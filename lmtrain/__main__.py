"""`python -m lmtrain ...` is the same as the `lmtrain` console script."""

from lmtrain.cli import entry

if __name__ == "__main__":  # not when a spawned worker (lmtrain prepare --workers) imports it
    entry()
