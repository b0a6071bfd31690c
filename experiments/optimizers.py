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

from pathlib import Path

from lmtrain.config import Config, load_module, override
from lmtrain.sweeps import size_token_grid

# The scaling-law sweep's base config and model sizes (bytes, batch 16 x 128, the same 40
# validation batches for every run), so the two sweeps' losses compare directly.
SCALING, _ = load_module(str(Path(__file__).with_name("scaling.py")), "get_config")
# Three lrs per optimizer, a factor ~3 apart around its usual value at this scale. Muon's lr is
# its hidden matrices'; its embeddings, head and norms get AdamW at 0.3 x that lr. Lion's lr is
# ~10x below AdamW's (its update has unit size per coordinate).
LRS = {
    "adamw": (1e-3, 3e-3, 1e-2),
    "lion": (1e-4, 3e-4, 1e-3),
    "muon": (0.01, 0.03, 0.1),
}
SIZES = ("d48", "d64", "d96")  # 55.5k, 107k, 332k non-embedding parameters
TOKENS = (0.5e6, 1.5e6)
VARIANTS = ("", "smoke")
SWEEPS = ("", "smoke")


def get_config(arg: str = "") -> Config:
    """The base config every run starts from: scaling.py's (`arg` "smoke" shrinks it)."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown optimizers variant {arg!r}; choose '' or 'smoke'")
    return SCALING.get_config(arg)


def get_sweep(arg: str = "") -> list[Config]:
    """ "": the full comparison; "smoke": 2 sizes x 2 token counts x 2 lrs x 3 optimizers."""
    base = get_config(arg)
    smoke = arg == "smoke"
    per_step = base.train.batch_size * base.data.seq_len
    sizes = [SCALING._size(s) for s in (("d16", "d32") if smoke else SIZES)]
    tokens = [per_step * s for s in (8, 16)] if smoke else list(TOKENS)
    out = []
    for name, lrs in LRS.items():
        for lr in lrs[:2] if smoke else lrs:
            cfg = override(base, {"optim.name": name, "optim.lr": lr})
            if name == "muon":
                cfg = override(cfg, {"optim.adam_lr_ratio": 0.3})
            out += size_token_grid(cfg, sizes, tokens)
    return out
