"""Qwen2/Llama-style decoder LM: the frozen language half of the perception anchor.

Matches Hugging Face `Qwen2ForCausalLM` / `LlamaForCausalLM`: token embedding, pre-RMSNorm blocks
with grouped-query attention (RoPE "rotate half", q/k/v bias iff `qkv_bias`, no o_proj bias) and a
bias-free SwiGLU MLP, final RMSNorm, logits tied to the embedding or from an `lm_head`.
A parent module calls `embed`, `__call__` and `logits` separately, hence `setup()`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlacabin_jax.model.layers import Attention, LayerStack, Mlp, RMSNorm, attention_mask, logical
from vlacabin_jax.model.vit import as_config

Dtype = Any


class DecoderBlock(nn.Module):
    """Pre-RMSNorm decoder block: x + attn(norm(x)), then x + swiglu(norm(x)).

    `__call__(x, mask, positions)` returns `(x, None)` so `LayerStack` can scan it.
    """

    heads: int
    kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float
    rms_eps: float
    qkv_bias: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, positions: jax.Array) -> tuple[jax.Array, None]:
        """x: [batch, length, width]; mask: bool [batch, 1, length, length]; positions: [batch, length]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = RMSNorm(self.rms_eps, name="ln_attn", **kw)(x)
        x = x + Attention(self.heads, self.head_dim, num_kv_heads=self.kv_heads, qkv_bias=self.qkv_bias,
                          out_bias=False, rope_theta=self.rope_theta, implementation=self.attention_impl,
                          name="attn", **kw)(h, mask, positions=positions)
        h = RMSNorm(self.rms_eps, name="ln_mlp", **kw)(x)
        return x + Mlp(self.mlp_dim, "swiglu", use_bias=False, name="mlp", **kw)(h), None


class DecoderLM(nn.Module):
    """Decoder-only LM; `__call__` output equals HF `model(...).last_hidden_state`.

    Attributes:
      cfg: the `lm` ConfigDict (vocab_size, width, depth, heads, kv_heads, head_dim, mlp_dim,
        rope_theta, rms_eps, qkv_bias, tie_embeddings).
      dtype: compute dtype. param_dtype: storage dtype of the params.
      scan: scan the blocks (params stacked under `layers`) or unroll (`layers_{i}`).
      remat: rematerialise block activations in the backward pass (False or a policy name of
        `layers.REMAT_POLICIES`).
      attention_impl: `jax.nn.dot_product_attention` implementation (None = JAX chooses).

    Params: `embedding [vocab, width]`, `decoder/layers[_i]/...` (DecoderBlock),
    `final_norm/scale [width]`, and `lm_head [width, vocab]` unless `tie_embeddings`.
    The embedding and lm_head are created in `setup`, so they exist whichever method inits the
    module; the blocks and final norm are created by `__call__`.
    """

    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = True
    remat: bool | str = False
    attention_impl: str | None = None

    def setup(self) -> None:
        cfg = as_config(self.cfg)
        self.embedding = self.param("embedding", logical(nn.initializers.normal(0.02), ("vocab", "embed")),
                                    (cfg.vocab_size, cfg.width), self.param_dtype)
        if not cfg.tie_embeddings:
            self.lm_head = self.param("lm_head", logical(nn.initializers.normal(0.02), ("embed", "vocab")),
                                      (cfg.width, cfg.vocab_size), self.param_dtype)
        self.decoder = LayerStack(
            DecoderBlock, cfg.depth, scan=self.scan, remat=self.remat,
            block_kwargs=dict(heads=cfg.heads, kv_heads=cfg.kv_heads, head_dim=cfg.head_dim,
                              mlp_dim=cfg.mlp_dim, rope_theta=float(cfg.rope_theta), rms_eps=cfg.rms_eps,
                              qkv_bias=bool(cfg.qkv_bias), dtype=self.dtype, param_dtype=self.param_dtype,
                              attention_impl=self.attention_impl),
        )
        self.final_norm = RMSNorm(cfg.rms_eps, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Token embeddings: tokens int [batch, length] -> [batch, length, width] in `dtype`."""
        return jnp.take(self.embedding, tokens, axis=0).astype(self.dtype)

    def __call__(self, embeddings: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        """Causal decoder over input embeddings.

        Args:
          embeddings: [batch, length, width] (from `embed`, or any mix of modality tokens).
          mask: bool [batch, length], False at padding; padded keys are never attended.
          positions: int [batch, length] RoPE positions.
        Returns:
          [batch, length, width] after the final RMSNorm (HF `last_hidden_state`); rows at padded
          positions are meaningless.
        """
        attn_mask = attention_mask(None, mask, causal=True)
        # Let every query see itself, so fully padded rows (left padding) have a finite softmax
        # on every attention backend; valid queries already see themselves.
        attn_mask = attn_mask | jnp.eye(mask.shape[-1], dtype=jnp.bool_)[None, None]
        x = self.decoder(embeddings.astype(self.dtype), attn_mask, positions)
        return self.final_norm(x)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Next-token logits: hidden [batch, length, width] -> [batch, length, vocab] in `dtype`."""
        hidden = hidden.astype(self.dtype)
        if as_config(self.cfg).tie_embeddings:
            return jnp.einsum("blw,vw->blv", hidden, self.embedding.astype(self.dtype))
        return jnp.einsum("blw,wv->blv", hidden, self.lm_head.astype(self.dtype))

    def forward_tokens(self, tokens: jax.Array, mask: jax.Array, positions: jax.Array) -> jax.Array:
        """`logits(__call__(embed(tokens), mask, positions))`: [batch, length] -> [batch, length, vocab].

        Touches every param, so `init(..., method=DecoderLM.forward_tokens)` builds the full tree.
        """
        return self.logits(self(self.embed(tokens), mask, positions))
