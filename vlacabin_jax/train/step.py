"""The train and eval steps: one `jax.jit` each, explicit shardings, the train state donated.

    make_train_step(cfg, mesh, state_shardings) -> step(state, batch) -> (state, metrics)
    make_eval_step(cfg, mesh, state_shardings)  -> step(state, batch) -> metrics
    batch_shardings(cfg, mesh)                  -> {name: NamedSharding} of a device batch
    device_batch(batch, shardings)              -> global jax.Arrays from this process's rows

Metrics are replicated device scalars; nothing here syncs with the host. A step whose loss or
gradient is not finite leaves params, optimizer state and step count unchanged (`finite` = 0 in
its metrics), so a NaN never reaches the params or a checkpoint before the loop rolls back.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vlacabin_jax import sharding
from vlacabin_jax.data.spec import HOST_ONLY_FIELDS, batch_spec
from vlacabin_jax.model import functional, losses
from vlacabin_jax.train.optimizer import learning_rate_fn, make_optimizer
from vlacabin_jax.train.state import TrainState

_BATCH_AXES = ("data", "fsdp")


def batch_shardings(cfg: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, NamedSharding]:
    """Leading (batch) dim over (data, fsdp), everything else replicated."""
    return {k: sharding.batch_sharding(mesh, len(shape))
            for k, (shape, _) in batch_spec(cfg, 1).items() if k not in HOST_ONLY_FIELDS}


def device_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding],
                 global_batch_size: int) -> dict[str, jax.Array]:
    """This process's rows [B / processes, ...] → global arrays [B, ...] (host → device only)."""
    return {k: jax.make_array_from_process_local_data(s, batch[k], (global_batch_size,) + batch[k].shape[1:])
            for k, s in shardings.items()}


def _step_rngs(base: jax.Array, step: jax.Array, micro: int | jax.Array) -> dict[str, jax.Array]:
    """{"latent", "flow"} keys of one microbatch: a pure function of (seed, step, microbatch)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(base), step), micro)
    latent, flow = jax.random.split(key)
    return {"latent": latent, "flow": flow}


def _microbatches(batch: dict, accum: int, mesh: Mesh) -> dict:
    """[B, ...] → [accum, B / accum, ...]; microbatch a holds rows a, a + accum, a + 2·accum, …

    Every device's rows are split evenly over the microbatches (no data moves), and the
    composition of a microbatch does not depend on the mesh.
    """
    def split(x):
        y = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        spec = PartitionSpec(None, _BATCH_AXES, *([None] * (x.ndim - 1)))
        return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, spec))
    return jax.tree.map(split, batch)


def _reference(state: TrainState) -> dict | None:
    """The frozen DPO reference of an align state (never differentiated: it is not an argument of
    the gradient), None in the other stages (their `reference` is {})."""
    return state.reference or None


def _accumulate_metrics(summed: dict, accum: int) -> dict:
    """Metrics summed over `accum` microbatches → the batch's: each microbatch reported its sums
    over the batch's counts (they add up), except `PER_STEP_METRICS`, which are the same in all."""
    return {k: v / accum if k in losses.PER_STEP_METRICS else v for k, v in summed.items()}


def _grads_and_metrics(cfg: ml_collections.ConfigDict, state: TrainState, batch: dict, mesh: Mesh,
                       grad_shardings: Any) -> tuple[Any, dict]:
    """Gradient of the batch's loss w.r.t. `trainable`, and the batch's metrics.

    With `train.grad_accum_steps = A > 1` the batch runs as A microbatches (`_microbatches`)
    and the step trains the same objective as the whole batch at once: every masked term is a
    sum over the rows/tokens it covers divided by their count in the *whole batch*
    (`functional.loss_counts`, taken before the microbatches run), so the microbatches' losses
    and gradients are summed, not averaged. A mean of per-microbatch means would weigh a row
    of a microbatch with few masked-in rows more than one of a full microbatch. One exception:
    InfoNCE contrasts a row with the other rows of its microbatch (the negatives of a batch
    that never exists at once cannot be had without a second pass), so its value is the mean
    over all microbatches' rows of that microbatch-wise loss. The rngs are drawn per microbatch.
    """
    reference = _reference(state)

    def loss(params, mb, rngs, totals=None):
        return functional.loss_fn(params, state.frozen, mb, rngs, cfg, state.step, reference, totals)

    grad_fn = jax.value_and_grad(loss, has_aux=True)
    accum = int(cfg.train.grad_accum_steps)
    if accum == 1:
        (_, metrics), grads = grad_fn(state.trainable, batch, _step_rngs(state.rng, state.step, 0))
        return grads, metrics

    # Only masks feed the counts: XLA drops the rest of this whole-batch forward as dead code.
    totals = functional.loss_counts(state.trainable, state.frozen, batch, _step_rngs(state.rng, state.step, 0),
                                    cfg, reference)

    def body(carry, xs):
        g_sum, m_sum = carry
        mb, i = xs
        (_, m), g = grad_fn(state.trainable, mb, _step_rngs(state.rng, state.step, i), totals)
        g_sum = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, g_sum, g), grad_shardings)
        return (g_sum, jax.tree.map(jnp.add, m_sum, m)), None

    micro = _microbatches(batch, accum, mesh)
    zeros_g = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.trainable), grad_shardings)
    first = jax.tree.map(lambda x: x[0], micro)
    metric_shapes = jax.eval_shape(
        lambda: grad_fn(state.trainable, first, _step_rngs(state.rng, state.step, 0), totals)[0][1])
    zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes)
    (g_sum, m_sum), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(accum)))
    return g_sum, _accumulate_metrics(m_sum, accum)


def make_train_step(cfg: ml_collections.ConfigDict, mesh: Mesh,
                    state_shardings: TrainState) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The jitted step: `(state, batch) -> (state', metrics)`, `state` donated.

    Args:
      state_shardings: the TrainState of NamedShardings from `state.state_shardings`.
    Returns:
      step function; `batch` is a dict of global arrays [B, ...] sharded per `batch_shardings`;
      metrics are replicated float32 scalars: every loss term of `loss_fn`, `grad_norm`,
      `learning_rate`, `finite` (1 if the update was applied).
    """
    tx = make_optimizer(cfg)
    schedule = learning_rate_fn(cfg)
    replicated = NamedSharding(mesh, PartitionSpec())
    rules = sharding.logical_rules(cfg.mesh)

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with sharding.activation_sharding(mesh, rules):  # the model's activation constraints
            grads, metrics = _grads_and_metrics(cfg, state, batch, mesh, state_shardings.trainable)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        new_state = state.replace(step=state.step + finite.astype(jnp.int32),
                                  trainable=jax.tree.map(keep, trainable, state.trainable),
                                  opt_state=jax.tree.map(keep, opt_state, state.opt_state))
        metrics = {k: v.astype(jnp.float32) for k, v in metrics.items()}
        metrics.update(grad_norm=grad_norm, learning_rate=jnp.asarray(schedule(state.step), jnp.float32),
                       finite=finite.astype(jnp.float32))
        return new_state, metrics

    return jax.jit(train_step, in_shardings=(state_shardings, batch_shardings(cfg, mesh)),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(cfg: ml_collections.ConfigDict, mesh: Mesh,
                   state_shardings: TrainState) -> Callable[[TrainState, dict], dict]:
    """The jitted eval step: loss terms of `loss_fn` on one batch, fixed rngs, no update.

    The KL weight is taken at its post-warm-up value so that eval losses are comparable over a run.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    after_warmup = int(cfg.loss.kl_warmup_steps)
    rules = sharding.logical_rules(cfg.mesh)

    def eval_step(state: TrainState, batch: dict) -> dict:
        rngs = _step_rngs(state.rng, jnp.int32(-1), 0)  # the same noise at every evaluation
        with sharding.activation_sharding(mesh, rules):
            _, metrics = functional.loss_fn(state.trainable, state.frozen, batch, rngs, cfg, after_warmup,
                                            _reference(state))
        return {k: v.astype(jnp.float32) for k, v in metrics.items()}

    return jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings(cfg, mesh)),
                   out_shardings=replicated)
