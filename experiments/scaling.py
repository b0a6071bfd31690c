"""Scaling-law sweep: an IsoFLOP grid of small transformers on the embedded stdlib corpus.

3 compute budgets x 4 model sizes, bytes tokenizer, C = 6 N D with N non-embedding parameters
(see lmtrain/sweeps/planning.py). About 25 minutes with --parallel 2 on 2 CPU cores (check
--dry-run).

lmtrain sweep experiments/scaling.py --dir runs/scaling --parallel 2 --dry-run
lmtrain sweep experiments/scaling.py --dir runs/scaling --parallel 2
lmtrain sweep experiments/scaling.py:heldout --dir runs/scaling-heldout
lmtrain fit runs/scaling --holdout runs/scaling-heldout    # predicted vs measured, held out
lmtrain sweep experiments/scaling.py:smoke --dir /tmp/scaling-smoke --parallel 2   # seconds
lmtrain train experiments/scaling.py                       # the base config alone
"""

from lmtrain.config import Config, DataConfig, EvalConfig, ModelConfig, OptimConfig, TrainConfig
from lmtrain.sweeps import isoflop_grid, size_token_grid

# name -> (d_model, n_layers, n_heads); non-embedding parameters in the comment
MODELS = {
    "d48": (48, 2, 2),  # 55k
    "d64": (64, 2, 2),  # 106k
    "d96": (96, 3, 3),  # 332k
    "d128": (128, 4, 4),  # 852k
    "d192": (192, 4, 4),  # 1.77M: only in the held-out run
    "d16": (16, 1, 2),  # smoke
    "d32": (32, 2, 2),  # smoke
}
VARIANTS = ("", "smoke", "heldout")  # get_config
SWEEPS = ("", "smoke", "heldout")  # get_sweep
BUDGETS = (6e11, 1.8e12, 5.4e12)  # C = 6 N D; each 3x the last
SWEEP_SIZES = ("d48", "d64", "d96", "d128")
# Larger than every sweep run in N (2x) and in C (2.2x): a test of extrapolation.
HELDOUT = ("d192", 1.2e13)


def _size(name: str) -> dict:
    d, n_layers, n_heads = MODELS[name]
    return {"model.d_model": d, "model.n_layers": n_layers, "model.n_heads": n_heads}


def get_config(arg: str = "") -> Config:
    """The base config every run starts from (`arg` "smoke" shrinks it)."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown scaling variant {arg!r}; choose '', 'smoke' or 'heldout'")
    smoke = arg == "smoke"
    seq_len, batch = (32, 8) if smoke else (128, 16)
    return Config(
        model=ModelConfig(name="transformer", d_model=64, n_layers=2, n_heads=2),
        data=DataConfig(source="stdlib", seq_len=seq_len, tokenizer="bytes"),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=5 if smoke else 20),
        train=TrainConfig(steps=100, batch_size=batch, log_every=5 if smoke else 20),
        # The same validation rows for every run: 40 x 16 x 128 = 82k bytes.
        eval=EvalConfig(batch_size=batch, max_batches=2 if smoke else 40),
    )


def get_sweep(arg: str = "") -> list[Config]:
    """ "": the IsoFLOP grid; "heldout": one larger run; "smoke": 2 sizes x 3 token counts."""
    base = get_config(arg)
    if arg == "smoke":
        tokens_per_step = base.train.batch_size * base.data.seq_len
        return size_token_grid(
            base, [_size("d16"), _size("d32")], [tokens_per_step * s for s in (8, 16, 24)]
        )
    if arg == "heldout":
        name, budget = HELDOUT
        return isoflop_grid(base, [budget], [_size(name)])
    return isoflop_grid(base, BUDGETS, [_size(s) for s in SWEEP_SIZES])
