"""SSM family tests: chunked forms == naive recurrences (with resets), FFT == recurrence,
ZOH against the ODE, H3 step form and shift, multi-chunk model checks, FLOPs hand counts.

The shared tests in test_models.py also run s4d, h3 and mamba2 (shapes, axes, causality,
segment isolation, decode == forward) with a single chunk; the model tests here use several.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import compiled_call
from flax import nnx

from lmtrain import models
from lmtrain.config import ConfigError
from lmtrain.models import linear_attention, ssm, ssm_ops

RESETS = (5, 8, 13)  # on a chunk boundary for chunk 5 (5) and 4 (8), inside chunks otherwise
# Jitted once per shape: far fewer compiles than running the ops eagerly.
ssd_chunked = jax.jit(ssm_ops.ssd_chunked, static_argnums=6)
lti_chunked = jax.jit(lambda *a: ssm_ops.lti_chunked(*a)[0], static_argnums=7)  # outputs


def reset_mask(batch: int, length: int, at=RESETS) -> np.ndarray:
    """Resets at `at` in row 0 (plus position 0); row 1 (if any) is one document."""
    reset = np.zeros((batch, length), bool)
    reset[:, 0] = True
    reset[0, list(at)] = True
    return reset


# ------------------------------------------------------------------------------ references


def ssd_reference(x, dt, a, b, c, d, reset, h0=None):
    """Naive Mamba-2 recurrence in float64: h = exp(dt a) h + dt x b^T, y = h c + d x."""
    x, dt, b, c = (np.asarray(v, np.float64) for v in (x, dt, b, c))
    B, L, H, P = x.shape
    h = np.zeros((B, H, P, b.shape[-1])) if h0 is None else np.array(h0, np.float64)
    y = np.zeros_like(x)
    for t in range(L):
        keep = 1.0 - reset[:, t, None, None, None] if reset is not None else 1.0
        decay = np.exp(dt[:, t] * a[None, :])[:, :, None, None]
        h = keep * decay * h + (dt[:, t, :, None] * x[:, t])[..., None] * b[:, t, None, None, :]
        y[:, t] = np.einsum("bhpn,bn->bhp", h, c[:, t]) + d[None, :, None] * x[:, t]
    return y, h


def lti_reference(q, k, v, log_da, db, c, reset):
    """Naive complex diagonal recurrence: h_m = dA_m h_m + dB_m k v^T, y = 2 Re(q^T sum C_m h_m)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    da, db, c = (np.asarray(a, np.complex128) for a in (np.exp(log_da), db, c))
    B, L, H, K = q.shape
    h = np.zeros((B, H, da.shape[1], K, v.shape[-1]), np.complex128)
    y = np.zeros(v.shape)
    for t in range(L):
        if reset is not None:
            h = h * (1.0 - reset[:, t])[:, None, None, None, None]
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        h = da[None, :, :, None, None] * h + db[None, :, :, None, None] * kv[:, :, None]
        y[:, t] = 2 * np.real(np.einsum("bhk,hm,bhmkp->bhp", q[:, t], c, h))
    return y


def ssd_inputs(B=2, L=24, H=2, P=3, N=4, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(ks[0], (B, L, H, P))
    dt = jax.nn.softplus(jax.random.normal(ks[1], (B, L, H)) - 1.0)
    a = -jnp.exp(jax.random.normal(ks[2], (H,)))
    b, c = jax.random.normal(ks[3], (B, L, N)), jax.random.normal(ks[4], (B, L, N))
    d = jax.random.normal(ks[5], (H,))
    return x, dt, a, b, c, d


def diagonal_ssm(groups: int, state_size: int = 8, seed: int = 0):
    """Discretised (log dA, dB, C) of a fresh S4D-Lin DiagonalSSM; dt x 4.5 so that carried
    state (dB ~ dt) is large enough for the leak checks to see."""
    m = ssm_ops.DiagonalSSM(groups, state_size, "heads", rngs=nnx.Rngs(seed))
    m.log_dt[...] = m.log_dt[...] + 1.5
    return m.discretised()


# ------------------------------------------------------------------------------ Mamba-2 / SSD


@pytest.mark.parametrize("chunk", [4, 5, 7, 32])  # 5 and 7 do not divide L = 24
def test_ssd_chunked_matches_recurrence_with_resets(chunk):
    x, dt, a, b, c, d = ssd_inputs()
    reset = reset_mask(2, 24)
    y, _ = ssd_chunked(x, dt, a, b, c, jnp.array(reset), chunk)
    y = y + d[None, None, :, None] * x
    ref, _ = ssd_reference(x, dt, a, b, c, d, reset)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    # Dropping the resets changes the answer, so the comparison above really tests them.
    leaky, _ = ssd_reference(x, dt, a, b, c, d, None)
    assert np.abs(leaky[0, 5:] - ref[0, 5:]).max() > 1e-2
    np.testing.assert_allclose(leaky[1], ref[1])  # row 1 holds a single document


def test_ssd_initial_and_final_state_and_step():
    x, dt, a, b, c, d = ssd_inputs(seed=1)
    h0 = jax.random.normal(jax.random.key(9), (2, 2, 3, 4))
    ref, h_ref = ssd_reference(x, dt, a, b, c, d, None, h0)
    y, h = ssd_chunked(x, dt, a, b, c, None, 5, h0)  # 5 does not divide 24
    np.testing.assert_allclose(y + d[None, None, :, None] * x, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)
    y, h = jax.jit(ssm_ops.ssd_step)(x, dt, a, b, c, h0)
    np.testing.assert_allclose(y + d[None, None, :, None] * x, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=1e-5)


def test_ssd_gradients_do_not_cross_resets():
    x, dt, a, b, c, _ = ssd_inputs(B=1, L=12, seed=2)
    reset = jnp.array(reset_mask(1, 12, at=(4, 7)))  # chunk 4: one on a boundary, one inside

    def out(x, dt, b, c):
        return ssm_ops.ssd_chunked(x, dt, a, b, c, reset, 4)[0].sum(axis=(2, 3))[0]

    doc = np.cumsum(np.asarray(reset[0]))
    other = doc[:, None] != doc[None, :]
    for jac in jax.jit(jax.jacrev(out, argnums=(0, 1, 2, 3)))(x, dt, b, c):
        dep = np.abs(np.asarray(jac)).reshape(12, 12, -1).sum(-1)
        assert (dep[other] == 0).all() and np.isfinite(dep).all()
        assert (dep[np.tril(~other)] > 0).any()


# ------------------------------------------------------------------------------ S4D / LTI


def test_zoh_matches_the_ode():
    a = np.array([-0.5 + 3j * np.pi, -2.0 + 0.5j])
    dt = 0.07
    log_da, db = ssm_ops.zoh(jnp.array([dt], jnp.float32), jnp.array(a[None], jnp.complex64))
    np.testing.assert_allclose(np.exp(log_da[0]), np.exp(dt * a), rtol=1e-5)
    np.testing.assert_allclose(db[0], (np.exp(dt * a) - 1) / a, rtol=1e-5)
    # x' = a x + u held constant over one step (RK4, fine steps): x(dt) = dA x0 + dB u.
    for x0, u, want in ((1.0, 0.0, np.exp(log_da[0])), (0.0, 1.0, db[0])):
        x, n = np.full(2, x0, np.complex128), 2000
        h = dt / n
        for _ in range(n):

            def f(x, u=u):
                return a * x + u

            k1 = f(x)
            k2 = f(x + h / 2 * k1)
            k3 = f(x + h / 2 * k2)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + f(x + h * k3))
        np.testing.assert_allclose(x, want, rtol=1e-5)


def test_s4d_fft_and_chunked_match_recurrence():
    log_da, db, c = diagonal_ssm(3)
    u = jax.random.normal(jax.random.key(3), (2, 40, 3))
    ones = jnp.ones((2, 40, 3, 1))
    ref = lti_reference(ones, ones, u[..., None], log_da, db, c, None)[..., 0]
    kernel = ssm_ops.lti_kernel(log_da, db * c, 40)
    np.testing.assert_allclose(ssm_ops.fft_conv(u, kernel), ref, atol=1e-5, rtol=1e-5)
    one_doc = jnp.array(reset_mask(2, 40, at=()))  # the form used with segment ids
    y = lti_chunked(None, None, u[..., None], log_da, db, c, one_doc, 7)[..., 0]
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    h0 = jnp.zeros((2, 3, 4, 1, 1), jnp.complex64)
    y, _ = jax.jit(ssm_ops.lti_step)(ones, ones, u[..., None], log_da, db, c, h0)
    np.testing.assert_allclose(y[..., 0], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("K,P,chunk", [(None, 1, 4), (3, 2, 5)])  # S4D (q = k = 1), H3-shaped
def test_lti_chunked_resets_match_recurrence(K, P, chunk):
    log_da, db, c = diagonal_ssm(2)
    ks = jax.random.split(jax.random.key(4), 3)
    q, k = jax.random.normal(ks[0], (2, 2, 24, 2, K or 1))
    v = jax.random.normal(ks[2], (2, 24, 2, P))
    reset = reset_mask(2, 24)
    qk = (None, None) if K is None else (q, k)
    y = lti_chunked(*qk, v, log_da, db, c, jnp.array(reset), chunk)
    if K is None:
        q = k = jnp.ones_like(q)
    ref = lti_reference(q, k, v, log_da, db, c, reset)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)
    leaky = lti_reference(q, k, v, log_da, db, c, None)
    assert np.abs(leaky[0, 5:] - ref[0, 5:]).max() > 1e-2


@pytest.mark.parametrize("K", [None, 3])  # S4D (q = k = 1), H3-shaped
def test_lti_gradients_do_not_cross_resets(K):
    log_da, db, c = diagonal_ssm(2)
    q, k, v = jax.random.normal(jax.random.key(6), (3, 1, 12, 2, K or 1))
    reset = jnp.array(reset_mask(1, 12, at=(4, 7)))  # chunk 4: one on a boundary, one inside

    def out(q, k, v):
        qk = (None, None) if K is None else (q, k)
        return ssm_ops.lti_chunked(*qk, v, log_da, db, c, reset, 4)[0].sum(axis=(2, 3))[0]

    doc = np.cumsum(np.asarray(reset[0]))
    other = doc[:, None] != doc[None, :]
    for jac in jax.jit(jax.jacrev(out, argnums=(0, 1, 2)))(q, k, v)[2 if K is None else 0 :]:
        dep = np.abs(np.asarray(jac)).reshape(12, 12, -1).sum(-1)
        assert (dep[other] == 0).all() and (dep[np.tril(~other)] > 0).any()


def test_s4d_fft_option_matches_chunked_mixer():
    cfg = ssm.Config(name="s4d", vocab_size=11, d_model=8, n_layers=1, chunk_size=4)
    x = jax.random.normal(jax.random.key(5), (2, 13, 8))
    chunked = ssm.S4D(cfg, rngs=nnx.Rngs(0))
    fft = ssm.S4D(dataclasses.replace(cfg, s4d_fft=True), rngs=nnx.Rngs(0))
    want = jax.jit(lambda x: chunked(x, None, None)[0])(x)
    np.testing.assert_allclose(jax.jit(lambda x: fft(x, None, None)[0])(x), want, atol=1e-5)
    seg = jnp.ones((2, 13), jnp.int32)  # with segment ids the FFT option falls back to chunks
    np.testing.assert_allclose(jax.jit(lambda x: fft(x, seg, None)[0])(x), want, atol=1e-5)


# ------------------------------------------------------------------------------ H3


def test_h3_training_form_matches_step_form():
    cfg = ssm.Config(name="h3", vocab_size=11, d_model=12, n_heads=3, n_layers=1, chunk_size=4)
    mixer = ssm.H3(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(6), (2, 11, 12))
    full = jax.jit(lambda x: mixer(x, None, None)[0])(x)
    state, ys = mixer.init_state(2, 11), []
    step = jax.jit(lambda x, s: mixer(x, None, None, s))
    for t in range(11):
        y, state = step(x[:, t : t + 1], state)
        ys.append(y)
    np.testing.assert_allclose(np.concatenate(ys, axis=1), full, atol=1e-5, rtol=1e-5)


def test_h3_shift_conv_shifts_an_impulse():
    cfg = ssm.Config(name="h3", vocab_size=11, d_model=4, n_heads=1, conv_width=3)
    shift = ssm.H3(cfg, rngs=nnx.Rngs(0)).shift
    kernel = np.asarray(shift.kernel[...])
    impulse = jnp.zeros((1, 9, 4)).at[0, 2].set(1.0)
    want = np.zeros((9, 4))
    want[2:5] = kernel  # the impulse at 2 appears at 2, 3, 4 weighted by taps 0, 1, 2
    np.testing.assert_allclose(shift(impulse)[0][0], want, atol=1e-7)
    seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 2, 2]])  # ...but not past a segment start
    want[4:] = 0.0
    np.testing.assert_allclose(shift(impulse, seg)[0][0], want, atol=1e-7)
    shift.kernel[...] = jnp.zeros((3, 4)).at[1].set(1.0)  # a pure one-token delay
    x = jax.random.normal(jax.random.key(7), (1, 9, 4))
    np.testing.assert_allclose(shift(x)[0][0, 1:], x[0, :-1])


def test_h3_shift_skip_is_a_skip_beside_the_shift_conv():
    """shift_skip (Zoology's H3, its ssm_k_D): K enters the diagonal SSM as shift(K) + d * K,
    d ~ N(0, 1) per channel. The same H3 without the skip, its conv's current-token tap raised
    by d, is the same function; left unraised, it is not."""
    cfg = ssm.Config(name="h3", vocab_size=11, d_model=12, n_heads=3, n_layers=1, chunk_size=4,
                     conv_width=4, init_std=0.5, shift_skip=True)  # fmt: skip
    mixer = ssm.H3(cfg, rngs=nnx.Rngs(0))
    d = np.asarray(mixer.shift_d[...])
    assert d.shape == (12,) and 0.5 < d.std() < 2.0
    bare = ssm.H3(dataclasses.replace(cfg, shift_skip=False), rngs=nnx.Rngs(1))
    assert bare.shift_d is None
    pure = nnx.to_pure_dict(nnx.state(mixer))
    del pure["shift_d"]
    state = nnx.state(bare)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(bare, state)  # every parameter of mixer's but d
    x = jax.random.normal(jax.random.key(6), (2, 11, 12))
    seg = jnp.array([[1] * 5 + [2] * 6, [1] * 11])
    call = lambda m: jax.jit(lambda x, seg: m(x, seg, None)[0])(x, seg)
    want = np.asarray(call(mixer))
    scale = np.abs(want).max()
    assert np.abs(np.asarray(call(bare)) - want).max() > 0.1 * scale  # the skip is there to find
    bare.shift.kernel[...] = bare.shift.kernel[...].at[0].add(d)
    np.testing.assert_allclose(np.asarray(call(bare)), want, atol=1e-5 * scale, rtol=1e-5)
    with pytest.raises(ConfigError, match="model.shift_skip"):
        models.build(ssm.Config(name="s4d", vocab_size=5, shift_skip=True), nnx.Rngs(0))


# ------------------------------------------------------------------------------ models


ZOOLOGY_MAMBA2 = {"conv_bias": True, "linear_init": "torch"}  # mamba_ssm's conv bias and init


@pytest.mark.parametrize(
    "name,chunk,extra",
    [("s4d", 4, {}), ("h3", 3, {}), ("h3", 3, {"shift_skip": True}), ("mamba2", 4, {}),
     ("mamba2", 4, ZOOLOGY_MAMBA2)],
)  # fmt: skip
def test_model_multichunk_packing_and_decode(name, chunk, extra):
    cfg = ssm.Config(
        name=name, vocab_size=31, d_model=16, n_layers=1, n_heads=2, chunk_size=chunk,
        init_std=0.1, **extra,
    )  # fmt: skip
    model = models.build(cfg, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    forward = jax.jit(
        lambda s, x, seg: nnx.merge(graphdef, s).logits(nnx.merge(graphdef, s).hidden(x, seg)[0])
    )
    decode = jax.jit(lambda s, t, c: nnx.merge(graphdef, s).decode(t, c))
    tok = jax.random.randint(jax.random.key(8), (1, 16), 0, 31)
    x = model.token_embed(tok)
    one_doc = jnp.ones((1, 16), jnp.int32)  # always segment ids: one compile of forward
    full = forward(state, x, one_doc)
    for n1 in (6, 8):  # segment 2 starts inside a chunk, then on a chunk boundary
        seg = jnp.array([[1] * n1 + [2] * (16 - n1)])
        packed = forward(state, x, seg)[:, n1:]
        # Segment 2 alone, left-aligned (what follows it cannot matter: causal), same shape.
        alone = forward(state, jnp.roll(x, -n1, axis=1), one_doc)[:, : 16 - n1]
        np.testing.assert_allclose(packed, alone, atol=1e-5, rtol=1e-5)
        assert np.abs(np.asarray(full[:, n1:] - packed)).max() > 1e-4

    cache, steps = model.init_state(1, 16), []
    for t in range(16):
        logits, cache = decode(state, tok[:, t : t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=1e-5)


def test_flops_per_token_hand_count():
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, state_size=8, chunk_size=8)
    seq, head = 16, 61 * 32
    cfg = ssm.Config(name="s4d", **base)
    assert cfg.ffn_width == 128  # swiglu: round(2/3 * 4 * 32) = 85 -> next multiple of 64
    mlp = 3 * 32 * 128
    s4d = 6 * (2 * (32 * 32 + mlp) + head) + 6 * 2 * 32 * (8 + 16 + 1)
    assert cfg.flops_per_token(seq) == s4d == 181_056
    h3 = 6 * (2 * (4 * 32 * 32 + mlp) + head) + 6 * 2 * (4 * 32 + 2 * 8 * 32 + 2 * 8 * 8 * 32 + 64)
    assert dataclasses.replace(cfg, name="h3").flops_per_token(seq) == h3 == 265_920
    E = 64  # expand 2
    in_out = 32 * (2 * E + 2 * 8 + 4) + E * 32
    mixer = 4 * (E + 16) + 8 * 8 + 8 * E + 2 * 8 * E + E
    m2 = 6 * (2 * in_out + head) + 6 * 2 * mixer
    assert dataclasses.replace(cfg, name="mamba2").flops_per_token(seq) == m2 == 116_928
    # The chunk term saturates at the sequence length.
    assert cfg.flops_per_token(4) == s4d - 6 * 2 * 32 * 4


def test_block_mlp_false_leaves_s4d_and_h3_blocks_the_mixer_alone():
    """Zoology's MQAR H3 (no MLP): model.block_mlp=false drops each block's SwiGLU and its norm,
    and the FLOP count follows."""
    base = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=16, state_size=8)

    def n_params(cfg):
        return sum(v.size for v in jax.tree.leaves(nnx.state(models.build(cfg, nnx.Rngs(0)))))

    for name in ("s4d", "h3"):
        cfg = ssm.Config(name=name, **base)
        bare = dataclasses.replace(cfg, block_mlp=False)
        mlp = 3 * 32 * cfg.ffn_width  # per layer
        assert n_params(cfg) - n_params(bare) == 2 * (mlp + 32)  # + the MLP's RMSNorm scale
        assert cfg.matmul_params() - bare.matmul_params() == 2 * mlp
        assert cfg.flops_per_token(16) - bare.flops_per_token(16) == 6 * 2 * mlp


@pytest.mark.parametrize(
    "cfg",
    [
        ssm.Config(name="h3", vocab_size=61, d_model=32, n_layers=2, n_heads=16, state_size=8,
                   block_mlp=False, state_norm=True),
        linear_attention.Config(name="gla", pattern="CG", vocab_size=61, d_model=32,
                                n_layers=2, n_heads=2, block_mlp=False, state_norm=True),
    ],
    ids=["h3", "gla"],
)  # fmt: skip
def test_state_norm_is_zoologys_identity_state_mixer(cfg):
    """model.state_norm: each block is r + mixer(norm(r)), then r + LayerNorm(r), the term
    Zoology's TransformerBlock adds with an Identity state mixer. Checked against the block
    composed by hand with torch's layer_norm (eps 1e-5) at a random scale and bias."""
    torch = pytest.importorskip("torch")
    model = models.build(cfg, nnx.Rngs(0))
    key = jax.random.key(1)
    x = jax.random.normal(key, (2, 12, 32)) * 3 + 1  # a mean the LayerNorm must remove
    seg = jnp.ones((2, 12), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
    for i, block in enumerate(model.blocks):
        ln = block.mlp_norm
        ln.scale[...] = jax.random.normal(jax.random.key(10 + i), (32,))
        ln.bias[...] = jax.random.normal(jax.random.key(20 + i), (32,))
        normed = compiled_call(getattr(block, block.norm_name), x)
        mixed, _ = compiled_call(block.mixer_module, normed, seg, pos)
        r = np.asarray(x + mixed, np.float64)
        want = r + torch.nn.functional.layer_norm(
            torch.from_numpy(r), (32,), torch.from_numpy(np.asarray(ln.scale[...], np.float64)),
            torch.from_numpy(np.asarray(ln.bias[...], np.float64)), eps=1e-5,
        ).numpy()  # fmt: skip
        got, _ = compiled_call(block, x, seg, pos)
        assert np.abs(want - r).max() > 0.5  # the term is there to find
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)
    # The other blocks are untouched: without state_norm the block is r alone.
    bare = models.build(dataclasses.replace(cfg, state_norm=False), nnx.Rngs(0))
    assert bare.blocks[0].mlp_norm is None
    assert len(jax.tree.leaves(nnx.state(model))) - len(jax.tree.leaves(nnx.state(bare))) == 4
    with pytest.raises(ConfigError, match="model.state_norm"):
        models.build(dataclasses.replace(cfg, block_mlp=True), nnx.Rngs(0))


def test_bad_config_is_a_config_error():
    from lmtrain.config import ConfigError

    with pytest.raises(ConfigError, match="state_size"):
        models.build(ssm.Config(name="s4d", vocab_size=5, state_size=3), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="n_heads"):
        models.build(ssm.Config(name="h3", vocab_size=5, d_model=10, n_heads=4), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="model.linear_init"):
        models.build(ssm.Config(name="mamba2", vocab_size=5, linear_init="xavier"), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="Mamba-2 only"):
        models.build(ssm.Config(name="s4d", vocab_size=5, conv_bias=True), nnx.Rngs(0))


def test_zoology_mamba2_init_is_pytorchs():
    """linear_init="torch": projections U(+-1/sqrt(fan in)), out_proj's / sqrt(n_layers), a
    conv bias U(+-1/sqrt(width)); "normal" keeps N(0, 0.02^2) and no bias."""
    kw = dict(name="mamba2", vocab_size=64, d_model=64, n_layers=2, n_heads=2, state_size=8)
    for extra, in_bound, out_bound in (
        (ZOOLOGY_MAMBA2, 64**-0.5, 128**-0.5 / 2**0.5),
        ({}, None, None),
    ):
        model = models.build(ssm.Config(**kw, **extra), nnx.Rngs(0))
        mixer = nnx.to_pure_dict(nnx.state(model, nnx.Param))["blocks"][0]["mixer"]
        w_in, w_out = np.asarray(mixer["in_x"]["kernel"]), np.asarray(mixer["out"]["kernel"])
        if in_bound is None:
            assert abs(w_in.std() - 0.02) < 0.002 and "bias" not in mixer["conv_x"]
            continue
        # uniform on [-b, b]: max near b, std b / sqrt(3)
        for w, b in ((w_in, in_bound), (w_out, out_bound)):
            assert b * 0.98 < np.abs(w).max() <= b and abs(w.std() - b / 3**0.5) < 0.05 * b
        bias = np.asarray(mixer["conv_x"]["bias"])
        assert bias.shape == (128,) and 0.45 < np.abs(bias).max() <= 0.5


@pytest.mark.parametrize("name", ["s4d", "h3", "mamba2"])
def test_bfloat16_close_to_float32(name):
    cfg = ssm.Config(name=name, vocab_size=31, d_model=16, n_layers=1, n_heads=2, chunk_size=4)
    tok = jax.random.randint(jax.random.key(9), (2, 13), 0, 31)
    model, model16 = (
        models.build(c, nnx.Rngs(0)) for c in (cfg, dataclasses.replace(cfg, dtype="bfloat16"))
    )
    logits, logits16 = (jax.jit(lambda t, m=m: m(t))(tok) for m in (model, model16))
    assert logits16.dtype == jnp.float32 and np.isfinite(np.asarray(logits16)).all()
    err = np.abs(np.asarray(logits16 - logits)).max()
    assert 0 < err < 0.05 * np.abs(np.asarray(logits)).max()
