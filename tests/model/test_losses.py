"""Loss-side metrics on hand-made inputs with known answers."""

import jax
import numpy as np

from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID
from vlacabin_jax.model.losses import action_accuracies, cross_entropy


def _logits(predicted: np.ndarray, vocab: int = 10) -> np.ndarray:
    return np.asarray(jax.nn.one_hot(predicted, vocab))


def test_action_accuracy_ignores_padding_and_sequence_accuracy_needs_every_position():
    targets = np.array([[5, 7, EOS_ID, PAD_ID],       # two actions
                        [NOOP_ID, EOS_ID, PAD_ID, PAD_ID],  # <noop> counts as an action token
                        [4, EOS_ID, PAD_ID, PAD_ID]])     # no target: ignored entirely
    has = np.array([True, True, False])
    # Emitting nothing gets padding positions right (3 of 8), yet no action token and no sequence.
    nothing = np.array([[EOS_ID, PAD_ID, PAD_ID, PAD_ID]] * 3)
    assert (nothing == targets)[:2].mean() == 3 / 8
    action, sequence = action_accuracies(_logits(nothing), targets, has)
    assert float(action) == 0.0 and float(sequence) == 0.0
    # Right actions but a wrong <eos> in row 0: 3/3 action tokens, 1/2 sequences.
    almost = targets.copy()
    almost[0, 2] = PAD_ID
    action, sequence = action_accuracies(_logits(almost), targets, has)
    assert float(action) == 1.0 and float(sequence) == 0.5
    action, sequence = action_accuracies(_logits(targets), targets, has)
    assert float(action) == 1.0 and float(sequence) == 1.0


def test_cross_entropy_matches_the_log_softmax_pick_and_its_gradient_is_softmax_minus_one_hot():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(3, 5, 40)) * 4).astype(np.float32)
    logits[0, 0, 7] = 80.0  # a confident, right position: logsumexp must not overflow
    labels = rng.integers(0, 40, size=(3, 5)).astype(np.int32)
    labels[0, 0] = 7
    logp = jax.nn.log_softmax(logits, axis=-1)
    expected = -np.take_along_axis(np.asarray(logp), labels[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(np.asarray(cross_entropy(logits, labels)), expected, rtol=1e-5, atol=1e-5)
    assert abs(float(cross_entropy(logits, labels)[0, 0])) < 1e-5
    grad = jax.grad(lambda lg: cross_entropy(lg, labels).sum())(logits)
    one_hot = np.asarray(jax.nn.one_hot(labels, 40))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.nn.softmax(logits, -1)) - one_hot, atol=1e-6)
    # bf16 logits are computed in float32.
    assert cross_entropy(logits.astype(jax.numpy.bfloat16), labels).dtype == np.float32
