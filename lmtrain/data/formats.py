"""Reading documents out of corpus files: plain text, JSON lines, JSON arrays and parquet, each
optionally compressed with gzip, zstd, xz or bzip2.

Compression is detected from a file's magic bytes (a gzip file named .txt is still gzip, and a
file named .gz that is not gzip is an error); the record format from the name once the
compression suffix is removed, or, for other names, from the content. A file that does not
read as text (NUL bytes or invalid UTF-8 in its first 64 KiB) is an error naming the file and
the accepted formats: lmtrain never tokenises bytes it cannot read as text, and never skips a
named file silently.

Document keys (which decide the train/validation split, `sources.in_validation`) are the
file's key without its compression suffix, plus ":N" for the N-th record (1-based line number
for JSON lines, record index for JSON arrays and parquet rows), so a corpus splits the same
compressed or not.

zstandard (.zst) and pyarrow (.parquet) are optional: the `data` extra installs them.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from lmtrain.errors import DataError

ACCEPTED = (
    ".txt, .jsonl, .json (a list of records) or .parquet, each optionally compressed "
    "(.gz, .zst, .xz, .bz2)"
)
FORMAT_SUFFIXES = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
COMPRESSION_SUFFIXES = {".gz": "gz", ".zst": "zst", ".xz": "xz", ".bz2": "bz2"}
_MAGIC = (
    (b"\x1f\x8b", "gz"),
    (b"\x28\xb5\x2f\xfd", "zst"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bz2"),
)
_SNIFF = 1 << 16


def split_suffixes(name: str) -> tuple[str, str | None, str | None]:
    """(name without the compression suffix, compression by suffix, format by suffix)."""
    p = Path(name)
    comp = COMPRESSION_SUFFIXES.get(p.suffix.lower())
    base = p.stem if comp else p.name
    return base, comp, FORMAT_SUFFIXES.get(Path(base).suffix.lower())


def readable_name(name: str) -> bool:
    """Whether a directory's file is taken by its name (a known format, compressed or not)."""
    return split_suffixes(name)[2] is not None


def _magic(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None
    if head[:4] == b"PAR1":
        return "parquet"
    return next((c for m, c in _MAGIC if head.startswith(m)), None)


def open_binary(path: Path, compression: str | None) -> IO[bytes]:
    """The file's decompressed bytes as a stream."""
    if compression == "gz":
        return gzip.open(path, "rb")
    if compression == "xz":
        return lzma.open(path, "rb")
    if compression == "bz2":
        return bz2.open(path, "rb")
    if compression == "zst":
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path} is zstd-compressed: pip install 'lmtrain[data]' (zstandard)"
            ) from None
        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)
    return open(path, "rb")


def detect(path: Path) -> tuple[str | None, str]:
    """(compression, format) of a corpus file, from its magic bytes and name; DataError if it
    is not one lmtrain reads."""
    magic = _magic(path)
    _, comp_by_name, fmt = split_suffixes(path.name)
    if magic == "parquet":
        return None, "parquet"
    if comp_by_name and magic != comp_by_name:
        raise DataError(f"{path} is named {path.suffix} but is not {comp_by_name}-compressed")
    comp = magic
    if fmt == "parquet":
        raise DataError(f"{path} is named .parquet but is not a parquet file")
    try:
        with open_binary(path, comp) as f:
            head = f.read(_SNIFF)
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise DataError(f"{path} could not be decompressed ({comp}): {e}") from None
    except Exception as e:  # zstandard's own errors
        raise DataError(f"{path} could not be decompressed ({comp}): {e}") from None
    if not _is_text(head):
        what = f"{comp}-compressed data that is" if comp else "a file that is"
        raise DataError(
            f"{path} is {what} not text (binary bytes in its first 64 KiB); lmtrain reads "
            f"{ACCEPTED}"
        )
    if fmt is None:
        first = head.lstrip()[:1]
        fmt = {b"[": "json", b"{": "jsonl"}.get(first, "txt")
    return comp, fmt


def _is_text(head: bytes) -> bool:
    if b"\x00" in head:
        return False
    text = head.decode("utf-8", errors="replace")
    bad = text.count("\ufffd")
    # A multi-byte character cut at the 64 KiB boundary is one replacement, not binary.
    return bad <= max(2, len(text) // 1000)


def record_text(record: object, text_key: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
        raise DataError(f"{where} has no string field {text_key!r}")
    text = record[text_key]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from "\\ud800"-style escapes
        text = text.encode("utf-8", errors="replace").decode("utf-8")
    return text


def documents(
    path: Path, key: str, text_key: str, want=None, keys_only: bool = False
) -> Iterator[tuple[str, str]]:
    """(document key, text) of the documents of a corpus file whose key `want` accepts (all
    by default); keys_only: every key, with "" for the text (plain text files are not read)."""
    comp, fmt = detect(path)
    base = split_suffixes(key)[0] if comp else key
    take = (lambda k: True) if want is None else want
    if fmt == "parquet":
        yield from _parquet(path, base, text_key, take, keys_only)
        return
    with open_binary(path, comp) as raw:
        if fmt == "txt":
            if keys_only:
                yield base, ""
            elif take(base):
                # Bytes in, exact text out: no newline translation, so byte counts match.
                yield base, raw.read().decode("utf-8", errors="replace")
            return
        if fmt == "jsonl":
            lines = io.BufferedReader(raw, 1 << 20) if comp == "zst" else raw
            for lineno, line in enumerate(lines, 1):
                k = f"{base}:{lineno}"
                if not line.strip() or not (keys_only or take(k)):
                    continue
                if keys_only:
                    yield k, ""
                    continue
                try:
                    record = json.loads(line.decode("utf-8", errors="replace"))
                except json.JSONDecodeError:
                    raise DataError(f"{path} line {lineno} is not valid JSON") from None
                yield k, record_text(record, text_key, f"{path} line {lineno}")
            return
        try:  # json: one array of records
            records = json.loads(raw.read().decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(records, list):
            kind = type(records).__name__
            raise DataError(f"{path} holds a JSON {kind}, not a list of records")
        for i, record in enumerate(records, 1):
            k = f"{base}:{i}"
            if keys_only:
                yield k, ""
            elif take(k):
                yield k, record_text(record, text_key, f"{path} record {i}")


def _parquet(path: Path, base: str, text_key: str, take, keys_only: bool):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is parquet: pip install 'lmtrain[data]' (pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise DataError(f"{path} is not a readable parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise DataError(
            f"{path} has no column {text_key!r} (columns: {', '.join(names)}); set data.text_key"
        )
    if keys_only:
        for i in range(1, pf.metadata.num_rows + 1):
            yield f"{base}:{i}", ""
        return
    i = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=4096):
        for value in batch.column(0).to_pylist():
            i += 1
            k = f"{base}:{i}"
            if not take(k):
                continue
            if not isinstance(value, str):
                raise DataError(f"{path} row {i}: column {text_key!r} is not a string")
            yield k, value
