"""Sweeps: grids, run names and counts, dry run, SLURM rendering, skip/resume after a kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtrain import config as config_lib
from lmtrain.cli import main
from lmtrain.config import Config, ConfigError
from lmtrain.sweeps import planning as sweep_plan
from lmtrain.sweeps import runner, throughput, workdirs

ROOT = Path(__file__).resolve().parents[1]
TINY = {"model.d_model": 32, "model.n_layers": 2, "model.n_heads": 2}


def base(**sets) -> Config:
    cfg = config_lib.override(
        Config(),
        {
            "model.name": "transformer",
            **TINY,
            "data.tokenizer": "bytes",
            "data.seq_len": 32,
            "train.batch_size": 8,
            "optim.warmup_steps": 20,
            **sets,
        },
    )
    return config_lib.with_family_config(cfg)


def test_param_counts_exclude_embedding_and_head():
    total, n = sweep_plan.param_counts(base())
    d, v = 32, 258  # the bytes tokenizer's vocabulary
    assert total - n == 2 * v * d  # untied: embedding table + output head
    tied_total, tied_n = sweep_plan.param_counts(base(**{"model.tie_embeddings": True}))
    assert (tied_total, tied_n) == (total - v * d, n)
    # Per layer: q, k, v, o (4 d^2) + SwiGLU (3 d F, F = 128) + 2 norms; plus the final norm.
    assert n == 2 * (4 * d * d + 3 * d * 128 + 2 * d) + d
    assert sweep_plan.resolved_vocab(base(**{"data.tokenizer": "bpe:1000"})) == 1000


def test_isoflop_grid_gives_each_size_its_share_of_each_budget():
    sizes = [TINY, {"model.d_model": 64, "model.n_layers": 2, "model.n_heads": 2}]
    budgets = [1e10, 3e10]
    runs = sweep_plan.plan(sweep_plan.isoflop_grid(base(), budgets, sizes, seeds=(0, 1)))
    assert len(runs) == 8 and len({r.name for r in runs}) == 8
    for r in runs:
        c = budgets[r.index // 4]
        # D = C / 6N, rounded to whole steps of 256 tokens.
        assert abs(r.tokens - c / (6 * r.params_nonembed)) <= 128
        assert r.flops == 6 * r.params_nonembed * r.tokens
        assert r.model_flops > r.flops  # head and attention on top of 6N
        assert r.name == (
            f"transformer-N{sweep_plan.si(r.params_nonembed)}-D{sweep_plan.si(r.tokens)}-s{r.cfg.train.seed}"
        )
        assert r.cfg.optim.warmup_steps == min(20, r.cfg.train.steps // 10)
        assert r.cfg.train.eval_every == -(-r.cfg.train.steps // 2)
        assert r.cfg.train.progress is False
    assert runs[0].name == "transformer-N32.9k-D50.7k-s0"
    small = sweep_plan.isoflop_grid(base(), [1e9], sizes, min_steps=10)  # d64 would get 6 steps
    assert [c.model.d_model for c in small] == [32]


def test_plan_disambiguates_same_named_runs_and_refuses_duplicates():
    a = sweep_plan.with_tokens(base(), 2560)
    b = config_lib.override(a, {"optim.lr": 1e-3})  # same family, N, D, seed: same name
    names = [r.name for r in sweep_plan.plan([a, b])]
    assert names[0] != names[1] and names[0].startswith("transformer-N32.9k-D2.56k-s0-")
    with pytest.raises(ConfigError, match="more than once"):
        sweep_plan.plan([a, a])


def test_size_token_and_equal_time_grids(tmp_path, monkeypatch):
    grid = sweep_plan.size_token_grid(base(), [TINY], [2560, 5120])
    assert [sweep_plan.tokens(c) for c in grid] == [2560, 5120]
    variants = [{"model.name": "transformer"}, {"model.name": "gla"}]
    cfgs = throughput.equal_time_grid(base(), variants, seconds=10, throughputs=[1000.0, 2560.0])
    assert [sweep_plan.tokens(c) for c in cfgs] == [9984, 25600]  # 39 and 100 steps of 256 tokens
    assert cfgs[1].model.name == "gla"
    # Measured throughputs are cached, so re-planning a sweep gives the same runs.
    calls = []
    monkeypatch.setattr(throughput, "measure_throughput", lambda c: calls.append(c) or 512.0)
    cache = tmp_path / "throughput.json"
    for _ in range(2):
        again = throughput.equal_time_grid(base(), variants, seconds=10, cache=cache)
        assert [sweep_plan.tokens(c) for c in again] == [5120, 5120]
    assert len(calls) == 2 and len(json.loads(cache.read_text())) == 2


def _write_exp(tmp_path: Path, corpus: Path, body: str) -> str:
    p = tmp_path / "exp.py"
    p.write_text(f"""
from lmtrain import config, sweeps

def base(steps, ckpt):
    return config.override(config.Config(), {{
        "model.name": "transformer", "model.d_model": 32, "model.n_layers": 2,
        "model.n_heads": 2, "data.source": {str(corpus)!r}, "data.tokenizer": "bytes",
        "data.cache_dir": {str(tmp_path / "cache")!r}, "data.seq_len": 32,
        "train.batch_size": 8, "train.steps": steps, "train.log_every": 10,
        "train.eval_every": steps, "train.checkpoint_every": ckpt, "optim.warmup_steps": 2,
        "eval.batch_size": 8, "eval.max_batches": 1,
    }})

def get_config(arg):
    return base(6, 3)

def get_sweep(arg):
{body}
""")
    return str(p)


def test_dry_run_lists_runs_with_n_d_c_and_time(tmp_path, corpus, capsys):
    exp = _write_exp(tmp_path, corpus, "    return [base(6, 3), base(60, 30)]")
    args = ["sweep", exp, "--dir", str(tmp_path / "sw"), "--dry-run", "--flops-per-sec", "1e8"]
    assert main([*args, "--parallel", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == "# run N N total D C=6ND steps est status".split()
    assert out[1].split()[:5] == ["0", "transformer-N32.9k-D1.54k-s0", "32.9k", "49.4k", "1.54k"]
    assert out[2].split()[1] == "transformer-N32.9k-D15.4k-s0" and "3.03e+09" in out[2]
    assert "2 runs (2 to run)" in out[-1] and "--parallel 2" in out[-1]
    assert not (tmp_path / "sw").exists()  # a dry run creates nothing


def test_dry_run_measure_uses_each_models_measured_throughput(tmp_path, corpus, monkeypatch):
    exp = _write_exp(tmp_path, corpus, "    return [base(6, 3), base(60, 30)]")
    runs = sweep_plan.load_sweep(exp, tmp_path / "sw")
    monkeypatch.setattr(throughput, "measure_throughput", lambda cfg: 1536.0)  # tokens/s
    table = throughput.dry_run(runs, tmp_path / "sw", parallel=2, measure=True).splitlines()
    # 1.54k tokens at 1536/2 tokens/s: 2 s + 10 s start-up; 15.4k tokens: 20 s + 10 s.
    assert [line.split()[7] for line in table[1:3]] == ["0m12s", "0m30s"]
    assert "estimated 0m30s with --parallel 2" in table[-1]
    assert len(json.loads((tmp_path / "sw" / "throughput.json").read_text())) == 1


@pytest.mark.slow
def test_measure_throughput_runs_a_short_training(tmp_path, corpus):
    exp = _write_exp(tmp_path, corpus, "    return []")
    cfg = config_lib.load_experiment(exp)
    assert throughput.measure_throughput(cfg, steps=10) > 100  # tokens/s; tiny models do ~10^4


def test_child_env_sets_devices_and_gpus(monkeypatch):

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8")
    env = workdirs.child_env(2, range(2, 4))
    assert env["XLA_FLAGS"].split() == [
        "--xla_cpu_foo=1",
        "--xla_force_host_platform_device_count=2",
    ]
    assert env["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(ROOT)


def test_host_devices_follow_the_cores_this_process_may_use(monkeypatch):
    """A SLURM task's allocation, else the affinity mask, decides (not the machine's cores)."""
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert workdirs.default_devices(1) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert workdirs.default_devices(1) == 4 and workdirs.default_devices(2) == 2
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert workdirs.default_devices(1) == 8 and workdirs.default_devices(8) == 4


def test_train_needs_exactly_one_config_source(capsys):
    assert main(["train"]) == 2
    assert "needs an experiment file, --config or --config-json (one)" in capsys.readouterr().err


def test_slurm_array_script_renders(tmp_path, corpus, capsys):
    exp = _write_exp(tmp_path, corpus, "    return [base(6, 3), base(9, 3), base(12, 3)]")
    sw = tmp_path / "sw"
    assert main(["sweep", f"{exp}:big", "--dir", str(sw), "--slurm", "--parallel", "2"]) == 0
    assert "sbatch" in capsys.readouterr().out
    text = (sw / "sweep_array.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(sw / "sweep_array.sbatch")]).returncode == 0
    assert "@@" not in text
    directives = [
        line.split(None, 1)[1] for line in text.splitlines() if line.startswith("#SBATCH")
    ]
    assert "--array=0-2%2" in directives and "--requeue" in directives
    assert any(d.startswith("--signal=TERM@") for d in directives)
    assert f'sweep "{exp}:big" --dir "{sw}"' in text
    assert '--index "$SLURM_ARRAY_TASK_ID"' in text


def test_sweep_usage_errors(tmp_path, corpus, capsys):
    def error(exp_body, *extra):
        exp = _write_exp(tmp_path, corpus, exp_body)
        assert main(["sweep", exp, "--dir", str(tmp_path / "sw"), *extra]) == 2
        return capsys.readouterr().err

    assert "non-empty list of Config" in error("    return []", "--dry-run")
    assert "--index 5 is out of range" in error("    return [base(6, 3)]", "--index", "5")
    (tmp_path / "nosweep.py").write_text("def get_config(arg):\n    return None\n")
    assert main(["sweep", str(tmp_path / "nosweep.py"), "--dir", "x"]) == 2
    assert "has no get_sweep" in capsys.readouterr().err
    # A run directory planned with another config is refused, not silently reused.
    exp = _write_exp(tmp_path, corpus, "    return [base(6, 3)]")
    runs = sweep_plan.load_sweep(exp, tmp_path / "sw")

    runner.prepare(runs, tmp_path / "sw")
    saved = tmp_path / "sw" / runs[0].name / "sweep_config.json"
    # A plan written before a config field existed still matches (the field at its default).
    older = json.loads(saved.read_text())
    del older["data"]["packing"], older["eval"]["lengths"]
    saved.write_text(json.dumps(older))
    runner.prepare(runs, tmp_path / "sw")
    changed = json.loads(saved.read_text())
    changed["optim"]["lr"] = 0.5
    saved.write_text(json.dumps(changed))
    assert main(["sweep", exp, "--dir", str(tmp_path / "sw")]) == 2
    assert "planned with a different config (optim.lr)" in capsys.readouterr().err


def _lmtrain(*args, **kw):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "lmtrain", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


@pytest.mark.slow
def test_killed_run_alone_resumes_when_the_sweep_is_rerun(tmp_path, corpus):
    """Run A finishes; run B is killed with SIGKILL after its step-30 checkpoint; the rerun
    skips A untouched and resumes B from its checkpoint to the end."""
    exp = _write_exp(tmp_path, corpus, "    return [base(6, 3), base(600, 30)]")
    sw = tmp_path / "sw"
    first = _lmtrain("sweep", exp, "--dir", str(sw), "--parallel", "2")
    a, b = sw / "transformer-N32.9k-D1.54k-s0", sw / "transformer-N32.9k-D154k-s0"
    deadline = time.time() + 240
    while not (b / "checkpoints" / "30" / "_CHECKPOINT_METADATA").exists():
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline, "no checkpoint at step 30 in time"
        time.sleep(0.05)
    os.kill(json.loads((b / "attempts.json").read_text())[-1]["pid"], signal.SIGKILL)
    out, err = first.communicate(timeout=240)
    assert first.returncode == 1, out + err  # a failed run fails the sweep
    assert "failed #1 transformer-N32.9k-D154k-s0" in out and "exit status -9" in out
    assert (a / "result.json").is_file() and not (b / "result.json").exists()
    a_result = (a / "result.json").read_text()
    a_mtime = (a / "metrics.jsonl").stat().st_mtime_ns
    statuses = [json.loads(line)["status"] for line in (sw / "results.jsonl").open()]
    assert statuses == ["done", "failed"]

    second = _lmtrain("sweep", exp, "--dir", str(sw), "--parallel", "2")
    out, err = second.communicate(timeout=300)
    assert second.returncode == 0, out + err
    assert "2 runs, 1 already finished, 1 to run" in out
    assert (a / "result.json").read_text() == a_result
    assert (a / "metrics.jsonl").stat().st_mtime_ns == a_mtime
    assert len(json.loads((a / "attempts.json").read_text())) == 1
    assert len(json.loads((b / "attempts.json").read_text())) == 2
    log = (b / "train.log").read_text()
    resumed = int(log.split("resumed at step ")[1].split()[0])
    assert resumed >= 30 and resumed % 30 == 0
    rows = [json.loads(line) for line in (sw / "results.jsonl").open()]
    assert [r["status"] for r in rows] == ["done", "done"]
    assert rows[1]["step"] == 600 and rows[1]["final_val_loss"] < rows[0]["final_val_loss"]
    assert rows[1]["wall_s"] > 0 and rows[1]["tokens_per_sec"] > 0
    csv_lines = (sw / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("index,name,family,status")
