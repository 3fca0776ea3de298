"""DNFM: discrete noise-free flow matching from the source latent z0 to action codebook vectors.

The path is x_t = (1 - t) z0 + t x1 with x1 = E[tokens] (E rows normalised to a fixed norm,
so it cannot collapse to a point without the cross-entropy terms noticing); a bidirectional transformer
v(x_t, t) (time through adaptive LayerNorm; with
`model.dnfm.cross_attention` each block also attends to the connector's outputs) regresses x1 - z0. Endpoints
x_t + (1 - t) v decode to tokens as x · Eᵀ / τ. Sampling: K Euler steps from z0, then argmax.

Positions follow `model.dnfm.layout`: "sequence" (position k is the answer's k-th token) or
"per_setting" (position p is setting path p: its new value or `<pad>` for keep, logits masked to
the path's own values; `setting_layout` rebuilds the sequence).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID
from vlacabin_jax.model import layers, setting_layout

Dtype = Any


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class AdaLNBlock(nn.Module):
    """DiT-style block: LayerNorm modulated by the time embedding, gated residuals (zero-init)."""

    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    cross_attention: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, cond: jax.Array, memory: jax.Array | None = None,
                 memory_mask: jax.Array | None = None) -> tuple[jax.Array, None]:
        """x: [b, l, w]; cond: [b, w] time embedding; memory: [b, m, w_mem] and memory_mask
        [b, m] (read by the cross-attention, when the block has one)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        width = x.shape[-1]
        mod = layers.Dense(6 * width, ("embed", "mlp"), use_bias=True, name="modulation",
                           kernel_init=nn.initializers.zeros_init(), **kw)(nn.silu(cond))
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = jnp.split(mod, 6, axis=-1)
        h = _modulate(layers.LayerNorm(use_scale=False, use_bias=False, name="ln_attn", **kw)(x), shift_a, scale_a)
        mask = jnp.ones((x.shape[0], 1, x.shape[1], x.shape[1]), jnp.bool_)
        h = layers.Attention(self.num_heads, self.head_dim, qkv_bias=True, out_bias=True,
                             implementation=self.attention_impl, name="attn", **kw)(h, mask)
        x = x + gate_a[:, None, :] * h
        if self.cross_attention:
            # The context reaches every action position directly, not only through z0.
            h = layers.LayerNorm(name="ln_cross", **kw)(x)
            x = x + layers.Attention(self.num_heads, self.head_dim, qkv_bias=True, out_bias=True,
                                     implementation=self.attention_impl, name="cross_attn", **kw)(
                h, layers.attention_mask(None, memory_mask, causal=False), context=memory)
        h = _modulate(layers.LayerNorm(use_scale=False, use_bias=False, name="ln_mlp", **kw)(x), shift_m, scale_m)
        x = x + gate_m[:, None, :] * layers.Mlp(self.mlp_dim, "gelu", name="mlp", **kw)(h)
        return x, None


class DNFM(nn.Module):
    """The action codebook and the velocity network.

    Methods:
      codebook() -> [vocab, d_action], unit-norm rows (float32).
      logits(x [b, l, d_action]) -> [b, l, vocab] float32 (per_setting: other paths' ids at the
        float32 minimum).
      __call__(x_t [b, l, d_action], t [b], memory [b, m, w], memory_mask [b, m])
        -> velocity [b, l, d_action] float32 (memory is read only with `dnfm.cross_attention`).
    """

    cfg: ml_collections.ConfigDict  # the full `model` config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        d = self.cfg.dnfm
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.action_codebook = self.param(
            "action_codebook", layers.logical(nn.initializers.normal(1.0), ("vocab", None)),
            (d.vocab_size, d.d_action), self.param_dtype)
        self.in_proj = layers.Dense(d.width, (None, "embed"), use_bias=True, name="in_proj", **kw)
        self.position = self.param("position_embedding", layers.logical(nn.initializers.normal(0.02), (None, "embed")),
                                   (setting_layout.num_positions(self.cfg), d.width), self.param_dtype)
        self.time_mlp_in = layers.Dense(d.width, (None, "embed"), use_bias=True, name="time_in", **kw)
        self.time_mlp_out = layers.Dense(d.width, ("embed", "embed_out"), use_bias=True, name="time_out", **kw)
        self.blocks = layers.LayerStack(
            AdaLNBlock, d.depth, scan=self.cfg.scan_layers, remat=self.cfg.remat and self.cfg.remat_policy,
            block_kwargs=dict(num_heads=d.heads, head_dim=d.width // d.heads, mlp_dim=d.mlp_dim,
                              attention_impl=self.cfg.attention_impl or None, cross_attention=d.cross_attention,
                              **kw),
            name="blocks")
        self.final_modulation = layers.Dense(2 * d.width, ("embed", "mlp"), use_bias=True, name="final_modulation",
                                             kernel_init=nn.initializers.zeros_init(), **kw)
        self.final_ln = layers.LayerNorm(use_scale=False, use_bias=False, name="final_ln", **kw)
        self.out_proj = layers.Dense(d.d_action, ("embed", None), use_bias=True, name="out_proj",
                                     kernel_init=nn.initializers.zeros_init(), **kw)

    def codebook(self) -> jax.Array:
        """Rows rescaled to norm sqrt(d_action): the scale of a N(0, I) sample, so z0, x_t and x1
        live at one scale and the reparameterisation noise does not drown the targets."""
        e = self.action_codebook.astype(jnp.float32)
        return e * jax.lax.rsqrt(jnp.mean(e * e, axis=-1, keepdims=True) + 1e-12)

    def logits(self, x: jax.Array) -> jax.Array:
        """Token logits [b, l, vocab]: x · Eᵀ / (d_action · τ), i.e. cosine / τ at the codebook."""
        d = self.cfg.dnfm
        logits = jnp.einsum("bld,vd->blv", x.astype(jnp.float32), self.codebook()) / (d.d_action * d.temperature)
        if d.layout == "per_setting":
            allowed = jnp.asarray(setting_layout.layout_tables().value_mask)
            logits = jnp.where(allowed[None], logits, jnp.finfo(jnp.float32).min)
        return logits

    def __call__(self, x_t: jax.Array, t: jax.Array, memory: jax.Array | None = None,
                 memory_mask: jax.Array | None = None) -> jax.Array:
        h = self.in_proj(x_t.astype(self.dtype)) + self.position.astype(self.dtype)[None]
        # Time in [0, 1] scaled up so the sinusoidal frequencies resolve small steps.
        cond = self.time_mlp_out(nn.silu(self.time_mlp_in(layers.sinusoidal(t * 1000.0, 256).astype(self.dtype))))
        if self.cfg.dnfm.cross_attention:
            h = self.blocks(h, cond, memory.astype(self.dtype), memory_mask)
        else:
            h = self.blocks(h, cond)
        shift, scale = jnp.split(self.final_modulation(nn.silu(cond)), 2, axis=-1)
        h = _modulate(self.final_ln(h), shift, scale)
        return self.out_proj(h).astype(jnp.float32)


def euler_sample(velocity_fn, z0: jax.Array, steps: int) -> jax.Array:
    """K Euler steps of dx/dt = v(x, t) from t = 0 to 1, unrolled (K is static, 1..8).

    Args:
      velocity_fn: (x [b, l, d], t [b]) -> v [b, l, d].
      z0: [b, l, d] source latent.
    Returns:
      x1 estimate [b, l, d].
    """
    x = z0.astype(jnp.float32)
    dt = 1.0 / steps
    for k in range(steps):
        t = jnp.full((x.shape[0],), k * dt, jnp.float32)
        x = x + dt * velocity_fn(x, t)
    return x


def grammar_step(logits: jax.Array, i: int, length: int, ended: jax.Array, noop: jax.Array
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Greedy choice at position `i` of `length` under the action vocabulary's grammar.

    Args:
      logits: [b, vocab] at position i; ended: [b] bool (an `<eos>` came before); noop: [b] bool
        (position 0 was `<noop>` and no `<eos>` yet).
    Returns:
      (token ids [b] int32, ended, noop) after this position.
    """
    ids = jnp.arange(logits.shape[-1])
    only_pad = ended[:, None]
    only_eos = (noop | (i == length - 1))[:, None] & ~only_pad
    free = ~(only_pad | only_eos)
    allowed_free = (ids != PAD_ID) & ((ids != EOS_ID) if i == 0 else (ids != NOOP_ID))
    allowed = (only_pad & (ids == PAD_ID)) | (only_eos & (ids == EOS_ID)) | (free & allowed_free)
    tok = jnp.argmax(jnp.where(allowed, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min),
                     axis=-1).astype(jnp.int32)
    noop = (tok == NOOP_ID) if i == 0 else noop & (tok != EOS_ID)
    return tok, ended | (tok == EOS_ID), noop


def decode_tokens(logits: jax.Array, constrained: bool) -> jax.Array:
    """Token logits [b, l, vocab] → action ids [b, l] int32.

    `constrained`: greedy left to right under the action vocabulary's grammar (`<noop>` alone,
    then `<eos>`; otherwise device tokens, one `<eos>`, `<pad>` after it; the last position is
    `<eos>` if nothing ended before), so every output decodes: under uncertainty the argmax of
    independent positions mixes `<noop>` with actions or leaves a `<pad>` inside. Otherwise the
    plain per-position argmax. Positions are unrolled (l is static), so the export has no loop.
    """
    if not constrained:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    b, length, _ = logits.shape
    ended = noop = jnp.zeros((b,), jnp.bool_)
    out = []
    for i in range(length):
        tok, ended, noop = grammar_step(logits[:, i], i, length, ended, noop)
        out.append(tok)
    return jnp.stack(out, axis=1)


def decode_actions(logits: jax.Array, model_cfg: ml_collections.ConfigDict) -> jax.Array:
    """DNFM logits [b, positions, vocab] → action ids [b, action_len] int32 under
    `model.dnfm.layout`: "sequence" decodes the positions (`decode_tokens`); "per_setting" takes
    each setting's argmax and emits the changed ones in order (`setting_layout.to_sequence`)."""
    if model_cfg.dnfm.layout == "per_setting":
        settings = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return setting_layout.to_sequence(settings, model_cfg.action_len, setting_layout.layout_tables())
    return decode_tokens(logits, model_cfg.dnfm.constrained_decode)
