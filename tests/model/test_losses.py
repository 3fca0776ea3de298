"""Loss-side metrics on hand-made inputs with known answers."""

import jax
import numpy as np

from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID
from vlacabin_jax.model.losses import action_accuracies


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
