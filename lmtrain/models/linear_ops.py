"""Sequence-mixer math for the linear-attention family: costs, then pure forms (no parameters).

Shape letters beyond the legend in `layers.py`: M chunks per sequence, P key/query (feature) dim
per head, E value dim per head, R sliding-window keys per query block.

Documents: a packed row holds several documents; a document starts wherever `segment_ids`
changes (and at position 0). `doc_index` numbers them 1, 2, ... so "same document" is a plain
equality even when ids repeat; every recurrence here restarts from a zero state at each start.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

_NO_DOC = -1  # doc index of padding before a sequence: never equal to a real document (>= 1)
EMPTY = -(2**31)  # segment id of an empty slot in a state: never a real segment


def linear_dims(cfg: Any, kind: str) -> tuple[int, int]:
    """(P, E): key/query and value dims per head of a linear-attention mixer's state."""
    K, f = cfg.head_dim, cfg.feature_dim
    if kind == "based":  # Taylor features; a ones column in v carries the normaliser z
        return 1 + f + f * f, K + 1
    if kind == "gla":
        return int(cfg.gla_expand_k * cfg.d_model) // cfg.n_heads, K
    return K, K


def mixer_costs(cfg: Any, kind: str, seq_len: int) -> tuple[int, float, int]:
    """(matmul parameters, own training FLOPs per token, decode-state floats) of one mixer."""
    D, H, f, r = cfg.d_model, cfg.n_heads, cfg.feature_dim, cfg.gla_gate_rank
    if kind == "swa":  # q, k, v, o; rolling keys and values
        w = min(cfg.window, seq_len)
        return 4 * D * D, 12 * D * w * (1 - w / (2 * seq_len)), 2 * cfg.window * D
    if kind == "conv":  # in, gate, out ("base": gate only); the last conv_width - 1 inputs
        n = 1 if cfg.conv_form == "base" else 3
        return n * D * D, 6 * cfg.conv_width * D, (cfg.conv_width - 1) * D
    P, E = linear_dims(cfg, kind)
    params = {
        "based": 2 * D * H * f + 2 * D * D,  # q, k: D x H f; v, o
        "retention": 5 * D * D,  # q, k, v, gate, o
        "lightning": 5 * D * D,
        "gla": 2 * D * H * P + 3 * D * D + r * (D + H * P),  # q, k; v, gate, o; decay W1 W2
    }[kind]
    C = min(cfg.gla_chunk if kind == "gla" else cfg.chunk, seq_len)
    return params, 3 * H * (C * (P + E) + 4 * P * E), H * P * E


def doc_index(segment_ids_BxL: jax.Array | None, shape: tuple[int, int]) -> jax.Array:
    """int32 (B, L): 1 + number of document starts strictly after position 0 up to t."""
    if segment_ids_BxL is None:
        return jnp.ones(shape, jnp.int32)
    change_BxL = segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
    starts_BxL = jnp.pad(change_BxL, ((0, 0), (1, 0)), constant_values=True)
    return jnp.cumsum(starts_BxL.astype(jnp.int32), axis=1)


def taylor_feature_map(x_xF: jax.Array) -> jax.Array:
    """BASED's 2nd-order Taylor map, phi(x) = [1, x', vec(x' x'^T) / sqrt 2], x' = x / F^(1/4).

    phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(F): exp(s) to second order. Shape
    (..., F) -> (..., 1 + F + F^2).
    """
    F = x_xF.shape[-1]
    x = x_xF.astype(jnp.float32) / F**0.25
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], F * F) / math.sqrt(2.0)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x, outer], axis=-1)


def _doc_cumsum(same_BxMxCxC: jax.Array, x_BxMxCx: jax.Array) -> jax.Array:
    """Cumulative sum along each chunk counting only earlier positions of the same document.

    A plain cumsum would make cum_i - cum_j depend on other documents' decays through rounding
    (its gradient leaks ~1e-10 across documents); masking makes that dependence exactly zero.
    """
    same = same_BxMxCxC.astype(jnp.float32)
    hp = jax.lax.Precision.HIGHEST  # a sum, not a learned product: no TF32/bf16 passes
    return jnp.einsum("bmij,bmj...->bmi...", same, x_BxMxCx, precision=hp)


def chunked_linear_attention(
    q_BxLxHxP: jax.Array,
    k_BxLxHxP: jax.Array,
    v_BxLxHxE: jax.Array,
    log_decay: jax.Array | None,
    doc_BxL: jax.Array,
    chunk: int,
    s0_BxHxPxE: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Chunked form of o_t = q_t S_t, S_t = diag(a_t) S_{t-1} + k_t^T v_t (S = 0 before a doc).

    `s0` (default zero) is the state before the first token, which the first document (doc
    index 1) continues.

    `log_decay` is log a_t: None (no decay), (B, L, H) (one scalar per head) or (B, L, H, P)
    (diagonal, GLA). Inside each chunk of C positions: the masked quadratic form with decay
    exp(cum_i - cum_j); across chunks: the state carried by lax.scan. Cost O(L (C + P E)) per
    head, not O(L^2). L need not be a multiple of C (the tail is padded). Returns float32
    (o_BxLxHxE, final state S_BxHxPxE).
    """
    B, L, H, P = q_BxLxHxP.shape
    E = v_BxLxHxE.shape[-1]
    C = min(chunk, L)
    M = -(-L // C)
    pad = M * C - L
    diag = log_decay is not None and log_decay.ndim == 4

    def blocks(x: jax.Array) -> jax.Array:
        # Zero q/k/v/log-decay padding after the end changes neither outputs nor the final state.
        x = jnp.pad(x.astype(jnp.float32), [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(B, M, C, *x.shape[2:])

    q, k, v = blocks(q_BxLxHxP), blocks(k_BxLxHxP), blocks(v_BxLxHxE)
    doc_BxMxC = jnp.pad(doc_BxL, ((0, 0), (0, pad)), mode="edge").reshape(B, M, C)
    causal_CxC = jnp.tril(jnp.ones((C, C), bool))
    same_BxMxCxC = (doc_BxMxC[:, :, :, None] == doc_BxMxC[:, :, None, :]) & causal_CxC[None, None]

    # Intra-chunk: masked quadratic form. Decay exponents are masked before exp (never > 0).
    if log_decay is None:
        cum = None
        s_BxMxHxCxC = jnp.einsum("bmihp,bmjhp->bmhij", q, k)
        s_BxMxHxCxC = jnp.where(same_BxMxCxC[:, :, None], s_BxMxHxCxC, 0.0)
    elif diag:
        cum = _doc_cumsum(same_BxMxCxC, blocks(log_decay))  # BxMxCxHxP
        diff = cum[:, :, :, None] - cum[:, :, None, :]  # BxMxCxCxHxP, query i then key j
        dec = jnp.exp(jnp.where(same_BxMxCxC[..., None, None], diff, -jnp.inf))
        s_BxMxHxCxC = jnp.einsum("bmihp,bmjhp,bmijhp->bmhij", q, k, dec)
    else:
        cum = _doc_cumsum(same_BxMxCxC, blocks(log_decay))  # BxMxCxH
        cum_BxMxHxC = jnp.moveaxis(cum, 3, 2)
        diff = cum_BxMxHxC[..., :, None] - cum_BxMxHxC[..., None, :]
        dec = jnp.exp(jnp.where(same_BxMxCxC[:, :, None], diff, -jnp.inf))
        s_BxMxHxCxC = jnp.einsum("bmihp,bmjhp->bmhij", q, k) * dec
    o_BxMxCxHxE = jnp.einsum("bmhij,bmjhe->bmihe", s_BxMxHxCxC, v)

    # What each chunk adds to the state: keys of its last document, decayed to the chunk end.
    last_doc_BxM = doc_BxMxC[:, :, -1]
    before = _NO_DOC if s0_BxHxPxE is None else 1  # the document s0 belongs to
    prev_doc_BxM = jnp.pad(last_doc_BxM[:, :-1], ((0, 0), (1, 0)), constant_values=before)
    in_last_BxMxC = doc_BxMxC == last_doc_BxM[:, :, None]
    k_tail = jnp.where(in_last_BxMxC[..., None, None], k, 0.0)
    q_head = jnp.where((doc_BxMxC == prev_doc_BxM[:, :, None])[..., None, None], q, 0.0)
    if cum is not None:
        expand = (lambda x: x) if diag else (lambda x: x[..., None])
        k_tail = k_tail * jnp.exp(expand(cum[:, :, -1:] - cum))
        q_head = q_head * jnp.exp(expand(cum))
        total = jnp.exp(cum[:, :, -1])  # BxMxH[xP]: decay across the whole chunk
        total_BxMxHxPx1 = total[..., None] if diag else total[..., None, None]
    else:
        total_BxMxHxPx1 = jnp.ones((B, M, 1, 1, 1), jnp.float32)
    u_BxMxHxPxE = jnp.einsum("bmjhp,bmjhe->bmhpe", k_tail, v)
    # A chunk whose last document started before it keeps (decays) the incoming state.
    keep_BxM = (last_doc_BxM == prev_doc_BxM).astype(jnp.float32)
    carry_BxMxHxPx1 = total_BxMxHxPx1 * keep_BxM[:, :, None, None, None]

    def scan_step(s_BxHxPxE, xs):
        carry, u = xs
        return carry * s_BxHxPxE + u, s_BxHxPxE

    s0 = jnp.zeros((B, H, P, E), jnp.float32) if s0_BxHxPxE is None else s0_BxHxPxE
    xs = (jnp.moveaxis(carry_BxMxHxPx1, 1, 0), jnp.moveaxis(u_BxMxHxPxE, 1, 0))
    final_BxHxPxE, s_in_MxBxHxPxE = jax.lax.scan(scan_step, s0, xs)

    # Inter-chunk: queries still in the document that was open when the chunk began read S.
    o_BxMxCxHxE = o_BxMxCxHxE + jnp.einsum("bmihp,mbhpe->bmihe", q_head, s_in_MxBxHxPxE)
    return o_BxMxCxHxE.reshape(B, M * C, H, E)[:, :L], final_BxHxPxE


def recurrent_linear_attention(
    q_BxTxHxP: jax.Array,
    k_BxTxHxP: jax.Array,
    v_BxTxHxE: jax.Array,
    log_decay: jax.Array | None,
    state_BxHxPxE: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Token-by-token form of `chunked_linear_attention` (one document) from a given state."""
    f32 = jnp.float32
    if log_decay is None:
        log_decay = jnp.zeros(q_BxTxHxP.shape[:3], f32)

    def one_token(s_BxHxPxE, xs):
        q_BxHxP, k_BxHxP, v_BxHxE, log_a = xs
        a = jnp.exp(log_a)
        a_BxHxPx1 = a[..., None] if log_a.ndim == 3 else a[..., None, None]
        s_BxHxPxE = a_BxHxPx1 * s_BxHxPxE + k_BxHxP[..., None] * v_BxHxE[:, :, None, :]
        return s_BxHxPxE, jnp.einsum("bhp,bhpe->bhe", q_BxHxP, s_BxHxPxE)

    xs = tuple(jnp.moveaxis(x.astype(f32), 1, 0) for x in (q_BxTxHxP, k_BxTxHxP, v_BxTxHxE))
    xs = (*xs, jnp.moveaxis(log_decay.astype(f32), 1, 0))
    state_BxHxPxE, o_TxBxHxE = jax.lax.scan(one_token, state_BxHxPxE.astype(f32), xs)
    return jnp.moveaxis(o_TxBxHxE, 0, 1), state_BxHxPxE


def _softmax_attend(q, k, v, mask, scale: float) -> jax.Array:
    """softmax(q k^T * scale, masked) v over the key axis; every query has >= 1 visible key."""
    s = jnp.einsum("...qhk,...shk->...hqs", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    return jnp.einsum("...hqs,...shk->...qhk", p, v.astype(jnp.float32))


def sliding_window_attention(
    q_BxLxHxK: jax.Array,
    k_BxLxHxK: jax.Array,
    v_BxLxHxK: jax.Array,
    doc_BxL: jax.Array,
    window: int,
) -> jax.Array:
    """Causal softmax attention where query t sees keys t-window+1..t of its own document.

    Blocked: queries in blocks of c = min(window, L) attend to their block and the ceil((window
    - 1) / c) blocks before it, so the cost is O(L window), not O(L^2). Returns float32.
    """
    B, L, H, K = q_BxLxHxK.shape
    c = min(window, L)
    M = -(-L // c)
    n_prev = min(-(-(window - 1) // c), M - 1)
    pad = M * c - L

    def blocks(x: jax.Array, prev: int, value=0) -> jax.Array:
        widths = [(0, 0), (prev * c, pad)] + [(0, 0)] * (x.ndim - 2)
        return jnp.pad(x, widths, constant_values=value).reshape(B, M + prev, c, *x.shape[2:])

    def with_prev(x_BxMpxcx: jax.Array) -> jax.Array:
        # Keys of block m: blocks m - n_prev .. m, concatenated along the key axis.
        return jnp.concatenate([x_BxMpxcx[:, s : s + M] for s in range(n_prev + 1)], axis=2)

    q_BxMxcxHxK = blocks(q_BxLxHxK, 0)
    k_BxMxRxHxK = with_prev(blocks(k_BxLxHxK, n_prev))
    v_BxMxRxHxK = with_prev(blocks(v_BxLxHxK, n_prev))
    doc_q_BxMxc = blocks(doc_BxL, 0, _NO_DOC)
    doc_k_BxMxR = with_prev(blocks(doc_BxL, n_prev, _NO_DOC))
    offset_cxR = (jnp.arange(c)[:, None] + n_prev * c) - jnp.arange((n_prev + 1) * c)[None, :]
    in_window_cxR = (offset_cxR >= 0) & (offset_cxR < window)
    mask = (doc_q_BxMxc[:, :, :, None] == doc_k_BxMxR[:, :, None, :]) & in_window_cxR[None, None]
    o = _softmax_attend(q_BxMxcxHxK, k_BxMxRxHxK, v_BxMxRxHxK, mask[:, :, None], K**-0.5)
    return o.reshape(B, M * c, H, K)[:, :L]


def sliding_window_after(
    q_BxTxHxK: jax.Array,
    k_BxSxHxK: jax.Array,
    v_BxSxHxK: jax.Array,
    doc_BxS: jax.Array,
    window: int,
) -> jax.Array:
    """`sliding_window_attention` for the last T of S keys: queries come after S - T earlier
    keys (a state's), and doc_BxS numbers the documents of all S. Dense (T x S) when T <=
    window, as in decoding; blocked over all S otherwise. Returns float32 (B, T, H, K)."""
    T, S, K = q_BxTxHxK.shape[1], k_BxSxHxK.shape[1], q_BxTxHxK.shape[-1]
    if T > window:
        q_BxSxHxK = jnp.pad(q_BxTxHxK, ((0, 0), (S - T, 0), (0, 0), (0, 0)))
        return sliding_window_attention(q_BxSxHxK, k_BxSxHxK, v_BxSxHxK, doc_BxS, window)[:, -T:]
    offset_TxS = jnp.arange(S - T, S)[:, None] - jnp.arange(S)[None, :]
    in_window_TxS = (offset_TxS >= 0) & (offset_TxS < window)
    mask_BxTxS = (doc_BxS[:, -T:, None] == doc_BxS[:, None, :]) & in_window_TxS[None]
    return _softmax_attend(q_BxTxHxK, k_BxSxHxK, v_BxSxHxK, mask_BxTxS[:, None], K**-0.5)


def alibi_slopes(n: int) -> list[float]:
    """ALiBi's per-head slopes, by the rule of its released code (which TransNormerLLM's reuses):
    for n a power of two, 2^(-8(h+1)/n); otherwise the slopes of the largest power of two
    p < n, then every other slope of 2p (6 heads: 0.25, 0.0625, 0.0156, 0.0039, 0.5, 0.125)."""
    p = 2 ** math.floor(math.log2(n))
    slopes = [2.0 ** (-8 * (h + 1) / p) for h in range(p)]
    return slopes + alibi_slopes(2 * p)[0::2][: n - p] if p < n else slopes
