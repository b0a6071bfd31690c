"""lmtrain's model FLOPs against XLA's count of the compiled train step, per model family.

    python benchmarks/flop_count.py

Each family at d_model 256, 4 layers, 8 heads, vocabulary 4096, sequence 512, batch 8, on one
CPU device, no remat, no scan, no loss chunks: XLA's `cost_analysis()["flops"]` of the whole
compiled train step (forward, backward, optimizer) against `flops_per_token(512) x tokens`.
XLA counts every op (norms, softmax, optimizer), so a ratio a little above 1 is expected. XLA
counts a while-loop body once whatever its trip count, so a family whose mixer loops over
chunks or steps (the `loops` column: while ops in the optimised HLO) is undercounted by XLA:
its ratio is a lower bound.
"""

from __future__ import annotations

import json
import os
import re

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

FAMILIES = {
    "transformer": {},
    "based": {},
    "retnet": {},
    "lightning": {},
    "gla": {},
    "s4d": {},
    "h3": {},
    "mamba2": {},
    "hybrid": {"model.pattern": "MA"},
}


def main() -> list[dict]:
    from lmtrain import config as config_lib
    from lmtrain import flops
    from lmtrain import run as run_lib

    B, L = 8, 512
    rows = []
    for name, extra in FAMILIES.items():
        sets = {
            "model.name": name,
            "model.d_model": 256,
            "model.n_layers": 4,
            "model.n_heads": 8,
            "model.vocab_size": 4096,
            "data.tokenizer": "bytes",
            "data.seq_len": L,
            "train.batch_size": B,
            "eval.batch_size": B,
            "mesh.shape": (1, 1, 1),
            **extra,
        }
        cfg = config_lib.override(config_lib.Config(), sets)
        run = run_lib.setup(cfg)
        compiled = run_lib.compile_train_steps(run, [(B, L)], stop_flag=False)[0][L]
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        loops = len(re.findall(r"\bwhile\(", compiled.as_text()))
        model = flops.train_flops_per_token(run.cfg.model, L) * B * L
        row = {
            "family": name,
            "params_m": round(run.n_params / 1e6, 2),
            "model_gflops": round(model / 1e9, 2),
            "xla_gflops": round(cost["flops"] / 1e9, 2),
            "ratio": round(cost["flops"] / model, 3),
            "loops": loops,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
