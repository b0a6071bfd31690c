"""Issue 29 item 6, kept bounded: whole-split evaluations on 2 host devices with every batch
queued at once (the pattern that hung once in ~10 quickstart runs), each under a watchdog that
dumps every thread's stack and exits 1. A hang fails in about a minute, with the stacks."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TEST_XLA_FLAGS, WORDS

ROOT = Path(__file__).resolve().parents[1]
EVALS = 12


@pytest.mark.slow
def test_queued_whole_split_evaluations_on_two_host_devices_never_hang(tmp_path):
    # Many cheap batches: the hazard is the number queued, not their size. A 64 KB validation
    # split (val_fraction 0.5 of 128 KB) is ~250 batches of 8 x 32 bytes.
    rng = np.random.default_rng(0)
    for i in range(32):
        (tmp_path / f"{i}.txt").write_text(" ".join(rng.choice(WORDS, 700)))
    sets = [f"data.source={str(tmp_path)!r}", "data.tokenizer='bytes'", "data.seq_len=32"]
    sets += ["data.val_fraction=0.5", "eval.batch_size=8", "model.d_model=32"]
    sets += ["model.n_layers=1", "model.n_heads=2", f"data.cache_dir={str(tmp_path / 'c')!r}"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "eval_stress.py"), "--mode", "queued"]
    cmd += ["--evals", str(EVALS), "--bound", "60", *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2"}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    lines = [x for x in p.stdout.splitlines() if x.startswith("queued eval")]
    assert len(lines) == EVALS, p.stdout[-2000:]
    batches = {x.split(": ")[1].split(" batches")[0] for x in lines}
    nll = {x.rsplit("nll ", 1)[1] for x in lines}
    assert len(batches) == 1 and int(batches.pop()) > 150, lines  # the whole split, every time
    assert len(nll) == 1  # the same parameters: the same sum, every time
