"""`lmtrain compile`: the run's exact steps compiled for real TPU topologies with libtpu (the
dev extra installs it), no TPU needed."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import json

import pytest

from lmtrain import cli
from lmtrain import compile as compile_lib
from lmtrain import config as config_lib


def _report(*argv) -> tuple[int, dict | None, str]:
    """(exit code, the JSON report if it succeeded, everything printed) of `lmtrain compile`."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["compile", *argv])
    last = out.getvalue().strip().splitlines()[-1] if out.getvalue().strip() else ""
    return code, (json.loads(last) if code == 0 else None), out.getvalue() + err.getvalue()


# Compiles that two tests read alike (each costs 20-40 s on 2 cores).
_report_once = functools.cache(_report)


# The quickstart with AdamW on v5e:2x2, data parallel (the default mesh), train step only.
QUICKSTART_ADAMW = (
    "experiments/quickstart.py",
    "--topology",
    "v5e:2x2",
    "--no-eval",
    "--set",
    "optim.name=adamw",
)


def test_unknown_topology_is_exit_2_with_known_names():
    code, _, text = _report("experiments/quickstart.py:smoke", "--topology", "v9z:2x2")
    assert code == 2
    assert "unknown TPU topology 'v9z:2x2'" in text and "v5p:4x4x4" in text


def test_mesh_that_does_not_divide_the_chips_is_a_clear_error():
    argv = ["experiments/quickstart.py:smoke", "--topology", "v5e:2x2", "--set"]
    code, _, text = _report(*argv, "mesh.shape=(3,1,1)")
    assert code == 2 and "mesh.shape (3, 1, 1, 1) needs 3 devices, have 4" in text


def test_missing_libtpu_says_how_to_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    with pytest.raises(config_lib.ConfigError, match=r"pip install 'lmtrain\[tpu\]'"):
        compile_lib.topology_devices("v5e:2x2")


def test_hbm_oom_is_reported_not_raised():
    def oom():
        raise RuntimeError(
            "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the total "
            "memory required for HLO temporaries (32.03G) exceeds available HBM (31.24G)."
        )

    plan = compile_lib._compile("train 8x4096", oom, 1e15, 3 * 2**30)
    assert plan.fits is False and plan.temp_gib == 32.03 and plan.peak_gib == 35.03
    assert "exceeds available HBM" in plan.error

    def other():
        raise RuntimeError("INVALID_ARGUMENT: something else")

    with pytest.raises(RuntimeError, match="something else"):
        compile_lib._compile("train 8x4096", other, 1e15, 0)


def test_chip_table_knows_every_generation():
    for kind, hbm in [("TPU v4", 32), ("TPU v5 lite", 16), ("TPU v5", 95), ("TPU v6 lite", 32)]:
        peak, got, bandwidth = compile_lib.chip_specs(kind)
        assert got == hbm and peak > 1e14 and bandwidth > 5e11


def test_one_chip_table_serves_mfu_and_compile():
    """compile's figures and MFU's peak come from the same row (they once came from two tables
    that disagreed: compile used the SXM card's bandwidth for the PCIe H100)."""
    from lmtrain import flops

    for kind in (
        "NVIDIA H100 PCIe",
        "NVIDIA H100 80GB HBM3",
        "NVIDIA H200",
        "TPU v5 lite",
        "TPU v5",
    ):
        peak, hbm, bandwidth = compile_lib.chip_specs(kind)
        assert peak == flops.lookup_peak(kind)
    assert compile_lib.chip_specs("NVIDIA H100 PCIe")[2] == 2.0e12
    assert compile_lib.chip_specs("NVIDIA H100 80GB HBM3")[2] == 3.35e12
    assert compile_lib.chip_specs("NVIDIA A100-SXM4-40GB")[1:] == (40, 1.555e12)
    with pytest.raises(config_lib.ConfigError, match="no published figures for 'TPU7x'"):
        compile_lib.chip_specs("TPU7x")


@pytest.mark.slow
def test_quickstart_compiles_for_v5e_and_reports_per_chip():
    code, r, text = _report("experiments/quickstart.py", "--topology", "v5e:2x2")
    assert code == 0, text
    for key in ("topology", "chips", "hbm_peak_gib", "hbm_chip_gib", "fits", "xla_flops"):
        assert key in r
    assert r["topology"] == "v5e:2x2" and r["chips"] == 4 and r["fits"] is True
    assert 0 < r["hbm_peak_gib"] < 1 and r["hbm_chip_gib"] == 16
    assert 0 < r["est_mfu"] < 1 and r["est_step_s"] > 0
    assert [s["name"] for s in r["steps"]] == ["train 16x256", "eval 16x256"]
    assert "fits" in text and "estimate" in text
    assert "with the optimizer's orthogonalisation" in text  # Muon's matmuls, counted apart
    # XLA's count vs lmtrain's model FLOPs. The quickstart's Muon adds per step 5 Newton-Schulz
    # iterations of 4 m^2 n + 2 m^3 on each hidden m x n matrix (m <= n), work the model count
    # leaves out: with AdamW the two counts agree. lmtrain.muon spreads the matrices of each
    # shape (gate, up and down taken wide alike) over the 4 chips: a chip does ceil(count / 4).
    code, adam, text = _report_once(*QUICKSTART_ADAMW)
    assert code == 0, text
    assert 0.95 < adam["flops_ratio"] < 1.3
    cfg = config_lib.load_experiment("experiments/quickstart.py").model
    D, F, L = cfg.d_model, cfg.ffn_width, cfg.n_layers  # q, k, v, o: D x D; gate, up: D x F
    ns = lambda m, n: 5 * (4 * m * m * n + 2 * m**3)
    newton_schulz = L * (4 * ns(D, D) + 3 * ns(min(D, F), max(D, F)))  # all of them
    per_chip = -(-4 * L // 4) * ns(D, D) + -(-3 * L // 4) * ns(min(D, F), max(D, F))
    extra = r["xla_flops"] - adam["xla_flops"]
    assert extra == pytest.approx(per_chip, rel=0.02) and per_chip < newton_schulz / 3
    # lmtrain's own count of that work (optim.step_flops), once per step, shared by the chips.
    assert r["optimizer_flops"] * r["chips"] == pytest.approx(newton_schulz)
    assert adam["optimizer_flops"] == 0 and "with the optimizer's orthogonalisation" not in text
    assert 1 < r["flops_ratio_with_optimizer"] < r["flops_ratio"]


@pytest.mark.slow
def test_oversized_config_reports_fits_false_and_exits_0():
    # 8B parameters with Adam on 4 v5e chips: ~32 GiB of state per chip against 16.
    argv = ["experiments/scale.py:8b", "--topology", "v5e:2x2", "--no-eval"]
    code, r, text = _report(*argv, "--set", "train.batch_size=4")
    assert code == 0, text
    assert r["fits"] is False and r["hbm_peak_gib"] > r["hbm_chip_gib"]
    assert "NO" in text


@pytest.mark.slow
def test_scanned_splash_model_fits_a_small_topology_with_sane_flops():
    # The scale shapes' choices (layers scanned, full remat, splash, chunked loss, bf16, fsdp)
    # at a width that compiles in seconds; BENCHMARKS.md has the 1B-70B plans themselves.
    small = ["model.vocab_size=4096", "model.d_model=256", "model.n_heads=4", "model.n_layers=3"]
    small += ["data.seq_len=512", "train.batch_size=4", "train.loss_chunk=128"]
    argv = ["experiments/scale.py:125m", "--topology", "v5p:2x2x1", "--no-eval"]
    code, r, text = _report(*argv, *(x for s in small for x in ("--set", s)))
    assert code == 0, text
    assert r["fits"] is True and r["chips"] == 4 and r["n_params"] < 5e6
    # Scanned layers: XLA counts a loop body once (3 layers would read ~1/3 of the FLOPs), so
    # the costs are extrapolated from unscanned compiles of 1 and 2 layers. What XLA's TPU
    # count still misses (BENCHMARKS.md): splash, all loss chunks but one, and apparently the
    # remat recomputation; what it adds: norms, softmax, the optimizer.
    assert 0.6 < r["flops_ratio"] < 1.6, r["flops_ratio"]  # un-extrapolated: ~0.36
    assert 0 < r["est_mfu"] <= 0.75  # full remat: at most 3/4 of the hardware FLOPs are model


@pytest.mark.slow
def test_splash_under_a_sequence_split_compiles_for_tpu():
    """Splash's Mosaic kernel inside the split (models/sequence.py) lowers for a TPU: it must
    sit in a shard_map over the tensor axis too (the CPU tests run it interpreted, where
    nothing needs that). Each chip's early and late half-pieces of queries travel there and
    back by collective-permute; XLA's dense path at this length would move none."""
    small = ["model.vocab_size=4096", "model.d_model=256", "model.n_heads=4", "model.n_layers=2"]
    small += ["data.seq_len=512", "train.batch_size=2", "mesh.shape=[1,1,2,2]"]
    argv = ["experiments/scale.py:125m", "--topology", "v5p:2x2x1", "--no-eval"]
    code, r, text = _report(*argv, *(x for s in small for x in ("--set", s)))
    assert code == 0, text
    assert r["mesh"]["sequence"] == 2 and r["mesh"]["tensor"] == 2 and r["fits"] is True
    assert r["collective_bytes"]["collective-permute"] > 0


@pytest.mark.slow
def test_collectives_are_counted_and_priced():
    """Data parallelism over 4 chips all-reduces every f32 gradient: 2 x 3/4 x 4 bytes a
    parameter (plus a few scalars). Splitting rows over a sequence axis instead all-gathers
    each layer's keys and values and reduce-scatters their gradients; the estimate adds the
    bytes at v5e's 200 GB/s."""
    code, dp, text = _report_once(*QUICKSTART_ADAMW)
    assert code == 0, text
    assert dp["mesh"]["data"] == 4 and dp["mesh"]["sequence"] == 1
    moved = dp["collective_bytes"]
    assert moved["all-reduce"] == pytest.approx(6 * dp["n_params"], rel=1e-4)
    assert moved["all-gather"] == moved["collective-permute"] == 0
    assert dp["comm_s"] == pytest.approx(moved["total"] / 200e9)
    assert "collectives all-reduce" in text and "200 GB/s" in text
    code, seq, text = _report(*QUICKSTART_ADAMW, "--set", "mesh.shape=[1,1,1,4]")
    assert code == 0, text
    assert seq["mesh"]["sequence"] == 4
    assert (
        seq["collective_bytes"]["all-gather"] > 0 and seq["collective_bytes"]["reduce-scatter"] > 0
    )
    assert seq["comm_s"] > dp["comm_s"]
