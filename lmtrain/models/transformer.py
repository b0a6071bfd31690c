"""Llama-style decoder-only transformer (RMSNorm, RoPE, GQA, SwiGLU), with Primer options."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.errors import check_all
from lmtrain.models import sequence
from lmtrain.models.attention import IMPLEMENTATIONS, attend
from lmtrain.models.base import ModelConfig
from lmtrain.models.decoder import BlockSpec
from lmtrain.models.layers import MLPS, Linear, RMSNorm, ShortConv, apply_rope
from lmtrain.models.mixer import Mixer, State, continues, keep_rows, last_segment


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


class Attention(Mixer):
    """Grouped-query causal self-attention with RoPE and optional Primer Q/K/V convolutions.

    Projections are fused 2-D kernels: Q (D, H*K) axes ("embed", "heads"), K/V (D, G*K)
    ("embed", "kv"), O (H*K, D) ("heads", "embed"); sharding the fused axis keeps heads whole
    whenever the shard count divides the head count.

    State (the KV cache): "k", "v" (B, S, G, K) after RoPE, "slot_seg" (B, S) the segment of
    each slot, "index" the next free slot, "seg", and the Primer convs' windows. A fresh call
    attends with model.attention_impl and returns a cache of exactly its L tokens; a call with a
    state writes its tokens at index.. and attends over the cache (always XLA: a T x S product,
    often 1 x S, where a flash kernel buys little). One path serves both forms.
    """

    CONVS = ("conv_q", "conv_k", "conv_v")

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs, out_std: float):
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        dtype, std = jnp.dtype(cfg.dtype), cfg.init_std
        self.H, self.G, self.K, self.dtype = H, G, K, dtype
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

    def init_state(self, batch_size: int, max_len: int) -> State:
        """Empty cache of max_len slots."""
        kv = jnp.zeros((batch_size, max_len, self.G, self.K), self.dtype)
        state = {
            "k": kv,
            "v": kv,
            "slot_seg": jnp.zeros((batch_size, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
            "seg": jnp.zeros((batch_size,), jnp.int32),
        }
        if self.conv_q is not None:
            state.update({n: getattr(self, n).init_state(batch_size) for n in self.CONVS})
        return state

    def _qkv(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        """Projections, Primer convs (continuing the state's windows), QK-norm, RoPE."""
        B, L, _ = x_BxLxD.shape
        q, k, v = self.q(x_BxLxD), self.k(x_BxLxD), self.v(x_BxLxD)
        windows = {}
        if self.conv_q is not None:
            keep = None if state is None else continues(state, segment_ids_BxL, B)
            convs = []
            for name, a in zip(self.CONVS, (q, k, v), strict=True):
                prefix = None if state is None else keep_rows(state[name], keep)
                y, windows[name] = getattr(self, name)(a, segment_ids_BxL, prefix)
                convs.append(y)
            q, k, v = convs
        q_BxLxHxK, k_BxLxGxK = q.reshape(B, L, self.H, self.K), k.reshape(B, L, self.G, self.K)
        if self.q_norm is not None:
            q_BxLxHxK, k_BxLxGxK = self.q_norm(q_BxLxHxK), self.k_norm(k_BxLxGxK)
        q_BxLxHxK = apply_rope(q_BxLxHxK, positions_BxL, self.rope_theta)
        k_BxLxGxK = apply_rope(k_BxLxGxK, positions_BxL, self.rope_theta)
        return q_BxLxHxK, k_BxLxGxK, v.reshape(B, L, self.G, self.K), windows

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        """Tokens see earlier tokens of their segment, in the call and (with a state) the cache."""
        B, L, _ = x_BxLxD.shape
        q, k, v, windows = self._qkv(x_BxLxD, segment_ids_BxL, positions_BxL, state)
        seg_BxL = segment_ids_BxL
        if seg_BxL is None:
            seg_B = jnp.zeros((B,), jnp.int32) if state is None else state["seg"]
            seg_BxL = jnp.broadcast_to(seg_B[:, None], (B, L))
        seg_BxL = seg_BxL.astype(jnp.int32)
        if state is None:
            o_BxLxHxK = attend(q, k, v, segment_ids_BxL, self.impl)
            new = {"k": k, "v": v, "slot_seg": seg_BxL, "index": jnp.int32(L)}
        else:
            index = state["index"]
            new = {
                name: jax.lax.dynamic_update_slice_in_dim(state[name], a, index, axis=1)
                for name, a in (("k", k.astype(self.dtype)), ("v", v.astype(self.dtype)),
                                ("slot_seg", seg_BxL))
            }  # fmt: skip
            S = new["k"].shape[1]
            slot_S = jnp.arange(S, dtype=jnp.int32)
            causal_LxS = slot_S[None, :] <= index + jnp.arange(L, dtype=jnp.int32)[:, None]
            same_BxLxS = new["slot_seg"][:, None, :] == seg_BxL[:, :, None]
            o_BxLxHxK = jax.nn.dot_product_attention(
                q, new["k"].astype(q.dtype), new["v"].astype(q.dtype),
                mask=(causal_LxS[None] & same_BxLxS)[:, None], implementation="xla",
            )  # fmt: skip
            new["index"] = index + jnp.int32(L)
        new.update(windows, seg=last_segment(state, segment_ids_BxL, B))
        return self.o(o_BxLxHxK.reshape(B, L, self.H * self.K)), new

    def split_parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL):
        """This device's piece of a row split over the sequence axis (models/sequence.py):
        its queries attend to the all-gathered keys and values of the whole row."""
        B, L, _ = x_BxLxD.shape
        state = sequence.entry_state(self, x_BxLxD, segment_ids_BxL, positions_BxL)
        q, k, v, _ = self._qkv(x_BxLxD, segment_ids_BxL, positions_BxL, state)
        o_BxLxHxK = sequence.gathered_attention(q, k, v, segment_ids_BxL, self.impl)
        return self.o(o_BxLxHxK.reshape(B, L, self.H * self.K))

    def recurrent(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        """The cache path, whatever L: masks, not restarts, keep documents apart."""
        return self.parallel(x_BxLxD, segment_ids_BxL, positions_BxL, state)


def blocks(cfg: Config) -> list[BlockSpec]:
    """n_layers blocks: attention then the MLP (`activation`), as Llama.

    Init: embeddings, Q/K/V, MLP input matrices and an untied head ~ N(0, init_std^2); each
    block's attention-out and MLP-down matrices ~ N(0, (init_std / sqrt(2 n_layers))^2); norm
    scales 1; Primer convs as model.conv_init (layers.conv_init). model.zero_init starts the
    attention-out, MLP-down and untied head matrices at zero.
    """
    return [attention_block(cfg)] * cfg.n_layers


def attention_block(cfg: Config) -> BlockSpec:
    """One transformer layer (also the hybrid's letter A)."""
    out_std = cfg.out_std()  # GPT-2's scaled init of residual-branch outputs, or zero
    mlp_cls = MLPS[cfg.activation][0]
    return BlockSpec(
        mixer=lambda rngs: Attention(cfg, rngs=rngs, out_std=out_std),
        mlp=lambda rngs: mlp_cls(
            cfg.d_model,
            cfg.ffn_width,
            rngs=rngs,
            std=cfg.init_std,
            out_std=out_std,
            dtype=jnp.dtype(cfg.dtype),
        ),  # fmt: skip
        names=("attn_norm", "attn"),
    )
