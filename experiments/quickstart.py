"""Quickstart: a small Llama-style transformer on the embedded stdlib corpus (~5 min, 2 cores).

lmtrain train experiments/quickstart.py            # the README's main job
lmtrain train experiments/quickstart.py:smoke      # seconds; used by the tests
"""

from lmtrain.config import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig

# arg -> (d_model, n_layers, n_heads, seq_len, batch_size, steps)
SIZES = {
    "": (256, 3, 4, 256, 16, 200),
    "smoke": (32, 2, 2, 32, 8, 20),
}
VARIANTS = tuple(SIZES)


def get_config(arg: str = "") -> Config:
    """The quickstart config; `arg` picks a size from SIZES."""
    if arg not in SIZES:
        raise ValueError(f"unknown quickstart variant {arg!r}; choose from {sorted(SIZES)}")
    d_model, n_layers, n_heads, seq_len, batch, steps = SIZES[arg]
    smoke = arg == "smoke"
    return Config(
        model=ModelConfig(name="transformer", d_model=d_model, n_layers=n_layers, n_heads=n_heads),
        data=DataConfig(
            source="stdlib", seq_len=seq_len, tokenizer="bytes" if smoke else "bpe:4096"
        ),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=5 if smoke else 20),
        train=TrainConfig(
            steps=steps,
            batch_size=batch,
            log_every=5 if smoke else 20,
            eval_every=10 if smoke else 0,  # 0: evaluate once, at the end
            checkpoint_every=10 if smoke else 60,
        ),
        eval=EvalConfig(batch_size=batch, max_batches=2 if smoke else 10),
    )
