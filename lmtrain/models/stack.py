"""How a model runs its blocks: rematerialisation policies and scan over layers.

`run_blocks` is the one loop every family's forward pass goes through (transformer.Model):

- `remat` (model.remat) wraps each block in jax.checkpoint with a named policy, so the
  backward pass keeps only what the policy saves and recomputes the rest.
- `scan` (model.scan_layers) runs each run of consecutive blocks with the same structure as
  one jax.lax.scan over their parameters stacked on a leading axis: XLA compiles the block once,
  so compile time stays flat in depth. Parameters keep their per-layer layout (checkpoints,
  exports and the sharding rules do not change); the stacking happens inside the step and costs
  one copy of the scanned blocks' parameters, sharded like them.

Blocks are called as pure functions of their state (nnx.split / nnx.merge), which works
whether the caller closed over the model or split and merged it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.sharding import constrain

POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots": jax.checkpoint_policies.dots_saveable,
}


def _pure(graphdef: nnx.GraphDef, remat: str, scanned: bool) -> Callable:
    """block(state, x, segment_ids, positions) -> x as a pure function, under remat."""

    def call(state, x_BxLxD, segment_ids_BxL, positions_BxL):
        x_BxLxD = nnx.merge(graphdef, state)(x_BxLxD, segment_ids_BxL, positions_BxL)
        return constrain(x_BxLxD, "batch", "length", "embed")

    if remat == "none":
        return call
    # Inside a scan, CSE cannot merge the recomputation into the forward pass anyway, and
    # prevent_cse's barriers only slow the loop (jax.checkpoint's documentation).
    return jax.checkpoint(call, policy=POLICIES[remat], prevent_cse=not scanned)


def _signature(block: nnx.Module) -> tuple:
    """Blocks with equal signatures can share one scanned body."""
    graphdef, state = nnx.split(block)
    shapes = jax.tree.map(lambda v: (v.shape, v.dtype), state)
    return graphdef, jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes))


def groups(blocks: Sequence[nnx.Module], scan: bool) -> list[list[nnx.Module]]:
    """Consecutive runs of structurally identical blocks (all singletons without `scan`)."""
    if not scan:
        return [[b] for b in blocks]
    out: list[list[nnx.Module]] = []
    last = None
    for block in blocks:
        sig = _signature(block)
        if out and sig == last:
            out[-1].append(block)
        else:
            out.append([block])
        last = sig
    return out


def run_blocks(
    blocks: Sequence[nnx.Module],
    x_BxLxD: jax.Array,
    segment_ids_BxL: jax.Array | None,
    positions_BxL: jax.Array,
    *,
    remat: str = "none",
    scan: bool = False,
) -> jax.Array:
    """Applies `blocks` in order to the residual stream x_BxLxD."""
    for group in groups(blocks, scan):
        graphdef, state = nnx.split(group[0])
        if len(group) == 1:
            x_BxLxD = _pure(graphdef, remat, False)(state, x_BxLxD, segment_ids_BxL, positions_BxL)
            continue
        fn = _pure(graphdef, remat, True)
        states = [nnx.split(b)[1] for b in group]
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

        def body(x, layer_state, fn=fn):
            return fn(layer_state, x, segment_ids_BxL, positions_BxL), None

        x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, stacked)
    return x_BxLxD
