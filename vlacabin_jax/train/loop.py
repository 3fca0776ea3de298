"""The training loop: restore-or-init, data, jitted steps, logging, eval, checkpoints, rollback.

    train(cfg, workdir, stop=None) -> Summary

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

import jax
import ml_collections
import numpy as np

from vlacabin_jax import sharding
from vlacabin_jax.config import ConfigError, config_to_json_dict, validate
from vlacabin_jax.data import pipeline
from vlacabin_jax.eval import evaluate as cabin_eval
from vlacabin_jax.eval import report as cabin_report
from vlacabin_jax.model.flops import model_flops_per_sample
from vlacabin_jax.sharding import MeshError
from vlacabin_jax.train import barrier
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train import init_from as init_lib
from vlacabin_jax.train import metrics as metrics_lib
from vlacabin_jax.train import state as state_lib
from vlacabin_jax.train import step as step_lib

# Shown on the console at every log line.
CONSOLE_KEYS = ("loss", "endpoint_ce", "source_ce", "explanation_ce", "endpoint_action_acc", "grad_norm",
                "learning_rate", "step_time_s", "samples_per_s", "data_wait_fraction", "mfu",
                "eval/loss", "eval/endpoint_action_acc", "eval/success_rate", "eval/violation_rate",
                "dpo_loss", "dpo_margin", "dpo_accuracy", "eval/dpo_accuracy")


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

    def report(self) -> dict[str, float]:
        total = time.perf_counter() - self.start
        lost = (self.startup_s + self.compile_s + self.data_wait_s + self.checkpoint_s + self.eval_s
                + self.rollback_s)
        return {"total_s": total, "productive_s": max(total - lost, 0.0), "startup_s": self.startup_s,
                "compile_s": self.compile_s, "data_wait_s": self.data_wait_s, "checkpoint_s": self.checkpoint_s,
                "eval_s": self.eval_s, "rollback_s": self.rollback_s,
                "goodput": max(total - lost, 0.0) / max(total, 1e-9)}


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


def _poison(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """NaN in every float input (test hook `train.inject_nan_batch`)."""
    return {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in batch.items()}


class _Window:
    """Device metrics of the steps since the last log; fetched in one transfer."""

    def __init__(self):
        self.entries: list[tuple[int, int, dict]] = []  # (step after update, batch index, metrics)
        self.start = time.perf_counter()
        self.data_s = 0.0
        self.excluded_s = 0.0  # compilation and checkpoint saves inside the window (not step time)
        self.save_s = 0.0

    def reset(self) -> None:
        self.__init__()

    def first_non_finite(self) -> tuple[int, int] | None:
        """(step, batch index) of the first step whose update was refused; syncs on `finite` only."""
        if not self.entries:
            return None
        flags = _fetch([m["finite"] for _, _, m in self.entries])
        for (step, index, _), ok in zip(self.entries, flags):
            if not ok:
                return step, index
        return None


def _fetch(tree):
    """Device → host once the values are computed.

    Waiting first matters on the CPU backend with several simulated devices: a host copy
    requested while the step still runs can hold one of the threads the step's collectives
    need, and the step deadlocks.
    """
    return jax.device_get(jax.block_until_ready(tree))


def _mean_metrics(entries: list[dict]) -> dict[str, float]:
    host = _fetch(entries)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


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


def _run(cfg, workdir: Path, mesh, mesh_shape: dict, stop: StopFlag, goodput: Goodput) -> Summary:
    tr = cfg.train
    total, batch_size = int(tr.steps), int(tr.global_batch_size)
    abstract, shardings = state_lib.state_shardings(cfg, mesh)
    target = state_lib.abstract_with_shardings(abstract, shardings)
    data_hash = pipeline.dataset_hash(cfg)
    ckpt = ckpt_lib.Checkpointer(workdir / "checkpoints", cfg, mesh_shape=mesh_shape, data_hash=data_hash)
    data_kw = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                   global_batch_size=batch_size, seed=int(tr.seed))
    train_it = pipeline.make_dataset(cfg, split="train", **data_kw)
    initial_data_state = train_it.get_state()

    init_reports: list[str] = []  # what train.init_from loaded, new, dropped (events.jsonl)

    def fresh_state():
        state, _ = state_lib.create_train_state(cfg, mesh)
        if tr.init_from:
            state, plan = init_lib.load(tr.init_from, state, shardings)
            state = state_lib.reset_reference(state, shardings)  # align: the reference is the init
            init_reports.append(f"init_from {tr.init_from}: {len(plan.loaded)} params "
                                f"({plan.loaded_values / 1e6:.2f} M values) loaded\n{plan.summary()}")
        elif cfg.model.anchor_weights:
            state = state_lib.load_anchor(state, shardings, cfg.model.anchor_weights)
        return state

    restored = ckpt.restore_latest(target)
    loop_state = {"rollbacks": 0, "skipped_batches": []}
    if restored is not None:
        state = restored.state
        train_it.set_state(restored.data)
        loop_state.update(restored.metadata.get("loop", {}))
        step = restored.step
    else:
        state, step = fresh_state(), 0
    skipped = set(int(i) for i in loop_state["skipped_batches"])
    if jax.process_index() == 0:  # only once the checkpoint (if any) is known to fit this config
        (workdir / "config.json").write_text(json.dumps(config_to_json_dict(cfg), indent=2, sort_keys=True))

    writer = metrics_lib.MetricsWriter(workdir, total, step)
    for report in init_reports:
        writer.event(step, report)
    if ckpt.quarantined:
        writer.event(step, f"moved incomplete checkpoints {ckpt.quarantined} to checkpoints.incomplete/")
    for bad, reason in ckpt.damaged.items():
        writer.event(step, f"checkpoint {bad} is damaged ({reason}): moved to checkpoints.damaged/", damaged=bad)
    if restored is not None:
        writer.event(step, f"resumed from checkpoint {restored.step} (saved on mesh "
                           f"{restored.metadata.get('mesh')}, now {mesh_shape})")

    train_step = step_lib.make_train_step(cfg, mesh, shardings)
    eval_step = step_lib.make_eval_step(cfg, mesh, shardings) if tr.eval_every > 0 else None
    bshard = step_lib.batch_shardings(cfg, mesh)
    heldout_it = (pipeline.make_dataset(cfg, split="heldout", **data_kw) if eval_step else None)
    heldout_start = heldout_it.get_state() if heldout_it else None
    cabin_sets = _cabin_eval_sets(cfg) if eval_step else None
    flops = model_flops_per_sample(cfg)
    devices = jax.devices()

    ids_log = None
    if tr.log_sample_ids:
        (workdir / "sample_ids").mkdir(exist_ok=True)
        ids_log = open(workdir / "sample_ids" / f"p{jax.process_index()}.jsonl", "a", buffering=1)
    window = _Window()
    compile_s, compiled = 0.0, False
    first_loss = last_loss = None
    last_eval: dict = {}
    rate = (None, None)
    restored_from = restored.step if restored is not None else None
    profiling = False
    preempted = False

    def save(at: int, force: bool) -> bool:
        loop_state["skipped_batches"] = sorted(skipped)
        jax.block_until_ready(state)  # see `_fetch`: no host copy of values still being computed
        return ckpt.save(at, state, train_it.get_state(), dict(loop_state), force=force)

    def rollback(bad_step: int, bad_index: int):
        t_rollback = time.perf_counter()
        loop_state["rollbacks"] += 1
        if loop_state["rollbacks"] > int(tr.max_rollbacks):
            raise TrainingError(f"non-finite loss at step {bad_step} (data batch {bad_index}) after "
                                f"{tr.max_rollbacks} rollbacks already; lower optim.lr, tighten "
                                f"optim.clip_norm, or check the data")
        ckpt.wait()
        skipped.add(bad_index)
        good = None
        for s in reversed(ckpt.steps()):  # newest checkpoint taken before the bad batch
            if int(ckpt.data_state(s)["next_batch"]) <= bad_index:
                good = s
                break
        dropped = ckpt.delete_after(-1 if good is None else good)
        if good is None:
            new_state, new_step = fresh_state(), 0
            train_it.set_state(initial_data_state)
        else:
            r = ckpt.restore(good, target)
            new_state, new_step = r.state, r.step
            train_it.set_state(r.data)
        writer.event(new_step, f"non-finite loss at step {bad_step} (data batch {bad_index}): rolled back "
                               f"to {'checkpoint ' + str(good) if good is not None else 'the initial state'}, "
                               f"skipping that batch (rollback {loop_state['rollbacks']}/{tr.max_rollbacks})",
                     bad_step=bad_step, bad_batch=bad_index, restored=good, deleted=dropped)
        writer.reset_position(new_step)
        goodput.rollback_s += time.perf_counter() - t_rollback + (step - new_step) * (rate[0] or 0.0)
        return new_state, new_step

    try:
        while step < total:
            if jax.process_count() > 1 and ckpt.manager.reached_preemption(step):  # all hosts agree
                stop.request("preemption")
            if stop.should_stop(step):
                preempted = True
                break
            t0 = time.perf_counter()
            if not compiled:
                goodput.startup_s = t0 - goodput.start
            index = int(train_it.get_state()["next_batch"])
            batch = next(train_it)
            if index in skipped:
                continue
            if ids_log is not None:
                ids_log.write(json.dumps({"step": step + 1, "batch": index,
                                          "sample_id": np.asarray(batch["sample_id"]).tolist()}) + "\n")
            if index == int(tr.inject_nan_batch):
                batch = _poison(batch)
            device_batch = step_lib.device_batch(batch, bshard, batch_size)
            t1 = time.perf_counter()
            window.data_s += t1 - t0
            goodput.data_wait_s += t1 - t0

            if tr.profile_steps > 0 and step == int(tr.profile_start) and jax.process_index() == 0:
                jax.profiler.start_trace(str(workdir / "profile"))
                profiling = True
            if not compiled:  # compile before the first step, and start it on all processes together
                train_step = train_step.lower(state, device_batch).compile()
                barrier.wait_for_all_processes(f"train-step-compiled-{step}")
                compiled, compile_s = True, time.perf_counter() - t1
                window.excluded_s += compile_s
                goodput.compile_s = compile_s
                t1 = time.perf_counter()
            state, metrics = train_step(state, device_batch)
            step += 1
            window.entries.append((step, index, metrics))
            writer.advance()
            if profiling and step >= int(tr.profile_start) + int(tr.profile_steps):
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
                profiling = False

            # The first step of a fresh run is logged too: it is the loss at initialisation.
            log_now = step % int(tr.log_every) == 0 or step == total or step == 1
            save_now = ckpt.should_save(step)
            if not (log_now or save_now):
                continue
            bad = window.first_non_finite()
            if bad is not None:
                state, step = rollback(*bad)
                window.reset()
                continue
            if log_now:
                scalars, rate = _log_scalars(window, batch_size, flops, devices)
                if tr.eval_every > 0 and (step % int(tr.eval_every) == 0 or step == total):
                    t_eval = time.perf_counter()
                    if not isinstance(eval_step, jax.stages.Compiled):  # as for the train step
                        eval_step = eval_step.lower(state, device_batch).compile()
                        barrier.wait_for_all_processes(f"eval-step-compiled-{step}")
                    last_eval = _evaluate(eval_step, state, heldout_it, heldout_start, bshard, batch_size,
                                          int(tr.eval_batches))
                    if cabin_sets is not None:
                        last_eval.update(_evaluate_cabin(cfg, state, *cabin_sets))
                    scalars.update({f"eval/{k}": v for k, v in last_eval.items()})
                    scalars["eval_time_s"] = time.perf_counter() - t_eval
                    goodput.eval_s += scalars["eval_time_s"]
                first_loss = scalars["loss"] if first_loss is None else first_loss
                last_loss = scalars["loss"]
                writer.write(step, scalars, CONSOLE_KEYS)
                window.reset()
            if save_now:
                t_save = time.perf_counter()
                save(step, force=True)
                window.save_s += time.perf_counter() - t_save  # the loop's blocking part only
                window.excluded_s += time.perf_counter() - t_save
                goodput.checkpoint_s += time.perf_counter() - t_save
        if profiling:
            jax.profiler.stop_trace()
        # Final (or preemption) checkpoint: check the last steps first, never save a refused update.
        bad = window.first_non_finite()
        if bad is not None:  # only when stopped mid-window: go back to the last good state
            state, step = rollback(*bad)
        t_save = time.perf_counter()
        saved = save(step, force=True)  # False when the policy already saved this step
        ckpt.wait()
        goodput.checkpoint_s += time.perf_counter() - t_save
        if preempted:
            writer.event(step, f"preempted ({stop.reason}): checkpoint at step {step} on disk", reason=stop.reason)
        elif saved:
            writer.event(step, "final checkpoint saved", reason="end")
        spent = goodput.report()
        writer.event(step, f"goodput {spent['goodput']:.1%} of {spent['total_s']:.0f} s (startup "
                           f"{spent['startup_s']:.0f} s, compile {spent['compile_s']:.0f} s, data wait "
                           f"{spent['data_wait_s']:.0f} s, checkpoints {spent['checkpoint_s']:.1f} s, eval "
                           f"{spent['eval_s']:.0f} s, rollbacks {spent['rollback_s']:.1f} s)", **spent)
    finally:
        ckpt.close()
        writer.close()
        if ids_log is not None:
            ids_log.close()
        for it in (train_it, heldout_it):
            if it is not None and hasattr(it, "close"):
                it.close()
    return Summary(step=step, first_loss=first_loss, last_loss=last_loss, eval=last_eval, preempted=preempted,
                   stop_reason=stop.reason if preempted else "", rollbacks=int(loop_state["rollbacks"]),
                   restored_from=restored_from, compile_s=compile_s,
                   step_time_s=rate[0], samples_per_s=rate[1], goodput=goodput.report())


def _log_scalars(window: _Window, batch_size: int, flops: float,
                 devices: list) -> tuple[dict[str, float], tuple[float | None, float | None]]:
    """Mean metrics of the window (the one device→host sync) plus timings, MFU and memory."""
    scalars = _mean_metrics([m for _, _, m in window.entries])
    elapsed = time.perf_counter() - window.start
    n = len(window.entries)
    busy = max(elapsed - window.excluded_s, 1e-9)
    step_time = busy / n
    samples_per_s = batch_size * n / busy
    scalars.pop("finite", None)
    scalars.update(step_time_s=step_time, samples_per_s=samples_per_s,
                   data_wait_fraction=min(window.data_s / busy, 1.0))
    if window.excluded_s - window.save_s > 0:
        scalars["compile_s"] = window.excluded_s - window.save_s
    if window.save_s:
        scalars["checkpoint_blocked_s"] = window.save_s
    utilisation = metrics_lib.mfu(flops, samples_per_s, devices)
    if utilisation is not None:
        scalars["mfu"] = utilisation
    scalars.update(metrics_lib.memory_stats(jax.local_devices()))
    return scalars, (step_time, samples_per_s)


def _evaluate(eval_step, state, heldout_it, heldout_start: dict, bshard: dict, batch_size: int,
              num_batches: int) -> dict[str, float]:
    """Mean loss terms over the first `num_batches` heldout batches (the same ones every time)."""
    heldout_it.set_state(heldout_start)
    outs = []
    for _ in range(num_batches):
        outs.append(eval_step(state, step_lib.device_batch(next(heldout_it), bshard, batch_size)))
    host = _fetch(outs)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def _cabin_eval_sets(cfg: ml_collections.ConfigDict) -> tuple[list[dict], list[dict]] | None:
    """(heldout VLA turns, heldout video/speech-text pairs) of the periodic cabin evaluation, made
    once per run (the same samples at every evaluation), or None when it is off."""
    n = int(cfg.train.eval_cabin_samples)
    if n == 0:
        return None
    pairs = [s for kind in ("video_text", "speech_text")
             for s in cabin_eval.eval_samples(cfg, max(n // 4, 1), kind=kind)]
    return cabin_eval.eval_samples(cfg, n), pairs


def _evaluate_cabin(cfg: ml_collections.ConfigDict, state, samples: list[dict],
                    retrieval_samples: list[dict]) -> dict[str, float]:
    """The proposal's metrics (DESIGN §6) of the current params: sampled actions executed in the
    cabin simulator, explanation overlap, cross-modal retrieval; flat, without the "eval/" prefix."""
    results = cabin_eval.evaluate_model(state.trainable, state.frozen, cfg, samples,
                                        batch_size=min(32, len(samples)),
                                        retrieval_samples=retrieval_samples, num_failures=0)
    return cabin_report.scalars(results, prefix="")
