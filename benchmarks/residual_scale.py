"""How large each block's contribution to the residual stream is, checkpoint by checkpoint: the
RMS of the token embeddings and of what each block adds (mixer plus MLP), on a fixed batch of
random tokens. Written to locate why the Mamba-2 + attention hybrid ("MA") does not learn MQAR
where attention alone does (BENCHMARKS.md, "The width-64 frontier"):

    lmtrain train experiments/mqar.py:guard --workdir runs/probe-MA --set model.n_heads=1 \\
        --set model.name=hybrid --set model.pattern=MA \\
        --set train.checkpoint_every=5 --set train.keep_checkpoints=60
    python benchmarks/residual_scale.py runs/probe-MA [EVERY]   # every EVERY-th checkpoint
"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain import run as run_lib


def rms(a) -> float:
    return float(jnp.sqrt(jnp.mean(jnp.square(a))))


def main(workdir: str, every: int = 1) -> None:
    wd = Path(workdir)
    steps = sorted(int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps[::every]:
        run, params, _ = run_lib.restore_params(wd, step=step)
        model = nnx.merge(run.graphdef, params)
        B, L = 8, run.cfg.data.seq_len
        tokens = np.random.default_rng(0).integers(0, run.cfg.model.vocab_size, (B, L))
        x = model.token_embed(jnp.asarray(tokens, jnp.int32))
        segments = jnp.ones((B, L), jnp.int32)
        positions = jnp.broadcast_to(jnp.arange(L), (B, L))
        cols = [f"step {step:5d}", f"embeddings {rms(x):.4f}"]
        for i, block in enumerate(model.blocks):
            y, _ = block(x, segments, positions)
            cols.append(f"block {i} ({block.mixer_name}) +{rms(y - x):.4f}")
            x = y
        print("  ".join(cols), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
