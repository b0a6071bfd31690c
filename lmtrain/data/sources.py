"""Document sources (embedded stdlib corpus, corpus files: see formats.py), the train/val split,
cache keys.

A directory written by `lmtrain prepare` is a source too, but it holds tokens, not documents:
lmtrain.data.prepare reads it, and the functions here that read text refuse it.
"""

from __future__ import annotations

import contextlib
import fcntl
import fractions
import glob
import hashlib
import json
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmtrain.data import formats, hf_source
from lmtrain.errors import DataError

if TYPE_CHECKING:  # lmtrain.config imports the models (jax); spawned workers need not
    from lmtrain.config import DataConfig

STDLIB = "stdlib"
# English prose that ships with CPython: pydoc's help topics (pydoc_data.topics, 79 sections of
# the Python Language Reference as plain text, ~465 KB). A second embedded corpus for mixtures;
# prose about Python, where "stdlib" is Python code (the two share vocabulary, not text).
STDLIB_PROSE = "stdlib-prose"
EMBEDDED = (STDLIB, STDLIB_PROSE)
_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages"})


# ---------------------------------------------------------------------------- files


def stdlib_files() -> tuple[Path, list[str]]:
    """The stdlib root and its `.py` files (relative POSIX paths, sorted), without site-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rels = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning here keeps third-party packages installed into the base Python out of the corpus.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]
        rel_dir = Path(dirpath).relative_to(root)
        rels += [(rel_dir / f).as_posix() for f in filenames if f.endswith(".py")]
    return root, sorted(rels)


def prose_documents() -> list[tuple[str, str]]:
    """(key, text) of every help topic of the stdlib-prose corpus, sorted by key."""
    from pydoc_data.topics import topics

    return [(f"topics/{k}", topics[k]) for k in sorted(topics)]


def prepared_meta(source: str) -> dict[str, Any] | None:
    """meta.json of `source` if it is a directory written by `lmtrain prepare`, else None."""
    meta_path = Path(os.path.expanduser(source)) / "meta.json"
    if source in EMBEDDED or hf_source.is_hf(source) or not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("prepared") is True else None


def resolve_files(source: str) -> list[tuple[Path, str]]:
    """(path, key) of each file a path/directory/glob source names, sorted by key."""
    expanded = os.path.expanduser(source)
    if prepared_meta(source) is not None:
        raise DataError(
            f"data source {source!r} is a prepared corpus of tokens (lmtrain prepare), not text "
            "files; it is read by load_corpus only"
        )
    if glob.has_magic(expanded):
        base = Path(_glob_base(expanded))
        found = [Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file()]
        if not found:
            raise DataError(f"data source glob {source!r} matches no files")
        pairs = [(p, p.relative_to(base).as_posix()) for p in found]
    elif Path(expanded).is_dir():
        base = Path(expanded)
        files = [  # hidden files and folders (.git, prepare's .shards) are not corpus files
            p
            for p in base.rglob("*")
            if p.is_file() and not any(x.startswith(".") for x in p.relative_to(base).parts)
        ]
        found = [p for p in files if formats.readable_name(p.name)]
        if not found:
            # prepare's lock or token files but no meta.json: it stopped before the end
            unfinished = (base / ".meta.json.lock").exists() or any(base.glob("*.bin*"))
            unfinished = unfinished or (base / ".shards").is_dir()
            hint = " (an unfinished lmtrain prepare? run it again)" if unfinished else ""
            seen = ", ".join(p.name for p in files[:5]) or "nothing"
            raise DataError(
                f"data source directory {source!r} holds no file lmtrain reads{hint}: it "
                f"takes {formats.ACCEPTED}; found {seen}"
            )
        _note_skipped(source, [p for p in files if not formats.readable_name(p.name)])
        pairs = [(p, p.relative_to(base).as_posix()) for p in found]
    elif Path(expanded).is_file():
        pairs = [(Path(expanded), Path(expanded).name)]
    else:
        raise DataError(f"data source {source!r} does not exist (expected 'stdlib' or a path)")
    return sorted(pairs, key=lambda pk: pk[1])


def _glob_base(pattern: str) -> str:
    """The longest leading directory of `pattern` without glob characters."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


_noted: set[str] = set()


def _note_skipped(source: str, skipped: list[Path]) -> None:
    """Says once per process which files of a directory source are not corpus files."""
    if skipped and source not in _noted:
        _noted.add(source)
        names = ", ".join(p.name for p in skipped[:3]) + (" ..." if len(skipped) > 3 else "")
        print(
            f"lmtrain.data: {source}: skipped {len(skipped)} files that are not "
            f"{formats.ACCEPTED} ({names})",
            file=sys.stderr,
            flush=True,
        )


def _read_text(path: Path) -> str:
    # Bytes in, exact text out: no newline translation, so byte counts match the file.
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror}") from None


# ---------------------------------------------------------------------------- documents


def _keyed_docs(cfg: DataConfig, want: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    """(key, text) of every document whose key `want` accepts; skipped files are never read."""
    if cfg.source == STDLIB:
        root, rels = stdlib_files()
        for rel in rels:
            if want(rel):
                yield rel, _read_text(root / rel)
        return
    if cfg.source == STDLIB_PROSE:
        yield from ((k, t) for k, t in prose_documents() if want(k))
        return
    if hf_source.is_hf(cfg.source):
        yield from hf_source.documents(cfg.source, cfg.text_key, want)
        return
    for path, rel in resolve_files(cfg.source):
        yield from formats.documents(path, rel, cfg.text_key, want)


def _has_one_document(cfg: DataConfig) -> bool:
    count = 0
    for _ in _document_keys(cfg):
        count += 1
        if count > 1:
            return False
    return count == 1


def _document_keys(cfg: DataConfig) -> Iterator[str]:
    """Document keys only (cheap: .txt files are not opened)."""
    if cfg.source == STDLIB:
        yield from stdlib_files()[1]
        return
    if cfg.source == STDLIB_PROSE:
        yield from (k for k, _ in prose_documents())
        return
    if hf_source.is_hf(cfg.source):
        yield from (k for k, _ in hf_source.documents(cfg.source, cfg.text_key, keys_only=True))
        return
    for path, rel in resolve_files(cfg.source):
        yield from (k for k, _ in formats.documents(path, rel, cfg.text_key, keys_only=True))


def val_fraction(value: float) -> fractions.Fraction:
    """The validation fraction as the exact ratio the hash split uses."""
    return fractions.Fraction(value).limit_denominator(10000)


def in_validation(key: str, frac: fractions.Fraction) -> bool:
    """Stable hash split: validation iff sha1(key) mod denominator < numerator."""
    digest = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16)
    return digest % frac.denominator < frac.numerator


def iter_documents(cfg: DataConfig, split: str) -> Iterator[tuple[str, str]]:
    """(key, text) of each document in `split` ("train" or "val"), streamed in key order."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    frac = val_fraction(cfg.val_fraction)
    if split == "val" and frac == 0:
        return
    if _has_one_document(cfg):
        # One document cannot be hash-split; its tail becomes the validation text.
        key, text = next(_keyed_docs(cfg, lambda _: True))
        cut = len(text) - int(len(text) * frac)
        piece = text[:cut] if split == "train" else text[cut:]
        if piece:
            yield key, piece
        return
    want_val = split == "val"
    yield from _keyed_docs(cfg, lambda key: in_validation(key, frac) == want_val)


# ---------------------------------------------------------------------------- cache keys


def source_fingerprint(cfg: DataConfig) -> str:
    """A short string that changes when the source's files change (for cache keys)."""
    if prepared_meta(cfg.source) is not None:
        # meta.json is rewritten whenever the directory is prepared again.
        meta_bytes = (Path(cfg.source).expanduser() / "meta.json").read_bytes()
        return f"prepared-{hashlib.sha1(meta_bytes).hexdigest()[:12]}"
    if cfg.source == STDLIB:
        root, rels = stdlib_files()
        version = platform.python_version()
        digest = hashlib.sha1(f"{version}|{root}|{len(rels)}".encode()).hexdigest()
        return f"stdlib-py{version}-{digest[:12]}"
    if cfg.source == STDLIB_PROSE:
        text = "".join(t for _, t in prose_documents()).encode()
        return f"prose-py{platform.python_version()}-{hashlib.sha1(text).hexdigest()[:12]}"
    if hf_source.is_hf(cfg.source):
        key = f"{hf_source.fingerprint(cfg.source)}|text_key={cfg.text_key}"
        return f"hf-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    h = hashlib.sha1(f"text_key={cfg.text_key}\n".encode())
    for path, _ in resolve_files(cfg.source):
        st = path.stat()
        h.update(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return f"files-{h.hexdigest()[:12]}"


def source_bytes(cfg: DataConfig) -> int:
    """Total size of the source's files (what a progress bar over the input counts up to)."""
    if cfg.source == STDLIB:
        root, rels = stdlib_files()
        return sum((root / rel).stat().st_size for rel in rels)
    if cfg.source == STDLIB_PROSE:
        return sum(len(t.encode()) for _, t in prose_documents())
    if hf_source.is_hf(cfg.source):
        return hf_source.nbytes(cfg.source)
    return sum(path.stat().st_size for path, _ in resolve_files(cfg.source))


def cache_dir(cfg: DataConfig) -> Path:
    """Where tokenizers and tokenised corpora are cached."""
    raw = cfg.cache_dir or os.environ.get("LMTRAIN_CACHE") or "~/.cache/lmtrain"
    return Path(raw).expanduser()


@contextlib.contextmanager
def cache_lock(target: Path) -> Iterator[None]:
    """Holds an exclusive lock beside `target` so racing processes build a cache entry once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
