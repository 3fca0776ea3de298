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


def test_activation_constraints_bind_only_inside_a_step():
    """Dense layers pin batch-major activations to rows over (data, fsdp) (width replicated, mlp
    over tensor) inside `activation_sharding`; outside it they place no constraint at all."""
    import jax.numpy as jnp

    from vlacabin_jax.model import layers

    mesh = sharding.make_mesh(mesh_cfg(2, 2, 2))
    rules = sharding.logical_rules(mesh_cfg(2, 2, 2))
    mlp = layers.Mlp(32, "swiglu")
    x = jax.random.normal(jax.random.key(1), (4, 6, 16))
    params = mlp.init(jax.random.key(0), x)
    plain = lambda p, x: mlp.apply(p, x)  # noqa: E731

    def in_step(p, x):
        with sharding.activation_sharding(mesh, rules):
            return mlp.apply(p, x)

    assert "sharding_constraint" not in str(jax.make_jaxpr(plain)(params, x))
    specs = [eqn.params["sharding"].spec for eqn in jax.make_jaxpr(in_step)(params, x).eqns
             if eqn.primitive.name == "sharding_constraint"]
    assert PartitionSpec(("data", "fsdp"), None, None) in specs      # Dense inputs / outputs of width 16
    assert PartitionSpec(("data", "fsdp"), None, "tensor") in specs  # the mlp hidden [b, l, 32]
    assert float(jnp.max(jnp.abs(jax.jit(in_step)(params, x) - jax.jit(plain)(params, x)))) < 1e-5
    # A batch the mesh does not divide stays replicated instead of failing; rank-2 inputs pass.
    odd = jax.random.normal(jax.random.key(2), (3, 6, 16))
    assert jax.jit(in_step)(params, odd).shape == (3, 6, 16)
    assert layers.constrain_activation(jnp.ones((6, 16)), ("embed",)).shape == (6, 16)
    # [batch, frames, patches, width]: one logical name per dim (Flax's rule).
    assert layers.activation_axes(4, ("embed",)) == ("activation_batch", "activation_length", None, "activation_embed")
    assert layers.activation_axes(4, ("heads", "head_dim")) == (
        "activation_batch", "activation_length", "activation_heads", "activation_embed")
