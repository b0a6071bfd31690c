"""`lmtrain fit`: a sweep's results -> fit.json, fit.md (markdown report) and PNG plots."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from lmtrain.config import ConfigError
from lmtrain.sweeps import compare, plots
from lmtrain.sweeps import fit as laws
from lmtrain.sweeps.planning import si

METRICS = ("final_val_loss", "best_val_loss", "final_val_bpb", "best_val_bpb", "train_loss")
STEP_LAW_NOTE = (
    "Step Law was fitted on dense models of 60M-1B non-embedding parameters and 2B-100B+ "
    "tokens; for much smaller models its learning rates and batches are extrapolations, a "
    "starting point for a small lr/batch sweep rather than an answer."
)


def parse_number(text: str) -> float:
    """1.2e6, 1200000, 1.2M, 50k, 3G, 2T -> float."""
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([kMGT]?)\s*", text)
    if not m:
        raise ConfigError(f"not a number: {text!r} (examples: 1.2e6, 1.2M, 50k)")
    try:
        value = float(m.group(1))
    except ValueError:
        raise ConfigError(f"not a number: {text!r} (examples: 1.2e6, 1.2M, 50k)") from None
    return value * {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[m.group(2)]


def parse_point(text: str) -> tuple[float, float]:
    """ "N=1.2M,D=50M" (or N=..,C=..) -> (N, D)."""
    parts = dict(p.split("=", 1) for p in text.split(",") if "=" in p)
    if set(parts) not in ({"N", "D"}, {"N", "C"}):
        raise ConfigError(f"--predict expects N=...,D=... or N=...,C=..., got {text!r}")
    n = parse_number(parts["N"])
    d = parse_number(parts["D"]) if "D" in parts else parse_number(parts["C"]) / (6 * n)
    return n, d


def read_results(sweep_dir: Path) -> list[dict]:
    """Rows of SWEEP_DIR/results.jsonl; ConfigError when there are none."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ConfigError(f"sweep directory not found: {sweep_dir}")
    path = sweep_dir / "results.jsonl"
    if not path.is_file():
        raise ConfigError(
            f"no results in {sweep_dir}: results.jsonl is missing (run `lmtrain sweep "
            f"EXPERIMENT.py --dir {sweep_dir}` first)"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ConfigError(f"{path} has no rows")
    return rows


def finished_rows(sweep_dir: Path, metric: str) -> list[dict]:
    """The finished runs of a sweep with a finite `metric`; ConfigError saying why if none."""
    rows = read_results(sweep_dir)
    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    done = [r for r in rows if r.get("status") == "done"]
    if not done:
        counts = ", ".join(f"{n} {s}" for s, n in Counter(r.get("status") for r in rows).items())
        raise ConfigError(
            f"none of the {len(rows)} runs in {sweep_dir} has finished ({counts}); "
            "re-run `lmtrain sweep` to finish them"
        )
    good = [r for r in done if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not good:
        raise ConfigError(
            f"none of the {len(done)} finished runs in {sweep_dir} has a {metric} "
            "(did they evaluate? a run needs a validation split, data.val_fraction > 0)"
        )
    return good


def split_repeated(rows: list[dict], repeated: str) -> tuple[list[dict], list[str]]:
    """(the rows to fit, the names of runs left out for repeated tokens); ConfigError when
    none is left."""
    if repeated not in ("exclude", "include"):
        raise ConfigError(f"--repeated must be exclude or include, not {repeated!r}")
    out = [r["name"] for r in rows if (r.get("epochs") or 0) > 1 + 1e-6]
    if repeated == "include" or not out:
        return rows, []
    most = max(r["epochs"] for r in rows if r["name"] in out)
    print(
        f"left out {len(out)} of {len(rows)} runs that saw repeated tokens (up to {most:.3g} "
        "epochs): the law assumes fresh tokens (--repeated include fits them anyway)"
    )
    if len(out) == len(rows):
        raise ConfigError(
            "every finished run saw repeated tokens; nothing is left to fit "
            "(--repeated include fits them as if their tokens were fresh)"
        )
    return [r for r in rows if r["name"] not in out], out


def fit_sweep(
    sweep_dir: Path,
    *,
    metric: str = "final_val_loss",
    params: str = "nonembed",
    predict: Sequence[str] = (),
    target_flops: Sequence[float] = (),
    holdout: Path | None = None,
    bootstrap: int = 200,
    seed: int = 0,
    out: Path | None = None,
    by: str = "family",
    best_lr: bool = False,
    reference: str | None = None,
    repeated: str = "exclude",
) -> dict:
    """Fits the laws of a sweep's finished runs; writes fit.json, fit.md and plots into `out`
    (default: the sweep directory), prints a summary, and returns the fit.

    `params`: "nonembed" or "total" parameters as N; `predict`: points "N=...,D=..." (or C=);
    `target_flops`: budgets for N*, D* (default 10x and 100x the largest); `holdout`: another
    sweep directory whose runs are predicted and compared; `by`: the column that splits the
    runs into separately fitted groups ("family" or "optimizer"); `best_lr`: fit only the best
    lr of each (group, N, D) cell; `reference`: a group to report compute multipliers against
    (lmtrain.sweeps.compare); `repeated`: "exclude" leaves out runs that saw a token more than
    once (`epochs` > 1 in results.jsonl: the law assumes fresh tokens), "include" fits them
    as if their tokens were fresh.
    """
    sweep_dir = Path(sweep_dir)
    n_key = "params_nonembed" if params == "nonembed" else "params"
    rows, left_out = split_repeated(finished_rows(sweep_dir, metric), repeated)
    rows = compare.group_rows(rows, by)
    if reference:
        compare.check_reference([r.get("family", "") for r in rows], reference)
    lr_table = None
    if best_lr:
        rows, lr_table = compare.best_lr(rows, metric, n_key)
    points = [parse_point(p) for p in predict]
    families = laws.fit_rows(rows, metric, n_key, bootstrap, seed)
    compared = compare.compare(families, rows, reference, metric, n_key) if reference else None
    max_c = max(6 * r[n_key] * r["tokens"] for r in rows)
    budgets = list(target_flops) or [10 * max_c, 100 * max_c]
    for name, fam in families.items():
        if "error" in fam:
            continue
        seq_len = next(r["seq_len"] for r in rows if r.get("family", "") == name)
        fam["targets"] = laws.targets(fam, budgets)
        fam["predictions"] = [laws.predict(fam, n, d) for n, d in points]
        for t in fam["targets"] + fam["predictions"]:
            t["step_law"]["batch_seqs"] = t["step_law"]["batch_tokens"] / seq_len
    held = _holdout(Path(holdout), families, metric, n_key, by) if holdout else None
    out = Path(out) if out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "sweep_dir": str(sweep_dir),
        "metric": metric,
        "params": n_key,
        "flops": "C = 6 N D, N = "
        + ("non-embedding" if n_key != "params" else "total")
        + " parameters, D = training tokens",
        "n_runs": len(rows),
        "by": by,
        "families": families,
        "holdout": held,
        "best_lr": lr_table,
        "reference": reference,
        "compare": compared,
        "repeated_left_out": left_out,
    }
    (out / "fit.json").write_text(json.dumps(result, indent=1) + "\n")
    try:
        pngs = plots.write_plots(result, out)
        plot_note = "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in pngs)
    except ImportError:
        pngs = []
        plot_note = "Plots skipped: matplotlib is not installed (`pip install 'lmtrain[plot]'`)."
    (out / "fit.md").write_text(report(result, plot_note))
    print(summary(result))
    print(f"wrote {out / 'fit.json'}, {out / 'fit.md'}" + "".join(f", {p}" for p in pngs))
    if not pngs:
        print(plot_note)
    return result


def _holdout(path: Path, families: dict, metric: str, n_key: str, by: str) -> list[dict]:
    """Predictions for another sweep's finished runs, next to what they measured."""
    out = []
    for r in compare.group_rows(finished_rows(path, metric), by):
        fam = families.get(r.get("family", ""))
        if fam is None or "error" in fam:
            continue
        p = laws.predict(fam, r[n_key], r["tokens"])
        lo, hi = p["interval"] or (math.nan, math.nan)
        out.append({
            "name": r["name"], "family": r.get("family", ""), "N": r[n_key], "D": r["tokens"],
            "observed": r[metric], "predicted": p["loss"], "interval": p["interval"],
            "inside": bool(lo <= r[metric] <= hi),
        })  # fmt: skip
    return out


def _iv(x: list[float] | None, fmt: str = "{:.3g}") -> str:
    return "-" if not x else f"[{fmt.format(x[0])}, {fmt.format(x[1])}]"


def summary(fit: dict) -> str:
    """A few lines for the terminal: the fitted law and the predictions of each family."""
    lines = []
    for name, fam in fit["families"].items():
        if "error" in fam:
            lines.append(f"{name}: not fitted: {fam['error']}")
            continue
        c, co = fam["chinchilla"], fam["compute_optimal"]
        lines.append(
            f"{name} ({fam['n_runs']} runs): L = {c['E']:.3f} + {c['A']:.4g}/N^{c['alpha']:.3f}"
            f" + {c['B']:.4g}/D^{c['beta']:.3f}  (alpha {_iv(c['intervals']['alpha'])}, beta "
            f"{_iv(c['intervals']['beta'])}); N* ~ C^{co['a']:.3f} {_iv(co['a_interval'])}"
        )
        lines += [f"  warning: {w}" for w in fam["warnings"]]
        for p in fam.get("predictions", []):
            lines.append(
                f"  predict N={si(p['N'])} D={si(p['D'])} (C={p['C']:.3g}): {fit['metric']} "
                f"{p['loss']:.4f}, 90% interval {_iv(p['interval'], '{:.4f}')}"
            )
    for name, c in (fit.get("compare") or {}).items():
        lines.append(
            f"{name} over {fit['reference']}: compute multiplier at equal loss "
            f"{c['median']:.3g}, 90% interval {_iv(c['interval'])} ({len(c['runs'])} runs)"
        )
    for h in fit["holdout"] or []:
        lines.append(
            f"  held-out {h['name']}: observed {h['observed']:.4f}, predicted "
            f"{h['predicted']:.4f} {_iv(h['interval'], '{:.4f}')}"
            + (" inside" if h["inside"] else " OUTSIDE the interval")
        )
    return "\n".join(lines)


def report(fit: dict, plot_note: str) -> str:
    """fit.md: every number of fit.json a reader needs, as markdown tables."""
    m = fit["metric"]
    out = [
        f"# Scaling-law fit of `{fit['sweep_dir']}`",
        "",
        f"Fitted metric: `{m}` of {fit['n_runs']} finished runs. Compute: {fit['flops']}. "
        "Intervals are 90% bootstrap percentiles (runs resampled with replacement, refitted).",
        "",
        plot_note,
        "",
    ]
    if fit.get("repeated_left_out"):
        out += [
            f"Left out {len(fit['repeated_left_out'])} runs that saw repeated tokens (the law "
            "assumes fresh tokens; `--repeated include` fits them): "
            + ", ".join(f"`{n}`" for n in fit["repeated_left_out"]),
            "",
        ]
    for name, fam in fit["families"].items():
        out += [f"## {fit.get('by', 'family').capitalize()} `{name}`", ""]
        if "error" in fam:
            out += [f"Not fitted: {fam['error']}", ""]
            continue
        c, co = fam["chinchilla"], fam["compute_optimal"]
        out += [f"> {w}" for w in fam["warnings"]] + ([""] if fam["warnings"] else [])
        out += [
            f"{fam['n_runs']} runs, {fam['n_sizes']} model sizes. L(N, D) = E + A / N^alpha + "
            f"B / D^beta, Huber (delta {laws.HUBER_DELTA:g}) on log loss, L-BFGS from "
            f"{len(laws.GRID)} starts; RMS log residual {c['rms_log_residual']:.4f}.",
            "",
            "| parameter | fit | 90% interval | Chinchilla (Hoffmann et al.) |",
            "|---|---|---|---|",
        ]
        for k in laws.NAMES:
            out.append(f"| {k} | {c[k]:.4g} | {_iv(c['intervals'][k])} | {laws.CHINCHILLA[k]} |")
        out += [
            "",
            f"Compute-optimal allocation: N\\*(C) ~ C^{co['a']:.3f} {_iv(co['a_interval'])}, "
            f"D\\*(C) ~ C^{co['b']:.3f} {_iv(co['b_interval'])} (a = beta / (alpha + beta)).",
            "",
            "### IsoFLOP minima",
            "",
            "| C | runs | N* | D* | L* | note |",
            "|---|---|---|---|---|---|",
        ]
        iso = fam["isoflop"]
        for b in iso["budgets"]:
            n_opt, d_opt = b.get("N_opt"), b.get("D_opt")
            out.append(
                f"| {b['C']:.3g} | {b['runs']} | {si(n_opt) if n_opt else '-'} | "
                f"{si(d_opt) if d_opt else '-'} | "
                f"{b['L_opt']:.4f} | {b.get('note', '')} |"
                if b.get("L_opt") is not None
                else f"| {b['C']:.3g} | {b['runs']} | - | - | - | {b.get('note', '')} |"
            )
        law = iso["power_law"]
        out += [
            "",
            f"IsoFLOP power law: N* = {law['k']:.3g} C^{law['a']:.3f} {_iv(law['a_interval'])} "
            f"over {law['budgets_used']} budgets."
            if law
            else f"IsoFLOP power law: not available ({iso.get('note', '')}).",
            "",
            "### Compute-optimal settings and Step Law",
            "",
            "| for | C | N | D | predicted | 90% interval | Step Law lr | Step Law batch |",
            "|---|---|---|---|---|---|---|---|",
        ]
        kinds = ["optimal at C"] * len(fam["targets"]) + ["--predict"] * len(fam["predictions"])
        for kind, t in zip(kinds, fam["targets"] + fam["predictions"], strict=True):
            s = t["step_law"]
            out.append(
                f"| {kind} | {t['C']:.3g} | {si(t['N'])} | {si(t['D'])} | {t['loss']:.4f} | "
                f"{_iv(t['interval'], '{:.4f}')} | {s['lr']:.3g} | {si(s['batch_tokens'])} "
                f"tokens = {s['batch_seqs']:.0f} seqs |"
            )
        out += ["", STEP_LAW_NOTE, "", "### Runs", "", "| run | N | D | C | loss | fit | resid |"]
        out.append("|---|---|---|---|---|---|---|")
        for r in fam["runs"]:
            out.append(
                f"| {r['name']} | {si(r['N'])} | {si(r['D'])} | {6 * r['N'] * r['D']:.3g} | "
                f"{r['loss']:.4f} | {r['pred']:.4f} | {r['loss'] / r['pred'] - 1:+.2%} |"
            )
        out.append("")
    if fit["holdout"]:
        out += ["## Held-out runs", "", "| run | N | D | observed | predicted | 90% interval |"]
        out.append("|---|---|---|---|---|---|")
        for h in fit["holdout"]:
            out.append(
                f"| {h['name']} | {si(h['N'])} | {si(h['D'])} | {h['observed']:.4f} | "
                f"{h['predicted']:.4f} | {_iv(h['interval'], '{:.4f}')} |"
            )
        out.append("")
    out += compare.report_lines(fit)
    return "\n".join(out)
