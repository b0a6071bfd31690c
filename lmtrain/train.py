"""The training loop only: resolve the run -> data -> restore or init -> steps -> eval /
checkpoint / log. Everything it shares with eval, generate and benchmarks is in lmtrain.run."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmtrain import config as config_lib
from lmtrain import data, flops, runguard, sharding
from lmtrain import run as run_lib
from lmtrain.checkpoint import Checkpointer
from lmtrain.config import Config
from lmtrain.data.sources import cache_dir
from lmtrain.evaluate import Evaluator
from lmtrain.runguard import library_noise_to, workdir_lock
from lmtrain.tracking import MetricsWindow, Tracker

log = logging.getLogger("lmtrain")


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/Inf; the run stops without saving that state."""


def train(cfg: Config, workdir: Path) -> dict:
    """Trains (or resumes) the run in `workdir`; returns a summary of the last metrics. A second
    run on a busy workdir is refused (`workdir_lock`)."""
    workdir = Path(workdir).absolute()
    flops.fixed_cpu_peak()  # a bad LMTRAIN_CPU_PEAK_GFLOPS is refused before the workdir is touched
    with workdir_lock(workdir):
        log_name = (
            "lmtrain.log" if jax.process_index() == 0 else f"lmtrain.{jax.process_index()}.log"
        )
        with library_noise_to(workdir / log_name):
            return _train(cfg, workdir)


def _check_resume(cfg: Config, cfg_path: Path) -> None:
    """Refuses (ConfigError) a resume whose settings would change the run; warns of the
    settings that may change (run_lib.check_resume_config)."""
    if not cfg_path.exists():
        return
    saved = config_lib.load_json(cfg_path)
    vocab = cfg.model.vocab_size or saved.model.vocab_size
    new = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    changed = run_lib.check_resume_config(saved, new)
    if changed:
        log.warning("resuming with changed settings: %s", ", ".join(changed))


def _restore_or_init(run: run_lib.Run, ckpt: Checkpointer, it: Any) -> tuple[dict, str]:
    """(the train state, how it began: the header's last words): the newest usable checkpoint,
    else model.init_from's weights, else a random init."""
    cfg = run.cfg
    restored = ckpt.restore_latest(
        run.abstract_state,
        it,
        config=config_lib.to_dict(cfg),
        optimizer_optional=cfg.train.restore == "params",
    )
    if restored and restored.fresh_optimizer:
        state = run.init_state(restored.state["params"], step=restored.state["step"])
        how = f"with a fresh {cfg.optim.name} optimizer state (train.restore=params)"
        return state, f"resumed at step {int(state['step'])} {how}"
    if restored:
        return restored.state, f"resumed at step {int(restored.state['step'])}"
    if cfg.model.init_from:
        from lmtrain.interop.export import load_init

        return run.init_state(load_init(cfg.model.init_from, run)), (
            f"fresh start from {cfg.model.init_from}"
        )
    return run.init_state(), "fresh start"


def _header(run, corpus, fpt: dict, peak: float, peak_src: str, compile_s: dict, how: str) -> str:
    """The run's one-line summary: model, mesh, data, peak, compile time, how it began."""
    cfg, mesh = run.cfg, run.mesh
    tokens_per_step = cfg.tokens_per_step()
    what = corpus.train.describe(cfg.data.seq_len) if cfg.data.mixture else cfg.data.source
    optimizer = ""
    if run.optimizer_flops:
        per_token = run.optimizer_flops / tokens_per_step / 1e6
        optimizer = f" (+{per_token:.1f} of {cfg.optim.name}'s orthogonalisation)"
    return (
        f"lmtrain | {cfg.model.name} {run.n_params / 1e6:.2f}M params, "
        f"{fpt[max(fpt)] / 1e6:.1f} MFLOP/token at {max(fpt)}{optimizer}"
        f" | mesh {dict(mesh.shape)} on {jax.device_count()} {jax.devices()[0].platform} "
        f"devices, {jax.process_count()} process(es) | data {what}: "
        f"{corpus.stats['train']['tokens']:,} train tokens, {tokens_per_step:,} tokens/step | "
        f"peak {peak / 1e9:.0f} GFLOP/s ({peak_src}) | compile {sum(compile_s.values()):.1f}s | "
        + how
    )


class StepLog:
    """A step's metrics are fetched one step late (`flush`), so the host never waits on the
    step that is running: NaN stops the run, log rows and the progress bar are written, and a
    stop agreed through a step's metrics is noticed at the same step on every process."""

    def __init__(self, cfg: Config, tracker: Tracker, window: MetricsWindow, ckpt, start: int):
        self.cfg, self.tracker, self.window, self.ckpt = cfg, tracker, window, ckpt
        self.pending: tuple[int, dict, int] | None = None
        self.agreed_stop = False  # set from a step's metrics: every process sees it at one step
        self.summary: dict[str, Any] = {"step": start}
        self.multi_length = len(window.fpt) > 1
        self.seen = None  # TrainData.seen: epochs (a mixture's tokens/NAME, epochs/NAME)

    def flush(self) -> None:
        """Fetches the pending step's metrics, stops on NaN, logs."""
        if self.pending is None:
            return
        n, m, seq_len = self.pending
        self.pending = None
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if m.pop("finite") < 1:
            raise NonFiniteLoss(
                f"non-finite loss or gradient at step {n} (loss={m['loss']}, "
                f"grad_norm={m['grad_norm']}); stopped without saving that state. The last "
                f"checkpoint is step {self.ckpt.latest_step()}; try a lower optim.lr or "
                "optim.z_loss=1e-4"
            )
        self.agreed_stop = self.agreed_stop or m.pop("stop", 0.0) > 0
        self.summary.update(step=n, loss=m["loss"])
        self.window.add(seq_len)
        t = self.cfg.train
        if n % t.log_every == 0 or n == t.steps:
            self._row(n, m, seq_len)
        self.tracker.progress(n, {"loss": m["loss"]})

    def _row(self, n: int, m: dict, seq_len: int) -> None:
        tokens_per_step = self.window.tokens_per_step
        rate = self.window.close(n)
        row = {
            "loss": m["loss"],
            "lr": m["lr"],
            "grad_norm": m["grad_norm"],
            **rate,
            "seq_len": seq_len,
            "batch_size": tokens_per_step // seq_len,
            "tokens": n * tokens_per_step,
        }
        if self.multi_length:
            row["bucket"] = seq_len.bit_length() - 1  # k of the 2^k bucket
        if self.seen is not None:
            row.update(self.seen(n))
        self.tracker.write(n, row)
        self.summary.update(rate)
        if not self.tracker.bar_shown:  # SLURM logs, pipes: a plain line instead of the bar
            with_opt = rate.get("mfu_with_optimizer")
            self.tracker.print(
                f"step {n}/{self.cfg.train.steps}: loss {m['loss']:.4f}, "
                f"{rate['tokens_per_sec']:,.0f} tokens/s, MFU {rate['mfu']:.3f}"
                + (f" ({with_opt:.3f} with the optimizer)" if with_opt is not None else "")
            )


def _train(cfg: Config, workdir: Path) -> dict:
    t_start = time.time()
    cfg_path = workdir / "config.json"
    _check_resume(cfg, cfg_path)
    run = run_lib.setup(cfg)
    cfg, mesh = run.cfg, run.mesh
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.save_json(cfg, cfg_path)

    corpus = data.load_corpus(cfg.data, run.tokenizer)
    train_data = data.make_train_data(cfg, corpus.train, jax.process_index(), jax.process_count())
    it, scored = train_data.iterator, corpus.train.targets_per_row
    ckpt = Checkpointer(workdir / "checkpoints", keep=cfg.train.keep_checkpoints, writer=True)
    ckpt.warn_sidelined()
    state, how = _restore_or_init(run, ckpt, it)
    start = int(state["step"])

    train_steps, compile_s = run_lib.compile_train_steps(run, train_data.shapes, scored)
    evaluator = Evaluator(run, corpus.val) if corpus.val is not None else None
    fpt = {n: flops.train_flops_per_token(cfg.model, n, scored) for n in train_steps}
    peak, peak_src = flops.peak_flops(
        mesh.devices.flatten().tolist(), cfg.model.dtype, cache_dir(cfg.data) / "cpu_peak.json"
    )
    tokens_per_step = cfg.tokens_per_step()
    end_step = getattr(it, "end_step", None)  # a mixture whose data runs out
    end = cfg.train.steps if end_step is None else min(cfg.train.steps, end_step)

    t = cfg.train
    wandb = dict(
        project=t.wandb_project,
        entity=t.wandb_entity,
        name=t.wandb_run_name,
        config=config_lib.to_dict(cfg),
    )
    tracker = Tracker(workdir, t.steps, start, t.progress, wandb)
    if train_data.report:
        tracker.print("data | " + ", ".join(f"{k} {v:,}" for k, v in train_data.report.items()))
        if start == 0:
            tracker.write(0, {"data": train_data.report}, prefix="data")
    if len(compile_s) > 1:
        tracker.print(
            "compiled train step per (batch x seq_len): "
            + ", ".join(f"{tokens_per_step // n}x{n} {t:.1f}s" for n, t in compile_s.items())
        )
    tracker.print(_header(run, corpus, fpt, peak, peak_src, compile_s, how))
    if end < cfg.train.steps:
        tracker.print(f"data | {it.end_message()}: the run will stop there")
    if start == 0 and jax.process_index() == 0:
        tracker.text("config", "```\n" + cfg_path.read_text() + "\n```")

    window = MetricsWindow(start, tokens_per_step, fpt, peak, run.optimizer_flops)
    steps = StepLog(cfg, tracker, window, ckpt, start)
    steps.seen = train_data.seen
    summary, s = steps.summary, start
    watchdog = runguard.Watchdog(cfg.train.hang_timeout_s)
    profiler = runguard.Profiler(workdir, cfg.train.profile_steps, cfg.train.profile_process)
    try:
        with runguard.StopFlag() as stop:
            while s < end and not steps.agreed_stop:
                local = next(it)
                rows, seq_len = local["inputs"].shape
                local["stop"] = np.full((rows,), float(stop.signal is not None), np.float32)
                with profiler.step(s + 1):
                    batch = sharding.global_batch(local, mesh)
                    state, metrics = train_steps[seq_len](state, batch)
                profiler.done(s + 1, state)
                s += 1
                steps.flush()  # step s-1's metrics, while step s runs
                watchdog.pet(f"step {s - 1}")
                steps.pending = (s, metrics, seq_len)
                last = s == end
                if evaluator and (last or (cfg.train.eval_every and s % cfg.train.eval_every == 0)):
                    steps.flush()
                    ev = evaluator(state["params"], cfg.eval.max_batches, watchdog.pet)
                    tracker.write(s, ev, prefix="eval")
                    tracker.print(f"step {s}: " + " ".join(f"{k}={v:.4g}" for k, v in ev.items()))
                    summary.update(ev)
                save_now = cfg.train.checkpoint_every and s % cfg.train.checkpoint_every == 0
                if last or save_now or steps.agreed_stop:
                    steps.flush()  # never save a state whose step we haven't checked for NaN
                    ckpt.save(s, state, it.get_state(), config_lib.to_dict(cfg))
                    watchdog.pet(f"checkpoint {s}")
            steps.flush()
            if steps.agreed_stop and s < cfg.train.steps:
                tracker.print(
                    f"stopped by a signal at step {s}; checkpoint saved. "
                    "Run the same command again to resume."
                )
                summary["interrupted"] = True
            elif s == end < cfg.train.steps:  # a mixture's data ran out: said, never silent
                tracker.print(f"{it.end_message()}; stopped at step {s} of {cfg.train.steps}.")
                summary["data_ended"] = True
    finally:
        steps.pending = None
        profiler.close()
        try:
            ckpt.close()  # waits for async saves: a started checkpoint is completed or reported
        finally:
            watchdog.stop()
            tracker.close()
    summary["wall_s"] = time.time() - t_start
    return summary
