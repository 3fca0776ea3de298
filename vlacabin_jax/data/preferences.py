"""Preference pairs for the `align` stage: the synthetic world's pairs and stored pair shards.

    WorldPairSource(params, count, offset)     -> source[i] = world.preference_pair(seed, offset + i, ...)
    write_pairs(directory, pairs_by_split, generator) -> manifest (ArrayRecord shards + manifest.json)
    open_pairs(directory, split)               -> (manifest, ShardSource of that split's pairs)
    pairs_hash(directory)                      -> the DataHash of a pair directory

A pair is a VLA sample (`world.generate`'s fields, `kind` = "vla") plus `chosen` and `rejected`
(lists of action tokens), `reason` (why the rejected side is worse) and, for simulator-scored
pairs, `chosen_reward` / `rejected_reward`. Records are the msgpack records of `records.py` (CRC,
no pickle); a directory holds `pairs-{split}-{i:05d}-of-{n:05d}.arrayrecord` and a manifest

    {"format": "vlacabin-preferences", "schema_version": 1, "vocab_version": "...",
     "generator": {...how the pairs were made...}, "counts": {"train": n, "heldout": m},
     "shards": [{"file", "split", "records", "sha256"}]}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from vlacabin_jax.data import actions, records, shards, world

FORMAT = "vlacabin-preferences"
MANIFEST = "manifest.json"
PAIR_FIELDS = ("chosen", "rejected")


class WorldPairSource:
    """Index-addressable pairs of the synthetic world (`world.preference_pair`), like
    `pipeline.SyntheticSource` for the other kinds.

    Args:
      params: `pipeline.synthetic_params(cfg)`.
      count: pairs per epoch; offset: 0 for train, `pipeline.HELDOUT_OFFSET` for heldout.
    """

    def __init__(self, params: dict[str, Any], count: int, offset: int = 0):
        self._p, self._count, self._offset = dict(params), int(count), int(offset)

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= int(index) < self._count:
            raise IndexError(f"index {index} out of range for {self._count} pairs")
        p = self._p
        return world.preference_pair(p["seed"], self._offset + int(index), p["image_size"], p["num_frames"],
                                     p["n_mels"], p["mel_frames"])

    def __repr__(self) -> str:
        return f"WorldPairSource(n={self._count}, offset={self._offset})"


def check_pair(pair: dict[str, Any]) -> None:
    """Raises records.CorruptRecord unless `pair` is a record with chosen/rejected token lists."""
    records.validate(pair)
    for name in PAIR_FIELDS:
        value = pair.get(name)
        if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
            raise records.CorruptRecord(f"pair field {name!r} must be a non-empty list of action tokens")


def write_pairs(directory: str | Path, pairs_by_split: dict[str, Sequence[dict[str, Any]]],
                generator: dict[str, Any], records_per_shard: int = 4096) -> dict[str, Any]:
    """Writes pairs as ArrayRecord shards plus `manifest.json`; returns the manifest.

    Args:
      directory: created if missing; must not hold a pair manifest already.
      pairs_by_split: {"train": [pair, ...], "heldout": [...]} (either may be empty).
      generator: JSON description of how the pairs were made (checkpoint, K, rewards, ...).
    """
    out = Path(directory)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out / MANIFEST} exists; write the pairs to a new directory")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for split, pairs in pairs_by_split.items():
        if split not in shards.SPLITS:
            raise ValueError(f"split {split!r}; use one of {shards.SPLITS}")
        for p in pairs:
            check_pair(p)
        ranges = shards.shard_ranges(len(pairs), -(-len(pairs) // records_per_shard))
        for i, (lo, hi) in enumerate(ranges):
            path = out / f"pairs-{split}-{i:05d}-of-{len(ranges):05d}.arrayrecord"
            entry = shards.write_shard(path, (records.encode(p) for p in pairs[lo:hi]))
            entries.append(dict(entry, split=split))
    manifest = {"format": FORMAT, "schema_version": records.SCHEMA_VERSION, "vocab_version": actions.VERSION,
                "generator": generator, "counts": {s: sum(e["records"] for e in entries if e["split"] == s)
                                                   for s in shards.SPLITS},
                "shards": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def load_manifest(directory: str | Path) -> dict[str, Any]:
    """The checked manifest of a pair directory (format, vocabulary, files present)."""
    path = Path(directory, MANIFEST)
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; write pairs with `python -m tools.make_preferences`")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise shards.CorruptShard(f"{path}: invalid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise shards.CorruptShard(f"{path}: not a {FORMAT} manifest")
    if manifest.get("vocab_version") != actions.VERSION:
        raise shards.CorruptShard(f"{path}: pairs use action vocabulary {manifest.get('vocab_version')}, "
                                  f"this code has {actions.VERSION}; make them again")
    for e in manifest.get("shards", []):
        if not shards.shard_path(directory, e["file"]).is_file():
            raise shards.CorruptShard(f"{e['file']}: listed in {path} but missing")
    return manifest


def open_pairs(directory: str | Path, split: str) -> tuple[dict[str, Any], shards.ShardSource]:
    """(manifest, random-access source of the split's pairs) of a pair directory."""
    manifest = load_manifest(directory)
    return manifest, shards.ShardSource(directory, [e for e in manifest["shards"] if e["split"] == split])


def pairs_hash(directory: str | Path) -> str:
    """The DataHash of a pair directory (sha256 of its canonical manifest)."""
    return shards.data_hash(load_manifest(directory))
