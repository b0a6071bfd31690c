"""Seconds per 1,000 loglikelihood requests: `lmtrain lm-eval`'s JAX adapter vs lm-eval's own
`hf` backend on the exported model, on a generated 4-way multiple-choice task (250 documents
of 40-word contexts from lmtrain's source), same batch size, one process.

    python benchmarks/lm_eval_speed.py --workdir runs/quickstart [--batch-size 16]

Prints one JSON line: requests, adapter seconds (first pass with compiles, second pass warm),
hf seconds, and both backends' acc / acc_norm (which must agree).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK = """task: speed_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
metadata:
  version: 1.0
"""


def make_task(d: Path, docs: int) -> None:
    words = (Path(__file__).resolve().parents[1] / "lmtrain" / "config.py").read_text().split()
    rng = random.Random(1)
    with open(d / "mc.jsonl", "w") as f:
        for _ in range(docs):
            s = rng.randrange(len(words) - 60)
            gold = words[s + 40]
            choices = [gold, *rng.sample(words, 3)]
            rng.shuffle(choices)
            row = {"query": " ".join(words[s : s + 40]), "choices": choices}
            f.write(json.dumps({**row, "gold": choices.index(gold)}) + "\n")
    (d / "speed_mc.yaml").write_text(TASK.format(data=d / "mc.jsonl"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--docs", type=int, default=250, help="4 requests each")
    args = ap.parse_args()

    import lm_eval
    from lm_eval.tasks import TaskManager

    from lmtrain import run as run_lib
    from lmtrain.interop.export import export
    from lmtrain.interop.lm_eval_adapter import make_adapter

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_task(tmp, args.docs)
        export(Path(args.workdir), tmp / "hf")
        tm = TaskManager(include_path=str(tmp))
        run, params, _ = run_lib.restore_params(Path(args.workdir))
        adapter = make_adapter(run, params, batch_size=args.batch_size)
        timings, results = [], {}
        for name in ("adapter", "adapter_warm", "hf"):
            model = adapter if name != "hf" else "hf"
            extra = (
                {}
                if name != "hf"
                else {
                    "model_args": {
                        "pretrained": str(tmp / "hf"),
                        "dtype": "float32",
                        "device": "cpu",
                    },
                    "batch_size": args.batch_size,
                }
            )
            t0 = time.perf_counter()
            r = lm_eval.simple_evaluate(
                model=model, tasks=["speed_mc"], task_manager=tm, log_samples=False, **extra
            )
            timings.append(time.perf_counter() - t0)
            results[name] = r["results"]["speed_mc"]
    n = 4 * args.docs
    print(
        json.dumps(
            {
                "requests": n,
                "adapter_s_per_1k": round(timings[0] * 1000 / n, 2),
                "adapter_warm_s_per_1k": round(timings[1] * 1000 / n, 2),
                "hf_s_per_1k": round(timings[2] * 1000 / n, 2),
                **{f"{k}_acc": v["acc,none"] for k, v in results.items()},
                **{f"{k}_acc_norm": v["acc_norm,none"] for k, v in results.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
