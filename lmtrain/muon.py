"""Muon whose Newton-Schulz work is spread over the chips (optim.name="muon").

optax.contrib.muon orthogonalises every hidden matrix where it lies: on an fsdp mesh each chip
gathers every whole matrix and repeats every Newton-Schulz iteration, so at 64 chips the
optimizer costs as much as half the model. Here the matrices of one shape are stacked, the stack
is split over every mesh axis (padded with zero matrices to a multiple of the devices), each
chip orthogonalises its own few, and the results go back to the parameters' layout: the
per-chip work falls from all the matrices to about one matrix of each shape, as in distributed
Muon implementations (Moonlight's, Dion's).

The arithmetic is optax.contrib.muon's (momentum with Nesterov, bias-corrected, X / (|X|_F +
eps), five quintic Newton-Schulz steps on the wide orientation, width or consistent-RMS scaling,
decoupled weight decay) and its state tree is the same, so a checkpoint of either restores in
the other. tests/test_optim.py holds it to optax.contrib.muon and to a numpy reference.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.contrib
from jax.sharding import PartitionSpec as P

NS_COEFFS = (3.4445, -4.775, 2.0315)  # optax.contrib.muon's default quintic
NS_STEPS = 5


def newton_schulz(x: jax.Array, coeffs: jax.Array, steps: int = NS_STEPS, eps=1e-8) -> jax.Array:
    """The orthogonal factor of matrix x, approximately: x / (|x|_F + eps), then `steps` of
    X <- a X + (b A + c A A) X with A = X X^T, on the orientation with fewer rows."""
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T
    x = x / (jnp.linalg.norm(x) + eps)
    c = coeffs.astype(x.dtype)
    for _ in range(steps):
        a = x @ x.T
        x = c[0] * x + (c[1] * a + c[2] * a @ a) @ x
    return x if wide else x.T


def _spread_axes() -> tuple[tuple[str, ...], int]:
    """The mesh axes (and their device count) a stack of matrices is split over: all of the
    traced step's mesh (jax.set_mesh) with more than one device; () outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    return axes, math.prod(mesh.shape[a] for a in axes)


def orthogonalise(leaves: list[jax.Array], coeffs: jax.Array) -> list[jax.Array]:
    """newton_schulz of every matrix, each shape's matrices stacked and split over the chips."""
    axes, n = _spread_axes()
    out: list[Any] = [None] * len(leaves)
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.shape, x.dtype), []).append(i)
    for idx in groups.values():
        stack = jnp.stack([leaves[i] for i in idx])
        if n > 1:
            pad = -len(idx) % n
            stack = jnp.pad(stack, ((0, pad), (0, 0), (0, 0)))
            stack = jax.lax.with_sharding_constraint(stack, P(axes, None, None))
        done = jax.vmap(lambda x: newton_schulz(x, coeffs))(stack)
        if n > 1:
            done = jax.lax.with_sharding_constraint(done, P(axes, None, None))
        for j, i in enumerate(idx):
            out[i] = done[j]
    return out


def scale_by_spread_muon(beta: float, nesterov: bool) -> optax.GradientTransformation:
    """Muon's momentum and orthogonalisation (optax.contrib.scale_by_muon's state), with the
    Newton-Schulz work spread over the mesh."""
    muon_state = optax.contrib.MuonState

    def init(params):
        mu = jax.tree.map(jnp.zeros_like, params)
        return muon_state(jnp.zeros([], jnp.int32), mu, jnp.asarray(NS_COEFFS))

    def update(updates, state, params=None):
        del params
        mu = optax.tree.update_moment(updates, state.mu, beta, 1)
        count = optax.safe_increment(state.count)
        if nesterov:  # beta m_hat(t+1) + (1 - beta) g_hat(t)
            m_next = optax.tree.bias_correction(mu, beta, optax.safe_increment(count))
            g_hat = optax.tree.bias_correction(updates, beta, count)
            mu_hat = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, m_next, g_hat)
        else:
            mu_hat = optax.tree.bias_correction(mu, beta, count)
        leaves, tree = jax.tree.flatten(mu_hat)
        new = jax.tree.unflatten(tree, orthogonalise(leaves, state.ns_coeffs))
        return new, muon_state(count, mu, state.ns_coeffs)

    return optax.GradientTransformation(init, update)


def muon(
    lr: optax.ScalarOrSchedule,
    *,
    beta: float,
    nesterov: bool,
    weight_decay: float,
    consistent_rms: float | None,
) -> optax.GradientTransformation:
    """optax.contrib.muon(lr, ...) on a tree of 2-D (in, out) matrices only, its state tree
    included, with the Newton-Schulz work spread over the mesh."""

    def shape_scale(x: jax.Array) -> jax.Array:  # x is (fan_in, fan_out)
        fan_in, fan_out = x.shape
        if consistent_rms is not None:
            return x * (math.sqrt(max(fan_in, fan_out)) * consistent_rms)
        return x * math.sqrt(max(1.0, fan_out / fan_in))

    chain = optax.chain(
        scale_by_spread_muon(beta, nesterov),
        optax.stateless(lambda u, _: jax.tree.map(shape_scale, u)),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(lr),
    )
    # optax.contrib.muon is a partition of this chain and an AdamW for non-matrices; every leaf
    # it is given here is a matrix, so the AdamW side holds only masked nodes.
    return optax.partition(
        {"muon": chain, "adam": optax.adamw(lr)}, lambda p: jax.tree.map(lambda _: "muon", p)
    )
