"""Models out to Hugging Face transformers and back in; lmtrain's own safetensors format.

Two formats (`lmtrain export --format`):

    hf           an HF model directory: config.json, model.safetensors, generation_config.json
                 and the tokenizer (tokenizer.json, tokenizer_config.json,
                 special_tokens_map.json) that `AutoTokenizer` loads. Families transformers can
                 represent exactly: `transformer` -> LlamaForCausalLM (MHA or GQA, tied or
                 untied, RoPE theta, norm eps; SwiGLU only, no Primer convolutions) and
                 `mamba2` -> Mamba2ForCausalLM (one B/C group, no biases).
    safetensors  model.safetensors named by lmtrain's own parameter paths
                 ("blocks.0.attn.q.kernel") + lmtrain_config.json, for every family.

Both are read back by `model.init_from` ("hf:DIR" or DIR): a fresh run starts from those
weights (continued pretraining) after every shape and every setting that changes the function
(RoPE theta, norm eps, tying, activation) is checked against the run's model config.

Tokenizer conventions, so transformers continues a prompt exactly as `lmtrain generate`: no
BOS is added and none is expected; `<|eod|>` (or the tokenizer's end-of-text) is EOS, which
ends generation in both; the pad token is the tokenizer's. The `bytes` tokenizer is written as
a byte-level tokenizer.json whose id of byte b is b (256 = eod, 257 = pad).

Weight layouts: lmtrain's Linear kernels are (in, out), torch's (out, in); both use RoPE's
rotate-half layout, so Q/K need no permutation. A ShortConv kernel[j] weighs the token j steps
back, torch's Conv1d weight[c, 0, W-1-j] does. Everything is written in float32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from lmtrain.errors import ConfigError

LLAMA, MAMBA2 = "LlamaForCausalLM", "Mamba2ForCausalLM"
NATIVE_CONFIG = "lmtrain_config.json"
WEIGHTS = "model.safetensors"


def _safetensors():
    try:
        from safetensors import numpy as st
    except ImportError:
        raise ConfigError(
            "reading or writing safetensors needs the hf extra: pip install 'lmtrain[hf]'"
        ) from None
    return st


# ------------------------------------------------------------------ which architecture


def architecture(m: Any) -> str:
    """The transformers class that represents model config `m` exactly, or ConfigError."""
    why = None
    if m.name == "transformer":
        if m.activation != "swiglu":
            why = f"model.activation={m.activation!r} (Llama's MLP is SwiGLU)"
        elif m.qkv_conv:
            why = f"Primer's q/k/v convolutions (model.qkv_conv={m.qkv_conv})"
        elif m.qk_norm:
            why = "QK-norm (model.qk_norm=true; Llama has none)"
        elif m.logit_softcap:
            why = f"a logit soft cap (model.logit_softcap={m.logit_softcap}; Llama has none)"
        else:
            return LLAMA
    elif m.name == "mamba2" and m.logit_softcap:
        why = f"a logit soft cap (model.logit_softcap={m.logit_softcap}; Mamba-2 has none)"
    elif m.name == "mamba2":
        return MAMBA2
    else:
        why = f"model.name={m.name!r}"
    raise ConfigError(
        f"{why} is not representable in transformers; export it with --format safetensors "
        "(lmtrain's own format, which model.init_from reads)"
    )


def _ids(tokenizer: Any) -> dict[str, Any]:
    return {
        "bos_token_id": None,
        "eos_token_id": tokenizer.eod_id,
        "pad_token_id": tokenizer.pad_id,
    }


def hf_config(m: Any, tokenizer: Any, max_len: int) -> dict[str, Any]:
    """config.json of the HF model equal to lmtrain model config `m`."""
    arch = architecture(m)
    common = {
        "architectures": [arch],
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "num_hidden_layers": m.n_layers,
        "tie_word_embeddings": m.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        **_ids(tokenizer),
    }
    if arch == LLAMA:
        return {
            **common,
            "model_type": "llama",
            "intermediate_size": m.ffn_width,
            "num_attention_heads": m.n_heads,
            "num_key_value_heads": m.kv_heads,
            "head_dim": m.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": max_len,
            "rms_norm_eps": m.norm_eps,
            "rope_theta": m.rope_theta,  # transformers < 5
            "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mlp_bias": False,
        }
    return {
        **common,
        "model_type": "mamba2",
        "num_heads": m.n_heads,
        "head_dim": m.inner_width // m.n_heads,
        "expand": m.expand,
        "state_size": m.state_size,
        "n_groups": 1,
        "conv_kernel": m.conv_width,
        "chunk_size": m.chunk_size,
        "layer_norm_epsilon": m.norm_eps,
        "use_bias": False,
        "use_conv_bias": bool(m.conv_bias),
        "residual_in_fp32": True,
        "hidden_act": "silu",
    }


def model_overrides(hf: dict[str, Any]) -> dict[str, Any]:
    """The lmtrain `model.*` settings of an HF config.json (what init_from checks against)."""
    arch = (hf.get("architectures") or [None])[0]
    out = {
        "model.vocab_size": hf["vocab_size"],
        "model.d_model": hf["hidden_size"],
        "model.n_layers": hf["num_hidden_layers"],
        "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        "model.logit_softcap": 0.0,
    }
    if arch == LLAMA:
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
        if (
            head_dim * heads != hf["hidden_size"]
            or rope_type != "default"
            or hf.get("rope_scaling")
        ):
            raise ConfigError(
                "this Llama has a head_dim other than hidden_size / num_attention_heads or RoPE "
                "scaling; lmtrain's transformer cannot hold it"
            )
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
            raise ConfigError("this Llama has biases or a non-SiLU MLP; lmtrain cannot hold it")
        return {
            **out,
            "model.name": "transformer",
            "model.n_heads": heads,
            "model.n_kv_heads": hf.get("num_key_value_heads") or heads,
            "model.norm_eps": hf.get("rms_norm_eps", 1e-6),
            "model.rope_theta": float(rope),
            "model.activation": "swiglu",
            "model.qkv_conv": 0,
            "model.qk_norm": False,
            "intermediate_size": hf["intermediate_size"],  # checked against ffn_width
        }
    if arch == MAMBA2:
        if hf.get("n_groups", 8) != 1 or hf.get("use_bias", False):
            raise ConfigError(
                "this Mamba-2 has n_groups != 1 or biased projections; lmtrain's mamba2 has one "
                "B/C group and no biases"
            )
        return {
            **out,
            "model.name": "mamba2",
            "model.n_heads": hf["num_heads"],
            "model.expand": hf.get("expand", 2),
            "model.state_size": hf["state_size"],
            "model.conv_width": hf.get("conv_kernel", 4),
            "model.norm_eps": hf.get("layer_norm_epsilon", 1e-5),
            "model.conv_bias": bool(hf.get("use_conv_bias", True)),  # transformers' default
            "head_dim": hf["head_dim"],  # checked against expand * d_model / n_heads
        }
    raise ConfigError(
        f"architecture {arch!r} cannot be imported; lmtrain reads {LLAMA} and {MAMBA2}"
    )


# ------------------------------------------------------------------ weights


def _t(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, np.float32).T)


def _conv_to_torch(kernel_WxC) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(kernel_WxC, np.float32)[::-1].T[:, None, :])


def to_hf(m: Any, params: dict) -> dict[str, np.ndarray]:
    """HF state dict (numpy float32) of lmtrain params of model config `m`."""
    arch = architecture(m)
    p = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    out: dict[str, np.ndarray] = {}
    if arch == LLAMA:
        out["model.embed_tokens.weight"] = p["token_embed"]["table"]
        for i in range(m.n_layers):
            b, pre = p["blocks"][i], f"model.layers.{i}."
            for n in "qkvo":
                out[f"{pre}self_attn.{n}_proj.weight"] = _t(b["attn"][n]["kernel"])
            for n in ("gate", "up", "down"):
                out[f"{pre}mlp.{n}_proj.weight"] = _t(b["mlp"][n]["kernel"])
            out[f"{pre}input_layernorm.weight"] = b["attn_norm"]["scale"]
            out[f"{pre}post_attention_layernorm.weight"] = b["mlp_norm"]["scale"]
        out["model.norm.weight"] = p["final_norm"]["scale"]
    else:
        out["backbone.embeddings.weight"] = p["token_embed"]["table"]
        for i in range(m.n_layers):
            b, pre = p["blocks"][i], f"backbone.layers.{i}."
            x = b["mixer"]
            proj = [x[n]["kernel"] for n in ("in_z", "in_x", "in_b", "in_c", "in_dt")]
            out[f"{pre}mixer.in_proj.weight"] = _t(np.concatenate(proj, axis=1))
            conv = [x[n]["kernel"] for n in ("conv_x", "conv_b", "conv_c")]
            out[f"{pre}mixer.conv1d.weight"] = _conv_to_torch(np.concatenate(conv, axis=1))
            if m.conv_bias:
                bias = [x[n]["bias"] for n in ("conv_x", "conv_b", "conv_c")]
                out[f"{pre}mixer.conv1d.bias"] = np.concatenate(bias)
            out[f"{pre}mixer.dt_bias"] = x["dt_bias"]
            out[f"{pre}mixer.A_log"] = x["a_log"]
            out[f"{pre}mixer.D"] = x["d"]
            out[f"{pre}mixer.norm.weight"] = x["norm_scale"]
            out[f"{pre}mixer.out_proj.weight"] = _t(x["out"]["kernel"])
            out[f"{pre}norm.weight"] = b["mixer_norm"]["scale"]
        out["backbone.norm_f.weight"] = p["final_norm"]["scale"]
    if not m.tie_embeddings:
        out["lm_head.weight"] = _t(p["head"]["kernel"])
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf(m: Any, tensors: dict[str, np.ndarray]) -> dict:
    """lmtrain params (numpy float32, the run's tree) from an HF state dict; the inverse of
    `to_hf`. Shapes are checked by the caller against the run's abstract params."""
    t = {k.removeprefix("_orig_mod."): np.asarray(v, np.float32) for k, v in tensors.items()}

    def get(name: str) -> np.ndarray:
        if name not in t:
            raise ConfigError(f"the HF weights have no {name}")
        return t.pop(name)

    p: dict = {"blocks": {}}
    if architecture(m) == LLAMA:
        p["token_embed"] = {"table": get("model.embed_tokens.weight")}
        for i in range(m.n_layers):
            pre = f"model.layers.{i}."
            attn = {n: {"kernel": _t(get(f"{pre}self_attn.{n}_proj.weight"))} for n in "qkvo"}
            mlp = {
                n: {"kernel": _t(get(f"{pre}mlp.{n}_proj.weight"))} for n in ("gate", "up", "down")
            }
            p["blocks"][i] = {
                "attn": attn,
                "mlp": mlp,
                "attn_norm": {"scale": get(f"{pre}input_layernorm.weight")},
                "mlp_norm": {"scale": get(f"{pre}post_attention_layernorm.weight")},
            }
        p["final_norm"] = {"scale": get("model.norm.weight")}
    else:
        E, N = m.inner_width, m.state_size
        p["token_embed"] = {"table": get("backbone.embeddings.weight")}
        for i in range(m.n_layers):
            pre = f"backbone.layers.{i}."
            w = _t(get(f"{pre}mixer.in_proj.weight"))
            cuts = np.cumsum([E, E, N, N])
            z, xs, b, c, dt = np.split(w, cuts, axis=1)
            conv = np.asarray(get(f"{pre}mixer.conv1d.weight"))[:, 0, :].T[::-1]
            cx, cb, cc = np.split(conv, np.cumsum([E, N]), axis=1)
            bias = t.pop(f"{pre}mixer.conv1d.bias", None)
            if bias is not None and np.any(bias != 0) and not m.conv_bias:
                raise ConfigError(
                    "the Mamba-2's conv1d has a bias: set model.conv_bias=true to keep it"
                )
            mixer = {
                n: {"kernel": np.ascontiguousarray(a)}
                for n, a in zip(
                    ("in_z", "in_x", "in_b", "in_c", "in_dt", "conv_x", "conv_b", "conv_c"),
                    (z, xs, b, c, dt, cx, cb, cc),
                    strict=True,
                )
            }
            if m.conv_bias:
                if bias is None:
                    raise ConfigError(f"the HF weights have no {pre}mixer.conv1d.bias")
                for n, part in zip(
                    ("conv_x", "conv_b", "conv_c"), np.split(bias, np.cumsum([E, N])), strict=True
                ):
                    mixer[n]["bias"] = np.ascontiguousarray(part)
            mixer.update(
                dt_bias=get(f"{pre}mixer.dt_bias"),
                a_log=get(f"{pre}mixer.A_log"),
                d=get(f"{pre}mixer.D"),
                norm_scale=get(f"{pre}mixer.norm.weight"),
                out={"kernel": _t(get(f"{pre}mixer.out_proj.weight"))},
            )
            p["blocks"][i] = {"mixer": mixer, "mixer_norm": {"scale": get(f"{pre}norm.weight")}}
        p["final_norm"] = {"scale": get("backbone.norm_f.weight")}
    if not m.tie_embeddings:
        p["head"] = {"kernel": _t(get("lm_head.weight"))}
    t.pop("lm_head.weight", None)  # a tied checkpoint may still carry the shared matrix
    if t:
        raise ConfigError(f"the HF weights have tensors lmtrain does not hold: {sorted(t)[:5]}")
    return p


def native_tensors(params: dict) -> dict[str, np.ndarray]:
    """lmtrain's own format: every parameter under its path, "blocks.0.attn.q.kernel"."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_name(path): np.ascontiguousarray(np.asarray(a, np.float32)) for path, a in flat}


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def from_native(abstract: Any, tensors: dict[str, np.ndarray]) -> Any:
    """The run's params tree filled from `native_tensors` output (names must match)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    names = [_name(path) for path, _ in flat]
    missing = [n for n in names if n not in tensors]
    extra = sorted(set(tensors) - set(names))
    if missing or extra:
        raise ConfigError(
            f"the weights do not fit this model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    return jax.tree_util.tree_unflatten(treedef, [tensors[n] for n in names])


def check_shapes(abstract: Any, params: Any, source: str) -> None:
    """ConfigError naming the first parameters whose shapes differ from the run's."""
    got = dict(native_tensors_shapes(params))
    want = dict(native_tensors_shapes(abstract))
    bad = [
        f"{n}: {got.get(n)} in {source}, {s} in this run"
        for n, s in want.items()
        if got.get(n) != s
    ]
    if bad:
        raise ConfigError("the weights do not fit this model: " + "; ".join(bad[:4]))


def native_tensors_shapes(tree: Any):
    for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]:
        yield _name(path), tuple(a.shape)


def save_weights(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    _safetensors().save_file(tensors, str(path), metadata=metadata)


def load_weights(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    try:
        return dict(_safetensors().load_file(str(path)))
    except Exception as e:  # a truncated or foreign file
        raise ConfigError(f"{path} is not a readable safetensors file ({e})") from None
