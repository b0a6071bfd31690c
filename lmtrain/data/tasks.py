"""Synthetic tasks: data sources generated from their own config section, not read from files.

A task module (e.g. lmtrain/data/mqar.py) provides `SOURCE` (its data.source name),
`check_config(cfg)`, `make_tokenizer(data_cfg)` and `corpus_splits(data_cfg) -> (train, val,
stats)`, whose splits are `RowSource`s. Adding a task = adding a module and one line here.
"""

from __future__ import annotations

from types import ModuleType

from lmtrain.config import Config, DataConfig
from lmtrain.data import mqar, tokenizers
from lmtrain.data.tokenizers import Tokenizer

TASKS: dict[str, ModuleType] = {mqar.SOURCE: mqar}


def task(source: str) -> ModuleType | None:
    """The task module called `source`, or None for a text corpus."""
    return TASKS.get(source)


def make_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The task's own tokenizer, or the text tokenizer that data.tokenizer names."""
    t = task(cfg.source)
    return t.make_tokenizer(cfg) if t else tokenizers.make_tokenizer(cfg)


def check_config(cfg: Config) -> None:
    """Source-specific checks of a whole config (DataError naming the key)."""
    t = task(cfg.data.source)
    if t:
        t.check_config(cfg)


def targets_per_row(cfg: DataConfig) -> int:
    """Scored positions per row of the source (RowSource.targets_per_row) without loading it:
    0 for text (every position), the task's own count otherwise."""
    t = task(cfg.source)
    return t.targets_per_row(cfg) if t else 0
