"""Checkpoints written by an earlier lmtrain still restore, to the same logits.

tests/fixtures/old_runs holds two tiny runs written at commit 082e49e, before the models became
one decoder over one mixer contract: a transformer (GQA, QK-norm) and a hybrid "MAGC"
(Mamba-2, attention, GLA, gated conv), each with its step-2 checkpoint (parameters and AdamW
state) and the float32 logits that code computed for one fixed row of bytes.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmtrain import models
from lmtrain import run as run_lib
from lmtrain.checkpoint import Checkpointer

OLD = Path(__file__).resolve().parent / "fixtures" / "old_runs"
ROW = b"the alpha beta gamma delta epsil"


def _tokens() -> jax.Array:
    return jnp.asarray(np.frombuffer(ROW, np.uint8).astype(np.int32)[None])


@pytest.mark.parametrize("name", ["transformer", "hybrid"])
def test_an_old_run_restores_to_the_same_logits(name, tmp_path):
    import shutil

    wd = shutil.copytree(OLD / name, tmp_path / name)  # a reader, but never risk the fixture
    run, params, step = run_lib.restore_params(wd)
    assert step == 2
    forward = jax.jit(lambda p, t: nnx.merge(run.graphdef, p)(t))
    logits = np.asarray(forward(params, _tokens()))
    expected = np.load(wd / "logits.npy")
    # A fresh init of the same config gives other logits: the comparison can fail.
    fresh = np.asarray(forward(nnx.state(models.build(run.cfg.model, nnx.Rngs(0))), _tokens()))
    assert np.abs(fresh - expected).max() > 1e-2
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["transformer", "hybrid"])
def test_an_old_run_restores_its_whole_train_state(name, tmp_path):
    """Parameters and optimizer moments, as a resumed run reads them."""
    import shutil

    wd = shutil.copytree(OLD / name, tmp_path / name)
    run, _, _ = run_lib.restore_params(wd)
    full = run_lib.setup(run.cfg)
    restored = Checkpointer(wd / "checkpoints").restore_latest(
        full.abstract_state, data_iter=None, partial=False, step=None, config=None
    )
    assert restored.step == 2 and not restored.fresh_optimizer
    leaves = jax.tree.leaves(restored.state["opt_state"])
    assert leaves and any(float(jnp.abs(x).max()) > 0 for x in leaves if x.ndim)
