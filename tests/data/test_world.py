"""Synthetic cabin world: determinism, coverage, cues that decide, multi-turn, preference pairs."""

import collections
import time

import msgpack
import numpy as np
import pytest

from vlacabin_jax.data import cabin, phrases, render, world
from vlacabin_jax.data.cabin import CabinState, default_state
from vlacabin_jax.data.actions import ActionVocabulary
from vlacabin_jax.data.policy import Context, Request, Turn, make_turn, policy
from vlacabin_jax.data.spec import KINDS

TINY = dict(image_size=32, num_frames=4, n_mels=32, mel_frames=32)


def packed(sample: dict) -> bytes:
    """msgpack bytes of a sample (arrays as dtype/shape/raw bytes) — what a shard stores."""
    def enc(x):
        if isinstance(x, np.ndarray):
            return {"dtype": x.dtype.str, "shape": list(x.shape), "data": x.tobytes()}
        return x
    return msgpack.packb({k: enc(v) for k, v in sample.items()}, use_bin_type=True)


@pytest.fixture(scope="module")
def vla_samples():
    return [world.generate(3, i, "vla", **TINY) for i in range(2500)]


@pytest.mark.parametrize("kind", KINDS)
def test_same_arguments_give_identical_bytes(kind):
    for i in range(5):
        a, b = world.generate(42, i, kind, **TINY), world.generate(42, i, kind, **TINY)
        assert packed(a) == packed(b)
    assert packed(world.generate(42, 0, kind, **TINY)) != packed(world.generate(43, 0, kind, **TINY))
    assert packed(world.generate(42, 0, kind, **TINY)) != packed(world.generate(42, 1, kind, **TINY))
    ids = {world.generate(s, i, kind, **TINY)["sample_id"] for s in (0, 1) for i in range(5)}
    assert len(ids) == 10


def test_sample_fields_and_shapes():
    for kind in KINDS:
        for i in range(40):
            s = world.generate(9, i, kind, **TINY)
            assert s["kind"] == kind and s["language"] in ("zh", "en") and isinstance(s["scene"], str)
            assert isinstance(s["history"], list) and isinstance(s["state"], dict)
            if s["mel"] is not None:
                assert s["mel"].dtype == np.float32 and s["mel"].shape[1] == 32 and 3 <= len(s["mel"]) <= 32
            if s["frames"] is not None:
                f = s["frames"]
                assert f.dtype == np.uint8 and f.shape[1:] == (32, 32, 3) and 1 <= len(f) <= 4
            if kind == "vla":
                assert s["frames"] is not None and s["state_numeric"] is not None
                assert s["actions"] and s["explanation"]
                assert s["text"] or s["mel"] is not None  # spoken-only turns have the mel
                assert set(s["constraint_tags"]) <= set(cabin.CONSTRAINT_TAGS)
            else:
                assert s["actions"] is None and s["explanation"] is None and s["text"]
                assert s["state_numeric"] is None and s["constraint_tags"] == []
            if kind == "image_text":
                assert len(s["frames"]) == 1 and s["mel"] is None
            if kind == "video_text":
                assert len(s["frames"]) == 4 and s["mel"] is None
            if kind == "speech_text":
                assert s["frames"] is None and s["mel"] is not None


def test_every_scene_and_request_in_both_languages(vla_samples):
    seen = collections.Counter((s["scene"], s["language"]) for s in vla_samples)
    for typ in world.REQUEST_WEIGHTS:
        for lang in ("zh", "en"):
            assert seen[(typ, lang)] > 0, (typ, lang)
    assert {"cinema", "meeting", "nap", "welcome", "purify"} < set(cabin.SCENES) and len(cabin.SCENES) >= 8
    zh = [s["text"] for s in vla_samples if s["language"] == "zh" and s["text"]]
    en = [s["text"] for s in vla_samples if s["language"] == "en" and s["text"]]
    assert all(any("\u4e00" <= c <= "\u9fff" for c in t) or t[0].isdigit() for t in zh)
    assert all(t.isascii() for t in en)
    # Paraphrase variety: several phrasings of each request.
    by_type = collections.defaultdict(set)
    for s in vla_samples:
        by_type[(s["scene"], s["language"])].add(s["text"])
    assert all(len(by_type[(t, "en")]) >= 3 for t in ("colder", "cinema", "chitchat", "volume_up"))


def test_input_modes_and_history(vla_samples):
    typed = sum(s["mel"] is None for s in vla_samples)
    spoken_only = sum(s["text"] == "" for s in vla_samples)
    with_history = sum(bool(s["history"]) for s in vla_samples)
    n = len(vla_samples)
    assert 0.1 < typed / n < 0.4 and 0.05 < spoken_only / n < 0.3 and 0.05 < with_history / n < 0.3
    for s in vla_samples:
        if s["scene"] in world.VOICE_ONLY:
            assert s["mel"] is not None  # the voice decides, so it is always heard


def test_multi_turn_earlier_turn_changes_the_answer():
    s0 = default_state(tags=("privacy_low",)).replace({"media.volume": "3", "climate.temp": "23"})

    def answer_after(prev_type, follow="more"):
        prev = Request.make(prev_type)
        acts, _ = policy(Context(s0, prev))
        s1 = cabin.execute(s0, acts).state
        return policy(Context(s1, Request.make(follow), (make_turn(s0, prev, acts),)))[0]

    assert answer_after("colder") == ["climate.temp=21"]
    assert answer_after("volume_up") == ["media.volume=7"]
    assert answer_after("warmer") == ["climate.temp=25"]
    assert policy(Context(s0, Request.make("more")))[0] == ["<noop>"]  # nothing to refer to
    assert answer_after("seat_heat", "turn_off") == ["seat.driver.heat=0"]
    assert answer_after("seat_heat", "same_passenger") == ["seat.passenger.heat=2"]
    assert answer_after("colder", "undo") == ["climate.temp=23"]
    assert answer_after("cinema", "undo")[0] == "media.play=pause"


def test_earlier_turn_action_log(vla_samples):
    """The sample carries what the earlier turn executed and the values it replaced (its log)."""
    vocab = ActionVocabulary()
    seen = collections.Counter()
    for i, s in enumerate(vla_samples):
        log = s["history_actions"]
        assert isinstance(log, list) and all(isinstance(p, list) and len(p) == 2 for p in log)
        ctx = world.vla_context(3, i)  # the same draws: the sample's context, unrendered
        assert ctx.request.type == s["scene"] and bool(ctx.history) == bool(s["history"]) == bool(log)
        assert (ctx.voice is None) == (s["mel"] is None)
        if not log:
            continue
        turn = ctx.history[-1]
        assert log == turn.log() and Turn.from_log(turn.request, log) == turn
        for executed, before in log:
            assert executed in vocab and before in vocab  # every before-token is a vocabulary token
            if executed == "<noop>":
                assert before == "<noop>" and len(log) == 1
                seen["noop"] += 1
            else:
                path = executed.split("=")[0]
                assert before == f"{path}={turn.before[path]}"
                seen["acted"] += 1
        # The cabin shows the earlier turn applied (it ran on the staged cabin, so nothing changed
        # the paths it set afterwards).
        state = CabinState.from_json(s["state"])
        assert all(state.value(e.split("=")[0]) == e.split("=")[1] for e, _ in log if e != "<noop>")
    assert seen["noop"] > 20 and seen["acted"] > 200, seen
    for kind in KINDS[1:]:
        assert all(world.generate(3, i, kind, **TINY)["history_actions"] == [] for i in range(20))
    assert world.preference_pair(8, 1, **TINY)["history_actions"] is not None


def test_cue_sleeping_passenger_changes_answer_and_frames():
    awake = default_state(occupants=("adult", "empty", "adult", "empty"), tags=("privacy_low",))
    asleep = awake.replace(asleep=(False, False, True, False))
    req = Request.make("volume_up")
    assert policy(Context(awake, req))[0] == ["media.volume=6"]
    assert policy(Context(asleep, req))[0] == ["<noop>"]
    fa = render.render_frames(awake, np.random.default_rng(0), 64, 4).astype(np.float32)
    fs = render.render_frames(asleep, np.random.default_rng(0), 64, 4).astype(np.float32)
    rows, cols = render.seat_box("rear_left", 64)
    cue = np.abs(fa - fs)[:, rows, cols].mean()
    elsewhere = np.abs(fa - fs)[:, render.seat_box("passenger", 64)[0], render.seat_box("passenger", 64)[1]].mean()
    assert cue > 10 and cue > 4 * elsewhere
    # Asleep = still; awake = moving between frames.
    assert np.abs(np.diff(fs[:, rows, cols], axis=0)).mean() < np.abs(np.diff(fa[:, rows, cols], axis=0)).mean()


def test_cue_child_seat_position_decides_which_window():
    base = default_state(tags=("child_on_board", "privacy_low")).replace(
        {"window.rear_left": "open_30", "window.rear_right": "open_30"})
    left = base.replace(occupants=("adult", "empty", "child", "adult"), asleep=(False, False, True, False))
    right = base.replace(occupants=("adult", "empty", "adult", "child"), asleep=(False, False, False, True))
    a_left = policy(Context(left, Request.make("child_asleep")))[0]
    a_right = policy(Context(right, Request.make("child_asleep")))[0]
    assert "window.rear_left=closed" in a_left and "window.rear_right=closed" not in a_left
    assert "window.rear_right=closed" in a_right and "window.rear_left=closed" not in a_right
    fl = render.render_frames(left, np.random.default_rng(0), 32, 1)[0].astype(np.float32)
    rows, cols = render.seat_box("rear_left", 32)
    orange = (fl[rows, cols, 0] > 180) & (fl[rows, cols, 2] < 90)
    assert orange.mean() > 0.2  # the child seat is there to see


def test_cue_light_and_voice_change_the_answer():
    bright = default_state(light=0.9, tags=("privacy_low",)).replace({"sunshade.roof": "closed"})
    dark = bright.replace(light=0.15)
    assert policy(Context(bright, Request.make("too_dark")))[0] == ["sunshade.roof=open"]
    assert policy(Context(dark, Request.make("too_dark")))[0][0] == "light.reading.driver=on"
    fb = render.render_frames(bright, np.random.default_rng(0), 32, 1).astype(np.float32)
    fd = render.render_frames(dark, np.random.default_rng(0), 32, 1).astype(np.float32)
    assert fb.mean() > fd.mean() + 12
    def saturation(f):  # above the ambient strip, which glows in its own colour
        f = f[:, : int(0.94 * f.shape[1])]
        return np.abs(f - f.mean(-1, keepdims=True)).mean()
    assert saturation(fd) < 0.6 * saturation(fb)  # the dark cabin is seen in grey infrared
    w_dark = policy(Context(dark, Request.make("welcome")))[0]
    w_bright = policy(Context(bright, Request.make("welcome")))[0]
    assert "light.ambient.brightness=2" in w_dark and "light.ambient.brightness=4" in w_bright

    calm = policy(Context(bright, Request.make("long_day"), (), "calm"))[0]
    stressed = policy(Context(bright, Request.make("long_day"), (), "stressed"))[0]
    assert calm == ["<noop>"] and "light.ambient.color=blue" in stressed
    mc = render.render_mel("What a day", "calm", False, np.random.default_rng(0), 32, 32)
    ms = render.render_mel("What a day", "stressed", False, np.random.default_rng(0), 32, 32)
    assert mc.shape == ms.shape
    assert ms[1:-1].mean() > mc[1:-1].mean() + 0.1  # more energy
    low, high = slice(0, 3), slice(3, 6)  # pitch band: calm f0 ≈ 2 bins, stressed ≈ 4
    assert mc[1:-1, low].mean() > ms[1:-1, low].mean() and ms[1:-1, high].mean() > mc[1:-1, high].mean()
    assert np.abs(np.diff(ms[1:-1].mean(1))).mean() > 2 * np.abs(np.diff(mc[1:-1].mean(1))).mean()


def test_generated_data_depends_on_cues(vla_samples):
    """In the data itself, the same request gets different answers with and without the cue."""
    vol = [s for s in vla_samples if s["scene"] == "volume_up"]
    sleeping = [s["actions"] for s in vol if any(s["state"]["asleep"])]
    awake = [s["actions"] for s in vol if not any(s["state"]["asleep"])]
    assert sleeping and awake
    assert all(a == ["<noop>"] for a in sleeping)
    assert any(a != ["<noop>"] for a in awake)
    voice = [(s["explanation"], s["actions"]) for s in vla_samples if s["scene"] == "long_day"]
    assert any(a == ["<noop>"] for _, a in voice) and any(a != ["<noop>"] for _, a in voice)


def test_captions_describe_what_is_drawn():
    for i in range(50):
        s = world.generate(5, i, "image_text", **TINY)
        st = CabinState.from_json(s["state"])
        dark_word = "Dark cabin" if s["language"] == "en" else "车内很暗"
        assert (dark_word in s["text"]) == st.dark
        if any(st.asleep):
            assert ("asleep" in s["text"]) or ("睡着" in s["text"])


def test_preference_pairs_rejected_side_breaks_the_rules():
    reasons = collections.Counter()
    for i in range(300):
        p = world.preference_pair(8, i, **TINY)
        state = CabinState.from_json(p["state"])
        assert p["chosen"] == p["actions"] and p["chosen"] != p["rejected"]
        assert cabin.check(state, p["chosen"], reference=p["chosen"]) == []
        issues = cabin.check(state, p["rejected"], reference=p["chosen"])
        assert issues and p["reason"] == issues[0]
        reasons[p["reason"].split(":")[0].split("@")[0]] += 1
    assert {"violation", "missing", "over_trigger"} <= set(reasons) and reasons["inversion"] > 0
    assert packed(world.preference_pair(8, 1, **TINY)) == packed(world.preference_pair(8, 1, **TINY))


def test_generation_is_fast():
    world.generate(0, 0, "vla", **TINY)
    t = time.perf_counter()
    for i in range(200):
        world.generate(0, i, KINDS[i % 4], **TINY)
    per_sample = (time.perf_counter() - t) / 200
    assert per_sample < 0.01  # ~1 ms on one core; generous for loaded CI machines


def test_all_text_comes_from_the_phrase_tables(vla_samples):
    known = set(phrases.all_strings())
    for s in vla_samples[:500]:
        assert s["explanation"] in known
