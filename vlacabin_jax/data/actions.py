"""Cabin action vocabulary: a typed device schema turned into a stable, versioned token vocabulary.

A token names one setting of one device and the value to set, `<path>=<value>`, where the path is
`device[.position][.setting]`: `climate.temp=22`, `seat.driver.heat=2`, `window.rear_left=open_30`,
`app.meeting=start`. Ids: `<pad>`=0, `<eos>`=1, `<noop>`=2, then every setting path in sorted
order with its values in their declared (natural) order. Changing the schema changes ids, so the
vocabulary carries a SemVer `VERSION` and is saved (as JSON) with every checkpoint.

A sequence is the actions of one turn followed by `<eos>` and right-padded with `<pad>`. A turn
that does nothing is exactly `[<noop>]`. Anything else is rejected with `InvalidActionSequence`,
never guessed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Sequence

VERSION = "1.0.0"

PAD, EOS, NOOP = "<pad>", "<eos>", "<noop>"
SPECIAL_TOKENS = (PAD, EOS, NOOP)
PAD_ID, EOS_ID, NOOP_ID = 0, 1, 2

SEATS = ("driver", "passenger", "rear_left", "rear_right")
SCREENS = ("driver", "rear")
SUNSHADES = ("roof", "rear")
_JSON_FORMAT = "vlacabin.action_vocabulary"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One settable property of a device.

    name: "" when the device has a single unnamed setting (`window.rear_left=open_30`).
    values: every allowed value, in natural order (levels ascending).
    default: the value of a fresh cabin.
    numeric: the values are integer levels (they become numeric state features).
    """

    name: str
    values: tuple[str, ...]
    default: str
    numeric: bool = False


@dataclasses.dataclass(frozen=True)
class Device:
    """A cabin device: its settings, optionally repeated per position (seat, window, ...)."""

    name: str
    group: str  # climate | seats | lights | media | screens | windows | fragrance | apps
    settings: tuple[Setting, ...]
    positions: tuple[str, ...] = ()

    def paths(self) -> list[tuple[str, Setting]]:
        """(path, setting) for every position × setting, e.g. ("seat.driver.heat", Setting)."""
        out = []
        for pos in self.positions or ("",):
            for s in self.settings:
                out.append((".".join(p for p in (self.name, pos, s.name) if p), s))
        return out


def _levels(lo: int, hi: int, default: int) -> Setting:
    return Setting("", tuple(str(v) for v in range(lo, hi + 1)), str(default), numeric=True)


def _named(name: str, s: Setting) -> Setting:
    return dataclasses.replace(s, name=name)


SCHEMA: tuple[Device, ...] = (
    Device("climate", "climate", (
        _named("temp", _levels(16, 28, 22)),
        _named("fan", _levels(0, 7, 2)),
        Setting("mode", ("auto", "face", "feet", "face_feet", "windshield"), "auto"),
        Setting("defog", ("off", "on"), "off"),
        Setting("recirc", ("off", "on"), "off"),
    )),
    Device("seat", "seats", (
        _named("heat", _levels(0, 3, 0)),
        _named("vent", _levels(0, 3, 0)),
        Setting("massage", ("off", "gentle", "wave", "deep"), "off"),
        Setting("position", ("upright", "relax", "recline"), "upright"),
    ), SEATS),
    Device("light.ambient", "lights", (
        Setting("color", ("warm", "white", "blue", "purple", "green", "red"), "warm"),
        _named("brightness", _levels(0, 5, 3)),
    )),
    Device("light.reading", "lights", (Setting("", ("off", "on"), "off"),), SEATS),
    Device("media", "media", (
        Setting("source", ("radio", "music", "podcast", "bluetooth", "video", "white_noise"), "music"),
        _named("volume", _levels(0, 10, 4)),
        Setting("play", ("pause", "play"), "pause"),
    )),
    Device("screen", "screens", (Setting("", ("off", "nav", "media", "meeting", "video"), "off"),),
           SCREENS),
    Device("window", "windows", (Setting("", ("closed", "open_30", "open_60", "open_100"), "closed"),),
           SEATS),
    Device("sunshade", "windows", (Setting("", ("open", "half", "closed"), "open"),), SUNSHADES),
    Device("fragrance", "fragrance", (Setting("", ("off", "citrus", "forest", "ocean", "lavender"), "off"),)),
    Device("purifier", "climate", (Setting("", ("off", "auto", "max"), "off"),)),
    Device("app.meeting", "apps", (Setting("", ("end", "start"), "end"),)),
    Device("app.navigation", "apps", (Setting("", ("stop", "home", "office", "charger"), "stop"),)),
    Device("app.alarm", "apps", (Setting("", ("off", "20min", "40min"), "off"),)),
)


def setting_paths(schema: Sequence[Device] = SCHEMA) -> dict[str, Setting]:
    """Every setting path of the schema in sorted order → its Setting."""
    out = {}
    for dev in schema:
        for path, s in dev.paths():
            if path in out:
                raise ValueError(f"duplicate setting path {path!r} in the action schema")
            out[path] = s
    return dict(sorted(out.items()))


def split_token(token: str) -> tuple[str, str]:
    """`"seat.driver.heat=2"` → `("seat.driver.heat", "2")`; raises ValueError if there is no `=`."""
    path, sep, value = token.partition("=")
    if not sep:
        raise ValueError(f"{token!r} is not an action token (expected '<path>=<value>')")
    return path, value


def build_tokens(schema: Sequence[Device] = SCHEMA) -> tuple[str, ...]:
    """The token list (index = id): specials, then sorted paths × values in declared order."""
    tokens = list(SPECIAL_TOKENS)
    for path, s in setting_paths(schema).items():
        tokens.extend(f"{path}={v}" for v in s.values)
    return tuple(tokens)


class InvalidActionSequence(ValueError):
    """An action sequence that is not well formed; `position` is the offending index."""

    def __init__(self, position: int, reason: str):
        super().__init__(f"invalid action sequence at position {position}: {reason}")
        self.position = position
        self.reason = reason


class ActionVocabulary:
    """Bidirectional map between action tokens and ids, with validation.

    Args:
      tokens: the token list (index = id); None builds it from `SCHEMA` (the current version).
      version: SemVer of the vocabulary these tokens belong to.
    """

    VERSION = VERSION

    def __init__(self, tokens: Sequence[str] | None = None, version: str = VERSION):
        tokens = tuple(build_tokens() if tokens is None else tokens)
        if tokens[:3] != SPECIAL_TOKENS:
            raise ValueError(f"the first tokens must be {SPECIAL_TOKENS}, got {tokens[:3]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("duplicate tokens in the action vocabulary")
        for t in tokens[3:]:
            split_token(t)
        self.tokens = tokens
        self.version = version
        self._ids = {t: i for i, t in enumerate(tokens)}

    @property
    def size(self) -> int:
        """Number of tokens, specials included (the DNFM codebook size)."""
        return len(self.tokens)

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ActionVocabulary) and self.tokens == other.tokens
                and self.version == other.version)

    def __hash__(self) -> int:
        return hash((self.tokens, self.version))

    def __contains__(self, token: str) -> bool:
        return token in self._ids

    def token_id(self, token: str) -> int:
        """Id of one token; KeyError if unknown."""
        return self._ids[token]

    def encode(self, tokens: Sequence[str], add_eos: bool = True) -> list[int]:
        """Action tokens of one turn → ids (+ `<eos>`).

        Args:
          tokens: e.g. ["climate.temp=21", "climate.fan=3"], or ["<noop>"].
          add_eos: append the `<eos>` id.
        Raises:
          InvalidActionSequence: empty, unknown token, `<pad>`/`<eos>` inside, `<noop>` not alone.
        """
        if len(tokens) == 0:
            raise InvalidActionSequence(0, "empty sequence (a turn that does nothing is ['<noop>'])")
        ids = []
        for i, t in enumerate(tokens):
            idx = self._ids.get(t)
            if idx is None:
                raise InvalidActionSequence(i, f"unknown action token {t!r}")
            if idx in (PAD_ID, EOS_ID):
                raise InvalidActionSequence(i, f"{t} may not appear inside a sequence")
            if idx == NOOP_ID and len(tokens) != 1:
                raise InvalidActionSequence(i, "<noop> must be the only action of its turn")
            ids.append(idx)
        return ids + [EOS_ID] if add_eos else ids

    def decode(self, ids: Sequence[int], require_eos: bool = True) -> list[str]:
        """Ids (actions, `<eos>`, `<pad>`...) → action tokens, validating the whole sequence.

        Args:
          ids: one sequence, e.g. a row of `action_tokens` or of sampled ids.
          require_eos: a sequence without `<eos>` is an error (it was cut or never ended).
        Raises:
          InvalidActionSequence: unknown id, `<pad>` before `<eos>`, nothing before `<eos>`,
            `<noop>` with other actions, anything but `<pad>` after `<eos>`, missing `<eos>`.
        """
        out: list[str] = []
        end = None
        for i, raw in enumerate(ids):
            idx = int(raw)
            if not 0 <= idx < len(self.tokens):
                raise InvalidActionSequence(i, f"unknown action id {idx} (vocabulary size {self.size})")
            if end is not None:
                if idx != PAD_ID:
                    raise InvalidActionSequence(i, f"{self.tokens[idx]!r} after <eos> (only <pad> may follow)")
                continue
            if idx == EOS_ID:
                if not out:
                    raise InvalidActionSequence(i, "<eos> before any action (use <noop> for no action)")
                end = i
            elif idx == PAD_ID:
                raise InvalidActionSequence(i, "<pad> before <eos>")
            else:
                if (idx == NOOP_ID and out) or (out and out[0] == NOOP):
                    raise InvalidActionSequence(i, "<noop> must be the only action of its turn")
                out.append(self.tokens[idx])
        if end is None:
            if require_eos:
                raise InvalidActionSequence(len(ids), "missing <eos>")
            if not out:
                raise InvalidActionSequence(0, "empty sequence")
        return out

    def to_json(self) -> str:
        """JSON text to save with a checkpoint (format tag, version, token list)."""
        return json.dumps({"format": _JSON_FORMAT, "version": self.version, "tokens": list(self.tokens)},
                          ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "ActionVocabulary":
        """Inverse of `to_json`; the saved token list is used as is (old checkpoints keep their ids)."""
        obj = json.loads(text)
        if not isinstance(obj, dict) or obj.get("format") != _JSON_FORMAT:
            raise ValueError(f"not an action vocabulary (format must be {_JSON_FORMAT!r})")
        return cls(obj["tokens"], version=obj["version"])

    def compatible_with(self, other: "ActionVocabulary") -> bool:
        """Same ids for the same tokens (what a restored checkpoint needs)."""
        return self.tokens == other.tokens
