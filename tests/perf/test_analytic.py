"""The analytic minimum collective bytes of a sharding, on a hand-made param table."""
from __future__ import annotations

import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.perf import analytic

# A [64, 256] trainable kernel (embed → fsdp, mlp → tensor), a [256] trainable bias (replicated),
# a frozen [64, 64] kernel stored in bf16 (embed → fsdp).
PARAMS = [
    analytic.ParamShard("kernel", (64, 256), 64 * 256 * 4, True, (("fsdp",), ("tensor",))),
    analytic.ParamShard("bias", (256,), 256 * 4, True, ((),)),
    analytic.ParamShard("frozen", (64, 64), 64 * 64 * 2, False, (("fsdp",), ())),
]


def _cfg():
    cfg = get_config("tiny")
    cfg.model.dtype = "bfloat16"
    return cfg


def test_data_parallel_all_reduces_every_gradient_once():
    got = analytic.minimum_bytes(_cfg(), {"data": 8, "fsdp": 1, "tensor": 1}, PARAMS)
    assert got == {("all-reduce", ("data",)): 64 * 256 * 4 + 256 * 4}


def test_fsdp_gathers_in_compute_dtype_and_reduce_scatters_fp32():
    got = analytic.minimum_bytes(_cfg(), {"data": 2, "fsdp": 4, "tensor": 1}, PARAMS)
    assert got[("all-gather", ("fsdp",))] == 64 * 256 * 2 + 64 * 64 * 2  # bf16 gathers
    assert got[("reduce-scatter", ("fsdp",))] == 64 * 256 * 4
    assert got[("all-reduce", ("data",))] == 64 * 256 * 4 / 4  # the fsdp shard over data
    assert got[("all-reduce", ("data", "fsdp"))] == 256 * 4  # the replicated bias


def test_tensor_parallel_keeps_shards_local_and_adds_activations():
    cfg = _cfg()
    got = analytic.minimum_bytes(cfg, {"data": 1, "fsdp": 4, "tensor": 2}, PARAMS)
    assert got[("reduce-scatter", ("fsdp",))] == 64 * 256 * 4 / 2
    per_device = cfg.train.global_batch_size // 4
    expected = sum(per_device * tokens * width * 2 * depth * passes
                   for _, tokens, width, depth, passes in analytic.activation_tokens(cfg))
    assert got[("all-reduce", ("tensor",))] == pytest.approx(expected)
    assert analytic.by_kind(got)["all-gather"] == got[("all-gather", ("fsdp",))]


def test_indivisible_dims_stay_replicated():
    odd = analytic.ParamShard("odd", (6, 4), 96, True, (("fsdp",), ()))
    assert analytic.sharded_axes(odd, {"data": 1, "fsdp": 4, "tensor": 1}) == ()
    assert analytic.sharded_axes(odd, {"data": 1, "fsdp": 2, "tensor": 1}) == ("fsdp",)
