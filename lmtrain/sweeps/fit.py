"""Scaling-law fits: Chinchilla L(N, D), IsoFLOP minima, compute-optimal allocation, Step Law.

Conventions (the same everywhere in lmtrain's sweeps):

- N is the non-embedding parameter count (every parameter except the token-embedding table and
  the output head), D the training tokens, and the compute C = 6 N D (Kaplan et al.; the model's
  own FLOP count with attention and head is recorded too, as `model_flops`).
- Chinchilla parametric law (Hoffmann et al. 2022, approach 3):

      L(N, D) = E + A / N^alpha + B / D^beta

  fitted in log space, log L = LSE(a - alpha log N, b - beta log D, e) with A = e^a, B = e^b,
  E = e^e, by minimising sum_i Huber_delta(log L_pred_i - log L_i), delta = 1e-3, with optax's
  L-BFGS started from every point of a grid (a, b in {0, 10, 20}, e in {-1, 0, 1}, alpha, beta
  in {0.2, 0.6, 1.2}; a coarser version of the paper's grid) for 100 iterations, after which
  the 8 best are polished for 1,000 more and the lowest objective wins.
- Compute-optimal allocation under C = 6 N D:
      N*(C) = G (C/6)^a,  D*(C) = (C/6)^b / G,  a = beta/(alpha+beta),  b = alpha/(alpha+beta),
      G = (alpha A / (beta B))^(1/(alpha+beta)).
- IsoFLOP (approach 2): runs whose C agree within 10% form one budget; per budget a parabola
  L = c2 (ln N)^2 + c1 ln N + c0 gives ln N* = -c1 / (2 c2); across budgets N* = k C^a_iso.
- Intervals are 90% bootstrap percentiles: runs resampled with replacement and refitted.
- Step Law (Li et al. 2025, "Predictable Scale: Part I"): lr(N, D) = 1.79 N^-0.713 D^0.307 and
  batch (tokens) B(D) = 0.58 D^0.571, N non-embedding parameters, D tokens.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

from lmtrain.config import ConfigError

# Hoffmann et al. (2022), approach 3, as published (Besiroglu et al. (2024), "Chinchilla scaling:
# a replication attempt", refit the same data to E 1.82, A 482, B 2085, alpha 0.35, beta 0.37).
CHINCHILLA = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
HUBER_DELTA = 1e-3
_LOG_AB, _LOG_E, _EXPONENT = (0.0, 10.0, 20.0), (-1.0, 0.0, 1.0), (0.2, 0.6, 1.2)
# L-BFGS starting points, rows (a, b, e, alpha, beta): 3^5 = 243.
GRID = np.array(list(itertools.product(_LOG_AB, _LOG_AB, _LOG_E, _EXPONENT, _EXPONENT)))
NAMES = ("E", "A", "B", "alpha", "beta")
LEVEL = 0.90  # two-sided interval mass


class FitError(ConfigError):
    """Data that cannot be fitted (too few sizes or runs); the CLI exits 2 on it."""


def chinchilla_loss(p: dict, n, d) -> np.ndarray:
    """L = E + A / N^alpha + B / D^beta."""
    n, d = np.asarray(n, float), np.asarray(d, float)
    return p["E"] + p["A"] / n ** p["alpha"] + p["B"] / d ** p["beta"]


def compute_optimal(p: dict, c) -> tuple[np.ndarray, np.ndarray]:
    """(N*, D*) minimising L(N, D) subject to 6 N D = C."""
    al, be = p["alpha"], p["beta"]
    g = (al * p["A"] / (be * p["B"])) ** (1 / (al + be))
    c6 = np.asarray(c, float) / 6
    return g * c6 ** (be / (al + be)), c6 ** (al / (al + be)) / g


def step_law(n: float, d: float) -> dict:
    """Step Law's optimal peak learning rate and batch size in tokens for N params, D tokens."""
    return {"lr": 1.79 * n**-0.713 * d**0.307, "batch_tokens": 0.58 * d**0.571}


# ---------------------------------------------------------------------------- Chinchilla fit


@functools.cache
def _solver(iters: int):
    """jit(vmap(L-BFGS)) over starting points and per-row weights; built once per iters."""
    import jax
    import jax.numpy as jnp
    import optax

    def objective(p, log_n, log_d, log_l, w):
        terms = jnp.stack([p[0] - p[3] * log_n, p[1] - p[4] * log_d, jnp.full_like(log_n, p[2])])
        r = jax.nn.logsumexp(terms, axis=0) - log_l
        # /delta keeps the objective O(|r|): same minimiser, better-scaled line searches.
        return jnp.sum(w * optax.losses.huber_loss(r, delta=HUBER_DELTA)) / (
            HUBER_DELTA * jnp.sum(w)
        )

    def solve(p0, log_n, log_d, log_l, w):
        f = functools.partial(objective, log_n=log_n, log_d=log_d, log_l=log_l, w=w)
        opt = optax.lbfgs(linesearch=optax.scale_by_zoom_linesearch(max_linesearch_steps=15))
        value_and_grad = optax.value_and_grad_from_state(f)

        def body(_, carry):
            p, state = carry
            value, grad = value_and_grad(p, state=state)
            updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=f)
            return optax.apply_updates(p, updates), state

        p, _ = jax.lax.fori_loop(0, iters, body, (p0, opt.init(p0)))
        return p, f(p)

    return jax.jit(jax.vmap(solve, in_axes=(0, None, None, None, 0)))


def _lbfgs(starts: np.ndarray, n, d, loss, weights: np.ndarray, iters: int):
    """Runs L-BFGS from each row of `starts` (float64); returns (params [S,5], objective [S])."""
    import jax

    m = len(n)
    pad = -(-m // 64) * 64 - m  # padded rows have weight 0; fewer shapes, fewer compiles
    cols = [np.pad(np.log(np.asarray(x, float)), (0, pad)) for x in (n, d, loss)]
    w = np.pad(np.asarray(weights, float), ((0, 0), (0, pad)))
    with jax.enable_x64(True):
        p, f = _solver(iters)(np.asarray(starts, float), *cols, w)
        return np.asarray(p), np.asarray(f)


def _as_dict(p: np.ndarray) -> dict:
    """(a, b, e, alpha, beta) -> {E, A, B, alpha, beta}; inf where exp overflows."""
    a, b, e, alpha, beta = (float(x) for x in p)
    with np.errstate(over="ignore"):
        big = np.exp([e, a, b])
    return {
        "E": float(big[0]),
        "A": float(big[1]),
        "B": float(big[2]),
        "alpha": alpha,
        "beta": beta,
    }


def fit_chinchilla(n, d, loss, polish: int = 8) -> dict:
    """Best Huber fit of L(N, D) from the grid of starts.

    Returns {E, A, B, alpha, beta, objective, log_params: [a, b, e, alpha, beta]}.
    """
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    ones = np.ones((len(GRID), len(n)))
    p, f = _lbfgs(GRID, n, d, loss, ones, iters=100)
    best = np.argsort(np.where(np.isfinite(f), f, np.inf))[:polish]
    p, f = _lbfgs(p[best], n, d, loss, ones[:polish], iters=1000)
    i = int(np.nanargmin(np.where(np.isfinite(f), f, np.nan)))
    params = _as_dict(p[i])
    if not all(math.isfinite(v) for v in params.values()):
        raise FitError(f"the Chinchilla fit diverged ({params}); the runs do not determine it")
    return {**params, "objective": float(f[i]), "log_params": p[i].tolist()}


def bootstrap_chinchilla(n, d, loss, best: dict, n_boot: int, seed: int = 0) -> np.ndarray:
    """[n_boot, 5] parameter samples (E, A, B, alpha, beta) refitted on resampled runs."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(n), np.full(len(n), 1 / len(n)), size=n_boot).astype(float)
    starts = np.tile(np.asarray(best["log_params"], float), (n_boot, 1))
    p, f = _lbfgs(starts, n, d, loss, w, iters=300)
    with np.errstate(over="ignore"):
        out = np.stack([np.exp(p[:, 2]), np.exp(p[:, 0]), np.exp(p[:, 1]), p[:, 3], p[:, 4]], 1)
    return out[np.isfinite(f) & np.all(np.isfinite(out), axis=1)]


def interval(samples) -> list[float] | None:
    """Central LEVEL percentile interval of `samples` (None when there are none)."""
    if len(samples) == 0:
        return None
    lo = (1 - LEVEL) / 2 * 100
    return [float(x) for x in np.percentile(np.asarray(samples, float), [lo, 100 - lo])]


def predict(fam: dict, n: float, d: float) -> dict:
    """Predicted loss at (N, D) with a 90% interval from one family's fit (see `fit_family`).

    `param_interval` reflects parameter uncertainty only (bootstrap refits); `interval` also
    multiplies each bootstrap prediction by the fit's own log residuals, so it covers the
    run-to-run scatter a new run will show.
    """
    p = fam["chinchilla"]
    point = float(chinchilla_loss(p, n, d))
    samples = np.asarray(fam["bootstrap"]["samples"], float)
    boot = samples[:, 0] + samples[:, 1] / n ** samples[:, 3] + samples[:, 2] / d ** samples[:, 4]
    resid = np.asarray(fam["residuals_log"], float)
    spread = (boot[:, None] * np.exp(resid[None, :])).ravel()
    return {
        "N": n,
        "D": d,
        "C": 6 * n * d,
        "loss": point,
        "interval": interval(spread),
        "param_interval": interval(boot),
        "step_law": step_law(n, d),
    }


# ---------------------------------------------------------------------------- IsoFLOP


def compute_groups(c, tol: float = 0.1) -> list[np.ndarray]:
    """Indices of runs grouped into budgets: sorted C, a new group when C > (1 + tol) x first."""
    c = np.asarray(c, float)
    groups, cur = [], []
    for i in np.argsort(c):
        if cur and c[i] > (1 + tol) * c[cur[0]]:
            groups.append(np.array(cur))
            cur = []
        cur.append(int(i))
    if cur:
        groups.append(np.array(cur))
    return groups


def fit_parabola(n, loss) -> dict:
    """Parabola of loss in ln N; its minimum (N_opt, L_opt) and whether it lies inside the data."""
    x = np.log(np.asarray(n, float))
    c2, c1, c0 = np.polyfit(x, np.asarray(loss, float), 2)
    if c2 <= 0:
        return {"coeffs": [c2, c1, c0], "N_opt": None, "L_opt": None, "inside": False}
    x_opt = -c1 / (2 * c2)
    return {
        "coeffs": [float(c2), float(c1), float(c0)],
        "N_opt": float(math.exp(x_opt)),
        "L_opt": float(c0 - c1**2 / (4 * c2)),
        "inside": bool(x.min() <= x_opt <= x.max()),
    }


def power_law(x, y) -> tuple[float, float]:
    """(k, a) of y = k x^a by least squares in log-log."""
    a, log_k = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(math.exp(log_k)), float(a)


def _isoflop_minima(n, d, loss, groups) -> list[dict]:
    out = []
    for idx in groups:
        c = float(np.exp(np.mean(np.log(6 * n[idx] * d[idx]))))
        if len(np.unique(n[idx])) < 3:
            out.append({"C": c, "runs": len(idx), "note": "fewer than 3 model sizes"})
            continue
        par = fit_parabola(n[idx], loss[idx])
        note = "" if par["inside"] else "minimum outside the sampled sizes (not used)"
        if par["N_opt"] is None:
            note = "no minimum (the parabola opens downward)"
        d_opt = c / (6 * par["N_opt"]) if par["N_opt"] else None
        out.append({"C": c, "runs": len(idx), **par, "D_opt": d_opt, "note": note})
    return out


def isoflop(n, d, loss, tol: float = 0.1, n_boot: int = 200, seed: int = 0) -> dict:
    """IsoFLOP minima per budget and the power law N*(C) = k C^a over budgets."""
    n, d, loss = (np.asarray(x, float) for x in (n, d, loss))
    groups = compute_groups(6 * n * d, tol)
    budgets = _isoflop_minima(n, d, loss, groups)
    used = [b for b in budgets if b.get("inside")]
    result = {"tolerance": tol, "budgets": budgets, "power_law": None}
    if len(used) < 2:
        result["note"] = "a power law needs valid minima at 2 or more budgets"
        return result
    k, a = power_law([b["C"] for b in used], [b["N_opt"] for b in used])
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(n_boot):
        idx = [g[rng.integers(0, len(g), len(g))] for g in groups]
        boot = [b for b in _isoflop_minima(n, d, loss, idx) if b.get("inside")]
        if len(boot) >= 2:
            samples.append(power_law([b["C"] for b in boot], [b["N_opt"] for b in boot])[1])
    result["power_law"] = {
        "k": k,
        "a": a,
        "a_interval": interval(samples),
        "budgets_used": len(used),
    }
    return result


# ---------------------------------------------------------------------------- whole sweeps


def fit_family(rows: Sequence[dict], loss_key: str, n_key: str, n_boot: int, seed: int) -> dict:
    """Chinchilla fit, bootstrap, compute-optimal exponents and IsoFLOP for one family's rows."""
    n = np.array([r[n_key] for r in rows], float)
    d = np.array([r["tokens"] for r in rows], float)
    loss = np.array([r[loss_key] for r in rows], float)
    sizes, token_counts = np.unique(n), np.unique(d)
    if len(sizes) < 2:
        raise FitError(
            f"all {len(rows)} finished runs have one model size (N={sizes[0]:.4g}); "
            "a fit needs at least 2 sizes"
        )
    if len(token_counts) < 2:
        raise FitError(f"all {len(rows)} finished runs train on {token_counts[0]:.4g} tokens")
    if len(rows) < 5:
        raise FitError(f"{len(rows)} finished runs cannot determine 5 parameters; need 5 or more")
    warnings = []
    if len(rows) < 10:
        warnings.append(f"only {len(rows)} runs for 5 parameters: the fit is barely determined")
    best = fit_chinchilla(n, d, loss)
    if best["E"] < 0.01 * loss.min() or not all(0.01 < best[k] < 5 for k in ("alpha", "beta")):
        warnings.append(
            f"degenerate fit (E={best['E']:.3g}, alpha={best['alpha']:.3g}, "
            f"beta={best['beta']:.3g}): these runs do not pin down all five parameters"
        )
    samples = bootstrap_chinchilla(n, d, loss, best, n_boot, seed)
    pred = chinchilla_loss(best, n, d)
    resid = np.log(loss) - np.log(pred)
    al, be = samples[:, 3], samples[:, 4]
    params = {k: best[k] for k in NAMES}
    a, b = optimal_exponents(params)
    return {
        "n_runs": len(rows),
        "n_sizes": len(sizes),
        "warnings": warnings,
        "chinchilla": {
            **params,
            "objective": best["objective"],
            "rms_log_residual": float(np.sqrt(np.mean(resid**2))),
            "intervals": {k: interval(samples[:, i]) for i, k in enumerate(NAMES)},
        },
        "compute_optimal": {
            "a": a,
            "b": b,
            "a_interval": interval(be / (al + be)),
            "b_interval": interval(al / (al + be)),
        },
        "isoflop": isoflop(n, d, loss, n_boot=n_boot, seed=seed),
        "bootstrap": {"n": len(samples), "samples": samples.tolist()},
        "residuals_log": resid.tolist(),
        "runs": [
            {"name": r.get("name", ""), "N": x, "D": y, "loss": z, "pred": q}
            for r, x, y, z, q in zip(
                rows, n.tolist(), d.tolist(), loss.tolist(), pred.tolist(), strict=True
            )
        ],
    }


def optimal_exponents(p: dict) -> tuple[float, float]:
    """Compute-optimal exponents (a, b): N* ~ C^a, D* ~ C^b."""
    s = p["alpha"] + p["beta"]
    return p["beta"] / s, p["alpha"] / s


def targets(fam: dict, flops: Sequence[float]) -> list[dict]:
    """Compute-optimal N*, D*, predicted loss and Step Law settings at each target compute."""
    out = []
    for c in flops:
        n_opt, d_opt = (float(x) for x in compute_optimal(fam["chinchilla"], c))
        out.append({**predict(fam, n_opt, d_opt), "C": float(c)})
    return out


def fit_rows(
    rows: Sequence[dict], loss_key: str, n_key: str, n_boot: int = 200, seed: int = 0
) -> dict:
    """Fits every family in `rows`; a family that cannot be fitted gets an "error" entry.

    Raises FitError when no family can be fitted.
    """
    usable = [r for r in rows if _finite(r.get(loss_key)) and r.get(n_key) and r.get("tokens")]
    if not usable:
        raise FitError(f"no run has a finite {loss_key}")
    families: dict[str, dict] = {}
    for fam in sorted({r.get("family", "") for r in usable}):
        sub = [r for r in usable if r.get("family", "") == fam]
        try:
            families[fam] = fit_family(sub, loss_key, n_key, n_boot, seed)
        except FitError as e:
            families[fam] = {"error": str(e), "n_runs": len(sub)}
    if all("error" in f for f in families.values()):
        raise FitError("; ".join(f"family {k!r}: {f['error']}" for k, f in families.items()))
    return families


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
