"""The one contract every sequence mixer keeps (attention, sliding window, BASED, RetNet,
lightning, GLA, gated conv, S4D, H3, Mamba-2):

    y_BxLxD, state = mixer(x_BxLxD, segment_ids_BxL, positions_BxL, state=None)

- Any length L >= 1. `state=None` is a fresh start: nothing comes before the first token.
- A state is a flat dict of arrays with a leading batch axis, plus "seg" (B,) int32: the
  segment id of the last token it has seen. Row b of a call continues the state's document iff
  its first token has that segment id (segment_ids None: every row continues). Tokens after a
  document start inside the call never see the state. The returned state is the state after
  the call's last token, ready for the next call: a prefill, the next shard of a long sequence
  or the next decoded token.
- `mixer.init_state(batch_size, max_len)` is the empty state (the same as a fresh start);
  `max_len` bounds what an attention cache holds, and the other mixers ignore it. A
  convolution's state holds its last width - 1 inputs; attention's, its keys and values with
  their segment ids and the next free slot; a recurrence's, its matrix state.
- Two implementations of one call: `parallel` (chunked or blocked: training, prefill) and
  `recurrent` (token by token: decode). `__call__` runs the recurrent form for a single token
  that continues a state and the parallel form otherwise; `form=` forces one (the tests
  compare them on the same tokens).

Split over the mesh's sequence axis (models/sequence.py), a mixer's training call becomes such
a chain across devices: `CARRIED` names the state leaves that carry a recurrence (an
elementwise-decayed sum: "S", "h"); every other leaf but "seg" is a window of recent inputs.

A mixer subclasses `Mixer` and writes `init_state`, `parallel`, and either `step` (T tokens of
one document from a state; `recurrent` then scans it token by token, restarting the state
where a document starts) or its own `recurrent`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from lmtrain.models import sequence

State = dict  # {name: array (B, ...)} plus "seg" (B,) int32
FORMS = ("auto", "parallel", "recurrent")


def default_positions(batch: int, length: int) -> jax.Array:
    """0..L-1 in every row."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, :], (batch, length))


def continues(state: State, segment_ids_BxL: jax.Array | None, batch: int) -> jax.Array:
    """bool (B,): whether each row's first token continues the state's document."""
    if segment_ids_BxL is None:
        return jnp.ones((batch,), bool)
    return segment_ids_BxL[:, 0] == state["seg"]


def last_segment(state: State | None, segment_ids_BxL: jax.Array | None, batch: int) -> jax.Array:
    """int32 (B,): the segment id of each row's last token (the new state's "seg")."""
    if segment_ids_BxL is not None:
        return segment_ids_BxL[:, -1].astype(jnp.int32)
    if state is not None:
        return state["seg"]
    return jnp.zeros((batch,), jnp.int32)


def keep_rows(x_Bx: jax.Array, keep_B: jax.Array) -> jax.Array:
    """x with the rows where `keep_B` is False set to zero."""
    return jnp.where(keep_B.reshape(-1, *([1] * (x_Bx.ndim - 1))), x_Bx, jnp.zeros_like(x_Bx))


class Mixer(nnx.Module):
    """Base of every sequence mixer: the dispatch between its two forms (see the module
    docstring for the contract)."""

    def __call__(
        self,
        x_BxLxD: jax.Array,
        segment_ids_BxL: jax.Array | None = None,
        positions_BxL: jax.Array | None = None,
        state: State | None = None,
        *,
        form: str = "auto",
    ) -> tuple[jax.Array, State]:
        B, L = x_BxLxD.shape[:2]
        if positions_BxL is None:
            positions_BxL = default_positions(B, L)
        if form == "auto":
            form = "recurrent" if state is not None and L == 1 else "parallel"
        if form == "recurrent":
            if state is None:
                state = self.init_state(B, L)
            return self.recurrent(x_BxLxD, segment_ids_BxL, positions_BxL, state)
        if form != "parallel":
            raise ValueError(f"form must be one of {FORMS}, not {form!r}")
        return self.parallel(x_BxLxD, segment_ids_BxL, positions_BxL, state)

    CARRIED: tuple[str, ...] = ()

    def init_state(self, batch_size: int, max_len: int) -> State:
        raise NotImplementedError

    def split_parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL) -> jax.Array:
        """The output of this device's piece of rows split over the sequence axis (called
        inside sequence.split_call's shard_map): the chain of calls of models/sequence.py."""
        return sequence.chained(self, x_BxLxD, segment_ids_BxL, positions_BxL)

    def parallel(self, x_BxLxD, segment_ids_BxL, positions_BxL, state) -> tuple[jax.Array, State]:
        raise NotImplementedError

    def step(self, x_BxTxD, positions_BxT, state) -> tuple[jax.Array, State]:
        """T tokens of the state's own document (no restarts)."""
        raise NotImplementedError

    def reset(self, state: State, keep_B: jax.Array) -> State:
        """The state with the rows where `keep_B` is False emptied (a document starts there)."""
        return {k: v if k == "seg" else keep_rows(v, keep_B) for k, v in state.items()}

    def recurrent(self, x_BxLxD, segment_ids_BxL, positions_BxL, state) -> tuple[jax.Array, State]:
        """Token by token through `step`, emptying a row's state where its document starts."""
        B, L = x_BxLxD.shape[:2]
        if segment_ids_BxL is None:
            segment_ids_BxL = jnp.broadcast_to(state["seg"][:, None], (B, L))

        def one(state, xs):
            x_BxD, seg_B, pos_B = xs
            state = self.reset(state, seg_B == state["seg"])
            y_Bx1xD, state = self.step(x_BxD[:, None], pos_B[:, None], state)
            return {**state, "seg": seg_B.astype(jnp.int32)}, y_Bx1xD[:, 0]

        xs = (x_BxLxD, segment_ids_BxL, positions_BxL)
        if L == 1:
            state, y_BxD = one(state, tuple(a[:, 0] for a in xs))
            return y_BxD[:, None], state
        state, y_LxBxD = jax.lax.scan(one, state, tuple(jnp.moveaxis(a, 1, 0) for a in xs))
        return jnp.moveaxis(y_LxBxD, 0, 1), state
