"""Train-step performance across meshes, its projection to a GPU cluster, and the comparisons of
DESIGN.md §8. Every comparison is a ratio taken in one run.

    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --meshes 8x1x1,4x2x1,2x2x2,1x8x1 \\
        --steps 5 --out runs/mesh_bench/tiny                  # sweep (+ a 1-device baseline)
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --devices 1,2,4,8 --out DIR
                                                              # strong and weak scaling over data
    python -m tools.mesh_bench --project --configs tiny,small,a100x128 --out DIR
                                                              # 16 nodes x 8 A100, 200/400 Gb/s IB
    python -m tools.mesh_bench --project --configs a100x128 --aot-dir DIR --out DIR2
                                    # ... beside it, the same projection from a GPU AOT compile's HLO
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --vs-torch --out DIR
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --inference --out DIR
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --compile-cache --out DIR
    python -m tools.mesh_bench --config configs/vla_cabin.py:base --flops    # MFU analysis, no run
    python -m tools.mesh_bench --aot a100:16x1x8 --config configs/vla_cabin.py:a100x128 --out DIR
                                # compiled for absent GPUs / TPU slices: memory, collectives
    python -m tools.mesh_bench --aot a100:16x1x8 --config configs/vla_cabin.py:a100x128 --search --out DIR
                                # the fastest mesh x remat x microbatch that fits (train step only)

Each mesh runs in its own subprocess (a fresh backend with exactly its device count; on CPU
`--xla_force_host_platform_device_count`), retried `--retries` times when it fails (XLA:CPU's
collectives can deadlock on a few cores and abort); a mesh that keeps failing is a failed row.
Output: a console table, and `results.json` plus a PNG plot per mode in `--out`.
Compiled programs go to the persistent cache (`--cache-dir`, default $VLACABIN_JAX_CACHE or
`<out>/jax_cache`), so a rerun loads them; the table marks compile times that were cache hits.
The engine is `vlacabin_jax.perf.bench` (one function per mode); this file parses and dispatches.
"""

from __future__ import annotations

import argparse
import sys

from vlacabin_jax.perf import bench
from vlacabin_jax.perf.bench import worker


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.mesh_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/vla_cabin.py:tiny", help="config file and variant")
    p.add_argument("--override", action="append", default=[], metavar="--config.a.b=VALUE",
                   help="config overrides (repeatable)")
    p.add_argument("--meshes", default=None, help="DATAxFSDPxTENSOR list (sweep default: "
                   f"{bench.DEFAULT_MESHES}; --aot default: the config's mesh)")
    p.add_argument("--devices", default=None, help="device counts for strong and weak scaling over data")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mesh (after one warm-up)")
    p.add_argument("--out", default="runs/mesh_bench", help="directory for results.json and plots")
    p.add_argument("--cache-dir", default=None, help="compilation cache ('none': off)")
    p.add_argument("--retries", type=int, default=3, help="extra attempts for a failing mesh")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per worker attempt")
    p.add_argument("--collective-timeout", type=int, default=10, help="XLA:CPU aborts a collective stuck this "
                   "many seconds (then the mesh is retried)")
    p.add_argument("--cpu-devices", type=int, default=8, help="devices a worker may use: simulated CPU devices "
                   "(default 8); on a GPU host, the GPU count")
    p.add_argument("--no-baseline", action="store_true", help="sweep without the 1-device run")
    p.add_argument("--project", action="store_true", help="project to the A100 cluster")
    p.add_argument("--configs", default="tiny,small,a100x128", help="variants to project (--project)")
    p.add_argument("--sweeps", default=None, help="sweep --out directories whose measured collectives "
                   "the projection uses (else the analytic minimum)")
    p.add_argument("--aot-dir", default=None, metavar="DIR[,DIR]", help="--project: --aot output directories "
                   "(aot.json) of the same config for 128 devices (a100:16x1x8, cpu:128); each layout compiled there "
                   "gets a row from that HLO's collectives beside the XLA:CPU sweep / analytic one")
    p.add_argument("--mfu-assumed", type=float, default=0.4, help="assumed MFU of the projected compute "
                   "(--project: A100; --search: the target's GPU)")
    p.add_argument("--vs-torch", action="store_true", help="JAX against PyTorch eager and torch.compile")
    p.add_argument("--inference", action="store_true", help="DNFM K=1,2,4,8 against autoregressive decoding")
    p.add_argument("--compile-cache", action="store_true", help="first vs second start compile times")
    p.add_argument("--flops", action="store_true", help="HLO FLOPs vs analytic, remat on/off (no run)")
    p.add_argument("--aot", default=None, metavar="TARGET[,TARGET]", help="compile for absent accelerators: "
                   "a100:SLICESxHOSTSxGPUS, h100:..., tpu:v5p-N, tpu:v5e-N, tpu:v4-N, cpu:N (XLA:CPU) "
                   "(no run; --meshes "
                   "default: the config's mesh)")
    p.add_argument("--programs", default="init,train_step,infer", help="programs --aot compiles")
    p.add_argument("--save-hlo", action="store_true", help="--aot: keep each program's optimized HLO in OUT/hlo")
    p.add_argument("--search", action="store_true", help="--aot (one GPU target): search meshes (--meshes, default: "
                   "generated), remat none/dots/full and microbatches (--search-accum) for the fastest projected "
                   "train step that fits with --headroom; writes search.json, search.png")
    p.add_argument("--search-accum", default="1,2,4", help="--search: gradient-accumulation steps to try (the "
                   "global batch stays the config's; microbatch = global / (data*fsdp) / accum)")
    p.add_argument("--headroom", type=float, default=0.1, help="--search: fraction of the usable memory a "
                   "candidate must leave free (default 0.1)")
    p.add_argument("--max-compiles", type=int, default=14, help="--search: most train-step compiles (default 14)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default="train", help=argparse.SUPPRESS)
    p.add_argument("--mesh", default="1x1x1", help="mesh of --vs-torch and --compile-cache (default 1x1x1)")
    p.add_argument("--global-batch", type=int, default=0, help="global batch instead of the config's (--flops)")
    return p


def run(args: argparse.Namespace) -> int:
    """The mode the flags name, run by `vlacabin_jax.perf.bench`; its exit code."""
    if args.worker:  # the measuring subprocess, also reachable as `python -m vlacabin_jax.perf.bench.worker`
        return worker.work(args.config, args.override, args.mesh, args.steps, args.task, args.global_batch)
    if args.aot and args.search:
        return bench.search(args.aot, args.config, args.out, args.override, args.meshes, args.headroom,
                            args.max_compiles, args.search_accum, args.mfu_assumed)
    if args.search:
        raise bench.BenchError("--search needs --aot TARGET (a GPU target, e.g. a100:16x1x8)")
    if args.aot:
        return bench.aot(args.aot, args.config, args.out, args.override, args.meshes, args.programs, args.save_hlo)
    if args.steps <= 0:
        raise bench.BenchError(f"--steps {args.steps}: must be at least 1")
    runner = bench.Runner(overrides=tuple(args.override), steps=args.steps, cache_dir=args.cache_dir,
                          retries=args.retries, timeout=args.timeout, collective_timeout=args.collective_timeout,
                          cpu_devices=args.cpu_devices)
    if args.project:
        return bench.project(args.config, args.configs, args.out, args.override, args.sweeps, args.mfu_assumed,
                             aot_dirs=args.aot_dir)
    if args.vs_torch:
        return bench.vs_torch(args.config, runner, args.out, args.mesh)
    if args.inference:
        return bench.inference(args.config, runner, args.out)
    if args.compile_cache:
        return bench.compile_cache(args.config, runner, args.out, args.mesh)
    if args.flops:
        return bench.flops(args.config, args.out, args.override, args.global_batch)
    if args.devices:
        return bench.scaling(args.config, args.devices, runner, args.out)
    return bench.sweep(args.config, args.meshes or bench.DEFAULT_MESHES, runner, args.out,
                       baseline=not args.no_baseline)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except bench.BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
