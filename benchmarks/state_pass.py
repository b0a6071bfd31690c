"""The two ways a sequence split combines the linear/SSM states (lmtrain.models.sequence,
STATE_PASS): a prefix scan over ppermute ("scan", the default) against LASP-2's all-gather of
every device's map and a local scan ("gather"). For each, the bytes one device moves per train
step through collectives (read from the compiled HLO by lmtrain.hlo) and the step time, on
fake CPU devices:

    python benchmarks/state_pass.py [FAMILY] [DEVICES]    # default: mamba2 8

One layer of Mamba-2 2.7B's mixer shape (d_model 2560, 80 heads of 64, state 128; vocabulary
512), one row of 256 tokens per device, mesh (1, 1, 1, n). The state is what travels:
[rows, 80, 64, 128] float32, 2.6 MB a row, twice (the map's A and b). The parameters'
gradient all-reduce over the sequence axis is the same in both; read the state-pass kinds
(collective-permute for "scan", all-gather for "gather"). Time on fake devices sharing the
cores is a sanity figure, not a speedup: the cost on chips is the bytes at the interconnect's
bandwidth plus a latency per round (log2 n + 1 rounds for "scan", one collective for
"gather").
"""

import json
import os
import sys
import time

os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=" + (sys.argv[2:3] or ["8"])[0]
)
import jax
import numpy as np

from lmtrain import config as C
from lmtrain import hlo, sharding
from lmtrain import run as R
from lmtrain.models import sequence

fam = sys.argv[1] if len(sys.argv) > 1 else "mamba2"
n_dev = int((sys.argv[2:3] or ["8"])[0])
L = 256 * n_dev
out = {"family": fam, "devices": n_dev, "seq_len": L}
for how in ("scan", "gather"):
    sequence.STATE_PASS = how
    sets = {
        "model.name": fam,
        "model.d_model": 2560,
        "model.n_layers": 1,
        "model.n_heads": 80,
        "model.vocab_size": 512,
        "data.seq_len": L,
        "data.tokenizer": "bytes",
        "train.batch_size": 1,
        "eval.batch_size": 1,
        "mesh.shape": (1, 1, 1, n_dev),
    }
    if fam == "mamba2":
        sets["model.state_size"] = 128
    cfg = C.override(C.Config(), sets).validate()
    run = R.setup(cfg)
    steps, _ = R.compile_train_steps(run, [(1, L)], False)
    moved = hlo.collective_bytes(steps[L].as_text())
    rng = np.random.default_rng(0)
    local = {k: rng.integers(0, 512, (1, L), np.int32) for k in ("inputs", "targets")}
    local["segment_ids"] = np.repeat(np.arange(4, dtype=np.int32), L // 4)[None] + 1
    local["positions"] = np.tile(np.arange(L // 4, dtype=np.int32), 4)[None]
    local["weights"] = np.ones((1, L), np.float32)
    local["stop"] = np.zeros((1,), np.float32)
    state = run.init_state()
    batch = sharding.global_batch(local, run.mesh)
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        state, m = steps[L](state, batch)
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t)
    out[how] = {
        "MB": {k: round(v / 1e6, 2) for k, v in moved.items() if k != "unknown_trips" and v},
        "step_s": round(float(np.median(ts[1:])), 3),
        "loss": round(float(m["loss"]), 5),
    }
print(json.dumps(out))
