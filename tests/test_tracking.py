"""Run outputs: TensorBoard events without torch's start-up cost."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> str:
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed: nothing to avoid"
)
def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
    # The two sides differ: tensorboardX alone imports torch when it is installed.
    assert _python("import sys, tensorboardX; print('torch' in sys.modules)") == "True"
    wd = tmp_path / "run"
    out = _python(
        "import sys\n"
        "from pathlib import Path\n"
        "from lmtrain import tracking\n"
        f"t = tracking.Tracker(Path({str(wd)!r}), 3, 0, progress=False)\n"
        "for s in (1, 2, 3):\n"
        "    t.write(s, {'loss': 5.0 - s})\n"
        "t.write(3, {'val_loss': 1.25}, prefix='eval')\n"
        "t.close()\n"
        "print('torch' in sys.modules)\n"  # nor its placeholder: torch still imports later
    )
    assert out == "False", out
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(wd / "tb"))
    ea.Reload()
    assert [(e.step, e.value) for e in ea.Scalars("train/loss")] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert [(e.step, e.value) for e in ea.Scalars("eval/val_loss")] == [(3, 1.25)]
