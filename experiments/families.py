"""Model families at equal parameters and tokens on the embedded stdlib corpus.

lmtrain sweep experiments/families.py:core --dir runs/families --parallel 2  # 3 of them
lmtrain sweep experiments/families.py --dir runs/families --parallel 2       # all six
lmtrain train experiments/families.py:mamba2                            # one of them alone

Width 128, bpe:4096, seq 256, 200 steps of 16 x 256 tokens (819k tokens), AdamW lr 3e-3,
cosine. Depths are chosen so every model has 0.82-0.85M non-embedding parameters (the
transformer at 4 layers is 0.85M): Mamba-2 blocks have no MLP (0.10M a layer) so it gets 8,
S4D 5, H3 and GLA 4, and the hybrid "MMA" x 2 (4 Mamba-2 + 2 attention layers) 6.
Compare `final_val_bpb` in SWEEP_DIR/results.csv.
"""

from __future__ import annotations

from lmtrain.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    override,
)

# label -> overrides; non-embedding parameters in the comment
FAMILIES = {
    "transformer": {"model.name": "transformer", "model.n_layers": 4},  # 0.85M
    "mamba2": {"model.name": "mamba2", "model.n_layers": 8},  # 0.82M
    "hybrid": {"model.name": "hybrid", "model.pattern": "MMA", "model.n_layers": 6},  # 0.84M
    "s4d": {"model.name": "s4d", "model.n_layers": 5},  # 0.82M
    "h3": {"model.name": "h3", "model.n_layers": 4},  # 0.85M
    "gla": {"model.name": "gla", "model.n_layers": 4},  # 0.83M
}


VARIANTS = ("", *FAMILIES, "smoke")


def get_config(arg: str = "") -> Config:
    """One family's run (`arg` names it, "" = transformer; "smoke": a seconds-long one)."""
    arg = arg or "transformer"
    smoke = arg == "smoke"
    if not smoke and arg not in FAMILIES:
        raise ValueError(f"unknown family {arg!r}; choose from {sorted(FAMILIES)} or 'smoke'")
    base = Config(
        model=ModelConfig(name="transformer", d_model=128, n_layers=4, n_heads=2),
        data=DataConfig(
            source="stdlib",
            seq_len=32 if smoke else 256,
            tokenizer="bytes" if smoke else "bpe:4096",
        ),
        optim=OptimConfig(name="adamw", lr=3e-3, warmup_steps=2 if smoke else 20),
        train=TrainConfig(
            steps=4 if smoke else 200,
            batch_size=16,
            log_every=2 if smoke else 20,
            checkpoint_every=0 if smoke else 100,
        ),
        eval=EvalConfig(batch_size=16, max_batches=2 if smoke else 40),
    )
    return base if smoke else override(base, FAMILIES[arg])


SWEEPS = {"": tuple(FAMILIES), "core": ("transformer", "mamba2", "hybrid"), "smoke": ()}


def get_sweep(arg: str = "") -> list[Config]:
    """The families of SWEEPS[arg] ("core": transformer, Mamba-2 and the hybrid); "smoke":
    a seconds-long transformer and Mamba-2."""
    if arg == "smoke":
        return [get_config("smoke"), override(get_config("smoke"), {"model.name": "mamba2"})]
    if arg not in SWEEPS:
        raise ValueError(f"unknown families sweep {arg!r}; choose from {sorted(SWEEPS)}")
    return [get_config(name) for name in SWEEPS[arg]]
