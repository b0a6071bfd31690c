"""Data: sources behind one contract (contract.py), tokenizers, tokenised corpora on disk
(`lmtrain prepare`), grain iterators for concat-and-chunk and dataset decomposition, and
synthetic tasks (tasks.py).

The names below load their module on first use, so a process that only reads corpus files
(a `lmtrain prepare --workers` worker) does not import grain and jax.
"""

import importlib

from lmtrain.errors import DataError

_WHERE = {
    "Batch": "contract",
    "RowSource": "contract",
    "Corpus": "pipeline",
    "TokenStream": "pipeline",
    "TrainData": "pipeline",
    "eval_batches": "pipeline",
    "load_corpus": "pipeline",
    "make_train_data": "pipeline",
    "pack_rows": "pipeline",
    "train_iterator": "pipeline",
    "iter_documents": "sources",
    "prepared_meta": "sources",
    "source_fingerprint": "sources",
    "check_config": "tasks",
    "make_tokenizer": "tasks",
    "targets_per_row": "tasks",
    "Tokenizer": "tokenizers",
}

__all__ = ["DataError", *_WHERE]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"lmtrain.data.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lmtrain.data' has no attribute {name!r}")
