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
from collections.abc import Callable

from flax import nnx

from lmtrain.errors import ConfigError
from lmtrain.models import linear_attention, ssm, transformer
from lmtrain.models.base import ModelConfig


@dataclasses.dataclass(frozen=True)
class Layer:
    """What a pattern letter is: its family's Config (named `name`) and the block built from it.

    `build(config, layer_index, rngs)` gets that family's Config filled with the hybrid's fields;
    `one_letter_pattern` families (linear attention) also get `pattern = letter * n_layers`.
    """

    config_cls: type[ModelConfig]
    name: str
    build: Callable[[ModelConfig, int, nnx.Rngs], nnx.Module]
    one_letter_pattern: bool = False


def _attention(cfg, layer, rngs):
    return transformer.Block(cfg, rngs=rngs)


def _linear(kind: str) -> Callable[[ModelConfig, int, nnx.Rngs], nnx.Module]:
    return lambda cfg, layer, rngs: linear_attention.Block(cfg, kind, layer, rngs=rngs)


def _ssm(cfg, layer, rngs):
    mixer, mlp = ssm.RECIPES[cfg.name]
    return ssm.Block(cfg, mixer, mlp, rngs=rngs)


# letter -> Layer: the one table a new letter is added to
LAYERS: dict[str, Layer] = {
    "A": Layer(transformer.Config, "transformer", _attention),
    **{
        c: Layer(linear_attention.Config, "hybrid", _linear(kind), one_letter_pattern=True)
        for c, kind in linear_attention.LETTERS.items()
    },
    "S": Layer(ssm.Config, "s4d", _ssm),
    "H": Layer(ssm.Config, "h3", _ssm),
    "M": Layer(ssm.Config, "mamba2", _ssm),
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

    def layer_kinds(self) -> tuple[str, ...]:
        """The letter of every layer (ModelConfig.layer_kinds)."""
        return tuple(self.layer_letters())

    def family_config(self, letter: str, n_layers: int | None = None) -> ModelConfig:
        """The Config that layer `letter`'s family builds from: the hybrid's shared fields,
        that family's name for the kind, and n_layers (default: the hybrid's depth)."""
        layer = LAYERS[letter]
        names = {f.name for f in dataclasses.fields(layer.config_cls)}
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in names}
        kept["n_layers"] = self.n_layers if n_layers is None else n_layers
        kept["name"] = layer.name
        if layer.one_letter_pattern:
            kept["pattern"] = letter * kept["n_layers"]
        return layer.config_cls(**kept)

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

    def validate(self) -> None:
        """Raises ConfigError naming the field; each family present checks its own fields
        through its public Config.validate."""
        ModelConfig.validate(self)
        bad = sorted(set(self.pattern) - set(LAYERS))
        if bad:
            raise ConfigError(f"model.pattern has unknown letters {bad}; known: {''.join(LAYERS)}")
        if not self.layer_letters():
            raise ConfigError(
                f"model.pattern {self.pattern!r} must be non-empty with a length dividing "
                f"model.n_layers ({self.n_layers}), e.g. model.pattern=MMAM"
            )
        for letter in sorted(set(self.pattern)):
            self._layer_cost(letter).validate()


class Model(transformer.Model):
    """Embed -> one block per pattern letter, from its own family -> RMSNorm -> head.

    Everything else (forward, remat, init_cache, decode) is transformer.Model's.
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        cfg.validate()
        letters = cfg.layer_letters()
        self._init_stack(
            cfg,
            lambda: [LAYERS[c].build(cfg.family_config(c), i, rngs) for i, c in enumerate(letters)],
            rngs,
        )
