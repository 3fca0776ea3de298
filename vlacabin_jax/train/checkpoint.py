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
    saved_steps / complete_steps / newest_complete_step(directory) -> the steps on disk (all readers)
    missing_parts(step_dir) / is_complete(step_dir) / state_item(directory, step)

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

Integrity (`checkpoint.checksums`): once Orbax has finished a step, the primary process writes the
sha256 of each of its files to `<step>/vlacabin_checksums.json` in a background thread. At start-up
the newest steps whose files do not match (bit flips, truncation) are moved to
`<directory>.damaged/`, and so is a step Orbax cannot read; the run continues from the newest good
one and says so in `events.jsonl`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
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
from vlacabin_jax.train import barrier

ITEMS = ("state", "data", "config", "metadata")
FORMAT = "vlacabin.checkpoint"
FORMAT_VERSION = 1
# sha256 of every file of a step, written by the primary process once Orbax has finished the step.
CHECKSUMS = "vlacabin_checksums.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used for this run (other model shapes, other data)."""


class SaveError(RuntimeError):
    """Writing a checkpoint failed (disk full, permissions, storage errors); older ones are intact."""


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


def file_checksums(step_dir: Path) -> dict[str, str]:
    """sha256 of every file under `step_dir` ({relative posix path: hex}), the checksum file excluded."""
    sums = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS):
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        sums[path.relative_to(step_dir).as_posix()] = digest.hexdigest()
    return sums


def write_checksums(step_dir: Path) -> bool:
    """Writes `step_dir/CHECKSUMS` atomically. False if that failed (the step was deleted meanwhile,
    or the disk is full): the step then stays complete but unverified."""
    tmp = step_dir / (CHECKSUMS + ".tmp")
    try:
        text = json.dumps(file_checksums(step_dir), indent=0, sort_keys=True)
        tmp.write_text(text)
        os.replace(tmp, step_dir / CHECKSUMS)
        return True
    except OSError:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        return False


def checksum_problem(step_dir: Path) -> str | None:
    """Why `step_dir`'s files do not match its checksums (None: they match, or it has none yet:
    a save killed after Orbax finished but before the hashes were written is still complete)."""
    path = step_dir / CHECKSUMS
    if not path.is_file():
        return None
    try:
        want = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        want = None
    if not isinstance(want, dict):
        return f"{CHECKSUMS} is unreadable"
    got = file_checksums(step_dir)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            return f"file {name} is missing"
        if name not in want:
            return f"file {name} was not part of the checkpoint"
        if want[name] != got[name]:
            return f"file {name} does not match its sha256 (truncated or modified)"
    return None


# ------------------------------------------------------------------------ finding saved steps
# The one place that says which step directories hold a usable checkpoint; the trainer, init_from,
# evaluation (`restore.py`) and export (`export/source.py`) all go through these.
COMMIT_MARKER = "_CHECKPOINT_METADATA"  # Orbax writes it last, once every item is on disk


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """The numbered step directories under `directory`, complete or not, ascending ([] if it is
    not a directory)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdecimal())


def missing_parts(step_dir: str | os.PathLike, items: tuple[str, ...] = ITEMS) -> list[str]:
    """What `step_dir` lacks to be a complete checkpoint of `items` (empty: complete): Orbax's
    commit marker, or an item directory that is missing or empty."""
    step_dir = Path(step_dir)
    missing = [] if (step_dir / COMMIT_MARKER).is_file() else [f"{COMMIT_MARKER} (save never finished)"]
    return missing + [item for item in items if not (step_dir / item).is_dir() or not any((step_dir / item).iterdir())]


def is_complete(step_dir: str | os.PathLike, items: tuple[str, ...] = ITEMS) -> bool:
    """Orbax finalised the step and every one of `items` (markers written last, after the data)."""
    step_dir = Path(step_dir)
    if not (step_dir / COMMIT_MARKER).is_file():  # the cheap test first: this runs at every save
        return False
    return not missing_parts(step_dir, items)


def complete_steps(directory: str | os.PathLike, items: tuple[str, ...] = ITEMS) -> list[int]:
    """The steps under `directory` that are complete checkpoints of `items`, ascending."""
    return [s for s in saved_steps(directory) if is_complete(Path(directory) / str(s), items)]


def newest_complete_step(directory: str | os.PathLike, items: tuple[str, ...] = ITEMS) -> int | None:
    """The newest complete step under `directory`, or None. Checksums are not checked here (see
    `checksum_problem`): each reader refuses a damaged step in its own words."""
    steps = complete_steps(directory, items)
    return steps[-1] if steps else None


def state_item(directory: str | os.PathLike, step: int) -> Path:
    """The absolute path of step `step`'s train state item (Orbax refuses relative paths)."""
    return Path(directory).absolute() / str(step) / "state"


def _move_aside(step_dir: Path, kind: str) -> None:
    target = step_dir.parent.parent / f"{step_dir.parent.name}.{kind}" / f"{step_dir.name}-{os.getpid()}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(step_dir), str(target))


def quarantine(directory: Path, verify: bool) -> tuple[list[int], dict[int, str], int | None]:
    """Moves unusable step directories aside, so that they are never restored nor block a new save
    of the same step: incomplete ones to `<directory>.incomplete/`, and (with `verify`) the newest
    ones whose files fail their checksums to `<directory>.damaged/`, down to the first good one.

    Orbax writes into a temporary directory and renames it when done, so an incomplete step
    directory comes from a foreign or interrupted write. Kept for inspection, never deleted.
    Every process decides the same (shared filesystem); the primary one moves, then all sync.
    Returns (incomplete steps, {damaged step: reason}, the newest verified step or None).
    """
    incomplete, damaged, good = [], {}, None
    if directory.is_dir():
        steps = saved_steps(directory)[::-1]
        incomplete = [step for step in steps if not is_complete(directory / str(step))]
        for step in (s for s in steps if s not in incomplete) if verify else ():
            problem = checksum_problem(directory / str(step))
            if problem is None:
                good = step
                break
            damaged[step] = problem
        barrier.wait_for_all_processes(f"checkpoint-verified-{directory}")  # all looked before any move
        if jax.process_index() == 0:
            for step in incomplete:
                _move_aside(directory / str(step), "incomplete")
            for step in damaged:
                _move_aside(directory / str(step), "damaged")
    barrier.wait_for_all_processes(f"checkpoint-quarantine-{directory}")
    if damaged and good is None:  # never start a long run over from scratch without being told
        first = max(damaged)
        raise CheckpointError(f"every checkpoint in {directory} is damaged (step {first}: {damaged[first]}); "
                              f"they were moved to {directory.name}.damaged/: restore a backup there, or run "
                              f"again to start from scratch")
    return sorted(incomplete), damaged, good


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
        ck = cfg.checkpoint
        self.verify = bool(ck.checksums)
        self.quarantined, self.damaged, good = ([], {}, None) if read_only else quarantine(self.directory, self.verify)
        self._verified = {good} if good is not None else set()
        # The primary process hashes finished steps in the background (the loop never waits on it).
        self._hasher = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-sha256")
                        if self.verify and not read_only and jax.process_index() == 0 else None)
        self._unhashed: set[int] = set()  # saved by this run, checksums not yet queued
        self._hashing: list[concurrent.futures.Future] = []
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
        """Orbax's policy decision for `step` (host-only: no device sync). Also queues the
        checksums of a save that has finished since (a stat or two while one is pending)."""
        self._hash_finished()
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
        try:  # Orbax first finishes the previous save: its errors surface here
            started = self.manager.save(int(step), args=args, force=force)
        except Exception as e:
            raise self._save_error(e) from e
        if started and self._hasher is not None:
            self._unhashed.add(int(step))
        return started

    def _save_error(self, error: Exception) -> SaveError:
        text = " ".join(str(error).split())
        if len(text) > 300:  # storage errors end with the cause ("No space left on device")
            text = f"{text[:120]} ... {text[-160:]}"
        complete = [s for s in self.steps() if is_complete(self.directory / str(s))]
        newest = f"step {complete[-1]}" if complete else "none"
        return SaveError(f"writing a checkpoint to {self.directory} failed ({type(error).__name__}: {text}); "
                         f"the newest complete checkpoint ({newest}) is intact: free space there (or fix the "
                         f"storage) and run the same command again to resume from it")

    def _hash_finished(self) -> None:
        """Queues the checksums of this run's saves that Orbax has finished (primary process)."""
        for step in sorted(self._unhashed):
            if is_complete(self.directory / str(step)):
                self._unhashed.discard(step)
                self._hashing.append(self._hasher.submit(write_checksums, self.directory / str(step)))

    def wait(self) -> None:
        """Blocks until the pending asynchronous save is on disk, with its checksums."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_error(e) from e
        self._hash_finished()
        self._unhashed.clear()  # every save is final now: what is left was deleted (keep, rollback)
        concurrent.futures.wait(self._hashing)
        self._hashing = [f for f in self._hashing if not f.done()]

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()
            if self._hasher is not None:
                self._hasher.shutdown(wait=True)

    # --------------------------------------------------------------------------------- restoring
    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, target: Any) -> Restored:
        """Restores checkpoint `step`; `target` is the abstract state with the current shardings
        (`state.abstract_with_shardings`), so the arrays land directly on the current mesh.

        Raises:
          CheckpointError: the step's files do not match their checksums.
        """
        if self.verify and step not in self._verified:
            problem = checksum_problem(self.directory / str(step))
            if problem is not None:
                raise CheckpointError(f"checkpoint {self.directory}/{step} is damaged: {problem}")
            self._verified.add(step)
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
        errors, unreadable = [], []
        for step in reversed(self.steps()):
            try:
                self.check_compatible(step)
            except (ValueError, OSError, KeyError) as e:  # its JSON items do not even read
                errors.append(f"step {step}: {type(e).__name__}: {e}"[:300])
                unreadable.append(step)
                continue
            try:
                restored = self.restore(step, target)
            except Exception as e:  # damaged (TensorStore raises bare Exceptions): try an older one
                errors.append(f"step {step}: {type(e).__name__}: {e}"[:300])
                unreadable.append(step)
                continue
            self._set_aside(unreadable, errors)
            return restored
        if errors:
            raise CheckpointError(f"no checkpoint in {self.directory} could be read ({'; '.join(errors)}); "
                                  f"move {self.directory} away to start fresh, or restore a backup")
        return None

    def _set_aside(self, steps: list[int], reasons: list[str]) -> None:
        """Moves unreadable steps to `<directory>.damaged/` so that a new save of the same step
        is not refused and no restart tries them again."""
        if not steps:
            return
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            for step in steps:
                _move_aside(self.directory / str(step), "damaged")
        barrier.wait_for_all_processes(f"checkpoint-set-aside-{steps}")
        self.manager.reload()
        self.damaged.update(zip(steps, reasons))

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
    free = {"model.dtype", "model.remat", "model.remat_policy", "model.attention_impl", "model.dnfm.sample_steps",
            "model.anchor_weights"}  # the anchor is in the checkpoint; its source file is read once
    for key in sorted(set(old) | set(new)):
        if key not in free and old.get(key) != new.get(key):
            problems.append(f"{key} was {old.get(key)!r}, now {new.get(key)!r}")
    # The train state's structure: which params have optimizer state, and the align reference.
    old_train, new_train = saved_config.get("train", {}), config.get("train", {})
    if old_train.get("trainable", "all") != new_train.get("trainable", "all"):
        problems.append(f"train.trainable was {old_train.get('trainable', 'all')!r}, now {new_train.get('trainable')!r}")
    if (old_train.get("stage") == "align") != (new_train.get("stage") == "align"):
        problems.append(f"train.stage was {old_train.get('stage')!r}, now {new_train.get('stage')!r} (the align "
                        f"stage keeps a reference model in its state)")
    if saved_meta.get("data_hash") != static["data_hash"]:
        problems.append(f"it was trained on DataHash {saved_meta.get('data_hash')}, this config reads "
                        f"{static['data_hash']}")
    return problems


def read_metadata(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The metadata JSON of checkpoint `step` (default: the newest complete one) of `directory`."""
    directory = Path(directory)
    newest = newest_complete_step(directory)
    if newest is None:
        raise CheckpointError(f"{directory}: no complete checkpoint")
    step = newest if step is None else step
    return json.loads((directory / str(step) / "metadata" / "metadata").read_text())
