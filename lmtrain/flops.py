"""Parameter counts, peak FLOP/s and model FLOPs utilisation (MFU).

The one formula:

    MFU = tokens_per_sec * flops_per_token / peak_flops

- `flops_per_token` is the model config's `flops_per_token(seq_len)`: training (forward +
  backward) FLOPs per token = 6 x (matmul parameters, including the output projection, excluding
  the embedding gather) + the family's own sequence-mixer term (for causal softmax attention
  6 x n_layers x seq_len x d_model, half of full attention's 12 x ...). Each family counts its
  own; this module never does. Rematerialisation is not counted (model FLOPs, not hardware FLOPs).
- `tokens_per_sec` and `peak_flops` must cover the same devices (all of them, globally).
- On accelerators the peak is the chip's dense bf16 figure from `CHIPS` times the number of
  chips, whatever the compute dtype (so an f32 run on a GPU shows a low MFU, by design).
- On CPU the peak is measured with a jitted f32 matmul on one device: the fastest of several
  timed repeats after a warm-up (load on a shared machine only ever slows a repeat, so the
  fastest is the closest to the machine's peak), and, given a cache file, the best figure ever
  measured on this CPU model (keyed by CPU model, core count and jax version). A median of 4
  moved 2x between runs of the same command on a loaded machine; the cached best does not move
  once it has seen a quiet moment. Fake CPU devices (`--xla_force_host_platform_device_count`)
  share the same cores, so the total is that single measurement, NOT times the device count.
  f32 is used because bf16 is not faster on CPU.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Chip(NamedTuple):
    """One accelerator's published figures: dense bf16 FLOP/s, HBM GiB and HBM bytes/s."""

    bf16_flops: float
    hbm_gib: float
    hbm_bytes_s: float


# THE chip table (MFU here, the memory and roofline estimates of lmtrain.compile), keyed by a
# lower-case substring of `device.device_kind` (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100
# PCIe", "TPU v5 lite" = v5e, "TPU v5" = v5p, "TPU v6 lite" = v6e). The longest matching key
# wins, so "tpu v5 lite" beats "tpu v5" and "h100 pcie" beats "h100". Vendors' datasheets.
CHIPS: dict[str, Chip] = {
    "a100": Chip(312e12, 80, 2.039e12),  # SXM4 80GB
    "a100-sxm4-40gb": Chip(312e12, 40, 1.555e12),
    "a100-pcie-40gb": Chip(312e12, 40, 1.555e12),
    "h100": Chip(989e12, 80, 3.35e12),  # SXM5
    "h100 pcie": Chip(756e12, 80, 2.0e12),  # lower clocks and power than SXM, HBM2e
    "h200": Chip(989e12, 141, 4.8e12),
    "tpu v4": Chip(275e12, 32, 1.2e12),
    "tpu v5 lite": Chip(197e12, 16, 819e9),
    "tpu v5e": Chip(197e12, 16, 819e9),
    "tpu v5": Chip(459e12, 95, 2.765e12),
    "tpu v5p": Chip(459e12, 95, 2.765e12),
    "tpu v6 lite": Chip(918e12, 32, 1.64e12),
    "tpu v6e": Chip(918e12, 32, 1.64e12),
}


def lookup_chip(device_kind: str) -> Chip | None:
    """The published figures of a `device_kind`, or None if the table does not know it."""
    kind = device_kind.lower()
    matches = [key for key in CHIPS if key in kind]
    return CHIPS[max(matches, key=len)] if matches else None


def lookup_peak(device_kind: str) -> float | None:
    """Per-chip bf16 peak for a `device_kind` string, or None if the table does not know it."""
    chip = lookup_chip(device_kind)
    return chip.bf16_flops if chip else None


def _matmul_peak(device: jax.Device, n: int, dtype: Any, repeats: int) -> float:
    """FLOP/s of a jitted n x n matmul on `device`: the fastest of `repeats` timed runs after
    a warm-up."""
    rng = np.random.default_rng(0)
    # Built in numpy and put straight onto `device`, never via the default backend.
    a, b = (jax.device_put(rng.random((n, n), np.float32).astype(dtype), device) for _ in "ab")
    matmul = jax.jit(jnp.matmul)
    for _ in range(2):  # compile, then one untimed run to settle caches and clocks
        matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / min(times)


def measure_cpu_peak(n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a jitted f32 n x n matmul on ONE CPU device, fastest of `repeats`."""
    return _matmul_peak(jax.devices("cpu")[0], n, jnp.float32, repeats)


def _cpu_key() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} | {os.cpu_count()} cores | jax {jax.__version__}"


def cpu_peak(cache: Path | None = None, n: int = 2048) -> tuple[float, str]:
    """(peak FLOP/s, its source) on this CPU: this run's measurement, or the best one recorded
    in the JSON file `cache` for this CPU model if that is higher (then updated)."""
    measured = measure_cpu_peak(n)
    source = f"measured: cpu matmul {n} f32, fastest of 10"
    if cache is None:
        return measured, source
    key = _cpu_key()
    try:
        known = json.loads(cache.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    best = max(measured, float(known.get(key, {}).get("peak", 0.0)))
    runs = int(known.get(key, {}).get("runs", 0)) + 1
    known[key] = {"peak": best, "runs": runs}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the stability, never the run
    return best, f"{source}; best of {runs} runs on this CPU, cached in {cache}"


def peak_flops(
    devices: Sequence[jax.Device], dtype: Any = jnp.bfloat16, cache: Path | None = None
) -> tuple[float, str]:
    """Total peak FLOP/s over `devices` and its source; `dtype` only matters for unknown chips;
    `cache` keeps the best CPU measurement (see cpu_peak)."""
    device = devices[0]
    if device.platform == "cpu":
        return cpu_peak(cache)
    per_chip = lookup_peak(device.device_kind)
    if per_chip is not None:
        return per_chip * len(devices), f"table: {device.device_kind} x{len(devices)}"
    # An accelerator missing from the table: its own matmul speed is the best estimate we have,
    # in the run's dtype; this understates the true peak, so MFU comes out high.
    n, name = 4096, jnp.dtype(dtype).name
    per_chip = _matmul_peak(device, n, jnp.dtype(dtype), repeats=4)
    return per_chip * len(devices), (
        f"measured: {device.platform} matmul {n} {name} x{len(devices)}"
        f" (unknown kind {device.device_kind!r})"
    )


def train_flops_per_token(model_cfg: Any, seq_len: int, targets_per_row: int = 0) -> float:
    """The model's flops_per_token(seq_len), with the output head (6 V D per token) charged
    only for the scored fraction Q / L of positions when a batch scores Q per row (MQAR)."""
    fpt = model_cfg.flops_per_token(seq_len)
    if targets_per_row:
        head = 6 * model_cfg.vocab_size * model_cfg.d_model
        fpt -= head * (1 - targets_per_row / seq_len)
    return float(fpt)


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over peak FLOP/s."""
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_sec * flops_per_token / peak


def count_params(params: Any) -> int:
    """Number of scalars in a pytree of arrays (or of jax.ShapeDtypeStruct)."""
    return sum(math.prod(np.shape(leaf)) for leaf in jax.tree.leaves(params))
