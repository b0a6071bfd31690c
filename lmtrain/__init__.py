"""lmtrain: a small JAX framework for language-model pretraining research."""

__version__ = "0.1.0"
