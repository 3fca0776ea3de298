"""The modes of `python -m tools.mesh_bench` (see its docstring): what each runs, prints and writes.

    run(args)              -> exit code; dispatches on the mode flags
    run_worker_task(args)  -> the JSON-able result of one worker subprocess

This module holds the worker side, the helpers the modes share, the mesh sweep and the scaling
over devices; the 16x8 A100 projection is in `tools/mesh_bench_projection.py`, the comparisons
(JAX vs PyTorch, DNFM vs autoregressive latency, compile cache, XLA FLOPs vs analytic) in
`tools/mesh_bench_compare.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from tools.mesh_bench import (COMPILED_PREFIX, BenchError, check_mesh_fits, load_config, mesh_name, parse_ints,
                              parse_mesh, run_worker)

AXES = ("data", "fsdp", "tensor")
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_MB = 1e6


# ------------------------------------------------------------------------------------ worker side


def run_worker_task(args: argparse.Namespace) -> dict:
    """Runs `args.task` on this process's devices (mesh `args.mesh`)."""
    import jax

    cfg = load_config(args.config, args.override)
    mesh_sizes = parse_mesh(args.mesh)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_sizes
    if args.global_batch:
        cfg.train.global_batch_size = args.global_batch
    devices = jax.devices()[:math.prod(mesh_sizes)]
    from vlacabin_jax import sharding

    mesh = sharding.make_mesh(cfg.mesh, devices)
    if args.task == "train":
        from vlacabin_jax.perf import measure

        def report_compiled(info: dict) -> None:
            print(COMPILED_PREFIX + json.dumps(info), flush=True)

        return measure.measure_train_step(cfg, mesh, args.steps, on_compiled=report_compiled)
    if args.task == "vs_torch":
        return _vs_torch_worker(cfg, mesh, args.steps)
    if args.task == "inference":
        return _inference_worker(cfg, args.steps)
    raise BenchError(f"unknown worker task {args.task!r}")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _vs_torch_worker(cfg, mesh, steps: int) -> dict:
    """The JAX train step and the PyTorch mirror's (eager, torch.compile) on one batch, timed
    round-robin (one step of each in turn) so that the machine's load touches all alike."""
    import shutil
    import statistics

    import torch

    from vlacabin_jax.export.convert import mirror_config
    from vlacabin_jax.perf import measure, torch_train

    batch = measure.one_batch(cfg, int(cfg.train.global_batch_size))
    runs, out = {}, {}
    jax_run, jax_info = measure.prepare_train_step(cfg, mesh, batch)
    runs["jax"] = jax_run
    out["jax"] = {"compile_s": jax_info["compile_s"], "first_s": jax_run()}
    config = mirror_config(cfg, int(cfg.model.dnfm.sample_steps))
    inputs = torch_train.inputs_from_batch(batch)
    for name, compiled in (("torch_eager", False), ("torch_compile", True)):
        if compiled and not shutil.which(os.environ.get("CXX", "g++")):
            out[name] = {"error": "torch.compile (inductor) on CPU needs a C++ compiler; none found (g++)"}
            continue
        try:
            run, info = torch_train.prepare_torch_step(config, inputs, compiled)
            out[name] = {"first_s": run(), "threads": info["threads"], "terms": info["terms"]}
            run()
            runs[name] = run
        except Exception as e:  # noqa: BLE001  (inductor failures are many kinds; report, don't crash)
            out[name] = {"error": _one_line(e)}
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            times[name].append(run())
    for name, ts in times.items():
        out[name].update(median_step_s=statistics.median(ts), step_times_s=ts)
    out["torch_version"] = torch.__version__
    out["global_batch"] = int(cfg.train.global_batch_size)
    out["dtype"] = cfg.model.dtype
    return out


def _inference_worker(cfg, steps: int) -> dict:
    """Decision latency at batch 1: DNFM K = 1, 2, 4, 8 and the autoregressive head."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vlacabin_jax.model import functional
    from vlacabin_jax.perf import autoregressive, measure
    from vlacabin_jax.train.step import HOST_ONLY_FIELDS

    params, frozen = nn.unbox(functional.init_params(cfg, jax.random.key(0)))
    batch = {k: jnp.asarray(v) for k, v in measure.one_batch(cfg, 1).items() if k not in HOST_ONLY_FIELDS}
    result = autoregressive.time_decisions(cfg, params, frozen, batch, repeats=steps)
    return {"decisions": result, "platform": jax.devices()[0].platform,
            "device_kind": getattr(jax.devices()[0], "device_kind", "")}


# ------------------------------------------------------------------------------------ helpers


def _cache_dir(args: argparse.Namespace, out: Path) -> str:
    return args.cache_dir or os.environ.get("VLACABIN_JAX_CACHE") or str(out / "jax_cache")


def _measure(args, cfg_spec: str, mesh: tuple[int, int, int], cache: str, global_batch: int = 0,
             task: str = "train", overrides: list[str] | None = None, steps: int | None = None) -> dict:
    """One worker subprocess on exactly the mesh's device count (see `tools.mesh_bench.run_worker`)."""
    argv = ["--config", cfg_spec, "--mesh", mesh_name(mesh), "--steps", str(steps or args.steps), "--task", task]
    argv += [f"--override={o}" for o in (args.override if overrides is None else overrides)]
    if global_batch:
        argv += ["--global-batch", str(global_batch)]
    label = f"{cfg_spec.rsplit(':', 1)[-1]} {mesh_name(mesh)}" + (f" B={global_batch}" if global_batch else "")
    print(f"measuring {label} ...", flush=True)
    return run_worker(argv, math.prod(mesh), cache, args.timeout, args.retries, label, args.collective_timeout)


def compiled_view(row: dict) -> dict | None:
    """A sweep row as far as it got: the row itself if its steps ran; if it compiled but its
    steps failed, the compiled program's analysis (memory, compile time, collectives) under the
    row's mesh and analytic bytes, with no step figures; None if it never compiled."""
    if "error" not in row:
        return row
    if not row.get("compiled"):
        return None
    return {**row["compiled"], "mesh": row["mesh"], "analytic_bytes": row.get("analytic_bytes", {})}


def _collective_bytes(result: dict) -> dict[str, float]:
    out = {k: 0.0 for k in KINDS}
    for c in result.get("collectives", []):
        out[c["kind"]] += c["bytes"] * c["count"]
    return out


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _publish(out: Path, name: str, payload: dict, table: str) -> int:
    """Prints a mode's table, writes `payload` plus the table to `out/name`; exit code 0."""
    print(table)
    print(f"wrote {_write(out, name, {**payload, 'table': table})}")
    return 0


def _write(out: Path, name: str, payload: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


# ------------------------------------------------------------------------------------ sweep


def sweep(args: argparse.Namespace) -> int:
    """Every mesh of `--meshes` (and a 1-device baseline): step time, throughput, scaling
    efficiency, memory, compile time, collective bytes against the analytic minimum."""
    from vlacabin_jax.perf import analytic

    cfg = load_config(args.config, args.override)
    meshes = [parse_mesh(m) for m in args.meshes.split(",") if m.strip()]
    for m in meshes:
        check_mesh_fits(cfg, m, args.cpu_devices)
    out = Path(args.out)
    cache = _cache_dir(args, out)
    batch = int(cfg.train.global_batch_size)
    rows = []
    params = analytic.param_table(cfg)
    payload = {"config": args.config, "overrides": args.override, "global_batch": batch, "steps": args.steps,
               "baseline": None, "meshes": rows}
    if not args.no_baseline:
        payload["baseline"] = {**_measure(args, args.config, (1, 1, 1), cache), "mesh": "1x1x1"}
        _write(out, "sweep.json", payload)  # partial results survive an interrupted sweep
    for mesh in meshes:
        result = _measure(args, args.config, mesh, cache)
        result["mesh"] = mesh_name(mesh)
        result["analytic_bytes"] = analytic.by_kind(analytic.minimum_bytes(cfg, dict(zip(AXES, mesh)), params))
        rows.append(result)
        _write(out, "sweep.json", payload)
    baseline = payload["baseline"]
    payload["table"] = table = sweep_table(cfg, rows, baseline, batch)
    print(table)
    path = _write(out, "sweep.json", payload)
    plot_sweep(rows, baseline, out / "sweep.png", args.config)
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
        measured, minimum = _collective_bytes(r), r.get("analytic_bytes", {})
        colls = " | ".join(f"{measured[k] / _MB:.2f} ({minimum.get(k, 0.0) / _MB:.2f})" if k != "collective-permute"
                           else f"{measured[k] / _MB:.2f}" for k in KINDS)
        cached = "*" if r.get("compile_cache_hit") else " "
        lines.append(f"{r['mesh']:8} {_fmt(step and step * 1e3, '9.1f'):>9} {_fmt(rate, '10.1f'):>10} "
                     f"{_fmt(rate and rate / n, '8.1f'):>8} "
                     f"{_fmt(eff, '6.2f'):>6} {_fmt(peak and peak / 2**20, '9.1f'):>9} "
                     f"{_fmt(alloc and alloc * 1024, '9.1f'):>9} {r['compile_s']:9.1f}{cached} {_fmt(r.get('mfu'), '5.1%'):>5}  "
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
        measured, minimum = _collective_bytes(r), r.get("analytic_bytes", {})
        b.bar(xs, [measured[k] / _MB for k in KINDS], width, label=f"{r['mesh']} measured")
        b.scatter(xs, [minimum.get(k, 0.0) / _MB for k in KINDS], color="black", marker="_", s=200, zorder=3)
    b.set_xticks([k + 0.4 - width / 2 for k in range(len(KINDS))], ["AG", "RS", "AR", "A2A", "CP"])
    b.set_ylabel("MB per device per step (black: analytic minimum)")
    b.set_title("collective bytes from the compiled HLO")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ scaling over devices


def scaling(args: argparse.Namespace) -> int:
    """Data parallelism over `--devices`: strong (the config's global batch) and weak scaling (the
    per-device batch of the largest count kept), efficiency against one device."""
    cfg = load_config(args.config, args.override)
    counts = parse_ints(args.devices, "--devices")
    if 1 not in counts:
        counts = [1] + counts
    largest, batch = max(counts), int(cfg.train.global_batch_size)
    if batch % largest:
        raise BenchError(f"--devices {args.devices}: the global batch {batch} is not divisible by {largest}; "
                         f"use device counts that divide it")
    per_device = batch // largest
    for n in counts:
        check_mesh_fits(cfg, (n, 1, 1), args.cpu_devices)
    out, cache = Path(args.out), _cache_dir(args, Path(args.out))
    strong = {n: _measure(args, args.config, (n, 1, 1), cache) for n in counts}
    weak = {n: strong[n] if per_device * n == batch else _measure(args, args.config, (n, 1, 1), cache, per_device * n)
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
        lines.append(f"{n:7d} {s['median_step_s'] * 1e3:10.1f} {s['samples_per_s']:10.1f} {_fmt(se, '6.2f'):>6} "
                     f"{w['median_step_s'] * 1e3:9.1f} {per_device * n:4d} {w['samples_per_s']:10.1f} "
                     f"{_fmt(we, '6.2f'):>6}")
    lines.append(f"strong: global batch {batch}, eff = T1 / (n Tn); weak: {per_device} per device, eff = T1 / Tn "
                 f"(T1 at batch {per_device}). Simulated CPU devices share the host's cores, so CPU "
                 f"efficiencies measure overheads, not a cluster.")
    text = "\n".join(lines)
    return _publish(out, "scaling.json", {"config": args.config, "strong": strong, "weak": weak}, text)


# ------------------------------------------------------------------------------------ dispatch


def run(args: argparse.Namespace) -> int:
    from tools.mesh_bench_compare import compile_cache, flops, inference, vs_torch
    from tools.mesh_bench_projection import project

    if args.project:
        return project(args)
    if args.vs_torch:
        return vs_torch(args)
    if args.inference:
        return inference(args)
    if args.compile_cache:
        return compile_cache(args)
    if args.flops:
        return flops(args)
    if args.devices:
        return scaling(args)
    return sweep(args)
