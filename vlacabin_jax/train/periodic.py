"""What the train loop does between steps, one small action each, kept out of the step loop (the
way CLU's `periodic_actions` are): each holds its own state and clock, the loop only calls it.

    Goodput()                       where a `train` call's wall time goes; `charge(part, seconds)`
    Window()                        the device metrics of the steps since the last log
    Profile(directory, start, steps)  a jax.profiler trace of steps [start, start + steps)
    Evaluate(...)                   heldout losses (+ cabin metrics) of the current state, when due
    Log(...)                        the window's means (+ the evaluation) to metrics.jsonl/tb/console
    Save(ckpt, window, goodput)     checkpoint saves, their blocking time kept out of the step time
    log_due / eval_due              the schedules (pure)
    compile_for(fn, args, name)     a jitted step compiled ahead of its first call, on all processes

Host/device contract (see `loop.py`): `Window.first_non_finite`, `Log` and `Evaluate` are the only
actions that read device values; `Save` and `Profile` wait for the state; the rest is host-only.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np

from vlacabin_jax.eval import evaluate as cabin_eval
from vlacabin_jax.eval import report as cabin_report
from vlacabin_jax.train import barrier
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train import metrics as metrics_lib
from vlacabin_jax.train import step as step_lib

# Shown on the console at every log line.
CONSOLE_KEYS = ("loss", "endpoint_ce", "source_ce", "explanation_ce", "endpoint_action_acc", "grad_norm",
                "learning_rate", "step_time_s", "samples_per_s", "data_wait_fraction", "mfu",
                "eval/loss", "eval/endpoint_action_acc", "eval/success_rate", "eval/violation_rate",
                "dpo_loss", "dpo_margin", "dpo_accuracy", "eval/dpo_accuracy")


def fetch(tree: Any) -> Any:
    """Device → host once the values are computed.

    Waiting first matters on the CPU backend with several simulated devices: a host copy
    requested while the step still runs can hold one of the threads the step's collectives
    need, and the step deadlocks.
    """
    return jax.device_get(jax.block_until_ready(tree))


def mean_metrics(entries: Sequence[dict]) -> dict[str, float]:
    """Mean of each metric over `entries` (one device→host transfer)."""
    host = fetch(list(entries))
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def compile_for(fn: Any, args: tuple, name: str) -> tuple[jax.stages.Compiled, float]:
    """`fn` (a jitted step) compiled for `args`, then a barrier so that every process starts it
    together; and the seconds that took."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    barrier.wait_for_all_processes(name)
    return compiled, time.perf_counter() - t0


def log_due(step: int, every: int, total: int) -> bool:
    """Log every `every` steps, at the end, and at step 1 (the loss at initialisation)."""
    return step % every == 0 or step == total or step == 1


def eval_due(step: int, every: int, total: int) -> bool:
    """Evaluate every `every` steps (0: never) and at the end."""
    return every > 0 and (step % every == 0 or step == total)


# ------------------------------------------------------------------------------------ accounting
@dataclasses.dataclass
class Goodput:
    """Where a `train` call's wall time goes; productive = the rest (steps whose updates stand).

    startup: config to the first step (mesh, state init or restore, data); compile: the first
    step; data_wait: taking batches and building the global arrays; checkpoint: the loop's
    blocking part of saves (the final one included); eval: periodic evaluation; rollback:
    restoring after a non-finite loss plus the discarded steps (their count x the step time).
    """

    start: float = dataclasses.field(default_factory=time.perf_counter)
    startup_s: float = 0.0
    compile_s: float = 0.0
    data_wait_s: float = 0.0
    checkpoint_s: float = 0.0
    eval_s: float = 0.0
    rollback_s: float = 0.0

    PARTS = ("startup_s", "compile_s", "data_wait_s", "checkpoint_s", "eval_s", "rollback_s")

    def charge(self, part: str, seconds: float) -> None:
        """Adds `seconds` to `part` (one of `PARTS`)."""
        if part not in self.PARTS:
            raise KeyError(f"unknown goodput part {part!r}; one of {self.PARTS}")
        setattr(self, part, getattr(self, part) + seconds)

    def report(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        lost = sum(getattr(self, p) for p in self.PARTS)
        return {"total_s": total, "productive_s": max(total - lost, 0.0), "startup_s": self.startup_s,
                "compile_s": self.compile_s, "data_wait_s": self.data_wait_s, "checkpoint_s": self.checkpoint_s,
                "eval_s": self.eval_s, "rollback_s": self.rollback_s,
                "goodput": max(total - lost, 0.0) / max(total, 1e-9)}

    def event(self) -> tuple[str, dict[str, float]]:
        """The events.jsonl line of the call's end (text, fields)."""
        s = self.report()
        return (f"goodput {s['goodput']:.1%} of {s['total_s']:.0f} s (startup {s['startup_s']:.0f} s, compile "
                f"{s['compile_s']:.0f} s, data wait {s['data_wait_s']:.0f} s, checkpoints {s['checkpoint_s']:.1f} s, "
                f"eval {s['eval_s']:.0f} s, rollbacks {s['rollback_s']:.1f} s)", s)


class Window:
    """Device metrics of the steps since the last log, fetched in one transfer, and the host time
    spent in them that is not step time."""

    def __init__(self):
        self.entries: list[tuple[int, int, dict]] = []  # (step after update, batch index, metrics)
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.excluded_s = 0.0  # compilation and checkpoint saves inside the window (not step time)
        self.save_s = 0.0

    def reset(self) -> None:
        self.__init__()

    def add(self, step: int, index: int, metrics: dict) -> None:
        self.entries.append((step, index, metrics))

    def first_non_finite(self) -> tuple[int, int] | None:
        """(step, batch index) of the first step whose update was refused; syncs on `finite` only."""
        if not self.entries:
            return None
        flags = fetch([m["finite"] for _, _, m in self.entries])
        for (step, index, _), ok in zip(self.entries, flags):
            if not ok:
                return step, index
        return None

    def scalars(self, batch_size: int, flops: float, devices: Sequence) -> tuple[dict[str, float], tuple[float, float]]:
        """Mean metrics (the one device→host sync) plus timings, MFU and memory; and
        (step time, samples/s) of the window."""
        scalars = mean_metrics([m for _, _, m in self.entries])
        elapsed = time.perf_counter() - self.start
        n = len(self.entries)
        busy = max(elapsed - self.excluded_s, 1e-9)
        step_time = busy / n
        samples_per_s = batch_size * n / busy
        scalars.pop("finite", None)
        scalars.update(step_time_s=step_time, samples_per_s=samples_per_s,
                       data_wait_fraction=min(self.data_s / busy, 1.0))
        if self.excluded_s - self.save_s > 0:
            scalars["compile_s"] = self.excluded_s - self.save_s
        if self.save_s:
            scalars["checkpoint_blocked_s"] = self.save_s
        utilisation = metrics_lib.mfu(flops, samples_per_s, devices)
        if utilisation is not None:
            scalars["mfu"] = utilisation
        scalars.update(metrics_lib.memory_stats(jax.local_devices()))
        return scalars, (step_time, samples_per_s)


# --------------------------------------------------------------------------------------- actions
class Profile:
    """A jax.profiler trace of steps [start, start + steps) into `directory` (process 0 only)."""

    def __init__(self, directory: str | Path, start: int, steps: int, enabled: bool = True):
        self.directory, self.start, self.steps = str(directory), int(start), int(steps)
        self.enabled = enabled and self.steps > 0
        self.active = False

    def before_step(self, step: int) -> None:
        """Starts the trace before step `start` + 1 runs (`step` is the state's step)."""
        if self.enabled and step == self.start and not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after_step(self, step: int, state: Any) -> None:
        """Stops the trace once `steps` steps ran (waiting for them, so that they are in it)."""
        if self.active and step >= self.start + self.steps:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


class Evaluate:
    """Mean heldout loss terms over the first `num_batches` heldout batches (the same ones every
    time) and, with `train.eval_cabin_samples`, the cabin metrics of sampled actions; the eval
    step is compiled at its first call (on all processes together, as the train step)."""

    def __init__(self, cfg: ml_collections.ConfigDict, eval_step: Callable, heldout_it: Any, bshard: Any,
                 goodput: Goodput):
        self.cfg, self.eval_step, self.heldout_it = cfg, eval_step, heldout_it
        self.bshard, self.goodput = bshard, goodput
        self.heldout_start = heldout_it.get_state()
        self.batch_size, self.num_batches = int(cfg.train.global_batch_size), int(cfg.train.eval_batches)
        self.cabin_sets = cabin_eval_sets(cfg)

    def due(self, step: int) -> bool:
        return eval_due(step, int(self.cfg.train.eval_every), int(self.cfg.train.steps))

    def __call__(self, step: int, state: Any, example_batch: Any) -> tuple[dict[str, float], float]:
        """(metrics without the "eval/" prefix, seconds it took); `example_batch` gives the compile
        its shapes."""
        t0 = time.perf_counter()
        if not isinstance(self.eval_step, jax.stages.Compiled):
            self.eval_step, _ = compile_for(self.eval_step, (state, example_batch), f"eval-step-compiled-{step}")
        self.heldout_it.set_state(self.heldout_start)
        outs = [self.eval_step(state, step_lib.device_batch(next(self.heldout_it), self.bshard, self.batch_size))
                for _ in range(self.num_batches)]
        results = mean_metrics(outs)
        if self.cabin_sets is not None:
            results.update(evaluate_cabin(self.cfg, state, *self.cabin_sets))
        seconds = time.perf_counter() - t0
        self.goodput.charge("eval_s", seconds)
        return results, seconds


class Log:
    """Writes the window's mean metrics (and the evaluation when due) as one row, then starts a new
    window; remembers what the run's `Summary` reports (first/last loss, last eval, step rate)."""

    def __init__(self, writer: metrics_lib.MetricsWriter, window: Window, *, batch_size: int, flops: float,
                 devices: Sequence, evaluate: Evaluate | None = None, console_keys: Sequence[str] = CONSOLE_KEYS):
        self.writer, self.window, self.evaluate = writer, window, evaluate
        self.batch_size, self.flops, self.devices, self.console_keys = batch_size, flops, devices, console_keys
        self.first_loss: float | None = None
        self.last_loss: float | None = None
        self.last_eval: dict[str, float] = {}
        self.rate: tuple[float | None, float | None] = (None, None)  # (step time, samples/s) of the last row

    def __call__(self, step: int, state: Any, example_batch: Any) -> dict[str, float]:
        scalars, self.rate = self.window.scalars(self.batch_size, self.flops, self.devices)
        if self.evaluate is not None and self.evaluate.due(step):
            self.last_eval, seconds = self.evaluate(step, state, example_batch)
            scalars.update({f"eval/{k}": v for k, v in self.last_eval.items()})
            scalars["eval_time_s"] = seconds
        self.first_loss = scalars["loss"] if self.first_loss is None else self.first_loss
        self.last_loss = scalars["loss"]
        self.writer.write(step, scalars, self.console_keys)
        self.window.reset()
        return scalars


class Save:
    """Checkpoint saves; the loop's blocking part is charged to the window (not step time) and to
    goodput. `wait()` (the end of a call) is charged to goodput too."""

    def __init__(self, ckpt: ckpt_lib.Checkpointer, window: Window, goodput: Goodput):
        self.ckpt, self.window, self.goodput = ckpt, window, goodput

    def __call__(self, step: int, state: Any, data_state: dict, bookkeeping: dict, force: bool = True) -> bool:
        """Starts saving `state` at `step` (see `Checkpointer.save`); False if that step is saved already."""
        t0 = time.perf_counter()
        jax.block_until_ready(state)  # see `fetch`: no host copy of values still being computed
        started = self.ckpt.save(step, state, data_state, bookkeeping, force=force)
        seconds = time.perf_counter() - t0
        self.window.save_s += seconds
        self.window.excluded_s += seconds
        self.goodput.charge("checkpoint_s", seconds)
        return started

    def wait(self) -> None:
        """Until the pending save is on disk."""
        t0 = time.perf_counter()
        self.ckpt.wait()
        self.goodput.charge("checkpoint_s", time.perf_counter() - t0)


# ------------------------------------------------------------------------------ cabin evaluation
def cabin_eval_sets(cfg: ml_collections.ConfigDict) -> tuple[list[dict], list[dict]] | None:
    """(heldout VLA turns, heldout video/speech-text pairs) of the periodic cabin evaluation, made
    once per run (the same samples at every evaluation), or None when it is off."""
    n = int(cfg.train.eval_cabin_samples)
    if n == 0:
        return None
    pairs = [s for kind in ("video_text", "speech_text")
             for s in cabin_eval.eval_samples(cfg, max(n // 4, 1), kind=kind)]
    return cabin_eval.eval_samples(cfg, n), pairs


def evaluate_cabin(cfg: ml_collections.ConfigDict, state: Any, samples: list[dict],
                   retrieval_samples: list[dict]) -> dict[str, float]:
    """The proposal's metrics (DESIGN §6) of the current params: sampled actions executed in the
    cabin simulator, explanation overlap, cross-modal retrieval; flat, without the "eval/" prefix."""
    results = cabin_eval.evaluate_model(state.trainable, state.frozen, cfg, samples,
                                        batch_size=min(32, len(samples)),
                                        retrieval_samples=retrieval_samples, num_failures=0)
    return cabin_report.scalars(results, prefix="")
