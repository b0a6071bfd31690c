"""MFU of the 1B config (experiments/scale.py:1b) on whatever accelerator this runs on.

    python benchmarks/accelerator_mfu.py                      # GPU/TPU: the 1B shape
    python benchmarks/accelerator_mfu.py --size small         # any platform: a 4-layer d512
    python benchmarks/accelerator_mfu.py --set model.remat=\\"minimal\\" --batch 8

Runs the real compiled train step (lmtrain.run) on synthetic batches, with the 1B config's
choices (bf16 compute, f32 master weights, full remat, scanned layers, chunked loss) except the
attention implementation, which follows the platform: splash on TPU, cuDNN on GPU, XLA on CPU.
On CPU it runs `--size small` by default (the 1B step would take minutes). The batch defaults
to 2 sequences per device. Prints one JSON line: device, sizes, tokens/s, MFU (model FLOPs
against the chip table's bf16 peak, or the measured CPU peak), step time and memory in use.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from step_throughput import synthetic_batch, time_steps  # noqa: E402

SMALL = {"model.d_model": 512, "model.n_layers": 4, "model.n_heads": 8, "model.n_kv_heads": 2}


def load_scale():
    spec = importlib.util.spec_from_file_location("scale", ROOT / "experiments" / "scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=("1b", "small"), default=None)
    p.add_argument("--seq-len", type=int, default=None, help="default: 4096 (small: 512)")
    p.add_argument("--batch", type=int, default=None, help="global batch (2 per device)")
    p.add_argument("--steps", type=int, default=10, help="timed steps after 2 warm-up steps")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)

    import jax

    from lmtrain import config as config_lib
    from lmtrain import flops, sharding
    from lmtrain import run as run_lib

    devices = jax.devices()
    platform_name = devices[0].platform
    size = args.size or ("small" if platform_name == "cpu" else "1b")
    seq_len = args.seq_len or (512 if size == "small" else 4096)
    batch = args.batch or 2 * len(devices)
    impl = {"tpu": "splash", "gpu": "cudnn"}.get(platform_name, "xla")
    sets = {
        "data.seq_len": seq_len,
        "train.batch_size": batch,
        "eval.batch_size": batch,
        "mesh.shape": (1, -1, 1),
        "model.attention_impl": impl,
        **(SMALL if size == "small" else {}),
        **config_lib.parse_sets(args.sets),
    }
    cfg = config_lib.override(load_scale().get_config("1b"), sets).validate()
    run = run_lib.setup(cfg)
    state = run.init_state()
    compiled, compile_s = run_lib.compile_train_steps(run, [(batch, seq_len)], stop_flag=False)
    step = compiled[seq_len]
    local = synthetic_batch(batch, seq_len, run.cfg.model.vocab_size)
    dt, state, m = time_steps(step, state, sharding.global_batch(local, run.mesh), args.steps)
    peak, peak_src = flops.peak_flops(devices, run.cfg.model.dtype)
    fpt = flops.train_flops_per_token(run.cfg.model, seq_len)
    tok_s = batch * seq_len / dt
    mem = devices[0].memory_stats() or {}
    row = {
        "date": datetime.date.today().isoformat(),
        "device": f"{len(devices)} x {devices[0].device_kind}",
        "host_cpu": platform.processor() or platform.machine(),
        "size": size,
        "params_m": round(run.n_params / 1e6, 1),
        "seq_len": seq_len,
        "batch": batch,
        "attention": run.cfg.model.attention_impl,
        "step_s": round(dt, 4),
        "tokens_per_s": round(tok_s, 1),
        "mfu": round(flops.mfu(tok_s, fpt, peak), 4),
        "peak_tflops": round(peak / 1e12, 3),
        "peak_source": peak_src,
        "compile_s": round(compile_s[seq_len], 1),
        "loss": float(m["loss"]),
        "peak_bytes_in_use_gib": round(mem.get("peak_bytes_in_use", 0) / 2**30, 2),
    }
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
