"""Training losses of VLA-Cabin, every term returned separately.

Each term is a masked mean over the samples (or tokens) it applies to: a missing modality, a
sample without an action target or without an explanation contributes nothing (no zero-filling).

Every masked term is first a `Part`, (sum over the rows or tokens it covers, their count), so
that gradient accumulation can divide the sums of all microbatches by the count of the whole
batch (`loss_terms(..., totals=...)`, `train/step.py`): a mean of per-microbatch means is not the
batch's mean when the masks differ between microbatches.

    loss_parts(out, batch, cfg)                -> {term: (sum, count)}
    loss_terms(out, batch, cfg, step, totals)  -> (loss, metrics)
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.data.actions import EOS_ID, PAD_ID
from vlacabin_jax.data.spec import MODALITIES
from vlacabin_jax.model import setting_layout

# (sum over the rows/tokens a term covers, their count): float32 scalars.
Part = tuple[jax.Array, jax.Array]

# Metrics that do not depend on the batch (the step's KL weight, a statistic of the params): the
# same in every microbatch, so accumulation averages them where it sums every other metric.
PER_STEP_METRICS = ("kl_scale", "codebook_min_distance")


def masked_sum(values: jax.Array, mask: jax.Array) -> Part:
    """(Σ values where `mask` holds, how many hold), `mask` broadcast to `values`' shape; a float
    `mask` weighs each value (Σ w·values, Σ w)."""
    mask = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
    return (values * mask).sum(), mask.sum()


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask` (same shape, broadcastable) holds; 0 when nothing does."""
    return part_mean(masked_sum(values, mask))


def part_mean(part: Part, total: jax.Array | None = None) -> jax.Array:
    """sum / count, or sum / `total` (the count over the whole batch when `part` is one
    microbatch's); 0 when the count is 0."""
    value, count = part
    return value / jnp.maximum(count if total is None else total, 1.0)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Per-position cross-entropy: logits [..., vocab] float, labels [...] int → [...].

    The label's logit is picked with an iota compare rather than `take_along_axis`: the backward
    is then softmax minus a one-hot, one elementwise fusion, where a gather's is a scatter-add
    into a zero [..., vocab] buffer plus a transposing copy (4.7 ms of tiny's 80 ms step on CPU).
    """
    logits = logits.astype(jnp.float32)
    is_label = labels[..., None] == jnp.arange(logits.shape[-1], dtype=labels.dtype)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(is_label, logits, 0.0), axis=-1)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over the last axis."""
    return 0.5 * jnp.sum(jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar, axis=-1)


def infonce_sum(pooled: jax.Array, present: jax.Array, temperature: float) -> Part:
    """Symmetric InfoNCE between every pair of modalities, only over samples having both.

    The negatives of a row are the other rows of the same call, so under gradient accumulation
    they are the rows of its microbatch.

    Args:
      pooled: [batch, n_modalities, d] pooled latent means; present: [batch, n_modalities] bool.
    Returns:
      (loss summed over all valid (sample, pair, direction) rows, number of such rows).
    """
    # rsqrt of a clamped square norm: an absent modality pools to exactly zero, where the
    # gradient of `linalg.norm` is NaN even behind a `where`.
    z = pooled * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(pooled), -1, keepdims=True), 1e-12))
    total, count = 0.0, 0.0
    neg = jnp.finfo(jnp.float32).min
    for i, j in itertools.combinations(range(pooled.shape[1]), 2):
        logits = z[:, i] @ z[:, j].T / temperature  # [b, b]
        rows = present[:, i] & present[:, j]
        for lg, cols in ((logits, present[:, j]), (logits.T, present[:, i])):
            # Negatives only among samples that have the other modality.
            lg = jnp.where(cols[None, :], lg, neg)
            ce = -jnp.diagonal(jax.nn.log_softmax(lg, axis=-1))
            total = total + jnp.sum(jnp.where(rows, ce, 0.0))
            count = count + rows.sum()
    return jnp.asarray(total, jnp.float32), jnp.asarray(count, jnp.float32)


def infonce(pooled: jax.Array, present: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """(`infonce_sum`'s mean over its rows, the number of rows)."""
    part = infonce_sum(pooled, present, temperature)
    return part_mean(part), part[1]


def loss_parts(out: dict, batch: dict, cfg: ml_collections.ConfigDict) -> dict[str, Part]:
    """Every masked term and accuracy of `VLACabin.train_outputs` as (sum, count).

    Args:
      out: model outputs; batch: the batch dict; cfg: the full config (`loss`, `model`).
    Returns:
      {name: (sum, count)}; `path_ce`, `path_velocity` and `path_gap` make up the `path` term.
    """
    lc, mc = cfg.loss, cfg.model
    present = batch["modality_mask"]
    idx = {m: i for i, m in enumerate(MODALITIES)}
    has_actions = batch["has_actions"]
    parts = {}

    # --- multimodal VAE
    parts["kl_latent"] = masked_sum(gaussian_kl(out["latent_mean"], out["latent_logvar"]), out["latent_mask"])
    parts["kl_z0"] = masked_sum(gaussian_kl(out["z0_mean"], out["z0_logvar"]).mean(-1), has_actions)
    parts["infonce"] = infonce_sum(out["pooled"], out["latent_present"], lc.infonce_temperature)

    recon = out["recon"]
    has_state, has_speech, has_video = (present[:, idx[m]] for m in ("state", "speech", "video"))
    parts["recon_state_numeric"] = masked_sum(
        jnp.square(recon["state_numeric"] - batch["state_numeric"]).mean(-1), has_state)
    sizes = tuple(mc.state.categorical_sizes)
    splits = [sum(sizes[:k]) for k in range(1, len(sizes))]
    cat_ce = jnp.stack([cross_entropy(lg, batch["state_categorical"][:, f])
                        for f, lg in enumerate(jnp.split(recon["state_categorical"], splits, axis=-1))], -1)
    parts["recon_state_categorical"] = masked_sum(cat_ce.mean(-1), has_state)
    mel_w = batch["mel_mask"].astype(jnp.float32)[..., None]
    mel_target = (batch["mel"] * mel_w).sum(1) / jnp.maximum(mel_w.sum(1), 1.0)
    parts["recon_mel"] = masked_sum(jnp.square(recon["mel"] - mel_target).mean(-1), has_speech)
    parts["recon_visual"] = masked_sum(jnp.square(recon["visual"] - out["visual_target"]).mean(-1), has_video)

    # --- DNFM (its targets: the sequence, or one per setting under `model.dnfm.layout`)
    tokens = setting_layout.dnfm_targets(batch["action_tokens"], mc)
    position_weights = dnfm_position_weights(tokens, has_actions, mc.dnfm.layout, lc.keep_weight)
    parts["velocity"] = masked_sum(jnp.square(out["velocity"] - out["velocity_target"]).mean(-1), position_weights)
    parts["endpoint_ce"] = masked_sum(cross_entropy(out["endpoint_logits"], tokens), position_weights)
    parts["source_ce"] = masked_sum(cross_entropy(out["source_logits"], tokens), position_weights)
    # The velocity error on the model's own path, scaled by the time left: (1 - t')·(v' - v'*) is
    # the error of the endpoint it implies. Unscaled, the target (x1 - x')/(1 - t') explodes as t'
    # nears 1 (path terms of 7e3 and grad norms of 1.6e4 seen at step 13 of a tiny run), and the
    # clipped update of such a step is spent on that one term.
    remaining = (1.0 - out["t_next"])[:, None, None]
    path_velocity = jnp.square(remaining * (out["velocity_next"] - out["velocity_next_target"])).mean(-1)
    parts["path_ce"] = masked_sum(cross_entropy(out["path_logits"], tokens), position_weights)
    parts["path_velocity"] = masked_sum(path_velocity, position_weights)
    parts["path_gap"] = masked_sum(out["path_endpoint_gap"], has_actions)

    # --- explanation
    expl_targets = batch["explanation_tokens"][:, 1:]
    expl_mask = batch["explanation_mask"][:, 1:]
    parts["explanation_ce"] = masked_sum(cross_entropy(out["explanation_logits"], expl_targets), expl_mask)

    def hits(logits, labels):
        return (jnp.argmax(logits, -1) == labels).astype(jnp.float32)

    parts["endpoint_acc"] = masked_sum(hits(out["endpoint_logits"], tokens), has_actions[:, None])
    parts["source_acc"] = masked_sum(hits(out["source_logits"], tokens), has_actions[:, None])
    parts["path_acc"] = masked_sum(hits(out["path_logits"], tokens), has_actions[:, None])
    parts["explanation_acc"] = masked_sum(hits(out["explanation_logits"], expl_targets), expl_mask)
    parts["endpoint_action_acc"], parts["endpoint_sequence_acc"] = action_accuracy_parts(
        out["endpoint_logits"], tokens, has_actions)
    # The autoregressive action head (model.action_head; the ladder's baseline), teacher-forced.
    if "ar_logits" in out:
        sequence, every_sample = batch["action_tokens"], has_actions[:, None]
        parts["ar_ce"] = masked_sum(cross_entropy(out["ar_logits"], sequence), every_sample)
        parts["ar_action_acc"], parts["ar_sequence_acc"] = action_accuracy_parts(
            out["ar_logits"], sequence, has_actions)
    return parts


def dnfm_position_weights(targets: jax.Array, has_actions: jax.Array, layout: str, keep_weight: float
                          ) -> jax.Array:
    """Weight of each DNFM position in its terms: [b, positions] float32.

    Rows without an action target weigh 0. Under the "per_setting" layout most positions are
    "keep" (`<pad>`) in any answer; averaged at full weight they teach the model to change
    nothing, so they weigh `keep_weight` and the changed settings 1.

    Args:
      targets: [b, positions] the DNFM's token targets; has_actions: [b] bool.
    """
    rows = has_actions[:, None].astype(jnp.float32)
    if layout != "per_setting":
        return jnp.broadcast_to(rows, targets.shape)
    return rows * jnp.where(targets == PAD_ID, keep_weight, 1.0)


def loss_terms(out: dict, batch: dict, cfg: ml_collections.ConfigDict, step,
               totals: dict[str, jax.Array] | None = None) -> tuple[jax.Array, dict]:
    """Weighted total and every term from `VLACabin.train_outputs`.

    Args:
      out: model outputs; batch: the batch dict; cfg: the full config (`loss`, `model`).
      step: training step (scalar), for the KL warm-up.
      totals: None for a whole batch; for one microbatch of a batch, the counts of
        `loss_parts` over the whole batch ({name: count}). Each term is then this microbatch's
        sum / the batch's count, so that the losses, gradients and metrics of the microbatches
        add up to the whole batch's (`infonce_rows`: this microbatch's rows, which add up too;
        `PER_STEP_METRICS` are the same in every microbatch and do not add up).
    Returns:
      (scalar loss, {name: scalar} metrics with each term and accuracies).
    """
    lc = cfg.loss
    parts = loss_parts(out, batch, cfg)
    terms = {name: part_mean(part, None if totals is None else totals[name]) for name, part in parts.items()}
    kl_scale = lc.kl_weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(lc.kl_warmup_steps, 1))
    recon_loss = (terms["recon_state_numeric"] + terms["recon_state_categorical"] + terms["recon_mel"]
                  + terms["recon_visual"])
    path = terms.pop("path_ce") + terms.pop("path_velocity") + terms.pop("path_gap")
    ar = terms.get("ar_ce", 0.0)

    loss = (lc.autoregressive_weight * ar + kl_scale * (terms["kl_latent"] + terms["kl_z0"])
            + lc.infonce_weight * terms["infonce"] + lc.recon_weight * recon_loss
            + lc.velocity_weight * terms["velocity"] + lc.endpoint_weight * terms["endpoint_ce"]
            + lc.source_weight * terms["source_ce"] + lc.path_weight * path
            + lc.explanation_weight * terms["explanation_ce"])
    metrics = dict(terms, loss=loss, kl_scale=kl_scale, path=path, infonce_rows=parts["infonce"][1],
                   codebook_min_distance=min_pairwise_distance(out["codebook"]))
    return loss, metrics


def loss_counts(out: dict, batch: dict, cfg: ml_collections.ConfigDict) -> dict[str, jax.Array]:
    """{name: count} of every `loss_parts` term: the `totals` of `loss_terms`."""
    return {name: count for name, (_, count) in loss_parts(out, batch, cfg).items()}


def action_accuracy_parts(logits: jax.Array, tokens: jax.Array, has_actions: jax.Array) -> tuple[Part, Part]:
    """(accuracy on action tokens proper, fraction of sequences entirely right) as (sum, count).

    Most positions are <pad>, so per-token accuracy flatters a model that emits nothing; these
    count what matters. <noop> is an action token here; <pad>/<eos> count only in whole sequences.

    Args:
      logits: [batch, action_len, vocab]; tokens: [batch, action_len] targets; has_actions: [batch].
    """
    hit = jnp.argmax(logits, -1) == tokens
    content = has_actions[:, None] & (tokens > EOS_ID)
    return (masked_sum(hit.astype(jnp.float32), content),
            masked_sum(hit.all(-1).astype(jnp.float32), has_actions))


def action_accuracies(logits: jax.Array, tokens: jax.Array, has_actions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`action_accuracy_parts` as means: (action-token accuracy, sequence accuracy)."""
    action, sequence = action_accuracy_parts(logits, tokens, has_actions)
    return part_mean(action), part_mean(sequence)


def min_pairwise_distance(codebook: jax.Array) -> jax.Array:
    """Smallest Euclidean distance between two distinct rows of [vocab, d] (collapse monitor)."""
    sq = jnp.sum(codebook * codebook, -1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * codebook @ codebook.T
    d2 = jnp.where(jnp.eye(codebook.shape[0], dtype=bool), jnp.inf, d2)
    return jnp.sqrt(jnp.maximum(jnp.min(d2), 0.0))
