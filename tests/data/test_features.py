"""Featurizer and packaged tokenizer: exact batch contract, masks, layouts, no <unk>."""

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer

from configs.vla_cabin import get_config
from vlacabin_jax.data import phrases, schema_sizes, spec, world
from vlacabin_jax.data.actions import EOS_ID, NOOP_ID, PAD_ID, ActionVocabulary, InvalidActionSequence
from vlacabin_jax.data.features import (TOKENIZER_DIR, encode_text, featurize, featurize_pair, history_rows,
                                        load_tokenizer)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def vocab():
    return ActionVocabulary()


def gen(cfg, seed, index, kind):
    return world.generate(seed, index, kind, cfg.model.vit.image_size, cfg.data.num_frames,
                          cfg.model.speech.n_mels, cfg.data.mel_frames)


@pytest.mark.parametrize("variant", ["tiny", "small"])
def test_shapes_and_dtypes_match_the_batch_spec_exactly(variant, tok, vocab):
    cfg = get_config(variant)
    want = spec.batch_spec(cfg, 4)
    for kind in spec.KINDS:
        feats = [featurize(gen(cfg, 1, i, kind), cfg, tok, vocab) for i in range(4)]
        for f in feats:
            assert set(f) == set(want)
            for k, (shape, dtype) in want.items():
                assert f[k].shape == shape[1:] and f[k].dtype == dtype, (kind, k, f[k].shape, f[k].dtype)
        batch = {k: np.stack([f[k] for f in feats]) for k in want}
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {k: (s, np.dtype(d)) for k, (s, d) in want.items()}
        assert np.all(batch["kind"] == spec.KINDS.index(kind))


def test_masks_follow_the_inputs(tok, vocab):
    cfg = get_config("tiny")
    seen = set()
    for i in range(300):
        kind = spec.KINDS[i % 4]
        s = gen(cfg, 2, i, kind)
        f = featurize(s, cfg, tok, vocab)
        speech, text, video, state = f["modality_mask"]
        assert speech == (s["mel"] is not None) and f["mel_mask"].sum() == (0 if s["mel"] is None else len(s["mel"]))
        assert video == (s["frames"] is not None) and f["frame_mask"].sum() == (0 if s["frames"] is None else len(s["frames"]))
        assert text == bool(s["text"] or s["history"]) and f["text_mask"].any() == text
        assert state == (kind == "vla")
        assert np.all(f["mel"][~f["mel_mask"]] == 0) and np.all(f["frames"][~f["frame_mask"]] == 0)
        assert f["frames"].dtype == np.uint8  # raw RGB bytes; the model scales them on device
        if s["frames"] is not None:
            assert np.array_equal(f["frames"][f["frame_mask"]], s["frames"])
        assert np.all(f["text_tokens"][~f["text_mask"]] == cfg.model.text_pad_id)
        assert f["has_actions"] == (kind == "vla")
        assert f["constraint_tags"].sum() == len(s["constraint_tags"])
        seen.add((kind, bool(speech), bool(text)))
    assert ("vla", False, True) in seen and ("vla", True, True) in seen  # typed, spoken
    assert ("vla", True, False) in seen  # spoken only, no history


def test_actions_and_explanations_layout(tok, vocab):
    cfg = get_config("tiny")
    for i in range(200):
        s = gen(cfg, 4, i, "vla")
        f = featurize(s, cfg, tok, vocab)
        row = f["action_tokens"]
        assert vocab.decode(row) == s["actions"]
        assert row[len(s["actions"])] == EOS_ID and np.all(row[len(s["actions"]) + 1:] == 0)
        e, m = f["explanation_tokens"], f["explanation_mask"]
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert e[0] == cfg.model.text_bos_id and e[n - 1] == cfg.model.text_eos_id and np.all(e[n:] == 0)
        assert tok.decode(e[1:n - 1].tolist()) == s["explanation"]  # never truncated at tiny size
    img = featurize(gen(cfg, 4, 0, "image_text"), cfg, tok, vocab)
    assert not img["has_actions"] and np.all(img["action_tokens"] == 0)
    assert not img["explanation_mask"].any() and np.all(img["explanation_tokens"] == 0)


def test_history_is_joined_with_sep_and_cut_oldest_first(tok, vocab):
    cfg = get_config("tiny")
    sep = tok.sep_token_id
    s = dict(gen(cfg, 4, 0, "vla"), history=["Heat my seat"], text="Same for the passenger")
    f = featurize(s, cfg, tok, vocab)
    ids = f["text_tokens"][f["text_mask"]].tolist()
    assert ids == encode_text(tok, "Heat my seat") + [sep] + encode_text(tok, "Same for the passenger")
    long_history = ["Set the temperature to 22"] * 10
    f = featurize(dict(s, history=long_history), cfg, tok, vocab)
    cur = encode_text(tok, "Same for the passenger")
    assert f["text_mask"].all() and f["text_tokens"][-len(cur):].tolist() == cur
    spoken = featurize(dict(s, text=""), cfg, tok, vocab)
    assert spoken["text_tokens"][spoken["text_mask"]].tolist()[-1] == sep


def test_earlier_turn_action_log_layout(tok, vocab):
    """A follow-up turn carries the earlier turn's executed tokens and the values they replaced."""
    cfg = get_config("tiny")
    undo = next(s for s in (gen(cfg, 4, i, "vla") for i in range(400))
                if s["scene"] == "undo" and len(s["history_actions"]) >= 2 and s["history_actions"][0][0] != "<noop>")
    f = featurize(undo, cfg, tok, vocab)
    log = undo["history_actions"]
    n = len(log)
    assert f["history_actions"].tolist() == [vocab.token_id(e) for e, _ in log] + [EOS_ID] + [PAD_ID] * (7 - n)
    assert f["history_before"].tolist() == [vocab.token_id(b) for _, b in log] + [PAD_ID] * (8 - n)
    # Spelled out: executed ids, <eos>, <pad>; under each the before-token of its path.
    log = [["climate.temp=21", "climate.temp=23"], ["climate.fan=3", "climate.fan=2"]]
    acts, before = history_rows(log, 8, vocab)
    t = vocab.token_id
    assert acts.tolist() == [t("climate.temp=21"), t("climate.fan=3"), EOS_ID, 0, 0, 0, 0, 0]
    assert before.tolist() == [t("climate.temp=23"), t("climate.fan=2"), 0, 0, 0, 0, 0, 0]
    assert acts.dtype == before.dtype == np.int32
    # An earlier turn that did nothing; no earlier turn; a sample without the field (old shards).
    acts, before = history_rows([["<noop>", "<noop>"]], 8, vocab)
    assert acts.tolist() == [NOOP_ID, EOS_ID] + [0] * 6 and before.tolist() == [NOOP_ID] + [0] * 7
    for s in (dict(undo, history_actions=[]), {k: v for k, v in undo.items() if k != "history_actions"},
              gen(cfg, 4, 1, "speech_text")):
        f = featurize(s, cfg, tok, vocab)
        assert not f["history_actions"].any() and not f["history_before"].any()


def test_generated_logs_are_empty_without_an_earlier_turn(tok, vocab):
    cfg = get_config("tiny")
    kinds = set()
    for i in range(200):
        s = gen(cfg, 6, i, spec.KINDS[i % 4])
        f = featurize(s, cfg, tok, vocab)
        has_log = bool(f["history_actions"].any())
        assert has_log == bool(s["history"]), (s["history"], s["history_actions"])
        if has_log:  # aligned: a before-token exactly under each executed token, <pad> under <eos>
            n = int((f["history_actions"] != PAD_ID).sum()) - 1
            assert (f["history_before"][:n] != PAD_ID).all() and not f["history_before"][n:].any()
            kinds.add(s["kind"])
    assert kinds == {"vla"}


def test_invalid_action_logs_raise(tok, vocab):
    cfg = get_config("tiny")
    s = gen(cfg, 4, 3, "vla")
    too_long = [[f"seat.driver.heat={i % 4}", "seat.driver.heat=0"] for i in range(8)]
    with pytest.raises(ValueError, match="history_actions: 8 actions do not fit action_len=8"):
        featurize(dict(s, history_actions=too_long), cfg, tok, vocab)
    with pytest.raises(ValueError, match="not a value of the path"):
        featurize(dict(s, history_actions=[["climate.temp=21", "climate.fan=2"]]), cfg, tok, vocab)
    with pytest.raises(ValueError, match="not a value of the path"):
        featurize(dict(s, history_actions=[["<noop>", "climate.fan=2"]]), cfg, tok, vocab)
    with pytest.raises(InvalidActionSequence, match="unknown before-token"):
        featurize(dict(s, history_actions=[["climate.temp=21", "climate.temp=99"]]), cfg, tok, vocab)
    with pytest.raises(InvalidActionSequence, match="history_actions: .*unknown action token"):
        featurize(dict(s, history_actions=[["warp=9", "warp=1"]]), cfg, tok, vocab)
    with pytest.raises(ValueError, match="pairs"):
        featurize(dict(s, history_actions=[["climate.temp=21"]]), cfg, tok, vocab)


def test_invalid_inputs_raise(tok, vocab):
    cfg = get_config("tiny")
    s = gen(cfg, 4, 3, "vla")
    with pytest.raises(ValueError, match="do not fit action_len=8"):
        featurize(dict(s, actions=["climate.temp=20"] + [f"climate.fan={i}" for i in range(7)]), cfg, tok, vocab)
    featurize(dict(s, actions=[f"climate.fan={i}" for i in range(7)]), cfg, tok, vocab)  # 7 + <eos> fits
    with pytest.raises(ValueError, match="image_size=32"):
        featurize(dict(s, frames=np.zeros((2, 64, 64, 3), np.uint8)), cfg, tok, vocab)
    with pytest.raises(ValueError, match="n_mels=32"):
        featurize(dict(s, mel=np.zeros((5, 80), np.float32)), cfg, tok, vocab)
    with pytest.raises(ValueError, match="more than the config"):
        featurize(dict(s, mel=np.zeros((40, 32), np.float32)), cfg, tok, vocab)
    with pytest.raises(ValueError, match="unknown constraint tag"):
        featurize(dict(s, constraint_tags=["sunny"]), cfg, tok, vocab)


def test_preference_pair_features(tok, vocab):
    cfg = get_config("tiny")
    p = world.preference_pair(0, 5, 32, 4, 32, 32)
    f = featurize_pair(p, cfg, tok, vocab)
    assert vocab.decode(f["action_tokens"]) == p["chosen"]
    assert vocab.decode(f["rejected_tokens"]) == p["rejected"] and f["rejected_tokens"].shape == (8,)


def test_packaged_tokenizer_ids_size_and_config(tok):
    assert [tok.convert_tokens_to_ids(t) for t in ("<pad>", "<bos>", "<eos>", "<unk>", "<sep>")] == [0, 1, 2, 3, 4]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.sep_token_id) == (0, 1, 2, 3, 4)
    assert len(tok) <= 2048 and len(tok) == schema_sizes()["text_vocab"]
    assert Tokenizer.from_file(os.path.join(TOKENIZER_DIR, "tokenizer.json")).get_vocab_size() == len(tok)
    cfg = get_config("tiny")
    assert (cfg.model.text_pad_id, cfg.model.text_bos_id, cfg.model.text_eos_id) == (0, 1, 2)
    assert cfg.model.lm.vocab_size == len(tok)
    assert json.load(open(os.path.join(TOKENIZER_DIR, "tokenizer_config.json")))["sep_token"] == "<sep>"
    # The directory also loads as a plain transformers tokenizer directory.
    again = load_tokenizer(TOKENIZER_DIR)
    assert again.encode("冷一点", add_special_tokens=False) == tok.encode("冷一点", add_special_tokens=False)


def test_no_unknown_tokens_on_generated_text_in_both_languages(tok):
    unk = tok.unk_token_id
    texts = list(phrases.all_strings())
    langs = set()
    for i in range(3000):
        s = world.generate(77, i, spec.KINDS[i % 4], 8, 1, 8, 8)
        texts += [s["text"], s["explanation"] or "", *s["history"]]
        langs.add(s["language"])
    assert langs == {"zh", "en"}
    for t in texts:
        ids = encode_text(tok, t)
        assert unk not in ids, t
        assert tok.decode(ids) == t  # lossless, spaces included
    assert unk not in encode_text(tok, "Hello 你好, the rear-left seat! 22 C? ~@#")  # ASCII fallback


def test_tokenizer_without_torch_prints_no_transformers_banner():
    """A base install has no torch: transformers' "PyTorch was not found" advisory must not print
    (it reads like an error on every launch). `sys.modules[name] = None` hides an installed module."""
    import subprocess
    import sys

    code = ("import os, sys; sys.modules['torch'] = None; from vlacabin_jax.data import features; "
            "features.load_tokenizer(None); assert 'TRANSFORMERS_NO_ADVISORY_WARNINGS' not in os.environ")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr + proc.stdout


def test_frames_stay_uint8_and_float_frames_are_one_clear_error(tok, vocab):
    """Frames cross the host as uint8 (a quarter of float32's bytes); float frames are refused in
    one line rather than guessed at, and `spec.frames_unit` gives exactly what the host computed
    before (float32(x) * float32(1 / 255))."""
    cfg = get_config("tiny")
    s = gen(cfg, 3, 0, "vla")
    assert s["frames"].dtype == np.uint8
    f = featurize(s, cfg, tok, vocab)
    old_host = s["frames"].astype(np.float32) * (1.0 / 255.0)  # the pre-uint8 featurizer's scaling
    assert np.array_equal(spec.frames_unit(f["frames"][:len(s["frames"])]), old_host)
    with pytest.raises(ValueError, match="frames are float32, expected uint8") as e:
        featurize(dict(s, frames=old_host), cfg, tok, vocab)
    assert "\n" not in str(e.value)
    with pytest.raises(TypeError, match="uint8"):
        spec.frames_unit(old_host)


def test_transfer_bytes_frames_are_uint8():
    cfg = get_config("a100x128")
    b = int(cfg.train.global_batch_size)
    sizes = spec.transfer_bytes(cfg, b)
    assert "sample_id" not in sizes and set(sizes) == set(spec.batch_spec(cfg, 1)) - set(spec.HOST_ONLY_FIELDS)
    assert sizes["frames"] == b * cfg.data.num_frames * cfg.model.vit.image_size ** 2 * 3  # one byte a pixel channel
