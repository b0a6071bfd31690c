"""Test setup: 8 fake CPU devices before jax is imported, strict numpy guard rails, and the
fixtures many test files share (a tiny text corpus and a tiny config on it)."""

import logging
import os
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tokenizers, tokenised corpora and the CPU peak cache of the test session stay out of ~/.cache.
os.environ.setdefault("LMTRAIN_CACHE", tempfile.mkdtemp(prefix="lmtrain-test-cache-"))

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The failed-checkpoint-write test leaves orbax's write coroutines unawaited; Python reports
# them at interpreter exit, after pytest's summary line, which must stay the last line.
NEVER_AWAITED = {"message": "coroutine .* was never awaited", "category": RuntimeWarning}
warnings.filterwarnings("ignore", **NEVER_AWAITED)


def pytest_unconfigure(config):
    # At shutdown the C warnings module reads its own filter list, not the module attribute
    # pytest's catch_warnings replaced, so the filter goes there too.
    import _warnings
    import re

    message = re.compile(NEVER_AWAITED["message"], re.I)
    _warnings.filters.insert(0, ("ignore", message, RuntimeWarning, None, 0))
    # The same test's orbax writer threads time out waiting for the save that failed and log
    # it through absl as the interpreter exits.
    logging.getLogger("absl").disabled = True


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A directory of 60 small synthetic text documents with learnable structure."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(60):
        n = int(rng.integers(20, 200))
        words = [
            WORDS[(j * 3 + i) % len(WORDS)]
            if rng.random() < 0.8
            else WORDS[int(rng.integers(len(WORDS)))]
            for j in range(n)
        ]
        (d / f"doc{i:03d}.txt").write_text(" ".join(words) + "\n")
    return d


TINY_SETS = {
    "model.name": "transformer",
    "model.d_model": 32,
    "model.n_layers": 2,
    "model.n_heads": 4,
    "data.tokenizer": "bytes",
    "data.seq_len": 32,
    "train.batch_size": 8,
    "train.steps": 8,
    "train.log_every": 1,
    "train.eval_every": 0,
    "train.checkpoint_every": 4,
    "train.progress": False,
    "optim.warmup_steps": 2,
    "eval.batch_size": 8,
    "eval.max_batches": 2,
}


def tiny(corpus, **sets):
    """A tiny byte-level transformer config on `corpus`; `sets` are --set style overrides."""
    from lmtrain import config as config_lib

    cfg = config_lib.override(config_lib.Config(), {**TINY_SETS, "data.source": str(corpus)})
    return config_lib.override(cfg, sets).validate()


@pytest.fixture
def tiny_config(corpus):
    """tiny(corpus, **sets) bound to the shared corpus."""
    return lambda **sets: tiny(corpus, **sets)
