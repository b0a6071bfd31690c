"""Document-end index of tokenised corpora, `lmtrain prepare`, and training on a prepared dir."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lmtrain import data
from lmtrain.cli import main
from lmtrain.config import DataConfig
from lmtrain.data import pipeline, prepare, shards, sources, tokenizers

DataError = data.DataError
TEXTS = {
    "a.txt": "first document\nwith two lines ü\n",
    "b.txt": "second 🎉 one",
    "c.txt": "",  # empty documents are skipped: no index entry
    "d.txt": "zqxj " * 60,
    "sub/e.txt": "nested file, fifth",
}
RECORDS = ["jsonl one", "jsonl two <|eod|> as text", "jsonl three"]


def _corpus(root: Path) -> Path:
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    lines = [json.dumps({"text": t}) for t in RECORDS]
    (root / "f.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # shared, so bpe:300 is trained once


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "env-cache"))


def _prepare(src: Path, out: Path, cache: Path, *extra: str) -> int:
    args = ["prepare", str(src), "--out", str(out), "--cache-dir", str(cache), "--no-progress"]
    return main([*args, "--val-fraction", "0.25", *extra])


def _check_index(cfg: DataConfig, corpus: data.Corpus, tok: tokenizers.Tokenizer) -> None:
    """Each split's index equals the eod scan, and doc i decodes to document i's text + eod."""
    for split, stream in (("train", corpus.train), ("val", corpus.val)):
        ends = stream.document_ends()
        assert isinstance(ends, np.memmap) and ends.dtype == np.int64
        scan = pipeline.TokenStream(np.asarray(stream), tok.eod_id, tok.pad_id).document_ends()
        np.testing.assert_array_equal(ends, scan)
        texts = [t for _, t in data.iter_documents(cfg, split) if t]
        assert len(ends) == len(texts) == corpus.stats[split]["docs"] and ends[-1] == len(stream)
        starts = np.concatenate([[0], ends[:-1]])
        for text, a, b in zip(texts, starts, ends, strict=True):
            doc = np.asarray(stream[a:b])
            assert doc[-1] == tok.eod_id and tok.eod_id not in doc[:-1]
            assert tok.decode(doc.tolist()) == text


@pytest.mark.parametrize("spec", ["bytes", "bpe:300"])
def test_document_index_matches_eod_scan_and_decodes(src, cache, spec):
    cfg = DataConfig(source=str(src), tokenizer=spec, val_fraction=0.25, cache_dir=str(cache))
    tok = data.make_tokenizer(cfg)
    _check_index(cfg, data.load_corpus(cfg, tok), tok)


def test_token_stream_document_ends_without_index():
    s = pipeline.TokenStream(np.array([1, 2, 9, 3, 9, 4, 5]), 9, 8)
    np.testing.assert_array_equal(s.document_ends(), [3, 5, 7])  # the tail is a document too
    assert s.document_ends() is s.document_ends() and s.document_ends().dtype == np.int64
    assert len(pipeline.TokenStream(np.array([], np.uint16), 9, 8).document_ends()) == 0


def test_long_documents_get_one_index_entry(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_PIECE_CHARS", 10)
    monkeypatch.setattr(shards, "_FLUSH_CHARS", 25)  # pieces span several flushes, too
    for i, n in enumerate([50, 3, 20]):
        (tmp_path / "src").mkdir(exist_ok=True)
        (tmp_path / "src" / f"doc{i}.txt").write_text("".join(f"line {j} ü\n" for j in range(n)))
    cfg = DataConfig(source=str(tmp_path / "src"), tokenizer="bytes", val_fraction=0.0)
    c = data.load_corpus(cfg, data.make_tokenizer(cfg))
    docs = [list("".join(f"line {j} ü\n" for j in range(n)).encode()) + [256] for n in (50, 3, 20)]
    np.testing.assert_array_equal(np.asarray(c.train), sum(docs, []))  # one EOD per document
    np.testing.assert_array_equal(c.train.document_ends(), np.cumsum([len(d) for d in docs]))


def test_cli_prepare_writes_layout_then_is_a_no_op(src, tmp_path, capsys, monkeypatch):
    out = tmp_path / "prepared"
    assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0
    printed = capsys.readouterr()
    files = {"meta.json", ".meta.json.lock", "train.bin", "train.idx", "val.bin", "val.idx"}
    assert {p.name for p in out.iterdir()} == files  # no tokenizer file for bytes
    meta = json.loads((out / "meta.json").read_text())
    assert meta["prepared"] is True and meta["format"] == prepare._FORMAT
    assert meta["source"] == str(src) and meta["tokenizer"] == meta["tokenizer_name"] == "bytes"
    assert meta["val_fraction"] == 0.25 and meta["dtype"] == "uint16"
    assert meta["source_fingerprint"] == sources.source_fingerprint(DataConfig(source=str(src)))
    docs = sum(s["docs"] for s in meta["splits"].values())
    assert docs == sum(1 for t in [*TEXTS.values(), *RECORDS] if t)
    assert (
        f"prepared {out} in" in printed.out and f"--set data.source={out.resolve()}" in printed.out
    )
    assert "it brings its tokenizer, bytes" in printed.out and "tokenising" not in printed.err

    mtime = (out / "train.bin").stat().st_mtime_ns

    def no_encoding(*a):
        raise AssertionError("tokenised again although nothing changed")

    with monkeypatch.context() as m:
        m.setattr(tokenizers.ByteTokenizer, "encode_arrays", no_encoding)
        assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        f"{out} is up to date ({prepare._summary(meta)}); nothing to do"
    ]
    assert (out / "train.bin").stat().st_mtime_ns == mtime


def test_changed_input_rebuilds(tmp_path, capsys):
    src, out = _corpus(tmp_path / "src"), tmp_path / "out"
    assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0
    before = json.loads((out / "meta.json").read_text())
    (src / "a.txt").write_text("a changed and longer first document\n")
    capsys.readouterr()
    assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0
    assert "prepared" in capsys.readouterr().out
    after = json.loads((out / "meta.json").read_text())
    assert after["source_fingerprint"] != before["source_fingerprint"]
    cfg = DataConfig(source=str(out), tokenizer="bytes", val_fraction=0.25)
    c = data.load_corpus(cfg, data.make_tokenizer(cfg))
    text = np.concatenate([np.asarray(c.train), np.asarray(c.val)]).astype(np.uint8).tobytes()
    assert b"a changed and longer" in text


def test_training_on_prepared_dir_matches_cache_path(src, cache, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert _prepare(src, out, cache, "--tokenizer", "bpe:300") == 0
    assert (out / "tokenizer.json").is_file()
    via_cache = DataConfig(
        source=str(src), tokenizer="bpe:300", val_fraction=0.25, cache_dir=str(cache)
    )
    tok_c = data.make_tokenizer(via_cache)
    c = data.load_corpus(via_cache, tok_c)
    moved = shutil.move(src, tmp_path / "gone")  # the original source is never read again
    try:
        fresh = tmp_path / "fresh-cache"
        prepared = DataConfig(source=str(out), tokenizer="bpe:300", cache_dir=str(fresh))
        tok_p = data.make_tokenizer(prepared)
        p = data.load_corpus(prepared, tok_p)
    finally:
        shutil.move(moved, src)
    assert "data.val_fraction=0.05 is ignored" in capsys.readouterr().err
    # The two sides are really two paths: the prepared dir is mapped in place, not copied.
    assert Path(p.train.tokens.filename).parent == out.resolve()
    assert Path(c.train.tokens.filename).parent.parent == cache / "corpora"
    assert not fresh.exists()
    assert (tok_p.name, tok_p.eod_id, tok_p.pad_id) == (tok_c.name, tok_c.eod_id, tok_c.pad_id)
    np.testing.assert_array_equal(tok_p.token_bytes, tok_c.token_bytes)
    assert tok_p.encode_batch(RECORDS) == tok_c.encode_batch(RECORDS)
    for split in ("train", "val"):
        a, b = getattr(c, split), getattr(p, split)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(a.document_ends(), b.document_ends())
    assert p.stats == c.stats
    fp = sources.source_fingerprint(prepared)
    assert fp.startswith("prepared-") and fp == sources.source_fingerprint(prepared)

    with pytest.raises(DataError, match=r"prepared with tokenizer bpe:300, not bytes; leave"):
        data.make_tokenizer(dataclasses.replace(prepared, tokenizer="bytes"))
    # Unset, the tokenizer is the prepared directory's own.
    own = data.make_tokenizer(dataclasses.replace(prepared, tokenizer=""))
    assert own.name == tok_p.name and own.encode_batch(RECORDS) == tok_p.encode_batch(RECORDS)
    with pytest.raises(DataError, match="prepared corpus of tokens"):
        list(data.iter_documents(prepared, "train"))


def test_incomplete_or_old_prepared_dir(src, tmp_path):
    out = tmp_path / "prepared"
    assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0
    cfg = DataConfig(source=str(out), tokenizer="bytes", val_fraction=0.25)
    tok = data.make_tokenizer(cfg)
    (out / "train.idx").unlink()
    with pytest.raises(DataError, match=f"incomplete .* re-run lmtrain prepare {src} --out {out}"):
        data.load_corpus(cfg, tok)
    assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0  # repairs it
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "format": 1}))
    with pytest.raises(DataError, match="older format"):
        data.load_corpus(cfg, tok)


def _one_error_line(capsys, *match: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmtrain: error: "), err
    assert all(m in err[0] for m in match), err


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    cache = tmp_path / "cache"
    assert _prepare(tmp_path / "missing", tmp_path / "o1", cache, "--tokenizer", "bytes") == 2
    _one_error_line(capsys, "does not exist")
    (tmp_path / "empty").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "empty" / name).write_text("")
    assert _prepare(tmp_path / "empty", tmp_path / "o2", cache, "--tokenizer", "bytes") == 2
    _one_error_line(capsys, "empty corpus")
    one = tmp_path / "one"
    one.mkdir()
    (one / "doc.txt").write_text("x")  # one document, too short to give a validation tail
    assert _prepare(one, tmp_path / "o3", cache, "--tokenizer", "bytes") == 2
    _one_error_line(capsys, "validation split", "raise --val-fraction")
    src = _corpus(tmp_path / "src")
    assert _prepare(src, tmp_path / "src", cache) == 2  # --out: somebody else's directory
    _one_error_line(capsys, "lmtrain prepare did not write", "a.txt")
    assert _prepare(src, tmp_path / "src" / "a.txt" / "out", cache) == 2
    _one_error_line(capsys, "cannot write to --out")
    assert _prepare(src, tmp_path / "o4", cache, "--val-fraction", "1.5") == 2
    _one_error_line(capsys, "--val-fraction")


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, capsys):
    src, out = _corpus(tmp_path / "src"), tmp_path / "out"
    assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0
    (src / "a.txt").write_text("changed, so the next prepare rebuilds\n")
    monkeypatch.setattr(shards, "_FLUSH_CHARS", 1)  # one write per document
    real, calls = tokenizers.ByteTokenizer.encode_arrays, []

    def fail_midway(self, texts):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if Ctrl-C while the splits are half written
        return real(self, texts)

    monkeypatch.setattr(tokenizers.ByteTokenizer, "encode_arrays", fail_midway)
    with pytest.raises(KeyboardInterrupt):  # in this process (--workers 1), where the patch is
        _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes", "--workers", "1")
    assert not (out / "meta.json").exists()  # the old meta.json no longer vouches for the files
    assert not [p for p in out.iterdir() if ".tmp" in p.name]
    with pytest.raises(DataError, match="unfinished lmtrain prepare"):
        data.load_corpus(DataConfig(source=str(out), tokenizer="bytes"), tokenizers.ByteTokenizer())
    monkeypatch.setattr(tokenizers.ByteTokenizer, "encode_arrays", real)
    assert _prepare(src, out, tmp_path / "cache", "--tokenizer", "bytes") == 0  # accepted: ours
    assert prepare.read_meta(out) is not None


def test_source_bytes_is_the_progress_total(src):
    files = [p for p in src.rglob("*") if p.is_file()]
    assert sources.source_bytes(DataConfig(source=str(src))) == sum(p.stat().st_size for p in files)
    assert sources.source_bytes(DataConfig(source="stdlib")) > 1_000_000


def _big_corpus(d, files=8, docs=300):
    d.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "ünï", "✓", "x" * 20, "\n"]
    for f in range(files):
        rows = [
            {"text": " ".join(rng.choice(words, size=int(rng.integers(5, 200))))}
            for _ in range(docs)
        ]
        (d / f"part{f:02d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _files(out):
    return {n: (out / n).read_bytes() for n in ("train.bin", "train.idx", "val.bin", "val.idx")}


def test_prepare_output_is_the_same_for_any_number_of_workers(tmp_path, monkeypatch, capsys):
    src = _big_corpus(tmp_path / "src")
    monkeypatch.setattr(shards, "UNIT_BYTES", 30_000)  # several files per unit, many units
    outs = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        args = ("--tokenizer", "bpe:300", "--workers", str(workers))
        assert _prepare(src, out, tmp_path / "cache", *args) == 0
        outs[workers] = _files(out)
        assert not (out / ".shards").exists()
    assert len(shards.plan(DataConfig(source=str(src)))) >= 4
    assert outs[1] == outs[2] == outs[3]
    # The one-process stream of documents gives the same files: units change nothing.
    monkeypatch.setattr(shards, "UNIT_BYTES", 1 << 40)
    assert len(shards.plan(DataConfig(source=str(src)))) == 1
    assert _prepare(src, tmp_path / "one", tmp_path / "cache", "--tokenizer", "bpe:300") == 0
    assert _files(tmp_path / "one") == outs[1]
    capsys.readouterr()


KILL_AFTER_UNITS = """
import os, signal, sys
from lmtrain.data import shards
real, done = shards.run_unit, []
def run_unit(*args, **kw):
    out = real(*args, **kw)
    done.append(1)
    if len(done) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 in the middle of the corpus
    return out
shards.run_unit = run_unit
from lmtrain.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_prepare_resumes_after_kill_9_without_redoing_finished_units(tmp_path):
    import os
    import subprocess
    import sys

    src = _big_corpus(tmp_path / "src")
    script = tmp_path / "kill.py"
    script.write_text(KILL_AFTER_UNITS)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "LMTRAIN_UNIT_BYTES": "30000"}
    out, ref = tmp_path / "out", tmp_path / "ref"
    args = ["prepare", str(src), "--tokenizer", "bytes", "--workers", "1", "--no-progress"]

    def run(*cmd):
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    killed = run(sys.executable, str(script), "3", *args, "--out", str(out))
    assert killed.returncode == -9, killed.stderr
    assert len(list((out / ".shards").glob("*.done.json"))) == 3
    assert not (out / "meta.json").exists()
    again = run(sys.executable, "-m", "lmtrain", *args, "--out", str(out))
    assert again.returncode == 0, again.stderr
    assert "resuming: 3 of" in again.stderr
    fresh = run(sys.executable, "-m", "lmtrain", *args[:-3], "--workers", "2", "--out", str(ref))
    assert fresh.returncode == 0, fresh.stderr
    assert _files(out) == _files(ref)
