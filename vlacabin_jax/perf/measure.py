"""Measure the trainer's jitted train step on one mesh, in this process.

    one_batch(cfg, global_batch)              -> a host batch from the synthetic world
    prepare_train_step(cfg, mesh, batch)      -> (run() -> seconds of one step, info)
    measure_train_step(cfg, mesh, steps, ...) -> {compile_s, step_times_s, memory, flops, collectives, ...}
    median(values)                            -> the median (None for no values)

The step is the trainer's own (`train.step.make_train_step`, state from `create_train_state`),
lowered and compiled ahead of time so that compilation is timed apart from the steps; every
step is timed to its `block_until_ready`, on the same batch (the input pipeline is measured by
`tools/data_bench`, not here).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlacabin_jax.data import pipeline
from vlacabin_jax.model.flops import model_flops_per_sample
from vlacabin_jax.perf import hlo
from vlacabin_jax.train import metrics as metrics_lib
from vlacabin_jax.train import state as state_lib
from vlacabin_jax.train import step as step_lib


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def one_batch(cfg: ml_collections.ConfigDict, global_batch: int) -> dict[str, np.ndarray]:
    """The first training batch of the synthetic world at `global_batch` rows (host arrays)."""
    it = pipeline.make_dataset(cfg, split="train", global_batch_size=global_batch, seed=0, source="synthetic",
                               num_workers=0)
    try:
        return next(it)
    finally:
        if hasattr(it, "close"):
            it.close()


def compiled_memory(compiled) -> dict[str, float]:
    """Per-device bytes from XLA's memory analysis of a compiled program: arguments, outputs,
    temporaries, and the peak estimate arguments + outputs + temporaries - donated aliases."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        m = None
    if m is None:
        return {}
    out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
           "temp_bytes": m.temp_size_in_bytes, "alias_bytes": m.alias_size_in_bytes,
           "code_bytes": m.generated_code_size_in_bytes}
    out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"] - out["alias_bytes"])
    return out


def compiled_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOPs of one execution per device (loop bodies counted once by XLA)."""
    try:
        ca = compiled.cost_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    return float(ca["flops"]) if ca and "flops" in ca else None


def prepare_train_step(cfg: ml_collections.ConfigDict, mesh: Mesh, batch: dict[str, np.ndarray] | None = None
                       ) -> tuple[Callable[[], float], dict]:
    """Create the state, compile the train step of `cfg` on `mesh`, and analyse the program.

    Returns:
      (run, info): `run()` applies one step (state donated and replaced) and returns its seconds
      to `block_until_ready`; info = {"compile_s": lower + compile, "compile_cache_hit": loaded
      from the persistent cache, "memory": `compiled_memory`, "hlo_flops", "collectives":
      [{kind, bytes, count, group_size, axes}], "last": {"loss"} after each run}.
    """
    global_batch = int(cfg.train.global_batch_size)
    host = one_batch(cfg, global_batch) if batch is None else batch
    state, shardings = state_lib.create_train_state(cfg, mesh)
    jax.block_until_ready(state)
    step = step_lib.make_train_step(cfg, mesh, shardings)
    device_batch = step_lib.device_batch(host, step_lib.batch_shardings(cfg, mesh), global_batch)

    hits = []
    listener = lambda event, **_: hits.append(event) if event.endswith("/cache_hits") else None  # noqa: E731
    jax.monitoring.register_event_listener(listener)
    try:
        t0 = time.perf_counter()
        compiled = step.lower(state, device_batch).compile()
        compile_s = time.perf_counter() - t0
    finally:
        jax.monitoring.unregister_event_listener(listener)
    mesh_shape = dict(mesh.shape)
    colls = [{"kind": c.kind, "bytes": c.bytes, "count": c.count, "group_size": c.group_size,
              "axes": list(hlo.group_axes(c.groups, mesh_shape))}
             for c in hlo.collectives(compiled.as_text()) if c.group_size != 1]
    info = {"compile_s": compile_s, "compile_cache_hit": bool(hits), "memory": compiled_memory(compiled),
            "hlo_flops": compiled_flops(compiled), "collectives": colls, "last": {}}
    holder = {"state": state}

    def run() -> float:
        t = time.perf_counter()
        holder["state"], metrics = compiled(holder["state"], device_batch)
        jax.block_until_ready((holder["state"], metrics))
        seconds = time.perf_counter() - t
        info["last"] = {"loss": float(jax.device_get(metrics["loss"]))}
        return seconds

    return run, info


def measure_train_step(cfg: ml_collections.ConfigDict, mesh: Mesh, steps: int, warmup: int = 1,
                       batch: dict[str, np.ndarray] | None = None,
                       on_compiled: Callable[[dict], None] | None = None) -> dict:
    """Compile and run the train step of `cfg` on `mesh`.

    Args:
      cfg: full config; its `train.global_batch_size` rows make one batch.
      steps: timed steps (after `warmup` untimed ones).
      batch: host batch [B, ...] (default: `one_batch`).
      on_compiled: called with the compile-time info (`prepare_train_step`'s, without "last")
        before the first step runs, so a caller keeps the program's analysis if the run dies.
    Returns:
      `prepare_train_step`'s info plus {"step_times_s": [steps], "median_step_s", "samples_per_s",
      "allocator": `metrics.memory_stats` (GiB; {} on CPU), "model_flops_per_step", "mfu" (on a
      known accelerator, else None), "platform", "device_kind", "loss"}.
    """
    run, info = prepare_train_step(cfg, mesh, batch)
    if on_compiled is not None:
        on_compiled({k: v for k, v in info.items() if k != "last"})
    for _ in range(warmup):
        run()
    times = [run() for _ in range(steps)]
    global_batch = int(cfg.train.global_batch_size)
    step_s = median(times)
    devices = list(mesh.devices.flat)
    flops = model_flops_per_sample(cfg)
    rate = global_batch / step_s if step_s else None
    info = dict(info)
    loss = info.pop("last").get("loss")
    return {**info, "step_times_s": times, "median_step_s": step_s, "samples_per_s": rate,
            "allocator": metrics_lib.memory_stats(devices), "model_flops_per_step": flops * global_batch,
            "mfu": metrics_lib.mfu(flops, rate, devices) if rate else None,
            "platform": devices[0].platform, "device_kind": getattr(devices[0], "device_kind", ""), "loss": loss}
