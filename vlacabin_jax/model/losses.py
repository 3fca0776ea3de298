"""Training losses of VLA-Cabin, every term returned separately.

Each term is a masked mean over the samples (or tokens) it applies to: a missing modality, a
sample without an action target or without an explanation contributes nothing (no zero-filling).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.data.actions import EOS_ID
from vlacabin_jax.data.spec import MODALITIES


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` where `mask` (same shape, broadcastable) holds; 0 when nothing does."""
    mask = jnp.broadcast_to(mask, values.shape).astype(jnp.float32)
    return (values * mask).sum() / jnp.maximum(mask.sum(), 1.0)


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


def infonce(pooled: jax.Array, present: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE between every pair of modalities, only over samples having both.

    Args:
      pooled: [batch, n_modalities, d] pooled latent means; present: [batch, n_modalities] bool.
    Returns:
      (loss averaged over all valid (sample, pair, direction) rows, number of such rows).
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
    return total / jnp.maximum(count, 1.0), count


def loss_terms(out: dict, batch: dict, cfg: ml_collections.ConfigDict, step) -> tuple[jax.Array, dict]:
    """Weighted total and every term from `VLACabin.train_outputs`.

    Args:
      out: model outputs; batch: the batch dict; cfg: the full config (`loss`, `model`).
      step: training step (scalar), for the KL warm-up.
    Returns:
      (scalar loss, {name: scalar} metrics with each term and accuracies).
    """
    lc, mc = cfg.loss, cfg.model
    present = batch["modality_mask"]
    idx = {m: i for i, m in enumerate(MODALITIES)}

    # --- multimodal VAE
    kl_latent = masked_mean(gaussian_kl(out["latent_mean"], out["latent_logvar"]), out["latent_mask"])
    has_actions = batch["has_actions"]
    kl_z0 = masked_mean(gaussian_kl(out["z0_mean"], out["z0_logvar"]).mean(-1), has_actions)
    kl_scale = lc.kl_weight * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / max(lc.kl_warmup_steps, 1))
    nce, nce_rows = infonce(out["pooled"], out["latent_present"], lc.infonce_temperature)

    recon = out["recon"]
    has_state, has_speech, has_video = (present[:, idx[m]] for m in ("state", "speech", "video"))
    rec_num = masked_mean(jnp.square(recon["state_numeric"] - batch["state_numeric"]).mean(-1), has_state)
    sizes = tuple(mc.state.categorical_sizes)
    splits = [sum(sizes[:k]) for k in range(1, len(sizes))]
    cat_ce = jnp.stack([cross_entropy(lg, batch["state_categorical"][:, f])
                        for f, lg in enumerate(jnp.split(recon["state_categorical"], splits, axis=-1))], -1)
    rec_cat = masked_mean(cat_ce.mean(-1), has_state)
    mel_w = batch["mel_mask"].astype(jnp.float32)[..., None]
    mel_target = (batch["mel"] * mel_w).sum(1) / jnp.maximum(mel_w.sum(1), 1.0)
    rec_mel = masked_mean(jnp.square(recon["mel"] - mel_target).mean(-1), has_speech)
    rec_vis = masked_mean(jnp.square(recon["visual"] - out["visual_target"]).mean(-1), has_video)
    recon_loss = rec_num + rec_cat + rec_mel + rec_vis

    # --- DNFM
    tokens = batch["action_tokens"]
    per_sample = has_actions[:, None]
    velocity = masked_mean(jnp.square(out["velocity"] - out["velocity_target"]).mean(-1), per_sample)
    endpoint = masked_mean(cross_entropy(out["endpoint_logits"], tokens), per_sample)
    source = masked_mean(cross_entropy(out["source_logits"], tokens), per_sample)
    # The velocity error on the model's own path, scaled by the time left: (1 - t')·(v' - v'*) is
    # the error of the endpoint it implies. Unscaled, the target (x1 - x')/(1 - t') explodes as t'
    # nears 1 (path terms of 7e3 and grad norms of 1.6e4 seen at step 13 of a tiny run), and the
    # clipped update of such a step is spent on that one term.
    remaining = (1.0 - out["t_next"])[:, None, None]
    path_velocity = jnp.square(remaining * (out["velocity_next"] - out["velocity_next_target"])).mean(-1)
    path = (masked_mean(cross_entropy(out["path_logits"], tokens), per_sample)
            + masked_mean(path_velocity, per_sample)
            + masked_mean(out["path_endpoint_gap"], has_actions))

    # --- explanation
    expl_targets = batch["explanation_tokens"][:, 1:]
    expl_mask = batch["explanation_mask"][:, 1:]
    explanation = masked_mean(cross_entropy(out["explanation_logits"], expl_targets), expl_mask)

    # The autoregressive action head (model.action_head; the ladder's baseline), teacher-forced.
    ar = masked_mean(cross_entropy(out["ar_logits"], tokens), per_sample) if "ar_logits" in out else 0.0

    loss = (lc.autoregressive_weight * ar + kl_scale * (kl_latent + kl_z0) + lc.infonce_weight * nce + lc.recon_weight * recon_loss
            + lc.velocity_weight * velocity + lc.endpoint_weight * endpoint + lc.source_weight * source
            + lc.path_weight * path + lc.explanation_weight * explanation)

    def acc(logits, labels, mask):
        return masked_mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), mask)


    metrics = {
        "loss": loss, "kl_latent": kl_latent, "kl_z0": kl_z0, "kl_scale": kl_scale,
        "infonce": nce, "infonce_rows": nce_rows,
        "recon_state_numeric": rec_num, "recon_state_categorical": rec_cat,
        "recon_mel": rec_mel, "recon_visual": rec_vis,
        "velocity": velocity, "endpoint_ce": endpoint, "source_ce": source, "path": path,
        "explanation_ce": explanation,
        "endpoint_acc": acc(out["endpoint_logits"], tokens, per_sample),
        "source_acc": acc(out["source_logits"], tokens, per_sample),
        "path_acc": acc(out["path_logits"], tokens, per_sample),
        "explanation_acc": acc(out["explanation_logits"], expl_targets, expl_mask),
        "codebook_min_distance": min_pairwise_distance(out["codebook"]),
    }
    if "ar_logits" in out:
        metrics.update(zip(("ar_ce", "ar_action_acc", "ar_sequence_acc"),
                           (ar,) + action_accuracies(out["ar_logits"], tokens, has_actions)))
    metrics.update(zip(("endpoint_action_acc", "endpoint_sequence_acc"),
                       action_accuracies(out["endpoint_logits"], tokens, has_actions)))
    return loss, metrics


def action_accuracies(logits: jax.Array, tokens: jax.Array, has_actions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(accuracy on action tokens proper, fraction of sequences entirely right).

    Most positions are <pad>, so per-token accuracy flatters a model that emits nothing; these
    count what matters. <noop> is an action token here; <pad>/<eos> count only in whole sequences.

    Args:
      logits: [batch, action_len, vocab]; tokens: [batch, action_len] targets; has_actions: [batch].
    """
    hit = jnp.argmax(logits, -1) == tokens
    content = has_actions[:, None] & (tokens > EOS_ID)
    return (masked_mean(hit.astype(jnp.float32), content),
            masked_mean(hit.all(-1).astype(jnp.float32), has_actions))


def min_pairwise_distance(codebook: jax.Array) -> jax.Array:
    """Smallest Euclidean distance between two distinct rows of [vocab, d] (collapse monitor)."""
    sq = jnp.sum(codebook * codebook, -1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * codebook @ codebook.T
    d2 = jnp.where(jnp.eye(codebook.shape[0], dtype=bool), jnp.inf, d2)
    return jnp.sqrt(jnp.maximum(jnp.min(d2), 0.0))
