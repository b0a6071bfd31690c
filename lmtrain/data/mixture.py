"""Mixtures: several corpora read at chosen weights (data.mixture), block-deterministic.

Training rows (concat-and-chunk rows of seq_len targets) are numbered globally: step k holds rows
k B .. k B + B - 1 for a global batch of B rows, whatever the process count. Each row is drawn
from one component. The rows are cut into blocks of BLOCK rows; a block holds each component's
exact share of rows (its weight x BLOCK, largest remainders rounded up), in an order shuffled by
(seed, segment, block). So the realised share of every component is within 1/BLOCK of its weight
over any whole number of blocks, and the component of any row, and how many rows each component
gave before it, follow in closed form: random access, as Levanter's block-deterministic mixture.
Resume needs nothing but the step.

A segment is a stretch of rows with fixed weights. A new one begins where a weight stage begins
(data.mixture.NAME.weight as ((first step, weight), ...)) and where a component reaches its
max_epochs, which removes it: the others are renormalised (data.mixture_exhausted="renormalise")
or the data ends there ("stop"), and the run stops with a message at the last whole step.

The i-th row a component gives is row order_e[i mod n] of its own n rows, epoch e = i div n,
where order_e is grain's index shuffle, reseeded each epoch: a component that runs out starts
a new epoch in a new order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from typing import Any

import grain
import numpy as np

from lmtrain.config import MixtureComponent, mixture_stages
from lmtrain.data.contract import Batch
from lmtrain.errors import DataError

BLOCK = 1024  # rows per block; shares are exact per block, so within 1/BLOCK overall


def _quota(weights: np.ndarray) -> np.ndarray:
    """Rows per block of each component: weights x BLOCK rounded by largest remainder."""
    raw = weights / weights.sum() * BLOCK
    q = np.floor(raw).astype(np.int64)
    rest = (raw - q) * (weights > 0)
    q[np.argsort(-rest, kind="stable")[: BLOCK - int(q.sum())]] += 1
    return q


@dataclasses.dataclass(frozen=True)
class _Segment:
    row: int  # its first global row
    quota: np.ndarray  # rows per block per component
    counts: np.ndarray  # rows each component gave before `row`
    index: int


class MixtureSampler:
    """Which component each global row comes from, and its draw index within that component.

    `rows[c]`: rows component c holds; `stages`: [(first row, weights)], the first at row 0;
    `limits[c]`: rows after which c leaves the mixture (inf: none); `stop`: the data ends when
    a component reaches its limit, instead of renormalising the others.
    """

    def __init__(
        self,
        rows: np.ndarray,
        stages: list[tuple[int, np.ndarray]],
        limits: np.ndarray,
        seed: int,
        stop: bool = False,
    ):
        self.rows = np.asarray(rows, np.int64)
        self.limits, self.seed = np.asarray(limits, np.float64), seed
        self.exhausted: list[tuple[int, int]] = []  # (row, component) where each one left
        self.end_row: int | None = None  # the first row no component can give
        self.segments: list[_Segment] = []
        active = np.ones(len(self.rows), bool)
        row, counts = 0, np.zeros(len(self.rows), np.int64)
        starts = [r for r, _ in stages]
        while True:
            weights = [w for r, w in stages if r <= row][-1] * active
            if weights.sum() <= 0:
                self.end_row = row
                return
            seg = _Segment(row, _quota(weights), counts, len(self.segments))
            self.segments.append(seg)
            nxt = min([r for r in starts if r > row], default=None)
            out = self._first_exhaustion(seg)
            if out is not None and (nxt is None or out[0] <= nxt):
                row, c = out
                counts = self.counts(row)
                active &= counts < self.limits
                self.exhausted.append((row, c))
                if stop:
                    self.end_row = row
                    return
            elif nxt is not None:
                row, counts = nxt, self.counts(nxt)
            else:
                return

    @functools.lru_cache(maxsize=64)  # noqa: B019  (a few blocks per step; the sampler lives long)
    def _block(self, index: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(component of each row, its rank among that component's rows) in block b."""
        seg = self.segments[index]
        rng = np.random.default_rng([self.seed, 0x313, index, b])
        comp = rng.permutation(np.repeat(np.arange(len(seg.quota)), seg.quota))
        rank = np.zeros(BLOCK, np.int64)
        for c in np.flatnonzero(seg.quota):
            rank[comp == c] = np.arange(seg.quota[c])
        return comp, rank

    def _first_exhaustion(self, seg: _Segment) -> tuple[int, int] | None:
        """(row after which a component reaches its limit, that component), the earliest."""
        best = None
        for c in np.flatnonzero(seg.quota > 0):
            if not np.isfinite(self.limits[c]):
                continue
            m = int(self.limits[c]) - int(seg.counts[c])  # its rows left, >= 1
            f, j = divmod(m - 1, int(seg.quota[c]))
            comp, _ = self._block(seg.index, f)
            after = seg.row + f * BLOCK + int(np.flatnonzero(comp == c)[j]) + 1
            if best is None or after < best[0]:
                best = (after, int(c))
        return best

    def _segment(self, row: int) -> _Segment:
        i = np.searchsorted([s.row for s in self.segments], row, side="right") - 1
        return self.segments[i]

    def counts(self, row: int) -> np.ndarray:
        """Rows each component gave before global row `row`."""
        seg = self._segment(row)
        b, pos = divmod(row - seg.row, BLOCK)
        comp, _ = self._block(seg.index, b)
        return seg.counts + b * seg.quota + np.bincount(comp[:pos], minlength=len(seg.quota))

    def assign(self, rows: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(component, draw index within it) of each global row."""
        if self.end_row is not None and max(rows) >= self.end_row:
            raise DataError(f"the mixture has no row {max(rows)}: its data ends at {self.end_row}")
        out = np.zeros((2, len(rows)), np.int64)
        for j, r in enumerate(rows):
            seg = self._segment(r)
            b, pos = divmod(r - seg.row, BLOCK)
            comp, rank = self._block(seg.index, b)
            c = comp[pos]
            out[:, j] = c, seg.counts[c] + b * seg.quota[c] + rank[pos]
        return out[0], out[1]


class Mixture:
    """The training side of a mixture: each component's training stream (a TokenStream), its
    weight, limits and the mixture's options; `sampler` and `iterator` build the batches."""

    targets_per_row = 0

    def __init__(
        self,
        streams: dict[str, Any],
        components: dict[str, MixtureComponent],
        weighting: str = "given",
        exhausted: str = "renormalise",
    ):
        self.names = sorted(streams)  # seeds and blocks follow names, not declaration order
        self.streams = {n: streams[n] for n in self.names}
        self.components = {n: components[n] for n in self.names}
        self.weighting, self.exhausted = weighting, exhausted
        first = self.streams[self.names[0]]
        self.eod_id, self.pad_id = first.eod_id, first.pad_id

    def num_rows(self, seq_len: int) -> dict[str, int]:
        """Training rows of each component (its unique_tokens budget applied)."""
        out = {}
        for n in self.names:
            rows = self.streams[n].num_rows(seq_len)
            budget = self.components[n].unique_tokens
            out[n] = min(rows, budget // seq_len) if budget else rows
            if out[n] < 1:
                raise DataError(
                    f"data.mixture.{n}: its training split has too few tokens for one row of "
                    f"seq_len {seq_len}" + (" (raise its unique_tokens)" if budget else "")
                )
        return out

    def weights_at(self, step: int, seq_len: int) -> dict[str, float]:
        """Each component's normalised weight at `step` before any leaves the mixture."""
        rows = self.num_rows(seq_len)
        w = {}
        for n in self.names:
            w[n] = [x for s, x in mixture_stages(self.components[n].weight) if s <= step][-1]
            w[n] *= rows[n] * seq_len if self.weighting == "tokens" else 1.0
        total = sum(w.values())
        return {n: x / total for n, x in w.items()}

    def describe(self, seq_len: int) -> str:
        """The header's words: each component's weight at step 0 and training tokens."""
        w, rows = self.weights_at(0, seq_len), self.num_rows(seq_len)
        staged = any(not isinstance(c.weight, (int, float)) for c in self.components.values())
        return (
            "mixture "
            + ", ".join(
                f"{n} {w[n]:.3g} ({rows[n] * seq_len:,} tokens"
                + (
                    f", max_epochs {self.components[n].max_epochs:g}"
                    if self.components[n].max_epochs
                    else ""
                )
                + ")"
                for n in self.names
            )
            + (" (weights in stages)" if staged else "")
        )

    def sampler(self, seq_len: int, global_batch: int, seed: int) -> MixtureSampler:
        rows = self.num_rows(seq_len)
        steps = sorted({s for c in self.components.values() for s, _ in mixture_stages(c.weight)})
        stages = [
            (s * global_batch, np.array(list(self.weights_at(s, seq_len).values()))) for s in steps
        ]
        limits = [
            max(1, int(self.components[n].max_epochs * rows[n]))
            if self.components[n].max_epochs
            else np.inf
            for n in self.names
        ]
        return MixtureSampler(
            np.array([rows[n] for n in self.names]), stages, np.array(limits, np.float64), seed,
            stop=self.exhausted == "stop",
        )  # fmt: skip

    def subsets(self, seq_len: int) -> list[np.ndarray | None]:
        """Each component's stream rows under its unique_tokens budget: a fixed random subset
        spread over the whole split (the same for every train.seed), or None: all of them."""
        out = []
        for n, r in self.num_rows(seq_len).items():
            total = self.streams[n].num_rows(seq_len)
            rng = np.random.default_rng(_seed(0, f"unique_tokens/{n}"))
            out.append(None if r == total else np.sort(rng.choice(total, r, replace=False)))
        return out

    def orders(self, seq_len: int, seed: int) -> list[Any]:
        """Each component's row order over endless epochs, reshuffled every epoch."""
        rows = self.num_rows(seq_len)
        return [
            grain.MapDataset.range(rows[n]).shuffle(seed=_seed(seed, n)).repeat(None)
            for n in self.names
        ]

    def fingerprint(self, seq_len: int, global_batch: int, seed: int) -> dict[str, Any]:
        """What a checkpoint's data position depends on (checked on restore)."""
        return {
            "components": {
                n: {"rows": r, "weight": repr(self.components[n].weight)}
                for n, r in self.num_rows(seq_len).items()
            },
            "max_epochs": [self.components[n].max_epochs for n in self.names],
            "weighting": self.weighting,
            "exhausted": self.exhausted,
            "seq_len": seq_len,
            "global_batch": global_batch,
            "seed": seed,
        }


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha1(f"{seed}/{name}".encode()).digest()[:4], "little")


class MixtureIterator:
    """Endless (or, when the mixture's data ends, finite) batches of this process's rows, and
    their position: grain's index of the next step, plus the readable tokens and epochs per
    component, and the fingerprint that restore checks."""

    def __init__(
        self,
        mixture: Mixture,
        *,
        seq_len: int,
        global_batch: int,
        seed: int,
        first_row: int,
        local_batch: int,
        prefetch: int = 2,
    ):
        self.mixture, self.seq_len, self.global_batch = mixture, seq_len, global_batch
        self.sampler = mixture.sampler(seq_len, global_batch, seed)
        self.rows = np.array(list(mixture.num_rows(seq_len).values()))
        self._fingerprint = mixture.fingerprint(seq_len, global_batch, seed)
        orders = mixture.orders(seq_len, seed)
        subsets = mixture.subsets(seq_len)
        streams = [mixture.streams[n] for n in mixture.names]
        end = self.sampler.end_row
        self.end_step = None if end is None else end // global_batch

        def load(k: int) -> Batch:
            start = k * global_batch + first_row
            comp, index = self.sampler.assign(list(range(start, start + local_batch)))
            out: Batch = {}
            for c in np.unique(comp):
                where = np.flatnonzero(comp == c)
                rows = [orders[c][i] for i in index[where]]
                if subsets[c] is not None:
                    rows = subsets[c][rows].tolist()
                got = streams[c].load_rows(rows, seq_len)
                for key, value in got.items():
                    if key not in out:
                        out[key] = np.zeros((local_batch, *value.shape[1:]), value.dtype)
                    out[key][where] = value
            return out

        n_steps = self.end_step if self.end_step is not None else 10**15
        batches = grain.MapDataset.range(n_steps).map(load)
        read = grain.ReadOptions(
            num_threads=min(max(prefetch, 0), 8), prefetch_buffer_size=prefetch
        )
        self._it = iter(batches.to_iter_dataset(read))

    def __iter__(self) -> MixtureIterator:
        return self

    def __next__(self) -> Batch:
        return next(self._it)

    def seen(self, step: int) -> dict[str, float]:
        """tokens/NAME (cumulative training targets) and epochs/NAME (passes over its rows)
        after `step` steps."""
        counts = self.sampler.counts(step * self.global_batch)
        out = {}
        for n, c, r in zip(self.mixture.names, counts, self.rows, strict=True):
            out[f"tokens/{n}"] = int(c) * self.seq_len
            out[f"epochs/{n}"] = float(c) / float(r)
        return out

    def end_message(self) -> str | None:
        """Why the data ends (or None when it never does)."""
        if self.end_step is None:
            return None
        names = self.mixture.names
        who = ", ".join(
            f"{names[c]} (max_epochs {self.mixture.components[names[c]].max_epochs:g})"
            for _, c in self.sampler.exhausted
        )
        how = (
            "data.mixture_exhausted=stop"
            if self.mixture.exhausted == "stop"
            else "every component has left the mixture"
        )
        return f"the mixture's data ends after step {self.end_step}: {who} ran out and {how}"

    def get_state(self) -> dict[str, Any]:
        g = self._it.get_state()
        step = int(g["next_index"])
        return {"grain": g, "next_step": step, "seen": self.seen(step), **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if "next_step" not in state or "components" not in state:
            raise DataError(
                "the checkpoint's data state is not a mixture's (was it written with "
                "data.source alone?); use a new --workdir to train on a mixture"
            )
        saved = {k: state.get(k) for k in self._fingerprint}
        if saved != self._fingerprint:
            changed = [k for k in self._fingerprint if saved[k] != self._fingerprint[k]]
            raise DataError(
                f"the checkpoint's data position does not match this mixture ({', '.join(changed)} "
                "changed: a component's corpus, weight, max_epochs, the batch or the seed); "
                "use a new --workdir, or plan weight changes as stages "
                "(data.mixture.NAME.weight=((0, w0), (step, w1)))"
            )
        self._it.set_state(state["grain"])
