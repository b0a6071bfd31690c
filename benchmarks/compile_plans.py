"""Memory plans at scale: `lmtrain compile` over a table of (shape, topology, settings).

    python benchmarks/compile_plans.py                 # every row, one subprocess each
    python benchmarks/compile_plans.py --only v6e      # rows whose "label topology" has "v6e"

Each row compiles the exact train step (and not the eval step) of experiments/scale.py's shape
for a TPU topology with libtpu, no TPU needed, and the script prints a markdown table for
BENCHMARKS.md: fits, peak HBM per chip, train state per chip, XLA/model FLOPs, estimated step
time and MFU (roofline: no communication), compile time. JSON rows go to
benchmarks/results/compile_plans.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "compile_plans.jsonl"

# (label, experiment, topology, --set overrides)
ROWS = [
    ("quickstart", "experiments/quickstart.py", "v5e:2x2", []),
    ("125m", "experiments/scale.py:125m", "v5e:4x4", ["train.batch_size=32"]),
    ("1b", "experiments/scale.py:1b", "v5e:4x4", ["train.batch_size=32"]),
    ("8b", "experiments/scale.py:8b", "v5p:4x4x4", []),
    ("8b", "experiments/scale.py:8b", "v5e:16x16", ["train.batch_size=256"]),
    # MaxText's Trillium recipe for Llama-3-8B: sequence 8192, 8 per chip, fsdp, full remat
    (
        "8b (MaxText v6e recipe)",
        "experiments/scale.py:8b",
        "v6e:16x16",
        ["data.seq_len=8192", "train.batch_size=2048"],
    ),
    ("70b", "experiments/scale.py:70b", "v5p:8x8x8", ["train.batch_size=512"]),
    # MaxText's Trillium recipe for Llama-2-70B: sequence 4096, 4 per chip, fsdp, full remat
    (
        "70b (MaxText v6e recipe)",
        "experiments/scale.py:70b",
        "v6e:16x16",
        ["train.batch_size=1024"],
    ),
    ("70b (2 per chip)", "experiments/scale.py:70b", "v6e:16x16", ["train.batch_size=512"]),
    ("mamba2-1.3b", "experiments/scale.py:mamba2-1.3b", "v5e:4x4", ["train.batch_size=32"]),
    ("mamba2-2.7b", "experiments/scale.py:mamba2-2.7b", "v5p:2x2x1", ["train.batch_size=8"]),
    ("hybrid-1.4b", "experiments/scale.py:hybrid-1.4b", "v5e:4x4", ["train.batch_size=32"]),
]
# Issue 13's probe: the 8B width at 2 layers, a 512-token vocabulary, XLA attention, no scan
# and no loss chunks, global batch 64 x 4096 on the 64 chips of v5p:4x4x4, over several meshes.
PROBE = [
    "model.n_layers=2",
    "model.vocab_size=512",
    "model.attention_impl=xla",
    "model.scan_layers=False",
    "train.loss_chunk=0",
]
MESHES = ["(64,1,1)", "(1,64,1)", "(4,16,1)", "(16,4,1)", "(4,1,16)", "(8,8,1)", "(8,1,8)"]
ROWS += [
    (
        f"d4096 x 2 layers, mesh {m}",
        "experiments/scale.py:8b",
        "v5p:4x4x4",
        [*PROBE, f"mesh.shape={m}"],
    )
    for m in MESHES
]


def run_row(label: str, experiment: str, topology: str, sets: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lmtrain", "compile", experiment, "--topology", topology]
    # the eval batch must also divide over the chips, even when only the train step compiles
    sets = sets + [s.replace("train.", "eval.") for s in sets if s.startswith("train.batch_size")]
    cmd += ["--no-eval"] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
        return {"label": label, "topology": topology, "error": " ".join(tail)}
    report = json.loads(out.stdout.strip().splitlines()[-1])
    return {"label": label, "sets": sets, **{k: v for k, v in report.items() if k != "steps"}}


def markdown(rows: list[dict]) -> str:
    lines = [
        "| shape | topology | mesh (d,f,t) | batch x seq | fits | peak HBM/chip | state/chip "
        "| XLA/model FLOPs | est. step | est. MFU | compile |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['label']} | {r['topology']} | error: {r['error'][:80]} |")
            continue
        mesh = r["mesh"]
        step = r.get("train_shape", "")
        t = r.get("est_step_s")
        est = "-" if not t else f"{t:.2f} s" if t >= 1 else f"{t * 1e3:.1f} ms"
        mfu = f"{r['est_mfu']:.0%}" if r.get("est_mfu") is not None else "-"
        ratio = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") else "-"
        lines.append(
            f"| {r['label']} | {r['topology']} ({r['chips']}) | "
            f"({mesh['data']},{mesh['fsdp']},{mesh['tensor']}) | {step} | "
            f"{'yes' if r['fits'] else '**no**'} | {r['hbm_peak_gib']:.1f} / "
            f"{r['hbm_chip_gib']:g} GiB | {r['state_gib']:.2f} GiB | {ratio} | {est} | {mfu} | "
            f"{r['compile_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="", help="run rows whose 'label topology' contains this")
    args = p.parse_args()
    rows = []
    OUT.parent.mkdir(parents=True, exist_ok=True)
    for label, experiment, topology, sets in ROWS:
        if args.only and args.only not in f"{label} {topology}":
            continue
        row = run_row(label, experiment, topology, sets)
        rows.append(row)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print(markdown(rows))


if __name__ == "__main__":
    main()
