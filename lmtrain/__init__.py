"""lmtrain: a small JAX framework for language-model pretraining research."""

import sys as _sys

from lmtrain import xla_flags as _xla_flags

__version__ = "0.1.0"

# Before anything of lmtrain imports jax (lmtrain.config does): where libtpu is installed but no
# TPU is attached, JAX would start libtpu and print its TPU errors. The `lmtrain` command did
# this already; experiment scripts (`python experiments/mqar.py testmix`), benchmarks and
# notebooks get the same quiet start. Where jax came first, its config has read the environment
# already; the same setting still holds if no backend has started yet.
_platforms = _xla_flags.skip_absent_tpu()
if _platforms and "jax" in _sys.modules:
    _sys.modules["jax"].config.update("jax_platforms", _platforms)
