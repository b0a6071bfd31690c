"""Orbax checkpoints of the train state, the data-iterator state and the config.

The data-iterator state is stored once, as JSON, rather than per process (grain's own handler
writes `process_I-of-N.json`): lmtrain's iterator state is the global batch position, the same
on every process, so a checkpoint written by N processes restores on any other number.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lmtrain.config import ConfigError

log = logging.getLogger("lmtrain")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class Checkpointer:
    """Keeps the last N checkpoints of (state, data iterator, config) under `directory`."""

    def __init__(
        self, directory: Path, keep: int = 3, async_save: bool = True, writer: bool = False
    ):
        """`writer`: this is the training run, which holds the workdir lock (train.workdir_lock),
        so a partial save left by an interrupted run (`N.orbax-checkpoint-tmp*`: a kill or a
        full disk mid-save) is no one's and is removed. Readers (eval, generate) never remove
        anything: a running trainer may be writing it."""
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.async_save = async_save
        if writer and jax.process_index() == 0 and self.directory.is_dir():
            for partial in sorted(self.directory.glob("*.orbax-checkpoint-tmp*")):
                size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
                shutil.rmtree(partial, ignore_errors=True)
                log.warning(
                    "removed %s (%.1f MB), a save an interrupted run left unfinished",
                    partial.name,
                    size / 1e6,
                )
        self._mngr = self._open()
        self._pending: int | None = None  # started, not yet known to be complete
        self._confirmed: int | None = self.latest_step()  # newest save known to be complete

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

    def save(self, step: int, state: Any, data_state: dict | None, config: dict) -> None:
        """Starts an (async) save; a failed save (this or the previous one) is a CheckpointError."""
        self.wait()  # the previous save first, so an error names the step that failed
        args = {"state": ocp.args.StandardSave(state), "config": ocp.args.JsonSave(config)}
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        try:
            self._mngr.save(step, args=ocp.args.Composite(**args), force=True)
        except Exception as e:  # noqa: BLE001 - any write failure ends the run the same way
            raise self._save_error(step, e) from e
        self._pending = step

    def wait(self) -> None:
        """Blocks until the started save is complete on disk (CheckpointError if it failed)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._save_error(self._pending, e) from e
        if self._pending is not None:
            self._confirmed, self._pending = self._pending, None

    def _save_error(self, step: int | None, e: BaseException) -> CheckpointError:
        last = "none" if self._confirmed is None else f"step {self._confirmed}"
        return CheckpointError(
            f"saving the checkpoint of step {step} in {self.directory} failed "
            f"({_first_line(e)}); the last complete checkpoint is {last}. Fix the directory "
            "(space, permissions, mount) and rerun to resume"
        )

    def restore(
        self, step: int, abstract_state: Any, data_iter: Any = None, partial: bool = False
    ) -> Any:
        """Restores `step` onto the shardings in `abstract_state`; resumes `data_iter` in place.

        `partial`: `abstract_state` names a part of the saved state (e.g. only "params"), and
        only that part is read from disk.
        """
        if partial:
            restore_args = jax.tree.map(
                lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract_state
            )
            state = ocp.args.PyTreeRestore(
                item=abstract_state, restore_args=restore_args, partial_restore=True
            )
        else:
            state = ocp.args.StandardRestore(abstract_state)
        args = {"state": state}
        if data_iter is not None:
            args["data"] = ocp.args.JsonRestore()
        restored = self._mngr.restore(step, args=ocp.args.Composite(**args))
        if data_iter is not None:
            data_iter.set_state(restored["data"])
        return restored["state"]

    def restore_latest(
        self,
        abstract_state: Any,
        data_iter: Any = None,
        partial: bool = False,
        step: int | None = None,
    ) -> tuple[int, Any] | None:
        """(step, state) from the newest readable checkpoint (or from `step` only), or None if
        there is none; `partial` as in `restore`.

        A checkpoint that fails to restore is moved aside to `corrupt-STEP-TIME/` (kept for
        inspection, never deleted) and the previous one is tried, so a damaged latest
        checkpoint costs the steps since the one before, never the run.
        """
        candidates = reversed(self.steps()) if step is None else [step]
        for step in candidates:
            try:
                state = self.restore(step, abstract_state, data_iter, partial)
                self._confirmed = step
                return step, state
            except ConfigError:
                raise  # readable, but not for this config (e.g. another data order): keep it
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
        """Waits for started saves (CheckpointError if one failed), then releases the manager."""
        try:
            self.wait()
        finally:
            self._mngr.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]
