"""`lmtrain prepare` throughput with 1 and N workers on a generated corpus of real text.

    python benchmarks/prepare_speed.py [--mb 200] [--workers 1,2] [--tokenizer bpe:4096]

Writes ~MB megabytes of .jsonl shards (16 files of stdlib source text cut into 2-10 KB
records) into a temporary directory, trains the tokenizer once (not timed), then times
`lmtrain prepare` for each worker count in a fresh process: MB/s of input, tokens/s, peak
resident memory of the largest process, and whether the outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(d: Path, mb: int, files: int = 16) -> int:
    texts = [
        p.read_text(errors="replace")
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    ]
    blob = "\n".join(texts)
    rng = random.Random(0)
    target, written = mb << 20, 0
    shard = [open(d / f"part{i:02d}.jsonl", "w") for i in range(files)]
    i = 0
    while written < target:
        n = rng.randrange(2000, 10000)
        s = rng.randrange(len(blob) - n)
        line = json.dumps({"text": blob[s : s + n]}) + "\n"
        shard[i % files].write(line)
        written += len(line.encode())
        i += 1
    for f in shard:
        f.close()
    return written


PEAK = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
    "sys.exit(r.returncode)"
)


def run(cmd: list[str], env: dict) -> tuple[float, int]:
    """(seconds, peak RSS in KiB of the largest process of this run's process tree)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", PEAK, *cmd], env=env, capture_output=True, text=True)
    secs = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return secs, int(r.stderr.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--tokenizer", default="bpe:4096")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        nbytes = make_corpus(tmp / "src", args.mb)
        base = [sys.executable, "-m", "lmtrain", "prepare", str(tmp / "src"), "--no-progress"]
        base += ["--tokenizer", args.tokenizer, "--cache-dir", str(tmp / "cache")]
        t0 = time.perf_counter()  # trains and caches the tokenizer (a BPE sees the train split)
        subprocess.run(
            [*base, "--out", str(tmp / "warm"), "--workers", "2"],
            env=env,
            check=True,
            capture_output=True,
        )
        warm = time.perf_counter() - t0
        rows, digests = [], {}
        for w in [int(x) for x in args.workers.split(",")]:
            out = tmp / f"out{w}"
            secs, peak = run([*base, "--out", str(out), "--workers", str(w)], env)
            meta = json.loads((out / "meta.json").read_text())
            tokens = sum(s["tokens"] for s in meta["splits"].values())
            digests[w] = hashlib.sha256(
                b"".join(
                    (out / n).read_bytes() for n in ("train.bin", "train.idx", "val.bin", "val.idx")
                )
            ).hexdigest()
            rows.append(
                {
                    "workers": w,
                    "seconds": round(secs, 1),
                    "MB_per_s": round(nbytes / 1e6 / secs, 1),
                    "tokens_per_s": round(tokens / secs),
                    "peak_rss_MB": round(peak / 1024),
                }
            )
        print(
            json.dumps(
                {
                    "input_MB": round(nbytes / 1e6, 1),
                    "tokenizer": args.tokenizer,
                    "first_run_with_tokenizer_training_s": round(warm, 1),
                    "runs": rows,
                    "identical": len(set(digests.values())) == 1,
                    "cpus": os.cpu_count(),
                }
            )
        )


if __name__ == "__main__":
    main()
