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
- On CPU the peak is measured in the run's compute dtype (float32, or bfloat16 inputs with
  float32 accumulation, which AVX-512 BF16 runs about twice as fast) with a jitted matmul on one
  local device: the fastest of several timed repeats after a warm-up (load on a shared machine
  only ever slows a repeat). Given a cache file, the peak is the median of the last readings of
  this CPU model and dtype (keyed by CPU model, core count and jax version), never a running
  maximum: one bogus timing once read 6.9e15 FLOP/s and made every later MFU 0.000. A reading
  above what the cores' vector units can do, or 3x the median of the others, is rejected with a
  warning. Fake CPU devices (`--xla_force_host_platform_device_count`) share the same cores,
  so the total is that single measurement, NOT times the device count.
"""

from __future__ import annotations

import json
import logging
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

from lmtrain.errors import ConfigError

log = logging.getLogger("lmtrain")


class Chip(NamedTuple):
    """One accelerator's published figures: dense bf16 FLOP/s, HBM GiB, HBM bytes/s and the
    chip's interconnect bytes/s in one direction, all its links together (ICI on TPUs, NVLink
    on GPUs; the vendors' bidirectional figures are twice these)."""

    bf16_flops: float
    hbm_gib: float
    hbm_bytes_s: float
    ici_bytes_s: float = 0.0


# THE chip table (MFU here, the memory and roofline estimates of lmtrain.compile), keyed by a
# lower-case substring of `device.device_kind` (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA H100
# PCIe", "TPU v5 lite" = v5e, "TPU v5" = v5p, "TPU v6 lite" = v6e). The longest matching key
# wins, so "tpu v5 lite" beats "tpu v5" and "h100 pcie" beats "h100". Vendors' datasheets;
# interconnect: NVLink 3 600 GB/s and NVLink 4 900 GB/s bidirectional (halved here, PCIe cards
# with an NVLink bridge as NVLink 3), Google's Cloud TPU pages' "interchip interconnect BW"
# (v4 2,400, v5e 1,600, v5p 4,800, v6e 3,584 Gbps; v5p's page also gives 1,200 GB/s
# bidirectional = 2 x 4,800 Gbps / 8).
CHIPS: dict[str, Chip] = {
    "a100": Chip(312e12, 80, 2.039e12, 300e9),  # SXM4 80GB
    "a100-sxm4-40gb": Chip(312e12, 40, 1.555e12, 300e9),
    "a100-pcie-40gb": Chip(312e12, 40, 1.555e12, 300e9),
    "h100": Chip(989e12, 80, 3.35e12, 450e9),  # SXM5
    "h100 pcie": Chip(756e12, 80, 2.0e12, 300e9),  # lower clocks and power than SXM, HBM2e
    "h200": Chip(989e12, 141, 4.8e12, 450e9),
    "tpu v4": Chip(275e12, 32, 1.2e12, 300e9),
    "tpu v5 lite": Chip(197e12, 16, 819e9, 200e9),
    "tpu v5e": Chip(197e12, 16, 819e9, 200e9),
    "tpu v5": Chip(459e12, 95, 2.765e12, 600e9),
    "tpu v5p": Chip(459e12, 95, 2.765e12, 600e9),
    "tpu v6 lite": Chip(918e12, 32, 1.64e12, 448e9),
    "tpu v6e": Chip(918e12, 32, 1.64e12, 448e9),
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
    # float32 accumulation whatever the inputs: what a bf16 model's dots do.
    matmul = jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
    for _ in range(2):  # compile, then one untimed run to settle caches and clocks
        matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / min(times)


def measure_cpu_peak(n: int = 2048, repeats: int = 10, dtype: Any = jnp.float32) -> float:
    """FLOP/s of a jitted n x n matmul on ONE local CPU device, fastest of `repeats`: float32,
    or `dtype` inputs (bfloat16) with float32 accumulation."""
    # A local device: in a multi-process run jax.devices()[0] may be another process's, whose
    # work never runs here, so the timing measured nothing (that cached 6.9e15 FLOP/s once).
    return _matmul_peak(jax.local_devices(backend="cpu")[0], n, jnp.dtype(dtype), repeats)


def _cpuinfo() -> tuple[str, set[str], float | None]:
    """(model name, flags, MHz now) from /proc/cpuinfo (empty where there is none)."""
    model, flags, mhz = platform.processor() or platform.machine(), set(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (x.strip() for x in line.partition(":"))
            if key == "model name":
                model = value
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "cpu MHz" and mhz is None:
                mhz = float(value)
    except (OSError, ValueError):
        pass
    return model, flags, mhz


def _cpu_key(dtype_name: str) -> str:
    return f"{_cpuinfo()[0]} | {os.cpu_count()} cores | jax {jax.__version__} | {dtype_name}"


def cpu_flops_bound(dtype_name: str) -> float:
    """What the cores' vector units could do at most: cores x clock x FLOP/cycle, generously
    (6 GHz or twice the clock now, two FMA units of the widest vectors, bf16 dot products at
    twice f32, AMX at 16 x). A measured peak above it is a bad timing, not a fast CPU."""
    _, flags, mhz = _cpuinfo()
    ghz = min(2 * mhz / 1000, 6.0) if mhz else 6.0
    lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "avx" in flags) else 4
    per_cycle = 2 * 2 * lanes  # 2 units x FMA (2 FLOPs) x f32 lanes
    if dtype_name != "float32":
        per_cycle *= 16 if "amx_bf16" in flags else 2
    return (os.cpu_count() or 1) * ghz * 1e9 * per_cycle


_KEEP = 20  # readings kept per CPU model and dtype
_OUTLIER = 3.0  # a reading this many times the median of the others is rejected


def cpu_peak(cache: Path | None = None, n: int = 2048, dtype: Any = jnp.float32) -> tuple:
    """(peak FLOP/s, its source) on this CPU in `dtype` (float32, or bfloat16 inputs with f32
    accumulation): the median of this run's measurement and the last readings kept in the JSON
    file `cache` for this CPU model and dtype. Never a running maximum: one bad timing (a reading
    above what the cores can do, or `_OUTLIER` x the others) is rejected with a warning."""
    name = jnp.dtype(dtype).name
    measured = measure_cpu_peak(n, dtype=dtype)
    source = f"measured: cpu matmul {n} {name}, fastest of 10"
    bound = cpu_flops_bound(name)
    key = _cpu_key(name)
    known = _read_cache(cache)
    kept = []
    for x in known.get(key, {}).get("readings", []):
        if isinstance(x, (int, float)) and 0 < x <= bound:
            kept.append(float(x))
        else:
            log.warning(
                "ignored a cached CPU peak of %s GFLOP/s in %s: above what %d cores can do "
                "(%.0f GFLOP/s)",
                f"{x / 1e9:,.0f}" if isinstance(x, (int, float)) else repr(x),
                cache,
                os.cpu_count() or 1,
                bound / 1e9,
            )
    others = float(np.median(kept)) if len(kept) >= 3 else None
    if measured > bound or (others and measured > _OUTLIER * others):
        log.warning(
            "ignored this run's CPU peak measurement of %.0f GFLOP/s (%s); MFU uses the cached "
            "readings",
            measured / 1e9,
            "above what the cores can do"
            if measured > bound
            else f"over {_OUTLIER:g}x the median of {len(kept)} earlier runs",
        )
        if not kept:
            return bound, f"the cores' vector-unit bound {bound / 1e9:.0f} GFLOP/s"
    else:
        kept.append(measured)
    kept = kept[-_KEEP:]
    if cache is None:
        return float(np.median(kept)), source
    known[key] = {"readings": kept}
    _write_cache(cache, known)
    return float(np.median(kept)), f"{source}; median of {len(kept)} runs, cached in {cache}"


def _read_cache(cache: Path | None) -> dict:
    if cache is None:
        return {}
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def _write_cache(cache: Path, known: dict) -> None:
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)
    except OSError:
        pass  # a read-only cache only costs the stability, never the run


PEAK_ENV = "LMTRAIN_CPU_PEAK_GFLOPS"


def fixed_cpu_peak() -> float | None:
    """The CPU peak (FLOP/s, for any dtype) that $LMTRAIN_CPU_PEAK_GFLOPS sets instead of a
    timed matmul (a spec sheet's figure, or one number to compare runs by; it also saves the
    ~1 s the timing takes), None where it is unset; ConfigError unless a positive number."""
    raw = os.environ.get(PEAK_ENV, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{PEAK_ENV}={raw!r}: needs a positive number of GFLOP/s, e.g. 200")
    return value * 1e9


def peak_flops(
    devices: Sequence[jax.Device], dtype: Any = jnp.bfloat16, cache: Path | None = None
) -> tuple[float, str]:
    """Total peak FLOP/s over `devices` and its source. On CPUs the matmul peak in the run's
    compute `dtype` (cpu_peak; `cache` keeps its readings); on accelerators the table's dense
    bf16 figure; `dtype` also sets the measurement for chips the table does not know."""
    device = devices[0]
    if device.platform == "cpu":
        fixed = fixed_cpu_peak()
        if fixed is not None:
            return fixed, f"{PEAK_ENV}={os.environ[PEAK_ENV]}"
        return cpu_peak(cache, dtype=jnp.float32 if jnp.dtype(dtype) == jnp.float32 else dtype)
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
