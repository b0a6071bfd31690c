"""Train-step time and per-device temporary memory of one 16,384-token row, unsplit on one
device against split over 8 fake CPU devices on the sequence axis (mesh (1, 1, 1, 8)):

    python benchmarks/sequence_split.py gla [LENGTH]
    python benchmarks/sequence_split.py transformer 8192

d128, 2 layers, 4 heads, vocab 512, batch 1, 16 documents; median of 5 timed steps after 2
warm-up steps. A side that runs out of memory is reported as such (the unsplit transformer at
16,384 tokens asks XLA:CPU for 30 GB: its dense [L, L] scores). The 8 fake devices share this
machine's cores, so the split's time shows what the split adds in work and overhead (K/V
gathers, the state pass, the replay), not a speedup; its memory per device is what a real
8-chip split would hold. Read ratios within one run.
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax
import numpy as np

from lmtrain import config as C
from lmtrain import run as R
from lmtrain import sharding

fam = sys.argv[1]
L = int(sys.argv[2]) if len(sys.argv) > 2 else 16_384
out = {"family": fam, "seq_len": L, "cpu": platform.processor() or platform.machine()}
for name, shape in (("unsplit", (1, 1, 1, 1)), ("split8", (1, 1, 1, 8))):
    sets = {
        "model.name": fam,
        "model.d_model": 128,
        "model.n_layers": 2,
        "model.n_heads": 4,
        "model.vocab_size": 512,
        "data.seq_len": L,
        "data.tokenizer": "bytes",
        "train.batch_size": 1,
        "eval.batch_size": 1,
        "train.loss_chunk": 1024,
        "mesh.shape": shape,
    }
    cfg = C.override(C.Config(), sets).validate()
    run = R.setup(cfg)
    steps, _ = R.compile_train_steps(run, [(1, L)], False)
    rng = np.random.default_rng(0)
    local = {k: rng.integers(0, 512, (1, L), np.int32) for k in ("inputs", "targets")}
    local["segment_ids"] = np.repeat(np.arange(16, dtype=np.int32), L // 16)[None] + 1
    local["positions"] = np.tile(np.arange(L // 16, dtype=np.int32), 16)[None]
    local["weights"] = np.ones((1, L), np.float32)
    local["stop"] = np.zeros((1,), np.float32)
    state = run.init_state()
    batch = sharding.global_batch(local, run.mesh)
    mem = steps[L].memory_analysis()
    ts = []
    try:
        for _ in range(7):
            t = time.perf_counter()
            state, m = steps[L](state, batch)
            jax.block_until_ready(m)
            ts.append(time.perf_counter() - t)
    except jax.errors.JaxRuntimeError as e:
        out[name] = {"error": str(e).splitlines()[0][:120]}
        out[name]["temp_mib_per_device"] = round(mem.temp_size_in_bytes / 2**20, 1)
        continue
    out[name] = {
        "step_s": round(float(np.median(ts[2:])), 3),
        "temp_mib_per_device": round(mem.temp_size_in_bytes / 2**20, 1),
        "loss": round(float(m["loss"]), 5),
    }
if "error" not in out["unsplit"]:
    out["time_ratio"] = round(out["split8"]["step_s"] / out["unsplit"]["step_s"], 2)
out["temp_ratio"] = round(
    out["split8"]["temp_mib_per_device"] / out["unsplit"]["temp_mib_per_device"], 3
)
print(json.dumps(out))
