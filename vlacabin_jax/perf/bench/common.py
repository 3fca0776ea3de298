"""What the benchmark modes share: input errors and parsing, the worker subprocesses that measure
one mesh each, and the output files.

    parse_mesh("4x2x1") -> (4, 2, 1); parse_ints, mesh_name, load_config, check_mesh_fits
    Runner(...).measure(config, mesh)  -> one worker's result dict (or {"error": ...})
    run_worker(argv, devices, ...)     -> the same, for a ready-made worker argv
    publish(out, name, payload, table) -> prints the table, writes `out/name`; exit code 0

Each measurement runs in its own subprocess (`python -m vlacabin_jax.perf.bench.worker`): a fresh
backend with exactly its device count (on CPU `--xla_force_host_platform_device_count`), retried
when it fails (XLA:CPU's collectives can deadlock on a few cores and abort).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

RESULT_PREFIX = "MESH_BENCH_RESULT "
# A train worker prints its compiled program's analysis (memory, collectives, compile time) before
# running it: a mesh whose steps deadlock still reports what XLA compiled for it.
COMPILED_PREFIX = "MESH_BENCH_COMPILED "
WORKER_MODULE = "vlacabin_jax.perf.bench.worker"
AXES = ("data", "fsdp", "tensor")
KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
MB = 1e6
_ROOT = Path(__file__).resolve().parents[3]  # the repository (on the workers' PYTHONPATH)


def cpu_flags(terminate_s: int = 10) -> tuple[str, ...]:
    """XLA:CPU gives up on a stuck collective after `terminate_s` (the process aborts and the
    mesh is retried) instead of hanging; raise it when single steps are slow (a loaded host)."""
    return (f"--xla_cpu_collective_call_terminate_timeout_seconds={terminate_s}",
            f"--xla_cpu_collective_call_warn_stuck_timeout_seconds={max(terminate_s // 2, 1)}")


CPU_FLAGS = cpu_flags()


class BenchError(ValueError):
    """Unusable input (one line, exit code 2)."""


# ------------------------------------------------------------------------------------ parsing


def parse_mesh(text: str) -> tuple[int, int, int]:
    """"4x2x1" → (data, fsdp, tensor)."""
    parts = text.strip().lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise BenchError(f"mesh {text!r} is not DATAxFSDPxTENSOR with positive sizes; write e.g. 4x2x1")
    return tuple(int(p) for p in parts)


def parse_meshes(text: str) -> list[tuple[int, int, int]]:
    """"8x1x1,4x2x1" → [(8, 1, 1), (4, 2, 1)]."""
    return [parse_mesh(m) for m in text.split(",") if m.strip()]


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


def load_config(spec: str, overrides: Sequence[str]):
    """`path.py:variant` with `--config.a.b=value` overrides, validated; BenchError otherwise."""
    from vlacabin_jax.config import ConfigError, load_config as _load

    try:
        return _load(spec, list(overrides))
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
        check_mesh(cfg, dict(zip(AXES, mesh)))
    except MeshError as e:
        raise BenchError(f"mesh {mesh_name(mesh)}: {e}") from None


# ------------------------------------------------------------------------------------ worker subprocesses


def worker_env(devices: int, cache_dir: str, collective_timeout_s: int = 10) -> dict[str, str]:
    """Environment of a worker: `devices` simulated CPU devices (ignored by GPU backends), the
    stuck-collective timeouts of XLA:CPU, and the compilation cache."""
    from vlacabin_jax.xla_cpu import with_cpu_flags

    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_cpu_collective_call")]
    env["XLA_FLAGS"] = " ".join([with_cpu_flags(" ".join(flags), devices), *cpu_flags(collective_timeout_s)])
    env["MESH_BENCH_CACHE"] = cache_dir
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH", "")]))
    return env


def run_worker(argv: list[str], devices: int, cache_dir: str, timeout: float, retries: int,
               label: str, collective_timeout_s: int = 10) -> dict:
    """Runs `python -m vlacabin_jax.perf.bench.worker ARGV` until it reports, at most 1 + `retries` times.

    Returns the worker's result dict, or {"error": last line of its stderr, "attempts": n} plus
    "compiled": the compile-time analysis of the last attempt that got that far (if any did).
    """
    cmd = [sys.executable, "-m", WORKER_MODULE, *argv]
    error, compiled = "", {}
    for attempt in range(1, retries + 2):
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=worker_env(devices, cache_dir, collective_timeout_s),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            compiled = compiled_info(e.stdout) or compiled
            error = f"timed out after {timeout:.0f} s"
            print(f"  {label}: attempt {attempt} {error}", file=sys.stderr, flush=True)
            continue
        for line in proc.stdout.splitlines():
            if line.startswith(RESULT_PREFIX):
                result = json.loads(line[len(RESULT_PREFIX):])
                result["attempts"] = attempt
                result["wall_s"] = time.perf_counter() - t0
                return result
        compiled = compiled_info(proc.stdout) or compiled
        error = failure_line(proc.stderr, proc.returncode)
        print(f"  {label}: attempt {attempt} failed (exit {proc.returncode}): {error}", file=sys.stderr, flush=True)
        if proc.returncode == 2:  # unusable input (BenchError): the same again would fail the same way
            return {"error": error, "attempts": attempt}
    return {"error": error, "attempts": retries + 1, **({"compiled": compiled} if compiled else {})}


def compiled_info(stdout: str | bytes | None) -> dict:
    """The COMPILED_PREFIX record in a worker's (possibly partial) stdout, else {}."""
    if isinstance(stdout, bytes):  # TimeoutExpired carries bytes even under text=True
        stdout = stdout.decode(errors="replace")
    for line in (stdout or "").splitlines():
        if line.startswith(COMPILED_PREFIX):
            return json.loads(line[len(COMPILED_PREFIX):])
    return {}


def failure_line(stderr: str, returncode: int) -> str:
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


@dataclasses.dataclass(frozen=True)
class Runner:
    """How the measuring modes run their workers: the config overrides, timed steps per worker,
    the compilation cache (None: $VLACABIN_JAX_CACHE or `<out>/jax_cache`; 'none': off), retries
    and timeouts, and how many devices a worker may use (None: no check)."""

    overrides: tuple[str, ...] = ()
    steps: int = 5
    cache_dir: str | None = None
    retries: int = 3
    timeout: float = 1800.0
    collective_timeout: int = 10
    cpu_devices: int | None = 8

    def cache(self, out: Path) -> str:
        return self.cache_dir or os.environ.get("VLACABIN_JAX_CACHE") or str(Path(out) / "jax_cache")

    def measure(self, config: str, mesh: tuple[int, int, int], cache: str, global_batch: int = 0,
                task: str = "train", overrides: Sequence[str] | None = None, steps: int | None = None) -> dict:
        """One worker subprocess on exactly the mesh's device count (see `run_worker`)."""
        argv = ["--config", config, "--mesh", mesh_name(mesh), "--steps", str(steps or self.steps), "--task", task]
        argv += [f"--override={o}" for o in (self.overrides if overrides is None else overrides)]
        if global_batch:
            argv += ["--global-batch", str(global_batch)]
        label = f"{config.rsplit(':', 1)[-1]} {mesh_name(mesh)}" + (f" B={global_batch}" if global_batch else "")
        print(f"measuring {label} ...", flush=True)
        return run_worker(argv, math.prod(mesh), cache, self.timeout, self.retries, label, self.collective_timeout)


# ------------------------------------------------------------------------------------ results and output


def compiled_view(row: dict) -> dict | None:
    """A sweep row as far as it got: the row itself if its steps ran; if it compiled but its
    steps failed, the compiled program's analysis (memory, compile time, collectives) under the
    row's mesh and analytic bytes, with no step figures; None if it never compiled."""
    if "error" not in row:
        return row
    if not row.get("compiled"):
        return None
    return {**row["compiled"], "mesh": row["mesh"], "analytic_bytes": row.get("analytic_bytes", {})}


def collective_bytes(result: dict) -> dict[str, float]:
    """Bytes per device per step by collective kind, from a worker's `collectives`."""
    out = {k: 0.0 for k in KINDS}
    for c in result.get("collectives", []):
        out[c["kind"]] += c["bytes"] * c["count"]
    return out


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def publish(out: Path, name: str, payload: dict, table: str) -> int:
    """Prints a mode's table, writes `payload` plus the table to `out/name`; exit code 0."""
    print(table)
    print(f"wrote {write(out, name, {**payload, 'table': table})}")
    return 0


def write(out: Path, name: str, payload: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path
