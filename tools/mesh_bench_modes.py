"""The modes of `python -m tools.mesh_bench` (see its docstring): what each runs, prints and writes.

    run(args)              -> exit code; dispatches on the mode flags
    run_worker_task(args)  -> the JSON-able result of one worker subprocess
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

from tools.mesh_bench import (BenchError, check_mesh_fits, load_config, mesh_name, parse_ints, parse_mesh,
                              run_worker)

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

        return measure.measure_train_step(cfg, mesh, args.steps)
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


def _collective_bytes(result: dict) -> dict[str, float]:
    out = {k: 0.0 for k in KINDS}
    for c in result.get("collectives", []):
        out[c["kind"]] += c["bytes"] * c["count"]
    return out


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


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
    for r in ([baseline] if baseline else []) + rows:
        if "error" in r:
            lines.append(f"{r['mesh']:8} FAILED after {r['attempts']} attempts: {r['error']}")
            continue
        n = math.prod(parse_mesh(r["mesh"]))
        step = r["median_step_s"]
        eff = t1 / (n * step) if t1 and step else None  # strong scaling: same global batch
        peak = r["memory"].get("peak_bytes")
        alloc = r["allocator"].get("peak_memory_gib")
        measured, minimum = _collective_bytes(r), r.get("analytic_bytes", {})
        colls = " | ".join(f"{measured[k] / _MB:.2f} ({minimum.get(k, 0.0) / _MB:.2f})" if k != "collective-permute"
                           else f"{measured[k] / _MB:.2f}" for k in KINDS)
        cached = "*" if r.get("compile_cache_hit") else " "
        lines.append(f"{r['mesh']:8} {step * 1e3:9.1f} {r['samples_per_s']:10.1f} {r['samples_per_s'] / n:8.1f} "
                     f"{_fmt(eff, '6.2f'):>6} {_fmt(peak and peak / 2**20, '9.1f'):>9} "
                     f"{_fmt(alloc and alloc * 1024, '9.1f'):>9} {r['compile_s']:9.1f}{cached} {_fmt(r.get('mfu'), '5.1%'):>5}  "
                     f"{colls}")
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
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    a.bar([r["mesh"] for r in ok], [r["median_step_s"] * 1e3 for r in ok], color="tab:blue")
    a.set_ylabel("median step time (ms)")
    a.set_title(f"{title}: step time per mesh")
    meshes = [r for r in ok if r["mesh"] != "1x1x1"]
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


# ------------------------------------------------------------------------------------ dispatch


def run(args: argparse.Namespace) -> int:
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


# ------------------------------------------------------------------------------------ projection

# Cluster layouts of 128 GPUs and the 8-device mesh whose measured collectives stand in for them
# (the same axes are sharded, so the same collectives run over larger groups).
LAYOUTS = (("128x1x1", "8x1x1"), ("16x8x1", "4x2x1"), ("1x128x1", "1x8x1"), ("16x4x2", "2x2x2"))


def _measured_traffic(result: dict) -> dict[tuple[str, tuple[str, ...]], dict]:
    traffic: dict = {}
    for c in result.get("collectives", []):
        key = (c["kind"], tuple(c["axes"]))
        row = traffic.setdefault(key, {"bytes": 0.0, "ops": 0})
        row["bytes"] += c["bytes"] * c["count"]
        row["ops"] += c["count"]
    return traffic


def _sweeps(paths: str | None) -> dict[str, dict]:
    """{variant: sweep.json payload} of the `--sweeps` directories."""
    found: dict[str, dict] = {}
    for d in filter(None, (paths or "").split(",")):
        f = Path(d) / "sweep.json"
        if not f.is_file():
            raise BenchError(f"--sweeps {d}: no sweep.json there; run a sweep with --out {d} first")
        payload = json.loads(f.read_text())
        found[payload["config"].rsplit(":", 1)[-1]] = payload
    return found


def project(args: argparse.Namespace) -> int:
    """16 nodes x 8 A100 at 200 and 400 Gb/s: projected step time and scaling efficiency per layout,
    from measured HLO collectives (`--sweeps`) where there are some, else the analytic minimum."""
    from vlacabin_jax.model.flops import model_flops_per_sample
    from vlacabin_jax.perf import analytic, projection

    sweeps = _sweeps(args.sweeps)
    config_file = args.config.partition(":")[0]
    rows, lines = [], []
    head = (f"{'config':9} {'layout':8} {'source':9} {'IB Gb/s':>7} {'B/dev':>5} {'compute ms':>10} "
            f"{'NVLink ms':>9} {'IB ms':>8} {'lat ms':>6} {'step ms none/full':>19} {'eff none/full':>13}")
    lines.append(head)
    for variant in args.configs.split(","):
        cfg = load_config(f"{config_file}:{variant}", args.override)
        sweep_payload = sweeps.get(variant)
        per_device = (sweep_payload["global_batch"] // 8 if sweep_payload
                      else int(cfg.train.global_batch_size) // projection.Cluster().size)
        per_device = max(per_device, 1)
        params = None
        for layout_name, source_mesh in LAYOUTS:
            layout = dict(zip(AXES, parse_mesh(layout_name)))
            measured = None
            if sweep_payload:
                measured = next((r for r in sweep_payload["meshes"] if r["mesh"] == source_mesh and "error" not in r),
                                None)
            if measured is not None:
                traffic, source = _measured_traffic(measured), "HLO " + source_mesh
            else:
                params = analytic.param_table(cfg) if params is None else params
                cfg.train.global_batch_size = per_device * math.prod(layout.values())
                traffic, source = analytic.minimum_bytes(cfg, layout, params), "analytic"
            for ib in (200.0, 400.0):
                cluster = projection.Cluster(ib_Gbps=ib)
                compute = projection.compute_seconds(model_flops_per_sample(cfg) * per_device, cluster,
                                                     args.mfu_assumed)
                p = projection.project(compute, traffic, layout, cluster)
                rows.append({"config": variant, "layout": layout_name, "source": source, "ib_Gbps": ib,
                             "per_device_batch": per_device, "compute_s": p.compute_s, "nvlink_s": p.nvlink_s,
                             "ib_s": p.ib_s, "latency_s": p.latency_s, "step_no_overlap_s": p.step_no_overlap_s,
                             "step_full_overlap_s": p.step_full_overlap_s,
                             "efficiency_no_overlap": p.efficiency_no_overlap,
                             "efficiency_full_overlap": p.efficiency_full_overlap})
                lines.append(f"{variant:9} {layout_name:8} {source[:9]:9} {ib:7.0f} {per_device:5d} "
                             f"{p.compute_s * 1e3:10.3f} {p.nvlink_s * 1e3:9.3f} {p.ib_s * 1e3:8.3f} "
                             f"{p.latency_s * 1e3:6.2f} {p.step_no_overlap_s * 1e3:9.3f}/"
                             f"{p.step_full_overlap_s * 1e3:<9.3f}"
                             f"{p.efficiency_no_overlap:6.3f}/{p.efficiency_full_overlap:<6.3f}")
    lines.append(f"16 nodes x 8 A100; compute = analytic model FLOPs per device-step at an assumed "
                 f"{args.mfu_assumed:.0%} MFU; layouts DATAxFSDPxTENSOR; 'HLO m' = collectives measured on the "
                 f"8-device mesh m (same sharded axes, same per-device batch), 'analytic' = the minimum of "
                 f"vlacabin_jax/perf/analytic.py. Model assumptions:")
    lines += [f"  - {a}" for a in projection.ASSUMPTIONS]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    path = _write(out, "projection.json", {"rows": rows, "assumptions": list(projection.ASSUMPTIONS),
                                           "mfu_assumed": args.mfu_assumed, "table": text})
    plot_projection(rows, out / "projection.png")
    print(f"wrote {path} and {out / 'projection.png'}")
    return 0


def plot_projection(rows: list[dict], path: Path) -> None:
    """Scaling efficiency (no overlap) per config and layout, 200 vs 400 Gb/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({(r["config"], r["layout"]) for r in rows}, key=lambda k: [r["config"] for r in rows].index(k[0]))
    fig, ax = plt.subplots(figsize=(max(6, len(labels) * 0.7), 4.5))
    for j, ib in enumerate((200.0, 400.0)):
        eff = {(r["config"], r["layout"]): r["efficiency_no_overlap"] for r in rows if r["ib_Gbps"] == ib}
        ax.bar([i + 0.4 * j for i in range(len(labels))], [eff.get(k, 0) for k in labels], 0.4, label=f"{ib:.0f} Gb/s")
    ax.set_xticks([i + 0.2 for i in range(len(labels))], [f"{c}\n{lay}" for c, lay in labels], fontsize=7)
    ax.set_ylabel("projected scaling efficiency (no overlap)")
    ax.set_title("16 nodes x 8 A100")
    ax.legend()
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
    print(text)
    path = _write(out, "scaling.json", {"config": args.config, "strong": strong, "weak": weak, "table": text})
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------ JAX vs PyTorch


def vs_torch(args: argparse.Namespace) -> int:
    """Step time of the JAX trainer vs the PyTorch mirror (eager and torch.compile), one device."""
    overrides = list(args.override)
    if not any("model.dtype" in o for o in overrides):
        # The CPU mirror computes in float32 (float16 is its GPU/TensorRT path): compare like with like.
        overrides += ["--config.model.dtype=float32", "--config.model.anchor_dtype=float32"]
    cfg = load_config(args.config, overrides)
    mesh = parse_mesh(args.mesh)
    check_mesh_fits(cfg, mesh, args.cpu_devices)
    out = Path(args.out)
    r = _measure(args, args.config, mesh, _cache_dir(args, out), task="vs_torch", overrides=overrides)
    if "error" in r:
        print(f"vs-torch FAILED: {r['error']}")
        return 1
    jax_s = r["jax"]["median_step_s"]
    lines = [f"{'framework':14} {'step ms':>9} {'first step s':>12}  JAX/this"]
    for name in ("jax", "torch_eager", "torch_compile"):
        row = r.get(name, {})
        if "median_step_s" not in row:
            lines.append(f"{name:14} not measured: {row.get('error', 'unknown')}")
            continue
        first = row.get("compile_s", row.get("first_s"))
        lines.append(f"{name:14} {row['median_step_s'] * 1e3:9.1f} {first:12.1f}  {jax_s / row['median_step_s']:.3f}")
    lines.append(f"mesh {args.mesh}, global batch "
                 f"{r['global_batch']}, {r['dtype']}, the same batch; steps timed round-robin; JAX/this < 1 "
                 f"means JAX is faster. JAX: the trainer's step (all loss terms, AdamW, clipping); PyTorch "
                 f"{r.get('torch_version')}: the export mirror with the loss terms "
                 f"{', '.join(r.get('torch_eager', {}).get('terms', []))} (vlacabin_jax/perf/torch_train.py), "
                 f"AdamW, clipping; torch.compile compiles the loss and its backward, the optimizer stays eager. "
                 f"First step = compile (JAX: lower + compile).")
    text = "\n".join(lines)
    print(text)
    path = _write(out, "vs_torch.json", {**r, "table": text})
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------ inference


def inference(args: argparse.Namespace) -> int:
    """DNFM K = 1, 2, 4, 8 against an autoregressive action head: latency per decision at batch 1."""
    cfg = load_config(args.config, args.override)
    out = Path(args.out)
    r = _measure(args, args.config, (1, 1, 1), _cache_dir(args, out), task="inference")
    if "error" in r:
        print(f"inference FAILED: {r['error']}")
        return 1
    d = r["decisions"]
    ar = d["autoregressive"]["median_s"]
    lines = [f"{'decision':15} {'median ms':>10} {'vs AR':>7} {'Hz':>7} {'<=33 ms':>8}"]
    for name, row in d.items():
        ms = row["median_s"] * 1e3
        lines.append(f"{name:15} {ms:10.2f} {row['median_s'] / ar:7.3f} {1e3 / ms:7.1f} "
                     f"{'yes' if ms <= 1e3 / 30 else 'no':>8}")
    lines.append(f"batch 1, {r['platform']} {r['device_kind']}; action_len {cfg.model.action_len}; a decision = "
                 f"backbone (encoders, frozen ViT, bridge through the frozen LM, connector) + DNFM K Euler steps, "
                 f"or + {cfg.model.action_len} greedy steps of a causal head the DNFM's size (re-run on the "
                 f"fixed buffer, no KV cache; random weights); 'vs AR' = this / autoregressive; target 30 Hz "
                 f"(<= 33 ms) for base on one GPU.")
    text = "\n".join(lines)
    print(text)
    path = _write(out, "inference.json", {**r, "table": text})
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------ compile cache


def compile_cache(args: argparse.Namespace) -> int:
    """Two fresh processes on one new persistent cache: the train step's compile time each time."""
    import tempfile

    cfg = load_config(args.config, args.override)
    mesh = parse_mesh(args.mesh)
    check_mesh_fits(cfg, mesh, args.cpu_devices)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="compile_cache-", dir=out)
    runs = [_measure(args, args.config, mesh, cache, steps=1) for _ in range(2)]
    if any("error" in r for r in runs):
        print(f"compile-cache FAILED: {[r.get('error') for r in runs]}")
        return 1
    first, second = runs[0]["compile_s"], runs[1]["compile_s"]
    lines = [f"train step compile ({mesh_name(mesh)}), fresh cache {cache}:"]
    for name, r in zip(("first start ", "second start"), runs):
        lines.append(f"  {name} {r['compile_s']:8.2f} s (cache hit: {r['compile_cache_hit']}), "
                     f"process {r['wall_s']:.1f} s")
    lines.append(f"  second / first = {second / first:.3f}")
    text = "\n".join(lines)
    print(text)
    path = _write(out, "compile_cache.json", {"cache_dir": cache, "runs": runs, "table": text})
    print(f"wrote {path}")
    return 0


# ------------------------------------------------------------------------------------ FLOPs / MFU analysis


def flops(args: argparse.Namespace) -> int:
    """XLA's FLOPs of the lowered train step (unrolled layers, so every layer counts) against the
    analytic model FLOPs, with remat off and on: the recompute overhead that caps MFU, and the step
    time one GPU needs for 50% MFU. Lowering only (abstract inputs): nothing is run or compiled."""
    import jax

    from vlacabin_jax import sharding
    from vlacabin_jax.data.spec import batch_spec
    from vlacabin_jax.model.flops import model_flops_per_sample
    from vlacabin_jax.train import metrics as metrics_lib
    from vlacabin_jax.train import state as state_lib
    from vlacabin_jax.train import step as step_lib

    rows = []
    for remat in (False, True):
        cfg = load_config(args.config, args.override)
        cfg.model.remat, cfg.model.scan_layers = remat, False
        cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.tensor = 1
        if args.global_batch:
            cfg.train.global_batch_size = args.global_batch
        b = int(cfg.train.global_batch_size)
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
        abstract, shardings = state_lib.state_shardings(cfg, mesh)
        state = state_lib.abstract_with_shardings(abstract, shardings)
        bshard = step_lib.batch_shardings(cfg, mesh)
        batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=bshard[k])
                 for k, (shape, dtype) in batch_spec(cfg, b).items() if k in bshard}
        t0 = time.perf_counter()
        lowered = step_lib.make_train_step(cfg, mesh, shardings).lower(state, batch)
        ca = lowered.cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        hlo_flops = float(ca["flops"])
        rows.append({"remat": remat, "batch": b, "hlo_flops": hlo_flops, "lower_s": time.perf_counter() - t0,
                     "model_flops": model_flops_per_sample(cfg) * b,
                     "bytes_accessed": float(ca.get("bytes accessed", 0.0))})
    peaks = {"A100": 312e12, "H100": 989e12}
    device_peak = metrics_lib.peak_flops_per_device(jax.devices()[0])
    lines = [f"{'remat':6} {'batch':>5} {'model GFLOP':>12} {'HLO GFLOP':>10} {'HLO/model':>9} "
             f"{'MFU ceiling':>11} {'H100 ms @50%':>12} {'A100 ms @50%':>12}"]
    for r in rows:
        ratio = r["hlo_flops"] / r["model_flops"]
        lines.append(f"{str(r['remat']):6} {r['batch']:5d} {r['model_flops'] / 1e9:12.1f} {r['hlo_flops'] / 1e9:10.1f} "
                     f"{ratio:9.3f} {min(1.0, 1 / ratio):11.2f} {r['model_flops'] / (0.5 * peaks['H100']) * 1e3:12.2f} "
                     f"{r['model_flops'] / (0.5 * peaks['A100']) * 1e3:12.2f}")
    lines.append("HLO = XLA cost analysis of the lowered (unoptimised) step, layers unrolled; model = "
                 "vlacabin_jax/model/flops.py (what MFU counts); MFU ceiling = model / HLO, the best MFU "
                 "if every executed FLOP ran at peak; 'ms @50%' = the step time 50% MFU needs. "
                 + ("" if device_peak else "No accelerator here: MFU itself needs a GPU/TPU run (the sweep's "
                                           "1-device row reports it there)."))
    text = "\n".join(lines)
    print(text)
    path = _write(Path(args.out), "flops.json", {"config": args.config, "rows": rows, "table": text})
    print(f"wrote {path}")
    return 0
