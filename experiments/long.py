"""Long context across chips: the scale shapes at 256k-1M tokens a row, rows split over the
mesh's `sequence` axis, for `lmtrain compile` (memory plans and collective bytes, no TPU).

lmtrain compile experiments/long.py:8b --topology v5p:4x4x4 --no-eval
lmtrain compile experiments/long.py:mamba2-2.7b --topology v5p:4x4x4 --no-eval
lmtrain compile experiments/long.py:hybrid-1.4b --topology v5p:4x4x4 --no-eval

    8b            Llama-3-8B at 262,144 tokens a row, 8 rows a step
    mamba2-2.7b   Mamba-2 2.7B at 1,048,576 tokens a row, 8 rows
    hybrid-1.4b   the 1.4B Mamba-2 / attention hybrid at 262,144 tokens a row, 8 rows

Each defaults to the mesh BENCHMARKS.md found best on v5p:4x4x4 (64 chips): one row per fsdp
group of 8 chips (fsdp 8), each row split over 8 chips (sequence 8); --set mesh.shape=...
compares others (the README's scaling section says how to choose). The model choices are
experiments/scale.py's (bf16, full remat, scanned layers, chunked loss, splash attention);
attention under a sequence split gathers K/V and runs splash's kernel for an early and a late
half-piece of queries per chip (models/sequence.py); --set model.attention_impl=xla compiles
the XLA path instead (key blocks with an online softmax, balanced the same way)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import scale  # noqa: E402

from lmtrain.config import Config, override  # noqa: E402

LONG = {"8b": 262_144, "mamba2-2.7b": 1_048_576, "hybrid-1.4b": 262_144}
VARIANTS = tuple(LONG)


def get_config(arg: str = "8b") -> Config:
    """Shape `arg` of experiments/scale.py at its long context, 8 rows, mesh (1, 8, 1, 8)."""
    arg = arg or "8b"
    if arg not in LONG:
        raise ValueError(f"unknown long-context shape {arg!r}; choose from {', '.join(LONG)}")
    sets = {
        "data.seq_len": LONG[arg],
        "train.batch_size": 8,
        "eval.batch_size": 8,
        "mesh.shape": (1, 8, 1, 8),
    }
    return override(scale.get_config(arg), sets).validate()
