"""Causal load balancing of split attention: the forward + backward time of one row's
attention over the sequence axis on 8 fake CPU devices, with balanced_attention (each device
attends for an early and a late half-piece and skips the key blocks after them) against
blocked_attention (every device visits every key block), in one process:

    python benchmarks/balanced_attention.py [LENGTH]

Batch 1, 4 heads of 32 (the d128 model of benchmarks/sequence_split.py), 16 documents. Both
sides use the same blocks, a half-piece of queries by a half-piece of keys (S / 16 each), so
they differ only in the key blocks they visit. The 8 fake devices share this
machine's cores, so a step's time is the sum of the devices' work: the ratio is the work the
balancing saves, (2n + 1) / 4n of the score blocks in theory (0.53 at n = 8), plus the two
ppermutes it adds. Median of 5 timed steps after 2 warm-up steps; read ratios within one run.
"""

import json
import os
import platform
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lmtrain.models import sequence

S = int(sys.argv[1]) if len(sys.argv) > 1 else 16_384
n, B, H, K = 8, 1, 4, 32
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=(B, S, H, K)), jnp.float32) for _ in range(3))
seg = jnp.asarray(np.repeat(np.arange(16, dtype=np.int32), S // 16)[None] + 1)
mesh = jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))
rows = P(None, "sequence")
out = {"seq_len": S, "devices": n, "cpu": platform.processor() or platform.machine()}
sequence.DENSE_MAX = 0  # the blocked paths at any length
sequence.Q_BLOCK = sequence.KV_BLOCK = S // n // 2
for balance in (True, False):
    sequence.BALANCE = balance

    def local(q, k, v, seg):
        return sequence.gathered_attention(q, k, v, seg, "xla")

    attend = jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows, check_vma=False)
    with jax.set_mesh(mesh):
        step = jax.jit(
            jax.value_and_grad(lambda q, k, v, f=attend: f(q, k, v, seg).sum(), (0, 1, 2))
        )
        t0 = time.perf_counter()
        compiled = step.lower(q, k, v).compile()
        compile_s = time.perf_counter() - t0
        ts = []
        for _ in range(7):
            t0 = time.perf_counter()
            val, _ = jax.block_until_ready(compiled(q, k, v))
            ts.append(time.perf_counter() - t0)
    name = "balanced" if balance else "every_block"
    out[name] = {"step_s": float(np.median(ts[2:])), "compile_s": compile_s, "sum": float(val)}
out["ratio"] = out["balanced"]["step_s"] / out["every_block"]["step_s"]
out["theory"] = (2 * n + 1) / (4 * n)
print(json.dumps(out, indent=1))
