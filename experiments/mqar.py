"""MQAR (multi-query associative recall): the sanity point and the recall-vs-state frontier.

lmtrain train experiments/mqar.py                # attention, width 64, seq 64, 4 pairs (~4 min)
lmtrain sweep experiments/mqar.py:frontier --dir runs/mqar --parallel 2
python experiments/mqar.py testmix runs/mqar     # each finished run on Zoology's test mix
python experiments/mqar.py report runs/mqar      # table + plot: accuracy vs state
python experiments/mqar.py rows runs/mqar > rows.jsonl   # the report's rows, kept past the runs

The frontier (BASED paper, Fig. 2 style): 2-layer models as Zoology's (a BaseConv block, then
the mixer's block, no MLPs; see ZOOLOGY) of each family x widths x learning rates at seq 256 /
16 pairs, trained on Zoology's mixture; for each (model, width) the best learning rate's final
validation accuracy is kept and plotted against the decode state that model carries (floats per
sequence: attention's KV cache at seq 256, the recurrent state otherwise). `frontier` is sized
for 2 CPU cores; `frontier-full` is the BASED paper's grid, for a GPU."""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

from lmtrain.config import (
    Config,
    DataConfig,
    EvalConfig,
    ModelConfig,
    MQARConfig,
    OptimConfig,
    TrainConfig,
    flat,
    override,
)

# Zoology's MQAR models (HazyResearch/zoology experiments/models_repo.py): 2 layers, a BaseConv
# block (conv(x) * proj(x) + x, PyTorch's conv init) then the mixer's block, no MLPs (state
# mixer Identity), tied embeddings. Our earlier 4-block layout with SwiGLU MLPs and identity-
# initialised convs ("based-4block") stayed at chance: the conv init was the cause
# (BENCHMARKS.md, "MQAR at seq 256").
ZOOLOGY = {"model.n_layers": 2, "model.block_mlp": False, "model.conv_form": "base"}
ZOOLOGY_MAMBA2 = {"model.linear_init": "torch", "model.conv_bias": True}
# Zoology's Trainer: torch.optim.AdamW(lr, weight_decay=0.1) with torch's betas, no clipping
# (it also decays norms, biases and SSM parameters, which lmtrain's AdamW never does)
ZOOLOGY_OPTIM = {"optim.b2": 0.999, "optim.clip_norm": 0.0}
# label -> overrides of the 2-layer model; heads keep head dim 64 where the family has heads
# (Mamba-2: of its inner width, 2 x d_model)
MODELS = {
    # Zoology's attention baseline puts a short convolution before attention; Primer's
    # width-3 depthwise q/k/v convolution is ours.
    "attention": {"model.name": "transformer", "model.qkv_conv": 3},
    "based": {"model.name": "based", "model.pattern": "CB", **ZOOLOGY},
    "retnet": {"model.name": "retnet", "model.pattern": "CR", **ZOOLOGY},
    "gla": {"model.name": "gla", "model.pattern": "CG", "model.n_heads": 2, **ZOOLOGY},
    # Zoology's Mamba-2 (plain Mamba2Blocks, no BaseConv, no MLP): head dim 64, mamba_ssm's
    # init (PyTorch's Linear default, out_proj / sqrt(2)) and conv bias; d_state 8 / 16 / 24.
    **{
        f"mamba2-d{n}": {"model.name": "mamba2", "model.state_size": n, **ZOOLOGY_MAMBA2}
        for n in (8, 16, 24)
    },
    # lmtrain's Mamba-2 as the frontier ran it before 2026-12-06: N(0, 0.02) init, no conv
    # bias, one head of width 2 x d_model (0.9 / 1.4% at the frontier budget)
    "mamba2-lmtrain": {"model.name": "mamba2"},
    "hybrid-MA": {"model.name": "hybrid", "model.pattern": "MA"},  # Mamba-2 then attention
    # Zoology's H3 (models_repo.add_h3): 2 plain H3 blocks, no BaseConv, no MLP; head dim 2,
    # d_state d_model / 4, and its shift SSM, a learned filter of d_state taps, as the shift
    # conv (model_sets fills in the widths)
    # Chunk 16, not 32: the same function (chunked == recurrent, tests/test_ssm.py), and its
    # fwd + bwd at head dim 2 measured 1.17 s against 2.08 s at 32 (64 x 256 tokens, 2 cores).
    "h3": {
        "model.name": "h3",
        "model.n_layers": 2,
        "model.block_mlp": False,
        "model.chunk_size": 16,
    },
    # H3 as the frontier ran it before 2026-12-07: lmtrain's layout, each H3 then SwiGLU, one
    # head of width d_model (its K x K state per mode made it ~10x slower than the others)
    "h3-lmtrain": {"model.name": "h3"},
    # The layout and conv init this file used before (kept to reproduce the old table)
    "based-4block": {
        "model.name": "based",
        "model.pattern": "CBCB",
        "model.n_layers": 4,
        "model.conv_init": "identity",
    },
}
# Zoology's TransformerBlock (attention, BASED, GLA, H3) adds LayerNorm(r) to the residual
# after each mixer: its Identity state mixer's norm2 output joins the residual in the next
# block (`model.state_norm`). The frontier's rows ran without it; these variants measure it.
for _m in ("based", "gla", "h3"):
    MODELS[f"{_m}-state-norm"] = {**MODELS[_m], "model.state_norm": True}
# Zoology's H3 as far as lmtrain expresses it: the state norm, and the shift SSM's own skip
# (ssm_k_D ~ N(0, 1), `model.shift_skip`). Still different: Zoology's q/k/v/out biases, and
# its LayerNorms before each mixer and at the end (lmtrain's RMSNorm).
MODELS["h3-exact"] = {**MODELS["h3-state-norm"], "model.shift_skip": True}
H3_ZOOLOGY = ("h3", "h3-state-norm", "h3-exact")
# arg -> ({model: widths}, learning rates, steps, seeds)
FRONTIER_64 = (
    "attention",
    "based",
    "gla",
    "retnet",
    "mamba2-d8",
    "mamba2-d16",
    "mamba2-d24",
    "h3",
    "hybrid-MA",
)
SWEEPS = {
    # The width-64 frontier sized for 2 CPU cores (~7 min a run alone): every family at 64k
    # training rows of Zoology's mixture (Zoology trains 32 epochs of ~180k examples), at
    # three of Zoology's learning rates; one seed. Sweeps resume, so it can run in parts.
    "frontier": ({m: (64,) for m in FRONTIER_64}, (1e-3, 3.2e-3, 1e-2), 1000, (0,)),
    # The second seed for the families of the side-by-side (the report averages the seeds of
    # a cell: `report runs/mqar-frontier runs/mqar-frontier-seed1`).
    "frontier-seed1": ({m: (64,) for m in ("gla", "mamba2-d8", "mamba2-d16", "mamba2-d24")},
                       (1e-3, 3.2e-3, 1e-2), 1000, (1,)),
    # With Zoology's state norm (`MODELS["h3-state-norm"]`), beside the frontier's seed-0 lr-1e-2
    # runs without it.
    "state-norm": ({f"{m}-state-norm": (64,) for m in ("h3", "gla", "based")}, (1e-2,), 1000,
                   (0,)),
    # Zoology's H3 with every term lmtrain has for it, at the frontier's budget and lrs.
    "h3-exact": ({"h3-exact": (64,)}, (1e-3, 3.2e-3, 1e-2), 1000, (0,)),
    # Width 128 for the families of the side-by-side, if time allows.
    "frontier-128": ({m: (128,) for m in ("based", "gla", "mamba2-d16")},
                     (1e-3, 3.2e-3, 1e-2), 1000, (0,)),
    # Beside Zoology's own code at the same budget (runs outside the repository: BENCHMARKS.md
    # "Recall frontier beside Zoology's code"): two seeds.
    # Zoology's optimiser there (its Trainer: torch AdamW, betas (0.9, 0.999), no clipping);
    # "side-by-side-lmtrain-optim" keeps lmtrain's defaults (b2 0.95, clip 1.0).
    "side-by-side": ({"mamba2-d16": (64,), "gla": (64,)}, (1e-2,), 1000, (0, 1)),
    "side-by-side-lmtrain-optim": ({"mamba2-d16": (64,), "gla": (64,)}, (1e-2,), 1000, (0,)),
    # Before / after the 2026-12-06 defaults on Zoology's data layout: lmtrain's old Mamba-2
    # beside "side-by-side-lmtrain-optim"'s, and BASED beside its echo-layout 96.60%.
    "defaults-check": ({"mamba2-lmtrain": (64,), "based": (64,)}, (1e-2,), 1000, (0,)),
    # The earlier frontier (lr 3e-3 and 1e-2; lmtrain's Mamba-2 layout)
    "frontier-2026-12-01": (
        {m: (64,) for m in ("based", "retnet", "gla", "mamba2-lmtrain", "hybrid-MA")},
        (3e-3, 1e-2), 1000, (0,),
    ),
    # The BASED-paper grid, for a GPU.
    "frontier-full": (
        {m: (64, 128, 256, 512) for m in MODELS
         if m not in ("based-4block", "mamba2-lmtrain", "h3-lmtrain")
         and not m.endswith(("-state-norm", "-exact"))},
        (1e-4, 4.6e-4, 2.2e-3, 1e-2), 3000, (0,),
    ),
    "smoke": ({"attention": (32,), "gla": (32,)}, (3e-3,), 4, (0,)),
}  # fmt: skip


VARIANTS = ("", "seq256", "guard", "smoke")


def get_config(arg: str = "") -> Config:
    """ "": the sanity point (attention, width 64, seq 64, 4 pairs); "seq256": the frontier's
    task and schedule around which the sweep varies model, width and lr; "guard": a one-minute
    run (seq 64, 4 pairs, vocab 512, lr 1e-2, 200 steps of 32) that the recall guard test
    (tests/test_mqar.py) trains the frontier's models on."""
    if arg not in VARIANTS:
        raise ValueError(f"unknown mqar variant {arg!r}; choose '', 'seq256' or 'smoke'")
    seq_len, pairs, batch, steps = {
        "": (64, 4, 64, 1500),
        "seq256": (256, 16, 64, 1000),
        "guard": (64, 4, 32, 200),
        "smoke": (32, 4, 8, 4),
    }[arg]
    cfg = Config(
        # Tied embeddings (as Zoology's models): copying a value's embedding to the output
        # then scores that value; untied, the head must learn 4096 value rows and the sanity
        # run stays near chance for 1500 steps (0.6% accuracy measured).
        model=ModelConfig(
            name="transformer", d_model=64, n_layers=2, n_heads=1, tie_embeddings=True
        ),
        data=DataConfig(
            source="mqar",
            seq_len=seq_len,
            mqar=MQARConfig(
                num_kv_pairs=pairs,
                val_examples=1000 if arg == "seq256" else 3000,
                # Zoology's training mixture at seq 256 (validation stays 256 / 16 pairs): rows
                # of 4 x (64, 4 pairs), 2 x (128, 8) or 1 x (256, 16) examples in turn. Without
                # it, attention was at 1.8% after 48k examples of 256 / 16 alone.
                train_lengths=(64, 128, 256) if arg == "seq256" else (),
            ),
        ),
        optim=OptimConfig(lr=3e-3, warmup_steps=min(50, steps // 10), weight_decay=0.1),
        train=TrainConfig(
            steps=steps,
            batch_size=batch,
            log_every=50 if steps > 50 else 2,
            eval_every=250 if steps > 250 else 0,
            checkpoint_every=0,
        ),
        eval=EvalConfig(batch_size=batch if arg != "smoke" else 8, max_batches=0),
    )
    if arg == "guard":
        guard = {
            "data.mqar.vocab": 512,
            "data.mqar.train_examples": 20_000,
            "data.mqar.val_examples": 256,
            "optim.lr": 1e-2,
            "optim.warmup_steps": 20,
            "train.eval_every": 0,
            "train.progress": False,
        }
        cfg = override(cfg, guard)
    return cfg


def model_sets(label: str, width: int) -> dict:
    sets = MODELS[label]
    inner = 2 * width if sets.get("model.linear_init") == "torch" else width  # Zoology's Mamba-2
    heads = max(1, inner // 64)  # unless the model fixes its heads (Zoology's GLA: 2)
    if label in H3_ZOOLOGY:  # Zoology's: head dim 2, d_state = shift taps = d_model / 4
        sets = {**sets, "model.state_size": width // 4, "model.conv_width": width // 4}
        heads = width // 2
    return {"model.n_heads": heads, **sets, "model.d_model": width}


def get_sweep(arg: str = "frontier") -> list[Config]:
    """Every (model, width, lr) of SWEEPS[arg] on the seq-256 / 16-pair task."""
    if arg not in SWEEPS:
        raise ValueError(f"unknown mqar sweep {arg!r}; choose from {sorted(SWEEPS)}")
    models, lrs, steps, seeds = SWEEPS[arg]
    base = get_config("smoke" if arg == "smoke" else "seq256")
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=steps))
    if arg == "side-by-side":
        base = override(base, ZOOLOGY_OPTIM)
    return [
        override(base, {**model_sets(label, w), "optim.lr": lr, "train.seed": seed})
        for label, widths in models.items()
        for w, lr, seed in itertools.product(widths, lrs, seeds)
    ]


# ------------------------------------------------------------------ Zoology's test mix

# Zoology's test slices (zoology/experiments/*/configs.py: seq len, pairs; 1,000 examples
# each). Its valid/accuracy pools every query of every slice (train.py's compute_accuracy), so
# the long slices weigh most: 256 of the 508 queries per example set are 1024 / 256's.
TEST_MIX = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))


def test_mix(workdir: Path, examples: int = 1000, slices=TEST_MIX) -> dict:
    """A trained run's accuracy on each of Zoology's test slices and pooled over their
    queries, from its newest checkpoint; written to WORKDIR/testmix.json (reused if there)."""
    from lmtrain import data
    from lmtrain import run as run_lib
    from lmtrain.evaluate import Evaluator

    out = workdir / "testmix.json"
    if out.is_file():
        got = json.loads(out.read_text())
        if got.get("slices") == [list(s) for s in slices] and got["examples"] == examples:
            return got
    accs, step = {}, None
    for seq_len, pairs in slices:
        sets = {
            "data.seq_len": seq_len,
            "data.mqar.num_kv_pairs": pairs,
            "data.mqar.val_examples": examples,
            "data.mqar.train_lengths": (),  # training's mixture: not read, but must fit
            "eval.batch_size": 16384 // seq_len,
        }
        run, params, step = run_lib.restore_params(workdir, sets)
        corpus = data.load_corpus(run.cfg.data, run.tokenizer)
        accs[f"{seq_len}/{pairs}"] = Evaluator(run, corpus.val)(params, 0)["val_acc"]
    pooled = sum(accs[f"{n}/{p}"] * p for n, p in slices) / sum(p for _, p in slices)
    got = {"step": step, "examples": examples, "slices": [list(s) for s in slices],
           "accuracy": accs, "pooled": pooled}  # fmt: skip
    out.write_text(json.dumps(got, indent=1) + "\n")
    return got


# ---------------------------------------------------------------------------- report


def _label(cfg: Config) -> str:
    """The MODELS label whose overrides `cfg` holds, the most specific if several do ("h3"'s
    are part of "h3-state-norm"'s); the model name if none."""
    found = [lab for lab, sets in MODELS.items()
             if all(config_value(cfg, k) == v for k, v in sets.items())]  # fmt: skip
    return max(found, key=lambda lab: len(MODELS[lab]), default=cfg.model.name)


def config_value(cfg: Config, key: str):
    return flat(cfg).get(key)


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run directory with a config and an eval: model, width, lr, accuracy,
    state floats, params. A .jsonl file instead of a directory holds rows `rows` wrote
    earlier (runs whose directories are gone: BENCHMARKS.md's frontier is kept that way)."""
    from lmtrain.config import load_json

    if sweep_dir.suffix == ".jsonl" and sweep_dir.is_file():
        return [json.loads(line) for line in sweep_dir.read_text().splitlines() if line.strip()]
    rows = []
    for run in sorted(p for p in sweep_dir.iterdir() if (p / "config.json").is_file()):
        if not (run / "metrics.jsonl").is_file():  # a run still starting: nothing measured yet
            continue
        cfg = load_json(run / "config.json")
        evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "val_acc" in r]  # fmt: skip
        if not evals:
            continue
        last = evals[-1]
        mix = run / "testmix.json"
        rows.append({
            "model": _label(cfg), "width": cfg.model.d_model, "lr": cfg.optim.lr,
            "step": last["step"], "steps": cfg.train.steps, "val_acc": last["val_acc"],
            "state_floats": cfg.model.state_floats(cfg.data.seq_len), "run": run.name,
            "seed": cfg.train.seed,
            "mix": json.loads(mix.read_text()) if mix.is_file() else None,
        })  # fmt: skip
    return rows


def best_per_cell(rows: list[dict]) -> list[dict]:
    """For every (model, width) the learning rate with the highest accuracy averaged over its
    seeds: finished runs first; a cell with none shows its best unfinished runs (the report
    prints the step). Each row gets "seeds" (how many runs the mean is over) and "accs"."""
    by_lr: dict[tuple, list[dict]] = {}
    for r in rows:
        by_lr.setdefault((r["model"], r["width"], r["lr"]), []).append(r)
    best: dict[tuple, dict] = {}
    for (model, width, _), runs in by_lr.items():
        done = [r for r in runs if r["step"] >= r["steps"]]
        use = done or runs
        cell = {**use[0], "val_acc": sum(r["val_acc"] for r in use) / len(use),
                "step": min(r["step"] for r in use), "seeds": len(use),
                "accs": [r["val_acc"] for r in use]}  # fmt: skip
        rank = lambda x: (x["step"] >= x["steps"], x["val_acc"])
        if (model, width) not in best or rank(cell) > rank(best[(model, width)]):
            best[(model, width)] = cell
    return sorted(best.values(), key=lambda r: (r["model"], r["width"]))


def family(label: str) -> str:
    """The plot's line: Mamba-2's state sizes are one family."""
    return label.partition("-d")[0] if label.startswith("mamba2-d") else label


def _best_mix(cell: list[dict]) -> tuple[float, list[dict]] | None:
    """(lr, its runs) with the highest test-mix accuracy pooled over queries, mean over seeds,
    among a cell's finished runs that have one (`test_mix`); None if none has."""
    done = [r for r in cell if r["mix"] and r["step"] >= r["steps"]]
    by_lr: dict[float, list[dict]] = {}
    for r in done:
        by_lr.setdefault(r["lr"], []).append(r)
    if not by_lr:
        return None
    return max(by_lr.items(), key=lambda kv: sum(r["mix"]["pooled"] for r in kv[1]) / len(kv[1]))


def _mix_cell(cell: list[dict]) -> str:
    best = _best_mix(cell)
    if best is None:
        return "-"
    lr, runs = best
    return f"{100 * sum(r['mix']['pooled'] for r in runs) / len(runs):.1f}% (lr {lr:g})"


def _mix_table(best: list[dict], rows: list[dict]) -> str:
    """Per-slice accuracy of each cell's best test-mix learning rate (mean over seeds)."""
    lines = []
    for b in best:
        cell = [r for r in rows if (r["model"], r["width"]) == (b["model"], b["width"])]
        got = _best_mix(cell)
        if got is None:
            continue
        lr, runs = got
        names = list(runs[0]["mix"]["accuracy"])
        if not lines:
            lines = ["", "Zoology's test mix (1,000 examples a slice; pooled = its valid/accuracy,"
                     " every query of every slice):", "",
                     "| model | width | lr | " + " | ".join(names) + " | pooled |",
                     "|---|---|---|" + "---|" * (len(names) + 1)]  # fmt: skip
        means = [sum(r["mix"]["accuracy"][k] for r in runs) / len(runs) for k in names]
        pooled = sum(r["mix"]["pooled"] for r in runs) / len(runs)
        lines.append(f"| {b['model']} | {b['width']} | {lr:g} | "
                     + " | ".join(f"{100 * m:.1f}" for m in means)
                     + f" | {100 * pooled:.1f} |")  # fmt: skip
    return "\n".join(lines) + ("\n" if lines else "")


def report(sweep_dir: str, *more: str) -> str:
    """Writes SWEEP_DIR/mqar_frontier.md (+ .png with matplotlib) over the runs of SWEEP_DIR
    and of `more` sweep directories; returns the markdown."""
    sweep = Path(sweep_dir)
    if sweep.suffix == ".jsonl":
        raise SystemExit(f"report writes into its first argument, a directory, not {sweep}")
    sweep.mkdir(parents=True, exist_ok=True)  # a new one to report stored rows alone
    rows = all_rows(sweep_dir, *more)
    if not rows:
        raise SystemExit(f"no evaluated MQAR runs under {sweep}")
    best = best_per_cell(rows)
    lines = [
        "| model | width | state floats / seq | best lr | val accuracy (mean) | seeds | "
        "at step | every lr tried: accuracy | Zoology's test mix, best lr |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in best:
        cell = [r for r in rows if (r["model"], r["width"]) == (b["model"], b["width"])]
        tried = "; ".join(
            f"{lr:g}: " + "/".join(f"{100 * r['val_acc']:.1f}" for r in cell if r["lr"] == lr)
            for lr in sorted({r["lr"] for r in cell})
        )
        accs = "/".join(f"{100 * a:.2f}" for a in b["accs"])
        lines.append(
            f"| {b['model']} | {b['width']} | {b['state_floats']:,} | {b['lr']:g} | "
            f"{100 * b['val_acc']:.2f}% ({accs}) | {b['seeds']} | {b['step']}/{b['steps']} | "
            f"{tried} | {_mix_cell(cell)} |"
        )
    text = "\n".join(lines) + "\n" + _mix_table(best, rows)
    (sweep / "mqar_frontier.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed", file=sys.stderr)
        return text
    _plot(plt, [(b, b["val_acc"]) for b in best], "MQAR accuracy (seq 256, 16 pairs)",
          sweep / "mqar_frontier.png")  # fmt: skip
    mixed = []
    for b in best:
        got = _best_mix([r for r in rows if (r["model"], r["width"]) == (b["model"], b["width"])])
        if got is not None:
            mixed.append((b, sum(r["mix"]["pooled"] for r in got[1]) / len(got[1])))
    if mixed:
        published = [(b, ZOOLOGY_PUBLISHED[b["model"]]) for b in best
                     if b["width"] == 64 and b["model"] in ZOOLOGY_PUBLISHED]  # fmt: skip
        _plot(plt, mixed, "accuracy on Zoology's test mix (pooled)",
              sweep / "mqar_frontier_testmix.png", published)  # fmt: skip
    return text


# Zoology's README figure (accuracy on its test mix against state size, after its full budget
# of 32 epochs), read off the plot by eye at d_model 64: approximate, to +-0.03.
ZOOLOGY_PUBLISHED = {"gla": 0.53, "mamba2-d8": 0.52, "mamba2-d16": 0.69, "mamba2-d24": 0.73}


def _plot(plt, points: list, ylabel: str, path: Path, published=()) -> None:
    """Accuracy against decode state, one line per family; `published`: (cell, accuracy) of
    Zoology's figure, drawn as crosses at lmtrain's state size of the same model."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for fam in sorted({family(b["model"]) for b, _ in points}):
        pts = sorted((b["state_floats"], acc) for b, acc in points if family(b["model"]) == fam)
        ax.plot(*zip(*pts, strict=True), marker="o", label=fam)
    if published:
        xs, ys = zip(*((b["state_floats"], acc) for b, acc in published), strict=True)
        ax.scatter(xs, ys, marker="x", color="black", label="Zoology's figure (read off)")
    ax.set_xscale("log")
    ax.set_xlabel("decode state (floats per sequence)")
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")  # off the points
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def all_rows(*sources: str) -> list[dict]:
    """`collect` over sweep directories and .jsonl files; a run named twice keeps its first
    row (list the live sweep directory first: its runs may have a test mix by now)."""
    rows: dict[str, dict] = {}
    for d in sources:
        if not Path(d).exists():
            raise SystemExit(f"no sweep directory or rows file {d}")
        for r in collect(Path(d)):
            rows.setdefault(r["run"], r)
    return list(rows.values())


def test_mix_all(*sweep_dirs: str) -> None:
    """`test_mix` for every finished run (result.json) of the sweep directories."""
    for d in sweep_dirs:
        if not Path(d).is_dir():
            raise SystemExit(f"no sweep directory {d}")
        for run in sorted(p for p in Path(d).iterdir() if (p / "result.json").is_file()):
            got = test_mix(run)
            print(f"{run.name}: pooled {100 * got['pooled']:.2f}%", flush=True)


USAGE = """usage: python experiments/mqar.py report SWEEP_DIR [MORE_DIRS_OR_ROWS.jsonl...]
       python experiments/mqar.py testmix SWEEP_DIR [MORE_DIRS...]   (then report)
       python experiments/mqar.py rows SWEEP_DIR [MORE_DIRS_OR_ROWS.jsonl...] > ROWS.jsonl"""

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("report", "testmix", "rows"):
        raise SystemExit(USAGE)
    if sys.argv[1] == "testmix":
        test_mix_all(*sys.argv[2:])
    elif sys.argv[1] == "rows":  # what report reads, kept beyond the run directories
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in all_rows(*sys.argv[2:])))
    else:
        print(report(sys.argv[2], *sys.argv[3:]))
