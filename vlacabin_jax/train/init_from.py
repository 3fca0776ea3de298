"""Start a stage from an earlier stage's params (`train.init_from`), reporting what was taken.

    plan(saved, wanted)                          -> InitPlan: loaded / new / dropped / mismatched
    load(directory, state, shardings)            -> (state with the loaded params, InitPlan)

Params are matched by their path in the full tree (`functional.merge_params`), not by group: a
stage may freeze what the previous one trained (`train.trainable`), so an encoder kernel saved in
`trainable` can land in `frozen`. Only params are read (never the optimizer state); each lands
directly on this run's sharding and dtype. Allowed differences: adapter params (`lora_a`,
`lora_b`) may be new (fresh adapters on a model trained without) or dropped (reported: fold them in
with `tools.export` if they matter). Anything else that differs — a shape, or a name on one side
only — is refused with one `CheckpointError` line: the checkpoint is for another model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from vlacabin_jax.model import functional
from vlacabin_jax.model.lora import ADAPTER_NAMES
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train.checkpoint import CheckpointError

GROUPS = ("trainable", "frozen")
Path_ = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """What `train.init_from` does with each param path ("a/b/c" strings, sorted).

    loaded: in the checkpoint and this model with the same shape; new: only in this model (kept at
    their fresh init); dropped: only in the checkpoint (ignored); mismatched: "path: saved shape vs
    this model's shape".
    """

    loaded: tuple[str, ...]
    new: tuple[str, ...]
    dropped: tuple[str, ...]
    mismatched: tuple[str, ...]
    loaded_values: int = 0

    def problems(self) -> list[str]:
        """Why the checkpoint cannot start this model (empty: it can)."""
        out = [f"shape mismatch {m}" for m in self.mismatched]
        out += [f"param {p} is not in the checkpoint" for p in self.new if not _adapter(p)]
        out += [f"checkpoint param {p} is not in this model" for p in self.dropped if not _adapter(p)]
        if not self.loaded:
            out.append("no param of the checkpoint matches this model")
        return out

    def summary(self) -> str:
        """One line per category, paths grouped by their top-level module."""
        return "\n".join(f"  {name} ({len(paths)}): {_grouped(paths) or '-'}"
                         for name, paths in (("loaded", self.loaded), ("new", self.new), ("dropped", self.dropped)))


def _adapter(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in ADAPTER_NAMES


def _grouped(paths: tuple[str, ...]) -> str:
    """Short lists in full; long ones counted per module and param name:
    "text_encoder/…/lora_a (10), text_encoder/…/kernel (8), dnfm (26)"."""
    if len(paths) <= 6:
        return ", ".join(paths)
    counts: dict[str, int] = {}
    for p in paths:
        parts = p.split("/")
        key = f"{parts[0]}/…/{parts[-1]}" if _adapter(p) else parts[0]
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({n})" for k, n in counts.items())


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{"a/b/c": shape} of a nested dict whose leaves have `.shape` (arrays or Orbax metadata)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {"/".join(str(k.key) for k in path): tuple(x.shape) for path, x in leaves}


def plan(saved: dict[str, tuple[int, ...]], wanted: dict[str, tuple[int, ...]]) -> InitPlan:
    """Match the checkpoint's params to this model's by path.

    Args:
      saved, wanted: {"a/b/c": shape} of the checkpoint's and this model's full param trees.
    """
    both = sorted(set(saved) & set(wanted))
    mismatched = tuple(f"{p}: {saved[p]} vs {wanted[p]}" for p in both if saved[p] != wanted[p])
    loaded = tuple(p for p in both if saved[p] == wanted[p])
    return InitPlan(loaded=loaded, new=tuple(sorted(set(wanted) - set(saved))),
                    dropped=tuple(sorted(set(saved) - set(wanted))), mismatched=mismatched,
                    loaded_values=sum(math.prod(wanted[p]) for p in loaded))


def _state_item(directory: str | os.PathLike) -> Path:
    """The `state` item of the newest complete checkpoint in a run's checkpoints/ directory."""
    d = Path(directory).absolute()
    step = ckpt_lib.newest_complete_step(d)
    if step is None:
        raise CheckpointError(f"train.init_from={d}: no complete checkpoint there; point it at the "
                              f"checkpoints/ directory of a finished run")
    problem = ckpt_lib.checksum_problem(d / str(step))
    if problem is not None:
        raise CheckpointError(f"train.init_from={d}: checkpoint {step} is damaged ({problem}); point it "
                              f"at a good checkpoint")
    return ckpt_lib.state_item(d, step)


def _nest(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return out


def _replace(tree: Any, values: dict[str, Any]) -> Any:
    """`tree` (nested dicts) with the leaves at the paths of `values` replaced."""
    def leaf(path, x):
        return values.get("/".join(str(k.key) for k in path), x)
    return jax.tree_util.tree_map_with_path(leaf, tree)


def load(directory: str | os.PathLike, state: Any, shardings: Any) -> tuple[Any, InitPlan]:
    """`state` with the params of the newest checkpoint in `directory` wherever they match.

    Args:
      directory: an earlier run's checkpoints/ directory.
      state: this run's fresh TrainState (its params give the paths, shapes, dtypes).
      shardings: the TrainState of NamedShardings (each loaded param lands on its sharding).
    Returns:
      (state, plan). Raises CheckpointError (one line) when `plan.problems()` is not empty.
    """
    item = _state_item(directory)
    try:
        meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item))
    except Exception as e:  # Orbax raises many kinds; all mean "not a readable checkpoint"
        raise CheckpointError(f"train.init_from={directory}: cannot read {item}: {type(e).__name__}: {e}") from e
    tree = getattr(meta, "tree", meta)
    saved_group = {p: g for g in GROUPS for p in _shapes(tree.get(g, {}))}
    saved = {p: s for g in GROUPS for p, s in _shapes(tree.get(g, {})).items()}
    params = functional.merge_params(state.trainable, state.frozen)
    p = plan(saved, _shapes(params))
    if p.problems():
        issues = p.problems()
        raise CheckpointError(f"train.init_from={directory} does not fit this model: {issues[0]}"
                              + (f" (and {len(issues) - 1} more: {'; '.join(issues[1:4])})" if len(issues) > 1 else ""))
    current = {k: v for k, v in _leaves(params).items() if k in p.loaded}
    shard = _leaves(functional.merge_params(shardings.trainable, shardings.frozen))
    # Targets in the checkpoint's own layout (group of the saved run), this run's dtype and sharding.
    target = {g: _nest({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shard[k])
                        for k, v in current.items() if saved_group[k] == g}) for g in GROUPS}
    target = {g: t for g, t in target.items() if t}
    with ocp.PyTreeCheckpointer() as ckptr:
        out = ckptr.restore(item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    values = {k: v for g in out for k, v in _leaves(out[g]).items()}
    return state.replace(trainable=_replace(state.trainable, values), frozen=_replace(state.frozen, values)), p


def _leaves(tree: Any) -> dict[str, Any]:
    return {"/".join(str(k.key) for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(tree)}
