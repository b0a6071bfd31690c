"""Hybrids: any mix of attention, linear-attention and state-space layers, one letter a layer.

`model.name = "hybrid"` with `model.pattern`, e.g. "MMAM" (Mamba-2, Mamba-2, attention,
Mamba-2) or "HAHH" (H3 with one attention layer). A pattern shorter than n_layers is repeated
when its length divides n_layers ("MMMA" at 8 layers is "MMMAMMMA").

    A  attention  transformer block: GQA attention with RoPE + MLP (`activation`)
    B R L G W C   linear-attention blocks (BASED, retention, lightning, GLA, sliding window,
                  gated conv), each mixer + SwiGLU; see `linear_attention`
    S H           S4D, H3 blocks: mixer + SwiGLU; see `ssm`
    M             Mamba-2 block: the mixer alone, as in Mamba-2

Every layer is its own family's block, built from that family's Config: the hybrid's shared
fields (ModelConfig's: d_model, n_heads, ...) plus the section of its family, so a field means
the same thing in a hybrid as in the pure family:

    model.attention.*  letter A         (rope_theta, activation, qkv_conv, qk_norm, attention_impl)
    model.linear.*     letters BRLGWC   (chunk, window, conv_width, feature_dim, gla_*, ...)
    model.ssm.*        letters S H M    (state_size, expand, conv_width, chunk_size, s4d_fft,
                                         linear_init, conv_bias, block_mlp, state_norm,
                                         shift_skip)

Each section's defaults are its family's, except that both conv_width default to 4 (one width
for every short convolution, as hybrids before the sections had). Residual-output init is
scaled by the hybrid's total depth. Config files written before the sections (a flat
`model.state_size`, `model.conv_width`, ...) still load: `FLAT` says where each key went.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lmtrain.errors import ConfigError
from lmtrain.models import linear_attention, ssm, transformer
from lmtrain.models.base import ModelConfig
from lmtrain.models.decoder import BlockSpec


@dataclasses.dataclass(frozen=True)
class Layer:
    """What a pattern letter is: its family's Config (named `name`) and the block built from it.

    `block(config, layer_index)` gets that family's Config filled with the hybrid's fields;
    `one_letter_pattern` families (linear attention) also get `pattern = letter * n_layers`.
    """

    config_cls: type[ModelConfig]
    name: str
    block: Callable[[ModelConfig, int], BlockSpec]
    section: str  # the hybrid's config section for this family's fields
    one_letter_pattern: bool = False


def _attention(cfg, layer):
    return transformer.attention_block(cfg)


def _linear(kind: str) -> Callable[[ModelConfig, int], BlockSpec]:
    return lambda cfg, layer: linear_attention.mixer_block(cfg, kind, layer)


def _ssm(cfg, layer):
    return ssm.mixer_block(cfg)


# letter -> Layer: the one table a new letter is added to
LAYERS: dict[str, Layer] = {
    "A": Layer(transformer.Config, "transformer", _attention, "attention"),
    **{
        c: Layer(linear_attention.Config, "hybrid", _linear(k), "linear", one_letter_pattern=True)
        for c, k in linear_attention.LETTERS.items()
    },
    "S": Layer(ssm.Config, "s4d", _ssm, "ssm"),
    "H": Layer(ssm.Config, "h3", _ssm, "ssm"),
    "M": Layer(ssm.Config, "mamba2", _ssm, "ssm"),
}


@dataclasses.dataclass(frozen=True)
class AttentionSection:
    """model.attention.*: transformer.Config's own fields, for letter A."""

    rope_theta: float = 10000.0
    activation: str = "swiglu"
    qkv_conv: int = 0
    qk_norm: bool = False
    attention_impl: str = "xla"


@dataclasses.dataclass(frozen=True)
class LinearSection:
    """model.linear.*: linear_attention.Config's own fields (but its pattern), for B R L G W C."""

    chunk: int = 64
    gla_chunk: int = 16
    feature_dim: int = 16
    window: int = 129
    conv_width: int = 4  # the pure family's is 3
    gla_expand_k: float = 0.5
    gla_gate_rank: int = 16
    gla_tau: float = 16.0
    rope_theta: float = 10000.0
    block_mlp: bool = True
    state_norm: bool = False
    conv_form: str = "projected"


@dataclasses.dataclass(frozen=True)
class SSMSection:
    """model.ssm.*: ssm.Config's own fields, for S H M."""

    state_size: int = 16
    expand: int = 2
    conv_width: int = 4
    chunk_size: int = 32
    s4d_fft: bool = False
    linear_init: str = "normal"
    conv_bias: bool = False
    block_mlp: bool = True  # S and H blocks' SwiGLU
    state_norm: bool = False
    shift_skip: bool = False


SECTIONS = {"attention": AttentionSection, "linear": LinearSection, "ssm": SSMSection}
# A flat key of a config file written before the sections -> the sections it now sets.
# (model.ssm.block_mlp came after the sections: a flat block_mlp was the linear letters' alone;
# state_norm and shift_skip came after them too.)
FLAT: dict[str, list[str]] = {}
for _name, _cls in SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        if (_name, _f.name) != ("ssm", "block_mlp") and _f.name not in ("state_norm", "shift_skip"):
            FLAT.setdefault(_f.name, []).append(_name)


def sectioned(flat: dict) -> dict:
    """{dotted key: value} of a hybrid's config file with pre-section keys (model.state_size)
    moved into their sections (model.ssm.state_size; conv_width and rope_theta into both)."""
    out = {}
    for key, value in flat.items():
        field = key.removeprefix("model.")
        for section in FLAT.get(field, []) if key.startswith("model.") else []:
            out[f"model.{section}.{field}"] = value
        if not (key.startswith("model.") and field in FLAT):
            out[key] = value
    return out


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    """The shared model fields, the layer pattern, and one section per family."""

    name: str = "hybrid"
    pattern: str = ""  # one letter per layer, repeated to n_layers (see the module docstring)
    attention: AttentionSection = dataclasses.field(default_factory=AttentionSection)
    linear: LinearSection = dataclasses.field(default_factory=LinearSection)
    ssm: SSMSection = dataclasses.field(default_factory=SSMSection)

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
        """The Config that layer `letter`'s family builds from: the hybrid's shared fields, its
        family's section, that family's name for the kind, and n_layers (default: the
        hybrid's depth)."""
        layer = LAYERS[letter]
        section = layer.section
        kept = {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}
        kept.update(dataclasses.asdict(getattr(self, section)))
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
            try:
                self._layer_cost(letter).validate()
            except ConfigError as e:  # name the key as a hybrid spells it
                key, _, rest = str(e).partition(" ")
                field = key.removeprefix("model.")
                section = LAYERS[letter].section
                if field in {f.name for f in dataclasses.fields(getattr(self, section))}:
                    key = f"model.{section}.{field}"
                raise ConfigError(f"{key} {rest}") from None


def blocks(cfg: Config) -> list[BlockSpec]:
    """One block per pattern letter, from its own family's table."""
    return [LAYERS[c].block(cfg.family_config(c), i) for i, c in enumerate(cfg.layer_letters())]
