"""The measuring side of the benchmark: one task on this process's devices, its result printed as
one `MESH_BENCH_RESULT <json>` line (see `common.run_worker`, which starts it).

    python -m vlacabin_jax.perf.bench.worker --config PATH:VARIANT --mesh 2x2x2 --steps 5 \\
        [--task train|vs_torch|inference] [--override=--config.a.b=V ...] [--global-batch B]

Exit code 2 with one `error:` line for unusable input (the parent then does not retry).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Sequence

from vlacabin_jax.perf.bench.common import COMPILED_PREFIX, RESULT_PREFIX, BenchError, load_config, parse_mesh

TASKS = ("train", "vs_torch", "inference")


def work(config: str, overrides: Sequence[str], mesh: str, steps: int, task: str = "train",
         global_batch: int = 0) -> int:
    """Runs `task` on mesh `mesh` of this process's devices and prints RESULT_PREFIX + JSON; exit code 0."""
    import jax

    cache = os.environ.get("MESH_BENCH_CACHE", "")
    if cache and cache.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if len(jax.devices()) < math.prod(parse_mesh(mesh)):
        raise BenchError(f"mesh {mesh} needs {math.prod(parse_mesh(mesh))} devices but this host has "
                         f"{len(jax.devices())} {jax.devices()[0].platform} devices; pass --cpu-devices with the "
                         f"real device count so such meshes are refused up front")
    result = run_task(config, overrides, mesh, steps, task, global_batch)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run_task(config: str, overrides: Sequence[str], mesh: str, steps: int, task: str = "train",
             global_batch: int = 0) -> dict:
    """The JSON-able result of `task` on this process's devices (mesh `mesh`)."""
    import jax

    cfg = load_config(config, overrides)
    mesh_sizes = parse_mesh(mesh)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_sizes
    if global_batch:
        cfg.train.global_batch_size = global_batch
    devices = jax.devices()[:math.prod(mesh_sizes)]
    from vlacabin_jax import sharding

    jax_mesh = sharding.make_mesh(cfg.mesh, devices)
    if task == "train":
        from vlacabin_jax.perf import measure

        def report_compiled(info: dict) -> None:
            print(COMPILED_PREFIX + json.dumps(info), flush=True)

        return measure.measure_train_step(cfg, jax_mesh, steps, on_compiled=report_compiled)
    if task == "vs_torch":
        return _vs_torch(cfg, jax_mesh, steps)
    if task == "inference":
        return _inference(cfg, steps)
    raise BenchError(f"unknown worker task {task!r}")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _vs_torch(cfg, mesh, steps: int) -> dict:
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


def _inference(cfg, steps: int) -> dict:
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlacabin_jax.perf.bench.worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--override", action="append", default=[])
    p.add_argument("--mesh", default="1x1x1")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--task", default="train", help=", ".join(TASKS))
    p.add_argument("--global-batch", type=int, default=0)
    args = p.parse_args(argv)
    try:
        return work(args.config, args.override, args.mesh, args.steps, args.task, args.global_batch)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
