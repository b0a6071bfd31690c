"""Runs a sweep on this host: K `lmtrain train` processes at a time, skip/resume, results.

A sweep directory holds one workdir per run (named by `lmtrain.sweeps.planning.plan`):

    sweep_config.json   the planned config; the run is `lmtrain train --config-json` on it
    attempts.json       one entry per launch: start, end, exit status, pid
    train.log           the run's stdout and stderr, all attempts appended
    result.json         written once the run has trained all its steps: the run is finished
    config.json, metrics.jsonl, checkpoints/, tb/   written by `lmtrain train`

plus SWEEP_DIR/results.jsonl and results.csv, one row per run, rewritten whenever a run ends.
A run's status is pending (never started), running, done, failed (non-zero exit), stopped
(exited cleanly before its last step: a signal) or interrupted (no exit recorded: the sweep
itself died, or another host is running it).
Re-running a sweep skips runs with result.json and relaunches the others, which resume from
their newest checkpoint (`lmtrain train` does that by itself on a workdir with checkpoints).
"""

from __future__ import annotations

import csv
import io
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmtrain import config as config_lib
from lmtrain.config import ConfigError
from lmtrain.sweeps.planning import PlannedRun
from lmtrain.sweeps.throughput import fmt_time
from lmtrain.sweeps.workdirs import (
    LAUNCH,
    ROOT,
    atomic_write,
    child_env,
    default_devices,
    read_attempts,
    read_metrics,
    running_pid,
)

COLUMNS = (
    "index name family status seed params params_nonembed tokens flops model_flops d_model "
    "n_layers seq_len batch_size lr steps step train_loss final_val_loss final_val_bpb "
    "best_val_loss best_val_bpb unique_tokens epochs wall_s tokens_per_sec"
).split()


def data_seen(last: dict, final_eval: dict) -> dict[str, Any]:
    """A run's data counts from its last train row: `epochs` (the most passes over any
    component's training rows, so > 1 means repeated tokens), `unique_tokens` (training tokens
    it could draw), tokens/NAME and epochs/NAME of a mixture, and final_val_loss/NAME and
    final_val_bpb/NAME from its last evaluation."""
    out: dict[str, Any] = {}
    seen = {k: v for k, v in last.items() if k.startswith(("tokens/", "epochs/"))}
    names = [k.split("/", 1)[1] for k in seen if k.startswith("epochs/")]
    if names:
        out["epochs"] = max(seen[f"epochs/{n}"] for n in names)
        per = [seen[f"tokens/{n}"] / seen[f"epochs/{n}"] for n in names if seen[f"epochs/{n}"]]
        out["unique_tokens"] = round(sum(per)) if len(per) == len(names) else None
    elif last.get("epochs"):
        out["epochs"] = last["epochs"]
        out["unique_tokens"] = round(last["tokens"] / last["epochs"])
    out.update(seen)
    for k, v in final_eval.items():
        if k.startswith(("val_loss/", "val_bpb/")):
            out[f"final_{k}"] = v
    return out


def result_row(run: PlannedRun, run_dir: Path, status: str | None = None) -> dict[str, Any]:
    """The results row of `run` from its workdir; status None: read from the directory."""
    if status in (None, "done") and (run_dir / "result.json").is_file():
        return json.loads((run_dir / "result.json").read_text())
    attempts = read_attempts(run_dir)
    train_rows, eval_rows = read_metrics(run_dir)
    if status is None:
        status = _disk_status(run_dir, attempts)
        if status == "stopped" and _at_end(run, train_rows):
            status = "done"  # finished, its result.json gone: --collect rebuilds it
    evals = [eval_rows[s] for s in sorted(eval_rows)]
    bpbs = [e["val_bpb"] for e in evals if "val_bpb" in e]
    rates = sorted(r["tokens_per_sec"] for r in train_rows.values() if "tokens_per_sec" in r)
    last = train_rows[max(train_rows)] if train_rows else {}
    c = run.cfg
    return {
        "index": run.index,
        "name": run.name,
        "family": c.model.name,
        "optimizer": c.optim.name,
        "status": status,
        "seed": c.train.seed,
        "params": run.params,
        "params_nonembed": run.params_nonembed,
        "tokens": run.tokens,
        "flops": run.flops,
        "model_flops": run.model_flops,
        "d_model": c.model.d_model,
        "n_layers": c.model.n_layers,
        "seq_len": c.data.seq_len,
        "batch_size": c.train.batch_size,
        "lr": c.optim.lr,
        "steps": c.train.steps,
        "step": last.get("step", 0),
        "train_loss": last.get("loss"),
        "final_val_loss": evals[-1]["val_loss"] if evals else None,
        "final_val_bpb": evals[-1].get("val_bpb") if evals else None,
        "best_val_loss": min(e["val_loss"] for e in evals) if evals else None,
        "best_val_bpb": min(bpbs) if bpbs else None,
        "wall_s": sum(a["end"] - a["start"] for a in attempts if "end" in a),
        "tokens_per_sec": rates[len(rates) // 2] if rates else None,  # median logged rate
        **data_seen(last, evals[-1] if evals else {}),
    }


def _disk_status(run_dir: Path, attempts: list[dict]) -> str:
    if not attempts:
        return "pending"
    if "end" not in attempts[-1]:
        return "running" if running_pid(run_dir) else "interrupted"
    return "failed" if attempts[-1]["rc"] else "stopped"


def write_results(
    sweep_dir: Path, runs: Sequence[PlannedRun], live: dict | None = None
) -> list[dict]:
    """Rewrites SWEEP_DIR/results.jsonl and results.csv from the run directories."""
    live = live or {}
    rows = [result_row(r, sweep_dir / r.name, live.get(r.name)) for r in runs]
    atomic_write(sweep_dir / "results.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    buf = io.StringIO()
    extra = sorted({k for r in rows for k in r if "/" in k})  # a mixture's per-component columns
    writer = csv.DictWriter(buf, [*COLUMNS, *extra], extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(sweep_dir / "results.csv", buf.getvalue())
    return rows


def prepare(runs: Sequence[PlannedRun], sweep_dir: Path) -> None:
    """Creates run directories with sweep_config.json; refuses a directory planned differently."""
    for run in runs:
        d = sweep_dir / run.name
        planned = json.loads(json.dumps(config_lib.to_dict(run.cfg)))  # tuples as JSON lists
        path = d / "sweep_config.json"
        if path.is_file():
            # Through from_dict, so fields added to Config since (at their defaults) match.
            saved_cfg = config_lib.from_dict(json.loads(path.read_text()))
            saved = json.loads(json.dumps(config_lib.to_dict(saved_cfg)))
            diff = [
                f"{s}.{k}" for s in planned for k in planned[s] if planned[s][k] != saved[s].get(k)
            ]
            if diff:
                raise ConfigError(
                    f"{d} was planned with a different config ({', '.join(diff)}); "
                    "use a new --dir or delete that run directory"
                )
            continue
        d.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(planned, indent=2, sort_keys=True) + "\n")


def finished(run: PlannedRun, run_dir: Path) -> bool:
    """True when metrics.jsonl shows the run's last step."""
    return _at_end(run, read_metrics(run_dir)[0])


def _at_end(run: PlannedRun, train_rows: dict[int, dict]) -> bool:
    return bool(train_rows) and max(train_rows) >= run.cfg.train.steps


def _log_tail(run_dir: Path, lines: int = 12) -> str:
    path = run_dir / "train.log"
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def progress_table(runs: Sequence[PlannedRun], sweep_dir: Path, live: dict, started: dict) -> str:
    """One line per run: status, step, last train loss and validation loss, time."""
    now = time.time()
    rows = [f"{'#':>3} {'run':<34} {'status':<8} {'step':>11} {'loss':>7} {'val':>7} {'time':>7}"]
    for r in runs:
        row = result_row(r, sweep_dir / r.name, live.get(r.name))
        t = row["wall_s"] + (now - started[r.name] if r.name in started else 0.0)
        cells = [_num(row[k]) for k in ("train_loss", "final_val_loss")]
        rows.append(
            f"{r.index:>3} {r.name:<34} {row['status']:<8} "
            f"{str(row['step']) + '/' + str(r.cfg.train.steps):>11} {cells[0]:>7} {cells[1]:>7} "
            f"{fmt_time(t):>7}"
        )
    return "\n".join(rows)


class _Stop:
    """SIGINT/SIGTERM: stop launching, ask running runs to checkpoint and exit (SIGTERM)."""

    def __init__(self):
        self.requested = False
        self.children: list[subprocess.Popen] = []
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        for p in self.children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # once: a second SIGINT would abort the run

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_sweep(
    runs: Sequence[PlannedRun],
    sweep_dir: Path,
    parallel: int = 1,
    only: int | None = None,
    devices_per_run: int | None = None,
    gpus_per_run: int = 0,
    report_every: float = 60.0,
    echo: Callable[[str], None] = print,
) -> int:
    """Runs the unfinished runs of the plan (or only plan index `only`); 0 if all succeeded.

    Runs start largest first (fewest idle slots at the end), each in its own process with its
    own workdir; a line is printed when a run starts or ends, the progress table every
    `report_every` seconds and at the end. Ctrl-C / SIGTERM make the running runs save a
    checkpoint and exit.
    """
    sweep_dir = Path(sweep_dir).absolute()
    if only is not None and not 0 <= only < len(runs):
        raise ConfigError(f"--index {only} is out of range: the sweep has {len(runs)} runs")
    chosen = list(runs) if only is None else [runs[only]]
    prepare(chosen, sweep_dir)
    todo = [r for r in chosen if not (sweep_dir / r.name / "result.json").is_file()]
    for r in todo:
        pid = running_pid(sweep_dir / r.name)
        if pid is not None:
            raise ConfigError(f"{r.name} is still being trained by process {pid}; stop it first")
    skipped = len(chosen) - len(todo)
    echo(f"sweep {sweep_dir}: {len(runs)} runs, {skipped} already finished, {len(todo)} to run")
    todo.sort(key=lambda r: -r.model_flops)
    devices = devices_per_run or default_devices(parallel)
    free_slots = list(range(parallel))
    active: dict[str, tuple[subprocess.Popen, int, PlannedRun]] = {}
    live: dict[str, str] = {}
    started: dict[str, float] = {}
    failed: list[str] = []
    last_report = time.time()
    with _Stop() as stop:
        while True:
            while todo and free_slots and not stop.requested:
                run, slot = todo.pop(0), free_slots.pop(0)
                gpus = (
                    range(slot * gpus_per_run, (slot + 1) * gpus_per_run) if gpus_per_run else None
                )
                proc = _launch(run, sweep_dir, child_env(devices, gpus), stop)
                active[run.name] = (proc, slot, run)
                live[run.name], started[run.name] = "running", time.time()
                echo(
                    f"started #{run.index} {run.name} ({run.cfg.train.steps} steps, pid {proc.pid})"
                )
            for name, (proc, slot, run) in list(active.items()):
                if proc.poll() is None:
                    continue
                del active[name]
                free_slots.append(slot)
                took = fmt_time(time.time() - started.pop(name))
                live[name] = status = _finish(run, sweep_dir, proc.returncode)
                row = result_row(run, sweep_dir / name, status)
                echo(
                    f"{status} #{run.index} {name} after {took}: step {row['step']}, "
                    f"val_loss {_num(row['final_val_loss'])}"
                    + (f", exit status {proc.returncode}" if status == "failed" else "")
                )
                if status == "failed":
                    failed.append(name)
                    echo(
                        f"  {sweep_dir / name / 'train.log'} ends:\n" + _log_tail(sweep_dir / name)
                    )
                write_results(sweep_dir, runs, live)
            if time.time() - last_report > report_every:
                echo(progress_table(chosen, sweep_dir, live, started))
                last_report = time.time()
            if not active and (stop.requested or not todo):
                break
            time.sleep(0.2)
    rows = write_results(sweep_dir, runs, live)
    echo(progress_table(chosen, sweep_dir, live, started))
    done = sum(r["status"] == "done" for r in rows)
    echo(f"{done}/{len(rows)} runs finished; results in {sweep_dir / 'results.jsonl'} and .csv")
    if stop.requested:
        echo("stopped by a signal; run the same command again to resume")
    if failed:
        echo(f"{len(failed)} run(s) failed: {', '.join(failed)}; re-run the sweep to retry them")
    return 1 if failed else 0


def _launch(run: PlannedRun, sweep_dir: Path, env: dict, stop: _Stop) -> subprocess.Popen:
    d = sweep_dir / run.name
    logf = open(d / "train.log", "a")  # the child keeps it; closed below
    cmd = [sys.executable, "-m", "lmtrain", "train", "--config-json", str(d / "sweep_config.json")]
    cmd += ["--workdir", str(d)]
    logf.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
    logf.flush()
    # A session of its own: Ctrl-C reaches the sweep, which passes on exactly one SIGTERM.
    proc = subprocess.Popen(
        cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    logf.close()
    stop.children.append(proc)
    attempts = read_attempts(d) + [{"start": time.time(), "pid": proc.pid}]
    atomic_write(d / "attempts.json", json.dumps(attempts, indent=1))
    return proc


def _finish(run: PlannedRun, sweep_dir: Path, rc: int) -> str:
    """Records the attempt's end; writes result.json if the run is complete. Returns status."""
    d = sweep_dir / run.name
    attempts = read_attempts(d)
    attempts[-1].update(end=time.time(), rc=rc)
    atomic_write(d / "attempts.json", json.dumps(attempts, indent=1))
    if rc != 0:
        return "failed"
    if not finished(run, d):
        return "stopped"
    atomic_write(d / "result.json", json.dumps(result_row(run, d, "done"), indent=1) + "\n")
    return "done"


def render_slurm(template: str, spec: str, sweep_dir: Path, n_runs: int, parallel: int) -> str:
    """Fills lmtrain/launch/sweep_array.sbatch: array task i runs plan index i (`sweep --index
    i`); the job starts in the directory the sweep was planned from, with this lmtrain first on
    its PYTHONPATH."""
    path, colon, arg = spec.partition(":")
    values = {
        "ARRAY": f"0-{n_runs - 1}" + (f"%{parallel}" if parallel else ""),
        "EXPERIMENT": str(Path(path).absolute()) + colon + arg,
        "SWEEP_DIR": str(Path(sweep_dir).absolute()),
        "JOB_NAME": f"sweep-{Path(sweep_dir).absolute().name}",
        "PYTHON": sys.executable,
        "WORKDIR": str(Path.cwd()),
        "PYTHONPATH": str(ROOT),
    }
    for key, value in values.items():
        template = template.replace(f"@@{key}@@", value)
    left = re.findall(r"@@\w+@@", template)
    if left:
        raise ConfigError(f"unknown placeholders in the SLURM template: {', '.join(left)}")
    return template


def write_slurm(
    runs: Sequence[PlannedRun], spec: str, sweep_dir: Path, parallel: int, template: Path | None
) -> Path:
    """Renders the job-array template into SWEEP_DIR/sweep_array.sbatch."""
    template = template or LAUNCH / "sweep_array.sbatch"
    if not template.is_file():
        raise ConfigError(f"SLURM template not found: {template}; pass --slurm-template")
    text = render_slurm(template.read_text(), spec, sweep_dir, len(runs), parallel)
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    out = Path(sweep_dir) / "sweep_array.sbatch"
    out.write_text(text)
    return out
