"""The files of a sweep's run directories, and the environment a run's process gets.

Shared by the runner (lmtrain.sweeps.runner) and the throughput measurement
(lmtrain.sweeps.throughput); see runner.py for what a run directory holds.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Sequence
from pathlib import Path

from lmtrain import xla_flags

# The directory holding this lmtrain package (a source checkout, or site-packages after
# `pip install .`): put first on a run's PYTHONPATH so runs use this very lmtrain.
ROOT = Path(__file__).resolve().parents[2]
# The launch scripts and templates ship in the package; launch/ at a checkout's root links here.
LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def atomic_write(path: Path, text: str) -> None:
    # Unique per host and process: SLURM array tasks on several nodes share the sweep dir.
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_metrics(run_dir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    """(train rows, eval rows) of metrics.jsonl by step; a resumed attempt's rows win."""
    train_rows, eval_rows = {}, {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by kill -9
            continue
        (eval_rows if "val_loss" in row else train_rows)[row["step"]] = row
    return train_rows, eval_rows


def read_attempts(run_dir: Path) -> list[dict]:
    path = run_dir / "attempts.json"
    return json.loads(path.read_text()) if path.is_file() else []


def running_pid(run_dir: Path) -> int | None:
    """The pid of a still-running `lmtrain train` on run_dir (e.g. left by a killed sweep)."""
    attempts = read_attempts(run_dir)
    if not attempts or "end" in attempts[-1]:
        return None
    pid = attempts[-1]["pid"]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return pid if str(run_dir).encode() in cmdline else None


def child_env(devices: int | None, gpus: Sequence[int] | None = None) -> dict[str, str]:
    """Environment of a run: this lmtrain first on PYTHONPATH; `devices` CPU host devices."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    if devices:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in gpus)
    return env


def default_devices(parallel: int) -> int:
    """CPU host devices per run of `parallel` at once: the CLI's rule on a share of the cores
    this process may use (a SLURM array task's own allocation included)."""
    return xla_flags.cpu_host_devices(parallel)
