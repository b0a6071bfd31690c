"""Quickstart: a small Llama-style transformer on the embedded stdlib corpus (~4.5 min, 2 cores).

lmtrain train experiments/quickstart.py            # the README's main job
lmtrain train experiments/quickstart.py:smoke      # seconds; used by the tests

The main job's recipe (BENCHMARKS.md, "Quickstart"): an 8k byte-level BPE, Muon (lr 0.03) on
the hidden matrices with AdamW at the same lr on embeddings, head and norms, QK-norm and
zero-initialised residual outputs, 270 steps of 16 x 256 tokens, then bits per byte on the
whole validation split, below gzip -9's 1.606 on the same text. The smoke variant keeps the
plain AdamW byte-level recipe its golden losses were recorded with.
"""

from lmtrain.config import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig
from lmtrain.models.transformer import Config as TransformerConfig

# arg -> (d_model, n_layers, n_heads, seq_len, batch_size, steps)
SIZES = {
    "": (192, 3, 3, 256, 16, 270),
    "smoke": (32, 2, 2, 32, 8, 20),
}
VARIANTS = tuple(SIZES)


def get_config(arg: str = "") -> Config:
    """The quickstart config; `arg` picks a size from SIZES."""
    if arg not in SIZES:
        raise ValueError(f"unknown quickstart variant {arg!r}; choose from {sorted(SIZES)}")
    d_model, n_layers, n_heads, seq_len, batch, steps = SIZES[arg]
    if arg == "smoke":
        model = ModelConfig(name="transformer", d_model=d_model, n_layers=n_layers, n_heads=n_heads)
        optim = OptimConfig(name="adamw", lr=3e-3, warmup_steps=5)
    else:
        model = TransformerConfig(
            name="transformer", d_model=d_model, n_layers=n_layers, n_heads=n_heads,
            qk_norm=True, zero_init=True,
        )  # fmt: skip
        optim = OptimConfig(name="muon", lr=0.03, adam_lr_ratio=1.0, warmup_steps=20)
    smoke = arg == "smoke"
    return Config(
        model=model,
        data=DataConfig(
            source="stdlib", seq_len=seq_len, tokenizer="bytes" if smoke else "bpe:8192"
        ),
        optim=optim,
        train=TrainConfig(
            steps=steps,
            batch_size=batch,
            log_every=5 if smoke else 20,
            eval_every=10 if smoke else 0,  # 0: evaluate once, at the end
            checkpoint_every=10 if smoke else 90,
        ),
        # The main job ends with the whole validation split (0: every batch), ~10 s.
        eval=EvalConfig(batch_size=batch, max_batches=2 if smoke else 0),
    )
