"""A plain PyTorch mirror of VLA-Cabin's inference path (no JAX anywhere in this file).

    model = load_mirror("exported/")            # config.json + model.safetensors, strict load
    out = model(**inputs)                       # dict: action_tokens, explanation_tokens, z0, ...

It computes exactly what `VLACabin.infer` computes (latent means, the z0 mean, `K` unrolled Euler
steps of the DNFM sampler, argmax over the codebook logits, greedy explanation decoding), with the
same dtype policy as the Flax modules: in a float16 mirror the matmuls run in float16 while norms,
RoPE, attention logits and softmax, segment pooling, the codebook logits and the sampler state stay
in float32, as Flax does with `dtype=float16`.

Differences from the Flax code that do not change the result, and why:
- Masked attention logits are set to `torch_layers.MASKED_LOGIT` = -3e4 instead of JAX's -0.7 * float32 max: the
  softmax weight of a masked key is exp(-3e4 - max) = 0 either way, fully masked rows are uniform in
  both, and -3e4 stays finite when TensorRT runs the layer in fp16 (-inf there gives NaN rows).
- The LM positions `cumsum(mask) - 1` are a float matmul with a triangular matrix (exact for integers
  below 2^24) because TensorRT has no integer CumSum.
- The explanation decoder uses a key/value cache: causal attention makes position i depend only on
  tokens 0..i, so decoding one token at a time gives the tokens of the fixed-buffer loop.
- Training-only parameters (log-variance heads, reconstruction heads, an untied LM head) are absent.
- Sequence lengths come from the config as Python ints, never from traced tensor shapes, so every
  Reshape in the ONNX graph has a constant target (-1 only for the batch).

The shared blocks and the anchor live in `torch_layers`. The anchor submodules use Hugging Face
names (`vit.encoder.layers.0.self_attn.q_proj.weight`, `lm.model.layers.0.mlp.gate_proj.weight`),
the trainable ones the Flax names without the `dense`/`ln` wrappers
(`dnfm.blocks.layers.0.attn.query.weight`); `vlacabin_jax.export.convert` maps between them.

Input shapes (b = batch, dynamic in ONNX; the rest fixed by the config):
  text_tokens int32 [b, text_len], text_mask bool [b, text_len],
  mel float32 [b, mel_frames, n_mels], mel_mask bool [b, mel_frames],
  frames float32 [b, num_frames, S, S, 3] in [0, 1], frame_mask bool [b, num_frames],
  state_numeric float32 [b, n_num], state_categorical int32 [b, n_cat],
  modality_mask bool [b, 4] (speech, text, video, state), constraint_tags bool [b, n_tags].
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlacabin_jax.export.torch_layers import (Attention, DecoderLM, EncoderBlock, LayerNorm, Mlp, Stack,
                                              VisionTransformer, key_mask, same_pads, segment_pool, sinusoidal)

FORMAT = "vlacabin.torch_mirror"
# 2: the text encoder RMS-normalises its input embeddings; `model.bridge.connector_reads`.
FORMAT_VERSION = 2
INPUT_NAMES = ("text_tokens", "text_mask", "mel", "mel_mask", "frames", "frame_mask", "state_numeric",
               "state_categorical", "modality_mask", "constraint_tags")
OUTPUT_NAMES = ("action_tokens", "explanation_tokens", "z0", "velocities", "x1", "action_logits", "context")
MAX_STEPS = 8


def namespace(obj: Any) -> Any:
    """Nested mappings → attribute access (the config.json side of `ml_collections`)."""
    if isinstance(obj, Mapping):
        return SimpleNamespace(**{k: namespace(v) for k, v in obj.items()})
    return obj


# ------------------------------------------------------------------------------------ encoders


class GaussianMean(nn.Module):
    """The mean half of `encoders.GaussianHead` (inference uses the means); output float32."""

    def __init__(self, width: int, features: int):
        super().__init__()
        self.mean = nn.Linear(width, features)

    def forward(self, x: Tensor) -> Tensor:
        return self.mean(x).to(torch.float32)


class AttentionPool(nn.Module):
    """`encoders.AttentionPool`: learned queries cross-attend over a masked sequence, then LN."""

    def __init__(self, num_tokens: int, width: int, heads: int, dtype: torch.dtype):
        super().__init__()
        self.queries = nn.Parameter(torch.zeros(num_tokens, width))
        self.attn = Attention(width, heads, width // heads)
        self.ln = LayerNorm(width, dtype=dtype)

    def forward(self, x: Tensor, mask: Tensor | None, length: int) -> Tensor:
        """x [b, length, width], mask [b, length] or None → [b, num_tokens, width]."""
        queries = self.queries[None].expand(x.shape[0], *self.queries.shape)
        mask = None if mask is None else key_mask(mask)
        return self.ln(self.attn(queries, mask, self.queries.shape[0], context=x, kv_length=length))


class _Encoder(nn.Module):
    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        self.c, self.dtype = c, dtype
        e = c.model.encoder
        self.width = e.width

    def _stack(self) -> Stack:
        e = self.c.model.encoder
        return Stack([EncoderBlock(e.width, e.heads, e.mlp_dim, self.dtype) for _ in range(e.depth)])

    def _positions(self, length: int) -> Tensor:
        return sinusoidal(torch.arange(length), self.width).to(self.dtype)


class SpeechEncoder(_Encoder):
    """log-mel [b, t, n_mels], mask [b, t] → (means [b, n, d_latent], token mask [b, n])."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__(c, dtype)
        m = c.model
        self.conv_0 = nn.Conv1d(m.speech.n_mels, self.width, 3, stride=2)
        self.conv_1 = nn.Conv1d(self.width, self.width, 3, stride=2)
        self.encoder = self._stack()
        self.ln = LayerNorm(self.width, dtype=dtype)
        self.gaussian = GaussianMean(self.width, m.latent.d_latent)
        frames = c.data.mel_frames
        self.pads = (same_pads(frames, 3, 2), same_pads(-(-frames // 2), 3, 2))
        self.length = -(-(-(-frames // 2)) // 2)  # steps after the two stride-2 convs

    def forward(self, mel: Tensor, mel_mask: Tensor) -> tuple[Tensor, Tensor]:
        x = mel.to(self.dtype).transpose(1, 2)  # [b, n_mels, t]: torch convs are channels-first
        for conv, pads in ((self.conv_0, self.pads[0]), (self.conv_1, self.pads[1])):
            x = F.gelu(conv(F.pad(x, pads)), approximate="none")
        x = x.transpose(1, 2)
        mask = mel_mask[:, ::4][:, :self.length]
        x = x + self._positions(self.length)
        x = self.ln(self.encoder(x, key_mask(mask), self.length))
        pooled, token_mask = segment_pool(x, mask, self.c.model.latent.tokens_per_modality, self.length, self.width)
        return self.gaussian(pooled), token_mask


class TextEncoder(_Encoder):
    """Frozen-LM token embeddings [b, l, d_lm], mask [b, l] → means [b, n, d_latent] (all tokens valid)."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__(c, dtype)
        m, e = c.model, c.model.encoder
        self.proj = nn.Linear(m.lm.width, e.width, bias=False)
        self.encoder = self._stack()
        self.pool = AttentionPool(m.latent.tokens_per_modality, e.width, e.heads, dtype)
        self.gaussian = GaussianMean(e.width, m.latent.d_latent)

    def forward(self, token_embeddings: Tensor, text_mask: Tensor) -> Tensor:
        e = token_embeddings.float()  # `encoders.rms_normalize`: in fp32, no scale
        x = self.proj((e * torch.rsqrt(e.pow(2).mean(-1, keepdim=True) + 1e-6)).to(token_embeddings.dtype))
        length = self.c.data.text_len
        x = x + self._positions(length)
        x = self.encoder(x, key_mask(text_mask), length)
        return self.gaussian(self.pool(x, text_mask, length))


class VideoEncoder(_Encoder):
    """Per-frame ViT features [b, f, d_vit], mask [b, f] → (means [b, n, d_latent], token mask [b, n])."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__(c, dtype)
        m, e = c.model, c.model.encoder
        self.proj = nn.Linear(m.vit.width, e.width, bias=False)
        self.temporal = self._stack()
        self.ln = LayerNorm(e.width, dtype=dtype)
        self.gaussian = GaussianMean(e.width, m.latent.d_latent)

    def forward(self, frame_features: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.proj(frame_features)
        frames = self.c.data.num_frames
        x = x + self._positions(frames)
        x = self.ln(self.temporal(x, key_mask(frame_mask), frames))
        pooled, token_mask = segment_pool(x, frame_mask, self.c.model.latent.tokens_per_modality, frames, self.width)
        return self.gaussian(pooled), token_mask


class StateEncoder(_Encoder):
    """numeric [b, n_num] float, categorical [b, n_cat] int → means [b, n, d_latent]."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__(c, dtype)
        m, e = c.model, c.model.encoder
        sizes = [int(s) for s in m.state.categorical_sizes]
        self.numeric_scale = nn.Parameter(torch.zeros(m.state.numeric_dim, e.width))
        self.numeric_shift = nn.Parameter(torch.zeros(m.state.numeric_dim, e.width))
        self.categorical = nn.Embedding(sum(sizes), e.width)
        self.ln_mlp = LayerNorm(e.width, dtype=dtype)
        self.mlp = Mlp(e.width, e.mlp_dim, "gelu")
        self.pool = AttentionPool(m.latent.tokens_per_modality, e.width, e.heads, dtype)
        self.gaussian = GaussianMean(e.width, m.latent.d_latent)
        # int32 index arithmetic throughout: TensorRT's integer support is int32 first.
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int32), persistent=False)
        self.register_buffer("max_ids", torch.tensor([s - 1 for s in sizes], dtype=torch.int32), persistent=False)
        self.register_buffer("zero", torch.zeros((), dtype=torch.int32), persistent=False)

    def forward(self, numeric: Tensor, categorical: Tensor) -> Tensor:
        num_tokens = numeric.to(self.dtype)[..., None] * self.numeric_scale + self.numeric_shift
        ids = torch.minimum(torch.maximum(categorical.to(torch.int32), self.zero), self.max_ids) + self.offsets
        x = torch.cat([num_tokens, self.categorical(ids)], dim=1)
        x = x + self.mlp(self.ln_mlp(x))
        return self.gaussian(self.pool(x, None, self.numeric_scale.shape[0] + self.offsets.shape[0]))


# ------------------------------------------------------------------------------------ bridge, DNFM, explanation


class BridgeInputs(nn.Module):
    """`bridge.BridgeInputs`: latent tokens [b, n, d_latent] → [b, n, d_lm], plus tag tokens [b, n_tags, d_lm]."""

    def __init__(self, c: Any, num_modalities: int, dtype: torch.dtype):
        super().__init__()
        m = c.model
        self.dtype, self.n_tok = dtype, m.latent.tokens_per_modality
        self.latent_proj = nn.Linear(m.latent.d_latent, m.lm.width)
        self.modality_embedding = nn.Parameter(torch.zeros(num_modalities, m.lm.width))
        self.temporal_proj = nn.Linear(64, m.lm.width, bias=False)
        self.tag_embedding = nn.Parameter(torch.zeros(m.bridge.n_constraint_tags, m.lm.width))

    def forward(self, latents: Tensor, batch_size_like: Tensor) -> tuple[Tensor, Tensor]:
        n_mod = self.modality_embedding.shape[0]
        x = self.latent_proj(latents.to(self.dtype))
        modality = self.modality_embedding.repeat_interleave(self.n_tok, dim=0)  # modality_ids = repeat(arange)
        slots = torch.arange(self.n_tok).repeat(n_mod)  # slots = tile(arange)
        temporal = self.temporal_proj(sinusoidal(slots, 64).to(self.dtype))
        x = x + modality[None] + temporal[None]
        tags = self.tag_embedding[None].expand(batch_size_like.shape[0], *self.tag_embedding.shape)
        return x, tags


class Connector(nn.Module):
    """`bridge.Connector`: LM outputs [b, l, d_lm] ending with the q query positions, mask [b, l] →
    (context [b, q, width], z0 mean [b, A, d_action])."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        m, k = c.model, c.model.bridge.connector
        self.proj = nn.Linear(m.lm.width, k.width)
        self.encoder = Stack([EncoderBlock(k.width, k.heads, k.mlp_dim, dtype) for _ in range(k.depth)])
        self.ln = LayerNorm(k.width, dtype=dtype)
        self.query_to_action = nn.Parameter(torch.zeros(m.bridge.n_queries, m.action_len))
        self.action_slot_embedding = nn.Parameter(torch.zeros(m.action_len, k.width))
        self.z0 = GaussianMean(k.width, m.dnfm.d_action)

    def forward(self, hidden: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        x = self.encoder(self.proj(hidden), key_mask(mask), hidden.shape[1])
        context = self.ln(x[:, hidden.shape[1] - self.query_to_action.shape[0]:])
        slots = torch.matmul(context.transpose(1, 2), self.query_to_action).transpose(1, 2)  # bqw,qa->baw
        return context, self.z0(slots + self.action_slot_embedding)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class AdaLNBlock(nn.Module):
    """`dnfm.AdaLNBlock`; `jnp.split(mod, 6)` order: shift_a, scale_a, gate_a, shift_m, scale_m, gate_m."""

    def __init__(self, width: int, heads: int, mlp_dim: int, length: int, dtype: torch.dtype):
        super().__init__()
        self.length = length
        self.modulation = nn.Linear(width, 6 * width)
        self.ln_attn = LayerNorm(width, affine=False, dtype=dtype)
        self.attn = Attention(width, heads, width // heads)
        self.ln_mlp = LayerNorm(width, affine=False, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, "gelu")

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(cond)).chunk(6, dim=-1)
        h = self.attn(modulate(self.ln_attn(x), shift_a, scale_a), None, self.length)
        x = x + gate_a[:, None, :] * h
        return x + gate_m[:, None, :] * self.mlp(modulate(self.ln_mlp(x), shift_m, scale_m))


class DNFM(nn.Module):
    """`dnfm.DNFM`: normalised codebook, codebook logits, velocity network v(x_t, t)."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        m, d = c.model, c.model.dnfm
        self.dtype, self.d_action, self.temperature = dtype, d.d_action, float(d.temperature)
        self.action_codebook = nn.Parameter(torch.zeros(d.vocab_size, d.d_action))
        self.action_codebook.keep_fp32 = True  # the codebook and its logits are float32 in Flax too
        self.in_proj = nn.Linear(d.d_action, d.width)
        self.position_embedding = nn.Parameter(torch.zeros(m.action_len, d.width))
        self.time_in = nn.Linear(256, d.width)
        self.time_out = nn.Linear(d.width, d.width)
        self.blocks = Stack([AdaLNBlock(d.width, d.heads, d.mlp_dim, m.action_len, dtype) for _ in range(d.depth)])
        self.final_modulation = nn.Linear(d.width, 2 * d.width)
        self.final_ln = LayerNorm(d.width, affine=False, dtype=dtype)
        self.out_proj = nn.Linear(d.width, d.d_action)

    def codebook(self) -> Tensor:
        """Rows rescaled to norm sqrt(d_action), float32 [vocab, d_action]."""
        e = self.action_codebook.to(torch.float32)
        return e * torch.rsqrt(torch.mean(e * e, dim=-1, keepdim=True) + 1e-12)

    def logits(self, x: Tensor) -> Tensor:
        """[b, l, d_action] → [b, l, vocab] float32: x · Eᵀ / (d_action · τ)."""
        return torch.matmul(x.to(torch.float32), self.codebook().t()) / (self.d_action * self.temperature)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """x_t [b, l, d_action] float32; t [1] or [b] → velocity [b, l, d_action] float32."""
        h = self.in_proj(x_t.to(self.dtype)) + self.position_embedding[None]
        cond = self.time_out(F.silu(self.time_in(sinusoidal(t * 1000.0, 256).to(self.dtype))))
        h = self.blocks(h, cond)
        shift, scale = self.final_modulation(F.silu(cond)).chunk(2, dim=-1)
        return self.out_proj(modulate(self.final_ln(h), shift, scale)).to(torch.float32)


class ExplainBlock(nn.Module):
    """`explain.DecoderBlock`: causal self-attention, cross-attention to the context, GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_dim: int, dtype: torch.dtype):
        super().__init__()
        self.ln_self = LayerNorm(width, dtype=dtype)
        self.self_attn = Attention(width, heads, width // heads)
        self.ln_cross = LayerNorm(width, dtype=dtype)
        self.cross_attn = Attention(width, heads, width // heads)
        self.ln_mlp = LayerNorm(width, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, "gelu")

    def step(self, x: Tensor, cache: list[Tensor], cross_kv: tuple[Tensor, Tensor]) -> Tensor:
        """One new position x [b, 1, w]; `cache` holds this layer's [k, v] of earlier positions
        ([b, i, heads, hd], or empty) and is extended in place."""
        h = self.ln_self(x)
        k, v = self.self_attn.project_kv(h, 1)
        if cache:
            k, v = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        cache[:] = [k, v]
        x = x + self.self_attn.output(self.self_attn.attend(self.self_attn.project_q(h, 1), k, v, None), 1)
        h = self.ln_cross(x)
        x = x + self.cross_attn.output(self.cross_attn.attend(self.cross_attn.project_q(h, 1), *cross_kv, None), 1)
        return x + self.mlp(self.ln_mlp(x))


class ExplanationHead(nn.Module):
    """`explain.ExplanationHead` with greedy decoding (`explain.greedy_decode`), unrolled."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        m, e = c.model, c.model.explain
        self.dtype, self.length = dtype, m.explain_len
        self.bos, self.eos, self.pad = m.text_bos_id, m.text_eos_id, m.text_pad_id
        self.n_queries = m.bridge.n_queries
        self.token_embedding = nn.Embedding(e.vocab_size, e.width)
        self.position_embedding = nn.Parameter(torch.zeros(m.explain_len, e.width))
        self.context_proj = nn.Linear(m.bridge.connector.width, e.width)
        self.decoder = Stack([ExplainBlock(e.width, e.heads, e.mlp_dim, dtype) for _ in range(e.depth)])
        self.ln_out = LayerNorm(e.width, dtype=dtype)

    def forward(self, context: Tensor) -> Tensor:
        """context [b, q, connector width] → tokens [b, explain_len] int32: <bos>, greedy tokens,
        <eos>, then <pad> (exactly `greedy_decode`'s buffer)."""
        ctx = self.context_proj(context)
        layers = list(self.decoder.layers)
        cross = [layer.cross_attn.project_kv(ctx, self.n_queries) for layer in layers]
        caches: list[list[Tensor]] = [[] for _ in layers]
        first = torch.zeros_like(context[:, 0, 0], dtype=torch.int32) + self.bos  # [b], follows the batch
        token, done, out = first, torch.zeros_like(first, dtype=torch.bool), [first]
        table = self.token_embedding.weight
        for i in range(self.length - 1):
            x = (self.token_embedding(token) + self.position_embedding[i]).to(self.dtype)[:, None, :]
            for layer, cache, kv in zip(layers, caches, cross):
                x = layer.step(x, cache, kv)
            # Tied output projection as table @ hᵀ: the tracer would store a transposed copy of the
            # (vocabulary-sized) embedding for h @ tableᵀ.
            logits = torch.matmul(table, self.ln_out(x)[:, 0].transpose(0, 1)).transpose(0, 1).to(torch.float32)
            best = torch.argmax(logits, dim=-1).to(torch.int32)
            token = torch.where(done, torch.full_like(first, self.pad), best)
            done = done | (token == self.eos)
            out.append(token)
        return torch.stack(out, dim=1)


# ------------------------------------------------------------------------------------ the model


class VLACabinMirror(nn.Module):
    """The inference path of `VLACabin` (see the module docstring).

    Args:
      config: the dict of config.json: {"format", "format_version", "model" (cfg.model as a dict),
        "data" {text_len, mel_frames, num_frames}, "steps" (K of the sampler, 1..8), ...}.
      dtype: compute dtype, torch.float32 or torch.float16 (norm params and the codebook stay fp32).
    """

    def __init__(self, config: Mapping[str, Any], dtype: torch.dtype = torch.float32):
        super().__init__()
        check_config(config)
        c = namespace(config)
        m = c.model
        self.config, self.cfg, self.dtype, self.steps = dict(config), c, dtype, int(config["steps"])
        self.vit = VisionTransformer(m.vit, dtype)
        self.lm = DecoderLM(m.lm, dtype)
        self.speech_encoder = SpeechEncoder(c, dtype)
        self.text_encoder = TextEncoder(c, dtype)
        self.video_encoder = VideoEncoder(c, dtype)
        self.state_encoder = StateEncoder(c, dtype)
        self.bridge_inputs = BridgeInputs(c, 4, dtype)
        self.queries = nn.Module()
        self.queries.queries = nn.Parameter(torch.zeros(m.bridge.n_queries, m.lm.width))
        self.connector = Connector(c, dtype)
        self.dnfm = DNFM(c, dtype)
        self.explanation = ExplanationHead(c, dtype)
        cast_to_compute_dtype(self, dtype)

    # The stages, separately callable (and what `verify` compares with the JAX intermediates).
    def encode(self, text_tokens, text_mask, mel, mel_mask, frames, frame_mask, state_numeric,
               state_categorical, modality_mask) -> tuple[Tensor, Tensor]:
        """→ latent means [b, 4, n, d_latent] float32, mask [b, 4, n] bool (`VLACabin.encode`)."""
        m, f = self.cfg.model, self.cfg.data.num_frames
        size = m.vit.image_size
        pixels = frames.reshape(-1, size, size, 3).to(self.dtype) * 2.0 - 1.0
        feats = self.vit(pixels)
        per_frame = feats.mean(dim=1).reshape(-1, f, m.vit.width)
        speech, speech_mask = self.speech_encoder(mel, mel_mask)
        text = self.text_encoder(self.lm.embed(text_tokens), text_mask)
        video, video_mask = self.video_encoder(per_frame, frame_mask)
        state = self.state_encoder(state_numeric, state_categorical)
        ones = torch.ones_like(speech_mask)
        means = torch.stack([speech, text, video, state], dim=1)
        mask = torch.stack([speech_mask, ones, video_mask, ones], dim=1) & modality_mask[:, :, None]
        return means, mask

    def context(self, latents: Tensor, latent_mask: Tensor, text_tokens: Tensor, text_mask: Tensor,
                constraint_tags: Tensor) -> tuple[Tensor, Tensor]:
        """→ (context [b, q, width], z0 mean [b, A, d_action] float32) (`VLACabin.context`)."""
        m = self.cfg.model
        n_mod, n_tok, d = 4, m.latent.tokens_per_modality, m.latent.d_latent
        latent_tokens, tag_tokens = self.bridge_inputs(latents.reshape(-1, n_mod * n_tok, d), text_tokens)
        text = self.lm.embed(text_tokens)
        queries = self.queries.queries.to(self.dtype)[None].expand(text.shape[0], *self.queries.queries.shape)
        seq = torch.cat([latent_tokens, tag_tokens, text, queries], dim=1)
        mask = torch.cat([latent_mask.reshape(-1, n_mod * n_tok), constraint_tags, text_mask,
                          torch.ones_like(queries[:, :, 0], dtype=torch.bool)], dim=1)
        length = n_mod * n_tok + m.bridge.n_constraint_tags + self.cfg.data.text_len + m.bridge.n_queries
        hidden = self.lm(seq, mask, length)
        start = length - m.bridge.n_queries if m.bridge.connector_reads == "queries" else 0
        return self.connector(hidden[:, start:length], mask[:, start:length])

    def sample(self, z0: Tensor) -> tuple[Tensor, Tensor]:
        """K Euler steps from z0 (`dnfm.euler_sample`): → (x1 [b, A, d], velocities [b, K, A, d])."""
        x, dt, velocities = z0.to(torch.float32), 1.0 / self.steps, []
        for k in range(self.steps):
            t = torch.full((1,), k * dt, dtype=torch.float32)  # the same t for every sample
            v = self.dnfm(x, t)
            velocities.append(v)
            x = x + dt * v
        return x, torch.stack(velocities, dim=1)

    def forward(self, text_tokens, text_mask, mel, mel_mask, frames, frame_mask, state_numeric,
                state_categorical, modality_mask, constraint_tags) -> dict[str, Tensor]:
        """Inputs as in the module docstring. Returns {action_tokens int32 [b, A], explanation_tokens
        int32 [b, explain_len], z0 [b, A, d], velocities [b, K, A, d], x1 [b, A, d],
        action_logits [b, A, vocab], context [b, q, width]} (all float outputs float32)."""
        means, mask = self.encode(text_tokens, text_mask, mel, mel_mask, frames, frame_mask, state_numeric,
                                  state_categorical, modality_mask)
        context, z0 = self.context(means, mask, text_tokens, text_mask, constraint_tags)
        x1, velocities = self.sample(z0)
        logits = self.dnfm.logits(x1)
        return {"action_tokens": torch.argmax(logits, dim=-1).to(torch.int32),
                "explanation_tokens": self.explanation(context), "z0": z0, "velocities": velocities,
                "x1": x1, "action_logits": logits, "context": context.to(torch.float32)}


def cast_to_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Every param to `dtype` except norm params and params tagged `keep_fp32` (Flax keeps these
    in float32 whatever the compute dtype)."""
    for module in model.modules():
        keep = getattr(module, "keep_fp32", False)
        for param in module.parameters(recurse=False):
            if not keep and not getattr(param, "keep_fp32", False):
                param.data = param.data.to(dtype)


def check_config(config: Mapping[str, Any]) -> None:
    """config.json must be ours, of this format version, with a supported K."""
    if config.get("format") != FORMAT:
        raise ValueError(f"not a VLA-Cabin mirror config (format must be {FORMAT!r}, got {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"mirror config format_version {config.get('format_version')!r} is not supported "
                         f"(this code reads {FORMAT_VERSION}); export the checkpoint again with this code")
    steps = config.get("steps")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"sampler steps K={steps!r} not supported (1..{MAX_STEPS})")


def example_inputs(config: Mapping[str, Any], batch_size: int, seed: int = 0) -> dict[str, Tensor]:
    """Random inputs of the right shapes and dtypes (every modality present); for tracing and tests."""
    c = namespace(config)
    m, d = c.model, c.data
    g = torch.Generator().manual_seed(seed)
    size = m.vit.image_size
    sizes = torch.tensor([int(s) for s in m.state.categorical_sizes])
    return {
        "text_tokens": torch.randint(5, m.lm.vocab_size, (batch_size, d.text_len), generator=g, dtype=torch.int32),
        "text_mask": torch.ones(batch_size, d.text_len, dtype=torch.bool),
        "mel": torch.randn(batch_size, d.mel_frames, m.speech.n_mels, generator=g),
        "mel_mask": torch.ones(batch_size, d.mel_frames, dtype=torch.bool),
        "frames": torch.rand(batch_size, d.num_frames, size, size, 3, generator=g),
        "frame_mask": torch.ones(batch_size, d.num_frames, dtype=torch.bool),
        "state_numeric": torch.randn(batch_size, m.state.numeric_dim, generator=g),
        "state_categorical": (torch.rand(batch_size, len(sizes), generator=g) * sizes).to(torch.int32),
        "modality_mask": torch.ones(batch_size, 4, dtype=torch.bool),
        "constraint_tags": torch.rand(batch_size, m.bridge.n_constraint_tags, generator=g) < 0.3,
    }


def io_spec(config: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
    """Names, dtypes and shapes ("batch" first) of the inputs and outputs (mirror and ONNX alike)."""
    m, d = namespace(config["model"]), namespace(config["data"])
    size, a, k = m.vit.image_size, m.action_len, int(config["steps"])
    shapes_in = {"text_tokens": ("int32", [d.text_len]), "text_mask": ("bool", [d.text_len]),
                 "mel": ("float32", [d.mel_frames, m.speech.n_mels]), "mel_mask": ("bool", [d.mel_frames]),
                 "frames": ("float32", [d.num_frames, size, size, 3]), "frame_mask": ("bool", [d.num_frames]),
                 "state_numeric": ("float32", [m.state.numeric_dim]),
                 "state_categorical": ("int32", [len(m.state.categorical_sizes)]),
                 "modality_mask": ("bool", [4]), "constraint_tags": ("bool", [m.bridge.n_constraint_tags])}
    shapes_out = {"action_tokens": ("int32", [a]), "explanation_tokens": ("int32", [m.explain_len]),
                  "z0": ("float32", [a, m.dnfm.d_action]), "velocities": ("float32", [k, a, m.dnfm.d_action]),
                  "x1": ("float32", [a, m.dnfm.d_action]), "action_logits": ("float32", [a, m.dnfm.vocab_size]),
                  "context": ("float32", [m.bridge.n_queries, m.bridge.connector.width])}
    entry = lambda dt, shape: {"dtype": dt, "shape": ["batch"] + shape}  # noqa: E731
    return {"inputs": {k: entry(*shapes_in[k]) for k in INPUT_NAMES},
            "outputs": {k: entry(*shapes_out[k]) for k in OUTPUT_NAMES}}


def load_mirror(directory: str | Path, dtype: torch.dtype = torch.float32) -> VLACabinMirror:
    """Rebuild the mirror from an export directory (config.json + model.safetensors), strictly:
    every tensor of the file fills a parameter of the right shape and every parameter is filled."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    model = VLACabinMirror(config, dtype)
    state = load_file(str(directory / "model.safetensors"))
    load_strict(model, state)
    return model.eval()


def load_strict(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """`load_state_dict(strict=True)` plus a shape check with one readable error."""
    own = model.state_dict()
    bad = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
           for k in sorted(set(own) & set(state)) if tuple(state[k].shape) != tuple(own[k].shape)]
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    problems = [f"missing {missing[:8]}" if missing else "", f"unexpected {unexpected[:8]}" if unexpected else "",
                f"wrong shapes {bad[:8]}" if bad else ""]
    if any(problems):
        raise ValueError("weights do not fit the mirror: " + "; ".join(p for p in problems if p))
    model.load_state_dict(dict(state), strict=True)
