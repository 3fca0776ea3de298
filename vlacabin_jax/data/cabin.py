"""The cabin rules: one source of truth for the generator, the policy and the evaluation simulator.

What lives here: the cabin state; what each action token does to it (`apply`); the guardrails
(`violations`); which tokens contradict each other in one turn (`CONFLICT_RULES`); which must come
before which (`ORDER_RULES`); the scene modes and their steps (`scene_steps`); executing and
checking any token sequence (`execute`, `check`); and the state's model features
(`state_to_features`). The rule-based policy that answers requests is in `policy.py`; it builds on
these rules (policy → cabin, never the reverse: the rules judge any answer, the policy's included).

Every function takes arbitrary token sequences (not only policy outputs), so the evaluator can run
model samples through the same rules.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from fnmatch import translate
from typing import Callable, Mapping, NamedTuple, Sequence

import numpy as np

from vlacabin_jax.data.actions import NOOP, SEATS, Setting, setting_paths, split_token

PATHS: dict[str, Setting] = setting_paths()

# The fixed constraint-tag vocabulary (order = position in the multi-hot `constraint_tags`).
CONSTRAINT_TAGS = (
    "night_quiet", "child_on_board", "driving",
    "privacy_low", "privacy_mid", "privacy_high",
    "deny_windows", "deny_video", "deny_fragrance", "deny_apps",
)
PRIVACY_TAGS = ("privacy_low", "privacy_mid", "privacy_high")
OCCUPANTS = ("empty", "adult", "child")  # a child always sits in a child seat
REAR_SEATS = ("rear_left", "rear_right")

NIGHT_VOLUME_CAP = 4  # night_quiet: media volume never above this
SLEEP_VOLUME_CAP = 3  # someone asleep: the volume is not raised above this
CHILD_WINDOW_MAX = ("closed", "open_30")  # window positions allowed next to a child seat
MAX_ACTIONS = 7  # the policy never emits more (tiny action_len 8 = 7 actions + <eos>)
DARK = 0.35  # cabin light level (0..1) below which the cabin counts as dark


@dataclasses.dataclass(frozen=True)
class CabinState:
    """Devices (every setting path of the action schema → its value) plus the environment.

    The device part is keyed by the action schema's paths, so the vocabulary and the state can
    never drift apart. Perceptual facts (who is a child, who is asleep, the cabin light level)
    are here for the generator and the evaluator; the model only sees them in frames and mel
    (`state_to_features` leaves them out on purpose).
    """

    devices: Mapping[str, str]
    cabin_temp: float = 24.0  # °C inside
    outside_temp: float = 20.0  # °C outside
    humidity: float = 50.0  # % relative, inside
    pm25: float = 30.0  # outside PM2.5, µg/m³
    hour: int = 12  # local time of day
    speed_kmh: float = 0.0  # > 0 means driving
    light: float = 0.8  # cabin light level 0 (dark) .. 1 (bright daylight), seen by the camera
    occupants: tuple[str, ...] = ("adult", "empty", "empty", "empty")  # per SEATS, in OCCUPANTS
    asleep: tuple[bool, ...] = (False, False, False, False)  # per SEATS
    speaker: str = "driver"  # seat of the person talking (microphone array)
    tags: tuple[str, ...] = ()  # active constraint tags

    def value(self, path: str) -> str:
        """Current value of one setting path."""
        return self.devices[path]

    def level(self, path: str) -> int:
        """Integer level of a numeric setting, else the index of the value in its Setting."""
        s, v = PATHS[path], self.devices[path]
        return int(v) if s.numeric else s.values.index(v)

    def occupant(self, seat: str) -> str:
        return self.occupants[SEATS.index(seat)]

    def is_asleep(self, seat: str) -> bool:
        return self.asleep[SEATS.index(seat)]

    @property
    def driving(self) -> bool:
        return self.speed_kmh > 0

    @property
    def dark(self) -> bool:
        return self.light < DARK

    def children(self) -> list[str]:
        return [s for s, o in zip(SEATS, self.occupants) if o == "child"]

    def sleepers(self) -> list[str]:
        return [s for s, a in zip(SEATS, self.asleep) if a]

    def replace(self, devices: Mapping[str, str] | None = None, **env) -> "CabinState":
        """A copy with some device values (merged) and/or environment fields replaced."""
        if devices:
            merged = dict(self.devices)
            merged.update(devices)
            env["devices"] = merged
        return dataclasses.replace(self, **env)

    def to_json(self) -> dict:
        """Plain-JSON dict (msgpack-friendly)."""
        d = {f.name: getattr(self, f.name) for f in _FIELDS}
        d["devices"] = dict(self.devices)
        d["occupants"], d["asleep"], d["tags"] = list(self.occupants), list(self.asleep), list(self.tags)
        return d

    @classmethod
    def from_json(cls, d: Mapping) -> "CabinState":
        d = dict(d)
        for k in ("occupants", "asleep", "tags"):
            d[k] = tuple(d[k])
        return cls(**d)


_FIELDS = dataclasses.fields(CabinState)
_DEFAULTS = {p: s.default for p, s in PATHS.items()}


def default_state(**env) -> CabinState:
    """A fresh cabin: every device at its schema default; environment fields from `env`."""
    return CabinState(devices=dict(_DEFAULTS), **env)


class Effect(NamedTuple):
    """What one token did: the path, its value before and after (all "" for `<noop>`)."""

    path: str
    before: str
    after: str

    @property
    def changed(self) -> bool:
        return self.before != self.after


def parse(token: str) -> tuple[str, str]:
    """Validate a device token against the schema → (path, value); ValueError if invalid."""
    path, value = split_token(token)
    s = PATHS.get(path)
    if s is None:
        raise ValueError(f"unknown setting path {path!r} in {token!r}")
    if value not in s.values:
        raise ValueError(f"{value!r} is not a value of {path!r} (allowed: {', '.join(s.values)})")
    return path, value


def apply(state: CabinState, token: str) -> tuple[CabinState, Effect]:
    """Execute one action token: set the setting's value (no hidden side effects, so every
    change a scene needs is a visible step). `<noop>` changes nothing."""
    if token == NOOP:
        return state, Effect("", "", "")
    path, value = parse(token)
    before = state.devices[path]
    if before == value:
        return state, Effect(path, before, value)
    return state.replace({path: value}), Effect(path, before, value)


# ---------------------------------------------------------------- guardrails
# Each guardrail looks at one token (path, value), the state before it, the device values after
# it, and the tags, and returns a reason when the token breaks it. Only tokens that touch the
# guarded setting are blamed, so an unrelated token in a state that is already bad is not reported.
Guardrail = Callable[[CabinState, Mapping[str, str], str, str, frozenset], "str | None"]


class _After(Mapping):
    """Device values after setting one path (a cheap view, no copy of the state)."""

    __slots__ = ("_d", "_p", "_v")

    def __init__(self, devices: Mapping[str, str], path: str, value: str):
        self._d, self._p, self._v = devices, path, value

    def __getitem__(self, key: str) -> str:
        return self._v if key == self._p else self._d[key]

    def __iter__(self):
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)


def _g_driver_screen(b, a, path, value, tags):
    if "driving" not in tags:
        return None
    if path == "screen.driver" and value in ("video", "meeting"):
        return f"{value} on the driver screen while driving"
    if path == "media.source" and value == "video" and a["screen.driver"] == "video":
        return "video on the driver screen while driving"
    return None


def _g_volume(b, a, path, value, tags):
    if path != "media.volume":
        return None
    v, old = int(value), b.level("media.volume")
    if "night_quiet" in tags and v > NIGHT_VOLUME_CAP and v >= old:
        return f"volume {v} above the night cap {NIGHT_VOLUME_CAP}"
    if b.sleepers() and v > SLEEP_VOLUME_CAP and v > old:
        return f"volume raised to {v} while a passenger sleeps (cap {SLEEP_VOLUME_CAP})"
    return None


def _g_child(b, a, path, value, tags):
    parts = path.split(".")
    seat = parts[1] if parts[0] in ("window", "seat") and len(parts) > 1 else None
    if seat is None or b.occupant(seat) != "child":
        return None
    if parts[0] == "window" and value not in CHILD_WINDOW_MAX:
        return f"window at the child seat ({seat}) opened beyond {CHILD_WINDOW_MAX[-1]}"
    if path.endswith(".massage") and value != "off":
        return f"massage on the child seat ({seat})"
    if path.endswith(".heat") and int(value) > 1:
        return f"seat heat {value} on the child seat ({seat}) (max 1)"
    return None


def _g_driver_seat(b, a, path, value, tags):
    if "driving" in tags and path == "seat.driver.position" and value != "upright":
        return "driver seat reclined while driving"
    return None


def _g_permissions(b, a, path, value, tags):
    if "deny_windows" in tags and path.startswith("window.") and value != "closed":
        return "opening windows is not permitted"
    if "deny_video" in tags and value == "video" and (path == "media.source" or path.startswith("screen.")):
        return "video is not permitted"
    if "deny_fragrance" in tags and path == "fragrance" and value != "off":
        return "fragrance is not permitted"
    if "deny_apps" in tags and path.startswith("app.") and value not in ("end", "stop", "off"):
        return "starting apps is not permitted"
    return None


def _g_privacy(b, a, path, value, tags):
    if path == "screen.rear" and value == "meeting" and tags & {"privacy_mid", "privacy_high"}:
        return "meeting on the shared rear screen at privacy mid/high"
    if "privacy_high" in tags:
        meeting = a["app.meeting"] == "start"
        if meeting and path.startswith("window.") and value != "closed":
            return "window opened during a meeting at privacy high"
        if path == "app.meeting" and value == "start" and any(
                a[f"window.{s}"] != "closed" for s in SEATS):
            return "meeting started with a window open at privacy high"
    return None


GUARDRAILS: dict[str, Guardrail] = {
    "driver_screen_while_driving": _g_driver_screen,
    "volume_cap": _g_volume,
    "child_safety": _g_child,
    "driver_seat_upright": _g_driver_seat,
    "permission": _g_permissions,
    "privacy": _g_privacy,
}


def violations(state: CabinState, token: str, tags: Sequence[str] | None = None) -> list[str]:
    """Guardrails broken by executing `token` in `state`, as "<guardrail>: <reason>" strings.

    Args:
      state: the cabin before the token.
      token: any device token or `<noop>`.
      tags: constraint tags in force; None uses `state.tags`.
    """
    if token == NOOP:
        return []
    tagset = frozenset(state.tags if tags is None else tags)
    path, value = parse(token)
    after = _After(state.devices, path, value)
    out = []
    for name, rule in GUARDRAILS.items():
        reason = rule(state, after, path, value, tagset)
        if reason:
            out.append(f"{name}: {reason}")
    return out


def state_violations(state: CabinState, tags: Sequence[str] | None = None) -> list[str]:
    """Guardrails the current device values break, as "<path>=<value>: <reason>" (each value
    judged as if just set; schema defaults never break a guardrail, so only the others are
    checked)."""
    out = []
    for path, value in state.devices.items():
        if value != _DEFAULTS[path]:
            out += [f"{path}={value}: {v}" for v in violations(state, f"{path}={value}", tags)]
    return out


# ---------------------------------------------------------------- conflicts and order
def _expand_seats(rules):
    """Rules written with `{s}` hold per seat: expand them to one rule per seat."""
    out = []
    for a, b, why in rules:
        out += [(a.format(s=s), b.format(s=s), why) for s in SEATS] if "{s}" in a else [(a, b, why)]
    return tuple(out)


# Pairs of token patterns (fnmatch) that contradict each other in one turn.
CONFLICT_RULES = _expand_seats((
    ("climate.defog=on", "climate.recirc=on", "defogging needs outside air"),
    ("app.meeting=start", "media.play=play", "music playing into a meeting"),
    ("app.meeting=start", "screen.*=video", "video and a meeting at once"),
    ("window.*=open_*", "purifier=max", "purifying with a window open"),
    ("seat.{s}.heat=[123]", "seat.{s}.vent=[123]", "heating and ventilating one seat"),
))

# (before, after, why): when both occur in one turn, `before` must come first.
ORDER_RULES = _expand_seats((
    ("media.source=*", "media.play=play", "choose the source before playing"),
    ("media.volume=*", "media.play=play", "set the volume before playing"),
    ("screen.*=video", "media.source=video", "route video to a screen before starting it"),
    ("sunshade.*=closed", "media.play=play", "darken the cabin before the show starts"),
    ("media.play=pause", "app.meeting=start", "mute media before the meeting starts"),
    ("window.*=closed", "app.meeting=start", "close windows before the meeting starts"),
    ("screen.*=meeting", "app.meeting=start", "route the screen before the meeting starts"),
    ("window.*=closed", "climate.recirc=on", "close windows before recirculating"),
    ("window.*=closed", "purifier=[am]*", "close windows before purifying"),
    ("climate.recirc=on", "purifier=[am]*", "recirculate before purifying"),
    ("seat.{s}.vent=0", "seat.{s}.heat=[123]", "stop ventilation before heating"),
    ("seat.{s}.heat=0", "seat.{s}.vent=[123]", "stop heating before ventilating"),
))


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    return re.compile(translate(pattern))


@functools.lru_cache(maxsize=4096)
def _matches(token: str, patterns: tuple[str, ...]) -> frozenset[int]:
    return frozenset(i for i, p in enumerate(patterns) if _regex(p).match(token))


def conflicts(tokens: Sequence[str]) -> list[tuple[int, int, str]]:
    """Contradicting pairs (i, j, why), i < j: one path set twice, or a `CONFLICT_RULES` pair."""
    out = []
    a_pats = tuple(r[0] for r in CONFLICT_RULES)
    b_pats = tuple(r[1] for r in CONFLICT_RULES)
    paths = [split_token(t)[0] if t != NOOP else None for t in tokens]
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            if paths[i] is not None and paths[i] == paths[j]:
                out.append((i, j, f"{paths[i]} set twice in one turn"))
                continue
            ai, bi = _matches(tokens[i], a_pats), _matches(tokens[i], b_pats)
            aj, bj = _matches(tokens[j], a_pats), _matches(tokens[j], b_pats)
            hit = (ai & bj) | (bi & aj)
            if hit:
                out.append((i, j, CONFLICT_RULES[min(hit)][2]))
    return out


def inversions(tokens: Sequence[str]) -> list[tuple[int, int, str]]:
    """Order violations (i, j, why), i < j: token j should have come before token i."""
    before = tuple(r[0] for r in ORDER_RULES)
    after = tuple(r[1] for r in ORDER_RULES)
    out = []
    for i in range(len(tokens)):
        ai = _matches(tokens[i], after)
        if not ai:
            continue
        for j in range(i + 1, len(tokens)):
            hit = ai & _matches(tokens[j], before)
            if hit:
                out.append((i, j, ORDER_RULES[min(hit)][2]))
    return out


# ---------------------------------------------------------------- scenes
@dataclasses.dataclass(frozen=True)
class Scene:
    """A scene mode: its steps in execution order and the tokens that signal it was triggered."""

    name: str
    steps: tuple[str, ...]
    signature: tuple[str, ...]  # token patterns that all appear when the scene runs fully


SCENES: dict[str, Scene] = {s.name: s for s in (
    Scene("cinema", ("shade_roof", "shade_rear", "dim_lights", "route_screen", "video_source",
                     "volume", "play"), ("media.source=video", "light.ambient.brightness=1")),
    Scene("meeting", ("pause_media", "close_windows", "route_screen", "quiet_fan", "start_app"),
          ("app.meeting=start",)),
    Scene("nap", ("recline", "shade_roof", "lights_off", "white_noise", "volume", "play", "alarm"),
          ("media.source=white_noise", "light.ambient.brightness=0")),
    Scene("welcome", ("temperature", "fan", "seat_comfort", "light_color", "light_level", "fragrance"),
          ("light.ambient.color=warm",)),
    Scene("purify", ("close_windows", "recirc_on", "purifier", "fan"), ("purifier=[am]*",)),
    Scene("relax", ("light_color", "light_level", "massage", "fragrance", "source", "volume", "play"),
          ("light.ambient.color=blue", "seat.*.massage=gentle")),
    Scene("ventilate", ("open_windows", "recirc_off", "purifier_off", "fan"), ("climate.recirc=off",)),
    Scene("defog", ("defog", "mode", "recirc_off", "fan"), ("climate.defog=on",)),
)}


def set_token(state: CabinState, path: str, value) -> list[str]:
    """[token] when the setting is not already at `value` (a satisfied step emits nothing)."""
    value = str(value)
    return [] if state.devices[path] == value else [f"{path}={value}"]


def volume_cap(state: CabinState, tags: Sequence[str]) -> int:
    """The highest volume the guardrails allow now."""
    cap = 10
    if "night_quiet" in tags:
        cap = min(cap, NIGHT_VOLUME_CAP)
    if state.sleepers():
        cap = min(cap, max(SLEEP_VOLUME_CAP, state.level("media.volume")))
    return cap


def close_open_windows(state: CabinState) -> list[str]:
    return [f"window.{s}=closed" for s in SEATS if state.value(f"window.{s}") != "closed"]


def scene_steps(name: str, state: CabinState, tags: Sequence[str] | None = None
                ) -> tuple[list[tuple[str, list[str]]], str | None]:
    """The steps scene `name` needs in this cabin, in order, with the tokens of each.

    Returns:
      ([(step, tokens)], decline): tokens are [] where the step already holds or a guardrail or
      permission rules it out; `decline` names why the whole scene cannot run (steps then []).
    """
    tags = frozenset(state.tags if tags is None else tags)
    spk, driving = state.speaker, "driving" in tags
    night = "night_quiet" in tags
    st: list[tuple[str, list[str]]] = []
    if name == "cinema":
        rear = [s for s in REAR_SEATS if state.occupant(s) != "empty"]
        if "deny_video" in tags:
            return [], "deny_video"
        if driving and not rear:
            return [], "no_video_driving"
        screen = "screen.rear" if driving else "screen.driver"
        st = [("shade_roof", set_token(state, "sunshade.roof", "closed")),
              ("shade_rear", set_token(state, "sunshade.rear", "closed")),
              ("dim_lights", set_token(state, "light.ambient.brightness", 1)),
              ("route_screen", set_token(state, screen, "video")),
              ("video_source", set_token(state, "media.source", "video")),
              ("volume", set_token(state, "media.volume", min(6, volume_cap(state, tags)))),
              ("play", set_token(state, "media.play", "play"))]
    elif name == "meeting":
        if "deny_apps" in tags:
            return [], "deny_apps"
        st = [("pause_media", set_token(state, "media.play", "pause")),
              ("close_windows", close_open_windows(state)),
              ("route_screen", [] if driving else set_token(state, "screen.driver", "meeting")),
              ("quiet_fan", set_token(state, "climate.fan", 2) if state.level("climate.fan") > 2 else []),
              ("start_app", set_token(state, "app.meeting", "start"))]
    elif name == "nap":
        if driving and spk == "driver":
            return [], "no_nap_driving"
        st = [("recline", set_token(state, f"seat.{spk}.position", "recline")),
              ("shade_roof", set_token(state, "sunshade.roof", "closed")),
              ("lights_off", set_token(state, "light.ambient.brightness", 0)),
              ("white_noise", set_token(state, "media.source", "white_noise")),
              ("volume", set_token(state, "media.volume", 2)),
              ("play", set_token(state, "media.play", "play")),
              ("alarm", [] if "deny_apps" in tags else set_token(state, "app.alarm", "20min"))]
    elif name == "welcome":
        cold, hot = state.outside_temp < 10, state.outside_temp > 28
        seat = []
        if cold:
            seat = set_token(state, f"seat.{spk}.vent", 0) + set_token(state, f"seat.{spk}.heat", 2)
        elif hot:
            seat = set_token(state, f"seat.{spk}.heat", 0) + set_token(state, f"seat.{spk}.vent", 2)
        st = [("temperature", set_token(state, "climate.temp", 24 if cold else 20 if hot else 22)),
              ("fan", set_token(state, "climate.fan", 3)),
              ("seat_comfort", seat),
              ("light_color", set_token(state, "light.ambient.color", "warm")),
              # The camera decides the level: a dark cabin gets a soft glow, daylight a bright one.
              ("light_level", set_token(state, "light.ambient.brightness", 2 if state.dark else 4)),
              ("fragrance", [] if "deny_fragrance" in tags else set_token(state, "fragrance", "citrus"))]
    elif name == "purify":
        quiet = night or bool(state.sleepers())
        st = [("close_windows", close_open_windows(state)),
              ("recirc_on", set_token(state, "climate.recirc", "on")),
              ("purifier", set_token(state, "purifier", "auto" if quiet else "max")),
              ("fan", set_token(state, "climate.fan", 3 if quiet else 5))]
    elif name == "relax":
        st = [("light_color", set_token(state, "light.ambient.color", "blue")),
              ("light_level", set_token(state, "light.ambient.brightness", 2)),
              ("massage", set_token(state, f"seat.{spk}.massage", "gentle")),
              ("fragrance", [] if "deny_fragrance" in tags else set_token(state, "fragrance", "lavender")),
              ("source", set_token(state, "media.source", "music")),
              ("volume", set_token(state, "media.volume", min(3, volume_cap(state, tags)))),
              ("play", set_token(state, "media.play", "play"))]
    elif name == "ventilate":
        if state.pm25 > 100:
            return [], "polluted_outside"
        private = "privacy_high" in tags and state.value("app.meeting") == "start"
        win = [] if ("deny_windows" in tags or private) else set_token(state, f"window.{spk}", "open_30")
        st = [("open_windows", win),
              ("recirc_off", set_token(state, "climate.recirc", "off")),
              ("purifier_off", set_token(state, "purifier", "off")),
              ("fan", set_token(state, "climate.fan", 4) if state.level("climate.fan") < 4 else [])]
    elif name == "defog":
        st = [("defog", set_token(state, "climate.defog", "on")),
              ("mode", set_token(state, "climate.mode", "windshield")),
              ("recirc_off", set_token(state, "climate.recirc", "off")),
              ("fan", set_token(state, "climate.fan", 5) if state.level("climate.fan") < 5 else [])]
    else:
        raise KeyError(f"unknown scene {name!r}; scenes: {', '.join(SCENES)}")
    return st, None


def detect_scenes(tokens: Sequence[str]) -> list[str]:
    """Scenes whose whole signature appears in `tokens` (for the scene-mode hit rate)."""
    found = []
    for s in SCENES.values():
        pats = s.signature
        if all(any(_regex(p).match(t) for t in tokens) for p in pats):
            found.append(s.name)
    return found


# ---------------------------------------------------------------- executing sequences
@dataclasses.dataclass
class Execution:
    """Result of running a token sequence through the rules."""

    state: CabinState  # the cabin after the last token
    effects: list[Effect]
    violations: list[tuple[int, str]]  # (position, "<guardrail>: <reason>")
    conflicts: list[tuple[int, int, str]]
    inversions: list[tuple[int, int, str]]

    @property
    def ok(self) -> bool:
        return not (self.violations or self.conflicts or self.inversions)


def execute(state: CabinState, tokens: Sequence[str], tags: Sequence[str] | None = None) -> Execution:
    """Run a turn's action tokens in order, checking guardrails token by token.

    Args:
      state: the cabin before the turn.
      tokens: device tokens or ["<noop>"] (already decoded; specials other than <noop> raise).
      tags: constraint tags in force; None uses `state.tags`.
    """
    tags = state.tags if tags is None else tuple(tags)
    effects, bad = [], []
    for i, t in enumerate(tokens):
        bad += [(i, v) for v in violations(state, t, tags)]
        state, eff = apply(state, t)
        effects.append(eff)
    return Execution(state, effects, bad, conflicts(tokens), inversions(tokens))


def check(state: CabinState, tokens: Sequence[str], reference: Sequence[str] | None = None,
          tags: Sequence[str] | None = None) -> list[str]:
    """Everything wrong with `tokens` as an answer in `state`, as readable issue strings.

    Issues: guardrail violations, conflicts, inversions, and against a reference answer: steps
    it misses ("missing: tok"), and any action where the reference does nothing ("over_trigger").
    An empty list means the answer is acceptable.
    """
    ex = execute(state, tokens, tags)
    issues = [f"violation@{i}: {v}" for i, v in ex.violations]
    issues += [f"conflict@{i},{j}: {why}" for i, j, why in ex.conflicts]
    issues += [f"inversion@{i},{j}: {why}" for i, j, why in ex.inversions]
    if reference is not None:
        if list(reference) == [NOOP] and list(tokens) != [NOOP]:
            issues.append("over_trigger: acted where nothing should happen")
        issues += [f"missing: {t}" for t in reference if t != NOOP and t not in tokens]
    return issues


# ---------------------------------------------------------------- model features
_NUMERIC_PATHS = tuple(p for p, s in PATHS.items() if s.numeric)
_CATEGORICAL_PATHS = tuple(p for p, s in PATHS.items() if not s.numeric)
_ENV_NUMERIC = ("cabin_temp", "outside_temp", "humidity", "pm25", "hour_sin", "hour_cos", "speed")
STATE_NUMERIC_FIELDS: tuple[str, ...] = _NUMERIC_PATHS + _ENV_NUMERIC
# Seat sensors see whether a seat is taken, not by whom (child or adult is for the camera).
STATE_CATEGORICAL_FIELDS: tuple[tuple[str, int], ...] = (
    tuple((p, len(PATHS[p].values)) for p in _CATEGORICAL_PATHS)
    + tuple((f"occupied.{s}", 2) for s in SEATS) + (("speaker", len(SEATS)),))
_VALUE_INDEX = {p: {v: i for i, v in enumerate(PATHS[p].values)} for p in _CATEGORICAL_PATHS}
_NUM_RANGE = {p: (int(PATHS[p].values[0]), int(PATHS[p].values[-1])) for p in _NUMERIC_PATHS}


def state_to_features(state: CabinState) -> tuple[np.ndarray, np.ndarray]:
    """The model's view of the cabin state.

    Returns:
      numeric: float32[len(STATE_NUMERIC_FIELDS)], each roughly in [-1, 1].
      categorical: int32[len(STATE_CATEGORICAL_FIELDS)], ids < the field's cardinality.
    """
    d = state.devices
    num = [(int(d[p]) - lo) / (hi - lo) for p, (lo, hi) in _NUM_RANGE.items()]
    ang = 2 * math.pi * state.hour / 24
    num += [(state.cabin_temp - 22) / 20, (state.outside_temp - 15) / 20, state.humidity / 100 - 0.5,
            math.log1p(state.pm25) / 6 - 0.5, math.sin(ang), math.cos(ang), state.speed_kmh / 120]
    cat = [_VALUE_INDEX[p][d[p]] for p in _CATEGORICAL_PATHS]
    cat += [int(o != "empty") for o in state.occupants] + [SEATS.index(state.speaker)]
    return np.asarray(num, np.float32), np.asarray(cat, np.int32)


def state_from_features(numeric: np.ndarray, categorical: np.ndarray, tags: Sequence[str],
                        children: Sequence[bool], asleep: Sequence[bool], dark: bool) -> CabinState:
    """The inverse of `state_to_features`, completed by what only the camera sees.

    Args:
      numeric: float32[len(STATE_NUMERIC_FIELDS)] as `state_to_features` makes it.
      categorical: int[len(STATE_CATEGORICAL_FIELDS)] likewise (device values, seat occupancy,
        speaker).
      tags: the active constraint tags.
      children, asleep: per SEATS, whether the camera shows a child seat / a sleeper there (an
        occupied seat without a child holds an adult).
      dark: whether the camera sees a dark cabin.
    Returns:
      the cabin: device levels exactly; temperatures, humidity, PM2.5 and speed to 0.1 (the
      world's resolution; the float32 features hold them to ~1e-5); the hour from its angle; the
      light level only on the right side of `DARK` (nothing but `dark` depends on it).
    Raises:
      ValueError: a sleeper or a child on an empty seat, or widths that are not the schema's.
    """
    num = [float(x) for x in numeric]
    cat = [int(x) for x in categorical]
    if len(num) != len(STATE_NUMERIC_FIELDS) or len(cat) != len(STATE_CATEGORICAL_FIELDS):
        raise ValueError(f"state features of width {len(num)}/{len(cat)}, the schema has "
                         f"{len(STATE_NUMERIC_FIELDS)}/{len(STATE_CATEGORICAL_FIELDS)}")
    devices = {p: str(round(x * (hi - lo) + lo)) for (p, (lo, hi)), x in zip(_NUM_RANGE.items(), num)}
    devices.update({p: PATHS[p].values[i] for p, i in zip(_CATEGORICAL_PATHS, cat)})
    cabin_t, outside_t, humidity, pm25, hour_sin, hour_cos, speed = num[len(_NUM_RANGE):]
    occupied = cat[len(_CATEGORICAL_PATHS):len(_CATEGORICAL_PATHS) + len(SEATS)]
    occupants = tuple("child" if c else "adult" if o else "empty" for o, c in zip(occupied, children))
    if any(o == "empty" and (c or a) for o, c, a in zip(occupants, children, asleep)):
        raise ValueError(f"a child or a sleeper on an empty seat: occupied {occupied}, "
                         f"children {list(children)}, asleep {list(asleep)}")
    hour = round(math.atan2(hour_sin, hour_cos) * 24 / (2 * math.pi)) % 24
    return CabinState(
        devices=devices, cabin_temp=round(cabin_t * 20 + 22, 1), outside_temp=round(outside_t * 20 + 15, 1),
        humidity=round((humidity + 0.5) * 100, 1), pm25=round(math.expm1((pm25 + 0.5) * 6), 1), hour=int(hour),
        speed_kmh=round(speed * 120, 1), light=DARK / 2 if dark else (1 + DARK) / 2, occupants=occupants,
        asleep=tuple(bool(a) for a in asleep), speaker=SEATS[cat[-1]],
        tags=tuple(t for t in CONSTRAINT_TAGS if t in set(tags)))

