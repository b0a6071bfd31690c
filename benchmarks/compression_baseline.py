"""Bits per byte of gzip and xz on a source's validation split: a floor any LM should beat.

Usage (from the repository root):
    python -m benchmarks.compression_baseline [--source stdlib] [--val-fraction 0.05]
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import os
import platform
import sys
import time
from collections.abc import Callable

from lmtrain.config import DataConfig
from lmtrain.data import iter_documents

CODECS: dict[str, Callable[[bytes], bytes]] = {
    "gzip -9": lambda b: gzip.compress(b, compresslevel=9, mtime=0),
    "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
}


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    """Prints a markdown table of compressed bits per byte."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default="stdlib")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--text-key", default="text")
    args = p.parse_args()
    cfg = DataConfig(source=args.source, val_fraction=args.val_fraction, text_key=args.text_key)
    docs = [text.encode("utf-8") for _, text in iter_documents(cfg, "val") if text]
    if not docs:
        sys.exit(f"the validation split of {args.source!r} is empty")
    joined = b"".join(docs)
    n = len(joined)
    print(f"command: `python -m benchmarks.compression_baseline {' '.join(sys.argv[1:])}`  ")
    print(f"machine: {_machine()}  ")
    print(f"validation split: {len(docs)} documents, {n:,} bytes ({n / 1e6:.2f} MB)\n")
    print("| codec | bits/byte (concatenated) | bits/byte (each doc alone) | time (s) |")
    print("|---|---|---|---|")
    for name, compress in CODECS.items():
        t0 = time.perf_counter()
        whole = len(compress(joined))
        each = sum(len(compress(d)) for d in docs)
        secs = time.perf_counter() - t0
        print(f"| {name} | {8 * whole / n:.3f} | {8 * each / n:.3f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
