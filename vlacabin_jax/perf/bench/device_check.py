"""The device check: one prepared command that measures a config on one NVIDIA GPU in under 8 minutes.

    bash tools/device_check.sh [--config configs/vla_cabin.py:base] [--out runs/device_check]
    python -m vlacabin_jax.perf.bench.device_check --config configs/vla_cabin.py:base --out DIR \\
        [--global-batch 32] [--steps 5] [--budget 450] [--smoke]

Sections of `device_check.json` (and of the printed table):
  remat      the train step with model.remat none / dots / full (XLA attention): step time,
             samples/s, achieved model TFLOP/s, MFU (on a known accelerator)
  attention  cuDNN fused attention (model.attention_impl=cudnn) against XLA's, both without remat
             (the remat-none row is the XLA one)
  vs_torch   the JAX train step against the PyTorch mirror, eager and torch.compile, on the same
             batch (`tools.mesh_bench --vs-torch`: float32 both, no remat (the mirror has none);
             PyTorch on CUDA where JAX is on a GPU)
  inference  decision latency at batch 1: DNFM K = 1, 2, 4, 8 against the autoregressive head
             (`tools.mesh_bench --inference`; no remat: a forward pass has nothing to recompute)
  memory     per train row, the measured peak (the device's memory_stats peak_bytes_in_use; on CPU,
             which has none, the worker's peak RSS) against XLA's estimate for the same compiled step
             on the same device (memory_analysis: arguments + outputs + temporaries - aliased)

Every sub-measurement is its own worker subprocess (`worker.py`) with its own timeout, so a crash,
an out-of-memory or a hang loses that one only; the JSON is rewritten after each. `--budget`
bounds the whole run: a sub gets at most its share of it (each train run and the inference run
22 %, vs_torch 33 %) and never more than is left; one that no longer fits is "skipped: budget".
`--smoke` (the CPU plumbing check, run by hand: docs/performance.md): K = 1, 2 only, PyTorch eager only,
XLA's optimisations mostly off for compile speed (its figures check the plumbing, they are no
measurement).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Sequence

from vlacabin_jax.perf.bench.common import BenchError, fmt, load_config, publish, run_worker, write

SECTIONS = ("remat", "attention", "vs_torch", "inference", "memory")
REMATS = {"none": ["--config.model.remat=False"],
          "dots": ["--config.model.remat=True", "--config.model.remat_policy=dots"],
          "full": ["--config.model.remat=True", "--config.model.remat_policy=full"]}
ATTENTION_REMAT = "none"  # cuDNN vs XLA attention without recompute in the way
SHARE = {"train": 0.22, "inference": 0.22, "vs_torch": 0.33}  # of --budget, per sub-measurement
DEFAULT_BATCH = 32  # rows of the one-GPU step (the config's global batch is for many devices)
MIN_SUB_S = 10.0  # a sub with less time left than this is skipped
GIB = 2**30


def config_remat(cfg) -> str:
    return cfg.model.remat_policy if cfg.model.remat else "none"


def plan(cfg, smoke: bool) -> list[dict]:
    """The sub-measurements in the order they run (the config's own remat first): {name, task,
    overrides, share, env}."""
    own = config_remat(cfg)
    xla = ["--config.model.attention_impl=xla"]
    subs = [{"name": f"remat_{r}", "task": "train", "overrides": REMATS[r] + xla}
            for r in sorted(REMATS, key=lambda r: r != own)]
    subs.append({"name": "attention_cudnn", "task": "train",
                 "overrides": REMATS[ATTENTION_REMAT] + ["--config.model.attention_impl=cudnn"]})
    subs.append({"name": "inference", "task": "inference", "overrides": REMATS["none"],
                 "ks": "1,2" if smoke else "1,2,4,8"})
    # float32 both frameworks, as `--vs-torch` (the mirror's float path); JAX must not take the whole
    # GPU up front where PyTorch shares it.
    subs.append({"name": "vs_torch", "task": "vs_torch",
                 "overrides": REMATS["none"] + ["--config.model.dtype=float32", "--config.model.anchor_dtype=float32"],
                 "torch_modes": "eager" if smoke else "eager,compile",
                 "env": {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}})
    for s in subs:
        s["share"] = SHARE[s["task"]]
    return subs


@contextlib.contextmanager
def _environ(extra: dict[str, str]):
    """`extra` in os.environ while the workers start (they inherit the parent's environment)."""
    old = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def train_row(r: dict) -> dict:
    """The remat / attention figures of one train worker's result."""
    if "median_step_s" not in r:
        return {"error": r.get("error", "no result")}
    step = r["median_step_s"]
    return {"median_step_s": step, "samples_per_s": r["samples_per_s"], "mfu": r["mfu"],
            "achieved_tflops": r["model_flops_per_step"] / step / 1e12, "compile_s": r["compile_s"],
            "loss": r["loss"], "platform": r["platform"], "device_kind": r["device_kind"]}


def memory_row(r: dict) -> dict:
    """Measured peak against XLA's estimate of the compiled step (the estimate survives a run
    whose steps failed, through the worker's compiled record)."""
    est = (r.get("memory") or r.get("compiled", {}).get("memory") or {}).get("peak_bytes")
    peak_gib = (r.get("allocator") or {}).get("peak_memory_gib")
    if peak_gib is not None:
        measured, source = peak_gib * GIB, "device memory_stats peak_bytes_in_use"
    else:
        measured, source = r.get("host_peak_rss_bytes"), "worker peak RSS (the device reports no allocator stats)"
    if est is None and measured is None:
        return {"error": r.get("error", "no result")}
    return {"estimate_bytes": est, "measured_bytes": measured, "source": source,
            "measured_over_estimate": measured / est if est and measured else None,
            **({"error": r["error"]} if "error" in r else {})}


def sections(cfg, results: dict[str, dict]) -> dict:
    """device_check.json's sections from the sub-measurements' results so far."""
    own = f"remat_{ATTENTION_REMAT}"
    train = {n: r for n, r in results.items() if n.startswith(("remat_", "attention_"))}
    out = {"remat": {n.removeprefix("remat_"): train_row(r) for n, r in train.items() if n.startswith("remat_")},
           "memory": {n: memory_row(r) for n, r in train.items()}}
    if own in results or "attention_cudnn" in results:
        xla, cudnn = train_row(results.get(own, {})), train_row(results.get("attention_cudnn", {}))
        speedup = (xla["median_step_s"] / cudnn["median_step_s"]
                   if "median_step_s" in xla and "median_step_s" in cudnn else None)
        out["attention"] = {"remat": ATTENTION_REMAT, "xla": xla, "cudnn": cudnn, "xla_over_cudnn": speedup}
    for name in ("vs_torch", "inference"):
        if name in results:
            out[name] = results[name]
    return out


def table(cfg, payload: dict) -> str:
    s = payload["sections"]
    lines = [f"device check: {payload['config']} on {payload['device']}, global batch {payload['global_batch']}, "
             f"{payload['steps']} steps; {payload['elapsed_s']:.0f} s of the {payload['budget_s']:.0f} s budget"
             + (" (smoke: no measurement)" if payload["smoke"] else "")]
    lines.append(f"{'train':16} {'step ms':>9} {'samples/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9} "
                 f"{'peak GiB':>9} {'est GiB':>8} {'peak/est':>8}")
    rows = {f"remat {k}": v for k, v in s.get("remat", {}).items()}
    if "attention" in s:
        rows["attention cudnn"] = s["attention"]["cudnn"]
    mem = s.get("memory", {})
    for name, row in rows.items():
        m = mem.get(name.replace(" ", "_"), {})
        if "error" in row:
            lines.append(f"{name:16} FAILED: {row['error']}")
            continue
        lines.append(f"{name:16} {row['median_step_s'] * 1e3:9.1f} {row['samples_per_s']:10.1f} "
                     f"{row['achieved_tflops']:8.3f} {fmt(row['mfu'], '6.3f')} {row['compile_s']:9.1f} "
                     f"{fmt(m.get('measured_bytes') and m['measured_bytes'] / GIB, '9.2f')} "
                     f"{fmt(m.get('estimate_bytes') and m['estimate_bytes'] / GIB, '8.2f')} "
                     f"{fmt(m.get('measured_over_estimate'), '8.2f')}")
    if "attention" in s:
        lines.append(f"attention at remat {s['attention']['remat']}: XLA / cuDNN step time = "
                     f"{fmt(s['attention']['xla_over_cudnn'], '.3f')}")
    lines.append(f"peak: {next((m['source'] for m in mem.values() if 'source' in m), '-')}; est: XLA's "
                 f"memory_analysis of the compiled step")
    vt = s.get("vs_torch")
    if vt is not None:
        if "error" in vt:
            lines.append(f"vs_torch FAILED: {vt['error']}")
        else:
            parts = [f"{n} {vt[n]['median_step_s'] * 1e3:.1f} ms" if "median_step_s" in vt.get(n, {})
                     else f"{n}: {vt.get(n, {}).get('error', 'not run')}" for n in ("jax", "torch_eager", "torch_compile")]
            lines.append(f"vs_torch (float32, PyTorch on {vt.get('torch_device')}): " + ", ".join(parts))
    inf = s.get("inference")
    if inf is not None:
        if "error" in inf:
            lines.append(f"inference FAILED: {inf['error']}")
        else:
            lines.append("inference, batch 1, median ms: " + ", ".join(
                f"{n} {row['median_s'] * 1e3:.2f}" for n, row in inf["decisions"].items()))
    return "\n".join(lines)


def device_check(config: str, out: str | Path, global_batch: int = 0, steps: int = 5, budget_s: float = 450.0,
                 smoke: bool = False, overrides: Sequence[str] = (), cache_dir: str | None = None,
                 log=print) -> int:
    """Runs every sub-measurement of `plan` within `budget_s`, writes `out/device_check.json`
    after each and prints the table; exit code 0 when every section has a result, else 1."""
    cfg = load_config(config, overrides)
    if steps <= 0 or budget_s <= 0:
        raise BenchError(f"--steps {steps} and --budget {budget_s:g} must be positive")
    batch = global_batch or min(DEFAULT_BATCH, int(cfg.train.global_batch_size))
    out = Path(out)
    cache = cache_dir or os.environ.get("VLACABIN_JAX_CACHE") or str(out / "jax_cache")
    results: dict[str, dict] = {}
    timing: dict[str, dict] = {}
    payload = {"config": config, "overrides": list(overrides), "global_batch": batch, "steps": steps,
               "budget_s": budget_s, "smoke": smoke, "device": "-", "sub_measurements": timing}
    t0 = time.perf_counter()
    smoke_env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"} if smoke else {}
    for sub in plan(cfg, smoke):
        left = budget_s - (time.perf_counter() - t0)
        timeout = min(sub["share"] * budget_s, left)
        if timeout < MIN_SUB_S:
            results[sub["name"]] = {"error": f"skipped: budget ({left:.0f} s left of {budget_s:.0f})"}
            timing[sub["name"]] = {"timeout_s": 0.0, "wall_s": 0.0, "skipped": True}
            continue
        argv = ["--config", config, "--mesh", "1x1x1", "--steps", str(steps), "--task", sub["task"],
                "--global-batch", str(batch), *[f"--override={o}" for o in [*overrides, *sub["overrides"]]]]
        argv += ["--ks", sub["ks"]] if "ks" in sub else []
        argv += ["--torch-modes", sub["torch_modes"]] if "torch_modes" in sub else []
        log(f"{sub['name']}: up to {timeout:.0f} s ...")
        start = time.perf_counter()
        with _environ({**smoke_env, **sub.get("env", {})}):
            r = run_worker(argv, 1, cache, timeout, 0, sub["name"])
        results[sub["name"]] = r
        timing[sub["name"]] = {"timeout_s": timeout, "wall_s": time.perf_counter() - start}
        if r.get("platform"):
            payload["device"] = f"{r['platform']} {r.get('device_kind', '')}".strip()
        payload.update(sections=sections(cfg, results), elapsed_s=time.perf_counter() - t0)
        write(out, "device_check.json", payload)
    payload.update(sections=sections(cfg, results), elapsed_s=time.perf_counter() - t0)
    missing = [n for n in SECTIONS if n not in payload["sections"]]
    failed = [n for n, r in results.items() if "error" in r]
    payload["failed"] = failed
    publish(out, "device_check.json", payload, table(cfg, payload))
    return 1 if missing or len(failed) == len(results) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vlacabin_jax.perf.bench.device_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/vla_cabin.py:base", help="config file and variant")
    p.add_argument("--override", action="append", default=[], metavar="--config.a.b=VALUE")
    p.add_argument("--out", default="runs/device_check", help="directory for device_check.json")
    p.add_argument("--global-batch", type=int, default=0, help=f"rows per train step (default: the config's, "
                   f"at most {DEFAULT_BATCH})")
    p.add_argument("--steps", type=int, default=5, help="timed steps (train, vs_torch) and repeats (inference)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for all sub-measurements together")
    p.add_argument("--smoke", action="store_true", help="CPU plumbing check: K=1,2, PyTorch eager only")
    p.add_argument("--cache-dir", default=None, help="compilation cache (default $VLACABIN_JAX_CACHE or OUT/jax_cache)")
    args = p.parse_args(argv)
    try:
        return device_check(args.config, args.out, args.global_batch, args.steps, args.budget, args.smoke,
                            args.override, args.cache_dir)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
