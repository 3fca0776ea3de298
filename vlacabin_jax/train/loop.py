"""The training loop: restore-or-init, data, jitted steps, logging, eval, checkpoints, rollback.

    train(cfg, workdir, stop=None) -> Summary

The step loop only takes a batch, runs the step and calls the actions of `periodic.py` (log with
evaluation, checkpoint saves, profile, goodput accounting) and the rollback; each keeps its own
state and clock.

Host/device contract: the loop dispatches steps asynchronously and touches device values only
(a) every `train.log_every` steps (one `device_get` of the window's metrics), (b) before a
checkpoint is written (the window's `finite` flags), (c) at evaluation. Everything else
(progress bar, checkpoint policy, data) is host-only.

Non-finite steps: the step itself refuses a non-finite update (see `step.py`); the loop sees the
flag at the next sync, restores the newest checkpoint taken before the offending batch (or the
initial state), deletes the checkpoints after it, marks the batch to be skipped and replays, at
most `train.max_rollbacks` times.

Workdir contract: `config.json` (resolved config), `checkpoints/` (Orbax), `metrics.jsonl` (one
row per logged step: `step`, `loss`, every loss term, `grad_norm`, `learning_rate`, timings;
at eval steps `eval/<term>` of the heldout losses and, with `train.eval_cabin_samples`, the cabin
metrics of sampled actions such as `eval/success_rate`), `events.jsonl` (resumes, rollbacks,
preemption, and the `Goodput` of the call at its end), `tb/` (TensorBoard), `profile/` (jax.profiler),
`sample_ids/p<i>.jsonl` (with `train.log_sample_ids`: the sample ids each process fed at each step).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from vlacabin_jax import sharding
from vlacabin_jax.config import ConfigError, config_to_json_dict, validate
from vlacabin_jax.data import pipeline
from vlacabin_jax.model.flops import model_flops_per_sample
from vlacabin_jax.sharding import MeshError
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train import init_from as init_lib
from vlacabin_jax.train import metrics as metrics_lib
from vlacabin_jax.train import periodic
from vlacabin_jax.train import state as state_lib
from vlacabin_jax.train import step as step_lib
from vlacabin_jax.train.periodic import Goodput

class TrainingError(RuntimeError):
    """Training cannot go on (non-finite losses beyond `train.max_rollbacks`)."""


class WorkdirError(ValueError):
    """The workdir cannot be used (a file, not writable)."""


class StopFlag:
    """Stops the loop gracefully (save, wait, return) at the next step boundary.

    `request(reason)` is what the SIGTERM/SIGINT handler calls; `at_step` stops once that step is
    reached (benchmarks and tests run part of a schedule without changing the config, so the
    compiled step is the same).
    """

    def __init__(self, at_step: int | None = None):
        self.requested = False
        self.reason = ""
        self.at_step = at_step

    def request(self, reason: str) -> None:
        self.requested, self.reason = True, reason

    def should_stop(self, step: int) -> bool:
        if self.at_step is not None and step >= self.at_step and not self.requested:
            self.request(f"at_step {self.at_step}")
        return self.requested


@dataclasses.dataclass
class Summary:
    """What a finished (or preempted) `train` call reports."""

    step: int
    first_loss: float | None
    last_loss: float | None
    eval: dict
    preempted: bool  # stopped before train.steps (signal or StopFlag.at_step), checkpoint saved
    stop_reason: str
    rollbacks: int
    restored_from: int | None
    compile_s: float
    step_time_s: float | None
    samples_per_s: float | None
    goodput: dict  # `Goodput.report()`: where this call's wall time went


def check_mesh(cfg: ml_collections.ConfigDict, mesh_shape: dict[str, int]) -> None:
    """The mesh must divide the global batch (and its microbatches) and every stack's heads."""
    batch_ways = mesh_shape["data"] * mesh_shape["fsdp"]
    b, accum = int(cfg.train.global_batch_size), int(cfg.train.grad_accum_steps)
    if b % (batch_ways * accum):
        raise MeshError(f"train.global_batch_size={b} must be a multiple of mesh data*fsdp={batch_ways} "
                        f"times train.grad_accum_steps={accum}; change the batch or the mesh")
    if b % jax.process_count():
        raise MeshError(f"train.global_batch_size={b} must be a multiple of the {jax.process_count()} processes")
    tensor, m = mesh_shape["tensor"], cfg.model
    stacks = {"model.encoder": m.encoder.heads, "model.bridge.connector": m.bridge.connector.heads,
              "model.dnfm": m.dnfm.heads, "model.explain": m.explain.heads, "model.vit": m.vit.heads,
              "model.lm": m.lm.heads}
    for name, heads in stacks.items():
        if heads % tensor:
            raise MeshError(f"mesh.tensor={tensor} does not divide {name}.heads={heads}; use a tensor size "
                            f"that divides the heads of every stack (or 1)")


def prepare_workdir(workdir: str | Path) -> Path:
    """Creates the workdir (and parents); fails clearly if it is a file or not writable."""
    path = Path(workdir).expanduser()
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"--workdir {path} exists and is not a directory; pass a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"--workdir {path} cannot be written ({e.strerror or e}); pass a writable "
                           f"directory") from None
    return path


def train(cfg: ml_collections.ConfigDict, workdir: str | Path, *, stop: StopFlag | None = None,
          handle_signals: bool = True) -> Summary:
    """Trains `cfg` in `workdir`, resuming from its newest complete checkpoint.

    Args:
      cfg: the full config (validated here).
      workdir: run directory (see module docstring); created if missing.
      stop: a flag to stop gracefully (save, wait, return); one is made and wired to SIGTERM and
        SIGINT when `handle_signals` and this is the main thread of a single-process run.
    Returns:
      Summary of the run. Raises ConfigError / MeshError / WorkdirError / CheckpointError for
      unusable inputs (before anything is written to the checkpoints) and TrainingError when
      non-finite losses persist.
    """
    goodput = Goodput()
    validate(cfg)
    if jax.process_count() > 1 and cfg.train.trainable == "all_and_anchor":
        # A resumed 2-process run of this layout (empty frozen tree) aborted in gloo with a
        # collective mismatch; refused until that is understood rather than crash mid-run.
        raise ConfigError("train.trainable = 'all_and_anchor' is not supported across processes yet; "
                          "use --config.train.trainable=all (frozen anchor) or one process")
    workdir = prepare_workdir(workdir)
    mesh = sharding.make_mesh(cfg.mesh)
    mesh_shape = dict(mesh.shape)
    check_mesh(cfg, mesh_shape)

    stop = stop or StopFlag()
    previous_handlers = {}
    if handle_signals and jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous_handlers[sig] = signal.signal(sig, lambda s, _f: stop.request(signal.Signals(s).name))
    try:
        return _run(cfg, workdir, mesh, mesh_shape, stop, goodput)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


@dataclasses.dataclass
class _Position:
    """Where training stands, and the bookkeeping every checkpoint carries (`metadata["loop"]`)."""

    state: Any
    step: int
    rollbacks: int = 0
    skipped: set[int] = dataclasses.field(default_factory=set)  # data batches a rollback skips

    def bookkeeping(self) -> dict:
        return {"rollbacks": self.rollbacks, "skipped_batches": sorted(self.skipped)}


def _poison(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NaN in every float input (test hook `train.inject_nan_batch`)."""
    return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in batch.items()}


class _Feed:
    """The training batches as global device arrays: skips the batches earlier rollbacks marked,
    logs sample ids (`train.log_sample_ids`), applies the NaN test hook; the time it takes is data
    wait (the window's and goodput's)."""

    def __init__(self, cfg: ml_collections.ConfigDict, it: Any, bshard: Any, workdir: Path,
                 window: periodic.Window, goodput: Goodput):
        self.it, self.bshard, self.window, self.goodput = it, bshard, window, goodput
        self.batch_size, self.nan_batch = int(cfg.train.global_batch_size), int(cfg.train.inject_nan_batch)
        self.ids_log = None
        if cfg.train.log_sample_ids:
            (workdir / "sample_ids").mkdir(exist_ok=True)
            self.ids_log = open(workdir / "sample_ids" / f"p{jax.process_index()}.jsonl", "a", buffering=1)

    def next(self, step: int, skipped: set[int]) -> tuple[int, Any] | None:
        """(data batch index, device batch) for step `step` + 1, or None for a skipped batch."""
        t0 = time.perf_counter()
        index = int(self.it.get_state()["next_batch"])
        batch = next(self.it)
        if index in skipped:
            return None
        if self.ids_log is not None:
            self.ids_log.write(json.dumps({"step": step + 1, "batch": index,
                                           "sample_id": np.asarray(batch["sample_id"]).tolist()}) + "\n")
        if index == self.nan_batch:
            batch = _poison(batch)
        device_batch = step_lib.device_batch(batch, self.bshard, self.batch_size)
        seconds = time.perf_counter() - t0
        self.window.data_s += seconds
        self.goodput.charge("data_wait_s", seconds)
        return index, device_batch

    def close(self) -> None:
        if self.ids_log is not None:
            self.ids_log.close()


def _fresh_state(cfg: ml_collections.ConfigDict, mesh: Any, shardings: Any) -> tuple[Any, str | None]:
    """The initial TrainState (with `train.init_from` or the anchor weights loaded) and, with
    `train.init_from`, the report of what it loaded, what is new and what was dropped."""
    state, _ = state_lib.create_train_state(cfg, mesh)
    if cfg.train.init_from:
        state, plan = init_lib.load(cfg.train.init_from, state, shardings)
        state = state_lib.reset_reference(state, shardings)  # align: the reference is the init
        return state, (f"init_from {cfg.train.init_from}: {len(plan.loaded)} params "
                       f"({plan.loaded_values / 1e6:.2f} M values) loaded\n{plan.summary()}")
    if cfg.model.anchor_weights:
        state = state_lib.load_anchor(state, shardings, cfg.model.anchor_weights)
    return state, None


class _Rollback:
    """After a non-finite loss: back to the newest checkpoint taken before the offending batch (or
    the initial state), the checkpoints after it deleted, that batch skipped from now on."""

    def __init__(self, cfg: ml_collections.ConfigDict, mesh: Any, shardings: Any, target: Any,
                 ckpt: ckpt_lib.Checkpointer, train_it: Any, initial_data: dict, writer: metrics_lib.MetricsWriter,
                 goodput: Goodput):
        self.cfg, self.mesh, self.shardings, self.target = cfg, mesh, shardings, target
        self.ckpt, self.train_it, self.initial_data = ckpt, train_it, initial_data
        self.writer, self.goodput = writer, goodput
        self.max = int(cfg.train.max_rollbacks)

    def __call__(self, pos: _Position, bad_step: int, bad_index: int, step_time: float | None) -> None:
        """Moves `pos` back; the discarded steps (x `step_time`) count as rollback time."""
        t0 = time.perf_counter()
        pos.rollbacks += 1
        if pos.rollbacks > self.max:
            raise TrainingError(f"non-finite loss at step {bad_step} (data batch {bad_index}) after "
                                f"{self.max} rollbacks already; lower optim.lr, tighten optim.clip_norm, "
                                f"or check the data")
        self.ckpt.wait()
        pos.skipped.add(bad_index)
        good = next((s for s in reversed(self.ckpt.steps())
                     if int(self.ckpt.data_state(s)["next_batch"]) <= bad_index), None)
        dropped = self.ckpt.delete_after(-1 if good is None else good)
        discarded_from = pos.step
        if good is None:
            pos.state, pos.step = _fresh_state(self.cfg, self.mesh, self.shardings)[0], 0
            self.train_it.set_state(self.initial_data)
        else:
            restored = self.ckpt.restore(good, self.target)
            pos.state, pos.step = restored.state, restored.step
            self.train_it.set_state(restored.data)
        self.writer.event(pos.step, f"non-finite loss at step {bad_step} (data batch {bad_index}): rolled back "
                                    f"to {'checkpoint ' + str(good) if good is not None else 'the initial state'}, "
                                    f"skipping that batch (rollback {pos.rollbacks}/{self.max})",
                          bad_step=bad_step, bad_batch=bad_index, restored=good, deleted=dropped)
        self.writer.reset_position(pos.step)
        self.goodput.charge("rollback_s", time.perf_counter() - t0 + (discarded_from - pos.step) * (step_time or 0.0))


def _startup_events(writer: metrics_lib.MetricsWriter, step: int, init_report: str | None,
                    ckpt: ckpt_lib.Checkpointer, restored: ckpt_lib.Restored | None, mesh_shape: dict) -> None:
    """What events.jsonl says before the first step: init_from, checkpoints set aside, the resume."""
    if init_report:
        writer.event(step, init_report)
    if ckpt.quarantined:
        writer.event(step, f"moved incomplete checkpoints {ckpt.quarantined} to checkpoints.incomplete/")
    for bad, reason in ckpt.damaged.items():
        writer.event(step, f"checkpoint {bad} is damaged ({reason}): moved to checkpoints.damaged/", damaged=bad)
    if restored is not None:
        writer.event(step, f"resumed from checkpoint {restored.step} (saved on mesh "
                           f"{restored.metadata.get('mesh')}, now {mesh_shape})")


def _stop_now(stop: StopFlag, ckpt: ckpt_lib.Checkpointer, step: int) -> bool:
    """A graceful stop before the next step: a signal, `StopFlag.at_step`, or (multi-host) Orbax's
    preemption notice, which all hosts see at the same step."""
    if jax.process_count() > 1 and ckpt.manager.reached_preemption(step):
        stop.request("preemption")
    return stop.should_stop(step)


def _run(cfg, workdir: Path, mesh, mesh_shape: dict, stop: StopFlag, goodput: Goodput) -> Summary:
    tr = cfg.train
    total, batch_size = int(tr.steps), int(tr.global_batch_size)
    abstract, shardings = state_lib.state_shardings(cfg, mesh)
    target = state_lib.abstract_with_shardings(abstract, shardings)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", cfg, mesh_shape=mesh_shape,
                                 data_hash=pipeline.dataset_hash(cfg))
    data_kw = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                   global_batch_size=batch_size, seed=int(tr.seed))
    train_it = pipeline.make_dataset(cfg, split="train", **data_kw)
    initial_data = train_it.get_state()  # before a resume moves the iterator (a rollback may go back)
    restored, init_report = ckpt.restore_latest(target), None
    if restored is not None:
        train_it.set_state(restored.data)
        saved = restored.metadata.get("loop", {})
        pos = _Position(restored.state, restored.step, int(saved.get("rollbacks", 0)),
                        set(int(i) for i in saved.get("skipped_batches", [])))
    else:
        state, init_report = _fresh_state(cfg, mesh, shardings)
        pos = _Position(state, 0)
    if jax.process_index() == 0:  # only once the checkpoint (if any) is known to fit this config
        (workdir / "config.json").write_text(json.dumps(config_to_json_dict(cfg), indent=2, sort_keys=True))
    writer = metrics_lib.MetricsWriter(workdir, total, pos.step)
    _startup_events(writer, pos.step, init_report, ckpt, restored, mesh_shape)

    train_step = step_lib.make_train_step(cfg, mesh, shardings)
    bshard = step_lib.batch_shardings(cfg, mesh)
    evaluate = (periodic.Evaluate(cfg, step_lib.make_eval_step(cfg, mesh, shardings),
                                  pipeline.make_dataset(cfg, split="heldout", **data_kw), bshard, goodput)
                if tr.eval_every > 0 else None)
    window = periodic.Window()
    feed = _Feed(cfg, train_it, bshard, workdir, window, goodput)
    profile = periodic.Profile(workdir / "profile", tr.profile_start, tr.profile_steps,
                               enabled=jax.process_index() == 0)
    log = periodic.Log(writer, window, batch_size=batch_size, flops=model_flops_per_sample(cfg),
                       devices=jax.devices(), evaluate=evaluate)
    save = periodic.Save(ckpt, window, goodput)
    rollback = _Rollback(cfg, mesh, shardings, target, ckpt, train_it, initial_data, writer, goodput)
    compile_s = None  # of the train step, compiled before the first step this call runs
    try:
        while pos.step < total and not _stop_now(stop, ckpt, pos.step):
            if compile_s is None:
                goodput.startup_s = time.perf_counter() - goodput.start
            fed = feed.next(pos.step, pos.skipped)
            if fed is None:  # a batch an earlier rollback skips
                continue
            index, batch = fed
            profile.before_step(pos.step)
            if compile_s is None:  # ahead of the first step, so that its time is not step time
                train_step, compile_s = periodic.compile_for(train_step, (pos.state, batch),
                                                             f"train-step-compiled-{pos.step}")
                window.excluded_s += compile_s
                goodput.charge("compile_s", compile_s)
            pos.state, metrics = train_step(pos.state, batch)
            pos.step += 1
            window.add(pos.step, index, metrics)
            writer.advance()
            profile.after_step(pos.step, pos.state)
            log_now = periodic.log_due(pos.step, int(tr.log_every), total)
            save_now = ckpt.should_save(pos.step)
            if not (log_now or save_now):
                continue
            bad = window.first_non_finite()  # the one sync of a window, before anything is kept
            if bad is not None:
                rollback(pos, *bad, step_time=log.rate[0])
                window.reset()
                continue
            if log_now:
                log(pos.step, pos.state, batch)
            if save_now:
                save(pos.step, pos.state, train_it.get_state(), pos.bookkeeping())
        preempted = pos.step < total  # the loop only ends early through a stop
        profile.stop()
        # Final (or preemption) checkpoint: check the last steps first, never save a refused update.
        bad = window.first_non_finite()
        if bad is not None:  # only when stopped mid-window: go back to the last good state
            rollback(pos, *bad, step_time=log.rate[0])
        saved = save(pos.step, pos.state, train_it.get_state(), pos.bookkeeping())  # False: saved already
        save.wait()
        if preempted:
            writer.event(pos.step, f"preempted ({stop.reason}): checkpoint at step {pos.step} on disk",
                         reason=stop.reason)
        elif saved:
            writer.event(pos.step, "final checkpoint saved", reason="end")
        text, spent = goodput.event()
        writer.event(pos.step, text, **spent)
    finally:
        ckpt.close()
        writer.close()
        feed.close()
        for it in (train_it, evaluate.heldout_it if evaluate is not None else None):
            if it is not None and hasattr(it, "close"):
                it.close()
    return Summary(step=pos.step, first_loss=log.first_loss, last_loss=log.last_loss, eval=log.last_eval,
                   preempted=preempted, stop_reason=stop.reason if preempted else "", rollbacks=pos.rollbacks,
                   restored_from=restored.step if restored is not None else None, compile_s=compile_s or 0.0,
                   step_time_s=log.rate[0], samples_per_s=log.rate[1], goodput=goodput.report())
