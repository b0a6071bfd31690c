"""Test setup: 8 fake CPU devices before jax is imported, strict numpy guard rails, and the
fixtures many test files share (a tiny text corpus and a tiny config on it)."""

import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

# The suite compiles hundreds of tiny programs, each about once: LLVM's backend optimisation
# costs more than it saves at these sizes (a quarter of the suite's CPU time; BENCHMARKS.md).
# Tests that start processes with their own XLA_FLAGS put these in front.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ.setdefault("XLA_FLAGS", f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The watchdog limit (train.hang_timeout_s) of the tests that kill one process and time how long
# the other takes to stop. The other multi-process runs have 180 s: 20 s was reached once by a
# single-process run whose checkpoint save stalled 22 s on a loaded 2-core CI machine.
HANG_S = 40
# Tokenizers, tokenised corpora and the CPU peak cache of the test session stay out of ~/.cache
# (the workers inherit the controller's; the controller removes it at the end).
MADE_CACHE = "LMTRAIN_CACHE" not in os.environ
os.environ.setdefault("LMTRAIN_CACHE", tempfile.mkdtemp(prefix="lmtrain-test-cache-"))
# Every training run times a 2048 x 2048 matmul for its MFU's CPU peak (~1 s here, hundreds of
# runs); the suite fixes the peak instead. tests/test_flops.py times it, and the processes that
# the multi-process and SLURM tests start (their environment drops LMTRAIN_*) measure theirs.
os.environ.setdefault("LMTRAIN_CPU_PEAK_GFLOPS", "100")
# One persistent compilation cache for the run: both pytest-xdist workers and every lmtrain
# process they start, which compile the same tiny runs again and again (resume, readers,
# multi-process). A size limit turns on jax's file lock, so concurrent writers are safe.
RUN_ID = os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex
JIT_CACHE = Path(tempfile.gettempdir()) / f"lmtrain-test-jit-{RUN_ID}"
JIT_CACHE_ENV = {  # also what a test that cleans a child's environment keeps
    "JAX_COMPILATION_CACHE_DIR": str(JIT_CACHE),
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30),
}
for key, value in JIT_CACHE_ENV.items():
    os.environ.setdefault(key, value)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# The failed-checkpoint-write test leaves orbax's write coroutines unawaited; Python reports
# them at interpreter exit, after pytest's summary line, which must stay the last line.
NEVER_AWAITED = {"message": "coroutine .* was never awaited", "category": RuntimeWarning}
warnings.filterwarnings("ignore", **NEVER_AWAITED)


# Out of the fast lane (`-m "not slow"`, ~3.5 min) for time, still in the full suite: the
# slowest 5-30 s tests whose kind keeps a cheaper representative in the fast lane (e.g.
# segment isolation stays fast for the transformer variants, the sharded step for one mesh).
SLOW_FOR_TIME = {
    "test_mixers.py::test_a_fresh_call_equals_a_call_from_the_empty_state",
    *(  # the contract stays fast for attention, a linear mixer with decay (GLA) and Mamba-2
        f"test_mixers.py::test_parallel_from_a_state_equals_the_recurrent_form[{m}]"
        for m in (
            "attention-primer-qknorm",
            "swa",
            "based",
            "retention",
            "lightning",
            "conv",
            "conv-base",
            "s4d",
            "s4d-fft",
            "h3",
        )
    ),  # fmt: skip
    "test_lm_eval.py::test_lm_eval_usage_errors",
    *(
        f"test_models.py::test_segment_isolation[{f}]"
        for f in ("hybrid-HGWS", "s4d", "hybrid", "mamba2", "h3", "gla", "retnet", "lightning")
    ),
    "test_models.py::test_segment_isolation[based]",
    "test_models.py::test_causality[hybrid-HGWS]",
    "test_models.py::test_causality[s4d]",
    "test_models.py::test_causality[hybrid]",
    "test_models.py::test_shapes_and_dtype[hybrid-HGWS]",
    "test_models.py::test_remat_same_loss_and_grads",
    "test_models.py::test_bfloat16_close_to_float32",
    "test_mqar.py::test_scored_positions_step_equals_dense_step[transformer]",
    "test_mqar.py::test_train_on_mqar_reports_accuracy",
    "test_scale.py::test_remat_policies_and_scan_keep_loss_and_grads[transformer]",
    "test_scale.py::test_fsdp_uses_less_memory_than_data_parallel",
    "test_scale.py::test_remat_policy_saves_less_under_full",
    "test_scale.py::test_splash_matches_xla_forward_and_gradient_with_packed_documents",
    "test_scale.py::test_splash_in_a_sharded_model_matches_xla",
    "test_linear_attention.py::test_all_mixers_in_one_model_decode_matches_forward",
    "test_linear_attention.py::test_decays_follow_the_papers_and_matter",
    "test_linear_attention.py::test_base_conv_is_zoologys_baseconv_and_starts_with_random_taps",
    *(
        f"test_hybrid.py::test_single_letter_pattern_is_the_pure_family[{c}]"
        for c in ("MM-mamba2", "HH-h3", "AA-transformer", "GG-gla")
    ),
    "test_prepare.py::test_prepare_resumes_after_kill_9_without_redoing_finished_units",
    "test_optim.py::test_decay_mask_follows_param_metadata",
    "test_scaling.py::test_fit_without_matplotlib_still_writes_json_and_report",
    "test_decompose.py::test_loss_at_each_length_is_the_loss_of_evaluating_at_that_length",
    "test_launch.py::test_local_launcher_propagates_a_failure",
    "test_scaling.py::test_fit_by_optimizer_keeps_the_best_lr_and_recovers_the_compute_multiplier",
    # Greedy generation's loop (prefill, then a decode step per token) stays fast with a KV
    # cache (transformer), a recurrent state (mamba2) and a conv + BASED state (based-zoology);
    # every family's decode step stays fast in test_decode_matches_forward.
    *(
        f"test_models.py::test_greedy_generation_matches_repeated_parallel_passes[{f}]"
        for f in ("based", "gla", "h3", "hybrid", "hybrid-HGWS", "lightning", "retnet", "s4d")
    ),
    # Options that do not touch the mixer (relu2 MLPs, tied embeddings): their decode and
    # segment isolation are the transformer's; hybrid-HGWS's mixers decode in test_mixers.py.
    *(
        f"test_models.py::{t}[transformer-{o}]"
        for t in ("test_decode_matches_forward", "test_segment_isolation")
        for o in ("relu2", "tied")
    ),
    "test_models.py::test_decode_matches_forward[hybrid-HGWS]",
    "test_models.py::test_zero_init_starts_every_residual_output_and_the_head_at_zero[mamba2]",
    "test_models.py::test_zero_init_starts_every_residual_output_and_the_head_at_zero[gla]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.removeprefix("tests/") in SLOW_FOR_TIME:
            item.add_marker(pytest.mark.slow)
    unknown = SLOW_FOR_TIME - {i.nodeid.removeprefix("tests/") for i in items}
    if unknown and len(items) > 400:  # a whole-suite collection: every name must still exist
        raise pytest.UsageError(f"SLOW_FOR_TIME names tests that do not exist: {sorted(unknown)}")


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):  # the controller (or a run without workers)
        shutil.rmtree(JIT_CACHE, ignore_errors=True)
        if MADE_CACHE:
            shutil.rmtree(os.environ["LMTRAIN_CACHE"], ignore_errors=True)
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


def multiprocess_experiment(d):
    """A tiny experiment file on a synthetic corpus under `d`, for runs in other processes
    (multi-process, SLURM); constant lr, so the total step count is free. Its argument is the
    step count, "ddN" for dataset decomposition over N steps, "mxN" for a two-component
    mixture (0.7 / 0.3) over N steps, "ddmxN" for both."""
    corpus, other = d / "corpus", d / "other"
    corpus.mkdir()
    other.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        words = rng.choice(["ab", "cd", "ef", "gh", "ij"], size=int(rng.integers(20, 120)))
        (corpus / f"{i}.txt").write_text(" ".join(words))
        digits = rng.choice(["12", "345", "67", "890"], size=int(rng.integers(20, 120)))
        (other / f"{i}.txt").write_text(" ".join(digits))
    p = d / "exp.py"
    p.write_text(f"""
from lmtrain import config
def get_config(arg):
    dd = arg.startswith("dd")  # "dd8": dataset decomposition, 8 steps
    arg = arg[2:] if dd else arg
    mx = arg.startswith("mx")  # "mx8": a two-component mixture, 8 steps ("ddmx8": decomposed)
    arg = arg[2:] if mx else arg
    cfg = config.override(config.Config(), {{
        "model.name": "transformer", "model.d_model": 32, "model.n_layers": 2,
        "model.n_heads": 2, "data.source": {str(corpus)!r}, "data.tokenizer": "bytes",
        "data.seq_len": 32, "train.batch_size": 8, "train.steps": int(arg or 12),
        "train.log_every": 1, "train.eval_every": 0, "train.checkpoint_every": 3,
        "train.progress": False, "train.hang_timeout_s": 180, "optim.schedule": "constant",
        "optim.warmup_steps": 2, "eval.max_batches": 1, "eval.batch_size": 8,
    }})
    if dd:
        cfg = config.override(cfg, {{
            "data.packing": "decompose", "data.decompose.min_log2_len": 3,
            "data.decompose.max_log2_len": 5,
            "train.tokens_per_step": 256,
        }})
    if mx:
        cfg = config.override(cfg, {{"data.source": "stdlib", "data.mixture": {{
            "words": {{"source": {str(corpus)!r}, "weight": 0.7}},
            "digits": {{"source": {str(other)!r}, "weight": 0.3}},
        }}}})
    return cfg
""")
    return p


def compiled_call(model, *args):
    """`model(*args)` compiled once, not dispatched op by op (an eager forward of a hybrid on
    8 host devices takes tens of seconds); the model is not changed."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args)


def losses(workdir) -> dict:
    """{step: training loss} from a run's metrics.jsonl (a resumed run's rows replace the
    earlier ones)."""
    import json

    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
