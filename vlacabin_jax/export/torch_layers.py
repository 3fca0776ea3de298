"""Building blocks of the PyTorch mirror (`torch_model`): the attention, norms and MLPs of
`vlacabin_jax.model.layers`, and the perception anchor (SigLIP ViT, Qwen2/Llama LM) with Hugging
Face parameter names. Plain torch; no JAX. The dtype policy follows Flax's: norms, RoPE, attention
logits and softmax, and segment pooling compute in float32 whatever the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Masked attention logit (JAX uses -0.7 * float32 max): exp(-3e4 - max) is 0 all the same, fully
# masked rows are uniform in both, and it stays finite when TensorRT runs the layer in fp16.
MASKED_LOGIT = -3.0e4

def sinusoidal(positions: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """`layers.sinusoidal`: positions [...] → [..., dim] float32, cos half then sin half."""
    half = dim // 2
    log_period = torch.log(torch.tensor(max_period, dtype=torch.float32))
    freqs = torch.exp(-log_period * torch.arange(half, dtype=torch.float32) / half)
    args = positions.to(torch.float32)[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(positions: Tensor, head_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos, sin [b, l, 1, head_dim] float32 for float positions [b, l] ("rotate half" layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, :, None, :]
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor, head_dim: int) -> Tensor:
    """x [b, l, h, head_dim] → rotated in float32, back in x's dtype (as `layers.rope`)."""
    x32 = x.to(torch.float32)
    half = head_dim // 2
    rotated = torch.cat([-x32[..., half:], x32[..., :half]], dim=-1)
    return (x32 * cos + rotated * sin).to(x.dtype)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, group: int, head_dim: int) -> Tensor:
    """`jax.nn.dot_product_attention` (xla): q [b, t, n, hd], k/v [b, s, kv, hd] → [b, t, n, hd].

    Query head i uses key/value head i // (n // kv) (JAX reshapes heads to (kv, group)); logits and
    softmax in float32, probabilities cast to v's dtype; mask bool broadcastable to [b, 1, t, s].
    `group` = n // kv and `head_dim` are passed as ints: sizes read off traced tensors could turn
    into graph computations.
    """
    if group > 1:
        k = k.repeat_interleave(group, dim=2)
        v = v.repeat_interleave(group, dim=2)
    scale = 1.0 / math.sqrt(head_dim)
    logits = torch.matmul(q.transpose(1, 2).to(torch.float32), k.permute(0, 2, 3, 1).to(torch.float32)) * scale
    if mask is not None:
        logits = torch.where(mask, logits, torch.tensor(MASKED_LOGIT, dtype=torch.float32))
    probs = torch.softmax(logits, dim=-1).to(v.dtype)
    return torch.matmul(probs, v.transpose(1, 2)).transpose(1, 2)


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """`encoders.rms_normalize`: x / rms(x) over the last axis in float32, no scale (→ float32)."""
    x32 = x.to(torch.float32)
    return x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + eps)


class LayerNorm(nn.Module):
    """Flax LayerNorm (eps 1e-6 by default, not torch's 1e-5) in float32; params stay float32."""

    keep_fp32 = True

    def __init__(self, width: int, eps: float = 1e-6, affine: bool = True, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.width, self.eps, self.dtype = width, eps, dtype
        self.weight = nn.Parameter(torch.ones(width)) if affine else None
        self.bias = nn.Parameter(torch.zeros(width)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.to(torch.float32), (self.width,), self.weight, self.bias, self.eps).to(self.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * weight in float32 (Llama/Qwen2; weight multiplies directly, no `1 + w`)."""

    keep_fp32 = True

    def __init__(self, width: int, eps: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.eps, self.dtype = eps, dtype
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(torch.mean(x32 * x32, dim=-1, keepdim=True) + self.eps)
        return (x32 * self.weight).to(self.dtype)


class Attention(nn.Module):
    """q/k/v/out projections around `attend`; names configurable for the HF-named anchor.

    `kv_width`: width of the key/value source when it differs from the query stream's (a
    cross-attention reading another module's outputs; Flax's Dense takes it from the input)."""

    def __init__(self, width: int, heads: int, head_dim: int, kv_heads: int | None = None, qkv_bias: bool = True,
                 out_bias: bool = True, names: tuple[str, str, str, str] = ("query", "key", "value", "out"),
                 kv_width: int | None = None):
        super().__init__()
        self.heads, self.head_dim, self.kv_heads = heads, head_dim, kv_heads or heads
        self.names = names
        kv_width = kv_width or width
        setattr(self, names[0], nn.Linear(width, heads * head_dim, bias=qkv_bias))
        setattr(self, names[1], nn.Linear(kv_width, self.kv_heads * head_dim, bias=qkv_bias))
        setattr(self, names[2], nn.Linear(kv_width, self.kv_heads * head_dim, bias=qkv_bias))
        setattr(self, names[3], nn.Linear(heads * head_dim, width, bias=out_bias))

    # Sequence lengths are passed in as ints so that every Reshape gets a constant target shape
    # (-1 for the batch): shapes read off traced tensors become Shape/Concat chains that ONNX shape
    # inference cannot see through.
    def _split(self, x: Tensor, heads: int, length: int) -> Tensor:
        return x.reshape(-1, length, heads, self.head_dim)

    def project_q(self, x: Tensor, length: int) -> Tensor:
        """[b, length, width] → [b, length, heads, head_dim]."""
        return self._split(getattr(self, self.names[0])(x), self.heads, length)

    def project_kv(self, source: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """[b, length, width] → k, v [b, length, kv_heads, head_dim]."""
        return (self._split(getattr(self, self.names[1])(source), self.kv_heads, length),
                self._split(getattr(self, self.names[2])(source), self.kv_heads, length))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        return attend(q, k, v, mask, self.heads // self.kv_heads, self.head_dim)

    def output(self, heads_out: Tensor, length: int) -> Tensor:
        """[b, length, heads, head_dim] → [b, length, width]."""
        return getattr(self, self.names[3])(heads_out.reshape(-1, length, self.heads * self.head_dim))

    def forward(self, x: Tensor, mask: Tensor | None, length: int, context: Tensor | None = None,
                kv_length: int | None = None, rope: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """x [b, length, width]; context [b, kv_length, width] (cross-attention) or None."""
        q = self.project_q(x, length)
        k, v = self.project_kv(x, length) if context is None else self.project_kv(context, kv_length)
        if rope is not None:
            q, k = apply_rope(q, *rope, self.head_dim), apply_rope(k, *rope, self.head_dim)
        return self.output(self.attend(q, k, v, mask), length)


class Mlp(nn.Module):
    """`layers.Mlp`: gelu (exact erf), gelu_tanh, or swiglu; names configurable for the anchor."""

    def __init__(self, width: int, hidden: int, kind: str, bias: bool = True,
                 names: tuple[str, ...] = ("up", "down", "gate")):
        super().__init__()
        self.kind, self.names = kind, names
        setattr(self, names[0], nn.Linear(width, hidden, bias=bias))
        setattr(self, names[1], nn.Linear(hidden, width, bias=bias))
        if kind == "swiglu":
            setattr(self, names[2], nn.Linear(width, hidden, bias=bias))

    def forward(self, x: Tensor) -> Tensor:
        up, down = getattr(self, self.names[0]), getattr(self, self.names[1])
        if self.kind == "swiglu":
            h = F.silu(getattr(self, self.names[2])(x)) * up(x)
        else:
            h = F.gelu(up(x), approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return down(h)


class EncoderBlock(nn.Module):
    """`layers.EncoderBlock`: pre-LN, biased attention, exact-GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dtype: torch.dtype):
        super().__init__()
        self.ln_attn = LayerNorm(width, dtype=dtype)
        self.attn = Attention(width, heads, width // heads)
        self.ln_mlp = LayerNorm(width, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, "gelu")

    def forward(self, x: Tensor, mask: Tensor | None, length: int) -> Tensor:
        x = x + self.attn(self.ln_attn(x), mask, length)
        return x + self.mlp(self.ln_mlp(x))


class Stack(nn.Module):
    """`layers.LayerStack`: params under `layers.{i}` (the converter unstacks scanned params)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)

    def forward(self, x: Tensor, *args) -> Tensor:
        for block in self.layers:
            x = block(x, *args)
        return x


def key_mask(mask: Tensor) -> Tensor:
    """`attention_mask(None, mask, causal=False)`: [b, s] → [b, 1, 1, s]."""
    return mask[:, None, None, :]


# ------------------------------------------------------------------------------------ anchor


class VitBlock(nn.Module):
    """SigLIP encoder layer, HF names: layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.fc1/fc2."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        self.layer_norm1 = LayerNorm(c.width, c.layernorm_eps, dtype=dtype)
        self.self_attn = Attention(c.width, c.heads, c.width // c.heads,
                                   names=("q_proj", "k_proj", "v_proj", "out_proj"))
        self.layer_norm2 = LayerNorm(c.width, c.layernorm_eps, dtype=dtype)
        self.mlp = Mlp(c.width, c.mlp_dim, "gelu_tanh", names=("fc1", "fc2"))

    def forward(self, x: Tensor, length: int) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), None, length)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """SigLIP vision tower (`vit.VisionTransformer`): pixels [n, S, S, 3] in [-1, 1] → [n, patches, width]."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, c.width, c.patch_size, stride=c.patch_size)
        self.embeddings.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2, c.width)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([VitBlock(c, dtype) for _ in range(c.depth)])
        self.post_layernorm = LayerNorm(c.width, c.layernorm_eps, dtype=dtype)
        self.grid, self.width = c.image_size // c.patch_size, c.width

    def forward(self, pixels: Tensor) -> Tensor:
        x = self.embeddings.patch_embedding(pixels.to(self.dtype).permute(0, 3, 1, 2))  # NHWC → NCHW
        patches = self.grid * self.grid
        x = x.reshape(-1, self.width, patches).transpose(1, 2)  # [n, rows * cols, width], row-major like Flax
        x = x + self.embeddings.position_embedding.weight[None]
        for layer in self.encoder.layers:
            x = layer(x, patches)
        return self.post_layernorm(x)


class LMBlock(nn.Module):
    """Qwen2/Llama decoder layer, HF names."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        self.input_layernorm = RMSNorm(c.width, c.rms_eps, dtype=dtype)
        self.self_attn = Attention(c.width, c.heads, c.head_dim, c.kv_heads, qkv_bias=bool(c.qkv_bias),
                                   out_bias=False, names=("q_proj", "k_proj", "v_proj", "o_proj"))
        self.post_attention_layernorm = RMSNorm(c.width, c.rms_eps, dtype=dtype)
        self.mlp = Mlp(c.width, c.mlp_dim, "swiglu", bias=False, names=("up_proj", "down_proj", "gate_proj"))

    def forward(self, x: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor], length: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), mask, length, rope=rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderLM(nn.Module):
    """`lm.DecoderLM` up to the final norm (HF `last_hidden_state`); the LM head is not needed."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        self.c, self.dtype = c, dtype
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c.vocab_size, c.width)
        self.model.layers = nn.ModuleList([LMBlock(c, dtype) for _ in range(c.depth)])
        self.model.norm = RMSNorm(c.width, c.rms_eps, dtype=dtype)

    def embed(self, tokens: Tensor) -> Tensor:
        return self.model.embed_tokens(tokens).to(self.dtype)

    def forward(self, x: Tensor, mask: Tensor, length: int) -> Tensor:
        """x [b, length, width]; mask bool [b, length]. Causal, padded keys hidden, every query sees itself."""
        # positions = max(cumsum(mask) - 1, 0), as a float matmul (see the module docstring).
        upper = torch.triu(torch.ones(length, length, dtype=torch.float32))
        positions = torch.clamp(torch.matmul(mask.to(torch.float32), upper) - 1.0, min=0.0)
        rope = rope_tables(positions, self.c.head_dim, float(self.c.rope_theta))
        causal = torch.tril(torch.ones(length, length, dtype=torch.bool))
        eye = torch.eye(length, dtype=torch.bool)
        attn_mask = (key_mask(mask) & causal[None, None]) | eye[None, None]
        x = x.to(self.dtype)
        for layer in self.model.layers:
            x = layer(x, attn_mask, rope, length)
        return self.model.norm(x)


def segment_pool(x: Tensor, mask: Tensor, num_segments: int, t: int, w: int) -> tuple[Tensor, Tensor]:
    """`encoders.segment_pool`: masked means of contiguous segments, in float32.

    x [b, t, w], mask [b, t] → ([b, n, w] in x's dtype, [b, n] bool: segment has a valid step).
    """
    pad = (-t) % num_segments
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad))
    seg = (t + pad) // num_segments
    weights = mask.reshape(-1, num_segments, seg, 1).to(torch.float32)
    summed = (x.reshape(-1, num_segments, seg, w).to(torch.float32) * weights).sum(2)
    count = weights.sum(2)
    return (summed / torch.clamp(count, min=1.0)).to(x.dtype), count[..., 0] > 0


def same_pads(length: int, kernel: int, stride: int) -> tuple[int, int]:
    """XLA's "SAME" padding (low, high) for a strided conv (torch pads symmetrically only)."""
    out = -(-length // stride)
    total = max((out - 1) * stride + kernel - length, 0)
    return total // 2, total - total // 2
