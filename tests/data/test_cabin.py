"""Cabin rules: apply, guardrails, conflicts, order, scenes, features, and the policy obeying them."""

import numpy as np
import pytest

from vlacabin_jax.data import cabin, schema_sizes, world
from vlacabin_jax.data.actions import ActionVocabulary
from vlacabin_jax.data.cabin import CabinState, default_state
from vlacabin_jax.data.policy import Context, Request, policy


def test_apply_sets_value_and_reports_effect():
    s = default_state()
    s2, eff = cabin.apply(s, "climate.temp=19")
    assert s2.value("climate.temp") == "19" and s.value("climate.temp") == "22"  # pure
    assert eff == cabin.Effect("climate.temp", "22", "19") and eff.changed
    s3, eff = cabin.apply(s2, "climate.temp=19")
    assert s3 is s2 and not eff.changed
    assert cabin.apply(s, "<noop>")[0] is s
    with pytest.raises(ValueError, match="unknown setting path"):
        cabin.apply(s, "climate.heat=2")
    with pytest.raises(ValueError, match="not a value of 'climate.temp'"):
        cabin.apply(s, "climate.temp=40")


def test_every_schema_path_is_in_the_state_and_defaults_are_safe():
    s = default_state()
    assert set(s.devices) == {t.split("=")[0] for t in ActionVocabulary().tokens[3:]}
    every_tag = default_state(occupants=("adult", "adult", "child", "child"), asleep=(False, True, True, True),
                              speed_kmh=80.0, tags=cabin.CONSTRAINT_TAGS)
    assert cabin.state_violations(every_tag) == []


CHILD_REAR_LEFT = dict(occupants=("adult", "empty", "child", "empty"))
ADULT_REAR_LEFT = dict(occupants=("adult", "empty", "adult", "empty"))
DRIVING = {"speed_kmh": 60.0}


# (env, tags, token, guardrail, benign env, benign tags): the benign variant lacks the one fact
# (tag, or who sits / sleeps where, which the camera tells) that makes the token unsafe.
@pytest.mark.parametrize("env, tags, token, guard, benign_env, benign_tags", [
    (DRIVING, ("driving",), "screen.driver=video", "driver_screen_while_driving", {}, ()),
    (DRIVING, ("driving",), "screen.driver=meeting", "driver_screen_while_driving", {}, ()),
    ({}, ("night_quiet",), "media.volume=5", "volume_cap", {}, ()),
    (dict(ADULT_REAR_LEFT, asleep=(False, False, True, False)), (), "media.volume=6", "volume_cap",
     ADULT_REAR_LEFT, ()),
    (CHILD_REAR_LEFT, ("child_on_board",), "window.rear_left=open_60", "child_safety", ADULT_REAR_LEFT, ()),
    (CHILD_REAR_LEFT, ("child_on_board",), "seat.rear_left.massage=wave", "child_safety", ADULT_REAR_LEFT, ()),
    (CHILD_REAR_LEFT, ("child_on_board",), "seat.rear_left.heat=2", "child_safety", ADULT_REAR_LEFT, ()),
    (DRIVING, ("driving",), "seat.driver.position=recline", "driver_seat_upright", {}, ()),
    ({}, ("deny_windows",), "window.driver=open_30", "permission", {}, ()),
    ({}, ("deny_video",), "media.source=video", "permission", {}, ()),
    ({}, ("deny_fragrance",), "fragrance=citrus", "permission", {}, ()),
    ({}, ("deny_apps",), "app.navigation=home", "permission", {}, ()),
    ({}, ("privacy_mid",), "screen.rear=meeting", "privacy", {}, ("privacy_low",)),
])
def test_guardrails_fire_and_stay_quiet_otherwise(env, tags, token, guard, benign_env, benign_tags):
    s = default_state(**env)
    bad = cabin.violations(s, token, tags)
    assert len(bad) == 1 and bad[0].startswith(guard + ":")
    assert cabin.violations(default_state(**benign_env), token, benign_tags) == []
    assert cabin.violations(s.replace(tags=tags), token) == bad  # tags default to the state's


def test_guardrails_allow_the_safe_side():
    kid = default_state(**CHILD_REAR_LEFT)
    assert cabin.violations(kid, "window.rear_left=open_30", ("child_on_board",)) == []
    assert cabin.violations(kid, "window.rear_right=open_100", ("child_on_board",)) == []
    assert cabin.violations(kid, "seat.rear_left.heat=1", ()) == []
    night = default_state().replace({"media.volume": "8"})
    assert cabin.violations(night, "media.volume=3", ("night_quiet",)) == []  # lowering is fine
    assert cabin.violations(default_state(), "window.driver=closed", ("deny_windows",)) == []
    meeting = default_state().replace({"app.meeting": "start"})
    assert cabin.violations(meeting, "window.driver=open_30", ("privacy_high",))
    assert cabin.violations(meeting, "window.driver=open_30", ("privacy_low",)) == []
    open_win = default_state().replace({"window.passenger": "open_30"})
    assert cabin.violations(open_win, "app.meeting=start", ("privacy_high",))


def test_conflicts_and_inversions_on_any_sequence():
    assert cabin.conflicts(["climate.temp=20", "climate.fan=2", "climate.temp=24"]) == [
        (0, 2, "climate.temp set twice in one turn")]
    assert [c[:2] for c in cabin.conflicts(["climate.recirc=on", "climate.defog=on"])] == [(0, 1)]
    assert cabin.conflicts(["seat.driver.heat=2", "seat.driver.vent=1"])
    assert cabin.conflicts(["seat.driver.heat=2", "seat.passenger.vent=1"]) == []
    assert cabin.conflicts(["seat.driver.heat=0", "seat.driver.vent=1"]) == []
    assert cabin.inversions(["media.play=play", "media.volume=3"]) == [(0, 1, "set the volume before playing")]
    assert cabin.inversions(["media.volume=3", "media.play=play"]) == []
    assert cabin.inversions(["purifier=max", "climate.recirc=on", "window.driver=closed"]) == [
        (0, 1, "recirculate before purifying"), (0, 2, "close windows before purifying"),
        (1, 2, "close windows before recirculating")]
    assert cabin.conflicts(["<noop>"]) == [] and cabin.inversions(["<noop>"]) == []


def test_execute_and_check_judge_arbitrary_sequences():
    s = default_state(speed_kmh=50.0, tags=("driving", "night_quiet", "privacy_low"))
    ex = cabin.execute(s, ["media.play=play", "media.volume=7", "screen.driver=video"])
    assert ex.state.value("media.volume") == "7" and ex.state.value("screen.driver") == "video"
    assert [i for i, _ in ex.violations] == [1, 2]
    assert ex.inversions and not ex.ok
    issues = cabin.check(s, ["media.volume=3"], reference=["media.volume=3", "media.play=play"])
    assert issues == ["missing: media.play=play"]
    assert cabin.check(s, ["climate.temp=20"], reference=["<noop>"]) == [
        "over_trigger: acted where nothing should happen"]
    assert cabin.check(s, ["<noop>"], reference=["<noop>"]) == []


@pytest.mark.parametrize("name", list(cabin.SCENES))
def test_scene_steps_follow_the_declared_order(name):
    rng = np.random.default_rng(7)
    ran = 0
    for _ in range(60):
        s = world.sample_state(rng)
        steps, decline = cabin.scene_steps(name, s)
        if decline:
            assert steps == []
            continue
        assert tuple(n for n, _ in steps) == cabin.SCENES[name].steps
        toks = [t for _, ts in steps for t in ts]
        assert len(toks) <= cabin.MAX_ACTIONS
        assert cabin.execute(s, toks).ok, toks
        ran += 1
        if toks:
            done = cabin.execute(s, toks).state
            again, _ = cabin.scene_steps(name, done)
            assert all(ts == [] for _, ts in again)  # a scene that ran needs nothing more
    assert ran > 10


def test_detect_scenes():
    toks = ["sunshade.roof=closed", "light.ambient.brightness=1", "screen.rear=video", "media.source=video"]
    assert cabin.detect_scenes(toks) == ["cinema"]
    assert cabin.detect_scenes(["app.meeting=start"]) == ["meeting"]
    assert cabin.detect_scenes(["climate.temp=20"]) == []


def test_state_features_match_schema_sizes():
    sizes = schema_sizes()
    rng = np.random.default_rng(3)
    for _ in range(200):
        s = world.sample_state(rng)
        num, cat = cabin.state_to_features(s)
        assert num.dtype == np.float32 and num.shape == (sizes["state_numeric"],)
        assert cat.dtype == np.int32 and cat.shape == (len(sizes["state_categorical"]),)
        assert np.all(np.abs(num) <= 1.5)
        assert np.all((cat >= 0) & (cat < np.array(sizes["state_categorical"])))
        assert CabinState.from_json(s.to_json()) == s
    assert sizes["constraint_tags"] == len(cabin.CONSTRAINT_TAGS) == 10
    assert sizes["action_vocab"] == ActionVocabulary().size
    # The camera-only cues are not state features.
    names = " ".join(cabin.STATE_NUMERIC_FIELDS) + " ".join(n for n, _ in cabin.STATE_CATEGORICAL_FIELDS)
    assert "asleep" not in names and "light" not in names.replace("light.", "") and "child" not in names


def test_policy_never_breaks_the_rules_over_thousands_of_samples():
    n_acting = 0
    for i in range(3000):
        s = world.generate(11, i, "vla", 8, 1, 8, 8)
        state = CabinState.from_json(s["state"])
        toks = s["actions"]
        assert 1 <= len(toks) <= cabin.MAX_ACTIONS
        assert state.occupant(state.speaker) == "adult" and not state.is_asleep(state.speaker)
        assert cabin.state_violations(state) == []  # every generated cabin is consistent
        assert cabin.check(state, toks) == [], (s["scene"], toks)
        n_acting += toks != ["<noop>"]
        if s["scene"] == "chitchat":
            assert toks == ["<noop>"]
    assert 0.5 < n_acting / 3000 < 0.9


def test_policy_obeys_tags_for_the_same_request():
    base = default_state(occupants=("adult", "empty", "adult", "empty"))
    loud = policy(Context(base.replace(tags=("privacy_low",)), Request.make("volume_up")))[0]
    night = policy(Context(base.replace(tags=("night_quiet", "privacy_low")), Request.make("volume_up")))[0]
    assert loud == ["media.volume=6"] and night == ["<noop>"]  # default volume 4 is the night cap
    drive = base.replace(speed_kmh=70.0, tags=("driving", "privacy_low"))
    assert "screen.rear=video" in policy(Context(drive, Request.make("cinema")))[0]
    assert "screen.driver=video" in policy(Context(base, Request.make("cinema")))[0]
    alone = drive.replace(occupants=("adult", "adult", "empty", "empty"))
    assert policy(Context(alone, Request.make("cinema"))) == (["<noop>"], ("no_video_driving", {"scene": "cinema"}))
    assert policy(Context(drive, Request.make("nap")))[0] == ["<noop>"]  # the driver may not nap
    nap = policy(Context(drive.replace(speaker="rear_left"), Request.make("nap")))[0]
    assert nap[0] == "seat.rear_left.position=recline" and "seat.driver.position=recline" not in nap
