"""Model families, looked up by `model.name`.

Every family module exposes `Config` (a frozen dataclass subclassing
`lmtrain.models.base.ModelConfig`, with `flops_per_token(seq_len)` and `state_floats(seq_len)`,
the floats of decode state per sequence) and `blocks(cfg) -> [BlockSpec]`, its table of
layers. `build` gives that table to the one model shell, `lmtrain.models.decoder.Decoder`
(its docstring lists the model's ways in); every mixer keeps the contract of
`lmtrain.models.mixer`.

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
from lmtrain.models.decoder import Decoder

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
    cfg.validate()
    model = Decoder(cfg, family(cfg.name).blocks(cfg), rngs=rngs)
    if cfg.param_dtype != "float32":  # layers create float32 and cast at use
        dtype = jnp.dtype(cfg.param_dtype)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p: p.astype(dtype), params))
    return model
