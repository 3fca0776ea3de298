"""ArrayRecord shards of encoded samples, their manifest, and the DataHash.

A dataset directory holds `manifest.json` and shard files named
`{split}-{kind}-{i:05d}-of-{n:05d}.arrayrecord`. Each shard holds records of one split and one
kind (see `records.py`), in index order: record `j` of the `kind` shards of `split`, counted across
the shards in manifest order, is sample index `j` of that (split, kind). That is what lets the
pipeline address shards and the on-the-fly synthetic world with the same indices.

Manifest (JSON):

    {"format": "vlacabin-shards", "schema_version": 1, "vocab_version": "...",
     "generator": {"source": "synthetic", "seed": 0, "image_size": 32, ...},
     "counts": {"train": {"vla": 3, ...}, "heldout": {...}},
     "shards": [{"file": "...", "split": "train", "kind": "vla", "records": 3, "sha256": "..."}]}

The DataHash is the sha256 of the canonical JSON of the manifest (sorted keys, no whitespace). The
manifest holds no time stamps or absolute paths, so rebuilding the same data gives the same hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable

from array_record.python import array_record_module

from vlacabin_jax.data import records
from vlacabin_jax.data.spec import KINDS

FORMAT = "vlacabin-shards"
MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
# group_size:1 makes every record its own compressed chunk: random access reads one chunk.
_WRITER_OPTIONS = "group_size:1"
# Random-access reading: no readahead, no parallel chunk decoding per call.
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


class CorruptShard(ValueError):
    """A shard or manifest that cannot be trusted; the message names shard, record and reason."""


def shard_name(split: str, kind: str, i: int, n: int) -> str:
    """File name of shard `i` of `n` of one (split, kind)."""
    return f"{split}-{kind}-{i:05d}-of-{n:05d}.arrayrecord"


def shard_ranges(count: int, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) index ranges of `count` records over at most `num_shards` shards.

    Fewer shards than asked when there are fewer records (no empty shards).
    """
    n = max(1, min(num_shards, count))
    bounds = [count * i // n for i in range(n + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(n)] if count else []


def split_counts(total: int) -> dict[str, int]:
    """Samples per kind when `total` samples are spread evenly over `KINDS` (first kinds get the
    remainder). Shared by `data.build` and the on-the-fly synthetic source so both hold the same
    indices."""
    return {k: total // len(KINDS) + (i < total % len(KINDS)) for i, k in enumerate(KINDS)}


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: str | os.PathLike, data: Iterable[bytes]) -> dict[str, Any]:
    """Writes encoded records to one ArrayRecord file.

    Args:
      path: the shard file to create.
      data: record bytes from `records.encode`.
    Returns:
      {"file": basename, "records": int, "sha256": str}; the caller adds split and kind.
    """
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), _WRITER_OPTIONS)
    n = 0
    try:
        for rec in data:
            writer.write(rec)
            n += 1
    finally:
        writer.close()
    return {"file": Path(path).name, "records": n, "sha256": file_sha256(path)}


def make_manifest(shards: list[dict[str, Any]], generator: dict[str, Any],
                  vocab_version: str) -> dict[str, Any]:
    """Builds the manifest from shard entries (each with file, split, kind, records, sha256)."""
    counts = {s: {k: 0 for k in KINDS} for s in SPLITS}
    for e in shards:
        counts[e["split"]][e["kind"]] += e["records"]
    return {"format": FORMAT, "schema_version": records.SCHEMA_VERSION,
            "vocab_version": vocab_version, "generator": dict(generator), "counts": counts,
            "shards": [dict(e) for e in shards]}


def canonical_json(obj: Any) -> str:
    """The one JSON text of `obj` that hashing uses (sorted keys, no spaces, ASCII)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def data_hash(manifest: dict[str, Any]) -> str:
    """The DataHash: hex sha256 of the canonical JSON of the manifest."""
    return hashlib.sha256(canonical_json(manifest).encode()).hexdigest()


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> str:
    """Writes `manifest.json` (pretty, but hashed canonically) and returns the DataHash."""
    Path(directory, MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return data_hash(manifest)


def _check_manifest(m: Any) -> None:
    """Structure and types of a manifest; raises CorruptShard with the reason."""
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CorruptShard(f"{MANIFEST}: not a {FORMAT} manifest")
    if m.get("schema_version") != records.SCHEMA_VERSION:
        raise CorruptShard(f"{MANIFEST}: schema version {m.get('schema_version')!r}, this code "
                           f"reads {records.SCHEMA_VERSION}")
    if not isinstance(m.get("shards"), list) or not isinstance(m.get("generator"), dict):
        raise CorruptShard(f"{MANIFEST}: 'shards' must be a list and 'generator' an object")
    for i, e in enumerate(m["shards"]):
        ok = (isinstance(e, dict) and isinstance(e.get("file"), str) and e.get("split") in SPLITS
              and e.get("kind") in KINDS and isinstance(e.get("records"), int)
              and not isinstance(e.get("records"), bool) and e["records"] >= 0
              and isinstance(e.get("sha256"), str))
        if not ok:
            raise CorruptShard(f"{MANIFEST}: shard entry {i} is malformed: {e!r}")
    counts = make_manifest(m["shards"], {}, "")["counts"]
    if m.get("counts") != counts:
        raise CorruptShard(f"{MANIFEST}: 'counts' {m.get('counts')} disagree with the shard "
                           f"entries {counts}")


def shard_path(directory: str | os.PathLike, name: str) -> Path:
    """Resolves a manifest file name inside `directory`, refusing anything that escapes it
    (absolute paths, `..`, symlinks pointing out)."""
    root = Path(directory).resolve()
    if not name or Path(name).is_absolute() or os.sep in name or (os.altsep and os.altsep in name):
        raise CorruptShard(f"{name!r}: shard names must be plain file names inside {root}")
    path = (root / name).resolve()
    if path.parent != root:
        raise CorruptShard(f"{name!r}: resolves to {path}, outside the dataset directory {root}")
    return path


def load_manifest(directory: str | os.PathLike, verify_hashes: bool = False) -> dict[str, Any]:
    """Reads and checks a dataset directory's manifest.

    Checks: structure, that every shard path stays inside `directory` and exists, that each
    shard's record count matches (a truncated shard fails here), and, with `verify_hashes`, the
    sha256 of every shard file.

    Raises:
      CorruptShard: naming the shard and the reason.
      FileNotFoundError: no manifest.
    """
    path = Path(directory, MANIFEST)
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptShard(f"{path}: invalid JSON: {e}") from None
    _check_manifest(manifest)
    for e in manifest["shards"]:
        p = shard_path(directory, e["file"])
        if not p.is_file():
            raise CorruptShard(f"{e['file']}: listed in the manifest but missing")
        reader = _open(p, e["file"])
        try:
            if reader.num_records() != e["records"]:
                raise CorruptShard(f"{e['file']}: holds {reader.num_records()} records, manifest "
                                   f"says {e['records']} (truncated or replaced?)")
        finally:
            reader.close()
        if verify_hashes and file_sha256(p) != e["sha256"]:
            raise CorruptShard(f"{e['file']}: sha256 {file_sha256(p)} does not match the manifest's "
                               f"{e['sha256']}")
    return manifest


def _open(path: Path, name: str):
    try:
        reader = array_record_module.ArrayRecordReader(os.fspath(path), _READER_OPTIONS)
    except Exception as e:
        raise CorruptShard(f"{name}: cannot open as ArrayRecord: {e}") from None
    if not reader.ok():
        raise CorruptShard(f"{name}: not a readable ArrayRecord file (truncated?)")
    return reader


class ShardSource:
    """Random-access source of decoded samples of one (split, kind) of a shard directory.

    `source[i]` is sample index `i`: a dict as `records.decode` returns it. Readers open lazily and
    are shared by threads (ArrayRecordReader reads are thread-safe); pickling (grain hands the
    source to its worker processes over IPC) drops them so each process opens its own.
    """

    def __init__(self, directory: str | os.PathLike, entries: list[dict[str, Any]]):
        self._files = [shard_path(directory, e["file"]) for e in entries]
        self._names = [e["file"] for e in entries]
        self._starts = [0]
        for e in entries:
            self._starts.append(self._starts[-1] + e["records"])
        self._readers: list[Any] = [None] * len(entries)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        lo, hi = 0, len(self._files) - 1
        while lo < hi:  # last shard whose start <= index
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._starts[mid] <= index else (lo, mid - 1)
        return lo, index - self._starts[lo]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, local = self._locate(int(index))
        if self._readers[shard] is None:
            with self._lock:
                if self._readers[shard] is None:
                    self._readers[shard] = _open(self._files[shard], self._names[shard])
        try:
            data = self._readers[shard].read([local])[0]
        except Exception as e:
            raise CorruptShard(f"{self._names[shard]}: record {local}: unreadable: {e}") from None
        try:
            return records.decode(data)
        except records.CorruptRecord as e:
            raise CorruptShard(f"{self._names[shard]}: record {local}: {e}") from None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_readers"] = [None] * len(self._files)
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # grain logs the source; keep it short and stable
        return f"ShardSource({self._names[0] if self._names else '-'} +{len(self._names) - 1})"


def open_split(directory: str | os.PathLike, split: str, verify_hashes: bool = False
               ) -> tuple[dict[str, Any], dict[str, ShardSource]]:
    """Opens one split of a shard directory.

    Returns:
      (manifest, {kind: ShardSource}) for every kind in KINDS (a kind without records gives an
      empty source).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; choose one of {SPLITS}")
    manifest = load_manifest(directory, verify_hashes=verify_hashes)
    sources = {k: ShardSource(directory, [e for e in manifest["shards"]
                                          if e["split"] == split and e["kind"] == k])
               for k in KINDS}
    return manifest, sources
