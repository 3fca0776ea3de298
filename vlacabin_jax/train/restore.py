"""Params (never the optimizer state) and config of a run's checkpoint, for evaluation and sampling.

    item = find_checkpoint_item("runs/demo/checkpoints")        # .../<latest step>/state
    cfg = checkpoint_config("runs/demo/checkpoints", overrides=["--config.model.dnfm.sample_steps=2"])
    trainable, frozen = restore_params("runs/demo/checkpoints", cfg, step=None)

`path` may be a checkpoint manager's directory (`<dir>/<step>/state` as `vlacabin_jax.train.checkpoint`
writes it), one step directory or the Orbax item directory itself; relative paths are taken from
the working directory. Expected failures raise `RestoreError` with one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from vlacabin_jax.config import load_config, with_legacy_defaults

# The preset file whose variants a saved config names (`<step>/config` holds the resolved fields).
CONFIG_FILE = str(Path(__file__).resolve().parents[2] / "configs" / "vla_cabin.py")
DEFAULT_CONFIG = f"{CONFIG_FILE}:tiny"
_ITEM_NAMES = ("state", "train_state", "params")  # the item that holds the train state, preferred


class RestoreError(ValueError):
    """A checkpoint path, step or param tree that cannot be used (one line)."""


def _is_pytree_item(path: Path) -> bool:
    return (path / "_METADATA").exists() or (path / "manifest.ocdbt").exists()


def find_checkpoint_item(path: str | os.PathLike, step: int | None = None) -> Path:
    """The absolute Orbax pytree directory holding the params under `path` (latest step, or `step`).

    Absolute because Orbax refuses relative paths ("Checkpoint path should be absolute").
    """
    from vlacabin_jax.train import checkpoint as ckpt_lib  # imports JAX: not before a path is asked for

    p = Path(path).absolute()
    if not p.is_dir():
        raise RestoreError(f"--checkpoint: no such directory {path}")
    # A step is finished once Orbax wrote its commit marker, whatever its items are (any Orbax
    # checkpoint manager's directory, not only the trainer's); without markers, every step counts.
    steps = ckpt_lib.complete_steps(p, items=()) or ckpt_lib.saved_steps(p)
    if steps:
        if step is not None and step not in steps:
            raise RestoreError(f"--checkpoint: step {step} not in {path} (steps: {steps})")
        p = p / str(step if step is not None else steps[-1])
    elif step is not None and not _is_pytree_item(p):
        raise RestoreError(f"--checkpoint: {path} has no step directories")
    if _is_pytree_item(p):
        return p
    items = [c for c in sorted(p.iterdir()) if c.is_dir() and _is_pytree_item(c)]
    if not items:
        raise RestoreError(f"--checkpoint: no Orbax checkpoint found in {p}")
    return next((c for c in items if c.name in _ITEM_NAMES), items[0])


def saved_config(item: Path) -> dict | None:
    """The resolved config JSON saved beside the state item (`<step>/config`), or None."""
    cdir = item.parent / "config"
    if not cdir.is_dir():
        return None
    for f in sorted(cdir.iterdir()):
        try:
            obj = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            continue
        if isinstance(obj, dict) and "model" in obj and "variant" in obj:
            return obj
    return None


def as_overrides(saved: dict, prefix: str = "") -> list[str]:
    """A saved config → `--config.a.b=value` strings (JSON lists are the config's tuples)."""
    out = []
    for k, v in saved.items():
        if isinstance(v, dict):
            out += as_overrides(v, f"{prefix}{k}.")
        elif k != "variant" or prefix:
            out.append(f"--config.{prefix}{k}={tuple(v)!r}" if isinstance(v, list) else f"--config.{prefix}{k}={v!r}")
    return out


def checkpoint_config(path: str | os.PathLike | None, step: int | None = None, config: str | None = None,
                      overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config to read a checkpoint with: its saved config unless `config` (`file.py:variant`)
    is given, else `config` or the tiny preset (also for `path` None: no checkpoint); `overrides`
    apply last; a field the saved config predates takes the value it was trained with
    (`config.LEGACY_DEFAULTS`), not today's preset. Raises `ConfigError`, or `RestoreError` for a
    bad path or step."""
    if path is not None and config is None:
        saved = saved_config(find_checkpoint_item(path, step))
        if saved is not None:
            return load_config(f"{CONFIG_FILE}:{saved['variant']}",
                               as_overrides(with_legacy_defaults(saved)) + list(overrides))
    return load_config(config or DEFAULT_CONFIG, overrides)


def _params_metadata(item: Path) -> tuple[dict, dict, list[str]]:
    """(trainable, frozen) metadata trees of a pytree item and the keys leading to them."""
    import orbax.checkpoint as ocp
    from etils import epath

    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item))
    except Exception as e:  # orbax raises many kinds; all mean "not a readable checkpoint"
        raise RestoreError(f"--checkpoint: cannot read {item}: {type(e).__name__}: {e}") from e
    node, keys = getattr(meta, "tree", meta), []
    for wrapper in _ITEM_NAMES:  # tolerate one level of nesting
        if isinstance(node, dict) and "trainable" not in node and wrapper in node:
            node, keys = node[wrapper], keys + [wrapper]
    if not (isinstance(node, dict) and "trainable" in node and "frozen" in node):
        raise RestoreError(f"--checkpoint: {item} holds no 'trainable'/'frozen' params")
    return node["trainable"], node["frozen"], keys


def _expected_shapes(cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """{"['path']...": shape} of the trainable and frozen params a config gives (traced, not built)."""
    import flax.linen as nn
    import jax

    from vlacabin_jax.model import functional

    want = jax.eval_shape(lambda: functional.init_params(cfg, jax.random.key(0)))
    return tuple({jax.tree_util.keystr(k): tuple(v.shape)
                  for k, v in jax.tree_util.tree_leaves_with_path(nn.unbox(w))} for w in want)


def check_shapes(trainable: Any, frozen: Any, cfg: ml_collections.ConfigDict) -> None:
    """RestoreError unless the param trees (arrays or Orbax metadata) have the shapes `cfg` gives."""
    import jax

    is_leaf = lambda x: hasattr(x, "shape")  # noqa: E731  (Orbax metadata leaves too)
    for name, got, ref in zip(("trainable", "frozen"), (trainable, frozen), _expected_shapes(cfg)):
        g = {jax.tree_util.keystr(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(got, is_leaf)}
        if g != ref:
            diff = sorted(set(g.items()) ^ set(ref.items()))[:3]
            raise RestoreError(f"--checkpoint: {name} params do not match config {cfg.variant!r} "
                               f"(first differences: {diff}); pass the config the checkpoint was trained with")


def restore_params(path: str | os.PathLike, cfg: ml_collections.ConfigDict, step: int | None = None
                   ) -> tuple[Any, Any]:
    """(trainable, frozen) nested dicts of numpy arrays: an Orbax partial restore of the
    `trainable` / `frozen` subtrees of the state item (the optimizer state is never read).

    Shapes are checked against `cfg` from the checkpoint's metadata before anything is read.
    Files that fail the trainer's checksums (`vlacabin_jax.train.checkpoint`) are refused.
    """
    import jax
    import numpy as np
    import orbax.checkpoint as ocp
    from etils import epath

    from vlacabin_jax.train.checkpoint import checksum_problem

    item = find_checkpoint_item(path, step)
    problem = checksum_problem(item.parent)  # the step directory, when the trainer wrote checksums
    if problem is not None:
        raise RestoreError(f"--checkpoint: {item.parent} is damaged ({problem}); evaluate another step with --step")
    meta_t, meta_f, keys = _params_metadata(item)
    check_shapes(meta_t, meta_f, cfg)
    want = {"trainable": meta_t, "frozen": meta_f}
    for key in reversed(keys):  # rebuild the path from the item's root, for the partial restore
        want = {key: want}
    args = ocp.args.PyTreeRestore(item=want, partial_restore=True, restore_args=jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), want))
    out = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(epath.Path(item), args=args)
    for key in keys:
        out = out[key]
    return out["trainable"], out["frozen"]
