"""Optimizer comparison at equal compute: AdamW vs Lion vs Muon on the embedded stdlib corpus.

3 model sizes x 2 token budgets x 3 learning rates per optimizer (54 runs), bytes tokenizer,
each run's cosine schedule over its own length; the fit keeps the best lr of every (optimizer,
size, tokens) cell, fits L(N, D) per optimizer, and reports each optimizer's compute multiplier
over AdamW at equal loss (lmtrain/sweeps/compare.py). Check the time with --dry-run.

lmtrain sweep experiments/optimizers.py --dir runs/optimizers --parallel 2 --dry-run
lmtrain sweep experiments/optimizers.py --dir runs/optimizers --parallel 2
lmtrain fit runs/optimizers --by optimizer --best-lr --reference adamw
lmtrain sweep experiments/optimizers.py:smoke --dir /tmp/optimizers-smoke --parallel 2
"""

from lmtrain.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    override,
)
from lmtrain.sweeps import size_token_grid

# name -> (d_model, n_layers, n_heads); non-embedding parameters in the comment
MODELS = {
    "d48": (48, 2, 2),  # 55k
    "d64": (64, 2, 2),  # 106k
    "d96": (96, 3, 3),  # 332k
    "d16": (16, 1, 2),  # smoke
    "d32": (32, 2, 2),  # smoke
}
# Three lrs per optimizer, a factor ~3 apart around its usual value at this scale. Muon's lr is
# its hidden matrices'; its embeddings, head and norms get AdamW at 0.3 x that (the quickstart's
# ratio). Lion's lr is ~10x below AdamW's (its update has unit size per coordinate).
LRS = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "lion": (1e-4, 3e-4, 1e-3),
    "muon": (0.01, 0.03, 0.1),
}
SIZES = ("d48", "d64", "d96")
TOKENS = (0.5e6, 1.5e6)
VARIANTS = ("", "smoke")
SWEEPS = ("", "smoke")


def _size(name: str) -> dict:
    d, n_layers, n_heads = MODELS[name]
    return {"model.d_model": d, "model.n_layers": n_layers, "model.n_heads": n_heads}


def get_config(arg: str = "") -> Config:
    """The base config every run starts from (`arg` "smoke" shrinks it)."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown optimizers variant {arg!r}; choose '' or 'smoke'")
    smoke = arg == "smoke"
    seq_len, batch = (32, 8) if smoke else (128, 16)
    return Config(
        model=ModelConfig(name="transformer", d_model=64, n_layers=2, n_heads=2),
        data=DataConfig(source="stdlib", seq_len=seq_len, tokenizer="bytes"),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=5 if smoke else 20),
        train=TrainConfig(steps=100, batch_size=batch, log_every=5 if smoke else 50),
        # The same validation rows for every run: 40 x 16 x 128 = 82k bytes.
        eval=EvalConfig(batch_size=batch, max_batches=2 if smoke else 40),
    )


def get_sweep(arg: str = "") -> list[Config]:
    """ "": the full comparison; "smoke": 2 sizes x 2 token counts x 2 lrs x 3 optimizers."""
    base = get_config(arg)
    smoke = arg == "smoke"
    per_step = base.train.batch_size * base.data.seq_len
    sizes = [_size(s) for s in (("d16", "d32") if smoke else SIZES)]
    tokens = [per_step * s for s in (8, 16)] if smoke else list(TOKENS)
    out = []
    for name, lrs in LRS.items():
        for lr in lrs[:2] if smoke else lrs:
            cfg = override(base, {"optim.name": name, "optim.lr": lr})
            if name == "muon":
                cfg = override(cfg, {"optim.adam_lr_ratio": 0.3})
            out += size_token_grid(cfg, sizes, tokens)
    return out
