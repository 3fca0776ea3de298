"""Train-step performance across meshes, its projection to a GPU cluster, and the comparisons of
DESIGN.md §8. Every comparison is a ratio taken in one run.

    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --meshes 8x1x1,4x2x1,2x2x2,1x8x1 \\
        --steps 5 --out runs/mesh_bench/tiny                  # sweep (+ a 1-device baseline)
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --devices 1,2,4,8 --out DIR
                                                              # strong and weak scaling over data
    python -m tools.mesh_bench --project --configs tiny,small,a100x128 --out DIR
                                                              # 16 nodes x 8 A100, 200/400 Gb/s IB
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --vs-torch --out DIR
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --inference --out DIR
    python -m tools.mesh_bench --config configs/vla_cabin.py:tiny --compile-cache --out DIR
    python -m tools.mesh_bench --config configs/vla_cabin.py:base --flops    # MFU analysis, no run
    python -m tools.mesh_bench --aot a100:16x1x8 --config configs/vla_cabin.py:a100x128 --out DIR
                                # compiled for absent GPUs / TPU slices: memory, collectives (mesh_bench_aot)

Each mesh runs in its own subprocess (a fresh backend with exactly its device count; on CPU
`--xla_force_host_platform_device_count`), retried `--retries` times when it fails (XLA:CPU's
collectives can deadlock on a few cores and abort); a mesh that keeps failing is a failed row.
Output: a console table, and `results.json` plus a PNG plot per mode in `--out`.
Compiled programs go to the persistent cache (`--cache-dir`, default $VLACABIN_JAX_CACHE or
`<out>/jax_cache`), so a rerun loads them; the table marks compile times that were cache hits.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "MESH_BENCH_RESULT "
DEFAULT_MESHES = "8x1x1,4x2x1,2x2x2,1x8x1"
# A train worker prints its compiled program's analysis (memory, collectives, compile time) before
# running it: a mesh whose steps deadlock still reports what XLA compiled for it.
COMPILED_PREFIX = "MESH_BENCH_COMPILED "


def cpu_flags(terminate_s: int = 10) -> tuple[str, ...]:
    """XLA:CPU gives up on a stuck collective after `terminate_s` (the process aborts and the
    mesh is retried) instead of hanging; raise it when single steps are slow (a loaded host)."""
    return (f"--xla_cpu_collective_call_terminate_timeout_seconds={terminate_s}",
            f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={max(terminate_s // 2, 1)}")


CPU_FLAGS = cpu_flags()


class BenchError(ValueError):
    """Unusable command-line input (one line, exit code 2)."""


# ------------------------------------------------------------------------------------ parsing


def parse_mesh(text: str) -> tuple[int, int, int]:
    """"4x2x1" → (data, fsdp, tensor)."""
    parts = text.strip().lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise BenchError(f"mesh {text!r} is not DATAxFSDPxTENSOR with positive sizes; write e.g. 4x2x1")
    return tuple(int(p) for p in parts)


def parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BenchError(f"{what} {text!r} must be a comma-separated list of integers, e.g. 1,2,4,8") from None
    if not values or min(values) <= 0:
        raise BenchError(f"{what} {text!r} must list positive integers, e.g. 1,2,4,8")
    return values


def mesh_name(mesh: tuple[int, int, int]) -> str:
    return "x".join(str(s) for s in mesh)


def load_config(spec: str, overrides: list[str]):
    """`path.py:variant` with `--config.a.b=value` overrides, validated; BenchError otherwise."""
    from vlacabin_jax.config import ConfigError, load_config as _load

    try:
        return _load(spec, overrides)
    except ConfigError as e:
        raise BenchError(f"--config {spec}: {str(e).removeprefix('--config: ')}") from None


def check_mesh_fits(cfg, mesh: tuple[int, int, int], available: int | None) -> None:
    """The mesh must fit the devices there are and divide the batch and the heads."""
    from vlacabin_jax.sharding import MeshError
    from vlacabin_jax.train.loop import check_mesh

    n = mesh[0] * mesh[1] * mesh[2]
    if available is not None and n > available:
        raise BenchError(f"mesh {mesh_name(mesh)} needs {n} devices but {available} are available; use "
                         f"meshes whose sizes multiply to at most {available} (or simulate more CPU devices "
                         f"with --cpu-devices)")
    try:
        check_mesh(cfg, dict(zip(("data", "fsdp", "tensor"), mesh)))
    except MeshError as e:
        raise BenchError(f"mesh {mesh_name(mesh)}: {e}") from None


# ------------------------------------------------------------------------------------ subprocess workers


def worker_env(devices: int, cache_dir: str, collective_timeout_s: int = 10) -> dict[str, str]:
    """Environment of a worker: `devices` simulated CPU devices (ignored by GPU backends), the
    stuck-collective timeouts of XLA:CPU, and the compilation cache."""
    from vlacabin_jax.xla_cpu import with_cpu_flags

    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_collective_call")]
    env["XLA_FLAGS"] = " ".join([with_cpu_flags(" ".join(flags), devices), *cpu_flags(collective_timeout_s)])
    env["MESH_BENCH_CACHE"] = cache_dir
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    return env


def run_worker(argv: list[str], devices: int, cache_dir: str, timeout: float, retries: int,
               label: str, collective_timeout_s: int = 10) -> dict:
    """Runs `python -m tools.mesh_bench --worker ...` until it reports, at most 1 + `retries` times.

    Returns the worker's result dict, or {"error": last line of its stderr, "attempts": n} plus
    "compiled": the compile-time analysis of the last attempt that got that far (if any did).
    """
    cmd = [sys.executable, "-m", "tools.mesh_bench", "--worker", *argv]
    error, compiled = "", {}
    for attempt in range(1, retries + 2):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=worker_env(devices, cache_dir, collective_timeout_s),
                                  capture_output=True, text=True,
                                  timeout=timeout, cwd=str(Path(__file__).resolve().parent.parent))
        except subprocess.TimeoutExpired as e:
            compiled = _compiled_info(e.stdout) or compiled
            error = f"timed out after {timeout:.0f} s"
            print(f"  {label}: attempt {attempt} {error}", file=sys.stderr, flush=True)
            continue
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                result["attempts"] = attempt
                result["wall_s"] = time.perf_counter() - t0
                return result
        compiled = _compiled_info(proc.stdout) or compiled
        error = _failure_line(proc.stderr, proc.returncode)
        print(f"  {label}: attempt {attempt} failed (exit {proc.returncode}): {error}", file=sys.stderr, flush=True)
        if proc.returncode == 2:  # unusable input (BenchError): the same again would fail the same way
            return {"error": error, "attempts": attempt}
    return {"error": error, "attempts": retries + 1, **({"compiled": compiled} if compiled else {})}


def _compiled_info(stdout: str | bytes | None) -> dict:
    """The COMPILED_PREFIX record in a worker's (possibly partial) stdout, else {}."""
    if isinstance(stdout, bytes):  # TimeoutExpired carries bytes even under text=True
        stdout = stdout.decode(errors="replace")
    for line in (stdout or "").splitlines():
        if line.startswith(COMPILED_PREFIX):
            return json.loads(line[len(COMPILED_PREFIX):])
    return {}


def _failure_line(stderr: str, returncode: int) -> str:
    """The informative line of a failed worker's stderr: an `error:` line, XLA's fatal log line
    (`F1130 ... Termination timeout ...`), an exception, else the last line that is not a stack frame."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for pattern in (r"^error: ", r"^F\d{4} ", r"(Error|Exception|timeout|Timeout)\b"):
        hits = [ln for ln in lines if re.search(pattern, ln)]
        if hits:
            return _shorten(hits[-1])
    plain = [ln for ln in lines if not ln.startswith(("@", "*", "PC:", "W0", "I0"))]
    return _shorten(plain[-1] if plain else f"exit code {returncode}")


def _shorten(line: str, limit: int = 300) -> str:
    """Both ends of a long line: XLA's say what timed out first and who did not arrive last."""
    return line if len(line) <= limit else f"{line[:limit // 2]} ... {line[-(limit // 2 - 5):]}"


def worker_main(args: argparse.Namespace) -> int:
    """One measurement in this process; prints RESULT_PREFIX + JSON on stdout."""
    import jax

    cache = os.environ.get("MESH_BENCH_CACHE", "")
    if cache and cache.lower() != "none":
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    from tools import mesh_bench_modes

    if len(jax.devices()) < math.prod(parse_mesh(args.mesh)):
        raise BenchError(f"mesh {args.mesh} needs {math.prod(parse_mesh(args.mesh))} devices but this host has "
                         f"{len(jax.devices())} {jax.devices()[0].platform} devices; pass --cpu-devices with the "
                         f"real device count so such meshes are refused up front")
    result = mesh_bench_modes.run_worker_task(args)
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.mesh_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/vla_cabin.py:tiny", help="config file and variant")
    p.add_argument("--override", action="append", default=[], metavar="--config.a.b=VALUE",
                   help="config overrides (repeatable)")
    p.add_argument("--meshes", default=None, help="DATAxFSDPxTENSOR list (sweep default: "
                   f"{DEFAULT_MESHES}; --aot default: the config's mesh)")
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
    p.add_argument("--mfu-assumed", type=float, default=0.4, help="A100 MFU of the projection's compute")
    p.add_argument("--vs-torch", action="store_true", help="JAX against PyTorch eager and torch.compile")
    p.add_argument("--inference", action="store_true", help="DNFM K=1,2,4,8 against autoregressive decoding")
    p.add_argument("--compile-cache", action="store_true", help="first vs second start compile times")
    p.add_argument("--flops", action="store_true", help="HLO FLOPs vs analytic, remat on/off (no run)")
    from tools import mesh_bench_aot  # here, not at the top: it imports this module

    mesh_bench_aot.add_arguments(p)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--task", default="train", help=argparse.SUPPRESS)
    p.add_argument("--mesh", default="1x1x1", help="mesh of --vs-torch and --compile-cache (default 1x1x1)")
    p.add_argument("--global-batch", type=int, default=0, help="global batch instead of the config's (--flops)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.worker:
            return worker_main(args)
        if args.aot:
            from tools import mesh_bench_aot

            return mesh_bench_aot.run(args)
        args.meshes = args.meshes or DEFAULT_MESHES
        if args.steps <= 0:
            raise BenchError(f"--steps {args.steps}: must be at least 1")
        from tools import mesh_bench_modes

        return mesh_bench_modes.run(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    # Run the `tools.mesh_bench` module, not this `__main__` copy: the modes import that one, and
    # its BenchError is the class they raise.
    from tools.mesh_bench import main as _main

    sys.exit(_main())
