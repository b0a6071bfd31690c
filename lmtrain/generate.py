"""Sampling from a trained model with the model's decode cache (the prefix is never re-run)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain.config import ConfigError


def sample_tokens(
    run: Any,
    params: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
) -> list[int]:
    """Token ids continuing `prompt_ids`; stops early at end-of-document."""
    if not prompt_ids:
        raise ConfigError("--prompt must encode to at least one token")
    if temperature < 0:
        raise ConfigError("--temperature must be >= 0 (0 is greedy)")
    graphdef = run.graphdef
    model = nnx.merge(graphdef, params)
    cache = model.init_cache(1, len(prompt_ids) + max_new_tokens)

    @jax.jit
    def step(params, tokens_1xT, cache, key):
        logits_1xTxV, cache = nnx.merge(graphdef, params).decode(tokens_1xT, cache)
        last_1xV = logits_1xTxV[:, -1]
        greedy = jnp.argmax(last_1xV, axis=-1)
        sampled = jax.random.categorical(key, last_1xV / jnp.maximum(temperature, 1e-6), axis=-1)
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32), cache

    key = jax.random.key(seed)
    tokens = jnp.asarray([prompt_ids], jnp.int32)
    out: list[int] = []
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        nxt, cache = step(params, tokens, cache, sub)
        t = int(np.asarray(nxt)[0])
        if t == run.tokenizer.eod_id:
            break
        out.append(t)
        tokens = nxt[:, None]
    return out
