"""lmtrain lm-eval: the JAX adapter against lm-evaluation-harness's own `hf` backend run on the
exported model (per-request loglikelihoods to 1e-4, identical metrics and generations)."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import compiled_call, tiny

from lmtrain import train
from lmtrain.cli import main

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASKS = ["lmtrain_mc", "lmtrain_rolling", "lmtrain_gen"]


def local_tasks(tmp_path: Path) -> Path:
    """The task YAMLs of tests/lm_eval_tasks with absolute data paths."""
    d = tmp_path / "tasks"
    d.mkdir()
    for y in TASKS_DIR.glob("*.yaml"):
        (d / y.name).write_text(y.read_text().replace("tests/lm_eval_tasks/", f"{TASKS_DIR}/"))
    return d


def per_request(results: dict, task: str) -> list:
    """Each document's responses: (loglikelihood, greedy) pairs, rolling sums or generations."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _flat_numbers(resps) -> np.ndarray:
    out = []
    for doc in resps:
        for r in doc:
            r = r[0] if isinstance(r, list) and len(r) == 1 else r
            out.append(r[0] if isinstance(r, (list, tuple)) else r)
    return np.asarray(out, np.float64)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["transformer"])  # the adapter runs any family's forward
def test_adapter_equals_lm_evals_hf_backend_on_the_export(family, corpus, tmp_path, capsys):
    import lm_eval
    from lm_eval.tasks import TaskManager

    sets = {"train.steps": 12, "data.seq_len": 64, "model.name": family}
    wd = tmp_path / "run"
    train.train(tiny(corpus, **sets), wd)
    tasks = local_tasks(tmp_path)
    out = tmp_path / "ours.json"
    code = main(
        ["lm-eval", "--workdir", str(wd), "--tasks", ",".join(TASKS), "--include-path"]
        + [str(tasks), "--batch-size", "4", "--output", str(out)]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "lmtrain_mc" in table and "acc_norm" in table and "bits_per_byte" in table
    ours = json.loads(out.read_text())

    hf_dir = tmp_path / "hf"
    assert main(["export", "--workdir", str(wd), "--out", str(hf_dir)]) == 0
    # A name in neither index (lm-eval's bundled one is built for it: 15-25 s, so here).
    assert main(["lm-eval", "--workdir", str(wd), "--tasks", "no_such_task"]) == 2
    assert "unknown lm-eval task(s) no_such_task" in capsys.readouterr().err
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32", "device": "cpu"},
        tasks=TASKS,
        batch_size=3,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True,
    )
    for task in ("lmtrain_mc", "lmtrain_rolling"):
        a, b = _flat_numbers(per_request(ours, task)), _flat_numbers(per_request(theirs, task))
        assert len(a) == len(b) > 0
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
        assert np.ptp(a) > 1e-2  # the requests really differ
    assert per_request(ours, "lmtrain_gen") == per_request(theirs, "lmtrain_gen")
    for task, metrics in {
        "lmtrain_mc": ("acc,none", "acc_norm,none"),
        "lmtrain_rolling": ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"),
        "lmtrain_gen": ("exact_match,none",),
    }.items():
        for m in metrics:
            assert ours["results"][task][m] == pytest.approx(theirs["results"][task][m], rel=1e-5)


def test_lm_eval_usage_errors(corpus, tmp_path, capsys):
    wd = tmp_path / "run"
    train.train(tiny(corpus, **{"train.steps": 2, "train.checkpoint_every": 2}), wd)
    assert main(["lm-eval", "--workdir", str(tmp_path / "none"), "--tasks", "x"]) == 2
    # A continuation longer than the context (seq_len 32, byte tokens): one line, exit 2, the
    # setting to change (the hf backend stops on an assert).
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    long = {"query": "alpha", "choices": ["beta " * 8, "gamma"], "gold": 1}
    (tasks / "long.jsonl").write_text(json.dumps(long) + "\n")
    yaml = (TASKS_DIR / "lmtrain_mc.yaml").read_text()
    yaml = yaml.replace("task: lmtrain_mc", "task: lmtrain_long")
    yaml = yaml.replace("tests/lm_eval_tasks/lmtrain_mc.jsonl", str(tasks / "long.jsonl"))
    (tasks / "long.yaml").write_text(yaml)
    args = ["lm-eval", "--workdir", str(wd), "--tasks", "lmtrain_long"]
    assert main([*args, "--include-path", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert "continuation is 41 tokens, longer than the model's context (data.seq_len=32)" in err
    assert "--set data.seq_len=64" in err and "Traceback" not in err
    assert main([*args, "--include-path", str(tasks), "--set", "data.seq_len=64"]) == 0


def test_local_tasks_skip_the_bundled_index():
    """Named tasks all local: lm-eval's index of its bundled YAMLs (15-25 s) is not built; a
    bundled task or a local group among them: it is."""
    from lmtrain.interop.lm_eval_adapter import _task_manager

    built = []

    class Manager:
        def __init__(self, include_path=None, include_defaults=True):
            built.append(include_defaults)
            local = {"mine": {"type": "task"}, "my_group": {"type": "group"}}
            self.task_index = local if include_path else {}

    assert isinstance(_task_manager(Manager, ["mine"], "tasks/"), Manager) and built == [False]
    for tasks in (["mine", "hellaswag"], ["my_group"]):
        built.clear()
        _task_manager(Manager, tasks, "tasks/")
        assert built == [False, True]
    built.clear()
    _task_manager(Manager, ["hellaswag"], None)
    assert built == [True]


@pytest.mark.slow
def test_adapter_scores_any_family_as_its_own_forward_pass(corpus, tmp_path):
    """A hybrid (Mamba-2 + attention + GLA) has no transformers equivalent; its rolling
    loglikelihood through the adapter is the model's own log-probability of the document."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from lm_eval.api.instance import Instance

    from lmtrain import run as run_lib
    from lmtrain.interop.lm_eval_adapter import make_adapter

    sets = {"model.name": "hybrid", "model.pattern": "MAG", "model.n_layers": 3}
    wd = tmp_path / "run"
    train.train(tiny(corpus, **{**sets, "train.steps": 4, "train.checkpoint_every": 4}), wd)
    run, params, _ = run_lib.restore_params(wd)
    lm = make_adapter(run, params, batch_size=4)
    docs = ["alpha beta gamma delta", "zeta eta " * 30]  # the second is longer than seq_len 32
    reqs = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)]
    got = lm.loglikelihood_rolling(reqs)
    eod = run.tokenizer.eod_id
    ids = [eod, *run.tokenizer.encode(docs[0])]
    logits = compiled_call(nnx.merge(run.graphdef, params), jnp.asarray([ids[:-1]]))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1)[0])
    want = float(sum(logp[i, t] for i, t in enumerate(ids[1:])))
    assert got[0] == pytest.approx(want, abs=1e-4)
    assert got[1] < got[0] < 0
    # Multiple choice on the same model: the likelier continuation is the greedy one.
    ((ll, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, ("alpha beta", " gamma"), 0)])
    assert ll < 0 and isinstance(greedy, bool)
