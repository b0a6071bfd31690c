"""`lmtrain launchers`: the launch scripts (local, SLURM, TPU VM) shipped in the package."""

from __future__ import annotations

from pathlib import Path


def add_parsers(sub, sets: dict) -> None:
    """Adds the launchers subcommand to the `lmtrain` parser's subparsers."""
    lp = sub.add_parser(
        "launchers",
        help="where the launch scripts are (local, SLURM, TPU VM), or copy them to --out",
        description="The launch scripts ship inside the lmtrain package. Without --out, prints "
        "their folder; with --out DIR, copies them there (existing files are left alone).",
    )
    lp.add_argument("--out", default=None, help="copy the scripts into this folder")


def cmd_launchers(args) -> int:
    """Prints the package's launch folder, or copies its scripts to --out."""
    import shutil

    from lmtrain.sweeps.workdirs import LAUNCH

    scripts = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
    if args.out is None:
        print(LAUNCH)
        for p in scripts:
            print(f"  {p.name}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in scripts:
        if (out / p.name).exists():
            print(f"kept {out / p.name} (exists)")
            continue
        shutil.copy2(p, out / p.name)
        print(f"wrote {out / p.name}")
    return 0


COMMANDS = {"launchers": cmd_launchers}
