"""Held-out loss and bits per byte, reusing the compiled eval step."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax

from lmtrain import data, sharding, step
from lmtrain.run import Run, compile_eval_steps


def eval_shapes(run: Run) -> dict[int, int]:
    """{seq_len: global batch} of every eval step, the main context first; every length gets
    the same tokens per batch (a multiple of the data-parallel size)."""
    cfg = run.cfg
    dp = sharding.data_parallel_size(run.mesh)
    tokens = cfg.eval.batch_size * cfg.data.seq_len
    shapes = {cfg.data.seq_len: cfg.eval.batch_size}
    for n in cfg.eval_lengths():
        shapes.setdefault(n, max(dp, tokens // n // dp * dp))
    return shapes


class Evaluator:
    """evaluator(params, max_batches) -> {val_loss, val_acc, val_tokens, val_ppl[, val_bpb]}.

    val_acc: fraction of weighted targets that are the argmax prediction (for MQAR, the
    recall accuracy over queries). With per-length evaluation (`cfg.eval_lengths()`), also
    val_loss@L and val_bpb@L: the same split cut into rows of L tokens (documents masked as in
    training), with the same tokens per eval batch, so contexts compare at equal cost.

    A mixture's validation side is {name: split}: each component is evaluated alone
    (val_loss/NAME, val_bpb/NAME, `max_batches` batches each), and the plain val_* metrics pool
    every component's targets (as one split holding all of them would).
    """

    def __init__(self, run: Run, val: data.RowSource | dict[str, data.RowSource] | None):
        if not val:
            raise ValueError("no validation split (data.val_fraction is 0)")
        self.run = run
        self.splits = val if isinstance(val, dict) else {"": val}
        self.val = val
        self.shapes = eval_shapes(run)
        first = next(iter(self.splits.values()))
        self._steps = compile_eval_steps(run, self.shapes, first.targets_per_row)

    def __call__(
        self, params: Any, max_batches: int = 0, on_batch: Callable[[str], None] | None = None
    ) -> dict[str, float]:
        cfg = self.run.cfg
        out = self.at(params, cfg.data.seq_len, max_batches, on_batch, named=True)
        for n in cfg.eval_lengths():
            at = out if n == cfg.data.seq_len else self.at(params, n, max_batches, on_batch)
            out[f"val_loss@{n}"] = at["val_loss"]
            if "val_bpb" in at:
                out[f"val_bpb@{n}"] = at["val_bpb"]
        return out

    def at(
        self, params: Any, seq_len: int, max_batches: int = 0, on_batch=None, named=False
    ) -> dict[str, float]:
        """The validation metrics at one context (data.seq_len or one of the eval lengths);
        `named`: with a mixture, each component's val_loss/NAME and val_bpb/NAME too."""
        pooled, out = None, {}
        for name, split in self.splits.items():
            t = self._totals(params, split, seq_len, max_batches, on_batch)
            pooled = t if pooled is None else {k: pooled[k] + t[k] for k in t}
            if name and named:
                own = _metrics(t)
                out |= {f"{k}/{name}": own[k] for k in ("val_loss", "val_bpb") if k in own}
        return _metrics(pooled) | out

    def _totals(
        self, params: Any, split: data.RowSource, seq_len: int, max_batches: int, on_batch
    ) -> dict[str, float]:
        batches = data.eval_batches(
            split,
            self.run.tokenizer.token_bytes,
            seq_len=seq_len,
            global_batch=self.shapes[seq_len],
            max_batches=max_batches,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        totals = None
        for local in batches:
            res = self._steps[seq_len](params, sharding.global_batch(local, self.run.mesh))
            # At most two batches in flight, as in the train loop: with a whole split queued at
            # once, XLA:CPU's host devices were seen to deadlock in an all-reduce rendezvous
            # (the quickstart's final whole-split eval hung once in ~10 runs).
            if totals is not None:
                jax.block_until_ready(totals)
            # Sum on device; one fetch at the end keeps the host out of the way.
            totals = res if totals is None else jax.tree.map(lambda a, b: a + b, totals, res)
            if on_batch is not None:
                on_batch("an eval batch")
        if totals is None:
            raise ValueError("the validation split yielded no batches")
        return {k: float(v) for k, v in jax.device_get(totals).items()}


def _metrics(t: dict[str, float]) -> dict[str, float]:
    n = max(t["tokens"], 1.0)
    out = {
        "val_loss": t["nll_sum"] / n,
        "val_acc": t["correct"] / n,
        "val_tokens": int(t["tokens"]),
        "val_ppl": math.exp(min(t["nll_sum"] / n, 50.0)),
    }
    if t["bytes"] > 0:  # synthetic tasks (MQAR) have no text, so no bits per byte
        out["val_bpb"] = step.bits_per_byte(t["nll_sum"], t["bytes"])
    return out
