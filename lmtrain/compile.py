"""`lmtrain compile`: the run's exact steps compiled for a TPU topology, with no TPU at hand.

libtpu (the `tpu` extra) describes a topology's chips (`jax.experimental.topologies`); the run's
own mesh, shardings and step functions (lmtrain.run) are then lowered and compiled for them, as
MaxText's train_compile.py does. Per step and per chip this reports what XLA itself measured:

- memory (`compiled.memory_analysis()`): arguments (train state or parameters, plus the batch),
  temporaries (activations and everything else), outputs not aliased to donated inputs; their
  sum is the peak, judged against the chip's HBM (flops.CHIPS; XLA keeps a little for itself, so a
  plan within ~1 GiB of the limit is close);
- FLOPs and bytes accessed (`compiled.cost_analysis()`, per chip), the FLOPs set against
  lmtrain's model FLOPs (flops.train_flops_per_token; XLA counts rematerialisation and the
  elementwise work too, so a ratio a little above 1 is expected, and about 4/3 under full remat).
  Two gaps in XLA's count: a loop body counts once whatever its trip count, so with scanned
  layers the costs are extrapolated from unscanned compiles of one and two periods of layers
  (_loop_costs); and work inside a Pallas kernel (splash attention) is not counted at all;
- the bytes each chip moves through collectives per step, by kind (all-gather, reduce-scatter,
  all-reduce, all-to-all, collective-permute), read from the compiled HLO (lmtrain.hlo: ring
  algorithm costs, loop bodies times their trip counts);
- an ESTIMATED step time and MFU: a roofline, max(FLOPs / peak FLOP/s, bytes / HBM bandwidth),
  plus the collective bytes at the chip's published interconnect bandwidth (flops.CHIPS: one
  direction, all links; v5p 600 GB/s). Adding the communication assumes none of it overlaps
  compute, while the roofline assumes perfect use of both units: read it as a rough estimate
  that shows what a mesh's communication costs, not as a bound. XLA's own `optimal_seconds` is
  shown only when it is positive; it came back negative for real steps on this libtpu.

A step that does not fit in HBM makes XLA refuse to compile it (CompileTimeHbmOom); that is
reported as `fits: false` with the size XLA asked for, not raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax

from lmtrain import data, flops, hlo, sharding
from lmtrain import run as run_lib
from lmtrain.config import Config, ConfigError

log = logging.getLogger("lmtrain")

GIB = 2**30

# Names checked to resolve with libtpu 0.0.52 (the suffix is the chip grid; any grid the
# generation supports works, e.g. v5e:4x8).
KNOWN_TOPOLOGIES = (
    "v4:2x2x1",
    "v4:4x4x4",
    "v5e:2x2",
    "v5e:4x4",
    "v5e:8x8",
    "v5e:16x16",
    "v5p:2x2x1",
    "v5p:4x4x4",
    "v5p:8x8x8",
    "v6e:2x2",
    "v6e:8x8",
    "v6e:16x16",
)


def chip_specs(device_kind: str) -> tuple[float, float, float]:
    """(peak bf16 FLOP/s, HBM GiB, HBM bytes/s) of one chip of `device_kind` (flops.CHIPS)."""
    chip = flops.lookup_chip(device_kind)
    if chip is None:
        raise ConfigError(f"no published figures for {device_kind!r}; known: {sorted(flops.CHIPS)}")
    return chip.bf16_flops, chip.hbm_gib, chip.hbm_bytes_s


def topology_devices(name: str, slices: int = 1) -> list:
    """The device descriptions of TPU topology `name` (x `slices`), via libtpu."""
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(
            "compiling for a TPU topology needs libtpu: pip install 'lmtrain[tpu]' "
            "(the dev extra includes it)"
        )
    if slices < 1:
        raise ConfigError(f"--slices must be >= 1, got {slices}")
    # libtpu holds a lockfile while loaded; a description needs no chip, so several
    # processes (tests, a sweep of compiles) may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        # libtpu writes its start-up complaints about the missing TPU (accelerator type,
        # worker hostnames: irrelevant to a description) straight to file descriptor 2.
        with _stderr_held() as held:
            topo = topologies.get_topology_desc(
                platform="tpu", topology_name=name, num_slices=slices
            )
    except Exception as e:  # libtpu raises JaxRuntimeError(INVALID_ARGUMENT) on a bad name
        log.debug("libtpu said: %s", held.text)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"unknown TPU topology {name!r} ({reason}); known: {', '.join(KNOWN_TOPOLOGIES)}"
        ) from None
    return list(topo.devices)


class _Held:
    text = ""


@contextlib.contextmanager
def _stderr_held():
    """Sends what C libraries write to file descriptor 2 to a temporary file for the block
    (its text is the yielded object's `.text` afterwards)."""
    held = _Held()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield held
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            held.text = f.read().decode(errors="replace")


@dataclasses.dataclass
class StepPlan:
    """What XLA made of one compiled step, per chip."""

    name: str  # "train 64x4096", "eval 32x256"
    compile_s: float
    model_flops: float  # lmtrain's count for this step, per chip
    optimizer_flops: float = 0.0  # the optimizer's matmuls (Muon), counted once, per chip
    fits: bool = True
    state_gib: float = 0.0  # train state (or parameters) held between steps
    args_gib: float = 0.0  # all inputs: the state plus the batch
    temp_gib: float = 0.0  # activations and other temporaries
    peak_gib: float = 0.0
    xla_flops: float = 0.0
    bytes_accessed: float = 0.0
    xla_optimal_s: float | None = None
    collectives: dict = dataclasses.field(default_factory=dict)  # {kind: bytes}, per chip
    comm_s: float | None = None  # collectives at the interconnect bandwidth
    est_step_s: float | None = None
    est_mfu: float | None = None
    error: str = ""

    def estimate(
        self, peak: float, bandwidth: float, recompute: float = 1.0, interconnect: float = 0.0
    ) -> None:
        """Fills the roofline step time and MFU from XLA's FLOPs and bytes, plus the collective
        bytes at `interconnect` bytes/s (none when 0: the chip's figure is unknown). The work is at
        least the model's FLOPs times `recompute` (4/3 under full remat: the forward pass runs
        twice), because XLA's count misses work: a Pallas kernel's (splash attention) and all
        but one trip of any loop left inside a layer (the chunked loss, chunked scans)."""
        if not self.xla_flops:
            return
        work = max(self.xla_flops, self.model_flops * recompute)
        self.est_step_s = max(work / peak, self.bytes_accessed / bandwidth)
        if interconnect and self.collectives:
            self.comm_s = self.collectives["total"] / interconnect
            self.est_step_s += self.comm_s
        self.est_mfu = self.model_flops / (self.est_step_s * peak)


def _state_bytes(abstract: Any) -> int:
    """Bytes per chip of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for a in jax.tree.leaves(abstract):
        shard = a.sharding.shard_shape(a.shape) if a.sharding is not None else a.shape
        total += math.prod(shard) * a.dtype.itemsize
    return total


# XLA's CompileTimeHbmOom says either "... HLO temporaries (32.03G) exceeds available HBM
# (31.24G)" (temporaries only: the arguments come on top) or "Used 198.55G of 95.73G hbm".
_OOM = re.compile(r"(Used|HLO temporaries)[^0-9]*([0-9.]+)([GM])", re.I)


@contextlib.contextmanager
def _hlo_dumped():
    """Steps compiled in the block write their optimised HLO under the yielded directory."""
    from lmtrain import step

    with tempfile.TemporaryDirectory(prefix="lmtrain-hlo-") as d:
        step.COMPILER_OPTIONS.update(xla_dump_to=d, xla_dump_hlo_as_text=True)
        try:
            yield d
        finally:
            step.COMPILER_OPTIONS.clear()


def _optimised_hlo(dump_dir: str, compiled) -> str:
    """The compiled step's optimised HLO text: the dump's largest module, else as_text()."""
    dumps = [os.path.join(dump_dir, f) for f in os.listdir(dump_dir)]
    dumps = [f for f in dumps if f.endswith(".after_optimizations.txt")]
    if dumps:
        with open(max(dumps, key=os.path.getsize)) as f:
            return f.read()
    with _stderr_held():  # libtpu prints a stack trace where it cannot (async collectives)
        return compiled.as_text()


def _compile(name: str, thunk, model_flops: float, state_bytes: int) -> StepPlan:
    t0 = time.perf_counter()
    try:
        with _hlo_dumped() as dump_dir:
            compiled = thunk()
            text = _optimised_hlo(dump_dir, compiled)
    except Exception as e:  # XLA's CompileTimeHbmOom is a JaxRuntimeError(RESOURCE_EXHAUSTED)
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text and "HbmOom" not in text:
            raise
        plan = StepPlan(name, time.perf_counter() - t0, model_flops, fits=False)
        plan.state_gib = state_bytes / GIB
        m = _OOM.search(text)
        if m:
            size = float(m.group(2)) / (1024 if m.group(3).upper() == "M" else 1)
            temporaries = m.group(1).lower() != "used"
            plan.temp_gib = size if temporaries else 0.0
            plan.peak_gib = size + plan.state_gib if temporaries else size
        line = next((ln for ln in text.splitlines() if "exceed" in ln.lower()), text[:300])
        plan.error = line.strip()
        return plan
    plan = StepPlan(name, time.perf_counter() - t0, model_flops)
    mem = compiled.memory_analysis()
    plan.state_gib = state_bytes / GIB
    plan.args_gib = mem.argument_size_in_bytes / GIB
    plan.temp_gib = mem.temp_size_in_bytes / GIB
    unaliased = mem.output_size_in_bytes - mem.alias_size_in_bytes
    plan.peak_gib = (
        mem.argument_size_in_bytes
        + mem.temp_size_in_bytes
        + max(unaliased, 0)
        + mem.generated_code_size_in_bytes
    ) / GIB
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    plan.xla_flops = float(cost.get("flops", 0.0))
    plan.bytes_accessed = float(cost.get("bytes accessed", 0.0))
    plan.collectives = hlo.collective_bytes(text)
    optimal = float(cost.get("optimal_seconds", -1.0))
    plan.xla_optimal_s = optimal if optimal > 0 else None
    return plan


def _period(model) -> int:
    """The shortest run of layers that the stack repeats (1 unless a pattern mixes kinds)."""
    kinds, n = list(model.layer_kinds()), model.n_layers
    if len(kinds) != n:
        return 1
    return next(p for p in range(1, n + 1) if n % p == 0 and kinds == kinds[:p] * (n // p))


def _with_depth(cfg: Config, n_layers: int) -> Config:
    """cfg unscanned at depth n_layers (a whole number of periods)."""
    model = dataclasses.replace(cfg.model.at_depth(n_layers), scan_layers=False)
    return dataclasses.replace(cfg, model=model)


def _loop_costs(cfg: Config, devices: list, compile_one) -> tuple[float, float] | None:
    """(FLOPs, bytes) per chip of the step as XLA would count it unrolled, or None when the
    step has no layer loop. XLA's cost analysis counts a loop body once, whatever its trip
    count, so for scanned layers it is extrapolated from unscanned compiles of one and two
    periods of layers: cost(n) = cost(p) + (cost(2p) - cost(p)) * (n / p - 1)."""
    m = cfg.model
    p = _period(m)
    if not m.scan_layers or m.n_layers < 2 * p:
        return None
    costs = []
    for k in (1, 2):
        run = run_lib.setup(_with_depth(cfg, k * p), optimizer=True, devices=devices)
        cost = compile_one(run).cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        costs.append((float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))))
    (f1, b1), (f2, b2) = costs
    reps = m.n_layers / p - 1
    return f1 + (f2 - f1) * reps, b1 + (b2 - b1) * reps


def compile_for(cfg: Config, topology: str, slices: int = 1, evals: bool = True) -> dict:
    """Compiles every train-step shape (and, with `evals`, the eval steps) of `cfg` for the
    topology; returns the report (see `summary`)."""
    devices = topology_devices(topology, slices)
    peak, hbm, bandwidth = chip_specs(devices[0].device_kind)
    interconnect = flops.lookup_chip(devices[0].device_kind).ici_bytes_s
    sharding.mesh_shape(tuple(cfg.mesh.shape), len(devices))  # the mesh must use every chip
    run = run_lib.setup(cfg, devices=devices)
    cfg, chips = run.cfg, len(devices)
    scored = data.targets_per_row(cfg.data)
    plans = []
    state_bytes = _state_bytes(run.abstract_state)
    for batch, seq_len in cfg.train_shapes():
        tokens = batch * seq_len
        model = flops.train_flops_per_token(cfg.model, seq_len, scored) * tokens / chips

        def train_step(r, batch=batch, seq_len=seq_len):
            return run_lib.compile_train_steps(r, [(batch, seq_len)], scored)[0][seq_len]

        plan = _compile(f"train {batch}x{seq_len}", lambda: train_step(run), model, state_bytes)
        plan.optimizer_flops = run.optimizer_flops / chips
        plans.append(_unrolled(plan, cfg, devices, train_step))
    if evals:
        param_bytes = _state_bytes(run.abstract_params)
        for seq_len, batch in eval_shapes(run).items():
            # forward only: a third of the training FLOPs
            model = flops.train_flops_per_token(cfg.model, seq_len, scored) / 3
            model *= batch * seq_len / chips

            def eval_step(r, batch=batch, seq_len=seq_len):
                return run_lib.compile_eval_steps(r, {seq_len: batch}, scored)[seq_len]

            plan = _compile(f"eval {batch}x{seq_len}", lambda: eval_step(run), model, param_bytes)
            plans.append(_unrolled(plan, cfg, devices, eval_step))
    for p in plans:
        p.fits = p.fits and p.peak_gib <= hbm
        recompute = 4 / 3 if p.name.startswith("train") and cfg.model.remat == "full" else 1.0
        p.estimate(peak, bandwidth, recompute, interconnect)
    chip = (peak, hbm, bandwidth, interconnect)
    return summary(cfg, run, topology, slices, devices, plans, chip)


def _unrolled(plan: StepPlan, cfg: Config, devices: list, compile_one) -> StepPlan:
    """`plan` with FLOPs and bytes as if the scanned layers were unrolled (_loop_costs)."""
    if plan.fits and plan.xla_flops:
        costs = _loop_costs(cfg, devices, compile_one)
        if costs is not None:
            plan.xla_flops, plan.bytes_accessed = costs
            plan.xla_optimal_s = None  # also per loop iteration
    return plan


def eval_shapes(run: run_lib.Run) -> dict[int, int]:
    """{seq_len: global batch} of the evaluation (the Evaluator's shapes)."""
    from lmtrain.evaluate import eval_shapes as shapes

    return shapes(run)


def summary(cfg, run, topology, slices, devices, plans, chip) -> dict:
    peak, hbm, bandwidth, interconnect = chip
    train = [p for p in plans if p.name.startswith("train")]
    main = max(train, key=lambda p: p.model_flops)  # the costliest train shape
    return {
        "topology": topology,
        "slices": slices,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(run.mesh.shape),
        "n_params": run.n_params,
        "train_shape": main.name.split()[-1],
        "hbm_peak_gib": round(max(p.peak_gib for p in plans), 3),
        "hbm_chip_gib": hbm,
        "fits": all(p.fits for p in plans),
        "state_gib": round(main.state_gib, 3),
        "xla_flops": main.xla_flops,
        "model_flops": main.model_flops,
        "flops_ratio": round(main.xla_flops / main.model_flops, 4) if main.xla_flops else None,
        "optimizer_flops": main.optimizer_flops,
        "flops_ratio_with_optimizer": (
            round(main.xla_flops / (main.model_flops + main.optimizer_flops), 4)
            if main.xla_flops
            else None
        ),
        "collective_bytes": main.collectives,
        "comm_s": main.comm_s,
        "est_step_s": main.est_step_s,
        "est_mfu": round(main.est_mfu, 4) if main.est_mfu is not None else None,
        "compile_s": round(sum(p.compile_s for p in plans), 1),
        "peak_tflops": peak / 1e12,
        "hbm_gbps": bandwidth / 1e9,
        "interconnect_gbps": interconnect / 1e9,
        "steps": [dataclasses.asdict(p) for p in plans],
    }


def format_table(report: dict) -> str:
    """The human-readable part of `lmtrain compile`'s output."""
    r = report
    lines = [
        f"{r['topology']} x{r['slices']}: {r['chips']} x {r['device_kind']} "
        f"({r['hbm_chip_gib']:g} GiB HBM, {r['peak_tflops']:g} TFLOP/s bf16, "
        f"{r['hbm_gbps']:g} GB/s) | mesh {r['mesh']} | {r['n_params'] / 1e6:,.1f}M params",
        f"{'step':<18}{'state':>8}{'temp':>9}{'peak':>9}  {'fits':<5}{'XLA/model FLOPs':>16}"
        f"{'compile':>9}{'est. step':>11}{'est. MFU':>10}",
    ]
    for p in r["steps"]:
        ratio = f"{p['xla_flops'] / p['model_flops']:.3f}" if p["xla_flops"] else "-"
        est = f"{p['est_step_s'] * 1e3:.1f}ms" if p["est_step_s"] else "-"
        mfu = f"{p['est_mfu']:.1%}" if p["est_mfu"] is not None else "-"
        lines.append(
            f"{p['name']:<18}{p['state_gib']:>7.2f}G{p['temp_gib']:>8.2f}G{p['peak_gib']:>8.2f}G"
            f"  {'yes' if p['fits'] else 'NO':<5}{ratio:>16}{p['compile_s']:>8.1f}s{est:>11}"
            f"{mfu:>10}"
        )
        if p["optimizer_flops"]:
            total = p["model_flops"] + p["optimizer_flops"]
            ratio = f"{p['xla_flops'] / total:.3f}" if p["xla_flops"] else "-"
            lines.append(
                f"{'':<18}with the optimizer's orthogonalisation (+"
                f"{p['optimizer_flops'] / p['model_flops']:.1%} of the model's FLOPs, counted "
                f"once): XLA/(model+optimizer) FLOPs {ratio}"
            )
        if p["collectives"].get("total"):
            comm = f" = {p['comm_s'] * 1e3:.1f}ms" if p["comm_s"] else ""
            lines.append(
                f"{'':<18}collectives {hlo.summary_line(p['collectives'])}{comm}"
                + (" (some loops counted once)" if p["collectives"]["unknown_trips"] else "")
            )
        if p["xla_optimal_s"]:
            lines.append(f"{'':<18}XLA's own estimate: {p['xla_optimal_s'] * 1e3:.1f}ms")
        if p["error"]:
            lines.append(f"{'':<18}{p['error']}")
    lines.append(
        "per chip; est. = roofline from XLA's FLOPs and bytes against the chip's published "
        f"peaks, plus collectives at {r['interconnect_gbps']:g} GB/s (no overlap): an estimate, "
        "not a measurement"
    )
    return "\n".join(lines)
