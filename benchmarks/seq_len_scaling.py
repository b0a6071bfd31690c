"""Train-step throughput and peak memory versus sequence length, attention vs every mixer.

    python benchmarks/seq_len_scaling.py                         # 512 ... 16384, all models
    python benchmarks/seq_len_scaling.py --lengths 512 2048 --models attention gla

Every model has the same width (d_model 128, 2 layers, head dim 64, SwiGLU where the family
has an MLP, bytes vocabulary) and every step the same number of tokens (--tokens, default
16384: batch = tokens / seq_len), so a row's cost differences come from the sequence mixer.
Each step is the real compiled lmtrain train step (AdamW, fp32) on one device; time is the
median of --steps timed steps after one warm-up step, measured model after model at each
length so that the machine's load drifts as little as possible within a length. Peak memory
is XLA's buffer assignment for the compiled step (arguments + outputs + temporaries - aliased
donations), the figure that decides out-of-memory, read before running; a step whose
estimate is over --max-gib is reported and skipped.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")

# label -> config overrides (2 layers, width 128)
MODELS = {
    "attention": {"model.name": "transformer"},
    "based": {"model.name": "based"},
    "retnet": {"model.name": "retnet"},
    "lightning": {"model.name": "lightning"},
    "gla": {"model.name": "gla"},
    "mamba2": {"model.name": "mamba2"},
    "h3": {"model.name": "h3"},
    "s4d": {"model.name": "s4d"},
}
LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)


def measure(label: str, seq_len: int, tokens: int, steps: int, max_gib: float) -> dict:
    import jax
    import numpy as np

    from lmtrain import config, sharding
    from lmtrain import run as run_lib

    batch = max(1, tokens // seq_len)
    cfg = config.override(
        config.Config(),
        {
            **MODELS[label],
            "model.d_model": 128,
            "model.n_layers": 2,
            "model.n_heads": 2,
            "data.tokenizer": "bytes",
            "data.seq_len": seq_len,
            "train.batch_size": batch,
            "eval.batch_size": batch,
            "mesh.shape": (1, 1, 1),
        },
    )
    run = run_lib.setup(cfg)
    steps, compile_s = run_lib.compile_train_steps(run, [(batch, seq_len)], stop_flag=False)
    fn, compile_s = steps[seq_len], compile_s[seq_len]
    mem = fn.memory_analysis()
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        + mem.temp_size_in_bytes
        - mem.alias_size_in_bytes
    )
    row = {
        "model": label,
        "seq_len": seq_len,
        "batch": batch,
        "peak_gib": peak / 2**30,
        "compile_s": compile_s,
        "flops_per_token": run.cfg.model.flops_per_token(seq_len),
    }
    if peak / 2**30 > max_gib:
        return {**row, "step_s": float("nan"), "tokens_per_sec": float("nan")}
    from step_throughput import synthetic_batch  # benchmarks/ is the script's directory

    state = run.init_state()
    b = sharding.global_batch(synthetic_batch(batch, seq_len, 256), run.mesh)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        state, m = fn(state, b)
        jax.block_until_ready(m["loss"])
        if i >= 1:
            times.append(time.perf_counter() - t)
    dt = float(np.median(times))
    del state, b
    return {**row, "step_s": dt, "tokens_per_sec": batch * seq_len / dt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS))
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per step (16384)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per row (3)")
    p.add_argument("--max-gib", type=float, default=12.0, help="skip steps needing more")
    a = p.parse_args()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"{a.tokens} tokens/step, d_model 128, 2 layers, fp32, 1 device; median of "
        f"{a.steps} steps",
        flush=True,
    )
    rows = []
    for seq_len in a.lengths:
        for label in a.models:
            r = measure(label, seq_len, a.tokens, a.steps, a.max_gib)
            rows.append(r)
            print(
                f"  {label:10s} L={seq_len:6d} {r['tokens_per_sec']:10,.0f} tok/s "
                f"{r['peak_gib']:7.3f} GiB (compile {r['compile_s']:.1f}s)",
                flush=True,
            )
    att = {r["seq_len"]: r for r in rows if r["model"] == "attention"}
    print("\n| model | seq len | batch | tokens/s | vs attention | peak GiB | vs attention |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (a.models.index(r["model"]), r["seq_len"])):
        ref = att.get(r["seq_len"])
        speed = r["tokens_per_sec"] / ref["tokens_per_sec"] if ref else float("nan")
        mem = r["peak_gib"] / ref["peak_gib"] if ref else float("nan")
        print(
            f"| {r['model']} | {r['seq_len']} | {r['batch']} | {r['tokens_per_sec']:,.0f} | "
            f"{speed:.2f}x | {r['peak_gib']:.3f} | {mem:.2f}x |"
        )


if __name__ == "__main__":
    main()
