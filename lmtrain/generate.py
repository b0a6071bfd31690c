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
    top_k: int = 0,
    top_p: float = 1.0,
) -> list[int]:
    """Token ids continuing `prompt_ids`; stops early at end-of-document. Sampling divides the
    logits by `temperature`, then keeps the `top_k` likeliest tokens and of those the smallest
    set holding probability `top_p` (`filter_logits`); temperature 0 is greedy."""
    if not prompt_ids:
        raise ConfigError("--prompt must encode to at least one token")
    if temperature < 0:
        raise ConfigError("--temperature must be >= 0 (0 is greedy)")
    if top_k < 0:
        raise ConfigError("--top-k must be >= 0 (0: no limit)")
    if not 0 < top_p <= 1:
        raise ConfigError("--top-p must be in (0, 1] (1: no limit)")
    graphdef = run.graphdef
    model = nnx.merge(graphdef, params)
    cache = model.init_state(1, len(prompt_ids) + max_new_tokens)

    @jax.jit
    def step(params, tokens_1xT, cache, key):
        logits_1xTxV, cache = nnx.merge(graphdef, params).decode(tokens_1xT, cache)
        last_1xV = logits_1xTxV[:, -1]
        greedy = jnp.argmax(last_1xV, axis=-1)
        scaled = filter_logits(last_1xV / jnp.maximum(temperature, 1e-6), top_k, top_p)
        sampled = jax.random.categorical(key, scaled, axis=-1)
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


def filter_logits(logits_BxV: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Logits with every token outside the top-k, then outside the top-p nucleus, set to -inf.

    The nucleus is the smallest set of the likeliest tokens whose probability reaches `top_p`
    (the likeliest token always stays); ties at the boundary stay in.
    """
    if top_k and top_k < logits_BxV.shape[-1]:
        kth_Bx1 = jnp.sort(logits_BxV, axis=-1)[:, -top_k][:, None]
        logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
    if top_p < 1.0:
        desc_BxV = -jnp.sort(-logits_BxV, axis=-1)
        probs_BxV = jax.nn.softmax(desc_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the likelier ones
        kept_BxV = jnp.where(before_BxV < top_p, desc_BxV, jnp.inf)
        floor_Bx1 = jnp.min(kept_BxV, axis=-1, keepdims=True)
        logits_BxV = jnp.where(logits_BxV < floor_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV
