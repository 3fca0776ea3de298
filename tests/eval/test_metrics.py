"""Metrics on constructed predictions with known answers: perfect, empty, conflicting, inverted,
over-triggering, malformed; explanation accuracy and BLEU; retrieval R@k; the family confusion."""

import math

import numpy as np
import pytest

from vlacabin_jax.data.actions import NOOP
from vlacabin_jax.data.cabin import default_state
from vlacabin_jax.eval import metrics as M
from vlacabin_jax.eval.metrics import Prediction

MEETING_STATE = default_state().replace({"media.play": "play", "window.driver": "open_30"})
MEETING = ["media.play=pause", "window.driver=closed", "screen.driver=meeting", "app.meeting=start"]


def _sample(i, scene, actions, state=None, history=()):
    return {"sample_id": i, "kind": "vla", "scene": scene, "text": f"request {i}", "history": list(history),
            "actions": list(actions), "state": (state or default_state()).to_json()}


# Four turns: a single request, chit-chat (nothing to do), a scene mode, and a follow-up (multi-turn).
SAMPLES = [
    _sample(0, "colder", ["climate.temp=21", "climate.fan=3"]),
    _sample(1, "chitchat", [NOOP], default_state(hour=23, tags=("night_quiet",))),
    _sample(2, "meeting", MEETING, MEETING_STATE),
    _sample(3, "more", ["climate.temp=20"], default_state().replace({"climate.temp": "21"}),
            history=["a bit colder"]),
]


def _run(actions_per_sample, errors=None):
    errors = errors or [None] * len(SAMPLES)
    preds = [Prediction(tuple(a), None, e) for a, e in zip(actions_per_sample, errors)]
    return M.compute_metrics(SAMPLES, preds)


def test_meeting_target_is_what_the_rules_produce():
    from vlacabin_jax.data import cabin

    steps, decline = cabin.scene_steps("meeting", MEETING_STATE)
    assert decline is None and [t for _, ts in steps for t in ts] == MEETING


def test_perfect_predictions():
    r = _run([s["actions"] for s in SAMPLES])
    o = r["overall"]
    assert o["n"] == 4 and o["n_single_turn"] == 3 and o["n_multi_turn"] == 1
    for k in ("success_rate", "clean_success_rate", "single_turn_success_rate", "multi_turn_success_rate",
              "scene_hit_rate", "step_completeness"):
        assert o[k] == 1.0, k
    for k in ("over_trigger_rate", "under_trigger_rate", "inversion_rate", "conflict_rate", "violation_rate",
              "invalid_rate"):
        assert o[k] == 0.0, k
    assert o["avg_steps"] == o["avg_target_steps"] == (2 + 0 + 4 + 1) / 4
    assert o["explanation_bleu"] is None and o["explanation_token_accuracy"] is None  # none given
    assert set(r["per_scene"]) == {"colder", "chitchat", "meeting", "more"}
    assert r["per_scene"]["meeting"]["scene_hit_rate"] == 1.0
    assert r["per_scene"]["colder"]["scene_hit_rate"] is None  # not a scene mode
    assert set(r["per_group"]) == {"scene_mode", "single", "follow_up"}


def test_empty_predictions_do_nothing():
    o = _run([[NOOP]] * 4)["overall"]
    assert o["success_rate"] == 0.25  # only the chit-chat turn wanted nothing
    assert o["single_turn_success_rate"] == pytest.approx(1 / 3) and o["multi_turn_success_rate"] == 0.0
    assert o["over_trigger_rate"] == 0.0 and o["under_trigger_rate"] == 1.0
    assert o["step_completeness"] == 0.0 and o["scene_hit_rate"] == 0.0 and o["avg_steps"] == 0.0
    assert o["violation_rate"] == o["conflict_rate"] == o["inversion_rate"] == 0.0


def test_conflicting_predictions():
    # colder: cool and then warm again (the same setting twice); meeting: music left playing.
    preds = [["climate.temp=21", "climate.fan=3", "climate.temp=25"], [NOOP],
             ["window.driver=closed", "screen.driver=meeting", "app.meeting=start", "media.play=play"],
             ["climate.temp=20"]]
    r = _run(preds)
    o = r["overall"]
    assert o["conflict_rate"] == 0.5
    assert r["per_scene"]["colder"]["success_rate"] == 0.0  # ends at 25, not 21
    assert r["per_scene"]["meeting"]["success_rate"] == 0.0  # media still playing
    assert r["per_scene"]["colder"]["step_completeness"] == 1.0  # every target token is there
    assert r["per_scene"]["meeting"]["step_completeness"] == 0.75
    assert r["per_scene"]["meeting"]["scene_hit_rate"] == 0.0
    assert o["success_rate"] == 0.5 and o["clean_success_rate"] == 0.5


def test_inverted_predictions_reach_the_state_but_not_cleanly():
    preds = [s["actions"] for s in SAMPLES]
    preds[2] = MEETING[::-1]
    o = _run(preds)["overall"]
    assert o["inversion_rate"] == 0.25
    assert o["success_rate"] == 1.0 and o["clean_success_rate"] == 0.75  # same end state, wrong order
    assert o["scene_hit_rate"] == 1.0 and o["step_completeness"] == 1.0


def test_over_trigger_and_guardrail_violation():
    preds = [s["actions"] for s in SAMPLES]
    preds[1] = ["media.volume=9"]  # chit-chat at night: turns the music up past the night cap
    r = _run(preds)
    o = r["overall"]
    assert o["over_trigger_rate"] == 1.0 and o["violation_rate"] == 0.25 and o["success_rate"] == 0.75
    assert r["per_scene"]["chitchat"]["over_trigger_rate"] == 1.0


def test_malformed_predictions_are_rejected_not_executed():
    preds = [s["actions"] for s in SAMPLES]
    errors = [None] * 4
    errors[0] = "invalid action sequence at position 2: missing <eos>"
    preds[3] = ["climate.temp=20", NOOP]  # malformed as a string sequence too
    o = _run(preds, errors)["overall"]
    assert o["invalid_rate"] == 0.5 and o["success_rate"] == 0.5
    assert o["under_trigger_rate"] == pytest.approx(2 / 3)
    fails = M.failures(SAMPLES, [Prediction(tuple(a), None, e) for a, e in zip(preds, errors)])
    assert [f["sample_id"] for f in fails] == [0, 3]
    assert fails[0]["issues"][0].startswith("rejected") and fails[1]["issues"][0].startswith("invalid")


def test_malformed_target_is_an_error():
    bad = dict(SAMPLES[0], actions=["climate.temp=99"])
    with pytest.raises(ValueError, match="malformed target"):
        M.score_sample(bad, Prediction((NOOP,)))


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="4 samples but 3 predictions"):
        M.compute_metrics(SAMPLES, [Prediction((NOOP,))] * 3)


# ---------------------------------------------------------------- explanations
def test_token_accuracy_and_content():
    ref = [1, 10, 11, 12, 2, 0, 0]
    assert M.token_accuracy(ref, ref) == (4, 4)  # 10, 11, 12 and <eos>; <bos> is given
    assert M.token_accuracy(ref, [1, 10, 99, 12, 2]) == (3, 4)
    assert M.token_accuracy(ref, [1, 10]) == (1, 4)  # a short prediction is padded
    assert M.explanation_content([1, 10, 11, 2, 0]) == (10, 11)
    assert M.explanation_content([1, 10, 11]) == (10, 11)


def test_bleu_known_values():
    assert M.bleu([[5, 6, 7, 8]], [[5, 6, 7, 8]]) == pytest.approx(1.0)
    assert M.bleu([[5, 6, 7, 8]], [[9, 10, 11, 12]]) == 0.0
    assert M.bleu([[5, 6]], [[]]) == 0.0
    # p1 = 3/4, p2 = (2+1)/(3+1), p3 = (1+1)/(2+1), p4 = (0+1)/(1+1); same length: no penalty.
    want = (0.75 * 0.75 * (2 / 3) * 0.5) ** 0.25
    assert M.bleu([[5, 6, 7, 8]], [[5, 6, 7, 9]]) == pytest.approx(want)
    # A correct but short hypothesis is penalised by exp(1 - 4/2).
    short = M.bleu([[5, 6, 7, 8]], [[5, 6]])
    assert short == pytest.approx(math.exp(1 - 2) * (1 * 1 * 1 * 1) ** 0.25)


def test_explanation_metrics_in_the_aggregate():
    preds = [Prediction(tuple(s["actions"]), (1, 10 + i, 20, 2)) for i, s in enumerate(SAMPLES)]
    targets = [(1, 10 + i, 20, 2) for i in range(3)] + [(1, 50, 51, 2)]
    o = M.compute_metrics(SAMPLES, preds, targets)["overall"]
    assert o["explanation_token_accuracy"] == pytest.approx(10 / 12)  # 3 per sample, the last gets <eos> only
    assert 0 < o["explanation_bleu"] < 1


# ---------------------------------------------------------------- retrieval
def test_recall_at_k_known_answers():
    keys = np.eye(10)
    labels = list(range(10))
    assert M.recall_at_k(keys, keys, labels, labels) == {1: 1.0, 5: 1.0}
    # Each query is closest to the next key: the right one ranks second.
    shifted = 0.9 * np.eye(10) + np.roll(np.eye(10), 1, axis=1)
    assert M.recall_at_k(shifted, keys, labels, labels) == {1: 0.0, 5: 1.0}
    # Collapsed latents tie everywhere: ties count against the query.
    assert M.recall_at_k(np.ones((10, 4)), np.ones((10, 4)), labels, labels) == {1: 0.0, 5: 0.0}
    # Duplicated labels: the next key is also a right answer.
    paired = [i // 2 for i in range(10)]
    q = 0.9 * np.eye(10) + np.roll(np.eye(10), 1, axis=1)
    r = M.recall_at_k(q, keys, paired, paired, ks=(1,))
    assert r == {1: 0.5}  # even queries' best neighbour (i+1) shares their label, odd ones' does not


def test_retrieval_metrics_uses_only_samples_with_both_modalities():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(6, 1, 8))
    pooled = np.concatenate([z, z, z + 0.01, rng.normal(size=(6, 1, 8))], axis=1)  # speech, text, video, state
    present = np.ones((6, 4), bool)
    present[0, 2] = False  # sample 0 has no video
    out = M.retrieval_metrics(pooled, present, labels=list(range(6)))
    assert out["text-video/n"] == 5 and out["speech-text/n"] == 6 and out["state-text/n"] == 6
    assert out["text->video/R@1"] == 1.0 and out["video->text/R@1"] == 1.0
    assert out["speech->text/R@1"] == 1.0 and out["state->text/R@5"] is not None
    none = M.retrieval_metrics(pooled, np.zeros((6, 4), bool), labels=list(range(6)))
    assert none["text-video/n"] == 0 and none["text->video/R@1"] is None


# ---------------------------------------------------------------- confusion
def test_family_confusion():
    preds = [["climate.temp=21", "light.ambient.color=blue"],  # climate hit, lights extra
             ["media.volume=2"],  # noop target, media predicted
             [NOOP],  # meeting: media, windows, screens, apps all missed for <noop>
             ["climate.temp=20"]]
    errors = [None, None, None, None]
    recs = [M.score_sample(s, Prediction(tuple(p), None, e)) for s, p, e in zip(SAMPLES, preds, errors)]
    c = M.confusion(recs)
    lab = {f: i for i, f in enumerate(c["labels"])}
    m = np.asarray(c["matrix"])
    assert m[lab["climate"], lab["climate"]] == 2
    assert m[lab["none"], lab["lights"]] == 1
    assert m[lab["noop"], lab["media"]] == 1
    for fam in ("media", "windows", "screens", "apps"):
        assert m[lab[fam], lab["noop"]] == 1
    assert m.sum() == 2 + 1 + 1 + 4
    assert M.families(["climate.temp=1"], error="bad") == {"invalid"}


def test_scalars_for_the_training_log():
    from vlacabin_jax.eval import report

    r = M.compute_metrics(SAMPLES, [Prediction(tuple(s["actions"])) for s in SAMPLES])
    r["retrieval"] = {"text-video/n": 5, "text->video/R@1": 0.4, "video->text/R@1": None}
    r["latency"] = {"device": "cpu:cpu", "b1": {"p50_ms": 2.0, "p95_ms": 3.0, "mean_ms": 2.1}}
    s = report.scalars(r)
    assert s["eval/success_rate"] == 1.0 and s["eval/group/follow_up/success_rate"] == 1.0
    assert s["eval/retrieval/text->video/R@1"] == 0.4 and "eval/retrieval/video->text/R@1" not in s
    assert s["eval/latency/b1/p95_ms"] == 3.0 and "eval/explanation_bleu" not in s  # None left out
    assert all(isinstance(v, float) for v in s.values())
    text = report.format_results(r)
    assert "success" in text and "text->video" in text and "P95" in text
