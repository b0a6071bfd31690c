"""Data: sources, tokenizers, tokenised corpora on disk (`lmtrain prepare`), grain iterators."""

from lmtrain.data.pipeline import (
    Corpus,
    TokenStream,
    eval_batches,
    load_corpus,
    pack_rows,
    train_iterator,
)
from lmtrain.data.sources import DataError, iter_documents, source_fingerprint
from lmtrain.data.tokenizers import Tokenizer, make_tokenizer

__all__ = [
    "Corpus",
    "DataError",
    "TokenStream",
    "Tokenizer",
    "eval_batches",
    "iter_documents",
    "load_corpus",
    "make_tokenizer",
    "pack_rows",
    "source_fingerprint",
    "train_iterator",
]
