"""Muon whose Newton-Schulz work is spread over the chips (optim.name="muon").

optax.contrib.muon orthogonalises every hidden matrix where it lies: on an fsdp mesh each chip
gathers every whole matrix and repeats every Newton-Schulz iteration, so at 64 chips the
optimizer costs as much as half the model. Here the matrices are stacked (`plan`: one stack
per shape, or one zero-padded stack of all when that costs a chip less), each stack is split
over every mesh axis (padded with zero matrices to a multiple of the devices), each chip
orthogonalises its own few, and the results go back to the parameters' layout: the per-chip
work falls from all the matrices to ceil(count / chips) of each stack, as in distributed Muon
implementations (Moonlight's, Dion's). With fewer matrices than chips most chips idle: XLA's
own partitioning of each matrix's products can then do less arithmetic per chip, at the price
of all-reduces (BENCHMARKS.md, "Muon at scale").

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


def _ns_cost(shape: tuple[int, int]) -> int:
    m, n = sorted(shape)
    return NS_STEPS * (4 * m * m * n + 2 * m**3)


def plan(shapes: list[tuple[int, int]], n: int) -> list[tuple[tuple[int, int], list[int]]]:
    """Stacks of matrix indices and the (rows <= cols) shape each stack is padded to. Matrices
    are taken wide (the iteration commutes with transposition) and grouped by shape; if one
    stack of all of them, zero-padded to the largest rows and columns, costs a chip less (it
    does ceil(count / n) matrices of each stack), it is used instead. Zero rows and columns
    change nothing: X X^T only gains zero rows and columns, and the norm is the same."""
    wide = [tuple(sorted(s)) for s in shapes]
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(wide):
        groups.setdefault(s, []).append(i)
    per_shape = sum(-(-len(idx) // n) * _ns_cost(s) for s, idx in groups.items())
    big = (max(s[0] for s in wide), max(s[1] for s in wide))
    if len(groups) > 1 and -(-len(wide) // n) * _ns_cost(big) < per_shape:
        return [(big, list(range(len(wide))))]
    return list(groups.items())


def orthogonalise(leaves: list[jax.Array], coeffs: jax.Array) -> list[jax.Array]:
    """newton_schulz of every matrix, stacked as `plan` says and split over the chips."""
    axes, n = _spread_axes()
    out: list[Any] = [None] * len(leaves)
    for (rows, cols), idx in plan([x.shape for x in leaves], n):
        wide = [leaves[i] if leaves[i].shape[0] <= leaves[i].shape[1] else leaves[i].T for i in idx]
        stack = jnp.stack(
            [jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1]))) for x in wide]
        )
        if n > 1:
            stack = jnp.pad(stack, ((0, -len(idx) % n), (0, 0), (0, 0)))
            stack = jax.lax.with_sharding_constraint(stack, P(axes, None, None))
        done = jax.vmap(lambda x: newton_schulz(x, coeffs))(stack)
        if n > 1:
            done = jax.lax.with_sharding_constraint(done, P(axes, None, None))
        for j, i in enumerate(idx):
            r, c = wide[j].shape
            x = done[j, :r, :c]
            out[i] = x if leaves[i].shape[0] <= leaves[i].shape[1] else x.T
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
