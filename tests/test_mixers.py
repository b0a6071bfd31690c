"""The one mixer contract (lmtrain.models.mixer), on every mixer: the parallel form continued
from a state passed in equals the recurrent form over the same tokens, across a document
boundary and across a split that falls inside a document and at one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain.models import linear_attention as la
from lmtrain.models import ssm, transformer

B, L, D = 2, 13, 16  # L is no multiple of the chunks (4) nor the window (4)
SMALL = dict(vocab_size=7, d_model=D, n_layers=2, n_heads=2, init_std=0.3)


def _attention(**kw):
    cfg = transformer.Config(**SMALL, **kw)
    return lambda rngs: transformer.Attention(cfg, rngs=rngs, out_std=0.3)


def _linear(kind, **kw):
    cfg = la.Config(name="hybrid", pattern="BB", chunk=4, gla_chunk=4, window=4, **SMALL, **kw)
    return lambda rngs: la.MIXERS[kind](cfg, layer=1, rngs=rngs)


def _ssm(name, **kw):
    cfg = ssm.Config(name=name, chunk_size=4, state_size=4, conv_width=3, **SMALL, **kw)
    return lambda rngs: ssm.MIXERS[name](cfg, rngs=rngs)


MIXERS = {
    "attention": _attention(),
    "attention-primer-qknorm": _attention(qkv_conv=3, qk_norm=True, n_kv_heads=1),
    "swa": _linear("swa"),
    "based": _linear("based", feature_dim=4),
    "retention": _linear("retention"),
    "lightning": _linear("lightning"),
    "gla": _linear("gla"),
    "conv": _linear("conv"),
    "conv-base": _linear("conv", conv_form="base"),
    "s4d": _ssm("s4d"),
    "s4d-fft": _ssm("s4d", s4d_fft=True),
    "h3": _ssm("h3"),
    "mamba2": _ssm("mamba2"),
}
# Row 0: documents 3 | 4 | 5 with starts at 5 and 9; row 1: one document. Positions restart.
SEG = np.array([[3] * 5 + [4] * 4 + [5] * 4, [7] * L], np.int32)
POS = np.array([list(range(5)) + list(range(4)) + list(range(4)), list(range(L))], np.int32)


def _inputs():
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    return x, jnp.asarray(SEG), jnp.asarray(POS)


class Jitted:
    """A mixer's call, jitted per form (eager dispatch of the scans is what costs here)."""

    def __init__(self, make):
        self.module = make(nnx.Rngs(0))
        graphdef, params = nnx.split(self.module)
        self.params = params
        self.fns = {
            form: jax.jit(lambda p, *a, form=form: nnx.merge(graphdef, p)(*a, form=form))
            for form in ("auto", "parallel", "recurrent")
        }

    def __call__(self, x, seg=None, pos=None, state=None, form="auto"):
        return self.fns[form](self.params, x, seg, pos, state)

    def init_state(self, batch, max_len):
        return self.module.init_state(batch, max_len)


def _close(a, b, what):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5, err_msg=what)


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_parallel_from_a_state_equals_the_recurrent_form(name):
    mixer = Jitted(MIXERS[name])
    x, seg, pos = _inputs()
    y_full, _ = mixer(x, seg, pos, form="parallel")
    y_rec, s_rec = mixer(x, seg, pos, mixer.init_state(B, L), form="recurrent")
    _close(y_rec, y_full, "recurrent != parallel over the whole sequence")

    for p in (7, 9):  # inside row 0's second document, then exactly at its third's start
        s0 = mixer.init_state(B, L)
        y_a, s_a = mixer(x[:, :p], seg[:, :p], pos[:, :p], s0, form="parallel")
        y_b, s_b = mixer(x[:, p:], seg[:, p:], pos[:, p:], s_a, form="parallel")
        _close(jnp.concatenate([y_a, y_b], 1), y_full, f"parallel split at {p}")
        # The recurrent form from the same state, over the same tokens.
        y_c, s_c = mixer(x[:, p:], seg[:, p:], pos[:, p:], s_a, form="recurrent")
        _close(y_c, y_b, f"recurrent after the split at {p}")
        jax.tree.map(lambda a, b, p=p: _close(a, b, f"final state, split at {p}"), s_c, s_b)
        jax.tree.map(lambda a, b: _close(a, b, "final state vs one pass"), s_b, s_rec)
        # The state carries something: starting fresh at the split changes row 1 (one
        # document), and at p = 9 leaves row 0 (a new document starts there) unchanged.
        y_fresh, _ = mixer(x[:, p:], seg[:, p:], pos[:, p:], form="parallel")
        assert np.abs(np.asarray(y_fresh[1] - y_full[1, p:])).max() > 1e-3
        if p == 9:
            _close(y_fresh[0], y_full[0, p:], "a document that starts at the split")


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_decode_is_the_same_call_one_token_at_a_time(name):
    """No segment ids (one document a row), T = 1 calls: __call__'s own choice of form."""
    mixer = Jitted(MIXERS[name])
    x, _, _ = _inputs()
    y_full, _ = mixer(x)
    state, ys = mixer.init_state(B, L), []
    for t in range(L):
        y, state = mixer(x[:, t : t + 1], None, jnp.full((B, 1), t, jnp.int32), state)
        ys.append(y)
    _close(jnp.concatenate(ys, 1), y_full, "token by token")


def test_a_fresh_call_equals_a_call_from_the_empty_state():
    """state=None and init_state are the same start (outputs and final states)."""
    x, seg, pos = _inputs()
    for name, make in MIXERS.items():
        mixer = Jitted(make)
        y0, s0 = mixer(x, seg, pos)
        y1, s1 = mixer(x, seg, pos, mixer.init_state(B, L), form="parallel")
        _close(y0, y1, name)
        jax.tree.map(lambda a, b, name=name: _close(a, b, f"{name} state"), s0, s1)
