"""Causal softmax attention over packed documents, by implementation name (model.attention_impl).

    xla     jax.nn.dot_product_attention(implementation="xla"): the [B, H, L, L] scores are
            materialised; document masking is a dense mask. Any platform.
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused flash
            attention on NVIDIA GPUs (bf16/f16); jax turns the document mask into a dense bias.
    splash  Pallas splash attention (jax.experimental.pallas.ops.tpu.splash_attention), the TPU
            flash kernel: a causal block mask plus segment ids, so packed documents need no
            dense mask and fully masked blocks are skipped. Grouped-query attention runs the
            MQA kernel once per kv head. Under a mesh it runs in a shard_map (batch over
            data+fsdp, heads over tensor); off TPU it runs in Pallas interpret mode, which is
            how the tests check its numerics on CPU (slow: for tests, not training).

All take q_BxLxHxK, k/v_BxLxGxK (H a multiple of G) and segment_ids_BxL (None: one document per
row) and return o_BxLxHxK in q's dtype.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lmtrain import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "splash")
# splash's key blocks are multiples of the TPU's 128 lanes: a shorter or ragged row (the few
# tokens of a sequence split's halo) takes the XLA path instead.
SPLASH_MIN = 128


def attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, impl: str = "xla") -> jax.Array:
    """Causal attention of every position to earlier positions of its own segment."""
    if impl == "splash" and q_BxLxHxK.shape[1] % SPLASH_MIN == 0:
        return splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    impl = "xla" if impl == "splash" else impl
    mask_Bx1xLxL = None
    if segment_ids_BxL is not None:
        mask_Bx1xLxL = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_Bx1xLxL, is_causal=True, implementation=impl
    )


def splash_block(seq_len: int) -> int:
    """Splash tile size for a sequence: the largest power of two <= 512 dividing it."""
    return math.gcd(seq_len, 512)


def _kernel(heads_per_group: int, q_len: int, kv_len: int, offset: int, interpret: bool):
    """The MQA kernel for q_len queries at positions offset .. offset + q_len - 1 against keys
    0 .. kv_len - 1 under the causal mask (offset 0, q_len = kv_len: an unsplit row)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    bq, bk = splash_block(q_len), splash_block(kv_len)
    sizes = sa.BlockSizes(
        block_q=bq,
        block_kv=bk,
        block_kv_compute=bk,
        block_q_dkv=bq,
        block_kv_dkv=bk,
        block_kv_dkv_compute=bk,
        block_q_dq=bq,
        block_kv_dq=bk,
    )
    causal = sa.CausalMask((q_len, kv_len), offset=offset)
    mask = sa.MultiHeadMask([causal] * heads_per_group)
    # Built afresh in every trace (not cached): it holds its block-mask tables as arrays of
    # the trace that made it.
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def interpret_mode() -> bool:
    """Whether Pallas runs interpreted: everywhere but on a TPU (the traced mesh's platform)."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    return platform != "tpu"


def splash_local(
    q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, seg_q_BxL, seg_kv_BxS, interpret: bool, offset: int = 0
):
    """Splash on one device's shard, vmapped over rows and kv heads: queries at positions
    offset .. offset + L - 1 (segment ids seg_q) to keys 0 .. S - 1 (seg_kv)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, L, H, K = q_BxLxHxK.shape
    S, G = k_BxSxGxK.shape[1], k_BxSxGxK.shape[2]
    kernel = _kernel(H // G, L, S, offset, interpret)
    # The kernel does not scale the scores; fold 1/sqrt(K) into q as XLA's path does.
    q = (q_BxLxHxK * jnp.asarray(1 / math.sqrt(K), q_BxLxHxK.dtype)).reshape(B, L, G, H // G, K)
    q_BxGxMxLxK = q.transpose(0, 2, 3, 1, 4)
    k_BxGxSxK = k_BxSxGxK.transpose(0, 2, 1, 3)
    v_BxGxSxK = v_BxSxGxK.transpose(0, 2, 1, 3)

    def one_row(q_GxMxLxK, k_GxSxK, v_GxSxK, seg_L, seg_S):
        ids = SegmentIds(q=seg_L, kv=seg_S)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(
            q_GxMxLxK, k_GxSxK, v_GxSxK
        )

    o_BxGxMxLxK = jax.vmap(one_row)(q_BxGxMxLxK, k_BxGxSxK, v_BxGxSxK, seg_q_BxL, seg_kv_BxS)
    return o_BxGxMxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


def _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret: bool):
    """Splash on one device's whole rows."""
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.zeros(q_BxLxHxK.shape[:2], jnp.int32)
    return splash_local(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, segment_ids_BxL, interpret
    )


def splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL) -> jax.Array:
    """Splash attention; sharded by a shard_map when traced under a mesh (sharding.constrain's
    rules: rows over data+fsdp, kv heads over tensor when they divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    interpret = interpret_mode()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret)
    B, L, H, _ = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    rows = sharding.activation_spec(("batch",), (B,), mesh)[0]
    heads = sharding.activation_spec(("kv",), (G,), mesh)[0]
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.zeros((B, L), jnp.int32)
    qkv = P(rows, None, heads, None)
    fn = jax.shard_map(
        functools.partial(_splash_local, interpret=interpret),
        mesh=mesh,
        in_specs=(qkv, qkv, qkv, P(rows, None)),
        out_specs=qkv,
        check_vma=False,
    )
    return fn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
