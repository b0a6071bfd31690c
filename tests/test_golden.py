"""Golden first-step loss of the quickstart smoke run on the embedded corpus.

If this fails after a change you meant to make to initialisation, data order, tokenisation or
the model's arithmetic, update GOLDEN with the new value printed in the failure message (and say
so in the commit). If you did not mean to change those, the failure is a regression.
"""

import json
from pathlib import Path

import numpy as np

from lmtrain import config as config_lib
from lmtrain import train

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = {1: 5.565845012664795, 2: 5.519092559814453}  # step -> training loss (2026-11-22)


def test_quickstart_smoke_first_steps_match_golden(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_CACHE", str(tmp_path / "cache"))
    cfg = config_lib.load_experiment(str(ROOT / "experiments/quickstart.py:smoke"))
    cfg = config_lib.override(
        cfg,
        {"train.steps": 2, "train.log_every": 1, "train.progress": False, "mesh.shape": (1, 1, 1)},
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
