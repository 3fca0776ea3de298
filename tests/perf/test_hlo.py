"""Collective bytes read from compiled HLO: exact on hand-made programs, every group format."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from vlacabin_jax.perf import hlo

MESH_SHAPE = {"data": 2, "fsdp": 2, "tensor": 2}


def _mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), tuple(MESH_SHAPE))


def test_psum_all_gather_and_loop_trip_count_give_exact_bytes():
    mesh = _mesh()

    def body(x, y):
        total = jax.lax.psum(x, "data")  # f32[128] per device: 512 bytes, over data
        gathered = jax.lax.all_gather(y, "fsdp", tiled=True)  # f32[16] → f32[32]: 128 bytes, over fsdp

        def step(c, _):  # inside a loop of 3: 3 executions of a 256-byte all-reduce over tensor
            return jax.lax.psum(c * 2.0, "tensor"), None

        looped, _ = jax.lax.scan(step, x[:64], None, length=3)
        return total, gathered, looped

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P("fsdp")),
                              out_specs=(P(), P(), P()), check_vma=False))
    text = f.lower(jnp.ones(128), jnp.ones(32)).compile().as_text()
    colls = [c for c in hlo.collectives(text) if c.group_size > 1]
    by_axes = hlo.bytes_by_axes(colls, MESH_SHAPE)
    assert by_axes[("all-reduce", ("data",))]["bytes"] == 512
    assert by_axes[("all-gather", ("fsdp",))]["bytes"] == 128
    assert by_axes[("all-reduce", ("tensor",))] == {"bytes": 768, "group_size": 2, "ops": 3}
    assert hlo.bytes_by_kind(colls)["all-reduce"] == 512 + 768


def test_replica_group_formats():
    assert hlo.parse_replica_groups("replica_groups={{0,1},{2,3}}, x", 4) == ((0, 1), (2, 3))
    assert hlo.parse_replica_groups("replica_groups={}, x", 4) == ((0, 1, 2, 3),)
    assert hlo.parse_replica_groups("replica_groups=[4,2]<=[8], x", 8) == ((0, 1), (2, 3), (4, 5), (6, 7))
    # iota over [2,2,2] transposed (2,1,0): groups vary the slowest axis
    assert hlo.parse_replica_groups("replica_groups=[4,2]<=[2,2,2]T(2,1,0), x", 8) == (
        (0, 4), (2, 6), (1, 5), (3, 7))
    named = "replica_groups=mesh['axis_0'=2,'axis_1'=2,'axis_2'=2] {'axis_1'}, use_global_device_ids=true"
    assert hlo.parse_replica_groups(named, 8) == ((0, 2), (1, 3), (4, 6), (5, 7))
    with_ids = "replica_groups=mesh['axis_0'=1,'axis_1'=2,'axis_2'=4], device_ids=([2,2,2]T(1,0,2)) {'axis_1'}, x"
    ids = np.arange(8).reshape(2, 2, 2).transpose(1, 0, 2).reshape(1, 2, 4)
    assert hlo.parse_replica_groups(with_ids, 8) == tuple(tuple(int(i) for i in ids[0, :, j]) for j in range(4))
    assert hlo.parse_replica_groups("source_target_pairs={{0,1},{1,0}}", 2) == ((0, 1), (1, 0))


def test_group_axes_and_shapes():
    assert hlo.group_axes(((0, 4), (1, 5)), MESH_SHAPE) == ("data",)
    assert hlo.group_axes(((0, 1, 2, 3),), MESH_SHAPE) == ("fsdp", "tensor")
    assert hlo.group_axes(None, MESH_SHAPE) == ("?",)
    assert hlo.shape_bytes("f32[8,2]{1,0}") == 64
    assert hlo.shape_bytes("(bf16[4]{0}, s32[2,2]{1,0})") == 8 + 16
    assert hlo.shape_bytes("pred[]") == 1


def test_async_pair_counts_once_with_done_shape():
    text = """HloModule m, num_partitions=2

ENTRY %main (p: f32[4]) -> f32[8] {
  %p = f32[4]{0} parameter(0)
  %ags = (f32[4]{0}, f32[8]{0}) all-gather-start(%p), channel_id=1, replica_groups={{0,1}}, dimensions={0}
  ROOT %agd = f32[8]{0} all-gather-done(%ags)
}
"""
    (c,) = hlo.collectives(text)
    assert (c.kind, c.bytes, c.groups, c.count) == ("all-gather", 32, ((0, 1),), 1)
