"""Scaling-law sweeps: plan a grid of runs, run them, fit laws to the results.

    planning.py    grids (isoflop_grid, size_token_grid), parameter counts, run names
    throughput.py  measured tokens/s, equal_time_grid, the --dry-run table
    workdirs.py    the files of a run directory; a run's environment
    runner.py      K runs at a time on this host, skip/resume, results tables, SLURM arrays
    fit.py         Chinchilla / IsoFLOP / Step Law fits (numerics only)
    report.py      `lmtrain fit`: fit.json, fit.md; plots.py: its PNGs

Imports flow one way (planning <- throughput <- runner; fit <- plots <- report); experiment files
use the grid helpers re-exported here.
"""

from lmtrain.sweeps.planning import (
    isoflop_grid,
    load_sweep,
    param_counts,
    plan,
    size_token_grid,
    with_tokens,
)
from lmtrain.sweeps.throughput import equal_time_grid

__all__ = [
    "equal_time_grid",
    "isoflop_grid",
    "load_sweep",
    "param_counts",
    "plan",
    "size_token_grid",
    "with_tokens",
]
