"""The fields every model family shares; a family's `Config` subclasses `ModelConfig`."""

from __future__ import annotations

import dataclasses
import math

from lmtrain.errors import check_all

DTYPES = ("float32", "bfloat16", "float16")
CONV_INITS = ("uniform", "identity")  # lmtrain.models.layers.conv_init
# What a block keeps for the backward pass (jax.checkpoint policies, MaxText's names):
# none = everything (no remat); full = only the block's input; minimal = also the outputs of
# the weight matmuls (attention's batched products are recomputed); save_dots = every matmul.
REMAT_POLICIES = ("none", "full", "minimal", "save_dots")


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
    dtype: str = "float32"  # compute dtype (activations, matmul inputs)
    # Parameter (and so optimizer-moment) dtype: float32 master weights, or bfloat16 to halve
    # the train state at some cost in update precision.
    param_dtype: str = "float32"
    # Block rematerialisation policy (REMAT_POLICIES); True/False in older configs mean
    # "full"/"none".
    remat: str | bool = "none"
    # Run runs of identical consecutive blocks as one jax.lax.scan (compile time flat in depth;
    # the parameters keep their per-layer layout and are stacked inside the step).
    scan_layers: bool = False
    tie_embeddings: bool = False
    init_std: float = 0.02
    # modded-nanogpt's init: every residual branch's output matrix (attention/mixer out, MLP
    # down) and an untied output head start at zero, so a fresh model is its embeddings alone.
    zero_init: bool = False
    # > 0: logits = c * tanh(logits / c) (Gemma 2's final soft cap; modded-nanogpt uses 15-30).
    logit_softcap: float = 0.0
    norm_eps: float = 1e-6
    # Taps of every short convolution: "uniform" (PyTorch's Conv1d) or "identity" (see
    # lmtrain.models.layers.conv_init).
    conv_init: str = "uniform"
    # Start a fresh run from these weights instead of a random init (continued pretraining):
    # "hf:DIR" an HF model directory (Llama, Mamba-2), or DIR from `lmtrain export` in either
    # format. Checked against this config; ignored when the workdir resumes from a checkpoint.
    init_from: str = ""

    def __post_init__(self) -> None:
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")

    def out_std(self) -> float:
        """Init std of a residual branch's output matrix: GPT-2's init_std / sqrt(2 n_layers)
        (two branches per layer, so the residual stream's variance does not grow with depth),
        or 0 under zero_init."""
        return 0.0 if self.zero_init else self.init_std / math.sqrt(2 * self.n_layers)

    def layer_kinds(self) -> tuple[str, ...]:
        """One label per layer; equal labels mean structurally equal blocks (what a stack that
        repeats is made of). Families that mix layer kinds override it."""
        return ("block",) * self.n_layers

    def at_depth(self, n_layers: int) -> ModelConfig:
        """This config with `n_layers` layers; a one-letter-per-layer `pattern` is cut to fit
        (for stacks whose pattern repeats with a period dividing n_layers)."""
        changes: dict = {"n_layers": n_layers}
        pattern = dataclasses.asdict(self).get("pattern", "")
        if pattern and len(pattern) == self.n_layers:
            changes["pattern"] = pattern[:n_layers]
        return dataclasses.replace(self, **changes)

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
                (
                    self.param_dtype in DTYPES,
                    "model.param_dtype",
                    f"must be one of {', '.join(DTYPES)}",
                ),
                (
                    self.remat in REMAT_POLICIES,
                    "model.remat",
                    f"must be one of {', '.join(REMAT_POLICIES)}",
                ),
                (self.logit_softcap >= 0, "model.logit_softcap", "must be >= 0 (0: off)"),
                (self.conv_init in CONV_INITS, "model.conv_init", f"must be one of {CONV_INITS}"),
            ]
        )
