"""Orbax checkpoints: round trip with JSON items, cross-mesh restore, policies, incomplete steps,
compatibility checks, and the blocking time of an asynchronous vs a synchronous save."""

import json
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import vlacabin_jax
from configs.vla_cabin import get_config
from vlacabin_jax import sharding
from vlacabin_jax.train import checkpoint as ckpt_lib
from vlacabin_jax.train import state as state_lib


def _cfg(**ck):
    cfg = get_config("tiny")
    cfg.checkpoint.update(ck)
    return cfg


def _mesh(shape):
    cfg = get_config("tiny").mesh
    cfg.data, cfg.fsdp, cfg.tensor = shape
    return sharding.make_mesh(cfg)


def _state(mesh, rows=64, cols=32, seed=0):
    """A small TrainState with sharded leaves (its shardings are what a restore targets)."""
    rng = np.random.default_rng(seed)
    spec = {"w": P("fsdp", "tensor"), "b": P()}
    trainable = {"w": rng.normal(size=(rows, cols)).astype(np.float32), "b": np.arange(cols, dtype=np.float32)}
    state = state_lib.TrainState(step=np.int32(7), trainable=trainable,
                                 frozen={"emb": rng.normal(size=(16, cols)).astype(jnp.bfloat16)},
                                 opt_state=({"w": trainable["w"] * 0.5, "b": trainable["b"] * 0},),
                                 rng=np.array([1, 2], np.uint32))
    specs = state_lib.TrainState(step=P(), trainable=spec, frozen={"emb": P("fsdp")},
                                 opt_state=({"w": P("fsdp", "tensor"), "b": P()},), rng=P())
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))
    return jax.device_put(state, shardings), shardings


def _checkpointer(path, cfg=None, mesh_shape=None):
    return ckpt_lib.Checkpointer(path, cfg or _cfg(), mesh_shape=mesh_shape or {"data": 8, "fsdp": 1, "tensor": 1},
                                 data_hash="abc123")


def test_round_trip_onto_another_mesh(tmp_path):
    state, _ = _state(_mesh((2, 4, 1)))
    ck = _checkpointer(tmp_path / "ckpt", mesh_shape={"data": 2, "fsdp": 4, "tensor": 1})
    data_state = {"version": 1, "next_batch": 12, "stream": {"seed": 0}}
    assert ck.save(7, state, data_state, {"rollbacks": 1, "skipped_batches": [5]}, force=True)
    ck.close()

    target_state, target_shardings = _state(_mesh((2, 2, 2)), seed=1)
    target = state_lib.abstract_with_shardings(target_state, target_shardings)
    ck = _checkpointer(tmp_path / "ckpt")
    restored = ck.restore_latest(target)
    assert restored.step == 7 and restored.data == data_state
    for got, want, s in zip(jax.tree.leaves(restored.state), jax.tree.leaves(state), jax.tree.leaves(target_shardings)):
        assert got.sharding == s and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    meta = restored.metadata
    assert meta["model_version"] == vlacabin_jax.__version__ and meta["data_hash"] == "abc123"
    assert meta["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and meta["code_revision"]
    assert meta["action_vocabulary"]["tokens"][:3] == ["<pad>", "<eos>", "<noop>"]
    assert meta["loop"] == {"rollbacks": 1, "skipped_batches": [5]}
    assert restored.config["checkpoint"]["interval_minutes"] == 120.0
    assert ckpt_lib.read_metadata(tmp_path / "ckpt")["step"] == 7
    # Plain JSON on disk, no pickle.
    assert json.loads((tmp_path / "ckpt" / "7" / "config" / "metadata").read_text())["variant"] == "tiny"
    ck.close()


def test_policy_first_step_every_steps_and_keep(tmp_path):
    state, _ = _state(_mesh((8, 1, 1)))
    ck = _checkpointer(tmp_path / "ckpt", _cfg(every_steps=3, keep=2))
    saved = []
    for s in range(1, 11):
        if ck.should_save(s):
            saved.append(s)
            ck.save(s, state, {}, force=True)
            ck.wait()  # the time policy skips steps while a save is still running
    # Step 1 (first save of a fresh run, the time policy), then every 3 steps; 120 min never pass here.
    assert saved == [1, 3, 6, 9]
    assert ck.steps() == [6, 9]  # keep=2
    assert ck.save(10, state, {}, force=True) and not ck.save(10, state, {}, force=True)
    ck.close()


def test_incomplete_checkpoint_is_moved_aside_and_skipped(tmp_path):
    state, shardings = _state(_mesh((8, 1, 1)))
    ck = _checkpointer(tmp_path / "ckpt")
    ck.save(4, state, {"next_batch": 4}, force=True)
    ck.close()
    # A save killed midway: a newer step directory without Orbax's markers.
    shutil.copytree(tmp_path / "ckpt" / "4" / "state", tmp_path / "ckpt" / "9" / "state")
    ck = _checkpointer(tmp_path / "ckpt")
    assert ck.quarantined == [9] and ck.steps() == [4]
    assert (tmp_path / "ckpt.incomplete").is_dir()
    assert ck.restore_latest(state_lib.abstract_with_shardings(state, shardings)).step == 4
    ck.close()


def test_incompatible_checkpoint_is_refused(tmp_path):
    state, shardings = _state(_mesh((8, 1, 1)))
    ck = _checkpointer(tmp_path / "ckpt")
    ck.save(2, state, {}, force=True)
    ck.close()
    wider = _cfg()
    wider.model.dnfm.width = 128
    ck = _checkpointer(tmp_path / "ckpt", wider)
    with pytest.raises(ckpt_lib.CheckpointError, match="model.dnfm.width was 64, now 128"):
        ck.restore_latest(state_lib.abstract_with_shardings(state, shardings))
    ck.close()
    lora = _cfg()
    lora.train.trainable = "lora_and_heads"
    ck = _checkpointer(tmp_path / "ckpt", lora)
    with pytest.raises(ckpt_lib.CheckpointError, match=f"train.trainable was '{_cfg().train.trainable}', now 'lora_and_heads'"):
        ck.restore_latest(state_lib.abstract_with_shardings(state, shardings))
    ck.close()
    other_data = ckpt_lib.Checkpointer(tmp_path / "ckpt", _cfg(), mesh_shape={}, data_hash="zzz")
    with pytest.raises(ckpt_lib.CheckpointError, match="DataHash"):
        other_data.restore_latest(state_lib.abstract_with_shardings(state, shardings))
    other_data.close()


def test_async_save_blocks_much_less_than_sync(tmp_path):
    mesh = _mesh((8, 1, 1))
    state, _ = _state(mesh, rows=4096, cols=4096)  # ~200 MB of float32 over params and moments
    blocked = {}
    for mode in (True, False, True):  # the first (async) save warms Orbax up and is not counted
        ck = _checkpointer(tmp_path / f"ckpt_{mode}", _cfg(async_save=mode))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        ck.save(1, state, {}, force=True)
        blocked[mode] = time.perf_counter() - t0
        t1 = time.perf_counter()
        ck.wait()
        total = blocked[mode] + time.perf_counter() - t1
        ck.close()
        shutil.rmtree(tmp_path / f"ckpt_{mode}")
        print(f"\n{'async' if mode else 'sync '} save of {sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20:.0f} MiB: "
              f"loop blocked {blocked[mode] * 1e3:.0f} ms (until on disk: {total * 1e3:.0f} ms)")
    assert blocked[True] < 0.5 * blocked[False]


def _saved_steps(path, steps, state):
    ck = _checkpointer(path)
    for step in steps:
        ck.save(step, state, {"next_batch": step}, force=True)
        ck.wait()  # finished, with its checksums
    ck.close()


def _largest_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _flip_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage", [_flip_bit, _truncate])
def test_damaged_checkpoint_is_set_aside_and_the_previous_one_restored(tmp_path, damage):
    state, shardings = _state(_mesh((8, 1, 1)))
    _saved_steps(tmp_path / "ckpt", (4, 8), state)
    sums = json.loads((tmp_path / "ckpt" / "8" / ckpt_lib.CHECKSUMS).read_text())
    assert "_CHECKPOINT_METADATA" in sums and any(name.startswith("state/") for name in sums)
    damage(_largest_file(tmp_path / "ckpt" / "8"))
    ck = _checkpointer(tmp_path / "ckpt")
    assert list(ck.damaged) == [8] and "does not match its sha256" in ck.damaged[8]
    assert ck.steps() == [4] and [p.name.split("-")[0] for p in (tmp_path / "ckpt.damaged").iterdir()] == ["8"]
    assert ck.restore_latest(state_lib.abstract_with_shardings(state, shardings)).step == 4
    # Step 8 can be written again (the damaged copy no longer holds its name).
    assert ck.save(8, state, {"next_batch": 8}, force=True)
    ck.close()


def test_unverified_unreadable_checkpoint_falls_back_and_all_damaged_is_an_error(tmp_path):
    state, shardings = _state(_mesh((8, 1, 1)))
    target = state_lib.abstract_with_shardings(state, shardings)
    _saved_steps(tmp_path / "ckpt", (4, 8), state)
    # No checksums (a save killed before they were written), and Orbax's data truncated to nothing.
    (tmp_path / "ckpt" / "8" / ckpt_lib.CHECKSUMS).unlink()
    _largest_file(tmp_path / "ckpt" / "8").write_bytes(b"")
    ck = _checkpointer(tmp_path / "ckpt")
    assert not ck.damaged and ck.steps() == [4, 8]
    assert ck.restore_latest(target).step == 4
    assert list(ck.damaged) == [8] and ck.steps() == [4]
    ck.close()
    # Every remaining checkpoint damaged: one clear error, nothing restored, the files kept aside.
    _flip_bit(_largest_file(tmp_path / "ckpt" / "4"))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"every checkpoint in .* is damaged \(step 4: file state/"):
        _checkpointer(tmp_path / "ckpt")
    assert not any(p.name.isdigit() for p in (tmp_path / "ckpt").iterdir())
    assert len(list((tmp_path / "ckpt.damaged").iterdir())) == 2
    with pytest.raises(ckpt_lib.CheckpointError, match="no complete checkpoint"):
        ckpt_lib.read_metadata(tmp_path / "ckpt")


def test_every_reader_finds_the_same_newest_complete_step_and_refuses_it_damaged(tmp_path):
    """The trainer's metadata reader, train.init_from, evaluation's restore and the export all find
    steps through `complete_steps`: a newer step killed midway is passed over by each, and a
    damaged newest step is refused by those that verify, each with its one line."""
    from vlacabin_jax.export import source
    from vlacabin_jax.train import init_from, restore

    state, _ = _state(_mesh((8, 1, 1)))
    ckpts = tmp_path / "ckpt"
    _saved_steps(ckpts, (4, 8), state)
    shutil.copytree(ckpts / "8" / "state", ckpts / "9" / "state")  # a save killed midway (no marker)
    (ckpts / "notes").mkdir()
    assert ckpt_lib.saved_steps(ckpts) == [4, 8, 9] and ckpt_lib.complete_steps(ckpts) == [4, 8]
    assert ckpt_lib.newest_complete_step(ckpts) == 8 and ckpt_lib.newest_complete_step(tmp_path / "none") is None
    assert ckpt_lib.missing_parts(ckpts / "9") == ["_CHECKPOINT_METADATA (save never finished)", "data", "config",
                                                   "metadata"]
    assert ckpt_lib.read_metadata(ckpts)["step"] == 8
    assert init_from._state_item(ckpts) == ckpt_lib.state_item(ckpts, 8) == (ckpts / "8" / "state").absolute()
    assert restore.find_checkpoint_item(ckpts) == ckpts / "8" / "state"
    assert source.resolve_step_dir(ckpts) == ckpts / "8"
    with pytest.raises(source.ExportInputError, match=r"checkpoint .*/9 is incomplete: missing _CHECKPOINT_METADATA"):
        source.resolve_step_dir(ckpts / "9")

    _flip_bit(_largest_file(ckpts / "8"))
    with pytest.raises(ckpt_lib.CheckpointError, match=r"^train.init_from=.*: checkpoint 8 is damaged \(file state/"):
        init_from._state_item(ckpts)
    with pytest.raises(source.ExportInputError, match=r"^checkpoint .*/8 is damaged: file state/"):
        source.resolve_step_dir(ckpts)
    shutil.rmtree(ckpts / "4")
    shutil.rmtree(ckpts / "8")
    with pytest.raises(ckpt_lib.CheckpointError, match=r"^train.init_from=.*: no complete checkpoint there"):
        init_from._state_item(ckpts)
    with pytest.raises(source.ExportInputError, match=r"^no complete checkpoint in .* \(incomplete steps: \[9\]\)"):
        source.resolve_step_dir(ckpts)
