"""PNG plots of a scaling-law fit (matplotlib, imported here only: `pip install 'lmtrain[plot]'`).

- loss_vs_compute.png: every run's loss against C = 6 N D, coloured by N, with each family's
  compute-optimal frontier L(N*(C), D*(C)) from its Chinchilla fit.
- isoflop-FAMILY.png: loss against N per compute budget with the fitted parabolas and minima;
  beside it the minima N*(C) with the IsoFLOP power law and the Chinchilla fit's N*(C).
- observed_vs_predicted.png: each run's loss against the fit's prediction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmtrain.sweeps import fit as laws


def write_plots(fit: dict, out_dir: Path) -> list[Path]:
    """Writes the PNGs for `fit` (fit.json's content); raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    fams = {k: f for k, f in fit["families"].items() if "error" not in f}
    metric = fit["metric"]
    paths = [_loss_vs_compute(plt, fams, fit, out_dir / "loss_vs_compute.png")]
    for name, fam in fams.items():
        paths.append(_isoflop(plt, name, fam, metric, out_dir / f"isoflop-{name}.png"))
    paths.append(_observed(plt, fams, metric, out_dir / "observed_vs_predicted.png"))
    return paths


def _loss_vs_compute(plt, fams: dict, fit: dict, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = "osD^vP*X"
    for i, (name, fam) in enumerate(fams.items()):
        n = np.array([r["N"] for r in fam["runs"]])
        c = 6 * n * np.array([r["D"] for r in fam["runs"]])
        loss = np.array([r["loss"] for r in fam["runs"]])
        sc = ax.scatter(c, loss, c=np.log10(n), cmap="viridis", marker=markers[i % 8], label=name)
        hi = max([c.max()] + [t["C"] for t in fam.get("targets", [])])
        grid = np.logspace(np.log10(c.min() / 2), np.log10(hi), 100)
        n_opt, d_opt = laws.compute_optimal(fam["chinchilla"], grid)
        ax.plot(
            grid, laws.chinchilla_loss(fam["chinchilla"], n_opt, d_opt), label=f"{name} frontier"
        )
    fig.colorbar(sc, ax=ax, label="log10 N")
    ax.set(xscale="log", xlabel="C = 6 N D (FLOPs)", ylabel=fit["metric"], title="Loss vs compute")
    ax.legend()
    return _save(plt, fig, path)


def _isoflop(plt, name: str, fam: dict, metric: str, path: Path) -> Path:
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 5))
    runs = fam["runs"]
    n = np.array([r["N"] for r in runs])
    c = 6 * n * np.array([r["D"] for r in runs])
    loss = np.array([r["loss"] for r in runs])
    iso = fam["isoflop"]
    groups = laws.compute_groups(c, iso["tolerance"])
    colors = plt.get_cmap("plasma")(np.linspace(0, 0.85, max(len(groups), 1)))
    for idx, b, col in zip(groups, iso["budgets"], colors, strict=True):
        ax.scatter(n[idx], loss[idx], color=col, label=f"C={b['C']:.2g}")
        if b.get("coeffs") and b.get("N_opt"):
            x = np.linspace(np.log(n[idx].min()) - 0.2, np.log(n[idx].max()) + 0.2, 50)
            ax.plot(np.exp(x), np.polyval(b["coeffs"], x), color=col)
            ax.scatter([b["N_opt"]], [b["L_opt"]], color=col, marker="*", s=150, edgecolor="k")
    ax.set(xscale="log", xlabel="N (parameters)", ylabel=metric, title=f"IsoFLOP curves: {name}")
    ax.legend(fontsize=8)
    used = [b for b in iso["budgets"] if b.get("inside")]
    if used:
        ax2.scatter([b["C"] for b in used], [b["N_opt"] for b in used], label="IsoFLOP minima")
    grid = np.logspace(np.log10(c.min() / 2), np.log10(c.max() * 10), 50)
    ax2.plot(grid, laws.compute_optimal(fam["chinchilla"], grid)[0], label="Chinchilla fit N*(C)")
    if iso["power_law"]:
        k, a = iso["power_law"]["k"], iso["power_law"]["a"]
        ax2.plot(grid, k * grid**a, "--", label=f"IsoFLOP N* = {k:.2g} C^{a:.2f}")
    ax2.set(xscale="log", yscale="log", xlabel="C = 6 N D", ylabel="N*", title="Optimal size")
    ax2.legend(fontsize=8)
    return _save(plt, fig, path)


def _observed(plt, fams: dict, metric: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5.5, 5))
    lo, hi = np.inf, -np.inf
    for name, fam in fams.items():
        obs = np.array([r["loss"] for r in fam["runs"]])
        pred = np.array([r["pred"] for r in fam["runs"]])
        ax.scatter(pred, obs, label=name)
        lo, hi = min(lo, obs.min(), pred.min()), max(hi, obs.max(), pred.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set(xlabel=f"predicted {metric}", ylabel=f"observed {metric}", title="Fit vs runs")
    ax.legend()
    return _save(plt, fig, path)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
