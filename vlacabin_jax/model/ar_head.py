"""Autoregressive action head: the baseline the DNFM is judged against, on the same backbone.

    ar_model_config(model_cfg)           -> the `model` config of a causal head the DNFM's size
    ActionDecoder(cfg)(tokens, memory, memory_mask) -> next-token logits [b, action_len, vocab]
    teacher_inputs(tokens)               -> [START, a_0 .. a_{L-2}] (teacher forcing)
    greedy_actions(logits_fn, b, length) -> action ids [b, length] under the action grammar

`model.action_head = "autoregressive"` trains it (`loss.autoregressive_weight`) and decodes with
it in `infer`; the quality ladder's AR rung sets the DNFM's loss weights to 0. The head is
`explain.ExplanationHead` sized like the DNFM over the action vocabulary, cross-attending to the
same connector memory the DNFM reads. Decoding re-runs it on a fixed buffer (no KV cache: at
<= 16 tokens a step is bound by latency, not FLOPs).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model import explain
from vlacabin_jax.model.dnfm import grammar_step

START_ID = 0  # the action vocabulary has no <bos>; <pad> starts the buffer
Dtype = Any


def ar_model_config(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`model` config whose `explain` section is a causal head the size of the DNFM over the
    action vocabulary, `action_len + 1` positions (start token + actions)."""
    c = ml_collections.ConfigDict(model_cfg.to_dict())
    d = model_cfg.dnfm
    c.explain = ml_collections.ConfigDict(dict(width=d.width, depth=d.depth, heads=d.heads, mlp_dim=d.mlp_dim,
                                               vocab_size=d.vocab_size))
    c.explain_len = model_cfg.action_len + 1
    return c


class ActionDecoder(nn.Module):
    """tokens [b, l] int32 (START then actions), memory [b, m, w], memory_mask [b, m] → logits
    [b, l, action vocab] float32; position i predicts action i."""

    cfg: ml_collections.ConfigDict  # the full `model` config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, memory: jax.Array, memory_mask: jax.Array) -> jax.Array:
        return explain.ExplanationHead(ar_model_config(self.cfg), dtype=self.dtype, param_dtype=self.param_dtype,
                                       name="decoder")(tokens, memory, memory_mask)


def teacher_inputs(tokens: jax.Array) -> jax.Array:
    """Target actions [b, l] → decoder inputs [b, l]: START, then the targets shifted right."""
    return jnp.concatenate([jnp.full(tokens.shape[:1] + (1,), START_ID, tokens.dtype), tokens[:, :-1]], axis=1)


def greedy_actions(logits_fn: Callable[[jax.Array], jax.Array], batch_size: int, length: int) -> jax.Array:
    """Greedy decode of `length` actions, each under the action grammar (`dnfm.grammar_step`).

    Args:
      logits_fn: decoder inputs [b, length] → logits [b, length, vocab].
    Returns:
      [batch_size, length] int32 action ids (the decoder's START is not included).
    """
    inputs = jnp.full((batch_size, length), START_ID, jnp.int32)
    ended = noop = jnp.zeros((batch_size,), jnp.bool_)
    out = []
    for i in range(length):  # unrolled: length is static and small
        tok, ended, noop = grammar_step(logits_fn(inputs)[:, i], i, length, ended, noop)
        out.append(tok)
        if i + 1 < length:
            inputs = inputs.at[:, i + 1].set(tok)
    return jnp.stack(out, axis=1)
