"""The autoregressive action head (the ladder's baseline): teacher forcing, its loss, and a greedy
decode that always obeys the action grammar."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tests.model.conftest import random_batch
from vlacabin_jax.data.actions import ActionVocabulary
from vlacabin_jax.model import ar_head
from vlacabin_jax.model import functional as F


def test_teacher_inputs_shift_the_targets_right():
    tokens = jnp.array([[5, 6, 1, 0], [2, 1, 0, 0]])
    np.testing.assert_array_equal(ar_head.teacher_inputs(tokens), [[0, 5, 6, 1], [0, 2, 1, 0]])


def test_greedy_actions_feed_back_and_obey_the_grammar():
    vocab = ActionVocabulary()
    seen = []

    def logits_fn(inputs):  # favours <pad>, then <eos> at step 0: both illegal there
        seen.append(inputs)
        lg = jnp.zeros(inputs.shape + (vocab.size,)).at[..., 0].set(5.0).at[..., 1].set(4.0)
        return lg.at[:, :, 7].set(3.0)

    out = np.asarray(ar_head.greedy_actions(logits_fn, 3, 8))
    for row in out:
        assert vocab.decode(list(row)) == [vocab.tokens[7]]
    assert int(seen[1][0, 1]) == 7  # step 1 reads the token chosen at step 0


def test_the_autoregressive_head_trains_and_decodes(tiny_cfg):
    cfg = ml_collections.ConfigDict(tiny_cfg.to_dict())
    cfg.model.action_head = "autoregressive"
    cfg.model.dtype = "float32"
    trainable, frozen = (nn.unbox(t) for t in F.init_params(cfg, jax.random.key(0)))
    assert "action_decoder" in trainable
    batch = jax.tree.map(jnp.asarray, random_batch(cfg, 2))
    rngs = {"latent": jax.random.key(1), "flow": jax.random.key(2)}

    @jax.jit
    def run(p):
        (loss, m), g = jax.value_and_grad(lambda q: F.loss_fn(q, frozen, batch, rngs, cfg, 0), has_aux=True)(p)
        return m, g["action_decoder"], F.infer(p, frozen, batch, cfg)[0]

    metrics, grads, actions = run(trainable)
    assert np.isfinite(float(metrics["ar_ce"])) and float(metrics["ar_ce"]) > 0
    assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(grads))
    vocab = ActionVocabulary()
    for row in np.asarray(actions):
        vocab.decode(list(row))  # well formed, or it raises
