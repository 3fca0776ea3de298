"""The benchmark engine behind `python -m tools.mesh_bench` (DESIGN.md §8, docs/performance.md):
one entry function per mode, each printing its table, writing its files to `out` and returning
the exit code (0, or 1 when its one measurement failed); unusable input raises `BenchError`.

    sweep(config, meshes, runner, out)      meshes.py   step time, memory, collectives per mesh
    scaling(config, devices, runner, out)   meshes.py   strong and weak scaling over data
    project(config, configs, out, ...)      cluster.py  16 nodes x 8 A100 at 200/400 Gb/s IB
    vs_torch(config, runner, out)           compare.py  JAX vs the PyTorch mirror
    inference(config, runner, out)          compare.py  DNFM K = 1..8 vs autoregressive latency
    compile_cache(config, runner, out)      compare.py  first vs second start compile time
    flops(config, out, ...)                 compare.py  HLO FLOPs vs analytic, remat on/off
    aot(targets, config, out, ...)          deviceless.py  compiled for absent GPUs / TPU slices
    search(target, config, out, ...)        layouts.py  the fastest mesh x remat x microbatch that fits

`common.py` holds what they share (parsing, `Runner`: the worker subprocesses, output files);
`worker.py` is the measuring subprocess (`python -m vlacabin_jax.perf.bench.worker`).
"""

from vlacabin_jax.perf.bench.cluster import project
from vlacabin_jax.perf.bench.common import BenchError, Runner
from vlacabin_jax.perf.bench.compare import compile_cache, flops, inference, vs_torch
from vlacabin_jax.perf.bench.deviceless import aot
from vlacabin_jax.perf.bench.meshes import DEFAULT_MESHES, scaling, sweep
from vlacabin_jax.perf.bench.layouts import search

__all__ = ["BenchError", "DEFAULT_MESHES", "Runner", "aot", "compile_cache", "flops", "inference", "project",
           "scaling", "search", "sweep", "vs_torch"]
