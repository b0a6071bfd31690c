"""Published model shapes at scale, for `lmtrain compile` (memory plans without the hardware).

lmtrain compile experiments/scale.py:8b --topology v5p:4x4x4
lmtrain compile experiments/scale.py:70b --topology v5p:8x8x8 --set train.batch_size=512
lmtrain compile experiments/scale.py:1b --topology v5e:2x2 --set train.batch_size=8

Shapes (vocabulary, width, depth, heads / kv heads, MLP width):
    125m         GPT-3 Small depth and width with Llama's blocks: 32,000, 768, 12, 12/12, 2048
    1b           Llama-3.2-1B: 128,256, 2048, 16, 32/8, 8192, tied embeddings
    8b           Llama-3-8B: 128,256, 4096, 32, 32/8, 14336
    70b          Llama-3-70B: 128,256, 8192, 80, 64/8, 28672
    mamba2-1.3b  Mamba-2 1.3B: 50,280, 2048, 48 layers, state 128, head dim 64, expand 2
    mamba2-2.7b  Mamba-2 2.7B: 50,280, 2560, 64 layers, same mixer
    hybrid-1.4b  Mamba-2 with one attention layer in eight ("MMMMMMMA" x 6): 50,280, 2048, 48

Every shape trains at sequence 4096 (Mamba-2 and the hybrid at 2048, their papers' context) in
bf16 compute with float32 master weights, full rematerialisation, layers scanned, the loss in
chunks of 1024 positions and splash attention, on an fsdp mesh over all chips: the choices that
let 8B fit on v5p:4x4x4 (see BENCHMARKS.md). The global batch defaults to one sequence per chip
of a 64-chip slice (64 rows); set train.batch_size to another multiple of the chip count.
Training on these would need a real corpus (data.source); the compile reads none.
"""

from __future__ import annotations

from lmtrain.config import Config, DataConfig, EvalConfig, MeshConfig, TrainConfig, override

LLAMA = {
    "model.name": "transformer",
    "model.rope_theta": 500_000.0,
    "model.norm_eps": 1e-5,
    "model.attention_impl": "splash",
}
MAMBA2 = {
    "model.name": "mamba2",
    "model.vocab_size": 50_280,
    "model.state_size": 128,
    "model.expand": 2,
    "model.chunk_size": 256,
    "model.tie_embeddings": True,
    "data.seq_len": 2048,
}
SSM_KEYS = ("model.state_size", "model.expand", "model.chunk_size")  # a hybrid's model.ssm.*

# name -> overrides. SwiGLU's width is round(2/3 * ffn_mult * d_model) (up to a multiple of 64),
# so ffn_mult = 1.5 * F / D gives Llama's F exactly. Mamba-2's head count is E / 64.
SHAPES: dict[str, dict] = {
    "125m": {
        **LLAMA,
        "model.vocab_size": 32_000,
        "model.d_model": 768,
        "model.n_layers": 12,
        "model.n_heads": 12,
        "model.ffn_mult": 1.5 * 2048 / 768,
    },
    "1b": {
        **LLAMA,
        "model.vocab_size": 128_256,
        "model.d_model": 2048,
        "model.n_layers": 16,
        "model.n_heads": 32,
        "model.n_kv_heads": 8,
        "model.ffn_mult": 1.5 * 8192 / 2048,
        "model.tie_embeddings": True,
    },
    "8b": {
        **LLAMA,
        "model.vocab_size": 128_256,
        "model.d_model": 4096,
        "model.n_layers": 32,
        "model.n_heads": 32,
        "model.n_kv_heads": 8,
        "model.ffn_mult": 1.5 * 14336 / 4096,
    },
    "70b": {
        **LLAMA,
        "model.vocab_size": 128_256,
        "model.d_model": 8192,
        "model.n_layers": 80,
        "model.n_heads": 64,
        "model.n_kv_heads": 8,
        "model.ffn_mult": 1.5 * 28672 / 8192,
    },
    "mamba2-1.3b": {**MAMBA2, "model.d_model": 2048, "model.n_layers": 48, "model.n_heads": 64},
    "mamba2-2.7b": {**MAMBA2, "model.d_model": 2560, "model.n_layers": 64, "model.n_heads": 80},
    "hybrid-1.4b": {
        **{k: v for k, v in MAMBA2.items() if k not in SSM_KEYS},
        **{f"model.ssm.{k.removeprefix('model.')}": MAMBA2[k] for k in SSM_KEYS},
        "model.name": "hybrid",
        "model.pattern": "MMMMMMMA",
        "model.d_model": 2048,
        "model.n_layers": 48,
        "model.n_heads": 64,  # both mixers: Mamba-2 heads of 64 channels, attention heads of 32
        "model.n_kv_heads": 8,
        "model.attention.attention_impl": "splash",
        "model.ffn_mult": 4.0,
    },
}
VARIANTS = tuple(SHAPES)


def get_config(arg: str = "8b") -> Config:
    """The config of shape `arg` (default 8b)."""
    arg = arg or "8b"
    if arg not in SHAPES:
        raise ValueError(f"unknown scale shape {arg!r}; choose from {', '.join(SHAPES)}")
    base = Config(
        data=DataConfig(source="stdlib", seq_len=4096, tokenizer="bytes"),
        mesh=MeshConfig(shape=(1, -1, 1)),
        train=TrainConfig(steps=10_000, batch_size=64, loss_chunk=1024, log_every=10),
        eval=EvalConfig(batch_size=64, max_batches=10),
    )
    sets = {
        "model.dtype": "bfloat16",
        "model.remat": "full",
        "model.scan_layers": True,
        **SHAPES[arg],
    }
    return override(base, sets).validate()
