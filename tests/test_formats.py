"""Corpus files: every format and compression gives exactly the documents (and so the tokens) of
the plain file; what is not text is refused with a message naming the file, never tokenised."""

import bz2
import gzip
import json
import lzma

import numpy as np
import pytest

from lmtrain.cli import main
from lmtrain.config import DataConfig
from lmtrain.data import formats
from lmtrain.data.sources import DataError, iter_documents

DOCS = [
    {"text": f"doc {i}: " + "héllo wörld ✓\n" * (i % 5 + 1) + "tail", "id": i} for i in range(30)
]
COMPRESS = {
    "": lambda b: b,
    ".gz": gzip.compress,
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
    ".zst": lambda b: __import__("zstandard").ZstdCompressor().compress(b),
}


def _encoded(fmt: str) -> bytes:
    if fmt == "jsonl":
        return "".join(json.dumps(d) + "\n" for d in DOCS).encode()
    return json.dumps(DOCS).encode()


def _write(path, fmt: str, comp: str):
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"id": [d["id"] for d in DOCS], "text": [d["text"] for d in DOCS]}), path
        )
        return path
    p = path.with_name(path.name + comp)
    p.write_bytes(COMPRESS[comp](_encoded(fmt)))
    return p


def _all_texts(source: str) -> list[str]:
    cfg = DataConfig(source=source, val_fraction=0.0)
    return [t for _, t in iter_documents(cfg, "train")]


CASES = [(f, c) for f in ("jsonl", "json") for c in COMPRESS] + [("parquet", "")]


@pytest.mark.parametrize(("fmt", "comp"), CASES)  # parquet compresses inside the file
def test_every_format_and_compression_gives_the_plain_jsonl_documents(fmt, comp, tmp_path):
    want = [d["text"] for d in DOCS]
    path = _write(tmp_path / f"corpus.{fmt}", fmt, comp)
    assert _all_texts(str(path)) == want
    # And so exactly the tokens of the plain .jsonl (all documents in the training split).
    plain = _write(tmp_path / "plain.jsonl", "jsonl", "")
    bins = []
    for src in (plain, path):
        out = tmp_path / f"prep-{src.name}"
        args = ["--tokenizer", "bytes", "--val-fraction", "0", "--workers", "1", "--no-progress"]
        assert main(["prepare", str(src), "--out", str(out), *args]) == 0
        bins.append((out / "train.bin").read_bytes() + (out / "train.idx").read_bytes())
    assert bins[0] == bins[1] and len(bins[0]) > 1000
    # Compression is read from the magic bytes: the same bytes under a plain name read alike.
    if comp:
        renamed = tmp_path / f"renamed.{fmt}"
        renamed.write_bytes(path.read_bytes())
        assert formats.detect(renamed) == (comp.lstrip("."), fmt)
        assert _all_texts(str(renamed)) == want


def test_compression_does_not_change_the_split_or_the_tokens(tmp_path, capsys):
    plain = _write(tmp_path / "c.jsonl", "jsonl", "")
    (tmp_path / "z").mkdir()
    packed = _write(tmp_path / "z" / "c.jsonl", "jsonl", ".gz")
    outs = []
    for src in (plain, packed):
        out = tmp_path / f"prep-{src.name}"
        assert main(["prepare", str(src), "--out", str(out), "--tokenizer", "bytes"]) == 0
        outs.append(out)
    capsys.readouterr()
    for name in ("train.bin", "val.bin", "train.idx", "val.idx"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    assert (outs[0] / "val.idx").stat().st_size > 0 and (outs[0] / "train.bin").stat().st_size > 0


def test_a_directory_mixes_formats_and_says_what_it_skipped(tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "a.txt").write_text("plain text document")
    (d / "b.txt.xz").write_bytes(lzma.compress(b"xz text document"))
    _write(d / "c.jsonl", "jsonl", ".gz")
    _write(d / "d.json", "json", ".bz2")
    _write(d / "e.parquet", "parquet", "")
    (d / "notes.md").write_text("not a corpus file")
    texts = _all_texts(str(d))
    assert texts[:2] == ["plain text document", "xz text document"]
    assert texts[2:] == [x["text"] for x in DOCS] * 3
    assert "skipped 1 files" in capsys.readouterr().err

    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "x.md").write_text("no")
    with pytest.raises(DataError, match="holds no file lmtrain reads.*found x.md"):
        _all_texts(str(empty))


def test_what_is_not_text_is_refused_with_exit_2(tmp_path, capsys):
    rng = np.random.default_rng(0)
    cases = {
        "random.jsonl": rng.bytes(4000),  # binary named .jsonl
        "binary.txt.gz": gzip.compress(rng.bytes(4000)),  # gzip of bytes that are not text
        "fake.jsonl.gz": b"plain text, named .gz\n",  # not gzip at all
        "fake.parquet": b"not a parquet file",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        code = main(["prepare", str(tmp_path / name), "--out", str(tmp_path / f"o-{name}")])
        err = capsys.readouterr().err
        assert code == 2, name
        assert str(tmp_path / name) in err, err
        assert not (tmp_path / f"o-{name}" / "meta.json").exists()
    # A corpus file that is gzip but named .txt is decompressed, not tokenised as bytes.
    (tmp_path / "zipped.txt").write_bytes(gzip.compress(b"hello from inside gzip\n"))
    assert _all_texts(str(tmp_path / "zipped.txt")) == ["hello from inside gzip\n"]


def test_record_errors_name_the_file_and_the_record(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"text": "ok"}, {"body": "no text"}]))
    with pytest.raises(DataError, match="bad.json record 2 has no string field 'text'"):
        _all_texts(str(tmp_path / "bad.json"))
    (tmp_path / "obj.json").write_text(json.dumps({"text": "one object"}))
    with pytest.raises(DataError, match="holds a JSON dict, not a list of records"):
        _all_texts(str(tmp_path / "obj.json"))
    _write(tmp_path / "p.parquet", "parquet", "")
    cfg = DataConfig(source=str(tmp_path / "p.parquet"), val_fraction=0.0, text_key="body")
    with pytest.raises(DataError, match="has no column 'body' \\(columns: id, text\\)"):
        list(iter_documents(cfg, "train"))


# ---------------------------------------------------------------------------- hf: datasets


def test_hf_datasets_saved_to_disk_or_from_local_files(tmp_path):
    import datasets

    datasets.disable_progress_bars()
    ds = datasets.Dataset.from_list(DOCS)
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(3))}).save_to_disk(
        tmp_path / "dd"
    )
    ds.save_to_disk(tmp_path / "one")
    jsonl = _write(tmp_path / "c.jsonl", "jsonl", ".gz")
    want = [d["text"] for d in DOCS]
    assert _all_texts(f"hf:{tmp_path / 'dd'}") == want
    assert _all_texts(f"hf:{tmp_path / 'dd'}#validation") == want[:3]
    assert _all_texts(f"hf:{tmp_path / 'one'}") == want
    assert _all_texts(f"hf:json:{jsonl}") == want
    with pytest.raises(DataError, match="has splits train, validation; choose one"):
        _all_texts(f"hf:{tmp_path / 'dd'}#test")
    with pytest.raises(DataError, match="is not a dataset saved with save_to_disk"):
        _all_texts(f"hf:{tmp_path / 'missing'}")
    cfg = DataConfig(source=f"hf:{tmp_path / 'one'}", text_key="body", val_fraction=0.0)
    with pytest.raises(DataError, match="has no column 'body'"):
        list(iter_documents(cfg, "train"))


# ---------------------------------------------------------------------------- tokenizers


def _bpe_json(tmp_path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator([d["text"] for d in DOCS], trainer)
    return tk.to_str()


def test_tokenizer_directory_and_hub_name_from_the_local_cache(tmp_path, monkeypatch):
    from lmtrain import data

    text = _bpe_json(tmp_path)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    (tok_dir / "tokenizer.json").write_text(text)
    (tok_dir / "tokenizer_config.json").write_text("{}")
    src = str(_write(tmp_path / "c.jsonl", "jsonl", ""))
    by_dir = data.make_tokenizer(DataConfig(source=src, tokenizer=str(tok_dir)))
    by_file = data.make_tokenizer(DataConfig(source=src, tokenizer=str(tok_dir / "tokenizer.json")))
    assert by_dir.name == by_file.name and by_dir.vocab_size == 300
    assert by_dir.encode(DOCS[3]["text"]) == by_file.encode(DOCS[3]["text"])

    hub = tmp_path / "hub"
    snap = hub / "models--someorg--tiny-bpe" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "tokenizer.json").write_text(text)
    (hub / "models--someorg--tiny-bpe" / "refs").mkdir()
    (hub / "models--someorg--tiny-bpe" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    by_name = data.make_tokenizer(DataConfig(source=src, tokenizer="someorg/tiny-bpe"))
    assert by_name.name == by_file.name
    with pytest.raises(
        DataError, match=f"not .* HF hub name in the local cache \\(looked in {hub}"
    ):
        data.make_tokenizer(DataConfig(source=src, tokenizer="someorg/absent"))
