"""The train state `{step, trainable, frozen, opt_state, rng}` and its sharded creation.

    state_shardings(cfg, mesh)         -> (abstract TrainState, TrainState of NamedSharding)
    create_train_state(cfg, mesh)      -> (TrainState, shardings), created directly sharded
    abstract_with_shardings(abs, shd)  -> ShapeDtypeStructs carrying shardings (restore targets)
    load_anchor(state, shardings, path) -> the state with a pretrained anchor (`tools/import_hf`)

The state is created inside one `jax.jit` whose `out_shardings` come from the params' logical axes
(`sharding.param_shardings`), so no device ever holds a full copy of a sharded param. The frozen
anchor is stored in `model.anchor_dtype` and has no optimizer state: only `trainable` goes to
`optax`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from vlacabin_jax import hf_import, sharding
from vlacabin_jax.model import functional
from vlacabin_jax.train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    """Everything the train step reads and writes (a pytree; donated to the step).

    step: int32 [] — optimizer updates applied so far.
    trainable: fp32 (`model.param_dtype`) params that get gradients.
    frozen: the perception anchor (`vit`, `lm`) in `model.anchor_dtype`; no gradient, no moments.
    opt_state: optax state of `trainable` only.
    rng: uint32 [2] — base key; step `s` uses `fold_in(rng, s)` so a resumed run draws the same.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array


def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(params init key, base key of the per-step rngs) from `train.seed`."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.key_data(jax.random.fold_in(root, 1))


def _boxed_state(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The state with params (and their Adam moments) boxed with logical axes. Traced only."""
    init_key, rng = _seed_keys(seed)
    trainable, frozen = functional.init_params(cfg, init_key)
    anchor = jnp.dtype(cfg.model.anchor_dtype)
    frozen = jax.tree.map(lambda x: x.astype(anchor), frozen)  # maps inside the boxes
    # `init` on the boxed tree boxes the moments too, so they inherit the params' logical axes.
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=rng)


def state_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """(abstract state of ShapeDtypeStructs, state of NamedShardings) for `mesh`.

    Scalars (step, optimizer counts) and the rng are replicated; params and moments follow the
    logical-axis rules of `sharding.logical_rules(cfg.mesh)`.
    """
    tx = make_optimizer(cfg)
    boxed = jax.eval_shape(lambda: _boxed_state(cfg, tx, int(cfg.train.seed)))
    shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules(cfg.mesh))
    return nn.unbox(boxed), shardings


def create_train_state(cfg: ml_collections.ConfigDict, mesh: Mesh) -> tuple[TrainState, TrainState]:
    """A fresh state (params from `train.seed`), every leaf created with its final sharding.

    Returns:
      (state, shardings): concrete TrainState on `mesh`, and its NamedSharding tree.
    """
    _, shardings = state_shardings(cfg, mesh)
    tx = make_optimizer(cfg)
    seed = int(cfg.train.seed)
    init = jax.jit(lambda: nn.unbox(_boxed_state(cfg, tx, seed)), out_shardings=shardings,
                   compiler_options=_init_compiler_options(mesh))
    return init(), shardings


def _init_compiler_options(mesh: Mesh) -> dict | None:
    """Init runs once and is all RNG: on CPU, skipping LLVM's optimisations compiles it ~3x faster
    (and the memory-optimised schedule avoids XLA:CPU's collective deadlock, see `step.py`)."""
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_backend_optimization_level": 0, "xla_cpu_enable_concurrency_optimized_scheduler": False}
    return None


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings (what Orbax restores onto)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def load_anchor(state: TrainState, shardings: TrainState, path: str) -> TrainState:
    """`state` with the frozen anchor groups stored in `path` (a `tools/import_hf` file).

    Each array is placed straight onto its sharding, one slice per device, so no device holds a
    full copy of a sharded anchor param (the host holds the file's arrays once).
    """
    anchor, _ = hf_import.load_anchor_file(path, state.frozen)
    place = lambda a, s: jax.make_array_from_callback(a.shape, s, lambda index: a[index])  # noqa: E731
    frozen = jax.tree.map(lambda new, old, s: old if new is old else place(np.asarray(new), s),
                          anchor, state.frozen, shardings.frozen)
    return state.replace(frozen=frozen)


def replace_params(state: TrainState, trainable: Any, frozen: Any) -> TrainState:
    """`state` with other params (same structure): used to start a stage from another's weights."""
    cast = lambda new, old: jnp.asarray(new, old.dtype)  # noqa: E731
    return state.replace(trainable=jax.tree.map(cast, trainable, state.trainable),
                         frozen=jax.tree.map(cast, frozen, state.frozen))
