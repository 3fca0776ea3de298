"""The per-setting DNFM layout: its tables, and a lossless round trip of real answers through it."""

import jax.numpy as jnp
import numpy as np
import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.data import cabin
from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID, ActionVocabulary, split_token
from vlacabin_jax.eval import metrics
from vlacabin_jax.eval.evaluate import eval_samples
from vlacabin_jax.model import setting_layout


def test_every_device_token_belongs_to_one_position_and_the_order_honours_the_rules():
    tables, vocab = setting_layout.layout_tables(), ActionVocabulary()
    assert len(tables.paths) == 43 and tables.value_mask.shape == (43, vocab.size)
    assert (tables.value_mask[:, PAD_ID]).all() and not tables.value_mask[:, [EOS_ID, NOOP_ID]].any()
    # Each device token is allowed at exactly its own path's position.
    assert (tables.value_mask[:, 3:].sum(0) == 1).all()
    for i, tok in enumerate(vocab.tokens[3:], start=3):
        assert tables.paths[tables.path_of_token[i]] == split_token(tok)[0]
    rank = tables.decode_rank
    assert sorted(rank.tolist()) == list(range(vocab.size))
    for i, a in enumerate(vocab.tokens):
        for j, b in enumerate(vocab.tokens):
            if i != j and cabin.inversions([b, a]):  # a must come before b
                assert rank[i] < rank[j], (a, b)


def _ids(tokens, vocab, length):
    ids = vocab.encode(tokens)
    return ids + [PAD_ID] * (length - len(ids))


@pytest.mark.parametrize("length", [8])
def test_policy_answers_survive_the_round_trip(length):
    """to_sequence(to_settings(answer)) ends every heldout turn in the target's cabin, with no
    order violation: the layout loses nothing the simulator judges."""
    cfg, vocab, tables = get_config("tiny"), ActionVocabulary(), setting_layout.layout_tables()
    samples = eval_samples(cfg, 400)
    targets = np.array([_ids(list(s["actions"]), vocab, length) for s in samples], np.int32)
    settings = setting_layout.to_settings(jnp.asarray(targets), tables)
    rebuilt = np.asarray(setting_layout.to_sequence(settings, length, tables))
    scenes = 0
    for sample, row in zip(samples, rebuilt):
        tokens = tuple(vocab.decode(row))
        rec = metrics.score_sample(sample, metrics.Prediction(tokens))
        assert rec["success"] and not rec["inversion"], (sample["actions"], tokens)
        scenes += len(sample["actions"]) > 3
    assert scenes > 20  # long answers were in the slice


def test_settings_decode_is_always_well_formed():
    """Random per-setting choices, from none changed to every setting changed, decode to valid
    sequences: `<noop>` alone, or at most length - 1 changes in rank order, then `<eos>`."""
    tables, vocab = setting_layout.layout_tables(), ActionVocabulary()
    rng = np.random.default_rng(0)
    allowed = [np.flatnonzero(row) for row in tables.value_mask]
    rows = []
    for keep_rate in (1.0, 0.97, 0.9, 0.5, 0.0):
        for _ in range(20):
            rows.append([PAD_ID if rng.uniform() < keep_rate else rng.choice(a[1:]) for a in allowed])
    out = np.asarray(setting_layout.to_sequence(jnp.asarray(rows, jnp.int32), 8, tables))
    for settings, seq in zip(rows, out):
        tokens = vocab.decode(seq)
        changed = sum(s != PAD_ID for s in settings)
        assert tokens == ["<noop>"] if changed == 0 else len(tokens) == min(changed, 7)
        assert not cabin.inversions(tokens)
        ranks = [tables.decode_rank[vocab.token_id(t)] for t in tokens]
        assert ranks == sorted(ranks)
