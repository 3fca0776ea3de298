"""MetaQuery bridge: latent tokens + constraint tags + instruction text + learnable queries run
through the frozen LM; the query outputs go through a trainable connector to the variational head
that gives the DNFM source latent z0 [batch, positions, d_action] (`setting_layout.num_positions`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model import layers, setting_layout
from vlacabin_jax.model.encoders import GaussianHead, rms_normalize

Dtype = Any


class BridgeInputs(nn.Module):
    """Builds the LM input sequence before the text: latent, constraint-tag and action-log tokens.

    Latent tokens get a modality-type embedding and a temporal position encoding (their segment
    or slot index); tags are one token each, masked when inactive; the earlier turn's action log
    (`history_actions` / `history_before` of the batch) is one token per executed action, the
    embedding of what was set plus that of the value it replaced, masked at `<pad>`.
    """

    cfg: ml_collections.ConfigDict  # the full `model` config
    num_modalities: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array, modality_ids: jax.Array, slots: jax.Array,
                 tags: jax.Array, history_actions: jax.Array, history_before: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """latents: [b, n, d_latent]; modality_ids, slots: [n] int; tags: [b, n_tags] bool;
        history_actions, history_before: [b, action_len] action ids.

        Returns (latent tokens [b, n, d_lm], tag tokens [b, n_tags, d_lm], action-log tokens
        [b, action_len, d_lm]).
        """
        d_lm = self.cfg.lm.width
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.Dense(d_lm, ("latent", "lm_embed"), use_bias=True, name="latent_proj", **kw)(latents)
        modality = self.param("modality_embedding", layers.logical(nn.initializers.normal(0.02), (None, "lm_embed")),
                              (self.num_modalities, d_lm), self.param_dtype)
        temporal = layers.Dense(d_lm, (None, "lm_embed"), name="temporal_proj", **kw)(
            layers.sinusoidal(slots, 64).astype(self.dtype))
        x = x + modality[modality_ids].astype(self.dtype)[None] + temporal[None]
        tag_table = self.param("tag_embedding", layers.logical(nn.initializers.normal(0.02), (None, "lm_embed")),
                               (self.cfg.bridge.n_constraint_tags, d_lm), self.param_dtype)
        tag_tokens = jnp.broadcast_to(tag_table.astype(self.dtype), (tags.shape[0],) + tag_table.shape)
        log_kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                      embedding_init=layers.logical(nn.initializers.normal(0.02), ("vocab", "lm_embed")))
        done = nn.Embed(self.cfg.dnfm.vocab_size, d_lm, name="history_action_embedding", **log_kw)(history_actions)
        undo = nn.Embed(self.cfg.dnfm.vocab_size, d_lm, name="history_before_embedding", **log_kw)(history_before)
        order = layers.Dense(d_lm, (None, "lm_embed"), name="history_order_proj", **kw)(
            layers.sinusoidal(jnp.arange(history_actions.shape[1]), 64).astype(self.dtype))
        return x, tag_tokens, done + undo + order[None]


class Queries(nn.Module):
    """The `n_queries` learnable MetaQuery tokens [n_queries, d_lm]."""

    cfg: ml_collections.ConfigDict
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, batch_size: int, dtype: Dtype) -> jax.Array:
        q = self.param("queries", layers.logical(nn.initializers.normal(0.02), (None, "lm_embed")),
                       (self.cfg.bridge.n_queries, self.cfg.lm.width), self.param_dtype)
        return jnp.broadcast_to(q.astype(dtype), (batch_size,) + q.shape)


class Connector(nn.Module):
    """Trainable transformer over the LM's outputs, then the variational head.

    With `bridge.connector_reads = "queries"` it sees the query positions only (MetaQuery); with
    "all" it attends over every valid LM position and keeps its outputs at the query positions.
    Returns (context [b, n_queries, width] for the explanation head,
             z0 mean and logvar [b, positions, d_action] (one per DNFM position),
             memory [b, l, width]: the normalised outputs at every position it read, for the
             DNFM's cross-attention).
    """

    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden: jax.Array, mask: jax.Array, inputs: jax.Array):
        """hidden: [b, l, d_lm] LM outputs ending with the n_queries query positions; mask: [b, l];
        inputs: [b, l, d_lm] the LM's inputs at those positions (read with `bridge.connector_skip`)."""
        c = self.cfg.bridge.connector
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = layers.Dense(c.width, ("lm_embed", "embed"), use_bias=True, name="proj", **kw)(hidden)
        if self.cfg.bridge.connector_skip:
            # Around a frozen LM: each position's own input, RMS-normalised (the token embeddings
            # are ~0.02, the latents ~1), so a random anchor's mixing cannot bury it.
            x = x + layers.Dense(c.width, ("lm_embed", "embed"), name="skip_proj", **kw)(
                rms_normalize(inputs).astype(self.dtype))
        x = layers.LayerStack(
            layers.EncoderBlock, c.depth, scan=self.cfg.scan_layers, remat=self.cfg.remat and self.cfg.remat_policy,
            block_kwargs=dict(num_heads=c.heads, head_dim=c.width // c.heads, mlp_dim=c.mlp_dim,
                              attention_impl=self.cfg.attention_impl or None, **kw),
            name="encoder")(x, layers.attention_mask(None, mask, causal=False))
        memory = layers.LayerNorm(name="ln", **kw)(x)
        context = memory[:, -self.cfg.bridge.n_queries:]
        # The queries map to the action positions through a learned mix over the query axis,
        # so n_queries and the DNFM's positions can differ.
        positions = setting_layout.num_positions(self.cfg)
        mix = self.param("query_to_action", layers.logical(nn.initializers.normal(1.0 / self.cfg.bridge.n_queries ** 0.5),
                                                           (None, None)),
                         (self.cfg.bridge.n_queries, positions), self.param_dtype)
        slots = jnp.einsum("bqw,qa->baw", context, mix.astype(self.dtype))
        slots = slots + self.param("action_slot_embedding", layers.logical(nn.initializers.normal(0.02), (None, "embed")),
                                   (positions, c.width), self.param_dtype).astype(self.dtype)
        mean, logvar = GaussianHead(self.cfg.dnfm.d_action, logvar_init=self.cfg.latent.init_logvar, name="z0", **kw)(slots)
        return context, mean, logvar, memory
