"""DNFM: the Euler sampler, and that the whole model fits a fixed toy batch with a codebook that
does not collapse and samples that stay right as K grows."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tests.model.conftest import random_batch
from vlacabin_jax.model import dnfm, setting_layout
from vlacabin_jax.model import functional as F
from vlacabin_jax.model.losses import min_pairwise_distance

STEPS = 200  # Adam steps of the toy fit: every sampled token is right at 200 (300 was the old budget)


def test_euler_sampler_integrates_exactly_for_constant_and_linear_fields():
    z0 = jnp.arange(12.0).reshape(1, 3, 4)
    for steps in (1, 2, 5, 8):
        out = dnfm.euler_sample(lambda x, t: jnp.ones_like(x) * 2.0, z0, steps)
        np.testing.assert_allclose(out, z0 + 2.0, rtol=1e-6)
    # v = x1 - z0 held fixed walks the straight path to x1 for every K.
    x1 = -z0
    for steps in (1, 4):
        np.testing.assert_allclose(dnfm.euler_sample(lambda x, t: x1 - z0, z0, steps), x1, atol=1e-5)


def test_model_fits_toy_batch_and_codebook_stays_apart(tiny_cfg):
    """tiny's per-setting DNFM; the target is the sequence rebuilt from the settings (a random
    batch may set one path twice: the last value is what the cabin ends with). The sequence
    layout's terms are seen falling in the loop tests' reference run (tests/train/test_loop.py)."""
    assert tiny_cfg.model.dnfm.layout == "per_setting" and tiny_cfg.loss.keep_weight == 0.3
    batch = jax.tree.map(jnp.asarray, random_batch(tiny_cfg, 8, seed=3))
    trainable, frozen = F.init_params(tiny_cfg, jax.random.key(0))
    trainable, frozen = nn.unbox(trainable), nn.unbox(frozen)
    # A decaying rate ends the fit cleanly instead of on a noisy Adam step.
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, STEPS))
    opt_state = tx.init(trainable)

    def codebook(params):
        return F.build_model(tiny_cfg).apply({"params": F.merge_params(params, frozen)},
                                             method=lambda m: m.dnfm.codebook())

    @jax.jit
    def step(params, opt_state, i):
        rngs = {"latent": jax.random.fold_in(jax.random.key(1), i), "flow": jax.random.fold_in(jax.random.key(2), i)}
        grads, metrics = jax.grad(lambda p: F.loss_fn(p, frozen, batch, rngs, tiny_cfg, i), has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    start_distance = float(min_pairwise_distance(codebook(trainable)))
    for i in range(STEPS):
        trainable, opt_state, metrics = step(trainable, opt_state, i)
    end_distance = float(min_pairwise_distance(codebook(trainable)))
    print(f"codebook min pairwise distance {start_distance:.3f} -> {end_distance:.3f}")
    assert end_distance > 0.8 * start_distance

    tables = setting_layout.layout_tables()
    targets = np.asarray(setting_layout.to_sequence(
        setting_layout.to_settings(batch["action_tokens"], tables), tiny_cfg.model.action_len, tables))
    # One program for the four samplers: they share the encoders and bridge (compiled once).
    sampled = jax.jit(lambda p: [F.infer(p, frozen, batch, tiny_cfg, k)[0] for k in (1, 2, 4, 8)])(trainable)
    accuracies = [float((np.asarray(actions) == targets).mean()) for actions in sampled]
    print("sampled-token accuracy at K=1,2,4,8:", accuracies)
    assert accuracies == [1.0, 1.0, 1.0, 1.0]
