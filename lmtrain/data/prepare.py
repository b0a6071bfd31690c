"""Tokenised corpora on disk: the writer, the reader, and `lmtrain prepare`.

A corpus directory (the cache's `corpora/<key>/`, or the DIR of `lmtrain prepare SOURCE --out DIR`):
  {split}.bin    tokens of the split ("train", "val"), each document followed by eod;
                 uint16, or uint32 when the vocabulary has more than 65535 ids
  {split}.idx    little-endian int64 exclusive end offset of each document in {split}.bin
  meta.json      format, dtype, per-split docs/tokens/bytes; written last, so it marks completeness
  tokenizer.json (or tokenizer.model; prepared dirs only, none for "bytes") the tokenizer used

Why not ArrayRecord: a flat token file + int64 document-end index (as in Megatron's indexed
datasets and nanoGPT) is random access at token granularity by np.memmap, zero-copy through the
page cache: a 2^k-token slice of a document, or a concat-and-chunk row spanning documents, is one
slice. ArrayRecord is record-granular: a record per document means reading and decoding the whole
document to cut a chunk, and a row spanning documents reads several records. grain reads both
through its random-access MapDataset interface.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lmtrain.config import DataConfig
from lmtrain.data import shards, tasks
from lmtrain.data.sources import (
    EMBEDDED,
    DataError,
    cache_lock,
    prepared_meta,
    source_bytes,
    source_fingerprint,
    val_fraction,
)
from lmtrain.data.tokenizers import (
    SentencePieceTokenizer,
    Tokenizer,
    check_prepared_tokenizer,
    make_tokenizer,
    normal_tokenizer_spec,
)

_FORMAT = 2  # bump when the on-disk layout changes, so old caches are rebuilt (2: {split}.idx)
_SPLIT_NAMES = {"train": "training", "val": "validation"}
_IDX_DTYPE = np.dtype("<i8")
_SPLIT_FILES = {f"{s}.{ext}" for s in _SPLIT_NAMES for ext in ("bin", "idx")}
# Every name a prepare writes; an --out holding anything else is not ours to overwrite.
_OURS = {
    "meta.json",
    ".meta.json.lock",
    ".shards",
    "tokenizer.json",
    "tokenizer.model",
    *_SPLIT_FILES,
}
_TMP = re.compile(r"\.tmp\d+$")


def _log(msg: str) -> None:
    """One line on stderr, shown without any logging setup (and above a progress bar)."""
    tqdm.write(f"lmtrain.data: {msg}", file=sys.stderr)


def _token_dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tok.vocab_size <= 65535 else np.uint32)


# ---------------------------------------------------------------------------- writer


def _tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    _tmp(path).write_text(json.dumps(obj, indent=1))
    os.replace(_tmp(path), path)


def build(
    cfg: DataConfig,
    tok: Tokenizer,
    where: Path,
    *,
    extra: dict[str, Any] | None = None,
    knob: str = "data.val_fraction",
    advance: Callable[[int], Any] = lambda n: None,
    workers: int = 1,
) -> dict[str, Any]:
    """Tokenises cfg.source into `where`, meta.json (with `extra`) last; returns the meta."""
    (where / "meta.json").unlink(missing_ok=True)  # the old meta must not vouch for new files
    dtype = _token_dtype(tok)
    t0 = time.perf_counter()
    key = {
        "source_fingerprint": source_fingerprint(cfg),
        "tokenizer": tok.name,
        "val_fraction": str(val_fraction(cfg.val_fraction)),
        "text_key": cfg.text_key,
        "dtype": dtype.name,
    }
    got = shards.tokenise(cfg, tok, where, dtype, workers=workers, key=key, advance=advance)
    with_val = val_fraction(cfg.val_fraction) > 0
    splits = {s: got[s] for s in (("val", "train") if with_val else ("train",))}
    if all(s["docs"] == 0 for s in got.values()):
        raise DataError(f"data source {cfg.source!r} is an empty corpus (no text in it)")
    for split, s in splits.items():
        if s["docs"] == 0:
            fix = f"raise {knob}" if split == "val" else f"lower {knob}"
            raise DataError(
                f"the {_SPLIT_NAMES[split]} split of {cfg.source!r} is empty with "
                f"{knob}={cfg.val_fraction}; {fix} or add documents"
            )
    if not with_val:
        for ext in ("bin", "idx"):
            (where / f"val.{ext}").unlink(missing_ok=True)
    secs = time.perf_counter() - t0
    for split, s in splits.items():
        _log(
            f"tokenised {split} split of {cfg.source} with {tok.name}: {s['docs']} docs, "
            f"{s['bytes'] / 1e6:.1f} MB -> {s['tokens']} tokens ({secs:.1f} s for both splits, "
            f"{workers} worker{'s' if workers > 1 else ''})"
        )
    meta = {"format": _FORMAT, **(extra or {}), "dtype": dtype.name, "splits": splits}
    _write_json(where / "meta.json", meta)
    return meta


# ---------------------------------------------------------------------------- reader


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1


def read_meta(where: Path) -> dict[str, Any] | None:
    """The directory's metadata if it is of this format and its files are complete, else None."""
    try:
        meta = json.loads((where / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        return None
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        sizes = {f"{k}.bin": s["tokens"] * itemsize for k, s in meta["splits"].items()}
        sizes |= {f"{k}.idx": s["docs"] * _IDX_DTYPE.itemsize for k, s in meta["splits"].items()}
    except (KeyError, TypeError, AttributeError):  # a meta.json edited by hand
        return None
    if any(_size(where / name) != size for name, size in sizes.items()):
        return None
    if meta.get("tokenizer_file") and not (where / meta["tokenizer_file"]).is_file():
        return None
    return meta


def open_split(where: Path, meta: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, document ends) of a split, both read-only memmaps."""
    tokens = np.memmap(where / f"{split}.bin", dtype=meta["dtype"], mode="r")
    return tokens, np.memmap(where / f"{split}.idx", dtype=_IDX_DTYPE, mode="r")


def open_prepared(cfg: DataConfig, tok: Tokenizer) -> tuple[Path, dict[str, Any]]:
    """The prepared directory cfg.source and its checked meta; DataError if it cannot be used."""
    where = Path(cfg.source).expanduser()
    raw = prepared_meta(cfg.source) or {}
    meta = read_meta(where)
    if meta is None:
        raise DataError(
            f"{cfg.source} is an incomplete prepared corpus or one of an older format; re-run "
            f"lmtrain prepare {raw.get('source', 'SOURCE')} --out {cfg.source}"
        )
    check_prepared_tokenizer(cfg.source, meta, cfg.tokenizer)
    if tok.name != meta["tokenizer_name"]:
        raise DataError(
            f"{cfg.source} was prepared with tokenizer {meta['tokenizer_name']}, not {tok.name}; "
            "use the tokenizer make_tokenizer returns for it"
        )
    if val_fraction(cfg.val_fraction) != val_fraction(meta["val_fraction"]):
        _log(
            f"data.val_fraction={cfg.val_fraction} is ignored: {cfg.source} was prepared with "
            f"a validation fraction of {meta['val_fraction']}"
        )
    return where, meta


# ---------------------------------------------------------------------------- lmtrain prepare


def _usable_out(out: Path) -> None:
    """Creates `out`, or checks that it is empty or a previous prepare's directory."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} exists and is not a directory")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if _TMP.sub("", p.name) not in _OURS)
        if foreign:
            raise DataError(
                f"--out {out} is a non-empty directory that lmtrain prepare did not write "
                f"(it holds {foreign[0]}); choose a new or empty directory"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = _tmp(out / "meta.json")
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DataError(f"cannot write to --out {out}: {e.strerror}") from None


def _up_to_date(meta: dict[str, Any] | None, cfg: DataConfig, fingerprint: str) -> bool:
    if not meta or meta.get("prepared") is not True:
        return False
    same = (
        meta.get("source_fingerprint") == fingerprint
        and meta.get("tokenizer") == normal_tokenizer_spec(cfg.tokenizer)
        and val_fraction(meta.get("val_fraction", -1)) == val_fraction(cfg.val_fraction)
    )
    if not same or normal_tokenizer_spec(cfg.tokenizer).startswith("bpe:"):
        # A BPE is a function of the spec, the source and the split, all compared above; building
        # it again could mean retraining it.
        return same
    return make_tokenizer(cfg).name == meta.get("tokenizer_name")


def _copy_tokenizer(tok: Tokenizer, out: Path) -> str:
    name = "tokenizer.model" if isinstance(tok, SentencePieceTokenizer) else "tokenizer.json"
    shutil.copyfile(tok.file, _tmp(out / name))
    os.replace(_tmp(out / name), out / name)
    return name


def _summary(meta: dict[str, Any]) -> str:
    return ", ".join(
        f"{split} {s['docs']:,} docs / {s['tokens']:,} tokens / {s['bytes']:,} bytes"
        for split, s in sorted(meta["splits"].items(), key=lambda kv: kv[0] != "train")
    )


def prepare(cfg: DataConfig, out: Path, *, progress: bool = True, workers: int = 0) -> str:
    """Tokenises cfg.source into `out` unless it is up to date there, with `workers` processes
    (0: one per core); returns what to print."""
    workers = workers or os.cpu_count() or 1
    if tasks.task(cfg.source) is not None:
        raise DataError(f"data source {cfg.source!r} is synthetic; there is nothing to prepare")
    if prepared_meta(cfg.source) is not None:
        raise DataError(f"{cfg.source} is already prepared; train with data.source={cfg.source}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"--val-fraction {cfg.val_fraction} must be in [0, 1)")
    fingerprint = source_fingerprint(cfg)  # fails first if the source does not exist
    spec = normal_tokenizer_spec(cfg.tokenizer)
    keep = cfg.source in EMBEDDED or cfg.source.startswith("hf:")
    source = cfg.source if keep else os.path.abspath(os.path.expanduser(cfg.source))
    _usable_out(out)
    with cache_lock(out / "meta.json"):  # two prepares into one directory take turns
        meta = read_meta(out)
        if _up_to_date(meta, cfg, fingerprint):
            return f"{out} is up to date ({_summary(meta)}); nothing to do"
        t0 = time.perf_counter()
        tok = make_tokenizer(cfg)
        for p in out.iterdir():  # stale files of an earlier prepare (.shards: see shards.py)
            if p.name not in (".meta.json.lock", ".shards"):
                p.unlink()
        extra: dict[str, Any] = {
            "prepared": True,
            "source": source,
            "source_fingerprint": fingerprint,
            "tokenizer": spec,
            "tokenizer_name": tok.name,
            "val_fraction": cfg.val_fraction,
            "text_key": cfg.text_key,
        }
        if tok.file is not None:  # the directory carries its tokenizer: training needs no other
            extra["tokenizer_file"] = _copy_tokenizer(tok, out)
        show = progress and sys.stderr.isatty()
        total = source_bytes(cfg)
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="tokenising", disable=not show
        ) as bar:
            # The bar counts document text against file sizes: JSON framing makes the text
            # less, replaced invalid UTF-8 more; keep it within [0, total].
            def advance(n: int) -> None:
                bar.update(min(n, total - bar.n))

            meta = build(
                cfg, tok, out, extra=extra, knob="--val-fraction", advance=advance, workers=workers
            )
            bar.update(total - bar.n)
    secs = time.perf_counter() - t0
    return (
        f"prepared {out} in {secs:.1f} s: {_summary(meta)}\n"
        f"train on it with: --set data.source={out.resolve()} (it brings its tokenizer, {spec})"
    )
