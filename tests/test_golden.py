"""Golden first-step loss of the quickstart smoke model on a fixed corpus.

If this fails after a change you meant to make to initialisation, data order, tokenisation or
the model's arithmetic, update GOLDEN with the new value printed in the failure message (and say
so in the commit). If you did not mean to change those, the failure is a regression.

The corpus is written here by integer arithmetic alone, so the golden values hold on every
Python version (the embedded `stdlib` corpus is the running interpreter's own standard library,
which differs between versions).
"""

import json
from pathlib import Path

import numpy as np

from lmtrain import config as config_lib
from lmtrain import train

ROOT = Path(__file__).resolve().parents[1]
# step -> training loss (2026-12-04: moved from the stdlib corpus to golden_corpus)
GOLDEN = {1: 5.581252574920654, 2: 5.513405799865723}
WORDS = "the of and to in is that for it as with was on be by this are or an from".split()


def golden_corpus(d: Path) -> Path:
    """40 documents of words chosen by a 32-bit linear congruential generator (fixed forever)."""
    d.mkdir(parents=True)
    x = 12345
    for doc in range(40):
        words = []
        for _ in range(150 + doc * 7):
            x = (1103515245 * x + 12345) % 2**31
            words.append(WORDS[(x >> 16) % len(WORDS)])
        (d / f"doc{doc:02d}.txt").write_text(" ".join(words) + ".\n")
    return d


def test_quickstart_smoke_first_steps_match_golden(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    cfg = config_lib.load_experiment(str(ROOT / "experiments/quickstart.py:smoke"))
    cfg = config_lib.override(
        cfg,
        {
            "train.steps": 2,
            "train.log_every": 1,
            "train.progress": False,
            "mesh.shape": (1, 1, 1),
            "data.source": str(golden_corpus(tmp_path / "corpus")),
        },
    )
    wd = tmp_path / "run"
    train.train(cfg, wd)
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    got = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert sorted(got) == [1, 2]
    # ln(258) = 5.553: a fresh byte-level model starts near uniform.
    assert abs(got[1] - np.log(258)) < 0.1
    np.testing.assert_allclose(
        [got[1], got[2]],
        [GOLDEN[1], GOLDEN[2]],
        rtol=1e-5,
        err_msg=f"golden losses changed: got {got}; see module docstring",
    )
