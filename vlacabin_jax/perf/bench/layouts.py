"""The search of the deviceless mode: the fastest mesh x remat x microbatch that fits a GPU target.

    search("a100:16x1x8", config, out)  -> exit code; prints a table, writes search.json, search.png

Per candidate (`vlacabin_jax/perf/search.py`: generation, pruning, choice) the train step alone is
compiled for the target (`perf/aot.py`, no device): bytes per device against the usable memory,
collective bytes by kind (unique channel ids), and the step time projected on the target's cluster
from those collectives (`perf/projection.py`: NVLink inside a node, InfiniBand at 200 and 400 Gb/s
per node between nodes) plus compute = model FLOPs x the remat policy's recompute factor at an
assumed MFU. The choice: the least projected step (no overlap, 200 Gb/s) among the candidates
that leave `headroom` of the usable memory free.

The recompute factors are XLA's FLOPs of the lowered train step (layers unrolled, batch 2, one
CPU device) over the model's FLOPs, per policy (`--flops`'s method). A rerun with the same `--out`,
config and target reuses the compiled candidates and factors of its search.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

from vlacabin_jax.perf.bench.common import AXES, KINDS, BenchError, load_config, parse_meshes, write
from vlacabin_jax.perf.search import REMATS

GIB = 2**30
IB_RATES = (200.0, 400.0)  # Gb/s per node; the choice compares the first
FACTOR_BATCH = 2  # samples of the lowered step whose FLOPs give the recompute factors


def recompute_factors(cfg, remats: Sequence[str], log=lambda s: None) -> dict[str, dict]:
    """{remat: {"factor": XLA FLOPs / model FLOPs, "lower_s"}} of the train step lowered with
    unrolled layers at FACTOR_BATCH samples on one CPU device (nothing compiled)."""
    import jax
    import ml_collections

    from vlacabin_jax import sharding
    from vlacabin_jax.data.spec import batch_spec
    from vlacabin_jax.model.flops import model_flops_per_sample
    from vlacabin_jax.train import state as state_lib
    from vlacabin_jax.train import step as step_lib

    out = {}
    for remat in remats:
        c = ml_collections.ConfigDict(cfg.to_dict())
        c.model.remat, c.model.remat_policy = remat != "none", "full" if remat == "none" else remat
        c.model.scan_layers = False
        c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 1
        c.train.global_batch_size, c.train.grad_accum_steps = FACTOR_BATCH, 1
        mesh = sharding.make_mesh(c.mesh, jax.devices("cpu")[:1])
        abstract, shardings = state_lib.state_shardings(c, mesh)
        state = state_lib.abstract_with_shardings(abstract, shardings)
        bshard = step_lib.batch_shardings(c, mesh)
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=bshard[k])
                 for k, (shape, dtype) in batch_spec(c, FACTOR_BATCH).items() if k in bshard}
        log(f"  lowering the unrolled train step (remat {remat}) for its FLOPs ...")
        t0 = time.perf_counter()
        ca = step_lib.make_train_step(c, mesh, shardings).lower(state, batch).cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        out[remat] = {"factor": float(ca["flops"]) / (model_flops_per_sample(c) * FACTOR_BATCH),
                      "lower_s": time.perf_counter() - t0}
        log(f"  remat {remat}: HLO / model FLOPs {out[remat]['factor']:.3f} ({out[remat]['lower_s']:.0f} s)")
    return out


def _with(cfg, cand):
    import ml_collections

    c = ml_collections.ConfigDict(cfg.to_dict())
    for key, value in cand.overrides().items():
        section, field = key.split(".")
        c[section][field] = value
    return c


def _previous(out: Path, identity: dict) -> dict:
    """search.json of an earlier run with the same identity (config, overrides, target, batch), else {}."""
    f = out / "search.json"
    try:
        payload = json.loads(f.read_text())
    except (OSError, ValueError):
        return {}
    return payload if all(payload.get(k) == v for k, v in identity.items()) else {}


def search(target_text: str, config: str, out: str | Path, overrides: Sequence[str] = (), meshes: str | None = None,
           headroom: float = 0.1, max_compiles: int = 14, accums: str = "1,2,4", mfu_assumed: float = 0.4) -> int:
    """Searches meshes x remat x microbatch for one GPU target; module docstring."""
    from vlacabin_jax.model.flops import model_flops_per_sample
    from vlacabin_jax.perf import analytic, projection
    from vlacabin_jax.perf import aot as deviceless
    from vlacabin_jax.perf import search as lib
    from vlacabin_jax.perf.bench.cluster import aot_traffic
    from vlacabin_jax.perf.bench.common import parse_ints

    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    out = Path(out)
    if "," in target_text.strip(","):
        raise BenchError(f"--search takes one target, not {target_text!r}; run one search per target")
    if not 0.0 <= headroom < 1.0:
        raise BenchError(f"--headroom {headroom}: a fraction of the usable memory in [0, 1), e.g. 0.1")
    if max_compiles < 1:
        raise BenchError(f"--max-compiles {max_compiles}: must be at least 1")
    accum_list = parse_ints(accums, "--search-accum")
    try:
        target = deviceless.parse_target(target_text)
        if target.platform != "cuda":
            raise BenchError(f"--search projects step times on a GPU cluster (NVLink + InfiniBand); target "
                             f"{target.name} is not a GPU target: use a100:... or h100:... (or --aot without --search)")
        deviceless.check_plugin(target)
        deviceless.prepare_host()
        cfg = load_config(config, overrides)
        slices, hosts, gpus_per_node = (int(p) for p in target.topology.split("x"))
        nodes, n = slices * hosts, target.num_devices
        batch = int(cfg.train.global_batch_size)
        cfg.train.grad_accum_steps = 1
        if meshes:
            mesh_list = [deviceless.resolve_mesh(cfg, target, m) for m in parse_meshes(meshes)]
        else:
            mesh_list = []
            for m in lib.candidate_meshes(n, gpus_per_node):
                try:
                    mesh_list.append(deviceless.resolve_mesh(cfg, target, m))
                except deviceless.AotError as e:  # batch or heads not divisible: not a candidate
                    log(f"  mesh {'x'.join(map(str, m))} left out: {e}")
        cands = lib.candidates(mesh_list, batch, accum_list)
        if not cands:
            raise BenchError(f"no candidate: no mesh of {meshes or 'the generated ones'} with a microbatch of "
                             f"{accums} divides the global batch {batch}")
    except deviceless.AotError as e:
        raise BenchError(str(e)) from None

    identity = {"config": config, "overrides": list(overrides), "target": target.name, "global_batch": batch}
    previous = _previous(out, identity)
    factors = previous.get("recompute_factors") or {}
    remats = sorted({c.remat for c in cands}, key=lib.REMATS.index)
    missing = [r for r in remats if r not in factors]
    if missing:
        factors.update(recompute_factors(cfg, missing, log))
    reused = {r["name"]: r for r in previous.get("records", []) if r.get("status") in ("compiled", "failed")}

    clusters = {ib: lib.cluster_for(target.chip, nodes, gpus_per_node, ib, target.peak_bf16_flops) for ib in IB_RATES}
    sel = clusters[IB_RATES[0]]
    model_flops = model_flops_per_sample(cfg) * batch / n  # per device per step, whatever the mesh
    params = analytic.param_table(cfg)

    def layout(c):
        return dict(zip(AXES, c.mesh))

    def compute_s(c, cluster=sel) -> float:
        return projection.compute_seconds(model_flops * factors[c.remat]["factor"], cluster, mfu_assumed)

    analytic_cache: dict = {}

    def analytic_traffic(c) -> dict:
        if c.mesh not in analytic_cache:
            analytic_cache[c.mesh] = analytic.minimum_bytes(cfg, layout(c), params)
        return analytic_cache[c.mesh]

    def comm(traffic, c, cluster=sel) -> float:
        return projection.project(0.0, traffic, layout(c), cluster).comm_s

    def estimate(c) -> float:
        # The analytic minimum; FSDP gathers again per microbatch and, under remat, in the backward pass.
        scale = c.accum * (2 if c.remat != "none" else 1)
        traffic = {k: v * scale if k[0] == "all-gather" else v for k, v in analytic_traffic(c).items()}
        return compute_s(c) + comm(traffic, c)

    def lower_bound(c, compiled) -> float:
        floor = comm({k: 0.5 * v for k, v in analytic_traffic(c).items()}, c)  # half the minimum's bytes
        return compute_s(c) + max(floor, lib.comm_floor(c, compiled))

    def evaluate(c) -> dict:
        if c.name in reused:
            log(f"  {c.name}: reused from {out / 'search.json'}")
            return {k: v for k, v in reused[c.name].items()
                    if k not in ("name", "mesh", "remat", "accum", "estimate_s", "status", "reason",
                                 "fits_with_headroom")} | {"reused": True}
        cfg_c = _with(cfg, c)
        row = deviceless.compile_row(cfg_c, target, c.mesh, ("train_step",), devices, log=log)
        step = row["programs"]["train_step"]
        result = {"rows_per_device": c.rows(batch), "micro": c.micro(batch), "compile_s": row["compile_s"],
                  "bytes_per_device": row["bytes_per_device"], "usable_bytes": target.usable_bytes,
                  "memory": step.get("memory", {}), "collective_bytes": row["collective_bytes"],
                  "collective_ops": row["collective_ops"], "analytic_bytes": row["analytic_bytes"],
                  "recompute_factor": factors[c.remat]["factor"]}
        if "error" in step:
            result["error"] = step["error"]
        traffic = aot_traffic(row) or {}
        result["by_axes"] = {k: v.get("by_axes", {}) for k, v in step.get("collectives", {}).items()}
        result["projection"] = {}
        for ib, cluster in clusters.items():
            p = projection.project(compute_s(c, cluster), traffic, layout(c), cluster)
            result["projection"][str(int(ib))] = {
                "compute_s": p.compute_s, "nvlink_s": p.nvlink_s, "ib_s": p.ib_s, "latency_s": p.latency_s,
                "step_no_overlap_s": p.step_no_overlap_s, "step_full_overlap_s": p.step_full_overlap_s,
                "efficiency_no_overlap": p.efficiency_no_overlap,
                "mfu_no_overlap": model_flops / (p.step_no_overlap_s * cluster.peak_flops)}
        first = result["projection"][str(int(IB_RATES[0]))]
        result.update(step_s=first["step_no_overlap_s"], comm_s=first["step_no_overlap_s"] - first["compute_s"])
        return result

    devices = deviceless.target_devices(target)
    meta = {**identity, "num_devices": n, "nodes": nodes, "gpus_per_node": gpus_per_node, "headroom": headroom,
            "usable_bytes": target.usable_bytes, "device_memory_bytes": target.device_memory_bytes,
            "mfu_assumed": mfu_assumed, "ib_Gbps": list(IB_RATES), "select_ib_Gbps": IB_RATES[0],
            "max_compiles": max_compiles, "accums": accum_list, "meshes": ["x".join(map(str, m)) for m in mesh_list],
            "recompute_factors": factors, "assumptions": list(ASSUMPTIONS) + list(projection.ASSUMPTIONS),
            "limits": list(deviceless.LIMITS)}
    log(f"{target.name}: {len(cands)} candidates over {len(mesh_list)} meshes, at most {max_compiles} compiles")

    def save(records):
        write(out, "search.json", {**meta, "records": records, "selected": lib.select(records)})

    t0 = time.perf_counter()
    records = lib.run(cands, estimate, lower_bound, evaluate, max_compiles, headroom, on_record=save)
    chosen = lib.select(records)
    text = table(records, meta, chosen)
    print(text)
    payload = {**meta, "records": records, "selected": chosen, "search_s": time.perf_counter() - t0,
               "compile_s_total": sum(r.get("compile_s") or 0.0 for r in records), "table": text}
    path = write(out, "search.json", payload)
    plot(records, {**meta, "selected_name": chosen and chosen["name"]}, out / "search.png")
    print(f"wrote {path} and {out / 'search.png'}")
    return 0


ASSUMPTIONS = (
    "global batch fixed (the config's); per-device batch = global / (data x fsdp), run as `accum` "
    "microbatches (train.grad_accum_steps)",
    "compute = model FLOPs per device-step x the remat policy's recompute factor (XLA FLOPs of the "
    "unrolled lowered step / model FLOPs) at the assumed MFU; microbatch size does not change GEMM efficiency",
    "fits with headroom: the train step's bytes per device <= (1 - headroom) x usable memory "
    "(GPU: 75% of the device, JAX's preallocation); only the train step is compiled",
    "pruning: same tensor size, smaller fsdp, less recompute, fewer microbatches => at least as "
    "much memory and no slower (vlacabin_jax/perf/search.py)",
)


def _gib(v) -> str:
    return "-" if v is None else f"{v / GIB:.1f}"


def table(records: list[dict], meta: dict, chosen: dict | None) -> str:
    """The console table: every candidate in visiting order, compiled or why not."""
    rates = [str(int(r)) for r in meta["ib_Gbps"]]
    head = (f"{'#':>3} {'mesh':8} {'remat':5} {'acc':>3} {'mb':>3} {'GiB/dev':>7} {'free':>5} {'fit':>3}  "
            f"{'AG':>6} {'RS':>6} {'AR':>6} {'A2A':>5} {'CP':>5} GiB  {'comp ms':>7} {'NV ms':>6} "
            f"{'IB ms':>6} {'lat':>5}  {'step ms ' + '/'.join(rates):>15} {'MFU':>11}  note")
    lines = [f"{meta['target']}, {meta['config']}: global batch {meta['global_batch']}, usable "
             f"{_gib(meta['usable_bytes'])} GiB per device, headroom {meta['headroom']:.0%}; recompute factor "
             + ", ".join(f"{k} {meta['recompute_factors'][k]['factor']:.3f}" for k in REMATS
                         if k in meta["recompute_factors"])
             + f"; compute at {meta['mfu_assumed']:.0%} MFU", head]
    for i, r in enumerate(records, 1):
        mb = r.get("micro")
        lead = f"{i:3d} {r['mesh']:8} {r['remat']:5} {r['accum']:3d} {mb if mb else '':>3} "
        if r["status"] == "skipped":
            continue
        free = (None if r.get("bytes_per_device") is None
                else r["usable_bytes"] - r["bytes_per_device"])
        fit = {True: "yes", False: "no", None: "?"}[r.get("fits_with_headroom")]
        cb = r.get("collective_bytes") or {}
        colls = " ".join(f"{cb.get(k, 0.0) / GIB:{w}.1f}" for k, w in zip(KINDS, (6, 6, 6, 5, 5)))
        proj = r.get("projection") or {}
        if not proj:
            lines.append(lead + f"{_gib(r.get('bytes_per_device')):>7} {_gib(free):>5} {fit:>3}  FAILED: "
                         f"{r.get('error', '')[:120]}")
            continue
        p0 = proj[rates[0]]
        steps = "/".join(f"{proj[x]['step_no_overlap_s'] * 1e3:.0f}" for x in rates)
        mfus = "/".join(f"{proj[x]['mfu_no_overlap']:.3f}" for x in rates)
        note = "<- chosen" if chosen is not None and r["name"] == chosen["name"] else ""
        if r.get("reused"):
            note = (note + " (reused)").strip()
        lines.append(lead + f"{_gib(r['bytes_per_device']):>7} {_gib(free):>5} {fit:>3}  {colls}      "
                     f"{p0['compute_s'] * 1e3:7.0f} {p0['nvlink_s'] * 1e3:6.0f} {p0['ib_s'] * 1e3:6.0f} "
                     f"{p0['latency_s'] * 1e3:5.1f}  {steps:>15} {mfus:>11}  {note}")
    compiled = [r for r in records if r["status"] != "skipped"]
    skipped = [(i, r) for i, r in enumerate(records, 1) if r["status"] == "skipped"]
    if skipped:
        kinds: dict[str, list] = {}
        for i, r in skipped:
            kinds.setdefault(r["reason"].split(" by ")[0].split(",")[0].split(":")[0].split(" (")[0], []).append((i, r))
        lines.append(f"skipped {len(skipped)} (# = visiting order; each with its reason in search.json): " + "; ".join(
            f"{len(v)} {k}" + (f", e.g. #{v[0][0]} {v[0][1]['name']}: {v[0][1]['reason']}") for k, v in kinds.items()))
    reused = sum(1 for r in compiled if r.get("reused"))
    lines.append(f"{len(compiled)} of {len(records)} candidates compiled ({reused} "
                 f"reused); mb = samples per device per microbatch; GiB of collectives per device per step "
                 f"(unique channel ids); step = no overlap at {'/'.join(rates)} Gb/s IB; MFU = model FLOPs / "
                 f"(step x peak); component ms at {rates[0]} Gb/s")
    if chosen is None:
        lines.append("no candidate fits with the headroom asked")
    else:
        lines.append(f"chosen: {chosen['name']} (microbatch {chosen['micro']}): {_gib(chosen['bytes_per_device'])} "
                     f"GiB per device, {chosen['step_s'] * 1e3:.0f} ms per step at {rates[0]} Gb/s "
                     f"(no overlap); config: " + ", ".join(
                         f"{k}={v}" for k, v in _overrides(chosen).items()))
    return "\n".join(lines)


def _overrides(record: dict) -> dict:
    from vlacabin_jax.perf.search import Candidate

    mesh = tuple(int(s) for s in record["mesh"].split("x"))
    return Candidate(mesh, record["remat"], int(record["accum"])).overrides()


def plot(records: list[dict], meta: dict, path: Path) -> None:
    """Left: GiB per device of each compiled candidate against the usable memory and the headroom
    line. Right: its projected step (compute, NVLink, IB, latency; no overlap, first IB rate)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.get("projection")]
    rate = str(int(meta["ib_Gbps"][0]))
    fig, (ax_m, ax_s) = plt.subplots(1, 2, figsize=(max(10, 1.2 * len(done) + 4), 4.8))
    labels = [f"{r['mesh']}\n{r['remat']} x{r['accum']}" for r in done]
    colors = ["tab:green" if r.get("fits_with_headroom") else "tab:red" for r in done]
    ax_m.bar(labels, [(r.get("bytes_per_device") or 0) / GIB for r in done], color=colors)
    ax_m.axhline(meta["usable_bytes"] / GIB, color="k", ls="--", label="usable")
    ax_m.axhline(meta["usable_bytes"] * (1 - meta["headroom"]) / GIB, color="gray", ls=":", label="with headroom")
    ax_m.set_ylabel("train step GiB per device")
    ax_m.set_title(f"{meta['target']} memory (green: fits with headroom)")
    ax_m.legend(fontsize=8)
    bottom = [0.0] * len(done)
    for part in ("compute_s", "nvlink_s", "ib_s", "latency_s"):
        values = [r["projection"][rate][part] * 1e3 for r in done]
        ax_s.bar(labels, values, bottom=bottom, label=part[:-2])
        bottom = [b + v for b, v in zip(bottom, values)]
    chosen = next((i for i, r in enumerate(done) if meta.get("selected_name") == r["name"]), None)
    if chosen is not None:
        ax_s.text(chosen, bottom[chosen], "chosen", ha="center", va="bottom", fontsize=8)
    ax_s.set_ylabel(f"projected step ms (no overlap, {rate} Gb/s IB)")
    ax_s.set_title("step time")
    ax_s.legend(fontsize=8)
    for ax in (ax_m, ax_s):
        ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
