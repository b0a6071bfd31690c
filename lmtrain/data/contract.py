"""The one contract every data source implements, and the batch it hands to the train step.

A batch is a dict of numpy arrays for B rows of L tokens:

    inputs, segment_ids, positions   int32 [B, L]  (segment 0 = padding; positions restart at
                                                     each document/example start)
    targets, weights                 [B, T]        T = L (every position scored), or
    target_index                     int32 [B, Q]  T = Q: only these positions are scored
                                                     (`targets_per_row` = Q > 0, e.g. MQAR)
    target_bytes                     float32 [B, T] eval batches only: UTF-8 bytes per target

Training code reads only what is declared here; nothing outside lmtrain.data asks a source what
it is.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import numpy as np

Batch = dict[str, np.ndarray]


class RowSource(abc.ABC):
    """A split of a corpus or task, read as rows of `seq_len` targets by row index."""

    eod_id: int  # end-of-document token id
    pad_id: int  # id placed in padding positions (weight 0)
    targets_per_row: int = 0  # scored positions per row; 0 = every position

    @abc.abstractmethod
    def num_rows(self, seq_len: int) -> int:
        """Whole training rows of seq_len targets."""

    @abc.abstractmethod
    def load_rows(self, rows: Sequence[int], seq_len: int) -> Batch:
        """The training batch of `rows`."""

    @abc.abstractmethod
    def num_eval_rows(self, seq_len: int) -> int:
        """Rows covering every evaluated target once."""

    @abc.abstractmethod
    def load_eval_rows(self, rows: Sequence[int], seq_len: int, token_bytes: np.ndarray) -> Batch:
        """The eval batch of `rows` (with target_bytes); ids past the end are padding rows."""
