"""One sample dict <-> bytes: msgpack with numpy arrays, a CRC32 and a schema version.

Wire format of one record (all integers little-endian):

    b"VCR1" | schema_version: u16 | crc32(payload): u32 | payload

`payload` is msgpack of the sample dict. numpy arrays travel as msgpack extension type 1 whose
body is msgpack `[dtype_name, shape, raw_bytes]` (C order, little-endian, dtype from
`ALLOWED_DTYPES`). numpy scalars become Python scalars and tuples become lists. Nothing here ever
uses pickle: a record from disk can only produce dicts, lists, str, bytes, numbers, None and arrays
of plain numeric dtypes.

Decoding checks, in order: header length and magic, schema version, CRC32 of the payload, msgpack
well-formedness, every array's dtype/rank/shape/byte count, and the field types of `FIELDS` (and
of `OPTIONAL_FIELDS` where present). Any failure raises `CorruptRecord` naming the reason.

Optional fields came after schema version 1 was fixed; they do not change the version, because a
record without them is still a valid version-1 record: `decode` gives it their default
(`history_actions` = [], the empty action log of "no earlier turn").
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import msgpack
import numpy as np

from vlacabin_jax.data.spec import KINDS

SCHEMA_VERSION = 1
MAGIC = b"VCR1"
_HEADER = struct.Struct("<4sHI")
_ARRAY_EXT = 1
# Dtypes a record may hold. Object, string and void dtypes are excluded: they are how arbitrary
# Python objects would get in.
ALLOWED_DTYPES = frozenset(
    ["bool", "uint8", "int8", "uint16", "int16", "int32", "uint32", "int64", "float16", "float32",
     "float64"])
MAX_NDIM = 8
# One array may not claim more than this many bytes (a 384px, 64-frame clip is ~28 MiB).
MAX_ARRAY_BYTES = 1 << 30

# The sample fields every record must carry, with the Python types each may take. Arrays add
# (dtype, ndim); `None` in the types means the modality may be absent.
_STR, _INT = (str,), (int,)
FIELDS: dict[str, tuple] = {
    "sample_id": (_INT, None),
    "kind": (_STR, None),
    "language": (_STR, None),
    "scene": ((str, type(None)), None),
    "text": (_STR, None),
    "history": ((list,), None),
    "mel": ((np.ndarray, type(None)), ("float32", 2)),
    "frames": ((np.ndarray, type(None)), ("uint8", 4)),
    "state_numeric": ((np.ndarray, type(None)), ("float32", 1)),
    "state_categorical": ((np.ndarray, type(None)), ("int32", 1)),
    "constraint_tags": ((list,), None),
    "actions": ((list, type(None)), None),
    "explanation": ((str, type(None)), None),
    "state": ((dict,), None),
}
# Fields a record may lack (records written before they existed), with the value `decode` gives a
# record without them. history_actions: the earlier turn's action log, [[executed, before], ...]
# token pairs (see `world.generate`).
OPTIONAL_FIELDS: dict[str, tuple] = {
    "history_actions": ((list,), None),
}
_OPTIONAL_DEFAULTS = {"history_actions": list}


class CorruptRecord(ValueError):
    """A record that fails its CRC, schema version, array or field checks."""


def _default(obj: Any) -> Any:
    """msgpack hook for the non-native types a sample may hold."""
    if isinstance(obj, np.ndarray):
        name = obj.dtype.name
        if name not in ALLOWED_DTYPES:
            raise TypeError(f"array dtype {name} is not in the record allow-list")
        data = np.ascontiguousarray(obj, dtype=obj.dtype.newbyteorder("<")).tobytes()
        body = msgpack.packb([name, list(obj.shape), data], use_bin_type=True)
        return msgpack.ExtType(_ARRAY_EXT, body)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__} in a record")


def _decode_array(body: bytes) -> np.ndarray:
    """The inverse of `_default` for arrays, with every size checked before any allocation."""
    try:
        name, shape, data = msgpack.unpackb(body, raw=False, use_list=True)
    except Exception as e:  # malformed body or wrong arity
        raise CorruptRecord(f"malformed array: {e}") from None
    if not isinstance(name, str) or name not in ALLOWED_DTYPES:
        raise CorruptRecord(f"array dtype {name!r} not allowed")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise CorruptRecord(f"array shape {shape!r} is not a list of at most {MAX_NDIM} dims")
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_ARRAY_BYTES
               for s in shape):
        raise CorruptRecord(f"array shape {shape!r} has a negative, huge or non-integer size")
    if not isinstance(data, bytes):
        raise CorruptRecord("array data is not bytes")
    dtype = np.dtype(name).newbyteorder("<")
    want = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize  # float: no int overflow
    if want > MAX_ARRAY_BYTES or want != len(data):
        raise CorruptRecord(f"array {name}{shape} needs {want} bytes, record holds {len(data)}")
    # Copy: frombuffer views the record's bytes read-only, downstream code may write in place.
    return np.frombuffer(data, dtype=dtype).reshape(shape).astype(np.dtype(name), copy=True)


def _ext_hook(code: int, body: bytes) -> Any:
    if code != _ARRAY_EXT:
        raise CorruptRecord(f"unknown msgpack extension type {code}")
    return _decode_array(body)


def encode(sample: dict[str, Any], verify: bool = True) -> bytes:
    """Serialises one sample dict (see `FIELDS`) to record bytes with header and CRC32.

    Args:
      sample: a sample as `world.generate` returns it; arrays such as mel float32[T, n_mels] and
        frames uint8[F, H, W, 3] keep dtype and shape exactly.
      verify: decode the result once (catches what msgpack writes but we would refuse to read,
        e.g. non-string dict keys) so that no unreadable record reaches a shard.
    Returns:
      the record bytes.
    Raises:
      CorruptRecord: the sample does not match `FIELDS` (we refuse to write what we could not read).
      TypeError: a value has no record encoding (e.g. an object array).
    """
    validate(sample)
    payload = msgpack.packb(sample, default=_default, use_bin_type=True, strict_types=False)
    data = _HEADER.pack(MAGIC, SCHEMA_VERSION, zlib.crc32(payload)) + payload
    if verify:
        decode(data)
    return data


def decode(data: bytes) -> dict[str, Any]:
    """Parses and validates record bytes written by `encode`.

    Args:
      data: one record.
    Returns:
      the sample dict, arrays as writable numpy arrays; an `OPTIONAL_FIELDS` field the record
      lacks is there with its default.
    Raises:
      CorruptRecord: naming the reason (short header, bad magic, schema version, CRC mismatch,
        malformed msgpack, bad array, missing or mistyped field).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CorruptRecord(f"record is {type(data).__name__}, not bytes")
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise CorruptRecord(f"record of {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
    magic, version, crc = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise CorruptRecord(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != SCHEMA_VERSION:
        raise CorruptRecord(f"schema version {version}, this code reads {SCHEMA_VERSION}")
    payload = data[_HEADER.size:]
    if zlib.crc32(payload) != crc:
        raise CorruptRecord(f"CRC32 mismatch (stored {crc:#010x}, computed {zlib.crc32(payload):#010x})")
    try:
        # strict_map_key: only str/bytes keys; the unpacker bounds every length by len(payload).
        sample = msgpack.unpackb(payload, raw=False, ext_hook=_ext_hook, strict_map_key=True)
    except CorruptRecord:
        raise
    except Exception as e:
        raise CorruptRecord(f"malformed msgpack payload: {type(e).__name__}: {e}") from None
    validate(sample)
    for name, default in _OPTIONAL_DEFAULTS.items():  # an older record: the field's default
        sample.setdefault(name, default())
    return sample


def validate(sample: Any) -> None:
    """Checks a sample's field types, array dtypes/ranks and kind (optional fields only if present).

    Raises:
      CorruptRecord: naming the first offending field.
    """
    if not isinstance(sample, dict):
        raise CorruptRecord(f"record holds {type(sample).__name__}, not a dict")
    for name, (types, arr) in {**FIELDS, **OPTIONAL_FIELDS}.items():
        if name not in sample:
            if name in OPTIONAL_FIELDS:
                continue
            raise CorruptRecord(f"field {name!r} missing")
        value = sample[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise CorruptRecord(f"field {name!r} is {type(value).__name__}, expected "
                                f"{' or '.join(t.__name__ for t in types)}")
        if arr is not None and value is not None:
            dtype, ndim = arr
            if value.dtype.name != dtype or value.ndim != ndim:
                raise CorruptRecord(f"field {name!r} is {value.dtype.name}[{value.ndim}-d], "
                                    f"expected {dtype}[{ndim}-d]")
    if sample["kind"] not in KINDS:
        raise CorruptRecord(f"field 'kind' is {sample['kind']!r}, expected one of {KINDS}")
    if not all(isinstance(t, str) for t in sample["constraint_tags"]):
        raise CorruptRecord("field 'constraint_tags' must be a list of str")
    if sample["actions"] is not None and not all(isinstance(a, str) for a in sample["actions"]):
        raise CorruptRecord("field 'actions' must be a list of str")
    log = sample.get("history_actions", [])
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(t, str) for t in p) for p in log):
        raise CorruptRecord("field 'history_actions' must be a list of [executed, before] token pairs")
    if sample["frames"] is not None and sample["frames"].shape[-1] != 3:
        raise CorruptRecord(f"field 'frames' has shape {sample['frames'].shape}, expected [F, H, W, 3]")
