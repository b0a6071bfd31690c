"""Token streams over corpora on disk (prepare.py), concat-and-chunk packing, grain iterators,
and `make_train_data`, the one entry point that builds training batches for either packing."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np

from lmtrain.config import Config, DataConfig
from lmtrain.data import prepare, tasks
from lmtrain.data.contract import Batch, RowSource
from lmtrain.data.decompose import DecomposedData
from lmtrain.data.decompose_mixture import DecomposedMixture
from lmtrain.data.mixture import Mixture, MixtureIterator
from lmtrain.data.sources import (
    cache_dir,
    cache_lock,
    prepared_meta,
    source_fingerprint,
    val_fraction,
)
from lmtrain.data.tokenizers import Tokenizer, check_component_sources, component_config
from lmtrain.errors import DataError


class TokenStream(RowSource):
    """A 1-D token array (a read-only memmap for corpora) that knows its eod and pad ids; row i
    of length L is tokens[i L : i L + L + 1], packed with segment ids (every position scored)."""

    def __init__(
        self, tokens: np.ndarray, eod_id: int, pad_id: int, doc_ends: np.ndarray | None = None
    ) -> None:
        self.tokens, self.eod_id, self.pad_id = tokens, eod_id, pad_id
        self._doc_ends = doc_ends

    def document_ends(self) -> np.ndarray:
        """int64 exclusive end of each document (after its eod): doc i = tokens[e[i-1]:e[i]]."""
        if self._doc_ends is None:
            # Without an index (hand-made streams), scan for eods once; a tail without one is
            # a document too.
            ends = np.flatnonzero(np.asarray(self.tokens) == self.eod_id) + 1
            if len(self.tokens) and (len(ends) == 0 or ends[-1] != len(self.tokens)):
                ends = np.append(ends, len(self.tokens))
            self._doc_ends = ends.astype(np.int64)
        return self._doc_ends

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index):
        return self.tokens[index]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.tokens, dtype=dtype)

    @property
    def dtype(self) -> np.dtype:
        return self.tokens.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.tokens.shape

    def num_rows(self, seq_len: int) -> int:
        """Whole training rows of seq_len targets."""
        return (len(self.tokens) - 1) // seq_len

    def load_rows(self, rows: Sequence[int], seq_len: int) -> Batch:
        """Packed training batch of `rows`."""
        return pack_rows(_read_rows(self.tokens, rows, seq_len), self.eod_id)

    def num_eval_rows(self, seq_len: int) -> int:
        """Rows covering every target once (the last may be short)."""
        return math.ceil((len(self.tokens) - 1) / seq_len) if len(self.tokens) > 1 else 0

    def load_eval_rows(
        self, rows: Sequence[int], seq_len: int, token_bytes: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Eval batch of `rows` with target_bytes; rows past the end are padding."""
        n_rows = self.num_eval_rows(seq_len)
        nbytes = np.asarray(token_bytes, dtype=np.float32)
        return _eval_batch(self.tokens, nbytes, rows, n_rows, seq_len, self.eod_id, self.pad_id)


@dataclasses.dataclass(frozen=True)
class Corpus:
    # a TokenStream for text corpora, a task's split for synthetic tasks, a Mixture (mixture.py)
    train: Any
    # None when val_fraction == 0; for a mixture {name: each component's validation split}
    val: RowSource | dict[str, RowSource] | None
    # {"train": {docs, tokens, bytes, bytes_per_token}, "val": {...}, "bytes_per_token": all}
    # tokens include one eod per document; bytes are the UTF-8 bytes of the text.
    stats: dict[str, Any]


# ---------------------------------------------------------------------------- corpus


def load_corpus(cfg: DataConfig, tok: Tokenizer) -> Corpus:
    """The corpus as token streams, tokenised once and cached on disk; later calls only map it.

    A directory written by `lmtrain prepare` is mapped where it is, never tokenised again.
    """
    if cfg.mixture:
        return _load_mixture(cfg, tok)
    task = tasks.task(cfg.source)
    if task is not None:
        train, val, stats = task.corpus_splits(cfg)
        return Corpus(train=train, val=val, stats=stats)
    if prepared_meta(cfg.source) is not None:
        where, meta = prepare.open_prepared(cfg, tok)
    else:
        frac = val_fraction(cfg.val_fraction)
        key = f"{source_fingerprint(cfg)}-{tok.name}-val{frac.numerator}_{frac.denominator}"
        where = cache_dir(cfg) / "corpora" / key
        with cache_lock(where / "meta.json"):
            meta = prepare.read_meta(where) or prepare.build(cfg, tok, where)
    streams = {}
    for split in meta["splits"]:
        tokens, ends = prepare.open_split(where, meta, split)
        streams[split] = TokenStream(tokens, tok.eod_id, tok.pad_id, doc_ends=ends)
    stats: dict[str, Any] = {
        split: {**s, "bytes_per_token": s["bytes"] / s["tokens"]}
        for split, s in meta["splits"].items()
    }
    total = [sum(s[k] for s in meta["splits"].values()) for k in ("bytes", "tokens")]
    stats["bytes_per_token"] = total[0] / total[1]
    return Corpus(train=streams["train"], val=streams.get("val"), stats=stats)


def _load_mixture(cfg: DataConfig, tok: Tokenizer) -> Corpus:
    """Every component as its own corpus (prepared and cached as a single source is); the
    training side is a Mixture, the validation side each component's split by name."""
    check_component_sources(cfg)
    parts: dict[str, Corpus] = {}
    for name in cfg.components():
        try:
            parts[name] = load_corpus(component_config(cfg, name), tok)
        except DataError as e:
            raise DataError(f"data.mixture.{name}: {e}") from None
    train = Mixture(
        {n: c.train for n, c in parts.items()},
        cfg.components(),
        cfg.mixture_weighting,
        cfg.mixture_exhausted,
    )
    vals = {n: c.val for n, c in parts.items() if c.val is not None}
    stats: dict[str, Any] = {"components": {n: c.stats for n, c in parts.items()}}
    for split in ("train", "val"):
        got = [c.stats[split] for c in parts.values() if split in c.stats]
        if got:
            stats[split] = {k: sum(g[k] for g in got) for k in ("docs", "tokens", "bytes")}
            stats[split]["bytes_per_token"] = stats[split]["bytes"] / stats[split]["tokens"]
    total = [
        sum(s[k] for s in (stats.get("train", {}), stats.get("val", {})) if s)
        for k in ("bytes", "tokens")
    ]
    stats["bytes_per_token"] = total[0] / total[1]
    return Corpus(train=train, val=vals or None, stats=stats)


# ---------------------------------------------------------------------------- packing


def pack_rows(rows: np.ndarray, eod_id: int) -> dict[str, np.ndarray]:
    """Model inputs for rows of L+1 tokens: inputs, targets, segment_ids, positions, weights."""
    rows = np.asarray(rows, dtype=np.int32)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    is_eod = inputs == eod_id
    # The eod that ends a document belongs to it; the next token opens the next segment.
    eods_before = np.cumsum(is_eod, axis=1, dtype=np.int32) - is_eod
    starts = np.ones_like(is_eod)
    starts[:, 1:] = is_eod[:, :-1]
    t = np.arange(inputs.shape[1], dtype=np.int32)
    segment_start = np.maximum.accumulate(np.where(starts, t, 0), axis=1)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": 1 + eods_before,
        "positions": t - segment_start,
        # A document's first token is not predictable from the previous document's eod.
        "weights": (~is_eod).astype(np.float32),
    }


def _read_rows(tokens: np.ndarray, rows: Sequence[int], seq_len: int) -> np.ndarray:
    """Rows `rows` of the stream (row i = tokens[i*L : i*L + L + 1]) as [len(rows), L+1]."""
    return np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in rows])


def _source(stream: RowSource | np.ndarray, eod_id: int | None, pad_id: int | None) -> RowSource:
    """A row source: `stream` itself, or a TokenStream over `stream`'s tokens with the eod and
    pad ids given (required for a plain token array)."""
    if isinstance(stream, RowSource) and eod_id is None and pad_id is None:
        return stream
    if isinstance(stream, TokenStream):
        eod = stream.eod_id if eod_id is None else eod_id
        pad = stream.pad_id if pad_id is None else pad_id
        ends = stream._doc_ends if eod == stream.eod_id else None  # the index holds for this eod
        return TokenStream(stream.tokens, int(eod), int(pad), doc_ends=ends)
    if isinstance(stream, RowSource):
        raise ValueError("eod_id / pad_id can only be changed on a TokenStream")
    if eod_id is None:
        raise ValueError("pass eod_id= when the stream is a plain array")
    return TokenStream(np.asarray(stream), int(eod_id), int(eod_id if pad_id is None else pad_id))


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch % process_count:
        raise DataError(f"batch size {global_batch} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return global_batch // process_count


def train_iterator(
    stream: RowSource | np.ndarray,
    *,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    prefetch: int = 2,
    eod_id: int | None = None,
) -> grain.DatasetIterator:
    """Endless shuffled batches of this process's rows; checkpointable with get/set_state."""
    src = _source(stream, eod_id, None)
    b = _local_batch(global_batch, process_index, process_count)
    n_rows = src.num_rows(seq_len)
    if n_rows < 1:
        raise DataError(
            f"the training split has {len(src)} tokens, too few for one row of seq_len "
            f"{seq_len}; lower data.seq_len or add data"
        )
    # The global row order depends only on the seed, so batch k is the same global batch for
    # any process count; repeat() reseeds the shuffle each epoch.
    order = grain.MapDataset.range(n_rows).shuffle(seed=seed).repeat(None)
    first = process_index * b

    def load(k: int) -> dict[str, np.ndarray]:
        start = k * global_batch + first
        rows = [order[i] for i in range(start, start + b)]  # only this process's rows are read
        return src.load_rows(rows, seq_len)

    batches = grain.MapDataset.range(len(order) // global_batch).map(load)
    # Threads keep the state exact: it is just the index of the next batch to return.
    read = grain.ReadOptions(num_threads=min(max(prefetch, 0), 8), prefetch_buffer_size=prefetch)
    return iter(batches.to_iter_dataset(read))


def eval_batches(
    stream: RowSource | np.ndarray | None,
    token_bytes: np.ndarray,
    *,
    seq_len: int,
    global_batch: int,
    max_batches: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    eod_id: int | None = None,
    pad_id: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every validation target exactly once, in order; or `max_batches` global batches of rows
    spread evenly over the split (a sample of every part of it, not just its first documents).

    Rows are the train rows plus, if tokens remain, one final short row padded to length; padded
    positions and padding rows have weights 0, segment_ids 0 and inputs/targets = pad_id.
    """
    if stream is None:
        return iter(())
    src = _source(stream, eod_id, pad_id)
    b = _local_batch(global_batch, process_index, process_count)
    n_rows = src.num_eval_rows(seq_len)
    n_batches = math.ceil(n_rows / global_batch)
    row_ids = np.arange(n_batches * global_batch)  # ids >= n_rows become padding rows
    if 0 < max_batches < n_batches:
        n_batches = max_batches
        row_ids = np.linspace(0, n_rows - 1, n_batches * global_batch).round().astype(np.int64)

    def batch(k: int) -> dict[str, np.ndarray]:
        start = k * global_batch + process_index * b
        rows = row_ids[start : start + b].tolist()
        return src.load_eval_rows(rows, seq_len, token_bytes)

    return map(batch, range(n_batches))


def _eval_batch(
    tokens: np.ndarray,
    token_bytes: np.ndarray,
    rows_wanted: Sequence[int],
    n_rows: int,
    seq_len: int,
    eod: int,
    pad: int,
) -> dict[str, np.ndarray]:
    """One eval batch: rows past the end of the stream or of `n_rows` are padding."""
    rows = np.full((len(rows_wanted), seq_len + 1), pad, dtype=np.int32)
    valid = np.zeros((len(rows_wanted), seq_len), dtype=bool)  # position t has a real target
    for j, r in enumerate(rows_wanted):
        chunk = tokens[r * seq_len : r * seq_len + seq_len + 1] if r < n_rows else tokens[:0]
        rows[j, : len(chunk)] = chunk
        valid[j, : max(len(chunk) - 1, 0)] = True
    batch = pack_rows(rows, eod)
    for name in ("inputs", "targets", "segment_ids", "positions"):
        batch[name] = np.where(valid, batch[name], pad if name in ("inputs", "targets") else 0)
    batch["weights"] *= valid
    batch["target_bytes"] = token_bytes[batch["targets"]] * batch["weights"]
    return batch


@dataclasses.dataclass
class TrainData:
    """Training batches of either packing: an endless, checkpointable iterator (get_state /
    set_state), every (global batch, seq_len) shape it yields, the decomposition report ({} for
    concat-and-chunk), and `seen(step)`: the data counts a metrics row carries after `step`
    steps (epochs, or a mixture's tokens/NAME and epochs/NAME; None under decomposition)."""

    iterator: Any
    shapes: list[tuple[int, int]]
    report: dict[str, Any]
    seen: Callable[[int], dict[str, float]] | None = None


def make_train_data(
    cfg: Config, source: RowSource, process_index: int = 0, process_count: int = 1
) -> TrainData:
    """The training data of `source` in cfg.data.packing mode, this process's rows only."""
    if cfg.data.packing == "decompose":
        if not isinstance(source, (TokenStream, Mixture)):
            raise DataError("data.packing='decompose' needs a text corpus")
        kind = DecomposedMixture if isinstance(source, Mixture) else DecomposedData
        dd = kind(
            source, cfg, seed=cfg.train.seed, process_index=process_index,
            process_count=process_count,
        )  # fmt: skip
        s = dd.schedule
        shapes = [(s.batch[k], 1 << k) for k in s.ks if s.batches[k] > 0]
        seen = dd.seen if isinstance(dd, DecomposedMixture) else None
        return TrainData(dd.iterator(cfg.data.prefetch), shapes, dd.report(), seen)
    shapes = cfg.train_shapes()
    if isinstance(source, Mixture):
        b = _local_batch(shapes[0][0], process_index, process_count)
        it = MixtureIterator(
            source, seq_len=cfg.data.seq_len, global_batch=shapes[0][0], seed=cfg.train.seed,
            first_row=process_index * b, local_batch=b, prefetch=cfg.data.prefetch,
        )  # fmt: skip
        return TrainData(it, shapes, {}, it.seen)
    it = train_iterator(
        source,
        seq_len=cfg.data.seq_len,
        global_batch=shapes[0][0],
        seed=cfg.train.seed,
        process_index=process_index,
        process_count=process_count,
        prefetch=cfg.data.prefetch,
    )
    rows, batch = source.num_rows(cfg.data.seq_len), shapes[0][0]
    return TrainData(it, shapes, {}, lambda step: {"epochs": step * batch / rows})
