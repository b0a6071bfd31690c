"""State-space model family: S4D, H3 and Mamba-2 (SSD) mixers and their pure stacks.

Every mixer keeps the contract of `lmtrain.models.mixer`. The scan and kernel math lives in
`ssm_ops`; the SSM cores run in float32 whatever cfg.dtype.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.errors import check_all
from lmtrain.models import ssm_ops
from lmtrain.models.base import ModelConfig
from lmtrain.models.decoder import BlockSpec
from lmtrain.models.layers import Linear, ShortConv, SwiGLU, param, torch_uniform
from lmtrain.models.mixer import Mixer, State, continues, keep_rows, last_segment

LINEAR_INITS = ("normal", "torch")


@dataclasses.dataclass(frozen=True)
class Config(ModelConfig):
    """SSM options on top of the shared model fields (`n_heads` sets H3 and Mamba-2 heads)."""

    state_size: int = 16  # N: S4D/H3 complex state per channel/head (N/2 conjugate pairs),
    #                       Mamba-2 width of B and C
    expand: int = 2  # Mamba-2 inner width E = expand * d_model, head dim P = E / n_heads
    conv_width: int = 4  # Mamba-2 causal conv on (x, B, C); H3 shift conv on K
    chunk_size: int = 32  # chunk length C of the chunked training forms
    s4d_fft: bool = False  # S4D: FFT convolution when no segment ids (see S4D docstring)
    # Mamba-2's projections at init: "normal" N(0, init_std^2), out by out_std(), as the
    # transformer; "torch" as mamba_ssm / Zoology: PyTorch's nn.Linear default U(+-1/sqrt(fan
    # in)), out_proj's divided by sqrt(n_layers) (one residual branch per layer).
    linear_init: str = "normal"
    conv_bias: bool = False  # Mamba-2's conv on (x, B, C) with a bias, as mamba_ssm's conv1d
    # S4D and H3 blocks: a SwiGLU after the mixer (lmtrain's layout); False: the mixer alone,
    # as Zoology's MQAR models. Mamba-2 blocks are the mixer alone either way.
    block_mlp: bool = True
    # Blocks without an MLP: also x + LayerNorm(x) after each mixer, as Zoology's
    # TransformerBlock with its Identity state mixer (Zoology's H3); its Mamba2Block has none.
    state_norm: bool = False
    # H3: k = shift(k) + d * k, a per-channel skip d ~ N(0, 1) beside the shift conv, as
    # Zoology's H3 (its ssm_k_D); without it the conv's own current-token tap is the skip.
    shift_skip: bool = False

    @property
    def ffn_width(self) -> int:
        """SwiGLU hidden width F (s4d, h3): 2/3 * ffn_mult * d_model up to a multiple of 64."""
        return -(-round(2 / 3 * self.ffn_mult * self.d_model) // 64) * 64

    @property
    def inner_width(self) -> int:
        """Mamba-2 inner width E = expand * d_model."""
        return self.expand * self.d_model

    def matmul_params(self) -> int:
        """Parameters used in matmuls per layer (mixer projections, MLP) plus the output head."""
        D, N, H, E = self.d_model, self.state_size, self.n_heads, self.inner_width
        mlp = 3 * D * self.ffn_width * self.block_mlp
        per_layer = {
            "s4d": D * D + mlp,  # output projection
            "h3": 4 * D * D + mlp,  # q, k, v, o
            "mamba2": D * (2 * E + 2 * N + H) + E * D,  # z, x, B, C, dt in; out
        }[self.name]
        return self.n_layers * per_layer + self.vocab_size * D

    def mixer_macs(self, seq_len: int) -> int:
        """Multiply-adds per token of one mixer's sequence work (chunked training form).

        A complex-mode weight times a real value, or the real part of a complex product,
        counts 2 real multiply-adds. C = min(chunk_size, seq_len), W = conv_width.
        s4d:    D * (C + 2N + 1)              Toeplitz block; chunk states and readout
                                              (M = N/2 modes, 2 each way); D skip
        h3:     W*D + 2*C*D + 2*N*K*D + 2*D   shift conv; q.k scores and scores @ v in the
                                              chunk; per-mode K x K states in and out; skip
        mamba2: W*(E + 2N) + C*N + C*E + 2*N*E + E
                                              conv; c.b scores (one group) and @ x; chunk
                                              states and readout; D skip
        """
        D, N, W, E = self.d_model, self.state_size, self.conv_width, self.inner_width
        C, K = min(self.chunk_size, seq_len), self.d_model // self.n_heads
        return {
            "s4d": D * (C + 2 * N + 1),
            "h3": W * D + 2 * C * D + 2 * N * K * D + 2 * D,
            "mamba2": W * (E + 2 * N) + C * N + C * E + 2 * N * E + E,
        }[self.name]

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul_params() + 6 * n_layers * mixer_macs(seq_len).

        6 = 2 FLOPs per multiply-add x (1 forward + 2 backward), as for the weights. Norms,
        activations, discretisation and the per-chunk scan are not counted.
        """
        return float(6 * self.matmul_params() + 6 * self.n_layers * self.mixer_macs(seq_len))

    def state_floats(self, seq_len: int = 0) -> int:
        """Floats of decode state per sequence, all layers (complex = 2 floats); constant in
        seq_len. s4d: D N; h3: (W-1) D shift window + H N K^2; mamba2: (W-1)(E + 2N) conv
        windows + H P N."""
        D, N, W, E, H = (
            self.d_model,
            self.state_size,
            self.conv_width,
            self.inner_width,
            self.n_heads,
        )
        K = D // H
        per_layer = {
            "s4d": D * N,
            "h3": (W - 1) * D + H * N * K * K,
            "mamba2": (W - 1) * (E + 2 * N) + E * N,
        }[self.name]
        return self.n_layers * per_layer

    def validate(self) -> None:
        """Raises ConfigError naming the field when this config cannot be built."""
        ModelConfig.validate(self)
        c = self
        checks = [
            (c.name in RECIPES, "model.name", f"must be one of {sorted(RECIPES)}"),
            (
                c.state_size >= 2 and c.state_size % 2 == 0,
                "model.state_size",
                "must be even >= 2",
            ),
            (
                c.d_model % c.n_heads == 0,
                "model.n_heads",
                f"must divide d_model ({c.d_model})",
            ),
            (c.expand >= 1, "model.expand", "must be >= 1"),
            (c.conv_width >= 1, "model.conv_width", "must be >= 1"),
            (c.chunk_size >= 1, "model.chunk_size", "must be >= 1"),
            (c.linear_init in LINEAR_INITS, "model.linear_init", f"must be one of {LINEAR_INITS}"),
            (
                c.name == "mamba2" or (c.linear_init == "normal" and not c.conv_bias),
                "model.linear_init",
                "and model.conv_bias apply to Mamba-2 only",
            ),
            (
                not (c.state_norm and RECIPES.get(c.name, ("", False))[1] and c.block_mlp),
                "model.state_norm",
                "replaces the MLP, so it needs model.block_mlp=false",
            ),
            (not c.shift_skip or c.name == "h3", "model.shift_skip", "applies to H3 only"),
        ]
        check_all(checks)


def _resets(state, segment_ids_BxL, batch: int) -> jax.Array | None:
    """Where the state entering a token is dropped: document starts, and token 0 unless it
    continues `state` (None: nowhere)."""
    if state is None:
        return ssm_ops.resets(segment_ids_BxL)
    keep_B = continues(state, segment_ids_BxL, batch)
    reset_BxL = ssm_ops.resets(segment_ids_BxL)
    if reset_BxL is None:  # no segment ids: every row continues
        return None
    return reset_BxL.at[:, 0].set(~keep_B)


class S4D(Mixer):
    """S4D per channel (D independent complex diagonal SSMs), GELU, output projection.

    Training uses the chunked form (exact resets; exactly causal). With `s4d_fft`, no segment
    ids and no state it uses the FFT convolution instead, which is faster for long L but not
    exactly causal: roundoff leaks ~1e-8 of later tokens into earlier outputs.
    State: "h" (B, D, M, 1, 1) complex.
    """

    CARRIED = ("h",)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, self.dtype = cfg.d_model, jnp.dtype(cfg.dtype)
        self.chunk, self.fft = cfg.chunk_size, cfg.s4d_fft
        self.ssm = ssm_ops.DiagonalSSM(D, cfg.state_size, "heads", rngs=rngs)
        self.out = Linear(D, D, ("heads", "embed"), rngs=rngs, std=cfg.out_std(), dtype=self.dtype)

    def _finish(self, y_BxLxD: jax.Array, u_BxLxD: jax.Array) -> jax.Array:
        y_BxLxD = y_BxLxD + self.ssm.d[...][None, None, :] * u_BxLxD
        return self.out(jax.nn.gelu(y_BxLxD).astype(self.dtype))

    def init_state(self, batch_size: int, max_len: int) -> State:
        D, M = self.ssm.c.shape[:2]
        h = jnp.zeros((batch_size, D, M, 1, 1), jnp.complex64)
        return {"h": h, "seg": jnp.zeros((batch_size,), jnp.int32)}

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        B, L, _ = x_BxLxD.shape
        u_BxLxD = x_BxLxD.astype(jnp.float32)
        log_da, db, c = self.ssm.discretised()
        seg = last_segment(state, segment_ids_BxL, B)
        if self.fft and segment_ids_BxL is None and state is None:
            kernel_DxL = ssm_ops.lti_kernel(log_da, db * c, L)
            y_BxLxD = ssm_ops.fft_conv(u_BxLxD, kernel_DxL)
            # The final state for a later call: sum_s dA^(L-1-s) dB u_s, per channel and mode.
            w_DxMxL = db[..., None] * jnp.exp(
                log_da[..., None] * jnp.arange(L - 1, -1, -1)[None, None, :]
            )
            h = jnp.einsum("dml,bld->bdm", w_DxMxL, u_BxLxD.astype(jnp.complex64))
            return self._finish(y_BxLxD, u_BxLxD), {"h": h[..., None, None], "seg": seg}
        h0 = None if state is None else state["h"]
        y_BxLxDx1, h = ssm_ops.lti_chunked(
            None, None, u_BxLxD[..., None], log_da, db, c,
            _resets(state, segment_ids_BxL, B), self.chunk, h0,
        )  # fmt: skip
        return self._finish(y_BxLxDx1[..., 0], u_BxLxD), {"h": h, "seg": seg}

    def step(self, x_BxTxD, positions_BxT, state):
        u_BxTxD = x_BxTxD.astype(jnp.float32)
        ones_BxTxDx1 = jnp.ones((*u_BxTxD.shape, 1), jnp.float32)
        y_BxTxDx1, h = ssm_ops.lti_step(
            ones_BxTxDx1, ones_BxTxDx1, u_BxTxD[..., None], *self.ssm.discretised(), state["h"]
        )
        return self._finish(y_BxTxDx1[..., 0], u_BxTxD), {**state, "h": h}


class H3(Mixer):
    """H3: y = out(Q * SSM_diag(shift(K) V^T)) per head, with a D skip in the diagonal SSM.

    The shift SSM is a causal depthwise conv of width conv_width on K (plus, with shift_skip,
    a per-channel skip d * K); the diagonal SSM (S4D-Lin, one per head, shared by the head's
    K x K entries) runs over the outer products.
    State: the shift conv's window "conv" (B, W, D) and "h" (B, H, M, K, K) complex.
    """

    CARRIED = ("h",)

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, H = cfg.d_model, cfg.n_heads
        self.H, self.K, self.chunk = H, D // H, cfg.chunk_size
        dtype, std = jnp.dtype(cfg.dtype), cfg.init_std
        self.q = Linear(D, D, ("embed", "heads"), rngs=rngs, std=std, dtype=dtype)
        self.k = Linear(D, D, ("embed", "heads"), rngs=rngs, std=std, dtype=dtype)
        self.v = Linear(D, D, ("embed", "heads"), rngs=rngs, std=std, dtype=dtype)
        self.o = Linear(D, D, ("heads", "embed"), rngs=rngs, std=cfg.out_std(), dtype=dtype)
        conv = dict(rngs=rngs, init=cfg.conv_init, std=std, dtype=dtype)
        self.shift = ShortConv(D, cfg.conv_width, "heads", **conv)
        self.shift_d = nnx.data(None)
        if cfg.shift_skip:
            self.shift_d = param(rngs, nnx.initializers.normal(1.0), (D,), ("heads",))
        self.ssm = ssm_ops.DiagonalSSM(H, cfg.state_size, "heads", rngs=rngs)

    def _shifted(self, k_BxLxD: jax.Array, conv_BxLxD: jax.Array) -> jax.Array:
        if self.shift_d is None:
            return conv_BxLxD
        return conv_BxLxD + (self.shift_d[...][None, None, :] * k_BxLxD).astype(conv_BxLxD.dtype)

    def _heads(self, *xs: jax.Array) -> list[jax.Array]:
        return [x.astype(jnp.float32).reshape(*x.shape[:2], self.H, self.K) for x in xs]

    def _finish(self, y_BxLxHxK, q_BxLxHxK, k_BxLxHxK, v_BxLxHxK, dtype) -> jax.Array:
        qk_BxLxH = jnp.sum(q_BxLxHxK * k_BxLxHxK, axis=-1)
        skip_BxLxHx1 = (self.ssm.d[...][None, None, :] * qk_BxLxH)[..., None]
        y_BxLxHxK = y_BxLxHxK + skip_BxLxHx1 * v_BxLxHxK
        return self.o(y_BxLxHxK.reshape(*y_BxLxHxK.shape[:2], -1).astype(dtype))

    def init_state(self, batch_size: int, max_len: int) -> State:
        M = self.ssm.c.shape[1]
        h = jnp.zeros((batch_size, self.H, M, self.K, self.K), jnp.complex64)
        seg = jnp.zeros((batch_size,), jnp.int32)
        return {"conv": self.shift.init_state(batch_size), "h": h, "seg": seg}

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        B = x_BxLxD.shape[0]
        prefix = h0 = None
        if state is not None:
            prefix = keep_rows(state["conv"], continues(state, segment_ids_BxL, B))
            h0 = state["h"]
        k_BxLxD = self.k(x_BxLxD)
        shifted_BxLxD, conv = self.shift(k_BxLxD, segment_ids_BxL, prefix)
        shifted_BxLxD = self._shifted(k_BxLxD, shifted_BxLxD)
        q, k, v = self._heads(self.q(x_BxLxD), shifted_BxLxD, self.v(x_BxLxD))
        reset_BxL = _resets(state, segment_ids_BxL, B)
        y, h = ssm_ops.lti_chunked(q, k, v, *self.ssm.discretised(), reset_BxL, self.chunk, h0)
        seg = last_segment(state, segment_ids_BxL, B)
        return self._finish(y, q, k, v, x_BxLxD.dtype), {"conv": conv, "h": h, "seg": seg}

    def step(self, x_BxTxD, positions_BxT, state):
        k_BxTxD = self.k(x_BxTxD)
        shifted_BxTxD, conv = self.shift.step(k_BxTxD, state["conv"])
        shifted_BxTxD = self._shifted(k_BxTxD, shifted_BxTxD)
        q, k, v = self._heads(self.q(x_BxTxD), shifted_BxTxD, self.v(x_BxTxD))
        y, h = ssm_ops.lti_step(q, k, v, *self.ssm.discretised(), state["h"])
        return self._finish(y, q, k, v, x_BxTxD.dtype), {**state, "conv": conv, "h": h}


def _a_log_init(key, shape, dtype):
    """log of A ~ U[1, 16] (Mamba-2)."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def _dt_bias_init(key, shape, dtype):
    """Inverse softplus of dt ~ log-uniform [DT_MIN, DT_MAX], so softplus(bias) starts there."""
    dt = jnp.exp(ssm_ops.log_uniform(ssm_ops.DT_MIN, ssm_ops.DT_MAX)(key, shape, dtype))
    return dt + jnp.log(-jnp.expm1(-dt))


class Mamba2(Mixer):
    """Mamba-2 mixer: in-proj (z, x, B, C, dt); conv + SiLU on x, B, C; SSD; D skip; gated
    RMSNorm with z; out-proj. One B/C group shared by all heads.
    State: the conv windows "conv_x", "conv_b", "conv_c" and "h" (B, H, P, N) float32."""

    CARRIED = ("h",)

    CONVS = ("conv_x", "conv_b", "conv_c")

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        D, N, H, E, W = cfg.d_model, cfg.state_size, cfg.n_heads, cfg.inner_width, cfg.conv_width
        self.H, self.P, self.chunk, self.eps = H, E // H, cfg.chunk_size, cfg.norm_eps
        dtype, std = jnp.dtype(cfg.dtype), cfg.init_std
        torch = cfg.linear_init == "torch"
        lin = dict(rngs=rngs, std=std, dtype=dtype, init=torch_uniform(D) if torch else None)
        self.in_z = Linear(D, E, ("embed", "heads"), **lin)
        self.in_x = Linear(D, E, ("embed", "heads"), **lin)
        self.in_b = Linear(D, N, ("embed", "state"), **lin)
        self.in_c = Linear(D, N, ("embed", "state"), **lin)
        self.in_dt = Linear(D, H, ("embed", "heads"), **lin)
        conv = dict(rngs=rngs, std=std, dtype=dtype, init=cfg.conv_init, bias=cfg.conv_bias)
        self.conv_x = ShortConv(E, W, "heads", **conv)
        self.conv_b = ShortConv(N, W, "state", **conv)
        self.conv_c = ShortConv(N, W, "state", **conv)
        self.a_log = param(rngs, _a_log_init, (H,), ("heads",))
        self.dt_bias = param(rngs, _dt_bias_init, (H,), ("heads",))
        self.d = param(rngs, nnx.initializers.ones, (H,), ("heads",))
        self.norm_scale = param(rngs, nnx.initializers.ones, (E,), ("heads",))
        out_init = torch_uniform(E, cfg.n_layers**-0.5) if torch and not cfg.zero_init else None
        self.out = Linear(
            E, D, ("heads", "embed"), rngs=rngs, std=cfg.out_std(), dtype=dtype, init=out_init
        )

    def _ssd_inputs(self, x_BxLxD: jax.Array, xs, b, c):
        """float32 (x_BxLxHxP, dt_BxLxH, a_H, b_BxLxN, c_BxLxN) from conv outputs."""
        B, L, _ = x_BxLxD.shape
        xs, b, c = (jax.nn.silu(a.astype(jnp.float32)) for a in (xs, b, c))
        dt_raw = self.in_dt(x_BxLxD).astype(jnp.float32)
        dt_BxLxH = jax.nn.softplus(dt_raw + self.dt_bias[...][None, None, :])
        return xs.reshape(B, L, self.H, self.P), dt_BxLxH, -jnp.exp(self.a_log[...]), b, c

    def _finish(self, y_BxLxHxP, x_BxLxHxP, z_BxLxE) -> jax.Array:
        y_BxLxHxP = y_BxLxHxP + self.d[...][None, None, :, None] * x_BxLxHxP
        y_BxLxE = y_BxLxHxP.reshape(*y_BxLxHxP.shape[:2], -1)
        # Mamba-2 gated RMSNorm (gate before the norm), statistics in float32.
        g_BxLxE = y_BxLxE * jax.nn.silu(z_BxLxE.astype(jnp.float32))
        inv_rms = jax.lax.rsqrt(jnp.mean(g_BxLxE * g_BxLxE, axis=-1, keepdims=True) + self.eps)
        g_BxLxE = g_BxLxE * inv_rms * self.norm_scale[...][None, None, :]
        return self.out(g_BxLxE.astype(self.out.dtype))

    def init_state(self, batch_size: int, max_len: int) -> State:
        N = self.in_b.kernel.shape[1]
        state = {name: getattr(self, name).init_state(batch_size) for name in self.CONVS}
        h = jnp.zeros((batch_size, self.H, self.P, N), jnp.float32)
        return {**state, "h": h, "seg": jnp.zeros((batch_size,), jnp.int32)}

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state):
        B = x_BxLxD.shape[0]
        keep = None if state is None else continues(state, segment_ids_BxL, B)
        new, outs = {}, []
        for name, proj in zip(self.CONVS, (self.in_x, self.in_b, self.in_c), strict=True):
            prefix = None if state is None else keep_rows(state[name], keep)
            y, new[name] = getattr(self, name)(proj(x_BxLxD), segment_ids_BxL, prefix)
            outs.append(y)
        xs, dt, a, b, c = self._ssd_inputs(x_BxLxD, *outs)
        reset_BxL = _resets(state, segment_ids_BxL, B)
        h0 = None if state is None else state["h"]
        y, new["h"] = ssm_ops.ssd_chunked(xs, dt, a, b, c, reset_BxL, self.chunk, h0)
        new["seg"] = last_segment(state, segment_ids_BxL, B)
        return self._finish(y, xs, self.in_z(x_BxLxD)), new

    def step(self, x_BxTxD, positions_BxT, state):
        new = dict(state)
        outs = []
        for name, proj in zip(self.CONVS, (self.in_x, self.in_b, self.in_c), strict=True):
            y, new[name] = getattr(self, name).step(proj(x_BxTxD), state[name])
            outs.append(y)
        xs, dt, a, b, c = self._ssd_inputs(x_BxTxD, *outs)
        y, new["h"] = ssm_ops.ssd_step(xs, dt, a, b, c, state["h"])
        return self._finish(y, xs, self.in_z(x_BxTxD)), new


MIXERS: dict[str, type[nnx.Module]] = {"s4d": S4D, "h3": H3, "mamba2": Mamba2}
# model.name -> (mixer, whether each block also has a SwiGLU MLP)
RECIPES: dict[str, tuple[str, bool]] = {
    "s4d": ("s4d", True),
    "h3": ("h3", True),
    "mamba2": ("mamba2", False),
}


def blocks(cfg: Config) -> list[BlockSpec]:
    """n_layers blocks of the recipe's mixer (SwiGLU after it for s4d and h3 unless
    block_mlp=False; Mamba-2 alone).

    Init as the transformer (N(0, init_std^2), residual outputs scaled by 1/sqrt(2 n_layers));
    SSM parameters as in S4D-Lin / Mamba-2. SSMs ignore positions.
    """
    return [mixer_block(cfg)] * cfg.n_layers


def mixer_block(cfg: Config) -> BlockSpec:
    """One layer of the recipe `cfg.name` (also the hybrid's letters S, H, M)."""
    mixer, has_mlp = RECIPES[cfg.name]
    mlp = None
    if has_mlp and cfg.block_mlp:
        mlp = lambda rngs: SwiGLU(
            cfg.d_model, cfg.ffn_width, rngs=rngs, std=cfg.init_std, out_std=cfg.out_std(),
            dtype=jnp.dtype(cfg.dtype),
        )  # fmt: skip
    return BlockSpec(
        mixer=lambda rngs: MIXERS[mixer](cfg, rngs=rngs), mlp=mlp, state_norm=cfg.state_norm
    )
