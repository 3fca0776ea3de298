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
