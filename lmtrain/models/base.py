"""The fields every model family shares; a family's `Config` subclasses `ModelConfig`."""

from __future__ import annotations

import dataclasses

from lmtrain.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
CONV_INITS = ("uniform", "identity")  # lmtrain.models.layers.conv_init


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Fields shared by every model family; a family's `Config` subclasses this."""

    name: str = "transformer"
    vocab_size: int = 0  # 0: taken from the tokenizer when the run starts
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0: same as n_heads (no grouping)
    ffn_mult: float = 4.0  # hidden width = ffn_mult * d_model (SwiGLU uses 2/3 of it, rounded)
    dtype: str = "float32"  # compute dtype; parameters stay float32
    remat: bool = False  # rematerialise each block in the backward pass
    tie_embeddings: bool = False
    init_std: float = 0.02
    norm_eps: float = 1e-6
    # Taps of every short convolution: "uniform" (PyTorch's Conv1d) or "identity" (see
    # lmtrain.models.layers.conv_init).
    conv_init: str = "uniform"

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward); each family overrides this."""
        raise NotImplementedError(f"model family {self.name!r} does not count its FLOPs")

    def validate(self) -> None:
        """Raises ConfigError naming the field; families extend it with their own checks."""
        check_all(
            [
                (self.d_model > 0, "model.d_model", "must be positive"),
                (self.n_layers > 0, "model.n_layers", "must be positive"),
                (self.n_heads > 0, "model.n_heads", "must be positive"),
                (self.n_kv_heads >= 0, "model.n_kv_heads", "must be >= 0"),
                (self.vocab_size >= 0, "model.vocab_size", "must be >= 0 (0: the tokenizer's)"),
                (self.dtype in DTYPES, "model.dtype", f"must be one of {', '.join(DTYPES)}"),
                (self.conv_init in CONV_INITS, "model.conv_init", f"must be one of {CONV_INITS}"),
            ]
        )


def check_all(checks: list[tuple[bool, str, str]]) -> None:
    """Raises ConfigError("KEY MESSAGE") for the first (ok, key, message) that is not ok."""
    for ok, key, msg in checks:
        if not ok:
            raise ConfigError(f"{key} {msg}")
