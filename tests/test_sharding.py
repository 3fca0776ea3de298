"""Mesh construction and logical-axis rules: the small model really is split over 2x2x2."""
import math

import flax.linen as nn
import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec

from configs.vla_cabin import get_config
from vlacabin_jax import sharding
from vlacabin_jax.model import functional as F


def mesh_cfg(data, fsdp, tensor, override=""):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules_override=override))


def test_mesh_shapes_and_errors():
    assert sharding.mesh_shape(mesh_cfg(-1, 2, 2), 8) == (2, 2, 2)
    assert sharding.mesh_shape(mesh_cfg(8, 1, -1), 8) == (8, 1, 1)
    with pytest.raises(sharding.MeshError, match="needs 12 devices but 8"):
        sharding.mesh_shape(mesh_cfg(3, 2, 2), 8)
    with pytest.raises(sharding.MeshError, match="does not divide"):
        sharding.mesh_shape(mesh_cfg(-1, 3, 1), 8)
    with pytest.raises(sharding.MeshError, match="at most one axis"):
        sharding.mesh_shape(mesh_cfg(-1, -1, 1), 8)


def test_rules_override():
    rules = dict(sharding.logical_rules(mesh_cfg(-1, 1, 1, "mlp=fsdp, vocab=, batch=data+fsdp")))
    assert rules["mlp"] == "fsdp" and rules["vocab"] is None and rules["batch"] == ("data", "fsdp")
    with pytest.raises(sharding.MeshError, match="unknown mesh axis"):
        sharding.logical_rules(mesh_cfg(-1, 1, 1, "mlp=model"))
    with pytest.raises(sharding.MeshError, match="NAME=AXIS"):
        sharding.logical_rules(mesh_cfg(-1, 1, 1, "bogus=fsdp"))


def test_small_model_weights_are_split_over_2x2x2():
    cfg = get_config("small")
    cfg.mesh.update(data=2, fsdp=2, tensor=2)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh)
    abstract = jax.eval_shape(lambda: F.init_params(cfg, jax.random.key(0)))
    shardings = sharding.param_shardings(abstract, mesh, rules)
    # Create the params directly sharded, then look at what each device holds.
    trainable, frozen = jax.jit(lambda k: nn.unbox(F.init_params(cfg, k)), out_shardings=shardings)(jax.random.key(0))
    checked = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path({**trainable, **frozen}):
        if leaf.size < 2 ** 16:
            continue
        name = jax.tree_util.keystr(path)
        shard = leaf.addressable_shards[0].data
        assert shard.size < leaf.size, f"{name} {leaf.shape} is replicated ({leaf.sharding.spec})"
        # Large matrices split over both fsdp (embed) and tensor (mlp/heads/vocab).
        if leaf.ndim >= 2 and any(ax in ("mlp", "heads", "vocab") for ax in _logical_axes(abstract, path)):
            assert math.prod(leaf.shape) // shard.size >= 4, f"{name} split only {leaf.sharding.spec}"
        checked += 1
    assert checked > 20
    # The embedding table: vocab over tensor, embed over fsdp.
    assert frozen["lm"]["embedding"].sharding.spec == PartitionSpec("tensor", "fsdp")


def _logical_axes(boxed_tree, path):
    node = boxed_tree[0] if path[0].key not in ("vit", "lm") else boxed_tree[1]
    for entry in path:
        node = node[entry.key]
    return node.names if isinstance(node, nn.LogicallyPartitioned) else ()
