"""Orbax checkpoints of the train state, the data-iterator state and the config.

The data-iterator state is stored once, as JSON, rather than per process (grain's own handler
writes `process_I-of-N.json`): lmtrain's iterator state is the global batch position, the same
on every process, so a checkpoint written by N processes restores on any other number.

Two ways a restore can fail, told apart before any array is read:
- the checkpoint is readable but holds another model or optimizer than the one asked (its saved
  shapes and state tree, from orbax's metadata, differ from the abstract state): a
  `CheckpointMismatch`, a config error (exit 2) that names what differs; nothing is touched;
- its bytes are wrong (a missing or truncated file, undecodable metadata): corruption. Only the
  trainer (`writer=True`, holding the workdir lock) moves such a checkpoint aside to
  `corrupt-STEP-TIME/`; readers (eval, generate, export, lm-eval) skip it and leave it in place.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lmtrain.config import ConfigError, flat_dict

log = logging.getLogger("lmtrain")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


class CheckpointMismatch(ConfigError):
    """A readable checkpoint of another model or optimizer than the one asked (exit 2)."""


@dataclasses.dataclass
class Restored:
    """What `restore_latest` found: the step, the state read, and whether the optimizer state
    was left out because it belongs to another optimizer (`optimizer_optional`): then the
    caller starts a fresh one."""

    step: int
    state: Any
    fresh_optimizer: bool = False


class Checkpointer:
    """Keeps the last N checkpoints of (state, data iterator, config) under `directory`."""

    def __init__(
        self, directory: Path, keep: int = 3, async_save: bool = True, writer: bool = False
    ):
        """`writer`: this is the training run, which holds the workdir lock (runguard.workdir_lock),
        so a partial save left by an interrupted run (`N.orbax-checkpoint-tmp*`: a kill or a
        full disk mid-save) is no one's and is removed. Readers (eval, generate) never remove
        anything: a running trainer may be writing it."""
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.async_save = async_save
        self.writer = writer
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
        except Exception as e:  # any write failure ends the run the same way
            raise self._save_error(step, e) from e
        self._pending = step

    def wait(self) -> None:
        """Blocks until the started save is complete on disk (CheckpointError if it failed)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
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
        if partial and self.writer:
            # The manager keeps the handler a restore chose for "state" (PyTree's), and its
            # saves then refuse StandardSave: start the saves on a fresh manager.
            self._mngr.close()
            self._mngr = self._open()
        if data_iter is not None:
            data_iter.set_state(restored["data"])
        return restored["state"]

    def saved_arrays(self, step: int) -> dict[str, tuple[int, ...]]:
        """{path: shape} of every array in checkpoint `step`'s state, from its metadata alone
        (no array is read). Raises if the metadata is missing or undecodable."""
        tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        if tree is None:
            raise ValueError("the state's metadata is missing")
        return {
            _path(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if isinstance(leaf, ocp.metadata.ArrayMetadata)
        }

    def saved_config(self, step: int) -> dict | None:
        """The config checkpoint `step` was written with (None if it cannot be read)."""
        try:
            args = ocp.args.Composite(config=ocp.args.JsonRestore())
            return self._mngr.restore(step, args=args)["config"]
        except Exception:  # only used to word messages
            return None

    def restore_latest(
        self,
        abstract_state: Any,
        data_iter: Any = None,
        partial: bool = False,
        step: int | None = None,
        config: dict | None = None,
        optimizer_optional: bool = False,
    ) -> Restored | None:
        """The newest usable checkpoint (or `step` only) restored onto `abstract_state`, or None
        if there is none; `partial` as in `restore`.

        Before any array is read, the checkpoint's saved shapes and state tree are compared
        with `abstract_state`: a difference is a CheckpointMismatch naming it (with `config`,
        the asked config as a dict, in settings' words), and nothing in the directory changes.
        `optimizer_optional` (train.restore=params): an optimizer state of another optimizer is
        left out instead (`Restored.fresh_optimizer`); parameters, step and data position are
        read.

        A checkpoint whose bytes are wrong is skipped and the previous one tried. Once an older
        one restores, the trainer (`writer`) moves the skipped ones aside to
        `corrupt-STEP-TIME/` (never deleted); readers leave them where they are. When none
        restores, nothing is moved: the fault may not be in the files.
        """
        candidates = list(reversed(self.steps())) if step is None else [step]
        skipped: list[tuple[int, str]] = []
        for step in candidates:
            try:
                saved = self.saved_arrays(step)
            except Exception as e:  # the metadata itself is damaged
                skipped.append((step, self._unreadable(step, e)))
                continue
            wanted = {
                _path(p): tuple(a.shape)
                for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)
            }
            fresh = False
            diff = _differences(saved, wanted, partial)
            if diff:
                opt_only = all(k.startswith("opt_state") for k, _, _ in diff)
                if not (opt_only and optimizer_optional):
                    raise self._mismatch(step, diff, config)
                fresh, partial = True, True
                abstract_state = {k: v for k, v in abstract_state.items() if k != "opt_state"}
            try:
                state = self.restore(step, abstract_state, data_iter, partial)
            except ConfigError:
                raise  # readable, but not for this config (e.g. another data order): keep it
            except Exception as e:  # shapes matched, so the bytes are bad
                skipped.append((step, self._unreadable(step, e)))
                continue
            if self.writer:
                for bad, _ in skipped:
                    log.warning(
                        "moved the unreadable checkpoint of step %d aside to %s/",
                        bad,
                        self._quarantine(bad),
                    )
            self._confirmed = step
            return Restored(step, state, fresh)
        if skipped:
            errors = "; ".join(f"step {s}: {e}" for s, e in skipped)
            raise CheckpointError(
                f"no checkpoint in {self.directory} could be read ({errors}). Nothing was "
                "moved. If the files are damaged, start a fresh run in a new --workdir"
            )
        return None

    def sidelined(self) -> list[str]:
        """Names of the checkpoints moved aside as unreadable (`corrupt-*`), oldest first."""
        return sorted(p.name for p in self.directory.glob("corrupt-*"))

    def warn_sidelined(self) -> None:
        """Names the checkpoints moved aside, and the command that brings each back."""
        for name in self.sidelined():
            step = name.split("-")[1]
            log.warning(
                "%s was moved aside as unreadable; once its files are repaired, "
                "`mv %s %s` brings it back",
                name,
                self.directory / name,
                self.directory / step,
            )

    def _unreadable(self, step: int, e: BaseException) -> str:
        """Reports checkpoint `step` as unreadable; returns the error's first line."""
        log.warning(
            "checkpoint at step %d is unreadable (%s); trying an older one", step, _first_line(e)
        )
        return _first_line(e)

    def _mismatch(
        self, step: int, diff: list[tuple[str, Any, Any]], config: dict | None
    ) -> CheckpointMismatch:
        saved_cfg = self.saved_config(step)
        settings = _setting_differences(saved_cfg, config) if config else []
        opt_only = all(k.startswith("opt_state") for k, _, _ in diff)
        examples = "; ".join(
            f"{k}: {_shape(a)} in the checkpoint, {_shape(b)} here" for k, a, b in diff[:3]
        )
        more = f" and {len(diff) - 3} more" if len(diff) > 3 else ""
        head = f"the checkpoint of step {step} in {self.directory}"
        if opt_only:
            old = (saved_cfg or {}).get("optim", {}).get("name")
            new = (config or {}).get("optim", {}).get("name")
            what = (
                f"{head} holds {old}'s optimizer state; optim.name={new} was asked"
                if old and new and old != new
                else f"{head} holds another optimizer state than the one asked ({examples}{more})"
            )
            back = f" (or resume with --set optim.name={old})" if old and old != new else ""
            return CheckpointMismatch(
                f"{what}. Nothing was changed. To continue from its parameters, step and data "
                f"position with a fresh optimizer state, add --set train.restore=params{back}"
            )
        said = "; ".join(settings) if settings else examples + more
        return CheckpointMismatch(
            f"{head} holds another model than the one asked: {said}. Nothing was changed. "
            "Drop the --set that changed it (or set the checkpoint's value); to train another "
            "model, use a new --workdir"
        )

    def _quarantine(self, step: int) -> str:
        name = f"corrupt-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                src.rename(self.directory / name)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"lmtrain_quarantine_{step}")
        self._mngr.close()
        self._mngr = self._open()
        return name

    def close(self) -> None:
        """Waits for started saves (CheckpointError if one failed), then releases the manager."""
        try:
            self.wait()
        finally:
            self._mngr.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _path(keys: tuple) -> str:
    """A key path as dotted names: dict keys, sequence indices and namedtuple fields alike
    (orbax's metadata stores namedtuples as dicts, the abstract state keeps them)."""
    tu = jax.tree_util
    names = {
        tu.DictKey: lambda k: k.key,
        tu.SequenceKey: lambda k: k.idx,
        tu.GetAttrKey: lambda k: k.name,
        tu.FlattenedIndexKey: lambda k: k.key,
    }
    return ".".join(str(names[type(k)](k)) if type(k) in names else str(k) for k in keys)


def _differences(
    saved: dict[str, tuple], wanted: dict[str, tuple], partial: bool
) -> list[tuple[str, Any, Any]]:
    """(path, saved shape or None, wanted shape or None) for every array that differs; with
    `partial`, arrays saved but not wanted are fine."""
    keys = sorted(set(wanted) | (set() if partial else set(saved)))
    return [(k, saved.get(k), wanted.get(k)) for k in keys if saved.get(k) != wanted.get(k)]


def _shape(shape: tuple | None) -> str:
    return "absent" if shape is None else str(shape)


def setting_change(key: str, saved: Any, here: Any) -> str:
    """How every refusal to resume words a setting that differs."""
    return f"{key} is {saved!r} in the checkpoint, {here!r} here"


def _setting_differences(saved: dict | None, asked: dict) -> list[str]:
    """'model.d_model is 32 in the checkpoint, 64 here' for each model setting that differs."""
    if not saved:
        return []
    a = flat_dict(saved.get("model", {}), "model.")
    b = flat_dict(asked.get("model", {}), "model.")
    return [
        setting_change(k, a.get(k), b.get(k))
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k) and k not in FREE_ON_RESUME
    ]


# Model settings that may change on resume: they choose how the same parameters are computed,
# not which parameters exist (a run moved from CPU to GPU changes its attention kernel), or,
# for init_from, only matter for a fresh start.
FREE_ON_RESUME = (
    "model.attention_impl",
    "model.attention.attention_impl",  # a hybrid's
    "model.remat",
    "model.scan_layers",
    "model.dtype",
    "model.init_from",
)
