"""Scaling-law sweeps: grids of configs, parameter and FLOP counts, run names, time estimates.

FLOPs convention: C = 6 N D, N = non-embedding parameters (all but the token-embedding table
and the output head), D = training tokens = train.steps x train.batch_size x data.seq_len.
Results also carry `model_flops` = cfg.model.flops_per_token(seq_len) x D, the count MFU uses
(head and attention included). `lmtrain.scaling` fits laws in C = 6 N D.

An experiment file's `get_sweep(arg) -> list[Config]` builds its runs with the grid helpers
here; `plan` names them family-N<non-embedding params>-D<tokens>-s<seed>; `lmtrain.sweep_runner`
runs them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lmtrain import config as config_lib
from lmtrain.config import Config, ConfigError

log = logging.getLogger("lmtrain")

EMBEDDING_KEYS = ("token_embed", "head")  # top-level parameter groups that are not in N
_CACHE_DIR: list[Path] = []  # the sweep dir while get_sweep runs (throughput measurements)


# ---------------------------------------------------------------------------- counting


def resolved_vocab(cfg: Config) -> int:
    """model.vocab_size as the run will set it; "bpe:N" counts as N without training it."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    spec = cfg.data.tokenizer
    if spec.startswith("bpe:") and spec[4:].isdigit():
        return int(spec[4:])
    from lmtrain import data

    return data.make_tokenizer(cfg.data).vocab_size


@functools.cache
def _counts(model: config_lib.ModelConfig) -> tuple[int, int]:
    from flax import nnx

    from lmtrain import flops, models

    abstract = nnx.eval_shape(lambda: models.build(model, nnx.Rngs(params=0)))
    params = nnx.to_pure_dict(nnx.state(abstract))
    total = flops.count_params(params)
    return total, total - sum(flops.count_params(params[k]) for k in EMBEDDING_KEYS if k in params)


def param_counts(cfg: Config) -> tuple[int, int]:
    """(total, non-embedding) parameters of cfg's model (built abstractly, any family)."""
    cfg = config_lib.with_family_config(cfg)
    return _counts(dataclasses.replace(cfg.model, vocab_size=resolved_vocab(cfg)))


def tokens(cfg: Config) -> int:
    """Training tokens D = steps x batch_size x seq_len."""
    return cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len


def with_tokens(cfg: Config, n_tokens: float, evals: int = 2, checkpoints: int = 4) -> Config:
    """cfg training for about `n_tokens` tokens: steps, warmup and eval/checkpoint cadence.

    The schedule (cosine or wsd) follows train.steps, so each run decays fully over its own
    length, as Chinchilla requires; warmup is capped at a tenth of the run.
    """
    steps = max(1, round(n_tokens / (cfg.train.batch_size * cfg.data.seq_len)))
    return config_lib.override(
        cfg,
        {
            "train.steps": steps,
            "optim.warmup_steps": min(cfg.optim.warmup_steps, max(1, steps // 10)),
            "train.eval_every": -(-steps // evals),
            "train.checkpoint_every": -(-steps // checkpoints),
        },
    )


# ---------------------------------------------------------------------------- grids


def isoflop_grid(
    base: Config, budgets: Sequence[float], sizes: Sequence[dict], seeds=(0,), min_steps: int = 1
) -> list[Config]:
    """For each compute budget C and model size: D = C / (6 N), N non-embedding parameters.

    `sizes` are override dicts ({"model.d_model": 64, "model.n_layers": 2, ...}). Runs that
    would take fewer than `min_steps` steps are left out (logged).
    """
    out = []
    for c in budgets:
        for size in sizes:
            for seed in seeds:
                cfg = config_lib.override(base, {**size, "train.seed": seed})
                n = param_counts(cfg)[1]
                cfg = with_tokens(cfg, c / (6 * n))
                if cfg.train.steps < min_steps:
                    log.info(
                        "isoflop_grid: C=%.3g N=%d needs %d steps; left out", c, n, cfg.train.steps
                    )
                    continue
                out.append(cfg)
    return out


def size_token_grid(
    base: Config, sizes: Sequence[dict], token_counts: Sequence[float], seeds=(0,)
) -> list[Config]:
    """Every model size trained for every token count."""
    return [
        with_tokens(config_lib.override(base, {**size, "train.seed": seed}), d)
        for size in sizes
        for d in token_counts
        for seed in seeds
    ]


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
    are cached in `cache` (default: SWEEP_DIR/throughput.json under `lmtrain sweep`), so the
    plan, and with it the run names, stay the same when the sweep is re-run.
    """
    cfgs = [config_lib.override(base, v) for v in variants]
    if throughputs is None:
        cache = cache or (_CACHE_DIR[-1] / "throughput.json" if _CACHE_DIR else None)
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
    from lmtrain.sweep_runner import child_env, default_devices, read_metrics

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


# ---------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Run:
    """One planned run of a sweep."""

    index: int
    name: str
    cfg: Config
    params: int
    params_nonembed: int

    @property
    def tokens(self) -> int:
        return tokens(self.cfg)

    @property
    def flops(self) -> float:
        """C = 6 N D with N non-embedding parameters."""
        return 6.0 * self.params_nonembed * self.tokens

    @property
    def model_flops(self) -> float:
        """flops_per_token(seq_len) x D: head and sequence mixer included (the MFU count)."""
        model = dataclasses.replace(self.cfg.model, vocab_size=resolved_vocab(self.cfg))
        return model.flops_per_token(self.cfg.data.seq_len) * self.tokens


def si(x: float) -> str:
    """3 significant digits with k/M/G/T: 106k, 1.13M."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def plan(configs: Sequence[Config]) -> list[Run]:
    """Runs with names family-N<non-embedding params>-D<tokens>-s<seed> (+ a hash if needed)."""
    cfgs = [
        config_lib.override(config_lib.with_family_config(c), {"train.progress": False}).validate()
        for c in configs
    ]
    counts = [param_counts(c) for c in cfgs]
    names = [
        f"{c.model.name}-N{si(n)}-D{si(tokens(c))}-s{c.train.seed}"
        for c, (_, n) in zip(cfgs, counts, strict=True)
    ]
    plain = list(names)
    for i, name in enumerate(plain):
        if plain.count(name) > 1:  # same family, N, D and seed: the config's hash tells apart
            digest = json.dumps(config_lib.to_dict(cfgs[i]), sort_keys=True).encode()
            names[i] = f"{name}-{hashlib.sha1(digest).hexdigest()[:6]}"
    if len(set(names)) < len(names):
        raise ConfigError("the sweep lists the same config more than once")
    return [
        Run(i, name, c, total, n)
        for i, (name, c, (total, n)) in enumerate(zip(names, cfgs, counts, strict=True))
    ]


def load_sweep(spec: str, sweep_dir: Path) -> list[Run]:
    """The plan of `path/to/exp.py[:arg]`'s `get_sweep(arg)`."""
    module, arg = config_lib.load_module(spec, "get_sweep")
    path = spec.partition(":")[0]
    _CACHE_DIR.append(Path(sweep_dir))
    try:
        cfgs = module.get_sweep(arg)
    except ConfigError:
        raise
    except ValueError as e:  # e.g. an unknown variant argument
        raise ConfigError(f"{path}:get_sweep({arg!r}): {e}") from None
    finally:
        _CACHE_DIR.pop()
    if not cfgs or not all(isinstance(c, Config) for c in cfgs):
        raise ConfigError(f"{path}:get_sweep({arg!r}) must return a non-empty list of Config")
    return plan(cfgs)


# ---------------------------------------------------------------------------- dry run


STARTUP_S = 10.0  # process start, peak measurement, compilation: measured 7-10 s on 2 cores
ASSUMED_MFU = 0.2  # small models on CPU reached 18-37% of the measured peak (BENCHMARKS.md)


def run_rates(
    runs: Sequence[Run],
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
    import jax

    from lmtrain import flops

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


def dry_run(runs: Sequence[Run], sweep_dir: Path, parallel: int, **rates) -> str:
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


def _done(sweep_dir: Path, run: Run) -> bool:
    return (Path(sweep_dir) / run.name / "result.json").is_file()
