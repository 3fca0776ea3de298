"""Simulator-scored preference pairs: rewards of answers and best-vs-worst pairing."""

from vlacabin_jax.data import world
from vlacabin_jax.eval import metrics, preferences
from vlacabin_jax.eval.metrics import Prediction

TINY = dict(image_size=32, num_frames=4, n_mels=32, mel_frames=32)


def _careless_pair():
    """A world pair whose rejected side breaks a guardrail (the careless policy's answer)."""
    for i in range(200):
        p = world.preference_pair(3, i, **TINY)
        rec = metrics.score_sample(p, Prediction(tuple(p["rejected"])))
        if rec["violation"] and len(p["chosen"]) > 1:
            return p
    raise AssertionError("no guardrail-breaking pair in 200")


def test_rewards_rank_the_target_above_violations_noops_and_malformed_answers():
    p = _careless_pair()
    score = lambda actions, error=None: preferences.reward(  # noqa: E731
        metrics.score_sample(p, Prediction(tuple(actions), None, error)))
    target = score(p["actions"])
    assert target == 1.5  # success + full completeness, nothing wrong, the target's step count
    assert score(p["rejected"]) < target - 1.0  # the guardrail costs a full point
    assert score(["<noop>"]) < target and score(["<noop>"]) > score(p["rejected"]) - 1.0
    assert score(p["actions"][:1]) < target  # a missing step: not completed, less complete
    assert score(["x"], "unknown token") < score(["<noop>"])


def test_over_trigger_is_penalised_where_the_target_is_noop():
    for i in range(300):
        s = world.generate(5, i, "vla", **TINY)
        if s["actions"] == ["<noop>"]:
            break
    rec = metrics.score_sample(s, Prediction(("climate.temp=20",)))
    assert rec["over_trigger"]
    assert preferences.reward(rec) < preferences.reward(metrics.score_sample(s, Prediction(("<noop>",))))


def test_pairs_take_the_best_and_the_worst_and_skip_ties():
    p = _careless_pair()
    sample = {k: v for k, v in p.items() if k not in ("chosen", "rejected", "reason")}
    cands = [Prediction(("<noop>",)), Prediction(tuple(p["rejected"])), Prediction(tuple(p["actions"])),
             Prediction(tuple(p["rejected"]))]
    out = preferences.pair(sample, cands)
    assert out["chosen"] == p["actions"] and out["rejected"] == p["rejected"]
    assert "violation" in out["reason"] and out["chosen_reward"] > out["rejected_reward"]
    assert out["actions"] == p["actions"] and out["state"] == p["state"]  # the context travels along
    assert preferences.pair(sample, [Prediction(("<noop>",))] * 3) is None
    pairs, stats = preferences.make_pairs([sample, sample], [cands, [Prediction(("<noop>",))] * 2])
    assert len(pairs) == 1 and stats["pairs"] == 1 and stats["rejected_violation"] == 1
    assert stats["chosen_success"] == 1 and stats["distinct_answers_mean"] == 2.0


def test_malformed_answers_take_no_part_in_pairs():
    p = _careless_pair()
    sample = {k: v for k, v in p.items() if k not in ("chosen", "rejected", "reason")}
    broken = Prediction(("<noop>",), None, "<noop> mixed with actions")  # a display reading only
    assert preferences.pair(sample, [Prediction(("<noop>",)), broken]) is None
    out = preferences.pair(sample, [broken, Prediction(tuple(p["actions"])), Prediction(("<noop>",))])
    assert out["chosen"] == p["actions"] and out["rejected"] == ["<noop>"] and out["reason"] == "under_trigger"


def test_rejected_for_keeps_only_pairs_that_teach_what_not_to_do():
    p = _careless_pair()
    sample = {k: v for k, v in p.items() if k not in ("chosen", "rejected", "reason")}
    careless = [Prediction(tuple(p["actions"])), Prediction(tuple(p["rejected"]))]  # rejected: a violation
    timid = [Prediction(tuple(p["actions"])), Prediction(("<noop>",))]  # rejected: an under-trigger
    both = [sample, sample], [careless, timid]
    assert len(preferences.make_pairs(*both)[0]) == 2
    pairs, stats = preferences.make_pairs(*both, rejected_for=("violation", "over_trigger"))
    assert [q["rejected"] for q in pairs] == [p["rejected"]] and stats["pairs"] == 1
    pairs, _ = preferences.make_pairs(*both, rejected_for=("under_trigger",))
    assert [q["rejected"] for q in pairs] == [["<noop>"]]


def test_make_preferences_cli_refuses_bad_arguments_in_one_line(tmp_path, capsys):
    import pytest

    from tools import make_preferences

    for argv, message in (
            (["--k", "1"], "--k must be >= 2"),
            (["--rejected-for", "violation,rudeness"], "--rejected-for: unknown reason 'rudeness'"),
            (["--frobnicate"], "unrecognized arguments: --frobnicate")):
        with pytest.raises(SystemExit) as exit_info:
            make_preferences.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "pairs"), *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and message in err[-1], err
    (tmp_path / "pairs").mkdir()
    (tmp_path / "pairs" / "manifest.json").write_text("{}")
    assert make_preferences.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "pairs")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'pairs'} already holds pairs; pass a new --out"
