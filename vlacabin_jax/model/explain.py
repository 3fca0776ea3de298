"""Explanation head: a small causal decoder that cross-attends to the connector outputs and writes
the spoken-style explanation (teacher forcing in training, greedy decoding in inference)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model import layers

Dtype = Any


class DecoderBlock(nn.Module):
    """Pre-LN block: causal self-attention, cross-attention to the context, GELU MLP."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, self_mask: jax.Array, context: jax.Array,
                 context_mask: jax.Array | None = None) -> tuple[jax.Array, None]:
        """x: [b, l, w]; self_mask: [b, 1, l, l]; context: [b, n, w]; context_mask: [b, 1, 1, n] or None."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(qkv_bias=True, out_bias=True, implementation=self.attention_impl, **kw)
        h = layers.LayerNorm(name="ln_self", **kw)(x)
        x = x + layers.Attention(self.num_heads, self.head_dim, name="self_attn", **attn)(h, self_mask)
        h = layers.LayerNorm(name="ln_cross", **kw)(x)
        x = x + layers.Attention(self.num_heads, self.head_dim, name="cross_attn", **attn)(h, context_mask, context=context)
        h = layers.LayerNorm(name="ln_mlp", **kw)(x)
        return x + layers.Mlp(self.mlp_dim, "gelu", name="mlp", **kw)(h), None


class ExplanationHead(nn.Module):
    """Causal decoder over the text vocabulary.

    `__call__(tokens [b, l] int32, context [b, n, w], context_mask [b, n] or None) -> logits
    [b, l, vocab]` (float32); position i predicts token i + 1. Output projection tied to the token
    embedding. (Also the autoregressive action head, `ar_head.py`, over the action vocabulary.)
    """

    cfg: ml_collections.ConfigDict  # the full `model` config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, context: jax.Array, context_mask: jax.Array | None = None) -> jax.Array:
        e = self.cfg.explain
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = nn.Embed(e.vocab_size, e.width, name="token_embedding", **kw,
                         embedding_init=layers.logical(nn.initializers.normal(0.02), ("vocab", "embed")))
        position = self.param("position_embedding", layers.logical(nn.initializers.normal(0.02), (None, "embed")),
                              (self.cfg.explain_len, e.width), self.param_dtype)
        x = embed(tokens) + position[: tokens.shape[1]].astype(self.dtype)[None]
        ctx = layers.Dense(e.width, ("embed", "embed_out"), use_bias=True, name="context_proj", **kw)(context)
        valid = jnp.ones(tokens.shape, jnp.bool_)
        x = layers.LayerStack(
            DecoderBlock, e.depth, scan=self.cfg.scan_layers, remat=self.cfg.remat and self.cfg.remat_policy,
            block_kwargs=dict(num_heads=e.heads, head_dim=e.width // e.heads, mlp_dim=e.mlp_dim,
                              attention_impl=self.cfg.attention_impl or None, **kw),
            name="decoder")(x, layers.attention_mask(None, valid, causal=True), ctx,
                            None if context_mask is None else layers.attention_mask(None, context_mask, causal=False))
        x = layers.LayerNorm(name="ln_out", **kw)(x)
        return embed.attend(x).astype(jnp.float32)


def greedy_decode(logits_fn, batch_size: int, length: int, bos_id: int, eos_id: int, pad_id: int) -> jax.Array:
    """Greedy decoding with a fixed-size buffer (no cache: explanations are short).

    Args:
      logits_fn: tokens [b, length] -> logits [b, length, vocab].
    Returns:
      [batch_size, length] int32: <bos>, generated tokens, <eos>, then <pad>.
    """
    tokens = jnp.full((batch_size, length), pad_id, jnp.int32).at[:, 0].set(bos_id)
    done = jnp.zeros((batch_size,), jnp.bool_)

    def step(i, carry):
        tokens, done = carry
        next_token = jnp.argmax(logits_fn(tokens)[:, i], axis=-1).astype(jnp.int32)
        next_token = jnp.where(done, pad_id, next_token)
        tokens = tokens.at[:, i + 1].set(next_token)
        return tokens, done | (next_token == eos_id)

    tokens, _ = jax.lax.fori_loop(0, length - 1, step, (tokens, done))
    return tokens
