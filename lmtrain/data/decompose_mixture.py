"""Dataset decomposition of a mixture: every component keeps its own length distribution.

Each component is cut into power-of-two buckets on its own (lmtrain/data/decompose.py). With
normalised weights w_c (data.mixture_weighting="tokens": weight x the component's kept targets)
and f_ck the fraction of component c's kept targets in bucket k, the mixture holds

    N_k = T x sum_c w_c f_ck / 2^k    sequences in bucket k per epoch (T: all kept targets),

and the step schedule (buckets drawn under the curriculum, decompose.Schedule) runs on these N_k
as it does on one corpus's counts. The rows of a bucket-k step come from the components in the
shares w_c f_ck / sum_c' w_c' f_c'k, drawn by a block-deterministic MixtureSampler of bucket k's
rows. So over each epoch of the schedule component c gives the share w_c of all tokens, each in
the lengths its own documents have: a corpus of short documents is not cut to the long buckets'
lengths, and it is drawn more where the curriculum favours short sequences.

A component's sequences of bucket k are read in an order reshuffled per pass (grain's index
shuffle, seeded by the seed, the component's name and k); a component that runs out of bucket-k
sequences starts a new pass of them. tokens/NAME counts the targets a component gave, and
epochs/NAME those over its kept targets. Weight stages, max_epochs and unique_tokens are
concat-and-chunk options (config.py refuses them here).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

from lmtrain.data.decompose import DecomposedIterator, Schedule, _pack_one_document, decompose
from lmtrain.data.mixture import Mixture, MixtureSampler, _seed
from lmtrain.errors import DataError


class DecomposedMixture:
    """A mixture's decomposed training split: per-component buckets, one schedule over the
    mixture's sequences per bucket, and a row sampler per bucket."""

    def __init__(self, mixture: Mixture, cfg: Any, *, seed: int, process_index=0, process_count=1):
        d = cfg.data.decompose
        self.mixture, self.names, self.seed = mixture, mixture.names, seed
        self.buckets = {}
        for n in self.names:
            b = decompose(
                mixture.streams[n].document_ends(), d.min_log2_len, d.max_log2_len,
                randomize=d.randomize, seed=seed,
            )  # fmt: skip
            if b.stats["kept"] == 0:
                raise DataError(
                    f"data.mixture.{n}: every document of its training split is shorter than "
                    f"2^data.decompose.min_log2_len = {1 << d.min_log2_len} tokens: lower "
                    "data.decompose.min_log2_len or give the component longer documents"
                )
            self.buckets[n] = b
        self.kept = np.array([self.buckets[n].stats["kept"] for n in self.names], np.float64)
        given = np.array([float(mixture.components[n].weight) for n in self.names])
        w = given * (self.kept if mixture.weighting == "tokens" else 1.0)
        self.weights = w / w.sum()
        self.ks = list(range(d.min_log2_len, d.max_log2_len + 1))
        # n[c, k]: component c's sequences in bucket k; mass[c, k] = w_c f_ck.
        self.n = np.array([[len(self.buckets[c].starts[k]) for k in self.ks] for c in self.names])
        mass = self.weights[:, None] * self.n * (2.0 ** np.array(self.ks)) / self.kept[:, None]
        total = self.kept.sum()
        counts = {k: int(round(total * mass[:, i].sum() / 2**k)) for i, k in enumerate(self.ks)}
        self.schedule = Schedule(
            counts, cfg.tokens_per_step(), curriculum=d.curriculum, cycles=d.cycles, seed=seed,
            min_log2=d.min_log2_len, max_log2=d.max_log2_len,
        )  # fmt: skip
        for k, b in self.schedule.batch.items():
            if b % process_count:
                raise DataError(
                    f"bucket 2^{k} has batch {b}, not divisible by {process_count} processes"
                )
        self.process_index, self.process_count = process_index, process_count
        no_limit = np.full(len(self.names), np.inf)
        self.samplers = {
            k: MixtureSampler(self.n[:, i], [(0, mass[:, i])], no_limit, _seed(seed, f"dd/{k}"))
            for i, k in enumerate(self.ks)
            if self.schedule.batches[k] > 0
        }
        self.orders = {
            (c, k): grain.MapDataset.range(int(self.n[c, i]))
            .shuffle(seed=_seed(seed, f"{self.names[c]}/{k}"))
            .repeat(None)
            for c in range(len(self.names))
            for i, k in enumerate(self.ks)
            if self.n[c, i] > 0
        }

    def report(self) -> dict[str, Any]:
        """Decomposition figures for the log and metrics.jsonl: the mixture's sequences and
        batches per bucket, and each component's kept targets and weight."""
        s = self.schedule
        out: dict[str, Any] = {}
        for c, n in enumerate(self.names):
            out[f"kept/{n}"] = int(self.kept[c])
            out[f"weight/{n}"] = round(float(self.weights[c]), 4)
        for k in s.ks:
            out[f"batches_{1 << k}"] = s.batches[k]
        out["steps_per_epoch"] = s.steps_per_epoch
        return out

    def _rows(self, step: int) -> tuple[int, int]:
        """(bucket k, global bucket-k row of this process's first row) of step `step`."""
        epoch, _, k, b = self.schedule.locate(step)
        batch = self.schedule.batch[k]
        first = (epoch * self.schedule.batches[k] + b) * batch
        return k, first + self.process_index * (batch // self.process_count)

    def load(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global step `step`'s batch (each inside one document)."""
        k, first = self._rows(step)
        local = self.schedule.batch[k] // self.process_count
        comp, index = self.samplers[k].assign(list(range(first, first + local)))
        length = 1 << k
        rows = np.zeros((local, length + 1), np.int32)
        for c in np.unique(comp):
            where = np.flatnonzero(comp == c)
            order = self.orders[(int(c), k)]
            starts = self.buckets[self.names[c]].starts[k][[order[i] for i in index[where]]]
            tokens = self.mixture.streams[self.names[c]].tokens
            rows[where] = np.stack([tokens[s : s + length + 1] for s in starts])
        return _pack_one_document(rows)

    def seen(self, step: int) -> dict[str, float]:
        """tokens/NAME (targets given) and epochs/NAME (over its kept targets) after `step`."""
        pos = self.schedule.position(step)
        tokens = np.zeros(len(self.names))
        for k, sampler in self.samplers.items():
            done = pos["epoch"] * self.schedule.batches[k] + pos["cursors"][str(k)]
            tokens += sampler.counts(done * self.schedule.batch[k]) * float(1 << k)
        out: dict[str, float] = {}
        for c, n in enumerate(self.names):
            out[f"tokens/{n}"] = int(tokens[c])
            out[f"epochs/{n}"] = float(tokens[c] / self.kept[c])
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's data position depends on besides the schedule (checked)."""
        return {
            "components": {
                n: {"kept": int(self.kept[c]), "weight": float(self.weights[c])}
                for c, n in enumerate(self.names)
            },
            "seed": self.seed,
        }

    def iterator(self, prefetch: int = 2) -> DecomposedMixtureIterator:
        steps = grain.MapDataset.range(1 << 62).map(self.load)
        read = grain.ReadOptions(
            num_threads=min(max(prefetch, 0), 8), prefetch_buffer_size=prefetch
        )
        return DecomposedMixtureIterator(iter(steps.to_iter_dataset(read)), self)


class DecomposedMixtureIterator(DecomposedIterator):
    """The decomposition's iterator and state, plus the mixture's fingerprint and counts."""

    def __init__(self, it: Any, data: DecomposedMixture):
        randomize = data.buckets[data.names[0]].randomize
        super().__init__(it, data.schedule, randomize)
        self.data = data

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        return {**state, "seen": self.data.seen(state["next_step"]), **self.data.fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        mine = self.data.fingerprint()
        if "components" not in state:
            raise DataError(
                "the checkpoint's data state is not a decomposed mixture's; use a new --workdir "
                "to change data.mixture or data.packing"
            )
        if {k: state.get(k) for k in mine} != mine:
            raise DataError(
                "the checkpoint's data position does not match this mixture's decomposition (a "
                "component's corpus, weight or the seed changed); use a new --workdir"
            )
        super().set_state(state)
