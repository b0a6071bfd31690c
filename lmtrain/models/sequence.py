"""Rows split along their length over the mesh's `sequence` axis (long context across chips).

Under a mesh whose `sequence` axis has n > 1 devices, a training call of a mixer (no state)
runs in a shard_map that is manual over that axis and the batch axes: device i of the axis
holds positions [i L/n, (i+1) L/n) of its rows (the tensor axis stays with the automatic
partitioner), and

- attention (`Attention.split_parallel`) all-gathers K/V with their segment ids and attends
  its own queries to them under the causal and document mask by global position (dense for
  rows up to DENSE_MAX tokens, else in blocks with an online softmax and causal load
  balancing, `balanced_attention`: each device attends for an early and a late half-piece,
  and skips the key blocks after them; with attention_impl="splash", the TPU kernel does
  that, `splash_attention`);
- every other mixer keeps the mixer contract's promise that a long sequence is a chain of
  calls, each continuing the state of the one before (`chained` below):
  1. halo: the last `halo` inputs of device i-1 (the widest short-conv or sliding window the
     mixer keeps) arrive by one ppermute; a call on them gives the windows device i starts
     from, cut at a document start as every call's windows are;
  2. each device runs its piece from an empty carried state (S, h) and, by a forward-mode
     derivative of the final state in the carried state's direction, gets the affine map
     s -> A * s + b that its piece applies to an incoming state (A elementwise: every
     recurrence here is diagonal; a document start inside the piece makes A zero);
  3. the small (A, b) are combined by a prefix scan over ppermute (log2 n rounds; or, with
     STATE_PASS = "gather", LASP-2's all-gather of every device's map and a local scan), which
     gives each device the state that reaches it;
  4. the device replays its piece from that state (and the halo's windows): its outputs and
     final state are then exactly the unsplit model's, up to float roundoff.
  The replay costs a second forward of the mixer; the derivative pass only touches the
  carried state's path.
Decode and generation run unsplit (they pass a state, which takes the ordinary path).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmtrain.errors import ConfigError
from lmtrain.models import attention
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
    if STATE_PASS == "gather":
        a_all, b_all = jax.lax.all_gather((a, b), SEQUENCE)  # leading axis: the device
        mine = _exclusive_scan(a_all, b_all, empty)
    else:
        mine = _ppermute_scan(a, b, empty)
    y, _ = mixer.parallel(x_BxLxD, segment_ids_BxL, positions_BxL, {**state, **mine})
    return y


# Gathered rows longer than this attend block by block (balanced_attention, or
# blocked_attention where a device's piece does not halve into whole blocks); shorter ones
# build the [L/n, L] scores at once.
DENSE_MAX = 8192
Q_BLOCK, KV_BLOCK = 2048, 4096
# Causal load balancing of blocked rows (balanced_attention); False visits every key block on
# every device (blocked_attention), kept for tests and benchmarks to compare against.
BALANCE = True


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
    h = L // 2  # the halves of causal load balancing (balanced_attention)
    if impl == "splash" and h % attention.SPLASH_MIN == 0 and L % 2 == 0:
        return splash_attention(q_BxLxHxK, k_all, v_all, segment_ids_BxL, seg_all)
    bq, bk = min(Q_BLOCK, h), min(KV_BLOCK, h)
    if BALANCE and S > DENSE_MAX and L % 2 == 0 and h % bq == 0 and h % bk == 0:
        return balanced_attention(q_BxLxHxK, k_all, v_all, segment_ids_BxL, seg_all, bq, bk)
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


def _online_softmax_step(carry, q, seg_q, pos_q, k, v, seg_k, pos_k):
    """One key block of flash attention's recurrence: the running (outputs, max score, total
    weight) of queries q [B, Q, G, R, K] (float32, scaled) after keys k, v [B, S, G, K] at
    positions pos_k, under the causal and document mask."""
    o, m, total = carry
    s = jnp.einsum("bqgrk,bsgk->bqgrs", q, k.astype(jnp.float32))
    ok = (pos_k[None, :] <= pos_q[:, None])[None] & (seg_q[:, :, None] == seg_k[:, None])
    s = jnp.where(ok[:, :, None, None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - safe[..., None])
    scale = jnp.exp(jnp.where(jnp.isfinite(m), m, safe) - safe)
    total = total * scale + p.sum(-1)
    o = o * scale[..., None] + jnp.einsum("bqgrs,bsgk->bqgrk", p, v.astype(jnp.float32))
    return o, m_new, total


def blocked_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, seg_BxL, seg_BxS, q_start, bq, bk):
    """Causal, document-masked attention of queries at positions q_start .. q_start + L - 1 to
    keys 0 .. S - 1, in float32 with an online softmax (flash attention's recurrence) over
    key blocks of `bk`, for query blocks of `bq` one at a time: the scores held at once are
    [B, bq, H, bk], never [B, L, H, S]. Query blocks and key steps are rematerialised in the
    backward pass: what it keeps is one query block's running outputs per key block. Every
    key block is visited (masked, not skipped); `balanced_attention` skips them when a
    device's piece splits into halves of whole key blocks."""
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
            return _online_softmax_step(carry, q_BxQxGxRxK, seg_BxQ, pos_Q, *block), None

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


def zigzag_device(h: int, n: int) -> int:
    """The device that attends for half-piece h of 2n (device i holds halves 2i and 2i+1):
    device i attends for halves i and 2n - 1 - i, one early and one late."""
    return h if h < n else 2 * n - 1 - h


def balanced_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, seg_BxL, seg_BxS, bq, bk):
    """`blocked_attention` of this device's queries with causal load balancing, inside the
    shard_map: each device's piece is cut into two halves of h = L / 2 queries, and device i
    attends for halves i and 2n - 1 - i of the row (each goes there and its output comes back
    by ppermute). Half j needs only the key blocks before its end, (j + 1) h keys, so the two
    halves of a device need (i + 1) h + (2n - i) h = (2n + 1) h keys in all: the same on
    every device, one scan of (2n + 1) h / bk key steps, each step the next key block of one of
    the two halves. Dense causal attention needs n h keys per half on average, so the work is
    (2n + 1) / 4n of visiting every key block (0.53 at n = 8), and equal on every device."""
    n, i = jax.lax.axis_size(SEQUENCE), jax.lax.axis_index(SEQUENCE)
    B, L, H, K = q_BxLxHxK.shape
    S, G = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    h = L // 2
    bq, m = min(bq, h), h // bk  # query block; key blocks per half
    (q_lo, seg_lo), (q_hi, seg_hi) = to_zigzag(q_BxLxHxK, seg_BxL)
    lo_start, hi_start = i * h, (2 * n - 1 - i) * h

    # The key steps: lo's (i + 1) m blocks, then hi's (2n - i) m, as one static-length list.
    T = (2 * n + 1) * m
    t = jnp.arange(T)
    is_lo = t < (i + 1) * m
    block = jnp.where(is_lo, t, t - (i + 1) * m)
    kv = (
        k_BxSxGxK.reshape(B, S // bk, bk, G, K)[:, block].swapaxes(0, 1),
        v_BxSxGxK.reshape(B, S // bk, bk, G, K)[:, block].swapaxes(0, 1),
        seg_BxS.reshape(B, S // bk, bk)[:, block].swapaxes(0, 1),
        block[:, None] * bk + jnp.arange(bk)[None, :],
        is_lo,
    )
    R = H // G

    @jax.checkpoint
    def one_query_block(args):
        qs, segs, poss = args  # each a (lo, hi) pair: one query block of each half
        qs = tuple(q.astype(jnp.float32) / jnp.sqrt(K).astype(jnp.float32) for q in qs)

        def step(carry, blk):
            k, v, seg_k, pos_k, lo = blk
            sel = lambda a, b: jax.tree.map(lambda x, y: jnp.where(lo, x, y), a, b)  # noqa: E731
            q, seg_q, pos_q = sel((qs[0], segs[0], poss[0]), (qs[1], segs[1], poss[1]))
            new = _online_softmax_step(sel(carry[0], carry[1]), q, seg_q, pos_q, k, v, seg_k, pos_k)
            return (sel(new, carry[0]), sel(carry[1], new)), None

        shape = qs[0].shape[:-1]
        acc = (jnp.zeros((*shape, K)), jnp.full(shape, -jnp.inf), jnp.zeros(shape))
        outs, _ = jax.lax.scan(jax.checkpoint(step, prevent_cse=False), (acc, acc), kv)
        return tuple(o / jnp.where(tot > 0, tot, 1.0)[..., None] for o, _, tot in outs)

    def blocks_of(q, seg, start):
        return (
            q.reshape(B, h // bq, bq, G, R, K).swapaxes(0, 1),
            seg.reshape(B, h // bq, bq).swapaxes(0, 1),
            (start + jnp.arange(h)).reshape(h // bq, bq),
        )

    lo, hi = blocks_of(q_lo, seg_lo, lo_start), blocks_of(q_hi, seg_hi, hi_start)
    o_lo, o_hi = jax.lax.map(one_query_block, tuple(zip(lo, hi, strict=True)))
    o_lo, o_hi = (
        o.swapaxes(0, 1).reshape(B, h, H, K).astype(q_BxLxHxK.dtype) for o in (o_lo, o_hi)
    )
    return from_zigzag(o_lo, o_hi)


def _zigzag_perms(n: int) -> list[list[tuple[int, int]]]:
    """Half 2j + s of device j (s = 0 first, 1 second) goes to zigzag_device(2j + s)."""
    return [[(j, zigzag_device(2 * j + s, n)) for j in range(n)] for s in (0, 1)]


def _pick_by_parity(a, b):
    """a on even devices of the sequence axis, b on odd ones (leaf by leaf)."""
    even = jax.lax.axis_index(SEQUENCE) % 2 == 0
    return jax.tree.map(lambda x, y: jnp.where(even, x, y), a, b)


def to_zigzag(*pieces_BxL):
    """Causal load balancing's layout: each of this device's pieces (arrays split on axis 1)
    cut into two halves, and the halves of the row sent where they are attended for. Returns
    (lo, hi): tuples of the pieces' halves i and 2n - 1 - i on device i (one early, one late)."""
    n, h = jax.lax.axis_size(SEQUENCE), pieces_BxL[0].shape[1] // 2
    halves = [tuple(p[:, s * h : (s + 1) * h] for p in pieces_BxL) for s in (0, 1)]
    got = [
        jax.lax.ppermute(x, SEQUENCE, perm)
        for x, perm in zip(halves, _zigzag_perms(n), strict=True)
    ]
    # Device i receives half i (by the first-halves permutation when i is even) and half
    # 2n - 1 - i (by the other one).
    return _pick_by_parity(got[0], got[1]), _pick_by_parity(got[1], got[0])


def from_zigzag(o_lo, o_hi) -> jax.Array:
    """The outputs of halves i and 2n - 1 - i (`to_zigzag`) back to the devices whose pieces
    they are, as [B, L, ...] pieces: what arrived by a permutation returns by its inverse."""
    backs = [[(b, a) for a, b in perm] for perm in _zigzag_perms(jax.lax.axis_size(SEQUENCE))]
    outs = (_pick_by_parity(o_lo, o_hi), _pick_by_parity(o_hi, o_lo))
    back = [jax.lax.ppermute(o, SEQUENCE, b) for o, b in zip(outs, backs, strict=True)]
    return jnp.concatenate(back, axis=1)


def _manual(kernel, kv_heads: int):
    """`kernel` in a shard_map over the mesh axes the split left automatic (tensor): a Mosaic
    kernel cannot be partitioned automatically. Its kv heads split over them where they
    divide (as models/attention.py's splash does), else every chip runs all of them."""
    mesh = jax.sharding.get_abstract_mesh()
    rest = tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    if not rest:
        return kernel
    heads = rest if kv_heads % math.prod(mesh.shape[a] for a in rest) == 0 else None
    qkv, seg = P(None, None, heads, None), P()
    return jax.shard_map(
        kernel,
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, seg, seg),
        out_specs=qkv,
        axis_names=set(rest),
        check_vma=False,
    )


def splash_attention(q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, seg_BxL, seg_BxS) -> jax.Array:
    """Splash attention (the TPU kernel, models/attention.py) of this device's queries to the
    gathered row, with causal load balancing: device i runs the kernel for halves i and
    2n - 1 - i of the row (`to_zigzag`). The kernel's causal mask is static, so each half picks
    one of 2n kernels, one per half's offset, by lax.switch; each skips the key blocks after
    its half's end, so device i's kernels visit (i + 1/2) + (2n - i - 1/2) = 2n half-pieces of
    keys: the same on every device."""
    n, i = jax.lax.axis_size(SEQUENCE), jax.lax.axis_index(SEQUENCE)
    h = q_BxLxHxK.shape[1] // 2
    interpret = attention.interpret_mode()
    kernels = [
        _manual(
            functools.partial(attention.splash_local, interpret=interpret, offset=j * h),
            k_BxSxGxK.shape[2],
        )
        for j in range(2 * n)
    ]

    def half(j, q, seg):
        return jax.lax.switch(j, kernels, q, k_BxSxGxK, v_BxSxGxK, seg, seg_BxS)

    (q_lo, seg_lo), (q_hi, seg_hi) = to_zigzag(q_BxLxHxK, seg_BxL)
    return from_zigzag(half(i, q_lo, seg_lo), half(2 * n - 1 - i, q_hi, seg_hi))


# How the devices' affine maps of the carried state are combined (`chained`): "scan", a
# prefix scan over ppermute (log2 n rounds, each passing one map to the device d = 1, 2, 4 ...
# places on, then one hop for the exclusive shift: (log2 n + 1) x 2 states sent per device),
# or "gather", LASP-2's all-gather of every device's map and a local scan (n - 1 maps of 2
# states received per device, in one collective). BENCHMARKS.md compares their bytes.
STATE_PASS = "scan"


def _ppermute_scan(a: dict, b: dict, empty: dict) -> dict:
    """The state reaching this device by a Hillis-Steele prefix scan of the maps s -> a s + b
    over ppermute: after the round with offset d, device i holds the composition of the maps
    of devices max(0, i - 2d + 1) .. i. One last hop shifts the result by one device."""
    n, i = jax.lax.axis_size(SEQUENCE), jax.lax.axis_index(SEQUENCE)
    d = 1
    while d < n:
        ra, rb = jax.lax.ppermute((a, b), SEQUENCE, [(j, j + d) for j in range(n - d)])
        has = i >= d  # device i - d exists: apply its (earlier) map first, then this one's
        a, b = (
            jax.tree.map(lambda x, r, h=has: jnp.where(h, x * r, x), a, ra),
            jax.tree.map(lambda x, r, y, h=has: jnp.where(h, x * r + y, y), a, rb, b),
        )
        d *= 2
    after = jax.tree.map(lambda a, b, s: a * s + b, a, b, empty)  # the state device i hands on
    got = jax.lax.ppermute(after, SEQUENCE, [(j, j + 1) for j in range(n - 1)])
    return jax.tree.map(lambda g, s: jnp.where(i == 0, s, g), got, empty)


def _exclusive_scan(a_all: dict, b_all: dict, empty: dict) -> dict:
    """The state reaching this device: s_0 = empty, s_{j+1} = a_j * s_j + b_j over the
    devices before it (a_all, b_all: every device's map, stacked on a leading axis)."""

    def step(s, ab):
        a, b = ab
        return jax.tree.map(lambda a, b, s: a * s + b, a, b, s), s

    _, incoming = jax.lax.scan(step, empty, (a_all, b_all))
    return jax.tree.map(lambda s: s[jax.lax.axis_index(SEQUENCE)], incoming)
