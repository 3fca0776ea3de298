"""Shards and manifest: round trip, DataHash, and clear errors for every kind of damage."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from vlacabin_jax.data import records, shards
from vlacabin_jax.data.shards import CorruptShard


def _sample(i: int = 0) -> dict:
    """A hand-made sample (independent of the synthetic world)."""
    rng = np.random.default_rng(i)
    return {
        "sample_id": 1000 + i, "kind": "vla", "language": "en", "scene": None,
        "text": f"request {i}", "history": [], "history_actions": [],
        "mel": rng.standard_normal((7, 5)).astype(np.float32),
        "frames": rng.integers(0, 255, (2, 4, 4, 3), dtype=np.uint8),
        "state_numeric": rng.standard_normal(3).astype(np.float32),
        "state_categorical": np.array([1, 0, 2], np.int32),
        "constraint_tags": [], "actions": ["x"], "explanation": None, "state": {"t": 1.5},
    }


def _equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert b[k].dtype == a[k].dtype and b[k].shape == a[k].shape
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k], k


def _write(tmp_path, n=6, per_shard=(2, 4)):
    """Two train/vla shards with samples 0..n-1; returns the manifest."""
    entries, start = [], 0
    for i, size in enumerate(per_shard):
        name = shards.shard_name("train", "vla", i, len(per_shard))
        data = (records.encode(_sample(j)) for j in range(start, start + size))
        entries.append(dict(shards.write_shard(tmp_path / name, data), split="train", kind="vla"))
        start += size
    manifest = shards.make_manifest(entries, {"source": "test", "seed": 0}, "1.0.0")
    shards.write_manifest(tmp_path, manifest)
    return manifest


def test_round_trip_across_shards(tmp_path):
    _write(tmp_path)
    manifest, sources = shards.open_split(tmp_path, "train", verify_hashes=True)
    assert manifest["counts"]["train"]["vla"] == 6 and len(sources["vla"]) == 6
    assert len(sources["speech_text"]) == 0
    for j in range(6):
        _equal(_sample(j), sources["vla"][j])
    with pytest.raises(IndexError):
        sources["vla"][6]


def test_data_hash_is_canonical_and_content_sensitive(tmp_path):
    m = _write(tmp_path)
    h = shards.data_hash(m)
    assert h == shards.data_hash(json.loads((tmp_path / shards.MANIFEST).read_text()))
    assert h == shards.data_hash(dict(reversed(list(m.items()))))  # key order does not matter
    m2 = json.loads(json.dumps(m))
    m2["shards"][0]["sha256"] = "0" * 64
    assert shards.data_hash(m2) != h


def test_shard_ranges_and_split_counts():
    assert shards.shard_ranges(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert shards.shard_ranges(2, 5) == [(0, 1), (1, 2)] and shards.shard_ranges(0, 2) == []
    assert shards.split_counts(10) == {"vla": 3, "image_text": 3, "video_text": 2, "speech_text": 2}


def test_truncated_shard_names_shard(tmp_path):
    m = _write(tmp_path)
    path = tmp_path / m["shards"][1]["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShard, match=rf"{m['shards'][1]['file']}.*(truncated|records)"):
        shards.load_manifest(tmp_path)


def test_bad_record_names_shard_record_and_reason(tmp_path):
    name = shards.shard_name("train", "vla", 0, 1)
    recs = [records.encode(_sample(j)) for j in range(4)]
    bad = bytearray(recs[2])
    bad[-3] ^= 0x10
    recs[2] = bytes(bad)
    entry = dict(shards.write_shard(tmp_path / name, recs), split="train", kind="vla")
    shards.write_manifest(tmp_path, shards.make_manifest([entry], {}, "1.0.0"))
    _, sources = shards.open_split(tmp_path, "train")
    sources["vla"][1]  # neighbours are fine
    with pytest.raises(CorruptShard, match=rf"{name}: record 2: CRC32 mismatch"):
        sources["vla"][2]


@pytest.mark.parametrize("bad_name", ["../escape.arrayrecord", "/etc/passwd", "sub/x.arrayrecord", ""])
def test_manifest_paths_must_stay_inside(tmp_path, bad_name):
    m = _write(tmp_path)
    m["shards"][0]["file"] = bad_name
    shards.write_manifest(tmp_path, m)
    with pytest.raises(CorruptShard, match="plain file names|outside"):
        shards.load_manifest(tmp_path)


def test_symlink_out_of_directory_refused(tmp_path):
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    m = _write(data_dir)
    outside = tmp_path / "elsewhere.arrayrecord"
    os.replace(data_dir / m["shards"][0]["file"], outside)
    os.symlink(outside, data_dir / m["shards"][0]["file"])
    with pytest.raises(CorruptShard, match="outside"):
        shards.load_manifest(data_dir)


def test_wrong_hash_and_missing_shard(tmp_path):
    m = _write(tmp_path)
    m["shards"][0]["sha256"] = "f" * 64
    shards.write_manifest(tmp_path, m)
    shards.load_manifest(tmp_path)  # hashes are only checked on request (they read every byte)
    with pytest.raises(CorruptShard, match=rf"{m['shards'][0]['file']}: sha256 .* does not match"):
        shards.load_manifest(tmp_path, verify_hashes=True)
    os.remove(tmp_path / m["shards"][1]["file"])
    with pytest.raises(CorruptShard, match="missing"):
        shards.load_manifest(tmp_path)


def test_malformed_manifest(tmp_path):
    (tmp_path / shards.MANIFEST).write_text("{not json")
    with pytest.raises(CorruptShard, match="invalid JSON"):
        shards.load_manifest(tmp_path)
    (tmp_path / shards.MANIFEST).write_text(json.dumps({"format": "other"}))
    with pytest.raises(CorruptShard, match="not a vlacabin-shards manifest"):
        shards.load_manifest(tmp_path)


# ---------------------------------------------------------------- tools.build_dataset
from tools import build_dataset  # noqa: E402

_CFG = f"{Path(__file__).resolve().parents[2] / 'configs' / 'vla_cabin.py'}:tiny"


def _build(out, *extra):
    return build_dataset.main(["--config", _CFG, "--out", str(out), *map(str, extra)])


def test_build_refuses_existing_dir_and_rebuild_is_reproducible(tmp_path, capsys):
    out = tmp_path / "ds"
    assert _build(out, "--num-samples", 8, "--heldout-samples", 4) == 0
    first = shards.data_hash(shards.load_manifest(out, verify_hashes=True))
    assert f"DataHash {first}" in capsys.readouterr().out
    assert _build(out, "--num-samples", 8) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _build(out, "--num-samples", 8, "--heldout-samples", 4, "--overwrite") == 0
    assert shards.data_hash(shards.load_manifest(out)) == first  # same content, same DataHash
    assert not [p for p in tmp_path.iterdir() if p.name != "ds"]  # no temp dirs left behind
    other = tmp_path / "notdata"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert _build(other, "--num-samples", 4, "--overwrite") == 2
    assert "not a dataset directory" in capsys.readouterr().err and (other / "keep.txt").exists()


def _wav(path, seconds=0.5, sr=16000):
    import wave

    t = np.arange(int(seconds * sr)) / sr
    pcm = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(sr)
        w.writeframes(pcm.tobytes())


def test_build_from_jsonl_logs(tmp_path, capsys):
    logs = tmp_path / "logs"
    logs.mkdir()
    _wav(logs / "a.wav")
    _wav(logs / "b.wav", seconds=0.2)
    np.save(logs / "img.npy", np.full((40, 50, 3), 200, np.uint8))
    np.save(logs / "clip.npy", np.zeros((9, 32, 32, 3), np.uint8))
    (logs / "state.json").write_text(json.dumps({"devices": {"climate.temp": "24"}, "cabin_temp": 30.0}))
    lines = [
        {"kind": "vla", "id": 7, "text": "a bit colder", "audio": "a.wav", "image": "img.npy",
         "state": "state.json", "actions": ["climate.temp=22"], "explanation": "it is hot",
         "constraint_tags": ["driving"], "language": "en", "history": ["a bit colder"],
         "history_actions": [["climate.temp=23", "climate.temp=24"]]},
        {"kind": "video_text", "id": 8, "text": "an empty cabin", "frames": "clip.npy", "split": "heldout"},
        {"kind": "speech_text", "id": 9, "text": "hello", "audio": "b.wav"},
    ]
    jsonl = logs / "logs.jsonl"
    jsonl.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    out = tmp_path / "ds"
    assert _build(out, "--jsonl", jsonl) == 0
    capsys.readouterr()
    manifest, train = shards.open_split(out, "train", verify_hashes=True)
    assert manifest["counts"]["train"] == {"vla": 1, "image_text": 0, "video_text": 0, "speech_text": 1}
    assert manifest["generator"]["source"] == "jsonl"
    vla = train["vla"][0]
    assert vla["sample_id"] == 7 and vla["frames"].shape == (1, 32, 32, 3)
    assert vla["mel"].shape == (32, 32)  # 0.5 s at a 10 ms hop, cut to the tiny mel_frames
    assert train["speech_text"][0]["mel"].shape == (18, 32)  # 0.2 s: 1 + (3200 - 400) // 160
    assert vla["state"]["cabin_temp"] == 30.0 and vla["state_numeric"].dtype == np.float32
    assert vla["history_actions"] == [["climate.temp=23", "climate.temp=24"]]
    assert train["speech_text"][0]["history_actions"] == []  # optional: no earlier turn
    _, held = shards.open_split(out, "heldout")
    assert held["video_text"][0]["frames"].shape == (4, 32, 32, 3)  # 9 frames subsampled to 4

    # Real logs feed the pipeline like synthetic shards; kinds without data drop out of the mix.
    from configs.vla_cabin import BALANCED_MIXTURE, get_config
    from vlacabin_jax.data import pipeline

    cfg = get_config("tiny")
    cfg.data.mixture = BALANCED_MIXTURE
    it = pipeline.make_dataset(cfg, global_batch_size=3, seed=0, source=str(out))
    batch = next(it)
    it.close()
    assert sorted(batch["sample_id"].tolist()) == [7, 7, 9] and batch["has_actions"].sum() == 2

    bad = logs / "bad.jsonl"
    bad.write_text(json.dumps(lines[0]) + "\n" + json.dumps(dict(lines[2], id=3, actions=["warp=9"])) + "\n")
    assert _build(tmp_path / "bad", "--jsonl", bad) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # earlier lines are the progress bar
    assert last.startswith("build_dataset: error: ") and "bad.jsonl:2" in last and "warp=9" in last
    for log, why in (([["climate.temp=23", "climate.fan=2"]], "not a value of the path"),
                     ([["climate.temp=23", "climate.temp=99"]], "climate.temp=99"),
                     ([["climate.temp=23"]], "[executed, before] action-token pairs")):
        bad.write_text(json.dumps(dict(lines[0], history_actions=log)) + "\n")
        assert _build(tmp_path / "bad", "--jsonl", bad) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("build_dataset: error: ") and "bad.jsonl:1" in last and why in last, last
    bad.write_text(json.dumps(dict(lines[0], audio="missing.wav")) + "\n")
    assert _build(tmp_path / "bad", "--jsonl", bad) == 2
    assert "missing.wav" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_counts_must_agree_with_shard_entries(tmp_path):
    m = _write(tmp_path)
    m["counts"]["train"]["vla"] = 99
    shards.write_manifest(tmp_path, m)
    with pytest.raises(CorruptShard, match="disagree"):
        shards.load_manifest(tmp_path)
