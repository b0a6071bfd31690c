"""The `lmtrain` command: one module per command group, assembled here.

run.py        train / eval / generate / prepare / compile
sweep.py      sweep / fit
launchers.py  launchers (the launch scripts shipped in the package)
interop.py    export / lm-eval
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from lmtrain import xla_flags
from lmtrain.cli import interop, launchers, run, sweep

USAGE_ERROR, RUNTIME_ERROR = 2, 1
GROUPS = (run, sweep, launchers, interop)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtrain",
        description="Language-model pretraining research in JAX. Exit status: 0 success, "
        "2 usage or config error, 1 runtime failure.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sets = dict(
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.d_model=512 "
        "--set optim.name=lion (values are Python literals; repeatable)",
    )
    for group in GROUPS:
        group.add_parsers(sub, sets)
    return p


class _Stderr(logging.StreamHandler):
    """A console handler that writes to whatever sys.stderr is at each record, so one made
    under a replaced stderr (a test's capture) never writes to a closed stream later."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _quiet_libraries() -> None:
    from absl import flags
    from absl import logging as absl_logging

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    absl_logging.set_verbosity(absl_logging.WARNING)
    ours = logging.getLogger("lmtrain")  # only our messages at INFO; libraries stay quiet
    if not any(isinstance(h, _Stderr) for h in ours.handlers):  # main() may run many times
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cpu_devices_default() -> None:
    """One XLA host device per usable core (xla_flags.cpu_host_devices) unless the user chose.
    The flag only affects the CPU platform, so GPU/TPU runs are unchanged (BENCHMARKS.md has
    the speed-up)."""
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags_now or "jax" in sys.modules:
        return
    n = xla_flags.cpu_host_devices()
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={n}".strip()


def entry() -> None:
    """The console script and `python -m lmtrain`: main()'s status is the exit status, without
    waiting minutes for the threads of a failed checkpoint save (runguard.exit_now_if_orphaned)."""
    code = main()
    from lmtrain import runguard

    runguard.exit_now_if_orphaned(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmtrain` console script; returns the exit status."""
    _cpu_devices_default()  # before the parser: building it imports lmtrain.config, and jax
    xla_flags.apply()  # MaxText's GPU flags where a CUDA plugin is installed
    xla_flags.skip_absent_tpu()  # no libtpu start-up errors where there is no TPU
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from lmtrain.checkpoint import CheckpointError
    from lmtrain.config import ConfigError
    from lmtrain.train import NonFiniteLoss

    commands = {name: fn for group in GROUPS for name, fn in group.COMMANDS.items()}
    try:
        return commands[args.command](args)
    except ConfigError as e:  # includes data.DataError: things the user can fix
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except (NonFiniteLoss, CheckpointError) as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
