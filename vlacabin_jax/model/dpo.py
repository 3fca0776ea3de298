"""Diffusion-DPO on the DNFM flow-matching errors (the `align` stage, DESIGN §3).

Wallace et al.'s Diffusion-DPO compares, for a preferred (w) and a dispreferred (l) sample drawn
at the same noise and time, how much better the policy denoises than a frozen reference. On the
noise-free DNFM path the "noise" is the source latent z0 and the denoising error is the velocity
error, so for one context, one z0 and one t:

    err(θ, y) = Σ_positions mean_d ( v_θ((1 - t) z0 + t E_θ[y], t) - (E_θ[y] - z0) )²
    margin    = -β [ (err(θ, w) - err(ref, w)) - (err(θ, l) - err(ref, l)) ]
    loss      = -log σ(margin)

The implicit reward of a side is r(y) = -β (err(θ, y) - err(ref, y)), the margin is r(w) - r(l),
and the reward accuracy is the share of pairs with a positive margin. At θ = ref the loss is log 2.
z0 is the policy's variational sample (where its sampler starts); the gradient reaches it through
the policy's errors only, the reference sees it as a constant.

    sequence_velocity_error(velocity, z0, x1)            -> [b] per-sequence error
    dpo_terms(policy_w, policy_l, ref_w, ref_l, beta, m) -> (loss, metrics)
    reference_errors(reference, cfg, z0, t, w, l)        -> ([b], [b]) errors of the frozen copy
    REFERENCE_KEYS                                       -> the param groups the reference keeps
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model import setting_layout
from vlacabin_jax.model.dnfm import DNFM

# The reference needs only the DNFM (codebook and velocity network): z0 and t are shared with the
# policy, so the frozen copy of the encoders and the bridge would never be read.
REFERENCE_KEYS = ("dnfm",)


def sequence_velocity_error(velocity: jax.Array, z0: jax.Array, x1: jax.Array) -> jax.Array:
    """Velocity error of whole sequences, summed over positions, mean over the action width.

    Args:
      velocity: [b, l, d] predicted v(x_t, t); z0, x1: [b, l, d] source and target codebook vectors.
    Returns:
      [b] float32. Summed over positions so every action token weighs the same whatever the
      sequence length (both sides have the same DNFM positions, padding / keep included).
    """
    err = jnp.square(velocity.astype(jnp.float32) - (x1 - z0).astype(jnp.float32))
    return err.mean(-1).sum(-1)


def dpo_terms(policy_w: jax.Array, policy_l: jax.Array, ref_w: jax.Array, ref_l: jax.Array,
              beta: float, mask: jax.Array) -> tuple[jax.Array, dict]:
    """The Diffusion-DPO loss from the four per-sequence errors.

    Args:
      policy_w, policy_l, ref_w, ref_l: [b] velocity errors of the chosen (w) and rejected (l)
        sequence under the policy and the reference (same context, z0 and t for all four).
      beta: the DPO temperature (> 0); larger keeps the policy closer to the reference.
      mask: [b] bool, the rows that are preference pairs.
    Returns:
      (scalar loss, {"dpo_loss", "dpo_margin", "dpo_accuracy", "dpo_reward_chosen",
      "dpo_reward_rejected", "dpo_pairs"}), each a masked mean over the pairs (pairs: their count).
    """
    reward_w = -beta * (policy_w - jax.lax.stop_gradient(ref_w))
    reward_l = -beta * (policy_l - jax.lax.stop_gradient(ref_l))
    margin = reward_w - reward_l
    m = mask.astype(jnp.float32)
    n = jnp.maximum(m.sum(), 1.0)
    mean = lambda x: (x * m).sum() / n  # noqa: E731
    # softplus(-x) = -log σ(x), stable for large |x|.
    loss = mean(jax.nn.softplus(-margin))
    metrics = {"dpo_loss": loss, "dpo_margin": mean(margin),
               "dpo_accuracy": mean((margin > 0).astype(jnp.float32)),
               "dpo_reward_chosen": mean(reward_w), "dpo_reward_rejected": mean(reward_l),
               "dpo_pairs": m.sum()}
    return loss, metrics


def reference_errors(reference: dict, cfg: ml_collections.ConfigDict, z0: jax.Array, t: jax.Array,
                     chosen: jax.Array, rejected: jax.Array, memory: jax.Array | None = None,
                     memory_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-sequence velocity errors of the frozen reference DNFM on both sides of each pair.

    Args:
      reference: {"dnfm": params} (the frozen copy, `REFERENCE_KEYS`).
      cfg: the full config (`model` is read).
      z0: [b, l, d] the policy's source sample (treated as a constant); t: [b] times.
      chosen, rejected: [b, action_len] action token ids (mapped to the DNFM's positions under
        `model.dnfm.layout`).
      memory, memory_mask: [b, m, w], [b, m] the policy's connector outputs (a constant), which
        the DNFM's cross-attention reads (`model.dnfm.cross_attention`; None otherwise).
    Returns:
      (err_chosen [b], err_rejected [b]), no gradient.
    """
    m = cfg.model
    module = DNFM(m, dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))
    variables = {"params": jax.lax.stop_gradient(reference["dnfm"])}
    codebook = module.apply(variables, method=DNFM.codebook)
    z0, memory = jax.lax.stop_gradient((z0, memory))
    tb = t[:, None, None]
    errors = []
    for tokens in (chosen, rejected):
        x1 = codebook[setting_layout.dnfm_targets(tokens, m)]
        v = module.apply(variables, (1.0 - tb) * z0 + tb * x1, t, memory, memory_mask)
        errors.append(sequence_velocity_error(v, z0, x1))
    return errors[0], errors[1]


def preference_loss(out: dict, batch: dict, reference: dict, cfg: ml_collections.ConfigDict
                    ) -> tuple[jax.Array, dict]:
    """The DPO loss of a batch from `VLACabin.train_outputs(..., with_rejected=True)`.

    The policy's chosen side is the ordinary training path (`action_tokens`, z0, t); its rejected
    side starts from the same z0 and t. Rows without `has_pair` contribute nothing.
    """
    policy_w = sequence_velocity_error(out["velocity"], out["z0"], out["x1"])
    policy_l = sequence_velocity_error(out["velocity_rejected"], out["z0"], out["x1_rejected"])
    ref_w, ref_l = reference_errors(reference, cfg, out["z0"], out["t"], batch["action_tokens"],
                                    batch["rejected_tokens"], out["memory"], out["memory_mask"])
    return dpo_terms(policy_w, policy_l, ref_w, ref_l, float(cfg.loss.dpo_beta), batch["has_pair"])
