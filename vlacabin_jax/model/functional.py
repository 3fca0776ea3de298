"""The model's pure-function entry points over (trainable, frozen) param trees.

  init_params(cfg, rng)                                  -> (trainable, frozen), boxed with logical axes
  loss_fn(params, frozen, batch, rngs, cfg, step=0)      -> (loss, metrics)
  infer(params, frozen, batch, cfg, steps=None)          -> (action_tokens, explanation_tokens)

All are `jax.jit`-able with `cfg` (and `steps`) static. Batches follow `vlacabin_jax.data.spec`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.data.spec import zeros_batch
from vlacabin_jax.model.losses import loss_terms
from vlacabin_jax.model.vla_cabin import FROZEN_KEYS, VLACabin


def build_model(cfg: ml_collections.ConfigDict) -> VLACabin:
    """The Flax module for a full config (reads `cfg.model`)."""
    return VLACabin(cfg.model)


def split_params(params: dict) -> tuple[dict, dict]:
    """Full param tree → (trainable, frozen anchor)."""
    trainable = {k: v for k, v in params.items() if k not in FROZEN_KEYS}
    frozen = {k: v for k, v in params.items() if k in FROZEN_KEYS}
    return trainable, frozen


def merge_params(trainable: dict, frozen: dict) -> dict:
    return {**trainable, **frozen}


def init_params(cfg: ml_collections.ConfigDict, rng: jax.Array, batch_size: int = 1) -> tuple[dict, dict]:
    """Initialise all params (boxed `nn.LogicallyPartitioned` leaves carrying logical axes).

    Wrap in `jax.eval_shape` for shapes without allocation, or in a jit with out_shardings to
    create them sharded.
    """
    batch = jax.tree.map(jnp.asarray, zeros_batch(cfg, batch_size))

    @jax.jit
    def init(rng):
        names = ("params", "latent", "flow")
        rngs = dict(zip(names, jax.random.split(rng, len(names))))
        return build_model(cfg).init(rngs, batch)["params"]

    return split_params(init(rng))


def loss_fn(params: dict, frozen: dict, batch: dict, rngs: dict, cfg: ml_collections.ConfigDict,
            step=0) -> tuple[jax.Array, dict]:
    """Training loss with every term separately.

    Args:
      params: trainable params (unboxed); frozen: the anchor params (unboxed, no gradient).
      batch: dict of `spec.batch_spec(cfg, batch)` arrays.
      rngs: {"latent": key, "flow": key}.
      step: scalar training step (KL warm-up).
    Returns:
      (scalar loss, metrics {name: scalar}).
    """
    out = build_model(cfg).apply(
        {"params": merge_params(params, jax.lax.stop_gradient(frozen))}, batch,
        cfg.loss.t_source_fraction, cfg.loss.t_beta, rngs=rngs, method=VLACabin.train_outputs)
    return loss_terms(out, batch, cfg, step)


def infer(params: dict, frozen: dict, batch: dict, cfg: ml_collections.ConfigDict,
          steps: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Greedy inference: (action tokens [batch, action_len], explanation tokens [batch, explain_len]).

    `steps` is the Euler step count K of the DNFM sampler (default `cfg.model.dnfm.sample_steps`).
    """
    k = cfg.model.dnfm.sample_steps if steps is None else steps
    if not 1 <= k <= 8:
        raise ValueError(f"DNFM sampler steps must be in 1..8, got {k}")
    return build_model(cfg).apply({"params": merge_params(params, frozen)}, batch, k, method=VLACabin.infer)


def param_count(tree: dict) -> int:
    """Number of scalars in a (possibly boxed or abstract) param tree."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nn.unbox(tree)))
