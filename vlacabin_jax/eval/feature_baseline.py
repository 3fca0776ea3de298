"""The ladder's feature baseline: a plain MLP over the featurized batch, not the model.

    batch_features(batch, cfg)  -> [b, n_features] float32 (fixed, no learned encoder)
    FeatureMLP(cfg)             -> per-position action logits [b, action_len, vocab]
    train(cfg, steps, ...)      -> ({"mlp", "stats"}, curve), on the trainer's batches
    predict(params, cfg, samples) -> predictions (grammar-constrained decode)

The features are what the batch contract carries, flattened with no knowledge of the cabin:
bags of the current and the earlier turns' text tokens, the raw log-mel, frames average-pooled
to 8×8 with their differences to the first frame, the state (numeric values with their Fourier
features, categorical one-hots), the constraint tags, bags of the earlier turn's action log, and
the modality mask. Its heldout success is what a simple learner gets out of the contract.

The features are standardised with statistics of the first `_STAT_BATCHES` training batches
(kept beside the weights, not trained): raw, the 1024 mel values and the pixel pools swamp the
sparse text bags under one LayerNorm, and the MLP sat at the `<noop>` floor (24.6 % heldout
success at 2000 x 32, against 36-50 % standardised on the same budget).
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
from vlacabin_jax.model import dnfm
from vlacabin_jax.train.optimizer import make_optimizer

_POOL = 8  # frames are average-pooled to _POOL × _POOL pixels
_STAT_BATCHES = 16  # training batches whose features set the standardisation


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
    numeric = batch["state_numeric"].astype(jnp.float32)
    angles = numeric[..., None] * (jnp.pi * 2.0 ** jnp.arange(6, dtype=jnp.float32))
    sizes = tuple(m.state.categorical_sizes)
    cat = jnp.concatenate([jax.nn.one_hot(batch["state_categorical"][:, i], n) for i, n in enumerate(sizes)], -1)
    hist = batch["history_actions"]
    hist_mask = hist > EOS_ID
    parts = [
        _bag(tok, current, m.lm.vocab_size), _bag(tok, earlier, m.lm.vocab_size),
        (batch["mel"] * batch["mel_mask"][..., None]).reshape(b, -1),
        pooled.reshape(b, -1), motion.reshape(b, -1),
        numeric, jnp.sin(angles).reshape(b, -1), jnp.cos(angles).reshape(b, -1), cat,
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


def _sep_id(cfg) -> int:
    """The id `features.featurize` puts between turns."""
    return features.sep_id(features.load_tokenizer(cfg.data.tokenizer or None), cfg)


def _model(cfg) -> FeatureMLP:
    return FeatureMLP(cfg.model.action_len, cfg.model.dnfm.vocab_size)


def feature_stats(feature_rows: Sequence[jax.Array]) -> dict:
    """{"mean", "scale": [n_features]} of the stacked rows (each [b, n_features]); a constant
    feature gets scale 1, so it stays 0 after standardising."""
    x = jnp.concatenate(list(feature_rows), axis=0)
    std = x.std(0)
    return {"mean": x.mean(0), "scale": jnp.where(std > 1e-6, std, 1.0)}


def _logits(params: dict, batch: dict, cfg, sep_id: int) -> jax.Array:
    """params {"mlp", "stats"} → action logits [b, action_len, vocab]."""
    x = (batch_features(batch, cfg, sep_id) - params["stats"]["mean"]) / params["stats"]["scale"]
    return _model(cfg).apply({"params": params["mlp"]}, x)


def _loss(mlp_params, stats, batch, cfg, sep_id: int) -> jax.Array:
    logits = _logits({"mlp": mlp_params, "stats": stats}, batch, cfg, sep_id)
    tokens = batch["action_tokens"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    # Positions up to <eos>: the grammar-constrained decode puts <pad> after it by itself.
    w = (batch["has_actions"][:, None] & (jnp.cumsum(tokens == EOS_ID, axis=1) - (tokens == EOS_ID) == 0))
    w = w.astype(jnp.float32)
    return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)


def train(cfg: ml_collections.ConfigDict, steps: int, curve_samples: Sequence[dict] = (), curve_every: int = 0,
          log: Callable[[str], None] = print) -> tuple[dict, list[dict]]:
    """Train the baseline on the trainer's batches (same seed) with the trainer's optimizer
    settings (`optim.*`, schedule over `steps`). Returns ({"mlp": weights, "stats": the
    standardisation, `feature_stats`}, curve)."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    cfg.train.steps = int(steps)
    sep_id = _sep_id(cfg)
    batch_size = int(cfg.train.global_batch_size)
    data = pipeline.make_dataset(cfg, split="train", global_batch_size=batch_size, seed=int(cfg.train.seed))
    # The statistics batches are the first training batches themselves: no extra data is seen.
    head = [{k: v for k, v in next(data).items() if k != "sample_id"} for _ in range(min(steps, _STAT_BATCHES))]
    featurize = jax.jit(lambda b: batch_features(b, cfg, sep_id))
    stats = feature_stats([featurize(b) for b in head])
    mlp = _model(cfg).init(jax.random.key(int(cfg.train.seed)), featurize(head[0]))["params"]
    tx = make_optimizer(cfg)
    opt_state = tx.init(mlp)

    @jax.jit
    def step(mlp, opt_state, batch):
        loss, grads = jax.value_and_grad(_loss)(mlp, stats, batch, cfg, sep_id)
        updates, opt_state = tx.update(grads, opt_state, mlp)
        return optax.apply_updates(mlp, updates), opt_state, loss

    curve, t0 = [], time.perf_counter()
    for s in range(1, steps + 1):
        batch = head[s - 1] if s <= len(head) else {k: v for k, v in next(data).items() if k != "sample_id"}
        mlp, opt_state, loss = step(mlp, opt_state, batch)
        params = {"mlp": mlp, "stats": stats}
        if curve_every and curve_samples and (s % curve_every == 0 or s == steps):
            from vlacabin_jax.eval.ladder import score

            row = {"step": s, "success_rate": score(predict(params, cfg, curve_samples), curve_samples)["success_rate"],
                   "loss": float(loss)}
            curve.append(row)
            log(f"  step {s}: heldout success {row['success_rate']:.3f} loss {row['loss']:.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    return jax.device_get({"mlp": mlp, "stats": stats}), curve


def predict(params: dict, cfg: ml_collections.ConfigDict, samples: Sequence[dict],
            batch_size: int = 64) -> list[Prediction]:
    """Grammar-constrained greedy decode (`dnfm.decode_tokens`) of the baseline's logits."""
    sep_id, vocab = _sep_id(cfg), simulator.schema_vocabulary()

    @jax.jit
    def decide(batch):
        return dnfm.decode_tokens(_logits(params, batch, cfg, sep_id), True)

    out = []
    for batch, n in evaluate.batches(samples, cfg, batch_size):
        ids = np.asarray(decide(batch))
        for row in ids[:n]:
            tokens, error = simulator.decode(row, vocab)
            out.append(Prediction(tuple(tokens), None, error))
    return out
