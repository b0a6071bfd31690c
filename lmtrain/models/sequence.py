"""Rows split along their length over the mesh's `sequence` axis (long context across chips).

Under a mesh whose `sequence` axis has n > 1 devices, a training call of a mixer (no state)
runs in a shard_map that is manual over that axis and the batch axes: device i of the axis
holds positions [i L/n, (i+1) L/n) of its rows (the tensor axis stays with the automatic
partitioner), and

- attention (`Attention.split_parallel`) all-gathers K/V with their segment ids and attends
  its own queries to them under the causal and document mask by global position (dense for
  rows up to DENSE_MAX tokens, else in blocks with an online softmax, `blocked_attention`);
- every other mixer keeps the mixer contract's promise that a long sequence is a chain of
  calls, each continuing the state of the one before (`chained` below):
  1. halo: the last `halo` inputs of device i-1 (the widest short-conv or sliding window the
     mixer keeps) arrive by one ppermute; a call on them gives the windows device i starts
     from, cut at a document start as every call's windows are;
  2. each device runs its piece from an empty carried state (S, h) and, by a forward-mode
     derivative of the final state in the carried state's direction, gets the affine map
     s -> A * s + b that its piece applies to an incoming state (A elementwise: every
     recurrence here is diagonal; a document start inside the piece makes A zero);
  3. the small (A, b) are all-gathered (LASP-2's choice over a ppermute chain: one collective
     of n small states instead of n sequential hops) and an exclusive scan gives each device
     the state that reaches it;
  4. the device replays its piece from that state (and the halo's windows): its outputs and
     final state are then exactly the unsplit model's, up to float roundoff.
  The replay costs a second forward of the mixer; the derivative pass only touches the
  carried state's path.
Decode and generation run unsplit (they pass a state, which takes the ordinary path).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmtrain.errors import ConfigError
from lmtrain.sharding import BATCH, SEQUENCE

NO_SEGMENT = jnp.iinfo(jnp.int32).min  # the "previous token" of device 0: no document continues


def size() -> int:
    """Devices on the traced mesh's sequence axis (1 without a mesh or outside a jit)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or SEQUENCE not in mesh.axis_names or SEQUENCE in mesh.manual_axes:
        return 1
    return mesh.shape[SEQUENCE]


def split_call(mixer: nnx.Module, x_BxLxD, segment_ids_BxL, positions_BxL) -> jax.Array:
    """The mixer's training output y_BxLxD with each row split over the sequence axis."""
    n = size()
    B, L, _ = x_BxLxD.shape
    if L % n:
        raise ConfigError(f"a row of {L} tokens does not split over {n} sequence devices")
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.zeros((B, L), jnp.int32)
    graphdef, params = nnx.split(mixer)

    def local(params, x, seg, pos):
        return nnx.merge(graphdef, params).split_parallel(x, seg, pos)

    # The batch axes are manual too: left to the automatic partitioner inside a shard_map
    # manual over `sequence` alone, every row was gathered onto every chip (8x the K/V
    # all-gathered on an fsdp 8 mesh, and the attention of every row computed on each chip).
    # The mixer's weights enter whole (gathered over fsdp, as ZeRO-3 gathers them per layer).
    mesh = jax.sharding.get_abstract_mesh()
    batch_axes = tuple(a for a in BATCH if a not in mesh.manual_axes)
    if B % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()  # a batch the data axes do not divide: rows whole on every chip
    rows = P(batch_axes or None, SEQUENCE)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), rows, rows, rows),
        out_specs=rows,
        axis_names={SEQUENCE, *batch_axes},
        check_vma=False,
    )
    return fn(params, x_BxLxD, segment_ids_BxL.astype(jnp.int32), positions_BxL)


def _from_previous(a_BxT: jax.Array, fill) -> jax.Array:
    """Device i receives device i-1's `a`; device 0 receives `fill`."""
    n = jax.lax.axis_size(SEQUENCE)
    got = jax.lax.ppermute(a_BxT, SEQUENCE, [(j, j + 1) for j in range(n - 1)])
    return jnp.where(jax.lax.axis_index(SEQUENCE) == 0, jnp.full_like(a_BxT, fill), got)


def halo_of(state: dict, carried: tuple[str, ...]) -> int:
    """Tokens of earlier context a state's windows hold (axis 1 of its window leaves)."""
    widths = [v.shape[1] for k, v in state.items() if k not in (*carried, "seg") and v.ndim >= 2]
    return max(widths, default=0)


def entry_state(mixer, x_BxLxD, segment_ids_BxL, positions_BxL, carried=()) -> dict:
    """The state device i starts from, except the carried leaves (left empty): the previous
    device's last segment id and the windows of its last `halo` inputs."""
    B, L, _ = x_BxLxD.shape
    state = mixer.init_state(B, 0)
    state["seg"] = _from_previous(segment_ids_BxL[:, -1], NO_SEGMENT)
    halo = halo_of(state, carried)
    if halo:
        if L < halo:
            raise ConfigError(
                f"each sequence device holds {L} tokens of a row, fewer than the {halo} of "
                "earlier context a mixer window needs: use fewer sequence devices"
            )
        tail = [_from_previous(a[:, L - halo :], 0) for a in (x_BxLxD, positions_BxL)]
        tail_seg = _from_previous(segment_ids_BxL[:, L - halo :], NO_SEGMENT)
        _, tail_state = mixer.parallel(tail[0], tail_seg, tail[1], None)
        state.update({k: v for k, v in tail_state.items() if k not in (*carried, "seg")})
    return state


def chained(mixer, x_BxLxD, segment_ids_BxL, positions_BxL) -> jax.Array:
    """A mixer with carried state (see the module docstring), inside the shard_map."""
    carried = tuple(mixer.CARRIED)
    state = entry_state(mixer, x_BxLxD, segment_ids_BxL, positions_BxL, carried)
    if not carried:  # a short convolution or a sliding window: the halo is all it needs
        return mixer.parallel(x_BxLxD, segment_ids_BxL, positions_BxL, state)[0]
    empty = {k: state[k] for k in carried}

    def final(carry):
        _, out = mixer.parallel(x_BxLxD, segment_ids_BxL, positions_BxL, {**state, **carry})
        return {k: out[k] for k in carried}

    ones = jax.tree.map(jnp.ones_like, empty)
    b, a = jax.jvp(final, (empty,), (ones,))  # final(s) = a * s + b
    a_all, b_all = jax.lax.all_gather((a, b), SEQUENCE)  # leading axis: the device

    mine = _exclusive_scan(a_all, b_all, empty)
    y, _ = mixer.parallel(x_BxLxD, segment_ids_BxL, positions_BxL, {**state, **mine})
    return y


# Gathered rows longer than this attend block by block (_blocked_attention); shorter ones
# build the [L/n, L] scores at once.
DENSE_MAX = 8192
Q_BLOCK, KV_BLOCK = 2048, 4096


def gathered_attention(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, impl: str):
    """Causal attention of this device's queries (positions i L .. (i+1) L - 1 of the row) to
    the keys and values of every device, gathered, under the document mask."""
    L = q_BxLxHxK.shape[1]
    k_all, v_all, seg_all = (
        jax.lax.all_gather(a, SEQUENCE, axis=1, tiled=True)
        for a in (k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    )
    q_start = jax.lax.axis_index(SEQUENCE) * L
    S = k_all.shape[1]
    if S > DENSE_MAX and L % min(Q_BLOCK, L) == 0 and S % KV_BLOCK == 0:
        return blocked_attention(
            q_BxLxHxK, k_all, v_all, segment_ids_BxL, seg_all, q_start, Q_BLOCK, KV_BLOCK
        )
    q_L = q_start + jnp.arange(L)
    causal_LxS = jnp.arange(S)[None, :] <= q_L[:, None]
    same_BxLxS = segment_ids_BxL[:, :, None] == seg_all[:, None, :]
    mask_Bx1xLxS = (causal_LxS[None] & same_BxLxS)[:, None]
    impl = "cudnn" if impl == "cudnn" else "xla"
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_all, v_all, mask=mask_Bx1xLxS, implementation=impl
    )


def blocked_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, seg_BxL, seg_BxS, q_start, bq, bk):
    """Causal, document-masked attention of queries at positions q_start .. q_start + L - 1 to
    keys 0 .. S - 1, in float32 with an online softmax (flash attention's recurrence) over
    key blocks of `bk`, for query blocks of `bq` one at a time: the scores held at once are
    [B, bq, H, bk], never [B, L, H, S]. Query blocks and key steps are rematerialised in the
    backward pass: what it keeps is one query block's running outputs per key block. Every
    key block is visited (masked, not skipped): the work is the same on every device."""
    B, L, H, K = q_BxLxHxK.shape
    S, G = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    bq = min(bq, L)
    R = H // G
    kv = (
        k_BxSxGxK.reshape(B, S // bk, bk, G, K).swapaxes(0, 1),
        v_BxSxGxK.reshape(B, S // bk, bk, G, K).swapaxes(0, 1),
        seg_BxS.reshape(B, S // bk, bk).swapaxes(0, 1),
        jnp.arange(S).reshape(S // bk, bk),
    )

    @jax.checkpoint
    def one_query_block(args):
        q_BxQxGxRxK, seg_BxQ, pos_Q = args
        q_BxQxGxRxK = q_BxQxGxRxK.astype(jnp.float32) / jnp.sqrt(K).astype(jnp.float32)

        def step(carry, block):
            o, m, total = carry
            k, v, seg_k, pos_k = block
            s = jnp.einsum("bqgrk,bsgk->bqgrs", q_BxQxGxRxK, k.astype(jnp.float32))
            ok = (pos_k[None, :] <= pos_Q[:, None])[None] & (seg_BxQ[:, :, None] == seg_k[:, None])
            s = jnp.where(ok[:, :, None, None, :], s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - safe[..., None])
            scale = jnp.exp(jnp.where(jnp.isfinite(m), m, safe) - safe)
            total = total * scale + p.sum(-1)
            o = o * scale[..., None] + jnp.einsum("bqgrs,bsgk->bqgrk", p, v.astype(jnp.float32))
            return (o, m_new, total), None

        shape = q_BxQxGxRxK.shape[:-1]
        init = (jnp.zeros((*shape, K)), jnp.full(shape, -jnp.inf), jnp.zeros(shape))
        # each key step rematerialised too: its scan then saves the carries, not the scores
        (o, _, total), _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), init, kv)
        return o / jnp.where(total > 0, total, 1.0)[..., None]

    q = q_BxLxHxK.reshape(B, L // bq, bq, G, R, K).swapaxes(0, 1)
    segs = seg_BxL.reshape(B, L // bq, bq).swapaxes(0, 1)
    pos = (q_start + jnp.arange(L)).reshape(L // bq, bq)
    o = jax.lax.map(one_query_block, (q, segs, pos))  # [L/bq, B, bq, G, R, K]
    return o.swapaxes(0, 1).reshape(B, L, H, K).astype(q_BxLxHxK.dtype)


def _exclusive_scan(a_all: dict, b_all: dict, empty: dict) -> dict:
    """The state reaching this device: s_0 = empty, s_{j+1} = a_j * s_j + b_j over the
    devices before it (a_all, b_all: every device's map, stacked on a leading axis)."""

    def step(s, ab):
        a, b = ab
        return jax.tree.map(lambda a, b, s: a * s + b, a, b, s), s

    _, incoming = jax.lax.scan(step, empty, (a_all, b_all))
    return jax.tree.map(lambda s: s[jax.lax.axis_index(SEQUENCE)], incoming)
