"""MQAR (multi-query associative recall): the sanity point and the recall-vs-state frontier.

lmtrain train experiments/mqar.py                # attention, width 64, seq 64, 4 pairs (~4 min)
lmtrain sweep experiments/mqar.py:frontier --dir runs/mqar --parallel 2
python experiments/mqar.py report runs/mqar      # table + plot: accuracy vs state

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
# label -> overrides of the 2-layer model; heads keep head dim 64 where the family has heads
MODELS = {
    # Zoology's attention baseline puts a short convolution before attention; Primer's
    # width-3 depthwise q/k/v convolution is ours.
    "attention": {"model.name": "transformer", "model.qkv_conv": 3},
    "based": {"model.name": "based", "model.pattern": "CB", **ZOOLOGY},
    "retnet": {"model.name": "retnet", "model.pattern": "CR", **ZOOLOGY},
    "gla": {"model.name": "gla", "model.pattern": "CG", "model.n_heads": 2, **ZOOLOGY},
    "mamba2": {"model.name": "mamba2"},  # Zoology: plain Mamba-2 blocks, no BaseConv
    "hybrid-MA": {"model.name": "hybrid", "model.pattern": "MA"},  # Mamba-2 then attention
    # The layout and conv init this file used before (kept to reproduce the old table)
    "based-4block": {
        "model.name": "based",
        "model.pattern": "CBCB",
        "model.n_layers": 4,
        "model.conv_init": "identity",
    },
}
# arg -> ({model: widths}, learning rates, steps)
SWEEPS = {
    # 2 CPU cores (~10 min a run alone): every sub-quadratic family at width 64, 64k training
    # rows each (Zoology trains 32 epochs of ~180k examples), at lr 3e-3 and 1e-2; attention
    # (unchanged, 99.97% at 3e-3) is in "attention".
    "frontier": (
        {m: (64,) for m in ("based", "retnet", "gla", "mamba2", "hybrid-MA")},
        (3e-3, 1e-2),
        1000,
    ),
    "attention": (
        {"attention": (64,)},
        (3e-3, 1e-2),
        1000,
    ),
    # The BASED-paper grid, for a GPU.
    "frontier-full": (
        {m: (64, 128, 256, 512) for m in MODELS if m != "based-4block"},
        (1e-4, 4.6e-4, 2.2e-3, 1e-2),
        3000,
    ),
    "smoke": ({"attention": (32,), "gla": (32,)}, (3e-3,), 4),
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
    heads = max(1, width // 64)  # unless the model fixes its heads (Zoology's GLA: 2)
    return {"model.n_heads": heads, **MODELS[label], "model.d_model": width}


def get_sweep(arg: str = "frontier") -> list[Config]:
    """Every (model, width, lr) of SWEEPS[arg] on the seq-256 / 16-pair task."""
    if arg not in SWEEPS:
        raise ValueError(f"unknown mqar sweep {arg!r}; choose from {sorted(SWEEPS)}")
    models, lrs, steps = SWEEPS[arg]
    base = get_config("smoke" if arg == "smoke" else "seq256")
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, steps=steps))
    return [
        override(base, {**model_sets(label, w), "optim.lr": lr})
        for label, widths in models.items()
        for w, lr in itertools.product(widths, lrs)
    ]


# ---------------------------------------------------------------------------- report


def _label(cfg: Config) -> str:
    for label, sets in MODELS.items():
        if all(config_value(cfg, k) == v for k, v in sets.items()):
            return label
    return cfg.model.name


def config_value(cfg: Config, key: str):
    return flat(cfg).get(key)


def collect(sweep_dir: Path) -> list[dict]:
    """One row per run directory with a config and an eval: model, width, lr, accuracy,
    state floats, params."""
    from lmtrain.config import load_json

    rows = []
    for run in sorted(p for p in sweep_dir.iterdir() if (p / "config.json").is_file()):
        cfg = load_json(run / "config.json")
        evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                 if "val_acc" in r]  # fmt: skip
        if not evals:
            continue
        last = evals[-1]
        rows.append({
            "model": _label(cfg), "width": cfg.model.d_model, "lr": cfg.optim.lr,
            "step": last["step"], "steps": cfg.train.steps, "val_acc": last["val_acc"],
            "state_floats": cfg.model.state_floats(cfg.data.seq_len), "run": run.name,
        })  # fmt: skip
    return rows


def best_per_cell(rows: list[dict]) -> list[dict]:
    """The run with the highest accuracy for every (model, width): finished runs first; a cell
    with none shows its best unfinished run (the report prints its step)."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["model"], r["width"])
        rank = lambda x: (x["step"] >= x["steps"], x["val_acc"])
        if key not in best or rank(r) > rank(best[key]):
            best[key] = r
    return sorted(best.values(), key=lambda r: (r["model"], r["width"]))


def report(sweep_dir: str, *more: str) -> str:
    """Writes SWEEP_DIR/mqar_frontier.md (+ .png with matplotlib) over the runs of SWEEP_DIR
    and of `more` sweep directories; returns the markdown."""
    sweep = Path(sweep_dir)
    rows = [r for d in (sweep_dir, *more) for r in collect(Path(d))]
    if not rows:
        raise SystemExit(f"no evaluated MQAR runs under {sweep}")
    best = best_per_cell(rows)
    lines = [
        "| model | width | state floats / seq | best lr | val accuracy | at step | lrs tried |",
        "|---|---|---|---|---|---|---|",
    ]
    for b in best:
        tried = sorted(
            r["lr"] for r in rows if (r["model"], r["width"]) == (b["model"], b["width"])
        )
        lines.append(
            f"| {b['model']} | {b['width']} | {b['state_floats']:,} | {b['lr']:g} | "
            f"{100 * b['val_acc']:.2f}% | {b['step']}/{b['steps']} | "
            f"{', '.join(f'{x:g}' for x in tried)} |"
        )
    text = "\n".join(lines) + "\n"
    (sweep / "mqar_frontier.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed", file=sys.stderr)
        return text
    fig, ax = plt.subplots(figsize=(6, 4))
    for model in sorted({b["model"] for b in best}):
        pts = sorted((b["state_floats"], b["val_acc"]) for b in best if b["model"] == model)
        ax.plot(*zip(*pts, strict=True), marker="o", label=model)
    ax.set_xscale("log")
    ax.set_xlabel("decode state (floats per sequence)")
    ax.set_ylabel("MQAR accuracy (seq 256, 16 pairs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(sweep / "mqar_frontier.png", dpi=120)
    return text


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "report":
        raise SystemExit("usage: python experiments/mqar.py report SWEEP_DIR [MORE_DIRS...]")
    print(report(sys.argv[2], *sys.argv[3:]))
