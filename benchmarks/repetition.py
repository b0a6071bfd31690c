"""The repetition table of a finished `experiments/repetition.py` sweep, with Muennighoff et
al.'s data-constrained law fitted to it, and its plot.

    lmtrain sweep experiments/repetition.py --dir runs/repetition --parallel 2
    python benchmarks/repetition.py runs/repetition --out benchmarks/results/repetition

Reads SWEEP_DIR/results.jsonl (its `epochs` and `unique_tokens` columns). Two fits, by grid
search on squared error of the final validation loss:
- the fresh-data runs (epochs <= 1, each with its own full schedule): L(D) = E + B / D^beta;
- the repeated runs at fixed D: L = E + B / D'^beta with the fresh fit's E, B, beta and
  Muennighoff et al.'s effective data D' = U + U R* (1 - exp(-(D/U - 1) / R*)), one parameter
  R* (how many repetitions still add value; their fit at 10M-9B parameters: R*_D = 15.4).
Prints a markdown report; with --out also writes repetition.md and repetition.png there.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

PUBLISHED_R_STAR = 15.39  # Muennighoff et al. 2023, R*_D


def effective_tokens(unique: float, tokens: float, r_star: float) -> float:
    """D': `tokens` drawn from `unique` tokens are worth this many fresh ones."""
    repeats = max(tokens / unique - 1.0, 0.0)
    return unique + unique * r_star * (1.0 - math.exp(-repeats / r_star))


def fit_fresh(d: np.ndarray, loss: np.ndarray) -> dict:
    """E + B / D^beta (E >= 0): least squares for E, B at each beta of a fine grid."""
    best = None
    for beta in np.linspace(0.02, 2.0, 991):
        x = np.stack([np.ones_like(d), d**-beta], 1)
        (e, b), *_ = np.linalg.lstsq(x, loss, rcond=None)
        if e < 0:  # the loss floor E is not negative: fit B alone
            e, b = 0.0, float(loss @ x[:, 1] / (x[:, 1] @ x[:, 1]))
        err = float(np.sum((x @ [e, b] - loss) ** 2))
        if best is None or err < best["sse"]:
            best = {"E": float(e), "B": float(b), "beta": float(beta), "sse": err}
    best["rms"] = math.sqrt(best["sse"] / len(d))
    return best


def law(fresh: dict, d_eff: float) -> float:
    return fresh["E"] + fresh["B"] * d_eff ** -fresh["beta"]


def fit_r_star(fresh: dict, rows: list[dict]) -> dict:
    """R* minimising the squared error of the repeated runs under the fresh law."""
    grid = np.exp(np.linspace(math.log(0.05), math.log(1000.0), 2000))

    def sse(r: float) -> float:
        return sum(
            (law(fresh, effective_tokens(x["unique_tokens"], x["tokens"], r)) - x["loss"]) ** 2
            for x in rows
        )

    errs = [sse(r) for r in grid]
    i = int(np.argmin(errs))
    return {"R_star": float(grid[i]), "rms": math.sqrt(errs[i] / len(rows)), "edge": i in (0, 1999)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("sweep_dir")
    ap.add_argument("--out", default=None, help="write repetition.md and repetition.png here")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.sweep_dir, "results.jsonl").open()]
    done = [r for r in rows if r["status"] == "done" and r.get("final_val_loss") is not None]
    if len(done) < len(rows):
        print(f"warning: {len(rows) - len(done)} of {len(rows)} runs have not finished")
    for r in done:
        r["loss"] = r["final_val_loss"]
    top = max(r["tokens"] for r in done)
    fresh = [r for r in done if r["epochs"] <= 1 + 1e-6]
    repeated = [r for r in done if r["tokens"] == top]
    repeated.sort(key=lambda r: (r["epochs"], r["seed"]))
    f = fit_fresh(
        np.array([r["tokens"] for r in fresh], float), np.array([r["loss"] for r in fresh])
    )
    rs = fit_r_star(f, [r for r in repeated if r["epochs"] > 1 + 1e-6])
    base = [r["loss"] for r in repeated if r["epochs"] <= 1 + 1e-6]
    ref = base[0]
    noise = abs(base[1] - base[0]) if len(base) > 1 else None

    out = [
        f"Fixed compute: every repeated run trains on D = {top:,} tokens "
        f"({repeated[0]['steps']} steps), the model N = {repeated[0]['params_nonembed']:,} "
        "non-embedding parameters; final validation loss on the whole validation split.",
        "",
        "| epochs | unique tokens | seed | val loss | vs 1 epoch | val bits/byte | "
        f"D' (fit R* {rs['R_star']:.3g}) | law's loss (fit R*) | "
        f"law's loss (R* {PUBLISHED_R_STAR}) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in repeated:
        d1 = effective_tokens(r["unique_tokens"], r["tokens"], rs["R_star"])
        d2 = effective_tokens(r["unique_tokens"], r["tokens"], PUBLISHED_R_STAR)
        out.append(
            f"| {r['epochs']:g} | {r['unique_tokens']:,} | {r['seed']} | {r['loss']:.4f} | "
            f"{r['loss'] - ref:+.4f} | {r['final_val_bpb']:.4f} | {d1:,.0f} | "
            f"{law(f, d1):.4f} | {law(f, d2):.4f} |"
        )
    out += [
        "",
        "Fresh data (each run its own full schedule, no token seen twice):",
        "",
        "| tokens D | steps | val loss | law's loss |",
        "|---|---|---|---|",
    ]
    for r in sorted(fresh, key=lambda r: (r["tokens"], r["seed"])):
        out.append(
            f"| {r['tokens']:,} | {r['steps']} | {r['loss']:.4f} | {law(f, r['tokens']):.4f} |"
        )
    out += [
        "",
        f"Fresh law: L(D) = {f['E']:.3f} + {f['B']:.4g} / D^{f['beta']:.3f} (RMS residual "
        f"{f['rms']:.4f}, {len(fresh)} runs). Data-constrained fit: R* = {rs['R_star']:.3g} "
        f"(RMS residual {rs['rms']:.4f}"
        + (", at the edge of the grid: not identified" if rs["edge"] else "")
        + f"; Muennighoff et al.: {PUBLISHED_R_STAR}).",
    ]
    if noise is not None:
        out.append(f"Seed-to-seed difference of the 1-epoch run: {noise:.4f}.")
    text = "\n".join(out)
    print(text)
    if args.out:
        o = Path(args.out)
        o.mkdir(parents=True, exist_ok=True)
        (o / "repetition.md").write_text(text + "\n")
        _plot(f, rs, repeated, fresh, o / "repetition.png")
        print(f"wrote {o / 'repetition.md'}, {o / 'repetition.png'}")


def _plot(f: dict, rs: dict, repeated: list[dict], fresh: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    ds = np.geomspace(min(r["tokens"] for r in fresh), max(r["tokens"] for r in fresh), 100)
    a.plot(ds, [law(f, d) for d in ds], "k-", label="fresh law")
    a.plot([r["tokens"] for r in fresh], [r["loss"] for r in fresh], "ko", label="fresh runs")
    a.plot(
        [r["unique_tokens"] for r in repeated],
        [r["loss"] for r in repeated],
        "rs",
        label=f"D={repeated[0]['tokens']:,} from U unique",
    )
    a.set(xscale="log", xlabel="tokens D (fresh) / unique tokens U (repeated)", ylabel="val loss")
    a.legend()
    ep = np.geomspace(1, max(r["epochs"] for r in repeated), 100)
    d = repeated[0]["tokens"]
    for r_star, style in ((rs["R_star"], "r-"), (PUBLISHED_R_STAR, "b--")):
        b.plot(ep, [law(f, effective_tokens(d / e, d, r_star)) for e in ep], style,
               label=f"law, R* = {r_star:.3g}")  # fmt: skip
    b.plot([r["epochs"] for r in repeated], [r["loss"] for r in repeated], "rs", label="runs")
    b.axhline(law(f, d), color="k", lw=0.8, label="fresh data, same D")
    b.set(xscale="log", xlabel="epochs over the unique tokens (fixed D)", ylabel="val loss")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
