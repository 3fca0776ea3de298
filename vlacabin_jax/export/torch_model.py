"""A plain PyTorch mirror of VLA-Cabin's inference path (no JAX anywhere in this file).

    model = load_mirror("exported/")            # config.json + model.safetensors, strict load
    out = model(**inputs)                       # dict: action_tokens, explanation_tokens, z0, ...

It computes exactly what `VLACabin.infer` computes (latent means on one flat token axis, the z0
mean, `K` unrolled Euler steps of the DNFM sampler, the action decode -- greedy under the action
grammar with `model.dnfm.constrained_decode`, else the per-position argmax; under the per-setting
layout each setting's argmax, rebuilt into a sequence -- and greedy explanation decoding), with
the same dtype policy as the Flax modules: in a float16 mirror the matmuls run in float16 while
norms, RoPE, attention logits and softmax, segment pooling, the state encoder's Fourier features,
the codebook logits and the sampler state stay in float32, as Flax does with `dtype=float16`.

Every route a config can switch is mirrored, read from config.json's `model` section:
  model.state.field_tokens     one Gaussian latent token per state field (no attention pool)
  model.state.numeric_fourier  numeric field x → [x, sin(π 2^k x), cos(π 2^k x)], k < F, then a
                               per-field map `numeric_scale` [n_num, 1 + 2F, width]
  model.video.patch_tokens     ViT patch features kept apart through the temporal encoder, then an
                               attention pool (else per-frame means and time segments)
  model.bridge.connector_reads "all" LM positions or the "queries" only
  model.bridge.connector_skip  connector input + skip_proj(rms_normalize(LM input))
  model.dnfm.cross_attention   each DNFM block cross-attends to the connector's outputs (memory)
  model.dnfm.constrained_decode  grammar-constrained greedy decode of the action ids
  model.dnfm.layout            "sequence" (A = action_len DNFM positions, missing in configs written
                               before it) or "per_setting" (A = one position per setting path, logits
                               masked to the path's values, `settings_to_sequence` decode; its tables
                               come from config.json's "setting_layout", `setting_layout_tables`)
`model.action_head = "autoregressive"` (the quality ladder's baseline) is refused by `check_config`.

Differences from the Flax code that do not change the result, and why:
- Masked attention logits are set to `torch_layers.MASKED_LOGIT` = -3e4 instead of JAX's -0.7 * float32 max: the
  softmax weight of a masked key is exp(-3e4 - max) = 0 either way, fully masked rows are uniform in
  both, and -3e4 stays finite when TensorRT runs the layer in fp16 (-inf there gives NaN rows).
- The LM positions `cumsum(mask) - 1` are a float matmul with a triangular matrix (exact for integers
  below 2^24) because TensorRT has no integer CumSum.
- The explanation decoder uses a key/value cache: causal attention makes position i depend only on
  tokens 0..i, so decoding one token at a time gives the tokens of the fixed-buffer loop.
- The DNFM's cross-attention keys/values of the memory are projected once and reused by all K
  sampler steps (the memory does not change along the path; Flax recomputes the same values).
- The constrained decode is unrolled over the action positions with `where` masks (no loop, no
  boolean indexing); it is `dnfm.grammar_step` transcribed, ties broken to the lowest id as
  `jnp.argmax` / `torch.argmax` / ONNX ArgMax all do.
- The per-setting decode's `jnp.argsort` (stable) is its inverse permutation counted with
  comparisons, each setting's slot = how many settings sort before it: Less / Where / ReduceSum
  on a [b, A, A] table, no Sort or TopK in the graph, and the same order, ties included.
- The per-setting tables (`setting_layout.layout_tables`) are read from config.json, where the
  export wrote them: `setting_layout` imports JAX, and this file must not.
- Per-modality index tables (modality id and slot of each latent token, the state encoder's
  Fourier frequencies) are constant buffers computed from the config in Python.
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
  frames uint8 [b, num_frames, S, S, 3]: raw RGB camera bytes in [0, 255] (the graph scales them:
    float32 x / 255, then [-1, 1] in the compute dtype, as the Flax model), frame_mask bool [b, num_frames],
  state_numeric float32 [b, n_num], state_categorical int32 [b, n_cat],
  modality_mask bool [b, 4] (speech, text, video, state), constraint_tags bool [b, n_tags],
  history_actions int32 [b, action_len]: the earlier turn's action log, action-vocabulary ids
    (executed tokens in order, <eos>, then <pad> = 0; [<noop>, <eos>, <pad>...] for a turn that
    did nothing; all <pad> without an earlier turn -- `spec.batch_spec`),
  history_before int32 [b, action_len]: aligned with it, the `path=value` id each executed token's
    path had before (<noop> under <noop>, <pad> elsewhere).
  Ids must lie in [0, vocab) (text and action vocabularies): like the Flax embeddings, the
  graph does not clamp them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlacabin_jax.export.torch_layers import (Attention, DecoderLM, EncoderBlock, LayerNorm, Mlp, Stack,
                                              VisionTransformer, key_mask, rms_normalize, same_pads, segment_pool,
                                              sinusoidal)

FORMAT = "vlacabin.torch_mirror"
# 2: the text encoder RMS-normalises its input embeddings; `model.bridge.connector_reads`.
# 3: the action-log inputs `history_actions` / `history_before`; one flat latent token axis; the
#    routes `state.field_tokens`, `state.numeric_fourier` (numeric_scale [n_num, 1 + 2F, width]),
#    `video.patch_tokens`, `bridge.connector_skip`, `dnfm.cross_attention`, `dnfm.constrained_decode`.
# 4: `frames` is uint8 RGB [0, 255] (raw camera bytes), scaled inside the model / graph.
# 5: `model.dnfm.layout` ("per_setting": DNFM outputs over one position per setting path, the
#    tables in "setting_layout"); a version 4 config has no layout and reads as "sequence".
FORMAT_VERSION = 5
READABLE_VERSIONS = (4, 5)
INPUT_NAMES = ("text_tokens", "text_mask", "mel", "mel_mask", "frames", "frame_mask", "state_numeric",
               "state_categorical", "modality_mask", "constraint_tags", "history_actions", "history_before")
# Element types of the inputs (mirror, ONNX graph and config.json "io" alike): ids int32, masks
# bool, features float32, frames uint8 (`spec.batch_spec`).
INPUT_DTYPES = {"text_tokens": "int32", "text_mask": "bool", "mel": "float32", "mel_mask": "bool", "frames": "uint8",
                "frame_mask": "bool", "state_numeric": "float32", "state_categorical": "int32",
                "modality_mask": "bool", "constraint_tags": "bool", "history_actions": "int32",
                "history_before": "int32"}
OUTPUT_NAMES = ("action_tokens", "explanation_tokens", "z0", "velocities", "x1", "action_logits", "context")
MAX_STEPS = 8
MODALITIES = ("speech", "text", "video", "state")  # `spec.MODALITIES`: the latent token axis order
# Action-vocabulary ids of the grammar's special tokens (`vlacabin_jax.data.actions`; the exported
# action_vocabulary.json holds them at these ids).
PAD_ID, EOS_ID, NOOP_ID = 0, 1, 2
# `jnp.finfo(jnp.float32).min`: the logit of a token the grammar forbids (`dnfm.grammar_step`).
FORBIDDEN_LOGIT = float(torch.finfo(torch.float32).min)


def namespace(obj: Any) -> Any:
    """Nested mappings → attribute access (the config.json side of `ml_collections`)."""
    if isinstance(obj, Mapping):
        return SimpleNamespace(**{k: namespace(v) for k, v in obj.items()})
    return obj


def latent_counts(m: Any) -> tuple[int, ...]:
    """`vla_cabin.latent_counts`: latent tokens per modality in `MODALITIES` order (`m`: the model
    section). Every modality has `latent.tokens_per_modality`, except the state with
    `state.field_tokens`: one token per numeric and per categorical field."""
    n = int(m.latent.tokens_per_modality)
    state = int(m.state.numeric_dim) + len(m.state.categorical_sizes) if m.state.field_tokens else n
    return tuple(state if name == "state" else n for name in MODALITIES)


def latent_layout(m: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`vla_cabin.latent_layout`: (modality id, slot within the modality) of every latent token."""
    counts = latent_counts(m)
    return (tuple(i for i, n in enumerate(counts) for _ in range(n)),
            tuple(j for n in counts for j in range(n)))


def dnfm_layout(m: Any) -> str:
    """`model.dnfm.layout` of the model section `m`; configs written before the field are "sequence"."""
    return getattr(m.dnfm, "layout", "sequence")


def num_positions(c: Any) -> int:
    """`setting_layout.num_positions`: the DNFM's positions A of a mirror config (`namespace`d):
    `action_len`, or under the per-setting layout one per setting path."""
    if dnfm_layout(c.model) == "per_setting":
        return len(c.setting_layout.paths)
    return int(c.model.action_len)


def setting_layout_tables(c: Any) -> tuple[Tensor, Tensor]:
    """The per-setting tables of a mirror config (`namespace`d; its "setting_layout" entry, which
    `convert.mirror_config` copies from `setting_layout.layout_tables`) → (value_mask [A, vocab]
    bool: the path's own values and `<pad>`, as `LayoutTables.value_mask`; decode_rank [vocab] int32)."""
    path_of_token = torch.tensor(c.setting_layout.path_of_token, dtype=torch.int32)
    paths = torch.arange(len(c.setting_layout.paths), dtype=torch.int32)
    value_mask = (path_of_token[None, :] == paths[:, None]) | (torch.arange(len(path_of_token)) == PAD_ID)[None]
    return value_mask, torch.tensor(c.setting_layout.decode_rank, dtype=torch.int32)


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
        x = self.proj(rms_normalize(token_embeddings).to(self.dtype))
        length = self.c.data.text_len
        x = x + self._positions(length)
        x = self.encoder(x, key_mask(text_mask), length)
        return self.gaussian(self.pool(x, text_mask, length))


class VideoEncoder(_Encoder):
    """`encoders.VideoEncoder` → (means [b, n, d_latent], token mask [b, n]).

    `model.video.patch_tokens = False`: per-frame features [b, f, d_vit] (patches averaged),
    temporal encoder over the frames, `n` time segments. True: patch features [b, f, p, d_vit],
    a frame time position plus a learned patch position, one encoder over the f * p tokens (a
    patch is valid where its frame is), an attention pool to `n` tokens; every token is valid
    where any frame is.
    """

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__(c, dtype)
        m, e = c.model, c.model.encoder
        self.patch_tokens = bool(m.video.patch_tokens)
        self.n_tokens = int(m.latent.tokens_per_modality)
        self.proj = nn.Linear(m.vit.width, e.width, bias=False)
        self.temporal = self._stack()
        self.ln = LayerNorm(e.width, dtype=dtype)
        self.gaussian = GaussianMean(e.width, m.latent.d_latent)
        if self.patch_tokens:
            self.patches = (m.vit.image_size // m.vit.patch_size) ** 2
            self.patch_position_embedding = nn.Parameter(torch.zeros(self.patches, e.width))
            self.pool = AttentionPool(self.n_tokens, e.width, e.heads, dtype)
            # Broadcast helpers (an `&` with constant ones instead of expand/repeat_interleave: a
            # plain elementwise op in the graph, and no size read off a traced tensor).
            self.register_buffer("patch_ones", torch.ones(1, self.patches, dtype=torch.bool), persistent=False)
            self.register_buffer("token_ones", torch.ones(self.n_tokens, dtype=torch.bool), persistent=False)

    def forward(self, frame_features: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """frame_features [b, f, d_vit] (per-frame means) or [b, f, p, d_vit] (`patch_tokens`);
        frame_mask [b, f]."""
        x = self.proj(frame_features)
        frames = self.c.data.num_frames
        if not self.patch_tokens:
            x = x + self._positions(frames)
            x = self.ln(self.temporal(x, key_mask(frame_mask), frames))
            pooled, token_mask = segment_pool(x, frame_mask, self.n_tokens, frames, self.width)
            return self.gaussian(pooled), token_mask
        length = frames * self.patches
        x = x + self._positions(frames)[None, :, None] + self.patch_position_embedding[None, None]
        # jnp.repeat(frame_mask, p, axis=1): frame-major, the order of the reshape below.
        mask = (frame_mask[:, :, None] & self.patch_ones).reshape(-1, length)
        x = self.ln(self.temporal(x.reshape(-1, length, self.width), key_mask(mask), length))
        means = self.gaussian(self.pool(x, mask, length))
        # any(frame_mask) as a float max: TensorRT reduces no booleans.
        any_frame = frame_mask.to(torch.float32).amax(dim=-1, keepdim=True) > 0.0
        return means, any_frame & self.token_ones


class StateEncoder(_Encoder):
    """numeric [b, n_num] float, categorical [b, n_cat] int → means [b, n, d_latent]
    (`encoders.StateEncoder`; all tokens valid).

    Each field is one token: numeric fields through a per-field map of the value (and, with
    `model.state.numeric_fourier = F > 0`, its Fourier features sin/cos(π 2^k x), k < F, computed
    in float32), categorical fields through one embedding table; a residual MLP; then one
    Gaussian per field token (`model.state.field_tokens`) or an attention pool to
    `tokens_per_modality` tokens first.
    """

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__(c, dtype)
        m, e = c.model, c.model.encoder
        sizes = [int(s) for s in m.state.categorical_sizes]
        self.n_num, self.n_fields = int(m.state.numeric_dim), int(m.state.numeric_dim) + len(sizes)
        self.fourier, self.field_tokens = int(m.state.numeric_fourier), bool(m.state.field_tokens)
        self.numeric_scale = nn.Parameter(torch.zeros(self.n_num, 1 + 2 * self.fourier, e.width))
        self.numeric_shift = nn.Parameter(torch.zeros(self.n_num, e.width))
        self.categorical = nn.Embedding(sum(sizes), e.width)
        self.ln_mlp = LayerNorm(e.width, dtype=dtype)
        self.mlp = Mlp(e.width, e.mlp_dim, "gelu")
        if not self.field_tokens:
            self.pool = AttentionPool(m.latent.tokens_per_modality, e.width, e.heads, dtype)
        self.gaussian = GaussianMean(e.width, m.latent.d_latent)
        # int32 index arithmetic throughout: TensorRT's integer support is int32 first.
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int32), persistent=False)
        self.register_buffer("max_ids", torch.tensor([s - 1 for s in sizes], dtype=torch.int32), persistent=False)
        self.register_buffer("zero", torch.zeros((), dtype=torch.int32), persistent=False)
        # π 2^k in float32: the exact values of `jnp.pi * 2.0 ** jnp.arange(F, dtype=float32)`
        # (scaling by a power of two commutes with rounding).
        self.register_buffer("frequencies", torch.tensor([math.pi * 2.0 ** k for k in range(self.fourier)],
                                                         dtype=torch.float32), persistent=False)

    def forward(self, numeric: Tensor, categorical: Tensor) -> Tensor:
        value = numeric.to(torch.float32)[..., None]  # [b, n_num, 1]
        if self.fourier:
            angles = value * self.frequencies
            value = torch.cat([value, torch.sin(angles), torch.cos(angles)], dim=-1)  # [b, n_num, 1 + 2F]
        # einsum("bnf,nfw->bnw") as a broadcast matmul [b, n, 1, f] @ [n, f, w]: MatMul, not Einsum, in ONNX.
        mapped = torch.matmul(value.to(self.dtype)[:, :, None, :], self.numeric_scale)
        num_tokens = mapped.reshape(-1, self.n_num, self.width) + self.numeric_shift
        ids = torch.minimum(torch.maximum(categorical.to(torch.int32), self.zero), self.max_ids) + self.offsets
        x = torch.cat([num_tokens, self.categorical(ids)], dim=1)
        x = x + self.mlp(self.ln_mlp(x))
        if not self.field_tokens:
            x = self.pool(x, None, self.n_fields)
        return self.gaussian(x)


# ------------------------------------------------------------------------------------ bridge, DNFM, explanation


class BridgeInputs(nn.Module):
    """`bridge.BridgeInputs`: the LM input tokens before the text.

    latent tokens [b, n_latent, d_latent] → [b, n_latent, d_lm] (projection + modality-type
    embedding + slot position, by the static `latent_layout`); tag tokens [b, n_tags, d_lm];
    action-log tokens [b, action_len, d_lm] = embedding of the executed id + embedding of the
    value it replaced + a learned map of the position's sinusoid.
    """

    def __init__(self, c: Any, num_modalities: int, dtype: torch.dtype):
        super().__init__()
        m = c.model
        self.dtype, self.action_len = dtype, int(m.action_len)
        self.latent_proj = nn.Linear(m.latent.d_latent, m.lm.width)
        self.modality_embedding = nn.Parameter(torch.zeros(num_modalities, m.lm.width))
        self.temporal_proj = nn.Linear(64, m.lm.width, bias=False)
        self.tag_embedding = nn.Parameter(torch.zeros(m.bridge.n_constraint_tags, m.lm.width))
        self.history_action_embedding = nn.Embedding(m.dnfm.vocab_size, m.lm.width)
        self.history_before_embedding = nn.Embedding(m.dnfm.vocab_size, m.lm.width)
        self.history_order_proj = nn.Linear(64, m.lm.width, bias=False)
        ids, slots = latent_layout(m)
        self.register_buffer("modality_ids", torch.tensor(ids, dtype=torch.int64), persistent=False)
        self.register_buffer("slots", torch.tensor(slots, dtype=torch.float32), persistent=False)

    def forward(self, latents: Tensor, batch_size_like: Tensor, history_actions: Tensor,
                history_before: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = self.latent_proj(latents.to(self.dtype))
        temporal = self.temporal_proj(sinusoidal(self.slots, 64).to(self.dtype))
        x = x + self.modality_embedding[self.modality_ids][None] + temporal[None]
        tags = self.tag_embedding[None].expand(batch_size_like.shape[0], *self.tag_embedding.shape)
        order = self.history_order_proj(sinusoidal(torch.arange(self.action_len), 64).to(self.dtype))
        log = self.history_action_embedding(history_actions) + self.history_before_embedding(history_before)
        return x, tags, log + order[None]


class Connector(nn.Module):
    """`bridge.Connector`: LM outputs [b, l, d_lm] ending with the q query positions, mask [b, l],
    the LM inputs at those positions [b, l, d_lm] (read with `model.bridge.connector_skip`) →
    (context [b, q, width], z0 mean [b, A, d_action], memory [b, l, width]: the LayerNorm'd
    outputs at every position, what the DNFM's cross-attention reads)."""

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        m, k = c.model, c.model.bridge.connector
        self.dtype, self.skip = dtype, bool(m.bridge.connector_skip)
        self.proj = nn.Linear(m.lm.width, k.width)
        if self.skip:
            self.skip_proj = nn.Linear(m.lm.width, k.width, bias=False)
        self.encoder = Stack([EncoderBlock(k.width, k.heads, k.mlp_dim, dtype) for _ in range(k.depth)])
        self.ln = LayerNorm(k.width, dtype=dtype)
        self.query_to_action = nn.Parameter(torch.zeros(m.bridge.n_queries, num_positions(c)))
        self.action_slot_embedding = nn.Parameter(torch.zeros(num_positions(c), k.width))
        self.z0 = GaussianMean(k.width, m.dnfm.d_action)

    def forward(self, hidden: Tensor, mask: Tensor, inputs: Tensor, length: int) -> tuple[Tensor, Tensor, Tensor]:
        x = self.proj(hidden)
        if self.skip:  # around the frozen LM: each position's own input, RMS-normalised
            x = x + self.skip_proj(rms_normalize(inputs).to(self.dtype))
        memory = self.ln(self.encoder(x, key_mask(mask), length))
        context = memory[:, length - self.query_to_action.shape[0]:]
        slots = torch.matmul(context.transpose(1, 2), self.query_to_action).transpose(1, 2)  # bqw,qa->baw
        return context, self.z0(slots + self.action_slot_embedding), memory


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class AdaLNBlock(nn.Module):
    """`dnfm.AdaLNBlock`; `jnp.split(mod, 6)` order: shift_a, scale_a, gate_a, shift_m, scale_m, gate_m.

    With `memory_width` (`model.dnfm.cross_attention`): after the gated self-attention residual,
    `x + cross_attn(LayerNorm(x), memory)` (no gate), keys masked by the memory mask.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, length: int, dtype: torch.dtype,
                 memory_width: int | None = None):
        super().__init__()
        self.length = length
        self.modulation = nn.Linear(width, 6 * width)
        self.ln_attn = LayerNorm(width, affine=False, dtype=dtype)
        self.attn = Attention(width, heads, width // heads)
        if memory_width is not None:
            self.ln_cross = LayerNorm(width, dtype=dtype)
            self.cross_attn = Attention(width, heads, width // heads, kv_width=memory_width)
        self.ln_mlp = LayerNorm(width, affine=False, dtype=dtype)
        self.mlp = Mlp(width, mlp_dim, "gelu")

    def forward(self, x: Tensor, cond: Tensor, memory_kv: tuple[Tensor, Tensor] | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        """memory_kv: this block's cross-attention (k, v) of the memory (`DNFM.memory_kv`);
        memory_mask [b, 1, 1, m] bool."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(cond)).chunk(6, dim=-1)
        h = self.attn(modulate(self.ln_attn(x), shift_a, scale_a), None, self.length)
        x = x + gate_a[:, None, :] * h
        if memory_kv is not None:
            q = self.cross_attn.project_q(self.ln_cross(x), self.length)
            x = x + self.cross_attn.output(self.cross_attn.attend(q, *memory_kv, memory_mask), self.length)
        return x + gate_m[:, None, :] * self.mlp(modulate(self.ln_mlp(x), shift_m, scale_m))


class DNFM(nn.Module):
    """`dnfm.DNFM`: normalised codebook, codebook logits, velocity network v(x_t, t[, memory]).

    Over `num_positions` positions A; under the per-setting layout with the constant tables
    `value_mask` [A, vocab] bool and `decode_rank` [vocab] int32 (`setting_layout_tables`).
    """

    def __init__(self, c: Any, dtype: torch.dtype):
        super().__init__()
        m, d = c.model, c.model.dnfm
        self.dtype, self.d_action, self.temperature = dtype, d.d_action, float(d.temperature)
        self.cross_attention = bool(d.cross_attention)
        self.positions, self.per_setting = num_positions(c), dnfm_layout(m) == "per_setting"
        self.action_codebook = nn.Parameter(torch.zeros(d.vocab_size, d.d_action))
        self.action_codebook.keep_fp32 = True  # the codebook and its logits are float32 in Flax too
        self.in_proj = nn.Linear(d.d_action, d.width)
        self.position_embedding = nn.Parameter(torch.zeros(self.positions, d.width))
        self.time_in = nn.Linear(256, d.width)
        self.time_out = nn.Linear(d.width, d.width)
        memory_width = int(m.bridge.connector.width) if self.cross_attention else None
        self.blocks = Stack([AdaLNBlock(d.width, d.heads, d.mlp_dim, self.positions, dtype, memory_width)
                             for _ in range(d.depth)])
        if self.per_setting:
            value_mask, decode_rank = setting_layout_tables(c)
            self.register_buffer("value_mask", value_mask, persistent=False)
            self.register_buffer("decode_rank", decode_rank, persistent=False)
        self.final_modulation = nn.Linear(d.width, 2 * d.width)
        self.final_ln = LayerNorm(d.width, affine=False, dtype=dtype)
        self.out_proj = nn.Linear(d.width, d.d_action)

    def codebook(self) -> Tensor:
        """Rows rescaled to norm sqrt(d_action), float32 [vocab, d_action]."""
        e = self.action_codebook.to(torch.float32)
        return e * torch.rsqrt(torch.mean(e * e, dim=-1, keepdim=True) + 1e-12)

    def logits(self, x: Tensor) -> Tensor:
        """[b, A, d_action] → [b, A, vocab] float32: x · Eᵀ / (d_action · τ); per-setting: other
        paths' ids (and `<eos>`, `<noop>`) at `FORBIDDEN_LOGIT`, as `DNFM.logits` does with `where`."""
        logits = torch.matmul(x.to(torch.float32), self.codebook().t()) / (self.d_action * self.temperature)
        if self.per_setting:
            logits = torch.where(self.value_mask, logits, FORBIDDEN_LOGIT)
        return logits

    def memory_kv(self, memory: Tensor, length: int) -> list[tuple[Tensor, Tensor] | None]:
        """Each block's cross-attention keys/values of the memory [b, length, width] (None per block
        without `cross_attention`): computed once, read by every sampler step."""
        if not self.cross_attention:
            return [None] * len(self.blocks.layers)
        memory = memory.to(self.dtype)
        return [block.cross_attn.project_kv(memory, length) for block in self.blocks.layers]

    def forward(self, x_t: Tensor, t: Tensor, memory_kv: list | None = None,
                memory_mask: Tensor | None = None) -> Tensor:
        """x_t [b, l, d_action] float32; t [1] or [b]; memory_kv from `memory_kv`, memory_mask
        [b, m] bool (both read only with `cross_attention`) → velocity [b, l, d_action] float32."""
        h = self.in_proj(x_t.to(self.dtype)) + self.position_embedding[None]
        cond = self.time_out(F.silu(self.time_in(sinusoidal(t * 1000.0, 256).to(self.dtype))))
        kvs = memory_kv if memory_kv is not None else [None] * len(self.blocks.layers)
        mask = None if memory_mask is None else key_mask(memory_mask)
        for block, kv in zip(self.blocks.layers, kvs):
            h = block(h, cond, kv, mask)
        shift, scale = self.final_modulation(F.silu(cond)).chunk(2, dim=-1)
        return self.out_proj(modulate(self.final_ln(h), shift, scale)).to(torch.float32)


def decode_tokens(logits: Tensor, constrained: bool, length: int, vocab: int) -> Tensor:
    """`dnfm.decode_tokens`: codebook logits [b, length, vocab] float32 → action ids [b, length] int32.

    `constrained`: greedy left to right under the action grammar, `dnfm.grammar_step` position by
    position (unrolled; `length` and `vocab` are Python ints from the config): after an `<eos>`
    only `<pad>`; after a `<noop>` at position 0, and at the last position, only `<eos>`; otherwise
    neither `<pad>` nor (at 0) `<eos>` nor (after 0) `<noop>`. Forbidden logits become float32's
    lowest value through `where` (no boolean indexing), then argmax (first maximum, as in JAX).
    Otherwise the plain per-position argmax.
    """
    if not constrained:
        return torch.argmax(logits, dim=-1).to(torch.int32)
    ids = torch.arange(vocab)
    is_pad, is_eos, is_noop = ids == PAD_ID, ids == EOS_ID, ids == NOOP_ID
    ended = torch.zeros_like(logits[:, 0, 0], dtype=torch.bool)  # [b]: an <eos> came before
    noop = ended  # [b]: position 0 was <noop> and no <eos> yet
    out = []
    for i in range(length):
        only_pad = ended[:, None]
        # `(noop | (i == length - 1)) & ~only_pad`, with the static last-position case resolved in
        # Python (the tracer has no tensor-or-bool op).
        only_eos = ~only_pad if i == length - 1 else noop[:, None] & ~only_pad
        free = ~(only_pad | only_eos)
        allowed_free = ~is_pad & (~is_eos if i == 0 else ~is_noop)
        allowed = (only_pad & is_pad) | (only_eos & is_eos) | (free & allowed_free)
        masked = torch.where(allowed, logits[:, i].to(torch.float32), FORBIDDEN_LOGIT)
        tok = torch.argmax(masked, dim=-1).to(torch.int32)
        noop = (tok == NOOP_ID) if i == 0 else noop & (tok != EOS_ID)
        ended = ended | (tok == EOS_ID)
        out.append(tok)
    return torch.stack(out, dim=1)


def settings_to_sequence(settings: Tensor, decode_rank: Tensor, length: int, positions: int, vocab: int) -> Tensor:
    """`setting_layout.to_sequence`: per-setting ids [b, positions] int32 (`<pad>` = keep) →
    action ids [b, length] int32.

    The changed settings in `decode_rank` order ([vocab] int32), then `<eos>`, then `<pad>`;
    `[<noop>, <eos>, <pad>...]` when nothing changes; past `length - 1` changes the first
    `length - 1` in that order. Without a sort: a setting's place in the order is how many keys lie
    below its own (the inverse permutation of `jnp.argsort`), and output slot s takes the setting
    whose place is s. Counts and the gather are float32 sums of 0/1 terms (exact: ids < 2^24),
    as TensorRT reduces no booleans. `length`, `positions` and `vocab` are Python ints.
    """
    changed = settings != PAD_ID
    index = torch.arange(positions, dtype=torch.int32)
    # Unchanged positions sort last, by position (vocab + p lies above every rank), as in JAX.
    key = torch.where(changed, decode_rank[settings], index + vocab)
    # key · positions + p is distinct per position, so the order is the stable argsort's even if
    # two keys tied (they cannot: a rank is a token's, and each token belongs to one position).
    unique = key * positions + index
    place = (unique[:, None, :] < unique[:, :, None]).to(torch.float32).sum(-1)  # [b, positions]
    count = torch.clamp(changed.to(torch.float32).sum(-1, keepdim=True), max=float(length - 1))  # [b, 1]
    slot = torch.arange(length, dtype=torch.float32)
    hit = (place[:, :, None] == slot).to(torch.float32)  # [b, positions, length]
    emitted = (settings.to(torch.float32)[:, :, None] * hit).sum(1)  # [b, length]
    out = torch.where(slot < count, emitted, torch.where(slot == count, float(EOS_ID), float(PAD_ID)))
    noop = torch.where(slot == 0.0, float(NOOP_ID), torch.where(slot == 1.0, float(EOS_ID), float(PAD_ID)))
    return torch.where(count == 0.0, noop, out).to(torch.int32)


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
        self.bridge_inputs = BridgeInputs(c, len(MODALITIES), dtype)
        self.queries = nn.Module()
        self.queries.queries = nn.Parameter(torch.zeros(m.bridge.n_queries, m.lm.width))
        self.connector = Connector(c, dtype)
        self.dnfm = DNFM(c, dtype)
        self.explanation = ExplanationHead(c, dtype)
        cast_to_compute_dtype(self, dtype)

    # The stages, separately callable (and what `verify` compares with the JAX intermediates).
    def encode(self, text_tokens, text_mask, mel, mel_mask, frames, frame_mask, state_numeric,
               state_categorical, modality_mask) -> tuple[Tensor, Tensor]:
        """→ latent means [b, n_latent, d_latent] float32 and mask [b, n_latent] bool, on one token
        axis in `MODALITIES` order (`VLACabin.encode`; `latent_counts` tokens per modality)."""
        m, f = self.cfg.model, self.cfg.data.num_frames
        size = m.vit.image_size
        # uint8 -> float32 x / 255 first (`spec.frames_unit`; a Cast is the graph's first op on the
        # bytes, which TensorRT takes natively), then the compute dtype and [-1, 1].
        if frames.dtype != torch.uint8:
            raise TypeError(f"frames are {frames.dtype}, expected torch.uint8 RGB in [0, 255]")
        unit = frames.to(torch.float32) * (1.0 / 255.0)
        pixels = unit.reshape(-1, size, size, 3).to(self.dtype) * 2.0 - 1.0
        feats = self.vit(pixels)  # [b * f, patches, d_vit]
        if m.video.patch_tokens:
            video_in = feats.reshape(-1, f, self.video_encoder.patches, m.vit.width)
        else:
            video_in = feats.mean(dim=1).reshape(-1, f, m.vit.width)
        speech, speech_mask = self.speech_encoder(mel, mel_mask)
        text = self.text_encoder(self.lm.embed(text_tokens), text_mask)
        video, video_mask = self.video_encoder(video_in, frame_mask)
        state = self.state_encoder(state_numeric, state_categorical)
        counts = latent_counts(m)
        # Text and state tokens are always valid; every token of an absent modality is masked.
        own = {"speech": speech_mask, "text": None, "video": video_mask, "state": None}
        masks = []
        for i, (name, n) in enumerate(zip(MODALITIES, counts)):
            present = modality_mask[:, i:i + 1]  # [b, 1], broadcast over the modality's tokens
            ones = torch.ones(n, dtype=torch.bool)
            masks.append((present & ones) if own[name] is None else (own[name] & present))
        means = torch.cat([speech, text, video, state], dim=1)
        return means, torch.cat(masks, dim=1)

    def context(self, latents: Tensor, latent_mask: Tensor, text_tokens: Tensor, text_mask: Tensor,
                constraint_tags: Tensor, history_actions: Tensor, history_before: Tensor
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """→ (context [b, q, width], z0 mean [b, A, d_action] float32, memory [b, l, width] and
        memory mask [b, l] bool: the connector outputs the DNFM cross-attends to) (`VLACabin.context`).

        The LM reads [latent tokens, tag tokens, action-log tokens, text, queries]; tags are masked
        when inactive, the log where `history_actions` is `<pad>`."""
        m = self.cfg.model
        n_latent = sum(latent_counts(m))
        latent_tokens, tag_tokens, log_tokens = self.bridge_inputs(latents, text_tokens, history_actions,
                                                                   history_before)
        text = self.lm.embed(text_tokens)
        queries = self.queries.queries.to(self.dtype)[None].expand(text.shape[0], *self.queries.queries.shape)
        seq = torch.cat([latent_tokens, tag_tokens, log_tokens, text, queries], dim=1)
        mask = torch.cat([latent_mask, constraint_tags, history_actions != PAD_ID, text_mask,
                          torch.ones_like(queries[:, :, 0], dtype=torch.bool)], dim=1)
        length = n_latent + m.bridge.n_constraint_tags + m.action_len + self.cfg.data.text_len + m.bridge.n_queries
        hidden = self.lm(seq, mask, length)
        start = length - m.bridge.n_queries if m.bridge.connector_reads == "queries" else 0
        memory_mask = mask[:, start:length]
        context, z0, memory = self.connector(hidden[:, start:length], memory_mask, seq[:, start:length],
                                             length - start)
        return context, z0, memory, memory_mask

    def sample(self, z0: Tensor, memory: Tensor | None = None, memory_mask: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
        """K Euler steps from z0 (`dnfm.euler_sample`): → (x1 [b, A, d], velocities [b, K, A, d]).
        memory [b, m, width] / memory_mask [b, m] feed the cross-attention (`dnfm.cross_attention`)."""
        kv = None
        if self.dnfm.cross_attention:
            kv = self.dnfm.memory_kv(memory, self.memory_length)
        x, dt, velocities = z0.to(torch.float32), 1.0 / self.steps, []
        for k in range(self.steps):
            t = torch.full((1,), k * dt, dtype=torch.float32)  # the same t for every sample
            v = self.dnfm(x, t, kv, memory_mask if kv is not None else None)
            velocities.append(v)
            x = x + dt * v
        return x, torch.stack(velocities, dim=1)

    @property
    def memory_length(self) -> int:
        """Positions the connector reads (and the DNFM's memory holds)."""
        m = self.cfg.model
        if m.bridge.connector_reads == "queries":
            return int(m.bridge.n_queries)
        return (sum(latent_counts(m)) + m.bridge.n_constraint_tags + m.action_len + self.cfg.data.text_len
                + m.bridge.n_queries)

    def decode_actions(self, logits: Tensor) -> Tensor:
        """Codebook logits [b, A, vocab] → action ids [b, action_len] int32 (`dnfm.decode_actions`):
        the per-setting argmax rebuilt into a sequence, or `dnfm.decode_tokens` of the positions."""
        m = self.cfg.model
        if self.dnfm.per_setting:
            settings = torch.argmax(logits, dim=-1).to(torch.int32)
            return settings_to_sequence(settings, self.dnfm.decode_rank, int(m.action_len), self.dnfm.positions,
                                        int(m.dnfm.vocab_size))
        return decode_tokens(logits, bool(m.dnfm.constrained_decode), int(m.action_len), int(m.dnfm.vocab_size))

    def forward(self, text_tokens, text_mask, mel, mel_mask, frames, frame_mask, state_numeric,
                state_categorical, modality_mask, constraint_tags, history_actions,
                history_before) -> dict[str, Tensor]:
        """Inputs as in the module docstring. Returns {action_tokens int32 [b, action_len],
        explanation_tokens int32 [b, explain_len], z0 [b, A, d], velocities [b, K, A, d], x1 [b, A, d],
        action_logits [b, A, vocab], context [b, q, width]} (all float outputs float32; A =
        `num_positions`)."""
        means, mask = self.encode(text_tokens, text_mask, mel, mel_mask, frames, frame_mask, state_numeric,
                                  state_categorical, modality_mask)
        context, z0, memory, memory_mask = self.context(means, mask, text_tokens, text_mask, constraint_tags,
                                                        history_actions, history_before)
        x1, velocities = self.sample(z0, memory, memory_mask)
        logits = self.dnfm.logits(x1)
        return {"action_tokens": self.decode_actions(logits),
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
    """config.json must be ours, of a format version this code reads, with a supported K (and the
    per-setting tables when the layout needs them)."""
    if config.get("format") != FORMAT:
        raise ValueError(f"not a VLA-Cabin mirror config (format must be {FORMAT!r}, got {config.get('format')!r})")
    if config.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"mirror config format_version {config.get('format_version')!r} is not supported "
                         f"(this code reads {', '.join(map(str, READABLE_VERSIONS))}); export the checkpoint "
                         "again with this code")
    steps = config.get("steps")
    if not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"sampler steps K={steps!r} not supported (1..{MAX_STEPS})")
    head = (config.get("model") or {}).get("action_head", "dnfm")
    if head != "dnfm":
        raise ValueError(unsupported_action_head(head))
    layout = ((config.get("model") or {}).get("dnfm") or {}).get("layout", "sequence")
    if layout not in ("sequence", "per_setting"):
        raise ValueError(f"model.dnfm.layout = {layout!r} is not supported (use 'sequence' or 'per_setting')")
    if layout == "per_setting":
        check_setting_layout(config.get("setting_layout"), int(config["model"]["dnfm"]["vocab_size"]))


def check_setting_layout(tables: Any, vocab: int) -> None:
    """config.json's "setting_layout" must fit the action vocabulary: a path (or -1 for the special
    tokens) per id, and a decode rank that orders the ids (distinct ranks 0..vocab-1)."""
    if not isinstance(tables, Mapping) or not {"paths", "path_of_token", "decode_rank"} <= set(tables):
        raise ValueError("model.dnfm.layout = 'per_setting' needs config.json's \"setting_layout\" "
                         "{paths, path_of_token, decode_rank}; export the checkpoint again with this code")
    paths, path_of_token, rank = tables["paths"], list(tables["path_of_token"]), list(tables["decode_rank"])
    if (len(path_of_token) != vocab or sorted(rank) != list(range(vocab))
            or any(not -1 <= p < len(paths) for p in path_of_token)):
        raise ValueError(f"config.json's setting_layout does not fit the action vocabulary of {vocab} ids "
                         f"({len(paths)} paths, {len(path_of_token)} path ids, {len(rank)} ranks)")


def unsupported_action_head(head: Any) -> str:
    """The one-line refusal of an action head the mirror does not have."""
    return (f"model.action_head = {head!r} is not exported: the mirror and ONNX graph carry the DNFM action "
            "head only (the autoregressive head is the quality ladder's baseline); export a model trained "
            "with model.action_head = 'dnfm'")


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
        "frames": torch.randint(0, 256, (batch_size, d.num_frames, size, size, 3), generator=g, dtype=torch.uint8),
        "frame_mask": torch.ones(batch_size, d.num_frames, dtype=torch.bool),
        "state_numeric": torch.randn(batch_size, m.state.numeric_dim, generator=g),
        "state_categorical": (torch.rand(batch_size, len(sizes), generator=g) * sizes).to(torch.int32),
        "modality_mask": torch.ones(batch_size, 4, dtype=torch.bool),
        "constraint_tags": torch.rand(batch_size, m.bridge.n_constraint_tags, generator=g) < 0.3,
        **example_history(m.action_len, m.dnfm.vocab_size, batch_size, g),
    }


def example_history(action_len: int, vocab: int, batch_size: int, g: torch.Generator) -> dict[str, Tensor]:
    """Action logs in the layout of `spec.batch_spec` (values random, structure real), cycling over
    the row kinds: no earlier turn (all <pad>), an executed log (device ids, <eos>, <pad>; before
    ids under the executed ones), a turn that did nothing ([<noop>, <eos>], <noop> under <noop>)."""
    actions = torch.full((batch_size, action_len), PAD_ID, dtype=torch.int32)
    before = torch.full((batch_size, action_len), PAD_ID, dtype=torch.int32)
    for i in range(batch_size):
        kind = i % 3
        if kind == 1 and action_len > 1:
            n = int(torch.randint(1, action_len, (1,), generator=g))
            actions[i, :n] = torch.randint(NOOP_ID + 1, vocab, (n,), generator=g, dtype=torch.int32)
            actions[i, n] = EOS_ID
            before[i, :n] = torch.randint(NOOP_ID + 1, vocab, (n,), generator=g, dtype=torch.int32)
        elif kind == 2 and action_len > 1:
            actions[i, :2] = torch.tensor([NOOP_ID, EOS_ID], dtype=torch.int32)
            before[i, 0] = NOOP_ID
    return {"history_actions": actions, "history_before": before}


def io_spec(config: Mapping[str, Any]) -> dict[str, dict[str, dict]]:
    """Names, dtypes and shapes ("batch" first) of the inputs and outputs (mirror and ONNX alike)."""
    c = namespace(config)
    m, d = c.model, c.data
    # The history is action_len ids like the decoded answer; the DNFM tensors span its A positions.
    size, a, k, p = m.vit.image_size, m.action_len, int(config["steps"]), num_positions(c)
    shapes_in = {"text_tokens": [d.text_len], "text_mask": [d.text_len], "mel": [d.mel_frames, m.speech.n_mels],
                 "mel_mask": [d.mel_frames], "frames": [d.num_frames, size, size, 3], "frame_mask": [d.num_frames],
                 "state_numeric": [m.state.numeric_dim], "state_categorical": [len(m.state.categorical_sizes)],
                 "modality_mask": [4], "constraint_tags": [m.bridge.n_constraint_tags], "history_actions": [a],
                 "history_before": [a]}
    shapes_out = {"action_tokens": ("int32", [a]), "explanation_tokens": ("int32", [m.explain_len]),
                  "z0": ("float32", [p, m.dnfm.d_action]), "velocities": ("float32", [k, p, m.dnfm.d_action]),
                  "x1": ("float32", [p, m.dnfm.d_action]), "action_logits": ("float32", [p, m.dnfm.vocab_size]),
                  "context": ("float32", [m.bridge.n_queries, m.bridge.connector.width])}
    entry = lambda dt, shape: {"dtype": dt, "shape": ["batch"] + shape}  # noqa: E731
    return {"inputs": {k: entry(INPUT_DTYPES[k], shapes_in[k]) for k in INPUT_NAMES},
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
