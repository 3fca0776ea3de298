"""The synthetic cabin world: deterministic samples of the four data kinds and preference pairs.

`generate(seed, index, kind, ...)` is a pure function of its arguments: its random generator is
`np.random.default_rng([seed, index, kind_id])` and nothing else is random, so the same arguments
always give byte-identical samples, and any sample can be regenerated from its id alone.

A VLA sample is one turn: a cabin (devices, environment, constraint tags), who is where and who is
asleep, a request in Chinese or English (typed, spoken with a transcript, or spoken only), maybe an
earlier turn the request refers to, the camera frames and the mel of the voice, and the answer of
the rule-based policy with its explanation. The generator deliberately puts cues in front of the
requests that depend on them (sleepers for "turn the music up", a child seat for "the child fell
asleep", a dark cabin for "it's too dark", a stressed voice for "what a day").
"""

from __future__ import annotations

import numpy as np

from vlacabin_jax.data import cabin, phrases, render
from vlacabin_jax.data.actions import NOOP, SEATS
from vlacabin_jax.data.cabin import PATHS, CabinState
from vlacabin_jax.data.policy import (FOLLOW_UPS, VOICES, Context, Request, history_log, make_turn, policy)
from vlacabin_jax.data.spec import KINDS

# Relative frequency of each request type in VLA samples.
REQUEST_WEIGHTS: dict[str, float] = {
    **{s: 1.0 for s in cabin.SCENES},
    "colder": 1.5, "warmer": 1.5, "set_temp": 0.8, "fan_up": 0.6, "fan_down": 0.6, "seat_heat": 1.0,
    "seat_vent": 0.7, "massage": 0.7, "volume_up": 1.5, "volume_down": 0.8, "play_music": 1.2,
    "pause_media": 0.6, "play_video": 1.0, "open_window": 1.0, "close_windows": 0.6,
    "sunshade_open": 0.5, "sunshade_close": 0.5, "too_dark": 1.0, "ambient_color": 0.7,
    "fragrance_on": 0.7, "navigate": 0.8, "child_asleep": 1.2, "long_day": 1.2, "stop_meeting": 0.6,
    "chitchat": 2.0, "more": 1.2, "turn_off": 1.0, "same_passenger": 0.8, "undo": 1.0,
}
_TYPES = tuple(REQUEST_WEIGHTS)
_CUM = np.cumsum([REQUEST_WEIGHTS[t] for t in _TYPES]) / sum(REQUEST_WEIGHTS.values())
VOICE_ONLY = ("play_music", "long_day")  # decided by the voice: always spoken
# Earlier requests a follow-up can refer to (the rest of the time it refers to something else).
_FOLLOW_PREV = {
    "more": ("colder", "warmer", "fan_up", "fan_down", "volume_up", "volume_down", "open_window", "seat_heat"),
    "turn_off": ("seat_heat", "seat_vent", "massage", "too_dark", "fragrance_on", "play_music",
                 "play_video", "open_window", "ambient_color", "navigate"),
    "same_passenger": ("seat_heat", "seat_vent", "massage", "open_window"),
    "undo": ("colder", "warmer", "set_temp", "seat_heat", "volume_down", "ambient_color", "open_window",
             "close_windows", "play_music", "navigate", "cinema", "nap", "relax", "purify", "welcome"),
}
_OTHER_PREV = ("chitchat", "navigate", "set_temp", "cinema", "close_windows")
# Slot values a request may carry (`sample_request` draws them, `request_slot_options` lists them).
_DELTA = 2  # "much colder/warmer"
_TEMPS = (16, 29)  # set_temp: integers in [16, 29)
_SEAT_TYPES = ("seat_heat", "seat_vent", "massage", "open_window")
_SCENTS = ("citrus", "forest", "ocean", "lavender")
_DESTS = ("home", "office", "charger")
_KIND_ID = {k: i for i, k in enumerate(KINDS)}
_PREFERENCE_STREAM = len(KINDS)  # rng stream of preference pairs


def sample_id(seed: int, index: int, kind: str) -> int:
    """A globally unique int64 id: 21 bits of seed, 2 bits of kind, 40 bits of index."""
    return ((seed & 0x1FFFFF) << 42) | (_KIND_ID[kind] << 40) | (index & 0xFFFFFFFFFF)


def _choice(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_state(rng: np.random.Generator) -> CabinState:
    """A random, guardrail-consistent cabin (tags derived from the environment)."""
    hour = int(rng.integers(24))
    night = hour >= 22 or hour < 6
    u = rng.random()
    if night:
        light = rng.uniform(0.08, 0.3)
    elif u < 0.15:  # tunnel or garage by day: dark without being night
        light = rng.uniform(0.1, 0.3)
    else:
        light = rng.uniform(0.45, 1.0)
    driving = rng.random() < 0.6
    occ = ["adult", "adult" if rng.random() < 0.5 else "empty"]
    for _ in range(2):
        r = rng.random()
        occ.append("empty" if r < 0.45 else "adult" if r < 0.72 else "child")
    asleep = [False] + [o != "empty" and rng.random() < (0.35 if o == "child" else 0.2) for o in occ[1:]]
    awake_adults = [s for s, o, a in zip(SEATS, occ, asleep) if o == "adult" and not a]
    speaker = "driver" if rng.random() < 0.7 or len(awake_adults) == 1 else _choice(rng, awake_adults[1:])
    d = {p: s.default for p, s in PATHS.items()}
    d["climate.temp"] = str(int(rng.integers(18, 27)))
    d["climate.fan"] = str(int(rng.integers(0, 6)))
    d["climate.mode"] = _choice(rng, PATHS["climate.mode"].values)
    d["climate.defog"] = "on" if rng.random() < 0.1 else "off"
    d["climate.recirc"] = "on" if rng.random() < 0.4 and d["climate.defog"] == "off" else "off"
    for s in SEATS:
        if rng.random() < 0.3:
            d[f"seat.{s}.heat"] = str(int(rng.integers(1, 4)))
        elif rng.random() < 0.2:
            d[f"seat.{s}.vent"] = str(int(rng.integers(1, 4)))
        if rng.random() < 0.15:
            d[f"seat.{s}.massage"] = _choice(rng, ("gentle", "wave", "deep"))
        if rng.random() < 0.15:
            d[f"seat.{s}.position"] = _choice(rng, ("relax", "recline"))
        if rng.random() < 0.15:
            d[f"light.reading.{s}"] = "on"
    d["light.ambient.color"] = _choice(rng, PATHS["light.ambient.color"].values)
    d["light.ambient.brightness"] = str(int(rng.integers(0, 6)))
    d["media.source"] = _choice(rng, ("radio", "music", "podcast", "bluetooth", "white_noise"))
    d["media.volume"] = str(int(rng.integers(0, 9)))
    d["media.play"] = "play" if rng.random() < 0.5 else "pause"
    d["screen.driver"] = _choice(rng, ("nav", "nav", "media", "off"))
    d["screen.rear"] = _choice(rng, ("off", "off", "media", "video"))
    for s in SEATS[:: 1 if rng.random() < 0.5 else -1]:
        if rng.random() < 0.2 and sum(d[f"window.{x}"] != "closed" for x in SEATS) < 2:
            d[f"window.{s}"] = _choice(rng, ("open_30", "open_60"))
    d["sunshade.roof"] = _choice(rng, ("open", "half", "closed"))
    d["sunshade.rear"] = _choice(rng, ("open", "half", "closed"))
    d["fragrance"] = "off" if rng.random() < 0.7 else _choice(rng, ("citrus", "forest", "ocean", "lavender"))
    d["purifier"] = _choice(rng, ("off", "off", "auto", "max"))
    d["app.meeting"] = "start" if rng.random() < 0.05 else "end"
    d["app.navigation"] = _choice(rng, ("stop", "stop", "home", "office", "charger"))
    outside = float(rng.uniform(-10, 38))
    state = CabinState(
        devices=d, cabin_temp=round(float(np.clip(outside + rng.uniform(-4, 12), 5, 45)), 1),
        outside_temp=round(outside, 1), humidity=round(float(rng.uniform(20, 90)), 1),
        pm25=round(float(np.exp(rng.uniform(np.log(5), np.log(300)))), 1), hour=hour,
        speed_kmh=round(float(rng.uniform(20, 120)), 1) if driving else 0.0, light=round(float(light), 3),
        occupants=tuple(occ), asleep=tuple(bool(a) for a in asleep), speaker=speaker)
    return finalize(state, rng)


def finalize(state: CabinState, rng: np.random.Generator | None = None,
             privacy: str | None = None, denied: tuple[str, ...] | None = None) -> CabinState:
    """Derive the tags from the environment (plus privacy/permissions) and reset any device value
    that breaks a guardrail to its default, so every sampled cabin is consistent."""
    if privacy is None:
        privacy = cabin.PRIVACY_TAGS[int(np.searchsorted([0.5, 0.8], rng.random()))] if rng else "privacy_low"
    if denied is None:
        denied = tuple(t for t in ("deny_windows", "deny_video", "deny_fragrance", "deny_apps")
                       if rng is not None and rng.random() < 0.08)
    night = state.hour >= 22 or state.hour < 6
    tags = tuple(t for t, on in (("night_quiet", night), ("child_on_board", bool(state.children())),
                                 ("driving", state.driving)) if on) + (privacy,) + tuple(denied)
    state = state.replace(tags=tuple(t for t in cabin.CONSTRAINT_TAGS if t in tags))
    for _ in range(3):
        bad = {v.split("=")[0] for v in cabin.state_violations(state)}
        if not bad:
            break
        state = state.replace({p: PATHS[p].default for p in bad})
    return state


def sample_request(rng: np.random.Generator, state: CabinState, type: str | None = None) -> Request:
    """A request (with slots) of a weighted random type, or of `type`."""
    typ = type or _TYPES[int(np.searchsorted(_CUM, rng.random(), side="right"))]
    slots = {}
    if typ in ("colder", "warmer") and rng.random() < 0.2:
        slots["delta"] = _DELTA
    elif typ == "set_temp":
        slots["temp"] = int(rng.integers(*_TEMPS))
    elif typ in _SEAT_TYPES and rng.random() < 0.4:
        others = [s for s, o in zip(SEATS, state.occupants) if o != "empty" and s != state.speaker]
        slots["seat"] = _choice(rng, others or list(SEATS[1:]))
    elif typ == "ambient_color":
        slots["color"] = _choice(rng, PATHS["light.ambient.color"].values)
    elif typ == "fragrance_on" and rng.random() < 0.5:
        slots["scent"] = _choice(rng, _SCENTS)
    elif typ == "navigate":
        slots["dest"] = _choice(rng, _DESTS)
    return Request.make(typ, **slots)


def request_slot_options(type: str) -> list[dict]:
    """Every slot assignment `sample_request` can draw for a request type ([{}] when it has none):
    what a reader of the request text has to tell apart."""
    if type in ("colder", "warmer"):
        return [{}, {"delta": _DELTA}]
    if type == "set_temp":
        return [{"temp": t} for t in range(*_TEMPS)]
    if type in _SEAT_TYPES:  # a named seat may be anyone's, the speaker's own included
        return [{}] + [{"seat": s} for s in SEATS]
    if type == "ambient_color":
        return [{"color": c} for c in PATHS["light.ambient.color"].values]
    if type == "fragrance_on":
        return [{}] + [{"scent": c} for c in _SCENTS]
    if type == "navigate":
        return [{"dest": d} for d in _DESTS]
    return [{}]


def _stage(rng: np.random.Generator, state: CabinState, typ: str) -> CabinState:
    """Put the cue a request depends on in front of it often enough to be learned."""
    occ, asleep = list(state.occupants), list(state.asleep)
    dev = {}
    if typ == "child_asleep" and rng.random() < 0.9:
        seat = _choice(rng, [s for s in cabin.REAR_SEATS if s != state.speaker])
        occ[SEATS.index(seat)], asleep[SEATS.index(seat)] = "child", True
        if rng.random() < 0.4:
            dev[f"light.reading.{seat}"] = "on"
        if rng.random() < 0.4:
            dev[f"window.{seat}"] = "open_30"
    elif typ in ("volume_up", "colder", "purify") and rng.random() < 0.4:
        i = SEATS.index(_choice(rng, SEATS[1:]))  # someone (not the driver) falls asleep
        if SEATS[i] != state.speaker:
            occ[i] = "adult" if occ[i] == "empty" else occ[i]
            asleep[i] = True
    if typ == "colder" and rng.random() < 0.5:
        dev["climate.fan"] = str(int(rng.integers(0, 4)))
        return _env(state, occ, asleep, dev, cabin_temp=int(state.value("climate.temp")) + 6.5)
    if typ in ("too_dark", "welcome"):
        light = rng.uniform(0.08, 0.3) if rng.random() < 0.5 else rng.uniform(0.5, 1.0)
        return _env(state, occ, asleep, dev, light=round(float(light), 3))
    if typ == "stop_meeting" and rng.random() < 0.7:
        dev["app.meeting"] = "start"
    if typ == "ventilate" and rng.random() < 0.2:
        return _env(state, occ, asleep, dev, pm25=180.0)
    return _env(state, occ, asleep, dev)


def _env(state, occ, asleep, dev, **env) -> CabinState:
    new = state.replace(dev, occupants=tuple(occ), asleep=tuple(asleep), **env)
    privacy = next(t for t in state.tags if t.startswith("privacy_"))
    denied = tuple(t for t in state.tags if t.startswith("deny_"))
    return finalize(new, privacy=privacy, denied=denied)


def vla_turn(rng: np.random.Generator, language: str) -> dict:
    """The structured content of one VLA turn (before rendering): context, answer, utterances."""
    state = sample_state(rng)
    req = sample_request(rng, state)
    history = ()
    history_text: list[str] = []
    state = _stage(rng, state, req.type)
    if req.type in FOLLOW_UPS and rng.random() < 0.9:
        pool = _FOLLOW_PREV[req.type] if rng.random() < 0.85 else _OTHER_PREV
        if req.type == "same_passenger":
            state = _env(state.replace(speaker="driver"), state.occupants, state.asleep, {})
        prev = sample_request(rng, state, _choice(rng, pool))
        if req.type == "same_passenger":  # the earlier turn was about the speaker's own seat
            prev = Request(prev.type, tuple(kv for kv in prev.slots if kv[0] != "seat"))
        prev_actions, _ = policy(Context(state, prev))
        history = (make_turn(state, prev, prev_actions),)
        history_text = [phrases.utterance(prev.type, dict(prev.slots), language, rng)]
        state = cabin.execute(state, prev_actions).state
    elif rng.random() < 0.1:  # an unrelated earlier turn the answer must not depend on
        prev = sample_request(rng, state, "chitchat")
        history_text = [phrases.utterance("chitchat", {}, language, rng)]
        history = (make_turn(state, prev, [NOOP]),)
    mode = "spoken" if req.type in VOICE_ONLY else _choice(rng, ("typed", "spoken", "spoken", "spoken_only"))
    voice = None if mode == "typed" else VOICES[int(rng.random() < (0.5 if req.type in VOICE_ONLY else 0.3))]
    ctx = Context(state, req, history, voice)
    actions, (key, args) = policy(ctx)
    return {"context": ctx, "actions": actions, "key": key, "args": args, "mode": mode,
            "utterance": phrases.utterance(req.type, dict(req.slots), language, rng),
            "history": history_text}


def _caption_facts(state: CabinState, rng: np.random.Generator, n: int) -> list[tuple[str, dict]]:
    facts = [("dark" if state.dark else "bright", {})]
    people = []
    for s, o, a in zip(SEATS, state.occupants, state.asleep):
        if o != "empty":
            key = ("child" if o == "child" else "adult") + ("_asleep" if a else "")
            people.append((0 if a else 1 if o == "child" else 2, s, key))  # cues first
    people.sort(key=lambda p: (p[0], SEATS.index(p[1])))
    facts += [(k, {"seat": s}) for _, s, k in people[:n]]
    if all(o == "empty" for o in state.occupants[2:]) and rng.random() < 0.5:
        facts.append(("rear_empty", {}))
    return facts


def generate(seed: int, index: int, kind: str, image_size: int, num_frames: int, n_mels: int,
             mel_frames: int) -> dict:
    """One deterministic sample of `kind` (one of `spec.KINDS`).

    Returns a msgpack-friendly dict: sample_id, kind, language, scene, text, history,
    history_actions, mel (float32[T, n_mels], T ≤ mel_frames, or None), frames (uint8[F, S, S, 3],
    F ≤ num_frames, or None), state_numeric (float32[N] or None), state_categorical (int32[M] or
    None), constraint_tags, actions (list[str], ≤ cabin.MAX_ACTIONS tokens, or None), explanation
    (str or None), state (the cabin json, {} where there is none).

    `history_actions` is what the cabin did in the latest earlier turn, as its own log would say:
    [[executed_token, before_token], ...] (`policy.Turn.log`: each device token executed then, in
    order, and `path=value` that path had before it); [["<noop>", "<noop>"]] when that turn did
    nothing; [] without an earlier turn and for every kind but "vla". `state` is the cabin after
    the earlier turn (its actions are already applied).
    """
    if kind not in _KIND_ID:
        raise ValueError(f"unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, index, _KIND_ID[kind]])
    return _build(rng, sample_id(seed, index, kind), kind, image_size, num_frames, n_mels, mel_frames)


def vla_context(seed: int, index: int) -> Context:
    """The policy context of VLA sample `generate(seed, index, "vla", ...)` without rendering it.

    It replays exactly the draws `generate` makes before rendering (the language, then the turn),
    so it is that sample's cabin, request, earlier turn and voice ("calm" / "stressed", None when
    typed): what an evaluation needs to know about the perceptual cues the sample was rendered
    from (the voice is in the mel only, the sample dict does not name it).
    """
    rng = np.random.default_rng([seed, index, _KIND_ID["vla"]])
    language = phrases.LANGUAGES[int(rng.integers(2))]
    return vla_turn(rng, language)["context"]


def _build(rng, sid, kind, image_size, num_frames, n_mels, mel_frames) -> dict:
    language = phrases.LANGUAGES[int(rng.integers(2))]
    out = {"sample_id": sid, "kind": kind, "language": language, "scene": "", "text": "", "history": [],
           "history_actions": [], "mel": None, "frames": None, "state_numeric": None, "state_categorical": None,
           "constraint_tags": [], "actions": None, "explanation": None, "state": {}}
    if kind == "vla":
        turn = vla_turn(rng, language)
        ctx: Context = turn["context"]
        state = ctx.state
        num, cat = cabin.state_to_features(state)
        # The earlier turn's log, not only its text: `undo`, `turn_off` and `more` are decided by
        # what was executed and by the values it replaced, which the text alone does not say.
        out.update(scene=ctx.request.type, history=turn["history"], history_actions=history_log(ctx.history),
                   state_numeric=num, state_categorical=cat,
                   constraint_tags=list(state.tags), actions=list(turn["actions"]), state=state.to_json(),
                   explanation=phrases.explanation(turn["key"], turn["args"], language))
        out["text"] = "" if turn["mode"] == "spoken_only" else turn["utterance"]
        if turn["mode"] != "typed":
            out["mel"] = render.render_mel(turn["utterance"], ctx.voice, state.driving, rng, n_mels, mel_frames)
        out["frames"] = render.render_frames(state, rng, image_size, num_frames)
    elif kind in ("image_text", "video_text"):
        state = sample_state(rng)
        frames = 1 if kind == "image_text" else num_frames
        out.update(scene="image_caption" if kind == "image_text" else "video_caption", state=state.to_json(),
                   text=phrases.caption(_caption_facts(state, rng, 1 + int(rng.random() < 0.5)), language),
                   frames=render.render_frames(state, rng, image_size, frames))
    else:  # speech_text: an utterance of any request type and its transcript
        state = sample_state(rng)
        req = sample_request(rng, state)
        text = phrases.utterance(req.type, dict(req.slots), language, rng)
        voice = VOICES[int(rng.random() < 0.35)]
        out.update(scene=req.type, text=text,
                   mel=render.render_mel(text, voice, state.driving, rng, n_mels, mel_frames))
    return out


def _unguarded(ctx: Context) -> list[str]:
    """What a careless policy would do: the same request with no tags and nobody asleep."""
    free = ctx.state.replace(tags=(), asleep=(False,) * len(SEATS),
                             occupants=tuple("adult" if o == "child" else o for o in ctx.state.occupants))
    return policy(Context(free, ctx.request, ctx.history, ctx.voice))[0]


def preference_pair(seed: int, index: int, image_size: int, num_frames: int, n_mels: int,
                    mel_frames: int) -> dict:
    """A VLA sample plus a `chosen` (the policy's answer) and a plausible worse `rejected` answer.

    The rejected side breaks a guardrail (what the policy would do without the constraint tags or
    the cues), misses a step, swaps two steps that have an order, acts where nothing should
    happen, or does nothing where something should. `reason` says which, in `cabin.check` terms.
    """
    rng = np.random.default_rng([seed, index, _PREFERENCE_STREAM])
    sample = _build(rng, sample_id(seed, index, "vla"), "vla", image_size, num_frames, n_mels, mel_frames)
    state = CabinState.from_json(sample["state"])
    chosen = sample["actions"]
    candidates = []
    # The rules judge any answer on the state alone, so the rejected side needs no more context.
    careless = _careless(sample, state, rng)
    if careless is not None:
        candidates.append(careless)
    if chosen == [NOOP]:
        candidates.append(_over_trigger(state, rng))
    elif len(chosen) == 1:
        candidates.append([NOOP])
    else:
        drop = int(rng.integers(len(chosen)))
        candidates.append(chosen[:drop] + chosen[drop + 1:])
        candidates += _inverted(chosen)
    rejected = candidates[0] if careless is not None and rng.random() < 0.6 else _choice(rng, candidates)
    issues = cabin.check(state, rejected, reference=chosen)
    sample.update(chosen=list(chosen), rejected=list(rejected), reason=issues[0])
    return sample


def _careless(sample: dict, state: CabinState, rng) -> list[str] | None:
    """Re-ask the sample's request without guardrails; keep the answer only if it breaks one.

    Only slot-free single requests and scenes qualify: their request is fully named by `scene`
    (follow-ups need the earlier turn, slotted requests their slots)."""
    typ = sample["scene"]
    if typ in FOLLOW_UPS or sample_request(rng, state, typ).slots:
        return None
    voice = "stressed" if typ in VOICE_ONLY else None
    toks = _unguarded(Context(state, Request.make(typ), (), voice))
    return toks if cabin.execute(state, toks).violations else None


def _inverted(tokens: list[str]) -> list[list[str]]:
    """[tokens with the first swap of two steps that breaks an order rule], or []."""
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            swapped = list(tokens)
            swapped[i], swapped[j] = swapped[j], swapped[i]
            if cabin.inversions(swapped):
                return [swapped]
    return []


def _over_trigger(state: CabinState, rng) -> list[str]:
    """An action where none was wanted: louder music, or a cooler cabin."""
    if rng.random() < 0.5:
        return [f"media.volume={min(10, state.level('media.volume') + 2)}"]
    return [f"climate.temp={max(16, state.level('climate.temp') - 1)}"]
