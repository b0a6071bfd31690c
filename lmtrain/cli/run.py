"""`lmtrain train / eval / generate / prepare / compile`: a run's own commands."""

from __future__ import annotations

import json
import os
from pathlib import Path


def add_parsers(sub, sets: dict) -> None:
    """Adds this group's subcommands to the `lmtrain` parser's subparsers."""
    t = sub.add_parser(
        "train",
        help="train a model (resumes if the workdir has checkpoints)",
        description="Train the experiment's config; running again on the same "
        "workdir resumes from its newest checkpoint.",
    )
    t.add_argument(
        "experiment",
        nargs="?",
        help="experiment file, optionally with an argument: "
        "experiments/quickstart.py or experiments/quickstart.py:smoke",
    )
    t.add_argument(
        "--config",
        metavar="FILE",
        help="train a config file (.json, .yaml or .yml; whole or partial, the rest default) "
        "instead of an experiment file; default workdir: runs/<file stem>",
    )
    t.add_argument(
        "--config-json",
        metavar="PATH",
        help="train a run's own config (a workdir's config.json, or a sweep run's "
        "sweep_config.json); default workdir: its folder",
    )
    t.add_argument("--set", dest="sets", **sets)
    t.add_argument(
        "--workdir", default=None, help="output directory (default: runs/<experiment name>[-<arg>])"
    )
    t.add_argument(
        "--print-config", action="store_true", help="print the resolved config as JSON and exit"
    )

    dist = t.add_argument_group(
        "multi-process runs (jax.distributed); without these, SLURM, Open MPI and TPU-pod "
        "environments are detected automatically"
    )
    dist.add_argument(
        "--coordinator",
        default=os.environ.get("LMTRAIN_COORDINATOR"),
        metavar="HOST:PORT",
        help="address of process 0 (env LMTRAIN_COORDINATOR)",
    )
    dist.add_argument(
        "--num-processes",
        type=int,
        default=_env_int("LMTRAIN_NUM_PROCESSES"),
        help="number of processes in the run (env LMTRAIN_NUM_PROCESSES)",
    )
    dist.add_argument(
        "--process-id",
        type=int,
        default=_env_int("LMTRAIN_PROCESS_ID"),
        help="this process's index, 0..N-1 (env LMTRAIN_PROCESS_ID)",
    )

    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint of a workdir (default: the newest)",
        description="Print one JSON line: step, val_loss, val_bpb, val_tokens.",
    )
    e.add_argument("--workdir", required=True, help="a training run's output directory")
    e.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest)")
    e.add_argument("--set", dest="sets", **sets)

    g = sub.add_parser("generate", help="sample text from a checkpoint of a workdir")
    g.add_argument("--workdir", required=True, help="a training run's output directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (0.8)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    g.add_argument(
        "--top-p", type=float, default=1.0, help="sample from the smallest set of mass p (1: all)"
    )
    g.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    g.add_argument("--step", type=int, help="the checkpoint of this step (default: the newest)")
    g.add_argument("--set", dest="sets", **sets)
    _add_prepare_parser(sub)
    _add_compile_parser(sub, sets)


def _add_prepare_parser(sub) -> None:
    from lmtrain.config import DataConfig

    d = DataConfig()
    p = sub.add_parser(
        "prepare",
        help="tokenise a corpus once into a directory to train on",
        description="Tokenise SOURCE into DIR: train/val token files (.bin), document-end "
        "indexes (.idx), meta.json and the tokenizer. Re-running on unchanged input does "
        "nothing. Train on it with --set data.source=DIR (it brings its tokenizer).",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="'stdlib'; a .txt/.jsonl/.json/.parquet file (optionally .gz/.zst/.xz/.bz2), a "
        "directory or a glob; or hf:DIR / hf:BUILDER:FILES (an HF dataset)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="tokenising processes (0: one per core); the output is the same for any N",
    )
    p.add_argument(
        "--tokenizer",
        default=d.tokenizer,
        metavar="SPEC",
        help="'bytes', 'bpe:N' (trained on SOURCE), a tokenizer.json / .model file, a "
        "directory holding one, or an HF hub name in the local cache (default: bpe:4096)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=d.val_fraction,
        metavar="F",
        help=f"share of documents held out for validation ({d.val_fraction})",
    )
    p.add_argument(
        "--text-key", default=d.text_key, metavar="K", help=f"jsonl text field ({d.text_key})"
    )
    p.add_argument(
        "--cache-dir",
        default=d.cache_dir,
        metavar="D",
        help="where a trained BPE is cached (default: $LMTRAIN_CACHE or ~/.cache/lmtrain)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _add_compile_parser(sub, sets: dict) -> None:
    c = sub.add_parser(
        "compile",
        help="compile the run's steps for a TPU topology (no TPU needed) and report memory",
        description="Compile every train-step shape and the eval steps of an experiment for a "
        "TPU topology with libtpu, no devices needed, and print per chip: train state, "
        "temporaries, peak HBM against the chip's (fits or not), XLA's FLOPs against lmtrain's, "
        "compile time, and a roofline estimate of step time and MFU. The last line is JSON. "
        "A run that does not fit exits 0 with fits: false.",
    )
    c.add_argument("experiment", help="experiment file[:arg], e.g. experiments/scale.py:8b")
    c.add_argument("--topology", required=True, metavar="NAME", help="e.g. v5e:2x2, v5p:4x4x4")
    c.add_argument("--slices", type=int, default=1, metavar="K", help="TPU slices (1)")
    c.add_argument("--no-eval", action="store_true", help="compile the train steps only")
    c.add_argument("--set", dest="sets", **sets)


def _default_workdir(spec: str) -> Path:
    path, _, arg = spec.partition(":")
    return Path("runs") / (Path(path).stem + (f"-{arg}" if arg else ""))


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def _in_cluster() -> bool:
    """True where jax.distributed can find its peers by itself (SLURM, Open MPI, TPU pods).

    Set LMTRAIN_DISTRIBUTED=auto to call jax.distributed.initialize() with no arguments
    where this guess misses (launch/tpu_vm.sh does).
    """
    env = os.environ
    return (
        int(env.get("SLURM_NTASKS", "1") or 1) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1
        or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    )


def _init_distributed(args, heartbeat_s: int) -> None:
    """Joins a multi-process run before any JAX computation, if this is one."""
    from lmtrain.config import ConfigError

    given = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together")
    if args.num_processes == 1:
        return
    import jax

    timeout = {"heartbeat_timeout_seconds": heartbeat_s} if heartbeat_s > 0 else {}
    if args.coordinator is not None:
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id, **timeout)
    elif os.environ.get("LMTRAIN_DISTRIBUTED") == "auto" or _in_cluster():
        jax.distributed.initialize(**timeout)


def train_workdir(args) -> Path:
    """--workdir, else runs/<experiment>[-ARG], runs/<--config file stem>, or the folder of
    --config-json (a run's own config)."""
    if args.workdir:
        return Path(args.workdir)
    if args.config_json:
        return Path(args.config_json).parent
    if args.config:
        return Path("runs") / Path(args.config).stem
    return _default_workdir(args.experiment)


def cmd_train(args) -> int:
    from lmtrain import config as config_lib
    from lmtrain import train

    given = [x for x in (args.experiment, args.config, args.config_json) if x is not None]
    if len(given) != 1:
        raise config_lib.ConfigError(
            "train needs an experiment file, --config or --config-json (one)"
        )
    if args.config_json:
        cfg = config_lib.load_json(Path(args.config_json))
    elif args.config:
        cfg = config_lib.load_file(Path(args.config))
    else:
        cfg = config_lib.load_experiment(args.experiment)
    cfg = config_lib.override(cfg, config_lib.parse_sets(args.sets)).validate()
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    _init_distributed(args, cfg.train.hang_timeout_s)
    workdir = train_workdir(args)
    summary = train.train(cfg, workdir)
    print(json.dumps({"workdir": str(workdir), **summary}))
    return 0


def cmd_eval(args) -> int:
    from lmtrain import config as config_lib
    from lmtrain import data
    from lmtrain import run as run_lib
    from lmtrain.evaluate import Evaluator

    sets = config_lib.parse_sets(args.sets)
    run, params, step = run_lib.restore_params(Path(args.workdir), sets, args.step)
    corpus = data.load_corpus(run.cfg.data, run.tokenizer)
    result = Evaluator(run, corpus.val)(params, run.cfg.eval.max_batches)
    print(json.dumps({"step": step, **result}))
    return 0


def cmd_generate(args) -> int:
    from lmtrain import config as config_lib
    from lmtrain import run as run_lib
    from lmtrain.generate import sample_tokens

    sets = config_lib.parse_sets(args.sets)
    run, params, _ = run_lib.restore_params(Path(args.workdir), sets, args.step)
    ids = run.tokenizer.encode(args.prompt)
    out = sample_tokens(
        run, params, ids, args.max_new_tokens, args.temperature, args.seed, args.top_k, args.top_p
    )
    print(args.prompt + run.tokenizer.decode(out))
    return 0


def cmd_prepare(args) -> int:
    from lmtrain.config import ConfigError, DataConfig
    from lmtrain.data import prepare

    fields = ("source", "tokenizer", "val_fraction", "text_key", "cache_dir")
    cfg = DataConfig(**{k: getattr(args, k) for k in fields})
    if args.workers < 0:
        raise ConfigError("--workers must be >= 0 (0: one per core)")
    out = prepare.prepare(cfg, Path(args.out), progress=not args.no_progress, workers=args.workers)
    print(out)
    return 0


def cmd_compile(args) -> int:
    import jax

    from lmtrain import compile as compile_lib
    from lmtrain import config as config_lib

    # Nothing runs here: keep JAX off local accelerators (libtpu would look for a TPU).
    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")
    cfg = config_lib.load_experiment(args.experiment)
    cfg = config_lib.override(cfg, config_lib.parse_sets(args.sets)).validate()
    report = compile_lib.compile_for(cfg, args.topology, args.slices, evals=not args.no_eval)
    print(compile_lib.format_table(report))
    print(json.dumps(report))
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "prepare": cmd_prepare,
    "compile": cmd_compile,
}
