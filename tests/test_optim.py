"""Optimizers against a numpy reference; schedules at their landmarks; names; decay mask."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmtrain.config import ConfigError, OptimConfig
from lmtrain.optim import OPTIMIZERS, SCHEDULES, decay_mask, make_optimizer, make_schedule

STEPS = 5
# Warmup of 2 then cosine over 5 steps: the learning rate differs at every step.
CFG = OptimConfig(
    lr=1e-2,
    weight_decay=0.5,
    b1=0.9,
    b2=0.95,
    eps=1e-8,
    schedule="cosine",
    warmup_steps=2,
    final_lr_frac=0.1,
    clip_norm=0.0,
)


# ---------------------------------------------------------------------------- numpy reference


def ref_lr(cfg: OptimConfig, step: int, total: int) -> float:
    """Linear warmup (step + 1) / warmup, then cosine to final_lr_frac at `total`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = min((step - cfg.warmup_steps) / (total - cfg.warmup_steps), 1.0)
    return cfg.lr * (
        cfg.final_lr_frac + (1 - cfg.final_lr_frac) * 0.5 * (1 + math.cos(math.pi * t))
    )


def ref_clip(grads: dict, clip_norm: float) -> dict:
    if clip_norm <= 0:
        return grads
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
    return grads if norm < clip_norm else {k: g / norm * clip_norm for k, g in grads.items()}


def ref_adamw(cfg: OptimConfig, params: dict, grads_seq: list[dict]) -> list[dict]:
    """AdamW with bias correction and decoupled weight decay (scaled by lr) on ndim >= 2 only."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    out = []
    for t, grads in enumerate(grads_seq):
        grads = ref_clip(grads, cfg.clip_norm)
        lr = ref_lr(cfg, t, STEPS)
        for k, g in grads.items():
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * g**2
            m_hat = m[k] / (1 - cfg.b1 ** (t + 1))
            v_hat = v[k] / (1 - cfg.b2 ** (t + 1))
            wd = cfg.weight_decay if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + cfg.eps) + wd * p[k])
        out.append(dict(p))
    return out


def ref_lion(cfg: OptimConfig, params: dict, grads_seq: list[dict]) -> list[dict]:
    """Lion (Chen et al.): u = sign(b1 m + (1-b1) g); p -= lr (u + wd p); m = b2 m + (1-b2) g."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    out = []
    for t, grads in enumerate(grads_seq):
        grads = ref_clip(grads, cfg.clip_norm)
        lr = ref_lr(cfg, t, STEPS)
        for k, g in grads.items():
            u = np.sign(cfg.b1 * m[k] + (1 - cfg.b1) * g)
            wd = cfg.weight_decay if p[k].ndim >= 2 else 0.0
            p[k] = p[k] - lr * (u + wd * p[k])
            m[k] = cfg.b2 * m[k] + (1 - cfg.b2) * g
        out.append(dict(p))
    return out


REFERENCES = {"adamw": ref_adamw, "lion": ref_lion}


# ---------------------------------------------------------------------------- helpers


def make_problem(grad_scale: float = 1.0) -> tuple[dict, list[dict]]:
    """A matrix and a vector (so the decay mask matters) and a fixed gradient per step."""
    rng = np.random.default_rng(0)
    params = {
        "w": rng.standard_normal((4, 3)).astype(np.float32),
        "b": rng.standard_normal(3).astype(np.float32),
    }
    # Scales that change per step make clipping change the result even for scale-free Adam/Lion.
    grads = [
        {k: (grad_scale * (t + 1) * rng.standard_normal(v.shape)).astype(np.float32)
         for k, v in params.items()}
        for t in range(STEPS)
    ]  # fmt: skip
    return params, grads


def run_optax(cfg: OptimConfig, params: dict, grads_seq: list[dict]) -> list[dict]:
    tx = make_optimizer(cfg, STEPS)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    out = []
    for grads in grads_seq:
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, p)
        p = optax.apply_updates(p, updates)
        out.append(jax.tree.map(np.asarray, p))
    return out


def assert_trajectories_close(got: list[dict], want: list[dict]) -> None:
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=2e-6, atol=1e-7, err_msg=f"{k} @ {step}")


# ---------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_optimizer_matches_numpy_reference(name):
    cfg = dataclasses.replace(CFG, name=name)
    params, grads = make_problem()
    assert_trajectories_close(run_optax(cfg, params, grads), REFERENCES[name](cfg, params, grads))


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_clipping_matches_numpy_reference(name):
    cfg = dataclasses.replace(CFG, name=name, clip_norm=1.0)
    params, grads = make_problem(grad_scale=10.0)
    assert all(math.sqrt(sum(np.sum(g**2) for g in gs.values())) > 1.0 for gs in grads)
    want = REFERENCES[name](cfg, params, grads)
    # Guard: clipping must change the outcome, or this test would not be testing it.
    unclipped = REFERENCES[name](dataclasses.replace(cfg, clip_norm=0.0), params, grads)
    assert not np.allclose(want[-1]["w"], unclipped[-1]["w"], rtol=1e-4)
    assert_trajectories_close(run_optax(cfg, params, grads), want)


def test_decay_skips_vectors():
    # With zero gradients Adam's step is zero, so only weight decay moves the params.
    cfg = dataclasses.replace(CFG, name="adamw")
    params, grads = make_problem()
    zeros = [{k: np.zeros_like(v) for k, v in g.items()} for g in grads]
    final = run_optax(cfg, params, zeros)[-1]
    np.testing.assert_array_equal(final["b"], params["b"])
    assert np.all(np.abs(final["w"]) < np.abs(params["w"]))


def test_adamw_and_lion_differ():
    params, grads = make_problem()
    adamw = run_optax(dataclasses.replace(CFG, name="adamw"), params, grads)
    lion = run_optax(dataclasses.replace(CFG, name="lion"), params, grads)
    # Not step 0: Adam's first bias-corrected step is m/sqrt(v) = sign(g), Lion's step too.
    assert np.allclose(adamw[0]["w"], lion[0]["w"], rtol=1e-5)
    assert not np.allclose(adamw[-1]["w"], lion[-1]["w"], rtol=1e-3)


def test_lion_uses_our_weight_decay():
    # optax.lion defaults to weight_decay=1e-3; with ours at 0 and zero gradients (sign(0) = 0)
    # the matrix must not move at all.
    cfg = dataclasses.replace(CFG, name="lion", weight_decay=0.0)
    params, grads = make_problem()
    zeros = [{k: np.zeros_like(v) for k, v in g.items()} for g in grads]
    np.testing.assert_array_equal(run_optax(cfg, params, zeros)[-1]["w"], params["w"])


def test_clip_does_not_change_state_structure():
    params, _ = make_problem()
    on = make_optimizer(dataclasses.replace(CFG, clip_norm=1.0), STEPS).init(params)
    off = make_optimizer(dataclasses.replace(CFG, clip_norm=0.0), STEPS).init(params)
    assert jax.tree.structure(on) == jax.tree.structure(off)


@pytest.mark.parametrize("name", ["adamw", "lion"])
def test_sharded_jit_matches_single_device(name):
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices from conftest.py")
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(1)
    params = {"w": rng.standard_normal((8, 4)).astype(np.float32), "b": np.ones(4, np.float32)}
    grads = jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)
    specs = {"w": jax.P("data", None), "b": jax.P()}
    shardings = jax.tree.map(lambda s: jax.NamedSharding(mesh, s), specs)
    tx = make_optimizer(dataclasses.replace(CFG, name=name, clip_norm=1.0), STEPS)

    def step(p, g):
        updates, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, updates)

    sharded = jax.jit(step, in_shardings=(shardings, shardings), out_shardings=shardings)(
        jax.device_put(params, shardings), jax.device_put(grads, shardings)
    )
    assert sharded["w"].sharding.spec == jax.P("data", None)
    want = step(jax.tree.map(jnp.asarray, params), jax.tree.map(jnp.asarray, grads))
    for k in params:
        np.testing.assert_allclose(np.asarray(sharded[k]), np.asarray(want[k]), rtol=1e-6)


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim\.name.*adamw.*lion"):
        make_optimizer(dataclasses.replace(CFG, name="sgd"), STEPS)


def test_decay_mask_nested():
    params = {
        "embed": jnp.zeros((5, 2)),
        "block": {"attn": {"wq": jnp.zeros((2, 2, 3)), "bias": jnp.zeros(3)}, "norm": jnp.ones(2)},
        "scalar": jnp.zeros(()),
    }
    want = {
        "embed": True,
        "block": {"attn": {"wq": True, "bias": False}, "norm": False},
        "scalar": False,
    }
    assert decay_mask(params) == want


# ---------------------------------------------------------------------------- schedules

SCHED = OptimConfig(lr=1.0, warmup_steps=10, final_lr_frac=0.1, decay_frac=0.2)
TOTAL = 110


def lrs(schedule: str, steps, **kw) -> np.ndarray:
    cfg = dataclasses.replace(SCHED, schedule=schedule, **kw)
    fn = jax.jit(make_schedule(cfg, TOTAL))
    return np.array([float(fn(jnp.int32(s))) for s in steps])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_warmup_is_linear_and_nonzero_at_step_0(name):
    np.testing.assert_allclose(lrs(name, range(10)), np.arange(1, 11) / 10, rtol=1e-6)
    assert lrs(name, [10])[0] == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_no_warmup_starts_at_peak(name):
    assert lrs(name, [0], warmup_steps=0)[0] == pytest.approx(1.0)


def test_cosine_landmarks():
    got = lrs("cosine", [10, 60, TOTAL, TOTAL + 1, 10 * TOTAL])
    np.testing.assert_allclose(got, [1.0, 0.55, 0.1, 0.1, 0.1], rtol=1e-6)


def test_cosine_monotone_after_warmup():
    assert np.all(np.diff(lrs("cosine", range(10, TOTAL + 5))) <= 1e-7)


def test_wsd_flat_then_linear_decay():
    # decay_frac 0.2 of 110 steps: 22 decay steps starting at step 88.
    flat = lrs("wsd", range(10, 89))
    np.testing.assert_array_equal(flat, np.ones_like(flat))
    got = lrs("wsd", [89, 99, TOTAL, 10 * TOTAL])
    assert got[0] < 1.0
    np.testing.assert_allclose(got, [1.0 - 0.9 / 22, 0.55, 0.1, 0.1], rtol=1e-6)


def test_constant_holds_peak():
    np.testing.assert_allclose(lrs("constant", [10, 60, TOTAL, 10 * TOTAL]), 1.0)


def test_unknown_schedule_is_a_config_error():
    with pytest.raises(ConfigError, match=r"optim\.schedule.*cosine.*wsd.*constant"):
        make_schedule(dataclasses.replace(SCHED, schedule="linear"), TOTAL)


def test_tables_are_complete():
    assert set(OPTIMIZERS) == {"adamw", "lion", "muon"}
    assert set(SCHEDULES) == {"cosine", "wsd", "constant"}


def test_decay_mask_follows_param_metadata():
    """SSM decay rates are matrices but must not decay; the run's mask reads Param metadata."""
    from flax import nnx

    from lmtrain import models

    cfg = models.family("s4d").Config(
        name="s4d", vocab_size=11, d_model=8, n_layers=1, n_heads=2, state_size=4
    )
    _, variables = nnx.split(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(params=0))))
    mask = decay_mask(variables)
    ssm = mask["blocks"][0]["mixer"]["ssm"]
    assert ssm == {"log_dt": False, "log_neg_a_re": False, "a_im": False, "c": True, "d": False}
    assert mask["blocks"][0]["mixer"]["out"]["kernel"] is True
    assert mask["final_norm"]["scale"] is False

    # Zero gradients: only decayed parameters move, by lr * weight_decay * p.
    params = nnx.to_pure_dict(nnx.state(models.build(cfg, nnx.Rngs(params=0))))
    opt = dataclasses.replace(CFG, weight_decay=0.5, clip_norm=0.0, warmup_steps=0)
    tx = make_optimizer(opt, STEPS, mask)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
    assert moved == mask


def test_partitioned_and_masked_optimizer_states_shard_like_the_params():
    """optax.partition / optax.masked states (MaskedNode placeholders, e.g. optax.contrib's
    Muon) get their moments sharded like the params, and a sharded init compiles; before, the
    mapping from param specs to state specs failed on them."""
    import optax.contrib

    from lmtrain import models, sharding
    from lmtrain.config import MeshConfig

    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices from conftest.py")
    from flax import nnx

    cfg = models.family("transformer").Config(vocab_size=64, d_model=32, n_layers=2, n_heads=4)
    abstract = nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(params=0)))
    mesh = sharding.make_mesh(MeshConfig(shape=(2, 4, 1)))
    specs = sharding.param_specs(nnx.state(abstract), mesh)
    params = nnx.to_pure_dict(nnx.state(abstract))
    hidden = jax.tree.map(lambda p: p.ndim == 2 and p.shape[0] != 64 and p.shape[1] != 64, params)
    dims = jax.tree.map(lambda h: optax.contrib.MuonDimensionNumbers(0, 1) if h else None, hidden)
    labels = jax.tree.map(lambda h: "a" if h else "b", hidden)
    for tx in (
        optax.chain(optax.identity(), optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims)),
        optax.partition({"a": optax.sgd(0.1, momentum=0.9), "b": optax.adamw(1e-3)}, labels),
        optax.masked(optax.adam(1e-3), hidden),
    ):
        state = sharding.state_specs(specs, tx, params)["opt_state"]
        flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, jax.P))[
            0
        ]
        param_paths = {
            tuple(p): s
            for p, s in jax.tree_util.tree_flatten_with_path(
                specs, is_leaf=lambda x: isinstance(x, jax.P)
            )[0]
        }
        moments = 0
        for path, spec in flat:
            tail = next(
                (tuple(path[-n:]) for n in (5, 4, 3, 2) if tuple(path[-n:]) in param_paths), None
            )
            if tail is not None:
                assert spec == param_paths[tail], (path, spec)
                moments += spec != jax.P()
            else:
                assert spec == jax.P(), (path, spec)  # counts and other scalars
        assert moments >= 8  # sharded moments really exist
        shardings = sharding.named(mesh, state)
        out = jax.jit(tx.init, out_shardings=shardings)(
            jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params)
        )
        leaves = jax.tree.leaves(out)
        assert leaves and all(isinstance(x, jax.Array) for x in leaves)


NS_COEFFS = (3.4445, -4.775, 2.0315)


def ref_newton_schulz(x: np.ndarray, steps: int = 5, eps: float = 1e-8) -> np.ndarray:
    """Muon's quintic Newton-Schulz iteration (Jordan et al.) on the Frobenius-normalised x."""
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + eps)
    a, b, c = NS_COEFFS
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def ref_muon(cfg: OptimConfig, params: dict, grads_seq: list[dict], hidden: dict) -> list[dict]:
    """Muon on `hidden` matrices: EMA momentum with bias correction (Nesterov as optax.contrib),
    Newton-Schulz, sqrt(max(1, fan_out / fan_in)) or consistent-RMS scaling, decoupled decay;
    AdamW at adam_lr_ratio x lr (decay on ndim >= 2) on the rest."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(x) for k, x in p.items()}
    beta, out = cfg.muon_beta, []
    for t, grads in enumerate(grads_seq):
        lr, n = ref_lr(cfg, t, STEPS), t + 1
        for k, g in grads.items():
            if hidden[k]:
                mu[k] = beta * mu[k] + (1 - beta) * g
                if cfg.muon_nesterov:
                    bias = beta * mu[k] / (1 - beta ** (n + 1))
                    mu_hat = bias + (1 - beta) * g / (1 - beta**n)
                else:
                    mu_hat = mu[k] / (1 - beta**n)
                fan_in, fan_out = g.shape
                scale = (
                    math.sqrt(max(fan_in, fan_out)) * cfg.muon_consistent_rms
                    if cfg.muon_consistent_rms
                    else math.sqrt(max(1.0, fan_out / fan_in))
                )
                p[k] = p[k] - lr * (scale * ref_newton_schulz(mu_hat) + cfg.weight_decay * p[k])
            else:
                m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g
                v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g**2
                m_hat, v_hat = m[k] / (1 - cfg.b1**n), v2[k] / (1 - cfg.b2**n)
                wd = cfg.weight_decay if p[k].ndim >= 2 else 0.0
                step = m_hat / (np.sqrt(v_hat) + cfg.eps) + wd * p[k]
                p[k] = p[k] - cfg.adam_lr_ratio * lr * step
        out.append(dict(p))
    return out


@pytest.mark.parametrize(
    "options",
    [{}, {"muon_nesterov": False}, {"muon_consistent_rms": 0.2, "muon_beta": 0.9}],
    ids=["nesterov", "plain", "consistent-rms"],
)
def test_muon_matches_numpy_reference(options):
    rng = np.random.default_rng(3)
    params = {
        "w": rng.standard_normal((6, 4)).astype(np.float32),  # a hidden matrix, tall
        "u": rng.standard_normal((3, 5)).astype(np.float32),  # a hidden matrix, wide
        "e": rng.standard_normal((7, 6)).astype(np.float32),  # an embedding: AdamW, decayed
        "b": rng.standard_normal(4).astype(np.float32),  # a bias: AdamW, not decayed
    }
    grads = [
        {k: ((t + 1) * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
        for t in range(STEPS)
    ]
    hidden = {"w": True, "u": True, "e": False, "b": False}
    cfg = dataclasses.replace(CFG, name="muon", lr=0.05, adam_lr_ratio=0.1, **options)
    tx = make_optimizer(cfg, STEPS, hidden=hidden)
    p = jax.tree.map(jnp.asarray, params)
    state, got = tx.init(p), []
    for g in grads:
        updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
        got.append(jax.tree.map(np.asarray, p))
    want = ref_muon(cfg, params, grads, hidden)
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=2e-6, err_msg=f"{k} @ {step}")
    # Muon's update is not Adam's: the same run with AdamW everywhere ends elsewhere.
    adam = ref_adamw(dataclasses.replace(cfg, name="adamw"), params, grads)
    assert np.abs(adam[-1]["w"] - want[-1]["w"]).max() > 1e-3
    # Orthogonalised: the hidden update's singular values sit near 1 (0.5-1.5, by design).
    sv = np.linalg.svd(ref_newton_schulz(rng.standard_normal((6, 4))), compute_uv=False)
    assert 0.5 < sv.min() and sv.max() < 1.5


def test_muon_mask_follows_param_metadata():
    """Hidden weight matrices get Muon; embeddings, the head, convolution taps, norms and SSM
    parameters do not, whatever their shapes."""
    from flax import nnx

    from lmtrain import models
    from lmtrain.optim import muon_mask

    cfg = models.family("mamba2").Config(
        name="mamba2", vocab_size=11, d_model=8, n_layers=1, n_heads=2, state_size=4
    )
    _, variables = nnx.split(nnx.eval_shape(lambda: models.build(cfg, nnx.Rngs(params=0))))
    mask = muon_mask(variables)
    mixer = mask["blocks"][0]["mixer"]
    assert all(mixer[k]["kernel"] for k in ("in_z", "in_x", "in_b", "in_c", "in_dt", "out"))
    assert not any(mixer[k]["kernel"] for k in ("conv_x", "conv_b", "conv_c"))
    assert not any(mixer[k] for k in ("a_log", "dt_bias", "d", "norm_scale"))
    assert not mask["token_embed"]["table"] and not mask["head"]["kernel"]
    assert not mask["final_norm"]["scale"]


def test_step_flops_count_muons_newton_schulz_once():
    """5 iterations of X X^T (2 m^2 n), A A (2 m^3) and B X (2 m^2 n) per hidden m x n matrix,
    m <= n; nothing for AdamW and Lion or for Muon's AdamW part."""
    from lmtrain.optim import step_flops

    params = {"w": jnp.zeros((8, 32)), "v": jnp.zeros((16, 4)), "b": jnp.zeros(32)}
    want = 5 * (4 * 8 * 8 * 32 + 2 * 8**3) + 5 * (4 * 4 * 4 * 16 + 2 * 4**3)
    assert step_flops(OptimConfig(name="muon"), params) == want
    hidden = {"w": True, "v": False, "b": False}  # v left to AdamW (an embedding, say)
    assert step_flops(OptimConfig(name="muon"), params, hidden) == 5 * (4 * 8 * 8 * 32 + 2 * 8**3)
    assert step_flops(OptimConfig(name="adamw"), params) == 0.0
    assert step_flops(OptimConfig(name="lion"), params) == 0.0


def _matrices(rng, shapes):
    return {f"m{i}": jnp.asarray(rng.standard_normal(s), jnp.float32) for i, s in enumerate(shapes)}


@pytest.mark.parametrize("options", [{}, {"nesterov": False}, {"consistent_rms": 0.2}])
def test_spread_muon_is_optax_contrib_muon_state_and_arithmetic(options):
    """lmtrain.muon on one device: optax.contrib.muon's state tree (checkpoints of either
    restore in the other) and its updates, step after step."""
    import optax.contrib

    from lmtrain import muon as muon_lib

    rng = np.random.default_rng(0)
    params = _matrices(rng, [(6, 4), (3, 5), (6, 4)])
    kw = {"beta": 0.95, "nesterov": True, "consistent_rms": None, **options}
    ours = muon_lib.muon(0.05, weight_decay=0.1, **kw)
    dims = optax.contrib.MuonDimensionNumbers(0, 1)
    theirs = optax.contrib.muon(0.05, weight_decay=0.1, muon_weight_dimension_numbers=dims, **kw)
    s_ours, s_theirs = ours.init(params), theirs.init(params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    for _ in range(3):
        g = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
        u_ours, s_ours = jax.jit(ours.update)(g, s_ours, params)
        u_theirs, s_theirs = jax.jit(theirs.update)(g, s_theirs, params)
        for k in params:
            np.testing.assert_allclose(u_ours[k], u_theirs[k], rtol=1e-5, atol=1e-7)
        assert float(jnp.abs(u_ours["m0"] - u_ours["m2"]).max()) > 1e-3  # stacked, not mixed


@pytest.mark.parametrize("layout", ["data", "fsdp"])
def test_spread_muon_splits_the_newton_schulz_work_over_the_mesh(layout):
    """On 8 chips each orthogonalises about one matrix of each shape instead of all of them
    (compiled FLOPs per chip), and the updates equal optax.contrib.muon's. With the matrices
    replicated (data parallel) optax.contrib.muon repeats all twelve on every chip; with them
    split over fsdp XLA already splits its matmuls on CPU, and the spread version does no more
    work per chip than that."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices from conftest.py")
    import optax.contrib

    from lmtrain import muon as muon_lib
    from lmtrain import sharding
    from lmtrain.config import MeshConfig

    rng = np.random.default_rng(1)
    params = _matrices(rng, [(64, 128)] * 8 + [(128, 64)] * 4)
    shape, spec = ((8, 1, 1), jax.P()) if layout == "data" else ((1, 8, 1), jax.P("fsdp", None))
    mesh = sharding.make_mesh(MeshConfig(shape=shape))
    where = jax.sharding.NamedSharding(mesh, spec)
    dims = optax.contrib.MuonDimensionNumbers(0, 1)
    kw = {"beta": 0.95, "nesterov": True, "consistent_rms": None, "weight_decay": 0.0}
    flops, updates = {}, {}
    for name, tx in (
        ("spread", muon_lib.muon(0.02, **kw)),
        ("optax", optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims, **kw)),
    ):
        p = jax.device_put(params, where)
        g = jax.device_put(jax.tree.map(lambda x: 0.5 * x + 1.0, params), where)
        state = jax.jit(tx.init)(p)
        with jax.set_mesh(mesh):
            step = jax.jit(tx.update)
            flops[name] = step.lower(g, state, p).compile().cost_analysis()["flops"]
            updates[name] = jax.device_get(step(g, state, p)[0])
    ns = 5 * (4 * 64 * 64 * 128 + 2 * 64**3)  # one matrix's Newton-Schulz FLOPs
    assert flops["spread"] < 2.5 * ns  # one matrix of each shape, and the rest
    if layout == "data":
        assert flops["optax"] > 12 * ns  # every chip does all twelve
    else:
        assert flops["spread"] <= flops["optax"]
    for k in params:
        np.testing.assert_allclose(updates["spread"][k], updates["optax"][k], rtol=1e-5, atol=1e-7)


def test_spread_muon_plan_merges_few_matrices_into_one_padded_stack():
    """Fewer matrices than chips: one zero-padded stack (a chip does one matrix, not one of
    each shape), and the padded iteration gives optax.contrib.muon's updates exactly."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 fake CPU devices from conftest.py")
    import optax.contrib

    from lmtrain import muon as muon_lib
    from lmtrain import sharding
    from lmtrain.config import MeshConfig

    shapes = [(64, 128), (128, 64), (32, 96), (48, 48)]
    assert muon_lib.plan(shapes, 8) == [((64, 128), [0, 1, 2, 3])]
    many = [(64, 128)] * 16 + [(32, 96)] * 16  # enough of each shape: one stack per shape
    assert [s for s, _ in muon_lib.plan(many, 8)] == [(64, 128), (32, 96)]
    assert [s for s, _ in muon_lib.plan(shapes, 1)] == [(64, 128), (32, 96), (48, 48)]
    params = _matrices(np.random.default_rng(2), shapes)
    mesh = sharding.make_mesh(MeshConfig(shape=(8, 1, 1)))
    dims = optax.contrib.MuonDimensionNumbers(0, 1)
    kw = {"beta": 0.95, "nesterov": True, "consistent_rms": None, "weight_decay": 0.0}
    got = {}
    for name, tx in (
        ("spread", muon_lib.muon(0.02, **kw)),
        ("optax", optax.contrib.muon(0.02, muon_weight_dimension_numbers=dims, **kw)),
    ):
        g = jax.tree.map(lambda x: 0.5 * x + 1.0, params)
        with jax.set_mesh(mesh):
            got[name] = jax.device_get(jax.jit(tx.update)(g, tx.init(params), params)[0])
    for k in params:
        np.testing.assert_allclose(got["spread"][k], got["optax"][k], rtol=1e-5, atol=1e-7)
