"""The SLURM path under a real scheduler: slurmctld and slurmd on this machine
(tests/slurm/cluster.sh), the launch scripts exactly as shipped, sbatch, scancel and requeue."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HANG_S, JIT_CACHE_ENV, TEST_XLA_FLAGS, losses, multiprocess_experiment

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"
SBATCH = ROOT / "lmtrain" / "launch" / "slurm.sbatch"
# The shipped scripts ask for GPUs; a CPU cluster overrides that on the command line (README).
STEPS = 120
CPU_TASKS = ["--gpus-per-task=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=30"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("slurmctld") is None or shutil.which("sbatch") is None,
        reason="SLURM is not installed: apt-get install slurmctld slurmd slurm-client "
        "(as root; .ci/run does)",
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster's daemons run as root"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; yields the environment its clients need."""
    d = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", str(CLUSTER), "start", str(d)], check=True, timeout=60)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "LMTRAIN_", "JAX_"))}
    # The test run's compilation cache and compile flags stay (conftest.py).
    env.update({k: os.environ[k] for k in JIT_CACHE_ENV})
    env.update(
        XLA_FLAGS=TEST_XLA_FLAGS,
        SLURM_CONF=str(d / "slurm.conf"),
        PYTHONPATH=str(ROOT),
        PYTHON=sys.executable,
        LMTRAIN_CACHE=os.environ.get("LMTRAIN_CACHE", str(Path.home() / ".cache/lmtrain")),
    )
    yield env
    subprocess.run(["scancel", "--user=root"], env=env, check=False)
    subprocess.run(["bash", str(CLUSTER), "stop", str(d)], check=False, timeout=60)


@pytest.fixture(scope="module")
def exp(tmp_path_factory) -> Path:
    return multiprocess_experiment(tmp_path_factory.mktemp("exp"))


@pytest.fixture(scope="module")
def ref(exp, tmp_path_factory) -> dict[int, float]:
    """Losses of one process on 4 CPU devices, 12 steps."""
    wd = tmp_path_factory.mktemp("ref") / "w"
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_")}
    env.update(XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4")
    env.update(PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "lmtrain", "train", f"{exp}:12", "--workdir", str(wd)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return losses(wd)


@pytest.fixture(scope="module")
def uninterrupted(slurm, exp, tmp_path_factory) -> tuple[dict[int, float], str]:
    """(losses, job log) of `sbatch launch/slurm.sbatch` with 2 tasks, STEPS steps, no signal."""
    d = tmp_path_factory.mktemp("full")
    jid = sbatch(slurm, d, "--wait", *CPU_TASKS, str(SBATCH), f"{exp}:{STEPS}", str(d / "w"))
    log = (d / f"lmtrain-{jid}.out").read_text()
    assert job(slurm, jid)["ExitCode"] == "0:0", log[-3000:]
    return losses(d / "w"), log


def sbatch(env: dict, cwd: Path, *args: str) -> int:
    out = subprocess.run(
        ["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().split(";")[0])


def job(env: dict, job_id: int | str) -> dict[str, str]:
    """scontrol's fields of a job (JobState, Restarts, ExitCode, ...)."""
    out = subprocess.run(
        ["scontrol", "show", "job", str(job_id), "--oneliner"],
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def wait_for(predicate, what: str, limit: float = 300) -> None:
    deadline = time.time() + limit
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_sbatch_two_tasks_is_one_jax_distributed_run_equal_to_one_process(uninterrupted, ref):
    got, log = uninterrupted
    assert "2 process(es)" in log, log[-3000:]  # detected from SLURM's environment alone
    # Each process times its peak on a device of its own (process 1 once timed process 0's,
    # which never ran there, and cached 6,916,211 GFLOP/s).
    from lmtrain import flops

    peak = float(log.split("| peak ")[1].split()[0].replace(",", "")) * 1e9
    assert 0 < peak <= flops.cpu_flops_bound("float32"), log[-3000:]
    assert sorted(got) == list(range(1, STEPS + 1))
    # The tolerance of the other multi-process tests, over their 12 steps (across 300, the
    # order of the cross-process sums drifts to a few 1e-5).
    np.testing.assert_allclose([got[s] for s in ref], [ref[s] for s in ref], rtol=1e-5)


def test_term_before_the_limit_saves_requeues_and_the_requeued_job_resumes(
    slurm, exp, uninterrupted, tmp_path
):
    wd = tmp_path / "w"
    jid = sbatch(slurm, tmp_path, *CPU_TASKS, str(SBATCH), f"{exp}:{STEPS}", str(wd))
    wait_for(lambda: (wd / "checkpoints" / "3" / "_CHECKPOINT_METADATA").exists(), "step 3")
    # As --signal=TERM@120 does before the time limit: TERM to every task of the job's steps.
    subprocess.run(["scancel", "--signal=TERM", str(jid)], env=slurm, check=True)
    wait_for(lambda: job(slurm, jid).get("Restarts", "0") != "0", "the requeue")
    wait_for(lambda: job(slurm, jid).get("JobState") == "COMPLETED", "the requeued job", 600)
    log = (tmp_path / f"lmtrain-{jid}.out").read_text()
    stopped = int(log.split("stopped by a signal at step ")[1].split(";")[0])
    assert 3 <= stopped < STEPS, "the signal came after the run had ended: nothing was tested"
    assert f"requeueing job {jid}" in log and f"resumed at step {stopped}" in log, log[-3000:]
    assert job(slurm, jid)["ExitCode"] == "0:0"
    got, want = losses(wd), uninterrupted[0]
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=1e-6)


def test_kill_of_one_task_ends_the_whole_step_within_the_hang_timeout(slurm, exp, tmp_path):
    wd = tmp_path / "w"
    jid = sbatch(
        slurm,
        tmp_path,
        *CPU_TASKS,
        str(SBATCH),
        f"{exp}:100000",
        str(wd),
        "--set",
        f"train.hang_timeout_s={HANG_S}",
    )
    wait_for(lambda: (wd / "checkpoints" / "3" / "_CHECKPOINT_METADATA").exists(), "step 3")
    # SIGKILL to task 1 alone (as the kernel's OOM killer would): task 0 is left inside a
    # collective, waiting for a peer that is gone.
    pids = subprocess.run(
        ["scontrol", "listpids", str(jid)], env=slurm, capture_output=True, text=True
    ).stdout.split("\n")[1:]
    rows = [r.split() for r in pids if r.strip()]  # PID JOBID STEPID LOCALID GLOBALID
    task1 = [int(r[0]) for r in rows if r[2] == "0" and r[4] == "1"]
    assert task1, pids
    t0 = time.time()
    os.kill(task1[0], 9)
    wait_for(lambda: job(slurm, jid).get("JobState") not in ("RUNNING", "COMPLETING"), "the end")
    elapsed = time.time() - t0
    state = job(slurm, jid)
    assert state["JobState"] in ("FAILED", "CANCELLED"), state
    assert elapsed < HANG_S + 30, f"the step took {elapsed:.0f} s to end"
    left = subprocess.run(["pgrep", "-f", f"{exp}:100000"], capture_output=True, text=True)
    assert left.stdout.strip() == "", "a task was left running"


def sweep_experiment(d: Path, corpus: Path) -> Path:
    """Five tiny runs (2 widths x 3 budgets less the largest: a fit needs 5 or more) on the
    multi-process corpus."""
    p = d / "sweep_exp.py"
    p.write_text(f"""
from lmtrain import config

def get_config(arg):
    return get_sweep(arg)[0]

def get_sweep(arg):
    return [config.override(config.Config(), {{
        "model.name": "transformer", "model.d_model": d, "model.n_layers": 2,
        "model.n_heads": 2, "data.source": {str(corpus)!r}, "data.tokenizer": "bytes",
        "data.cache_dir": {str(d / "cache")!r}, "data.seq_len": 32, "train.batch_size": 8,
        "train.steps": s, "train.log_every": 10, "train.eval_every": s,
        "train.checkpoint_every": s, "train.progress": False, "optim.warmup_steps": 2,
        "eval.batch_size": 8, "eval.max_batches": 2,
    }}) for d, s in ((16, 10), (16, 20), (16, 40), (32, 10), (32, 20))]
""")
    return p


def test_sweep_array_runs_under_sbatch_and_collects_the_local_runners_table(slurm, exp, tmp_path):
    sweep_exp = sweep_experiment(tmp_path, exp.parent / "corpus")
    env = slurm  # each run gets 1 host device: a share of 2 cores (local), 1 CPU a task (SLURM)

    def lmtrain(*args: str) -> str:
        cmd = [sys.executable, "-m", "lmtrain", *args]
        p = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
        return p.stdout

    local, array = tmp_path / "local", tmp_path / "array"
    lmtrain("sweep", str(sweep_exp), "--dir", str(local), "--parallel", "2")
    out = lmtrain("sweep", str(sweep_exp), "--dir", str(array), "--parallel", "2", "--slurm")
    script = array / "sweep_array.sbatch"
    assert f"sbatch {script}" in out
    # As a CPU cluster runs it (README): no GPUs, one CPU a task; 2 tasks at a time (%2).
    jid = sbatch(env, tmp_path, "--wait", "--gpus-per-task=0", "--cpus-per-task=1", str(script))
    logs = sorted(array.glob(f"slurm-{jid}_*.out"))
    assert len(logs) == 5, [p.name for p in array.iterdir()]
    lmtrain("sweep", str(sweep_exp), "--dir", str(array), "--collect")
    keys = ("name", "status", "step", "final_val_loss", "params", "tokens")
    rows = {}
    for name, d in (("local", local), ("array", array)):
        lines = (d / "results.jsonl").read_text().splitlines()
        rows[name] = [{k: r.get(k) for k in keys} for r in map(json.loads, lines)]
    assert [r["status"] for r in rows["array"]] == ["done"] * 5
    assert rows["array"] == rows["local"]  # the same arithmetic on the same devices: exact
    # The tiny corpus is seen up to 1.4 times by the longest runs: fit them anyway (the test
    # compares the two fits, not the law, so 10 bootstrap fits do: 200 took 20 s a sweep).
    for d in (local, array):
        lmtrain("fit", str(d), "--repeated", "include", "--bootstrap", "10")
    fits = [json.loads((d / "fit.json").read_text())["families"] for d in (local, array)]
    assert fits[0] == fits[1]
