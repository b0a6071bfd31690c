"""Tokenising a corpus in units, in parallel, resumably, with output independent of the workers.

The corpus's documents, in their fixed order (files sorted by key, records in file order), are
cut into units of consecutive documents: a group of files of about UNIT_BYTES, a file on its
own if it is larger, or a range of rows of an HF dataset. A unit is tokenised by one worker
process into WHERE/.shards/<i>.{train,val}.{bin,idx} and marked done by <i>.done.json, written
last. When every unit is done, the units are concatenated in order into {split}.bin and
{split}.idx (document ends shifted by the tokens before), which is byte for byte what one
process reading the documents in order would write, for any number of workers.

A killed run keeps its finished units: the next run with the same plan (source fingerprint,
tokenizer, split, units) tokenises only the others. Each worker streams its unit (text is
encoded in batches of about 8 MB), so memory stays flat whatever the corpus size.

A unit's documents go to the validation split by the same key hash as everywhere else
(sources.in_validation), so one pass over the corpus writes both splits.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmtrain.data import formats, hf_source
from lmtrain.data.sources import (
    STDLIB,
    STDLIB_PROSE,
    _has_one_document,
    _read_text,
    in_validation,
    iter_documents,
    prose_documents,
    resolve_files,
    source_bytes,
    stdlib_files,
    val_fraction,
)

if TYPE_CHECKING:  # lmtrain.config imports the models (jax); spawned workers need not
    from lmtrain.config import DataConfig

# Input bytes per unit (files are never split); LMTRAIN_UNIT_BYTES overrides it (tests, tuning).
UNIT_BYTES = int(os.environ.get("LMTRAIN_UNIT_BYTES", 16 << 20))
PLAN_VERSION = 1
_FLUSH_CHARS = 8 << 20
_PIECE_CHARS = 1 << 20
_IDX = np.dtype("<i8")
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------- the plan


def plan(cfg: DataConfig) -> list[dict[str, Any]]:
    """The units of cfg.source, each {"kind", ..., "bytes"} (JSON-serialisable)."""
    if _has_one_document(cfg):  # its tail is the validation text: not split by key
        return [{"kind": "whole", "bytes": 0}]
    if cfg.source == STDLIB_PROSE:
        return [{"kind": "prose", "bytes": source_bytes(cfg)}]
    if hf_source.is_hf(cfg.source):
        rows = len(hf_source.load(cfg.source))
        total = max(hf_source.nbytes(cfg.source), 1)
        per = max(1, int(rows * UNIT_BYTES / total))
        return [
            {
                "kind": "hf",
                "rows": [a, min(a + per, rows)],
                "bytes": total * (min(a + per, rows) - a) // rows,
            }
            for a in range(0, rows, per)
        ]
    if cfg.source == STDLIB:
        root, rels = stdlib_files()
        files = [(str(root / rel), rel) for rel in rels]
    else:
        files = [(str(p), rel) for p, rel in resolve_files(cfg.source)]
    units, group, size = [], [], 0
    for path, rel in files:
        n = os.path.getsize(path)
        if group and size + n > UNIT_BYTES:
            units.append({"kind": "files", "files": group, "bytes": size})
            group, size = [], 0
        group.append([path, rel])
        size += n
    if group:
        units.append({"kind": "files", "files": group, "bytes": size})
    return units


def _unit_documents(cfg: DataConfig, unit: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(split, key, text) of a unit's documents, in order."""
    frac = val_fraction(cfg.val_fraction)

    def split_of(key: str) -> str:
        return "val" if frac > 0 and in_validation(key, frac) else "train"

    if unit["kind"] == "whole":
        for split in SPLITS:
            for key, text in iter_documents(cfg, split):
                yield split, key, text
        return
    if unit["kind"] == "prose":
        for key, text in prose_documents():
            yield split_of(key), key, text
        return
    if unit["kind"] == "hf":
        a, b = unit["rows"]
        ds = hf_source.load(cfg.source).select(range(a, b)).select_columns([cfg.text_key])
        for i, text in enumerate(ds[cfg.text_key], a + 1):
            key = f"hf:{i}"
            yield split_of(key), key, text
        return
    for path, rel in unit["files"]:
        if cfg.source == STDLIB:
            yield split_of(rel), rel, _read_text(Path(path))
            continue
        for key, text in formats.documents(Path(path), rel, cfg.text_key):
            yield split_of(key), key, text


# ---------------------------------------------------------------------------- one unit


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


class _SplitWriter:
    """Tokens of one split of one unit: each document followed by eod, ends in the .idx."""

    def __init__(self, base: Path, tok: Any, dtype: np.dtype):
        self.paths = [Path(f"{base}.bin.tmp"), Path(f"{base}.idx.tmp")]
        self.bin, self.idx = (open(p, "wb") for p in self.paths)
        self.tok, self.dtype, self.eod = tok, dtype, np.array([tok.eod_id])
        self.texts: list[str] = []
        self.last: list[bool] = []
        self.pending = 0
        self.stats = {"docs": 0, "tokens": 0, "bytes": 0}

    def add(self, text: str) -> None:
        pieces = _pieces(text)
        self.texts.extend(pieces)
        self.last.extend([False] * (len(pieces) - 1) + [True])
        self.stats["docs"] += 1
        self.stats["bytes"] += len(text.encode("utf-8"))
        self.pending += len(text)
        if self.pending >= _FLUSH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.texts:
            return
        arrays = self.tok.encode_arrays(self.texts)
        parts = [
            p
            for ids, end in zip(arrays, self.last, strict=True)
            for p in (ids, self.eod)[: 1 + end]
        ]
        out = np.concatenate(parts).astype(self.dtype)
        out.tofile(self.bin)
        lengths = np.array([len(a) for a in arrays], dtype=np.int64) + np.array(self.last)
        ends = self.stats["tokens"] + np.cumsum(lengths)[np.array(self.last)]
        ends.astype(_IDX).tofile(self.idx)
        self.stats["tokens"] += len(out)
        self.texts.clear()
        self.last.clear()
        self.pending = 0

    def close(self) -> None:
        self.flush()
        self.bin.close()
        self.idx.close()
        for p in self.paths:
            os.replace(p, Path(str(p).removesuffix(".tmp")))


def run_unit(cfg: DataConfig, tok: Any, dtype: np.dtype, shards: Path, i: int, unit: dict) -> dict:
    """Tokenises unit i into `shards`; returns (and marks done with) its per-split stats."""
    writers = {s: _SplitWriter(shards / f"{i}.{s}", tok, dtype) for s in SPLITS}
    for split, _, text in _unit_documents(cfg, unit):
        if text:  # an empty document would only add a lone eod
            writers[split].add(text)
    for w in writers.values():
        w.close()
    stats = {s: w.stats for s, w in writers.items()}
    tmp = shards / f"{i}.done.json.tmp"
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, shards / f"{i}.done.json")
    return stats


# ---------------------------------------------------------------------------- all units


def _worker_init() -> None:
    os.environ["RAYON_NUM_THREADS"] = (
        "1"  # one core per worker: tokenizers' pool would oversubscribe
    )


def _worker(args) -> tuple[int, int]:
    cfg, tok_file, dtype, shards, i, unit = args
    from lmtrain.data.tokenizers import ByteTokenizer, _load_file

    tok = ByteTokenizer() if tok_file is None else _load_file(Path(tok_file))
    run_unit(cfg, tok, np.dtype(dtype), Path(shards), i, unit)
    return i, unit["bytes"]


def tokenise(
    cfg: DataConfig,
    tok: Any,
    where: Path,
    dtype: np.dtype,
    *,
    workers: int = 1,
    key: dict[str, Any],
    advance: Callable[[int], Any] = lambda n: None,
) -> dict[str, dict[str, int]]:
    """Writes {split}.bin/.idx of cfg.source into `where` (see the module docstring); returns
    per-split stats. `key` identifies what is tokenised, for resuming."""
    units = plan(cfg)
    shards = where / ".shards"
    plan_doc = {"version": PLAN_VERSION, **key, "units": units}
    plan_path = shards / "plan.json"
    if not (plan_path.is_file() and json.loads(plan_path.read_text()) == plan_doc):
        shutil.rmtree(shards, ignore_errors=True)
        shards.mkdir(parents=True)
        plan_path.write_text(json.dumps(plan_doc))
    todo = [i for i in range(len(units)) if not (shards / f"{i}.done.json").is_file()]
    if len(todo) < len(units):
        print(
            f"lmtrain.data: resuming: {len(units) - len(todo)} of {len(units)} units were "
            "tokenised by an earlier run",
            file=sys.stderr,
            flush=True,
        )
    for i in set(range(len(units))) - set(todo):
        advance(units[i]["bytes"])
    if todo and (workers <= 1 or len(todo) == 1):
        for i in todo:
            run_unit(cfg, tok, dtype, shards, i, units[i])
            advance(units[i]["bytes"])
    elif todo:
        tok_file = None if tok.file is None else str(tok.file)
        # The fields a unit reads, in a plain namespace: unpickling a DataConfig would import
        # lmtrain.config and with it jax, seconds per worker.
        fields = ("source", "text_key", "val_fraction", "cache_dir", "tokenizer")
        light = types.SimpleNamespace(**{f: getattr(cfg, f) for f in fields})
        jobs = [(light, tok_file, dtype.name, str(shards), i, units[i]) for i in todo]
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_worker_init) as pool:
            for _, nbytes in pool.imap_unordered(_worker, jobs):
                advance(nbytes)
    return _concatenate(where, shards, len(units))


def _concatenate(where: Path, shards: Path, n: int) -> dict[str, dict[str, int]]:
    """The units' files joined in order into {split}.bin/.idx; the shards removed."""
    done = [json.loads((shards / f"{i}.done.json").read_text()) for i in range(n)]
    stats = {}
    for split in SPLITS:
        tokens = 0
        with (
            open(where / f"{split}.bin.tmp", "wb") as b,
            open(where / f"{split}.idx.tmp", "wb") as x,
        ):
            for i in range(n):
                with open(shards / f"{i}.{split}.bin", "rb") as f:
                    shutil.copyfileobj(f, b, 1 << 24)
                ends = np.fromfile(shards / f"{i}.{split}.idx", dtype=_IDX)
                (ends + tokens).astype(_IDX).tofile(x)
                tokens += done[i][split]["tokens"]
        for ext in ("bin", "idx"):
            os.replace(where / f"{split}.{ext}.tmp", where / f"{split}.{ext}")
        stats[split] = {k: sum(d[split][k] for d in done) for k in ("docs", "tokens", "bytes")}
    shutil.rmtree(shards)
    return stats
