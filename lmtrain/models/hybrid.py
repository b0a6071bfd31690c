"""Hybrids: any mix of attention, linear-attention and state-space layers, one letter a layer.

`model.name = "hybrid"` with `model.pattern`, e.g. "MMAM" (Mamba-2, Mamba-2, attention,
Mamba-2) or "HAHH" (H3 with one attention layer). A pattern shorter than n_layers is repeated
when its length divides n_layers ("MMMA" at 8 layers is "MMMAMMMA").

    A  attention  transformer block: GQA attention with RoPE + MLP (`activation`)
    B R L G W C   linear-attention blocks (BASED, retention, lightning, GLA, sliding window,
                  gated conv), each mixer + SwiGLU; see `linear_attention`
    S H           S4D, H3 blocks: mixer + SwiGLU; see `ssm`
    M             Mamba-2 block: the mixer alone, as in Mamba-2

Every layer is its own family's Block, built from that family's Config filled with the hybrid's
fields, so a field means the same thing in a hybrid as in the pure family. One exception:
`conv_width` serves every short convolution (Mamba-2's and H3's conv and BASED's gated conv),
default 4. Residual-output init is scaled by the hybrid's total depth.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from lmtrain.config import ConfigError, ModelConfig
from lmtrain.models import linear_attention, ssm, transformer

# letter -> (family module, layer kind within it)
LAYERS: dict[str, tuple[Any, str]] = {
    "A": (transformer, "attention"),
    **{c: (linear_attention, k) for c, k in linear_attention.LETTERS.items()},
    "S": (ssm, "s4d"),
    "H": (ssm, "h3"),
    "M": (ssm, "mamba2"),
}


@dataclasses.dataclass(frozen=True)
class Config(ssm.Config, linear_attention.Config, transformer.Config):
    """Every field of the transformer, linear-attention and SSM configs (SSM's conv_width)."""

    name: str = "hybrid"

    def layer_letters(self) -> str:
        """`pattern` repeated to n_layers letters ("" if it does not divide n_layers)."""
        p = self.pattern
        if not p or self.n_layers % len(p):
            return ""
        return p * (self.n_layers // len(p))

    def family_config(self, letter: str, n_layers: int | None = None) -> ModelConfig:
        """The Config that layer `letter`'s family builds from: the hybrid's shared fields,
        that family's name for the kind, and n_layers (default: the hybrid's depth)."""
        module, kind = LAYERS[letter]
        cls = module.Config
        names = {f.name for f in dataclasses.fields(cls)}
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        kept["n_layers"] = self.n_layers if n_layers is None else n_layers
        if module is ssm:
            kept["name"] = kind
        elif module is linear_attention:
            kept["name"], kept["pattern"] = "hybrid", letter * kept["n_layers"]
        else:
            kept["name"] = "transformer"
        return cls(**kept)

    def _layer_cost(self, letter: str) -> ModelConfig:
        """A 1-layer, vocab-0 model of the layer's family: its costs are one layer's costs."""
        return dataclasses.replace(self.family_config(letter, n_layers=1), vocab_size=0)

    def matmul_params(self) -> int:
        """Sum of each layer's matmul parameters plus the output head (V x D)."""
        layers = sum(self._layer_cost(c).matmul_params() for c in self.layer_letters())
        return layers + self.vocab_size * self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Sum over layers of that layer's family count (see each family's flops_per_token)
        plus 6 V D for the output head."""
        layers = sum(self._layer_cost(c).flops_per_token(seq_len) for c in self.layer_letters())
        return float(layers + 6 * self.vocab_size * self.d_model)

    def state_floats(self, seq_len: int) -> int:
        """Floats of decode state per sequence at context seq_len, all layers."""
        return sum(self._layer_cost(c).state_floats(seq_len) for c in self.layer_letters())


def _validate(cfg: Config) -> None:
    """Raises ConfigError naming the field; each family present checks its own fields."""
    bad = sorted(set(cfg.pattern) - set(LAYERS))
    if bad:
        raise ConfigError(f"model.pattern has unknown letters {bad}; known: {''.join(LAYERS)}")
    if not cfg.layer_letters():
        raise ConfigError(
            f"model.pattern {cfg.pattern!r} must be non-empty with a length dividing "
            f"model.n_layers ({cfg.n_layers}), e.g. model.pattern=MMAM"
        )
    for letter in sorted(set(cfg.pattern)):
        module = LAYERS[letter][0]
        module._validate(cfg._layer_cost(letter))


class Model(transformer.Model):
    """Embed -> one block per pattern letter, from its own family -> RMSNorm -> head.

    Everything else (forward, remat, init_cache, decode) is transformer.Model's.
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        _validate(cfg)
        self._init_stack(
            cfg, lambda: [_block(cfg, c, i, rngs) for i, c in enumerate(cfg.layer_letters())], rngs
        )


def _block(cfg: Config, letter: str, layer: int, rngs: nnx.Rngs) -> nnx.Module:
    module, kind = LAYERS[letter]
    sub = cfg.family_config(letter)
    if module is transformer:
        return transformer.Block(sub, rngs=rngs)
    if module is linear_attention:
        return linear_attention.Block(sub, kind, layer, rngs=rngs)
    mixer, mlp = ssm.RECIPES[kind]
    return ssm.Block(sub, mixer, mlp, rngs=rngs)
