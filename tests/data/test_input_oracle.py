"""The inputs decide the answer: a rule-based reader of a batch row's inputs reproduces every target.

`oracle.InputOracle` sees only the model inputs of a featurized row (`oracle.INPUT_FIELDS`) plus the
perceptual facts the world drew into the frames and the mel (their legibility is
tests/data/test_cue_legibility.py), rebuilds the policy's context from them and runs the policy.
If it matches every target on heldout turns, the batch carries what each answer depends on; with
the earlier turn's action log blanked it must fail on follow-ups, which shows the log is what
decides them.
"""

import collections

import numpy as np
import pytest

from configs.vla_cabin import get_config
from vlacabin_jax.data import features, oracle, pipeline, spec, world
from vlacabin_jax.data.actions import ActionVocabulary
from vlacabin_jax.eval.evaluate import eval_samples

NUM_TURNS = 3000  # heldout VLA turns (~10 s on one core)


@pytest.fixture(scope="module")
def setup():
    """(config, oracle, [(sample, featurized row, perceptual facts)]) of the first heldout turns."""
    cfg = get_config("tiny")
    tok, vocab = features.load_tokenizer(), ActionVocabulary()
    samples = eval_samples(cfg, NUM_TURNS)  # world indices HELDOUT_OFFSET + i
    seed = int(cfg.data.world_seed)
    turns = []
    for i, s in enumerate(samples):
        # The voice is drawn into the mel only; the sample dict does not name it.
        voice = world.vla_context(seed, pipeline.HELDOUT_OFFSET + i).voice
        turns.append((s, features.featurize(s, cfg, tok, vocab), oracle.perceptual_facts(s["state"], voice)))
    return cfg, oracle.InputOracle(cfg, tok, vocab), turns


def _inputs(row: dict) -> dict:
    """Only the model inputs of a row: the oracle cannot see a target."""
    assert set(oracle.INPUT_FIELDS) <= set(spec.batch_spec(get_config("tiny"), 1))
    return {k: row[k] for k in oracle.INPUT_FIELDS}


def test_every_paraphrase_names_one_request_and_sounds_unlike_the_others():
    """The lexicon is unambiguous, in text and in sound: no two different requests share a text or
    a formant pattern at the tiny render size."""
    lexicon = oracle.request_lexicon()  # raises on a text that says two requests
    cfg = get_config("tiny")
    reader = oracle.MelReader(list(lexicon), cfg.model.speech.n_mels, cfg.data.mel_frames)
    patterns = {}
    for length, (templates, texts) in reader.candidates.items():
        for tmpl, text in zip(templates, texts):
            key = (length, np.round(tmpl, 4).tobytes())
            assert lexicon[patterns.setdefault(key, text)] == lexicon[text], (patterns[key], text)
    assert len(lexicon) > 400


def test_the_oracle_reproduces_every_target(setup):
    cfg, orc, turns = setup
    wrong, coverage = [], collections.Counter()
    for s, row, facts in turns:
        got = orc.answer(_inputs(row), facts)
        if got != s["actions"]:
            wrong.append((s["sample_id"], s["scene"], s["text"], s["history"], s["history_actions"], got,
                          s["actions"]))
        coverage["spoken only"] += not s["text"]
        coverage["log"] += bool(s["history_actions"]) and s["history_actions"][0][0] != "<noop>"
        coverage[s["scene"]] += s["scene"] in ("undo", "turn_off", "more", "same_passenger")
    assert not wrong, f"{len(wrong)} of {len(turns)} targets not decided by the inputs: {wrong[:5]}"
    # The set exercises what the oracle has to read: spoken-only requests, logs, every follow-up.
    assert coverage["spoken only"] > 300 and coverage["log"] > 150, coverage
    assert min(coverage[t] for t in ("undo", "turn_off", "more", "same_passenger")) > 40, coverage


def test_without_the_action_log_follow_ups_are_not_decided(setup):
    """Blank history_actions / history_before: the earlier turn's text alone does not decide
    undo, turn_off and `more` after a window or seat heat."""
    _, orc, turns = setup
    failed = collections.Counter()
    for s, row, facts in turns:
        blank = dict(_inputs(row), history_actions=np.zeros_like(row["history_actions"]),
                     history_before=np.zeros_like(row["history_before"]))
        if orc.answer(blank, facts) != s["actions"]:
            failed[s["scene"]] += 1
    assert failed["undo"] > 20 and failed["turn_off"] > 20 and failed["more"] > 5, failed
    assert set(failed) <= {"undo", "turn_off", "more"}, failed  # nothing else reads the log


def test_the_oracle_reads_the_request_from_the_voice_when_there_is_no_text(setup):
    """Spoken-only turns: the mel alone names the request (with a margin over the next best)."""
    _, orc, turns = setup
    n = 0
    for s, row, facts in turns:
        if s["text"] or s["mel"] is None:
            continue
        texts, scores = orc.mel_reader.scores(s["mel"])
        best = int(np.argmax(scores))
        others = [sc for t, sc in zip(texts, scores) if orc.lexicon[t] != orc.lexicon[texts[best]]]
        assert scores[best] > max(others), s["sample_id"]
        assert orc.request(_inputs(row)).type == s["scene"]
        n += 1
    assert n > 300


def test_the_oracle_refuses_rows_that_name_no_request(setup):
    cfg, orc, turns = setup
    s, row, facts = next(t for t in turns if t[0]["text"] and t[0]["mel"] is None)  # typed
    silent = dict(_inputs(row), text_mask=np.zeros_like(row["text_mask"]))
    with pytest.raises(oracle.Undecidable, match="neither"):
        orc.answer(silent, facts)
    tok = features.load_tokenizer()
    ids = features.encode_text(tok, "Fly me to the moon")
    odd = dict(_inputs(row), text_tokens=np.array(ids + [0] * (cfg.data.text_len - len(ids)), np.int32),
               text_mask=np.arange(cfg.data.text_len) < len(ids))
    with pytest.raises(oracle.Undecidable, match="no paraphrase"):
        orc.answer(odd, facts)
    with pytest.raises(ValueError, match="seat sensors"):
        orc.answer(_inputs(row), dict(facts, occupants=["empty"] * 4))
