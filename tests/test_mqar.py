"""MQAR: the task's structure and odds, the scored-positions step == the dense step, errors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain import models, step
from lmtrain.cli import main
from lmtrain.config import DataConfig, MQARConfig
from lmtrain.data import DataError, load_corpus, make_tokenizer, mqar

CFG = DataConfig(source="mqar", seq_len=64, mqar=MQARConfig(num_kv_pairs=4, vocab=64))


def with_task(cfg: DataConfig, **fields) -> DataConfig:
    """`cfg` with data.mqar fields replaced."""
    return dataclasses.replace(cfg, mqar=dataclasses.replace(cfg.mqar, **fields))


def example(cfg: DataConfig, split: str, index: int):
    """(tokens, answer): the sequence with every value after its key, and the answer mask."""
    return mqar.example(cfg.mqar, cfg.seq_len, split, index)[:2]


def test_example_structure():
    P, V = CFG.mqar.num_kv_pairs, CFG.mqar.vocab
    for i in range(200):
        tokens, answer = example(CFG, "train", i)
        assert tokens.shape == answer.shape == (CFG.seq_len + 1,)
        keys, values = tokens[0 : 2 * P : 2], tokens[1 : 2 * P : 2]
        assert len(set(keys)) == P and all(1 <= k < V // 2 for k in keys)
        assert all(V // 2 <= v < V for v in values)
        at = np.flatnonzero(answer)
        assert len(at) == P and at.min() > 2 * P and np.all((at - 2 * P) % 2 == 1)
        pairs = dict(zip(keys, values, strict=True))
        # Every key is asked once, and the token after it is its value.
        assert sorted(tokens[at - 1]) == sorted(keys)
        assert all(pairs[k] == v for k, v in zip(tokens[at - 1], tokens[at], strict=True))
    a, _ = example(CFG, "train", 7)
    np.testing.assert_array_equal(a, example(CFG, "train", 7)[0])  # pure function
    assert not np.array_equal(a, example(CFG, "val", 7)[0])  # splits differ
    other = with_task(CFG, seed=1)
    assert not np.array_equal(a, example(other, "train", 7)[0])


def test_query_region_layouts():
    """Zoology's layout (default): the slot after a query key holds filler, random ids
    (random_non_queries) or 0; echo_values: the value itself. Keys, values, gaps and targets
    are the same in all three; only the inputs at the answered values differ."""
    P = CFG.mqar.num_kv_pairs
    zeros, echo = with_task(CFG, random_non_queries=False), with_task(CFG, echo_values=True)
    leaked = 0
    for i in range(50):
        t, answer, x = mqar.example(CFG.mqar, CFG.seq_len, "train", i)
        tz, az, xz = mqar.example(zeros.mqar, CFG.seq_len, "train", i)
        te, ae, xe = mqar.example(echo.mqar, CFG.seq_len, "train", i)
        np.testing.assert_array_equal(t, te)
        np.testing.assert_array_equal(answer, az)
        same = np.flatnonzero(answer | np.roll(answer, -1))  # queried keys and their values
        np.testing.assert_array_equal(t[same], tz[same])
        np.testing.assert_array_equal(t[: 2 * P], tz[: 2 * P])
        at = np.flatnonzero(answer[:-1])  # value slots that are also inputs
        np.testing.assert_array_equal(xe, t[:-1])  # echo: the inputs are the sequence
        np.testing.assert_array_equal(np.delete(x, at), np.delete(t[:-1], at))
        np.testing.assert_array_equal(xz[at], 0)  # Zoology, random_non_queries=False
        leaked += int(np.sum(x[at] == t[at]))  # random filler equals the value 1 in V
        # random_non_queries=False: the query region is 0 but for the query keys
        key_at = np.flatnonzero(answer) - 1
        assert np.count_nonzero(xz[2 * P :]) == P
        np.testing.assert_array_equal(xz[key_at], t[key_at])
    assert leaked < 5  # 50 x <= 4 answered slots at 1/64 each: ~3 expected by chance


def test_old_mqar_run_configs_keep_the_echo_layout(tmp_path):
    """A run's config.json written before the layout keys existed resumes on its own data."""
    from lmtrain.config import Config, load_json, save_json

    cfg = Config(data=CFG)
    save_json(cfg, tmp_path / "config.json")
    assert load_json(tmp_path / "config.json").data.mqar.echo_values is False
    d = json.loads((tmp_path / "config.json").read_text())
    del d["data"]["mqar"]["echo_values"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    assert load_json(tmp_path / "config.json").data.mqar.echo_values is True


def test_training_mixture_packs_whole_examples_into_segments():
    cfg = with_task(CFG, train_lengths=(16, 32, 64))
    split = mqar.MQARSplit(cfg, "train")
    b = split.load_rows(list(range(6)), 64)
    assert b["target_index"].shape == (6, 4)  # every row scores P = 4 queries
    for j in range(6):
        n = (16, 32, 64)[j % 3]
        seg = b["segment_ids"][j]
        np.testing.assert_array_equal(seg, 1 + np.arange(64) // n)
        np.testing.assert_array_equal(b["positions"][j], np.arange(64) % n)
        for q, t in zip(b["target_index"][j], b["targets"][j], strict=True):
            # The query key is the input at q; the same key earlier in q's segment, followed
            # by the target value: each query is answerable inside its own example.
            key, lo = b["inputs"][j, q], (q // n) * n
            before = np.flatnonzero(b["inputs"][j, lo:q] == key) + lo
            assert len(before) and b["inputs"][j, before[0] + 1] == t
        assert len(np.unique(seg[b["target_index"][j]])) == 64 // n  # P n / L per example
    # Validation stays the task itself: one example of 64 tokens and 4 pairs per row.
    v = mqar.MQARSplit(cfg, "val").load_rows([0, 1], 64)
    assert (v["segment_ids"] == 1).all()
    with pytest.raises(DataError, match="data.mqar.train_lengths"):
        mqar.check(with_task(CFG, train_lengths=(24,)).mqar, 64)


def test_query_gaps_follow_the_power_law():
    """Slot frequencies over 4,000 examples match the sequential draw without replacement
    from odds a (g + 1)^(a - 1), simulated independently (tolerance: 4 binomial sigmas)."""
    cfg = with_task(dataclasses.replace(CFG, seq_len=32), num_kv_pairs=2, power_a=0.3)
    slots = (cfg.seq_len - 2 * cfg.mqar.num_kv_pairs) // 2
    counts = np.zeros(slots)
    n = 4000
    for i in range(n):
        _, answer = example(cfg, "train", i)
        counts[(np.flatnonzero(answer) - 1 - 2 * cfg.mqar.num_kv_pairs) // 2] += 1
    odds = 0.3 * np.arange(1, slots + 1) ** (0.3 - 1)
    p1 = odds / odds.sum()
    # P(slot chosen in 2 draws without replacement) = p1 + sum_j p1_j p1 / (1 - p1_j), j != slot
    p2 = np.array([sum(p1[j] * p1[s] / (1 - p1[j]) for j in range(slots) if j != s)
                   for s in range(slots)])  # fmt: skip
    want = p1 + p2
    sigma = np.sqrt(n * want * (1 - want))
    assert np.all(np.abs(counts - n * want) < 4 * sigma + 1)
    assert counts[0] > 3 * counts[-1]  # favours short gaps


def test_batches_score_only_queries():
    split = mqar.MQARSplit(CFG, "train")
    b = split.load_rows([3, 5, CFG.mqar.train_examples], CFG.seq_len)  # last row is padding
    assert b["target_index"].shape == b["targets"].shape == b["weights"].shape == (3, 4)
    np.testing.assert_array_equal(b["weights"][:2], 1.0)
    np.testing.assert_array_equal(b["weights"][2], 0.0)
    tokens, answer, inputs = mqar.example(CFG.mqar, CFG.seq_len, "train", 5)
    np.testing.assert_array_equal(b["inputs"][1], inputs)
    np.testing.assert_array_equal(b["targets"][1], tokens[1:][b["target_index"][1]])
    np.testing.assert_array_equal(b["target_index"][1], np.flatnonzero(answer) - 1)


def _dense(batch: dict, seq_len: int) -> dict:
    """The same batch with every position's target and weights 1 only at the queries."""
    B = batch["inputs"].shape[0]
    targets = np.zeros((B, seq_len), np.int32)
    weights = np.zeros((B, seq_len), np.float32)
    np.put_along_axis(targets, batch["target_index"], batch["targets"], axis=1)
    np.put_along_axis(weights, batch["target_index"], batch["weights"], axis=1)
    rest = {k: v for k, v in batch.items() if k not in ("target_index", "targets", "weights")}
    return {**rest, "targets": targets, "weights": weights, "target_bytes": 0 * weights}


@pytest.mark.parametrize("name", ["transformer", pytest.param("gla", marks=pytest.mark.slow)])
def test_scored_positions_step_equals_dense_step(name):
    """Running the head on the Q query positions gives the dense step's loss, accuracy and
    gradients (the dense batch weights the same positions)."""
    model_cfg = models.family(name).Config(
        name=name, vocab_size=CFG.mqar.vocab, d_model=32, n_layers=2, n_heads=2
    )
    graphdef, params = nnx.split(models.build(model_cfg, nnx.Rngs(0)))
    params = nnx.to_pure_dict(params)
    sparse = mqar.MQARSplit(CFG, "val").load_eval_rows(list(range(4)), CFG.seq_len)
    dense = _dense(sparse, CFG.seq_len)
    ev = jax.jit(step.make_eval_step(graphdef))
    got, want = ev(params, sparse), ev(params, dense)
    for k in ("nll_sum", "correct", "tokens"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)

    def loss(p, batch):
        nll, _ = step.token_nll(graphdef, p, batch)
        return (nll * batch["weights"]).sum()

    grad = jax.jit(jax.grad(loss))  # one compile per batch layout, not one per op
    g_sparse = grad(params, {k: jnp.asarray(v) for k, v in sparse.items()})
    g_dense = grad(params, {k: jnp.asarray(v) for k, v in dense.items()})
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 g_sparse, g_dense)  # fmt: skip


def test_tokenizer_and_corpus():
    tok = make_tokenizer(CFG)
    assert tok.vocab_size == 64 and tok.decode(tok.encode("3 40 3")) == "3 40 3"
    with pytest.raises(DataError, match="token ids"):
        tok.encode("hello")
    corpus = load_corpus(CFG, tok)
    assert corpus.train.targets_per_row == 4 and corpus.val.num_eval_rows(64) == 3000


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(seq_len=15), "data.seq_len 15 is too short"),
        (dict(num_kv_pairs=0), "data.mqar.num_kv_pairs"),
        (dict(vocab=8), "fewer than num_kv_pairs"),
        (dict(val_examples=0), "data.mqar.val_examples"),
    ],
)
def test_bad_mqar_config(fields, match):
    seq_len = fields.pop("seq_len", CFG.seq_len)
    cfg = with_task(dataclasses.replace(CFG, seq_len=seq_len), **fields)
    with pytest.raises(DataError, match=match):
        load_corpus(cfg, make_tokenizer(CFG))


def _exp(tmp_path, sets: dict) -> str:
    path = tmp_path / "exp.py"
    path.write_text(
        "from lmtrain.config import Config, override\n"
        f"def get_config(arg=''):\n    return override(Config(), {sets!r})\n"
    )
    return str(path)


BASE = {
    "model.name": "transformer", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
    "data.source": "mqar", "data.seq_len": 32, "data.mqar.num_kv_pairs": 4, "data.mqar.vocab": 128,
    "data.mqar.val_examples": 64, "train.steps": 4, "train.batch_size": 8, "train.log_every": 2,
    "train.progress": False, "eval.batch_size": 8, "eval.max_batches": 0,
}  # fmt: skip


def test_train_on_mqar_reports_accuracy(tmp_path, capsys):
    wd = tmp_path / "w"
    assert main(["train", _exp(tmp_path, BASE), "--workdir", str(wd)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= out["val_acc"] <= 1.0 and out["val_tokens"] == 64 * 4
    assert "val_bpb" not in out  # no text, no bits per byte
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert any("val_acc" in r for r in rows)


def test_train_on_mqar_bad_length_exits_2(tmp_path, capsys):
    exp = _exp(tmp_path, {**BASE, "data.seq_len": 8})
    assert main(["train", exp, "--workdir", str(tmp_path / "w")]) == 2
    assert "data.seq_len 8 is too short" in capsys.readouterr().err


@pytest.mark.slow
def test_frontier_report_keeps_the_best_lr_per_cell(tmp_path, capsys):
    """experiments/mqar.py's report over two runs of one cell: the better lr is kept."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "mqar.py"
    spec = importlib.util.spec_from_file_location("mqar_experiment", path)
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    sweep = tmp_path / "sweep"
    for lr in (1e-3, 3e-2):
        sets = {**BASE, "optim.lr": lr, "model.tie_embeddings": True, "model.qkv_conv": 3}
        if lr == 3e-2:  # for the test mix below: some recall, and a training mixture
            sets = {**sets, "train.steps": 150, "data.mqar.train_lengths": (16, 32)}
        assert main(["train", _exp(tmp_path, sets), "--workdir", str(sweep / f"lr{lr}")]) == 0
    starting = sweep / "starting"  # a run whose process is still compiling: no metrics yet
    starting.mkdir()
    (starting / "config.json").write_text((sweep / "lr0.001" / "config.json").read_text())
    rows = exp.collect(sweep)
    assert len(rows) == 2 and {r["model"] for r in rows} == {"attention"}
    best = exp.best_per_cell(rows)
    assert len(best) == 1 and best[0]["val_acc"] == max(r["val_acc"] for r in rows)
    text = exp.report(str(sweep))
    assert "| attention | 32 |" in text and (sweep / "mqar_frontier.md").is_file()
    assert not (sweep / "mqar_frontier_testmix.png").exists()
    # KV cache floats (2 layers x K, V x 32 x 32) + q/k/v conv windows (2 layers x 2 taps x 3 x 32)
    assert f"{2 * 2 * 32 * 32 + 2 * 2 * 3 * 32:,}" in text
    assert "pooled = its valid/accuracy" not in text  # no run evaluated on it yet

    # Zoology's test mix: each slice is `lmtrain eval` at that length and pair count, and the
    # pooled accuracy weighs each slice by its queries, as Zoology's valid/accuracy does.
    run = sweep / "lr0.03"
    slices = ((16, 4), (64, 16))  # 16: shorter than a training length
    mix = exp.test_mix(run, examples=200, slices=slices)
    capsys.readouterr()
    sets = ["--set", "data.seq_len=64", "--set", "data.mqar.num_kv_pairs=16",
            "--set", "data.mqar.val_examples=200"]  # fmt: skip
    assert main(["eval", "--workdir", str(run), *sets]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert mix["accuracy"]["64/16"] == pytest.approx(alone["val_acc"], abs=1e-9)
    a, b = mix["accuracy"]["16/4"], mix["accuracy"]["64/16"]
    assert 0 < a != b > 0  # near chance (1/64) after 4 steps, but not alike: weights matter
    assert mix["pooled"] == pytest.approx((4 * a + 16 * b) / 20, abs=1e-12)
    assert json.loads((run / "testmix.json").read_text())["pooled"] == mix["pooled"]
    assert exp.test_mix(run, examples=200, slices=slices) == mix  # read back, not re-run
    text = exp.report(str(sweep))
    assert "Zoology's test mix" in text and "| 16/4 | 64/16 | pooled |" in text
    assert f"{100 * mix['pooled']:.1f}% (lr 0.03)" in text
    assert (sweep / "mqar_frontier_testmix.png").is_file()  # beside the 256/16 plot

    # The rows outlive the run directories (a frontier spans sessions whose machines are new):
    # the same report from stored rows alone, and the live directory's row wins over a stale one.
    stored = tmp_path / "rows.jsonl"
    stored.write_text("".join(json.dumps(r) + "\n" for r in exp.all_rows(str(sweep))))
    assert exp.report(str(tmp_path / "from_rows"), str(stored)) == text
    stale = [{**r, "val_acc": 0.0, "mix": None} for r in exp.all_rows(str(stored))]
    stored.write_text("".join(json.dumps(r) + "\n" for r in stale))
    assert exp.report(str(tmp_path / "merged"), str(sweep), str(stored)) == text
    assert exp.report(str(tmp_path / "stale"), str(stored)) != text


def test_every_frontier_model_is_named_back_by_its_label():
    """The report names a run by the MODELS label whose overrides its config holds: the most
    specific one, as "h3"'s overrides are all inside "h3-state-norm"'s."""
    import importlib.util
    from pathlib import Path

    from lmtrain.config import override

    path = Path(__file__).resolve().parents[1] / "experiments" / "mqar.py"
    spec = importlib.util.spec_from_file_location("mqar_experiment_labels", path)
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    base = exp.get_config("seq256")
    assert {"h3", "h3-state-norm", "h3-exact", "mamba2-d16", "mamba2-lmtrain"} <= set(exp.MODELS)
    for label in exp.MODELS:
        cfg = override(base, exp.model_sets(label, 64))
        assert exp._label(cfg) == label
        assert getattr(cfg.model, "state_norm", False) == label.endswith(("-state-norm", "-exact"))
        assert getattr(cfg.model, "shift_skip", False) == (label == "h3-exact")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("label", "learns"), [("based", True), ("attention", True), ("based-4block", False)]
)
def test_recall_guard_frontier_models_learn_mqar(label, learns, tmp_path):
    """The guard against lmtrain's BASED silently failing MQAR again (it sat at chance where
    Zoology's code learns): experiments/mqar.py's frontier models, on the one-minute "guard"
    task (seq 64, 4 pairs, vocab 512; chance 0.4%), must clearly learn recall in 200 steps.
    The old 4-block layout (SwiGLU MLPs, identity-initialised projected convs) does not: it is
    the side that shows this test can fail (measured 3% there vs 90% for "based")."""
    import importlib.util
    from pathlib import Path

    from lmtrain import train
    from lmtrain.config import override

    path = Path(__file__).resolve().parents[1] / "experiments" / "mqar.py"
    spec = importlib.util.spec_from_file_location("mqar_experiment_guard", path)
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)
    cfg = override(exp.get_config("guard"), exp.model_sets(label, 64))
    summary = train.train(cfg, tmp_path / label)
    assert summary["step"] == 200
    if learns:
        assert summary["val_acc"] > 0.5, summary
    else:
        assert summary["val_acc"] < 0.1, summary
