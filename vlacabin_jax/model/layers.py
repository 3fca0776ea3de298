"""Shared building blocks: dense layers with logical axes, norms, attention, MLPs, layer stacks.

Every parameter is created through `nn.with_logical_partitioning`, so `vlacabin_jax.sharding`
maps it onto the mesh. Logical axis names used across the model:
  embed, mlp, heads, kv_heads, head_dim, vocab, layers, and None (replicated, small vectors).
Activations: every `Dense` pins its batch-major inputs and outputs (rank >= 3: [batch, length...,
features...]) to `activation_batch, activation_length..., <features>` (`activation_axes`), and
every `LayerStack` its carry, through `sharding.constrain` (a no-op outside a step's
`sharding.activation_sharding`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlacabin_jax import sharding
from vlacabin_jax.model.lora import LoRA

Dtype = Any
Axes = tuple[str | None, ...]

default_kernel_init = nn.initializers.xavier_uniform()


def logical(init: Callable, axes: Axes) -> Callable:
    """An initializer that also records the parameter's logical axis names."""
    return nn.with_logical_partitioning(init, axes)


# A weight's logical axis -> the logical axis of the activation dim it meets; the others
# (embed, lm_embed, latent, head_dim, ...) map to `activation_embed` (the width: replicated).
_FEATURE_ACTIVATION = {"heads": "activation_heads", "kv_heads": "activation_kv_heads",
                       "mlp": "activation_mlp", "vocab": "activation_vocab"}


def activation_axes(ndim: int, feature_axes: Axes) -> Axes:
    """Logical axes of a batch-major activation [batch, length..., features...] whose trailing dims
    meet weight axes `feature_axes`. A logical name names one dim at most (Flax's rule): further
    length dims, and a feature dim whose name is taken, are None (replicated)."""
    features = [_FEATURE_ACTIVATION.get(a, "activation_embed") for a in feature_axes]
    features = tuple(None if f in features[:i] else f for i, f in enumerate(features))
    middle = ndim - 1 - len(features)
    return ("activation_batch",) + ("activation_length",) * min(middle, 1) + (None,) * (middle - 1) + features


def constrain_activation(x: jax.Array, feature_axes: Axes) -> jax.Array:
    """Pin a batch-major activation (rank >= 3) to rows over the data-parallel axes
    (`sharding.constrain`); lower ranks (e.g. [length, features] tables) and every call outside
    a step's `sharding.activation_sharding` pass through unchanged."""
    if x.ndim < 3 or x.ndim <= len(feature_axes):
        return x
    return sharding.constrain(x, activation_axes(x.ndim, feature_axes))


class Dense(nn.Module):
    """`DenseGeneral` whose kernel/bias carry logical axes, with an optional low-rank adapter.

    Attributes:
      features: output feature shape (int or tuple, e.g. (heads, head_dim)).
      kernel_axes: logical axes of the kernel, input axes first then output axes.
      axis: input axes contracted (e.g. (-2, -1) for an attention output projection); trailing.
      lora_rank: > 0 adds LoRA params `lora_a [in..., rank]` (fan-in normal init) and
        `lora_b [rank, out...]` (zeros) and returns `x W + b + lora_scale · (x A) B`
        (`vlacabin_jax.model.lora`).
      lora_scale: alpha / rank of the adapter.
    """

    features: int | Sequence[int]
    kernel_axes: Axes
    axis: int | Sequence[int] = -1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    lora_rank: int = 0
    lora_scale: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        out_axes = self.kernel_axes[-len(features):]
        n_in = 1 if isinstance(self.axis, int) else len(self.axis)
        x = constrain_activation(x, self.kernel_axes[:n_in])
        y = nn.DenseGeneral(
            features=features if len(features) > 1 else features[0],
            axis=self.axis,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=logical(self.kernel_init, self.kernel_axes),
            bias_init=logical(self.bias_init, out_axes),
            name="dense",
        )(x)
        if self.lora_rank > 0:
            y = y + self._adapter(x, features, out_axes)
        return constrain_activation(y, out_axes)

    def _adapter(self, x: jax.Array, features: tuple[int, ...], out_axes: Axes) -> jax.Array:
        """lora_scale · (x A) B: x [..., in...] → [..., out...] through rank `lora_rank`."""
        n_in = 1 if isinstance(self.axis, int) else len(self.axis)
        in_shape, in_axes = x.shape[x.ndim - n_in:], self.kernel_axes[:n_in]
        r = self.lora_rank
        # The rank axis is tiny: replicated (logical axis "lora"); the others shard like the kernel.
        a = self.param("lora_a", logical(nn.initializers.variance_scaling(
            1.0, "fan_in", "normal", in_axis=tuple(range(n_in)), out_axis=-1), in_axes + ("lora",)),
            in_shape + (r,), self.param_dtype)
        b = self.param("lora_b", logical(nn.initializers.zeros_init(), ("lora",) + out_axes),
                       (r,) + features, self.param_dtype)
        flat = x.reshape(x.shape[:x.ndim - n_in] + (-1,)).astype(self.dtype)
        h = flat @ a.reshape(-1, r).astype(self.dtype)
        out = (h @ b.reshape(r, -1).astype(self.dtype)).reshape(x.shape[:x.ndim - n_in] + features)
        return (self.lora_scale * out).astype(self.dtype)


class RMSNorm(nn.Module):
    """RMSNorm as in Llama/Qwen2: x / rms(x) * scale, computed in fp32, scale initialised to 1."""

    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", logical(nn.initializers.ones_init(), ("norm",)), (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with logical axes on scale/bias; statistics in fp32."""

    eps: float = 1e-6
    use_scale: bool = True
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.LayerNorm(
            epsilon=self.eps,
            use_scale=self.use_scale,
            use_bias=self.use_bias,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            scale_init=logical(nn.initializers.ones_init(), ("norm",)),
            bias_init=logical(nn.initializers.zeros_init(), ("norm",)),
            name="ln",
        )(x.astype(jnp.float32)).astype(self.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, Llama/Qwen2 "rotate half" layout, real sin/cos only.

    Args:
      x: [batch, length, heads, head_dim].
      positions: [batch, length] integer positions.
      theta: RoPE base.
    Returns:
      [batch, length, heads, head_dim], same dtype as x.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, l, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = head_dim // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


def attention_mask(q_mask: jax.Array | None, kv_mask: jax.Array, causal: bool) -> jax.Array:
    """Boolean attention mask [batch, 1, q_len, kv_len] from per-token validity.

    Args:
      q_mask: [batch, q_len] or None (all queries valid).
      kv_mask: [batch, kv_len].
      causal: also forbid attending to later positions (q_len must equal kv_len).
    """
    mask = kv_mask[:, None, None, :]
    if q_mask is not None:
        mask = mask & q_mask[:, None, :, None]
    if causal:
        length = kv_mask.shape[-1]
        mask = mask & jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
    return mask


class Attention(nn.Module):
    """Multi-head attention with grouped-query KV heads, optional RoPE, through
    `jax.nn.dot_product_attention` (XLA's attention unless `implementation="cudnn"`).

    Attributes:
      num_heads: query heads. num_kv_heads: key/value heads (divides num_heads).
      head_dim: per-head width. use_bias: biases on q/k/v (Qwen2, SigLIP) and out (SigLIP).
      rope_theta: apply RoPE to q/k when set.
      implementation: passed to dot_product_attention; None is XLA's attention in JAX 0.10 (JAX
        does not pick cuDNN by itself), "cudnn" asks for cuDNN's fused attention (GPU, bf16/fp16).
      lora: low-rank adapters on the projections it targets (`query`, `key`, `value`, `out`).
    """

    num_heads: int
    head_dim: int
    num_kv_heads: int | None = None
    qkv_bias: bool = False
    out_bias: bool = False
    rope_theta: float | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: str | None = None
    lora: LoRA = LoRA()

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        context: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """x: [batch, q_len, embed]; context: [batch, kv_len, embed] (cross-attention) or None;
        mask: bool [batch, 1, q_len, kv_len] or None; positions: [batch, q_len] for RoPE."""
        kv_heads = self.num_kv_heads or self.num_heads
        embed = x.shape[-1]
        source = x if context is None else context
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.qkv_bias)
        lo = self.lora
        q = Dense((self.num_heads, self.head_dim), ("embed", "heads", "head_dim"), name="query", **kw,
                  **lo.dense("query"))(x)
        k = Dense((kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name="key", **kw,
                  **lo.dense("key"))(source)
        v = Dense((kv_heads, self.head_dim), ("embed", "kv_heads", "head_dim"), name="value", **kw,
                  **lo.dense("value"))(source)
        if self.rope_theta is not None:
            q = rope(q, positions, self.rope_theta)
            k = rope(k, positions, self.rope_theta)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        return Dense(
            embed, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=self.out_bias,
            dtype=self.dtype, param_dtype=self.param_dtype, name="out", **lo.dense("out"),
        )(out)


class Mlp(nn.Module):
    """Feed-forward block: `gelu` (exact erf or tanh, two matrices) or `swiglu` (three).
    `lora`: adapters on the matrices it targets (`up`, `down`; `gate` follows `up`)."""

    hidden: int
    kind: str = "gelu"  # gelu | gelu_tanh | swiglu
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoRA = LoRA()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=self.use_bias)
        if self.kind == "swiglu":
            gate = Dense(self.hidden, ("embed", "mlp"), name="gate", **kw, **self.lora.dense("up"))(x)
            up = Dense(self.hidden, ("embed", "mlp"), name="up", **kw, **self.lora.dense("up"))(x)
            h = nn.silu(gate) * up
        else:
            h = Dense(self.hidden, ("embed", "mlp"), name="up", **kw, **self.lora.dense("up"))(x)
            h = nn.gelu(h, approximate=self.kind == "gelu_tanh")
        return Dense(x.shape[-1], ("mlp", "embed"), name="down", **kw, **self.lora.dense("down"))(h)


class EncoderBlock(nn.Module):
    """Pre-LayerNorm bidirectional transformer block (encoders, connector).

    `__call__(x, mask)` returns `(x, None)` so the block can be scanned. `lora`: adapters on the
    attention and MLP matrices it targets (modality encoders only).
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    lora: LoRA = LoRA()

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(name="ln_attn", **kw)(x)
        x = x + Attention(self.num_heads, self.head_dim, qkv_bias=True, out_bias=True,
                          implementation=self.attention_impl, lora=self.lora, name="attn", **kw)(h, mask)
        h = LayerNorm(name="ln_mlp", **kw)(x)
        x = x + Mlp(self.mlp_dim, "gelu", lora=self.lora, name="mlp", **kw)(h)
        return x, None


# What a rematerialised block keeps from the forward pass (`model.remat_policy`): "full" keeps
# nothing and recomputes the block (least memory); "dots" keeps the matmul outputs that have no
# batch dimension, i.e. weight-stationary ones (less recompute, more memory).
REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class LayerStack(nn.Module):
    """`depth` copies of `block`, scanned (params stacked on a leading `layers` axis) or unrolled.

    The block is called as `block(x, *broadcast_args) -> (x, None)`; the stack takes
    `(x, *broadcast_args)` and returns x. Params live under `layers` (scanned, leading axis =
    depth) or `layers_0 ... layers_{depth-1}` (unrolled).

    Attributes:
      block: the block class. depth: number of blocks. scan: scan or unroll.
      remat: rematerialise each block's activations in the backward pass: False, or a policy
        name of `REMAT_POLICIES` (True means "full").
      block_kwargs: constructor arguments of the block.
    """

    block: type[nn.Module]
    depth: int
    scan: bool = True
    remat: bool | str = False
    block_kwargs: dict = dataclasses.field(default_factory=dict)

    @nn.compact
    def __call__(self, x: jax.Array, *args) -> jax.Array:
        x = constrain_activation(x, ("embed",))
        cls = self.block
        if self.remat:
            policy = REMAT_POLICIES["full" if self.remat is True else self.remat]
            cls = nn.remat(self.block, prevent_cse=not self.scan, policy=policy)
        if self.scan:
            scanned = nn.scan(
                cls,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=nn.broadcast,
                length=self.depth,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(name="layers", **self.block_kwargs)
            return constrain_activation(scanned(x, *args)[0], ("embed",))
        for i in range(self.depth):
            x = cls(name=f"layers_{i}", **self.block_kwargs)(x, *args)[0]
        return constrain_activation(x, ("embed",))


def sinusoidal(positions: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
    """Sinusoidal embedding of scalar positions or times.

    Args:
      positions: [...] float or int.
      dim: even embedding width.
    Returns:
      [..., dim] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = positions.astype(jnp.float32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
