"""The cabin simulator on hand-written turns: effects, no-ops, every guardrail, conflict and order rule,
malformed sequences, and agreement with the rules the synthetic world uses (`cabin.execute`)."""

import fnmatch
import json

import numpy as np
import pytest

from vlacabin_jax.data import cabin
from vlacabin_jax.data.actions import EOS_ID, NOOP, PAD_ID, ActionVocabulary
from vlacabin_jax.data.cabin import default_state
from vlacabin_jax.eval.simulator import decode, simulate, validate

VOCAB = ActionVocabulary()
DEVICE_TOKENS = [t for t in VOCAB.tokens if "=" in t]
DRIVING = dict(speed_kmh=60.0, tags=("driving",))
CHILD_RL = dict(occupants=("adult", "empty", "child", "empty"), tags=("child_on_board",))


def test_effects_final_state_and_noops():
    s = default_state()
    rep = simulate(s, ["climate.temp=19", "climate.fan=2", "light.ambient.color=blue"])
    assert rep.valid and rep.ok and rep.error is None
    assert [(st.path, st.before, st.after, st.changed) for st in rep.steps] == [
        ("climate.temp", "22", "19", True), ("climate.fan", "2", "2", False),
        ("light.ambient.color", "warm", "blue", True)]
    assert rep.noops == (1,)  # the fan was already at 2
    assert rep.final.value("climate.temp") == "19" and s.value("climate.temp") == "22"  # pure
    assert rep.changes() == {"climate.temp": ("22", "19"), "light.ambient.color": ("warm", "blue")}
    assert rep.n_actions == 3
    assert "no-op" in rep.summary().splitlines()[1]


def test_explicit_noop_changes_nothing():
    s = default_state()
    rep = simulate(s, [NOOP])
    assert rep.ok and rep.final is s and rep.noops == (0,) and rep.n_actions == 0 and rep.changes() == {}


@pytest.mark.parametrize("tokens, why", [
    ([], "empty sequence"),
    (["climate.heat=2"], "unknown action token"),
    (["climate.temp=40"], "unknown action token"),
    (["climate.temp=20", NOOP], "<noop> must be the only action"),
    (["climate.temp=20", "<eos>"], "may not appear inside"),
    (["<pad>"], "may not appear inside"),
])
def test_malformed_sequences_are_rejected_whole(tokens, why):
    s = default_state()
    rep = simulate(s, tokens)
    assert not rep.valid and not rep.ok and why in rep.error
    assert rep.final is s and rep.steps == () and rep.n_actions == 0
    assert validate(tokens) == rep.error
    assert rep.summary().startswith("rejected")


# (env of the cabin, tokens, position that breaks the rule, guardrail), and each case's benign twin
# (the one fact that makes it unsafe removed) must pass.
GUARDRAIL_CASES = [
    (DRIVING, ["climate.temp=20", "screen.driver=video"], 1, "driver_screen_while_driving", {}),
    (DRIVING, ["screen.driver=meeting"], 0, "driver_screen_while_driving", {}),
    (dict(DRIVING, devices_={"screen.driver": "video"}), ["media.source=video"], 0,
     "driver_screen_while_driving", {"devices_": {"screen.driver": "video"}}),
    (dict(tags=("night_quiet",)), ["media.volume=7"], 0, "volume_cap", {}),
    (dict(occupants=("adult", "adult", "empty", "empty"), asleep=(False, True, False, False)),
     ["media.volume=8"], 0, "volume_cap", dict(occupants=("adult", "adult", "empty", "empty"))),
    (CHILD_RL, ["window.rear_left=open_100"], 0, "child_safety", {}),
    (CHILD_RL, ["seat.rear_left.massage=deep"], 0, "child_safety", {}),
    (CHILD_RL, ["seat.rear_left.heat=3"], 0, "child_safety", {}),
    (DRIVING, ["seat.driver.position=recline"], 0, "driver_seat_upright", {}),
    (dict(tags=("deny_windows",)), ["window.passenger=open_30"], 0, "permission", {}),
    (dict(tags=("deny_video",)), ["screen.rear=video"], 0, "permission", {}),
    (dict(tags=("deny_fragrance",)), ["fragrance=ocean"], 0, "permission", {}),
    (dict(tags=("deny_apps",)), ["app.alarm=20min"], 0, "permission", {}),
    (dict(tags=("privacy_high",)), ["screen.rear=meeting"], 0, "privacy", dict(tags=("privacy_low",))),
    (dict(tags=("privacy_high",), devices_={"window.driver": "open_30"}), ["app.meeting=start"], 0, "privacy",
     dict(tags=("privacy_low",), devices_={"window.driver": "open_30"})),
    (dict(tags=("privacy_high",), devices_={"app.meeting": "start"}), ["window.rear_right=open_30"], 0,
     "privacy", dict(devices_={"app.meeting": "start"})),
]


def _state(env: dict):
    env = dict(env)
    devices = env.pop("devices_", None)
    s = default_state(**env)
    return s.replace(devices) if devices else s


@pytest.mark.parametrize("env, tokens, pos, guard, benign", GUARDRAIL_CASES)
def test_every_guardrail_is_reported_at_its_step(env, tokens, pos, guard, benign):
    rep = simulate(_state(env), tokens)
    assert rep.valid and not rep.ok
    assert [i for i, _ in rep.violations] == [pos]
    assert rep.violations[0][1].startswith(guard + ":")
    assert rep.steps[pos].violations == (rep.violations[0][1],)
    assert all(not st.violations for st in rep.steps if st.index != pos)
    assert simulate(_state(benign), tokens).ok, "the benign twin must pass"


def test_tags_argument_overrides_the_state_tags():
    s = default_state()
    assert simulate(s, ["media.volume=9"]).ok
    assert not simulate(s, ["media.volume=9"], tags=("night_quiet",)).ok


def test_lowering_or_closing_never_violates():
    s = _state(dict(CHILD_RL, tags=("night_quiet", "deny_windows", "child_on_board")))
    assert simulate(s, ["media.volume=2", "window.rear_left=closed", "seat.rear_left.heat=1"]).ok


# ---------------------------------------------------------------- conflicts
@pytest.mark.parametrize("tokens, why", [
    (["seat.driver.heat=2", "seat.driver.vent=2"], "heating and ventilating one seat"),  # heat and cool at once
    (["window.driver=open_30", "window.driver=closed"], "window.driver set twice in one turn"),  # opened and closed
    (["climate.temp=26", "climate.temp=18"], "climate.temp set twice in one turn"),
    (["climate.defog=on", "climate.recirc=on"], "defogging needs outside air"),
    (["media.play=play", "app.meeting=start"], "music playing into a meeting"),
    (["screen.rear=video", "app.meeting=start"], "video and a meeting at once"),
    (["purifier=max", "window.rear_left=open_60"], "purifying with a window open"),
])
def test_hand_written_conflicts(tokens, why):
    rep = simulate(default_state(), tokens)
    assert rep.valid and not rep.ok
    assert (0, 1, why) in rep.conflicts


def _concrete(pattern: str, avoid_path: str | None = None) -> str:
    """The first vocabulary token matching an fnmatch pattern (on another path than `avoid_path`)."""
    return next(t for t in DEVICE_TOKENS if fnmatch.fnmatchcase(t, pattern) and t.split("=")[0] != avoid_path)


@pytest.mark.parametrize("rule", cabin.CONFLICT_RULES, ids=lambda r: f"{r[0]}|{r[1]}")
def test_every_conflict_rule_fires_in_both_orders(rule):
    a = _concrete(rule[0])
    b = _concrete(rule[1], avoid_path=a.split("=")[0])
    for tokens in ([a, b], [b, a]):
        rep = simulate(default_state(), tokens)
        assert [(i, j) for i, j, _ in rep.conflicts] == [(0, 1)], tokens
    assert simulate(default_state(), [a]).conflicts == ()


# ---------------------------------------------------------------- order
@pytest.mark.parametrize("tokens, why", [
    (["media.play=play", "media.source=music"], "choose the source before playing"),
    (["app.meeting=start", "window.passenger=closed"], "close windows before the meeting starts"),
    (["purifier=auto", "climate.recirc=on"], "recirculate before purifying"),
    (["seat.passenger.heat=2", "seat.passenger.vent=0"], "stop ventilation before heating"),
    (["media.play=play", "sunshade.roof=closed"], "darken the cabin before the show starts"),
])
def test_hand_written_inversions(tokens, why):
    rep = simulate(default_state(), tokens)
    assert (0, 1, why) in rep.inversions and not rep.ok
    assert simulate(default_state(), tokens[::-1]).inversions == ()


@pytest.mark.parametrize("rule", cabin.ORDER_RULES, ids=lambda r: f"{r[0]}<{r[1]}")
def test_every_order_rule_fires_only_when_broken(rule):
    after = _concrete(rule[1])
    before = _concrete(rule[0], avoid_path=after.split("=")[0])
    assert [(i, j) for i, j, _ in simulate(default_state(), [after, before]).inversions] == [(0, 1)]
    assert simulate(default_state(), [before, after]).inversions == ()


@pytest.mark.parametrize("scene", ["meeting", "purify", "cinema"])
def test_scene_steps_in_order_pass_and_reversed_are_inverted(scene):
    s = default_state().replace({"media.play": "play", "window.driver": "open_30", "climate.fan": "5"})
    steps, decline = cabin.scene_steps(scene, s)
    tokens = [t for _, ts in steps for t in ts]
    assert decline is None and len(tokens) >= 3
    assert simulate(s, tokens).ok
    assert simulate(s, tokens[::-1]).inversions


# ---------------------------------------------------------------- one source of truth
def test_simulator_agrees_with_cabin_execute_on_random_turns():
    rng = np.random.default_rng(0)
    env = dict(occupants=("adult", "adult", "child", "adult"), asleep=(False, False, True, True),
               speed_kmh=40.0, tags=("night_quiet", "child_on_board", "driving", "privacy_high", "deny_video"))
    s = default_state(**env)
    for _ in range(200):
        tokens = [DEVICE_TOKENS[i] for i in rng.integers(len(DEVICE_TOKENS), size=int(rng.integers(1, 6)))]
        rep, ex = simulate(s, tokens), cabin.execute(s, tokens)
        assert rep.final == ex.state
        assert list(rep.violations) == ex.violations
        assert list(rep.conflicts) == ex.conflicts and list(rep.inversions) == ex.inversions
        assert rep.ok == ex.ok
        assert (cabin.check(s, tokens) == []) == rep.ok


def test_decode_model_rows():
    ids = [VOCAB.token_id("climate.temp=20"), VOCAB.token_id("climate.fan=3"), EOS_ID, PAD_ID]
    assert decode(ids, VOCAB) == (["climate.temp=20", "climate.fan=3"], None)
    assert decode([2, EOS_ID, PAD_ID], VOCAB) == ([NOOP], None)
    tokens, err = decode(ids[:2], VOCAB)  # cut before <eos>
    assert tokens == ["climate.temp=20", "climate.fan=3"] and "missing <eos>" in err
    tokens, err = decode([PAD_ID, EOS_ID], VOCAB)
    assert tokens == [] and "<pad> before <eos>" in err


def test_report_to_json_round_trips_through_json():
    s = _state(DRIVING)
    rep = simulate(s, ["media.play=play", "screen.driver=video", "media.source=video"])
    d = json.loads(json.dumps(rep.to_json()))
    assert d["tokens"][1] == "screen.driver=video" and d["violations"] and d["inversions"]
    assert cabin.CabinState.from_json(d["final"]) == rep.final
