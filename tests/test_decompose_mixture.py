"""Dataset decomposition of a mixture: each component in its own lengths, the weights over an
epoch, process-count independence, exact resume, training, and the refusals."""

import json

import numpy as np
import pytest
from conftest import TINY_SETS, losses

from lmtrain import config as config_lib
from lmtrain import train
from lmtrain.config import Config, ConfigError, MixtureComponent
from lmtrain.data import TokenStream
from lmtrain.data.decompose_mixture import DecomposedMixture
from lmtrain.data.mixture import Mixture
from lmtrain.errors import DataError

EOD = 0


def docs(lengths, first) -> TokenStream:
    """Documents of the given lengths (eod included); the other tokens are first, first + 1, ...
    so every token says which component and which place it came from."""
    ends = np.cumsum(lengths)
    tokens = np.arange(first, first + ends[-1], dtype=np.int64)
    tokens[ends - 1] = EOD
    return TokenStream(tokens, EOD, EOD)


SHORT = docs([9, 13, 12, 10, 16, 9, 11, 15] * 60, 1)  # 8-15 targets: one 8-token piece
LONG = docs([300, 150, 70, 520, 90] * 20, 1_000_000)  # pieces of 8 .. 64


def cfg_for(**sets) -> Config:
    base = {
        "data.packing": "decompose", "data.decompose.min_log2_len": 3,
        "data.decompose.max_log2_len": 6, "data.decompose.curriculum": "grow_p2",
        "train.tokens_per_step": 256,
    }  # fmt: skip
    return config_lib.override(Config(), {**base, **sets}).validate()


def mixture(w_short=0.3, w_long=0.7, weighting="given") -> Mixture:
    comps = {"short": MixtureComponent("a", w_short), "long": MixtureComponent("b", w_long)}
    return Mixture({"short": SHORT, "long": LONG}, comps, weighting)


def _targets(batch) -> np.ndarray:
    return batch["targets"]


def test_each_component_in_its_own_lengths_at_its_weight_over_an_epoch():
    dm = DecomposedMixture(mixture(), cfg_for(), seed=0)
    steps = dm.schedule.steps_per_epoch
    got = {"short": 0, "long": 0}
    for s in range(steps):
        b = dm.load(s)
        rows = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
        for row in rows:
            body = row[row != EOD]
            name = "long" if body.min() >= 1_000_000 else "short"
            assert (body >= 1_000_000).all() == (name == "long")  # one component a row
            stream = LONG if name == "long" else SHORT
            at = int(np.flatnonzero(np.asarray(stream.tokens) == row[0])[0])
            # A row is a contiguous piece of one document of its own component.
            assert np.array_equal(np.asarray(stream.tokens[at : at + len(row)]), row)
            assert EOD not in row[:-1]
            got[name] += len(row) - 1
            if name == "short":
                assert len(row) - 1 == 8  # short documents are never in long buckets
    share = got["short"] / (got["short"] + got["long"])
    assert share == pytest.approx(0.3, abs=0.02)
    seen = dm.seen(steps)
    assert seen["tokens/short"] == got["short"] and seen["tokens/long"] == got["long"]
    assert seen["epochs/short"] == pytest.approx(got["short"] / dm.kept[1])
    for curriculum in ("uniform", "grow_p2", "shrink"):  # the bar: 1% over 1,000 steps
        c = DecomposedMixture(
            mixture(), cfg_for(**{"data.decompose.curriculum": curriculum}), seed=0
        )
        t = c.seen(1000)
        assert t["tokens/short"] / (t["tokens/short"] + t["tokens/long"]) == pytest.approx(
            0.3, abs=0.01
        )
    # The schedule follows the mixture's lengths: the short corpus's weight is all 8-token.
    other = DecomposedMixture(mixture(0.7, 0.3), cfg_for(), seed=0)
    assert other.schedule.batches[3] > dm.schedule.batches[3]
    assert other.schedule.batches[6] < dm.schedule.batches[6]


def test_tokens_weighting_reads_every_piece_once_an_epoch():
    dm = DecomposedMixture(mixture(1.0, 1.0, "tokens"), cfg_for(), seed=0)
    assert dm.weights == pytest.approx(dm.kept / dm.kept.sum())
    for i, k in enumerate(dm.ks):  # the union of the components' pieces, bucket by bucket
        assert dm.schedule.batches[k] == int(dm.n[:, i].sum()) // dm.schedule.batch[k]


def test_rows_split_between_processes_and_resume_exactly():
    one = DecomposedMixture(mixture(), cfg_for(), seed=1)
    two = [DecomposedMixture(mixture(), cfg_for(), seed=1, process_index=i, process_count=2)
           for i in range(2)]  # fmt: skip
    for s in range(12):
        whole = one.load(s)["targets"]
        halves = np.concatenate([two[i].load(s)["targets"] for i in range(2)])
        assert np.array_equal(whole, halves)
    it = one.iterator(prefetch=0)
    [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))
    assert state["seen"] == one.seen(5)
    nxt = [_targets(next(it)) for _ in range(3)]
    again = DecomposedMixture(mixture(), cfg_for(), seed=1).iterator(prefetch=0)
    again.set_state(state)
    assert all(np.array_equal(a, _targets(next(again))) for a in nxt)
    changed = DecomposedMixture(mixture(0.5, 0.5), cfg_for(), seed=1).iterator(prefetch=0)
    with pytest.raises(DataError, match="weight"):
        changed.set_state(state)
    # A different seed draws other rows (the two sides can differ).
    seed2 = DecomposedMixture(mixture(), cfg_for(), seed=2)
    assert any(not np.array_equal(one.load(s)["targets"], seed2.load(s)["targets"])
               for s in range(5))  # fmt: skip


def test_a_component_of_only_short_documents_is_named():
    comps = {"tiny": MixtureComponent("a", 0.5), "long": MixtureComponent("b", 0.5)}
    m = Mixture({"tiny": docs([3, 4, 5] * 50, 1), "long": LONG}, comps)
    with pytest.raises(DataError, match=r"data.mixture.tiny: every document"):
        DecomposedMixture(m, cfg_for(), seed=0)


def _mixed(corpus, tmp_path, **sets):
    small = tmp_path / "small"
    small.mkdir(exist_ok=True)
    for i in range(40):
        (small / f"s{i}.txt").write_text("zz yy xx " * (10 + i % 7) + "\n")
    cfg = config_lib.override(config_lib.Config(), dict(TINY_SETS))
    dd = {
        "data.packing": "decompose", "data.decompose.min_log2_len": 3,
        "data.decompose.max_log2_len": 5, "train.tokens_per_step": 256,
        "data.mixture.big.source": str(corpus), "data.mixture.big.weight": 0.7,
        "data.mixture.small.source": str(small), "data.mixture.small.weight": 0.3,
        "optim.schedule": "constant",
    }  # fmt: skip
    return config_lib.override(cfg, {**dd, **sets}).validate()


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"data.mixture.big.weight": ((0, 0.7), (4, 0.2))}, "big.weight cannot have stages"),
        ({"data.mixture.small.max_epochs": 2.0}, "small.max_epochs must be 0"),
        ({"data.mixture.small.unique_tokens": 1000}, "small.unique_tokens must be 0"),
    ],
)
def test_concat_only_options_are_refused_under_decomposition(corpus, tmp_path, sets, match):
    with pytest.raises(ConfigError, match=match):
        _mixed(corpus, tmp_path, **sets)


@pytest.mark.slow
def test_decomposed_mixture_trains_logs_per_component_and_resumes_exactly(corpus, tmp_path):
    cfg = _mixed(corpus, tmp_path)
    whole = train.train(cfg, tmp_path / "whole")
    assert "val_loss/big" in whole and "val_loss/small" in whole
    rows = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    assert rows[0]["data"]["weight/big"] == pytest.approx(0.7)
    steps = [r for r in rows if "loss" in r]
    assert len({r["seq_len"] for r in steps}) > 1  # decomposed: the steps change length
    assert steps[-1]["tokens/big"] + steps[-1]["tokens/small"] == 8 * 256
    short = config_lib.override(cfg, {"train.steps": 4})
    train.train(short, tmp_path / "part")
    cfg_path = tmp_path / "part/config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"steps": 4', '"steps": 8'))
    train.train(cfg, tmp_path / "part")
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "part")
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
