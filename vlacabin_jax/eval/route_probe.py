"""Route probe: can the model's speech encoder read the spoken request on its own?

    speech_probe(cfg, steps, num_train, num_heldout, batch_size) -> result dict

The model's own `SpeechEncoder` (built from `cfg.model`, the Gaussian latents sampled in training
as in the model) under a small attention-and-max-pool head is trained with Adam to name the
request type (the world's `scene`) of a VLA turn from its log-mel alone, on turns that carry a
mel; heldout accuracy is reported overall and on spoken-only turns (no text). A high figure here
beside spoken-only success near the `<noop>` floor in the full model says the information is
legible and the encoder can learn it, so the request is lost further on, inside the model
(docs/evaluation.md, "Speech: legible, learnable alone, not learnt inside the model").
"""

from __future__ import annotations

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vlacabin_jax.eval import evaluate
from vlacabin_jax.model import encoders


def mel_inputs(samples: list[dict], cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """The model's own speech inputs of `samples`, featurized as in training: (mel float32
    [n, mel_frames, n_mels], mel_mask bool [n, mel_frames])."""
    rows = [(b["mel"][:n], b["mel_mask"][:n]) for b, n in evaluate.batches(samples, cfg, 256)]
    return np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])


class SpeechProbe(nn.Module):
    """SpeechEncoder → one attention layer over its latent tokens → max-pool → request logits."""

    cfg: ml_collections.ConfigDict  # the full `model` config
    num_classes: int
    noise: bool = True  # sample the Gaussian latents (training); False: their means (inference)

    @nn.compact
    def __call__(self, mel: jax.Array, mel_mask: jax.Array, key: jax.Array) -> jax.Array:
        """mel [b, t, n_mels], mel_mask [b, t] → logits [b, num_classes] float32."""
        mean, logvar, mask = encoders.SpeechEncoder(self.cfg, dtype=jnp.dtype(self.cfg.dtype))(mel, mel_mask)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape) if self.noise else mean
        width = self.cfg.encoder.width
        h = nn.Dense(width)(z)
        h = h + nn.SelfAttention(self.cfg.encoder.heads, qkv_features=width)(h, mask=mask[:, None, None, :])
        return nn.Dense(self.num_classes)(jnp.where(mask[..., None], h, -1e9).max(axis=1)).astype(jnp.float32)


def speech_probe(cfg: ml_collections.ConfigDict, steps: int, num_train: int = 12000, num_heldout: int = 3000,
                 batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> dict:
    """Train `SpeechProbe` on the train split's VLA turns with a mel; score the heldout split's.

    Args:
      cfg: a full config (its `model` sets the encoder, its `data` the featurized mel).
      steps: Adam steps of `batch_size` rows; num_train / num_heldout: world turns drawn (those
        without a mel are dropped).
    Returns:
      {"accuracy", "spoken_only_accuracy" (nan without spoken-only turns), "chance" (the most
       frequent type's heldout share), "num_classes", "train_turns", "heldout_turns", "steps",
       "seconds"}.
    """
    t0 = time.time()
    train = [s for s in evaluate.eval_samples(cfg, num_train, split="train") if s["mel"] is not None]
    held = [s for s in evaluate.eval_samples(cfg, num_heldout) if s["mel"] is not None]
    types = sorted({s["scene"] for s in train + held})
    index = {t: i for i, t in enumerate(types)}
    (x_tr, m_tr), (x_he, m_he) = mel_inputs(train, cfg), mel_inputs(held, cfg)
    y_tr = np.array([index[s["scene"]] for s in train])
    y_he = np.array([index[s["scene"]] for s in held])
    spoken_only = np.array([not s.get("text") for s in held])

    probe = SpeechProbe(cfg.model, len(types))
    params = probe.init(jax.random.key(seed), x_tr[:2], m_tr[:2], jax.random.key(seed + 1))
    opt = optax.adamw(lr)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, x, m, y, key):
        def loss(p):
            return optax.softmax_cross_entropy_with_integer_labels(probe.apply(p, x, m, key), y).mean()
        grads = jax.grad(loss)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for i in range(steps):
        rows = rng.integers(0, len(train), batch_size)
        params, opt_state = step(params, opt_state, x_tr[rows], m_tr[rows], y_tr[rows], jax.random.key(seed + 2 + i))
    # Heldout from the latent means, as the model infers.
    infer = jax.jit(lambda p, x, m: SpeechProbe(cfg.model, len(types), noise=False).apply(p, x, m, jax.random.key(0)))
    right = np.asarray(infer(params, x_he, m_he)).argmax(-1) == y_he
    spoken_only_accuracy = float(right[spoken_only].mean()) if spoken_only.any() else float("nan")
    return {"accuracy": float(right.mean()), "spoken_only_accuracy": spoken_only_accuracy,
            "chance": float(np.bincount(y_he).max() / len(y_he)), "num_classes": len(types),
            "train_turns": len(train), "heldout_turns": len(held), "steps": steps,
            "seconds": round(time.time() - t0, 1)}
