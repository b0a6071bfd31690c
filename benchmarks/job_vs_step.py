"""Where the quickstart job's time goes beside its bare train step (issue 29 item 4).

    python benchmarks/job_vs_step.py --steps 60 --rounds 2

Each variant runs in a process of its own, in turn, `--rounds` times (so slow minutes of a
shared machine fall on every variant alike); the tokenised corpus comes from the usual cache,
so run the quickstart (or this once) first. The variants, all on the quickstart's own config
(experiments/quickstart.py: its model with QK-norm and zero-init, Muon, 2 host devices):

- step-sync: the compiled train step on one real batch, each step waited for.
- step-async: the same, steps dispatched back to back and waited for at the end (the loop's
  own overlap of host and device).
- job: `lmtrain.train.train` for --steps steps, logging every 10, no checkpoint and a one-batch
  evaluation; its time per step is from the log windows after the first.
- job+ckpt: the same with a checkpoint every 20 steps.

A variant may carry config settings after a colon, "step-sync:train.loss_chunk=64" (values
as `--set` takes them). Times per step are medians (the steps), or totals over windows (the
job). Compare within one run's table only.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("step-sync", "step-async", "job", "job+ckpt")


def quickstart_config(steps: int, sets: dict):
    from lmtrain.config import override

    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "experiments/quickstart.py")
    qs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qs)
    cfg = qs.get_config("")
    base = {"train.steps": steps, "train.log_every": 10, "train.progress": False}
    return override(cfg, {**base, **sets}).validate()


def child(variant: str, steps: int) -> dict:
    import jax
    import numpy as np

    from lmtrain import data, sharding
    from lmtrain import run as run_lib
    from lmtrain import train as train_lib
    from lmtrain.config_values import parse_sets

    variant, _, extra = variant.partition(":")
    assert variant in VARIANTS, variant
    sets = parse_sets([kv for kv in extra.split(",") if kv])
    if variant.startswith("job"):
        every = 20 if variant == "job+ckpt" else 0
        sets |= {"train.checkpoint_every": every, "eval.max_batches": 1}
        cfg = quickstart_config(steps, sets)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            train_lib.train(cfg, Path(d) / "run")
            wall = time.perf_counter() - t0
            rows = [json.loads(x) for x in (Path(d) / "run" / "metrics.jsonl").open()]
        # the log windows after the first (which holds the first step's dispatch); each row's
        # tokens_per_sec is over the steps since the previous row
        rates = {r["step"]: r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r}
        windows = [(b - a, rates[b]) for a, b in itertools.pairwise(rates) if a >= 10]
        tokens_per_step = cfg.tokens_per_step()
        secs = sum(n * tokens_per_step / rate for n, rate in windows)
        return {"step_s": secs / sum(n for n, _ in windows), "wall_s": wall}
    cfg = quickstart_config(steps, sets)
    run = run_lib.setup(cfg)
    corpus = data.load_corpus(cfg.data, run.tokenizer)
    it = data.make_train_data(cfg, corpus.train, 0, 1).iterator
    local = next(it)
    local["stop"] = np.zeros((local["inputs"].shape[0],), np.float32)
    fns, _ = run_lib.compile_train_steps(run, [local["inputs"].shape])
    fn = fns[local["inputs"].shape[1]]
    state = run.init_state()
    batch = sharding.global_batch(local, run.mesh)
    for _ in range(2):  # warm-up
        state, m = fn(state, batch)
    jax.block_until_ready(m)
    if variant == "step-sync":
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            state, m = fn(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
        return {"step_s": statistics.median(times)}
    t = time.perf_counter()
    for _ in range(steps):
        state, m = fn(state, batch)
    jax.block_until_ready((state, m))
    return {"step_s": (time.perf_counter() - t) / steps}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=";".join(VARIANTS), help="KIND[:KEY=VALUE,...];...")
    p.add_argument("--child", default="")
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.steps)))
        return
    results: dict[str, list[dict]] = {}
    for _ in range(a.rounds):
        for v in a.variants.split(";"):
            cmd = [sys.executable, __file__, "--child", v, "--steps", str(a.steps)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ)
            results.setdefault(v, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(v, results[v][-1], file=sys.stderr, flush=True)
    cfg = quickstart_config(a.steps, {})
    tokens = cfg.tokens_per_step()
    from lmtrain.flops import _cpuinfo  # /proc/cpuinfo's model name, as the peak cache keys it

    machine = f"{_cpuinfo()[0]}, {os.cpu_count()} cores"
    print(f"{machine}; the quickstart step ({tokens} tokens), {a.steps} steps x {a.rounds}\n")
    base = statistics.median(r["step_s"] for r in results[a.variants.split(";")[0]])
    print("| variant | step s (each round) | tokens/s (median) | vs first |")
    print("|---|---|---|---|")
    for v, rs in results.items():
        med = statistics.median(r["step_s"] for r in rs)
        each = ", ".join(f"{r['step_s']:.3f}" for r in rs)
        print(f"| {v} | {each} | {tokens / med:,.0f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
