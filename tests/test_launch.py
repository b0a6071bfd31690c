"""Launch scripts: syntax, the SLURM directives a preemptible job needs, usage errors."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "lmtrain" / "launch"  # inside the package; launch/ at the root links here
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
    run_line = [line for line in text.splitlines() if line.startswith("srun ")][0]
    assert "--kill-on-bad-exit=1" in run_line and '-m lmtrain train "$EXPERIMENT"' in run_line
    assert '--workdir "$WORKDIR"' in run_line
    # A signal's stop (the summary says "interrupted") requeues the job (tests/test_slurm.py
    # runs it under a real scheduler).
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text


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


def test_launch_scripts_ship_in_the_package_and_the_root_link_points_there():
    assert (REPO / "launch").resolve() == LAUNCH.resolve()
    assert {p.name for p in SCRIPTS} == {
        "local.sh",
        "slurm.sbatch",
        "sweep_array.sbatch",
        "tpu_vm.sh",
    }
    text = (REPO / "pyproject.toml").read_text()
    assert 'lmtrain = ["launch/*.sh", "launch/*.sbatch"]' in text  # package data


@pytest.mark.slow
def test_sweep_slurm_and_launchers_work_from_an_installed_package(tmp_path):
    """lmtrain as `pip install .` leaves it (the package alone in site-packages, no checkout):
    `sweep --slurm` renders the template shipped in the package, the job starts where the
    sweep was planned, and `lmtrain launchers --out` copies the scripts."""
    import shutil

    site = tmp_path / "site"
    shutil.copytree(
        REPO / "lmtrain", site / "lmtrain", ignore=shutil.ignore_patterns("__pycache__")
    )
    user = tmp_path / "user"
    user.mkdir()
    (user / "exp.py").write_text(
        "from lmtrain.config import Config, override\n"
        "def get_config(arg=''):\n    return Config()\n"
        "def get_sweep(arg=''):\n"
        "    return [override(Config(), {'model.d_model': d}) for d in (32, 64)]\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}

    def lmtrain(*args):
        return subprocess.run(
            [sys.executable, "-m", "lmtrain", *args],
            cwd=user,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    r = lmtrain("sweep", "exp.py", "--dir", "sw", "--slurm")
    assert r.returncode == 0, r.stderr
    text = (user / "sw" / "sweep_array.sbatch").read_text()
    assert "@@" not in text
    # Nothing points into this checkout (a path prefix, not a substring: /repo vs /repo-venv).
    assert f"{REPO}/" not in text and f'"{REPO}"' not in text
    assert f'cd "{user}"' in text
    assert f'export PYTHONPATH="{site}' in text
    assert f'sweep "{user / "exp.py"}" --dir "{user / "sw"}"' in text
    assert subprocess.run(["bash", "-n", str(user / "sw" / "sweep_array.sbatch")]).returncode == 0

    r = lmtrain("launchers")
    assert r.returncode == 0 and r.stdout.splitlines()[0] == str(site / "lmtrain" / "launch")
    r = lmtrain("launchers", "--out", "scripts")
    assert r.returncode == 0, r.stderr
    copied = sorted(p.name for p in (user / "scripts").iterdir())
    assert copied == sorted(p.name for p in SCRIPTS)
    assert os.access(user / "scripts" / "local.sh", os.X_OK)
