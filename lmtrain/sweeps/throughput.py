"""How long a sweep will take: measured throughput per model, and the dry-run table."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import jax

from lmtrain import config as config_lib
from lmtrain import flops
from lmtrain.config import Config, ConfigError
from lmtrain.sweeps.planning import PlannedRun, si, with_tokens
from lmtrain.sweeps.workdirs import child_env, default_devices, read_metrics


def equal_time_grid(
    base: Config,
    variants: Sequence[dict],
    seconds: float,
    throughputs: Sequence[float] | None = None,
    cache: Path | None = None,
) -> list[Config]:
    """Languini-style equal compute: each variant gets the tokens `seconds` of training buys.

    Throughput (tokens/s) is measured first for each variant by a short real training run
    (`measure_throughput`, alone on this host), unless `throughputs` are given. Measurements
    are cached in the JSON file `cache`; pass SWEEP_DIR/throughput.json (a `get_sweep(arg,
    sweep_dir)` is given the directory) so the plan, and with it the run names, stay the same
    when the sweep is re-run. Without a cache every planning measures again.
    """
    cfgs = [config_lib.override(base, v) for v in variants]
    if throughputs is None:
        throughputs = [cached_throughput(c, cache) for c in cfgs]
    return [with_tokens(c, t * seconds) for c, t in zip(cfgs, throughputs, strict=True)]


def cached_throughput(cfg: Config, cache: Path | None) -> float:
    """`measure_throughput(cfg)`, remembered in the JSON file `cache` when one is given."""
    shape = config_lib.to_dict(config_lib.with_family_config(cfg))
    key_src = {k: shape[k] for k in ("model", "data", "mesh")} | {"batch": cfg.train.batch_size}
    key = hashlib.sha1(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    known = json.loads(cache.read_text()) if cache and cache.is_file() else {}
    if key not in known:
        known[key] = measure_throughput(cfg)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(known, indent=1))
    return known[key]


def measure_throughput(cfg: Config, steps: int = 20) -> float:
    """Training tokens/s of cfg: median of the logged rates of a short `lmtrain train` run."""
    short = config_lib.override(
        cfg,
        {
            "train.steps": steps,
            "train.log_every": max(1, steps // 5),
            "train.eval_every": 0,
            "train.checkpoint_every": 0,
            "train.progress": False,
            "optim.warmup_steps": 1,
            "eval.max_batches": 1,
        },
    )
    with tempfile.TemporaryDirectory(prefix="lmtrain-throughput-") as tmp:
        config_lib.save_json(short, Path(tmp) / "sweep_config.json")
        proc = subprocess.run(
            [sys.executable, "-m", "lmtrain", "train", "--config-json", f"{tmp}/sweep_config.json"],
            env=child_env(default_devices(1)),
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise ConfigError(
                f"the throughput run of {cfg.model.name} failed:\n{proc.stderr[-2000:]}"
            )
        rates = [r["tokens_per_sec"] for r in read_metrics(Path(tmp))[0].values()]
    rates = sorted(rates[1:] or rates)  # the first interval includes the first, slow step
    return float(rates[len(rates) // 2])


# ---------------------------------------------------------------------------- dry run


STARTUP_S = 10.0  # process start, peak measurement, compilation: measured 7-10 s on 2 cores
ASSUMED_MFU = 0.2  # small models on CPU reached 18-37% of the measured peak (BENCHMARKS.md)


def run_rates(
    runs: Sequence[PlannedRun],
    sweep_dir: Path,
    parallel: int,
    flops_per_sec: float | None = None,
    measure: bool = False,
    gpus_per_run: int = 0,
) -> tuple[list[float], str]:
    """Model FLOP/s each run should achieve, and where that figure comes from.

    In order: `flops_per_sec`; with `measure`, each model's tokens/s from a short real run
    alone on this host (`cached_throughput`, cached in SWEEP_DIR/throughput.json) divided by
    the runs sharing the host; the median of the sweep's finished runs; else ASSUMED_MFU of
    the peak, shared likewise. Runs share the host unless each has its own GPUs.
    """
    share = 1 if gpus_per_run else parallel
    if flops_per_sec:
        return [flops_per_sec] * len(runs), f"--flops-per-sec {flops_per_sec:.3g}"
    if measure:
        cache = Path(sweep_dir) / "throughput.json"
        rates = [cached_throughput(r.cfg, cache) * r.model_flops / r.tokens / share for r in runs]
        return rates, f"each model measured alone, shared by {share} runs; cache {cache}"
    done = []
    for path in Path(sweep_dir).glob("*/result.json"):
        r = json.loads(path.read_text())
        if r.get("tokens_per_sec") and r.get("tokens"):
            done.append(r["tokens_per_sec"] * r["model_flops"] / r["tokens"])
    if done:
        rate = sorted(done)[len(done) // 2]
        return [rate] * len(runs), f"median of {len(done)} finished runs, {rate / 1e9:.1f} GFLOP/s"
    peak, source = flops.peak_flops(jax.devices())
    rate = ASSUMED_MFU * peak / share
    return [rate] * len(runs), (
        f"assumed {ASSUMED_MFU:.0%} MFU of {peak / 1e9:.0f} GFLOP/s ({source}) shared by "
        f"{share} runs = {rate / 1e9:.1f} GFLOP/s per run; --measure measures each model"
    )


def makespan(durations: Sequence[float], parallel: int) -> float:
    """Wall time of running `durations` longest first on `parallel` slots."""
    slots = [0.0] * parallel
    for t in sorted(durations, reverse=True):
        slots[slots.index(min(slots))] += t
    return max(slots)


def fmt_time(s: float) -> str:
    """1h05m, 3m07s."""
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def dry_run(runs: Sequence[PlannedRun], sweep_dir: Path, parallel: int, **rates) -> str:
    """The plan as a table: N, D, C, steps, estimated time and status of each run.

    `rates` go to `run_rates`; the estimate is model FLOPs / rate + STARTUP_S per run, run
    largest first on `parallel` slots.
    """
    per_run, source = run_rates(runs, sweep_dir, parallel, **rates)
    est = [r.model_flops / rate + STARTUP_S for r, rate in zip(runs, per_run, strict=True)]
    head = f"{'#':>3} {'run':<34} {'N':>7} {'N total':>7} {'D':>7} {'C=6ND':>8} {'steps':>6}"
    lines = [f"{head} {'est':>7}  status"]
    for r, t in zip(runs, est, strict=True):
        lines.append(
            f"{r.index:>3} {r.name:<34} {si(r.params_nonembed):>7} {si(r.params):>7} "
            f"{si(r.tokens):>7} {r.flops:>8.2e} {r.cfg.train.steps:>6} {fmt_time(t):>7}  "
            + ("done" if _done(sweep_dir, r) else "to run")
        )
    todo = [t for r, t in zip(runs, est, strict=True) if not _done(sweep_dir, r)]
    lines.append(
        f"{len(runs)} runs ({len(todo)} to run), C = {sum(r.flops for r in runs):.3g} FLOPs "
        f"(6ND, N non-embedding), model FLOPs {sum(r.model_flops for r in runs):.3g}; "
        f"estimated {fmt_time(makespan(todo, parallel))} with --parallel {parallel} "
        f"(throughput: {source}; plus {STARTUP_S:.0f} s start-up per run)"
    )
    return "\n".join(lines)


def _done(sweep_dir: Path, run: PlannedRun) -> bool:
    return (Path(sweep_dir) / run.name / "result.json").is_file()
