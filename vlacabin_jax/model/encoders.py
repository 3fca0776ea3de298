"""Modality encoders of the multimodal VAE: each modality becomes a few Gaussian latent tokens.

speech: log-mel → conv subsampling (×4) → transformer → time segments → Gaussian tokens
text:   frozen LM token embeddings → transformer → attention pooling → Gaussian tokens
video:  frozen ViT patch features per frame → temporal transformer → time segments → Gaussian
state:  numeric and categorical fields → MLP tokens → attention pooling → Gaussian tokens

Speech and video tokens each cover a contiguous time segment, so the bridge can give them a
temporal position; a segment with no valid frame is masked, as is every token of an absent
modality.

With `model.lora.rank > 0` the Dense layers named in `model.lora.targets` (attention query / key /
value / out, MLP up / down, input `proj`, Gaussian `mean` / `logvar`) carry low-rank adapters
(`vlacabin_jax.model.lora`); the speech convolutions, the state tables and norms do not.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model import layers
from vlacabin_jax.model.lora import LoRA

Dtype = Any


class GaussianHead(nn.Module):
    """Mean and log-variance of a diagonal Gaussian; log-variance clipped for stability."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRA = LoRA()
    logvar_init: float = 0.0  # initial log-variance (the bias of the logvar layer)

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: [..., width] → (mean, logvar), each [..., features] float32."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        mean = layers.Dense(self.features, ("embed", "latent"), name="mean", **kw, **self.lora.dense("mean"))(x)
        logvar = layers.Dense(self.features, ("embed", "latent"), name="logvar",
                              kernel_init=nn.initializers.zeros_init(),
                              bias_init=nn.initializers.constant(self.logvar_init), **kw, **self.lora.dense("logvar"))(x)
        return mean.astype(jnp.float32), jnp.clip(logvar.astype(jnp.float32), -10.0, 10.0)


class AttentionPool(nn.Module):
    """`num_tokens` learned queries cross-attend over a masked sequence: [b, l, w] → [b, n, w]."""

    num_tokens: int
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    lora: LoRA = LoRA()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        width = x.shape[-1]
        queries = self.param("queries", layers.logical(nn.initializers.normal(0.02), (None, "embed")),
                             (self.num_tokens, width), self.param_dtype)
        queries = jnp.broadcast_to(queries.astype(self.dtype), (x.shape[0],) + queries.shape)
        attn_mask = layers.attention_mask(None, mask, causal=False)
        pooled = layers.Attention(self.num_heads, width // self.num_heads, qkv_bias=True, out_bias=True,
                                  dtype=self.dtype, param_dtype=self.param_dtype,
                                  implementation=self.attention_impl, lora=self.lora,
                                  name="attn")(queries, attn_mask, context=x)
        return layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="ln")(pooled)


def segment_pool(x: jax.Array, mask: jax.Array, num_segments: int) -> tuple[jax.Array, jax.Array]:
    """Masked mean over `num_segments` contiguous time segments.

    Args:
      x: [batch, time, width]; mask: [batch, time] bool.
    Returns:
      ([batch, num_segments, width], [batch, num_segments] bool: segment has a valid step).
    """
    b, t, w = x.shape
    pad = (-t) % num_segments
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad)))
    seg = (t + pad) // num_segments
    weights = mask.reshape(b, num_segments, seg, 1).astype(jnp.float32)
    summed = (x.reshape(b, num_segments, seg, w).astype(jnp.float32) * weights).sum(2)
    count = weights.sum(2)
    return (summed / jnp.maximum(count, 1.0)).astype(x.dtype), count[..., 0] > 0


class _Common(nn.Module):
    """Shared attributes of the modality encoders."""

    cfg: ml_collections.ConfigDict  # the full `model` config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def _lora(self) -> LoRA:
        return LoRA.from_config(self.cfg)

    def _encoder(self, name: str) -> layers.LayerStack:
        e = self.cfg.encoder
        return layers.LayerStack(
            layers.EncoderBlock, e.depth, scan=self.cfg.scan_layers, remat=self.cfg.remat and self.cfg.remat_policy,
            block_kwargs=dict(num_heads=e.heads, head_dim=e.width // e.heads, mlp_dim=e.mlp_dim,
                              attention_impl=self.cfg.attention_impl or None, lora=self._lora(), **self._kw()),
            name=name)

    def _gaussian(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return GaussianHead(self.cfg.latent.d_latent, lora=self._lora(), logvar_init=self.cfg.latent.init_logvar,
                            name="gaussian", **self._kw())(x)

    def _pool(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        return AttentionPool(self.cfg.latent.tokens_per_modality, self.cfg.encoder.heads, name="pool",
                             attention_impl=self.cfg.attention_impl or None, lora=self._lora(),
                             **self._kw())(x, mask)

    def _proj(self, x: jax.Array, in_axis: str) -> jax.Array:
        """Input projection [..., d_in] → [..., encoder width] (no bias)."""
        return layers.Dense(self.cfg.encoder.width, (in_axis, "embed"), name="proj", **self._kw(),
                            **self._lora().dense("proj"))(x)


class SpeechEncoder(_Common):
    """log-mel [b, t, n_mels] → (mean, logvar [b, n, d_latent], token mask [b, n])."""

    @nn.compact
    def __call__(self, mel: jax.Array, mel_mask: jax.Array):
        width = self.cfg.encoder.width
        x = mel.astype(self.dtype)
        for i in range(2):  # two stride-2 convolutions: 4x fewer steps for the transformer
            x = nn.Conv(width, (3,), strides=(2,), padding="SAME", dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"conv_{i}",
                        kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, "embed")),
                        bias_init=layers.logical(nn.initializers.zeros_init(), ("embed",)))(x)
            x = nn.gelu(x, approximate=False)
        mask = mel_mask[:, ::4][:, : x.shape[1]]
        x = x + layers.sinusoidal(jnp.arange(x.shape[1]), width).astype(self.dtype)
        x = self._encoder("encoder")(x, layers.attention_mask(None, mask, causal=False))
        x = layers.LayerNorm(name="ln", **self._kw())(x)
        pooled, token_mask = segment_pool(x, mask, self.cfg.latent.tokens_per_modality)
        mean, logvar = self._gaussian(pooled)
        return mean, logvar, token_mask


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / rms(x) over the last axis, in float32 (no scale parameter)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


class TextEncoder(_Common):
    """Frozen-LM token embeddings [b, l, d_lm] → (mean, logvar [b, n, d_latent], mask [b, n])."""

    @nn.compact
    def __call__(self, token_embeddings: jax.Array, text_mask: jax.Array):
        e = self.cfg.encoder
        # LM embeddings are small (std 0.02 at init, similar in Qwen2): RMS-normalise them so the
        # token content is not lost under the O(1) positions in a bf16 sum.
        x = self._proj(rms_normalize(token_embeddings).astype(self.dtype), "lm_embed")
        x = x + layers.sinusoidal(jnp.arange(x.shape[1]), e.width).astype(self.dtype)
        x = self._encoder("encoder")(x, layers.attention_mask(None, text_mask, causal=False))
        pooled = self._pool(x, text_mask)
        mean, logvar = self._gaussian(pooled)
        return mean, logvar, jnp.ones(mean.shape[:2], jnp.bool_)


class VideoEncoder(_Common):
    """Frozen ViT features → temporal transformer → Gaussian tokens.

    `model.video.patch_tokens = False`: per-frame features [b, f, d_vit] (patches averaged) and
    `tokens_per_modality` time segments. True: patch features [b, f, p, d_vit] stay apart (a
    learned patch position plus the frame's time position), one transformer attends over all
    frames × patches, and `tokens_per_modality` learned queries pool them: which seat holds a
    child or a sleeper lives in where the patch is, and awake or asleep in how it moves.
    """

    @nn.compact
    def __call__(self, frame_features: jax.Array, frame_mask: jax.Array):
        e = self.cfg.encoder
        x = self._proj(frame_features, "vit_embed")
        if not self.cfg.video.patch_tokens:
            x = x + layers.sinusoidal(jnp.arange(x.shape[1]), e.width).astype(self.dtype)
            x = self._encoder("temporal")(x, layers.attention_mask(None, frame_mask, causal=False))
            x = layers.LayerNorm(name="ln", **self._kw())(x)
            pooled, token_mask = segment_pool(x, frame_mask, self.cfg.latent.tokens_per_modality)
            mean, logvar = self._gaussian(pooled)
            return mean, logvar, token_mask
        b, f, p, w = x.shape
        patch_pos = self.param("patch_position_embedding", layers.logical(nn.initializers.normal(0.02), (None, "embed")),
                               (p, w), self.param_dtype)
        x = (x + layers.sinusoidal(jnp.arange(f), w).astype(self.dtype)[None, :, None]
             + patch_pos.astype(self.dtype)[None, None])
        mask = jnp.repeat(frame_mask, p, axis=1)
        x = self._encoder("temporal")(x.reshape(b, f * p, w), layers.attention_mask(None, mask, causal=False))
        x = layers.LayerNorm(name="ln", **self._kw())(x)
        mean, logvar = self._gaussian(self._pool(x, mask))
        return mean, logvar, jnp.broadcast_to(frame_mask.any(-1, keepdims=True), mean.shape[:2])


class StateEncoder(_Common):
    """Numeric [b, n_num] and categorical [b, n_cat] state fields → Gaussian tokens.

    Each field is one token: a categorical embedding, or a numeric value mapped per field either
    affinely (`model.state.numeric_fourier = 0`) or from its Fourier features sin/cos(π 2^k x),
    k < numeric_fourier, which set integer device levels (13 temperatures, 11 volumes, ...)
    apart by a margin an affine map of one scalar cannot give. `model.state.field_tokens`: every
    field token becomes a Gaussian latent token (the head reads exact levels field by field);
    otherwise `tokens_per_modality` attention-pooled tokens.
    """

    @nn.compact
    def __call__(self, numeric: jax.Array, categorical: jax.Array):
        e, sc = self.cfg.encoder, self.cfg.state
        sizes = tuple(sc.categorical_sizes)
        n_num = numeric.shape[-1]
        shift = self.param("numeric_shift", layers.logical(nn.initializers.normal(0.02), (None, "embed")),
                           (n_num, e.width), self.param_dtype)
        value = numeric[..., None].astype(jnp.float32)
        if sc.numeric_fourier:
            angles = value * (jnp.pi * 2.0 ** jnp.arange(sc.numeric_fourier, dtype=jnp.float32))
            value = jnp.concatenate([value, jnp.sin(angles), jnp.cos(angles)], axis=-1)
        # One map per field, [n_num, n_features, width]: value (and its Fourier features) → token.
        scale = self.param("numeric_scale", layers.logical(nn.initializers.normal(1.0 / value.shape[-1] ** 0.5),
                                                           (None, None, "embed")),
                           (n_num, value.shape[-1], e.width), self.param_dtype)
        num_tokens = (jnp.einsum("bnf,nfw->bnw", value.astype(self.dtype), scale.astype(self.dtype))
                      + shift.astype(self.dtype))
        offsets = jnp.cumsum(jnp.array((0,) + sizes[:-1], jnp.int32))
        table = nn.Embed(sum(sizes), e.width, dtype=self.dtype, param_dtype=self.param_dtype, name="categorical",
                         embedding_init=layers.logical(nn.initializers.normal(0.02), ("state_vocab", "embed")))
        cat_tokens = table(jnp.clip(categorical, 0, jnp.array(sizes) - 1) + offsets)
        x = jnp.concatenate([num_tokens, cat_tokens], axis=1)
        h = layers.LayerNorm(name="ln_mlp", **self._kw())(x)
        x = x + layers.Mlp(e.mlp_dim, "gelu", lora=self._lora(), name="mlp", **self._kw())(h)
        if not sc.field_tokens:
            x = self._pool(x, jnp.ones(x.shape[:2], jnp.bool_))
        mean, logvar = self._gaussian(x)
        return mean, logvar, jnp.ones(mean.shape[:2], jnp.bool_)


class ReconstructionHeads(nn.Module):
    """Light decoders from pooled latents [b, d_latent]: state fields, mean mel, mean visual feature."""

    cfg: ml_collections.ConfigDict
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled: dict[str, jax.Array]) -> dict[str, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
        sizes = tuple(self.cfg.state.categorical_sizes)
        return {
            "state_numeric": layers.Dense(self.cfg.state.numeric_dim, ("latent", None), name="state_numeric",
                                          **kw)(pooled["state"]).astype(jnp.float32),
            "state_categorical": layers.Dense(sum(sizes), ("latent", None), name="state_categorical",
                                              **kw)(pooled["state"]).astype(jnp.float32),
            "mel": layers.Dense(self.cfg.speech.n_mels, ("latent", None), name="mel",
                                **kw)(pooled["speech"]).astype(jnp.float32),
            "visual": layers.Dense(self.cfg.vit.width, ("latent", "vit_embed"), name="visual",
                                   **kw)(pooled["video"]).astype(jnp.float32),
        }
