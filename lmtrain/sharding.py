"""Device mesh, the one table of logical-axis rules, and state/batch shardings."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lmtrain.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# Logical parameter axis -> mesh axis. Everything not listed is replicated.
# fsdp shards the model width of every matrix (ZeRO-3 style; XLA all-gathers before use);
# tensor shards the "wide" side (heads, MLP hidden, vocab) as in Megatron.
RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": "tensor",
}


def mesh_shape(shape: tuple[int, ...], n_devices: int) -> tuple[int, ...]:
    """Resolves a single -1 in `shape` so the product equals `n_devices`."""
    known = math.prod(s for s in shape if s != -1)
    if any(s == 0 or s < -1 for s in shape):
        raise ConfigError(f"mesh.shape {shape} must hold positive sizes or one -1")
    if -1 in shape:
        if n_devices % known:
            raise ConfigError(f"mesh.shape {shape} does not divide {n_devices} devices")
        shape = tuple(n_devices // known if s == -1 else s for s in shape)
    if math.prod(shape) != n_devices:
        raise ConfigError(f"mesh.shape {shape} needs {math.prod(shape)} devices, have {n_devices}")
    return shape


def make_mesh(cfg: MeshConfig, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with automatic propagation."""
    devices = jax.devices() if devices is None else devices
    shape = tuple(cfg.shape)
    if -1 not in shape and math.prod(shape) < len(devices) and jax.process_count() == 1:
        devices = devices[: math.prod(shape)]  # e.g. (1, 1, 1): one device of several
    shape = mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """Logical axis names -> PartitionSpec; a dim the mesh axis doesn't divide stays whole."""
    used: set[str] = set()
    out = []
    for name, size in zip(axes, shape, strict=True):
        axis = RULES.get(name) if name else None
        if axis is None or axis in used or size % mesh.shape[axis] or mesh.shape[axis] == 1:
            out.append(None)
            continue
        used.add(axis)
        out.append(axis)
    return P(*out)


def param_specs(abstract_state: nnx.State, mesh: Mesh) -> dict:
    """PartitionSpecs for a model's parameters, as a pure dict matching `nnx.to_pure_dict`."""

    def spec(v: nnx.Variable) -> P:
        axes = v.get_metadata().get("logical_axes")
        shape = v.get_value().shape
        if axes is None:
            return P()
        return logical_to_spec(tuple(axes), shape, mesh)

    specs = jax.tree.map(spec, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(specs)


def state_specs(param_spec: dict, tx: optax.GradientTransformation, abstract_params: Any) -> dict:
    """Specs for the train state {step, params, opt_state}; optimizer moments follow the params."""
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    opt_spec = optax.tree_map_params(
        tx,
        lambda _, s: s,
        opt_abstract,
        param_spec,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    return {"step": P(), "params": param_spec, "opt_state": opt_spec}


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a [batch, ...] array split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
