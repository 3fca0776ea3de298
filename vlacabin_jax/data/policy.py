"""The rule-based cabin policy: a request in context → action tokens and an explanation.

It decides only through the rules of `cabin.py` (scene steps, guardrails, caps) and checks its own
answer with `cabin.execute` before returning it: a policy answer that breaks a guardrail, conflicts,
is out of order or is longer than `cabin.MAX_ACTIONS` is a bug and raises `PolicyError`.

Some answers depend on what only the camera or the microphone knows (a sleeping passenger, the
child seat's position, a dark cabin, a stressed voice); those facts are read from the state's
perceptual fields and `Context.voice`, which the world renders into frames and mel.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from vlacabin_jax.data import cabin
from vlacabin_jax.data.actions import NOOP, SEATS, split_token
from vlacabin_jax.data.cabin import CabinState, close_open_windows, scene_steps, set_token, volume_cap

# Single requests (scenes are requested by their scene name, see cabin.SCENES).
SINGLE_REQUESTS = (
    "colder", "warmer", "set_temp", "fan_up", "fan_down", "seat_heat", "seat_vent", "massage",
    "volume_up", "volume_down", "play_music", "pause_media", "play_video", "open_window",
    "close_windows", "sunshade_open", "sunshade_close", "too_dark", "ambient_color",
    "fragrance_on", "navigate", "child_asleep", "long_day", "stop_meeting", "chitchat",
)
# Follow-ups only make sense after an earlier turn (without one they are ambiguous → no-op).
FOLLOW_UPS = ("more", "turn_off", "same_passenger", "undo")
REQUEST_TYPES = tuple(cabin.SCENES) + SINGLE_REQUESTS + FOLLOW_UPS
VOICES = ("calm", "stressed")


class PolicyError(RuntimeError):
    """The policy produced an answer that breaks the cabin rules (a bug in the rules)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """What the user asked: a request type and its slots (seat, temp, color, scent, dest, delta)."""

    type: str
    slots: tuple[tuple[str, object], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.slots).get(key, default)

    @classmethod
    def make(cls, type: str, **slots) -> "Request":
        if type not in REQUEST_TYPES:
            raise ValueError(f"unknown request type {type!r}")
        return cls(type, tuple(sorted(slots.items())))


@dataclasses.dataclass(frozen=True)
class Turn:
    """An earlier turn: its request, the actions taken, and the values those paths had before."""

    request: Request
    actions: tuple[str, ...]
    before: Mapping[str, str]

    def log(self) -> list[list[str]]:
        """What the cabin logged for this turn: [executed_token, before_token] per executed device
        token in order (`before_token` = `path=value before the turn`); `[["<noop>", "<noop>"]]`
        for a turn that did nothing. Lists of str, so a sample can carry it through msgpack."""
        out = []
        for t in self.actions:
            if t != NOOP:
                path = split_token(t)[0]
                out.append([t, f"{path}={self.before[path]}"])
        return out or [[NOOP, NOOP]]

    @classmethod
    def from_log(cls, request: Request, log) -> "Turn":
        """The inverse of `log`: the turn of `request` whose action log is `log` (pairs as `log`
        writes them; an empty log is a turn that did nothing)."""
        acts = tuple(e for e, _ in log if e != NOOP) or (NOOP,)
        before = {split_token(e)[0]: split_token(b)[1] for e, b in log if e != NOOP}
        return cls(request, acts, before)


def history_log(history) -> list[list[str]]:
    """The action log (`Turn.log`) of the latest earlier turn of `history`; [] when there is none."""
    return history[-1].log() if history else []


def make_turn(state: CabinState, request: Request, actions) -> Turn:
    """Record a turn executed on `state` (the state before it)."""
    before = {}
    for t in actions:
        if t != NOOP:
            path = split_token(t)[0]
            before.setdefault(path, state.value(path))
    return Turn(request, tuple(actions), before)


@dataclasses.dataclass(frozen=True)
class Context:
    """Everything the policy may use: the cabin (tags included), the request, earlier turns of
    the dialogue (oldest first; their actions already applied to `state`), and the voice
    ("calm" / "stressed", None when the request was typed)."""

    state: CabinState
    request: Request
    history: tuple[Turn, ...] = ()
    voice: str | None = None


Answer = tuple[list[str], str, dict]  # tokens ([] = nothing), explanation key, explanation args


def _scene(name: str, state: CabinState, tags) -> Answer:
    steps, decline = scene_steps(name, state, tags)
    if decline:
        return [], decline, {"scene": name}
    toks = [t for _, ts in steps for t in ts]
    if not toks:
        return [], "scene_already", {"scene": name}
    args = {"scene": name}
    if name == "welcome":
        args["light"] = "dark" if state.dark else "bright"
    if name == "cinema":
        args["screen"] = "rear" if "driving" in tags else "driver"
    if name == "purify" and ("night_quiet" in tags or state.sleepers()):
        return toks, "scene_purify_quiet", args
    return toks, f"scene_{name}", args


def _seat(ctx: Context) -> str:
    seat = ctx.request.get("seat") or ctx.state.speaker
    if seat not in SEATS:
        raise ValueError(f"unknown seat {seat!r}")
    return seat


def _single(ctx: Context, tags: frozenset) -> Answer:
    s, r = ctx.state, ctx.request
    typ, spk = r.type, s.speaker
    temp, fan, vol = s.level("climate.temp"), s.level("climate.fan"), s.level("media.volume")
    if typ == "colder":
        if temp <= 16:
            return [], "temp_limit", {"temp": 16}
        new = max(16, temp - int(r.get("delta", 1)))
        toks = [f"climate.temp={new}"]
        if s.cabin_temp > new + 4 and fan < 5:
            if s.sleepers():  # the camera shows a sleeper: cool quietly, no extra fan
                return toks, "temp_down_quiet", {"temp": new, "seat": s.sleepers()[0]}
            return toks + [f"climate.fan={fan + 1}"], "temp_down_fan", {"temp": new}
        return toks, "temp_down", {"temp": new}
    if typ == "warmer":
        if temp >= 28:
            return [], "temp_limit", {"temp": 28}
        new = min(28, temp + int(r.get("delta", 1)))
        toks = [f"climate.temp={new}"]
        if s.cabin_temp < 12 and s.level(f"seat.{spk}.heat") < 2:
            seat = set_token(s, f"seat.{spk}.vent", 0) + [f"seat.{spk}.heat=2"]
            return toks + seat, "temp_up_seat", {"temp": new, "seat": spk}
        return toks, "temp_up", {"temp": new}
    if typ == "set_temp":
        new = int(r.get("temp"))
        return (set_token(s, "climate.temp", new), "temp_set", {"temp": new}) if new != temp else \
            ([], "already", {"what": "temp"})
    if typ in ("fan_up", "fan_down"):
        new = fan + (1 if typ == "fan_up" else -1)
        if not 0 <= new <= 7:
            return [], "already", {"what": "fan"}
        return [f"climate.fan={new}"], "fan_set", {"level": new}
    if typ in ("seat_heat", "seat_vent"):
        seat = _seat(ctx)
        this, other = ("heat", "vent") if typ == "seat_heat" else ("vent", "heat")
        level = 1 if (this == "heat" and s.occupant(seat) == "child") else 2
        if s.level(f"seat.{seat}.{this}") >= level:
            return [], "already", {"what": f"seat_{this}"}
        toks = set_token(s, f"seat.{seat}.{other}", 0) + [f"seat.{seat}.{this}={level}"]
        key = "seat_heat_child" if level == 1 else f"seat_{this}_on"
        return toks, key, {"seat": seat, "level": level}
    if typ == "massage":
        seat = _seat(ctx)
        if s.occupant(seat) == "child":
            return [], "child_seat_no", {"seat": seat}
        toks = set_token(s, f"seat.{seat}.massage", "wave")
        return (toks, "massage_on", {"seat": seat}) if toks else ([], "already", {"what": "massage"})
    if typ == "volume_up":
        if s.sleepers():  # someone asleep on camera: decline the louder music
            return [], "sleeping_keep_volume", {"seat": s.sleepers()[0]}
        cap = volume_cap(s, tags)
        if vol >= cap:
            return [], "volume_at_cap", {"level": vol}
        new = min(vol + 2, cap)
        return [f"media.volume={new}"], ("volume_capped_night" if new == cap < 10 else "volume_set"), \
            {"level": new}
    if typ == "volume_down":
        if vol == 0:
            return [], "already", {"what": "volume"}
        return [f"media.volume={max(0, vol - 2)}"], "volume_set", {"level": max(0, vol - 2)}
    if typ == "play_music":
        stressed = ctx.voice == "stressed"
        toks = set_token(s, "media.source", "music")
        if stressed:  # a stressed voice gets calm music, soft volume and a calming light
            toks += set_token(s, "media.volume", 3) if vol > 3 else []
            toks += set_token(s, "light.ambient.color", "blue")
        toks += set_token(s, "media.play", "play")
        if not toks:
            return [], "already", {"what": "music"}
        return toks, ("music_calm" if stressed else "music_on"), {}
    if typ == "pause_media":
        toks = set_token(s, "media.play", "pause")
        return (toks, "media_paused", {}) if toks else ([], "already", {"what": "media"})
    if typ == "play_video":
        if "deny_video" in tags:
            return [], "deny_video", {}
        rear = [x for x in cabin.REAR_SEATS if s.occupant(x) != "empty"]
        if "driving" in tags and not rear:
            return [], "no_video_driving", {}
        screen = "rear" if "driving" in tags else "driver"
        toks = set_token(s, f"screen.{screen}", "video") + set_token(s, "media.source", "video")
        toks += set_token(s, "media.play", "play")
        return (toks, "video_on", {"screen": screen}) if toks else ([], "already", {"what": "video"})
    if typ == "open_window":
        seat = _seat(ctx)
        if "deny_windows" in tags:
            return [], "deny_windows", {}
        if s.pm25 > 150:
            return [], "polluted_outside", {}
        if "privacy_high" in tags and s.value("app.meeting") == "start":
            return [], "privacy_meeting", {}
        if s.value(f"window.{seat}") != "closed":
            return [], "already", {"what": "window"}
        return [f"window.{seat}=open_30"], "window_open", {"seat": seat}
    if typ == "close_windows":
        toks = close_open_windows(s)
        return (toks, "windows_closed", {}) if toks else ([], "already", {"what": "windows"})
    if typ in ("sunshade_open", "sunshade_close"):
        value = "open" if typ == "sunshade_open" else "closed"
        toks = set_token(s, "sunshade.roof", value)
        return (toks, f"sunshade_{value}", {}) if toks else ([], "already", {"what": "sunshade"})
    if typ == "too_dark":
        if s.dark:  # the camera sees a dark cabin: reading light at the speaker plus ambient glow
            toks = set_token(s, f"light.reading.{spk}", "on")
            toks += set_token(s, "light.ambient.brightness", 3) if s.level("light.ambient.brightness") < 3 else []
            return (toks, "dark_light_on", {"seat": spk}) if toks else ([], "already", {"what": "light"})
        if s.value("sunshade.roof") != "open":
            return ["sunshade.roof=open"], "bright_open_shade", {}
        return [], "already_bright", {}
    if typ == "ambient_color":
        color = r.get("color")
        toks = set_token(s, "light.ambient.color", color)
        toks += set_token(s, "light.ambient.brightness", 3) if s.level("light.ambient.brightness") == 0 else []
        return (toks, "ambient_color", {"color": color}) if toks else ([], "already", {"what": "light"})
    if typ == "fragrance_on":
        if "deny_fragrance" in tags:
            return [], "deny_fragrance", {}
        scent = r.get("scent", "citrus")
        toks = set_token(s, "fragrance", scent)
        return (toks, "fragrance_on", {"scent": scent}) if toks else ([], "already", {"what": "fragrance"})
    if typ == "navigate":
        if "deny_apps" in tags:
            return [], "deny_apps", {}
        dest = r.get("dest")
        toks = set_token(s, "app.navigation", dest)
        if s.value("screen.driver") != "nav" and s.value("app.meeting") != "start":
            toks += ["screen.driver=nav"]
        return (toks, "navigate", {"dest": dest}) if toks else ([], "already", {"what": "navigation"})
    if typ == "child_asleep":
        kids = [x for x in s.children() if s.is_asleep(x)] or s.children()
        if not kids:  # nobody in a child seat on camera
            return [], "no_child", {}
        toks = set_token(s, "media.volume", 2) if vol > 2 else []
        for k in kids:
            toks += set_token(s, f"light.reading.{k}", "off") + set_token(s, f"window.{k}", "closed")
        toks += set_token(s, "sunshade.rear", "closed")
        toks += set_token(s, "climate.fan", 2) if fan > 2 else []
        return (toks, "child_asleep", {"seat": kids[0]}) if toks else ([], "already_quiet", {})
    if typ == "long_day":
        if ctx.voice == "stressed":  # only the voice tells chit-chat from a plea for calm
            toks, _, _ = _scene("relax", s, tags)
            return (toks, "relax_stressed", {}) if toks else ([], "scene_already", {"scene": "relax"})
        return [], "chat", {}
    if typ == "stop_meeting":
        if s.value("app.meeting") != "start":
            return [], "no_meeting", {}
        toks = ["app.meeting=end"] + (["screen.driver=nav"] if s.value("screen.driver") == "meeting" else [])
        return toks, "meeting_end", {}
    if typ == "chitchat":
        return [], "chat", {}
    raise KeyError(f"no policy for request type {typ!r}")


# What "turn it off" switches off after each kind of earlier request: (path prefix, off value).
_OFF = {
    "seat_heat": (".heat", "0"), "seat_vent": (".vent", "0"), "massage": (".massage", "off"),
    "too_dark": ("light.reading.", "off"), "fragrance_on": ("fragrance", "off"),
    "play_music": ("media.play", "pause"), "play_video": ("media.play", "pause"),
    "open_window": ("window.", "closed"), "ambient_color": ("light.ambient.brightness", "0"),
    "navigate": ("app.navigation", "stop"),
}
_REPEATABLE = ("colder", "warmer", "fan_up", "fan_down", "volume_up", "volume_down")
_PER_SEAT = ("seat_heat", "seat_vent", "massage", "open_window")


def _follow_up(ctx: Context, tags: frozenset) -> Answer:
    s, typ = ctx.state, ctx.request.type
    if not ctx.history:
        return [], "ambiguous", {}
    h = ctx.history[-1]
    prev = h.request.type
    acted = [t for t in h.actions if t != NOOP]
    if typ == "more":
        if prev in _REPEATABLE:
            return _single(dataclasses.replace(ctx, request=h.request), tags)
        if prev == "open_window" and acted:
            seat = split_token(acted[0])[0].split(".")[1]
            if s.occupant(seat) == "child":
                return [], "child_window", {"seat": seat}
            return set_token(s, f"window.{seat}", "open_60"), "window_open", {"seat": seat}
        if prev == "seat_heat" and acted:
            seat = split_token(acted[-1])[0].split(".")[1]
            top = 1 if s.occupant(seat) == "child" else 3
            if s.level(f"seat.{seat}.heat") >= top:
                return [], "already", {"what": "seat_heat"}
            return [f"seat.{seat}.heat={s.level(f'seat.{seat}.heat') + 1}"], "seat_heat_on", \
                {"seat": seat, "level": s.level(f"seat.{seat}.heat") + 1}
        return [], "ambiguous", {}
    if typ == "turn_off":
        if prev not in _OFF:
            return [], "ambiguous", {}
        key, off = _OFF[prev]
        toks = []
        for t in acted:
            path = split_token(t)[0]
            if (path.endswith(key) or path.startswith(key)) and s.value(path) != off:
                toks.append(f"{path}={off}")
        return (toks, "turned_off", {}) if toks else ([], "already", {"what": "off"})
    if typ == "same_passenger":
        if prev not in _PER_SEAT or s.speaker == "passenger" or h.request.get("seat") == "passenger":
            return [], "ambiguous", {}
        req = Request.make(prev, **dict(h.request.slots, seat="passenger"))
        return _single(dataclasses.replace(ctx, request=req), tags)
    if typ == "undo":
        if not acted:
            return [], "nothing_to_undo", {}
        toks, skipped = [], False
        for t in reversed(acted):
            path = split_token(t)[0]
            cand = f"{path}={h.before[path]}"
            if s.value(path) == h.before[path] or cand in toks:
                continue
            # Restoring must still obey the rules now (e.g. not raise the volume over a sleeper).
            if cabin.execute(s, toks + [cand]).ok:
                toks.append(cand)
            else:
                skipped = True
        if not toks:
            return [], "nothing_to_undo", {}
        return toks, ("undone_guarded" if skipped else "undone"), {}
    raise KeyError(typ)


def policy(ctx: Context) -> tuple[list[str], tuple[str, dict]]:
    """Answer one turn.

    Returns:
      (action tokens — ["<noop>"] when nothing should happen —, (explanation key, args)); the key
      and args are rendered into Chinese or English by `phrases.explanation`.
    Raises:
      PolicyError: the answer breaks the cabin rules (never for a consistent state).
    """
    tags = frozenset(ctx.state.tags)
    typ = ctx.request.type
    if typ in cabin.SCENES:
        toks, key, args = _scene(typ, ctx.state, tags)
    elif typ in FOLLOW_UPS:
        toks, key, args = _follow_up(ctx, tags)
    else:
        toks, key, args = _single(ctx, tags)
    toks = toks or [NOOP]
    ex = cabin.execute(ctx.state, toks)
    if not ex.ok or len(toks) > cabin.MAX_ACTIONS:
        raise PolicyError(f"policy answer {toks} for {ctx.request} breaks the rules: "
                          f"{ex.violations} {ex.conflicts} {ex.inversions} (len {len(toks)})")
    return toks, (key, args)
