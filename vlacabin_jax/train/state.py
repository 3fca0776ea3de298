"""The train state `{step, trainable, frozen, opt_state, rng, reference}` and its sharded creation.

    state_shardings(cfg, mesh)         -> (abstract TrainState, TrainState of NamedSharding)
    create_train_state(cfg, mesh)      -> (TrainState, shardings), created directly sharded
    abstract_with_shardings(abs, shd)  -> ShapeDtypeStructs carrying shardings (restore targets)
    load_anchor(state, shardings, path) -> the state with a pretrained anchor (`tools/import_hf`)
    reset_reference(state, shardings)  -> align: the DPO reference := a copy of the current params

The state is created inside one `jax.jit` whose `out_shardings` come from the params' logical axes
(`sharding.param_shardings`), so no device ever holds a full copy of a sharded param. The frozen
group has no optimizer state: only `trainable` goes to `optax`. Which params are frozen follows
`train.trainable` (`functional.split_params`); the anchor among them is stored in
`model.anchor_dtype`, other frozen params (encoder base weights under LoRA) in `model.param_dtype`.
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
from vlacabin_jax.model.dpo import REFERENCE_KEYS
from vlacabin_jax.train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    """Everything the train step reads and writes (a pytree; donated to the step).

    step: int32 [] — optimizer updates applied so far.
    trainable: fp32 (`model.param_dtype`) params that get gradients (`train.trainable`).
    frozen: the rest, no gradient, no moments: the perception anchor (`vit`, `lm`) in
      `model.anchor_dtype`, and under "lora_and_heads" the encoders' base weights etc. (param_dtype).
    opt_state: optax state of `trainable` only.
    rng: uint32 [2] — base key; step `s` uses `fold_in(rng, s)` so a resumed run draws the same.
    reference: stage `align` only ({} otherwise): the frozen DPO reference, a copy of the
      `init_from` params of `dpo.REFERENCE_KEYS` (the DNFM) in `model.param_dtype`, sharded like
      those params; no gradient, no moments. It is part of the checkpoint, so a resumed align run
      compares against exactly the reference it started with, whatever became of the sft run.
    """

    step: jax.Array
    trainable: Any
    frozen: Any
    opt_state: Any
    rng: jax.Array
    reference: Any = flax.struct.field(default_factory=dict)


def _seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(params init key, base key of the per-step rngs) from `train.seed`."""
    root = jax.random.key(seed)
    return jax.random.fold_in(root, 0), jax.random.key_data(jax.random.fold_in(root, 1))


def _boxed_state(cfg: ml_collections.ConfigDict, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The state with params (and their Adam moments) boxed with logical axes. Traced only."""
    init_key, rng = _seed_keys(seed)
    trainable, frozen = functional.init_params(cfg, init_key)
    frozen = functional.cast_anchor(frozen, jnp.dtype(cfg.model.anchor_dtype))  # maps inside the boxes
    # `init` on the boxed tree boxes the moments too, so they inherit the params' logical axes.
    return TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                      opt_state=tx.init(trainable), rng=rng,
                      reference=_copy(reference_params(trainable, frozen)) if cfg.train.stage == "align" else {})


def _copy(tree: Any) -> Any:
    """New buffers for every leaf (jit forwards an output that is an input, `copy=True` does not):
    the state is donated to the step, so no buffer may appear in it twice."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=x.dtype, copy=True), tree)


def reference_params(trainable: Any, frozen: Any) -> dict:
    """The DPO reference's groups (`dpo.REFERENCE_KEYS`) of a (trainable, frozen) pair, wherever
    `train.trainable` put their leaves (boxed or not; the leaves are the same objects)."""
    merged = functional.merge_params(trainable, frozen)
    return {k: merged[k] for k in REFERENCE_KEYS}


def reset_reference(state: TrainState, shardings: TrainState) -> TrainState:
    """`state` whose reference (if it keeps one) is a copy (`_copy`) of its current params: what a
    new align run does once the init_from params are in."""
    if not state.reference:
        return state
    ref = reference_params(state.trainable, state.frozen)
    return state.replace(reference=jax.jit(_copy, out_shardings=shardings.reference)(ref))


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
    """Init runs once and is all RNG: on CPU, skipping LLVM's optimisations compiles it ~3x faster."""
    if mesh.devices.flat[0].platform == "cpu":
        return {"xla_backend_optimization_level": 0}
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
