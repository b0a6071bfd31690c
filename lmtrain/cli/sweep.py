"""`lmtrain sweep` and `lmtrain fit`: scaling-law sweeps and their fits."""

from __future__ import annotations

from pathlib import Path


def add_parsers(sub, sets: dict) -> None:
    """Adds the sweep and fit subcommands to the `lmtrain` parser's subparsers."""
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
        help="job-array template (default: lmtrain/launch/sweep_array.sbatch, inside the package)",
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
    f.add_argument(
        "--by",
        choices=["family", "optimizer"],
        default="family",
        help="fit each model family (default) or each optimizer separately",
    )
    f.add_argument(
        "--best-lr",
        action="store_true",
        help="of the runs that differ only in lr, fit the best one (an lr sweep per cell); "
        "fit.md lists every lr tried next to Step Law's",
    )
    f.add_argument(
        "--reference",
        default=None,
        metavar="GROUP",
        help="report each other group's compute multiplier at equal loss over this one "
        "(e.g. --by optimizer --reference adamw)",
    )
    f.add_argument(
        "--repeated",
        choices=["exclude", "include"],
        default="exclude",
        help="runs that saw a token more than once (epochs > 1 in results.jsonl): leave them "
        "out of the fit (default; the law assumes fresh tokens) or fit them as if fresh",
    )
    f.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples (200)")
    f.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    f.add_argument("--out", default=None, help="output directory (default: the sweep directory)")


def cmd_sweep(args) -> int:
    """Runs, lists, collects or writes a SLURM array for a sweep."""
    from lmtrain.config import ConfigError
    from lmtrain.sweeps import planning, runner, throughput

    if args.parallel < 1:
        raise ConfigError("--parallel must be at least 1")
    sweep_dir = Path(args.dir)
    runs = planning.load_sweep(args.experiment, sweep_dir)
    if args.dry_run:
        rates = dict(flops_per_sec=args.flops_per_sec, gpus_per_run=args.gpus_per_run)
        print(throughput.dry_run(runs, sweep_dir, args.parallel, measure=args.measure, **rates))
        return 0
    if args.collect:
        sweep_dir.mkdir(parents=True, exist_ok=True)
        runner.write_results(sweep_dir, runs)
        print(f"wrote {sweep_dir / 'results.jsonl'} and results.csv ({len(runs)} runs)")
        return 0
    if args.slurm:
        template = Path(args.slurm_template) if args.slurm_template else None
        out = runner.write_slurm(runs, args.experiment, sweep_dir, args.parallel, template)
        print(f"wrote {out} ({len(runs)} array tasks); submit with: sbatch {out}")
        return 0
    return runner.run_sweep(
        runs,
        sweep_dir,
        parallel=args.parallel,
        only=args.index,
        devices_per_run=args.devices_per_run,
        gpus_per_run=args.gpus_per_run,
        report_every=args.report_every,
        echo=lambda text: print(text, flush=True),
    )


def cmd_fit(args) -> int:
    """Fits scaling laws to a sweep's results."""
    from lmtrain.sweeps import report

    report.fit_sweep(
        Path(args.sweep_dir),
        metric=args.metric,
        params=args.params,
        predict=args.predict,
        target_flops=args.target_flops,
        holdout=Path(args.holdout) if args.holdout else None,
        bootstrap=args.bootstrap,
        seed=args.seed,
        out=Path(args.out) if args.out else None,
        by=args.by,
        best_lr=args.best_lr,
        reference=args.reference,
        repeated=args.repeated,
    )
    return 0


COMMANDS = {"sweep": cmd_sweep, "fit": cmd_fit}
