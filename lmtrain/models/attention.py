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


def attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, impl: str = "xla") -> jax.Array:
    """Causal attention of every position to earlier positions of its own segment."""
    if impl == "splash":
        return splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    mask_Bx1xLxL = None
    if segment_ids_BxL is not None:
        mask_Bx1xLxL = segment_ids_BxL[:, None, :, None] == segment_ids_BxL[:, None, None, :]
    return jax.nn.dot_product_attention(
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, mask=mask_Bx1xLxL, is_causal=True, implementation=impl
    )


def splash_block(seq_len: int) -> int:
    """Splash tile size for a sequence: the largest power of two <= 512 dividing it."""
    return math.gcd(seq_len, 512)


def _kernel(heads_per_group: int, seq_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = splash_block(seq_len)
    sizes = sa.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    mask = sa.MultiHeadMask([sa.CausalMask((seq_len, seq_len))] * heads_per_group)
    # Built afresh in every trace (not cached): it holds its block-mask tables as arrays of
    # the trace that made it.
    return sa.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _splash_local(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, interpret: bool):
    """Splash on one device's shard: vmapped over rows and kv heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, L, H, K = q_BxLxHxK.shape
    G = k_BxLxGxK.shape[2]
    kernel = _kernel(H // G, L, interpret)
    # The kernel does not scale the scores; fold 1/sqrt(K) into q as XLA's path does.
    q = (q_BxLxHxK * jnp.asarray(1 / math.sqrt(K), q_BxLxHxK.dtype)).reshape(B, L, G, H // G, K)
    q_BxGxMxLxK = q.transpose(0, 2, 3, 1, 4)
    k_BxGxLxK = k_BxLxGxK.transpose(0, 2, 1, 3)
    v_BxGxLxK = v_BxLxGxK.transpose(0, 2, 1, 3)
    if segment_ids_BxL is None:
        segment_ids_BxL = jnp.zeros((B, L), jnp.int32)

    def one_row(q_GxMxLxK, k_GxLxK, v_GxLxK, seg_L):
        ids = SegmentIds(q=seg_L, kv=seg_L)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(
            q_GxMxLxK, k_GxLxK, v_GxLxK
        )

    o_BxGxMxLxK = jax.vmap(one_row)(q_BxGxMxLxK, k_BxGxLxK, v_BxGxLxK, segment_ids_BxL)
    return o_BxGxMxLxK.transpose(0, 3, 1, 2, 4).reshape(B, L, H, K)


def splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL) -> jax.Array:
    """Splash attention; sharded by a shard_map when traced under a mesh (sharding.constrain's
    rules: rows over data+fsdp, kv heads over tensor when they divide)."""
    mesh = jax.sharding.get_abstract_mesh()
    platform = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    interpret = platform != "tpu"
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
