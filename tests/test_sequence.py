"""Rows split over the mesh's sequence axis (models/sequence.py) on 8 fake CPU devices: every
family's logits and parameter gradients equal the unsplit model's, with documents crossing
device boundaries; and breaking the state pass, the halo or the document cut is caught."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmtrain import sharding
from lmtrain.config import MeshConfig
from lmtrain.errors import ConfigError
from lmtrain.models import build, family, hybrid, mixer, sequence

B, L, V = 2, 1024, 64
# Row 0: five documents, one (400 tokens) longer than a device's piece on either mesh (128 on
# (1,1,1,8), 256 on (2,1,1,4)), boundaries inside pieces and one (at 128) on a piece boundary.
# Row 1: a document of 896 then one of 128.
LENGTHS = ([100, 28, 300, 122, 74, 400], [896, 128])
MESHES = [(1, 1, 1, 8), (2, 1, 1, 4)]

MODELS = {
    # Primer's Q/K/V convolutions and QK-norm: attention with a halo
    "transformer": dict(qkv_conv=3, qk_norm=True, n_kv_heads=1),
    "based": dict(n_layers=3, window=16),  # C B W: gated conv, BASED, sliding window
    "retnet": {},
    "lightning": {},
    "gla": {},
    "s4d": {},
    "h3": {},
    "mamba2": {},
    # the hybrid's sliding window shortened to fit a 128-token piece
    "hybrid": dict(pattern="CWAM", n_layers=4, linear=hybrid.LinearSection(window=16)),
}
FAST = (("gla", (2, 1, 1, 4)),)  # the state pass, a halo, documents across devices
# Splitting alongside a data axis is the same code for every family (models/sequence.py): the
# mixers of all three kinds (attention, a linear state, an SSM state) take both meshes, the
# rest the 8-way split alone (more pieces, a piece edge on a document start).
BOTH_MESHES = ("transformer", "gla", "mamba2")


def _rows():
    seg = np.stack([np.repeat(np.arange(len(n)) + 1 + 10 * r, n) for r, n in enumerate(LENGTHS)])
    pos = np.concatenate([np.concatenate([np.arange(k) for k in n])[None] for n in LENGTHS])
    ids = np.random.default_rng(0).integers(0, V, (B, L))
    return ids.astype(np.int32), seg.astype(np.int32), pos.astype(np.int32)


def _model(name: str, **extra) -> nnx.Module:
    kw = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=2, init_std=0.1)
    return build(family(name).Config(name=name, **{**kw, **MODELS[name], **extra}), nnx.Rngs(0))


def _logits_and_grads(model, mesh_shape=None):
    """Logits, and the gradient of a loss that weighs every position, on a mesh or unsplit."""
    graphdef, params = nnx.split(model)
    ids, seg, pos = _rows()
    w = np.random.default_rng(1).normal(size=(B, L, V)).astype(np.float32)

    def loss(params):
        logits = nnx.merge(graphdef, params)(ids, seg, pos)
        return jnp.mean(logits * w), logits

    fn = jax.jit(jax.grad(loss, has_aux=True))
    if mesh_shape is None:
        return jax.device_get(fn(params)[::-1])
    mesh = sharding.make_mesh(MeshConfig(shape=mesh_shape))
    with jax.set_mesh(mesh):
        text = fn.lower(params).as_text()
        assert "manual_computation" in text  # the split path ran (a shard_map)
        return jax.device_get(fn(params)[::-1])


def _errors(ref, got) -> tuple[float, float]:
    """(max |logits difference|, max over parameters of |grad difference| / max |grad|)."""
    logit_err = float(np.abs(ref[0] - got[0]).max())
    grad_err = max(
        float(np.abs(a - b).max() / (np.abs(a).max() + 1e-30))
        for a, b in zip(jax.tree.leaves(ref[1]), jax.tree.leaves(got[1]), strict=True)
    )
    return logit_err, grad_err


LOGIT_TOL, GRAD_TOL = 2e-5, 2e-4  # observed: <= 2e-6 and <= 3e-5 (float32, L = 1024)


@functools.cache
def _unsplit(name: str):
    return _logits_and_grads(_model(name))


@pytest.mark.parametrize(
    ("name", "mesh"),
    [
        pytest.param(
            n,
            m,
            marks=() if (n, m) in FAST else pytest.mark.slow,
            id=f"{n}-{'x'.join(map(str, m))}",
        )
        for n in MODELS
        for m in (MESHES if n in BOTH_MESHES else MESHES[:1])
    ],
)
def test_split_rows_equal_the_unsplit_model(name, mesh):
    ref = _unsplit(name)
    assert np.abs(ref[0]).max() > 0.1  # the logits are not all alike
    logit_err, grad_err = _errors(ref, _logits_and_grads(_model(name), mesh))
    assert logit_err < LOGIT_TOL and grad_err < GRAD_TOL, (logit_err, grad_err)


@pytest.mark.parametrize(
    ("name", "mesh"),
    [("gla", (2, 1, 1, 4)), pytest.param("mamba2", (1, 1, 1, 8), marks=pytest.mark.slow)],
)
def test_the_state_pass_by_all_gather_equals_the_unsplit_model_too(monkeypatch, name, mesh):
    """STATE_PASS="gather" (LASP-2's all-gather and a local scan) gives what the default
    prefix scan over ppermute gives: the unsplit model."""
    monkeypatch.setattr(sequence, "STATE_PASS", "gather")
    logit_err, grad_err = _errors(_unsplit(name), _logits_and_grads(_model(name), mesh))
    assert logit_err < LOGIT_TOL and grad_err < GRAD_TOL, (logit_err, grad_err)


def _broken(monkeypatch, what: str) -> None:
    if what == "state pass":  # every device starts from an empty carried state
        monkeypatch.setattr(sequence, "_ppermute_scan", lambda a, b, empty: empty)
        monkeypatch.setattr(sequence, "_exclusive_scan", lambda a, b, empty: empty)
    elif what == "halo":  # windows start empty on every device
        monkeypatch.setattr(sequence, "halo_of", lambda state, carried: 0)
    elif what == "document cut":  # an incoming state always continues
        for module in (mixer, *(family(n) for n in ("gla", "mamba2", "transformer"))):
            if hasattr(module, "continues"):
                monkeypatch.setattr(module, "continues", lambda state, seg, batch: seg[:, 0] > 0)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "what"),
    [
        ("gla", "state pass"),
        ("mamba2", "state pass"),
        ("mamba2", "halo"),  # its convolutions
        ("transformer", "halo"),  # Primer's convolutions
        ("based", "halo"),  # the gated convolution and the sliding window
        ("gla", "document cut"),
        ("mamba2", "document cut"),
    ],
)
def test_each_part_of_the_split_is_needed(monkeypatch, name, what):
    """Each piece of machinery, removed, makes the split model differ far beyond tolerance."""
    model = _model(name)
    ref = _unsplit(name)
    _broken(monkeypatch, what)
    logit_err, _ = _errors(ref, _logits_and_grads(model, (1, 1, 1, 8)))
    assert logit_err > 100 * LOGIT_TOL, logit_err


def test_a_piece_shorter_than_a_window_is_refused():
    """128-token pieces cannot hold the 200 tokens of context a sliding window needs."""
    kw = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=2, pattern="W", window=200)
    model = build(family("based").Config(name="based", **kw), nnx.Rngs(0))
    with pytest.raises(ConfigError, match="fewer than the 200 of earlier context"):
        _logits_and_grads(model, (1, 1, 1, 8))


def test_three_number_mesh_shapes_mean_no_sequence_split():
    assert MeshConfig(shape=(2, -1, 1)).shape == (2, -1, 1, 1)
    mesh = sharding.make_mesh(MeshConfig(shape=(2, 2, 2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}


def test_blocked_attention_equals_dense_attention():
    """The online-softmax attention long rows use (key blocks of 32, query blocks of 16, GQA,
    a document boundary inside a block) gives dense masked attention's outputs and gradients."""
    B, L, S, H, G, K, q0 = 2, 64, 256, 4, 2, 8, 128
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
               [(B, L, H, K), (B, S, G, K), (B, S, G, K)])  # fmt: skip
    seg_S = jnp.asarray(np.stack([np.repeat(np.arange(8), 32), np.repeat([1, 2], [150, 106])]))
    seg_L = seg_S[:, q0 : q0 + L]
    mask = (jnp.arange(S)[None] <= q0 + jnp.arange(L)[:, None])[None] & (
        seg_L[:, :, None] == seg_S[:, None]
    )
    w = jnp.asarray(rng.normal(size=(B, L, H, K)), jnp.float32)

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])

    def blocked(q, k, v):
        return sequence.blocked_attention(q, k, v, seg_L, seg_S, q0, 16, 32)

    dense, blocked = jax.jit(dense), jax.jit(blocked)
    ref, got = dense(q, k, v), blocked(q, k, v)
    assert float(jnp.abs(ref).max()) > 1
    np.testing.assert_allclose(got, ref, atol=2e-6)
    ref_g = jax.jit(jax.grad(lambda *a: (dense(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
    got_g = jax.jit(jax.grad(lambda *a: (blocked(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(ref_g, got_g, strict=True):
        np.testing.assert_allclose(b, a, atol=5e-6)
    # the causal offset matters: the same blocks from position 0 differ
    off = sequence.blocked_attention(q, k, v, seg_L, seg_S, 0, 16, 32)
    assert float(jnp.abs(off - ref).max()) > 0.1


def test_balanced_attention_equals_dense_attention():
    """Causal load balancing on 8 devices (each attends for an early and a late half-piece of
    64 queries, key blocks of 32, GQA, documents across devices): dense attention's outputs and
    gradients; and the halves it attends for are one early, one late on every device."""
    n, B, S, H, G, K = 8, 2, 1024, 4, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
               [(B, S, H, K), (B, S, G, K), (B, S, G, K)])  # fmt: skip
    seg = jnp.asarray(np.stack([np.repeat(np.arange(8), 128), np.repeat([1, 2], [700, 324])]))
    mask = (jnp.arange(S)[None] <= jnp.arange(S)[:, None])[None] & (seg[:, :, None] == seg[:, None])
    w = jnp.asarray(rng.normal(size=(B, S, H, K)), jnp.float32)
    mesh = jax.make_mesh((n,), ("sequence",), axis_types=(jax.sharding.AxisType.Auto,))

    def local(q, k, v, seg):
        k, v, seg_all = (jax.lax.all_gather(a, "sequence", axis=1, tiled=True) for a in (k, v, seg))
        return sequence.balanced_attention(q, k, v, seg, seg_all, 16, 32)

    rows = P(None, "sequence")
    split = jax.shard_map(local, mesh=mesh, in_specs=(rows,) * 4, out_specs=rows, check_vma=False)

    def dense(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])

    with jax.set_mesh(mesh):
        got = jax.jit(split)(q, k, v, seg)
        got_g = jax.jit(jax.grad(lambda *a: (split(*a, seg) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(dense)(q, k, v)
    ref_g = jax.jit(jax.grad(lambda *a: (dense(*a) * w).sum(), argnums=(0, 1, 2)))(q, k, v)
    assert float(jnp.abs(ref).max()) > 1
    np.testing.assert_allclose(got, ref, atol=2e-6)
    for a, b in zip(ref_g, got_g, strict=True):
        np.testing.assert_allclose(b, a, atol=5e-6 * float(jnp.abs(a).max()))
    halves = [[h for h in range(2 * n) if sequence.zigzag_device(h, n) == d] for d in range(n)]
    assert halves == [[d, 2 * n - 1 - d] for d in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("balance", [True, False])
def test_split_attention_in_blocks_equals_the_unsplit_model(monkeypatch, balance):
    """Rows long enough for the blocked path (here made short: blocks of 32 queries and 32
    keys), with causal load balancing (balanced_attention) and without (blocked_attention)."""
    monkeypatch.setattr(sequence, "DENSE_MAX", 0)
    monkeypatch.setattr(sequence, "Q_BLOCK", 32)
    monkeypatch.setattr(sequence, "KV_BLOCK", 32)
    monkeypatch.setattr(sequence, "BALANCE", balance)
    called = {"balanced": 0}
    real = sequence.balanced_attention

    def counted(*args):
        called["balanced"] += 1
        return real(*args)

    monkeypatch.setattr(sequence, "balanced_attention", counted)
    model = _model("transformer")
    ref = _logits_and_grads(model)
    logit_err, grad_err = _errors(ref, _logits_and_grads(model, (1, 1, 1, 8)))
    assert logit_err < LOGIT_TOL and grad_err < GRAD_TOL, (logit_err, grad_err)
    assert bool(called["balanced"]) == balance


@pytest.mark.slow
def test_splash_under_a_split_equals_the_unsplit_model(monkeypatch):
    """attention_impl="splash" on (1, 1, 1, 4): the kernel (Pallas interpret mode here) runs
    under the split, for an early and a late half-piece per device (128 queries: the kernel's
    smallest block), and gives the unsplit (XLA) model's logits and gradients."""
    halves = []
    real = sequence.attention.splash_local

    def counted(*args, offset=0, **kw):
        halves.append(offset)
        return real(*args, offset=offset, **kw)

    monkeypatch.setattr(sequence.attention, "splash_local", counted)
    ref = _logits_and_grads(_model("transformer", n_layers=1))  # one layer: interpreted
    model = _model("transformer", attention_impl="splash", n_layers=1)  # kernels are slow
    logit_err, grad_err = _errors(ref, _logits_and_grads(model, (1, 1, 1, 4)))
    assert logit_err < LOGIT_TOL and grad_err < GRAD_TOL, (logit_err, grad_err)
    # one kernel per half-piece offset, traced in the layer's two switches
    assert sorted(set(halves)) == [128 * j for j in range(8)], sorted(set(halves))


@pytest.mark.slow
def test_rows_stay_split_over_the_batch_axes_inside_the_split():
    """On (2, 1, 1, 4) each chip gathers the keys and values of its own row only ([1, 1024, 1,
    16] per all-gather), never both rows: left to the partitioner, the split once gathered
    every row onto every chip."""
    graphdef, params = nnx.split(_model("transformer"))
    ids, seg, pos = _rows()

    def loss(params):
        return nnx.merge(graphdef, params)(ids, seg, pos).mean()

    with jax.set_mesh(sharding.make_mesh(MeshConfig(shape=(2, 1, 1, 4)))):
        text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    gathers = [ln.split("=")[1].split("{")[0].strip() for ln in text.splitlines()
               if " all-gather(" in ln]  # fmt: skip
    assert "f32[1,1024,1,16]" in gathers, gathers
    assert "f32[2,1024,1,16]" not in gathers, gathers
