"""Linear-attention family: BASED, RetNet retention, lightning (TransNormerLLM), GLA.

Each layer is a pre-norm block, x + mixer(norm(x)) then x + SwiGLU(norm(x)), where the mixer of
layer i is named by letter i of the layer pattern (`Config.layer_kinds`):

    B  "based"      BASED linear attention (Taylor feature map, normalised by phi(q).z)
    R  "retention"  scalar decay lambda_h = 1 - 2^(-5-h), RoPE on q/k, per-head RMSNorm + gate
    L  "lightning"  scalar decay by layer l: log lambda_h = -s_h (1 - l/(L-1)), s_h ALiBi's slopes
                    (2^(-8(h+1)/H) for H a power of two; `alibi_slopes`), SiLU q/k, RMSNorm +
                    sigmoid gate (TransNormerLLM's released code; see Lightning)
    G  "gla"        gated linear attention: data-dependent diagonal decay, RMSNorm + gate
    W  "swa"        sliding-window softmax attention with RoPE
    C  "conv"       short causal gated convolution

Recipes (model.name -> pattern when model.pattern is ""): retnet = R..., lightning = L...,
gla = G..., based = the released BASED checkpoints' layout (HazyResearch/based configs: linear
attention at layers 1, 6, 11, ..., sliding window at 2, 7, 12, ..., gated convolutions at the
rest), i.e. "CBWCC" repeated; at 2 layers that is "CB" (a gated conv, then BASED).

Every mixer keeps the contract of `lmtrain.models.mixer`; `linear_ops.mixer_costs(cfg, kind,
seq_len)` gives its parameters, FLOPs and state size. Every recurrence and convolution restarts
at segment starts; linear-attention cores run in float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.errors import check_all
from lmtrain.models import linear_ops as ops
from lmtrain.models.base import ModelConfig
from lmtrain.models.decoder import BlockSpec
from lmtrain.models.layers import (
    HeadNorm,
    Linear,
    ShortConv,
    SwiGLU,
    apply_rope,
    param,
)
from lmtrain.models.linear_ops import alibi_slopes  # noqa: F401  (la.alibi_slopes)
from lmtrain.models.mixer import Mixer, State, continues, keep_rows, last_segment

CONV_FORMS = ("projected", "base")
LETTERS = {"B": "based", "R": "retention", "L": "lightning", "G": "gla", "W": "swa", "C": "conv"}
RECIPES = {"based": "CBWCC", "retnet": "R", "lightning": "L", "gla": "G"}  # repeated to n_layers


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    """Linear-attention options on top of the shared model fields (defaults suit tiny CPU runs).

    K = d_model / n_heads for every mixer; SwiGLU width F as the transformer's (2/3 * ffn_mult *
    d_model rounded up to a multiple of 64).
    """

    pattern: str = ""  # one letter per layer (see the module docstring); "" = recipe of `name`
    chunk: int = 64  # chunk length C of the BASED / scalar-decay chunked form
    gla_chunk: int = 16  # GLA's own chunk: its intra-chunk decay tensor is (C, C, P) per head
    feature_dim: int = 16  # BASED: q/k projected to this dim per head before the Taylor map
    window: int = 129  # keys/query incl. itself (Zoology block_size b: b+1; BASED W=256: W/2+1)
    conv_width: int = 3  # gated-convolution taps (BASED uses 3)
    gla_expand_k: float = 0.5  # GLA key width = gla_expand_k * d_model (values: d_model)
    gla_gate_rank: int = 16  # GLA: rank of the decay projection x W1 W2
    gla_tau: float = 16.0  # GLA: alpha = sigmoid(x W1 W2 + b)^(1 / tau)
    rope_theta: float = 10000.0  # retention and sliding-window attention
    # False: a block is x + mixer(norm(x)) alone, as in Zoology's MQAR models (state mixer
    # Identity); True: a SwiGLU MLP follows every mixer.
    block_mlp: bool = True
    # With block_mlp=False: x + LayerNorm(x) after each mixer too (Zoology's TransformerBlock)
    state_norm: bool = False
    # Gated convolution (letter C): "projected" = o(conv(in(x)) * gate(x)); "base" = Zoology's
    # / BASED's BaseConv without SiLU, (conv(x) + b) * (x W + c) + x.
    conv_form: str = "projected"

    @property
    def head_dim(self) -> int:
        """Per-head width K = d_model // n_heads."""
        return self.d_model // self.n_heads

    @property
    def ffn_width(self) -> int:
        """SwiGLU hidden width F (see the class docstring)."""
        return -(-round(2 / 3 * self.ffn_mult * self.d_model) // 64) * 64

    def layer_kinds(self) -> tuple[str, ...]:
        """The mixer name of every layer, from `pattern` or the recipe of `name`."""
        pattern = self.pattern or (RECIPES.get(self.name, "") * self.n_layers)[: self.n_layers]
        return tuple(LETTERS.get(c, c) for c in pattern)

    def _costs(self, seq_len: int) -> list[tuple[int, float, int]]:
        return [ops.mixer_costs(self, kind, seq_len) for kind in self.layer_kinds()]

    def matmul_params(self) -> int:
        """Matmul parameters: every mixer's projections, SwiGLU (3 D F), the output head (V D)."""
        mixers = sum(c[0] for c in self._costs(1))
        mlps = self.n_layers * 3 * self.d_model * self.ffn_width * self.block_mlp
        return mixers + mlps + self.vocab_size * self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul_params() + each mixer's own term.

        Mixer terms (forward + backward = 3 x forward; C = min(chunk of the mixer, seq_len)):
          linear attention  3 H (C (P + E) + 4 P E): the causal half of the intra-chunk scores
                            and values, plus reading (q S) and writing (k^T v) the P x E state.
                            BASED P = 1 + f + f^2 (f = feature_dim), E = K + 1 (normaliser);
                            retention/lightning P = E = K; GLA P = gla_expand_k D / H, E = K.
          sliding window    12 D c with c = w (1 - w / (2 seq_len)), w = min(window, seq_len),
                            the mean keys per query (seq_len / 2 when w = seq_len: then this is
                            the transformer's causal term 6 D seq_len).
          convolution       6 conv_width D (a multiply-add per tap and channel).
        Norms, gates, decays, feature maps and softmax are not counted.
        """
        return float(6 * self.matmul_params() + sum(c[1] for c in self._costs(seq_len)))

    def state_floats(self, seq_len: int = 0) -> int:
        """Floats of decode state per sequence, all layers (the recall-vs-memory x axis);
        constant in seq_len (sliding windows keep `window` keys and values)."""
        return sum(c[2] for c in self._costs(1))

    def validate(self) -> None:
        """Raises ConfigError naming the field when this config cannot be built."""
        ModelConfig.validate(self)
        c = self
        kinds = c.layer_kinds()
        bad = sorted(set(kinds) - set(MIXERS))
        gla_keys = c.gla_expand_k * c.d_model
        checks = [
            (bool(c.pattern) or c.name in RECIPES, "model.name", f"needs a recipe {RECIPES}"),
            (not bad, "model.pattern", f"has unknown mixers {bad}; letters: {LETTERS}"),
            (len(kinds) == c.n_layers, "model.pattern", f"needs n_layers ({c.n_layers}) letters"),
            (c.d_model % c.n_heads == 0, "model.n_heads", f"must divide d_model ({c.d_model})"),
            (
                c.head_dim % 2 == 0 or not {"retention", "swa"} & set(kinds),
                "model.n_heads",
                "must leave an even head dim for RoPE",
            ),
            (min(c.chunk, c.gla_chunk) >= 1, "model.chunk", "and gla_chunk must be >= 1"),
            (min(c.window, c.conv_width, c.feature_dim) >= 1, "model.window", "conv_width, "
             "feature_dim must be >= 1"),
            (gla_keys == int(gla_keys) and gla_keys % c.n_heads == 0, "model.gla_expand_k",
             "* d_model must be a whole multiple of n_heads"),
            (c.conv_form in CONV_FORMS, "model.conv_form", f"must be one of {CONV_FORMS}"),
            (not (c.state_norm and c.block_mlp), "model.state_norm",
             "replaces the MLP, so it needs model.block_mlp=false"),
        ]  # fmt: skip
        check_all(checks)


def _linear_kw(cfg: Config, rngs: nnx.Rngs) -> dict:
    return dict(rngs=rngs, std=cfg.init_std, dtype=jnp.dtype(cfg.dtype))


class _LinearMixer(Mixer):
    """Shared forms; subclasses give `_qkv(x, positions) -> (q, k, v, log_decay)` and `_out`.
    State: "S" (B, H, P, E) float32, whatever the length."""

    CARRIED = ("S",)

    def __init__(self, cfg: Config, kind: str, chunk: int):
        self.H, self.K, self.chunk = cfg.n_heads, cfg.head_dim, chunk
        self.P, self.E = ops.linear_dims(cfg, kind)

    def init_state(self, batch_size: int, max_len: int) -> State:
        S = jnp.zeros((batch_size, self.H, self.P, self.E), jnp.float32)
        return {"S": S, "seg": jnp.zeros((batch_size,), jnp.int32)}

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        """Chunked linear attention, restarting at each document."""
        B, L, _ = x_BxLxD.shape
        q, k, v, log_decay = self._qkv(x_BxLxD, positions_BxL)
        doc_BxL = ops.doc_index(segment_ids_BxL, (B, L))
        s0 = None
        if state is not None:
            s0 = keep_rows(state["S"], continues(state, segment_ids_BxL, B))
        o, S = ops.chunked_linear_attention(q, k, v, log_decay, doc_BxL, self.chunk, s0)
        return self._out(x_BxLxD, o), {"S": S, "seg": last_segment(state, segment_ids_BxL, B)}

    def step(self, x_BxTxD, positions_BxT, state):
        """One state update per token."""
        q, k, v, log_decay = self._qkv(x_BxTxD, positions_BxT)
        o, S = ops.recurrent_linear_attention(q, k, v, log_decay, state["S"])
        return self._out(x_BxTxD, o), {**state, "S": S}

    def _heads(self, x_BxLxN: jax.Array, n: int) -> jax.Array:
        return x_BxLxN.astype(jnp.float32).reshape(*x_BxLxN.shape[:2], self.H, n)

    def _out(self, x_BxLxD, o_BxLxHxK):
        """o(norm(o) * act(g(x))): the retention / lightning / GLA output."""
        gate_BxLxD = getattr(jax.nn, self.gate_act)(self.g(x_BxLxD).astype(jnp.float32))
        h_BxLxD = self.norm(o_BxLxHxK) * gate_BxLxD
        return self.o(h_BxLxD.astype(x_BxLxD.dtype))


class BasedAttention(_LinearMixer):
    """BASED: o = phi(q) S / phi(q) z, phi the Taylor map of q, k projected to feature_dim."""

    def __init__(self, cfg: Config, *, layer: int = 0, rngs: nnx.Rngs):
        super().__init__(cfg, "based", cfg.chunk)
        D, H, K, self.f = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.feature_dim
        kw = _linear_kw(cfg, rngs)
        self.q = Linear(D, H * self.f, ("embed", "heads"), **kw)
        self.k = Linear(D, H * self.f, ("embed", "heads"), **kw)
        self.v = Linear(D, H * K, ("embed", "heads"), **kw)
        self.o = Linear(H * K, D, ("heads", "embed"), **{**kw, "std": cfg.out_std()})

    def _qkv(self, x_BxLxD, positions_BxL):
        q = ops.taylor_feature_map(self._heads(self.q(x_BxLxD), self.f))
        k = ops.taylor_feature_map(self._heads(self.k(x_BxLxD), self.f))
        v = self._heads(self.v(x_BxLxD), self.K)
        # A ones column in v makes the state carry z = sum phi(k) beside S.
        return q, k, jnp.concatenate([v, jnp.ones_like(v[..., :1])], -1), None

    def _out(self, x_BxLxD, o_BxLxHxE):
        B, L, _ = x_BxLxD.shape
        # phi(q).phi(k) = 1 + s + s^2/2 >= 1/2, so the denominator never nears 0.
        o = o_BxLxHxE[..., :-1] / o_BxLxHxE[..., -1:]
        return self.o(o.reshape(B, L, self.H * self.K).astype(x_BxLxD.dtype))


class ScalarDecayAttention(_LinearMixer):
    """S_t = lambda_h S_{t-1} + k_t^T v_t; out = o(norm(q S) * act(g(x)))."""

    def __init__(self, cfg: Config, *, layer: int, rngs: nnx.Rngs, schedule: str):
        super().__init__(cfg, schedule, cfg.chunk)
        D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
        kw = _linear_kw(cfg, rngs)
        self.rope_theta, self.schedule = cfg.rope_theta, schedule
        # Python floats, not arrays: fixed hyper-parameters, never trained or sharded.
        if schedule == "retention":
            self.log_lambda = tuple(math.log1p(-(2.0 ** (-5 - h))) for h in range(H))
            self.gate_act = "silu"
        else:  # ALiBi slopes scaled down with depth (the last layer keeps a 1e-5 sliver)
            depth = 1 - layer / max(cfg.n_layers - 1, 1) + 1e-5
            self.log_lambda = tuple(-s * depth for s in ops.alibi_slopes(H))
            self.gate_act = "sigmoid"
        self.q, self.k, self.v, self.g = (
            Linear(D, H * K, ("embed", "heads"), **kw) for _ in "qkvg"
        )
        self.norm = HeadNorm(H, K, rngs=rngs, eps=cfg.norm_eps)
        self.o = Linear(H * K, D, ("heads", "embed"), **{**kw, "std": cfg.out_std()})

    def _qkv(self, x_BxLxD, positions_BxL):
        B, L, _ = x_BxLxD.shape
        q, k = self._heads(self.q(x_BxLxD), self.K), self._heads(self.k(x_BxLxD), self.K)
        if self.schedule == "retention":
            q = apply_rope(q, positions_BxL, self.rope_theta)
            k = apply_rope(k, positions_BxL, self.rope_theta)
        else:
            q, k = jax.nn.silu(q), jax.nn.silu(k)
        q, v = q * self.K**-0.5, self._heads(self.v(x_BxLxD), self.K)
        log_lambda_H = jnp.asarray(self.log_lambda, jnp.float32)
        return q, k, v, jnp.broadcast_to(log_lambda_H[None, None], (B, L, self.H))


class Retention(ScalarDecayAttention):
    """RetNet retention (decay 1 - 2^(-5-h); RoPE in place of xPos)."""

    def __init__(self, cfg: Config, *, layer: int = 0, rngs: nnx.Rngs):
        super().__init__(cfg, layer=layer, rngs=rngs, schedule="retention")


class Lightning(ScalarDecayAttention):
    """TransNormerLLM lightning attention: layer-dependent decay, SiLU q/k, no positions.

    Decays follow the released code (ALiBi slopes 2^(-8(h+1)/H) times 1 - l/(L-1) + 1e-5 as
    -log lambda), not the paper's text's -(8h/H)(1 - l/L), which would forget within 1-2 tokens.
    """

    def __init__(self, cfg: Config, *, layer: int = 0, rngs: nnx.Rngs):
        super().__init__(cfg, layer=layer, rngs=rngs, schedule="lightning")


class GatedLinearAttention(_LinearMixer):
    """GLA: S_t = diag(alpha_t) S_{t-1} + k_t^T v_t, alpha_t = sigmoid(x W1 W2 + b)^(1/tau)."""

    def __init__(self, cfg: Config, *, layer: int = 0, rngs: nnx.Rngs):
        super().__init__(cfg, "gla", cfg.gla_chunk)
        D, Dk, r = cfg.d_model, self.H * self.P, cfg.gla_gate_rank
        kw = _linear_kw(cfg, rngs)
        self.tau, self.gate_act = cfg.gla_tau, "silu"
        self.q = Linear(D, Dk, ("embed", "heads"), **kw)
        self.k = Linear(D, Dk, ("embed", "heads"), **kw)
        self.v = Linear(D, D, ("embed", "heads"), **kw)
        self.g = Linear(D, D, ("embed", "heads"), **kw)
        self.gate_down = Linear(D, r, ("embed", None), **kw)
        self.gate_up = Linear(r, Dk, (None, "heads"), **kw)
        self.gate_bias = param(rngs, nnx.initializers.zeros, (Dk,), ("heads",))
        self.norm = HeadNorm(self.H, self.K, rngs=rngs, eps=cfg.norm_eps)
        self.o = Linear(D, D, ("heads", "embed"), **{**kw, "std": cfg.out_std()})

    def _qkv(self, x_BxLxD, positions_BxL):
        q = self._heads(self.q(x_BxLxD), self.P) * self.P**-0.5
        k, v = self._heads(self.k(x_BxLxD), self.P), self._heads(self.v(x_BxLxD), self.K)
        logits = self.gate_up(self.gate_down(x_BxLxD)).astype(jnp.float32)
        log_alpha = jax.nn.log_sigmoid(logits + self.gate_bias[...][None, None]) / self.tau
        return q, k, v, self._heads(log_alpha, self.P)


class SlidingWindowAttention(Mixer):
    """Softmax attention over the last `window` tokens of the same document, with RoPE.

    State: the last `window` keys (after RoPE) and values in order, oldest first, "k"/"v"
    (B, window, H, K), with their segment ids "slot_seg" (B, window) (EMPTY before the first
    token). A call with a state attends over the state's keys and its own.
    """

    def __init__(self, cfg: Config, *, layer: int = 0, rngs: nnx.Rngs):
        D, H, K = cfg.d_model, cfg.n_heads, cfg.head_dim
        kw = _linear_kw(cfg, rngs)
        self.H, self.K, self.window, self.rope_theta = H, K, cfg.window, cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)
        self.q, self.k, self.v = (Linear(D, H * K, ("embed", "heads"), **kw) for _ in "qkv")
        self.o = Linear(H * K, D, ("heads", "embed"), **{**kw, "std": cfg.out_std()})

    def _qkv(self, x_BxLxD, positions_BxL):
        B, L, _ = x_BxLxD.shape
        q, k, v = (p(x_BxLxD).reshape(B, L, self.H, self.K) for p in (self.q, self.k, self.v))
        rope = lambda t: apply_rope(t, positions_BxL, self.rope_theta)
        return rope(q), rope(k), v

    def _out(self, o_BxLxHxK):
        B, L = o_BxLxHxK.shape[:2]
        return self.o(o_BxLxHxK.reshape(B, L, self.H * self.K).astype(self.dtype))

    def init_state(self, batch_size: int, max_len: int) -> State:
        kv = jnp.zeros((batch_size, self.window, self.H, self.K), self.dtype)
        empty = jnp.full((batch_size, self.window), ops.EMPTY, jnp.int32)
        return {"k": kv, "v": kv, "slot_seg": empty, "seg": jnp.zeros((batch_size,), jnp.int32)}

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        """Blocked, O(L window); after a state, over its keys then the call's."""
        B, L, _ = x_BxLxD.shape
        q, k, v = self._qkv(x_BxLxD, positions_BxL)
        seg_BxL = segment_ids_BxL
        if seg_BxL is None:
            seg_B = jnp.zeros((B,), jnp.int32) if state is None else state["seg"]
            seg_BxL = jnp.broadcast_to(seg_B[:, None], (B, L))
        if state is None:
            empty = self.init_state(B, 0)
            o = ops.sliding_window_attention(
                q, k, v, ops.doc_index(segment_ids_BxL, (B, L)), self.window
            )
        else:
            empty = state
        # The keys before the call (empty ones before a fresh start), then the call's own.
        k_all, v_all = (jnp.concatenate([empty[n], a.astype(self.dtype)], 1) for n, a in
                        (("k", k), ("v", v)))  # fmt: skip
        seg_all = jnp.concatenate([empty["slot_seg"], seg_BxL.astype(jnp.int32)], axis=1)
        if state is not None:
            o = ops.sliding_window_after(q, k_all, v_all, ops.doc_index(seg_all, seg_all.shape),
                                         self.window)  # fmt: skip
        W = self.window
        new = {"k": k_all[:, -W:], "v": v_all[:, -W:], "slot_seg": seg_all[:, -W:]}
        return self._out(o), {**new, "seg": last_segment(state, segment_ids_BxL, B)}

    def recurrent(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        """The state path, whatever L: masks, not restarts, keep documents apart."""
        return self.parallel(x_BxLxD, segment_ids_BxL, positions_BxL, state)


class GatedConv(Mixer):
    """Short causal gated convolution, restarting at documents, in one of two forms
    (`conv_form`): "projected", o(conv(in(x)) * gate(x)), whose in/out projections let the
    branch start small (out_std) like every other mixer; or "base", BASED's / Zoology's
    BaseConv, (conv(x) + b) * (x W + c) + x (conv bias initialised as PyTorch's Conv1d).
    State: "conv", the last conv_width - 1 inputs of the convolution."""

    def __init__(self, cfg: Config, *, layer: int = 0, rngs: nnx.Rngs):
        D, kw = cfg.d_model, _linear_kw(cfg, rngs)
        self.base = cfg.conv_form == "base"
        self.gate = Linear(D, D, ("embed", "heads"), **kw)
        conv = dict(rngs=rngs, init=cfg.conv_init, std=cfg.init_std, dtype=kw["dtype"])
        self.conv = ShortConv(D, cfg.conv_width, "heads", **conv)
        if self.base:
            bound = cfg.conv_width**-0.5  # Conv1d's bias: U(+-1/sqrt(fan_in)), fan_in = width
            uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
            self.conv_bias = param(rngs, uniform, (D,), ("heads",))
            self.gate_bias = param(rngs, nnx.initializers.zeros, (D,), ("heads",))
        else:
            self.inp = Linear(D, D, ("embed", "heads"), **kw)
            self.o = Linear(D, D, ("heads", "embed"), **{**kw, "std": cfg.out_std()})

    def _mix(self, x_BxLxD, conv_BxLxD) -> jax.Array:
        if self.base:
            conv_b, gate_b = self.conv_bias[...][None, None], self.gate_bias[...][None, None]
            y = (conv_BxLxD + conv_b) * (self.gate(x_BxLxD) + gate_b)
            return y.astype(x_BxLxD.dtype) + x_BxLxD
        return self.o(conv_BxLxD * self.gate(x_BxLxD))

    def init_state(self, batch_size: int, max_len: int) -> State:
        return {
            "conv": self.conv.init_state(batch_size),
            "seg": jnp.zeros((batch_size,), jnp.int32),
        }

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        B = x_BxLxD.shape[0]
        u = x_BxLxD if self.base else self.inp(x_BxLxD)
        prefix = None
        if state is not None:
            prefix = keep_rows(state["conv"], continues(state, segment_ids_BxL, B))
        y, window = self.conv(u, segment_ids_BxL, prefix)
        return self._mix(x_BxLxD, y), {
            "conv": window,
            "seg": last_segment(state, segment_ids_BxL, B),
        }

    def step(self, x_BxTxD, positions_BxT, state):
        u = x_BxTxD if self.base else self.inp(x_BxTxD)
        y, window = self.conv.step(u, state["conv"])
        return self._mix(x_BxTxD, y), {**state, "conv": window}


MIXERS: dict[str, type[nnx.Module]] = {
    "based": BasedAttention,
    "retention": Retention,
    "lightning": Lightning,
    "gla": GatedLinearAttention,
    "swa": SlidingWindowAttention,
    "conv": GatedConv,
}


def blocks(cfg: Config) -> list[BlockSpec]:
    """One block per letter of the layer pattern: the mixer, then SwiGLU if block_mlp (or,
    with state_norm, x + LayerNorm(x)).

    Init as the transformer's (N(0, init_std^2), residual outputs scaled by 1/sqrt(2 n_layers));
    GLA decay bias 0.
    """
    return [mixer_block(cfg, kind, i) for i, kind in enumerate(cfg.layer_kinds())]


def mixer_block(cfg: Config, kind: str, layer: int) -> BlockSpec:
    """Layer `layer` with mixer `kind` (a name in MIXERS); the hybrid's letters use it too."""
    mlp = None
    if cfg.block_mlp:
        mlp = lambda rngs: SwiGLU(
            cfg.d_model, cfg.ffn_width, rngs=rngs, std=cfg.init_std, out_std=cfg.out_std(),
            dtype=jnp.dtype(cfg.dtype),
        )  # fmt: skip
    mixer = lambda rngs: MIXERS[kind](cfg, layer=layer, rngs=rngs)
    return BlockSpec(mixer, mlp, state_norm=cfg.state_norm)
