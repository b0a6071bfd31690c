"""`lmtrain export` and `lmtrain lm-eval`: models out to HF transformers, evaluations in
through lm-evaluation-harness (parsers and commands; the work is in lmtrain.interop)."""

from __future__ import annotations

import json
from pathlib import Path


def add_parsers(sub, sets: dict) -> None:
    """Adds the export and lm-eval subcommands to the `lmtrain` parser's subparsers."""
    x = sub.add_parser(
        "export",
        help="write a checkpoint as an HF transformers model directory (or lmtrain safetensors)",
        description="--format hf (default): config.json, model.safetensors, generation config "
        "and tokenizer files for transformers (transformer -> LlamaForCausalLM, mamba2 -> "
        "Mamba2ForCausalLM; other families exit 2). --format safetensors: lmtrain's own "
        "parameter names and config, for every family; model.init_from reads both.",
    )
    x.add_argument("--workdir", required=True, help="a training run's output directory")
    x.add_argument("--out", required=True, help="a new directory to write")
    x.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest)")
    x.add_argument("--format", choices=["hf", "safetensors"], default="hf")
    x.add_argument("--set", dest="sets", **sets)

    e = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness tasks on a checkpoint (any family, in JAX)",
        description="Runs lm_eval's tasks through an lm_eval.api.model.LM adapter over the "
        "JAX model (loglikelihood, loglikelihood_rolling, generate_until). Prints lm-eval's "
        "table; --output writes its results JSON. Needs the lm-eval extra.",
    )
    e.add_argument("--workdir", required=True, help="a training run's output directory")
    e.add_argument("--tasks", required=True, help="comma-separated task names")
    e.add_argument("--include-path", default=None, help="a folder of task YAML files")
    e.add_argument("--limit", type=float, default=None, help="examples per task (or fraction)")
    e.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (8)")
    e.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest)")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples")
    e.add_argument("--output", default=None, help="write lm-eval's results JSON here")
    e.add_argument("--seed", type=int, default=0, help="lm-eval's sampling seeds (0)")
    e.add_argument("--set", dest="sets", **sets)


def cmd_export(args) -> int:
    from lmtrain.config import parse_sets
    from lmtrain.interop.export import export

    summary = export(
        Path(args.workdir), Path(args.out), args.step, args.format, parse_sets(args.sets)
    )
    print(json.dumps(summary))
    return 0


def cmd_lm_eval(args) -> int:
    from lmtrain.config import parse_sets
    from lmtrain.interop.lm_eval_adapter import evaluate

    tasks = [t for t in args.tasks.split(",") if t]
    results, table = evaluate(
        Path(args.workdir),
        tasks,
        include_path=args.include_path,
        limit=args.limit,
        batch_size=args.batch_size,
        step=args.step,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
        overrides=parse_sets(args.sets),
    )
    print(table)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(results, indent=2, default=str))
        print(f"wrote {args.output}")
    return 0


COMMANDS = {"export": cmd_export, "lm-eval": cmd_lm_eval}
