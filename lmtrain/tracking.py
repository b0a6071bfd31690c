"""Run outputs on process 0: metrics.jsonl, TensorBoard events, progress bar, run header; and
the throughput / MFU window a train row carries."""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import jax

from lmtrain import flops


class MetricsWindow:
    """Throughput and MFU over the steps since the last log row (steps may differ in length,
    so FLOPs are summed per step; MFU is `flops.mfu`, the one formula). `optimizer_flops` per
    step (Muon's Newton-Schulz, optim.step_flops) make the separate "with optimizer" MFU."""

    def __init__(
        self,
        step: int,
        tokens_per_step: int,
        flops_per_token: dict[int, float],
        peak,
        optimizer_flops: float = 0.0,
    ):
        self.tokens_per_step, self.fpt, self.peak = tokens_per_step, flops_per_token, peak
        self.optimizer_flops = optimizer_flops
        self._start = (step, time.time())
        self._flops = 0.0

    def add(self, seq_len: int) -> None:
        """Counts one finished step of sequences of `seq_len`."""
        self._flops += self.tokens_per_step * self.fpt[seq_len]

    def close(self, step: int) -> dict[str, float]:
        """{tokens_per_sec, mfu[, mfu_with_optimizer]} since the last close (or the start), and
        starts a new window."""
        (s0, t0), now = self._start, time.time()
        secs = max(now - t0, 1e-9)
        tokens = self.tokens_per_step * (step - s0)
        tok_s = tokens / secs
        mean_fpt = self._flops / max(tokens, 1)
        self._start, self._flops = (step, now), 0.0
        row = {"tokens_per_sec": tok_s, "mfu": flops.mfu(tok_s, mean_fpt, self.peak)}
        if self.optimizer_flops:
            with_opt = mean_fpt + self.optimizer_flops / self.tokens_per_step
            row["mfu_with_optimizer"] = flops.mfu(tok_s, with_opt, self.peak)
        return row


def _summary_writer() -> type:
    """tensorboardX's SummaryWriter, imported without torch.

    tensorboardX imports torch at module level when it is installed, only to accept torch
    tensors, which lmtrain never passes: 4.3 s of every run's start-up in a `.[dev]` venv
    (BENCHMARKS.md). While tensorboardX loads, `import torch` fails, and tensorboardX takes
    numpy arrays alone. A torch that is already imported is left as it is."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # type: ignore[assignment]  # import torch: ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class Tracker:
    """Writes metrics rows to `workdir/metrics.jsonl` and `workdir/tb/`; a no-op off process 0."""

    def __init__(
        self,
        workdir: Path,
        total_steps: int,
        start_step: int,
        progress: bool = True,
        wandb: dict[str, Any] | None = None,
    ):
        """`wandb`: {"project", "entity", "name", "config"} to log to Weights & Biases too."""
        self.enabled = jax.process_index() == 0
        self._bar = self._wandb = None
        if not self.enabled:
            return
        SummaryWriter = _summary_writer()
        workdir.mkdir(parents=True, exist_ok=True)
        if wandb and wandb.get("project"):
            self._wandb = _wandb_run(workdir, **wandb)
        self._jsonl = open(workdir / "metrics.jsonl", "a")  # closed in close()
        self._tb = SummaryWriter(str(workdir / "tb"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                smoothing=0.1,
                disable=None,  # None: off when not a terminal
            )

    def write(self, step: int, metrics: dict[str, Any], prefix: str = "train") -> None:
        """One metrics row: a JSON line plus one TensorBoard scalar per number."""
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                tag = k if "/" in k else f"{prefix}/{k}"
                self._tb.add_scalar(tag, v, int(step))
        self._tb.flush()
        if self._wandb is not None:
            scalars = {
                (k if "/" in k else f"{prefix}/{k}"): v
                for k, v in row.items()
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)
            }
            self._wandb.log(scalars, step=int(step))

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.enabled:
            self._tb.add_text(tag, text, step)

    @property
    def bar_shown(self) -> bool:
        """Whether a progress bar is on the console (train.progress and a terminal)."""
        return self._bar is not None and not self._bar.disable

    def progress(self, step: int, postfix: dict[str, float] | None = None) -> None:
        if self._bar is None:
            return
        self._bar.n = step
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self._bar.refresh()

    def print(self, msg: str) -> None:
        """A line on stderr that doesn't break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._tb.close()
        self._jsonl.close()
        if self._wandb is not None:
            self._wandb.finish()


def _wandb_run(workdir: Path, project: str, entity: str, name: str, config: dict) -> Any:
    """A W&B run for `workdir`; the same run again when the workdir resumes."""
    from lmtrain.errors import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "train.wandb_project needs the wandb extra: pip install 'lmtrain[wandb]'"
        ) from None
    id_file = workdir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(
        project=project,
        entity=entity or None,
        name=name or workdir.name,
        id=run_id,
        resume="allow",
        config=config,
        dir=str(workdir),
    )


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN; keep the row parseable
    return v
