"""The `lmtrain` command: train / eval / generate / sweep / fit."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

USAGE_ERROR, RUNTIME_ERROR = 2, 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtrain",
        description="Language-model pretraining research in JAX. Exit status: 0 success, "
        "2 usage or config error, 1 runtime failure.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sets = dict(
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set model.d_model=512 "
        "--set optim.name=lion (values are Python literals; repeatable)",
    )

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
        "--config-json",
        metavar="PATH",
        help="train the config in a JSON file (a workdir's config.json, or a sweep run's "
        "sweep_config.json) instead of an experiment file; default workdir: its folder",
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
        help="evaluate the newest checkpoint of a workdir",
        description="Print one JSON line: step, val_loss, val_bpb, val_tokens.",
    )
    e.add_argument("--workdir", required=True, help="a training run's output directory")
    e.add_argument("--set", dest="sets", **sets)

    g = sub.add_parser("generate", help="sample text from the newest checkpoint of a workdir")
    g.add_argument("--workdir", required=True, help="a training run's output directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (200)")
    g.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (0.8)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (0)")
    g.add_argument("--set", dest="sets", **sets)
    _add_sweep_parsers(sub)
    return p


def _add_sweep_parsers(sub) -> None:
    s = sub.add_parser(
        "sweep",
        help="run a scaling-law sweep (one workdir per run; skips finished runs)",
        description="Run the configs of the experiment file's get_sweep(ARG), each in its own "
        "workdir under --dir, K at a time. Finished runs are skipped and interrupted ones "
        "resume from their checkpoints; SWEEP_DIR/results.jsonl and results.csv collect them.",
    )
    s.add_argument(
        "experiment",
        help="experiment file with get_sweep(arg), e.g. "
        "experiments/scaling.py or experiments/scaling.py:smoke",
    )
    s.add_argument("--dir", required=True, help="sweep directory (one subdirectory per run)")
    s.add_argument("--parallel", type=int, default=1, metavar="K", help="runs at a time (1)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="list the runs with N, D, C and an estimated time; run nothing",
    )
    s.add_argument(
        "--flops-per-sec",
        type=float,
        default=None,
        help="achieved model FLOP/s per run for --dry-run estimates (default: the median "
        "of finished runs, else 20%% of the peak shared by K runs)",
    )
    s.add_argument(
        "--measure",
        action="store_true",
        help="with --dry-run: measure each model's tokens/s in a short run first (cached in "
        "SWEEP_DIR/throughput.json) instead of assuming 20%% MFU",
    )
    s.add_argument(
        "--index",
        type=int,
        default=None,
        help="run only the run with this index (as --dry-run lists; SLURM arrays)",
    )
    s.add_argument(
        "--collect",
        action="store_true",
        help="only rewrite results.jsonl/results.csv from the run directories",
    )
    s.add_argument(
        "--slurm",
        action="store_true",
        help="write SWEEP_DIR/sweep_array.sbatch, a SLURM job array (K = --parallel "
        "tasks at a time), and print the sbatch command; run nothing",
    )
    s.add_argument(
        "--slurm-template",
        default=None,
        help="job-array template (default: launch/sweep_array.sbatch of this lmtrain)",
    )
    s.add_argument(
        "--devices-per-run",
        type=int,
        default=None,
        help="CPU host devices per run (default: cores / K, a power of two)",
    )
    s.add_argument(
        "--gpus-per-run",
        type=int,
        default=0,
        help="give each concurrent run its own G GPUs via CUDA_VISIBLE_DEVICES",
    )
    s.add_argument(
        "--report-every",
        type=float,
        default=60.0,
        help="seconds between progress tables while runs are going (60)",
    )

    f = sub.add_parser(
        "fit",
        help="fit scaling laws to a sweep's results",
        description="Chinchilla fit L(N, D) = E + A/N^alpha + B/D^beta, IsoFLOP minima, "
        "compute-optimal N*(C), D*(C), bootstrap intervals, one fit per model family, "
        "Step Law lr/batch suggestions. Writes fit.json, fit.md and PNG plots.",
    )
    f.add_argument("sweep_dir", help="a sweep directory with results.jsonl")
    f.add_argument(
        "--metric",
        default="final_val_loss",
        help="the loss column to fit: final_val_loss (default), best_val_loss, "
        "final_val_bpb, best_val_bpb",
    )
    f.add_argument(
        "--params",
        choices=["nonembed", "total"],
        default="nonembed",
        help="N: non-embedding (default) or total parameters",
    )
    f.add_argument(
        "--predict",
        action="append",
        default=[],
        metavar="N=...,D=...",
        help="print the predicted loss with a 90%% interval, e.g. N=1.2M,D=50M "
        "(or C=... instead of D; repeatable)",
    )
    f.add_argument(
        "--target-flops",
        type=float,
        action="append",
        default=[],
        help="compute budgets to report N*, D*, loss and Step Law settings for "
        "(default: 10x and 100x the largest budget)",
    )
    f.add_argument(
        "--holdout",
        default=None,
        metavar="DIR",
        help="another sweep directory whose finished runs are predicted and compared",
    )
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (200)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    f.add_argument("--out", default=None, help="output directory (default: the sweep directory)")


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


def _cmd_train(args) -> int:
    from lmtrain import config as config_lib
    from lmtrain import train

    if (args.experiment is None) == (args.config_json is None):
        raise config_lib.ConfigError("train needs an experiment file or --config-json (one)")
    if args.config_json:
        cfg = config_lib.load_json(Path(args.config_json))
    else:
        cfg = config_lib.load_experiment(args.experiment)
    cfg = config_lib.override(cfg, config_lib.parse_sets(args.sets)).validate()
    if args.print_config:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
        return 0
    _init_distributed(args, cfg.train.hang_timeout_s)
    if args.workdir:
        workdir = Path(args.workdir)
    elif args.config_json:
        workdir = Path(args.config_json).parent
    else:
        workdir = _default_workdir(args.experiment)
    summary = train.train(cfg, workdir)
    print(json.dumps({"workdir": str(workdir), **summary}))
    return 0


def _cmd_eval(args) -> int:
    from lmtrain import config as config_lib
    from lmtrain import data, train
    from lmtrain.evaluate import Evaluator

    run, params, step = train.restore_params(Path(args.workdir), config_lib.parse_sets(args.sets))
    corpus = data.load_corpus(run.cfg.data, run.tokenizer)
    result = Evaluator(run, corpus.val)(params, run.cfg.eval.max_batches)
    print(json.dumps({"step": step, **result}))
    return 0


def _cmd_generate(args) -> int:
    from lmtrain import config as config_lib
    from lmtrain import train
    from lmtrain.generate import sample_tokens

    run, params, _ = train.restore_params(Path(args.workdir), config_lib.parse_sets(args.sets))
    ids = run.tokenizer.encode(args.prompt)
    out = sample_tokens(run, params, ids, args.max_new_tokens, args.temperature, args.seed)
    print(args.prompt + run.tokenizer.decode(out))
    return 0


def _cmd_sweep(args) -> int:
    from lmtrain import sweep, sweep_runner
    from lmtrain.config import ConfigError

    if args.parallel < 1:
        raise ConfigError("--parallel must be at least 1")
    sweep_dir = Path(args.dir)
    runs = sweep.load_sweep(args.experiment, sweep_dir)
    if args.dry_run:
        rates = dict(flops_per_sec=args.flops_per_sec, gpus_per_run=args.gpus_per_run)
        print(sweep.dry_run(runs, sweep_dir, args.parallel, measure=args.measure, **rates))
        return 0
    if args.collect:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        sweep_runner.write_results(sweep_dir, runs)
        print(f"wrote {sweep_dir / 'results.jsonl'} and results.csv ({len(runs)} runs)")
        return 0
    if args.slurm:
        template = Path(args.slurm_template) if args.slurm_template else None
        out = sweep_runner.write_slurm(runs, args.experiment, sweep_dir, args.parallel, template)
        print(f"wrote {out} ({len(runs)} array tasks); submit with: sbatch {out}")
        return 0
    return sweep_runner.run_sweep(
        runs,
        sweep_dir,
        parallel=args.parallel,
        only=args.index,
        devices_per_run=args.devices_per_run,
        gpus_per_run=args.gpus_per_run,
        report_every=args.report_every,
        echo=lambda text: print(text, flush=True),
    )


def _cmd_fit(args) -> int:
    from lmtrain import scaling_report

    return scaling_report.main(args)


def _quiet_libraries() -> None:
    from absl import flags
    from absl import logging as absl_logging

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    absl_logging.set_verbosity(absl_logging.WARNING)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    ours = logging.getLogger("lmtrain")  # only our messages at INFO; libraries stay quiet
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cpu_devices_default() -> None:
    """One XLA host device per core (a power of two, at most 8) unless the user chose.

    XLA:CPU runs one device's small ops with little intra-op parallelism; splitting the batch
    over one device per core was 1.37x faster for the quickstart model on 2 cores (see
    BENCHMARKS.md). The flag only affects the CPU platform, so GPU/TPU runs are unchanged.
    """
    flags_now = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags_now or "jax" in sys.modules:
        return
    n = 1
    while n * 2 <= min(os.cpu_count() or 1, 8):
        n *= 2
    os.environ["XLA_FLAGS"] = f"{flags_now} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `lmtrain` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    _cpu_devices_default()
    _quiet_libraries()
    from lmtrain.checkpoint import CheckpointError
    from lmtrain.config import ConfigError
    from lmtrain.train import NonFiniteLoss

    commands = {
        "train": _cmd_train,
        "eval": _cmd_eval,
        "generate": _cmd_generate,
        "sweep": _cmd_sweep,
        "fit": _cmd_fit,
    }
    try:
        return commands[args.command](args)
    except ConfigError as e:  # includes data.DataError: things the user can fix
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except (NonFiniteLoss, CheckpointError) as e:
        print(f"lmtrain: error: {e}", file=sys.stderr)
        return RUNTIME_ERROR


if __name__ == "__main__":
    sys.exit(main())
