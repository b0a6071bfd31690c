"""The one model shell: embed -> residual blocks -> final norm -> head, over any mixers.

A family is a table of blocks (`BlockSpec`s, one per layer) given to `Decoder`; nothing
subclasses anything. Its ways in:

    model(tokens_BxL, segment_ids_BxL=None, positions_BxL=None) -> logits_BxLxV (float32)
    model.hidden(inputs, segment_ids_BxL=None, positions_BxL=None, state=None) -> (x_BxLxD, state)
        inputs: token ids (B, L) or embeddings (B, L, D); x is before the final norm. With
        state=None the blocks run as in training (remat, scan) and the returned state is None.
    model.logits(x_BxTxD) -> logits_BxTxV (float32): final norm, head, soft cap
    model.init_state(batch_size, max_len) -> state {"index": int32[], "layers": [...]}
    model.decode(tokens_BxT, state) -> (logits_BxTxV, state): a prompt, or one token

A block is x + mixer(norm(x)), then x + mlp(norm(x)) when it has an MLP. Every mixer keeps the
contract of `lmtrain.models.mixer`.

How the blocks run in training:
- `remat` (model.remat) wraps each block in jax.checkpoint with a named policy, so the backward
  pass keeps only what the policy saves and recomputes the rest.
- `scan` (model.scan_layers) runs each run of consecutive blocks with the same structure as one
  jax.lax.scan over their parameters stacked on a leading axis: XLA compiles the block once, so
  compile time stays flat in depth. Parameters keep their per-layer layout (checkpoints, exports
  and the sharding rules do not change); the stacking happens inside the step and costs one
  copy of the scanned blocks' parameters, sharded like them.
Blocks are called as pure functions of their state (nnx.split / nnx.merge), which works whether
the caller closed over the model or split and merged it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.models import sequence
from lmtrain.models.layers import Embed, LayerNorm, Linear, RMSNorm
from lmtrain.models.mixer import default_positions
from lmtrain.sharding import constrain

POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "minimal": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots": jax.checkpoint_policies.dots_saveable,
}


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One layer: how to build its mixer and (or None) its MLP from the rngs, and the names
    of its norm and mixer attributes (parameter paths: the transformer's are "attn_norm" and
    "attn", every other family's "mixer_norm" and "mixer")."""

    mixer: Callable[[nnx.Rngs], nnx.Module]
    mlp: Callable[[nnx.Rngs], nnx.Module] | None = None
    names: tuple[str, str] = ("mixer_norm", "mixer")
    # Without an MLP: x + LayerNorm(x) after the mixer, what Zoology's TransformerBlock does
    # with an Identity state mixer (its norm2 output joins the residual in the next block).
    state_norm: bool = False


class Block(nnx.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)) if it has an MLP,
    or x + LayerNorm(x) if its spec asks for the state norm."""

    def __init__(self, spec: BlockSpec, cfg: Any, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.norm_name, self.mixer_name = spec.names
        setattr(
            self, self.norm_name, RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=dtype)
        )
        setattr(self, self.mixer_name, spec.mixer(rngs))
        self.mlp_norm = self.mlp = nnx.data(None)
        if spec.mlp is not None:
            self.mlp_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=dtype)
            self.mlp = spec.mlp(rngs)
        elif spec.state_norm:  # torch.nn.LayerNorm's eps, as Zoology's norm2
            self.mlp_norm = LayerNorm(cfg.d_model, rngs=rngs, eps=1e-5, dtype=dtype)

    @property
    def mixer_module(self) -> nnx.Module:
        return getattr(self, self.mixer_name)

    def __call__(self, x_BxLxD, segment_ids_BxL, positions_BxL, state=None):
        """(x_BxLxD, the mixer's new state)."""
        norm = getattr(self, self.norm_name)
        args = (norm(x_BxLxD), segment_ids_BxL, positions_BxL)
        if state is None and sequence.size() > 1:  # rows split over the sequence axis
            h_BxLxD = sequence.split_call(self.mixer_module, *args)
        else:
            h_BxLxD, state = self.mixer_module(*args, state)
        x_BxLxD = x_BxLxD + h_BxLxD.astype(x_BxLxD.dtype)
        if self.mlp is not None:
            x_BxLxD = x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD))
        elif self.mlp_norm is not None:  # the state norm
            x_BxLxD = x_BxLxD + self.mlp_norm(x_BxLxD)
        return x_BxLxD, state

    def init_state(self, batch_size: int, max_len: int):
        return self.mixer_module.init_state(batch_size, max_len)


def _pure(graphdef: nnx.GraphDef, remat: str, scanned: bool) -> Callable:
    """block(params, x, segment_ids, positions) -> x as a pure function, under remat."""

    def call(params, x_BxLxD, segment_ids_BxL, positions_BxL):
        x_BxLxD, _ = nnx.merge(graphdef, params)(x_BxLxD, segment_ids_BxL, positions_BxL)
        return constrain(x_BxLxD, "batch", "length", "embed")

    if remat == "none":
        return call
    # Inside a scan, CSE cannot merge the recomputation into the forward pass anyway, and
    # prevent_cse's barriers only slow the loop (jax.checkpoint's documentation).
    return jax.checkpoint(call, policy=POLICIES[remat], prevent_cse=not scanned)


def _signature(block: nnx.Module) -> tuple:
    """Blocks with equal signatures can share one scanned body."""
    graphdef, params = nnx.split(block)
    shapes = jax.tree.map(lambda v: (v.shape, v.dtype), params)
    return graphdef, jax.tree.structure(shapes), tuple(jax.tree.leaves(shapes))


def groups(blocks: Sequence[nnx.Module], scan: bool) -> list[list[nnx.Module]]:
    """Consecutive runs of structurally identical blocks (all singletons without `scan`)."""
    if not scan:
        return [[b] for b in blocks]
    out: list[list[nnx.Module]] = []
    last = None
    for block in blocks:
        sig = _signature(block)
        if out and sig == last:
            out[-1].append(block)
        else:
            out.append([block])
        last = sig
    return out


def run_blocks(blocks, x_BxLxD, segment_ids_BxL, positions_BxL, *, remat="none", scan=False):
    """Applies `blocks` in order to the residual stream x_BxLxD, each from a fresh state."""
    for group in groups(blocks, scan):
        graphdef, params = nnx.split(group[0])
        if len(group) == 1:
            x_BxLxD = _pure(graphdef, remat, False)(params, x_BxLxD, segment_ids_BxL, positions_BxL)
            continue
        fn = _pure(graphdef, remat, True)
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.split(b)[1] for b in group])

        def body(x, layer_params, fn=fn):
            return fn(layer_params, x, segment_ids_BxL, positions_BxL), None

        x_BxLxD, _ = jax.lax.scan(body, x_BxLxD, stacked)
    return x_BxLxD


class Decoder(nnx.Module):
    """Embed -> one Block per BlockSpec -> RMSNorm -> output head (see the module docstring).

    Init: embeddings and an untied head ~ N(0, init_std^2) (the head zero under zero_init);
    norm scales 1; the blocks as their specs build them. Parameters are float32; compute runs
    in cfg.dtype; logits are float32 (soft-capped by model.logit_softcap when it is > 0).
    """

    def __init__(self, cfg: Any, specs: Sequence[BlockSpec], *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.dtype)
        std = cfg.init_std
        self.token_embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, std=std, dtype=self.dtype)
        self.blocks = nnx.List([Block(spec, cfg, rngs=rngs) for spec in specs])
        self.final_norm = RMSNorm(cfg.d_model, rngs=rngs, eps=cfg.norm_eps, dtype=self.dtype)
        self.head = nnx.data(None)  # tied: logits come from token_embed.attend
        if not cfg.tie_embeddings:
            head_std = 0.0 if cfg.zero_init else std
            self.head = Linear(
                cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, std=head_std,
                dtype=self.dtype,
            )  # fmt: skip

    def __call__(self, tokens_BxL, segment_ids_BxL=None, positions_BxL=None) -> jax.Array:
        """Token ids -> float32 logits_BxLxV (training: every block from a fresh state)."""
        return self.logits(self.hidden(tokens_BxL, segment_ids_BxL, positions_BxL)[0])

    def hidden(self, inputs, segment_ids_BxL=None, positions_BxL=None, state=None):
        """Token ids (B, L) or embeddings (B, L, D) -> (the last block's output x_BxLxD, the
        new state); positions default to 0..L-1 (from state["index"] with a state)."""
        x_BxLxD = self.token_embed(inputs) if inputs.ndim == 2 else inputs
        B, L, _ = x_BxLxD.shape
        x_BxLxD = constrain(x_BxLxD.astype(self.dtype), "batch", "length", "embed")
        if positions_BxL is None:
            start = 0 if state is None else state["index"]
            positions_BxL = start + default_positions(B, L)
        if state is None:
            cfg = self.cfg
            args = (x_BxLxD, segment_ids_BxL, positions_BxL)
            return run_blocks(self.blocks, *args, remat=cfg.remat, scan=cfg.scan_layers), None
        layers = []
        for block, layer_state in zip(self.blocks, state["layers"], strict=True):
            x_BxLxD, layer_state = block(x_BxLxD, segment_ids_BxL, positions_BxL, layer_state)
            layers.append(layer_state)
        return x_BxLxD, {"index": state["index"] + jnp.int32(L), "layers": layers}

    def logits(self, x_BxTxD: jax.Array) -> jax.Array:
        """Final norm and output head on some positions' hidden states -> float32 logits."""
        x_BxTxD = self.final_norm(x_BxTxD)
        if self.head is None:
            logits_BxTxV = self.token_embed.attend(x_BxTxD)
        else:
            logits_BxTxV = self.head(x_BxTxD, out_dtype=jnp.float32)
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits_BxTxV = cap * jnp.tanh(logits_BxTxV / cap)
        return constrain(logits_BxTxV, "batch", "length", "vocab")

    def init_state(self, batch_size: int, max_len: int) -> dict:
        """The empty decode state for up to `max_len` tokens per row."""
        layers = [b.init_state(batch_size, max_len) for b in self.blocks]
        return {"index": jnp.zeros((), jnp.int32), "layers": layers}

    def decode(self, tokens_BxT: jax.Array, state: dict) -> tuple[jax.Array, dict]:
        """Appends T tokens (a prompt, or 1) to `state`; returns their logits and the new
        state. Pure: the model is not mutated. The caller keeps index + T <= max_len."""
        x_BxTxD, state = self.hidden(tokens_BxT, state=state)
        return self.logits(x_BxTxD), state
