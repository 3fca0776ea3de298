"""Orbax checkpoints of a run: `<workdir>/checkpoints/<step>/{state,data,config,metadata}`.

    Checkpointer(directory, cfg, mesh_shape=..., data_hash=...)
      .should_save(step)                      -> Orbax's decision (time / every_steps / preemption)
      .save(step, state, data_state, loop, force=False) -> bool (asynchronous unless configured off)
      .restore_latest(target)                 -> Restored | None (newest complete checkpoint)
      .restore(step, target)                  -> Restored
      .data_state(step)                       -> the iterator state saved with `step`
      .delete_after(step)                     -> drop checkpoints newer than `step` (rollback)
      .wait() / .close()
    read_metadata(directory, step=None)      -> the metadata JSON of a checkpoint (for export/eval)
    restore_params(directory, target)         -> (trainable, frozen) of a checkpoint dir (stage init)

Items (Orbax `Composite`): `state` — the TrainState in Orbax's standard PyTree format (readable
with `ocp.StandardCheckpointer`; restored onto the *current* mesh through the target's shardings,
whatever mesh it was saved from); `data` — the grain iterator
state (JSON; it is process-independent, so it restores onto any process count); `config` — the
resolved config (JSON); `metadata` — model SemVer, DataHash, code revision, mesh, action
vocabulary, rollback bookkeeping (JSON). Nothing is pickled.

When: Orbax's `ContinuousCheckpointingPolicy(minimum_interval_secs=60·interval_minutes)` (which
also saves the first step of a fresh run), `FixedIntervalPolicy(every_steps)` when set, Orbax's
preemption policy (multi-host), and forced saves (SIGTERM, end of training). The last `keep` are
kept. A step directory without Orbax's commit markers (a save killed midway) is moved to
`<directory>.incomplete/` at start-up and never restored.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as sdp

import vlacabin_jax
from vlacabin_jax.config import config_to_json_dict
from vlacabin_jax.data import actions

ITEMS = ("state", "data", "config", "metadata")
FORMAT = "vlacabin.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run (other model shapes, other data)."""


@dataclasses.dataclass
class Restored:
    """What a checkpoint gives back: the state on the current mesh and the JSON items."""

    step: int
    state: Any
    data: dict
    config: dict
    metadata: dict


def code_revision() -> str:
    """`git rev-parse HEAD` of the package's checkout (+ "-dirty" with local changes), or "unknown"."""
    root = Path(vlacabin_jax.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _is_complete(step_dir: Path) -> bool:
    """Orbax finalised every item (markers written last, after the data)."""
    if not (step_dir / "_CHECKPOINT_METADATA").is_file():
        return False
    return all((step_dir / item).is_dir() and any((step_dir / item).iterdir()) for item in ITEMS)


def quarantine_incomplete(directory: Path) -> list[int]:
    """Moves step directories that are not complete to `<directory>.incomplete/` (primary process).

    Orbax writes into a temporary directory and renames it when done, so an incomplete step
    directory comes from a foreign or damaged write; it is kept for inspection, never restored.
    Returns the moved steps.
    """
    moved = []
    if jax.process_index() != 0 or not directory.is_dir():
        return moved
    for child in sorted(directory.iterdir()):
        if child.is_dir() and child.name.isdigit() and not _is_complete(child):
            target = directory.parent / f"{directory.name}.incomplete" / f"{child.name}-{os.getpid()}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(child), str(target))
            moved.append(int(child.name))
    return moved


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The `state` item's handler: Orbax's standard PyTree format (what `StandardSave` writes),
    with a local type registry whose array handler writes each replicated array once instead of
    slicing it across its replicas ("replica-parallel"). Slicing pays off across hosts; within one
    process it turns every save into thousands of tiny device ops (and compiles them the first
    time: 17 s of blocking for the tiny model on 8 CPU devices, 1 s after that, vs 0.1 s without).
    The global Orbax registry is left alone."""
    th = ocp.type_handlers
    registry = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()), (str, th.StringHandler()),
        (jax.Array, th.ArrayHandler(use_replica_parallel=jax.process_count() > 1)))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _policy(ck: ml_collections.ConfigDict) -> sdp.SaveDecisionPolicy:
    policies = [sdp.ContinuousCheckpointingPolicy(minimum_interval_secs=int(round(60 * ck.interval_minutes))),
                sdp.PreemptionCheckpointingPolicy()]
    if ck.every_steps > 0:
        policies.append(sdp.FixedIntervalPolicy(int(ck.every_steps)))
    return sdp.AnySavePolicy(policies)


class Checkpointer:
    """The run's `CheckpointManager` plus the JSON items that travel with every state.

    Args:
      directory: `<workdir>/checkpoints` (created).
      cfg: the resolved config (saved with every checkpoint; `checkpoint.*` sets the policy).
      mesh_shape: {"data": n, "fsdp": n, "tensor": n} of this run (recorded, not required on restore).
      data_hash: DataHash of the training data (recorded; a restore with another one fails).
      read_only: open an existing directory for restoring only.
    """

    def __init__(self, directory: str | os.PathLike, cfg: ml_collections.ConfigDict, *,
                 mesh_shape: dict[str, int], data_hash: str, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.quarantined = [] if read_only else quarantine_incomplete(self.directory)
        ck = cfg.checkpoint
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(ck.keep), enable_async_checkpointing=bool(ck.async_save) and not read_only,
            save_decision_policy=_policy(ck), create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only)
        handlers = {"state": _state_handler(), **{k: ocp.JsonCheckpointHandler() for k in ITEMS[1:]}}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
        self._config = config_to_json_dict(cfg)
        self._static = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "model_version": vlacabin_jax.__version__, "data_hash": data_hash,
            "code_revision": code_revision(), "mesh": dict(mesh_shape),
            "process_count": jax.process_count(), "variant": cfg.variant, "stage": cfg.train.stage,
            "action_vocabulary": json.loads(actions.ActionVocabulary().to_json()),
        }

    # ----------------------------------------------------------------------------------- saving
    def should_save(self, step: int) -> bool:
        """Orbax's policy decision for `step` (host-only: no device sync)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_state: dict, loop: dict | None = None,
             force: bool = False) -> bool:
        """Starts saving `state` (async: returns once the device→host copy is done).

        Args:
          step: the state's step (the checkpoint's name).
          data_state: `DataIterator.get_state()` — the next batch after this state.
          loop: extra JSON bookkeeping of the loop (rollbacks, skipped batches).
          force: save regardless of the policy (SIGTERM, end of training, tests).
        Returns:
          whether a save was started.
        """
        if step in self.manager.all_steps():
            return False
        meta = dict(self._static, step=int(step), loop=dict(loop or {}),
                    saved_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
        args = ocp.args.Composite(state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_state),
                                  config=ocp.args.JsonSave(self._config), metadata=ocp.args.JsonSave(meta))
        return self.manager.save(int(step), args=args, force=force)

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # --------------------------------------------------------------------------------- restoring
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, target: Any) -> Restored:
        """Restores checkpoint `step`; `target` is the abstract state with the current shardings
        (`state.abstract_with_shardings`), so the arrays land directly on the current mesh."""
        out = self.manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(), metadata=ocp.args.JsonRestore()))
        return Restored(int(step), out.state, out.data, out.config, out.metadata)

    def restore_latest(self, target: Any) -> Restored | None:
        """The newest checkpoint that restores; older ones are tried if a newer one fails to read.

        Raises:
          CheckpointError: the newest checkpoint is readable but belongs to another model or data.
        """
        errors = []
        for step in reversed(self.steps()):
            self.check_compatible(step)
            try:
                return self.restore(step, target)
            except (ValueError, OSError, KeyError) as e:  # unreadable (damaged) — try an older one
                errors.append(f"step {step}: {type(e).__name__}: {e}"[:300])
        if errors:
            raise CheckpointError(f"no checkpoint in {self.directory} could be read: {'; '.join(errors)}")
        return None

    def data_state(self, step: int) -> dict:
        """The data iterator state saved with checkpoint `step` (cheap: no arrays are read)."""
        return self.manager.restore(int(step), args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

    def check_compatible(self, step: int) -> None:
        """Raises CheckpointError if checkpoint `step` was made for other model shapes or data."""
        meta = self.manager.restore(int(step), args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
        problems = compatibility_problems(meta.config, meta.metadata, self._config, self._static)
        if problems:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not fit this run: "
                                  f"{problems[0]}{' (and more: ' + '; '.join(problems[1:]) + ')' if len(problems) > 1 else ''}; "
                                  f"use a fresh --workdir, or start from its weights with "
                                  f"--config.train.init_from={self.directory}")

    def delete_after(self, step: int) -> list[int]:
        """Deletes every checkpoint newer than `step` (they belong to a history being undone)."""
        self.manager.wait_until_finished()
        newer = [s for s in self.steps() if s > step]
        for s in newer:
            self.manager.delete(s)
        return newer


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def compatibility_problems(saved_config: dict, saved_meta: dict, config: dict, static: dict) -> list[str]:
    """Why a checkpoint cannot continue this run: other model shapes, other data, newer format."""
    problems = []
    if saved_meta.get("format_version", 0) > FORMAT_VERSION:
        problems.append(f"checkpoint format {saved_meta.get('format_version')} is newer than this code's "
                        f"{FORMAT_VERSION}")
    old, new = _flatten(saved_config.get("model", {}), "model."), _flatten(config["model"], "model.")
    # Compute dtype, remat, attention kernel and layer scanning do not change the stored params.
    free = {"model.dtype", "model.remat", "model.attention_impl", "model.dnfm.sample_steps",
            "model.anchor_weights"}  # the anchor is in the checkpoint; its source file is read once
    for key in sorted(set(old) | set(new)):
        if key not in free and old.get(key) != new.get(key):
            problems.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    if saved_meta.get("data_hash") != static["data_hash"]:
        problems.append(f"it was trained on DataHash {saved_meta.get('data_hash')}, this config reads "
                        f"{static['data_hash']}")
    return problems


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The metadata JSON of checkpoint `step` (default: the newest complete one) of `directory`."""
    directory = Path(directory)
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_complete(p))
    if not steps:
        raise CheckpointError(f"{directory}: no complete checkpoint")
    step = steps[-1] if step is None else step
    return json.loads((directory / str(step) / "metadata" / "metadata").read_text())


def restore_params(directory: str | os.PathLike, target: Any) -> tuple[Any, Any, int]:
    """(trainable, frozen, step) of the newest complete checkpoint in `directory`, on `target`'s
    shardings. `target` is an abstract TrainState (with shardings) of this run; only its params
    are read, so the other run's optimizer may differ."""
    directory = Path(directory).absolute()
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _is_complete(p)) \
        if directory.is_dir() else []
    if not steps:
        raise CheckpointError(f"train.init_from={directory}: no complete checkpoint there; point it at "
                              f"the checkpoints/ directory of a finished run")
    params = {"trainable": target.trainable, "frozen": target.frozen}
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(directory / str(steps[-1]) / "state", args=ocp.args.PyTreeRestore(
            item=params, restore_args=ocp.checkpoint_utils.construct_restore_args(params),
            partial_restore=True))
    return out["trainable"], out["frozen"], steps[-1]
