"""The measuring side of the benchmark: one task on this process's devices, its result printed as
one `MESH_BENCH_RESULT <json>` line (see `common.run_worker`, which starts it).

    python -m vlacabin_jax.perf.bench.worker --config PATH:VARIANT --mesh 2x2x2 --steps 5 \\
        [--task train|vs_torch|inference] [--override=--config.a.b=V ...] [--global-batch B]
        [--ks 1,2,4,8] [--torch-modes eager,compile]

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
KS = (1, 2, 4, 8)  # DNFM sampler steps the inference task times
TORCH_MODES = ("eager", "compile")  # PyTorch steps the vs_torch task runs


def work(config: str, overrides: Sequence[str], mesh: str, steps: int, task: str = "train",
         global_batch: int = 0, ks: Sequence[int] = KS, torch_modes: Sequence[str] = TORCH_MODES) -> int:
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
    result = run_task(config, overrides, mesh, steps, task, global_batch, ks, torch_modes)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def run_task(config: str, overrides: Sequence[str], mesh: str, steps: int, task: str = "train",
             global_batch: int = 0, ks: Sequence[int] = KS, torch_modes: Sequence[str] = TORCH_MODES) -> dict:
    """The JSON-able result of `task` on this process's devices (mesh `mesh`): `ks` are the DNFM
    steps `inference` times, `torch_modes` the PyTorch steps `vs_torch` runs ("eager", "compile")."""
    import jax

    cfg = load_config(config, overrides)
    mesh_sizes = parse_mesh(mesh)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = mesh_sizes
    if global_batch:
        cfg.train.global_batch_size = global_batch
    devices = jax.devices()[:math.prod(mesh_sizes)]
    if cfg.model.attention_impl == "cudnn" and devices[0].platform != "gpu":
        raise BenchError(f"model.attention_impl=cudnn needs an NVIDIA GPU; this host's JAX platform is "
                         f"{devices[0].platform}")
    from vlacabin_jax import sharding

    jax_mesh = sharding.make_mesh(cfg.mesh, devices)
    if task == "train":
        from vlacabin_jax.perf import measure

        def report_compiled(info: dict) -> None:
            print(COMPILED_PREFIX + json.dumps(info), flush=True)

        result = measure.measure_train_step(cfg, jax_mesh, steps, on_compiled=report_compiled)
        return {**result, "host_peak_rss_bytes": _peak_rss_bytes()}
    if task == "vs_torch":
        return _vs_torch(cfg, jax_mesh, steps, torch_modes)
    if task == "inference":
        return _inference(cfg, steps, tuple(ks))
    raise BenchError(f"unknown worker task {task!r}")


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports KiB): the host-side figure where the
    device has no allocator statistics (CPU)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _vs_torch(cfg, mesh, steps: int, torch_modes: Sequence[str] = TORCH_MODES) -> dict:
    """The JAX train step and the PyTorch mirror's (eager, torch.compile) on one batch, timed
    round-robin (one step of each in turn) so that the machine's load touches all alike. On a
    GPU host PyTorch runs on CUDA (TF32 matmuls, like XLA's default for float32), else on CPU."""
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
    device = "cuda" if mesh.devices.flat[0].platform == "gpu" and torch.cuda.is_available() else "cpu"
    for name, compiled in (("torch_eager", False), ("torch_compile", True)):
        if name.removeprefix("torch_") not in torch_modes:
            continue
        if compiled and device == "cpu" and not shutil.which(os.environ.get("CXX", "g++")):
            out[name] = {"error": "torch.compile (inductor) on CPU needs a C++ compiler; none found (g++)"}
            continue
        try:
            run, info = torch_train.prepare_torch_step(config, inputs, compiled, device=device)
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
    out["torch_device"] = device
    out["global_batch"] = int(cfg.train.global_batch_size)
    out["dtype"] = cfg.model.dtype
    return out


def _inference(cfg, steps: int, ks: tuple[int, ...] = KS) -> dict:
    """Decision latency at batch 1: DNFM K = 1, 2, 4, 8 and the autoregressive head."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from vlacabin_jax.model import functional
    from vlacabin_jax.perf import autoregressive, measure
    from vlacabin_jax.train.step import HOST_ONLY_FIELDS

    params, frozen = nn.unbox(functional.init_params(cfg, jax.random.key(0)))
    batch = {k: jnp.asarray(v) for k, v in measure.one_batch(cfg, 1).items() if k not in HOST_ONLY_FIELDS}
    result = autoregressive.time_decisions(cfg, params, frozen, batch, steps=ks, repeats=steps)
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
    p.add_argument("--ks", default=",".join(map(str, KS)), help="inference: DNFM steps K to time")
    p.add_argument("--torch-modes", default=",".join(TORCH_MODES), help="vs_torch: eager and/or compile")
    args = p.parse_args(argv)
    try:
        ks = tuple(int(k) for k in args.ks.split(",") if k.strip())
        modes = tuple(m.strip() for m in args.torch_modes.split(",") if m.strip())
        return work(args.config, args.override, args.mesh, args.steps, args.task, args.global_batch, ks, modes)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
