"""Sweep plans: grids of configs, parameter and FLOP counts, run names.

FLOPs convention: C = 6 N D, N = non-embedding parameters (all but the token-embedding table
and the output head), D = training tokens = Config.train_tokens() (steps x tokens per step).
Results also carry `model_flops` = cfg.model.flops_per_token(seq_len) x D, the count MFU uses
(head and attention included). `lmtrain.sweeps.fit` fits laws in C = 6 N D.

An experiment file's `get_sweep(arg) -> list[Config]` builds its runs with the grid helpers
here; `plan` names them family-N<non-embedding params>-D<tokens>-s<seed>; `lmtrain.sweeps.runner`
runs them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from lmtrain import config as config_lib
from lmtrain import data, flops, models
from lmtrain.config import Config, ConfigError

log = logging.getLogger("lmtrain")

EMBEDDING_KEYS = ("token_embed", "head")  # top-level parameter groups that are not in N


# ---------------------------------------------------------------------------- counting


def resolved_vocab(cfg: Config) -> int:
    """model.vocab_size as the run will set it; "bpe:N" counts as N without training it."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    spec = cfg.data.tokenizer
    if not spec and data.prepared_meta(cfg.data.source) is None:
        spec = "bpe:4096"  # what "" means for a corpus that is not prepared
    if spec.startswith("bpe:") and spec[4:].isdigit():
        return int(spec[4:])
    return data.make_tokenizer(cfg.data).vocab_size


@functools.cache
def _counts(model: config_lib.ModelConfig) -> tuple[int, int]:
    abstract = nnx.eval_shape(lambda: models.build(model, nnx.Rngs(params=0)))
    params = nnx.to_pure_dict(nnx.state(abstract))
    total = flops.count_params(params)
    return total, total - sum(flops.count_params(params[k]) for k in EMBEDDING_KEYS if k in params)


def param_counts(cfg: Config) -> tuple[int, int]:
    """(total, non-embedding) parameters of cfg's model (built abstractly, any family)."""
    cfg = config_lib.with_family_config(cfg)
    return _counts(dataclasses.replace(cfg.model, vocab_size=resolved_vocab(cfg)))


def tokens(cfg: Config) -> int:
    """Training tokens D of the run: `Config.train_tokens()`, the one definition."""
    return cfg.train_tokens()


def with_tokens(cfg: Config, n_tokens: float, evals: int = 2, checkpoints: int = 4) -> Config:
    """cfg training for about `n_tokens` tokens: steps, warmup and eval/checkpoint cadence.

    The schedule (cosine or wsd) follows train.steps, so each run decays fully over its own
    length, as Chinchilla requires; warmup is capped at a tenth of the run.
    """
    steps = max(1, round(n_tokens / cfg.tokens_per_step()))
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


# ---------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class PlannedRun:
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


def _unique(cfg: Config) -> str:
    """-U<tokens>: the unique-token budget of a mixture that sets one (repetition sweeps)."""
    budgets = [c.unique_tokens for _, c in cfg.data.mixture]
    return f"-U{si(sum(budgets))}" if any(budgets) else ""


def plan(configs: Sequence[Config]) -> list[PlannedRun]:
    """Runs named family-N<non-embedding params>-D<tokens>[-U<unique tokens>]-s<seed>, then
    -<optimizer>-lr<lr> where that is not unique, then a hash of the config where even that
    is not."""
    cfgs = [
        config_lib.override(config_lib.with_family_config(c), {"train.progress": False}).validate()
        for c in configs
    ]
    counts = [param_counts(c) for c in cfgs]
    names = [
        f"{c.model.name}-N{si(n)}-D{si(tokens(c))}{_unique(c)}-s{c.train.seed}"
        for c, (_, n) in zip(cfgs, counts, strict=True)
    ]
    first = list(names)
    for i, name in enumerate(first):
        if first.count(name) > 1:  # an optimizer or lr sweep: say which
            names[i] = f"{name}-{cfgs[i].optim.name}-lr{cfgs[i].optim.lr:g}"
    plain = list(names)
    for i, name in enumerate(plain):
        if plain.count(name) > 1:  # same family, N, D, seed, optimizer, lr: the config's hash
            digest = json.dumps(config_lib.to_dict(cfgs[i]), sort_keys=True).encode()
            names[i] = f"{name}-{hashlib.sha1(digest).hexdigest()[:6]}"
    if len(set(names)) < len(names):
        raise ConfigError("the sweep lists the same config more than once")
    return [
        PlannedRun(i, name, c, total, n)
        for i, (name, c, (total, n)) in enumerate(zip(names, cfgs, counts, strict=True))
    ]


def load_sweep(spec: str, sweep_dir: Path) -> list[PlannedRun]:
    """The plan of `path/to/exp.py[:arg]`'s `get_sweep(arg)`.

    A `get_sweep(arg, sweep_dir)` (a second parameter named `sweep_dir`) is given the sweep
    directory, e.g. to keep `equal_time_grid`'s throughput measurements there so the plan stays
    the same when the sweep is run again.
    """
    module, arg = config_lib.load_module(spec, "get_sweep")
    path = spec.partition(":")[0]
    wants_dir = "sweep_dir" in inspect.signature(module.get_sweep).parameters
    try:
        cfgs = (
            module.get_sweep(arg, sweep_dir=Path(sweep_dir)) if wants_dir else module.get_sweep(arg)
        )
    except ConfigError:
        raise
    except ValueError as e:  # e.g. an unknown variant argument
        raise ConfigError(f"{path}:get_sweep({arg!r}): {e}") from None
    if not cfgs or not all(isinstance(c, Config) for c in cfgs):
        raise ConfigError(f"{path}:get_sweep({arg!r}) must return a non-empty list of Config")
    return plan(cfgs)
