"""Comparing groups of a sweep at equal compute (`lmtrain fit --by optimizer --best-lr
--reference adamw`): the best learning rate per cell, and a compute multiplier at equal loss.

- Cell: the runs of one group (an optimizer, or a model family) with the same non-embedding
  parameter count N and training tokens D. With --best-lr each cell keeps its lowest-loss run
  (a Step Law-style lr sweep: the best lr per size), and the report lists every lr tried next to
  Step Law's lr(N, D).
- Compute multiplier of group X over the reference R at equal loss: for each best-lr run of X,
  at (N, D) with loss L, the tokens D' that R's fitted law needs at the same N to reach L:

      E_R + A_R / N^alpha_R + B_R / D'^beta_R = L
      =>  D' = (B_R / (L - E_R - A_R / N^alpha_R))^(1 / beta_R)

  and m = D' / D, which is also the ratio of compute 6 N D' / 6 N D. m > 1: X needs less compute
  than R for that loss. Infinite when L is below what R reaches at that N with any D. The
  reported figure is the median of m over X's runs; its 90% interval comes from R's bootstrap
  fits (each resampled fit gives a median).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lmtrain.sweeps import fit as laws
from lmtrain.sweeps.planning import si


def group_rows(rows: Sequence[dict], by: str) -> list[dict]:
    """Copies of `rows` whose "family" (the key fits are made per) is their `by` column."""
    if by == "family":
        return list(rows)
    missing = [r.get("name", "?") for r in rows if by not in r]
    if missing:
        raise laws.FitError(
            f"--by {by}: {len(missing)} runs have no {by!r} column (e.g. {missing[0]}); "
            "their results.jsonl predates it: rerun `lmtrain sweep` on the directory to refresh"
        )
    return [{**r, "family": str(r[by])} for r in rows]


def best_lr(rows: Sequence[dict], metric: str, n_key: str) -> tuple[list[dict], list[dict]]:
    """(the lowest-`metric` run of every (family, N, D) cell, one summary row per cell)."""
    cells: dict[tuple, list[dict]] = {}
    for r in rows:
        cells.setdefault((r.get("family", ""), r[n_key], r["tokens"]), []).append(r)
    best, table = [], []
    for (fam, n, d), runs in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        runs = sorted(runs, key=lambda r: r["lr"])
        winner = min(runs, key=lambda r: r[metric])
        best.append(winner)
        table.append({
            "family": fam, "N": n, "D": d,
            "tried": [(r["lr"], r[metric]) for r in runs],
            "best_lr": winner["lr"], "loss": winner[metric],
            "edge": len(runs) > 1 and winner["lr"] in (runs[0]["lr"], runs[-1]["lr"]),
            "step_law_lr": laws.step_law(n, d)["lr"],
        })  # fmt: skip
    return best, table


def tokens_to_reach(p: dict, n: float, loss: float) -> float:
    """D with L_p(n, D) = loss under fitted law `p`; inf when no D reaches it at n."""
    gap = loss - p["E"] - p["A"] / n ** p["alpha"]
    return math.inf if gap <= 0 else (p["B"] / gap) ** (1.0 / p["beta"])


def multiplier(reference: dict, runs: Sequence[dict]) -> dict:
    """Compute multiplier at equal loss of `runs` ({"N", "D", "loss"}) over the `reference`
    family fit (fit.fit_family's output), with a 90% bootstrap interval."""

    def median_m(p: dict) -> float:
        return float(np.median([tokens_to_reach(p, r["N"], r["loss"]) / r["D"] for r in runs]))

    per_run = [
        {**r, "D_reference": tokens_to_reach(reference["chinchilla"], r["N"], r["loss"])}
        for r in runs
    ]
    samples = [
        median_m(dict(zip(laws.NAMES, s, strict=True))) for s in reference["bootstrap"]["samples"]
    ]
    finite = [s for s in samples if math.isfinite(s)]
    return {
        "median": median_m(reference["chinchilla"]),
        "interval": laws.interval(finite) if len(finite) >= 0.9 * len(samples) else None,
        "runs": [{**r, "m": r["D_reference"] / r["D"]} for r in per_run],
    }


def check_reference(groups: Sequence[str], reference: str) -> None:
    """FitError unless `reference` is one of the sweep's groups (checked before any fitting)."""
    if reference not in groups:
        names = ", ".join(sorted(set(groups)))
        raise laws.FitError(f"--reference {reference!r} is not a group of this sweep: {names}")


def compare(families: dict, best_rows: Sequence[dict], reference: str, metric: str, n_key: str):
    """{group: multiplier(...)} for every fitted group but the reference (fit_sweep has checked
    that the reference is one: check_reference)."""
    ref = families[reference]
    if "error" in ref:
        raise laws.FitError(f"--reference {reference!r} could not be fitted: {ref['error']}")
    out = {}
    for name in sorted(families):
        if name == reference:
            continue
        runs = [
            {"name": r.get("name", ""), "N": r[n_key], "D": r["tokens"], "loss": r[metric]}
            for r in best_rows
            if r.get("family", "") == name
        ]
        out[name] = multiplier(ref, runs)
    return out


def report_lines(fit: dict) -> list[str]:
    """fit.md's sections for --best-lr and --reference."""
    out: list[str] = []
    table = fit.get("best_lr")
    if table:
        out += [
            "## Best learning rate per cell",
            "",
            "Each (group, N, D) cell keeps its lowest-loss run for the fits. `*`: the best lr "
            "is at an end of the lrs tried (the optimum may lie outside).",
            "",
            "| group | N | D | lr: loss | best lr | Step Law lr |",
            "|---|---|---|---|---|---|",
        ]
        for c in table:
            tried = ", ".join(f"{lr:.3g}: {x:.4f}" for lr, x in c["tried"])
            out.append(
                f"| {c['family']} | {si(c['N'])} | {si(c['D'])} | {tried} | "
                f"{c['best_lr']:.3g}{'*' if c['edge'] else ''} | {c['step_law_lr']:.3g} |"
            )
        out.append("")
    comp = fit.get("compare")
    if comp:
        ref = fit["reference"]
        out += [
            f"## Compute multiplier over `{ref}` at equal loss",
            "",
            f"For each best-lr run: the tokens (so compute, at the same N) `{ref}`'s fitted law "
            "needs to reach that run's loss, over the run's own. Median over the group's runs; "
            f"90% interval from `{ref}`'s bootstrap fits.",
            "",
            "| group | multiplier | 90% interval | per run (N, D: m) |",
            "|---|---|---|---|",
        ]
        for name, c in comp.items():
            iv = "-" if not c["interval"] else f"[{c['interval'][0]:.3g}, {c['interval'][1]:.3g}]"
            runs = "; ".join(f"{si(r['N'])}, {si(r['D'])}: {r['m']:.3g}" for r in c["runs"])
            out.append(f"| {name} | {c['median']:.3g} | {iv} | {runs} |")
        out.append("")
    return out
