"""The run that train, eval, generate, benchmarks and tests share.

resolve(cfg)          -> the config with its vocabulary filled in, checked, and its tokenizer
setup(cfg)            -> Run: mesh, abstract model, optimizer, abstract state + shardings
Run.init_state()      -> a fresh state, materialised directly in its shardings
compile_train_steps   -> THE place train steps are built and compiled, one per batch shape
compile_eval_steps    -> likewise for the eval step
check_resume_config   -> what may change when a workdir is resumed
restore_params        -> (run, params, step) of a workdir, params only (no optimizer state)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain import config as config_lib
from lmtrain import data, flops, models, optim, sharding, step
from lmtrain.checkpoint import FREE_ON_RESUME, Checkpointer, setting_change
from lmtrain.config import Config, ConfigError
from lmtrain.runguard import library_noise_to

log = logging.getLogger("lmtrain")


@dataclasses.dataclass
class Run:
    """Everything derived from a config that train, eval and generate share.

    A Run built with `optimizer=False` (eval, generate) has tx, schedule, abstract_state and
    state_shardings set to None: only the parameters exist.
    """

    cfg: Config
    mesh: jax.sharding.Mesh
    tokenizer: data.Tokenizer
    graphdef: nnx.GraphDef
    abstract_params: Any  # ShapeDtypeStructs carrying their target shardings
    param_shardings: Any
    n_params: int
    tx: Any = None
    schedule: Any = None
    abstract_state: dict | None = None  # {"step", "params", "opt_state"}, abstract and sharded
    state_shardings: dict | None = None
    optimizer_flops: float = 0.0  # per optimizer step beyond elementwise work (optim.step_flops)

    def init_state(self, params: Any = None, step: Any = 0) -> dict:
        """Materialises a fresh state directly in its shardings (never on one device first);
        `params` (e.g. model.init_from's, or a checkpoint's under train.restore=params) replace
        the random init, and the state starts at `step` with a fresh optimizer state."""
        if self.tx is None:
            raise ValueError("this Run was set up without an optimizer (optimizer=False)")
        cfg, tx = self.cfg, self.tx

        def init(params, step) -> dict:
            if params is None:
                model = models.build(cfg.model, nnx.Rngs(params=cfg.train.seed))
                params = nnx.to_pure_dict(nnx.state(model))
            return {
                "step": jnp.asarray(step, jnp.int32),
                "params": params,
                "opt_state": tx.init(params),
            }

        if params is not None:
            params = jax.device_put(params, self.param_shardings)
        return jax.jit(init, out_shardings=self.state_shardings)(params, step)


def resolve(cfg: Config) -> tuple[Config, data.Tokenizer]:
    """(cfg with model.vocab_size from its tokenizer, validated, the tokenizer)."""
    cfg = config_lib.with_family_config(cfg)
    cfg.validate()
    data.check_config(cfg)
    tokenizer = data.make_tokenizer(cfg.data)
    m = cfg.model
    if m.vocab_size == 0:
        m = dataclasses.replace(m, vocab_size=tokenizer.vocab_size)
    elif m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size {m.vocab_size} < the tokenizer's {tokenizer.vocab_size}"
        )
    return dataclasses.replace(cfg, model=m).validate(), tokenizer


def setup(cfg: Config, *, optimizer: bool = True, devices: list | None = None) -> Run:
    """Tokenizer, mesh, abstract model, shardings and (unless `optimizer=False`) the optimizer
    and abstract train state for `cfg`. `devices` (default: jax.devices()) may be a TPU
    topology's device descriptions, for compiling without the hardware (lmtrain.compile)."""
    cfg, tokenizer = resolve(cfg)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    dp = sharding.data_parallel_size(mesh)
    for batch, seq_len in cfg.train_shapes() if optimizer else []:
        if (batch // cfg.train.grad_accum) % dp:
            raise ConfigError(
                f"the batch of {batch} x {seq_len} tokens / train.grad_accum "
                f"{cfg.train.grad_accum} must be divisible by the data-parallel size {dp} "
                "(mesh.shape data x fsdp)"
            )
    if cfg.eval.batch_size % dp:
        raise ConfigError(f"eval.batch_size {cfg.eval.batch_size} must be divisible by {dp}")

    abstract_model = nnx.eval_shape(lambda: models.build(cfg.model, nnx.Rngs(params=0)))
    graphdef, abstract_vars = nnx.split(abstract_model)
    params = nnx.to_pure_dict(abstract_vars)
    param_specs = sharding.param_specs(abstract_vars, mesh)
    param_shardings = sharding.named(mesh, param_specs)
    run = Run(
        cfg,
        mesh,
        tokenizer,
        graphdef,
        _sharded(params, param_shardings),
        param_shardings,
        flops.count_params(params),
    )
    if not optimizer:
        return run
    masks = optim.decay_mask(abstract_vars), optim.muon_mask(abstract_vars)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps, *masks)
    shardings = sharding.named(mesh, sharding.state_specs(param_specs, tx, params))
    shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": params,
        "opt_state": jax.eval_shape(tx.init, params),
    }
    run.tx, run.schedule = tx, optim.make_schedule(cfg.optim, cfg.train.steps)
    run.optimizer_flops = optim.step_flops(cfg.optim, params, masks[1])
    run.abstract_state, run.state_shardings = _sharded(shapes, shardings), shardings
    return run


def _sharded(shapes: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )


# ---------------------------------------------------------------------------- compiled steps


def compile_train_steps(
    run: Run, shapes: list[tuple[int, int]], targets_per_row: int = 0, stop_flag: bool = True
) -> tuple[dict[int, Any], dict[int, float]]:
    """({seq_len: compiled train step}, {seq_len: compile seconds}) for every (global batch,
    seq_len) in `shapes`; all share the state shardings and donation (step.compile_train_step).

    Every shape is compiled now, so a shape that does not fit fails at start-up, not at step
    5,000. `stop_flag` adds the per-row "stop" input the loop uses to agree on a signal.
    """
    cfg = run.cfg
    fn = step.make_train_step(
        run.graphdef,
        run.tx,
        run.schedule,
        cfg.optim.z_loss,
        cfg.train.grad_accum,
        cfg.train.loss_chunk,
    )
    keys = (*step.TRAIN_KEYS, "stop") if stop_flag else step.TRAIN_KEYS
    compiled, seconds = {}, {}
    for batch, seq_len in shapes:
        t0 = time.perf_counter()
        spec = step.batch_spec(batch, seq_len, keys, targets_per_row)
        compiled[seq_len] = step.compile_train_step(
            fn, run.state_shardings, run.mesh, run.abstract_state, spec
        )
        seconds[seq_len] = time.perf_counter() - t0
    return compiled, seconds


def compile_eval_steps(
    run: Run, shapes: dict[int, int], targets_per_row: int = 0
) -> dict[int, Any]:
    """{seq_len: compiled eval step} for {seq_len: global batch}."""
    fn = step.make_eval_step(run.graphdef, run.cfg.train.loss_chunk)
    return {
        seq_len: step.compile_eval_step(
            fn,
            run.param_shardings,
            run.mesh,
            run.abstract_params,
            step.batch_spec(batch, seq_len, step.EVAL_KEYS, targets_per_row),
        )
        for seq_len, batch in shapes.items()
    }


# ---------------------------------------------------------------------------- workdirs

# Settings whose change on resume would read the saved data position wrongly (another token
# stream or row shape); the weights can still go on, through an export, into a new run.
_DATA_CHANGES = (
    "data.tokenizer",
    "data.seq_len",
    "data.source",
    "data.packing",
    "data.decompose.min_log2_len",
    "data.decompose.max_log2_len",
)
# Settings whose change alters the saved state tree, and the way past each.
_MODEL_WAY_OUT = (
    "drop the --set that changed it (or set the checkpoint's value); to train another model, "
    "use a new --workdir"
)
_DATA_WAY_OUT = (
    "use a new --workdir; to train these weights on the new data, `lmtrain export --workdir W "
    "--out DIR --format safetensors`, then train in a new --workdir with "
    "--set model.init_from=DIR"
)
_OPTIM_WAY_OUT = (
    "add --set train.restore=params to continue from the checkpoint's parameters, step and "
    "data position with a fresh optimizer state (or set the checkpoint's optim.name)"
)


def check_resume_config(saved: Config, new: Config) -> list[str]:
    """Keys that differ on resume (listed). A change that alters the state tree (a model shape,
    the optimizer) or the data order raises ConfigError naming each setting and its way out;
    nothing is read or moved before that."""
    a, b = config_lib.flat(saved), config_lib.flat(new)
    diffs = [k for k in a if a[k] != b.get(k)]
    # (A changed curriculum or cycle count is caught by the data iterator's own check.)
    problems = []
    for d in diffs:
        said = setting_change(d, a[d], b.get(d))
        if d.startswith("model.") and d not in FREE_ON_RESUME:
            problems.append((said, _MODEL_WAY_OUT))
        elif d in _DATA_CHANGES or d.startswith("data.mixture"):
            problems.append((said, _DATA_WAY_OUT))
        elif d == "optim.name" and new.train.restore != "params":
            problems.append((said, _OPTIM_WAY_OUT))
    if problems:
        ways = list(dict.fromkeys(w for _, w in problems))
        raise ConfigError(
            "the workdir holds a run that cannot resume with these settings: "
            + "; ".join(s for s, _ in problems)
            + ". Nothing was changed. To go on: "
            + "; or ".join(ways)
        )
    return diffs


def restore_params(
    workdir: Path, overrides: dict | None = None, step: int | None = None
) -> tuple[Run, Any, int]:
    """(run, params, step) from a checkpoint of `workdir` (the newest readable one, or `step`),
    for eval and generate: only the parameters are read, never the optimizer state."""
    workdir = Path(workdir).absolute()
    cfg = config_lib.load_json(workdir / "config.json")
    if overrides:
        cfg = config_lib.override(cfg, overrides)
    run = setup(cfg, optimizer=False)
    if not (workdir / "checkpoints").is_dir():
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    # A reader writes nothing in the workdir: the libraries' noise of a damaged checkpoint's
    # failed reads goes to a file of its own, made only if there is any.
    noise = Path(tempfile.gettempdir()) / f"lmtrain-read-{os.getpid()}.log"
    with library_noise_to(noise):
        return _restore_params(workdir, run, step)


def _restore_params(workdir: Path, run: Run, step: int | None) -> tuple[Run, Any, int]:
    ckpt = Checkpointer(workdir / "checkpoints", keep=run.cfg.train.keep_checkpoints)
    try:
        ckpt.warn_sidelined()
        steps = ckpt.steps()
        if step is not None and step not in steps:
            raise ConfigError(f"no checkpoint of step {step} in {workdir}; it has {steps}")
        restored = ckpt.restore_latest(
            {"params": run.abstract_params},
            partial=True,
            step=step,
            config=config_lib.to_dict(run.cfg),
        )
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    return run, restored.state["params"], restored.step
