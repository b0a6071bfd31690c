"""lmtrain: a small JAX framework for language-model pretraining research."""

from lmtrain import xla_flags as _xla_flags

__version__ = "0.1.0"

# Before anything of lmtrain imports jax (lmtrain.config does): where libtpu is installed but no
# TPU is attached, JAX would start libtpu and print its TPU errors. The `lmtrain` command did
# this already; experiment scripts (`python experiments/mqar.py testmix`), benchmarks and
# notebooks that import lmtrain first get the same quiet start.
_xla_flags.skip_absent_tpu()
