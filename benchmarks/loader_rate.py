"""Does the data pipeline keep up with the train step? Batches/s of the training iterator alone
against steps/s of the compiled train step, for the quickstart model and a width-64 model (the
cheapest step lmtrain runs), with concat-and-chunk, dataset decomposition, and a
three-component mixture (concat-and-chunk; stdlib 0.7, stdlib-prose 0.2 and a 40 KB slice of
the stdlib's own text 0.1 with max_epochs 50, so it runs through epochs while it is timed).

    python benchmarks/loader_rate.py [--seconds 10] [--packing concat,decompose,mixture]

The loader is timed on its own (next() on the iterator grain returns, prefetch as configured),
the step over 32 batches it produced, cycled (block_until_ready each step; under decomposition
that is its mix of bucket shapes); both after a warm-up. One JSON line per case: batches/s,
steps/s and their ratio (goal: >= 10).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = {
    "quickstart": {},
    "width64": {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2},
}
PACKINGS = {
    "concat": {},
    "decompose": {
        "data.packing": "decompose",
        "data.decompose.min_log2_len": 5,
        "data.decompose.max_log2_len": 8,
        "train.tokens_per_step": 16 * 256,
    },
    "mixture": {
        "data.mixture.code.source": "stdlib",
        "data.mixture.code.weight": 0.7,
        "data.mixture.prose.source": "stdlib-prose",
        "data.mixture.prose.weight": 0.2,
        "data.mixture.small.source": "stdlib",  # its unique_tokens: a 40k-token slice
        "data.mixture.small.weight": 0.1,
        "data.mixture.small.unique_tokens": 40_000,
        "data.mixture.small.max_epochs": 50,
    },
}


def rate(fn, seconds: float) -> float:
    fn()  # warm-up (compiles, fills prefetch)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--packing", default=",".join(PACKINGS), help="which of " + ", ".join(PACKINGS))
    args = ap.parse_args()
    import jax

    from lmtrain import config, data, run, sharding

    for case, model in CASES.items():
        for packing, sets in PACKINGS.items():
            if packing not in args.packing.split(","):
                continue
            cfg = config.override(
                config.load_experiment("experiments/quickstart.py"), {**model, **sets}
            )
            r = run.setup(cfg)
            corpus = data.load_corpus(r.cfg.data, r.tokenizer)
            td = data.make_train_data(r.cfg, corpus.train)
            it = td.iterator
            loader = rate(lambda it=it: next(it), args.seconds)
            steps, _ = run.compile_train_steps(r, td.shapes, stop_flag=False)
            state = {"s": r.init_state(), "i": 0}
            # The step over the loader's own batches (under decomposition, its mix of buckets).
            batches = [sharding.global_batch(next(it), r.mesh) for _ in range(32)]
            for b in batches:  # compile / warm every shape first
                state["s"], m = steps[b["inputs"].shape[1]](state["s"], b)
            batch = batches[0]

            def one(steps=steps, batches=batches, state=state):
                b = batches[state["i"] % len(batches)]
                state["i"] += 1
                state["s"], m = steps[b["inputs"].shape[1]](state["s"], b)
                jax.block_until_ready(m["loss"])

            stepper = rate(one, args.seconds)
            print(
                json.dumps(
                    {
                        "model": case,
                        "packing": packing,
                        "batch": list(batch["inputs"].shape),
                        "loader_batches_per_s": round(loader, 1),
                        "steps_per_s": round(stepper, 2),
                        "ratio": round(loader / stepper, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
