"""Tokenizers: raw bytes, byte-level BPE trained on the corpus, or a tokenizer file."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmtrain.data import hf_source
from lmtrain.data.sources import (
    EMBEDDED,
    DataError,
    cache_dir,
    cache_lock,
    iter_documents,
    prepared_meta,
    resolve_files,
    source_fingerprint,
    val_fraction,
)

if TYPE_CHECKING:  # lmtrain.config imports the models (jax); spawned workers need not
    from lmtrain.config import DataConfig

EOD_TOKEN = "<|eod|>"
PAD_TOKEN = "<|pad|>"
# Accepted as end-of-document in tokenizers we did not train, in order of preference.
_EOD_CANDIDATES = (EOD_TOKEN, "<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "<|padding|>", "[PAD]")
_TRAIN_BATCH_DOCS = 64


class Tokenizer:
    """Text <-> ids; subclasses set the attributes below in `__init__`."""

    vocab_size: int
    eod_id: int
    pad_id: int
    token_bytes: np.ndarray  # int32[vocab_size]: UTF-8 bytes each id decodes to; 0 for specials
    name: str  # fingerprint used in cache keys
    file: Path | None = None  # the file it was loaded from (lmtrain prepare copies it)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without special tokens."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text."""
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Ids of each text as int64 arrays (subclasses skip the Python lists where they can)."""
        return [np.asarray(ids, dtype=np.int64) for ids in self.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids are dropped and broken UTF-8 is replaced."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """Ids 0..255 are UTF-8 bytes; 256 ends a document; 257 pads."""

    def __init__(self) -> None:
        self.vocab_size, self.eod_id, self.pad_id, self.name = 258, 256, 257, "bytes"
        self.token_bytes = np.array([1] * 256 + [0, 0], dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` model (trained here or loaded from tokenizer.json)."""

    def __init__(self, tk, name: str, where: str) -> None:
        self.tk = tk
        # Text that happens to spell a special token must stay text, or documents could inject eod.
        tk.encode_special_tokens = True
        vocab = tk.get_vocab(with_added_tokens=True)
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.eod_id = _first_id(vocab, _EOD_CANDIDATES)
        if self.eod_id is None:
            raise DataError(f"tokenizer {where} has no end-of-document token ({_EOD_CANDIDATES})")
        pad_id = _first_id(vocab, _PAD_CANDIDATES)
        self.pad_id = self.eod_id if pad_id is None else pad_id
        self.name, self.file = name, Path(where)
        self.token_bytes = _hf_token_bytes(tk, self.vocab_size)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast (tokenizers >= 0.21) skips the offsets we never use.
        fast = getattr(self.tk, "encode_batch_fast", self.tk.encode_batch)
        encs = fast(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece `.model` file (sentencepiece is imported only when one is used)."""

    def __init__(self, path: Path) -> None:
        try:
            import sentencepiece
        except ImportError:
            raise DataError(
                f"tokenizer {path} needs the sentencepiece package: pip install sentencepiece"
            ) from None
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        self.file = path
        sp = self.sp
        self.vocab_size = sp.get_piece_size()
        eod = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
        if eod < 0 or sp.id_to_piece(eod) == sp.id_to_piece(sp.unk_id()):
            raise DataError(f"tokenizer {path} has no end-of-sentence token (eos or </s>)")
        self.eod_id = eod
        self.pad_id = sp.pad_id() if sp.pad_id() >= 0 else eod
        self.name = f"spm{self.vocab_size}-{_file_hash(path)}"
        sizes = []
        for i in range(self.vocab_size):
            piece = sp.id_to_piece(i)
            if sp.is_control(i) or sp.is_unknown(i):
                sizes.append(0)
            elif sp.is_byte(i):
                sizes.append(1)
            else:  # "▁" stands for a space; sentencepiece may drop a leading one on decode
                sizes.append(len(piece.replace("\u2581", " ").encode("utf-8")))
        self.token_bytes = np.array(sizes, dtype=np.int32)

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts), num_threads=os.cpu_count() or 1)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def _first_id(vocab: dict[str, int], candidates: Sequence[str]) -> int | None:
    return next((vocab[c] for c in candidates if c in vocab), None)


def _file_hash(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:10]


def _hf_token_bytes(tk, vocab_size: int) -> np.ndarray:
    """Bytes per id: exact for byte-level models, the decoded length otherwise."""
    from tokenizers import pre_tokenizers

    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    specials = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}
    byte_level = "ByteLevel" in type(tk.decoder).__name__ if tk.decoder else False
    sizes = np.zeros(vocab_size, dtype=np.int32)
    for i in range(vocab_size):
        token = tk.id_to_token(i)
        if i in specials or token is None:
            continue
        if byte_level and set(token) <= alphabet:
            sizes[i] = len(token)  # the byte-level alphabet maps each byte to one character
        else:
            sizes[i] = len(tk.decode([i], skip_special_tokens=False).encode("utf-8"))
    return sizes


# ---------------------------------------------------------------------------- BPE training


def _train_bpe(texts: Iterator[list[str]], vocab_size: int):
    """A byte-level BPE of `vocab_size` trained on batches of texts (a fresh HF Tokenizer)."""
    from tokenizers import Tokenizer as HFModel
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFModel(models.BPE())
    # add_prefix_space=False keeps encoding byte-exact: the ids spell exactly the input bytes.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return tk


def _train_batches(cfgs: list[DataConfig]) -> Iterator[list[str]]:
    """Training-split texts of every source in turn, in batches; raises DataError if there is
    no text at all."""
    batch, total = [], 0
    docs = (text for cfg in cfgs for _, text in iter_documents(cfg, "train"))
    for text in docs:
        batch.append(text)
        total += len(text)
        if len(batch) == _TRAIN_BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch
    if total == 0:
        names = " + ".join(repr(cfg.source) for cfg in cfgs)
        raise DataError(f"data source {names} is an empty corpus (no training text)")


def _bpe(cfg: DataConfig, vocab_size: int, sources: list[DataConfig] | None = None) -> HFTokenizer:
    """BPE trained on the training split of cfg's source, or of every config in `sources` (a
    mixture's components, in turn)."""
    from tokenizers import Tokenizer as HFModel

    sources = sources or [cfg]
    frac = val_fraction(cfg.val_fraction)
    # val_fraction is in the key because the tokenizer sees only the training split.
    fingerprint = "+".join(source_fingerprint(c) for c in sources)
    if len(sources) > 1:
        fingerprint = "mix-" + hashlib.sha1(fingerprint.encode()).hexdigest()[:12]
    stem = f"bpe{vocab_size}-{fingerprint}-val{frac.numerator}_{frac.denominator}"
    path = cache_dir(cfg) / "tokenizers" / f"{stem}.json"
    with cache_lock(path):
        if not path.is_file():
            t0 = time.perf_counter()
            tk = _train_bpe(_train_batches(sources), vocab_size)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(tk.to_str())
            os.replace(tmp, path)
            secs = time.perf_counter() - t0
            # Shown without any logging setup, like the corpus builder's line: it takes a while.
            print(f"lmtrain.data: trained {path.name} in {secs:.1f} s", file=sys.stderr, flush=True)
    text = path.read_text()
    tk = HFModel.from_str(text)
    name = f"bpe{vocab_size}-{hashlib.sha1(text.encode()).hexdigest()[:10]}"
    return HFTokenizer(tk, name=name, where=str(path))


DEFAULT_SPEC = "bpe:4096"  # what data.tokenizer="" means, but for a prepared directory


def normal_tokenizer_spec(spec: str) -> str:
    """`spec` with "" resolved and a tokenizer path made absolute (the tokenizer.json of a
    tokenizer directory, the cached file of an HF hub name), so it compares equal anywhere."""
    spec = spec or DEFAULT_SPEC
    if spec == "bytes" or spec.startswith("bpe:"):
        return spec
    return str(tokenizer_file(spec))


def check_prepared_tokenizer(source: str, meta: dict[str, Any], spec: str) -> None:
    """Raises DataError unless the prepared directory `source` was tokenised with `spec`
    ("" = whatever it was tokenised with)."""
    if spec and meta.get("tokenizer") != normal_tokenizer_spec(spec):
        raise DataError(
            f"{source} was prepared with tokenizer {meta.get('tokenizer')}, not {spec}; leave "
            "data.tokenizer unset (a prepared directory brings its own) or set it to that"
        )


def tokenizer_file(spec: str) -> Path:
    """The tokenizer file a spec names: a tokenizer.json or sentencepiece .model file, a
    directory holding one (an HF tokenizer directory), or an HF hub name ("gpt2",
    "org/name") found in the local HF cache. Nothing is downloaded."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return (path / "tokenizer.json").resolve()
        models = sorted(path.glob("*.model"))
        if len(models) == 1:
            return models[0].resolve()
        raise DataError(
            f"data.tokenizer {spec!r} is a directory without tokenizer.json or one .model file"
        )
    looked = _hub_cache_dirs(spec)
    for snapshot in looked:
        for name in ("tokenizer.json", "tokenizer.model"):
            if (snapshot / name).is_file():
                return (snapshot / name).resolve()
    where = (
        ", ".join(str(d) for d in looked) or f"{_hub_root()} (no models--{spec.replace('/', '--')})"
    )
    raise DataError(
        f"data.tokenizer {spec!r} is not 'bytes', 'bpe:N', a tokenizer file or directory, nor an "
        f"HF hub name in the local cache (looked in {where}); download it where there is "
        "network (huggingface-cli download NAME tokenizer.json) or pass the file's path"
    )


def _hub_root() -> Path:
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_cache_dirs(name: str) -> list[Path]:
    """Snapshot folders of hub model `name` in the local cache, the one refs/main names first."""
    if name.count("/") > 1 or not name or name.startswith((".", "/")):
        return []
    repo = _hub_root() / f"models--{name.replace('/', '--')}"
    snaps = sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
    main = repo / "refs" / "main"
    if main.is_file():
        first = repo / "snapshots" / main.read_text().strip()
        snaps = [first] + [s for s in snaps if s != first]
    return snaps


def _prepared_tokenizer(cfg: DataConfig, meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a prepared directory was written with, from its own copy of it."""
    check_prepared_tokenizer(cfg.source, meta, cfg.tokenizer)
    if meta["tokenizer"] == "bytes":
        return ByteTokenizer()
    path = Path(cfg.source).expanduser() / str(meta.get("tokenizer_file"))
    if not path.is_file():
        raise DataError(f"{cfg.source} has no {path.name}; re-run lmtrain prepare")
    # Every file tokenizer's name ends in its content hash, so a swapped copy shows here.
    if not str(meta.get("tokenizer_name")).endswith(f"-{_file_hash(path)}"):
        raise DataError(f"{path} is not the tokenizer {cfg.source} was prepared with; re-run it")
    tok = _load_file(path)
    tok.name = meta["tokenizer_name"]  # "bpeN-..." if it was a BPE: the same cache keys as then
    return tok


def _load_file(path: Path) -> Tokenizer:
    """A tokenizer.json or sentencepiece .model file."""
    if path.suffix == ".model":
        return SentencePieceTokenizer(path)
    from tokenizers import Tokenizer as HFModel

    try:
        tk = HFModel.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for malformed files
        raise DataError(f"tokenizer file {path} could not be loaded: {e}") from None
    return HFTokenizer(tk, name=f"hf{tk.get_vocab_size()}-{_file_hash(path)}", where=str(path))


def make_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The text tokenizer `cfg.tokenizer` names ("bytes", "bpe:N", a file, a tokenizer
    directory, a cached HF hub name; "" = bpe:4096), or a prepared dir's own (synthetic tasks
    bring theirs: lmtrain.data.tasks.make_tokenizer). A mixture has one tokenizer for all its
    components: a prepared component's own, or bpe:N trained on every component's text."""
    if cfg.mixture:
        return _mixture_tokenizer(cfg)
    meta = prepared_meta(cfg.source)
    if meta is not None:
        return _prepared_tokenizer(cfg, meta)
    spec = cfg.tokenizer or DEFAULT_SPEC
    if spec == "bytes":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        n = spec[4:]
        if not n.isdigit() or int(n) < 258:
            raise DataError(f"data.tokenizer {spec!r}: N in 'bpe:N' must be an integer >= 258")
        return _bpe(cfg, int(n))
    return _load_file(tokenizer_file(spec))


def component_config(cfg: DataConfig, name: str) -> DataConfig:
    """The data config of mixture component `name` read alone."""
    return dataclasses.replace(cfg, source=cfg.components()[name].source, mixture=())


def check_component_sources(cfg: DataConfig) -> None:
    """Every text component's files exist and are readable, before any is tokenised: a bad
    source is one error naming its component, not a failure after the others were read."""
    for name, comp in cfg.components().items():
        src = comp.source
        if src in EMBEDDED or hf_source.is_hf(src) or prepared_meta(src) is not None:
            continue
        try:
            resolve_files(src)
        except DataError as e:
            raise DataError(f"data.mixture.{name}: {e}") from None


def _mixture_tokenizer(cfg: DataConfig) -> Tokenizer:
    check_component_sources(cfg)
    names = list(cfg.components())
    parts = {n: component_config(cfg, n) for n in names}
    prepared = {n: m for n in names if (m := prepared_meta(parts[n].source)) is not None}
    if prepared and not cfg.tokenizer:  # the first prepared component's own tokenizer
        first = next(iter(prepared))
        tok, said = make_tokenizer(parts[first]), f"data.mixture.{first}'s own"
    elif (cfg.tokenizer or DEFAULT_SPEC).startswith("bpe:") and not prepared:
        n = (cfg.tokenizer or DEFAULT_SPEC)[4:]
        if not n.isdigit() or int(n) < 258:
            raise DataError(f"data.tokenizer {cfg.tokenizer!r}: N in 'bpe:N' must be >= 258")
        tok, said = _bpe(cfg, int(n), [parts[k] for k in names]), f"data.tokenizer {cfg.tokenizer}"
    elif cfg.tokenizer.startswith("bpe:"):
        raise DataError(
            f"data.tokenizer {cfg.tokenizer}: a BPE is trained on text, but data.mixture."
            f"{next(iter(prepared))} is a prepared corpus of tokens; leave data.tokenizer empty "
            "to use its own tokenizer, or name a tokenizer file"
        )
    else:  # bytes, a file, a directory or a cached hub name: not read from any corpus
        tok = make_tokenizer(dataclasses.replace(parts[names[0]], source="stdlib"))
        said = f"data.tokenizer {cfg.tokenizer!r}"
    for n, meta in prepared.items():
        if meta.get("tokenizer_name") != tok.name:
            raise DataError(
                f"data.mixture.{n}: {parts[n].source} was prepared with tokenizer "
                f"{meta.get('tokenizer_name')}, but the mixture's tokenizer is {tok.name} "
                f"({said}); a mixture needs one tokenizer: prepare every component with it"
            )
    return tok
