"""Median train-step time of a few model families, for comparing two trees of lmtrain side by
side (the tree on PYTHONPATH decides which lmtrain runs):

    for fam in transformer gla mamba2 hybrid; do for tree in OLD NEW; do
        PYTHONPATH=$tree python benchmarks/family_step.py $fam; done; done

d128, 4 layers, seq 256, batch 8, 4 documents per row, 2 CPU devices; median of 20 timed
steps after 5 warm-up steps. Read ratios within one run, not absolute numbers.
"""

import json
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
import jax
import numpy as np

import lmtrain
from lmtrain import config as C
from lmtrain import run as R
from lmtrain import sharding

fam = sys.argv[1]
sets = {
    "model.name": fam,
    "model.d_model": 128,
    "model.n_layers": 4,
    "model.n_heads": 4,
    "model.vocab_size": 512,
    "data.seq_len": 256,
    "data.tokenizer": "bytes",
    "train.batch_size": 8,
    "eval.batch_size": 8,
}
if fam == "hybrid":
    sets["model.pattern"] = "MA"
cfg = C.override(C.Config(), sets).validate()
run = R.setup(cfg)
steps, _ = R.compile_train_steps(run, [(8, 256)], False)
rng = np.random.default_rng(0)
local = {k: rng.integers(0, 512, (8, 256), np.int32) for k in ("inputs", "targets")}
local["segment_ids"] = np.repeat(np.arange(4, dtype=np.int32), 64)[None].repeat(8, 0)
local["positions"] = np.tile(np.arange(64, dtype=np.int32), 4)[None].repeat(8, 0)
local["weights"] = np.ones((8, 256), np.float32)
local["stop"] = np.zeros((8,), np.float32)
state = run.init_state()
batch = sharding.global_batch(local, run.mesh)
ts = []
for _ in range(25):
    t = time.perf_counter()
    state, m = steps[256](state, batch)
    jax.block_until_ready(m)
    ts.append(time.perf_counter() - t)
print(
    json.dumps(
        {
            "tree": os.path.dirname(os.path.dirname(lmtrain.__file__)),
            "family": fam,
            "median_ms": 1000 * float(np.median(ts[5:])),
        }
    )
)
