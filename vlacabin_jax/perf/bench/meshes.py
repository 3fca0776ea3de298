"""Measured train steps across meshes: the mesh sweep and the scaling over data-parallel devices.

    sweep(config, meshes, runner, out)     -> exit code; prints a table, writes sweep.json, sweep.png
    scaling(config, devices, runner, out)  -> exit code; prints a table, writes scaling.json
"""

from __future__ import annotations

import math
from pathlib import Path

from vlacabin_jax.perf.bench.common import (AXES, KINDS, MB, BenchError, Runner, check_mesh_fits, collective_bytes,
                                            compiled_view, fmt, load_config, mesh_name, parse_ints, parse_mesh,
                                            parse_meshes, publish, write)

DEFAULT_MESHES = "8x1x1,4x2x1,2x2x2,1x8x1"


def sweep(config: str, meshes: str, runner: Runner, out: str | Path, baseline: bool = True) -> int:
    """Every mesh of `meshes` ("8x1x1,4x2x1") and a 1-device baseline: step time, throughput,
    scaling efficiency, memory, compile time, collective bytes against the analytic minimum."""
    from vlacabin_jax.perf import analytic

    cfg = load_config(config, runner.overrides)
    mesh_list = parse_meshes(meshes)
    for m in mesh_list:
        check_mesh_fits(cfg, m, runner.cpu_devices)
    out = Path(out)
    cache = runner.cache(out)
    batch = int(cfg.train.global_batch_size)
    rows = []
    params = analytic.param_table(cfg)
    payload = {"config": config, "overrides": list(runner.overrides), "global_batch": batch, "steps": runner.steps,
               "baseline": None, "meshes": rows}
    if baseline:
        payload["baseline"] = {**runner.measure(config, (1, 1, 1), cache), "mesh": "1x1x1"}
        write(out, "sweep.json", payload)  # partial results survive an interrupted sweep
    for mesh in mesh_list:
        result = runner.measure(config, mesh, cache)
        result["mesh"] = mesh_name(mesh)
        result["analytic_bytes"] = analytic.by_kind(analytic.minimum_bytes(cfg, dict(zip(AXES, mesh)), params))
        rows.append(result)
        write(out, "sweep.json", payload)
    base = payload["baseline"]
    payload["table"] = table = sweep_table(cfg, rows, base, batch)
    print(table)
    path = write(out, "sweep.json", payload)
    plot_sweep(rows, base, out / "sweep.png", config)
    print(f"wrote {path} and {out / 'sweep.png'}")
    return 0


def sweep_table(cfg, rows: list[dict], baseline: dict | None, batch: int) -> str:
    """The console table of a sweep (one line per mesh; failed meshes say so)."""
    head = (f"{'mesh':8} {'step ms':>9} {'samples/s':>10} {'/device':>8} {'eff':>6} {'peak MiB':>9} "
            f"{'alloc MiB':>9} {'compile s':>10} {'MFU':>5}  collective MB measured (analytic min): "
            f"AG | RS | AR | A2A | CP")
    lines = [head]
    t1 = baseline.get("median_step_s") if baseline and "error" not in baseline else None
    for row in ([baseline] if baseline else []) + rows:
        r = compiled_view(row)
        if r is None:
            lines.append(f"{row['mesh']:8} FAILED after {row['attempts']} attempts: {row['error']}")
            continue
        n = math.prod(parse_mesh(r["mesh"]))
        step, rate = r.get("median_step_s"), r.get("samples_per_s")
        eff = t1 / (n * step) if t1 and step else None  # strong scaling: same global batch
        peak = r["memory"].get("peak_bytes")
        alloc = r.get("allocator", {}).get("peak_memory_gib")
        measured, minimum = collective_bytes(r), r.get("analytic_bytes", {})
        colls = " | ".join(f"{measured[k] / MB:.2f} ({minimum.get(k, 0.0) / MB:.2f})" if k != "collective-permute"
                           else f"{measured[k] / MB:.2f}" for k in KINDS)
        cached = "*" if r.get("compile_cache_hit") else " "
        lines.append(f"{r['mesh']:8} {fmt(step and step * 1e3, '9.1f'):>9} {fmt(rate, '10.1f'):>10} "
                     f"{fmt(rate and rate / n, '8.1f'):>8} "
                     f"{fmt(eff, '6.2f'):>6} {fmt(peak and peak / 2**20, '9.1f'):>9} "
                     f"{fmt(alloc and alloc * 1024, '9.1f'):>9} {r['compile_s']:9.1f}{cached} {fmt(r.get('mfu'), '5.1%'):>5}  "
                     f"{colls}")
        if "error" in row:
            lines.append(f"{'':8} ^ compiled, but its steps FAILED after {row['attempts']} attempts: {row['error']}")
    lines.append(f"global batch {batch}; eff = T(1 device) / (devices x T(mesh)) at the same global batch; "
                 f"peak = XLA memory analysis per device (arguments + outputs + temporaries - aliases); "
                 f"alloc = allocator peak where the backend reports it; * = compile loaded from the cache; "
                 f"MFU from model_flops_per_sample on a known accelerator (- on CPU); "
                 f"AG/RS/AR/A2A/CP = all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute "
                 f"bytes per device per step from the compiled HLO (full operand sizes, loop trip counts "
                 f"applied), analytic minimum in parentheses (vlacabin_jax/perf/analytic.py)")
    return "\n".join(lines)


def plot_sweep(rows: list[dict], baseline: dict | None, path: Path, title: str) -> None:
    """Two panels: median step time per mesh; measured vs analytic collective MB per kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in ([baseline] if baseline else []) + rows if "error" not in r]
    compiled = [c for c in map(compiled_view, rows) if c is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar([r["mesh"] for r in ok], [r["median_step_s"] * 1e3 for r in ok], color="tab:blue")
    a.set_ylabel("median step time (ms)")
    a.set_title(f"{title}: step time per mesh")
    meshes = [r for r in compiled if r["mesh"] != "1x1x1"]
    width = 0.8 / max(len(meshes), 1)
    for i, r in enumerate(meshes):
        xs = [k + i * width for k in range(len(KINDS))]
        measured, minimum = collective_bytes(r), r.get("analytic_bytes", {})
        b.bar(xs, [measured[k] / MB for k in KINDS], width, label=f"{r['mesh']} measured")
        b.scatter(xs, [minimum.get(k, 0.0) / MB for k in KINDS], color="black", marker="_", s=200, zorder=3)
    b.set_xticks([k + 0.4 - width / 2 for k in range(len(KINDS))], ["AG", "RS", "AR", "A2A", "CP"])
    b.set_ylabel("MB per device per step (black: analytic minimum)")
    b.set_title("collective bytes from the compiled HLO")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def scaling(config: str, devices: str, runner: Runner, out: str | Path) -> int:
    """Data parallelism over `devices` ("1,2,4,8"): strong (the config's global batch) and weak
    scaling (the per-device batch of the largest count kept), efficiency against one device."""
    cfg = load_config(config, runner.overrides)
    counts = parse_ints(devices, "--devices")
    if 1 not in counts:
        counts = [1] + counts
    largest, batch = max(counts), int(cfg.train.global_batch_size)
    if batch % largest:
        raise BenchError(f"--devices {devices}: the global batch {batch} is not divisible by {largest}; "
                         f"use device counts that divide it")
    per_device = batch // largest
    for n in counts:
        check_mesh_fits(cfg, (n, 1, 1), runner.cpu_devices)
    out = Path(out)
    cache = runner.cache(out)
    strong = {n: runner.measure(config, (n, 1, 1), cache) for n in counts}
    weak = {n: strong[n] if per_device * n == batch else runner.measure(config, (n, 1, 1), cache, per_device * n)
            for n in counts}
    lines = [f"{'devices':>7} {'strong ms':>10} {'samples/s':>10} {'eff':>6} {'weak ms':>9} {'B':>4} "
             f"{'samples/s':>10} {'eff':>6}"]
    s1, w1 = strong[1].get("median_step_s"), weak[1].get("median_step_s")
    for n in counts:
        s, w = strong[n], weak[n]
        if "error" in s or "error" in w:
            lines.append(f"{n:7d} FAILED: {s.get('error') or w.get('error')}")
            continue
        se = s1 / (n * s["median_step_s"]) if s1 else None
        we = w1 / w["median_step_s"] if w1 else None
        lines.append(f"{n:7d} {s['median_step_s'] * 1e3:10.1f} {s['samples_per_s']:10.1f} {fmt(se, '6.2f'):>6} "
                     f"{w['median_step_s'] * 1e3:9.1f} {per_device * n:4d} {w['samples_per_s']:10.1f} "
                     f"{fmt(we, '6.2f'):>6}")
    lines.append(f"strong: global batch {batch}, eff = T1 / (n Tn); weak: {per_device} per device, eff = T1 / Tn "
                 f"(T1 at batch {per_device}). Simulated CPU devices share the host's cores, so CPU "
                 f"efficiencies measure overheads, not a cluster.")
    text = "\n".join(lines)
    return publish(out, "scaling.json", {"config": config, "strong": strong, "weak": weak}, text)
