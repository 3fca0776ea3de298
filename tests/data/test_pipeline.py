"""The grain pipeline: contract shapes, per-process slices, mixture, determinism, resume, sources."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from configs.vla_cabin import BALANCED_MIXTURE, get_config
from vlacabin_jax.data import pipeline, spec
from vlacabin_jax.data.spec import KINDS

from tools import build_dataset

B = 8  # global batch


def _cfg(**data):
    cfg = get_config("tiny")
    cfg.data.synthetic_size, cfg.data.heldout_size = 48, 16
    cfg.data.mixture = BALANCED_MIXTURE  # the tests' 2:2:1:1
    cfg.data.update(data)
    return cfg


def _batches(cfg, n, **kw):
    kw = {"global_batch_size": B, "seed": 0, **kw}
    it = pipeline.make_dataset(cfg, **kw)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batches_match_spec_exactly():
    cfg = _cfg()
    for count in (1, 2):
        want = spec.batch_spec(cfg, B // count)
        (batch,) = _batches(cfg, 1, process_index=count - 1, process_count=count)
        assert set(batch) == set(want)
        for k, (shape, dtype) in want.items():
            assert batch[k].shape == shape and batch[k].dtype == dtype, k


def test_process_slices_are_disjoint_and_cover_the_global_batch():
    cfg = _cfg()
    whole = [b["sample_id"] for b in _batches(cfg, 3)]
    for count in (2, 4):
        parts = [[b["sample_id"] for b in _batches(cfg, 3, process_index=p, process_count=count)]
                 for p in range(count)]
        for g in range(3):
            ids = [parts[p][g] for p in range(count)]
            assert len(set(np.concatenate(ids))) == B  # disjoint
            # process p holds the contiguous rows [p·B/P, (p+1)·B/P): where its rows sit in the
            # global array, so the global batch equals the single-process one row for row.
            np.testing.assert_array_equal(np.concatenate(ids), whole[g])
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline.make_dataset(cfg, global_batch_size=6, seed=0, process_count=4)


def _kind_fractions(cfg, n=600):
    """Kind frequencies of the first n mixed elements (cheap fake sources, no rendering)."""
    sources = {k: [{"kind": k}] * 50 for k in KINDS}
    stream = pipeline.sample_stream(cfg, sources, "train", seed=0)
    counts = np.bincount([KINDS.index(stream[i]["kind"]) for i in range(n)], minlength=4)
    return counts / n


def test_mixture_two_two_one_one_and_temperature():
    np.testing.assert_allclose(_kind_fractions(_cfg()), [1 / 3, 1 / 3, 1 / 6, 1 / 6], atol=0.02)
    hot = _kind_fractions(_cfg(mixture_temperature=4.0))
    want = np.array([2, 2, 1, 1]) ** 0.25
    np.testing.assert_allclose(hot, want / want.sum(), atol=0.02)
    assert hot.max() / hot.min() < 1.3
    assert _kind_fractions(_cfg(mixture="vla=1,speech_text=1"))[[1, 2]].sum() == 0
    with pytest.raises(ValueError, match="unknown kind"):
        pipeline.parse_mixture("vla=2,robot=1")


def test_real_batches_follow_the_mixture():
    kinds = np.concatenate([b["kind"] for b in _batches(_cfg(), 6)])
    np.testing.assert_allclose(np.bincount(kinds, minlength=4) / len(kinds), [1 / 3, 1 / 3, 1 / 6, 1 / 6],
                               atol=0.05)


def test_deterministic_given_seed():
    cfg = _cfg()
    a, b, c = _batches(cfg, 3), _batches(cfg, 3), _batches(cfg, 3, seed=1)
    assert all(_same(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x["sample_id"], y["sample_id"]) for x, y in zip(a, c))


def test_epochs_reshuffle_and_cover_every_sample():
    cfg = _cfg(mixture="vla=1", synthetic_size=4 * 16)  # 16 vla samples: two epochs in 4 batches
    ids = [b["sample_id"] for b in _batches(cfg, 4)]
    first, second = np.concatenate(ids[:2]), np.concatenate(ids[2:])
    assert len(set(first)) == 16 and set(first) == set(second)
    assert not np.array_equal(first, second)


def test_heldout_is_disjoint_from_train():
    cfg = _cfg()
    train = {int(i) for b in _batches(cfg, 6) for i in b["sample_id"]}
    held = {int(i) for b in _batches(cfg, 6, split="heldout") for i in b["sample_id"]}
    assert not train & held
    assert all((i & 0xFFFFFFFFFF) >= pipeline.HELDOUT_OFFSET for i in held)


@pytest.mark.parametrize("restore_workers", [0, 1])
def test_state_restore_continues_with_the_next_batch(tmp_path, restore_workers):
    cfg = _cfg()
    it = pipeline.make_dataset(cfg, global_batch_size=B, seed=3, num_workers=0)
    for _ in range(3):
        next(it)
    pipeline.save_state(it, tmp_path / "data_state.json")
    state = json.loads((tmp_path / "data_state.json").read_text())
    assert state["next_batch"] == 3 and json.loads(json.dumps(state)) == it.get_state()
    expected = [next(it), next(it)]
    it.close()

    t0 = time.perf_counter()
    fresh = pipeline.make_dataset(cfg, global_batch_size=B, seed=3, num_workers=restore_workers)
    pipeline.restore_state(fresh, tmp_path / "data_state.json")
    got = [next(fresh), next(fresh)]
    assert fresh.get_state()["next_batch"] == 5
    fresh.close()
    assert all(_same(x, y) for x, y in zip(expected, got))
    assert time.perf_counter() - t0 < 60


def test_state_from_another_stream_is_refused():
    cfg = _cfg()
    it = pipeline.make_dataset(cfg, global_batch_size=B, seed=0)
    state = it.get_state()
    other = pipeline.make_dataset(cfg, global_batch_size=B, seed=1)
    with pytest.raises(ValueError, match="another stream"):
        other.set_state(state)
    it.close()
    other.close()


def test_shards_and_on_the_fly_give_identical_batches(tmp_path):
    cfg = _cfg()
    out = tmp_path / "ds"
    config = Path(__file__).resolve().parents[2] / "configs" / "vla_cabin.py"
    assert build_dataset.main(["--config", f"{config}:tiny", "--out", str(out),
                               "--num-samples", "48", "--heldout-samples", "16", "--shards", "2"]) == 0
    for split, n in (("train", 4), ("heldout", 2)):
        fly = _batches(cfg, n, split=split)
        disk = _batches(cfg, n, split=split, source=str(out))
        assert all(_same(x, y) for x, y in zip(fly, disk)), split
    assert pipeline.dataset_hash(cfg, str(out)) != pipeline.dataset_hash(cfg)
    with pytest.raises(ValueError, match="image_size"):
        cfg2 = _cfg()
        cfg2.model.vit.image_size = 64
        pipeline.make_dataset(cfg2, global_batch_size=B, seed=0, source=str(out))


def test_grain_orbax_checkpoint_handler_round_trip(tmp_path):
    """The trainer saves the iterator with grain's Orbax handler; it must take our iterator."""
    import grain
    from etils import epath

    cfg = _cfg()
    it = pipeline.make_dataset(cfg, global_batch_size=B, seed=0)
    next(it), next(it)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), args=grain.checkpoint.CheckpointSave(it))
    expected = next(it)
    fresh = pipeline.make_dataset(cfg, global_batch_size=B, seed=0)
    handler.restore(epath.Path(tmp_path), args=grain.checkpoint.CheckpointRestore(fresh))
    assert _same(next(fresh), expected)
    it.close(), fresh.close()
