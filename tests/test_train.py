"""End-to-end training: resume exactness, sharded == single device, failures that lose nothing."""

import json
import os
import shutil
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import losses, tiny

from lmtrain import config as config_lib
from lmtrain import run as run_lib
from lmtrain import runguard, sharding, step, train
from lmtrain.checkpoint import Checkpointer
from lmtrain.cli import main
from lmtrain.config import Config


@pytest.mark.slow
def test_resume_after_sigterm_matches_uninterrupted(corpus, tmp_path, monkeypatch):
    full = train.train(tiny(corpus), tmp_path / "full")
    assert full["step"] == 8

    calls = {"n": 0}
    real = sharding.global_batch

    # SIGTERM arrives while step 3's batch is placed on devices (its stop flag already built):
    # step 4 carries the flag; step 4 is a checkpoint step, whose metrics are read at once, so
    # every process agrees to stop there (without that, one step later).
    def batch_then_sigterm(local, mesh):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(local, mesh)

    monkeypatch.setattr(sharding, "global_batch", batch_then_sigterm)
    part = train.train(tiny(corpus), tmp_path / "split")
    monkeypatch.setattr(sharding, "global_batch", real)
    assert part.get("interrupted") and part["step"] == 4
    assert Checkpointer(tmp_path / "split/checkpoints").steps() == [4]
    rest = train.train(tiny(corpus), tmp_path / "split")
    assert rest["step"] == 8

    a, b = losses(tmp_path / "full"), losses(tmp_path / "split")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    # Same batches and same arithmetic: identical losses, before and after the resume.
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6, atol=0)
    assert len(set(a.values())) > 4  # the loss actually changes step to step


def _run_steps(cfg: Config, n: int):
    run = run_lib.setup(cfg)
    state = run.init_state()
    shape = [(cfg.train.batch_size, cfg.data.seq_len)]
    fn = run_lib.compile_train_steps(run, shape, stop_flag=False)[0][cfg.data.seq_len]
    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        local = {
            k: rng.integers(0, 200, (cfg.train.batch_size, cfg.data.seq_len), np.int32)
            for k in ("inputs", "targets")
        }
        local["segment_ids"] = np.repeat(np.arange(4, dtype=np.int32), 8)[None].repeat(8, 0) + 1
        local["positions"] = np.tile(np.arange(8, dtype=np.int32), 4)[None].repeat(8, 0)
        local["weights"] = (rng.random((8, 32)) < 0.9).astype(np.float32)
        state, m = fn(state, sharding.global_batch(local, run.mesh))
        out.append((float(m["loss"]), float(m["grad_norm"])))
    return run, out, jax.device_get(state["params"])


_SINGLE_DEVICE: dict = {}


def _single_device_steps(cfg: Config):
    """_run_steps(cfg, 3), once per config: the reference of every mesh of a model (4 for the
    transformer) in this worker."""
    key = json.dumps(config_lib.to_dict(cfg), sort_keys=True, default=str)
    if key not in _SINGLE_DEVICE:
        _SINGLE_DEVICE[key] = _run_steps(cfg, 3)
    return _SINGLE_DEVICE[key]


@pytest.mark.parametrize(
    ("name", "mesh"),
    [
        ("transformer", (2, 2, 2)),
        pytest.param("transformer", (8, 1, 1), marks=pytest.mark.slow),
        pytest.param("transformer", (1, 2, 4), marks=pytest.mark.slow),
        # one model with GLA, Mamba-2 and attention blocks: each mixer's sharding rules
        pytest.param("hybrid:GMA", (2, 2, 2), marks=pytest.mark.slow),
        # rows split along their length (4 and 8 tokens a device; 8-token documents cross)
        pytest.param("transformer", (1, 1, 1, 8), marks=pytest.mark.slow),
        pytest.param("hybrid:GMA", (2, 1, 1, 4), marks=pytest.mark.slow),
    ],
)
def test_sharded_step_matches_single_device(corpus, name, mesh):
    name, _, pattern = name.partition(":")
    extra = {"model.pattern": pattern, "model.n_layers": len(pattern)} if pattern else {}

    def cfg(shape):
        return tiny(corpus, **{"model.name": name, "mesh.shape": shape, **extra})

    ref_run, ref_losses, ref_params = _single_device_steps(cfg((1, 1, 1)))
    run, got_losses, got_params = _run_steps(cfg(mesh), 3)
    assert ref_run.mesh.devices.size == 1 and run.mesh.devices.size == 8
    specs = jax.tree.leaves(run.state_shardings["params"])
    split = any(any(a is not None for a in s.spec) for s in specs)
    assert split or mesh in ((8, 1, 1), (1, 1, 1, 8), (2, 1, 1, 4))
    # Losses and gradient norms of every step (the params evolve between them) agree tightly.
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
    # One Adam update moves a weight by ~lr (1e-3 here). Adam's g / (|g| + eps) amplifies
    # reduction-order noise on near-zero gradients (hybrid:GMA moved single weights of 8,256 by
    # 6.7e-5 and 1.6e-4 after three steps, on two CPU models), so params agree to 15% of one
    # update except at most one weight in 1,000 a leaf, and those within the three updates:
    # a wrong sharding (a lost or doubled shard) is off by whole updates on whole slices.
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(got_params), strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        diff = np.abs(a - b)
        off = diff > 1.5e-4 + 1e-4 * np.abs(b)
        assert off.sum() <= max(1, a.size // 1000), f"{off.sum()} of {a.size} weights differ"
        assert diff.max() <= 3e-3, diff.max()


@pytest.mark.slow
def test_stopped_with_a_sequence_axis_resumes_without_one(corpus, tmp_path):
    """A run stopped after 2 steps on (1, 1, 1, 8) (rows split in 8 along their length) and
    resumed on (8, 1, 1, 1) gives the uninterrupted (1, 1, 1, 8) run's losses: the checkpoint
    does not know the mesh."""

    def cfg(shape, steps):  # constant lr: the step count is free
        sets = {"optim.schedule": "constant", "train.checkpoint_every": 2}
        return tiny(corpus, **{"mesh.shape": shape, "train.steps": steps, **sets})

    full, part = tmp_path / "full", tmp_path / "part"
    train.train(cfg((1, 1, 1, 8), 4), full)
    train.train(cfg((1, 1, 1, 8), 2), part)
    train.train(cfg((8, 1, 1, 1), 4), part)
    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)
    assert len(set(a.values())) == 4


def _has_scan(cfg: Config) -> bool:
    """Whether cfg's train step traces to a jaxpr with a scan (the accumulation loop)."""
    run = run_lib.setup(cfg)
    fn = step.make_train_step(
        run.graphdef, run.tx, run.schedule, cfg.optim.z_loss, cfg.train.grad_accum
    )
    batch = step.batch_spec(cfg.train.batch_size, cfg.data.seq_len, step.TRAIN_KEYS)
    with jax.set_mesh(run.mesh):
        jaxpr = jax.make_jaxpr(fn)(run.abstract_state, batch)
    return "scan" in {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}


@pytest.mark.slow
def test_grad_accum_matches_full_batch(corpus):
    mesh = {"mesh.shape": (2, 1, 1)}
    # The accumulation path really runs: its step has the micro-batch scan, the plain one not.
    assert _has_scan(tiny(corpus, **mesh, **{"train.grad_accum": 4}))
    assert not _has_scan(tiny(corpus, **mesh))
    _, l1, p1 = _run_steps(tiny(corpus, **mesh), 2)
    _, l4, p4 = _run_steps(tiny(corpus, **mesh, **{"train.grad_accum": 4}), 2)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, capsys):
    wd = tmp_path / "nan"
    exp = _exp_file(
        tmp_path,
        tiny(
            corpus,
            **{
                "optim.lr": 1e38,
                "optim.warmup_steps": 0,
                "optim.clip_norm": 0.0,
                "train.checkpoint_every": 1,
                "train.steps": 50,
            },
        ),
    )
    assert main(["train", exp, "--workdir", str(wd)]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient at step" in err and "Traceback" not in err
    bad_step = int(err.split("at step ")[1].split()[0])
    steps = Checkpointer(wd / "checkpoints").steps()
    assert steps and max(steps) < bad_step
    run = run_lib.setup(tiny(corpus))
    state = Checkpointer(wd / "checkpoints").restore_latest(run.abstract_state).state
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state["params"])))


def _exp_file(tmp_path: Path, cfg: Config) -> str:
    """An experiment file returning `cfg` (so the CLI can be driven with exact configs)."""
    (tmp_path / "cfg.json").write_text(json.dumps(config_lib.to_dict(cfg)))
    p = tmp_path / "exp.py"
    p.write_text(
        "import json, pathlib\nfrom lmtrain import config\n"
        "def get_config(arg):\n"
        f"    return config.from_dict(json.loads(pathlib.Path({str(tmp_path / 'cfg.json')!r})"
        ".read_text()))\n"
    )
    return str(p)


@pytest.mark.slow
def test_outputs_tensorboard_metrics_eval_generate(corpus, tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wd = tmp_path / "o"
    exp = _exp_file(tmp_path, tiny(corpus, **{"train.eval_every": 4}))
    assert main(["train", exp, "--workdir", str(wd)]) == 0
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(train_rows[0])
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8] and all(r["val_bpb"] > 0 for r in evals)
    ea = EventAccumulator(str(wd / "tb"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 9))
    assert [e.step for e in ea.Scalars("eval/val_bpb")] == [4, 8]
    assert json.loads((wd / "config.json").read_text())["model"]["vocab_size"] == 258
    capsys.readouterr()

    assert main(["eval", "--workdir", str(wd), "--set", "eval.max_batches=0"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 8 and out["val_tokens"] > 0 and {"val_loss", "val_bpb"} <= set(out)
    assert (
        main(
            [
                "generate",
                "--workdir",
                str(wd),
                "--prompt",
                "alpha beta",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("alpha beta") and len(text) > len("alpha beta")
    # top-k 1 at temperature 1 is greedy; an older checkpoint by --step; a missing one is exit 2
    gen = ["generate", "--workdir", str(wd), "--prompt", "alpha beta", "--max-new-tokens", "12"]
    assert main([*gen, "--temperature", "1", "--top-k", "1", "--seed", "3"]) == 0
    assert capsys.readouterr().out == text
    assert main(["eval", "--workdir", str(wd), "--step", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert main([*gen, "--step", "5"]) == 2
    assert "no checkpoint of step 5" in capsys.readouterr().err
    assert main([*gen, "--top-p", "0"]) == 2
    assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_top_k_and_top_p_keep_the_likeliest_tokens():
    from lmtrain.generate import filter_logits

    probs = np.array([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    logits = jnp.log(jnp.asarray(probs))

    def kept(**kw):
        return [np.flatnonzero(np.isfinite(row)).tolist() for row in filter_logits(logits, **kw)]

    assert kept() == [[0, 1, 2, 3], [0, 1, 2, 3]]
    assert kept(top_k=2) == [[0, 1], [2, 3]]
    assert kept(top_p=0.5) == [[0], [3]]  # the likeliest alone holds 0.5
    assert kept(top_p=0.6) == [[0, 1], [2, 3]]
    assert kept(top_p=0.81) == [[0, 1, 2], [1, 2, 3]]
    assert kept(top_k=1, top_p=0.99) == [[0], [3]]
    draws = jax.random.categorical(
        jax.random.key(0), filter_logits(logits, top_p=0.6), shape=(4000, 2)
    )
    assert set(np.unique(draws[:, 0]).tolist()) == {0, 1}
    assert abs(float(np.mean(draws[:, 0] == 0)) - 0.5 / 0.8) < 0.03  # renormalised within the set


def test_bad_data_paths_exit_2(corpus, tmp_path, capsys):
    exp = _exp_file(tmp_path, tiny(corpus, **{"data.source": str(tmp_path / "missing")}))
    assert main(["train", exp, "--workdir", str(tmp_path / "w")]) == 2
    assert "missing" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    exp = _exp_file(tmp_path, tiny(corpus, **{"data.source": str(empty)}))
    assert main(["train", exp, "--workdir", str(tmp_path / "w2")]) == 2
    assert "empty" in capsys.readouterr().err.lower()


@pytest.mark.slow
def test_resume_refuses_a_different_model(corpus, tmp_path, capsys):
    wd = tmp_path / "r"
    train.train(tiny(corpus, **{"train.steps": 2}), wd)
    exp = _exp_file(tmp_path, tiny(corpus, **{"train.steps": 4, "model.d_model": 64}))
    assert main(["train", exp, "--workdir", str(wd)]) == 2
    assert "model.d_model" in capsys.readouterr().err
    shutil.rmtree(wd)


@pytest.mark.slow
def test_unwritable_checkpoint_dir_mid_run_is_a_clear_error(corpus, tmp_path):
    """The CLI in its own process: one line, exit 1, no wait at exit for orbax's orphaned
    writer threads (they would hold the process for orbax's 300 s barrier timeout)."""
    import subprocess
    import sys
    import time

    wd = tmp_path / "u"
    exp = _exp_file(tmp_path, tiny(corpus, **{"train.checkpoint_every": 2, "train.steps": 8}))
    script = f"""
import sys, time
from pathlib import Path
from lmtrain import cli, sharding
wd, real, calls = Path({str(wd)!r}), sharding.global_batch, [0]
def break_dir_before_step_4(local, mesh):
    calls[0] += 1
    if calls[0] == 4:
        for _ in range(300):  # let the async save of step 2 finish first
            if (wd / "checkpoints/2/_CHECKPOINT_METADATA").exists():
                break
            time.sleep(0.1)
        (wd / "checkpoints").rename(wd / "moved")
        (wd / "checkpoints").write_text("not a directory")  # root ignores chmod; this bites
    return real(local, mesh)
sharding.global_batch = break_dir_before_step_4
sys.argv = ["lmtrain", "train", {exp!r}, "--workdir", str(wd)]
cli.entry()
"""
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=200,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    assert p.returncode == 1, p.stderr
    assert time.monotonic() - t0 < 120  # not the 300 s orbax would hold it
    err = p.stderr
    assert "saving the checkpoint of step 4" in err and "last complete checkpoint is step 2" in err
    assert "Traceback" not in err
    # The last good checkpoint is intact and restores.
    run = run_lib.setup(tiny(corpus))
    restored = Checkpointer(wd / "moved").restore_latest(run.abstract_state)
    assert restored.step == 2 and int(restored.state["step"]) == 2


@pytest.mark.slow
def test_restore_params_reads_only_the_parameters(corpus, tmp_path):
    wd = tmp_path / "p"
    train.train(tiny(corpus), wd)  # checkpoints at steps 4 and 8
    run, params, s = run_lib.restore_params(wd)
    assert s == 8 and run.tx is None and run.abstract_state is None
    # Under Lion the optimizer state has another layout: a full restore of the AdamW
    # checkpoint fails, the params-only restore does not read that state at all.
    lion = {"optim.name": "lion"}
    with pytest.raises(Exception):  # noqa: B017 - orbax's own structure-mismatch error
        full = run_lib.setup(config_lib.override(tiny(corpus), lion))
        Checkpointer(wd / "checkpoints").restore(8, full.abstract_state)
    _, same, _ = run_lib.restore_params(wd, lion)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(a, b)
    _, earlier, s4 = run_lib.restore_params(wd, step=4)
    assert s4 == 4
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(earlier), strict=True)
    )
    with pytest.raises(config_lib.ConfigError, match="no checkpoint of step 5"):
        run_lib.restore_params(wd, step=5)


def test_workdir_lock_refuses_a_second_holder_and_is_released(tmp_path):
    from lmtrain.config import ConfigError

    with runguard.workdir_lock(tmp_path / "wd"):
        with pytest.raises(
            ConfigError, match=rf"in use by another lmtrain run \(host .*, pid {os.getpid()},"
        ):
            with runguard.workdir_lock(tmp_path / "wd"):
                pass
    with runguard.workdir_lock(tmp_path / "wd"):  # released at exit, exception or not
        pass


def test_a_partial_save_is_removed_by_the_next_run_and_never_by_a_reader(tmp_path):
    d = tmp_path / "checkpoints"
    partial = d / "15.orbax-checkpoint-tmp-1764"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "blob").write_bytes(b"\0" * 4096)
    Checkpointer(d).close()  # eval / generate: a running trainer may be writing it
    assert partial.exists()
    ckpt = Checkpointer(d, writer=True)
    assert not partial.exists() and ckpt.steps() == []
    ckpt.close()


def test_library_noise_goes_to_the_workdir_log_not_the_console(tmp_path, capsys):
    import gc
    import logging
    import sys

    class Raises:
        def __del__(self):
            raise RuntimeError("Event loop is closed")

    hook = sys.unraisablehook
    with runguard.library_noise_to(tmp_path / "lmtrain.log"):
        logging.getLogger("absl").error("_SignalingThread.run() raised an exception")
        Raises()
        gc.collect()
        logging.getLogger("lmtrain").warning("lmtrain's own line")
    err = capsys.readouterr().err
    assert "_SignalingThread" not in err and "Event loop is closed" not in err
    assert "2 library errors (orbax, absl) were written to" in err
    text = (tmp_path / "lmtrain.log").read_text()
    assert "_SignalingThread.run() raised" in text and "RuntimeError: Event loop is closed" in text
    assert sys.unraisablehook is hook and logging.getLogger("absl").propagate


@pytest.mark.slow
def test_muon_sharded_equals_single_device_and_resumes_exactly_on_another_mesh(corpus, tmp_path):
    """Muon's partitioned state shards like the params on a (2, 2, 2) mesh and gives the
    single-device steps; a Muon run stopped after 2 steps on (2, 2, 2) and resumed on (8, 1, 1)
    gives the uninterrupted run's losses."""
    muon = {"optim.name": "muon", "optim.lr": 0.02, "optim.schedule": "constant"}

    def cfg(shape, **sets):
        return tiny(corpus, **{**muon, "mesh.shape": shape, **sets})

    ref_run, ref_losses, ref_params = _run_steps(cfg((1, 1, 1)), 3)
    run, got_losses, got_params = _run_steps(cfg((2, 2, 2)), 3)
    mu = [s.spec for s in jax.tree.leaves(run.state_shardings["opt_state"])]
    assert any(any(a is not None for a in spec) for spec in mu)  # Muon's momentum is sharded
    np.testing.assert_allclose(got_losses, ref_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(got_params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1.5e-4)
    assert "Muon" in str(jax.tree.structure(run.state_shardings["opt_state"]))  # Muon ran

    full, part = tmp_path / "full", tmp_path / "part"
    train.train(cfg((2, 2, 2), **{"train.steps": 4}), full)
    train.train(cfg((2, 2, 2), **{"train.steps": 2}), part)
    train.train(cfg((8, 1, 1), **{"train.steps": 4}), part)

    def losses(wd):
        rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses(full), losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5)


@pytest.mark.slow
def test_no_tpu_errors_where_there_is_no_tpu(corpus, tmp_path):
    """libtpu (the dev extra) printed five lines of TPU errors at every command's start on a
    machine without a TPU; lmtrain keeps JAX from starting it there."""
    import importlib.util
    import subprocess
    import sys

    from lmtrain import xla_flags

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install '.[dev]' installs it)")
    if xla_flags.tpu_attached():
        pytest.skip("this machine has a TPU")
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    # libtpu stays silent while another process's lockfile is there; this makes it speak.
    env.update(PYTHONPATH=str(root), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    plain = subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True, text=True
    )
    assert "TPU" in plain.stderr  # without lmtrain's guard the errors are there
    exp = _exp_file(tmp_path, tiny(corpus, **{"train.steps": 1}))
    cmd = [sys.executable, "-m", "lmtrain", "train", exp, "--workdir", str(tmp_path / "w")]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "TPU" not in p.stderr and "E0000" not in p.stderr, p.stderr[:2000]
    assert "cpu devices" in p.stderr  # it ran, on the CPU
    # A script or notebook that imports lmtrain first (lmtrain.config imports jax, after
    # which JAX_PLATFORMS is read too late): experiments/mqar.py's test mix printed them.
    # And one that imports jax first (benchmarks/residual_scale.py printed them): jax has read
    # the environment, but no backend has started, so lmtrain sets jax's config instead.
    for lib in (
        "import lmtrain.config, jax; print(jax.devices()[0].platform)",
        "import jax, lmtrain; print(jax.devices()[0].platform)",
    ):
        p = subprocess.run([sys.executable, "-c", lib], env=env, capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.strip() == "cpu", p.stderr[-2000:]
        assert "TPU" not in p.stderr and "E0000" not in p.stderr, p.stderr[:2000]
