"""Tokenised corpus on disk, concat-and-chunk packing, and the grain train / eval iterators."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from lmtrain.config import DataConfig
from lmtrain.data import mqar
from lmtrain.data.sources import (
    DataError,
    cache_dir,
    cache_lock,
    iter_documents,
    source_fingerprint,
    val_fraction,
)
from lmtrain.data.tokenizers import Tokenizer

_FORMAT = 1  # bump when the on-disk layout changes, so old caches are rebuilt
_PIECE_CHARS = 1 << 20  # long documents are encoded in pieces so encode_batch stays parallel
_FLUSH_CHARS = 8 << 20  # text per encode_batch call: bounds memory for any corpus size
_SPLIT_NAMES = {"train": "training", "val": "validation"}


class TokenStream:
    """A 1-D token array (a read-only memmap for corpora) that knows its eod and pad ids."""

    def __init__(self, tokens: np.ndarray, eod_id: int, pad_id: int) -> None:
        self.tokens, self.eod_id, self.pad_id = tokens, eod_id, pad_id

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

    # Row-source interface (shared with synthetic sources such as lmtrain.data.mqar): row i of
    # length L is tokens[i L : i L + L + 1], packed with segment ids.

    def num_rows(self, seq_len: int) -> int:
        """Whole training rows of seq_len targets."""
        return (len(self.tokens) - 1) // seq_len

    def load_rows(self, rows: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
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
    train: TokenStream
    val: TokenStream | None  # None when val_fraction == 0
    # {"train": {docs, tokens, bytes, bytes_per_token}, "val": {...}, "bytes_per_token": all}
    # tokens include one eod per document; bytes are the UTF-8 bytes of the text.
    stats: dict[str, Any]


# ---------------------------------------------------------------------------- corpus on disk


def _log(msg: str) -> None:
    # Shown without any logging setup: building a cache can take a while and should say so.
    print(f"lmtrain.data: {msg}", file=sys.stderr, flush=True)


def _pieces(text: str) -> list[str]:
    """`text` cut after newlines into pieces of about _PIECE_CHARS (one piece if short)."""
    out, start = [], 0
    while len(text) - start > _PIECE_CHARS:
        cut = text.find("\n", start + _PIECE_CHARS) + 1 or len(text)
        out.append(text[start:cut])
        start = cut
    if start < len(text):
        out.append(text[start:])
    return out


def _write_split(
    cfg: DataConfig, tok: Tokenizer, split: str, path: Path, dtype: np.dtype
) -> dict[str, int]:
    """Tokenises `split` into `path` (each document followed by eod); returns its stats."""
    stats = {"docs": 0, "tokens": 0, "bytes": 0}
    texts: list[str] = []
    ends: list[bool] = []  # whether texts[i] is the last piece of its document

    def flush(f) -> None:
        parts = []
        for ids, end in zip(tok.encode_arrays(texts), ends, strict=True):
            parts.append(ids)
            if end:
                parts.append(np.array([tok.eod_id]))
        out = np.concatenate(parts).astype(dtype)
        out.tofile(f)
        stats["tokens"] += len(out)
        texts.clear()
        ends.clear()

    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pending = 0
            for _, text in iter_documents(cfg, split):
                if not text:
                    continue  # an empty document would only add a lone eod
                stats["docs"] += 1
                stats["bytes"] += len(text.encode("utf-8"))
                pieces = _pieces(text)
                texts.extend(pieces)
                ends.extend([False] * (len(pieces) - 1) + [True])
                pending += len(text)
                if pending >= _FLUSH_CHARS:
                    flush(f)
                    pending = 0
            if texts:
                flush(f)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind if tokenising failed
    return stats


def _has_text(cfg: DataConfig) -> bool:
    return any(text for split in ("train", "val") for _, text in iter_documents(cfg, split))


def _read_meta(meta_path: Path) -> dict[str, Any] | None:
    """The cache's metadata if the cache is complete, else None."""
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("format") != _FORMAT:
        return None
    itemsize = np.dtype(meta["dtype"]).itemsize
    for split, s in meta["splits"].items():
        f = meta_path.parent / f"{split}.bin"
        if not f.is_file() or f.stat().st_size != s["tokens"] * itemsize:
            return None
    return meta


def _build(cfg: DataConfig, tok: Tokenizer, where: Path, dtype: np.dtype) -> dict[str, Any]:
    splits: dict[str, dict[str, int]] = {}
    # Validation first: it is small, and an empty one should fail before hours of tokenising.
    for split in ("val", "train") if val_fraction(cfg.val_fraction) > 0 else ("train",):
        t0 = time.perf_counter()
        s = _write_split(cfg, tok, split, where / f"{split}.bin", dtype)
        if s["docs"] == 0 and not _has_text(cfg):
            raise DataError(f"data source {cfg.source!r} is an empty corpus (no text in it)")
        if s["docs"] == 0:
            fix = "raise data.val_fraction" if split == "val" else "lower data.val_fraction"
            raise DataError(
                f"the {_SPLIT_NAMES[split]} split of {cfg.source!r} is empty with "
                f"data.val_fraction={cfg.val_fraction}; {fix} or add documents"
            )
        secs = time.perf_counter() - t0
        _log(
            f"tokenised {split} split of {cfg.source} with {tok.name}: {s['docs']} docs, "
            f"{s['bytes'] / 1e6:.1f} MB -> {s['tokens']} tokens in {secs:.1f} s"
        )
        splits[split] = s
    meta = {"format": _FORMAT, "dtype": np.dtype(dtype).name, "splits": splits}
    tmp = where / f"meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, where / "meta.json")
    return meta


def load_corpus(cfg: DataConfig, tok: Tokenizer) -> Corpus:
    """The corpus as token streams, tokenised once and cached on disk; later calls only map it."""
    if cfg.source == mqar.SOURCE:
        train, val, stats = mqar.corpus_splits(cfg)
        return Corpus(train=train, val=val, stats=stats)
    frac = val_fraction(cfg.val_fraction)
    key = f"{source_fingerprint(cfg)}-{tok.name}-val{frac.numerator}_{frac.denominator}"
    where = cache_dir(cfg) / "corpora" / key
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)
    with cache_lock(where / "meta.json"):
        meta = _read_meta(where / "meta.json") or _build(cfg, tok, where, dtype)
    streams = {
        split: TokenStream(
            np.memmap(where / f"{split}.bin", dtype=meta["dtype"], mode="r"), tok.eod_id, tok.pad_id
        )
        for split in meta["splits"]
    }
    stats: dict[str, Any] = {
        split: {**s, "bytes_per_token": s["bytes"] / s["tokens"]}
        for split, s in meta["splits"].items()
    }
    total = [sum(s[k] for s in meta["splits"].values()) for k in ("bytes", "tokens")]
    stats["bytes_per_token"] = total[0] / total[1]
    return Corpus(train=streams["train"], val=streams.get("val"), stats=stats)


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


def _source(stream: Any, eod_id: int | None, pad_id: int | None) -> Any:
    """A row source: `stream` itself (a TokenStream or synthetic split), or a TokenStream over
    a plain token array (then eod_id is required)."""
    if hasattr(stream, "load_rows") and eod_id is None and pad_id is None:
        return stream
    eod = getattr(stream, "eod_id", None) if eod_id is None else eod_id
    pad = getattr(stream, "pad_id", eod) if pad_id is None else pad_id
    if eod is None:
        raise ValueError("pass eod_id= when the stream is a plain array")
    tokens = stream.tokens if isinstance(stream, TokenStream) else np.asarray(stream)
    return TokenStream(tokens, int(eod), int(pad))


def _local_batch(global_batch: int, process_index: int, process_count: int) -> int:
    if global_batch % process_count:
        raise DataError(f"batch size {global_batch} is not divisible by {process_count} processes")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
    return global_batch // process_count


def train_iterator(
    stream: TokenStream | np.ndarray,
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
    stream: TokenStream | np.ndarray | None,
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
