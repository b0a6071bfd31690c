"""Hybrid stacks: a pattern of one family is that family; mixed patterns build, count and fail
clearly. (The shared model tests in test_models.py also run hybrids.)"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import compiled_call
from flax import nnx

from lmtrain import models
from lmtrain.config import Config, ConfigError, override
from lmtrain.models import hybrid

TINY = dict(vocab_size=61, d_model=32, n_heads=4)
TOKENS = jax.random.randint(jax.random.key(0), (2, 12), 0, 61)


@pytest.mark.parametrize(
    ("pattern", "family"),
    [("AA", "transformer"), ("MM", "mamba2"), ("GG", "gla"), ("HH", "h3")],
)
def test_single_letter_pattern_is_the_pure_family(pattern, family):
    """Same seed -> same parameters, logits, FLOPs and state size as the pure family."""
    pure_cfg = models.family(family).Config(name=family, n_layers=2, **TINY)
    hyb_cfg = hybrid.Config(pattern=pattern, n_layers=2, **TINY)
    pure = models.build(pure_cfg, nnx.Rngs(0))
    hyb = models.build(hyb_cfg, nnx.Rngs(0))
    a, b = nnx.to_pure_dict(nnx.state(pure)), nnx.to_pure_dict(nnx.state(hyb))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    np.testing.assert_array_equal(compiled_call(pure, TOKENS), compiled_call(hyb, TOKENS))
    assert hyb_cfg.flops_per_token(64) == pure_cfg.flops_per_token(64)
    assert hyb_cfg.matmul_params() == pure_cfg.matmul_params()
    assert hyb_cfg.state_floats(64) == pure_cfg.state_floats(64)


def test_pattern_repeats_to_depth_and_mixes_families():
    cfg = hybrid.Config(pattern="MMA", n_layers=6, **TINY)
    assert cfg.layer_letters() == "MMAMMA"
    model = models.build(cfg, nnx.Rngs(0))
    kinds = [type(getattr(b, "mixer", getattr(b, "attn", None))).__name__ for b in model.blocks]
    assert kinds == ["Mamba2", "Mamba2", "Attention"] * 2
    # FLOPs add up layer by layer: 4 Mamba-2 layers, 2 attention layers, the head.
    one = lambda fam: models.family(fam).Config(name=fam, n_layers=1, **{**TINY, "vocab_size": 0})
    want = 4 * one("mamba2").flops_per_token(32) + 2 * one("transformer").flops_per_token(32)
    assert cfg.flops_per_token(32) == want + 6 * 61 * 32


def test_residual_init_is_scaled_by_total_depth():
    cfg = hybrid.Config(pattern="AM", n_layers=8, **TINY)
    model = models.build(cfg, nnx.Rngs(0))
    out = np.asarray(model.blocks[0].attn.o.kernel[...])
    want = cfg.init_std / np.sqrt(2 * 8)
    assert abs(out.std() - want) < 0.15 * want


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(pattern="MXA", n_layers=3), r"unknown letters \['X'\]"),
        (dict(pattern="MMA", n_layers=4), "dividing model.n_layers"),
        (dict(pattern="", n_layers=2), "non-empty"),
        (dict(pattern="AM", n_layers=2, n_kv_heads=3), "n_kv_heads"),
        (
            dict(pattern="MA", n_layers=2, ssm=hybrid.SSMSection(state_size=0)),
            "model.ssm.state_size",
        ),
    ],
)
def test_bad_pattern_is_a_config_error(fields, match):
    with pytest.raises(ConfigError, match=match):
        models.build(hybrid.Config(**{**TINY, **fields}), nnx.Rngs(0))


def test_set_model_name_hybrid_from_the_command_line():
    cfg = override(Config(), {"model.name": "hybrid", "model.pattern": "HA", "model.n_layers": 4})
    assert isinstance(cfg.model, hybrid.Config) and cfg.model.layer_letters() == "HAHA"
    assert cfg.model.linear.conv_width == cfg.model.ssm.conv_width == 4  # one width for all convs


@pytest.mark.parametrize("section", sorted(hybrid.SECTIONS))
def test_each_section_holds_exactly_its_familys_own_fields(section):
    """A field added to a family reaches the hybrid, or this fails: same names, same defaults
    (but the one conv width of 4)."""
    family = {hybrid.LAYERS[c].section: hybrid.LAYERS[c].config_cls for c in hybrid.LAYERS}
    shared = {f.name for f in dataclasses.fields(models.base.ModelConfig)} | {"pattern"}
    own = {f.name: f.default for f in dataclasses.fields(family[section]) if f.name not in shared}
    mine = {f.name: f.default for f in dataclasses.fields(hybrid.SECTIONS[section])}
    if section == "linear":
        assert mine.pop("conv_width") == 4 and own.pop("conv_width") == 3
    assert mine == own


def test_a_config_file_from_before_the_sections_loads_and_old_keys_are_named():
    from lmtrain import config as config_lib

    old = config_lib.to_dict(override(Config(), {"model.name": "transformer"}))
    flat_fields = {"conv_width": 3, "state_size": 8, "window": 7, "rope_theta": 5e5}
    flat_fields["block_mlp"] = False  # before model.ssm.block_mlp: the linear letters' alone
    old["model"] = {**old["model"], "name": "hybrid", "pattern": "MWA", "n_layers": 3}
    old["model"].update(flat_fields)
    m = config_lib.from_dict(old).model
    assert (m.ssm.conv_width, m.linear.conv_width, m.ssm.state_size, m.linear.window) == (
        3,
        3,
        8,
        7,
    )
    assert m.attention.rope_theta == m.linear.rope_theta == 5e5
    assert (m.linear.block_mlp, m.ssm.block_mlp) == (False, True)
    hyb = override(Config(), {"model.name": "hybrid", "model.pattern": "MA"})
    with pytest.raises(ConfigError, match=r"model.conv_width is model.linear.conv_width and "
                                          r"model.ssm.conv_width"):  # fmt: skip
        override(hyb, {"model.conv_width": 3})
