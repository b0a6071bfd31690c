"""`data.source="hf:..."`: a Hugging Face `datasets` dataset as a corpus (the data extra).

    hf:DIR                 a dataset saved with `save_to_disk` (a DatasetDict's "train" split)
    hf:DIR#SPLIT           another split of a saved DatasetDict
    hf:BUILDER:FILES       local files through a datasets builder (json, parquet, text, csv),
                           e.g. hf:parquet:/data/fineweb/*.parquet

Nothing is downloaded. Document i (1-based) of the dataset has key "hf:i"; its text is the
`data.text_key` column. The dataset's own fingerprint is the cache key.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lmtrain.errors import DataError

BUILDERS = ("json", "parquet", "text", "csv")


def is_hf(source: str) -> bool:
    return source.startswith("hf:")


@functools.lru_cache(maxsize=4)
def load(source: str) -> Any:
    """The `datasets.Dataset` a hf: source names."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"data.source={source!r} needs the data extra: pip install 'lmtrain[data]'"
        ) from None
    datasets.disable_progress_bars()
    spec = source[3:]
    builder, colon, files = spec.partition(":")
    if colon and builder in BUILDERS:
        try:
            return datasets.load_dataset(builder, data_files=files, split="train")
        except FileNotFoundError as e:
            raise DataError(f"data.source={source!r}: {e}") from None
    path, _, split = spec.partition("#")
    if not Path(path).expanduser().is_dir():
        raise DataError(
            f"data.source={source!r}: {path} is not a dataset saved with save_to_disk; for "
            f"local files use hf:BUILDER:FILES with BUILDER one of {', '.join(BUILDERS)}"
        )
    try:
        ds = datasets.load_from_disk(str(Path(path).expanduser()))
    except FileNotFoundError as e:
        raise DataError(f"data.source={source!r}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError(
                f"data.source={source!r} has splits {', '.join(ds)}; "
                f"choose one with hf:{path}#SPLIT"
            )
        ds = ds[name]
    elif split:
        raise DataError(f"data.source={source!r}: {path} is one dataset, not a DatasetDict")
    return ds


def documents(
    source: str, text_key: str, want: Callable[[str], bool] | None = None, keys_only: bool = False
) -> Iterator[tuple[str, str]]:
    ds = load(source)
    if text_key not in ds.column_names:
        raise DataError(
            f"data.source={source!r} has no column {text_key!r} (columns: "
            f"{', '.join(ds.column_names)}); set data.text_key"
        )
    if keys_only:
        yield from ((f"hf:{i}", "") for i in range(1, len(ds) + 1))
        return
    i = 0
    for batch in ds.select_columns([text_key]).iter(batch_size=1024):
        for text in batch[text_key]:
            i += 1
            key = f"hf:{i}"
            if want is not None and not want(key):
                continue
            if not isinstance(text, str):
                raise DataError(f"data.source={source!r} row {i}: {text_key!r} is not a string")
            yield key, text


def fingerprint(source: str) -> str:
    return f"hf-{load(source)._fingerprint}"


def nbytes(source: str) -> int:
    ds = load(source)
    return int(ds.data.nbytes)
