"""A real `kill -9` between checkpoints: the rerun resumes from the last complete checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def _write_exp(tmp_path: Path, corpus: Path, steps: int) -> str:
    p = tmp_path / f"exp{steps}.py"
    p.write_text(f"""
from lmtrain import config
def get_config(arg):
    return config.override(config.Config(), {{
        "model.name": "transformer", "model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2,
        "data.source": {str(corpus)!r}, "data.tokenizer": "bytes", "data.seq_len": 32,
        "train.batch_size": 8, "train.steps": {steps}, "train.log_every": 1,
        "train.eval_every": 0, "train.checkpoint_every": 3,
        "optim.schedule": "constant", "optim.warmup_steps": 2, "eval.max_batches": 1,
        "eval.batch_size": 8,
    }})
""")
    return str(p)


def _lmtrain(*args, **kw):
    env = {
        **os.environ,
        "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2",
        "PYTHONPATH": str(ROOT),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "lmtrain", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _losses(wd: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_kill_9_then_resume(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    for i in range(30):
        (corpus / f"{i}.txt").write_text(
            " ".join(rng.choice(["ab", "cd", "ef", "gh"], size=int(rng.integers(20, 100))))
        )
    # Uninterrupted reference: 12 steps.
    ref = _lmtrain("train", _write_exp(tmp_path, corpus, 12), "--workdir", str(tmp_path / "ref"))
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    # train.progress is on, but stderr is a pipe: plain log lines every train.log_every steps
    log_lines = [x for x in ref.stderr.read().splitlines() if x.startswith("step ") and "/" in x]
    assert [x.split(":")[0] for x in log_lines] == [f"step {n}/12" for n in range(1, 13)]
    assert "loss " in log_lines[-1] and "tokens/s, MFU " in log_lines[-1]

    # A long run killed with SIGKILL once its step-6 checkpoint is complete.
    wd = tmp_path / "killed"
    long_run = _lmtrain("train", _write_exp(tmp_path, corpus, 100000), "--workdir", str(wd))
    deadline = time.time() + 240
    while not (wd / "checkpoints" / "6" / "_CHECKPOINT_METADATA").exists():
        assert long_run.poll() is None, long_run.stderr.read()
        assert time.time() < deadline, "no checkpoint at step 6 in time"
        time.sleep(0.2)
    # A second run on the busy workdir is refused at once, naming the holder; nothing is lost.
    config_stat = (wd / "config.json").stat()
    second = _lmtrain("train", _write_exp(tmp_path, corpus, 12), "--workdir", str(wd))
    assert second.wait(timeout=120) == 2
    err = second.stderr.read()
    assert "is in use by another lmtrain run" in err and f"pid {long_run.pid}," in err, err
    assert long_run.poll() is None  # the first run goes on
    assert (wd / "config.json").stat().st_mtime_ns == config_stat.st_mtime_ns  # wrote nothing
    # kill -9 leaves the lock file behind; the kernel has dropped the lock itself, so the
    # rerun below takes it
    long_run.send_signal(signal.SIGKILL)
    long_run.wait(timeout=30)
    assert long_run.returncode == -signal.SIGKILL
    killed_steps = max(_losses(wd))

    # The rerun (12 steps in total) resumes from the newest complete checkpoint.
    rerun = _lmtrain("train", _write_exp(tmp_path, corpus, 12), "--workdir", str(wd))
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    err = rerun.stderr.read()
    resumed_at = int(err.split("resumed at step ")[1].split()[0])
    assert resumed_at >= 6 and resumed_at % 3 == 0 and resumed_at <= killed_steps
    a = _losses(tmp_path / "ref")
    b = {}
    for line in (wd / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            b[r["step"]] = r["loss"]  # the rerun's rows overwrite the killed run's
    np.testing.assert_allclose(
        [b[s] for s in range(1, 13)], [a[s] for s in range(1, 13)], rtol=1e-6
    )


FULL_DISK = """
import resource, signal, sys
from lmtrain import checkpoint
# Past RLIMIT_FSIZE a write fails (EFBIG) as on a full disk, once SIGXFSZ no longer kills.
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
fail_step, limit = int(sys.argv[1]), int(sys.argv[2])
real = checkpoint.Checkpointer.save
def save(self, step, *args, **kw):
    if step == fail_step:
        self.wait()  # the previous save is complete: the disk fills from here on
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return real(self, step, *args, **kw)
checkpoint.Checkpointer.save = save
from lmtrain.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_a_full_disk_during_a_save_is_one_line_and_the_rerun_resumes(tmp_path):
    """The disk fills while step 6 is saved (every file stops at 16 KB, the log file too): the
    console gets lmtrain's one error line, not the async writers' tracebacks; the partial save
    is removed by the rerun, which resumes from step 3."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"{i}.txt").write_text("abcd efgh " * (20 + i))
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    wd = tmp_path / "w"
    exp = _write_exp(tmp_path, corpus, 9)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": ""}
    r = subprocess.run(
        [sys.executable, str(script), "6", "16384", "train", exp, "--workdir", str(wd)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1, r.stderr
    err = [x for x in r.stderr.splitlines() if "TPU" not in x and "tpu" not in x]
    assert "Traceback" not in r.stderr and "Task exception" not in r.stderr, r.stderr[-3000:]
    assert len(err) < 20, "\n".join(err)
    assert "saving the checkpoint of step 6" in err[-1], err[-1]
    assert "the last complete checkpoint is step 3" in err[-1] and "rerun to resume" in err[-1]
    assert any("library errors (orbax, absl) were dropped" in x for x in err)
    partial = [p.name for p in (wd / "checkpoints").iterdir()]
    assert "3" in partial and any(n.startswith("6.orbax-checkpoint-tmp") for n in partial)

    rerun = _lmtrain("train", exp, "--workdir", str(wd))
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    err = rerun.stderr.read()
    assert "removed 6.orbax-checkpoint-tmp" in err and "resumed at step 3" in err
    assert sorted(p.name for p in (wd / "checkpoints").iterdir()) == ["3", "6", "9"]
