"""Repeated data at fixed compute: the quickstart model trained on 1.1M tokens, drawn from
unique-token budgets seen 1, 2, 4, 8 and 16 times, beside fresh-data runs of 1/2 .. 1/16 the
tokens (for Muennighoff et al.'s data-constrained law). About 40 minutes on 2 CPU cores
(--parallel 2).

lmtrain sweep experiments/repetition.py --dir runs/repetition --parallel 2
python benchmarks/repetition.py runs/repetition    # the table, the fit and the plot
lmtrain sweep experiments/repetition.py:smoke --dir /tmp/repetition-smoke   # seconds

Every run reads the embedded stdlib corpus as a one-component mixture, so its metrics rows carry
tokens/stdlib and epochs/stdlib and the sweep's results.jsonl its `unique_tokens` and `epochs`.
A budget of U unique tokens is a fixed random subset of the training split's rows (the same for
every seed); the whole split is about 4.5M tokens, so the fresh runs never repeat a token.
"""

from __future__ import annotations

from pathlib import Path

from lmtrain.config import Config, MixtureComponent, load_experiment, override
from lmtrain.sweeps import with_tokens

VARIANTS = ("", "smoke")
SWEEPS = VARIANTS
EPOCHS = (1, 2, 4, 8, 16)  # passes over the unique budget at fixed compute
FRESH = (2, 4, 8, 16)  # fresh-data runs of 1/k the compute
EXTRA_SEEDS = (1,)  # the 1-epoch run again: run-to-run noise


def _base(arg: str) -> Config:
    """The quickstart's model and recipe (its smoke variant for "smoke")."""
    return load_experiment(f"{Path(__file__).with_name('quickstart.py')}:{arg}")


def get_config(arg: str = "") -> Config:
    """The 1-epoch run (`arg` "smoke": the quickstart's smoke model)."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown repetition variant {arg!r}; choose from {VARIANTS}")
    return get_sweep(arg)[0]


def _run(base: Config, tokens: int, unique: int, seed: int = 0) -> Config:
    cfg = override(base, {"train.seed": seed})
    comp = MixtureComponent(source="stdlib", weight=1.0, unique_tokens=unique)
    cfg = override(cfg, {"data.mixture": {"stdlib": comp}})
    return with_tokens(cfg, tokens, evals=1, checkpoints=1)


def get_sweep(arg: str = "") -> list[Config]:
    """Fixed compute D at U = D/e for e in EPOCHS; fresh runs at D/k (all of the corpus)."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown repetition variant {arg!r}; choose from {VARIANTS}")
    base = _base(arg)
    d = base.train_tokens()  # 1.1M tokens (smoke: 5,120)
    runs = [_run(base, d, d // e) for e in EPOCHS]
    runs += [_run(base, d, d // e, seed) for e in (1,) for seed in EXTRA_SEEDS]
    runs += [_run(base, d // k, 0) for k in FRESH]
    return runs
