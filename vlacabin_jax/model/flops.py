"""Analytic training FLOPs per sample (matmuls and attention; elementwise work is ignored).

Conventions: a matmul of [m, k] by [k, n] is 2·m·k·n FLOPs forward. Backward:
  trainable layer: 2× forward (gradients for its input and its weights);
  frozen LM: 1× forward for its matmuls (input gradients only: the trainable latent tokens,
    tags and queries sit before and inside its input) and 2× for attention (no weights there);
  frozen ViT: none (its input, the frames, needs no gradient);
  an anchor that trains (`train.trainable = "all_and_anchor"`): 2× forward like any trainable layer.
"""

from __future__ import annotations

import ml_collections

from vlacabin_jax.model import setting_layout
from vlacabin_jax.model.vla_cabin import latent_counts


def _dense(tokens: float, d_in: float, d_out: float) -> float:
    return 2.0 * tokens * d_in * d_out


def _attention(q_len: float, kv_len: float, heads_x_dim: float) -> float:
    """Scores plus weighted values."""
    return 4.0 * q_len * kv_len * heads_x_dim


def _encoder_stack(tokens: int, width: int, mlp: int, depth: int) -> tuple[float, float]:
    """(dense, attention) forward FLOPs of `depth` bidirectional pre-LN blocks."""
    dense = depth * (_dense(tokens, width, 4 * width) + _dense(tokens, width, 2 * mlp))
    return dense, depth * _attention(tokens, tokens, width)


def model_flops_per_sample(cfg: ml_collections.ConfigDict) -> float:
    """Training FLOPs (forward + backward) of one sample of the full config.

    Shapes come from `cfg.model` and `cfg.data` (text_len, mel_frames, num_frames).
    """
    m, d = cfg.model, cfg.data
    vit, lm, enc = m.vit, m.lm, m.encoder
    n_tok = m.latent.tokens_per_modality
    n_speech, n_text, n_video, n_state = latent_counts(m)
    dl, w, mw = m.latent.d_latent, enc.width, enc.mlp_dim
    train_dense = train_attn = 0.0

    def add(dense_attn: tuple[float, float]) -> None:
        nonlocal train_dense, train_attn
        train_dense += dense_attn[0]
        train_attn += dense_attn[1]

    gaussian = lambda tokens, width, out: 2 * _dense(tokens, width, out)  # noqa: E731
    pool = lambda q, kv, width: (  # noqa: E731  attention pooling: q/o on queries, k/v on inputs
        _dense(q, width, 2 * width) + _dense(kv, width, 2 * width), _attention(q, kv, width))

    # Speech: two stride-2 convs (kernel 3), encoder on T/4 steps, Gaussian head.
    t2, t4 = -(-d.mel_frames // 2), -(-d.mel_frames // 4)
    add((_dense(t2, 3 * m.speech.n_mels, w) + _dense(t4, 3 * w, w), 0.0))
    add(_encoder_stack(t4, w, mw, enc.depth))
    add((gaussian(n_speech, w, dl), 0.0))
    # Text: projection of frozen embeddings, encoder, attention pooling, Gaussian head.
    add((_dense(d.text_len, lm.width, w), 0.0))
    add(_encoder_stack(d.text_len, w, mw, enc.depth))
    add(pool(n_text, d.text_len, w))
    add((gaussian(n_text, w, dl), 0.0))
    # Video: projection of per-frame (or per-patch) features, temporal encoder, Gaussian head.
    patches = (vit.image_size // vit.patch_size) ** 2
    frames = d.num_frames * (patches if m.video.patch_tokens else 1)
    add((_dense(frames, vit.width, w), 0.0))
    add(_encoder_stack(frames, w, mw, enc.depth))
    if m.video.patch_tokens:
        add(pool(n_video, frames, w))
    add((gaussian(n_video, w, dl), 0.0))
    # State: one MLP token per field (numeric ones from 1 + 2F features), pooled unless
    # field_tokens, Gaussian head.
    n_fields = m.state.numeric_dim + len(m.state.categorical_sizes)
    add((_dense(m.state.numeric_dim, 1 + 2 * m.state.numeric_fourier, w) + _dense(n_fields, w, 2 * mw), 0.0))
    if not m.state.field_tokens:
        add(pool(n_state, n_fields, w))
    add((gaussian(n_state, w, dl), 0.0))

    # Bridge into the LM: latent, tag, action-log (action_len), text and query tokens.
    n_latent = n_speech + n_text + n_video + n_state
    add((_dense(n_latent, dl, lm.width), 0.0))
    seq = n_latent + m.bridge.n_constraint_tags + m.action_len + d.text_len + m.bridge.n_queries
    q_dim, kv_dim = lm.heads * lm.head_dim, lm.kv_heads * lm.head_dim
    lm_dense = lm.depth * (_dense(seq, lm.width, q_dim + 2 * kv_dim) + _dense(seq, q_dim, lm.width)
                           + _dense(seq, lm.width, 3 * lm.mlp_dim))
    lm_attn = lm.depth * _attention(seq, seq, q_dim)

    # Connector and variational head.
    # DNFM positions: action_len, or one per setting path (`model.dnfm.layout`).
    c, nq, la = m.bridge.connector, m.bridge.n_queries, setting_layout.num_positions(m)
    read = seq if m.bridge.connector_reads == "all" else nq  # LM positions the connector attends over
    add(((1 + m.bridge.connector_skip) * _dense(read, lm.width, c.width), 0.0))
    add(_encoder_stack(read, c.width, c.mlp_dim, c.depth))
    add((_dense(la, nq, c.width) + gaussian(la, c.width, m.dnfm.d_action), 0.0))

    # DNFM: two velocity evaluations (x_t and one model step on), three codebook decodes.
    f = m.dnfm
    per_eval = (_dense(la, f.d_action, f.width) + _dense(1, 256, f.width) + _dense(1, f.width, f.width)
                + f.depth * _dense(1, f.width, 6 * f.width) + _dense(1, f.width, 2 * f.width)
                + _dense(la, f.width, f.d_action))
    stack_dense, stack_attn = _encoder_stack(la, f.width, f.mlp_dim, f.depth)
    if f.cross_attention:  # q / out on the action positions, k / v on the connector memory
        stack_dense += f.depth * (_dense(la, f.width, 2 * f.width) + _dense(read, c.width, 2 * f.width))
        stack_attn += f.depth * _attention(la, read, f.width)
    add((2 * (per_eval + stack_dense), 2 * stack_attn))
    add((3 * _dense(la, f.d_action, f.vocab_size), 0.0))
    if m.action_head == "autoregressive":  # the ladder's baseline head, teacher-forced
        ls = m.action_len
        add((f.depth * (_dense(ls, f.width, 6 * f.width) + _dense(read, c.width, 2 * f.width)
                        + _dense(ls, f.width, 2 * f.mlp_dim)) + _dense(ls, f.width, f.vocab_size),
             f.depth * (_attention(ls, ls, f.width) + _attention(ls, read, f.width))))

    # Explanation head (teacher forcing on explain_len - 1 positions).
    e, le = m.explain, m.explain_len - 1
    add((_dense(nq, c.width, e.width), 0.0))
    add((e.depth * (_dense(le, e.width, 6 * e.width) + _dense(nq, e.width, 2 * e.width)
                    + _dense(le, e.width, 2 * e.mlp_dim)),
         e.depth * (_attention(le, le, e.width) + _attention(le, nq, e.width))))
    add((_dense(le, e.width, e.vocab_size), 0.0))

    # Frozen ViT, forward only.
    vit_fwd = d.num_frames * (
        _dense(patches, 3 * vit.patch_size ** 2, vit.width)
        + vit.depth * (_dense(patches, vit.width, 4 * vit.width) + _dense(patches, vit.width, 2 * vit.mlp_dim)
                       + _attention(patches, patches, vit.width)))

    if cfg.train.trainable == "all_and_anchor":  # the anchor trains: its backward is 2× forward too
        return 3.0 * (train_dense + train_attn + lm_dense + lm_attn + vit_fwd)
    return 3.0 * (train_dense + train_attn) + (2.0 * lm_dense + 3.0 * lm_attn) + vit_fwd
