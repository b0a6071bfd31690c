"""Model families, looked up by `model.name`.

Every family module exposes `Config` (a frozen dataclass subclassing
`lmtrain.config.ModelConfig`, with `flops_per_token(seq_len)`) and `Model` (an `nnx.Module`):

    model(tokens_BxL, segment_ids_BxL=None, positions_BxL=None) -> logits_BxLxV (float32)
    model.init_cache(batch_size, max_len) -> cache (a pytree of arrays)
    model.decode(tokens_BxT, cache) -> (logits_BxTxV, cache)
    model.hidden(tokens_BxL, segment_ids_BxL, positions_BxL) -> x_BxLxD  (before norm and head)
    model.head_logits(x_BxTxD) -> logits_BxTxV (float32)

and its Config has `state_floats(seq_len)`, the floats of decode state per sequence.

Adding a family means adding a file and one line to `FAMILIES`.
"""

from __future__ import annotations

import dataclasses
import importlib
from types import ModuleType

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.errors import ConfigError
from lmtrain.models.base import ModelConfig

# model.name -> module in lmtrain.models
FAMILIES = {
    "transformer": "transformer",
    "based": "linear_attention",
    "retnet": "linear_attention",
    "lightning": "linear_attention",
    "gla": "linear_attention",
    "s4d": "ssm",
    "h3": "ssm",
    "mamba2": "ssm",
    "hybrid": "hybrid",
}


def family(name: str) -> ModuleType:
    """The module implementing model family `name` (ConfigError if there is none)."""
    if name not in FAMILIES:
        raise ConfigError(f"unknown model.name {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return importlib.import_module(f"lmtrain.models.{FAMILIES[name]}")


def families_with_field(field: str) -> list[str]:
    """The model.name values whose Config has `field` (for "set model.name first" errors)."""
    return [
        name
        for name in FAMILIES
        if field in {f.name for f in dataclasses.fields(family(name).Config)}
    ]


def build(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the model that `cfg` describes."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size must be set (the run sets it from the tokenizer)")
    model = family(cfg.name).Model(cfg, rngs=rngs)
    if cfg.param_dtype != "float32":  # layers create float32 and cast at use
        dtype = jnp.dtype(cfg.param_dtype)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p: p.astype(dtype), params))
    return model
