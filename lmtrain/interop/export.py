"""`lmtrain export` and `model.init_from`: a workdir's checkpoint written as an HF model
directory or in lmtrain's safetensors format, and a fresh run started from either (see
lmtrain/interop/hf.py for the formats and the weight layouts)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmtrain.errors import ConfigError
from lmtrain.interop import hf

FORMATS = ("hf", "safetensors")


# ------------------------------------------------------------------ tokenizer files


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level alphabet of GPT-2-style tokenizers: printable bytes stand for
    themselves, the others are shifted past U+0100, so every byte is one visible character."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def bytes_tokenizer_json() -> str:
    """tokenizer.json equal to lmtrain's `bytes` tokenizer: id b is byte b, 256 `<|eod|>`,
    257 `<|pad|>`; no merges, no prefix space, no normalisation."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(
        [AddedToken("<|eod|>", special=True), AddedToken("<|pad|>", special=True)]
    )
    return tk.to_str()


def tokenizer_files(tokenizer: Any, max_len: int) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json of a run's tokenizer."""
    from lmtrain.data.tokenizers import ByteTokenizer, HFTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        text = bytes_tokenizer_json()
        eod, pad = "<|eod|>", "<|pad|>"
    elif isinstance(tokenizer, HFTokenizer):
        text = tokenizer.tk.to_str()
        eod, pad = (
            tokenizer.tk.id_to_token(tokenizer.eod_id),
            tokenizer.tk.id_to_token(tokenizer.pad_id),
        )
    else:
        raise ConfigError(
            f"the run's tokenizer ({tokenizer.name}) cannot be written as an HF tokenizer.json "
            "(sentencepiece export is not supported); train with a tokenizer.json or bpe:N"
        )
    special = {"eos_token": eod, "pad_token": pad}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
    }
    return {
        "tokenizer.json": text,
        "tokenizer_config.json": json.dumps(config, indent=2),
        "special_tokens_map.json": json.dumps(special, indent=2),
    }


# ------------------------------------------------------------------ export


def export(
    workdir: Path,
    out: Path,
    step: int | None = None,
    fmt: str = "hf",
    overrides: dict | None = None,
) -> dict[str, Any]:
    """Writes a checkpoint of `workdir` to `out` (a new directory, written whole or not at all);
    `overrides` are --set's; returns a summary."""
    from lmtrain import config as config_lib
    from lmtrain import run as run_lib

    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists and is not empty; choose a new --out")
    cfg_path = Path(workdir) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{workdir} holds no run (no config.json)")
    if fmt == "hf":  # refuse before reading the checkpoint
        hf.architecture(config_lib.override(config_lib.load_json(cfg_path), overrides or {}).model)
    run, params, s = run_lib.restore_params(Path(workdir), overrides, step=step)
    m, max_len = run.cfg.model, run.cfg.data.seq_len
    files = tokenizer_files(run.tokenizer, max_len)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "hf":
            hf_cfg = hf.hf_config(m, run.tokenizer, max_len)
            tensors = hf.to_hf(m, params)
            generation = {
                "do_sample": False,
                **{k: v for k, v in hf_cfg.items() if k.endswith("_token_id")},
            }
            (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
            meta = {"format": "pt"}
        else:
            tensors = hf.native_tensors(params)
            (tmp / hf.NATIVE_CONFIG).write_text(json.dumps(config_lib.to_dict(run.cfg), indent=2))
            meta = {"format": "lmtrain"}
        hf.save_weights(tmp / hf.WEIGHTS, tensors, {**meta, "lmtrain_step": str(s)})
        for name, text in files.items():
            (tmp / name).write_text(text)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(int(np.prod(t.shape)) for t in tensors.values())
    arch = hf.architecture(m) if fmt == "hf" else f"lmtrain {m.name}"
    return {"out": str(out), "format": fmt, "architecture": arch, "step": s, "parameters": n}


# ------------------------------------------------------------------ import (model.init_from)

# Settings that do not change the function a model computes (or only its speed).
_FREE = {
    "dtype",
    "param_dtype",
    "remat",
    "scan_layers",
    "attention_impl",
    "init_std",
    "zero_init",
    "init_from",
    "conv_init",
    "chunk_size",
    "s4d_fft",
}


def load_init(spec: str, run: Any) -> Any:
    """The parameters `model.init_from` names, checked against the run's model, as numpy arrays
    in the run's tree and parameter dtype. "hf:DIR": an HF directory; DIR: either format."""
    path = Path(spec[3:] if spec.startswith("hf:") else spec).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model.init_from={spec!r}: {path} is not a directory")
    m = run.cfg.model
    if (path / hf.NATIVE_CONFIG).is_file() and not spec.startswith("hf:"):
        from lmtrain import config as config_lib

        saved = config_lib.load_json(path / hf.NATIVE_CONFIG)
        a, b = config_lib.flat(saved), config_lib.flat(run.cfg)
        diffs = [
            f"{k}={a[k]!r} there, {b.get(k)!r} here"
            for k in a
            if k.startswith("model.") and k.rpartition(".")[2] not in _FREE and a[k] != b.get(k)
        ]
        if diffs:
            raise ConfigError(f"model.init_from {path} holds another model: {'; '.join(diffs)}")
        params = hf.from_native(run.abstract_params, hf.load_weights(path / hf.WEIGHTS))
    elif (path / "config.json").is_file():
        hf_cfg = json.loads((path / "config.json").read_text())
        want = hf.model_overrides(hf_cfg)
        here = {
            k: getattr(m, k.removeprefix("model."), None) for k in want if k.startswith("model.")
        }
        here["intermediate_size"] = (
            getattr(m, "ffn_width", None) if m.name == "transformer" else None
        )
        if m.name == "transformer":
            here["model.n_kv_heads"] = m.kv_heads  # 0 means n_heads
        if m.name == "mamba2":
            here["head_dim"] = m.inner_width // m.n_heads
        diffs = [
            f"{k}={want[k]!r} there, {here.get(k)!r} here"
            for k in want
            if not _same(want[k], here.get(k))
        ]
        if diffs:
            sets = " ".join(
                f"--set {k}={want[k]}"
                for k in want
                if k.startswith("model.") and not _same(want[k], here.get(k))
            )
            raise ConfigError(
                f"model.init_from {path} holds another model: {'; '.join(diffs)}"
                + (f" (try {sets})" if sets else "")
            )
        params = hf.from_hf(m, _load_hf_weights(path))
    else:
        raise ConfigError(
            f"model.init_from: {path} has neither config.json (an HF model) nor "
            f"{hf.NATIVE_CONFIG} (lmtrain export --format safetensors)"
        )
    hf.check_shapes(run.abstract_params, params, str(path))
    dtypes = jax.tree.map(lambda a: a.dtype, run.abstract_params)
    return jax.tree.map(lambda a, d: np.asarray(a).astype(d), params, dtypes)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        return (
            a is not None
            and b is not None
            and abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)))
        )
    return a == b


def _load_hf_weights(path: Path) -> dict[str, np.ndarray]:
    """model.safetensors, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(hf.load_weights(path / shard))
        return tensors
    return hf.load_weights(path / hf.WEIGHTS)
