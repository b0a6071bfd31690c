"""Linear-attention family: chunked == naive == recurrent per mixer, resets, decays, costs.

The shared model tests (tests/test_models.py) cover shapes, causality, segment isolation and
decode == forward for the four recipes; these tests check each mixer's math against numpy
oracles written from the papers' recurrences.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled_call
from flax import nnx

from lmtrain import models
from lmtrain.config import ConfigError
from lmtrain.models import linear_attention as la
from lmtrain.models import linear_ops as ops

B, L, H, P, E = 2, 12, 2, 3, 4
# Row 0: documents of 5, 4, 3 tokens (starts at 5 and 9, inside chunks of 3, 4 and 8);
# row 1: one document whose id repeats a row-0 id (ids only matter where they change).
SEG_BxL = np.array([[7] * 5 + [8] * 4 + [7] * 3, [3] * L], np.int32)
TINY = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4)


def rand(*shape, seed=0, scale=1.0):
    return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def log_decays(kind: str):
    """None (no decay), per-head scalar (B, L, H) or diagonal (B, L, H, P) log decays < 0."""
    if kind == "none":
        return None
    shape = (B, L, H) if kind == "scalar" else (B, L, H, P)
    return np.log(np.random.default_rng(9).uniform(0.5, 0.99, shape)).astype(np.float32)


def naive_recurrent(q, k, v, log_a, seg):
    """S_t = diag(a_t) S_{t-1} + k_t^T v_t, S zeroed at document starts; o_t = q_t S_t."""
    o, final = np.zeros(q.shape[:3] + (v.shape[-1],)), np.zeros((B, H, P, v.shape[-1]))
    for b in range(B):
        S = np.zeros((H, P, v.shape[-1]))
        for t in range(L):
            a = np.ones((H, 1)) if log_a is None else np.exp(log_a[b, t]).reshape(H, -1)
            keep = t > 0 and seg[b, t] == seg[b, t - 1]
            S = a[..., None] * S * keep + k[b, t][:, :, None] * v[b, t][:, None, :]
            o[b, t] = np.einsum("hp,hpe->he", q[b, t], S)
        final[b] = S
    return o, final


def naive_quadratic(q, k, v, log_a, seg):
    """o_i = sum_{j <= i, same doc} (q_i * prod_{j<s<=i} a_s) . k_j v_j, as an L x L sum."""
    o = np.zeros(q.shape[:3] + (v.shape[-1],))
    la_ = np.zeros((B, L, H, 1)) if log_a is None else log_a.reshape(B, L, H, -1)
    for b, i, j in np.ndindex(B, L, L):
        if j <= i and len(set(seg[b, j : i + 1])) == 1:
            dec = np.exp(la_[b, j + 1 : i + 1].sum(0))  # (H, P or 1)
            o[b, i] += np.einsum("hp,hp,he->he", q[b, i], k[b, j] * dec, v[b, j])
    return o


# ------------------------------------------------------------------------------ ops


@pytest.mark.parametrize("decay", ["none", "scalar", "diag"])
def test_chunked_equals_naive_recurrent_and_quadratic(decay):
    q, k, v = rand(B, L, H, P, seed=1), rand(B, L, H, P, seed=2), rand(B, L, H, E, seed=3)
    log_a = log_decays(decay)
    want, want_final = naive_recurrent(q, k, v, log_a, SEG_BxL)
    np.testing.assert_allclose(naive_quadratic(q, k, v, log_a, SEG_BxL), want, atol=1e-5)
    doc = ops.doc_index(jnp.asarray(SEG_BxL), (B, L))
    fn = jax.jit(ops.chunked_linear_attention, static_argnums=5)
    for chunk in (1, 4, 5, 32):  # 4: starts inside chunks; 5 does not divide L; 32 > L
        o, final = fn(q, k, v, log_a, doc, chunk)
        np.testing.assert_allclose(o, want, atol=1e-5, rtol=1e-5, err_msg=f"chunk {chunk}")
        np.testing.assert_allclose(final, want_final, atol=1e-5, rtol=1e-5)
    if log_a is not None:  # the decay really matters (dropping it is caught above)
        no_decay, _ = fn(q, k, v, None, doc, 4)
        assert np.abs(np.asarray(no_decay) - want).max() > 0.1
    # Without the document resets the answer differs, so the resets above were exercised.
    leaky, _ = fn(q, k, v, log_a, ops.doc_index(None, (B, L)), 4)
    assert np.abs(np.asarray(leaky[0]) - want[0]).max() > 0.1


@pytest.mark.parametrize("decay", ["scalar", "diag"])
def test_recurrent_continues_from_state(decay):
    q, k, v = rand(B, L, H, P, seed=4), rand(B, L, H, P, seed=5), rand(B, L, H, E, seed=6)
    log_a = log_decays(decay)
    want, want_final = ops.chunked_linear_attention(q, k, v, log_a, ops.doc_index(None, (B, L)), 4)
    s0 = jnp.zeros((B, H, P, E))
    rec = jax.jit(ops.recurrent_linear_attention)
    o1, s1 = rec(q[:, :6], k[:, :6], v[:, :6], log_a[:, :6], s0)
    o2, s2 = rec(q[:, 6:], k[:, 6:], v[:, 6:], log_a[:, 6:], s1)
    np.testing.assert_allclose(np.concatenate([o1, o2], 1), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(s2, want_final, atol=1e-5, rtol=1e-5)


def test_taylor_feature_map():
    F = 5
    q, k = rand(7, F, seed=7), rand(7, F, seed=8)
    phi_q, phi_k = ops.taylor_feature_map(q), ops.taylor_feature_map(k)
    assert phi_q.shape == (7, 1 + F + F * F)
    s = (q * k).sum(-1) / math.sqrt(F)  # q, k scaled by F^(-1/4) each
    np.testing.assert_allclose((phi_q * phi_k).sum(-1), 1 + s + s**2 / 2, rtol=1e-5, atol=1e-6)


def naive_window(q, k, v, seg, window):
    """Softmax over keys j with i - window < j <= i in i's document (numpy loops)."""
    o = np.zeros_like(q)
    for b, i in np.ndindex(B, L):
        js = [
            j
            for j in range(max(0, i - window + 1), i + 1)
            if seg[b, j : i + 1].min() == seg[b, j : i + 1].max()
        ]
        s = np.einsum("hk,jhk->hj", q[b, i], k[b, js]) / math.sqrt(q.shape[-1])
        p = np.exp(s - s.max(-1, keepdims=True))
        o[b, i] = np.einsum("hj,jhk->hk", p / p.sum(-1, keepdims=True), v[b, js])
    return o


@pytest.mark.parametrize("window", [1, 5, 40])
def test_sliding_window_blocked_and_after_a_state(window):
    q, k, v = (rand(B, L, H, 4, seed=s) for s in (10, 11, 12))
    seg = np.array([[1] * 4 + [2] * 8, [5] * L], np.int32)
    doc = ops.doc_index(jnp.asarray(seg), (B, L))
    o = jax.jit(ops.sliding_window_attention, static_argnums=4)(q, k, v, doc, window)
    want = naive_window(q, k, v, seg, window)
    np.testing.assert_allclose(o, want, atol=1e-5, rtol=1e-5)
    # The last T queries after all L keys: dense (T <= window) or blocked (T > window).
    after = jax.jit(ops.sliding_window_after, static_argnums=4)
    for p in (L - 1, 7, 2):
        o = after(q[:, p:], k, v, doc, window)
        np.testing.assert_allclose(o, want[:, p:], atol=1e-5, rtol=1e-5, err_msg=str(p))


# ------------------------------------------------------------------------------ mixers


def mixer_config(**kw):
    """A tiny fp32 config with short chunks and window, so every form crosses a boundary."""
    return la.Config(**{"name": "based", **TINY, "chunk": 4, "gla_chunk": 3, "window": 5, **kw})


@pytest.mark.parametrize("kind", sorted(la.MIXERS))
def test_mixer_step_equals_training_form_and_resets(kind):
    cfg = mixer_config()
    mixer = la.MIXERS[kind](cfg, layer=1, rngs=nnx.Rngs(0))
    x = jnp.asarray(rand(B, L, cfg.d_model, seed=13))
    pos = jnp.broadcast_to(jnp.arange(L)[None], (B, L))
    train = jax.jit(lambda x, seg, pos: mixer(x, seg, pos)[0])
    step = jax.jit(lambda x, state, pos: mixer(x, None, pos, state))
    one_doc = jnp.zeros((B, L), jnp.int32)
    full = train(x, one_doc, pos)
    state, outs, index = mixer.init_state(B, L), [], 0
    for t in (6, 1, 1, 1, 1, 1, 1):  # a prefill longer than the window, then single tokens
        y, state = step(x[:, index : index + t], state, pos[:, index : index + t])
        outs.append(y)
        index += t
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    # Packed: the second document (starting mid-chunk at 5) == that document alone. Same
    # shapes throughout (the lone document is followed by tokens it cannot see): one compile.
    seg = jnp.asarray([[0] * 5 + [1] * 7] * B)
    pos_packed = jnp.asarray([list(range(5)) + list(range(7))] * B)
    packed = train(x, seg, pos_packed)[:, 5:]
    alone = train(jnp.roll(x, -5, axis=1), one_doc, pos)[:, :7]
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5)
    # and the reset did something
    leaky = train(x, one_doc, pos_packed)[:, 5:]
    assert np.abs(np.asarray(leaky - alone)).max() > 1e-2 * np.abs(np.asarray(alone)).max()


@pytest.mark.parametrize(
    ("heads", "released"),
    [
        # ALiBi's released get_slopes (TransNormerLLM's _build_slope_tensor), written out
        (6, [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]),
        (12, [*(2.0**-k for k in range(1, 9)), 2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]),
        (8, [2.0**-k for k in range(1, 9)]),
    ],
)
def test_lightning_decays_use_alibis_released_slopes(heads, released):
    np.testing.assert_allclose(la.alibi_slopes(heads), released, rtol=1e-12)
    cfg = mixer_config(n_heads=heads, d_model=heads * 8, n_layers=4)
    mixer = la.MIXERS["lightning"](cfg, layer=1, rngs=nnx.Rngs(0))
    depth = 1 - 1 / 3 + 1e-5
    np.testing.assert_allclose(mixer.log_lambda, -np.array(released) * depth, rtol=1e-12)
    # the one-series rule 2^(-8(h+1)/H) agrees only when H is a power of two
    one_series = [2.0 ** (-8 * (h + 1) / heads) for h in range(heads)]
    assert np.allclose(one_series, released) == (heads & (heads - 1) == 0)


def test_decays_follow_the_papers_and_matter():
    cfg = mixer_config(n_layers=4)
    x = jnp.asarray(rand(1, L, cfg.d_model, seed=14))
    pos = jnp.arange(L)[None]
    h = np.arange(cfg.n_heads)
    chunked = jax.jit(ops.chunked_linear_attention, static_argnums=5)
    for kind, layer, want in [
        ("retention", 2, 1 - 2.0 ** (-5 - h)),
        # TransNormerLLM's code: ALiBi slopes times 1 - l / (L - 1) (+ 1e-5), here l=1, L=4.
        ("lightning", 1, np.exp(-(2.0 ** (-8 * (h + 1) / 4)) * (1 - 1 / 3 + 1e-5))),
    ]:
        mixer = la.MIXERS[kind](cfg, layer=layer, rngs=nnx.Rngs(0))
        q, k, v, log_a = mixer._qkv(x, pos)
        np.testing.assert_allclose(np.exp(log_a[0, 3]), want, rtol=1e-6)
        doc = ops.doc_index(None, (1, L))
        with_decay, _ = chunked(q, k, v, log_a, doc, 4)
        without, _ = chunked(q, k, v, None, doc, 4)
        assert np.abs(np.asarray(with_decay - without)).max() > 1e-3 * np.abs(without).max()
    gla = la.MIXERS["gla"](cfg, rngs=nnx.Rngs(0))
    gla.gate_bias[...] = jnp.full(gla.gate_bias.shape, -3.0)
    _, _, _, log_alpha = gla._qkv(x, pos)
    assert log_alpha.shape == (1, L, cfg.n_heads, gla.P) and float(log_alpha.max()) < 0
    logits = x @ gla.gate_down.kernel[...] @ gla.gate_up.kernel[...] - 3.0
    want = jax.nn.log_sigmoid(logits).reshape(log_alpha.shape) / cfg.gla_tau
    np.testing.assert_allclose(log_alpha, want, rtol=1e-5, atol=1e-7)
    # The data-dependent decay reaches the output: a different bias, a different answer.
    y, _ = compiled_call(gla, x, None, pos)
    gla.gate_bias[...] = jnp.full(gla.gate_bias.shape, 3.0)
    assert np.abs(np.asarray(compiled_call(gla, x, None, pos)[0] - y)).max() > 1e-4


# ------------------------------------------------------------------------------ models


def test_all_mixers_in_one_model_decode_matches_forward():
    cfg = mixer_config(pattern="BRLGWC", n_layers=6, window=4)
    model = models.build(cfg, nnx.Rngs(0))
    assert [type(b.mixer).__name__ for b in model.blocks] == [
        "BasedAttention", "Retention", "Lightning", "GatedLinearAttention",
        "SlidingWindowAttention", "GatedConv",
    ]  # fmt: skip
    tok = jax.random.randint(jax.random.key(0), (B, L), 0, 61)
    full = jax.jit(lambda t: model(t))(tok)
    decode = jax.jit(lambda t, c: model.decode(t, c))
    logits, cache = decode(tok[:, :6], model.init_state(B, L))  # prefill longer than the window
    outs = [logits]
    for t in range(6, L):
        logits, cache = decode(tok[:, t : t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(np.concatenate(outs, 1), full, atol=1e-5, rtol=1e-5)
    floats = [x for x in jax.tree.leaves(cache["layers"]) if jnp.issubdtype(x.dtype, jnp.inexact)]
    sizes = sum(x.size for x in floats) // B
    assert sizes == cfg.state_floats()


def test_state_size_hand_count():
    D, K = 32, 8  # 4 heads, BASED feature dim 16: 1 + 16 + 256 = 273 features
    assert mixer_config(name="retnet").state_floats() == 2 * 4 * K * K == 512
    assert mixer_config(name="lightning").state_floats() == 512
    assert mixer_config(name="gla").state_floats() == 2 * 4 * (16 // 4) * K == 256
    # based at 2 layers = "CB": conv keeps 2 inputs; BASED keeps (1+f+f^2) x (K+1) per head.
    assert mixer_config().layer_kinds() == ("conv", "based")
    assert mixer_config().state_floats() == 2 * D + 4 * 273 * (K + 1) == 9892
    assert mixer_config(pattern="WW", window=64).state_floats() == 2 * 2 * 64 * D


def test_flops_per_token_hand_count():
    cfg = mixer_config(name="retnet", chunk=8)  # D=32, H=4, K=8, F=128, V=61, 2 layers
    matmul = 2 * (5 * 32 * 32 + 3 * 32 * 128) + 61 * 32
    assert cfg.matmul_params() == matmul == 36768
    mixer = 3 * 4 * (8 * (8 + 8) + 4 * 8 * 8)  # chunk 8 <= seq 16
    assert cfg.flops_per_token(16) == 6 * matmul + 2 * mixer
    # Sliding window with window >= seq_len costs what causal attention costs (6 D seq_len).
    swa = mixer_config(pattern="WW", window=64)
    assert swa.flops_per_token(16) == 6 * swa.matmul_params() + 2 * 6 * 32 * 16
    tf = models.family("transformer").Config(name="transformer", **TINY)
    assert swa.flops_per_token(16) == tf.flops_per_token(16)  # same matmuls, same mixer term
    # Counted matmul parameters == the parameters the model really holds, minus non-matmul ones.
    for name in ("based", "retnet", "lightning", "gla"):
        cfg = mixer_config(name=name)
        model = models.build(cfg, nnx.Rngs(0))
        params = nnx.state(model, nnx.Param)
        n_all = sum(p.size for p in jax.tree.leaves(params))
        n_other = sum(
            v.size
            for path, v in nnx.to_flat_state(params)
            if path[-1] in ("scale", "table", "gate_bias") or "conv" in path[-2:]
        )
        assert n_all - n_other == cfg.matmul_params(), name


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="model.pattern"):
        models.build(mixer_config(pattern="BX"), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.pattern"):
        models.build(mixer_config(pattern="B"), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="gla_expand_k"):
        models.build(mixer_config(name="gla", gla_expand_k=0.3), nnx.Rngs(0))


@pytest.mark.slow
def test_remat_and_bfloat16():
    cfg = mixer_config(pattern="G", n_layers=1)  # GLA: the most involved backward pass
    tok = jax.random.randint(jax.random.key(1), (B, L + 1), 0, 61)

    def loss_and_grads(cfg):
        graphdef, params = nnx.split(models.build(cfg, nnx.Rngs(0)), nnx.Param)

        def loss_fn(params):
            logits = nnx.merge(graphdef, params)(tok[:, :-1])
            logp = jax.nn.log_softmax(logits, -1)
            return -jnp.take_along_axis(logp, tok[:, 1:, None], -1).mean()

        return jax.jit(jax.value_and_grad(loss_fn))(params)

    loss, grads = loss_and_grads(cfg)
    loss_r, grads_r = loss_and_grads(dataclasses.replace(cfg, remat=True))
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r, grads
    )
    # bf16 compute (forward only, to keep this file fast): float32 logits, close to fp32.
    logits = jax.jit(lambda t: models.build(cfg, nnx.Rngs(0))(t))(tok)
    cfg16 = dataclasses.replace(cfg, dtype="bfloat16")
    logits16 = jax.jit(lambda t: models.build(cfg16, nnx.Rngs(0))(t))(tok)
    assert logits16.dtype == jnp.float32 and np.isfinite(np.asarray(logits16)).all()
    err = np.abs(np.asarray(logits16 - logits)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(logits)).max()


def test_base_conv_is_zoologys_baseconv_and_starts_with_random_taps():
    """conv_form="base": y = (conv(x) + b) * (x W + c) + x, a causal depthwise conv restarted at
    documents (numpy reference); taps and conv bias U(+-1/sqrt(W)) as PyTorch's Conv1d, where
    model.conv_init="identity" starts as the identity tap (no shift of the previous token)."""
    D, W, B, L = 8, 3, 2, 7
    cfg = la.Config(name="based", d_model=D, n_layers=2, n_heads=1, vocab_size=11, conv_width=W)
    base = la.GatedConv(dataclasses.replace(cfg, conv_form="base"), rngs=nnx.Rngs(0))
    kernel = np.asarray(base.conv.kernel[...])
    bound = 1 / math.sqrt(W)
    assert np.abs(kernel).max() <= bound and np.abs(kernel[1:]).mean() > 0.25 * bound
    ident = la.GatedConv(dataclasses.replace(cfg, conv_init="identity"), rngs=nnx.Rngs(0))
    taps = np.asarray(ident.conv.kernel[...])
    assert np.abs(taps[1:]).max() < 0.1 and np.abs(taps[0] - 1).max() < 0.1  # no shift yet
    x = np.random.default_rng(0).normal(size=(B, L, D)).astype(np.float32)
    seg = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 1]], np.int32)
    pos = np.zeros((B, L), np.int32)
    got = np.asarray(base(jnp.asarray(x), jnp.asarray(seg), jnp.asarray(pos))[0])
    conv = np.zeros_like(x)
    for b in range(B):
        for t in range(L):
            for j in range(W):
                if t - j >= 0 and seg[b, t - j] == seg[b, t]:
                    conv[b, t] += kernel[j] * x[b, t - j]
    w = np.asarray(base.gate.kernel[...])
    want = (conv + np.asarray(base.conv_bias[...])) * (x @ w + np.asarray(base.gate_bias[...]))
    np.testing.assert_allclose(got, want + x, rtol=1e-5, atol=1e-5)
    # One step at a time gives the training form (one document per row here).
    state, steps = base.init_state(B, L), []
    for t in range(L):
        y, state = base(jnp.asarray(x[:, t : t + 1]), None, jnp.asarray(pos[:, t : t + 1]), state)
        steps.append(np.asarray(y))
    one_doc = np.asarray(base(jnp.asarray(x), jnp.ones((B, L), jnp.int32), jnp.asarray(pos))[0])
    np.testing.assert_allclose(np.concatenate(steps, 1), one_doc, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="model.conv_form"):
        dataclasses.replace(cfg, conv_form="silu").validate()
