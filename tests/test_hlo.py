"""lmtrain.hlo: collective bytes read from compiled HLO, loops counted by their trip counts."""

# ruff: noqa: E501 (HLO lines as XLA writes them)
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lmtrain import hlo


def test_a_scanned_sharded_grad_moves_the_bytes_counted_by_hand():
    """Six scanned layers of x @ w on a (2, 4) mesh, w split over the 4-chip axis: the forward
    loop all-gathers x @ w's columns ([8, 64] f32 over 4 chips) and all-reduces a [8, 64] f32
    partial product over 4; the backward loop all-gathers w ([64, 64] f32 over 4) and
    all-reduces its [64, 16] f32 gradient over the 2-chip axis. Six trips each."""
    mesh = jax.make_mesh((2, 4), ("a", "b"))

    def f(w, x):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    w = jax.ShapeDtypeStruct((6, 64, 64), jnp.float32, sharding=NamedSharding(mesh, P(None, "b")))
    x = jax.ShapeDtypeStruct((16, 64), jnp.float32, sharding=NamedSharding(mesh, P("a")))
    moved = hlo.collective_bytes(jax.jit(jax.grad(f)).lower(w, x).compile().as_text())
    f32 = 4
    assert moved["all-gather"] == 6 * f32 * (8 * 64 * 3 / 4 + 64 * 64 * 3 / 4)
    assert moved["all-reduce"] == 6 * f32 * (8 * 64 * 2 * 3 / 4 + 64 * 16 * 2 * 1 / 2)
    assert moved["unknown_trips"] == 0
    assert moved["total"] == moved["all-gather"] + moved["all-reduce"]


TEXT = """HloModule m

%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %ag = (bf16[1,8]{1,0}, bf16[4,8]{1,0}) all-gather-start(bf16[1,8]{1,0} %x), replica_groups=[2,4]<=[8], dimensions={0}
  %agd = bf16[4,8]{1,0} all-gather-done(%ag)
  %cp = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %y), source_target_pairs={{0,1},{1,2}}
  ROOT %t = (s32[], bf16[4,8]) tuple(%i, %agd)
}

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%cond5 (p: (s32[], bf16[4,8])) -> pred[] {
  %n = s32[]{:T(128)} constant(5)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[4,8]) -> bf16[4,8] {
  %w = (s32[], bf16[4,8]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %rs = f32[2,8]{1,0} reduce-scatter(f32[16,8]{1,0} %z), replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}
  %w2 = (s32[], bf16[4,8]) while(%t1), condition=%cond, body=%body
  %w3 = (s32[], bf16[4,8]) while(%t1), condition=%cond5, body=%body
  ROOT %r = bf16[4,8] get-tuple-element(%w), index=1
}
"""


def test_async_pairs_iota_groups_and_trip_counts_from_the_loop_condition():
    moved = hlo.collective_bytes(TEXT)
    per_trip_ag, per_trip_cp = 4 * 8 * 2 * 3 / 4, 16 * 4  # the result of each, once
    # trips: 3 (XLA's known_trip_count), 1 (unknown: counted once), 5 (libtpu's i < 5)
    assert moved["all-gather"] == pytest.approx((3 + 1 + 5) * per_trip_ag)
    assert moved["collective-permute"] == pytest.approx((3 + 1 + 5) * per_trip_cp)
    assert moved["reduce-scatter"] == pytest.approx(2 * 8 * 4 * 7)  # result x (n - 1)
    assert moved["unknown_trips"] == 1  # the second loop, counted once
    assert hlo.summary_line(moved).startswith("all-gather 0.00G")
    assert hlo.summary_line(hlo.collective_bytes("ENTRY %m () -> f32[] {\n}\n")) == "none"
