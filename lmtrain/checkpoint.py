"""Orbax checkpoints of the train state, the data-iterator state and the config."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger("lmtrain")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class Checkpointer:
    """Keeps the last N checkpoints of (state, data iterator, config) under `directory`."""

    def __init__(self, directory: Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.async_save = async_save
        self._mngr = self._open()

    def _open(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep,
            enable_async_checkpointing=self.async_save,
            create=True,
        )
        return ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config")
        )

    def steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: dict) -> None:
        """Starts an (async) save; errors of an earlier async save are raised here."""
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self._mngr.save(step, args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        """Blocks until every started save is complete on disk (re-raising its error)."""
        self._mngr.wait_until_finished()

    def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
        """Restores `step` onto the shardings in `abstract_state`; resumes `data_iter` in place."""
        args = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        return restored["state"]

    def restore_latest(self, abstract_state: Any, data_iter: Any = None) -> tuple[int, Any] | None:
        """(step, state) from the newest readable checkpoint, or None if there is none.

        A checkpoint that fails to restore is moved aside to `corrupt-STEP-TIME/` (kept for
        inspection, never deleted) and the previous one is tried, so a damaged latest
        checkpoint costs the steps since the one before, never the run.
        """
        for step in reversed(self.steps()):
            try:
                return step, self.restore(step, abstract_state, data_iter)
            except Exception as e:  # noqa: BLE001 - any read failure means "unusable"
                log.warning(
                    "checkpoint at step %d is unreadable (%s); trying an older one",
                    step,
                    _first_line(e),
                )
                self._quarantine(step)
        if list(self.directory.glob("corrupt-*")):
            raise CheckpointError(
                f"every checkpoint in {self.directory} is unreadable (moved to corrupt-*/); "
                "start a fresh run in a new --workdir"
            )
        return None

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                src.rename(self.directory / f"corrupt-{step}-{int(time.time())}")
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"lmtrain_quarantine_{step}")
        self._mngr.close()
        self._mngr = self._open()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
