"""Launch scripts: syntax, the SLURM directives a preemptible job needs, usage errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_script_parses(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0


def test_slurm_script_directives():
    text = (LAUNCH / "slurm.sbatch").read_text()
    directives = [
        line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")
    ]
    # SIGTERM before the time limit reaches every task (not only the batch shell: no "B:").
    assert any(d.startswith("--signal=TERM@") for d in directives)
    assert "--requeue" in directives and "--open-mode=append" in directives
    assert any(d.startswith("--ntasks-per-node=") for d in directives)
    run_line = [line for line in text.splitlines() if "srun" in line and "exec" in line][0]
    assert "--kill-on-bad-exit=1" in run_line and '-m lmtrain train "$EXPERIMENT"' in run_line
    assert '--workdir "$WORKDIR"' in run_line


def test_local_launcher_usage_errors():
    for args in ([], ["2"], ["2", "--bogus", "--", "train"]):
        r = subprocess.run(["bash", str(LAUNCH / "local.sh"), *args], capture_output=True)
        assert r.returncode == 2 and b"launch/local.sh N" in r.stderr


def test_local_launcher_propagates_a_failure(tmp_path):
    """One process failing (here: a missing experiment file, exit 2) fails the launch."""
    r = subprocess.run(
        [
            "bash",
            str(LAUNCH / "local.sh"),
            "2",
            "--cpu-devices",
            "1",
            "--",
            "train",
            str(tmp_path / "missing.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert r.returncode == 2, r.stderr
    assert "experiment file not found" in r.stderr
