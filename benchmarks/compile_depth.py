"""Compile time against depth, with and without scan over layers, for a TPU topology.

    python benchmarks/compile_depth.py                       # 8B width on v5p:4x4x4
    python benchmarks/compile_depth.py --topology v5p:2x2x1 --batch 4 --layers 2 32

The 8B shape of experiments/scale.py at sequence 1024, its train step compiled with libtpu (no
TPU needed) at each depth, scanned and (with --unrolled) not; one JSON line per compile and a
markdown table for BENCHMARKS.md. Run it on an otherwise idle machine: the figures are seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--topology", default="v5p:4x4x4")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 32])
    p.add_argument("--unrolled", type=int, nargs="*", default=[2, 8], help="depths without scan")
    a = p.parse_args()

    import jax

    jax.config.update("jax_platforms", "cpu")
    from lmtrain import compile as compile_lib
    from lmtrain import config as config_lib
    from lmtrain import run as run_lib

    spec = importlib.util.spec_from_file_location("scale", ROOT / "experiments" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)
    base = config_lib.override(
        scale.get_config("8b"), {"data.seq_len": a.seq, "train.batch_size": a.batch}
    )
    devices = compile_lib.topology_devices(a.topology)
    rows = []
    for scan, depths in ((True, a.layers), (False, a.unrolled)):
        for n in depths:
            model = dataclasses.replace(base.model, n_layers=n, scan_layers=scan)
            cfg = dataclasses.replace(base, model=model)
            t0 = time.perf_counter()
            run = run_lib.setup(cfg, devices=devices)
            _, secs = run_lib.compile_train_steps(run, cfg.train_shapes())
            row = {
                "topology": a.topology,
                "layers": n,
                "scan": scan,
                "batch": a.batch,
                "seq": a.seq,
                "compile_s": round(secs[a.seq], 1),
                "setup_and_compile_s": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(row), flush=True)
            rows.append(row)
    print("\n| layers | scan | compile |\n|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {'yes' if r['scan'] else 'no'} | {r['compile_s']:.1f} s |")


if __name__ == "__main__":
    main()
