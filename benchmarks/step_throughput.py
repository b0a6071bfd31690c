"""Train-step throughput on this machine: tokens/s and MFU per (model size, dtype, CPU devices).

    python benchmarks/step_throughput.py            # the sweep, one subprocess per device count
    python benchmarks/step_throughput.py --child 8  # one device count (used by the sweep)
    # the quickstart's shape and optimizer, f32 vs bf16 on 2 devices:
    python benchmarks/step_throughput.py --models d192-L3:192:3:3 --vocab 8192 --batch 16 \
        --optim muon --devices 2
    # XLA:CPU options side by side (NAME=FLAGS;...; each in its own process):
    python benchmarks/step_throughput.py ... --variants "default=;onednn=--xla_cpu_use_onednn=true"

Each configuration runs the real compiled train step (lmtrain.step) on synthetic batches of the
quickstart shape; figures are medians of timed steps after warm-up. On a shared, noisy machine
read the ratios between rows of ONE run, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

# (name, d_model, n_layers, n_heads)
MODELS = [("d256-L4", 256, 4, 4), ("d192-L4", 192, 4, 4), ("d128-L4", 128, 4, 4)]
DTYPES = ["float32", "bfloat16"]
DEVICE_COUNTS = [1, 2, 8]


def synthetic_batch(batch: int, seq_len: int, vocab: int) -> dict:
    """A host batch of random tokens, one document per row, every target weighted."""
    import numpy as np

    rng = np.random.default_rng(0)
    local = {k: rng.integers(0, vocab, (batch, seq_len), np.int32) for k in ("inputs", "targets")}
    local["segment_ids"] = np.ones((batch, seq_len), np.int32)
    local["positions"] = np.tile(np.arange(seq_len, dtype=np.int32), (batch, 1))
    local["weights"] = np.ones((batch, seq_len), np.float32)
    return local


def time_steps(fn, state, batch, steps: int, warmup: int = 2):
    """(median seconds per step over `steps` timed steps after `warmup`, state, metrics)."""
    import jax
    import numpy as np

    times = []
    for i in range(steps + warmup):
        t = time.perf_counter()
        state, m = fn(state, batch)
        jax.block_until_ready(m["loss"])
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return float(np.median(times)), state, m


def child(
    n_devices: int, steps: int, batch: int, seq_len: int, vocab: int, models=MODELS, optim="adamw"
) -> list[dict]:
    extra = os.environ.get("STEP_XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = f"{extra} --xla_force_host_platform_device_count={n_devices}".strip()
    import jax

    from lmtrain import config, flops, sharding
    from lmtrain import run as run_lib

    peak, _ = flops.peak_flops(jax.devices()[:1], "float32")
    rows = []
    for name, d, n_layers, n_heads in models:
        for dtype in DTYPES:
            cfg = config.override(
                config.Config(),
                {
                    "model.name": "transformer",
                    "model.d_model": d,
                    "model.n_layers": n_layers,
                    "model.n_heads": n_heads,
                    "model.dtype": dtype,
                    "model.vocab_size": vocab,
                    "data.tokenizer": "bytes",
                    "data.seq_len": seq_len,
                    "train.batch_size": batch,
                    "eval.batch_size": batch,
                    "optim.name": optim,
                },
            )
            run = run_lib.setup(cfg)
            state = run.init_state()
            steps_, secs = run_lib.compile_train_steps(run, [(batch, seq_len)], stop_flag=False)
            fn, compile_s = steps_[seq_len], secs[seq_len]
            b = sharding.global_batch(synthetic_batch(batch, seq_len, vocab), run.mesh)
            dt, state, m = time_steps(fn, state, b, steps)
            tok_s = batch * seq_len / dt
            fpt = run.cfg.model.flops_per_token(seq_len)
            rows.append(
                {
                    "model": name,
                    "dtype": dtype,
                    "devices": n_devices,
                    "params_M": run.n_params / 1e6,
                    "step_s": dt,
                    "tokens_per_sec": tok_s,
                    "mfu": flops.mfu(tok_s, fpt, peak),
                    "compile_s": compile_s,
                    "peak_gflops": peak / 1e9,
                }
            )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", type=int, default=0, help="run one device count and print JSON")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument(
        "--models",
        default=",".join(f"{m[0]}:{m[1]}:{m[2]}:{m[3]}" for m in MODELS),
        help="NAME:D_MODEL:N_LAYERS:N_HEADS,... (default: the three of MODELS)",
    )
    p.add_argument("--devices", default=",".join(map(str, DEVICE_COUNTS)))
    p.add_argument("--optim", default="adamw", help="optim.name: adamw, lion, muon")
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--variants", default="default=", help="NAME=XLA_FLAGS;... (one process each)")
    a = p.parse_args()
    DTYPES[:] = a.dtypes.split(",")
    models = [(m.split(":")[0], *map(int, m.split(":")[1:])) for m in a.models.split(",")]
    if a.child:
        rows = child(a.child, a.steps, a.batch, a.seq_len, a.vocab, models, a.optim)
        print(json.dumps(rows))
        return
    rows = []
    variants = [v.split("=", 1) for v in a.variants.split(";") if v.strip()]
    for name, xla in variants:
        for n in map(int, a.devices.split(",")):
            flags = ["--steps", str(a.steps), "--batch", str(a.batch), "--seq-len", str(a.seq_len)]
            flags += ["--vocab", str(a.vocab), "--models", a.models, "--optim", a.optim]
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(n), *flags, "--dtypes", a.dtypes],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "STEP_XLA_FLAGS": xla},
            )
            rows += [r | {"variant": name} for r in json.loads(out.stdout.strip().splitlines()[-1])]
    first = min(r["devices"] for r in rows)
    base = {
        (r["model"], r["dtype"]): r["tokens_per_sec"]
        for r in rows
        if r["devices"] == first and r["variant"] == variants[0][0]
    }
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"batch {a.batch} x seq {a.seq_len}, vocab {a.vocab}, {a.optim}; median of {a.steps} "
        f"steps\n"
    )
    vs = f"{variants[0][0]}, {first} dev"
    print(f"| variant | model | params | dtype | CPU devices | step s | tokens/s | vs {vs} | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["tokens_per_sec"] / base[(r["model"], r["dtype"])]
        print(
            f"| {r['variant']} | {r['model']} | {r['params_M']:.2f}M | {r['dtype']} | "
            f"{r['devices']} | {r['step_s']:.3f} | {r['tokens_per_sec']:,.0f} | {ratio:.2f}x | "
            f"{r['mfu']:.0%} |"
        )
    for name, xla in variants:
        print(f"{name}: XLA_FLAGS={xla or '(none)'}")


if __name__ == "__main__":
    main()
