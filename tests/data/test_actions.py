"""Action vocabulary: stable ids, round-trips, precise errors, JSON for checkpoints."""

import json
import re

import numpy as np
import pytest

from vlacabin_jax.data import actions
from vlacabin_jax.data.actions import (EOS_ID, NOOP_ID, PAD_ID, ActionVocabulary, InvalidActionSequence,
                                       build_tokens, setting_paths)


@pytest.fixture(scope="module")
def vocab():
    return ActionVocabulary()


def test_fixed_special_ids_and_size(vocab):
    assert vocab.tokens[:3] == ("<pad>", "<eos>", "<noop>")
    assert (PAD_ID, EOS_ID, NOOP_ID) == (0, 1, 2)
    assert 100 < vocab.size <= 300
    assert re.fullmatch(r"\d+\.\d+\.\d+", ActionVocabulary.VERSION)
    for t in ("climate.temp=22", "seat.driver.heat=2", "window.rear_left=open_30", "app.meeting=start",
              "light.ambient.color=blue", "media.volume=10", "sunshade.roof=closed", "fragrance=lavender",
              "screen.driver=video", "seat.rear_right.massage=gentle", "light.reading.passenger=on"):
        assert t in vocab


def test_order_is_sorted_by_path_then_declared_values(vocab):
    assert build_tokens() == vocab.tokens  # deterministic
    paths = [t.split("=")[0] for t in vocab.tokens[3:]]
    firsts = list(dict.fromkeys(paths))
    assert firsts == sorted(firsts)
    assert paths == sorted(paths)  # each path's values are contiguous
    temps = [t for t in vocab.tokens if t.startswith("climate.temp=")]
    assert temps == [f"climate.temp={v}" for v in range(16, 29)]
    vols = [t for t in vocab.tokens if t.startswith("media.volume=")]
    assert vols == [f"media.volume={v}" for v in range(11)]  # natural, not lexicographic
    assert vocab.size == 3 + sum(len(s.values) for s in setting_paths().values())


def test_round_trip_every_token_and_random_sequences(vocab):
    for t in vocab.tokens[2:]:
        ids = vocab.encode([t])
        assert ids[-1] == EOS_ID and vocab.decode(ids) == [t]
    rng = np.random.default_rng(0)
    for _ in range(200):
        seq = list(rng.choice(vocab.tokens[3:], size=int(rng.integers(1, 8))))
        ids = vocab.encode(seq) + [PAD_ID] * int(rng.integers(0, 4))
        assert vocab.decode(ids) == seq
        assert vocab.decode(np.asarray(ids, np.int32)) == seq  # numpy rows work too
    assert vocab.encode(["climate.fan=3"], add_eos=False) == [vocab.token_id("climate.fan=3")]


@pytest.mark.parametrize("ids, position, reason", [
    ([5, 999, 1], 1, "unknown action id 999"),
    ([-1, 1], 0, "unknown action id -1"),
    ([5, 0, 6, 1], 1, "<pad> before <eos>"),
    ([5, 1, 6], 2, "after <eos>"),
    ([5, 1, 0, 1], 3, "after <eos>"),
    ([2, 5, 1], 1, "<noop> must be the only action"),
    ([5, 2, 1], 1, "<noop> must be the only action"),
    ([1, 0], 0, "<eos> before any action"),
    ([5, 6], 2, "missing <eos>"),
    ([], 0, "missing <eos>"),
])
def test_decode_errors_are_precise(vocab, ids, position, reason):
    with pytest.raises(InvalidActionSequence) as e:
        vocab.decode(ids)
    assert e.value.position == position
    assert reason in e.value.reason
    assert f"position {position}" in str(e.value)


def test_decode_without_eos_when_allowed(vocab):
    ids = vocab.encode(["climate.fan=3", "climate.temp=20"], add_eos=False)
    assert vocab.decode(ids, require_eos=False) == ["climate.fan=3", "climate.temp=20"]


@pytest.mark.parametrize("tokens, position, reason", [
    ([], 0, "empty sequence"),
    (["climate.temp=22", "climate.temp=99"], 1, "unknown action token 'climate.temp=99'"),
    (["climate.heat=2"], 0, "unknown action token"),
    (["climate.temp=22", "<eos>"], 1, "may not appear inside"),
    (["<pad>"], 0, "may not appear inside"),
    (["<noop>", "climate.temp=22"], 0, "<noop> must be the only action"),
])
def test_encode_errors_are_precise(vocab, tokens, position, reason):
    with pytest.raises(InvalidActionSequence) as e:
        vocab.encode(tokens)
    assert e.value.position == position and reason in e.value.reason


def test_json_round_trip_keeps_saved_ids(vocab):
    text = vocab.to_json()
    obj = json.loads(text)
    assert obj["version"] == actions.VERSION and obj["tokens"][:3] == ["<pad>", "<eos>", "<noop>"]
    again = ActionVocabulary.from_json(text)
    assert again == vocab and again.compatible_with(vocab) and again.size == vocab.size
    # An older checkpoint's vocabulary is used as saved, even if the schema moved on.
    old = dict(obj, version="0.9.0", tokens=obj["tokens"][:-1])
    restored = ActionVocabulary.from_json(json.dumps(old))
    assert restored.version == "0.9.0" and restored.size == vocab.size - 1
    assert not restored.compatible_with(vocab)
    with pytest.raises(ValueError, match="not an action vocabulary"):
        ActionVocabulary.from_json(json.dumps({"tokens": obj["tokens"]}))
    with pytest.raises(ValueError, match="first tokens"):
        ActionVocabulary(["<eos>", "<pad>", "<noop>", "climate.temp=22"])
