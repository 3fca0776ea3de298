"""The model's pure-function entry points over (trainable, frozen) param trees.

  init_params(cfg, rng)                                  -> (trainable, frozen), boxed with logical axes
  loss_fn(params, frozen, batch, rngs, cfg, step=0, reference=None, totals=None) -> (loss, metrics); + DPO with a reference
  loss_counts(params, frozen, batch, rngs, cfg, reference=None) -> {term: count}, the `totals` of a batch
  infer(params, frozen, batch, cfg, steps=None)          -> (action_tokens, explanation_tokens)
  split_params(params, cfg) / merge_params(trainable, frozen)   full tree <-> the two groups
  merge_lora(params, cfg)                                -> the full tree with adapters folded in

All are `jax.jit`-able with `cfg` (and `steps`) static. Batches follow `vlacabin_jax.data.spec`.

The split follows `train.trainable` leaf by leaf: the two groups are nested dicts with disjoint
leaves (a module may have its base weights in `frozen` and its LoRA adapters in `trainable`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.data.spec import zeros_batch
from vlacabin_jax.model import dpo, lora
from vlacabin_jax.model import losses
from vlacabin_jax.model.vla_cabin import ANCHOR_KEYS, HEAD_KEYS, VLACabin


def build_model(cfg: ml_collections.ConfigDict) -> VLACabin:
    """The Flax module for a full config (reads `cfg.model`)."""
    return VLACabin(cfg.model)


def is_trainable(path: tuple[str, ...], trainable: str) -> bool:
    """Whether the param at `path` (tuple of dict keys) gets gradients under `train.trainable`."""
    if trainable == "all_and_anchor":
        return True
    if path[0] in ANCHOR_KEYS:
        return False
    if trainable == "all":
        return True
    if trainable == "lora_and_heads":
        return path[0] in HEAD_KEYS or lora.is_adapter(path)
    raise ValueError(f"train.trainable = {trainable!r}: use 'all', 'all_and_anchor' or 'lora_and_heads'")


def _partition(tree: Mapping, keep: Callable[[tuple], bool], prefix: tuple = ()) -> tuple[dict, dict]:
    """Nested dict → (leaves where `keep(path)`, the others); empty branches are left out."""
    yes, no = {}, {}
    for key, value in tree.items():
        path = prefix + (key,)
        if isinstance(value, Mapping):
            a, b = _partition(value, keep, path)
            if a:
                yes[key] = a
            if b:
                no[key] = b
        elif keep(path):
            yes[key] = value
        else:
            no[key] = value
    return yes, no


def split_params(params: Mapping, cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
    """Full param tree (boxed or not) → (trainable, frozen) by `cfg.train.trainable`."""
    mode = cfg.train.trainable
    return _partition(params, lambda path: is_trainable(path, mode))


def merge_params(trainable: Mapping, frozen: Mapping) -> dict:
    """(trainable, frozen) → the full param tree (a deep union; the groups' leaves are disjoint)."""
    out = dict(trainable)
    for key, value in frozen.items():
        out[key] = merge_params(out[key], value) if key in out else value
    return out


def cast_anchor(frozen: Mapping, dtype: Any) -> dict:  # any param group (frozen, or trainable with the anchor)
    """`frozen` with the anchor groups (`vit`, `lm`) cast to `dtype` (boxed leaves stay boxed);
    other frozen params (encoder base weights under LoRA) keep `model.param_dtype`."""
    return {k: jax.tree.map(lambda x: x.astype(dtype), v) if k in ANCHOR_KEYS else v for k, v in frozen.items()}


def merge_lora(params: Mapping, cfg: ml_collections.ConfigDict) -> dict:
    """The full unboxed param tree with every LoRA adapter folded into its base kernel
    (W + alpha / rank · A @ B); a model with `model.lora.rank = 0` gives the same outputs on it."""
    return lora.merge(params, lora.LoRA.from_config(cfg.model).scale)


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

    trainable, frozen = split_params(init(rng), cfg)
    # An anchor that trains (train.trainable = "all_and_anchor") keeps fp32 master weights like
    # every other trainable param; `model.anchor_dtype` is the storage of a frozen anchor.
    return cast_anchor(trainable, jnp.dtype(cfg.model.param_dtype)), frozen


def _train_outputs(params: dict, frozen: dict, batch: dict, rngs: dict, cfg: ml_collections.ConfigDict,
                   pairs: bool) -> dict:
    """`VLACabin.train_outputs` on (params, frozen); the frozen tree gets no gradient."""
    return build_model(cfg).apply(
        {"params": merge_params(params, jax.lax.stop_gradient(frozen))}, batch,
        cfg.loss.t_source_fraction, cfg.loss.t_beta, pairs, rngs=rngs, method=VLACabin.train_outputs)


def loss_fn(params: dict, frozen: dict, batch: dict, rngs: dict, cfg: ml_collections.ConfigDict,
            step=0, reference: dict | None = None,
            totals: dict | None = None) -> tuple[jax.Array, dict]:
    """Training loss with every term separately.

    Args:
      params: trainable params (unboxed); frozen: the other params (`split_params`; unboxed, no
        gradient).
      batch: dict of `spec.batch_spec(cfg, batch)` arrays.
      rngs: {"latent": key, "flow": key}.
      step: scalar training step (KL warm-up).
      reference: the frozen DPO reference ({"dnfm": params}, stage `align`): adds
        `loss.dpo_weight` x the Diffusion-DPO loss on the batch's preference pairs (`dpo.py`).
      totals: None, or when `batch` is one microbatch of a larger batch, `loss_counts` of that
        batch: every masked term is then divided by the batch's count instead of the
        microbatch's, so the microbatches' losses, gradients and metrics add up to the batch's
        (`losses.loss_terms`; `losses.PER_STEP_METRICS` excepted).
    Returns:
      (scalar loss, metrics {name: scalar}).
    """
    pairs = reference is not None
    out = _train_outputs(params, frozen, batch, rngs, cfg, pairs)
    loss, metrics = losses.loss_terms(out, batch, cfg, step, totals)
    if pairs:
        dpo_loss, dpo_metrics = dpo.preference_loss(out, batch, reference, cfg)
        if totals is not None:
            # Each DPO mean is over this microbatch's pairs: n / N makes it sum / the batch's N
            # (n is a count of the batch's `has_pair`, so the gradient scales alike).
            n = dpo_metrics["dpo_pairs"]
            scale = n / jnp.maximum(totals["dpo_pairs"], 1.0)
            dpo_loss = dpo_loss * scale
            dpo_metrics = {k: v if k == "dpo_pairs" else v * scale for k, v in dpo_metrics.items()}
        loss = loss + cfg.loss.dpo_weight * dpo_loss
        metrics = dict(metrics, **dpo_metrics, loss=loss)
    return loss, metrics


def loss_counts(params: dict, frozen: dict, batch: dict, rngs: dict, cfg: ml_collections.ConfigDict,
                reference: dict | None = None) -> dict[str, jax.Array]:
    """How many rows or tokens each masked term of `loss_fn` covers in `batch` ({name: float32
    scalar}; `dpo_pairs` with a reference): the `totals` of its microbatches.

    The counts depend on the batch's masks and the encoders' token masks only, so under `jit`
    XLA drops the rest of this forward pass as dead code.
    """
    out = _train_outputs(params, frozen, batch, rngs, cfg, False)
    counts = losses.loss_counts(out, batch, cfg)
    if reference is not None:
        counts["dpo_pairs"] = batch["has_pair"].astype(jnp.float32).sum()
    return counts


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
