"""Mixtures (data.mixture): realised shares, determinism, resume, epochs, max_epochs, per-component
evaluation and the refusals."""

import json

import numpy as np
import pytest
from conftest import TINY_SETS, losses

from lmtrain import config as config_lib
from lmtrain import data, train
from lmtrain.data.mixture import BLOCK, Mixture, MixtureIterator, MixtureSampler
from lmtrain.data.pipeline import TokenStream
from lmtrain.errors import ConfigError, DataError


def _mixed(corpus, tmp_path, **sets):
    small = tmp_path / "small"
    small.mkdir(exist_ok=True)
    for i in range(40):
        (small / f"s{i}.txt").write_text("zz yy xx " * (10 + i % 7) + "\n")
    base = {k: v for k, v in TINY_SETS.items()}
    cfg = config_lib.override(config_lib.Config(), base)
    mix = {
        "data.mixture.big.source": str(corpus),
        "data.mixture.big.weight": 0.7,
        "data.mixture.small.source": str(small),
        "data.mixture.small.weight": 0.3,
    }
    return config_lib.override(cfg, {**mix, **sets}).validate()


def test_realised_shares_match_the_weights_over_1000_steps():
    s = MixtureSampler(
        np.array([5000, 40, 900]), [(0, np.array([0.5, 0.2, 0.3]))], np.full(3, np.inf), seed=3
    )
    comp, index = s.assign(list(range(1000 * 32)))
    share = np.bincount(comp, minlength=3) / len(comp)
    assert np.abs(share - [0.5, 0.2, 0.3]).max() < 0.01
    assert np.array_equal(s.counts(32000), np.bincount(comp, minlength=3))
    for c in range(3):  # every component's draws are 0, 1, 2, ... in row order
        assert np.array_equal(index[comp == c], np.arange((comp == c).sum()))
    other = MixtureSampler(
        np.array([5000, 40, 900]), [(0, np.array([0.5, 0.2, 0.3]))], np.full(3, np.inf), seed=4
    )
    assert not np.array_equal(other.assign(list(range(BLOCK)))[0], comp[:BLOCK])


def test_stages_and_max_epochs_renormalise_or_stop():
    stages = [(0, np.array([0.5, 0.5])), (2048, np.array([0.9, 0.1]))]
    s = MixtureSampler(np.array([1000, 100]), stages, np.array([np.inf, 250.0]), seed=0)
    comp, _ = s.assign(list(range(4096)))
    assert s.counts(4096)[1] == 250  # the small one left at its limit, never past it
    ((row, c),) = s.exhausted
    assert abs(np.mean(comp[:row] == 1) - 0.5) < 0.05
    assert c == 1 and (comp[row:] == 0).all() and s.end_row is None
    stop = MixtureSampler(np.array([1000, 100]), stages, np.array([np.inf, 250.0]), 0, stop=True)
    assert stop.end_row == row
    with pytest.raises(DataError, match="ends at"):
        stop.assign([row])


def test_epochs_restart_in_a_new_order(tmp_path):
    tokens = np.arange(1, 8 * 10 + 2, dtype=np.int32) % 50 + 1
    tiny_stream = TokenStream(tokens, eod_id=0, pad_id=0)  # 10 rows of 8
    big = TokenStream(np.arange(1, 8 * 200 + 2, dtype=np.int32) % 50 + 1, eod_id=0, pad_id=0)
    comps = {
        "big": config_lib.MixtureComponent("x", 0.5),
        "tiny": config_lib.MixtureComponent("y", 0.5),
    }
    it = MixtureIterator(
        Mixture({"big": big, "tiny": tiny_stream}, comps),
        seq_len=8, global_batch=4, seed=0, first_row=0, local_batch=4, prefetch=0,
    )  # fmt: skip
    [next(it) for _ in range(10)]
    seen = it.seen(10)
    assert seen["epochs/tiny"] == pytest.approx(2.0, abs=0.2)
    assert seen["tokens/big"] + seen["tokens/tiny"] == 10 * 4 * 8
    orders = Mixture({"big": big, "tiny": tiny_stream}, comps).orders(8, 0)[1]
    first, second = [orders[i] for i in range(10)], [orders[i] for i in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10)) and first != second


def test_mixture_run_resumes_exactly_and_logs_per_component(corpus, tmp_path):
    cfg = _mixed(corpus, tmp_path, **{"optim.schedule": "constant"})
    whole = train.train(cfg, tmp_path / "whole")
    assert "val_loss/big" in whole and "val_bpb/small" in whole
    rows = [json.loads(x) for x in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["tokens/big"] + last["tokens/small"] == 8 * 8 * 32
    short = config_lib.override(cfg, {"train.steps": 4})
    train.train(short, tmp_path / "part")
    cfg_path = tmp_path / "part/config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"steps": 4', '"steps": 8'))
    train.train(cfg, tmp_path / "part")
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "part")
    assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)


def test_per_component_eval_equals_a_single_source_eval(corpus, tmp_path):
    from lmtrain import run as run_lib
    from lmtrain.evaluate import Evaluator

    cfg = _mixed(corpus, tmp_path, **{"eval.max_batches": 0})
    run = run_lib.setup(cfg, optimizer=False)
    import jax
    from flax import nnx

    from lmtrain import models

    params = nnx.to_pure_dict(nnx.state(models.build(run.cfg.model, nnx.Rngs(params=0))))
    params = jax.device_put(params, run.param_shardings)
    mixed = Evaluator(run, data.load_corpus(run.cfg.data, run.tokenizer).val)(params)
    alone_cfg = config_lib.override(cfg, {"data.mixture": {}, "data.source": str(corpus)})
    alone = run_lib.setup(alone_cfg, optimizer=False)
    single = Evaluator(alone, data.load_corpus(alone.cfg.data, alone.tokenizer).val)(params)
    assert mixed["val_loss/big"] == pytest.approx(single["val_loss"], rel=1e-6)
    assert mixed["val_bpb/big"] == pytest.approx(single["val_bpb"], rel=1e-6)
    assert mixed["val_loss/small"] != pytest.approx(mixed["val_loss/big"], rel=1e-3)


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"data.mixture.big.weight": -1.0}, "data.mixture.big.weight"),
        ({"data.mixture.big.weight": 0.0, "data.mixture.small.weight": 0.0}, "every component"),
        ({"data.mixture.big.weight": "heavy"}, "data.mixture.big.weight"),
        ({"data.mixture.bgi.weight": 0.5}, "no component 'bgi'"),
        ({"data.mixture.big.wieght": 0.5}, "did you mean 'weight'"),
    ],
)
def test_bad_mixtures_are_refused_naming_the_component(corpus, tmp_path, sets, match):
    with pytest.raises(ConfigError, match=match):
        _mixed(corpus, tmp_path, **sets)


def test_a_missing_component_source_is_named(corpus, tmp_path):
    from lmtrain import run as run_lib

    cfg = _mixed(corpus, tmp_path, **{"data.mixture.small.source": str(tmp_path / "nope")})
    with pytest.raises(DataError, match="data.mixture.small"):
        run_lib.setup(cfg, optimizer=False)
        data.load_corpus(cfg.data, data.make_tokenizer(cfg.data))


def test_mixture_in_a_yaml_file(corpus, tmp_path):
    p = tmp_path / "mix.yaml"
    p.write_text(
        f"data:\n  mixture:\n    a: {{source: {corpus}, weight: 0.5}}\n"
        f"    b: {{source: stdlib-prose, weight: [[0, 0.5], [100, 0.1]]}}\n"
    )
    cfg = config_lib.load_file(p)
    assert cfg.data.components()["b"].weight == ((0, 0.5), (100, 0.1))
    assert config_lib.from_dict(config_lib.to_dict(cfg)).data == cfg.data


@pytest.fixture
def mix_json(corpus, tmp_path):
    """A config file with a two-component mixture of text directories."""
    p = tmp_path / "mix.json"
    config_lib.save_json(_mixed(corpus, tmp_path), p)
    return p


@pytest.mark.parametrize(
    "sets, words",
    [
        (["data.mixture.small.weight=-1"], ["data.mixture.small.weight", ">= 0"]),
        (["data.mixture.big.weight=0", "data.mixture.small.weight=0"], ["every component"]),
        (["data.mixture.small.weight=lots"], ["data.mixture.small.weight"]),
        (["data.mixture.smal.weight=0.5"], ["no component 'smal'", "big, small"]),
        (["data.mixture.small.wieght=0.5"], ["data.mixture.small", "did you mean 'weight'"]),
        (["data.mixture.small.source=/no/such/dir"], ["data.mixture.small", "/no/such/dir"]),
    ],
)
def test_cli_refusals_exit_2_naming_the_component(mix_json, tmp_path, capsys, sets, words):
    from lmtrain.cli import main

    args = ["train", "--config", str(mix_json), "--workdir", str(tmp_path / "wd")]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert len(err.strip().splitlines()) == 1, err  # one clear message, no traceback
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_cli_refuses_components_prepared_with_different_tokenizers(corpus, tmp_path, capsys):
    from lmtrain.cli import main

    cache = str(tmp_path / "cache")
    for name, tok in (("a", "bytes"), ("b", "bpe:300")):
        args = ["prepare", str(corpus), "--out", str(tmp_path / name), "--tokenizer", tok]
        assert main([*args, "--cache-dir", cache, "--no-progress"]) == 0
    capsys.readouterr()
    cfg = _mixed(corpus, tmp_path, **{"data.tokenizer": "bytes"})
    config_lib.save_json(config_lib.override(cfg, {"data.mixture": {}}), tmp_path / "c.json")
    args = ["train", "--config", str(tmp_path / "c.json"), "--workdir", str(tmp_path / "wd")]
    for name in ("a", "b"):
        args += ["--set", f"data.mixture.{name}.source={tmp_path / name}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "data.mixture.b" in err and "prepared with tokenizer bpe300" in err, err


def test_unique_tokens_is_a_fixed_random_subset_over_the_whole_split():
    """A budget of U tokens trains on U / seq_len rows spread over the split (not its first
    rows), the same rows for any train.seed, and nothing outside them."""
    n_rows, seq_len = 400, 8
    stream = TokenStream(np.arange(n_rows * seq_len + 1, dtype=np.int32) + 1, eod_id=0, pad_id=0)
    comps = {"a": config_lib.MixtureComponent("x", 1.0, unique_tokens=40 * seq_len)}
    mix = Mixture({"a": stream}, comps)
    (subset,) = mix.subsets(seq_len)
    assert len(subset) == 40 and len(set(subset)) == 40 and subset.max() > n_rows // 2
    rows = set()
    for seed in (0, 1):
        it = MixtureIterator(
            mix, seq_len=seq_len, global_batch=10, seed=seed, first_row=0, local_batch=10,
            prefetch=0,
        )  # fmt: skip
        for _ in range(8):  # 2 epochs over the 40 rows
            rows |= {int(r[0] - 1) // seq_len for r in next(it)["inputs"]}
        assert it.seen(8)["epochs/a"] == pytest.approx(2.0)
        assert it.seen(8)["tokens/a"] == 80 * seq_len
    assert rows == set(subset.tolist())
    full = Mixture({"a": stream}, {"a": config_lib.MixtureComponent("x", 1.0)})
    assert full.subsets(seq_len) == [None]


def test_sweep_results_carry_epochs_and_fit_leaves_repeated_runs_out(capsys):
    from lmtrain.sweeps.report import split_repeated
    from lmtrain.sweeps.runner import data_seen

    last = {"tokens": 640, "tokens/a": 480, "epochs/a": 4.0, "tokens/b": 160, "epochs/b": 0.5}
    got = data_seen(last, {"val_loss": 3.0, "val_loss/a": 2.5, "val_bpb/b": 4.0})
    assert got["epochs"] == 4.0 and got["unique_tokens"] == 120 + 320
    assert got["final_val_loss/a"] == 2.5 and got["final_val_bpb/b"] == 4.0
    assert got["tokens/b"] == 160 and "final_val_loss" not in got
    assert data_seen({"tokens": 300, "epochs": 1.5}, {}) == {"epochs": 1.5, "unique_tokens": 200}
    rows = [{"name": "fresh", "epochs": 0.3}, {"name": "old"}, {"name": "rep", "epochs": 4.0}]
    kept, out = split_repeated(rows, "exclude")
    assert [r["name"] for r in kept] == ["fresh", "old"] and out == ["rep"]
    assert (
        "left out 1 of 3 runs that saw repeated tokens (up to 4 epochs)" in capsys.readouterr().out
    )
    assert split_repeated(rows, "include") == (rows, [])
    with pytest.raises(ConfigError, match="every finished run saw repeated tokens"):
        split_repeated(rows[2:], "exclude")


def test_single_source_rows_count_epochs(corpus, tmp_path):
    cfg = config_lib.override(config_lib.Config(), TINY_SETS).validate()
    train.train(cfg, tmp_path / "wd")
    rows = [json.loads(x) for x in (tmp_path / "wd/metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    train_rows = data.load_corpus(cfg.data, data.make_tokenizer(cfg.data)).train.num_rows(32)
    assert last["epochs"] == pytest.approx(last["step"] * cfg.train.batch_size / train_rows)
