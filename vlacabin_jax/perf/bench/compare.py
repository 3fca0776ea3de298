"""The comparison modes of the benchmark, each a ratio taken in one run:

    vs_torch(config, runner, out)       JAX train step vs the PyTorch mirror, eager and torch.compile
    inference(config, runner, out)      DNFM K = 1, 2, 4, 8 vs an autoregressive head, latency at batch 1
    compile_cache(config, runner, out)  the train step's compile time in two processes on one fresh cache
    flops(config, out)                  XLA's FLOPs of the lowered step vs the analytic model FLOPs

Each prints a table, writes `<mode>.json` to `out` and returns the exit code.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from vlacabin_jax.perf.bench.common import Runner, check_mesh_fits, load_config, mesh_name, parse_mesh, publish


# ------------------------------------------------------------------------------------ JAX vs PyTorch


def vs_torch(config: str, runner: Runner, out: str | Path, mesh: str = "1x1x1") -> int:
    """Step time of the JAX trainer vs the PyTorch mirror (eager and torch.compile), one device."""
    overrides = list(runner.overrides)
    if not any("model.dtype" in o for o in overrides):
        # The CPU mirror computes in float32 (float16 is its GPU/TensorRT path): compare like with like.
        overrides += ["--config.model.dtype=float32", "--config.model.anchor_dtype=float32"]
    cfg = load_config(config, overrides)
    mesh_sizes = parse_mesh(mesh)
    check_mesh_fits(cfg, mesh_sizes, runner.cpu_devices)
    out = Path(out)
    r = runner.measure(config, mesh_sizes, runner.cache(out), task="vs_torch", overrides=overrides)
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
    lines.append(f"mesh {mesh}, global batch "
                 f"{r['global_batch']}, {r['dtype']}, the same batch; steps timed round-robin; JAX/this < 1 "
                 f"means JAX is faster. JAX: the trainer's step (all loss terms, AdamW, clipping); PyTorch "
                 f"{r.get('torch_version')}: the export mirror with the loss terms "
                 f"{', '.join(r.get('torch_eager', {}).get('terms', []))} (vlacabin_jax/perf/torch_train.py), "
                 f"AdamW, clipping; torch.compile compiles the loss and its backward, the optimizer stays eager. "
                 f"First step = compile (JAX: lower + compile).")
    text = "\n".join(lines)
    return publish(out, "vs_torch.json", r, text)


# ------------------------------------------------------------------------------------ inference


def inference(config: str, runner: Runner, out: str | Path) -> int:
    """DNFM K = 1, 2, 4, 8 against an autoregressive action head: latency per decision at batch 1."""
    cfg = load_config(config, runner.overrides)
    out = Path(out)
    r = runner.measure(config, (1, 1, 1), runner.cache(out), task="inference")
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
    return publish(out, "inference.json", r, text)


# ------------------------------------------------------------------------------------ compile cache


def compile_cache(config: str, runner: Runner, out: str | Path, mesh: str = "1x1x1") -> int:
    """Two fresh processes on one new persistent cache: the train step's compile time each time."""
    import tempfile

    cfg = load_config(config, runner.overrides)
    mesh = parse_mesh(mesh)
    check_mesh_fits(cfg, mesh, runner.cpu_devices)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = tempfile.mkdtemp(prefix="compile_cache-", dir=out)
    runs = [runner.measure(config, mesh, cache, steps=1) for _ in range(2)]
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
    return publish(out, "compile_cache.json", {"cache_dir": cache, "runs": runs}, text)


# ------------------------------------------------------------------------------------ FLOPs / MFU analysis


def flops(config: str, out: str | Path, overrides: Sequence[str] = (), global_batch: int = 0) -> int:
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
        cfg = load_config(config, overrides)
        cfg.model.remat, cfg.model.scan_layers = remat, False
        cfg.mesh.data = cfg.mesh.fsdp = cfg.mesh.tensor = 1
        if global_batch:
            cfg.train.global_batch_size = global_batch
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
    return publish(Path(out), "flops.json", {"config": config, "rows": rows}, text)
