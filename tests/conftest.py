"""Test setup: 8 fake CPU devices before jax is imported, and strict numpy guard rails."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import warnings  # noqa: E402

# The failed-checkpoint-write test leaves orbax's write coroutines unawaited; Python reports
# them at interpreter exit, after pytest's summary line, which must stay the last line.
warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
