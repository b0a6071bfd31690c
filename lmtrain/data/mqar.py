"""MQAR, multi-query associative recall (Zoology; Arora et al. 2023), as a data source.

`data.source = "mqar"`, configured by the `data.mqar.*` section. Each example of length
L = data.seq_len + 1 holds P = data.mqar.num_kv_pairs key-value pairs `k1 v1 ... kP vP`, keys
drawn without replacement from [1, V/2) and values from [V/2, V) (V = data.mqar.vocab, 8192 in
the papers), then the query region: every key is
asked once, at slot g of the (L - 1 - 2P) // 2 slots, g drawn without replacement with
P(g) proportional to a (g + 1)^(a - 1), a = data.mqar.power_a (0.01: a power law that favours
short gaps). A key asked at slot g sits at 2P + 2g and its value follows it, so the model
sees the key as input and its value is the target; only those P targets have weight 1. The
other query-region inputs, the slot after each query key included, are random ids from the
whole vocabulary (Zoology's `random_non_queries`; data.mqar.random_non_queries=False: zeros).
data.mqar.echo_values=True is lmtrain's earlier layout: the value also follows its query key
in the inputs. data.mqar.seed picks the dataset.

data.mqar.train_lengths trains on Zoology's mixture instead: training row i packs
seq_len / n examples of n tokens and P n / seq_len pairs each (n taking turns over the list),
with segment ids so no example sees another; every row still has P queries.

Examples are a pure function of (split, index): example i of the training split is the same
for any process count and after a resume. The training split has data.mqar.train_examples
examples (repeated, reshuffled each epoch, like Zoology's fixed training set), the validation
split data.mqar.val_examples. Accuracy at eval is argmax accuracy on the query targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from lmtrain.config import Config, DataConfig, MQARConfig
from lmtrain.data.contract import Batch, RowSource
from lmtrain.data.tokenizers import Tokenizer
from lmtrain.errors import DataError

SOURCE = "mqar"
_SPLIT_SEEDS = {"train": 0, "val": 1}


class MQARTokenizer(Tokenizer):
    """Ids are the task's symbols; text is the ids as decimal numbers ("17 4100 17")."""

    def __init__(self, vocab: int) -> None:
        self.vocab_size, self.eod_id, self.pad_id = vocab, 0, 0
        self.name = f"mqar{vocab}"
        self.token_bytes = np.zeros(vocab, np.int32)  # no text: bits per byte is undefined

    def encode(self, text: str) -> list[int]:
        try:
            ids = [int(t) for t in text.split()]
        except ValueError:
            msg = "MQAR prompts are token ids separated by spaces, e.g. '17 4100 17'"
            raise DataError(msg) from None
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise DataError(f"MQAR token ids must be in [0, {self.vocab_size})")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


def check_config(cfg: Config) -> None:
    """DataError naming the key when the task cannot be built from `cfg` (a whole Config:
    the task also constrains packing and evaluation)."""
    if cfg.data.packing != "concat":
        raise DataError("data.packing='decompose' needs a text corpus, not the mqar task")
    if cfg.eval.lengths:
        raise DataError("eval.lengths do not apply to the mqar task (it has one length)")
    check(cfg.data.mqar, cfg.data.seq_len)


def check(m: MQARConfig, seq_len: int) -> None:
    """DataError naming the key when examples of `seq_len` tokens cannot be built from `m`."""
    P, L, V = m.num_kv_pairs, seq_len, m.vocab
    if P < 1:
        raise DataError("data.mqar.num_kv_pairs must be >= 1")
    if V < 4 or V // 2 - 1 < P:
        raise DataError(f"data.mqar.vocab {V} has fewer than num_kv_pairs ({P}) keys")
    if (L - 2 * P) // 2 < P:
        raise DataError(
            f"data.seq_len {L} is too short for {P} pairs and their queries: needs >= {4 * P}"
        )
    if min(m.train_examples, m.val_examples) < 1:
        raise DataError("data.mqar.train_examples and data.mqar.val_examples must be >= 1")
    if not m.power_a > 0:
        raise DataError("data.mqar.power_a must be > 0")
    for n in m.train_lengths:
        if n < 1 or L % n or (P * n) % L:
            raise DataError(
                f"data.mqar.train_lengths: {n} must divide data.seq_len {L} and leave a whole "
                f"number of pairs ({P} x {n} / {L})"
            )
        check(_part(m, P * n // L), n)


def _part(m: MQARConfig, pairs: int) -> MQARConfig:
    """The config of one shorter example of the training mixture (`pairs` pairs)."""
    return dataclasses.replace(m, num_kv_pairs=pairs, train_lengths=())


def example(
    m: MQARConfig, seq_len: int, split: str, index: int, part: tuple[int, ...] = ()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tokens int32[L + 1], answer mask bool[L + 1], inputs int32[L]) with L = seq_len.
    `tokens` holds each query's value after its key: the targets are tokens[1:]. The mask marks
    the P values that answer a query (predicted from the query key before them). `inputs` is
    what the model reads: tokens[:-1], but where the layout hides them (echo_values False) the
    answered values are replaced by the query region's filler. `part` tells apart the examples
    packed into one mixture row."""
    P, L, V = m.num_kv_pairs, seq_len + 1, m.vocab
    rng = np.random.default_rng([m.seed, _SPLIT_SEEDS[split], index, *part])
    keys = 1 + rng.choice(V // 2 - 1, P, replace=False)
    values = V // 2 + rng.choice(V - V // 2, P, replace=False)
    slots = (L - 1 - 2 * P) // 2
    a = m.power_a
    p = a * np.arange(1, slots + 1, dtype=np.float64) ** (a - 1)
    gaps = rng.choice(slots, P, replace=False, p=p / p.sum())
    noise = rng.integers(0, V, L).astype(np.int32)  # drawn either way: same keys and gaps
    filler = noise if m.random_non_queries else np.zeros(L, np.int32)
    tokens = filler.copy()
    tokens[0 : 2 * P : 2], tokens[1 : 2 * P : 2] = keys, values
    at = 2 * P + 2 * gaps
    tokens[at], tokens[at + 1] = keys, values
    answer = np.zeros(L, bool)
    answer[at + 1] = True
    inputs = tokens[:-1] if m.echo_values else np.where(answer, filler, tokens)[:-1]
    return tokens, answer, inputs


def targets_per_row(cfg: DataConfig) -> int:
    """Only the P query positions of a row are scored (see lmtrain.step.score)."""
    return cfg.mqar.num_kv_pairs


class MQARSplit(RowSource):
    """One split as a row source: `num_rows` examples, `load_rows` -> model batches."""

    eod_id = pad_id = 0

    def __init__(self, cfg: DataConfig, split: str):
        self.m, self.seq_len, self.split = cfg.mqar, cfg.seq_len, split
        self.n = self.m.train_examples if split == "train" else self.m.val_examples
        self.targets_per_row = targets_per_row(cfg)

    def __len__(self) -> int:
        return self.n * (self.seq_len + 1)

    def num_rows(self, seq_len: int) -> int:
        return self.n

    def num_eval_rows(self, seq_len: int) -> int:
        return self.n

    def load_rows(self, rows: Sequence[int], seq_len: int) -> Batch:
        """Batch of examples `rows` (ids >= n: padding rows with weight 0): inputs,
        segment_ids, positions [B, L]; target_index (the query keys' positions), targets (their
        values) and weights, [B, P]."""
        B, P = len(rows), self.m.num_kv_pairs
        inputs = np.zeros((B, seq_len), np.int32)
        targets = np.zeros((B, seq_len), np.int32)
        segments = np.ones((B, seq_len), np.int32)
        positions = np.tile(np.arange(seq_len, dtype=np.int32), (B, 1))
        index = np.tile(np.arange(P, dtype=np.int32), (B, 1))
        weights = np.zeros((B, P), np.float32)
        for j, r in enumerate(rows):
            if r >= self.n:
                continue  # a padding row
            n = self._length(int(r))
            parts = []
            for s in range(seq_len // n):  # one example per segment of n tokens
                if n == seq_len:
                    tokens, answer, x = example(self.m, seq_len, self.split, int(r))
                else:
                    sub = _part(self.m, P * n // seq_len)
                    tokens, answer, x = example(sub, n, self.split, int(r), (n, s))
                at = slice(s * n, (s + 1) * n)
                inputs[j, at], targets[j, at] = x, tokens[1:]
                segments[j, at] = s + 1
                positions[j, at] -= s * n
                parts.append(s * n + np.flatnonzero(answer[1:]))
            index[j] = np.concatenate(parts)
            weights[j] = 1.0
        return {
            "inputs": inputs,
            "targets": np.take_along_axis(targets, index, axis=1),
            "target_index": index,
            "segment_ids": segments,
            "positions": positions,
            "weights": weights,
        }

    def _length(self, row: int) -> int:
        """The example length packed into training row `row` (the mixture takes turns)."""
        mix = self.m.train_lengths
        return mix[row % len(mix)] if mix and self.split == "train" else self.seq_len

    def load_eval_rows(
        self, rows: Sequence[int], seq_len: int, token_bytes: np.ndarray | None = None
    ) -> Batch:
        batch = self.load_rows(rows, seq_len)
        batch["target_bytes"] = np.zeros_like(batch["weights"])
        return batch


def make_tokenizer(cfg: DataConfig) -> MQARTokenizer:
    """The task's tokenizer (data.tokenizer does not apply)."""
    return MQARTokenizer(cfg.mqar.vocab)


def corpus_splits(cfg: DataConfig) -> tuple[MQARSplit, MQARSplit, dict]:
    """(train, val, stats) for `load_corpus`."""
    check(cfg.mqar, cfg.seq_len)
    train = MQARSplit(cfg, "train")
    val = MQARSplit(cfg, "val")
    stats = {
        split.split: {"docs": split.n, "tokens": split.n * cfg.seq_len, "bytes": 0}
        for split in (train, val)
    }
    return train, val, stats
