"""Llama-style decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU), with Primer options."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.models.attention import IMPLEMENTATIONS, attend
from lmtrain.models.base import ModelConfig, check_all
from lmtrain.models.layers import MLPS, Embed, Linear, RMSNorm, ShortConv, apply_rope
from lmtrain.models.stack import run_blocks
from lmtrain.sharding import constrain

Cache = dict  # {"index": int32[], "layers": [{"k", "v"[, "conv_q", "conv_k", "conv_v"]}, ...]}


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    """Transformer options on top of the shared model fields.

    FFN hidden width F: "swiglu" uses round(2/3 * ffn_mult * d_model) rounded up to a multiple
    of 64 (so the three SwiGLU matrices cost about as much as a 2-matrix MLP of ffn_mult * d_model);
    "relu2" (Primer's squared ReLU) uses ffn_mult * d_model.
    """

    rope_theta: float = 10000.0
    activation: str = "swiglu"  # "swiglu" | "relu2" (Primer squared ReLU)
    qkv_conv: int = 0  # Primer depthwise causal conv width after Q, K, V projections; 0 = off
    # RMSNorm over each head's query and key (learned scale per head channel, shared by heads)
    # before RoPE: OLMo 2 / Qwen 3 / modded-nanogpt's QK-norm, which bounds the attention logits.
    qk_norm: bool = False
    attention_impl: str = "xla"  # xla | cudnn (GPU) | splash (TPU); see models/attention.py

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads G (n_kv_heads, or n_heads when that is 0)."""
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        """Per-head width K = d_model // n_heads."""
        return self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        """MLP hidden width F (see the class docstring)."""
        if self.activation == "swiglu":
            return -(-round(2 / 3 * self.ffn_mult * self.d_model) // 64) * 64
        return int(self.ffn_mult * self.d_model)

    def matmul_params(self) -> int:
        """Parameters used in matmuls: Q, K, V, O, MLP per layer, plus the output head (V x D)."""
        D, F, K = self.d_model, self.ffn_width, self.head_dim
        attn = D * self.n_heads * K * 2 + D * self.kv_heads * K * 2
        mlp = MLPS[self.activation][1] * D * F if self.activation in MLPS else 0
        return self.n_layers * (attn + mlp) + self.vocab_size * D

    def conv_params(self) -> int:
        """Parameters of the Primer Q/K/V depthwise convolutions (0 when qkv_conv is 0)."""
        channels = (self.n_heads + 2 * self.kv_heads) * self.head_dim
        return self.n_layers * self.qkv_conv * channels

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the convention of MaxText and of Kaplan
        et al. (2020), with causal attention counted at half.

        6 * matmul_params()                 (2 forward + 4 backward per weight; head included,
                                             embedding gather excluded)
        + 6 * n_layers * seq_len * d_model  (causal attention scores and values: half of
                                             12 * n_layers * seq_len * d_model)
        + 6 * conv_params()                 (each Primer conv tap is a multiply-add per token)
        Norms (QK-norm included), RoPE, activations, the logit soft cap and softmax are not
        counted: they are O(d_model) or O(vocab) elementwise work per token, not matmuls.
        """
        attention = 6 * self.n_layers * seq_len * self.d_model
        return float(6 * self.matmul_params() + attention + 6 * self.conv_params())

    def state_floats(self, seq_len: int) -> int:
        """Floats of decode state per sequence at context seq_len: the KV cache (grows with
        seq_len) plus the Primer conv windows."""
        kv = 2 * seq_len * self.kv_heads * self.head_dim
        conv = max(self.qkv_conv - 1, 0) * (self.n_heads + 2 * self.kv_heads) * self.head_dim
        return self.n_layers * (kv + conv)

    def validate(self) -> None:
        """Raises ConfigError naming the field when this config cannot be built."""
        ModelConfig.validate(self)
        c = self
        checks = [
            (
                c.d_model % c.n_heads == 0,
                "model.n_heads",
                f"must divide d_model ({c.d_model})",
            ),
            (c.head_dim % 2 == 0, "model.n_heads", "must leave an even head dim for RoPE"),
            (c.n_heads % c.kv_heads == 0, "model.n_kv_heads", "must divide n_heads"),
            (c.activation in MLPS, "model.activation", f"must be one of {sorted(MLPS)}"),
            (c.qkv_conv >= 0, "model.qkv_conv", "must be >= 0"),
            (
                c.attention_impl in IMPLEMENTATIONS,
                "model.attention_impl",
                f"must be one of {', '.join(IMPLEMENTATIONS)}",
            ),
        ]
        check_all(checks)


class Attention(nnx.Module):
    """Grouped-query causal self-attention with RoPE and optional Primer Q/K/V convolutions.

    Projections are fused 2-D kernels: Q (D, H*K) axes ("embed", "heads"), K/V (D, G*K)
    ("embed", "kv"), O (H*K, D) ("heads", "embed"); sharding the fused axis keeps heads whole
    whenever the shard count divides the head count.
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, out_std: float):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        dtype, std = jnp.dtype(cfg.dtype), cfg.init_std
        self.H, self.G, self.K = H, G, K
        self.rope_theta = cfg.rope_theta
        self.impl = cfg.attention_impl
        self.q = Linear(D, H * K, ("embed", "heads"), rngs=rngs, std=std, dtype=dtype)
        self.k = Linear(D, G * K, ("embed", "kv"), rngs=rngs, std=std, dtype=dtype)
        self.v = Linear(D, G * K, ("embed", "kv"), rngs=rngs, std=std, dtype=dtype)
        self.o = Linear(H * K, D, ("heads", "embed"), rngs=rngs, std=out_std, dtype=dtype)
        if cfg.qkv_conv:
            conv = dict(rngs=rngs, init=cfg.conv_init, std=std, dtype=dtype)
            self.conv_q = ShortConv(H * K, cfg.qkv_conv, "heads", **conv)
            self.conv_k = ShortConv(G * K, cfg.qkv_conv, "kv", **conv)
            self.conv_v = ShortConv(G * K, cfg.qkv_conv, "kv", **conv)
        else:
            self.conv_q = self.conv_k = self.conv_v = None
        if cfg.qk_norm:
            norm = dict(rngs=rngs, eps=cfg.norm_eps, dtype=dtype, axis="head_dim")
            self.q_norm, self.k_norm = RMSNorm(K, **norm), RMSNorm(K, **norm)
        else:
            self.q_norm = self.k_norm = None

    def _heads(self, q, k, v, positions_BxL):
        """Splits heads, applies QK-norm (if on), then RoPE to q and k."""
        B, L, _ = q.shape
        q_BxLxHxK, k_BxLxGxK = q.reshape(B, L, self.H, self.K), k.reshape(B, L, self.G, self.K)
        if self.q_norm is not None:
            q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
        q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, self.rope_theta)
        k_BxLxGxK = apply_rope(k_BxLxGxK, positions_BxL, self.rope_theta)
        return q_BxLxHxK, k_BxLxGxK, v.reshape(B, L, self.G, self.K)

    def __call__(
        self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array | None, positions_BxL: jax.Array
    ) -> jax.Array:
        """Training form over whole sequences; tokens only see earlier tokens of their segment."""
        q, k, v = self.q(x_BxLxD), self.k(x_BxLxD), self.v(x_BxLxD)
        if self.conv_q is not None:
            q = self.conv_q(q, segment_ids_BxL)
            k = self.conv_k(k, segment_ids_BxL)
            v = self.conv_v(v, segment_ids_BxL)
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._heads(q, k, v, positions_BxL)
        o_BxLxHxK = attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, self.impl)
        B, L = x_BxLxD.shape[:2]
        return self.o(o_BxLxHxK.reshape(B, L, self.H * self.K))

    def init_cache(self, batch_size: int, max_len: int, dtype: jnp.dtype) -> dict:
        """Empty per-layer cache: keys/values (B, S, G, K) and conv states."""
        kv = jnp.zeros((batch_size, max_len, self.G, self.K), dtype)
        cache = {"k": kv, "v": kv}
        if self.conv_q is not None:
            for name in ("q", "k", "v"):
                cache[f"conv_{name}"] = getattr(self, f"conv_{name}").init_state(batch_size)
        return cache

    def decode(self, x_BxTxD: jax.Array, cache: dict, index: jax.Array) -> tuple[jax.Array, dict]:
        """Appends T tokens at cache positions index..index+T-1 and attends causally."""
        B, T, _ = x_BxTxD.shape
        new = dict(cache)
        q, k, v = self.q(x_BxTxD), self.k(x_BxTxD), self.v(x_BxTxD)
        if self.conv_q is not None:
            q, new["conv_q"] = self.conv_q.step(q, cache["conv_q"])
            k, new["conv_k"] = self.conv_k.step(k, cache["conv_k"])
            v, new["conv_v"] = self.conv_v.step(v, cache["conv_v"])
        pos_T = index + jnp.arange(T, dtype=jnp.int32)
        positions_BxT = jnp.broadcast_to(pos_T[None, :], (B, T))
        q_BxTxHxK, k_BxTxGxK, v_BxTxGxK = self._heads(q, k, v, positions_BxT)
        start = (jnp.int32(0), index, jnp.int32(0), jnp.int32(0))
        k_BxSxGxK = jax.lax.dynamic_update_slice(
            cache["k"], k_BxTxGxK.astype(cache["k"].dtype), start
        )
        v_BxSxGxK = jax.lax.dynamic_update_slice(
            cache["v"], v_BxTxGxK.astype(cache["v"].dtype), start
        )
        new["k"], new["v"] = k_BxSxGxK, v_BxSxGxK
        S = k_BxSxGxK.shape[1]
        # Query i sits at position index+i; slots past it are either future or still empty.
        mask_TxS = jnp.arange(S, dtype=jnp.int32)[None, :] <= pos_T[:, None]
        # Always XLA: decode is a T x S (often 1 x S) product where a flash kernel buys little.
        o_BxTxHxK = jax.nn.dot_product_attention(
            q_BxTxHxK,
            k_BxSxGxK.astype(q_BxTxHxK.dtype),
            v_BxSxGxK.astype(q_BxTxHxK.dtype),
            mask=mask_TxS[None, None],
            implementation="xla",
        )
        return self.o(o_BxTxHxK.reshape(B, T, self.H * self.K)), new


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        out_std = cfg.out_std()  # GPT-2's scaled init of residual-branch outputs, or zero
        self.dtype = dtype
        self.attn_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs, out_std=out_std)
        self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=dtype)
        mlp_cls = MLPS[cfg.activation][0]
        self.mlp = mlp_cls(
            cfg.d_model, cfg.ffn_width, rngs=rngs, std=cfg.init_std, out_std=out_std, dtype=dtype
        )

    def __call__(
        self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array | None, positions_BxL: jax.Array
    ) -> jax.Array:
        """Training form."""
        x_BxLxD = x_BxLxD + self.attn(self.attn_norm(x_BxLxD), segment_ids_BxL, positions_BxL)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))

    def init_state(self, batch_size: int, max_len: int) -> dict:
        """The layer's empty decode cache (every family's Block has this method)."""
        return self.attn.init_cache(batch_size, max_len, self.dtype)

    def decode(self, x_BxTxD: jax.Array, cache: dict, index: jax.Array) -> tuple[jax.Array, dict]:
        """Decode form: T new tokens against the layer's cache."""
        h_BxTxD, cache = self.attn.decode(self.attn_norm(x_BxTxD), cache, index)
        x_BxTxD = x_BxTxD + h_BxTxD
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), cache


class Model(nnx.Module):
    """Decoder-only transformer: Embed -> n_layers Blocks -> RMSNorm -> output head.

    Init: embeddings, Q/K/V, MLP input matrices and an untied head ~ N(0, init_std^2); each
    block's attention-out and MLP-down matrices ~ N(0, (init_std / sqrt(2 n_layers))^2); norm
    scales 1; Primer convs as model.conv_init (layers.conv_init). model.zero_init starts the
    attention-out, MLP-down and untied head matrices at zero. Parameters are float32; compute
    runs in cfg.dtype; logits are float32 (soft-capped by model.logit_softcap when it is > 0).
    """

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        cfg.validate()
        self._init_stack(cfg, lambda: [Block(cfg, rngs=rngs) for _ in range(cfg.n_layers)], rngs)

    def _init_stack(self, cfg: Any, make_blocks: Callable[[], list], rngs: nnx.Rngs) -> None:
        """Embedding, blocks, final norm and head; every family that subclasses Model uses it."""
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        std = cfg.init_std
        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, std=std, dtype=self.dtype)
        self.blocks = nnx.List(make_blocks())
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=self.dtype)
        if cfg.tie_embeddings:
            self.head = None  # logits come from token_embed.attend
        else:
            head_axes = ("embed", "vocab")
            head_std = 0.0 if cfg.zero_init else std
            self.head = Linear(
                cfg.d_model, cfg.vocab_size, head_axes, rngs=rngs, std=head_std, dtype=self.dtype
            )

    def embed(self, tokens_BxL: jax.Array) -> jax.Array:
        """Token ids -> x_BxLxD in the compute dtype."""
        return self.token_embed(tokens_BxL)

    def _logits(self, x_BxLxD: jax.Array) -> jax.Array:
        x_BxLxD = self.final_norm(x_BxLxD)
        if self.head is None:
            logits_BxLxV = self.token_embed.attend(x_BxLxD)
        else:
            logits_BxLxV = self.head(x_BxLxD, out_dtype=jnp.float32)
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits_BxLxV = cap * jnp.tanh(logits_BxLxV / cap)
        return constrain(logits_BxLxV, "batch", "length", "vocab")

    def blocks_forward(
        self,
        x_BxLxD: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
    ) -> jax.Array:
        """Embeddings -> the last block's output; positions default to 0..L-1 in every row."""
        B, L, _ = x_BxLxD.shape
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32)[None, :], (B, L))
        x_BxLxD = constrain(x_BxLxD.astype(self.dtype), "batch", "length", "embed")
        return run_blocks(
            self.blocks,
            x_BxLxD,
            segment_ids_BxL,
            positions_BxL,
            remat=self.cfg.remat,
            scan=self.cfg.scan_layers,
        )

    def forward(
        self,
        x_BxLxD: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
    ) -> jax.Array:
        """Embeddings -> float32 logits_BxLxV; positions default to 0..L-1 in every row."""
        return self._logits(self.blocks_forward(x_BxLxD, segment_ids_BxL, positions_BxL))

    def hidden(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
    ) -> jax.Array:
        """Token ids -> the last block's output x_BxLxD (before the final norm and head)."""
        return self.blocks_forward(self.embed(tokens_BxL), segment_ids_BxL, positions_BxL)

    def head_logits(self, x_BxTxD: jax.Array) -> jax.Array:
        """Final norm and output head on some positions' hidden states -> float32 logits."""
        return self._logits(x_BxTxD)

    def __call__(
        self,
        tokens_BxL: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
    ) -> jax.Array:
        """Token ids -> float32 logits_BxLxV."""
        return self.forward(self.embed(tokens_BxL), segment_ids_BxL, positions_BxL)

    def init_cache(self, batch_size: int, max_len: int) -> Cache:
        """Empty decode cache for up to `max_len` tokens per row."""
        layers = [b.init_state(batch_size, max_len) for b in self.blocks]
        return {"index": jnp.zeros((), jnp.int32), "layers": layers}

    def decode(self, tokens_BxT: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """Appends T tokens (a prompt, or 1) to `cache`; returns their logits and the new cache.

        Pure: the model is not mutated. The caller keeps index + T <= max_len.
        """
        index = cache["index"]
        x_BxTxD = self.embed(tokens_BxT)
        layers = []
        for block, layer_cache in zip(self.blocks, cache["layers"], strict=True):
            x_BxTxD, layer_cache = block.decode(x_BxTxD, layer_cache, index)
            layers.append(layer_cache)
        new_index = index + jnp.int32(tokens_BxT.shape[1])
        return self._logits(x_BxTxD), {"index": new_index, "layers": layers}
