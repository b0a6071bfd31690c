"""Pure functions: loss, train step, eval step. No I/O; `compile_*` adds shardings and donation."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lmtrain import sharding
from lmtrain.models import sequence

Batch = dict[str, jax.Array]
TRAIN_KEYS = ("inputs", "targets", "segment_ids", "positions", "weights")
EVAL_KEYS = (*TRAIN_KEYS, "target_bytes")


def _score_positions(model, x_BxTxD: jax.Array, targets_BxT: jax.Array) -> tuple:
    """(nll, log Z, correct) float32 [B, T] of the head on hidden states x_BxTxD."""
    logits_BxTxV = model.logits(x_BxTxD)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], -1)[..., 0]
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    # Correct = the target's logit is the largest (a tie counts as correct).
    correct_BxT = (target_logit_BxT >= logits_BxTxV.max(axis=-1)).astype(jnp.float32)
    return logz_BxT - target_logit_BxT, logz_BxT, correct_BxT


def score(graphdef: nnx.GraphDef, params: Any, batch: Batch, chunk: int = 0) -> tuple:
    """Per-position (nll, log Z, correct), float32 [B, T], at the T scored positions.

    Dense batches score every position (T = L). A batch with `target_index` (int32 [B, Q])
    scores only those positions (T = Q; its targets and weights are [B, Q]): the output head,
    often most of a small model's FLOPs, then runs on Q positions instead of L (MQAR scores P
    queries out of L tokens).

    `chunk` > 0 (train.loss_chunk) runs the head over chunks of that many positions in a scan,
    each chunk under jax.checkpoint: only one chunk's [B, chunk, V] logits exist at a time, in
    the forward and the backward pass ("Cut Your Losses" in spirit; same values up to the
    order of float32 sums).
    """
    model = nnx.merge(graphdef, params)
    x_BxLxD, _ = model.hidden(batch["inputs"], batch["segment_ids"], batch["positions"])
    if "target_index" in batch:
        x_BxLxD = jnp.take_along_axis(x_BxLxD, batch["target_index"][..., None], axis=1)
    targets_BxT = batch["targets"]
    B, T, D = x_BxLxD.shape
    if not chunk or T <= chunk or T % chunk:
        return _score_positions(model, x_BxLxD, targets_BxT)
    # Rows split over s sequence devices: step j takes the j-th chunk of every device's piece
    # (s chunks side by side), so no position leaves its device.
    s = sequence.size() if "target_index" not in batch else 1
    s = s if (T // chunk) % s == 0 else 1
    m = T // chunk // s

    def chunks(a_BxT):  # [B, T, ...] -> [m, B, s * chunk, ...]
        a = a_BxT.reshape(B, s, m, chunk, *a_BxT.shape[2:]).swapaxes(1, 2).swapaxes(0, 1)
        return a.reshape(m, B, s * chunk, *a_BxT.shape[2:])

    x_MxBxCxD = sharding.constrain(chunks(x_BxLxD), None, "batch", "length", "embed")
    # The head's weight gathered over fsdp once for all chunks: left inside the loop it was
    # gathered on every trip (1 GiB a trip for Llama-3's bf16 head) and its gradient
    # all-reduced on every trip; now the gradient sums locally and is reduced once.
    tied = model.head is None
    weight = model.token_embed.table if tied else model.head.kernel
    weight.value = sharding.constrain(
        weight[...], *(("vocab", "embed") if tied else ("embed", "vocab"))
    )
    scored = jax.checkpoint(lambda xt: _score_positions(model, *xt))
    outs = jax.lax.map(scored, (x_MxBxCxD, chunks(targets_BxT)))
    return tuple(o.reshape(m, B, s, chunk).transpose(1, 2, 0, 3).reshape(B, T) for o in outs)


def token_nll(graphdef: nnx.GraphDef, params: Any, batch: Batch, chunk: int = 0) -> tuple:
    """Per-token negative log-likelihood and log-normaliser (log Z), both float32 [B, L]."""
    nll, logz, _ = score(graphdef, params, batch, chunk)
    return nll, logz


def _grads(graphdef, params, batch: Batch, z_loss: float, grad_accum: int, chunk: int = 0):
    """Gradient of the token-weighted mean loss over the batch, over `grad_accum` micro-batches.

    Each micro-batch contributes sum(nll * w) / W_total, so the accumulated gradient is
    exactly the full-batch gradient however the weights fall across micro-batches.
    """
    w_total = jnp.maximum(batch["weights"].sum(), 1.0)

    def objective(p, mb):
        nll, logz = token_nll(graphdef, p, mb, chunk)
        w = mb["weights"]
        nll_sum = (nll * w).sum()
        z_sum = (jnp.square(logz) * w).sum()
        return (nll_sum + z_loss * z_sum) / w_total, nll_sum

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum == 1:
        (_, nll_sum), grads = grad_fn(params, batch)
        return grads, nll_sum / w_total, w_total

    def split(x):  # [B, ...] -> [A, B/A, ...] keeping each device's rows on that device
        b = x.shape[0] // grad_accum
        x = x.reshape(b, grad_accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, P(None, sharding.BATCH))

    micro = jax.tree.map(split, batch)

    def body(carry, mb):
        g_acc, nll_acc = carry
        (_, nll_sum), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll_sum), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, nll_sum), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)), micro)
    return grads, nll_sum / w_total, w_total


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    z_loss: float = 0.0,
    grad_accum: int = 1,
    loss_chunk: int = 0,
) -> Callable[[dict, Batch], tuple[dict, dict]]:
    """train_step(state, batch) -> (state, metrics); a non-finite step keeps the old state."""

    def train_step(state: dict, batch: Batch) -> tuple[dict, dict]:
        params = state["params"]
        grads, loss, tokens = _grads(graphdef, params, batch, z_loss, grad_accum, loss_chunk)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # Keep the last good state on NaN/Inf so no checkpoint can ever hold a broken model;
        # the host sees `finite == 0` and stops the run.
        keep = lambda new, old: jnp.where(ok, new, old)
        new_state = {
            "step": state["step"] + ok.astype(state["step"].dtype),
            "params": jax.tree.map(keep, new_params, params),
            "opt_state": jax.tree.map(keep, opt_state, state["opt_state"]),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": jnp.asarray(schedule(state["step"]), jnp.float32),
            "tokens": tokens,
            "finite": ok.astype(jnp.float32),
        }
        if "stop" in batch:
            # Each process marks its rows when it was asked to stop; the max over the global
            # batch is the same on every host, so all hosts stop (and save) at the same step.
            metrics["stop"] = batch["stop"].max()
        return new_state, metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_chunk: int = 0) -> Callable[[Any, Batch], dict]:
    """eval_step(params, batch) -> sums of weighted NLL, argmax hits, weights, target bytes."""

    def eval_step(params: Any, batch: Batch) -> dict:
        nll, _, correct = score(graphdef, params, batch, loss_chunk)
        w = batch["weights"]
        return {
            "nll_sum": (nll * w).sum(),
            "correct": (correct * w).sum(),
            "tokens": w.sum(),
            "bytes": batch["target_bytes"].sum(),
        }

    return eval_step


def batch_spec(
    global_batch: int, seq_len: int, keys: tuple[str, ...], targets_per_row: int = 0
) -> dict:
    """Abstract shapes of one global batch; `targets_per_row` Q > 0 adds `target_index` and
    makes targets, weights and target_bytes [B, Q] (see score)."""
    dtypes = {"weights": jnp.float32, "target_bytes": jnp.float32, "stop": jnp.float32}
    shapes = {"stop": (global_batch,)}  # one flag per row (see make_train_step)
    if targets_per_row:
        keys = (*keys, "target_index")
        for k in ("targets", "weights", "target_bytes", "target_index"):
            shapes[k] = (global_batch, targets_per_row)
    return {
        k: jax.ShapeDtypeStruct(shapes.get(k, (global_batch, seq_len)), dtypes.get(k, jnp.int32))
        for k in keys
    }


# XLA debug options for every step compiled (lmtrain.compile sets a dump directory here to
# read the optimised HLO, which libtpu cannot always hand back through compiled.as_text()).
COMPILER_OPTIONS: dict = {}


def compile_train_step(
    fn: Callable, state_shardings: Any, mesh: Mesh, abstract_state: Any, batch_shape: dict
) -> Any:
    """Ahead-of-time compiled train step: sharded state in and out, state buffers donated."""
    bs = {k: sharding.batch_sharding(mesh, v.shape) for k, v in batch_shape.items()}
    replicated = NamedSharding(mesh, P())
    jitted = jax.jit(
        fn,
        in_shardings=(state_shardings, bs),
        out_shardings=(state_shardings, replicated),
        donate_argnums=(0,),  # the old state is dead after the step; reuse its memory
    )
    with jax.set_mesh(mesh):  # lets the step name mesh axes in sharding constraints
        return jitted.lower(abstract_state, batch_shape).compile(COMPILER_OPTIONS or None)


def compile_eval_step(fn: Callable, param_shardings: Any, mesh: Mesh, abstract_params, batch_shape):
    """Ahead-of-time compiled eval step (no donation: params live on)."""
    bs = {k: sharding.batch_sharding(mesh, v.shape) for k, v in batch_shape.items()}
    jitted = jax.jit(
        fn,
        in_shardings=(param_shardings, bs),
        out_shardings=NamedSharding(mesh, P()),
    )
    with jax.set_mesh(mesh):
        return jitted.lower(abstract_params, batch_shape).compile(COMPILER_OPTIONS or None)


def bits_per_byte(nll_sum: float, n_bytes: float) -> float:
    """Tokenizer-independent loss: nats summed over tokens / (ln 2 * UTF-8 bytes)."""
    return nll_sum / (math.log(2) * max(n_bytes, 1.0))
