"""Step time of a train step projected onto a GPU cluster from its compute time and collectives.

    Cluster(nodes, gpus_per_node, nvlink_GBps, ib_Gbps, ...)   the machine (A100_16x8 preset values)
    placement(axes, layout, cluster)   -> (GPUs of a group inside one node, nodes it spans)
    collective_seconds(kind, nbytes, axes, layout, cluster) -> (NVLink s, InfiniBand s)
    project(compute_s, traffic, layout, cluster) -> Projection

The model, and its assumptions (printed with every projection):
- Devices are numbered row-major over the mesh (data, fsdp, tensor), `gpus_per_node` to a node,
  so the innermost axes stay inside a node (NVLink) and the outer ones span nodes (InfiniBand).
- A collective over a group of n = g·m GPUs (g inside each of m nodes) on S bytes (the full
  operand, `hlo.py`'s convention) is hierarchical: inside the node every GPU moves
  S·(n-1)/n at the NVLink bandwidth; between nodes every node moves S·(m-1)/m per group through
  its InfiniBand link, and the gpus_per_node / g groups a node takes part in share that link.
  All-reduce moves twice that (reduce-scatter + all-gather); all-to-all sends S·(n-g)/n of every
  GPU's data off the node; a collective-permute moves S over the link its pair uses.
- Every collective also pays a fixed latency (`latency_s` inside a node, `ib_latency_s` across).
- Links reach `efficiency` of their line rate; NVLink is given as achievable bus bandwidth.
- Compute time per device is the measured per-device step compute (on a GPU) or analytic model
  FLOPs at an assumed MFU; it does not change with the mesh (weak scaling: the per-device batch
  is fixed).
- Overlap: `none` adds communication to compute; `full` hides it entirely behind compute
  (step = max); reality sits between (XLA overlaps FSDP gathers and gradient reductions with
  layers' compute, not the activation all-reduces of tensor parallelism).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

AXES = ("data", "fsdp", "tensor")


@dataclasses.dataclass(frozen=True)
class Cluster:
    """nodes × gpus_per_node GPUs; NVLink bandwidth per GPU (GB/s, achievable bus bandwidth),
    InfiniBand per node (Gb/s line rate), reaching `efficiency` of it."""

    nodes: int = 16
    gpus_per_node: int = 8
    nvlink_GBps: float = 240.0  # A100 NVLink3: 300 GB/s per direction, NCCL bus bandwidth ~240
    ib_Gbps: float = 200.0
    efficiency: float = 0.8  # of the InfiniBand line rate
    latency_s: float = 10e-6  # per collective inside a node
    ib_latency_s: float = 25e-6  # per collective across nodes
    peak_flops: float = 312e12  # A100 bf16 dense

    @property
    def size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def ib_Bps(self) -> float:
        return self.ib_Gbps * 1e9 / 8 * self.efficiency


@dataclasses.dataclass(frozen=True)
class Projection:
    """Seconds per step: compute, NVLink, InfiniBand, latency; step time with no and full overlap;
    scaling efficiency = compute / step (1 = communication costs nothing)."""

    compute_s: float
    nvlink_s: float
    ib_s: float
    latency_s: float

    @property
    def comm_s(self) -> float:
        return self.nvlink_s + self.ib_s + self.latency_s

    @property
    def step_no_overlap_s(self) -> float:
        return self.compute_s + self.comm_s

    @property
    def step_full_overlap_s(self) -> float:
        return max(self.compute_s, self.comm_s)

    @property
    def efficiency_no_overlap(self) -> float:
        return self.compute_s / self.step_no_overlap_s

    @property
    def efficiency_full_overlap(self) -> float:
        return self.compute_s / self.step_full_overlap_s


def placement(axes: tuple[str, ...], layout: Mapping[str, int], cluster: Cluster) -> tuple[int, int]:
    """(g, m): a group over `axes` has g GPUs in each of the m nodes it spans (module docstring).

    `layout` sizes the mesh axes ({"data": 16, "fsdp": 8, "tensor": 1}); its product must be the
    cluster size.
    """
    sizes = [int(layout.get(a, 1)) for a in AXES]
    if math.prod(sizes) != cluster.size:
        raise ValueError(f"layout {dict(layout)} has {math.prod(sizes)} devices, the cluster {cluster.size}")
    ids = np.arange(cluster.size).reshape(sizes)
    # The group holding device 0: index 0 on the axes not in the group.
    index = tuple(slice(None) if a in axes else 0 for a in AXES)
    nodes = ids[index].reshape(-1) // cluster.gpus_per_node
    _, per_node = np.unique(nodes, return_counts=True)
    return int(per_node.max()), len(per_node)


def collective_seconds(kind: str, nbytes: float, axes: tuple[str, ...], layout: Mapping[str, int],
                       cluster: Cluster) -> tuple[float, float]:
    """(NVLink seconds, InfiniBand seconds) of one step's `nbytes` of `kind` over `axes`."""
    g, m = placement(axes, layout, cluster)
    n = g * m
    if n <= 1 or nbytes <= 0:
        return 0.0, 0.0
    sharing = cluster.gpus_per_node / g  # groups of this axis set per node, sharing its IB link
    nv_Bps = cluster.nvlink_GBps * 1e9
    if kind in ("all-gather", "reduce-scatter", "all-reduce"):
        passes = 2.0 if kind == "all-reduce" else 1.0
        nv = passes * nbytes * (g - 1) / g / nv_Bps if g > 1 else 0.0
        ib = passes * nbytes * (m - 1) / m * sharing / cluster.ib_Bps if m > 1 else 0.0
        return nv, ib
    if kind == "all-to-all":
        nv = nbytes * (g - 1) / n / nv_Bps
        ib = nbytes * (n - g) / n * cluster.gpus_per_node / cluster.ib_Bps if m > 1 else 0.0
        return nv, ib
    # collective-permute: over InfiniBand when its axes leave the node
    return (0.0, nbytes * cluster.gpus_per_node / cluster.ib_Bps) if m > 1 else (nbytes / nv_Bps, 0.0)


def project(compute_s: float, traffic: Mapping[tuple[str, tuple[str, ...]], Mapping | float],
            layout: Mapping[str, int], cluster: Cluster) -> Projection:
    """Projected step of `traffic` {(kind, axes): bytes per step or {"bytes", "ops"}} on `layout`.

    `ops` (collectives per step) sets the latency term; plain byte counts count as one op each.
    """
    nv = ib = lat = 0.0
    for (kind, axes), entry in traffic.items():
        nbytes = entry["bytes"] if isinstance(entry, Mapping) else float(entry)
        ops = entry.get("ops", 1) if isinstance(entry, Mapping) else 1
        a, b = collective_seconds(kind, nbytes, tuple(axes), layout, cluster)
        nv, ib = nv + a, ib + b
        if a or b:
            lat += ops * (cluster.ib_latency_s if b else cluster.latency_s)
    return Projection(compute_s, nv, ib, lat)


def compute_seconds(flops_per_device_step: float, cluster: Cluster, mfu: float) -> float:
    """Compute time of one step on one GPU of the cluster at model FLOPs utilisation `mfu`."""
    return flops_per_device_step / (cluster.peak_flops * mfu)


ASSUMPTIONS = (
    "devices row-major over (data, fsdp, tensor), 8 per node: inner axes on NVLink, outer on InfiniBand",
    "hierarchical ring collectives: NVLink moves S(n-1)/n per GPU (x2 for all-reduce); each node "
    "moves S(m-1)/m per group over m nodes, its groups sharing the node's one IB link",
    "NVLink 240 GB/s achievable per GPU; InfiniBand 200 or 400 Gb/s per node at 80% of line rate",
    "latency 10 us per collective inside a node, 25 us across nodes",
    "compute: model FLOPs per device-step at an assumed A100 MFU (bf16 peak 312 TFLOP/s), or a "
    "measured GPU compute time; weak scaling (per-device batch fixed)",
    "overlap: 'none' = compute + communication, 'full' = max(compute, communication)",
)
