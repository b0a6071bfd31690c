"""Dataset decomposition: buckets, the step schedule and curricula, the iterator, training."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny as tiny_text

from lmtrain import config as config_lib
from lmtrain import run as run_lib
from lmtrain import sharding, train
from lmtrain.cli import main
from lmtrain.config import Config, ConfigError
from lmtrain.data import TokenStream, make_train_data
from lmtrain.data.decompose import DecomposedData, Schedule, decompose
from lmtrain.data.sources import DataError

EOD = 0


def doc_stream(lengths, seed=0) -> TokenStream:
    """Documents of the given lengths (eod included); token t (not eod) is unique: 1 + t."""
    ends = np.cumsum(lengths)
    tokens = np.arange(1, ends[-1] + 1, dtype=np.int64)
    tokens[ends - 1] = EOD
    return TokenStream(tokens, EOD, EOD)


def cfg_for(lo=2, hi=5, tokens=128, curriculum="grow_p2", cycles=1, seed=0) -> Config:
    return config_lib.override(
        Config(),
        {
            "data.packing": "decompose",
            "data.decompose.min_log2_len": lo,
            "data.decompose.max_log2_len": hi,
            "data.decompose.curriculum": curriculum,
            "data.decompose.cycles": cycles,
            "train.tokens_per_step": tokens,
            "train.seed": seed,
        },
    ).validate()


LENGTHS = [1, 2, 3, 4, 5, 9, 17, 33, 64, 65, 100, 129, 300, 31, 7, 250, 1000, 2, 40, 77]


@pytest.mark.parametrize("randomize", [True, False])
def test_decompose_keeps_every_target_once_inside_one_document(randomize):
    lo, hi = 2, 5
    ends = np.cumsum(LENGTHS)
    b = decompose(ends, lo, hi, randomize=randomize, seed=3)
    doc_of = np.searchsorted(ends, np.arange(ends[-1]), side="right")  # token -> document
    targets = []
    for k, starts in b.starts.items():
        for s in starts:
            assert doc_of[s] == doc_of[s + (1 << k)]  # 2^k + 1 tokens inside one document
            targets.extend(range(s + 1, s + (1 << k) + 1))
    assert len(targets) == len(set(targets)) == b.stats["kept"]  # nothing duplicated
    # What is kept is a prefix of each document; what is dropped its tail (< 2^lo targets).
    begins = np.concatenate([[0], ends[:-1]])
    kept_per_doc = np.bincount(doc_of[np.array(targets)], minlength=len(LENGTHS))
    for d, (s, e) in enumerate(zip(begins, ends, strict=True)):
        assert set(range(s + 1, s + 1 + kept_per_doc[d])) <= set(targets)
        assert 0 <= (e - s - 1) - kept_per_doc[d] < (1 << lo) or e - s - 1 <= 0
    if not randomize:  # the largest-first rule: exactly the binary representation
        for d, n in enumerate(LENGTHS):
            m = max(n - 1, 0)
            big = (m >> hi) << hi
            assert kept_per_doc[d] == big + ((m - big) >> lo << lo)
        assert len(b.starts[hi]) == sum((n - 1) >> hi for n in LENGTHS)  # 1000 tokens: 31
    assert b.stats["dropped"] == b.stats["targets"] - len(targets)
    assert b.stats["docs_too_short"] == sum(n - 1 < (1 << lo) for n in LENGTHS)
    assert b.stats["targets"] == sum(n - 1 for n in LENGTHS)
    again = decompose(ends, lo, hi, randomize=randomize, seed=3)  # a pure function of the seed
    assert all(np.array_equal(again.starts[k], b.starts[k]) for k in b.starts)


def released_cuts(m: int, lo: int, hi: int, rng) -> list[int]:
    """make_dd_buckets.get_binary (randomize=True) restated: the k of each piece of a document
    with m targets. (The release drops the boundary token between pieces; lmtrain shares it, so
    this counts targets as lmtrain does.)"""
    ks = np.arange(hi, lo - 1, -1)
    p = 2.0 ** np.arange(len(ks))
    out = []
    while m >= (1 << lo):
        k = int(np.log2(m))
        if k > hi:
            k = int(rng.choice(ks, p=p / p.sum()))
        out.append(k)
        m -= 1 << k
    return out


def test_long_documents_are_cut_at_random_like_the_release():
    """On 500 lengths up to 20k with buckets 2^6..2^13, the release's random cuts leave 50% of
    targets in the top bucket (65.7% when cutting whole 2^13 pieces, lmtrain's old rule)."""
    lo, hi = 6, 13
    lengths = np.random.default_rng(0).integers(2, 20000, size=500)
    ends = np.cumsum(lengths)
    ref_rng = np.random.default_rng(1)
    ref, ours = np.zeros(hi + 1), np.zeros(hi + 1)
    seeds = 12
    for seed in range(seeds):
        for n in lengths:
            for k in released_cuts(int(n) - 1, lo, hi, ref_rng):
                ref[k] += 1
        for k, v in decompose(ends, lo, hi, seed=seed).starts.items():
            ours[k] += len(v)
    top = ours[hi] * 2**hi / (ours * 2.0 ** np.arange(hi + 1)).sum()
    assert abs(top - 0.500) < 0.02, top
    # Pieces per bucket agree with the release's within sampling noise (5 sigma).
    for k in range(lo, hi + 1):
        assert abs(ours[k] - ref[k]) < 5 * np.sqrt(ref[k] + ours[k]) + 2, (k, ours[k], ref[k])
    largest = decompose(ends, lo, hi, randomize=False)
    t = {k: len(v) << k for k, v in largest.starts.items()}
    assert abs(t[hi] / sum(t.values()) - 0.657) < 0.005


def released_order(batches: dict[int, int], weight: dict[int, float], rng) -> list[int]:
    """open_lm's RandomMix(longest=True) as the release uses it, restated: odds fixed at
    batches x weight; a bucket drawn when empty leaves the draw, and the draw is repeated."""
    ks = [k for k in batches if batches[k]]
    odds = [batches[k] * weight[k] for k in ks]
    left = [batches[k] for k in ks]
    out = []
    while ks:
        i = int(np.searchsorted(np.cumsum(odds) / np.sum(odds), rng.random()))
        if left[i] == 0:
            del ks[i], odds[i], left[i]
            continue
        left[i] -= 1
        out.append(ks[i])
    return out


def test_curriculum_sampler_is_as_sharp_as_the_release():
    """grow_p2 over batches per bucket of a 500-document decomposition: where the last 2^8 batch
    is drawn, and the mean length of the last tenth, match the released sampler (lmtrain's old
    shrinking odds drew it at 21% of the cycle, not 10%, and the last tenth averaged 7.9k)."""
    lo, hi, tokens = 8, 13, 1 << 13
    batches = {8: 13, 9: 23, 10: 41, 11: 75, 12: 150, 13: 318}
    counts = {k: n * (tokens >> k) for k, n in batches.items()}
    weight = {k: 2.0 ** (hi - k) for k in batches}
    rng = np.random.default_rng(0)

    def figures(order):
        order = np.asarray(order)
        n = len(order)
        return np.flatnonzero(order == lo).max() / n, np.mean(2.0 ** order[9 * n // 10 :])

    ref = np.array([figures(released_order(batches, weight, rng)) for _ in range(300)])
    ours = np.array(
        [
            figures(
                Schedule(
                    counts, tokens, curriculum="grow_p2", cycles=1, seed=s, min_log2=lo, max_log2=hi
                ).cycle(0, 0)[0]
            )
            for s in range(300)
        ]
    )
    assert abs(ref[:, 0].mean() - 0.10) < 0.02 and abs(ours[:, 0].mean() - ref[:, 0].mean()) < 0.02
    assert ours[:, 1].mean() > 8100 and ref[:, 1].mean() > 8100


def test_batches_have_exact_lengths_constant_tokens_and_one_document_per_row():
    stream = doc_stream(LENGTHS * 6)
    cfg = cfg_for()
    dd = DecomposedData(stream, cfg, seed=0)
    ends = np.cumsum(LENGTHS * 6)
    seen = set()
    for step in range(dd.schedule.steps_per_epoch):
        batch = dd.load(step)
        _, _, k, _ = dd.schedule.locate(step)
        assert batch["inputs"].shape == (128 >> k, 1 << k)  # 2^k tokens, tokens_per_step fixed
        assert batch["inputs"].size == 128
        assert not (batch["inputs"] == EOD).any()  # eod only ever ends a row, as a target
        assert (batch["segment_ids"] == 1).all() and batch["weights"].all()
        np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
        for row in np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1):
            first = int(row[0]) - 1  # token value 1 + position
            doc = np.searchsorted(ends, first, side="right")
            assert first + len(row) <= ends[doc]  # the row lies inside one document
            key = (first, len(row))
            assert key not in seen  # no sequence twice in an epoch
            seen.add(key)
    used = sum(dd.schedule.batches[k] * dd.schedule.batch[k] for k in dd.schedule.ks)
    assert len(seen) == used
    # Every kept target is trained on once per epoch, but for the reported sequences that do
    # not fill a whole batch of their bucket.
    assert (
        sum(n - 1 for _, n in seen) == dd.buckets.stats["kept"] - dd.report()["unbatched_per_epoch"]
    )


def test_bucket_order_is_the_same_on_every_process_and_rows_split_between_them():
    stream = doc_stream(LENGTHS * 8)
    cfg = cfg_for(tokens=64)
    one = DecomposedData(stream, cfg, seed=3)
    two = [DecomposedData(stream, cfg, seed=3, process_index=p, process_count=2) for p in (0, 1)]
    for step in range(40):
        a, b0, b1 = one.load(step), two[0].load(step), two[1].load(step)
        assert b0["inputs"].shape == b1["inputs"].shape  # both processes pick the same bucket
        np.testing.assert_array_equal(np.concatenate([b0["inputs"], b1["inputs"]]), a["inputs"])


def test_resume_continues_with_the_exact_next_batch_and_checks_the_position():
    stream = doc_stream(LENGTHS * 4)
    cfg = cfg_for(tokens=64, cycles=2)
    dd = DecomposedData(stream, cfg, seed=1)
    it = dd.iterator(prefetch=2)
    for _ in range(7):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
    assert state["next_step"] == 7 and {"epoch", "cycle", "cursors", "rng"} <= set(state)
    expect = [next(it) for _ in range(dd.schedule.steps_per_epoch)]  # into the next epoch

    resumed = DecomposedData(stream, cfg, seed=1).iterator()
    resumed.set_state(state)
    for e in expect:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], e["inputs"])

    other = DecomposedData(stream, cfg_for(tokens=64, cycles=3), seed=1).iterator()
    with pytest.raises(DataError, match="does not match"):
        other.set_state(state)


@pytest.mark.parametrize("curriculum", ["uniform", "grow_p2", "shrink"])
def test_curricula_give_the_documented_odds(curriculum):
    # 2..5 with 40, 20, 10, 5 batches: P(first step from k) = left_k w_k / sum_j left_j w_j.
    lo, hi, tokens = 2, 5, 256
    batches = dict(zip(range(lo, hi + 1), (40, 20, 10, 5), strict=True))
    counts = {k: n * (tokens >> k) for k, n in batches.items()}
    left = {k: counts[k] // (tokens >> k) for k in counts}
    w = {
        "uniform": lambda k: 1,
        "grow_p2": lambda k: 2 ** (hi - k),
        "shrink": lambda k: 2 ** (k - lo),
    }
    odds = {k: left[k] * w[curriculum](k) for k in left}
    total = sum(odds.values())
    trials = 4000
    first = {k: 0 for k in counts}
    s = Schedule(counts, tokens, curriculum=curriculum, cycles=1, seed=7, min_log2=lo, max_log2=hi)
    for epoch in range(trials):
        first[s.locate(epoch * s.steps_per_epoch)[2]] += 1
    for k in counts:
        p = odds[k] / total
        sigma = np.sqrt(trials * p * (1 - p))
        assert abs(first[k] - trials * p) < 4.5 * sigma, (k, first[k], trials * p)
    # Every batch of the epoch is drawn exactly once, whatever the odds.
    order, index = s.cycle(0, 0)
    for k in counts:
        assert sorted(index[order == k].tolist()) == list(range(left[k]))
    # The curriculum shows over the whole epoch: where short batches sit relative to long ones.
    mean_pos = {k: np.mean(np.flatnonzero(order == k)) for k in counts}
    if curriculum == "grow_p2":
        assert mean_pos[lo] < mean_pos[hi]
    if curriculum == "shrink":
        assert mean_pos[lo] > mean_pos[hi]


def test_cycles_split_every_bucket_evenly():
    counts = {3: 8 * 30, 4: 4 * 12, 5: 2 * 7}  # 30, 12, 7 batches of 64 tokens
    s = Schedule(counts, 64, curriculum="grow_p2", cycles=3, seed=0, min_log2=3, max_log2=5)
    assert s.steps_per_epoch == 49
    for c in range(3):
        order, index = s.cycle(0, c)
        for k in counts:
            lo, hi = s.share[k][c], s.share[k][c + 1]
            assert sorted(index[order == k].tolist()) == list(range(lo, hi))
    assert [s.share[k][1] for k in counts] == [10, 4, 2]


def test_short_documents_empty_buckets_and_a_bucket_smaller_than_a_batch():
    # Nothing has 2^4 = 16 targets (bucket 4 is empty); only one doc has 32 (bucket 5 holds one
    # sequence, fewer than its batch of 2): neither is ever drawn nor compiled.
    lengths = ([3] + [9] * 8 + [5] * 10) * 2 + [33]
    cfg = cfg_for(lo=2, hi=5, tokens=64)
    stream = doc_stream(lengths)
    td = make_train_data(cfg, stream)
    it, shapes, report = td.iterator, td.shapes, td.report
    assert shapes == [(16, 4), (8, 8)]
    assert [report[f"seqs_{n}"] for n in (4, 8, 16, 32)] == [20, 16, 0, 1]
    assert [report[f"batches_{n}"] for n in (4, 8, 16, 32)] == [1, 2, 0, 0]
    assert report["docs_too_short"] == 2  # the 3-token documents
    buckets = {next(it)["inputs"].shape[1] for _ in range(50)}
    assert buckets == {4, 8}


def test_a_corpus_of_only_short_documents_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(DataError, match="shorter than 2"):
        make_train_data(cfg_for(lo=4, hi=5, tokens=64), doc_stream([3, 9, 15, 2]))
    corpus = tmp_path / "short"
    corpus.mkdir()
    for i in range(10):
        (corpus / f"d{i}.txt").write_text("x" * 10)  # 10 targets < 2^4
    code = main(
        ["train", "experiments/decomposition.py:smoke", "--workdir", str(tmp_path / "w")]
        + ["--set", f"data.source={corpus}", "--set", f"data.cache_dir={tmp_path / 'c'}"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "shorter than 2^data.decompose.min_log2_len" in err[-1]


def test_config_checks():
    with pytest.raises(ConfigError, match="multiple of 2\\^data.decompose.max_log2_len"):
        cfg_for(hi=5, tokens=48)
    with pytest.raises(ConfigError, match="curriculum"):
        cfg_for(curriculum="linear")
    with pytest.raises(ConfigError, match="packing"):
        config_lib.override(Config(), {"data.packing": "bucket"}).validate()
    cfg = cfg_for(lo=2, hi=4, tokens=64)
    assert cfg.train_shapes() == [(16, 4), (8, 8), (4, 16)]
    assert cfg.eval_lengths() == (4, 8, 16)
    concat = config_lib.override(Config(), {"train.tokens_per_step": 1024, "data.seq_len": 128})
    assert concat.train_shapes() == [(8, 128)]


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Documents of many lengths (so every bucket fills), with learnable structure."""
    d = tmp_path_factory.mktemp("ddcorpus")
    rng = np.random.default_rng(0)
    for i in range(300):  # byte tokens: n characters are n targets (8, 16, 32: one bucket)
        n = int(rng.choice([8, 16, 32, 100]))
        (d / f"doc{i:03d}.txt").write_text("".join("abcdefgh"[(j * 3 + i) % 8] for j in range(n)))
    return d


def tiny(corpus, tmp, **sets) -> Config:
    """The shared tiny config, 1 layer, on buckets of 2^3..2^5 tokens, 256 tokens a step."""
    dd = {
        "model.n_layers": 1,
        "model.n_heads": 2,
        "data.cache_dir": str(tmp / "cache"),
        "data.packing": "decompose",
        "data.decompose.min_log2_len": 3,
        "data.decompose.max_log2_len": 5,
        "train.tokens_per_step": 256,
    }
    return tiny_text(corpus, **{**dd, **sets})


def rows(workdir: Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_logs_shapes_compiles_each_bucket_once_and_resumes_exactly(
    corpus, tmp_path, capsys, monkeypatch
):
    full = train.train(tiny(corpus, tmp_path), tmp_path / "full")
    assert full["step"] == 8
    err = capsys.readouterr().err
    assert "compiled train step per (batch x seq_len): 32x8" in err and "8x32" in err
    r = rows(tmp_path / "full")
    assert r[0]["data"]["kept"] > 0 and r[0]["data"]["batches_8"] > 0
    steps = [x for x in r if "loss" in x]
    assert [x["step"] for x in steps] == list(range(1, 9))
    assert all(x["seq_len"] * x["batch_size"] == 256 for x in steps)
    assert [x["tokens"] for x in steps] == [256 * s for s in range(1, 9)]
    assert len({x["seq_len"] for x in steps}) > 1  # the steps really change shape
    ev = full
    assert {f"val_loss@{n}" for n in (8, 16, 32)} <= set(ev)

    # Stopped by SIGTERM at step 4, resumed for 4 more == 8 uninterrupted (same buckets,
    # same losses): the iterator position travels in the checkpoint.
    part = tmp_path / "part"
    calls = {"n": 0}
    real = sharding.global_batch

    def batch_then_sigterm(local, mesh):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", batch_then_sigterm)
    assert train.train(tiny(corpus, tmp_path), part)["step"] == 4
    monkeypatch.setattr(sharding, "global_batch", real)
    train.train(tiny(corpus, tmp_path), part)
    a = {x["step"]: (x["seq_len"], x["loss"]) for x in steps}
    b = {x["step"]: (x["seq_len"], x["loss"]) for x in rows(part) if "loss" in x}
    assert [a[s][0] for s in a] == [b[s][0] for s in a]
    np.testing.assert_allclose([b[s][1] for s in a], [a[s][1] for s in a], rtol=1e-6)


@pytest.mark.slow
def test_resume_with_another_curriculum_is_refused_and_the_checkpoint_kept(
    corpus, tmp_path, capsys
):
    work = tmp_path / "w"
    train.train(tiny(corpus, tmp_path, **{"train.steps": 4}), work)
    with pytest.raises(DataError, match="does not match"):
        train.train(tiny(corpus, tmp_path, **{"data.decompose.curriculum": "shrink"}), work)
    assert (work / "checkpoints" / "4").is_dir()
    assert not list((work / "checkpoints").glob("corrupt-*"))


def test_loss_at_each_length_is_the_loss_of_evaluating_at_that_length(corpus, tmp_path):
    from lmtrain import data
    from lmtrain.evaluate import Evaluator

    cfg = tiny(corpus, tmp_path, **{"eval.max_batches": 0})
    run = run_lib.setup(cfg)
    params = run.init_state()["params"]
    val = data.load_corpus(cfg.data, run.tokenizer).val
    ev = Evaluator(run, val)(params)
    # The same split evaluated as its own run at seq_len 8 (same tokens per eval batch).
    short = run_lib.setup(
        config_lib.override(cfg, {"data.seq_len": 8, "eval.batch_size": 32, "eval.lengths": ()})
    )
    alone = Evaluator(short, val)(params)
    np.testing.assert_allclose(ev["val_loss@8"], alone["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(ev["val_bpb@8"], alone["val_bpb"], rtol=1e-6)
    assert ev["val_loss@32"] == ev["val_loss"]  # the main context is not evaluated twice
    assert abs(ev["val_loss@8"] - ev["val_loss@32"]) > 1e-4  # the contexts really differ


@pytest.mark.slow
def test_with_a_sequence_axis_every_bucket_splits_or_the_config_is_refused(corpus, tmp_path):
    """Every bucket is split over the sequence axis, the 8-token one too (one token a device
    on (1, 1, 1, 8)): four steps give the unsplit run's losses. A bucket the axis does not
    divide, or whose pieces are shorter than a convolution's halo, is refused before any step."""
    steps = {"train.steps": 4, "train.eval_every": 0}
    train.train(tiny(corpus, tmp_path, **steps), tmp_path / "one")
    train.train(tiny(corpus, tmp_path, **steps, **{"mesh.shape": (1, 1, 1, 8)}), tmp_path / "seq")
    a = {x["step"]: (x["seq_len"], x["loss"]) for x in rows(tmp_path / "one") if "loss" in x}
    b = {x["step"]: (x["seq_len"], x["loss"]) for x in rows(tmp_path / "seq") if "loss" in x}
    assert [a[s][0] for s in a] == [b[s][0] for s in a] and len({a[s][0] for s in a}) > 1
    np.testing.assert_allclose([b[s][1] for s in a], [a[s][1] for s in a], rtol=1e-5)

    with pytest.raises(ConfigError, match="raise data.decompose.min_log2_len"):
        tiny(corpus, tmp_path, **{"mesh.shape": (1, 1, 1, 16), "data.decompose.min_log2_len": 3})
    # Mamba-2's width-4 convolution needs 3 tokens of the previous device: 8 / 4 = 2 is too few.
    mamba = {"model.name": "mamba2", "mesh.shape": (2, 1, 1, 4)}
    with pytest.raises(ConfigError, match="fewer than the 3 of earlier context"):
        train.train(tiny(corpus, tmp_path, **mamba), tmp_path / "m")
    assert not (tmp_path / "m/checkpoints").exists() or not any(
        (tmp_path / "m/checkpoints").iterdir()
    )
