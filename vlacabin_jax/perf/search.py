"""Which mesh, remat policy and microbatch to train with: the search's candidates, pruning and choice.

    candidate_meshes(num_devices, gpus_per_node, tensor_sizes) -> [(data, fsdp, tensor)]
    candidates(meshes, global_batch, accums)       -> [Candidate]
    at_least_as_fast(a, b)                         -> a ⪯ b (the order below)
    run(candidates, estimate, lower_bound, evaluate, max_compiles, headroom) -> [record]
    select(records)                                -> the fastest record that fits with headroom
    cluster_for(chip, nodes, gpus_per_node, ib_gbps) -> projection.Cluster of the target

Nothing here compiles: `run` calls `evaluate(candidate)` (in `bench/search.py`: a deviceless AOT
compile of the train step and its projected step time), so the logic is tested on fake results.

A candidate is (mesh, remat, accum). The global batch stays the config's (it is a training
hyperparameter: learning rate and warm-up are tuned for it); each device holds
rows = global batch / (data x fsdp) samples per step and runs them as `accum` microbatches of
rows / accum (`train.grad_accum_steps`). Remat is "none" (model.remat=False), "dots" or "full"
(model.remat=True with that model.remat_policy), in order of more recompute and less memory.

The order: for candidates a and b with the same tensor size, a ⪯ b when a.fsdp <= b.fsdp,
a recomputes no more than b and a.accum <= b.accum. Assumed: then a needs at least b's memory
(less of the state sharded, more activations kept, larger microbatches) and a's step is no slower
(fewer gathered weights, less recompute, fewer microbatches: the FSDP gathers run once per
microbatch). So, from compiled results:
- b does not fit  =>  every a ⪯ b does not fit ("does not fit, as b");
- a fits          =>  every b with a ⪯ b is dominated ("dominated by a").
And a candidate whose lower bound on the step time (compute at its recompute + a floor of its
communication: `comm_floor`, or half the analytic minimum's bytes) is no better than the best
fitting step so far is not compiled ("cannot beat").
Candidates are visited best estimate first (analytic: compute + the analytic minimum of its
collectives); at most `max_compiles` are compiled.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

from vlacabin_jax.perf import projection

REMATS = ("none", "dots", "full")  # more recompute, less memory, left to right

# NVLink (achievable bus bandwidth per GPU, GB/s) of the GPU targets; A100 as `projection.Cluster`.
NVLINK_GBPS = {"a100": 240.0, "h100": 360.0}  # H100 NVLink4: 450 GB/s per direction, ~80% reached


@dataclasses.dataclass(frozen=True, order=True)
class Candidate:
    """A mesh (data, fsdp, tensor), a remat policy of REMATS and `accum` microbatches per step."""

    mesh: tuple[int, int, int]
    remat: str
    accum: int

    @property
    def name(self) -> str:
        return f"{'x'.join(map(str, self.mesh))} {self.remat} accum {self.accum}"

    @property
    def recompute(self) -> int:
        return REMATS.index(self.remat)

    def rows(self, global_batch: int) -> int:
        """Samples per device per step (its data x fsdp shard of the global batch)."""
        return global_batch // (self.mesh[0] * self.mesh[1])

    def micro(self, global_batch: int) -> int:
        """Samples per device per microbatch."""
        return self.rows(global_batch) // self.accum

    def overrides(self) -> dict[str, Any]:
        """The config fields this candidate sets ({dotted name: value})."""
        data, fsdp, tensor = self.mesh
        return {"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor,
                "model.remat": self.remat != "none",
                "model.remat_policy": "full" if self.remat == "none" else self.remat,
                "train.grad_accum_steps": self.accum}


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(int(math.log2(limit)) + 1)] if limit >= 1 else []


def candidate_meshes(num_devices: int, gpus_per_node: int, tensor_sizes: Iterable[int] | None = None,
                     max_model_group: int | None = None) -> list[tuple[int, int, int]]:
    """The sensible (data, fsdp, tensor) meshes of `num_devices` GPUs, `gpus_per_node` to a node.

    tensor and fsdp are powers of two; tensor stays inside a node (<= gpus_per_node, one of
    `tensor_sizes` if given: those dividing every stack's heads); a model group fsdp x tensor spans
    at most `max_model_group` GPUs (default: two nodes, or all GPUs of one node), so weights are
    gathered over InfiniBand between at most two nodes; data takes the rest. Ordered by tensor, then fsdp.
    """
    limit = max_model_group or (min(2 * gpus_per_node, num_devices) if num_devices > gpus_per_node else num_devices)
    allowed = set(tensor_sizes) if tensor_sizes is not None else None
    out = []
    for tensor in _powers_of_two(min(gpus_per_node, num_devices)):
        if allowed is not None and tensor not in allowed:
            continue
        for fsdp in _powers_of_two(limit // tensor):
            if num_devices % (fsdp * tensor) == 0:
                out.append((num_devices // (fsdp * tensor), fsdp, tensor))
    return out


def candidates(meshes: Sequence[tuple[int, int, int]], global_batch: int, accums: Sequence[int] = (1, 2, 4),
               remats: Sequence[str] = REMATS) -> list[Candidate]:
    """Every (mesh, remat, accum) whose microbatch is a whole number of samples (>= 1) per device."""
    out = []
    for mesh in meshes:
        ways = mesh[0] * mesh[1]
        if global_batch % ways:
            continue
        rows = global_batch // ways
        for remat in remats:
            for accum in accums:
                if rows % accum == 0:
                    out.append(Candidate(tuple(mesh), remat, int(accum)))
    return out


def at_least_as_fast(a: Candidate, b: Candidate) -> bool:
    """a ⪯ b (module docstring): a is no slower than b and needs at least b's memory."""
    return (a.mesh[2] == b.mesh[2] and a.mesh[1] <= b.mesh[1] and a.recompute <= b.recompute
            and a.accum <= b.accum)


def prune_reason(c: Candidate, compiled: Mapping[Candidate, dict], best: dict | None,
                 lower_bound: Callable[[Candidate], float] | None) -> str | None:
    """Why `c` need not be compiled, given the `compiled` records so far and the `best` fitting one."""
    for x, r in compiled.items():
        if r.get("fits_with_headroom") is False and at_least_as_fast(c, x):
            return f"does not fit, as {x.name}"
    for x, r in compiled.items():
        if r.get("fits_with_headroom") and at_least_as_fast(x, c):
            return f"dominated by {x.name}"
    if best is not None and lower_bound is not None:
        bound = lower_bound(c)
        if bound >= best["step_s"]:
            return f"cannot beat {best['name']}: at least {bound * 1e3:.0f} ms > {best['step_s'] * 1e3:.0f} ms"
    return None


def comm_floor(c: Candidate, compiled: Mapping[Candidate, dict]) -> float:
    """Communication seconds c needs at least: the most of any compiled x ⪯ c (x gathers no more
    weights and runs no more microbatches, so c communicates at least as much), else 0."""
    floors = [r["comm_s"] for x, r in compiled.items() if at_least_as_fast(x, c) and r.get("comm_s") is not None]
    return max(floors, default=0.0)


def fits_with_headroom(bytes_per_device: float | None, usable_bytes: float, headroom: float) -> bool | None:
    """The program fits and leaves `headroom` (a fraction of the usable memory) free; None: unknown."""
    if bytes_per_device is None:
        return None
    return bytes_per_device <= usable_bytes * (1.0 - headroom)


def run(cands: Sequence[Candidate], estimate: Callable[[Candidate], float],
        lower_bound: Callable[[Candidate, Mapping[Candidate, dict]], float] | None,
        evaluate: Callable[[Candidate], dict], max_compiles: int, headroom: float,
        on_record: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Visits `cands` best `estimate` first; compiles (`evaluate`) those not pruned, at most `max_compiles`.

    `evaluate(c)` returns {"bytes_per_device", "usable_bytes", "step_s" (the projected step the
    choice compares), "comm_s", ...} or {"error": ...}. `lower_bound(c, compiled)`: seconds no
    step of c can beat. Returns one record per candidate, in visiting order: {"name", "mesh",
    "remat", "accum", "estimate_s", "status": "compiled" | "failed" | "skipped", "reason" (skipped),
    "fits_with_headroom", ... evaluate's fields}. `on_record(records)` after every compile.
    """
    order = sorted(cands, key=lambda c: (estimate(c), c.recompute, c.accum, c.mesh[1], c.mesh[2]))
    compiled: dict[Candidate, dict] = {}
    records, n_compiled, best = [], 0, None
    for c in order:
        base = {"name": c.name, "mesh": "x".join(map(str, c.mesh)), "remat": c.remat, "accum": c.accum,
                "estimate_s": estimate(c)}
        bound = (lambda x: lower_bound(x, compiled)) if lower_bound is not None else None
        reason = prune_reason(c, compiled, best, bound)
        if reason is None and n_compiled >= max_compiles:
            reason = f"over the compile budget ({max_compiles})"
        if reason is not None:
            records.append({**base, "status": "skipped", "reason": reason})
            continue
        n_compiled += 1
        result = dict(evaluate(c))
        if "error" in result and result.get("bytes_per_device") is None:
            record = {**base, **result, "status": "failed", "fits_with_headroom": None}
        else:
            record = {**base, **result, "status": "compiled",
                      "fits_with_headroom": fits_with_headroom(result.get("bytes_per_device"),
                                                               result["usable_bytes"], headroom)}
        records.append(record)
        compiled[c] = record
        if record["fits_with_headroom"] and (best is None or record["step_s"] < best["step_s"]):
            best = record
        if on_record is not None:
            on_record(records)
    return records


def select(records: Sequence[dict]) -> dict | None:
    """The compiled record with the least `step_s` among those that fit with headroom (ties: less
    recompute, fewer microbatches, smaller fsdp x tensor)."""
    ok = [r for r in records if r.get("status") == "compiled" and r.get("fits_with_headroom")]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["step_s"], REMATS.index(r["remat"]), r["accum"],
                                  math.prod(int(s) for s in r["mesh"].split("x")[1:])))


def cluster_for(chip: str, nodes: int, gpus_per_node: int, ib_gbps: float, peak_flops: float) -> projection.Cluster:
    """`projection.Cluster` of a GPU target: its node count and GPUs per node, the chip's NVLink
    (NVLINK_GBPS) and bf16 peak, InfiniBand at `ib_gbps` per node."""
    return projection.Cluster(nodes=nodes, gpus_per_node=gpus_per_node, nvlink_GBps=NVLINK_GBPS[chip],
                              ib_Gbps=ib_gbps, peak_flops=peak_flops)
