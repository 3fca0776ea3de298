"""SigLIP-style vision transformer: the frozen image half of the perception anchor.

Matches Hugging Face `SiglipVisionModel` (without its attention-pooling head): conv patch
embedding with bias, learned position embedding, pre-LayerNorm encoder blocks (biased q/k/v/out,
tanh-GELU MLP), final LayerNorm. `vlacabin_jax.hf_import` maps HF weights onto these params.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlacabin_jax.model.layers import Attention, LayerNorm, LayerStack, Mlp, logical

Dtype = Any


def as_config(cfg: Any) -> Any:
    """Attribute access for a ConfigDict or a plain mapping (e.g. from `hf_import`)."""
    return ml_collections.ConfigDict(dict(cfg)) if isinstance(cfg, Mapping) else cfg


class VitBlock(nn.Module):
    """Pre-LayerNorm SigLIP encoder block: x + attn(ln(x)), then x + mlp(ln(x)).

    `__call__(x)` with x [batch, tokens, width] returns `(x, None)` so `LayerStack` can scan it.
    """

    heads: int
    head_dim: int
    mlp_dim: int
    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, None]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.eps, name="ln_attn", **kw)(x)
        x = x + Attention(self.heads, self.head_dim, qkv_bias=True, out_bias=True,
                          implementation=self.attention_impl, name="attn", **kw)(h, None)
        h = LayerNorm(self.eps, name="ln_mlp", **kw)(x)
        # SigLIP uses gelu_pytorch_tanh; exact-erf GELU would drift by ~5e-4 per activation.
        x = x + Mlp(self.mlp_dim, "gelu_tanh", use_bias=True, name="mlp", **kw)(h)
        return x, None


class VisionTransformer(nn.Module):
    """SigLIP vision tower; output equals HF `SiglipVisionModel(...).last_hidden_state`.

    Attributes:
      cfg: the `vit` ConfigDict (image_size, patch_size, width, depth, heads, mlp_dim,
        layernorm_eps).
      dtype: compute dtype. param_dtype: storage dtype of the params.
      scan: scan the encoder blocks (params stacked under `layers`) or unroll (`layers_{i}`).
      remat: rematerialise block activations in the backward pass (False or a policy name of
        `layers.REMAT_POLICIES`).
      attention_impl: `jax.nn.dot_product_attention` implementation (None = JAX chooses).

    Params: `patch_embed/{kernel [p, p, 3, width], bias [width]}`, `pos_embed [patches, width]`,
    `encoder/layers[_i]/...` (VitBlock), `post_ln/ln/{scale, bias}`.
    """

    cfg: Any
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = True
    remat: bool | str = False
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        """Encode normalised images.

        Args:
          pixel_values: [batch, H, W, 3], normalised as HF's SigLIP processor does (in [-1, 1]);
            H = W = cfg.image_size.
        Returns:
          [batch, num_patches, width] with num_patches = (image_size // patch_size) ** 2,
          patches in row-major (row, column) order like HF.
        """
        cfg = as_config(self.cfg)
        width, patch = cfg.width, cfg.patch_size
        if pixel_values.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"VisionTransformer expects [batch, {cfg.image_size}, {cfg.image_size}, 3] "
                             f"pixels, got {pixel_values.shape}")
        x = nn.Conv(
            width, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=True,
            dtype=self.dtype, param_dtype=self.param_dtype,
            kernel_init=logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=logical(nn.initializers.zeros_init(), ("embed",)),
            name="patch_embed",
        )(pixel_values.astype(self.dtype))
        x = x.reshape(x.shape[0], -1, width)  # [b, rows * cols, width], row-major like HF
        num_patches = (cfg.image_size // patch) ** 2
        pos = self.param("pos_embed", logical(nn.initializers.normal(width ** -0.5), (None, "embed")),
                         (num_patches, width), self.param_dtype)
        x = x + pos.astype(self.dtype)[None]
        x = LayerStack(
            VitBlock, cfg.depth, scan=self.scan, remat=self.remat,
            block_kwargs=dict(heads=cfg.heads, head_dim=width // cfg.heads, mlp_dim=cfg.mlp_dim,
                              eps=cfg.layernorm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                              attention_impl=self.attention_impl),
            name="encoder",
        )(x)
        return LayerNorm(cfg.layernorm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="post_ln")(x)
