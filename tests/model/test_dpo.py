"""Diffusion-DPO on flow-matching errors: the loss on hand-made errors, and the reference path."""

import copy
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlacabin_jax.model import dpo, setting_layout
from vlacabin_jax.model.dnfm import DNFM


def test_policy_equal_to_reference_gives_log2_and_zero_margin():
    e = jnp.array([0.7, 1.3, 0.2])
    loss, m = dpo.dpo_terms(e, e + 0.5, e, e + 0.5, beta=3.0, mask=jnp.ones(3, bool))
    assert math.isclose(float(loss), math.log(2.0), rel_tol=1e-6)
    assert float(m["dpo_margin"]) == 0.0 and float(m["dpo_accuracy"]) == 0.0 and float(m["dpo_pairs"]) == 3


def test_lowering_the_chosen_error_raises_reward_margin_and_accuracy():
    ref_w, ref_l = jnp.array([1.0, 1.0, 1.0, 1.0]), jnp.array([2.0, 2.0, 2.0, 2.0])
    policy_w = ref_w - jnp.array([0.1, 0.2, 0.0, -0.1])  # better on the chosen side for 2 of 4 pairs
    loss, m = dpo.dpo_terms(policy_w, ref_l, ref_w, ref_l, beta=2.0, mask=jnp.ones(4, bool))
    assert float(m["dpo_accuracy"]) == 0.5
    np.testing.assert_allclose(float(m["dpo_margin"]), 2.0 * 0.2 / 4, rtol=1e-6)
    np.testing.assert_allclose(float(m["dpo_reward_chosen"]), 2.0 * 0.2 / 4, rtol=1e-6)
    # Only the pairs count; the gradient lowers the chosen error and raises the rejected one.
    mask = jnp.array([True, True, False, False])
    grads = jax.grad(lambda w, l: dpo.dpo_terms(w, l, ref_w, ref_l, 2.0, mask)[0], argnums=(0, 1))(policy_w, ref_l)
    assert np.all(np.asarray(grads[0])[:2] > 0) and np.all(np.asarray(grads[1])[:2] < 0)
    assert np.all(np.asarray(grads[0])[2:] == 0)
    loss_better, _ = dpo.dpo_terms(ref_w - 1.0, ref_l + 1.0, ref_w, ref_l, 2.0, jnp.ones(4, bool))
    assert float(loss_better) < math.log(2.0) and float(loss) < math.log(2.0) + 0.1


def test_sequence_error_sums_positions_and_averages_the_width():
    z0 = jnp.zeros((1, 3, 2))
    x1 = jnp.ones((1, 3, 2))
    v = jnp.array([[[1.0, 1.0], [0.0, 0.0], [1.0, 3.0]]])  # errors per position: 0, 1, (0 + 4) / 2
    np.testing.assert_allclose(np.asarray(dpo.sequence_velocity_error(v, z0, x1)), [3.0])


@pytest.mark.parametrize("layout", ["sequence", "per_setting"])
def test_reference_errors_equal_the_policy_errors_of_the_same_params(tiny_cfg, layout):
    """The frozen copy evaluated by `reference_errors` is the same DNFM as the policy's, so a
    reference equal to the policy gives the log 2 / zero-margin start of every align run."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.dnfm.layout = layout
    b, length, d = 2, setting_layout.num_positions(cfg.model), cfg.model.dnfm.d_action
    module = DNFM(cfg.model, dtype=jnp.dtype(cfg.model.dtype))
    x = jnp.zeros((b, length, d))
    # The policy's connector outputs, which a cross-attending DNFM reads (tiny's does).
    memory = jax.random.normal(jax.random.key(3), (b, 5, cfg.model.bridge.connector.width))
    memory_mask = jnp.array([[True] * 5, [True] * 3 + [False] * 2])
    params = jax.jit(module.init)(jax.random.key(0), x, jnp.zeros((b,)), memory, memory_mask)["params"]
    params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.key(1), p.shape), params)
    z0 = jax.random.normal(jax.random.key(2), (b, length, d))
    t = jnp.array([0.0, 0.4])
    w = jnp.array([[5, 60, 1, 0, 0, 0, 0, 0], [2, 1, 0, 0, 0, 0, 0, 0]])  # answers: action_len ids
    l = jnp.array([[7, 1, 0, 0, 0, 0, 0, 0], [9, 80, 1, 0, 0, 0, 0, 0]])

    @jax.jit  # one compiled program: eager dispatch of the scanned blocks is slow on CPU
    def errors(params):
        codebook = module.apply({"params": params}, method=DNFM.codebook)

        def policy(tokens):
            x1 = codebook[setting_layout.dnfm_targets(tokens, cfg.model)]
            v = module.apply({"params": params}, (1 - t[:, None, None]) * z0 + t[:, None, None] * x1, t,
                             memory, memory_mask)
            return dpo.sequence_velocity_error(v, z0, x1)

        return (policy(w), policy(l)) + dpo.reference_errors({"dnfm": params}, cfg, z0, t, w, l, memory, memory_mask)

    policy_w, policy_l, ref_w, ref_l = errors(params)
    np.testing.assert_allclose(np.asarray(policy_w), np.asarray(ref_w), rtol=1e-5)
    loss, m = dpo.dpo_terms(policy_w, policy_l, ref_w, ref_l, 1.0, jnp.ones(b, bool))
    np.testing.assert_allclose(float(loss), math.log(2.0), rtol=1e-5)
    assert float(ref_w[0]) != float(ref_l[0])  # the two sides really are different paths
