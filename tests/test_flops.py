"""Peak table lookup, peak totals over devices, MFU arithmetic, parameter counts."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import pytest

from lmtrain import flops
from lmtrain.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    platform: str
    device_kind: str


@pytest.mark.parametrize(
    "kind, want",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("tpu V6E", 918e12),
        ("cpu", None),
        ("TPU7x", None),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_lookup_peak(kind, want):
    assert flops.lookup_peak(kind) == want


def test_peak_from_table_is_per_chip_times_chips():
    devices = [FakeDevice("gpu", "NVIDIA H100 80GB HBM3")] * 8
    peak, source = flops.peak_flops(devices, jnp.bfloat16)
    assert peak == pytest.approx(8 * 989e12)
    assert source.startswith("table: NVIDIA H100")


def test_unknown_accelerator_falls_back_to_a_measured_matmul(monkeypatch):
    monkeypatch.setattr(flops, "_matmul_peak", lambda device, n, dtype, repeats: 1e14)
    devices = [FakeDevice("gpu", "NVIDIA GeForce RTX 4090")] * 2
    peak, source = flops.peak_flops(devices, "bfloat16")
    assert peak == 2e14
    assert source.startswith("measured: gpu matmul 4096 bfloat16 x2")


def test_cpu_peak_is_not_multiplied_by_fake_devices(monkeypatch):
    monkeypatch.delenv(flops.PEAK_ENV, raising=False)
    monkeypatch.setattr(flops, "measure_cpu_peak", lambda n=2048, repeats=4, dtype=None: 1.5e11)
    peak, source = flops.peak_flops(jax.devices(), jnp.float32)
    assert peak == 1.5e11
    assert source == "measured: cpu matmul 2048 float32, fastest of 10"


def test_a_fixed_cpu_peak_replaces_the_timing_and_bad_values_are_config_errors(
    monkeypatch, tmp_path
):
    def timed(*a, **k):
        raise AssertionError("timed a matmul although the peak was fixed")

    monkeypatch.setattr(flops, "measure_cpu_peak", timed)
    monkeypatch.setenv(flops.PEAK_ENV, "250")
    for dtype in (jnp.float32, jnp.bfloat16):
        assert flops.peak_flops(jax.devices(), dtype) == (2.5e11, "LMTRAIN_CPU_PEAK_GFLOPS=250")
    for bad in ("fast", "-3", "0", "nan", "inf"):
        monkeypatch.setenv(flops.PEAK_ENV, bad)
        with pytest.raises(ConfigError, match=r"LMTRAIN_CPU_PEAK_GFLOPS=.*positive number"):
            flops.peak_flops(jax.devices(), jnp.float32)
    from conftest import tiny

    from lmtrain import train

    with pytest.raises(ConfigError, match="LMTRAIN_CPU_PEAK_GFLOPS"):
        train.train(tiny(tmp_path / "no-corpus-needed"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the workdir was touched
    monkeypatch.setenv(flops.PEAK_ENV, "")  # empty is unset: the timing runs
    with pytest.raises(AssertionError, match="timed a matmul"):
        flops.peak_flops(jax.devices(), jnp.float32)


def test_cpu_peak_is_the_median_of_kept_readings_never_a_running_maximum(monkeypatch, tmp_path):
    """A loaded run measures low, a quiet one high; the cached median moves little either way."""
    measured = iter([2.0e11, 4.0e11, 1.0e11, 3.0e11])
    monkeypatch.setattr(flops, "measure_cpu_peak", lambda n, dtype: next(measured))
    monkeypatch.setattr(flops, "cpu_flops_bound", lambda name: 1e13)
    cache = tmp_path / "cpu_peak.json"
    peaks = [flops.cpu_peak(cache)[0] for _ in range(4)]
    assert peaks == [2.0e11, 3.0e11, 2.0e11, 2.5e11]
    monkeypatch.setattr(flops, "measure_cpu_peak", lambda n, dtype: 1.0e11)
    assert flops.cpu_peak(None)[0] == 1.0e11  # without the cache: this run's own
    peak, source = flops.cpu_peak(cache)
    assert peak == 2.0e11 and "median of 5 runs" in source and str(cache) in source
    # bf16 has readings of its own (a bf16 model's MFU is against the bf16 matmul).
    monkeypatch.setattr(flops, "measure_cpu_peak", lambda n, dtype: 7.0e11)
    assert flops.cpu_peak(cache, dtype=jnp.bfloat16)[0] == 7.0e11
    assert flops.cpu_peak(cache)[0] == 2.0e11  # 7e11 is over 3x the float32 median: dropped
    cache.write_text("not json")  # a damaged cache costs the history, never the run
    assert flops.cpu_peak(cache)[0] == 7.0e11


def test_a_planted_bogus_peak_is_ignored_with_a_warning(monkeypatch, tmp_path, caplog):
    """The poisoned cache of the issue: one reading of 6.9e15 FLOP/s on 2 cores."""
    # (the CLI, run by earlier tests, stops lmtrain's records at its own console handler)
    monkeypatch.setattr(logging.getLogger("lmtrain"), "propagate", True)
    monkeypatch.setattr(flops, "measure_cpu_peak", lambda n, dtype: 2.0e11)
    cache = tmp_path / "cpu_peak.json"
    key = flops._cpu_key("float32")
    cache.write_text(json.dumps({key: {"readings": [1.9e11, 6.9e15, 2.1e11]}}))
    with caplog.at_level("WARNING", logger="lmtrain"):
        peak, _ = flops.cpu_peak(cache)
    assert peak == 2.0e11  # the median of 1.9, 2.1 and this run's 2.0
    assert "ignored a cached CPU peak of 6,900,000 GFLOP/s" in caplog.text
    assert 6.9e15 not in json.loads(cache.read_text())[key]["readings"]  # dropped for good
    # The old format (a running maximum) is not read at all.
    cache.write_text(json.dumps({key: {"peak": 6.9e15, "runs": 37}}))
    assert flops.cpu_peak(cache)[0] == 2.0e11
    # A reading far above the others (a bad timing under the bound) is not kept either.
    monkeypatch.setattr(flops, "cpu_flops_bound", lambda name: 1e13)
    monkeypatch.setattr(flops, "measure_cpu_peak", lambda n, dtype: 9.0e11)
    cache.write_text(json.dumps({key: {"readings": [2.0e11, 2.0e11, 2.2e11]}}))
    caplog.clear()
    with caplog.at_level("WARNING", logger="lmtrain"):
        assert flops.cpu_peak(cache)[0] == 2.0e11
    assert "over 3x the median of 3 earlier runs" in caplog.text
    assert len(json.loads(cache.read_text())[key]["readings"]) == 3


def test_metrics_window_reports_mfu_from_flops_mfu(monkeypatch):
    from lmtrain.tracking import MetricsWindow

    clock = iter([100.0, 102.0])
    monkeypatch.setattr("lmtrain.tracking.time.time", lambda: next(clock))
    w = MetricsWindow(0, 1000, {64: 5e6, 128: 7e6}, peak=1e10)
    w.add(64)
    w.add(128)
    row = w.close(2)  # 2000 tokens in 2 s; mean 6e6 FLOP/token
    assert row["tokens_per_sec"] == pytest.approx(1000.0)
    assert row["mfu"] == pytest.approx(flops.mfu(1000.0, 6e6, 1e10)) == pytest.approx(0.6)
    assert "mfu_with_optimizer" not in row
    # An optimizer's own matmuls (Muon) per step: a separate figure; the model's MFU stays.
    clock = iter([100.0, 102.0])
    monkeypatch.setattr("lmtrain.tracking.time.time", lambda: next(clock))
    w = MetricsWindow(0, 1000, {64: 5e6}, peak=1e10, optimizer_flops=2e9)
    w.add(64)
    w.add(64)
    row = w.close(2)  # 2000 tokens in 2 s, 5e6 + 2e9 / 1000 = 7e6 FLOP/token with it
    assert row["mfu"] == pytest.approx(0.5) and row["mfu_with_optimizer"] == pytest.approx(0.7)


def test_measure_cpu_peak_is_plausible():
    for dtype in (jnp.float32, jnp.bfloat16):
        peak = flops.measure_cpu_peak(n=1024, repeats=3, dtype=dtype)
        bound = flops.cpu_flops_bound(jnp.dtype(dtype).name)
        # The bound is per machine (a 2-core AMX host reads 1.06e13 in bf16); per core it stays
        # below 1e13, what no CPU core does.
        assert math.isfinite(peak) and 1e8 < peak <= bound < 1e13 * (os.cpu_count() or 1)


def test_mfu_arithmetic():
    # 1000 tok/s x 6e9 FLOP/token = 6e12 FLOP/s out of 1e13.
    assert flops.mfu(1000.0, 6e9, 1e13) == pytest.approx(0.6)
    with pytest.raises(ValueError, match="positive"):
        flops.mfu(1000.0, 6e9, 0.0)


def test_count_params():
    params = {
        "a": jnp.zeros((3, 4)),
        "b": [jnp.zeros(5), jax.ShapeDtypeStruct((2, 3), jnp.float32)],
        "c": {"scalar": jnp.zeros(())},
    }
    assert flops.count_params(params) == 12 + 5 + 6 + 1
    assert flops.count_params({}) == 0
