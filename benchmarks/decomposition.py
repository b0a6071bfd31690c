"""Dataset decomposition vs concat-and-chunk: throughput and loss at equal wall time.

    python benchmarks/decomposition.py                  # 300 s each, 2^6 .. 2^11, grow_p2
    python benchmarks/decomposition.py --budget-s 60 --max-log2 10

Both modes train the same model (experiments/decomposition.py: 2-layer transformer, width
64, bpe:4096 on the embedded corpus) with the same tokens per step, AdamW at a constant
learning rate after warm-up (no schedule that would need the step count in advance). concat
packs rows of 2^max tokens with document masking; decompose draws each step's batch from one
power-of-two bucket. The two runs are interleaved in segments of --segment-s seconds on the
same machine, so load from other work falls on both alike; each has --budget-s seconds of
training time (data loading included, compilation and evaluation excluded). At every quarter
of the budget both are evaluated at 2^max tokens of context, and at the end at every context
2^min .. 2^max, on the same validation rows.

Prints a markdown report (and writes it to --out if given): tokens/s of each and their ratio,
validation loss at equal wall time, and the final loss per context length.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

_cores = os.cpu_count() or 1
_devices = 1 << (min(_cores, 8).bit_length() - 1)  # as the lmtrain CLI: a device per core
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={_devices}")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_config(packing: str, args) -> object:
    from lmtrain import config as config_lib

    spec = f"{ROOT / 'experiments/decomposition.py'}:{'concat' if packing == 'concat' else ''}"
    cfg = config_lib.load_experiment(spec)
    hi = args.max_log2
    sets = {
        "data.decompose.min_log2_len": args.min_log2,
        "data.decompose.max_log2_len": hi,
        "data.seq_len": 1 << hi,
        "data.decompose.curriculum": args.curriculum,
        "train.tokens_per_step": args.tokens_per_step,
        "optim.schedule": "constant",
        "optim.warmup_steps": args.warmup,
        "eval.max_batches": args.eval_batches,
        "eval.lengths": tuple(1 << k for k in range(args.min_log2, hi + 1)),
    }
    return config_lib.override(cfg, sets).validate()


class Trainer:
    """One mode's state, compiled steps, data iterator, evaluator and training clock."""

    def __init__(self, packing: str, args):
        import jax

        from lmtrain import data, run, sharding
        from lmtrain.evaluate import Evaluator

        self.packing = packing
        self.run = run.setup(make_config(packing, args))
        cfg = self.run.cfg
        corpus = data.load_corpus(cfg.data, self.run.tokenizer)
        train_data = data.make_train_data(cfg, corpus.train)
        self.it, self.report = train_data.iterator, train_data.report
        self.steps, _ = run.compile_train_steps(self.run, train_data.shapes, stop_flag=False)
        self.evaluator = Evaluator(self.run, corpus.val)
        self.state = self.run.init_state()
        self.clock, self.n_steps, self.tokens = 0.0, 0, 0
        self.tokens_per_step = cfg.tokens_per_step()
        self.lengths_seen: dict[int, int] = {}
        self._global = sharding.global_batch
        self._jax = jax

    def train_for(self, seconds: float) -> None:
        """Trains until this mode's clock has advanced by `seconds`."""
        end = self.clock + seconds
        while self.clock < end:
            t0 = time.perf_counter()
            local = next(self.it)
            n = local["inputs"].shape[1]
            self.state, m = self.steps[n](self.state, self._global(local, self.run.mesh))
            self._jax.block_until_ready(m["loss"])
            self.clock += time.perf_counter() - t0
            self.n_steps += 1
            self.tokens += self.tokens_per_step
            self.lengths_seen[n] = self.lengths_seen.get(n, 0) + 1

    def evaluate(self, every_length: bool) -> dict:
        params, n = self.state["params"], self.run.cfg.eval.max_batches
        if every_length:
            return self.evaluator(params, n)
        return self.evaluator.at(params, self.run.cfg.data.seq_len, n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds per mode")
    p.add_argument("--segment-s", type=float, default=15.0, help="interleaving granularity")
    p.add_argument("--min-log2", type=int, default=6)
    p.add_argument("--max-log2", type=int, default=11)
    p.add_argument("--tokens-per-step", type=int, default=8192)
    p.add_argument("--curriculum", default="grow_p2", choices=("uniform", "grow_p2", "shrink"))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-batches", type=int, default=16, help="eval batches per length")
    p.add_argument("--out", default="", help="also write the markdown report here")
    args = p.parse_args()

    import jax

    t0 = time.perf_counter()
    modes = {m: Trainer(m, args) for m in ("concat", "decompose")}
    print(f"set up and compiled both in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    checkpoints = [args.budget_s * q / 4 for q in (1, 2, 3, 4)]
    curve: list[dict] = []
    for target in checkpoints:
        while any(t.clock < target for t in modes.values()):
            for t in modes.values():  # interleaved: both see the same machine load
                if t.clock < target:
                    t.train_for(min(args.segment_s, target - t.clock))
        for name, t in modes.items():
            ev = t.evaluate(every_length=target == checkpoints[-1])
            curve.append({"mode": name, "clock": t.clock, "tokens": t.tokens, **ev})
            print(
                f"{name:9s} {t.clock:6.0f} s {t.tokens / 1e6:6.2f}M tokens "
                f"val_loss@{1 << args.max_log2} {ev['val_loss']:.4f}",
                file=sys.stderr,
            )

    hi = 1 << args.max_log2
    c, d = modes["concat"], modes["decompose"]
    tps = {k: t.tokens / t.clock for k, t in modes.items()}
    lines = [
        f"Dataset decomposition vs concat-and-chunk ({time.strftime('%Y-%m-%d')}, "
        f"{platform.machine()}, {os.cpu_count()} cores, {jax.device_count()} XLA CPU devices)",
        "",
        f"`python benchmarks/decomposition.py --budget-s {args.budget_s:g} --min-log2 "
        f"{args.min_log2} --max-log2 {args.max_log2} --tokens-per-step {args.tokens_per_step} "
        f"--curriculum {args.curriculum}`",
        "",
        f"decomposition: {d.report['kept']:,} of {d.report['targets']:,} training targets kept "
        f"({d.report['dropped']:,} dropped as remainders), sequences per bucket "
        + ", ".join(
            f"{1 << k}: {d.report[f'seqs_{1 << k}']:,}"
            for k in range(args.min_log2, args.max_log2 + 1)
        )
        + "; steps per length in this run: "
        + ", ".join(f"{n}: {s}" for n, s in sorted(d.lengths_seen.items())),
        "",
        "| | concat-and-chunk | decomposition | ratio |",
        "|---|---|---|---|",
        f"| training tokens/s | {tps['concat']:,.0f} | {tps['decompose']:,.0f} | "
        f"{tps['decompose'] / tps['concat']:.2f}x |",
        f"| steps in {args.budget_s:g} s | {c.n_steps} | {d.n_steps} | "
        f"{d.n_steps / max(c.n_steps, 1):.2f}x |",
        "",
        f"Validation loss at {hi} tokens of context at equal training time:",
        "",
        "| seconds | concat tokens | concat loss | decompose tokens | decompose loss |",
        "|---|---|---|---|---|",
    ]
    for q in range(len(checkpoints)):
        a, b = curve[2 * q], curve[2 * q + 1]
        lines.append(
            f"| {a['clock']:.0f} | {a['tokens'] / 1e6:.2f}M | {a['val_loss']:.4f} | "
            f"{b['tokens'] / 1e6:.2f}M | {b['val_loss']:.4f} |"
        )
    lines += ["", "Final validation loss per context length:", ""]
    lens = [1 << k for k in range(args.min_log2, args.max_log2 + 1)]
    lines.append("| | " + " | ".join(str(n) for n in lens) + " |")
    lines.append("|---|" + "---|" * len(lens))
    for row in curve[-2:]:
        vals = " | ".join(f"{row[f'val_loss@{n}']:.4f}" for n in lens)
        lines.append(f"| {row['mode']} | {vals} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
