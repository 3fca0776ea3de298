"""The cluster projection's arithmetic on known inputs."""
from __future__ import annotations

import math

import pytest

from vlacabin_jax.perf import projection

CLUSTER = projection.Cluster(nodes=16, gpus_per_node=8, nvlink_GBps=200.0, ib_Gbps=200.0, efficiency=1.0,
                             latency_s=0.0, ib_latency_s=0.0)
NV = 200e9  # bytes/s per GPU
IB = 25e9  # 200 Gb/s per node


def test_placement_inner_axes_stay_in_a_node():
    layout = {"data": 16, "fsdp": 8, "tensor": 1}
    assert projection.placement(("fsdp",), layout, CLUSTER) == (8, 1)
    assert projection.placement(("data",), layout, CLUSTER) == (1, 16)
    assert projection.placement(("data", "fsdp"), layout, CLUSTER) == (8, 16)
    assert projection.placement(("fsdp",), {"data": 1, "fsdp": 128, "tensor": 1}, CLUSTER) == (8, 16)
    with pytest.raises(ValueError, match="128"):
        projection.placement(("data",), {"data": 8, "fsdp": 1, "tensor": 1}, CLUSTER)


def test_collective_seconds():
    layout = {"data": 16, "fsdp": 8, "tensor": 1}
    s = 1e9
    # all-gather inside a node: S (n-1)/n over NVLink
    assert projection.collective_seconds("all-gather", s, ("fsdp",), layout, CLUSTER) == pytest.approx(
        (s * 7 / 8 / NV, 0.0))
    # all-reduce across 16 nodes, one GPU per node per group: 8 groups share each node's link
    nv, ib = projection.collective_seconds("all-reduce", s, ("data",), layout, CLUSTER)
    assert nv == 0.0 and ib == pytest.approx(2 * s * 15 / 16 * 8 / IB)
    # full-machine all-reduce: NVLink part over the 8 local GPUs, one group per node on IB
    nv, ib = projection.collective_seconds("all-reduce", s, ("data", "fsdp"), layout, CLUSTER)
    assert nv == pytest.approx(2 * s * 7 / 8 / NV) and ib == pytest.approx(2 * s * 15 / 16 / IB)
    assert projection.collective_seconds("all-reduce", s, (), layout, CLUSTER) == (0.0, 0.0)


def test_project_overlap_and_efficiency():
    layout = {"data": 16, "fsdp": 8, "tensor": 1}
    traffic = {("all-gather", ("fsdp",)): {"bytes": 1e9, "ops": 10}, ("all-reduce", ("data",)): 1e8}
    cluster = projection.Cluster(nodes=16, gpus_per_node=8, nvlink_GBps=200.0, ib_Gbps=200.0, efficiency=1.0,
                                 latency_s=1e-5, ib_latency_s=2e-5)
    p = projection.project(0.1, traffic, layout, cluster)
    nv, ib = 1e9 * 7 / 8 / NV, 2 * 1e8 * 15 / 16 * 8 / IB
    assert p.nvlink_s == pytest.approx(nv) and p.ib_s == pytest.approx(ib)
    assert p.latency_s == pytest.approx(10 * 1e-5 + 2e-5)
    assert p.step_no_overlap_s == pytest.approx(0.1 + nv + ib + p.latency_s)
    assert p.step_full_overlap_s == pytest.approx(max(0.1, nv + ib + p.latency_s))
    assert p.efficiency_no_overlap == pytest.approx(0.1 / p.step_no_overlap_s)
    assert math.isclose(projection.compute_seconds(312e12, cluster, 0.5), 2.0)
