"""Collective ops of a compiled (SPMD-partitioned) XLA program and their bytes per step.

    collectives(hlo_text)                -> [Collective], one per collective instruction
    bytes_by_kind(colls)                 -> {kind: bytes per step}
    bytes_by_axes(colls, mesh_shape)     -> {(kind, axes): bytes per step}
    by_channel(colls)                    -> {kind: {ops, executions, bytes}}, one per channel id
    group_axes(groups, mesh_shape)       -> the mesh axes a replica group spans

Convention (per device, per step): the bytes of a collective are the size of its *full* operand,
the same on every device: all-gather → its output, reduce-scatter → its input (output × group
size), all-reduce / all-to-all / collective-permute → the operand. A ring moves (n-1)/n of that
per device for all-gather and reduce-scatter and 2(n-1)/n for all-reduce (`projection.py`).

An instruction inside a `while` body counts its known trip count times (layer scans), nested
loops multiply; branches of a `conditional` count once each (an upper bound). Asynchronous pairs
(`all-gather-start` / `-done`) count once, with the shape of the `-done`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

_ELEMENT_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLEES = re.compile(r"\b(?:body|calls|to_apply|branch_computations|true_computation|false_computation)="
                      r"(\{[^}]*\}|%?[\w.\-]+)")
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction.

    kind: one of KINDS. bytes: full-operand bytes of one execution (module docstring).
    groups: device groups as partition ids (row-major positions in the mesh), or None if the
      format was not understood. count: executions per step. name: the HLO instruction name.
    channel_id: XLA's channel id (None if absent); one collective split over several instructions
      (TPU fusions, async pairs) keeps one id, so unique ids count collectives (`by_channel`).
    """

    kind: str
    bytes: float
    groups: tuple[tuple[int, ...], ...] | None
    count: int
    name: str
    channel_id: int | None = None

    @property
    def group_size(self) -> int:
        return len(self.groups[0]) if self.groups else 0


def shape_bytes(type_text: str) -> float:
    """Bytes of an HLO type: `f32[8,2]{1,0}` or a tuple `(bf16[4], f32[2,2])` (summed)."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(type_text):
        size = _ELEMENT_BYTES.get(dtype, 1 if dtype.startswith("f8") else None)
        if size is None:
            continue  # token[], opaque: no payload
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_type(rest: str) -> tuple[str, str, str]:
    """`TYPE opcode(operands), attrs` → (TYPE, opcode, the text after the opcode)."""
    if rest.startswith("("):  # tuple type: up to the matching parenthesis
        depth = 0
        for i, ch in enumerate(rest):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        type_text, tail = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        type_text, _, tail = rest.partition(" ")
    opcode, _, after = tail.partition("(")
    return type_text, opcode.strip(), after


def _iota(dims: Sequence[int], perm: Sequence[int] | None, total: int) -> np.ndarray:
    ids = np.arange(total).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def parse_replica_groups(attrs: str, num_devices: int) -> tuple[tuple[int, ...], ...] | None:
    """Groups of partition ids from an instruction's attribute text (every format XLA prints).

    `{{0,1},{2,3}}`; `[4,2]<=[8]` and `[4,2]<=[2,2,2]T(2,1,0)` (iota tiles);
    `mesh['axis_0'=2,'axis_1'=4], device_ids=([8]) {'axis_1'}` (named mesh axes); `{}` = all.
    """
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(?\[([\d,]*)\](?:T\(([\d,]*)\))?\)?)?"
                  r"(?:\s*\{([^}]*)\})?", attrs)
    if m:
        names = re.findall(r"'([\w]+)'=(\d+)", m.group(1))
        sizes = [int(s) for _, s in names]
        total = math.prod(sizes)
        ids = np.arange(total)
        if m.group(2):
            dims = _ints(m.group(2))
            ids = _iota(dims, _ints(m.group(3)) if m.group(3) else None, total) if math.prod(dims) == total \
                else np.asarray(dims)  # an explicit id list
        ids = ids.reshape(sizes)
        listed = m.group(4)
        if listed is None:  # no axes named: one group of every device
            return (tuple(int(i) for i in ids.flat),)
        if ":" in listed:  # sub-axis syntax ('axis_1':(1)2) is not needed by these programs
            return None
        axes = [i for i, (name, _) in enumerate(names) if f"'{name}'" in listed]
        rest = [i for i in range(len(sizes)) if i not in axes]
        grouped = ids.transpose(rest + axes).reshape(-1, math.prod(sizes[i] for i in axes) if axes else 1)
        return tuple(tuple(int(i) for i in row) for row in grouped)
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        shape, dims = _ints(m.group(1)), _ints(m.group(2))
        ids = _iota(dims, _ints(m.group(3)) if m.group(3) else None, math.prod(dims)).reshape(shape)
        return tuple(tuple(int(i) for i in row) for row in ids.reshape(shape[0], -1))
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m:
        groups = tuple(tuple(_ints(g)) for g in re.findall(r"\{([\d,]*)\}", m.group(1)))
        return groups if groups else (tuple(range(num_devices)),)
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if m:
        return tuple(tuple(_ints(p)) for p in re.findall(r"\{(\d+,\d+)\}", m.group(1)))
    return None


def _num_devices(hlo_text: str) -> int:
    m = re.search(r"num_partitions=(\d+)", hlo_text)
    return int(m.group(1)) if m else 1


def condition_trip_count(instructions: Sequence[tuple[str, str, str, str]]) -> int | None:
    """Trips of a `while` whose condition is `counter < constant(N)` (a scan: counter from 0),
    else None. `instructions`: the condition computation's (name, type, opcode, attrs)."""
    constants = {}
    for name, type_text, opcode, attrs in instructions:
        m = re.match(r"\s*(-?\d+)\)", attrs)
        if opcode == "constant" and type_text.startswith(("s32", "s64", "u32")) and m:
            constants[name] = int(m.group(1))
    for name, _, opcode, attrs in instructions:
        if opcode == "compare" and "direction=LT" in attrs:
            operands = re.findall(r"%([\w.\-]+)", attrs.split(")", 1)[0])
            if len(operands) == 2 and operands[1] in constants:
                return constants[operands[1]]
    return None


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of the module (see the module docstring for bytes and counts)."""
    num_devices = _num_devices(hlo_text)
    comps: dict[str, list[tuple[str, str, str, str]]] = defaultdict(list)  # name → (inst, type, op, attrs)
    calls: dict[str, list[tuple[str, int]]] = defaultdict(list)  # caller → [(callee, times)]
    entry, current = None, None
    conditions: list[tuple[str, int, str]] = []  # (caller, index in calls[caller], loop condition)
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head:
            current = head.group(1)
            if line.startswith("ENTRY"):
                entry = current
            continue
        inst = _INSTRUCTION.match(line) if current else None
        if not inst:
            continue
        type_text, opcode, attrs = _split_type(inst.group(2))
        comps[current].append((inst.group(1), type_text, opcode, attrs))
        trip = _TRIP.search(attrs)
        for target in _CALLEES.findall(attrs):
            is_body = opcode == "while" and "body=" in attrs and \
                re.search(r"body=%?" + re.escape(target.lstrip("%")) + r"\b", attrs)
            times = int(trip.group(1)) if is_body and trip else 1
            if is_body and not trip:  # TPU writes no known_trip_count: read the loop condition later
                cond = re.search(r"condition=%?([\w.\-]+)", attrs)
                times = -1 if cond else 1
                if cond:
                    conditions.append((current, len(calls[current]), cond.group(1)))
            for callee in re.findall(r"%?([\w.\-]+)", target.strip("{}")):
                calls[current].append((callee, times))
    if entry is None:
        return []
    for caller, index, cond in conditions:
        callee, _ = calls[caller][index]
        calls[caller][index] = (callee, condition_trip_count(comps.get(cond, [])) or 1)

    # Multipliers flow from ENTRY down the call graph in topological order (Kahn), counting only
    # edges from reachable callers, so a callee adds up every call site before it passes its own on.
    reachable, stack = {entry}, [entry]
    while stack:
        for callee, _ in calls.get(stack.pop(), ()):
            if callee not in reachable:
                reachable.add(callee)
                stack.append(callee)
    indegree: dict[str, int] = defaultdict(int)
    for caller in reachable:
        for callee, _ in calls.get(caller, ()):
            indegree[callee] += 1
    multiplier: dict[str, int] = defaultdict(int)
    multiplier[entry] = 1
    ready = [entry]
    while ready:
        comp = ready.pop()
        for callee, times in calls.get(comp, ()):
            multiplier[callee] += multiplier[comp] * times
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)

    starts = {name: attrs for comp in comps.values() for name, _, op, attrs in comp if op.endswith("-start")}
    out = []
    for comp, instructions in comps.items():
        times = multiplier.get(comp, 0)
        if not times:
            continue
        for name, type_text, opcode, attrs in instructions:
            kind = opcode[:-5] if opcode.endswith("-done") else opcode
            if kind not in KINDS:
                continue
            if opcode.endswith("-done"):
                operand = re.match(r"\s*%?([\w.\-]+)", attrs)
                attrs = starts.get(operand.group(1), attrs) if operand else attrs
            groups = parse_replica_groups(attrs, num_devices)
            nbytes = shape_bytes(type_text)
            if kind == "reduce-scatter" and groups:
                nbytes *= len(groups[0])
            channel = _CHANNEL.search(attrs)
            out.append(Collective(kind, nbytes, groups, times, name, int(channel.group(1)) if channel else None))
    return out


def by_channel(colls: Iterable[Collective]) -> dict[str, dict[str, float]]:
    """{kind: {"ops": unique collectives, "executions": per step, "bytes": per step}} over KINDS.

    Instructions that share a (kind, channel id) are one collective: it counts once, with the
    largest of their byte sizes and execution counts. Groups of one device move nothing and are left
    out; instructions without a channel id count one each.
    """
    merged: dict[tuple, Collective] = {}
    for i, c in enumerate(colls):
        if c.group_size == 1:
            continue
        key = (c.kind, c.channel_id) if c.channel_id is not None else (c.kind, "inst", i)
        old = merged.get(key)
        merged[key] = c if old is None or c.bytes * c.count > old.bytes * old.count else old
    out = {k: {"ops": 0, "executions": 0, "bytes": 0.0} for k in KINDS}
    for c in merged.values():
        row = out[c.kind]
        row["ops"] += 1
        row["executions"] += c.count
        row["bytes"] += c.bytes * c.count
    return out


def group_axes(groups: Iterable[Sequence[int]] | None, mesh_shape: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes along which the devices of one group differ (partition id = row-major index).

    `mesh_shape` is ordered like the mesh ({"data": 2, "fsdp": 2, "tensor": 2}); () for groups of
    one device; ("?",) when the groups are unknown.
    """
    if groups is None:
        return ("?",)
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    varying: set[int] = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.asarray(group), sizes)).T
        varying.update(i for i in range(len(sizes)) if len(set(coords[:, i])) > 1)
    return tuple(names[i] for i in sorted(varying))


def bytes_by_kind(colls: Iterable[Collective]) -> dict[str, float]:
    """{kind: bytes per step} over KINDS (0 where absent); groups of one device move nothing."""
    out = {k: 0.0 for k in KINDS}
    for c in colls:
        if c.group_size != 1:
            out[c.kind] += c.bytes * c.count
    return out


def bytes_by_axes(colls: Iterable[Collective], mesh_shape: dict[str, int]) -> dict[tuple[str, tuple[str, ...]], dict]:
    """{(kind, axes): {"bytes": per step, "group_size": largest group, "ops": executions}}."""
    out: dict = {}
    for c in colls:
        axes = group_axes(c.groups, mesh_shape)
        if not axes:
            continue
        row = out.setdefault((c.kind, axes), {"bytes": 0.0, "group_size": 0, "ops": 0})
        row["bytes"] += c.bytes * c.count
        row["group_size"] = max(row["group_size"], c.group_size)
        row["ops"] += c.count
    return out
