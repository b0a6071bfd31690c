"""Data: sources behind one contract (contract.py), tokenizers, tokenised corpora on disk
(`lmtrain prepare`), grain iterators for concat-and-chunk and dataset decomposition, and
synthetic tasks (tasks.py)."""

from lmtrain.data.contract import Batch, RowSource
from lmtrain.data.pipeline import (
    Corpus,
    TokenStream,
    TrainData,
    eval_batches,
    load_corpus,
    make_train_data,
    pack_rows,
    train_iterator,
)
from lmtrain.data.sources import iter_documents, prepared_meta, source_fingerprint
from lmtrain.data.tasks import check_config, make_tokenizer, targets_per_row
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.errors import DataError

__all__ = [
    "Batch",
    "Corpus",
    "DataError",
    "RowSource",
    "TokenStream",
    "Tokenizer",
    "TrainData",
    "check_config",
    "eval_batches",
    "iter_documents",
    "load_corpus",
    "make_tokenizer",
    "make_train_data",
    "pack_rows",
    "prepared_meta",
    "source_fingerprint",
    "targets_per_row",
    "train_iterator",
]
