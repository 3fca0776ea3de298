"""The ladder's plain learners over the batch, not the model: the `features`, `transformer` and
`transformer_ar` rungs.

    batch_features(batch, cfg)  -> [b, n_features] float32 (fixed, no learned encoder)
    FeatureMLP(cfg)             -> per-position action logits [b, action_len, vocab]
    TokenTransformer(cfg)       -> the same logits from the batch's tokens (no perception)
    TokenTransformer(cfg, causal_actions=True) -> next-action logits, teacher-forced
    train(cfg, steps, ..., learner) -> ({"net", "stats"}, curve), on the trainer's batches
    predict(params, cfg, samples, learner) -> predictions (grammar-constrained decode)

The features are what the batch contract carries, flattened with no knowledge of the cabin:
bags of the current and the earlier turns' text tokens, the raw log-mel, frames average-pooled
to 8×8 with their differences to the first frame, the state (numeric values with their Fourier
features, categorical one-hots), the constraint tags, bags of the earlier turn's action log, and
the modality mask. Its heldout success is what a simple learner gets out of the contract.

The features are standardised with statistics of the first `_STAT_BATCHES` training batches
(kept beside the weights, not trained): raw, the 1024 mel values and the pixel pools swamp the
sparse text bags under one LayerNorm, and the MLP sat at the `<noop>` floor (24.6 % heldout
success at 2000 x 32, against 36-50 % standardised on the same budget).

The `transformer` learner is a small bidirectional transformer (tiny's widths) over the tokens that
need no perception: text (with positions), one token per state field (a per-field map of the
numeric Fourier features the MLP also reads, or a categorical table), the active constraint tags
and the earlier turn's action log, then `action_len` query slots. It cannot hear spoken-only
requests nor see the camera, so it is a floor on what the model should reach, and its curve shows
how fast a plain learner gets there. `transformer_ar` is the same network with each slot also
reading the previous action and attending only to the slots before it (the context never reads
the slots), decoded greedily one action at a time: the two differ only in how the answer is
decoded, all at once or in order.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlacabin_jax.data import features, pipeline
from vlacabin_jax.data.actions import EOS_ID
from vlacabin_jax.data.spec import frames_unit
from vlacabin_jax.eval import evaluate, simulator
from vlacabin_jax.eval.metrics import Prediction
from vlacabin_jax.model import ar_head, dnfm, layers
from vlacabin_jax.train.optimizer import make_optimizer

_POOL = 8  # frames are average-pooled to _POOL × _POOL pixels
_STAT_BATCHES = 16  # training batches whose features set the standardisation


def _fourier(numeric: jax.Array) -> jax.Array:
    """Numeric state fields [b, n] → [b, n, 13]: the value and sin/cos(π 2^k x), k < 6, the
    features tiny's state encoder reads (`model.state.numeric_fourier`), which set levels apart."""
    x = numeric.astype(jnp.float32)[..., None]
    angles = x * (jnp.pi * 2.0 ** jnp.arange(6, dtype=jnp.float32))
    return jnp.concatenate([x, jnp.sin(angles), jnp.cos(angles)], -1)


def _bag(tokens: jax.Array, mask: jax.Array, size: int) -> jax.Array:
    """Multi-hot [b, size] of the ids in tokens [b, l] where mask [b, l]."""
    hot = jax.nn.one_hot(tokens, size, dtype=jnp.float32) * mask[..., None]
    return jnp.minimum(hot.sum(1), 1.0)


def batch_features(batch: dict, cfg: ml_collections.ConfigDict, sep_id: int) -> jax.Array:
    """The featurized batch as one vector per row: [b, n_features] float32 (see module docstring).

    `sep_id` splits the text into earlier turns (before the last `<sep>`) and the current request.
    """
    m = cfg.model
    tok, tmask = batch["text_tokens"], batch["text_mask"]
    pos = jnp.arange(tok.shape[1])
    last_sep = jnp.max(jnp.where(tok == sep_id, pos, -1), axis=1, keepdims=True)
    current, earlier = tmask & (pos > last_sep), tmask & (pos < last_sep)
    frames = frames_unit(batch["frames"]) * batch["frame_mask"][:, :, None, None, None]  # uint8 -> [0, 1]
    b, f, s = frames.shape[:3]
    k = max(1, s // _POOL)
    pooled = frames[:, :, :k * (s // k), :k * (s // k)].reshape(b, f, s // k, k, s // k, k, 3).mean((3, 5))
    motion = jnp.abs(pooled[:, 1:] - pooled[:, :1])
    numeric = _fourier(batch["state_numeric"])
    sizes = tuple(m.state.categorical_sizes)
    cat = jnp.concatenate([jax.nn.one_hot(batch["state_categorical"][:, i], n) for i, n in enumerate(sizes)], -1)
    hist = batch["history_actions"]
    hist_mask = hist > EOS_ID
    parts = [
        _bag(tok, current, m.lm.vocab_size), _bag(tok, earlier, m.lm.vocab_size),
        (batch["mel"] * batch["mel_mask"][..., None]).reshape(b, -1),
        pooled.reshape(b, -1), motion.reshape(b, -1),
        # value, then sin and cos field by field: the feature order the MLP's figures were measured with
        numeric[..., 0], numeric[..., 1:7].reshape(b, -1), numeric[..., 7:].reshape(b, -1), cat,
        batch["constraint_tags"].astype(jnp.float32),
        _bag(hist, hist_mask, m.dnfm.vocab_size), _bag(batch["history_before"], hist_mask, m.dnfm.vocab_size),
        batch["modality_mask"].astype(jnp.float32),
    ]
    return jnp.concatenate([p.astype(jnp.float32) for p in parts], axis=-1)


class FeatureMLP(nn.Module):
    """features [b, n] → action logits [b, action_len, vocab]: two GELU layers, one softmax per position."""

    action_len: int
    vocab_size: int
    hidden: int = 512

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.LayerNorm()(x)
        for _ in range(2):
            x = nn.gelu(nn.Dense(self.hidden)(x))
        return nn.Dense(self.action_len * self.vocab_size)(x).reshape(x.shape[0], self.action_len, self.vocab_size)


class TokenTransformer(nn.Module):
    """batch dict → action logits [b, action_len, vocab] (module docstring, `transformer` learner)."""

    cfg: ml_collections.ConfigDict  # the full config
    causal_actions: bool = False  # slot i reads action i-1 and slots <= i (`transformer_ar`)

    @nn.compact
    def __call__(self, batch: dict, previous_actions: jax.Array | None = None) -> jax.Array:
        """batch: the trainer's batch dict; previous_actions [b, action_len] int32 (only with
        `causal_actions`): START then the actions before each slot; None teacher-forces
        `batch["action_tokens"]`."""
        m = self.cfg.model
        e = m.encoder
        width, b = e.width, batch["text_tokens"].shape[0]
        normal = nn.initializers.normal(0.02)

        def table(name: str, n: int) -> jax.Array:
            return self.param(name, normal, (n, width))

        text = nn.Embed(m.lm.vocab_size, width, embedding_init=normal, name="text")(batch["text_tokens"])
        text = text + table("text_position", text.shape[1])
        numeric = _fourier(batch["state_numeric"])  # [b, n_num, 13]
        n_num = numeric.shape[1]
        scale = self.param("numeric_scale", nn.initializers.normal(numeric.shape[-1] ** -0.5),
                           (n_num, numeric.shape[-1], width))
        numeric = jnp.einsum("bnf,nfw->bnw", numeric, scale) + table("numeric_field", n_num)
        sizes = tuple(m.state.categorical_sizes)
        offsets = jnp.cumsum(jnp.array((0,) + sizes[:-1], jnp.int32))
        categorical = nn.Embed(sum(sizes), width, embedding_init=normal, name="categorical")(
            jnp.clip(batch["state_categorical"], 0, jnp.array(sizes) - 1) + offsets)
        categorical = categorical + table("categorical_field", len(sizes))
        tags = jnp.broadcast_to(table("tag", m.bridge.n_constraint_tags), (b, m.bridge.n_constraint_tags, width))
        log = (nn.Embed(m.dnfm.vocab_size, width, embedding_init=normal, name="log_action")(batch["history_actions"])
               + nn.Embed(m.dnfm.vocab_size, width, embedding_init=normal, name="log_before")(batch["history_before"])
               + table("log_position", m.action_len))
        slots = jnp.broadcast_to(table("action_slot", m.action_len), (b, m.action_len, width))
        if self.causal_actions:
            if previous_actions is None:
                previous_actions = ar_head.teacher_inputs(batch["action_tokens"])
            slots = slots + nn.Embed(m.dnfm.vocab_size, width, embedding_init=normal,
                                     name="previous_action")(previous_actions)
        x = jnp.concatenate([text, numeric, categorical, tags, log, slots], 1)
        valid = jnp.concatenate([batch["text_mask"], jnp.ones((b, n_num + len(sizes)), jnp.bool_),
                                 batch["constraint_tags"], batch["history_actions"] > EOS_ID,
                                 jnp.ones((b, m.action_len), jnp.bool_)], 1)
        mask = layers.attention_mask(None, valid, causal=False)
        if self.causal_actions:
            # Context tokens read only the context; slot i reads the context and slots <= i.
            n_context = x.shape[1] - m.action_len
            q, k = jnp.arange(x.shape[1])[:, None], jnp.arange(x.shape[1])[None, :]
            mask = mask & jnp.where(q < n_context, k < n_context, k <= q)[None, None]
        for i in range(2 * e.depth):
            x, _ = layers.EncoderBlock(e.heads, width // e.heads, e.mlp_dim, name=f"block{i}")(x, mask)
        x = layers.LayerNorm(name="ln")(x[:, -m.action_len:])
        return nn.Dense(m.dnfm.vocab_size, name="logits")(x)


LEARNERS = ("mlp", "transformer", "transformer_ar")


def _sep_id(cfg) -> int:
    """The id `features.featurize` puts between turns."""
    return features.sep_id(features.load_tokenizer(cfg.data.tokenizer or None), cfg)


def _model(cfg, learner: str) -> nn.Module:
    if learner not in LEARNERS:
        raise ValueError(f"unknown learner {learner!r}; learners: {', '.join(LEARNERS)}")
    if learner in ("transformer", "transformer_ar"):
        return TokenTransformer(cfg, causal_actions=learner == "transformer_ar")
    return FeatureMLP(cfg.model.action_len, cfg.model.dnfm.vocab_size)


def feature_stats(feature_rows: Sequence[jax.Array]) -> dict:
    """{"mean", "scale": [n_features]} of the stacked rows (each [b, n_features]); a constant
    feature gets scale 1, so it stays 0 after standardising."""
    x = jnp.concatenate(list(feature_rows), axis=0)
    std = x.std(0)
    return {"mean": x.mean(0), "scale": jnp.where(std > 1e-6, std, 1.0)}


def _logits(params: dict, batch: dict, cfg, sep_id: int, learner: str) -> jax.Array:
    """params {"net", "stats"} → action logits [b, action_len, vocab] (`transformer_ar`:
    teacher-forced on `batch["action_tokens"]`)."""
    if learner != "mlp":
        return _model(cfg, learner).apply({"params": params["net"]}, batch)
    x = (batch_features(batch, cfg, sep_id) - params["stats"]["mean"]) / params["stats"]["scale"]
    return _model(cfg, learner).apply({"params": params["net"]}, x)


def _loss(net_params, stats, batch, cfg, sep_id: int, learner: str) -> jax.Array:
    logits = _logits({"net": net_params, "stats": stats}, batch, cfg, sep_id, learner)
    tokens = batch["action_tokens"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    # Positions up to <eos>: the grammar-constrained decode puts <pad> after it by itself.
    w = (batch["has_actions"][:, None] & (jnp.cumsum(tokens == EOS_ID, axis=1) - (tokens == EOS_ID) == 0))
    w = w.astype(jnp.float32)
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


def train(cfg: ml_collections.ConfigDict, steps: int, curve_samples: Sequence[dict] = (), curve_every: int = 0,
          log: Callable[[str], None] = print, learner: str = "mlp") -> tuple[dict, list[dict]]:
    """Train the baseline `learner` (`LEARNERS`) on the trainer's batches (same seed) with the
    trainer's optimizer settings (`optim.*`, schedule over `steps`). Returns ({"net": weights,
    "stats": the standardisation, `feature_stats` (the MLP's input; unused by the transformer)},
    curve)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.train.steps = int(steps)
    sep_id = _sep_id(cfg)
    batch_size = int(cfg.train.global_batch_size)
    data = pipeline.make_dataset(cfg, split="train", global_batch_size=batch_size, seed=int(cfg.train.seed))
    # The statistics batches are the first training batches themselves: no extra data is seen.
    head = [{k: v for k, v in next(data).items() if k != "sample_id"} for _ in range(min(steps, _STAT_BATCHES))]
    featurize = jax.jit(lambda b: batch_features(b, cfg, sep_id))
    stats = feature_stats([featurize(b) for b in head]) if learner == "mlp" else None
    example = featurize(head[0]) if learner == "mlp" else head[0]
    net = _model(cfg, learner).init(jax.random.key(int(cfg.train.seed)), example)["params"]
    tx = make_optimizer(cfg)
    opt_state = tx.init(net)

    @jax.jit
    def step(net, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(net, stats, batch, cfg, sep_id, learner)
        updates, opt_state = tx.update(grads, opt_state, net)
        return optax.apply_updates(net, updates), opt_state, loss

    curve, t0 = [], time.perf_counter()
    for s in range(1, steps + 1):
        batch = head[s - 1] if s <= len(head) else {k: v for k, v in next(data).items() if k != "sample_id"}
        net, opt_state, loss = step(net, opt_state, batch)
        params = {"net": net, "stats": stats}
        if curve_every and curve_samples and (s % curve_every == 0 or s == steps):
            from vlacabin_jax.eval.ladder import score

            preds = predict(params, cfg, curve_samples, learner=learner)
            row = {"step": s, "success_rate": score(preds, curve_samples)["success_rate"],
                   "loss": float(loss)}
            curve.append(row)
            log(f"  step {s}: heldout success {row['success_rate']:.3f} loss {row['loss']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return jax.device_get({"net": net, "stats": stats}), curve


def predict(params: dict, cfg: ml_collections.ConfigDict, samples: Sequence[dict],
            batch_size: int = 64, learner: str = "mlp") -> list[Prediction]:
    """Grammar-constrained greedy decode of the baseline's logits: all positions at once
    (`dnfm.decode_tokens`), or one action at a time for `transformer_ar` (`ar_head.greedy_actions`)."""
    sep_id, vocab = _sep_id(cfg), simulator.schema_vocabulary()

    @jax.jit
    def decide(batch):
        if learner == "transformer_ar":
            net = _model(cfg, learner)
            return ar_head.greedy_actions(lambda previous: net.apply({"params": params["net"]}, batch, previous),
                                          batch["text_tokens"].shape[0], cfg.model.action_len)
        return dnfm.decode_tokens(_logits(params, batch, cfg, sep_id, learner), True)

    out = []
    for batch, n in evaluate.batches(samples, cfg, batch_size):
        ids = np.asarray(decide(batch))
        for row in ids[:n]:
            tokens, error = simulator.decode(row, vocab)
            out.append(Prediction(tuple(tokens), None, error))
    return out
