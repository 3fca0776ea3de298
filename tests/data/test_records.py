"""Record encoding: exact round trip, and every corruption caught with its reason."""

import struct
import zlib

import msgpack
import numpy as np
import pytest

from vlacabin_jax.data import records
from vlacabin_jax.data.records import CorruptRecord


def _sample(i: int = 0) -> dict:
    rng = np.random.default_rng(i)
    return {
        "sample_id": 1000 + i, "kind": "vla", "language": "en", "scene": "nap",
        "text": "the child fell asleep", "history": ["hello"],
        "history_actions": [["climate.temp=21", "climate.temp=23"], ["climate.fan=3", "climate.fan=2"]],
        "mel": rng.standard_normal((7, 5)).astype(np.float32),
        "frames": rng.integers(0, 255, (2, 4, 4, 3), dtype=np.uint8),
        "state_numeric": rng.standard_normal(3).astype(np.float32),
        "state_categorical": np.array([1, 0, 2], np.int32),
        "constraint_tags": ["child_on_board"], "actions": ["climate.temp=22"],
        "explanation": "quiet for the child", "state": {"temp": 23.5, "seats": {"rear": "occupied"}},
    }


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


def test_round_trip_exact():
    s = _sample()
    out = records.decode(records.encode(s))
    _equal(s, out)
    out["mel"][0, 0] = 1.0  # decoded arrays are writable copies


def test_action_log_round_trip_and_old_records_without_it():
    for log in ([], [["<noop>", "<noop>"]], _sample()["history_actions"]):
        s = dict(_sample(), history_actions=log)
        _equal(s, records.decode(records.encode(s)))
    # A record written before the field existed (same schema version) reads as "no earlier turn".
    old = {k: v for k, v in records.decode(records.encode(_sample())).items() if k != "history_actions"}
    obj = {k: v for k, v in old.items() if not isinstance(v, np.ndarray)}
    obj.update(mel=None, frames=None, state_numeric=None, state_categorical=None)
    out = records.decode(_forge(obj))
    assert out["history_actions"] == [] and out["text"] == old["text"]
    out = records.decode(records.encode(old))  # old-style writers still write
    assert out["history_actions"] == []
    for bad in (["climate.temp=21"], [["climate.temp=21"]], [["a", 3]], "x"):
        with pytest.raises(CorruptRecord, match="history_actions"):
            records.encode(dict(_sample(), history_actions=bad))


def test_absent_modalities_round_trip():
    s = dict(_sample(), mel=None, frames=None, actions=None, explanation=None)
    _equal(s, records.decode(records.encode(s)))


def test_crc_catches_every_single_bit_flip_in_payload():
    data = bytearray(records.encode(_sample()))
    rng = np.random.default_rng(0)
    for pos in rng.integers(10, len(data), 50):
        bad = bytearray(data)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CorruptRecord, match="CRC32"):
            records.decode(bytes(bad))


def _forge(payload_obj) -> bytes:
    """A record with a correct CRC around an arbitrary payload (what a buggy writer could make)."""
    payload = msgpack.packb(payload_obj, use_bin_type=True)
    return struct.pack("<4sHI", b"VCR1", records.SCHEMA_VERSION, zlib.crc32(payload)) + payload


def _array_ext(name, shape, data):
    return msgpack.ExtType(1, msgpack.packb([name, shape, data], use_bin_type=True))


@pytest.mark.parametrize("mel, reason", [
    (_array_ext("float32", [4, 5], b"\0" * 12), "needs 80 bytes"),
    (_array_ext("float32", [-1, 5], b""), "negative"),
    (_array_ext("float32", [1 << 40, 1 << 40], b""), "huge"),
    (_array_ext("object", [1], b"\0" * 8), "not allowed"),
    (_array_ext("int32", [2, 2], b"\0" * 16), "expected float32"),
    (msgpack.ExtType(7, b""), "unknown msgpack extension"),
])
def test_bad_arrays_rejected(mel, reason):
    s = records.decode(records.encode(_sample()))
    obj = {k: v for k, v in s.items() if not isinstance(v, np.ndarray)}
    obj["mel"] = mel
    for k in ("frames", "state_numeric", "state_categorical"):
        obj[k] = None
    with pytest.raises(CorruptRecord, match=reason):
        records.decode(_forge(obj))


def test_header_and_field_checks():
    good = records.encode(_sample())
    with pytest.raises(CorruptRecord, match="shorter"):
        records.decode(good[:5])
    with pytest.raises(CorruptRecord, match="magic"):
        records.decode(b"XXXX" + good[4:])
    with pytest.raises(CorruptRecord, match="schema version"):
        records.decode(good[:4] + struct.pack("<H", 99) + good[6:])
    with pytest.raises(CorruptRecord, match="field 'kind' is NoneType"):
        records.decode(_forge({**{k: None for k in records.FIELDS}, "sample_id": 1}))
    with pytest.raises(CorruptRecord, match="not a dict"):
        records.decode(_forge([1, 2]))
    with pytest.raises(CorruptRecord, match="kind"):
        records.encode(dict(_sample(), kind="bogus"))
    with pytest.raises(TypeError):
        records.encode(dict(_sample(), state={"x": object()}))


def test_unreadable_values_are_refused_at_write_time():
    with pytest.raises(CorruptRecord, match="malformed msgpack"):
        records.encode(dict(_sample(), state={1: "int keys are not readable"}))


def test_float_frames_are_refused_in_one_line_on_write_and_read():
    """Records have held frames as uint8 since the first schema: a float clip is refused when a
    shard is written, and a record someone forged with one fails to load with one line (the batch
    contract's frames are uint8 end to end, docs/data.md)."""
    floats = np.zeros((2, 4, 4, 3), np.float32)
    with pytest.raises(CorruptRecord, match=r"field 'frames' is float32\[4-d\], expected uint8\[4-d\]"):
        records.encode(dict(_sample(), frames=floats))
    obj = {k: v for k, v in records.decode(records.encode(_sample())).items() if not isinstance(v, np.ndarray)}
    obj.update(mel=None, state_numeric=None, state_categorical=None,
               frames=_array_ext("float32", [2, 4, 4, 3], floats.tobytes()))
    with pytest.raises(CorruptRecord, match=r"field 'frames' is float32\[4-d\], expected uint8\[4-d\]") as e:
        records.decode(_forge(obj))
    assert "\n" not in str(e.value)
