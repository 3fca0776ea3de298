"""train.init_from: params matched by path across groups, with loaded / new / dropped reported."""

from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from vlacabin_jax.train import init_from
from vlacabin_jax.train.checkpoint import ITEMS, CheckpointError


@flax.struct.dataclass
class _State:
    trainable: dict
    frozen: dict


def test_plan_sorts_paths_and_allows_only_adapters_to_differ():
    saved = {"enc/dense/kernel": (4, 8), "dnfm/w": (3,), "old/head": (2,), "enc/lora_a": (4, 2)}
    wanted = {"enc/dense/kernel": (4, 8), "dnfm/w": (5,), "enc/lora_b": (2, 8)}
    p = init_from.plan(saved, wanted)
    assert p.loaded == ("enc/dense/kernel",) and p.loaded_values == 32
    assert p.new == ("enc/lora_b",) and p.dropped == ("enc/lora_a", "old/head")
    assert p.mismatched == ("dnfm/w: (3,) vs (5,)",)
    problems = p.problems()
    assert problems[0].startswith("shape mismatch dnfm/w") and len(problems) == 2  # + old/head dropped
    ok = init_from.plan({"a/kernel": (2,)}, {"a/kernel": (2,), "a/lora_a": (2, 1), "a/lora_b": (1, 2)})
    assert ok.problems() == [] and "new (2): a/lora_a, a/lora_b" in ok.summary()
    assert init_from.plan({"x": (1,)}, {"y/lora_a": (1,)}).problems()[-1] == "no param of the checkpoint matches this model"


def _save(directory: Path, tree: dict) -> None:
    """A checkpoint directory as the trainer leaves it: <dir>/1/{state,data,config,metadata}."""
    step = directory / "1"
    with ocp.PyTreeCheckpointer() as c:
        c.save(step / "state", tree)
    for item in ITEMS[1:]:
        (step / item).mkdir()
        (step / item / "x").write_text("{}")
    (step / "_CHECKPOINT_METADATA").write_text("{}")


def test_load_moves_params_across_groups_keeps_new_ones_and_casts(tmp_path):
    saved = {"trainable": {"enc": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)},
                           "dnfm": {"w": np.full((4,), 7.0, np.float32)}},
             "frozen": {"lm": {"emb": np.ones((2, 2), np.float32)}}, "opt_state": {"mu": np.zeros(3, np.float32)},
             "step": np.int32(9)}
    _save(tmp_path / "sft", saved)
    # The next stage freezes the encoder (it moves to `frozen`) and adds an adapter; lm is bf16.
    state = _State(trainable={"dnfm": {"w": jnp.zeros(4)}, "enc": {"lora_a": jnp.full((3, 1), 0.5)}},
                   frozen={"enc": {"kernel": jnp.zeros((2, 3))}, "lm": {"emb": jnp.zeros((2, 2), jnp.bfloat16)}})
    repl = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",)), PartitionSpec())
    new, plan = init_from.load(tmp_path / "sft", state, jax.tree.map(lambda _: repl, state))
    assert plan.loaded == ("dnfm/w", "enc/kernel", "lm/emb") and plan.new == ("enc/lora_a",) and not plan.dropped
    np.testing.assert_array_equal(np.asarray(new.frozen["enc"]["kernel"]), saved["trainable"]["enc"]["kernel"])
    np.testing.assert_array_equal(np.asarray(new.trainable["dnfm"]["w"]), 7.0)
    assert float(new.trainable["enc"]["lora_a"][0, 0]) == 0.5  # new: kept at its init
    assert new.frozen["lm"]["emb"].dtype == jnp.bfloat16 and float(new.frozen["lm"]["emb"][0, 0]) == 1.0
    bad = _State(trainable={"dnfm": {"w": jnp.zeros(5)}}, frozen={})
    with pytest.raises(CheckpointError, match=r"shape mismatch dnfm/w: \(4,\) vs \(5,\)"):
        init_from.load(tmp_path / "sft", bad, jax.tree.map(lambda _: repl, bad))
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        init_from.load(tmp_path / "missing", state, jax.tree.map(lambda _: repl, state))


# ---- train.init_from on the trainer's own checkpoint (the loop tests' reference run) ------------

def _lora_start(init_from: Path, **extra):
    """The reference run's config with LoRA adapters on the encoders (lora_and_heads, as the align
    stage trains), starting from `init_from`."""
    from tests.train import runs

    cfg = runs.config(**{"train.init_from": str(init_from), "train.trainable": "lora_and_heads", **extra})
    cfg.model.lora.rank = 4
    return cfg


def _saved_leaf(step_dir: Path, group: str, *keys: str) -> np.ndarray:
    """One param of a trainer checkpoint's state item, read with its saved metadata."""
    with ocp.PyTreeCheckpointer() as c:
        tree = c.restore((step_dir / "state").absolute())
    node = tree[group]
    for k in keys:
        node = node[k]
    return np.asarray(node)


@pytest.mark.xdist_group("train_loop")
def test_loop_starts_from_its_own_checkpoint_and_reports_loaded_new_dropped(reference, tmp_path):
    """loop.train with init_from = the reference run's checkpoints/: every param of the model
    loaded (the anchor and encoders into `frozen`), the LoRA adapters new, nothing dropped; the
    report in events.jsonl; the loaded values those of the checkpoint. Stops before step 1 (no
    train step is compiled); the stop saves step 0."""
    from tests.train import runs
    from vlacabin_jax.train import checkpoint as ckpt_lib
    from vlacabin_jax.train import loop

    source, _, _ = reference
    newest = ckpt_lib.read_metadata(source / "checkpoints")["step"]
    summary = loop.train(_lora_start(source / "checkpoints"), tmp_path / "lora", stop=loop.StopFlag(at_step=0))
    assert summary.step == 0
    reports = [e["event"] for e in runs.events(tmp_path / "lora") if e["event"].startswith("init_from")]
    assert len(reports) == 1, runs.events(tmp_path / "lora")
    head, loaded, new, dropped = (line.strip() for line in reports[0].splitlines())
    assert head.startswith(f"init_from {source / 'checkpoints'}: ") and " params (" in head
    n_loaded = int(head.split(": ")[1].split(" params")[0])
    assert n_loaded > 100 and loaded.startswith(f"loaded ({n_loaded}): ")
    assert "lm (" in loaded and "vit (" in loaded and "text_encoder (" in loaded
    assert new.startswith("new (") and "text_encoder/…/lora_a" in new and "video_encoder/…/lora_b" in new
    assert dropped == "dropped (0): -"
    # The values: the encoder kernel (trainable in the source, frozen base weight here) and a head.
    for group, keys in ((("trainable", "frozen"), ("text_encoder", "encoder", "layers", "mlp", "up", "dense", "kernel")),
                        (("trainable", "trainable"), ("dnfm", "in_proj", "dense", "kernel"))):
        want = _saved_leaf(source / "checkpoints" / str(newest), group[0], *keys)
        got = _saved_leaf(tmp_path / "lora" / "checkpoints" / "0", group[1], *keys)
        np.testing.assert_array_equal(got, want)


@pytest.mark.xdist_group("train_loop")
def test_loop_refuses_a_damaged_init_from_checkpoint(reference, tmp_path):
    """A byte of the newest checkpoint changed: the run stops with one CheckpointError line naming
    the step and the file, before it writes anything."""
    import shutil

    from vlacabin_jax.train import checkpoint as ckpt_lib
    from vlacabin_jax.train import loop

    source, _, _ = reference
    copy = tmp_path / "checkpoints"
    shutil.copytree(source / "checkpoints", copy)
    newest = ckpt_lib.read_metadata(copy)["step"]
    victim = max((p for p in (copy / str(newest) / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint {newest} is damaged \(file .* does not match its sha256"):
        loop.train(_lora_start(copy), tmp_path / "run", stop=loop.StopFlag(at_step=0))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
