"""Experiment configuration: frozen dataclasses, experiment files and `--set` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import json
import typing
from pathlib import Path
from typing import Any

from lmtrain import models
from lmtrain.config_values import coerce as _coerce
from lmtrain.config_values import (  # noqa: F401  (lmtrain.config.parse_sets, .flat_dict)
    flat_dict,
    parse_sets,
    read_mapping,
)
from lmtrain.errors import ConfigError, check
from lmtrain.models import hybrid
from lmtrain.models.base import ModelConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "DecomposeConfig",
    "EvalConfig",
    "MQARConfig",
    "MeshConfig",
    "MixtureComponent",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
]


@dataclasses.dataclass(frozen=True)
class DecomposeConfig:
    """data.decompose.*: dataset decomposition (lmtrain/data/decompose.py), used when
    data.packing = "decompose": documents cut into 2^k-token chunks, min_log2_len <= k <=
    max_log2_len; each step takes train.tokens_per_step tokens from one bucket."""

    min_log2_len: int = 8
    max_log2_len: int = 13
    curriculum: str = "grow_p2"  # uniform | grow_p2 | shrink (odds per bucket)
    cycles: int = 1  # curriculum restarts per pass over the decomposed data
    # Documents over 2^(max+1) targets: random power-of-two pieces, short ones favoured (the
    # released make_dd_buckets.py's default), or false: as many 2^max pieces as fit.
    randomize: bool = True


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """data.mqar.*: the synthetic recall task, used when data.source = "mqar" (everything about
    it lives in lmtrain/data/mqar.py; data.tokenizer does not apply)."""

    num_kv_pairs: int = 16  # key-value pairs per example, each queried once
    vocab: int = 8192  # keys from [1, V/2), values from [V/2, V)
    power_a: float = 0.01  # query gap g drawn with odds a (g + 1)^(a - 1)
    train_examples: int = 100_000
    val_examples: int = 3_000
    seed: int = 0
    # Training mixture (Zoology's BASED-paper recipe): example lengths packed into training rows,
    # e.g. (64, 128, 256) at seq_len 256 / 16 pairs: rows of 4 examples of 64 tokens / 4 pairs,
    # 2 of 128 / 8 and 1 of 256 / 16, in turn (documents masked). () = seq_len only.
    # Validation is always seq_len / num_kv_pairs.
    train_lengths: tuple[int, ...] = ()
    # Query-region layout. Zoology's (the default): the slot after each query key holds a random
    # id like every other non-query slot (random_non_queries=False: zeros, Zoology's option).
    # echo_values=True is lmtrain's layout before 2026-12-06: each query key's value also
    # follows it in the inputs (it is never a scored target there).
    random_non_queries: bool = True
    echo_values: bool = False


@dataclasses.dataclass(frozen=True)
class MixtureComponent:
    """data.mixture.NAME.*: one corpus of a mixture (lmtrain/data/mixture.py)."""

    source: str = ""  # anything data.source takes but a synthetic task
    # Relative weight (normalised over the components), or stages ((first step, weight), ...)
    # starting at step 0, as Levanter's train_weights. With data.mixture_weighting="tokens" it
    # multiplies the component's training tokens.
    weight: float | tuple[tuple[int, float], ...] = 1.0
    # Passes over its training split after which it leaves the mixture (data.mixture_exhausted);
    # 0: no limit (it starts a new epoch, in a new order, whenever it runs out).
    max_epochs: float = 0.0
    # A unique-token budget (experiments/repetition.py): train on a fixed random subset of N
    # tokens (whole rows) of its training split, the same for every train.seed; 0: all of them.
    unique_tokens: int = 0


PACKINGS = ("concat", "decompose")
WEIGHTINGS = ("given", "tokens")  # data.mixture_weighting
EXHAUSTED = ("renormalise", "stop")  # data.mixture_exhausted
RESTORE_MODES = ("all", "params")  # train.restore
CURRICULA = ("uniform", "grow_p2", "shrink")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    # "stdlib" or "stdlib-prose" (embedded corpora); a corpus file, directory or glob (.txt,
    # .jsonl, .json, .parquet, each optionally .gz/.zst/.xz/.bz2: lmtrain/data/formats.py); a
    # directory written by `lmtrain prepare`; or a synthetic task ("mqar")
    source: str = "stdlib"
    seq_len: int = 256
    # "bytes" | "bpe:N" (trained on the train split) | tokenizer.json or sentencepiece .model |
    # a directory holding one | a local-cache HF hub name; "" = a prepared dir's own, else bpe:4096
    tokenizer: str = ""
    val_fraction: float = 0.05
    text_key: str = "text"  # field holding the text in .jsonl records
    cache_dir: str = ""  # tokenizers and tokenised corpora; "" means ~/.cache/lmtrain
    prefetch: int = 2  # batches prepared ahead by grain's reader threads
    # "concat": concat-and-chunk rows of seq_len with document masking. "decompose": dataset
    # decomposition (data.decompose.*); data.seq_len is then only the main evaluation's context.
    packing: str = "concat"
    decompose: DecomposeConfig = dataclasses.field(default_factory=DecomposeConfig)
    mqar: MQARConfig = dataclasses.field(default_factory=MQARConfig)
    # Named corpora read at chosen weights, {name: MixtureComponent} (held as (name, component)
    # pairs); data.source is then unused. () = data.source alone. In a file:
    # data: {mixture: {code: {source: DIR, weight: 0.7}, prose: {source: stdlib-prose, ...}}}
    mixture: tuple[tuple[str, MixtureComponent], ...] = ()
    mixture_weighting: str = "given"  # given | tokens (weight x the component's train tokens)
    # A component reaching max_epochs: "renormalise" the others' weights, or "stop" the run.
    mixture_exhausted: str = "renormalise"

    def __post_init__(self):
        object.__setattr__(self, "mixture", mixture_pairs(self.mixture))

    def components(self) -> dict[str, MixtureComponent]:
        return dict(self.mixture)


def mixture_pairs(value: Any) -> tuple[tuple[str, MixtureComponent], ...]:
    """data.mixture as (name, component) pairs from a mapping or pairs of components or dicts."""
    items = value.items() if isinstance(value, dict) else value
    out = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise ConfigError(f"data.mixture must map names to components, got {value!r}")
        name, comp = item
        if isinstance(comp, dict):
            unknown = set(comp) - {f.name for f in dataclasses.fields(MixtureComponent)}
            if unknown:
                raise ConfigError(
                    f"data.mixture.{name}: unknown key {sorted(unknown)[0]!r}; a component "
                    "takes source, weight, max_epochs, unique_tokens"
                )
            hints = typing.get_type_hints(MixtureComponent)
            comp = MixtureComponent(
                **{k: _coerce(v, hints[k], f"data.mixture.{name}.{k}") for k, v in comp.items()}
            )
        if not isinstance(comp, MixtureComponent):
            raise ConfigError(f"data.mixture.{name} must be a component, got {comp!r}")
        out.append((str(name), comp))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: str = "adamw"  # adamw | lion | muon (Muon on hidden matrices, AdamW on the rest)
    lr: float = 3e-3
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    schedule: str = "cosine"  # cosine | wsd | constant (all with linear warmup)
    warmup_steps: int = 100
    final_lr_frac: float = 0.1  # cosine/wsd end at this fraction of the peak
    decay_frac: float = 0.2  # wsd: the final fraction of steps spent decaying
    clip_norm: float = 1.0  # 0 disables global-norm clipping
    z_loss: float = 0.0  # PaLM z-loss coefficient (1e-4 is typical)
    # muon: AdamW (embeddings, head, norms, biases, SSM) at adam_lr_ratio x lr (Muon's lr);
    # muon_consistent_rms 0: optax's width scaling sqrt(max(1, fan_out / fan_in)) instead.
    adam_lr_ratio: float = 0.1
    muon_beta: float = 0.95
    muon_nesterov: bool = True
    muon_consistent_rms: float = 0.0


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # (data, fsdp, tensor, sequence); one -1 means "the rest". Three numbers (the layout before
    # the sequence axis) mean sequence = 1.
    shape: tuple[int, ...] = (-1, 1, 1, 1)

    def __post_init__(self):
        if len(self.shape) not in (3, 4):
            raise ConfigError(
                f"mesh.shape needs 4 entries (data, fsdp, tensor, sequence), or 3 with "
                f"sequence 1; got {tuple(self.shape)}"
            )
        if len(self.shape) == 3:
            object.__setattr__(self, "shape", (*self.shape, 1))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global sequences per optimizer step
    # Tokens per optimizer step; 0: batch_size x data.seq_len (concat) or batch_size x
    # 2^max_log2_len (decompose). Set, it fixes the batch size: tokens_per_step / seq_len.
    tokens_per_step: int = 0
    grad_accum: int = 1  # micro-batches per step (batch_size must divide evenly)
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200  # 0: only at the end
    checkpoint_every: int = 200  # 0: only at the end (and on SIGINT/SIGTERM)
    keep_checkpoints: int = 3
    # "all": resume the whole state; "params": parameters, step and data position, with a fresh
    # optimizer state where the saved one is another optimizer's (switching optimizers).
    restore: str = "all"
    progress: bool = True  # show a progress bar on process 0
    # A run that makes no progress (step, eval batch, checkpoint) for this long exits with an
    # error instead of hanging, e.g. when another process died inside a collective. 0: never.
    hang_timeout_s: int = 300
    # Cross-entropy over chunks of this many positions per row, each chunk's logits recomputed
    # in the backward pass, so the full [batch, length, vocab] logits never exist at once
    # (large vocabularies); 0: all positions at once.
    loss_chunk: int = 0
    # (first step, number of steps) to trace with jax.profiler into WORKDIR/profile
    # (TensorBoard's profile plugin or Perfetto read it); (0, 0): no trace.
    profile_steps: tuple[int, int] = (0, 0)
    profile_process: int = 0  # which process traces; -1: every process
    # W&B (wandb extra): the TensorBoard scalars and the config; "" = off; resumes continue the run
    wandb_project: str = ""
    wandb_entity: str = ""
    wandb_run_name: str = ""  # "": the workdir's name


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 32  # global sequences per eval batch
    max_batches: int = 20  # 0: the whole validation split
    # Extra contexts to evaluate at (val_loss@L, same tokens per eval batch); () with
    # data.packing="decompose" means every bucket length 2^min .. 2^max.
    lengths: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)

    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step (the same for every step, in both packings)."""
        if self.train.tokens_per_step:
            return self.train.tokens_per_step
        longest = self.data.seq_len
        if self.data.packing == "decompose":
            longest = 1 << self.data.decompose.max_log2_len
        return self.train.batch_size * longest

    def train_tokens(self) -> int:
        """Training tokens of the whole run, D = train.steps x tokens_per_step()."""
        return self.train.steps * self.tokens_per_step()

    def train_lengths(self) -> list[int]:
        """Sequence length of every training step shape, shortest first."""
        d = self.data
        if d.packing == "decompose":
            return [1 << k for k in range(d.decompose.min_log2_len, d.decompose.max_log2_len + 1)]
        return [d.seq_len]

    def train_shapes(self) -> list[tuple[int, int]]:
        """(global batch, seq_len) of every training step shape, shortest first."""
        return [(self.tokens_per_step() // n, n) for n in self.train_lengths()]

    def eval_lengths(self) -> tuple[int, ...]:
        """Contexts for the per-length evaluation (see EvalConfig.lengths)."""
        if self.eval.lengths or self.data.packing != "decompose":
            return self.eval.lengths
        return tuple(self.train_lengths())

    def validate(self) -> Config:
        """Checks fields and relations between them; returns self so calls chain.

        Source-specific checks (a synthetic task's own fields) are the data layer's:
        `lmtrain.data.check_config`.
        """
        t, d, o = self.train, self.data, self.optim
        self.model.validate()
        check(o.name in OPTIMIZER_NAMES, "optim.name", _unknown(o.name, OPTIMIZER_NAMES))
        check(o.schedule in SCHEDULE_NAMES, "optim.schedule", _unknown(o.schedule, SCHEDULE_NAMES))
        check(d.packing in PACKINGS, "data.packing", f"must be one of {', '.join(PACKINGS)}")
        check(t.tokens_per_step >= 0, "train.tokens_per_step", "must be >= 0")
        check(t.restore in RESTORE_MODES, "train.restore", _unknown(t.restore, RESTORE_MODES))
        check(all(n > 0 for n in self.eval.lengths), "eval.lengths", "must be positive")
        check(d.seq_len > 0, "data.seq_len", "must be positive")
        if d.mixture:
            self._validate_mixture()
        if d.packing == "decompose":
            self._validate_decompose()
        else:
            check(
                self.tokens_per_step() % d.seq_len == 0,
                "train.tokens_per_step",
                f"must be a multiple of data.seq_len ({d.seq_len})",
            )
        check(t.steps > 0, "train.steps", "must be positive")
        check(t.batch_size > 0, "train.batch_size", "must be positive")
        check(t.grad_accum > 0, "train.grad_accum", "must be positive")
        check(t.loss_chunk >= 0, "train.loss_chunk", "must be >= 0 (0: no chunks)")
        lengths = {*self.train_lengths(), d.seq_len, *self.eval_lengths()}
        check(
            not t.loss_chunk or all(n <= t.loss_chunk or n % t.loss_chunk == 0 for n in lengths),
            "train.loss_chunk",
            f"must divide every sequence length longer than it ({sorted(lengths)})",
        )
        check(min(t.profile_steps) >= 0, "train.profile_steps", "must be (first step, count)")
        smallest = min(b for b, _ in self.train_shapes())
        check(
            smallest % t.grad_accum == 0,
            "train.grad_accum",
            f"must divide the batch size ({smallest} sequences per step)",
        )
        check(0.0 <= d.val_fraction < 1.0, "data.val_fraction", "must be in [0, 1)")
        check(o.lr > 0, "optim.lr", "must be positive")
        check(  # a typo is refused even where the value is unused (packing="concat")
            d.decompose.curriculum in CURRICULA,
            "data.decompose.curriculum",
            f"must be one of {', '.join(CURRICULA)}",
        )
        check(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check(list(self.mesh.shape).count(-1) <= 1, "mesh.shape", "allows at most one -1")
        n = self.mesh.shape[-1]  # every row, of every bucket, is split: none is kept whole
        check(
            n < 2 or all(k % n == 0 for k in lengths),
            "mesh.shape",
            f"splits every row in {n} along its length (sequence axis), but not every sequence "
            f"length is a multiple of {n}: {sorted(lengths)}"
            + (" (raise data.decompose.min_log2_len)" if d.packing == "decompose" else ""),
        )
        return self

    def _validate_mixture(self) -> None:
        d = self.data
        check(
            d.mixture_weighting in WEIGHTINGS, "data.mixture_weighting",
            _unknown(d.mixture_weighting, WEIGHTINGS),
        )  # fmt: skip
        check(
            d.mixture_exhausted in EXHAUSTED, "data.mixture_exhausted",
            _unknown(d.mixture_exhausted, EXHAUSTED),
        )  # fmt: skip
        check(d.source == "stdlib", "data.source", "is unused with data.mixture: set one of them")
        for name, c in d.mixture:
            key = f"data.mixture.{name}"
            check(name.isidentifier(), key, "needs a name of letters, digits and _")
            check(bool(c.source), f"{key}.source", "must be set (a corpus path, stdlib, hf:...)")
            check(c.source != "mqar", f"{key}.source", "cannot be a synthetic task")
            check(c.max_epochs >= 0, f"{key}.max_epochs", "must be >= 0 (0: no limit)")
            check(c.unique_tokens >= 0, f"{key}.unique_tokens", "must be >= 0 (0: all)")
            stages = mixture_stages(c.weight)
            if d.packing == "decompose":  # lmtrain/data/decompose_mixture.py
                dd = "with data.packing='decompose' (a concat-and-chunk option)"
                check(len(stages) == 1, f"{key}.weight", f"cannot have stages {dd}")
                check(c.max_epochs == 0, f"{key}.max_epochs", f"must be 0 {dd}")
                check(c.unique_tokens == 0, f"{key}.unique_tokens", f"must be 0 {dd}")
            check(
                stages[0][0] == 0
                and all(a[0] < b[0] for a, b in zip(stages, stages[1:], strict=False)),
                f"{key}.weight",
                "stages must start at step 0 with ascending steps: ((0, w0), (step, w1), ...)",
            )
            check(
                all(w >= 0 and w < float("inf") for _, w in stages),
                f"{key}.weight",
                f"must be finite and >= 0, got {c.weight!r}",
            )
        starts = sorted({s for _, c in d.mixture for s, _ in mixture_stages(c.weight)})
        for step in starts:
            check(
                any(_weight_at(c.weight, step) > 0 for _, c in d.mixture),
                "data.mixture",
                f"every component's weight is 0 at step {step}: give one a positive weight",
            )

    def _validate_decompose(self) -> None:
        dc = self.data.decompose
        check(
            0 <= dc.min_log2_len <= dc.max_log2_len <= 24,
            "data.decompose.min_log2_len",
            f"must satisfy 0 <= min_log2_len <= max_log2_len <= 24 (got {dc.min_log2_len}, "
            f"{dc.max_log2_len})",
        )
        check(dc.cycles >= 1, "data.decompose.cycles", "must be >= 1")
        longest = 1 << dc.max_log2_len
        check(
            self.tokens_per_step() % longest == 0,
            "train.tokens_per_step",
            f"must be a multiple of 2^data.decompose.max_log2_len = {longest} "
            f"(got {self.tokens_per_step()})",
        )


def mixture_stages(weight: Any) -> list[tuple[int, float]]:
    """A component weight as stages [(first step, weight), ...]."""
    if isinstance(weight, (int, float)):
        return [(0, float(weight))]
    return [(int(s), float(w)) for s, w in weight] or [(0, 0.0)]


def _weight_at(weight: Any, step: int) -> float:
    return [w for s, w in mixture_stages(weight) if s <= step][-1]


# lmtrain.optim's registries (it checks at import that they are exactly these names)
OPTIMIZER_NAMES = ("adamw", "lion", "muon")
SCHEDULE_NAMES = ("cosine", "wsd", "constant")


def _unknown(value: str, known) -> str:
    return f"{value!r} is unknown; valid: {', '.join(known)}"


# ---------------------------------------------------------------------------- model families


def _retype_model(model: ModelConfig, name: str) -> ModelConfig:
    """Rebuilds `model` as family `name`'s Config, keeping the fields both have."""
    cls = models.family(name).Config
    names = {f.name for f in dataclasses.fields(cls)}
    kept = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name in names}
    kept["name"] = name
    return cls(**kept)


# ---------------------------------------------------------------------------- overrides


# Keys that moved into a section: config files written before still load (from_dict maps
# them); `--set` with an old key names the new one.
MOVED = {
    **{f"data.{k}": f"data.decompose.{k}" for k in ("min_log2_len", "max_log2_len", "curriculum")},
    "data.cycles": "data.decompose.cycles",
    "data.num_kv_pairs": "data.mqar.num_kv_pairs",
    **{
        f"data.mqar_{k}": f"data.mqar.{k}"
        for k in ("vocab", "power_a", "train_examples", "val_examples", "seed", "train_lengths")
    },
}


def _closest(key: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _leaves(obj: Any, prefix: str) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (value, annotation)} of every non-section field under dataclass `obj`."""
    out = {}
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if key == "data.mixture":  # one section per component: data.mixture.NAME.weight
            for name, comp in value:
                out.update(_leaves(comp, f"{key}.{name}."))
        elif dataclasses.is_dataclass(value):
            out.update(_leaves(value, key + "."))
        else:
            out[key] = (value, hints[f.name])
    return out


def all_keys(cfg: Config) -> list[str]:
    """Every dotted key `--set` accepts for this config (sections: data.decompose.cycles)."""
    return list(_leaves(cfg, ""))


def flat(cfg: Config) -> dict[str, Any]:
    """{dotted key: value} of every field (what resume and sweep checks compare)."""
    return {k: v for k, (v, _) in _leaves(cfg, "").items()}


def _replace(obj: Any, path: list[str], value: Any) -> Any:
    """`obj` with the field at `path` (a list of names through nested sections) set."""
    head, *rest = path
    if isinstance(obj, DataConfig) and head == "mixture" and rest:
        comps = obj.components()
        name, field = rest
        comps[name] = dataclasses.replace(comps.get(name, MixtureComponent()), **{field: value})
        return dataclasses.replace(obj, mixture=mixture_pairs(comps))
    new = _replace(getattr(obj, head), rest, value) if rest else value
    return dataclasses.replace(obj, **{head: new})


def _unknown_key(cfg: Config, key: str) -> ConfigError:
    if key in MOVED:
        return ConfigError(f"config key {key!r} is now {MOVED[key]!r}")
    section, _, field = key.partition(".")
    if section == "model" and cfg.model.name == "hybrid" and field in hybrid.FLAT:
        new = " and ".join(f"model.{s}.{field}" for s in hybrid.FLAT[field])
        return ConfigError(f"in a hybrid, model.{field} is {new} (a section per family)")
    if section == "model" and "." not in field:
        owners = models.families_with_field(field)
        if field in hybrid.FLAT:  # a hybrid holds it in a section
            owners.append(
                f"hybrid (as {' and '.join(f'model.{s}.{field}' for s in hybrid.FLAT[field])})"
            )
        if owners:
            return ConfigError(
                f"model.{field} belongs to {'/'.join(owners)}, not model.name="
                f"{cfg.model.name!r}: set model.name first (--set model.name={owners[0]})"
            )
    parts = key.split(".")
    if parts[:2] == ["data", "mixture"] and len(parts) == 4:
        name, names = parts[2], ", ".join(cfg.data.components()) or "none yet"
        if name in cfg.data.components():
            valid = [f.name for f in dataclasses.fields(MixtureComponent)]
            return ConfigError(
                f"data.mixture.{name} has no key {parts[3]!r}{_closest(parts[3], valid)}; a "
                f"component takes {', '.join(valid)}"
            )
        return ConfigError(
            f"data.mixture has no component {name!r} (components: {names}); add one with "
            f"--set data.mixture.{name}.source=PATH"
        )
    return ConfigError(f"unknown config key {key!r}{_closest(key, all_keys(cfg))}")


def override(cfg: Config, assignments: dict[str, Any]) -> Config:
    """Applies {"section.field": value} (values already parsed); `model.name` goes first."""

    def first(kv) -> int:  # model.name, then new mixture components (by their source)
        return 0 if kv[0] == "model.name" else 1 if _new_component(cfg, kv[0]) else 2

    for key, value in sorted(assignments.items(), key=first):
        if key == "model.name":
            if not isinstance(value, str):
                raise ConfigError(f"model.name must be str, got {value!r}")
            cfg = dataclasses.replace(cfg, model=_retype_model(cfg.model, value))
            continue
        if key == "data.mixture":  # a whole mixture: {name: {source: ..., weight: ...}}, {}
            mixture = mixture_pairs(value if isinstance(value, (dict, list, tuple)) else [value])
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, mixture=mixture))
            continue
        if _new_component(cfg, key):
            cfg = _replace(cfg, key.split("."), _coerce(value, str, key))
            continue
        leaves = _leaves(cfg, "")
        if key not in leaves:
            raise _unknown_key(cfg, key)
        value = _coerce(value, leaves[key][1], key)
        cfg = _replace(cfg, key.split("."), value)
    return cfg


def _new_component(cfg: Config, key: str) -> bool:
    """`key` is data.mixture.NAME.source of a component not in the mixture yet (it adds it)."""
    parts = key.split(".")
    return (
        len(parts) == 4
        and parts[:2] == ["data", "mixture"]
        and parts[3] == "source"
        and parts[2] not in cfg.data.components()
    )


# ---------------------------------------------------------------------------- files


def load_module(spec: str, function: str) -> tuple[Any, str]:
    """(module, arg) for `path/to/exp.py[:arg]`, checking the file defines `function`."""
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"lmtrain_experiment_{p.stem}", p)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, function):
        raise ConfigError(f"{path} has no {function}(arg) function")
    return module, arg


def load_experiment(spec: str) -> Config:
    """Loads `path/to/exp.py[:arg]` by calling its `get_config(arg)`."""
    module, arg = load_module(spec, "get_config")
    path = spec.partition(":")[0]
    try:
        cfg = module.get_config(arg)
    except ConfigError:
        raise
    except ValueError as e:  # e.g. an unknown variant argument
        raise ConfigError(f"{path}:get_config({arg!r}): {e}") from None
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}:get_config returned {type(cfg).__name__}, not lmtrain Config")
    return with_family_config(cfg)


def with_family_config(cfg: Config) -> Config:
    """Makes `cfg.model` an instance of its family's Config (so family fields exist)."""
    cls = models.family(cfg.model.name).Config
    if type(cfg.model) is cls:
        return cfg
    return dataclasses.replace(cfg, model=_retype_model(cfg.model, cfg.model.name))


def to_dict(cfg: Config) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    d["data"]["mixture"] = {n: dataclasses.asdict(c) for n, c in cfg.data.mixture}
    return d


def from_dict(d: dict[str, Any]) -> Config:
    """Rebuilds a Config from `to_dict` output (e.g. a run's config.json); keys that have
    moved into a section since the file was written (MOVED, and a hybrid's family fields:
    hybrid.FLAT) are read at their new place."""
    flat_keys = flat_dict(d, moved=MOVED)
    if flat_keys.get("model.name") == "hybrid":
        flat_keys = hybrid.sectioned(flat_keys)
    return override(Config(), flat_keys)


def save_json(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=True) + "\n")


def load_json(path: Path) -> Config:
    if not path.is_file():
        raise ConfigError(f"no config.json in {path.parent}: is this an lmtrain workdir?")
    d = read_mapping(path)
    mqar = d.get("data", {}).get("mqar") if isinstance(d.get("data"), dict) else None
    if isinstance(mqar, dict) and "echo_values" not in mqar:
        # a run written before the MQAR layout was a key trained on the echo layout
        d["data"]["mqar"] = {**mqar, "echo_values": True}
    return from_dict(d)


def load_file(path: Path) -> Config:
    """A config from a .json, .yaml or .yml file, whole (a workdir's config.json) or partial
    (`{"model": {"d_model": 512}}`: the rest stays default); keys and types are checked as
    --set's are."""
    return from_dict(read_mapping(Path(path)))
