"""XLA flags for GPU runs, applied before JAX starts (the `lmtrain` command calls `apply`).

The set is the one MaxText's published GPU recipes use (AI-Hypercomputer/gpu-recipes): the
latency-hiding scheduler so collectives overlap compute, pipelined all-gather / reduce-scatter
/ all-reduce and while-loop double buffering for fsdp over scanned layers, large combine
thresholds so per-layer collectives are batched, cuBLAS rather than Triton GEMMs, and XLA's
own rematerialisation pass off (lmtrain's remat policies decide what is recomputed).

They are added only where a CUDA plugin for JAX is installed and JAX_PLATFORMS does not rule
the GPU out; a flag already in XLA_FLAGS wins over ours, and LMTRAIN_GPU_XLA_FLAGS=0 turns the
whole set off.

On CPUs, `cpu_host_devices` is the rule for how many XLA host devices a process gets, and
`skip_absent_tpu` keeps libtpu (installed by the tpu and dev extras for `lmtrain compile`) from
starting, and printing its TPU errors, on machines that have no TPU.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

GPU_FLAGS: dict[str, str] = {
    "xla_gpu_enable_latency_hiding_scheduler": "true",
    "xla_gpu_enable_triton_gemm": "false",
    "xla_gpu_enable_highest_priority_async_stream": "true",
    "xla_gpu_all_reduce_combine_threshold_bytes": "1073741824",
    "xla_gpu_all_gather_combine_threshold_bytes": "1073741824",
    "xla_gpu_reduce_scatter_combine_threshold_bytes": "1073741824",
    "xla_gpu_enable_pipelined_all_gather": "true",
    "xla_gpu_enable_pipelined_reduce_scatter": "true",
    "xla_gpu_enable_pipelined_all_reduce": "true",
    "xla_gpu_enable_while_loop_double_buffering": "true",
    "xla_gpu_enable_all_gather_combine_by_dim": "false",
    "xla_gpu_enable_reduce_scatter_combine_by_dim": "false",
    "xla_disable_hlo_passes": "rematerialization",
}


def merged(existing: str, flags: dict[str, str]) -> str:
    """`existing` XLA_FLAGS plus `flags`, leaving out any flag `existing` already sets."""
    present = {f.lstrip("-").split("=", 1)[0] for f in existing.split()}
    extra = [f"--{k}={v}" for k, v in flags.items() if k not in present]
    return " ".join([existing.strip(), *extra]).strip()


def gpu_expected(environ: dict | None = None) -> bool:
    """True where JAX will likely run on a GPU: a CUDA plugin is installed and JAX_PLATFORMS
    (if set) names cuda or gpu."""
    env = os.environ if environ is None else environ
    platforms = env.get("JAX_PLATFORMS", "")
    if platforms and not any(p in platforms for p in ("cuda", "gpu")):
        return False
    return any(
        importlib.util.find_spec(name) is not None
        for name in ("jax_cuda12_plugin", "jax_cuda13_plugin")
    )


def apply(environ: dict | None = None) -> bool:
    """Adds GPU_FLAGS to XLA_FLAGS when a GPU run is expected; True if it did."""
    env = os.environ if environ is None else environ
    if env.get("LMTRAIN_GPU_XLA_FLAGS", "1") == "0" or not gpu_expected(env):
        return False
    env["XLA_FLAGS"] = merged(env.get("XLA_FLAGS", ""), GPU_FLAGS)
    return True


def usable_cpus() -> int:
    """The cores this process may use: SLURM's allocation (SLURM_CPUS_PER_TASK) where there is
    one, else the CPU affinity mask, else every core."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cpu_host_devices(parallel: int = 1) -> int:
    """XLA host devices for one of `parallel` runs sharing this process's cores: a power of two
    <= usable cores / parallel, at most 8 (one device per core was 1.37x faster than one device
    for the quickstart on 2 cores: XLA:CPU runs one device's small ops nearly serially)."""
    share, n = max(1, usable_cpus() // parallel), 1
    while n * 2 <= min(share, 8):
        n *= 2
    return n


_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI devices of Google's (as jax itself checks)


def tpu_attached() -> bool:
    """True if a Google PCI device (a TPU chip) is attached to this machine."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == _GOOGLE_PCI_VENDOR:
                return True
        except OSError:
            continue
    return False


def skip_absent_tpu(environ: dict | None = None) -> str | None:
    """Where libtpu is installed but no TPU is attached and JAX_PLATFORMS is unset, sets it to
    the platforms that can be here (cuda where a CUDA plugin and an NVIDIA device exist, and
    cpu), so JAX never starts libtpu: it printed five lines of "could not determine TPU
    accelerator type" and an `E0000 ... INVALID_ARGUMENT` on every command of a CPU machine.
    `lmtrain compile` still loads libtpu for its topologies. Returns what it set, or None."""
    env = os.environ if environ is None else environ
    if env.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None or tpu_attached():
        return None
    nvidia = any(os.path.exists(d) for d in ("/dev/nvidiactl", "/dev/nvidia0"))
    platforms = "cuda,cpu" if nvidia and gpu_expected(env) else "cpu"
    env["JAX_PLATFORMS"] = platforms
    return platforms
