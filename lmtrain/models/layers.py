"""Layers shared by the model families.

Shape letters used in names (`x_BxLxD` is an array of shape (B, L, D)):

    B batch             L sequence length       D model width
    H query heads       K head dim              F ffn hidden width
    V vocabulary        N state size            C chunk length / channels of a conv
    G kv groups (kv heads; H is a multiple of G)
    T new tokens in one decode call             S cache length
    W conv state length (conv width - 1)

Parameters are float32 and carry `logical_axes` metadata (one name per dim, or None); only
`lmtrain.sharding` maps those names to mesh axes. Layers compute in their `dtype` (the compute
dtype) and cast parameters at use.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.sharding import constrain

Init = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]

# The logical axis names a parameter may carry; sharding.py has a rule (or None) for each.
AXIS_NAMES = ("vocab", "embed", "mlp", "heads", "kv", "head_dim", "conv", "state")


def param(
    rngs: nnx.Rngs,
    init: Init,
    shape: Sequence[int],
    axes: Sequence[str | None],
    *,
    weight_decay: bool | None = None,
    muon: bool | None = None,
) -> nnx.Param:
    """A float32 `nnx.Param` initialised by `init`, tagged with one logical axis name per dim.

    `weight_decay` (metadata read by `lmtrain.optim.decay_mask`) defaults to "is a matrix":
    weights decay, norm scales and biases do not. Pass False for matrices that are not weights
    (SSM decay rates, discretisation steps, state readouts). `muon` (read by
    `lmtrain.optim.muon_mask`: which parameters optim.name="muon" orthogonalises) defaults to
    "a hidden weight matrix": 2-D, decayed, and neither a vocabulary (embedding, output head)
    nor a convolution's taps.
    """
    shape, axes = tuple(shape), tuple(axes)
    if len(shape) != len(axes) or any(a is not None and a not in AXIS_NAMES for a in axes):
        raise ValueError(f"bad logical axes {axes} for shape {shape}; names: {AXIS_NAMES}")
    decay = len(shape) >= 2 if weight_decay is None else weight_decay
    if muon is None:
        muon = len(shape) == 2 and decay and not {"vocab", "conv"} & set(axes)
    value = init(rngs.params(), shape, jnp.float32)
    return nnx.Param(value, logical_axes=axes, weight_decay=decay, muon=muon)


def normal(std: float) -> Init:
    """Initialiser drawing from N(0, std^2)."""
    return nnx.initializers.normal(stddev=std)


def torch_uniform(fan_in: int, scale: float = 1.0) -> Init:
    """PyTorch's default for nn.Linear / nn.Conv1d weights and biases: U(+-1/sqrt(fan_in))
    (kaiming_uniform with a = sqrt(5)), times `scale`."""
    bound = scale / math.sqrt(fan_in)
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nnx.Module):
    """Bias-free dense layer: kernel (in, out), computed in `dtype`; N(0, std^2) at init
    unless `init` is given."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        axes: tuple[str | None, str | None],
        *,
        rngs: nnx.Rngs,
        std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        init: Init | None = None,
    ):
        self.kernel = param(rngs, init or normal(std), (d_in, d_out), axes)
        self.dtype = dtype

    def __call__(self, x: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
        """x (..., in) -> (..., out); `out_dtype` asks for a wider accumulation (e.g. logits)."""
        kernel = self.kernel[...].astype(self.dtype)
        return jnp.dot(x.astype(self.dtype), kernel, preferred_element_type=out_dtype)


class Embed(nnx.Module):
    """Token embedding table (V, D); `attend` reuses it as a tied output head."""

    def __init__(
        self, vocab_size: int, d_model: int, *, rngs: nnx.Rngs, std: float, dtype: jnp.dtype
    ):
        self.table = param(rngs, normal(std), (vocab_size, d_model), ("vocab", "embed"))
        self.dtype = dtype

    def __call__(self, tokens_BxL: jax.Array) -> jax.Array:
        """Looks up tokens; returns x_BxLxD in the compute dtype."""
        # Gathered over fsdp before the lookup (as fsdp gathers every weight before use): a
        # lookup into a table split along D would give width-split rows that XLA can only turn
        # into batch-split ones by replicating the whole [B, L, D] activation on every chip.
        table_VxD = constrain(self.table[...], "vocab", "embed")
        return jnp.take(table_VxD, tokens_BxL, axis=0).astype(self.dtype)

    def attend(self, x_BxLxD: jax.Array) -> jax.Array:
        """Tied output head: float32 logits_BxLxV = x @ table^T."""
        table_VxD = self.table[...].astype(self.dtype)
        return jnp.dot(x_BxLxD.astype(self.dtype), table_VxD.T, preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
    """RMS normalisation with a learned scale; statistics in float32 whatever the input dtype."""

    def __init__(
        self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-6, dtype: jnp.dtype, axis: str = "embed"
    ):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """Normalises x (..., D) over its last axis; returns the compute dtype."""
        x = x_BxLxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
        return (x * inv_rms * scale).astype(self.dtype)


class LayerNorm(nnx.Module):
    """Layer normalisation (mean and variance over the last axis) with a learned scale and
    bias, as torch.nn.LayerNorm; statistics in float32. Used where a reference's LayerNorm is
    part of the function (Zoology's identity state mixer, `BlockSpec.state_norm`)."""

    def __init__(
        self, dim: int, *, rngs: nnx.Rngs, eps: float = 1e-5, dtype: jnp.dtype, axis: str = "embed"
    ):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), (axis,))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), (axis,))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """Normalises x (..., D) over its last axis; returns the compute dtype."""
        x = x_BxLxD.astype(jnp.float32)
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        shape = (1,) * (x.ndim - 1) + (-1,)
        y = centred * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].reshape(shape) + self.bias[...].reshape(shape)).astype(
            self.dtype
        )


def apply_rope(x_BxLxHxK: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half layout) at integer `positions`; K must be even."""
    half = x_BxLxHxK.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxLxK2 = positions_BxL.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    sin_BxLx1xK2 = jnp.sin(angles_BxLxK2)[:, :, None, :]
    cos_BxLx1xK2 = jnp.cos(angles_BxLxK2)[:, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate(
        [x1 * cos_BxLx1xK2 - x2 * sin_BxLx1xK2, x2 * cos_BxLx1xK2 + x1 * sin_BxLx1xK2], axis=-1
    )
    return out.astype(x_BxLxHxK.dtype)


class SwiGLU(nnx.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(
        self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, std: float, out_std: float, dtype
    ):
        self.gate = Linear(d_model, d_ff, ("embed", "mlp"), rngs=rngs, std=std, dtype=dtype)
        self.up = Linear(d_model, d_ff, ("embed", "mlp"), rngs=rngs, std=std, dtype=dtype)
        self.down = Linear(d_ff, d_model, ("mlp", "embed"), rngs=rngs, std=out_std, dtype=dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """x_BxLxD -> x_BxLxD."""
        h_BxLxF = jax.nn.silu(self.gate(x_BxLxD)) * self.up(x_BxLxD)
        return self.down(h_BxLxF)


class ReluSquaredMLP(nnx.Module):
    """Primer MLP: down(relu(up(x))^2)."""

    def __init__(
        self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, std: float, out_std: float, dtype
    ):
        self.up = Linear(d_model, d_ff, ("embed", "mlp"), rngs=rngs, std=std, dtype=dtype)
        self.down = Linear(d_ff, d_model, ("mlp", "embed"), rngs=rngs, std=out_std, dtype=dtype)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        """x_BxLxD -> x_BxLxD."""
        return self.down(jnp.square(jax.nn.relu(self.up(x_BxLxD))))


# activation name -> (MLP class, number of D x F matrices it holds)
MLPS: dict[str, tuple[type[nnx.Module], int]] = {
    "swiglu": (SwiGLU, 3),
    "relu2": (ReluSquaredMLP, 2),
}


CONV_INITS = ("uniform", "identity")


def conv_init(name: str, width: int, std: float = 0.02) -> Init:
    """Initialiser of a short convolution's taps (width, channels), by model.conv_init:

    "uniform"   U(+-1/sqrt(width)) on every tap, PyTorch's Conv1d default (what Zoology,
                mamba_ssm and BASED's released models start from);
    "identity"  the current-token tap 1 and the others N(0, std^2): a fresh conv passes x
                through. Its near-zero shift taps are why lmtrain's BASED could not learn MQAR
                (BENCHMARKS.md, "MQAR at seq 256"): recall needs the previous token shifted in.
    """
    if name == "identity":

        def identity(key: jax.Array, shape: tuple[int, ...], dtype: jnp.dtype) -> jax.Array:
            return jnp.zeros(shape, dtype).at[0].set(1.0) + std * jax.random.normal(
                key, shape, dtype
            )

        return identity
    return torch_uniform(width)


class ShortConv(nnx.Module):
    """Causal depthwise convolution over the sequence that restarts at each segment start.

    kernel[j, c] weights channel c of the token j steps back (j = 0 is the current token).
    Training form `__call__` sees whole sequences; `step` consumes T >= 1 new tokens and carries
    the last W = width - 1 inputs as state (zeros at the start, like the training form's padding).
    """

    def __init__(
        self,
        channels: int,
        width: int,
        channel_axis: str | None,
        *,
        rngs: nnx.Rngs,
        init: str = "uniform",
        std: float = 0.02,
        dtype: jnp.dtype = jnp.float32,
        bias: bool = False,
    ):
        taps = conv_init(init, width, std)  # see conv_init for the two choices
        self.kernel = param(rngs, taps, (width, channels), ("conv", channel_axis))
        # A bias as PyTorch's Conv1d has (mamba_ssm's conv1d): U(+-1/sqrt(width)) at init.
        bias_init = torch_uniform(width)
        self.bias = param(rngs, bias_init, (channels,), (channel_axis,)) if bias else None
        self.width = width
        self.dtype = dtype

    def _biased(self, y_BxLxC: jax.Array) -> jax.Array:
        return y_BxLxC if self.bias is None else y_BxLxC + self.bias[...][None, None, :]

    def __call__(
        self,
        x_BxLxC: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        prefix_BxWxC: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(y, window): y_t = sum_j kernel[j] * x_{t-j}, counting only x_{t-j} in the same
        segment as x_t; `prefix` holds the W inputs before x_0 (the state of an earlier call,
        zero where it must not be seen) and belongs to x_0's segment. `window` is the last W
        inputs of the last token's segment (zeros elsewhere): the state after the call."""
        B, L, C = x_BxLxC.shape
        W = self.width - 1
        if prefix_BxWxC is not None:  # the same convolution over prefix + x, minus the prefix
            xx = jnp.concatenate([prefix_BxWxC.astype(x_BxLxC.dtype), x_BxLxC], axis=1)
            seg = segment_ids_BxL
            if seg is not None:
                seg = jnp.concatenate([jnp.broadcast_to(seg[:, :1], (B, W)), seg], axis=1)
            y, _ = self(xx, seg)
            return y[:, W:], self._window(xx, seg)
        kernel_WxC = self.kernel[...]
        y = kernel_WxC[0][None, None, :] * x_BxLxC.astype(jnp.float32)
        for j in range(1, min(self.width, L)):  # a shift of L or more sees only padding
            xj_BxLxC = jnp.pad(x_BxLxC, ((0, 0), (j, 0), (0, 0)))[:, :L].astype(jnp.float32)
            if segment_ids_BxL is not None:
                same_BxL = segment_ids_BxL[:, j:] == segment_ids_BxL[:, :-j]
                same_BxL = jnp.pad(same_BxL, ((0, 0), (j, 0)), constant_values=False)
                xj_BxLxC = jnp.where(same_BxL[:, :, None], xj_BxLxC, 0.0)
            y = y + kernel_WxC[j][None, None, :] * xj_BxLxC
        return self._biased(y).astype(x_BxLxC.dtype), self._window(x_BxLxC, segment_ids_BxL)

    def _window(self, x_BxLxC: jax.Array, segment_ids_BxL: jax.Array | None) -> jax.Array:
        """The last W inputs (zero-padded in front), zero where not in the last token's segment."""
        W = self.width - 1
        B, L, C = x_BxLxC.shape
        pad = max(W - L, 0)
        window = jnp.pad(x_BxLxC, ((0, 0), (pad, 0), (0, 0)))[:, L + pad - W :]
        if segment_ids_BxL is not None and W:
            seg = jnp.pad(segment_ids_BxL, ((0, 0), (pad, 0)), mode="edge")[:, L + pad - W :]
            window = jnp.where((seg == segment_ids_BxL[:, -1:])[..., None], window, 0)
        return window.astype(self.dtype)

    def init_state(self, batch_size: int) -> jax.Array:
        """Zero state (B, W, C) in the compute dtype: nothing seen yet."""
        return jnp.zeros((batch_size, self.width - 1, self.kernel.shape[1]), self.dtype)

    def step(self, x_BxTxC: jax.Array, state_BxWxC: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Convolves T new tokens given the previous W inputs; returns (y_BxTxC, new state)."""
        T, W = x_BxTxC.shape[1], self.width - 1
        window = jnp.concatenate([state_BxWxC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
        kernel_WxC = self.kernel[...]
        y = kernel_WxC[0][None, None, :] * x_BxTxC.astype(jnp.float32)
        for j in range(1, self.width):
            y = y + kernel_WxC[j][None, None, :] * window[:, W - j : W - j + T].astype(jnp.float32)
        new_state = window[:, window.shape[1] - W :].astype(state_BxWxC.dtype)
        return self._biased(y).astype(x_BxTxC.dtype), new_state


class HeadNorm(nnx.Module):
    """RMSNorm over each head's values (float32 statistics), a learned scale per channel."""

    def __init__(self, H: int, K: int, *, rngs: nnx.Rngs, eps: float):
        self.scale = param(rngs, nnx.initializers.ones, (H * K,), ("heads",))
        self.H, self.K, self.eps = H, K, eps

    def __call__(self, o_BxLxHxK: jax.Array) -> jax.Array:
        """o_BxLxHxK (float32) -> normalised, flattened to (B, L, H*K)."""
        inv_rms = jax.lax.rsqrt(jnp.mean(o_BxLxHxK * o_BxLxHxK, -1, keepdims=True) + self.eps)
        B, L = o_BxLxHxK.shape[:2]
        return (o_BxLxHxK * inv_rms).reshape(B, L, self.H * self.K) * self.scale[...][None, None]
