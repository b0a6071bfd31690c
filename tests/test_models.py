"""Model-family tests: shapes, axes, causality, segment isolation, decode == forward, options.

Every family in `lmtrain.models.FAMILIES` runs the shared tests; transformer options run as
extra cases. Compiled functions are cached per case so each shape compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled_call
from flax import nnx

from lmtrain import models
from lmtrain.config import ConfigError
from lmtrain.models import layers

VOCAB, L, PROMPT = 61, 16, 5
TINY = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4)
TRANSFORMER_OPTIONS = {
    "gqa": dict(n_kv_heads=2),
    "tied": dict(tie_embeddings=True),
    "relu2": dict(activation="relu2"),
    "qkv_conv3": dict(qkv_conv=3),
    # Speedrun options; init_std 0.5 makes the logits large enough for the cap to bite.
    "qknorm-softcap": dict(qk_norm=True, logit_softcap=2.0, init_std=0.5),
}


FAMILY_DEFAULTS = {"hybrid": dict(pattern="MA")}  # fields a family needs beyond TINY


def tiny_config(name: str, **overrides):
    """A small fp32 config of family `name`."""
    fields = {**TINY, **FAMILY_DEFAULTS.get(name, {}), **overrides}
    return models.family(name).Config(name=name, **fields)


CASES = {name: tiny_config(name) for name in models.FAMILIES}
CASES.update(
    {f"transformer-{k}": tiny_config("transformer", **v) for k, v in TRANSFORMER_OPTIONS.items()}
)
# Every other layer kind once, in a 4-layer hybrid: H3, GLA, sliding window, S4D.
CASES["hybrid-HGWS"] = tiny_config(
    "hybrid", pattern="HGWS", n_layers=4, linear=models.hybrid.LinearSection(window=4)
)
# Zoology's MQAR layout: BaseConv block then BASED, no MLPs.
CASES["based-zoology"] = tiny_config(
    "based", pattern="CB", conv_form="base", block_mlp=False, n_heads=1
)


class Harness:
    """A built model plus jitted pure functions (split/merge) shared by the tests of one case."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.model = models.build(cfg, nnx.Rngs(0))
        self.graphdef, self.state = nnx.split(self.model)
        merge = functools.partial(nnx.merge, self.graphdef)
        self.embed = jax.jit(lambda s, t: merge(s).token_embed(t))

        def forward(s, x_BxLxD, seg=None, pos=None):  # from embeddings, to take their gradient
            model = merge(s)
            return model.logits(model.hidden(x_BxLxD, seg, pos)[0])

        self.forward = jax.jit(forward)
        self.call = jax.jit(lambda s, tok: merge(s)(tok))
        self.decode = jax.jit(lambda s, t, c: merge(s).decode(t, c))

        def position_mix(s, x_1xLxD, seg, w_V):
            # One scalar per position: a random projection of that position's logits.
            logits = forward(s, x_1xLxD, seg)[0]
            return jnp.einsum("lv,v->l", logits, w_V)

        self.jacobian = jax.jit(jax.jacrev(position_mix, argnums=1))

    def dependence(self, tokens_1xL, segment_ids_1xL=None) -> np.ndarray:
        """dep[t, s] = sum |d out_t / d x_s|: how much position t's logits use embedding s."""
        x = self.embed(self.state, tokens_1xL)
        w_V = jax.random.normal(jax.random.key(1), (self.cfg.vocab_size,))
        jac_LxLxD = self.jacobian(self.state, x, segment_ids_1xL, w_V)[:, 0]
        return np.abs(np.asarray(jac_LxLxD)).sum(-1)


@functools.cache
def harness(case: str) -> Harness:
    return Harness(CASES[case])


def tokens(batch: int, length: int, seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, VOCAB, dtype=jnp.int32)


def params_of(model) -> list[tuple[tuple, nnx.Param]]:
    return [(p, v) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)]


# ------------------------------------------------------------------------------ shared tests


@pytest.mark.parametrize("case", sorted(CASES))
def test_shapes_and_dtype(case):
    h = harness(case)
    tok = tokens(2, L)
    logits = h.call(h.state, tok)
    assert logits.shape == (2, L, VOCAB) and logits.dtype == jnp.float32
    assert h.model.token_embed(tok).shape == (2, L, h.cfg.d_model)
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_param_has_logical_axes(case):
    cfg = CASES[case]
    abstract = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(0)))
    found = params_of(abstract)
    assert found
    for path, v in found:
        axes = v.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == v.ndim, (path, axes, v.shape)
        assert all(a is None or a in layers.AXIS_NAMES for a in axes), (path, axes)
        assert v.dtype == jnp.float32, path


@pytest.mark.parametrize("case", sorted(CASES))
def test_causality(case):
    dep_LxL = harness(case).dependence(tokens(1, L))
    assert (np.triu(dep_LxL, k=1) == 0).all(), "a position sees a later one"
    for t in range(1, L):  # and the test is not vacuous: earlier positions do matter
        assert dep_LxL[t, :t].max() > 0, t


@pytest.mark.parametrize("case", sorted(CASES))
def test_segment_isolation(case):
    h = harness(case)
    n1 = 6
    seg_1xL = jnp.array([[1] * n1 + [2] * (L - n1)], jnp.int32)
    dep_LxL = h.dependence(tokens(1, L), seg_1xL)
    same_LxL = np.asarray(seg_1xL[0, :, None] == seg_1xL[0, None, :])
    assert (dep_LxL[~same_LxL] == 0).all(), "a position sees another segment"
    assert dep_LxL[n1 + 3, n1 : n1 + 3].max() > 0

    # Segment 2 packed behind segment 1 == segment 2 run alone (positions restart at 0).
    tok = tokens(1, L, seed=3)
    x = h.embed(h.state, tok)
    pos_1xL = jnp.array([list(range(n1)) + list(range(L - n1))], jnp.int32)
    packed = h.forward(h.state, x, seg_1xL, pos_1xL)[:, n1:]
    alone = h.forward(h.state, x[:, n1:], None, None)
    np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5)
    # Without segment ids the two sides must differ, or this comparison proves nothing.
    leaky = h.forward(h.state, x, None, pos_1xL)[:, n1:]
    assert np.abs(np.asarray(leaky - alone)).max() > 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_matches_forward(case):
    h = harness(case)
    tok = tokens(2, L, seed=5)
    full = h.forward(h.state, h.embed(h.state, tok), None, None)

    cache = h.model.init_state(2, L)
    prefill, cache = h.decode(h.state, tok[:, :PROMPT], cache)
    steps = [prefill]
    for t in range(PROMPT, L):
        logits, cache = h.decode(h.state, tok[:, t : t + 1], cache)
        steps.append(logits)
    assert int(cache["index"]) == L
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)

    # A prompt decoded one token at a time == the same prompt prefilled in one call.
    one_by_one = h.model.init_state(2, L)
    for t in range(PROMPT):
        logits, one_by_one = h.decode(h.state, tok[:, t : t + 1], one_by_one)
    np.testing.assert_allclose(logits[:, 0], prefill[:, -1], atol=1e-5, rtol=1e-5)
    _, cache_prefill = h.decode(h.state, tok[:, :PROMPT], h.model.init_state(2, L))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
        one_by_one,
        cache_prefill,
    )


@pytest.mark.parametrize("case", sorted(c for c in CASES if not c.startswith("transformer-")))
def test_greedy_generation_matches_repeated_parallel_passes(case):
    """`lmtrain generate` at temperature 0 (prefill, then one decode step per token, with the
    KV cache or recurrent state) == argmax of full parallel forward passes over the text so far.
    The parallel side runs on a fixed-length buffer padded after the text (valid because the
    models are causal, which test_causality checks), so it compiles once."""
    from types import SimpleNamespace

    from lmtrain.generate import sample_tokens

    h = harness(case)
    prompt = [int(t) for t in tokens(1, PROMPT, seed=11)[0]]
    run = SimpleNamespace(graphdef=h.graphdef, tokenizer=SimpleNamespace(eod_id=-1))
    got = sample_tokens(run, h.state, prompt, max_new_tokens=L - PROMPT, temperature=0.0)
    text = list(prompt)
    for _ in range(L - PROMPT):
        buf = jnp.asarray([text + [0] * (L - len(text))], jnp.int32)
        text.append(int(jnp.argmax(h.call(h.state, buf)[0, len(text) - 1])))
    assert got == text[PROMPT:]


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_floats_counts_the_decode_cache(case):
    """Config.state_floats (the recall-vs-memory x axis) == floats in init_state's arrays
    (segment ids and cache slots are bookkeeping, not state)."""
    h = harness(case)
    shapes = jax.eval_shape(lambda: h.model.init_state(3, L))["layers"]
    floats = sum(
        x.size * (2 if jnp.issubdtype(x.dtype, jnp.complexfloating) else 1)
        for x in jax.tree.leaves(shapes)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    )
    assert floats == 3 * h.cfg.state_floats(L)


# ------------------------------------------------------------------------------ transformer options


def _loss_and_grads(cfg, tok):
    model = models.build(cfg, nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params, tok):
        logits = nnx.merge(graphdef, params)(tok[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1).mean()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss_fn))(params, tok))
    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params, tok)
    return loss, grads, jaxpr


def test_remat_same_loss_and_grads():
    cfg = CASES["transformer-qkv_conv3"]
    tok = tokens(2, L + 1)
    loss, grads, jaxpr = _loss_and_grads(cfg, tok)
    loss_r, grads_r, jaxpr_r = _loss_and_grads(dataclasses.replace(cfg, remat=True), tok)
    assert "remat" in jaxpr_r and "remat" not in jaxpr  # the two sides really differ
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r, grads
    )


def test_bfloat16_close_to_float32():
    cfg = CASES["transformer"]
    tok = tokens(2, L + 1)
    loss, _, _ = _loss_and_grads(cfg, tok)
    loss16, grads16, _ = _loss_and_grads(dataclasses.replace(cfg, dtype="bfloat16"), tok)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))  # params stay fp32
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads16))
    assert loss16 != loss  # bf16 compute was really used
    np.testing.assert_allclose(loss16, loss, rtol=2e-2)
    h16 = Harness(dataclasses.replace(cfg, dtype="bfloat16"))
    h32 = harness("transformer")
    logits16, logits = h16.call(h16.state, tok), h32.call(h32.state, tok)
    assert logits16.dtype == jnp.float32
    assert np.abs(np.asarray(logits16 - logits)).max() < 0.05 * np.abs(np.asarray(logits)).max()


def test_bad_config_is_a_config_error():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        models.build(tiny_config("transformer", n_kv_heads=3), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="activation"):
        models.build(tiny_config("transformer", activation="gelu"), nnx.Rngs(0))


def test_flops_per_token_hand_count():
    cfg = tiny_config("transformer", n_kv_heads=2)  # D=32, H=4, G=2, K=8, 2 layers, V=61
    D, K, G, V, n_layers, seq = 32, 8, 2, 61, 2, 16
    F = 128  # swiglu: round(2/3 * 4 * 32) = 85 -> next multiple of 64
    assert cfg.ffn_width == F
    qo = 2 * D * D  # Q (32x32) and O (32x32)
    kv = 2 * D * G * K  # K and V (32x16 each)
    mlp = 3 * D * F  # gate, up, down
    head = D * V
    matmul = n_layers * (qo + kv + mlp) + head  # 2 * (2048 + 1024 + 12288) + 1952 = 32672
    assert matmul == 32672
    hand = 6 * 32672 + 6 * n_layers * seq * D  # 196032 + 6144
    assert cfg.flops_per_token(seq) == hand == 202176

    conv = dataclasses.replace(cfg, qkv_conv=3)  # 3 taps on Q (32) + K (16) + V (16) channels
    assert conv.flops_per_token(seq) == hand + 6 * n_layers * 3 * (32 + 16 + 16)

    relu2 = dataclasses.replace(cfg, activation="relu2")  # F = 4 * 32, two matrices
    assert relu2.flops_per_token(seq) == 6 * (n_layers * (qo + kv + 2 * D * 128) + head) + 6144


@pytest.mark.parametrize(
    "case",
    ["transformer", "transformer-tied", "transformer-qkv_conv3", "transformer-qknorm-softcap"],
)
def test_param_count_matches_formula(case):
    cfg = CASES[case]
    n_params = sum(v.size for _, v in params_of(harness(case).model))
    embed = cfg.vocab_size * cfg.d_model
    norms = (2 * cfg.n_layers + 1) * cfg.d_model + 2 * cfg.n_layers * cfg.head_dim * cfg.qk_norm
    head_shared = embed if cfg.tie_embeddings else 0  # a tied head is the embedding table
    expected = cfg.matmul_params() - head_shared + embed + norms + cfg.conv_params()
    assert n_params == expected


# ------------------------------------------------------------------------------ layers


def test_short_conv_matches_reference_and_step():
    rngs = nnx.Rngs(0)
    conv = layers.ShortConv(5, 3, "heads", rngs=rngs, std=0.5)
    x_BxLxC = jax.random.normal(jax.random.key(2), (2, 9, 5))
    seg_BxL = jnp.array([[0, 0, 0, 0, 1, 1, 1, 2, 2], [3] * 9], jnp.int32)
    k_WxC, x, seg = np.asarray(conv.kernel[...]), np.asarray(x_BxLxC), np.asarray(seg_BxL)
    ref = np.zeros_like(x)
    for b, t, j in np.ndindex(2, 9, 3):
        if t - j >= 0 and seg[b, t - j] == seg[b, t]:
            ref[b, t] += k_WxC[j] * x[b, t - j]
    np.testing.assert_allclose(conv(x_BxLxC, seg_BxL)[0], ref, atol=1e-6)
    # Step form over row 1 (one segment): a chunk of 4, then 1 at a time.
    y, state = conv.step(x_BxLxC[1:, :4], conv.init_state(1))
    ys = [y]
    for t in range(4, 9):
        y, state = conv.step(x_BxLxC[1:, t : t + 1], state)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), ref[1:], atol=1e-6)


def test_rope_depends_only_on_relative_position():
    q_1x1x1xK, k_1x1x1xK = jax.random.normal(jax.random.key(0), (2, 1, 1, 1, 8))

    def score(m: int, n: int) -> float:
        rq = layers.apply_rope(q_1x1x1xK, jnp.full((1, 1), m, jnp.int32), 10000.0)
        rk = layers.apply_rope(k_1x1x1xK, jnp.full((1, 1), n, jnp.int32), 10000.0)
        return float(jnp.sum(rq * rk))

    assert math.isclose(score(7, 3), score(104, 100), rel_tol=1e-4)
    assert not math.isclose(score(7, 3), score(3, 7), rel_tol=1e-3)


# ------------------------------------------------------------------------------ speedrun options


def _logits(cfg, tok, edit=None):
    """Float32 logits of a fresh model of `cfg` (seed 0), after `edit(model)` if given."""
    model = models.build(cfg, nnx.Rngs(0))
    if edit is not None:
        edit(model)
    return np.asarray(compiled_call(model, tok))


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    def scale_qk(model):
        for block in model.blocks:
            block.attn.q.kernel[...] = 7.0 * block.attn.q.kernel[...]
            block.attn.k.kernel[...] = 0.3 * block.attn.k.kernel[...]

    tok = tokens(2, L)
    plain = tiny_config("transformer", init_std=0.3)
    # Without QK-norm the scale of q and k sets the attention's sharpness: logits move.
    assert np.abs(_logits(plain, tok, scale_qk) - _logits(plain, tok)).max() > 0.1
    normed = dataclasses.replace(plain, qk_norm=True)
    np.testing.assert_allclose(_logits(normed, tok, scale_qk), _logits(normed, tok), atol=2e-4)


def test_logit_softcap_is_a_tanh_of_the_uncapped_logits():
    tok = tokens(2, L)
    plain = tiny_config("transformer", init_std=0.5)
    raw = _logits(plain, tok)
    assert np.abs(raw).max() > 4.0  # large enough that a cap of 2 changes them
    capped = _logits(dataclasses.replace(plain, logit_softcap=2.0), tok)  # same params
    assert np.abs(capped).max() < 2.0
    np.testing.assert_allclose(capped, 2.0 * np.tanh(raw / 2.0), atol=1e-5)
    with pytest.raises(ConfigError, match="model.logit_softcap"):
        tiny_config("transformer", logit_softcap=-1.0).validate()


OUTPUTS = ("o", "out", "down", "head")  # residual-branch output matrices and the head


@pytest.mark.parametrize("name", ["transformer", "mamba2", "gla"])
def test_zero_init_starts_every_residual_output_and_the_head_at_zero(name):
    cfg = tiny_config(name, zero_init=True)
    model = models.build(cfg, nnx.Rngs(0))

    def zeros(m):
        return {p for p, v in params_of(m) if not np.asarray(v[...]).any()}

    newly = zeros(model) - zeros(models.build(tiny_config(name), nnx.Rngs(0)))
    outputs = {p for p, _ in params_of(model) if p[-2:] in {(n, "kernel") for n in OUTPUTS}}
    assert newly == outputs and ("head", "kernel") in outputs and len(outputs) > cfg.n_layers
    # A fresh model predicts the uniform distribution; gradients first reach the head only,
    # and after one step on the head they reach the blocks.
    tok = tokens(2, L + 1)
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(params):
        logp = jax.nn.log_softmax(nnx.merge(graphdef, params)(tok[:, :-1]), axis=-1)
        return -jnp.take_along_axis(logp, tok[:, 1:, None], axis=-1).mean()

    loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params)
    np.testing.assert_allclose(loss, math.log(VOCAB), rtol=1e-6)
    moved = lambda g: {p for p, v in nnx.to_flat_state(g) if np.asarray(v[...]).any()}
    assert moved(grads) == {("head", "kernel")}
    params["head"]["kernel"][...] = -0.1 * grads["head"]["kernel"][...]
    assert moved(jax.jit(jax.grad(loss_fn))(params)) >= outputs  # now every output matrix learns
