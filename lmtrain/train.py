"""The training loop: mesh -> data -> abstract init -> sharded init -> restore -> steps."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmtrain import config as config_lib
from lmtrain import data, flops, models, optim, sharding, step
from lmtrain.checkpoint import Checkpointer
from lmtrain.config import Config, ConfigError
from lmtrain.data.decompose import make_train_data
from lmtrain.evaluate import Evaluator
from lmtrain.tracking import Tracker

log = logging.getLogger("lmtrain")


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the run stops without saving that state."""


@dataclasses.dataclass
class Run:
    """Everything derived from a config that train, eval and generate share."""

    cfg: Config
    mesh: jax.sharding.Mesh
    tokenizer: Any
    graphdef: nnx.GraphDef
    tx: Any
    schedule: Any
    abstract_state: dict  # ShapeDtypeStructs carrying their target shardings
    state_shardings: dict
    n_params: int

    def init_state(self) -> dict:
        """Materialises a fresh state directly in its shardings (never on one device first)."""
        cfg = self.cfg

        def init() -> dict:
            model = models.build(cfg.model, nnx.Rngs(params=cfg.train.seed))
            params = nnx.to_pure_dict(nnx.state(model))
            return {
                "step": jnp.zeros((), jnp.int32),
                "params": params,
                "opt_state": self.tx.init(params),
            }

        return jax.jit(init, out_shardings=self.state_shardings)()


def setup(cfg: Config) -> Run:
    """Tokenizer, mesh, abstract model and shardings for `cfg` (vocab size filled in)."""
    tokenizer = data.make_tokenizer(cfg.data)
    m = cfg.model
    if m.vocab_size == 0:
        m = dataclasses.replace(m, vocab_size=tokenizer.vocab_size)
    elif m.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size {m.vocab_size} < the tokenizer's {tokenizer.vocab_size}"
        )
    cfg = dataclasses.replace(cfg, model=m).validate()
    mesh = sharding.make_mesh(cfg.mesh)
    dp = sharding.data_parallel_size(mesh)
    for batch, seq_len in cfg.train_shapes():
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
    abstract_params = nnx.to_pure_dict(abstract_vars)
    tx = optim.make_optimizer(cfg.optim, cfg.train.steps, optim.decay_mask(abstract_vars))
    schedule = optim.make_schedule(cfg.optim, cfg.train.steps)
    specs = sharding.state_specs(sharding.param_specs(abstract_vars, mesh), tx, abstract_params)
    shardings = sharding.named(mesh, specs)
    shapes = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": jax.eval_shape(tx.init, abstract_params),
    }
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes, shardings
    )
    n_params = flops.count_params(abstract_params)
    return Run(cfg, mesh, tokenizer, graphdef, tx, schedule, abstract_state, shardings, n_params)


_FATAL_DATA_CHANGES = (
    "data.tokenizer",
    "data.seq_len",
    "data.source",
    "data.packing",
    "data.min_log2_len",
    "data.max_log2_len",
)


def check_resume_config(saved: Config, new: Config) -> list[str]:
    """Keys that may differ on resume (listed); model/data shape changes raise ConfigError."""
    a, b = config_lib.to_dict(saved), config_lib.to_dict(new)
    diffs = [f"{s}.{k}" for s in a for k in a[s] if a[s][k] != b.get(s, {}).get(k)]
    fatal = [d for d in diffs if d.startswith("model.") or d in _FATAL_DATA_CHANGES]
    if fatal:
        detail = ", ".join(f"{d}: {_get(a, d)!r} -> {_get(b, d)!r}" for d in fatal)
        raise ConfigError(
            f"the workdir holds a run with a different model or data ({detail}); "
            "use a new --workdir"
        )
    return diffs


def _get(d: dict, key: str) -> Any:
    s, k = key.split(".")
    return d[s].get(k)


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to save and exit; a second SIGINT aborts at once."""

    def __init__(self):
        self.signal: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _Watchdog:
    """Ends the process with a clear error when the loop stops making progress.

    A process whose peer died waits forever inside a collective or a checkpoint barrier; no
    Python exception ever reaches it. This thread turns that into exit status 1 within
    `timeout_s`, so schedulers see a failure and the rerun resumes from the last checkpoint.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.where = "start-up"
        self._last = time.monotonic()
        self._done = threading.Event()
        if timeout_s > 0:
            threading.Thread(target=self._watch, daemon=True, name="lmtrain-watchdog").start()

    def pet(self, where: str) -> None:
        self.where = where
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(self.timeout_s / 10, 5.0)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(
                    f"lmtrain: error: no progress for {idle:.0f} s after {self.where} on "
                    f"process {jax.process_index()} (another process may have died or hung; "
                    "train.hang_timeout_s sets the limit); exiting. Rerun to resume from the "
                    "last complete checkpoint.",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(1)

    def stop(self) -> None:
        self._done.set()


def train(cfg: Config, workdir: Path) -> dict:
    """Trains (or resumes) the run in `workdir`; returns a summary of the last metrics."""
    workdir = Path(workdir).absolute()
    t_start = time.time()
    cfg_path = workdir / "config.json"
    if cfg_path.exists():
        saved = config_lib.load_json(cfg_path)
        new = dataclasses.replace(
            cfg,
            model=dataclasses.replace(
                cfg.model, vocab_size=cfg.model.vocab_size or saved.model.vocab_size
            ),
        )
        changed = check_resume_config(saved, new)
        if changed:
            log.warning("resuming with changed settings: %s", ", ".join(changed))
    run = setup(cfg)
    cfg, mesh = run.cfg, run.mesh
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(cfg, cfg_path)

    corpus = data.load_corpus(cfg.data, run.tokenizer)
    it, shapes, data_report = make_train_data(
        cfg, corpus.train, jax.process_index(), jax.process_count()
    )
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    restored = ckpt.restore_latest(run.abstract_state, it)
    state = restored[1] if restored else run.init_state()
    start = int(state["step"])

    targets_per_row = getattr(corpus.train, "targets_per_row", 0)
    train_fn = step.make_train_step(
        run.graphdef, run.tx, run.schedule, cfg.optim.z_loss, cfg.train.grad_accum
    )
    # Every shape is compiled now, so a shape that does not fit fails at start-up, and every
    # one shares the state shardings and donation (step.compile_train_step).
    train_steps, compile_s = {}, {}
    for batch, seq_len in shapes:
        t0 = time.time()
        spec = step.batch_spec(batch, seq_len, (*step.TRAIN_KEYS, "stop"), targets_per_row)
        train_steps[seq_len] = step.compile_train_step(
            train_fn, run.state_shardings, mesh, run.abstract_state, spec
        )
        compile_s[seq_len] = time.time() - t0
    evaluator = Evaluator(run, corpus.val) if corpus.val is not None else None
    fpt = {n: flops.train_flops_per_token(cfg.model, n, targets_per_row) for n in train_steps}
    flops_per_token = fpt[max(fpt)]
    peak, peak_src = flops.peak_flops(mesh.devices.flatten().tolist(), cfg.model.dtype)
    tokens_per_step = cfg.tokens_per_step()

    tracker = Tracker(workdir, cfg.train.steps, start, cfg.train.progress)
    if data_report:
        tracker.print("data | " + ", ".join(f"{k} {v:,}" for k, v in data_report.items()))
        if start == 0:
            tracker.write(0, {"data": data_report}, prefix="data")
    if len(compile_s) > 1:
        tracker.print(
            "compiled train step per (batch x seq_len): "
            + ", ".join(f"{tokens_per_step // n}x{n} {t:.1f}s" for n, t in compile_s.items())
        )
    tracker.print(
        f"lmtrain | {cfg.model.name} {run.n_params / 1e6:.2f}M params, "
        f"{flops_per_token / 1e6:.1f} MFLOP/token at {max(fpt)} | mesh {dict(mesh.shape)} on "
        f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} "
        f"process(es) | data {cfg.data.source}: {corpus.stats['train']['tokens']:,} train tokens, "
        f"{tokens_per_step:,} tokens/step | peak {peak / 1e9:.0f} GFLOP/s ({peak_src}) | "
        f"compile {sum(compile_s.values()):.1f}s | "
        + (f"resumed at step {start}" if restored else "fresh start")
    )
    if start == 0 and jax.process_index() == 0:
        tracker.text("config", "```\n" + cfg_path.read_text() + "\n```")

    summary: dict[str, Any] = {"step": start}
    pending: tuple[int, dict] | None = None
    last_log = (start, time.time())
    s = start
    agreed_stop = False  # set from a step's metrics, so every process sees it at the same step

    window_flops = 0.0  # model FLOPs since the last log row (steps differ by bucket)

    def flush() -> None:
        """Fetches the pending step's metrics (one step late), stops on NaN, logs."""
        nonlocal pending, last_log, agreed_stop, window_flops
        if pending is None:
            return
        n, m, seq_len = pending
        pending = None
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if m.pop("finite") < 1:
            raise NonFiniteLoss(
                f"non-finite loss or gradient at step {n} (loss={m['loss']}, "
                f"grad_norm={m['grad_norm']}); stopped without saving that state. The last "
                f"checkpoint is step {ckpt.latest_step()}; try a lower optim.lr or "
                "optim.z_loss=1e-4"
            )
        agreed_stop = agreed_stop or m.pop("stop", 0.0) > 0
        summary.update(step=n, loss=m["loss"])
        window_flops += tokens_per_step * fpt[seq_len]
        if n % cfg.train.log_every == 0 or n == cfg.train.steps:
            now = time.time()
            secs = max(now - last_log[1], 1e-9)
            tok_s = tokens_per_step * (n - last_log[0]) / secs
            row = {
                "loss": m["loss"],
                "lr": m["lr"],
                "grad_norm": m["grad_norm"],
                "tokens_per_sec": tok_s,
                "mfu": window_flops / secs / peak,
                "seq_len": seq_len,
                "batch_size": tokens_per_step // seq_len,
                "tokens": n * tokens_per_step,
            }
            if len(fpt) > 1:
                row["bucket"] = seq_len.bit_length() - 1  # k of the 2^k bucket
            last_log, window_flops = (n, now), 0.0
            tracker.write(n, row)
            summary.update(tokens_per_sec=tok_s, mfu=row["mfu"])
        tracker.progress(n, {"loss": m["loss"]})

    watchdog = _Watchdog(cfg.train.hang_timeout_s)
    try:
        with _StopFlag() as stop:
            while s < cfg.train.steps and not agreed_stop:
                local = next(it)
                rows, seq_len = local["inputs"].shape
                asked = float(stop.signal is not None)
                local["stop"] = np.full((rows,), asked, np.float32)
                train_step = train_steps[seq_len]
                state, metrics = train_step(state, sharding.global_batch(local, mesh))
                s += 1
                flush()  # step s-1's metrics, while step s runs
                watchdog.pet(f"step {s - 1}")
                pending = (s, metrics, seq_len)
                last = s == cfg.train.steps
                if evaluator and (last or (cfg.train.eval_every and s % cfg.train.eval_every == 0)):
                    flush()
                    ev = evaluator(state["params"], cfg.eval.max_batches, watchdog.pet)
                    tracker.write(s, ev, prefix="eval")
                    tracker.print(f"step {s}: " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                    summary.update(ev)
                save_now = cfg.train.checkpoint_every and s % cfg.train.checkpoint_every == 0
                if last or save_now or agreed_stop:
                    flush()  # never save a state whose step we haven't checked for NaN
                    ckpt.save(s, state, it.get_state(), config_lib.to_dict(cfg))
                    watchdog.pet(f"checkpoint {s}")
            flush()
            if agreed_stop and s < cfg.train.steps:
                tracker.print(
                    f"stopped by a signal at step {s}; checkpoint saved. "
                    "Run the same command again to resume."
                )
                summary["interrupted"] = True
    finally:
        pending = None
        try:
            ckpt.close()  # waits for async saves: a started checkpoint is completed or reported
        finally:
            watchdog.stop()
            tracker.close()
    summary["wall_s"] = time.time() - t_start
    return summary


def restore_params(workdir: Path, overrides: dict | None = None) -> tuple[Run, Any, int]:
    """(run, params, step) from the newest readable checkpoint of `workdir`, for eval/generate."""
    workdir = Path(workdir).absolute()
    cfg = config_lib.load_json(workdir / "config.json")
    if overrides:
        cfg = config_lib.override(cfg, overrides)
    run = setup(cfg)
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints)
    try:
        restored = ckpt.restore_latest(run.abstract_state)
    finally:
        ckpt.close()
    if restored is None:
        raise ConfigError(f"no checkpoint in {workdir / 'checkpoints'}; train first")
    s, state = restored
    return run, state["params"], s
