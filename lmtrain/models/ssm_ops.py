"""Scan and kernel math for the state-space mixers (float32), and the diagonal SSM parameters.

Shape letters beyond the legend in layers.py: P value head dim, M = N/2 complex modes of a
diagonal SSM, Z number of chunks (C is the chunk length), t/s in einsums index positions.

Two linear recurrences, each with a chunked training form and a token-by-token step form:

    ssd: h_t = exp(dt_t a) h_{t-1} + dt_t x_t b_t^T    y_t = h_t c_t          (Mamba-2)
    lti: h_t = dA h_{t-1} + dB k_t v_t^T               y_t = 2 Re(C q_t^T h_t) (S4D, H3)

Where `reset_BxL` is True the state entering that token is dropped (a new document starts).
Resets are structural zeros (exp(-inf), or a 0/1 mask), so gradients across documents are
exactly zero, not merely small.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.models.layers import param

DT_MIN, DT_MAX = 1e-3, 1e-1  # initial step sizes, log-uniform (S4D, H3, Mamba-2)


def resets(segment_ids_BxL: jax.Array | None) -> jax.Array | None:
    """True where a token's segment differs from the previous token's (and at position 0)."""
    if segment_ids_BxL is None:
        return None
    change_BxL = segment_ids_BxL[:, 1:] != segment_ids_BxL[:, :-1]
    return jnp.pad(change_BxL, ((0, 0), (1, 0)), constant_values=True)


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    """(B, L, ...) -> (B, Z, C, ...), zero-padding L up to a multiple of `chunk` at the end."""
    pad = -x.shape[1] % chunk
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return x.reshape(x.shape[0], -1, chunk, *x.shape[2:])


def _unchunked(y: jax.Array, length: int) -> jax.Array:
    """(B, Z, C, ...) -> (B, length, ...), dropping the padding."""
    return y.reshape(y.shape[0], -1, *y.shape[3:])[:, :length]


def segsum(a_xC: jax.Array) -> jax.Array:
    """out[..., t, s] = sum_{r=s+1..t} a_r for t >= s, else -inf.

    Built by a masked cumulative sum rather than cumsum differences, so -inf entries (resets)
    give -inf where they lie inside (s, t] and never inf - inf = nan.
    """
    C = a_xC.shape[-1]
    a_xCxC = jnp.broadcast_to(a_xC[..., :, None], (*a_xC.shape, C))
    t_C = jnp.arange(C)
    strict_CxC = t_C[:, None] > t_C[None, :]
    out = jnp.cumsum(jnp.where(strict_CxC, a_xCxC, 0.0), axis=-2)
    return jnp.where(t_C[:, None] >= t_C[None, :], out, -jnp.inf)


def _scan_chunks(decay_BxZx: jax.Array, states_BxZx: jax.Array) -> jax.Array:
    """Inclusive scan H_z = decay_z * H_{z-1} + states_z along axis 1 (caller folds in H_-1)."""
    extra = states_BxZx.ndim - decay_BxZx.ndim

    def combine(left, right):
        d1, s1 = left
        d2, s2 = right
        return d1 * d2, d2.reshape(d2.shape + (1,) * extra) * s1 + s2

    return jax.lax.associative_scan(combine, (decay_BxZx, states_BxZx), axis=1)[1]


def ssd_chunked(
    x_BxLxHxP: jax.Array,
    dt_BxLxH: jax.Array,
    a_H: jax.Array,
    b_BxLxN: jax.Array,
    c_BxLxN: jax.Array,
    reset_BxL: jax.Array | None,
    chunk: int,
    h0_BxHxPxN: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mamba-2 SSD by the four-step chunked algorithm; returns (y_BxLxHxP, final h_BxHxPxN)."""
    B, L, H, P = x_BxLxHxP.shape
    N = b_BxLxN.shape[-1]
    loga_BxLxH = dt_BxLxH * a_H[None, None, :]
    if reset_BxL is not None:  # decay 0 into a segment start
        loga_BxLxH = jnp.where(reset_BxL[:, :, None], -jnp.inf, loga_BxLxH)
    # End padding has dt = 0: decay 1 and no input, so the final state stays exact.
    xdt_BxZxCxHxP = _chunked(x_BxLxHxP * dt_BxLxH[..., None], chunk)
    loga_BxHxZxC = jnp.moveaxis(_chunked(loga_BxLxH, chunk), -1, 1)
    b_BxZxCxN, c_BxZxCxN = _chunked(b_BxLxN, chunk), _chunked(c_BxLxN, chunk)

    # 1. intra-chunk outputs: y_t = sum_{s<=t} (c_t . b_s) exp(segsum)_{ts} dt_s x_s
    decay_BxHxZxCxC = jnp.exp(segsum(loga_BxHxZxC))
    y_diag = jnp.einsum(
        "bztn,bzsn,bhzts,bzshp->bzthp", c_BxZxCxN, b_BxZxCxN, decay_BxHxZxCxC, xdt_BxZxCxHxP
    )
    # 2. each chunk's final state from its own tokens (row C-1 of the decay mask)
    states_BxZxHxPxN = jnp.einsum(
        "bzsn,bhzs,bzshp->bzhpn", b_BxZxCxN, decay_BxHxZxCxC[..., -1, :], xdt_BxZxCxHxP
    )
    # 3. inter-chunk recurrence over chunk states, starting from h0
    cum_BxHxZxC = jnp.cumsum(loga_BxHxZxC, axis=-1)  # log decay from chunk start through t
    chunk_decay_BxZxH = jnp.exp(jnp.moveaxis(cum_BxHxZxC[..., -1], 1, -1))
    if h0_BxHxPxN is None:
        h0_BxHxPxN = jnp.zeros((B, H, P, N), jnp.float32)
    decay_Bx1xH = jnp.ones((B, 1, H), jnp.float32)
    h_all = _scan_chunks(
        jnp.concatenate([decay_Bx1xH, chunk_decay_BxZxH], axis=1),
        jnp.concatenate([h0_BxHxPxN[:, None], states_BxZxHxPxN], axis=1),
    )
    prev_BxZxHxPxN = h_all[:, :-1]  # state entering each chunk
    # 4. state-to-output: the entering state, decayed to t, read out by c_t
    y_off = jnp.einsum("bztn,bzhpn,bhzt->bzthp", c_BxZxCxN, prev_BxZxHxPxN, jnp.exp(cum_BxHxZxC))
    return _unchunked(y_diag + y_off, L), h_all[:, -1]


def ssd_step(
    x_BxTxHxP: jax.Array,
    dt_BxTxH: jax.Array,
    a_H: jax.Array,
    b_BxTxN: jax.Array,
    c_BxTxN: jax.Array,
    h_BxHxPxN: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The SSD recurrence one token at a time (no resets); returns (y_BxTxHxP, new state)."""

    def one(h_BxHxPxN, inputs):
        x_BxHxP, dt_BxH, b_BxN, c_BxN = inputs
        decay_BxHx1x1 = jnp.exp(dt_BxH * a_H[None, :])[:, :, None, None]
        xdt_BxHxPx1 = (x_BxHxP * dt_BxH[:, :, None])[..., None]
        h_BxHxPxN = decay_BxHx1x1 * h_BxHxPxN + xdt_BxHxPx1 * b_BxN[:, None, None, :]
        return h_BxHxPxN, jnp.einsum("bhpn,bn->bhp", h_BxHxPxN, c_BxN)

    inputs = tuple(jnp.moveaxis(a, 1, 0) for a in (x_BxTxHxP, dt_BxTxH, b_BxTxN, c_BxTxN))
    h_BxHxPxN, y_TxBxHxP = jax.lax.scan(one, h_BxHxPxN, inputs)
    return jnp.moveaxis(y_TxBxHxP, 0, 1), h_BxHxPxN


def zoh(dt_H: jax.Array, a_HxM: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Zero-order hold with B = 1: (log dA = dt a, dB = (exp(dt a) - 1) / a), complex (H, M)."""
    log_da_HxM = dt_H[:, None] * a_HxM
    return log_da_HxM, (jnp.exp(log_da_HxM) - 1.0) / a_HxM


def log_uniform(lo: float, hi: float):
    """Initialiser: log(x) for x log-uniform in [lo, hi], i.e. uniform in [log lo, log hi]."""

    def init(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, math.log(lo), math.log(hi))

    return init


def _s4d_lin_imag(key, shape, dtype):
    """Im(A_n) = pi * n along the last (mode) axis: S4D-Lin."""
    return jnp.broadcast_to(math.pi * jnp.arange(shape[-1], dtype=dtype), shape)


class DiagonalSSM(nnx.Module):
    """Complex diagonal SSM parameters for H groups of M = N/2 conjugate pairs (S4D-Lin init).

    A = -exp(log_neg_a_re) + i a_im (Re A < 0 always), B = 1 (folded into C), dt = exp(log_dt).
    A and dt get no weight decay (as in the S4 code: decaying them would pull every mode to
    Re A = -1, Im A = 0); C, a weight, does.
    """

    def __init__(self, groups: int, state_size: int, axis: str, *, rngs: nnx.Rngs):
        M = state_size // 2
        self.log_dt = param(rngs, log_uniform(DT_MIN, DT_MAX), (groups,), (axis,))
        neg_a_re = nnx.initializers.constant(math.log(0.5))
        no_wd = {"weight_decay": False}
        self.log_neg_a_re = param(rngs, neg_a_re, (groups, M), (axis, "state"), **no_wd)
        self.a_im = param(rngs, _s4d_lin_imag, (groups, M), (axis, "state"), **no_wd)
        # C ~ complex normal with unit variance (real and imaginary parts each 1/2).
        self.c = param(
            rngs, nnx.initializers.normal(math.sqrt(0.5)), (groups, M, 2), (axis, "state", None)
        )
        self.d = param(rngs, nnx.initializers.normal(1.0), (groups,), (axis,))

    def discretised(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(log dA, dB, C), each complex (H, M), by zero-order hold."""
        a_HxM = -jnp.exp(self.log_neg_a_re[...]) + 1j * self.a_im[...]
        log_da_HxM, db_HxM = zoh(jnp.exp(self.log_dt[...]), a_HxM)
        c = self.c[...]
        return log_da_HxM, db_HxM, c[..., 0] + 1j * c[..., 1]


def lti_kernel(log_da_HxM: jax.Array, w_HxM: jax.Array, length: int) -> jax.Array:
    """Convolution kernel k_HxL[h, l] = 2 Re(sum_m w_m dA_m^l) for l < length (w = C dB)."""
    l_L = jnp.arange(length, dtype=jnp.float32)
    powers_HxMxL = jnp.exp(log_da_HxM[:, :, None] * l_L[None, None, :])
    return 2.0 * jnp.real(jnp.einsum("hm,hml->hl", w_HxM, powers_HxMxL))


def fft_conv(u_BxLxH: jax.Array, k_HxL: jax.Array) -> jax.Array:
    """Causal convolution y_t = sum_{s<=t} k_{t-s} u_s by FFT, zero-padded to 2L (no wrap)."""
    L = u_BxLxH.shape[1]
    u_f = jnp.fft.rfft(u_BxLxH, n=2 * L, axis=1)
    k_f = jnp.fft.rfft(k_HxL.T, n=2 * L, axis=0)[None]
    return jnp.fft.irfft(u_f * k_f, n=2 * L, axis=1)[:, :L]


def lti_chunked(
    q_BxLxHxK: jax.Array | None,
    k_BxLxHxK: jax.Array | None,
    v_BxLxHxP: jax.Array,
    log_da_HxM: jax.Array,
    db_HxM: jax.Array,
    c_HxM: jax.Array,
    reset_BxL: jax.Array | None,
    chunk: int,
    h0_BxHxMxKxP: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """y_t = sum_{s<=t, same document} kernel_h(t-s) (q_t . k_s) v_s by the chunked algorithm.

    The same four steps as SSD, with a time-invariant complex decay per (head, mode): a masked
    Toeplitz block inside chunks, and per-mode complex states carried between chunks.
    q and k may both be None, meaning 1 (K = 1): S4D's per-channel convolution of v.
    `h0` (default zero) is the state before token 0, which tokens before the first reset read.
    Returns (y_BxLxHxP, the final state h_BxHxMxKxP, complex).
    """
    B, L, H, _ = v_BxLxHxP.shape
    per_channel = q_BxLxHxK is None
    if per_channel:
        q_BxLxHxK = k_BxLxHxK = jnp.ones((B, L, H, 1), jnp.float32)
    q, k, v = (_chunked(a, chunk) for a in (q_BxLxHxK, k_BxLxHxK, v_BxLxHxP))
    if reset_BxL is None:
        reset_BxL = jnp.zeros((B, L), bool)
    # Document index per token; the end padding continues the last document (its zero k and v
    # add nothing, so the last chunk's state is the final state decayed by the padding).
    doc_BxL = jnp.cumsum(reset_BxL, axis=1, dtype=jnp.int32)
    pad = -L % chunk
    doc_BxZxC = jnp.pad(doc_BxL, ((0, 0), (0, pad)), mode="edge").reshape(B, -1, chunk)
    t_C = jnp.arange(chunk)

    # 1. intra-chunk: a causal Toeplitz block, masked to pairs in the same document
    kern_HxC = lti_kernel(log_da_HxM, db_HxM * c_HxM, chunk)
    if per_channel:
        # Lag by lag: y_t += kern_j v_{t-j} when t-j is in t's chunk and document. XLA fuses
        # this; the masked (B, Z, C, C, H) matrix form below measured ~4x slower on CPU.
        y_diag = kern_HxC[None, None, None, :, 0:1] * v
        for j in range(1, chunk):
            v_j = jnp.pad(v, ((0, 0), (0, 0), (j, 0), (0, 0), (0, 0)))[:, :, :chunk]
            doc_j = jnp.pad(doc_BxZxC, ((0, 0), (0, 0), (j, 0)), constant_values=-1)[:, :, :chunk]
            ok_BxZxCx1x1 = (doc_j == doc_BxZxC).astype(jnp.float32)[..., None, None]
            y_diag = y_diag + kern_HxC[None, None, None, :, j : j + 1] * ok_BxZxCx1x1 * v_j
    else:
        lag_CxC = t_C[:, None] - t_C[None, :]
        toeplitz_CxCxH = jnp.where(
            lag_CxC[..., None] >= 0, kern_HxC.T[jnp.maximum(lag_CxC, 0)], 0.0
        )
        same_BxZxCxC = (doc_BxZxC[..., :, None] == doc_BxZxC[..., None, :]).astype(jnp.float32)
        scores_BxZxCxCxH = jnp.einsum("bzthk,bzshk->bztsh", q, k) * toeplitz_CxCxH[None, None]
        scores_BxZxCxCxH = scores_BxZxCxCxH * same_BxZxCxC[..., None]
        y_diag = jnp.einsum("bztsh,bzshp->bzthp", scores_BxZxCxCxH, v)

    # 2. chunk-final states per mode, from the tokens of the chunk's last document. The
    # einsums run on real and imaginary parts stacked along the mode axis (2M): real matmuls
    # measured ~2x faster than complex ones on CPU.
    M = log_da_HxM.shape[1]
    w_in_HxMxC = db_HxM[..., None] * jnp.exp(
        log_da_HxM[..., None] * (chunk - 1 - t_C)[None, None, :]
    )
    w_in_Hx2MxC = jnp.concatenate([jnp.real(w_in_HxMxC), jnp.imag(w_in_HxMxC)], axis=1)
    in_last_BxZxC = (doc_BxZxC == doc_BxZxC[..., -1:]).astype(jnp.float32)
    k_last = k * in_last_BxZxC[..., None, None]
    states = jnp.einsum("hms,bzshk,bzshp->bzhmkp", w_in_Hx2MxC, k_last, v)
    states_BxZxHxMxKxP = jax.lax.complex(states[:, :, :, :M], states[:, :, :, M:])

    # 3. inter-chunk recurrence: the entering state survives a chunk only if no reset is in it
    doc_before_BxZ = jnp.pad(doc_BxZxC[:, :-1, -1], ((0, 0), (1, 0)))
    carry_BxZ = (doc_BxZxC[:, :, -1] == doc_before_BxZ).astype(jnp.float32)
    decay_BxZxHxM = jnp.exp(log_da_HxM * chunk)[None, None] * carry_BxZ[:, :, None, None]
    if h0_BxHxMxKxP is None:
        h_all = _scan_chunks(decay_BxZxHxM, states_BxZxHxMxKxP)
        prev = jnp.pad(h_all[:, :-1], ((0, 0), (1, 0)) + ((0, 0),) * 4)  # entering chunk z
    else:
        ones_Bx1xHxM = jnp.ones((B, 1, *log_da_HxM.shape), decay_BxZxHxM.dtype)
        h_all = _scan_chunks(
            jnp.concatenate([ones_Bx1xHxM, decay_BxZxHxM], axis=1),
            jnp.concatenate([h0_BxHxMxKxP.astype(jnp.complex64)[:, None], states_BxZxHxMxKxP], 1),
        )
        prev, h_all = h_all[:, :-1], h_all[:, 1:]
    prev_BxZxHx2MxKxP = jnp.concatenate([jnp.real(prev), jnp.imag(prev)], axis=3)

    # 4. state-to-output, for tokens still in the document that the entering state belongs to:
    # 2 Re(w h) = 2 (Re w Re h - Im w Im h)
    w_out_HxMxC = c_HxM[..., None] * jnp.exp(log_da_HxM[..., None] * (t_C + 1)[None, None, :])
    w_out_Hx2MxC = jnp.concatenate([jnp.real(w_out_HxMxC), -jnp.imag(w_out_HxMxC)], axis=1)
    y_off = 2.0 * jnp.einsum("bzthk,hmt,bzhmkp->bzthp", q, w_out_Hx2MxC, prev_BxZxHx2MxKxP)
    live_BxZxC = (doc_BxZxC == doc_before_BxZ[:, :, None]).astype(jnp.float32)
    h_final = h_all[:, -1]
    if pad:  # the last chunk's state sits at its padded end: take it at the last real token
        r = chunk - pad
        w_HxMxC = db_HxM[..., None] * jnp.exp(
            log_da_HxM[..., None] * jnp.maximum(r - 1 - t_C, 0)[None, None, :]
        )
        w_Hx2MxC = jnp.where(
            (t_C < r)[None, None, :], jnp.concatenate([jnp.real(w_HxMxC), jnp.imag(w_HxMxC)], 1), 0
        )
        last = jnp.einsum("hms,bshk,bshp->bhmkp", w_Hx2MxC, k_last[:, -1], v[:, -1])
        entering = prev[:, -1] * carry_BxZ[:, -1, None, None, None, None]
        decay_1xHxMx1x1 = jnp.exp(log_da_HxM * r)[None, :, :, None, None]
        h_final = entering * decay_1xHxMx1x1 + jax.lax.complex(last[:, :, :M], last[:, :, M:])
    return _unchunked(y_diag + y_off * live_BxZxC[..., None, None], L), h_final


def lti_step(
    q_BxTxHxK: jax.Array,
    k_BxTxHxK: jax.Array,
    v_BxTxHxP: jax.Array,
    log_da_HxM: jax.Array,
    db_HxM: jax.Array,
    c_HxM: jax.Array,
    h_BxHxMxKxP: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The complex diagonal recurrence one token at a time; returns (y_BxTxHxP, new state)."""
    da_1xHxMx1x1 = jnp.exp(log_da_HxM)[None, :, :, None, None]
    db_1xHxMx1x1 = db_HxM[None, :, :, None, None]

    def one(h, inputs):
        q_BxHxK, k_BxHxK, v_BxHxP = inputs
        kv_BxHx1xKxP = (k_BxHxK[..., :, None] * v_BxHxP[..., None, :])[:, :, None]
        h = da_1xHxMx1x1 * h + db_1xHxMx1x1 * kv_BxHx1xKxP
        y_BxHxP = 2.0 * jnp.real(jnp.einsum("bhk,hm,bhmkp->bhp", q_BxHxK, c_HxM, h))
        return h, y_BxHxP

    inputs = tuple(jnp.moveaxis(a, 1, 0) for a in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxP))
    h0 = h_BxHxMxKxP.astype(jnp.complex64)
    h_BxHxMxKxP, y_TxBxHxP = jax.lax.scan(one, h0, inputs)
    return jnp.moveaxis(y_TxBxHxP, 0, 1), h_BxHxMxKxP
