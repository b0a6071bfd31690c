"""Dataset decomposition (Pouransari et al. 2024): power-of-two buckets, one bucket per step.

Cutting follows the released `make_dd_buckets.py` (apple/ml-dataset-decomposition). A document
(its tokens, trailing eod included) has m = n - 1 targets. While at least 2^(max+1) targets are
left, the next piece has 2^k targets with k drawn from min..max with odds 2^(max-k) (short pieces
favoured: the release's default `randomize=True`); then the rest (< 2^(max+1)) is cut by its
binary representation, largest piece first, down to 2^min; a remainder under 2^min is dropped.
`data.decompose.randomize=false` is the release's other rule: as many 2^max pieces as fit, then
the binary rest. The draws are a pure function of the seed, the same on every process.

One difference from the release, kept on purpose: a piece of 2^k targets is the 2^k + 1 tokens
tokens[s : s + 2^k + 1] and the next piece starts at s + 2^k (they share the boundary token), so
every target of a document but its dropped tail is predicted exactly once. The release starts the
next piece after the boundary token, losing one target per cut.

Bucket k holds the chunks of 2^k targets. Every step takes the whole global batch from one
bucket with batch size tokens_per_step / 2^k, so every step trains on the same number of tokens.

The order of buckets is a pure function of (seed, step), the same on every process and after a
resume. One pass over the data (an epoch) is split into `cycles` cycles; cycle c of epoch e gets
a c-th share of every bucket's batches (N_k of bucket k), and each step of the cycle draws bucket
k with fixed odds N_k x w_k among the buckets not yet found empty, w_k the curriculum weight:

    uniform  w_k = 1            (batches in proportion to what each bucket holds)
    grow_p2  w_k = 2^(max - k)  (short sequences first; the paper's best)
    shrink   w_k = 2^(k - min)  (long sequences first)

This is the released sampler (open_lm's RandomMix with the release's `--train-data-mix-weights`,
which are tokens per bucket x curriculum): the odds do not shrink as a bucket runs low, and a
bucket leaves the draw only when it is drawn and found empty (the draw is then repeated), so the
curriculum is as sharp as the paper's. Between two buckets running out the draws are independent,
so a cycle is sampled in at most (number of buckets) vectorised segments.
Sequences of a bucket are shuffled lazily per epoch by grain's index shuffle (no permutation is
held in memory), and a bucket's sequences left over after its whole batches wait for a later
epoch's shuffle.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import grain
import numpy as np

from lmtrain.config import CURRICULA
from lmtrain.errors import DataError


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Where every kept chunk starts: starts[k] are token offsets of bucket k's sequences."""

    min_log2: int
    max_log2: int
    randomize: bool
    starts: dict[int, np.ndarray]
    stats: dict[str, int]  # docs, docs_too_short, targets, kept, dropped

    def counts(self) -> dict[int, int]:
        return {k: len(v) for k, v in self.starts.items()}


def _random_pieces(
    m: np.ndarray, min_log2: int, max_log2: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The release's random cuts: (document, offset, k) of each piece, and targets consumed per
    document. A document is cut while at least 2^(max+1) targets remain."""
    ks = np.arange(max_log2, min_log2 - 1, -1)
    odds = 2.0 ** np.arange(len(ks))  # 2^(max - k): the shortest piece is the likeliest
    odds /= odds.sum()
    mean = float((odds * 2.0**ks).sum())
    limit = 1 << (max_log2 + 1)
    rng = np.random.default_rng([seed, 0xDD])
    docs, offsets, sizes = [], [], []
    used = np.zeros(len(m), np.int64)
    for d in np.flatnonzero(m >= limit):
        drawn = np.empty(0, np.int64)
        while (room := int(m[d]) - int(drawn.sum()) - limit + 1) > 0:  # rest still >= 2^(max+1)
            more = ks[rng.choice(len(ks), size=max(16, int(1.5 * room / mean)), p=odds)]
            drawn = np.concatenate([drawn, np.int64(1) << more])
        ends = np.cumsum(drawn)
        n = int(np.argmax(m[d] - ends < limit)) + 1  # pieces until the rest is < 2^(max+1)
        pieces = drawn[:n]
        docs.append(np.full(n, d))
        offsets.append(np.concatenate([[0], np.cumsum(pieces)[:-1]]))
        sizes.append(pieces)
        used[d] = int(pieces.sum())
    if not docs:
        empty = np.empty(0, np.int64)
        return empty, empty, empty, used
    size = np.concatenate(sizes)
    return np.concatenate(docs), np.concatenate(offsets), np.log2(size).astype(np.int64), used


def decompose(
    doc_ends: np.ndarray, min_log2: int, max_log2: int, *, randomize: bool = True, seed: int = 0
) -> Buckets:
    """Cuts the documents ending at `doc_ends` (exclusive, ascending) into buckets."""
    ends = np.asarray(doc_ends, dtype=np.int64)
    begins = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    m = np.maximum(ends - begins - 1, 0)  # targets per document
    top = np.int64(1) << max_log2
    pieces: dict[int, list[np.ndarray]] = {k: [] for k in range(min_log2, max_log2 + 1)}
    if randomize:
        doc, offset, kk, used = _random_pieces(m, min_log2, max_log2, seed)
        for k in pieces:
            pieces[k].append(begins[doc[kk == k]] + offset[kk == k])
    else:  # as many 2^max pieces as fit
        full = m >> max_log2
        doc = np.repeat(np.arange(len(m)), full)
        nth = np.arange(len(doc)) - np.repeat(np.cumsum(full) - full, full)  # j-th 2^max piece
        pieces[max_log2].append(begins[doc] + nth * top)
        used = full * top
    rest = m - used  # < 2^(max+1): one piece per set bit, largest first
    for k in range(max_log2, min_log2 - 1, -1):
        d = np.flatnonzero((rest >> k) & 1)
        above = (rest[d] >> (k + 1)) << (k + 1)  # the larger pieces of the rest come first
        pieces[k].append(begins[d] + used[d] + above)
    starts = {k: np.sort(np.concatenate(v)).astype(np.int64) for k, v in pieces.items()}
    dropped = int((rest & ((np.int64(1) << min_log2) - 1)).sum())
    targets = int(m.sum())
    stats = {
        "docs": len(m),
        "docs_too_short": int((m < (1 << min_log2)).sum()),
        "targets": targets,
        "kept": targets - dropped,
        "dropped": dropped,
    }
    return Buckets(min_log2, max_log2, randomize, starts, stats)


def curriculum_weight(name: str, k: int, min_log2: int, max_log2: int) -> float:
    """w_k of the named curriculum (see the module docstring)."""
    if name == "uniform":
        return 1.0
    if name == "grow_p2":
        return float(2 ** (max_log2 - k))
    if name == "shrink":
        return float(2 ** (k - min_log2))
    raise ValueError(f"unknown curriculum {name!r}; choose from {CURRICULA}")


class Schedule:
    """Which bucket, and which of its batches, every global step takes."""

    def __init__(
        self,
        counts: dict[int, int],
        tokens_per_step: int,
        *,
        curriculum: str,
        cycles: int,
        seed: int,
        min_log2: int,
        max_log2: int,
    ):
        self.ks = sorted(counts)
        self.tokens_per_step, self.cycles, self.seed = tokens_per_step, cycles, seed
        self.batch = {k: tokens_per_step >> k for k in self.ks}
        if any(tokens_per_step % (1 << k) for k in self.ks):
            raise ValueError(f"tokens_per_step {tokens_per_step} is not a multiple of 2^max")
        self.batches = {k: counts[k] // self.batch[k] for k in self.ks}  # per epoch
        self.weight = {k: curriculum_weight(curriculum, k, min_log2, max_log2) for k in self.ks}
        # share[k][c]: bucket k's first batch index in cycle c (c = cycles: the epoch's total)
        self.share = {
            k: [n * c // cycles for c in range(cycles + 1)] for k, n in self.batches.items()
        }
        self.cycle_steps = [
            sum(self.share[k][c + 1] - self.share[k][c] for k in self.ks) for c in range(cycles)
        ]
        self.cycle_first = np.concatenate([[0], np.cumsum(self.cycle_steps)]).tolist()
        self.steps_per_epoch = self.cycle_first[-1]
        if self.steps_per_epoch == 0:
            need = ", ".join(f"2^{k}: {counts[k]}/{self.batch[k]}" for k in self.ks)
            raise DataError(
                f"no bucket holds a whole batch of train.tokens_per_step={tokens_per_step} "
                f"tokens (sequences/needed per bucket: {need}); lower train.tokens_per_step or "
                "data.max_log2_len, or add data"
            )

    @functools.lru_cache(maxsize=4)  # noqa: B019 - a few cycles, freed with the schedule
    def cycle(self, epoch: int, c: int) -> tuple[np.ndarray, np.ndarray]:
        """(bucket k, batch index within the epoch) of every step of cycle c of `epoch`."""
        n = {k: self.share[k][c + 1] - self.share[k][c] for k in self.ks}
        left = dict(n)
        active = [k for k in self.ks if n[k] > 0]
        rng = np.random.default_rng([self.seed, epoch, c, 0x5EED])
        parts = []
        while active:  # one segment per bucket found empty
            odds = np.array([n[k] * self.weight[k] for k in active], np.float64)
            draws = rng.choice(
                len(active), size=sum(left[k] for k in active) + 1, p=odds / odds.sum()
            )
            # The first draw of a bucket with nothing left ends the segment (and the bucket).
            seen = np.zeros_like(draws)
            for j in range(len(active)):
                at = draws == j
                seen[at] = np.arange(1, at.sum() + 1)
            over = seen > np.array([left[k] for k in active])[draws]
            t = int(np.argmax(over))  # some bucket is overdrawn: there is one more draw than left
            taken = np.array(active, np.int64)[draws[:t]]
            parts.append(taken)
            for k in active:
                left[k] -= int((taken == k).sum())
            active.remove(active[draws[t]])
        order = np.concatenate(parts) if parts else np.empty(0, np.int64)
        index = np.empty(len(order), np.int64)
        for k in self.ks:
            at = np.flatnonzero(order == k)
            index[at] = self.share[k][c] + np.arange(len(at))
        return order, index

    def _where(self, step: int) -> tuple[int, int, int]:
        """(epoch, cycle, position inside the cycle) of global step `step`."""
        epoch, t = divmod(step, self.steps_per_epoch)
        c = int(np.searchsorted(self.cycle_first, t, side="right")) - 1
        return epoch, c, t - self.cycle_first[c]

    def locate(self, step: int) -> tuple[int, int, int, int]:
        """(epoch, cycle, bucket k, batch index of k in that epoch) of global step `step`."""
        epoch, c, i = self._where(step)
        order, index = self.cycle(epoch, c)
        return epoch, c, int(order[i]), int(index[i])

    def position(self, step: int) -> dict[str, Any]:
        """The iterator state at `step` in readable form: epoch, cycle, per-bucket cursors."""
        epoch, c, i = self._where(step)
        order, _ = self.cycle(epoch, c)
        done = order[:i]
        cursors = {str(k): self.share[k][c] + int((done == k).sum()) for k in self.ks}
        return {"epoch": epoch, "cycle": c, "cursors": cursors}


class DecomposedData:
    """A decomposed training split: buckets, the schedule, and grain batches per step."""

    def __init__(self, stream: Any, cfg: Any, *, seed: int, process_index=0, process_count=1):
        d = cfg.data.decompose
        self.stream, self.eod_id = stream, stream.eod_id
        self.buckets = decompose(
            stream.document_ends(),
            d.min_log2_len,
            d.max_log2_len,
            randomize=d.randomize,
            seed=seed,
        )
        self.counts = self.buckets.counts()  # sequences per bucket, read every step
        st = self.buckets.stats
        if st["kept"] == 0:
            raise DataError(
                "every document of the training split is shorter than "
                f"2^data.decompose.min_log2_len = "
                f"{1 << d.min_log2_len} tokens ({st['docs']} documents, {st['targets']} "
                "targets): lower data.decompose.min_log2_len or use data.packing='concat'"
            )
        self.schedule = Schedule(
            self.counts,
            cfg.tokens_per_step(),
            curriculum=d.curriculum,
            cycles=d.cycles,
            seed=seed,
            min_log2=d.min_log2_len,
            max_log2=d.max_log2_len,
        )
        for k, b in self.schedule.batch.items():
            if b % process_count:
                raise DataError(
                    f"bucket 2^{k} has batch {b}, not divisible by {process_count} processes"
                )
        self.process_index, self.process_count = process_index, process_count
        self.seed = seed
        self._orders = {
            k: grain.MapDataset.range(n).shuffle(seed=(seed * 1_000_003 + k) % 2**31).repeat(None)
            for k, n in self.counts.items()
            if n > 0
        }

    def report(self) -> dict[str, Any]:
        """Decomposition figures for the log and metrics.jsonl."""
        s = self.schedule
        out: dict[str, Any] = dict(self.buckets.stats)
        for k in s.ks:
            out[f"seqs_{1 << k}"] = self.counts[k]
            out[f"batches_{1 << k}"] = s.batches[k]
        # Sequences beyond a bucket's whole batches wait for another epoch's shuffle.
        out["unbatched_per_epoch"] = sum(
            (self.counts[k] - s.batches[k] * s.batch[k]) << k for k in s.ks
        )
        out["steps_per_epoch"] = s.steps_per_epoch
        return out

    def load(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global step `step`'s batch (packed like concat rows)."""
        epoch, _, k, b = self.schedule.locate(step)
        batch, n = self.schedule.batch[k], self.counts[k]
        local = batch // self.process_count
        first = epoch * n + b * batch + self.process_index * local
        order = self._orders[k]
        starts = self.buckets.starts[k][[order[i] for i in range(first, first + local)]]
        length = 1 << k
        tokens = self.stream.tokens
        rows = np.stack([tokens[s : s + length + 1] for s in starts]).astype(np.int32)
        return _pack_one_document(rows)

    def iterator(self, prefetch: int = 2) -> DecomposedIterator:
        """Endless batches, one per step, prepared ahead by `prefetch` reader threads."""
        steps = grain.MapDataset.range(1 << 62).map(self.load)
        threads = min(max(prefetch, 0), 8)
        read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
        randomize = self.buckets.randomize
        return DecomposedIterator(iter(steps.to_iter_dataset(read)), self.schedule, randomize)


def _pack_one_document(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Model inputs for rows that each lie inside one document: no masks are needed."""
    b, n = rows.shape[0], rows.shape[1] - 1
    return {
        "inputs": rows[:, :-1],
        "targets": rows[:, 1:],
        "segment_ids": np.ones((b, n), np.int32),
        "positions": np.broadcast_to(np.arange(n, dtype=np.int32), (b, n)).copy(),
        "weights": np.ones((b, n), np.float32),
    }


class DecomposedIterator:
    """grain's iterator over steps plus a checkpointable, human-readable state.

    The state is the next global step (grain's `next_index`), from which the epoch, cycle,
    per-bucket cursors and RNG position all follow; they are stored beside it so a checkpoint
    can be read, and checked on restore so a changed corpus or decomposition is caught.
    """

    def __init__(self, it: Any, schedule: Schedule, randomize: bool):
        self._it, self.schedule, self.randomize = it, schedule, randomize

    def __iter__(self) -> DecomposedIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._it)

    def get_state(self) -> dict[str, Any]:
        g = self._it.get_state()
        step = int(g["next_index"])
        return {"grain": g, "next_step": step, **self.get_state_at(step)}

    def set_state(self, state: dict[str, Any]) -> None:
        if "next_step" not in state:
            raise DataError(
                "the checkpoint's data state is not a decomposition state (was it written "
                "with data.packing='concat'?); use a new --workdir to change data.packing"
            )
        mine = self.get_state_at(int(state["next_step"]))
        keys = ("epoch", "cycle", "cursors", "rng", "steps_per_epoch")
        if any(state.get(k) != mine[k] for k in keys):
            raise DataError(
                "the checkpoint's data position does not match this corpus's decomposition "
                f"(saved {[state.get(k) for k in keys]}, now {[mine[k] for k in keys]}): the "
                "corpus, data.decompose.* or tokens per step changed; use a "
                "new --workdir"
            )
        self._it.set_state(state["grain"])

    def get_state_at(self, step: int) -> dict[str, Any]:
        """The readable part of the state at `step` (everything but grain's own index)."""
        s = self.schedule
        return {
            **s.position(step),
            "rng": {
                "seed": s.seed,
                "tokens_per_step": s.tokens_per_step,
                "cycles": s.cycles,
                "cut": "random" if self.randomize else "largest",
            },
            "steps_per_epoch": s.steps_per_epoch,
        }
