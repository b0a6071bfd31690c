"""Stress for the whole-split evaluation hang (issue 29 item 6): the quickstart model's eval step
over every batch of the validation split, on 2 host devices, again and again, each evaluation
under a watchdog that dumps every thread's stack and exits 1 if it takes longer than --bound.

    python benchmarks/eval_stress.py [--mode queued|bounded] [--evals 50] [--bound 120]
        [--set model.d_model=32 ...]

--mode queued queues every batch at once (the pattern that hung once in ~10 quickstart runs);
--mode bounded keeps two in flight, as lmtrain.evaluate does. One line per evaluation: batches,
seconds and the summed loss (equal every time: the parameters do not change).
"""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from lmtrain import config as config_lib  # noqa: E402
from lmtrain import data, sharding  # noqa: E402
from lmtrain import run as run_lib  # noqa: E402
from lmtrain.evaluate import Evaluator  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=("queued", "bounded"), default="queued")
    ap.add_argument("--evals", type=int, default=50)
    ap.add_argument("--bound", type=float, default=120.0, help="seconds per evaluation")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE")
    args = ap.parse_args()
    cfg = config_lib.load_experiment("experiments/quickstart.py")
    sets = {"mesh.shape": (2, 1, 1), **config_lib.parse_sets(args.sets)}
    run = run_lib.setup(config_lib.override(cfg, sets).validate())
    corpus = data.load_corpus(run.cfg.data, run.tokenizer)
    ev = Evaluator(run, corpus.val)
    params = run.init_state()["params"]
    seq = run.cfg.data.seq_len
    split, step = next(iter(ev.splits.values())), ev._steps[seq]
    for i in range(args.evals):
        faulthandler.dump_traceback_later(args.bound, exit=True)
        t0, totals, n = time.time(), None, 0
        batches = data.eval_batches(
            split, run.tokenizer.token_bytes, seq_len=seq, global_batch=ev.shapes[seq]
        )
        for local in batches:
            res = step(params, sharding.global_batch(local, run.mesh))
            if args.mode == "bounded" and totals is not None:
                jax.block_until_ready(totals)
            totals = res if totals is None else jax.tree.map(lambda a, b: a + b, totals, res)
            n += 1
        nll = float(jax.device_get(totals)["nll_sum"])
        faulthandler.cancel_dump_traceback_later()
        print(f"{args.mode} eval {i}: {n} batches, {time.time() - t0:.1f} s, nll {nll:.1f}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
