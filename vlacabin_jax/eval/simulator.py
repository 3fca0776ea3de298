"""The cabin simulator: run one turn's action tokens on a cabin state and report what happened.

A thin layer over `vlacabin_jax.data.cabin`, the one rule set the synthetic world also uses to
make its targets: `cabin.execute` applies the tokens and checks the guardrails token by token,
`cabin.conflicts` / `cabin.inversions` judge the sequence. Nothing here decides what is allowed;
this module only validates the sequence's form, runs the rules and lays the result out per step.

A malformed sequence (unknown token, `<noop>` mixed with actions, `<pad>`/`<eos>` inside, nothing
at all) is rejected as a whole, as the cabin executor would reject it: nothing is executed, the
final state is the initial one, and `error` says why. Invalid sequences are reported, not guessed.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

from vlacabin_jax.data import cabin
from vlacabin_jax.data.actions import (EOS_ID, NOOP, PAD_ID, ActionVocabulary, InvalidActionSequence)
from vlacabin_jax.data.cabin import CabinState


@functools.lru_cache(maxsize=1)
def schema_vocabulary() -> ActionVocabulary:
    """The vocabulary of the current action schema (what the cabin rules accept)."""
    return ActionVocabulary()


@dataclasses.dataclass(frozen=True)
class Step:
    """One executed token: what it set, from what to what, and the guardrails it broke."""

    index: int
    token: str
    path: str  # "" for <noop>
    before: str
    after: str
    violations: tuple[str, ...]  # "<guardrail>: <reason>"

    @property
    def changed(self) -> bool:
        return self.before != self.after

    @property
    def noop(self) -> bool:
        """The step changed nothing: an explicit `<noop>`, or a setting already at that value."""
        return not self.changed


@dataclasses.dataclass(frozen=True)
class SimulationReport:
    """Everything one turn did to the cabin.

    initial / final: the cabin before and after (final is initial when the sequence was rejected).
    steps: one `Step` per token, in order (empty when rejected).
    violations: (position, "<guardrail>: <reason>") over all steps.
    conflicts / inversions: (i, j, why) pairs of positions, from `cabin.conflicts` / `cabin.inversions`.
    error: why the sequence was rejected as malformed, else None.
    """

    initial: CabinState
    final: CabinState
    tokens: tuple[str, ...]
    steps: tuple[Step, ...]
    violations: tuple[tuple[int, str], ...]
    conflicts: tuple[tuple[int, int, str], ...]
    inversions: tuple[tuple[int, int, str], ...]
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def ok(self) -> bool:
        """Well formed, and no guardrail violation, conflict or inversion."""
        return self.valid and not (self.violations or self.conflicts or self.inversions)

    @property
    def noops(self) -> tuple[int, ...]:
        """Positions of steps that changed nothing (`<noop>` or a value already set)."""
        return tuple(s.index for s in self.steps if s.noop)

    @property
    def n_actions(self) -> int:
        """Device tokens executed (`<noop>` counts 0; a rejected sequence counts 0)."""
        return sum(1 for s in self.steps if s.token != NOOP)

    def changes(self) -> dict[str, tuple[str, str]]:
        """Net change of the turn: {path: (initial value, final value)} where they differ."""
        a, b = self.initial.devices, self.final.devices
        return {p: (a[p], b[p]) for p in a if a[p] != b[p]}

    def summary(self) -> str:
        """Human-readable, one line per step then the sequence-level findings."""
        if self.error:
            return f"rejected {list(self.tokens)}: {self.error}"
        lines = []
        for s in self.steps:
            what = "<noop>" if s.token == NOOP else f"{s.path}: {s.before} -> {s.after}"
            flags = ([] if s.changed else ["no-op"]) + list(s.violations)
            lines.append(f"[{s.index}] {what}" + (f"  ({'; '.join(flags)})" if flags else ""))
        lines += [f"conflict [{i}]x[{j}]: {why}" for i, j, why in self.conflicts]
        lines += [f"inversion [{i}]<-[{j}]: {why}" for i, j, why in self.inversions]
        return "\n".join(lines)

    def to_json(self) -> dict:
        """Plain-JSON dict (states as `CabinState.to_json`)."""
        return {"tokens": list(self.tokens), "error": self.error,
                "initial": self.initial.to_json(), "final": self.final.to_json(),
                "steps": [dict(dataclasses.asdict(s), changed=s.changed, violations=list(s.violations))
                          for s in self.steps],
                "violations": [list(v) for v in self.violations],
                "conflicts": [list(c) for c in self.conflicts],
                "inversions": [list(c) for c in self.inversions], "noops": list(self.noops)}


def validate(tokens: Sequence[str]) -> str | None:
    """Why `tokens` is not a well-formed turn (the vocabulary's own rules), or None."""
    try:
        schema_vocabulary().encode(list(tokens), add_eos=False)
    except InvalidActionSequence as e:
        return str(e)
    return None


def simulate(state: CabinState, tokens: Sequence[str], tags: Sequence[str] | None = None) -> SimulationReport:
    """Execute one turn's action tokens on `state`, step by step, under the cabin rules.

    Args:
      state: the cabin before the turn.
      tokens: decoded action tokens, e.g. ["climate.temp=21", "climate.fan=3"] or ["<noop>"].
      tags: constraint tags in force; None uses `state.tags`.
    Returns:
      The `SimulationReport`; a malformed sequence yields `error` and executes nothing.
    """
    tokens = tuple(tokens)
    error = validate(tokens)
    if error is not None:
        return SimulationReport(state, state, tokens, (), (), (), (), error)
    ex = cabin.execute(state, tokens, tags)
    per_step: dict[int, list[str]] = {}
    for i, v in ex.violations:
        per_step.setdefault(i, []).append(v)
    steps = tuple(Step(i, t, e.path, e.before, e.after, tuple(per_step.get(i, ())))
                  for i, (t, e) in enumerate(zip(tokens, ex.effects)))
    return SimulationReport(state, ex.state, tokens, steps, tuple(ex.violations), tuple(ex.conflicts),
                            tuple(ex.inversions))


def decode(ids: Sequence[int], vocab: ActionVocabulary | None = None) -> tuple[list[str], str | None]:
    """A row of model action ids → (tokens, error).

    Strict `vocab.decode` first; when it rejects the row, `error` says why and `tokens` is a
    best-effort reading for display only (the ids before the first `<eos>`, `<pad>` dropped).
    """
    vocab = vocab or schema_vocabulary()
    try:
        return vocab.decode([int(i) for i in ids]), None
    except InvalidActionSequence as e:
        shown = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i != PAD_ID:
                shown.append(vocab.tokens[i] if 0 <= i < vocab.size else f"<unk:{i}>")
        return shown, str(e)


def sample_state(sample: dict) -> CabinState:
    """The cabin of a VLA sample (the state before its turn, tags included)."""
    return CabinState.from_json(sample["state"])
