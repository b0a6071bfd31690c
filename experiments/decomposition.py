"""Dataset decomposition vs concat-and-chunk on the embedded corpus, at equal tokens per step.

lmtrain train experiments/decomposition.py           # decomposition, Grow-P2, 64 .. 2048 tokens
lmtrain train experiments/decomposition.py:concat    # the baseline: concat-and-chunk at 2048
lmtrain train experiments/decomposition.py:uniform   # (or :shrink) another curriculum

Both train a 2-layer transformer (width 64) on 8,192 tokens per step (4 x 2048, 128 x 64, ...) and
report validation loss at every context from 64 to 2048 (`val_loss@L`), so a model trained on
short chunks is judged at long context too. benchmarks/decomposition.py runs the pair side by
side and reports throughput and loss at equal wall time.
"""

from __future__ import annotations

from lmtrain.config import (
    Config,
    DataConfig,
    DecomposeConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)

VARIANTS = ("", "concat", "uniform", "shrink", "smoke", "concat-smoke")


def get_config(arg: str = "") -> Config:
    if arg not in VARIANTS:
        raise ValueError(f"unknown decomposition variant {arg!r}; choose from {VARIANTS}")
    smoke = arg.endswith("smoke")
    packing = "concat" if arg.startswith("concat") else "decompose"
    curriculum = arg if arg in ("uniform", "shrink") else "grow_p2"
    lo, hi = (4, 7) if smoke else (6, 11)
    return Config(
        # Small enough for a laptop CPU at 2048 tokens of context (~10 min for 300 steps).
        model=ModelConfig(
            name="transformer",
            d_model=32 if smoke else 64,
            n_layers=1 if smoke else 2,
            n_heads=2 if smoke else 1,
        ),
        data=DataConfig(
            tokenizer="bytes" if smoke else "bpe:4096",
            seq_len=1 << hi,  # the concat rows, and the main evaluation's context
            packing=packing,
            decompose=DecomposeConfig(
                min_log2_len=lo, max_log2_len=hi, curriculum=curriculum, cycles=1
            ),
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=2 if smoke else 30),
        train=TrainConfig(
            steps=6 if smoke else 300,
            tokens_per_step=(8 if smoke else 4) << hi,  # rows of the longest bucket
            log_every=1 if smoke else 10,
            eval_every=0,
            checkpoint_every=3 if smoke else 100,
        ),
        eval=EvalConfig(
            batch_size=8 if smoke else 4,
            max_batches=2 if smoke else 16,
            lengths=tuple(1 << k for k in range(lo, hi + 1)),
        ),
    )
