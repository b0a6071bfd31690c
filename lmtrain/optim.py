"""Optimizers and learning-rate schedules, chosen by name from lookup tables.

Everything here is pure optax (no host-side state), so the transformations run inside a jitted,
sharded train step. The optimizer state has the same structure whether or not clipping is on,
so a checkpoint restores across a change of `optim.clip_norm`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmtrain.config import OPTIMIZER_NAMES, SCHEDULE_NAMES, ConfigError, OptimConfig
from lmtrain.muon import NS_STEPS

# ---------------------------------------------------------------------------- schedules


def _warmup(cfg: OptimConfig, step: jax.Array) -> jax.Array:
    """Warmup multiplier; (step + 1) / warmup so the first update already moves the params."""
    if cfg.warmup_steps <= 0:
        return jnp.ones_like(step)
    return jnp.minimum((step + 1.0) / cfg.warmup_steps, 1.0)


def _progress(step: jax.Array, start: int, end: int) -> jax.Array:
    """Fraction of the way from `start` to `end`, clipped to [0, 1] (holds past `end`)."""
    return jnp.clip((step - start) / max(end - start, 1), 0.0, 1.0)


def _cosine(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        t = _progress(step, cfg.warmup_steps, total_steps)
        frac = cfg.final_lr_frac + (1.0 - cfg.final_lr_frac) * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
        return cfg.lr * jnp.where(step < cfg.warmup_steps, _warmup(cfg, step), frac)

    return schedule


def _wsd(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    decay_steps = round(cfg.decay_frac * total_steps)
    # A decay longer than the post-warmup phase starts right after warmup rather than overlap it.
    decay_start = max(total_steps - decay_steps, cfg.warmup_steps)

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        t = _progress(step, decay_start, total_steps)
        frac = 1.0 - (1.0 - cfg.final_lr_frac) * t
        return cfg.lr * jnp.where(step < cfg.warmup_steps, _warmup(cfg, step), frac)

    return schedule


def _constant(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    del total_steps

    def schedule(step: jax.Array) -> jax.Array:
        return cfg.lr * _warmup(cfg, jnp.asarray(step, jnp.float32))

    return schedule


# optim.schedule -> builder(cfg, total_steps); every schedule has the same linear warmup
SCHEDULES: dict[str, Callable[[OptimConfig, int], optax.Schedule]] = {
    "cosine": _cosine,
    "wsd": _wsd,
    "constant": _constant,
}


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Learning rate as a function of the (0-based) optimizer step."""
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(
            f"optim.schedule {cfg.schedule!r} is unknown; valid: {', '.join(SCHEDULES)}"
        )
    return SCHEDULES[cfg.schedule](cfg, total_steps)


# ---------------------------------------------------------------------------- optimizers


def decay_mask(params: Any) -> Any:
    """True for leaves that get weight decay: matrices and up, not norm scales or biases.

    A tree of `nnx.Variable`s (from `nnx.split`) uses each Param's `weight_decay` metadata
    (set by `lmtrain.models.layers.param`, so a model can exempt non-weight matrices such as
    SSM decay rates) and returns a pure dict like `nnx.to_pure_dict`; a tree of arrays uses
    ndim >= 2.
    """
    is_var = lambda x: isinstance(x, nnx.Variable)
    if any(is_var(x) for x in jax.tree.leaves(params, is_leaf=is_var)):

        def wd(v: nnx.Variable) -> bool:
            return bool(v.get_metadata().get("weight_decay", v.get_value().ndim >= 2))

        return nnx.to_pure_dict(jax.tree.map(wd, params, is_leaf=is_var))
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def muon_mask(params: Any) -> Any:
    """True for the parameters optim.name="muon" orthogonalises: the hidden weight matrices.

    A tree of `nnx.Variable`s uses each Param's `muon` metadata (`lmtrain.models.layers.param`:
    2-D decayed weights that are not embeddings, output heads or convolution taps); a tree of
    arrays uses ndim == 2, optax's own default.
    """
    is_var = lambda x: isinstance(x, nnx.Variable)
    if any(is_var(x) for x in jax.tree.leaves(params, is_leaf=is_var)):

        def hidden(v: nnx.Variable) -> bool:
            return bool(v.get_metadata().get("muon", False))

        return nnx.to_pure_dict(jax.tree.map(hidden, params, is_leaf=is_var))
    return jax.tree.map(lambda p: p.ndim == 2, params)


Mask = Any  # a pytree of bools matching the params, or a function params -> such a tree


def _resolve(mask: Mask, params: Any) -> Any:
    return mask(params) if callable(mask) else mask


def _adamw(
    cfg: OptimConfig, lr: optax.Schedule, mask: Mask, hidden: Mask
) -> optax.GradientTransformation:
    return optax.adamw(
        lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
    )


def _lion(
    cfg: OptimConfig, lr: optax.Schedule, mask: Mask, hidden: Mask
) -> optax.GradientTransformation:
    # optax.lion defaults to weight_decay=1e-3, so ours is always passed; Lion has no eps.
    return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)


def _muon(
    cfg: OptimConfig, lr: optax.Schedule, mask: Mask, hidden: Mask
) -> optax.GradientTransformation:
    """Muon (lmtrain.muon: optax.contrib.muon's arithmetic and state, its Newton-Schulz work
    spread over the mesh) on the hidden weight matrices: momentum, orthogonalisation, width
    scaling or consistent RMS, decoupled weight decay; AdamW at adam_lr_ratio x the learning
    rate, with lmtrain's decay mask, on everything else."""
    from lmtrain import muon as muon_lib

    def adam_lr(step: jax.Array) -> jax.Array:
        return cfg.adam_lr_ratio * lr(step)

    muon = muon_lib.muon(
        lr,
        beta=cfg.muon_beta,
        nesterov=cfg.muon_nesterov,
        weight_decay=cfg.weight_decay,
        consistent_rms=cfg.muon_consistent_rms or None,
    )
    adam = optax.adamw(
        adam_lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
    )

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda h: "muon" if h else "adam", _resolve(hidden, params))

    return optax.partition({"muon": muon, "adam": adam}, labels)


# optim.name -> builder(cfg, schedule, weight-decay mask, Muon mask)
OPTIMIZERS: dict[
    str, Callable[[OptimConfig, optax.Schedule, Mask, Mask], optax.GradientTransformation]
] = {
    "adamw": _adamw,
    "lion": _lion,
    "muon": _muon,
}


def make_optimizer(
    cfg: OptimConfig, total_steps: int, mask: Mask = decay_mask, hidden: Mask = muon_mask
) -> optax.GradientTransformation:
    """Global-norm clipping (if clip_norm > 0), then the named optimizer on `make_schedule`.

    `mask` says which parameters get weight decay: the run passes `decay_mask(abstract
    variables)` so Param metadata decides; the default applies ndim >= 2 to the arrays.
    `hidden` says which parameters Muon orthogonalises (`muon_mask`, likewise).
    """
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name {cfg.name!r} is unknown; valid: {', '.join(OPTIMIZERS)}")
    tx = OPTIMIZERS[cfg.name](cfg, make_schedule(cfg, total_steps), mask, hidden)
    # identity() keeps the state tree identical to clip_by_global_norm's (both EmptyState).
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, tx)


def step_flops(cfg: OptimConfig, params: Any, hidden: Mask = muon_mask) -> float:
    """FLOPs of one optimizer step beyond the elementwise updates, counted once per step (the
    model-FLOPs convention: work a replica repeats is not counted again): Muon's Newton-Schulz
    iterations, NS_STEPS x (4 m^2 n + 2 m^3) for each hidden m x n matrix (m <= n: X X^T,
    then A A, then B X), and 0 for AdamW and Lion."""
    if cfg.name != "muon":
        return 0.0
    total, masks = 0.0, jax.tree.leaves(_resolve(hidden, params))
    for p, h in zip(jax.tree.leaves(params), masks, strict=True):
        if h:
            m, n = sorted(p.shape)
            total += NS_STEPS * (4 * m * m * n + 2 * m**3)
    return float(total)


assert tuple(OPTIMIZERS) == OPTIMIZER_NAMES and tuple(SCHEDULES) == SCHEDULE_NAMES
