"""Device mesh, the one table of logical-axis rules, and state/batch shardings."""

from __future__ import annotations

import math
from typing import Any

import jax
import optax
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lmtrain.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "sequence")
SEQUENCE = "sequence"  # splits each row along its length (models/sequence.py)
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


# Logical activation axis -> mesh axes. The models name their activations' axes at a few
# points (sharding.constrain); without these constraints XLA is free to choose layouts, and
# with the model width sharded over fsdp it chose to replicate the batch (issue 13: 48 GiB per
# chip where data parallelism needs 9).
ACTIVATION_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH,
    "length": SEQUENCE,
    "embed": None,  # the residual stream stays whole on each chip; its batch is split
    "heads": "tensor",
    "kv": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
}


def activation_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Any) -> P:
    """Logical activation axes -> PartitionSpec over `mesh`; an axis whose mesh size is 1 or
    does not divide the dimension (a decode batch of 1, say) stays unsplit."""
    out: list = []
    manual = set(getattr(mesh, "manual_axes", ()))  # inside a shard_map: those are its own
    for name, size in zip(axes, shape, strict=True):
        rule = ACTIVATION_RULES.get(name) if name else None
        names = (rule,) if isinstance(rule, str) else tuple(rule or ())
        names = tuple(a for a in names if mesh.shape[a] > 1 and a not in manual)
        n = math.prod(mesh.shape[a] for a in names)
        if not names or size % n:
            out.append(None)
        else:
            out.append(names if len(names) > 1 else names[0])
    return P(*out)


def constrain(x: jax.Array, *axes: str | None) -> jax.Array:
    """Pins activation `x`'s layout by logical axis names (ACTIVATION_RULES) when traced under
    a mesh (`jax.set_mesh`, as the compiled steps are); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(axes, x.shape, mesh))


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


def make_mesh(cfg: Any, devices: list | None = None) -> Mesh:
    """A (data, fsdp, tensor, sequence) mesh of `cfg.shape` (a config.MeshConfig: this module cannot
    import the config, which imports the models, which import this) over `devices` (default:
    all), with automatic propagation.

    Devices of several TPU slices (multi-slice; their `slice_index` differs) are laid out with
    `data` across the slices, so only data parallelism crosses the slow inter-slice network.
    """
    devices = jax.devices() if devices is None else devices
    shape = tuple(cfg.shape)
    if -1 not in shape and math.prod(shape) < len(devices) and jax.process_count() == 1:
        devices = devices[: math.prod(shape)]  # e.g. (1, 1, 1): one device of several
    shape = mesh_shape(shape, len(devices))
    types = (AxisType.Auto,) * len(AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices > 1:
        if shape[0] % slices:
            raise ConfigError(
                f"mesh.shape {shape}: the data axis ({shape[0]}) must be a multiple of the "
                f"{slices} slices (only data parallelism crosses slices)"
            )
        ici = (shape[0] // slices, *shape[1:])
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, (slices, 1, 1, 1), devices, allow_split_physical_axes=True
        )
        return Mesh(grid, AXES, axis_types=types)
    try:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devices)
    except NotImplementedError:
        # e.g. (8, 8, 1) on a 4x4x4 torus: an axis must span parts of two physical axes.
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        return Mesh(grid, AXES, axis_types=types)


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
    """Specs for the train state {step, params, opt_state}: every optimizer-state leaf that
    sits under a parameter's own key path, with that parameter's shape, is sharded like it
    (Adam's moments, Muon's momentum); everything else (counts, factored statistics) is
    replicated. Matching key paths, not tree structures, works for any optax state, including
    the masked and partitioned ones of `optax.partition` / `optax.masked`, whose MaskedNode
    placeholders hold no arrays."""
    opt_abstract = jax.eval_shape(tx.init, abstract_params)
    flat_spec = jax.tree_util.tree_flatten_with_path(param_spec, is_leaf=lambda x: isinstance(x, P))
    specs = {tuple(path): spec for path, spec in flat_spec[0]}
    shapes = {
        tuple(path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    lengths = sorted({len(k) for k in specs}, reverse=True)

    def spec_for(path, leaf) -> P:
        for n in lengths:
            tail = tuple(path[-n:])
            if len(path) >= n and tail in specs and shapes[tail] == leaf.shape:
                return specs[tail]
        return P()

    opt_spec = jax.tree_util.tree_map_with_path(spec_for, opt_abstract)
    return {"step": P(), "params": param_spec, "opt_state": opt_spec}


def named(mesh: Mesh, specs: Any) -> Any:
    """PartitionSpec tree -> NamedSharding tree."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...] = ()) -> NamedSharding:
    """Rows of a [batch, ...] array split over the data-parallel axes, and the length of a
    [batch, length] array over `sequence` (where it divides)."""
    n = mesh.shape[SEQUENCE]
    if len(shape) == 2 and n > 1 and shape[1] % n == 0:
        return NamedSharding(mesh, P(BATCH, SEQUENCE))
    return NamedSharding(mesh, P(BATCH))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the batch axes."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.shape), v)
        for k, v in local.items()
    }
